//! One WebSocket connection as it runs: its lifecycle and event loop
//! ([`session`]), its keepalive deadlines ([`keepalive`]) and its bounded
//! outbound queue and writer ([`outbox`]).

pub mod keepalive;
pub mod outbox;
pub mod session;
