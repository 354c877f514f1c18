//! Client side of the hub's admin API, used by `connect sync`, `connect hub status` and the
//! demo: one HTTP request per call over a fresh loopback connection, and the renderings an
//! administrator reads (a run, the hub's status). It never prints the admin token.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};

use crate::actors::hub::health::Health;
use crate::config::Secret;
use crate::display::coarse_duration;
use crate::messages::hub::{
    AppStatus, RunState, RunSummary, RuntimeStats, ServiceStatus, SyncOutcome,
};
use crate::scim::sync::GroupCounts;

/// Why the admin API could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    #[error("cannot reach the hub's admin API at {addr} ([admin] listen in hub.toml): {detail} — is `connect hub` running?")]
    Unreachable { addr: SocketAddr, detail: String },
    #[error("the hub's admin API answered {status}: {message}")]
    Refused { status: u16, message: String },
    #[error("unexpected answer from the hub's admin API: {0}")]
    BadAnswer(String),
}

/// Asks the hub to synchronise `app` now and waits for the run's result.
pub async fn force_sync(
    addr: SocketAddr,
    token: &Secret,
    app: &str,
) -> Result<RunSummary, AdminClientError> {
    sync_now(addr, token, app).await.map(|o| o.run)
}

/// Asks the hub to synchronise `app` now, or to join the run already going, and waits for
/// that run's result.
pub async fn sync_now(
    addr: SocketAddr,
    token: &Secret,
    app: &str,
) -> Result<SyncOutcome, AdminClientError> {
    let body = request(addr, token, "POST", &format!("/api/apps/{app}/sync")).await?;
    parse(&body)
}

/// Everything `connect hub status` shows: services with their agents, apps with Last Sync.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HubStatus {
    pub services: Vec<ServiceStatus>,
    pub apps: Vec<AppStatus>,
    /// The hub process itself (sessions, tasks, memory); absent from hubs without
    /// `GET /api/runtime`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<RuntimeStats>,
}

impl HubStatus {
    /// Healthy when no application's last sync failed and no reconciler is missing.
    pub fn healthy(&self) -> bool {
        self.apps
            .iter()
            .all(|a| a.error.is_none() && a.last_sync.as_ref().is_none_or(|r| r.ok))
    }
}

/// Reads the hub's status through the admin API.
pub async fn hub_status(addr: SocketAddr, token: &Secret) -> Result<HubStatus, AdminClientError> {
    let services = parse(&request(addr, token, "GET", "/api/services").await?)?;
    let apps = parse(&request(addr, token, "GET", "/api/apps").await?)?;
    let runtime = match request(addr, token, "GET", "/api/runtime").await {
        Ok(body) => Some(parse(&body)?),
        // An older hub without the endpoint: show the rest.
        Err(AdminClientError::Refused { status: 404, .. }) => None,
        Err(e) => return Err(e),
    };
    Ok(HubStatus {
        services,
        apps,
        runtime,
    })
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, AdminClientError> {
    serde_json::from_slice(body).map_err(|e| AdminClientError::BadAnswer(e.to_string()))
}

/// Sends one request without a body to the admin API and returns the body of a 2xx answer.
pub async fn request(
    addr: SocketAddr,
    token: &Secret,
    method: &str,
    path: &str,
) -> Result<Bytes, AdminClientError> {
    request_json(addr, token, method, path, None).await
}

/// Sends one request to the admin API, with `body` as JSON when given, and returns the body
/// of a 2xx answer.
pub async fn request_json(
    addr: SocketAddr,
    token: &Secret,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<Bytes, AdminClientError> {
    let unreachable = |detail: String| AdminClientError::Unreachable { addr, detail };
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let driver = tokio::spawn(conn);
    let mut builder = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(
            hyper::header::AUTHORIZATION,
            format!("Bearer {}", token.expose()),
        );
    let payload = match body {
        Some(value) => {
            builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
            Bytes::from(serde_json::to_vec(value).unwrap_or_default())
        }
        None => Bytes::new(),
    };
    let request = builder
        .body(Full::new(payload))
        .map_err(|e| AdminClientError::BadAnswer(e.to_string()))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| unreachable(e.to_string()))?
        .to_bytes();
    driver.abort();
    if !(200..300).contains(&status) {
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        return Err(AdminClientError::Refused { status, message });
    }
    Ok(body)
}

/// A run as an administrator reads it: counts on one line (users, then groups when the app
/// has any), then the cause when it failed. Group counts put the number first, so that
/// searching the output for a user count ("created 3") never finds a group count.
pub fn describe_run(run: &RunSummary) -> String {
    let mut text = format!(
        "{app}: {verdict} in {ms} ms (run {id}) — desired {desired}, created {created}, updated {updated}, deprovisioned {deprov} (deactivated {deact}, deleted {del}), unchanged {unchanged}, unmanaged {unmanaged}, failed {failed}",
        app = run.app,
        verdict = verdict(run),
        ms = run.duration_ms,
        id = run.run_id,
        desired = run.desired,
        created = run.created,
        updated = run.updated,
        deprov = run.deprovisioned(),
        deact = run.deactivated,
        del = run.deleted,
        unchanged = run.unchanged,
        unmanaged = run.unmanaged,
        failed = run.failed,
    );
    let g = &run.groups;
    if run.groups_desired > 0 || *g != GroupCounts::default() {
        text.push_str(&format!(
            "; groups: desired {desired} — {created} created, {updated} updated, {deleted} deleted, {unchanged} unchanged, {unmanaged} unmanaged; members {added} added, {removed} removed",
            desired = run.groups_desired,
            created = g.created,
            updated = g.updated,
            deleted = g.deleted,
            unchanged = g.unchanged,
            unmanaged = g.unmanaged,
            added = g.members_added,
            removed = g.members_removed,
        ));
    }
    if run.retries > 0 {
        let _ = write!(
            text,
            " ({} of {} requests were retries)",
            run.retries, run.requests
        );
    }
    if let Some(failover) = failover(run) {
        text.push_str("\n  failover: ");
        text.push_str(&failover);
    }
    if let Some(message) = &run.message {
        text.push_str("\n  cause: ");
        text.push_str(message);
    }
    text
}

fn verdict(run: &RunSummary) -> &'static str {
    match (run.state, run.ok) {
        (RunState::Interrupted, _) => "sync INTERRUPTED",
        (RunState::Running, _) => "sync running",
        (RunState::Finished, true) => "sync ok",
        (RunState::Finished, false) => "sync FAILED",
    }
}

