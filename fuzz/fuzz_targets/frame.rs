//! Fuzz target `frame`: the frame reader (`protocol/frame.rs`) and message
//! reassembly (`protocol/message.rs`), driven the way a connection drives
//! them (`connection/session.rs`).
//!
//! # Input
//!
//! | byte | meaning |
//! |---|---|
//! | 0 | bits 0-2: `max_frame_size` (one of [`FRAME_SIZES`]); bits 3-5: `max_message_size` (one of [`MESSAGE_SIZES`]); bit 6: `deliver = "fragments"`; bit 7: the first chunk arrives with the upgrade request (`FrameReader::new`) |
//! | 1 | number of read steps, modulo 17 |
//! | next, one per step | bits 0-5: chunk length minus 1; bits 6-7: how it arrives: a read; a cancelled read, then a read; a parked connection (`release_buffer`, then `feed`); one byte per read |
//! | the rest | the bytes the client sends |
//!
//! The steps are used in turn, over and over, until every byte has arrived
//! (no step: all at once); then the peer closes the TCP connection.
//!
//! # What is checked
//!
//! The same bytes go through the reader twice, all at once and split as the
//! steps say, and through a reference decoder written from RFC 6455
//! ([`model`]). The two runs must give the same events (frames, close
//! payloads, messages or fragments, and how the connection ended), and
//! those events must be the model's:
//! - every frame the reader returns is on the wire as the model decodes it
//!   (payload unmasked, within `max_frame_size`; a control frame final and
//!   at most 125 bytes), and every complete frame that breaks no rule is
//!   returned;
//! - every message is the concatenation of its fragments, within
//!   `max_message_size`, and valid UTF-8 when it is text (also checked when
//!   fragments are delivered one by one, where only the reader validates);
//! - a protocol error is one of the rules the offending frame breaks, is
//!   reported as soon as the bytes received show it (never an end of input
//!   instead), and earns the close code section 7.4.1 gives it (1002, 1007
//!   or 1009); a UTF-8 error always comes from the reader, before the
//!   message layer sees the frame;
//! - close payloads parse as the RFC says (code ranges, UTF-8 reason);
//! - whenever a read is cancelled, `FrameReader::is_idle` says exactly
//!   whether bytes are buffered or a fragmented message is part-way
//!   (which is what lets a connection hibernate and release its buffer).
//!
//! Unlike a connection, the runs go on after a close frame, so that the
//! reader sees more of the input.

#![no_main]

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::ops::Range;
use std::pin::{pin, Pin};
use std::task::{Context, Poll, Waker};

use arbitrary::Unstructured;
use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, ReadBuf};
use wasmgate_fuzz::protocol::frame::{
    is_valid_close_code, parse_close, Frame, FrameReader, OpCode, ProtocolError, ReadError,
};
use wasmgate_fuzz::protocol::message::{Assembler, Fragment, Message, Streamer};

/// The `max_frame_size` values an input chooses from: small ones, so that
/// the limit paths are reached, and the default.
const FRAME_SIZES: [usize; 8] = [1, 2, 7, 16, 125, 126, 1000, 1 << 20];
/// The `max_message_size` values an input chooses from.
const MESSAGE_SIZES: [usize; 8] = [1, 3, 16, 64, 126, 300, 1000, 1 << 20];

fuzz_target!(|data: &[u8]| {
    let plan = Plan::read(data);
    let model = model(&plan);
    let whole = run(&plan, &model, false);
    check_against_model(&whole, &model, "all at once");
    let split = run(&plan, &model, true);
    check_against_model(&split, &model, "split");
    assert_eq!(
        whole, split,
        "the same bytes, split differently, must give the same events"
    );
});

/// The connection's settings, and how the client's bytes arrive.
#[derive(Debug)]
struct Plan<'a> {
    max_frame_size: usize,
    max_message_size: usize,
    /// `deliver = "fragments"`: a [`Streamer`] instead of an [`Assembler`].
    fragments: bool,
    /// Whether the first chunk came with the upgrade request.
    initial: bool,
    steps: Vec<Step>,
    wire: &'a [u8],
}

