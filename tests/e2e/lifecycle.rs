//! The connection lifecycle's promise: every connection whose `on-open`
//! accepted gets `on-close` exactly once, however it ends: a reset while
//! the 101 is on its way, a reset right after it, a reset mid-conversation,
//! a drain that times out at shutdown. Opens and closes are matched through
//! the testkit plugin's `on-open <id>` and `on-close <id> ...` log lines, and
//! through the chat example's join and leave notices.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

const TESTKIT: &str = "[[route]]\npath = \"/t\"\nplugin = \"{testkit}\"\n";

/// When a raw client resets its TCP connection.
#[derive(Clone, Copy, Debug)]
enum ResetAt {
    /// Right after writing the upgrade request.
    Request,
    /// After reading the first bytes of the 101.
    Response,
    /// After the 101 and one message.
    Message,
}

/// Opens a raw upgrade to `path` and resets the connection at `at`.
async fn upgrade_then_reset(addr: std::net::SocketAddr, path: &str, at: ResetAt) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(upgrade_request(path, "").as_bytes())
        .await
        .expect("write");
    if !matches!(at, ResetAt::Request) {
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .expect("101 in time")
            .expect("read");
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 101"),
            "{:?}",
            String::from_utf8_lossy(&buf[..n])
        );
    }
    if matches!(at, ResetAt::Message) {
        // A masked text frame "id".
        let key = [1u8, 2, 3, 4];
        let mut frame = vec![0x81, 0x82];
        frame.extend_from_slice(&key);
        frame.extend(b"id".iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        s.write_all(&frame).await.expect("write frame");
    }
    // SO_LINGER 0: closing sends a reset instead of a FIN.
    s.set_zero_linger().expect("linger");
    drop(s);
}

/// How many `on-open <id>` and `on-close <id> ...` lines each id has in
/// the gateway's log.
fn opens_and_closes(log: &str) -> BTreeMap<u64, (usize, usize)> {
    let mut seen: BTreeMap<u64, (usize, usize)> = BTreeMap::new();
    for line in log.lines() {
        for (marker, open) in [("on-open ", true), ("on-close ", false)] {
            if let Some(rest) = line.split(marker).nth(1) {
                let id: String = rest.chars().take_while(char::is_ascii_digit).collect();
                if let Ok(id) = id.parse() {
                    let entry = seen.entry(id).or_default();
                    if open {
                        entry.0 += 1;
                    } else {
                        entry.1 += 1;
                    }
                }
            }
        }
    }
    seen
}

