//! The SCIM client's retry rules: which failures deserve another attempt, which requests may be
//! sent again at all, and how long to wait first (the server's `Retry-After`, capped, or
//! exponential backoff with jitter).
//!
//! It decides from the method, the caller's idempotency mark and what came back, nothing else.
//! It must never allow a second attempt of a request whose first one may have changed the
//! server unless the caller marked that request idempotent: a POST whose answer was lost is
//! the caller's to look up (see `scim::sync`), never this module's to repeat.

use std::time::{Duration, SystemTime};

use http::Method;
use rand::Rng;

use crate::messages::ForwardError;
use crate::scim::resources::{PatchOp, PatchOpKind};
use crate::scim::transport::{ScimResponse, TransportError};

/// Whether sending a request twice leaves the server as sending it once would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idempotency {
    Idempotent,
    NotIdempotent,
}

impl Idempotency {
    /// GET, HEAD, PUT and DELETE are idempotent (RFC 9110 §9.2.2); POST is not. PATCH is not
    /// by default: callers that know their operations are safe say so with
    /// [`Idempotency::of_patch`].
    pub fn of_method(method: &Method) -> Idempotency {
        if [Method::GET, Method::HEAD, Method::PUT, Method::DELETE].contains(method) {
            Idempotency::Idempotent
        } else {
            Idempotency::NotIdempotent
        }
    }

    /// A PATCH made only of `replace` and `remove` operations, or of `add` operations setting
    /// a single value, ends in the same state however often it is applied. An `add` of a list
    /// (emails, group members) may append twice on a lax server, so it is not retried blindly.
    pub fn of_patch(ops: &[PatchOp]) -> Idempotency {
        let safe = ops.iter().all(|op| match op.op {
            PatchOpKind::Replace | PatchOpKind::Remove => true,
            PatchOpKind::Add => !matches!(op.value, Some(serde_json::Value::Array(_))),
        });
        if safe {
            Idempotency::Idempotent
        } else {
            Idempotency::NotIdempotent
        }
    }
}

/// How hard the client tries before it reports a failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Further attempts after a transient fault (connect error, timeout, lost tunnel, 502, 503,
    /// 504, no connector for a moment).
    pub fault_retries: u32,
    /// Further attempts after the server asked to slow down (429, or 503 with `Retry-After`).
    pub throttle_retries: u32,
    /// Further attempts, at once, of an idempotent request whose agent was lost before it
    /// answered: the registry routes each through another agent of the service.
    pub reroutes: u32,
    /// First backoff delay; doubled on every further attempt.
    pub base_delay: Duration,
    /// Longest backoff delay.
    pub max_delay: Duration,
    /// Longest wait a `Retry-After` may impose; a server asking for more gets this much.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    /// About 3 s of patience for faults (0.25 + 0.5 + 1 + 2 s at most, jittered down), up to
    /// eight polite waits of at most 60 s each for a throttling server, and two re-routes after
    /// lost agents (a pair losing one, then the replacement of the other).
    fn default() -> Self {
        RetryPolicy {
            fault_retries: 3,
            throttle_retries: 8,
            reroutes: 2,
            base_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(4),
            max_retry_after: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// Never retry.
    pub fn none() -> RetryPolicy {
        RetryPolicy {
            fault_retries: 0,
            throttle_retries: 0,
            reroutes: 0,
            ..RetryPolicy::default()
        }
    }

    /// Backoff before retry number `retry` (0 for the first retry): `base · 2^retry`, capped at
    /// `max_delay`, then drawn uniformly from its upper half so that many requests failing
    /// together do not come back together.
    pub fn backoff(&self, retry: u32) -> Duration {
        let full = self
            .base_delay
            .saturating_mul(1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX))
            .min(self.max_delay);
        let half = full / 2;
        let spread = u64::try_from((full - half).as_micros()).unwrap_or(u64::MAX);
        let jitter = if spread == 0 {
            0
        } else {
            rand::rng().random_range(0..=spread)
        };
        half + Duration::from_micros(jitter)
    }
}

