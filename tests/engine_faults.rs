//! The provisioning engine against a misbehaving application: a real scim2-server behind our
//! fault-injecting layer (tests/common/faults.rs), reached through a real hub and agent.
//!
//! What must hold: throttled and transient failures are ridden out (Retry-After honoured,
//! idempotent requests retried), a POST whose outcome is unknown is looked up rather than
//! repeated, nothing is ever created twice, the number of requests in flight follows the app's
//! `concurrency`, and every failure cause ends up as its own actionable Last Sync message.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use common::deploy::{deploy, sample_directory, write_directory, App, DeploySpec, Service, Target};
use common::faults::{Fault, FaultProxy, Rule};
use common::{free_port, Scim2Server};
use serde_json::{json, Value};

/// External ids of the users a scim2-server holds, asserting none is there twice.
async fn external_ids(server: &Scim2Server) -> BTreeSet<String> {
    let users = server.users().await;
    let ids: Vec<String> = users
        .iter()
        .filter_map(|u| u["externalId"].as_str().map(str::to_string))
        .collect();
    let unique: BTreeSet<String> = ids.iter().cloned().collect();
    assert_eq!(unique.len(), ids.len(), "a user exists twice: {users:?}");
    let names: BTreeSet<String> = users
        .iter()
        .map(|u| u["userName"].as_str().unwrap().to_lowercase())
        .collect();
    assert_eq!(names.len(), users.len(), "a userName exists twice");
    unique
}

fn granted() -> BTreeSet<String> {
    (1..=11).map(|i| format!("u{i:02}")).collect()
}

