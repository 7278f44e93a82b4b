//! The pages wasmgate serves, in a real browser: headless Chromium
//! (Debian's `chromium`) driven by playwright-core (`tests/browser/`, set
//! up by `./dev test`) against a running gateway. Screenshots are kept in
//! `target/browser/` (a CI artifact).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::*;

/// The repository's root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_owned()
}

/// Where screenshots go: `target/browser/`.
fn artifacts() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    let dir = target.join("browser");
    std::fs::create_dir_all(&dir).expect("create target/browser");
    dir
}

/// Runs the browser script `script` (in `tests/browser/`) with `args`; its
/// standard output, parsed as JSON. Fails with what to install when the
/// browser or playwright-core is missing.
fn run_script(script: &str, args: &[&str]) -> serde_json::Value {
    let dir = root().join("tests/browser");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists() && dir.join("node_modules/playwright-core").exists(),
        "the browser tests need Debian's chromium ({chromium}) and tests/browser's \
         playwright-core: `./dev test` installs both (apt-get install chromium; \
         npm ci --prefix tests/browser)"
    );
    let out = Command::new("node")
        .arg(dir.join(script))
        .args(args)
        .output()
        .expect("run node");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{script} failed:\n{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{script}: not JSON ({e}): {stdout}\n{stderr}"))
}

/// Whether `file` is a PNG image of some size.
fn is_png(file: &Path) -> bool {
    std::fs::read(file).is_ok_and(|b| b.len() > 1_000 && b.starts_with(b"\x89PNG\r\n\x1a\n"))
}

fn texts(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn two_browser_pages_chat_through_the_demo_page_of_the_default_config() {
    let gw = Gateway::spawn(&["serve", "--listen", "127.0.0.1:0"]);
    let out = artifacts();
    let _ = std::fs::remove_file(out.join("demo-chat-ana.png"));
    let _ = std::fs::remove_file(out.join("demo-chat-bob.png"));
    let url = format!("http://{}/", gw.addr);
    let seen = run_script("demo-chat.mjs", &[&url, out.to_str().expect("utf-8")]);
    let ana = texts(&seen["ana"]);
    let bob = texts(&seen["bob"]);
    // Each sees the other's message, and their own as sent.
    for (lines, wanted) in [
        (&ana, "ana: hello from ana"),
        (&ana, "bob: hi ana, bob here"),
        (&ana, "bob joined"),
        (&bob, "ana: hello from ana"),
        (&bob, "bob: hi ana, bob here"),
    ] {
        assert!(
            lines.iter().any(|l| l == wanted),
            "no {wanted:?} in {lines:?}"
        );
    }
    assert!(
        bob.iter()
            .any(|l| l.starts_with("welcome to browser-") && l.ends_with("(2 here)")),
        "{bob:?}"
    );
    assert!(
        seen["status"]
            .as_str()
            .is_some_and(|s| s.contains("as bob")),
        "{seen}"
    );
    assert!(
        is_png(&out.join("demo-chat-ana.png")),
        "no screenshot of ana's page"
    );
    assert!(
        is_png(&out.join("demo-chat-bob.png")),
        "no screenshot of bob's page"
    );
    // The gateway saw both connections on /chat.
    gw.wait_log("route=/chat");
}

#[tokio::test]
async fn the_admin_page_shows_routes_live_connections_and_a_failed_reload() {
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n[[route]]\npath = \"/echo\"\nplugin = \"{}\"\n\n\
         [[route]]\npath = \"/room\"\nplugin = \"{}\"\nisolation = \"shared\"\non_reload = \"migrate\"\n",
        plugin("echo"),
        plugin("chat")
    );
    let gw = Gateway::start("browser-admin", &config);
    gw.wait_log("admin listening on");
    // Two live connections, some traffic.
    let mut a = connect(&gw.url("/echo")).await;
    let _b = connect(&gw.url("/room?room=r&name=x")).await;
    for i in 0..100 {
        send(&mut a, &format!("m{i}")).await;
        next_text(&mut a).await;
    }
    // A config edit that does not load: the page lists why.
    let file = gw
        .log()
        .lines()
        .find_map(|l| l.split("config=").nth(1).map(|f| f.trim().to_owned()));
    let file = file.expect("the config file in the listening line");
    std::fs::write(&file, format!("{config}\n[[route]]\npath = \"/bad\"\n")).expect("write");
    gw.wait_log("config reload: the old config keeps serving");

    let out = artifacts();
    let _ = std::fs::remove_file(out.join("admin-page.png"));
    let url = format!("http://127.0.0.1:{admin}/");
    let seen = tokio::task::spawn_blocking(move || {
        run_script("admin-page.mjs", &[&url, out.to_str().expect("utf-8"), "2"])
    })
    .await
    .expect("the script ran");
    let rows: Vec<Vec<String>> = seen["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(texts)
        .collect();
    let echo = rows
        .iter()
        .find(|r| r.get(1).is_some_and(|p| p == "/echo"))
        .expect("an /echo row");
    let room = rows
        .iter()
        .find(|r| r.get(1).is_some_and(|p| p == "/room"))
        .expect("a /room row");
    // tenant, path, plugin, version, hash, isolation, on reload, connections, instances.
    assert_eq!(echo[0], "default");
    assert!(echo[2].ends_with("echo.wasm"), "{echo:?}");
    assert_eq!(echo[3], "1");
    assert_eq!(echo[4].len(), 12, "a short hash: {echo:?}");
    assert_eq!((echo[5].as_str(), echo[6].as_str()), ("connection", "keep"));
    assert_eq!((echo[7].as_str(), echo[8].as_str()), ("1", "1"));
    assert_eq!((room[5].as_str(), room[6].as_str()), ("shared", "migrate"));
    assert_eq!(room[7], "1");
    assert!(
        seen["summary"]
            .as_str()
            .is_some_and(|s| s.starts_with("2 connections open, 2 routes")),
        "{seen}"
    );
    assert!(
        seen["status"]
            .as_str()
            .is_some_and(|s| s.starts_with("live")),
        "{seen}"
    );
    let errors = texts(&seen["errors"]);
    assert!(
        errors
            .iter()
            .any(|e| e.contains("config: ") && e.contains("gateway.toml:") && e.contains("plugin")),
        "{errors:?}"
    );
    assert!(
        is_png(&artifacts().join("admin-page.png")),
        "no screenshot of the admin page"
    );
}
