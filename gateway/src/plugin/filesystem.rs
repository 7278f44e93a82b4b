//! The parts of WASI's filesystem (wasi:filesystem/types) the gateway
//! defines itself, over wasmtime-wasi's: directory listings, whose memory
//! is bounded, and opening a file, which refuses special files and holds
//! at most [`MAX_OPEN_FILES`] of the gateway's file descriptors per
//! instance (and a route's or tenant's `max_open_files`). Only routes that
//! grant `dirs` have a filesystem.
//!
//! **Listings.** `descriptor.read-directory` returns a
//! `directory-entry-stream`, read entry by entry with
//! `read-directory-entry`. wasmtime-wasi builds the stream by reading the
//! whole directory into a list in the gateway's memory, with a `stat` per
//! entry, and keeps the list until the guest drops the stream: memory
//! outside the guest's `max_memory`, once per listing held, however large
//! the directory. Here a listing ([`Listing`]) is read one `getdents`
//! buffer at a time ([`rustix::fs::Dir`], on a readable handle of its own),
//! each entry's type from the directory entry itself (a `stat` only where
//! the file system does not say). Each entry is charged to the instance as
//! it is read ([`listing_cost`]); the listings an instance holds at once
//! may not pass [`MAX_LISTING_BYTES`]. The listing that would pass it is
//! refused with `insufficient-memory` (the guest sees `ENOMEM` through
//! wasi-libc) as soon as it would, so the memory of one call does not grow
//! with the directory's entries. Dropping a stream gives its charge back.
//! Entries appear as wasmtime-wasi gives them (except that FIFOs and
//! sockets have their own types, where wasmtime-wasi says `unknown`):
//! every name but `.` and `..`, in the order the file system returns
//! them; a name that is not UTF-8, or an error while reading, is an
//! `illegal-byte-sequence` or I/O error at its place in the stream (the
//! stream ends after an I/O error).
//!
//! **Opening.** wasmtime-wasi's `descriptor.open-at` runs `open(2)` on
//! its blocking pool and waits for it without a time limit, and host code
//! is not interrupted: opening a FIFO that no one writes to would hold the
//! call, its connection and a thread until someone does, and keep the
//! gateway from shutting down. So the gateway opens files itself
//! ([`open`]): the same checks, modes and sandboxed resolution
//! (cap-primitives, as wasmtime-wasi), but with `O_NONBLOCK`, which a
//! FIFO's open never waits under, and a check of what was opened: a FIFO,
//! socket or device is closed again and refused with `not-permitted`.
//! Before that, the path is looked up as the open will resolve it, opened
//! at most as a path handle (`O_PATH`), so that a device is not even
//! opened ([`special_file`]): with the `openat2` call cap-primitives
//! makes, or where that cannot answer, wasmtime-wasi's own `stat-at`.
//! `set-times-at` following a last symbolic link opens the file too (in
//! wasmtime-wasi), so the gateway does that itself the same way
//! ([`set_times_following`]).
//!
//! **Open files.** Each file or directory opened is one of the gateway's
//! file descriptors; an instance may hold [`MAX_OPEN_FILES`] at once. The
//! files an instance opened are followed through weak references to the
//! file its descriptor and streams share, so one is counted until the last
//! of them is dropped. A route or tenant with `max_open_files` has its
//! instances' files counted together the same way ([`OpenFiles`]).

use std::os::fd::{AsFd, AsRawFd};
use std::sync::{Arc, Weak};

use cap_fs_ext::{FollowSymlinks, OpenOptionsFollowExt};
use cap_primitives::fs::OpenOptionsExt;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use wasmtime::component::{Linker, Resource, ResourceType};
use wasmtime::StoreContextMut;
use wasmtime_wasi::filesystem::{Descriptor, Dir, File, WasiFilesystemCtxView, WasiFilesystemView};
use wasmtime_wasi::p2::bindings::sync::filesystem::types::{
    self as fs, DescriptorFlags, DescriptorType, DirectoryEntry, ErrorCode, NewTimestamp,
    OpenFlags, PathFlags,
};
use wasmtime_wasi::p2::FsResult;
use wasmtime_wasi::{FsPerms, OpenMode};

use crate::plugin::host::HostState;

/// The most gateway memory the directory listings one instance holds open
/// at once may take, by [`listing_cost`]: 1 MiB, about 9,000 entries with
/// 20-byte names. A directory with more entries than that cannot be
/// listed. On a shared instance (`isolation = "shared"`) the bound is the
/// route's.
pub const MAX_LISTING_BYTES: usize = 1 << 20;

/// What one entry of a listing is counted for on top of its name, in
/// bytes: its record in the listing (32 bytes), its name's allocation
/// rounded up by the allocator, and the list's spare room while it grows.
/// Measured 2026-12-02 with wasmtime-wasi's own listings (the gateway's
/// RSS, 20 connections each holding 100 listings of 300 entries with
/// 200-byte names): 290 bytes per entry, 90 beyond the name.
pub const ENTRY_COST: usize = 96;

/// What a listing is counted for besides its entries, in bytes: the
/// stream's own record and its handle.
pub const LISTING_COST: usize = 128;

/// The interface whose functions are defined here: the WASI 0.2 version
/// wasmtime-wasi 48 defines, to which guests importing an older 0.2
/// version are linked. Must follow wasmtime-wasi's (an upgrade that moves
/// it would leave wasmtime-wasi's functions in place; the e2e test
/// `a_plugin_holding_directory_listings_past_their_memory_bound_is_refused_more`
/// catches that).
const INTERFACE: &str = "wasi:filesystem/types@0.2.12";

/// One `directory-entry-stream`: the entries left to read, and what the
/// listing is charged.
pub struct Listing {
    entries: std::vec::IntoIter<Result<DirectoryEntry, ErrorCode>>,
    cost: usize,
}

