//! `connect status`, as an administrator runs it on the agent's VM: the real binary asks the
//! running agent's control socket in state_dir and prints a table or JSON; the exit code says
//! connected (0), running but not connected (1) or no agent answering (2). The output never
//! holds a secret.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::deploy::{deploy, App, DeploySpec, Target, SCIM_TOKEN, SERVICE_ID};
use common::{wait_until, Scim2Server};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_tunnel_and_each_target_without_secrets() {
    let crm = Scim2Server::start(Some(SCIM_TOKEN)).await;
    let apps = vec![App::new(
        "crm",
        &format!("http://crm.internal.example:{}/v2", crm.port),
        "crm-scim",
    )];
    let closed = common::free_port();
    let targets = vec![
        Target::new("crm-scim", format!("127.0.0.1:{}", crm.port)),
        Target::new("vault", format!("127.0.0.1:{closed}")).with("always_tls = true"),
    ];
    // The service id comes from the agent's environment, which the administrator's shell
    // running `connect status` does not have.
    let mut spec = DeploySpec::new(apps, targets);
    spec.start_agent = false;
    let mut deployment = deploy(spec).await;
    let ini = deployment.write_agent_config(
        "config.ini",
        "env:CONNECT_TEST_SERVICE_ID",
        "agent-state",
        &[
            Target::new("crm-scim", format!("127.0.0.1:{}", crm.port)),
            Target::new("vault", format!("127.0.0.1:{closed}")).with("always_tls = true"),
        ],
        &[],
    );
    let agent =
        deployment.spawn_agent_with_env("agent", &ini, &[("CONNECT_TEST_SERVICE_ID", SERVICE_ID)]);
    deployment.agent = Some(agent);
    deployment.wait_for_agent("crm-scim").await;
    let (code, out) = deployment.sync("crm");
    assert_eq!(code, 0, "{out}\n{}", deployment.logs());

    // A ping has been answered once the heartbeat ran.
    let mut report = Value::Null;
    let answered = wait_until("a heartbeat round trip", Duration::from_secs(10), || {
        report = deployment.status_json().unwrap_or(Value::Null);
        let done = report["session"]["last_rtt_micros"].is_u64();
        async move { done }
    })
    .await;
    answered.unwrap_or_else(|e| panic!("{e}: {report}\n{}", deployment.logs()));

    let s = &report["session"];
    assert_eq!(s["phase"], "connected", "{report}");
    assert_eq!(s["connected"], true);
    assert_eq!(s["hub"], deployment.hub_url());
    assert!(s["connected_since_unix"].as_u64().unwrap() > 1_600_000_000);
    assert!(s["last_handshake"]["error"].is_null(), "{report}");
    assert!(s["last_handshake"]["duration_ms"].is_u64(), "{report}");
    assert_eq!(s["connects"], 1);
    let targets = report["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 2, "{report}");
    let crm_target = &targets[0];
    assert_eq!(crm_target["name"], "crm-scim");
    assert_eq!(crm_target["addr"], format!("127.0.0.1:{}", crm.port));
    assert_eq!(crm_target["tls"], "from-scheme");
    assert_eq!(crm_target["in_flight"], 0);
    assert!(crm_target["forwarded"].as_u64().unwrap() >= 12, "{report}");
    assert_eq!(crm_target["errors"], 0);
    assert_eq!(targets[1]["name"], "vault");
    assert_eq!(targets[1]["tls"], "always");
    for actor in [
        "session",
        "control",
        "dialer:crm-scim",
        "forward:crm-scim",
        "forward:vault",
    ] {
        assert_eq!(report["restarts"][actor], 0, "{actor}: {report}");
    }
    assert!(report["config"].as_str().unwrap().ends_with("config.ini"));

    // The table says the same things, readably.
    let (code, table, err) = deployment.status(&ini, false);
    assert_eq!(code, 0, "{table}\n{err}");
    for expected in [
        "session     connected, since ",
        &format!("hub         {}", deployment.hub_url()),
        "heartbeat   round trip ",
        "handshake   ok in ",
        "restarts    none",
        "TARGET    ADDRESS",
        "crm-scim",
        "vault",
        "always",
    ] {
        assert!(table.contains(expected), "`{expected}` missing:\n{table}");
    }
    eprintln!("connect status:\n{table}");

    // Only the agent's user may ask.
    let socket = deployment.path("agent-state/control.sock");
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "control socket mode {mode:o}");

    for text in [&table, &report.to_string()] {
        assert!(!text.contains(SERVICE_ID), "service id in status:\n{text}");
        assert!(!text.contains(SCIM_TOKEN), "SCIM token in status:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_code_says_connected_not_connected_or_no_agent() {
    let crm = Scim2Server::start(Some(SCIM_TOKEN)).await;
    let apps = vec![App::new(
        "crm",
        &format!("http://crm.internal.example:{}/v2", crm.port),
        "crm-scim",
    )];
    let targets = vec![Target::new("crm-scim", format!("127.0.0.1:{}", crm.port))];
    let mut deployment = deploy(DeploySpec::new(apps, targets)).await;
    deployment.wait_for_agent("crm-scim").await;
    let ini = deployment.path("config.ini");
    // Connected: exit 0 (the agent hears of its registration a moment after the hub made it).
    deployment.wait_for_agent_connected().await;

    // The hub goes away: the agent runs on, not connected.
    deployment.hub.stop();
    let mut last = (0, String::new(), String::new());
    let noticed = wait_until(
        "status to say not connected",
        Duration::from_secs(15),
        || {
            last = deployment.status(&ini, false);
            let done = last.0 == 1;
            async move { done }
        },
    )
    .await;
    noticed.unwrap_or_else(|e| panic!("{e}: {last:?}\n{}", deployment.logs()));
    assert!(
        last.1.contains("session     retrying") || last.1.contains("session     connecting"),
        "{}",
        last.1
    );
    assert!(last.1.contains("last error  "), "{}", last.1);
    let report = deployment.status_json().expect("agent answers");
    assert_eq!(report["session"]["connected"], false, "{report}");

    // No agent at all: exit 2 and a message naming the socket it tried.
    deployment.agent().stop();
    let (code, out, err) = deployment.status(&ini, false);
    assert_eq!(code, 2, "{out}\n{err}");
    let socket = deployment.path("agent-state/control.sock");
    assert!(
        err.contains("no agent answers on") && err.contains(&socket.display().to_string()),
        "{err}"
    );
    assert!(!socket.exists(), "a stopped agent removes its socket");

    // A second agent on the same state_dir is refused while the first runs.
    let first = deployment.spawn_agent("first", &ini);
    wait_until("the first agent's socket", Duration::from_secs(10), || {
        let up = socket.exists();
        async move { up }
    })
    .await
    .unwrap();
    let mut second = deployment.spawn_agent("second", &ini);
    let status = second.wait_exit(Duration::from_secs(10)).await.unwrap();
    assert_eq!(status.code(), Some(2), "{}", second.logs());
    assert!(
        second
            .logs()
            .contains("another agent already runs with this state_dir"),
        "{}",
        second.logs()
    );
    drop(first);
}
