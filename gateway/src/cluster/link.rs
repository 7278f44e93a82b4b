//! The node's link to Redis: two background tasks, so that no host call
//! ever waits on the network.
//!
//! - The **writer** takes what [`super::Cluster`] queued, in order and in
//!   batches: a batch's membership changes go to the node's hash in one
//!   `MULTI`, which also moves the node's change number on only if it still
//!   holds the number before the batch (`SET ... XX GET`), then to the
//!   `members` channel as one message; deliveries are published to each
//!   receiving node's channel in one pipeline. Every `heartbeat` it renews
//!   the node's keys and publishes a heartbeat. When the node's state in
//!   Redis cannot be trusted (a failed write, a reconnect, keys found gone
//!   or changed) it rewrites the whole state from its hubs (the truth),
//!   under a new change number, so the other nodes read it again.
//! - The **subscriber** listens (`SSUBSCRIBE`) to the `members` channel
//!   and the node's own channel. It keeps the replica of other nodes'
//!   memberships, reading a node's snapshot when its changes have a gap,
//!   hands deliveries to the local hubs, and drops nodes silent for
//!   `node_timeout`.
//!
//! Every command is slot-safe for a Redis Cluster: a `MULTI` or a script
//! ([`CLAIM`], [`RENEW`]) touches one node's keys (hash tag `{node:P}`)
//! only.
//!
//! Redis going away changes nothing local: the client reconnects with
//! exponential backoff (100 ms to 5 s), nothing is sent while it is
//! disconnected (what would have been is dropped and counted), the outage
//! is logged once and shown by `wasmgate_cluster_redis_up`, and on
//! reconnection the writer rewrites the node's state and the subscriber
//! re-reads everyone's.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fred::clients::{Client, SubscriberClient};
use fred::prelude::{
    ClientLike, EventInterface, HashesInterface, KeysInterface, LuaInterface, PubsubInterface,
    SortedSetsInterface, TransactionInterface,
};
use fred::types::config::{Config, Options, ReconnectPolicy};
use fred::types::sorted_sets::Ordering as ZOrdering;
use fred::types::{Builder, ClusterHash, Expiration, Key, Map, SetOptions, Value};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::mpsc;

use super::replica::Apply;
use super::wire::{self, Change, Delivery, Membership, Target};
use super::{Cluster, ClusterError, Outgoing};
use crate::config::ClusterSettings;
use crate::connection::outbox::Outbound;
use crate::hub::ClosedBy;
use crate::metrics::ClusterMetrics;

/// Most queued items the writer takes in one batch.
const BATCH: usize = 1024;
/// Fields per `HSET` when the node rewrites its state.
const HSET_CHUNK: usize = 1000;
/// The member of the `node-seq` sorted set whose score is the counter.
const COUNTER: &str = "counter";

/// A rewrite's claim of the node's number, run by Redis as one step:
/// `KEYS[1]` is the number's owner key, `ARGV` the node's token and the
/// node timeout in milliseconds. The key is set to the token where it is
/// absent (`SET NX`), and given the whole timeout again where it holds the
/// token, so that the writes after it, within a node timeout, cannot
/// land on a claim another node took when this one's expired. Answers
/// the key's value before (nil where it was absent). Replies as RESP2
/// gives them (the client's protocol): Lua's `false` arrives as nil.
const CLAIM: &str = "local owner = redis.call('GET', KEYS[1])
if not owner then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
elseif owner == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return owner";

/// A heartbeat's renewal of a node's keys, run by Redis as one step:
/// `KEYS` are the number's owner key, its members hash and its change
/// number, `ARGV` the node's token and the node timeout in milliseconds.
/// Only while the owner key holds the token are the three given the
/// timeout again. Answers `{1, owner}` when the owner key and the change
/// number were both renewed, `{0, owner}` otherwise (`owner` nil where the
/// key is gone: RESP2, the client's protocol, turns Lua's `false` into
/// nil).
const RENEW: &str = "local owner = redis.call('GET', KEYS[1])
if owner ~= ARGV[1] then return {0, owner} end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
local seq = redis.call('PEXPIRE', KEYS[3], ARGV[2])
local own = redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {seq * own, owner}";

/// A client for `settings.redis`, not connected yet.
fn builder(settings: &ClusterSettings) -> Result<Builder, ClusterError> {
    let mut config = Config::from_url(&settings.redis).map_err(|e| url_error(settings, &e))?;
    // In fred, `fail_fast` decides whether a first connection that fails
    // gives up: it must not, so that a node started while Redis is down
    // joins when it comes up. Commands are not sent while disconnected
    // (the writer checks first).
    config.fail_fast = false;
    let mut b = Builder::from_config(config);
    b.with_connection_config(|c| {
        c.connection_timeout = Duration::from_secs(2);
        c.internal_command_timeout = Duration::from_secs(2);
        c.max_command_attempts = 1;
        // Commands caught by a disconnection wait here, bounded.
        c.max_command_buffer_len = 10_000;
    })
    .with_performance_config(|p| {
        p.default_command_timeout = Duration::from_secs(2);
        // Messages received while the subscriber reads a snapshot; past
        // this it re-reads every node.
        p.broadcast_channel_capacity = 8192;
    })
    .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2));
    Ok(b)
}

fn url_error(settings: &ClusterSettings, e: &fred::error::Error) -> ClusterError {
    ClusterError::Url {
        origin: settings.origin.clone(),
        url: crate::config::redact_url(&settings.redis),
        reason: e.details().to_owned(),
    }
}

