//! The group plan: which groups must be created, renamed, re-membered, adopted and deleted so
//! that a SCIM server holds the granted groups with exactly the granted users as members, and
//! how membership changes are cut into PATCH requests (RFC 7644 §3.5.2).
//!
//! Pure computation over plain data. It must never perform I/O, and never plan a change to a
//! group this hub does not manage unless that group is desired (matching adopts it). Unmanaged
//! groups that are not desired are only counted: not renamed, not re-membered, not deleted.
//!
//! Nor does it plan a displayName that another group keeps through the run: RFC 7643 makes a
//! Group's displayName not unique, and servers disagree (scim2-server stores two groups of one
//! name, scimmy apps and many others refuse the second with 409). Such a rename or create is
//! set aside with the group that holds the name, so that every server ends the same way: one
//! group per name, the conflict reported, the group's membership still brought up to date.

use std::collections::{BTreeSet, HashMap, HashSet};

use serde_json::json;

use crate::scim::diff::{match_resources, Matchable};
use crate::scim::resources::{GroupMember, PatchOp, ScimGroup};

/// A group as the directory and the access rule say it should exist in the application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredGroup {
    /// The hub's stable identifier for the group; sent as SCIM `externalId`.
    pub external_id: String,
    pub display_name: String,
    /// External ids of the desired users in the group (nested groups already flattened,
    /// limited to granted users).
    pub members: Vec<String>,
}

impl DesiredGroup {
    /// SCIM ids of the members that exist in the application, by `ids` (external id → SCIM
    /// id); sorted, without duplicates. Members not yet created are left out.
    pub fn member_ids(&self, ids: &HashMap<String, String>) -> BTreeSet<String> {
        self.members
            .iter()
            .filter_map(|ext| ids.get(ext).cloned())
            .collect()
    }
}

impl Matchable for DesiredGroup {
    fn match_external_id(&self) -> Option<&str> {
        Some(&self.external_id)
    }
    fn match_name(&self) -> &str {
        &self.display_name
    }
}

impl Matchable for ScimGroup {
    fn match_external_id(&self) -> Option<&str> {
        self.external_id.as_deref()
    }
    fn match_name(&self) -> &str {
        &self.display_name
    }
}

/// A group on the server that keeps, through the run, the displayName (compared without case)
/// another group should get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameTaken {
    pub id: String,
    pub display_name: String,
}

/// A desired group found on the server, with what must change in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupChange {
    pub id: String,
    pub desired: DesiredGroup,
    /// The displayName it has on the server.
    pub current_name: String,
    /// `replace` of `externalId` / `displayName`, when they differ; never a displayName that
    /// is taken (see `name_taken`).
    pub ops: Vec<PatchOp>,
    /// Set when the group should be renamed but another group keeps the new name: the rename
    /// is not sent, and the run reports it.
    pub name_taken: Option<NameTaken>,
    /// Member values on the server that must go (not granted users, unknown ids, nested
    /// groups), sorted.
    pub remove: Vec<String>,
    /// Member values on the server that stay.
    pub keep: BTreeSet<String>,
}

impl GroupChange {
    /// SCIM ids to add once `ids` knows every desired user that exists (those created during
    /// the run included); sorted.
    pub fn to_add(&self, ids: &HashMap<String, String>) -> Vec<String> {
        self.desired
            .member_ids(ids)
            .into_iter()
            .filter(|id| !self.keep.contains(id))
            .collect()
    }

    /// True when the group needs no attribute change and no removal, and no rename of it is
    /// held back.
    pub fn is_clean(&self) -> bool {
        self.ops.is_empty() && self.remove.is_empty() && self.name_taken.is_none()
    }

    /// True when the change renames the group.
    fn renames(&self) -> bool {
        self.ops
            .iter()
            .any(|op| op.path.as_deref() == Some("displayName"))
    }
}

/// A managed group that is no longer granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupDelete {
    pub id: String,
    pub display_name: String,
    pub external_id: Option<String>,
}