/// The most files and directories (each an open file descriptor of the
/// gateway) one instance may hold open at once through `open-at`: 64. A
/// descriptor is a handle like any other (4,096 per instance), but each
/// also takes one of the process's file descriptors, which the gateway's
/// sockets need too: a plugin opening files until its handles ran out
/// would take 4,096 of them per connection, and a few connections would
/// leave none for accepting others. A file stays open while its
/// descriptor or any stream read from or written to it lives. The open
/// past the bound fails with `insufficient-memory` (WASI has no code for
/// "too many open files"). On a shared instance (`isolation = "shared"`)
/// the bound is the route's.
pub const MAX_OPEN_FILES: usize = 64;

/// What an instance's filesystem holds in the gateway: the bytes charged
/// to its directory listings, and the files it opened (each open while its
/// descriptor or a stream of it lives).
#[derive(Default)]
pub struct Held {
    listings: usize,
    files: Vec<Weak<std::fs::File>>,
}

/// The cost of one entry named `name` (see [`ENTRY_COST`]).
pub fn listing_cost(name: &[u8]) -> usize {
    ENTRY_COST + name.len()
}

/// Defines `read-directory`, `read-directory-entry`, `open-at`,
/// `set-times-at` and the `directory-entry-stream` resource (a type of its
/// own here) in `linker`, over wasmtime-wasi's (which must be there
/// already: the rest of the interface is its).
pub fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut types = linker.instance(INTERFACE)?;
    types.resource(
        "directory-entry-stream",
        ResourceType::host::<Listing>(),
        |mut store, rep| {
            let state = store.data_mut();
            let listing = state.table().delete(Resource::<Listing>::new_own(rep))?;
            state.held.listings -= listing.cost;
            Ok(())
        },
    )?;
    types.func_wrap(
        "[method]descriptor.read-directory",
        |mut store: StoreContextMut<'_, HostState>, (fd,): (Resource<Descriptor>,)| {
            read_directory(store.data_mut(), fd).map(|r| (r,))
        },
    )?;
    types.func_wrap(
        "[method]descriptor.open-at",
        |mut store: StoreContextMut<'_, HostState>,
         (fd, path_flags, path, open_flags, flags): (
            Resource<Descriptor>,
            PathFlags,
            String,
            OpenFlags,
            DescriptorFlags,
        )| { open_at(store.data_mut(), fd, path_flags, &path, open_flags, flags) },
    )?;
    types.func_wrap(
        "[method]descriptor.set-times-at",
        |mut store: StoreContextMut<'_, HostState>,
         (fd, path_flags, path, accessed, modified): (
            Resource<Descriptor>,
            PathFlags,
            String,
            NewTimestamp,
            NewTimestamp,
        )| {
            let state = store.data_mut();
            if path_flags.contains(PathFlags::SYMLINK_FOLLOW) {
                if special_file(state, &fd, path_flags, &path)? {
                    return Ok((Err(refuse_special(state, &path)),));
                }
                if let Descriptor::Dir(d) = state.table().get(&fd)? {
                    let (dir, perms) = (d.dir.clone(), d.perms);
                    return Ok((
                        match set_times_following(&dir, perms, &path, accessed, modified) {
                            Ok(()) => Ok(()),
                            Err(Refused::Special) => Err(refuse_special(state, &path)),
                            Err(Refused::Code(code)) => Err(code),
                        },
                    ));
                }
            }
            let mut view = state.filesystem();
            let set = fs::HostDescriptor::set_times_at(
                &mut view, fd, path_flags, path, accessed, modified,
            );
            answer(&mut view, set)
        },
    )?;
    types.func_wrap(
        "[method]directory-entry-stream.read-directory-entry",
        |mut store: StoreContextMut<'_, HostState>, (stream,): (Resource<Listing>,)| {
            let listing = store.data_mut().table().get_mut(&stream)?;
            Ok((listing.entries.next().transpose(),))
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

fn read_directory(
    state: &mut HostState,
    fd: Resource<Descriptor>,
) -> wasmtime::Result<Result<Resource<Listing>, ErrorCode>> {
    let dir = match state.table().get(&fd)? {
        Descriptor::Dir(d) => d.dir.clone(),
        Descriptor::File(_) => return Ok(Err(ErrorCode::NotDirectory)),
    };
    let room = MAX_LISTING_BYTES.saturating_sub(state.held.listings);
    let listing = match read(&dir, room) {
        Ok(Some(listing)) => listing,
        Ok(None) => {
            tracing::debug!(
                tenant = %state.scope().tenant.name, route = %state.scope().route,
                conn = state.conn_id(), held = state.held.listings,
                "a directory listing was refused: the instance's listings would hold more than {MAX_LISTING_BYTES} bytes"
            );
            return Ok(Err(ErrorCode::InsufficientMemory));
        }
        Err(e) => return Ok(Err(error_code(e))),
    };
    let cost = listing.cost;
    let stream = state.table().push(listing)?;
    state.held.listings += cost;
    Ok(Ok(stream))
}

/// `open-at` of `path` under the descriptor `fd`: refused where `path` is a
/// special file ([`special_file`]) or the instance, its route or its
/// tenant holds its bound of open files; otherwise opened by [`open`] and
/// added to the instance's handles, and counted by the route and the
/// tenant. A file descriptor `fd` is `not-directory`, as in
/// wasmtime-wasi; a bad handle traps.
fn open_at(
    state: &mut HostState,
    fd: Resource<Descriptor>,
    path_flags: PathFlags,
    path: &str,
    open_flags: OpenFlags,
    flags: DescriptorFlags,
) -> wasmtime::Result<(Result<Resource<Descriptor>, ErrorCode>,)> {
    let (dir, perms) = match state.table().get(&fd)? {
        Descriptor::Dir(d) => (d.dir.clone(), d.perms),
        Descriptor::File(_) => return Ok((Err(ErrorCode::NotDirectory),)),
    };
    // wasmtime-wasi's checks of the flags come first, as there.
    if let Err(code) = options(perms, path_flags, open_flags, flags) {
        return Ok((Err(code),));
    }
    // The look-up, so that a device is not even opened.
    if special_file(state, &fd, path_flags, path)? {
        return Ok((Err(refuse_special(state, path)),));
    }
    // A file stays open while its descriptor or any stream of it lives
    // (they share it).
    state.held.files.retain(|file| file.strong_count() > 0);
    if state.held.files.len() >= MAX_OPEN_FILES {
        tracing::debug!(
            tenant = %state.scope().tenant.name, route = %state.scope().route,
            conn = state.conn_id(), path,
            "a plugin's open was refused: it holds {MAX_OPEN_FILES} open files"
        );
        return Ok((Err(ErrorCode::InsufficientMemory),));
    }
    // A place in the route's count and in its tenant's, each against its
    // bound if it has one (counted either way: a bound a reload adds
    // finds the files already open).
    let scope = state.scope().clone();
    let mut places = Vec::with_capacity(2);
    let counts = [
        (&*scope.files.0, scope.files.1, "route"),
        (
            &scope.tenant.counts.files,
            scope.tenant.quotas.max_open_files,
            "tenant",
        ),
    ];
    for (files, max, whose) in counts {
        match files.reserve(max) {
            Some(place) => places.push(place),
            None => {
                if let Some(suppressed) = scope.tenant.counts.instance_errors.admit() {
                    tracing::warn!(
                        tenant = %scope.tenant.name, route = %scope.route,
                        conn = state.conn_id(), path, suppressed,
                        "a plugin's open was refused: the {whose}'s instances are at its max_open_files ({})",
                        max.unwrap_or(usize::MAX)
                    );
                }
                return Ok((Err(ErrorCode::InsufficientMemory),));
            }
        }
    }
    let opened = match open(&dir, perms, path_flags, path, open_flags, flags) {
        Ok(opened) => opened,
        Err(Refused::Special) => return Ok((Err(refuse_special(state, path)),)),
        Err(Refused::Code(code)) => return Ok((Err(code),)),
    };
    let shared = match &opened {
        Descriptor::File(f) => Arc::downgrade(&f.file),
        Descriptor::Dir(d) => Arc::downgrade(&d.dir),
    };
    let handle = state.table().push(opened)?;
    for place in places {
        place.keep(shared.clone());
    }
    state.held.files.push(shared);
    Ok((Ok(handle),))
}

/// Why [`open`] did not open a file.
#[derive(Debug)]
enum Refused {
    /// The path names a FIFO, a socket or a device (`not-permitted`).
    Special,
    /// The error WASI gives the guest.
    Code(ErrorCode),
}

/// Opens `path` under the directory `dir` (granted with `perms`) as
/// wasmtime-wasi's `open-at` does: the same checks of `open_flags`,
/// `flags` and `perms` first, the same open modes, the same sandboxed
/// resolution (cap-primitives: `openat2` with `RESOLVE_BENEATH` where the
/// kernel has it, resolution component by component where not), the same
/// error codes. Except that it never waits on a special file: the file is
/// opened with `O_NONBLOCK` (a FIFO's open returns at once) and
/// `O_NOCTTY`, then checked with `fstat`; anything but a regular file or a
/// directory is closed again and [`Refused::Special`], and so is `ENXIO`
/// (a FIFO opened for writing with no reader, a socket). `O_NONBLOCK` is
/// then cleared, so reads and writes behave as wasmtime-wasi's. This
/// closes the race between [`special_file`]'s look-up and the open. One
/// difference remains: a regular file on which another process holds a
/// lease (`F_SETLEASE`) fails at once (a trial saw `io`) where
/// wasmtime-wasi's open would wait for the lease to be broken. Runs on
/// the calling thread, which on routes with `dirs` is handed off.
fn open(
    dir: &std::fs::File,
    perms: FsPerms,
    path_flags: PathFlags,
    path: &str,
    open_flags: OpenFlags,
    flags: DescriptorFlags,
) -> Result<Descriptor, Refused> {
    let (opts, mode) = options(perms, path_flags, open_flags, flags).map_err(Refused::Code)?;
    let file = match cap_primitives::fs::open(dir, std::path::Path::new(path), &opts) {
        Ok(file) => file,
        Err(e) if Errno::from_io_error(&e) == Some(Errno::NXIO) => return Err(Refused::Special),
        Err(e) => return Err(Refused::Code(error_code(e))),
    };
    let kind = match rustix::fs::fstat(&file) {
        Ok(stat) => FileType::from_raw_mode(stat.st_mode),
        Err(e) => return Err(Refused::Code(error_code(e.into()))),
    };
    if is_special(kind) {
        return Err(Refused::Special);
    }
    if kind != FileType::Directory && open_flags.contains(OpenFlags::DIRECTORY) {
        return Err(Refused::Code(ErrorCode::NotDirectory));
    }
    let blocking = rustix::fs::fcntl_getfl(&file)
        .and_then(|f| rustix::fs::fcntl_setfl(&file, f - OFlags::NONBLOCK));
    if let Err(e) = blocking {
        return Err(Refused::Code(error_code(e.into())));
    }
    Ok(if kind == FileType::Directory {
        // `false`: the gateway's WASI contexts never allow blocking the
        // current thread, so wasmtime-wasi would pass the same.
        Descriptor::Dir(Dir::new(file, perms, mode, false))
    } else {
        Descriptor::File(File::new(file, perms, mode, false))
    })
}

/// What `open-at` with these flags asks of the open, as wasmtime-wasi
/// builds it, plus `O_NONBLOCK | O_NOCTTY`; or the error wasmtime-wasi
/// answers before opening: `unsupported` for the sync flags, `invalid`
/// for `directory` with `create`, `exclusive` or `truncate`,
/// `not-permitted` for a write or create under a read-only grant.
fn options(
    perms: FsPerms,
    path_flags: PathFlags,
    open_flags: OpenFlags,
    flags: DescriptorFlags,
) -> Result<(cap_primitives::fs::OpenOptions, OpenMode), ErrorCode> {
    let mut opts = cap_primitives::fs::OpenOptions::new();
    let mut mode = OpenMode::empty();
    let create = open_flags.contains(OpenFlags::CREATE);
    if create {
        if open_flags.contains(OpenFlags::EXCLUSIVE) {
            opts.create_new(true);
        } else {
            opts.create(true);
        }
        opts.write(true);
        mode |= OpenMode::WRITE;
    }
    if open_flags.contains(OpenFlags::TRUNCATE) {
        opts.truncate(true).write(true);
        mode |= OpenMode::WRITE;
    }
    if flags.contains(DescriptorFlags::READ) {
        opts.read(true);
        mode |= OpenMode::READ;
    }
    if flags.contains(DescriptorFlags::WRITE) {
        opts.write(true);
        mode |= OpenMode::WRITE;
    } else {
        // As wasmtime-wasi: opened for reading at least, and its
        // permissions enforced on later use.
        opts.read(true);
        mode |= OpenMode::READ;
    }
    opts.follow(if path_flags.contains(PathFlags::SYMLINK_FOLLOW) {
        FollowSymlinks::Yes
    } else {
        FollowSymlinks::No
    });
    opts.custom_flags((OFlags::NONBLOCK | OFlags::NOCTTY).bits() as i32);
    if flags.intersects(
        DescriptorFlags::FILE_INTEGRITY_SYNC
            | DescriptorFlags::DATA_INTEGRITY_SYNC
            | DescriptorFlags::REQUESTED_WRITE_SYNC,
    ) {
        return Err(ErrorCode::Unsupported);
    }
    if open_flags.contains(OpenFlags::DIRECTORY)
        && open_flags.intersects(OpenFlags::CREATE | OpenFlags::EXCLUSIVE | OpenFlags::TRUNCATE)
    {
        return Err(ErrorCode::Invalid);
    }
    if perms.write_not_permitted() && (create || mode.contains(OpenMode::WRITE)) {
        return Err(ErrorCode::NotPermitted);
    }
    Ok((opts, mode))
}

/// `set-times-at` of `path` under `dir`, following a last symbolic link,
/// as wasmtime-wasi (cap-primitives) does it: the file opened for writing,
/// or where that is refused (`EACCES`, `EISDIR`) for reading, and its
/// times set through the handle (`futimens`); where neither is allowed,
/// opened as a path handle (`O_PATH`) and its times set through
/// `/proc/self/fd`. Each open is non-blocking and checked as [`open`]'s
/// is, so a special file renamed into place after [`special_file`]'s
/// look-up is refused rather than waited on.
fn set_times_following(
    dir: &std::fs::File,
    perms: FsPerms,
    path: &str,
    accessed: NewTimestamp,
    modified: NewTimestamp,
) -> Result<(), Refused> {
    // wasmtime-wasi's order: the times first, then the permission.
    let times = rustix::fs::Timestamps {
        last_access: timespec(accessed).map_err(Refused::Code)?,
        last_modification: timespec(modified).map_err(Refused::Code)?,
    };
    if perms.write_not_permitted() {
        return Err(Refused::Code(ErrorCode::NotPermitted));
    }
    let code = |e: std::io::Error| Refused::Code(error_code(e));
    let rustix_code = |e: Errno| Refused::Code(error_code(e.into()));
    for how in [OFlags::WRONLY, OFlags::RDONLY, OFlags::PATH] {
        let mut opts = cap_primitives::fs::OpenOptions::new();
        if how == OFlags::WRONLY {
            opts.write(true);
        } else {
            opts.read(true);
        }
        opts.follow(FollowSymlinks::Yes);
        let path_only = if how == OFlags::PATH {
            OFlags::PATH
        } else {
            OFlags::empty()
        };
        opts.custom_flags((OFlags::NONBLOCK | OFlags::NOCTTY | path_only).bits() as i32);
        let file = match cap_primitives::fs::open(dir, std::path::Path::new(path), &opts) {
            Ok(file) => file,
            Err(e) => match Errno::from_io_error(&e) {
                Some(Errno::ACCESS) if how != OFlags::PATH => continue,
                Some(Errno::ISDIR) if how == OFlags::WRONLY => continue,
                Some(Errno::NXIO) => return Err(Refused::Special),
                _ => return Err(code(e)),
            },
        };
        let stat = rustix::fs::fstat(&file).map_err(rustix_code)?;
        if is_special(FileType::from_raw_mode(stat.st_mode)) {
            return Err(Refused::Special);
        }
        return if how == OFlags::PATH {
            let by_path = format!("/proc/self/fd/{}", file.as_raw_fd());
            rustix::fs::utimensat(rustix::fs::CWD, by_path, &times, AtFlags::empty())
                .map_err(rustix_code)
        } else {
            rustix::fs::futimens(&file, &times).map_err(rustix_code)
        };
    }
    // Not reached: the path-handle open returns either way.
    Err(Refused::Code(ErrorCode::Access))
}

/// A new timestamp as `futimens` takes it: `now` read here, as
/// wasmtime-wasi reads it; a time past what the kernel can hold is
/// `overflow`.
fn timespec(t: NewTimestamp) -> Result<rustix::fs::Timespec, ErrorCode> {
    let at = match t {
        NewTimestamp::NoChange => {
            return Ok(rustix::fs::Timespec {
                tv_sec: 0,
                tv_nsec: rustix::fs::UTIME_OMIT,
            })
        }
        NewTimestamp::Now => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|_| ErrorCode::Overflow)?,
        NewTimestamp::Timestamp(t) => std::time::Duration::new(
            t.seconds
                .checked_add(u64::from(t.nanoseconds / 1_000_000_000))
                .ok_or(ErrorCode::Overflow)?,
            t.nanoseconds % 1_000_000_000,
        ),
    };
    Ok(rustix::fs::Timespec {
        tv_sec: i64::try_from(at.as_secs()).map_err(|_| ErrorCode::Overflow)?,
        tv_nsec: at.subsec_nanos().into(),
    })
}

