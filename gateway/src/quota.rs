//! Rate limits and usage meters: the token bucket behind every
//! per-second limit (inbound messages and bytes, sends, broadcast
//! deliveries, timers, log lines) and the CPU-time bucket behind a
//! tenant's `cpu_budget`.
//!
//! A [`Bucket`] holds up to one second's worth of tokens and refills
//! continuously: a client may burst to the rate, then is held to it on
//! average (the classic token bucket, as in RFC 2697's single-rate meter).
//! A [`CpuMeter`] is the same bucket counted in nanoseconds of guest time
//! and allowed to go into debt: a call is never cut short for the budget
//! (only `max_call_time` does that), but the tenant's next events wait
//! until the debt is repaid.
//!
//! The meters a tenant's connections share ([`SharedLimit`], [`CpuMeter`])
//! are one atomic word each, not a lock, and read a cheap clock
//! ([`MeterClock`]): they sit on the echo path of every metered call.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// A token bucket of `rate` tokens a second, holding at most `rate`.
#[derive(Debug)]
pub struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn new(rate: u64) -> Bucket {
        Bucket {
            tokens: rate as f64,
            last: Instant::now(),
        }
    }

    /// Whether fewer than `n` tokens are there now (refilled at `rate` a
    /// second), taking none.
    pub fn short_of(&mut self, n: u64, rate: u64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        let tokens = (self.tokens + elapsed * rate as f64).min(rate as f64);
        tokens < n as f64
    }

    /// Takes `n` tokens at `rate` a second if there are that many; false
    /// (taking nothing) if not.
    pub fn take(&mut self, n: u64, rate: u64, now: Instant) -> bool {
        let rate = rate as f64;
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * rate).min(rate);
        let n = n as f64;
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

/// A limit of `rate` a second shared by many connections (a tenant's), or
/// no limit. The same bucket as [`Bucket`] (a burst of up to one second's
/// worth, then the rate on average), kept in one atomic word so that the
/// connections of a tenant never wait on each other for it: it is the
/// generic cell rate algorithm (GCRA, ITU-T I.371), which stores the
/// "theoretical arrival time" at which the bucket would be full again
/// instead of a token count.
#[derive(Debug)]
pub struct SharedLimit {
    /// What one token stands for: 1/rate of a second, in nanoseconds
    /// (`None`: no limit).
    token_ns: Option<f64>,
    /// When the bucket is full again, in nanoseconds since `origin`.
    full_at: AtomicU64,
    origin: quanta::Instant,
}

/// One second, in nanoseconds: the burst a bucket allows.
const SECOND_NS: u64 = 1_000_000_000;

impl SharedLimit {
    /// A limit of `rate` a second (`None`: unlimited).
    pub fn new(rate: Option<u32>) -> SharedLimit {
        SharedLimit {
            token_ns: rate.map(|r| SECOND_NS as f64 / f64::from(r.max(1))),
            full_at: AtomicU64::new(0),
            origin: MeterClock::get().now(),
        }
    }

    /// Takes `n`; true if allowed (always, without a limit).
    pub fn take(&self, n: u64) -> bool {
        match self.token_ns {
            None => true,
            Some(token_ns) => self.take_at(n, token_ns, MeterClock::get().now()),
        }
    }

    fn take_at(&self, n: u64, token_ns: f64, now: quanta::Instant) -> bool {
        let now = nanos_since(self.origin, now);
        // Saturating (as casts from f64 do): a cost past a second is refused.
        let cost = (n as f64 * token_ns) as u64;
        self.full_at
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |full_at| {
                let next = full_at.max(now).saturating_add(cost);
                (next <= now.saturating_add(SECOND_NS)).then_some(next)
            })
            .is_ok()
    }

    /// Whether there is a limit.
    pub fn is_limited(&self) -> bool {
        self.token_ns.is_some()
    }
}

/// The clock of the meters and of guest-time measurement: `quanta`'s,
/// which reads the CPU's time-stamp counter where that is reliable (and
/// the system clock where not). A reading costs about 10 ns against about
/// 26 ns for the system clock on the machines measured, which matters on a
/// path that reads it twice per guest call.
pub struct MeterClock {
    clock: quanta::Clock,
    /// Raw ticks in [`FLUSH_GUEST_TIME`].
    flush_ticks: u64,
}

/// Guest time an instance measures before charging it to its tenant's
/// [`CpuMeter`] (and what is left is charged when the call runs past a
/// tick, or when the instance ends): one shared atomic update per 50 µs
/// of guest time instead of one per call.
pub const FLUSH_GUEST_TIME: Duration = Duration::from_micros(50);

