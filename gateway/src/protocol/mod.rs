//! RFC 6455 on the wire, with no WebAssembly in sight: frames ([`frame`]),
//! messages reassembled from them ([`message`]), the opening handshake's
//! checks and refusals ([`handshake`]) and permessage-deflate, RFC 7692
//! ([`deflate`]).

pub mod deflate;
pub mod frame;
pub mod handshake;
pub mod message;

#[cfg(test)]
mod regressions;
