//! Everything WebAssembly: the engine and loading components ([`engine`]),
//! the on-disk cache of compiled components ([`cache`]), one connection's
//! instance and the calls into it ([`instance`]), the host functions plugins
//! call back ([`host`]), the WASI they see ([`wasi`]) and where their
//! stdout and stderr go ([`output`]).
//!
//! Nothing here knows about sockets or frames: an instance sees its
//! connection through a [`crate::hub::ConnHandle`] and its route through a
//! [`host::Scope`].

pub mod cache;
pub mod engine;
pub mod host;
pub mod instance;
pub mod output;
pub mod wasi;

pub use engine::{Plugin, Runtime};