/// The command client for `settings`, not connected yet
/// ([`take_node_number`] connects it).
pub fn client(settings: &ClusterSettings) -> Result<Client, ClusterError> {
    builder(settings)?
        .build()
        .map_err(|e| url_error(settings, &e))
}

/// Why no node number could be taken at start.
#[derive(Debug)]
pub enum Start {
    /// Redis refused the credentials (fatal: a config error).
    Auth(String),
    /// The URL's scheme names the wrong kind of server: `redis://` for a
    /// Redis Cluster, or `redis-cluster://` for a single server (fatal).
    WrongKind(String),
    /// Redis did not answer (the node starts alone).
    Unreachable(String),
}

/// Takes a node number, waiting at most 3 s: `ZINCRBY` on the counter,
/// then claims the number's owner key with `token` (`SET NX`); a number
/// another node holds is skipped.
pub async fn take_node_number(
    client: &Client,
    names: &wire::Names,
    token: &str,
    settings: &ClusterSettings,
) -> Result<u32, Start> {
    // Listening for errors before connecting: a refused password shows
    // there (the client keeps retrying, so the connection never fails).
    let mut errors = client.error_rx();
    let connected = client.wait_for_connect();
    client.connect();
    let attempt = async {
        let first = async {
            tokio::select! {
                r = connected => r,
                e = async {
                    loop {
                        match errors.recv().await {
                            Ok((e, _)) if *e.kind() == fred::error::ErrorKind::Auth
                                || !kind_hint(&settings.redis, &e.to_string()).is_empty() =>
                            {
                                return e
                            }
                            Ok(_) => {}
                            Err(_) => std::future::pending::<()>().await,
                        }
                    }
                } => Err(e),
            }
        };
        match tokio::time::timeout(Duration::from_secs(3), first).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(fred::error::Error::new(
                    fred::error::ErrorKind::Timeout,
                    "no answer within 3 s",
                ))
            }
        }
        // A Redis that has just started may have lost every claim: the
        // live nodes reconnect (backoff up to 5 s) and claim their numbers
        // again within a heartbeat. Numbers are taken only after that, so
        // that a live node's number is never handed out again.
        // A Redis Cluster node behind redis:// answers MOVED only for the
        // keys it does not hold: ask it what it is.
        if settings.redis.starts_with("redis://") {
            let info: String = client.info(Some(fred::types::InfoKind::Cluster)).await?;
            if info.contains(CLUSTER_ENABLED) {
                return Err(fred::error::Error::new(
                    fred::error::ErrorKind::Config,
                    format!("the server is a Redis Cluster node ({CLUSTER_ENABLED})"),
                ));
            }
        }
        // On a Redis Cluster: the shard that holds the counter.
        let counter_shard = Options {
            cluster_hash: Some(ClusterHash::Custom(fred::util::redis_keyslot(
                names.node_seq().as_bytes(),
            ))),
            ..Options::default()
        };
        loop {
            let info: String = client
                .with_options(&counter_shard)
                .info(Some(fred::types::InfoKind::Server))
                .await?;
            let uptime = info
                .lines()
                .find_map(|l| l.strip_prefix("uptime_in_seconds:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(u64::MAX);
            let settle = settle_time(settings);
            let up = Duration::from_secs(uptime);
            if up >= settle {
                break;
            }
            tracing::info!(
                "cluster: Redis started {uptime} s ago: waiting {} ms for the live nodes to \
                 claim their numbers again before taking one",
                (settle - up).as_millis()
            );
            tokio::time::sleep(settle - up).await;
        }
        for _ in 0..64 {
            let n: f64 = client.zincrby(names.node_seq(), 1.0, COUNTER).await?;
            let node = super::node_number(n.max(1.0) as u64);
            let claimed: Value = client
                .set(
                    names.owner(node),
                    token,
                    Some(Expiration::PX(ms(settings.node_timeout))),
                    Some(SetOptions::NX),
                    false,
                )
                .await?;
            if !claimed.is_null() {
                return Ok(node);
            }
        }
        Err(fred::error::Error::new(
            fred::error::ErrorKind::Unknown,
            "64 node numbers in a row are taken",
        ))
    };
    match tokio::time::timeout(Duration::from_secs(6) + settle_time(settings), attempt).await {
        Ok(Ok(n)) => Ok(n),
        Ok(Err(e)) if *e.kind() == fred::error::ErrorKind::Auth => Err(Start::Auth(e.to_string())),
        Ok(Err(e)) => {
            let why = e.to_string();
            match kind_hint(&settings.redis, &why) {
                "" => Err(Start::Unreachable(why)),
                hint => Err(Start::WrongKind(format!("{why}{hint}"))),
            }
        }
        Err(_) => Err(Start::Unreachable("no answer within 3 s".into())),
    }
}

/// How long after Redis starts live nodes have all reclaimed their
/// numbers: the longest reconnection backoff (5 s), two heartbeats, and a
/// second of margin.
fn settle_time(settings: &ClusterSettings) -> Duration {
    Duration::from_secs(6) + settings.heartbeat * 2
}

