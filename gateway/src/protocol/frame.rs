//! RFC 6455 framing (section 5): reading client frames and encoding server
//! frames, and the protocol errors with the close code each one earns.
//!
//! The reader is the gateway's own rather than fastwebsockets': it is
//! cancel-safe (a connection's task selects between reading and its timers),
//! it rejects an oversized frame from its header before buffering any of it,
//! and a frame out of fragment order from its header too (so that it is not
//! validated as part of the message it interrupts), it enforces client
//! masking, it validates text as UTF-8 as the bytes arrive (so a bad byte
//! fails the connection before the frame or message is complete), and it
//! leaves RSV1 to a negotiated extension (RFC 7692).

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// A frame's opcode (RFC 6455 section 5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    /// Continues a fragmented message.
    Continuation,
    /// First frame of a text message.
    Text,
    /// First frame of a binary message.
    Binary,
    /// Starts or answers the closing handshake.
    Close,
    /// Keepalive request.
    Ping,
    /// Keepalive answer.
    Pong,
}

impl OpCode {
    fn from_bits(b: u8) -> Result<Self, ProtocolError> {
        Ok(match b {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            other => return Err(ProtocolError::UnknownOpcode(other)),
        })
    }

    fn bits(self) -> u8 {
        match self {
            OpCode::Continuation => 0x0,
            OpCode::Text => 0x1,
            OpCode::Binary => 0x2,
            OpCode::Close => 0x8,
            OpCode::Ping => 0x9,
            OpCode::Pong => 0xA,
        }
    }

    /// Whether this is a control opcode (close, ping, pong).
    pub fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }
}

/// One frame received from a client, already unmasked.
#[derive(Debug)]
pub struct Frame {
    /// Whether this is the final fragment of its message.
    pub fin: bool,
    /// The RSV1 bit (claimed by permessage-deflate when negotiated).
    pub rsv1: bool,
    /// The opcode.
    pub opcode: OpCode,
    /// The unmasked payload.
    pub payload: BytesMut,
}

/// A violation of RFC 6455 (or of a configured limit) by the peer. Each one
/// fails the connection with [`ProtocolError::close_code`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// RSV bits set without a negotiated extension.
    #[error("reserved bits set without a negotiated extension")]
    ReservedBits,
    /// RSV1 (compressed, with permessage-deflate agreed) on a control or
    /// continuation frame (RFC 7692 section 6.1).
    #[error("RSV1 (compressed) on a control or continuation frame")]
    CompressedControlOrContinuation,
    /// An opcode RFC 6455 does not define.
    #[error("unknown opcode {0:#x}")]
    UnknownOpcode(u8),
    /// A client frame without a mask.
    #[error("client frame is not masked")]
    Unmasked,
    /// A control frame with FIN clear.
    #[error("fragmented control frame")]
    FragmentedControl,
    /// A control frame payload over 125 bytes.
    #[error("control frame payload over 125 bytes")]
    ControlTooLarge,
    /// A 64-bit length with its most significant bit set.
    #[error("frame length has its most significant bit set")]
    BadLength,
    /// A frame payload over `max_frame_size`.
    #[error("frame of {size} bytes is over max_frame_size ({limit})")]
    FrameTooLarge {
        /// The announced payload size.
        size: u64,
        /// The configured limit.
        limit: usize,
    },
    /// A message over `max_message_size`.
    #[error("message is over max_message_size ({limit})")]
    MessageTooLarge {
        /// The configured limit.
        limit: usize,
    },
    /// A compressed fragment streamed to the plugin (`deliver =
    /// "fragments"`) that decompresses past `max_frame_size`.
    #[error("decompressed fragment is over max_frame_size ({limit})")]
    InflatedFragmentTooLarge {
        /// The configured limit.
        limit: usize,
    },
    /// Text that is not valid UTF-8.
    #[error("invalid UTF-8 in a text message")]
    InvalidUtf8,
    /// A compressed message (permessage-deflate, RFC 7692) that does not
    /// decompress.
    #[error("invalid compressed data (permessage-deflate)")]
    InvalidCompressedData,
    /// A continuation frame with no message in progress.
    #[error("continuation frame without a message in progress")]
    UnexpectedContinuation,
    /// A new text or binary frame while a fragmented message is in progress.
    #[error("new message started before the fragmented one finished")]
    ExpectedContinuation,
    /// A close frame with a one-byte payload.
    #[error("close frame payload of one byte")]
    CloseTooShort,
    /// A close code that may not be sent on the wire.
    #[error("invalid close code {0}")]
    InvalidCloseCode(u16),
    /// A close reason that is not valid UTF-8.
    #[error("invalid UTF-8 in a close reason")]
    InvalidCloseReason,
}

