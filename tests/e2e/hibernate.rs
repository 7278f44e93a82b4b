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