/// Waits until every opened connection has closed, then asserts that each
/// had exactly one open and one close; returns how many opened.
///
/// The gateway's log reaches the test through a pipe and a reader thread,
/// so the last lines can arrive after the clients are done: the answer is
/// taken only once at least `at_least` ids are seen and the log has shown
/// the same opens and closes for 300 ms.
async fn assert_every_open_closed_once(gw: &Gateway, at_least: usize) -> usize {
    let start = std::time::Instant::now();
    let mut previous = None;
    loop {
        let seen = opens_and_closes(&gw.log());
        let settled = seen.len() >= at_least && seen.values().all(|&(o, c)| o == 1 && c == 1);
        if settled && previous.as_ref() == Some(&seen) {
            return seen.len();
        }
        if start.elapsed() > WAIT {
            let bad: Vec<_> = seen.iter().filter(|(_, &oc)| oc != (1, 1)).collect();
            panic!(
                "{} ids seen (expected at least {at_least}); ids without exactly one open and one close (id, (opens, closes)): {bad:?}",
                seen.len()
            );
        }
        previous = settled.then_some(seen);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test]
async fn clients_resetting_right_after_the_request_get_on_close_for_every_on_open() {
    let gw = Gateway::start("life-reset-request", TESTKIT);
    let clients: Vec<_> = (0..50)
        .map(|_| tokio::spawn(upgrade_then_reset(gw.addr, "/t", ResetAt::Request)))
        .collect();
    for c in clients {
        c.await.expect("client");
    }
    // Whatever number of opens raced the resets, each one is closed once.
    assert_every_open_closed_once(&gw, 0).await;
    // And the gateway still serves.
    let mut ws = connect(&gw.url("/t")).await;
    assert_eq!(command(&mut ws, "echo alive").await, "ok alive");
}

#[tokio::test]
async fn clients_resetting_after_the_101_or_a_message_get_on_close_once() {
    let gw = Gateway::start("life-reset-after", TESTKIT);
    for at in [ResetAt::Response, ResetAt::Message] {
        let clients: Vec<_> = (0..25)
            .map(|_| tokio::spawn(upgrade_then_reset(gw.addr, "/t", at)))
            .collect();
        for c in clients {
            c.await.expect("client");
        }
    }
    // Every one of these saw its 101, so on-open ran 50 times.
    assert_eq!(assert_every_open_closed_once(&gw, 50).await, 50);
    gw.wait_log(" 1006 ");
}

#[tokio::test]
async fn chat_room_sees_a_leave_for_every_join_when_clients_reset_during_the_upgrade() {
    let gw = Gateway::start(
        "life-chat",
        "[[route]]\npath = \"/chat\"\nplugin = \"builtin:chat\"\n",
    );
    let mut watcher = connect(&gw.url("/chat?room=R&name=watcher")).await;
    assert_eq!(next_json(&mut watcher).await["type"], "welcome");
    let clients: Vec<_> = (0..50)
        .map(|i| {
            let at = if i % 2 == 0 {
                ResetAt::Request
            } else {
                ResetAt::Response
            };
            tokio::spawn(upgrade_then_reset(gw.addr, "/chat?room=R&name=N", at))
        })
        .collect();
    for c in clients {
        c.await.expect("client");
    }
    // Count joins and leaves until the room is quiet for a while.
    let (mut joins, mut leaves) = (0, 0);
    while let Ok(Some(Ok(msg))) = tokio::time::timeout(
        Duration::from_millis(1500),
        futures_util::StreamExt::next(&mut watcher),
    )
    .await
    {
        let Ok(text) = msg.to_text() else { continue };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else {
            continue;
        };
        match v["type"].as_str() {
            Some("join") => joins += 1,
            Some("leave") => leaves += 1,
            _ => {}
        }
    }
    assert!(
        joins >= 25,
        "the clients that saw their 101 joined: {joins}"
    );
    assert_eq!(joins, leaves, "a leave for every join");
}

#[tokio::test]
async fn an_upgrade_over_http_1_0_is_refused_with_505_before_the_plugin_runs() {
    let gw = Gateway::start("life-http10", TESTKIT);
    let req = upgrade_request("/t", "").replace("HTTP/1.1", "HTTP/1.0");
    let reply = http(gw.addr, &req).await;
    assert_eq!(reply.status, 505, "{}", reply.head);
    // A valid upgrade after it opens: the first on-open the plugin logs.
    let mut ws = connect(&gw.url("/t")).await;
    let id = conn_id(&mut ws).await;
    // The log comes through a pipe: wait for this open's line to arrive.
    gw.wait_log(&format!("on-open {id} "));
    let opens = opens_and_closes(&gw.log());
    assert_eq!(
        opens.keys().copied().collect::<Vec<_>>(),
        [id.parse::<u64>().expect("id")],
        "on-open ran only for the HTTP/1.1 client"
    );
}

#[tokio::test]
async fn headers_that_must_appear_once_are_refused_with_400_when_repeated() {
    let gw = Gateway::start("life-dup", TESTKIT);
    for extra in [
        "Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n",
        "Sec-WebSocket-Version: 13\r\n",
        "Host: other\r\n",
    ] {
        let reply = http(gw.addr, &upgrade_request("/t", extra)).await;
        assert_eq!(reply.status, 400, "{extra:?}: {}", reply.head);
        assert!(reply.body.contains("only once"), "{}", reply.body);
    }
    // Two Origins: the second could otherwise slip past allowed_origins.
    let two_origins = "Origin: https://a.example\r\nOrigin: https://b.example\r\n";
    let reply = http(gw.addr, &upgrade_request("/t", two_origins)).await;
    assert_eq!(reply.status, 400, "{}", reply.head);
    // An upgrade announcing a body.
    for body in ["Content-Length: 5\r\n", "Transfer-Encoding: chunked\r\n"] {
        let reply = http(gw.addr, &upgrade_request("/t", body)).await;
        assert_eq!(reply.status, 400, "{body:?}: {}", reply.head);
    }
    let no_host = upgrade_request("/t", "").replace("Host: test\r\n", "");
    assert_eq!(http(gw.addr, &no_host).await.status, 400);
    assert!(opens_and_closes(&gw.log()).is_empty(), "no plugin ran");
}

#[tokio::test]
async fn sighup_does_not_kill_the_gateway_or_its_connections() {
    let mut gw = Gateway::start("life-hup", TESTKIT);
    let mut ws = connect(&gw.url("/t")).await;
    gw.signal("HUP");
    gw.wait_log("SIGHUP");
    assert_eq!(command(&mut ws, "echo still here").await, "ok still here");
    let mut other = connect(&gw.url("/t")).await;
    assert_eq!(command(&mut other, "echo new").await, "ok new");
    assert_eq!(gw.wait_exit(Duration::from_millis(100)), None, "running");
}

#[tokio::test]
async fn a_drain_that_times_out_still_runs_on_close_for_every_connection() {
    let mut gw = Gateway::start(
        "life-drain",
        "[server]\ndrain_timeout = \"1s\"\nclose_timeout = \"60s\"\n\n[[route]]\npath = \"/t\"\nplugin = \"{testkit}\"\n",
    );
    // A raw client that never answers the close frame.
    let mut raw = Raw::connect(gw.addr, "/t").await;
    let id = raw.id().await;
    gw.signal("TERM");
    assert_eq!(
        gw.wait_exit(Duration::from_secs(10)),
        Some(2),
        "drain timed out"
    );
    gw.wait_log(&format!("on-close {id} "));
}
