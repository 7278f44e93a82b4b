//! The admin listener (`[admin] listen`): health, readiness and Prometheus
//! metrics, over real sockets, after real traffic on the public port.

use futures_util::SinkExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

/// A free loopback port (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `GET path` on `port`: the status code and the whole response.
async fn get(port: u16, method: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the admin port");
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write");
    let mut out = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut out))
        .await
        .expect("answer in time")
        .expect("read");
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    (status, out)
}

#[tokio::test]
async fn the_admin_port_answers_health_readiness_and_metrics_that_follow_the_traffic() {
    let port = free_port();
    let gw = Gateway::start(
        "admin",
        &format!(
            "[admin]\nlisten = \"127.0.0.1:{port}\"\n\n[[route]]\npath = \"/echo\"\nplugin = \"{}\"\n",
            plugin("echo")
        ),
    );
    gw.wait_log("admin listening on");
    assert_eq!(get(port, "GET", "/healthz").await.0, 200);
    assert_eq!(get(port, "GET", "/readyz").await.0, 200);
    assert_eq!(get(port, "GET", "/nope").await.0, 404);
    assert_eq!(get(port, "POST", "/metrics").await.0, 405);

    // Traffic: one connection, three messages, a normal close; one refusal.
    let mut ws = connect(&gw.url("/echo")).await;
    for i in 0..3 {
        ws.send(Message::text(format!("m{i}"))).await.expect("send");
        next_text(&mut ws).await;
    }
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .await
    .expect("close");
    drop(ws);
    let refused = tokio_tungstenite::connect_async(gw.url("/missing")).await;
    assert!(refused.is_err());

    let (status, text) = get(port, "GET", "/metrics").await;
    assert_eq!(status, 200);
    assert!(text.contains("application/openmetrics-text"), "{text}");
    let wanted = [
        r#"wasmgate_connections_opened_total{tenant="default",route="/echo"} 1"#,
        r#"wasmgate_messages_received_total{tenant="default",route="/echo"} 3"#,
        r#"wasmgate_messages_sent_total{tenant="default",route="/echo"} 3"#,
        r#"wasmgate_connections_closed_total{tenant="default",route="/echo",code="1000"} 1"#,
        r#"wasmgate_upgrades_refused_total{status="404"} 1"#,
        r#"wasmgate_connections_open{tenant="default",route="/echo"} 0"#,
        r#"wasmgate_received_bytes_total{tenant="default",route="/echo"} 6"#,
        r#"wasmgate_sent_bytes_total{tenant="default",route="/echo"} 6"#,
        r#"wasmgate_plugin_instances{tenant="default",route="/echo"} 0"#,
        // Instantiation, on-open, three on-message and on-close.
        r#"wasmgate_plugin_call_duration_seconds_count{tenant="default",route="/echo"} 6"#,
        r#"wasmgate_plugin_call_duration_seconds_bucket{le="+Inf",tenant="default",route="/echo"} 6"#,
    ];
    // The close is counted when the gateway's side of it is done.
    for line in wanted {
        let mut found = text.contains(line);
        for _ in 0..50 {
            if found {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            found = get(port, "GET", "/metrics").await.1.contains(line);
        }
        assert!(found, "no {line} in\n{text}");
    }
}

#[tokio::test]
async fn readiness_turns_503_while_the_gateway_drains() {
    let port = free_port();
    let gw = Gateway::start(
        "admin-drain",
        &format!(
            "[server]\ndrain_timeout = \"3s\"\n\n[admin]\nlisten = \"127.0.0.1:{port}\"\n\n[[route]]\npath = \"/echo\"\nplugin = \"{}\"\n",
            plugin("echo")
        ),
    );
    gw.wait_log("admin listening on");
    // A connection that does not answer the close holds the drain open.
    let _raw = Raw::connect(gw.addr, "/echo").await;
    gw.signal("TERM");
    gw.wait_log("shutting down");
    assert_eq!(get(port, "GET", "/readyz").await.0, 503);
    assert_eq!(get(port, "GET", "/healthz").await.0, 200);
}

#[tokio::test]
async fn an_admin_table_without_listen_is_an_error_naming_it() {
    let (ok, _, err) = check_output(
        "admin-config",
        "[admin]\nport = 9090\n\n[[route]]\npath = \"/e\"\nplugin = \"builtin:echo\"\n",
        &[],
    );
    assert!(!ok);
    assert!(
        err.contains("gateway.toml:2: port: unknown key in [admin]"),
        "{err}"
    );
    assert!(err.contains("admin: `listen` is missing"), "{err}");
}

/// The value of the sample `series` (name and labels) in a scrape.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn a_busy_connection_is_counted_while_it_is_open_and_its_instance_is_live() {
    let port = free_port();
    let gw = Gateway::start(
        "admin-live",
        &format!(
            "[admin]\nlisten = \"127.0.0.1:{port}\"\n\n[[route]]\npath = \"/echo\"\nplugin = \"{}\"\n",
            plugin("echo")
        ),
    );
    gw.wait_log("admin listening on");
    let mut ws = connect(&gw.url("/echo")).await;
    for i in 0..200 {
        ws.send(Message::text(format!("{i:03}")))
            .await
            .expect("send");
        next_text(&mut ws).await;
    }
    let text = get(port, "GET", "/metrics").await.1;
    let route = r#"{tenant="default",route="/echo"}"#;
    // Counted in batches while open: most of the 200 are there already.
    let received = sample(&text, &format!("wasmgate_messages_received_total{route}"));
    assert!(
        received.is_some_and(|n| (128.0..=200.0).contains(&n)),
        "{received:?} in\n{text}"
    );
    assert_eq!(
        sample(&text, &format!("wasmgate_connections_open{route}")),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, &format!("wasmgate_plugin_instances{route}")),
        Some(1.0)
    );
    let calls = sample(
        &text,
        &format!("wasmgate_plugin_call_duration_seconds_count{route}"),
    );
    assert!(calls.is_some_and(|n| n >= 202.0), "{calls:?} in\n{text}");
    // Echo calls take microseconds: nearly all are in the first buckets.
    let fast = sample(
        &text,
        r#"wasmgate_plugin_call_duration_seconds_bucket{le="0.001",tenant="default",route="/echo"}"#,
    );
    assert!(fast.is_some_and(|n| n >= 190.0), "{fast:?} in\n{text}");
}

