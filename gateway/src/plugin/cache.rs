//! The on-disk cache of compiled plugins.
//!
//! Compiling a component is the slow part of loading it (milliseconds for a
//! small Rust plugin, seconds for a JavaScript or Python one). The cache keeps
//! each compiled component as a file named by a SHA-256 over the
//! component's bytes, the engine's compatibility hash (wasmtime's own summary
//! of every setting that changes compiled code) and the gateway's and
//! wasmtime's versions. A restart, or a reload of a plugin seen before,
//! maps that file instead of compiling.
//!
//! Trust: a cached file is native code that wasmtime runs as it is, so:
//! - the folder is created with mode 0700, and a folder or entry that others
//!   can write (mode `g+w` or `o+w`) is not used (logged; the plugin is
//!   compiled instead);
//! - every entry is stored with the SHA-256 of its bytes in its first 32
//!   bytes, checked before the rest is handed to wasmtime, so a corrupted or
//!   swapped entry is recompiled rather than run;
//! - entries are written to a temporary name and renamed into place, so a
//!   crash or a concurrent gateway never leaves a torn entry.
//!
//! This protects against accidents, not against someone who can write the
//! gateway user's files. A cache that cannot be read or written is logged
//! and skipped: the plugin is compiled as if there were no cache.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::Engine;

/// A folder of compiled components, for one engine configuration.
#[derive(Debug, Clone)]
pub struct CompileCache {
    dir: PathBuf,
    /// What every key includes besides the component: engine settings and
    /// versions.
    salt: [u8; 32],
}

/// Whether a component came from the cache or was compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Mapped from a cached file.
    Cached,
    /// Compiled now (and stored, if the cache is on).
    Compiled,
}

impl CompileCache {
    /// A cache in `dir` for components compiled by `engine`.
    pub fn new(dir: PathBuf, engine: &Engine) -> CompileCache {
        let mut h = StableHasher(Sha256::new());
        engine.precompile_compatibility_hash().hash(&mut h);
        env!("CARGO_PKG_VERSION").hash(&mut h);
        // The entry layout (checksum, then code): a change makes old entries
        // simply not found.
        "entry-format-2".hash(&mut h);
        let salt: [u8; 32] = h.0.finalize().into();
        CompileCache { dir, salt }
    }

    /// The default folder: `$XDG_CACHE_HOME/wasmgate/compiled`, else
    /// `$HOME/.cache/wasmgate/compiled`; `None` if neither variable is set.
    pub fn default_dir() -> Option<PathBuf> {
        let base = std::env::var_os("XDG_CACHE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))?;
        Some(base.join("wasmgate").join("compiled"))
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file a component with these bytes is cached in.
    fn entry(&self, bytes: &[u8]) -> PathBuf {
        let mut h = Sha256::new();
        h.update(self.salt);
        h.update(bytes);
        let key: [u8; 32] = h.finalize().into();
        let name: String = key.iter().map(|b| format!("{b:02x}")).collect();
        self.dir.join(format!("{name}.cwasm"))
    }

    /// The compiled component for `bytes`: from the cache when present,
    /// otherwise compiled and stored. Compilation errors are returned as is;
    /// cache errors are logged and skipped.
    pub fn load(
        &self,
        engine: &Engine,
        bytes: &[u8],
        name: &str,
    ) -> wasmtime::Result<(Component, Origin)> {
        let entry = self.entry(bytes);
        match self.read_entry(&entry) {
            Ok(Some(code)) => {
                // SAFETY: `code` is what `Component::serialize` wrote for an
                // engine with the same compatibility hash (it is in the
                // entry's name), and its SHA-256 matched the one stored with
                // it, in a folder and file only the gateway's user can write
                // (see the module header). wasmtime also checks its header.
                match unsafe { Component::deserialize(engine, &code) } {
                    Ok(c) => return Ok((c, Origin::Cached)),
                    Err(e) => tracing::warn!(
                        file = %entry.display(),
                        "ignoring an unusable compiled-plugin cache entry: {e:#}"
                    ),
                }
            }
            Ok(None) => {}
            Err(why) => tracing::warn!(
                file = %entry.display(),
                "ignoring a compiled-plugin cache entry: {why}; compiling instead"
            ),
        }
        announce_compile(name, bytes.len());
        let component = Component::new(engine, bytes)?;
        if let Err(e) = self.store(&entry, &component) {
            tracing::warn!(
                dir = %self.dir.display(),
                "cannot write the compiled-plugin cache (plugins still load, compiled each time): {e}"
            );
        }
        Ok((component, Origin::Compiled))
    }

    /// The checked code of an entry; `None` if there is none.
    fn read_entry(&self, entry: &Path) -> Result<Option<Vec<u8>>, String> {
        if !entry.is_file() {
            return Ok(None);
        }
        for path in [self.dir.as_path(), entry] {
            if writable_by_others(path) {
                return Err(format!(
                    "{} can be written by other users (chmod go-w it)",
                    path.display()
                ));
            }
        }
        let data = std::fs::read(entry).map_err(|e| e.to_string())?;
        if data.len() < 32 {
            return Err("truncated".into());
        }
        let (digest, code) = data.split_at(32);
        let actual: [u8; 32] = Sha256::digest(code).into();
        if actual[..] != *digest {
            return Err("its checksum does not match its contents".into());
        }
        Ok(Some(code.to_vec()))
    }

    fn store(&self, entry: &Path, component: &Component) -> std::io::Result<()> {
        create_private_dir(&self.dir)?;
        let code = component
            .serialize()
            .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
        let digest: [u8; 32] = Sha256::digest(&code).into();
        let mut data = Vec::with_capacity(32 + code.len());
        data.extend_from_slice(&digest);
        data.extend_from_slice(&code);
        let tmp = entry.with_extension(format!("tmp{}", std::process::id()));
        write_private(&tmp, &data)?;
        std::fs::rename(&tmp, entry).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
    }
}

/// Whether users other than the owner may write `path`.
fn writable_by_others(path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o022 != 0)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        false
    }
}

