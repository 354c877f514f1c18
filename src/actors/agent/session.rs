//! Session: the agent's tunnel to the hub. Dials out (TCP, TLS, websocket upgrade naming the
//! service by lookup hash), runs the key exchange through a KeyExchange child, says hello with
//! the declared targets, hands each request to the dialers and sends their responses back,
//! pings the hub, and reconnects with exponential backoff and jitter when anything breaks.
//!
//! It never forwards a request itself and never sends the service id: only its hash and the
//! Noise handshake, which proves knowledge of the id without revealing it.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tracing::{debug, info, warn};

use super::dialer::Dialers;
use crate::actors::key_exchange::{KeyExchange, KeyExchangeArgs, KeyExchangeMsg, Role};
use crate::logging::untrusted;
use crate::messages::agent::{SessionMsg, SessionStatus};
use crate::messages::{ForwardResponse, Frame, LinkEvent, PROTOCOL_VERSION};
use crate::net::link::Link;
use crate::net::{BoxedIo, Ws, SERVICE_HEADER};
use crate::tunnel;

/// How often the agent pings the hub.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
/// Silence after which the hub is considered gone and the agent reconnects.
pub const DEAD_AFTER: Duration = Duration::from_secs(15);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Backoff bounds between reconnection attempts.
const BACKOFF_FIRST: Duration = Duration::from_millis(250);
const BACKOFF_CAP: Duration = Duration::from_secs(30);

/// Where and how to reach the hub.
#[derive(Clone)]
pub struct HubEndpoint {
    /// The `hub` URL as configured (shown in logs and status; holds no secret).
    pub url: String,
    pub host: String,
    pub port: u16,
    pub tls: Arc<ClientConfig>,
}

/// What a Session starts from.
#[derive(Clone)]
pub struct SessionArgs {
    pub hub: HubEndpoint,
    pub lookup_hash: String,
    pub psk: [u8; 32],
    pub agent_name: String,
    pub dialers: Arc<Dialers>,
}

/// The Session actor.
pub struct Session;

/// One live connection.
struct Connection {
    generation: u64,
    link: Link,
    pump: JoinHandle<()>,
    responses: mpsc::UnboundedSender<ForwardResponse>,
    welcomed: bool,
    since: SystemTime,
    last_heard: Instant,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.pump.abort();
    }
}

/// Session state across connections.
pub struct SessionState {
    args: SessionArgs,
    conn: Option<Connection>,
    generation: u64,
    failures: u32,
    status: SessionStatus,
    stopping: bool,
}

impl Actor for Session {
    type Msg = SessionMsg;
    type State = SessionState;
    type Arguments = SessionArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SessionArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        myself.cast(SessionMsg::Connect)?;
        myself.send_interval(HEARTBEAT_EVERY, || SessionMsg::Heartbeat);
        let status = SessionStatus {
            hub: args.hub.url.clone(),
            ..Default::default()
        };
        Ok(SessionState {
            args,
            conn: None,
            generation: 0,
            failures: 0,
            status,
            stopping: false,
        })
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
            SessionMsg::Connect => {
                if state.conn.is_none() && !state.stopping {
                    self.connect(&myself, state).await;
                }
            }
            SessionMsg::Link { generation, event } => {
                let current = state.conn.as_ref().map(|c| c.generation);
                if current != Some(generation) {
                    return Ok(());
                }
                match event {
                    LinkEvent::Frame(frame) => self.on_frame(&myself, state, frame),
                    LinkEvent::Closed(why) => self.lost(&myself, state, why),
                }
            }
            SessionMsg::Heartbeat => {
                let silent = state
                    .conn
                    .as_ref()
                    .map(|c| c.last_heard.elapsed() > DEAD_AFTER);
                match silent {
                    Some(true) => self.lost(
                        &myself,
                        state,
                        format!("no word from the hub for {DEAD_AFTER:?}"),
                    ),
                    Some(false) => {
                        if let Some(conn) = &state.conn {
                            conn.link.send(Frame::Ping {
                                seq: 0,
                                sent_micros: now_micros(),
                            });
                        }
                    }
                    None => {}
                }
            }
            SessionMsg::Shutdown(reply) => {
                state.stopping = true;
                if let Some(conn) = state.conn.take() {
                    conn.link.send(Frame::Goodbye {
                        reason: "agent stopping".into(),
                    });
                    // Give the writer a moment to flush the goodbye before the link drops.
                    let deadline = Instant::now() + Duration::from_secs(2);
                    while Instant::now() < deadline && !conn.link.is_finished() {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                state.status.connected = false;
                let _ = reply.send(());
            }
            SessionMsg::State(reply) => {
                let _ = reply.send(state.status.clone());
            }
        }
        Ok(())
    }
}

