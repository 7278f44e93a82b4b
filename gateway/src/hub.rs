//! A route's shared state: its open connections, its rooms and each
//! connection's metadata. Every lookup a plugin makes goes through its own
//! route's hub, which is what scopes ids and room names to the route.
//!
//! In a cluster ([`crate::cluster`]) the hub holds this node's connections
//! and their rooms, reports every join and leave to the cluster, and adds
//! the other nodes' members (from the cluster's replica) to room sizes,
//! member lists and broadcasts; sends and closes to another node's
//! connection are queued to it. Metadata, timers and `rooms-of` stay
//! node-local.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use tokio::sync::Notify;

use crate::bindings::wasmgate::plugin::types::GatewayError;
use crate::cluster::wire::{self, Delivery, RouteName, Target};
use crate::cluster::Cluster;
use crate::config::SlowConsumer;
use crate::connection::outbox::{Outbound, Outbox, PushError};
use crate::quota::Bucket;

/// Longest room name, in bytes.
pub const MAX_ROOM_NAME: usize = 256;
/// Longest metadata key, in bytes.
pub const MAX_META_KEY: usize = 256;
/// Longest metadata value, in bytes.
pub const MAX_META_VALUE: usize = 64 << 10;

/// Who started a connection's closing handshake, for the log line written
/// when it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClosedBy {
    /// The peer sent the first close frame.
    Peer,
    /// The route's plugin called `close`.
    Plugin,
    /// The gateway: a protocol error, a limit, a failed plugin, shutdown.
    Gateway,
    /// Nobody: the TCP connection ended without a closing handshake (1006).
    Abnormal,
}

impl ClosedBy {
    /// The name used in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ClosedBy::Peer => "peer",
            ClosedBy::Plugin => "plugin",
            ClosedBy::Gateway => "gateway",
            ClosedBy::Abnormal => "abnormal",
        }
    }
}

/// A request to start the closing handshake: code, reason, and who asked.
pub type CloseRequest = (u16, String, ClosedBy);

/// The shared view of one open connection.
#[derive(Debug)]
pub struct ConnHandle {
    /// The connection's id.
    pub id: u64,
    /// Its outbound queue.
    pub outbox: Arc<Outbox>,
    slow_consumer: SlowConsumer,
    metadata: Mutex<HashMap<String, String>>,
    rooms: Mutex<HashSet<Arc<str>>>,
    close_request: Mutex<Option<CloseRequest>>,
    close_requested: AtomicBool,
    /// Wakes the connection's session when a close is requested.
    pub close_notify: Notify,
    /// Timer events waiting for the session (a timer id, with
    /// [`TIMER_REPEAT_FLAG`] for a repeating one).
    timer_events: Mutex<VecDeque<u64>>,
    /// Wakes the connection's session when a timer fires.
    pub timer_notify: Notify,
    /// The connection's timers: host-side state, like its metadata, that
    /// outlives any one instance (migration, hibernation, a shared
    /// instance serving many connections).
    timers: Mutex<Timers>,
    /// Its host-call rate meters, kept like its timers.
    pub rates: Mutex<ConnRates>,
    /// Bytes of metadata (keys and values) it holds.
    metadata_bytes: std::sync::atomic::AtomicUsize,
    /// Set (under `rooms`' lock) when it leaves the hub: a `join` racing
    /// the removal must not put it back in a room.
    gone: AtomicBool,
}

/// One connection's host-call rate meters: each bucket is created full at
/// its first use.
#[derive(Debug, Default)]
pub struct ConnRates {
    /// `send` calls.
    pub sends: Option<Bucket>,
    /// Broadcast deliveries.
    pub deliveries: Option<Bucket>,
    /// `set-timer` calls.
    pub timers: Option<Bucket>,
    /// Log lines.
    pub log_lines: Option<Bucket>,
    /// Log lines dropped and not yet reported.
    pub log_dropped: u64,
    /// Whether dropping log lines was announced (once per connection).
    pub log_warned: bool,
    /// When the count of dropped lines was last reported.
    pub log_reported: Option<std::time::Instant>,
}

