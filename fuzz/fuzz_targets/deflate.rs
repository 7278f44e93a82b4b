//! Fuzz target `deflate`: permessage-deflate (`protocol/deflate.rs`) on
//! arbitrary input.
//!
//! # Input
//!
//! The first byte picks a limit on decompressed output (0 to 64 KiB, in
//! 256-byte steps) and how the rest is split into the frames of one message;
//! the rest is the compressed data, as a client could send it. The same
//! bytes, read as text, are offered as `Sec-WebSocket-Extensions` values.
//!
//! # What is checked
//!
//! - Decompressing never panics and never produces more than the limit:
//!   it stops with `MessageTooLarge` (1009) at most one byte past it, or
//!   fails with `InvalidCompressedData` (1007), whatever the bytes and
//!   however they are split.
//! - The same bytes all at once and split into frames decompress to the
//!   same output, or both fail.
//! - Whatever decompressed is compressed again (at the window the input
//!   byte picks, with and without reset) and decompresses back to itself.
//! - `negotiate` never panics; an agreement answers with a value starting
//!   with `permessage-deflate` and a window of 8 to 15 bits.

#![no_main]

use hyper::header::{HeaderMap, HeaderValue, SEC_WEBSOCKET_EXTENSIONS};
use libfuzzer_sys::fuzz_target;
use wasmgate_fuzz::protocol::deflate::{negotiate, DeflateSettings, Deflater, Inflater};
use wasmgate_fuzz::protocol::frame::ProtocolError;

/// Decompresses `parts` as the frames of one message with `limit`.
fn inflate(parts: &[&[u8]], limit: usize) -> Result<Vec<u8>, ProtocolError> {
    let mut z = Inflater::default();
    let mut out = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        z.inflate(part, i + 1 == parts.len(), &mut out, limit)?;
        assert!(
            out.len() <= limit,
            "{} bytes past a limit of {limit}",
            out.len()
        );
    }
    Ok(out)
}

fuzz_target!(|data: &[u8]| {
    let Some((&plan, body)) = data.split_first() else {
        return;
    };
    let limit = usize::from(plan) * 256;
    let whole = inflate(&[body], limit);
    let cut = (usize::from(plan) * 7) % (body.len() + 1);
    let (a, b) = body.split_at(cut);
    let split = inflate(&[a, b], limit);
    // Both succeed alike, or both fail: which error comes first (the limit,
    // or bad data in the same stretch of input) may depend on the split.
    match (&whole, &split) {
        (Ok(x), Ok(y)) => assert_eq!(x, y),
        (Err(_), Err(_)) => {}
        (x, y) => panic!("all at once {x:?}, split {y:?}"),
    }
    if let Ok(message) = whole {
        let bits = 8 + plan % 8;
        for reset in [true, false] {
            let mut wire = Vec::new();
            Deflater::new(bits, 1 + u32::from(plan % 9)).compress(&message, &mut wire, reset);
            let back = inflate(&[&wire], message.len()).expect("our own output decompresses");
            assert_eq!(back, message);
        }
    }
    if let Ok(text) = std::str::from_utf8(body) {
        if let Ok(value) = HeaderValue::from_str(text) {
            let mut h = HeaderMap::new();
            h.insert(SEC_WEBSOCKET_EXTENSIONS, value);
            let settings = DeflateSettings {
                min_size: 0,
                context_takeover: plan % 2 == 0,
                level: 1,
            };
            if let Some((agreed, response)) = negotiate(&h, &settings) {
                assert!(response
                    .to_str()
                    .unwrap_or("")
                    .starts_with("permessage-deflate"));
                assert!((8..=15).contains(&agreed.server_max_window_bits));
            }
        }
    }
});
