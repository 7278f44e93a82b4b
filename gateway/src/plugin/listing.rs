//! A bound on the gateway memory that directory listings hold for a plugin.
//!
//! WASI 0.2's `descriptor.read-directory` (wasi:filesystem/types) returns a
//! `directory-entry-stream`. wasmtime-wasi builds it by reading the whole
//! directory into a list in the gateway's memory, with one `stat` per
//! entry, and keeps the list until the guest drops the stream. That memory
//! is outside the guest's `max_memory`, and the work is outside its call's
//! time limit. Only routes that grant `dirs` can list anything.
//!
//! This module replaces `read-directory` and the stream's destructor in the
//! linker. Before wasmtime-wasi reads a directory, the directory is counted
//! here, one buffer of entries at a time ([`rustix::fs::Dir`], on a
//! handle of its own), and the
//! listing's cost ([`listing_cost`]) is charged to the instance. The
//! charges of the listings an instance holds at once may not pass
//! [`MAX_LISTING_BYTES`]: a listing that would pass it is refused with
//! `insufficient-memory` (the guest sees `ENOMEM` through wasi-libc), and
//! the count stops as soon as it knows. Dropping a stream gives its charge
//! back.
//!
//! Entries created between the count and wasmtime-wasi's read (another
//! connection writing into a writable directory at that moment) are not
//! charged.

use wasmtime::component::{Linker, Resource, ResourceType};
use wasmtime::StoreContextMut;
use wasmtime_wasi::filesystem::{Descriptor, WasiFilesystemView};
use wasmtime_wasi::p2::bindings::sync::filesystem::types::{
    self as fs, DirectoryEntryStream, ErrorCode,
};
use wasmtime_wasi::p2::FsError;

use crate::plugin::host::HostState;

/// The most gateway memory the directory listings one instance holds open
/// at once may take, by [`listing_cost`]: 1 MiB, about 9,000 entries with
/// 20-byte names. On a shared instance (`isolation = "shared"`) the bound
/// is the route's.
pub const MAX_LISTING_BYTES: usize = 1 << 20;

/// What one entry of a listing is counted for on top of its name, in
/// bytes. wasmtime-wasi keeps each entry as a record with its name in an
/// allocation of its own. Measured 2026-12-02 (the gateway's RSS, 20
/// connections each holding 100 listings of 300 entries with 200-byte
/// names): 290 bytes per entry, so 90 beyond the name.
pub const ENTRY_COST: usize = 96;

/// The interface whose functions are replaced: the WASI 0.2 version
/// wasmtime-wasi 48 defines (guests importing an older 0.2 version are
/// linked to it).
const INTERFACE: &str = "wasi:filesystem/types@0.2.12";

/// The listings an instance holds: each stream's handle and charge.
#[derive(Default)]
pub struct Listings {
    held: usize,
    streams: Vec<(u32, usize)>,
}

impl Listings {
    /// Bytes charged to the listings held now.
    pub fn held(&self) -> usize {
        self.held
    }

    fn charge(&mut self, rep: u32, cost: usize) {
        self.held += cost;
        self.streams.push((rep, cost));
    }

    fn release(&mut self, rep: u32) {
        if let Some(i) = self.streams.iter().position(|(r, _)| *r == rep) {
            let (_, cost) = self.streams.swap_remove(i);
            self.held -= cost;
        }
    }
}

/// The cost of one entry named `name` (see [`ENTRY_COST`]).
pub fn listing_cost(name: &[u8]) -> usize {
    ENTRY_COST + name.len()
}

/// Replaces `read-directory` and the destructor of `directory-entry-stream`
/// in `linker`, which must already hold wasmtime-wasi's filesystem.
pub fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut types = linker.instance(INTERFACE)?;
    types.func_wrap(
        "[method]descriptor.read-directory",
        |mut store: StoreContextMut<'_, HostState>, (fd,): (Resource<Descriptor>,)| {
            read_directory(store.data_mut(), fd).map(|r| (r,))
        },
    )?;
    types.resource(
        "directory-entry-stream",
        ResourceType::host::<DirectoryEntryStream>(),
        |mut store, rep| {
            let state = store.data_mut();
            state.listings.release(rep);
            fs::HostDirectoryEntryStream::drop(&mut state.filesystem(), Resource::new_own(rep))
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

fn read_directory(
    state: &mut HostState,
    fd: Resource<Descriptor>,
) -> wasmtime::Result<Result<Resource<DirectoryEntryStream>, ErrorCode>> {
    let room = MAX_LISTING_BYTES.saturating_sub(state.listings.held);
    // A file, a closed handle: wasmtime-wasi answers those.
    let counted = match state.filesystem().table.get(&fd) {
        Ok(Descriptor::Dir(d)) => Some(count(&d.dir, room)),
        _ => None,
    };
    let cost = match counted {
        None => None,
        Some(Ok(Some(cost))) => Some(cost),
        Some(Ok(None)) => {
            tracing::debug!(
                tenant = %state.scope().tenant.name, route = %state.scope().route,
                conn = state.conn_id(), held = state.listings.held,
                "a directory listing was refused: the instance's listings would hold more than {MAX_LISTING_BYTES} bytes"
            );
            return Ok(Err(ErrorCode::InsufficientMemory));
        }
        Some(Err(e)) => {
            return fs::Host::convert_error_code(&mut state.filesystem(), FsError::from(e)).map(Err)
        }
    };
    let mut view = state.filesystem();
    match fs::HostDescriptor::read_directory(&mut view, fd) {
        Ok(stream) => {
            if let Some(cost) = cost {
                state.listings.charge(stream.rep(), cost);
            }
            Ok(Ok(stream))
        }
        Err(e) => fs::Host::convert_error_code(&mut view, e).map(Err),
    }
}

/// The cost of listing `dir`, or `None` once it passes `room`. Reads the
/// directory a buffer at a time, without `stat`: the work is bounded by
/// `room` as much as the memory.
fn count(dir: &std::fs::File, room: usize) -> std::io::Result<Option<usize>> {
    let mut cost = 0usize;
    use rustix::fs::{Mode, OFlags};
    // The handle may be a path-only one (`O_PATH`): a readable handle of
    // its own, closed when the count ends.
    let readable = rustix::fs::openat(
        dir,
        c".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    for entry in rustix::fs::Dir::new(readable)? {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        cost += listing_cost(name);
        if cost > room {
            return Ok(None);
        }
    }
    Ok(Some(cost))
}