/// Takes `n` tokens from `bucket` (created full at `rate`) if `rate` is
/// set; true if allowed.
pub fn take(bucket: &mut Option<Bucket>, rate: Option<u32>, n: u64) -> bool {
    match rate {
        None => true,
        Some(rate) => {
            let rate = u64::from(rate);
            bucket
                .get_or_insert_with(|| Bucket::new(rate))
                .take(n, rate, std::time::Instant::now())
        }
    }
}

/// A connection's pending timers, by id (ids count up per connection).
#[derive(Debug, Default)]
struct Timers {
    pending: HashMap<u64, tokio::task::AbortHandle>,
    next: u64,
}

/// Set in a timer event's id when the timer repeats.
pub const TIMER_REPEAT_FLAG: u64 = 1 << 63;
/// Repeating-timer events queued for a connection before ticks are skipped
/// (the plugin is behind).
const MAX_QUEUED_TICKS: usize = 64;

impl ConnHandle {
    /// A handle for a new connection.
    pub fn new(id: u64, outbox: Arc<Outbox>, slow_consumer: SlowConsumer) -> Arc<Self> {
        Arc::new(ConnHandle {
            id,
            outbox,
            slow_consumer,
            metadata: Mutex::new(HashMap::new()),
            rooms: Mutex::new(HashSet::new()),
            close_request: Mutex::new(None),
            close_requested: AtomicBool::new(false),
            close_notify: Notify::new(),
            timer_events: Mutex::new(VecDeque::new()),
            timer_notify: Notify::new(),
            timers: Mutex::new(Timers::default()),
            rates: Mutex::new(ConnRates::default()),
            metadata_bytes: std::sync::atomic::AtomicUsize::new(0),
            gone: AtomicBool::new(false),
        })
    }

    /// Queues a message, applying the slow-consumer policy when the
    /// outbound buffer is full.
    pub fn deliver(&self, frame: Outbound) -> Result<(), GatewayError> {
        // Once a close is requested nothing more is sent: the close frame
        // is the last the peer gets (RFC 6455 section 5.5.1).
        if self.close_requested.load(Ordering::Acquire) {
            return Err(GatewayError::Closed);
        }
        match self.outbox.push_data(frame) {
            Ok(()) => Ok(()),
            Err(PushError::Closed) => Err(GatewayError::Closed),
            Err(PushError::Full) => {
                if self.slow_consumer == SlowConsumer::Close {
                    self.request_close(
                        1008,
                        "slow consumer: outbound buffer full",
                        ClosedBy::Gateway,
                    );
                }
                Err(GatewayError::Backpressure)
            }
        }
    }

    /// Asks the connection's session to start the closing handshake with
    /// `code` and `reason`, on behalf of `by`. The first request wins.
    pub fn request_close(&self, code: u16, reason: &str, by: ClosedBy) {
        if self.close_requested.swap(true, Ordering::AcqRel) {
            return;
        }
        *self.close_request.lock() = Some((code, reason.to_owned(), by));
        self.close_notify.notify_one();
    }

    /// Queues a timer event for the session. A repeating timer's tick is
    /// skipped when [`MAX_QUEUED_TICKS`] events wait already; a one-shot
    /// event is always queued (a connection holds at most 64 timers).
    pub fn timer_fired(&self, event: u64) {
        {
            let mut q = self.timer_events.lock();
            if event & TIMER_REPEAT_FLAG != 0 && q.len() >= MAX_QUEUED_TICKS {
                return;
            }
            q.push_back(event);
        }
        self.timer_notify.notify_one();
    }

