//! The user plan: what must be created, patched, adopted and deprovisioned so that a SCIM
//! server holds the desired users.
//!
//! Pure computation over plain data. It must never perform I/O, and it must never plan any
//! change to a user this hub does not manage unless that user is desired (matching adopts it).
//! Unmanaged users that are not desired are only counted.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::json;

use crate::scim::resources::{Name, PatchOp, Resource, ScimEmail, ScimUser};

/// A user as the directory and the access rule say it should exist in the application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredUser {
    /// The hub's stable identifier for the person; sent as SCIM `externalId`.
    pub external_id: String,
    pub user_name: String,
    pub display_name: Option<String>,
    pub given_name: Option<String>,
    pub family_name: Option<String>,
    pub formatted_name: Option<String>,
    pub emails: Vec<ScimEmail>,
    pub active: bool,
}

impl DesiredUser {
    /// The SCIM User to POST for this desired user. Empty strings and empty email values are
    /// left out: they mean "absent".
    pub fn to_scim_user(&self) -> ScimUser {
        let name = Name {
            given_name: present(&self.given_name).map(str::to_string),
            family_name: present(&self.family_name).map(str::to_string),
            formatted: present(&self.formatted_name).map(str::to_string),
        };
        ScimUser {
            id: None,
            external_id: Some(self.external_id.clone()),
            user_name: self.user_name.clone(),
            display_name: present(&self.display_name).map(str::to_string),
            name: (!name.is_empty()).then_some(name),
            emails: self.sendable_emails(),
            active: Some(self.active),
        }
    }

    fn sendable_emails(&self) -> Vec<ScimEmail> {
        self.emails
            .iter()
            .filter(|e| !e.value.trim().is_empty())
            .cloned()
            .collect()
    }
}

/// How a managed user that is no longer desired leaves the application.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeprovisionMode {
    /// `DELETE /Users/{id}`.
    Delete,
    /// `PATCH active=false`; the account stays.
    Deactivate,
}

/// PATCH operations bringing one existing user to its desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserUpdate {
    pub id: String,
    pub external_id: String,
    /// The desired userName, for the run's record.
    pub user_name: String,
    pub ops: Vec<PatchOp>,
}

/// A managed user that must leave the application (by the plan's [`DeprovisionMode`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deprovision {
    pub id: String,
    pub user_name: String,
    /// The user's externalId on the server, if it has one.
    pub external_id: Option<String>,
}

/// The complete, deterministic plan for one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserPlan {
    /// Sorted by external id.
    pub create: Vec<DesiredUser>,
    /// Sorted by external id.
    pub update: Vec<UserUpdate>,
    /// Sorted by user name, then id.
    pub deprovision: Vec<Deprovision>,
    pub deprovision_mode: DeprovisionMode,
    /// (external id, SCIM id) of matched users not managed before; sorted by external id.
    pub adopt: Vec<(String, String)>,
    /// Matched users already in their desired state, plus (in `Deactivate` mode) managed
    /// users no longer desired that are already inactive.
    pub unchanged: usize,
    /// Users on the server that this hub neither manages nor wants: never touched.
    pub unmanaged: usize,
    /// External ids of desired users skipped because an earlier desired user (in external
    /// id order) has the same external id or the same userName (case-insensitively).
    pub skipped_duplicates: Vec<String>,
    /// External id → SCIM id of every desired user found on the server (updated, adopted or
    /// unchanged): what group memberships refer to before anything is created.
    pub matched: BTreeMap<String, String>,
}

