//! The closing handshake in both directions, protocol errors with their
//! close codes, and `on-close` running exactly once per connection.

use std::time::Duration;

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

const TESTKIT: &str = "[server]\nmax_frame_size = \"64KiB\"\nmax_message_size = \"100KiB\"\n\n[[route]]\npath = \"/t\"\nplugin = \"{testkit}\"\n";

/// A watcher connection and the id of a second connection it watches.
async fn watched(gw: &Gateway) -> (Ws, Ws, String) {
    let mut watcher = connect(&gw.url("/t?watch=1")).await;
    let mut ws = connect(&gw.url("/t")).await;
    let id = conn_id(&mut ws).await;
    assert_eq!(command(&mut watcher, "size watchers").await, "ok 1");
    (watcher, ws, id)
}

#[tokio::test]
async fn client_close_is_answered_and_reported_to_the_plugin_with_its_code() {
    let gw = Gateway::start("close-client", TESTKIT);
    let (mut watcher, mut ws, id) = watched(&gw).await;
    ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::from(4001),
        reason: "bye now".into(),
    })))
    .await
    .unwrap();
    expect_close(&mut ws, 4001).await;
    assert_eq!(
        next_text(&mut watcher).await,
        format!("closed {id} 4001 bye now")
    );
}

#[tokio::test]
async fn plugin_close_sends_its_code_and_reason() {
    let gw = Gateway::start("close-plugin", TESTKIT);
    let (mut watcher, mut ws, id) = watched(&gw).await;
    send(&mut ws, "close 4000 done here").await;
    assert_eq!(expect_close(&mut ws, 4000).await, "done here");
    assert_eq!(
        next_text(&mut watcher).await,
        format!("closed {id} 4000 done here")
    );
    // Invalid codes are refused to the plugin, not sent.
    let mut ws = connect(&gw.url("/t")).await;
    assert!(command(&mut ws, "close 1005 x")
        .await
        .starts_with("err invalid-argument"));
}

#[tokio::test]
async fn on_close_runs_exactly_once_after_an_abrupt_tcp_drop() {
    let gw = Gateway::start("close-drop", TESTKIT);
    let mut watcher = connect(&gw.url("/t?watch=1")).await;
    let mut raw = Raw::connect(gw.addr, "/t").await;
    let id = raw.id().await;
    drop(raw);
    assert_eq!(next_text(&mut watcher).await, format!("closed {id} 1006 "));
    expect_silence(&mut watcher, Duration::from_millis(300)).await;
}

#[tokio::test]
async fn empty_close_frame_is_reported_as_1005() {
    let gw = Gateway::start("close-empty", TESTKIT);
    let mut watcher = connect(&gw.url("/t?watch=1")).await;
    let mut raw = Raw::connect(gw.addr, "/t").await;
    let id = raw.id().await;
    raw.send_frame(0x88, b"", true).await;
    let (b0, payload) = raw.read_frame().await.expect("close echo");
    assert_eq!((b0, payload.len()), (0x88, 0));
    assert!(
        raw.closed_within(Duration::from_secs(2)).await,
        "server closes TCP after the handshake"
    );
    assert_eq!(next_text(&mut watcher).await, format!("closed {id} 1005 "));
}

async fn protocol_error(gw: &Gateway, frames: &[(u8, &[u8], bool)]) -> u16 {
    let mut raw = Raw::connect(gw.addr, "/t").await;
    for (b0, payload, masked) in frames {
        raw.send_frame(*b0, payload, *masked).await;
    }
    let code = raw.expect_close().await;
    code
}

#[tokio::test]
async fn protocol_errors_get_their_close_codes() {
    let gw = Gateway::start("close-protocol", TESTKIT);
    assert_eq!(
        protocol_error(&gw, &[(0x81, &[0xC3, 0x28], true)]).await,
        1007,
        "invalid UTF-8"
    );
    assert_eq!(
        protocol_error(&gw, &[(0x81, b"hi", false)]).await,
        1002,
        "unmasked frame"
    );
    assert_eq!(
        protocol_error(&gw, &[(0xC1, b"hi", true)]).await,
        1002,
        "RSV1 without extension"
    );
    assert_eq!(
        protocol_error(&gw, &[(0x83, b"", true)]).await,
        1002,
        "reserved opcode"
    );
    assert_eq!(
        protocol_error(&gw, &[(0x80, b"x", true)]).await,
        1002,
        "continuation without start"
    );
    assert_eq!(
        protocol_error(&gw, &[(0x88, &[0x03], true)]).await,
        1002,
        "one-byte close payload"
    );
    assert_eq!(
        protocol_error(&gw, &[(0x88, &[0x03, 0xED], true)]).await,
        1002,
        "close code 1005 on the wire"
    );
    let big = vec![b'a'; 65 << 10];
    assert_eq!(
        protocol_error(&gw, &[(0x82, &big, true)]).await,
        1009,
        "frame over max_frame_size"
    );
    let part = vec![b'a'; 60 << 10];
    assert_eq!(
        protocol_error(&gw, &[(0x02, &part, true), (0x80, &part, true)]).await,
        1009,
        "fragments over max_message_size"
    );
    // Invalid UTF-8 in the first fragment fails at once, before the message ends.
    assert_eq!(
        protocol_error(&gw, &[(0x01, &[b'o', b'k', 0xF8], true)]).await,
        1007
    );
}

#[tokio::test]
async fn a_protocol_error_is_reported_to_the_plugin_with_its_code() {
    let gw = Gateway::start("close-protocol-plugin", TESTKIT);
    let mut watcher = connect(&gw.url("/t?watch=1")).await;
    let mut raw = Raw::connect(gw.addr, "/t").await;
    let id = raw.id().await;
    raw.send_frame(0x81, &[0xFF], true).await;
    assert_eq!(raw.expect_close().await, 1007);
    let note = next_text(&mut watcher).await;
    assert!(note.starts_with(&format!("closed {id} 1007 ")), "{note}");
}
