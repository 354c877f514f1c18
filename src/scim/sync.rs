//! One user synchronisation run: list, plan, apply, count.
//!
//! It owns the order and the safety rules of applying a [`UserPlan`]: deprovisions first, then
//! updates, then creates (so freed user names are free before they are reused); a 409 on
//! create adopts the existing user instead of failing; a create whose outcome is unknown is
//! looked up (by externalId, then userName) and only sent again once the lookup shows it did
//! not land; a systemic failure (bad credentials, no connector) stops the run instead of
//! failing every remaining user one by one. Every operation is reported as an
//! [`OperationRecord`] for the run history. It never touches a user outside the plan, and
//! never retries a POST blindly (transient faults are retried by the client's request layer).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};

use futures_util::stream::{self, StreamExt};
use serde_json::json;

use crate::messages::hub::{OperationAction, OperationOutcome, OperationRecord, ResourceKind};
use crate::scim::client::ScimClient;
use crate::scim::diff::{
    plan_users, update_ops, Deprovision, DeprovisionMode, DesiredUser, UserUpdate,
};
use crate::scim::error::ScimError;
use crate::scim::resources::{PatchOp, ScimUser};

/// What one run did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UserRunReport {
    pub created: usize,
    pub updated: usize,
    pub deactivated: usize,
    pub deleted: usize,
    pub unchanged: usize,
    pub unmanaged: usize,
    /// Operations that failed, plus those not attempted after a systemic failure.
    pub failed: usize,
    /// SCIM ids this hub manages after the run: the managed ids still present on the server,
    /// plus those created or adopted, minus those deleted.
    pub managed_after: HashSet<String>,
    /// The error of the earliest failed operation in plan order; its
    /// [`diagnosis`](ScimError::diagnosis) is the run's message.
    pub first_error: Option<ScimError>,
    /// Requests sent by the client during the run (listing included, retries included).
    pub requests: usize,
    /// Of those, retries of transient faults and throttled answers.
    pub retries: usize,
    /// One record per planned operation, in plan order.
    pub operations: Vec<OperationRecord>,
}

