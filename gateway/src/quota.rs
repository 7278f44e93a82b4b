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

/// A bucket that may be absent (no limit), shared behind a lock.
#[derive(Debug)]
pub struct SharedLimit {
    rate: Option<u64>,
    bucket: Mutex<Bucket>,
}

impl SharedLimit {
    /// A limit of `rate` a second (`None`: unlimited).
    pub fn new(rate: Option<u32>) -> SharedLimit {
        let rate = rate.map(u64::from);
        SharedLimit {
            rate,
            bucket: Mutex::new(Bucket::new(rate.unwrap_or(0))),
        }
    }

    /// Takes `n`; true if allowed (always, without a limit).
    pub fn take(&self, n: u64) -> bool {
        match self.rate {
            None => true,
            Some(rate) => self.bucket.lock().take(n, rate, Instant::now()),
        }
    }

    /// Whether there is a limit.
    pub fn is_limited(&self) -> bool {
        self.rate.is_some()
    }
}

/// Guest CPU time against a budget of `time` per `period`.
#[derive(Debug)]
pub struct CpuMeter {
    /// Nanoseconds of budget refilled per second.
    refill: f64,
    /// The most that can be saved up: one period's budget, in nanoseconds.
    cap: f64,
    state: Mutex<(f64, Instant)>,
}

impl CpuMeter {
    /// A meter allowing `time` of guest execution per `period`.
    pub fn new(time: Duration, period: Duration) -> CpuMeter {
        let cap = time.as_nanos() as f64;
        CpuMeter {
            refill: cap / period.as_secs_f64().max(1e-9),
            cap,
            state: Mutex::new((cap, Instant::now())),
        }
    }

    fn refilled(&self, state: &mut (f64, Instant), now: Instant) {
        let elapsed = now.saturating_duration_since(state.1).as_secs_f64();
        state.0 = (state.0 + elapsed * self.refill).min(self.cap);
        state.1 = now;
    }

    /// Counts `used` of guest time.
    pub fn charge(&self, used: Duration) {
        let mut s = self.state.lock();
        self.refilled(&mut s, Instant::now());
        s.0 -= used.as_nanos() as f64;
    }

    /// When the tenant may run again if it is in debt now; `None` if it may
    /// run now.
    pub fn ready_at(&self) -> Option<Instant> {
        let now = Instant::now();
        let mut s = self.state.lock();
        self.refilled(&mut s, now);
        (s.0 < 0.0).then(|| now + Duration::from_secs_f64(-s.0 / self.refill))
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
        use std::sync::atomic::Ordering;
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
        m.charge(Duration::from_millis(300));
        let at = m.ready_at().expect("in debt");
        let wait = at.saturating_duration_since(Instant::now());
        // 200 ms of debt at 100 ms/s: about 2 s.
        assert!(wait > Duration::from_millis(1900) && wait <= Duration::from_secs(2));
    }
}
