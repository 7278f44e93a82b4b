//! Graceful shutdown: on SIGTERM or SIGINT the gateway stops accepting,
//! closes every connection with 1001, runs every plugin's `on-close`, and
//! exits 0 once the close handshakes are done.

use std::time::Duration;

use crate::support::*;

const CONFIG: &str =
    "[server]\ndrain_timeout = \"5s\"\n\n[[route]]\npath = \"/t\"\nplugin = \"{testkit}\"\n";

#[tokio::test]
async fn sigterm_closes_every_connection_with_1001_and_exits_0() {
    let mut gw = Gateway::start("shutdown", CONFIG);
    let mut a = connect(&gw.url("/t")).await;
    let mut b = connect(&gw.url("/t")).await;
    let a_id = conn_id(&mut a).await;
    let b_id = conn_id(&mut b).await;
    gw.signal("TERM");
    assert_eq!(expect_close(&mut a, 1001).await, "going away");
    assert_eq!(expect_close(&mut b, 1001).await, "going away");
    assert_eq!(
        gw.wait_exit(Duration::from_secs(10)),
        Some(0),
        "exit status"
    );
    gw.wait_log(&format!("on-close {a_id} 1001 going away"));
    gw.wait_log(&format!("on-close {b_id} 1001 going away"));
    assert!(
        tokio::net::TcpStream::connect(gw.addr).await.is_err(),
        "still accepting"
    );
}

#[tokio::test]
async fn a_second_signal_exits_at_once() {
    let mut gw = Gateway::start("shutdown-twice", "[server]\ndrain_timeout = \"60s\"\nclose_timeout = \"60s\"\n\n[[route]]\npath = \"/t\"\nplugin = \"{testkit}\"\n");
    // A raw client that never answers the close frame keeps the drain waiting.
    let _raw = Raw::connect(gw.addr, "/t").await;
    gw.signal("INT");
    assert_eq!(
        gw.wait_exit(Duration::from_millis(500)),
        None,
        "still draining"
    );
    gw.signal("INT");
    assert_eq!(gw.wait_exit(Duration::from_secs(5)), Some(130));
}

#[tokio::test]
async fn connections_that_are_not_websockets_do_not_hold_up_shutdown() {
    let mut gw = Gateway::start("shutdown-idle-http", CONFIG);
    // Nothing sent at all; an idle keep-alive after a 426; half a request.
    let _silent = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    let mut keepalive = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    tokio::io::AsyncWriteExt::write_all(&mut keepalive, b"GET /t HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 512];
    let n = tokio::io::AsyncReadExt::read(&mut keepalive, &mut buf)
        .await
        .expect("426");
    assert!(buf[..n].starts_with(b"HTTP/1.1 426"));
    let mut half = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    tokio::io::AsyncWriteExt::write_all(&mut half, b"GET /t HTTP/1.1\r\nHost:")
        .await
        .expect("write");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let start = std::time::Instant::now();
    gw.signal("TERM");
    assert_eq!(gw.wait_exit(Duration::from_secs(10)), Some(0), "clean exit");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "shutdown waited {:?} for HTTP connections",
        start.elapsed()
    );
}
