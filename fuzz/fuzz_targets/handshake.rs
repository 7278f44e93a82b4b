//! Fuzz target `handshake`: the opening handshake's checks
//! (`protocol/handshake.rs`) on arbitrary request heads.
//!
//! # Input
//!
//! Bytes parsed as an HTTP/1.1 request head by httparse, with hyper's
//! settings (its default parser configuration, at most 100 header fields),
//! and turned into the `Request` hyper would give the gateway. Inputs hyper
//! refuses before the gateway sees them are skipped: an incomplete head, a
//! method, URI, header name or value that does not parse, `Content-Length`
//! values that are not numbers or disagree, `Transfer-Encoding` over
//! HTTP/1.0. Like hyper, the request keeps only the first `Content-Length`,
//! and none when `Transfer-Encoding` is there.
//!
//! # What is checked
//!
//! `validate` against RFC 6455 section 4.2.1, read from the fields as they
//! were on the wire (not through the `HeaderMap` the gateway reads):
//! - a request it accepts is a GET over HTTP/1.1 with exactly one non-empty
//!   `Host`, an `Upgrade` listing `websocket` and a `Connection` listing
//!   `Upgrade` (both case-insensitive), exactly one `Sec-WebSocket-Key`
//!   that is 16 bytes in base64, exactly one `Sec-WebSocket-Version: 13`,
//!   at most one `Origin`, and no body announced;
//! - conversely, it accepts every request that plainly meets those rules
//!   (field values of visible ASCII, `Content-Length: 0` if any, a key in
//!   canonical base64);
//! - each refusal has its reason (a duplicate is there twice, a bad version
//!   is there once, and so on) and its response the status and headers the
//!   RFC asks for (426 with `Sec-WebSocket-Version: 13`, ...).
//!
//! `origin_allowed` and `offered_subprotocols` against the fields too: no
//! list allows every origin, an origin is allowed by a list holding it in
//! any case, never by an empty one; the subprotocols offered are the
//! field's non-empty trimmed items, in order, and a route's list keeps
//! exactly those it names.

#![no_main]

use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Method, Request, StatusCode, Uri, Version};
use libfuzzer_sys::fuzz_target;
use wasmgate_fuzz::protocol::handshake::{offered_subprotocols, origin_allowed, validate, Refusal};

/// The most header fields hyper accepts in a request (its default).
const MAX_HEADERS: usize = 100;

fuzz_target!(|data: &[u8]| {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let Some((head, req)) = parse(data, &mut fields) else {
        return;
    };
    check_validate(&head, &req);
    check_origin(&head, &req);
    check_subprotocols(&head, &req);
});

/// The request head as it was on the wire.
struct Head<'a> {
    method: &'a str,
    /// The minor version: 1 for HTTP/1.1, 0 for HTTP/1.0.
    version: u8,
    fields: Vec<(&'a str, &'a [u8])>,
}

impl Head<'_> {
    /// The values of the fields called `name` (case-insensitive), in order.
    fn values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s [u8]> + 's {
        self.fields
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }

    fn count(&self, name: &str) -> usize {
        self.values(name).count()
    }

    /// Whether a comma-separated field `name` lists `token`
    /// (case-insensitive); `strict` counts only values of visible ASCII.
    fn lists(&self, name: &str, token: &str, strict: bool) -> bool {
        self.values(name)
            .filter(|v| !strict || is_text(v))
            .any(|v| {
                v.split(|&b| b == b',')
                    .any(|t| trim(t).eq_ignore_ascii_case(token.as_bytes()))
            })
    }
}

/// Whether a field value is visible ASCII, spaces and tabs: what
/// `HeaderValue::to_str` reads.
fn is_text(v: &[u8]) -> bool {
    v.iter()
        .all(|&b| b == b' ' || b == b'\t' || b.is_ascii_graphic())
}

/// `b` without the optional white space of HTTP (spaces and tabs) around it.
fn trim(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|&c| c != b' ' && c != b'\t');
    let end = b.iter().rposition(|&c| c != b' ' && c != b'\t');
    match (start, end) {
        (Some(s), Some(e)) => &b[s..=e],
        _ => &[],
    }
}

