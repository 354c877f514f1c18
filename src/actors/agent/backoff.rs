//! Exponential backoff with jitter, for the Session's reconnection attempts and the
//! supervisor's restarts of a failed Session or dialer.
//!
//! The delay doubles from a first value up to a cap, and each delay is drawn uniformly from the
//! upper half of that value, so a fleet of agents that lost the same hub does not come back in
//! step. It owns no timer: callers schedule the delay they are given.

use std::time::Duration;

/// A backoff sequence. `next` gives the delay before the next attempt; `reset` after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    cap: Duration,
    attempts: u32,
}

impl Backoff {
    /// A sequence starting at `first` and never exceeding `cap`.
    pub const fn new(first: Duration, cap: Duration) -> Backoff {
        Backoff {
            first,
            cap,
            attempts: 0,
        }
    }

    /// The delay before the next attempt, bounded by the sequence's cap.
    pub fn next_delay(&mut self) -> Duration {
        self.next_delay_capped(self.cap)
    }

    /// The delay before the next attempt, bounded by `cap` as well (used to retry quickly
    /// during the first moments of an outage).
    pub fn next_delay_capped(&mut self, cap: Duration) -> Duration {
        let ceiling = self
            .first
            .saturating_mul(1u32 << self.attempts.min(16))
            .min(self.cap)
            .min(cap);
        self.attempts = self.attempts.saturating_add(1);
        jitter(ceiling)
    }

    /// Attempts since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Starts the sequence over (after a success).
    pub fn reset(&mut self) {
        self.attempts = 0;
    }
}

/// A delay drawn uniformly from `[ceiling / 2, ceiling]`.
pub fn jitter(ceiling: Duration) -> Duration {
    let half = ceiling / 2;
    half + half.mul_f64(rand::random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_within_the_upper_half() {
        let mut b = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
        let mut ceiling = Duration::from_millis(250);
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(
                d >= ceiling / 2 && d <= ceiling,
                "{d:?} outside {ceiling:?}"
            );
            ceiling = (ceiling * 2).min(Duration::from_secs(30));
        }
        assert!(b.next_delay() <= Duration::from_secs(30));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(250));
    }

    #[test]
    fn delays_are_jittered() {
        let delays: std::collections::BTreeSet<Duration> = (0..50)
            .map(|_| Backoff::new(Duration::from_secs(1), Duration::from_secs(30)).next_delay())
            .collect();
        assert!(delays.len() > 10, "no jitter: {delays:?}");
    }

    #[test]
    fn a_tighter_cap_bounds_the_delay() {
        let mut b = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
        for _ in 0..10 {
            assert!(b.next_delay_capped(Duration::from_secs(4)) <= Duration::from_secs(4));
        }
        assert!(b.next_delay() > Duration::from_secs(4));
    }
}