/// The complete, deterministic group plan for one run.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GroupPlan {
    /// Sorted by external id.
    pub create: Vec<DesiredGroup>,
    /// Groups to create whose displayName another group keeps: not created, reported; sorted
    /// by external id.
    pub create_blocked: Vec<(DesiredGroup, NameTaken)>,
    /// Every desired group found on the server, sorted by external id.
    pub change: Vec<GroupChange>,
    /// Sorted by displayName, then id.
    pub delete: Vec<GroupDelete>,
    /// (external id, SCIM id) of matched groups not managed before; sorted by external id.
    pub adopt: Vec<(String, String)>,
    /// Groups on the server that this hub neither manages nor wants: never touched.
    pub unmanaged: usize,
    /// External ids of desired groups skipped because an earlier one (in external id order)
    /// has the same external id or displayName (case-insensitively).
    pub skipped_duplicates: Vec<String>,
}

/// Compute the plan that brings `current` to `desired`.
///
/// Matching: by `externalId` (exact) first, then by `displayName` (case-insensitive) among
/// the groups left. A matched group not in `managed` is adopted; only groups in `managed` are
/// deleted. `user_ids` maps desired users' external ids to the SCIM ids they already have; a
/// member value of a desired group that is not one of those is removed. A rename or create
/// onto a displayName that a group left alone keeps is held back (see [`NameTaken`]).
pub fn plan_groups(
    desired: &[DesiredGroup],
    current: &[ScimGroup],
    managed: &HashSet<String>,
    user_ids: &HashMap<String, String>,
) -> GroupPlan {
    let mut plan = GroupPlan::default();

    let matching = match_resources(desired, current);
    plan.skipped_duplicates = matching.skipped;
    for (d, found) in matching.wanted {
        let Some(group) = found else {
            plan.create.push(d.clone());
            continue;
        };
        let id = group.id.clone().unwrap_or_default();
        if !managed.contains(&id) {
            plan.adopt.push((d.external_id.clone(), id.clone()));
        }
        plan.change.push(change_for(id, d, group, user_ids));
    }
    for group in &matching.unclaimed {
        let id = group.id.clone().unwrap_or_default();
        if managed.contains(&id) {
            plan.delete.push(GroupDelete {
                id,
                display_name: group.display_name.clone(),
                external_id: group.external_id.clone(),
            });
        } else {
            plan.unmanaged += 1;
        }
    }
    plan.unmanaged += matching.without_id;
    plan.delete
        .sort_by(|a, b| (&a.display_name, &a.id).cmp(&(&b.display_name, &b.id)));

    // The names held after the run by groups that keep theirs: those left alone first, then
    // every group whose rename is held back, until no further rename runs into one of them.
    let mut kept: HashMap<String, NameTaken> = matching
        .unclaimed
        .iter()
        .filter_map(|g| {
            let id = g.id.as_deref().filter(|id| !managed.contains(*id))?;
            let taken = NameTaken {
                id: id.to_string(),
                display_name: g.display_name.clone(),
            };
            Some((g.display_name.to_lowercase(), taken))
        })
        .collect();
    loop {
        let mut held_back = false;
        // A change of case only is no new claim on the name: it goes ahead.
        let claims = |c: &GroupChange| {
            c.renames() && c.current_name.to_lowercase() != c.desired.display_name.to_lowercase()
        };
        for c in plan.change.iter_mut().filter(|c| claims(c)) {
            if let Some(taken) = kept.get(&c.desired.display_name.to_lowercase()) {
                c.name_taken = Some(taken.clone());
                c.ops.retain(|op| op.path.as_deref() != Some("displayName"));
                let stays = NameTaken {
                    id: c.id.clone(),
                    display_name: c.current_name.clone(),
                };
                kept.insert(c.current_name.to_lowercase(), stays);
                held_back = true;
            }
        }
        if !held_back {
            break;
        }
    }
    let (blocked, create): (Vec<DesiredGroup>, Vec<DesiredGroup>) =
        std::mem::take(&mut plan.create)
            .into_iter()
            .partition(|d| kept.contains_key(&d.display_name.to_lowercase()));
    plan.create = create;
    plan.create_blocked = blocked
        .into_iter()
        .map(|d| {
            let taken = kept[&d.display_name.to_lowercase()].clone();
            (d, taken)
        })
        .collect();
    plan
}

