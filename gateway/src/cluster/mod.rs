//! Gateway nodes sharing rooms, broadcasts and sends through Redis
//! (`[cluster]`; without it none of this runs and nothing connects to
//! Redis).
//!
//! What each node keeps and does:
//! - **Connection ids** carry the node's number in their high bits
//!   ([`NODE_SHIFT`]): unique across the cluster without coordination per
//!   connection. The number comes from an `INCR` in Redis at start.
//! - **Its own rooms** stay in its hubs ([`crate::hub`]), as without a
//!   cluster. Every join and leave is also queued ([`Cluster::changed`]) to
//!   the link task ([`link`]), which writes it to the node's hash in Redis
//!   and publishes it, numbered, to every other node.
//! - **The other nodes' rooms** are a replica ([`replica`]) kept current
//!   from those messages and, after any gap, from the hashes in Redis.
//!   `room-size`, `room-members` and `broadcast` read it, so no host call
//!   waits on Redis.
//! - **Deliveries** to connections of other nodes (a `send` or `close` to
//!   their id, a broadcast to rooms with members there) are queued here and
//!   published by the link task to each node's own channel: one message
//!   per node that has members, whatever the number of members.
//!
//! What a plugin can rely on (docs/cluster.md): its own node's
//! connections, rooms and sends behave exactly as without a cluster; what
//! it sees of other nodes is eventually consistent (a join on node B shows
//! in node A's `room-size` once the change has crossed Redis, normally
//! well under a millisecond on one network), and deliveries to other
//! nodes are at most once (lost while Redis is unreachable, counted in
//! `wasmgate_cluster_dropped_total`).

pub mod link;
pub mod replica;
pub mod wire;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use tokio::sync::mpsc;

use crate::config::ClusterSettings;
use crate::hub::Hub;
use crate::metrics::{ClusterMetrics, NodeLabels};
use replica::Replica;
use wire::{Change, Names, RouteName};

/// Connection ids are `node << NODE_SHIFT | n`: 2^40 connections per node
/// start, and node numbers below 2^13, so that every id stays below 2^53
/// (exact in JSON and JavaScript numbers).
pub const NODE_SHIFT: u32 = 40;
/// Node numbers handed out by Redis are below this; a node that could not
/// reach Redis at start picks a random number at or above it (and below
/// twice it).
const ASSIGNED_NODES: u64 = 1 << 12;
/// Changes and deliveries waiting for the link task before more are
/// dropped (and counted).
const QUEUE: usize = 1 << 16;
/// Payload bytes of deliveries waiting for the link task before more are
/// refused (`backpressure` to the plugin, counted as dropped).
pub const MAX_QUEUED_BYTES: usize = 64 << 20;

/// The node number of connection `id` (0 without a cluster).
pub fn node_of(id: u64) -> u32 {
    // The shift leaves at most 24 bits.
    (id >> NODE_SHIFT) as u32
}

/// The node number of the `n`th number Redis handed out: 1 to
/// `ASSIGNED_NODES - 1`, wrapping.
pub(crate) fn node_number(n: u64) -> u32 {
    // Below 2^19: fits.
    ((n.max(1) - 1) % (ASSIGNED_NODES - 1) + 1) as u32
}

/// Why the cluster could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Redis refused this node's credentials at start.
    #[error("{origin}: redis {url:?}: {reason}: check the user and password in the URL")]
    Auth {
        /// Where `[cluster]` is.
        origin: String,
        /// The URL, its password hidden.
        url: String,
        /// What Redis said.
        reason: String,
    },
    /// The `redis` URL was refused by the client.
    #[error("{origin}: redis {url:?}: {reason}")]
    Url {
        /// Where `[cluster]` is.
        origin: String,
        /// The URL.
        url: String,
        /// What the client said.
        reason: String,
    },
}

/// The routes of this node, as the link task needs them: found by name
/// for deliveries, all of them to rewrite this node's state.
pub trait Routes: Send + Sync {
    /// The hub of route `route`, if this node serves it.
    fn hub(&self, route: &RouteName) -> Option<Arc<Hub>>;
    /// The hubs of every route served.
    fn hubs(&self) -> Vec<Arc<Hub>>;
}

/// What the link task publishes.
#[derive(Debug)]
pub enum Outgoing {
    /// A room membership change of this node.
    Change(Change),
    /// An encoded [`wire::Delivery`] for node `node`.
    Deliver {
        /// The receiving node.
        node: u32,
        /// The message.
        message: Bytes,
    },
}