impl ProtocolError {
    /// The close code this error is answered with: 1007 for bad UTF-8 or
    /// compressed data, 1009 for a limit, 1002 for everything else.
    pub fn close_code(&self) -> u16 {
        match self {
            ProtocolError::InvalidUtf8
            | ProtocolError::InvalidCloseReason
            | ProtocolError::InvalidCompressedData => 1007,
            ProtocolError::FrameTooLarge { .. }
            | ProtocolError::MessageTooLarge { .. }
            | ProtocolError::InflatedFragmentTooLarge { .. } => 1009,
            _ => 1002,
        }
    }
}

/// Why reading the next frame stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The peer broke the protocol.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The peer closed the TCP connection.
    #[error("connection closed by peer")]
    Eof,
    /// The socket failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Whether a close code received from a peer is valid (RFC 6455 section 7.4).
pub fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Reads frames from a client. Cancel-safe: dropping a pending
/// [`FrameReader::read_frame`] loses no bytes.
#[derive(Debug)]
pub struct FrameReader {
    buf: BytesMut,
    max_frame_size: usize,
    /// Bytes the frame being received needs in total, header included.
    want: usize,
    /// Whether permessage-deflate was negotiated: RSV1 marks a compressed
    /// message on its first frame (RFC 7692 section 6).
    allow_rsv1: bool,
    /// The kind of the fragmented message in progress: `Some(true)` text.
    message_text: Option<bool>,
    /// Whether the fragmented message in progress is compressed (its text
    /// is then validated once decompressed, not here).
    message_compressed: bool,
    /// UTF-8 state of the text message in progress.
    utf8: Utf8Stream,
    /// Payload bytes of the incomplete frame already unmasked and checked.
    checked: usize,
    /// How much room to make before the next read.
    chunk: usize,
}

/// Incremental UTF-8 validation over chunks that may split a character.
#[derive(Debug, Default)]
pub struct Utf8Stream {
    tail: Vec<u8>,
}

impl Utf8Stream {
    /// Validates the next chunk; an incomplete character at its end is kept
    /// for the next chunk.
    pub fn feed(&mut self, data: &[u8]) -> Result<(), ProtocolError> {
        let mut rest = data;
        if !self.tail.is_empty() {
            // Complete the split character with up to 3 bytes of this chunk.
            let take = rest.len().min(4 - self.tail.len());
            let had = self.tail.len();
            let mut joined = std::mem::take(&mut self.tail);
            joined.extend_from_slice(&rest[..take]);
            match std::str::from_utf8(&joined) {
                Ok(_) => rest = &rest[take..],
                Err(e) if e.valid_up_to() > 0 => rest = &rest[e.valid_up_to() - had..],
                Err(e) if e.error_len().is_none() => {
                    self.tail = joined;
                    return Ok(());
                }
                Err(_) => return Err(ProtocolError::InvalidUtf8),
            }
        }
        match std::str::from_utf8(rest) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_none() => {
                self.tail = rest[e.valid_up_to()..].to_vec();
                Ok(())
            }
            Err(_) => Err(ProtocolError::InvalidUtf8),
        }
    }

    /// Ends a message: no character may be left incomplete.
    pub fn finish(&mut self) -> Result<(), ProtocolError> {
        if self.tail.is_empty() {
            Ok(())
        } else {
            self.tail.clear();
            Err(ProtocolError::InvalidUtf8)
        }
    }
}

/// `mask` as it applies from payload offset `offset` on.
fn rotate(mask: [u8; 4], offset: usize) -> [u8; 4] {
    let mut m = mask;
    m.rotate_left(offset % 4);
    m
}

/// Read up to this much at a time on a busy connection.
const READ_CHUNK: usize = 16 << 10;
/// What an idle connection's buffer starts with; it doubles each time a read
/// fills it, up to [`READ_CHUNK`].
const FIRST_CHUNK: usize = 512;
/// Grow the buffer for a large frame at most this much per read.
const MAX_RESERVE: usize = 1 << 20;

