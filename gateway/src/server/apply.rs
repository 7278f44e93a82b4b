//! Applying a reload to the running gateway: a new plugin file for the
//! routes that serve it, or a whole new config.
//!
//! Nothing half-applies. Every plugin a change needs is compiled first, off
//! the async runtime's threads; only when all of them loaded is anything
//! swapped, each route's version in one atomic store and the routing table
//! in another. A plugin that fails to load leaves its route's current
//! version serving, and the error names the route, the file and the reason.
//! Connections keep the version they opened with (`on_reload = "keep"`).

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::Gateway;
use crate::config::{Config, PluginSource, RouteSettings, SandboxSettings, ServerSettings};
use crate::error::{Error, Errors};
use crate::file::ContentHash;
use crate::hub::ClosedBy;
use crate::plugin::cache::Origin;
use crate::plugin::engine::read_source;
use crate::plugin::Plugin;
use crate::routing::route::{Route, RouteVersion};
use crate::routing::router::Table;
use crate::routing::tenant;

/// Logs what a route now serves:
/// `route /chat: now serving plugins/chat.wasm sha256:3f2a9c0b1d2e (version 4, compiled in 35 ms)`.
pub(super) fn log_serving(route: &Route, version: &RouteVersion) {
    let plugin = &version.plugin;
    let how = match plugin.origin {
        Origin::Compiled => "compiled",
        Origin::Cached => "from cache",
    };
    tracing::info!(
        "route {}: now serving {} {} (version {}, {how} in {} ms)",
        route.label,
        plugin.name,
        plugin.hash,
        version.version,
        plugin.load_time.as_millis()
    );
}

/// What a route's plugin will be after a config reload.
enum Next {
    /// The same bytes as now: keep the compiled plugin.
    Same(Arc<Plugin>),
    /// Newly loaded.
    New(Arc<Plugin>),
}

impl Gateway {
    /// A plugin file changed on disk: every route serving it loads the new
    /// bytes and, if they load, serves them to new connections. `content` is
    /// the file's bytes and hash, or why it could not be read (deleted).
    pub async fn apply_plugin_change(
        &self,
        path: &Path,
        content: Result<(Vec<u8>, ContentHash), String>,
    ) {
        let table = self.shared.router.load();
        let serving: Vec<Arc<Route>> = table
            .routes()
            .iter()
            .filter(|r| matches!(&r.current().plugin.source, PluginSource::File(p) if p == path))
            .cloned()
            .collect();
        if serving.is_empty() {
            return;
        }
        let (bytes, hash) = match content {
            Ok(c) => c,
            Err(reason) => {
                for route in &serving {
                    keeps_serving(route, &format!("plugin {}: {reason}", path.display()));
                }
                return;
            }
        };
        let serving: Vec<Arc<Route>> = serving
            .into_iter()
            .filter(|r| r.current().plugin.hash != hash)
            .collect();
        let Some(first) = serving.first() else {
            return;
        };
        // Compiled once, whichever number of routes serve the file.
        let runtime = self.shared.runtime.clone();
        let (route_path, source) = (first.label.clone(), first.current().plugin.source.clone());
        let loaded =
            tokio::task::spawn_blocking(move || runtime.load_bytes(&route_path, &source, &bytes))
                .await;
        let plugin = match loaded {
            Ok(Ok(plugin)) => Arc::new(plugin),
            Ok(Err(e)) => {
                let reason = plugin_reason(&e);
                serving.iter().for_each(|r| keeps_serving(r, &reason));
                return;
            }
            Err(e) => {
                let reason = format!("loading failed: {e}");
                serving.iter().for_each(|r| keeps_serving(r, &reason));
                return;
            }
        };
        for route in &serving {
            let now = route.current();
            let v = route.install(now.settings.clone(), plugin.clone(), now.tenant.clone());
            crate::metrics::Metrics::global().reloaded("plugin", true);
            log_serving(route, &v);
        }
    }

