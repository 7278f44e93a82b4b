//! Answering one HTTP request on a WebSocket route: the checks before the
//! plugin runs (route, handshake, origin, capacity), the plugin's `on-open`,
//! the `101 Switching Protocols` and the session spawned on the upgraded
//! connection. Refusals are logged at debug level with their status.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use super::static_files::{self, full, Body};
use super::Shared;
use crate::bindings::wasmgate::plugin::types;
use crate::connection::session::{Opened, Session};
use crate::protocol::deflate;
use crate::protocol::handshake::{self, Refusal};
use crate::routing::route::{Capacity, Slot};

/// Answers one HTTP request: a refusal, the plugin's rejection, or `101`
/// with the session spawned to run once the upgrade completes.
///
/// Once the plugin's `on-open` has accepted, the session owns the promise of
/// `on-close`: every path below that gives up on the connection (a bad
/// subprotocol or header from the plugin, a failed upgrade) drops the
/// session, which runs `on-close` with 1006.
pub(super) async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    remote: SocketAddr,
    sni: Option<Arc<str>>,
) -> Response<Body> {
    let attempt = handshake::wants_websocket(req.headers());
    if !attempt {
        if let Some(resp) = static_file(&shared, &req, remote, sni.as_deref()).await {
            return resp;
        }
    }
    let resp = upgrade(shared, req, remote, sni).await;
    // Every upgrade request not answered with 101: the gateway's refusals,
    // the plugin's, and its failures in on-open.
    if attempt && resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        crate::metrics::Metrics::global().refused(resp.status().as_u16());
    }
    resp.map(full)
}

/// The host a request names: an absolute-form request target's authority,
/// which wins over `Host` (RFC 9112 section 3.2.2) as a proxy in front
/// would route it, else its `Host` header; `Err` if that is not text.
fn request_host<B>(req: &Request<B>) -> Result<Option<&str>, ()> {
    match req.uri().authority() {
        Some(a) => Ok(Some(a.as_str())),
        None => match req.headers().get(hyper::header::HOST) {
            Some(h) => h.to_str().map(Some).map_err(|_| ()),
            None => Ok(None),
        },
    }
}

/// The answer from a static mount to a request that is not an upgrade, if
/// one of its tenant's mounts serves its path and none of its routes does.
async fn static_file(
    shared: &Shared,
    req: &Request<Incoming>,
    remote: SocketAddr,
    sni: Option<&str>,
) -> Option<Response<Body>> {
    let path = req.uri().path();
    let host = request_host(req).ok()?;
    let (mount, rest) = {
        let table = shared.router.load();
        if !matches!(table.resolve(host, path), Ok(None)) {
            return None;
        }
        let found = table.static_mount(host, path).ok()??;
        if let Some(sni) = sni {
            if !table.same_tenant(sni, host) {
                return Some(refuse(Refusal::Misdirected, remote, path).map(full));
            }
        }
        found
    };
    let resp = static_files::serve(&mount, rest, req).await;
    tracing::debug!(%remote, path, status = resp.status().as_u16(), mount = %mount.path, "static file request");
    Some(resp)
}

