//! A guest call's time limit, and keeping a long call from holding up the
//! rest of the gateway.
//!
//! Guest calls run synchronously on the tokio worker that polls the
//! connection's task. A call that runs long (a loop, heavy work) would keep
//! that worker from everything else queued on it, and, while no worker
//! parks, from the I/O driver: every connection could wait until the call
//! ends, up to `[sandbox] max_call_time`.
//!
//! So a call's deadline comes in stages, counted in the engine's epoch
//! ticks (see [`crate::plugin::engine`]):
//! 1. At the first tick after it starts (within 10 ms), the epoch callback
//!    hands the worker's queue to another thread
//!    ([`tokio::task::block_in_place`]) and lets the call go on: from then
//!    on the call only holds its own thread, and the other connections run
//!    on the remaining workers. The thread also leaves the workers' short
//!    time slice for the kernel's default until the call ends
//!    ([`crate::sched`]), so a worker woken on the same core preempts it
//!    within a fraction of a millisecond.
//! 2. From then on the callback runs at every tick (every 10 ms). For a
//!    tenant with a CPU budget it charges the time the call has run so far,
//!    and while the tenant is in debt it puts the call's thread to sleep
//!    (the sleep is not charged): a tenant's long calls are throttled to
//!    its budget, like a cgroup's CPU quota, instead of taking the machine.
//! 3. Off the workers, at most as many long calls run at once as there are
//!    workers (at least two), and at most half of those for one tenant
//!    ([`LongCalls`]);
//!    more wait, paused, for a place: however many calls loop together, the
//!    workers keep about half the CPU, and one tenant's loops leave places
//!    for the others' long calls.
//! 4. At `max_call_time` (wall-clock, sleeps and waits included) it traps
//!    with [`wasmtime::Trap::Interrupt`].
//!
//! A call that runs long holds its worker until its first tick, up to 10
//! ms, and the connections queued on that worker wait as long. So once a
//! route's call has run 2 ms by its first tick, or into a second tick, the
//! route's next calls start handed off ([`LongCallHint`]): a hand-off per
//! call (tens of microseconds) for a route whose calls are long anyway, and
//! no worker held. A call the first tick catches microseconds after it
//! started does not mark its route: under load some call is running at
//! nearly every tick, and marking every one of their routes handed off most
//! calls of a busy gateway (connection setup fell from 7,800 to 1,100-2,700
//! a second). Nor is a call judged by its duration when it ends (tried):
//! a neighbour's long calls preempt a normal call's thread for a
//! millisecond often enough that the neighbour's victims were marked, and
//! their every call paid a hand-off.
//!
//! Calls shorter than a tick (nearly all) pay nothing for this: the callback
//! never runs. A current-thread runtime (`threads = 1`) has no other worker
//! to hand to; there a long call holds the gateway until it ends or is
//! interrupted (and is not put to sleep).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::runtime::{Handle, RuntimeFlavor};
use wasmtime::{StoreContextMut, UpdateDeadline};

use crate::plugin::host::HostState;
use crate::quota::{CpuMeter, MeterClock};
use crate::routing::tenant::Counts;

/// Epoch ticks a call runs before its worker is handed off: the first tick,
/// 0 to 10 ms into the call.
pub const HAND_OFF_TICKS: u64 = 1;

/// How long a call must have run by its first tick to mark its route's
/// next calls for starting handed off ([`LongCallHint`]): well above a
/// normal handler call (microseconds), well below the tick.
const LONG_CALL: Duration = Duration::from_millis(2);

/// The epoch tick, as the engine's ticker advances it.
const TICK: Duration = crate::plugin::engine::EPOCH_TICK;

/// Where the running call is in its deadline, and what of it was charged.
#[derive(Debug, Default)]
pub struct CallClock {
    /// Ticks the call may run after the first stage (0: it traps there).
    rest: u64,
    /// When it must end: set at the first stage, from `rest`.
    deadline: Option<Instant>,
    /// Guest time from this [`MeterClock`] reading on is not yet measured
    /// (`None`: the tenant has no CPU budget).
    measured_to: Option<u64>,
    /// Guest time measured (in [`MeterClock`] ticks) and not yet charged
    /// to the tenant's budget: charged once it reaches
    /// [`crate::quota::FLUSH_GUEST_TIME`], at every tick of a long call,
    /// and when the instance ends.
    unflushed: u64,
    /// The call's thread was handed off: it is no longer a worker, and may
    /// sleep.
    handed_off: bool,
    /// Its place among the long calls allowed to run at once.
    permit: Option<LongCalls>,
    /// Deadline callbacks the call has seen (the epoch ticks it ran into).
    ticks_seen: u32,
    /// When the call started, as a [`MeterClock`] reading.
    started: u64,
}

