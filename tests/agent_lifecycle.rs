//! The agent's life as an administrator sees it, with `connect hub` and `connect run` as
//! separate processes: targets changed while it runs, a hub or agent that freezes or is killed,
//! and a graceful stop. The tests that measure (heartbeat detection, reconnect time) print
//! their figures; run them with `--no-capture` to read them.

mod common;

use std::io::Write as _;
use std::time::{Duration, Instant};

use common::deploy::{deploy, App, DeploySpec, Deployment, Target, ADMIN_TOKEN, SCIM_TOKEN};
use common::{connect_bin, http_request, wait_until, GatedServer, HttpResponse, Scim2Server};
use serde_json::Value;

/// Upper bound for noticing a silent peer, on either side (the product's promise).
const DETECTION_BOUND: Duration = Duration::from_secs(15);
/// Upper bound for an agent to be back once the hub listens again.
const RECONNECT_BOUND: Duration = Duration::from_secs(5);
/// Connection attempts that fail while the killed hub is away.
const FAILED_ATTEMPTS: usize = 6;

fn app_on(name: &str, target: &str, port: u16) -> App {
    App::new(
        name,
        &format!("http://{name}.internal.example:{port}/v2"),
        target,
    )
}

/// A pass-through request started in the background, so the test can act while it waits.
fn pass_through_later(
    deployment: &Deployment,
    app: &str,
    path: &str,
) -> tokio::task::JoinHandle<(Result<HttpResponse, String>, Instant)> {
    let admin = deployment.admin_addr();
    let path = format!("/api/apps/{app}/scim/{path}");
    tokio::spawn(async move {
        let auth = format!("Bearer {ADMIN_TOKEN}");
        let result = http_request(admin, "GET", &path, &[("Authorization", &auth)], None).await;
        (result, Instant::now())
    })
}

type Held = tokio::task::JoinHandle<(Result<HttpResponse, String>, Instant)>;

/// Starts `count` pass-through requests to `path` of app `slow` and waits until the target
/// holds `holding` requests in all.
async fn hold(
    deployment: &Deployment,
    target: &GatedServer,
    count: usize,
    path: &str,
    holding: usize,
) -> Vec<Held> {
    let held = (0..count)
        .map(|_| pass_through_later(deployment, "slow", path))
        .collect();
    wait_or_panic(
        deployment,
        &format!("{holding} requests held at the target"),
        Duration::from_secs(10),
        || {
            let n = target.waiting();
            async move { n == holding }
        },
    )
    .await;
    held
}

/// The answers to `held`, each of which must come within 2 s of `since`: none may hang.
async fn answers(
    held: Vec<Held>,
    since: Instant,
    after: &str,
) -> Vec<Result<HttpResponse, String>> {
    let mut all = Vec::new();
    for request in held {
        let (result, at) = tokio::time::timeout(Duration::from_secs(5), request)
            .await
            .unwrap_or_else(|_| panic!("a request in flight hangs after {after}"))
            .unwrap();
        let took = at.duration_since(since);
        assert!(
            took < Duration::from_secs(2),
            "answered {took:?} after {after}"
        );
        all.push(result);
    }
    all
}

async fn wait_or_panic<F, Fut>(deployment: &Deployment, what: &str, timeout: Duration, f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    if let Err(e) = wait_until(what, timeout, f).await {
        panic!("{e}\n{}", deployment.logs());
    }
}

fn report(deployment: &Deployment) -> Value {
    deployment
        .status_json()
        .unwrap_or_else(|| panic!("the agent does not answer\n{}", deployment.logs()))
}

