//! Provisioning scenarios written once and run against every SCIM server of [`super::peers`]:
//! a deployment of hub and agent processes ([`super::deploy`]), `connect sync` forcing runs, and
//! what ended up in the application read back through the server's own API.
//!
//! A scenario states the outcome an administrator expects, never a server's habit: where the
//! servers differ (PATCH status, `Location`, filters, keep-alive), the engine must cope.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};

use scim_connect::scim::resources::{GROUP_SCHEMA, PATCH_OP_SCHEMA, USER_SCHEMA};

use super::deploy::{
    deploy, sample_directory, user, write_directory, App, DeploySpec, Deployment, Target,
    SCIM_TOKEN,
};
use super::peers::LoggedRequest;
use super::ScimPeer;

/// Every resource at `endpoint` (`Users`, `Groups`) of `server`, asserting they fit one page.
async fn list_all<S: ScimPeer>(server: &S, endpoint: &str) -> Vec<Value> {
    let list = server
        .get_json(&format!("/{endpoint}?count=1000&startIndex=1"))
        .await;
    let total = list["totalResults"].as_u64().unwrap_or(u64::MAX);
    assert!(total <= 1000, "test expects a single page: {list}");
    let resources: Vec<Value> = list["Resources"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        resources.len() as u64,
        total,
        "{}: one full page: {list}",
        S::KIND
    );
    resources
}

/// The key of a user in [`users_of`]: its externalId, or `unmanaged:<userName>`.
fn user_key(u: &Value) -> String {
    u["externalId"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| format!("unmanaged:{}", u["userName"].as_str().unwrap()))
}

/// All users of `server`, by externalId (unmanaged users without one under
/// `unmanaged:<userName>`), asserting that no externalId and no userName (compared without
/// case) is held twice.
pub async fn users_of<S: ScimPeer>(server: &S) -> BTreeMap<String, Value> {
    let mut users = BTreeMap::new();
    let mut names = BTreeSet::new();
    for u in list_all(server, "Users").await {
        let name = u["userName"].as_str().unwrap_or_default().to_lowercase();
        assert!(names.insert(name), "{}: userName held twice: {u}", S::KIND);
        let key = user_key(&u);
        if let Some(first) = users.insert(key.clone(), u) {
            panic!("{}: user {key} exists twice: {first}", S::KIND);
        }
    }
    users
}

/// Checks that `u` is sample person `i` with family name `family`, active.
pub fn assert_user(u: &Value, i: u32, family: &str) {
    assert_eq!(u["userName"], format!("person{i:02}@example.com"), "{u}");
    assert_eq!(u["name"]["givenName"], format!("Given{i:02}"), "{u}");
    assert_eq!(u["name"]["familyName"], family, "{u}");
    assert_eq!(
        u["emails"][0]["value"],
        format!("person{i:02}@example.com"),
        "{u}"
    );
    assert_eq!(u["active"], true, "{u}");
}

