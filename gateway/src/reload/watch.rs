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
//! A file's folder itself can be replaced too: moved away and a new folder
//! made under its name (`mv plugins plugins.old && mkdir plugins`), or
//! deleted and created again. A watch follows the folder it was put on, not
//! its name, so the watcher checks about once a second (and at once on an
//! event naming a watched folder) that each watched folder's path still
//! names the folder it watches (the same device and inode on Unix); when it
//! does not, the watch moves to the new folder and the files in it are
//! checked, reported if their content differs from the last reported one.
//! A file written in the new folder before its watch is moved is therefore
//! seen up to a second late, but seen.
//!
//! Not seen: symlinks directly under the root (`/tmp` on macOS, `/bin` on
//! merged-`/usr` systems) are followed but not watched, so that `/` is never
//! watched. Outside Unix a folder's identity is its creation time, so a
//! folder replaced between two checks by one created at the same instant is
//! not told apart (one deleted, and seen missing, is).

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fmt;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::mpsc::{self as std_mpsc, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode, ModifyKind};
use notify::{EventKind, RecursiveMode, Watcher};
use parking_lot::Mutex;
use tokio::sync::mpsc::{self as tokio_mpsc, UnboundedReceiver, UnboundedSender};

pub use crate::file::{read_regular_file, ContentHash};

/// The longest settle time [`FileWatcher::new`] accepts; longer ones are
/// clamped to it.
pub const MAX_SETTLE: Duration = Duration::from_secs(3600);

/// How many symlinks resolving one path may go through (as Linux's
/// `MAXSYMLINKS`); past that the path is taken as it is.
const MAX_SYMLINK_HOPS: usize = 40;

/// How often the settling thread checks that each watched folder's path
/// still names the folder being watched (one `stat` per folder).
const FOLDER_CHECK_INTERVAL: Duration = Duration::from_secs(1);

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
            dirs: HashMap::new(),
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
    /// at the next `set_files`, whenever an event for the file arrives
    /// through another folder (a symlink swap), and when a folder appears
    /// or is replaced at its path (checked about once a second).
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
    /// The folders the watched files need, each watched non-recursively if
    /// it could be.
    dirs: HashMap<PathBuf, Dir>,
}

/// A folder that the watched files need.
#[derive(Debug)]
struct Dir {
    /// Whether it is watched.
    watched: bool,
    /// What its path named just before it was last watched (or tried), so
    /// that a folder moved away or deleted and replaced by another one is
    /// noticed; `None` if it was missing, or if the folder was seen deleted.
    id: Option<DirId>,
}

/// Which folder a path names: its device and inode on Unix, its creation
/// time elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DirId(u64, u64);

