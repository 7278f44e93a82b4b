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
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{script}: not JSON ({e}): {stdout}\n{stderr}"))
}

/// Whether `file` is a PNG image of some size.
fn is_png(file: &Path) -> bool {
    std::fs::read(file).is_ok_and(|b| b.len() > 1_000 && b.starts_with(b"\x89PNG\r\n\x1a\n"))
}

fn texts(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect())
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
        assert!(lines.iter().any(|l| l == wanted), "no {wanted:?} in {lines:?}");
    }
    assert!(
        bob.iter().any(|l| l.starts_with("welcome to browser-") && l.ends_with("(2 here)")),
        "{bob:?}"
    );
    assert!(
        seen["status"].as_str().is_some_and(|s| s.contains("as bob")),
        "{seen}"
    );
    assert!(is_png(&out.join("demo-chat-ana.png")), "no screenshot of ana's page");
    assert!(is_png(&out.join("demo-chat-bob.png")), "no screenshot of bob's page");
    // The gateway saw both connections on /chat.
    gw.wait_log("route=/chat");
}