/// Two applications on two servers of kind `S` (`crm` deprovisions by DELETE, `wiki` by
/// `active=false` and lists in pages of 5): the first run creates the 11 granted users and leaves a pre-existing
/// unmanaged user alone, a second run changes nothing, and after a rename, a revoked grant and a
/// new grant each application has exactly the directory's state. Returns the two servers
/// (`crm`, `wiki`) for checks specific to their kind.
pub async fn provisions_updates_and_deprovisions<S: ScimPeer>() -> (S, S) {
    let crm = S::start_with_token(SCIM_TOKEN).await;
    let wiki = S::start_with_token(SCIM_TOKEN).await;
    // A user that existed before the hub: it matches nobody and must never be touched.
    crm.post_json(
        "/Users",
        &json!({ "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": "legacy-admin" }),
    )
    .await;

    let apps = vec![
        App::new("crm", &crm.app_base_url("crm.internal.example"), "crm-scim"),
        // Small pages: listing 11 to 13 users takes several, and the servers page differently
        // (scimmy's itemsPerPage echoes the requested count, scim2-server's counts the page).
        App::new(
            "wiki",
            &wiki.app_base_url("wiki.internal.example"),
            "wiki-scim",
        )
        .deprovision("deactivate")
        .with("page_size = 5"),
    ];
    let targets = vec![
        Target::new("crm-scim", crm.addr().to_string()),
        Target::new("wiki-scim", wiki.addr().to_string()),
    ];
    let deployment = deploy(DeploySpec::new(apps, targets)).await;
    deployment.wait_for_agent("wiki-scim").await;

    for app in ["crm", "wiki"] {
        let (code, out) = deployment.sync(app);
        assert_eq!(code, 0, "{}: {app}: {out}\n{}", S::KIND, deployment.logs());
        assert!(out.contains("created 11"), "{}: {app}: {out}", S::KIND);
    }
    for server in [&crm, &wiki] {
        let users = users_of(server).await;
        let managed: Vec<&String> = users
            .keys()
            .filter(|k| !k.starts_with("unmanaged:"))
            .collect();
        assert_eq!(managed.len(), 11, "{users:?}");
        for i in 1..=11 {
            assert_user(&users[&format!("u{i:02}")], i, &format!("Family{i:02}"));
        }
        assert!(!users.contains_key("u12"), "u12 is not granted");
    }
    assert!(users_of(&crm).await.contains_key("unmanaged:legacy-admin"));

    // A second run with nothing changed changes nothing.
    let (code, out) = deployment.sync("crm");
    assert_eq!(code, 0, "{}: {out}", S::KIND);
    assert!(
        out.contains("created 0, updated 0, deprovisioned 0"),
        "{}: {out}",
        S::KIND
    );
    assert!(out.contains("unchanged 11"), "{}: {out}", S::KIND);

    // Rename u01, take u02 out of staff, add u13 to staff.
    let mut directory = sample_directory();
    directory["users"][0]["name"]["familyName"] = json!("Renamed");
    directory["users"][0]["displayName"] = json!("Given01 Renamed");
    directory["users"].as_array_mut().unwrap().push(user(
        "u13",
        "person13@example.com",
        "Given13",
        "Family13",
    ));
    let staff = directory["groups"][0]["members"].as_array_mut().unwrap();
    staff.retain(|m| m["value"] != "u02");
    staff.push(json!({ "value": "u13", "type": "User" }));
    write_directory(&deployment.path("directory.json"), &directory);

    for app in ["crm", "wiki"] {
        let (code, out) = deployment.sync(app);
        assert_eq!(code, 0, "{}: {app}: {out}\n{}", S::KIND, deployment.logs());
        assert!(
            out.contains("created 1, updated 1, deprovisioned 1"),
            "{}: {app}: {out}",
            S::KIND
        );
    }
    let crm_users = users_of(&crm).await;
    assert_user(&crm_users["u01"], 1, "Renamed");
    assert_eq!(crm_users["u01"]["displayName"], "Given01 Renamed");
    assert!(!crm_users.contains_key("u02"), "delete mode removes u02");
    assert_user(&crm_users["u13"], 13, "Family13");
    assert!(
        crm_users.contains_key("unmanaged:legacy-admin"),
        "unmanaged user left alone"
    );
    assert_eq!(crm_users.len(), 12);

    let wiki_users = users_of(&wiki).await;
    assert_eq!(
        wiki_users["u02"]["active"], false,
        "deactivate mode keeps u02, inactive"
    );
    assert_user(&wiki_users["u01"], 1, "Renamed");
    assert_user(&wiki_users["u13"], 13, "Family13");

    // Once deactivated, u02 stays as it is: nothing left to do in either application.
    for app in ["crm", "wiki"] {
        let (code, out) = deployment.sync(app);
        assert_eq!(code, 0, "{}: {app}: {out}", S::KIND);
        assert!(
            out.contains("created 0, updated 0, deprovisioned 0"),
            "{}: {app}: {out}",
            S::KIND
        );
    }
    (crm, wiki)
}

/// A group as a server holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldGroup {
    pub id: String,
    pub external_id: Option<String>,
    /// Its members by user key ([`users_of`]); `?<value>` for a value that is no user.
    pub members: BTreeSet<String>,
    /// The resource as the server returned it (`meta` included: two reads are equal only if
    /// nothing changed in between).
    pub raw: Value,
}

/// What a SCIM server holds, read through its own API.
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    /// As [`users_of`] keys them.
    pub users: BTreeMap<String, Value>,
    /// By displayName.
    pub groups: BTreeMap<String, HeldGroup>,
}

