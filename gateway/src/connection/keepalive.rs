//! Keepalive (RFC 6455 section 5.5.2): when the peer last sent, when we
//! last wrote, an outstanding ping, and what is due when the connection's
//! task wakes: a ping, dropping a peer that missed its pong, or closing an
//! idle connection.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::Limits;

/// Keepalive bookkeeping: when the peer last sent, when we last wrote, and
/// an outstanding ping.
pub struct Keepalive {
    last_rx: Instant,
    last_tx: Instant,
    /// Something was written since the last wake-up (folded into `last_tx`
    /// then, so that writing costs no clock read).
    wrote: bool,
    ping_sent: Option<Instant>,
}

/// What keepalive asks for when the session wakes.
pub enum Due {
    /// Nothing is due.
    Nothing,
    /// Send a ping.
    Ping,
    /// A ping went unanswered for `pong_timeout`: drop the connection.
    NoPong,
    /// Nothing in either direction for `idle_timeout`: close with 1001.
    Idle,
}

impl Keepalive {
    /// Bookkeeping for a connection that opened at `now`.
    pub fn new(now: Instant) -> Keepalive {
        Keepalive {
            last_rx: now,
            last_tx: now,
            wrote: false,
            ping_sent: None,
        }
    }

    /// A frame (or an error) arrived from the peer.
    pub fn received(&mut self, now: Instant) {
        self.last_rx = now;
        self.ping_sent = None;
    }

    /// Bytes were written to the peer.
    pub fn wrote(&mut self) {
        self.wrote = true;
    }

    /// Checks the deadlines at `now`.
    pub fn due(&mut self, limits: &Limits, now: Instant) -> Due {
        if std::mem::take(&mut self.wrote) {
            self.last_tx = now;
        }
        if let Some(sent) = self.ping_sent {
            if now >= sent + limits.pong_timeout {
                return Due::NoPong;
            }
        } else if let Some(every) = limits.ping_interval {
            if now >= self.last_rx + every {
                self.ping_sent = Some(now);
                return Due::Ping;
            }
        }
        if let Some(idle) = limits.idle_timeout {
            if now >= self.last_rx.max(self.last_tx) + idle {
                return Due::Idle;
            }
        }
        Due::Nothing
    }

    /// When the session must next wake up with no I/O while open: a ping, a
    /// pong deadline or the idle timeout (at most an hour from `now`).
    pub fn next_deadline(&self, limits: &Limits, now: Instant) -> Instant {
        let mut next = now + Duration::from_secs(3600);
        match self.ping_sent {
            Some(sent) => next = next.min(sent + limits.pong_timeout),
            None => {
                if let Some(every) = limits.ping_interval {
                    next = next.min(self.last_rx + every);
                }
            }
        }
        if let Some(idle) = limits.idle_timeout {
            // Wake at the idle deadline by what we know was received; writes
            // are checked when we wake.
            next = next.min(self.last_rx.max(self.last_tx) + idle);
        }
        next
    }
}
