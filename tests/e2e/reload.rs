//! Hot reload: a plugin file replaced on disk (written in place, renamed over,
//! or swapped through a symlink) serves new connections while open ones
//! stay on the version they have (`on_reload = "keep"`); a broken file keeps
//! the old version serving; the config file is reloaded as a whole or not at
//! all; SIGHUP reloads on demand, with or without watching.
//!
//! The two plugins told apart: `echo` answers `id` with `id`, `testkit`
//! answers it with `ok <n>`.

use std::path::Path;
use std::time::Duration;

use crate::support::*;

/// `plugin.wasm` (a copy of `echo`) served at `/p` (plus `extra` lines).
fn start(name: &str, extra: &str, args: &[&str]) -> (Gateway, Scratch) {
    let config = format!("[[route]]\npath = \"/p\"\nplugin = \"plugin.wasm\"\n{extra}");
    serve_copy(name, &plugin("echo"), &config, args)
}

/// What the connection answers to `id`: `"id"` from echo, `"ok <n>"` from
/// testkit.
async fn answer(ws: &mut Ws) -> String {
    command(ws, "id").await
}

/// Whether `ws` is served by testkit (the new version).
async fn is_testkit(ws: &mut Ws) -> bool {
    answer(ws).await.starts_with("ok ")
}