/// A `Content-Length` value as hyper reads it: one number, or a list of
/// equal numbers.
fn content_length(value: &[u8]) -> Option<u64> {
    let mut n = None;
    for item in value.split(|&b| b == b',') {
        let item = trim(item);
        if item.is_empty() || !item.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let v = item.iter().try_fold(0u64, |n, &d| {
            n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        })?;
        if n.is_some_and(|n| n != v) {
            return None;
        }
        n = Some(v);
    }
    n
}

/// Parses a request head as hyper does; `None` for what hyper refuses.
fn parse<'a>(
    data: &'a [u8],
    fields: &'a mut [httparse::Header<'a>],
) -> Option<(Head<'a>, Request<()>)> {
    let mut parsed = httparse::Request::new(fields);
    match parsed.parse(data) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return None,
    }
    let (method, path, version) = (parsed.method?, parsed.path?, parsed.version?);
    let mut req = Request::new(());
    *req.method_mut() = Method::from_bytes(method.as_bytes()).ok()?;
    *req.uri_mut() = path.parse::<Uri>().ok()?;
    *req.version_mut() = if version == 1 {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    let mut length = None;
    let mut chunked = false;
    let mut head = Head {
        method,
        version,
        fields: Vec::new(),
    };
    for f in parsed.headers.iter() {
        let name = HeaderName::from_bytes(f.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(f.value).ok()?;
        head.fields.push((f.name, f.value));
        if name == header::TRANSFER_ENCODING {
            if version != 1 {
                return None;
            }
            chunked = true;
        }
        if name == header::CONTENT_LENGTH {
            let n = content_length(f.value)?;
            if length.is_some_and(|l| l != n) {
                return None;
            }
            if length.is_some() {
                continue;
            }
            length = Some(n);
        }
        req.headers_mut().append(name, value);
    }
    if chunked {
        req.headers_mut().remove(header::CONTENT_LENGTH);
    }
    Some((head, req))
}

/// Whether `key` is base64 (RFC 4648, padded) for exactly 16 bytes;
/// `strict` also wants the unused bits of the last character clear.
fn is_16_bytes_base64(key: &[u8], strict: bool) -> bool {
    let digit = |c: u8| -> Option<u8> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        })
    };
    // 16 bytes: five groups of four characters (15 bytes) and one of two
    // characters and `==` (1 byte).
    let Some(body) = key.strip_suffix(b"==") else {
        return false;
    };
    if body.len() != 22 {
        return false;
    }
    let Some(digits) = body.iter().map(|&c| digit(c)).collect::<Option<Vec<u8>>>() else {
        return false;
    };
    !strict || digits[21] & 0x0F == 0
}

