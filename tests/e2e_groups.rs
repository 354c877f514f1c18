//! Groups end to end against a real scim2-server (PyPI), as an administrator deploys it: hub
//! and agent as processes, `connect sync` forcing runs, and every check made through the
//! server's own API — which groups exist, their displayNames and their exact member sets.
//!
//! scim2-server answers a group PATCH with 204 and no body, does not validate members and does
//! not take a deleted user out of its groups: the member sets checked here show the hub
//! removed memberships itself, in the right order.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::deploy::{
    deploy, sample_directory, user, write_directory, App, DeploySpec, Deployment, Target,
    SCIM_TOKEN,
};
use common::Scim2Server;
use serde_json::{json, Value};

const GROUP_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:Group";

/// What a SCIM server holds, read through its own API.
struct Held {
    /// externalId (or `unmanaged:<userName>`) → user.
    users: BTreeMap<String, Value>,
    /// displayName → (externalId, member externalIds; `?<id>` for an id that is no user).
    groups: BTreeMap<String, (Option<String>, BTreeSet<String>)>,
}

async fn held(server: &Scim2Server) -> Held {
    let list = server.get_json("/Users?count=1000").await;
    let users: Vec<Value> = list["Resources"].as_array().cloned().unwrap_or_default();
    let ext_of: BTreeMap<String, String> = users
        .iter()
        .map(|u| {
            let key = u["externalId"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("unmanaged:{}", u["userName"].as_str().unwrap()));
            (u["id"].as_str().unwrap().to_string(), key)
        })
        .collect();
    let mut by_key = BTreeMap::new();
    for u in &users {
        let key = ext_of[u["id"].as_str().unwrap()].clone();
        assert!(
            by_key.insert(key.clone(), u.clone()).is_none(),
            "user {key} exists twice"
        );
    }
    let list = server.get_json("/Groups?count=1000").await;
    let mut groups = BTreeMap::new();
    for g in list["Resources"].as_array().cloned().unwrap_or_default() {
        let name = g["displayName"].as_str().unwrap().to_string();
        let members: BTreeSet<String> = g["members"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|m| {
                let id = m["value"].as_str().unwrap();
                ext_of.get(id).cloned().unwrap_or_else(|| format!("?{id}"))
            })
            .collect();
        let ext = g["externalId"].as_str().map(str::to_string);
        assert!(
            groups.insert(name.clone(), (ext, members)).is_none(),
            "group {name} exists twice"
        );
    }
    Held {
        users: by_key,
        groups,
    }
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn ids(range: impl IntoIterator<Item = u32>) -> Vec<String> {
    range.into_iter().map(|i| format!("u{i:02}")).collect()
}

fn as_set(v: Vec<String>) -> BTreeSet<String> {
    v.into_iter().collect()
}

fn sync_ok(deployment: &Deployment, app: &str) -> String {
    let (code, out) = deployment.sync(app);
    assert_eq!(code, 0, "{app}: {out}\n{}", deployment.logs());
    out
}

/// The apps grant `staff` (u01..u08 and nested `ops`: u09, u10), `ops`, `visitors` (u12) and
/// u11 — staff and ops by id, visitors by displayName; member_batch_size 3 makes the 10
/// members of staff go out in several requests.
fn app(name: &str, port: u16, target: &str, mode: &str) -> App {
    let mut app = App::new(
        name,
        &format!("http://{name}.internal.example:{port}/v2"),
        target,
    )
    .deprovision(mode)
    .with("member_batch_size = 3");
    app.grant_groups = vec!["g-staff".into(), "g-ops".into(), "visitors".into()];
    app
}

#[tokio::test]
async fn groups_follow_the_directory_on_a_real_scim_server() {
    let crm = Scim2Server::start(Some(SCIM_TOKEN)).await;
    let wiki = Scim2Server::start(Some(SCIM_TOKEN)).await;
    // On crm before the hub: a group that matches nothing, with a member. Never touched.
    let legacy_user = crm
        .post_json(
            "/Users",
            &json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": "legacy-admin"}),
        )
        .await;
    crm.post_json(
        "/Groups",
        &json!({"schemas": [GROUP_SCHEMA], "displayName": "legacy-team",
                "members": [{"value": legacy_user["id"]}]}),
    )
    .await;

    let apps = vec![
        app("crm", crm.port, "crm-scim", "delete"),
        app("wiki", wiki.port, "wiki-scim", "deactivate"),
    ];
    let targets = vec![
        Target::new("crm-scim", format!("127.0.0.1:{}", crm.port)),
        Target::new("wiki-scim", format!("127.0.0.1:{}", wiki.port)),
    ];
    let deployment = deploy(DeploySpec::new(apps, targets)).await;
    deployment.wait_for_agent("wiki-scim").await;

    // Run 1: 12 users, 3 groups, nested ops flattened into staff.
    for name in ["crm", "wiki"] {
        let out = sync_ok(&deployment, name);
        assert!(
            out.contains("created 12, updated 0, deprovisioned 0"),
            "{out}"
        );
        assert!(
            out.contains("groups: desired 3 — 3 created, 0 updated, 0 deleted"),
            "{out}"
        );
        assert!(out.contains("members 13 added, 0 removed"), "{out}");
    }
    for server in [&crm, &wiki] {
        let h = held(server).await;
        assert_eq!(
            h.groups["staff"],
            (Some("g-staff".into()), as_set(ids(1..=10)))
        );
        assert_eq!(
            h.groups["ops"],
            (Some("g-ops".into()), set(&["u09", "u10"]))
        );
        assert_eq!(
            h.groups["visitors"],
            (Some("g-visitors".into()), set(&["u12"]))
        );
    }
    let h = held(&crm).await;
    assert_eq!(
        h.groups["legacy-team"],
        (None, set(&["unmanaged:legacy-admin"]))
    );
    assert_eq!(h.groups.len(), 4);

    // Run 2: nothing changed, nothing sent but the listings.
    for name in ["crm", "wiki"] {
        let out = sync_ok(&deployment, name);
        assert!(
            out.contains("created 0, updated 0, deprovisioned 0"),
            "{out}"
        );
        assert!(
            out.contains("groups: desired 3 — 0 created, 0 updated, 0 deleted, 3 unchanged"),
            "{out}"
        );
        assert!(out.contains("members 0 added, 0 removed"), "{out}");
    }
    let out = sync_ok(&deployment, "crm");
    assert!(
        out.contains("3 unchanged, 1 unmanaged"),
        "legacy-team: {out}"
    );

    // Run 3: ops renamed to operations; u03 leaves staff (and so the app); u12 joins ops;
    // newcomer u13 joins staff.
    let mut directory = sample_directory();
    directory["users"].as_array_mut().unwrap().push(user(
        "u13",
        "person13@example.com",
        "Given13",
        "Family13",
    ));
    let groups = directory["groups"].as_array_mut().unwrap();
    let staff = groups[0]["members"].as_array_mut().unwrap();
    staff.retain(|m| m["value"] != "u03");
    staff.push(json!({"value": "u13", "type": "User"}));
    groups[1]["displayName"] = json!("operations");
    groups[1]["members"]
        .as_array_mut()
        .unwrap()
        .push(json!({"value": "u12", "type": "User"}));
    write_directory(&deployment.path("directory.json"), &directory);
    for name in ["crm", "wiki"] {
        let out = sync_ok(&deployment, name);
        assert!(
            out.contains("created 1, updated 0, deprovisioned 1"),
            "{out}"
        );
        assert!(
            out.contains("groups: desired 3 — 0 created, 2 updated, 0 deleted, 1 unchanged"),
            "{out}"
        );
        // u13 joins staff; u12 joins ops, and so staff too (ops is nested in it).
        assert!(out.contains("members 3 added, 1 removed"), "{out}");
    }
    let staff_now = as_set(
        ids(1..=10)
            .into_iter()
            .filter(|u| u != "u03")
            .chain(["u12".to_string(), "u13".to_string()])
            .collect(),
    );
    for server in [&crm, &wiki] {
        let h = held(server).await;
        assert_eq!(h.groups["staff"].1, staff_now, "no dangling u03");
        assert!(!h.groups.contains_key("ops"));
        assert_eq!(
            h.groups["operations"],
            (Some("g-ops".into()), set(&["u09", "u10", "u12"]))
        );
        assert_eq!(h.groups["visitors"].1, set(&["u12"]));
    }
    let h = held(&crm).await;
    assert!(!h.users.contains_key("u03"), "delete mode removes u03");
    assert!(h.users.contains_key("u13"));
    assert_eq!(
        h.groups["legacy-team"],
        (None, set(&["unmanaged:legacy-admin"]))
    );
    let h = held(&wiki).await;
    assert_eq!(h.users["u03"]["active"], false, "deactivate mode keeps u03");
    let u03_id = h.users["u03"]["id"].clone();

    // Run 4: visitors leaves the directory: the managed group goes (u12 stays, through
    // operations); u03 is back in staff: reactivated on wiki, not duplicated.
    let groups = directory["groups"].as_array_mut().unwrap();
    groups.retain(|g| g["id"] != "g-visitors");
    groups[0]["members"]
        .as_array_mut()
        .unwrap()
        .push(json!({"value": "u03", "type": "User"}));
    write_directory(&deployment.path("directory.json"), &directory);
    let out = sync_ok(&deployment, "crm");
    assert!(
        out.contains("created 1, updated 0, deprovisioned 0"),
        "{out}"
    );
    assert!(out.contains("0 created, 1 updated, 1 deleted"), "{out}");
    let out = sync_ok(&deployment, "wiki");
    assert!(
        out.contains("created 0, updated 1, deprovisioned 0"),
        "{out}"
    );
    assert!(out.contains("0 created, 1 updated, 1 deleted"), "{out}");
    let with_u03 = as_set(
        ids(1..=10)
            .into_iter()
            .chain(["u12".into(), "u13".into()])
            .collect(),
    );
    for (server, users) in [(&crm, 13 + 1), (&wiki, 13)] {
        let h = held(server).await;
        assert!(!h.groups.contains_key("visitors"));
        assert_eq!(h.groups["staff"].1, with_u03);
        assert_eq!(h.groups["operations"].1, set(&["u09", "u10", "u12"]));
        assert_eq!(h.users.len(), users, "u01..u13 (and legacy-admin on crm)");
    }
    let h = held(&wiki).await;
    assert_eq!(h.users["u03"]["id"], u03_id, "the same account came back");
    assert_eq!(h.users["u03"]["active"], true);
    let h = held(&crm).await;
    assert_eq!(h.groups.len(), 3, "staff, operations and legacy-team");
    assert_eq!(
        h.groups["legacy-team"],
        (None, set(&["unmanaged:legacy-admin"]))
    );

    // Run 5: the directory is emptied by mistake: the deletion guard stops the run and
    // nothing changes on the server.
    write_directory(
        &deployment.path("directory.json"),
        &json!({"users": [], "groups": []}),
    );
    let before = held(&crm).await;
    let (code, out) = deployment.sync("crm");
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(
            "deletion guard stopped the run: it would deprovision 13 users and delete 2 groups"
        ),
        "{out}"
    );
    assert!(out.contains("apps.crm.deletion_guard"), "{out}");
    assert!(out.contains("nothing was changed"), "{out}");
    let after = held(&crm).await;
    assert_eq!(before.users.len(), after.users.len());
    assert_eq!(before.groups, after.groups);
}
