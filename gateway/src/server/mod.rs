//! The server: loads every route's plugin, accepts TCP connections (and
//! terminates TLS on them when `[server] tls` is set, see [`crate::tls`]),
//! serves HTTP/1.1 with hyper, hands requests to [`upgrade`] (which sends
//! plain ones to [`static_files`]), runs the [`admin`] listener, applies
//! reloads (a new config or a new plugin file, as the reload module asks),
//! and shuts down gracefully (stop accepting, 1001 to every connection,
//! wait up to `drain_timeout` for the close handshakes).

mod admin;
mod apply;
mod static_files;
mod upgrade;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ServerSettings};
use crate::error::{Error, Errors};
use crate::hub::ClosedBy;
use crate::plugin::Runtime;
use crate::routing::route::Route;
use crate::routing::router::{Router, Table};
use crate::routing::tenant;
use crate::tls::Tls;

/// A configured gateway: every plugin loaded, not yet listening. Cheap to
/// clone: clones share the same routes and connections.
#[derive(Debug, Clone)]
pub struct Gateway {
    shared: Arc<Shared>,
}

/// The routes as the cluster's link sees them.
struct ClusterRoutes(Arc<Shared>);

impl crate::cluster::Routes for ClusterRoutes {
    fn hub(&self, route: &crate::cluster::wire::RouteName) -> Option<Arc<crate::hub::Hub>> {
        self.0
            .router
            .load()
            .get(route.tenant.as_deref(), &route.path)
            .map(|r| r.hub.clone())
    }

    fn hubs(&self) -> Vec<Arc<crate::hub::Hub>> {
        let table = self.0.router.load();
        table.routes().iter().map(|r| r.hub.clone()).collect()
    }
}

#[derive(Debug)]
struct Shared {
    /// `[server]` as loaded at start: a reload that changes it is logged as
    /// needing a restart.
    settings: ServerSettings,
    /// `serve --listen` chose the address: the file's `listen` is not used,
    /// so a reload that changes it needs no restart and warns nothing.
    listen_overridden: AtomicBool,
    router: Router,
    runtime: Arc<Runtime>,
    /// TLS on the listener, as set at start (`None`: plain TCP).
    tls: Option<Tls>,
    /// `[admin] listen` as set at start.
    admin_listen: Option<crate::config::ListenAddr>,
    /// `[cluster]` as set at start.
    cluster: Option<crate::config::ClusterSettings>,
    /// The config now applied.
    config: Mutex<Arc<Config>>,
    active: Arc<AtomicUsize>,
    next_id: AtomicU64,
    shutting_down: AtomicBool,
    /// Cancelled when shutdown begins: HTTP connections that are not
    /// WebSockets end.
    stopping: CancellationToken,
    tasks: TaskTracker,
}

impl Gateway {
    /// Creates the engine and loads every route's plugin, collecting every
    /// error rather than stopping at the first. Compiled plugins are cached
    /// in `cache_dir` (`None`: no cache).
    pub fn new(config: &Config, cache_dir: Option<PathBuf>) -> Result<Gateway, Errors> {
        let runtime = Runtime::new(&config.sandbox, config.server.max_connections, cache_dir)?;
        let mut routes = Vec::new();
        let mut errors = config.grant_errors();
        let tls = Tls::new(config).unwrap_or_else(|e| {
            errors.extend(e);
            None
        });
        let tenants = tenant::tenants_of(config, None);
        // A file many routes (or tenants) serve is compiled and held once.
        let mut loaded: Vec<Arc<crate::plugin::Plugin>> = Vec::new();
        for r in &config.routes {
            let plugin = crate::plugin::engine::read_source(&r.plugin)
                .map_err(|reason| Error::Plugin {
                    route: r.label(),
                    file: r.plugin.to_string(),
                    reason,
                })
                .and_then(|bytes| {
                    let hash = crate::file::ContentHash::of(&bytes);
                    match loaded
                        .iter()
                        .find(|p| p.source == r.plugin && p.hash == hash)
                    {
                        Some(p) => Ok(p.clone()),
                        None => {
                            let p = Arc::new(runtime.load_bytes(&r.label(), &r.plugin, &bytes)?);
                            loaded.push(p.clone());
                            Ok(p)
                        }
                    }
                });
            match plugin {
                Ok(plugin) => {
                    let t = tenant::find(&tenants, r.tenant.as_deref());
                    routes.push(Arc::new(Route::new(r.clone(), plugin, t)));
                }
                // A plugin error points at the route's `plugin` key.
                Err(e) => errors.push(e.located(&config.file, r.line)),
            }
        }
        if !errors.is_empty() {
            return Err(Errors(errors));
        }
        Ok(Gateway {
            shared: Arc::new(Shared {
                settings: config.server.clone(),
                listen_overridden: AtomicBool::new(false),
                router: Router::new(Table::new(routes, tenants).with_statics(&config.statics)),
                runtime,
                tls,
                admin_listen: config.admin.as_ref().map(|a| a.listen.clone()),
                cluster: config.cluster.clone(),
                config: Mutex::new(Arc::new(config.clone())),
                active: Arc::new(AtomicUsize::new(0)),
                // In a cluster, ids carry the node's number in their high
                // bits (see crate::cluster::NODE_SHIFT).
                next_id: AtomicU64::new(
                    crate::cluster::Cluster::global().map_or(0, |c| c.id_base()) + 1,
                ),
                shutting_down: AtomicBool::new(false),
                stopping: CancellationToken::new(),
                tasks: TaskTracker::new(),
            }),
        })
    }