impl DirId {
    /// The folder `path` names now (following symlinks), or `None` if it
    /// names none.
    fn of(path: &Path) -> Option<DirId> {
        let meta = std::fs::metadata(path).ok()?;
        if !meta.is_dir() {
            return None;
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            Some(DirId(meta.dev(), meta.ino()))
        }
        #[cfg(not(unix))]
        {
            let created = meta
                .created()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .unwrap_or_default();
            Some(DirId(created.as_secs(), u64::from(created.subsec_nanos())))
        }
    }
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
        if matches!(
            event.kind,
            EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_))
        ) {
            // A watched folder (or one above it) deleted or moved: notify
            // drops the watches of a deleted or moved-away folder and of the
            // folders under it. Forget what they were, so that the next check
            // of the folders watches what is there now, even a folder that
            // got the inode number of a deleted one, or that was watched
            // again just before notify dropped the watch.
            for path in &event.paths {
                for (_, dir) in self.dirs.iter_mut().filter(|(d, _)| d.starts_with(path)) {
                    dir.id = None;
                }
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
        let stale: Vec<PathBuf> = self
            .dirs
            .keys()
            .filter(|dir| !needed.contains(*dir))
            .cloned()
            .collect();
        for path in stale {
            if self.dirs.remove(&path).is_some_and(|dir| dir.watched) {
                unwatch(&mut self.watcher, &path);
            }
        }
        let mut errors = Vec::new();
        for path in needed {
            if self.dirs.get(&path).is_some_and(|dir| dir.watched) {
                continue;
            }
            // What the path names before watching it: if it is replaced in
            // between, the next check of the folders sees the difference.
            let id = DirId::of(&path);
            let watched = match self.watcher.watch(&path, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    tracing::debug!("{}: watching", path.display());
                    true
                }
                Err(e) => {
                    errors.push(WatchError::Watch {
                        path: path.clone(),
                        reason: e.to_string(),
                    });
                    false
                }
            };
            self.dirs.insert(path, Dir { watched, id });
        }
        errors
    }

    /// Checks that each needed folder's path still names the folder it
    /// named when it was last watched (or tried); moves the watch of each
    /// one that does not to the folder now there (unwatching it if none is),
    /// and returns the watched files whose folders changed, to be checked.
    fn recheck_dirs(&mut self) -> Vec<PathBuf> {
        let mut changed = HashSet::new();
        for (path, dir) in &mut self.dirs {
            let id = DirId::of(path);
            if id.is_some() && id == dir.id {
                continue;
            }
            if id.is_none() && dir.id.is_none() && !dir.watched {
                // Still missing.
                continue;
            }
            if dir.watched {
                // A watch follows its folder, wherever it was moved.
                unwatch(&mut self.watcher, path);
                dir.watched = false;
            }
            dir.id = id;
            if id.is_some() {
                match self.watcher.watch(path, RecursiveMode::NonRecursive) {
                    Ok(()) => {
                        tracing::info!(
                            "hot reload: {}: the folder was replaced, watching the new one",
                            path.display()
                        );
                        dir.watched = true;
                    }
                    Err(e) => {
                        tracing::warn!("hot reload: {}: cannot watch: {e}", path.display());
                    }
                }
            } else {
                tracing::debug!("{}: the folder is gone", path.display());
            }
            changed.insert(path.clone());
        }
        if changed.is_empty() {
            return Vec::new();
        }
        self.files
            .iter()
            .filter(|(_, file)| {
                file.triggers
                    .iter()
                    .any(|t| t.parent().is_some_and(|dir| changed.contains(dir)))
            })
            .map(|(path, _)| path.clone())
            .collect()
    }
}

/// Stops watching `path`, which may be unwatched already (with its folder
/// deleted).
fn unwatch(watcher: &mut notify::RecommendedWatcher, path: &Path) {
    if let Err(e) = watcher.unwatch(path) {
        tracing::debug!("{}: unwatch: {e}", path.display());
    }
}

