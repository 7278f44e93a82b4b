//! How the OS schedules the gateway's threads: a short time slice for the
//! threads that serve connections, the kernel's default one for a guest
//! call that runs long.
//!
//! Linux's fair scheduler (EEVDF, since 6.6) gives every runnable thread a
//! virtual deadline one time slice ahead. A thread that wakes (a worker with
//! a message to handle) preempts the one running only if its deadline is
//! earlier, so a thread running a long guest call keeps the core for up to
//! its whole slice (0.75 ms times 1 + log2 of the CPU count by default,
//! about 1.5 ms on two CPUs), then again, while the worker waits. On one
//! busy core that is what a well-behaved tenant's tail latency was made of
//! beside a tenant whose calls run for milliseconds (docs/performance.md,
//! "Neighbours under attack").
//!
//! Since Linux 6.12 a thread may ask for its own slice: `sched_setattr(2)`
//! with `SCHED_OTHER` and `sched_runtime` (clamped to 0.1-100 ms). A shorter
//! slice gives earlier deadlines, so the thread is picked sooner after it
//! wakes, but not a larger share of the CPU: that stays set by the nice
//! value, which is unchanged. So, unlike a lower priority for long calls
//! (tried: a lowered thread holding a lock the workers need made them
//! wait), nothing can be starved.
//!
//! - Every thread of the gateway's async runtime asks for [`SERVING_SLICE`]
//!   when it starts ([`serving`]).
//! - A guest call still running at its first epoch tick, handed off from
//!   its worker (plugin::deadline), goes back to the kernel's default slice
//!   for the rest of the call ([`long_call`]); its thread asks for the
//!   short one again when the call ends ([`CallScope`]). Calls shorter than
//!   a tick (nearly all) make no system call.
//!
//! Threads a runtime thread starts inherit its slice (Linux copies it), so
//! with `threads = 1` the gateway's helper threads (epoch ticker, file
//! watcher) get it too; that costs them nothing.
//!
//! No privileges are needed. On kernels before 6.12 the slice is ignored.
//! Where the system call fails (another OS, a seccomp filter answering
//! with an error) nothing is done, and the first failure is logged at
//! debug level. A filter that kills the process on calls it does not list
//! would kill the gateway at start: allow `sched_getscheduler`,
//! `getpriority` and `sched_setattr` (systemd's `@system-service` set
//! includes them, through `@resources`).

use std::cell::Cell;
use std::time::Duration;

/// The time slice the runtime's threads ask for: a worker woken by a
/// message waits at most about this long for a thread of equal weight
/// that is running a long call.
pub const SERVING_SLICE: Duration = Duration::from_micros(250);

thread_local! {
    /// This thread left the serving slice for a long call.
    static IN_LONG_CALL: Cell<bool> = const { Cell::new(false) };
}

/// Asks for [`SERVING_SLICE`] for the calling thread (a runtime thread
/// starting, or the thread that runs the runtime's main future).
pub fn serving() {
    set_slice(Some(SERVING_SLICE));
}

/// The calling thread is running a long guest call, handed off from its
/// worker: back to the kernel's default slice until [`call_ended`].
pub fn long_call() {
    if !IN_LONG_CALL.with(Cell::get) {
        IN_LONG_CALL.with(|c| c.set(true));
        set_slice(None);
    }
}

/// Restores the serving slice when dropped, if the guest call it was made
/// for left it ([`call_ended`]): held around every guest call and
/// instantiation, so that a call ending by a trap, an error or a panic
/// leaves its thread (which tokio may later make a worker) on the right
/// slice.
#[derive(Debug)]
pub struct CallScope(());

impl CallScope {
    /// A guest call starts on this thread.
    pub fn enter() -> CallScope {
        CallScope(())
    }
}

impl Drop for CallScope {
    fn drop(&mut self) {
        call_ended();
    }
}

/// A guest call on this thread ended: the serving slice again if the call
/// had left it (one thread-local read otherwise).
pub fn call_ended() {
    if IN_LONG_CALL.with(Cell::get) {
        IN_LONG_CALL.with(|c| c.set(false));
        serving();
    }
}

