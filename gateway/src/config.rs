//! The gateway configuration: `gateway.toml`, parsed with serde + toml into
//! [`Config`], with every error naming the file, the line and the key.
//!
//! Limits live in `[server]` as defaults and any `[[route]]` can override
//! them; [`Limits`] is the resolved set a connection runs with. The reference
//! with every key and its default is in `docs/config.md`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::error::Error;

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
    /// The routes, in file order.
    pub routes: Vec<RouteSettings>,
}

/// The `[server]` table, resolved.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Address to listen on.
    pub listen: SocketAddr,
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

impl std::fmt::Display for PluginSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PluginSource::File(p) => write!(f, "{}", p.display()),
            PluginSource::Builtin(name) => write!(f, "builtin:{name}"),
        }
    }
}

/// What happens to a connection whose outbound buffer is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlowConsumer {
    /// Close it with 1008 (policy violation).
    Close,
    /// Drop the messages that do not fit, and count them.
    Drop,
}

/// How a route's plugin receives data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Deliver {
    /// Whole messages (`on-message`), reassembled and capped by
    /// `max_message_size`.
    Message,
    /// Each fragment as it arrives (`on-fragment`), capped by
    /// `max_frame_size`: messages of any total size stream through.
    Fragments,
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
        }
    }
}

/// One `[[route]]`, resolved.
#[derive(Debug, Clone)]
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
}

/// The limit keys allowed both in `[server]` (defaults) and in `[[route]]`
/// (overrides), declared once.
macro_rules! limit_keys {
    ($(#[$meta:meta])* struct $name:ident { $($extra:tt)* }) => {
        $(#[$meta])*
        #[derive(Debug, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct $name {
            max_frame_size: Option<Size>,
            max_message_size: Option<Size>,
            max_outbound_buffer: Option<Size>,
            slow_consumer: Option<SlowConsumer>,
            idle_timeout: Option<Timeout>,
            ping_interval: Option<Timeout>,
            pong_timeout: Option<Timeout>,
            close_timeout: Option<Timeout>,
            max_connections: Option<usize>,
            $($extra)*
        }
    };
}

limit_keys! {
    /// `[server]` as written.
    struct RawServer {
        listen: Option<SocketAddr>,
        handshake_timeout: Option<Timeout>,
        max_header_size: Option<Size>,
        drain_timeout: Option<Timeout>,
        threads: Option<usize>,
    }
}

limit_keys! {
    /// `[[route]]` as written.
    struct RawRoute {
        path: Option<Spanned<String>>,
        plugin: Option<Spanned<String>>,
        #[serde(default)]
        config: BTreeMap<String, String>,
        allowed_origins: Option<Vec<String>>,
        subprotocols: Option<Vec<String>>,
        deliver: Option<Deliver>,
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSandbox {
    max_memory: Option<Size>,
    max_call_time: Option<Timeout>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    sandbox: RawSandbox,
    #[serde(default)]
    route: Vec<Spanned<RawRoute>>,
}

/// A byte size: an integer, or a string such as `"64KiB"`, `"16 MiB"`.
#[derive(Debug, Clone, Copy)]
struct Size(usize);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Int(u64),
            Text(String),
        }
        match Repr::deserialize(d)? {
            Repr::Int(n) => usize::try_from(n)
                .map(Size)
                .map_err(|_| serde::de::Error::custom("size too large")),
            Repr::Text(s) => parse_size(&s).map(Size).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "invalid size {s:?}: expected bytes as an integer or a number with B, KiB, MiB or GiB"
                ))
            }),
        }
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

/// A duration: a string such as `"30s"`, `"500ms"`, `"2m"`, or `"off"`
/// (or `"0s"`) where the key allows turning it off.
#[derive(Debug, Clone, Copy)]
struct Timeout(Option<Duration>);

impl<'de> Deserialize<'de> for Timeout {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s).map(Timeout).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "invalid duration {s:?}: expected a number with ms, s, m or h (\"30s\"), or \"off\""
            ))
        })
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

