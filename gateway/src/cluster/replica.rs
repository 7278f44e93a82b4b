//! This node's copy of the other nodes' room memberships: what `room-size`,
//! `room-members` and `broadcast` read, without waiting on Redis.
//!
//! Each node numbers its membership changes 1, 2, 3, ... and publishes
//! them in order; the replica applies a node's changes only in sequence.
//! When it sees a gap (a lost message, a reconnect, a node it has not met)
//! it asks for that node's snapshot from Redis ([`Apply::Resync`]), which
//! carries the number of the last change it holds; later changes apply on
//! top of it. A node not heard from within `node_timeout` is dropped
//! ([`Replica::expire`]).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use super::wire::{Change, RouteName};

/// One other node as the replica knows it.
#[derive(Debug)]
struct Node {
    /// Its `node_id`.
    name: String,
    /// The number of its last change applied.
    seq: u64,
    /// When it was last heard from.
    heard: Instant,
    /// How far ahead this node's clock is of its (ms), as its last
    /// heartbeat showed (transit included).
    offset_ms: i64,
}

/// Rooms of one route: room → node → members on that node.
type Rooms = HashMap<String, HashMap<u32, HashSet<u64>>>;

/// The other nodes' memberships.
#[derive(Debug, Default)]
pub struct Replica {
    nodes: HashMap<u32, Node>,
    /// Route key ([`super::wire::route_key`]) → its rooms.
    routes: HashMap<String, Rooms>,
    /// Node → route key → the rooms where it has members: forgetting a
    /// node (a snapshot, an expiry) touches its own rooms only, not every
    /// room of the cluster, so the lock is held for a time that grows with
    /// that node's memberships.
    rooms_of: HashMap<u32, HashMap<String, HashSet<String>>>,
}

/// What applying a message needs next.
#[derive(Debug, PartialEq, Eq)]
pub enum Apply {
    /// Applied (or already known).
    Done,
    /// The node's changes have a gap, or the node is new: read its
    /// snapshot from Redis.
    Resync,
}

impl Replica {
    /// Applies changes `first..` of `node`.
    pub fn changes(&mut self, node: u32, first: u64, changes: &[Change], now: Instant) -> Apply {
        let Some(n) = self.nodes.get_mut(&node) else {
            return Apply::Resync;
        };
        n.heard = now;
        let seq = n.seq;
        // `first` comes from another node: no arithmetic on it may wrap.
        let Some(last) = (changes.len() as u64)
            .checked_sub(1)
            .and_then(|k| first.checked_add(k))
        else {
            return Apply::Done;
        };
        if last <= seq {
            return Apply::Done;
        }
        if first > seq + 1 {
            return Apply::Resync;
        }
        n.seq = last;
        let skip = usize::try_from((seq + 1).saturating_sub(first)).unwrap_or(usize::MAX);
        for c in changes.iter().skip(skip) {
            self.apply(node, c);
        }
        Apply::Done
    }

    fn apply(&mut self, node: u32, c: &Change) {
        let key = c.route.key();
        if c.join {
            let members = self
                .routes
                .entry(key.clone())
                .or_default()
                .entry(c.room.clone())
                .or_default()
                .entry(node)
                .or_default();
            if members.is_empty() {
                self.rooms_of
                    .entry(node)
                    .or_default()
                    .entry(key)
                    .or_default()
                    .insert(c.room.clone());
            }
            members.insert(c.conn);
            return;
        }
        let Some(rooms) = self.routes.get_mut(&key) else {
            return;
        };
        let Some(nodes) = rooms.get_mut(&c.room) else {
            return;
        };
        if let Some(members) = nodes.get_mut(&node) {
            members.remove(&c.conn);
            if members.is_empty() {
                nodes.remove(&node);
                unindex(&mut self.rooms_of, node, &key, &c.room);
            }
        }
        if nodes.is_empty() {
            rooms.remove(&c.room);
        }
        if rooms.is_empty() {
            self.routes.remove(&key);
        }
    }

    /// A heartbeat of `node` (named `name`) whose last change is `seq`,
    /// sent at `sent_ms` by its clock and received at `now_ms` by ours.
    pub fn heartbeat(
        &mut self,
        node: u32,
        name: &str,
        seq: u64,
        (sent_ms, now_ms): (u64, u64),
        now: Instant,
    ) -> Apply {
        match self.nodes.get_mut(&node) {
            Some(n) => {
                n.heard = now;
                n.offset_ms = clock_offset(sent_ms, now_ms);
                if n.name != name {
                    n.name = name.to_owned();
                }
                if seq > n.seq {
                    Apply::Resync
                } else {
                    Apply::Done
                }
            }
            None => Apply::Resync,
        }
    }

    /// Replaces what is known of `node` by its snapshot: its memberships
    /// as of its change `seq`.
    pub fn snapshot(
        &mut self,
        node: u32,
        name: Option<&str>,
        seq: u64,
        members: Vec<(RouteName, String, u64)>,
        now: Instant,
    ) {
        self.forget_members(node);
        let name = name
            .map(str::to_owned)
            .or_else(|| self.nodes.get(&node).map(|n| n.name.clone()))
            .unwrap_or_else(|| node.to_string());
        let offset_ms = self.nodes.get(&node).map_or(0, |n| n.offset_ms);
        self.nodes.insert(
            node,
            Node {
                name,
                seq,
                heard: now,
                offset_ms,
            },
        );
        for (route, room, conn) in members {
            self.apply(
                node,
                &Change {
                    join: true,
                    route,
                    room,
                    conn,
                },
            );
        }
    }

