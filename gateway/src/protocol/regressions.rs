//! Regression tests for what fuzzing found in this module (`./dev fuzz`,
//! `fuzz/README.md`): each test is named after the behaviour it proves and
//! replays, by hand, the input the fuzzer found.

use crate::protocol::frame::{FrameReader, OpCode, ProtocolError, ReadError};

/// A masked client frame: `b0` (FIN, RSV, opcode), then `payload` under a
/// fixed mask.
fn masked(b0: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x83, 0x83, 0x31, 0xC0];
    assert!(payload.len() < 126);
    let mut out = vec![b0, 0x80 | payload.len() as u8];
    out.extend_from_slice(&mask);
    out.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
    out
}

/// Found by the `frame` target: a text fragment ending part-way through a
/// character, then a new text frame instead of a continuation. The reader
/// checked the new frame's text as the rest of the interrupted message, so
/// the connection failed with 1007 (invalid UTF-8) although the new frame's
/// text is valid; the fault is the order of the fragments, a protocol error
/// (1002). The reader now refuses such a frame from its header.
#[tokio::test]
async fn a_new_message_inside_a_fragmented_one_fails_with_1002_not_as_bad_utf8() {
    let mut bytes = masked(0x01, b"}\0\xCE");
    bytes.extend(masked(0x01, b"\0"));
    let mut reader = FrameReader::new(&bytes, 1024);
    let mut eof: &[u8] = &[];
    let first = reader.read_frame(&mut eof).await.unwrap();
    assert_eq!((first.fin, first.opcode), (false, OpCode::Text));
    match reader.read_frame(&mut eof).await {
        Err(ReadError::Protocol(e)) => {
            assert_eq!(e, ProtocolError::ExpectedContinuation);
            assert_eq!(e.close_code(), 1002);
        }
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

/// The same rule for the other kinds of frame out of order, all refused
/// from the header alone (no payload byte has arrived): a binary frame
/// inside a fragmented text message, and a continuation with no message in
/// progress.
#[tokio::test]
async fn fragments_out_of_order_are_refused_from_the_header() {
    let mut bytes = masked(0x01, b"\xCE");
    bytes.extend(&masked(0x82, b"xyz")[..6]);
    let mut reader = FrameReader::new(&bytes, 1024);
    let mut eof: &[u8] = &[];
    reader.read_frame(&mut eof).await.unwrap();
    assert!(matches!(
        reader.read_frame(&mut eof).await,
        Err(ReadError::Protocol(ProtocolError::ExpectedContinuation))
    ));

    let bytes = &masked(0x80, b"xyz")[..2];
    let mut reader = FrameReader::new(bytes, 1024);
    assert!(matches!(
        reader.read_frame(&mut eof).await,
        Err(ReadError::Protocol(ProtocolError::UnexpectedContinuation))
    ));
}