/// Compute the plan that brings `current` to `desired`.
///
/// Matching: by `externalId` (exact) first for all desired users, then by `userName`
/// (case-insensitive) among the current users left. A matched user not in `managed` is
/// adopted. Only users in `managed` are ever deprovisioned.
pub fn plan_users(
    desired: &[DesiredUser],
    current: &[ScimUser],
    managed: &HashSet<String>,
    mode: DeprovisionMode,
) -> UserPlan {
    let mut plan = UserPlan {
        create: Vec::new(),
        update: Vec::new(),
        deprovision: Vec::new(),
        deprovision_mode: mode,
        adopt: Vec::new(),
        unchanged: 0,
        unmanaged: 0,
        skipped_duplicates: Vec::new(),
        matched: BTreeMap::new(),
    };

    let matching = match_resources(desired, current);
    plan.skipped_duplicates = matching.skipped;
    for (d, found) in matching.wanted {
        let Some(user) = found else {
            plan.create.push(d.clone());
            continue;
        };
        let id = user.id.clone().unwrap_or_default();
        plan.matched.insert(d.external_id.clone(), id.clone());
        if !managed.contains(&id) {
            plan.adopt.push((d.external_id.clone(), id.clone()));
        }
        let ops = update_ops(d, user);
        if ops.is_empty() {
            plan.unchanged += 1;
        } else {
            plan.update.push(UserUpdate {
                id,
                external_id: d.external_id.clone(),
                user_name: d.user_name.clone(),
                ops,
            });
        }
    }

    for user in matching.unclaimed {
        let id = user.id.clone().unwrap_or_default();
        if !managed.contains(&id) {
            plan.unmanaged += 1;
        } else if mode == DeprovisionMode::Deactivate && user.active == Some(false) {
            plan.unchanged += 1;
        } else {
            plan.deprovision.push(Deprovision {
                id,
                user_name: user.user_name.clone(),
                external_id: user.external_id.clone(),
            });
        }
    }
    plan.unmanaged += matching.without_id;
    plan.deprovision
        .sort_by(|a, b| (&a.user_name, &a.id).cmp(&(&b.user_name, &b.id)));
    plan
}

/// What matching needs to know of a resource, desired or current: its externalId and the
/// name that also identifies it (userName, displayName), compared case-insensitively.
pub(crate) trait Matchable {
    fn match_external_id(&self) -> Option<&str>;
    fn match_name(&self) -> &str;
}

impl Matchable for DesiredUser {
    fn match_external_id(&self) -> Option<&str> {
        Some(&self.external_id)
    }
    fn match_name(&self) -> &str {
        &self.user_name
    }
}

impl Matchable for ScimUser {
    fn match_external_id(&self) -> Option<&str> {
        self.external_id.as_deref()
    }
    fn match_name(&self) -> &str {
        &self.user_name
    }
}

/// Desired resources paired with the ones on the server.
pub(crate) struct Matching<'a, D, C> {
    /// The desired resources kept, in (externalId, name) order, each with its match.
    pub wanted: Vec<(&'a D, Option<&'a C>)>,
    /// Current resources with an id that no desired one claimed, in id order.
    pub unclaimed: Vec<&'a C>,
    /// External ids of desired resources set aside because an earlier one has the same
    /// external id or name (case-insensitively).
    pub skipped: Vec<String>,
    /// Current resources without an id: they cannot be addressed and are left alone.
    pub without_id: usize,
}

/// Pairs `desired` with `current`: by externalId (exact) first for all desired resources,
/// then by name (case-insensitive) among the current ones left. Deterministic whatever the
/// order of either input: desired ones are taken in (externalId, name) order, current ones
/// in id order.
pub(crate) fn match_resources<'a, D: Matchable, C: Matchable + Resource>(
    desired: &'a [D],
    current: &'a [C],
) -> Matching<'a, D, C> {
    let ext = |d: &D| d.match_external_id().unwrap_or_default().to_string();
    let mut wanted: Vec<&D> = desired.iter().collect();
    wanted.sort_by(|a, b| (ext(a), a.match_name()).cmp(&(ext(b), b.match_name())));
    let mut skipped = Vec::new();
    let mut seen_ext = HashSet::new();
    let mut seen_name = HashSet::new();
    wanted.retain(|d| {
        let name = d.match_name().to_lowercase();
        if seen_ext.contains(&ext(d)) || seen_name.contains(&name) {
            skipped.push(ext(d));
            return false;
        }
        seen_ext.insert(ext(d));
        seen_name.insert(name);
        true
    });

    let mut present: Vec<&C> = current.iter().filter(|c| c.scim_id().is_some()).collect();
    present.sort_by(|a, b| a.scim_id().cmp(&b.scim_id()));
    let mut by_ext: HashMap<&str, usize> = HashMap::new();
    let mut by_name: HashMap<String, usize> = HashMap::new();
    for (i, c) in present.iter().enumerate() {
        if let Some(e) = c.match_external_id() {
            by_ext.entry(e).or_insert(i);
        }
        by_name.entry(c.match_name().to_lowercase()).or_insert(i);
    }

    let mut claimed = vec![false; present.len()];
    let mut matched: Vec<Option<usize>> = vec![None; wanted.len()];
    for (w, d) in wanted.iter().enumerate() {
        if let Some(&i) = by_ext.get(ext(d).as_str()) {
            if !claimed[i] {
                claimed[i] = true;
                matched[w] = Some(i);
            }
        }
    }
    for (w, d) in wanted.iter().enumerate() {
        if matched[w].is_some() {
            continue;
        }
        if let Some(&i) = by_name.get(&d.match_name().to_lowercase()) {
            if !claimed[i] {
                claimed[i] = true;
                matched[w] = Some(i);
            }
        }
    }

    Matching {
        wanted: wanted
            .into_iter()
            .zip(&matched)
            .map(|(d, m)| (d, m.map(|i| present[i])))
            .collect(),
        unclaimed: present
            .iter()
            .zip(&claimed)
            .filter(|(_, c)| !**c)
            .map(|(p, _)| *p)
            .collect(),
        skipped,
        without_id: current.len() - present.len(),
    }
}