impl MeterClock {
    /// The process's meter clock, calibrated on first use.
    pub fn get() -> &'static MeterClock {
        static CLOCK: std::sync::OnceLock<MeterClock> = std::sync::OnceLock::new();
        CLOCK.get_or_init(|| {
            let clock = quanta::Clock::new();
            let sample: u64 = 1 << 30;
            let ns = clock.delta_as_nanos(0, sample).max(1);
            let flush_ns = u128::from(u64::try_from(FLUSH_GUEST_TIME.as_nanos()).unwrap_or(0));
            let flush_ticks = u128::from(sample) * flush_ns / u128::from(ns);
            MeterClock {
                clock,
                flush_ticks: u64::try_from(flush_ticks).unwrap_or(u64::MAX).max(1),
            }
        })
    }

    /// Now.
    pub fn now(&self) -> quanta::Instant {
        self.clock.now()
    }

    /// A raw reading, for [`MeterClock::ticks_between`].
    pub fn raw(&self) -> u64 {
        self.clock.raw()
    }

    /// Raw ticks from `start` to `end` (0 if `end` is not after `start`).
    pub fn ticks_between(start: u64, end: u64) -> u64 {
        end.saturating_sub(start)
    }

    /// Raw ticks in `d` (at least 1).
    pub fn ticks_in(&self, d: Duration) -> u64 {
        // FLUSH_GUEST_TIME is the calibrated unit.
        let unit = u128::from(
            u64::try_from(FLUSH_GUEST_TIME.as_nanos())
                .unwrap_or(1)
                .max(1),
        );
        let ticks = u128::from(self.flush_ticks) * d.as_nanos() / unit;
        u64::try_from(ticks).unwrap_or(u64::MAX).max(1)
    }

    /// Whether `ticks` are worth charging now.
    pub fn due(&self, ticks: u64) -> bool {
        ticks >= self.flush_ticks
    }

    /// `ticks` as a duration.
    pub fn duration(&self, ticks: u64) -> Duration {
        Duration::from_nanos(self.clock.delta_as_nanos(0, ticks))
    }
}

impl std::fmt::Debug for MeterClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeterClock").finish_non_exhaustive()
    }
}

/// `at` in nanoseconds since `origin` (0 before it).
fn nanos_since(origin: quanta::Instant, at: quanta::Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(origin).as_nanos()).unwrap_or(u64::MAX)
}

/// Guest CPU time against a budget of `time` per `period`: a bucket of
/// `time` refilled over each `period`, which a call may overdraw.
///
/// Like [`SharedLimit`] it is one atomic word (GCRA): a call's `used` time
/// moves the moment the bucket is full again by `used × period / time`,
/// and the tenant is in debt while that moment is more than one `period`
/// ahead. Whether a tenant is in debt is a separate word, set by the charge
/// that overdraws and cleared by the first check after it is repaid, so
/// the check every event makes is one atomic load while the tenant is not
/// in debt.
#[derive(Debug)]
pub struct CpuMeter {
    /// Wall-clock nanoseconds of budget one nanosecond of guest time uses:
    /// `period / time`.
    scale: f64,
    period_ns: u64,
    /// When the bucket is full again, in nanoseconds since `origin`.
    full_at: AtomicU64,
    /// Until when the tenant is in debt, in nanoseconds since `origin`;
    /// 0 when it is not.
    debt_until: AtomicU64,
    origin: quanta::Instant,
}

impl CpuMeter {
    /// A meter allowing `time` of guest execution per `period`.
    pub fn new(time: Duration, period: Duration) -> CpuMeter {
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1);
        CpuMeter {
            scale: ns(period) as f64 / ns(time) as f64,
            period_ns: ns(period),
            full_at: AtomicU64::new(0),
            debt_until: AtomicU64::new(0),
            origin: MeterClock::get().now(),
        }
    }

    /// Counts `used` of guest time, ending at `now`.
    pub fn charge(&self, used: Duration, now: quanta::Instant) {
        let now = nanos_since(self.origin, now);
        // Saturating (as casts from f64 do).
        let cost = (used.as_nanos() as f64 * self.scale) as u64;
        let mut next = 0;
        let _ = self
            .full_at
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |full_at| {
                next = full_at.max(now).saturating_add(cost);
                Some(next)
            });
        if next > now.saturating_add(self.period_ns) {
            self.debt_until
                .fetch_max((next - self.period_ns).max(1), Ordering::Relaxed);
        }
    }

    /// Counts `ticks` of the [`MeterClock`] of guest time, ending now.
    pub fn charge_ticks(&self, ticks: u64) {
        let clock = MeterClock::get();
        self.charge(clock.duration(ticks), clock.now());
    }

    /// When the tenant may run again if it is in debt now; `None` if it may
    /// run now.
    pub fn ready_at(&self) -> Option<Instant> {
        let until = self.debt_until.load(Ordering::Relaxed);
        if until == 0 {
            return None;
        }
        let now = nanos_since(self.origin, MeterClock::get().now());
        if now >= until {
            // Repaid. A charge that overdrew again since stays.
            let _ =
                self.debt_until
                    .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed);
            return None;
        }
        Some(Instant::now() + Duration::from_nanos(until - now))
    }
}