/// The files a route's or a tenant's instances hold open (routes with
/// `dirs`), against its `max_open_files`: each followed through a weak
/// reference to the file its descriptor and streams share, as an
/// instance's are, so one is counted until the last of them is dropped, in
/// whichever instance. Places taken for opens still under way count too,
/// so two instances opening at once cannot both take the last place. An
/// open refused at the bound first scans the list under the lock (the
/// files open, and up to as many closed since the last pass: after a
/// reload lowered the bound, more than the bound): a plugin retrying
/// refused opens slows only the opens of its own route or tenant.
#[derive(Debug, Default)]
pub struct OpenFiles(parking_lot::Mutex<FilesHeld>);

#[derive(Debug, Default)]
struct FilesHeld {
    files: Vec<Weak<std::fs::File>>,
    opening: usize,
    /// Prune `files` when it reaches this length.
    prune_at: usize,
}

/// A place taken for one more open file: given back when dropped, unless
/// [`Place::keep`] gave it the file opened.
#[must_use]
pub struct Place<'a>(&'a OpenFiles);

impl OpenFiles {
    /// Takes a place for one more open file, or `None` if `max` (`None`:
    /// no bound, but the files are counted all the same, so that a bound
    /// added by a reload finds them) are open or being opened. The files
    /// closed since are let go when the places seem taken, and when the
    /// list has doubled since it was last pruned: a pass over the files
    /// held, at most one per open on average.
    pub fn reserve(&self, max: Option<usize>) -> Option<Place<'_>> {
        let max = max.unwrap_or(usize::MAX);
        let mut held = self.0.lock();
        if held.files.len() + held.opening >= max || held.files.len() >= held.prune_at {
            held.files.retain(|file| file.strong_count() > 0);
            held.prune_at = (2 * held.files.len()).max(MAX_OPEN_FILES);
            if held.files.len() + held.opening >= max {
                return None;
            }
        }
        held.opening += 1;
        Some(Place(self))
    }

    /// How many files are open now.
    #[cfg(test)]
    fn count(&self) -> usize {
        let mut held = self.0.lock();
        held.files.retain(|file| file.strong_count() > 0);
        held.files.len()
    }
}