impl FrameReader {
    /// A reader that starts with `initial` (bytes read past the HTTP
    /// request) and refuses frames over `max_frame_size`.
    pub fn new(initial: &[u8], max_frame_size: usize) -> Self {
        let mut buf = BytesMut::with_capacity(FIRST_CHUNK.max(initial.len()));
        buf.extend_from_slice(initial);
        FrameReader {
            buf,
            max_frame_size,
            want: 0,
            allow_rsv1: false,
            message_text: None,
            message_compressed: false,
            utf8: Utf8Stream::default(),
            checked: 0,
            chunk: FIRST_CHUNK,
        }
    }

    /// Lets RSV1 mark compressed messages: permessage-deflate was
    /// negotiated. RSV1 stays an error on continuation and control frames
    /// (RFC 7692 section 6.1).
    pub fn allow_compressed(&mut self) {
        self.allow_rsv1 = true;
    }

    /// Whether nothing is held: no buffered bytes and no fragmented message
    /// part-way through.
    pub fn is_idle(&self) -> bool {
        self.buf.is_empty() && self.message_text.is_none()
    }

    /// Hands the reader bytes read from the peer elsewhere (by a parked
    /// connection); they are parsed before anything else is read.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Frees the read buffer of an idle reader (see [`FrameReader::is_idle`];
    /// does nothing otherwise). The next read allocates a small one again.
    pub fn release_buffer(&mut self) {
        if self.is_idle() {
            self.buf = BytesMut::new();
            self.chunk = FIRST_CHUNK;
            self.want = 0;
            self.checked = 0;
        }
    }

    /// Reads the next frame.
    pub async fn read_frame<R: AsyncRead + Unpin>(
        &mut self,
        io: &mut R,
    ) -> Result<Frame, ReadError> {
        loop {
            if let Some(frame) = self.parse()? {
                return Ok(frame);
            }
            if self.buf.capacity() - self.buf.len() < self.chunk {
                let missing = self.want.saturating_sub(self.buf.len());
                self.buf.reserve(missing.clamp(self.chunk, MAX_RESERVE));
            }
            let spare = self.buf.capacity() - self.buf.len();
            let n = io.read_buf(&mut self.buf).await?;
            if n == 0 {
                return Err(ReadError::Eof);
            }
            if n == spare {
                self.chunk = (self.chunk * 2).min(READ_CHUNK);
            }
        }
    }

    /// Takes one complete frame from the buffer, if there is one.
    fn parse(&mut self) -> Result<Option<Frame>, ProtocolError> {
        let b = &self.buf[..];
        if b.len() < 2 {
            return Ok(None);
        }
        let fin = b[0] & 0x80 != 0;
        let rsv1 = b[0] & 0x40 != 0;
        if b[0] & 0x30 != 0 || (rsv1 && !self.allow_rsv1) {
            return Err(ProtocolError::ReservedBits);
        }
        let opcode = OpCode::from_bits(b[0] & 0x0F)?;
        if rsv1 && !matches!(opcode, OpCode::Text | OpCode::Binary) {
            return Err(ProtocolError::CompressedControlOrContinuation);
        }
        if b[1] & 0x80 == 0 {
            return Err(ProtocolError::Unmasked);
        }
        let len7 = b[1] & 0x7F;
        if opcode.is_control() {
            if !fin {
                return Err(ProtocolError::FragmentedControl);
            }
            if len7 > 125 {
                return Err(ProtocolError::ControlTooLarge);
            }
        }
        // Fragments in order (section 5.4), from the header: a frame that
        // does not belong where it is must not be validated as part of the
        // message it interrupts (its text would be checked as the rest of
        // that message's, and could fail with 1007 instead of 1002).
        match (opcode, self.message_text) {
            (OpCode::Text | OpCode::Binary, Some(_)) => {
                return Err(ProtocolError::ExpectedContinuation)
            }
            (OpCode::Continuation, None) => return Err(ProtocolError::UnexpectedContinuation),
            _ => {}
        }
        let ext = match len7 {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let header = 2 + ext + 4;
        if b.len() < 2 + ext {
            return Ok(None);
        }
        let len: u64 = match ext {
            2 => u64::from(u16::from_be_bytes([b[2], b[3]])),
            8 => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&b[2..10]);
                let n = u64::from_be_bytes(n);
                if n >> 63 != 0 {
                    return Err(ProtocolError::BadLength);
                }
                n
            }
            _ => u64::from(len7),
        };
        if len > self.max_frame_size as u64 {
            return Err(ProtocolError::FrameTooLarge {
                size: len,
                limit: self.max_frame_size,
            });
        }
        // Fits in usize: it is at most max_frame_size.
        let total = header + len as usize;
        if b.len() < header {
            self.want = total;
            return Ok(None);
        }
        let mask = [b[header - 4], b[header - 3], b[header - 2], b[header - 1]];
        // Compressed text is validated once decompressed.
        let is_text = match opcode {
            OpCode::Text => !rsv1,
            OpCode::Continuation => self.message_text == Some(true) && !self.message_compressed,
            _ => false,
        };
        let available = b.len().min(total).saturating_sub(header);
        if is_text && available > self.checked {
            // Unmask and check what has arrived so far, so invalid text
            // fails the connection before the rest of the frame arrives.
            let chunk = &mut self.buf[header + self.checked..header + available];
            fastwebsockets::unmask(chunk, rotate(mask, self.checked));
            self.utf8.feed(chunk)?;
            self.checked = available;
        }
        if self.buf.len() < total {
            self.want = total;
            return Ok(None);
        }
        let mut payload = self.buf.split_to(total);
        payload.advance(header);
        let checked = std::mem::take(&mut self.checked);
        if !is_text {
            fastwebsockets::unmask(&mut payload, mask);
        }
        self.want = 0;
        match opcode {
            OpCode::Text | OpCode::Binary => {
                self.message_text = (!fin).then_some(opcode == OpCode::Text);
                self.message_compressed = !fin && rsv1;
            }
            OpCode::Continuation if fin => {
                self.message_text = None;
                self.message_compressed = false;
            }
            _ => {}
        }
        if is_text && fin {
            self.utf8.finish()?;
        }
        debug_assert!(!is_text || checked == payload.len());
        Ok(Some(Frame {
            fin,
            rsv1,
            opcode,
            payload,
        }))
    }
}

