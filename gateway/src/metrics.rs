//! The gateway's Prometheus metrics, served as text by the admin listener
//! (`GET /metrics`, see [`crate::server::admin`]).
//!
//! One registry for the process ([`Metrics::global`]), built with the
//! `prometheus-client` crate (the Prometheus project's Rust client), which
//! encodes the OpenMetrics text format. Names follow Prometheus'
//! conventions: a `wasmgate_` prefix, base units (seconds, bytes), counters
//! ending in `_total`.
//!
//! Labels: `tenant` (`default` for the top-level routes) and `route` (the
//! path) on everything per route; `code` on closes, `status` on refused
//! upgrades, `outcome` on reloads. Their number is bounded by the config
//! (routes and tenants) and by the protocol (close codes a server sends or
//! accepts, HTTP statuses), never by what clients send.
//!
//! Hot paths do not look labels up: a route keeps its own handles
//! ([`RouteMetrics`]), each an atomic counter or gauge.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::{Registry, Unit};

/// A route's labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// The route's tenant (`default` for top-level routes).
    pub tenant: String,
    /// The route's path.
    pub route: String,
}

/// A close's labels: its route and close code.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseLabels {
    /// The route's tenant.
    pub tenant: String,
    /// The route's path.
    pub route: String,
    /// The close code (RFC 6455 section 7.4), 1006 for a connection that
    /// ended without a closing handshake; the codes applications choose
    /// (3000-3999 registered, 4000-4999 private, section 7.4.2) are
    /// grouped as `3xxx` and `4xxx`, so that clients cannot make a series
    /// per code.
    pub code: &'static str,
}

/// The `code` label of close code `code` (see [`CloseLabels::code`]).
fn code_label(code: u16) -> &'static str {
    match code {
        1000 => "1000",
        1001 => "1001",
        1002 => "1002",
        1003 => "1003",
        1005 => "1005",
        1006 => "1006",
        1007 => "1007",
        1008 => "1008",
        1009 => "1009",
        1010 => "1010",
        1011 => "1011",
        1012 => "1012",
        1013 => "1013",
        1014 => "1014",
        1015 => "1015",
        3000..=3999 => "3xxx",
        4000..=4999 => "4xxx",
        _ => "other",
    }
}

/// A plugin failure's labels: its route and how it failed.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// The route's tenant.
    pub tenant: String,
    /// The route's path.
    pub route: String,
    /// `trap` (the guest trapped: a panic, a stack overflow, an allocation
    /// past its memory) or `interrupted` (past `max_call_time`).
    pub kind: &'static str,
}

/// A refused upgrade's labels: its HTTP status.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    /// The status the upgrade was answered with (400-599).
    pub status: u16,
}

/// A reload's labels: whether it was applied.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// What was reloaded: `config`, `plugin` or `certificate`.
    pub kind: &'static str,
    /// `applied` or `failed` (the old version keeps serving).
    pub outcome: &'static str,
}

/// A reload that failed, for the admin page ([`Metrics::recent_reload_errors`]).
#[derive(Debug, Clone)]
pub struct ReloadError {
    /// When it failed.
    pub at: std::time::SystemTime,
    /// `config`, `plugin` or `certificate`.
    pub kind: &'static str,
    /// Why, as logged (file, line and reason).
    pub message: String,
}

/// How many failed reloads [`Metrics::recent_reload_errors`] keeps.
pub const RECENT_RELOAD_ERRORS: usize = 20;

/// Every metric of the process.
pub struct Metrics {
    registry: Registry,
    recent_errors: parking_lot::Mutex<std::collections::VecDeque<ReloadError>>,
    connections_open: Family<RouteLabels, Gauge>,
    connections_opened: Family<RouteLabels, Counter>,
    messages_in: Family<RouteLabels, Counter>,
    messages_out: Family<RouteLabels, Counter>,
    bytes_in: Family<RouteLabels, Counter>,
    bytes_out: Family<RouteLabels, Counter>,
    instances: Family<RouteLabels, Gauge>,
    call_duration: Family<RouteLabels, CallHistogram>,
    closes: Family<CloseLabels, Counter>,
    refused: Family<StatusLabels, Counter>,
    plugin_failures: Family<FailureLabels, Counter>,
    outbound_dropped: Family<RouteLabels, Counter>,
    reloads: Family<ReloadLabels, Counter>,
    /// The cluster's metrics (series appear once `[cluster]` starts).
    pub cluster: ClusterMetrics,
}

/// A cluster metric's labels: what kind of traffic.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// `membership` (room joins and leaves), `heartbeat`, or `delivery`
    /// (sends, closes and broadcasts for connections on other nodes); for
    /// drops also `lagged` (messages of any kind Redis sent while the
    /// subscriber fell behind).
    pub kind: &'static str,
}

