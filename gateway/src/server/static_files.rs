//! Static files: plain HTTP `GET` and `HEAD` requests answered from a
//! `[[static]]` mount (a folder, or a folder built into the binary), next to
//! the WebSocket routes on the same listener.
//!
//! Which requests come here: one that is not a WebSocket upgrade (neither
//! `Upgrade` nor `Sec-WebSocket-Key`), to a path that is not one of its
//! tenant's routes, under one of its tenant's mounts (the longest path
//! prefix wins; see [`crate::routing::router`]). Everything else is routed
//! as before.
//!
//! What a mount serves, and what it refuses:
//! - The request path is percent-decoded one segment at a time (RFC 3986
//!   section 2.1). A segment that decodes to `.` or `..`, holds `/`, `\`,
//!   NUL or another control character, or is not UTF-8, is 404; so is an
//!   empty segment (`a//b`) and a dot file (`.env`, `.git/`). Nothing
//!   outside the folder can be reached: what was opened is checked through
//!   its file descriptor, and its real path must lie inside the folder's
//!   real path with no dot component, so a symbolic link out of the folder
//!   or to a dot file is 404 too, even one swapped in during the request.
//! - A folder is served as its `index` file (`index.html`); a folder named
//!   without its trailing `/` (the mount's own path too) is redirected
//!   (301, query kept) to the name with it, so that the page's relative
//!   links resolve inside it.
//! - Only regular files, opened without blocking (a FIFO is 404, not a
//!   hang). `Content-Type` from the file extension (the
//!   `mime_guess` table, `application/octet-stream` when unknown; text
//!   types get `charset=utf-8`), with `X-Content-Type-Options: nosniff`.
//! - Validators (RFC 9110 section 8.8): `ETag` from the file's size and
//!   modification time (from the content, for a built-in file), and
//!   `Last-Modified`. `If-None-Match` (weak comparison) and, without it,
//!   `If-Modified-Since` answer 304. `Cache-Control: no-cache`: a file can
//!   be edited at any time and is read at each request, so clients
//!   revalidate rather than keep a stale copy.
//! - The body is streamed from the file in 64 KiB chunks, never read whole.
//! - Other methods get 405 with `Allow: GET, HEAD`.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use bytes::Bytes;
use futures_util::TryStreamExt;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};

use crate::config::{StaticDir, StaticSettings};

/// The body of every response on the public listener: a buffer, or a file
/// streamed.
pub(crate) type Body = BoxBody<Bytes, std::io::Error>;

/// Bytes read from a file per body chunk.
const CHUNK: usize = 64 << 10;

/// A complete body as a [`Body`].
pub(crate) fn full(body: Full<Bytes>) -> Body {
    body.map_err(|never| match never {}).boxed()
}