#[tokio::test]
async fn throttling_and_transient_faults_are_ridden_out_without_creating_anything_twice() {
    let server = Scim2Server::start(Some(common::deploy::SCIM_TOKEN)).await;
    let proxy = FaultProxy::start(server.addr());
    let apps = vec![App::new(
        "crm",
        &format!("http://crm.internal.example:{}/v2", server.port),
        "crm-scim",
    )
    .with("request_timeout = \"2s\"")];
    let targets = vec![Target::new("crm-scim", proxy.addr.to_string())];
    let deployment = deploy(DeploySpec::new(apps, targets)).await;
    deployment.wait_for_agent("crm-scim").await;

    // The list page: throttled twice (Retry-After as an HTTP date, then in seconds), then a
    // 503, then an answer cut in the middle; the attempt after that gets through.
    let page = |fault| Rule::new(fault).method("GET").query("startIndex=").times(1);
    let in_three_seconds = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(3));
    proxy.add(page(Fault::retry_after(429, &in_three_seconds)));
    proxy.add(page(Fault::retry_after(429, "1")));
    proxy.add(page(Fault::status(503)));
    proxy.add(page(Fault::CloseMidResponse));
    // Creates: one lands but its answer is lost, one is dropped before it reaches the server,
    // one is throttled, one gets 503 with Retry-After.
    let create = |fault| Rule::new(fault).method("POST").times(1);
    proxy.add(create(Fault::DropAfterForward));
    proxy.add(create(Fault::Drop));
    proxy.add(create(Fault::retry_after(429, "1")));
    proxy.add(create(Fault::retry_after(503, "1")));
    // The first lookup after a lost answer loses its connection too.
    proxy.add(
        Rule::new(Fault::Drop)
            .method("GET")
            .query("filter=")
            .times(1),
    );

    let (code, out) = deployment.sync("crm");
    assert_eq!(code, 0, "{out}\n{}", deployment.logs());
    assert!(out.contains("created 11,"), "{out}");
    assert!(out.contains("failed 0"), "{out}");
    assert!(out.contains("were retries"), "{out}");
    assert_eq!(external_ids(&server).await, granted());
    // Each user's POST reached the server exactly once: the lost answer was looked up, the
    // dropped and throttled ones were sent again because they had not arrived.
    assert_eq!(
        proxy.forwarded("POST", "/Users"),
        11,
        "{:#?}",
        proxy.seen("POST", "/Users")
    );
    assert!(proxy
        .seen("GET", "/Users")
        .iter()
        .any(|s| s.target.contains("filter=externalId")));

    // Retry-After was honoured, in both forms.
    let pages: Vec<_> = proxy
        .seen("GET", "/Users")
        .into_iter()
        .filter(|s| s.target.contains("startIndex="))
        .collect();
    assert_eq!(pages.len(), 5, "{pages:#?}");
    let gap = |a: &common::faults::Seen, b: &common::faults::Seen| b.at - a.at;
    // The date was 3 s ahead in whole seconds when the rule was made, moments before.
    assert!(
        gap(&pages[0], &pages[1]) >= Duration::from_millis(1500),
        "{pages:#?}"
    );
    assert!(
        gap(&pages[1], &pages[2]) >= Duration::from_millis(950),
        "{pages:#?}"
    );
    let posts = proxy.seen("POST", "/Users");
    for status in ["answer 429", "answer 503"] {
        let throttled = posts
            .iter()
            .find(|s| s.fault.as_deref() == Some(status))
            .unwrap_or_else(|| panic!("a POST got {status}"));
        let again = posts
            .iter()
            .find(|s| s.at > throttled.at && s.body == throttled.body)
            .expect("the throttled POST was sent again");
        assert!(gap(throttled, again) >= Duration::from_millis(950));
    }

    // Updates and deletes: a PATCH meets a 502, a DELETE lands but its answer is lost, and
    // the list once never answers (the agent's response timeout ends it); all are retried.
    proxy.clear();
    proxy.reset_log();
    proxy.add(
        Rule::new(Fault::NeverAnswer)
            .method("GET")
            .query("startIndex=")
            .times(1),
    );
    proxy.add(
        Rule::new(Fault::status(502))
            .method("PATCH")
            .path("/Users")
            .times(1),
    );
    // Taking u02 out of staff is a `remove` of one member: safe to repeat, so retried too.
    proxy.add(
        Rule::new(Fault::status(502))
            .method("PATCH")
            .path("/Groups")
            .times(1),
    );
    proxy.add(Rule::new(Fault::DropAfterForward).method("DELETE").times(1));
    let mut directory = sample_directory();
    directory["users"][0]["name"]["familyName"] = json!("Renamed");
    let staff = directory["groups"][0]["members"].as_array_mut().unwrap();
    staff.retain(|m| m["value"] != "u02");
    write_directory(&deployment.path("directory.json"), &directory);
    let (code, out) = deployment.sync("crm");
    assert_eq!(code, 0, "{out}\n{}", deployment.logs());
    assert!(
        out.contains("created 0, updated 1, deprovisioned 1"),
        "{out}"
    );
    assert_eq!(proxy.seen("PATCH", "/Users").len(), 2);
    assert_eq!(proxy.seen("PATCH", "/Groups").len(), 2);
    assert_eq!(proxy.seen("DELETE", "/Users").len(), 2);
    let ids = external_ids(&server).await;
    assert!(!ids.contains("u02"));
    assert_eq!(ids.len(), 10);
    let u01 = server
        .users()
        .await
        .into_iter()
        .find(|u| u["externalId"] == "u01")
        .unwrap();
    assert_eq!(u01["name"]["familyName"], "Renamed");
}

#[tokio::test]
async fn requests_in_flight_follow_the_apps_concurrency() {
    let server = Scim2Server::start(Some(common::deploy::SCIM_TOKEN)).await;
    let proxy = FaultProxy::start(server.addr());
    // Slow creates make the requests overlap as much as the hub lets them.
    proxy.add(Rule::new(Fault::Delay(Duration::from_millis(300))).method("POST"));
    let apps = vec![App::new(
        "crm",
        &format!("http://crm.internal.example:{}/v2", server.port),
        "crm-scim",
    )
    .with("concurrency = 3")];
    let targets = vec![Target::new("crm-scim", proxy.addr.to_string())];
    let deployment = deploy(DeploySpec::new(apps, targets)).await;
    deployment.wait_for_agent("crm-scim").await;
    let (code, out) = deployment.sync("crm");
    assert_eq!(code, 0, "{out}\n{}", deployment.logs());
    assert!(out.contains("created 11,"), "{out}");
    assert_eq!(
        proxy.max_in_flight(),
        3,
        "11 slow creates with concurrency = 3"
    );
}

