//! Messages go through the echo plugin intact, whatever their size or
//! fragmentation.

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

const ECHO: &str = "[[route]]\npath = \"/echo\"\nplugin = \"builtin:echo\"\n";

#[tokio::test]
async fn echo_returns_text_and_binary_messages() {
    let gw = Gateway::start("echo-basic", ECHO);
    let mut ws = connect(&gw.url("/echo")).await;
    send(&mut ws, "hello, wasmgate ✓").await;
    assert_eq!(next_text(&mut ws).await, "hello, wasmgate ✓");
    ws.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    assert_eq!(next(&mut ws).await, Message::binary(vec![0u8, 1, 2, 255]));
    send(&mut ws, "").await;
    assert_eq!(next_text(&mut ws).await, "");
}

#[tokio::test]
async fn echo_returns_a_one_mebibyte_message() {
    let gw = Gateway::start("echo-1mib", ECHO);
    let mut ws = connect(&gw.url("/echo")).await;
    let big: Vec<u8> = (0..1 << 20).map(|i| (i * 7 % 251) as u8).collect();
    ws.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(next(&mut ws).await, Message::binary(big));
}

#[tokio::test]
async fn fragmented_client_message_arrives_whole() {
    let gw = Gateway::start("echo-fragments", ECHO);
    let mut raw = Raw::connect(gw.addr, "/echo").await;
    // "héllo wörld" split inside the two-byte characters, with a ping between
    // fragments (control frames may be interleaved).
    let text = "héllo wörld".as_bytes();
    raw.send_frame(0x01, &text[..2], true).await;
    raw.send_frame(0x00, &text[2..8], true).await;
    raw.send_frame(0x89, b"mid", true).await;
    raw.send_frame(0x80, &text[8..], true).await;
    let (b0, pong) = raw.read_frame().await.expect("pong");
    assert_eq!((b0, pong.as_slice()), (0x8A, &b"mid"[..]));
    let (b0, echoed) = raw.read_frame().await.expect("echo");
    assert_eq!(b0, 0x81, "one final text frame");
    assert_eq!(echoed, text);
}

#[tokio::test]
async fn many_messages_keep_their_order() {
    let gw = Gateway::start("echo-order", ECHO);
    let mut ws = connect(&gw.url("/echo")).await;
    for i in 0..500 {
        ws.feed(Message::text(i.to_string())).await.unwrap();
    }
    ws.flush().await.unwrap();
    for i in 0..500 {
        assert_eq!(next_text(&mut ws).await, i.to_string());
    }
}

#[tokio::test]
async fn a_single_threaded_gateway_serves_the_same() {
    let gw = Gateway::start(
        "echo-threads-1",
        &format!("[server]\nthreads = 1\n\n{ECHO}"),
    );
    let mut a = connect(&gw.url("/echo")).await;
    let mut b = connect(&gw.url("/echo")).await;
    send(&mut a, "one").await;
    send(&mut b, "two").await;
    assert_eq!(next_text(&mut a).await, "one");
    assert_eq!(next_text(&mut b).await, "two");
}