    /// Starts a timer: an event after `delay` (then every `delay` if
    /// `repeat`) until cancelled or [`ConnHandle::cancel_timers`]. Fails with
    /// `limit-reached` once it holds `max` (the route's `max_timers`).
    /// Needs a tokio runtime.
    pub fn set_timer(
        self: &Arc<Self>,
        delay: Duration,
        repeat: bool,
        max: usize,
    ) -> Result<u64, GatewayError> {
        let mut timers = self.timers.lock();
        if timers.pending.len() >= max {
            return Err(GatewayError::LimitReached);
        }
        timers.next += 1;
        let id = timers.next;
        // The task holds the connection weakly: a timer never keeps a
        // closed connection alive.
        let conn = Arc::downgrade(self);
        let task = tokio::spawn(async move {
            if repeat {
                let mut every =
                    tokio::time::interval_at(tokio::time::Instant::now() + delay, delay);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    every.tick().await;
                    if !fire(&conn, id | TIMER_REPEAT_FLAG) {
                        break;
                    }
                }
            } else {
                tokio::time::sleep(delay).await;
                fire(&conn, id);
            }
        });
        timers.pending.insert(id, task.abort_handle());
        Ok(id)
    }

    /// Cancels timer `id`; whether it was still pending.
    pub fn cancel_timer(&self, id: u64) -> bool {
        match self.timers.lock().pending.remove(&id) {
            Some(t) => {
                t.abort();
                true
            }
            None => false,
        }
    }

    /// Whether a fired timer's event is still to be delivered: a one-shot
    /// timer is forgotten here; false if it was cancelled after it fired.
    pub fn timer_live(&self, id: u64, repeating: bool) -> bool {
        let mut timers = self.timers.lock();
        if repeating {
            timers.pending.contains_key(&id)
        } else {
            timers.pending.remove(&id).is_some()
        }
    }

    /// Cancels every timer (the connection is closing, or its plugin
    /// trapped).
    pub fn cancel_timers(&self) {
        for (_, t) in self.timers.lock().pending.drain() {
            t.abort();
        }
    }

    /// The next timer event waiting, if any.
    pub fn next_timer_event(&self) -> Option<u64> {
        self.timer_events.lock().pop_front()
    }

    /// Whether a fired timer's event is queued.
    pub fn has_timer_event(&self) -> bool {
        !self.timer_events.lock().is_empty()
    }

    /// Whether a close was requested (it may not be handled yet).
    pub fn close_pending(&self) -> bool {
        self.close_requested.load(Ordering::Acquire)
    }

    /// Takes the pending close request, if any.
    pub fn take_close_request(&self) -> Option<CloseRequest> {
        self.close_request.lock().take()
    }
}

/// Queues a timer event on the connection if it is still alive; false if
/// it is gone.
fn fire(conn: &Weak<ConnHandle>, event: u64) -> bool {
    match conn.upgrade() {
        Some(c) => {
            c.timer_fired(event);
            true
        }
        None => false,
    }
}

/// A room's members by id.
type Members = HashMap<u64, Arc<ConnHandle>>;

/// A route's connections and rooms.
#[derive(Debug, Default)]
pub struct Hub {
    conns: RwLock<HashMap<u64, Arc<ConnHandle>>>,
    rooms: Mutex<HashMap<Arc<str>, Members>>,
    /// The route's name (`None` for a hub made without one, in tests).
    name: Option<RouteName>,
    /// Set once the process has joined its cluster (at start, after the
    /// hubs of the first config exist; at creation for later hubs).
    cluster: OnceLock<ClusterLink>,
}

/// A hub's place in the cluster: the route's name there.
#[derive(Debug)]
struct ClusterLink {
    cluster: Arc<Cluster>,
    route: RouteName,
    /// The replica's key of the route.
    key: String,
}

impl Hub {
    /// The hub of route `path` of `tenant` (`None`: the default tenant),
    /// linked to the process's cluster if there is one.
    pub fn for_route(tenant: Option<&str>, path: &str) -> Hub {
        let hub = Hub {
            name: Some(RouteName {
                tenant: tenant.map(str::to_owned),
                path: path.to_owned(),
            }),
            ..Hub::default()
        };
        if let Some(c) = Cluster::global() {
            hub.link_cluster(c);
        }
        hub
    }

    /// Links the hub to `cluster` (once; before its first connection, so
    /// that no membership is missed).
    pub fn link_cluster(&self, cluster: &Arc<Cluster>) {
        if let Some(route) = &self.name {
            let _ = self.cluster.set(ClusterLink {
                cluster: cluster.clone(),
                key: route.key(),
                route: route.clone(),
            });
        }
    }

