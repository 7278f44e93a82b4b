//! The server: loads every route's plugin, accepts TCP connections, serves
//! HTTP/1.1 with hyper, routes upgrade requests to their route's plugin, and
//! shuts down gracefully (stop accepting, 1001 to every connection, wait up
//! to `drain_timeout` for the close handshakes).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::TaskTracker;

use crate::config::{Config, ServerSettings};
use crate::error::{Error, Errors};
use crate::handshake::{self, Refusal};
use crate::hub::ClosedBy;
use crate::plugin::Runtime;
use crate::route::{Route, Slot};
use crate::session::{Opened, Session};

/// A configured gateway: every plugin loaded, not yet listening.
#[derive(Debug)]
pub struct Gateway {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    settings: ServerSettings,
    routes: HashMap<String, Arc<Route>>,
    runtime: Arc<Runtime>,
    active: Arc<AtomicUsize>,
    next_id: AtomicU64,
    shutting_down: AtomicBool,
    tasks: TaskTracker,
}

impl Gateway {
    /// Creates the engine and loads every route's plugin, collecting every
    /// error rather than stopping at the first.
    pub fn new(config: &Config) -> Result<Gateway, Errors> {
        let runtime = Runtime::new(&config.sandbox, config.server.max_connections)?;
        let mut routes = HashMap::new();
        let mut errors = Vec::new();
        for r in &config.routes {
            match runtime.load(&r.path, &r.plugin) {
                Ok(plugin) => {
                    routes.insert(r.path.clone(), Arc::new(Route::new(r, plugin)));
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
                routes,
                runtime,
                active: Arc::new(AtomicUsize::new(0)),
                next_id: AtomicU64::new(1),
                shutting_down: AtomicBool::new(false),
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
            Some(addr) => (addr, "--listen".to_owned()),
            None => (settings.listen.clone(), settings.listen_origin.clone()),
        };
        let unresolved = |reason: String| Error::Resolve {
            origin: origin.clone(),
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
                Err(source) => failed = Some(Error::Bind { addr, source }),
            }
        }
        Err(failed.unwrap_or_else(|| unresolved("it has no addresses".to_owned())))
    }

    /// The routes served, in no particular order.
    pub fn routes(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.shared.routes.values()
    }

    /// Serves `listener` until `shutdown` resolves, then drains: every
    /// connection is closed with 1001 and its plugin's `on-close` runs.
    /// Returns once every connection has ended or `drain_timeout` passed
    /// (false if connections were still open then).
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()>) -> bool {
        let shared = self.shared;
        check_map_count(shared.settings.max_connections);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, remote)) => {
                        let shared2 = shared.clone();
                        shared.tasks.spawn(serve_connection(shared2, stream, remote));
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
        let open: usize = shared.routes.values().map(|r| r.hub.len()).sum();
        tracing::info!(open, "shutting down: closing every connection with 1001");
        for route in shared.routes.values() {
            for conn in route.hub.all() {
                conn.request_close(1001, "going away", ClosedBy::Gateway);
            }
        }
        shared.tasks.close();
        let drained = tokio::time::timeout(shared.settings.drain_timeout, shared.tasks.wait())
            .await
            .is_ok();
        if !drained {
            let left: usize = shared.routes.values().map(|r| r.hub.len()).sum();
            tracing::warn!(left, "drain_timeout passed with connections still open");
        }
        drained
    }
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

async fn serve_connection(shared: Arc<Shared>, stream: TcpStream, remote: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(stream);
    let service = {
        let shared = shared.clone();
        service_fn(move |req| {
            let shared = shared.clone();
            async move { Ok::<_, Infallible>(handle(shared, req, remote).await) }
        })
    };
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(shared.settings.handshake_timeout)
        .max_buf_size(shared.settings.max_header_size)
        .serve_connection(io, service)
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!(%remote, "HTTP connection ended: {e}");
    }
}