impl Place<'_> {
    /// Fills the place with `file`, counted until it is closed.
    pub fn keep(self, file: Weak<std::fs::File>) {
        self.0 .0.lock().files.push(file);
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.0 .0.lock().opening -= 1;
    }
}

/// Lists `dir` (a directory handle, possibly path-only), or `None` once
/// the listing would cost more than `room`.
pub fn read(dir: &std::fs::File, room: usize) -> std::io::Result<Option<Listing>> {
    if LISTING_COST > room {
        return Ok(None);
    }
    // The handle may be a path-only one (`O_PATH`): a readable handle of
    // its own, closed when the read ends.
    let readable = rustix::fs::openat(
        dir,
        c".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut cost = LISTING_COST;
    let mut entries = Vec::new();
    for entry in rustix::fs::Dir::new(readable)? {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                // The stream ends with the error, as wasmtime-wasi's does.
                entries.push(Err(error_code(e.into())));
                break;
            }
        };
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        cost += listing_cost(name);
        if cost > room {
            return Ok(None);
        }
        let kind = match entry.file_type() {
            FileType::Unknown => {
                match rustix::fs::statat(dir.as_fd(), entry.file_name(), AtFlags::SYMLINK_NOFOLLOW)
                {
                    Ok(stat) => FileType::from_raw_mode(stat.st_mode),
                    Err(e) => {
                        entries.push(Err(error_code(e.into())));
                        continue;
                    }
                }
            }
            known => known,
        };
        entries.push(match String::from_utf8(name.to_vec()) {
            Ok(name) => Ok(DirectoryEntry {
                type_: descriptor_type(kind),
                name,
            }),
            Err(_) => Err(ErrorCode::IllegalByteSequence),
        });
    }
    entries.shrink_to_fit();
    Ok(Some(Listing {
        entries: entries.into_iter(),
        cost,
    }))
}