/// What turns `current` (a desired group found on the server under `id`) into `desired`.
pub fn change_for(
    id: String,
    desired: &DesiredGroup,
    current: &ScimGroup,
    user_ids: &HashMap<String, String>,
) -> GroupChange {
    let mut ops = Vec::new();
    if current.external_id.as_deref() != Some(desired.external_id.as_str()) {
        ops.push(PatchOp::replace("externalId", json!(desired.external_id)));
    }
    if current.display_name != desired.display_name {
        ops.push(PatchOp::replace("displayName", json!(desired.display_name)));
    }
    let wanted = desired.member_ids(user_ids);
    let present: BTreeSet<String> = current.members.iter().map(|m| m.value.clone()).collect();
    let (keep, remove): (BTreeSet<String>, BTreeSet<String>) =
        present.into_iter().partition(|v| wanted.contains(v));
    GroupChange {
        id,
        desired: desired.clone(),
        current_name: current.display_name.clone(),
        ops,
        name_taken: None,
        remove: remove.into_iter().collect(),
        keep,
    }
}

/// The RFC 7644 §3.5.2.2 path that removes one member: `members[value eq "<id>"]`.
///
/// It is the one way RFC 7644 gives to remove some values of a multi-valued attribute. The
/// other form in circulation, `remove` of `members` with `value: [{"value": "<id>"}]`, is not
/// in the RFC, whose `remove` carries no value and, on a path without a filter, removes every
/// member: scim2-server refuses it (400), scimmy takes both (`member_removal_forms` in the
/// integration tests checks both servers).
pub fn member_remove_path(id: &str) -> String {
    // A JSON string literal is a valid SCIM filter string: quoted, with `"` and `\` escaped.
    format!(
        "members[value eq {}]",
        serde_json::Value::String(id.to_string())
    )
}