impl Held {
    /// The group named `name`; panics, listing the groups held, when there is none.
    pub fn group(&self, name: &str) -> &HeldGroup {
        self.groups.get(name).unwrap_or_else(|| {
            panic!(
                "no group `{name}`; held: {:?}",
                self.groups.keys().collect::<Vec<_>>()
            )
        })
    }

    /// The SCIM id of the user under `key`.
    pub fn user_id(&self, key: &str) -> String {
        match self.users.get(key) {
            Some(u) => u["id"].as_str().unwrap().to_string(),
            None => panic!("no user {key}: {:?}", self.users.keys().collect::<Vec<_>>()),
        }
    }
}

/// Users and groups of `server`, asserting that nothing is held twice: no externalId or
/// userName of a user, no displayName (compared without case) or externalId of a group, no
/// member value within a group. Members are named by user key, whatever the server sends with
/// them (`display`, `$ref`, `type`, or `members` left out of an empty group).
pub async fn held<S: ScimPeer>(server: &S) -> Held {
    let users = users_of(server).await;
    let key_of: BTreeMap<&str, &str> = users
        .iter()
        .map(|(key, u)| (u["id"].as_str().unwrap(), key.as_str()))
        .collect();
    let mut groups = BTreeMap::new();
    let (mut names, mut exts) = (BTreeSet::new(), BTreeSet::new());
    for g in list_all(server, "Groups").await {
        let name = g["displayName"].as_str().unwrap().to_string();
        assert!(
            names.insert(name.to_lowercase()),
            "{}: `{name}` twice",
            S::KIND
        );
        let external_id = g["externalId"].as_str().map(str::to_string);
        if let Some(ext) = &external_id {
            assert!(exts.insert(ext.clone()), "{}: group {ext} twice", S::KIND);
        }
        let values: Vec<&str> = g["members"]
            .as_array()
            .map(|m| m.iter().map(|m| m["value"].as_str().unwrap()).collect())
            .unwrap_or_default();
        let members: BTreeSet<String> = values
            .iter()
            .map(|v| {
                key_of
                    .get(v)
                    .map_or_else(|| format!("?{v}"), |k| k.to_string())
            })
            .collect();
        assert_eq!(
            members.len(),
            values.len(),
            "{}: a member twice: {g}",
            S::KIND
        );
        let id = g["id"].as_str().unwrap().to_string();
        let group = HeldGroup {
            id,
            external_id,
            members,
            raw: g.clone(),
        };
        groups.insert(name, group);
    }
    Held { users, groups }
}

/// User keys `uNN` for `numbers`.
pub fn keys(numbers: impl IntoIterator<Item = u32>) -> BTreeSet<String> {
    numbers.into_iter().map(|i| format!("u{i:02}")).collect()
}

/// `connect sync` of every app of `apps` at once, each exit code and output in order. At once,
/// so that a scheduled run of one app cannot slip in while another is forced.
pub fn sync_each(deployment: &Deployment, apps: &[&str]) -> Vec<(i32, String)> {
    std::thread::scope(|scope| {
        let runs: Vec<_> = apps
            .iter()
            .map(|app| scope.spawn(move || deployment.sync(app)))
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    })
}

/// [`sync_each`], asserting every run succeeded and that its output holds every one of
/// `expect`; the outputs.
fn sync_expecting(deployment: &Deployment, apps: &[&str], expect: &[&str]) -> Vec<String> {
    let outputs = sync_each(deployment, apps);
    for (app, (code, out)) in apps.iter().zip(&outputs) {
        assert_eq!(code, &0, "{app}: {out}\n{}", deployment.logs());
        for e in expect {
            assert!(out.contains(e), "{app}: expected `{e}` in: {out}");
        }
    }
    outputs.into_iter().map(|(_, out)| out).collect()
}

/// The requests `server` logged since `seen` of them were returned before; moves `seen` on.
async fn logged_since<S: ScimPeer>(server: &S, seen: &mut usize) -> Vec<LoggedRequest> {
    let log = server.settled_request_log().await;
    let new = log[*seen..].to_vec();
    *seen = log.len();
    new
}

/// Positions in `log` of the `method` requests on exactly `path`.
fn positions(log: &[LoggedRequest], method: &str, path: &str) -> Vec<usize> {
    (0..log.len())
        .filter(|&i| log[i].is(method, path))
        .collect()
}

