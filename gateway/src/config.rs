//! The gateway configuration: `gateway.toml`, parsed into [`Config`], with
//! every error naming the file, the line and the key.
//!
//! The text is read in two steps so that one bad value does not hide the
//! others. First the TOML syntax: a syntax error stops there. Then every key
//! of every table is checked on its own, through serde visitors that say
//! what form the key takes and what was found instead, and then against its
//! bounds. [`Config::parse`] returns every error, in file order.
//!
//! Limits live in `[server]` as defaults and any `[[route]]` can override
//! them; [`Limits`] is the resolved set a connection runs with. The reference
//! with every key, its default and its bounds is in `docs/config.md`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserialize, Deserializer, Expected, SeqAccess, Unexpected, Visitor};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::error::{Error, Errors};

/// A parsed, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the config came from (`<embedded>` for the built-in default);
    /// relative plugin paths are resolved against its directory.
    pub file: PathBuf,
    /// Server-wide settings.
    pub server: ServerSettings,
    /// Sandbox settings for every plugin instance.
    pub sandbox: SandboxSettings,
    /// The routes, in file order: the default tenant's (top-level
    /// `[[route]]`) and every `[[tenant.route]]`, each naming its tenant.
    pub routes: Vec<RouteSettings>,
    /// The `[[tenant]]` tables, in file order.
    pub tenants: Vec<TenantSettings>,
    /// The `[admin]` listener (`None`: off, the default).
    pub admin: Option<AdminSettings>,
    /// The static file mounts (`[[static]]` and `[[tenant.static]]`), in
    /// file order.
    pub statics: Vec<StaticSettings>,
    /// `[cluster]`: rooms, broadcast and sends across gateway nodes through
    /// Redis (`None`: this node is alone, the default; nothing connects to
    /// Redis).
    pub cluster: Option<ClusterSettings>,
}

/// The `[cluster]` table: this node's place in a cluster of gateways that
/// share rooms through Redis (see `crate::cluster`). Read at start; a
/// reload that changes it is logged as needing a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    /// The Redis server, as a `redis://[user:password@]host[:port][/0]`
    /// URL, or a Redis Cluster as
    /// `redis-cluster://[user:password@]host:port[?node=host:port&...]`.
    pub redis: String,
    /// This node's name in logs and in what other nodes see
    /// (default: `<hostname>-<process id>`).
    pub node_id: Option<String>,
    /// The prefix of every Redis key and channel the cluster uses
    /// (default `wasmgate`): clusters that share one Redis need their own.
    pub namespace: String,
    /// How often the node tells the others it is alive (default 1 s).
    pub heartbeat: Duration,
    /// How long after its last heartbeat a silent node's room members stop
    /// counting, and its state in Redis expires (default 5 s; at least
    /// twice `heartbeat`).
    pub node_timeout: Duration,
    /// Where `[cluster]` is, for errors: `gateway.toml:30: [cluster]`.
    pub origin: String,
}

/// A `[[static]]` (or `[[tenant.static]]`) table: a folder served over
/// plain HTTP `GET` and `HEAD` under a path prefix (see
/// [`crate::static_files`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticSettings {
    /// The URL path prefix, starting with `/` and without a trailing `/`
    /// (except `/` itself): `/docs` serves `/docs` and `/docs/...`.
    pub path: String,
    /// Where the files are.
    pub dir: StaticDir,
    /// The file served for a request naming a folder (default
    /// `index.html`).
    pub index: String,
    /// The tenant whose hosts it serves (`None`: the default tenant).
    pub tenant: Option<String>,
    /// The line of its table.
    pub line: usize,
}

/// The folder of a static mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StaticDir {
    /// A folder on disk (relative paths are resolved against the config
    /// file's folder). Files are read at each request: an edit is served
    /// at once.
    Folder(PathBuf),
    /// Files compiled into the binary: `builtin:demo` (the demo chat page).
    Builtin(String),
}

impl fmt::Display for StaticDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StaticDir::Folder(p) => write!(f, "{}", p.display()),
            StaticDir::Builtin(name) => write!(f, "builtin:{name}"),
        }
    }
}

/// The `[admin]` table: the operators' listener for metrics and health.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminSettings {
    /// Where it listens (a separate port; keep it off the public network).
    pub listen: ListenAddr,
    /// Where `listen` was set, for errors: `gateway.toml:12: listen`.
    pub listen_origin: String,
}

/// One `[[tenant]]`: a customer's slice of the gateway, chosen by the
/// request's host name, with its own routes and quotas.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantSettings {
    /// The tenant's name, for logs (`[A-Za-z0-9._-]`, 1 to 64 characters).
    pub name: String,
    /// Host names it serves, lower-case: exact names and one-label
    /// wildcards (`*.example.org`).
    pub hosts: Vec<String>,
    /// Its quotas, summed over all its connections.
    pub quotas: TenantQuotas,
    /// The certificate served to TLS clients whose SNI names one of its
    /// hosts (`None`: the server's default certificate).
    pub tls: Option<TlsFiles>,
    /// The line of its `[[tenant]]` table.
    pub line: usize,
}

/// A certificate chain and its private key, both PEM files: `tls = { cert
/// = "chain.pem", key = "key.pem" }`. Relative paths are resolved against
/// the config file's folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, leaf first (PEM `CERTIFICATE` blocks).
    pub cert: PathBuf,
    /// The leaf's private key (PEM: PKCS#8, PKCS#1 RSA or SEC1 EC).
    pub key: PathBuf,
    /// The line of the `tls` key, for errors.
    pub line: usize,
}

/// A tenant's quotas, each a total over the tenant's connections and
/// instances (`None`: no cap but the server's).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TenantQuotas {
    /// Most open connections (503 beyond).
    pub max_connections: Option<usize>,
    /// Most new connections a second (429 beyond).
    pub max_connections_per_second: Option<u32>,
    /// Most live plugin instances (a new connection gets 503 beyond).
    pub max_instances: Option<usize>,
    /// Most linear memory of all its instances together, in bytes (a grow
    /// past it fails, as if past `max_memory`).
    pub max_memory_total: Option<usize>,
    /// Most files and directories its instances hold open at once through
    /// WASI (routes with `dirs`; each one of the gateway's file
    /// descriptors): the open past it fails with `insufficient-memory`.
    pub max_open_files: Option<usize>,
    /// Guest CPU time the tenant may use per period; past it its events wait.
    pub cpu_budget: Option<CpuBudget>,
    /// Most `send` calls per second.
    pub max_sends_per_second: Option<u32>,
    /// Most messages queued by `broadcast` per second (one per member).
    pub max_broadcast_deliveries_per_second: Option<u32>,
    /// Most `set-timer` calls per second.
    pub max_timers_per_second: Option<u32>,
    /// Most log lines (`log` calls and stdout/stderr lines) per second.
    pub max_log_lines_per_second: Option<u32>,
}

/// A CPU budget: at most `time` of guest execution per `period`, for
/// example `"200ms/s"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuBudget {
    /// Guest time allowed per period.
    pub time: Duration,
    /// The period.
    pub period: Duration,
}

/// What happens to a connection that sends faster than its route's
/// `max_messages_per_second` or `max_bytes_per_second`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateExceeded {
    /// Close it with 1008 (policy violation).
    Close,
    /// Drop the messages over the rate (the plugin never sees them), and
    /// count them.
    Drop,
}

impl<'de> Deserialize<'de> for RateExceeded {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Choice {
            expecting: r#""close" or "drop""#,
            choices: &[("close", RateExceeded::Close), ("drop", RateExceeded::Drop)],
        })
    }
}

/// An environment variable granted to a route's plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvGrant {
    /// The variable's name.
    pub key: String,
    /// Its literal value (`"KEY=value"`), or `None` to pass the gateway's own
    /// value of `KEY` (absent from the plugin if the gateway has none).
    pub value: Option<String>,
}

/// A host directory granted to a route's plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirGrant {
    /// The directory on the gateway's host (relative paths are resolved
    /// against the config file's folder).
    pub host: PathBuf,
    /// Where the plugin sees it, an absolute path such as `/data`.
    pub guest: String,
    /// Whether the plugin may only read (the default).
    pub read_only: bool,
}

/// The `[server]` table, resolved.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Address to listen on; a host name is resolved when the gateway starts.
    pub listen: ListenAddr,
    /// Where `listen` was set, to name it in errors: `gateway.toml:2: listen`.
    pub listen_origin: String,
    /// Most open WebSocket connections at once; more get HTTP 503.
    pub max_connections: usize,
    /// Time a client has to send its complete upgrade request.
    pub handshake_timeout: Duration,
    /// Largest request head (request line and headers) accepted, in bytes.
    pub max_header_size: usize,
    /// On shutdown, how long to wait for close handshakes before exiting.
    pub drain_timeout: Duration,
    /// Worker threads: 0 for one per CPU; 1 for a single current-thread
    /// runtime.
    pub threads: usize,
    /// TLS on the listener (`wss://`), with this default certificate; each
    /// tenant may add its own, chosen by SNI. `None`: plain `ws://`.
    pub tls: Option<TlsFiles>,
}

/// The `[sandbox]` table: what every plugin instance may use.
#[derive(Debug, Clone)]
pub struct SandboxSettings {
    /// Most linear memory one instance may grow to, in bytes.
    pub max_memory: usize,
    /// Longest a single handler call may run before it is interrupted
    /// (the connection is then closed with 1011).
    pub max_call_time: Duration,
}

/// Where a route's plugin comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginSource {
    /// A `.wasm` component file.
    File(PathBuf),
    /// One of the example plugins compiled into the binary (`builtin:echo`).
    Builtin(String),
}

impl fmt::Display for PluginSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PluginSource::File(p) => write!(f, "{}", p.display()),
            PluginSource::Builtin(name) => write!(f, "builtin:{name}"),
        }
    }
}

/// What happens to a connection whose outbound buffer is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlowConsumer {
    /// Close it with 1008 (policy violation).
    Close,
    /// Drop the messages that do not fit, and count them.
    Drop,
}

impl<'de> Deserialize<'de> for SlowConsumer {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Choice {
            expecting: r#""close" or "drop""#,
            choices: &[("close", SlowConsumer::Close), ("drop", SlowConsumer::Drop)],
        })
    }
}

/// How a route's plugin receives data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deliver {
    /// Whole messages (`on-message`), reassembled and capped by
    /// `max_message_size`.
    Message,
    /// Each fragment as it arrives (`on-fragment`), capped by
    /// `max_frame_size`: messages of any total size stream through.
    Fragments,
}

impl<'de> Deserialize<'de> for Deliver {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Choice {
            expecting: r#""message" or "fragments""#,
            choices: &[
                ("message", Deliver::Message),
                ("fragments", Deliver::Fragments),
            ],
        })
    }
}

/// What a route's open connections do when its plugin is replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnReload {
    /// Stay on the instance and version they have until they close.
    Keep,
    /// Move to a fresh instance of the new version at their next event,
    /// keeping their host-side state; the plugin's `on-resume` runs first.
    Migrate,
}

impl<'de> Deserialize<'de> for OnReload {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Choice {
            expecting: r#""keep" or "migrate""#,
            choices: &[("keep", OnReload::Keep), ("migrate", OnReload::Migrate)],
        })
    }
}

/// How a route's connections share plugin instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// One instance per connection: a plugin's globals are per-connection
    /// state, and one connection's trap affects nothing else.
    Connection,
    /// One instance per route (and plugin version) serves all its
    /// connections, one event at a time: what makes JavaScript and Python
    /// plugins (megabytes per instance) affordable.
    Shared,
}

impl<'de> Deserialize<'de> for Isolation {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Choice {
            expecting: r#""connection" or "shared""#,
            choices: &[
                ("connection", Isolation::Connection),
                ("shared", Isolation::Shared),
            ],
        })
    }
}

/// The limits a connection runs with: the `[server]` defaults overridden by
/// its route.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Largest frame payload accepted, in bytes (1009 beyond).
    pub max_frame_size: usize,
    /// Largest complete message accepted, in bytes (1009 beyond).
    pub max_message_size: usize,
    /// Most bytes queued to one connection before it counts as a slow consumer.
    pub max_outbound_buffer: usize,
    /// What to do with a slow consumer.
    pub slow_consumer: SlowConsumer,
    /// Close a connection after this long without a frame in either
    /// direction (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// Ping a peer that has sent nothing for this long (`None`: never).
    pub ping_interval: Option<Duration>,
    /// How long a pinged peer has to answer before it is dropped.
    pub pong_timeout: Duration,
    /// How long to wait for the peer's close frame after sending ours.
    pub close_timeout: Duration,
    /// Most data messages a second a client may send (`None`: no cap).
    pub max_messages_per_second: Option<u32>,
    /// Most payload bytes a second a client may send (`None`: no cap).
    pub max_bytes_per_second: Option<usize>,
    /// What to do with a client over either inbound rate.
    pub rate_exceeded: RateExceeded,
    /// Most `send` calls a second made for one connection.
    pub max_sends_per_second: Option<u32>,
    /// Most `broadcast` deliveries a second made for one connection.
    pub max_broadcast_deliveries_per_second: Option<u32>,
    /// Most `set-timer` calls a second made for one connection.
    pub max_timers_per_second: Option<u32>,
    /// Most log lines a second (`log` calls and stdout/stderr lines) made
    /// for one connection; the rest are dropped and counted.
    pub max_log_lines_per_second: Option<u32>,
    /// Most timers one connection holds at once.
    pub max_timers: usize,
    /// Most rooms one connection is in at once.
    pub max_rooms_per_connection: usize,
    /// Most members one room holds.
    pub max_room_members: usize,
    /// Most metadata entries one connection holds.
    pub max_metadata_entries: usize,
    /// Most metadata bytes (keys and values) one connection holds.
    pub max_metadata_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_size: 1 << 20,
            max_message_size: 1 << 20,
            max_outbound_buffer: 4 << 20,
            slow_consumer: SlowConsumer::Close,
            idle_timeout: None,
            ping_interval: Some(Duration::from_secs(30)),
            pong_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(5),
            max_messages_per_second: None,
            max_bytes_per_second: None,
            rate_exceeded: RateExceeded::Close,
            max_sends_per_second: None,
            max_broadcast_deliveries_per_second: None,
            max_timers_per_second: None,
            max_log_lines_per_second: Some(100),
            max_timers: 64,
            max_rooms_per_connection: 256,
            max_room_members: 100_000,
            max_metadata_entries: 64,
            max_metadata_bytes: 256 << 10,
        }
    }
}

impl RouteSettings {
    /// How messages name the route: its path, and its tenant if it has one
    /// (`/chat (tenant acme)`).
    pub fn label(&self) -> String {
        match &self.tenant {
            Some(t) => format!("{} (tenant {t})", self.path),
            None => self.path.clone(),
        }
    }
}

