//! A plugin's standard output and error, turned into log events.
//!
//! Whatever a plugin writes to stdout or stderr (a Rust guest's panic
//! message, a `println!`) becomes one `tracing` event per line at the
//! `wasmgate::plugin::output` target, tagged with the tenant, the route, the
//! plugin file and version and the connection, instead of reaching the
//! gateway's own stderr unattributed. Lines longer than [`MAX_LINE`] bytes
//! are cut there; a partial last line is written when the stream is
//! dropped. Output lines and `log` calls share one rate limit per
//! connection and one per tenant ([`admit_line`]): a plugin cannot flood
//! the gateway's log.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError, StreamResult};

use crate::hub::{take, ConnHandle, Hub};
use crate::plugin::host::Scope;

/// Longest line logged, in bytes; the rest of a longer line is dropped and
/// the line marked as cut.
pub const MAX_LINE: usize = 4096;

/// The most bytes one `output-stream.write` to stdout or stderr may carry,
/// as `check-write` says: 64 KiB, wasmtime-wasi's figure for its own
/// streams. A longer write traps (WASI 0.2, `wasi:io/streams`).
pub const WRITE_PERMIT: usize = 64 << 10;

/// Which of the two output streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output: logged at info level.
    Stdout,
    /// Standard error: logged at warn level.
    Stderr,
}

/// What a plugin instance's output lines are tagged with.
#[derive(Debug, Clone)]
pub struct Tags {
    /// The route as the instance sees it: tenant, path, plugin file and
    /// version, and the per-connection log rate.
    pub scope: Arc<Scope>,
    /// The route's connections, to meter lines per connection.
    pub hub: Arc<Hub>,
    /// The connection whose event the instance is handling (a shared
    /// instance's changes from call to call).
    pub conn: Arc<AtomicU64>,
}

/// Whether one more log line (a `log` call or an output line) made for
/// `conn` fits the route's `max_log_lines_per_second` per connection and
/// the tenant's; if not it is dropped and counted. The first drop on a
/// connection is announced once; the count dropped is reported with the
/// next line that gets through, at most once a second.
pub fn admit_line(scope: &Scope, conn: Option<&ConnHandle>) -> bool {
    let rate = scope.limits.max_log_lines_per_second;
    let (tenant, route) = (&*scope.tenant.name, &*scope.route);
    let Some(conn) = conn else {
        return scope.tenant.meters.log_lines.take(1);
    };
    let mut rates = conn.rates.lock();
    let ok = take(&mut rates.log_lines, rate, 1) && scope.tenant.meters.log_lines.take(1);
    if !ok {
        rates.log_dropped += 1;
        // Once per connection, and at most once a second per tenant (a
        // plugin reconnecting does not multiply the warnings).
        if !std::mem::replace(&mut rates.log_warned, true)
            && scope.tenant.counts.log_drops.admit().is_some()
        {
            tracing::warn!(
                tenant = %tenant, route = %route, plugin = %scope.plugin, conn = conn.id,
                "plugin log lines over the rate limit (max_log_lines_per_second): dropping them until the rate allows, then reporting how many"
            );
        }
        return false;
    }
    let now = std::time::Instant::now();
    let due = rates
        .log_reported
        .is_none_or(|at| now.duration_since(at) >= std::time::Duration::from_secs(1));
    let dropped =
        if due && rates.log_dropped > 0 && scope.tenant.counts.drop_reports.admit().is_some() {
            rates.log_reported = Some(now);
            std::mem::take(&mut rates.log_dropped)
        } else {
            0
        };
    drop(rates);
    if dropped > 0 {
        tracing::warn!(
            tenant = %tenant, route = %route, plugin = %scope.plugin, conn = conn.id, dropped,
            "{dropped} plugin log lines were dropped (over max_log_lines_per_second)"
        );
    }
    true
}