/// How a chunk of the client's bytes arrives.
#[derive(Debug, Clone, Copy)]
enum How {
    /// In one read (or more, if the reader's buffer has less room).
    Read,
    /// The pending read is cancelled first (the connection's task wakes
    /// for a timer), then the chunk is read.
    Cancel,
    /// The connection is parked: its read buffer is released if the reader
    /// is idle, and the chunk is handed over with `feed`.
    Park,
    /// One byte per read.
    Trickle,
}

#[derive(Debug, Clone, Copy)]
struct Step {
    len: usize,
    how: How,
}

impl<'a> Plan<'a> {
    /// Reads the plan from the input (see the module documentation).
    fn read(data: &'a [u8]) -> Plan<'a> {
        let mut u = Unstructured::new(data);
        // Past the end of the input, `Unstructured` gives zeros.
        let config: u8 = u.arbitrary().unwrap_or(0);
        let count: u8 = u.arbitrary().unwrap_or(0);
        let steps = (0..count % 17)
            .map(|_| {
                let b: u8 = u.arbitrary().unwrap_or(0);
                Step {
                    len: usize::from(b & 0x3F) + 1,
                    how: match b >> 6 {
                        0 => How::Read,
                        1 => How::Cancel,
                        2 => How::Park,
                        _ => How::Trickle,
                    },
                }
            })
            .collect();
        Plan {
            max_frame_size: FRAME_SIZES[usize::from(config & 7)],
            max_message_size: MESSAGE_SIZES[usize::from((config >> 3) & 7)],
            fragments: config & 0x40 != 0,
            initial: config & 0x80 != 0,
            steps,
            wire: u.take_rest(),
        }
    }

    /// The bytes given to `FrameReader::new`, and what the socket then does.
    fn script(&self, split: bool) -> (usize, VecDeque<Op>) {
        let mut ops = VecDeque::new();
        if !split {
            return (self.wire.len(), ops);
        }
        if self.steps.is_empty() {
            ops.push_back(Op::Data(0..self.wire.len()));
            return (0, ops);
        }
        let mut steps = self.steps.iter().cycle();
        let mut pos = 0;
        let mut initial = 0;
        while pos < self.wire.len() {
            let Some(step) = steps.next() else { break };
            let chunk = pos..(pos + step.len).min(self.wire.len());
            pos = chunk.end;
            if self.initial && chunk.start == 0 {
                initial = chunk.end;
                continue;
            }
            match step.how {
                How::Read => ops.push_back(Op::Data(chunk)),
                How::Cancel => {
                    ops.push_back(Op::Pending);
                    ops.push_back(Op::Data(chunk));
                }
                How::Park => ops.push_back(Op::Park(chunk)),
                How::Trickle => ops.extend(chunk.map(|i| Op::Data(i..i + 1))),
            }
        }
        (initial, ops)
    }
}

/// What the scripted socket does next.
#[derive(Debug)]
enum Op {
    /// Delivers these bytes of the wire.
    Data(Range<usize>),
    /// Has nothing yet: the read is pending (and the caller drops it).
    Pending,
    /// Has nothing yet, and the connection parks and reads these bytes
    /// itself.
    Park(Range<usize>),
}

/// The client's end of the TCP connection, as scripted; reads return 0
/// (end of input) once the script is done.
struct Socket<'a> {
    wire: &'a [u8],
    ops: VecDeque<Op>,
    /// What is left of the chunk being delivered.
    current: Range<usize>,
    /// Bytes for the parked connection to feed, after a pending read.
    parked: Option<Range<usize>>,
    /// Bytes handed to the reader so far (however they went).
    handed: usize,
}

impl AsyncRead for Socket<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while this.current.is_empty() {
            match this.ops.pop_front() {
                None => return Poll::Ready(Ok(())),
                Some(Op::Data(r)) => this.current = r,
                Some(Op::Pending) => return Poll::Pending,
                Some(Op::Park(r)) => {
                    this.parked = Some(r);
                    return Poll::Pending;
                }
            }
        }
        let n = this.current.len().min(buf.remaining());
        buf.put_slice(&this.wire[this.current.start..this.current.start + n]);
        this.current.start += n;
        this.handed += n;
        Poll::Ready(Ok(()))
    }
}