/// Lets one log line of a kind through per second and counts the rest, so
/// that what clients or plugins can trigger again and again (refused
/// instances, dropped log lines) cannot flood the gateway's log.
#[derive(Debug, Default)]
pub struct LogThrottle {
    last: Mutex<Option<Instant>>,
    suppressed: std::sync::atomic::AtomicU64,
}

impl LogThrottle {
    /// `Some(n)` if a line may be logged now, `n` being how many were
    /// suppressed since the last one; `None` (counted) if not.
    pub fn admit(&self) -> Option<u64> {
        let now = Instant::now();
        let mut last = self.last.lock();
        if last.is_some_and(|at| now.duration_since(at) < Duration::from_secs(1)) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_a_burst_of_its_rate_then_refills_over_time() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10);
        assert!((0..10).all(|_| b.take(1, 10, t0)));
        assert!(!b.take(1, 10, t0));
        assert!(b.take(1, 10, t0 + Duration::from_millis(100)));
        assert!(!b.take(1, 10, t0 + Duration::from_millis(100)));
        // Never more than one second's worth saved up.
        assert!(b.take(10, 10, t0 + Duration::from_secs(60)));
        assert!(!b.take(1, 10, t0 + Duration::from_secs(60)));
    }

    #[test]
    fn a_shared_limit_allows_a_burst_of_its_rate_then_refills_over_time() {
        let l = SharedLimit::new(Some(10));
        let t0 = MeterClock::get().now();
        assert!((0..10).all(|_| l.take_at(1, 1e8, t0)));
        assert!(!l.take_at(1, 1e8, t0));
        assert!(l.take_at(1, 1e8, t0 + Duration::from_millis(100)));
        assert!(!l.take_at(1, 1e8, t0 + Duration::from_millis(100)));
        // Never more than one second's worth saved up.
        assert!(l.take_at(10, 1e8, t0 + Duration::from_secs(60)));
        assert!(!l.take_at(1, 1e8, t0 + Duration::from_secs(60)));
        assert!(!l.take_at(11, 1e8, t0 + Duration::from_secs(120)));
        assert!(SharedLimit::new(None).take(u64::MAX));
    }

    #[test]
    fn a_log_throttle_lets_one_line_a_second_through_and_counts_the_rest() {
        let t = LogThrottle::default();
        assert_eq!(t.admit(), Some(0));
        assert_eq!(t.admit(), None);
        assert_eq!(t.admit(), None);
        *t.last.lock() = Some(Instant::now() - Duration::from_secs(2));
        assert_eq!(t.admit(), Some(2));
    }

    #[test]
    fn a_cpu_meter_in_debt_says_when_the_debt_is_repaid() {
        let m = CpuMeter::new(Duration::from_millis(100), Duration::from_secs(1));
        assert!(m.ready_at().is_none());
        m.charge(Duration::from_millis(300), MeterClock::get().now());
        let at = m.ready_at().expect("in debt");
        let wait = at.saturating_duration_since(Instant::now());
        // 200 ms of debt at 100 ms/s: about 2 s.
        assert!(wait > Duration::from_millis(1900) && wait <= Duration::from_secs(2));
    }

    #[test]
    fn a_cpu_meter_allows_its_budget_in_a_burst_and_no_more() {
        let m = CpuMeter::new(Duration::from_millis(100), Duration::from_secs(1));
        let t0 = m.origin + Duration::from_secs(10);
        m.charge(Duration::from_millis(100), t0);
        assert!(
            m.debt_until.load(Ordering::Relaxed) == 0,
            "the full budget is not a debt"
        );
        m.charge(Duration::from_millis(1), t0);
        // 1 ms over at 100 ms/s: in debt for 10 ms.
        let until = m.debt_until.load(Ordering::Relaxed);
        assert_eq!(until, nanos_since(m.origin, t0 + Duration::from_millis(10)));
    }
}
