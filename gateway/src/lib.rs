//! # wasmgate
//!
//! A WebSocket gateway whose route handlers are sandboxed WebAssembly
//! components. The gateway terminates connections (RFC 6455 handshake,
//! framing, limits, keepalive, closing handshake); a route's plugin, one
//! instance per connection, decides what the route does through the WIT
//! contract in `wit/plugin.wit`.
//!
//! Layout, one concept per module:
//! - [`config`]: `gateway.toml`, its defaults and its errors.
//! - [`server`]: listening, HTTP, routing, graceful shutdown.
//! - [`handshake`]: validating upgrade requests and answering refusals.
//! - [`session`]: one connection's life, from `on-open` to `on-close`.
//! - [`frame`] and [`message`]: RFC 6455 framing and message reassembly.
//! - [`outbox`]: a connection's bounded outbound queue and its writer.
//! - [`hub`]: a route's connections, rooms and metadata.
//! - [`route`]: a route as it runs, and connection caps.
//! - [`plugin`]: the WebAssembly engine and loading components.
//! - [`host`]: the host functions plugins call.
//! - [`wasi`]: the WASI plugins see, callable without blocking.
//! - [`output`]: a plugin's stdout and stderr, as tagged log lines.
//! - [`builtin`]: the embedded example plugins and default config.
//! - [`reload`]: hot reload, starting with watching plugin and config files.

#![warn(missing_docs)]

pub mod builtin;
pub mod config;
pub mod error;
pub mod frame;
pub mod handshake;
pub mod host;
pub mod hub;
pub mod message;
pub mod outbox;
pub mod output;
pub mod plugin;
pub mod reload;
pub mod route;
pub mod server;
pub mod session;
pub mod wasi;

/// Rust bindings generated from the WIT contract (`wit/plugin.wit`); the
/// WIT file documents every item.
#[allow(missing_docs)]
pub mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "plugin",
    });
}

pub use config::Config;
pub use error::{Error, Errors};
pub use server::Gateway;
