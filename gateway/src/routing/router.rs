//! The routing table: request host and path to [`Route`], swapped as a
//! whole when the config is reloaded, read lock-free on every upgrade.
//!
//! Routing picks the tenant first, then the route:
//! 1. The request's host (the `Host` header, without its port, lower-case,
//!    without a trailing dot) is looked up among the tenants' exact host
//!    names; then, if it has more than one label, its parent domain among
//!    their wildcards (`*.example.org` matches `a.example.org`, not
//!    `example.org` nor `a.b.example.org`).
//! 2. A host no tenant names (or a request without one) goes to the default
//!    tenant: the top-level `[[route]]`s.
//! 3. The path is looked up among that tenant's routes only: a path the
//!    tenant does not route is 404, even if another tenant routes it.
//! 4. A request that is not a WebSocket upgrade, to a path that is not one
//!    of the tenant's routes, goes to the tenant's static mount with the
//!    longest matching path prefix ([`Table::static_mount`]), if any.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::StaticSettings;
pub use crate::routing::hosts::InvalidHost;
use crate::routing::hosts::{normalize_host, HostMap};
use crate::routing::route::Route;
use crate::routing::tenant::Tenant;

/// One tenant's routes by path, and its static mounts.
#[derive(Debug, Default)]
struct TenantRoutes {
    by_path: HashMap<String, Arc<Route>>,
    /// Longest path first.
    statics: Vec<Arc<StaticSettings>>,
}

/// Hosts and paths to routes, with every route in config order for listing.
#[derive(Debug)]
pub struct Table {
    /// Index 0: the default tenant; then one per `[[tenant]]`.
    tenants: Vec<TenantRoutes>,
    /// The tenants as of this table's config, in the same order.
    tenant_info: Vec<Arc<Tenant>>,
    hosts: HostMap<usize>,
    order: Vec<Arc<Route>>,
}

impl Default for Table {
    fn default() -> Self {
        Table::new(Vec::new(), vec![(Tenant::default_tenant(None), Vec::new())])
    }
}

impl Table {
    /// A table of `routes`, in this order, for `tenants`: the default tenant
    /// first, then each `[[tenant]]` with its host names.
    pub fn new(routes: Vec<Arc<Route>>, tenants: Vec<(Arc<Tenant>, Vec<String>)>) -> Table {
        let mut host_map = HostMap::default();
        let mut by_tenant: Vec<TenantRoutes> = Vec::new();
        let mut tenant_info = Vec::new();
        for (i, (tenant, hosts)) in tenants.into_iter().enumerate() {
            for host in hosts {
                host_map.insert(&host, i);
            }
            by_tenant.push(TenantRoutes::default());
            tenant_info.push(tenant);
        }
        if by_tenant.is_empty() {
            by_tenant.push(TenantRoutes::default());
            tenant_info.push(Tenant::default_tenant(None));
        }
        for route in &routes {
            let i = match &route.tenant {
                None => 0,
                Some(name) => tenant_info
                    .iter()
                    .position(|t| !t.is_default() && t.name == *name)
                    .unwrap_or(0),
            };
            by_tenant[i]
                .by_path
                .insert(route.path.clone(), route.clone());
        }
        Table {
            tenants: by_tenant,
            tenant_info,
            hosts: host_map,
            order: routes,
        }
    }

    /// This table with the static mounts `statics` (each in its tenant's
    /// list; a mount of an unknown tenant is the default tenant's).
    pub fn with_statics(mut self, statics: &[StaticSettings]) -> Table {
        for m in statics {
            let i = match &m.tenant {
                None => 0,
                Some(name) => self
                    .tenant_info
                    .iter()
                    .position(|t| !t.is_default() && &*t.name == name.as_str())
                    .unwrap_or(0),
            };
            self.tenants[i].statics.push(Arc::new(m.clone()));
        }
        for t in &mut self.tenants {
            t.statics.sort_by_key(|m| std::cmp::Reverse(m.path.len()));
        }
        self
    }

