//! End to end, as an administrator deploys it: `connect hub` and `connect run` started as
//! separate processes of the built binary, a real scim2-server (PyPI) as the application, and
//! `connect sync` forcing runs. What ends up in the application is read back through
//! scim2-server's own API. The provisioning scenario itself lives in `common::scenarios` and runs
//! against scimmy too (tests/e2e_interop.rs).

mod common;

use std::process::Command;
use std::time::Duration;

use common::deploy::{
    deploy, sample_directory, write_directory, App, DeploySpec, Target, ADMIN_TOKEN, SCIM_TOKEN,
    SERVICE_ID,
};
use common::scenarios::{self, users_of};
use common::{connect_bin, free_port, http_request, wait_until, ChildGuard, Scim2Server};
use serde_json::{json, Value};

const IMPOSTOR_ID: &str = "svc-impostor-fedcba9876543210";

#[tokio::test]
async fn provisions_updates_and_deprovisions_through_the_tunnel() {
    scenarios::provisions_updates_and_deprovisions::<Scim2Server>().await;
}

#[tokio::test]
async fn sync_failures_name_the_actionable_cause() {
    let server = Scim2Server::start(Some(SCIM_TOKEN)).await;
    let closed_port = free_port();
    let base = format!("http://app.internal.example:{}/v2", server.port);
    let bad_path = format!("http://app.internal.example:{}/nope/v2", server.port);
    let apps = vec![
        App::new("ok", &base, "scim"),
        App::new("badtoken", &base, "scim").token("wrong-token"),
        App::new("badpath", &bad_path, "scim"),
        App::new("closed", &base, "closed"),
        App::new("undeclared", &base, "not-declared"),
        App::new("noagent", &base, "scim").service("idle"),
    ];
    let targets = vec![
        Target::new("scim", format!("127.0.0.1:{}", server.port)),
        Target::new("closed", format!("127.0.0.1:{closed_port}")),
    ];
    let deployment = deploy(DeploySpec::new(apps, targets)).await;
    deployment.wait_for_agent("scim").await;

    let (code, out) = deployment.sync("ok");
    assert_eq!(code, 0, "{out}\n{}", deployment.logs());

    // The admin API's SCIM pass-through returns the server's own answer, unchanged.
    let addr = format!("127.0.0.1:{}", deployment.admin_port)
        .parse()
        .unwrap();
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let through = http_request(
        addr,
        "GET",
        "/api/apps/ok/scim/Users?count=2&startIndex=1",
        &[("Authorization", &auth)],
        None,
    )
    .await
    .unwrap();
    assert_eq!(through.status, 200, "{}", through.text());
    let direct = server
        .request("GET", "/Users?count=2&startIndex=1", None)
        .await;
    // The hub sends the base URL's host as `Host` (the TCP address comes from the target), so
    // the server builds its `meta.location` from that name; the rest is byte for byte the same.
    let direct = direct.text().replace(
        &format!("127.0.0.1:{}", server.port),
        &format!("app.internal.example:{}", server.port),
    );
    assert_eq!(
        through.json().unwrap(),
        serde_json::from_str::<serde_json::Value>(&direct).unwrap()
    );
    let missing = http_request(
        addr,
        "GET",
        "/api/apps/ok/scim/Users/no-such-id",
        &[("Authorization", &auth)],
        None,
    )
    .await
    .unwrap();
    assert_eq!(missing.status, 404, "the server's 404 is passed through");
    let unauthenticated = http_request(addr, "GET", "/api/apps/ok/scim/Users", &[], None)
        .await
        .unwrap();
    assert_eq!(unauthenticated.status, 401);

    // Run history: the ok run is recorded.
    let runs = http_request(
        addr,
        "GET",
        "/api/apps/ok/runs?limit=5",
        &[("Authorization", &auth)],
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        runs.json().unwrap()["runs"][0]["created"],
        11,
        "{}",
        runs.text()
    );

    // A service switched off is named as such.
    let off = http_request(
        addr,
        "PUT",
        "/api/services/onprem/enabled",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        Some(br#"{"enabled":false}"#),
    )
    .await
    .unwrap();
    assert_eq!(off.status, 200, "{}", off.text());
    let (code, out) = deployment.sync("ok");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("service `onprem` is switched off"), "{out}");
    http_request(
        addr,
        "PUT",
        "/api/services/onprem/enabled",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        Some(br#"{"enabled":true}"#),
    )
    .await
    .unwrap();
    let (code, out) = deployment.sync("ok");
    assert_eq!(code, 0, "{out}");

    let cases = [
        ("badtoken", "authentication failed"),
        ("badpath", "endpoint not found"),
        ("closed", "network error"),
        ("undeclared", "no connector available"),
        ("noagent", "no connector available"),
    ];
    for (app, expected) in cases {
        let (code, out) = deployment.sync(app);
        assert_eq!(code, 1, "{app}: {out}");
        assert!(
            out.to_lowercase().contains(expected),
            "{app}: expected `{expected}` in:\n{out}"
        );
    }
    let (_, out) = deployment.sync("undeclared");
    assert!(
        out.contains("none advertises target `not-declared`"),
        "{out}"
    );
    let (_, out) = deployment.sync("noagent");
    assert!(
        out.contains("no agent is connected for service `idle`"),
        "{out}"
    );

    // An agent holding a service id the hub does not know gets no session.
    let impostor_ini = deployment.path("impostor.ini");
    let ini = std::fs::read_to_string(deployment.path("config.ini"))
        .unwrap()
        .replace(SERVICE_ID, IMPOSTOR_ID)
        .replace("agent-state", "impostor-state");
    std::fs::write(&impostor_ini, ini).unwrap();
    let mut cmd = Command::new(connect_bin());
    cmd.args(["run", "--config"]).arg(&impostor_ini);
    let impostor = ChildGuard::spawn("impostor", cmd).unwrap();
    wait_until("impostor refused", Duration::from_secs(20), || {
        let refused = impostor.logs().contains("does not accept this service");
        async move { refused }
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}
{}",
            impostor.logs()
        )
    });
    assert!(
        deployment.hub.logs().contains("unknown service"),
        "{}",
        deployment.logs()
    );
    let addr = format!("127.0.0.1:{}", deployment.admin_port)
        .parse()
        .unwrap();
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let services = http_request(
        addr,
        "GET",
        "/api/services",
        &[("Authorization", &auth)],
        None,
    )
    .await
    .unwrap();
    let services: Value = serde_json::from_slice(&services.body).unwrap();
    let agents: usize = services
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["agents"].as_array().unwrap().len())
        .sum();
    assert_eq!(agents, 1, "only the real agent is registered: {services}");
    let impostor_logs = impostor.logs();
    drop(impostor);

    // An unknown application is a clear error, not a hang.
    let (code, out) = deployment.sync("missing");
    assert_ne!(code, 0);
    assert!(out.contains("no application `missing`"), "{out}");

    // No secret reaches the logs.
    let logs = format!("{}\n{impostor_logs}", deployment.logs());
    for secret in [
        SERVICE_ID,
        IMPOSTOR_ID,
        SCIM_TOKEN,
        ADMIN_TOKEN,
        "wrong-token",
    ] {
        assert!(!logs.contains(secret), "secret `{secret}` in logs:\n{logs}");
    }
}

