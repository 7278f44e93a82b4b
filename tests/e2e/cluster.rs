//! Clusters: gateway nodes sharing rooms, broadcasts and sends through a
//! real redis-server (started by each test on a free loopback port).

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

/// A redis-server on a free loopback port, killed when dropped.
struct Redis {
    child: Option<Child>,
    port: u16,
    _dir: Scratch,
    /// More arguments for redis-server (a password, cluster mode).
    extra: Vec<String>,
}

impl Redis {
    fn start(name: &str) -> Redis {
        Redis::start_with(name, &[])
    }

    /// Started with `extra` arguments too.
    fn start_with(name: &str, extra: &[&str]) -> Redis {
        let mut r = Redis::reserve(name);
        r.extra = extra.iter().map(|a| a.to_string()).collect();
        r.restart();
        r
    }

    /// A port and folder for a server not started yet.
    fn reserve(name: &str) -> Redis {
        let dir = scratch(name);
        Redis {
            child: None,
            port: free_port(),
            _dir: dir,
            extra: Vec::new(),
        }
    }

    /// Starts (again) on the same port, without persistence.
    fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self._dir.to_str().unwrap(),
            ])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (./dev test installs it; apt-get install redis-server)");
        self.child = Some(child);
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(start.elapsed() < WAIT, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (SIGKILL) and waits for it to be gone.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A node's config: the testkit on `/chat`, in the cluster of `redis`.
fn node_config(redis: &Redis, name: &str) -> String {
    format!(
        r#"
[cluster]
redis = "{}"
node_id = "{name}"
heartbeat = "200ms"
node_timeout = "1s"

[[route]]
path = "/chat"
plugin = "{{testkit}}"

[[route]]
path = "/other"
plugin = "{{testkit}}"
"#,
        redis.url()
    )
}

fn node(redis: &Redis, test: &str, name: &str) -> Gateway {
    Gateway::start(&format!("{test}-{name}"), &node_config(redis, name))
}

/// A free loopback port (bound, then released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The body of `GET path` on the admin port `port`.
fn admin_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("admin port");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out.split_once("\r\n\r\n")
        .map(|x| x.1.to_owned())
        .unwrap_or_default()
}

/// The HTTP status of `GET path` on the admin port `port`.
fn admin_status(port: u16, path: &str) -> u16 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("admin port");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {out:?}"))
}

