//! A route as it runs: its settings, its plugin and its hub, plus the
//! connection counting that enforces `max_connections`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::config::{Deliver, Limits, RouteSettings};
use crate::hub::Hub;
use crate::plugin::Plugin;

/// One routed path.
#[derive(Debug)]
pub struct Route {
    /// The request path.
    pub path: String,
    /// The plugin new connections get.
    pub plugin: Arc<Plugin>,
    /// Connections, rooms and metadata of this route.
    pub hub: Hub,
    /// The `[route.config]` values.
    pub config: BTreeMap<String, String>,
    /// Connection limits.
    pub limits: Limits,
    /// Allowed `Origin` values (`None`: any).
    pub allowed_origins: Option<Vec<String>>,
    /// Subprotocols the route offers its plugin (`None`: whatever the client offers).
    pub subprotocols: Option<Vec<String>>,
    /// Most open connections on this route.
    pub max_connections: Option<usize>,
    /// Whole messages or fragments.
    pub deliver: Deliver,
    active: AtomicUsize,
}

impl Route {
    /// A route from its settings and loaded plugin.
    pub fn new(settings: &RouteSettings, plugin: Plugin) -> Self {
        Route {
            path: settings.path.clone(),
            plugin: Arc::new(plugin),
            hub: Hub::default(),
            config: settings.config.clone(),
            limits: settings.limits.clone(),
            allowed_origins: settings.allowed_origins.clone(),
            subprotocols: settings.subprotocols.clone(),
            max_connections: settings.max_connections,
            deliver: settings.deliver,
            active: AtomicUsize::new(0),
        }
    }

    /// Open connections (and upgrades in progress) on this route.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }
}

/// Counts one connection against its route's and the server's caps for as
/// long as it lives.
#[derive(Debug)]
pub struct Slot {
    route: Arc<Route>,
    server: Arc<AtomicUsize>,
}

impl Slot {
    /// Takes a slot, or `None` if the route or the server is full.
    pub fn acquire(
        route: &Arc<Route>,
        server: &Arc<AtomicUsize>,
        server_max: usize,
    ) -> Option<Slot> {
        if !take(server, server_max) {
            return None;
        }
        if !take(&route.active, route.max_connections.unwrap_or(usize::MAX)) {
            server.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Slot {
            route: route.clone(),
            server: server.clone(),
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
        self.server.fetch_sub(1, Ordering::AcqRel);
    }
}