    /// Binds the listener (`[server] listen`, or `addr` when given, as
    /// `--listen`), resolving a host name first and trying each of its
    /// addresses in turn.
    pub async fn bind(
        &self,
        addr: Option<crate::config::ListenAddr>,
    ) -> Result<TcpListener, Error> {
        let settings = &self.shared.settings;
        let (listen, origin) = match addr {
            Some(addr) => {
                self.shared.listen_overridden.store(true, Ordering::SeqCst);
                (addr, "--listen".to_owned())
            }
            None => (settings.listen.clone(), settings.listen_origin.clone()),
        };
        bind_listen(&listen, &origin).await
    }

    /// Binds the `[admin]` listener, if the config has one.
    pub async fn bind_admin(&self) -> Result<Option<TcpListener>, Error> {
        match &self.config().admin {
            Some(admin) => bind_listen(&admin.listen, &admin.listen_origin)
                .await
                .map(Some),
            None => Ok(None),
        }
    }

    /// The routes served now, in config order.
    pub fn routes(&self) -> Vec<Arc<Route>> {
        self.shared.router.load().routes().to_vec()
    }

    /// Serves the admin endpoints (`/metrics`, `/healthz`, `/readyz`) on
    /// `listener` from now until the process exits.
    pub fn spawn_admin(&self, listener: TcpListener) {
        tokio::spawn(admin::serve(self.shared.clone(), listener));
    }

    /// Starts the cluster's link tasks, delivering to this gateway's
    /// routes (`[cluster]`; call after [`crate::cluster::Cluster::start`]).
    pub fn attach_cluster(&self, cluster: &Arc<crate::cluster::Cluster>) {
        // Before the first connection is accepted: ids carry the node's
        // number, and every membership reaches the cluster.
        self.shared
            .next_id
            .store(cluster.id_base() + 1, Ordering::SeqCst);
        for route in self.shared.router.load().routes() {
            route.hub.link_cluster(cluster);
        }
        cluster.attach(Arc::new(ClusterRoutes(self.shared.clone())));
    }

    /// Whether the listener speaks TLS (`wss://`).
    pub fn is_tls(&self) -> bool {
        self.shared.tls.is_some()
    }

    /// The TLS certificate and key files served now (none without TLS).
    pub fn tls_files(&self) -> Vec<PathBuf> {
        self.shared.tls.as_ref().map_or_else(Vec::new, Tls::files)
    }

    /// Reads the TLS certificate and key files again (one of them changed
    /// on disk): see [`Tls::reload_files`].
    pub fn reload_tls_files(&self) {
        if let Some(tls) = &self.shared.tls {
            tls.reload_files(&self.config());
        }
    }

    /// The config now applied.
    pub fn config(&self) -> Arc<Config> {
        self.shared.config.lock().clone()
    }

    /// Logs, for every route, the plugin it serves (file, content hash,
    /// version, and whether it was compiled or mapped from the cache).
    pub fn log_routes(&self) {
        for route in self.shared.router.load().routes() {
            apply::log_serving(route, &route.current());
        }
    }

