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

    /// Which tenant serves `host` (an index into `tenants`); `Err` if
    /// `host` is not a valid host (and optional port).
    fn tenant_of(&self, host: Option<&str>) -> Result<usize, InvalidHost> {
        let Some(host) = host else {
            return Ok(0);
        };
        let host = normalize_host(host).ok_or(InvalidHost)?;
        if let Some(&i) = self.exact.get(&host) {
            return Ok(i);
        }
        Ok(match host.split_once('.') {
            Some((label, parent)) if !label.is_empty() => {
                self.wildcard.get(parent).copied().unwrap_or(0)
            }
            _ => 0,
        })
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

/// A request's host is not a host name or address with an optional port
/// (RFC 9110 section 7.2; RFC 3986 section 3.2.2): no user info, no
/// whitespace, no empty labels, a port of digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidHost;

/// A `Host` value as tenants' host names are written: without the port,
/// lower-case, without one trailing dot; `None` if it is malformed.
fn normalize_host(host: &str) -> Option<String> {
    let (name, port) = if host.starts_with('[') {
        // An IPv6 literal: up to its closing bracket.
        let end = host.find(']')?;
        let literal = &host[..=end];
        let ok = literal[1..end]
            .chars()
            .all(|c| c.is_ascii_hexdigit() || matches!(c, ':' | '.'));
        if !ok || end < 2 {
            return None;
        }
        let rest = &host[end + 1..];
        if !rest.is_empty() && !rest.starts_with(':') {
            return None;
        }
        (literal, rest.strip_prefix(':'))
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (host, None),
        }
    };
    if let Some(port) = port {
        if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
    }
    if name.starts_with('[') {
        return Some(name.to_ascii_lowercase());
    }
    let name = name.strip_suffix('.').unwrap_or(name);
    let valid = !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
        });
    valid.then(|| name.to_ascii_lowercase())
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

#[cfg(test)]
mod tests {
    use super::normalize_host;

    #[test]
    fn host_headers_lose_their_port_case_and_trailing_dot() {
        let n = |h: &str| normalize_host(h);
        assert_eq!(
            n("Chat.Example.COM:8080").as_deref(),
            Some("chat.example.com")
        );
        assert_eq!(n("example.org.").as_deref(), Some("example.org"));
        assert_eq!(n("[::1]:8080").as_deref(), Some("[::1]"));
        assert_eq!(n("[::1]").as_deref(), Some("[::1]"));
        assert_eq!(n("127.0.0.1").as_deref(), Some("127.0.0.1"));
    }

    #[test]
    fn malformed_hosts_are_refused() {
        for bad in [
            "user@chat.acme.com",
            "chat.acme.com:abc",
            "chat.acme.com:",
            "chat.acme.com..",
            "a..b",
            "chat.acme.com\tx",
            "",
            ":80",
            "[::1",
            "[zz]",
            "[::1]x",
            "a.com:123456",
        ] {
            assert_eq!(normalize_host(bad), None, "{bad:?}");
        }
    }
}