    /// The route's name in the cluster (`None` without one).
    pub fn route_name(&self) -> Option<&RouteName> {
        self.cluster.get().map(|l| &l.route)
    }

    /// Every (room, connection) membership of this node's connections.
    pub fn memberships(&self) -> Vec<(String, u64)> {
        let rooms = self.rooms.lock();
        rooms
            .iter()
            .flat_map(|(room, members)| members.keys().map(move |id| (room.to_string(), *id)))
            .collect()
    }

    /// Registers a connection (before its `on-open` runs).
    pub fn insert(&self, conn: Arc<ConnHandle>) {
        self.conns.write().insert(conn.id, conn);
    }

    /// Unregisters a connection and takes it out of all its rooms.
    pub fn remove(&self, id: u64) {
        let Some(conn) = self.conns.write().remove(&id) else {
            return;
        };
        let rooms = {
            let mut mine = conn.rooms.lock();
            conn.gone.store(true, Ordering::Release);
            std::mem::take(&mut *mine)
        };
        // Each leave is queued for the cluster under the rooms' lock, with
        // the change it reports: a rewrite of this node's state (which
        // reads the rooms under that lock) sees both or neither.
        let mut all = self.rooms.lock();
        for room in rooms {
            if let Some(l) = self.cluster.get() {
                l.cluster.changed(false, &l.route, &room, id);
            }
            if let Some(members) = all.get_mut(&room) {
                members.remove(&id);
                if members.is_empty() {
                    all.remove(&room);
                }
            }
        }
    }

    /// The connection with this id, if it is on this route.
    pub fn get(&self, id: u64) -> Result<Arc<ConnHandle>, GatewayError> {
        self.conns
            .read()
            .get(&id)
            .cloned()
            .ok_or(GatewayError::UnknownConnection)
    }

    /// Every connection on the route.
    pub fn all(&self) -> Vec<Arc<ConnHandle>> {
        self.conns.read().values().cloned().collect()
    }

    /// How many connections are registered.
    pub fn len(&self) -> usize {
        self.conns.read().len()
    }

    /// Whether no connection is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds a connection to a room: `limit-reached` if it is in
    /// `max_rooms` rooms already or the room has `max_members`.
    pub fn join(
        &self,
        id: u64,
        room: &str,
        max_rooms: usize,
        max_members: usize,
    ) -> Result<(), GatewayError> {
        check_room(room)?;
        let conn = self.get(id)?;
        let mut mine = conn.rooms.lock();
        if conn.gone.load(Ordering::Acquire) {
            return Err(GatewayError::UnknownConnection);
        }
        if mine.contains(room) {
            return Ok(());
        }
        if mine.len() >= max_rooms {
            return Err(GatewayError::LimitReached);
        }
        let mut all = self.rooms.lock();
        let name: Arc<str> = match all.get_key_value(room) {
            Some((name, members)) if members.len() >= max_members => {
                let _ = name;
                return Err(GatewayError::LimitReached);
            }
            Some((name, _)) => name.clone(),
            None => Arc::from(room),
        };
        if let Some(l) = self.cluster.get() {
            // Queued under both locks, with the change itself: the cluster
            // sees a connection's joins and leaves in the order they
            // happened, and a rewrite sees the change and its report
            // together.
            l.cluster.changed(true, &l.route, &name, id);
        }
        mine.insert(name.clone());
        all.entry(name).or_default().insert(id, conn.clone());
        Ok(())
    }

    /// Removes a connection from a room; returns whether it was a member.
    pub fn leave(&self, id: u64, room: &str) -> Result<bool, GatewayError> {
        let conn = self.get(id)?;
        let mut mine = conn.rooms.lock();
        if !mine.remove(room) {
            return Ok(false);
        }
        // As in `join`: both locks held while the change is made and
        // queued for the cluster.
        let mut all = self.rooms.lock();
        if let Some(l) = self.cluster.get() {
            l.cluster.changed(false, &l.route, room, id);
        }
        if let Some(members) = all.get_mut(room) {
            members.remove(&id);
            if members.is_empty() {
                all.remove(room);
            }
        }
        Ok(true)
    }