/// Polls a future once, as a task woken for it would.
fn poll_once<F: Future>(fut: F) -> Option<F::Output> {
    let mut fut = pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => Some(out),
        Poll::Pending => None,
    }
}

/// What the reader and the message layer produced, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    /// A frame from the reader (`rsv1` is checked to be clear).
    Frame {
        fin: bool,
        opcode: OpCode,
        payload: Vec<u8>,
    },
    /// What `parse_close` made of a close frame's payload.
    Close(Result<Option<(u16, String)>, ProtocolError>),
    /// A complete message (`deliver = "message"`).
    Message(Message),
    /// A fragment (`deliver = "fragments"`).
    Fragment(Fragment),
    /// The connection fails with this error.
    Failed(ProtocolError),
    /// The peer closed the TCP connection.
    Eof,
}

/// The message layer the route's `deliver` chooses.
enum Inbound {
    Messages(Assembler),
    Fragments(Streamer),
}

impl Inbound {
    fn in_message(&self) -> bool {
        match self {
            Inbound::Messages(a) => a.in_message(),
            Inbound::Fragments(s) => s.in_message(),
        }
    }
}

/// A connection's handling of frames, recording what happens and checking
/// each frame against the model as it comes.
struct Pipeline<'a> {
    plan: &'a Plan<'a>,
    model: &'a Model,
    inbound: Inbound,
    frames: usize,
    events: Vec<Event>,
}

impl<'a> Pipeline<'a> {
    fn new(plan: &'a Plan<'a>, model: &'a Model) -> Self {
        let inbound = if plan.fragments {
            Inbound::Fragments(Streamer::default())
        } else {
            Inbound::Messages(Assembler::new(plan.max_message_size))
        };
        Pipeline {
            plan,
            model,
            inbound,
            frames: 0,
            events: Vec::new(),
        }
    }

    /// Handles a frame; false once the connection has failed.
    fn frame(&mut self, frame: Frame) -> bool {
        assert!(!frame.rsv1, "RSV1 without a negotiated extension");
        assert!(
            frame.payload.len() <= self.plan.max_frame_size,
            "a frame over max_frame_size"
        );
        if frame.opcode.is_control() {
            assert!(
                frame.fin && frame.payload.len() <= 125,
                "a bad control frame"
            );
        }
        let event = Event::Frame {
            fin: frame.fin,
            opcode: frame.opcode,
            payload: frame.payload.to_vec(),
        };
        match self.model.frames.get(self.frames) {
            Some((expected, _)) => assert_eq!(
                &event, expected,
                "frame {} is not the one on the wire",
                self.frames
            ),
            None => panic!("the model has no frame {}: {event:?}", self.frames),
        }
        self.frames += 1;
        self.events.push(event);
        match frame.opcode {
            OpCode::Close => {
                let close = parse_close(&frame.payload);
                match &close {
                    Ok(Some((code, reason))) => {
                        assert!(is_valid_close_code(*code));
                        assert!(reason.len() <= 123, "a close reason over 123 bytes");
                    }
                    Ok(None) => {}
                    Err(e) => check_close_code(e),
                }
                self.events.push(Event::Close(close));
            }
            OpCode::Ping | OpCode::Pong => {}
            OpCode::Text | OpCode::Binary | OpCode::Continuation => {
                let delivered = match &mut self.inbound {
                    Inbound::Messages(a) => a.push(frame).map(|m| m.map(Event::Message)),
                    Inbound::Fragments(s) => s.push(frame).map(|f| Some(Event::Fragment(f))),
                };
                match delivered {
                    Ok(Some(event)) => {
                        self.check_delivery(&event);
                        self.events.push(event);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        self.fail(e);
                        return false;
                    }
                }
            }
        }
        true
    }

