//! Static files (`[[static]]`): served over plain HTTP next to the
//! WebSocket routes, with content types and validators, and nothing outside
//! the mounted folder reachable however the path is written.

use std::path::Path;

use futures_util::SinkExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

/// One HTTP/1.1 request sent verbatim (the target is not normalized):
/// the status, the headers (lower-case names) and the body.
async fn request(gw: &Gateway, head: &str) -> (u16, Vec<(String, String)>, String) {
    let mut s = TcpStream::connect(gw.addr).await.expect("connect");
    s.write_all(head.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut raw))
        .await
        .expect("answer in time")
        .expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

/// `METHOD target` with `extra` header lines, closing after the answer.
async fn get(
    gw: &Gateway,
    method: &str,
    target: &str,
    extra: &str,
) -> (u16, Vec<(String, String)>, String) {
    request(
        gw,
        &format!(
            "{method} {target} HTTP/1.1\r\nHost: localhost\r\n{extra}Connection: close\r\n\r\n"
        ),
    )
    .await
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// A site folder: index.html, css/site.css, app.js, blob.bin, a dot file
/// and a link to a file outside it; and that outside file, `secret.txt`.
fn site(dir: &Path) {
    let public = dir.join("public");
    std::fs::create_dir_all(public.join("css")).expect("mkdir");
    std::fs::create_dir_all(public.join("docs")).expect("mkdir");
    std::fs::write(public.join("index.html"), "<h1>home</h1>").expect("write");
    std::fs::write(public.join("docs/index.html"), "<h1>docs</h1>").expect("write");
    std::fs::write(public.join("css/site.css"), "body{}").expect("write");
    std::fs::write(public.join("app.js"), "let a = 1;").expect("write");
    std::fs::write(public.join("blob.bin"), [0u8, 1, 2, 3]).expect("write");
    std::fs::write(public.join(".env"), "TOKEN=hidden").expect("write");
    std::fs::write(dir.join("secret.txt"), "TOP SECRET").expect("write");
    std::os::unix::fs::symlink(dir.join("secret.txt"), public.join("link-out")).expect("symlink");
    // Links inside the folder to a dot file or folder.
    std::os::unix::fs::symlink(".env", public.join("env-link.txt")).expect("symlink");
    std::fs::create_dir_all(public.join(".git")).expect("mkdir");
    std::fs::write(public.join(".git/config"), "TOKEN=git").expect("write");
    std::os::unix::fs::symlink(".git", public.join("git-link")).expect("symlink");
    let fifo = std::process::Command::new("mkfifo")
        .arg(public.join("pipe"))
        .status()
        .expect("mkfifo");
    assert!(fifo.success());
}

/// A gateway serving `site` at `/` and the echo plugin at `/echo`, and
/// the site's scratch folder (removed when dropped, after the gateway).
fn start_site(name: &str) -> (Gateway, Scratch) {
    let dir = scratch(&format!("{name}-site"));
    site(&dir);
    let gw = Gateway::start(
        name,
        &format!(
            "[[static]]\npath = \"/\"\ndir = \"{}\"\n\n[[route]]\npath = \"/echo\"\nplugin = \"builtin:echo\"\n",
            dir.join("public").display()
        ),
    );
    (gw, dir)
}

#[tokio::test]
async fn a_mount_serves_its_files_with_content_types_and_validators() {
    let (gw, _dir) = start_site("static-serve");
    let (status, h, body) = get(&gw, "GET", "/", "").await;
    assert_eq!((status, body.as_str()), (200, "<h1>home</h1>"));
    assert_eq!(header(&h, "content-type"), Some("text/html; charset=utf-8"));
    assert_eq!(header(&h, "content-length"), Some("13"));
    assert_eq!(header(&h, "x-content-type-options"), Some("nosniff"));
    for (target, ctype) in [
        ("/css/site.css", "text/css; charset=utf-8"),
        ("/app.js", "text/javascript; charset=utf-8"),
        ("/blob.bin", "application/octet-stream"),
        ("/docs/", "text/html; charset=utf-8"),
        ("/css/site%2ecss", "text/css; charset=utf-8"),
    ] {
        let (status, h, _) = get(&gw, "GET", target, "").await;
        assert_eq!(status, 200, "{target}");
        assert_eq!(header(&h, "content-type"), Some(ctype), "{target}");
    }

    // HEAD: the same headers, no body.
    let (status, h, body) = get(&gw, "HEAD", "/app.js", "").await;
    assert_eq!((status, body.as_str()), (200, ""));
    assert_eq!(header(&h, "content-length"), Some("10"));

    // Validators: a matching ETag or date answers 304.
    let (_, h, _) = get(&gw, "GET", "/app.js", "").await;
    let etag = header(&h, "etag").expect("an ETag").to_owned();
    let modified = header(&h, "last-modified")
        .expect("Last-Modified")
        .to_owned();
    let (status, h304, body) = get(
        &gw,
        "GET",
        "/app.js",
        &format!("If-None-Match: \"x\", {etag}\r\n"),
    )
    .await;
    assert_eq!((status, body.as_str()), (304, ""));
    assert_eq!(header(&h304, "etag"), Some(etag.as_str()));
    let (status, _, _) = get(
        &gw,
        "GET",
        "/app.js",
        &format!("If-None-Match: W/{etag}\r\n"),
    )
    .await;
    assert_eq!(status, 304, "weak comparison");
    let (status, _, _) = get(
        &gw,
        "GET",
        "/app.js",
        &format!("If-Modified-Since: {modified}\r\n"),
    )
    .await;
    assert_eq!(status, 304);
    let (status, _, _) = get(&gw, "GET", "/app.js", "If-None-Match: \"other\"\r\n").await;
    assert_eq!(status, 200);
    let (status, _, _) = get(
        &gw,
        "GET",
        "/app.js",
        "If-Modified-Since: Thu, 01 Jan 1998 00:00:00 GMT\r\n",
    )
    .await;
    assert_eq!(status, 200);

    // Other methods: 405 with Allow.
    let (status, h, _) = get(&gw, "POST", "/app.js", "Content-Length: 0\r\n").await;
    assert_eq!(status, 405);
    assert_eq!(header(&h, "allow"), Some("GET, HEAD"));

    // A missing file, a file named as a folder: 404.
    assert_eq!(get(&gw, "GET", "/nope.html", "").await.0, 404);
    assert_eq!(get(&gw, "GET", "/app.js/", "").await.0, 404);

    // The WebSocket route still works, and a plain GET to it is still 426.
    let mut ws = connect(&gw.url("/echo")).await;
    ws.send(Message::text("hi")).await.expect("send");
    assert_eq!(next_text(&mut ws).await, "hi");
    assert_eq!(get(&gw, "GET", "/echo", "").await.0, 426);
}

#[tokio::test]
async fn an_edited_file_is_served_at_once_with_a_new_etag() {
    let (gw, dir) = start_site("static-edit");
    let (_, h, _) = get(&gw, "GET", "/app.js", "").await;
    let etag = header(&h, "etag").expect("an ETag").to_owned();
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(dir.join("public/app.js"), "let b = 22;").expect("rewrite");
    let (status, h, body) = get(&gw, "GET", "/app.js", &format!("If-None-Match: {etag}\r\n")).await;
    assert_eq!((status, body.as_str()), (200, "let b = 22;"));
    assert_ne!(header(&h, "etag"), Some(etag.as_str()));
}

#[tokio::test]
async fn no_spelling_of_a_path_reaches_outside_the_folder_or_a_dot_file() {
    let (gw, _dir) = start_site("static-traversal");
    for target in [
        "/../secret.txt",
        "/..%2fsecret.txt",
        "/%2e%2e/secret.txt",
        "/%2E%2E/secret.txt",
        "/%2e%2e%2fsecret.txt",
        "/css/../../secret.txt",
        "/css/..%2f..%2fsecret.txt",
        "/..%5csecret.txt",
        "/%2e%2e%5csecret.txt",
        "/%252e%252e/secret.txt",
        "/.%2e/secret.txt",
        "/link-out",
        "/.env",
        "/%2eenv",
        "//secret.txt",
        "/css//site.css",
        "/%00",
        "/app.js%00.html",
        "/%c0%ae%c0%ae/secret.txt",
        // Not a regular file: opening it would wait for a writer.
        "/pipe",
        "/env-link.txt",
        "/git-link/config",
    ] {
        let (status, _, body) = get(&gw, "GET", target, "").await;
        assert!(
            status == 404 || status == 400,
            "{target}: {status} {body:?}"
        );
        assert!(
            !body.contains("SECRET") && !body.contains("TOKEN"),
            "{target}: {body:?}"
        );
    }
    // The gateway is fine afterwards.
    assert_eq!(get(&gw, "GET", "/", "").await.0, 200);
}

#[tokio::test]
async fn a_folder_named_without_its_slash_is_redirected_and_routes_win_over_mounts() {
    let dir = scratch("static-docs-site");
    site(&dir);
    let gw = Gateway::start(
        "static-docs",
        &format!(
            "[[static]]\npath = \"/site\"\ndir = \"{}\"\n\n[[route]]\npath = \"/site/echo\"\nplugin = \"builtin:echo\"\n",
            dir.join("public").display()
        ),
    );
    // The mount's own path is a folder too: redirected, query kept.
    let (status, h, _) = get(&gw, "GET", "/site?x=1", "").await;
    assert_eq!(status, 301);
    assert_eq!(header(&h, "location"), Some("/site/?x=1"));
    let (status, h, _) = get(&gw, "GET", "/site/", "").await;
    assert_eq!(status, 200);
    assert_eq!(header(&h, "content-type"), Some("text/html; charset=utf-8"));
    let (status, h, _) = get(&gw, "GET", "/site/docs", "").await;
    assert_eq!(status, 301);
    assert_eq!(header(&h, "location"), Some("/site/docs/"));
    // Another kind of upgrade (h2c) is not a WebSocket: the file is served.
    let (status, _, body) = get(
        &gw,
        "GET",
        "/site/app.js",
        "Upgrade: h2c\r\nConnection: Upgrade\r\n",
    )
    .await;
    assert_eq!((status, body.as_str()), (200, "let a = 1;"));
    let (_, _, body) = get(&gw, "GET", "/site/docs/", "").await;
    assert_eq!(body, "<h1>docs</h1>");
    // Outside the mount's prefix (a longer name is not under it): 404.
    assert_eq!(get(&gw, "GET", "/siteX/index.html", "").await.0, 404);
    assert_eq!(get(&gw, "GET", "/index.html", "").await.0, 404);
    // A route inside the mount's prefix is the route's.
    let mut ws = connect(&gw.url("/site/echo")).await;
    ws.send(Message::text("inside")).await.expect("send");
    assert_eq!(next_text(&mut ws).await, "inside");
    assert_eq!(get(&gw, "GET", "/site/echo", "").await.0, 426);
    // An upgrade to a path only a mount serves is not found.
    assert!(tokio_tungstenite::connect_async(gw.url("/site/app.js"))
        .await
        .is_err());
}

#[tokio::test]
async fn each_tenant_has_its_own_mounts() {
    let a = scratch("static-tenant-a");
    let b = scratch("static-tenant-b");
    std::fs::write(a.join("index.html"), "tenant a").expect("write");
    std::fs::write(b.join("index.html"), "default").expect("write");
    let gw = Gateway::start(
        "static-tenants",
        &format!(
            "[[static]]\npath = \"/\"\ndir = \"{}\"\n\n[[route]]\npath = \"/echo\"\nplugin = \"builtin:echo\"\n\n\
             [[tenant]]\nname = \"a\"\nhosts = [\"a.test\"]\n\n[[tenant.static]]\npath = \"/\"\ndir = \"{}\"\n\n\
             [[tenant.route]]\npath = \"/echo\"\nplugin = \"builtin:echo\"\n",
            b.display(),
            a.display()
        ),
    );
    let at = |host: &'static str| {
        let gw = &gw;
        async move {
            request(
                gw,
                &format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
            )
            .await
            .2
        }
    };
    assert_eq!(at("a.test").await, "tenant a");
    assert_eq!(at("A.TEST:8080").await, "tenant a");
    assert_eq!(at("other.test").await, "default");
}