    /// Applies a new config: routes added start serving, routes removed
    /// close their connections with 1001 (their `on-close` runs), changed
    /// settings and plugins apply to new connections. Every plugin is loaded
    /// (or kept, when its bytes did not change) before anything is applied;
    /// on any error nothing is, and the errors are returned.
    pub async fn apply_config(&self, config: Config) -> Result<(), Errors> {
        warn_restart_only(
            &self.shared.settings,
            self.shared.listen_overridden.load(Ordering::SeqCst),
            self.shared.runtime.sandbox(),
            self.shared.admin_listen.as_ref(),
            self.shared.cluster.as_ref(),
            &config,
        );
        let mut errors = config.grant_errors();
        // New certificates are loaded (and checked) now, installed with the
        // routes below: a bad certificate file fails the whole reload.
        let certificates = match &self.shared.tls {
            Some(tls) => match tls.prepare(&config) {
                Ok(prepared) => Some(prepared),
                Err(e) => {
                    errors.extend(e);
                    None
                }
            },
            None => None,
        };
        if !errors.is_empty() {
            return Err(Errors(errors));
        }
        let table = self.shared.router.load();
        let runtime = self.shared.runtime.clone();
        let current: Vec<Option<Arc<RouteVersion>>> = config
            .routes
            .iter()
            .map(|r| {
                table
                    .get(r.tenant.as_deref(), &r.path)
                    .map(|route| route.current())
            })
            .collect();
        let config = Arc::new(config);
        let plan = {
            let config = config.clone();
            tokio::task::spawn_blocking(move || load_all(&runtime, &config, &current))
        }
        .await
        .map_err(|e| Errors(vec![Error::Engine(format!("loading failed: {e}"))]))??;

        let tenants = tenant::tenants_of(&config, Some(&table));
        let mut routes = Vec::with_capacity(config.routes.len());
        for (settings, next) in config.routes.iter().zip(plan) {
            let t = tenant::find(&tenants, settings.tenant.as_deref());
            let route = match (table.get(settings.tenant.as_deref(), &settings.path), next) {
                (Some(route), Next::Same(plugin)) => {
                    let now = route.current();
                    if !same_settings(&now.settings, settings)
                        || now.tenant.quotas != t.quotas
                        || !Arc::ptr_eq(&now.tenant.meters, &t.meters)
                    {
                        let v = route.install(settings.clone(), plugin, t);
                        tracing::info!(
                            "route {}: new settings apply to new connections (version {})",
                            route.label,
                            v.version
                        );
                    }
                    route.clone()
                }
                (Some(route), Next::New(plugin)) => {
                    let v = route.install(settings.clone(), plugin, t);
                    log_serving(route, &v);
                    route.clone()
                }
                (None, Next::Same(plugin) | Next::New(plugin)) => {
                    let route = Arc::new(Route::new(settings.clone(), plugin, t));
                    log_serving(&route, &route.current());
                    route
                }
            };
            routes.push(route);
        }
        self.shared
            .router
            .store(Table::new(routes, tenants).with_statics(&config.statics));
        if let (Some(tls), Some(prepared)) = (&self.shared.tls, certificates) {
            tls.install(prepared);
        }
        for gone in table.routes().iter().filter(|r| {
            config
                .routes
                .iter()
                .all(|s| s.path != r.path || s.tenant.as_deref() != r.tenant.as_deref())
        }) {
            let open = gone.hub.len();
            tracing::info!(route = %gone.label, open, "route removed: closing its connections with 1001");
            for conn in gone.hub.all() {
                conn.request_close(1001, "route removed", ClosedBy::Gateway);
            }
        }
        *self.shared.config.lock() = config;
        Ok(())
    }
}

