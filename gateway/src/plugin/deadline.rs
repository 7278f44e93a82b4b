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
//!    more wait, paused, for a place, first come first served: however
//!    many calls loop together, the workers keep about half the CPU, and
//!    one tenant's loops leave places for the others' long calls.
//! 4. At `max_call_time` (wall-clock, sleeps and waits included) it traps
//!    with [`wasmtime::Trap::Interrupt`].
//!
//! A call that runs long holds its worker until its first tick, up to 10
//! ms, and the connections queued on that worker wait as long. So once a
//! route's call has used 2 ms of CPU time by a tick, or 1 ms by the time
//! it ends, the route's next calls start handed off ([`LongCallHint`]): a
//! hand-off per call (tens of microseconds) for a route whose calls are
//! long anyway, and no worker held. Such a call waits for its place among
//! long calls before it starts, as a task ([`LongCalls::wait`]), rather
//! than paused on a thread of its own: a tenant's queue of long calls
//! holds no threads. One that waits `max_call_time` is not run, and its
//! connection is closed with 1011, as a call that waited for a place until
//! its deadline is.
//!
//! Calls are judged by the CPU time their thread used, not by the wall
//! clock ([`CpuMark`]): on a busy core the OS preempts a microsecond call
//! for milliseconds, and judged by the wall clock a well-behaved tenant's
//! calls were marked whenever a neighbour's long call ran beside them, and
//! then each paid a hand-off. A call the first tick catches microseconds
//! after it started does not mark its route either: under load some call
//! is running at nearly every tick, and marking every one of their routes
//! handed off most calls of a busy gateway (connection setup fell from
//! 7,800 to 1,100-2,700 a second).
//!
//! The wait as a task covers the calls into a connection's own instance: a
//! message (or fragment) from the client, a timer event, and `on-close`
//! (which is skipped, logged, if it waits `max_call_time`), also when the
//! connection is hibernated (the place is kept for `on-resume` and the
//! event's call). A call into a shared instance waits for its turn at the
//! instance as a task (plugin/shared.rs); a long call there that needs a
//! place waits for it on its thread, one at most per instance. An event
//! that moves a connection to a new version (once per reload) does not
//! wait as a task either. Waiting calls queue per tenant, the tenants in
//! order of their oldest waiting call, so that giving a place back costs
//! the number of tenants waiting rather than of calls waiting.
//!
//! Calls shorter than a tick (nearly all) pay next to nothing for this: the
//! callback never runs; a call reads a thread-local mark, and a busy
//! thread reads its CPU time at most once a millisecond. A current-thread
//! runtime (`threads = 1`) has no other worker
//! to hand to; there a long call holds the gateway until it ends or is
//! interrupted (and is not put to sleep).

use std::collections::{BTreeMap, VecDeque};
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

/// How much CPU time a call must have used by a tick to mark its route's
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
    /// The place was given before the call ([`CallClock::give_place`]):
    /// it is kept over the calls until [`CallClock::release_place`], not
    /// given back when a call ends.
    given: bool,
    /// Deadline callbacks the call has seen (the epoch ticks it ran into).
    ticks_seen: u32,
    /// When the call started, as a [`MeterClock`] reading.
    started: u64,
    /// The call has marked its route's next calls for starting handed off.
    marked: bool,
}

/// How much CPU time a handler call must have used when it ends to mark
/// its route's next calls for starting handed off: a call of a millisecond
/// held its worker all along (no tick came to hand it off). Measured
/// conservatively ([`CpuMark::used_since`]): a call is counted short by up
/// to [`CPU_MARK_EVERY`], so one marks its route once it has used between
/// 1 and 2 ms.
pub const LONG_CALL_AT_END: Duration = Duration::from_millis(1);

/// How often (at most) a thread that makes guest calls reads its CPU time
/// when a call starts ([`CpuMark`]).
const CPU_MARK_EVERY: Duration = Duration::from_millis(1);