/// What a run met of lost agents, in one line; `None` when it lost none.
pub fn failover(run: &RunSummary) -> Option<String> {
    if run.agents_lost.is_empty() {
        return None;
    }
    let lost: Vec<String> = run
        .agents_lost
        .iter()
        .map(|a| {
            format!(
                "agent `{}` was lost with {} request(s) of the run in flight",
                a.agent, a.requests
            )
        })
        .collect();
    Some(format!(
        "{}; {} re-sent at once through another agent, the others (creates, member changes) \
         looked up before any resend or reported failed",
        lost.join(", "),
        run.rerouted
    ))
}

/// A forced sync's result; says so first when it joined a run that was already going.
pub fn describe_sync(outcome: &SyncOutcome) -> String {
    let run = describe_run(&outcome.run);
    if outcome.joined {
        format!(
            "a run of `{}` was already going; its result:\n{run}",
            outcome.run.app
        )
    } else {
        run
    }
}

/// The hub's status as `connect hub status` prints it: services and their agents, then each
/// application's run going now and Last Sync (with its cause when it failed).
pub fn describe_status(status: &HubStatus, now: SystemTime) -> String {
    let now_ms = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    let mut out = String::new();
    if let Some(r) = &status.runtime {
        let memory = r
            .rss_bytes
            .map(|b| format!(", {} MiB resident", b / (1024 * 1024)))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "hub: {} agent session(s), {} tasks{memory}",
            r.agent_sessions, r.tasks
        );
    }
    out.push_str("services\n");
    if status.services.is_empty() {
        out.push_str("  (none in hub.toml)\n");
    }
    for s in &status.services {
        let agents = match s.agents.len() {
            0 => "no agent connected".to_string(),
            1 => "1 agent connected".to_string(),
            n => format!("{n} agents connected"),
        };
        let _ = writeln!(
            out,
            "  {}  {}  {agents}",
            s.name,
            if s.enabled { "on" } else { "OFF" }
        );
        for a in &s.agents {
            let targets = if a.targets.is_empty() {
                "no targets".to_string()
            } else {
                format!("targets {}", a.targets.join(", "))
            };
            let rtt = a
                .rtt_micros
                .map(|us| format!(", round trip {:.1} ms", us as f64 / 1000.0))
                .unwrap_or_default();
            let health = match a.health {
                Health::Healthy => "healthy".to_string(),
                Health::Silent => format!(
                    "SILENT (missed heartbeats, last heard {} ago: routed nothing)",
                    ago(a.last_heard_unix_ms, now_ms)
                ),
            };
            let _ = writeln!(
                out,
                "    {} from {}, connected {} ago, {targets}; {health}, {} in flight, {} answered, {} failed{rtt}",
                a.agent_name,
                a.peer,
                ago(a.connected_since_unix.saturating_mul(1000), now_ms),
                a.in_flight,
                a.answered,
                a.failed,
            );
        }
    }
    out.push_str("apps\n");
    if status.apps.is_empty() {
        out.push_str("  (none in hub.toml)\n");
    }
    for a in &status.apps {
        let _ = writeln!(
            out,
            "  {}  via service {}, target {}",
            a.name, a.service, a.target
        );
        if let Some(e) = &a.error {
            let _ = writeln!(out, "    {e}");
        }
        if let Some(since) = a.running_since_unix_ms {
            let _ = writeln!(out, "    running for {}", ago(since, now_ms));
        }
        match &a.last_sync {
            None => out.push_str("    last sync: none yet\n"),
            Some(run) => {
                let _ = writeln!(
                    out,
                    "    last sync: {} {} ago (run {}, {} ms): created {}, updated {}, deprovisioned {}, unchanged {}, failed {}",
                    verdict(run).trim_start_matches("sync "),
                    ago(run.started_unix_ms.saturating_add(run.duration_ms), now_ms),
                    run.run_id,
                    run.duration_ms,
                    run.created,
                    run.updated,
                    run.deprovisioned(),
                    run.unchanged,
                    run.failed,
                );
                if let Some(f) = failover(run) {
                    let _ = writeln!(out, "      failover: {f}");
                }
                if let Some(m) = &run.message {
                    let _ = writeln!(out, "      cause: {m}");
                }
            }
        }
    }
    out.trim_end().to_string()
}