#[tokio::test]
async fn each_failure_cause_has_its_own_actionable_last_sync_message() {
    let server = Scim2Server::start(Some(common::deploy::SCIM_TOKEN)).await;
    // The application's account may read but not provision.
    let guarded = FaultProxy::start(server.addr());
    guarded.add(
        Rule::new(Fault::scim_error(
            403,
            Some("insufficientScope"),
            "token lacks the users:write scope",
        ))
        .method("POST"),
    );
    let closed_port = free_port();
    let base = format!("http://app.internal.example:{}/v2", server.port);
    let apps = vec![
        App::new("off", &base, "scim").service("spare"),
        App::new("noagent", &base, "scim").service("idle"),
        App::new("notarget", &base, "not-declared"),
        App::new("badtoken", &base, "scim").token("wrong-token"),
        App::new("forbidden", &base, "guarded"),
        App::new(
            "badpath",
            &format!("http://app.internal.example:{}/nope/v2", server.port),
            "scim",
        ),
        App::new("closed", &base, "closed"),
    ];
    let targets = vec![
        Target::new("scim", server.addr().to_string()),
        Target::new("guarded", guarded.addr.to_string()),
        Target::new("closed", format!("127.0.0.1:{closed_port}")),
    ];
    let mut spec = DeploySpec::new(apps, targets);
    spec.services.push(Service {
        enabled: false,
        ..Service::new("spare", "svc-spare-switched-off-0000")
    });
    let deployment = deploy(spec).await;
    deployment.wait_for_agent("closed").await;

    // (app, what the message names, the fix it gives)
    let expected: [(&str, &str, &str); 7] = [
        (
            "off",
            "no connector available: service `spare` is switched off",
            "enabled = true",
        ),
        (
            "noagent",
            "no connector available: no agent is connected for service `idle`",
            "start `connect run`",
        ),
        (
            "notarget",
            "none advertises target `not-declared`",
            "connect set-target not-declared",
        ),
        (
            "badtoken",
            "authentication failed (401)",
            "check the app's auth mode and secret",
        ),
        (
            "forbidden",
            "forbidden (403) on POST /v2/Users",
            "may provision users (server said insufficientScope: token lacks the users:write scope)",
        ),
        (
            "badpath",
            "endpoint not found (404) at /nope/v2/Users",
            "check the base URL path and SCIM version",
        ),
        (
            "closed",
            "network error reaching the target (connection to 127.0.0.1:",
            "check the target host:port, firewall flow and TLS settings",
        ),
    ];
    for (app, _, _) in &expected {
        let run = deployment.force_sync(app).await;
        assert_eq!(run["ok"], false, "{app}: {run}");
        assert_eq!(run["joined"], false, "{app}: {run}");
    }
    let mut messages = BTreeSet::new();
    for (app, names, fix) in &expected {
        let status = deployment.app_status(app).await;
        let message = status["last_sync"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("{app}: no Last Sync message: {status}"))
            .to_string();
        assert!(
            message.contains(names),
            "{app}: `{names}` not in `{message}`"
        );
        assert!(message.contains(fix), "{app}: `{fix}` not in `{message}`");
        for (other, other_names, _) in &expected {
            if other != app {
                assert!(
                    !message.contains(other_names),
                    "{app}'s message also names {other}'s cause: {message}"
                );
            }
        }
        messages.insert(message);
    }
    assert_eq!(messages.len(), expected.len(), "{messages:#?}");

    // The forbidden run stopped at its first create; each user, and the group that would have
    // followed them, is in the run's log.
    let last = deployment.app_status("forbidden").await["last_sync"].clone();
    assert_eq!(last["failed"], 12, "{last}");
    let ops = deployment
        .admin(
            "GET",
            &format!(
                "/api/apps/forbidden/runs/{}/operations?limit=100",
                last["run_id"]
            ),
            None,
        )
        .await
        .json()
        .unwrap();
    let ops = ops["operations"].as_array().unwrap();
    assert_eq!(ops.len(), 12, "{ops:?}");
    assert_eq!(
        ops.iter().filter(|o| o["resource"] == "user").count(),
        11,
        "{ops:?}"
    );
    let failed: Vec<&Value> = ops.iter().filter(|o| o["outcome"] == "failed").collect();
    // Creates already in flight when the first 403 came back fail too; the rest are skipped.
    assert!(!failed.is_empty(), "{ops:?}");
    assert!(failed[0]["message"]
        .as_str()
        .unwrap()
        .contains("token lacks the users:write scope"));
    assert!(ops
        .iter()
        .all(|o| o["outcome"] == "failed" || o["outcome"] == "skipped"));
    assert!(server.users().await.is_empty(), "nothing was created");

    // `connect hub status` shows every cause, and says unhealthy.
    let (code, out) = deployment.hub_status(&[]);
    assert_eq!(code, 1, "{out}");
    for (app, names, _) in &expected {
        assert!(out.contains(&format!("  {app}  via service")), "{out}");
        assert!(out.contains(names), "{app}: {out}");
    }
    assert!(out.contains("  spare  OFF  no agent connected"), "{out}");

    // None of the secrets reached a log.
    let logs = deployment.logs();
    for secret in [
        common::deploy::SCIM_TOKEN,
        common::deploy::ADMIN_TOKEN,
        common::deploy::SERVICE_ID,
        "svc-spare-switched-off-0000",
        "wrong-token",
    ] {
        assert!(!logs.contains(secret), "`{secret}` in the logs");
        assert!(!out.contains(secret), "`{secret}` in hub status");
    }
}

