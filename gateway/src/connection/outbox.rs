//! A connection's outbound side: one queue bounded in bytes that every sender
//! (the connection's own plugin, broadcasts, other connections' plugins, the
//! gateway's pongs and closes) pushes to, and the [`Writer`] with which the
//! connection's own task drains it, encoding every frame that is ready and
//! writing them with as few system calls as the socket allows: headers and
//! small payloads are copied together into one buffer, large payloads are
//! written from where they are (one vectored write for all of it).

use std::collections::VecDeque;
use std::future::Future;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use crate::protocol::deflate::{Agreed, Deflater};
use crate::protocol::frame::{encode_header, OpCode};

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

/// What one queued message costs beyond its payload (its queue slot, the
/// allocation's header and rounding), counted against `max_outbound_buffer`
/// so that many small (or empty) messages cannot hold more memory than the
/// limit says.
pub const MESSAGE_OVERHEAD: usize = 64;

/// Most pongs queued at once (each at most 125 bytes).
pub const MAX_PONGS: usize = 16;

#[derive(Debug, Default)]
struct Queue {
    frames: VecDeque<Outbound>,
    /// Pongs due, at most [`MAX_PONGS`]: past that the newest replaces the
    /// last queued (RFC 6455 section 5.5.3 allows answering only the most
    /// recent ping), so a peer that pings without reading cannot make pongs
    /// pile up.
    pongs: VecDeque<Bytes>,
    /// Bytes of the data frames queued: payloads plus
    /// [`MESSAGE_OVERHEAD`] each.
    bytes: usize,
    /// A close frame is queued: nothing but control frames may follow.
    closing: bool,
    /// The connection is ending: nothing more is accepted.
    finished: bool,
}

/// The outbound queue of one connection.
#[derive(Debug)]
pub struct Outbox {
    queue: Mutex<Queue>,
    /// Wakes the connection's task when frames are queued.
    ready: Notify,
    limit: usize,
    dropped: AtomicU64,
}

impl Outbox {
    /// An empty queue holding at most `limit` bytes of data frames (a single
    /// message larger than `limit` is still accepted into an empty queue).
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Outbox {
            queue: Mutex::new(Queue::default()),
            ready: Notify::new(),
            limit,
            dropped: AtomicU64::new(0),
        })
    }

    /// Queues a text or binary message.
    pub fn push_data(&self, frame: Outbound) -> Result<(), PushError> {
        let len = MESSAGE_OVERHEAD
            + match &frame {
                Outbound::Text(b) | Outbound::Binary(b) => b.len(),
                _ => 0,
            };
        {
            let mut q = self.queue.lock();
            if q.closing || q.finished {
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
            if q.closing || q.finished {
                return;
            }
            match frame {
                Outbound::Pong(payload) => {
                    if q.pongs.len() >= MAX_PONGS {
                        q.pongs.pop_back();
                    }
                    q.pongs.push_back(payload);
                }
                other => q.frames.push_back(other),
            }
        }
        self.ready.notify_one();
    }

    /// Queues a close frame after everything already queued; later data is
    /// refused. Returns false if a close frame was already queued.
    pub fn push_close(&self, close: Option<(u16, String)>) -> bool {
        {
            let mut q = self.queue.lock();
            if q.closing || q.finished {
                return false;
            }
            q.closing = true;
            q.frames.push_back(Outbound::Close(close));
        }
        self.ready.notify_one();
        true
    }

    /// Refuses anything more (the connection is ending); what is queued
    /// can still be drained.
    pub fn finish(&self) {
        self.queue.lock().finished = true;
    }

    /// Resolves when frames may have been queued since the last
    /// [`Writer::fill`]. Cheap to keep pinned across polls.
    pub fn ready(&self) -> tokio::sync::futures::Notified<'_> {
        self.ready.notified()
    }

    /// Whether the queue refuses data (closing or finished).
    pub fn is_closed(&self) -> bool {
        let q = self.queue.lock();
        q.closing || q.finished
    }

    /// Removes and returns everything queued, without writing it (for
    /// benchmarks and tests that have no socket behind the queue).
    pub fn drain(&self) -> Vec<Outbound> {
        let mut q = self.queue.lock();
        q.bytes = 0;
        let pongs: Vec<Outbound> = q.pongs.drain(..).map(Outbound::Pong).collect();
        pongs.into_iter().chain(q.frames.drain(..)).collect()
    }

    /// Messages refused because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Moves everything queued into `batch`; false if nothing was queued.
    fn take(&self, batch: &mut VecDeque<Outbound>) -> bool {
        let mut q = self.queue.lock();
        if q.frames.is_empty() && q.pongs.is_empty() {
            return false;
        }
        std::mem::swap(&mut q.frames, batch);
        while let Some(pong) = q.pongs.pop_back() {
            batch.push_front(Outbound::Pong(pong));
        }
        q.bytes = 0;
        true
    }
}