    /// Queues a message to every member of `room` except `except`; returns
    /// how many accepted it. `admit` is asked first with the number of
    /// deliveries (the members but `except`, on every node of a cluster);
    /// if it says no, nothing is sent and the call fails with
    /// `limit-reached`. Members on other nodes count as accepted once the
    /// message is queued to their node.
    pub fn broadcast(
        &self,
        room: &str,
        text: bool,
        payload: Bytes,
        except: Option<u64>,
        admit: impl FnOnce(u64) -> bool,
    ) -> Result<u32, GatewayError> {
        check_room(room)?;
        let members: Vec<Arc<ConnHandle>> = match self.rooms.lock().get(room) {
            Some(m) => m
                .values()
                .filter(|c| Some(c.id) != except)
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        let remote = match self.cluster.get() {
            Some(l) => l.cluster.remote_room(&l.key, room, except),
            None => Vec::new(),
        };
        let remote_count: usize = remote.iter().map(|(_, n)| n).sum();
        if members.is_empty() && remote.is_empty() {
            return Ok(0);
        }
        if !admit((members.len() + remote_count) as u64) {
            return Err(GatewayError::LimitReached);
        }
        let mut delivered = 0u32;
        if let (Some(l), false) = (self.cluster.get(), remote.is_empty()) {
            let message = wire::encode_delivery(
                l.cluster.node(),
                Delivery::Message {
                    route: l.route.clone(),
                    target: Target::Room {
                        room: room.to_owned(),
                        except,
                    },
                    text,
                    payload: payload.to_vec(),
                },
            );
            for (node, n) in remote {
                if l.cluster.deliver(node, message.clone()) {
                    delivered = delivered.saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
                }
            }
        }
        Ok(delivered.saturating_add(deliver_all(members, text, &payload)))
    }

    /// Queues a message to this node's members of `room` but `except`
    /// (a broadcast from another node, already admitted there); returns
    /// how many accepted it.
    pub fn broadcast_local(
        &self,
        room: &str,
        text: bool,
        payload: Bytes,
        except: Option<u64>,
    ) -> u32 {
        let members: Vec<Arc<ConnHandle>> = match self.rooms.lock().get(room) {
            Some(m) => m
                .values()
                .filter(|c| Some(c.id) != except)
                .cloned()
                .collect(),
            None => return 0,
        };
        deliver_all(members, text, &payload)
    }

    /// Queues `frame` for connection `id` on another node of the cluster:
    /// `unknown-connection` if there is no cluster or its node is not a
    /// live one, `backpressure` if the queue to Redis is full. Whether the
    /// connection still exists there is not known here: a message to one
    /// that has closed is dropped by its node.
    pub fn send_remote(&self, id: u64, frame: Outbound) -> Result<(), GatewayError> {
        let l = self.remote(id)?;
        let (text, payload) = match frame {
            Outbound::Text(b) => (true, b),
            Outbound::Binary(b) => (false, b),
            _ => return Err(GatewayError::InvalidArgument("not a data message".into())),
        };
        let message = wire::encode_delivery(
            l.cluster.node(),
            Delivery::Message {
                route: l.route.clone(),
                target: Target::Conn(id),
                text,
                payload: payload.to_vec(),
            },
        );
        if l.cluster.deliver(crate::cluster::node_of(id), message) {
            Ok(())
        } else {
            Err(GatewayError::Backpressure)
        }
    }

    /// Asks the node of connection `id` to start its closing handshake
    /// (see [`Hub::send_remote`] for the errors).
    pub fn close_remote(&self, id: u64, code: u16, reason: &str) -> Result<(), GatewayError> {
        let l = self.remote(id)?;
        let message = wire::encode_delivery(
            l.cluster.node(),
            Delivery::Close {
                route: l.route.clone(),
                conn: id,
                code,
                reason: reason.to_owned(),
            },
        );
        if l.cluster.deliver(crate::cluster::node_of(id), message) {
            Ok(())
        } else {
            Err(GatewayError::Backpressure)
        }
    }

    /// The cluster link, if `id` belongs to another live node.
    fn remote(&self, id: u64) -> Result<&ClusterLink, GatewayError> {
        match self.cluster.get() {
            Some(l) if l.cluster.knows_node(crate::cluster::node_of(id)) => Ok(l),
            _ => Err(GatewayError::UnknownConnection),
        }
    }

    /// How many connections are in a room (on every node of a cluster).
    pub fn room_size(&self, room: &str) -> u32 {
        let local = self.rooms.lock().get(room).map_or(0, HashMap::len);
        let remote = match self.cluster.get() {
            Some(l) => l.cluster.remote_room_size(&l.key, room),
            None => 0,
        };
        u32::try_from(local + remote).unwrap_or(u32::MAX)
    }

    /// The ids of a room's members (on every node of a cluster).
    pub fn room_members(&self, room: &str) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .rooms
            .lock()
            .get(room)
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default();
        if let Some(l) = self.cluster.get() {
            ids.extend(l.cluster.remote_members(&l.key, room));
        }
        ids
    }