    /// Forgets `node` entirely (it said goodbye, or timed out); returns its
    /// name and how many memberships it had, if it was known.
    pub fn remove(&mut self, node: u32) -> Option<(String, usize)> {
        let n = self.nodes.remove(&node)?;
        Some((n.name, self.forget_members(node)))
    }

    fn forget_members(&mut self, node: u32) -> usize {
        let mut count = 0;
        let Some(index) = self.rooms_of.remove(&node) else {
            return 0;
        };
        for (key, names) in index {
            let Some(rooms) = self.routes.get_mut(&key) else {
                continue;
            };
            for name in names {
                if let Some(nodes) = rooms.get_mut(&name) {
                    if let Some(m) = nodes.remove(&node) {
                        count += m.len();
                    }
                    if nodes.is_empty() {
                        rooms.remove(&name);
                    }
                }
            }
            if rooms.is_empty() {
                self.routes.remove(&key);
            }
        }
        count
    }

    /// Drops the nodes not heard from within `timeout`; returns their
    /// numbers, names and membership counts.
    pub fn expire(&mut self, timeout: Duration, now: Instant) -> Vec<(u32, String, usize)> {
        let gone: Vec<u32> = self
            .nodes
            .iter()
            .filter(|(_, n)| now.saturating_duration_since(n.heard) > timeout)
            .map(|(k, _)| *k)
            .collect();
        gone.into_iter()
            .filter_map(|k| self.remove(k).map(|(name, c)| (k, name, c)))
            .collect()
    }

    /// Counts every known node as heard from at `now` (this node's own
    /// deafness, not theirs, kept them silent).
    pub fn heard_all(&mut self, now: Instant) {
        for n in self.nodes.values_mut() {
            n.heard = now;
        }
    }

    /// How long ago (ms) node `node` sent what it stamped `sent_ms`, by
    /// its clock as far as its heartbeats tell (unknown nodes: as if the
    /// clocks agreed).
    pub fn age_ms(&self, node: u32, sent_ms: u64, now_ms: u64) -> u64 {
        let offset = self.nodes.get(&node).map_or(0, |n| n.offset_ms);
        let age = i128::from(now_ms) - i128::from(sent_ms) + i128::from(offset);
        u64::try_from(age.max(0)).unwrap_or(u64::MAX)
    }

    /// Whether `node` is known and alive.
    pub fn has_node(&self, node: u32) -> bool {
        self.nodes.contains_key(&node)
    }

    /// The nodes known, as (number, name), by number.
    pub fn nodes(&self) -> Vec<(u32, String)> {
        let mut v: Vec<(u32, String)> = self
            .nodes
            .iter()
            .map(|(k, n)| (*k, n.name.clone()))
            .collect();
        v.sort_unstable();
        v
    }

    /// How many other nodes are known.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// The other nodes' members of `room` on route `key`, by node.
    pub fn room(&self, key: &str, room: &str) -> Option<&HashMap<u32, HashSet<u64>>> {
        self.routes.get(key)?.get(room)
    }

    /// How many members `room` of route `key` has on other nodes.
    pub fn room_size(&self, key: &str, room: &str) -> usize {
        self.room(key, room)
            .map_or(0, |nodes| nodes.values().map(HashSet::len).sum())
    }
}

/// Removes `room` of route `key` from `node`'s rooms (it has no member
/// there any more).
fn unindex(
    rooms_of: &mut HashMap<u32, HashMap<String, HashSet<String>>>,
    node: u32,
    key: &str,
    room: &str,
) {
    if let Some(routes) = rooms_of.get_mut(&node) {
        if let Some(rooms) = routes.get_mut(key) {
            rooms.remove(room);
            if rooms.is_empty() {
                routes.remove(key);
            }
        }
        if routes.is_empty() {
            rooms_of.remove(&node);
        }
    }
}

