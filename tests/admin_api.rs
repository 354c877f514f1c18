//! The hub's admin API and the commands built on it (`connect sync`, `connect hub status`), as
//! an administrator uses them against a running deployment: services and their agents, the
//! on/off switch, apps with Last Sync, forced syncs (one run at a time), the run history with
//! its operations (kept across hub restarts), and the SCIM pass-through.

mod common;

use std::time::{Duration, Instant};

use common::deploy::{deploy, App, DeploySpec, Target, ADMIN_TOKEN, SCIM_TOKEN};
use common::faults::{Fault, FaultProxy, Rule};
use common::{http_request, wait_until, Scim2Server};
use serde_json::{json, Value};

/// Every operation of a run, walking the pages `limit` at a time.
async fn all_operations(
    deployment: &common::deploy::Deployment,
    app: &str,
    run: i64,
    limit: usize,
) -> (Vec<Value>, usize) {
    let mut ops = Vec::new();
    let mut pages = 0;
    let mut after: Option<u64> = None;
    loop {
        let path = match after {
            None => format!("/api/apps/{app}/runs/{run}/operations?limit={limit}"),
            Some(a) => format!("/api/apps/{app}/runs/{run}/operations?limit={limit}&after={a}"),
        };
        let resp = deployment.admin("GET", &path, None).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        let page = resp.json().unwrap();
        pages += 1;
        ops.extend(page["operations"].as_array().unwrap().iter().cloned());
        match page["next_after"].as_u64() {
            Some(a) => after = Some(a),
            None => return (ops, pages),
        }
        assert!(pages < 100, "paging does not end");
    }
}

