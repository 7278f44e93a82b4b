//! TLS on the listener (`wss://`): a test CA made here signs the gateway's
//! certificates; clients are tokio-rustls with tokio-tungstenite on top,
//! trusting only that CA (or, to see which certificate a name gets,
//! recording it without checking).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use futures_util::SinkExt;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::support::*;

/// A certificate authority for one test.
struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
}

impl TestCa {
    fn new() -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "wasmgate test CA");
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA cert");
        TestCa {
            der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf certificate for `names`: its chain PEM, key PEM and DER.
    fn leaf(&self, names: &[&str]) -> (String, String, CertificateDer<'static>) {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let params = CertificateParams::new(names).expect("leaf params");
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        (cert.pem(), key.serialize_pem(), cert.der().clone())
    }

    /// Writes a leaf for `names` as `DIR/NAME.pem` and `DIR/NAME.key`.
    fn write_leaf(&self, dir: &Path, name: &str, names: &[&str]) -> CertificateDer<'static> {
        let (cert, key, der) = self.leaf(names);
        std::fs::write(dir.join(format!("{name}.pem")), cert).expect("write cert");
        std::fs::write(dir.join(format!("{name}.key")), key).expect("write key");
        der
    }

    /// A client config trusting only this CA, offering ALPN http/1.1.
    fn client(&self) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.der.clone()).expect("add CA");
        let mut config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("protocol versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

/// A verifier that accepts any certificate and remembers the leaf: to see
/// which certificate the gateway chose for a name.
#[derive(Debug, Default)]
struct Recorder(Mutex<Option<CertificateDer<'static>>>);

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.0.lock().unwrap() = Some(end_entity.clone().into_owned());
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The leaf certificate the gateway at `addr` serves for SNI `name`.
async fn served_certificate(addr: SocketAddr, name: &str) -> CertificateDer<'static> {
    let recorder = Arc::new(Recorder::default());
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(recorder.clone())
            .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let server_name = ServerName::try_from(name.to_owned()).expect("server name");
    tokio::time::timeout(
        WAIT,
        TlsConnector::from(Arc::new(config)).connect(server_name, tcp),
    )
    .await
    .expect("TLS handshake timed out")
    .expect("TLS handshake");
    let der = recorder.0.lock().unwrap().clone();
    der.expect("a certificate")
}

/// A TLS connection to `addr` with SNI `name`, checked against `ca`.
async fn tls_connect(ca: &TestCa, addr: SocketAddr, name: &str) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let server_name = ServerName::try_from(name.to_owned()).expect("server name");
    tokio::time::timeout(
        WAIT,
        TlsConnector::from(ca.client()).connect(server_name, tcp),
    )
    .await
    .expect("TLS handshake timed out")
    .expect("TLS handshake")
}

type Wss = WebSocketStream<TlsStream<TcpStream>>;

/// A WebSocket over TLS to `path`, SNI and `Host` both `name`.
async fn wss(ca: &TestCa, addr: SocketAddr, name: &str, path: &str) -> Wss {
    let tls = tls_connect(ca, addr, name).await;
    let url = format!("wss://{name}:{}{path}", addr.port());
    let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(url, tls))
        .await
        .expect("upgrade timed out")
        .expect("upgrade");
    ws
}

async fn next_wss_text(ws: &mut Wss) -> String {
    use futures_util::StreamExt;
    match tokio::time::timeout(WAIT, ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => t.to_string(),
        other => panic!("expected a text message, got {other:?}"),
    }
}

/// Writes `config` as `DIR/gateway.toml` and serves it on an ephemeral port.
fn serve_in(dir: &Path, config: &str) -> Gateway {
    let file = dir.join("gateway.toml");
    std::fs::write(&file, config).expect("write config");
    Gateway::spawn(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--config",
        file.to_str().expect("utf-8 path"),
    ])
}

/// A gateway with TLS: the default certificate (for `localhost`) in
/// `server.pem`, and `extra` config after `[server]`.
fn tls_gateway(ca: &TestCa, name: &str, extra: &str) -> (Gateway, Scratch) {
    let dir = scratch(name);
    ca.write_leaf(&dir, "server", &["localhost"]);
    let config = format!(
        "[server]\ntls = {{ cert = \"server.pem\", key = \"server.key\" }}\n\n\
         [[route]]\npath = \"/echo\"\nplugin = \"{}\"\n{extra}",
        plugin("echo")
    );
    let gw = serve_in(&dir, &config);
    (gw, dir)
}

