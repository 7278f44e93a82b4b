//! Limits and keepalive: each limit gets its HTTP status or close code, and
//! slow or silent peers cannot hold resources.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

#[tokio::test]
async fn a_client_sending_its_headers_slowly_is_dropped_after_handshake_timeout() {
    let gw = Gateway::start(
        "limit-handshake",
        "[server]\nhandshake_timeout = \"300ms\"\n\n[[route]]\npath = \"/t\"\nplugin = \"{testkit}\"\n",
    );
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET /t HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    // The server answers 408 or just closes; either way the socket ends.
    loop {
        match tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .expect("dropped in time")
        {
            Ok(0) | Err(_) => break,
            Ok(_) => continue,
        }
    }
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

#[tokio::test]
async fn an_oversized_request_head_gets_431() {
    let gw = Gateway::start(
        "limit-header",
        "[server]\nmax_header_size = \"8KiB\"\n\n[[route]]\npath = \"/t\"\nplugin = \"{testkit}\"\n",
    );
    let big = format!("X-Padding: {}\r\n", "a".repeat(10_000));
    let reply = http(gw.addr, &upgrade_request("/t", &big)).await;
    assert_eq!(reply.status, 431);
    // Under the cap is fine.
    let ok = format!("X-Padding: {}\r\n", "a".repeat(4_000));
    assert_eq!(http(gw.addr, &upgrade_request("/t", &ok)).await.status, 101);
}

#[tokio::test]
async fn the_idle_timeout_counts_from_the_last_message_either_way() {
    let gw = Gateway::start(
        "limit-idle-last",
        "[server]\nidle_timeout = \"800ms\"\nping_interval = \"off\"\n\n[[route]]\npath = \"/t\"\nplugin = \"{testkit}\"\n",
    );
    let mut ws = connect(&gw.url("/t")).await;
    // A message (and its reply) early in the first period: a session that
    // took the reply's time as that of its first idle check (800 ms after
    // opening) would close at 1,600 ms, 1,500 ms after this message.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(command(&mut ws, "echo x").await, "ok x");
    let last = Instant::now();
    assert_eq!(expect_close(&mut ws, 1001).await, "idle timeout");
    let after = last.elapsed();
    assert!(after >= Duration::from_millis(700), "{after:?}");
    assert!(after < Duration::from_millis(1200), "{after:?}");
}

#[tokio::test]
async fn a_client_that_only_answers_pings_is_still_idle() {
    let gw = Gateway::start(
        "limit-idle-pings",
        "[server]\nidle_timeout = \"600ms\"\nping_interval = \"100ms\"\n\n[[route]]\npath = \"/t\"\nplugin = \"{testkit}\"\n",
    );
    let mut ws = connect(&gw.url("/t")).await;
    let start = Instant::now();
    // tungstenite answers each ping while we wait for the close.
    assert_eq!(expect_close(&mut ws, 1001).await, "idle timeout");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn an_idle_connection_is_closed_with_1001_after_idle_timeout() {
    let gw = Gateway::start(
        "limit-idle",
        "[server]\nidle_timeout = \"400ms\"\n\n[[route]]\npath = \"/t\"\nplugin = \"{testkit}\"\n",
    );
    let mut ws = connect(&gw.url("/t")).await;
    // Activity keeps it open...
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(command(&mut ws, "echo x").await, "ok x");
    }
    // ...silence closes it.
    let start = Instant::now();
    assert_eq!(expect_close(&mut ws, 1001).await, "idle timeout");
    assert!(
        start.elapsed() >= Duration::from_millis(300),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn connections_over_max_connections_get_503_per_server_and_per_route() {
    let gw = Gateway::start(
        "limit-conns",
        "[server]\nmax_connections = 3\n\n[[route]]\npath = \"/a\"\nplugin = \"{testkit}\"\nmax_connections = 1\n\n[[route]]\npath = \"/b\"\nplugin = \"{testkit}\"\n",
    );
    let a = connect(&gw.url("/a")).await;
    assert_eq!(
        http(gw.addr, &upgrade_request("/a", "")).await.status,
        503,
        "route cap"
    );
    let _b1 = connect(&gw.url("/b")).await;
    let _b2 = connect(&gw.url("/b")).await;
    assert_eq!(
        http(gw.addr, &upgrade_request("/b", "")).await.status,
        503,
        "server cap"
    );
    // A closed connection frees its slot.
    drop(a);
    let start = Instant::now();
    loop {
        let status = http(gw.addr, &upgrade_request("/a", "")).await.status;
        if status == 101 {
            break;
        }
        assert!(start.elapsed() < WAIT, "slot never freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn origins_outside_allowed_origins_get_403() {
    let gw = Gateway::start(
        "limit-origin",
        "[[route]]\npath = \"/t\"\nplugin = \"{testkit}\"\nallowed_origins = [\"https://good.example\"]\n",
    );
    let evil = http(
        gw.addr,
        &upgrade_request("/t", "Origin: https://evil.example\r\n"),
    )
    .await;
    assert_eq!(evil.status, 403);
    let good = http(
        gw.addr,
        &upgrade_request("/t", "Origin: https://GOOD.example\r\n"),
    )
    .await;
    assert_eq!(good.status, 101);
    assert_eq!(
        http(gw.addr, &upgrade_request("/t", "")).await.status,
        101,
        "no Origin: not a browser"
    );
}

#[tokio::test]
async fn a_peer_that_misses_the_pong_is_dropped_and_the_plugin_sees_1006() {
    let gw = Gateway::start(
        "limit-keepalive",
        "[[route]]\npath = \"/t\"\nplugin = \"{testkit}\"\nping_interval = \"200ms\"\npong_timeout = \"300ms\"\n\n\
         [[route]]\npath = \"/w\"\nplugin = \"{testkit}\"\nping_interval = \"off\"\n",
    );
    // A tungstenite client answers pings by itself and stays.
    let mut polite = connect(&gw.url("/t?watch=1")).await;
    let mut raw = Raw::connect(gw.addr, "/t").await;
    let id = raw.id().await;
    // The raw client sees the gateway's ping and ignores it.
    let (b0, _) = raw.read_frame().await.expect("ping");
    assert_eq!(b0, 0x89, "a ping");
    let note = next_text(&mut polite).await;
    assert_eq!(note, format!("closed {id} 1006 "));
    assert!(raw.closed_within(Duration::from_secs(2)).await);
    // The polite client answered its pings and is still served.
    assert_eq!(command(&mut polite, "echo alive").await, "ok alive");
}

#[tokio::test]
async fn a_slow_consumer_is_closed_with_1008_while_its_room_keeps_receiving() {
    let gw = Gateway::start(
        "limit-slow",
        "[[route]]\npath = \"/t\"\nplugin = \"{testkit}\"\nmax_outbound_buffer = \"256KiB\"\nclose_timeout = \"1s\"\n",
    );
    let mut watcher = connect(&gw.url("/t?watch=1")).await;
    // The slow client joins the room and then never reads.
    let mut slow = Raw::connect(gw.addr, "/t").await;
    slow.send_frame(0x81, b"join room", true).await;
    let (_, joined) = slow.read_frame().await.expect("joined");
    assert_eq!(joined, b"ok joined");
    let slow_id = slow.id().await;
    let mut fast = connect(&gw.url("/t")).await;
    assert_eq!(command(&mut fast, "join room").await, "ok joined");
    let mut sender = connect(&gw.url("/t")).await;

    let chunk = "x".repeat(16 << 10);
    let mut received = 0usize;
    let mut slow_closed = false;
    for _ in 0..3000 {
        sender
            .send(Message::text(format!("broadcast room {chunk}")))
            .await
            .unwrap();
        let _ = next_text(&mut sender).await;
        // The fast member gets every message.
        assert_eq!(next_text(&mut fast).await.len(), chunk.len());
        received += 1;
        if let Ok(Some(Ok(Message::Text(t)))) =
            tokio::time::timeout(Duration::from_millis(1), watcher.next()).await
        {
            assert_eq!(
                t.as_str(),
                format!("closed {slow_id} 1008 slow consumer: outbound buffer full")
            );
            slow_closed = true;
            break;
        }
    }
    if !slow_closed {
        let t = next_text(&mut watcher).await;
        assert_eq!(
            t,
            format!("closed {slow_id} 1008 slow consumer: outbound buffer full")
        );
    }
    assert!(received > 16, "the fast member kept receiving ({received})");
    assert_eq!(command(&mut fast, "echo ok").await, "ok ok");
}

#[tokio::test]
async fn with_the_drop_policy_a_slow_consumers_messages_are_dropped_and_it_stays_open() {
    let gw = Gateway::start(
        "limit-drop",
        "[[route]]\npath = \"/t\"\nplugin = \"{testkit}\"\nmax_outbound_buffer = \"64KiB\"\nslow_consumer = \"drop\"\n",
    );
    let mut slow = Raw::connect(gw.addr, "/t").await;
    let slow_id = slow.id().await;
    let mut sender = connect(&gw.url("/t")).await;
    let chunk = "y".repeat(32 << 10);
    let mut refused = 0;
    for _ in 0..1000 {
        let answer = command(&mut sender, &format!("send {slow_id} {chunk}")).await;
        if answer == "err backpressure" {
            refused += 1;
        } else {
            assert_eq!(answer, "ok sent");
        }
    }
    assert!(refused > 0, "the sender was told about backpressure");
    // The slow consumer is still open and can catch up.
    let (b0, _) = slow.read_frame().await.expect("still open");
    assert_eq!(b0, 0x81);
}

/// The resident set size of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmRSS")
}

#[tokio::test]
async fn fragments_mode_streams_256_mib_through_a_1_mib_route_with_flat_memory() {
    let gw = Gateway::start(
        "limit-stream",
        "[[route]]\npath = \"/s\"\nplugin = \"{testkit}\"\ndeliver = \"fragments\"\nmax_frame_size = \"1MiB\"\nmax_message_size = \"1MiB\"\n",
    );
    let mut raw = Raw::connect(gw.addr, "/s").await;
    let chunk = vec![0x5Au8; 1 << 20];
    // Warm up with one small streamed message, then measure.
    raw.send_frame(0x82, b"warm", true).await;
    let (_, answer) = raw.read_frame().await.expect("answer");
    assert_eq!(answer, b"fragments binary 1 bytes 4");
    let before = rss_kib(gw.pid());
    let mut peak = before;
    for i in 0..256u32 {
        let b0 = match i {
            0 => 0x02,
            255 => 0x80,
            _ => 0x00,
        };
        raw.send_frame(b0, &chunk, true).await;
        if i % 16 == 0 {
            peak = peak.max(rss_kib(gw.pid()));
        }
    }
    let (_, answer) = raw.read_frame().await.expect("answer");
    assert_eq!(
        String::from_utf8(answer).unwrap(),
        format!("fragments binary 256 bytes {}", 256u64 << 20)
    );
    peak = peak.max(rss_kib(gw.pid()));
    // 256 MiB went through; the gateway grew by a few frames' worth at most.
    assert!(
        peak < before + 48 * 1024,
        "RSS grew from {before} KiB to {peak} KiB"
    );
    // The same route still refuses a single frame over max_frame_size.
    raw.send_frame(0x82, &vec![0u8; (1 << 20) + 1], true).await;
    assert_eq!(raw.expect_close().await, 1009);
}

#[tokio::test]
async fn fragments_mode_checks_text_across_fragments() {
    let gw = Gateway::start(
        "limit-stream-text",
        "[[route]]\npath = \"/s\"\nplugin = \"{testkit}\"\ndeliver = \"fragments\"\n",
    );
    let mut raw = Raw::connect(gw.addr, "/s").await;
    let euro = "€".as_bytes();
    raw.send_frame(0x01, &euro[..1], true).await;
    raw.send_frame(0x80, &euro[1..], true).await;
    let (_, answer) = raw.read_frame().await.expect("answer");
    assert_eq!(answer, b"fragments text 2 bytes 3");
    raw.send_frame(0x01, &euro[..1], true).await;
    raw.send_frame(0x00, b"x", true).await;
    assert_eq!(raw.expect_close().await, 1007);
}

#[test]
fn a_gateway_whose_open_file_limit_cannot_hold_max_connections_says_so_at_start() {
    let warning = open_file_warning(
        "nofile",
        "[server]\nmax_connections = 5000\n\n[[route]]\npath = \"/echo\"\nplugin = \"builtin:echo\"\n",
    );
    // The soft limit (200) was raised to the hard one (600).
    assert!(
        warning.contains("the open-file limit (RLIMIT_NOFILE) is 600: about 344 connections fit, but max_connections is 5000"),
        "{warning}"
    );
    assert!(
        warning.contains("to 5256 or lower max_connections"),
        "{warning}"
    );
}

#[test]
fn the_open_file_check_at_start_counts_the_files_routes_granting_dirs_may_hold() {
    // 100 sockets fit in 344 alone; with the files of the routes that
    // grant `dirs` they do not: the top-level route's 40, and the 300 of
    // the tenant (its route alone could hold 64 for each of 100
    // connections), plus each route's granted directory in each of 100
    // instances. The other tenant's max_open_files does not count: it has
    // no such route.
    let data = scratch("nofile-dirs-data");
    let config = format!(
        "[server]\nmax_connections = 100\n\n\
         [[route]]\npath = \"/top\"\nplugin = \"builtin:echo\"\nmax_open_files = 40\n\
         dirs = [{{ host = \"{0}\", guest = \"/data\" }}]\n\n\
         [[tenant]]\nname = \"files\"\nhosts = [\"files.test\"]\nmax_open_files = 300\n\n\
         [[tenant.route]]\npath = \"/f\"\nplugin = \"builtin:echo\"\n\
         dirs = [{{ host = \"{0}\", guest = \"/data\" }}]\n\n\
         [[tenant]]\nname = \"plain\"\nhosts = [\"plain.test\"]\nmax_open_files = 5000\n\n\
         [[tenant.route]]\npath = \"/f\"\nplugin = \"builtin:echo\"\n",
        data.display()
    );
    let warning = open_file_warning("nofile-dirs", &config);
    assert!(
        warning.contains("max_connections is 100 and the plugins of routes granting `dirs` may hold 540 files open"),
        "{warning}"
    );
    assert!(
        warning.contains("to 896, lower max_connections"),
        "{warning}"
    );
}

/// The first log line about `RLIMIT_NOFILE` of a gateway serving `config`
/// (written to a scratch folder named `name`) with an open-file limit of
/// 200, hard limit 600.
fn open_file_warning(name: &str, config: &str) -> String {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::CommandExt;
    let dir = scratch(name);
    let file = dir.join("gateway.toml");
    std::fs::write(&file, config).unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_wasmgate"));
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--config",
        file.to_str().unwrap(),
    ])
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::piped());
    // SAFETY: setrlimit is async-signal-safe; it only lowers this child's
    // limits before exec.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 200,
                rlim_max: 600,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("start wasmgate");
    let err = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = std::time::Instant::now() + WAIT;
    let mut seen = String::new();
    let warning = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains("RLIMIT_NOFILE") => break line,
            Ok(line) => {
                seen.push_str(&line);
                seen.push('\n');
            }
            Err(_) => {
                let _ = child.kill();
                panic!("no open-file warning:\n{seen}");
            }
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    warning
}