/// This node's membership in a cluster.
pub struct Cluster {
    node: u32,
    name: String,
    settings: ClusterSettings,
    names: Names,
    replica: RwLock<Replica>,
    queue: mpsc::Sender<Outgoing>,
    pending: Mutex<Option<mpsc::Receiver<Outgoing>>>,
    /// A change of this node was lost: the link task rewrites its whole
    /// state in Redis before anything else.
    dirty: AtomicBool,
    routes: OnceLock<Arc<dyn Routes>>,
    client: fred::clients::Client,
    labels: NodeLabels,
    /// Proves in Redis that this node holds its number
    /// (`{node:P}:owner`).
    token: String,
    /// Payload bytes of the deliveries queued.
    queued_bytes: AtomicUsize,
    /// Cancelled at shutdown: the link tasks finish.
    closing: tokio_util::sync::CancellationToken,
    /// The writer task, awaited at shutdown.
    writer: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// This node left the cluster (another node holds its number): it
    /// serves its own connections only, until restarted.
    departed: AtomicBool,
    /// The subscriber listens on the node's channels: until then the node
    /// does not announce itself (nobody may send to it yet).
    listening: AtomicBool,
    /// When the writer last published a heartbeat and a probe (ms since
    /// the Unix epoch; 0: never): the subscriber expects to hear both.
    beat_published_ms: AtomicU64,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.node)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

static GLOBAL: OnceLock<Arc<Cluster>> = OnceLock::new();

