//! Hot reload: watching plugin and config files, and swapping in what
//! changed while the gateway keeps serving.
//!
//! - [`watch`]: which watched files changed, once their writes have settled,
//!   with their new bytes and content hash.

pub mod watch;
