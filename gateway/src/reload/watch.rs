//! Watching files for changes of content: the first half of hot reload.
//!
//! A [`FileWatcher`] watches a set of files (plugins, the config) and sends a
//! [`FileChange`] when one of them has new content. Deploying replaces a file
//! in several ways, and all of them are seen because the watcher watches the
//! *folders* holding the files (not the files' inodes, which a rename or a
//! symlink swap leaves behind):
//!
//! - writing in place (truncate and write, as a compiler does);
//! - writing a temporary file in the same folder and renaming it over the old
//!   one;
//! - swapping a symlink (a new symlink renamed over the old one, `ln -sfn`):
//!   the folder of the symlink and the folder of its target are both watched,
//!   and so is the folder of a symlinked folder on the path
//!   (`current/plugin.wasm` with `current -> releases/v2`);
//! - deleting the file (reported as an error) and creating it again.
//!
//! A file is read only once its writes have *settled*: no event for it for
//! the settle time, the timer restarting on every event, so a half-written
//! file is not taken for a broken one. It is reported only when its SHA-256
//! differs from the last one reported: a `touch` or rewriting the same bytes
//! sends nothing.
//!
//! Not seen: replacing or deleting a file's folder itself, unless the folder
//! is reached through a symlink (a folder that is deleted and created again
//! is watched again at the next [`FileWatcher::set_files`]). Symlinks directly
//! under the root (`/tmp` on macOS, `/bin` on merged-`/usr` systems) are
//! followed but not watched, so that `/` is never watched.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fmt;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::mpsc::{self as std_mpsc, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc::{self as tokio_mpsc, UnboundedReceiver, UnboundedSender};

/// The longest settle time [`FileWatcher::new`] accepts; longer ones are
/// clamped to it.
pub const MAX_SETTLE: Duration = Duration::from_secs(3600);

/// How many symlinks resolving one path may go through (as Linux's
/// `MAXSYMLINKS`); past that the path is taken as it is.
const MAX_SYMLINK_HOPS: usize = 40;

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

/// A watched file whose content changed, sent once its writes have settled.
#[derive(Clone, PartialEq, Eq)]
pub struct FileChange {
    /// The file, spelled as it was given to [`FileWatcher::set_files`].
    pub path: PathBuf,
    /// The new bytes and their hash, read once after settling; or why the
    /// file cannot be read (`"file was deleted"`, a permission error...).
    /// An error is sent once; the next readable content is sent again even
    /// if it equals the content before the error.
    pub content: Result<(Vec<u8>, ContentHash), String>,
}

impl fmt::Debug for FileChange {
    // The bytes can be megabytes of WebAssembly: show their length only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("FileChange");
        s.field("path", &self.path);
        match &self.content {
            Ok((bytes, hash)) => s.field(
                "content",
                &format_args!("Ok({} bytes, {hash})", bytes.len()),
            ),
            Err(reason) => s.field("content", &format_args!("Err({reason:?})")),
        };
        s.finish()
    }
}

/// Why a [`FileWatcher`] could not start or watch a folder.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The operating system's file watching (inotify, FSEvents,
    /// ReadDirectoryChangesW...) or the watcher's thread could not be
    /// started.
    #[error("cannot start watching files: {reason}")]
    Start {
        /// What went wrong.
        reason: String,
    },

    /// A folder holding a watched file (or a symlink on its way) cannot be
    /// watched: it does not exist, or the system's limit on watches is
    /// reached.
    #[error("{path}: cannot watch: {reason}")]
    Watch {
        /// The folder (or, for a relative path that cannot be resolved, the
        /// file as given).
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// Watches a set of files and reports changes of their content on a channel.
///
/// Created with [`FileWatcher::new`], which also returns the receiving end;
/// [`FileWatcher::set_files`] says which files to watch, and can be called
/// again at any time (a config reload changes the set). The operating
/// system's notifications arrive on a thread of the `notify` crate, and the
/// settling runs on a thread of its own, so no async runtime is needed. Both
/// stop when the `FileWatcher` is dropped, which closes the channel.
pub struct FileWatcher {
    /// What the settling thread shares with `set_files`.
    inner: Arc<Mutex<Inner>>,
    /// To the settling thread: the operating system's events, and `Stop`.
    to_thread: std_mpsc::Sender<Msg>,
}

impl fmt::Debug for FileWatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.inner.lock();
        f.debug_struct("FileWatcher")
            .field("files", &inner.files.keys().collect::<Vec<_>>())
            .field("folders", &inner.dirs)
            .finish_non_exhaustive()
    }
}