/// `sent_ms` by the sender's clock arrived at `now_ms` by ours: the
/// sender's clock is this far ahead (ms), transit included.
fn clock_offset(sent_ms: u64, now_ms: u64) -> i64 {
    let d = i128::from(sent_ms) - i128::from(now_ms);
    i64::try_from(d).unwrap_or(if d < 0 { i64::MIN } else { i64::MAX })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(join: bool, room: &str, conn: u64) -> Change {
        Change {
            join,
            route: RouteName {
                tenant: None,
                path: "/chat".into(),
            },
            room: room.into(),
            conn,
        }
    }

    const KEY: &str = "0:/chat";

    #[test]
    fn changes_of_an_unknown_node_ask_for_its_snapshot() {
        let mut r = Replica::default();
        let now = Instant::now();
        assert_eq!(r.changes(2, 1, &[change(true, "a", 1)], now), Apply::Resync);
        r.snapshot(2, Some("b"), 0, Vec::new(), now);
        assert_eq!(r.changes(2, 1, &[change(true, "a", 1)], now), Apply::Done);
        assert_eq!(r.room_size(KEY, "a"), 1);
    }

    #[test]
    fn changes_apply_in_sequence_and_a_gap_asks_for_a_resync() {
        let mut r = Replica::default();
        let now = Instant::now();
        r.snapshot(2, Some("b"), 5, Vec::new(), now);
        // Already covered by the snapshot: ignored.
        assert_eq!(
            r.changes(2, 4, &[change(true, "a", 1), change(true, "a", 2)], now),
            Apply::Done
        );
        assert_eq!(r.room_size(KEY, "a"), 0);
        // Overlapping: only change 6 applies.
        assert_eq!(
            r.changes(2, 5, &[change(true, "a", 1), change(true, "a", 3)], now),
            Apply::Done
        );
        assert_eq!(r.room_size(KEY, "a"), 1);
        // A gap (7 is missing).
        assert_eq!(r.changes(2, 8, &[change(true, "a", 4)], now), Apply::Resync);
        assert_eq!(r.heartbeat(2, "b", 9, (0, 0), now), Apply::Resync);
        assert_eq!(r.heartbeat(2, "b", 6, (0, 0), now), Apply::Done);
        r.changes(2, 7, &[change(false, "a", 3)], now);
        assert_eq!(r.room_size(KEY, "a"), 0);
        assert!(r.room(KEY, "a").is_none(), "empty rooms are dropped");
    }

    #[test]
    fn delivery_ages_allow_for_the_senders_clock() {
        let mut r = Replica::default();
        let now = Instant::now();
        r.snapshot(2, Some("b"), 0, Vec::new(), now);
        // Node 2's clock is 10 s behind ours.
        r.heartbeat(2, "b", 0, (90_000, 100_000), now);
        assert_eq!(r.age_ms(2, 90_500, 100_700), 200);
        // An unknown node: the clocks are taken to agree.
        assert_eq!(r.age_ms(9, 100_000, 100_300), 300);
        assert_eq!(r.age_ms(9, 200_000, 100_300), 0);
    }

    #[test]
    fn foreign_sequence_numbers_cannot_overflow() {
        let mut r = Replica::default();
        let now = Instant::now();
        r.snapshot(2, Some("b"), 5, Vec::new(), now);
        assert_eq!(r.changes(2, 0, &[], now), Apply::Done);
        assert_eq!(
            r.changes(
                2,
                u64::MAX,
                &[change(true, "a", 1), change(true, "a", 2)],
                now
            ),
            Apply::Done
        );
        assert_eq!(r.changes(2, 0, &[change(true, "a", 1)], now), Apply::Done);
        assert_eq!(r.room_size(KEY, "a"), 0);
    }

    #[test]
    fn a_silent_node_expires_with_its_members() {
        let mut r = Replica::default();
        let t0 = Instant::now();
        let route = RouteName {
            tenant: None,
            path: "/chat".into(),
        };
        r.snapshot(2, Some("b"), 1, vec![(route.clone(), "a".into(), 1)], t0);
        r.snapshot(3, Some("c"), 1, vec![(route, "a".into(), 2)], t0);
        assert_eq!(r.room_size(KEY, "a"), 2);
        let later = t0 + Duration::from_secs(4);
        r.heartbeat(3, "c", 1, (0, 0), later);
        let gone = r.expire(Duration::from_secs(3), later);
        assert_eq!(gone, vec![(2, "b".to_owned(), 1)]);
        assert_eq!(r.room_size(KEY, "a"), 1);
        assert!(!r.has_node(2) && r.has_node(3));
    }

    #[test]
    fn a_snapshot_replaces_only_that_nodes_members_and_leaves_no_empty_rooms() {
        let mut r = Replica::default();
        let now = Instant::now();
        let route = RouteName {
            tenant: None,
            path: "/chat".into(),
        };
        let m = |room: &str, conn| (route.clone(), room.to_owned(), conn);
        r.snapshot(2, Some("b"), 1, vec![m("a", 1), m("x", 2), m("x", 3)], now);
        r.snapshot(3, Some("c"), 1, vec![m("a", 9)], now);
        assert_eq!(r.room_size(KEY, "x"), 2);
        // Node 2 again: room x is gone, room a keeps node 3's member.
        r.snapshot(2, Some("b"), 2, vec![m("y", 4)], now);
        assert!(r.room(KEY, "x").is_none());
        assert_eq!(r.room_size(KEY, "a"), 1);
        assert_eq!(r.room_size(KEY, "y"), 1);
        // A leave that empties a room unindexes it: forgetting the node
        // later finds nothing to remove there.
        assert_eq!(r.changes(2, 3, &[change(false, "y", 4)], now), Apply::Done);
        assert!(r.room(KEY, "y").is_none());
        assert_eq!(r.remove(2), Some(("b".to_owned(), 0)));
        assert_eq!(r.remove(3), Some(("c".to_owned(), 1)));
        assert!(r.routes.is_empty() && r.rooms_of.is_empty());
    }
}