#[tokio::test]
async fn a_wss_client_trusting_the_ca_echoes_over_http_1_1() {
    let ca = TestCa::new();
    let (gw, _dir) = tls_gateway(&ca, "tls-echo", "");
    let listening = gw.wait_log("wasmgate listening on");
    assert!(listening.contains("(wss://)"), "{listening}");
    let tls = tls_connect(&ca, gw.addr, "localhost").await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let url = format!("wss://localhost:{}/echo", gw.addr.port());
    let (mut ws, _) = tokio_tungstenite::client_async(url, tls)
        .await
        .expect("upgrade");
    for text in ["over TLS", &"x".repeat(100_000)] {
        ws.send(Message::text(text)).await.expect("send");
        assert_eq!(next_wss_text(&mut ws).await, text);
    }
}

#[tokio::test]
async fn sni_picks_the_tenants_certificate_and_other_names_get_the_default() {
    let ca = TestCa::new();
    let dir = scratch("tls-sni");
    let default = ca.write_leaf(&dir, "server", &["localhost"]);
    let acme = ca.write_leaf(&dir, "acme", &["chat.acme.test", "*.acme.org"]);
    ca.write_leaf(&dir, "beta", &["wrong.test"]);
    let config = format!(
        r#"[server]
tls = {{ cert = "server.pem", key = "server.key" }}

[[route]]
path = "/echo"
plugin = "{echo}"

[[tenant]]
name = "acme"
hosts = ["chat.acme.test", "*.acme.org"]
tls = {{ cert = "acme.pem", key = "acme.key" }}

[[tenant.route]]
path = "/echo"
plugin = "{echo}"

[[tenant]]
name = "beta"
hosts = ["beta.test"]
tls = {{ cert = "beta.pem", key = "beta.key" }}

[[tenant.route]]
path = "/echo"
plugin = "{echo}"
"#,
        echo = plugin("echo")
    );
    let gw = serve_in(&dir, &config);
    // A certificate that does not cover its tenant's host is served, with a
    // warning at start naming both; the others get none.
    let warning = gw.wait_log("is not valid for host");
    assert!(
        warning.contains("beta.pem") && warning.contains("\"beta.test\""),
        "{warning}"
    );
    assert_eq!(gw.log().matches("is not valid for host").count(), 1);
    assert_eq!(served_certificate(gw.addr, "chat.acme.test").await, acme);
    assert_eq!(served_certificate(gw.addr, "Chat.ACME.test").await, acme);
    assert_eq!(served_certificate(gw.addr, "eu.acme.org").await, acme);
    assert_eq!(served_certificate(gw.addr, "localhost").await, default);
    assert_eq!(served_certificate(gw.addr, "unknown.test").await, default);
    assert_eq!(served_certificate(gw.addr, "a.b.acme.org").await, default);
    // And a verifying client of the tenant's name is served by its route.
    let mut ws = wss(&ca, gw.addr, "chat.acme.test", "/echo").await;
    ws.send(Message::text("acme")).await.expect("send");
    assert_eq!(next_wss_text(&mut ws).await, "acme");
}

#[tokio::test]
async fn a_host_of_another_tenant_than_the_sni_gets_421() {
    let ca = TestCa::new();
    let dir = scratch("tls-421");
    ca.write_leaf(&dir, "server", &["localhost"]);
    ca.write_leaf(&dir, "acme", &["chat.acme.test"]);
    let config = format!(
        r#"[server]
tls = {{ cert = "server.pem", key = "server.key" }}

[[route]]
path = "/echo"
plugin = "{echo}"

[[tenant]]
name = "acme"
hosts = ["chat.acme.test"]
tls = {{ cert = "acme.pem", key = "acme.key" }}

[[tenant.route]]
path = "/echo"
plugin = "{echo}"
"#,
        echo = plugin("echo")
    );
    let gw = serve_in(&dir, &config);
    // SNI localhost (the default tenant), Host of tenant acme.
    let tls = tls_connect(&ca, gw.addr, "localhost").await;
    let mut req = format!("ws://localhost:{}/echo", gw.addr.port())
        .into_client_request()
        .expect("request");
    req.headers_mut()
        .insert("host", "chat.acme.test".parse().expect("header"));
    let refused = tokio_tungstenite::client_async(req, tls).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 421)
        }
        other => panic!("expected 421, got {other:?}"),
    }
    // The same host with its own name as SNI is served.
    let mut ws = wss(&ca, gw.addr, "chat.acme.test", "/echo").await;
    ws.send(Message::text("right name")).await.expect("send");
    assert_eq!(next_wss_text(&mut ws).await, "right name");
}

