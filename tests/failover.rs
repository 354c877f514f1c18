//! A failover pair (two agents of one service) and faults in the middle of a run, with the real
//! `connect` processes, a real scim2-server and our fault-injecting layer in front of it
//! (tests/common/faults.rs) to pace the run so that each fault lands mid-run for certain.
//!
//! What must hold: the hub spreads requests over both agents and stops routing to one that
//! leaves or goes silent at once; an agent killed with requests in flight hands them to the
//! other and nothing is created twice; a hub killed mid-run leaves that run recorded as
//! interrupted, both agents come back by themselves and the next run converges; a SCIM server
//! restarted mid-run (losing everything) is ridden out and the next run recreates what it lost.
//! Timings (failover gap, time to converge) are printed for the record.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::deploy::{deploy, user, App, DeploySpec, Deployment, Target, SERVICE_ID};
use common::faults::{Fault, FaultProxy, Rule};
use common::{wait_until, ChildGuard, Scim2Server};
use serde_json::{json, Value};

const APP: &str = "crm";
const TARGET: &str = "crm-scim";

/// `n` people u0001.. (`userNNNN@example.com`), all in the group `everyone`.
fn directory(n: usize) -> Value {
    let users: Vec<Value> = (1..=n)
        .map(|i| {
            user(
                &format!("u{i:04}"),
                &format!("user{i:04}@example.com"),
                &format!("Given{i:04}"),
                &format!("Family{i:04}"),
            )
        })
        .collect();
    let members: Vec<Value> = (1..=n)
        .map(|i| json!({ "value": format!("u{i:04}"), "type": "User" }))
        .collect();
    json!({
        "users": users,
        "groups": [{ "id": "g-everyone", "displayName": "everyone", "members": members }]
    })
}

fn desired(n: usize) -> BTreeSet<String> {
    (1..=n).map(|i| format!("u{i:04}")).collect()
}

/// The app every test provisions: everyone granted, users only, big pages, 8 in flight, and no
/// scheduled run during the test.
fn app(server: &Scim2Server) -> App {
    let mut app = App::new(
        APP,
        &format!("http://crm.internal.example:{}/v2", server.port),
        TARGET,
    )
    .with("page_size = 1000")
    .with("concurrency = 8")
    .with("provision_groups = false")
    .with("interval = \"1h\"")
    .with("request_timeout = \"10s\"");
    app.grant_groups = vec!["everyone".into()];
    app.grant_users = vec![];
    app
}

/// The admin API's entry for agent `name` of `onprem`, if it is registered.
async fn agent(d: &Deployment, name: &str) -> Option<Value> {
    d.agents("onprem")
        .await
        .into_iter()
        .find(|a| a["agent_name"] == name)
}

/// The names of the agents of `onprem` registered with the hub.
async fn names(d: &Deployment) -> BTreeSet<String> {
    d.agents("onprem")
        .await
        .iter()
        .filter_map(|a| a["agent_name"].as_str().map(str::to_string))
        .collect()
}

/// Two agents of `onprem`, named `a` and `b`, each with its own config.ini and state_dir.
struct Pair {
    d: Deployment,
    a: ChildGuard,
    b: ChildGuard,
    b_ini: PathBuf,
}

impl Pair {
    async fn start(server: &Scim2Server, targets: Vec<Target>, users: usize) -> Pair {
        let mut spec = DeploySpec::new(vec![app(server)], targets.clone());
        spec.directory = directory(users);
        spec.start_agent = false;
        let d = deploy(spec).await;
        let a = d.spawn_agent("agent-a", &Self::config(&d, "a", &targets));
        let b_ini = Self::config(&d, "b", &targets);
        let b = d.spawn_agent("agent-b", &b_ini);
        let pair = Pair { d, a, b, b_ini };
        pair.wait_for_agents(&["a", "b"]).await;
        pair
    }

    fn config(d: &Deployment, name: &str, targets: &[Target]) -> PathBuf {
        d.write_agent_config(
            &format!("{name}.ini"),
            SERVICE_ID,
            &format!("{name}-state"),
            targets,
            &[format!("agent_name = {name}")],
        )
    }

    fn logs(&self) -> String {
        format!(
            "{}\n--- agent a ---\n{}\n--- agent b ---\n{}",
            self.d.logs(),
            self.a.logs(),
            self.b.logs()
        )
    }

    async fn agent(&self, name: &str) -> Option<Value> {
        agent(&self.d, name).await
    }

    async fn names(&self) -> BTreeSet<String> {
        names(&self.d).await
    }

