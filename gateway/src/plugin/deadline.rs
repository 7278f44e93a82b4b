//! A guest call's time limit, and keeping a long call from holding up the
//! rest of the gateway.
//!
//! Guest calls run synchronously on the tokio worker that polls the
//! connection's task. A call that runs long (a loop, heavy work) would keep
//! that worker from everything else queued on it, and, while no worker
//! parks, from the I/O driver: every connection could wait until the call
//! ends, up to `[sandbox] max_call_time`.
//!
//! So a call's deadline comes in two stages, counted in the engine's epoch
//! ticks (see [`crate::plugin::engine`]):
//! 1. [`HAND_OFF_TICKS`] after it starts (10 to 20 ms), the epoch callback
//!    hands the worker's queue to another thread
//!    ([`tokio::task::block_in_place`]) and lets the call go on: from then
//!    on the call only holds its own thread, and the other connections run
//!    on the remaining workers.
//! 2. At `max_call_time` it traps with [`wasmtime::Trap::Interrupt`].
//!
//! Calls shorter than the first stage (nearly all) pay nothing for this:
//! the callback never runs. A current-thread runtime (`threads = 1`) has no
//! other worker to hand to; there a long call holds the gateway until it
//! ends or is interrupted.

use std::sync::mpsc;
use std::time::Duration;

use tokio::runtime::{Handle, RuntimeFlavor};
use wasmtime::{StoreContextMut, UpdateDeadline};

use crate::plugin::host::HostState;

/// Epoch ticks a call runs before its worker is handed off: 2 ticks of
/// 10 ms, so a call runs at least 10 ms first.
pub const HAND_OFF_TICKS: u64 = 2;

/// Longest a hand-off waits for another thread to take the worker's queue.
const HAND_OFF_WAIT: Duration = Duration::from_millis(100);

/// Where the running call is in its deadline.
#[derive(Debug, Default)]
pub struct CallClock {
    /// Ticks left after the first stage ends (0: the next deadline traps).
    rest: u64,
}

impl CallClock {
    /// Arms a call that may run `total` epoch ticks; returns the deadline to
    /// set for the first stage.
    pub fn arm(&mut self, total: u64) -> u64 {
        let first = total.min(HAND_OFF_TICKS);
        self.rest = total - first;
        first
    }
}

/// The epoch-deadline callback of every plugin store: hands the worker off
/// at the first deadline of a call, traps at the second.
pub fn on_deadline(mut ctx: StoreContextMut<'_, HostState>) -> wasmtime::Result<UpdateDeadline> {
    let rest = std::mem::take(&mut ctx.data_mut().call.rest);
    if rest == 0 {
        return Err(wasmtime::Trap::Interrupt.into());
    }
    hand_off_worker();
    Ok(UpdateDeadline::Continue(rest))
}

/// Lets the tokio worker running this thread go on elsewhere while this
/// thread keeps running the current (long) call. Does nothing outside a
/// multi-thread runtime.
pub fn hand_off_worker() {
    let Ok(handle) = Handle::try_current() else {
        return;
    };
    if handle.runtime_flavor() != RuntimeFlavor::MultiThread {
        return;
    }
    // A task spawned here is queued on this worker's own queue (its
    // next-task slot, which no other worker steals): it runs only once
    // another thread has taken this worker's queue over. Waiting for it
    // inside `block_in_place` is what makes the hand-off happen rather than
    // race with `block_in_place` taking the worker back when it returns.
    let (tx, rx) = mpsc::sync_channel::<()>(1);
    handle.spawn(async move {
        let _ = tx.send(());
    });
    tokio::task::block_in_place(|| {
        let _ = rx.recv_timeout(HAND_OFF_WAIT);
    });
}

/// Runs `f`, which may block the thread for a while (waiting for a lock
/// another connection's long call holds), without holding up the worker's
/// other tasks: on a multi-thread runtime's worker the worker is handed to
/// another thread for the wait.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}