/// The calling thread's CPU time (user and system), in nanoseconds; `None`
/// where the OS does not give it.
fn thread_cpu_ns() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        if rc != 0 {
            return None;
        }
        let secs = u64::try_from(ts.tv_sec).ok()?;
        let nanos = u64::try_from(ts.tv_nsec).ok()?;
        Some(secs.saturating_mul(1_000_000_000).saturating_add(nanos))
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// A recent reading of this thread's CPU time, taken when a call started
/// at most [`CPU_MARK_EVERY`] after the last one (a system call per
/// millisecond of a busy thread, not one per call): with it, a call that
/// looks long by the wall clock can be told from one whose thread the OS
/// preempted. Under contention on one core a neighbour's thread preempts a
/// microsecond call for milliseconds; judged by the wall clock, such a call
/// marked its route, and every call of a well-behaved tenant then paid a
/// hand-off (measured: the victim of `bench/neighbours.sh` marked 8 times
/// in 5 s beside `grow 60`, with 49 runtime threads left behind).
#[derive(Debug, Clone, Copy)]
struct CpuMark {
    /// When, as a [`MeterClock`] reading.
    at: u64,
    /// The thread's CPU time then, in nanoseconds.
    cpu_ns: u64,
}

thread_local! {
    static CPU_MARK: std::cell::Cell<Option<CpuMark>> = const { std::cell::Cell::new(None) };
}

impl CpuMark {
    /// Takes a new mark if the thread's is older than [`CPU_MARK_EVERY`]
    /// at `now` (a [`MeterClock`] reading).
    fn refresh(now: u64) {
        // Worked out once: this runs at the start of every call.
        static EVERY: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        let every = *EVERY.get_or_init(|| MeterClock::get().ticks_in(CPU_MARK_EVERY));
        CPU_MARK.with(|m| {
            if m.get()
                .is_none_or(|mark| now.saturating_sub(mark.at) >= every)
            {
                m.set(thread_cpu_ns().map(|cpu_ns| CpuMark { at: now, cpu_ns }));
            }
        });
    }

    /// The CPU time at least used by a call that started at `started` (a
    /// [`MeterClock`] reading) on this thread, which is still running on
    /// it: the thread's CPU time since the mark, less the wall-clock time
    /// from the mark to the call's start (more than the thread can have
    /// used then). `None` where the thread's CPU time is not known.
    fn used_since(started: u64) -> Option<Duration> {
        let mark = CPU_MARK.with(std::cell::Cell::get)?;
        let now = thread_cpu_ns()?;
        let clock = MeterClock::get();
        let before = clock.duration(MeterClock::ticks_between(mark.at, started));
        let used = Duration::from_nanos(now.saturating_sub(mark.cpu_ns));
        Some(used.saturating_sub(before))
    }
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
///
/// Calls wait first come, first served (in a queue per tenant), and a
/// freed place is handed directly to the oldest waiting call whose tenant
/// is under its share: one waiter is woken per place freed. (Waking every waiting call
/// to race for the place, as a condition variable's broadcast does, woke
/// dozens of threads at every long call's end under attack, and a victim's
/// worker on the same core waited behind them.)
#[derive(Debug)]
pub struct LongCalls(Arc<Counts>);

/// The places among long calls: how many are taken, how many there are,
/// and the calls waiting for one, in a queue per tenant.
///
/// Handing out a freed place looks at the oldest waiting call of each
/// tenant with calls waiting, so it costs the number of such tenants (set
/// by the config), not the number of waiting calls (up to every open
/// connection of a tenant whose calls all run long).
#[derive(Debug)]
struct Places {
    taken: usize,
    /// The most there are (0 until first used).
    max: usize,
    /// The waiting calls of each tenant (keyed by [`tenant_key`]), oldest
    /// first; a tenant is here only while it has calls waiting.
    queues: BTreeMap<usize, TenantQueue>,
    /// The tenants with calls waiting, by the number of their oldest.
    heads: BTreeMap<u64, usize>,
    /// The number the next waiter is known by (numbers only grow, so each
    /// tenant's queue is in order of them).
    next_waiter: u64,
}

/// One tenant's waiting calls.
#[derive(Debug)]
struct TenantQueue {
    tenant: Arc<Counts>,
    /// Oldest first; a cancelled wait stays (as [`Recipient::Gone`]) until
    /// it reaches the front, so that cancelling costs a binary search.
    waiters: VecDeque<Waiter>,
}

/// A call waiting for a place: its number, and where its place is sent.
#[derive(Debug)]
struct Waiter {
    id: u64,
    place: Recipient,
}

/// Where a waiting call's place is sent.
#[derive(Debug)]
enum Recipient {
    /// A call already running, paused in its epoch callback on its thread.
    Thread(mpsc::SyncSender<LongCalls>),
    /// A connection's task, waiting before it starts a call of a route
    /// whose calls run long ([`LongCalls::wait`]); gone if the task was.
    Task(tokio::sync::oneshot::Sender<LongCalls>),
    /// A wait that was cancelled (the call gave up or its task was
    /// dropped): skipped.
    Gone,
}

impl Recipient {
    /// Sends the place; a place the recipient can no longer take is
    /// dropped (given back) here, so call this without the lock held.
    fn send(self, place: LongCalls) {
        match self {
            Recipient::Thread(to) => drop(to.send(place)),
            Recipient::Task(to) => drop(to.send(place)),
            Recipient::Gone => drop(place),
        }
    }