/// The PATCH operations that turn `current` into `desired`: `replace` for a changed or new
/// value, `remove` for a value that became absent, nothing for what already matches.
pub fn update_ops(desired: &DesiredUser, current: &ScimUser) -> Vec<PatchOp> {
    let mut ops = Vec::new();
    if current.external_id.as_deref() != Some(desired.external_id.as_str()) {
        ops.push(PatchOp::replace("externalId", json!(desired.external_id)));
    }
    if current.user_name != desired.user_name {
        ops.push(PatchOp::replace("userName", json!(desired.user_name)));
    }
    string_op(
        &mut ops,
        "displayName",
        present(&desired.display_name),
        present(&current.display_name),
    );
    let name = current.name.as_ref();
    string_op(
        &mut ops,
        "name.givenName",
        present(&desired.given_name),
        name.and_then(|n| present(&n.given_name)),
    );
    string_op(
        &mut ops,
        "name.familyName",
        present(&desired.family_name),
        name.and_then(|n| present(&n.family_name)),
    );
    string_op(
        &mut ops,
        "name.formatted",
        present(&desired.formatted_name),
        name.and_then(|n| present(&n.formatted)),
    );
    let wanted = desired.sendable_emails();
    if normalised_emails(&wanted) != normalised_emails(&current.emails) {
        if wanted.is_empty() {
            ops.push(PatchOp::remove("emails"));
        } else {
            ops.push(PatchOp::replace("emails", json!(wanted)));
        }
    }
    // A server that does not report `active` is taken to mean active.
    if current.active.unwrap_or(true) != desired.active {
        ops.push(PatchOp::replace("active", json!(desired.active)));
    }
    ops
}

fn string_op(ops: &mut Vec<PatchOp>, path: &str, desired: Option<&str>, current: Option<&str>) {
    match (desired, current) {
        (Some(d), c) if Some(d) != c => ops.push(PatchOp::replace(path, json!(d))),
        (None, Some(_)) => ops.push(PatchOp::remove(path)),
        _ => {}
    }
}

/// An empty string is no value at all.
fn present(value: &Option<String>) -> Option<&str> {
    value.as_deref().filter(|s| !s.is_empty())
}