#[tokio::test]
async fn a_trapping_and_a_looping_plugin_are_counted_as_plugin_failures_by_kind() {
    let port = free_port();
    let gw = Gateway::start(
        "admin-failures",
        &format!(
            "[admin]\nlisten = \"127.0.0.1:{port}\"\n\n[sandbox]\nmax_call_time = \"200ms\"\n\n[[route]]\npath = \"/t\"\nplugin = \"{{testkit}}\"\n"
        ),
    );
    gw.wait_log("admin listening on");
    let mut a = connect(&gw.url("/t")).await;
    send(&mut a, "trap").await;
    expect_close(&mut a, 1011).await;
    let mut b = connect(&gw.url("/t")).await;
    send(&mut b, "spin").await;
    expect_close(&mut b, 1011).await;
    let text = get(port, "GET", "/metrics").await.1;
    for kind in ["trap", "interrupted"] {
        let series = format!(
            r#"wasmgate_plugin_failures_total{{tenant="default",route="/t",kind="{kind}"}}"#
        );
        assert_eq!(sample(&text, &series), Some(1.0), "{series} in\n{text}");
    }
    assert_eq!(
        sample(
            &text,
            r#"wasmgate_connections_closed_total{tenant="default",route="/t",code="1011"}"#
        ),
        Some(2.0),
        "{text}"
    );
}

