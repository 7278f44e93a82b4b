//! A failing plugin harms only its own connection: a trap, a runaway loop or
//! a memory grab closes that connection with 1011 and is logged with the
//! route, the plugin file and the export; everything else keeps running.

use std::time::{Duration, Instant};

use crate::support::*;

const CONFIG: &str = "[sandbox]\nmax_call_time = \"200ms\"\nmax_memory = \"16MiB\"\n\n[[route]]\npath = \"/t\"\nplugin = \"{testkit}\"\n\n[[route]]\npath = \"/echo\"\nplugin = \"builtin:echo\"\n";

async fn assert_still_serving(gw: &Gateway, bystander: &mut Ws) {
    send(bystander, "still here").await;
    assert_eq!(next_text(bystander).await, "still here");
    let mut fresh = connect(&gw.url("/echo")).await;
    send(&mut fresh, "new").await;
    assert_eq!(next_text(&mut fresh).await, "new");
}

#[tokio::test]
async fn a_trapping_plugin_closes_its_connection_with_1011_and_others_keep_echoing() {
    let gw = Gateway::start("trap", CONFIG);
    let mut bystander = connect(&gw.url("/echo")).await;
    let mut neighbour = connect(&gw.url("/t")).await;
    let mut ws = connect(&gw.url("/t")).await;
    send(&mut ws, "trap").await;
    expect_close(&mut ws, 1011).await;
    assert_still_serving(&gw, &mut bystander).await;
    // Another connection of the same route has its own instance.
    assert_eq!(command(&mut neighbour, "echo fine").await, "ok fine");
    let line = gw.wait_log("plugin failed");
    assert!(line.contains("route=/t"), "{line}");
    assert!(line.contains("testkit.wasm"), "{line}");
    assert!(line.contains("export=\"on-message\""), "{line}");
    // The guest's panic message is a log line tied to its route and
    // connection, not anonymous output on the gateway's stderr.
    let panic = gw.wait_log("testkit: trap as asked");
    assert!(
        panic.contains("route=/t") && panic.contains("conn=") && panic.contains("stderr"),
        "{panic}"
    );
}

#[tokio::test]
async fn a_runaway_handler_is_interrupted_after_max_call_time() {
    let gw = Gateway::start("spin", CONFIG);
    let mut bystander = connect(&gw.url("/echo")).await;
    let mut ws = connect(&gw.url("/t")).await;
    let start = Instant::now();
    send(&mut ws, "spin").await;
    expect_close(&mut ws, 1011).await;
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "took {:?}",
        start.elapsed()
    );
    assert_still_serving(&gw, &mut bystander).await;
    let line = gw.wait_log("plugin failed");
    assert!(
        line.contains("exceeded max_call_time (200ms)"),
        "the log names the limit: {line}"
    );
    assert!(!line.contains("wasm trap: interrupt"), "{line}");
}

#[tokio::test]
async fn a_plugin_growing_past_max_memory_fails_alone() {
    let gw = Gateway::start("memory", CONFIG);
    let mut bystander = connect(&gw.url("/echo")).await;
    let mut ws = connect(&gw.url("/t")).await;
    assert_eq!(command(&mut ws, "grow 4").await, format!("ok {}", 4 << 20));
    send(&mut ws, "grow 64").await;
    expect_close(&mut ws, 1011).await;
    assert_still_serving(&gw, &mut bystander).await;
}

#[tokio::test]
async fn a_trap_in_on_open_refuses_the_upgrade_with_500() {
    let gw = Gateway::start("trap-open", CONFIG);
    let reply = http(gw.addr, &upgrade_request("/t?trap-open=1", "")).await;
    assert_eq!(reply.status, 500);
    let mut ws = connect(&gw.url("/t")).await;
    assert_eq!(command(&mut ws, "echo ok").await, "ok ok");
    gw.wait_log("export=\"on-open\"");
}

#[tokio::test]
async fn a_plugin_may_print_to_stdout_and_stderr() {
    let gw = Gateway::start("print", CONFIG);
    let mut ws = connect(&gw.url("/t")).await;
    assert_eq!(command(&mut ws, "print hello").await, "ok printed");
    assert_eq!(command(&mut ws, "print again").await, "ok printed");
    let id = conn_id(&mut ws).await;
    for text in ["testkit: on stderr", "testkit: again on stdout"] {
        let line = gw.wait_log(text);
        assert!(
            line.contains("route=/t") && line.contains(&format!("conn={id}")),
            "output is tagged with its route and connection: {line}"
        );
    }
}

#[tokio::test]
async fn a_plugin_that_blocks_is_closed_with_1011_and_the_log_says_why() {
    let gw = Gateway::start("block", CONFIG);
    let mut bystander = connect(&gw.url("/echo")).await;
    let mut ws = connect(&gw.url("/t")).await;
    send(&mut ws, "sleep 50").await;
    expect_close(&mut ws, 1011).await;
    let line = gw.wait_log("plugin failed");
    assert!(line.contains("may not block"), "{line}");
    assert_still_serving(&gw, &mut bystander).await;
}
