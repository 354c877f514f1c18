//! The agent's supervision and stop, with a real hub and agent in this process (real TLS,
//! Noise, websocket, dialers) and a small HTTP target: a panicking forward, a Session that
//! dies, and a stop whose requests outlast the drain deadline. The panic comes from the test
//! header that only test builds honour.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::rpc::CallResult;
use tokio::sync::Notify;

use super::control;
use super::forward::TEST_PANIC_HEADER;
use super::run::{self, AgentHandle, AgentOptions};
use super::tests::{handler, ok, serve, Reply};
use crate::actors::hub::{self, HubHandle};
use crate::certs::{write_pem_files, TestCa};
use crate::config::agent::AgentConfig;
use crate::config::hub::HubConfig;
use crate::messages::agent::AgentReport;
use crate::messages::hub::{RegistryMsg, TunnelRequest};
use crate::messages::{ForwardError, HttpResponse, Scheme};
use crate::scim::transport::TransportError;

const SERVICE: &str = "svc";
const SERVICE_ID: &str = "lifecycle-test-service-id-0123";
const WAIT: Duration = Duration::from_secs(20);

/// A hub and an agent of service `svc` with one target `app`, all in this process.
struct Rig {
    dir: tempfile::TempDir,
    hub: Option<HubHandle>,
    agent: Option<AgentHandle>,
}