/// How long ago `then_ms` was, coarsely: `42s`, `5m 3s`, `2h 5m`, `3d 4h`.
fn ago(then_ms: u64, now_ms: u64) -> String {
    coarse_duration(Duration::from_millis(now_ms.saturating_sub(then_ms)).as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::hub::AgentStatus;

    #[test]
    fn status_names_agents_targets_and_the_cause_of_a_failed_sync() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let status = HubStatus {
            services: vec![
                ServiceStatus {
                    name: "onprem".into(),
                    enabled: true,
                    agents: vec![
                        AgentStatus {
                            session_id: 1,
                            agent_name: "vm-1".into(),
                            peer: "127.0.0.1:5000".into(),
                            targets: vec!["crm-scim".into(), "wiki-scim".into()],
                            connected_since_unix: 1_000_000 - 125,
                            last_heard_unix_ms: 1_000_000_000 - 1_000,
                            in_flight: 3,
                            answered: 120,
                            rtt_micros: Some(1_500),
                            ..Default::default()
                        },
                        AgentStatus {
                            session_id: 2,
                            agent_name: "vm-2".into(),
                            peer: "127.0.0.1:5001".into(),
                            targets: vec!["crm-scim".into()],
                            connected_since_unix: 1_000_000 - 60,
                            health: Health::Silent,
                            last_heard_unix_ms: 1_000_000_000 - 8_000,
                            failed: 1,
                            ..Default::default()
                        },
                    ],
                },
                ServiceStatus {
                    name: "idle".into(),
                    enabled: false,
                    agents: vec![],
                },
            ],
            apps: vec![
                AppStatus {
                    name: "crm".into(),
                    service: "onprem".into(),
                    target: "crm-scim".into(),
                    running_since_unix_ms: Some(1_000_000_000 - 3_000),
                    last_sync: Some(RunSummary {
                        app: "crm".into(),
                        run_id: 7,
                        started_unix_ms: 1_000_000_000 - 10_000,
                        duration_ms: 500,
                        ok: false,
                        failed: 1,
                        message: Some("forbidden (403) on POST /v2/Users".into()),
                        ..Default::default()
                    }),
                    error: None,
                },
                AppStatus {
                    name: "wiki".into(),
                    service: "idle".into(),
                    target: "wiki-scim".into(),
                    running_since_unix_ms: None,
                    last_sync: None,
                    error: None,
                },
            ],
            runtime: Some(RuntimeStats {
                agent_sessions: 2,
                tasks: 42,
                rss_bytes: Some(35 * 1024 * 1024 + 5),
            }),
        };
        let text = describe_status(&status, now);
        for want in [
            "hub: 2 agent session(s), 42 tasks, 35 MiB resident\nservices\n",
            "  onprem  on  2 agents connected",
            "    vm-1 from 127.0.0.1:5000, connected 2m 5s ago, targets crm-scim, wiki-scim; healthy, 3 in flight, 120 answered, 0 failed, round trip 1.5 ms",
            "    vm-2 from 127.0.0.1:5001, connected 1m 0s ago, targets crm-scim; SILENT (missed heartbeats, last heard 8s ago: routed nothing), 0 in flight, 0 answered, 1 failed\n",
            "  idle  OFF  no agent connected",
            "  crm  via service onprem, target crm-scim",
            "    running for 3s",
            "    last sync: FAILED 9s ago (run 7, 500 ms): created 0",
            "      cause: forbidden (403) on POST /v2/Users",
            "  wiki  via service idle, target wiki-scim\n    last sync: none yet",
        ] {
            assert!(text.contains(want), "`{want}` missing in:\n{text}");
        }
        assert!(!status.healthy());
    }

    #[test]
    fn a_run_tells_its_failover_and_an_interrupted_run_says_so() {
        let run = RunSummary {
            app: "crm".into(),
            ok: true,
            created: 2000,
            agents_lost: vec![crate::messages::hub::LostAgent {
                agent: "vm-2".into(),
                requests: 4,
            }],
            rerouted: 1,
            ..Default::default()
        };
        let text = describe_run(&run);
        assert!(text.starts_with("crm: sync ok"), "{text}");
        assert!(
            text.contains("\n  failover: agent `vm-2` was lost with 4 request(s) of the run in flight; 1 re-sent at once through another agent, the others"),
            "{text}"
        );
        let interrupted = RunSummary {
            app: "crm".into(),
            state: RunState::Interrupted,
            message: Some("interrupted: the hub stopped".into()),
            ..Default::default()
        };
        let text = describe_run(&interrupted);
        assert!(text.starts_with("crm: sync INTERRUPTED"), "{text}");
        let status = HubStatus {
            services: vec![],
            apps: vec![AppStatus {
                name: "crm".into(),
                service: "onprem".into(),
                target: "crm-scim".into(),
                running_since_unix_ms: None,
                last_sync: Some(interrupted),
                error: None,
            }],
            runtime: None,
        };
        let text = describe_status(&status, SystemTime::UNIX_EPOCH);
        assert!(text.contains("    last sync: INTERRUPTED"), "{text}");
        assert!(!status.healthy());
    }

    #[test]
    fn a_joined_sync_says_so() {
        let outcome = SyncOutcome {
            run: RunSummary {
                app: "crm".into(),
                ok: true,
                ..Default::default()
            },
            joined: true,
        };
        let text = describe_sync(&outcome);
        assert!(
            text.starts_with("a run of `crm` was already going; its result:\ncrm: sync ok"),
            "{text}"
        );
        let fresh = describe_sync(&SyncOutcome {
            joined: false,
            ..outcome
        });
        assert!(fresh.starts_with("crm: sync ok"), "{fresh}");
    }

    #[test]
    fn ago_is_coarse() {
        assert_eq!(ago(0, 59_999), "59s");
        assert_eq!(ago(0, 61_000), "1m 1s");
        assert_eq!(ago(0, 7_380_000), "2h 3m");
        assert_eq!(ago(0, 90_000_000), "1d 1h");
        assert_eq!(ago(5_000, 1_000), "0s", "a clock step back is not negative");
    }

    #[test]
    fn describe_run_keeps_user_wording_and_adds_groups() {
        let mut run = RunSummary {
            app: "crm".into(),
            ok: true,
            desired: 11,
            created: 11,
            unmanaged: 1,
            ..Default::default()
        };
        let users_only = describe_run(&run);
        assert!(
            users_only.contains("created 11, updated 0, deprovisioned 0"),
            "{users_only}"
        );
        assert!(!users_only.contains("groups"), "{users_only}");
        run.groups_desired = 2;
        run.groups = GroupCounts {
            created: 1,
            updated: 1,
            members_added: 11,
            members_removed: 2,
            ..Default::default()
        };
        run.ok = false;
        run.message = Some("deletion guard stopped the run".into());
        let text = describe_run(&run);
        assert!(
            text.starts_with("crm: sync FAILED in 0 ms (run 0) — desired 11, created 11, updated 0, deprovisioned 0 (deactivated 0, deleted 0), unchanged 0, unmanaged 1, failed 0; groups: desired 2 — 1 created, 1 updated, 0 deleted, 0 unchanged, 0 unmanaged; members 11 added, 2 removed\n  cause: deletion guard"),
            "{text}"
        );
        // A group count never reads like a user count.
        assert!(!text.contains("created 1,"), "{text}");
    }
}
