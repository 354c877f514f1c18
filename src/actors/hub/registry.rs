//! Registry: which agents are connected for which service and which targets they advertise;
//! routes each tunnel request to one of them.
//!
//! Several agents of one service (a failover pair) share the load: each request goes to a
//! healthy agent that advertises the target, the one with the fewest requests in flight first
//! (ties taken in turn). An agent that said goodbye or dropped has left the registry; one that
//! missed heartbeats stays listed as silent but gets nothing until it is heard again.
//!
//! It never talks to a socket: it hands requests to AgentSession actors and answers with a
//! typed "no connector" error when none can take them, naming which of the causes holds.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use ractor::{Actor, ActorProcessingErr, ActorRef, MessagingErr};
use tracing::{debug, info, warn};

use super::health::{AgentHealth, Health, InFlight, SILENT_AFTER};
use super::services::ServiceBook;
use crate::messages::hub::{
    AgentEntry, AgentSessionMsg, AgentStatus, ReconcilerMsg, RegistryMsg, ServiceStatus,
    TunnelReply, TunnelRequest,
};
use crate::messages::TargetInfo;
use crate::scim::transport::{NoConnectorKind, TransportError};

/// The Registry actor.
pub struct Registry;

/// Registry state: connected agents per service and reconcilers waiting for a connector.
pub struct RegistryState {
    book: ServiceBook,
    agents: HashMap<String, Vec<AgentEntry>>,
    watchers: Vec<(String, String, ActorRef<ReconcilerMsg>)>,
    next_pick: usize,
}

impl Actor for Registry {
    type Msg = RegistryMsg;
    type State = RegistryState;
    type Arguments = ServiceBook;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        book: ServiceBook,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(RegistryState {
            book,
            agents: HashMap::new(),
            watchers: Vec::new(),
            next_pick: 0,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            RegistryMsg::Register { service, agent } => {
                info!(
                    service = %service,
                    agent = %agent.agent_name,
                    session = agent.session_id,
                    targets = ?target_names(&agent.targets),
                    "agent registered"
                );
                let targets = agent.targets.clone();
                state.agents.entry(service.clone()).or_default().push(agent);
                notify_watchers(state, &service, &targets);
            }
            RegistryMsg::UpdateTargets {
                service,
                session_id,
                targets,
            } => {
                if let Some(agent) = state
                    .agents
                    .get_mut(&service)
                    .and_then(|list| list.iter_mut().find(|a| a.session_id == session_id))
                {
                    info!(service = %service, session = session_id, targets = ?target_names(&targets), "agent targets changed");
                    agent.targets = targets.clone();
                }
                notify_watchers(state, &service, &targets);
            }
            RegistryMsg::Unregister {
                service,
                session_id,
            } => {
                if forget(state, &service, session_id) {
                    info!(service = %service, session = session_id, "agent unregistered");
                }
            }
            RegistryMsg::Route {
                service,
                request,
                reply,
            } => route(state, &service, request, reply),
            RegistryMsg::Snapshot(reply) => {
                let now = SystemTime::now();
                let list = state
                    .book
                    .list()
                    .into_iter()
                    .map(|(name, enabled)| ServiceStatus {
                        agents: state
                            .agents
                            .get(&name)
                            .map(|agents| agents.iter().map(|a| agent_status(a, now)).collect())
                            .unwrap_or_default(),
                        name,
                        enabled,
                    })
                    .collect();
                let _ = reply.send(list);
            }
            RegistryMsg::Watch {
                service,
                target,
                reconciler,
            } => {
                state.watchers.push((service, target, reconciler));
            }
        }
        Ok(())
    }
}

fn target_names(targets: &[TargetInfo]) -> Vec<&str> {
    targets.iter().map(|t| t.name.as_str()).collect()
}

fn notify_watchers(state: &mut RegistryState, service: &str, targets: &[TargetInfo]) {
    state.watchers.retain(|(_, _, r)| {
        r.get_status() != ractor::ActorStatus::Stopped
            && r.get_status() != ractor::ActorStatus::Stopping
    });
    for (s, t, reconciler) in &state.watchers {
        if s == service && targets.iter().any(|x| &x.name == t) {
            let _ = reconciler.cast(ReconcilerMsg::ConnectorAvailable);
        }
    }
}