/// The smallest payload written from its own buffer rather than copied
/// after its header: 2 KiB. Copying is what lets many small frames go out in
/// one system call, and costs little below this size. Above it the copy is
/// the cost: measured 2026-12-02 on this project's machine (AMD EPYC, glibc
/// 2.36), copying a 16 KiB payload after its 4-byte header (`rep movsb` on
/// a destination not aligned like the source) took about a quarter of the
/// gateway's CPU time on the 10 × 16 KiB echo, several times what the
/// same-sized copies into and out of the guest cost.
pub const ZERO_COPY_MIN: usize = 2048;

/// The most buffers one vectored write hands to the socket; what is left
/// goes in the next write.
const WRITE_SLICES: usize = 64;

/// Encoded frames on their way to the socket. The connection's task fills
/// it from the [`Outbox`] only once everything before has been written, so
/// memory stays bounded by `max_outbound_buffer` plus one batch.
#[derive(Debug, Default)]
pub struct Writer {
    /// Encoded output that goes before `buf`: earlier runs of `buf`, and
    /// large payloads as they were queued (shared, not copied). Empty
    /// unless a large payload was encoded. The first may be partly written
    /// (its written bytes are advanced past).
    ready: VecDeque<Bytes>,
    /// Headers and small payloads, after everything in `ready`.
    buf: BytesMut,
    /// How much of `buf` was written.
    pos: usize,
    batch: VecDeque<Outbound>,
    /// A close frame was encoded: nothing follows it.
    closed: bool,
    /// A compressed message on its way into `buf`.
    scratch: Vec<u8>,
    /// Text and binary frames encoded so far.
    messages: u64,
    /// Their payload bytes, before compression.
    bytes: u64,
    /// permessage-deflate, when agreed.
    deflate: Option<OutboundDeflate>,
}

/// A connection's outbound compression: what was agreed, and its own
/// compressor when it keeps context between messages.
#[derive(Debug)]
struct OutboundDeflate {
    agreed: Agreed,
    /// `None` without context takeover: the thread's shared compressor is
    /// used, reset after each message.
    own: Option<Box<Deflater>>,
}

impl Writer {
    /// Compresses text and binary messages of at least the agreed minimum
    /// size from now on (permessage-deflate was negotiated).
    pub fn compress(&mut self, agreed: Agreed) {
        let own = (!agreed.server_no_context_takeover).then(|| {
            Box::new(Deflater::new(
                agreed.server_max_window_bits,
                agreed.settings.level,
            ))
        });
        self.deflate = Some(OutboundDeflate { agreed, own });
    }

    /// Text and binary messages encoded for the socket so far.
    pub fn messages_sent(&self) -> u64 {
        self.messages
    }

    /// The payload bytes of those messages, before compression.
    pub fn bytes_sent(&self) -> u64 {
        self.bytes
    }

    /// Whether everything encoded has been written.
    pub fn is_empty(&self) -> bool {
        self.ready.is_empty() && self.pos == self.buf.len()
    }

    /// Frees the buffers of a writer with nothing pending (does nothing
    /// otherwise); the next batch allocates them again.
    pub fn release_buffers(&mut self) {
        if self.is_empty() {
            self.buf = BytesMut::new();
            self.pos = 0;
            self.ready = VecDeque::new();
            self.batch = VecDeque::new();
            self.scratch = Vec::new();
        }
    }

    /// The bytes still to write, as up to `slices.len()` buffers in order;
    /// returns how many were set.
    pub fn pending<'a>(&'a self, slices: &mut [IoSlice<'a>]) -> usize {
        let rest = &self.buf[self.pos..];
        let parts = self.ready.iter().map(|b| &b[..]).chain([rest]);
        let mut n = 0;
        for (slot, part) in slices.iter_mut().zip(parts.filter(|p| !p.is_empty())) {
            *slot = IoSlice::new(part);
            n += 1;
        }
        n
    }