    fn check_delivery(&self, event: &Event) {
        match event {
            Event::Message(Message::Text(t)) => {
                assert!(
                    t.len() <= self.plan.max_message_size,
                    "a message over the limit"
                )
            }
            Event::Message(Message::Binary(b)) => {
                assert!(
                    b.len() <= self.plan.max_message_size,
                    "a message over the limit"
                )
            }
            Event::Fragment(f) => assert!(f.data.len() <= self.plan.max_frame_size),
            _ => {}
        }
    }

    fn fail(&mut self, e: ProtocolError) {
        check_close_code(&e);
        self.events.push(Event::Failed(e));
    }

    /// At a cancelled read: the reader is idle exactly when every byte
    /// handed to it has been returned in frames and no fragmented message
    /// is part-way.
    fn check_idle(&self, reader: &FrameReader, handed: usize) {
        let consumed = match self.frames {
            0 => 0,
            n => self.model.frames[n - 1].1,
        };
        let idle = handed == consumed && !self.inbound.in_message();
        assert_eq!(
            reader.is_idle(),
            idle,
            "is_idle() with {handed} bytes handed, {consumed} returned in frames, in a message: {}",
            self.inbound.in_message()
        );
    }
}

/// The close code section 7.4.1 gives an error, and one a server may send.
fn check_close_code(e: &ProtocolError) {
    let expected = match e {
        ProtocolError::InvalidUtf8
        | ProtocolError::InvalidCloseReason
        | ProtocolError::InvalidCompressedData => 1007,
        ProtocolError::FrameTooLarge { .. }
        | ProtocolError::MessageTooLarge { .. }
        | ProtocolError::InflatedFragmentTooLarge { .. } => 1009,
        _ => 1002,
    };
    let code = e.close_code();
    assert_eq!(code, expected, "close code for {e:?}");
    assert!(is_valid_close_code(code) && !matches!(code, 1004..=1006 | 1015));
}

/// Feeds the plan's bytes through a reader and a message layer, all at once
/// or split as the plan says.
fn run(plan: &Plan<'_>, model: &Model, split: bool) -> Vec<Event> {
    let (initial, ops) = plan.script(split);
    let mut reader = FrameReader::new(&plan.wire[..initial], plan.max_frame_size);
    let mut socket = Socket {
        wire: plan.wire,
        ops,
        current: 0..0,
        parked: None,
        handed: initial,
    };
    let mut pipeline = Pipeline::new(plan, model);
    loop {
        match poll_once(reader.read_frame(&mut socket)) {
            Some(Ok(frame)) => {
                if !pipeline.frame(frame) {
                    break;
                }
            }
            Some(Err(ReadError::Protocol(e))) => {
                pipeline.fail(e);
                break;
            }
            Some(Err(ReadError::Eof)) => {
                pipeline.events.push(Event::Eof);
                break;
            }
            Some(Err(ReadError::Io(e))) => panic!("the scripted socket never fails: {e}"),
            None => {
                // The read is dropped, as when the connection's task wakes
                // for something else.
                pipeline.check_idle(&reader, socket.handed);
                if let Some(chunk) = socket.parked.take() {
                    reader.release_buffer();
                    socket.handed += chunk.len();
                    reader.feed(&plan.wire[chunk]);
                }
            }
        }
    }
    pipeline.events
}

/// What the reference decoder expects.
#[derive(Debug, Default)]
struct Model {
    /// Every frame the reader returns, with the wire offset just past it.
    frames: Vec<(Event, usize)>,
    /// The events before the end.
    events: Vec<Event>,
    /// The errors the input may end with (any one of them).
    allowed: Vec<ProtocolError>,
    /// Whether it may end with the end of input instead.
    eof_ok: bool,
    /// The complete frame the error is about, which the reader may return
    /// before the message layer refuses it.
    offending: Option<Event>,
}