/// What RFC 6455 section 4.2.1 (and the gateway's stricter rules on
/// repeated fields and bodies) finds wrong with a request; `strict` reads
/// the fields plainly, not generously (see [`Head::lists`] and
/// [`is_16_bytes_base64`]; `Content-Length` exactly `0`).
fn problems(head: &Head<'_>, strict: bool) -> Vec<&'static str> {
    let mut p = Vec::new();
    if head.method != "GET" {
        p.push("not GET");
    }
    if head.version != 1 {
        p.push("not HTTP/1.1");
    }
    let hosts: Vec<_> = head.values("host").collect();
    if hosts.len() != 1 || hosts.iter().any(|h| trim(h).is_empty()) {
        p.push("not exactly one non-empty Host");
    }
    if !head.lists("upgrade", "websocket", strict) {
        p.push("no `Upgrade: websocket`");
    }
    if !head.lists("connection", "upgrade", strict) {
        p.push("no `Connection: Upgrade`");
    }
    let keys: Vec<_> = head.values("sec-websocket-key").collect();
    if keys.len() != 1 || !keys.iter().all(|k| is_16_bytes_base64(k, strict)) {
        p.push("not exactly one Sec-WebSocket-Key of 16 bytes");
    }
    let versions: Vec<_> = head.values("sec-websocket-version").collect();
    if versions.len() != 1 || versions[0] != b"13" {
        p.push("not exactly one `Sec-WebSocket-Version: 13`");
    }
    if head.count("origin") > 1 {
        p.push("more than one Origin");
    }
    if head.count("transfer-encoding") > 0 {
        p.push("a body (Transfer-Encoding)");
    }
    if head.values("content-length").any(|v| {
        if strict {
            v != b"0"
        } else {
            content_length(v) != Some(0)
        }
    }) {
        p.push("a body (Content-Length)");
    }
    p
}

fn check_validate(head: &Head<'_>, req: &Request<()>) {
    let verdict = validate(req);
    assert_eq!(verdict, validate(req), "validate is not deterministic");
    match &verdict {
        Ok(()) => {
            let p = problems(head, false);
            assert!(p.is_empty(), "accepted, but: {p:?}");
        }
        Err(refusal) => {
            let p = problems(head, true);
            assert!(
                !p.is_empty(),
                "refused ({refusal:?}) a request that meets RFC 6455"
            );
            check_refusal(head, refusal);
        }
    }
}

/// A refusal has its reason, and its response what the RFC asks for.
fn check_refusal(head: &Head<'_>, refusal: &Refusal) {
    let resp = refusal.response();
    let status = resp.status();
    let h = resp.headers();
    let text = refusal.to_string();
    assert!(
        !text.is_empty() && !text.contains('\n'),
        "a refusal's reason is one line for the log: {text:?}"
    );
    match refusal {
        Refusal::NotWebSocket => {
            assert_eq!(head.count("upgrade") + head.count("sec-websocket-key"), 0);
            assert_eq!(status, StatusCode::UPGRADE_REQUIRED);
            assert_eq!(
                h.get(header::UPGRADE).map(|v| v.as_bytes()),
                Some(&b"websocket"[..])
            );
        }
        Refusal::HttpVersion => {
            assert_ne!(head.version, 1);
            assert_eq!(status, StatusCode::HTTP_VERSION_NOT_SUPPORTED);
        }
        Refusal::BadVersion => {
            let versions: Vec<_> = head.values("sec-websocket-version").collect();
            assert!(versions.len() == 1 && versions[0] != b"13");
            // Section 4.4: the versions the server speaks.
            assert_eq!(status, StatusCode::UPGRADE_REQUIRED);
            assert_eq!(
                h.get("sec-websocket-version").map(|v| v.as_bytes()),
                Some(&b"13"[..])
            );
        }
        Refusal::Duplicate(name) => {
            assert!(head.count(name) > 1, "{name} is not repeated");
            assert_eq!(status, StatusCode::BAD_REQUEST);
        }
        Refusal::BadRequest(_) => assert_eq!(status, StatusCode::BAD_REQUEST),
        other => panic!("validate does not refuse with {other:?}"),
    }
}

fn check_origin(head: &Head<'_>, req: &Request<()>) {
    let example = ["https://example.com".to_owned()];
    assert!(
        origin_allowed(req, None),
        "no allowed_origins allows every origin"
    );
    let Some(origin) = head.values("origin").next() else {
        assert!(origin_allowed(req, Some(&[])) && origin_allowed(req, Some(&example)));
        return;
    };
    assert!(
        !origin_allowed(req, Some(&[])),
        "an empty list allows an origin"
    );
    assert_eq!(
        origin_allowed(req, Some(&example)),
        origin.eq_ignore_ascii_case(example[0].as_bytes())
    );
    if let Ok(origin) = std::str::from_utf8(origin) {
        let listed = [
            "https://example.com".to_owned(),
            origin.to_ascii_uppercase(),
        ];
        assert!(
            origin_allowed(req, Some(&listed)),
            "a listed origin is refused"
        );
    }
}

fn check_subprotocols(head: &Head<'_>, req: &Request<()>) {
    let offered = offered_subprotocols(req, None);
    // The items of the fields whose value is text (the others are not
    // read), in order.
    let expected: Vec<&[u8]> = head
        .values("sec-websocket-protocol")
        .filter(|v| is_text(v))
        .flat_map(|v| v.split(|&b| b == b','))
        .map(trim)
        .filter(|t| !t.is_empty())
        .collect();
    let got: Vec<&[u8]> = offered.iter().map(|s| s.as_bytes()).collect();
    assert_eq!(got, expected, "the subprotocols offered");
    assert!(offered_subprotocols(req, Some(&[])).is_empty());
    // A route listing every other one (and one nobody offers) keeps
    // exactly those, in the client's order.
    let route: Vec<String> = offered
        .iter()
        .step_by(2)
        .cloned()
        .chain(["chat.v1".to_owned()])
        .collect();
    let kept = offered_subprotocols(req, Some(&route));
    let want: Vec<String> = offered
        .iter()
        .filter(|p| route.contains(p))
        .cloned()
        .collect();
    assert_eq!(kept, want, "the subprotocols a route keeps");
}