/// Starts the subscriber and writer tasks; returns the writer's handle.
pub fn spawn(cluster: Arc<Cluster>, rx: mpsc::Receiver<Outgoing>) -> tokio::task::JoinHandle<()> {
    match builder(&cluster.settings).and_then(|b| {
        b.build_subscriber_client()
            .map_err(|e| url_error(&cluster.settings, &e))
    }) {
        Ok(sub) => {
            tokio::spawn(subscriber(cluster.clone(), sub));
        }
        // The same URL built the command client already.
        Err(e) => tracing::error!("cluster: {e}"),
    }
    tokio::spawn(writer(cluster, rx))
}

/// Whether the node can take part: connected, and listening on its
/// channels (until then it does not announce itself: nobody could reach
/// it).
fn ready(c: &Cluster) -> bool {
    c.listening.load(Ordering::Acquire) && c.client.is_connected()
}

fn now_ms() -> i64 {
    i64::try_from(wire::now_ms()).unwrap_or(i64::MAX)
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A hint when Redis's answer shows the URL names the wrong kind of
/// server: a Redis Cluster node behind `redis://` answers `MOVED`, a
/// single server behind `redis-cluster://` has no slots.
pub fn kind_hint(url: &str, why: &str) -> &'static str {
    if url.starts_with("redis://") && (why.contains("MOVED") || why.contains(CLUSTER_ENABLED)) {
        ": this is a Redis Cluster, use redis-cluster://host:port"
    } else if url.starts_with("redis-cluster://") && why.contains("cluster support disabled") {
        ": this is not a Redis Cluster, use redis://host:port"
    } else {
        ""
    }
}

/// What `INFO cluster` says on a Redis Cluster node.
const CLUSTER_ENABLED: &str = "cluster_enabled:1";

/// Whether the link works, for logging its changes once.
struct Health {
    up: Option<bool>,
    /// The last connection error since the link last worked.
    last_error: Option<String>,
    /// Whether a refused password was logged since the link last worked.
    auth_logged: bool,
}

impl Health {
    /// The client failed to (re)connect: kept to say why the link is down,
    /// and logged at once if Redis refused the credentials (a password
    /// changed on the server needs the operator, not a retry).
    fn connection_error(&mut self, cluster: &Cluster, e: &fred::error::Error) {
        self.last_error = Some(e.to_string());
        if *e.kind() == fred::error::ErrorKind::Auth && !self.auth_logged {
            self.auth_logged = true;
            tracing::error!(
                "cluster: Redis at {} refuses node {}'s credentials ({e}): the password was \
                 changed on Redis? The node keeps retrying with the credentials of [cluster] \
                 redis (restart it with new ones) and serves its own connections meanwhile",
                crate::config::redact_url(&cluster.settings.redis),
                cluster.name
            );
        }
    }

    /// The link is down: `why`, or the last connection error if the
    /// client is not connected.
    fn down(&mut self, cluster: &Cluster) {
        let why = self
            .last_error
            .clone()
            .unwrap_or_else(|| "not connected".to_owned());
        self.failed(cluster, &why);
    }

    fn ok(&mut self, cluster: &Cluster) {
        self.last_error = None;
        self.auth_logged = false;
        if self.up != Some(true) {
            if self.up == Some(false) {
                tracing::info!(
                    "cluster: Redis at {} is reachable again: node {} rewrites its rooms, \
                     cross-node delivery resumes",
                    crate::config::redact_url(&cluster.settings.redis),
                    cluster.name
                );
            }
            self.up = Some(true);
            Cluster::metrics()
                .redis_up
                .get_or_create(&cluster.labels)
                .set(1);
        }
    }

    fn failed(&mut self, cluster: &Cluster, why: &dyn std::fmt::Display) {
        if self.up != Some(false) {
            let why = why.to_string();
            tracing::warn!(
                "cluster: degraded: Redis at {} is unreachable ({why}{}); local rooms and sends \
                 go on, deliveries to other nodes are dropped and counted until it is back",
                crate::config::redact_url(&cluster.settings.redis),
                kind_hint(&cluster.settings.redis, &why)
            );
            self.up = Some(false);
            Cluster::metrics()
                .redis_up
                .get_or_create(&cluster.labels)
                .set(0);
        }
    }
}

/// The writer task.
async fn writer(cluster: Arc<Cluster>, mut rx: mpsc::Receiver<Outgoing>) {
    let heartbeat = cluster.settings.heartbeat;
    let mut reconnects = cluster.client.reconnect_rx();
    let mut errors = cluster.client.error_rx();
    let mut w = Writer {
        cluster,
        seq: 0,
        health: Health {
            up: None,
            last_error: None,
            auth_logged: false,
        },
        last_beat: None,
        last_rewrite: None,
    };
    let mut tick = tokio::time::interval(heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if w.cluster.departed.load(Ordering::Acquire) {
            return;
        }
        tokio::select! {
            _ = w.cluster.closing.cancelled() => {
                // Shutdown: publish what is queued (the last deliveries),
                // then stop; leave() removes the node's state.
                let mut batch = Vec::new();
                while let Ok(item) = rx.try_recv() {
                    batch.push(item);
                }
                if !batch.is_empty() && !w.cluster.departed.load(Ordering::Acquire) {
                    w.flush(batch).await;
                }
                return;
            }
            item = rx.recv() => {
                let Some(item) = item else { return };
                let mut batch = vec![item];
                while batch.len() < BATCH {
                    match rx.try_recv() {
                        Ok(item) => batch.push(item),
                        Err(_) => break,
                    }
                }
                w.flush(batch).await;
                // Steady traffic must not starve the heartbeat.
                if w.last_beat.is_none_or(|t| t.elapsed() >= heartbeat) {
                    w.heartbeat().await;
                }
            }
            _ = tick.tick() => {
                if w.last_beat.is_none_or(|t| t.elapsed() >= heartbeat / 2) {
                    w.heartbeat().await;
                }
            }
            r = reconnects.recv() => {
                if r.is_ok() {
                    // A new connection, maybe to a Redis that lost this
                    // node's state: rewrite it.
                    w.cluster.dirty.store(true, Ordering::Release);
                }
            }
            e = errors.recv() => {
                if let Ok((e, _)) = e {
                    w.health.connection_error(&w.cluster, &e);
                }
            }
        }
    }
}

