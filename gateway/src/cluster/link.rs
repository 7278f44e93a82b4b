//! The node's link to Redis: two background tasks, so that no host call
//! ever waits on the network.
//!
//! - The **writer** takes what [`super::Cluster`] queued, in order and in
//!   batches: a batch's membership changes go to the node's hash in one
//!   `MULTI` (with the number of the last change), then to the
//!   `members` channel as one message; deliveries are published to each
//!   receiving node's channel in one pipeline. Every `heartbeat` it renews
//!   the node's keys and publishes a heartbeat. After any failure it
//!   rewrites the node's whole state from its hubs (the truth) and moves
//!   the change number on, so the other nodes read it again.
//! - The **subscriber** listens (`SSUBSCRIBE`) to the `members` channel
//!   and the node's own channel. It keeps the replica of other nodes'
//!   memberships, reading a node's snapshot when its changes have a gap,
//!   hands deliveries to the local hubs, and drops nodes silent for
//!   `node_timeout`.
//!
//! Redis going away changes nothing local: the client reconnects with
//! exponential backoff (100 ms to 5 s), commands fail at once while it is
//! down (so the writer never stalls), the outage is logged once and shown
//! by `wasmgate_cluster_redis_up`, and on reconnection the writer rewrites
//! the node's state and the subscriber re-reads everyone's.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fred::clients::{Client, SubscriberClient};
use fred::prelude::{
    ClientLike, EventInterface, HashesInterface, KeysInterface, PubsubInterface,
    SortedSetsInterface, TransactionInterface,
};
use fred::types::config::{Config, ReconnectPolicy};
use fred::types::{Builder, Expiration, Key, Map, SetOptions, Value};
use tokio::sync::broadcast::error::RecvError;
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

/// A client for `settings.redis`, not connected yet.
fn builder(settings: &ClusterSettings) -> Result<Builder, ClusterError> {
    let mut config = Config::from_url(&settings.redis).map_err(|e| ClusterError::Url {
        origin: settings.origin.clone(),
        url: settings.redis.clone(),
        reason: e.details().to_owned(),
    })?;
    // While disconnected, commands fail at once instead of waiting for the
    // reconnection: the writer counts them and moves on.
    config.fail_fast = true;
    let mut b = Builder::from_config(config);
    b.with_connection_config(|c| {
        c.connection_timeout = Duration::from_secs(2);
        c.internal_command_timeout = Duration::from_secs(2);
        c.max_command_attempts = 1;
    })
    .with_performance_config(|p| {
        p.default_command_timeout = Duration::from_secs(2);
        // Room for bursts of messages while the subscriber reads a
        // snapshot; past it the subscriber resyncs everything.
        p.broadcast_channel_capacity = 1 << 16;
    })
    .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2));
    Ok(b)
}

/// The command client for `settings`, connecting in the background.
pub fn client(settings: &ClusterSettings) -> Result<Client, ClusterError> {
    let client = builder(settings)?.build().map_err(|e| ClusterError::Url {
        origin: settings.origin.clone(),
        url: settings.redis.clone(),
        reason: e.details().to_owned(),
    })?;
    client.connect();
    Ok(client)
}

/// Takes a node number (`INCR node-seq`), waiting at most 3 s. A number
/// whose keys exist (a live node took it before Redis lost the counter, in
/// a restart without persistence) is skipped.
pub async fn take_node_number(client: &Client, names: &wire::Names) -> Result<u64, String> {
    let attempt = async {
        client.wait_for_connect().await?;
        let mut n = client.incr::<u64, _>(names.node_seq()).await?;
        for _ in 0..64 {
            let node = super::node_number(n);
            let taken: u64 = client.exists(names.seq(node)).await?;
            if taken == 0 {
                break;
            }
            n = client.incr::<u64, _>(names.node_seq()).await?;
        }
        Ok::<u64, fred::error::Error>(n)
    };
    match tokio::time::timeout(Duration::from_secs(3), attempt).await {
        Ok(Ok(n)) => Ok(n),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer within 3 s".into()),
    }
}

