//! Hibernation: a connection with no event for `hibernate_after` has its
//! plugin instance released; its next event (a message, a timer, its close)
//! gets a fresh instance, told through `on-resume`, with the connection's
//! rooms, metadata and timers intact.

use std::time::Duration;

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

const CONFIG: &str =
    "[[route]]\npath = \"/h\"\nplugin = \"{testkit}\"\nhibernate_after = \"300ms\"\n";

#[tokio::test]
async fn an_idle_connection_releases_its_instance_and_its_next_message_finds_its_state() {
    let gw = Gateway::start("hibernate-message", CONFIG);
    let mut ws = connect(&gw.url("/h")).await;
    let id = conn_id(&mut ws).await;
    assert_eq!(command(&mut ws, "meta-set name ana").await, "ok set");
    assert_eq!(command(&mut ws, "join lobby").await, "ok joined");
    let line = gw.wait_log("connection hibernated");
    assert!(line.contains(&format!("conn={id}")), "{line}");
    // The next message wakes it on a fresh instance, resumed first.
    assert_eq!(command(&mut ws, "resumed").await, "ok 1");
    gw.wait_log(&format!("on-resume {id}"));
    assert_eq!(
        command(&mut ws, &format!("meta-get {id} name")).await,
        "ok ana"
    );
    assert_eq!(command(&mut ws, "size lobby").await, "ok 1");
    gw.wait_log("resumed from hibernation");
}

#[tokio::test]
async fn a_timer_set_before_hibernation_fires_and_wakes_the_connection() {
    let gw = Gateway::start("hibernate-timer", CONFIG);
    let mut ws = connect(&gw.url("/h")).await;
    let timer = command(&mut ws, "timer 900").await;
    let timer = timer.strip_prefix("ok ").expect("timer id").to_owned();
    gw.wait_log("connection hibernated");
    assert_eq!(next_text(&mut ws).await, format!("timer {timer}"));
    assert_eq!(command(&mut ws, "resumed").await, "ok 1");
}

#[tokio::test]
async fn a_hibernated_connection_still_gets_on_close() {
    let gw = Gateway::start("hibernate-close", CONFIG);
    let mut watcher = connect(&gw.url("/h?watch=1")).await;
    let mut ws = connect(&gw.url("/h")).await;
    let id = conn_id(&mut ws).await;
    // Both hibernate (a broadcast to the watcher goes to its outbound
    // queue, not to its instance, so it stays hibernated).
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        gw.log().matches("connection hibernated").count() >= 2,
        "{}",
        gw.log()
    );
    ws.send(Message::Close(None)).await.expect("close");
    assert_eq!(next_text(&mut watcher).await, format!("closed {id} 1005 "));
}

#[tokio::test]
async fn pings_do_not_keep_a_connection_from_hibernating() {
    let gw = Gateway::start(
        "hibernate-ping",
        "[server]\nping_interval = \"100ms\"\n\n[[route]]\npath = \"/h\"\nplugin = \"{testkit}\"\nhibernate_after = \"400ms\"\n",
    );
    let mut ws = connect(&gw.url("/h")).await;
    let id = conn_id(&mut ws).await;
    // tungstenite answers the gateway's pings while we wait for a message.
    expect_silence(&mut ws, Duration::from_millis(900)).await;
    let line = gw.wait_log("connection hibernated");
    assert!(line.contains(&format!("conn={id}")), "{line}");
}

