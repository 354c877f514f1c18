//! Heartbeat timing of the tunnel, the same on both ends so that either side notices a silent
//! peer within [`DETECTION_BOUND`].
//!
//! Each side pings every [`PING_EVERY`], answers every ping with a pong, counts any frame as a
//! sign of life, and checks every [`CHECK_EVERY`] whether it has heard nothing for longer than
//! [`DEAD_AFTER`]. The last frame from a peer that froze at time T arrived at or before T, so the
//! first check that sees the silence runs no later than T + DEAD_AFTER + CHECK_EVERY.

use std::time::Duration;

/// How often each side pings the other.
pub const PING_EVERY: Duration = Duration::from_secs(3);
/// Silence after which the peer is taken for dead (more than three missed pings).
pub const DEAD_AFTER: Duration = Duration::from_secs(10);
/// How often each side checks for silence.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);
/// The promise: a peer that stops answering is noticed within this time.
pub const DETECTION_BOUND: Duration = Duration::from_secs(15);

// Detection takes at most DEAD_AFTER + CHECK_EVERY; a ping must come well inside DEAD_AFTER so
// that a live but idle peer is never taken for dead.
const _: () = assert!(
    DEAD_AFTER.as_millis() + CHECK_EVERY.as_millis() <= DETECTION_BOUND.as_millis()
        && 3 * PING_EVERY.as_millis() <= DEAD_AFTER.as_millis()
);

/// Whether a peer last heard `silent_for` ago counts as dead.
pub fn is_dead(silent_for: Duration) -> bool {
    silent_for > DEAD_AFTER
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replays a frozen peer: frames stop at `frozen_at` (the last one arrived then, at worst
    /// just after a check), checks run every CHECK_EVERY from an arbitrary phase; the first
    /// check that sees the silence must come within DETECTION_BOUND of the freeze.
    #[test]
    fn a_frozen_peer_is_noticed_within_the_bound() {
        let step = Duration::from_millis(50);
        let mut worst = Duration::ZERO;
        let mut phase = Duration::ZERO;
        while phase < CHECK_EVERY {
            let frozen_at = Duration::from_secs(100);
            let last_heard = frozen_at;
            let mut check = phase;
            while check <= frozen_at || !is_dead(check - last_heard) {
                check += CHECK_EVERY;
            }
            worst = worst.max(check - frozen_at);
            phase += step;
        }
        assert!(worst <= DETECTION_BOUND, "worst case {worst:?}");
        assert!(worst > DEAD_AFTER, "worst case {worst:?}");
    }

    #[test]
    fn a_live_idle_peer_is_never_taken_for_dead() {
        // Between two pongs at most PING_EVERY (plus a round trip) passes.
        assert!(!is_dead(PING_EVERY + Duration::from_secs(2)));
    }
}
