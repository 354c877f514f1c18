//! Provisioning scenarios written once and run against every SCIM server of [`super::peers`]:
//! a deployment of hub and agent processes ([`super::deploy`]), `connect sync` forcing runs, and
//! what ended up in the application read back through the server's own API.
//!
//! A scenario states the outcome an administrator expects, never a server's habit: where the
//! servers differ (PATCH status, `Location`, filters, keep-alive), the engine must cope.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::deploy::{
    deploy, sample_directory, user, write_directory, App, DeploySpec, Target, SCIM_TOKEN,
};
use super::ScimPeer;

/// All users of `server`, by externalId (unmanaged users without one under
/// `unmanaged:<userName>`).
pub async fn users_of<S: ScimPeer>(server: &S) -> BTreeMap<String, Value> {
    let list = server.get_json("/Users?count=1000&startIndex=1").await;
    let total = list["totalResults"].as_u64().unwrap_or(u64::MAX);
    assert!(total <= 1000, "test expects a single page: {list}");
    let users: Vec<Value> = list["Resources"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        users.len() as u64,
        total,
        "{}: one full page: {list}",
        S::KIND
    );
    users
        .into_iter()
        .map(|u| {
            let key = u["externalId"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("unmanaged:{}", u["userName"].as_str().unwrap()));
            (key, u)
        })
        .collect()
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