/// The answer to `req` for the part `rest` of its path inside `mount`
/// (percent-encoded, without its leading `/`).
pub(super) async fn serve<B>(
    mount: &StaticSettings,
    rest: &str,
    req: &Request<B>,
) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut resp = plain(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    let Some(segments) = decode(rest) else {
        return not_found();
    };
    // A path ending in `/` names a folder; a folder named without it
    // (the mount's own path `/docs` included) is redirected to it, so that
    // the page's relative links resolve inside it.
    let names_folder = req.uri().path().ends_with('/');
    let found = match &mount.dir {
        StaticDir::Builtin(_) if segments.is_empty() && !names_folder => Found::Redirect,
        StaticDir::Builtin(folder) => builtin(folder, &segments, &mount.index),
        StaticDir::Folder(base) => on_disk(base, &segments, names_folder, &mount.index).await,
    };
    if let Found::Redirect = found {
        let location = match req.uri().query() {
            Some(q) => format!("{}/?{q}", req.uri().path()),
            None => format!("{}/", req.uri().path()),
        };
        let mut resp = plain(StatusCode::MOVED_PERMANENTLY, "moved\n");
        if let Ok(v) = HeaderValue::from_str(&location) {
            resp.headers_mut().insert(header::LOCATION, v);
        }
        return resp;
    }
    let (file, validators, name) = match found {
        Found::File {
            source,
            validators,
            name,
        } => (source, validators, name),
        Found::Redirect | Found::Missing => return not_found(),
    };
    let mut resp = if not_modified(req, &validators) {
        let mut resp = Response::new(full(Full::new(Bytes::new())));
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
        resp
    } else {
        let len = validators.len;
        let body = if req.method() == Method::HEAD {
            Empty::new().map_err(|never| match never {}).boxed()
        } else {
            match file {
                Source::Builtin(bytes) => full(Full::new(Bytes::from_static(bytes))),
                Source::File(f) => {
                    let stream = tokio_util::io::ReaderStream::with_capacity(f, CHUNK);
                    BodyExt::boxed(StreamBody::new(stream.map_ok(Frame::data)))
                }
            }
        };
        let mut resp = Response::new(body);
        let h = resp.headers_mut();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        h.insert(header::CONTENT_TYPE, content_type(&name));
        h.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        resp
    };
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&validators.etag) {
        h.insert(header::ETAG, v);
    }
    if let Some(modified) = validators.modified.filter(|m| http_date_range(*m)) {
        if let Ok(v) = HeaderValue::from_str(&httpdate::fmt_http_date(modified)) {
            h.insert(header::LAST_MODIFIED, v);
        }
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// What a request path names.
enum Found {
    /// A file to serve.
    File {
        source: Source,
        validators: Validators,
        /// Its file name, for its content type.
        name: String,
    },
    /// A folder named without its trailing `/`.
    Redirect,
    /// Nothing that may be served.
    Missing,
}

/// Where a file's bytes come from.
enum Source {
    Builtin(&'static [u8]),
    File(tokio::fs::File),
}

/// A file's size and validators.
struct Validators {
    /// Its size in bytes.
    len: u64,
    /// Its entity tag, quoted (a strong validator).
    etag: String,
    /// When it was last modified (`None` for a built-in file).
    modified: Option<SystemTime>,
}

/// The decoded segments of `rest`, or `None` if one of them may not be
/// served (see the module's documentation). A trailing `/` adds no
/// segment.
fn decode(rest: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    if rest.is_empty() {
        return Some(out);
    }
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    for raw in rest.split('/') {
        let bytes: Vec<u8> = percent_encoding::percent_decode_str(raw).collect();
        let seg = String::from_utf8(bytes).ok()?;
        if seg.is_empty()
            || seg.starts_with('.')
            || seg.contains(['/', '\\'])
            || seg.chars().any(char::is_control)
        {
            return None;
        }
        out.push(seg);
    }
    Some(out)
}

/// A file of the built-in folder `folder`.
fn builtin(folder: &str, segments: &[String], index: &str) -> Found {
    let mut path = segments.join("/");
    if path.is_empty() {
        path = index.to_owned();
    }
    match crate::assets::static_file(folder, &path) {
        Some(bytes) => {
            let hash = crate::file::ContentHash::of(bytes).to_hex();
            Found::File {
                source: Source::Builtin(bytes),
                validators: Validators {
                    len: bytes.len() as u64,
                    etag: format!("\"{}\"", &hash[..32]),
                    modified: None,
                },
                name: path,
            }
        }
        None => Found::Missing,
    }
}

/// A file under the folder `base` (see [`open_inside`]).
async fn on_disk(base: &Path, segments: &[String], names_folder: bool, index: &str) -> Found {
    let base = base.to_owned();
    let segments = segments.to_vec();
    let index = index.to_owned();
    let opened = tokio::task::spawn_blocking(move || {
        let root = std::fs::canonicalize(&base).ok()?;
        let mut path = root.clone();
        path.extend(&segments);
        match open_inside(&root, &path)? {
            Opened::File(file, meta, real) => {
                // `file.txt/`: a file is not a folder.
                (!names_folder).then_some(Lookup::File(file, meta, real))
            }
            Opened::Folder if !names_folder => Some(Lookup::Redirect),
            Opened::Folder => match open_inside(&root, &path.join(&index))? {
                Opened::File(file, meta, real) => Some(Lookup::File(file, meta, real)),
                Opened::Folder => None,
            },
        }
    })
    .await
    .ok()
    .flatten();
    let (file, meta, real) = match opened {
        Some(Lookup::File(file, meta, real)) => (file, meta, real),
        Some(Lookup::Redirect) => return Found::Redirect,
        None => return Found::Missing,
    };
    let modified = meta.modified().ok();
    let stamp = modified
        .and_then(|m| m.duration_since(SystemTime::UNIX_EPOCH).ok())
        .unwrap_or_default();
    Found::File {
        source: Source::File(tokio::fs::File::from_std(file)),
        validators: Validators {
            len: meta.len(),
            etag: format!(
                "\"{:x}.{:x}-{:x}\"",
                stamp.as_secs(),
                stamp.subsec_nanos(),
                meta.len()
            ),
            modified,
        },
        name: real
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    }
}

/// What a path under a mount's folder turned out to be.
enum Lookup {
    File(std::fs::File, Box<std::fs::Metadata>, PathBuf),
    Redirect,
}

/// What [`open_inside`] opened.
enum Opened {
    /// A regular file, its metadata and its real path.
    File(std::fs::File, Box<std::fs::Metadata>, PathBuf),
    /// A folder.
    Folder,
}

/// Opens `path` if what it names, once opened, is a regular file or a
/// folder whose real path is inside `root` (canonical) with no component
/// below `root` starting with `.`; `None` otherwise. The checks are made on
/// what was opened (its file descriptor, through `/proc/self/fd`), not on
/// the name before opening: a name swapped for a symbolic link between a
/// check and the open cannot lead out of the folder or to a dot file. The
/// open does not block (`O_NONBLOCK`): a FIFO would wait for a writer.
fn open_inside(root: &Path, path: &Path) -> Option<Opened> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .ok()?;
    let real = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).ok()?;
    let inside = real.strip_prefix(root).ok()?;
    if inside
        .components()
        .any(|c| c.as_os_str().as_encoded_bytes().starts_with(b"."))
    {
        return None;
    }
    let meta = file.metadata().ok()?;
    if meta.is_dir() {
        Some(Opened::Folder)
    } else if meta.is_file() {
        Some(Opened::File(file, Box::new(meta), real))
    } else {
        None
    }
}

