//! A route as it runs: its path, its hub (connections, rooms, metadata),
//! its connection count, and its current [`RouteVersion`] (settings and
//! plugin), which a reload swaps atomically. A connection takes the version
//! current when it opens and keeps it (`on_reload = "keep"`), so an old
//! version's compiled code lives exactly as long as its last connection.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::{Isolation, RouteSettings};
use crate::hub::Hub;
use crate::plugin::filesystem::OpenFiles;
use crate::plugin::host::Scope;
use crate::plugin::shared::SharedInstance;
use crate::plugin::Plugin;
use crate::routing::tenant::{Counts, Tenant};

/// One version of a route: the settings and plugin that new connections
/// get from the moment it is installed.
#[derive(Debug)]
pub struct RouteVersion {
    /// Limits, origins, subprotocols, delivery mode and config values.
    pub settings: RouteSettings,
    /// The compiled plugin.
    pub plugin: Arc<Plugin>,
    /// What the plugin's host calls see of the route.
    pub scope: Arc<Scope>,
    /// The instance all connections share, with `isolation = "shared"`.
    pub shared: Option<Arc<SharedInstance>>,
    /// 1 for the version loaded at start, then one more per plugin swap.
    pub version: u64,
    /// The route's tenant, with the quotas of this version's config.
    pub tenant: Arc<Tenant>,
}

/// One routed path.
#[derive(Debug)]
pub struct Route {
    /// The request path.
    pub path: String,
    /// The tenant whose route this is (`None`: the default tenant).
    pub tenant: Option<Arc<str>>,
    /// How logs name the route: its path, and its tenant if it has one
    /// (`/chat (tenant acme)`).
    pub label: String,
    /// Connections, rooms and metadata of this route; kept across versions.
    pub hub: Arc<Hub>,
    /// Files its instances hold open (against a route `max_open_files`);
    /// kept across versions.
    pub files: Arc<OpenFiles>,
    current: ArcSwap<RouteVersion>,
    last_version: AtomicU64,
    active: AtomicUsize,
    /// The route's metric handles (labels: tenant and path).
    pub metrics: crate::metrics::RouteMetrics,
}

impl Route {
    /// A route serving `plugin` with `settings` (version 1).
    pub fn new(settings: RouteSettings, plugin: Arc<Plugin>, tenant: Arc<Tenant>) -> Route {
        let path = settings.path.clone();
        let tenant_name = settings.tenant.as_deref().map(Arc::<str>::from);
        let label = match &tenant_name {
            Some(t) => format!("{path} (tenant {t})"),
            None => path.clone(),
        };
        let hub = Arc::new(Hub::for_route(tenant_name.as_deref(), &path));
        let metrics = crate::metrics::Metrics::global().route(tenant_name.as_deref(), &path);
        let files = Arc::new(OpenFiles::default());
        Route {
            current: ArcSwap::from_pointee(version(
                settings, plugin, tenant, &hub, &files, &metrics, 1,
            )),
            files,
            metrics,
            path,
            tenant: tenant_name,
            label,
            hub,
            last_version: AtomicU64::new(1),
            active: AtomicUsize::new(0),
        }
    }

    /// The version new connections get now.
    pub fn current(&self) -> Arc<RouteVersion> {
        self.current.load_full()
    }

    /// Installs new settings and plugin for new connections; returns the
    /// new version. Connections already open keep theirs.
    pub fn install(
        &self,
        settings: RouteSettings,
        plugin: Arc<Plugin>,
        tenant: Arc<Tenant>,
    ) -> Arc<RouteVersion> {
        // Stored before the number is published, so that a connection that
        // sees the new number finds the new version.
        let n = self.last_version.load(Ordering::Acquire) + 1;
        let v = Arc::new(version(
            settings,
            plugin,
            tenant,
            &self.hub,
            &self.files,
            &self.metrics,
            n,
        ));
        self.current.store(v.clone());
        self.last_version.store(n, Ordering::Release);
        v
    }

    /// The number of the newest version installed: one atomic load, cheap
    /// enough to check before every event.
    pub fn version_number(&self) -> u64 {
        self.last_version.load(Ordering::Acquire)
    }

    /// Open connections (and upgrades in progress) on this route.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }
}

fn version(
    settings: RouteSettings,
    plugin: Arc<Plugin>,
    tenant: Arc<Tenant>,
    hub: &Arc<Hub>,
    files: &Arc<OpenFiles>,
    metrics: &crate::metrics::RouteMetrics,
    n: u64,
) -> RouteVersion {
    let scope = Arc::new(Scope {
        route: Arc::from(settings.path.as_str()),
        plugin: Arc::from(plugin.name.as_str()),
        config: settings.config.clone(),
        tenant: tenant.clone(),
        version: n,
        limits: settings.limits.clone(),
        env: settings.env.clone(),
        dirs: settings.dirs.clone(),
        files: (files.clone(), settings.max_open_files),
        long_calls: Default::default(),
        metrics: Some(metrics.clone()),
    });
    let shared = (settings.isolation == Isolation::Shared).then(|| {
        Arc::new(SharedInstance::new(
            plugin.clone(),
            scope.clone(),
            hub.clone(),
        ))
    });
    RouteVersion {
        settings,
        plugin,
        scope,
        shared,
        version: n,
        tenant,
    }
}

/// Counts one connection against its route's and the server's caps for as
/// long as it lives.
#[derive(Debug)]
pub struct Slot {
    route: Arc<Route>,
    server: Arc<AtomicUsize>,
    tenant: Arc<Counts>,
}

/// Which cap refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capacity {
    /// `[server] max_connections`.
    Server,
    /// The route's `max_connections`.
    Route,
    /// The tenant's `max_connections`.
    Tenant,
}

impl Slot {
    /// Takes a slot, or says which cap is reached: the server's
    /// (`server_max`), the tenant's (in `version`) or the route's.
    pub fn acquire(
        route: &Arc<Route>,
        version: &RouteVersion,
        server: &Arc<AtomicUsize>,
        server_max: usize,
    ) -> Result<Slot, Capacity> {
        if !take(server, server_max) {
            return Err(Capacity::Server);
        }
        let tenant = &version.tenant;
        let tenant_max = tenant.quotas.max_connections.unwrap_or(usize::MAX);
        if !take(&tenant.counts.connections, tenant_max) {
            server.fetch_sub(1, Ordering::AcqRel);
            return Err(Capacity::Tenant);
        }
        let route_max = version.settings.max_connections.unwrap_or(usize::MAX);
        if !take(&route.active, route_max) {
            server.fetch_sub(1, Ordering::AcqRel);
            tenant.counts.connections.fetch_sub(1, Ordering::AcqRel);
            return Err(Capacity::Route);
        }
        route.metrics.open.inc();
        Ok(Slot {
            route: route.clone(),
            server: server.clone(),
            tenant: tenant.counts.clone(),
        })
    }
}

fn take(counter: &AtomicUsize, max: usize) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.route.active.fetch_sub(1, Ordering::AcqRel);
        self.route.metrics.open.dec();
        self.tenant.connections.fetch_sub(1, Ordering::AcqRel);
        self.server.fetch_sub(1, Ordering::AcqRel);
    }
}