/// Hands `request` to the chosen agent's session. A session that stopped before its
/// unregister reached the registry cannot take it: it is forgotten and another is chosen, so a
/// request is never failed for an agent that is already gone while another could carry it.
fn route(state: &mut RegistryState, service: &str, request: TunnelRequest, reply: TunnelReply) {
    let (mut request, mut reply) = (request, reply);
    loop {
        let Chosen {
            session_id,
            session,
            health,
        } = match pick_agent(state, service, &request.target) {
            Ok(chosen) => chosen,
            Err((kind, reason)) => {
                let _ = reply.send(Err(TransportError::NoConnector { kind, reason }));
                return;
            }
        };
        let ticket = InFlight::take(&health);
        match session.cast(AgentSessionMsg::Forward {
            request,
            reply,
            ticket,
        }) {
            Ok(()) => return,
            Err(MessagingErr::SendErr(AgentSessionMsg::Forward {
                request: r,
                reply: p,
                ..
            })) => {
                debug!(service = %service, session = session_id, "agent session gone while routing; choosing again");
                forget(state, service, session_id);
                (request, reply) = (r, p);
            }
            // Nothing else is ever sent back; the caller hears that its reply port closed.
            Err(_) => return,
        }
    }
}

fn forget(state: &mut RegistryState, service: &str, session_id: u64) -> bool {
    let Some(list) = state.agents.get_mut(service) else {
        return false;
    };
    let before = list.len();
    list.retain(|a| a.session_id != session_id);
    list.len() != before
}

/// The agent a request goes to.
struct Chosen {
    session_id: u64,
    session: ActorRef<AgentSessionMsg>,
    health: Arc<AgentHealth>,
}

/// Chooses an agent for a request, or says which of the "no connector" causes holds.
fn pick_agent(
    state: &mut RegistryState,
    service: &str,
    target: &str,
) -> Result<Chosen, (NoConnectorKind, String)> {
    match state.book.is_enabled(service) {
        None => {
            return Err((
                NoConnectorKind::UnknownService,
                format!("service `{service}` is not configured on the hub"),
            ))
        }
        Some(false) => {
            return Err((
                NoConnectorKind::ServiceOff,
                format!(
                    "service `{service}` is switched off: switch it on (`enabled = true` in hub.toml, or PUT /api/services/{service}/enabled)"
                ),
            ))
        }
        Some(true) => {}
    }
    let agents = state.agents.get(service).map(Vec::as_slice).unwrap_or(&[]);
    if agents.is_empty() {
        return Err((
            NoConnectorKind::NoAgent,
            format!(
                "no agent is connected for service `{service}`: start `connect run` on the agent VM and check its log"
            ),
        ));
    }
    let able: Vec<&AgentEntry> = agents
        .iter()
        .filter(|a| a.targets.iter().any(|t| t.name == target))
        .collect();
    if able.is_empty() {
        warn!(service = %service, target = %target, "no connected agent advertises the target");
        return Err((
            NoConnectorKind::NoTarget,
            format!(
                "{} agent(s) connected for service `{service}`, but none advertises target `{target}`: run `connect set-target {target} <host:port>` on the agent",
                agents.len()
            ),
        ));
    }
    let now = SystemTime::now();
    let healthy: Vec<&AgentEntry> = able
        .iter()
        .copied()
        .filter(|a| a.health.health(now) == Health::Healthy)
        .collect();
    if healthy.is_empty() {
        warn!(service = %service, target = %target, "every agent advertising the target is silent");
        return Err((
            NoConnectorKind::NoAgent,
            format!(
                "{} agent(s) of service `{service}` advertise target `{target}`, but none was heard for more than {} s (missed heartbeats): check the agent VMs and their network toward the hub",
                able.len(),
                SILENT_AFTER.as_secs()
            ),
        ));
    }
    // Read once: sessions release their requests while we choose.
    let loads: Vec<(&AgentEntry, usize)> = healthy
        .into_iter()
        .map(|a| (a, a.health.in_flight()))
        .collect();
    let least = loads.iter().map(|(_, n)| *n).min().unwrap_or(0);
    let candidates: Vec<&AgentEntry> = loads
        .into_iter()
        .filter(|(_, n)| *n == least)
        .map(|(a, _)| a)
        .collect();
    state.next_pick = state.next_pick.wrapping_add(1);
    let chosen = candidates[state.next_pick % candidates.len()];
    Ok(Chosen {
        session_id: chosen.session_id,
        session: chosen.session.clone(),
        health: chosen.health.clone(),
    })
}

