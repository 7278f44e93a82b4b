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
//! connection's task, and has host timers for waiting.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use wasmtime::component::{HasData, Linker, Resource, ResourceTable};
use wasmtime_wasi::p2::bindings::sync::io::{poll, streams};
use wasmtime_wasi::p2::{StreamError, StreamResult};
use wasmtime_wasi_io::bindings::wasi::io::poll as async_poll;
use wasmtime_wasi_io::bindings::wasi::io::streams::{
    HostInputStream as AsyncInput, HostOutputStream as AsyncOutput,
};
use wasmtime_wasi_io::poll::DynPollable;
use wasmtime_wasi_io::streams::{DynInputStream, DynOutputStream};

use crate::plugin::host::HostState;

/// Why a blocking WASI call was refused.
const WOULD_BLOCK: &str = "a wasmgate plugin may not block its connection \
     (a WASI call would have to wait: use host timers instead of sleeping or polling)";

/// Polls `f` once.
fn now<F: Future>(f: F) -> Option<F::Output> {
    let mut cx = Context::from_waker(Waker::noop());
    match pin!(f).poll(&mut cx) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

fn stream_now<T>(f: impl Future<Output = StreamResult<T>>) -> StreamResult<T> {
    now(f).unwrap_or_else(|| Err(StreamError::Trap(wasmtime::Error::msg(WOULD_BLOCK))))
}

fn trap_now<T>(f: impl Future<Output = wasmtime::Result<T>>) -> wasmtime::Result<T> {
    now(f).unwrap_or_else(|| Err(wasmtime::Error::msg(WOULD_BLOCK)))
}

/// A plugin's resource table, seen through the non-blocking replacements.
pub struct NonBlocking<'a>(&'a mut ResourceTable);

struct NonBlockingIo;

impl HasData for NonBlockingIo {
    type Data<'a> = NonBlocking<'a>;
}

/// Links WASI 0.2 for plugin instances into `linker`.
pub fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    wasmtime_wasi::p2::add_to_linker_sync(linker)?;
    linker.allow_shadowing(true);
    streams::add_to_linker::<HostState, NonBlockingIo>(linker, |s| NonBlocking(s.table()))?;
    poll::add_to_linker::<HostState, NonBlockingIo>(linker, |s| NonBlocking(s.table()))?;
    linker.allow_shadowing(false);
    Ok(())
}

impl streams::Host for NonBlocking<'_> {
    fn convert_stream_error(&mut self, err: StreamError) -> wasmtime::Result<streams::StreamError> {
        streams::Host::convert_stream_error(self.0, err)
    }
}

impl streams::HostOutputStream for NonBlocking<'_> {
    fn drop(&mut self, stream: Resource<DynOutputStream>) -> wasmtime::Result<()> {
        // Dropping cancels pending work; stdio has none. If a stream still
        // had some, it is dropped with it rather than waited for.
        let _ = now(AsyncOutput::drop(self.0, stream));
        Ok(())
    }
    fn check_write(&mut self, stream: Resource<DynOutputStream>) -> StreamResult<u64> {
        streams::HostOutputStream::check_write(self.0, stream)
    }
    fn write(&mut self, stream: Resource<DynOutputStream>, bytes: Vec<u8>) -> StreamResult<()> {
        streams::HostOutputStream::write(self.0, stream, bytes)
    }
    fn blocking_write_and_flush(
        &mut self,
        stream: Resource<DynOutputStream>,
        bytes: Vec<u8>,
    ) -> StreamResult<()> {
        stream_now(AsyncOutput::blocking_write_and_flush(self.0, stream, bytes))
    }
    fn subscribe(
        &mut self,
        stream: Resource<DynOutputStream>,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        streams::HostOutputStream::subscribe(self.0, stream)
    }
    fn write_zeroes(&mut self, stream: Resource<DynOutputStream>, len: u64) -> StreamResult<()> {
        streams::HostOutputStream::write_zeroes(self.0, stream, len)
    }
    fn blocking_write_zeroes_and_flush(
        &mut self,
        stream: Resource<DynOutputStream>,
        len: u64,
    ) -> StreamResult<()> {
        stream_now(AsyncOutput::blocking_write_zeroes_and_flush(
            self.0, stream, len,
        ))
    }
    fn flush(&mut self, stream: Resource<DynOutputStream>) -> StreamResult<()> {
        streams::HostOutputStream::flush(self.0, stream)
    }
    fn blocking_flush(&mut self, stream: Resource<DynOutputStream>) -> StreamResult<()> {
        stream_now(AsyncOutput::blocking_flush(self.0, stream))
    }
    fn splice(
        &mut self,
        dst: Resource<DynOutputStream>,
        src: Resource<DynInputStream>,
        len: u64,
    ) -> StreamResult<u64> {
        streams::HostOutputStream::splice(self.0, dst, src, len)
    }
    fn blocking_splice(
        &mut self,
        dst: Resource<DynOutputStream>,
        src: Resource<DynInputStream>,
        len: u64,
    ) -> StreamResult<u64> {
        stream_now(AsyncOutput::blocking_splice(self.0, dst, src, len))
    }
}

impl streams::HostInputStream for NonBlocking<'_> {
    fn drop(&mut self, stream: Resource<DynInputStream>) -> wasmtime::Result<()> {
        let _ = now(AsyncInput::drop(self.0, stream));
        Ok(())
    }
    fn read(&mut self, stream: Resource<DynInputStream>, len: u64) -> StreamResult<Vec<u8>> {
        streams::HostInputStream::read(self.0, stream, len)
    }
    fn blocking_read(
        &mut self,
        stream: Resource<DynInputStream>,
        len: u64,
    ) -> StreamResult<Vec<u8>> {
        stream_now(AsyncInput::blocking_read(self.0, stream, len))
    }
    fn skip(&mut self, stream: Resource<DynInputStream>, len: u64) -> StreamResult<u64> {
        streams::HostInputStream::skip(self.0, stream, len)
    }
    fn blocking_skip(&mut self, stream: Resource<DynInputStream>, len: u64) -> StreamResult<u64> {
        stream_now(AsyncInput::blocking_skip(self.0, stream, len))
    }
    fn subscribe(
        &mut self,
        stream: Resource<DynInputStream>,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        streams::HostInputStream::subscribe(self.0, stream)
    }
}

impl poll::Host for NonBlocking<'_> {
    fn poll(&mut self, pollables: Vec<Resource<DynPollable>>) -> wasmtime::Result<Vec<u32>> {
        trap_now(async_poll::Host::poll(self.0, pollables))
    }
}

impl poll::HostPollable for NonBlocking<'_> {
    fn ready(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<bool> {
        // Not ready now means not ready: answering never blocks.
        Ok(now(async_poll::HostPollable::ready(self.0, pollable))
            .transpose()?
            .unwrap_or(false))
    }
    fn block(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<()> {
        trap_now(async_poll::HostPollable::block(self.0, pollable))
    }
    fn drop(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<()> {
        async_poll::HostPollable::drop(self.0, pollable)
    }
}
