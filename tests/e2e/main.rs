//! End-to-end tests: the real `wasmgate` binary on an ephemeral port, driven
//! by real clients over real sockets. Each module names a behaviour area.

mod support;

mod admin;
mod browser;
mod close;
mod cluster;
mod compression;
mod config_errors;
mod echo;
mod examples;
mod handshake;
mod hibernate;
mod hostile;
mod isolation;
mod languages;
mod lifecycle;
mod limits;
mod plugin_failure;
mod reload;
mod scaffold;
mod shared;
mod shutdown;
mod static_files;
mod tenants;
mod tls;
