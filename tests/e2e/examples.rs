//! The example plugins do what their docs say: chat, auth, ticker.

use std::time::{Duration, Instant};

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

#[tokio::test]
async fn chat_broadcasts_to_the_room_except_the_sender_and_announces_joins_and_leaves() {
    let gw = Gateway::start(
        "chat",
        "[[route]]\npath = \"/chat\"\nplugin = \"builtin:chat\"\n",
    );
    let mut ana = connect(&gw.url("/chat?room=lobby&name=ana")).await;
    let welcome = next_json(&mut ana).await;
    assert_eq!(welcome["type"], "welcome");
    assert_eq!(welcome["members"], 1);

    let mut bob = connect(&gw.url("/chat?room=lobby&name=bob")).await;
    assert_eq!(next_json(&mut bob).await["members"], 2);
    let join = next_json(&mut ana).await;
    assert_eq!(
        (join["type"].as_str(), join["name"].as_str()),
        (Some("join"), Some("bob"))
    );

    let mut cy = connect(&gw.url("/chat?room=lobby&name=cy")).await;
    assert_eq!(next_json(&mut cy).await["members"], 3);
    assert_eq!(next_json(&mut ana).await["name"], "cy");
    assert_eq!(next_json(&mut bob).await["name"], "cy");

    // Someone in another room hears nothing.
    let mut dee = connect(&gw.url("/chat?room=kitchen&name=dee")).await;
    assert_eq!(next_json(&mut dee).await["members"], 1);

    send(&mut bob, "hi all").await;
    for ws in [&mut ana, &mut cy] {
        let m = next_json(ws).await;
        assert_eq!(m["type"], "message");
        assert_eq!(m["from"], "bob");
        assert_eq!(m["text"], "hi all");
    }
    // The sender is excluded: the next thing bob sees is cy's message.
    send(&mut cy, "hey bob").await;
    let m = next_json(&mut bob).await;
    assert_eq!(
        (m["from"].as_str(), m["text"].as_str()),
        (Some("cy"), Some("hey bob"))
    );
    assert_eq!(next_json(&mut ana).await["text"], "hey bob");

    cy.close(None).await.unwrap();
    for ws in [&mut ana, &mut bob] {
        let m = next_json(ws).await;
        assert_eq!(
            (m["type"].as_str(), m["name"].as_str()),
            (Some("leave"), Some("cy"))
        );
    }
    expect_silence(&mut dee, Duration::from_millis(200)).await;
}

#[tokio::test]
async fn chat_refuses_binary_messages_with_1003() {
    let gw = Gateway::start(
        "chat-binary",
        "[[route]]\npath = \"/chat\"\nplugin = \"builtin:chat\"\n",
    );
    let mut ws = connect(&gw.url("/chat?name=ana")).await;
    next_json(&mut ws).await;
    ws.send(Message::binary(vec![1u8, 2])).await.unwrap();
    expect_close(&mut ws, 1003).await;
}

const AUTH: &str = "[[route]]\npath = \"/auth\"\nplugin = \"builtin:auth\"\n[route.config]\nusers = \"s3cret=alice,hunter2=bob\"\n";

#[tokio::test]
async fn auth_rejects_a_missing_or_wrong_token_with_401_and_a_body() {
    let gw = Gateway::start("auth-reject", AUTH);
    for path in ["/auth", "/auth?token=nope"] {
        let reply = http(gw.addr, &upgrade_request(path, "")).await;
        assert_eq!(reply.status, 401, "{path}");
        assert!(
            reply.head.contains("www-authenticate: bearer"),
            "{}",
            reply.head
        );
        assert_eq!(reply.body, "missing or invalid token");
    }
}

#[tokio::test]
async fn auth_greets_the_user_by_name_from_a_query_token_or_a_bearer_header() {
    let gw = Gateway::start("auth-ok", AUTH);
    let mut ws = connect(&gw.url("/auth?token=s3cret")).await;
    assert_eq!(next_text(&mut ws).await, "hello, alice");
    send(&mut ws, "hi").await;
    assert_eq!(next_text(&mut ws).await, "alice: hi");

    let mut req = gw.url("/auth").into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", "Bearer hunter2".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "hello, bob");
}

#[tokio::test]
async fn ticker_pushes_telemetry_at_the_configured_interval_until_closed() {
    let gw = Gateway::start(
        "ticker",
        "[[route]]\npath = \"/t\"\nplugin = \"builtin:ticker\"\n[route.config]\ninterval_ms = \"100\"\n",
    );
    let mut ws = connect(&gw.url("/t")).await;
    let start = Instant::now();
    let mut seqs = Vec::new();
    for _ in 0..5 {
        let m = next_json(&mut ws).await;
        assert_eq!(m["type"], "tick");
        assert_eq!(m["interval_ms"], 100);
        seqs.push(m["seq"].as_u64().unwrap());
    }
    let took = start.elapsed();
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
    // Five ticks at 100 ms: 500 ms, with slack for a loaded machine but
    // far from a wrong unit (5 ms or 5 s).
    assert!(took >= Duration::from_millis(450), "too fast: {took:?}");
    assert!(took < Duration::from_millis(1500), "too slow: {took:?}");
}

#[tokio::test]
async fn ticker_counts_on_across_hibernation() {
    let gw = Gateway::start(
        "ticker-hibernate",
        "[[route]]\npath = \"/t\"\nplugin = \"builtin:ticker\"\nhibernate_after = \"50ms\"\n[route.config]\ninterval_ms = \"150\"\n",
    );
    let mut ws = connect(&gw.url("/t")).await;
    let mut seqs = Vec::new();
    for _ in 0..3 {
        seqs.push(next_json(&mut ws).await["seq"].as_u64().unwrap());
    }
    // Each tick found the connection hibernated and woke it on a fresh
    // instance: the count lives in metadata, not in the instance.
    assert_eq!(seqs, [1, 2, 3]);
    assert!(
        gw.log().matches("resumed from hibernation").count() >= 2,
        "{}",
        gw.log()
    );
}

#[tokio::test]
async fn fanout_delivers_each_message_unchanged_to_the_other_members_of_its_room() {
    let gw = Gateway::start(
        "fanout",
        "[[route]]\npath = \"/f\"\nplugin = \"builtin:fanout\"\n",
    );
    let mut a = connect(&gw.url("/f?room=news")).await;
    let mut b = connect(&gw.url("/f?room=news")).await;
    let mut c = connect(&gw.url("/f?room=news")).await;
    let mut other = connect(&gw.url("/f?room=sports")).await;
    send(&mut a, "headline").await;
    assert_eq!(next_text(&mut b).await, "headline");
    assert_eq!(next_text(&mut c).await, "headline");
    b.send(Message::binary(vec![9u8, 8, 7])).await.unwrap();
    assert_eq!(next(&mut a).await, Message::binary(vec![9u8, 8, 7]));
    assert_eq!(next(&mut c).await, Message::binary(vec![9u8, 8, 7]));
    // The sender gets nothing back; the other room hears nothing.
    expect_silence(&mut a, Duration::from_millis(200)).await;
    expect_silence(&mut other, Duration::from_millis(50)).await;
}
