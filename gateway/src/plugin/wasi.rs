//! WASI for plugins, callable synchronously from inside tokio.
//!
//! Plugins are called synchronously (no fiber per call, which is most of an
//! async call's overhead) from the connection's tokio task. wasmtime-wasi's
//! synchronous bindings would do, except for the few calls that may block
//! (a blocking stream write, flush or read, dropping a stream, polling),
//! which it runs with `Handle::block_on`: that panics inside tokio, and a
//! guest printing a panic message makes exactly such a call.
//!
//! So this module links wasmtime-wasi's synchronous bindings and then
//! replaces those calls: each runs wasmtime-wasi's own asynchronous
//! implementation and polls it once. Standard output and error complete on
//! that poll. Anything that would really have to wait (a sleep, a stream
//! that is not ready) traps instead: a handler must not block its
//! connection's task, and has host timers for waiting. The exception is a
//! route that grants directories: file reads and writes complete on
//! wasmtime-wasi's blocking pool, so its calls run with the worker handed
//! off, and a call may wait up to `max_call_time` for them. Directory
//! listings and opening files are the gateway's own
//! ([`crate::plugin::filesystem`]).

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use wasmtime::component::{HasData, Linker, Resource, ResourceTable};
use wasmtime_wasi::p2::bindings::sync::io::{poll, streams};
use wasmtime_wasi::p2::{StreamError, StreamResult};
use wasmtime_wasi_io::bindings::wasi::io::poll as async_poll;
use wasmtime_wasi_io::bindings::wasi::io::streams::{
    HostInputStream as AsyncInput, HostOutputStream as AsyncOutput,
};
use wasmtime_wasi_io::poll::DynPollable;
use wasmtime_wasi_io::streams::{DynInputStream, DynOutputStream};

use crate::plugin::engine::MAX_RESOURCES;
use crate::plugin::host::HostState;

/// Why a blocking WASI call was refused.
const WOULD_BLOCK: &str = "a wasmgate plugin may not block its connection \
     (a WASI call would have to wait: use host timers instead of sleeping or polling)";

/// Polls `f` once; or, when the instance may wait (`wait`: a route that
/// grants directories, whose calls run with the worker handed off), waits
/// for it up to that long.
fn now<F: Future>(f: F, wait: Option<Duration>) -> Option<F::Output> {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    match f.as_mut().poll(&mut cx) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => {
            let wait = wait?;
            let handle = tokio::runtime::Handle::try_current().ok()?;
            // Calls of routes with `dirs` run handed off, where this only
            // blocks; anywhere else (an instance's start, which runs on its
            // worker) the worker is handed off first rather than panicking.
            tokio::task::block_in_place(|| handle.block_on(tokio::time::timeout(wait, f))).ok()
        }
    }
}

fn stream_now<T>(
    wait: Option<Duration>,
    f: impl Future<Output = StreamResult<T>>,
) -> StreamResult<T> {
    now(f, wait).unwrap_or_else(|| Err(StreamError::Trap(wasmtime::Error::msg(WOULD_BLOCK))))
}

fn trap_now<T>(
    wait: Option<Duration>,
    f: impl Future<Output = wasmtime::Result<T>>,
) -> wasmtime::Result<T> {
    now(f, wait).unwrap_or_else(|| Err(wasmtime::Error::msg(WOULD_BLOCK)))
}

/// A plugin's resource table, seen through the non-blocking replacements,
/// and how long a call may wait (only on routes that grant directories).
pub struct NonBlocking<'a> {
    table: &'a mut ResourceTable,
    wait: Option<Duration>,
}

impl<'a> NonBlocking<'a> {
    /// `table`'s streams and pollables; waiting up to `wait` if given.
    pub fn new(table: &'a mut ResourceTable, wait: Option<Duration>) -> Self {
        NonBlocking { table, wait }
    }
}

struct NonBlockingIo;

impl HasData for NonBlockingIo {
    type Data<'a> = NonBlocking<'a>;
}

/// Links WASI 0.2 for plugin instances into `linker`.
pub fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    wasmtime_wasi::p2::add_to_linker_sync(linker)?;
    linker.allow_shadowing(true);
    streams::add_to_linker::<HostState, NonBlockingIo>(linker, |s| s.non_blocking())?;
    poll::add_to_linker::<HostState, NonBlockingIo>(linker, |s| s.non_blocking())?;
    linker.allow_shadowing(false);
    crate::plugin::filesystem::add_to_linker(linker)
}

impl streams::Host for NonBlocking<'_> {
    fn convert_stream_error(&mut self, err: StreamError) -> wasmtime::Result<streams::StreamError> {
        streams::Host::convert_stream_error(self.table, err)
    }
}