    /// Records that the first `n` bytes of [`Writer::pending`] were
    /// written.
    pub fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.ready.front_mut() else {
                break;
            };
            if n < front.len() {
                bytes::Buf::advance(front, n);
                return;
            }
            n -= front.len();
            self.ready.pop_front();
        }
        debug_assert!(
            self.pos + n <= self.buf.len(),
            "advanced past what was pending"
        );
        self.pos = (self.pos + n).min(self.buf.len());
        if self.is_empty() {
            self.pos = 0;
            self.buf.clear();
            if self.buf.capacity() > 1 << 20 {
                // A large message passed: do not keep its buffer.
                self.buf = BytesMut::new();
            }
        }
    }

    /// Writes some of what is pending to `io`, and returns how many bytes
    /// it took (0: the peer is gone): a plain write when all of it is in
    /// one buffer (small frames), else one vectored write. Cancel-safe: a
    /// write that completes is recorded in the same poll.
    pub fn write_to<'a, W: AsyncWrite + Unpin>(
        &'a mut self,
        io: &'a mut W,
    ) -> impl Future<Output = std::io::Result<usize>> + 'a {
        std::future::poll_fn(move |cx| {
            let written = if self.ready.is_empty() {
                Pin::new(&mut *io).poll_write(cx, &self.buf[self.pos..])
            } else {
                // On the stack of this poll only: the future stays small.
                let mut slices = [IoSlice::new(&[]); WRITE_SLICES];
                let count = self.pending(&mut slices);
                Pin::new(&mut *io).poll_write_vectored(cx, &slices[..count])
            };
            let n = std::task::ready!(written)?;
            self.advance(n);
            Poll::Ready(Ok(n))
        })
    }

    /// Moves what `buf` holds to the end of `ready`, its allocation with
    /// it (split off instead, `buf` would keep the allocation's tail, and
    /// the drop of buffers over 1 MiB in [`Writer::advance`] would see only
    /// that). Only while encoding, which starts with nothing pending, so
    /// none of `buf` was written.
    fn seal(&mut self) {
        debug_assert_eq!(self.pos, 0);
        if !self.buf.is_empty() {
            self.ready.push_back(std::mem::take(&mut self.buf).freeze());
        }
    }

    /// Encodes one frame's header and its payload: copied after the header
    /// when small, queued as it is when large ([`ZERO_COPY_MIN`]).
    fn encode(&mut self, compressed: bool, opcode: OpCode, payload: Bytes) {
        encode_header(&mut self.buf, true, compressed, opcode, payload.len());
        if payload.len() < ZERO_COPY_MIN {
            self.buf.extend_from_slice(&payload);
        } else {
            self.seal();
            self.ready.push_back(payload);
        }
    }

    /// Encodes everything queued in `outbox` (if all before was written);
    /// returns whether there is anything to write.
    pub fn fill(&mut self, outbox: &Outbox) -> bool {
        if self.is_empty() && outbox.take(&mut self.batch) {
            // Taken out for the loop (and put back, keeping its allocation).
            let mut batch = std::mem::take(&mut self.batch);
            for frame in batch.drain(..) {
                if self.closed {
                    continue;
                }
                let (opcode, payload) = match frame {
                    Outbound::Text(b) => {
                        self.messages += 1;
                        self.bytes += b.len() as u64;
                        (OpCode::Text, b)
                    }
                    Outbound::Binary(b) => {
                        self.messages += 1;
                        self.bytes += b.len() as u64;
                        (OpCode::Binary, b)
                    }
                    Outbound::Ping(b) => (OpCode::Ping, b),
                    Outbound::Pong(b) => (OpCode::Pong, b),
                    Outbound::Close(c) => {
                        self.closed = true;
                        let mut p = BytesMut::new();
                        if let Some((code, reason)) = c {
                            p.extend_from_slice(&code.to_be_bytes());
                            p.extend_from_slice(reason.as_bytes());
                        }
                        (OpCode::Close, p.freeze())
                    }
                };
                let compress = matches!(opcode, OpCode::Text | OpCode::Binary)
                    && self
                        .deflate
                        .as_ref()
                        .is_some_and(|d| payload.len() >= d.agreed.settings.min_size);
                match (&mut self.deflate, compress) {
                    (Some(d), true) => {
                        self.scratch.clear();
                        let reset = d.agreed.server_no_context_takeover;
                        match &mut d.own {
                            Some(own) => own.compress(&payload, &mut self.scratch, reset),
                            None => {
                                let (bits, level) =
                                    (d.agreed.server_max_window_bits, d.agreed.settings.level);
                                Deflater::compress_shared(&payload, bits, level, &mut self.scratch)
                            }
                        }
                        // Data that did not shrink goes as it is, where the
                        // compressor keeps nothing between messages (with
                        // context takeover the client's window must see
                        // every message the compressor saw).
                        if reset && self.scratch.len() >= payload.len() {
                            self.encode(false, opcode, payload);
                        } else {
                            encode_header(&mut self.buf, true, true, opcode, self.scratch.len());
                            self.buf.extend_from_slice(&self.scratch);
                        }
                        if self.scratch.capacity() > 1 << 20 {
                            self.scratch = Vec::new();
                        }
                    }
                    _ => self.encode(false, opcode, payload),
                }
            }
            self.batch = batch;
        }
        !self.is_empty()
    }

    /// Writes out everything encoded and queued, then shuts the write side
    /// down (the connection is ending).
    pub async fn finish<W: AsyncWrite + Unpin>(&mut self, outbox: &Outbox, io: &mut W) {
        while self.fill(outbox) {
            match self.write_to(io).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
        let _ = io.flush().await;
        let _ = io.shutdown().await;
    }
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
    fn empty_messages_count_against_the_limit() {
        let o = Outbox::new(MESSAGE_OVERHEAD * 10);
        let queued = (0..100)
            .filter(|_| o.push_data(Outbound::Binary(Bytes::new())).is_ok())
            .count();
        assert_eq!(queued, 10);
    }

    #[test]
    fn pongs_to_a_peer_that_does_not_read_stay_bounded_and_answer_the_latest_ping() {
        let o = Outbox::new(1 << 20);
        for i in 0..1000u16 {
            o.push_control(Outbound::Pong(Bytes::from(i.to_be_bytes().to_vec())));
        }
        let q = o.drain();
        assert_eq!(q.len(), MAX_PONGS);
        assert!(matches!(&q[MAX_PONGS - 1], Outbound::Pong(p) if p[..] == 999u16.to_be_bytes()));
        assert!(matches!(&q[0], Outbound::Pong(p) if p[..] == 0u16.to_be_bytes()));
    }

    #[test]
    fn one_large_message_fits_an_empty_queue() {
        let o = Outbox::new(10);
        assert_eq!(
            o.push_data(Outbound::Binary(Bytes::from(vec![0; 100]))),
            Ok(())
        );
    }

    /// Everything `w` has pending, in one piece.
    fn pending(w: &Writer) -> Vec<u8> {
        let mut slices = [IoSlice::new(&[]); WRITE_SLICES];
        let n = w.pending(&mut slices);
        slices[..n].iter().flat_map(|s| s.iter().copied()).collect()
    }

    #[test]
    fn large_payloads_are_written_from_their_own_buffers_in_order() {
        let o = Outbox::new(1 << 20);
        let big = Bytes::from(vec![7u8; ZERO_COPY_MIN]);
        o.push_data(Outbound::Text(Bytes::from_static(b"a")))
            .unwrap();
        o.push_data(Outbound::Binary(big.clone())).unwrap();
        o.push_data(Outbound::Text(Bytes::from_static(b"z")))
            .unwrap();
        let mut w = Writer::default();
        assert!(w.fill(&o));
        let mut slices = [IoSlice::new(&[]); WRITE_SLICES];
        assert_eq!(w.pending(&mut slices), 3);
        // The large payload is the queued buffer itself, not a copy.
        assert_eq!(slices[1].as_ptr(), big.as_ptr());
        let mut expected = vec![0x81, 1, b'a', 0x82, 126, 0x08, 0x00];
        expected.extend_from_slice(&big);
        expected.extend_from_slice(&[0x81, 1, b'z']);
        assert_eq!(pending(&w), expected);
        // Partial writes across the buffers keep the order.
        let mut written = Vec::new();
        for step in [5, 1000, 1050, 3] {
            let p = pending(&w);
            written.extend_from_slice(&p[..step]);
            w.advance(step);
        }
        assert_eq!(written, expected);
        assert!(w.is_empty());
    }

    #[tokio::test]
    async fn writer_coalesces_and_stops_after_close() {
        let o = Outbox::new(1 << 20);
        o.push_data(Outbound::Text(Bytes::from_static(b"a")))
            .unwrap();
        o.push_data(Outbound::Binary(Bytes::from_static(b"bc")))
            .unwrap();
        o.push_close(Some((1000, "bye".into())));
        let mut w = Writer::default();
        assert!(w.fill(&o));
        assert_eq!(
            pending(&w),
            [0x81, 1, b'a', 0x82, 2, b'b', b'c', 0x88, 5, 0x03, 0xE8, b'b', b'y', b'e']
        );
        // A partial write leaves the rest; nothing new is taken meanwhile.
        w.advance(3);
        o.push_control(Outbound::Pong(Bytes::new()));
        assert!(w.fill(&o));
        assert_eq!(pending(&w).len(), 11);
        w.advance(11);
        // Nothing is encoded after the close frame.
        let (mut tx, mut rx) = tokio::io::duplex(1024);
        w.finish(&o, &mut tx).await;
        drop(tx);
        let mut out = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut rx, &mut out)
            .await
            .unwrap();
        assert!(out.is_empty(), "{out:?}");
    }
}