impl FileWatcher {
    /// Starts a watcher with no files yet; changes are sent on the returned
    /// receiver once a file has had no event for `settle` (at most
    /// [`MAX_SETTLE`]; 200 ms is a good value).
    pub fn new(
        settle: Duration,
    ) -> Result<(FileWatcher, UnboundedReceiver<FileChange>), WatchError> {
        let settle = settle.min(MAX_SETTLE);
        let (to_thread, from_watcher) = std_mpsc::channel();
        let events = to_thread.clone();
        // Called on notify's thread: it must never block, and an unbounded
        // std channel's send does not.
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let _ = events.send(Msg::Event(event));
        })
        .map_err(|e| WatchError::Start {
            reason: e.to_string(),
        })?;
        let inner = Arc::new(Mutex::new(Inner {
            watcher,
            files: HashMap::new(),
            dirs: HashSet::new(),
        }));
        let (changes, receiver) = tokio_mpsc::unbounded_channel();
        let shared = inner.clone();
        std::thread::Builder::new()
            .name("wasmgate-watch".into())
            .spawn(move || settle_loop(&shared, &from_watcher, &changes, settle))
            .map_err(|e| WatchError::Start {
                reason: format!("cannot start a thread: {e}"),
            })?;
        Ok((FileWatcher { inner, to_thread }, receiver))
    }

    /// Makes `files` the watched set, replacing the previous one: folders no
    /// longer needed are unwatched, new ones watched.
    ///
    /// A file new to the set has its content hash taken now, so that only a
    /// later change of its bytes is reported (a file that cannot be read now
    /// is reported when it can). A file already in the set keeps its state:
    /// a change not yet reported is still reported. Relative paths are
    /// resolved against the current directory now; changes name each file as
    /// it is spelled here.
    ///
    /// This reads the files: call it from blocking code (at start-up, or in
    /// `spawn_blocking`). On error the new set is still in place, and every
    /// folder that could be watched is; the error names the first folder
    /// that could not be (others are logged). Such a folder is tried again
    /// at the next `set_files`, and whenever an event for the file arrives
    /// through another folder (a symlink swap).
    pub fn set_files(&self, files: Vec<PathBuf>) -> Result<(), WatchError> {
        let mut errors = Vec::new();
        let cwd = std::env::current_dir();
        let mut inner = self.inner.lock();
        let mut old = std::mem::take(&mut inner.files);
        let mut new_files = Vec::new();
        for path in files {
            if inner.files.contains_key(&path) {
                continue;
            }
            let file = match old.remove(&path) {
                Some(mut kept) => {
                    kept.triggers = triggers_of(&kept.abs);
                    kept
                }
                None => {
                    let abs = if path.is_absolute() {
                        path.clone()
                    } else {
                        match &cwd {
                            Ok(cwd) => cwd.join(&path),
                            Err(e) => {
                                errors.push(WatchError::Watch {
                                    path: path.clone(),
                                    reason: format!("cannot resolve a relative path: {e}"),
                                });
                                continue;
                            }
                        }
                    };
                    new_files.push(path.clone());
                    Watched {
                        triggers: triggers_of(&abs),
                        abs,
                        // Replaced below, once the folders are watched.
                        last: Last::Failed,
                    }
                }
            };
            inner.files.insert(path, file);
        }
        errors.extend(inner.sync_dirs());
        // Hash after watching: a write in between is then either in the hash
        // or seen as an event.
        for path in new_files {
            if let Some(file) = inner.files.get_mut(&path) {
                file.last = match read(&file.abs) {
                    Ok(bytes) => Last::Content(ContentHash::of(&bytes)),
                    Err(_) => Last::Failed,
                };
            }
        }
        drop(inner);
        let mut errors = errors.into_iter();
        match errors.next() {
            None => Ok(()),
            Some(first) => {
                for e in errors {
                    tracing::warn!("hot reload: {e}");
                }
                Err(first)
            }
        }
    }
}