/// What one attempt's result says about trying again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Success, or a failure another attempt would not change.
    Final,
    /// The server asked to slow down (429, or 503 with `Retry-After`): it did not act on the
    /// request, so any method may be sent again, after `after` when it said how long.
    Throttled { after: Option<Duration> },
    /// The request never reached the server (no connector for the moment, connection refused
    /// or timed out, agent shutting down): any method may be sent again.
    NotSent,
    /// The request may or may not have been acted on (timeout, lost tunnel or connection,
    /// 502/503/504): only an idempotent request may be sent again.
    Unknown,
    /// The agent carrying the request was lost before it answered: as [`Verdict::Unknown`],
    /// only an idempotent request may be sent again, but at once, since the registry no longer
    /// routes anything to the lost agent and another one can carry it now.
    AgentLost,
}

impl Verdict {
    /// Judges one attempt. `now` is the wall clock, for `Retry-After` given as an HTTP date.
    pub fn of(result: &Result<ScimResponse, TransportError>, now: SystemTime) -> Verdict {
        match result {
            Ok(response) => {
                let after = response
                    .header("retry-after")
                    .and_then(|v| parse_retry_after(v, now));
                match response.status {
                    429 => Verdict::Throttled { after },
                    503 if after.is_some() => Verdict::Throttled { after },
                    502..=504 => Verdict::Unknown,
                    _ => Verdict::Final,
                }
            }
            Err(TransportError::NoConnector { kind, .. }) if kind.may_pass() => Verdict::NotSent,
            Err(TransportError::NoConnector { .. }) => Verdict::Final,
            Err(TransportError::AgentLost { .. }) => Verdict::AgentLost,
            Err(TransportError::Tunnel { .. } | TransportError::Timeout { .. }) => Verdict::Unknown,
            Err(TransportError::Forward(f)) => match f {
                ForwardError::ConnectRefused { .. }
                | ForwardError::ConnectTimeout { .. }
                | ForwardError::ShuttingDown
                | ForwardError::Busy { .. } => Verdict::NotSent,
                ForwardError::Network { .. }
                | ForwardError::ResponseTimeout { .. }
                | ForwardError::Internal { .. } => Verdict::Unknown,
                // Configuration problems and deterministic refusals: the next attempt would
                // meet the same answer.
                ForwardError::UndeclaredTarget { .. }
                | ForwardError::Refused { .. }
                | ForwardError::Dns { .. }
                | ForwardError::Tls { .. }
                | ForwardError::TooLarge { .. } => Verdict::Final,
            },
        }
    }
}

/// Counts the retries of one request and decides on the next one.
#[derive(Debug)]
pub struct Attempts<'a> {
    policy: &'a RetryPolicy,
    idempotency: Idempotency,
    faults: u32,
    throttles: u32,
    reroutes: u32,
}

impl<'a> Attempts<'a> {
    pub fn new(policy: &'a RetryPolicy, idempotency: Idempotency) -> Attempts<'a> {
        Attempts {
            policy,
            idempotency,
            faults: 0,
            throttles: 0,
            reroutes: 0,
        }
    }

    /// How long to wait before the next attempt, or `None` when the result must be returned.
    /// The second value is true when the wait is the server's own request to slow down, which
    /// every request of the same client should honour.
    pub fn next(&mut self, verdict: &Verdict) -> Option<(Duration, bool)> {
        match verdict {
            Verdict::Final => None,
            Verdict::Throttled { after } => {
                if self.throttles >= self.policy.throttle_retries {
                    return None;
                }
                let wait = match after {
                    Some(after) => (*after).min(self.policy.max_retry_after),
                    None => self.policy.backoff(self.throttles),
                };
                self.throttles += 1;
                Some((wait, true))
            }
            Verdict::Unknown | Verdict::AgentLost
                if self.idempotency == Idempotency::NotIdempotent =>
            {
                None
            }
            // Once the re-routes are spent, a lost agent is one more transient fault.
            Verdict::AgentLost if self.reroutes < self.policy.reroutes => {
                self.reroutes += 1;
                Some((Duration::ZERO, false))
            }
            Verdict::NotSent | Verdict::Unknown | Verdict::AgentLost => {
                if self.faults >= self.policy.fault_retries {
                    return None;
                }
                let wait = self.policy.backoff(self.faults);
                self.faults += 1;
                Some((wait, false))
            }
        }
    }
}

/// `Retry-After` (RFC 9110 §10.2.3): delay-seconds or an HTTP date. A date in the past means
/// "now"; anything unreadable is ignored (the caller falls back to its own backoff).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Longer than u64 seconds is "very long"; the cap takes care of it.
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scim::transport::NoConnectorKind;
    use serde_json::json;