    /// The static mount serving `path` for `host` (as for
    /// [`Table::resolve`]), and the rest of the path inside it, without its
    /// leading `/` (`""` for the mount's own path): the tenant's mount with
    /// the longest path that is `path` or a whole-segment prefix of it.
    pub fn static_mount<'p>(
        &self,
        host: Option<&str>,
        path: &'p str,
    ) -> Result<Option<(Arc<StaticSettings>, &'p str)>, InvalidHost> {
        let tenant = &self.tenants[self.tenant_of(host)?];
        for m in &tenant.statics {
            let rest = if m.path == "/" {
                path.strip_prefix('/')
            } else {
                path.strip_prefix(m.path.as_str()).and_then(|r| {
                    if r.is_empty() {
                        Some(r)
                    } else {
                        r.strip_prefix('/')
                    }
                })
            };
            if let Some(rest) = rest {
                return Ok(Some((m.clone(), rest)));
            }
        }
        Ok(None)
    }

    /// Which tenant serves `host` (an index into `tenants`); `Err` if
    /// `host` is not a valid host (and optional port).
    fn tenant_of(&self, host: Option<&str>) -> Result<usize, InvalidHost> {
        let Some(host) = host else {
            return Ok(0);
        };
        let host = normalize_host(host).ok_or(InvalidHost)?;
        Ok(self.hosts.get(&host).copied().unwrap_or(0))
    }

    /// The route for a request to `host` (the request target's authority,
    /// or the `Host` header: a host name or address, port optional) and
    /// `path`; `Err` if the host is malformed (answered with 400).
    pub fn resolve(
        &self,
        host: Option<&str>,
        path: &str,
    ) -> Result<Option<&Arc<Route>>, InvalidHost> {
        Ok(self.tenants[self.tenant_of(host)?].by_path.get(path))
    }

    /// Whether the TLS server name `sni` and the request host `host` (as
    /// for [`Table::resolve`]) belong to the same tenant; a host that is
    /// malformed belongs to none.
    pub fn same_tenant(&self, sni: &str, host: Option<&str>) -> bool {
        match (self.tenant_of(Some(sni)), self.tenant_of(host)) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        }
    }

    /// The route of `tenant` (`None`: the default tenant) at `path`.
    pub fn get(&self, tenant: Option<&str>, path: &str) -> Option<&Arc<Route>> {
        let i = match tenant {
            None => 0,
            Some(name) => self
                .tenant_info
                .iter()
                .position(|t| !t.is_default() && &*t.name == name)?,
        };
        self.tenants[i].by_path.get(path)
    }

    /// The tenant named `name` as of this table (`None`: the default one).
    pub fn tenant(&self, name: Option<&str>) -> Option<&Arc<Tenant>> {
        match name {
            None => self.tenant_info.first(),
            Some(n) => self
                .tenant_info
                .iter()
                .find(|t| !t.is_default() && &*t.name == n),
        }
    }

    /// Every route, in config order.
    pub fn routes(&self) -> &[Arc<Route>] {
        &self.order
    }
}

/// The current routing table.
#[derive(Debug)]
pub struct Router {
    table: ArcSwap<Table>,
}

impl Router {
    /// A router serving `table`.
    pub fn new(table: Table) -> Router {
        Router {
            table: ArcSwap::from_pointee(table),
        }
    }

    /// The table as it is now.
    pub fn load(&self) -> Arc<Table> {
        self.table.load_full()
    }

    /// The route for a request to `host` and `path`, as of now.
    pub fn resolve(
        &self,
        host: Option<&str>,
        path: &str,
    ) -> Result<Option<Arc<Route>>, InvalidHost> {
        Ok(self.table.load().resolve(host, path)?.cloned())
    }

    /// Replaces the table.
    pub fn store(&self, table: Table) {
        self.table.store(Arc::new(table));
    }
}