/// Whether `path` under the directory `fd` names a FIFO, a socket or a
/// device: files whose `open(2)` may wait without end. The path is
/// resolved as wasmtime-wasi's open resolves it, following a last symbolic
/// link as `path_flags` say, and opened at most as a path handle (`O_PATH`,
/// which never waits): first with the same `openat2` call
/// (`RESOLVE_BENEATH`, no magic links), whose answer stands; where that
/// call cannot answer (`EAGAIN` after a rename elsewhere on the host,
/// `EPERM` from a seccomp filter, `ENOSYS` before Linux 5.6), with
/// wasmtime-wasi's own `stat-at`, which falls back as its open does.
/// `false` when the path does not resolve (the open then fails, or
/// creates a file); a trap (a bad handle) is passed on.
fn special_file(
    state: &mut HostState,
    fd: &Resource<Descriptor>,
    path_flags: PathFlags,
    path: &str,
) -> wasmtime::Result<bool> {
    let follow = path_flags.contains(PathFlags::SYMLINK_FOLLOW);
    if let Descriptor::Dir(d) = state.table().get(fd)? {
        let mut flags = OFlags::PATH | OFlags::CLOEXEC;
        if !follow {
            flags |= OFlags::NOFOLLOW;
        }
        let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS;
        match rustix::fs::openat2(&*d.dir, path, flags, Mode::empty(), resolve) {
            Ok(found) => {
                return Ok(rustix::fs::fstat(&found)
                    .is_ok_and(|stat| is_special(FileType::from_raw_mode(stat.st_mode))))
            }
            Err(Errno::AGAIN | Errno::PERM | Errno::NOSYS) => {}
            Err(_) => return Ok(false),
        }
    }
    let mut view = state.filesystem();
    let at = Resource::new_borrow(fd.rep());
    match fs::HostDescriptor::stat_at(&mut view, at, path_flags, path.to_owned()) {
        // wasmtime-wasi says `unknown` for FIFOs and sockets: on Linux,
        // what is neither a file, a directory, a link nor a device.
        Ok(stat) => Ok(matches!(
            stat.type_,
            DescriptorType::Fifo
                | DescriptorType::Socket
                | DescriptorType::CharacterDevice
                | DescriptorType::BlockDevice
                | DescriptorType::Unknown
        )),
        Err(e) => e
            .downcast()
            .map(|_: wasmtime_wasi::p2::bindings::filesystem::types::ErrorCode| false),
    }
}