struct Writer {
    cluster: Arc<Cluster>,
    /// The number of this node's last membership change.
    seq: u64,
    health: Health,
    last_beat: Option<Instant>,
    last_rewrite: Option<Instant>,
}

impl Writer {
    async fn flush(&mut self, batch: Vec<Outgoing>) {
        let c = self.cluster.clone();
        let mut changes = Vec::new();
        let mut deliveries = Vec::new();
        for item in batch {
            match item {
                Outgoing::Change(ch) => changes.push(ch),
                Outgoing::Deliver { node, message } => {
                    c.dequeued(message.len());
                    deliveries.push((node, message));
                }
            }
        }
        if !ready(&c) {
            if !c.client.is_connected() {
                self.health.down(&c);
            }
            if !changes.is_empty() {
                c.dirty.store(true, Ordering::Release);
            }
            let m = Cluster::metrics();
            ClusterMetrics::count(&m.dropped, "membership", changes.len() as u64);
            ClusterMetrics::count(&m.dropped, "delivery", deliveries.len() as u64);
            return;
        }
        if c.dirty.load(Ordering::Acquire) {
            // The rewrite reads the hubs, which hold these changes already
            // (they are queued under the hubs' locks).
            self.rewrite().await;
        } else if !changes.is_empty() {
            self.write_changes(changes).await;
        }
        if !deliveries.is_empty() {
            self.publish_deliveries(deliveries).await;
        }
    }

    async fn write_changes(&mut self, changes: Vec<Change>) {
        let c = self.cluster.clone();
        let before = self.seq;
        let first = before + 1;
        let n = changes.len() as u64;
        self.seq += n;
        let members = c.names.members(c.node);
        let timeout = ms(c.settings.node_timeout);
        let written = async {
            let tx = c.client.multi();
            for ch in &changes {
                let field = wire::member_field(&ch.route, &ch.room, ch.conn);
                if ch.join {
                    tx.hset::<(), _, _>(&members, vec![(Key::from(field), Value::from(1))])
                        .await?;
                } else {
                    tx.hdel::<(), _, _>(&members, Key::from(field)).await?;
                }
            }
            // Only if the key holds the number before this batch: a key
            // that expired or was lost (the hash then holds only part of
            // the state) is not brought back half full.
            tx.set::<(), _, _>(
                c.names.seq(c.node),
                self.seq,
                Some(Expiration::PX(timeout)),
                Some(SetOptions::XX),
                true,
            )
            .await?;
            tx.pexpire::<(), _>(&members, timeout, None).await?;
            let results: Value = tx.exec(true).await?;
            let previous = results.into_array().into_iter().nth(changes.len());
            Ok::<Option<u64>, fred::error::Error>(previous.and_then(|v| v.as_u64()))
        };
        match written.await {
            Ok(Some(p)) if p == before => {
                self.health.ok(&c);
                let message = wire::encode(&Membership::Changes {
                    node: c.node,
                    first,
                    changes,
                });
                match c
                    .client
                    .spublish::<(), _, _>(c.names.membership_channel(), message)
                    .await
                {
                    Ok(()) => ClusterMetrics::count(&Cluster::metrics().published, "membership", n),
                    // Redis has them; the others see the gap at the next
                    // heartbeat and read them.
                    Err(_) => ClusterMetrics::count(&Cluster::metrics().dropped, "membership", n),
                }
            }
            Ok(_) => {
                // The state in Redis is not what this node wrote last.
                self.health.ok(&c);
                c.dirty.store(true, Ordering::Release);
            }
            Err(e) => {
                self.health.failed(&c, &e);
                c.dirty.store(true, Ordering::Release);
                ClusterMetrics::count(&Cluster::metrics().dropped, "membership", n);
            }
        }
    }

    async fn publish_deliveries(&mut self, deliveries: Vec<(u32, Bytes)>) {
        let c = self.cluster.clone();
        let n = deliveries.len() as u64;
        let pipeline = c.client.pipeline();
        let sent = async {
            for (node, message) in deliveries {
                pipeline
                    .spublish::<(), _, _>(c.names.node_channel(node), message)
                    .await?;
            }
            pipeline.all::<Vec<i64>>().await
        };
        match sent.await {
            Ok(receivers) => {
                self.health.ok(&c);
                // `SPUBLISH` answers how many subscribers got the message:
                // none means the node is not listening (it is
                // reconnecting, or has just gone), and the delivery is
                // lost: counted as dropped, not as published.
                let unheard = receivers.iter().filter(|&&r| r <= 0).count() as u64;
                let m = Cluster::metrics();
                ClusterMetrics::count(&m.published, "delivery", n - unheard.min(n));
                ClusterMetrics::count(&m.dropped, "delivery", unheard);
            }
            Err(e) => {
                self.health.failed(&c, &e);
                ClusterMetrics::count(&Cluster::metrics().dropped, "delivery", n);
            }
        }
    }