/// The metrics of the cluster link to Redis (see [`crate::cluster`]).
#[derive(Debug, Clone, Default)]
pub struct ClusterMetrics {
    /// Messages published to other nodes, by kind.
    pub published: Family<KindLabels, Counter>,
    /// Messages received from other nodes, by kind.
    pub received: Family<KindLabels, Counter>,
    /// Messages lost, by kind: not published (Redis unreachable, or the
    /// queue to it full), published while the receiving node was not
    /// subscribed (`SPUBLISH` reached nobody), received too late, or
    /// missed by a subscriber that fell behind (`lagged`). Lost membership
    /// changes are repaired (the node rewrites its state, the others read
    /// it again); lost deliveries are not.
    pub dropped: Family<KindLabels, Counter>,
    /// Times another node's room membership was read again from Redis
    /// (at start, after a gap in its updates, after a reconnect).
    pub resyncs: Counter,
    /// Other nodes heard from within `node_timeout` (label: this node's
    /// `node_id`; no series without `[cluster]`).
    pub nodes: Family<NodeLabels, Gauge>,
    /// 1 while the link to Redis works, 0 while it is degraded (label:
    /// this node's `node_id`; no series without `[cluster]`).
    pub redis_up: Family<NodeLabels, Gauge>,
}

/// The labels of a cluster gauge: this node's name.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabels {
    /// `[cluster] node_id`.
    pub node: String,
}

impl ClusterMetrics {
    /// Creates the series that exist from the start (zero counts).
    pub fn init(&self) {
        for kind in ["membership", "heartbeat", "delivery"] {
            let _ = self.published.get_or_create(&KindLabels { kind });
            let _ = self.received.get_or_create(&KindLabels { kind });
            let _ = self.dropped.get_or_create(&KindLabels { kind });
        }
        let _ = self.dropped.get_or_create(&KindLabels { kind: "lagged" });
    }

    /// Counts `n` messages of `kind` in `family`.
    pub fn count(family: &Family<KindLabels, Counter>, kind: &'static str, n: u64) {
        family.get_or_create(&KindLabels { kind }).inc_by(n);
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("wasmgate");
        let m = Metrics {
            connections_open: Family::default(),
            connections_opened: Family::default(),
            messages_in: Family::default(),
            messages_out: Family::default(),
            bytes_in: Family::default(),
            bytes_out: Family::default(),
            instances: Family::default(),
            call_duration: Family::default(),
            closes: Family::default(),
            refused: Family::default(),
            plugin_failures: Family::default(),
            outbound_dropped: Family::default(),
            reloads: Family::default(),
            cluster: ClusterMetrics::default(),
            registry: Registry::default(),
            recent_errors: Default::default(),
        };
        registry.register(
            "connections_open",
            "WebSocket connections open now",
            m.connections_open.clone(),
        );
        registry.register(
            "connections_opened",
            "WebSocket connections accepted (upgraded)",
            m.connections_opened.clone(),
        );
        registry.register(
            "messages_received",
            "Data messages received from clients and delivered to the plugin",
            m.messages_in.clone(),
        );
        registry.register(
            "messages_sent",
            "Data messages written to clients",
            m.messages_out.clone(),
        );
        registry.register_with_unit(
            "received",
            "Payload bytes of the data messages received (after decompression)",
            Unit::Bytes,
            m.bytes_in.clone(),
        );
        registry.register_with_unit(
            "sent",
            "Payload bytes of the data messages sent (before compression)",
            Unit::Bytes,
            m.bytes_out.clone(),
        );
        registry.register(
            "plugin_instances",
            "Plugin instances live now (one per connection, or one per shared route)",
            m.instances.clone(),
        );
        registry.register_with_unit(
            "plugin_call_duration",
            "Wall-clock time of guest calls (instantiation and each handler call)",
            Unit::Seconds,
            m.call_duration.clone(),
        );
        registry.register(
            "connections_closed",
            "Connections ended, by close code (1006: without a closing handshake)",
            m.closes.clone(),
        );
        registry.register(
            "upgrades_refused",
            "Upgrade requests answered with an HTTP error instead of 101, by status",
            m.refused.clone(),
        );
        registry.register(
            "plugin_failures",
            "Plugin calls that trapped, or were interrupted at max_call_time",
            m.plugin_failures.clone(),
        );
        registry.register(
            "outbound_messages_dropped",
            "Messages dropped for slow consumers (slow_consumer = \"drop\")",
            m.outbound_dropped.clone(),
        );
        registry.register(
            "reloads",
            "Config, plugin and certificate reloads, applied or failed",
            m.reloads.clone(),
        );
        registry.register(
            "cluster_published",
            "Messages published through Redis to other gateway nodes, by kind",
            m.cluster.published.clone(),
        );
        registry.register(
            "cluster_received",
            "Messages received through Redis from other gateway nodes, by kind",
            m.cluster.received.clone(),
        );
        registry.register(
            "cluster_dropped",
            "Messages between nodes lost: not published (Redis unreachable, queue full), heard by no subscriber, received past node_timeout, or missed by a lagging subscriber (kind lagged), by kind",
            m.cluster.dropped.clone(),
        );
        registry.register(
            "cluster_resyncs",
            "Times another node's room membership was read again from Redis",
            m.cluster.resyncs.clone(),
        );
        registry.register(
            "cluster_nodes",
            "Other gateway nodes heard from within node_timeout",
            m.cluster.nodes.clone(),
        );
        registry.register(
            "cluster_redis_up",
            "1 while the cluster's link to Redis works, 0 while it is degraded",
            m.cluster.redis_up.clone(),
        );
        // Series that would otherwise appear only at their first event: a
        // rate or increase over a series that starts at 1 misses that one.
        for kind in ["config", "plugin", "certificate"] {
            for outcome in ["applied", "failed"] {
                let _ = m.reloads.get_or_create(&ReloadLabels { kind, outcome });
            }
        }
        Metrics { registry, ..m }
    }