/// `bytes` as one printable log line: invalid UTF-8 replaced, a trailing
/// carriage return removed, and control characters (a carriage return that
/// would overwrite the line's tags on a terminal, escape sequences) shown
/// escaped. At most [`MAX_LINE`] bytes of it; `cut` (or a longer line) is
/// marked.
pub fn printable(bytes: &[u8], cut: bool) -> String {
    let cut = cut || bytes.len() > MAX_LINE;
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_LINE)]);
    let mut text: String = text
        .trim_end_matches('\r')
        .chars()
        .flat_map(|c| {
            let escaped = c.is_control() && c != '\t';
            let shown: Vec<char> = if escaped {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            shown
        })
        .collect();
    if cut {
        text.push_str(" [line cut]");
    }
    text
}

/// One of a plugin instance's output streams, given to its WASI context.
#[derive(Debug, Clone)]
pub struct GuestOutput {
    stream: Stream,
    tags: Tags,
}

impl GuestOutput {
    /// The `stream` of an instance tagged with `tags`.
    pub fn new(stream: Stream, tags: Tags) -> Self {
        GuestOutput { stream, tags }
    }

    fn sink(&self) -> LineSink {
        LineSink {
            stream: self.stream,
            tags: self.tags.clone(),
            line: Vec::new(),
            cut: false,
        }
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.sink())
    }

    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.sink())
    }
}

/// Collects bytes into lines and logs each complete one.
struct LineSink {
    stream: Stream,
    tags: Tags,
    line: Vec<u8>,
    /// The current line passed [`MAX_LINE`]: the rest of it is dropped.
    cut: bool,
}

impl LineSink {
    fn push(&mut self, mut bytes: &[u8]) {
        while let Some(nl) = memchr::memchr(b'\n', bytes) {
            self.append(&bytes[..nl]);
            self.emit();
            bytes = &bytes[nl + 1..];
        }
        self.append(bytes);
    }

    fn append(&mut self, bytes: &[u8]) {
        let room = MAX_LINE.saturating_sub(self.line.len());
        if bytes.len() > room {
            self.cut = true;
        }
        self.line.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    fn emit(&mut self) {
        if self.line.is_empty() && !self.cut {
            // Blank lines (a Rust panic message starts with one) say nothing.
            return;
        }
        let blank = !self.cut && self.line.iter().all(u8::is_ascii_whitespace);
        let id = self.tags.conn.load(Ordering::Relaxed);
        // Metered before it is formatted: a dropped line costs little.
        let admitted = !blank && {
            let conn = self.tags.hub.get(id).ok();
            admit_line(&self.tags.scope, conn.as_deref())
        };
        let text = admitted.then(|| printable(&self.line, self.cut));
        self.line.clear();
        self.cut = false;
        let Some(text) = text else {
            return;
        };
        let scope = &self.tags.scope;
        let (tenant, route) = (&*scope.tenant.name, &*scope.route);
        let (plugin, version) = (&*scope.plugin, scope.version);
        match self.stream {
            Stream::Stdout => tracing::info!(
                target: "wasmgate::plugin::output",
                tenant = %tenant, route = %route, plugin = %plugin, version, conn = id, stream = "stdout", "{text}"
            ),
            Stream::Stderr => tracing::warn!(
                target: "wasmgate::plugin::output",
                tenant = %tenant, route = %route, plugin = %plugin, version, conn = id, stream = "stderr", "{text}"
            ),
        }
    }
}

impl Drop for LineSink {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            self.emit();
        }
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LineSink {
    async fn ready(&mut self) {}
}

impl OutputStream for LineSink {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        // WASI 0.2's `output-stream.write` traps past the permit that
        // `check-write` gives; wasmtime-wasi leaves that check to the
        // stream. Unchecked, one call could hand the host megabytes of
        // lines to split and meter, a host cost outside the call's time
        // limit.
        if bytes.len() > WRITE_PERMIT {
            return Err(StreamError::trap(&format!(
                "a plugin wrote {} bytes to its output at once, past the {WRITE_PERMIT} that check-write allows",
                bytes.len()
            )));
        }
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(WRITE_PERMIT)
    }
}

impl AsyncWrite for LineSink {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
