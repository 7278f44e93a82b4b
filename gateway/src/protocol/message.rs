//! Reassembly of fragmented messages (RFC 6455 section 5.4) with the total
//! size capped by `max_message_size`, or passing fragments through one by
//! one (`deliver = "fragments"`). Text has already been validated as UTF-8 by
//! the frame reader as its bytes arrived.

use bytes::{Bytes, BytesMut};

use crate::protocol::frame::{Frame, OpCode, ProtocolError};

/// A complete data message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A text message (valid UTF-8).
    Text(String),
    /// A binary message.
    Binary(Bytes),
}

/// One fragment passed through as it arrived (`deliver = "fragments"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fragment {
    /// Whether the message is text.
    pub text: bool,
    /// Whether this is the message's first fragment.
    pub first: bool,
    /// Whether this is the message's final fragment.
    pub fin: bool,
    /// The payload.
    pub data: BytesMut,
}

/// Collects data frames into messages.
#[derive(Debug)]
pub struct Assembler {
    max_message_size: usize,
    /// The message in progress: whether it is text, and its bytes so far.
    partial: Option<(bool, BytesMut)>,
}

impl Assembler {
    /// An assembler refusing messages over `max_message_size` bytes.
    pub fn new(max_message_size: usize) -> Self {
        Assembler {
            max_message_size,
            partial: None,
        }
    }

    /// Whether a fragmented message is part-way through.
    pub fn in_message(&self) -> bool {
        self.partial.is_some()
    }

    /// Feeds a data frame (text, binary or continuation); returns the
    /// message it completes, if any.
    pub fn push(&mut self, frame: Frame) -> Result<Option<Message>, ProtocolError> {
        let too_large = ProtocolError::MessageTooLarge {
            limit: self.max_message_size,
        };
        match (frame.opcode, self.partial.as_mut()) {
            (OpCode::Text | OpCode::Binary, Some(_)) => Err(ProtocolError::ExpectedContinuation),
            (OpCode::Continuation, None) => Err(ProtocolError::UnexpectedContinuation),
            (OpCode::Text | OpCode::Binary, None) => {
                let text = frame.opcode == OpCode::Text;
                if frame.payload.len() > self.max_message_size {
                    return Err(too_large);
                }
                if frame.fin {
                    return finish(text, frame.payload).map(Some);
                }
                self.partial = Some((text, frame.payload));
                Ok(None)
            }
            (OpCode::Continuation, Some((_, buf))) => {
                if buf.len() + frame.payload.len() > self.max_message_size {
                    return Err(too_large);
                }
                buf.extend_from_slice(&frame.payload);
                if !frame.fin {
                    return Ok(None);
                }
                match self.partial.take() {
                    Some((text, buf)) => finish(text, buf).map(Some),
                    None => Ok(None),
                }
            }
            (OpCode::Close | OpCode::Ping | OpCode::Pong, _) => Ok(None),
        }
    }
}

/// Passes data frames through one by one, enforcing fragment order,
/// without keeping them.
#[derive(Debug, Default)]
pub struct Streamer {
    /// The kind of the message in progress, if any.
    current: Option<bool>,
}

impl Streamer {
    /// Whether a fragmented message is in progress (its final fragment has
    /// not arrived).
    pub fn in_message(&self) -> bool {
        self.current.is_some()
    }

    /// Checks a data frame and returns it as a fragment.
    pub fn push(&mut self, frame: Frame) -> Result<Fragment, ProtocolError> {
        let (text, first) = match (frame.opcode, self.current) {
            (OpCode::Text | OpCode::Binary, Some(_)) => {
                return Err(ProtocolError::ExpectedContinuation)
            }
            (OpCode::Continuation, None) => return Err(ProtocolError::UnexpectedContinuation),
            (OpCode::Continuation, Some(text)) => (text, false),
            (OpCode::Text | OpCode::Binary, None) => (frame.opcode == OpCode::Text, true),
            (OpCode::Close | OpCode::Ping | OpCode::Pong, _) => {
                return Err(ProtocolError::UnknownOpcode(0x8))
            }
        };
        self.current = (!frame.fin).then_some(text);
        Ok(Fragment {
            text,
            first,
            fin: frame.fin,
            data: frame.payload,
        })
    }
}

fn finish(text: bool, payload: BytesMut) -> Result<Message, ProtocolError> {
    if text {
        // The reader has validated these bytes already; checking again here
        // is what lets us build the String without `unsafe`.
        String::from_utf8(Vec::from(payload))
            .map(Message::Text)
            .map_err(|_| ProtocolError::InvalidUtf8)
    } else {
        Ok(Message::Binary(payload.freeze()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(fin: bool, opcode: OpCode, payload: &[u8]) -> Frame {
        Frame {
            fin,
            rsv1: false,
            opcode,
            payload: BytesMut::from(payload),
        }
    }

    #[test]
    fn fragments_are_joined_and_a_character_may_span_them() {
        let mut a = Assembler::new(100);
        let euro = "€".as_bytes();
        assert_eq!(a.push(frame(false, OpCode::Text, &euro[..1])), Ok(None));
        assert_eq!(
            a.push(frame(false, OpCode::Continuation, &euro[1..2])),
            Ok(None)
        );
        assert_eq!(
            a.push(frame(true, OpCode::Continuation, &euro[2..])),
            Ok(Some(Message::Text("€".into())))
        );
    }

    #[test]
    fn the_total_of_fragments_is_capped() {
        let mut a = Assembler::new(10);
        assert_eq!(a.push(frame(false, OpCode::Binary, &[0; 6])), Ok(None));
        assert_eq!(
            a.push(frame(true, OpCode::Continuation, &[0; 5])),
            Err(ProtocolError::MessageTooLarge { limit: 10 })
        );
    }

    #[test]
    fn streamed_fragments_pass_through_in_order() {
        let mut s = Streamer::default();
        let f = s.push(frame(false, OpCode::Text, b"ab")).unwrap();
        assert!(f.first && !f.fin && f.text);
        let f = s.push(frame(true, OpCode::Continuation, b"c")).unwrap();
        assert!(!f.first && f.fin && f.text);
        s.push(frame(false, OpCode::Binary, &[0xFF])).unwrap();
        assert_eq!(
            s.push(frame(true, OpCode::Binary, b"")),
            Err(ProtocolError::ExpectedContinuation)
        );
    }

    #[test]
    fn continuation_order_is_enforced() {
        let mut a = Assembler::new(10);
        assert_eq!(
            a.push(frame(true, OpCode::Continuation, b"x")),
            Err(ProtocolError::UnexpectedContinuation)
        );
        assert_eq!(a.push(frame(false, OpCode::Binary, b"x")), Ok(None));
        assert_eq!(
            a.push(frame(true, OpCode::Text, b"x")),
            Err(ProtocolError::ExpectedContinuation)
        );
    }
}