/// Appends the header of an unmasked server frame to `out` (with RSV1 set
/// when `compressed`: a permessage-deflate message's first frame).
pub fn encode_header(out: &mut BytesMut, fin: bool, compressed: bool, opcode: OpCode, len: usize) {
    let b0 = (u8::from(fin) << 7) | (u8::from(compressed) << 6) | opcode.bits();
    if len < 126 {
        out.extend_from_slice(&[b0, len as u8]);
    } else if let Ok(len16) = u16::try_from(len) {
        out.extend_from_slice(&[b0, 126]);
        out.extend_from_slice(&len16.to_be_bytes());
    } else {
        out.extend_from_slice(&[b0, 127]);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
}

/// Parses a close frame payload into its code and reason (`None` for an
/// empty payload).
pub fn parse_close(payload: &[u8]) -> Result<Option<(u16, String)>, ProtocolError> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(ProtocolError::CloseTooShort),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !is_valid_close_code(code) {
                return Err(ProtocolError::InvalidCloseCode(code));
            }
            let reason = std::str::from_utf8(&payload[2..])
                .map_err(|_| ProtocolError::InvalidCloseReason)?;
            Ok(Some((code, reason.to_owned())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1u8, 2, 3, 4];
        let mut out = vec![b0];
        if payload.len() < 126 {
            out.push(0x80 | payload.len() as u8);
        } else {
            out.push(0x80 | 126);
            out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    #[tokio::test]
    async fn reader_survives_a_frame_split_across_reads() {
        let bytes = masked(0x81, b"hello world");
        let (mut client, mut server) = tokio::io::duplex(64);
        let mut reader = FrameReader::new(&[], 1024);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for b in bytes {
                client.write_all(&[b]).await.unwrap();
                tokio::task::yield_now().await;
            }
            client
        });
        let f = reader.read_frame(&mut server).await.unwrap();
        assert!(f.fin);
        assert_eq!(f.opcode, OpCode::Text);
        assert_eq!(&f.payload[..], b"hello world");
        drop(writer.await);
    }

    #[test]
    fn oversized_frame_is_refused_from_its_header() {
        let mut r = FrameReader::new(&[0x82, 0x80 | 127, 0, 0, 0, 1, 0, 0, 0, 0], 1 << 20);
        assert_eq!(
            r.parse().unwrap_err(),
            ProtocolError::FrameTooLarge {
                size: 1 << 32,
                limit: 1 << 20
            }
        );
        assert!(r.buf.capacity() < 1 << 20);
    }

    #[test]
    fn unmasked_and_reserved_and_fragmented_control_frames_are_errors() {
        let mut r = FrameReader::new(&[0x81, 0x00], 1024);
        assert_eq!(r.parse().unwrap_err(), ProtocolError::Unmasked);
        let mut r = FrameReader::new(&masked(0xA1, b""), 1024);
        assert_eq!(r.parse().unwrap_err(), ProtocolError::ReservedBits);
        let mut r = FrameReader::new(&masked(0x09, b""), 1024);
        assert_eq!(r.parse().unwrap_err(), ProtocolError::FragmentedControl);
        let mut r = FrameReader::new(&masked(0x83, b""), 1024);
        assert_eq!(r.parse().unwrap_err(), ProtocolError::UnknownOpcode(3));
    }

    fn reader(frames: &[(u8, &[u8])]) -> FrameReader {
        let bytes: Vec<u8> = frames.iter().flat_map(|(b0, p)| masked(*b0, p)).collect();
        FrameReader::new(&bytes, 1024)
    }

    fn parse_all(r: &mut FrameReader) -> Result<usize, ProtocolError> {
        let mut n = 0;
        while r.parse()?.is_some() {
            n += 1;
        }
        Ok(n)
    }

    #[test]
    fn text_is_validated_across_fragments_and_a_character_may_span_them() {
        let euro = "a€".as_bytes();
        let mut r = reader(&[(0x01, &euro[..2]), (0x00, &euro[2..3]), (0x80, &euro[3..])]);
        assert_eq!(parse_all(&mut r), Ok(3));
        // Binary fragments are not checked.
        let mut r = reader(&[(0x02, &[0xFF]), (0x80, &[0xFE])]);
        assert_eq!(parse_all(&mut r), Ok(2));
    }

    #[test]
    fn invalid_text_fails_at_the_first_bad_fragment_and_final_must_complete_a_character() {
        let mut r = reader(&[(0x01, b"ok"), (0x00, &[0xCE, 0xBA, 0xF4, 0x90])]);
        assert_eq!(parse_all(&mut r), Err(ProtocolError::InvalidUtf8));
        let mut r = reader(&[(0x01, b"a"), (0x80, &[0xE2, 0x82])]);
        assert_eq!(parse_all(&mut r), Err(ProtocolError::InvalidUtf8));
        let mut r = reader(&[(0x81, &[0xE2, 0x82])]);
        assert_eq!(parse_all(&mut r), Err(ProtocolError::InvalidUtf8));
    }

    #[test]
    fn invalid_text_fails_before_its_frame_is_complete() {
        // A 20-byte text frame of which only "ok" and a bad byte arrived.
        let full = masked(0x81, b"ok\xFFxxxxxxxxxxxxxxxxx");
        let mut r = FrameReader::new(&full[..2 + 4 + 3], 1024);
        assert_eq!(r.parse().unwrap_err(), ProtocolError::InvalidUtf8);
        // Valid bytes so far: no frame yet, no error.
        let full = masked(0x81, "héllo wörld, all good".as_bytes());
        let mut r = FrameReader::new(&full[..2 + 4 + 5], 1024);
        assert!(matches!(r.parse(), Ok(None)));
        r.buf.extend_from_slice(&full[2 + 4 + 5..]);
        let f = r.parse().unwrap().unwrap();
        assert_eq!(&f.payload[..], "héllo wörld, all good".as_bytes());
    }

    #[test]
    fn close_payloads_are_validated() {
        assert_eq!(parse_close(b""), Ok(None));
        assert_eq!(parse_close(&[3, 232]), Ok(Some((1000, String::new()))));
        assert_eq!(parse_close(&[3]), Err(ProtocolError::CloseTooShort));
        assert_eq!(
            parse_close(&[3, 237]),
            Err(ProtocolError::InvalidCloseCode(1005))
        );
        assert_eq!(
            parse_close(&[3, 232, 0xFF]),
            Err(ProtocolError::InvalidCloseReason)
        );
    }

    #[test]
    fn header_uses_the_shortest_length_form() {
        let mut b = BytesMut::new();
        encode_header(&mut b, true, false, OpCode::Binary, 125);
        assert_eq!(&b[..], &[0x82, 125]);
        b.clear();
        encode_header(&mut b, true, false, OpCode::Text, 126);
        assert_eq!(&b[..], &[0x81, 126, 0, 126]);
        b.clear();
        encode_header(&mut b, false, false, OpCode::Binary, 70_000);
        assert_eq!(&b[..2], &[0x02, 127]);
    }
}
