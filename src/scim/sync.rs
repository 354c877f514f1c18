//! One synchronisation run: list, plan, guard, apply, count.
//!
//! It owns the order and the safety rules of applying a [`UserPlan`] and a [`GroupPlan`]:
//! 1. managed groups no longer granted are deleted, and the desired groups found on the server
//!    are renamed and lose every member that is not a granted user — so a user's memberships
//!    are gone before the user is deprovisioned (servers do not do it for us). A rename is a
//!    request of its own, so that one the server refuses never holds the removals back, and a
//!    displayName another group keeps is never sent at all (see [`GroupPlan`]);
//! 2. users are deprovisioned, then updated, then created (so freed user names are free before
//!    they are reused);
//! 3. new groups are created and the found ones gain their missing members — only now, since
//!    members must exist before a group can reference them.
//!
//! Before anything is sent, the deletion guard may refuse the whole run. A 409 on create adopts
//! the existing resource instead of failing; a create whose outcome is unknown is looked up
//! (users by externalId, then userName) and sent again only once the lookup shows it did not
//! land; a systemic failure (bad credentials, no connector) stops the run
//! instead of failing every remaining operation one by one. It never touches a resource outside
//! the plans, and never retries a POST blindly (transient faults of idempotent requests are
//! retried by the client's request layer).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};

use futures_util::stream::{self, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::scim::client::ScimClient;
use crate::scim::diff::{
    plan_users, update_ops, Deprovision, DeprovisionMode, DesiredUser, UserPlan, UserUpdate,
};
use crate::scim::error::ScimError;
use crate::scim::group_diff::{
    change_for, member_patches, plan_groups, DesiredGroup, GroupChange, GroupDelete, GroupPlan,
    NameTaken,
};
use crate::scim::guard::{DeletionGuard, GuardRefusal};
use crate::scim::outcome::{OpKind, OpResult, ResourceKind, ResourceOp};
use crate::scim::resources::{GroupMember, PatchOp, PatchOpKind, ScimGroup, ScimUser};

/// How a run applies its plans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncOptions {
    pub mode: DeprovisionMode,
    pub guard: DeletionGuard,
    /// Requests in flight at once (at least 1).
    pub concurrency: usize,
    /// Member values per group PATCH (and in a group's POST), at least 1.
    pub member_batch: usize,
    /// When false, Groups are neither listed nor touched (apps without a Groups endpoint).
    pub groups: bool,
}

impl SyncOptions {
    /// Defaults for `mode`: the default guard, 8 in flight, 100 members per PATCH, groups on.
    pub fn new(mode: DeprovisionMode) -> Self {
        SyncOptions {
            mode,
            guard: DeletionGuard::DEFAULT,
            concurrency: 8,
            member_batch: 100,
            groups: true,
        }
    }
}

/// SCIM ids of the resources this hub manages in one application.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Managed {
    pub users: HashSet<String>,
    pub groups: HashSet<String>,
}

/// What a run did to groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct GroupCounts {
    pub created: usize,
    /// Existing groups renamed or re-membered (all their requests succeeded).
    pub updated: usize,
    pub deleted: usize,
    pub unchanged: usize,
    /// Groups on the server this hub neither manages nor wants: never touched.
    pub unmanaged: usize,
    /// Member values added / removed by successful requests.
    pub members_added: usize,
    pub members_removed: usize,
}

/// What one run did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SyncReport {
    /// Users created (or found after a lost answer), and so on for the other user counts.
    pub created: usize,
    pub updated: usize,
    pub deactivated: usize,
    pub deleted: usize,
    pub unchanged: usize,
    pub unmanaged: usize,
    pub groups: GroupCounts,
    /// Operations that failed, plus those not attempted after a systemic failure.
    pub failed: usize,
    /// What this hub manages after the run: the managed resources still present on the
    /// server, plus those created or adopted, minus those deleted.
    pub managed_after: Managed,
    /// The error of the earliest failed operation in plan order; its
    /// [`diagnosis`](ScimError::diagnosis) is the run's message.
    pub first_error: Option<ScimError>,
    /// Requests sent by the client during the run (listing included, retries included).
    pub requests: usize,
    /// Of those, retries of transient faults and throttled answers.
    pub retries: usize,
    /// Of those retries, requests sent again after the agent carrying them was lost.
    pub rerouted: usize,
    /// Every planned operation and how it ended, in plan order.
    pub operations: Vec<ResourceOp>,
}

/// Why a run changed nothing at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    /// The current users or groups could not be listed.
    #[error(transparent)]
    List(#[from] ScimError),
    /// Listing Groups found no such endpoint (404 or 501) although Users could be listed.
    #[error("{0}")]
    GroupsUnsupported(ScimError),
    /// The plan would deprovision more than the deletion guard allows.
    #[error("{0}")]
    Guard(GuardRefusal),
}