    /// The rooms a connection is in.
    pub fn rooms_of(&self, id: u64) -> Result<Vec<String>, GatewayError> {
        let conn = self.get(id)?;
        let rooms = conn.rooms.lock();
        Ok(rooms.iter().map(|r| r.to_string()).collect())
    }

    /// Sets a metadata entry: `too-large` past the key or value size,
    /// `limit-reached` past `max_entries` entries or `max_bytes` bytes (keys
    /// and values) on the connection.
    pub fn metadata_set(
        &self,
        id: u64,
        key: &str,
        value: &str,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<(), GatewayError> {
        if key.len() > MAX_META_KEY || value.len() > MAX_META_VALUE {
            return Err(GatewayError::TooLarge);
        }
        let conn = self.get(id)?;
        let mut meta = conn.metadata.lock();
        let old = meta.get(key).map(|v| key.len() + v.len());
        if old.is_none() && meta.len() >= max_entries {
            return Err(GatewayError::LimitReached);
        }
        let held = conn.metadata_bytes.load(Ordering::Relaxed) - old.unwrap_or(0);
        let new = held + key.len() + value.len();
        if new > max_bytes {
            return Err(GatewayError::LimitReached);
        }
        conn.metadata_bytes.store(new, Ordering::Relaxed);
        meta.insert(key.to_owned(), value.to_owned());
        Ok(())
    }

    /// Reads a metadata entry.
    pub fn metadata_get(&self, id: u64, key: &str) -> Result<Option<String>, GatewayError> {
        Ok(self.get(id)?.metadata.lock().get(key).cloned())
    }

    /// Removes a metadata entry.
    pub fn metadata_remove(&self, id: u64, key: &str) -> Result<Option<String>, GatewayError> {
        let conn = self.get(id)?;
        let mut meta = conn.metadata.lock();
        let removed = meta.remove(key);
        if let Some(v) = &removed {
            conn.metadata_bytes
                .fetch_sub(key.len() + v.len(), Ordering::Relaxed);
        }
        Ok(removed)
    }
}

/// Queues `payload` to each of `members`; how many accepted it.
fn deliver_all(members: Vec<Arc<ConnHandle>>, text: bool, payload: &Bytes) -> u32 {
    let mut delivered = 0u32;
    for conn in members {
        let frame = if text {
            Outbound::Text(payload.clone())
        } else {
            Outbound::Binary(payload.clone())
        };
        if conn.deliver(frame).is_ok() {
            delivered += 1;
        }
    }
    delivered
}

fn check_room(room: &str) -> Result<(), GatewayError> {
    if room.is_empty() {
        return Err(GatewayError::InvalidArgument("room name is empty".into()));
    }
    if room.len() > MAX_ROOM_NAME {
        return Err(GatewayError::TooLarge);
    }
    Ok(())
}