/// Answers one HTTP request: a refusal, the plugin's rejection, or `101`
/// with the session spawned to run once the upgrade completes.
///
/// Once the plugin's `on-open` has accepted, the session owns the promise of
/// `on-close`: every path below that gives up on the connection (a bad
/// subprotocol or header from the plugin, a failed upgrade) drops the
/// session, which runs `on-close` with 1006.
async fn handle(
    shared: Arc<Shared>,
    mut req: Request<Incoming>,
    remote: SocketAddr,
) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let Some(route) = shared.routes.get(path).cloned() else {
        return refuse(Refusal::NotFound, remote, path);
    };
    if let Err(refusal) = handshake::validate(&req) {
        return refuse(refusal, remote, &route.path);
    }
    if !handshake::origin_allowed(&req, route.allowed_origins.as_deref()) {
        return refuse(Refusal::Forbidden, remote, &route.path);
    }
    if shared.shutting_down.load(Ordering::SeqCst) {
        return refuse(Refusal::ShuttingDown, remote, &route.path);
    }
    let Some(slot) = Slot::acquire(&route, &shared.active, shared.settings.max_connections) else {
        return refuse(Refusal::Unavailable, remote, &route.path);
    };
    let offered = handshake::offered_subprotocols(&req, route.subprotocols.as_deref());
    let request = handshake::plugin_request(&req, remote, offered);
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let internal =
        || handshake::text_response(StatusCode::INTERNAL_SERVER_ERROR, "plugin failed\n");
    let (session, accept) = match Session::open(
        id,
        route.clone(),
        shared.runtime.clone(),
        slot,
        &request,
    ) {
        Opened::Accept(session, accept) => (session, accept),
        Opened::Failed => {
            tracing::debug!(%remote, route = %route.path, conn = id, status = 500, "upgrade refused: on-open failed");
            return internal();
        }
        Opened::Unavailable => {
            return refuse(Refusal::NoInstance, remote, &route.path);
        }
        Opened::Reject(reject) => {
            let status = StatusCode::from_u16(reject.status)
                .ok()
                .filter(|s| s.is_client_error() || s.is_server_error())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            tracing::debug!(%remote, route = %route.path, conn = id, status = status.as_u16(), "upgrade refused by the plugin");
            let mut resp = Response::new(Full::new(Bytes::from(reject.body)));
            *resp.status_mut() = status;
            if let Err(why) = handshake::apply_headers(resp.headers_mut(), &reject.headers) {
                tracing::error!(route = %route.path, plugin = %route.plugin.name, "on-open rejection: {why}");
                return internal();
            }
            return resp;
        }
    };
    let (resp, upgrade) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(r) => r,
        Err(e) => {
            drop(session);
            tracing::debug!(%remote, route = %route.path, "invalid upgrade request: {e}");
            return Refusal::BadRequest("invalid upgrade request\n").response();
        }
    };
    let mut resp = resp.map(|_| Full::new(Bytes::new()));
    if let Some(p) = &accept.subprotocol {
        let valid = request.subprotocols.contains(p);
        match hyper::header::HeaderValue::from_str(p) {
            Ok(v) if valid => {
                resp.headers_mut().insert("sec-websocket-protocol", v);
            }
            _ => {
                tracing::error!(route = %route.path, plugin = %route.plugin.name, "on-open selected subprotocol {p:?}, which the client did not offer");
                drop(session);
                return internal();
            }
        }
    }
    if let Err(why) = handshake::apply_headers(resp.headers_mut(), &accept.headers) {
        tracing::error!(route = %route.path, plugin = %route.plugin.name, "on-open accept: {why}");
        drop(session);
        return internal();
    }
    tracing::debug!(%remote, route = %route.path, conn = id, "connection accepted");
    let shared2 = shared.clone();
    shared.tasks.spawn(async move {
        let ws = match upgrade.await {
            Ok(ws) => ws,
            Err(e) => {
                // The client went away before the upgrade completed: the
                // session's drop runs `on-close` with 1006.
                tracing::debug!(%remote, conn = session.id(), "upgrade failed: {e}");
                return;
            }
        };
        if shared2.shutting_down.load(Ordering::SeqCst) {
            session.request_shutdown();
        }
        let upgraded = ws.into_inner().into_inner();
        match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => {
                // Owned halves of a plain TCP stream: no lock per read or write.
                let (rd, wr) = parts.io.into_inner().into_split();
                session.run(rd, wr, parts.read_buf).await
            }
            Err(upgraded) => {
                let (rd, wr) = tokio::io::split(TokioIo::new(upgraded));
                session.run(rd, wr, Bytes::new()).await
            }
        }
    });
    resp
}

/// Answers a refused upgrade, logged at debug level with its status and
/// reason.
fn refuse(refusal: Refusal, remote: SocketAddr, path: &str) -> Response<Full<Bytes>> {
    let resp = refusal.response();
    tracing::debug!(%remote, path, status = resp.status().as_u16(), reason = ?refusal, "upgrade refused");
    resp
}