    /// Waits until exactly the agents `names` are registered, advertising the target.
    async fn wait_for_agents(&self, names: &[&str]) {
        let want: BTreeSet<String> = names.iter().map(|n| n.to_string()).collect();
        let ok = wait_until(
            &format!("agents {names:?} registered"),
            Duration::from_secs(30),
            || async { self.names().await == want },
        )
        .await;
        if let Err(e) = ok {
            panic!("{e}\n{}", self.logs());
        }
    }

    /// `connect status --json` of the agent whose config.ini is `ini`.
    fn status(&self, ini: &std::path::Path) -> Value {
        let (_, out, err) = self.d.status(ini, true);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("no JSON ({e}): {out}\n{err}"))
    }

    /// Requests agent `ini` forwarded to the target so far, by its own count.
    fn forwarded(&self, ini: &std::path::Path) -> u64 {
        self.status(ini)["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|t| t["name"] == TARGET)
            .and_then(|t| t["forwarded"].as_u64())
            .unwrap_or_else(|| panic!("no target {TARGET} in {}", self.status(ini)))
    }
}

#[tokio::test]
async fn a_pair_shares_the_load_and_stops_routing_to_an_agent_that_goes_silent_or_leaves() {
    const USERS: usize = 200;
    let server = Scim2Server::start(Some(common::deploy::SCIM_TOKEN)).await;
    let proxy = FaultProxy::start(server.addr());
    let targets = vec![Target::new(TARGET, proxy.addr.to_string())];
    let mut pair = Pair::start(&server, targets, USERS).await;
    let a_ini = pair.d.path("a.ini");

    let (code, out) = pair.d.sync_async(APP).await;
    assert_eq!(code, 0, "{out}\n{}", pair.logs());
    assert!(out.contains(&format!("created {USERS},")), "{out}");
    assert_eq!(server.external_ids().await, desired(USERS));

    // Both agents carried the run, by their own count and by the hub's.
    let (by_a, by_b) = (pair.forwarded(&a_ini), pair.forwarded(&pair.b_ini));
    println!("requests forwarded: agent a {by_a}, agent b {by_b}");
    let total = (by_a + by_b) as usize;
    assert!(total > USERS, "every POST and the list page: {total}");
    assert!(
        by_a.min(by_b) as usize >= total / 4,
        "the load is shared: a {by_a}, b {by_b}"
    );
    for name in ["a", "b"] {
        let agent = pair.agent(name).await.unwrap();
        assert_eq!(agent["health"], "healthy", "{agent}");
        assert_eq!(agent["in_flight"], 0, "{agent}");
        assert!(agent["answered"].as_u64().unwrap() > 0, "{agent}");
        let status = pair.status(&pair.d.path(&format!("{name}.ini")));
        assert_eq!(status["agent_name"], name);
        assert_eq!(status["session"]["connected"], true, "{status}");
    }
    let (code, text) = pair.d.hub_status(&[]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("2 agents connected"), "{text}");
    for name in ["a", "b"] {
        assert!(
            text.lines().any(|l| l
                .trim_start()
                .starts_with(&format!("{name} from 127.0.0.1:"))
                && l.contains("; healthy, 0 in flight,")),
            "agent {name} with its health in:\n{text}"
        );
    }

    // Agent b freezes (SIGSTOP): once it has missed its heartbeats, the hub shows it silent and
    // routes nothing to it, well before it would drop its session.
    pair.b.signal(libc::SIGSTOP);
    let frozen = Instant::now();
    let silent = wait_until("agent b shown silent", Duration::from_secs(15), || async {
        pair.agent("b")
            .await
            .is_some_and(|b| b["health"] == "silent")
    })
    .await;
    if let Err(e) = silent {
        pair.b.signal(libc::SIGCONT);
        panic!("{e}\n{}", pair.logs());
    }
    println!(
        "agent b frozen: shown silent after {:.1} s",
        frozen.elapsed().as_secs_f64()
    );
    let (code, text) = pair.d.hub_status(&[]);
    assert!(text.contains("SILENT (missed heartbeats"), "{code} {text}");
    // A second app's worth of work while b is frozen: every user renamed.
    let mut renamed = directory(USERS);
    for u in renamed["users"].as_array_mut().unwrap() {
        u["displayName"] = json!(format!("{} (renamed)", u["displayName"].as_str().unwrap()));
    }
    common::deploy::write_directory(&pair.d.path("directory.json"), &renamed);
    let started = Instant::now();
    let (code, out) = pair.d.sync_async(APP).await;
    let took = started.elapsed();
    pair.b.signal(libc::SIGCONT);
    println!(
        "sync of {USERS} updates with agent b frozen: {:.1} s",
        took.as_secs_f64()
    );
    assert_eq!(code, 0, "{out}\n{}", pair.logs());
    assert!(out.contains(&format!("updated {USERS},")), "{out}");
    assert!(out.contains("failed 0"), "{out}");
    // Nothing was sent to the frozen agent, so nothing had to be taken back from it when the
    // hub finally dropped its session.
    let last = pair.d.app_status(APP).await["last_sync"].clone();
    assert!(last.get("agents_lost").is_none(), "{last}");
    assert_eq!(last["retries"], 0, "{last}");
    // b may have been dropped and come back meanwhile; either way it forwarded none of them.
    pair.wait_for_agents(&["a", "b"]).await;
    assert_eq!(
        pair.forwarded(&pair.b_ini),
        by_b,
        "the frozen agent got no request"
    );

    // Agent b stops (SIGTERM: it says goodbye): it leaves the routing set at once, and the
    // next run goes through a alone.
    let stopping = Instant::now();
    pair.b.stop();
    let exited = stopping.elapsed();
    pair.wait_for_agents(&["a"]).await;
    let gone = stopping.elapsed();
    println!(
        "agent b said goodbye: exited after {} ms, out of the routing set after {} ms",
        exited.as_millis(),
        gone.as_millis()
    );
    assert!(
        gone < exited + Duration::from_secs(1),
        "out of the routing set at once, not after a heartbeat timeout"
    );
    let before = pair.forwarded(&a_ini);
    let (code, out) = pair.d.sync_async(APP).await;
    assert_eq!(code, 0, "{out}\n{}", pair.logs());
    assert!(out.contains(&format!("unchanged {USERS},")), "{out}");
    assert!(pair.forwarded(&a_ini) > before);
}