    /// Serves `listener` until `shutdown` resolves, then drains: every
    /// connection is closed with 1001 and its plugin's `on-close` runs.
    /// Returns once every connection has ended or `drain_timeout` passed
    /// (false if connections were still open then).
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()>) -> bool {
        let shared = self.shared;
        check_map_count(shared.settings.max_connections);
        let files = plugin_files(
            shared.router.load().routes(),
            shared.settings.max_connections,
        );
        check_open_files(shared.settings.max_connections, files);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, remote)) => {
                        let _ = stream.set_nodelay(true);
                        let shared2 = shared.clone();
                        match &shared.tls {
                            None => {
                                let timeout = shared.settings.handshake_timeout;
                                shared.tasks.spawn(serve_connection(shared2, stream, remote, None, timeout))
                            }
                            Some(tls) => shared.tasks.spawn(serve_tls(shared2, tls.clone(), stream, remote)),
                        };
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off a
                        // little rather than spin.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                },
                _ = &mut shutdown => break,
            }
        }
        drop(listener);
        shared.shutting_down.store(true, Ordering::SeqCst);
        shared.stopping.cancel();
        let table = shared.router.load();
        let open: usize = table.routes().iter().map(|r| r.hub.len()).sum();
        tracing::info!(open, "shutting down: closing every connection with 1001");
        for route in table.routes() {
            for conn in route.hub.all() {
                conn.request_close(1001, "going away", ClosedBy::Gateway);
            }
        }
        shared.tasks.close();
        let drained = tokio::time::timeout(shared.settings.drain_timeout, shared.tasks.wait())
            .await
            .is_ok();
        if !drained {
            let left: usize = table.routes().iter().map(|r| r.hub.len()).sum();
            tracing::warn!(left, "drain_timeout passed with connections still open");
        }
        drained
    }
}

/// Binds `listen` (set at `origin`, for errors), resolving a host name
/// first and trying each of its addresses in turn.
async fn bind_listen(
    listen: &crate::config::ListenAddr,
    origin: &str,
) -> Result<TcpListener, Error> {
    let unresolved = |reason: String| Error::Resolve {
        origin: origin.to_owned(),
        host: listen.host().to_owned(),
        reason,
    };
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((listen.host(), listen.port()))
        .await
        .map_err(|e| unresolved(e.to_string()))?
        .collect();
    let mut failed = None;
    for addr in addrs {
        match TcpListener::bind(addr).await {
            Ok(listener) => return Ok(listener),
            Err(source) => {
                failed = Some(Error::Bind {
                    origin: origin.to_owned(),
                    addr,
                    source,
                })
            }
        }
    }
    Err(failed.unwrap_or_else(|| unresolved("it has no addresses".to_owned())))
}

/// Memory maps one live plugin instance adds, measured: 1,000 open
/// connections on the echo plugin took the gateway from 2,081 to 6,085 maps
/// (its memory and tables each get their own protection inside the pool).
const MAPS_PER_INSTANCE: usize = 4;
/// Maps kept free for everything else (thread stacks, libraries, code).
const MAPS_HEADROOM: usize = 2048;

/// Warns, once at start, when the kernel's `vm.max_map_count` cannot hold
/// `max_connections` plugin instances next to the maps the process has
/// already: upgrades past what fits would be answered 503. Says how many
/// connections fit and how to raise the limit.
fn check_map_count(max_connections: usize) {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let Some(limit) =
        read("/proc/sys/vm/max_map_count").and_then(|s| s.trim().parse::<usize>().ok())
    else {
        return;
    };
    let used = read("/proc/self/maps").map_or(0, |m| m.lines().count());
    let fits = limit.saturating_sub(used + MAPS_HEADROOM) / MAPS_PER_INSTANCE;
    if max_connections > fits {
        let needed = used + MAPS_HEADROOM + max_connections.saturating_mul(MAPS_PER_INSTANCE);
        tracing::warn!(
            "vm.max_map_count is {limit}: about {fits} connections fit (each plugin instance takes \
             about {MAPS_PER_INSTANCE} memory maps), but max_connections is {max_connections}; \
             upgrades past about {fits} open connections will get 503. Raise it with \
             `sysctl -w vm.max_map_count={}` or lower max_connections",
            needed.max(262_144).next_power_of_two()
        );
    }
}

