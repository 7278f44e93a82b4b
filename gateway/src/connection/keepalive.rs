//! Keepalive (RFC 6455 section 5.5.2): when the peer last sent, when data
//! last moved, an outstanding ping, and what is due when the connection's
//! task wakes: a ping, dropping a peer that missed its pong, or closing an
//! idle connection.
//!
//! Two clocks, for two questions. Is the peer still there? Any frame from
//! it counts, pongs included; pings are sent to a peer that has been
//! silent for `ping_interval`. Is the connection idle? Only data messages
//! count, in either direction: a client that answers pings but never sends
//! or receives a message is idle, and `idle_timeout` closes it.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::Limits;

/// Keepalive bookkeeping: when the peer last sent any frame, when a data
/// message last moved either way, and an outstanding ping.
pub struct Keepalive {
    last_rx: Instant,
    last_data: Instant,
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
    /// No data message in either direction for `idle_timeout`: close with
    /// 1001.
    Idle,
}

impl Keepalive {
    /// Bookkeeping for a connection that opened at `now`.
    pub fn new(now: Instant) -> Keepalive {
        Keepalive {
            last_rx: now,
            last_data: now,
            ping_sent: None,
        }
    }

    /// A frame (or an error) arrived from the peer.
    pub fn received(&mut self, now: Instant) {
        self.last_rx = now;
        self.ping_sent = None;
    }

    /// A data message moved at `now`: one arrived (a data frame), or one
    /// was queued for the peer.
    pub fn data(&mut self, now: Instant) {
        self.last_data = now;
    }

    /// Checks the deadlines at `now`.
    pub fn due(&mut self, limits: &Limits, now: Instant) -> Due {
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
            if now >= self.last_data + idle {
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
            next = next.min(self.last_data + idle);
        }
        next
    }
}