/// One of the two applications of [`groups_follow_the_directory`]: on `server`, target
/// `<name>-scim`, granting `groups` and u11, 3 members per PATCH and pages of 2 (so every group
/// change of more than 3 members, and every listing, takes several requests).
fn groups_app<S: ScimPeer>(name: &str, server: &S, mode: &str, groups: &[&str]) -> App {
    let host = format!("{name}.internal.example");
    let mut app = App::new(name, &server.app_base_url(&host), &format!("{name}-scim"))
        .deprovision(mode)
        .with("member_batch_size = 3")
        .with("page_size = 2");
    app.grant_groups = groups.iter().map(|g| g.to_string()).collect();
    app
}

/// Groups through the tunnel into two servers of kind `S`, `crm` (deprovision by DELETE, with
/// an unmanaged group `legacy-team`) and `wiki` (by `active=false`), both granting `staff`
/// (u01..u08 and the nested `ops`: u09, u10), `ops` and `visitors` (u12) and u11, with 3
/// members per PATCH. The runs: groups created with their exact member sets; nothing sent when
/// nothing changed; a rename, four leavers (who leave the hub's groups before they are
/// deprovisioned), three newcomers and a group emptied, each membership change cut into PATCHes
/// of 3, then nothing left to do; a group taken out of the access rule deleted, a leaver granted
/// again reactivated (wiki) and back in its group; the deletion guard stopping an emptied
/// directory with nothing changed; a rename onto the name of the unmanaged group held back
/// while the membership still moves. Every check reads the server's own API (and, for batches
/// and order, its request log); nothing may exist twice, and `legacy-team` is never touched.
/// Returns the servers (`crm`, `wiki`) for checks specific to their kind.
pub async fn groups_follow_the_directory<S: ScimPeer>() -> (S, S) {
    const GRANT: [&str; 3] = ["g-staff", "g-ops", "visitors"];
    let crm = S::start_with_token(SCIM_TOKEN).await;
    let wiki = S::start_with_token(SCIM_TOKEN).await;
    let groups_path = |id: &str| format!("{}/Groups/{id}", S::BASE_PATH);
    let user_path = |id: &str| format!("{}/Users/{id}", S::BASE_PATH);
    // On crm before the hub: a group that matches nothing, with a member. Never touched.
    let legacy_admin = crm
        .post_json(
            "/Users",
            &json!({"schemas": [USER_SCHEMA], "userName": "legacy-admin"}),
        )
        .await;
    let legacy_team = crm
        .post_json(
            "/Groups",
            &json!({"schemas": [GROUP_SCHEMA], "displayName": "legacy-team",
                    "members": [{"value": legacy_admin["id"], "type": "User"}]}),
        )
        .await;
    let legacy_id = legacy_team["id"].as_str().unwrap().to_string();

    let apps = |grant: &[&str]| {
        vec![
            groups_app("crm", &crm, "delete", grant),
            groups_app("wiki", &wiki, "deactivate", grant),
        ]
    };
    let targets = vec![
        Target::new("crm-scim", crm.addr().to_string()),
        Target::new("wiki-scim", wiki.addr().to_string()),
    ];
    let mut deployment = deploy(DeploySpec::new(apps(&GRANT), targets)).await;
    deployment.wait_for_agent("wiki-scim").await;
    let both = ["crm", "wiki"];
    let (mut crm_seen, mut wiki_seen) = (0, 0);
    // What the test itself sent is not the hub's doing.
    logged_since(&crm, &mut crm_seen).await;

    // Run 1: 12 users and 3 groups, the nested ops flattened into staff. Staff's 10 members
    // go out as 3 in its POST and 7 in PATCHes of 3, 3 and 1.
    sync_expecting(
        &deployment,
        &both,
        &[
            "created 12, updated 0, deprovisioned 0",
            "groups: desired 3 — 3 created, 0 updated, 0 deleted",
            "members 13 added, 0 removed",
        ],
    );
    let logs = [
        logged_since(&crm, &mut crm_seen).await,
        logged_since(&wiki, &mut wiki_seen).await,
    ];
    for (server_log, h) in logs.iter().zip([held(&crm).await, held(&wiki).await]) {
        assert_eq!(h.group("staff").members, keys(1..=10));
        assert_eq!(h.group("staff").external_id.as_deref(), Some("g-staff"));
        assert_eq!(h.group("ops").members, keys([9, 10]));
        assert_eq!(h.group("ops").external_id.as_deref(), Some("g-ops"));
        assert_eq!(h.group("visitors").members, keys([12]));
        assert_eq!(
            h.group("visitors").external_id.as_deref(),
            Some("g-visitors")
        );
        let patches = |name: &str| positions(server_log, "PATCH", &groups_path(&h.group(name).id));
        assert_eq!(patches("staff").len(), 3, "{}: {server_log:?}", S::KIND);
        assert!(patches("ops").is_empty() && patches("visitors").is_empty());
        let posts = positions(server_log, "POST", &format!("{}/Groups", S::BASE_PATH));
        assert_eq!(posts.len(), 3, "{}: {server_log:?}", S::KIND);
    }
    let h = held(&crm).await;
    assert_eq!(h.groups.len(), 4, "{:?}", h.groups.keys());
    assert_eq!(
        h.group("legacy-team").members,
        BTreeSet::from(["unmanaged:legacy-admin".to_string()])
    );
    assert_eq!(held(&wiki).await.groups.len(), 3);

    // Someone else puts u03, a user the hub manages, into their own group. That group stays
    // as they left it, whatever happens to u03.
    let add_u03 = json!({"schemas": [PATCH_OP_SCHEMA], "Operations": [
        {"op": "add", "path": "members", "value": [{"value": h.user_id("u03"), "type": "User"}]}]});
    let patched = crm
        .request("PATCH", &format!("/Groups/{legacy_id}"), Some(&add_u03))
        .await;
    assert!(matches!(patched.status, 200 | 204), "{}", patched.text());
    let legacy_before = crm.get_json(&format!("/Groups/{legacy_id}")).await;
    logged_since(&crm, &mut crm_seen).await;

    // Run 2: nothing changed, nothing sent but the listings.
    let outs = sync_expecting(
        &deployment,
        &both,
        &[
            "created 0, updated 0, deprovisioned 0",
            "groups: desired 3 — 0 created, 0 updated, 0 deleted, 3 unchanged",
            "members 0 added, 0 removed",
        ],
    );
    assert!(
        outs[0].contains("3 unchanged, 1 unmanaged"),
        "legacy-team: {}",
        outs[0]
    );
    let crm_log = logged_since(&crm, &mut crm_seen).await;
    assert_no_writes(&crm_log, "crm, run 2");
    // crm's four groups were listed in two pages, whatever itemsPerPage the server echoes.
    let second_page = format!("{}/Groups?startIndex=3&count=2", S::BASE_PATH);
    assert!(
        crm_log.iter().any(|r| r.is("GET", &second_page)),
        "{}: {crm_log:?}",
        S::KIND
    );
    assert_no_writes(&logged_since(&wiki, &mut wiki_seen).await, "wiki, run 2");

    // Run 3: four leavers; newcomers u13..u15 join staff; ops is renamed operations and gains
    // u12 (and so does staff, in which ops is nested); u12 leaves visitors, which is left
    // empty. Staff loses 4 and gains 4 members: two PATCHes each way.
    const LEAVERS: [&str; 4] = ["u03", "u04", "u06", "u07"];
    let before = [held(&crm).await, held(&wiki).await];
    let mut directory = sample_directory();
    let users = directory["users"].as_array_mut().unwrap();
    for i in 13..=15 {
        users.push(user(
            &format!("u{i}"),
            &format!("person{i}@example.com"),
            &format!("Given{i}"),
            &format!("Family{i}"),
        ));
    }
    let groups = directory["groups"].as_array_mut().unwrap();
    let staff = groups[0]["members"].as_array_mut().unwrap();
    staff.retain(|m| !LEAVERS.contains(&m["value"].as_str().unwrap()));
    staff.extend((13..=15).map(|i| json!({"value": format!("u{i}"), "type": "User"})));
    groups[1]["displayName"] = json!("operations");
    groups[1]["members"]
        .as_array_mut()
        .unwrap()
        .push(json!({"value": "u12", "type": "User"}));
    groups[2]["members"] = json!([]);
    write_directory(&deployment.path("directory.json"), &directory);
    sync_expecting(
        &deployment,
        &both,
        &[
            "created 3, updated 0, deprovisioned 4",
            "groups: desired 3 — 0 created, 3 updated, 0 deleted, 0 unchanged",
            "members 5 added, 5 removed",
        ],
    );
    let staff_now = keys([1, 2, 5, 8, 9, 10, 12, 13, 14, 15]);
    let logs = [
        logged_since(&crm, &mut crm_seen).await,
        logged_since(&wiki, &mut wiki_seen).await,
    ];
    let after = [held(&crm).await, held(&wiki).await];
    for ((before, after), log) in before.iter().zip(&after).zip(&logs) {
        assert_eq!(after.group("staff").members, staff_now, "{}", S::KIND);
        assert!(!after.groups.contains_key("ops"), "renamed, not copied");
        let operations = after.group("operations");
        assert_eq!(operations.id, before.group("ops").id, "the same group");
        assert_eq!(operations.external_id.as_deref(), Some("g-ops"));
        assert_eq!(operations.members, keys([9, 10, 12]));
        assert!(after.group("visitors").members.is_empty());
        let patches = |name: &str, id: &str| {
            let at = positions(log, "PATCH", &groups_path(id));
            assert!(!at.is_empty(), "{}: no PATCH of {name}: {log:?}", S::KIND);
            at
        };
        let staff = patches("staff", &before.group("staff").id);
        assert_eq!(
            staff.len(),
            4,
            "{}: 4 removals, 4 additions: {log:?}",
            S::KIND
        );
        assert_eq!(
            patches("ops", &operations.id).len(),
            2,
            "rename, add: {log:?}"
        );
        let visitors = patches("visitors", &before.group("visitors").id);
        assert_eq!(visitors.len(), 1, "{log:?}");
        // Every leaver left the hub's groups (staff: the first two PATCHes) before it was
        // deleted or deactivated, and the newcomers joined after.
        let deprovisions: Vec<usize> = LEAVERS
            .iter()
            .map(|key| {
                let path = user_path(&before.user_id(key));
                let at: Vec<usize> = (0..log.len())
                    .filter(|&i| log[i].writes() && log[i].path == path)
                    .collect();
                assert_eq!(
                    at.len(),
                    1,
                    "{}: {key} deprovisioned once: {log:?}",
                    S::KIND
                );
                at[0]
            })
            .collect();
        let (first, last) = (
            *deprovisions.iter().min().unwrap(),
            *deprovisions.iter().max().unwrap(),
        );
        assert!(
            staff[1] < first && visitors[0] < first && last < staff[2],
            "{}: memberships removed, then users deprovisioned, then members added: {log:?}",
            S::KIND
        );
    }
    let [crm_after, wiki_after] = &after;
    for key in LEAVERS {
        assert!(
            !crm_after.users.contains_key(key),
            "delete mode removes {key}"
        );
        assert_eq!(
            wiki_after.users[key]["active"], false,
            "deactivate mode keeps {key}"
        );
    }
    assert_eq!(
        crm_after.users.len(),
        11 + 1,
        "u01..u15 but the leavers, legacy-admin"
    );
    assert_eq!(wiki_after.users.len(), 15);
    assert_eq!(
        crm.get_json(&format!("/Groups/{legacy_id}")).await,
        legacy_before
    );

    // Run 3 again: an empty group, a renamed one, the leavers: nothing left to do.
    sync_expecting(
        &deployment,
        &both,
        &[
            "created 0, updated 0, deprovisioned 0",
            "0 created, 0 updated, 0 deleted, 3 unchanged",
            "members 0 added, 0 removed",
        ],
    );
    assert_no_writes(&logged_since(&crm, &mut crm_seen).await, "crm, run 3 again");
    assert_no_writes(
        &logged_since(&wiki, &mut wiki_seen).await,
        "wiki, run 3 again",
    );

    // Run 4: visitors is taken out of the access rule (hub.toml, read when the hub starts):
    // the empty group is deleted. u03 is granted again: created anew on crm, reactivated on
    // wiki (the same account), and back in staff on both.
    deployment.set_apps(&apps(&["g-staff", "g-ops"]));
    deployment.restart_hub();
    deployment.wait_for_agent("crm-scim").await;
    deployment.wait_for_agent("wiki-scim").await;
    directory["groups"][0]["members"]
        .as_array_mut()
        .unwrap()
        .push(json!({"value": "u03", "type": "User"}));
    write_directory(&deployment.path("directory.json"), &directory);
    let groups_line = "groups: desired 2 — 0 created, 1 updated, 1 deleted, 1 unchanged";
    let outs = sync_expecting(
        &deployment,
        &both,
        &[groups_line, "members 1 added, 0 removed"],
    );
    assert!(
        outs[0].contains("created 1, updated 0, deprovisioned 0"),
        "{}",
        outs[0]
    );
    assert!(
        outs[1].contains("created 0, updated 1, deprovisioned 0"),
        "{}",
        outs[1]
    );
    let logs = [
        logged_since(&crm, &mut crm_seen).await,
        logged_since(&wiki, &mut wiki_seen).await,
    ];
    let staff_now: BTreeSet<String> = staff_now.into_iter().chain(keys([3])).collect();
    for ((before, log), server) in after.iter().zip(&logs).zip([&crm, &wiki]) {
        let h = held(server).await;
        assert!(!h.groups.contains_key("visitors"), "{:?}", h.groups.keys());
        let deleted = groups_path(&before.group("visitors").id);
        assert_eq!(positions(log, "DELETE", &deleted).len(), 1, "{log:?}");
        assert_eq!(h.group("staff").members, staff_now);
        assert_eq!(h.group("operations").members, keys([9, 10, 12]));
        assert_user(&h.users["u03"], 3, "Family03");
    }
    let h = held(&wiki).await;
    assert_eq!(
        h.user_id("u03"),
        wiki_after.user_id("u03"),
        "the same account came back"
    );
    for key in ["u04", "u06", "u07"] {
        assert_eq!(h.users[key]["active"], false, "{key} stays deactivated");
    }
    let h = held(&crm).await;
    assert_ne!(h.user_id("u03"), before[0].user_id("u03"), "a new account");
    assert_eq!(h.groups.len(), 3, "staff, operations and legacy-team");

    // Run 5: the directory is emptied by mistake: the deletion guard stops both runs and
    // nothing changes on either server.
    write_directory(
        &deployment.path("directory.json"),
        &json!({"users": [], "groups": []}),
    );
    let before = [held(&crm).await, held(&wiki).await];
    for (app, (code, out)) in both.iter().zip(sync_each(&deployment, &both)) {
        assert_eq!(code, 1, "{app}: {out}");
        assert!(
            out.contains(
                "deletion guard stopped the run: it would deprovision 12 users and delete 2 groups"
            ),
            "{app}: {out}"
        );
        assert!(out.contains(&format!("apps.{app}.deletion_guard")), "{out}");
        assert!(out.contains("nothing was changed"), "{out}");
    }
    assert_no_writes(&logged_since(&crm, &mut crm_seen).await, "crm, run 5");
    assert_no_writes(&logged_since(&wiki, &mut wiki_seen).await, "wiki, run 5");
    assert_eq!([held(&crm).await, held(&wiki).await], before);

    // Run 6: staff is renamed to the name of crm's unmanaged legacy-team (in other case), u01
    // leaves and u11 joins. On crm the rename is refused, the same on every server, whether it
    // would hold two groups of one name (scim2-server) or refuse the rename (scimmy); the
    // membership changes go out all the same, u01's before u01 is deleted. On wiki there is no
    // such group: staff is renamed.
    let groups = directory["groups"].as_array_mut().unwrap();
    groups[0]["displayName"] = json!("LEGACY-TEAM");
    let staff = groups[0]["members"].as_array_mut().unwrap();
    staff.retain(|m| m["value"] != "u01");
    staff.push(json!({"value": "u11", "type": "User"}));
    write_directory(&deployment.path("directory.json"), &directory);
    let outs = sync_each(&deployment, &both);
    let (code, out) = &outs[0];
    assert_eq!(*code, 1, "crm: {out}");
    for e in [
        "created 0, updated 0, deprovisioned 1",
        "failed 1",
        "groups: desired 2 — 0 created, 0 updated, 0 deleted, 1 unchanged",
        "members 1 added, 1 removed",
        "cannot rename group `staff` to `LEGACY-TEAM`: the application already has another \
         group named `legacy-team`",
    ] {
        assert!(out.contains(e), "crm: expected `{e}` in: {out}");
    }
    let (code, out) = &outs[1];
    assert_eq!(*code, 0, "wiki: {out}");
    for e in [
        "created 0, updated 0, deprovisioned 1",
        "groups: desired 2 — 0 created, 1 updated, 0 deleted, 1 unchanged",
        "members 1 added, 1 removed",
    ] {
        assert!(out.contains(e), "wiki: expected `{e}` in: {out}");
    }
    let staff_now: BTreeSet<String> = staff_now
        .into_iter()
        .filter(|k| k != "u01")
        .chain(keys([11]))
        .collect();
    let crm_log = logged_since(&crm, &mut crm_seen).await;
    let h = held(&crm).await;
    assert_eq!(h.group("staff").members, staff_now, "{crm_log:?}");
    assert!(!h.users.contains_key("u01"));
    let staff_patches = positions(&crm_log, "PATCH", &groups_path(&h.group("staff").id));
    let deleted = positions(&crm_log, "DELETE", &user_path(&before[0].user_id("u01")));
    assert!(
        !staff_patches.is_empty() && deleted.len() == 1 && staff_patches[0] < deleted[0],
        "{}: u01 left staff before it was deleted: {crm_log:?}",
        S::KIND
    );
    let h = held(&wiki).await;
    assert!(!h.groups.contains_key("staff"), "{:?}", h.groups.keys());
    assert_eq!(h.group("LEGACY-TEAM").members, staff_now);
    assert_eq!(
        h.group("LEGACY-TEAM").external_id.as_deref(),
        Some("g-staff")
    );
    assert_eq!(h.users["u01"]["active"], false);
    assert_eq!(
        crm.get_json(&format!("/Groups/{legacy_id}")).await,
        legacy_before
    );
    (crm, wiki)
}

