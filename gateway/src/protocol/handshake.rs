//! The opening handshake (RFC 6455 section 4.2): validating an upgrade
//! request, filtering the subprotocols offered, and building the HTTP
//! answers for refusals.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Version};

/// Why an upgrade request is refused before the plugin sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A plain HTTP request to a WebSocket route: 426.
    NotWebSocket,
    /// A malformed upgrade: 400 with the reason.
    BadRequest(&'static str),
    /// A header that must appear once appears more often: 400 naming it.
    Duplicate(&'static str),
    /// A WebSocket version other than 13: 426 with `Sec-WebSocket-Version: 13`.
    BadVersion,
    /// An `Origin` not in the route's `allowed_origins`: 403.
    Forbidden,
    /// The server is at `[server] max_connections`: 503.
    ServerFull,
    /// The route is at its `max_connections`: 503.
    RouteFull,
    /// The request's tenant is at its `max_connections`: 503.
    TenantFull,
    /// The request's tenant opened `max_connections_per_second` this
    /// second, or stayed over its CPU budget for the handshake timeout: 429
    /// with `Retry-After: 1` (RFC 6585 section 4).
    TenantRate,
    /// The gateway is shutting down: 503.
    ShuttingDown,
    /// No plugin instance could be created (memory or the instance pool is
    /// exhausted): 503.
    NoInstance,
    /// The route's shared instance stayed busy (another connection's call
    /// running or queued) for the handshake timeout: 503.
    InstanceBusy,
    /// An upgrade over HTTP/1.0: 505 (section 4.1 requires HTTP/1.1 or
    /// later).
    HttpVersion,
    /// No route for the path: 404.
    NotFound,
    /// Over TLS, a `Host` of another tenant than the one the SNI named (and
    /// whose certificate the connection got): 421 (RFC 9110 section
    /// 15.5.20).
    Misdirected,
}

impl Refusal {
    /// The status and the body text of this refusal.
    fn status_and_body(&self) -> (StatusCode, std::borrow::Cow<'static, str>) {
        let (status, body) = match self {
            Refusal::NotWebSocket => (
                StatusCode::UPGRADE_REQUIRED,
                "this route only speaks WebSocket: send an upgrade request\n",
            ),
            Refusal::BadRequest(why) => (StatusCode::BAD_REQUEST, *why),
            Refusal::Duplicate(name) => {
                return (
                    StatusCode::BAD_REQUEST,
                    format!("{name} must appear only once\n").into(),
                );
            }
            Refusal::BadVersion => (
                StatusCode::UPGRADE_REQUIRED,
                "unsupported WebSocket version: only 13 is supported\n",
            ),
            Refusal::Forbidden => (StatusCode::FORBIDDEN, "origin not allowed\n"),
            Refusal::ServerFull => (
                StatusCode::SERVICE_UNAVAILABLE,
                "too many connections (server max_connections)\n",
            ),
            Refusal::RouteFull => (
                StatusCode::SERVICE_UNAVAILABLE,
                "too many connections (route max_connections)\n",
            ),
            Refusal::TenantFull => (
                StatusCode::SERVICE_UNAVAILABLE,
                "too many connections (tenant max_connections)\n",
            ),
            Refusal::TenantRate => (
                StatusCode::TOO_MANY_REQUESTS,
                "too many new connections (tenant max_connections_per_second or cpu_budget)\n",
            ),
            Refusal::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n"),
            Refusal::NoInstance => (
                StatusCode::SERVICE_UNAVAILABLE,
                "no plugin instance available\n",
            ),
            Refusal::InstanceBusy => (
                StatusCode::SERVICE_UNAVAILABLE,
                "the route's shared plugin instance is busy\n",
            ),
            Refusal::HttpVersion => (
                StatusCode::HTTP_VERSION_NOT_SUPPORTED,
                "a WebSocket upgrade needs HTTP/1.1\n",
            ),
            Refusal::NotFound => (StatusCode::NOT_FOUND, "no route for this path\n"),
            Refusal::Misdirected => (
                StatusCode::MISDIRECTED_REQUEST,
                "this host is not served on this TLS connection: its server name (SNI) names another host\n",
            ),
        };
        (status, body.into())
    }

    /// The HTTP response for this refusal.
    pub fn response(&self) -> Response<Full<Bytes>> {
        let (status, body) = self.status_and_body();
        let mut resp = text_response(status, &body);
        let h = resp.headers_mut();
        match self {
            Refusal::NotWebSocket => {
                h.insert(
                    hyper::header::UPGRADE,
                    HeaderValue::from_static("websocket"),
                );
                h.insert(
                    hyper::header::CONNECTION,
                    HeaderValue::from_static("Upgrade"),
                );
            }
            Refusal::BadVersion => {
                h.insert("sec-websocket-version", HeaderValue::from_static("13"));
            }
            Refusal::TenantRate => {
                h.insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        resp
    }
}

impl std::fmt::Display for Refusal {
    /// The reason, as logged: the response body's text.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.status_and_body().1.trim_end())
    }
}

/// A plain-text response.
pub fn text_response(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_owned())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Whether a comma-separated header contains `token` (case-insensitive).
fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

/// Whether a request tries to be an upgrade of any kind (it has `Upgrade`
/// or `Sec-WebSocket-Key`): on a route, one that is not a valid WebSocket
/// upgrade is refused with its reason rather than 426.
pub fn is_upgrade_attempt(h: &hyper::HeaderMap) -> bool {
    h.contains_key(hyper::header::UPGRADE) || h.contains_key("sec-websocket-key")
}

/// Whether a request asks for a WebSocket (`Upgrade: websocket` or a
/// `Sec-WebSocket-Key`), well-formed or not: such a request is answered by
/// the routes, any other (`Upgrade: h2c` included) by the static mounts
/// first.
pub fn wants_websocket(h: &hyper::HeaderMap) -> bool {
    has_token(h, hyper::header::UPGRADE, "websocket") || h.contains_key("sec-websocket-key")
}

/// Checks that `req` is a valid WebSocket upgrade (section 4.2.1): GET over
/// HTTP/1.1 or later, `Upgrade: websocket`, `Connection: Upgrade`, version
/// 13, a well-formed key, and `Host`. `Sec-WebSocket-Key`,
/// `Sec-WebSocket-Version` and `Host` must each appear exactly once
/// (section 11.3.1 and RFC 9112 section 3.2).
pub fn validate<B>(req: &Request<B>) -> Result<(), Refusal> {
    let h = req.headers();
    if !is_upgrade_attempt(h) {
        return Err(Refusal::NotWebSocket);
    }
    if req.version() < Version::HTTP_11 {
        return Err(Refusal::HttpVersion);
    }
    if req.method() != Method::GET {
        return Err(Refusal::BadRequest("a WebSocket upgrade must use GET\n"));
    }
    if !has_token(h, hyper::header::UPGRADE, "websocket") {
        return Err(Refusal::BadRequest("missing `Upgrade: websocket`\n"));
    }
    if !has_token(h, hyper::header::CONNECTION, "upgrade") {
        return Err(Refusal::BadRequest("missing `Connection: Upgrade`\n"));
    }
    match single(h, hyper::header::HOST.as_str(), "Host")? {
        Some(host) if !host.as_bytes().trim_ascii().is_empty() => {}
        _ => return Err(Refusal::BadRequest("missing Host\n")),
    }
    // RFC 6454 section 7.3: at most one Origin; checking only the first of
    // two would let a second one through `allowed_origins`.
    single(h, hyper::header::ORIGIN.as_str(), "Origin")?;
    // An upgrade request has no body (RFC 6455 section 4.1); one that
    // announces a body would have it read as WebSocket frames.
    if h.contains_key(hyper::header::TRANSFER_ENCODING)
        || h.get(hyper::header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
    {
        return Err(Refusal::BadRequest("an upgrade request has no body\n"));
    }
    match single(h, "sec-websocket-version", "Sec-WebSocket-Version")? {
        Some(v) if v.as_bytes() == b"13" => {}
        Some(_) => return Err(Refusal::BadVersion),
        None => return Err(Refusal::BadRequest("missing Sec-WebSocket-Version\n")),
    }
    match single(h, "sec-websocket-key", "Sec-WebSocket-Key")? {
        Some(k) if is_valid_key(k.as_bytes()) => Ok(()),
        Some(_) => Err(Refusal::BadRequest(
            "Sec-WebSocket-Key must be 16 bytes in base64\n",
        )),
        None => Err(Refusal::BadRequest("missing Sec-WebSocket-Key\n")),
    }
}

/// The one value of a header that may appear at most once; 400 naming it if
/// it appears more often.
fn single<'a>(
    h: &'a HeaderMap,
    name: &str,
    display: &'static str,
) -> Result<Option<&'a HeaderValue>, Refusal> {
    let mut values = h.get_all(name).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(Refusal::Duplicate(display));
    }
    Ok(first)
}