/// The value of the metric line starting with `series` (name and labels).
fn metric(port: u16, series: &str) -> f64 {
    let text = admin_get(port, "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

/// Asks `ws` for `cmd` until the answer is `want`, for at most `within`.
async fn until(ws: &mut Ws, cmd: &str, want: &str, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let got = command(ws, cmd).await;
        // Anything but an answer is a message that should not be here (a
        // duplicate, or a delivery that should have been dropped).
        assert!(
            got.starts_with("ok") || got.starts_with("err"),
            "{cmd:?}: an unexpected message {got:?}"
        );
        if got == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "{cmd:?}: still {got:?} after {within:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_reaches_room_members_on_every_node_once_and_not_the_sender() {
    let redis = Redis::start("cluster-broadcast-redis");
    let a = node(&redis, "cluster-broadcast", "a");
    let b = node(&redis, "cluster-broadcast", "b");
    let c = node(&redis, "cluster-broadcast", "c");
    let mut sender = connect(&a.url("/chat")).await;
    let mut a2 = connect(&a.url("/chat")).await;
    let mut on_b = connect(&b.url("/chat")).await;
    let mut on_c = connect(&c.url("/chat")).await;
    for ws in [&mut sender, &mut a2, &mut on_b, &mut on_c] {
        assert_eq!(command(ws, "join lobby").await, "ok joined");
    }
    // Every node counts all four, wherever they are.
    for ws in [&mut sender, &mut on_b, &mut on_c] {
        until(ws, "size lobby", "ok 4", WAIT).await;
    }
    assert_eq!(command(&mut sender, "broadcast lobby hello").await, "ok 3");
    for ws in [&mut a2, &mut on_b, &mut on_c] {
        assert_eq!(next_text(ws).await, "hello");
    }
    // Exactly once, and not to the sender.
    for ws in [&mut sender, &mut a2, &mut on_b, &mut on_c] {
        expect_silence(ws, Duration::from_millis(300)).await;
    }
    // The same room name on another route is another room, on every node.
    let mut other = connect(&b.url("/other")).await;
    assert_eq!(command(&mut other, "size lobby").await, "ok 0");
    assert_eq!(
        command(&mut other, "broadcast lobby elsewhere").await,
        "ok 0"
    );
    expect_silence(&mut on_c, Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_size_and_members_agree_on_every_node_and_ids_are_unique() {
    let redis = Redis::start("cluster-members-redis");
    let a = node(&redis, "cluster-members", "a");
    let b = node(&redis, "cluster-members", "b");
    let c = node(&redis, "cluster-members", "c");
    let mut on_a = connect(&a.url("/chat")).await;
    let mut on_b = connect(&b.url("/chat")).await;
    let mut on_c = connect(&c.url("/chat")).await;
    let mut ids = Vec::new();
    for ws in [&mut on_a, &mut on_b, &mut on_c] {
        ids.push(conn_id(ws).await.parse::<u64>().unwrap());
        assert_eq!(command(ws, "join r").await, "ok joined");
    }
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        3,
        "connection ids collide across nodes: {ids:?}"
    );
    let list: Vec<String> = sorted.iter().map(u64::to_string).collect();
    let want = format!("ok {}", list.join(","));
    for ws in [&mut on_a, &mut on_b, &mut on_c] {
        until(ws, "size r", "ok 3", WAIT).await;
        until(ws, "members r", &want, WAIT).await;
    }
    // A leave on one node shows on the others.
    assert_eq!(command(&mut on_b, "leave r").await, "ok true");
    for ws in [&mut on_a, &mut on_c] {
        until(ws, "size r", "ok 2", WAIT).await;
    }
    // A closed connection leaves its rooms everywhere.
    drop(on_c);
    until(&mut on_a, "size r", "ok 1", WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_and_close_reach_a_connection_on_another_node() {
    let redis = Redis::start("cluster-send-redis");
    let a = node(&redis, "cluster-send", "a");
    let b = node(&redis, "cluster-send", "b");
    let mut on_a = connect(&a.url("/chat")).await;
    let mut on_b = connect(&b.url("/chat")).await;
    let b_id = conn_id(&mut on_b).await;
    // Node a learns of node b from its heartbeat.
    until(&mut on_a, &format!("send {b_id} ping"), "ok sent", WAIT).await;
    assert_eq!(next_text(&mut on_b).await, "ping");
    // An id of no live node is unknown, as on one node.
    let a_id: u64 = conn_id(&mut on_a).await.parse().unwrap();
    let nobody = (a_id | (0xf_fff0 << 40)) + 1;
    assert_eq!(
        command(&mut on_a, &format!("send {nobody} x")).await,
        "err unknown-connection"
    );
    assert_eq!(
        command(&mut on_a, &format!("close-other {b_id} 4001")).await,
        "ok closing"
    );
    expect_close(&mut on_b, 4001).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_stops_counting_within_node_timeout_and_the_others_keep_serving() {
    let redis = Redis::start("cluster-kill-redis");
    let admin = free_port();
    let a = Gateway::start(
        "cluster-kill-a",
        &format!(
            "[admin]\nlisten = \"127.0.0.1:{admin}\"\n{}",
            node_config(&redis, "a")
        ),
    );
    let b = node(&redis, "cluster-kill", "b");
    let mut c = node(&redis, "cluster-kill", "c");
    let mut on_a = connect(&a.url("/chat")).await;
    let mut on_b = connect(&b.url("/chat")).await;
    let mut on_c = connect(&c.url("/chat")).await;
    for ws in [&mut on_a, &mut on_b, &mut on_c] {
        assert_eq!(command(ws, "join r").await, "ok joined");
    }
    until(&mut on_a, "size r", "ok 3", WAIT).await;
    let dropped = metric(admin, "wasmgate_cluster_dropped_total{kind=\"delivery\"}");
    c.signal("KILL");
    let killed = Instant::now();
    let _ = c.wait_exit(WAIT);
    // Redis closes the dead node's connections as soon as it reads their
    // end; the test gives it a moment.
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Node a still counts node c's member (its silence is not past
    // node_timeout yet): the message to node c reaches nobody in Redis,
    // and is counted as dropped, not as published.
    assert_eq!(
        command(&mut on_a, "broadcast r into-the-void").await,
        "ok 2"
    );
    assert_eq!(next_text(&mut on_b).await, "into-the-void");
    let start = Instant::now();
    while metric(admin, "wasmgate_cluster_dropped_total{kind=\"delivery\"}") <= dropped {
        assert!(
            start.elapsed() < WAIT,
            "the delivery to the killed node is not counted as dropped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    until(&mut on_a, "size r", "ok 2", WAIT).await;
    until(&mut on_b, "size r", "ok 2", WAIT).await;
    let took = killed.elapsed();
    // The documented bound: node_timeout (1 s) plus a heartbeat (200 ms),
    // with room for a loaded machine.
    assert!(
        took < Duration::from_millis(2500),
        "a dead node's members counted for {took:?}"
    );
    assert!(
        took > Duration::from_millis(500),
        "dropped too early: {took:?}"
    );
    // a and b still talk.
    assert_eq!(command(&mut on_a, "broadcast r still-here").await, "ok 1");
    assert_eq!(next_text(&mut on_b).await, "still-here");
    drop(on_c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_chat_goes_on_while_redis_is_down_and_cross_node_delivery_resumes() {
    let mut redis = Redis::start("cluster-outage-redis");
    let admin = free_port();
    let a = Gateway::start(
        "cluster-outage-a",
        &format!(
            "[admin]\nlisten = \"127.0.0.1:{admin}\"\n{}",
            node_config(&redis, "a")
        ),
    );
    let b = node(&redis, "cluster-outage", "b");
    let mut a1 = connect(&a.url("/chat")).await;
    let mut a2 = connect(&a.url("/chat")).await;
    let mut on_b = connect(&b.url("/chat")).await;
    for ws in [&mut a1, &mut a2, &mut on_b] {
        assert_eq!(command(ws, "join r").await, "ok joined");
    }
    until(&mut a1, "size r", "ok 3", WAIT).await;
    let state = admin_get(admin, "/state");
    assert!(
        state.contains(r#""node_id":"a""#) && state.contains(r#""redis_up":true"#),
        "{state}"
    );
    assert!(
        state.contains(r#""node_id":"b""#),
        "node b is listed: {state}"
    );
    assert_eq!(metric(admin, "wasmgate_cluster_redis_up{node=\"a\"}"), 1.0);
    let dropped = metric(admin, "wasmgate_cluster_dropped_total{kind=\"delivery\"}");

    redis.kill();
    // Node a does not know yet: this reaches a2 and is queued for node b,
    // where it cannot go.
    assert_eq!(command(&mut a1, "broadcast r lost").await, "ok 2");
    assert_eq!(next_text(&mut a2).await, "lost");
    a.wait_log("cluster: degraded");
    assert_eq!(metric(admin, "wasmgate_cluster_redis_up{node=\"a\"}"), 0.0);
    // Local delivery goes on, nothing is closed.
    for i in 0..5 {
        let answer = command(&mut a1, &format!("broadcast r local-{i}")).await;
        assert!(answer.starts_with("ok "), "{answer}");
        assert_eq!(next_text(&mut a2).await, format!("local-{i}"));
    }
    // Once node b is silent for node_timeout, node a counts its own only.
    until(&mut a1, "size r", "ok 2", WAIT).await;
    // What could not reach node b was counted, not lost silently (once the
    // command that carried it has failed: up to its 2 s timeout).
    let start = Instant::now();
    while metric(admin, "wasmgate_cluster_dropped_total{kind=\"delivery\"}") <= dropped {
        assert!(
            start.elapsed() < WAIT,
            "the delivery to node b during the outage is counted as dropped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    redis.restart();
    // The nodes rewrite their rooms into the empty Redis and read each
    // other's again: cross-node delivery resumes.
    until(&mut a1, "size r", "ok 3", Duration::from_secs(20)).await;
    until(&mut on_b, "size r", "ok 3", Duration::from_secs(20)).await;
    assert_eq!(command(&mut a1, "broadcast r back").await, "ok 2");
    assert_eq!(next_text(&mut a2).await, "back");
    assert_eq!(next_text(&mut on_b).await, "back");
    a.wait_log("is reachable again");
    assert_eq!(metric(admin, "wasmgate_cluster_redis_up{node=\"a\"}"), 1.0);
    for ws in [&mut a1, &mut a2, &mut on_b] {
        assert_eq!(command(ws, "id").await.split(' ').next(), Some("ok"));
    }
}

#[test]
fn cluster_config_errors_name_the_line_and_the_fix() {
    let (ok, _, err) = check_output(
        "cluster-config",
        r#"
[cluster]
redis = "http://127.0.0.1:6379"
heartbeat = "1s"
node_timeout = "1s"
node_id = "a b"

[[route]]
path = "/chat"
plugin = "{testkit}"
"#,
        &[],
    );
    assert!(!ok);
    assert!(
        err.contains("gateway.toml:3: redis: \"http://127.0.0.1:6379\" is not a Redis URL"),
        "{err}"
    );
    assert!(
        err.contains(
            "gateway.toml:5: node_timeout: 1000ms is less than twice the heartbeat (1000ms)"
        ),
        "{err}"
    );
    assert!(
        err.contains("gateway.toml:6: node_id: \"a b\": use 1 to 64 letters"),
        "{err}"
    );
    let (ok, _, err) = check_output(
        "cluster-config-missing",
        "[cluster]\nnode_id = \"a\"\n\n[[route]]\npath = \"/chat\"\nplugin = \"{testkit}\"\n",
        &[],
    );
    assert!(!ok);
    assert!(
        err.contains("gateway.toml:1: cluster: `redis` is missing"),
        "{err}"
    );
    // The default node_timeout (5 s) against a long heartbeat: the error
    // says what to set. A database number would not separate clusters.
    let (ok, _, err) = check_output(
        "cluster-config-default",
        "[cluster]\nredis = \"redis://127.0.0.1:6379/3\"\nheartbeat = \"3s\"\n\n[[route]]\npath = \"/chat\"\nplugin = \"{testkit}\"\n",
        &[],
    );
    assert!(!ok);
    assert!(
        err.contains("gateway.toml:3: heartbeat: 3000ms needs a node_timeout of at least twice that, and the default node_timeout is 5s"),
        "{err}"
    );
    assert!(
        err.contains("gateway.toml:2: redis: \"redis://127.0.0.1:6379/3\": database 3: pub/sub channels are shared"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_while_redis_is_down_serves_alone_then_joins_the_cluster() {
    let mut redis = Redis::reserve("cluster-late-redis");
    let a = node(&redis, "cluster-late", "a");
    let warning = a.wait_log("is unreachable at start");
    assert!(
        warning.contains("takes the random node number"),
        "{warning}"
    );
    let mut on_a = connect(&a.url("/chat")).await;
    let mut a2 = connect(&a.url("/chat")).await;
    for ws in [&mut on_a, &mut a2] {
        assert_eq!(command(ws, "join r").await, "ok joined");
    }
    // Alone, it serves its own.
    assert_eq!(command(&mut on_a, "broadcast r alone").await, "ok 1");
    assert_eq!(next_text(&mut a2).await, "alone");

    redis.restart();
    let b = node(&redis, "cluster-late", "b");
    let mut on_b = connect(&b.url("/chat")).await;
    assert_eq!(command(&mut on_b, "join r").await, "ok joined");
    // Node a's client connects in the background and joins.
    until(&mut on_b, "size r", "ok 3", Duration::from_secs(20)).await;
    until(&mut on_a, "size r", "ok 3", Duration::from_secs(20)).await;
    assert_eq!(command(&mut on_b, "broadcast r together").await, "ok 2");
    assert_eq!(next_text(&mut on_a).await, "together");
    assert_eq!(next_text(&mut a2).await, "together");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_number_another_node_took_leaves_the_cluster_and_serves_alone() {
    let redis = Redis::start("cluster-taken-redis");
    let admin = free_port();
    let a = Gateway::start(
        "cluster-taken-a",
        &format!(
            "[admin]\nlisten = \"127.0.0.1:{admin}\"\n{}",
            node_config(&redis, "a")
        ),
    );
    assert_eq!(admin_status(admin, "/readyz"), 200);
    let b = node(&redis, "cluster-taken", "b");
    let mut on_a = connect(&a.url("/chat")).await;
    let mut a2 = connect(&a.url("/chat")).await;
    let mut on_b = connect(&b.url("/chat")).await;
    for ws in [&mut on_a, &mut a2, &mut on_b] {
        assert_eq!(command(ws, "join r").await, "ok joined");
    }
    until(&mut on_b, "size r", "ok 3", WAIT).await;
    // What a node that took node a's number after Redis lost it would do.
    let a_id: u64 = conn_id(&mut on_a).await.parse().unwrap();
    let owner = format!("wasmgate:{{node:{}}}:owner", a_id >> 40);
    assert_eq!(
        redis_cli(redis.port, &["SET", &owner, "someone-else"]).trim(),
        "OK"
    );
    let line = a.wait_log("leaves the cluster");
    assert!(
        line.contains("another node (someone-else) holds its node number"),
        "{line}"
    );
    // The other claim is left as it was: not renewed, shortened or
    // overwritten by the node that lost the number.
    assert_eq!(
        redis_cli(redis.port, &["GET", &owner]).trim(),
        "someone-else"
    );
    assert_eq!(redis_cli(redis.port, &["TTL", &owner]).trim(), "-1");
    // Node a's members stop counting on node b; node a serves its own.
    until(&mut on_b, "size r", "ok 1", WAIT).await;
    until(&mut on_a, "size r", "ok 2", WAIT).await;
    assert_eq!(command(&mut on_a, "broadcast r local").await, "ok 1");
    assert_eq!(next_text(&mut a2).await, "local");
    expect_silence(&mut on_b, Duration::from_millis(300)).await;
    // A load balancer sends new clients elsewhere; operators see why.
    assert_eq!(admin_status(admin, "/readyz"), 503);
    assert_eq!(admin_status(admin, "/healthz"), 200);
    let state = admin_get(admin, "/state");
    assert!(state.contains(r#""departed":true"#), "{state}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_nodes_goodbyes_reach_the_other_nodes_before_its_members_stop_counting() {
    let redis = Redis::start("cluster-sigterm-redis");
    let config = |name: &str| {
        format!(
            "[cluster]\nredis = \"{}\"\nnode_id = \"{name}\"\nheartbeat = \"200ms\"\nnode_timeout = \"1s\"\n\n\
             [[route]]\npath = \"/chat\"\nplugin = \"builtin:chat\"\n",
            redis.url()
        )
    };
    let a = Gateway::start("cluster-sigterm-a", &config("a"));
    let mut b = Gateway::start("cluster-sigterm-b", &config("b"));
    let mut watcher = connect(&a.url("/chat?room=r&name=watcher")).await;
    let welcome = next_json(&mut watcher).await;
    assert_eq!(welcome["members"], 1, "{welcome}");
    // Until node b knows node a (it has just started), a join on b would
    // not reach a's members: wait until b's welcome counts the watcher.
    let start = Instant::now();
    loop {
        let mut probe = connect(&b.url("/chat?room=r&name=probe")).await;
        let welcome = next_json(&mut probe).await;
        drop(probe);
        if welcome["members"] == 2 {
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "node b never counted node a's member"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut leavers = Vec::new();
    for i in 0..5 {
        let mut ws = connect(&b.url(&format!("/chat?room=r&name=leaver{i}"))).await;
        let _welcome = next_json(&mut ws).await;
        leavers.push(ws);
        // Each join crosses to node a.
        let join = next_leaver(&mut watcher).await;
        assert_eq!(join["type"], "join", "{join}");
    }
    b.signal("TERM");
    // Every on-close broadcast (a "leave" per member) crosses before node b
    // says goodbye.
    let mut left = Vec::new();
    for _ in 0..5 {
        let m = next_leaver(&mut watcher).await;
        assert_eq!(m["type"], "leave", "{m}");
        left.push(m["name"].as_str().unwrap_or_default().to_owned());
    }
    left.sort();
    assert_eq!(
        left,
        ["leaver0", "leaver1", "leaver2", "leaver3", "leaver4"]
    );
    assert_eq!(b.wait_exit(WAIT), Some(0));
    a.wait_log("cluster: node b left");
    drop(leavers);
}

/// The next chat event about a `leaver*` (the probes' are skipped).
async fn next_leaver(ws: &mut Ws) -> serde_json::Value {
    loop {
        let m = next_json(ws).await;
        if m["name"].as_str().is_some_and(|n| n.starts_with("leaver")) {
            return m;
        }
    }
}

#[test]
fn a_wrong_redis_password_stops_the_start_with_the_config_line() {
    let redis = Redis::start_with("cluster-auth-redis", &["--requirepass", "right"]);
    let (ok, _, err) = serve_output(
        "cluster-auth",
        &format!(
            "[cluster]\nredis = \"redis://:wrong@127.0.0.1:{}\"\n\n[[route]]\npath = \"/chat\"\nplugin = \"builtin:echo\"\n",
            redis.port
        ),
        "127.0.0.1:0",
    );
    assert!(!ok, "{err}");
    assert!(err.contains("gateway.toml:1: [cluster]"), "{err}");
    assert!(err.contains("check the user and password"), "{err}");
    assert!(
        err.contains("redis://:***@127.0.0.1"),
        "the password is hidden: {err}"
    );
    assert!(!err.contains("wrong@"), "the password is hidden: {err}");
}

/// The node number a node's log line announces.
fn number_of(gw: &Gateway) -> u64 {
    let line = gw.wait_log("is node number");
    line.split("is node number ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number in {line}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_right_after_redis_lost_its_data_does_not_take_a_live_nodes_number() {
    let mut redis = Redis::start("cluster-renumber-redis");
    let a = node(&redis, "cluster-renumber", "a");
    let mut on_a = connect(&a.url("/chat")).await;
    assert_eq!(command(&mut on_a, "join r").await, "ok joined");
    // Redis restarts empty: the counter and the claims are gone.
    redis.kill();
    redis.restart();
    let c = node(&redis, "cluster-renumber", "c");
    c.wait_log("for the live nodes to claim their numbers again");
    assert_ne!(
        number_of(&a),
        number_of(&c),
        "two live nodes share a number"
    );
    let mut on_c = connect(&c.url("/chat")).await;
    assert_eq!(command(&mut on_c, "join r").await, "ok joined");
    until(&mut on_c, "size r", "ok 2", WAIT).await;
    until(&mut on_a, "size r", "ok 2", WAIT).await;
    assert!(!a.log().contains("leaves the cluster"), "{}", a.log());
}

/// `redis-cli -p port args...` (its stdout; the test fails if it fails).
fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli (installed with redis-server)");
    assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_node_that_cannot_bind_its_port_leaves_nothing_in_redis() {
    let redis = Redis::start("cluster-bind-redis");
    let taken = TcpListener::bind("127.0.0.1:0").expect("a port");
    let port = taken.local_addr().unwrap().port();
    let (ok, _, err) = serve_output(
        "cluster-bind",
        &format!(
            "[cluster]\nredis = \"{}\"\n\n[[route]]\npath = \"/chat\"\nplugin = \"builtin:chat\"\n",
            redis.url()
        ),
        &format!("127.0.0.1:{port}"),
    );
    assert!(!ok, "{err}");
    assert!(
        err.contains(&port.to_string()),
        "the error names the port: {err}"
    );
    // No node number taken, no key written, nothing announced.
    assert_eq!(redis_cli(redis.port, &["DBSIZE"]).trim(), "0");
    drop(taken);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_changed_on_redis_is_logged_as_refused_credentials() {
    let redis = Redis::start_with("cluster-repass-redis", &["--requirepass", "first"]);
    let a = Gateway::start(
        "cluster-repass-a",
        &format!(
            "[cluster]\nredis = \"redis://:first@127.0.0.1:{}\"\nnode_id = \"a\"\n\n\
             [[route]]\npath = \"/chat\"\nplugin = \"{{testkit}}\"\n",
            redis.port
        ),
    );
    a.wait_log("is node number");
    let mut on_a = connect(&a.url("/chat")).await;
    assert_eq!(command(&mut on_a, "join r").await, "ok joined");
    // The operator changes the password and drops the clients: the node's
    // reconnections are refused.
    redis_cli(
        redis.port,
        &[
            "-a",
            "first",
            "--no-auth-warning",
            "CONFIG",
            "SET",
            "requirepass",
            "second",
        ],
    );
    redis_cli(
        redis.port,
        &[
            "-a",
            "second",
            "--no-auth-warning",
            "CLIENT",
            "KILL",
            "TYPE",
            "normal",
        ],
    );
    let line = a.wait_log("refuses node a's credentials");
    assert!(line.contains("redis://:***@127.0.0.1"), "{line}");
    assert!(!a.log().contains("first@"), "the password is hidden");
    // The node goes on serving its own connections.
    assert_eq!(command(&mut on_a, "size r").await, "ok 1");
}

/// A Redis Cluster of three primaries on loopback (no replicas), killed
/// when dropped.
struct RedisCluster {
    shards: Vec<Redis>,
}

impl RedisCluster {
    fn start(name: &str) -> RedisCluster {
        let mut shards = Vec::new();
        for i in 0..3 {
            // The cluster bus on a port of its own (the default, port +
            // 10000, may be past 65535 for an ephemeral port).
            let bus = free_port().to_string();
            shards.push(Redis::start_with(
                &format!("{name}-{i}"),
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-port",
                    &bus,
                    "--cluster-config-file",
                    "nodes.conf",
                ],
            ));
        }
        let addrs: Vec<String> = shards
            .iter()
            .map(|r| format!("127.0.0.1:{}", r.port))
            .collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        redis_cli(shards[0].port, &args);
        for r in &shards {
            let start = Instant::now();
            while !redis_cli(r.port, &["CLUSTER", "INFO"]).contains("cluster_state:ok") {
                assert!(start.elapsed() < WAIT, "the Redis Cluster did not form");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        RedisCluster { shards }
    }

    /// The `redis-cluster://` URL, seeded with two of the three shards.
    fn url(&self) -> String {
        format!(
            "redis-cluster://127.0.0.1:{}?node=127.0.0.1:{}",
            self.shards[0].port, self.shards[1].port
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_share_rooms_sends_and_broadcasts_through_a_redis_cluster() {
    let redis = RedisCluster::start("cluster-rc-redis");
    let config = |name: &str| {
        format!(
            "[cluster]\nredis = \"{}\"\nnode_id = \"{name}\"\nheartbeat = \"200ms\"\n\
             node_timeout = \"1s\"\n\n[[route]]\npath = \"/chat\"\nplugin = \"{{testkit}}\"\n",
            redis.url()
        )
    };
    let a = Gateway::start("cluster-rc-a", &config("a"));
    let b = Gateway::start("cluster-rc-b", &config("b"));
    let c = Gateway::start("cluster-rc-c", &config("c"));
    let mut sender = connect(&a.url("/chat")).await;
    let mut on_b = connect(&b.url("/chat")).await;
    let mut on_c = connect(&c.url("/chat")).await;
    for ws in [&mut sender, &mut on_b, &mut on_c] {
        assert_eq!(command(ws, "join lobby").await, "ok joined");
    }
    for ws in [&mut sender, &mut on_b, &mut on_c] {
        until(ws, "size lobby", "ok 3", WAIT).await;
    }
    assert_eq!(command(&mut sender, "broadcast lobby hi").await, "ok 2");
    for ws in [&mut on_b, &mut on_c] {
        assert_eq!(next_text(ws).await, "hi");
    }
    for ws in [&mut sender, &mut on_b, &mut on_c] {
        expect_silence(ws, Duration::from_millis(300)).await;
    }
    let c_id = conn_id(&mut on_c).await;
    assert_eq!(
        command(&mut on_b, &format!("send {c_id} direct")).await,
        "ok sent"
    );
    assert_eq!(next_text(&mut on_c).await, "direct");
    // The nodes' keys are spread over the shards by their hash tags, and
    // every shard holds some of the cluster's state or none: nothing is
    // refused for crossing slots.
    let keys: usize = redis
        .shards
        .iter()
        .map(|r| {
            redis_cli(r.port, &["DBSIZE"])
                .trim()
                .parse::<usize>()
                .unwrap_or(0)
        })
        .sum();
    // The counter, the live-node set, and three keys per node.
    assert_eq!(keys, 2 + 3 * 3, "keys in the Redis Cluster");
    for gw in [&a, &b, &c] {
        assert!(!gw.log().contains("CROSSSLOT"), "{}", gw.log());
        assert!(!gw.log().contains("cluster: degraded"), "{}", gw.log());
    }
    // The slot of the `members` channel moves to another shard (what a
    // reshard or a manual failover does): Redis ends the subscriptions to
    // it without breaking any connection. The nodes notice that they no
    // longer hear themselves, subscribe again, and talk again.
    let slot = redis_cli(
        redis.shards[0].port,
        &["CLUSTER", "KEYSLOT", "wasmgate:members"],
    )
    .trim()
    .to_owned();
    let owns = |r: &&Redis| !redis_cli(r.port, &["TYPE", "wasmgate:members"]).contains("MOVED");
    let src = redis.shards.iter().find(owns).expect("the channel's shard");
    let dst = redis
        .shards
        .iter()
        .find(|r| r.port != src.port)
        .expect("another shard");
    let id = |r: &Redis| redis_cli(r.port, &["CLUSTER", "MYID"]).trim().to_owned();
    let (src_id, dst_id) = (id(src), id(dst));
    redis_cli(
        dst.port,
        &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &src_id],
    );
    redis_cli(
        src.port,
        &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &dst_id],
    );
    for r in &redis.shards {
        redis_cli(r.port, &["CLUSTER", "SETSLOT", &slot, "NODE", &dst_id]);
    }
    // Each node notices on its own (two heartbeats and half a second of
    // silence) and subscribes again.
    for gw in [&a, &b, &c] {
        gw.wait_log("no longer hears its own messages");
    }
    for ws in [&mut sender, &mut on_b, &mut on_c] {
        until(ws, "size lobby", "ok 3", WAIT).await;
    }
    // A broadcast sent while a node's new subscription is still on its
    // way may miss it: within WAIT, one gets through to both.
    let start = Instant::now();
    let mut got = [false, false];
    while got != [true, true] {
        assert!(
            start.elapsed() < WAIT,
            "after the slot moved, broadcasts reached {got:?}"
        );
        assert_eq!(command(&mut sender, "broadcast lobby moved").await, "ok 2");
        for (i, ws) in [&mut on_b, &mut on_c].into_iter().enumerate() {
            while let Ok(Some(Ok(m))) =
                tokio::time::timeout(Duration::from_millis(300), ws.next()).await
            {
                match m {
                    Message::Text(t) => {
                        assert_eq!(t.as_str(), "moved");
                        got[i] = true;
                    }
                    Message::Ping(_) | Message::Pong(_) => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
    }

    // Nobody stopped counting anybody: a node that stopped hearing itself
    // does not take the others for dead.
    for gw in [&a, &b, &c] {
        assert!(!gw.log().contains("was not heard from"), "{}", gw.log());
    }

    // A node given one shard as a single server (redis://) does not start,
    // and is told what to write instead; even the shard holding the
    // counter, which answers the first commands without MOVED.
    let other = redis
        .shards
        .iter()
        .find(|r| !redis_cli(r.port, &["TYPE", "wasmgate:node-seq"]).contains("MOVED"))
        .expect("the shard with the counter");
    let (ok, _, err) = serve_output(
        "cluster-rc-d",
        &format!(
            "[cluster]\nredis = \"{}\"\n\n[[route]]\npath = \"/chat\"\nplugin = \"builtin:chat\"\n",
            other.url()
        ),
        "127.0.0.1:0",
    );
    assert!(!ok, "{err}");
    assert!(err.contains("gateway.toml:1: [cluster]"), "{err}");
    assert!(err.contains("use redis-cluster://"), "{err}");
}
