//! AgentSession: the hub's end of one agent's tunnel. Runs the key exchange (as responder),
//! registers the agent and its targets, sends it requests with fresh ids and matches the
//! responses, and notices when the agent goes silent.
//!
//! Every request it accepted is answered exactly once: by the agent, by the hub's own deadline,
//! or with an "agent lost" error when the session ends (the request's outcome is then unknown,
//! and the client may re-send it through another agent). A request it cannot send (the agent
//! said goodbye, or the tunnel just closed) goes back to the registry to be routed elsewhere,
//! since it never left the hub. When the agent says goodbye, the session leaves the registry
//! at once and stays only until the agent has answered the requests already sent; when the
//! session ends, it leaves the registry before it fails the requests still pending, so that
//! their retries are routed to another agent. It keeps the agent's [`AgentHealth`] current
//! (last heard, round trip, answered and failed requests) for routing and status.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tracing::{debug, info, warn};

use super::health::{AgentHealth, InFlight};
use crate::actors::key_exchange::{KeyExchange, KeyExchangeArgs, KeyExchangeMsg, Role};
use crate::messages::hub::{
    AgentEntry, AgentSessionMsg, GatewayMsg, RegistryMsg, TunnelReply, TunnelRequest,
};
use crate::messages::liveness::{self, CHECK_EVERY, DEAD_AFTER, PING_EVERY};
use crate::messages::{ForwardRequest, Frame, LinkEvent, PROTOCOL_VERSION};
use crate::net::link::Link;
use crate::net::Ws;
use crate::scim::transport::TransportError;

/// Time allowed for the handshake and the agent's hello.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Extra time the hub waits beyond the agent's own per-request deadline.
const REQUEST_SLACK: Duration = Duration::from_secs(2);
/// How long the last frames get to leave when the hub closes a tunnel.
const CLOSE_FLUSH: Duration = Duration::from_millis(500);

/// What an AgentSession starts from.
pub struct AgentSessionArgs {
    pub ws: Ws,
    pub service: String,
    pub psk: [u8; 32],
    pub prologue: Vec<u8>,
    pub peer: String,
    pub session_id: u64,
    pub registry: ActorRef<RegistryMsg>,
    /// Told the agent's instance at hello, so it can drop a stale session of the same agent.
    pub gateway: ActorRef<GatewayMsg>,
}

/// The AgentSession actor.
pub struct AgentSession;

/// Per-connection state.
pub struct AgentSessionState {
    service: String,
    peer: String,
    session_id: u64,
    registry: ActorRef<RegistryMsg>,
    gateway: ActorRef<GatewayMsg>,
    link: Option<Link>,
    registered: bool,
    /// The agent said goodbye: it gets no new request, and the session ends once the requests
    /// already sent are answered.
    draining: bool,
    next_id: u64,
    /// Requests sent to the agent: where the answer goes, how long the hub waits, and the
    /// request's claim on the agent's in-flight count.
    pending: HashMap<u64, (TunnelReply, Duration, InFlight)>,
    /// The name the agent gave in its hello (its peer address until then).
    agent_name: String,
    health: Arc<AgentHealth>,
    /// Why the session is ending, for the requests it must fail.
    ended_because: Option<String>,
    last_heard: Instant,
    last_ping: Instant,
    ping_seq: u64,
    start: Option<(Ws, [u8; 32], Vec<u8>)>,
}

impl AgentSessionState {
    /// Gives a request that never left the hub back to the registry, to be routed to another
    /// agent. Only called once this session is out of the registry, so it cannot come back.
    fn reroute(&self, request: TunnelRequest, reply: TunnelReply) {
        let _ = self.registry.cast(RegistryMsg::Route {
            service: self.service.clone(),
            request,
            reply,
        });
    }

    /// Takes the agent out of the registry (once).
    fn unregister(&mut self) {
        if self.registered {
            self.registered = false;
            let _ = self.registry.cast(RegistryMsg::Unregister {
                service: self.service.clone(),
                session_id: self.session_id,
            });
        }
    }
}

