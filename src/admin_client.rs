//! Client side of the hub's admin API, used by `connect sync` and the demo: one HTTP request
//! per call over a fresh loopback connection, and the one-paragraph rendering of a run.

use std::net::SocketAddr;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

use crate::config::Secret;
use crate::messages::hub::RunSummary;
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
    let body = request(addr, token, "POST", &format!("/api/apps/{app}/sync")).await?;
    serde_json::from_slice(&body).map_err(|e| AdminClientError::BadAnswer(e.to_string()))
}

/// Sends one request to the admin API and returns the body of a 2xx answer.
pub async fn request(
    addr: SocketAddr,
    token: &Secret,
    method: &str,
    path: &str,
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
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(
            hyper::header::AUTHORIZATION,
            format!("Bearer {}", token.expose()),
        )
        .body(Full::new(Bytes::new()))
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
        "{app}: {verdict} in {ms} ms — desired {desired}, created {created}, updated {updated}, deprovisioned {deprov} (deactivated {deact}, deleted {del}), unchanged {unchanged}, unmanaged {unmanaged}, failed {failed}",
        app = run.app,
        verdict = if run.ok { "sync ok" } else { "sync FAILED" },
        ms = run.duration_ms,
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
    if let Some(message) = &run.message {
        text.push_str("\n  cause: ");
        text.push_str(message);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

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
            text.starts_with("crm: sync FAILED in 0 ms — desired 11, created 11, updated 0, deprovisioned 0 (deactivated 0, deleted 0), unchanged 0, unmanaged 1, failed 0; groups: desired 2 — 1 created, 1 updated, 0 deleted, 0 unchanged, 0 unmanaged; members 11 added, 2 removed\n  cause: deletion guard"),
            "{text}"
        );
        // A group count never reads like a user count.
        assert!(!text.contains("created 1,"), "{text}");
    }
}