/// Emails as a sorted multiset, compared without regard to order, case of the address or the
/// type, surrounding spaces, or an absent versus false `primary`.
fn normalised_emails(emails: &[ScimEmail]) -> Vec<(String, String, bool)> {
    let mut out: Vec<(String, String, bool)> = emails
        .iter()
        .filter(|e| !e.value.trim().is_empty())
        .map(|e| {
            (
                e.value.trim().to_lowercase(),
                e.kind.as_deref().unwrap_or("").trim().to_lowercase(),
                e.primary.unwrap_or(false),
            )
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scim::resources::PatchOpKind;

    fn desired(ext: &str, user_name: &str) -> DesiredUser {
        DesiredUser {
            external_id: ext.into(),
            user_name: user_name.into(),
            display_name: Some(format!("{user_name} display")),
            given_name: Some("Given".into()),
            family_name: Some("Family".into()),
            formatted_name: None,
            emails: vec![email(&format!("{user_name}@example.org"), "work", true)],
            active: true,
        }
    }

    fn email(value: &str, kind: &str, primary: bool) -> ScimEmail {
        ScimEmail {
            value: value.into(),
            kind: Some(kind.into()),
            primary: Some(primary),
        }
    }

    /// The server-side state exactly matching `d`.
    fn current_of(d: &DesiredUser, id: &str) -> ScimUser {
        ScimUser {
            id: Some(id.into()),
            ..d.to_scim_user()
        }
    }

    fn managed(ids: &[&str]) -> HashSet<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn creates_missing_users_sorted() {
        let want = [desired("e2", "bob"), desired("e1", "alice")];
        let plan = plan_users(&want, &[], &managed(&[]), DeprovisionMode::Delete);
        let exts: Vec<&str> = plan.create.iter().map(|d| d.external_id.as_str()).collect();
        assert_eq!(exts, ["e1", "e2"]);
        assert!(plan.update.is_empty() && plan.deprovision.is_empty() && plan.adopt.is_empty());
    }

    #[test]
    fn matching_user_is_unchanged() {
        let d = desired("e1", "alice");
        let plan = plan_users(
            std::slice::from_ref(&d),
            &[current_of(&d, "1")],
            &managed(&["1"]),
            DeprovisionMode::Delete,
        );
        assert_eq!(plan.unchanged, 1);
        assert!(plan.update.is_empty() && plan.create.is_empty() && plan.adopt.is_empty());
    }

    #[test]
    fn updates_only_what_changed() {
        let d = desired("e1", "alice");
        let mut cur = current_of(&d, "1");
        cur.display_name = Some("Old".into());
        cur.name.as_mut().unwrap().formatted = Some("Alice Old".into());
        let plan = plan_users(&[d], &[cur], &managed(&["1"]), DeprovisionMode::Delete);
        assert_eq!(
            plan.update,
            vec![UserUpdate {
                id: "1".into(),
                external_id: "e1".into(),
                user_name: "alice".into(),
                ops: vec![
                    PatchOp::replace("displayName", json!("alice display")),
                    PatchOp::remove("name.formatted"),
                ],
            }]
        );
    }

    #[test]
    fn absent_values_become_remove_and_empty_strings_count_as_absent() {
        let mut d = desired("e1", "alice");
        let cur = current_of(&d, "1");
        d.display_name = Some(String::new());
        d.given_name = None;
        d.emails.clear();
        let ops = update_ops(&d, &cur);
        assert_eq!(
            ops,
            vec![
                PatchOp::remove("displayName"),
                PatchOp::remove("name.givenName"),
                PatchOp::remove("emails"),
            ]
        );
    }

    #[test]
    fn emails_compare_order_and_case_insensitively() {
        let mut d = desired("e1", "alice");
        d.emails = vec![
            email("alice@example.org", "work", true),
            email("a.l@example.org", "home", false),
        ];
        let mut cur = current_of(&d, "1");
        cur.emails = vec![
            ScimEmail {
                value: " A.L@Example.org".into(),
                kind: Some("Home".into()),
                primary: None,
            },
            email("ALICE@example.org", "work", true),
        ];
        assert!(update_ops(&d, &cur).is_empty());
        cur.emails.pop();
        let ops = update_ops(&d, &cur);
        assert_eq!(ops, vec![PatchOp::replace("emails", json!(d.emails))]);
    }

    #[test]
    fn deprovision_delete_versus_deactivate() {
        let gone = current_of(&desired("e9", "zed"), "9");
        let mut gone_inactive = current_of(&desired("e8", "yan"), "8");
        gone_inactive.active = Some(false);
        let current = [gone.clone(), gone_inactive.clone()];
        let ids = managed(&["9", "8"]);

        let plan = plan_users(&[], &current, &ids, DeprovisionMode::Delete);
        assert_eq!(
            plan.deprovision,
            vec![
                Deprovision {
                    id: "8".into(),
                    user_name: "yan".into(),
                    external_id: Some("e8".into()),
                },
                Deprovision {
                    id: "9".into(),
                    user_name: "zed".into(),
                    external_id: Some("e9".into()),
                },
            ]
        );
        assert_eq!(plan.deprovision_mode, DeprovisionMode::Delete);

        let plan = plan_users(&[], &current, &ids, DeprovisionMode::Deactivate);
        assert_eq!(
            plan.deprovision,
            vec![Deprovision {
                id: "9".into(),
                user_name: "zed".into(),
                external_id: Some("e9".into()),
            }]
        );
        assert_eq!(plan.unchanged, 1);
    }

    #[test]
    fn adopts_by_user_name_case_insensitively() {
        let d = desired("e1", "alice");
        let cur = ScimUser {
            external_id: None,
            user_name: "ALICE".into(),
            ..current_of(&d, "7")
        };
        let plan = plan_users(&[d], &[cur], &managed(&[]), DeprovisionMode::Delete);
        assert_eq!(plan.adopt, vec![("e1".to_string(), "7".to_string())]);
        assert!(plan.create.is_empty());
        assert_eq!(
            plan.update[0].ops,
            vec![
                PatchOp::replace("externalId", json!("e1")),
                PatchOp::replace("userName", json!("alice")),
            ]
        );
    }

    #[test]
    fn external_id_match_wins_over_user_name_match() {
        // The user with externalId e1 was renamed to "bob"; a stranger now holds "alice"...
        let d = desired("e1", "alice");
        let by_ext = ScimUser {
            user_name: "bob".into(),
            ..current_of(&d, "1")
        };
        let stranger = ScimUser {
            external_id: None,
            ..current_of(&d, "2")
        };
        let plan = plan_users(
            &[d],
            &[stranger, by_ext],
            &managed(&["1"]),
            DeprovisionMode::Delete,
        );
        assert_eq!(plan.update.len(), 1);
        assert_eq!(plan.update[0].id, "1");
        assert_eq!(
            plan.update[0].ops,
            vec![PatchOp::replace("userName", json!("alice"))]
        );
        // ...and the stranger is not ours: counted, never touched.
        assert_eq!(plan.unmanaged, 1);
        assert!(plan.deprovision.is_empty() && plan.adopt.is_empty());
    }

    #[test]
    fn unmanaged_users_are_never_touched() {
        let strangers: Vec<ScimUser> = (0..5)
            .map(|i| {
                current_of(
                    &desired(&format!("x{i}"), &format!("s{i}")),
                    &format!("s{i}"),
                )
            })
            .collect();
        for mode in [DeprovisionMode::Delete, DeprovisionMode::Deactivate] {
            let plan = plan_users(&[], &strangers, &managed(&["other"]), mode);
            assert_eq!(plan.unmanaged, 5);
            assert!(plan.deprovision.is_empty() && plan.update.is_empty());
        }
    }

    #[test]
    fn inactive_desired_user_is_reactivated() {
        let d = desired("e1", "alice");
        let mut cur = current_of(&d, "1");
        cur.active = Some(false);
        let plan = plan_users(&[d], &[cur], &managed(&["1"]), DeprovisionMode::Deactivate);
        assert_eq!(
            plan.update[0].ops,
            vec![PatchOp {
                op: PatchOpKind::Replace,
                path: Some("active".into()),
                value: Some(json!(true)),
            }]
        );
    }

    #[test]
    fn plan_is_independent_of_input_order() {
        let want: Vec<DesiredUser> = (0..20)
            .map(|i| desired(&format!("e{i:02}"), &format!("u{i}")))
            .collect();
        let mut current: Vec<ScimUser> = want
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 3 == 0)
            .map(|(i, d)| ScimUser {
                display_name: Some("stale".into()),
                ..current_of(d, &format!("id{i}"))
            })
            .collect();
        current.push(current_of(&desired("old1", "gone1"), "g1"));
        current.push(current_of(&desired("old2", "gone2"), "g2"));
        let ids = managed(&["g1", "g2", "id0", "id3"]);
        let a = plan_users(&want, &current, &ids, DeprovisionMode::Delete);
        let mut want_rev = want.clone();
        want_rev.reverse();
        current.reverse();
        let b = plan_users(&want_rev, &current, &ids, DeprovisionMode::Delete);
        assert_eq!(a, b);
        assert_eq!(a.create.len(), 13);
        assert_eq!(a.update.len(), 7);
        assert_eq!(a.adopt.len(), 5);
        assert_eq!(a.deprovision.len(), 2);
        assert_eq!(a.matched.len(), 7);
        assert_eq!(a.matched["e03"], "id3");
    }

    #[test]
    fn duplicate_desired_users_are_skipped_and_reported() {
        let plan = plan_users(
            &[
                desired("e1", "alice"),
                desired("e2", "Alice"),
                desired("e1", "x"),
            ],
            &[],
            &managed(&[]),
            DeprovisionMode::Delete,
        );
        assert_eq!(plan.create.len(), 1);
        assert_eq!(plan.create[0].user_name, "alice");
        assert_eq!(plan.skipped_duplicates, ["e1", "e2"]);
    }
}
