//! Everything WebAssembly: the engine and loading components ([`engine`]),
//! the on-disk cache of compiled components ([`cache`]), an instance and
//! the calls into it ([`instance`]), a call's time limit ([`deadline`]), one instance shared by a route's
//! connections ([`shared`]), memory limits per instance and tenant
//! ([`memory`]), the host functions plugins
//! call back ([`host`]), the WASI they see ([`wasi`]), the parts of
//! its filesystem the gateway defines itself ([`filesystem`]), where their
//! stdout and stderr go ([`output`]) and the upgrade request a connection
//! keeps for `on-resume` ([`request`]).
//!
//! Nothing here knows about sockets or frames: an instance sees its
//! connection through a [`crate::hub::ConnHandle`] and its route through a
//! [`host::Scope`].

pub mod cache;
pub mod deadline;
pub mod engine;
pub mod filesystem;
pub mod host;
pub mod instance;
pub mod memory;
pub mod output;
pub mod request;
pub mod shared;
pub mod wasi;

pub use engine::{Plugin, Runtime};