#[tokio::test]
async fn the_default_config_serves_the_demo_chat_page_at_the_root() {
    let gw = Gateway::spawn(&["serve", "--listen", "127.0.0.1:0"]);
    let (status, h, body) = get(&gw, "GET", "/", "").await;
    assert_eq!(status, 200);
    assert_eq!(header(&h, "content-type"), Some("text/html; charset=utf-8"));
    assert!(body.contains("<title>wasmgate chat</title>"), "{body}");
    assert!(body.contains("/chat?room="), "the page talks to /chat");
    let etag = header(&h, "etag").expect("an ETag").to_owned();
    assert_eq!(
        get(&gw, "GET", "/", &format!("If-None-Match: {etag}\r\n"))
            .await
            .0,
        304
    );
}

#[tokio::test]
async fn check_names_the_line_and_reason_of_a_bad_static_table() {
    let (ok, _, err) = check_output(
        "static-check",
        "[[route]]\npath = \"/e\"\nplugin = \"builtin:echo\"\n\n\
         [[static]]\npath = \"docs\"\ndir = \".\"\n\n\
         [[static]]\npath = \"/a\"\ndir = \"missing-folder\"\n\n\
         [[static]]\npath = \"/b\"\ndir = \"builtin:nope\"\n\n\
         [[static]]\npath = \"/c/../d\"\ndir = \".\"\nroot = 1\n\n\
         [[static]]\npath = \"/\"\ndir = \".\"\n\n\
         [[static]]\npath = \"/\"\ndir = \".\"\n\n\
         [[static]]\npath = \"/x y\"\ndir = \".\"\n",
        &[],
    );
    assert!(!ok);
    // A key with a bad value is not also reported missing.
    assert!(!err.contains("path: missing"), "{err}");
    for wanted in [
        "gateway.toml:6: path: \"docs\": must start with '/'",
        "gateway.toml:11: dir: ",
        "missing-folder: No such file or directory",
        "gateway.toml:15: dir: no built-in folder \"builtin:nope\"",
        "gateway.toml:18: path: \"/c/../d\": has an empty, '.' or '..' segment",
        "gateway.toml:20: root: unknown key in [[static]]",
        "gateway.toml:27: path: \"/\" is already served by the [[static]] at line 22",
        "gateway.toml:31: path: \"/x y\": must be a plain ASCII path prefix",
    ] {
        assert!(err.contains(wanted), "no {wanted:?} in\n{err}");
    }
}

#[tokio::test]
async fn a_file_dated_before_1970_is_served_without_last_modified() {
    let (gw, dir) = start_site("static-old");
    let old = dir.join("public/old.txt");
    std::fs::write(&old, "old").expect("write");
    let touched = std::process::Command::new("touch")
        .args(["-d", "1960-01-01"])
        .arg(&old)
        .status()
        .expect("touch");
    assert!(touched.success());
    let (status, h, body) = get(
        &gw,
        "GET",
        "/old.txt",
        "If-Modified-Since: Thu, 01 Jan 1998 00:00:00 GMT\r\n",
    )
    .await;
    assert_eq!((status, body.as_str()), (200, "old"));
    assert_eq!(header(&h, "last-modified"), None);
    assert!(header(&h, "etag").is_some());
}

#[tokio::test]
async fn a_config_with_only_static_mounts_serves_them() {
    let dir = scratch("static-only-site");
    std::fs::write(dir.join("index.html"), "only static").expect("write");
    let gw = Gateway::start(
        "static-only",
        &format!("[[static]]\npath = \"/\"\ndir = \"{}\"\n", dir.display()),
    );
    assert_eq!(get(&gw, "GET", "/", "").await.2, "only static");
}
