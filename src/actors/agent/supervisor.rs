//! AgentSupervisor: the root of the agent's tree. Starts one TargetDialer per declared target
//! and the Session; restarts a failed Session with backoff (the dialers and their connection
//! pools are untouched) and counts every restart.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use tracing::{error, warn};

use super::dialer::Dialers;
use super::session::{Session, SessionArgs};
use crate::messages::agent::SessionMsg;
use crate::messages::agent::{DialerLimits, TargetSpec};

/// Messages of the AgentSupervisor.
pub enum AgentSupervisorMsg {
    /// Start a new Session after a failed one (sent to itself after a backoff delay).
    RespawnSession,
    /// The current Session, for status queries and shutdown.
    CurrentSession(ractor::RpcReplyPort<Option<ActorRef<SessionMsg>>>),
    /// Restart counts per actor.
    Restarts(ractor::RpcReplyPort<BTreeMap<String, u64>>),
}

/// What the agent's tree starts from.
pub struct AgentSupervisorArgs {
    pub targets: Vec<TargetSpec>,
    pub limits: DialerLimits,
    /// Session arguments without the dialers, which the supervisor creates.
    pub session: SessionTemplate,
}

/// Session arguments known before the dialers exist.
#[derive(Clone)]
pub struct SessionTemplate {
    pub hub: super::session::HubEndpoint,
    pub lookup_hash: String,
    pub psk: [u8; 32],
    pub agent_name: String,
}

/// Supervisor state.
pub struct AgentSupervisorState {
    session_args: SessionArgs,
    session: Option<ActorRef<SessionMsg>>,
    restarts: BTreeMap<String, u64>,
}

/// The AgentSupervisor actor.
pub struct AgentSupervisor;

impl Actor for AgentSupervisor {
    type Msg = AgentSupervisorMsg;
    type State = AgentSupervisorState;
    type Arguments = AgentSupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: AgentSupervisorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let dialers = Dialers::spawn_all(args.targets, args.limits, myself.get_cell()).await?;
        let t = args.session;
        let session_args = SessionArgs {
            hub: t.hub,
            lookup_hash: t.lookup_hash,
            psk: t.psk,
            agent_name: t.agent_name,
            dialers: Arc::new(dialers),
        };
        let (session, _) =
            Actor::spawn_linked(None, Session, session_args.clone(), myself.get_cell()).await?;
        Ok(AgentSupervisorState {
            session_args,
            session: Some(session),
            restarts: BTreeMap::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            AgentSupervisorMsg::RespawnSession => {
                if state.session.is_none() {
                    let (session, _) = Actor::spawn_linked(
                        None,
                        Session,
                        state.session_args.clone(),
                        myself.get_cell(),
                    )
                    .await?;
                    state.session = Some(session);
                }
            }
            AgentSupervisorMsg::CurrentSession(reply) => {
                let _ = reply.send(state.session.clone());
            }
            AgentSupervisorMsg::Restarts(reply) => {
                let _ = reply.send(state.restarts.clone());
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, why) = match event {
            SupervisionEvent::ActorFailed(cell, err) => (cell, err.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, reason.unwrap_or_else(|| "stopped".into()))
            }
            _ => return Ok(()),
        };
        let is_session = state
            .session
            .as_ref()
            .is_some_and(|s| s.get_id() == cell.get_id());
        if is_session {
            state.session = None;
            let count = state.restarts.entry("session".into()).or_default();
            *count += 1;
            // Backoff grows with repeated failures so a crash loop does not spin.
            let delay = Duration::from_millis(250u64.saturating_mul(1 << (*count).min(7)))
                .min(Duration::from_secs(30));
            warn!("session ended ({why}); restarting in {delay:?} (restart #{count})");
            myself.send_after(delay, || AgentSupervisorMsg::RespawnSession);
        } else {
            let name = cell.get_name().unwrap_or_else(|| "dialer".into());
            *state.restarts.entry(name.clone()).or_default() += 1;
            error!("{name} ended ({why})");
        }
        Ok(())
    }
}