    /// The waiting call is gone (cancelled, or its task dropped).
    fn is_gone(&self) -> bool {
        match self {
            Recipient::Thread(_) => false,
            Recipient::Task(to) => to.is_closed(),
            Recipient::Gone => true,
        }
    }
}

/// The key of a tenant's queue: the address of its counts, which stay
/// alive (held by the queue) while the tenant has calls waiting.
fn tenant_key(tenant: &Arc<Counts>) -> usize {
    Arc::as_ptr(tenant) as usize
}

static PLACES: parking_lot::Mutex<Places> = parking_lot::Mutex::new(Places {
    taken: 0,
    max: 0,
    queues: BTreeMap::new(),
    heads: BTreeMap::new(),
    next_waiter: 0,
});

impl Places {
    /// At most half the places (at least one) for one tenant.
    fn per_tenant(&self) -> usize {
        (self.max / 2).max(1)
    }

    /// Whether a call of `tenant` may take a place now.
    fn free_for(&self, tenant: &Counts) -> bool {
        self.taken < self.max && tenant.long_calls.load(Ordering::Relaxed) < self.per_tenant()
    }

    /// Takes a place for `tenant` (the caller checked [`Places::free_for`]).
    fn take(&mut self, tenant: &Arc<Counts>) -> LongCalls {
        self.taken += 1;
        tenant.long_calls.fetch_add(1, Ordering::Relaxed);
        LongCalls(tenant.clone())
    }

    /// Queues a call of `tenant` behind those that came first; returns its
    /// number.
    fn queue(&mut self, tenant: &Arc<Counts>, place: Recipient) -> u64 {
        let id = self.next_waiter;
        self.next_waiter += 1;
        let key = tenant_key(tenant);
        let queue = self.queues.entry(key).or_insert_with(|| TenantQueue {
            tenant: tenant.clone(),
            waiters: VecDeque::new(),
        });
        if queue.waiters.is_empty() {
            self.heads.insert(id, key);
        }
        queue.waiters.push_back(Waiter { id, place });
        id
    }

    /// Takes the wait numbered `id` of the tenant keyed `key` out of the
    /// queue; false if it is not there (it was given its place).
    fn cancel(&mut self, key: usize, id: u64) -> bool {
        let Some(queue) = self.queues.get_mut(&key) else {
            return false;
        };
        let Ok(i) = queue.waiters.binary_search_by_key(&id, |w| w.id) else {
            return false;
        };
        if matches!(queue.waiters[i].place, Recipient::Gone) {
            return false;
        }
        queue.waiters[i].place = Recipient::Gone;
        if i == 0 {
            self.settle(key);
        }
        true
    }

    /// Drops the cancelled waits at the front of a tenant's queue, and
    /// files the tenant under its new oldest call (or not at all).
    fn settle(&mut self, key: usize) {
        let Some(queue) = self.queues.get_mut(&key) else {
            return;
        };
        if let Some(front) = queue.waiters.front() {
            self.heads.remove(&front.id);
        }
        while queue.waiters.front().is_some_and(|w| w.place.is_gone()) {
            queue.waiters.pop_front();
        }
        match queue.waiters.front() {
            Some(front) => {
                self.heads.insert(front.id, key);
            }
            None => {
                self.queues.remove(&key);
            }
        }
    }