/// Loads every route's plugin of `config`, reusing a route's current plugin
/// when its bytes are unchanged; every error, or the plan.
fn load_all(
    runtime: &crate::plugin::Runtime,
    config: &Config,
    current: &[Option<Arc<RouteVersion>>],
) -> Result<Vec<Next>, Errors> {
    let mut plan = Vec::new();
    let mut errors = Vec::new();
    let mut loaded: Vec<Arc<Plugin>> = Vec::new();
    for (settings, now) in config.routes.iter().zip(current) {
        let located = |e: Error| e.located(&config.file, settings.line);
        let bytes = match read_source(&settings.plugin) {
            Ok(b) => b,
            Err(reason) => {
                errors.push(located(Error::Plugin {
                    route: settings.path.clone(),
                    file: settings.plugin.to_string(),
                    reason,
                }));
                continue;
            }
        };
        let hash = ContentHash::of(&bytes);
        if let Some(now) = now {
            if now.plugin.source == settings.plugin && now.plugin.hash == hash {
                plan.push(Next::Same(now.plugin.clone()));
                continue;
            }
        }
        // A file two routes share is compiled once.
        if let Some(p) = loaded
            .iter()
            .find(|p| p.source == settings.plugin && p.hash == hash)
        {
            plan.push(Next::New(p.clone()));
            continue;
        }
        match runtime.load_bytes(&settings.label(), &settings.plugin, &bytes) {
            Ok(p) => {
                let p = Arc::new(p);
                loaded.push(p.clone());
                plan.push(Next::New(p));
            }
            Err(e) => errors.push(located(e)),
        }
    }
    if errors.is_empty() {
        Ok(plan)
    } else {
        Err(Errors(errors))
    }
}

/// Whether two route settings are the same but for where they are written.
fn same_settings(a: &RouteSettings, b: &RouteSettings) -> bool {
    let mut b = b.clone();
    b.line = a.line;
    *a == b
}

/// Logs that `route` keeps its current version because of `reason`.
fn keeps_serving(route: &Route, reason: &str) {
    crate::metrics::Metrics::global()
        .reload_failed("plugin", format!("route {}: {reason}", route.label));
    let v = route.current();
    tracing::error!(
        "route {}: {reason}; keeps serving {} {} (version {})",
        route.label,
        v.plugin.name,
        v.plugin.hash,
        v.version
    );
}

/// The reason part of a plugin load error (the route is named by the caller).
fn plugin_reason(e: &Error) -> String {
    match e {
        Error::Plugin { file, reason, .. } => format!("plugin {file}: {reason}"),
        other => other.to_string(),
    }
}

/// Logs the changes a reload cannot apply without a restart: `new` against
/// the settings the gateway runs with (not the last file: reverting a change
/// warns nothing). `listen` is not compared when `--listen` chose the
/// address.
fn warn_restart_only(
    server: &ServerSettings,
    listen_overridden: bool,
    sandbox: &SandboxSettings,
    admin: Option<&crate::config::ListenAddr>,
    cluster: Option<&crate::config::ClusterSettings>,
    new: &Config,
) {
    // What a node joins with (its place in the file aside).
    type ClusterKey<'a> = (
        &'a str,
        Option<&'a str>,
        &'a str,
        std::time::Duration,
        std::time::Duration,
    );
    fn cluster_key(c: Option<&crate::config::ClusterSettings>) -> Option<ClusterKey<'_>> {
        c.map(|c| {
            (
                c.redis.as_str(),
                c.node_id.as_deref(),
                c.namespace.as_str(),
                c.heartbeat,
                c.node_timeout,
            )
        })
    }
    let (o, n) = (server, &new.server);
    let changed = [
        (
            admin != new.admin.as_ref().map(|a| &a.listen),
            "[admin] listen",
        ),
        (
            cluster_key(cluster) != cluster_key(new.cluster.as_ref()),
            "[cluster]",
        ),
        (
            !listen_overridden && o.listen != n.listen,
            "[server] listen",
        ),
        (o.max_connections != n.max_connections, "max_connections"),
        (o.threads != n.threads, "threads"),
        (o.tls.is_some() != n.tls.is_some(), "tls (on or off)"),
        (
            o.handshake_timeout != n.handshake_timeout,
            "handshake_timeout",
        ),
        (o.max_header_size != n.max_header_size, "max_header_size"),
        (o.drain_timeout != n.drain_timeout, "drain_timeout"),
        (
            sandbox.max_memory != new.sandbox.max_memory,
            "[sandbox] max_memory",
        ),
        (
            sandbox.max_call_time != new.sandbox.max_call_time,
            "[sandbox] max_call_time",
        ),
    ];
    let keys: Vec<&str> = changed.iter().filter(|c| c.0).map(|c| c.1).collect();
    if !keys.is_empty() {
        tracing::warn!(
            "config reload: {} changed; these take effect at the next restart (the rest is applied now)",
            keys.join(", ")
        );
    }
}