    /// Writes the node's whole membership (read from its hubs) under a new
    /// change number, and tells the other nodes, which then read it. At
    /// most once a heartbeat, and only while connected.
    async fn rewrite(&mut self) {
        let c = self.cluster.clone();
        let interval = c.settings.heartbeat;
        if !ready(&c) || self.last_rewrite.is_some_and(|t| t.elapsed() < interval) {
            return;
        }
        self.last_rewrite = Some(Instant::now());
        // Cleared before the hubs are read: a change dropped meanwhile sets
        // it again (and, queued under the hubs' locks, is either seen here
        // or reported by the flag).
        c.dirty.store(false, Ordering::Release);
        self.seq += 1;
        let mut fields: Vec<(Key, Value)> = Vec::new();
        if let Some(routes) = c.routes.get() {
            for hub in routes.hubs() {
                if let Some(route) = hub.route_name() {
                    for (room, conn) in hub.memberships() {
                        fields.push((
                            Key::from(wire::member_field(route, &room, conn)),
                            Value::from(1),
                        ));
                    }
                }
            }
        }
        let members = c.names.members(c.node);
        let timeout = ms(c.settings.node_timeout);
        let written = async {
            // This node's number must still be its own: claimed (if it
            // expired) or found held by this node, before anything of the
            // number is written. Another node's claim is not touched. (A
            // claim is taken only from an absent key, and this node's now
            // lives a whole node_timeout: between this and the MULTI,
            // nobody can take it.)
            let owner: Option<String> = c
                .client
                .eval(
                    CLAIM,
                    c.names.owner(c.node),
                    vec![c.token.to_string(), timeout.to_string()],
                )
                .await?;
            if owner.as_deref().is_some_and(|o| o != c.token) {
                return Ok(owner);
            }
            let tx = c.client.multi();
            tx.pexpire::<(), _>(c.names.owner(c.node), timeout, None)
                .await?;
            tx.del::<(), _>(&members).await?;
            let mut rest = fields;
            while !rest.is_empty() {
                let chunk: Vec<(Key, Value)> = rest.drain(..rest.len().min(HSET_CHUNK)).collect();
                tx.hset::<(), _, _>(&members, chunk).await?;
            }
            tx.pexpire::<(), _>(&members, timeout, None).await?;
            tx.set::<(), _, _>(
                c.names.seq(c.node),
                self.seq,
                Some(Expiration::PX(timeout)),
                None,
                false,
            )
            .await?;
            tx.exec::<Value>(true).await?;
            Ok::<Option<String>, fred::error::Error>(owner)
        };
        match written.await {
            Ok(owner) => {
                self.health.ok(&c);
                if owner.as_deref().is_some_and(|o| o != c.token) {
                    c.depart(&format!(
                        "another node ({}) holds its node number {}",
                        owner.as_deref().unwrap_or("?"),
                        c.node
                    ));
                    return;
                }
                self.announce().await;
            }
            Err(e) => {
                self.health.failed(&c, &e);
                c.dirty.store(true, Ordering::Release);
            }
        }
    }

    /// Renews this node's keys and publishes a heartbeat.
    async fn heartbeat(&mut self) {
        let c = self.cluster.clone();
        self.last_beat = Some(Instant::now());
        if !ready(&c) {
            if !c.client.is_connected() {
                self.health.down(&c);
            }
            c.dirty.store(true, Ordering::Release);
            return;
        }
        if c.dirty.load(Ordering::Acquire) {
            self.rewrite().await;
            return;
        }
        let timeout = ms(c.settings.node_timeout);
        let renewed = async {
            // The number's keys are renewed only while the claim is this
            // node's: another node's claim (and its state) is not touched.
            // One script, so that a claim taken between the check and the
            // renewal cannot be renewed as this node's.
            let v: Value = c
                .client
                .eval(
                    RENEW,
                    vec![
                        c.names.owner(c.node),
                        c.names.members(c.node),
                        c.names.seq(c.node),
                    ],
                    vec![c.token.to_string(), timeout.to_string()],
                )
                .await?;
            let mut parts = v.into_array().into_iter();
            let renewed = parts.next().and_then(|v| v.as_u64()) == Some(1);
            let owner = parts.next().and_then(|v| v.into_string());
            Ok::<(bool, Option<String>), fred::error::Error>((renewed, owner))
        };
        match renewed.await {
            Ok((true, Some(owner))) if owner == c.token => {
                self.health.ok(&c);
                self.announce().await;
            }
            Ok((_, Some(owner))) if owner != c.token => {
                self.health.ok(&c);
                c.depart(&format!(
                    "another node ({owner}) holds its node number {}",
                    c.node
                ));
            }
            Ok(_) => {
                // Its keys are gone (expired, or Redis lost them): rewrite.
                self.health.ok(&c);
                c.dirty.store(true, Ordering::Release);
                self.rewrite().await;
            }
            Err(e) => {
                self.health.failed(&c, &e);
                c.dirty.store(true, Ordering::Release);
            }
        }
    }