impl Rig {
    async fn start(target: SocketAddr, options: AgentOptions) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("lifecycle test CA").unwrap();
        let leaf = ca.issue(&["localhost"]).unwrap();
        let (cert, key) = write_pem_files(dir.path(), "hub", &leaf).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).unwrap();
        std::fs::write(
            dir.path().join("directory.json"),
            r#"{"users":[],"groups":[]}"#,
        )
        .unwrap();
        let hub_toml = dir.path().join("hub.toml");
        std::fs::write(
            &hub_toml,
            format!(
                "listen = \"127.0.0.1:0\"\ntls_cert = {:?}\ntls_key = {:?}\nstate_dir = \"hub-state\"\ndirectory = \"directory.json\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"admin-token-for-tests\"\n\n[[services]]\nname = \"{SERVICE}\"\nservice_id = \"{SERVICE_ID}\"\n",
                cert.display().to_string(),
                key.display().to_string()
            ),
        )
        .unwrap();
        let hub_config = HubConfig::load(&hub_toml).unwrap();
        let hub = hub::start(&hub_config, Default::default()).await.unwrap();
        let ini = dir.path().join("config.ini");
        std::fs::write(
            &ini,
            format!(
                "service_id = {SERVICE_ID}\nstate_dir = agent-state\nhub = wss://localhost:{}/v1/connect\nhub_ca = ca.pem\nagent_name = rig\n\n[target.app]\naddr = {target}\n",
                hub.agent_addr.port()
            ),
        )
        .unwrap();
        let agent_config = AgentConfig::load(&ini).unwrap();
        let agent = run::start_with(&agent_config, options).await.unwrap();
        let rig = Rig {
            dir,
            hub: Some(hub),
            agent: Some(agent),
        };
        rig.wait_for(|sessions| !sessions.is_empty(), "the agent to register")
            .await;
        rig
    }

    fn hub(&self) -> &HubHandle {
        self.hub.as_ref().unwrap()
    }

    fn agent(&self) -> &AgentHandle {
        self.agent.as_ref().unwrap()
    }

    /// Session ids of the agents the hub has registered.
    async fn sessions(&self) -> Vec<u64> {
        self.hub()
            .services()
            .await
            .into_iter()
            .flat_map(|s| s.agents)
            .map(|a| a.session_id)
            .collect()
    }

    async fn wait_for(&self, done: impl Fn(&[u64]) -> bool, what: &str) -> Vec<u64> {
        let deadline = Instant::now() + WAIT;
        loop {
            let sessions = self.sessions().await;
            if done(&sessions) {
                return sessions;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What `connect status` would print, through the real control socket.
    async fn report(&self) -> AgentReport {
        control::query(&control::socket_path(&self.dir.path().join("agent-state")))
            .await
            .unwrap()
    }

    async fn stop(mut self) {
        if let Some(agent) = self.agent.take() {
            agent.shutdown().await;
        }
        if let Some(hub) = self.hub.take() {
            hub.stop().await;
        }
    }
}

fn request(path: &str, panic: bool) -> TunnelRequest {
    let mut headers = vec![("accept".to_string(), b"application/scim+json".to_vec())];
    if panic {
        headers.push((TEST_PANIC_HEADER.to_string(), b"1".to_vec()));
    }
    TunnelRequest {
        target: "app".into(),
        scheme: Scheme::Http,
        host: "app.internal.example".into(),
        method: "GET".into(),
        path_and_query: path.into(),
        headers,
        body: Vec::new(),
        skip_tls_verify: false,
        timeout: Duration::from_secs(15),
    }
}

/// Sends one request through the hub's registry, as the reconciler does.
async fn route(hub: &HubHandle, request: TunnelRequest) -> Result<HttpResponse, TransportError> {
    let answer = hub
        .registry
        .call(
            |reply| RegistryMsg::Route {
                service: SERVICE.into(),
                request,
                reply,
            },
            Some(WAIT),
        )
        .await
        .unwrap();
    match answer {
        CallResult::Success(result) => result,
        other => panic!("no answer from the registry: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_forward_is_answered_while_the_tunnel_and_other_requests_carry_on() {
    let gate = Arc::new(Notify::new());
    let held = gate.clone();
    let mut server = serve(
        handler(move |seen| {
            if seen.path.contains("/slow") {
                Reply::After(held.clone(), ok(b"slow"))
            } else {
                Reply::Close(ok(b"fast"))
            }
        }),
        None,
    )
    .await;
    let rig = Arc::new(Rig::start(server.addr, AgentOptions::default()).await);
    let sessions = rig.sessions().await;

    let slow = {
        let rig = rig.clone();
        tokio::spawn(async move { route(rig.hub(), request("/v2/slow", false)).await })
    };
    assert!(server.next_seen().await.path.contains("/slow"));

    match route(rig.hub(), request("/v2/Users", true)).await {
        Err(TransportError::Forward(ForwardError::Internal { detail })) => {
            assert!(detail.contains("forced panic"), "{detail}");
        }
        other => panic!("expected an internal error, got {other:?}"),
    }
    let fast = route(rig.hub(), request("/v2/Groups", false))
        .await
        .expect("the tunnel still carries requests");
    assert_eq!(fast.body, b"fast");
    gate.notify_one();
    let slow = slow.await.unwrap().expect("the slow request completes");
    assert_eq!(slow.body, b"slow");

    assert_eq!(rig.sessions().await, sessions, "same tunnel");
    let report = rig.report().await;
    assert_eq!(report.session.connects, 1, "{report:?}");
    assert_eq!(report.restarts.get("forward:app"), Some(&1), "{report:?}");
    let target = &report.targets[0];
    assert_eq!(
        (target.forward_restarts, target.forwarded, target.errors),
        (1, 2, 1)
    );
    assert!(
        target
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("forced panic")),
        "{target:?}"
    );
    let table = control::render(&report);
    assert!(table.contains("restarts    forward:app 1"), "{table}");
    Arc::into_inner(rig).unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_session_is_restarted_and_the_dialers_keep_their_pools() {
    let server = serve(handler(|_| Reply::KeepAlive(ok(b"hi"))), None).await;
    let rig = Rig::start(server.addr, AgentOptions::default()).await;
    let first = rig.sessions().await;
    route(rig.hub(), request("/v2/Users", false)).await.unwrap();
    assert_eq!(server.accepted(), 1);

    let session = rig.agent().session().await.expect("a session runs");
    let killed = Instant::now();
    session.kill();
    let second = rig
        .wait_for(
            // The hub may list the new session a moment before it notices the old one's
            // connection closing: wait for the new one alone.
            |now| now.len() == 1 && now != first.as_slice(),
            "a new session to register and the old one to be gone",
        )
        .await;
    eprintln!(
        "session restarted and registered again {:?} after it was killed",
        killed.elapsed()
    );
    assert_eq!(second.len(), 1);
    let report = rig.report().await;
    assert_eq!(report.restarts.get("session"), Some(&1), "{report:?}");
    assert!(report.session.connected, "{report:?}");

    // The target's pooled connection survived the Session.
    let again = route(rig.hub(), request("/v2/Users", false)).await.unwrap();
    assert_eq!(again.body, b"hi");
    assert_eq!(server.accepted(), 1, "the keep-alive connection was reused");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_outlasting_the_drain_deadline_are_answered_as_shutting_down() {
    let mut server = serve(handler(|_| Reply::Hang), None).await;
    let options = AgentOptions {
        drain_deadline: Duration::from_millis(800),
    };
    let mut rig = Rig::start(server.addr, options).await;
    let hub_registry = rig.hub().registry.clone();
    let stuck = tokio::spawn(async move {
        let answer = hub_registry
            .call(
                |reply| RegistryMsg::Route {
                    service: SERVICE.into(),
                    request: request("/v2/Users", false),
                    reply,
                },
                Some(WAIT),
            )
            .await
            .unwrap();
        (answer, Instant::now())
    });
    server.next_seen().await;

    let stopping = Instant::now();
    rig.agent.take().unwrap().shutdown().await;
    let stopped = stopping.elapsed();
    let (answer, at) = stuck.await.unwrap();
    match answer {
        CallResult::Success(Err(TransportError::Forward(ForwardError::ShuttingDown))) => {}
        other => panic!("expected shutting down, got {other:?}"),
    }
    let answered = at.duration_since(stopping);
    assert!(
        answered >= Duration::from_millis(700) && answered < Duration::from_secs(3),
        "answered {answered:?} after the stop began"
    );
    assert!(stopped < Duration::from_secs(4), "stop took {stopped:?}");
    assert!(rig.sessions().await.is_empty(), "the hub let the agent go");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_session_does_not_trip_over_the_requests_of_the_dead_one() {
    let mut server = serve(
        handler(|seen| {
            if seen.path.contains("/slow") {
                Reply::Hang
            } else {
                Reply::Close(ok(b"fresh"))
            }
        }),
        None,
    )
    .await;
    let rig = Arc::new(Rig::start(server.addr, AgentOptions::default()).await);
    let first = rig.sessions().await;
    let slow = {
        let rig = rig.clone();
        tokio::spawn(async move { route(rig.hub(), request("/v2/slow", false)).await })
    };
    server.next_seen().await;
    rig.agent().session().await.unwrap().kill();
    match slow.await.unwrap() {
        Err(TransportError::AgentLost { .. }) => {}
        other => panic!("expected the agent to be reported lost, got {other:?}"),
    }
    rig.wait_for(
        |now| !now.is_empty() && now != first.as_slice(),
        "a new session to register",
    )
    .await;
    // The new tunnel's first request has the same id as the dead tunnel's hanging one.
    let fresh = route(rig.hub(), request("/v2/Users", false))
        .await
        .expect("the dead tunnel's request is no longer in the way");
    assert_eq!(fresh.body, b"fresh");
    assert_eq!(rig.report().await.targets[0].in_flight, 0);
    Arc::into_inner(rig).unwrap().stop().await;
}