    fn answer(status: u16, retry_after: Option<&str>) -> Result<ScimResponse, TransportError> {
        Ok(ScimResponse {
            status,
            headers: retry_after
                .map(|v| vec![("Retry-After".to_string(), v.to_string())])
                .unwrap_or_default(),
            body: Vec::new(),
        })
    }

    #[test]
    fn retry_after_seconds_and_http_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:50:07 GMT", now),
            Some(Duration::from_secs(30))
        );
        // The two obsolete formats RFC 9110 still asks recipients to read.
        assert_eq!(
            parse_retry_after("Sunday, 06-Nov-94 08:49:47 GMT", now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            parse_retry_after("Sun Nov  6 08:49:38 1994", now),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now),
            Some(Duration::ZERO),
            "a date in the past means now"
        );
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(Duration::from_secs(u64::MAX))
        );
        for bad in ["", "soon", "-5", "1.5", "Sun, 06 Nov 1994"] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad:?}");
        }
    }

    #[test]
    fn verdicts() {
        let now = SystemTime::now();
        assert_eq!(Verdict::of(&answer(200, None), now), Verdict::Final);
        assert_eq!(Verdict::of(&answer(404, Some("1")), now), Verdict::Final);
        assert_eq!(
            Verdict::of(&answer(429, Some("3")), now),
            Verdict::Throttled {
                after: Some(Duration::from_secs(3))
            }
        );
        assert_eq!(
            Verdict::of(&answer(429, None), now),
            Verdict::Throttled { after: None }
        );
        assert_eq!(
            Verdict::of(&answer(503, Some("2")), now),
            Verdict::Throttled {
                after: Some(Duration::from_secs(2))
            }
        );
        for status in [502, 503, 504] {
            assert_eq!(Verdict::of(&answer(status, None), now), Verdict::Unknown);
        }
        let no = |kind| {
            Err(TransportError::NoConnector {
                kind,
                reason: String::new(),
            })
        };
        assert_eq!(
            Verdict::of(&no(NoConnectorKind::NoAgent), now),
            Verdict::NotSent
        );
        assert_eq!(
            Verdict::of(&no(NoConnectorKind::NoTarget), now),
            Verdict::NotSent
        );
        assert_eq!(
            Verdict::of(&no(NoConnectorKind::ServiceOff), now),
            Verdict::Final
        );
        let fwd = |f| Err(TransportError::Forward(f));
        assert_eq!(
            Verdict::of(&fwd(ForwardError::ConnectRefused { addr: "a".into() }), now),
            Verdict::NotSent
        );
        // An overloaded agent refused before sending: even a create may go again.
        assert_eq!(
            Verdict::of(
                &fwd(ForwardError::Busy {
                    name: "a".into(),
                    queued: 2048
                }),
                now
            ),
            Verdict::NotSent
        );
        assert_eq!(
            Verdict::of(
                &fwd(ForwardError::Network {
                    addr: "a".into(),
                    detail: "reset".into()
                }),
                now
            ),
            Verdict::Unknown
        );
        assert_eq!(
            Verdict::of(
                &fwd(ForwardError::Tls {
                    addr: "a".into(),
                    detail: "bad certificate".into()
                }),
                now
            ),
            Verdict::Final
        );
        assert_eq!(
            Verdict::of(
                &Err(TransportError::Tunnel {
                    detail: "lost".into()
                }),
                now
            ),
            Verdict::Unknown
        );
    }

    #[test]
    fn unknown_outcomes_are_retried_only_when_idempotent() {
        let policy = RetryPolicy::default();
        let mut post = Attempts::new(&policy, Idempotency::NotIdempotent);
        assert_eq!(post.next(&Verdict::Unknown), None);
        assert!(post.next(&Verdict::NotSent).is_some());
        assert!(post
            .next(&Verdict::Throttled {
                after: Some(Duration::from_secs(1))
            })
            .is_some());

        let mut get = Attempts::new(&policy, Idempotency::Idempotent);
        for _ in 0..policy.fault_retries {
            let (wait, throttled) = get.next(&Verdict::Unknown).unwrap();
            assert!(!throttled);
            assert!(wait <= policy.max_delay);
        }
        assert_eq!(get.next(&Verdict::Unknown), None, "budget spent");
        assert_eq!(get.next(&Verdict::NotSent), None, "shared fault budget");
        assert!(
            get.next(&Verdict::Throttled { after: None }).is_some(),
            "throttling has its own budget"
        );
    }

    #[test]
    fn a_request_of_a_lost_agent_is_rerouted_at_once_when_idempotent() {
        let lost = Err(TransportError::AgentLost {
            agent: "vm-02".into(),
            detail: "its tunnel closed".into(),
        });
        assert_eq!(Verdict::of(&lost, SystemTime::now()), Verdict::AgentLost);
        let policy = RetryPolicy::default();
        let mut post = Attempts::new(&policy, Idempotency::NotIdempotent);
        assert_eq!(
            post.next(&Verdict::AgentLost),
            None,
            "a create is looked up"
        );
        let mut get = Attempts::new(&policy, Idempotency::Idempotent);
        for _ in 0..policy.reroutes {
            assert_eq!(get.next(&Verdict::AgentLost), Some((Duration::ZERO, false)));
        }
        // Past the re-routes, losing agents again is a transient fault like any other.
        let (wait, _) = get.next(&Verdict::AgentLost).unwrap();
        assert!(wait > Duration::ZERO);
        for _ in 1..policy.fault_retries {
            assert!(get.next(&Verdict::AgentLost).is_some());
        }
        assert_eq!(get.next(&Verdict::AgentLost), None, "bounded");
    }

    #[test]
    fn retry_after_is_capped_and_throttling_is_bounded() {
        let policy = RetryPolicy {
            throttle_retries: 2,
            max_retry_after: Duration::from_secs(5),
            ..RetryPolicy::default()
        };
        let mut a = Attempts::new(&policy, Idempotency::Idempotent);
        let asked = Verdict::Throttled {
            after: Some(Duration::from_secs(3600)),
        };
        assert_eq!(a.next(&asked), Some((Duration::from_secs(5), true)));
        let short = Verdict::Throttled {
            after: Some(Duration::from_secs(2)),
        };
        assert_eq!(a.next(&short), Some((Duration::from_secs(2), true)));
        assert_eq!(a.next(&short), None);
    }

    #[test]
    fn backoff_doubles_with_jitter_and_a_cap() {
        let policy = RetryPolicy {
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(700),
            ..RetryPolicy::default()
        };
        for (retry, full_ms) in [(0, 100u64), (1, 200), (2, 400), (3, 700), (40, 700)] {
            for _ in 0..50 {
                let d = policy.backoff(retry);
                let full = Duration::from_millis(full_ms);
                assert!(d >= full / 2 && d <= full, "retry {retry}: {d:?}");
            }
        }
    }

    #[test]
    fn patch_idempotency() {
        let replace = PatchOp::replace("active", json!(false));
        let remove = PatchOp::remove("displayName");
        let add_one = PatchOp {
            op: PatchOpKind::Add,
            path: Some("title".into()),
            value: Some(json!("Boss")),
        };
        let add_members = PatchOp {
            op: PatchOpKind::Add,
            path: Some("members".into()),
            value: Some(json!([{ "value": "u1" }])),
        };
        assert_eq!(
            Idempotency::of_patch(&[replace.clone(), remove, add_one]),
            Idempotency::Idempotent
        );
        assert_eq!(
            Idempotency::of_patch(&[replace, add_members]),
            Idempotency::NotIdempotent
        );
        assert_eq!(
            Idempotency::of_method(&Method::DELETE),
            Idempotency::Idempotent
        );
        assert_eq!(
            Idempotency::of_method(&Method::POST),
            Idempotency::NotIdempotent
        );
        assert_eq!(
            Idempotency::of_method(&Method::PATCH),
            Idempotency::NotIdempotent
        );
    }
}