/// Decodes `plan.wire` as RFC 6455 (sections 5.2 to 5.6 and 7.4) describes
/// a client's frames, with the plan's limits; written independently of the
/// reader, to check it.
fn model(plan: &Plan<'_>) -> Model {
    let wire = plan.wire;
    let mut m = Model::default();
    let mut pos = 0;
    // The data message in progress: whether it is text, and its bytes.
    let mut message: Option<(bool, Vec<u8>)> = None;
    loop {
        let b = &wire[pos..];
        if b.len() < 2 {
            m.eof_ok = true;
            return m;
        }
        let fin = b[0] & 0x80 != 0;
        let opcode = match b[0] & 0x0F {
            0x0 => Some(OpCode::Continuation),
            0x1 => Some(OpCode::Text),
            0x2 => Some(OpCode::Binary),
            0x8 => Some(OpCode::Close),
            0x9 => Some(OpCode::Ping),
            0xA => Some(OpCode::Pong),
            _ => None,
        };
        let control = b[0] & 0x08 != 0;
        let len7 = b[1] & 0x7F;
        // Rules the header breaks: reported as soon as it shows them.
        let mut errors = Vec::new();
        if b[0] & 0x70 != 0 {
            errors.push(ProtocolError::ReservedBits);
        }
        if opcode.is_none() {
            errors.push(ProtocolError::UnknownOpcode(b[0] & 0x0F));
        }
        if b[1] & 0x80 == 0 {
            errors.push(ProtocolError::Unmasked);
        }
        if control && !fin {
            errors.push(ProtocolError::FragmentedControl);
        }
        if control && len7 > 125 {
            errors.push(ProtocolError::ControlTooLarge);
        }
        // The order of fragments (section 5.4), which the header shows too,
        // though it may be reported once the frame is complete.
        let mut order = Vec::new();
        match (opcode, &message) {
            (Some(OpCode::Text | OpCode::Binary), Some(_)) => {
                order.push(ProtocolError::ExpectedContinuation)
            }
            (Some(OpCode::Continuation), None) => order.push(ProtocolError::UnexpectedContinuation),
            _ => {}
        }
        let ext = match len7 {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        if errors.is_empty() && b.len() < 2 + ext {
            m.allowed = order;
            m.eof_ok = true;
            return m;
        }
        let len = if errors.is_empty() {
            let len = match ext {
                0 => u64::from(len7),
                _ => b[2..2 + ext]
                    .iter()
                    .fold(0, |n, &d| (n << 8) | u64::from(d)),
            };
            if ext == 8 && len >> 63 != 0 {
                errors.push(ProtocolError::BadLength);
            }
            if len > plan.max_frame_size as u64 {
                errors.push(ProtocolError::FrameTooLarge {
                    size: len,
                    limit: plan.max_frame_size,
                });
            }
            len
        } else {
            0
        };
        errors.extend_from_slice(&order);
        let Some(opcode) = opcode.filter(|_| errors.len() == order.len()) else {
            m.allowed = errors;
            return m;
        };
        // At most max_frame_size: fits in usize.
        let len = len as usize;

        // The size of the message (checked once the frame is complete, or
        // earlier).
        if !plan.fragments && !control {
            let before = match (opcode, &message) {
                (OpCode::Continuation, Some((_, so_far))) => so_far.len(),
                _ => 0,
            };
            if before + len > plan.max_message_size {
                errors.push(ProtocolError::MessageTooLarge {
                    limit: plan.max_message_size,
                });
            }
        }
        let header = 2 + ext + 4;
        if b.len() < header {
            m.allowed = errors;
            m.eof_ok = true;
            return m;
        }
        let mask = &b[header - 4..header];
        let available = (b.len() - header).min(len);
        let payload: Vec<u8> = b[header..header + available]
            .iter()
            .zip(mask.iter().cycle())
            .map(|(d, k)| d ^ k)
            .collect();
        let complete = available == len;

        // Text must be UTF-8, checked as its bytes arrive: a text frame
        // starts a message of its own; a continuation adds to one.
        let text: Option<Vec<u8>> = match (opcode, &message) {
            (OpCode::Text, _) => Some(payload.clone()),
            (OpCode::Continuation, Some((true, so_far))) => {
                Some(so_far.iter().chain(&payload).copied().collect())
            }
            _ => None,
        };
        let bad_text = text.is_some_and(|t| match std::str::from_utf8(&t) {
            Ok(_) => false,
            // Incomplete at the end: bad only if the message ends here.
            Err(e) if e.error_len().is_none() => complete && fin,
            Err(_) => true,
        });
        if bad_text {
            errors.push(ProtocolError::InvalidUtf8);
        }
        if !complete {
            m.allowed = errors;
            m.eof_ok = !bad_text;
            return m;
        }
        let event = Event::Frame {
            fin,
            opcode,
            payload: payload.clone(),
        };
        m.frames.push((event.clone(), pos + header + len));
        if !errors.is_empty() {
            m.allowed = errors;
            m.offending = Some(event);
            return m;
        }
        m.events.push(event);
        pos += header + len;

        match opcode {
            OpCode::Close => m.events.push(Event::Close(close_model(&payload))),
            OpCode::Ping | OpCode::Pong => {}
            OpCode::Text | OpCode::Binary | OpCode::Continuation => {
                let (is_text, first, mut so_far) = match message.take() {
                    Some((is_text, so_far)) => (is_text, false, so_far),
                    None => (opcode == OpCode::Text, true, Vec::new()),
                };
                if plan.fragments {
                    m.events.push(Event::Fragment(Fragment {
                        text: is_text,
                        first,
                        fin,
                        data: BytesMut::from(&payload[..]),
                    }));
                }
                so_far.extend_from_slice(&payload);
                if !fin {
                    message = Some((is_text, so_far));
                } else if !plan.fragments {
                    m.events.push(Event::Message(if is_text {
                        match String::from_utf8(so_far) {
                            Ok(s) => Message::Text(s),
                            Err(_) => unreachable!("the model let invalid text through"),
                        }
                    } else {
                        Message::Binary(Bytes::from(so_far))
                    }));
                }
            }
        }
    }
}

/// A close frame's payload (section 5.5.1): empty, or a code and a UTF-8
/// reason; the codes an endpoint may receive are in section 7.4 (1000 to
/// 1003, 1007 to 1011, 1012 to 1014 registered since, 3000 to 4999).
fn close_model(payload: &[u8]) -> Result<Option<(u16, String)>, ProtocolError> {
    let [hi, lo, reason @ ..] = payload else {
        return match payload.len() {
            0 => Ok(None),
            _ => Err(ProtocolError::CloseTooShort),
        };
    };
    let code = u16::from_be_bytes([*hi, *lo]);
    if !matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999) {
        return Err(ProtocolError::InvalidCloseCode(code));
    }
    match std::str::from_utf8(reason) {
        Ok(r) => Ok(Some((code, r.to_owned()))),
        Err(_) => Err(ProtocolError::InvalidCloseReason),
    }
}