    /// The process's metrics.
    pub fn global() -> &'static Metrics {
        static METRICS: OnceLock<Metrics> = OnceLock::new();
        METRICS.get_or_init(Metrics::new)
    }

    /// The handles of route `route` of `tenant` (`None`: the default
    /// tenant).
    pub fn route(&self, tenant: Option<&str>, route: &str) -> RouteMetrics {
        let labels = RouteLabels {
            tenant: tenant.unwrap_or(crate::config::DEFAULT_TENANT).to_owned(),
            route: route.to_owned(),
        };
        for kind in ["trap", "interrupted", "turn_timeout"] {
            let _ = self.plugin_failures.get_or_create(&FailureLabels {
                tenant: labels.tenant.clone(),
                route: labels.route.clone(),
                kind,
            });
        }
        RouteMetrics {
            open: self.connections_open.get_or_create(&labels).clone(),
            opened: self.connections_opened.get_or_create(&labels).clone(),
            messages_in: self.messages_in.get_or_create(&labels).clone(),
            messages_out: self.messages_out.get_or_create(&labels).clone(),
            bytes_in: self.bytes_in.get_or_create(&labels).clone(),
            bytes_out: self.bytes_out.get_or_create(&labels).clone(),
            instances: self.instances.get_or_create(&labels).clone(),
            call_duration: self.call_duration.get_or_create(&labels).clone(),
            dropped: self.outbound_dropped.get_or_create(&labels).clone(),
            labels,
        }
    }

    /// Counts a connection of `route` ended with `code`.
    pub fn closed(&self, route: &RouteMetrics, code: u16) {
        self.closes
            .get_or_create(&CloseLabels {
                tenant: route.labels.tenant.clone(),
                route: route.labels.route.clone(),
                code: code_label(code),
            })
            .inc();
    }

    /// Counts a failed plugin call on `route` of `tenant` (`kind`: `trap`
    /// or `interrupted`).
    pub fn plugin_failed(&self, tenant: &str, route: &str, kind: &'static str) {
        self.plugin_failures
            .get_or_create(&FailureLabels {
                tenant: tenant.to_owned(),
                route: route.to_owned(),
                kind,
            })
            .inc();
    }

    /// Counts an upgrade refused with `status`.
    pub fn refused(&self, status: u16) {
        self.refused.get_or_create(&StatusLabels { status }).inc();
    }

    /// Counts a reload of `kind` (`config`, `plugin`, `certificate`),
    /// applied or not.
    pub fn reloaded(&self, kind: &'static str, applied: bool) {
        let outcome = if applied { "applied" } else { "failed" };
        self.reloads
            .get_or_create(&ReloadLabels { kind, outcome })
            .inc();
    }

    /// Counts a failed reload of `kind` and keeps `message` (why) among the
    /// last [`RECENT_RELOAD_ERRORS`].
    pub fn reload_failed(&self, kind: &'static str, message: String) {
        self.reloaded(kind, false);
        let mut recent = self.recent_errors.lock();
        if recent.len() == RECENT_RELOAD_ERRORS {
            recent.pop_front();
        }
        recent.push_back(ReloadError {
            at: std::time::SystemTime::now(),
            kind,
            message,
        });
    }

    /// The last failed reloads, oldest first.
    pub fn recent_reload_errors(&self) -> Vec<ReloadError> {
        self.recent_errors.lock().iter().cloned().collect()
    }

    /// Every metric in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// A route's metric handles: incrementing one is an atomic add, no lookup.