/// Waits until a new connection to `/p` is served by testkit.
async fn wait_new_version(gw: &Gateway) {
    let start = std::time::Instant::now();
    loop {
        let mut ws = connect(&gw.url("/p")).await;
        if is_testkit(&mut ws).await {
            return;
        }
        assert!(
            start.elapsed() < WAIT,
            "the new version never served:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn count(log: &str, text: &str) -> usize {
    log.lines().filter(|l| l.contains(text)).count()
}

async fn keep_mode_swap(name: &str, deploy: impl FnOnce(&Path)) {
    let (gw, dir) = start(name, "", &[]);
    gw.wait_log("now serving");
    let mut old = connect(&gw.url("/p")).await;
    assert_eq!(answer(&mut old).await, "id");
    deploy(&dir);
    wait_new_version(&gw).await;
    let line = gw.wait_log("(version 2,");
    assert!(
        line.contains("route /p") && line.contains("sha256:"),
        "{line}"
    );
    // The connection opened before the swap still runs the old version.
    assert_eq!(answer(&mut old).await, "id");
}

#[tokio::test]
async fn a_plugin_written_in_place_serves_new_connections_and_old_ones_keep_theirs() {
    keep_mode_swap("reload-inplace", |dir| {
        let bytes = std::fs::read(plugin("testkit")).expect("testkit");
        std::fs::write(dir.join("plugin.wasm"), bytes).expect("write in place");
    })
    .await;
}

#[tokio::test]
async fn a_plugin_renamed_over_the_old_file_is_picked_up() {
    keep_mode_swap("reload-rename", |dir| {
        std::fs::copy(plugin("testkit"), dir.join(".plugin.wasm.tmp")).expect("copy");
        std::fs::rename(dir.join(".plugin.wasm.tmp"), dir.join("plugin.wasm")).expect("rename");
    })
    .await;
}

#[cfg(unix)]
#[tokio::test]
async fn a_swapped_symlink_is_picked_up() {
    let (gw, dir) = start("reload-symlink", "", &[]);
    // Serve through a symlink: plugin.wasm -> v1/echo.wasm.
    std::fs::create_dir_all(dir.join("v1")).expect("v1");
    std::fs::create_dir_all(dir.join("v2")).expect("v2");
    std::fs::rename(dir.join("plugin.wasm"), dir.join("v1/plugin.wasm")).expect("move");
    std::os::unix::fs::symlink("v1/plugin.wasm", dir.join("plugin.wasm")).expect("symlink");
    gw.wait_log("now serving");
    let mut old = connect(&gw.url("/p")).await;
    assert_eq!(answer(&mut old).await, "id");
    std::fs::copy(plugin("testkit"), dir.join("v2/plugin.wasm")).expect("v2");
    std::os::unix::fs::symlink("v2/plugin.wasm", dir.join("next")).expect("next");
    std::fs::rename(dir.join("next"), dir.join("plugin.wasm")).expect("swap");
    wait_new_version(&gw).await;
    assert_eq!(answer(&mut old).await, "id");
}

#[tokio::test]
async fn broken_deleted_or_exportless_files_keep_the_old_version_serving() {
    let (gw, dir) = start("reload-broken", "", &[]);
    gw.wait_log("now serving");
    let file = dir.join("plugin.wasm");
    let cases: [(&str, &[u8], &str); 3] = [
        (
            "corrupt",
            b"\0asm\x0d\0\x01\0garbage",
            "not a valid component",
        ),
        ("empty", b"", "not a WebAssembly file"),
        ("no export", b"\0asm\x0d\0\x01\0", "wasmgate:plugin/handler"),
    ];
    for (i, (what, bytes, reason)) in cases.iter().enumerate() {
        std::fs::write(&file, bytes).expect("write");
        let start = std::time::Instant::now();
        while count(&gw.log(), "keeps serving") <= i {
            assert!(
                start.elapsed() < WAIT,
                "{what}: no reload error:\n{}",
                gw.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let line = gw
            .log()
            .lines()
            .filter(|l| l.contains("keeps serving"))
            .nth(i)
            .map(str::to_owned)
            .unwrap_or_default();
        assert!(
            line.contains("route /p") && line.contains("plugin.wasm") && line.contains(reason),
            "{what}: {line}"
        );
        let mut ws = connect(&gw.url("/p")).await;
        assert_eq!(answer(&mut ws).await, "id", "{what}: old version serves");
    }
    // A component that traps whenever it is instantiated is refused at
    // load, not deployed to answer every connection with an error.
    std::fs::copy(
        format!(
            "{}/../tests/fixtures/trap-at-start.wasm",
            env!("CARGO_MANIFEST_DIR")
        ),
        &file,
    )
    .expect("copy");
    let line = gw.wait_log("fails when instantiated");
    assert!(
        line.contains("route /p") && line.contains("keeps serving"),
        "{line}"
    );
    let mut ws = connect(&gw.url("/p")).await;
    assert_eq!(
        answer(&mut ws).await,
        "id",
        "start trap: old version serves"
    );
    std::fs::remove_file(&file).expect("delete");
    gw.wait_log("file was deleted");
    let mut ws = connect(&gw.url("/p")).await;
    assert_eq!(answer(&mut ws).await, "id", "deleted: old version serves");
    // A good file afterwards is loaded.
    std::fs::copy(plugin("testkit"), &file).expect("copy");
    wait_new_version(&gw).await;
}

#[tokio::test]
async fn a_burst_of_writes_gives_few_reloads_and_the_last_content_wins() {
    let (gw, dir) = start("reload-burst", "", &[]);
    gw.wait_log("now serving");
    let echo = std::fs::read(plugin("echo")).expect("echo");
    let testkit = std::fs::read(plugin("testkit")).expect("testkit");
    for i in 0..50 {
        let bytes = if i == 49 { &testkit } else { &echo };
        std::fs::write(dir.join("plugin.wasm"), bytes).expect("write");
        std::thread::sleep(Duration::from_millis(2));
    }
    wait_new_version(&gw).await;
    // Let any straggling change settle, then count.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let loads = count(&gw.log(), "now serving");
    assert!((2..=4).contains(&loads), "{loads} loads:\n{}", gw.log());
}

#[tokio::test]
async fn touching_a_plugin_does_not_reload_it() {
    let (gw, dir) = start("reload-touch", "", &[]);
    gw.wait_log("now serving");
    let file = dir.join("plugin.wasm");
    let bytes = std::fs::read(&file).expect("read");
    std::fs::write(&file, bytes).expect("rewrite the same bytes");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(count(&gw.log(), "now serving"), 1, "{}", gw.log());
}

#[tokio::test]
async fn with_no_watch_only_sighup_reloads() {
    let (gw, dir) = start("reload-hup", "", &["--no-watch"]);
    gw.wait_log("now serving");
    std::fs::copy(plugin("testkit"), dir.join("plugin.wasm")).expect("copy");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let mut ws = connect(&gw.url("/p")).await;
    assert_eq!(answer(&mut ws).await, "id", "not watched");
    gw.signal("HUP");
    wait_new_version(&gw).await;
}

#[tokio::test]
async fn config_reload_adds_and_removes_routes_and_changes_limits_for_new_connections() {
    let (gw, dir) = start("reload-config", "max_message_size = \"64KiB\"\n", &[]);
    gw.wait_log("now serving");
    let config = dir.join("gateway.toml");
    let mut removed = connect(&gw.url("/p")).await;
    assert_eq!(answer(&mut removed).await, "id");

    // Add /q, remove /p.
    std::fs::write(
        &config,
        format!(
            "[[route]]\npath = \"/q\"\nplugin = \"{}\"\nmax_message_size = \"100B\"\n",
            plugin("echo")
        ),
    )
    .expect("write config");
    gw.wait_log("config reloaded");
    assert_eq!(expect_close(&mut removed, 1001).await, "route removed");
    let reply = http(gw.addr, &upgrade_request("/p", "")).await;
    assert_eq!(reply.status, 404, "removed route");
    let mut q = connect(&gw.url("/q")).await;
    assert_eq!(answer(&mut q).await, "id");
    // The new limit applies: a message over 100 B gets 1009.
    send(&mut q, &"x".repeat(200)).await;
    expect_close(&mut q, 1009).await;

    // A broken config is kept out, naming file, line and key.
    std::fs::write(
        &config,
        "[[route]]\npath = \"/q\"\nplugin = \"x.wasm\"\nmax_mesage_size = 5\n",
    )
    .expect("write bad config");
    let line = gw.wait_log("max_mesage_size");
    assert!(line.contains("gateway.toml:4"), "{line}");
    let mut q = connect(&gw.url("/q")).await;
    assert_eq!(answer(&mut q).await, "id", "old config still serves");
}

#[tokio::test]
async fn a_restart_loads_a_plugin_seen_before_from_the_compile_cache() {
    let cache = scratch("reload-cache-dir");
    // Only a cache others cannot write is used, whatever the umask.
    #[cfg(unix)]
    std::fs::set_permissions(&cache, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .expect("chmod");
    let cache_arg = format!("--cache-dir={}", cache.display());
    let (gw, _dir) = start("reload-cache-1", "", &[&cache_arg]);
    let first = gw.wait_log("now serving");
    assert!(first.contains("compiled"), "{first}");
    drop(gw);
    let (gw, _dir) = start("reload-cache-2", "", &[&cache_arg]);
    let second = gw.wait_log("now serving");
    assert!(second.contains("from cache"), "{second}");
    let mut ws = connect(&gw.url("/p")).await;
    assert_eq!(answer(&mut ws).await, "id");
}

/// A gateway serving `plugin.wasm` (a copy of `first`) at `/m` with
/// `on_reload = "migrate"`, watching its files.
fn start_migrate(name: &str, first: &str) -> (Gateway, Scratch) {
    let config = "[[route]]\npath = \"/m\"\nplugin = \"plugin.wasm\"\non_reload = \"migrate\"\n";
    let (gw, dir) = serve_copy(name, first, config, &[]);
    gw.wait_log("hot reload: watching");
    (gw, dir)
}

#[tokio::test]
async fn a_plugin_built_against_wit_0_1_0_still_loads_and_works() {
    let gw = Gateway::start(
        "reload-fixture",
        &format!(
            "[[route]]\npath = \"/old\"\nplugin = \"{}\"\n",
            fixture_0_1_0()
        ),
    );
    let mut a = connect(&gw.url("/old")).await;
    let mut b = connect(&gw.url("/old")).await;
    let b_id = conn_id(&mut b).await;
    assert_eq!(command(&mut a, "echo hi").await, "ok hi");
    assert_eq!(command(&mut a, "join r").await, "ok joined");
    assert_eq!(command(&mut b, "join r").await, "ok joined");
    assert_eq!(command(&mut a, "broadcast r hello").await, "ok 1");
    assert_eq!(next_text(&mut b).await, "hello");
    assert_eq!(command(&mut a, "meta-set k v").await, "ok set");
    assert_eq!(command(&mut b, &format!("send {b_id} self")).await, "self");
    assert!(command(&mut a, "timer 10").await.starts_with("ok "));
    assert!(next_text(&mut a).await.starts_with("timer "));
    // It has no `resume` export: the command is unknown to it.
    assert!(command(&mut a, "resumed")
        .await
        .starts_with("err invalid-argument"));
}

#[tokio::test]
async fn under_migrate_open_connections_move_to_the_new_version_keeping_rooms_and_metadata() {
    let (gw, dir) = start_migrate("reload-migrate", &fixture_0_1_0());
    let mut a = connect(&gw.url("/m")).await;
    let mut b = connect(&gw.url("/m")).await;
    let a_id = conn_id(&mut a).await;
    assert_eq!(command(&mut a, "meta-set k v").await, "ok set");
    assert_eq!(command(&mut a, "join r").await, "ok joined");
    assert_eq!(command(&mut b, "join r").await, "ok joined");
    // The old version does not know `resumed`.
    assert!(command(&mut a, "resumed").await.starts_with("err "));

    std::fs::copy(plugin("testkit"), dir.join("plugin.wasm")).expect("deploy");
    gw.wait_log("(version 2,");
    // The next event runs on the new version, after on-resume.
    assert_eq!(command(&mut a, "resumed").await, "ok 1");
    gw.wait_log(&format!("on-resume {a_id}"));
    assert_eq!(command(&mut a, &format!("meta-get {a_id} k")).await, "ok v");
    assert_eq!(command(&mut a, "size r").await, "ok 2");
    assert_eq!(command(&mut b, "broadcast r after").await, "ok 1");
    assert_eq!(next_text(&mut a).await, "after");
    assert_eq!(conn_id(&mut a).await, a_id, "same connection id");
}

#[tokio::test]
async fn a_client_streaming_through_a_migration_gets_every_reply_in_order() {
    let (gw, dir) = start_migrate("reload-stream", &plugin("testkit"));
    let mut ws = connect(&gw.url("/m")).await;
    let echo = std::fs::read(plugin("echo")).expect("echo");
    let testkit = std::fs::read(plugin("testkit")).expect("testkit");
    let writer = std::thread::spawn(move || {
        // Swap the plugin back and forth while the client streams: echo
        // answers `echo N` with `echo N`, testkit with `ok N`.
        for i in 0..6 {
            std::thread::sleep(Duration::from_millis(150));
            let bytes = if i % 2 == 0 { &echo } else { &testkit };
            std::fs::write(dir.join("plugin.wasm"), bytes).expect("deploy");
        }
    });
    let total = 2000;
    let (mut tx, mut rx) = futures_util::StreamExt::split(ws);
    let sender = tokio::spawn(async move {
        for i in 0..total {
            futures_util::SinkExt::send(
                &mut tx,
                tokio_tungstenite::tungstenite::Message::text(format!("echo {i}")),
            )
            .await
            .expect("send");
            // About 1.2 s of stream: long enough to cross every swap.
            if i % 10 == 0 {
                tokio::time::sleep(Duration::from_millis(6)).await;
            }
        }
        tx
    });
    for i in 0..total {
        let msg = tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut rx))
            .await
            .expect("reply in time")
            .expect("open")
            .expect("read");
        let text = msg.to_text().expect("text").to_owned();
        let n = text
            .strip_prefix("ok ")
            .or_else(|| text.strip_prefix("echo "))
            .unwrap_or_else(|| panic!("unexpected reply {text:?}"));
        assert_eq!(n, i.to_string(), "reply {i} lost or out of order");
    }
    writer.join().expect("writer");
    ws = rx.reunite(sender.await.expect("sender")).expect("reunite");
    drop(ws);
    assert!(
        gw.log().matches("connection migrated").count() >= 2,
        "the stream crossed migrations:\n{}",
        gw.log()
    );
}

#[tokio::test]
async fn a_streamed_message_is_never_split_across_a_migration() {
    let (gw, dir) = serve_copy(
        "reload-fragments",
        &fixture_0_1_0(),
        "[[route]]\npath = \"/f\"\nplugin = \"plugin.wasm\"\non_reload = \"migrate\"\ndeliver = \"fragments\"\n",
        &[],
    );
    gw.wait_log("hot reload: watching");
    let mut raw = Raw::connect(gw.addr, "/f").await;
    // First fragment on version 1, then the deploy, then the rest.
    raw.send_frame(0x01, b"aaaa", true).await;
    std::fs::copy(plugin("testkit"), dir.join("plugin.wasm")).expect("deploy");
    gw.wait_log("(version 2,");
    raw.send_frame(0x00, b"bbbb", true).await;
    raw.send_frame(0x80, b"cc", true).await;
    let (_, reply) = raw.read_frame().await.expect("reply");
    assert_eq!(
        String::from_utf8_lossy(&reply),
        "fragments text 3 bytes 10",
        "the whole message reached one instance"
    );
    // The next message starts on the new version.
    raw.send_frame(0x81, b"resumed", true).await;
    let (_, reply) = raw.read_frame().await.expect("reply");
    assert_eq!(String::from_utf8_lossy(&reply), "fragments text 1 bytes 7");
    gw.wait_log("on-resume ");
}

#[tokio::test]
async fn a_config_edit_that_changes_no_route_leaves_migrating_connections_on_their_instance() {
    let config = format!(
        "[[route]]\npath = \"/t\"\nplugin = \"{}\"\non_reload = \"migrate\"\n",
        plugin("testkit")
    );
    let (gw, dir) = serve_copy("reload-noop-edit", &plugin("testkit"), &config, &[]);
    let mut ws = connect(&gw.url("/t")).await;
    for n in 1..=3 {
        assert_eq!(command(&mut ws, "hits").await, format!("ok {n}"));
    }
    // A comment, and a tenant that has nothing to do with this route.
    std::fs::write(
        dir.join("gateway.toml"),
        format!(
            "# edited\n{config}\n[[tenant]]\nname = \"other\"\nhosts = [\"other.test\"]\n\n\
             [[tenant.route]]\npath = \"/t\"\nplugin = \"builtin:echo\"\n"
        ),
    )
    .expect("write config");
    gw.wait_log("config reloaded");
    // Guest memory kept: no migration, no on-resume.
    assert_eq!(command(&mut ws, "hits").await, "ok 4");
    assert_eq!(command(&mut ws, "resumed").await, "ok 0");
}
