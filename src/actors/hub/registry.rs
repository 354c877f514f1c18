//! Registry: which agents are connected for which service and which targets they advertise;
//! routes each tunnel request to one of them.
//!
//! It never talks to a socket: it hands requests to AgentSession actors and answers with a
//! typed "no connector" error when none can take them, naming which of the three causes holds.

use std::collections::HashMap;
use std::time::UNIX_EPOCH;

use ractor::{Actor, ActorProcessingErr, ActorRef, MessagingErr};
use tracing::{info, warn};

use super::services::ServiceBook;
use crate::messages::hub::{
    AgentEntry, AgentSessionMsg, AgentStatus, ReconcilerMsg, RegistryMsg, ServiceStatus,
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
                if let Some(list) = state.agents.get_mut(&service) {
                    let before = list.len();
                    list.retain(|a| a.session_id != session_id);
                    if list.len() != before {
                        info!(service = %service, session = session_id, "agent unregistered");
                    }
                }
            }
            RegistryMsg::Route {
                service,
                request,
                reply,
            } => {
                let choice = pick_agent(state, &service, &request.target);
                match choice {
                    Err((kind, reason)) => {
                        let _ = reply.send(Err(TransportError::NoConnector { kind, reason }));
                    }
                    Ok(session) => {
                        if let Err(MessagingErr::SendErr(AgentSessionMsg::Forward {
                            reply, ..
                        })) = session.cast(AgentSessionMsg::Forward { request, reply })
                        {
                            let _ = reply.send(Err(TransportError::Tunnel {
                                detail: "the agent session ended while routing".into(),
                            }));
                        }
                    }
                }
            }
            RegistryMsg::Snapshot(reply) => {
                let list = state
                    .book
                    .list()
                    .into_iter()
                    .map(|(name, enabled)| ServiceStatus {
                        agents: state
                            .agents
                            .get(&name)
                            .map(|agents| agents.iter().map(agent_status).collect())
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

/// Chooses an agent for a request, or says which of the "no connector" causes holds.
fn pick_agent(
    state: &mut RegistryState,
    service: &str,
    target: &str,
) -> Result<ActorRef<AgentSessionMsg>, (NoConnectorKind, String)> {
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
    state.next_pick = state.next_pick.wrapping_add(1);
    Ok(able[state.next_pick % able.len()].session.clone())
}

fn agent_status(a: &AgentEntry) -> AgentStatus {
    AgentStatus {
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