/// Answers a request that is (or tries to be) a WebSocket upgrade, or that
/// no static mount serves.
async fn upgrade(
    shared: Arc<Shared>,
    mut req: Request<Incoming>,
    remote: SocketAddr,
    sni: Option<Arc<str>>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let Ok(host) = request_host(&req) else {
        return refuse(Refusal::BadRequest("invalid Host header\n"), remote, path);
    };
    let table = shared.router.load();
    let route = match table.resolve(host, path) {
        Ok(Some(route)) => route.clone(),
        Ok(None) => return refuse(Refusal::NotFound, remote, path),
        Err(_) => return refuse(Refusal::BadRequest("invalid Host header\n"), remote, path),
    };
    // Over TLS, the certificate was chosen by the SNI's tenant: a request
    // for another tenant's host on that connection is misdirected (RFC 9110
    // section 15.5.20), as a client reusing a connection across names would
    // send it.
    if let Some(sni) = &sni {
        if !table.same_tenant(sni, host) {
            return refuse(Refusal::Misdirected, remote, path);
        }
    }
    drop(table);
    // The version new connections get now; this one keeps it.
    let version = route.current();
    let settings = &version.settings;
    if let Err(refusal) = handshake::validate(&req) {
        return refuse(refusal, remote, &route.path);
    }
    if !handshake::origin_allowed(&req, settings.allowed_origins.as_deref()) {
        let origin = req.headers().get(hyper::header::ORIGIN);
        tracing::debug!(%remote, ?origin, tenant = %version.tenant.name, route = %route.path, "origin not in allowed_origins");
        return refuse(Refusal::Forbidden, remote, &route.path);
    }
    if shared.shutting_down.load(Ordering::SeqCst) {
        return refuse(Refusal::ShuttingDown, remote, &route.path);
    }
    if !version.tenant.meters.upgrades.take(1) {
        return refuse(Refusal::TenantRate, remote, &route.label);
    }
    let slot = match Slot::acquire(
        &route,
        &version,
        &shared.active,
        shared.settings.max_connections,
    ) {
        Ok(slot) => slot,
        Err(Capacity::Server) => return refuse(Refusal::ServerFull, remote, &route.label),
        Err(Capacity::Route) => return refuse(Refusal::RouteFull, remote, &route.label),
        Err(Capacity::Tenant) => return refuse(Refusal::TenantFull, remote, &route.label),
    };
    // A tenant over its CPU budget: its new connections wait, like its
    // other events, until the budget allows; for at most the handshake
    // timeout, and not past shutdown; then 429.
    let give_up = std::time::Instant::now() + shared.settings.handshake_timeout;
    while let Some(at) = version.tenant.cpu_ready_at() {
        if std::time::Instant::now() >= give_up || shared.shutting_down.load(Ordering::SeqCst) {
            return refuse(Refusal::TenantRate, remote, &route.label);
        }
        let step = std::time::Instant::now() + std::time::Duration::from_millis(100);
        tokio::time::sleep_until(at.min(step).min(give_up).into()).await;
    }
    // A shared instance is entered by one connection at a time: `on-open`
    // waits its turn as this task (not on a thread) behind a call that may
    // run up to max_call_time; for at most the handshake timeout, then 503.
    let turn = match &version.shared {
        Some(instance) => match tokio::time::timeout_at(give_up.into(), instance.turn()).await {
            Ok(turn) => turn,
            Err(_) => return refuse(Refusal::InstanceBusy, remote, &route.label),
        },
        None => None,
    };
    let offered = handshake::offered_subprotocols(&req, settings.subprotocols.as_deref());
    let request = Arc::new(plugin_request(&req, remote, offered));
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let internal =
        || handshake::text_response(StatusCode::INTERNAL_SERVER_ERROR, "plugin failed\n");
    let opened = Session::open(
        id,
        route.clone(),
        version.clone(),
        shared.runtime.clone(),
        slot,
        request.clone(),
    );
    let (mut session, accept) = match opened {
        Opened::Accept(session, accept) => (session, accept),
        Opened::Failed => {
            tracing::debug!(%remote, tenant = %version.tenant.name, route = %route.path, conn = id, status = 500, "upgrade refused: on-open failed");
            return internal();
        }
        Opened::Unavailable => {
            return refuse(Refusal::NoInstance, remote, &route.path);
        }
        Opened::Reject(reject) => {
            let status = StatusCode::from_u16(reject.status)
                .ok()
                .filter(|s| s.is_client_error() || s.is_server_error())
                .unwrap_or_else(|| {
                    tracing::error!(
                        tenant = %version.tenant.name, route = %route.path, plugin = %version.plugin.name,
                        "on-open rejected with status {}, which is not 400-599: answering 500",
                        reject.status
                    );
                    StatusCode::INTERNAL_SERVER_ERROR
                });
            tracing::debug!(%remote, tenant = %version.tenant.name, route = %route.path, conn = id, status = status.as_u16(), "upgrade refused by the plugin");
            let mut resp = Response::new(Full::new(Bytes::from(reject.body)));
            *resp.status_mut() = status;
            if let Err(why) = apply_headers(resp.headers_mut(), &reject.headers) {
                tracing::error!(tenant = %version.tenant.name, route = %route.path, plugin = %version.plugin.name, "on-open rejection: {why}");
                return internal();
            }
            return resp;
        }
    };
    let (resp, upgrade) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(r) => r,
        Err(e) => {
            drop(session);
            tracing::debug!(%remote, tenant = %version.tenant.name, route = %route.path, "invalid upgrade request: {e}");
            return Refusal::BadRequest("invalid upgrade request\n").response();
        }
    };
    let mut resp = resp.map(|_| Full::new(Bytes::new()));
    // permessage-deflate (RFC 7692), when the route has it on and the
    // client offers something acceptable.
    if let Some(compression) = &settings.compression {
        if let Some((agreed, value)) = deflate::negotiate(req.headers(), compression) {
            resp.headers_mut()
                .insert(hyper::header::SEC_WEBSOCKET_EXTENSIONS, value);
            session.set_compression(agreed);
        }
    }
    if let Some(p) = &accept.subprotocol {
        let valid = request.subprotocols.contains(p);
        match hyper::header::HeaderValue::from_str(p) {
            Ok(v) if valid => {
                resp.headers_mut().insert("sec-websocket-protocol", v);
            }
            _ => {
                tracing::error!(tenant = %version.tenant.name, route = %route.path, plugin = %version.plugin.name, "on-open selected subprotocol {p:?}, which the client did not offer");
                drop(session);
                return internal();
            }
        }
    }
    if let Err(why) = apply_headers(resp.headers_mut(), &accept.headers) {
        tracing::error!(tenant = %version.tenant.name, route = %route.path, plugin = %version.plugin.name, "on-open accept: {why}");
        drop(session);
        return internal();
    }
    // The refusals above drop the session (its `on-close` runs) within the
    // turn; from here the session waits its own turns.
    drop(turn);
    tracing::debug!(%remote, tenant = %version.tenant.name, route = %route.path, conn = id, "connection accepted");
    route.metrics.opened.inc();
    let shared2 = shared.clone();
    shared.tasks.spawn(async move {
        let ws = match upgrade.await {
            Ok(ws) => ws,
            Err(e) => {
                // The client went away before the upgrade completed:
                // `on-close` with 1006, in its turn.
                tracing::debug!(%remote, conn = session.id(), "the client went away before the upgrade completed ({e})");
                return Box::pin(session.abandon()).await;
            }
        };
        if shared2.shutting_down.load(Ordering::SeqCst) {
            session.request_shutdown();
        }
        // The session's future is boxed and awaited outside the match.
        // Awaited inside it, this task reserved room for the largest of the
        // three stream types' futures and the match's temporaries: 4,160
        // bytes for every connection, where a plain TCP session's future is
        // 1,288.
        session_over(ws.into_inner().into_inner(), session).await
    });
    resp
}