#[tokio::test]
async fn a_forced_sync_joins_the_running_run_and_the_history_survives_a_restart() {
    let server = Scim2Server::start(Some(SCIM_TOKEN)).await;
    let proxy = FaultProxy::start(server.addr());
    let apps = vec![App::new(
        "crm",
        &format!("http://crm.internal.example:{}/v2", server.port),
        "crm-scim",
    )];
    let targets = vec![Target::new("crm-scim", proxy.addr.to_string())];
    let mut deployment = deploy(DeploySpec::new(apps, targets)).await;
    deployment.wait_for_agent("crm-scim").await;

    // The first list page takes 3 s: long enough to look at the hub while the run is going.
    proxy.add(
        Rule::new(Fault::Delay(Duration::from_secs(3)))
            .method("GET")
            .query("startIndex=")
            .times(1),
    );
    let admin = deployment.admin_addr();
    let first = tokio::spawn(async move {
        let auth = format!("Bearer {ADMIN_TOKEN}");
        http_request(
            admin,
            "POST",
            "/api/apps/crm/sync",
            &[("Authorization", &auth)],
            None,
        )
        .await
    });
    wait_until("the run to be going", Duration::from_secs(10), || async {
        deployment.app_status("crm").await["running_since_unix_ms"].is_u64()
    })
    .await
    .unwrap();
    // The reconciler answers while its run goes on.
    let asked = Instant::now();
    let status = deployment.app_status("crm").await;
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "GET /api/apps took {:?}",
        asked.elapsed()
    );
    assert!(status["last_sync"].is_null(), "{status}");
    let (code, out) = deployment.hub_status(&[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("    running for "), "{out}");

    // A second forced sync, the way an administrator types it, joins the running run.
    let (code, joined) = deployment.sync("crm");
    assert_eq!(code, 0, "{joined}\n{}", deployment.logs());
    assert!(
        joined.starts_with("a run of `crm` was already going; its result:\n"),
        "{joined}"
    );
    let first = first.await.unwrap().unwrap();
    assert_eq!(first.status, 200, "{}", first.text());
    let first = first.json().unwrap();
    assert_eq!(first["joined"], false, "{first}");
    assert_eq!(first["created"], 11, "{first}");
    let run_id = first["run_id"].as_i64().unwrap();
    assert!(
        joined.contains(&format!("(run {run_id})")),
        "same run: {joined}"
    );
    assert_eq!(proxy.seen("POST", "/Users").len(), 11, "one run, not two");
    let runs = deployment.admin("GET", "/api/apps/crm/runs", None).await;
    assert_eq!(runs.json().unwrap()["runs"].as_array().unwrap().len(), 1);

    // The run's operations, page by page, in plan order: one create per granted user, then
    // the granted groups (created once their members exist).
    let (ops, pages) = all_operations(&deployment, "crm", run_id, 4).await;
    assert_eq!(pages, ops.len() / 4 + 1, "pages of 4, the last one short");
    let seqs: Vec<u64> = ops.iter().map(|o| o["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=ops.len() as u64).collect::<Vec<u64>>());
    let (users, groups): (Vec<&Value>, Vec<&Value>) =
        ops.iter().partition(|o| o["resource"] == "user");
    assert_eq!(users.len(), 11);
    assert_eq!(
        &ops[..11],
        users
            .iter()
            .map(|o| (*o).clone())
            .collect::<Vec<_>>()
            .as_slice()
    );
    let external: Vec<&str> = users
        .iter()
        .map(|o| o["external_id"].as_str().unwrap())
        .collect();
    let want: Vec<String> = (1..=11).map(|i| format!("u{i:02}")).collect();
    assert_eq!(external, want);
    for op in &users {
        assert_eq!(op["action"], "create", "{op}");
        assert_eq!(op["outcome"], "done", "{op}");
        assert!(op["scim_id"].is_string(), "{op}");
        assert!(
            op["name"].as_str().unwrap().ends_with("@example.com"),
            "{op}"
        );
    }
    assert!(
        groups
            .iter()
            .any(|o| o["name"] == "staff" && o["action"] == "create"),
        "{groups:?}"
    );
    for op in &groups {
        assert_eq!(op["resource"], "group", "{op}");
        assert_eq!(op["outcome"], "done", "{op}");
    }
    let failed = deployment
        .admin(
            "GET",
            &format!("/api/apps/crm/runs/{run_id}/operations?failed=true"),
            None,
        )
        .await;
    assert_eq!(failed.json().unwrap()["operations"], json!([]));

    // A second run with nothing to do, then a restart: the history is still there.
    let second = deployment.force_sync("crm").await;
    assert_eq!(second["unchanged"], 11, "{second}");
    let before = deployment
        .admin("GET", "/api/apps/crm/runs", None)
        .await
        .json()
        .unwrap();
    deployment.restart_hub();
    wait_until(
        "the restarted hub's admin API",
        Duration::from_secs(20),
        || async {
            http_request(deployment.admin_addr(), "GET", "/api/apps", &[], None)
                .await
                .is_ok()
        },
    )
    .await
    .unwrap();
    let after = deployment
        .admin("GET", "/api/apps/crm/runs", None)
        .await
        .json()
        .unwrap();
    assert_eq!(before, after);
    assert_eq!(after["runs"].as_array().unwrap().len(), 2);
    let (kept, _) = all_operations(&deployment, "crm", run_id, 100).await;
    assert_eq!(kept, ops);
    let one = deployment
        .admin("GET", &format!("/api/apps/crm/runs/{run_id}"), None)
        .await;
    assert_eq!(one.json().unwrap()["created"], 11);
    // Last Sync comes back from the history before any new run.
    let status = deployment.app_status("crm").await;
    assert_eq!(status["last_sync"]["run_id"], second["run_id"], "{status}");

    // Paging past the end, and runs that do not exist (or are another app's), are clear.
    let missing = deployment
        .admin("GET", "/api/apps/crm/runs/99999/operations", None)
        .await;
    assert_eq!(missing.status, 404);
    assert!(
        missing.text().contains("no run 99999 of `crm`"),
        "{}",
        missing.text()
    );
    let nobody = deployment.admin("GET", "/api/apps/nope/runs/1", None).await;
    assert_eq!(nobody.status, 404);
    assert!(nobody.text().contains("no application `nope`"));
}

#[tokio::test]
async fn services_switch_status_and_the_scim_pass_through() {
    let server = Scim2Server::start(Some(SCIM_TOKEN)).await;
    let apps = vec![App::new(
        "crm",
        &format!("http://crm.internal.example:{}/v2", server.port),
        "crm-scim",
    )];
    let targets = vec![
        Target::new("crm-scim", server.addr().to_string()),
        Target::new("spare-scim", server.addr().to_string()),
    ];
    let mut deployment = deploy(DeploySpec::new(apps, targets)).await;
    deployment.wait_for_agent("crm-scim").await;

    // Every endpoint wants the admin token.
    for (method, path) in [
        ("GET", "/api/services"),
        ("GET", "/api/apps"),
        ("POST", "/api/apps/crm/sync"),
        ("GET", "/api/apps/crm/runs"),
        ("GET", "/api/apps/crm/runs/1/operations"),
        ("PUT", "/api/services/onprem/enabled"),
        ("GET", "/api/apps/crm/scim/Users"),
    ] {
        for auth in [None, Some("Bearer wrong-admin-token")] {
            let headers: Vec<(&str, &str)> =
                auth.map(|a| ("Authorization", a)).into_iter().collect();
            let resp = http_request(deployment.admin_addr(), method, path, &headers, None)
                .await
                .unwrap();
            assert_eq!(resp.status, 401, "{method} {path} with {auth:?}");
        }
    }

    // Services with their agents and the targets they advertise.
    let services = deployment
        .admin("GET", "/api/services", None)
        .await
        .json()
        .unwrap();
    let onprem = services
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "onprem")
        .unwrap();
    assert_eq!(onprem["enabled"], true);
    let agents = onprem["agents"].as_array().unwrap();
    assert_eq!(agents.len(), 1, "{services}");
    assert_eq!(agents[0]["targets"], json!(["crm-scim", "spare-scim"]));
    let idle = services
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "idle")
        .unwrap();
    assert_eq!(idle["agents"], json!([]));

    // `connect hub status`, before any run, readable and as JSON.
    let (code, out) = deployment.hub_status(&[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("  onprem  on  1 agent connected"), "{out}");
    assert!(out.contains("targets crm-scim, spare-scim"), "{out}");
    assert!(out.contains("  idle  on  no agent connected"), "{out}");
    assert!(
        out.contains("  crm  via service onprem, target crm-scim\n    last sync: none yet"),
        "{out}"
    );
    let (code, out) = deployment.hub_status(&["--json"]);
    assert_eq!(code, 0, "{out}");
    let parsed: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(parsed["apps"][0]["name"], "crm");
    assert_eq!(parsed["services"].as_array().unwrap().len(), 2);

    // Switching a service off stops its apps' syncs with that message; on again, they work.
    let off = deployment
        .admin(
            "PUT",
            "/api/services/onprem/enabled",
            Some(&json!({ "enabled": false })),
        )
        .await;
    assert_eq!(off.status, 200, "{}", off.text());
    let services = deployment
        .admin("GET", "/api/services", None)
        .await
        .json()
        .unwrap();
    assert!(services
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["name"] == "onprem" && s["enabled"] == false));
    let (code, out) = deployment.sync("crm");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("service `onprem` is switched off"), "{out}");
    let (code, out) = deployment.hub_status(&[]);
    assert_eq!(code, 1, "a failed last sync is unhealthy: {out}");
    assert!(out.contains("  onprem  OFF  1 agent connected"), "{out}");
    deployment
        .admin(
            "PUT",
            "/api/services/onprem/enabled",
            Some(&json!({ "enabled": true })),
        )
        .await;
    let (code, out) = deployment.sync("crm");
    assert_eq!(code, 0, "{out}\n{}", deployment.logs());
    let unknown = deployment
        .admin(
            "PUT",
            "/api/services/nope/enabled",
            Some(&json!({ "enabled": true })),
        )
        .await;
    assert_eq!(unknown.status, 404);

    // The pass-through: any SCIM request, its answer unchanged.
    let created = deployment
        .admin(
            "POST",
            "/api/apps/crm/scim/Users",
            Some(&json!({
                "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                "userName": "through-the-tunnel",
            })),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.text());
    let body = created.json().unwrap();
    let id = body["id"].as_str().unwrap().to_string();
    assert!(created
        .header("location")
        .unwrap()
        .ends_with(&format!("/v2/Users/{id}")));
    let direct = server.request("GET", &format!("/Users/{id}"), None).await;
    assert_eq!(created.header("etag"), direct.header("etag"));
    assert!(created.header("etag").is_some());
    let direct = direct.json().unwrap();
    assert_eq!(direct["userName"], "through-the-tunnel");
    assert_eq!(direct["meta"]["created"], body["meta"]["created"]);

    let patched = deployment
        .admin(
            "PATCH",
            &format!("/api/apps/crm/scim/Users/{id}"),
            Some(&json!({
                "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
                "Operations": [{ "op": "replace", "path": "displayName", "value": "Piped" }],
            })),
        )
        .await;
    assert_eq!(patched.status, 204, "{}", patched.text());
    assert_eq!(
        server.get_json(&format!("/Users/{id}")).await["displayName"],
        "Piped"
    );
    let conflict = deployment
        .admin(
            "POST",
            "/api/apps/crm/scim/Users",
            Some(&json!({
                "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                "userName": "THROUGH-the-tunnel",
            })),
        )
        .await;
    assert_eq!(conflict.status, 409);
    assert_eq!(conflict.json().unwrap()["scimType"], "uniqueness");
    let deleted = deployment
        .admin("DELETE", &format!("/api/apps/crm/scim/Users/{id}"), None)
        .await;
    assert_eq!(deleted.status, 204, "{}", deleted.text());
    let gone = deployment
        .admin("GET", &format!("/api/apps/crm/scim/Users/{id}"), None)
        .await;
    assert_eq!(gone.status, 404);
    let direct = server.request("GET", &format!("/Users/{id}"), None).await;
    assert_eq!(gone.json().unwrap(), direct.json().unwrap());

    // With the hub gone, `connect hub status` says so and fails.
    deployment.hub.stop();
    let (code, out) = deployment.hub_status(&[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("cannot reach the hub's admin API"), "{out}");
    assert!(!out.contains(ADMIN_TOKEN), "{out}");
}

#[test]
fn hub_status_names_a_missing_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere.toml");
    for args in [
        vec!["hub", "status", "--config", missing.to_str().unwrap()],
        // The hub's own --config is the default for status.
        vec![
            "hub",
            "--config",
            missing.to_str().unwrap(),
            "status",
            "--json",
        ],
    ] {
        let out = std::process::Command::new(common::connect_bin())
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("nowhere.toml"), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
    }
}