fn target_tls(report: &Value, name: &str) -> Option<String> {
    report["targets"]
        .as_array()?
        .iter()
        .find(|t| t["name"] == name)
        .and_then(|t| t["tls"].as_str().map(str::to_string))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_agent_takes_target_changes_without_reconnecting() {
    let crm = Scim2Server::start(Some(SCIM_TOKEN)).await;
    let wiki = Scim2Server::start(Some(SCIM_TOKEN)).await;
    let apps = vec![
        app_on("crm", "crm-scim", crm.port),
        app_on("wiki", "wiki-scim", wiki.port),
    ];
    let targets = vec![Target::new("crm-scim", format!("127.0.0.1:{}", crm.port))];
    let mut deployment = deploy(DeploySpec::new(apps, targets)).await;
    deployment.wait_for_agent("crm-scim").await;
    let session = deployment.agents_with_target("onprem", "crm-scim").await;
    assert_eq!(session.len(), 1);
    let (code, out) = deployment.sync("wiki");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("none advertises target `wiki-scim`"), "{out}");

    // Declared with the CLI while the agent runs: advertised on the same tunnel.
    let ini = deployment.path("config.ini");
    let out = std::process::Command::new(connect_bin())
        .args(["set-target", "wiki-scim"])
        .arg(format!("127.0.0.1:{}", wiki.port))
        .arg("-config")
        .arg(&ini)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let declared = Instant::now();
    wait_or_panic(
        &deployment,
        "the hub to see `wiki-scim` on the same session",
        Duration::from_secs(10),
        || async { deployment.agents_with_target("onprem", "wiki-scim").await == session },
    )
    .await;
    eprintln!(
        "set-target advertised to the hub {:?} after the file changed",
        declared.elapsed()
    );
    // (The hub may already have run by itself: a connector for the app appeared.)
    let (code, out) = deployment.sync("wiki");
    assert_eq!(code, 0, "{out}\n{}", deployment.logs());
    assert_eq!(wiki.get_json("/Users").await["totalResults"], 11);
    let r = report(&deployment);
    assert_eq!(r["session"]["connects"], 1, "no reconnect: {r}");
    assert!(r["last_reload"]["error"].is_null(), "{r}");

    // A bad edit is refused as a whole, in one log line; the running targets stay.
    let good = std::fs::read_to_string(&ini).unwrap();
    std::fs::OpenOptions::new()
        .append(true)
        .open(&ini)
        .unwrap()
        .write_all(b"\n[target.broken]\naddr = no-port-here\n")
        .unwrap();
    wait_or_panic(
        &deployment,
        "the agent to refuse the bad edit",
        Duration::from_secs(10),
        || {
            let refused = deployment
                .agent
                .as_ref()
                .is_some_and(|a| a.logs().contains("refused, the running targets stay"));
            async move { refused }
        },
    )
    .await;
    let logs = deployment.agent().logs();
    let lines: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("refused, the running targets stay"))
        .collect();
    assert_eq!(lines.len(), 1, "{logs}");
    assert!(
        lines[0].contains("config.ini") && lines[0].contains("[target.broken] addr"),
        "{}",
        lines[0]
    );
    let r = report(&deployment);
    assert!(
        r["last_reload"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("no-port-here")),
        "{r}"
    );
    assert_eq!(r["targets"].as_array().unwrap().len(), 2, "{r}");
    assert_eq!(
        deployment.agents_with_target("onprem", "wiki-scim").await,
        session
    );

    // SIGHUP: an edit the watcher cannot see (same inode, size and mtime) is taken on SIGHUP.
    assert_eq!(good.matches("always_tls = false\n").count(), 1, "{good}");
    let hup = good.replace("always_tls = false\n", "always_tls = true \n");
    assert_eq!(hup.len(), good.len());
    // Put the good file back first (the watcher reloads it), then edit it invisibly.
    std::fs::write(&ini, &good).unwrap();
    wait_or_panic(
        &deployment,
        "the good file to be reloaded",
        Duration::from_secs(10),
        || {
            let r = deployment.status_json();
            async move { r.is_some_and(|r| r["last_reload"]["error"].is_null()) }
        },
    )
    .await;
    let mtime = std::fs::metadata(&ini).unwrap().modified().unwrap();
    {
        let mut file = std::fs::OpenOptions::new().write(true).open(&ini).unwrap();
        file.write_all(hup.as_bytes()).unwrap();
        file.set_modified(mtime).unwrap();
    }
    // Two watch periods pass without a change being seen...
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        target_tls(&report(&deployment), "wiki-scim").as_deref(),
        Some("from-scheme")
    );
    // ...and SIGHUP applies it.
    deployment.agent().signal(libc::SIGHUP);
    wait_or_panic(
        &deployment,
        "SIGHUP to apply always_tls",
        Duration::from_secs(10),
        || {
            let r = deployment.status_json();
            async move {
                r.is_some_and(|r| target_tls(&r, "wiki-scim").as_deref() == Some("always"))
            }
        },
    )
    .await;

    // A removed target is withdrawn from the hub and refused from then on.
    let without_crm = good
        .split("\n[target.")
        .filter(|section| !section.starts_with("crm-scim]"))
        .collect::<Vec<_>>()
        .join("\n[target.");
    assert!(!without_crm.contains("crm-scim"), "{without_crm}");
    std::fs::write(&ini, without_crm).unwrap();
    wait_or_panic(
        &deployment,
        "the hub to stop seeing `crm-scim`",
        Duration::from_secs(10),
        || async {
            deployment
                .agents_with_target("onprem", "crm-scim")
                .await
                .is_empty()
        },
    )
    .await;
    let (code, out) = deployment.sync("crm");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("none advertises target `crm-scim`"), "{out}");
    assert_eq!(
        deployment.agents_with_target("onprem", "wiki-scim").await,
        session,
        "still the same tunnel"
    );
    assert_eq!(report(&deployment)["session"]["connects"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_notice_a_frozen_hub_and_a_frozen_agent_within_15_s() {
    let crm = Scim2Server::start(Some(SCIM_TOKEN)).await;
    let apps = vec![app_on("crm", "crm-scim", crm.port)];
    let targets = vec![Target::new("crm-scim", format!("127.0.0.1:{}", crm.port))];
    let mut deployment = deploy(DeploySpec::new(apps, targets)).await;
    deployment.wait_for_agent("crm-scim").await;
    deployment.wait_for_agent_connected().await;
    let ini = deployment.path("config.ini");

    // The hub freezes (its sockets stay open, nothing answers).
    deployment.hub.signal(libc::SIGSTOP);
    let frozen = Instant::now();
    let noticed = wait_until(
        "the agent to notice the frozen hub",
        DETECTION_BOUND + Duration::from_secs(5),
        || {
            let (code, _, _) = deployment.status(&ini, false);
            async move { code == 1 }
        },
    )
    .await;
    let agent_took = frozen.elapsed();
    deployment.hub.signal(libc::SIGCONT);
    noticed.unwrap_or_else(|e| panic!("{e}\n{}", deployment.logs()));
    eprintln!("agent noticed the frozen hub after {agent_took:.1?}");
    assert!(agent_took <= DETECTION_BOUND, "took {agent_took:?}");
    assert!(
        deployment.agent().logs().contains("no word from the hub"),
        "{}",
        deployment.logs()
    );
    deployment.wait_for_agent("crm-scim").await;

    // The agent freezes.
    deployment.agent().signal(libc::SIGSTOP);
    let frozen = Instant::now();
    let noticed = wait_until(
        "the hub to drop the frozen agent",
        DETECTION_BOUND + Duration::from_secs(5),
        || async {
            deployment
                .agents_with_target("onprem", "crm-scim")
                .await
                .is_empty()
        },
    )
    .await;
    let hub_took = frozen.elapsed();
    deployment.agent().signal(libc::SIGCONT);
    noticed.unwrap_or_else(|e| panic!("{e}\n{}", deployment.logs()));
    eprintln!("hub noticed the frozen agent after {hub_took:.1?}");
    assert!(hub_took <= DETECTION_BOUND, "took {hub_took:?}");
    assert!(
        deployment.hub.logs().contains("agent silent for"),
        "{}",
        deployment.logs()
    );
    deployment.wait_for_agent("crm-scim").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_hub_gets_its_agent_back_within_5_s_and_no_request_hangs() {
    let target = GatedServer::start().await;
    let apps = vec![app_on("slow", "gated", target.addr.port())];
    let targets = vec![Target::new("gated", target.addr.to_string())];
    let mut deployment = deploy(DeploySpec::new(apps, targets)).await;
    deployment.wait_for_agent("gated").await;

    // Three requests are held at the target when the hub is killed.
    let held = hold(&deployment, &target, 3, "slow/Users", 3).await;
    let old_hub = deployment.kill_hub();
    let killed = Instant::now();
    for result in answers(held, killed, "the hub was killed").await {
        assert!(result.is_err(), "{result:?}");
    }
    // The agent drops the lost tunnel's requests: nobody is left to receive their answers.
    wait_or_panic(
        &deployment,
        "the agent to cancel the lost tunnel's requests",
        Duration::from_secs(5),
        || {
            let r = deployment.status_json();
            async move {
                r.is_some_and(|r| {
                    r["session"]["connected"] == false && r["targets"][0]["in_flight"] == 0
                })
            }
        },
    )
    .await;

    // The hub stays away long enough for the agent to fail several attempts, so its backoff
    // has grown; it must still be back quickly once the hub listens again.
    wait_or_panic(
        &deployment,
        "six failed connection attempts",
        Duration::from_secs(30),
        || {
            let failed = deployment
                .agent
                .as_ref()
                .map_or(0, |a| a.logs().matches("cannot connect to the hub").count());
            async move { failed >= FAILED_ATTEMPTS }
        },
    )
    .await;
    let outage = killed.elapsed();
    // Measure from the moment the new hub listens.
    deployment.start_hub();
    let hub_port = deployment.hub_port;
    wait_or_panic(
        &deployment,
        "the restarted hub to listen",
        Duration::from_secs(10),
        || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", hub_port))
                .await
                .is_ok()
        },
    )
    .await;
    let listening = Instant::now();
    deployment.wait_for_agent("gated").await;
    let reconnect = listening.elapsed();
    eprintln!(
        "agent registered again {reconnect:.1?} after the killed hub listened again (hub away {outage:.1?}, {FAILED_ATTEMPTS} failed attempts)"
    );
    assert!(
        reconnect <= RECONNECT_BOUND,
        "reconnect took {reconnect:?}\n{old_hub}\n{}",
        deployment.logs()
    );

    // The new tunnel numbers its requests from 1 again; the old ones must not be in the way.
    let fresh = deployment.pass_through("slow", "Users").await.unwrap();
    assert_eq!(fresh.status, 200, "{}\n{}", fresh.text(), deployment.logs());
    assert!(fresh.text().contains("/v2/Users"), "{}", fresh.text());

    // The other side of a drop: the agent is killed with requests in flight; the hub answers
    // each at once with an error.
    let held = hold(&deployment, &target, 2, "slow/Groups", 5).await;
    deployment.agent().kill_now();
    let killed = Instant::now();
    for result in answers(held, killed, "the agent was killed").await {
        let response = result.expect("the hub answers");
        assert_eq!(response.status, 502, "{}", response.text());
        assert!(
            response.text().contains("disconnected"),
            "{}",
            response.text()
        );
    }
    let ini = deployment.path("config.ini");
    deployment.agent = Some(deployment.spawn_agent("agent", &ini));
    deployment.wait_for_agent("gated").await;
    target.open();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_says_goodbye_first_then_lets_requests_in_flight_finish() {
    let target = GatedServer::start().await;
    let apps = vec![app_on("slow", "gated", target.addr.port())];
    let targets = vec![Target::new("gated", target.addr.to_string())];
    let mut deployment = deploy(DeploySpec::new(apps, targets)).await;
    deployment.wait_for_agent("gated").await;

    let in_flight = hold(&deployment, &target, 1, "slow/Users", 1)
        .await
        .remove(0);
    deployment.agent().signal(libc::SIGTERM);
    let stopping = Instant::now();

    // The hub stops routing to the agent at once, while its tunnel is still open.
    wait_or_panic(
        &deployment,
        "the hub to unregister the stopping agent",
        Duration::from_secs(5),
        || async {
            deployment
                .agents_with_target("onprem", "gated")
                .await
                .is_empty()
        },
    )
    .await;
    eprintln!(
        "hub unregistered the agent {:.1?} after SIGTERM",
        stopping.elapsed()
    );
    assert!(deployment.agent().is_running(), "the agent is draining");
    assert!(
        !in_flight.is_finished(),
        "the held request is still waiting"
    );
    let seen = target.seen();
    let refused = deployment.pass_through("slow", "Users").await.unwrap();
    assert_eq!(refused.status, 502, "{}", refused.text());
    assert!(
        refused.text().contains("no agent is connected"),
        "{}",
        refused.text()
    );
    assert_eq!(target.seen(), seen, "nothing new reached the target");

    // The request in flight finishes, then the agent exits cleanly.
    target.open();
    let (result, _) = tokio::time::timeout(Duration::from_secs(10), in_flight)
        .await
        .expect("the drained request is answered")
        .unwrap();
    let response = result.unwrap();
    assert_eq!(response.status, 200, "{}", response.text());
    assert!(
        response.text().contains("/v2/slow/Users"),
        "{}",
        response.text()
    );
    let status = deployment
        .agent()
        .wait_exit(Duration::from_secs(10))
        .await
        .unwrap();
    assert!(status.success(), "{status:?}\n{}", deployment.logs());
    assert!(
        deployment.hub.logs().contains("agent said goodbye"),
        "{}",
        deployment.logs()
    );
}
