//! Deployable files, read safely and named by content: [`read_regular_file`]
//! (what the config, plugin loading and the watcher all read with) and
//! [`ContentHash`] (the SHA-256 that tells one plugin version from another,
//! in logs, reloads and the compile cache). The lowest layer: it knows
//! nothing of WebSockets or WebAssembly.

use std::fmt;
use std::io;
use std::path::Path;

use sha2::{Digest, Sha256};

/// The SHA-256 of a file's bytes.
///
/// `Display` prints a short form for logs (`sha256:` and the first 12 hex
/// digits); [`ContentHash::to_hex`] gives all 64 digits, for example for a
/// cache key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentHash([u8; 32]);

impl ContentHash {
    /// The SHA-256 of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    /// The 32 bytes of the hash.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The full hash, 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }
}

impl From<[u8; 32]> for ContentHash {
    fn from(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
}

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex(&self.0[..6]))
    }
}

impl fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_hex())
    }
}

/// Lowercase hex digits of `bytes`.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

/// Largest file read, in bytes: the biggest real plugins (a Python guest
/// with its interpreter) are tens of MiB.
pub const MAX_FILE_SIZE: u64 = 512 << 20;

/// Reads a regular file of at most [`MAX_FILE_SIZE`] bytes; a device, a FIFO
/// or a folder (or a symlink to one) is refused without being opened
/// (reading `/dev/zero` would never end, opening a FIFO would block).
pub fn read_regular_file(path: &Path) -> io::Result<Vec<u8>> {
    use std::io::Read;
    // Before opening: opening a FIFO blocks until a writer opens it too.
    if !std::fs::metadata(path)?.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    let file = std::fs::File::open(path)?;
    // Again on what was opened: the path may have been replaced in between.
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    if meta.len() > MAX_FILE_SIZE {
        return Err(io::Error::other(format!(
            "larger than {} MiB",
            MAX_FILE_SIZE >> 20
        )));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(MAX_FILE_SIZE + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE_SIZE {
        return Err(io::Error::other(format!(
            "larger than {} MiB",
            MAX_FILE_SIZE >> 20
        )));
    }
    Ok(bytes)
}