/// Asserts that `log` holds reads only.
fn assert_no_writes(log: &[LoggedRequest], what: &str) {
    let writes: Vec<&LoggedRequest> = log.iter().filter(|r| r.writes()).collect();
    assert!(
        writes.is_empty(),
        "{what}: nothing to change, yet: {writes:?}"
    );
}

/// How `server` takes one member out of a group, in the two forms clients send: RFC 7644
/// §3.5.2.2's `remove` with a value-filtered path (`members[value eq "<id>"]`), the form the hub
/// sends, and a `remove` of `members` carrying `value: [{"value": "<id>"}]`, which RFC 7644
/// does not define (its `remove` has no value, and a path without a filter removes every
/// member). For each: the status, and whether exactly that member left.
pub async fn member_removal_forms<S: ScimPeer>(server: &S) -> [(u16, bool); 2] {
    let mut ids = Vec::new();
    for name in ["probe-member-a", "probe-member-b"] {
        let u = server
            .post_json(
                "/Users",
                &json!({"schemas": [USER_SCHEMA], "userName": name}),
            )
            .await;
        ids.push(u["id"].as_str().unwrap().to_string());
    }
    let (a, b) = (&ids[0], &ids[1]);
    let members = |ids: &[&String]| -> Vec<Value> {
        ids.iter()
            .map(|id| json!({"value": id, "type": "User"}))
            .collect()
    };
    let forms = [
        json!({"op": "remove", "path": format!("members[value eq \"{a}\"]")}),
        json!({"op": "remove", "path": "members", "value": [{"value": a}]}),
    ];
    let mut seen = [(0, false); 2];
    for (i, form) in forms.into_iter().enumerate() {
        let group = server
            .post_json(
                "/Groups",
                &json!({"schemas": [GROUP_SCHEMA], "displayName": format!("probe-removal-{i}"),
                        "members": members(&[a, b])}),
            )
            .await;
        let path = format!("/Groups/{}", group["id"].as_str().unwrap());
        let body = json!({"schemas": [PATCH_OP_SCHEMA], "Operations": [form]});
        let answer = server.request("PATCH", &path, Some(&body)).await;
        let now = server.get_json(&path).await;
        let left: Vec<&str> = now["members"]
            .as_array()
            .map(|m| m.iter().filter_map(|m| m["value"].as_str()).collect())
            .unwrap_or_default();
        seen[i] = (answer.status, left == [b.as_str()]);
    }
    seen
}