/// Whether the request's validators match (RFC 9110 sections 13.1.2 and
/// 13.1.3): `If-None-Match` lists the entity tag (weak comparison) or is
/// `*`; without `If-None-Match`, `If-Modified-Since` is not before the
/// modification time (in whole seconds, as HTTP dates are).
fn not_modified<B>(req: &Request<B>, v: &Validators) -> bool {
    let h = req.headers();
    if h.contains_key(header::IF_NONE_MATCH) {
        let ours = v.etag.trim_start_matches("W/");
        return h.get_all(header::IF_NONE_MATCH).iter().any(|value| {
            value.to_str().is_ok_and(|list| {
                list.split(',')
                    .map(str::trim)
                    .any(|tag| tag == "*" || tag.trim_start_matches("W/") == ours)
            })
        });
    }
    let (Some(modified), Some(since)) = (
        v.modified.filter(|m| http_date_range(*m)),
        h.get(header::IF_MODIFIED_SINCE),
    ) else {
        return false;
    };
    let Some(since) = since
        .to_str()
        .ok()
        .and_then(|s| httpdate::parse_http_date(s).ok())
    else {
        return false;
    };
    let secs = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    };
    secs(modified) <= secs(since)
}

/// Whether `t` can be written as an HTTP date (`httpdate` panics outside
/// the years 1970 to 9999; a file's time can be anything).
fn http_date_range(t: SystemTime) -> bool {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .is_ok_and(|d| d.as_secs() < 253_402_300_800)
}

/// The `Content-Type` of a file named `name`.
fn content_type(name: &str) -> HeaderValue {
    let mime = mime_guess::from_path(name).first_or_octet_stream();
    let text = mime.type_() == mime_guess::mime::TEXT
        || matches!(
            mime.subtype().as_str(),
            "javascript" | "json" | "xml" | "svg"
        );
    let value = if text && mime.get_param("charset").is_none() {
        format!("{mime}; charset=utf-8")
    } else {
        mime.to_string()
    };
    HeaderValue::from_str(&value)
        .unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"))
}

/// 404, with a short text body.
fn not_found() -> Response<Body> {
    plain(StatusCode::NOT_FOUND, "not found\n")
}

/// A response with `status` and the text `body`.
fn plain(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut resp = Response::new(full(Full::new(Bytes::from_static(body.as_bytes()))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_that_climb_hide_or_smuggle_separators_are_refused() {
        for bad in [
            "..",
            "a/../b",
            "%2e%2e/x",
            "%2E%2e",
            "a%2fb",
            "a%5cb",
            "..%5c..",
            ".env",
            ".git/config",
            "a//b",
            "a%00b",
            "%ff",
        ] {
            assert_eq!(decode(bad), None, "{bad}");
        }
        assert_eq!(
            decode("css/site%20main.css"),
            Some(vec!["css".into(), "site main.css".into()])
        );
        assert_eq!(decode("docs/"), Some(vec!["docs".into()]));
        assert_eq!(decode(""), Some(vec![]));
    }

    #[test]
    fn text_types_carry_utf_8_and_unknown_ones_are_octet_streams() {
        assert_eq!(content_type("index.html"), "text/html; charset=utf-8");
        assert_eq!(content_type("app.js"), "text/javascript; charset=utf-8");
        assert_eq!(content_type("logo.png"), "image/png");
        assert_eq!(content_type("blob.zzz"), "application/octet-stream");
    }
}