impl Session {
    async fn connect(&self, myself: &ActorRef<SessionMsg>, state: &mut SessionState) {
        let hub = state.args.hub.url.clone();
        match self.establish(myself, state).await {
            Ok(established) => {
                state.generation += 1;
                let generation = state.generation;
                let me = myself.clone();
                let link = Link::spawn(
                    established.ws,
                    established.sealer,
                    established.opener,
                    move |event| {
                        let _ = me.cast(SessionMsg::Link { generation, event });
                    },
                );
                let (responses, mut rx) = mpsc::unbounded_channel::<ForwardResponse>();
                let sender = link.sender();
                let pump = tokio::spawn(async move {
                    while let Some(response) = rx.recv().await {
                        if !sender.send(Frame::Response(response)) {
                            break;
                        }
                    }
                });
                link.send(Frame::Hello {
                    version: PROTOCOL_VERSION,
                    agent_name: state.args.agent_name.clone(),
                    targets: state.args.dialers.targets(),
                });
                state.conn = Some(Connection {
                    generation,
                    link,
                    pump,
                    responses,
                    welcomed: false,
                    since: SystemTime::now(),
                    last_heard: Instant::now(),
                });
                debug!(hub = %hub, "tunnel established, waiting for the hub's welcome");
            }
            Err(why) => {
                state.status.last_error = Some(why.clone());
                let delay = self.backoff(state);
                warn!(hub = %hub, "cannot connect to the hub: {why}; retrying in {delay:?}");
                myself.send_after(delay, || SessionMsg::Connect);
            }
        }
    }

    fn backoff(&self, state: &mut SessionState) -> Duration {
        let exp = BACKOFF_FIRST
            .saturating_mul(1u32 << state.failures.min(16))
            .min(BACKOFF_CAP);
        state.failures = state.failures.saturating_add(1);
        // Full jitter on the upper half keeps a fleet of agents from reconnecting in step.
        let half = exp / 2;
        half + half.mul_f64(rand::random::<f64>())
    }

    fn lost(&self, myself: &ActorRef<SessionMsg>, state: &mut SessionState, why: String) {
        let was_welcomed = state.conn.as_ref().is_some_and(|c| c.welcomed);
        state.conn = None;
        state.status.connected = false;
        state.status.connected_since_unix = None;
        state.status.last_error = Some(why.clone());
        if state.stopping {
            return;
        }
        if was_welcomed {
            state.failures = 0;
        }
        let delay = self.backoff(state);
        warn!(hub = %state.args.hub.url, "tunnel lost: {why}; reconnecting in {delay:?}");
        myself.send_after(delay, || SessionMsg::Connect);
    }