#[tokio::test]
async fn scheduled_runs_follow_the_interval_and_the_agent_outlives_a_hub_restart() {
    let crm = Scim2Server::start(Some(SCIM_TOKEN)).await;
    let apps = vec![App::new(
        "crm",
        &format!("http://crm.internal.example:{}/v2", crm.port),
        "crm-scim",
    )
    .with("interval = \"2s\"")];
    let targets = vec![Target::new("crm-scim", format!("127.0.0.1:{}", crm.port))];
    let mut deployment = deploy(DeploySpec::new(apps, targets)).await;
    deployment.wait_for_agent("crm-scim").await;
    let (code, out) = deployment.sync("crm");
    assert_eq!(code, 0, "{out}\n{}", deployment.logs());
    assert!(out.contains("created 11"), "{out}");

    // Nobody forces the next run: the schedule picks the change up within the interval.
    let mut directory = sample_directory();
    directory["users"][0]["name"]["familyName"] = json!("Scheduled");
    write_directory(&deployment.path("directory.json"), &directory);
    let renamed = wait_until(
        "the scheduled run to rename u01",
        Duration::from_secs(20),
        || async {
            let users = users_of(&crm).await;
            users["u01"]["name"]["familyName"] == "Scheduled"
        },
    )
    .await;
    if let Err(e) = renamed {
        panic!("{e}\n{}", deployment.logs());
    }

    // The hub goes away and comes back on the same address: the agent finds it by itself.
    let old_hub_logs = deployment.restart_hub();
    let back = std::time::Instant::now();
    deployment.wait_for_agent("crm-scim").await;
    let reconnect = back.elapsed();
    eprintln!("agent re-registered {reconnect:?} after the hub was started again");
    assert!(
        reconnect < Duration::from_secs(10),
        "reconnect took {reconnect:?}\n{old_hub_logs}\n{}",
        deployment.logs()
    );
    assert!(
        deployment.agent().is_running(),
        "the agent survives a hub restart"
    );

    // The hub's state survived too: nothing to do, and nothing duplicated.
    let (code, out) = deployment.sync("crm");
    assert_eq!(code, 0, "{out}\n{}", deployment.logs());
    assert!(
        out.contains("created 0, updated 0, deprovisioned 0"),
        "{out}"
    );
    assert_eq!(users_of(&crm).await.len(), 11);
}