#[tokio::test]
async fn the_fault_layer_does_what_its_rules_say() {
    use common::http_request;
    let server = Scim2Server::start(None).await;
    let proxy = FaultProxy::start(server.addr());
    let addr = proxy.addr;
    let get = |path: &'static str| async move {
        http_request(addr, "GET", &format!("/v2{path}"), &[], None).await
    };

    // No rule: passed through unchanged.
    assert_eq!(get("/Users").await.unwrap().status, 200);
    // An answer of its own, limited to its first match and to its query.
    proxy.add(
        Rule::new(Fault::retry_after(429, "7"))
            .method("GET")
            .query("count=1")
            .times(1),
    );
    let throttled = get("/Users?count=1").await.unwrap();
    assert_eq!(throttled.status, 429);
    assert_eq!(throttled.header("retry-after"), Some("7"));
    assert_eq!(get("/Users?count=2").await.unwrap().status, 200);
    assert_eq!(get("/Users?count=1").await.unwrap().status, 200, "used up");

    // A connection dropped before, or after, the request reached the server.
    let user = serde_json::to_vec(&json!({
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": "landed"
    }))
    .unwrap();
    let post = |body: Vec<u8>| async move {
        http_request(
            addr,
            "POST",
            "/v2/Users",
            &[("Content-Type", "application/scim+json")],
            Some(&body),
        )
        .await
    };
    proxy.add(Rule::new(Fault::Drop).method("POST").times(1));
    assert!(post(user.clone()).await.is_err());
    assert!(
        server.users().await.is_empty(),
        "a dropped request never arrives"
    );
    proxy.add(Rule::new(Fault::DropAfterForward).method("POST").times(1));
    assert!(post(user.clone()).await.is_err());
    assert_eq!(
        server.users().await.len(),
        1,
        "it arrived, the answer did not"
    );
    assert_eq!(proxy.forwarded("POST", "/Users"), 1);
    assert_eq!(proxy.seen("POST", "/Users")[0].body, user);

    // Slow, cut, oversized, silent.
    proxy.add(
        Rule::new(Fault::Delay(Duration::from_millis(400)))
            .path("/ServiceProviderConfig")
            .times(1),
    );
    let started = std::time::Instant::now();
    assert_eq!(get("/ServiceProviderConfig").await.unwrap().status, 200);
    assert!(started.elapsed() >= Duration::from_millis(400));
    proxy.add(Rule::new(Fault::CloseMidResponse).path("/Schemas").times(1));
    let cut = get("/Schemas").await.unwrap_err();
    assert!(cut.contains("shorter than Content-Length"), "{cut}");
    proxy.add(
        Rule::new(Fault::Oversized { bytes: 300_000 })
            .path("/Groups")
            .times(1),
    );
    assert_eq!(get("/Groups").await.unwrap().body.len(), 300_000);
    proxy.add(
        Rule::new(Fault::NeverAnswer)
            .path("/ResourceTypes")
            .times(1),
    );
    let silent = tokio::time::timeout(Duration::from_millis(500), get("/ResourceTypes")).await;
    assert!(silent.is_err(), "no answer: {silent:?}");
    assert!(proxy.max_in_flight() >= 1);
    proxy.clear();
    assert_eq!(get("/ResourceTypes").await.unwrap().status, 200);
}