    fn on_frame(&self, myself: &ActorRef<SessionMsg>, state: &mut SessionState, frame: Frame) {
        let Some(conn) = state.conn.as_mut() else {
            return;
        };
        conn.last_heard = Instant::now();
        match frame {
            Frame::Welcome {
                version,
                session_id,
            } => {
                if version != PROTOCOL_VERSION {
                    self.lost(
                        myself,
                        state,
                        format!("hub speaks protocol {version}, agent speaks {PROTOCOL_VERSION}"),
                    );
                    return;
                }
                conn.welcomed = true;
                state.failures = 0;
                state.status.connected = true;
                state.status.connects += 1;
                state.status.last_error = None;
                state.status.connected_since_unix = conn
                    .since
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .ok()
                    .map(|d| d.as_secs());
                info!(hub = %state.args.hub.url, session = session_id, "connected to the hub");
            }
            Frame::Request(request) => {
                if conn.welcomed {
                    state.args.dialers.route(request, conn.responses.clone());
                }
            }
            Frame::Cancel { id } => {
                state.args.dialers.cancel(id);
            }
            Frame::Ping { seq, sent_micros } => {
                conn.link.send(Frame::Pong { seq, sent_micros });
            }
            Frame::Pong { sent_micros, .. } => {
                state.status.last_rtt_micros = Some(now_micros().saturating_sub(sent_micros));
            }
            Frame::Goodbye { reason } => {
                self.lost(
                    myself,
                    state,
                    format!("the hub closed the session: {}", untrusted(&reason)),
                );
            }
            Frame::Hello { .. } | Frame::Targets { .. } | Frame::Response(_) => {
                self.lost(myself, state, "the hub sent an agent-only frame".into());
            }
        }
    }

    /// TCP, TLS, websocket upgrade and key exchange.
    async fn establish(
        &self,
        myself: &ActorRef<SessionMsg>,
        state: &SessionState,
    ) -> Result<crate::actors::key_exchange::Established, String> {
        let args = &state.args;
        let ws = dial(&args.hub, &args.lookup_hash).await?;
        let kx_args = KeyExchangeArgs {
            role: Role::Initiator,
            psk: args.psk,
            prologue: tunnel::prologue(&args.lookup_hash),
            timeout: HANDSHAKE_TIMEOUT,
        };
        let (kx, _) = Actor::spawn_linked(None, KeyExchange, kx_args, myself.get_cell())
            .await
            .map_err(|e| format!("cannot start the key exchange: {e}"))?;
        match kx
            .call(
                |reply| KeyExchangeMsg::Run { ws, reply },
                Some(HANDSHAKE_TIMEOUT + Duration::from_secs(1)),
            )
            .await
        {
            Ok(ractor::rpc::CallResult::Success(Ok(established))) => Ok(established),
            Ok(ractor::rpc::CallResult::Success(Err(e))) => Err(format!("key exchange: {e}")),
            Ok(_) | Err(_) => Err("key exchange did not finish".into()),
        }
    }
}

/// Opens the websocket to the hub.
async fn dial(hub: &HubEndpoint, lookup_hash: &str) -> Result<Ws, String> {
    let addr = format!("{}:{}", hub.host, hub.port);
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr))
        .await
        .map_err(|_| format!("connecting to {addr} timed out"))?
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let server_name =
        ServerName::try_from(hub.host.trim_matches(|c| c == '[' || c == ']').to_string())
            .map_err(|_| format!("`{}` is not a valid TLS server name", hub.host))?;
    let tls = tokio::time::timeout(
        CONNECT_TIMEOUT,
        TlsConnector::from(hub.tls.clone()).connect(server_name, tcp),
    )
    .await
    .map_err(|_| format!("TLS handshake with {addr} timed out"))?
    .map_err(|e| {
        format!("TLS handshake with {addr} failed: {e} (is hub_ca set to the hub's CA?)")
    })?;
    let io: BoxedIo = Box::new(tls);
    let mut request = hub
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| format!("bad hub URL: {e}"))?;
    request.headers_mut().insert(
        SERVICE_HEADER,
        HeaderValue::from_str(lookup_hash).map_err(|e| e.to_string())?,
    );
    let (ws, _) = tokio::time::timeout(CONNECT_TIMEOUT, tokio_tungstenite::client_async_with_config(request, io, Some(crate::net::tunnel_ws_config())))
        .await
        .map_err(|_| format!("websocket upgrade with {addr} timed out"))?
        .map_err(|e| match e {
            tokio_tungstenite::tungstenite::Error::Http(response)
                if response.status() == 403 =>
            {
                "the hub does not accept this service (unknown or switched-off service id: check service_id)".to_string()
            }
            other => format!("websocket upgrade failed: {other}"),
        })?;
    Ok(ws)
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}