#[derive(Debug, Clone)]
pub struct RouteMetrics {
    labels: RouteLabels,
    /// Connections open now.
    pub open: Gauge,
    /// Connections accepted.
    pub opened: Counter,
    /// Data messages delivered to the plugin.
    pub messages_in: Counter,
    /// Data messages written to the client.
    pub messages_out: Counter,
    /// Payload bytes received (after decompression).
    pub bytes_in: Counter,
    /// Payload bytes sent (before compression).
    pub bytes_out: Counter,
    /// Plugin instances live.
    pub instances: Gauge,
    /// Guest call durations.
    pub call_duration: CallHistogram,
    /// Messages dropped for slow consumers.
    pub dropped: Counter,
}

/// Upper bounds of [`CallHistogram`]'s buckets, in nanoseconds: from a
/// short handler call (microseconds) to `max_call_time` (seconds); above
/// the last, `+Inf`.
const CALL_BUCKETS_NS: [u64; 12] = [
    10_000,
    50_000,
    100_000,
    500_000,
    1_000_000,
    5_000_000,
    10_000_000,
    50_000_000,
    100_000_000,
    500_000_000,
    1_000_000_000,
    5_000_000_000,
];

/// A histogram of guest call durations, observed on every call: each
/// bucket and the sum are relaxed atomic adds (no lock, unlike
/// `prometheus_client`'s own histogram), read together only when scraped.
/// Clones share their counts.
#[derive(Debug, Clone, Default)]
pub struct CallHistogram(Arc<CallCounts>);

#[derive(Debug, Default)]
struct CallCounts {
    /// Per bucket (not cumulative), the last one `+Inf`.
    buckets: [AtomicU64; CALL_BUCKETS_NS.len() + 1],
    /// Sum of all observations, in nanoseconds.
    sum_ns: AtomicU64,
}

impl CallHistogram {
    /// Counts one call that took `d`.
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = CALL_BUCKETS_NS
            .iter()
            .position(|&bound| ns <= bound)
            .unwrap_or(CALL_BUCKETS_NS.len());
        self.0.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.0.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }
}

impl TypedMetric for CallHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for CallHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let mut buckets = [(0.0, 0); CALL_BUCKETS_NS.len() + 1];
        let mut count = 0;
        for (i, slot) in buckets.iter_mut().enumerate() {
            let bound = CALL_BUCKETS_NS
                .get(i)
                .map_or(f64::INFINITY, |&ns| ns as f64 / 1e9);
            let n = self.0.buckets[i].load(Ordering::Relaxed);
            count += n;
            *slot = (bound, n);
        }
        let sum = self.0.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_handles_count_under_their_labels_and_encode_as_openmetrics() {
        let m = Metrics::new();
        let r = m.route(Some("acme"), "/chat");
        r.opened.inc();
        r.open.inc();
        m.closed(&r, 1000);
        m.closed(&r, 4321);
        m.closed(&r, 4999);
        m.refused(503);
        m.reloaded("config", false);
        r.call_duration.observe(Duration::from_micros(3));
        r.call_duration.observe(Duration::from_millis(20));
        let text = m.encode();
        let bucket = |le: &str| {
            format!(
                r#"wasmgate_plugin_call_duration_seconds_bucket{{le="{le}",tenant="acme",route="/chat"}}"#
            )
        };
        assert!(text.contains(&format!("{} 1", bucket("0.00001"))), "{text}");
        assert!(text.contains(&format!("{} 1", bucket("0.01"))), "{text}");
        assert!(text.contains(&format!("{} 2", bucket("0.05"))), "{text}");
        assert!(text.contains(&format!("{} 2", bucket("+Inf"))), "{text}");
        assert!(
            text.contains(
                r#"wasmgate_plugin_call_duration_seconds_count{tenant="acme",route="/chat"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"wasmgate_connections_opened_total{tenant="acme",route="/chat"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"wasmgate_connections_open{tenant="acme",route="/chat"} 1"#));
        assert!(text.contains(
            r#"wasmgate_connections_closed_total{tenant="acme",route="/chat",code="1000"} 1"#
        ));
        assert!(text.contains(
            r#"wasmgate_connections_closed_total{tenant="acme",route="/chat",code="4xxx"} 2"#
        ));
        assert!(text.contains(r#"wasmgate_upgrades_refused_total{status="503"} 1"#));
        // Created before their first event, so that rates see the first one.
        assert!(text.contains(r#"wasmgate_reloads_total{kind="plugin",outcome="failed"} 0"#));
        assert!(text.contains(
            r#"wasmgate_plugin_failures_total{tenant="acme",route="/chat",kind="interrupted"} 0"#
        ));
        assert!(text.contains(r#"wasmgate_reloads_total{kind="config",outcome="failed"} 1"#));
        assert!(text.ends_with("# EOF\n"));
    }
}