/// A place among the long (handed-off) calls allowed to run at once: one
/// per runtime worker in all (at least two), and at most half of them (at
/// least one) for any one tenant, so that one tenant's loops cannot keep
/// another's long calls waiting. Given back when dropped (the call ended).
///
/// Under CPU contention an ordinary call can be caught by a tick because
/// the OS preempted its thread, and then needs a place too: with a single
/// place, a looping tenant would hold it and such a call would wait until
/// its deadline.
#[derive(Debug)]
pub struct LongCalls(Arc<Counts>);

/// Places taken, and the most there are (0 until first used).
static LONG_CALLS: parking_lot::Mutex<(usize, usize)> = parking_lot::Mutex::new((0, 0));
static LONG_CALL_FREED: parking_lot::Condvar = parking_lot::Condvar::new();

impl LongCalls {
    /// Takes a place for a call of the tenant whose counts are `tenant`,
    /// waiting until one is free or until `deadline`.
    fn acquire(tenant: &Arc<Counts>, deadline: Instant) -> Option<LongCalls> {
        let mut places = LONG_CALLS.lock();
        if places.1 == 0 {
            // At least two, so that half of them for one tenant still
            // leaves one for the others on a one-worker runtime.
            places.1 = Handle::try_current()
                .map(|h| h.metrics().num_workers())
                .unwrap_or(1)
                .max(2);
        }
        let per_tenant = (places.1 / 2).max(1);
        while places.0 >= places.1 || tenant.long_calls.load(Ordering::Relaxed) >= per_tenant {
            if LONG_CALL_FREED
                .wait_until(&mut places, deadline)
                .timed_out()
            {
                return None;
            }
        }
        places.0 += 1;
        tenant.long_calls.fetch_add(1, Ordering::Relaxed);
        Some(LongCalls(tenant.clone()))
    }
}

impl Drop for LongCalls {
    fn drop(&mut self) {
        let mut places = LONG_CALLS.lock();
        places.0 -= 1;
        self.0.long_calls.fetch_sub(1, Ordering::Relaxed);
        drop(places);
        LONG_CALL_FREED.notify_all();
    }
}

impl CallClock {
    /// Arms a call that may run `total` epoch ticks, measured for a CPU
    /// budget if `metered`, and started `off_worker` (the caller runs it
    /// with the worker handed off already); returns the deadline to set for
    /// the first stage.
    pub fn arm(&mut self, total: u64, metered: bool, off_worker: bool) -> u64 {
        let first = total.min(HAND_OFF_TICKS);
        self.rest = total - first;
        self.deadline = None;
        self.handed_off = off_worker;
        self.ticks_seen = 0;
        let clock = MeterClock::get();
        self.started = clock.raw();
        self.measured_to = metered.then_some(self.started);
        first
    }

    /// The call has ended: gives back its place among long calls, and
    /// measures its guest time for `meter` (the tenant's CPU budget, if it
    /// has one), charging what was measured once there is enough of it.
    /// Returns how long the call took (wall-clock, from [`CallClock::arm`]).
    pub fn ended(&mut self, meter: Option<&CpuMeter>) -> Duration {
        self.permit = None;
        let clock = MeterClock::get();
        let now = clock.raw();
        if let Some(from) = self.measured_to.take() {
            self.unflushed += MeterClock::ticks_between(from, now);
        }
        if clock.due(self.unflushed) {
            self.flush(meter);
        }
        clock.duration(MeterClock::ticks_between(self.started, now))
    }

    /// Adds the guest time since the last measurement to what is not yet
    /// charged.
    fn measure(&mut self) {
        if let Some(from) = self.measured_to.take() {
            let now = MeterClock::get().raw();
            self.unflushed += MeterClock::ticks_between(from, now);
        }
    }

    /// Charges all measured guest time to `meter`.
    pub fn flush(&mut self, meter: Option<&CpuMeter>) {
        if let Some(meter) = meter {
            if self.unflushed > 0 {
                meter.charge_ticks(self.unflushed);
            }
        }
        self.unflushed = 0;
    }
}

