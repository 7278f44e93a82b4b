//! permessage-deflate (RFC 7692): agreeing on it in the opening handshake
//! (section 5 and 7.1), decompressing the messages a client compressed
//! (section 7.2.2) and compressing the gateway's (section 7.2.1).
//!
//! What the gateway agrees to, and why:
//! - The first offer it can honour wins (section 5.1); an offer with an
//!   unknown, repeated or malformed parameter is declined, and the next one
//!   is considered.
//! - By default neither side keeps its LZ77 window between messages: the
//!   response always carries `server_no_context_takeover` and
//!   `client_no_context_takeover` (sections 7.1.1.1 and 7.1.1.2 let a server
//!   add both). Then a connection holds no compression state between
//!   messages at all: its compressor and decompressor are borrowed per
//!   message from the worker thread ([`Deflater::with_shared`],
//!   [`Inflater::shared`]), and an idle connection costs nothing more than
//!   without compression. A route may turn context takeover on
//!   (`compression_context_takeover`): better ratios on streams of similar
//!   messages, for about 300 KiB of zlib state per connection, kept while
//!   it lives.
//! - `server_max_window_bits=N` from the client is honoured (the response
//!   repeats it); N = 8 compresses with a 9-bit window, whose matches reach
//!   at most 250 bytes back (zlib's `MAX_DIST` for that window), so the
//!   client's 256-byte window always holds them. `client_max_window_bits`
//!   needs no answer: the decompressor's 32 KiB window reads any smaller
//!   one.
//! - A compressed message's decompressed size counts against
//!   `max_message_size` (or, when fragments are delivered as they come,
//!   each fragment's against `max_frame_size`) as it is produced, so a small
//!   compressed frame cannot become a large message: past the limit the
//!   connection fails with 1009 before more memory is used. Data that does
//!   not decompress fails it with 1007.

use std::cell::RefCell;

use bytes::Bytes;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use hyper::header::{HeaderMap, HeaderValue, SEC_WEBSOCKET_EXTENSIONS};

use crate::protocol::frame::ProtocolError;

/// The extension's name in `Sec-WebSocket-Extensions`.
pub const NAME: &str = "permessage-deflate";

/// The four bytes a sync flush ends with, removed from each compressed
/// message and appended again before decompressing (section 7.2.1, 7.2.2).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// A route's compression settings (`compression = "on"` and the keys with
/// it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeflateSettings {
    /// Messages shorter than this many bytes are sent uncompressed.
    pub min_size: usize,
    /// Whether both sides may keep their window between messages.
    pub context_takeover: bool,
    /// The zlib compression level, 1 (fastest) to 9 (smallest).
    pub level: u32,
}

/// What was agreed for one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreed {
    /// The gateway resets its compressor after every message.
    pub server_no_context_takeover: bool,
    /// The client resets its compressor after every message, so the
    /// gateway's decompressor may too.
    pub client_no_context_takeover: bool,
    /// The window the gateway's compressor may use, 8 to 15 bits.
    pub server_max_window_bits: u8,
    /// The route's settings.
    pub settings: DeflateSettings,
}

/// One offer's parameters as the client wrote them.
#[derive(Debug, Default)]
struct Offer {
    server_no_context_takeover: bool,
    client_no_context_takeover: bool,
    server_max_window_bits: Option<u8>,
    client_max_window_bits: bool,
}

/// Agrees on permessage-deflate with the client's offers in `headers`
/// (every `Sec-WebSocket-Extensions` line, in order), under `settings`:
/// what was agreed and the response's `Sec-WebSocket-Extensions` value, or
/// `None` when no offer is acceptable (the connection is then
/// uncompressed).
pub fn negotiate(headers: &HeaderMap, settings: &DeflateSettings) -> Option<(Agreed, HeaderValue)> {
    let offers = headers
        .get_all(SEC_WEBSOCKET_EXTENSIONS)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(split_list);
    for offer in offers {
        let Some(offer) = parse_offer(offer) else {
            continue;
        };
        let agreed = Agreed {
            server_no_context_takeover: offer.server_no_context_takeover
                || !settings.context_takeover,
            client_no_context_takeover: offer.client_no_context_takeover
                || !settings.context_takeover,
            server_max_window_bits: offer.server_max_window_bits.unwrap_or(15),
            settings: *settings,
        };
        let mut response = String::from(NAME);
        if agreed.server_no_context_takeover {
            response.push_str("; server_no_context_takeover");
        }
        if agreed.client_no_context_takeover {
            response.push_str("; client_no_context_takeover");
        }
        if let Some(bits) = offer.server_max_window_bits {
            response.push_str(&format!("; server_max_window_bits={bits}"));
        }
        // `client_max_window_bits` (offered or not) needs no answer: the
        // decompressor reads any window.
        let _ = offer.client_max_window_bits;
        let value = HeaderValue::from_str(&response).ok()?;
        return Some((agreed, value));
    }
    None
}