impl Drop for FileWatcher {
    fn drop(&mut self) {
        // The settling thread stops, dropping the notify watcher (its thread
        // stops too) and the sending end of the changes channel.
        let _ = self.to_thread.send(Msg::Stop);
    }
}

/// What the settling thread receives.
enum Msg {
    /// An event (or an error) from notify.
    Event(notify::Result<notify::Event>),
    /// The `FileWatcher` was dropped.
    Stop,
}

/// The watched set, shared by [`FileWatcher::set_files`] and the settling
/// thread.
struct Inner {
    /// The operating system's watcher.
    watcher: notify::RecommendedWatcher,
    /// The watched files, by their path as given.
    files: HashMap<PathBuf, Watched>,
    /// The folders being watched (non-recursively).
    dirs: HashSet<PathBuf>,
}

/// One watched file.
struct Watched {
    /// The file as an absolute path (not resolved).
    abs: PathBuf,
    /// The paths whose events may change the file's content: the file
    /// itself, every symlink met resolving it, and what it resolves to; each
    /// in its canonical folder, as events name them.
    triggers: Vec<PathBuf>,
    /// What was last reported (or found by `set_files`).
    last: Last,
}

/// A watched file's last known state.
#[derive(PartialEq, Eq)]
enum Last {
    /// Readable, with this content.
    Content(ContentHash),
    /// Missing or unreadable.
    Failed,
}

impl Inner {
    /// The watched files that `event` may have changed (as given to
    /// `set_files`); all of them when events were lost.
    fn affected(&mut self, event: &notify::Event) -> Vec<PathBuf> {
        if event.need_rescan() {
            return self.files.keys().cloned().collect();
        }
        if matches!(
            event.kind,
            EventKind::Access(
                AccessKind::Open(_) | AccessKind::Read | AccessKind::Close(AccessMode::Read)
            )
        ) {
            // Someone read a file (the watcher itself, reading what settled).
            return Vec::new();
        }
        if matches!(event.kind, EventKind::Remove(_)) {
            // A watched folder deleted: its watch is gone, watch it again if
            // it comes back.
            for path in &event.paths {
                self.dirs.remove(path);
            }
        }
        self.files
            .iter()
            .filter(|(_, file)| {
                event.paths.iter().any(|path| {
                    file.triggers
                        .iter()
                        .any(|t| t == path || t.parent() == Some(path.as_path()))
                })
            })
            .map(|(path, _)| path.clone())
            .collect()
    }

    /// Reads a settled file and returns the change to report, if its content
    /// (or readability) changed. Follows a symlink swap first: the folders
    /// of the new targets are watched before reading.
    fn check(&mut self, path: &Path) -> Option<FileChange> {
        let file = self.files.get_mut(path)?;
        file.triggers = triggers_of(&file.abs);
        for e in self.sync_dirs() {
            tracing::warn!("hot reload: {e}");
        }
        let file = self.files.get_mut(path)?;
        let content = match read(&file.abs) {
            Ok(bytes) => {
                let hash = ContentHash::of(&bytes);
                if file.last == Last::Content(hash) {
                    return None;
                }
                file.last = Last::Content(hash);
                Ok((bytes, hash))
            }
            Err(reason) => {
                if file.last == Last::Failed {
                    return None;
                }
                file.last = Last::Failed;
                Err(reason)
            }
        };
        Some(FileChange {
            path: path.to_path_buf(),
            content,
        })
    }