/// When `after` requests with `method` to /Users have reached the proxy, holds the next eight
/// at the server's door for a moment, so that agent `name` carries some of them for certain,
/// then kills it (SIGKILL) and waits until the hub no longer lists it. Returns when it was
/// killed, how long the hub took to drop it, and how many requests it carried.
async fn kill_mid_run(
    d: &Deployment,
    proxy: &FaultProxy,
    method: &str,
    after: usize,
    name: &str,
    victim: &mut ChildGuard,
) -> (Instant, Duration, u64) {
    let seen = || proxy.seen(method, "/Users");
    wait_until(
        &format!("{after} {method}s"),
        Duration::from_secs(60),
        || std::future::ready(seen().len() >= after),
    )
    .await
    .unwrap();
    proxy.add(
        Rule::new(Fault::Delay(Duration::from_millis(1500)))
            .method(method)
            .path("/Users")
            .times(8),
    );
    let carrying = || async {
        let held = seen().iter().filter(|s| s.fault.is_some()).count();
        let in_flight = agent(d, name)
            .await
            .and_then(|a| a["in_flight"].as_u64())
            .unwrap_or(0);
        (held == 8).then_some(in_flight).filter(|n| *n > 0)
    };
    wait_until(
        &format!("agent {name} carrying held requests"),
        Duration::from_secs(10),
        || async { carrying().await.is_some() },
    )
    .await
    .unwrap();
    let in_flight = carrying().await.unwrap_or(0);
    let killed = Instant::now();
    victim.kill_now();
    wait_until(
        &format!("agent {name} gone from the hub"),
        Duration::from_secs(15),
        || async { agent(d, name).await.is_none() },
    )
    .await
    .unwrap();
    (killed, killed.elapsed(), in_flight)
}