    /// Registers the node as live (and the counter past its number) and
    /// publishes a heartbeat. Separate commands: these keys are in other
    /// slots than the node's own.
    async fn announce(&mut self) {
        let c = self.cluster.clone();
        let timeout = ms(c.settings.node_timeout);
        let now = now_ms();
        let live = async {
            c.client
                .zadd::<(), _, _>(
                    c.names.nodes(),
                    None,
                    None,
                    false,
                    false,
                    ((now + timeout) as f64, c.node.to_string()),
                )
                .await?;
            c.client
                .zremrangebyscore::<(), _, _, _>(c.names.nodes(), f64::NEG_INFINITY, now as f64)
                .await?;
            // A Redis that lost the counter gets it back, past this node.
            c.client
                .zadd::<(), _, _>(
                    c.names.node_seq(),
                    None,
                    Some(ZOrdering::GreaterThan),
                    false,
                    false,
                    (f64::from(c.node), COUNTER),
                )
                .await
        };
        if let Err(e) = live.await {
            self.health.failed(&c, &e);
            return;
        }
        let message = wire::encode(&Membership::Heartbeat {
            node: c.node,
            name: c.name.clone(),
            seq: self.seq,
            sent_ms: wire::now_ms(),
        });
        let probe = wire::encode_delivery(c.node, Delivery::Probe);
        let published = async {
            c.client
                .spublish::<(), _, _>(c.names.membership_channel(), message)
                .await?;
            c.client
                .spublish::<(), _, _>(c.names.node_channel(c.node), probe)
                .await
        };
        match published.await {
            Ok(()) => {
                c.beat_published_ms.store(wire::now_ms(), Ordering::Release);
                ClusterMetrics::count(&Cluster::metrics().published, "heartbeat", 1);
            }
            Err(e) => {
                self.health.failed(&c, &e);
                ClusterMetrics::count(&Cluster::metrics().dropped, "heartbeat", 1);
            }
        }
    }
}

/// Removes this node's state from Redis, then says goodbye (the writer has
/// stopped: nothing writes the state back).
pub async fn leave(cluster: &Cluster) {
    let c = cluster;
    if c.departed.load(Ordering::Acquire) || !c.client.is_connected() {
        return;
    }
    let _ = c
        .client
        .del::<(), _>(vec![
            c.names.members(c.node),
            c.names.seq(c.node),
            c.names.owner(c.node),
        ])
        .await;
    let _ = c
        .client
        .zrem::<(), _, _>(c.names.nodes(), c.node.to_string())
        .await;
    let _ = c
        .client
        .spublish::<(), _, _>(
            c.names.membership_channel(),
            wire::encode(&Membership::Bye { node: c.node }),
        )
        .await;
}