    /// Watches the folders the watched files need and unwatches the others;
    /// returns the folders that could not be watched.
    fn sync_dirs(&mut self) -> Vec<WatchError> {
        let needed: HashSet<PathBuf> = self
            .files
            .values()
            .flat_map(|file| file.triggers.iter().filter_map(|t| t.parent()))
            .map(Path::to_path_buf)
            .collect();
        let stale: Vec<PathBuf> = self.dirs.difference(&needed).cloned().collect();
        for dir in stale {
            self.dirs.remove(&dir);
            if let Err(e) = self.watcher.unwatch(&dir) {
                // Already gone with its folder.
                tracing::debug!("{}: unwatch: {e}", dir.display());
            }
        }
        let mut errors = Vec::new();
        for dir in needed {
            if self.dirs.contains(&dir) {
                continue;
            }
            match self.watcher.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    tracing::debug!("{}: watching", dir.display());
                    self.dirs.insert(dir);
                }
                Err(e) => errors.push(WatchError::Watch {
                    path: dir,
                    reason: e.to_string(),
                }),
            }
        }
        errors
    }
}

/// The settling thread: collects events into a deadline per file, and
/// checks each file when its deadline passes. Ends when the `FileWatcher` is
/// dropped or nobody receives the changes any more.
fn settle_loop(
    inner: &Mutex<Inner>,
    events: &std_mpsc::Receiver<Msg>,
    changes: &UnboundedSender<FileChange>,
    settle: Duration,
) {
    let mut due: HashMap<PathBuf, Instant> = HashMap::new();
    loop {
        let msg = match due.values().min() {
            None => events.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(&at) => events.recv_timeout(at.saturating_duration_since(Instant::now())),
        };
        match msg {
            Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) => {}
            Ok(Msg::Event(Ok(event))) => {
                let at = Instant::now() + settle;
                for path in inner.lock().affected(&event) {
                    due.insert(path, at);
                }
            }
            Ok(Msg::Event(Err(e))) => {
                tracing::warn!("watching plugin and config files: {e}");
            }
        }
        let now = Instant::now();
        let ready: Vec<PathBuf> = due
            .iter()
            .filter(|(_, &at)| at <= now)
            .map(|(path, _)| path.clone())
            .collect();
        for path in ready {
            due.remove(&path);
            let change = inner.lock().check(&path);
            if let Some(change) = change {
                if changes.send(change).is_err() {
                    return;
                }
            }
        }
    }
}

/// Largest file read, in bytes: the biggest real plugins (a Python guest
/// with its interpreter) are tens of MiB.
pub const MAX_FILE_SIZE: u64 = 512 << 20;

/// Reads a regular file of at most [`MAX_FILE_SIZE`] bytes; a device, a FIFO
/// or a folder is refused without reading (reading `/dev/zero` would never
/// end, a FIFO would block).
pub fn read_regular_file(path: &Path) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
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

/// A file's bytes, or why they cannot be read.
fn read(abs: &Path) -> Result<Vec<u8>, String> {
    read_regular_file(abs).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            if std::fs::symlink_metadata(abs).is_ok() {
                "file is a symlink to a missing file".to_string()
            } else {
                "file was deleted".to_string()
            }
        } else {
            e.to_string()
        }
    })
}

/// One step of a path being resolved.
enum Part {
    /// A root or a prefix (`/`, `C:`).
    Root(OsString),
    /// `..`.
    Parent,
    /// A name.
    Name(OsString),
}

/// The steps of `path`, last first (so that `pop` gives the next one).
fn parts_reversed(path: &Path) -> Vec<Part> {
    let mut parts: Vec<Part> = path
        .components()
        .filter_map(|c| match c {
            Component::Prefix(_) | Component::RootDir => Some(Part::Root(c.as_os_str().to_owned())),
            Component::CurDir => None,
            Component::ParentDir => Some(Part::Parent),
            Component::Normal(name) => Some(Part::Name(name.to_owned())),
        })
        .collect();
    parts.reverse();
    parts
}