#[tokio::test]
async fn an_agent_killed_mid_sync_hands_its_requests_to_the_other_and_nothing_is_created_twice() {
    const USERS: usize = 2000;
    let server = Scim2Server::start(Some(common::deploy::SCIM_TOKEN)).await;
    let proxy = FaultProxy::start(server.addr());
    let targets = vec![Target::new(TARGET, proxy.addr.to_string())];
    let mut pair = Pair::start(&server, targets, USERS).await;
    let a_ini = pair.d.path("a.ini");

    // The initial sync: b is killed a third of the way through the creates.
    let started = Instant::now();
    let run = pair.d.sync_async(APP);
    let kill = kill_mid_run(&pair.d, &proxy, "POST", 600, "b", &mut pair.b);
    let ((code, out), (killed, detected, in_flight)) = tokio::join!(run, kill);
    println!("{out}");
    println!(
        "{USERS} creates through a pair, b killed (SIGKILL) with {in_flight} in flight at {:.1} s: \
         out of the routing set after {} ms, run done {:.1} s after the kill, {:.1} s in all",
        (killed - started).as_secs_f64(),
        detected.as_millis(),
        killed.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(code, 0, "{out}\n{}", pair.logs());
    assert!(out.contains(&format!("created {USERS},")), "{out}");
    assert!(out.contains("failed 0"), "{out}");
    assert!(
        out.contains("failover: agent `b` was lost with"),
        "the run says it lost b: {out}"
    );
    // Exactly the desired users, none twice, although some creates landed late, after the
    // hub had already looked them up and sent them through a.
    assert_eq!(server.external_ids().await, desired(USERS));
    let last = pair.d.app_status(APP).await["last_sync"].clone();
    assert_eq!(last["agents_lost"][0]["agent"], "b", "{last}");
    assert!(
        last["agents_lost"][0]["requests"].as_u64() >= Some(1),
        "{last}"
    );
    assert_eq!(last["state"], "finished", "{last}");
    let status = pair.status(&a_ini);
    assert_eq!(status["session"]["connected"], true, "{status}");
    assert!(pair.forwarded(&a_ini) > 0);
    assert_eq!(pair.names().await, BTreeSet::from(["a".to_string()]));

    // b comes back; every user is renamed, and this time a is killed in the middle of the
    // updates. Those are idempotent: a's are re-sent at once through b.
    pair.b = pair.d.spawn_agent("agent-b-again", &pair.b_ini);
    pair.wait_for_agents(&["a", "b"]).await;
    let mut renamed = directory(USERS);
    for u in renamed["users"].as_array_mut().unwrap() {
        u["displayName"] = json!(format!("{} (renamed)", u["displayName"].as_str().unwrap()));
    }
    common::deploy::write_directory(&pair.d.path("directory.json"), &renamed);
    proxy.clear();
    proxy.reset_log();
    let started = Instant::now();
    let run = pair.d.sync_async(APP);
    let kill = kill_mid_run(&pair.d, &proxy, "PATCH", 600, "a", &mut pair.a);
    let ((code, out), (killed, detected, in_flight)) = tokio::join!(run, kill);
    println!("{out}");
    println!(
        "{USERS} updates through a pair, a killed with {in_flight} in flight at {:.1} s: out of \
         the routing set after {} ms, run done {:.1} s after the kill, {:.1} s in all",
        (killed - started).as_secs_f64(),
        detected.as_millis(),
        killed.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(code, 0, "{out}\n{}", pair.logs());
    assert!(out.contains(&format!("updated {USERS},")), "{out}");
    assert!(out.contains("failed 0"), "{out}");
    let last = pair.d.app_status(APP).await["last_sync"].clone();
    assert_eq!(last["agents_lost"][0]["agent"], "a", "{last}");
    let lost = last["agents_lost"][0]["requests"].as_u64().unwrap_or(0);
    assert!(lost >= 1, "{last}");
    assert_eq!(
        last["rerouted"].as_u64(),
        Some(lost),
        "every update a carried was re-sent through b: {last}"
    );
    let users = server.all_users().await;
    assert_eq!(users.len(), USERS);
    assert!(
        users
            .iter()
            .all(|u| u["displayName"].as_str().unwrap().ends_with("(renamed)")),
        "every user renamed"
    );
    assert_eq!(server.external_ids().await, desired(USERS));

    // Nothing left to do.
    let (code, out) = pair.d.sync_async(APP).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("unchanged {USERS},")), "{out}");
}