/// Cut `ops` plus member removals and additions into PATCH requests of at most `batch` member
/// values each (removals first). Each removal is one `remove` op with a value filter path;
/// the additions of a request are one `add` op on `members` carrying their values. `ops`
/// ride along with the first request, or make one of their own when no member changes.
pub fn member_patches(
    ops: Vec<PatchOp>,
    remove: &[String],
    add: &[String],
    batch: usize,
) -> Vec<Vec<PatchOp>> {
    let batch = batch.max(1);
    let mut requests: Vec<Vec<PatchOp>> = Vec::new();
    let mut current = ops;
    let mut budget = batch;
    for id in remove {
        if budget == 0 {
            requests.push(std::mem::take(&mut current));
            budget = batch;
        }
        current.push(PatchOp::remove(&member_remove_path(id)));
        budget -= 1;
    }
    let mut rest = add;
    while !rest.is_empty() {
        if budget == 0 {
            requests.push(std::mem::take(&mut current));
            budget = batch;
        }
        let (now, later) = rest.split_at(budget.min(rest.len()));
        let values: Vec<GroupMember> = now.iter().map(|id| GroupMember::user(id)).collect();
        current.push(PatchOp::add("members", json!(values)));
        budget -= now.len();
        rest = later;
    }
    if !current.is_empty() {
        requests.push(current);
    }
    requests
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scim::resources::PatchOpKind;

    fn desired(ext: &str, name: &str, members: &[&str]) -> DesiredGroup {
        DesiredGroup {
            external_id: ext.into(),
            display_name: name.into(),
            members: members.iter().map(|m| m.to_string()).collect(),
        }
    }

    fn group(id: &str, ext: Option<&str>, name: &str, members: &[&str]) -> ScimGroup {
        ScimGroup {
            id: Some(id.into()),
            external_id: ext.map(str::to_string),
            display_name: name.into(),
            members: members.iter().map(|m| GroupMember::user(m)).collect(),
        }
    }

    fn set(ids: &[&str]) -> HashSet<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    /// Users e1..e9 exist on the server as s1..s9.
    fn user_ids() -> HashMap<String, String> {
        (1..10)
            .map(|i| (format!("e{i}"), format!("s{i}")))
            .collect()
    }

    #[test]
    fn creates_missing_groups_and_resolves_existing_members() {
        let want = [desired("g2", "Sales", &["e1"]), desired("g1", "Eng", &[])];
        let plan = plan_groups(&want, &[], &set(&[]), &user_ids());
        let exts: Vec<&str> = plan.create.iter().map(|g| g.external_id.as_str()).collect();
        assert_eq!(exts, ["g1", "g2"]);
        assert!(plan.change.is_empty() && plan.delete.is_empty());
        let mut ids = user_ids();
        ids.insert("new".into(), "s-new".into());
        let g = desired("g", "G", &["new", "e2", "e2", "gone"]);
        assert_eq!(
            g.member_ids(&ids).into_iter().collect::<Vec<_>>(),
            ["s-new", "s2"]
        );
    }

    #[test]
    fn membership_diff_keeps_granted_removes_the_rest() {
        // s3 is granted; s7 is a user no longer in the group; x is an id nobody knows.
        let want = [desired("g1", "Eng", &["e1", "e3"])];
        let current = [group("a", Some("g1"), "Eng", &["s3", "s7", "x"])];
        let plan = plan_groups(&want, &current, &set(&["a"]), &user_ids());
        let c = &plan.change[0];
        assert!(c.ops.is_empty());
        assert_eq!(c.remove, ["s7", "x"]);
        assert_eq!(c.keep, ["s3".to_string()].into());
        assert_eq!(c.to_add(&user_ids()), ["s1"]);
        assert!(plan.adopt.is_empty());
    }

    #[test]
    fn external_id_first_then_display_name_case_insensitively() {
        let want = [
            desired("g1", "Engineering", &[]),
            desired("g2", "Sales", &[]),
        ];
        let current = [
            // Renamed in the directory: found by externalId, renamed back.
            group("a", Some("g1"), "Old Name", &[]),
            // A group someone else made: found by name, adopted.
            group("b", None, "SALES", &[]),
            // The same name as g1 but not ours and not matched: left alone, and it keeps the
            // name, so g1 is not renamed onto it.
            group("c", None, "engineering", &[]),
        ];
        let plan = plan_groups(&want, &current, &set(&["a"]), &user_ids());
        assert_eq!(plan.change.len(), 2);
        assert_eq!(plan.change[0].id, "a");
        assert!(plan.change[0].ops.is_empty(), "{:?}", plan.change[0].ops);
        assert_eq!(
            plan.change[0].name_taken,
            Some(NameTaken {
                id: "c".into(),
                display_name: "engineering".into()
            })
        );
        assert!(!plan.change[0].is_clean());
        assert_eq!(plan.change[1].id, "b");
        assert_eq!(
            plan.change[1].ops,
            vec![
                PatchOp::replace("externalId", json!("g2")),
                PatchOp::replace("displayName", json!("Sales")),
            ]
        );
        assert_eq!(plan.adopt, vec![("g2".to_string(), "b".to_string())]);
        assert_eq!(plan.unmanaged, 1);
        assert!(plan.delete.is_empty() && plan.create.is_empty());
    }

    #[test]
    fn no_group_is_renamed_or_created_onto_a_name_another_group_keeps() {
        let want = [
            // Onto the name of a group left alone: held back, its members still handled.
            desired("g1", "Theirs", &["e1"]),
            // Onto the old name of g1, which g1 keeps now: held back too.
            desired("g2", "Ours", &[]),
            // A new group under g2's old name, which g2 keeps: not created.
            desired("g3", "Second", &[]),
            // Onto the name of a managed group that is deleted first: goes ahead.
            desired("g4", "Retired", &[]),
            // A change of case only: goes ahead, whatever else has the name.
            desired("g5", "CASE", &[]),
            // A new group under a free name.
            desired("g6", "Fresh", &[]),
        ];
        let current = [
            group("a", Some("g1"), "Ours", &["s1", "s2"]),
            group("b", Some("g2"), "Second", &[]),
            group("d", Some("g4"), "Old", &[]),
            group("e", Some("g5"), "case", &[]),
            group("m", Some("gone"), "retired", &[]),
            group("t", None, "THEIRS", &[]),
            group("u", None, "Case", &[]),
        ];
        let plan = plan_groups(
            &want,
            &current,
            &set(&["a", "b", "d", "e", "m"]),
            &user_ids(),
        );
        let taken = |id: &str, name: &str| {
            Some(NameTaken {
                id: id.into(),
                display_name: name.into(),
            })
        };
        let by_id = |id: &str| plan.change.iter().find(|c| c.id == id).unwrap();
        assert_eq!(by_id("a").name_taken, taken("t", "THEIRS"));
        assert!(by_id("a").ops.is_empty());
        assert_eq!(by_id("a").remove, ["s2"], "membership goes on");
        assert_eq!(by_id("b").name_taken, taken("a", "Ours"));
        assert!(by_id("b").ops.is_empty());
        for (id, name) in [("d", "Retired"), ("e", "CASE")] {
            assert_eq!(by_id(id).name_taken, None);
            assert_eq!(
                by_id(id).ops,
                [PatchOp::replace("displayName", json!(name))]
            );
        }
        let created: Vec<&str> = plan.create.iter().map(|g| g.external_id.as_str()).collect();
        assert_eq!(created, ["g6"]);
        assert_eq!(plan.create_blocked.len(), 1);
        assert_eq!(plan.create_blocked[0].0.external_id, "g3");
        assert_eq!(plan.create_blocked[0].1, taken("b", "Second").unwrap());
        assert_eq!(plan.delete.len(), 1);
        assert_eq!(plan.unmanaged, 2);
    }

    #[test]
    fn only_managed_groups_are_deleted_and_unmanaged_are_never_touched() {
        let current = [
            group("m1", Some("old"), "Retired", &["s1"]),
            group("u1", None, "Theirs", &["s1", "s2"]),
            group("u2", Some("g-x"), "Also theirs", &[]),
        ];
        let plan = plan_groups(&[], &current, &set(&["m1"]), &user_ids());
        assert_eq!(
            plan.delete,
            vec![GroupDelete {
                id: "m1".into(),
                display_name: "Retired".into(),
                external_id: Some("old".into()),
            }]
        );
        assert_eq!(plan.unmanaged, 2);
        assert!(plan.change.is_empty() && plan.adopt.is_empty());
    }

    #[test]
    fn plan_is_independent_of_input_order_and_skips_duplicates() {
        let want = vec![
            desired("g1", "A", &["e1"]),
            desired("g2", "B", &["e2"]),
            desired("g3", "a", &[]),
            desired("g1", "C", &[]),
        ];
        let mut current = vec![
            group("1", Some("g1"), "A", &["s9"]),
            group("2", Some("gone"), "Z", &[]),
            group("3", None, "B", &[]),
        ];
        let ids = set(&["1", "2"]);
        let a = plan_groups(&want, &current, &ids, &user_ids());
        let mut rev = want.clone();
        rev.reverse();
        current.reverse();
        let b = plan_groups(&rev, &current, &ids, &user_ids());
        assert_eq!(a, b);
        assert_eq!(a.skipped_duplicates, ["g1", "g3"]);
        assert_eq!(a.change[0].desired.display_name, "A");
        assert_eq!(a.change[0].remove, ["s9"]);
        assert_eq!(a.delete.len(), 1);
        assert_eq!(a.adopt, vec![("g2".to_string(), "3".to_string())]);
    }

    #[test]
    fn member_patches_use_rfc_forms_and_batches() {
        let remove: Vec<String> = ["r1", "r\"2"].iter().map(|s| s.to_string()).collect();
        let add: Vec<String> = (1..=5).map(|i| format!("a{i}")).collect();
        let rename = PatchOp::replace("displayName", json!("New"));
        let requests = member_patches(vec![rename.clone()], &remove, &add, 3);
        // 2 removals + 5 additions in batches of 3 values: 3 requests.
        assert_eq!(requests.len(), 3);
        assert_eq!(
            serde_json::to_value(&requests[0]).unwrap(),
            json!([
                {"op": "replace", "path": "displayName", "value": "New"},
                {"op": "remove", "path": "members[value eq \"r1\"]"},
                {"op": "remove", "path": "members[value eq \"r\\\"2\"]"},
                {"op": "add", "path": "members", "value": [{"value": "a1", "type": "User"}]},
            ])
        );
        assert_eq!(
            serde_json::to_value(&requests[1]).unwrap(),
            json!([{"op": "add", "path": "members", "value": [
                {"value": "a2", "type": "User"}, {"value": "a3", "type": "User"},
                {"value": "a4", "type": "User"}]}])
        );
        assert_eq!(
            requests[2][0]
                .value
                .as_ref()
                .unwrap()
                .as_array()
                .unwrap()
                .len(),
            1
        );
        let counted: usize = requests
            .iter()
            .flatten()
            .map(|op| match op.op {
                PatchOpKind::Remove => 1,
                PatchOpKind::Add => op.value.as_ref().unwrap().as_array().unwrap().len(),
                PatchOpKind::Replace => 0,
            })
            .sum();
        assert_eq!(counted, 7);
        assert_eq!(member_patches(vec![rename], &[], &[], 3).len(), 1);
        assert!(member_patches(vec![], &[], &[], 3).is_empty());
        assert_eq!(member_patches(vec![], &[], &add, 100).len(), 1);
    }
}