/// A key is 16 random bytes in base64: 22 characters and `==`.
fn is_valid_key(key: &[u8]) -> bool {
    key.len() == 24
        && key.ends_with(b"==")
        && key[..22]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
}

/// Checks `Origin` against a route's allowed list. A request without
/// `Origin` (not from a browser) is allowed.
pub fn origin_allowed<B>(req: &Request<B>, allowed: Option<&[String]>) -> bool {
    let Some(allowed) = allowed else {
        return true;
    };
    match req.headers().get(hyper::header::ORIGIN) {
        None => true,
        Some(origin) => allowed
            .iter()
            .any(|a| a.as_bytes().eq_ignore_ascii_case(origin.as_bytes())),
    }
}

/// The subprotocols the client offered, in its order, keeping only those
/// the route lists (when it lists any).
pub fn offered_subprotocols<B>(req: &Request<B>, route: Option<&[String]>) -> Vec<String> {
    req.headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .filter(|p| route.is_none_or(|r| r.iter().any(|x| x == p)))
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upgrade() -> hyper::http::request::Builder {
        Request::get("/x")
            .header("host", "example.com")
            .header("upgrade", "websocket")
            .header("connection", "keep-alive, Upgrade")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
    }

    #[test]
    fn a_valid_upgrade_passes() {
        assert_eq!(validate(&upgrade().body(()).unwrap()), Ok(()));
    }

    #[test]
    fn refusals_map_to_their_status() {
        let plain = Request::get("/x").body(()).unwrap();
        assert_eq!(validate(&plain), Err(Refusal::NotWebSocket));
        let mut v8 = upgrade().body(()).unwrap();
        v8.headers_mut()
            .insert("sec-websocket-version", HeaderValue::from_static("8"));
        assert_eq!(validate(&v8), Err(Refusal::BadVersion));
        let mut bad_key = upgrade().body(()).unwrap();
        bad_key
            .headers_mut()
            .insert("sec-websocket-key", HeaderValue::from_static("short"));
        assert!(matches!(validate(&bad_key), Err(Refusal::BadRequest(_))));
        assert_eq!(Refusal::BadVersion.response().status(), 426);
        assert_eq!(
            Refusal::BadVersion.response().headers()["sec-websocket-version"],
            "13"
        );
    }

    #[test]
    fn headers_that_must_appear_once_are_refused_when_repeated() {
        for (name, value) in [
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-version", "13"),
            ("host", "example.com"),
        ] {
            let twice = upgrade().header(name, value).body(()).unwrap();
            assert!(
                matches!(validate(&twice), Err(Refusal::Duplicate(_))),
                "{name} twice"
            );
            assert_eq!(
                Refusal::Duplicate("X").response().status(),
                StatusCode::BAD_REQUEST
            );
        }
    }

    #[test]
    fn an_upgrade_over_http_1_0_is_refused_with_505() {
        let old = upgrade().version(Version::HTTP_10).body(()).unwrap();
        assert_eq!(validate(&old), Err(Refusal::HttpVersion));
        assert_eq!(Refusal::HttpVersion.response().status(), 505);
    }

    #[test]
    fn an_upgrade_without_host_is_refused() {
        let mut req = upgrade().body(()).unwrap();
        req.headers_mut().remove("host");
        assert!(matches!(validate(&req), Err(Refusal::BadRequest(_))));
    }

    #[test]
    fn subprotocols_are_filtered_by_the_route_list() {
        let req = upgrade()
            .header("sec-websocket-protocol", "a, b")
            .header("sec-websocket-protocol", "c")
            .body(())
            .unwrap();
        assert_eq!(offered_subprotocols(&req, None), ["a", "b", "c"]);
        let only = ["c".to_owned(), "b".to_owned()];
        assert_eq!(offered_subprotocols(&req, Some(&only)), ["b", "c"]);
    }
}