#[tokio::test]
async fn plain_http_on_the_tls_port_gets_400_and_garbage_is_dropped_without_harm() {
    let ca = TestCa::new();
    let (gw, _dir) = tls_gateway(&ca, "tls-plain", "");
    // A plain WebSocket upgrade to the TLS port.
    let mut tcp = TcpStream::connect(gw.addr).await.expect("connect");
    tcp.write_all(upgrade_request("/echo", "").as_bytes())
        .await
        .expect("write");
    let mut answer = String::new();
    tokio::time::timeout(WAIT, tcp.read_to_string(&mut answer))
        .await
        .expect("answer timed out")
        .expect("read");
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(answer.contains("wss://"), "{answer}");
    // A TLS record header followed by garbage, then a close.
    let mut tcp = TcpStream::connect(gw.addr).await.expect("connect");
    tcp.write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5, 6, 7])
        .await
        .expect("write");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, tcp.read_to_end(&mut rest))
        .await
        .expect("the gateway closes the connection");
    // The gateway still serves.
    let mut ws = wss(&ca, gw.addr, "localhost", "/echo").await;
    ws.send(Message::text("still here")).await.expect("send");
    assert_eq!(next_wss_text(&mut ws).await, "still here");
    assert!(!gw.log().contains("panicked"), "{}", gw.log());
}

#[tokio::test]
async fn a_replaced_certificate_serves_new_handshakes_open_connections_keep_theirs_and_a_bad_one_is_refused(
) {
    let ca = TestCa::new();
    let (gw, dir) = tls_gateway(&ca, "tls-swap", "");
    gw.wait_log("hot reload: watching");
    let first = served_certificate(gw.addr, "localhost").await;
    let mut open = wss(&ca, gw.addr, "localhost", "/echo").await;

    // Write the new pair to temporary names and rename them into place.
    let (cert, key, second) = ca.leaf(&["localhost"]);
    std::fs::write(dir.join("new.pem"), cert).expect("write");
    std::fs::write(dir.join("new.key"), key).expect("write");
    std::fs::rename(dir.join("new.key"), dir.join("server.key")).expect("rename");
    std::fs::rename(dir.join("new.pem"), dir.join("server.pem")).expect("rename");
    gw.wait_log("TLS certificate reloaded");
    assert_ne!(first, second);
    assert_eq!(served_certificate(gw.addr, "localhost").await, second);
    open.send(Message::text("kept")).await.expect("send");
    assert_eq!(next_wss_text(&mut open).await, "kept");

    // A certificate that is not PEM: logged, and the second one serves on.
    std::fs::write(dir.join("server.pem"), "not a certificate").expect("write");
    let line = gw.wait_log("the certificate loaded before keeps serving");
    assert!(line.contains("gateway.toml:2"), "{line}");
    assert_eq!(served_certificate(gw.addr, "localhost").await, second);
    let mut ws = wss(&ca, gw.addr, "localhost", "/echo").await;
    ws.send(Message::text("still")).await.expect("send");
    assert_eq!(next_wss_text(&mut ws).await, "still");
}

/// `wasmgate check` on `config` written beside `files`: success, stderr.
fn check(name: &str, config: &str, files: &[(&str, &str)]) -> (bool, String) {
    let files: Vec<(&str, &[u8])> = files.iter().map(|(f, t)| (*f, t.as_bytes())).collect();
    let (ok, _, err) = check_output(name, &config.replace("{echo}", &plugin("echo")), &files);
    (ok, err)
}