#[derive(Clone, Copy)]
enum Op<'a> {
    Deprovision(&'a Deprovision),
    Update(&'a UserUpdate),
    Create(&'a DesiredUser),
}

enum Outcome {
    Created {
        id: String,
    },
    /// An existing user was taken over after a 409 (or a lost answer); `patched` says
    /// whether it needed changes.
    Adopted {
        id: String,
        patched: bool,
    },
    Updated,
    Deactivated,
    Deleted {
        id: String,
    },
    /// The user to deprovision was already gone.
    Gone {
        id: String,
    },
    Failed(ScimError),
    /// Skipped because an earlier operation failed in a way every other one would too.
    NotAttempted,
}

/// Bring the application's users to `desired`.
///
/// Fails as a whole only when the current users cannot be listed; every other failure is
/// counted in the report, with the first one kept. `managed` holds the SCIM ids this hub
/// created or adopted in earlier runs; `concurrency` bounds requests in flight (at least 1).
pub async fn sync_users(
    client: &ScimClient,
    desired: &[DesiredUser],
    managed: &HashSet<String>,
    mode: DeprovisionMode,
    concurrency: usize,
) -> Result<UserRunReport, ScimError> {
    let before = client.request_count();
    let retries_before = client.retry_count();
    let current = client.list_users().await?;
    let plan = plan_users(desired, &current, managed, mode);
    tracing::debug!(
        create = plan.create.len(),
        update = plan.update.len(),
        deprovision = plan.deprovision.len(),
        adopt = plan.adopt.len(),
        "user plan computed"
    );

    let present: HashSet<&str> = current.iter().filter_map(|u| u.id.as_deref()).collect();
    let mut report = UserRunReport {
        unchanged: plan.unchanged,
        unmanaged: plan.unmanaged,
        // An id the server no longer lists is gone: forgetting it can only make the hub
        // touch less, never more.
        managed_after: managed
            .iter()
            .filter(|id| present.contains(id.as_str()))
            .cloned()
            .collect(),
        ..Default::default()
    };
    report
        .managed_after
        .extend(plan.adopt.iter().map(|(_, id)| id.clone()));

    let stop = AtomicBool::new(false);
    let concurrency = concurrency.max(1);
    let phases: [Vec<Op<'_>>; 3] = [
        plan.deprovision.iter().map(Op::Deprovision).collect(),
        plan.update.iter().map(Op::Update).collect(),
        plan.create.iter().map(Op::Create).collect(),
    ];
    let mut first_error: Option<(usize, ScimError)> = None;
    let mut seq = 0usize;
    for phase in phases {
        let numbered: Vec<(usize, Op<'_>)> = phase
            .into_iter()
            .map(|op| {
                seq += 1;
                (seq, op)
            })
            .collect();
        // Futures are built up front: a closure inside the stream type trips the compiler's
        // higher-ranked Send check when this function runs inside an actor.
        let stop = &stop;
        let futures: Vec<_> = numbered
            .into_iter()
            .map(|(n, op)| async move { (n, op, apply(client, op, mode, stop).await) })
            .collect();
        let mut outcomes: Vec<(usize, Op<'_>, Outcome)> = stream::iter(futures)
            .buffer_unordered(concurrency)
            .collect()
            .await;
        outcomes.sort_by_key(|(n, _, _)| *n);
        for (n, op, outcome) in outcomes {
            report.operations.push(operation_record(op, &outcome, mode));
            match outcome {
                Outcome::Created { id } => {
                    report.created += 1;
                    report.managed_after.insert(id);
                }
                Outcome::Adopted { id, patched } => {
                    if patched {
                        report.updated += 1;
                    } else {
                        report.unchanged += 1;
                    }
                    report.managed_after.insert(id);
                }
                Outcome::Updated => report.updated += 1,
                Outcome::Deactivated => report.deactivated += 1,
                Outcome::Deleted { id } => {
                    report.deleted += 1;
                    report.managed_after.remove(&id);
                }
                Outcome::Gone { id } => {
                    report.unchanged += 1;
                    report.managed_after.remove(&id);
                }
                Outcome::Failed(e) => {
                    report.failed += 1;
                    if first_error.as_ref().is_none_or(|(m, _)| n < *m) {
                        first_error = Some((n, e));
                    }
                }
                Outcome::NotAttempted => report.failed += 1,
            }
        }
    }
    report.first_error = first_error.map(|(_, e)| e);
    report.requests = client.request_count().saturating_sub(before);
    report.retries = client.retry_count().saturating_sub(retries_before);
    tracing::info!(
        created = report.created,
        updated = report.updated,
        deactivated = report.deactivated,
        deleted = report.deleted,
        unchanged = report.unchanged,
        unmanaged = report.unmanaged,
        failed = report.failed,
        requests = report.requests,
        retries = report.retries,
        "user sync finished"
    );
    Ok(report)
}

async fn apply(
    client: &ScimClient,
    op: Op<'_>,
    mode: DeprovisionMode,
    stop: &AtomicBool,
) -> Outcome {
    if stop.load(Ordering::Relaxed) {
        return Outcome::NotAttempted;
    }
    let outcome = match op {
        Op::Deprovision(d) => deprovision(client, d, mode).await,
        Op::Update(u) => match client.patch_user(&u.id, &u.ops).await {
            Ok(()) => Outcome::Updated,
            Err(e) => Outcome::Failed(e),
        },
        Op::Create(d) => create(client, d).await,
    };
    if let Outcome::Failed(e) = &outcome {
        tracing::warn!(error = %e, "SCIM operation failed");
        if e.is_systemic() {
            stop.store(true, Ordering::Relaxed);
        }
    }
    outcome
}

async fn deprovision(client: &ScimClient, d: &Deprovision, mode: DeprovisionMode) -> Outcome {
    let result = match mode {
        DeprovisionMode::Delete => client.delete_user(&d.id).await,
        DeprovisionMode::Deactivate => {
            client
                .patch_user(&d.id, &[PatchOp::replace("active", json!(false))])
                .await
        }
    };
    match (result, mode) {
        (Ok(()), DeprovisionMode::Delete) => Outcome::Deleted { id: d.id.clone() },
        (Ok(()), DeprovisionMode::Deactivate) => Outcome::Deactivated,
        // DELETE is idempotent: a user already gone is deleted.
        (Err(e), DeprovisionMode::Delete) if e.status() == Some(404) => {
            Outcome::Deleted { id: d.id.clone() }
        }
        (Err(e), DeprovisionMode::Deactivate) if e.status() == Some(404) => {
            Outcome::Gone { id: d.id.clone() }
        }
        (Err(e), _) => Outcome::Failed(e),
    }
}

async fn create(client: &ScimClient, d: &DesiredUser) -> Outcome {
    let error = match client.create_user(&d.to_scim_user()).await {
        Ok(user) => {
            return Outcome::Created {
                id: user.id.unwrap_or_default(),
            }
        }
        Err(e) => e,
    };
    if error.status() != Some(409) && !error.may_have_landed() {
        return Outcome::Failed(error);
    }
    // Either the user name is taken (409) or our POST may have landed without us hearing
    // back: find the user rather than POST again.
    let existing = match client.find_user(&d.external_id, &d.user_name).await {
        Ok(Some(user)) => user,
        Ok(None) if error.may_have_landed() => return create_again(client, d, error).await,
        Ok(None) => return Outcome::Failed(error),
        Err(e) => return Outcome::Failed(e),
    };
    let landed =
        error.may_have_landed() && existing.external_id.as_deref() == Some(d.external_id.as_str());
    adopt(client, d, existing, landed, error).await
}

/// The lookup after an unknown outcome found nothing: the POST did not land, so it is sent
/// once more. Should the first one land late after all, the server's userName uniqueness
/// answers this one with 409, and the user is adopted rather than created twice.
async fn create_again(client: &ScimClient, d: &DesiredUser, first: ScimError) -> Outcome {
    match client.create_user(&d.to_scim_user()).await {
        Ok(user) => Outcome::Created {
            id: user.id.unwrap_or_default(),
        },
        Err(e) if e.status() == Some(409) => {
            match client.find_user(&d.external_id, &d.user_name).await {
                Ok(Some(existing)) => {
                    let landed = existing.external_id.as_deref() == Some(d.external_id.as_str());
                    adopt(client, d, existing, landed, e).await
                }
                Ok(None) => Outcome::Failed(e),
                Err(e) => Outcome::Failed(e),
            }
        }
        // Unknown again: reported, never repeated a third time; the next run looks it up.
        Err(e) if e.may_have_landed() => Outcome::Failed(first),
        Err(e) => Outcome::Failed(e),
    }
}

/// Brings an existing user to the desired state and takes it over; `landed` says it is the
/// one our own POST created.
async fn adopt(
    client: &ScimClient,
    d: &DesiredUser,
    existing: ScimUser,
    landed: bool,
    error: ScimError,
) -> Outcome {
    let Some(id) = existing.id.clone() else {
        return Outcome::Failed(error);
    };
    let ops = update_ops(d, &existing);
    let patched = !ops.is_empty();
    if patched {
        if let Err(e) = client.patch_user(&id, &ops).await {
            return Outcome::Failed(e);
        }
    }
    if landed {
        Outcome::Created { id }
    } else {
        Outcome::Adopted { id, patched }
    }
}

/// The history record of one operation and how it ended.
fn operation_record(op: Op<'_>, outcome: &Outcome, mode: DeprovisionMode) -> OperationRecord {
    let (action, external_id, scim_id, name) = match op {
        Op::Create(d) => (
            OperationAction::Create,
            Some(d.external_id.clone()),
            None,
            Some(d.user_name.clone()),
        ),
        Op::Update(u) => (
            OperationAction::Update,
            Some(u.external_id.clone()),
            Some(u.id.clone()),
            None,
        ),
        Op::Deprovision(d) => (
            match mode {
                DeprovisionMode::Delete => OperationAction::Delete,
                DeprovisionMode::Deactivate => OperationAction::Deactivate,
            },
            None,
            Some(d.id.clone()),
            Some(d.user_name.clone()),
        ),
    };
    let mut record = OperationRecord {
        resource: ResourceKind::User,
        action,
        outcome: OperationOutcome::Done,
        external_id,
        scim_id,
        name,
        message: None,
    };
    match outcome {
        Outcome::Created { id } => record.scim_id = Some(id.clone()),
        Outcome::Adopted { id, patched } => {
            record.action = OperationAction::Adopt;
            record.scim_id = Some(id.clone());
            record.message = Some(
                if *patched {
                    "already on the server: adopted and updated"
                } else {
                    "already on the server: adopted as it was"
                }
                .into(),
            );
        }
        Outcome::Updated | Outcome::Deactivated | Outcome::Deleted { .. } => {}
        Outcome::Gone { .. } => record.message = Some("already gone from the server".into()),
        Outcome::Failed(e) => {
            record.outcome = OperationOutcome::Failed;
            record.message = Some(e.diagnosis());
        }
        Outcome::NotAttempted => {
            record.outcome = OperationOutcome::Skipped;
            record.message = Some("not attempted after a failure that stops the run".into());
        }
    }
    record
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::scim_server::DemoScimServer;
    use crate::scim::resources::ScimEmail;
    use crate::scim::transport::{
        HttpTransport, ScimRequest, ScimResponse, Transport, TransportError,
    };
    use futures_util::future::BoxFuture;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    fn desired(i: usize) -> DesiredUser {
        DesiredUser {
            external_id: format!("ext-{i:04}"),
            user_name: format!("user{i:04}@example.org"),
            display_name: Some(format!("User {i}")),
            given_name: Some("User".into()),
            family_name: Some(format!("N{i}")),
            formatted_name: None,
            emails: vec![ScimEmail {
                value: format!("user{i:04}@example.org"),
                kind: Some("work".into()),
                primary: Some(true),
            }],
            active: true,
        }
    }

    async fn demo(token: Option<&str>) -> (DemoScimServer, Arc<dyn Transport>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = DemoScimServer::start(listener, token.map(str::to_string))
            .await
            .unwrap();
        let addr = server.local_addr();
        let transport: Arc<dyn Transport> = Arc::new(HttpTransport::new(addr, addr.to_string()));
        (server, transport)
    }

    #[tokio::test]
    async fn end_to_end_against_the_demo_server() {
        let (server, transport) = demo(Some("t0ken")).await;
        let client = ScimClient::new(
            transport,
            server.base_path().to_string(),
            Some("Bearer t0ken".into()),
            100,
        );
        client.check_base().await.unwrap();

        let mut want: Vec<DesiredUser> = (0..500).map(desired).collect();
        let first = sync_users(&client, &want, &HashSet::new(), DeprovisionMode::Delete, 8)
            .await
            .unwrap();
        assert_eq!(first.created, 500, "{:?}", first.first_error);
        assert_eq!(first.failed, 0);
        assert_eq!(first.managed_after.len(), 500);
        assert_eq!(first.requests, 1 + 500);
        assert_eq!(server.user_count(), 500);

        // Nothing changed: one listing of 5 pages, nothing else.
        let again = sync_users(
            &client,
            &want,
            &first.managed_after,
            DeprovisionMode::Delete,
            8,
        )
        .await
        .unwrap();
        assert_eq!(again.unchanged, 500);
        assert_eq!(again.requests, 5);

        // Rename one, remove one, add one.
        want[10].display_name = Some("Renamed Ten".into());
        want[10].user_name = "renamed10@example.org".into();
        let removed = want.remove(20);
        want.push(desired(9999));
        let third = sync_users(
            &client,
            &want,
            &again.managed_after,
            DeprovisionMode::Delete,
            8,
        )
        .await
        .unwrap();
        assert_eq!(
            (third.created, third.updated, third.deleted, third.failed),
            (1, 1, 1, 0),
            "{:?}",
            third.first_error
        );
        assert_eq!(third.unchanged, 498);
        assert_eq!(server.user_count(), 500);
        let users = server.users();
        assert!(users.iter().all(|u| u.user_name != removed.user_name));
        let renamed = users
            .iter()
            .find(|u| u.external_id.as_deref() == Some("ext-0010"))
            .unwrap();
        assert_eq!(renamed.user_name, "renamed10@example.org");
        assert_eq!(renamed.display_name.as_deref(), Some("Renamed Ten"));
        assert_eq!(third.managed_after.len(), 500);

        server.shutdown().await;
    }

    #[tokio::test]
    async fn deactivate_mode_and_adoption_after_conflict() {
        let (server, transport) = demo(None).await;
        let client = ScimClient::new(transport, server.base_path().to_string(), None, 50);
        let want: Vec<DesiredUser> = (0..3).map(desired).collect();
        let run = sync_users(
            &client,
            &want,
            &HashSet::new(),
            DeprovisionMode::Deactivate,
            4,
        )
        .await
        .unwrap();
        assert_eq!(run.created, 3);

        // Drop user 2 from the desired set: deactivated, not deleted; then unchanged.
        let run = sync_users(
            &client,
            &want[..2],
            &run.managed_after,
            DeprovisionMode::Deactivate,
            4,
        )
        .await
        .unwrap();
        assert_eq!((run.deactivated, run.deleted), (1, 0));
        assert_eq!(server.user_count(), 3);
        let managed = run.managed_after.clone();
        let run = sync_users(
            &client,
            &want[..2],
            &managed,
            DeprovisionMode::Deactivate,
            4,
        )
        .await
        .unwrap();
        assert_eq!((run.deactivated, run.unchanged), (0, 3));

        // Desired again: reactivated by an update.
        let run = sync_users(&client, &want, &managed, DeprovisionMode::Deactivate, 4)
            .await
            .unwrap();
        assert_eq!(run.updated, 1);
        assert!(server.users().iter().all(|u| u.active == Some(true)));

        // A user the listing did not show (created behind our back after the list): the POST
        // gets 409 and the existing user is adopted and brought to the desired state.
        let other = client
            .create_user(&ScimUser {
                user_name: "USER0777@example.org".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let outcome = create(&client, &desired(777)).await;
        match outcome {
            Outcome::Adopted { id, patched } => {
                assert_eq!(Some(id), other.id);
                assert!(patched);
            }
            _ => panic!("expected adoption"),
        }
        let adopted = server
            .users()
            .into_iter()
            .find(|u| u.id == other.id)
            .unwrap();
        assert_eq!(adopted.external_id.as_deref(), Some("ext-0777"));
        assert_eq!(adopted.user_name, "user0777@example.org");
        server.shutdown().await;
    }

    /// Passes requests to `inner`, but loses the answer of every POST (after it landed).
    struct LosePostAnswers(Arc<dyn Transport>);

    impl Transport for LosePostAnswers {
        fn send(
            &self,
            request: ScimRequest,
        ) -> BoxFuture<'_, Result<ScimResponse, TransportError>> {
            Box::pin(async move {
                let post = request.method == http::Method::POST;
                let response = self.0.send(request).await?;
                if post {
                    return Err(TransportError::Tunnel {
                        detail: "agent disconnected".into(),
                    });
                }
                Ok(response)
            })
        }
    }

    #[tokio::test]
    async fn a_create_whose_answer_was_lost_is_found_not_repeated() {
        let (server, transport) = demo(None).await;
        let lossy = ScimClient::new(
            Arc::new(LosePostAnswers(transport)),
            server.base_path().to_string(),
            None,
            100,
        );
        let want: Vec<DesiredUser> = (0..5).map(desired).collect();
        let run = sync_users(&lossy, &want, &HashSet::new(), DeprovisionMode::Delete, 2)
            .await
            .unwrap();
        assert_eq!((run.created, run.failed), (5, 0), "{:?}", run.first_error);
        assert_eq!(run.managed_after.len(), 5);
        // list + 5 × (POST + lookup): nothing posted twice.
        assert_eq!(run.requests, 11);
        assert_eq!(server.user_count(), 5);
        server.shutdown().await;
    }

    /// Lists no users and answers every other request with 401.
    struct RejectWrites(AtomicUsize);

    impl Transport for RejectWrites {
        fn send(
            &self,
            request: ScimRequest,
        ) -> BoxFuture<'_, Result<ScimResponse, TransportError>> {
            self.0.fetch_add(1, Ordering::Relaxed);
            let (status, body) = if request.method == http::Method::GET {
                (200, json!({"totalResults": 0, "Resources": []}))
            } else {
                (401, json!({"status": "401", "detail": "token expired"}))
            };
            Box::pin(async move {
                Ok(ScimResponse {
                    status,
                    headers: vec![],
                    body: serde_json::to_vec(&body).unwrap(),
                })
            })
        }
    }

    #[tokio::test]
    async fn a_systemic_failure_stops_the_run() {
        let transport = Arc::new(RejectWrites(AtomicUsize::new(0)));
        let client = ScimClient::new(transport.clone(), "/scim/v2".into(), None, 100);
        let want: Vec<DesiredUser> = (0..50).map(desired).collect();
        let run = sync_users(&client, &want, &HashSet::new(), DeprovisionMode::Delete, 1)
            .await
            .unwrap();
        assert_eq!((run.created, run.failed), (0, 50));
        assert_eq!(run.requests, 2);
        assert_eq!(transport.0.load(Ordering::Relaxed), 2);
        // The server's own words are part of the message.
        assert_eq!(
            run.first_error.unwrap().diagnosis(),
            "authentication failed (401): check the app's auth mode and secret (server said: \
             token expired)"
        );
    }

    #[tokio::test]
    async fn wrong_token_stops_the_run_with_one_actionable_error() {
        let (server, transport) = demo(Some("right")).await;
        let client = ScimClient::new(
            transport,
            server.base_path().to_string(),
            Some("Bearer wrong".into()),
            100,
        );
        let err = sync_users(
            &client,
            &[desired(1)],
            &HashSet::new(),
            DeprovisionMode::Delete,
            2,
        )
        .await
        .unwrap_err();
        assert_eq!(
            err.diagnosis(),
            "authentication failed (401): check the app's auth mode and secret (server said: \
             missing or wrong bearer token)"
        );
        let wrong_base = ScimClient::new(
            Arc::new(HttpTransport::new(
                server.local_addr(),
                server.local_addr().to_string(),
            )),
            "/scim/v1".into(),
            Some("Bearer right".into()),
            100,
        );
        let err = wrong_base.check_base().await.unwrap_err();
        assert!(
            err.diagnosis().starts_with(
                "endpoint not found (404) at /scim/v1/ServiceProviderConfig: check the base URL"
            ),
            "{}",
            err.diagnosis()
        );
        server.shutdown().await;
    }
}