impl Actor for AgentSession {
    type Msg = AgentSessionMsg;
    type State = AgentSessionState;
    type Arguments = AgentSessionArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: AgentSessionArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(AgentSessionState {
            service: args.service,
            peer: args.peer.clone(),
            session_id: args.session_id,
            registry: args.registry,
            gateway: args.gateway,
            link: None,
            registered: false,
            draining: false,
            next_id: 0,
            pending: HashMap::new(),
            agent_name: args.peer,
            health: AgentHealth::new(),
            ended_because: None,
            last_heard: Instant::now(),
            last_ping: Instant::now(),
            ping_seq: 0,
            start: Some((args.ws, args.psk, args.prologue)),
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (ws, psk, prologue) = state.start.take().ok_or("session started twice")?;
        let kx_args = KeyExchangeArgs {
            role: Role::Responder,
            psk,
            prologue,
            timeout: HANDSHAKE_TIMEOUT,
        };
        let (kx, _) = Actor::spawn_linked(None, KeyExchange, kx_args, myself.get_cell()).await?;
        let result = kx
            .call(
                |reply| KeyExchangeMsg::Run { ws, reply },
                Some(HANDSHAKE_TIMEOUT + Duration::from_secs(1)),
            )
            .await?;
        let established = match result {
            ractor::rpc::CallResult::Success(Ok(established)) => established,
            ractor::rpc::CallResult::Success(Err(e)) => {
                info!(peer = %state.peer, service = %state.service, "agent refused: {e}");
                myself.stop(None);
                return Ok(());
            }
            _ => {
                info!(peer = %state.peer, "agent refused: key exchange did not finish");
                myself.stop(None);
                return Ok(());
            }
        };
        let me = myself.clone();
        state.link = Some(Link::spawn(
            established.ws,
            established.sealer,
            established.opener,
            move |event| {
                let _ = me.cast(AgentSessionMsg::Link(event));
            },
        ));
        state.last_heard = Instant::now();
        myself.send_interval(CHECK_EVERY, || AgentSessionMsg::Heartbeat);
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Out of the registry first: the retries of the requests failed below must not be
        // routed here again.
        state.unregister();
        let why = state
            .ended_because
            .take()
            .unwrap_or_else(|| "its session ended".into());
        if !state.pending.is_empty() {
            warn!(agent = %state.agent_name, session = state.session_id, requests = state.pending.len(), "agent lost with requests in flight: {why}");
        }
        for (_, (reply, _, _ticket)) in state.pending.drain() {
            state.health.count_failed();
            let _ = reply.send(Err(TransportError::AgentLost {
                agent: state.agent_name.clone(),
                detail: why.clone(),
            }));
        }
        if let Some(mut link) = state.link.take() {
            link.close(CLOSE_FLUSH).await;
        }
        Ok(())
    }

    /// The only child is the KeyExchange of the current connection attempt. Its normal end is
    /// expected; its failure already surfaced as a failed call. Neither ends this actor (the
    /// default would stop the parent when a child stops).
    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        event: ractor::SupervisionEvent,
        _state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let ractor::SupervisionEvent::ActorFailed(_, err) = event {
            tracing::debug!("key exchange failed: {err}");
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            AgentSessionMsg::Link(LinkEvent::Frame(frame)) => {
                state.last_heard = Instant::now();
                self.on_frame(&myself, state, frame);
            }
            AgentSessionMsg::Link(LinkEvent::Closed(why)) => {
                info!(peer = %state.peer, service = %state.service, session = state.session_id, "agent tunnel closed: {why}");
                state.unregister();
                state.ended_because = Some(format!("it disconnected: {why}"));
                myself.stop(None);
            }
            AgentSessionMsg::Forward { request, reply, .. }
                if state.draining || !state.registered || state.link.is_none() =>
            {
                // Routed before the registry heard the goodbye (or the end of the tunnel): let
                // it choose again. It no longer lists this session, since the unregister was
                // sent first.
                state.reroute(request, reply);
            }
            AgentSessionMsg::Forward {
                request,
                reply,
                ticket,
            } => {
                let Some(link) = state.link.as_ref().filter(|l| !l.is_finished()) else {
                    // The tunnel ended under it: the request is still whole, and unsent.
                    info!(peer = %state.peer, session = state.session_id, "tunnel closed under a request; routing it elsewhere");
                    state.unregister();
                    drop(ticket);
                    state.reroute(request, reply);
                    return Ok(());
                };
                state.next_id += 1;
                let id = state.next_id;
                let timeout = request.timeout;
                let frame = Frame::Request(ForwardRequest {
                    id,
                    target: request.target,
                    scheme: request.scheme,
                    host: request.host,
                    method: request.method,
                    path_and_query: request.path_and_query,
                    headers: request.headers,
                    body: request.body,
                    skip_tls_verify: request.skip_tls_verify,
                    timeout_ms: timeout.as_millis().min(u32::MAX as u128) as u32,
                });
                if link.send(frame) {
                    state
                        .pending
                        .insert(id, (reply, timeout + REQUEST_SLACK, ticket));
                    myself.send_after(timeout + REQUEST_SLACK, move || AgentSessionMsg::Expire {
                        id,
                    });
                } else {
                    // The writer ended between the check above and now: nothing was sent, but
                    // the request is gone with the frame. Answered as lost, which the client
                    // re-sends through another agent (or looks up first, for a create).
                    state.unregister();
                    state.health.count_failed();
                    let _ = reply.send(Err(TransportError::AgentLost {
                        agent: state.agent_name.clone(),
                        detail: "its tunnel closed as the request was sent".into(),
                    }));
                }
            }
            AgentSessionMsg::Expire { id } => {
                if let Some((reply, waited, _ticket)) = state.pending.remove(&id) {
                    state.health.count_failed();
                    warn!(
                        request_id = id,
                        session = state.session_id,
                        "agent did not answer in time"
                    );
                    let _ = reply.send(Err(TransportError::Timeout {
                        after_ms: waited.as_millis() as u64,
                    }));
                    if let Some(link) = &state.link {
                        link.send(Frame::Cancel { id });
                    }
                }
                if state.draining && state.pending.is_empty() {
                    myself.stop(None);
                }
            }
            AgentSessionMsg::Heartbeat => {
                let silent = state.last_heard.elapsed();
                if liveness::is_dead(silent) {
                    warn!(peer = %state.peer, session = state.session_id, "agent silent for {:.1} s (limit {DEAD_AFTER:?}), dropping its session", silent.as_secs_f64());
                    state.unregister();
                    state.ended_because = Some(format!(
                        "it was silent for {:.0} s (missed heartbeats)",
                        silent.as_secs_f64()
                    ));
                    myself.stop(None);
                } else if state.last_ping.elapsed() >= PING_EVERY {
                    if let Some(link) = &state.link {
                        state.last_ping = Instant::now();
                        state.ping_seq += 1;
                        link.send(Frame::Ping {
                            seq: state.ping_seq,
                            sent_micros: now_micros(),
                        });
                    }
                }
            }
        }
        Ok(())
    }
}

