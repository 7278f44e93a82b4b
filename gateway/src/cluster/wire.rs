//! What gateway nodes publish to each other through Redis, and the names
//! of the Redis keys and channels they use.
//!
//! Messages are serde values encoded with postcard (a compact binary
//! format, <https://postcard.jamesmunns.com/wire-format>), so a binary
//! payload travels as its bytes. Every node of a cluster runs the same
//! wasmgate version; a message that does not decode is counted and
//! dropped.
//!
//! Layout in Redis, under the cluster's `namespace` (`wasmgate` by
//! default, written `NS` here; `P` is a node's number):
//!
//! | name | kind | holds |
//! |---|---|---|
//! | `NS:node-seq` | sorted set | member `counter`: the last node number handed out (`ZINCRBY`; `ZADD GT` restores it) |
//! | `NS:{node:P}:owner` | string | the token of the node holding number P |
//! | `NS:nodes` | sorted set | live node numbers, scored by the time (ms since the Unix epoch) they expire |
//! | `NS:{node:P}:members` | hash | node P's room memberships: field = (tenant, route, room, connection), encoded |
//! | `NS:{node:P}:seq` | string | the number of node P's last membership change written to the hash |
//! | `NS:members` | sharded channel | membership changes and heartbeats of every node |
//! | `NS:{node:P}` | sharded channel | deliveries for node P's connections |
//!
//! A node's two keys share a hash tag (`{node:P}`), so one `MULTI` updates
//! both on a Redis Cluster too. Both expire `node_timeout` after the node's
//! last heartbeat.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// A route as every node names it: its tenant (`None`: the default
/// tenant) and path. Nodes of a cluster serve the same config, so the same
/// name is the same route everywhere.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RouteName {
    /// The `[[tenant]]` name, `None` for top-level routes.
    pub tenant: Option<String>,
    /// The route's path.
    pub path: String,
}

impl RouteName {
    /// The key this node's replica files the route under: unambiguous for
    /// any tenant name and path.
    pub fn key(&self) -> String {
        route_key(self.tenant.as_deref(), &self.path)
    }
}

/// The replica's key of route `path` of `tenant`: the tenant's length,
/// `:`, the tenant, then the path (so no two pairs give one key).
pub fn route_key(tenant: Option<&str>, path: &str) -> String {
    let t = tenant.unwrap_or("");
    format!("{}:{t}{path}", t.len())
}

/// One room membership change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// A join (`true`) or a leave.
    pub join: bool,
    /// The route.
    pub route: RouteName,
    /// The room.
    pub room: String,
    /// The connection (its node is in the id's high bits).
    pub conn: u64,
}

/// A message on the `members` channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Membership {
    /// Node `node`'s membership changes numbered `first`, `first + 1`, ...
    /// in the order it made them.
    Changes {
        /// The sender's node number.
        node: u32,
        /// The number of the first change.
        first: u64,
        /// The changes.
        changes: Vec<Change>,
    },
    /// Node `node` is alive; its last change is number `seq`.
    Heartbeat {
        /// The sender's node number.
        node: u32,
        /// Its `node_id`, for logs.
        name: String,
        /// The number of its last membership change.
        seq: u64,
        /// When it was sent, by the sender's clock (ms since the Unix
        /// epoch): how far its clock is from the receiver's.
        sent_ms: u64,
    },
    /// Node `node` is shutting down: forget its members now.
    Bye {
        /// The sender's node number.
        node: u32,
    },
}

/// Who a delivery is for, on the receiving node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Target {
    /// One connection.
    Conn(u64),
    /// The receiving node's members of a room, but `except`.
    Room {
        /// The room.
        room: String,
        /// A connection not to deliver to.
        except: Option<u64>,
    },
}

/// A message on a node's own channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Delivery {
    /// Queue a message.
    Message {
        /// The route whose connections receive it.
        route: RouteName,
        /// Who receives it.
        target: Target,
        /// A text message (UTF-8) or a binary one.
        text: bool,
        /// The payload.
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    },
    /// Start a connection's closing handshake, for its route's plugin.
    Close {
        /// The connection's route.
        route: RouteName,
        /// The connection.
        conn: u64,
        /// The close code (checked by the sender).
        code: u16,
        /// The reason (at most 123 bytes, checked by the sender).
        reason: String,
    },
    /// A node's message to itself, with each heartbeat: that it still
    /// hears its own channel (a subscription lost when the channel's slot
    /// moved to another shard of a Redis Cluster is noticed and made
    /// again).
    Probe,
}

