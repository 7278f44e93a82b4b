//! `wasmgate new NAME --lang LANG` makes a project that builds with its own
//! `build.sh` and serves with its own `gateway.toml`, in every language, as
//! the README's first-plugin loop says.

use std::process::Command;

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

/// Creates project `hello-LANG` with the binary under test, builds it,
/// serves it with its own config and checks that it echoes.
async fn new_builds_and_serves(lang: &str) {
    let dir = scratch(&format!("new-{lang}"));
    let name = format!("hello-{lang}");
    let made = Command::new(env!("CARGO_BIN_EXE_wasmgate"))
        .args(["new", &name, "--lang", lang])
        .current_dir(&dir)
        .output()
        .expect("run wasmgate new");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let project = dir.join(&name);
    // The build runs in a thread: it takes seconds to minutes (a first
    // toolchain install), and must not hold up the async runtime. The JS
    // and Python toolchains are the ones this checkout's plugin builds
    // installed (WASMGATE_TOOLCHAINS): installing them again per project
    // would cost 400 MB and a minute each, and the install itself is
    // exercised by those builds.
    let build_dir = project.clone();
    let toolchains = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/toolchains");
    let built = tokio::task::spawn_blocking(move || {
        Command::new("./build.sh")
            .current_dir(&build_dir)
            .env_remove("CARGO_TARGET_DIR")
            .env("WASMGATE_TOOLCHAINS", toolchains)
            .output()
            .expect("run build.sh")
    })
    .await
    .expect("build thread");
    assert!(
        built.status.success(),
        "{lang}: ./build.sh failed:\n{}\n{}",
        String::from_utf8_lossy(&built.stdout),
        String::from_utf8_lossy(&built.stderr)
    );
    assert!(project.join(format!("{name}.wasm")).is_file());
    let config = project.join("gateway.toml");
    let gw = Gateway::spawn(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--config",
        config.to_str().expect("utf-8 path"),
    ]);
    let mut ws = connect(&gw.url(&format!("/{name}"))).await;
    for text in ["hello", "✓ again"] {
        ws.send(Message::text(text)).await.expect("send");
        assert_eq!(next_text(&mut ws).await, text, "{lang}");
    }
}

#[tokio::test]
async fn new_rust_project_builds_and_serves_an_echo() {
    new_builds_and_serves("rust").await;
}

#[tokio::test]
async fn new_js_project_builds_and_serves_an_echo() {
    new_builds_and_serves("js").await;
}

#[tokio::test]
async fn new_python_project_builds_and_serves_an_echo() {
    new_builds_and_serves("python").await;
}

#[tokio::test]
async fn new_c_project_builds_and_serves_an_echo() {
    new_builds_and_serves("c").await;
}

#[tokio::test]
async fn new_refuses_a_bad_name_and_an_existing_folder() {
    let dir = scratch("new-refusals");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_wasmgate"))
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("run wasmgate new")
    };
    let bad = run(&["new", "../escape", "--lang", "c"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("a project name is"));
    assert!(run(&["new", "twice", "--lang", "c"]).status.success());
    let again = run(&["new", "twice", "--lang", "rust"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
}