/// The event loop of `session` over the upgraded connection `upgraded`:
/// owned halves of a plain TCP stream (no lock per read or write), or the
/// split halves of a TLS or other stream.
fn session_over(
    upgraded: hyper::upgrade::Upgraded,
    session: Box<Session>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    let upgraded = match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => {
            let (rd, wr) = parts.io.into_inner().into_split();
            return Box::pin(session.run(rd, wr, parts.read_buf));
        }
        Err(upgraded) => upgraded,
    };
    match upgraded.downcast::<TokioIo<TlsStream<TcpStream>>>() {
        Ok(parts) => {
            let (rd, wr) = tokio::io::split(parts.io.into_inner());
            Box::pin(session.run(rd, wr, parts.read_buf))
        }
        Err(upgraded) => {
            let (rd, wr) = tokio::io::split(TokioIo::new(upgraded));
            Box::pin(session.run(rd, wr, Bytes::new()))
        }
    }
}

/// Answers a refused upgrade, logged at debug level with its status and
/// reason.
fn refuse(refusal: Refusal, remote: SocketAddr, path: &str) -> Response<Full<Bytes>> {
    let resp = refusal.response();
    tracing::debug!(%remote, path, status = resp.status().as_u16(), reason = %refusal, "upgrade refused");
    resp
}

/// The plugin's view of the upgrade request.
pub fn plugin_request<B>(
    req: &Request<B>,
    remote: std::net::SocketAddr,
    subprotocols: Vec<String>,
) -> types::Request {
    types::Request {
        method: req.method().as_str().to_owned(),
        path: req.uri().path().to_owned(),
        query: req.uri().query().map(str::to_owned),
        headers: req
            .headers()
            .iter()
            .map(|(name, value)| types::Header {
                name: name.as_str().to_owned(),
                value: String::from_utf8_lossy(value.as_bytes()).into_owned(),
            })
            .collect(),
        remote_addr: remote.to_string(),
        subprotocols,
    }
}

/// Headers a plugin may not set on an upgrade response: the handshake's own.
const RESERVED: [&str; 5] = [
    "upgrade",
    "connection",
    "sec-websocket-accept",
    "sec-websocket-protocol",
    "sec-websocket-extensions",
];

/// Copies plugin-provided headers into `map`; the first invalid one is an
/// error naming it.
pub fn apply_headers(map: &mut HeaderMap, headers: &[types::Header]) -> Result<(), String> {
    for h in headers {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| format!("invalid header name {:?}", h.name))?;
        if RESERVED.contains(&name.as_str()) {
            return Err(format!("header {:?} is set by the gateway", h.name));
        }
        let value = HeaderValue::from_str(&h.value)
            .map_err(|_| format!("invalid value for header {:?}", h.name))?;
        map.append(name, value);
    }
    Ok(())
}
