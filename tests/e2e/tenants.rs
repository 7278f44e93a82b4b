//! Tenants: a request's host picks the tenant, the path picks one of that
//! tenant's routes, and nothing one tenant's plugin can name (connections,
//! rooms, metadata, timers, config values) reaches another tenant, even
//! with the same paths and room names.

use std::time::Duration;

use crate::support::*;

/// Two tenants serving the same path with the same plugin, and a default
/// tenant (top-level routes) serving `/chat` and `/only-default`.
const TWO_TENANTS: &str = r#"
[[route]]
path = "/chat"
plugin = "{testkit}"
config = { who = "default" }

[[route]]
path = "/only-default"
plugin = "{testkit}"
config = { who = "default" }

[[tenant]]
name = "acme"
hosts = ["chat.acme.test", "a.example.test"]
max_connections = 2

[[tenant.route]]
path = "/chat"
plugin = "{testkit}"
config = { who = "acme" }

[[tenant]]
name = "globex"
hosts = ["*.globex.test", "*.example.test"]

[[tenant.route]]
path = "/chat"
plugin = "{testkit}"
config = { who = "globex" }
"#;

#[tokio::test]
async fn two_tenants_with_the_same_path_and_room_name_never_see_each_other() {
    let gw = Gateway::start("tenants-sealed", TWO_TENANTS);
    let url = gw.url("/chat");
    let mut acme = connect_host(&url, "chat.acme.test").await;
    let mut globex = connect_host(&url, "eu.globex.test").await;
    assert_eq!(command(&mut acme, "config who").await, "ok acme");
    assert_eq!(command(&mut globex, "config who").await, "ok globex");

    let acme_id = conn_id(&mut acme).await;
    command(&mut acme, "meta-set secret 42").await;
    assert_eq!(command(&mut acme, "join lobby").await, "ok joined");
    assert_eq!(command(&mut globex, "join lobby").await, "ok joined");
    // Same room name: two rooms.
    assert_eq!(command(&mut globex, "size lobby").await, "ok 1");
    assert_eq!(command(&mut globex, "broadcast lobby psst").await, "ok 0");
    expect_silence(&mut acme, Duration::from_millis(200)).await;
    for cmd in [
        format!("send {acme_id} hello"),
        format!("meta-get {acme_id} secret"),
        format!("close-other {acme_id} 4000"),
        format!("timer-other {acme_id} 10"),
    ] {
        assert_eq!(
            command(&mut globex, &cmd).await,
            "err unknown-connection",
            "{cmd}"
        );
    }
    // The default tenant's /chat is a third route with its own room.
    let mut default = connect(&url).await;
    assert_eq!(command(&mut default, "config who").await, "ok default");
    assert_eq!(command(&mut default, "size lobby").await, "ok 0");
    // Within a tenant, the same calls work.
    let mut acme2 = connect_host(&url, "chat.acme.test").await;
    assert_eq!(
        command(&mut acme2, &format!("meta-get {acme_id} secret")).await,
        "ok 42"
    );
    assert_eq!(command(&mut acme2, "size lobby").await, "ok 1");
}

#[tokio::test]
async fn routing_picks_the_tenant_by_host_exact_before_wildcard_then_the_path() {
    let gw = Gateway::start("tenants-routing", TWO_TENANTS);
    let url = gw.url("/chat");
    let who = |host: &'static str| {
        let url = url.clone();
        async move {
            let mut ws = connect_host(&url, host).await;
            command(&mut ws, "config who").await
        }
    };
    // An exact name beats a wildcard that also matches it.
    assert_eq!(who("a.example.test").await, "ok acme");
    assert_eq!(who("b.example.test").await, "ok globex");
    // Case, port and a trailing dot do not matter.
    assert_eq!(who("CHAT.Acme.TEST:8080").await, "ok acme");
    assert_eq!(who("chat.acme.test.").await, "ok acme");
    // A wildcard covers exactly one label.
    assert_eq!(who("example.test").await, "ok default");
    assert_eq!(who("x.y.example.test").await, "ok default");
    // Unknown hosts go to the default tenant.
    assert_eq!(who("elsewhere.test").await, "ok default");

    // A path only the default tenant routes is 404 for a tenant's host.
    let e = try_connect_host(&gw.url("/only-default"), "chat.acme.test")
        .await
        .expect_err("refused");
    assert_eq!(refusal_status(&e), 404);
    let mut ok = connect_host(&gw.url("/only-default"), "elsewhere.test").await;
    assert_eq!(command(&mut ok, "config who").await, "ok default");
}