/// The elements of a comma-separated header list, commas inside quoted
/// strings kept.
fn split_list(value: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in value.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                items.push(value[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(value[start..].trim());
    items.retain(|s| !s.is_empty());
    items
}

/// A `permessage-deflate` offer's parameters (RFC 7692 section 7.1), or
/// `None` if the element is another extension or an offer the gateway
/// must decline (an unknown or repeated parameter, a bad value).
fn parse_offer(element: &str) -> Option<Offer> {
    let mut parts = element.split(';').map(str::trim);
    if !parts.next()?.eq_ignore_ascii_case(NAME) {
        return None;
    }
    let mut offer = Offer::default();
    let mut seen_server_bits = false;
    for param in parts {
        let (name, value) = match param.split_once('=') {
            Some((n, v)) => (n.trim(), Some(unquote(v.trim())?)),
            None => (param, None),
        };
        match (name.to_ascii_lowercase().as_str(), value) {
            ("server_no_context_takeover", None) if !offer.server_no_context_takeover => {
                offer.server_no_context_takeover = true
            }
            ("client_no_context_takeover", None) if !offer.client_no_context_takeover => {
                offer.client_no_context_takeover = true
            }
            ("server_max_window_bits", Some(v)) if !seen_server_bits => {
                seen_server_bits = true;
                offer.server_max_window_bits = Some(window_bits(v)?);
            }
            ("client_max_window_bits", v) if !offer.client_max_window_bits => {
                offer.client_max_window_bits = true;
                if let Some(v) = v {
                    window_bits(v)?;
                }
            }
            _ => return None,
        }
    }
    Some(offer)
}

/// A quoted-string's content, or a token as it is.
fn unquote(v: &str) -> Option<&str> {
    match v.strip_prefix('"') {
        Some(rest) => rest.strip_suffix('"').filter(|s| !s.contains(['"', '\\'])),
        None => Some(v),
    }
}

/// A window size parameter: 8 to 15, decimal without leading zeros
/// (section 7.1.2.1).
fn window_bits(v: &str) -> Option<u8> {
    if v.len() > 2 || v.starts_with('0') || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse::<u8>().ok().filter(|b| (8..=15).contains(b))
}

/// The last message a thread compressed without context takeover: the
/// message (held, so that its address stays its own), window bits, level,
/// and the compressed bytes.
type LastCompressed = (Bytes, u8, u32, Vec<u8>);

/// Compresses messages for one connection.
#[derive(Debug)]
pub struct Deflater {
    compress: Compress,
}

thread_local! {
    /// The compressors connections without context takeover borrow, one
    /// per window size and level.
    static SHARED_DEFLATERS: RefCell<Vec<(u8, u32, Deflater)>> = const { RefCell::new(Vec::new()) };
}

impl Deflater {
    /// A compressor for a window of `bits` (8 is compressed as 9: see the
    /// module's notes) at zlib level `level`.
    pub fn new(bits: u8, level: u32) -> Deflater {
        Deflater {
            compress: Compress::new_with_window_bits(
                Compression::new(level.clamp(1, 9)),
                false,
                bits.clamp(9, 15),
            ),
        }
    }

    /// Compresses `message` onto the end of `out` as one permessage-deflate
    /// message: a raw DEFLATE stream flushed to a byte boundary, without
    /// its final empty block's 4 bytes. With `reset`, the compressor
    /// forgets the message afterwards (no context takeover).
    pub fn compress(&mut self, message: &[u8], out: &mut Vec<u8>, reset: bool) {
        let start = out.len();
        // A sync flush of incompressible data grows it by about 5 bytes per
        // 16 KiB block; room for that and the flush itself.
        out.reserve(message.len() + message.len() / 1000 + 64);
        let mut input = message;
        loop {
            let before = self.compress.total_in();
            // Compressing into a Vec with spare room cannot fail: the only
            // errors are a bad flush order or a stream already finished.
            let _ = self.compress.compress_vec(input, out, FlushCompress::Sync);
            let used = (self.compress.total_in() - before) as usize;
            input = &input[used..];
            if input.is_empty() && out.len() < out.capacity() {
                break;
            }
            out.reserve((out.capacity() - start).max(256));
        }
        if out[start..].ends_with(&TAIL) {
            out.truncate(out.len() - TAIL.len());
        }
        if reset {
            self.compress.reset();
        }
    }

    /// Compresses `message` onto the end of `out` with this thread's shared
    /// compressor for `bits` and `level`, reset afterwards (no context
    /// takeover). The same message sent to many connections (a broadcast)
    /// is compressed once per thread: the last message compressed is
    /// remembered, holding a reference to its bytes so that a match by
    /// address and length is a match of content.
    pub fn compress_shared(message: &Bytes, bits: u8, level: u32, out: &mut Vec<u8>) {
        let bits = bits.max(9);
        thread_local! {
            static LAST: RefCell<Option<LastCompressed>> = const { RefCell::new(None) };
        }
        LAST.with(|cell| {
            let mut last = cell.borrow_mut();
            if let Some((m, b, l, compressed)) = last.as_ref() {
                if m.as_ptr() == message.as_ptr()
                    && m.len() == message.len()
                    && *b == bits
                    && *l == level
                {
                    out.extend_from_slice(compressed);
                    return;
                }
            }
            let start = out.len();
            Deflater::with_shared(bits, level, |z| z.compress(message, out, true));
            // Remembered up to 1 MiB: what a thread holds stays bounded.
            *last = (message.len() <= 1 << 20)
                .then(|| (message.clone(), bits, level, out[start..].to_vec()));
        })
    }

    /// Runs `f` with this thread's shared compressor for `bits` and
    /// `level` (created on first use); for connections without context
    /// takeover, which reset it after each message.
    pub fn with_shared<T>(bits: u8, level: u32, f: impl FnOnce(&mut Deflater) -> T) -> T {
        // 8 bits is compressed as 9: one compressor for both.
        let bits = bits.max(9);
        SHARED_DEFLATERS.with(|cell| {
            let mut all = cell.borrow_mut();
            let i = match all.iter().position(|(b, l, _)| *b == bits && *l == level) {
                Some(i) => i,
                None => {
                    all.push((bits, level, Deflater::new(bits, level)));
                    all.len() - 1
                }
            };
            f(&mut all[i].2)
        })
    }
}

/// Decompresses the messages of one connection.
#[derive(Debug)]
pub struct Inflater {
    decompress: Decompress,
}

/// How much output to make room for at a time.
const INFLATE_CHUNK: usize = 16 << 10;

impl Default for Inflater {
    fn default() -> Self {
        Inflater {
            decompress: Decompress::new_with_window_bits(false, 15),
        }
    }
}

impl Inflater {
    /// Decompresses `input`, part of a compressed message, appending to
    /// `out`; `fin` when it is the message's last part. Fails with 1009
    /// (`MessageTooLarge`) as soon as `out` would pass `limit` bytes, and
    /// with 1007 if the data is not a valid DEFLATE stream.
    pub fn inflate(
        &mut self,
        input: &[u8],
        fin: bool,
        out: &mut Vec<u8>,
        limit: usize,
    ) -> Result<(), ProtocolError> {
        self.feed(input, out, limit)?;
        if fin {
            self.feed(&TAIL, out, limit)?;
        }
        Ok(())
    }

    fn feed(
        &mut self,
        mut input: &[u8],
        out: &mut Vec<u8>,
        limit: usize,
    ) -> Result<(), ProtocolError> {
        loop {
            if out.len() == out.capacity() {
                if out.len() > limit {
                    return Err(ProtocolError::MessageTooLarge { limit });
                }
                // Grows geometrically (no quadratic copying for a large
                // limit), never more than one byte past the limit: enough
                // to tell that it was passed.
                let room = out
                    .len()
                    .max(INFLATE_CHUNK)
                    .min(limit.saturating_add(1) - out.len())
                    .max(1);
                out.reserve_exact(room);
            }
            let before = self.decompress.total_in();
            let status = self
                .decompress
                .decompress_vec(input, out, FlushDecompress::Sync)
                .map_err(|_| ProtocolError::InvalidCompressedData)?;
            input = &input[(self.decompress.total_in() - before) as usize..];
            if out.len() > limit {
                return Err(ProtocolError::MessageTooLarge { limit });
            }
            match status {
                // A final block ends the stream: RFC 7692 compressors never
                // set BFINAL in a message with context takeover, but a
                // message may end with one; the next message starts afresh.
                Status::StreamEnd => {
                    self.decompress.reset(false);
                    if input.is_empty() {
                        return Ok(());
                    }
                }
                Status::Ok | Status::BufError => {
                    if input.is_empty() && out.len() < out.capacity() {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Forgets the window (the client does not take context over).
    pub fn reset(&mut self) {
        self.decompress.reset(false);
    }

    /// Runs `f` with this thread's shared decompressor, reset afterwards:
    /// for a whole message (one frame) of a connection without client
    /// context takeover.
    pub fn shared<T>(f: impl FnOnce(&mut Inflater) -> T) -> T {
        thread_local! {
            static SHARED: RefCell<Inflater> = RefCell::new(Inflater::default());
        }
        SHARED.with(|cell| {
            let mut inflater = cell.borrow_mut();
            let result = f(&mut inflater);
            inflater.reset();
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTINGS: DeflateSettings = DeflateSettings {
        min_size: 0,
        context_takeover: false,
        level: 1,
    };

    fn offer(values: &[&str], settings: &DeflateSettings) -> Option<(Agreed, String)> {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(SEC_WEBSOCKET_EXTENSIONS, HeaderValue::from_str(v).unwrap());
        }
        negotiate(&h, settings).map(|(a, v)| (a, v.to_str().unwrap().to_owned()))
    }

    #[test]
    fn a_plain_offer_is_accepted_without_context_takeover_by_default() {
        let (agreed, response) = offer(&["permessage-deflate"], &SETTINGS).unwrap();
        assert_eq!(
            response,
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        );
        assert!(agreed.server_no_context_takeover && agreed.client_no_context_takeover);
        assert_eq!(agreed.server_max_window_bits, 15);
    }

    #[test]
    fn with_context_takeover_only_what_the_client_asks_is_echoed() {
        let on = DeflateSettings {
            context_takeover: true,
            ..SETTINGS
        };
        let (_, response) = offer(&["permessage-deflate; client_max_window_bits"], &on).unwrap();
        assert_eq!(response, "permessage-deflate");
        let (agreed, response) = offer(
            &["permessage-deflate; server_no_context_takeover; server_max_window_bits=10"],
            &on,
        )
        .unwrap();
        assert_eq!(
            response,
            "permessage-deflate; server_no_context_takeover; server_max_window_bits=10"
        );
        assert_eq!(agreed.server_max_window_bits, 10);
        assert!(!agreed.client_no_context_takeover);
    }

    #[test]
    fn a_bad_offer_is_declined_and_the_next_one_taken() {
        for bad in [
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=09",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; client_no_context_takeover=1",
            "permessage-deflate; client_max_window_bits=99",
            "permessage-deflate; unknown",
            "x-webkit-deflate-frame",
        ] {
            assert_eq!(offer(&[bad], &SETTINGS), None, "{bad}");
        }
        let (agreed, _) = offer(
            &["permessage-deflate; server_max_window_bits=16, permessage-deflate; server_max_window_bits=\"12\""],
            &SETTINGS,
        )
        .unwrap();
        assert_eq!(agreed.server_max_window_bits, 12);
        let (_, response) = offer(&["foo; a=\"b,c\"", "permessage-deflate"], &SETTINGS).unwrap();
        assert!(response.starts_with("permessage-deflate"));
    }

    fn roundtrip(message: &[u8], bits: u8, reset: bool) -> Vec<u8> {
        let mut d = Deflater::new(bits, 6);
        let mut wire = Vec::new();
        d.compress(message, &mut wire, reset);
        assert!(!wire.ends_with(&TAIL));
        let mut out = Vec::new();
        Inflater::default()
            .inflate(&wire, true, &mut out, usize::MAX - 1)
            .unwrap();
        out
    }

    #[test]
    fn messages_survive_compression_at_every_window_size() {
        let text: Vec<u8> = (0..100_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        for bits in 8..=15 {
            assert_eq!(roundtrip(&text, bits, true), text, "{bits}");
        }
        assert_eq!(roundtrip(b"", 15, true), b"");
        assert_eq!(roundtrip(b"Hello", 15, false), b"Hello");
    }

    #[test]
    fn rfc_7692_section_7_2_3_1_hello_decompresses() {
        let mut out = Vec::new();
        Inflater::default()
            .inflate(
                &[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00],
                true,
                &mut out,
                100,
            )
            .unwrap();
        assert_eq!(out, b"Hello");
    }

    #[test]
    fn a_decompression_bomb_stops_at_the_limit() {
        let zeros = vec![0u8; 10 << 20];
        let mut wire = Vec::new();
        Deflater::new(15, 9).compress(&zeros, &mut wire, true);
        assert!(wire.len() < 20 << 10, "{}", wire.len());
        let mut out = Vec::new();
        let r = Inflater::default().inflate(&wire, true, &mut out, 1 << 20);
        assert_eq!(r, Err(ProtocolError::MessageTooLarge { limit: 1 << 20 }));
        assert!(
            out.capacity() <= (1 << 20) + INFLATE_CHUNK,
            "{}",
            out.capacity()
        );
    }

    #[test]
    fn garbage_is_invalid_compressed_data() {
        let mut out = Vec::new();
        let r = Inflater::default().inflate(&[0xff; 16], true, &mut out, 1000);
        assert_eq!(r, Err(ProtocolError::InvalidCompressedData));
    }
}
