//! Reassembly of fragmented messages (RFC 6455 section 5.4), with the total
//! size capped by `max_message_size` and text validated as UTF-8 as each
//! fragment arrives, so a bad byte fails the connection at once.

use bytes::{Bytes, BytesMut};

use crate::frame::{Frame, OpCode, ProtocolError};

/// A complete data message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A text message (valid UTF-8).
    Text(String),
    /// A binary message.
    Binary(Bytes),
}

/// Collects data frames into messages.
#[derive(Debug)]
pub struct Assembler {
    max_message_size: usize,
    /// The message in progress: whether it is text, and its bytes so far.
    partial: Option<(bool, BytesMut)>,
    /// How much of a partial text message is known to be valid UTF-8.
    validated: usize,
}

impl Assembler {
    /// An assembler refusing messages over `max_message_size` bytes.
    pub fn new(max_message_size: usize) -> Self {
        Assembler {
            max_message_size,
            partial: None,
            validated: 0,
        }
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
                self.validated = 0;
                self.partial = Some((text, frame.payload));
                self.check_utf8(false)?;
                Ok(None)
            }
            (OpCode::Continuation, Some((_, buf))) => {
                if buf.len() + frame.payload.len() > self.max_message_size {
                    return Err(too_large);
                }
                buf.extend_from_slice(&frame.payload);
                self.check_utf8(frame.fin)?;
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

    /// Validates the bytes of a partial text message received since the
    /// last check. An incomplete character at the end is allowed unless this
    /// was the final fragment.
    fn check_utf8(&mut self, fin: bool) -> Result<(), ProtocolError> {
        let Some((true, buf)) = self.partial.as_ref() else {
            return Ok(());
        };
        match std::str::from_utf8(&buf[self.validated..]) {
            Ok(_) => {
                self.validated = buf.len();
                Ok(())
            }
            Err(e) if e.error_len().is_none() && !fin => {
                self.validated += e.valid_up_to();
                Ok(())
            }
            Err(_) => Err(ProtocolError::InvalidUtf8),
        }
    }
}

fn finish(text: bool, payload: BytesMut) -> Result<Message, ProtocolError> {
    if text {
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
    fn invalid_utf8_fails_at_the_first_bad_fragment() {
        let mut a = Assembler::new(100);
        assert_eq!(a.push(frame(false, OpCode::Text, b"ok")), Ok(None));
        assert_eq!(
            a.push(frame(
                false,
                OpCode::Continuation,
                &[0xCE, 0xBA, 0xF4, 0x90]
            )),
            Err(ProtocolError::InvalidUtf8)
        );
    }

    #[test]
    fn a_final_fragment_ending_mid_character_is_invalid() {
        let mut a = Assembler::new(100);
        assert_eq!(a.push(frame(false, OpCode::Text, b"a")), Ok(None));
        assert_eq!(
            a.push(frame(true, OpCode::Continuation, &[0xE2, 0x82])),
            Err(ProtocolError::InvalidUtf8)
        );
        let mut a = Assembler::new(100);
        assert_eq!(
            a.push(frame(true, OpCode::Text, &[0xE2, 0x82])),
            Err(ProtocolError::InvalidUtf8)
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