impl Cluster {
    /// The process's cluster, once [`Cluster::start`] has run.
    pub fn global() -> Option<&'static Arc<Cluster>> {
        GLOBAL.get()
    }

    /// Joins the cluster: connects to Redis (waiting at most 3 s) and takes
    /// a node number, then installs the cluster for the process. If Redis
    /// cannot be reached the node starts anyway, with a random node number
    /// (logged), and its link keeps trying in the background.
    pub async fn start(settings: &ClusterSettings) -> Result<Arc<Cluster>, ClusterError> {
        let client = link::client(settings)?;
        let names = Names::new(&settings.namespace);
        let name = settings.node_id.clone().unwrap_or_else(default_node_id);
        let token = format!("{name}:{:016x}", random());
        let node = match link::take_node_number(&client, &names, &token, settings).await {
            Ok(n) => n,
            Err(link::Start::Auth(reason)) => {
                return Err(ClusterError::Auth {
                    origin: settings.origin.clone(),
                    url: crate::config::redact_url(&settings.redis),
                    reason,
                })
            }
            Err(link::Start::WrongKind(reason)) => {
                return Err(ClusterError::Url {
                    origin: settings.origin.clone(),
                    url: crate::config::redact_url(&settings.redis),
                    reason,
                })
            }
            Err(link::Start::Unreachable(e)) => {
                let n = (ASSIGNED_NODES | (random() % ASSIGNED_NODES)) as u32;
                tracing::warn!(
                    "{}: Redis at {} is unreachable at start ({e}{}): node {name} takes the \
                     random node number {n} and serves on its own until Redis is back",
                    settings.origin,
                    crate::config::redact_url(&settings.redis),
                    link::kind_hint(&settings.redis, &e)
                );
                n
            }
        };
        let (queue, rx) = mpsc::channel(QUEUE);
        let cluster = Arc::new(Cluster {
            node,
            labels: NodeLabels { node: name.clone() },
            name,
            settings: settings.clone(),
            names,
            replica: RwLock::new(Replica::default()),
            queue,
            pending: Mutex::new(Some(rx)),
            dirty: AtomicBool::new(true),
            routes: OnceLock::new(),
            client,
            token,
            queued_bytes: AtomicUsize::new(0),
            closing: tokio_util::sync::CancellationToken::new(),
            writer: Mutex::new(None),
            departed: AtomicBool::new(false),
            listening: AtomicBool::new(false),
            beat_published_ms: AtomicU64::new(0),
        });
        let m = Self::metrics();
        m.init();
        m.nodes.get_or_create(&cluster.labels).set(0);
        m.redis_up.get_or_create(&cluster.labels).set(0);
        let _ = GLOBAL.set(cluster.clone());
        Ok(GLOBAL.get().cloned().unwrap_or(cluster))
    }

    /// Starts the link tasks, which deliver to `routes`. Call once, after
    /// the routes exist.
    pub fn attach(self: &Arc<Self>, routes: Arc<dyn Routes>) {
        let _ = self.routes.set(routes);
        if let Some(rx) = self.pending.lock().take() {
            *self.writer.lock() = Some(link::spawn(self.clone(), rx));
        }
        tracing::info!(
            "cluster: node {} is node number {} (connection ids from {}), Redis {}, heartbeat {} ms, node_timeout {} ms",
            self.name,
            self.node,
            self.id_base() + 1,
            crate::config::redact_url(&self.settings.redis),
            self.settings.heartbeat.as_millis(),
            self.settings.node_timeout.as_millis()
        );
    }

    /// Leaves the cluster at shutdown: stops the link (publishing what
    /// was queued), removes this node's state from Redis, then tells the
    /// other nodes (waiting at most 2 s in all).
    pub async fn leave(&self) {
        self.closing.cancel();
        let writer = self.writer.lock().take();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            if let Some(w) = writer {
                let _ = w.await;
            }
            link::leave(self).await;
        })
        .await;
    }

    /// Takes this node out of the cluster for good (another node holds its
    /// number): local service goes on, nothing more crosses Redis.
    fn depart(&self, why: &str) {
        if self.departed.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::error!(
            "cluster: node {} leaves the cluster: {why}. It serves its own connections only \
             (rooms, sizes and sends on this node) until it is restarted",
            self.name
        );
        *self.replica.write() = Replica::default();
        Self::metrics().redis_up.get_or_create(&self.labels).set(0);
        Self::metrics().nodes.get_or_create(&self.labels).set(0);
        self.closing.cancel();
    }

    fn metrics() -> &'static ClusterMetrics {
        &crate::metrics::Metrics::global().cluster
    }

    /// The first connection id of this node, minus one.
    pub fn id_base(&self) -> u64 {
        u64::from(self.node) << NODE_SHIFT
    }

    /// This node's number.
    pub fn node(&self) -> u32 {
        self.node
    }

    /// This node's `node_id`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The other live nodes, as (number, `node_id`), by number.
    pub fn nodes(&self) -> Vec<(u32, String)> {
        self.replica.read().nodes()
    }

    /// Whether this node has left the cluster for good (another node holds
    /// its number): it serves its own connections only, until restarted.
    pub fn departed(&self) -> bool {
        self.departed.load(Ordering::Acquire)
    }

    /// Whether the link to Redis works now.
    pub fn redis_up(&self) -> bool {
        Self::metrics().redis_up.get_or_create(&self.labels).get() == 1
    }

    /// Whether node `node` is another node heard from lately.
    pub fn knows_node(&self, node: u32) -> bool {
        node != self.node && self.replica.read().has_node(node)
    }

    /// Queues a membership change of this node (never waits). If the queue
    /// is full the change is dropped, counted, and repaired by a rewrite of
    /// this node's state once the link catches up.
    pub fn changed(&self, join: bool, route: &RouteName, room: &str, conn: u64) {
        if self.departed.load(Ordering::Relaxed) {
            return;
        }
        let change = Change {
            join,
            route: route.clone(),
            room: room.to_owned(),
            conn,
        };
        if self.queue.try_send(Outgoing::Change(change)).is_err() {
            self.dirty.store(true, Ordering::Release);
            ClusterMetrics::count(&Self::metrics().dropped, "membership", 1);
        }
    }

    /// Queues a delivery for node `node` (never waits); false if the queue
    /// is full, in items or in bytes ([`MAX_QUEUED_BYTES`]), counted as
    /// dropped.
    pub fn deliver(&self, node: u32, message: Bytes) -> bool {
        let len = message.len();
        let held = self.queued_bytes.fetch_add(len, Ordering::AcqRel);
        let ok = held + len <= MAX_QUEUED_BYTES
            && self
                .queue
                .try_send(Outgoing::Deliver { node, message })
                .is_ok();
        if !ok {
            self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
            ClusterMetrics::count(&Self::metrics().dropped, "delivery", 1);
        }
        ok
    }

    /// The link task took a delivery of `len` bytes off the queue.
    fn dequeued(&self, len: usize) {
        self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
    }

    /// The other nodes' members of `room` of route `key`, as (node, how
    /// many), without `except`.
    pub fn remote_room(&self, key: &str, room: &str, except: Option<u64>) -> Vec<(u32, usize)> {
        let replica = self.replica.read();
        let Some(nodes) = replica.room(key, room) else {
            return Vec::new();
        };
        nodes
            .iter()
            .map(|(node, members)| {
                let skip = except.is_some_and(|e| members.contains(&e));
                (*node, members.len() - usize::from(skip))
            })
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// How many members `room` of route `key` has on other nodes.
    pub fn remote_room_size(&self, key: &str, room: &str) -> usize {
        self.replica.read().room_size(key, room)
    }

    /// The other nodes' members of `room` of route `key`.
    pub fn remote_members(&self, key: &str, room: &str) -> Vec<u64> {
        self.replica
            .read()
            .room(key, room)
            .map(|nodes| nodes.values().flat_map(|m| m.iter().copied()).collect())
            .unwrap_or_default()
    }
}

/// `<hostname>-<process id>`.
fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".to_owned());
    format!("{host}-{}", std::process::id())
}

/// A random number (std's hasher keys are random per process).
fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_numbers_fit_the_id_layout() {
        const { assert!((ASSIGNED_NODES * 2) << NODE_SHIFT <= 1 << 53) };
        assert_eq!(node_of(7 << NODE_SHIFT | 12345), 7);
        assert_eq!(node_of(12345), 0);
    }
}