/// One unit of work; the phases of a run are lists of these.
enum Op<'a> {
    DeleteGroup(&'a GroupDelete),
    PruneGroup(&'a GroupChange),
    Deprovision(&'a Deprovision),
    UpdateUser(&'a UserUpdate),
    CreateUser(&'a DesiredUser),
    CreateGroup(&'a DesiredGroup, Vec<String>),
    /// A group not created because its displayName is taken: recorded, nothing sent.
    RefuseGroup(&'a DesiredGroup, &'a NameTaken),
    FillGroup(&'a GroupChange, Vec<String>),
}

impl Op<'_> {
    /// The record an operation leaves when it is not attempted.
    fn skipped(&self, mode: DeprovisionMode) -> ResourceOp {
        let (kind, resource, id, ext, name) = match self {
            Op::DeleteGroup(g) => (
                OpKind::Delete,
                ResourceKind::Group,
                Some(g.id.as_str()),
                g.external_id.as_deref(),
                g.display_name.as_str(),
            ),
            Op::PruneGroup(c) => (
                if c.ops.is_empty() && c.name_taken.is_none() {
                    OpKind::RemoveMembers
                } else {
                    OpKind::Update
                },
                ResourceKind::Group,
                Some(c.id.as_str()),
                Some(c.desired.external_id.as_str()),
                c.desired.display_name.as_str(),
            ),
            Op::Deprovision(d) => (
                match mode {
                    DeprovisionMode::Delete => OpKind::Delete,
                    DeprovisionMode::Deactivate => OpKind::Deactivate,
                },
                ResourceKind::User,
                Some(d.id.as_str()),
                d.external_id.as_deref(),
                d.user_name.as_str(),
            ),
            Op::UpdateUser(u) => (
                OpKind::Update,
                ResourceKind::User,
                Some(u.id.as_str()),
                Some(u.external_id.as_str()),
                u.user_name.as_str(),
            ),
            Op::CreateUser(d) => (
                OpKind::Create,
                ResourceKind::User,
                None,
                Some(d.external_id.as_str()),
                d.user_name.as_str(),
            ),
            Op::CreateGroup(g, _) | Op::RefuseGroup(g, _) => (
                OpKind::Create,
                ResourceKind::Group,
                None,
                Some(g.external_id.as_str()),
                g.display_name.as_str(),
            ),
            Op::FillGroup(c, _) => (
                OpKind::AddMembers,
                ResourceKind::Group,
                Some(c.id.as_str()),
                Some(c.desired.external_id.as_str()),
                c.desired.display_name.as_str(),
            ),
        };
        record(kind, resource, id, ext, name, 0, OpResult::NotAttempted)
    }
}

/// What one [`Op`] did: its records, its effect on the counts and the managed sets, and its
/// first error.
#[derive(Default)]
struct Done {
    records: Vec<ResourceOp>,
    users: UserDelta,
    groups: GroupCounts,
    manage: Vec<Manage>,
    /// A user created or adopted during the run: (external id, SCIM id).
    new_user: Option<(String, String)>,
    /// A desired group found on the server whose change failed.
    failed_group: Option<String>,
    /// Whether the missing members of `failed_group` are still to be added later in the run:
    /// only its rename failed, its removals went out.
    fill_anyway: bool,
    error: Option<ScimError>,
}

#[derive(Default)]
struct UserDelta {
    created: usize,
    updated: usize,
    deactivated: usize,
    deleted: usize,
    unchanged: usize,
}

enum Manage {
    AddUser(String),
    RemoveUser(String),
    AddGroup(String),
    RemoveGroup(String),
}

fn record(
    kind: OpKind,
    resource: ResourceKind,
    id: Option<&str>,
    external_id: Option<&str>,
    name: &str,
    members: usize,
    result: OpResult,
) -> ResourceOp {
    ResourceOp {
        kind,
        resource,
        id: id.map(str::to_string),
        external_id: external_id.map(str::to_string),
        name: name.to_string(),
        members,
        result,
    }
}

fn failed(e: &ScimError) -> OpResult {
    OpResult::Failed {
        message: e.diagnosis(),
    }
}

/// Bring the application's users and groups to `users` and `groups`.
///
/// Changes nothing when the current state cannot be listed or the deletion guard refuses the
/// plan; every other failure is counted in the report, with the first one kept. `managed`
/// holds what this hub created or adopted in earlier runs.
pub async fn sync(
    client: &ScimClient,
    users: &[DesiredUser],
    groups: &[DesiredGroup],
    managed: &Managed,
    options: &SyncOptions,
) -> Result<SyncReport, SyncError> {
    let before = client.request_count();
    let retries_before = client.retry_count();
    let reroutes_before = client.reroute_count();
    let current_users = client.list_users().await?;
    // Groups are listed only when there is something to do with them: apps that only grant
    // users cost no extra request, and apps without Groups keep working.
    let with_groups = options.groups && !(groups.is_empty() && managed.groups.is_empty());
    let current_groups = if with_groups {
        client.list_groups().await.map_err(|e| match e.status() {
            Some(404 | 501) => SyncError::GroupsUnsupported(e),
            _ => SyncError::List(e),
        })?
    } else {
        Vec::new()
    };

    let user_plan = plan_users(users, &current_users, &managed.users, options.mode);
    let known_ids: HashMap<String, String> = user_plan
        .matched
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let wanted_groups: &[DesiredGroup] = if options.groups { groups } else { &[] };
    let group_plan = plan_groups(wanted_groups, &current_groups, &managed.groups, &known_ids);
    tracing::debug!(
        create = user_plan.create.len(),
        update = user_plan.update.len(),
        deprovision = user_plan.deprovision.len(),
        adopt = user_plan.adopt.len(),
        groups_create = group_plan.create.len(),
        groups_found = group_plan.change.len(),
        groups_delete = group_plan.delete.len(),
        "plan computed"
    );

    let present_users: HashSet<&str> = current_users
        .iter()
        .filter_map(|u| u.id.as_deref())
        .collect();
    let present_groups: HashSet<&str> = current_groups
        .iter()
        .filter_map(|g| g.id.as_deref())
        .collect();
    // An id the server no longer lists is gone: forgetting it can only make the hub touch
    // less, never more.
    let mut managed_after = Managed {
        users: managed
            .users
            .iter()
            .filter(|id| present_users.contains(id.as_str()))
            .cloned()
            .collect(),
        groups: managed
            .groups
            .iter()
            .filter(|id| present_groups.contains(id.as_str()))
            .cloned()
            .collect(),
    };
    options
        .guard
        .check(
            user_plan.deprovision.len(),
            group_plan.delete.len(),
            managed_after.users.len() + managed_after.groups.len(),
        )
        .map_err(SyncError::Guard)?;
    managed_after
        .users
        .extend(user_plan.adopt.iter().map(|(_, id)| id.clone()));
    managed_after
        .groups
        .extend(group_plan.adopt.iter().map(|(_, id)| id.clone()));

    let mut run = Run {
        client,
        options,
        stop: AtomicBool::new(false),
        seq: 0,
        first_error: None,
        report: SyncReport {
            unchanged: user_plan.unchanged,
            unmanaged: user_plan.unmanaged,
            groups: GroupCounts {
                unmanaged: group_plan.unmanaged,
                ..Default::default()
            },
            managed_after,
            ..Default::default()
        },
        user_ids: known_ids,
        failed_groups: HashSet::new(),
        unfilled_groups: HashSet::new(),
    };
    run.apply(&user_plan, &group_plan).await;
    let mut report = run.report;
    report.first_error = run.first_error.map(|(_, e)| e);
    report.failed = report.operations.iter().filter(|o| !o.succeeded()).count();
    report.requests = client.request_count().saturating_sub(before);
    report.retries = client.retry_count().saturating_sub(retries_before);
    report.rerouted = client.reroute_count().saturating_sub(reroutes_before);
    tracing::info!(
        created = report.created,
        updated = report.updated,
        deactivated = report.deactivated,
        deleted = report.deleted,
        unchanged = report.unchanged,
        unmanaged = report.unmanaged,
        groups_created = report.groups.created,
        groups_updated = report.groups.updated,
        groups_deleted = report.groups.deleted,
        members_added = report.groups.members_added,
        members_removed = report.groups.members_removed,
        failed = report.failed,
        requests = report.requests,
        retries = report.retries,
        rerouted = report.rerouted,
        "sync finished"
    );
    Ok(report)
}

/// The state of one run while its phases are applied.
struct Run<'a> {
    client: &'a ScimClient,
    options: &'a SyncOptions,
    stop: AtomicBool,
    seq: usize,
    first_error: Option<(usize, ScimError)>,
    report: SyncReport,
    /// External id → SCIM id of every desired user known to exist, created ones included.
    user_ids: HashMap<String, String>,
    /// Desired groups found on the server whose change failed: not counted as updated.
    failed_groups: HashSet<String>,
    /// Of those, the ones whose members are not added later in the run.
    unfilled_groups: HashSet<String>,
}

impl Run<'_> {
    async fn apply(&mut self, users: &UserPlan, groups: &GroupPlan) {
        self.phase(groups.delete.iter().map(Op::DeleteGroup).collect())
            .await;
        self.phase(
            groups
                .change
                .iter()
                .filter(|c| !c.is_clean())
                .map(Op::PruneGroup)
                .collect(),
        )
        .await;
        self.phase(users.deprovision.iter().map(Op::Deprovision).collect())
            .await;
        self.phase(users.update.iter().map(Op::UpdateUser).collect())
            .await;
        self.phase(users.create.iter().map(Op::CreateUser).collect())
            .await;

        // Only now are all member ids known.
        let creates: Vec<Op<'_>> = groups
            .create
            .iter()
            .map(|g| Op::CreateGroup(g, g.member_ids(&self.user_ids).into_iter().collect()))
            .chain(
                groups
                    .create_blocked
                    .iter()
                    .map(|(g, t)| Op::RefuseGroup(g, t)),
            )
            .collect();
        let mut fills = Vec::new();
        let mut changed = Vec::new();
        for c in &groups.change {
            let add = c.to_add(&self.user_ids);
            if c.is_clean() && add.is_empty() {
                self.report.groups.unchanged += 1;
                continue;
            }
            changed.push(c.id.clone());
            if !add.is_empty() && !self.unfilled_groups.contains(&c.id) {
                fills.push(Op::FillGroup(c, add));
            }
        }
        self.phase(creates).await;
        self.phase(fills).await;
        self.report.groups.updated += changed
            .iter()
            .filter(|id| !self.failed_groups.contains(*id))
            .count();
    }

    /// Applies `ops` with bounded concurrency and folds their results into the report.
    async fn phase(&mut self, ops: Vec<Op<'_>>) {
        if ops.is_empty() {
            return;
        }
        let numbered: Vec<(usize, Op<'_>)> = ops
            .into_iter()
            .map(|op| {
                self.seq += 1;
                (self.seq, op)
            })
            .collect();
        let client = self.client;
        let options = self.options;
        let stop = &self.stop;
        let ids = &self.user_ids;
        // Futures are built up front: a closure inside the stream type trips the compiler's
        // higher-ranked Send check when this function runs inside an actor.
        let futures: Vec<_> = numbered
            .into_iter()
            .map(|(n, op)| async move { (n, apply(client, op, options, ids, stop).await) })
            .collect();
        let mut outcomes: Vec<(usize, Done)> = stream::iter(futures)
            .buffer_unordered(options.concurrency.max(1))
            .collect()
            .await;
        outcomes.sort_by_key(|(n, _)| *n);
        for (n, done) in outcomes {
            self.fold(n, done);
        }
    }

    fn fold(&mut self, n: usize, done: Done) {
        let r = &mut self.report;
        r.created += done.users.created;
        r.updated += done.users.updated;
        r.deactivated += done.users.deactivated;
        r.deleted += done.users.deleted;
        r.unchanged += done.users.unchanged;
        let g = &mut r.groups;
        g.created += done.groups.created;
        g.updated += done.groups.updated;
        g.deleted += done.groups.deleted;
        g.unchanged += done.groups.unchanged;
        g.members_added += done.groups.members_added;
        g.members_removed += done.groups.members_removed;
        for m in done.manage {
            match m {
                Manage::AddUser(id) => r.managed_after.users.insert(id),
                Manage::RemoveUser(id) => r.managed_after.users.remove(&id),
                Manage::AddGroup(id) => r.managed_after.groups.insert(id),
                Manage::RemoveGroup(id) => r.managed_after.groups.remove(&id),
            };
        }
        r.operations.extend(done.records);
        if let Some((ext, id)) = done.new_user {
            self.user_ids.insert(ext, id);
        }
        if let Some(id) = done.failed_group {
            if !done.fill_anyway {
                self.unfilled_groups.insert(id.clone());
            }
            self.failed_groups.insert(id);
        }
        if let Some(e) = done.error {
            if self.first_error.as_ref().is_none_or(|(m, _)| n < *m) {
                self.first_error = Some((n, e));
            }
        }
    }
}

async fn apply(
    client: &ScimClient,
    op: Op<'_>,
    options: &SyncOptions,
    ids: &HashMap<String, String>,
    stop: &AtomicBool,
) -> Done {
    if stop.load(Ordering::Relaxed) {
        return Done {
            records: vec![op.skipped(options.mode)],
            ..Default::default()
        };
    }
    let batch = options.member_batch.max(1);
    let done = match op {
        Op::DeleteGroup(g) => delete_group(client, g).await,
        Op::PruneGroup(c) => prune_group(client, c, batch).await,
        Op::Deprovision(d) => deprovision(client, d, options.mode).await,
        Op::UpdateUser(u) => update_user(client, u).await,
        Op::CreateUser(d) => create_user(client, d).await,
        Op::CreateGroup(g, members) => create_group(client, g, &members, ids, batch).await,
        Op::RefuseGroup(g, taken) => refuse_group(g, taken),
        Op::FillGroup(c, add) => fill_group(client, c, &add, batch).await,
    };
    if let Some(e) = &done.error {
        tracing::warn!(error = %e, "SCIM operation failed");
        if e.is_systemic() {
            stop.store(true, Ordering::Relaxed);
        }
    }
    done
}

async fn deprovision(client: &ScimClient, d: &Deprovision, mode: DeprovisionMode) -> Done {
    let (kind, result) = match mode {
        DeprovisionMode::Delete => (OpKind::Delete, client.delete_user(&d.id).await),
        DeprovisionMode::Deactivate => (
            OpKind::Deactivate,
            client
                .patch_user(&d.id, &[PatchOp::replace("active", json!(false))])
                .await,
        ),
    };
    let rec = |result| {
        record(
            kind,
            ResourceKind::User,
            Some(&d.id),
            d.external_id.as_deref(),
            &d.user_name,
            0,
            result,
        )
    };
    let mut done = Done::default();
    match (result, mode) {
        (Ok(()), DeprovisionMode::Delete) => {
            done.users.deleted = 1;
            done.manage.push(Manage::RemoveUser(d.id.clone()));
            done.records.push(rec(OpResult::Ok));
        }
        (Ok(()), DeprovisionMode::Deactivate) => {
            done.users.deactivated = 1;
            done.records.push(rec(OpResult::Ok));
        }
        // DELETE is idempotent: a user already gone is deleted.
        (Err(e), DeprovisionMode::Delete) if e.status() == Some(404) => {
            done.users.deleted = 1;
            done.manage.push(Manage::RemoveUser(d.id.clone()));
            done.records.push(rec(OpResult::AlreadyGone));
        }
        (Err(e), DeprovisionMode::Deactivate) if e.status() == Some(404) => {
            done.users.unchanged = 1;
            done.manage.push(Manage::RemoveUser(d.id.clone()));
            done.records.push(rec(OpResult::AlreadyGone));
        }
        (Err(e), _) => {
            done.records.push(rec(failed(&e)));
            done.error = Some(e);
        }
    }
    done
}

async fn update_user(client: &ScimClient, u: &UserUpdate) -> Done {
    let result = client.patch_user(&u.id, &u.ops).await;
    let mut done = Done::default();
    let outcome = match result {
        Ok(()) => {
            done.users.updated = 1;
            OpResult::Ok
        }
        Err(e) => {
            let r = failed(&e);
            done.error = Some(e);
            r
        }
    };
    done.records.push(record(
        OpKind::Update,
        ResourceKind::User,
        Some(&u.id),
        Some(&u.external_id),
        &u.user_name,
        0,
        outcome,
    ));
    done
}

fn user_record(d: &DesiredUser, kind: OpKind, id: Option<&str>, result: OpResult) -> ResourceOp {
    record(
        kind,
        ResourceKind::User,
        id,
        Some(&d.external_id),
        &d.user_name,
        0,
        result,
    )
}

fn user_failed(d: &DesiredUser, kind: OpKind, e: ScimError) -> Done {
    Done {
        records: vec![user_record(d, kind, None, failed(&e))],
        error: Some(e),
        ..Default::default()
    }
}

/// A user now on the server under `id`, by our create (`created`) or taken over.
fn user_taken(d: &DesiredUser, id: String, kind: OpKind) -> Done {
    Done {
        records: vec![user_record(d, kind, Some(&id), OpResult::Ok)],
        manage: vec![Manage::AddUser(id.clone())],
        new_user: Some((d.external_id.clone(), id)),
        ..Default::default()
    }
}

async fn create_user(client: &ScimClient, d: &DesiredUser) -> Done {
    let error = match client.create_user(&d.to_scim_user()).await {
        Ok(user) => {
            let mut done = user_taken(d, user.id.unwrap_or_default(), OpKind::Create);
            done.users.created = 1;
            return done;
        }
        Err(e) => e,
    };
    if error.status() != Some(409) && !error.may_have_landed() {
        return user_failed(d, OpKind::Create, error);
    }
    // Either the user name is taken (409) or our POST may have landed without us hearing
    // back: find the user (by externalId, then userName) rather than POST again.
    let existing = match client.find_user(&d.external_id, &d.user_name).await {
        Ok(Some(user)) => user,
        Ok(None) if error.may_have_landed() => return create_user_again(client, d, error).await,
        Ok(None) => return user_failed(d, OpKind::Create, error),
        Err(e) => return user_failed(d, OpKind::Create, e),
    };
    let landed =
        error.may_have_landed() && existing.external_id.as_deref() == Some(d.external_id.as_str());
    adopt_user(client, d, existing, landed, error).await
}

/// The lookup after an unknown outcome found nothing: the POST did not land, so it is sent
/// once more. Should the first one land late after all, the server's userName uniqueness
/// answers this one with 409, and the user is adopted rather than created twice.
async fn create_user_again(client: &ScimClient, d: &DesiredUser, first: ScimError) -> Done {
    match client.create_user(&d.to_scim_user()).await {
        Ok(user) => {
            let mut done = user_taken(d, user.id.unwrap_or_default(), OpKind::Create);
            done.users.created = 1;
            done
        }
        Err(e) if e.status() == Some(409) => {
            match client.find_user(&d.external_id, &d.user_name).await {
                Ok(Some(existing)) => {
                    let landed = existing.external_id.as_deref() == Some(d.external_id.as_str());
                    adopt_user(client, d, existing, landed, e).await
                }
                Ok(None) => user_failed(d, OpKind::Create, e),
                Err(e) => user_failed(d, OpKind::Create, e),
            }
        }
        // Unknown again: reported, never repeated a third time; the next run looks it up.
        Err(e) if e.may_have_landed() => user_failed(d, OpKind::Create, first),
        Err(e) => user_failed(d, OpKind::Create, e),
    }
}

/// Brings an existing user to the desired state and takes it over; `landed` says it is the one
/// our own POST created (counted as created, not adopted).
async fn adopt_user(
    client: &ScimClient,
    d: &DesiredUser,
    existing: ScimUser,
    landed: bool,
    error: ScimError,
) -> Done {
    let Some(id) = existing.id.clone() else {
        return user_failed(d, OpKind::Create, error);
    };
    let ops = update_ops(d, &existing);
    let patched = !ops.is_empty();
    if patched {
        if let Err(e) = client.patch_user(&id, &ops).await {
            return user_failed(d, OpKind::Adopt, e);
        }
    }
    if landed {
        let mut done = user_taken(d, id, OpKind::Create);
        done.users.created = 1;
        done
    } else {
        let mut done = user_taken(d, id, OpKind::Adopt);
        if patched {
            done.users.updated = 1;
        } else {
            done.users.unchanged = 1;
        }
        done
    }
}

async fn delete_group(client: &ScimClient, g: &GroupDelete) -> Done {
    let mut done = Done::default();
    let result = match client.delete_group(&g.id).await {
        Ok(()) => OpResult::Ok,
        Err(e) if e.status() == Some(404) => OpResult::AlreadyGone,
        Err(e) => {
            let r = failed(&e);
            done.error = Some(e);
            r
        }
    };
    if matches!(result, OpResult::Ok | OpResult::AlreadyGone) {
        done.groups.deleted = 1;
        done.manage.push(Manage::RemoveGroup(g.id.clone()));
    }
    done.records.push(record(
        OpKind::Delete,
        ResourceKind::Group,
        Some(&g.id),
        g.external_id.as_deref(),
        &g.display_name,
        0,
        result,
    ));
    done
}

/// Member values added and removed by one PATCH request's operations.
fn member_counts(ops: &[PatchOp]) -> (usize, usize) {
    ops.iter().fold((0, 0), |(added, removed), op| match op.op {
        PatchOpKind::Add if op.path.as_deref() == Some("members") => (
            added
                + op.value
                    .as_ref()
                    .and_then(|v| v.as_array())
                    .map_or(0, Vec::len),
            removed,
        ),
        PatchOpKind::Remove if op.path.as_deref().is_some_and(|p| p.starts_with("members")) => {
            (added, removed + 1)
        }
        _ => (added, removed),
    })
}

/// Sends `requests` to group `id` one after the other, stopping at the first failure.
/// Returns how many succeeded, the member values they added and removed, and the failure.
async fn send_patches(
    client: &ScimClient,
    id: &str,
    requests: &[Vec<PatchOp>],
) -> (usize, usize, usize, Option<ScimError>) {
    let (mut sent, mut added, mut removed) = (0, 0, 0);
    for ops in requests {
        if let Err(e) = client.patch_group(id, ops).await {
            return (sent, added, removed, Some(e));
        }
        let (a, r) = member_counts(ops);
        sent += 1;
        added += a;
        removed += r;
    }
    (sent, added, removed, None)
}

/// The refusal of a displayName that `taken` keeps, for the group now named `current` (a
/// rename) or to be created (`None`).
fn name_taken(current: Option<&str>, wanted: &str, taken: &NameTaken) -> ScimError {
    ScimError::NameTaken {
        current: current.map(str::to_string),
        wanted: wanted.to_string(),
        holder_id: taken.id.clone(),
        holder_name: taken.display_name.clone(),
    }
}

/// Renames a found group and removes the members that must go.
///
/// The rename goes in a request of its own, before the removals: a server that refuses it
/// (the name is taken, with a 409) must not hold the removals back, or a leaver would be
/// deprovisioned while still listed as a member.
async fn prune_group(client: &ScimClient, c: &GroupChange, batch: usize) -> Done {
    let mut done = Done::default();
    let rec = |kind, members, result| {
        record(
            kind,
            ResourceKind::Group,
            Some(&c.id),
            Some(&c.desired.external_id),
            &c.desired.display_name,
            members,
            result,
        )
    };
    let mut rename_error = c
        .name_taken
        .as_ref()
        .map(|taken| name_taken(Some(&c.current_name), &c.desired.display_name, taken));
    if !c.ops.is_empty() {
        if let Err(e) = client.patch_group(&c.id, &c.ops).await {
            rename_error.get_or_insert(e);
        }
    }
    if !c.ops.is_empty() || c.name_taken.is_some() {
        let result = rename_error.as_ref().map_or(OpResult::Ok, failed);
        done.records.push(rec(OpKind::Update, 0, result));
    }
    let mut remove_error = None;
    if !c.remove.is_empty() {
        let requests = member_patches(Vec::new(), &c.remove, &[], batch);
        let (_, _, removed, error) = send_patches(client, &c.id, &requests).await;
        done.groups.members_removed = removed;
        let result = error.as_ref().map_or(OpResult::Ok, failed);
        done.records
            .push(rec(OpKind::RemoveMembers, c.remove.len(), result));
        remove_error = error;
    }
    if rename_error.is_some() || remove_error.is_some() {
        done.failed_group = Some(c.id.clone());
        done.fill_anyway = remove_error.is_none();
        done.error = rename_error.or(remove_error);
    }
    done
}

/// A group that is not created because `taken` keeps its displayName: recorded as failed.
fn refuse_group(g: &DesiredGroup, taken: &NameTaken) -> Done {
    let error = name_taken(None, &g.display_name, taken);
    Done {
        records: vec![record(
            OpKind::Create,
            ResourceKind::Group,
            None,
            Some(&g.external_id),
            &g.display_name,
            g.members.len(),
            failed(&error),
        )],
        error: Some(error),
        ..Default::default()
    }
}

/// Adds the missing members of a found group.
async fn fill_group(client: &ScimClient, c: &GroupChange, add: &[String], batch: usize) -> Done {
    let requests = member_patches(Vec::new(), &[], add, batch);
    let (_, added, _, error) = send_patches(client, &c.id, &requests).await;
    let mut done = Done::default();
    done.groups.members_added = added;
    done.records.push(record(
        OpKind::AddMembers,
        ResourceKind::Group,
        Some(&c.id),
        Some(&c.desired.external_id),
        &c.desired.display_name,
        add.len(),
        error.as_ref().map_or(OpResult::Ok, failed),
    ));
    if let Some(e) = error {
        done.failed_group = Some(c.id.clone());
        done.error = Some(e);
    }
    done
}

/// POSTs a new group with its first batch of members, then PATCHes the rest in.
async fn create_group(
    client: &ScimClient,
    g: &DesiredGroup,
    members: &[String],
    ids: &HashMap<String, String>,
    batch: usize,
) -> Done {
    let rec = |kind, id: Option<&str>, members, result| {
        record(
            kind,
            ResourceKind::Group,
            id,
            Some(&g.external_id),
            &g.display_name,
            members,
            result,
        )
    };
    let fail = |e: ScimError| Done {
        records: vec![rec(OpKind::Create, None, members.len(), failed(&e))],
        error: Some(e),
        ..Default::default()
    };
    let (first, rest) = members.split_at(batch.min(members.len()));
    let body = ScimGroup {
        id: None,
        external_id: Some(g.external_id.clone()),
        display_name: g.display_name.clone(),
        members: first.iter().map(|id| GroupMember::user(id)).collect(),
    };
    let error = match client.create_group(&body).await {
        Ok(created) => {
            let id = created.id.unwrap_or_default();
            let mut done = Done {
                records: vec![rec(OpKind::Create, Some(&id), first.len(), OpResult::Ok)],
                manage: vec![Manage::AddGroup(id.clone())],
                ..Default::default()
            };
            done.groups.created = 1;
            done.groups.members_added = first.len();
            if !rest.is_empty() {
                let requests = member_patches(Vec::new(), &[], rest, batch);
                let (_, added, _, error) = send_patches(client, &id, &requests).await;
                done.groups.members_added += added;
                done.records.push(rec(
                    OpKind::AddMembers,
                    Some(&id),
                    rest.len(),
                    error.as_ref().map_or(OpResult::Ok, failed),
                ));
                done.error = error;
            }
            return done;
        }
        Err(e) => e,
    };
    if error.status() != Some(409) && !error.may_have_landed() {
        return fail(error);
    }
    // The name is taken, or our POST may have landed unheard: find the group and bring it to
    // the desired state instead of creating a second one.
    let existing = match client.find_group(&g.external_id, &g.display_name).await {
        Ok(Some(found)) => found,
        Ok(None) => return fail(error),
        Err(e) => return fail(e),
    };
    let Some(id) = existing.id.clone() else {
        return fail(error);
    };
    let landed =
        error.may_have_landed() && existing.external_id.as_deref() == Some(g.external_id.as_str());
    let change = change_for(id.clone(), g, &existing, ids);
    let add = change.to_add(ids);
    let requests = member_patches(change.ops.clone(), &change.remove, &add, batch);
    let (_, added, removed, error) = send_patches(client, &id, &requests).await;
    let patched = !requests.is_empty();
    let mut done = Done {
        records: vec![rec(
            if landed {
                OpKind::Create
            } else {
                OpKind::Adopt
            },
            Some(&id),
            0,
            OpResult::Ok,
        )],
        manage: vec![Manage::AddGroup(id.clone())],
        ..Default::default()
    };
    done.groups.members_added = added;
    done.groups.members_removed = removed;
    if patched {
        done.records.push(rec(
            OpKind::Update,
            Some(&id),
            add.len() + change.remove.len(),
            error.as_ref().map_or(OpResult::Ok, failed),
        ));
    }
    match (landed, patched) {
        (true, _) => done.groups.created = 1,
        (false, true) if error.is_none() => done.groups.updated = 1,
        (false, true) => {}
        (false, false) => done.groups.unchanged = 1,
    }
    done.error = error;
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::scim_server::DemoScimServer;
    use crate::scim::resources::{ScimEmail, ScimUser};
    use crate::scim::transport::{
        HttpTransport, ScimRequest, ScimResponse, Transport, TransportError,
    };
    use futures_util::future::BoxFuture;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    /// A users-only run with the default guard, as the hub makes it for an app without groups.
    async fn sync_users(
        client: &ScimClient,
        users: &[DesiredUser],
        managed_users: &HashSet<String>,
        mode: DeprovisionMode,
        concurrency: usize,
    ) -> Result<SyncReport, SyncError> {
        let managed = Managed {
            users: managed_users.clone(),
            groups: HashSet::new(),
        };
        let options = SyncOptions {
            concurrency,
            ..SyncOptions::new(mode)
        };
        sync(client, users, &[], &managed, &options).await
    }

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
        assert_eq!(first.managed_after.users.len(), 500);
        assert_eq!(first.requests, 1 + 500);
        assert_eq!(server.user_count(), 500);

        // Nothing changed: one listing of 5 pages, nothing else.
        let again = sync_users(
            &client,
            &want,
            &first.managed_after.users,
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
            &again.managed_after.users,
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
        assert_eq!(third.managed_after.users.len(), 500);

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
            &run.managed_after.users,
            DeprovisionMode::Deactivate,
            4,
        )
        .await
        .unwrap();
        assert_eq!((run.deactivated, run.deleted), (1, 0));
        assert_eq!(server.user_count(), 3);
        let managed = run.managed_after.users.clone();
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
        let done = create_user(&client, &desired(777)).await;
        assert!(done.error.is_none());
        assert_eq!(done.users.updated, 1, "adopted and patched");
        assert_eq!(done.records[0].kind, OpKind::Adopt);
        assert_eq!(done.records[0].id, other.id);
        assert_eq!(
            done.new_user,
            Some(("ext-0777".to_string(), other.id.clone().unwrap()))
        );
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
        assert_eq!(run.managed_after.users.len(), 5);
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
        let SyncError::List(err) = err else {
            panic!("expected a listing failure, got {err:?}");
        };
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

    // ---- groups -------------------------------------------------------------------------

    fn group(ext: &str, name: &str, members: impl IntoIterator<Item = usize>) -> DesiredGroup {
        DesiredGroup {
            external_id: ext.into(),
            display_name: name.into(),
            members: members
                .into_iter()
                .map(|i| desired(i).external_id)
                .collect(),
        }
    }

    /// displayName → sorted member externalIds (unknown member ids as `?<id>`), read from the
    /// server's own state.
    fn groups_of(server: &DemoScimServer) -> std::collections::BTreeMap<String, Vec<String>> {
        let ext_of: HashMap<String, String> = server
            .users()
            .into_iter()
            .map(|u| (u.id.unwrap(), u.external_id.unwrap_or_default()))
            .collect();
        server
            .groups()
            .into_iter()
            .map(|g| {
                let mut members: Vec<String> = g
                    .members
                    .iter()
                    .map(|m| {
                        ext_of
                            .get(&m.value)
                            .cloned()
                            .unwrap_or_else(|| format!("?{}", m.value))
                    })
                    .collect();
                members.sort();
                (g.display_name, members)
            })
            .collect()
    }

    fn exts(range: impl IntoIterator<Item = usize>) -> Vec<String> {
        let mut v: Vec<String> = range.into_iter().map(|i| desired(i).external_id).collect();
        v.sort();
        v
    }

    fn options(mode: DeprovisionMode, batch: usize) -> SyncOptions {
        SyncOptions {
            member_batch: batch,
            concurrency: 4,
            ..SyncOptions::new(mode)
        }
    }

    /// Passes requests on and remembers `METHOD path` of each, in order.
    struct Recording(Arc<dyn Transport>, std::sync::Mutex<Vec<String>>);

    impl Transport for Recording {
        fn send(
            &self,
            request: ScimRequest,
        ) -> BoxFuture<'_, Result<ScimResponse, TransportError>> {
            let line = format!("{} {}", request.method, request.path_and_query);
            let body = request
                .body
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            self.1.lock().unwrap().push(format!("{line} {body}"));
            self.0.send(request)
        }
    }

    #[tokio::test]
    async fn groups_are_created_renamed_re_membered_and_deleted() {
        let (server, transport) = demo(None).await;
        let recording = Arc::new(Recording(transport, Default::default()));
        let client = ScimClient::new(recording.clone(), server.base_path().into(), None, 100);
        // A group that was there before the hub, with a member the hub will provision: it
        // matches nothing and is never renamed, re-membered or deleted.
        let legacy_member = client
            .create_user(&ScimUser {
                user_name: "legacy@example.org".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .id
            .unwrap();
        client
            .create_group(&ScimGroup {
                display_name: "Legacy".into(),
                members: vec![GroupMember::user(&legacy_member)],
                ..Default::default()
            })
            .await
            .unwrap();

        let mut users: Vec<DesiredUser> = (0..30).map(desired).collect();
        let mut groups = vec![group("g-a", "Alpha", 0..20), group("g-b", "Beta", 10..30)];
        let opts = options(DeprovisionMode::Delete, 7);
        let before = client.request_count();
        let first = sync(&client, &users, &groups, &Managed::default(), &opts)
            .await
            .unwrap();
        assert_eq!(first.failed, 0, "{:?}", first.first_error);
        assert_eq!((first.created, first.groups.created), (30, 2));
        assert_eq!(first.groups.members_added, 40);
        assert_eq!(first.groups.unmanaged, 1);
        assert_eq!(first.unmanaged, 1);
        // Listing users and groups, 30 user POSTs, 2 group POSTs carrying 7 members each, and
        // the other 13 members of each group in PATCHes of at most 7: 2 + 30 + 2 + 4.
        assert_eq!(first.requests, 38);
        assert_eq!(client.request_count() - before, 38);
        let held = groups_of(&server);
        assert_eq!(held["Alpha"], exts(0..20));
        assert_eq!(held["Beta"], exts(10..30));
        assert_eq!(held["Legacy"].len(), 1);
        assert_eq!(first.managed_after.groups.len(), 2);
        let creates: Vec<&ResourceOp> = first
            .operations
            .iter()
            .filter(|o| o.resource == ResourceKind::Group)
            .collect();
        assert_eq!(creates.len(), 4, "2 creates + 2 member additions");
        assert!(creates.iter().all(|o| o.succeeded()));

        // Nothing changed: one page of users and one of groups, nothing else.
        let again = sync(&client, &users, &groups, &first.managed_after, &opts)
            .await
            .unwrap();
        assert_eq!(again.requests, 2);
        assert_eq!((again.unchanged, again.groups.unchanged), (30, 2));
        assert!(again.operations.is_empty());

        // Rename Alpha; user 15 leaves Alpha (stays in Beta); user 0 leaves every group and
        // is deprovisioned; newcomer 30 joins Beta.
        groups[0].display_name = "Alpha Team".into();
        groups[0]
            .members
            .retain(|m| m != "ext-0015" && m != "ext-0000");
        users.retain(|u| u.external_id != "ext-0000");
        users.push(desired(30));
        groups[1].members.push(desired(30).external_id);
        recording.1.lock().unwrap().clear();
        let third = sync(&client, &users, &groups, &again.managed_after, &opts)
            .await
            .unwrap();
        assert_eq!(third.failed, 0, "{:?}", third.first_error);
        assert_eq!((third.created, third.deleted), (1, 1));
        assert_eq!(third.groups.updated, 2);
        assert_eq!(
            (third.groups.members_added, third.groups.members_removed),
            (1, 2)
        );
        let held = groups_of(&server);
        assert!(!held.contains_key("Alpha"));
        assert_eq!(
            held["Alpha Team"],
            exts((1..20).filter(|i| *i != 15)),
            "no dangling member of the deleted user"
        );
        assert_eq!(held["Beta"], exts(10..31));
        assert_eq!(held["Legacy"].len(), 1, "unmanaged group untouched");
        // The membership went before the user.
        let log = recording.1.lock().unwrap().clone();
        let alpha_patch = log
            .iter()
            .position(|l| l.starts_with("PATCH /scim/v2/Groups/") && l.contains("members[value eq"))
            .expect("a member removal");
        let user_delete = log
            .iter()
            .position(|l| l.starts_with("DELETE /scim/v2/Users/"))
            .expect("a user deletion");
        assert!(alpha_patch < user_delete, "{log:#?}");
        let kinds: Vec<(OpKind, ResourceKind)> = third
            .operations
            .iter()
            .map(|o| (o.kind, o.resource))
            .collect();
        assert_eq!(
            kinds,
            [
                (OpKind::Update, ResourceKind::Group),
                (OpKind::RemoveMembers, ResourceKind::Group),
                (OpKind::Delete, ResourceKind::User),
                (OpKind::Create, ResourceKind::User),
                (OpKind::AddMembers, ResourceKind::Group),
            ]
        );

        // Beta is no longer granted: the managed group goes, its users stay in Alpha Team or
        // go; Legacy stays.
        groups.pop();
        let keep: HashSet<String> = groups[0].members.iter().cloned().collect();
        users.retain(|u| keep.contains(&u.external_id));
        let fourth = sync(
            &client,
            &users,
            &groups,
            &third.managed_after,
            &SyncOptions {
                guard: DeletionGuard::Count(20),
                ..opts
            },
        )
        .await
        .unwrap();
        assert_eq!(fourth.failed, 0, "{:?}", fourth.first_error);
        assert_eq!(fourth.groups.deleted, 1);
        assert_eq!(fourth.deleted, 12, "users 20..=30 and 15 were only in Beta");
        let held = groups_of(&server);
        assert_eq!(held.keys().collect::<Vec<_>>(), ["Alpha Team", "Legacy"]);
        assert_eq!(server.group_count(), 2);
        assert_eq!(server.user_count(), 18 + 1);
        assert_eq!(fourth.managed_after.groups.len(), 1);
        server.shutdown().await;
    }

    #[tokio::test]
    async fn the_deletion_guard_stops_the_run_before_any_change() {
        let (server, transport) = demo(None).await;
        let client = ScimClient::new(transport, server.base_path().into(), None, 100);
        let users: Vec<DesiredUser> = (0..20).map(desired).collect();
        let groups = [group("g-a", "Alpha", 0..20)];
        let opts = options(DeprovisionMode::Delete, 100);
        let first = sync(&client, &users, &groups, &Managed::default(), &opts)
            .await
            .unwrap();
        assert_eq!(first.created, 20);

        // The directory lost 15 of 20 users: 15 of 21 managed resources is more than half.
        let served = server.request_count();
        let err = sync(
            &client,
            &users[..5],
            &[group("g-a", "Alpha", 0..5)],
            &first.managed_after,
            &opts,
        )
        .await
        .unwrap_err();
        let SyncError::Guard(refusal) = &err else {
            panic!("expected the guard, got {err:?}");
        };
        assert_eq!(
            (refusal.users, refusal.groups, refusal.managed),
            (15, 0, 21)
        );
        assert_eq!(refusal.limit, 10);
        let message = refusal.message("apps.crm.deletion_guard");
        assert!(message.contains("deprovision 15 users"), "{message}");
        assert!(message.contains("apps.crm.deletion_guard"), "{message}");
        assert!(message.contains("nothing was changed"), "{message}");
        // Only the two listings reached the server; nothing was changed.
        assert_eq!(server.request_count() - served, 2);
        assert_eq!(server.user_count(), 20);
        assert_eq!(groups_of(&server)["Alpha"], exts(0..20));

        // A count guard, and a group deletion counted like a user.
        let err = sync(
            &client,
            &users,
            &[],
            &first.managed_after,
            &SyncOptions {
                guard: DeletionGuard::Count(0),
                ..opts
            },
        )
        .await
        .unwrap_err();
        assert!(
            matches!(&err, SyncError::Guard(r) if (r.users, r.groups, r.limit) == (0, 1, 0)),
            "{err:?}"
        );

        // Raised, the same run goes through.
        let run = sync(
            &client,
            &users[..5],
            &[group("g-a", "Alpha", 0..5)],
            &first.managed_after,
            &SyncOptions {
                guard: DeletionGuard::Percent(100),
                ..opts
            },
        )
        .await
        .unwrap();
        assert_eq!((run.deleted, run.groups.members_removed), (15, 15));
        assert_eq!(server.user_count(), 5);
        server.shutdown().await;
    }

    /// Six users, Alpha (0..4) and Beta (2..6) created by a first run next to the unmanaged
    /// Gamma, on a server where displayName is unique ignoring case; the client records its
    /// requests.
    async fn three_groups() -> (
        DemoScimServer,
        Arc<Recording>,
        ScimClient,
        Vec<DesiredUser>,
        Managed,
    ) {
        let (server, transport) = demo(None).await;
        let recording = Arc::new(Recording(transport, Default::default()));
        let client = ScimClient::new(recording.clone(), server.base_path().into(), None, 100);
        client
            .create_group(&ScimGroup {
                display_name: "Gamma".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let users: Vec<DesiredUser> = (0..6).map(desired).collect();
        let groups = [group("g-a", "Alpha", 0..4), group("g-b", "Beta", 2..6)];
        let opts = options(DeprovisionMode::Delete, 2);
        let first = sync(&client, &users, &groups, &Managed::default(), &opts)
            .await
            .unwrap();
        assert_eq!((first.failed, first.groups.created), (0, 2));
        recording.1.lock().unwrap().clear();
        (server, recording, client, users, first.managed_after)
    }

    #[tokio::test]
    async fn a_rename_onto_a_name_another_group_keeps_is_held_back_and_members_still_move() {
        let (server, recording, client, users, managed) = three_groups().await;
        // Alpha should be called `gamma`, the name of the group the hub does not manage; user 0
        // leaves, user 5 joins. A new group wants the name Alpha keeps.
        let groups = [
            group("g-a", "gamma", [1, 2, 3, 5]),
            group("g-b", "Beta", 2..6),
            group("g-c", "alpha", [1]),
        ];
        let run = sync(
            &client,
            &users[1..],
            &groups,
            &managed,
            &options(DeprovisionMode::Delete, 2),
        )
        .await
        .unwrap();
        let log = recording.1.lock().unwrap().clone();
        assert!(
            !log.iter().any(|l| l.contains("displayName")),
            "no rename sent: {log:#?}"
        );
        assert_eq!(run.failed, 2, "{:?}", run.operations);
        let refused = run
            .operations
            .iter()
            .find(|o| o.kind == OpKind::Create)
            .unwrap();
        let alpha_id = server
            .groups()
            .into_iter()
            .find(|g| g.display_name == "Alpha")
            .unwrap()
            .id
            .unwrap();
        assert_eq!(
            (refused.name.as_str(), &refused.result),
            (
                "alpha",
                &OpResult::Failed {
                    message: format!(
                        "cannot create group `alpha`: the application already has another \
                         group named `Alpha` (id {alpha_id}); give the group another \
                         displayName in the directory, or rename or remove that group in the \
                         application"
                    )
                }
            )
        );
        assert_eq!(
            run.first_error.as_ref().unwrap().diagnosis(),
            format!(
                "cannot rename group `Alpha` to `gamma`: the application already has another \
                 group named `Gamma` (id {}); give the group another displayName in the \
                 directory, or rename or remove that group in the application",
                server
                    .groups()
                    .into_iter()
                    .find(|g| g.display_name == "Gamma")
                    .unwrap()
                    .id
                    .unwrap()
            )
        );
        assert_eq!(
            (
                run.deleted,
                run.groups.members_removed,
                run.groups.members_added
            ),
            (1, 1, 1)
        );
        assert_eq!((run.groups.updated, run.groups.unchanged), (0, 1));
        let held = groups_of(&server);
        assert_eq!(
            held["Alpha"],
            exts([1, 2, 3, 5]),
            "no dangling user 0, user 5 in"
        );
        assert!(held["Gamma"].is_empty() && held.len() == 3, "{held:?}");
        // Held back again on the next run, and nothing else to do.
        let again = sync(
            &client,
            &users[1..],
            &groups,
            &run.managed_after,
            &options(DeprovisionMode::Delete, 2),
        )
        .await
        .unwrap();
        assert_eq!((again.failed, again.requests), (2, 2));
        server.shutdown().await;
    }

    #[tokio::test]
    async fn a_rename_the_server_refuses_does_not_hold_the_removals_back() {
        let (server, recording, client, users, managed) = three_groups().await;
        // Alpha and Beta swap names: each rename finds the other name still taken (409). User
        // 2 leaves both groups and the application; user 0 joins Beta.
        let users: Vec<DesiredUser> = users
            .into_iter()
            .filter(|u| u.external_id != "ext-0002")
            .collect();
        let groups = [
            group("g-a", "Beta", [0, 1, 3]),
            group("g-b", "Alpha", [0, 3, 4, 5]),
        ];
        let run = sync(
            &client,
            &users,
            &groups,
            &managed,
            &options(DeprovisionMode::Delete, 2),
        )
        .await
        .unwrap();
        assert_eq!(run.failed, 2, "{:?}", run.operations);
        assert_eq!(run.first_error.as_ref().unwrap().status(), Some(409));
        assert_eq!(run.deleted, 1);
        assert_eq!(
            (run.groups.members_removed, run.groups.members_added),
            (2, 1)
        );
        let held = groups_of(&server);
        assert_eq!(held["Alpha"], exts([0, 1, 3]), "{held:?}");
        assert_eq!(held["Beta"], exts([0, 3, 4, 5]), "{held:?}");
        // Both removals of user 2 went out before the user was deleted.
        let log = recording.1.lock().unwrap().clone();
        let removals: Vec<usize> = (0..log.len())
            .filter(|&i| log[i].contains("members[value eq"))
            .collect();
        let delete = log
            .iter()
            .position(|l| l.starts_with("DELETE /scim/v2/Users/"))
            .unwrap();
        assert_eq!(removals.len(), 2, "{log:#?}");
        assert!(removals.iter().all(|&r| r < delete), "{log:#?}");
        server.shutdown().await;
    }

    #[tokio::test]
    async fn a_user_granted_again_is_reactivated_and_rejoins_its_group() {
        let (server, transport) = demo(None).await;
        let client = ScimClient::new(transport, server.base_path().into(), None, 100);
        let users: Vec<DesiredUser> = (0..4).map(desired).collect();
        let groups = vec![group("g-a", "Alpha", 0..4)];
        let opts = options(DeprovisionMode::Deactivate, 100);
        let first = sync(&client, &users, &groups, &Managed::default(), &opts)
            .await
            .unwrap();
        let id_of_3 = server
            .users()
            .into_iter()
            .find(|u| u.external_id.as_deref() == Some("ext-0003"))
            .unwrap()
            .id;

        // User 3 loses access: deactivated, kept, out of the group.
        let second = sync(
            &client,
            &users[..3],
            &[group("g-a", "Alpha", 0..3)],
            &first.managed_after,
            &opts,
        )
        .await
        .unwrap();
        assert_eq!((second.deactivated, second.deleted), (1, 0));
        assert_eq!(groups_of(&server)["Alpha"], exts(0..3));
        assert_eq!(server.user_count(), 4);

        // Granted again: the same account comes back active, nothing is duplicated.
        let third = sync(&client, &users, &groups, &second.managed_after, &opts)
            .await
            .unwrap();
        assert_eq!((third.created, third.updated), (0, 1));
        assert_eq!(server.user_count(), 4);
        let back = server
            .users()
            .into_iter()
            .find(|u| u.external_id.as_deref() == Some("ext-0003"))
            .unwrap();
        assert_eq!((back.id, back.active), (id_of_3, Some(true)));
        assert_eq!(groups_of(&server)["Alpha"], exts(0..4));
        server.shutdown().await;
    }

    #[tokio::test]
    async fn a_group_create_that_conflicts_or_lost_its_answer_adopts_instead_of_duplicating() {
        let (server, transport) = demo(None).await;
        let lossy = ScimClient::new(
            Arc::new(LosePostAnswers(transport.clone())),
            server.base_path().into(),
            None,
            100,
        );
        let users: Vec<DesiredUser> = (0..6).map(desired).collect();
        let groups = [group("g-a", "Alpha", 0..6), group("g-b", "Beta", 3..6)];
        let opts = options(DeprovisionMode::Delete, 4);
        let run = sync(&lossy, &users, &groups, &Managed::default(), &opts)
            .await
            .unwrap();
        assert_eq!(run.failed, 0, "{:?}", run.first_error);
        assert_eq!((run.created, run.groups.created), (6, 2));
        assert_eq!(server.group_count(), 2);
        let held = groups_of(&server);
        assert_eq!(held["Alpha"], exts(0..6));
        assert_eq!(held["Beta"], exts(3..6));
        assert_eq!(run.managed_after.groups.len(), 2);

        // Someone creates "GAMMA" after our listing: the POST of Gamma gets 409 and the
        // existing group is adopted and brought to the desired state.
        let client = ScimClient::new(transport, server.base_path().into(), None, 100);
        let theirs = client
            .create_group(&ScimGroup {
                display_name: "GAMMA".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .id
            .unwrap();
        let ids: HashMap<String, String> = server
            .users()
            .into_iter()
            .map(|u| (u.external_id.unwrap(), u.id.unwrap()))
            .collect();
        let gamma = group("g-c", "Gamma", 0..2);
        let members: Vec<String> = gamma.member_ids(&ids).into_iter().collect();
        let done = create_group(&client, &gamma, &members, &ids, 100).await;
        assert!(done.error.is_none(), "{:?}", done.error);
        assert_eq!(done.records[0].kind, OpKind::Adopt);
        assert_eq!(done.records[0].id.as_deref(), Some(theirs.as_str()));
        assert_eq!(done.groups.updated, 1);
        let adopted = server
            .groups()
            .into_iter()
            .find(|g| g.id.as_deref() == Some(theirs.as_str()))
            .unwrap();
        assert_eq!(adopted.display_name, "Gamma");
        assert_eq!(adopted.external_id.as_deref(), Some("g-c"));
        assert_eq!(groups_of(&server)["Gamma"], exts(0..2));
        assert_eq!(server.group_count(), 3);
        server.shutdown().await;
    }

    /// Loses the first group POST with its agent before it reaches the server.
    struct LoseFirstGroupPost(Arc<dyn Transport>, AtomicBool);

    impl Transport for LoseFirstGroupPost {
        fn send(
            &self,
            request: ScimRequest,
        ) -> BoxFuture<'_, Result<ScimResponse, TransportError>> {
            Box::pin(async move {
                let group_post = request.method == http::Method::POST
                    && request.path_and_query.ends_with("/Groups");
                if group_post && !self.1.swap(true, Ordering::SeqCst) {
                    return Err(TransportError::AgentLost {
                        agent: "vm-02".into(),
                        detail: "it disconnected".into(),
                    });
                }
                self.0.send(request).await
            })
        }
    }

    #[tokio::test]
    async fn a_group_create_lost_with_its_agent_is_looked_up_never_sent_twice() {
        // Group names are not unique on every server: a POST sent again could meet the first
        // one landing late and make two groups. So a lost group create that the lookup does
        // not find is reported, and the next run creates it.
        let (server, transport) = demo(None).await;
        let lossy = ScimClient::new(
            Arc::new(LoseFirstGroupPost(
                transport.clone(),
                AtomicBool::new(false),
            )),
            server.base_path().into(),
            None,
            100,
        );
        let users: Vec<DesiredUser> = (0..3).map(desired).collect();
        let groups = [group("g-a", "Alpha", 0..3)];
        let opts = options(DeprovisionMode::Delete, 100);
        let run = sync(&lossy, &users, &groups, &Managed::default(), &opts)
            .await
            .unwrap();
        assert_eq!((run.created, run.groups.created, run.failed), (3, 0, 1));
        let diagnosis = run.first_error.as_ref().unwrap().diagnosis();
        assert!(
            diagnosis.starts_with("the agent `vm-02` was lost before it answered"),
            "{diagnosis}"
        );
        assert_eq!(server.group_count(), 0, "not sent again");
        let again = sync(&lossy, &users, &groups, &run.managed_after, &opts)
            .await
            .unwrap();
        assert_eq!((again.groups.created, again.failed), (1, 0));
        assert_eq!(server.group_count(), 1);
        assert_eq!(groups_of(&server)["Alpha"], exts(0..3));
        server.shutdown().await;
    }

    #[tokio::test]
    async fn groups_off_lists_and_touches_no_group() {
        let (server, transport) = demo(None).await;
        let client = ScimClient::new(transport, server.base_path().into(), None, 100);
        let users: Vec<DesiredUser> = (0..3).map(desired).collect();
        let opts = SyncOptions {
            groups: false,
            ..options(DeprovisionMode::Delete, 100)
        };
        let run = sync(
            &client,
            &users,
            &[group("g-a", "Alpha", 0..3)],
            &Managed::default(),
            &opts,
        )
        .await
        .unwrap();
        assert_eq!((run.created, run.groups.created), (3, 0));
        assert_eq!(run.requests, 1 + 3);
        assert_eq!(server.group_count(), 0);
        server.shutdown().await;
    }

    /// Answers `GET …/Groups` with 404 and passes everything else on.
    struct NoGroups(Arc<dyn Transport>);

    impl Transport for NoGroups {
        fn send(
            &self,
            request: ScimRequest,
        ) -> BoxFuture<'_, Result<ScimResponse, TransportError>> {
            if request.path_and_query.contains("/Groups") {
                return Box::pin(async {
                    Ok(ScimResponse {
                        status: 404,
                        headers: vec![],
                        body: br#"{"status": "404", "detail": "no such endpoint"}"#.to_vec(),
                    })
                });
            }
            self.0.send(request)
        }
    }

    #[tokio::test]
    async fn an_app_without_groups_is_told_how_to_switch_them_off() {
        let (server, transport) = demo(None).await;
        let client = ScimClient::new(
            Arc::new(NoGroups(transport)),
            server.base_path().into(),
            None,
            100,
        );
        let err = sync(
            &client,
            &[desired(1)],
            &[group("g-a", "Alpha", [1])],
            &Managed::default(),
            &options(DeprovisionMode::Delete, 100),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(&err, SyncError::GroupsUnsupported(e) if e.status() == Some(404)),
            "{err:?}"
        );
        assert_eq!(server.user_count(), 0, "nothing was changed");
        server.shutdown().await;
    }

    /// DESIGN §6 at scale: a resync with nothing to do costs list pages only, never a request
    /// per user or per group. `examples/resync_requests.rs` prints the same figure for 10,000
    /// users in 100 groups (101 requests at page size 100, 11 at 1000).
    #[tokio::test]
    async fn a_no_change_resync_costs_list_pages_only() {
        let (server, transport) = demo(None).await;
        let page = 100;
        let client = ScimClient::new(transport, server.base_path().into(), None, page);
        let (n_users, n_groups) = (1000, 10);
        let users: Vec<DesiredUser> = (0..n_users).map(desired).collect();
        let groups: Vec<DesiredGroup> = (0..n_groups)
            .map(|g| {
                group(
                    &format!("g{g}"),
                    &format!("Group {g}"),
                    (0..n_users).filter(move |i| i % n_groups == g),
                )
            })
            .collect();
        let opts = SyncOptions {
            concurrency: 8,
            ..options(DeprovisionMode::Delete, 100)
        };
        let first = sync(&client, &users, &groups, &Managed::default(), &opts)
            .await
            .unwrap();
        assert_eq!(first.failed, 0, "{:?}", first.first_error);
        assert_eq!(first.groups.members_added, n_users);
        let served = server.request_count();
        let again = sync(&client, &users, &groups, &first.managed_after, &opts)
            .await
            .unwrap();
        let requests = server.request_count() - served;
        eprintln!(
            "no-change resync of {n_users} users in {n_groups} groups: {requests} requests \
             (page size {page})"
        );
        assert_eq!(
            requests as usize,
            n_users.div_ceil(page as usize) + n_groups.div_ceil(page as usize)
        );
        assert_eq!(again.requests, requests as usize);
        assert_eq!(
            (again.unchanged, again.groups.unchanged),
            (n_users, n_groups)
        );
        server.shutdown().await;
    }
}
