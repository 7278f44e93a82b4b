//! `isolation = "shared"`: one plugin instance serves every connection of a
//! route, one event at a time, each call seeing the connection whose event
//! it handles; a trap replaces the instance and closes only the connection
//! whose event trapped.

use std::time::Duration;

use crate::support::*;

const CONFIG: &str = "[[route]]\npath = \"/s\"\nplugin = \"{testkit}\"\nisolation = \"shared\"\n\n\
                      [[route]]\npath = \"/c\"\nplugin = \"{testkit}\"\n";

#[tokio::test]
async fn a_shared_route_serves_all_its_connections_from_one_instance() {
    let gw = Gateway::start("shared-one-instance", CONFIG);
    let mut a = connect(&gw.url("/s")).await;
    let mut b = connect(&gw.url("/s")).await;
    // Guest memory is the route's: the counter goes on across connections.
    assert_eq!(command(&mut a, "hits").await, "ok 1");
    assert_eq!(command(&mut b, "hits").await, "ok 2");
    assert_eq!(command(&mut a, "hits").await, "ok 3");
    // With one instance per connection, each counts alone.
    let mut c = connect(&gw.url("/c")).await;
    let mut d = connect(&gw.url("/c")).await;
    assert_eq!(command(&mut c, "hits").await, "ok 1");
    assert_eq!(command(&mut d, "hits").await, "ok 1");
}

#[tokio::test]
async fn each_call_on_a_shared_instance_acts_for_the_connection_whose_event_it_handles() {
    let gw = Gateway::start("shared-identity", CONFIG);
    let mut a = connect(&gw.url("/s")).await;
    let mut b = connect(&gw.url("/s")).await;
    let (ida, idb) = (conn_id(&mut a).await, conn_id(&mut b).await);
    assert_ne!(ida, idb);
    // Replies go to the sender, metadata is the sender's.
    assert_eq!(command(&mut a, "meta-set name ana").await, "ok set");
    assert_eq!(command(&mut b, "meta-set name bo").await, "ok set");
    assert_eq!(
        command(&mut b, &format!("meta-get {ida} name")).await,
        "ok ana"
    );
    assert_eq!(
        command(&mut a, &format!("meta-get {idb} name")).await,
        "ok bo"
    );
    // Timers belong to the connection that set them and fire there.
    let ta = command(&mut a, "timer 50").await;
    let tb = command(&mut b, "timer 80").await;
    assert_eq!(next_text(&mut a).await, format!("timer {}", &ta[3..]));
    assert_eq!(next_text(&mut b).await, format!("timer {}", &tb[3..]));
    // A connection may not set another's timer, shared instance or not.
    assert_eq!(
        command(&mut a, &format!("timer-other {idb} 10")).await,
        "err not-owner"
    );
    // Output lines are tagged with the connection whose event printed them.
    assert_eq!(command(&mut b, "print x").await, "ok printed");
    let line = gw.wait_log("testkit: x on stdout");
    assert!(line.contains(&format!("conn={idb}")), "{line}");
}

#[tokio::test]
async fn a_trap_on_a_shared_instance_closes_only_its_connection_and_a_fresh_instance_serves_the_rest(
) {
    let gw = Gateway::start("shared-trap", CONFIG);
    let mut a = connect(&gw.url("/s")).await;
    let ida = conn_id(&mut a).await;
    assert_eq!(command(&mut a, "meta-set name ana").await, "ok set");
    assert_eq!(command(&mut a, "join lobby").await, "ok joined");
    assert_eq!(command(&mut a, "hits").await, "ok 1");
    let mut b = connect(&gw.url("/s")).await;
    send(&mut b, "trap").await;
    expect_close(&mut b, 1011).await;
    // A goes on, on a fresh instance (started by its next event): told
    // first through on-resume, its host-side state intact, its guest state
    // (the counter) started afresh.
    assert_eq!(command(&mut a, "resumed").await, "ok 1");
    gw.wait_log("shared instance replaced");
    gw.wait_log(&format!("on-resume {ida}"));
    assert_eq!(
        command(&mut a, &format!("meta-get {ida} name")).await,
        "ok ana"
    );
    assert_eq!(command(&mut a, "size lobby").await, "ok 1");
    assert_eq!(command(&mut a, "hits").await, "ok 1");
    // New connections are served too.
    let mut c = connect(&gw.url("/s")).await;
    assert_eq!(command(&mut c, "hits").await, "ok 2");
}

#[tokio::test]
async fn the_connection_whose_event_trapped_gets_no_on_close_and_the_others_get_theirs() {
    let gw = Gateway::start("shared-trap-close", CONFIG);
    let mut watcher = connect(&gw.url("/s?watch=1")).await;
    let mut b = connect(&gw.url("/s")).await;
    let idb = conn_id(&mut b).await;
    send(&mut b, "trap").await;
    expect_close(&mut b, 1011).await;
    let mut c = connect(&gw.url("/s")).await;
    let idc = conn_id(&mut c).await;
    drop(c);
    // The watcher hears of c (closed without a handshake: 1006), never of b.
    assert_eq!(next_text(&mut watcher).await, format!("closed {idc} 1006 "));
    assert!(
        !gw.log().contains(&format!("on-close {idb} ")),
        "{}",
        gw.log()
    );
}

#[tokio::test]
async fn a_hibernated_connection_on_a_shared_instance_keeps_its_guest_state() {
    let gw = Gateway::start(
        "shared-hibernate",
        "[[route]]\npath = \"/s\"\nplugin = \"{testkit}\"\nisolation = \"shared\"\nhibernate_after = \"200ms\"\n",
    );
    let mut a = connect(&gw.url("/s")).await;
    assert_eq!(command(&mut a, "hits").await, "ok 1");
    gw.wait_log("connection hibernated");
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Nothing was released: no on-resume, and the instance's memory is
    // still there.
    assert_eq!(command(&mut a, "hits").await, "ok 2");
    assert_eq!(command(&mut a, "resumed").await, "ok 0");
    gw.wait_log("resumed from hibernation");
}

#[tokio::test]
async fn migrating_to_a_new_version_moves_shared_connections_to_its_instance() {
    let config = "[[route]]\npath = \"/s\"\nplugin = \"plugin.wasm\"\nisolation = \"shared\"\non_reload = \"migrate\"\n";
    let (gw, dir) = serve_copy("shared-migrate", &fixture_0_1_0(), config, &[]);
    gw.wait_log("hot reload: watching");
    let mut a = connect(&gw.url("/s")).await;
    let mut b = connect(&gw.url("/s")).await;
    let (ida, idb) = (conn_id(&mut a).await, conn_id(&mut b).await);
    assert_eq!(command(&mut a, "meta-set k v").await, "ok set");
    // The old version does not know `resumed`.
    assert!(command(&mut a, "resumed").await.starts_with("err "));
    std::fs::copy(plugin("testkit"), dir.join("plugin.wasm")).expect("deploy");
    gw.wait_log("(version 2,");
    // Both move to the new version's one instance, each told by on-resume.
    assert_eq!(command(&mut a, "resumed").await, "ok 1");
    assert_eq!(command(&mut b, "resumed").await, "ok 2");
    gw.wait_log(&format!("on-resume {ida}"));
    gw.wait_log(&format!("on-resume {idb}"));
    assert_eq!(command(&mut a, &format!("meta-get {ida} k")).await, "ok v");
    assert_eq!(command(&mut a, "hits").await, "ok 1");
    assert_eq!(command(&mut b, "hits").await, "ok 2");
}
