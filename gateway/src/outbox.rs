//! A connection's outbound side: one queue bounded in bytes that every sender
//! (the connection's own plugin, broadcasts, other connections' plugins, the
//! gateway's pongs and closes) pushes to, and one writer task that drains it,
//! coalescing every frame that is ready into a single write.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use crate::frame::{encode_header, OpCode};

/// A frame waiting to be written.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// A text message (the bytes are valid UTF-8).
    Text(Bytes),
    /// A binary message.
    Binary(Bytes),
    /// A ping with its payload.
    Ping(Bytes),
    /// A pong with its payload.
    Pong(Bytes),
    /// A close frame; `None` sends an empty payload.
    Close(Option<(u16, String)>),
}

/// Why a message was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// A close frame was queued or the connection is gone.
    Closed,
    /// The queue holds `max_outbound_buffer` bytes already.
    Full,
}

#[derive(Debug, Default)]
struct Queue {
    frames: VecDeque<Outbound>,
    /// Payload bytes of the data frames queued.
    bytes: usize,
    /// A close frame is queued: nothing but control frames may follow.
    closing: bool,
    /// The writer should exit once the queue is empty.
    finished: bool,
    /// The writer has stopped (socket error or finished).
    dead: bool,
}

/// The outbound queue of one connection.
#[derive(Debug)]
pub struct Outbox {
    queue: Mutex<Queue>,
    /// Wakes the writer when frames are queued.
    ready: Notify,
    /// Wakes the session when the writer dies.
    dead: Notify,
    limit: usize,
    dropped: AtomicU64,
    written: AtomicU64,
}

impl Outbox {
    /// An empty queue holding at most `limit` bytes of data frames (a single
    /// message larger than `limit` is still accepted into an empty queue).
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Outbox {
            queue: Mutex::new(Queue::default()),
            ready: Notify::new(),
            dead: Notify::new(),
            limit,
            dropped: AtomicU64::new(0),
            written: AtomicU64::new(0),
        })
    }

    /// Queues a text or binary message.
    pub fn push_data(&self, frame: Outbound) -> Result<(), PushError> {
        let len = match &frame {
            Outbound::Text(b) | Outbound::Binary(b) => b.len(),
            _ => 0,
        };
        {
            let mut q = self.queue.lock();
            if q.closing || q.dead || q.finished {
                return Err(PushError::Closed);
            }
            if q.bytes > 0 && q.bytes + len > self.limit {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return Err(PushError::Full);
            }
            q.bytes += len;
            q.frames.push_back(frame);
        }
        self.ready.notify_one();
        Ok(())
    }

    /// Queues a ping or pong, which is never refused for being over the
    /// limit. Ignored once a close frame is queued.
    pub fn push_control(&self, frame: Outbound) {
        {
            let mut q = self.queue.lock();
            if q.closing || q.dead || q.finished {
                return;
            }
            q.frames.push_back(frame);
        }
        self.ready.notify_one();
    }

    /// Queues a close frame after everything already queued; later data is
    /// refused. Returns false if a close frame was already queued.
    pub fn push_close(&self, close: Option<(u16, String)>) -> bool {
        {
            let mut q = self.queue.lock();
            if q.closing || q.dead || q.finished {
                return false;
            }
            q.closing = true;
            q.frames.push_back(Outbound::Close(close));
        }
        self.ready.notify_one();
        true
    }

    /// Tells the writer to exit once the queue is drained, and refuses
    /// anything more.
    pub fn finish(&self) {
        self.queue.lock().finished = true;
        self.ready.notify_one();
    }

    /// Whether the queue refuses data (closing or finished).
    pub fn is_closed(&self) -> bool {
        let q = self.queue.lock();
        q.closing || q.finished || q.dead
    }

    /// Resolves when the writer has stopped.
    pub async fn wait_dead(&self) {
        loop {
            let notified = self.dead.notified();
            if self.queue.lock().dead {
                return;
            }
            notified.await;
        }
    }

    /// Removes and returns everything queued, without writing it (for
    /// benchmarks and tests that have no socket behind the queue).
    pub fn drain(&self) -> Vec<Outbound> {
        let mut q = self.queue.lock();
        q.bytes = 0;
        q.frames.drain(..).collect()
    }

    /// Messages refused because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Bytes written to the socket so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Moves everything queued into `batch`; `false` when the writer should
    /// stop.
    async fn take(&self, batch: &mut VecDeque<Outbound>) -> bool {
        loop {
            {
                let mut q = self.queue.lock();
                if !q.frames.is_empty() {
                    std::mem::swap(&mut q.frames, batch);
                    q.bytes = 0;
                    return true;
                }
                if q.finished {
                    return false;
                }
            }
            self.ready.notified().await;
        }
    }

    fn mark_dead(&self) {
        self.queue.lock().dead = true;
        self.dead.notify_waiters();
    }
}