#[tokio::test]
async fn with_log_format_json_every_log_line_is_a_json_object() {
    let dir = scratch("admin-json");
    let file = dir.join("gateway.toml");
    std::fs::write(
        &file,
        format!(
            "[[route]]\npath = \"/echo\"\nplugin = \"{}\"\n",
            plugin("echo")
        ),
    )
    .expect("write");
    let gw = Gateway::spawn(&[
        "serve",
        "--log-format",
        "json",
        "--listen",
        "127.0.0.1:0",
        "--config",
        file.to_str().expect("utf-8"),
    ]);
    let mut ws = connect(&gw.url("/echo")).await;
    ws.send(Message::text("hi")).await.expect("send");
    next_text(&mut ws).await;
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    }))
    .await
    .expect("close");
    gw.wait_log("connection closed");
    let log = gw.log();
    let mut lines = 0;
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
        lines += 1;
    }
    let closed = log
        .lines()
        .find(|l| l.contains("connection closed"))
        .expect("a close line");
    let v: serde_json::Value = serde_json::from_str(closed).expect("JSON");
    assert_eq!(v["fields"]["route"], "/echo", "{closed}");
    assert_eq!(v["fields"]["code"], 1000, "{closed}");
    assert!(lines >= 3, "{log}");
}

#[tokio::test]
async fn events_stream_the_state_each_second_and_state_answers_it_once() {
    let port = free_port();
    let gw = Gateway::start(
        "admin-events",
        &format!(
            "[admin]\nlisten = \"127.0.0.1:{port}\"\n\n[[route]]\npath = \"/echo\"\nplugin = \"{}\"\n",
            plugin("echo")
        ),
    );
    gw.wait_log("admin listening on");
    let (status, text) = get(port, "GET", "/state").await;
    assert_eq!(status, 200);
    let body = text.split("\r\n\r\n").nth(1).expect("a body");
    let state: serde_json::Value = serde_json::from_str(body).expect("JSON");
    assert_eq!(state["connections"], 0);
    assert_eq!(state["routes"][0]["path"], "/echo");
    assert_eq!(state["routes"][0]["version"], 1);
    assert_eq!(state["reload_errors"], serde_json::json!([]));

    let _ws = connect(&gw.url("/echo")).await;
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    s.write_all(b"GET /events HTTP/1.1\r\nHost: admin\r\n\r\n")
        .await
        .expect("write");
    // Two events, about a second apart, each a whole JSON state.
    let mut seen = String::new();
    let start = std::time::Instant::now();
    while seen.matches("event: state\ndata: ").count() < 2 {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, s.read(&mut chunk))
            .await
            .expect("an event in time")
            .expect("read");
        assert!(n > 0, "the stream ended: {seen}");
        seen.push_str(&String::from_utf8_lossy(&chunk[..n]));
    }
    assert!(
        start.elapsed() >= std::time::Duration::from_millis(800),
        "{seen}"
    );
    assert!(seen.contains("content-type: text/event-stream"), "{seen}");
    let data = seen
        .split("data: ")
        .nth(1)
        .and_then(|d| d.split("\n\n").next())
        .expect("a data line");
    let state: serde_json::Value = serde_json::from_str(data).expect("JSON");
    assert_eq!(state["connections"], 1, "{data}");
    assert_eq!(state["routes"][0]["connections"], 1, "{data}");
}

/// The config file [`Gateway::start`] wrote for the test named `name`.
fn config_of(name: &str) -> std::path::PathBuf {
    std::env::temp_dir()
        .join(format!("wasmgate-e2e-{}-{name}", std::process::id()))
        .join("gateway.toml")
}