/// The paths whose events may change what reading `abs` gives, each in its
/// canonical folder (as events name them): `abs` itself, every symlink met
/// resolving it (except those directly under the root), and the file it
/// resolves to. Resolves one component at a time, as the kernel does; past
/// a missing component the rest is taken as it is.
fn triggers_of(abs: &Path) -> Vec<PathBuf> {
    let mut triggers = Vec::new();
    let mut todo = parts_reversed(abs);
    let mut cur = PathBuf::new();
    let mut hops = 0;
    while let Some(part) = todo.pop() {
        match part {
            Part::Root(root) => cur.push(root),
            Part::Parent => {
                cur.pop();
            }
            Part::Name(name) => {
                let next = cur.join(&name);
                let last = todo.is_empty();
                let is_link =
                    std::fs::symlink_metadata(&next).is_ok_and(|m| m.file_type().is_symlink());
                let target = if is_link && hops < MAX_SYMLINK_HOPS {
                    std::fs::read_link(&next).ok()
                } else {
                    None
                };
                match target {
                    Some(target) => {
                        hops += 1;
                        if last || cur.parent().is_some() {
                            triggers.push(next);
                        }
                        if target.is_absolute() {
                            cur = PathBuf::new();
                        }
                        todo.extend(parts_reversed(&target));
                    }
                    None => {
                        if last {
                            triggers.push(next.clone());
                        }
                        cur = next;
                    }
                }
            }
        }
    }
    triggers.dedup();
    triggers
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    /// Short, so the tests are quick; what must arrive gets [`ARRIVES`].
    const SETTLE: Duration = Duration::from_millis(100);
    const ARRIVES: Duration = Duration::from_secs(5);

    /// A scratch folder under the system's temp folder, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let nanos = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos();
            let dir = std::env::temp_dir().join(format!(
                "wasmgate-watch-{name}-{}-{nanos}",
                std::process::id()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }

        fn path(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A watcher on `files`, after writing `v1` to the ones that do not
    /// exist yet.
    fn watcher(files: &[&Path]) -> (FileWatcher, UnboundedReceiver<FileChange>) {
        for file in files {
            if std::fs::symlink_metadata(file).is_err() {
                std::fs::write(file, b"v1").unwrap();
            }
        }
        let (watcher, rx) = FileWatcher::new(SETTLE).unwrap();
        watcher
            .set_files(files.iter().map(|f| f.to_path_buf()).collect())
            .unwrap();
        (watcher, rx)
    }

    async fn next_change(rx: &mut UnboundedReceiver<FileChange>) -> FileChange {
        tokio::time::timeout(ARRIVES, rx.recv())
            .await
            .expect("no change reported within 5 s")
            .expect("the changes channel closed")
    }

    /// Asserts that nothing arrives within 3 settle times.
    async fn assert_quiet(rx: &mut UnboundedReceiver<FileChange>) {
        if let Ok(change) = tokio::time::timeout(SETTLE * 3, rx.recv()).await {
            panic!("expected no change, got {change:?}");
        }
    }

    fn assert_content(change: &FileChange, path: &Path, bytes: &[u8]) {
        assert_eq!(change.path, path);
        match &change.content {
            Ok((got, hash)) => {
                assert_eq!(got, bytes, "content of {change:?}");
                assert_eq!(*hash, ContentHash::of(bytes));
            }
            Err(reason) => panic!("expected content, got the error {reason:?}"),
        }
    }

    #[test]
    fn content_hash_prints_a_short_and_a_full_form() {
        let hash = ContentHash::of(b"abc");
        assert_eq!(hash.to_string(), "sha256:ba7816bf8f01");
        assert_eq!(
            hash.to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(ContentHash::from(*hash.as_bytes()), hash);
    }

    #[test]
    fn the_watcher_can_be_shared_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<FileWatcher>();
    }

    #[tokio::test]
    async fn in_place_write_is_reported_with_the_new_hash() {
        let dir = Scratch::new("in-place");
        let file = dir.path("plugin.wasm");
        let (_watcher, mut rx) = watcher(&[&file]);
        std::fs::write(&file, b"v2").unwrap();
        assert_content(&next_change(&mut rx).await, &file, b"v2");
        assert_quiet(&mut rx).await;
    }

    #[tokio::test]
    async fn rename_over_is_reported() {
        let dir = Scratch::new("rename");
        let file = dir.path("plugin.wasm");
        let (_watcher, mut rx) = watcher(&[&file]);
        let tmp = dir.path(".plugin.wasm.tmp");
        std::fs::write(&tmp, b"v2").unwrap();
        std::fs::rename(&tmp, &file).unwrap();
        assert_content(&next_change(&mut rx).await, &file, b"v2");
        assert_quiet(&mut rx).await;
    }

    /// Points `link` at `target` as `ln -sfn` does atomically: a new symlink
    /// renamed over the old one.
    #[cfg(unix)]
    fn swap_symlink(link: &Path, target: &Path) {
        let tmp = link.with_extension("tmp-link");
        std::os::unix::fs::symlink(target, &tmp).unwrap();
        std::fs::rename(&tmp, link).unwrap();
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn symlink_swap_is_reported() {
        let dir = Scratch::new("symlink");
        std::fs::create_dir(dir.path("releases")).unwrap();
        std::fs::write(dir.path("releases/v1.wasm"), b"v1").unwrap();
        std::fs::write(dir.path("releases/v2.wasm"), b"v2").unwrap();
        let link = dir.path("plugin.wasm");
        std::os::unix::fs::symlink("releases/v1.wasm", &link).unwrap();
        let (_watcher, mut rx) = watcher(&[&link]);

        swap_symlink(&link, Path::new("releases/v2.wasm"));
        assert_content(&next_change(&mut rx).await, &link, b"v2");
        // The new target's folder is watched: writing the target is seen.
        std::fs::write(dir.path("releases/v2.wasm"), b"v2 patched").unwrap();
        assert_content(&next_change(&mut rx).await, &link, b"v2 patched");
        // The old target is not what the link reads any more.
        std::fs::write(dir.path("releases/v1.wasm"), b"v1 patched").unwrap();
        assert_quiet(&mut rx).await;
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn symlinked_folder_swap_is_reported() {
        let dir = Scratch::new("symlinked-folder");
        for (release, bytes) in [("v1", b"v1"), ("v2", b"v2")] {
            std::fs::create_dir_all(dir.path("releases").join(release)).unwrap();
            std::fs::write(
                dir.path("releases").join(release).join("plugin.wasm"),
                bytes,
            )
            .unwrap();
        }
        std::os::unix::fs::symlink("releases/v1", dir.path("current")).unwrap();
        let file = dir.path("current/plugin.wasm");
        let (_watcher, mut rx) = watcher(&[&file]);

        swap_symlink(&dir.path("current"), Path::new("releases/v2"));
        assert_content(&next_change(&mut rx).await, &file, b"v2");
    }

    #[tokio::test]
    async fn touch_or_same_bytes_is_not_reported() {
        let dir = Scratch::new("touch");
        let file = dir.path("plugin.wasm");
        let (_watcher, mut rx) = watcher(&[&file]);
        std::fs::write(&file, b"v1").unwrap();
        let later = SystemTime::now() + Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(later)
            .unwrap();
        let tmp = dir.path(".plugin.wasm.tmp");
        std::fs::write(&tmp, b"v1").unwrap();
        std::fs::rename(&tmp, &file).unwrap();
        assert_quiet(&mut rx).await;
        // Still watching: a real change is reported.
        std::fs::write(&file, b"v2").unwrap();
        assert_content(&next_change(&mut rx).await, &file, b"v2");
    }

    #[tokio::test]
    async fn deletion_is_reported_as_an_error_and_recreation_after_it_is_reported() {
        let dir = Scratch::new("delete");
        let file = dir.path("plugin.wasm");
        let (_watcher, mut rx) = watcher(&[&file]);
        std::fs::remove_file(&file).unwrap();
        let change = next_change(&mut rx).await;
        assert_eq!(change.path, file);
        assert_eq!(change.content, Err("file was deleted".to_string()));
        assert_quiet(&mut rx).await;
        // The same bytes as before the deletion: reported all the same.
        std::fs::write(&file, b"v1").unwrap();
        assert_content(&next_change(&mut rx).await, &file, b"v1");
    }

    #[tokio::test]
    async fn a_burst_of_50_writes_gives_at_most_3_changes_ending_with_the_final_content() {
        let dir = Scratch::new("burst");
        let file = dir.path("plugin.wasm");
        let (_watcher, mut rx) = watcher(&[&file]);
        for i in 1..=50 {
            std::fs::write(&file, format!("write {i}")).unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let mut changes = vec![next_change(&mut rx).await];
        while let Ok(Some(change)) = tokio::time::timeout(SETTLE * 3, rx.recv()).await {
            changes.push(change);
        }
        assert!(changes.len() <= 3, "{} changes: {changes:?}", changes.len());
        assert_content(changes.last().unwrap(), &file, b"write 50");
    }

    #[tokio::test]
    async fn a_file_in_the_same_folder_that_is_not_watched_is_ignored() {
        let dir = Scratch::new("other-file");
        let file = dir.path("plugin.wasm");
        let (_watcher, mut rx) = watcher(&[&file]);
        std::fs::write(dir.path("other.wasm"), b"other").unwrap();
        std::fs::write(dir.path(".other.tmp"), b"other").unwrap();
        std::fs::rename(dir.path(".other.tmp"), dir.path("other.wasm")).unwrap();
        std::fs::remove_file(dir.path("other.wasm")).unwrap();
        // Reading the watched file is not a change either.
        let _ = std::fs::read(&file).unwrap();
        assert_quiet(&mut rx).await;
        std::fs::write(&file, b"v2").unwrap();
        assert_content(&next_change(&mut rx).await, &file, b"v2");
    }

    #[tokio::test]
    async fn set_files_names_a_folder_that_cannot_be_watched() {
        let dir = Scratch::new("missing-folder");
        let file = dir.path("missing/plugin.wasm");
        let (watcher, mut rx) = FileWatcher::new(SETTLE).unwrap();
        match watcher.set_files(vec![file.clone()]) {
            Err(WatchError::Watch { path, .. }) => assert!(path.ends_with("missing"), "{path:?}"),
            other => panic!("expected a watch error, got {other:?}"),
        }
        // Once the folder exists, the next set_files watches it.
        std::fs::create_dir(dir.path("missing")).unwrap();
        watcher.set_files(vec![file.clone()]).unwrap();
        std::fs::write(&file, b"v1").unwrap();
        assert_content(&next_change(&mut rx).await, &file, b"v1");
    }

    #[tokio::test]
    async fn set_files_to_a_new_set_stops_reporting_the_old_file() {
        let old_dir = Scratch::new("set-files-old");
        let new_dir = Scratch::new("set-files-new");
        let old = old_dir.path("old.wasm");
        let new = new_dir.path("new.wasm");
        std::fs::write(&new, b"v1").unwrap();
        let (watcher, mut rx) = watcher(&[&old]);

        watcher.set_files(vec![new.clone()]).unwrap();
        let old_folder = old_dir.0.canonicalize().unwrap();
        assert!(
            !watcher.inner.lock().dirs.contains(&old_folder),
            "{watcher:?}"
        );
        std::fs::write(&old, b"v2").unwrap();
        assert_quiet(&mut rx).await;
        std::fs::write(&new, b"v2").unwrap();
        assert_content(&next_change(&mut rx).await, &new, b"v2");
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn relative_paths_are_watched_and_reported_as_given() {
        let dir = Scratch::new("relative");
        let file = dir.path("plugin.wasm");
        std::fs::write(&file, b"v1").unwrap();
        // `../..` up to the root from the current directory, then down.
        let cwd = std::env::current_dir().unwrap();
        let mut relative = PathBuf::new();
        for _ in cwd.components().skip(1) {
            relative.push("..");
        }
        relative.push(file.strip_prefix("/").unwrap_or(&file));
        let (_watcher, mut rx) = watcher(&[&relative]);
        std::fs::write(&file, b"v2").unwrap();
        assert_content(&next_change(&mut rx).await, &relative, b"v2");
    }

    #[tokio::test]
    async fn dropping_the_watcher_closes_the_channel() {
        let dir = Scratch::new("drop");
        let file = dir.path("plugin.wasm");
        let (watcher, mut rx) = watcher(&[&file]);
        drop(watcher);
        let closed = tokio::time::timeout(ARRIVES, rx.recv()).await;
        assert!(matches!(closed, Ok(None)), "{closed:?}");
    }
}