/// Descriptors kept free for everything but client sockets (the listeners,
/// watched files, plugin files and directories, Redis, logs).
const FILES_HEADROOM: u64 = 256;

/// The most files the plugins of `routes` may hold open at once. Per
/// route that grants `dirs`, with as many instances as it may have (one
/// if shared; else the least of its, its tenant's and the server's
/// `max_connections` and its tenant's `max_instances`): each instance's
/// granted directories, and the files it opens, at most
/// [`MAX_OPEN_FILES`](crate::plugin::filesystem::MAX_OPEN_FILES) an
/// instance and the route's `max_open_files`; per tenant, no more opened
/// files than its `max_open_files`; in all, no more than the server's
/// `max_connections` instances.
fn plugin_files(routes: &[Arc<Route>], max_connections: usize) -> u64 {
    use crate::plugin::filesystem::MAX_OPEN_FILES;
    let versions: Vec<_> = routes.iter().map(|r| r.current()).collect();
    // (tenant name, its max_open_files, files its routes may open)
    let mut tenants: Vec<(&str, Option<usize>, u64)> = Vec::new();
    let mut granted: u64 = 0;
    let mut most_dirs: usize = 0;
    for version in versions.iter().filter(|v| !v.settings.dirs.is_empty()) {
        let (settings, tenant) = (&version.settings, &version.tenant);
        let instances = if settings.isolation == crate::config::Isolation::Shared {
            1
        } else {
            [
                settings.max_connections,
                tenant.quotas.max_connections,
                tenant.quotas.max_instances,
            ]
            .into_iter()
            .flatten()
            .fold(max_connections, usize::min)
        };
        let dirs = settings.dirs.len();
        most_dirs = most_dirs.max(dirs);
        granted = granted.saturating_add((instances as u64).saturating_mul(dirs as u64));
        let per_instance = instances.saturating_mul(MAX_OPEN_FILES);
        let opened = settings
            .max_open_files
            .map_or(per_instance, |m| m.min(per_instance)) as u64;
        match tenants.iter_mut().find(|t| t.0 == &*tenant.name) {
            Some(t) => t.2 = t.2.saturating_add(opened),
            None => tenants.push((&tenant.name, tenant.quotas.max_open_files, opened)),
        }
    }
    let opened = tenants
        .iter()
        .map(|&(_, max, routes)| max.map_or(routes, |m| routes.min(m as u64)))
        .fold(0, u64::saturating_add);
    let ceiling = (max_connections as u64).saturating_mul((MAX_OPEN_FILES + most_dirs) as u64);
    opened.saturating_add(granted).min(ceiling)
}

/// Raises the soft open-file limit (`RLIMIT_NOFILE`) to the hard one, as
/// servers do (the soft default, often 1,024, would refuse connections long
/// before `max_connections`), and warns, once at start, when even the hard
/// limit cannot hold `max_connections` sockets and the `files` plugins may
/// hold open ([`plugin_files`]): accepts past it fail and are retried until
/// a connection closes, and plugins' opens fail. Says how many fit and how
/// to raise it.
fn check_open_files(max_connections: usize, files: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    let limit: u64 = lim.rlim_cur;
    let fits = limit.saturating_sub(FILES_HEADROOM);
    let needed = (max_connections as u64).saturating_add(files);
    if needed <= fits {
        return;
    }
    let raise = "Raise the hard limit (LimitNOFILE= in a systemd unit, `ulimit -Hn` as root, \
                 nofile in /etc/security/limits.conf)";
    if files == 0 {
        tracing::warn!(
            "the open-file limit (RLIMIT_NOFILE) is {limit}: about {fits} connections fit, but \
             max_connections is {max_connections}; accepts past that wait until a connection \
             closes. {raise} to {} or lower max_connections",
            needed.saturating_add(FILES_HEADROOM)
        );
    } else {
        tracing::warn!(
            "the open-file limit (RLIMIT_NOFILE) is {limit}: about {fits} descriptors are left \
             for connections and plugins' files, but max_connections is {max_connections} and \
             the plugins of routes granting `dirs` may hold {files} files open (their granted \
             directories, and 64 per instance or the routes' and tenants' max_open_files); \
             past the limit accepts wait and opens fail. {raise} to {}, lower max_connections or set max_open_files",
            needed.saturating_add(FILES_HEADROOM)
        );
    }
}

