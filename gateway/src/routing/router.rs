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

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::routing::route::Route;
use crate::routing::tenant::Tenant;

/// One tenant's routes by path.
#[derive(Debug, Default)]
struct TenantRoutes {
    by_path: HashMap<String, Arc<Route>>,
}

/// Hosts and paths to routes, with every route in config order for listing.
#[derive(Debug)]
pub struct Table {
    /// Index 0: the default tenant; then one per `[[tenant]]`.
    tenants: Vec<TenantRoutes>,
    /// The tenants as of this table's config, in the same order.
    tenant_info: Vec<Arc<Tenant>>,
    exact: HashMap<String, usize>,
    wildcard: HashMap<String, usize>,
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
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        let mut by_tenant: Vec<TenantRoutes> = Vec::new();
        let mut tenant_info = Vec::new();
        for (i, (tenant, hosts)) in tenants.into_iter().enumerate() {
            for host in hosts {
                match host.strip_prefix("*.") {
                    Some(parent) => wildcard.insert(parent.to_owned(), i),
                    None => exact.insert(host, i),
                };
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
            exact,
            wildcard,
            order: routes,
        }
    }

    /// Which tenant serves `host` (an index into `tenants`).
    fn tenant_of(&self, host: Option<&str>) -> usize {
        if self.exact.is_empty() && self.wildcard.is_empty() {
            return 0;
        }
        let Some(host) = host.map(normalize_host) else {
            return 0;
        };
        if let Some(&i) = self.exact.get(&host) {
            return i;
        }
        match host.split_once('.') {
            Some((label, parent)) if !label.is_empty() => {
                self.wildcard.get(parent).copied().unwrap_or(0)
            }
            _ => 0,
        }
    }

    /// The route for a request to `host` (the `Host` header's value, port
    /// included or not) and `path`.
    pub fn resolve(&self, host: Option<&str>, path: &str) -> Option<&Arc<Route>> {
        self.tenants[self.tenant_of(host)].by_path.get(path)
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

/// A `Host` header value as tenants' host names are written: without the
/// port, lower-case, without a trailing dot.
fn normalize_host(host: &str) -> String {
    let host = host.trim();
    let name = if host.starts_with('[') {
        // An IPv6 literal: up to its closing bracket.
        host.find(']').map_or(host, |end| &host[..=end])
    } else {
        host.rsplit_once(':').map_or(host, |(name, _port)| name)
    };
    name.trim_end_matches('.').to_ascii_lowercase()
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
    pub fn resolve(&self, host: Option<&str>, path: &str) -> Option<Arc<Route>> {
        self.table.load().resolve(host, path).cloned()
    }

    /// Replaces the table.
    pub fn store(&self, table: Table) {
        self.table.store(Arc::new(table));
    }
}

#[cfg(test)]
mod tests {
    use super::normalize_host;

    #[test]
    fn host_headers_lose_their_port_case_and_trailing_dot() {
        assert_eq!(normalize_host("Chat.Example.COM:8080"), "chat.example.com");
        assert_eq!(normalize_host("example.org."), "example.org");
        assert_eq!(normalize_host("[::1]:8080"), "[::1]");
        assert_eq!(normalize_host("127.0.0.1"), "127.0.0.1");
    }
}