    /// Hands the free places to the oldest waiting calls that may take
    /// them; returns the places with where each is to be sent (sent once
    /// the lock is released).
    fn grant(&mut self) -> Vec<(LongCalls, Recipient)> {
        let mut granted = Vec::new();
        while self.taken < self.max {
            // The tenant of the oldest call that may take a place.
            let next = self.heads.values().copied().find(|key| {
                self.queues
                    .get(key)
                    .is_some_and(|q| self.free_for(&q.tenant))
            });
            let Some(key) = next else {
                break;
            };
            let Some(queue) = self.queues.get_mut(&key) else {
                break;
            };
            let tenant = queue.tenant.clone();
            let waiter = queue
                .waiters
                .front_mut()
                .map(|w| std::mem::replace(&mut w.place, Recipient::Gone));
            self.settle(key);
            match waiter {
                Some(to) if !to.is_gone() => granted.push((self.take(&tenant), to)),
                _ => {}
            }
        }
        granted
    }

    /// How many calls wait (cancelled ones not counted).
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.queues
            .values()
            .flat_map(|q| q.waiters.iter())
            .filter(|w| !w.place.is_gone())
            .count()
    }
}

impl LongCalls {
    /// Takes a free place for `tenant`, or queues a waiter that `place`
    /// makes (given its number) and returns `Err` with that number.
    fn take_or_queue(
        tenant: &Arc<Counts>,
        place: impl FnOnce() -> Recipient,
    ) -> Result<LongCalls, u64> {
        let mut places = PLACES.lock();
        if places.max == 0 {
            // At least two, so that half of them for one tenant still
            // leaves one for the others on a one-worker runtime.
            places.max = Handle::try_current()
                .map(|h| h.metrics().num_workers())
                .unwrap_or(1)
                .max(2);
        }
        // Every free place was given to a waiting call that could take it,
        // so one free now is not owed to a call that came first.
        if places.free_for(tenant) {
            return Ok(places.take(tenant));
        }
        Err(places.queue(tenant, place()))
    }

    /// Waits, without holding a thread, for a place for the next call of
    /// `tenant`, in turn behind the calls that came first: for a
    /// connection's task before it starts a call of a route whose calls run
    /// long, so that a queue of such calls is a queue of tasks rather than
    /// of paused threads (each call handed off holds one). Cancelled by
    /// dropping the future. `None` only if the place could not be sent.
    pub async fn wait(tenant: Arc<Counts>) -> Option<LongCalls> {
        let (place, given) = tokio::sync::oneshot::channel();
        match LongCalls::take_or_queue(&tenant, || Recipient::Task(place)) {
            Ok(p) => Some(p),
            Err(id) => {
                // Cancelled (the future dropped): out of the queue at once.
                let _queued = Queued(tenant_key(&tenant), id);
                given.await.ok()
            }
        }
    }

    /// Takes a place for a call of the tenant whose counts are `tenant`,
    /// waiting (in turn, behind the calls that came first) until one is
    /// given to it or until `deadline`.
    fn acquire(tenant: &Arc<Counts>, deadline: Instant) -> Option<LongCalls> {
        let (place, given) = mpsc::sync_channel(1);
        let id = match LongCalls::take_or_queue(tenant, || Recipient::Thread(place)) {
            Ok(p) => return Some(p),
            Err(id) => id,
        };
        match given.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(p) => Some(p),
            Err(_) => {
                if PLACES.lock().cancel(tenant_key(tenant), id) {
                    return None;
                }
                // Given a place just as the wait ended: it is on its way.
                given.recv().ok()
            }
        }
    }
}

/// A task's place in the queue of calls waiting for a place (its tenant's
/// key and its number): taken out of the queue when dropped (nothing is
/// left to take once it was given its place).
struct Queued(usize, u64);

impl Drop for Queued {
    fn drop(&mut self) {
        PLACES.lock().cancel(self.0, self.1);
    }
}

impl Drop for LongCalls {
    fn drop(&mut self) {
        let mut places = PLACES.lock();
        places.taken -= 1;
        self.0.long_calls.fetch_sub(1, Ordering::Relaxed);
        let granted = places.grant();
        drop(places);
        for (place, to) in granted {
            to.send(place);
        }
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
        self.marked = false;
        let clock = MeterClock::get();
        self.started = clock.raw();
        CpuMark::refresh(self.started);
        self.measured_to = metered.then_some(self.started);
        first
    }