/// Whether an error belongs to the message layer (fragment order, message
/// size) rather than to the reader.
fn is_message_level(e: &ProtocolError) -> bool {
    matches!(
        e,
        ProtocolError::ExpectedContinuation
            | ProtocolError::UnexpectedContinuation
            | ProtocolError::MessageTooLarge { .. }
    )
}

/// Checks a run's events against the model.
fn check_against_model(events: &[Event], model: &Model, run: &str) {
    let Some((last, mut before)) = events.split_last() else {
        panic!("{run}: a run ends with an event");
    };
    match last {
        Event::Eof => assert!(
            model.eof_ok,
            "{run}: ended without an error; expected one of {:?}",
            model.allowed
        ),
        Event::Failed(e) => {
            assert!(
                model.allowed.contains(e),
                "{run}: failed with {e:?}; the rules broken are {:?}",
                model.allowed
            );
            // The reader returns a frame whose only fault is its place in
            // the message, or the message's size, before the message layer
            // refuses it.
            if let Some((frame, rest)) = before.split_last() {
                if Some(frame) == model.offending.as_ref() && rest == &model.events[..] {
                    assert!(
                        is_message_level(e),
                        "{run}: the reader returned a frame it should have refused ({e:?})"
                    );
                    before = rest;
                }
            }
        }
        other => panic!("{run}: a run ends with an error or the end of input, not {other:?}"),
    }
    assert_eq!(before, &model.events[..], "{run}: events before the end");
}
