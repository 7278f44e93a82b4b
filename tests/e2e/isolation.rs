//! Routes are sealed from each other: connection ids, rooms and metadata of
//! one route are out of reach of another route's plugin. Instances share no
//! random stream either.

use std::time::Duration;

use crate::support::*;

const TWO_ROUTES: &str = "[[route]]\npath = \"/a\"\nplugin = \"{testkit}\"\n\n[[route]]\npath = \"/b\"\nplugin = \"{testkit}\"\n";

#[tokio::test]
async fn a_plugin_cannot_reach_another_routes_connections_or_rooms() {
    let gw = Gateway::start("isolation", TWO_ROUTES);
    let mut a = connect(&gw.url("/a")).await;
    let mut b = connect(&gw.url("/b")).await;
    let a_id = conn_id(&mut a).await;
    command(&mut a, "meta-set secret 42").await;

    assert_eq!(
        command(&mut b, &format!("send {a_id} hello")).await,
        "err unknown-connection"
    );
    assert_eq!(
        command(&mut b, &format!("close-other {a_id} 4000")).await,
        "err unknown-connection"
    );
    assert_eq!(
        command(&mut b, &format!("meta-get {a_id} secret")).await,
        "err unknown-connection"
    );
    assert_eq!(
        command(&mut b, &format!("timer-other {a_id} 10")).await,
        "err unknown-connection"
    );

    // Same room name on both routes: two different rooms.
    assert_eq!(command(&mut a, "join lobby").await, "ok joined");
    assert_eq!(command(&mut b, "join lobby").await, "ok joined");
    assert_eq!(command(&mut b, "size lobby").await, "ok 1");
    assert_eq!(command(&mut b, "broadcast lobby psst").await, "ok 0");
    expect_silence(&mut a, Duration::from_millis(200)).await;

    // Within a route the same calls work.
    let mut a2 = connect(&gw.url("/a")).await;
    assert_eq!(
        command(&mut a2, &format!("meta-get {a_id} secret")).await,
        "ok 42"
    );
    assert_eq!(
        command(&mut a2, &format!("send {a_id} hello")).await,
        "ok sent"
    );
    assert_eq!(next_text(&mut a).await, "hello");
    // Timers only for the instance's own connection.
    assert_eq!(
        command(&mut a2, &format!("timer-other {a_id} 10")).await,
        "err not-owner"
    );
}

#[tokio::test]
async fn a_plugin_can_close_another_connection_of_its_route() {
    let gw = Gateway::start("isolation-close", TWO_ROUTES);
    let mut a = connect(&gw.url("/a")).await;
    let mut a2 = connect(&gw.url("/a")).await;
    let a_id = conn_id(&mut a).await;
    assert_eq!(
        command(&mut a2, &format!("close-other {a_id} 4002")).await,
        "ok closing"
    );
    expect_close(&mut a, 4002).await;
}

#[tokio::test]
async fn timers_fire_once_for_their_connection() {
    let gw = Gateway::start("timers", TWO_ROUTES);
    let mut a = connect(&gw.url("/a")).await;
    let answer = command(&mut a, "timer 50").await;
    let timer = answer.trim_start_matches("ok ");
    assert_eq!(next_text(&mut a).await, format!("timer {timer}"));
    expect_silence(&mut a, Duration::from_millis(200)).await;
}

#[tokio::test]
async fn every_call_to_wasi_random_returns_fresh_bytes_on_every_connection() {
    let gw = Gateway::start(
        "isolation-random",
        "[[route]]\npath = \"/kit\"\nplugin = \"{testkit}\"\n",
    );
    let mut seen = std::collections::HashSet::new();
    for _ in 0..2 {
        let mut ws = connect(&gw.url("/kit")).await;
        for _ in 0..2 {
            let answer = command(&mut ws, "random").await;
            let values: Vec<&str> = answer
                .strip_prefix("ok ")
                .unwrap_or_else(|| panic!("random: {answer}"))
                .split(' ')
                .collect();
            assert_eq!(values.len(), 2, "{answer}");
            for v in values {
                assert_eq!(v.len(), 32, "{answer}");
                assert_ne!(v, "0".repeat(32), "{answer}");
                assert!(seen.insert(v.to_string()), "{v} came twice");
            }
        }
    }
}