#[tokio::test]
async fn a_hub_killed_mid_sync_records_the_run_as_interrupted_and_the_next_run_converges() {
    const USERS: usize = 400;
    let server = Scim2Server::start(Some(common::deploy::SCIM_TOKEN)).await;
    let proxy = FaultProxy::start(server.addr());
    let targets = vec![Target::new(TARGET, proxy.addr.to_string())];
    let mut pair = Pair::start(&server, targets, USERS).await;

    let run = pair.d.sync_async(APP);
    let crash = async {
        wait_until("100 creates", Duration::from_secs(60), || async {
            proxy.seen("POST", "/Users").len() >= 100
        })
        .await
        .unwrap();
        // Creates now wait at the server's door, so the hub dies with some in flight.
        proxy.add(
            Rule::new(Fault::Delay(Duration::from_secs(2)))
                .method("POST")
                .path("/Users"),
        );
        wait_until("held creates", Duration::from_secs(10), || async {
            proxy
                .seen("POST", "/Users")
                .iter()
                .any(|s| s.fault.is_some())
        })
        .await
        .unwrap();
    };
    let (_, ()) = tokio::join!(
        async {
            // `connect sync` fails when the hub dies under it; what counts is what the next hub
            // says about the run.
            let (code, out) = run.await;
            println!("connect sync while the hub was killed: exit {code}\n{out}");
        },
        async {
            crash.await;
            pair.d.kill_hub();
        }
    );
    proxy.clear();
    let created_before = server.external_ids().await.len();
    println!("users on the server when the hub died: {created_before}");

    let restarted = Instant::now();
    pair.d.start_hub();
    pair.wait_for_agents(&["a", "b"]).await;
    println!(
        "hub restarted: both agents registered again after {:.1} s",
        restarted.elapsed().as_secs_f64()
    );

    // The run that never finished shows as interrupted, not as running and not missing.
    let last = pair.d.app_status(APP).await["last_sync"].clone();
    assert_eq!(last["state"], "interrupted", "{last}\n{}", pair.logs());
    assert_eq!(last["ok"], false, "{last}");
    assert!(
        last["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("interrupted: the hub stopped during this run")),
        "{last}"
    );
    let runs = pair
        .d
        .admin("GET", &format!("/api/apps/{APP}/runs"), None)
        .await
        .json()
        .unwrap();
    let runs = runs["runs"].as_array().cloned().unwrap_or_default();
    assert!(
        runs.iter().any(|r| r["run_id"] == last["run_id"]),
        "the interrupted run is in the history: {runs:?}"
    );
    assert!(
        runs.iter().all(|r| r["state"] != "running"),
        "nothing left running: {runs:?}"
    );
    let (_, text) = pair.d.hub_status(&[]);
    assert!(text.contains("last sync: INTERRUPTED"), "{text}");

    let started = Instant::now();
    let (code, out) = pair.d.sync_async(APP).await;
    println!(
        "{out}\nrun after the restart converged in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(code, 0, "{out}\n{}", pair.logs());
    assert!(out.contains("failed 0"), "{out}");
    assert_eq!(server.external_ids().await, desired(USERS));
    // The exact desired state: a further run finds nothing to change.
    let (code, out) = pair.d.sync_async(APP).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!(
            "created 0, updated 0, deprovisioned 0 (deactivated 0, deleted 0), unchanged {USERS},"
        )),
        "{out}"
    );
}

#[tokio::test]
async fn a_scim_server_restarted_mid_sync_is_ridden_out_and_the_next_run_recreates_what_it_lost() {
    const USERS: usize = 300;
    let mut server = Scim2Server::start(Some(common::deploy::SCIM_TOKEN)).await;
    let proxy = FaultProxy::start(server.addr());
    let targets = vec![Target::new(TARGET, proxy.addr.to_string())];
    let mut spec = DeploySpec::new(vec![app(&server)], targets);
    spec.directory = directory(USERS);
    let d = deploy(spec).await;
    d.wait_for_agent(TARGET).await;

    let started = Instant::now();
    let (run, restart) = tokio::join!(d.sync_async(APP), async {
        wait_until("100 users created", Duration::from_secs(60), || async {
            proxy.forwarded("POST", "/Users") >= 100
        })
        .await
        .unwrap();
        let at = started.elapsed();
        // In memory only: everything created so far is gone with it.
        server.restart().await;
        (at, started.elapsed() - at)
    });
    let (code, out) = run;
    let (at, down) = restart;
    println!(
        "{out}\nSCIM server restarted {:.1} s into the run, down for {:.1} s; run took {:.1} s",
        at.as_secs_f64(),
        down.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    // The requests that met the restart were retried, and the run went on after it.
    let first = d.app_status(APP).await["last_sync"].clone();
    assert!(first["retries"].as_u64() > Some(0), "{first}\n{}", d.logs());
    let after_first = server.external_ids().await;
    assert!(
        !after_first.is_empty() && after_first.len() < USERS,
        "the server lost the first users: {} left (exit {code})",
        after_first.len()
    );

    // The hub still counts the lost users as managed, by ids the new server never heard of:
    // the next run recreates them, neither failing on them nor creating anything twice.
    let (code, out) = d.sync_async(APP).await;
    assert_eq!(code, 0, "{out}\n{}", d.logs());
    assert!(out.contains("failed 0"), "{out}");
    let missing = USERS - after_first.len();
    assert!(out.contains(&format!("created {missing},")), "{out}");
    assert_eq!(server.external_ids().await, desired(USERS));
    let (code, out) = d.sync_async(APP).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("unchanged {USERS},")), "{out}");
}