/// How long, at shutdown, a request still arriving on a connection that is
/// not a WebSocket may take before the connection is dropped.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// The body of the answer to a client that speaks plain HTTP to the TLS
/// listener, as most servers give it (the first byte of a TLS connection is
/// 0x16, a handshake record, RFC 8446 section 5.1; a request line starts
/// with a letter).
const PLAIN_HTTP_ON_TLS: &str = "this port speaks TLS: connect with wss:// (or https://)\n";

/// Terminates TLS on `stream`, within the handshake timeout and not past
/// shutdown, then serves HTTP on it. A client that sends plain HTTP gets a
/// 400 that says so; any other failure ends the connection, logged at debug
/// level.
async fn serve_tls(shared: Arc<Shared>, tls: Tls, stream: TcpStream, remote: SocketAddr) {
    let timeout = shared.settings.handshake_timeout;
    let started = std::time::Instant::now();
    let handshake = async {
        let mut first = [0u8; 1];
        match stream.peek(&mut first).await {
            Ok(1) if first[0].is_ascii_alphabetic() => {
                let mut stream = stream;
                let answer = format!(
                    "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\
                     connection: close\r\n\r\n{PLAIN_HTTP_ON_TLS}",
                    PLAIN_HTTP_ON_TLS.len()
                );
                let _ = tokio::io::AsyncWriteExt::write_all(&mut stream, answer.as_bytes()).await;
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut stream).await;
                // Read what the client still sends (its request) for a
                // moment before closing: closing with unread bytes resets
                // the connection, and the client could lose the answer.
                let mut sink = [0u8; 4096];
                let drain = async {
                    let mut left = 64usize << 10;
                    while left > 0 {
                        match tokio::io::AsyncReadExt::read(&mut stream, &mut sink).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => left = left.saturating_sub(n),
                        }
                    }
                };
                let _ = tokio::time::timeout(std::time::Duration::from_secs(1), drain).await;
                tracing::debug!(%remote, "plain HTTP on the TLS listener: answered 400");
                return None;
            }
            Ok(1) => {}
            _ => return None,
        }
        match tls.acceptor().accept(stream).await {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::debug!(%remote, "TLS handshake failed: {e}");
                None
            }
        }
    };
    let stream = tokio::select! {
        r = tokio::time::timeout(timeout, handshake) => match r {
            Ok(Some(s)) => s,
            Ok(None) => return,
            Err(_) => {
                tracing::debug!(%remote, "TLS handshake not done within handshake_timeout");
                return;
            }
        },
        _ = shared.stopping.cancelled() => return,
    };
    let sni: Option<Arc<str>> = stream.get_ref().1.server_name().map(Arc::from);
    // One handshake_timeout for the TLS handshake and the upgrade request
    // together.
    let left = timeout.saturating_sub(started.elapsed());
    serve_connection(shared, stream, remote, sni, left).await;
}

/// Serves HTTP/1.1 on one connection (plain TCP, or TLS with the name the
/// client's SNI gave) until it ends, is upgraded, or shutdown ends it; each
/// request head must arrive within `header_timeout`.
async fn serve_connection<S>(
    shared: Arc<Shared>,
    stream: S,
    remote: SocketAddr,
    sni: Option<Arc<str>>,
    header_timeout: std::time::Duration,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(stream);
    let service = {
        let shared = shared.clone();
        service_fn(move |req| {
            let shared = shared.clone();
            let sni = sni.clone();
            async move { Ok::<_, Infallible>(upgrade::handle(shared, req, remote, sni).await) }
        })
    };
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout.max(std::time::Duration::from_millis(1)))
        .max_buf_size(shared.settings.max_header_size)
        .serve_connection(io, service)
        .with_upgrades();
    tokio::pin!(conn);
    // A connection that is not (yet) a WebSocket (idle keep-alive, a request
    // still arriving, nothing sent at all) must not hold up shutdown: on
    // shutdown hyper ends it once no request is in flight, and a request
    // head still arriving gets a moment, then the connection is dropped.
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = shared.stopping.cancelled() => {
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(SHUTDOWN_GRACE, conn).await {
                Ok(r) => r,
                Err(_) => return,
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(%remote, "HTTP connection ended: {e}");
    }
}