/// Starts the writer and subscriber tasks.
pub fn spawn(cluster: Arc<Cluster>, rx: mpsc::Receiver<Outgoing>) {
    let sub = builder(&cluster.settings).and_then(|b| {
        b.build_subscriber_client().map_err(|e| ClusterError::Url {
            origin: cluster.settings.origin.clone(),
            url: cluster.settings.redis.clone(),
            reason: e.details().to_owned(),
        })
    });
    match sub {
        Ok(sub) => {
            tokio::spawn(subscriber(cluster.clone(), sub));
        }
        // The same URL built the command client already.
        Err(e) => tracing::error!("cluster: {e}"),
    }
    tokio::spawn(writer(cluster, rx));
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Whether the link works, for logging its changes once.
struct Health {
    up: Option<bool>,
}

impl Health {
    fn ok(&mut self, cluster: &Cluster) {
        if self.up != Some(true) {
            if self.up == Some(false) {
                tracing::info!(
                    "cluster: Redis at {} is reachable again: node {} rewrote its rooms, \
                     cross-node delivery resumes",
                    cluster.settings.redis,
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

    fn failed(&mut self, cluster: &Cluster, e: &fred::error::Error) {
        if self.up != Some(false) {
            tracing::warn!(
                "cluster: degraded: Redis at {} is unreachable ({e}); local rooms and sends \
                 go on, deliveries to other nodes are dropped and counted until it is back",
                cluster.settings.redis
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
    let mut w = Writer {
        cluster,
        seq: 0,
        health: Health { up: None },
    };
    let mut tick = tokio::time::interval(w.cluster.settings.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
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
            }
            _ = tick.tick() => w.heartbeat().await,
        }
    }
}

struct Writer {
    cluster: Arc<Cluster>,
    /// The number of this node's last membership change.
    seq: u64,
    health: Health,
}

impl Writer {
    async fn flush(&mut self, batch: Vec<Outgoing>) {
        let mut changes = Vec::new();
        let mut deliveries = Vec::new();
        for item in batch {
            match item {
                Outgoing::Change(c) => changes.push(c),
                Outgoing::Deliver { node, message } => deliveries.push((node, message)),
            }
        }
        if self.cluster.dirty.load(Ordering::Acquire) {
            // The rewrite reads the hubs, which already hold these changes.
            self.rewrite().await;
        } else if !changes.is_empty() {
            self.write_changes(changes).await;
        }
        if !deliveries.is_empty() {
            self.publish_deliveries(deliveries).await;
        }
    }

    async fn write_changes(&mut self, changes: Vec<Change>) {
        let c = &self.cluster;
        let first = self.seq + 1;
        self.seq += changes.len() as u64;
        let n = changes.len() as u64;
        let members = c.names.members(c.node);
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
            tx.set::<(), _, _>(
                c.names.seq(c.node),
                self.seq,
                Some(Expiration::PX(ms(c.settings.node_timeout))),
                None,
                false,
            )
            .await?;
            tx.pexpire::<(), _>(&members, ms(c.settings.node_timeout), None)
                .await?;
            tx.exec::<Value>(true).await?;
            let message = wire::encode(&Membership::Changes {
                node: c.node,
                first,
                changes,
            });
            c.client
                .spublish::<(), _, _>(c.names.membership_channel(), message)
                .await
        };
        match written.await {
            Ok(()) => {
                self.health.ok(c);
                ClusterMetrics::count(&Cluster::metrics().published, "membership", n);
            }
            Err(e) => {
                self.health.failed(c, &e);
                c.dirty.store(true, Ordering::Release);
                ClusterMetrics::count(&Cluster::metrics().dropped, "membership", n);
            }
        }
    }

    async fn publish_deliveries(&mut self, deliveries: Vec<(u32, Bytes)>) {
        let c = &self.cluster;
        let n = deliveries.len() as u64;
        let pipeline = c.client.pipeline();
        let sent = async {
            for (node, message) in deliveries {
                pipeline
                    .spublish::<(), _, _>(c.names.node_channel(node), message)
                    .await?;
            }
            pipeline.all::<Value>().await
        };
        match sent.await {
            Ok(_) => {
                self.health.ok(c);
                ClusterMetrics::count(&Cluster::metrics().published, "delivery", n);
            }
            Err(e) => {
                self.health.failed(c, &e);
                ClusterMetrics::count(&Cluster::metrics().dropped, "delivery", n);
            }
        }
    }

    /// Writes the node's whole membership (read from its hubs) under a new
    /// change number, and tells the other nodes, which then read it.
    async fn rewrite(&mut self) {
        let c = &self.cluster;
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
            let tx = c.client.multi();
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
            tx.zadd::<(), _, _>(
                c.names.nodes(),
                None,
                None,
                false,
                false,
                ((now_ms() + timeout) as f64, c.node.to_string()),
            )
            .await?;
            // A Redis that lost the counter (restarted without persistence)
            // gets one again, at least this node's number.
            tx.set::<(), _, _>(
                c.names.node_seq(),
                u64::from(c.node),
                None,
                Some(SetOptions::NX),
                false,
            )
            .await?;
            tx.exec::<Value>(true).await?;
            Ok::<(), fred::error::Error>(())
        };
        match written.await {
            Ok(()) => {
                self.health.ok(c);
                self.publish_heartbeat().await;
            }
            Err(e) => {
                self.health.failed(c, &e);
                c.dirty.store(true, Ordering::Release);
            }
        }
    }

    /// Renews this node's keys and publishes a heartbeat.
    async fn heartbeat(&mut self) {
        let c = self.cluster.clone();
        if c.dirty.load(Ordering::Acquire) {
            self.rewrite().await;
            return;
        }
        let timeout = ms(c.settings.node_timeout);
        let renewed = async {
            let tx = c.client.multi();
            tx.pexpire::<(), _>(c.names.members(c.node), timeout, None)
                .await?;
            tx.pexpire::<(), _>(c.names.seq(c.node), timeout, None)
                .await?;
            tx.zadd::<(), _, _>(
                c.names.nodes(),
                None,
                None,
                false,
                false,
                ((now_ms() + timeout) as f64, c.node.to_string()),
            )
            .await?;
            tx.zremrangebyscore::<(), _, _, _>(c.names.nodes(), f64::NEG_INFINITY, now_ms() as f64)
                .await?;
            let v: Value = tx.exec(true).await?;
            // PEXPIRE of the change number answers 0 if the key is gone (it
            // expired while this node could not renew it): rewrite.
            let arr = v.into_array();
            Ok::<bool, fred::error::Error>(arr.get(1).and_then(Value::as_u64) == Some(1))
        };
        match renewed.await {
            Ok(true) => {
                self.health.ok(&c);
                self.publish_heartbeat().await;
            }
            Ok(false) => {
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

    async fn publish_heartbeat(&mut self) {
        let c = &self.cluster;
        let message = wire::encode(&Membership::Heartbeat {
            node: c.node,
            name: c.name.clone(),
            seq: self.seq,
        });
        match c
            .client
            .spublish::<(), _, _>(c.names.membership_channel(), message)
            .await
        {
            Ok(()) => ClusterMetrics::count(&Cluster::metrics().published, "heartbeat", 1),
            Err(e) => {
                self.health.failed(c, &e);
                ClusterMetrics::count(&Cluster::metrics().dropped, "heartbeat", 1);
            }
        }
    }
}

/// Says goodbye: publishes `Bye` and deletes this node's keys.
pub async fn leave(cluster: &Cluster) {
    let c = cluster;
    let _ = c
        .client
        .spublish::<(), _, _>(
            c.names.membership_channel(),
            wire::encode(&Membership::Bye { node: c.node }),
        )
        .await;
    let _ = c
        .client
        .del::<(), _>(vec![c.names.members(c.node), c.names.seq(c.node)])
        .await;
    let _ = c
        .client
        .zrem::<(), _, _>(c.names.nodes(), c.node.to_string())
        .await;
}

/// The subscriber task.
async fn subscriber(cluster: Arc<Cluster>, sub: SubscriberClient) {
    sub.connect();
    // Subscriptions are renewed here after a reconnect, not by the
    // client's manage_subscriptions (in fred 10.1 it sends PSUBSCRIBE with
    // no pattern first, which Redis refuses, and stops there).
    let mut messages = sub.message_rx();
    let mut reconnects = sub.reconnect_rx();
    let mut tick = tokio::time::interval(cluster.settings.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let members_channel = cluster.names.membership_channel();
    let own_channel = cluster.names.node_channel(cluster.node);
    let mut s = Subscriber {
        cluster: cluster.clone(),
        subscribed: false,
        bootstrap: true,
        stale: Vec::new(),
        collision_logged: false,
        stale_logged: false,
    };
    loop {
        tokio::select! {
            m = messages.recv() => match m {
                Ok(m) => {
                    if let Some(bytes) = m.value.as_bytes() {
                        if *m.channel == *members_channel {
                            s.membership(bytes).await;
                        } else if *m.channel == *own_channel {
                            s.delivery(bytes);
                        }
                    }
                }
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!("cluster: {n} messages from Redis were lost (the subscriber fell behind); reading every node's rooms again");
                    s.bootstrap = true;
                }
                Err(RecvError::Closed) => return,
            },
            r = reconnects.recv() => {
                if r.is_ok() {
                    // A new connection: subscribe again, and read every node
                    // again (what was published meanwhile is lost).
                    s.subscribed = sub
                        .ssubscribe(vec![members_channel.clone(), own_channel.clone()])
                        .await
                        .is_ok();
                    s.bootstrap = true;
                }
            }
            _ = tick.tick() => {
                if !s.subscribed {
                    s.subscribed = sub
                        .ssubscribe(vec![members_channel.clone(), own_channel.clone()])
                        .await
                        .is_ok();
                }
                if s.subscribed && s.bootstrap {
                    s.bootstrap = !s.read_all().await;
                }
                let stale = std::mem::take(&mut s.stale);
                for (node, name) in stale {
                    s.resync(node, name.as_deref()).await;
                }
                s.expire();
            }
        }
    }
}

struct Subscriber {
    cluster: Arc<Cluster>,
    subscribed: bool,
    /// Every node's state must be read (at start, after a reconnect or
    /// lost messages).
    bootstrap: bool,
    /// Nodes whose snapshot could not be read, to try again.
    stale: Vec<(u32, Option<String>)>,
    /// Whether another node with this node's number was reported.
    collision_logged: bool,
    /// Whether a stale delivery was reported.
    stale_logged: bool,
}

impl Subscriber {
    async fn membership(&mut self, bytes: &[u8]) {
        let Some(m) = wire::decode::<Membership>(bytes) else {
            tracing::debug!("cluster: a membership message did not decode; dropped");
            return;
        };
        let c = &self.cluster;
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
            Membership::Heartbeat { node, name, seq } => {
                if node == c.node {
                    if name != c.name && !self.collision_logged {
                        self.collision_logged = true;
                        tracing::error!(
                            "cluster: node {name} uses this node's number {node} too (Redis lost its \
                             node counter while both started?): connection ids of the two nodes can \
                             collide; restart one of them"
                        );
                    }
                    return;
                }
                ClusterMetrics::count(&Cluster::metrics().received, "heartbeat", 1);
                let r = c.replica.write().heartbeat(node, &name, seq, now);
                if r == Apply::Resync {
                    self.resync(node, Some(&name)).await;
                }
            }
            Membership::Bye { node } => {
                if node == c.node {
                    return;
                }
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
        ClusterMetrics::count(&Cluster::metrics().received, "delivery", 1);
        // Held up longer than a node may be silent (a publish in flight
        // when Redis went away, written once it was back): too late to
        // deliver. Counted with the drops.
        let age = wire::now_ms().saturating_sub(envelope.sent_ms);
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
        let d = envelope.delivery;
        let Some(routes) = self.cluster.routes.get() else {
            return;
        };
        match d {
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
                let frame = || {
                    if text {
                        Outbound::Text(payload.clone())
                    } else {
                        Outbound::Binary(payload.clone())
                    }
                };
                match target {
                    Target::Conn(id) => {
                        if let Ok(conn) = hub.get(id) {
                            let _ = conn.deliver(frame());
                        }
                    }
                    Target::Room { room, except } => {
                        let _ = hub.broadcast_local(&room, text, payload.clone(), except);
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
        }
    }

    /// Reads every live node's state; false if Redis did not answer.
    async fn read_all(&mut self) -> bool {
        let c = self.cluster.clone();
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
        Cluster::metrics().resyncs.inc();
        let read = async {
            let tx = c.client.multi();
            tx.hgetall::<(), _>(c.names.members(node)).await?;
            tx.get::<(), _>(c.names.seq(node)).await?;
            tx.exec::<Value>(true).await
        };
        let v = match read.await {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!("cluster: reading node {node}'s rooms failed ({e}); trying again");
                self.stale.push((node, name.map(str::to_owned)));
                return;
            }
        };
        let mut parts = v.into_array().into_iter();
        let members = parts.next().unwrap_or(Value::Null);
        let seq = parts.next().and_then(|s| s.as_u64());
        let Some(seq) = seq else {
            // No state: the node has expired (or never wrote it).
            if let Some((name, n)) = c.replica.write().remove(node) {
                tracing::info!("cluster: node {name}'s state has expired in Redis; its {n} room memberships no longer count");
            }
            self.count_nodes();
            return;
        };
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
            .snapshot(node, name, seq, list, Instant::now());
        self.count_nodes();
    }

    fn expire(&mut self) {
        let c = &self.cluster;
        let gone = c
            .replica
            .write()
            .expire(c.settings.node_timeout, Instant::now());
        for (node, name, n) in gone {
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
