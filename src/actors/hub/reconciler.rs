//! Reconciler: one per application. Decides when to run (at start after a short grace, every
//! interval, on demand, and again as soon as a connector appears after a run that had none),
//! computes the desired users and groups from the directory and the access rule, and applies
//! the plans through the tunnel. Each run is recorded, with its operations, in the state store.
//!
//! One run at a time: the run goes on in a task of its own that reports back, so the actor keeps
//! answering (status, last run) while it lasts, and a forced sync that arrives meanwhile joins
//! the running run instead of starting another. It only ever deprovisions users, and renames or
//! deletes groups, recorded as managed for its own application.
//!
//! A run is in the store from its start: should the hub stop or crash before it ends, the run
//! shows as interrupted (marked when the reconciler stops, or at the next hub start), never as
//! running forever. A run also records the agents lost while they carried its requests and
//! how many requests were re-sent through another agent.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::task::AbortHandle;
use tracing::{info, warn};

use super::tunnel_transport::TunnelTransport;
use crate::config::directory::{DirUser, Directory, GrantedGroup};
use crate::config::hub::{AppConfig, DeprovisionMode as ConfigMode};
use crate::messages::hub::{
    ReconcilerMsg, ReconcilerStatus, RegistryMsg, RunState, RunSummary, SyncOutcome,
};
use crate::scim::client::ScimClient;
use crate::scim::diff::{DeprovisionMode, DesiredUser};
use crate::scim::error::NO_CONNECTOR;
use crate::scim::group_diff::DesiredGroup;
use crate::scim::outcome::ResourceOp;
use crate::scim::resources::ScimEmail;
use crate::scim::sync::{sync, Managed, SyncError, SyncOptions};
use crate::store::Store;

/// What a Reconciler starts from.
#[derive(Clone)]
pub struct ReconcilerArgs {
    pub app: AppConfig,
    pub directory: PathBuf,
    pub registry: ActorRef<RegistryMsg>,
    pub store: Arc<Store>,
    /// Delay before the first scheduled run, so agents can reconnect after a hub restart.
    pub startup_grace: Duration,
}

/// The Reconciler actor.
pub struct Reconciler;

/// The message of a run the hub stopped in the middle of.
pub const INTERRUPTED: &str = "interrupted: the hub stopped during this run, so its counts \
    and operations are not recorded; the next run lists the application afresh and completes \
    the work";

/// The run going on now.
struct Running {
    /// Its row in the store (0 when it could not be recorded).
    run_id: i64,
    started_unix_ms: u64,
    /// Forced syncs waiting for this run, each marked whether it joined a run it did not start.
    waiters: Vec<(RpcReplyPort<SyncOutcome>, bool)>,
    /// The run itself, to stop it with the actor.
    task: AbortHandle,
}

/// Schedule, last result and current run of one application.
pub struct ReconcilerState {
    args: ReconcilerArgs,
    next_due: Instant,
    last: Option<RunSummary>,
    running: Option<Running>,
}