#[tokio::test]
async fn a_host_no_tenant_serves_gets_404_when_there_are_no_default_routes() {
    let gw = Gateway::start(
        "tenants-no-default",
        r#"
[[tenant]]
name = "acme"
hosts = ["chat.acme.test"]

[[tenant.route]]
path = "/chat"
plugin = "{testkit}"
"#,
    );
    let e = try_connect_host(&gw.url("/chat"), "other.test")
        .await
        .expect_err("refused");
    assert_eq!(refusal_status(&e), 404);
    let mut ws = connect_host(&gw.url("/chat"), "chat.acme.test").await;
    assert!(command(&mut ws, "id").await.starts_with("ok "));
}

#[tokio::test]
async fn a_tenant_at_its_max_connections_gets_503_while_other_tenants_connect() {
    let gw = Gateway::start("tenants-max-connections", TWO_TENANTS);
    let url = gw.url("/chat");
    let _a = connect_host(&url, "chat.acme.test").await;
    let _b = connect_host(&url, "a.example.test").await;
    let e = try_connect_host(&url, "chat.acme.test")
        .await
        .expect_err("refused");
    assert_eq!(refusal_status(&e), 503);
    let mut globex = connect_host(&url, "eu.globex.test").await;
    assert!(command(&mut globex, "id").await.starts_with("ok "));
    let mut default = connect(&url).await;
    assert!(command(&mut default, "id").await.starts_with("ok "));
    // A slot freed is a slot again.
    drop(_a);
    let mut again = None;
    for _ in 0..50 {
        match try_connect_host(&url, "chat.acme.test").await {
            Ok(ws) => {
                again = Some(ws);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert!(again.is_some(), "a closed connection's slot was not freed");
}

/// An upgrade request for `target` with these `host` header lines.
fn upgrade(target: &str, host_lines: &str) -> String {
    format!(
        "GET {target} HTTP/1.1\r\n{host_lines}Upgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
}

#[tokio::test]
async fn an_absolute_form_target_picks_the_tenant_and_a_malformed_host_is_refused() {
    let gw = Gateway::start("tenants-host-forms", TWO_TENANTS);
    // The authority of an absolute-form target wins over Host (RFC 9112
    // section 3.2.2): only the default tenant routes /only-default.
    let status = |target: &'static str, host: &'static str| {
        let addr = gw.addr;
        async move {
            let reply = http(addr, &upgrade(target, &format!("Host: {host}\r\n"))).await;
            reply.status
        }
    };
    assert_eq!(
        status("http://chat.acme.test/only-default", "elsewhere.test").await,
        404
    );
    assert_eq!(
        status("http://elsewhere.test/only-default", "chat.acme.test").await,
        101
    );
    for host in [
        "user@chat.acme.test",
        "chat.acme.test:abc",
        "chat.acme.test:",
        "chat..acme.test",
        "[::1",
    ] {
        let reply = http(gw.addr, &upgrade("/chat", &format!("Host: {host}\r\n"))).await;
        assert_eq!(reply.status, 400, "Host: {host}: {}", reply.head);
        assert!(reply.body.contains("invalid Host"), "{}", reply.body);
    }
}

#[tokio::test]
async fn a_tenant_without_an_instance_to_spare_gets_503_on_a_shared_route_too() {
    let gw = Gateway::start(
        "tenants-max-instances-shared",
        r#"
[[tenant]]
name = "small"
hosts = ["small.test"]
max_instances = 1

[[tenant.route]]
path = "/own"
plugin = "{testkit}"

[[tenant.route]]
path = "/shared"
plugin = "{testkit}"
isolation = "shared"
"#,
    );
    let _own = connect_host(&gw.url("/own"), "small.test").await;
    let e = try_connect_host(&gw.url("/shared"), "small.test")
        .await
        .expect_err("no instance to spare");
    assert_eq!(refusal_status(&e), 503);
}