/// Writes a file readable and writable by this user only.
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(data)
}

/// Creates `dir` (and its parents) readable and writable by this user only.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Feeds `Hash` output into SHA-256, so that the key does not depend on a
/// hasher whose algorithm may change between Rust releases.
struct StableHasher(Sha256);

impl Hasher for StableHasher {
    fn finish(&self) -> u64 {
        0
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

/// Says that a large plugin is being compiled (not found in the cache, or
/// no cache): a JavaScript or Python component takes tens of seconds, and
/// without this line nothing would be logged until it is done.
pub(crate) fn announce_compile(name: &str, len: usize) {
    if len >= 1 << 20 {
        tracing::info!(
            "compiling {name} ({:.1} MB); large components (JavaScript, Python) take tens of seconds the first time, then load from the compile cache",
            len as f64 / (1 << 20) as f64
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scratch::Scratch;

    #[test]
    fn a_component_compiled_once_is_mapped_from_the_cache_the_second_time() {
        let engine = Engine::default();
        let bytes = empty_component();
        let dir = Scratch::new("cache-hit");
        let cache = CompileCache::new(dir.path("cache"), &engine);
        assert_eq!(origin(&cache, &engine, &bytes), Some(Origin::Compiled));
        assert_eq!(origin(&cache, &engine, &bytes), Some(Origin::Cached));
        // Another engine configuration has its own entries.
        let mut config = wasmtime::Config::new();
        config.epoch_interruption(true);
        let other = Engine::new(&config).expect("engine");
        let cache2 = CompileCache::new(cache.dir().to_owned(), &other);
        assert_eq!(origin(&cache2, &other, &bytes), Some(Origin::Compiled));
    }

    #[test]
    fn a_corrupt_entry_is_ignored_and_replaced() {
        let engine = Engine::default();
        let bytes = empty_component();
        let dir = Scratch::new("cache-corrupt");
        let cache = CompileCache::new(dir.path("cache"), &engine);
        create_private_dir(cache.dir()).expect("dir");
        std::fs::write(cache.entry(&bytes), b"garbage").expect("write");
        assert_eq!(origin(&cache, &engine, &bytes), Some(Origin::Compiled));
        assert_eq!(origin(&cache, &engine, &bytes), Some(Origin::Cached));
    }

    #[test]
    fn a_tampered_entry_is_recompiled_not_run() {
        let engine = Engine::default();
        let bytes = empty_component();
        let dir = Scratch::new("cache-tampered");
        let cache = CompileCache::new(dir.path("cache"), &engine);
        assert_eq!(origin(&cache, &engine, &bytes), Some(Origin::Compiled));
        let entry = cache.entry(&bytes);
        let mut data = std::fs::read(&entry).expect("entry");
        let last = data.len() - 1;
        data[last] ^= 0xff;
        std::fs::write(&entry, &data).expect("tamper");
        assert_eq!(origin(&cache, &engine, &bytes), Some(Origin::Compiled));
        assert_eq!(origin(&cache, &engine, &bytes), Some(Origin::Cached));
    }

    #[cfg(unix)]
    #[test]
    fn a_cache_others_can_write_is_not_used() {
        use std::os::unix::fs::PermissionsExt;
        let engine = Engine::default();
        let bytes = empty_component();
        let dir = Scratch::new("cache-open");
        let cache = CompileCache::new(dir.path("cache"), &engine);
        assert_eq!(origin(&cache, &engine, &bytes), Some(Origin::Compiled));
        std::fs::set_permissions(cache.dir(), std::fs::Permissions::from_mode(0o777))
            .expect("chmod");
        assert_eq!(origin(&cache, &engine, &bytes), Some(Origin::Compiled));
    }

    #[test]
    fn an_unwritable_cache_still_compiles() {
        let engine = Engine::default();
        let cache = CompileCache::new(PathBuf::from("/proc/wasmgate-no-such-dir"), &engine);
        assert_eq!(
            origin(&cache, &engine, &empty_component()),
            Some(Origin::Compiled)
        );
    }

    /// Where a load of `bytes` came from (`None` if it failed).
    fn origin(cache: &CompileCache, engine: &Engine, bytes: &[u8]) -> Option<Origin> {
        cache.load(engine, bytes, "test.wasm").map(|c| c.1).ok()
    }

    /// The smallest valid component: the header of an empty one.
    fn empty_component() -> Vec<u8> {
        b"\0asm\x0d\0\x01\0".to_vec()
    }
}