impl Actor for Reconciler {
    type Msg = ReconcilerMsg;
    type State = ReconcilerState;
    type Arguments = ReconcilerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: ReconcilerArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let last = args.store.last_run(&args.app.name).unwrap_or_else(|e| {
            warn!(app = %args.app.name, "cannot read the last run: {e}");
            None
        });
        let _ = args.registry.cast(RegistryMsg::Watch {
            service: args.app.service.clone(),
            target: args.app.target.clone(),
            reconciler: myself.clone(),
        });
        myself.send_after(args.startup_grace, || ReconcilerMsg::Tick);
        Ok(ReconcilerState {
            next_due: Instant::now() + args.startup_grace,
            args,
            last,
            running: None,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            ReconcilerMsg::Tick => {
                // Ticks from superseded schedules arrive early and are ignored; a run going on
                // reschedules when it ends.
                if Instant::now() >= state.next_due && state.running.is_none() {
                    start_run(&myself, state, None);
                }
            }
            ReconcilerMsg::ForceSync(reply) => match &mut state.running {
                Some(running) => {
                    info!(app = %state.args.app.name, "forced sync joins the run already going");
                    running.waiters.push((reply, true));
                }
                None => start_run(&myself, state, Some(reply)),
            },
            ReconcilerMsg::LastRun(reply) => {
                let _ = reply.send(state.last.clone());
            }
            ReconcilerMsg::Status(reply) => {
                let _ = reply.send(ReconcilerStatus {
                    last: state.last.clone(),
                    running_since_unix_ms: state.running.as_ref().map(|r| r.started_unix_ms),
                });
            }
            ReconcilerMsg::ConnectorAvailable => {
                let waiting_for_connector = state.last.as_ref().is_some_and(|l| {
                    !l.ok
                        && l.message
                            .as_deref()
                            .is_some_and(|m| m.starts_with(NO_CONNECTOR))
                });
                if waiting_for_connector && state.running.is_none() {
                    info!(app = %state.args.app.name, "a connector is available again; running now");
                    start_run(&myself, state, None);
                }
            }
            ReconcilerMsg::RunFinished(summary) => {
                let interval = state.args.app.interval;
                state.next_due = Instant::now() + interval;
                myself.send_after(interval, || ReconcilerMsg::Tick);
                if let Some(running) = state.running.take() {
                    for (reply, joined) in running.waiters {
                        let _ = reply.send(SyncOutcome {
                            run: (*summary).clone(),
                            joined,
                        });
                    }
                }
                state.last = Some(*summary);
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // The run's requests stop with it; its waiters hear that the reconciler is gone.
        if let Some(running) = state.running.take() {
            running.task.abort();
            if running.run_id > 0 {
                if let Err(e) = state.args.store.interrupt_run(running.run_id, INTERRUPTED) {
                    warn!(app = %state.args.app.name, "cannot record the interrupted run: {e}");
                }
            }
        }
        Ok(())
    }
}

/// Starts a run in a task of its own, which reports back with [`ReconcilerMsg::RunFinished`],
/// even when the run panics.
fn start_run(
    myself: &ActorRef<ReconcilerMsg>,
    state: &mut ReconcilerState,
    waiter: Option<RpcReplyPort<SyncOutcome>>,
) {
    let started = SystemTime::now();
    let args = state.args.clone();
    let me = myself.clone();
    let app = args.app.name.clone();
    let run_id = args
        .store
        .begin_run(&app, unix_ms(started))
        .unwrap_or_else(|e| {
            warn!(app = %app, "cannot record the start of the run: {e}");
            0
        });
    let store = args.store.clone();
    let run = tokio::spawn(async move { run_once(&args, started, run_id).await });
    let task = run.abort_handle();
    tokio::spawn(async move {
        let summary = match run.await {
            Ok(summary) => summary,
            // Aborted with the reconciler, which records the run as interrupted itself.
            Err(e) if e.is_cancelled() => return,
            Err(e) => {
                warn!(app = %app, "the run failed inside the hub: {e}");
                let mut summary = RunSummary {
                    app,
                    run_id,
                    started_unix_ms: unix_ms(started),
                    message: Some(format!(
                        "internal error of the hub during the run ({e}): see the hub's log; the next run starts afresh"
                    )),
                    ..Default::default()
                };
                match store.finish_run(run_id, &summary, &[]) {
                    Ok(id) => summary.run_id = id,
                    Err(e) => warn!(app = %summary.app, "cannot record the run: {e}"),
                }
                summary
            }
        };
        let _ = me.cast(ReconcilerMsg::RunFinished(Box::new(summary)));
    });
    state.running = Some(Running {
        run_id,
        started_unix_ms: unix_ms(started),
        waiters: waiter.map(|w| (w, false)).into_iter().collect(),
        task,
    });
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// One full reconciliation of the application's users and groups, recorded in the store as the
/// end of run `run_id` (begun with [`Store::begin_run`]; 0 records it as a new run).
pub async fn run_once(args: &ReconcilerArgs, started: SystemTime, run_id: i64) -> RunSummary {
    let app = &args.app;
    let clock = Instant::now();
    let mut summary = RunSummary {
        app: app.name.clone(),
        started_unix_ms: unix_ms(started),
        ..Default::default()
    };
    let mut operations = Vec::new();
    let outcome = reconcile(args, &mut summary, &mut operations).await;
    summary.duration_ms = clock.elapsed().as_millis() as u64;
    match outcome {
        Ok(()) => summary.ok = summary.failed == 0,
        Err(message) => {
            summary.ok = false;
            summary.message = Some(message);
        }
    }
    summary.state = RunState::Finished;
    let recorded = if run_id > 0 {
        args.store.finish_run(run_id, &summary, &operations)
    } else {
        args.store.record_run(&summary, &operations)
    };
    match recorded {
        Ok(id) => summary.run_id = id,
        Err(e) => warn!(app = %app.name, "cannot record the run: {e}"),
    }
    if !summary.agents_lost.is_empty() {
        let lost: Vec<&str> = summary
            .agents_lost
            .iter()
            .map(|a| a.agent.as_str())
            .collect();
        warn!(app = %app.name, agents = ?lost, rerouted = summary.rerouted, "agents were lost during the run");
    }
    if summary.ok {
        info!(app = %app.name, created = summary.created, updated = summary.updated, deprovisioned = summary.deprovisioned(), unchanged = summary.unchanged, groups_created = summary.groups.created, groups_updated = summary.groups.updated, groups_deleted = summary.groups.deleted, "sync finished");
    } else {
        warn!(app = %app.name, failed = summary.failed, "sync failed: {}", summary.message.as_deref().unwrap_or("see failures"));
    }
    summary
}

/// Runs the sync; its operations go to `operations`, which the caller stores with the run.
async fn reconcile(
    args: &ReconcilerArgs,
    summary: &mut RunSummary,
    operations: &mut Vec<ResourceOp>,
) -> Result<(), String> {
    let app = &args.app;
    let directory = Directory::load(&args.directory).map_err(|e| e.to_string())?;
    let granted = directory.granted(&app.grant);
    let desired: Vec<DesiredUser> = granted.users.iter().map(desired_user).collect();
    let groups: Vec<DesiredGroup> = if app.provision_groups {
        granted.groups.iter().map(desired_group).collect()
    } else {
        Vec::new()
    };
    summary.desired = desired.len();
    summary.groups_desired = groups.len();

    let store_error = |e: crate::store::StoreError| e.to_string();
    let managed = Managed {
        users: args.store.managed_users(&app.name).map_err(store_error)?,
        groups: args.store.managed_groups(&app.name).map_err(store_error)?,
    };
    let transport = Arc::new(TunnelTransport::new(args.registry.clone(), app));
    let client = ScimClient::new(
        transport.clone(),
        app.base_url.path.clone(),
        app.auth.authorization().map(|s| s.expose().to_string()),
        app.page_size,
    )
    .with_max_in_flight(app.concurrency);
    let options = SyncOptions {
        mode: match app.deprovision {
            ConfigMode::Delete => DeprovisionMode::Delete,
            ConfigMode::Deactivate => DeprovisionMode::Deactivate,
        },
        guard: app.deletion_guard,
        concurrency: app.concurrency,
        member_batch: app.member_batch_size as usize,
        groups: app.provision_groups,
    };
    let report = sync(&client, &desired, &groups, &managed, &options).await;
    // Recorded whether the run went through or not: a failover is worth knowing either way.
    summary.agents_lost = transport.lost_agents();
    summary.rerouted = client.reroute_count();
    let report = report.map_err(|e| sync_diagnosis(&e, &app.name))?;
    args.store
        .set_managed_users(&app.name, &report.managed_after.users)
        .map_err(store_error)?;
    args.store
        .set_managed_groups(&app.name, &report.managed_after.groups)
        .map_err(store_error)?;
    summary.created = report.created;
    summary.updated = report.updated;
    summary.deactivated = report.deactivated;
    summary.deleted = report.deleted;
    summary.unchanged = report.unchanged;
    summary.unmanaged = report.unmanaged;
    summary.groups = report.groups;
    summary.failed = report.failed;
    summary.requests = report.requests;
    summary.retries = report.retries;
    summary.message = report.first_error.as_ref().map(|e| e.diagnosis());
    operations.extend(report.operations);
    Ok(())
}

/// The Last Sync message of a run of `app` that changed nothing, naming the hub.toml key to
/// change where one applies.
pub fn sync_diagnosis(error: &SyncError, app: &str) -> String {
    match error {
        SyncError::List(e) => e.diagnosis(),
        SyncError::GroupsUnsupported(e) => format!(
            "{}; if the app has no Groups, set apps.{app}.provision_groups = false in hub.toml",
            e.diagnosis(),
        ),
        SyncError::Guard(refusal) => refusal.message(&format!("apps.{app}.deletion_guard")),
    }
}

/// The SCIM shape of a directory user as this application should hold it.
pub fn desired_user(user: &DirUser) -> DesiredUser {
    DesiredUser {
        external_id: user.id.clone(),
        user_name: user.user_name.clone(),
        display_name: user.display_name.clone(),
        given_name: user.name.as_ref().and_then(|n| n.given_name.clone()),
        family_name: user.name.as_ref().and_then(|n| n.family_name.clone()),
        formatted_name: user.name.as_ref().and_then(|n| n.formatted.clone()),
        emails: user
            .emails
            .iter()
            .map(|e| ScimEmail {
                value: e.value.clone(),
                kind: e.kind.clone(),
                primary: Some(e.primary),
            })
            .collect(),
        active: user.active,
    }
}

/// The SCIM shape of a granted group: its members are the directory ids of granted users,
/// which are those users' externalIds in the application.
pub fn desired_group(group: &GrantedGroup) -> DesiredGroup {
    DesiredGroup {
        external_id: group.id.clone(),
        display_name: group.display_name.clone(),
        members: group.member_user_ids.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::hub::HubConfig;
    use crate::scim::error::ScimError;
    use crate::scim::guard::DeletionGuard;

    fn sample_app() -> AppConfig {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/hub.toml");
        HubConfig::load(&path).unwrap().apps.remove(0)
    }

    #[test]
    fn run_messages_name_the_setting_to_change() {
        let app = sample_app();
        let refusal = DeletionGuard::Count(5).check(9, 1, 40).unwrap_err();
        let m = sync_diagnosis(&SyncError::Guard(refusal), &app.name);
        assert!(
            m.starts_with("deletion guard stopped the run: it would deprovision 9 users and delete 1 group (10 of the 40"),
            "{m}"
        );
        assert!(
            m.contains("raise apps.crm.deletion_guard in hub.toml"),
            "{m}"
        );
        let not_found = ScimError::Status {
            method: "GET".into(),
            path: "/scim/v2/Groups".into(),
            status: 404,
            scim_type: None,
            detail: None,
        };
        let m = sync_diagnosis(&SyncError::GroupsUnsupported(not_found), &app.name);
        assert!(
            m.starts_with("endpoint not found (404) at /scim/v2/Groups"),
            "{m}"
        );
        assert!(
            m.ends_with(
                "if the app has no Groups, set apps.crm.provision_groups = false in hub.toml"
            ),
            "{m}"
        );
    }

    #[test]
    fn granted_groups_become_desired_groups_of_external_ids() {
        let g = GrantedGroup {
            id: "g-eng".into(),
            display_name: "Engineering".into(),
            member_user_ids: vec!["u1".into(), "u2".into()],
        };
        assert_eq!(
            desired_group(&g),
            DesiredGroup {
                external_id: "g-eng".into(),
                display_name: "Engineering".into(),
                members: vec!["u1".into(), "u2".into()],
            }
        );
    }
}