/// Waits until the gateway has logged `connection hibernated` for `id`.
async fn wait_hibernated(gw: &Gateway, id: &str) {
    for _ in 0..100 {
        if gw
            .log()
            .lines()
            .any(|l| l.contains("connection hibernated") && names_conn(l, id))
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("conn {id} did not hibernate:\n{}", gw.log());
}

/// Whether log line `line` is about connection `id`.
fn names_conn(line: &str, id: &str) -> bool {
    let field = format!("conn={id}");
    line.ends_with(&field) || line.contains(&format!("{field} "))
}

/// How many times `id` was resumed from hibernation, by the log.
fn resumes(gw: &Gateway, id: &str) -> usize {
    gw.log()
        .lines()
        .filter(|l| l.contains("resumed from hibernation") && names_conn(l, id))
        .count()
}

#[tokio::test]
async fn a_hibernated_connection_receives_sends_from_others_without_waking_its_plugin() {
    let gw = Gateway::start("hibernate-send", CONFIG);
    let mut sleeper = connect(&gw.url("/h")).await;
    let id = conn_id(&mut sleeper).await;
    let mut other = connect(&gw.url("/h")).await;
    wait_hibernated(&gw, &id).await;
    for i in 0..3 {
        assert_eq!(
            command(&mut other, &format!("send {id} hello-{i}")).await,
            "ok sent"
        );
        assert_eq!(next_text(&mut sleeper).await, format!("hello-{i}"));
    }
    // Writing to the peer is not an event for the plugin.
    assert_eq!(resumes(&gw, &id), 0, "{}", gw.log());
    assert_eq!(command(&mut sleeper, "resumed").await, "ok 1");
}

#[tokio::test]
async fn a_hibernated_connection_closed_by_another_gets_its_close_frame_and_on_close() {
    let gw = Gateway::start("hibernate-close-other", CONFIG);
    let mut watcher = connect(&gw.url("/h?watch=1")).await;
    let mut sleeper = connect(&gw.url("/h")).await;
    let id = conn_id(&mut sleeper).await;
    wait_hibernated(&gw, &id).await;
    assert_eq!(
        command(&mut watcher, &format!("close-other {id} 4001")).await,
        "ok closing"
    );
    expect_close(&mut sleeper, 4001).await;
    assert_eq!(next_text(&mut watcher).await, format!("closed {id} 4001 "));
}

#[tokio::test]
async fn a_peer_vanishing_while_hibernated_gets_on_close_with_1006() {
    let gw = Gateway::start("hibernate-vanish", CONFIG);
    let mut watcher = connect(&gw.url("/h?watch=1")).await;
    let mut raw = Raw::connect(gw.addr, "/h").await;
    let id = raw.id().await;
    wait_hibernated(&gw, &id).await;
    drop(raw);
    assert_eq!(next_text(&mut watcher).await, format!("closed {id} 1006 "));
}

#[tokio::test]
async fn frames_arriving_in_pieces_at_a_hibernated_connection_are_reassembled() {
    use tokio::io::AsyncWriteExt;
    let gw = Gateway::start("hibernate-pieces", CONFIG);
    let mut raw = Raw::connect(gw.addr, "/h").await;
    let id = raw.id().await;
    wait_hibernated(&gw, &id).await;
    // A masked 10,000-byte text frame, first its first 3 bytes alone, then
    // the rest: the parked connection's first read takes only part of it.
    let text = format!("echo {}", "x".repeat(10_000 - 5));
    let mut frame = vec![0x81, 0x80 | 126];
    frame.extend_from_slice(&10_000u16.to_be_bytes());
    let key = [1u8, 2, 3, 4];
    frame.extend_from_slice(&key);
    frame.extend(text.bytes().enumerate().map(|(i, b)| b ^ key[i % 4]));
    raw.stream.write_all(&frame[..3]).await.expect("write");
    tokio::time::sleep(Duration::from_millis(100)).await;
    raw.stream.write_all(&frame[3..]).await.expect("write");
    let (b0, reply) = raw.read_frame().await.expect("reply");
    assert_eq!(b0, 0x81);
    assert_eq!(reply.len(), 3 + 10_000 - 5, "ok + the echoed text");
    assert!(reply.starts_with(b"ok xxxx"));
    assert_eq!(resumes(&gw, &id), 1, "{}", gw.log());
}

#[tokio::test]
async fn an_idle_timeout_closes_a_hibernated_connection_with_1001() {
    let gw = Gateway::start(
        "hibernate-idle-timeout",
        "[server]\nidle_timeout = \"1s\"\n\n[[route]]\npath = \"/h\"\nplugin = \"{testkit}\"\nhibernate_after = \"200ms\"\n",
    );
    let mut raw = Raw::connect(gw.addr, "/h").await;
    let id = raw.id().await;
    wait_hibernated(&gw, &id).await;
    assert_eq!(raw.expect_close().await, 1001);
    gw.wait_log(&format!("on-close {id} 1001 idle timeout"));
}
