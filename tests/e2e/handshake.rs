//! The opening handshake: refusals get the right HTTP status, the plugin can
//! reject with its own response, and subprotocols are negotiated.

use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::support::*;

const ROUTES: &str = "[[route]]\npath = \"/t\"\nplugin = \"{testkit}\"\n[route.config]\nprotocols = \"chat.v2,chat.v1\"\n\n\
[[route]]\npath = \"/only-v1\"\nplugin = \"{testkit}\"\nsubprotocols = [\"chat.v1\"]\n[route.config]\nprotocols = \"chat.v2,chat.v1\"\n";

#[tokio::test]
async fn bad_upgrades_get_their_http_status() {
    let gw = Gateway::start("handshake-status", ROUTES);
    let plain = http(gw.addr, "GET /t HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(plain.status, 426, "plain HTTP to a WebSocket route");
    assert!(plain.head.contains("upgrade: websocket"));

    let unknown = http(gw.addr, &upgrade_request("/nowhere", "")).await;
    assert_eq!(unknown.status, 404);

    let v8 = upgrade_request("/t", "").replace("Version: 13", "Version: 8");
    let v8 = http(gw.addr, &v8).await;
    assert_eq!(v8.status, 426);
    assert!(v8.head.contains("sec-websocket-version: 13"));

    let no_key = "GET /t HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n";
    assert_eq!(http(gw.addr, no_key).await.status, 400);
    let bad_key = upgrade_request("/t", "").replace("dGhlIHNhbXBsZSBub25jZQ==", "short");
    assert_eq!(http(gw.addr, &bad_key).await.status, 400);
    let no_conn =
        upgrade_request("/t", "").replace("Connection: Upgrade", "Connection: keep-alive");
    assert_eq!(http(gw.addr, &no_conn).await.status, 400);
    let post = upgrade_request("/t", "").replace("GET", "POST");
    assert_eq!(http(gw.addr, &post).await.status, 400);
}

#[tokio::test]
async fn plugin_rejection_sends_its_status_and_body() {
    let gw = Gateway::start("handshake-reject", ROUTES);
    let reply = http(gw.addr, &upgrade_request("/t?reject=403", "")).await;
    assert_eq!(reply.status, 403);
    assert_eq!(reply.body, "rejected by testkit");
    // Out-of-range statuses from a plugin become 500.
    let reply = http(gw.addr, &upgrade_request("/t?reject=200", "")).await;
    assert_eq!(reply.status, 500);
}

#[tokio::test]
async fn plugin_selects_a_subprotocol_from_the_clients_offers() {
    let gw = Gateway::start("handshake-subprotocol", ROUTES);
    let mut req = gw.url("/t").into_client_request().unwrap();
    req.headers_mut().insert(
        "sec-websocket-protocol",
        "mqtt, chat.v1, chat.v2".parse().unwrap(),
    );
    let (_ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(
        resp.headers()["sec-websocket-protocol"],
        "chat.v1",
        "first offer the plugin speaks"
    );

    // The route's `subprotocols` list filters what the plugin is offered.
    let reply = http(
        gw.addr,
        &upgrade_request("/only-v1", "Sec-WebSocket-Protocol: chat.v2, chat.v1\r\n"),
    )
    .await;
    assert_eq!(reply.status, 101);
    assert!(
        reply.head.contains("sec-websocket-protocol: chat.v1\r\n"),
        "{}",
        reply.head
    );

    // No common subprotocol: accepted without one.
    let reply = http(
        gw.addr,
        &upgrade_request("/t", "Sec-WebSocket-Protocol: mqtt\r\n"),
    )
    .await;
    assert_eq!(reply.status, 101);
    assert!(
        !reply.head.contains("sec-websocket-protocol"),
        "{}",
        reply.head
    );
}