/// Whether a file of type `kind` is one whose open may wait.
fn is_special(kind: FileType) -> bool {
    !matches!(
        kind,
        FileType::RegularFile | FileType::Directory | FileType::Symlink
    )
}

/// Logs, and answers, the refusal of a special file at `path`.
fn refuse_special(state: &HostState, path: &str) -> ErrorCode {
    tracing::debug!(
        tenant = %state.scope().tenant.name, route = %state.scope().route,
        conn = state.conn_id(), path,
        "a plugin's open of a FIFO, socket or device was refused"
    );
    ErrorCode::NotPermitted
}

/// WASI's type of a file of type `kind`.
fn descriptor_type(kind: FileType) -> DescriptorType {
    match kind {
        FileType::RegularFile => DescriptorType::RegularFile,
        FileType::Directory => DescriptorType::Directory,
        FileType::Symlink => DescriptorType::SymbolicLink,
        FileType::Fifo => DescriptorType::Fifo,
        FileType::Socket => DescriptorType::Socket,
        FileType::CharacterDevice => DescriptorType::CharacterDevice,
        FileType::BlockDevice => DescriptorType::BlockDevice,
        FileType::Unknown => DescriptorType::Unknown,
    }
}

/// wasmtime-wasi's result `r` as the guest receives it: the value, a WASI
/// error code, or a trap.
fn answer<T>(
    view: &mut WasiFilesystemCtxView<'_>,
    r: FsResult<T>,
) -> wasmtime::Result<(Result<T, ErrorCode>,)> {
    match r {
        Ok(value) => Ok((Ok(value),)),
        Err(e) => fs::Host::convert_error_code(view, e).map(|code| (Err(code),)),
    }
}