/// One `[[route]]`, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteSettings {
    /// The exact request path, for example `/chat`.
    pub path: String,
    /// The plugin that handles it.
    pub plugin: PluginSource,
    /// The line of the `plugin` key, for error messages.
    pub line: usize,
    /// The `[route.config]` values passed to the plugin.
    pub config: BTreeMap<String, String>,
    /// The connection limits.
    pub limits: Limits,
    /// Origins allowed to connect (`None`: any).
    pub allowed_origins: Option<Vec<String>>,
    /// Subprotocols offered to the plugin (`None`: every offer).
    pub subprotocols: Option<Vec<String>>,
    /// Most open connections on this route (`None`: only the server cap).
    pub max_connections: Option<usize>,
    /// Whole messages or fragments.
    pub deliver: Deliver,
    /// What open connections do when the plugin is replaced.
    pub on_reload: OnReload,
    /// One instance per connection, or one shared by the route's
    /// connections.
    pub isolation: Isolation,
    /// Release the plugin instance of a connection with no event for this
    /// long (`None`: never); the next event gets a fresh instance.
    pub hibernate_after: Option<Duration>,
    /// The tenant whose `[[tenant.route]]` this is (`None`: a top-level
    /// `[[route]]`, the default tenant's).
    pub tenant: Option<String>,
    /// Environment variables the plugin sees (none by default).
    pub env: Vec<EnvGrant>,
    /// Host directories the plugin sees (none by default).
    pub dirs: Vec<DirGrant>,
    /// Most files and directories the route's instances hold open at once
    /// through WASI (`None`: no bound but each instance's 64 and the
    /// tenant's `max_open_files`); the open past it fails with
    /// `insufficient-memory`. Only with `dirs`.
    pub max_open_files: Option<usize>,
    /// permessage-deflate (RFC 7692) when clients offer it (`None`: off,
    /// the default).
    pub compression: Option<crate::protocol::deflate::DeflateSettings>,
}

// ---------------------------------------------------------------------------
// The listen address.

/// The form a listen address takes, for error messages.
const LISTEN_FORM: &str = r#"host:port such as "127.0.0.1:8080", "[::1]:8080" or "localhost:8080""#;

/// An address to listen on, `host:port`, as written: the host is an IP
/// address (`127.0.0.1:8080`, `[::1]:8080`) or a name (`localhost:8080`)
/// that is resolved when the gateway starts. Parsed by [`FromStr`], which
/// says what is wrong with a malformed one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenAddr {
    host: String,
    port: u16,
}