    /// The call has ended: gives back its place among long calls, and
    /// measures its guest time for `meter` (the tenant's CPU budget, if it
    /// has one), charging what was measured once there is enough of it.
    /// Returns how long the call took (wall-clock, from [`CallClock::arm`]).
    pub fn ended(&mut self, meter: Option<&CpuMeter>) -> Duration {
        if !self.given {
            self.permit = None;
        }
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

    /// Whether the running call has run long enough to mark its route
    /// (once per call): it has run `threshold` by the wall clock and,
    /// where the thread's CPU time is known, used that much CPU time
    /// (a preempted call has not).
    pub fn ran_long(&mut self, threshold: Duration) -> bool {
        if self.marked {
            return false;
        }
        let clock = MeterClock::get();
        let ran = clock.duration(MeterClock::ticks_between(self.started, clock.raw()));
        if ran < threshold {
            return false;
        }
        self.marked = CpuMark::used_since(self.started).is_none_or(|used| used >= threshold);
        self.marked
    }

    /// Whether the call that just ended ([`CallClock::ended`]) used
    /// [`LONG_CALL_AT_END`] of CPU time without being marked at a tick: it
    /// held its worker all along.
    pub fn ended_long(&mut self) -> bool {
        self.ran_long(LONG_CALL_AT_END)
    }

    /// Whether the next call is to wait for a place among long calls
    /// before it starts ([`LongCalls::wait`]): its route's calls run long
    /// (`hint`), it holds no place yet, and the runtime hands long calls
    /// off (a multi-thread one).
    pub fn wants_place(&self, hint: &LongCallHint) -> bool {
        self.permit.is_none() && hint.calls_wait_for_places()
    }

    /// Holds `place` for the next calls (an event's, and the `on-resume`
    /// before it when the event resumes a hibernated connection), until
    /// [`CallClock::release_place`].
    pub fn give_place(&mut self, place: LongCalls) {
        self.permit = Some(place);
        self.given = true;
    }

    /// Gives back a place given with [`CallClock::give_place`], once the
    /// event it was for has been handled (or did not happen).
    pub fn release_place(&mut self) {
        self.permit = None;
        self.given = false;
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
/// calls went. A call that used 2 ms of CPU time by a tick held its worker
/// (and the connections queued on it) until that tick, and one that used
/// 1 ms by its end held it all along; on a route whose calls run that
/// long, the next ones are handed off before they start instead, which
/// costs a thread hand-off per call (tens of microseconds) but never holds
/// a worker. A route whose calls stop running long returns to running
/// them on the worker after [`LongCallHint::CALLS`] calls.
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

    /// Whether the route's calls start off the worker now (not counted).
    pub fn is_marked(&self) -> bool {
        self.0.load(Ordering::Relaxed) != 0
    }

    /// Whether the route's next call is to wait for a place among long
    /// calls before it starts ([`LongCalls::wait`]): its calls run long,
    /// and the runtime hands long calls off (a multi-thread one).
    pub fn calls_wait_for_places(&self) -> bool {
        self.is_marked()
            && Handle::try_current().is_ok_and(|h| h.runtime_flavor() == RuntimeFlavor::MultiThread)
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
    // A call that has used LONG_CALL of CPU time by a tick ran long; one
    // the tick caught just after it started, or whose thread the OS
    // preempted, did not (checked again at the next tick).
    if state.call.ran_long(LONG_CALL) {
        tracing::debug!(tenant = %state.scope().tenant.name, route = %state.scope().route, conn = state.conn_id(), ticks = state.call.ticks_seen, "a call used 2 ms of CPU time by a tick: the route's next calls start handed off");
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

    /// Waits (the test's thread) until `n` calls wait for a place.
    fn until_waiting(n: usize) {
        let give_up = Instant::now() + Duration::from_secs(10);
        while PLACES.lock().waiting() != n {
            assert!(Instant::now() < give_up, "{n} waiters expected");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_freed_long_call_place_goes_to_the_oldest_waiting_call_its_tenant_allows() {
        // Outside a runtime there are two places, one per tenant.
        let (a, b, c) = (
            Arc::new(Counts::default()),
            Arc::new(Counts::default()),
            Arc::new(Counts::default()),
        );
        let far = Instant::now() + Duration::from_secs(30);
        let a1 = LongCalls::acquire(&a, far).expect("a free place");
        let b1 = LongCalls::acquire(&b, far).expect("the second place");
        // Tenant a is at its share, and every place is taken.
        assert!(LongCalls::acquire(&a, Instant::now() + Duration::from_millis(20)).is_none());
        assert!(
            PLACES.lock().waiting() == 0,
            "a timed-out call leaves the queue"
        );
        let (tx, rx) = mpsc::channel();
        // Each waiter reports its name once it has a place, and holds the
        // place until the test releases it.
        let spawn_waiter = |name: &'static str, tenant: &Arc<Counts>| {
            let (tenant, tx) = (tenant.clone(), tx.clone());
            let (release, released) = mpsc::channel::<()>();
            let thread = std::thread::spawn(move || {
                let place = LongCalls::acquire(&tenant, far);
                tx.send(name).expect("report");
                let _ = released.recv();
                drop(place);
            });
            (thread, release)
        };
        let a2 = spawn_waiter("a2", &a);
        until_waiting(1);
        let c1 = spawn_waiter("c1", &c);
        until_waiting(2);
        let c2 = spawn_waiter("c2", &c);
        until_waiting(3);
        let next = || rx.recv_timeout(Duration::from_secs(10));
        // b's place freed: a2 came first but a is at its share; c1 is next.
        drop(b1);
        assert_eq!(next(), Ok("c1"));
        // a's place freed: a2 takes it; c2 waits (c is at its share).
        drop(a1);
        assert_eq!(next(), Ok("a2"));
        assert_eq!(PLACES.lock().waiting(), 1, "c2 still waits");
        // One thread woken per place: c2 gets the place c1 gives back.
        c1.1.send(()).expect("release c1");
        assert_eq!(next(), Ok("c2"));
        for (thread, release) in [a2, c1, c2] {
            let _ = release.send(());
            thread.join().expect("waiter");
        }
        // A task waits in the same queue, and a cancelled wait leaves it.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let a1 = LongCalls::acquire(&a, far).expect("a free place");
            let b1 = LongCalls::acquire(&b, far).expect("the second place");
            let cancelled =
                tokio::time::timeout(Duration::from_millis(20), LongCalls::wait(c.clone())).await;
            assert!(cancelled.is_err(), "no place was free");
            assert!(
                PLACES.lock().waiting() == 0,
                "a cancelled wait leaves the queue"
            );
            let waiting = tokio::spawn(LongCalls::wait(c.clone()));
            while PLACES.lock().waiting() != 1 {
                tokio::task::yield_now().await;
            }
            drop(a1);
            let place = waiting.await.expect("task").expect("a place");
            drop((place, b1));

            // Several calls of one tenant wait; one in the middle of the
            // queue is cancelled and skipped, and another tenant's call
            // behind them gets a place its own tenant allows.
            let a1 = LongCalls::acquire(&a, far).expect("a free place");
            let a_over = LongCalls::acquire(&a, Instant::now() + Duration::from_millis(1));
            assert!(a_over.is_none(), "a is at its share");
            let b1 = LongCalls::acquire(&b, far).expect("the second place");
            let mut c_waits = Vec::new();
            for n in 1..=3 {
                c_waits.push(tokio::spawn(LongCalls::wait(c.clone())));
                while PLACES.lock().waiting() != n {
                    tokio::task::yield_now().await;
                }
            }
            let a2 = tokio::spawn(LongCalls::wait(a.clone()));
            while PLACES.lock().waiting() != 4 {
                tokio::task::yield_now().await;
            }
            c_waits[1].abort();
            while PLACES.lock().waiting() != 3 {
                tokio::task::yield_now().await;
            }
            let mut c_waits = c_waits.into_iter();
            let (c1, _, c3) = (c_waits.next(), c_waits.next(), c_waits.next());
            drop(b1);
            let c1 = c1.expect("c1").await.expect("task").expect("c1's place");
            // c is at its share now and a still is: nothing more is given.
            assert_eq!(PLACES.lock().waiting(), 2);
            drop(c1);
            let c3 = c3.expect("c3").await.expect("task").expect("c3's place");
            drop(a1);
            let a2 = a2.await.expect("task").expect("a2's place");
            drop((a2, c3));
            assert!(PLACES.lock().queues.is_empty() && PLACES.lock().heads.is_empty());
        });
        assert_eq!(PLACES.lock().taken, 0);
    }

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