/// WASI's error code for `e`, as wasmtime-wasi maps it (`io` for an error
/// it has no code for).
fn error_code(e: std::io::Error) -> ErrorCode {
    match wasmtime_wasi::p2::FsError::from(e).downcast() {
        Ok(code) => code.into(),
        Err(_) => ErrorCode::Io,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scratch::Scratch;
    use std::path::Path;

    /// A path-only handle of `dir`, as wasmtime-wasi opens directories.
    fn path_only(dir: &Path) -> std::fs::File {
        let fd = rustix::fs::open(
            dir,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .expect("open O_PATH");
        std::fs::File::from(fd)
    }

    fn entries(listing: Listing) -> Vec<(String, DescriptorType)> {
        let mut all: Vec<_> = listing
            .entries
            .map(|e| {
                let e = e.expect("entry");
                (e.name, e.type_)
            })
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    #[test]
    fn a_listing_has_every_entry_but_dot_and_dotdot_with_its_type() {
        let dir = Scratch::new("listing-types");
        std::fs::write(dir.0.join("file"), "x").expect("file");
        std::fs::create_dir(dir.0.join("sub")).expect("dir");
        std::os::unix::fs::symlink("file", dir.0.join("link")).expect("symlink");
        let listing = read(&path_only(&dir.0), MAX_LISTING_BYTES)
            .expect("read")
            .expect("within room");
        assert_eq!(
            entries(listing),
            vec![
                ("file".to_owned(), DescriptorType::RegularFile),
                ("link".to_owned(), DescriptorType::SymbolicLink),
                ("sub".to_owned(), DescriptorType::Directory),
            ]
        );
    }

    #[test]
    fn a_listing_needs_exactly_its_entries_cost_and_one_byte_less_is_refused() {
        let dir = Scratch::new("listing-room");
        let names: Vec<String> = (0..50).map(|i| format!("entry-{i}")).collect();
        for name in &names {
            std::fs::write(dir.0.join(name), "").expect("file");
        }
        let cost = LISTING_COST
            + names
                .iter()
                .map(|n| listing_cost(n.as_bytes()))
                .sum::<usize>();
        let handle = path_only(&dir.0);
        let listing = read(&handle, cost).expect("read").expect("fits exactly");
        assert_eq!(listing.cost, cost);
        assert_eq!(entries(listing).len(), 50);
        assert!(read(&handle, cost - 1).expect("read").is_none());
    }

    #[test]
    fn an_empty_directory_costs_only_its_stream() {
        let dir = Scratch::new("listing-empty");
        let listing = read(&path_only(&dir.0), MAX_LISTING_BYTES)
            .expect("read")
            .expect("within room");
        assert_eq!(listing.cost, LISTING_COST);
        assert!(entries(listing).is_empty());
        // Even an empty listing needs room for itself.
        let handle = path_only(&dir.0);
        assert!(read(&handle, LISTING_COST - 1).expect("read").is_none());
    }

    /// `f()` on another thread, or a panic if it has not returned within
    /// five seconds (an open that waits would hang the test otherwise).
    fn within_seconds<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(5))
            .expect("the call waited")
    }

    fn fifo(path: &Path) {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            path,
            FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .expect("mkfifo");
    }

    #[test]
    fn opening_a_fifo_returns_at_once_refused_with_or_without_a_peer() {
        // The look-up before the open would refuse it too; this is what
        // catches one renamed into place after the look-up. Without a
        // reader, a write open fails at once (`ENXIO`); with one, it
        // succeeds and what was opened is checked.
        let dir = Scratch::new("open-fifo");
        let pipe = dir.0.join("pipe");
        fifo(&pipe);
        for peer in [false, true] {
            let _reader = peer.then(|| {
                rustix::fs::open(&pipe, OFlags::RDONLY | OFlags::NONBLOCK, Mode::empty())
                    .expect("reader")
            });
            for flags in [DescriptorFlags::READ, DescriptorFlags::WRITE] {
                let handle = path_only(&dir.0);
                let opened = within_seconds(move || {
                    open(
                        &handle,
                        FsPerms::ReadWrite,
                        PathFlags::empty(),
                        "pipe",
                        OpenFlags::empty(),
                        flags,
                    )
                    .map(|_| "opened")
                });
                assert!(
                    matches!(opened, Err(Refused::Special)),
                    "peer {peer}, {flags:?}: {opened:?}"
                );
            }
        }
    }

    #[test]
    fn an_opened_file_is_a_blocking_file_with_the_mode_asked_for() {
        let dir = Scratch::new("open-file");
        std::fs::write(dir.0.join("f.txt"), "x").expect("write");
        let handle = path_only(&dir.0);
        let opened = open(
            &handle,
            FsPerms::ReadWrite,
            PathFlags::empty(),
            "f.txt",
            OpenFlags::empty(),
            DescriptorFlags::READ | DescriptorFlags::WRITE,
        );
        let Ok(Descriptor::File(file)) = opened else {
            panic!("not a file: {:?}", opened.map(|_| "a directory"));
        };
        assert_eq!(file.open_mode, OpenMode::READ | OpenMode::WRITE);
        let flags = rustix::fs::fcntl_getfl(&*file.file).expect("getfl");
        assert!(!flags.contains(OFlags::NONBLOCK), "{flags:?}");
        assert!(flags.contains(OFlags::RDWR), "{flags:?}");
    }

    #[test]
    fn open_answers_as_wasmtime_wasi_for_directories_read_only_grants_links_and_missing_files() {
        let dir = Scratch::new("open-codes");
        std::fs::write(dir.0.join("f.txt"), "x").expect("write");
        std::fs::create_dir(dir.0.join("sub")).expect("dir");
        std::os::unix::fs::symlink("f.txt", dir.0.join("link")).expect("symlink");
        let handle = path_only(&dir.0);
        let at = |perms, follow, path: &str, oflags, flags| {
            open(&handle, perms, follow, path, oflags, flags)
        };
        let (rw, ro) = (FsPerms::ReadWrite, FsPerms::ReadOnly);
        let (none, follow) = (PathFlags::empty(), PathFlags::SYMLINK_FOLLOW);
        let read = DescriptorFlags::READ;
        assert!(matches!(
            at(rw, none, "sub", OpenFlags::DIRECTORY, read),
            Ok(Descriptor::Dir(_))
        ));
        assert!(matches!(
            at(rw, none, "f.txt", OpenFlags::DIRECTORY, read),
            Err(Refused::Code(ErrorCode::NotDirectory))
        ));
        assert!(matches!(
            at(
                ro,
                none,
                "f.txt",
                OpenFlags::empty(),
                DescriptorFlags::WRITE
            ),
            Err(Refused::Code(ErrorCode::NotPermitted))
        ));
        assert!(matches!(
            at(ro, none, "new.txt", OpenFlags::CREATE, read),
            Err(Refused::Code(ErrorCode::NotPermitted))
        ));
        assert!(matches!(
            at(rw, none, "missing.txt", OpenFlags::empty(), read),
            Err(Refused::Code(ErrorCode::NoEntry))
        ));
        assert!(matches!(
            at(rw, follow, "link", OpenFlags::empty(), read),
            Ok(Descriptor::File(_))
        ));
        assert!(matches!(
            at(rw, none, "link", OpenFlags::empty(), read),
            Err(Refused::Code(ErrorCode::Loop))
        ));
        assert!(matches!(
            at(rw, none, "../outside", OpenFlags::empty(), read),
            Err(Refused::Code(ErrorCode::NotPermitted))
        ));
        assert!(matches!(
            at(ro, none, "f.txt", OpenFlags::TRUNCATE, read),
            Err(Refused::Code(ErrorCode::NotPermitted))
        ));
        assert!(matches!(
            at(
                rw,
                none,
                "f.txt",
                OpenFlags::empty(),
                DescriptorFlags::READ | DescriptorFlags::FILE_INTEGRITY_SYNC
            ),
            Err(Refused::Code(ErrorCode::Unsupported))
        ));
        assert!(matches!(
            at(
                rw,
                none,
                "sub",
                OpenFlags::DIRECTORY | OpenFlags::TRUNCATE,
                read
            ),
            Err(Refused::Code(ErrorCode::Invalid))
        ));
        // No flags: opened for reading, as wasmtime-wasi does.
        let Ok(Descriptor::File(file)) = at(
            rw,
            none,
            "f.txt",
            OpenFlags::empty(),
            DescriptorFlags::empty(),
        ) else {
            panic!("not a file");
        };
        assert_eq!(file.open_mode, OpenMode::READ);
        let Ok(Descriptor::File(file)) = at(rw, none, "f.txt", OpenFlags::TRUNCATE, read) else {
            panic!("not a file");
        };
        assert_eq!(file.open_mode, OpenMode::READ | OpenMode::WRITE);
        assert!(matches!(
            at(
                rw,
                none,
                "new.txt",
                OpenFlags::CREATE | OpenFlags::EXCLUSIVE,
                read
            ),
            Ok(Descriptor::File(_))
        ));
        assert!(matches!(
            at(
                rw,
                none,
                "new.txt",
                OpenFlags::CREATE | OpenFlags::EXCLUSIVE,
                read
            ),
            Err(Refused::Code(ErrorCode::Exist))
        ));
    }

    #[test]
    fn setting_times_through_a_link_to_a_fifo_returns_at_once_refused_with_or_without_a_peer() {
        let dir = Scratch::new("times-fifo");
        let pipe = dir.0.join("pipe");
        fifo(&pipe);
        std::os::unix::fs::symlink("pipe", dir.0.join("link")).expect("symlink");
        for peer in [false, true] {
            let _reader = peer.then(|| {
                rustix::fs::open(&pipe, OFlags::RDONLY | OFlags::NONBLOCK, Mode::empty())
                    .expect("reader")
            });
            let handle = path_only(&dir.0);
            let set = within_seconds(move || {
                set_times_following(
                    &handle,
                    FsPerms::ReadWrite,
                    "link",
                    NewTimestamp::Now,
                    NewTimestamp::Now,
                )
            });
            assert!(matches!(set, Err(Refused::Special)), "peer {peer}: {set:?}");
        }
    }

    #[test]
    fn setting_times_through_a_link_sets_the_targets_times_and_leaves_no_change_alone() {
        use wasmtime_wasi::p2::bindings::sync::clocks::wall_clock::Datetime;
        let dir = Scratch::new("times-file");
        let target = dir.0.join("f.txt");
        std::fs::write(&target, "x").expect("write");
        std::os::unix::fs::symlink("f.txt", dir.0.join("link")).expect("symlink");
        let since_epoch = |t: std::io::Result<std::time::SystemTime>| {
            t.expect("time")
                .duration_since(std::time::UNIX_EPOCH)
                .expect("after 1970")
        };
        let accessed_before = since_epoch(std::fs::metadata(&target).expect("stat").accessed());
        let handle = path_only(&dir.0);
        // Nanoseconds of a second or more carry into the seconds.
        let at = NewTimestamp::Timestamp(Datetime {
            seconds: 1_000_000_000,
            nanoseconds: 1_000_000_005,
        });
        let set = set_times_following(
            &handle,
            FsPerms::ReadWrite,
            "link",
            NewTimestamp::NoChange,
            at,
        );
        assert!(matches!(set, Ok(())), "{set:?}");
        let meta = std::fs::metadata(&target).expect("stat");
        assert_eq!(
            since_epoch(meta.modified()),
            std::time::Duration::new(1_000_000_001, 5)
        );
        assert_eq!(since_epoch(meta.accessed()), accessed_before);
        let far = NewTimestamp::Timestamp(Datetime {
            seconds: u64::MAX,
            nanoseconds: 0,
        });
        let overflow = set_times_following(&handle, FsPerms::ReadWrite, "link", far, at);
        assert!(
            matches!(overflow, Err(Refused::Code(ErrorCode::Overflow))),
            "{overflow:?}"
        );
        let refused = set_times_following(&handle, FsPerms::ReadOnly, "link", at, at);
        assert!(matches!(
            refused,
            Err(Refused::Code(ErrorCode::NotPermitted))
        ));
    }

    #[test]
    fn a_tenants_open_files_are_counted_until_closed_and_places_being_opened_count_too() {
        let files = OpenFiles::default();
        let kept: Vec<Arc<std::fs::File>> = (0..2)
            .map(|_| Arc::new(std::fs::File::open("/dev/null").expect("open")))
            .collect();
        for file in &kept {
            files
                .reserve(Some(3))
                .expect("a place")
                .keep(Arc::downgrade(file));
        }
        // A place being opened counts: the third is taken, a fourth is not.
        let third = files.reserve(Some(3)).expect("the third place");
        assert!(files.reserve(Some(3)).is_none());
        // Given back unused, the place is free again.
        drop(third);
        assert_eq!(files.count(), 2);
        let again = files.reserve(Some(3)).expect("the third place, given back");
        assert!(files.reserve(Some(3)).is_none());
        drop(again);
        // A closed file gives its place back.
        drop(kept);
        assert_eq!(files.count(), 0);
        assert!(files.reserve(Some(1)).is_some());
    }

    #[test]
    fn files_counted_without_a_bound_are_found_by_one_added_later_and_closed_ones_pruned() {
        let files = OpenFiles::default();
        let mut kept: Vec<Arc<std::fs::File>> = (0..5)
            .map(|_| Arc::new(std::fs::File::open("/dev/null").expect("open")))
            .collect();
        for file in &kept {
            files
                .reserve(None)
                .expect("no bound")
                .keep(Arc::downgrade(file));
        }
        // A bound added by a reload sees the five.
        assert!(files.reserve(Some(5)).is_none());
        assert!(files.reserve(Some(6)).is_some());
        // Many opens and closes without a bound keep the list short.
        for _ in 0..10 * MAX_OPEN_FILES {
            let file = Arc::new(std::fs::File::open("/dev/null").expect("open"));
            files
                .reserve(None)
                .expect("no bound")
                .keep(Arc::downgrade(&file));
        }
        assert!(files.0.lock().files.len() <= 2 * MAX_OPEN_FILES, "pruned");
        kept.truncate(2);
        assert_eq!(files.count(), 2);
    }
}
