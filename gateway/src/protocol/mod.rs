//! RFC 6455 on the wire, with no WebAssembly in sight: frames ([`frame`]),
//! messages reassembled from them ([`message`]) and the opening handshake's
//! checks and refusals ([`handshake`]).

pub mod frame;
pub mod handshake;
pub mod message;

#[cfg(test)]
mod regressions;