/// Whether a route's calls start off the worker, from the way its recent
/// calls went. A call that had run 2 ms by its first tick, or runs into a
/// second one, held its worker (and the connections queued on it) until
/// that first tick;
/// on a route whose calls run that long, the next ones are handed off before
/// they start
/// instead, which costs a thread hand-off per call (tens of microseconds)
/// but never holds a worker. A route whose calls stop running long returns
/// to running them on the worker after [`LongCallHint::CALLS`] calls.
#[derive(Debug, Default)]
pub struct LongCallHint(AtomicU32);

impl LongCallHint {
    /// Calls started off the worker after one ran long.
    pub const CALLS: u32 = 100;

    /// Whether the next call is to start off the worker (counted).
    pub fn start_off_worker(&self) -> bool {
        if self.0.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        true
    }

    /// A call of the route ran long (see [`LongCallHint`]).
    pub fn ran_long(&self) {
        self.0.store(Self::CALLS, Ordering::Relaxed);
    }
}

/// The epoch-deadline callback of every plugin store: hands the worker off
/// at the first deadline of a call, then every tick charges and throttles a
/// budgeted tenant's call, and traps at `max_call_time`.
pub fn on_deadline(mut ctx: StoreContextMut<'_, HostState>) -> wasmtime::Result<UpdateDeadline> {
    let state = ctx.data_mut();
    let now = Instant::now();
    state.call.ticks_seen = state.call.ticks_seen.saturating_add(1);
    // A call that has run LONG_CALL by its first tick, or reaches a second
    // tick (a full period), ran long; one the tick caught just after it
    // started did not.
    if state.call.ticks_seen == 1 {
        let clock = MeterClock::get();
        let ran = clock.duration(MeterClock::ticks_between(state.call.started, clock.raw()));
        if ran >= LONG_CALL {
            state.scope().long_calls.ran_long();
        }
    } else if state.call.ticks_seen == 2 {
        state.scope().long_calls.ran_long();
    }
    let deadline = *state
        .call
        .deadline
        .get_or_insert(now + TICK * u32::try_from(state.call.rest).unwrap_or(u32::MAX));
    if now >= deadline {
        return Err(wasmtime::Trap::Interrupt.into());
    }
    // Until it has worked: under heavy load the thread taking the worker
    // over may be slow to start, and the call must not keep the worker.
    if !state.call.handed_off {
        state.call.handed_off = hand_off_worker(deadline);
    }
    // Off the workers (handed off now, or started so): the default time
    // slice until the call ends (once; a thread-local read after that).
    if state.call.handed_off {
        crate::sched::long_call();
    }
    // Off the workers, long calls run at most a worker's count at once:
    // the others wait here, paused, so that however many loop together
    // they cannot take more than half the CPU from the workers.
    if state.call.handed_off && state.call.permit.is_none() {
        let tenant = state.scope().tenant.counts.clone();
        state.call.permit =
            Some(LongCalls::acquire(&tenant, deadline).ok_or(wasmtime::Trap::Interrupt)?);
    }
    let tenant = state.scope().tenant.clone();
    if let (Some(cpu), true) = (&tenant.meters.cpu, state.call.measured_to.is_some()) {
        state.call.measure();
        state.call.flush(Some(cpu));
        state.call.measured_to = Some(MeterClock::get().raw());
        // In debt: this call's thread (no longer a worker) sleeps until the
        // budget allows, or until the call's deadline.
        if let Some(ready) = cpu.ready_at() {
            if state.call.handed_off {
                let until = ready.min(deadline);
                std::thread::sleep(until.saturating_duration_since(Instant::now()));
                state.call.measured_to = Some(MeterClock::get().raw());
            }
        }
    }
    Ok(UpdateDeadline::Continue(1))
}

/// Lets the tokio worker running this thread go on elsewhere while this
/// thread keeps running the current (long) call; whether it did. Waits (the
/// call paused) until another thread has taken the worker over, or until
/// `deadline`. Does nothing outside a multi-thread runtime.
pub fn hand_off_worker(deadline: Instant) -> bool {
    let Ok(handle) = Handle::try_current() else {
        return false;
    };
    if handle.runtime_flavor() != RuntimeFlavor::MultiThread {
        return false;
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
        rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .is_ok()
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_starts_its_calls_off_the_worker_for_a_while_after_one_ran_long() {
        let hint = LongCallHint::default();
        assert!(!hint.start_off_worker(), "no call has run long yet");
        hint.ran_long();
        let off = (0..LongCallHint::CALLS)
            .filter(|_| hint.start_off_worker())
            .count();
        assert_eq!(off, LongCallHint::CALLS as usize);
        assert!(!hint.start_off_worker(), "back on the worker after that");
    }
}
