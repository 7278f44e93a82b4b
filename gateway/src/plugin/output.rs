//! A plugin's standard output and error, turned into log events.
//!
//! Whatever a plugin writes to stdout or stderr (a Rust guest's panic
//! message, a `println!`) becomes one `tracing` event per line at the
//! `wasmgate::plugin::output` target, tagged with the route, the plugin file
//! and the connection, instead of reaching the gateway's own stderr
//! unattributed. Lines longer than [`MAX_LINE`] bytes are cut there; a
//! partial last line is written when the stream is dropped.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// Longest line logged, in bytes; the rest of a longer line is dropped and
/// the line marked as cut.
pub const MAX_LINE: usize = 4096;

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
    /// The route's path.
    pub route: Arc<str>,
    /// The plugin file (or `builtin:<name>`).
    pub plugin: Arc<str>,
    /// The connection whose event the instance is handling (a shared
    /// instance's changes from call to call).
    pub conn: Arc<AtomicU64>,
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
        while let Some(nl) = bytes.iter().position(|&b| b == b'\n') {
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
        let text = String::from_utf8_lossy(&self.line);
        // Control characters (a carriage return that would overwrite the
        // line's tags on a terminal, escape sequences) are shown escaped.
        let text: String = text
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
        if text.is_empty() && !self.cut {
            // Blank lines (a Rust panic message starts with one) say nothing.
            return;
        }
        let (route, plugin, conn) = (
            &*self.tags.route,
            &*self.tags.plugin,
            self.tags.conn.load(Ordering::Relaxed),
        );
        let cut = if self.cut { " [line cut]" } else { "" };
        match self.stream {
            Stream::Stdout => tracing::info!(
                target: "wasmgate::plugin::output",
                route = %route, plugin = %plugin, conn, stream = "stdout", "{text}{cut}"
            ),
            Stream::Stderr => tracing::warn!(
                target: "wasmgate::plugin::output",
                route = %route, plugin = %plugin, conn, stream = "stderr", "{text}{cut}"
            ),
        }
        self.line.clear();
        self.cut = false;
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
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 << 10)
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
