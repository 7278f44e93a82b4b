//! The parts of WASI's filesystem (wasi:filesystem/types) the gateway
//! defines itself, over wasmtime-wasi's: directory listings, whose memory
//! is bounded, and opening a file, which refuses special files and holds
//! at most [`MAX_OPEN_FILES`] of the gateway's file descriptors per
//! instance. Only routes that grant `dirs` have a filesystem.
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
//! **Opening.** `descriptor.open-at` runs `open(2)` on wasmtime-wasi's
//! blocking pool and waits for it without a time limit, and host code is
//! not interrupted: opening a FIFO that no one writes to would hold the
//! call, its connection and a thread until someone does, and keep the
//! gateway from shutting down. So before wasmtime-wasi opens a path, the
//! path is looked up as the open will resolve it, opened at most as a path
//! handle (`O_PATH`, which never waits): with the `openat2` call
//! wasmtime-wasi's open makes, or where that cannot answer, wasmtime-wasi's
//! own `stat-at`. A FIFO, socket or device is refused with `not-permitted`
//! (`special_file`). `set-times-at` following a last symbolic link opens
//! the file too, and is checked the same way. A path whose lookup fails
//! goes to wasmtime-wasi, which answers it (or creates the file).
//!
//! A special file renamed into place between the lookup and the open is
//! not caught. WASI cannot create one, but where a writable granted
//! directory already holds one (or a link to one), a plugin's other
//! connection can rename it back and forth while this one opens, and so
//! can another process. Closing that race needs the open itself done here
//! (`O_NONBLOCK`, then a check of what was opened), not built.
//!
//! **Open files.** Each file or directory opened is one of the gateway's
//! file descriptors; an instance may hold [`MAX_OPEN_FILES`] at once. The
//! files an instance opened are followed through weak references to the
//! file its descriptor and streams share, so one is counted until the last
//! of them is dropped.

use std::os::fd::AsFd;
use std::sync::{Arc, Weak};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use wasmtime::component::{Linker, Resource, ResourceType};
use wasmtime::StoreContextMut;
use wasmtime_wasi::filesystem::{Descriptor, WasiFilesystemCtxView, WasiFilesystemView};
use wasmtime_wasi::p2::bindings::sync::filesystem::types::{
    self as fs, DescriptorFlags, DescriptorType, DirectoryEntry, ErrorCode, NewTimestamp,
    OpenFlags, PathFlags,
};
use wasmtime_wasi::p2::FsResult;

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
        )| {
            let state = store.data_mut();
            // On a file, wasmtime-wasi answers `not-directory`.
            if let Descriptor::Dir(_) = state.table().get(&fd)? {
                if special_file(state, &fd, path_flags, &path)? {
                    return Ok((Err(refuse_special(state, &path)),));
                }
                // A file stays open while its descriptor or any stream of
                // it lives (they share it).
                state.held.files.retain(|file| file.strong_count() > 0);
                if state.held.files.len() >= MAX_OPEN_FILES {
                    tracing::debug!(
                        tenant = %state.scope().tenant.name, route = %state.scope().route,
                        conn = state.conn_id(), path,
                        "a plugin's open was refused: it holds {MAX_OPEN_FILES} open files"
                    );
                    return Ok((Err(ErrorCode::InsufficientMemory),));
                }
            }
            let mut view = state.filesystem();
            let opened =
                fs::HostDescriptor::open_at(&mut view, fd, path_flags, path, open_flags, flags);
            let answer = answer(&mut view, opened)?;
            if let (Ok(file),) = &answer {
                let shared = match state.table().get(file)? {
                    Descriptor::File(f) => Arc::downgrade(&f.file),
                    Descriptor::Dir(d) => Arc::downgrade(&d.dir),
                };
                state.held.files.push(shared);
            }
            Ok(answer)
        },
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
            // Following a last symbolic link, wasmtime-wasi opens the file
            // to set its times.
            if path_flags.contains(PathFlags::SYMLINK_FOLLOW)
                && special_file(state, &fd, path_flags, &path)?
            {
                return Ok((Err(refuse_special(state, &path)),));
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
}