/// Frames at least this large are written from their own buffer rather than
/// copied into the coalescing buffer.
const COPY_LIMIT: usize = 64 << 10;

/// Drains `outbox` into `io` until the outbox is finished, then shuts the
/// write side down. Nothing is written after a close frame.
pub async fn run_writer<W: AsyncWrite + Unpin>(outbox: Arc<Outbox>, mut io: W) {
    let mut batch = VecDeque::new();
    // Grows with use: an idle connection holds no write buffer.
    let mut buf = BytesMut::new();
    let mut closed = false;
    'outer: while outbox.take(&mut batch).await {
        for frame in batch.drain(..) {
            if closed {
                continue;
            }
            let (opcode, payload) = match frame {
                Outbound::Text(b) => (OpCode::Text, b),
                Outbound::Binary(b) => (OpCode::Binary, b),
                Outbound::Ping(b) => (OpCode::Ping, b),
                Outbound::Pong(b) => (OpCode::Pong, b),
                Outbound::Close(c) => {
                    closed = true;
                    let mut p = BytesMut::new();
                    if let Some((code, reason)) = c {
                        p.extend_from_slice(&code.to_be_bytes());
                        p.extend_from_slice(reason.as_bytes());
                    }
                    (OpCode::Close, p.freeze())
                }
            };
            encode_header(&mut buf, true, opcode, payload.len());
            if payload.len() < COPY_LIMIT {
                buf.extend_from_slice(&payload);
            } else {
                if io.write_all(&buf).await.is_err() || io.write_all(&payload).await.is_err() {
                    break 'outer;
                }
                outbox
                    .written
                    .fetch_add((buf.len() + payload.len()) as u64, Ordering::Relaxed);
                buf.clear();
            }
        }
        batch.clear();
        if !buf.is_empty() {
            if io.write_all(&buf).await.is_err() {
                break;
            }
            outbox
                .written
                .fetch_add(buf.len() as u64, Ordering::Relaxed);
            buf.clear();
        }
        if buf.capacity() > 1 << 20 {
            buf = BytesMut::new();
        }
    }
    let _ = io.flush().await;
    let _ = io.shutdown().await;
    outbox.mark_dead();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_queue_refuses_data_but_not_control_frames() {
        let o = Outbox::new(10);
        assert_eq!(
            o.push_data(Outbound::Binary(Bytes::from_static(&[0; 8]))),
            Ok(())
        );
        assert_eq!(
            o.push_data(Outbound::Binary(Bytes::from_static(&[0; 8]))),
            Err(PushError::Full)
        );
        o.push_control(Outbound::Pong(Bytes::new()));
        assert_eq!(o.dropped(), 1);
        assert!(o.push_close(None));
        assert_eq!(
            o.push_data(Outbound::Text(Bytes::new())),
            Err(PushError::Closed)
        );
    }

    #[test]
    fn one_large_message_fits_an_empty_queue() {
        let o = Outbox::new(10);
        assert_eq!(
            o.push_data(Outbound::Binary(Bytes::from(vec![0; 100]))),
            Ok(())
        );
    }

    #[tokio::test]
    async fn writer_coalesces_and_stops_after_close() {
        let o = Outbox::new(1 << 20);
        o.push_data(Outbound::Text(Bytes::from_static(b"a")))
            .unwrap();
        o.push_data(Outbound::Binary(Bytes::from_static(b"bc")))
            .unwrap();
        o.push_close(Some((1000, "bye".into())));
        o.finish();
        let (w, mut r) = tokio::io::duplex(1024);
        run_writer(o.clone(), w).await;
        let mut out = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut r, &mut out)
            .await
            .unwrap();
        assert_eq!(
            out,
            [0x81, 1, b'a', 0x82, 2, b'b', b'c', 0x88, 5, 0x03, 0xE8, b'b', b'y', b'e']
        );
        assert_eq!(o.written(), out.len() as u64);
    }
}