impl streams::HostOutputStream for NonBlocking<'_> {
    fn drop(&mut self, stream: Resource<DynOutputStream>) -> wasmtime::Result<()> {
        // Dropping cancels pending work; stdio has none. A file stream
        // (routes that grant `dirs`) dropped while its write is running on
        // the blocking pool waits for that write, as wasmtime-wasi means
        // `cancel` to be awaited, and as any blocking call waits here: not
        // waited for, the write would go on behind the guest's back while
        // the guest starts the next one. Past the wait, or where nothing
        // may wait, the call traps; so does dropping a stream whose
        // pollable is still alive, as in wasmtime-wasi.
        trap_now(self.wait, AsyncOutput::drop(self.table, stream))
    }
    fn check_write(&mut self, stream: Resource<DynOutputStream>) -> StreamResult<u64> {
        streams::HostOutputStream::check_write(self.table, stream)
    }
    fn write(&mut self, stream: Resource<DynOutputStream>, bytes: Vec<u8>) -> StreamResult<()> {
        streams::HostOutputStream::write(self.table, stream, bytes)
    }
    fn blocking_write_and_flush(
        &mut self,
        stream: Resource<DynOutputStream>,
        bytes: Vec<u8>,
    ) -> StreamResult<()> {
        stream_now(
            self.wait,
            AsyncOutput::blocking_write_and_flush(self.table, stream, bytes),
        )
    }
    fn subscribe(
        &mut self,
        stream: Resource<DynOutputStream>,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        streams::HostOutputStream::subscribe(self.table, stream)
    }
    fn write_zeroes(&mut self, stream: Resource<DynOutputStream>, len: u64) -> StreamResult<()> {
        streams::HostOutputStream::write_zeroes(self.table, stream, len)
    }
    fn blocking_write_zeroes_and_flush(
        &mut self,
        stream: Resource<DynOutputStream>,
        len: u64,
    ) -> StreamResult<()> {
        stream_now(
            self.wait,
            AsyncOutput::blocking_write_zeroes_and_flush(self.table, stream, len),
        )
    }
    fn flush(&mut self, stream: Resource<DynOutputStream>) -> StreamResult<()> {
        streams::HostOutputStream::flush(self.table, stream)
    }
    fn blocking_flush(&mut self, stream: Resource<DynOutputStream>) -> StreamResult<()> {
        stream_now(self.wait, AsyncOutput::blocking_flush(self.table, stream))
    }
    fn splice(
        &mut self,
        dst: Resource<DynOutputStream>,
        src: Resource<DynInputStream>,
        len: u64,
    ) -> StreamResult<u64> {
        streams::HostOutputStream::splice(self.table, dst, src, len)
    }
    fn blocking_splice(
        &mut self,
        dst: Resource<DynOutputStream>,
        src: Resource<DynInputStream>,
        len: u64,
    ) -> StreamResult<u64> {
        stream_now(
            self.wait,
            AsyncOutput::blocking_splice(self.table, dst, src, len),
        )
    }
}

impl streams::HostInputStream for NonBlocking<'_> {
    fn drop(&mut self, stream: Resource<DynInputStream>) -> wasmtime::Result<()> {
        // As for output streams: a file read still running is waited for.
        trap_now(self.wait, AsyncInput::drop(self.table, stream))
    }
    fn read(&mut self, stream: Resource<DynInputStream>, len: u64) -> StreamResult<Vec<u8>> {
        streams::HostInputStream::read(self.table, stream, len)
    }
    fn blocking_read(
        &mut self,
        stream: Resource<DynInputStream>,
        len: u64,
    ) -> StreamResult<Vec<u8>> {
        stream_now(
            self.wait,
            AsyncInput::blocking_read(self.table, stream, len),
        )
    }
    fn skip(&mut self, stream: Resource<DynInputStream>, len: u64) -> StreamResult<u64> {
        streams::HostInputStream::skip(self.table, stream, len)
    }
    fn blocking_skip(&mut self, stream: Resource<DynInputStream>, len: u64) -> StreamResult<u64> {
        stream_now(
            self.wait,
            AsyncInput::blocking_skip(self.table, stream, len),
        )
    }
    fn subscribe(
        &mut self,
        stream: Resource<DynInputStream>,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        streams::HostInputStream::subscribe(self.table, stream)
    }
}

impl poll::Host for NonBlocking<'_> {
    fn poll(&mut self, pollables: Vec<Resource<DynPollable>>) -> wasmtime::Result<Vec<u32>> {
        // The host builds a map and a ready list as long as the guest's
        // list, with no time limit: no longer than the handles an instance
        // can hold (the same pollable listed twice adds nothing).
        if pollables.len() > MAX_RESOURCES {
            return Err(wasmtime::Error::msg(format!(
                "a wasmgate plugin may poll at most {MAX_RESOURCES} pollables at once (asked {})",
                pollables.len()
            )));
        }
        trap_now(self.wait, async_poll::Host::poll(self.table, pollables))
    }
}

impl poll::HostPollable for NonBlocking<'_> {
    fn ready(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<bool> {
        // Not ready now means not ready: answering never blocks.
        Ok(
            now(async_poll::HostPollable::ready(self.table, pollable), None)
                .transpose()?
                .unwrap_or(false),
        )
    }
    fn block(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<()> {
        trap_now(
            self.wait,
            async_poll::HostPollable::block(self.table, pollable),
        )
    }
    fn drop(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<()> {
        async_poll::HostPollable::drop(self.table, pollable)
    }
}