/// Sets the calling thread's time slice (`None`: the kernel's default),
/// keeping its policy and nice value. Only a fair policy (`SCHED_OTHER`,
/// `SCHED_BATCH`) has a slice: a thread an operator put under another
/// (`SCHED_IDLE`, a real-time one, with `chrt`) is left as it is.
#[cfg(target_os = "linux")]
fn set_slice(slice: Option<Duration>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    static REFUSED: AtomicBool = AtomicBool::new(false);
    if REFUSED.load(Ordering::Relaxed) {
        return;
    }
    // SAFETY: reads the calling thread's policy (0 names it).
    let raw = unsafe { libc::sched_getscheduler(0) };
    let reset_on_fork = raw >= 0 && raw & libc::SCHED_RESET_ON_FORK != 0;
    let policy = raw & !libc::SCHED_RESET_ON_FORK;
    if raw < 0 || (policy != libc::SCHED_OTHER && policy != libc::SCHED_BATCH) {
        return;
    }
    // SAFETY: getpriority reads the calling thread's nice value (which 0
    // names on Linux); -1 is also a valid value, and used as such.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    let attr = libc::sched_attr {
        size: std::mem::size_of::<libc::sched_attr>() as u32,
        sched_policy: policy as u32,
        // SCHED_FLAG_RESET_ON_FORK, kept if it was set.
        sched_flags: u64::from(reset_on_fork),
        sched_nice: nice,
        sched_priority: 0,
        sched_runtime: slice.map_or(0, |s| s.as_nanos() as u64),
        sched_deadline: 0,
        sched_period: 0,
    };
    // SAFETY: the calling thread (pid 0), a fully initialised attribute
    // block of the size it states.
    let r = unsafe {
        libc::syscall(
            libc::SYS_sched_setattr,
            0,
            &attr as *const libc::sched_attr,
            0,
        )
    };
    if r != 0 && !REFUSED.swap(true, Ordering::Relaxed) {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "sched_setattr refused: threads keep the default time slice"
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn set_slice(_slice: Option<Duration>) {}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The calling thread's `sched_runtime` (its slice, in nanoseconds).
    fn slice_now() -> u64 {
        let mut attr: libc::sched_attr = unsafe { std::mem::zeroed() };
        // SAFETY: the calling thread, a buffer of the size passed.
        let r = unsafe {
            libc::syscall(
                libc::SYS_sched_getattr,
                0,
                &mut attr as *mut libc::sched_attr,
                std::mem::size_of::<libc::sched_attr>() as u32,
                0,
            )
        };
        assert_eq!(r, 0, "sched_getattr: {}", std::io::Error::last_os_error());
        attr.sched_runtime
    }

    /// Whether the running kernel takes a thread's own slice (6.12+).
    fn kernel_takes_slices() -> bool {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut v = release
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse::<u32>().ok());
        (v.next().unwrap_or(0), v.next().unwrap_or(0)) >= (6, 12)
    }

    /// The serving slice as `sched_getattr` reports it.
    const SERVING_NS: u64 = SERVING_SLICE.as_nanos() as u64;

    /// Runs `check` on a thread of its own (whose scheduling it may
    /// change), unless the kernel predates per-thread slices.
    fn on_a_fresh_thread(check: impl FnOnce() + Send + 'static) {
        if !kernel_takes_slices() {
            eprintln!("skipped: this kernel has no per-thread slices (before 6.12)");
            return;
        }
        std::thread::spawn(check).join().expect("thread");
    }

    #[test]
    fn a_long_call_leaves_the_serving_slice_and_gets_it_back_when_it_ends() {
        on_a_fresh_thread(|| {
            let default = slice_now();
            serving();
            assert_eq!(slice_now(), SERVING_NS);
            long_call();
            assert_eq!(slice_now(), default, "the default slice for a long call");
            long_call();
            call_ended();
            assert_eq!(slice_now(), SERVING_NS);
            // A call that ends by unwinding gets it back too.
            let unwound = std::panic::catch_unwind(|| {
                let _scope = CallScope::enter();
                long_call();
                panic!("a host function panicked");
            });
            assert!(unwound.is_err());
            assert_eq!(slice_now(), SERVING_NS);
            // A call that stayed on its worker changes nothing.
            call_ended();
            assert_eq!(slice_now(), SERVING_NS);
        });
    }

    #[test]
    fn a_thread_under_sched_batch_keeps_its_policy_and_nice_value() {
        on_a_fresh_thread(|| {
            // SAFETY: the calling thread; priority 0 is the only one
            // SCHED_BATCH takes, and raising nice needs no privilege.
            unsafe {
                let param = libc::sched_param { sched_priority: 0 };
                assert_eq!(libc::sched_setscheduler(0, libc::SCHED_BATCH, &param), 0);
                assert_eq!(libc::setpriority(libc::PRIO_PROCESS, 0, 5), 0);
            }
            serving();
            assert_eq!(slice_now(), SERVING_NS);
            // SAFETY: reads the calling thread's policy and nice value.
            let (policy, nice) = unsafe {
                (
                    libc::sched_getscheduler(0),
                    libc::getpriority(libc::PRIO_PROCESS, 0),
                )
            };
            assert_eq!(policy, libc::SCHED_BATCH);
            assert_eq!(nice, 5);
        });
    }
}
