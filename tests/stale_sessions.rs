//! Stale agent sessions, end to end: `connect run` dials `connect hub` through a relay
//! (`common::relay`) that makes the network die silently, so the agent gives its tunnel up and
//! dials again while the hub still holds the old connection, hearing nothing. The hub must
//! recognise the same agent (its instance id in the hello) and drop the old session at once,
//! not when its own heartbeat runs out; over a hundred such reconnections it must keep nothing:
//! no session, no task, no connection, no memory. The hub's numbers come from its admin API's
//! `GET /api/runtime` (and `connect hub status --json`), read from outside the process.

mod common;

use std::cell::{Cell, RefCell};
use std::time::{Duration, Instant};

use common::deploy::{deploy, App, DeploySpec, Deployment, Target, SERVICE_ID};
use common::relay::Relay;
use common::{free_port, wait_until, ChildGuard};
use scim_connect::messages::liveness::{DEAD_AFTER, DETECTION_BOUND};
use serde_json::Value;

/// How soon after the new session registered the old one must be gone: far less than the
/// hub's own heartbeat would take (it heard the agent up to the moment it gave up, or a few
/// seconds before a cut, and waits [`DEAD_AFTER`] of silence).
const REPLACED_WITHIN: Duration = Duration::from_secs(2);

/// A hub, and an agent that reaches it only through a relay.
async fn through_relay() -> (Deployment, Relay, ChildGuard) {
    let app = App::new("crm", "http://crm.internal.example/v2", "scim").with("interval = \"7d\"");
    let target = Target::new("scim", format!("127.0.0.1:{}", free_port()));
    let mut spec = DeploySpec::new(vec![app], vec![target.clone()]);
    spec.start_agent = false;
    let d = deploy(spec).await;
    let relay = Relay::start(([127, 0, 0, 1], d.hub_port).into());
    let config = d.write_agent_config_dialing(
        &format!("wss://localhost:{}/v1/connect", relay.addr.port()),
        "relayed.ini",
        SERVICE_ID,
        "relayed-state",
        &[target],
        &[],
    );
    let agent = d.spawn_agent("relayed-agent", &config);
    d.wait_for_agent("scim").await;
    (d, relay, agent)
}

/// The `onprem` sessions the registry lists.
async fn sessions(d: &Deployment) -> Vec<u64> {
    d.agents_with_target("onprem", "scim").await
}

/// Agent session actors alive on the hub, registered or not.
async fn live_sessions(d: &Deployment) -> u64 {
    d.runtime().await["agent_sessions"].as_u64().unwrap()
}

/// Open file descriptors of process `pid`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn logs(d: &Deployment, agent: &ChildGuard) -> String {
    format!("{}\n--- relayed agent ---\n{}", d.hub.logs(), agent.logs())
}

/// Waits for a session other than `old` to register, then for it to be the only one, the
/// hub's only live session, and for the relay to see the hub close everything else. Returns
/// the new session and how long the old one outlived its successor.
async fn replaced(d: &Deployment, relay: &Relay, agent: &ChildGuard, old: u64) -> (u64, Duration) {
    let found = Cell::new(None);
    wait_until("the agent's new session", DETECTION_BOUND, || async {
        found.set(sessions(d).await.into_iter().find(|s| *s != old));
        found.get().is_some()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(d, agent)));
    let new = found.get().unwrap();
    let registered = Instant::now();
    let alone = wait_until(
        &format!("session {new} to be the only one (session {old} dropped)"),
        REPLACED_WITHIN,
        || async {
            sessions(d).await == [new]
                && live_sessions(d).await == 1
                && relay.open_toward_hub() == 1
        },
    )
    .await;
    if let Err(e) = alone {
        panic!(
            "{e}: registered {:?}, {} live on the hub, the hub holds {} relayed connections\n{}",
            sessions(d).await,
            live_sessions(d).await,
            relay.open_toward_hub(),
            logs(d, agent)
        );
    }
    (new, registered.elapsed())
}

