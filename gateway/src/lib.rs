//! # wasmgate
//!
//! A WebSocket gateway whose route handlers are sandboxed WebAssembly
//! components. The gateway terminates connections (RFC 6455 handshake,
//! framing, limits, keepalive, closing handshake); a route's plugin, one
//! instance per connection, decides what the route does through the WIT
//! contract in `wit/plugin.wit`.
//!
//! Layout, by layer, lowest first; each folder's `mod.rs` says what it owns:
//! - [`protocol`]: RFC 6455 on the wire (frames, messages, the opening
//!   handshake's checks). No WebAssembly.
//! - [`connection`]: one connection as it runs: its lifecycle state machine
//!   and event loop, keepalive, its outbound queue.
//! - [`hub`]: a route's connections, rooms and metadata, shared by its
//!   connections and reached by plugins through host calls.
//! - [`plugin`]: the WebAssembly engine, loading and caching components, an
//!   instance and the calls into it, the host functions, WASI, plugin output.
//! - [`routing`]: routes as they run (their current version, swapped on
//!   reload), tenants and what they use, and the table from host and path
//!   to route.
//! - [`server`]: listening, HTTP, upgrades, static files (`[[static]]`),
//!   the admin listener (page, server-sent events, metrics, health),
//!   applying reloads, graceful shutdown.
//! - [`tls`]: TLS termination: certificates, chosen by SNI per tenant, and
//!   reloaded when their files change.
//! - [`reload`]: watching plugin and config files and SIGHUP, and asking the
//!   server to apply what changed.
//! - [`authoring`]: what `wasmgate new`, `bindings` and `componentize`
//!   give plugin authors (templates, C bindings, componentizing).
//! - [`cluster`]: nodes sharing rooms, broadcasts and sends through Redis
//!   (`[cluster]`).
//! - [`metrics`]: the Prometheus metrics the admin listener serves.
//! - [`quota`]: token buckets and the CPU meter behind rate limits and
//!   tenants' CPU budgets.
//! - [`config`], [`error`], [`file`], [`builtin`]: `gateway.toml`, the error
//!   type, reading deployable files and their content hashes, the embedded
//!   example plugins and default config; [`assets`]: the demo page.

#![warn(missing_docs)]

pub mod assets;
pub mod authoring;
pub mod builtin;
pub mod cluster;
pub mod config;
pub mod connection;
pub mod error;
pub mod file;
pub mod hub;
pub mod metrics;
pub mod plugin;
pub mod protocol;
pub mod quota;
pub mod reload;
pub mod routing;
pub mod sched;
#[cfg(test)]
mod scratch;
pub mod server;
pub mod tls;

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
