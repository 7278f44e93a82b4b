//! The gateway source files the fuzz targets exercise, compiled here on
//! their own.
//!
//! The `wasmgate` crate links wasmtime and its build script compiles the
//! example plugins: building all of that with nightly and sanitizer
//! coverage would take far longer than the fuzzing itself. The parsers do
//! not need any of it: `protocol/` (frames, messages, the opening
//! handshake), `config.rs` and what it uses (`error.rs`, `file.rs`) depend
//! only on ordinary crates (and `assets.rs`, the built-in static files). So this crate includes those files as they are,
//! through `#[path]`, in a module tree that mirrors the gateway's: the
//! gateway's paths (`crate::protocol::frame`, `crate::error`,
//! `crate::file::read_regular_file`) resolve here to the same files, and the
//! fuzz targets test the very code the gateway runs, not a copy.
//!
//! `protocol/mod.rs` is included whole, so its submodules (and any added
//! later) come along; a `#[cfg(test)]` module in these files is not
//! compiled here. If one of the files starts using another module of the
//! gateway, include that module here too (or, for one that needs wasmtime,
//! move what the parser needs out of it).

#![warn(missing_docs)]

#[path = "../../gateway/src/assets.rs"]
pub mod assets;
#[path = "../../gateway/src/config.rs"]
pub mod config;
#[path = "../../gateway/src/error.rs"]
pub mod error;
#[path = "../../gateway/src/file.rs"]
pub mod file;
#[path = "../../gateway/src/protocol/mod.rs"]
pub mod protocol;