#[tokio::test]
async fn an_agent_that_gives_up_a_silent_tunnel_replaces_its_old_session_at_once() {
    let (d, relay, agent) = through_relay().await;
    let first = sessions(&d).await;
    assert_eq!(first.len(), 1, "{first:?}");

    // From now on the hub's frames are lost; the agent's still arrive, so the hub sees a live
    // agent until the agent's heartbeat gives up.
    // Dials so far: one, or more when the first came before the hub listened.
    let dials = relay.accepted();
    relay.deafen();
    let deafened = Instant::now();
    wait_until(
        "the agent to give up the silent tunnel and dial again",
        DETECTION_BOUND + Duration::from_secs(5),
        || async { relay.accepted() > dials },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(&d, &agent)));
    let gave_up = deafened.elapsed();

    let (second, outlived) = replaced(&d, &relay, &agent, first[0]).await;
    eprintln!(
        "agent gave up after {gave_up:?}; session {} replaced by {second}, the old one outlived it by {outlived:?} (the hub's heartbeat alone would take up to {DEAD_AFTER:?} more)",
        first[0]
    );
    assert!(
        relay.hub_closed(dials - 1),
        "the hub still holds the stale connection"
    );
    assert!(
        d.hub
            .logs()
            .contains("agent connected again; dropping its previous session at once"),
        "{}",
        d.hub.logs()
    );
}

#[tokio::test]
async fn a_hundred_reconnects_leak_no_sessions_tasks_or_memory() {
    const WARM_UP: usize = 5;
    const RECONNECTS: usize = 100;
    /// Tasks that may come and go at any moment (timers, the admin API's own connection).
    const TASK_SLACK: u64 = 8;
    const RSS_SLACK: u64 = 16 * 1024 * 1024;
    const FD_SLACK: usize = 4;

    let (d, relay, agent) = through_relay().await;
    let hub_pid = d.hub.id();
    let mut session = sessions(&d).await[0];
    // Dials so far: one, or more when the first came before the hub listened.
    let dials = relay.accepted();
    for _ in 0..WARM_UP {
        relay.cut();
        session = replaced(&d, &relay, &agent, session).await.0;
    }
    let before: Value = d.runtime().await;
    let fds_before = open_fds(hub_pid);

    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for _ in 0..RECONNECTS {
        relay.cut();
        let (new, outlived) = replaced(&d, &relay, &agent, session).await;
        session = new;
        slowest = slowest.max(outlived);
    }
    let took = started.elapsed();

    // What a replaced session left running stops within a heartbeat check (1 s); far sooner
    // than the 10 s after which the hub's heartbeat would have dropped the stale sessions.
    let tasks_before = before["tasks"].as_u64().unwrap();
    let last = RefCell::new(Value::Null);
    let settled = wait_until(
        "the hub's tasks to settle",
        Duration::from_secs(3),
        || async {
            let now = d.runtime().await;
            let calm = now["tasks"].as_u64().unwrap() <= tasks_before + TASK_SLACK;
            *last.borrow_mut() = now;
            calm
        },
    )
    .await;
    let after = last.into_inner();
    let fds_after = open_fds(hub_pid);
    let mib = |v: &Value| v["rss_bytes"].as_u64().unwrap() / (1024 * 1024);
    eprintln!(
        "{RECONNECTS} reconnects in {took:?} (old session outlived its successor by at most {slowest:?}); hub before: {} sessions, {} tasks, {} MiB, {fds_before} fds; after: {} sessions, {} tasks, {} MiB, {fds_after} fds",
        before["agent_sessions"],
        before["tasks"],
        mib(&before),
        after["agent_sessions"],
        after["tasks"],
        mib(&after)
    );
    settled.unwrap_or_else(|e| panic!("{e}: {after}\n{}", logs(&d, &agent)));
    assert_eq!(after["agent_sessions"], 1, "{after}");
    assert_eq!(sessions(&d).await, [session]);
    assert_eq!(
        relay.open_toward_hub(),
        1,
        "the hub holds stale connections"
    );
    assert_eq!(
        relay.accepted(),
        dials + WARM_UP + RECONNECTS,
        "one dial per reconnection"
    );
    assert!(
        after["rss_bytes"].as_u64().unwrap() <= before["rss_bytes"].as_u64().unwrap() + RSS_SLACK,
        "hub memory grew: {before} -> {after}"
    );
    assert!(
        fds_after <= fds_before + FD_SLACK,
        "{fds_before} -> {fds_after} fds"
    );

    // The same figures as an administrator reads them.
    let (code, out) = d.hub_status(&["--json"]);
    let status: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(status["runtime"]["agent_sessions"], 1, "exit {code}: {out}");
    assert!(status["runtime"]["tasks"].as_u64().unwrap() > 0, "{out}");
}