/// The settling thread: collects events into a deadline per file, and
/// checks each file when its deadline passes; every
/// [`FOLDER_CHECK_INTERVAL`], and on an event naming a watched folder, checks
/// that the watched folders were not replaced. Ends when the `FileWatcher` is
/// dropped or nobody receives the changes any more.
fn settle_loop(
    inner: &Mutex<Inner>,
    events: &std_mpsc::Receiver<Msg>,
    changes: &UnboundedSender<FileChange>,
    settle: Duration,
) {
    let mut due: HashMap<PathBuf, Instant> = HashMap::new();
    let mut next_folder_check = Instant::now() + FOLDER_CHECK_INTERVAL;
    loop {
        let wake = due
            .values()
            .min()
            .map_or(next_folder_check, |&at| at.min(next_folder_check));
        let msg = events.recv_timeout(wake.saturating_duration_since(Instant::now()));
        let mut check_folders = false;
        match msg {
            Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) => {}
            Ok(Msg::Event(Ok(event))) => {
                let at = Instant::now() + settle;
                let mut inner = inner.lock();
                for path in inner.affected(&event) {
                    due.insert(path, at);
                }
                // A watched folder (or one above it) moved, deleted or
                // created, or events lost: check now rather than at the next
                // tick.
                check_folders = event.need_rescan()
                    || event
                        .paths
                        .iter()
                        .any(|p| inner.dirs.keys().any(|d| d.starts_with(p)));
            }
            Ok(Msg::Event(Err(e))) => {
                tracing::warn!("watching plugin and config files: {e}");
            }
        }
        let now = Instant::now();
        if now >= next_folder_check {
            if changes.is_closed() {
                return;
            }
            check_folders = true;
        }
        if check_folders {
            let at = now + settle;
            for path in inner.lock().recheck_dirs() {
                due.insert(path, at);
            }
            next_folder_check = now + FOLDER_CHECK_INTERVAL;
        }
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
    use crate::scratch::Scratch;
    use std::time::SystemTime;

    /// Short, so the tests are quick; what must arrive gets [`ARRIVES`].
    const SETTLE: Duration = Duration::from_millis(100);
    const ARRIVES: Duration = Duration::from_secs(5);

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
            !watcher.inner.lock().dirs.contains_key(&old_folder),
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

    /// The next change, skipping a `"file was deleted"` (seen if the file
    /// was checked while its folder was away).
    async fn next_content(rx: &mut UnboundedReceiver<FileChange>) -> FileChange {
        let change = next_change(rx).await;
        if change.content == Err("file was deleted".to_string()) {
            return next_change(rx).await;
        }
        change
    }

    #[tokio::test]
    async fn a_folder_replaced_by_a_new_one_is_watched_again() {
        let dir = Scratch::new("folder-replaced");
        let plugins = dir.path("plugins");
        std::fs::create_dir(&plugins).unwrap();
        let file = plugins.join("x.wasm");
        let (_watcher, mut rx) = watcher(&[&file]);

        std::fs::rename(&plugins, dir.path("plugins.old")).unwrap();
        std::fs::create_dir(&plugins).unwrap();
        std::fs::write(&file, b"v2").unwrap();
        assert_content(&next_content(&mut rx).await, &file, b"v2");
        std::fs::write(&file, b"v3").unwrap();
        assert_content(&next_change(&mut rx).await, &file, b"v3");
        // Past the next check of the folders: only the watch on the new
        // folder can see this one.
        tokio::time::sleep(FOLDER_CHECK_INTERVAL + SETTLE).await;
        std::fs::write(&file, b"v4").unwrap();
        assert_content(&next_change(&mut rx).await, &file, b"v4");
        // The old folder is not what the path names any more.
        std::fs::write(dir.path("plugins.old/x.wasm"), b"old").unwrap();
        assert_quiet(&mut rx).await;
    }

    #[tokio::test]
    async fn a_folder_deleted_and_created_again_is_watched_again() {
        let dir = Scratch::new("folder-recreated");
        let plugins = dir.path("plugins");
        std::fs::create_dir(&plugins).unwrap();
        let file = plugins.join("x.wasm");
        let (_watcher, mut rx) = watcher(&[&file]);

        std::fs::remove_dir_all(&plugins).unwrap();
        let change = next_change(&mut rx).await;
        assert_eq!(change.content, Err("file was deleted".to_string()));
        std::fs::create_dir(&plugins).unwrap();
        std::fs::write(&file, b"v2").unwrap();
        assert_content(&next_change(&mut rx).await, &file, b"v2");
        tokio::time::sleep(FOLDER_CHECK_INTERVAL + SETTLE).await;
        std::fs::write(&file, b"v3").unwrap();
        assert_content(&next_change(&mut rx).await, &file, b"v3");
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn a_fifo_at_a_watched_path_is_reported_as_not_a_regular_file_without_blocking() {
        let dir = Scratch::new("fifo");
        let file = dir.path("plugin.wasm");
        let (_watcher, mut rx) = watcher(&[&file]);
        let fifo = dir.path(".plugin.wasm.fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success(), "mkfifo: {made}");
        // On a thread of its own, so that a regression fails the test
        // rather than hanging it.
        let (tx, read) = std_mpsc::channel();
        let path = fifo.clone();
        std::thread::spawn(move || tx.send(read_regular_file(&path).map_err(|e| e.to_string())));
        let read = read.recv_timeout(ARRIVES).expect("blocked reading a FIFO");
        assert_eq!(read, Err("not a regular file".to_string()));

        std::fs::rename(&fifo, &file).unwrap();
        let change = next_change(&mut rx).await;
        assert_eq!(change.path, file);
        assert_eq!(change.content, Err("not a regular file".to_string()));
        // The watcher's thread is not stuck opening the FIFO.
        let tmp = dir.path(".plugin.wasm.tmp");
        std::fs::write(&tmp, b"v2").unwrap();
        std::fs::rename(&tmp, &file).unwrap();
        assert_content(&next_change(&mut rx).await, &file, b"v2");
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
