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
                Err(e) => errors.push(e),
            }
        }
        if !errors.is_empty() {
            return Err(Errors(errors));
        }
        check_map_count(config.server.max_connections);
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

    /// Binds the listener (`[server] listen`, or `addr` when given).
    pub async fn bind(&self, addr: Option<SocketAddr>) -> Result<TcpListener, Error> {
        let addr = addr.unwrap_or(self.shared.settings.listen);
        TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { addr, source })
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
                conn.request_close(1001, "going away");
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

/// Memory maps one plugin instance takes, rounded up (its memory and tables
/// are each carved out of the instance pool with their own protection).
const MAPS_PER_INSTANCE: usize = 12;

/// Warns when the kernel's map limit cannot hold `max_connections` plugin
/// instances: upgrades past it would be answered 503.
fn check_map_count(max_connections: usize) {
    let Some(limit) = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
    else {
        return;
    };
    let needed = max_connections.saturating_mul(MAPS_PER_INSTANCE) + 4096;
    if needed > limit {
        tracing::warn!(
            max_connections,
            vm_max_map_count = limit,
            "max_connections needs about {needed} memory maps for plugin instances but \
             vm.max_map_count is {limit}: about {} connections will fit, the rest get 503. \
             Raise it (sysctl -w vm.max_map_count={}) or lower max_connections",
            limit.saturating_sub(4096) / MAPS_PER_INSTANCE,
            needed.next_power_of_two()
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
async fn handle(
    shared: Arc<Shared>,
    mut req: Request<Incoming>,
    remote: SocketAddr,
) -> Response<Full<Bytes>> {
    let Some(route) = shared.routes.get(req.uri().path()).cloned() else {
        return Refusal::NotFound.response();
    };
    if let Err(refusal) = handshake::validate(&req) {
        return refusal.response();
    }
    if !handshake::origin_allowed(&req, route.allowed_origins.as_deref()) {
        return Refusal::Forbidden.response();
    }
    if shared.shutting_down.load(Ordering::SeqCst) {
        return Refusal::Unavailable.response();
    }
    let Some(slot) = Slot::acquire(&route, &shared.active, shared.settings.max_connections) else {
        return Refusal::Unavailable.response();
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
        Opened::Failed => return internal(),
        Opened::Unavailable => return Refusal::Unavailable.response(),
        Opened::Reject(reject) => {
            let status = StatusCode::from_u16(reject.status)
                .ok()
                .filter(|s| s.is_client_error() || s.is_server_error())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
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
            session.discard();
            return Refusal::BadRequest("invalid upgrade request\n").response_with_log(e);
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
                session.discard();
                return internal();
            }
        }
    }
    if let Err(why) = handshake::apply_headers(resp.headers_mut(), &accept.headers) {
        tracing::error!(route = %route.path, plugin = %route.plugin.name, "on-open accept: {why}");
        session.discard();
        return internal();
    }
    let shared2 = shared.clone();
    shared.tasks.spawn(async move {
        let ws = match upgrade.await {
            Ok(ws) => ws,
            Err(e) => {
                tracing::debug!(%remote, "upgrade failed: {e}");
                session.discard();
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

impl Refusal {
    fn response_with_log(&self, e: impl std::fmt::Display) -> Response<Full<Bytes>> {
        tracing::debug!("refused upgrade: {e}");
        self.response()
    }
}