impl ListenAddr {
    /// The host: an IP address (without brackets) or a host name.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port (0: any free port).
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl From<SocketAddr> for ListenAddr {
    fn from(addr: SocketAddr) -> Self {
        ListenAddr {
            host: addr.ip().to_string(),
            port: addr.port(),
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let expected = |why: &str| format!("expected {LISTEN_FORM}, found {s:?} ({why})");
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let Some((ip, port)) = rest.split_once("]:") else {
                return Err(expected("no port after the bracketed address"));
            };
            if ip.parse::<Ipv6Addr>().is_err() {
                return Err(expected(&format!("{ip:?} is not an IPv6 address")));
            }
            (ip, port)
        } else {
            let Some((host, port)) = s.rsplit_once(':') else {
                return Err(expected("no port"));
            };
            if host.is_empty() {
                return Err(expected(&format!(
                    "no host: \"0.0.0.0:{port}\" or \"[::]:{port}\" listens on every interface"
                )));
            }
            if host.parse::<Ipv6Addr>().is_ok() {
                return Err(expected(&format!(
                    "an IPv6 address goes in brackets: \"[{host}]:{port}\""
                )));
            }
            if host.bytes().all(|b| b.is_ascii_digit() || b == b'.')
                && host.parse::<Ipv4Addr>().is_err()
            {
                return Err(expected(&format!("{host:?} is not an IPv4 address")));
            }
            if !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
            {
                return Err(expected(&format!("{host:?} is not a host name")));
            }
            (host, port)
        };
        if port.is_empty() {
            return Err(expected("no port"));
        }
        if !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("port {port:?} is not a number (in {s:?})"));
        }
        let port = port
            .parse::<u16>()
            .map_err(|_| format!("port {port} is out of range (0-65535)"))?;
        Ok(ListenAddr {
            host: host.to_owned(),
            port,
        })
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ListenAddr;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(LISTEN_FORM)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<ListenAddr, E> {
                s.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

// ---------------------------------------------------------------------------
// Values: what each key takes, as serde visitors that say what they expect.

/// A byte size: an integer, or a string such as `"64KiB"`, `"16 MiB"`.
#[derive(Debug, Clone, Copy)]
struct Size(usize);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"a size like "1MiB" or a number of bytes"#)
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Size, E> {
                match usize::try_from(n) {
                    Ok(n) => Ok(Size(n)),
                    Err(_) => Err(E::invalid_value(Unexpected::Unsigned(n), &self)),
                }
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Size, E> {
                match u64::try_from(n) {
                    Ok(n) => self.visit_u64(n),
                    Err(_) => Err(E::invalid_value(Unexpected::Signed(n), &self)),
                }
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Size, E> {
                match parse_size(s) {
                    Some(n) => Ok(Size(n)),
                    None => Err(E::invalid_value(Unexpected::Str(s), &self)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

fn parse_size(s: &str) -> Option<usize> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: usize = num.parse().ok()?;
    let mult: usize = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "KB" | "kB" => 1 << 10,
        "MiB" | "M" | "MB" => 1 << 20,
        "GiB" | "G" | "GB" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// A size for messages: `"64KiB"` rather than `65536 bytes` where it is one.
fn fmt_size(n: usize) -> String {
    const UNITS: [(usize, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (unit, name) in UNITS {
        if n >= unit && n.is_multiple_of(unit) {
            return format!("{}{name}", n / unit);
        }
    }
    match n {
        0 => "0".to_owned(),
        1 => "1 byte".to_owned(),
        n => format!("{n} bytes"),
    }
}

/// A duration: a string such as `"30s"`, `"500ms"`, `"2m"`; `"off"` (or
/// `"0s"`) where the key can be turned off.
struct DurationVisitor {
    can_be_off: bool,
}

impl Visitor<'_> for DurationVisitor {
    type Value = Option<Duration>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(r#"a duration like "30s" or "500ms""#)?;
        if self.can_be_off {
            f.write_str(r#", or "off""#)?;
        }
        Ok(())
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<Option<Duration>, E> {
        match parse_duration(s) {
            Some(None) if !self.can_be_off => Err(E::custom(format!(
                "cannot be turned off: expected {}, found {}",
                &self as &dyn Expected,
                Found(Unexpected::Str(s))
            ))),
            Some(d) => Ok(d),
            None => Err(E::invalid_value(Unexpected::Str(s), &self)),
        }
    }
}

/// A duration that can be turned off (`None`).
#[derive(Debug, Clone, Copy)]
struct Timeout(Option<Duration>);

impl<'de> Deserialize<'de> for Timeout {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(DurationVisitor { can_be_off: true })
            .map(Timeout)
    }
}

/// A duration that cannot be turned off.
#[derive(Debug, Clone, Copy)]
/// `"on"` or `"off"` (true or false are accepted too).
struct OnOff(bool);

impl<'de> Deserialize<'de> for OnOff {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = OnOff;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#""on" or "off""#)
            }
            fn visit_bool<E: de::Error>(self, b: bool) -> Result<OnOff, E> {
                Ok(OnOff(b))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<OnOff, E> {
                match s {
                    "on" => Ok(OnOff(true)),
                    "off" => Ok(OnOff(false)),
                    _ => Err(E::invalid_value(Unexpected::Str(s), &self)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

struct Period(Duration);

impl<'de> Deserialize<'de> for Period {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let d = d.deserialize_any(DurationVisitor { can_be_off: false })?;
        // The visitor refuses "off"; the fallback is never used.
        Ok(Period(d.unwrap_or(Duration::from_secs(1))))
    }
}

fn parse_duration(s: &str) -> Option<Option<Duration>> {
    let s = s.trim();
    if s == "off" {
        return Some(None);
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let d = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60)?),
        "h" => Duration::from_secs(n.checked_mul(3600)?),
        _ => return None,
    };
    Some((!d.is_zero()).then_some(d))
}

/// A count: a whole number, not negative.
#[derive(Debug, Clone, Copy)]
struct Count(usize);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Count;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a whole number")
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Count, E> {
                match usize::try_from(n) {
                    Ok(n) => Ok(Count(n)),
                    Err(_) => Err(E::invalid_value(Unexpected::Unsigned(n), &self)),
                }
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Count, E> {
                match u64::try_from(n) {
                    Ok(n) => self.visit_u64(n),
                    Err(_) => Err(E::invalid_value(Unexpected::Signed(n), &self)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// A per-second rate: a whole number of at least 1, or `"off"` (`None`).
#[derive(Debug, Clone, Copy)]
struct Rate(Option<u32>);

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Rate;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"a number per second (at least 1), or "off""#)
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Rate, E> {
                match u32::try_from(n) {
                    Ok(n) if n >= 1 => Ok(Rate(Some(n))),
                    _ => Err(E::invalid_value(Unexpected::Signed(n), &self)),
                }
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Rate, E> {
                match s.trim() {
                    "off" => Ok(Rate(None)),
                    _ => Err(E::invalid_value(Unexpected::Str(s), &self)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// Bytes per second: a size (at least 1 byte), or `"off"` (`None`).
#[derive(Debug, Clone, Copy)]
struct RateSize(Option<usize>);

impl<'de> Deserialize<'de> for RateSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = RateSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"a size per second like "1MiB" (at least 1 byte), or "off""#)
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<RateSize, E> {
                match usize::try_from(n) {
                    Ok(n) if n >= 1 => Ok(RateSize(Some(n))),
                    _ => Err(E::invalid_value(Unexpected::Signed(n), &self)),
                }
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<RateSize, E> {
                if s.trim() == "off" {
                    return Ok(RateSize(None));
                }
                match parse_size(s.trim().trim_end_matches("/s")) {
                    Some(n) if n >= 1 => Ok(RateSize(Some(n))),
                    _ => Err(E::invalid_value(Unexpected::Str(s), &self)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for CpuBudget {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = CpuBudget;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    r#"guest time per period like "200ms/s" or "2s/10s" (the time at most the period)"#,
                )
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<CpuBudget, E> {
                let parsed = s.split_once('/').and_then(|(time, period)| {
                    let period = match period.trim() {
                        "s" => Some(Duration::from_secs(1)),
                        "m" => Some(Duration::from_secs(60)),
                        other => parse_duration(other).flatten(),
                    }?;
                    let time = parse_duration(time).flatten()?;
                    (time <= period).then_some(CpuBudget { time, period })
                });
                parsed.ok_or_else(|| E::invalid_value(Unexpected::Str(s), &self))
            }
        }
        d.deserialize_any(V)
    }
}

/// A string, described by what it is for.
struct Text(&'static str);

impl Visitor<'_> for Text {
    type Value = String;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<String, E> {
        Ok(s.to_owned())
    }
}

/// A list of strings, described by an example.
struct TextList(&'static str);

impl<'de> Visitor<'de> for TextList {
    type Value = Vec<String>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
        let mut items = Vec::new();
        loop {
            match seq.next_element::<String>() {
                Ok(Some(s)) => items.push(s),
                Ok(None) => return Ok(items),
                Err(e) => {
                    return Err(de::Error::custom(format_args!(
                        "item {}: {e}",
                        items.len() + 1
                    )))
                }
            }
        }
    }
}

/// One of a few fixed strings.
struct Choice<T: 'static> {
    expecting: &'static str,
    choices: &'static [(&'static str, T)],
}

impl<T: Copy> Visitor<'_> for Choice<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<T, E> {
        match self.choices.iter().find(|(name, _)| *name == s) {
            Some((_, v)) => Ok(*v),
            None => Err(E::invalid_value(Unexpected::Str(s), &self)),
        }
    }
}

/// What a value was, in an error message: "found a boolean".
struct Found<'a>(Unexpected<'a>);

impl fmt::Display for Found<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Unexpected::Bool(_) => f.write_str("a boolean"),
            Unexpected::Unsigned(n) => write!(f, "the number {n}"),
            Unexpected::Signed(n) => write!(f, "the number {n}"),
            Unexpected::Float(x) => write!(f, "the number {x:?}"),
            Unexpected::Str(s) => write!(f, "the string {s:?}"),
            Unexpected::Char(c) => write!(f, "the character {c:?}"),
            Unexpected::Seq => f.write_str("a list"),
            Unexpected::Map => f.write_str("a table"),
            Unexpected::Other(what) => f.write_str(what),
            ref other => write!(f, "{other}"),
        }
    }
}

/// What is wrong with one value: "expected ..., found ...". The caller
/// prefixes the key.
#[derive(Debug)]
struct ValueError(String);

impl fmt::Display for ValueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ValueError {}

impl de::Error for ValueError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        ValueError(msg.to_string())
    }
    fn invalid_type(unexp: Unexpected<'_>, exp: &dyn Expected) -> Self {
        ValueError(format!("expected {exp}, found {}", Found(unexp)))
    }
    fn invalid_value(unexp: Unexpected<'_>, exp: &dyn Expected) -> Self {
        ValueError(format!("expected {exp}, found {}", Found(unexp)))
    }
}

/// What a TOML value is, for [`Found`].
fn unexpected<'a>(v: &'a DeValue<'_>) -> Unexpected<'a> {
    match v {
        DeValue::String(s) => Unexpected::Str(s),
        DeValue::Integer(i) => match i64::from_str_radix(i.as_str(), i.radix()) {
            Ok(n) => Unexpected::Signed(n),
            Err(_) => Unexpected::Other("a number"),
        },
        DeValue::Float(x) => Unexpected::Float(x.as_str().parse().unwrap_or(f64::NAN)),
        DeValue::Boolean(b) => Unexpected::Bool(*b),
        DeValue::Datetime(_) => Unexpected::Other("a date"),
        DeValue::Array(_) => Unexpected::Seq,
        DeValue::Table(_) => Unexpected::Map,
    }
}

/// Hands one TOML value to a visitor, with [`ValueError`] as its error.
struct ValueDe<'a, 'i>(&'a DeValue<'i>);

impl<'de> Deserializer<'de> for ValueDe<'_, '_> {
    type Error = ValueError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        match self.0 {
            DeValue::String(s) => visitor.visit_str(s),
            DeValue::Integer(i) => match i64::from_str_radix(i.as_str(), i.radix()) {
                Ok(n) => visitor.visit_i64(n),
                Err(_) => Err(de::Error::invalid_type(unexpected(self.0), &visitor)),
            },
            DeValue::Float(x) => visitor.visit_f64(x.as_str().parse().unwrap_or(f64::NAN)),
            DeValue::Boolean(b) => visitor.visit_bool(*b),
            DeValue::Array(items) => visitor.visit_seq(Items(items.iter())),
            DeValue::Datetime(_) | DeValue::Table(_) => {
                Err(de::Error::invalid_type(unexpected(self.0), &visitor))
            }
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        visitor.visit_some(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct newtype_struct seq tuple tuple_struct
        map struct enum identifier ignored_any
    }
}

/// The items of a TOML array, for `visit_seq`.
struct Items<'a, 'i>(std::slice::Iter<'a, Spanned<DeValue<'i>>>);

impl<'de> SeqAccess<'de> for Items<'_, '_> {
    type Error = ValueError;

    fn next_element_seed<T: de::DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, ValueError> {
        self.0
            .next()
            .map(|v| seed.deserialize(ValueDe(v.get_ref())))
            .transpose()
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.0.len())
    }
}

// ---------------------------------------------------------------------------
// Tables: every key checked on its own, every error kept.

/// The limit keys allowed both in `[server]` (defaults) and in `[[route]]`
/// (overrides).
const LIMIT_KEYS: &[&str] = &[
    "max_frame_size",
    "max_message_size",
    "max_outbound_buffer",
    "slow_consumer",
    "idle_timeout",
    "ping_interval",
    "pong_timeout",
    "close_timeout",
    "max_connections",
    "max_messages_per_second",
    "max_bytes_per_second",
    "rate_exceeded",
    "max_sends_per_second",
    "max_broadcast_deliveries_per_second",
    "max_timers_per_second",
    "max_log_lines_per_second",
    "max_timers",
    "max_rooms_per_connection",
    "max_room_members",
    "max_metadata_entries",
    "max_metadata_bytes",
];

/// The keys of a `[[tenant]]` besides its routes: its name, hosts and
/// quotas (totals over the tenant).
const TENANT_KEYS: &[&str] = &[
    "name",
    "hosts",
    "tls",
    "route",
    "static",
    "max_connections",
    "max_connections_per_second",
    "max_instances",
    "max_memory_total",
    "max_open_files",
    "cpu_budget",
    "max_sends_per_second",
    "max_broadcast_deliveries_per_second",
    "max_timers_per_second",
    "max_log_lines_per_second",
];

/// The keys of `[server]` besides the limits.
const SERVER_KEYS: &[&str] = &[
    "listen",
    "handshake_timeout",
    "max_header_size",
    "drain_timeout",
    "threads",
    "tls",
];

/// The keys of `[sandbox]`.
const SANDBOX_KEYS: &[&str] = &["max_memory", "max_call_time"];

/// The keys of `[[route]]` besides the limits.
const ROUTE_KEYS: &[&str] = &[
    "path",
    "plugin",
    "config",
    "allowed_origins",
    "subprotocols",
    "deliver",
    "on_reload",
    "isolation",
    "hibernate_after",
    "env",
    "dirs",
    "max_open_files",
    "compression",
    "compression_min_size",
    "compression_level",
    "compression_context_takeover",
];

/// Messages shorter than this are sent uncompressed by default: below it
/// the DEFLATE block overhead and the CPU cost outweigh the bytes saved.
pub const DEFAULT_COMPRESSION_MIN_SIZE: usize = 64;

/// The smallest `max_header_size`: the documented minimum.
const MIN_HEADER_SIZE: usize = 8 << 10;
/// The smallest `max_memory`: one WebAssembly page.
const MIN_MEMORY: usize = 64 << 10;
/// The largest `max_memory`: all a 32-bit linear memory can address.
const MAX_MEMORY: usize = 4 << 30;

/// The limit keys as written (in `[server]` or one `[[route]]`).
#[derive(Debug, Default)]
struct RawLimits {
    max_frame_size: Option<usize>,
    max_message_size: Option<usize>,
    max_outbound_buffer: Option<usize>,
    slow_consumer: Option<SlowConsumer>,
    idle_timeout: Option<Option<Duration>>,
    ping_interval: Option<Option<Duration>>,
    pong_timeout: Option<Duration>,
    close_timeout: Option<Duration>,
    max_connections: Option<usize>,
    max_messages_per_second: Option<Option<u32>>,
    max_bytes_per_second: Option<Option<usize>>,
    rate_exceeded: Option<RateExceeded>,
    max_sends_per_second: Option<Option<u32>>,
    max_broadcast_deliveries_per_second: Option<Option<u32>>,
    max_timers_per_second: Option<Option<u32>>,
    max_log_lines_per_second: Option<Option<u32>>,
    max_timers: Option<usize>,
    max_rooms_per_connection: Option<usize>,
    max_room_members: Option<usize>,
    max_metadata_entries: Option<usize>,
    max_metadata_bytes: Option<usize>,
}

impl RawLimits {
    /// Checks `key` if it is a limit key and keeps its value; false if it is
    /// not one.
    fn set(&mut self, p: &mut Parser<'_>, key: &str, at: usize, v: &DeValue<'_>) -> bool {
        match key {
            "max_frame_size" => self.max_frame_size = p.size(key, at, v, 1, usize::MAX),
            "max_message_size" => self.max_message_size = p.size(key, at, v, 1, usize::MAX),
            "max_outbound_buffer" => {
                self.max_outbound_buffer = p.size(key, at, v, 1, usize::MAX);
            }
            "slow_consumer" => self.slow_consumer = p.value(key, at, v),
            "idle_timeout" => self.idle_timeout = p.value::<Timeout>(key, at, v).map(|t| t.0),
            "ping_interval" => self.ping_interval = p.value::<Timeout>(key, at, v).map(|t| t.0),
            "pong_timeout" => self.pong_timeout = p.value::<Period>(key, at, v).map(|t| t.0),
            "close_timeout" => self.close_timeout = p.value::<Period>(key, at, v).map(|t| t.0),
            "max_connections" => self.max_connections = p.count(key, at, v, 1),
            "max_messages_per_second" => self.max_messages_per_second = p.rate(key, at, v),
            "max_bytes_per_second" => {
                self.max_bytes_per_second = p.value::<RateSize>(key, at, v).map(|r| r.0)
            }
            "rate_exceeded" => self.rate_exceeded = p.value(key, at, v),
            "max_sends_per_second" => self.max_sends_per_second = p.rate(key, at, v),
            "max_broadcast_deliveries_per_second" => {
                self.max_broadcast_deliveries_per_second = p.rate(key, at, v)
            }
            "max_timers_per_second" => self.max_timers_per_second = p.rate(key, at, v),
            "max_log_lines_per_second" => self.max_log_lines_per_second = p.rate(key, at, v),
            "max_timers" => self.max_timers = p.count(key, at, v, 0),
            "max_rooms_per_connection" => self.max_rooms_per_connection = p.count(key, at, v, 0),
            "max_room_members" => self.max_room_members = p.count(key, at, v, 1),
            "max_metadata_entries" => self.max_metadata_entries = p.count(key, at, v, 0),
            "max_metadata_bytes" => {
                self.max_metadata_bytes = p.size(key, at, v, 0, usize::MAX);
            }
            _ => return false,
        }
        true
    }

    /// `base` overridden by the keys given here.
    fn over(&self, base: &Limits) -> Limits {
        Limits {
            max_frame_size: self.max_frame_size.unwrap_or(base.max_frame_size),
            max_message_size: self.max_message_size.unwrap_or(base.max_message_size),
            max_outbound_buffer: self.max_outbound_buffer.unwrap_or(base.max_outbound_buffer),
            slow_consumer: self.slow_consumer.unwrap_or(base.slow_consumer),
            idle_timeout: self.idle_timeout.unwrap_or(base.idle_timeout),
            ping_interval: self.ping_interval.unwrap_or(base.ping_interval),
            pong_timeout: self.pong_timeout.unwrap_or(base.pong_timeout),
            close_timeout: self.close_timeout.unwrap_or(base.close_timeout),
            max_messages_per_second: self
                .max_messages_per_second
                .unwrap_or(base.max_messages_per_second),
            max_bytes_per_second: self
                .max_bytes_per_second
                .unwrap_or(base.max_bytes_per_second),
            rate_exceeded: self.rate_exceeded.unwrap_or(base.rate_exceeded),
            max_sends_per_second: self
                .max_sends_per_second
                .unwrap_or(base.max_sends_per_second),
            max_broadcast_deliveries_per_second: self
                .max_broadcast_deliveries_per_second
                .unwrap_or(base.max_broadcast_deliveries_per_second),
            max_timers_per_second: self
                .max_timers_per_second
                .unwrap_or(base.max_timers_per_second),
            max_log_lines_per_second: self
                .max_log_lines_per_second
                .unwrap_or(base.max_log_lines_per_second),
            max_timers: self.max_timers.unwrap_or(base.max_timers),
            max_rooms_per_connection: self
                .max_rooms_per_connection
                .unwrap_or(base.max_rooms_per_connection),
            max_room_members: self.max_room_members.unwrap_or(base.max_room_members),
            max_metadata_entries: self
                .max_metadata_entries
                .unwrap_or(base.max_metadata_entries),
            max_metadata_bytes: self.max_metadata_bytes.unwrap_or(base.max_metadata_bytes),
        }
    }
}

/// `[server]` as written.
#[derive(Debug, Default)]
struct RawServer {
    limits: RawLimits,
    listen: Option<(ListenAddr, usize)>,
    handshake_timeout: Option<Duration>,
    max_header_size: Option<usize>,
    drain_timeout: Option<Duration>,
    threads: Option<usize>,
    tls: Option<RawTls>,
}

/// A `tls = { cert, key }` as written, with the offset of its key.
#[derive(Debug)]
struct RawTls {
    cert: String,
    key: String,
    at: usize,
}

/// `[sandbox]` as written.
#[derive(Debug, Default)]
struct RawSandbox {
    max_memory: Option<usize>,
    max_call_time: Option<Duration>,
}

/// One `[[route]]` as written.
#[derive(Debug, Default)]
struct RawRoute {
    limits: RawLimits,
    /// The path and the offset of its key.
    path: Option<(String, usize)>,
    /// Whether a `path` key is there (perhaps with a bad value).
    has_path: bool,
    /// The plugin and the offset of its key.
    plugin: Option<(String, usize)>,
    /// Whether a `plugin` key is there (perhaps with a bad value).
    has_plugin: bool,
    config: BTreeMap<String, String>,
    allowed_origins: Option<Vec<String>>,
    subprotocols: Option<Vec<String>>,
    deliver: Option<Deliver>,
    on_reload: Option<OnReload>,
    isolation: Option<Isolation>,
    hibernate_after: Option<Option<Duration>>,
    env: Vec<EnvGrant>,
    dirs: Vec<DirGrant>,
    /// Whether a `dirs` key is there (perhaps with a bad value, already
    /// reported).
    has_dirs: bool,
    /// The value and the offset of its key.
    max_open_files: Option<(usize, usize)>,
    compression: Option<bool>,
    compression_min_size: Option<usize>,
    compression_level: Option<usize>,
    compression_context_takeover: Option<bool>,
}

/// One `[[tenant]]` as written.
#[derive(Debug, Default)]
struct RawTenant {
    name: Option<String>,
    /// Whether a `name` key is there (perhaps with a bad value).
    has_name: bool,
    /// Whether a `hosts` key is there (perhaps with bad values).
    has_hosts: bool,
    /// Whether a `hosts` value was refused (already reported).
    bad_hosts: bool,
    hosts: Vec<(String, usize)>,
    quotas: TenantQuotas,
    tls: Option<RawTls>,
    routes: Vec<(usize, RawRoute)>,
    statics: Vec<(usize, RawStatic)>,
}

/// A `[[static]]` table as written.
#[derive(Debug, Default)]
struct RawStatic {
    path: Option<(String, usize)>,
    dir: Option<(String, usize)>,
    index: Option<String>,
    /// Whether `path` and `dir` keys are there (perhaps with bad values,
    /// already reported).
    has_path: bool,
    has_dir: bool,
    /// How the table is written, for errors: `[[static]]` or
    /// `[[tenant.static]]`.
    name: &'static str,
}

/// The keys of a `[[static]]` table.
const STATIC_KEYS: &[&str] = &["path", "dir", "index"];

/// The entries of a table in file order: key, the key's offset, value.
fn entries<'a, 'i>(t: &'a DeTable<'i>) -> Vec<(&'a str, usize, &'a DeValue<'i>)> {
    let mut v: Vec<_> = t
        .iter()
        .map(|(k, v)| (k.get_ref().as_ref(), k.span().start, v.get_ref()))
        .collect();
    v.sort_by_key(|&(_, at, _)| at);
    v
}

/// The 1-based line of byte offset `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    text.as_bytes()[..at.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The number of single-character edits between `a` and `b`.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, &cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// A TOML syntax error's message, starting with the key (or table header)
/// written on its line when there is one.
fn syntax_message(text: &str, at: usize, message: &str) -> String {
    let bytes = text.as_bytes();
    let at = at.min(bytes.len());
    let start = bytes[..at]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let end = bytes[start..]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(bytes.len(), |i| start + i);
    // Both ends are at a newline or an end of the text: char boundaries.
    let line = text.get(start..end).unwrap_or_default().trim();
    if line.starts_with('[') {
        if let Some(close) = line.rfind(']') {
            return format!("{}: {message}", &line[..=close]);
        }
        return message.to_owned();
    }
    let key_len = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || "_-.\"'".contains(c)))
        .unwrap_or(line.len());
    let (key, rest) = line.split_at(key_len);
    if !key.is_empty() && (rest.trim_start().starts_with('=') || message.contains("`=`")) {
        format!("{key}: {message}")
    } else {
        message.to_owned()
    }
}

/// Checks a config's tables and keys, collecting every error.
struct Parser<'a> {
    text: &'a str,
    file: &'a Path,
    errors: Vec<Error>,
}

impl Parser<'_> {
    fn error(&mut self, at: usize, message: String) {
        self.errors.push(Error::Config {
            file: self.file.to_owned(),
            line: line_of(self.text, at),
            message,
        });
    }

    /// `v` as a `T`, or an error naming `key` (and `None`).
    fn value<T: for<'de> Deserialize<'de>>(
        &mut self,
        key: &str,
        at: usize,
        v: &DeValue<'_>,
    ) -> Option<T> {
        self.visit(key, at, T::deserialize(ValueDe(v)))
    }

    /// The result of a visitor on `key`'s value: an error names `key`.
    fn visit<T>(&mut self, key: &str, at: usize, r: Result<T, ValueError>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.error(at, format!("{key}: {e}"));
                None
            }
        }
    }

    /// A size within `min..=max` bytes.
    fn size(
        &mut self,
        key: &str,
        at: usize,
        v: &DeValue<'_>,
        min: usize,
        max: usize,
    ) -> Option<usize> {
        let n = self.value::<Size>(key, at, v)?.0;
        if (min..=max).contains(&n) {
            return Some(n);
        }
        let bounds = if max == usize::MAX {
            format!("at least {}", fmt_size(min))
        } else {
            format!("between {} and {}", fmt_size(min), fmt_size(max))
        };
        self.error(
            at,
            format!("{key}: must be {bounds}, found {}", fmt_size(n)),
        );
        None
    }

    /// A per-second rate, or `"off"`.
    fn rate(&mut self, key: &str, at: usize, v: &DeValue<'_>) -> Option<Option<u32>> {
        self.value::<Rate>(key, at, v).map(|r| r.0)
    }

    /// A whole number of at least `min`.
    fn count(&mut self, key: &str, at: usize, v: &DeValue<'_>, min: usize) -> Option<usize> {
        let n = self.value::<Count>(key, at, v)?.0;
        if n < min {
            self.error(at, format!("{key}: must be at least {min}, found {n}"));
            return None;
        }
        Some(n)
    }

    /// `v` as a table (for `[name]`), or an error.
    fn table<'a, 'i>(
        &mut self,
        key: &str,
        at: usize,
        v: &'a DeValue<'i>,
        expected: &str,
    ) -> Option<&'a DeTable<'i>> {
        match v {
            DeValue::Table(t) => Some(t),
            other => {
                let e: ValueError = de::Error::invalid_type(unexpected(other), &expected);
                self.error(at, format!("{key}: {e}"));
                None
            }
        }
    }

    /// The `[cluster]` table at `at`; `None` (and errors) if it is not
    /// usable.
    fn cluster(&mut self, t: &DeTable<'_>, at: usize) -> Option<ClusterSettings> {
        let mut redis: Option<String> = None;
        let mut node_id = None;
        let mut namespace = "wasmgate".to_owned();
        let mut heartbeat = (Duration::from_secs(1), at);
        let mut node_timeout = (Duration::from_secs(5), at);
        let mut ok = true;
        for (k, k_at, v) in entries(t) {
            match k {
                "redis" => {
                    let url =
                        self.visit(k, k_at, ValueDe(v).deserialize_any(Text("a redis:// URL")));
                    // URL schemes are case-insensitive (RFC 3986, 3.1).
                    let url = url.map(|u: String| match u.split_once("://") {
                        Some((scheme, rest)) => format!("{}://{rest}", scheme.to_ascii_lowercase()),
                        None => u,
                    });
                    match url {
                        Some(u)
                            if u.starts_with("redis://") || u.starts_with("redis-cluster://") =>
                        {
                            match check_redis_url(&u) {
                                Ok(()) => redis = Some(u),
                                Err(why) => {
                                    ok = false;
                                    self.error(k_at, format!("redis: {:?}: {why}", redact_url(&u)));
                                }
                            }
                        }
                        Some(u)
                            if u.starts_with("rediss://") || u.starts_with("rediss-cluster://") =>
                        {
                            ok = false;
                            self.error(
                                k_at,
                                format!(
                                    "redis: {:?}: TLS to Redis (rediss://) is not supported; \
                                     use redis:// on a private network or through a TLS tunnel",
                                    redact_url(&u)
                                ),
                            );
                        }
                        Some(u) => {
                            ok = false;
                            self.error(
                                k_at,
                                format!(
                                    r#"redis: {:?} is not a Redis URL: expected redis://host:port, for example "redis://127.0.0.1:6379", or redis-cluster://host:port for a Redis Cluster"#,
                                    redact_url(&u)
                                ),
                            );
                        }
                        None => ok = false,
                    }
                }
                "node_id" | "namespace" => {
                    let what = if k == "node_id" {
                        "a node name"
                    } else {
                        "a key prefix"
                    };
                    match self.visit(k, k_at, ValueDe(v).deserialize_any(Text(what))) {
                        Some(n)
                            if !n.is_empty()
                                && n.len() <= 64
                                && n.chars().all(|c| {
                                    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
                                }) =>
                        {
                            if k == "node_id" {
                                node_id = Some(n);
                            } else {
                                namespace = n;
                            }
                        }
                        Some(n) => {
                            ok = false;
                            self.error(
                                k_at,
                                format!("{k}: {n:?}: use 1 to 64 letters, digits, `-`, `_` or `.`"),
                            );
                        }
                        None => ok = false,
                    }
                }
                "heartbeat" => match self.value::<Period>(k, k_at, v) {
                    Some(d) => heartbeat = (d.0, k_at),
                    None => ok = false,
                },
                "node_timeout" => match self.value::<Period>(k, k_at, v) {
                    Some(d) => node_timeout = (d.0, k_at),
                    None => ok = false,
                },
                _ => self.unknown(
                    k,
                    k_at,
                    "[cluster]",
                    &[&["redis", "node_id", "namespace", "heartbeat", "node_timeout"]],
                ),
            }
        }
        if heartbeat.0 < Duration::from_millis(100) {
            ok = false;
            self.error(
                heartbeat.1,
                format!(
                    "heartbeat: must be at least 100ms, found {}ms",
                    heartbeat.0.as_millis()
                ),
            );
        }
        if node_timeout.0 < heartbeat.0 * 2 {
            ok = false;
            // `node_timeout` not in the file: the default.
            let default = node_timeout.1 == at;
            let (line, message) = if default {
                (
                    heartbeat.1,
                    format!(
                        "heartbeat: {}ms needs a node_timeout of at least twice that, and the \
                         default node_timeout is 5s: set node_timeout = \"{}ms\" or more",
                        heartbeat.0.as_millis(),
                        heartbeat.0.as_millis() * 2
                    ),
                )
            } else {
                (
                    node_timeout.1,
                    format!(
                        "node_timeout: {}ms is less than twice the heartbeat ({}ms): one late \
                         heartbeat would drop a live node's members",
                        node_timeout.0.as_millis(),
                        heartbeat.0.as_millis()
                    ),
                )
            };
            self.error(line, message);
        }
        let Some(redis) = redis else {
            if ok {
                self.error(
                    at,
                    r#"cluster: `redis` is missing: [cluster] needs redis = "redis://127.0.0.1:6379""#
                        .into(),
                );
            }
            return None;
        };
        ok.then(|| ClusterSettings {
            redis,
            node_id,
            namespace,
            heartbeat: heartbeat.0,
            node_timeout: node_timeout.0,
            origin: format!(
                "{}:{}: [cluster]",
                self.file.display(),
                line_of(self.text, at)
            ),
        })
    }

    /// An unknown key in `table`: suggest the closest known key, or list them.
    fn unknown(&mut self, key: &str, at: usize, table: &str, known: &[&[&str]]) {
        let all: Vec<&str> = known.iter().flat_map(|k| k.iter().copied()).collect();
        let closest = all
            .iter()
            .map(|k| (edit_distance(key, k), *k))
            .min()
            .filter(|&(d, _)| d <= 2 && d < key.len());
        let message = match closest {
            Some((_, k)) => format!("{key}: unknown key in {table}; did you mean `{k}`?"),
            None => {
                let list: Vec<String> = all.iter().map(|k| format!("`{k}`")).collect();
                format!(
                    "{key}: unknown key in {table}; expected one of {}",
                    list.join(", ")
                )
            }
        };
        self.error(at, message);
    }

    fn server(&mut self, t: &DeTable<'_>) -> RawServer {
        let mut s = RawServer::default();
        for (key, at, v) in entries(t) {
            if s.limits.set(self, key, at, v) {
                continue;
            }
            match key {
                "listen" => s.listen = self.value(key, at, v).map(|l| (l, at)),
                "handshake_timeout" => {
                    s.handshake_timeout = self.value::<Period>(key, at, v).map(|d| d.0)
                }
                "max_header_size" => {
                    s.max_header_size = self.size(key, at, v, MIN_HEADER_SIZE, usize::MAX);
                }
                "drain_timeout" => s.drain_timeout = self.value::<Period>(key, at, v).map(|d| d.0),
                "threads" => s.threads = self.count(key, at, v, 0),
                "tls" => s.tls = self.tls(key, at, v),
                _ => self.unknown(key, at, "[server]", &[SERVER_KEYS, LIMIT_KEYS]),
            }
        }
        s
    }

    fn sandbox(&mut self, t: &DeTable<'_>) -> RawSandbox {
        let mut s = RawSandbox::default();
        for (key, at, v) in entries(t) {
            match key {
                "max_memory" => s.max_memory = self.size(key, at, v, MIN_MEMORY, MAX_MEMORY),
                "max_call_time" => s.max_call_time = self.value::<Period>(key, at, v).map(|d| d.0),
                _ => self.unknown(key, at, "[sandbox]", &[SANDBOX_KEYS]),
            }
        }
        s
    }

    fn route(&mut self, t: &DeTable<'_>) -> RawRoute {
        self.route_in(t, "[[route]]")
    }

    /// A route table, named `table` in errors.
    fn route_in(&mut self, t: &DeTable<'_>, table: &str) -> RawRoute {
        let mut r = RawRoute::default();
        for (key, at, v) in entries(t) {
            if r.limits.set(self, key, at, v) {
                continue;
            }
            match key {
                "path" => {
                    r.has_path = true;
                    let path = ValueDe(v).deserialize_any(Text(r#"a path such as "/chat""#));
                    r.path = self
                        .visit(key, at, path)
                        .and_then(|p| match check_path(&p) {
                            Ok(()) => Some((p, at)),
                            Err(why) => {
                                self.error(at, format!("path: {why}"));
                                None
                            }
                        });
                }
                "plugin" => {
                    r.has_plugin = true;
                    let plugin = ValueDe(v)
                        .deserialize_any(Text(r#"a component file or "builtin:<name>""#))
                        .and_then(|p| {
                            if p.is_empty() {
                                Err(de::Error::invalid_value(
                                    Unexpected::Str(&p),
                                    &r#"a component file or "builtin:<name>""#,
                                ))
                            } else {
                                Ok(p)
                            }
                        });
                    r.plugin = self.visit(key, at, plugin).map(|p| (p, at));
                }
                "config" => {
                    let Some(table) = self.table(key, at, v, "a table of strings ([route.config])")
                    else {
                        continue;
                    };
                    for (name, at, v) in entries(table) {
                        let value = ValueDe(v).deserialize_any(Text(
                            "a string (the plugin reads [route.config] values as text)",
                        ));
                        if let Some(value) = self.visit(&format!("config.{name}"), at, value) {
                            r.config.insert(name.to_owned(), value);
                        }
                    }
                }
                "allowed_origins" => {
                    let list = ValueDe(v).deserialize_any(TextList(
                        r#"a list of origins like ["https://example.com"]"#,
                    ));
                    r.allowed_origins = self.visit(key, at, list);
                }
                "subprotocols" => {
                    let list = ValueDe(v)
                        .deserialize_any(TextList(r#"a list of subprotocols like ["chat.v1"]"#));
                    r.subprotocols = self.visit(key, at, list);
                }
                "deliver" => r.deliver = self.value(key, at, v),
                "on_reload" => r.on_reload = self.value(key, at, v),
                "isolation" => r.isolation = self.value(key, at, v),
                "hibernate_after" => {
                    r.hibernate_after = self.value::<Timeout>(key, at, v).map(|t| t.0)
                }
                "env" => r.env = self.env(key, at, v),
                "dirs" => {
                    r.has_dirs = true;
                    r.dirs = self.dirs(key, at, v);
                }
                "max_open_files" => r.max_open_files = self.count(key, at, v, 1).map(|n| (n, at)),
                "compression" => r.compression = self.value::<OnOff>(key, at, v).map(|o| o.0),
                "compression_min_size" => {
                    r.compression_min_size = self.size(key, at, v, 0, usize::MAX)
                }
                "compression_level" => {
                    r.compression_level = self.count(key, at, v, 1).and_then(|n| {
                        if n > 9 {
                            self.error(
                                at,
                                format!("{key}: must be 1 (fastest) to 9 (smallest), found {n}"),
                            );
                            None
                        } else {
                            Some(n)
                        }
                    })
                }
                "compression_context_takeover" => {
                    r.compression_context_takeover = self.value::<bool>(key, at, v)
                }
                _ => self.unknown(key, at, table, &[ROUTE_KEYS, LIMIT_KEYS]),
            }
        }
        r
    }
}

impl Parser<'_> {
    /// `env = ["KEY", "KEY=value"]`: names passed from the gateway's
    /// environment, or literal values.
    fn env(&mut self, key: &str, at: usize, v: &DeValue<'_>) -> Vec<EnvGrant> {
        let list = ValueDe(v).deserialize_any(TextList(
            r#"a list of variables like ["API_URL", "MODE=production"]"#,
        ));
        let Some(list) = self.visit(key, at, list) else {
            return Vec::new();
        };
        let mut grants: Vec<EnvGrant> = Vec::new();
        for item in list {
            let (name, value) = match item.split_once('=') {
                Some((k, v)) => (k.to_owned(), Some(v.to_owned())),
                None => (item.clone(), None),
            };
            let valid = !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !name.starts_with(|c: char| c.is_ascii_digit());
            if !valid {
                self.error(
                    at,
                    format!("{key}: {item:?} is not a variable name (letters, digits and '_') or NAME=value"),
                );
            } else if grants.iter().any(|g| g.key == name) {
                self.error(at, format!("{key}: {name} is listed twice"));
            } else {
                grants.push(EnvGrant { key: name, value });
            }
        }
        grants
    }

    /// `tls = { cert = "chain.pem", key = "key.pem" }`: both paths, as
    /// written.
    fn tls(&mut self, key: &str, at: usize, v: &DeValue<'_>) -> Option<RawTls> {
        const FORM: &str = r#"a table like { cert = "chain.pem", key = "key.pem" }"#;
        let DeValue::Table(t) = v else {
            self.error(
                at,
                format!("{key}: expected {FORM}, found {}", Found(unexpected(v))),
            );
            return None;
        };
        let (mut cert, mut pem_key) = (None, None);
        let (mut has_cert, mut has_key) = (false, false);
        for (k, k_at, v) in entries(t) {
            let name = format!("{key}.{k}");
            let path = |p: &mut Self, what| {
                p.visit(&name, k_at, ValueDe(v).deserialize_any(Text(what)))
                    .filter(|s: &String| {
                        let ok = !s.is_empty();
                        if !ok {
                            p.error(k_at, format!("{name}: empty path"));
                        }
                        ok
                    })
            };
            match k {
                "cert" => {
                    has_cert = true;
                    cert = path(self, "the path of a PEM certificate chain");
                }
                "key" => {
                    has_key = true;
                    pem_key = path(self, "the path of a PEM private key");
                }
                _ => self.unknown(k, k_at, "a tls table", &[&["cert", "key"]]),
            }
        }
        match (cert, pem_key) {
            (Some(cert), Some(key)) => Some(RawTls { cert, key, at }),
            (None, _) if !has_cert => {
                self.error(at, format!("{key}: `cert` is missing: {FORM}"));
                None
            }
            (_, None) if !has_key => {
                self.error(at, format!("{key}: `key` is missing: {FORM}"));
                None
            }
            // A bad value, already reported.
            _ => None,
        }
    }

    /// `dirs = [{ host = "...", guest = "/data", read_only = true }]`.
    fn dirs(&mut self, key: &str, at: usize, v: &DeValue<'_>) -> Vec<DirGrant> {
        const FORM: &str =
            r#"a list of tables like [{ host = "data", guest = "/data", read_only = true }]"#;
        let DeValue::Array(items) = v else {
            self.error(
                at,
                format!("{key}: expected {FORM}, found {}", Found(unexpected(v))),
            );
            return Vec::new();
        };
        let mut grants: Vec<DirGrant> = Vec::new();
        for (n, item) in items.iter().enumerate() {
            let at = item.span().start;
            let DeValue::Table(t) = item.get_ref() else {
                self.error(
                    at,
                    format!(
                        "{key}: item {}: expected {FORM}, found {}",
                        n + 1,
                        Found(unexpected(item.get_ref()))
                    ),
                );
                continue;
            };
            let (mut host, mut guest, mut read_only) = (None, None, true);
            for (k, at, v) in entries(t) {
                let name = format!("{key}.{k}");
                match k {
                    "host" => {
                        host = self.visit(
                            &name,
                            at,
                            ValueDe(v).deserialize_any(Text("a directory path")),
                        )
                    }
                    "guest" => {
                        guest = self.visit(
                            &name,
                            at,
                            ValueDe(v).deserialize_any(Text(r#"an absolute path such as "/data""#)),
                        )
                    }
                    "read_only" => {
                        if let Some(b) = self.value::<bool>(&name, at, v) {
                            read_only = b;
                        }
                    }
                    _ => self.unknown(k, at, "a dirs entry", &[&["host", "guest", "read_only"]]),
                }
            }
            match (host, guest) {
                (Some(host), Some(guest)) => {
                    if !guest.starts_with('/') {
                        self.error(
                            at,
                            format!("{key}: guest path {guest:?} must start with '/'"),
                        );
                    } else if guest.split('/').any(|c| c == ".." || c == ".")
                        || guest.contains('\0')
                    {
                        self.error(
                            at,
                            format!("{key}: guest path {guest:?} may not contain '.', '..' or NUL"),
                        );
                    } else if grants.iter().any(|g| g.guest == guest) {
                        self.error(at, format!("{key}: guest path {guest:?} is granted twice"));
                    } else {
                        let host = PathBuf::from(host);
                        grants.push(DirGrant {
                            host,
                            guest,
                            read_only,
                        });
                    }
                }
                _ => self.error(
                    at,
                    format!("{key}: item {}: needs both `host` and `guest`", n + 1),
                ),
            }
        }
        grants
    }

    /// A route as it runs, from one `[[route]]` (or `[[tenant.route]]` of
    /// `tenant`) as written; `None` (with errors) if its path or plugin is
    /// unusable. `routed` holds the paths of the same tenant seen so far.
    fn build_route(
        &mut self,
        at: usize,
        r: RawRoute,
        tenant: Option<&str>,
        routed: &mut HashMap<String, usize>,
        dir: &Path,
        base: &Limits,
    ) -> Option<RouteSettings> {
        let path = match r.path {
            Some((path, path_at)) => match routed.get(&path) {
                Some(first) => {
                    self.error(
                        path_at,
                        format!("path: {path:?} is already routed (line {first})"),
                    );
                    None
                }
                None => {
                    routed.insert(path.clone(), line_of(self.text, path_at));
                    Some(path)
                }
            },
            None => {
                if !r.has_path {
                    self.error(
                        at,
                        r#"path: missing: every [[route]] needs one, such as path = "/chat""#
                            .to_owned(),
                    );
                }
                None
            }
        };
        if let (Some((_, key_at)), false) = (r.max_open_files, r.has_dirs) {
            self.error(
                key_at,
                "max_open_files: the route grants no `dirs`, and the bound is on the files \
                 its plugin opens in them"
                    .to_owned(),
            );
        }
        if r.plugin.is_none() && !r.has_plugin {
            let route = path
                .as_deref()
                .map_or(String::new(), |p| format!(" in route {p}"));
            self.error(
                at,
                format!(
                    "plugin: missing{route}: every [[route]] needs a component file or \"builtin:<name>\""
                ),
            );
        }
        let (Some(path), Some((plugin, plugin_at))) = (path, r.plugin) else {
            return None;
        };
        let resolve = |f: &Path| {
            if f.is_absolute() {
                f.to_owned()
            } else {
                dir.join(f)
            }
        };
        let source = match plugin.strip_prefix("builtin:") {
            Some(name) => PluginSource::Builtin(name.to_owned()),
            None => PluginSource::File(resolve(Path::new(&plugin))),
        };
        let dirs = r
            .dirs
            .into_iter()
            .map(|d| DirGrant {
                host: resolve(&d.host),
                ..d
            })
            .collect();
        Some(RouteSettings {
            path,
            plugin: source,
            line: line_of(self.text, plugin_at),
            config: r.config,
            limits: r.limits.over(base),
            allowed_origins: r.allowed_origins,
            subprotocols: r.subprotocols,
            max_connections: r.limits.max_connections,
            deliver: r.deliver.unwrap_or(Deliver::Message),
            on_reload: r.on_reload.unwrap_or(OnReload::Keep),
            isolation: r.isolation.unwrap_or(Isolation::Connection),
            hibernate_after: r.hibernate_after.flatten(),
            tenant: tenant.map(str::to_owned),
            env: r.env,
            dirs,
            max_open_files: r.max_open_files.map(|(n, _)| n),
            compression: r.compression.unwrap_or(false).then(|| {
                crate::protocol::deflate::DeflateSettings {
                    min_size: r
                        .compression_min_size
                        .unwrap_or(DEFAULT_COMPRESSION_MIN_SIZE),
                    context_takeover: r.compression_context_takeover.unwrap_or(false),
                    level: r.compression_level.unwrap_or(1) as u32,
                }
            }),
        })
    }

    /// The tables of an array of tables such as `[[static]]` (`name`, for
    /// errors), each with its offset; other values are reported.
    fn tables<'a, 'i>(
        &mut self,
        key: &str,
        at: usize,
        v: &'a DeValue<'i>,
        name: &str,
    ) -> Vec<(usize, &'a DeTable<'i>)> {
        let DeValue::Array(items) = v else {
            self.error(
                at,
                format!(
                    "{key}: expected one {name} table each (double brackets), found {}",
                    Found(unexpected(v))
                ),
            );
            return Vec::new();
        };
        let mut out = Vec::new();
        for item in items.iter() {
            let at = item.span().start;
            match item.get_ref() {
                DeValue::Table(t) => out.push((at, t)),
                other => self.error(
                    at,
                    format!(
                        "{key}: expected a {name} table, found {}",
                        Found(unexpected(other))
                    ),
                ),
            }
        }
        out
    }

    /// A `[[static]]` table (`name` is how it is written, for errors).
    fn static_mount(&mut self, t: &DeTable<'_>, name: &'static str) -> RawStatic {
        let mut r = RawStatic {
            name,
            ..RawStatic::default()
        };
        for (key, at, v) in entries(t) {
            match key {
                "path" => {
                    r.has_path = true;
                    let path =
                        ValueDe(v).deserialize_any(Text(r#"a URL path such as "/" or "/docs""#));
                    if let Some(path) = self.visit(key, at, path) {
                        match check_static_path(&path) {
                            Ok(p) => r.path = Some((p, at)),
                            Err(why) => self.error(at, format!("path: {path:?}: {why}")),
                        }
                    }
                }
                "dir" => {
                    r.has_dir = true;
                    let dir = ValueDe(v)
                        .deserialize_any(Text(r#"a folder such as "public", or "builtin:demo""#));
                    r.dir = self.visit(key, at, dir).map(|d| (d, at));
                }
                "index" => {
                    let index =
                        ValueDe(v).deserialize_any(Text(r#"a file name such as "index.html""#));
                    if let Some(index) = self.visit(key, at, index) {
                        if index.is_empty() || index.contains('/') || index.starts_with('.') {
                            self.error(
                                at,
                                format!("index: {index:?} must be a file name, without '/', not starting with '.'"),
                            );
                        } else {
                            r.index = Some(index);
                        }
                    }
                }
                _ => self.unknown(key, at, name, &[STATIC_KEYS]),
            }
        }
        r
    }

    /// A static mount from its raw table at `at`, for `tenant`; `None`
    /// (with errors) if it is incomplete, its folder is missing, or its
    /// path is mounted already (`mounted`: path to line, per tenant).
    fn build_static(
        &mut self,
        at: usize,
        r: RawStatic,
        tenant: Option<&str>,
        mounted: &mut HashMap<String, usize>,
        dir: &Path,
    ) -> Option<StaticSettings> {
        let line = line_of(self.text, at);
        let name = r.name;
        if !r.has_path {
            self.error(
                at,
                format!(r#"path: missing: every {name} needs a URL path such as path = "/""#),
            );
        }
        if !r.has_dir {
            self.error(
                at,
                format!(r#"dir: missing: every {name} needs a folder such as dir = "public""#),
            );
        }
        let (Some((path, path_at)), Some((folder, dir_at))) = (r.path, r.dir) else {
            return None;
        };
        if let Some(first) = mounted.insert(path.clone(), line) {
            self.error(
                path_at,
                format!("path: {path:?} is already served by the {name} at line {first}"),
            );
            return None;
        }
        if folder.is_empty() {
            self.error(
                dir_at,
                r#"dir: empty: name a folder such as dir = "public""#.into(),
            );
            return None;
        }
        let index = r.index.unwrap_or_else(|| "index.html".to_owned());
        let dir = match folder.strip_prefix("builtin:") {
            Some(name) => {
                if !crate::assets::STATIC_FOLDERS.contains(&name) {
                    self.error(
                        dir_at,
                        format!("dir: no built-in folder {folder:?} (there is \"builtin:demo\")"),
                    );
                    return None;
                }
                if crate::assets::static_file(name, &index).is_none() {
                    self.error(
                        dir_at,
                        format!("index: the built-in folder {folder:?} has no {index:?} (it has \"index.html\")"),
                    );
                    return None;
                }
                StaticDir::Builtin(name.to_owned())
            }
            None => {
                let p = Path::new(&folder);
                let p = if p.is_absolute() {
                    p.to_owned()
                } else {
                    dir.join(p)
                };
                match std::fs::metadata(&p) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        self.error(dir_at, format!("dir: {} is not a folder", p.display()));
                        return None;
                    }
                    Err(e) => {
                        self.error(dir_at, format!("dir: {}: {e}", p.display()));
                        return None;
                    }
                }
                StaticDir::Folder(p)
            }
        };
        Some(StaticSettings {
            path,
            dir,
            index,
            tenant: tenant.map(str::to_owned),
            line,
        })
    }

    fn tenant(&mut self, t: &DeTable<'_>) -> RawTenant {
        let mut r = RawTenant::default();
        for (key, at, v) in entries(t) {
            let q = &mut r.quotas;
            match key {
                "name" => {
                    r.has_name = true;
                    let name = ValueDe(v).deserialize_any(Text(r#"a name such as "acme""#));
                    r.name = self.visit(key, at, name).and_then(|n| {
                        let valid = (1..=64).contains(&n.len())
                            && n.chars()
                                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
                        if !valid {
                            self.error(at, format!("name: {n:?} must be 1 to 64 letters, digits, '.', '_' or '-'"));
                            None
                        } else if n.eq_ignore_ascii_case(DEFAULT_TENANT) {
                            self.error(at, format!("name: {n:?} is the name of the top-level routes' tenant; choose another"));
                            None
                        } else {
                            Some(n)
                        }
                    });
                }
                "hosts" => {
                    r.has_hosts = true;
                    let list = ValueDe(v).deserialize_any(TextList(
                        r#"a list of host names like ["chat.example.com", "*.example.org"]"#,
                    ));
                    let Some(list) = self.visit(key, at, list) else {
                        r.bad_hosts = true;
                        continue;
                    };
                    for host in list {
                        match check_host(&host) {
                            Ok(h) => r.hosts.push((h, at)),
                            Err(why) => {
                                r.bad_hosts = true;
                                self.error(at, format!("hosts: {why}"));
                            }
                        }
                    }
                }
                "route" => {
                    let DeValue::Array(items) = v else {
                        self.error(
                            at,
                            format!(
                                "route: expected one [[tenant.route]] table per route, found {}",
                                Found(unexpected(v))
                            ),
                        );
                        continue;
                    };
                    for item in items.iter() {
                        let at = item.span().start;
                        match item.get_ref() {
                            DeValue::Table(t) => {
                                r.routes.push((at, self.route_in(t, "[[tenant.route]]")))
                            }
                            other => self.error(
                                at,
                                format!(
                                    "route: expected a [[tenant.route]] table, found {}",
                                    Found(unexpected(other))
                                ),
                            ),
                        }
                    }
                }
                "static" => {
                    for (at, t) in self.tables(key, at, v, "[[tenant.static]]") {
                        r.statics
                            .push((at, self.static_mount(t, "[[tenant.static]]")));
                    }
                }
                "tls" => r.tls = self.tls(key, at, v),
                "max_connections" => q.max_connections = self.count(key, at, v, 1),
                "max_connections_per_second" => {
                    q.max_connections_per_second = self.rate(key, at, v).flatten()
                }
                "max_instances" => q.max_instances = self.count(key, at, v, 1),
                "max_memory_total" => {
                    q.max_memory_total = self.size(key, at, v, MIN_MEMORY, usize::MAX)
                }
                "max_open_files" => q.max_open_files = self.count(key, at, v, 1),
                "cpu_budget" => q.cpu_budget = self.value(key, at, v),
                "max_sends_per_second" => q.max_sends_per_second = self.rate(key, at, v).flatten(),
                "max_broadcast_deliveries_per_second" => {
                    q.max_broadcast_deliveries_per_second = self.rate(key, at, v).flatten()
                }
                "max_timers_per_second" => {
                    q.max_timers_per_second = self.rate(key, at, v).flatten()
                }
                "max_log_lines_per_second" => {
                    q.max_log_lines_per_second = self.rate(key, at, v).flatten()
                }
                _ => self.unknown(key, at, "[[tenant]]", &[TENANT_KEYS]),
            }
        }
        r
    }
}

/// The name logs give the tenant of the top-level `[[route]]`s.
pub const DEFAULT_TENANT: &str = "default";

/// A `[[static]]` path: starts with `/`, has no `?`, `#`, `%`, `\\`,
/// empty, `.` or `..` segment; returned without a trailing `/` (except `/`).
fn check_static_path(path: &str) -> Result<String, &'static str> {
    if !path.starts_with('/') {
        return Err("must start with '/'");
    }
    if path.contains(['?', '#', '%', '\\', '*'])
        || path
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || !c.is_ascii())
    {
        return Err(
            "must be a plain ASCII path prefix, without '?', '#', '%', '\\', '*', whitespace or control characters",
        );
    }
    let trimmed = path.trim_end_matches('/');
    if trimmed
        .split('/')
        .skip(1)
        .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        return Err("has an empty, '.' or '..' segment");
    }
    Ok(if trimmed.is_empty() {
        "/".to_owned()
    } else {
        trimmed.to_owned()
    })
}

/// A `hosts` entry, lower-cased: a host name (or IP address) without a
/// port, or `*.` and a name (any one label in front of it).
fn check_host(host: &str) -> Result<String, String> {
    let h = host.to_ascii_lowercase();
    let h = h.strip_suffix('.').unwrap_or(&h).to_owned();
    if h.starts_with('[') || h.contains(':') {
        // An IPv6 literal, in brackets, without a port.
        let inner = h.strip_prefix('[').and_then(|r| r.strip_suffix(']'));
        return match inner {
            Some(a) if a.parse::<std::net::Ipv6Addr>().is_ok() => Ok(h),
            _ if h.parse::<std::net::Ipv6Addr>().is_ok() => Err(format!(
                "{host:?}: write an IPv6 address in brackets, as in a Host header: \"[{h}]\""
            )),
            _ => Err(format!("{host:?}: give the host name without a port")),
        };
    }
    let name = h.strip_prefix("*.").unwrap_or(&h);
    if name.contains('*') {
        return Err(format!(
            "{host:?}: a wildcard is only allowed as the whole first label (\"*.example.org\")"
        ));
    }
    if name.is_empty() {
        return Err(format!("{host:?} is not a host name"));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(format!("{host:?} has an empty label"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("{host:?}: a label may not start or end with '-'"));
        }
        if let Some(c) = label
            .chars()
            .find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_')))
        {
            return Err(format!("{host:?} contains {c:?}, which no host name has"));
        }
    }
    Ok(h)
}

/// Whether `path` can be routed: exact, absolute, nothing that looks like a
/// pattern, a query or a fragment.
fn check_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("{path:?} must start with '/'"));
    }
    if let Some(c) = path
        .chars()
        .find(|&c| matches!(c, '*' | '?' | '#') || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "{path:?} contains {c:?}: paths are exact (the query string goes to the plugin), \
             so wildcards ('*'), '?', '#' and whitespace are not supported"
        ));
    }
    Ok(())
}

impl Config {
    /// Errors in what routes grant their plugins that only the file system
    /// can tell: a `dirs` host that is not a directory that can be read.
    /// Checked where plugins are loaded (start, `check`, reload).
    pub fn grant_errors(&self) -> Vec<Error> {
        let mut errors = Vec::new();
        for r in &self.routes {
            for d in &r.dirs {
                let problem = match std::fs::metadata(&d.host) {
                    Ok(m) if m.is_dir() => match std::fs::read_dir(&d.host) {
                        Ok(_) => None,
                        Err(e) => Some(format!("cannot be read: {e}")),
                    },
                    Ok(_) => Some("is not a directory".to_owned()),
                    Err(e) => Some(format!("cannot be opened: {e}")),
                };
                if let Some(problem) = problem {
                    let tenant = r
                        .tenant
                        .as_deref()
                        .map_or(String::new(), |t| format!(" (tenant {t})"));
                    errors.push(Error::Config {
                        file: self.file.clone(),
                        line: r.line,
                        message: format!(
                            "dirs: route {}{tenant} grants {} as {}, which {problem}",
                            r.path,
                            d.host.display(),
                            d.guest
                        ),
                    });
                }
            }
        }
        errors
    }

    /// Reads and validates a config file, reporting every error.
    pub fn load(file: &Path) -> Result<Config, Errors> {
        let text = Config::read_text(file)?;
        Config::parse(&text, file)
    }

    /// The text of a config file: a regular file of UTF-8 text (a device or
    /// a FIFO is refused without being read).
    pub fn read_text(file: &Path) -> Result<String, Error> {
        let fail = |source| Error::ConfigRead {
            file: file.to_owned(),
            source,
        };
        let bytes = crate::file::read_regular_file(file).map_err(fail)?;
        String::from_utf8(bytes).map_err(|_| {
            fail(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "not UTF-8 text",
            ))
        })
    }

    /// Parses and validates config text; `file` names it in errors and
    /// anchors relative plugin paths. Every error is reported, in file order.
    pub fn parse(text: &str, file: &Path) -> Result<Config, Errors> {
        match Config::parse_partial(text, file) {
            (Some(config), errors) if errors.is_empty() => Ok(config),
            (_, errors) => Err(Errors(errors)),
        }
    }

    /// Parses what it can, for `wasmgate check`: every error in file order,
    /// and, unless the TOML syntax itself is broken, a config holding the
    /// routes whose `path` and `plugin` are usable (any other bad value
    /// replaced by its default) so that their plugins can be checked too.
    /// Only a config that comes with no errors is valid.
    pub fn parse_partial(text: &str, file: &Path) -> (Option<Config>, Vec<Error>) {
        let mut p = Parser {
            text,
            file,
            errors: Vec::new(),
        };
        let root = match DeTable::parse(text) {
            Ok(root) => root.into_inner(),
            Err(e) => {
                let at = e.span().map_or(0, |s| s.start);
                p.error(at, syntax_message(text, at, e.message().trim()));
                return (None, p.errors);
            }
        };

        let mut server = RawServer::default();
        let mut sandbox = RawSandbox::default();
        let mut admin: Option<(ListenAddr, usize)> = None;
        let mut saw_admin: Option<usize> = None;
        let mut admin_has_listen = false;
        let mut raw_routes = Vec::new();
        let mut raw_statics: Vec<(usize, RawStatic)> = Vec::new();
        let mut raw_tenants: Vec<(usize, RawTenant)> = Vec::new();
        let mut cluster: Option<ClusterSettings> = None;
        let mut saw_route = false;
        for (key, at, v) in entries(&root) {
            match key {
                "server" => {
                    if let Some(t) = p.table(key, at, v, "a table ([server])") {
                        server = p.server(t);
                    }
                }
                "admin" => {
                    saw_admin = Some(at);
                    if let Some(t) = p.table(key, at, v, "a table ([admin])") {
                        for (k, k_at, v) in entries(t) {
                            match k {
                                "listen" => {
                                    admin_has_listen = true;
                                    admin = p.value(k, k_at, v).map(|l| (l, k_at));
                                }
                                _ => p.unknown(k, k_at, "[admin]", &[&["listen"]]),
                            }
                        }
                    }
                }
                "sandbox" => {
                    if let Some(t) = p.table(key, at, v, "a table ([sandbox])") {
                        sandbox = p.sandbox(t);
                    }
                }
                "cluster" => {
                    if let Some(t) = p.table(key, at, v, "a table ([cluster])") {
                        cluster = p.cluster(t, at);
                    }
                }
                "route" => {
                    saw_route = true;
                    let DeValue::Array(items) = v else {
                        p.error(
                            at,
                            format!(
                                "route: expected one [[route]] table per route (double brackets), found {}",
                                Found(unexpected(v))
                            ),
                        );
                        continue;
                    };
                    for item in items.iter() {
                        let at = item.span().start;
                        match item.get_ref() {
                            DeValue::Table(t) => raw_routes.push((at, p.route(t))),
                            other => p.error(
                                at,
                                format!(
                                    "route: expected a [[route]] table, found {}",
                                    Found(unexpected(other))
                                ),
                            ),
                        }
                    }
                }
                "static" => {
                    for (at, t) in p.tables(key, at, v, "[[static]]") {
                        raw_statics.push((at, p.static_mount(t, "[[static]]")));
                    }
                }
                "tenant" => {
                    let DeValue::Array(items) = v else {
                        p.error(
                            at,
                            format!(
                                "tenant: expected one [[tenant]] table per tenant (double brackets), found {}",
                                Found(unexpected(v))
                            ),
                        );
                        continue;
                    };
                    for item in items.iter() {
                        let at = item.span().start;
                        match item.get_ref() {
                            DeValue::Table(t) => raw_tenants.push((at, p.tenant(t))),
                            other => p.error(
                                at,
                                format!(
                                    "tenant: expected a [[tenant]] table, found {}",
                                    Found(unexpected(other))
                                ),
                            ),
                        }
                    }
                }
                _ => {
                    let home = [
                        ("[server]", SERVER_KEYS),
                        ("[server] or a [[route]]", LIMIT_KEYS),
                        ("[sandbox]", SANDBOX_KEYS),
                        ("a [[route]]", ROUTE_KEYS),
                    ]
                    .into_iter()
                    .find(|(_, keys)| keys.contains(&key));
                    match home {
                        Some((table, _)) => p.error(
                            at,
                            format!("{key}: belongs in {table}, not at the top of the file"),
                        ),
                        None => p.unknown(
                            key,
                            at,
                            "the file",
                            &[&[
                                "server", "sandbox", "route", "static", "tenant", "admin",
                                "cluster",
                            ]],
                        ),
                    }
                }
            }
        }

        let base = server.limits.over(&Limits::default());
        let (listen, listen_origin) = match server.listen {
            Some((listen, at)) => (
                listen,
                format!("{}:{}: listen", file.display(), line_of(text, at)),
            ),
            None => (
                ListenAddr::from(SocketAddr::from(([127, 0, 0, 1], 8080))),
                format!("{}: listen", file.display()),
            ),
        };
        let dir = file.parent().unwrap_or(Path::new(""));
        let tls_files = |raw: RawTls| TlsFiles {
            cert: dir.join(raw.cert),
            key: dir.join(raw.key),
            line: line_of(text, raw.at),
        };
        let server_tls = server.tls.map(tls_files);
        let server_settings = ServerSettings {
            tls: server_tls,
            listen,
            listen_origin,
            max_connections: server.limits.max_connections.unwrap_or(10_000),
            handshake_timeout: server.handshake_timeout.unwrap_or(Duration::from_secs(10)),
            max_header_size: server.max_header_size.unwrap_or(16 << 10),
            drain_timeout: server.drain_timeout.unwrap_or(Duration::from_secs(10)),
            threads: server.threads.unwrap_or(0),
        };
        let sandbox = SandboxSettings {
            max_memory: sandbox.max_memory.unwrap_or(64 << 20),
            max_call_time: sandbox.max_call_time.unwrap_or(Duration::from_secs(1)),
        };

        let mut routes = Vec::new();
        let mut routed: HashMap<String, usize> = HashMap::new();
        for (at, r) in raw_routes {
            if let Some(route) = p.build_route(at, r, None, &mut routed, dir, &base) {
                routes.push(route);
            }
        }
        let mut statics = Vec::new();
        let mut mounted: HashMap<String, usize> = HashMap::new();
        for (at, r) in raw_statics {
            if let Some(m) = p.build_static(at, r, None, &mut mounted, dir) {
                statics.push(m);
            }
        }
        saw_route |= !raw_tenants.is_empty() || !statics.is_empty();
        let mut tenants = Vec::new();
        let mut named: HashMap<String, usize> = HashMap::new();
        let mut hosted: HashMap<String, String> = HashMap::new();
        for (at, t) in raw_tenants {
            let line = line_of(text, at);
            let Some(name) = t.name else {
                if !t.has_name {
                    p.error(
                        at,
                        r#"name: missing: every [[tenant]] needs one, such as name = "acme""#
                            .into(),
                    );
                }
                continue;
            };
            let key = name.to_ascii_lowercase();
            if let Some(first) = named.get(&key) {
                p.error(
                    at,
                    format!(
                        "name: tenant {name:?} is already defined (line {first}; names are compared ignoring case)"
                    ),
                );
                continue;
            }
            named.insert(key, line);
            if t.has_hosts && t.hosts.is_empty() && !t.bad_hosts {
                p.error(
                    at,
                    format!("hosts: tenant {name:?} lists no host name: nobody could reach it"),
                );
            }
            if !t.has_hosts {
                p.error(
                    at,
                    format!(r#"hosts: missing in tenant {name:?}: list the host names it serves, such as hosts = ["chat.example.com"]"#),
                );
            }
            let mut hosts = Vec::new();
            for (host, host_at) in t.hosts {
                match hosted.get(&host) {
                    Some(other) if *other == name => {
                        p.error(host_at, format!("hosts: {host:?} is listed twice"))
                    }
                    Some(other) => p.error(
                        host_at,
                        format!("hosts: {host:?} is already served by tenant {other:?}"),
                    ),
                    None => {
                        hosted.insert(host.clone(), name.clone());
                        hosts.push(host);
                    }
                }
            }
            if t.routes.is_empty() && t.statics.is_empty() {
                p.error(
                    at,
                    format!(
                        "route: tenant {name:?} has no [[tenant.route]] or [[tenant.static]]: it would serve nothing"
                    ),
                );
            }
            let mut routed: HashMap<String, usize> = HashMap::new();
            for (at, r) in t.routes {
                if let Some(route) = p.build_route(at, r, Some(&name), &mut routed, dir, &base) {
                    routes.push(route);
                }
            }
            let mut mounted: HashMap<String, usize> = HashMap::new();
            for (at, r) in t.statics {
                if let Some(m) = p.build_static(at, r, Some(&name), &mut mounted, dir) {
                    statics.push(m);
                }
            }
            if let (Some(raw), None) = (&t.tls, &server_settings.tls) {
                p.error(
                    raw.at,
                    format!(
                        "tls: tenant {name:?} has a certificate but [server] has no tls: TLS is \
                         turned on for the listener by [server] tls = {{ cert = \"...\", key = \"...\" }}, \
                         the certificate for clients whose SNI names no tenant"
                    ),
                );
            }
            tenants.push(TenantSettings {
                name,
                hosts,
                quotas: t.quotas,
                tls: t.tls.map(tls_files),
                line,
            });
        }
        if server_settings.threads == 1 {
            for r in routes.iter().filter(|r| !r.dirs.is_empty()) {
                p.errors.push(Error::Config {
                    file: file.to_owned(),
                    line: r.line,
                    message: format!(
                        "dirs: route {} grants directories, which needs more than one worker thread \
                         ([server] threads = 1 runs a single thread): file access blocks, and is \
                         run with the worker handed to another thread",
                        r.path
                    ),
                });
            }
        }
        if !saw_route {
            p.error(
                0,
                "no [[route]] or [[static]] defined: the gateway would serve nothing".into(),
            );
        }
        if let Some((a, at)) = &admin {
            if a == &server_settings.listen && a.port() != 0 {
                p.error(
                    *at,
                    format!(
                        "listen: [admin] listen {a} is the public listener's address ({}): \
                         the admin listener needs its own port",
                        server_settings.listen_origin
                    ),
                );
            }
        }
        if let (Some(at), None, false) = (saw_admin, &admin, admin_has_listen) {
            p.error(
                at,
                r#"admin: `listen` is missing: [admin] needs listen = "127.0.0.1:9090""#.into(),
            );
        }
        let mut errors = Errors(p.errors);
        errors.sort();
        let admin = admin.map(|(listen, at)| AdminSettings {
            listen,
            listen_origin: format!("{}:{}: [admin] listen", file.display(), line_of(text, at)),
        });
        let config = Config {
            file: file.to_owned(),
            server: server_settings,
            sandbox,
            routes,
            tenants,
            admin,
            statics,
            cluster,
        };
        (Some(config), errors.0)
    }
}

/// Checks a Redis URL: `redis://[user[:password]@]host[:port][/0]` for
/// one server, or `redis-cluster://[user[:password]@]host[:port]` with
/// optional `?node=host:port&node=...` (more seed nodes) for a Redis
/// Cluster. A database other than 0 is refused: pub/sub channels are
/// shared by every database of a server, so it would not separate two
/// clusters (and a Redis Cluster has database 0 only). Error messages never
/// quote the user or password.
fn check_redis_url(url: &str) -> Result<(), String> {
    let (cluster, rest) = match url.strip_prefix("redis-cluster://") {
        Some(rest) => (true, rest),
        None => (false, url.strip_prefix("redis://").unwrap_or(url)),
    };
    if cluster
        && rest
            .split_once('?')
            .is_some_and(|(_, q)| q.contains('@') && q.contains("node="))
    {
        return Err(
            "node= takes host:port only: the user and password before the first \
             host apply to every node"
                .into(),
        );
    }
    // The credentials end at the last `@`; a `/`, `?` or `#` before it
    // would end the host part early (and split the password).
    if let Some(at) = rest.rfind('@') {
        if rest[..at].contains(['/', '?', '#']) {
            return Err(
                "the user or password holds `/`, `?` or `#`: percent-encode them \
                 (%2F, %3F, %23)"
                    .into(),
            );
        }
    }
    if rest.contains('#') {
        return Err("a URL fragment (`#...`) is not supported".into());
    }
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (auth_host, db) = match rest.split_once('/') {
        Some((h, db)) => (h, Some(db)),
        None => (rest, None),
    };
    let (auth, host_port) = match auth_host.rsplit_once('@') {
        Some((auth, h)) => (Some(auth), h),
        None => (None, auth_host),
    };
    if let Some(auth) = auth {
        if !auth.contains(':') {
            return Err("a user name without a password (`user@`): write \
                 redis://:PASSWORD@host for a password alone, or redis://USER:PASSWORD@host"
                .into());
        }
        let bytes = auth.as_bytes();
        let bad_escape = bytes.iter().enumerate().any(|(i, &b)| {
            b == b'%'
                && !(bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                    && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
        });
        if bad_escape {
            return Err(
                "the user or password has a `%` not followed by two hex digits: write %25 \
                 for a `%`"
                    .into(),
            );
        }
    }
    check_host_port(host_port, false)?;
    let has_port = match host_port.strip_prefix('[') {
        Some(v6) => v6.contains("]:"),
        None => host_port.contains(':'),
    };
    if cluster && !has_port {
        return Err("the port is missing: redis-cluster://host:port".into());
    }
    match query {
        None => {}
        Some(_) if !cluster => {
            return Err(
                "query parameters are not supported: use redis://[user:password@]host[:port], \
                 or redis-cluster://host:port?node=host:port for a Redis Cluster"
                    .into(),
            )
        }
        Some(q) => {
            for part in q.split('&') {
                match part.strip_prefix("node=") {
                    Some(node) => {
                        check_host_port(node, true).map_err(|why| format!("node={node}: {why}"))?
                    }
                    None => {
                        return Err(format!(
                            "{part:?}: the only query parameter is node=host:port (another \
                             seed node of the Redis Cluster)"
                        ))
                    }
                }
            }
        }
    }
    match db {
        None | Some("") | Some("0") => Ok(()),
        Some(_) if cluster => {
            Err("a Redis Cluster has database 0 only: remove the path after the port".into())
        }
        Some(d) if d.chars().all(|c| c.is_ascii_digit()) => Err(format!(
            "database {d}: pub/sub channels are shared by every database of a Redis server, \
             so a database number does not separate clusters; use database 0 and give each \
             cluster its own `namespace`"
        )),
        Some(d) => Err(format!("{d:?} is not a database number")),
    }
}

/// Checks `host[:port]` (`[v6]:port` too, unless `seed`: the `node=` seeds
/// of a Redis Cluster URL are `name-or-v4:port`, port required).
fn check_host_port(host_port: &str, seed: bool) -> Result<(), String> {
    let (host, port) = if let Some(v6) = host_port.strip_prefix('[') {
        if seed {
            return Err("an IPv6 address is not supported in node=: use a host name".into());
        }
        match v6.split_once(']') {
            Some((h, p)) => match p {
                "" => (h, None),
                p => match p.strip_prefix(':') {
                    Some(port) => (h, Some(port)),
                    None => return Err(format!("{p:?} after the IPv6 address")),
                },
            },
            None => return Err("an IPv6 address needs its closing `]`".into()),
        }
    } else {
        match host_port.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (host_port, None),
        }
    };
    if host.is_empty() {
        return Err(
            "no host: expected redis://host:port, for example \"redis://127.0.0.1:6379\"".into(),
        );
    }
    let v6 = host_port.starts_with('[');
    if !host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c) || (v6 && c == ':'))
    {
        return Err(format!("{host:?} is not a host name or IP address"));
    }
    match port {
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => Ok(()),
            _ => Err(format!("port {p:?} is not a port number (1 to 65535)")),
        },
        None if seed => Err("the port is missing: node=host:port".into()),
        None => Ok(()),
    }
}

/// `url` with its user's password replaced by `***`, for logs and errors.
/// The credentials end at the last `@` (a password may hold `@`, `/`...).
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.rsplit_once('@') {
        Some((auth, host)) => match auth.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
            None => format!("{scheme}://***@{host}"),
        },
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, Errors> {
        Config::parse(text, Path::new("/etc/wasmgate/gateway.toml"))
    }

    /// The error messages for `text`, without the file name.
    fn errors(text: &str) -> Vec<String> {
        match parse(text) {
            Ok(_) => panic!("no error for:\n{text}"),
            Err(e) => {
                e.0.iter()
                    .map(|e| {
                        e.to_string()
                            .trim_start_matches("/etc/wasmgate/gateway.toml:")
                            .to_owned()
                    })
                    .collect()
            }
        }
    }

    /// The only error for `text`.
    fn error(text: &str) -> String {
        let e = errors(text);
        assert_eq!(e.len(), 1, "{e:#?}");
        e[0].clone()
    }

    const ROUTE: &str = "[[route]]\npath = \"/a\"\nplugin = \"a.wasm\"\n";

    #[test]
    fn route_overrides_server_limits_and_resolves_plugin_paths() {
        let c = parse(
            "[server]\nmax_message_size = \"2MiB\"\nidle_timeout = \"30s\"\n\n[[route]]\npath = \"/a\"\nplugin = \"p/a.wasm\"\nmax_message_size = 4096\n\n[[route]]\npath = \"/b\"\nplugin = \"builtin:echo\"\n",
        )
        .unwrap();
        assert_eq!(c.routes[0].limits.max_message_size, 4096);
        assert_eq!(c.routes[1].limits.max_message_size, 2 << 20);
        assert_eq!(
            c.routes[1].limits.idle_timeout,
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            c.routes[0].plugin,
            PluginSource::File(PathBuf::from("/etc/wasmgate/p/a.wasm"))
        );
        assert_eq!(c.routes[1].plugin, PluginSource::Builtin("echo".into()));
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let e = parse("[[route]]\npath = \"/a\"\nplugin = \"a.wasm\"\nmax_mesage_size = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("/etc/wasmgate/gateway.toml:4: "), "{e}");
        assert!(e.contains("max_mesage_size"), "{e}");
    }

    #[test]
    fn bad_duration_and_size_are_rejected_with_their_line() {
        assert_eq!(
            error(&format!("[server]\n\nping_interval = \"soon\"\n{ROUTE}")),
            r#"3: ping_interval: expected a duration like "30s" or "500ms", or "off", found the string "soon""#
        );
        assert_eq!(
            error(&format!(
                "[server]\nmax_frame_size = \"12 parsecs\"\n{ROUTE}"
            )),
            r#"2: max_frame_size: expected a size like "1MiB" or a number of bytes, found the string "12 parsecs""#
        );
    }

    #[test]
    fn duplicate_and_relative_paths_are_rejected() {
        let e = parse(
            "[[route]]\npath = \"/a\"\nplugin = \"a\"\n[[route]]\npath = \"/a\"\nplugin = \"b\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains(":5: ") && e.contains("already routed"), "{e}");
        let e = parse("[[route]]\npath = \"a\"\nplugin = \"a\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(":2: ") && e.contains("must start with '/'"),
            "{e}"
        );
    }

    #[test]
    fn threads_default_to_one_per_cpu() {
        let c = parse("[[route]]\npath = \"/a\"\nplugin = \"a\"\n").unwrap();
        assert_eq!(c.server.threads, 0);
        let c = parse("[server]\nthreads = 1\n[[route]]\npath = \"/a\"\nplugin = \"a\"\n").unwrap();
        assert_eq!(c.server.threads, 1);
    }

    #[test]
    fn redis_urls_are_checked_and_passwords_redacted() {
        for good in [
            "redis://127.0.0.1:6379",
            "redis://localhost",
            "redis://user:pw@10.0.0.5:6380/0",
            "redis://:pw@[::1]:6379",
        ] {
            assert_eq!(check_redis_url(good), Ok(()), "{good}");
        }
        for bad in [
            "redis://",
            "redis://127.0.0.1:99999",
            "redis://127.0.0.1:0",
            "redis://127.0.0.1:6379/abc",
            "redis://127.0.0.1:6379/3",
            "redis://127.0.0.1:6379?timeout=1",
            "redis://[::1:6379",
            "redis-cluster://h:1/0?node=h2:2/3",
            "redis-cluster://h:1/2",
            "redis-cluster://h:1?node=h2",
            "redis-cluster://h:1?node=h2:0",
            "redis-cluster://h:1?timeout=5",
            "redis-cluster://h:1#x",
            "redis://u:pa/ss@h:1",
            "redis://u:pa?ss@h:1",
            "redis://:pw@bad host:1",
            "redis-cluster://:pw@h",
            "redis-cluster://127.0.0.1",
            "redis-cluster://u:zq@h:1?node=u:zq@h2:2",
            "redis-cluster://[::1]",
            "redis://:pw%ZZ@h:1",
            "redis://pw@h:1",
        ] {
            assert!(check_redis_url(bad).is_err(), "{bad}");
        }
        for good in [
            "redis-cluster://10.0.0.5:7000",
            "redis-cluster://u:pw@10.0.0.5:7000?node=10.0.0.6:7001&node=redis-c:7002",
            "redis-cluster://:p@ss@h:7000",
            "redis://:p@ss@h:7000",
        ] {
            assert_eq!(check_redis_url(good), Ok(()), "{good}");
        }
        // No part of a password is ever quoted.
        for url in [
            "redis://u:zq/zq@h:1",
            "redis://u:zq?zq@h:1",
            "redis://u:zq#zq@h:1",
            "redis://:zq@zq@h:1",
        ] {
            let why = check_redis_url(url).err().unwrap_or_default();
            assert!(!why.contains("zq"), "{url}: {why}");
        }
        // Schemes are case-insensitive.
        let c =
            parse("[cluster]\nredis = \"REDIS://h:1\"\n[[route]]\npath = \"/a\"\nplugin = \"a\"\n")
                .expect("an upper-case scheme");
        assert_eq!(c.cluster.map(|c| c.redis).as_deref(), Some("redis://h:1"));
        assert_eq!(redact_url("redis://:s3cret@h:1/0"), "redis://:***@h:1/0");
        assert_eq!(redact_url("redis://u:s3cret@h"), "redis://u:***@h");
        assert_eq!(redact_url("redis://h:1"), "redis://h:1");
        assert_eq!(redact_url("redis://u:p@s/s@h:1"), "redis://u:***@h:1");
        assert_eq!(
            redact_url("redis-cluster://:x@h:1?node=h2:2"),
            "redis-cluster://:***@h:1?node=h2:2"
        );
    }

    #[test]
    fn durations_and_sizes_parse() {
        assert_eq!(
            parse_duration("250ms"),
            Some(Some(Duration::from_millis(250)))
        );
        assert_eq!(parse_duration("off"), Some(None));
        assert_eq!(parse_duration("0s"), Some(None));
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_size("16 MiB"), Some(16 << 20));
        assert_eq!(parse_size("64KiB"), Some(64 << 10));
        assert_eq!(parse_size("1.5MiB"), None);
    }

    #[test]
    fn type_errors_name_the_key_and_the_expected_form() {
        let e = error(&format!(
            "[server]\nlisten = \"127.0.0.1:1\"\nmax_message_size = true\n{ROUTE}"
        ));
        assert_eq!(
            e,
            r#"3: max_message_size: expected a size like "1MiB" or a number of bytes, found a boolean"#
        );
        let e = error(&format!("[server]\nmax_connections = \"lots\"\n{ROUTE}"));
        assert_eq!(
            e,
            r#"2: max_connections: expected a whole number, found the string "lots""#
        );
    }

    #[test]
    fn every_kind_of_value_says_what_it_expects_and_what_it_found() {
        let cases: &[(&str, &str)] = &[
            ("max_frame_size = -1", "max_frame_size: expected a size like \"1MiB\" or a number of bytes, found the number -1"),
            ("max_outbound_buffer = 1.5", "max_outbound_buffer: expected a size like \"1MiB\" or a number of bytes, found the number 1.5"),
            ("idle_timeout = 30", "idle_timeout: expected a duration like \"30s\" or \"500ms\", or \"off\", found the number 30"),
            ("pong_timeout = \"off\"", "pong_timeout: cannot be turned off: expected a duration like \"30s\" or \"500ms\", found the string \"off\""),
            ("close_timeout = [\"1s\"]", "close_timeout: expected a duration like \"30s\" or \"500ms\", found a list"),
            ("max_connections = -3", "max_connections: expected a whole number, found the number -3"),
            ("slow_consumer = \"kill\"", "slow_consumer: expected \"close\" or \"drop\", found the string \"kill\""),
            ("slow_consumer = 1", "slow_consumer: expected \"close\" or \"drop\", found the number 1"),
            ("deliver = \"frames\"", "deliver: expected \"message\" or \"fragments\", found the string \"frames\""),
            ("isolation = \"process\"", "isolation: expected \"connection\" or \"shared\", found the string \"process\""),
            ("allowed_origins = \"https://a.example\"", "allowed_origins: expected a list of origins like [\"https://example.com\"], found the string \"https://a.example\""),
            ("allowed_origins = [\"https://a.example\", 3]", "allowed_origins: item 2: expected a string, found the number 3"),
            ("subprotocols = { a = 1 }", "subprotocols: expected a list of subprotocols like [\"chat.v1\"], found a table"),
            ("config = { greeting = 1 }", "config.greeting: expected a string (the plugin reads [route.config] values as text), found the number 1"),
            ("config = \"x\"", "config: expected a table of strings ([route.config]), found the string \"x\""),
            ("max_message_size = 1979-05-27", "max_message_size: expected a size like \"1MiB\" or a number of bytes, found a date"),
        ];
        for (line, want) in cases {
            let e = error(&format!("{ROUTE}{line}\n"));
            assert_eq!(e, format!("4: {want}"), "for {line}");
            assert!(!e.contains("usize") && !e.contains("Repr"), "{e}");
        }
        let server: &[(&str, &str)] = &[
            ("threads = \"many\"", "threads: expected a whole number, found the string \"many\""),
            ("listen = 8080", "listen: expected host:port such as \"127.0.0.1:8080\", \"[::1]:8080\" or \"localhost:8080\", found the number 8080"),
            ("handshake_timeout = \"0s\"", "handshake_timeout: cannot be turned off: expected a duration like \"30s\" or \"500ms\", found the string \"0s\""),
        ];
        for (line, want) in server {
            let e = error(&format!("[server]\n{line}\n{ROUTE}"));
            assert_eq!(e, format!("2: {want}"), "for {line}");
        }
        let e = error(&format!("[sandbox]\nmax_call_time = true\n{ROUTE}"));
        assert_eq!(
            e,
            "2: max_call_time: expected a duration like \"30s\" or \"500ms\", found a boolean"
        );
        let e = error("[[route]]\npath = 1\nplugin = \"a\"\n");
        assert_eq!(
            e,
            "2: path: expected a path such as \"/chat\", found the number 1"
        );
        let e = error("[[route]]\npath = \"/a\"\nplugin = false\n");
        assert_eq!(
            e,
            "3: plugin: expected a component file or \"builtin:<name>\", found a boolean"
        );
    }

    #[test]
    fn every_error_is_reported_in_file_order() {
        let text = "[server]\n\
                    max_connections = \"lots\"\n\
                    ping_interval = \"soon\"\n\
                    [sandbox]\n\
                    max_memory = \"1KiB\"\n\
                    [[route]]\n\
                    path = \"/a\"\n\
                    plugin = \"a.wasm\"\n\
                    max_message_size = true\n\
                    deliver = \"frames\"\n\
                    [[route]]\n\
                    path = \"/a\"\n\
                    plugin = \"b.wasm\"\n\
                    [[route]]\n\
                    path = \"/b/*\"\n\
                    plugin = \"c.wasm\"\n\
                    max_mesage_size = 1\n\
                    [[route]]\n\
                    plugin = \"d.wasm\"\n";
        let lines: Vec<usize> = errors(text)
            .iter()
            .map(|e| e.split(':').next().unwrap_or_default().parse().unwrap_or(0))
            .collect();
        assert_eq!(
            lines,
            [2, 3, 5, 9, 10, 12, 15, 17, 18],
            "{:#?}",
            errors(text)
        );
    }

    #[test]
    fn a_partial_config_keeps_the_routes_whose_plugin_can_be_checked() {
        let text = "[[route]]\npath = \"/a\"\nplugin = \"a.wasm\"\nmax_message_size = true\n\
                    [[route]]\npath = \"/b/*\"\nplugin = \"b.wasm\"\n\
                    [[route]]\npath = \"/c\"\nplugin = \"c.wasm\"\n";
        let (config, errors) = Config::parse_partial(text, Path::new("gateway.toml"));
        assert_eq!(errors.len(), 2, "{errors:#?}");
        let config = config.expect("a partial config");
        let paths: Vec<&str> = config.routes.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(paths, ["/a", "/c"]);
        assert_eq!(config.routes[1].line, 10);
        assert!(Config::parse_partial("[server", Path::new("g")).0.is_none());
    }

    #[test]
    fn toml_syntax_errors_start_with_the_key() {
        assert_eq!(
            error("[server]\nlisten = \nthreads = 1\n"),
            "2: listen: string values must be quoted, expected literal string"
        );
        assert_eq!(
            error("[server]\nthreads = 1\nthreads = 2\n"),
            "3: threads: duplicate key"
        );
        assert_eq!(
            error("[server]\nlisten \"x\"\n"),
            "2: listen: key with no value, expected `=`"
        );
        assert_eq!(error("[server]\n[server]\n"), "2: [server]: duplicate key");
    }

    #[test]
    fn unknown_keys_suggest_the_closest_key_or_list_them() {
        assert_eq!(
            error(&format!("{ROUTE}max_mesage_size = 1\n")),
            "4: max_mesage_size: unknown key in [[route]]; did you mean `max_message_size`?"
        );
        let e = error(&format!("[sandbox]\nmemory_cap = 1\n{ROUTE}"));
        assert_eq!(
            e,
            "2: memory_cap: unknown key in [sandbox]; expected one of `max_memory`, `max_call_time`"
        );
        assert_eq!(
            error(&format!("listen = \"127.0.0.1:1\"\n{ROUTE}")),
            "1: listen: belongs in [server], not at the top of the file"
        );
        assert_eq!(
            error(&format!("[sever]\n{ROUTE}")),
            "1: sever: unknown key in the file; did you mean `server`?"
        );
    }

    #[test]
    fn a_single_route_table_asks_for_double_brackets() {
        assert_eq!(
            error("[route]\npath = \"/a\"\nplugin = \"a\"\n"),
            "1: route: expected one [[route]] table per route (double brackets), found a table"
        );
    }

    #[test]
    fn missing_path_and_plugin_are_reported_for_each_route() {
        let e = errors("[[route]]\nplugin = \"a\"\n\n[[route]]\npath = \"/b\"\n");
        assert_eq!(
            e,
            [
                "1: path: missing: every [[route]] needs one, such as path = \"/chat\"",
                "4: plugin: missing in route /b: every [[route]] needs a component file or \"builtin:<name>\"",
            ]
        );
    }

    #[test]
    fn listen_accepts_host_names_and_explains_bad_forms() {
        for (text, host, port) in [
            ("localhost:8080", "localhost", 8080),
            ("127.0.0.1:0", "127.0.0.1", 0),
            ("[::1]:9000", "::1", 9000),
            ("gateway.example.com:443", "gateway.example.com", 443),
        ] {
            let c = parse(&format!("[server]\nlisten = \"{text}\"\n{ROUTE}")).unwrap();
            assert_eq!(
                (c.server.listen.host(), c.server.listen.port()),
                (host, port)
            );
            assert_eq!(c.server.listen.to_string(), text);
            assert_eq!(
                c.server.listen_origin,
                "/etc/wasmgate/gateway.toml:2: listen"
            );
        }
        let form =
            r#"expected host:port such as "127.0.0.1:8080", "[::1]:8080" or "localhost:8080""#;
        for (text, want) in [
            (":8080", format!("{form}, found \":8080\" (no host: \"0.0.0.0:8080\" or \"[::]:8080\" listens on every interface)")),
            ("127.0.0.1:99999", "port 99999 is out of range (0-65535)".to_owned()),
            ("nowhere", format!("{form}, found \"nowhere\" (no port)")),
            ("localhost:http", "port \"http\" is not a number (in \"localhost:http\")".to_owned()),
            ("::1:8080", format!("{form}, found \"::1:8080\" (an IPv6 address goes in brackets: \"[::1]:8080\")")),
            ("127.0.0.300:80", format!("{form}, found \"127.0.0.300:80\" (\"127.0.0.300\" is not an IPv4 address)")),
            ("http://localhost:80", format!("{form}, found \"http://localhost:80\" (\"http://localhost\" is not a host name)")),
        ] {
            assert_eq!(
                error(&format!("[server]\nlisten = \"{text}\"\n{ROUTE}")),
                format!("2: listen: {want}"),
                "for {text}"
            );
            assert_eq!(text.parse::<ListenAddr>().err(), Some(want));
        }
    }

    #[test]
    fn documented_bounds_are_enforced() {
        let cases = [
            (
                "[server]\nmax_header_size = \"1KiB\"",
                "max_header_size: must be at least 8KiB, found 1KiB",
            ),
            (
                "[server]\nmax_header_size = 8191",
                "max_header_size: must be at least 8KiB, found 8191 bytes",
            ),
            (
                "[server]\nmax_message_size = 0",
                "max_message_size: must be at least 1 byte, found 0",
            ),
            (
                "[server]\nmax_frame_size = 0",
                "max_frame_size: must be at least 1 byte, found 0",
            ),
            (
                "[server]\nmax_outbound_buffer = \"0KiB\"",
                "max_outbound_buffer: must be at least 1 byte, found 0",
            ),
            (
                "[server]\nmax_connections = 0",
                "max_connections: must be at least 1, found 0",
            ),
            (
                "[sandbox]\nmax_memory = \"1KiB\"",
                "max_memory: must be between 64KiB and 4GiB, found 1KiB",
            ),
            (
                "[sandbox]\nmax_memory = \"5GiB\"",
                "max_memory: must be between 64KiB and 4GiB, found 5GiB",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(error(&format!("{text}\n{ROUTE}")), format!("2: {want}"));
        }
        assert_eq!(
            error(&format!("{ROUTE}max_connections = 0\n")),
            "4: max_connections: must be at least 1, found 0"
        );
        assert_eq!(
            error(&format!("{ROUTE}max_open_files = 5\n")),
            "4: max_open_files: the route grants no `dirs`, and the bound is on the files its \
             plugin opens in them"
        );
        let c = parse(&format!(
            "[server]\nmax_header_size = \"8KiB\"\nthreads = 100000\n[sandbox]\nmax_memory = \"4GiB\"\n{ROUTE}"
        ))
        .unwrap();
        assert_eq!(c.server.max_header_size, 8192);
        assert_eq!(c.server.threads, 100_000);
        assert_eq!(c.sandbox.max_memory, 4 << 30);
    }

    #[test]
    fn route_paths_are_exact_without_wildcards() {
        for (path, c) in [
            ("/chat/*", "'*'"),
            ("/a?b=1", "'?'"),
            ("/a#top", "'#'"),
            ("/a b", "' '"),
        ] {
            assert_eq!(
                error(&format!("[[route]]\npath = \"{path}\"\nplugin = \"a\"\n")),
                format!(
                    "2: path: {path:?} contains {c}: paths are exact (the query string goes to the plugin), \
                     so wildcards ('*'), '?', '#' and whitespace are not supported"
                )
            );
        }
    }

    #[test]
    fn plugin_errors_can_be_located_and_sorted_with_config_errors() {
        let plugin = Error::Plugin {
            route: "/chat".into(),
            file: "chat.wasm".into(),
            reason: "cannot read".into(),
        }
        .located(Path::new("gateway.toml"), 12);
        assert_eq!(
            plugin.to_string(),
            "gateway.toml:12: route /chat: plugin chat.wasm: cannot read"
        );
        let config = |line| Error::Config {
            file: "gateway.toml".into(),
            line,
            message: "x".into(),
        };
        let mut errors = Errors(vec![config(20), plugin, config(3)]);
        errors.sort();
        let lines: Vec<_> = errors.0.iter().map(Error::line).collect();
        assert_eq!(lines, [Some(3), Some(12), Some(20)]);
    }

    #[test]
    fn tenants_have_their_own_routes_quotas_and_hosts() {
        let c = parse(
            "[[route]]\npath = \"/chat\"\nplugin = \"a.wasm\"\n\n\
             [[tenant]]\nname = \"acme\"\nhosts = [\"Chat.Acme.com\", \"*.acme.org\"]\n\
             max_connections = 10\ncpu_budget = \"200ms/s\"\nmax_memory_total = \"64MiB\"\n\
             max_open_files = 300\n\n\
             [[tenant.route]]\npath = \"/chat\"\nplugin = \"b.wasm\"\nmax_messages_per_second = 5\n\
             max_open_files = 20\ndirs = [{ host = \".\", guest = \"/data\" }]\n\
             env = [\"HOME\", \"MODE=prod\"]\n",
        )
        .expect("valid");
        assert_eq!(c.routes.len(), 2);
        assert_eq!(c.routes[0].tenant, None);
        assert_eq!(c.routes[1].tenant.as_deref(), Some("acme"));
        assert_eq!(c.routes[1].limits.max_messages_per_second, Some(5));
        assert_eq!(c.routes[1].max_open_files, Some(20));
        assert_eq!(c.routes[0].max_open_files, None);
        assert_eq!(c.routes[1].env[1].value.as_deref(), Some("prod"));
        let t = &c.tenants[0];
        assert_eq!(t.hosts, ["chat.acme.com", "*.acme.org"]);
        assert_eq!(t.quotas.max_connections, Some(10));
        assert_eq!(t.quotas.max_memory_total, Some(64 << 20));
        assert_eq!(t.quotas.max_open_files, Some(300));
        assert_eq!(
            t.quotas.cpu_budget,
            Some(CpuBudget {
                time: Duration::from_millis(200),
                period: Duration::from_secs(1)
            })
        );
    }

    #[test]
    fn tenant_mistakes_name_their_line() {
        let tenant = |body: &str| {
            format!("[[tenant]]\n{body}\n[[tenant.route]]\npath = \"/a\"\nplugin = \"a\"\n")
        };
        assert_eq!(
            error(&tenant("name = \"default\"\nhosts = [\"a.test\"]")),
            "2: name: \"default\" is the name of the top-level routes' tenant; choose another"
        );
        assert_eq!(
            error(&tenant("name = \"a\"")),
            "1: hosts: missing in tenant \"a\": list the host names it serves, such as hosts = [\"chat.example.com\"]"
        );
        assert_eq!(
            error(&tenant("name = \"a\"\nhosts = [\"a.*.test\"]")),
            "3: hosts: \"a.*.test\": a wildcard is only allowed as the whole first label (\"*.example.org\")"
        );
        assert_eq!(
            error(&tenant("name = \"a\"\nhosts = [\"a.test:80\"]")),
            "3: hosts: \"a.test:80\": give the host name without a port"
        );
        assert_eq!(
            error(&tenant("name = \"a\"\nhosts = [\"a.test\"]\ncpu_budget = \"2s/1s\"")),
            "4: cpu_budget: expected guest time per period like \"200ms/s\" or \"2s/10s\" (the time at most the period), found the string \"2s/1s\""
        );
        let two = format!(
            "{}{}",
            tenant("name = \"a\"\nhosts = [\"x.test\"]"),
            tenant("name = \"b\"\nhosts = [\"X.test\"]")
        );
        assert_eq!(
            error(&two),
            "9: hosts: \"x.test\" is already served by tenant \"a\""
        );
        assert_eq!(
            error(&format!("{ROUTE}max_messages_per_second = 0\n")),
            "4: max_messages_per_second: expected a number per second (at least 1), or \"off\", found the number 0"
        );
    }

    #[test]
    fn tenant_hosts_are_checked_like_host_headers() {
        let tenant = |name: &str, hosts: &str| {
            format!(
                "[[tenant]]\nname = \"{name}\"\nhosts = {hosts}\n\
                 [[tenant.route]]\npath = \"/a\"\nplugin = \"a\"\n"
            )
        };
        assert_eq!(
            error(&tenant("a", "[\"::1\"]")),
            "3: hosts: \"::1\": write an IPv6 address in brackets, as in a Host header: \"[::1]\""
        );
        assert!(parse(&tenant("a", "[\"[::1]\", \"10.0.0.1\"]")).is_ok());
        assert_eq!(
            error(&tenant("a", "[\"[::1]:80\"]")),
            "3: hosts: \"[::1]:80\": give the host name without a port"
        );
        assert_eq!(
            error(&tenant("a", "[\"a..b\"]")),
            "3: hosts: \"a..b\" has an empty label"
        );
        assert_eq!(
            error(&tenant("a", "[\"-x.com\"]")),
            "3: hosts: \"-x.com\": a label may not start or end with '-'"
        );
        assert_eq!(
            error(&tenant("a", "[]")),
            "1: hosts: tenant \"a\" lists no host name: nobody could reach it"
        );
        assert_eq!(
            error(&tenant("a", "[\"x.com\", \"X.com\"]")),
            "3: hosts: \"x.com\" is listed twice"
        );
        assert!(error(&tenant("Default", "[\"x.com\"]")).contains("is the name of the top-level"));
        let two = format!(
            "{}{}",
            tenant("a", "[\"x.com\"]"),
            tenant("A", "[\"y.com\"]")
        );
        assert!(
            error(&two).contains("is already defined (line 1; names are compared ignoring case)")
        );
    }

    #[test]
    fn the_same_path_may_be_routed_once_per_tenant() {
        let c = parse(
            "[[route]]\npath = \"/a\"\nplugin = \"a\"\n\
             [[tenant]]\nname = \"t\"\nhosts = [\"t.test\"]\n\
             [[tenant.route]]\npath = \"/a\"\nplugin = \"a\"\n",
        );
        assert!(c.is_ok());
        let e = error(
            "[[tenant]]\nname = \"t\"\nhosts = [\"t.test\"]\n\
             [[tenant.route]]\npath = \"/a\"\nplugin = \"a\"\n\
             [[tenant.route]]\npath = \"/a\"\nplugin = \"a\"\n",
        );
        assert_eq!(e, "8: path: \"/a\" is already routed (line 5)");
    }
}