#[tokio::test]
async fn check_names_the_line_file_and_reason_of_a_bad_certificate() {
    let ca = TestCa::new();
    let (cert, key, _) = ca.leaf(&["localhost"]);
    let (_, other_key, _) = ca.leaf(&["localhost"]);
    let route = "\n[[route]]\npath = \"/echo\"\nplugin = \"{echo}\"\n";

    let missing = format!("[server]\ntls = {{ cert = \"nope.pem\", key = \"k.key\" }}\n{route}");
    let (ok, err) = check("tls-check-missing", &missing, &[("k.key", &key)]);
    assert!(!ok);
    assert!(
        err.contains("gateway.toml:2: tls: ") && err.contains("nope.pem: cannot read"),
        "{err}"
    );

    let mismatch = format!("[server]\ntls = {{ cert = \"c.pem\", key = \"k.key\" }}\n{route}");
    let (ok, err) = check(
        "tls-check-mismatch",
        &mismatch,
        &[("c.pem", &cert), ("k.key", &other_key)],
    );
    assert!(!ok);
    assert!(err.contains("does not belong to the certificate"), "{err}");

    let no_key = format!("[server]\ntls = {{ cert = \"c.pem\", key = \"c.pem\" }}\n{route}");
    let (ok, err) = check("tls-check-nokey", &no_key, &[("c.pem", &cert)]);
    assert!(!ok);
    assert!(err.contains("no PRIVATE KEY block"), "{err}");

    let tenant_only = format!(
        "{route}\n[[tenant]]\nname = \"acme\"\nhosts = [\"a.test\"]\n\
         tls = {{ cert = \"c.pem\", key = \"k.key\" }}\n\n[[tenant.route]]\npath = \"/echo\"\nplugin = \"{{echo}}\"\n"
    );
    let (ok, err) = check(
        "tls-check-tenant-only",
        &tenant_only,
        &[("c.pem", &cert), ("k.key", &key)],
    );
    assert!(!ok);
    assert!(err.contains("[server] has no tls"), "{err}");

    let good = format!("[server]\ntls = {{ cert = \"c.pem\", key = \"k.key\" }}\n{route}");
    let (ok, err) = check(
        "tls-check-good",
        &good,
        &[("c.pem", &cert), ("k.key", &key)],
    );
    assert!(ok, "{err}");
}

#[tokio::test]
async fn the_tls_handshake_and_the_upgrade_request_share_one_handshake_timeout() {
    let ca = TestCa::new();
    let dir = scratch("tls-timeout");
    ca.write_leaf(&dir, "server", &["localhost"]);
    let config = format!(
        "[server]\nhandshake_timeout = \"2s\"\ntls = {{ cert = \"server.pem\", key = \"server.key\" }}\n\n\
         [[route]]\npath = \"/echo\"\nplugin = \"{}\"\n",
        plugin("echo")
    );
    let gw = serve_in(&dir, &config);
    // 1.4 s before the TLS handshake, 1.4 s before the request: 2.8 s in
    // all, past the 2 s the two share.
    let tcp = TcpStream::connect(gw.addr).await.expect("connect");
    tokio::time::sleep(std::time::Duration::from_millis(1400)).await;
    let name = ServerName::try_from("localhost".to_owned()).expect("name");
    let mut tls = TlsConnector::from(ca.client())
        .connect(name, tcp)
        .await
        .expect("TLS handshake within the timeout");
    tokio::time::sleep(std::time::Duration::from_millis(1400)).await;
    let _ = tls.write_all(upgrade_request("/echo", "").as_bytes()).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut answer)).await;
    assert!(
        !String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 101"),
        "upgraded after the handshake timeout: {}",
        String::from_utf8_lossy(&answer)
    );
    // Within the timeout, the same steps upgrade.
    let mut ws = wss(&ca, gw.addr, "localhost", "/echo").await;
    ws.send(Message::text("in time")).await.expect("send");
    assert_eq!(next_wss_text(&mut ws).await, "in time");
}

#[tokio::test]
async fn an_exact_host_of_a_tenant_without_a_certificate_is_not_taken_by_another_tenants_wildcard()
{
    let ca = TestCa::new();
    let dir = scratch("tls-exact-vs-wildcard");
    let default = ca.write_leaf(&dir, "server", &["localhost"]);
    let wild = ca.write_leaf(&dir, "wild", &["*.example.org"]);
    let config = format!(
        r#"[server]
tls = {{ cert = "server.pem", key = "server.key" }}

[[tenant]]
name = "exact"
hosts = ["a.example.org"]

[[tenant.route]]
path = "/echo"
plugin = "{echo}"

[[tenant]]
name = "wild"
hosts = ["*.example.org"]
tls = {{ cert = "wild.pem", key = "wild.key" }}

[[tenant.route]]
path = "/echo"
plugin = "{echo}"
"#,
        echo = plugin("echo")
    );
    let gw = serve_in(&dir, &config);
    // Routing sends a.example.org to tenant "exact": so does SNI, which
    // then gets the default certificate, not the wildcard tenant's.
    assert_eq!(served_certificate(gw.addr, "a.example.org").await, default);
    assert_eq!(served_certificate(gw.addr, "b.example.org").await, wild);
}
