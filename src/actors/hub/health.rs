//! Live health of one connected agent, shared between its AgentSession (which writes it as
//! frames and answers arrive) and the Registry (which reads it to route and to report).
//!
//! Plain counters behind atomics, so that routing never waits for a session to answer a
//! question. The in-flight count is kept by [`InFlight`] tickets: the registry takes one for
//! every request it routes and the ticket travels with the request; however the request ends
//! (answered, expired, failed, re-routed, or dropped with a stopped session), dropping the
//! ticket gives the slot back. It holds no secret and no request content.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::messages::liveness::PING_EVERY;

/// Silence after which an agent counts as having missed a heartbeat: it pings every
/// [`PING_EVERY`] and answers the hub's pings, so a live agent is heard at least that often.
/// Such an agent gets no new request until it is heard again; the session drops it for good
/// only after [`crate::messages::liveness::DEAD_AFTER`].
pub const SILENT_AFTER: Duration = Duration::from_secs(2 * PING_EVERY.as_secs());

/// How the registry sees an agent right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Heard recently: requests are routed to it.
    #[default]
    Healthy,
    /// Silent for longer than [`SILENT_AFTER`]: no request is routed to it until it is heard
    /// again.
    Silent,
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Health::Healthy => "healthy",
            Health::Silent => "SILENT (missed heartbeats)",
        })
    }
}

/// Counters of one agent session.
#[derive(Debug, Default)]
pub struct AgentHealth {
    in_flight: AtomicUsize,
    answered: AtomicU64,
    failed: AtomicU64,
    /// When a frame from the agent last arrived (ms since the epoch; 0 = never).
    last_heard_unix_ms: AtomicU64,
    /// Round trip of the latest answered ping, in µs (0 = none yet).
    rtt_micros: AtomicU64,
}

impl AgentHealth {
    /// Fresh counters of an agent heard just now.
    pub fn new() -> Arc<AgentHealth> {
        let health = AgentHealth::default();
        health.heard(SystemTime::now());
        Arc::new(health)
    }

    /// Requests routed to the agent and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Requests the agent answered (whatever the SCIM status, or its own typed error).
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    /// Requests that ended without the agent's answer (hub deadline, session lost).
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Round trip of the latest answered ping.
    pub fn rtt_micros(&self) -> Option<u64> {
        Some(self.rtt_micros.load(Ordering::Relaxed)).filter(|us| *us > 0)
    }

    /// When the agent was last heard (ms since the epoch).
    pub fn last_heard_unix_ms(&self) -> u64 {
        self.last_heard_unix_ms.load(Ordering::Relaxed)
    }

    /// A frame arrived from the agent at `at`.
    pub fn heard(&self, at: SystemTime) {
        self.last_heard_unix_ms
            .store(unix_ms(at), Ordering::Relaxed);
    }

    /// A ping came back after `micros` (at least 1, so that "none yet" stays distinct).
    pub fn set_rtt(&self, micros: u64) {
        self.rtt_micros.store(micros.max(1), Ordering::Relaxed);
    }

    pub fn count_answered(&self) {
        self.answered.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }

    /// Healthy or silent, as of `now`.
    pub fn health(&self, now: SystemTime) -> Health {
        let silent = unix_ms(now).saturating_sub(self.last_heard_unix_ms());
        if silent > SILENT_AFTER.as_millis() as u64 {
            Health::Silent
        } else {
            Health::Healthy
        }
    }
}

/// One routed request's claim on its agent's in-flight count; released when dropped.
#[derive(Debug)]
pub struct InFlight(Arc<AgentHealth>);

impl InFlight {
    /// Counts one more request in flight on `health`'s agent.
    pub fn take(health: &Arc<AgentHealth>) -> InFlight {
        health.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(health.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_count_requests_in_flight_however_they_end() {
        let health = AgentHealth::new();
        let a = InFlight::take(&health);
        let b = InFlight::take(&health);
        assert_eq!(health.in_flight(), 2);
        drop(a);
        assert_eq!(health.in_flight(), 1);
        // A ticket inside a message that is never delivered is released with the message.
        let lost = vec![b];
        drop(lost);
        assert_eq!(health.in_flight(), 0);
    }

    #[test]
    fn an_agent_not_heard_for_two_pings_is_silent() {
        let health = AgentHealth::new();
        let now = SystemTime::now();
        assert_eq!(health.health(now), Health::Healthy);
        assert_eq!(health.health(now + SILENT_AFTER), Health::Healthy);
        assert_eq!(
            health.health(now + SILENT_AFTER + Duration::from_secs(1)),
            Health::Silent
        );
        health.heard(now + SILENT_AFTER + Duration::from_secs(1));
        assert_eq!(
            health.health(now + SILENT_AFTER + Duration::from_secs(2)),
            Health::Healthy
        );
        assert_eq!(health.rtt_micros(), None);
        health.set_rtt(0);
        assert_eq!(health.rtt_micros(), Some(1));
    }
}