fn agent_status(a: &AgentEntry, now: SystemTime) -> AgentStatus {
    AgentStatus {
        health: a.health.health(now),
        in_flight: a.health.in_flight(),
        answered: a.health.answered(),
        failed: a.health.failed(),
        last_heard_unix_ms: a.health.last_heard_unix_ms(),
        rtt_micros: a.health.rtt_micros(),
        session_id: a.session_id,
        agent_name: a.agent_name.clone(),
        peer: a.peer.clone(),
        targets: a.targets.iter().map(|t| t.name.clone()).collect(),
        connected_since_unix: a
            .connected_at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ractor::concurrency::oneshot;
    use ractor::RpcReplyPort;

    use super::*;
    use crate::config::hub::ServiceConfig;
    use crate::config::Secret;
    use crate::messages::{HttpResponse, Scheme};

    /// An agent session that holds every request it gets, and answers them all on `Heartbeat`.
    struct Holder;

    impl Actor for Holder {
        type Msg = AgentSessionMsg;
        type State = Vec<(TunnelReply, InFlight)>;
        type Arguments = ();

        async fn pre_start(
            &self,
            _myself: ActorRef<Self::Msg>,
            _args: (),
        ) -> Result<Self::State, ActorProcessingErr> {
            Ok(Vec::new())
        }

        async fn handle(
            &self,
            _myself: ActorRef<Self::Msg>,
            message: Self::Msg,
            held: &mut Self::State,
        ) -> Result<(), ActorProcessingErr> {
            match message {
                AgentSessionMsg::Forward { reply, ticket, .. } => held.push((reply, ticket)),
                AgentSessionMsg::Heartbeat => {
                    for (reply, _ticket) in held.drain(..) {
                        let _ = reply.send(Ok(HttpResponse {
                            status: 200,
                            headers: vec![],
                            body: vec![],
                        }));
                    }
                }
                _ => {}
            }
            Ok(())
        }
    }

    struct Rig {
        registry: ActorRef<RegistryMsg>,
        answers: Vec<ractor::concurrency::OneshotReceiver<Result<HttpResponse, TransportError>>>,
    }

    impl Rig {
        async fn new() -> Rig {
            let book = ServiceBook::new(&[ServiceConfig {
                name: "onprem".into(),
                service_id: Secret::new("svc-registry-test-0123456789".to_string()),
                enabled: true,
            }]);
            let (registry, _) = Actor::spawn(None, Registry, book).await.unwrap();
            Rig {
                registry,
                answers: Vec::new(),
            }
        }

        /// Registers a holder as agent `name`; returns its health and the holder.
        async fn agent(
            &self,
            session_id: u64,
            name: &str,
        ) -> (Arc<AgentHealth>, ActorRef<AgentSessionMsg>) {
            let (session, _) = Actor::spawn(None, Holder, ()).await.unwrap();
            let health = AgentHealth::new();
            self.registry
                .cast(RegistryMsg::Register {
                    service: "onprem".into(),
                    agent: AgentEntry {
                        session_id,
                        agent_name: name.into(),
                        peer: "127.0.0.1:1".into(),
                        targets: vec![TargetInfo { name: "crm".into() }],
                        connected_at: SystemTime::now(),
                        session: session.clone(),
                        health: health.clone(),
                    },
                })
                .unwrap();
            (health, session)
        }

        /// Routes one request; its answer comes to the receiver returned.
        fn send(
            &self,
        ) -> ractor::concurrency::OneshotReceiver<Result<HttpResponse, TransportError>> {
            let (tx, rx) = oneshot();
            self.registry
                .cast(RegistryMsg::Route {
                    service: "onprem".into(),
                    request: TunnelRequest {
                        target: "crm".into(),
                        scheme: Scheme::Http,
                        host: "crm.example".into(),
                        method: "GET".into(),
                        path_and_query: "/v2/Users".into(),
                        headers: vec![],
                        body: vec![],
                        skip_tls_verify: false,
                        timeout: Duration::from_secs(5),
                    },
                    reply: RpcReplyPort::from(tx),
                })
                .unwrap();
            rx
        }

        /// Routes `n` requests; they are handed out (tickets taken) once this returns.
        async fn route(&mut self, n: usize) -> Vec<ServiceStatus> {
            for _ in 0..n {
                let rx = self.send();
                self.answers.push(rx);
            }
            self.snapshot().await
        }

        async fn snapshot(&self) -> Vec<ServiceStatus> {
            self.registry
                .call(RegistryMsg::Snapshot, Some(Duration::from_secs(5)))
                .await
                .unwrap()
                .unwrap()
        }
    }

    async fn settled(health: &AgentHealth, in_flight: usize) {
        for _ in 0..500 {
            if health.in_flight() == in_flight {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!("in flight stayed {}", health.in_flight());
    }

    #[tokio::test]
    async fn requests_go_to_the_agent_with_the_fewest_in_flight() {
        let mut rig = Rig::new().await;
        let (a, session_a) = rig.agent(1, "vm-a").await;
        let (b, _session_b) = rig.agent(2, "vm-b").await;
        rig.route(6).await;
        assert_eq!((a.in_flight(), b.in_flight()), (3, 3), "an even split");
        // vm-a answers everything it holds: the next requests are all its own, until it
        // carries as many as vm-b (round robin would have split them).
        session_a.cast(AgentSessionMsg::Heartbeat).unwrap();
        settled(&a, 0).await;
        let status = rig.route(3).await;
        assert_eq!((a.in_flight(), b.in_flight()), (3, 3));
        assert_eq!(
            a.answered(),
            0,
            "answers are counted by the session, not here"
        );
        let agents = &status[0].agents;
        assert_eq!(agents.len(), 2);
        assert!(agents.iter().all(|s| s.health == Health::Healthy));
        assert_eq!(agents.iter().map(|s| s.in_flight).sum::<usize>(), 6);
        // The three vm-a held were answered, through the reply ports the registry handed on.
        let answered = rig
            .answers
            .iter_mut()
            .take(6)
            .map(|rx| rx.try_recv())
            .filter(|r| matches!(r, Ok(Ok(r)) if r.status == 200))
            .count();
        assert_eq!(answered, 3);
    }

    #[tokio::test]
    async fn a_silent_agent_gets_nothing_until_it_is_heard_again() {
        let mut rig = Rig::new().await;
        let (a, _sa) = rig.agent(1, "vm-a").await;
        let (b, _sb) = rig.agent(2, "vm-b").await;
        a.heard(SystemTime::now() - SILENT_AFTER - Duration::from_secs(1));
        let status = rig.route(4).await;
        assert_eq!((a.in_flight(), b.in_flight()), (0, 4));
        let listed: Vec<(String, Health)> = status[0]
            .agents
            .iter()
            .map(|s| (s.agent_name.clone(), s.health))
            .collect();
        assert_eq!(
            listed,
            [
                ("vm-a".to_string(), Health::Silent),
                ("vm-b".to_string(), Health::Healthy)
            ],
            "still listed, as silent"
        );
        a.heard(SystemTime::now());
        rig.route(4).await;
        assert_eq!((a.in_flight(), b.in_flight()), (4, 4));

        // Both silent: nothing is routed, and the cause says why.
        let stale = SystemTime::now() - SILENT_AFTER - Duration::from_secs(1);
        a.heard(stale);
        b.heard(stale);
        match rig.send().await.unwrap() {
            Err(TransportError::NoConnector { kind, reason }) => {
                assert_eq!(kind, NoConnectorKind::NoAgent, "it may pass: retried");
                assert!(reason.contains("missed heartbeats"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_session_gone_before_its_unregister_is_skipped_not_failed() {
        let mut rig = Rig::new().await;
        let (a, session_a) = rig.agent(1, "vm-a").await;
        let (b, _sb) = rig.agent(2, "vm-b").await;
        session_a.stop(None);
        for _ in 0..500 {
            if session_a.get_status() == ractor::ActorStatus::Stopped {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let status = rig.route(4).await;
        assert_eq!((a.in_flight(), b.in_flight()), (0, 4));
        assert_eq!(status[0].agents.len(), 1, "the gone session is forgotten");
        assert_eq!(status[0].agents[0].agent_name, "vm-b");
    }
}