/// A delivery as it travels: stamped with the sender's clock, so that one
/// held up (a publish in flight when Redis went away, sent once it was
/// back) can be recognised as stale by the receiver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The sending node.
    pub node: u32,
    /// When it was queued: milliseconds since the Unix epoch, by the
    /// sender's clock.
    pub sent_ms: u64,
    /// The delivery.
    pub delivery: Delivery,
}

/// Encodes `delivery` from node `node` in an [`Envelope`] stamped now.
pub fn encode_delivery(node: u32, delivery: Delivery) -> Bytes {
    encode(&Envelope {
        node,
        sent_ms: now_ms(),
        delivery,
    })
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Encodes a message.
pub fn encode<T: Serialize>(value: &T) -> Bytes {
    // Encoding into a Vec fails only for types postcard cannot express,
    // which these are not.
    Bytes::from(postcard::to_allocvec(value).unwrap_or_default())
}

/// Decodes a message; `None` if the bytes are not one.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Option<T> {
    postcard::from_bytes(bytes).ok()
}

/// A membership field of the `members` hash: (tenant, path, room,
/// connection), encoded.
pub fn member_field(route: &RouteName, room: &str, conn: u64) -> Bytes {
    encode(&(&route.tenant, &route.path, room, conn))
}

/// Decodes a membership field.
pub fn parse_member_field(bytes: &[u8]) -> Option<(RouteName, String, u64)> {
    let (tenant, path, room, conn): (Option<String>, String, String, u64) = decode(bytes)?;
    Some((RouteName { tenant, path }, room, conn))
}

/// The Redis names of one cluster (one `namespace`).
#[derive(Debug, Clone)]
pub struct Names {
    ns: String,
}

impl Names {
    /// The names under `namespace`.
    pub fn new(namespace: &str) -> Names {
        Names {
            ns: namespace.to_owned(),
        }
    }

    /// The node-number counter.
    pub fn node_seq(&self) -> String {
        format!("{}:node-seq", self.ns)
    }

    /// The sorted set of live nodes.
    pub fn nodes(&self) -> String {
        format!("{}:nodes", self.ns)
    }

    /// Node `node`'s membership hash.
    pub fn members(&self, node: u32) -> String {
        format!("{}:{{node:{node}}}:members", self.ns)
    }

    /// Node `node`'s last change number.
    pub fn seq(&self, node: u32) -> String {
        format!("{}:{{node:{node}}}:seq", self.ns)
    }

    /// The token of the node holding number `node`.
    pub fn owner(&self, node: u32) -> String {
        format!("{}:{{node:{node}}}:owner", self.ns)
    }

    /// The channel of membership changes and heartbeats.
    pub fn membership_channel(&self) -> String {
        format!("{}:members", self.ns)
    }

    /// Node `node`'s delivery channel.
    pub fn node_channel(&self, node: u32) -> String {
        format!("{}:{{node:{node}}}", self.ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_keys_of_different_routes_differ() {
        assert_ne!(route_key(Some("a"), "/b"), route_key(Some("a/"), "b"));
        assert_ne!(route_key(None, "/x"), route_key(Some(""), "/y"));
        assert_eq!(route_key(None, "/chat"), "0:/chat");
    }

    #[test]
    fn deliveries_and_fields_round_trip() {
        let d = Delivery::Message {
            route: RouteName {
                tenant: Some("acme".into()),
                path: "/chat".into(),
            },
            target: Target::Room {
                room: "lobby".into(),
                except: Some(7),
            },
            text: false,
            payload: vec![0, 1, 255],
        };
        assert_eq!(decode::<Delivery>(&encode(&d)), Some(d.clone()));
        let e = decode::<Envelope>(&encode_delivery(3, d.clone())).expect("an envelope");
        assert_eq!(e.node, 3);
        assert_eq!(e.delivery, d);
        assert!(e.sent_ms.abs_diff(now_ms()) < 10_000);
        let route = RouteName {
            tenant: None,
            path: "/chat".into(),
        };
        let f = member_field(&route, "r\u{1}oom", u64::MAX);
        assert_eq!(
            parse_member_field(&f),
            Some((route, "r\u{1}oom".to_owned(), u64::MAX))
        );
        assert_eq!(decode::<Membership>(b"\xff\xff"), None);
    }
}