/// The subscriber task.
async fn subscriber(cluster: Arc<Cluster>, sub: SubscriberClient) {
    // Subscriptions are renewed here after a reconnect, not by the
    // client's manage_subscriptions (in fred 10.1 it sends PSUBSCRIBE with
    // no pattern first, which Redis refuses, and stops there). The
    // receivers exist before the first connection, so none of its events
    // is missed.
    let mut messages = sub.message_rx();
    let mut reconnects = sub.reconnect_rx();
    sub.connect();
    let mut tick = tokio::time::interval(cluster.settings.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut s = Subscriber {
        members_channel: cluster.names.membership_channel(),
        own_channel: cluster.names.node_channel(cluster.node),
        cluster: cluster.clone(),
        subscribed: false,
        bootstrap: true,
        stale: HashMap::new(),
        stale_logged: false,
        heard_own: [0; 2],
        twin_logged: false,
    };
    loop {
        if cluster.departed.load(Ordering::Acquire) {
            return;
        }
        tokio::select! {
            _ = cluster.closing.cancelled() => return,
            m = messages.recv() => match m {
                Ok(m) => s.message(m).await,
                Err(RecvError::Lagged(n)) => s.lagged(n),
                Err(RecvError::Closed) => return,
            },
            r = reconnects.recv() => {
                if r.is_ok() {
                    // A new connection: subscribe again, and read every node
                    // again (what was published meanwhile is lost).
                    cluster.listening.store(false, Ordering::Release);
                    s.subscribed = s.subscribe(&sub).await;
                    s.bootstrap = true;
                }
            }
            _ = tick.tick() => {
                // What arrived is handled before deciding who is silent.
                loop {
                    match messages.try_recv() {
                        Ok(m) => s.message(m).await,
                        Err(TryRecvError::Lagged(n)) => s.lagged(n),
                        Err(_) => break,
                    }
                }
                if s.subscribed && sub.is_connected() && s.deaf() {
                    s.subscribed = s.subscribe(&sub).await;
                    s.bootstrap = true;
                }
                if !(s.subscribed && s.cannot_judge()) {
                    s.expire();
                }
                if !s.subscribed && sub.is_connected() {
                    s.subscribed = s.subscribe(&sub).await;
                }
                if s.subscribed && s.bootstrap {
                    s.bootstrap = !s.read_all().await;
                }
                let stale = std::mem::take(&mut s.stale);
                for (node, name) in stale {
                    s.resync(node, name.as_deref()).await;
                }
            }
        }
    }
}

struct Subscriber {
    cluster: Arc<Cluster>,
    members_channel: String,
    own_channel: String,
    subscribed: bool,
    /// Every node's state must be read (at start, after a reconnect or
    /// lost messages).
    bootstrap: bool,
    /// Nodes whose snapshot could not be read, to try again.
    stale: HashMap<u32, Option<String>>,
    /// Whether a stale delivery was reported.
    stale_logged: bool,
    /// When this node last heard its own heartbeat (on the `members`
    /// channel) and its own probe (on its channel), or subscribed: ms since
    /// the Unix epoch.
    heard_own: [u64; 2],
    /// Whether another node with this node's `node_id` was reported.
    twin_logged: bool,
}

impl Subscriber {
    /// Subscribes to the two channels, one command each (they are in
    /// different slots of a Redis Cluster).
    async fn subscribe(&mut self, sub: &SubscriberClient) -> bool {
        let ok = sub.ssubscribe(self.members_channel.clone()).await.is_ok()
            && sub.ssubscribe(self.own_channel.clone()).await.is_ok();
        self.cluster.listening.store(ok, Ordering::Release);
        // Counted from now: what was published before may not arrive.
        self.heard_own = [wire::now_ms(); 2];
        ok
    }

    /// Whether the node has stopped hearing one of its channels although
    /// its heartbeats and probes are published: on a Redis Cluster, a
    /// slot that moves to another shard (a failover by hand, a reshard)
    /// ends the subscriptions to its channels there without breaking the
    /// connection. Logged; the caller subscribes again.
    fn deaf(&mut self) -> bool {
        let c = &self.cluster;
        let beat = u64::try_from(c.settings.heartbeat.as_millis()).unwrap_or(u64::MAX);
        let published = c.beat_published_ms.load(Ordering::Acquire);
        let now = wire::now_ms();
        let unheard = self.heard_own.iter().position(|&heard| {
            // Published at least twice since (so not a message in flight),
            // and silent for two heartbeats and half a second.
            published > heard.saturating_add(beat.saturating_mul(2))
                && now.saturating_sub(heard) > beat.saturating_mul(2) + 500
        });
        let Some(which) = unheard else {
            return false;
        };
        let channel = if which == 0 {
            &self.members_channel
        } else {
            &self.own_channel
        };
        tracing::warn!(
            "cluster: node {} no longer hears its own messages on {channel} (on a Redis \
             Cluster its slot may have moved to another shard): subscribing again and \
             reading every node's rooms again",
            c.name
        );
        // The silence was this node's: the others are not to expire for it.
        c.replica.write().heard_all(Instant::now());
        true
    }

    /// Whether this node has not heard its own heartbeat for `node_timeout`
    /// although it published since: then it cannot tell who else is silent,
    /// and expires nobody (it subscribes again meanwhile), for at most
    /// three times `node_timeout`.
    fn cannot_judge(&self) -> bool {
        let c = &self.cluster;
        let heard = self.heard_own[0];
        let timeout = u64::try_from(c.settings.node_timeout.as_millis()).unwrap_or(u64::MAX);
        let silence = wire::now_ms().saturating_sub(heard);
        c.beat_published_ms.load(Ordering::Acquire) > heard
            && silence >= timeout
            && silence < timeout.saturating_mul(3)
    }

    fn lagged(&mut self, n: u64) {
        tracing::warn!(
            "cluster: {n} messages from Redis were lost (the subscriber fell behind); \
             reading every node's rooms again"
        );
        // Membership changes come back with the snapshots; deliveries
        // among them are lost.
        ClusterMetrics::count(&Cluster::metrics().dropped, "lagged", n);
        self.bootstrap = true;
    }

    async fn message(&mut self, m: fred::types::Message) {
        let Some(bytes) = m.value.as_bytes() else {
            return;
        };
        if *m.channel == *self.members_channel {
            self.membership(bytes).await;
        } else if *m.channel == *self.own_channel {
            self.delivery(bytes);
        }
    }

    async fn membership(&mut self, bytes: &[u8]) {
        let Some(m) = wire::decode::<Membership>(bytes) else {
            tracing::debug!("cluster: a membership message did not decode; dropped");
            return;
        };
        let c = self.cluster.clone();
        let now = Instant::now();
        match m {
            Membership::Changes {
                node,
                first,
                changes,
            } => {
                if node == c.node {
                    return;
                }
                ClusterMetrics::count(
                    &Cluster::metrics().received,
                    "membership",
                    changes.len() as u64,
                );
                let r = c.replica.write().changes(node, first, &changes, now);
                if r == Apply::Resync {
                    self.resync(node, None).await;
                }
            }
            Membership::Heartbeat {
                node,
                name,
                seq,
                sent_ms,
            } => {
                if node == c.node {
                    self.heard_own[0] = wire::now_ms();
                    return;
                }
                ClusterMetrics::count(&Cluster::metrics().received, "heartbeat", 1);
                if name == c.name && !self.twin_logged {
                    self.twin_logged = true;
                    tracing::warn!(
                        "cluster: node number {node} has this node's node_id {name:?} too: give \
                         each node its own node_id (logs and the metrics labelled with it \
                         cannot tell the two apart)"
                    );
                }
                let r =
                    c.replica
                        .write()
                        .heartbeat(node, &name, seq, (sent_ms, wire::now_ms()), now);
                if r == Apply::Resync {
                    self.resync(node, Some(&name)).await;
                }
            }
            Membership::Bye { node } => {
                if node == c.node {
                    return;
                }
                self.stale.remove(&node);
                if let Some((name, n)) = c.replica.write().remove(node) {
                    tracing::info!(
                        "cluster: node {name} left; its {n} room memberships no longer count"
                    );
                }
                self.count_nodes();
            }
        }
    }

    fn delivery(&mut self, bytes: &[u8]) {
        let Some(envelope) = wire::decode::<wire::Envelope>(bytes) else {
            tracing::debug!("cluster: a delivery did not decode; dropped");
            return;
        };
        if envelope.delivery == Delivery::Probe {
            if envelope.node == self.cluster.node {
                self.heard_own[1] = wire::now_ms();
            }
            return;
        }
        ClusterMetrics::count(&Cluster::metrics().received, "delivery", 1);
        // Held up longer than a node may be silent (a publish caught by a
        // disconnection, written once Redis was back): too late to
        // deliver. The age allows for the sender's clock, as its
        // heartbeats show it. Counted with the drops.
        let age =
            self.cluster
                .replica
                .read()
                .age_ms(envelope.node, envelope.sent_ms, wire::now_ms());
        if u128::from(age) > self.cluster.settings.node_timeout.as_millis() {
            ClusterMetrics::count(&Cluster::metrics().dropped, "delivery", 1);
            if !self.stale_logged {
                self.stale_logged = true;
                tracing::warn!(
                    "cluster: a delivery arrived {age} ms after it was sent, past node_timeout: \
                     dropped (and counted in wasmgate_cluster_dropped_total); later ones are \
                     counted without a log line"
                );
            }
            return;
        }
        let Some(routes) = self.cluster.routes.get() else {
            return;
        };
        match envelope.delivery {
            Delivery::Message {
                route,
                target,
                text,
                payload,
            } => {
                let Some(hub) = routes.hub(&route) else {
                    return;
                };
                let payload = Bytes::from(payload);
                match target {
                    Target::Conn(id) => {
                        if let Ok(conn) = hub.get(id) {
                            let frame = if text {
                                Outbound::Text(payload)
                            } else {
                                Outbound::Binary(payload)
                            };
                            let _ = conn.deliver(frame);
                        }
                    }
                    Target::Room { room, except } => {
                        let _ = hub.broadcast_local(&room, text, payload, except);
                    }
                }
            }
            Delivery::Close {
                route,
                conn,
                code,
                reason,
            } => {
                if let Some(hub) = routes.hub(&route) {
                    if let Ok(conn) = hub.get(conn) {
                        if !conn.outbox.is_closed() {
                            conn.request_close(code, &reason, ClosedBy::Plugin);
                        }
                    }
                }
            }
            // Handled above.
            Delivery::Probe => {}
        }
    }

    /// Reads every live node's state; false if Redis did not answer.
    async fn read_all(&mut self) -> bool {
        let c = self.cluster.clone();
        if !c.client.is_connected() {
            return false;
        }
        let nodes: Result<Vec<String>, _> = c
            .client
            .zrangebyscore(c.names.nodes(), now_ms() as f64, f64::INFINITY, false, None)
            .await;
        let Ok(nodes) = nodes else {
            return false;
        };
        for node in nodes.iter().filter_map(|n| n.parse::<u32>().ok()) {
            if node != c.node {
                self.resync(node, None).await;
            }
        }
        true
    }

    /// Reads node `node`'s snapshot and replaces the replica's view of it.
    async fn resync(&mut self, node: u32, name: Option<&str>) {
        let c = self.cluster.clone();
        if !c.client.is_connected() {
            self.stale.insert(node, name.map(str::to_owned));
            return;
        }
        Cluster::metrics().resyncs.inc();
        let read = async {
            let tx = c.client.multi();
            tx.hgetall::<(), _>(c.names.members(node)).await?;
            tx.get::<(), _>(c.names.seq(node)).await?;
            tx.get::<(), _>(c.names.owner(node)).await?;
            tx.exec::<Value>(true).await
        };
        let v = match read.await {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!("cluster: reading node {node}'s rooms failed ({e}); trying again");
                self.stale.insert(node, name.map(str::to_owned));
                return;
            }
        };
        let mut parts = v.into_array().into_iter();
        let members = parts.next().unwrap_or(Value::Null);
        let seq = parts.next().and_then(|s| s.as_u64());
        // The owner token is `<node_id>:<16 hex digits>`: the node's name,
        // until its next heartbeat says it.
        let owner = parts.next().and_then(|v| v.as_string());
        let named = name.map(str::to_owned).or_else(|| {
            owner
                .as_deref()
                .and_then(|t| t.rsplit_once(':'))
                .map(|(n, _)| n.to_owned())
        });
        let Some(seq) = seq else {
            // No state: the node has expired (or never wrote it).
            if let Some((name, n)) = c.replica.write().remove(node) {
                tracing::info!(
                    "cluster: node {name}'s state has expired in Redis; its {n} room memberships no longer count"
                );
            }
            self.count_nodes();
            return;
        };
        // Decoded before the replica is locked.
        let mut list = Vec::new();
        if let Ok(map) = members.into_map() {
            let map: Map = map;
            for (k, _) in map.inner() {
                if let Some(m) = wire::parse_member_field(k.as_bytes()) {
                    list.push(m);
                }
            }
        }
        c.replica
            .write()
            .snapshot(node, named.as_deref(), seq, list, Instant::now());
        self.count_nodes();
    }

    fn expire(&mut self) {
        let c = &self.cluster;
        let gone = c
            .replica
            .write()
            .expire(c.settings.node_timeout, Instant::now());
        for (node, name, n) in gone {
            self.stale.remove(&node);
            tracing::warn!(
                "cluster: node {name} (number {node}) was not heard from for {} ms; its {n} room memberships no longer count",
                c.settings.node_timeout.as_millis()
            );
        }
        self.count_nodes();
    }

    fn count_nodes(&self) {
        let c = &self.cluster;
        let n = c.replica.read().node_count();
        Cluster::metrics()
            .nodes
            .get_or_create(&c.labels)
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}
