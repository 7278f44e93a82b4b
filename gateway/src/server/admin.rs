//! The admin listener (`[admin] listen`): a separate HTTP/1.1 port for
//! operators and their tooling, never the public one.
//!
//! - `GET /`: the admin page, one self-contained HTML file (no external
//!   assets): routes with their plugin file, version, hash, isolation and
//!   reload mode, live connections and message rates per route, and the
//!   recent reload errors, kept current from `/events`.
//! - `GET /events`: the same state as server-sent events (a `state` event
//!   each second, `data:` one JSON object as `/state` answers).
//! - `GET /state`: that JSON object once (see [`state`]).
//! - `GET /metrics`: every metric ([`crate::metrics`]) in the OpenMetrics
//!   text format, which Prometheus scrapes.
//! - `GET /healthz`: 200 while the process runs (liveness).
//! - `GET /readyz`: 200 once the config is loaded and the public listener
//!   is accepting, 503 once shutdown has begun (readiness: a load balancer
//!   stops sending new clients while the gateway drains) or once the node
//!   has left its cluster (another node took its number: its clients would
//!   not see the rest of the cluster). An unreachable Redis does not make
//!   it 503: every node would be unready at once.
//!
//! Anything else is 404; another method on these paths is 405.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use super::static_files::{full, Body};
use super::Shared;
use crate::config::{Isolation, OnReload};
use crate::metrics::Metrics;

/// The admin page.
const PAGE: &str = include_str!("admin.html");

/// How often `/events` sends the state.
const EVENT_INTERVAL: Duration = Duration::from_secs(1);

/// The content type of the OpenMetrics text format.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves the admin endpoints on `listener` until the process exits: it
/// keeps answering while the gateway drains, so that `/readyz` can say so.
pub(super) async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    let started = Instant::now();
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!("admin listener: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(answer(shared, &req, started)) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                // Admin requests are a line and a few headers.
                .max_buf_size(16 << 10)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(%remote, "admin connection ended: {e}");
            }
        });
    }
}

/// The answer to one admin request (`started`: when the admin listener
/// started, for the uptime).
fn answer(shared: Arc<Shared>, req: &Request<Incoming>, started: Instant) -> Response<Body> {
    let path = req.uri().path();
    if !matches!(
        path,
        "/" | "/events" | "/state" | "/metrics" | "/healthz" | "/readyz"
    ) {
        return text(
            StatusCode::NOT_FOUND,
            "not found: try /, /events, /state, /metrics, /healthz or /readyz\n",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    match path {
        "/" => typed(
            Bytes::from_static(PAGE.as_bytes()),
            "text/html; charset=utf-8",
        ),
        "/state" => typed(
            Bytes::from(state(&shared, started).to_string()),
            "application/json",
        ),
        "/events" => events(shared, started),
        "/metrics" => typed(Bytes::from(Metrics::global().encode()), OPENMETRICS),
        "/healthz" => text(StatusCode::OK, "alive\n"),
        _ => {
            if shared.shutting_down.load(Ordering::SeqCst) {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else if crate::cluster::Cluster::global().is_some_and(|c| c.departed()) {
                // Its clients would not see the rest of the cluster: new
                // ones should go to another node until it is restarted.
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "left the cluster (another node holds its node number): restart it\n",
                )
            } else {
                text(StatusCode::OK, "ready\n")
            }
        }
    }
}

/// The gateway's state as the admin page shows it, a JSON object:
/// `uptime_s` (seconds since the admin listener started), `draining`
/// (shutdown has begun), `connections` (open now, all routes), `routes`
/// (in config order, each with `tenant`, `path`, `plugin` (file or
/// `builtin:<name>`), `version`, `hash` (SHA-256, hex), `isolation`
/// (`connection` or `shared`), `on_reload` (`keep` or `migrate`),
/// `connections`, `instances`, `messages_in` and `messages_out` (totals
/// since start, for rates)), and `reload_errors` (the last 20 failed
/// reloads, oldest first, each with `at` (milliseconds since the Unix
/// epoch), `kind` and `message`), and `cluster` (`null` without
/// `[cluster]`; else `node_id`, `node` (its number), `redis_up`,
/// `departed` (it left the cluster: another node holds its number), and
/// `nodes`, the other live nodes, each with `node` and `node_id`).
pub(super) fn state(shared: &Shared, started: Instant) -> serde_json::Value {
    let table = shared.router.load();
    let routes: Vec<_> = table
        .routes()
        .iter()
        .map(|route| {
            let v = route.current();
            let m = &route.metrics;
            serde_json::json!({
                "tenant": v.tenant.name.as_ref(),
                "path": route.path,
                "plugin": v.plugin.name,
                "version": v.version,
                "hash": v.plugin.hash.to_hex(),
                "isolation": match v.settings.isolation {
                    Isolation::Connection => "connection",
                    Isolation::Shared => "shared",
                },
                "on_reload": match v.settings.on_reload {
                    OnReload::Keep => "keep",
                    OnReload::Migrate => "migrate",
                },
                "connections": route.active(),
                "instances": m.instances.get(),
                "messages_in": m.messages_in.get(),
                "messages_out": m.messages_out.get(),
            })
        })
        .collect();
    let errors: Vec<_> = Metrics::global()
        .recent_reload_errors()
        .into_iter()
        .map(|e| {
            let at =
                e.at.duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0);
            serde_json::json!({ "at": at, "kind": e.kind, "message": e.message })
        })
        .collect();
    serde_json::json!({
        "uptime_s": started.elapsed().as_secs(),
        "draining": shared.shutting_down.load(Ordering::SeqCst),
        "connections": shared.active.load(Ordering::Relaxed),
        "routes": routes,
        "reload_errors": errors,
        "cluster": crate::cluster::Cluster::global().map(|c| {
            let nodes: Vec<_> = c
                .nodes()
                .into_iter()
                .map(|(node, name)| serde_json::json!({ "node": node, "node_id": name }))
                .collect();
            serde_json::json!({
                "node_id": c.name(),
                "node": c.node(),
                "redis_up": c.redis_up(),
                "departed": c.departed(),
                "nodes": nodes,
            })
        }),
    })
}

/// `/events`: a `state` server-sent event now and every
/// [`EVENT_INTERVAL`] until the client goes away.
fn events(shared: Arc<Shared>, started: Instant) -> Response<Body> {
    let stream = futures_util::stream::unfold(true, move |first| {
        let shared = shared.clone();
        async move {
            if !first {
                tokio::time::sleep(EVENT_INTERVAL).await;
            }
            let event = format!("event: state\ndata: {}\n\n", state(&shared, started));
            Some((Ok(Frame::data(Bytes::from(event))), false))
        }
    });
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// A 200 with `body` of `content_type`.
fn typed(body: Bytes, content_type: &'static str) -> Response<Body> {
    let mut resp = Response::new(full(Full::new(body)));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut resp = Response::new(full(Full::new(Bytes::from_static(body.as_bytes()))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