/// The 1-based line of byte offset `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    text.as_bytes()[..at.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(file: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(file).map_err(|source| Error::ConfigRead {
            file: file.to_owned(),
            source,
        })?;
        Config::parse(&text, file)
    }

    /// Parses and validates config text; `file` names it in errors and
    /// anchors relative plugin paths.
    pub fn parse(text: &str, file: &Path) -> Result<Config, Error> {
        let err = |at: usize, message: String| Error::Config {
            file: file.to_owned(),
            line: line_of(text, at),
            message,
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let at = e.span().map(|s| s.start).unwrap_or(0);
            err(at, e.message().trim().to_owned())
        })?;

        let defaults = Limits::default();
        let s = &raw.server;
        let base = Limits {
            max_frame_size: s.max_frame_size.map_or(defaults.max_frame_size, |v| v.0),
            max_message_size: s
                .max_message_size
                .map_or(defaults.max_message_size, |v| v.0),
            max_outbound_buffer: s
                .max_outbound_buffer
                .map_or(defaults.max_outbound_buffer, |v| v.0),
            slow_consumer: s.slow_consumer.unwrap_or(defaults.slow_consumer),
            idle_timeout: s.idle_timeout.map_or(defaults.idle_timeout, |v| v.0),
            ping_interval: s.ping_interval.map_or(defaults.ping_interval, |v| v.0),
            pong_timeout: required(s.pong_timeout, defaults.pong_timeout),
            close_timeout: required(s.close_timeout, defaults.close_timeout),
        };
        let server = ServerSettings {
            listen: s
                .listen
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080))),
            max_connections: s.max_connections.unwrap_or(10_000),
            handshake_timeout: required(s.handshake_timeout, Duration::from_secs(10)),
            max_header_size: s.max_header_size.map_or(16 << 10, |v| v.0.max(8192)),
            drain_timeout: required(s.drain_timeout, Duration::from_secs(10)),
            threads: s.threads.unwrap_or(0),
        };
        let sandbox = SandboxSettings {
            max_memory: raw.sandbox.max_memory.map_or(64 << 20, |v| v.0),
            max_call_time: required(raw.sandbox.max_call_time, Duration::from_secs(1)),
        };

        let mut routes: Vec<RouteSettings> = Vec::new();
        for spanned in raw.route {
            let at = spanned.span().start;
            let r = spanned.into_inner();
            let path = r
                .path
                .ok_or_else(|| err(at, "route: missing key `path`".into()))?;
            if !path.get_ref().starts_with('/') {
                return Err(err(
                    path.span().start,
                    format!("route: `path` {:?} must start with '/'", path.get_ref()),
                ));
            }
            if routes.iter().any(|x| &x.path == path.get_ref()) {
                return Err(err(
                    path.span().start,
                    format!("route: `path` {:?} is already routed", path.get_ref()),
                ));
            }
            let plugin = r.plugin.ok_or_else(|| {
                err(
                    at,
                    format!("route {}: missing key `plugin`", path.get_ref()),
                )
            })?;
            let line = line_of(text, plugin.span().start);
            let source = match plugin.get_ref().strip_prefix("builtin:") {
                Some(name) => PluginSource::Builtin(name.to_owned()),
                None => {
                    let p = Path::new(plugin.get_ref());
                    let dir = file.parent().unwrap_or(Path::new(""));
                    PluginSource::File(if p.is_absolute() {
                        p.to_owned()
                    } else {
                        dir.join(p)
                    })
                }
            };
            let limits = Limits {
                max_frame_size: r.max_frame_size.map_or(base.max_frame_size, |v| v.0),
                max_message_size: r.max_message_size.map_or(base.max_message_size, |v| v.0),
                max_outbound_buffer: r
                    .max_outbound_buffer
                    .map_or(base.max_outbound_buffer, |v| v.0),
                slow_consumer: r.slow_consumer.unwrap_or(base.slow_consumer),
                idle_timeout: r.idle_timeout.map_or(base.idle_timeout, |v| v.0),
                ping_interval: r.ping_interval.map_or(base.ping_interval, |v| v.0),
                pong_timeout: required(r.pong_timeout, base.pong_timeout),
                close_timeout: required(r.close_timeout, base.close_timeout),
            };
            routes.push(RouteSettings {
                path: path.into_inner(),
                plugin: source,
                line,
                config: r.config,
                limits,
                allowed_origins: r.allowed_origins,
                subprotocols: r.subprotocols,
                max_connections: r.max_connections,
                deliver: r.deliver.unwrap_or(Deliver::Message),
            });
        }
        if routes.is_empty() {
            return Err(err(
                0,
                "no [[route]] defined: the gateway would serve nothing".into(),
            ));
        }
        Ok(Config {
            file: file.to_owned(),
            server,
            sandbox,
            routes,
        })
    }
}

/// A duration that cannot be turned off: "off" falls back to the default.
fn required(v: Option<Timeout>, default: Duration) -> Duration {
    v.and_then(|t| t.0).unwrap_or(default)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, Error> {
        Config::parse(text, Path::new("/etc/wasmgate/gateway.toml"))
    }

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
        let e = parse("[server]\n\nping_interval = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains(":3: ") && e.contains("invalid duration"), "{e}");
        let e = parse("[server]\nmax_frame_size = \"12 parsecs\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains(":2: ") && e.contains("invalid size"), "{e}");
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
}
