//! AgentSession: the hub's end of one agent's tunnel. Runs the key exchange (as responder),
//! registers the agent and its targets, sends it requests with fresh ids and matches the
//! responses, and notices when the agent goes silent.
//!
//! Every request it accepted is answered exactly once: by the agent, by the hub's own deadline,
//! or with a tunnel error when the session ends. When the agent says goodbye, the session
//! leaves the registry at once (nothing more is routed to it) and stays only until the agent
//! has answered the requests already sent.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tracing::{debug, info, warn};

use crate::actors::key_exchange::{KeyExchange, KeyExchangeArgs, KeyExchangeMsg, Role};
use crate::messages::hub::{AgentEntry, AgentSessionMsg, GatewayMsg, RegistryMsg, TunnelReply};
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
    pending: HashMap<u64, (TunnelReply, Duration)>,
    last_heard: Instant,
    last_ping: Instant,
    ping_seq: u64,
    start: Option<(Ws, [u8; 32], Vec<u8>)>,
}

impl AgentSessionState {
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
            peer: args.peer,
            session_id: args.session_id,
            registry: args.registry,
            gateway: args.gateway,
            link: None,
            registered: false,
            draining: false,
            next_id: 0,
            pending: HashMap::new(),
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
        for (_, (reply, _)) in state.pending.drain() {
            let _ = reply.send(Err(TransportError::Tunnel {
                detail: "the agent disconnected before answering".into(),
            }));
        }
        state.unregister();
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
                myself.stop(None);
            }
            AgentSessionMsg::Forward { request, reply } if state.draining => {
                // Routed before the registry heard the goodbye: let it choose again (it no
                // longer lists this session, since the unregister was sent first).
                let _ = state.registry.cast(RegistryMsg::Route {
                    service: state.service.clone(),
                    request,
                    reply,
                });
            }
            AgentSessionMsg::Forward { request, reply } => {
                let Some(link) = state.link.as_ref().filter(|_| state.registered) else {
                    let _ = reply.send(Err(TransportError::Tunnel {
                        detail: "the agent session is not ready".into(),
                    }));
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
                    state.pending.insert(id, (reply, timeout + REQUEST_SLACK));
                    myself.send_after(timeout + REQUEST_SLACK, move || AgentSessionMsg::Expire {
                        id,
                    });
                } else {
                    let _ = reply.send(Err(TransportError::Tunnel {
                        detail: "the tunnel to the agent is closed".into(),
                    }));
                }
            }
            AgentSessionMsg::Expire { id } => {
                if let Some((reply, waited)) = state.pending.remove(&id) {
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
                    Some((reply, _)) => {
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
            Frame::Pong { .. } => {}
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