#[tokio::test]
async fn a_shared_route_removed_by_a_reload_frees_its_instance_for_the_tenant() {
    let port = free_port();
    let route = |path: &str, extra: &str| {
        format!("[[tenant.route]]\npath = \"{path}\"\nplugin = \"{{testkit}}\"\n{extra}\n")
    };
    let head = format!(
        "[admin]\nlisten = \"127.0.0.1:{port}\"\n\n[[route]]\npath = \"/e\"\nplugin = \"builtin:echo\"\n\n\
         [[tenant]]\nname = \"t\"\nhosts = [\"t.test\"]\nmax_instances = 1\n\n"
    );
    let both = format!(
        "{head}{}{}",
        route("/c", ""),
        route("/shared", "isolation = \"shared\"")
    );
    let gw = Gateway::start("admin-shared-gone", &both);
    gw.wait_log("admin listening on");
    let mut s = connect_host(&gw.url("/shared"), "t.test").await;
    assert!(command(&mut s, "hits").await.starts_with("ok "));
    s.close(None).await.expect("close");
    drop(s);
    // The route goes; its instance must go with it.
    let file = config_of("admin-shared-gone");
    std::fs::write(
        &file,
        std::fs::read_to_string(&file)
            .expect("read")
            .replace("path = \"/shared\"", "path = \"/other\""),
    )
    .expect("write");
    gw.wait_log("config reloaded");
    let series = r#"wasmgate_plugin_instances{tenant="t",route="/shared"}"#;
    let mut instances = None;
    for _ in 0..100 {
        instances = sample(&get(port, "GET", "/metrics").await.1, series);
        if instances == Some(0.0) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(instances, Some(0.0), "{series}");
    // ...and the tenant's only instance is free for another connection.
    let mut c = connect_host(&gw.url("/c"), "t.test").await;
    assert!(command(&mut c, "id").await.starts_with("ok "));
}

#[tokio::test]
async fn refusals_by_the_plugin_count_and_plain_requests_do_not() {
    let port = free_port();
    let gw = Gateway::start(
        "admin-refusals",
        &format!(
            "[admin]\nlisten = \"127.0.0.1:{port}\"\n\n[[route]]\npath = \"/auth\"\nplugin = \"builtin:auth\"\n[route.config]\nusers = \"s3cret=alice\"\n"
        ),
    );
    gw.wait_log("admin listening on");
    // The plugin refuses: 401, counted.
    assert!(tokio_tungstenite::connect_async(gw.url("/auth"))
        .await
        .is_err());
    // Plain HTTP, not upgrades: not counted.
    for path in ["/auth", "/nothing-here"] {
        let mut s = TcpStream::connect(gw.addr).await.expect("connect");
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
        let mut out = String::new();
        let _ = tokio::time::timeout(WAIT, s.read_to_string(&mut out)).await;
    }
    let text = get(port, "GET", "/metrics").await.1;
    assert_eq!(
        sample(&text, r#"wasmgate_upgrades_refused_total{status="401"}"#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, r#"wasmgate_upgrades_refused_total{status="426"}"#),
        None,
        "{text}"
    );
    assert_eq!(
        sample(&text, r#"wasmgate_upgrades_refused_total{status="404"}"#),
        None,
        "{text}"
    );
}

#[test]
fn an_admin_address_equal_to_the_public_one_or_malformed_is_an_error_naming_it() {
    let check = |text: &str| {
        let (ok, _, err) = check_output("admin-config-2", text, &[]);
        assert!(!ok, "{text}");
        err
    };
    let same = check(
        "[server]\nlisten = \"127.0.0.1:19999\"\n\n[admin]\nlisten = \"127.0.0.1:19999\"\n\n\
         [[route]]\npath = \"/e\"\nplugin = \"builtin:echo\"\n",
    );
    assert!(
        same.contains("gateway.toml:5: listen: [admin] listen 127.0.0.1:19999 is the public listener's address"),
        "{same}"
    );
    let bad = check("[admin]\nlisten = \"127.0.0.1:99999\"\n\n[[route]]\npath = \"/e\"\nplugin = \"builtin:echo\"\n");
    assert!(bad.contains("gateway.toml:2: listen:"), "{bad}");
    assert!(
        !bad.contains("is missing"),
        "listen is there, if malformed: {bad}"
    );
}

#[tokio::test]
async fn a_quiet_connections_messages_reach_the_metrics_within_a_second_or_so() {
    let port = free_port();
    let gw = Gateway::start(
        "admin-quiet",
        &format!(
            "[admin]\nlisten = \"127.0.0.1:{port}\"\n\n[[route]]\npath = \"/echo\"\nplugin = \"{}\"\n",
            plugin("echo")
        ),
    );
    gw.wait_log("admin listening on");
    let mut ws = connect(&gw.url("/echo")).await;
    ws.send(Message::text("one")).await.expect("send");
    next_text(&mut ws).await;
    // Still open, far below a batch: reported at the next period (1 s).
    let series = r#"wasmgate_messages_received_total{tenant="default",route="/echo"}"#;
    let start = std::time::Instant::now();
    let mut seen = None;
    while start.elapsed() < std::time::Duration::from_secs(3) {
        seen = sample(&get(port, "GET", "/metrics").await.1, series);
        if seen == Some(1.0) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(seen, Some(1.0), "{series} while the connection is open");
}