impl AgentSession {
    fn on_frame(
        &self,
        myself: &ActorRef<AgentSessionMsg>,
        state: &mut AgentSessionState,
        frame: Frame,
    ) {
        let Some(link) = &state.link else { return };
        state.health.heard(SystemTime::now());
        match frame {
            Frame::Hello {
                version,
                agent_name,
                instance,
                targets,
            } => {
                if version != PROTOCOL_VERSION {
                    warn!(peer = %state.peer, "agent speaks protocol {version}, hub speaks {PROTOCOL_VERSION}");
                    link.send(Frame::Goodbye {
                        reason: format!("unsupported protocol version {version}"),
                    });
                    myself.stop(None);
                    return;
                }
                if state.registered || state.draining {
                    return;
                }
                state.agent_name = agent_name.clone();
                let _ = state.gateway.cast(GatewayMsg::Identified {
                    session_id: state.session_id,
                    instance,
                });
                let _ = state.registry.cast(RegistryMsg::Register {
                    service: state.service.clone(),
                    agent: AgentEntry {
                        session_id: state.session_id,
                        agent_name,
                        peer: state.peer.clone(),
                        targets,
                        connected_at: SystemTime::now(),
                        session: myself.clone(),
                        health: state.health.clone(),
                    },
                });
                state.registered = true;
                link.send(Frame::Welcome {
                    version: PROTOCOL_VERSION,
                    session_id: state.session_id,
                });
            }
            Frame::Targets { targets } if state.registered => {
                let _ = state.registry.cast(RegistryMsg::UpdateTargets {
                    service: state.service.clone(),
                    session_id: state.session_id,
                    targets,
                });
            }
            Frame::Targets { .. } => {}
            Frame::Response(response) => {
                match state.pending.remove(&response.id) {
                    Some((reply, _, _ticket)) => {
                        state.health.count_answered();
                        let _ = reply.send(response.result.map_err(TransportError::Forward));
                    }
                    None => debug!(request_id = response.id, "late response dropped"),
                }
                if state.draining && state.pending.is_empty() {
                    info!(peer = %state.peer, session = state.session_id, "stopping agent answered everything; closing its session");
                    myself.stop(None);
                }
            }
            Frame::Ping { seq, sent_micros } => {
                link.send(Frame::Pong { seq, sent_micros });
            }
            Frame::Pong { sent_micros, .. } => {
                state
                    .health
                    .set_rtt(now_micros().saturating_sub(sent_micros));
            }
            Frame::Goodbye { reason } => {
                // Before anything else, so the registry routes nothing more here.
                state.unregister();
                state.draining = true;
                info!(peer = %state.peer, session = state.session_id, waiting = state.pending.len(), "agent said goodbye: {reason}; routing nothing more to it");
                if state.pending.is_empty() {
                    myself.stop(None);
                }
            }
            Frame::Welcome { .. } | Frame::Request(_) | Frame::Cancel { .. } => {
                warn!(peer = %state.peer, session = state.session_id, "agent sent a hub-only frame; closing");
                myself.stop(None);
            }
        }
    }
}

/// Microseconds since the epoch, for round-trip measurement.
pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}
