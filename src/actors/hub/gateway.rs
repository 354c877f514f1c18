//! Gateway: the hub's TLS websocket listener. Admits an agent only when the upgrade names a
//! known, switched-on service (by lookup hash) and then starts one AgentSession for it.
//!
//! It never runs the handshake or reads frames itself, and never logs a service id: a refused
//! agent is logged with its address and the reason only.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tracing::{debug, info, warn};

use super::agent_session::{AgentSession, AgentSessionArgs};
use super::services::ServiceBook;
use crate::messages::hub::{GatewayMsg, RegistryMsg};
use crate::net::{BoxedIo, SERVICE_HEADER};
use crate::tunnel;

/// The websocket path agents dial.
pub const CONNECT_PATH: &str = "/v1/connect";

/// What the Gateway needs to start.
pub struct GatewayArgs {
    pub listener: TcpListener,
    pub tls: Arc<ServerConfig>,
    pub book: ServiceBook,
    pub registry: ActorRef<RegistryMsg>,
}

/// Gateway state: the accept loop and the sessions it started.
pub struct GatewayState {
    accept: JoinHandle<()>,
    registry: ActorRef<RegistryMsg>,
    next_session: u64,
    sessions: HashMap<ractor::ActorId, (String, u64)>,
}

/// The Gateway actor.
pub struct Gateway;

impl Actor for Gateway {
    type Msg = GatewayMsg;
    type State = GatewayState;
    type Arguments = GatewayArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: GatewayArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let acceptor = TlsAcceptor::from(args.tls);
        let book = args.book;
        let listener = args.listener;
        let accept = tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let book = book.clone();
                let gateway = myself.clone();
                tokio::spawn(async move {
                    let peer = peer.to_string();
                    match tokio::time::timeout(
                        Duration::from_secs(10),
                        admit(acceptor, tcp, &book, &peer),
                    )
                    .await
                    {
                        Ok(Ok(accepted)) => {
                            let _ = gateway.cast(accepted);
                        }
                        Ok(Err(why)) => info!(peer = %peer, "agent connection refused: {why}"),
                        Err(_) => {
                            info!(peer = %peer, "agent connection refused: upgrade timed out")
                        }
                    }
                });
            }
        });
        Ok(GatewayState {
            accept,
            registry: args.registry,
            next_session: 0,
            sessions: HashMap::new(),
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.accept.abort();
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let GatewayMsg::Accepted {
            ws,
            service,
            psk,
            prologue,
            peer,
        } = message;
        state.next_session += 1;
        let session_id = state.next_session;
        let args = AgentSessionArgs {
            ws,
            service: service.clone(),
            psk,
            prologue,
            peer,
            session_id,
            registry: state.registry.clone(),
        };
        let supervisor: ActorCell = myself.get_cell();
        match Actor::spawn_linked(None, AgentSession, args, supervisor).await {
            Ok((session, _)) => {
                state
                    .sessions
                    .insert(session.get_id(), (service, session_id));
            }
            Err(e) => warn!("cannot start an agent session: {e}"),
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, failure) = match event {
            SupervisionEvent::ActorTerminated(cell, _, _) => (cell, None),
            SupervisionEvent::ActorFailed(cell, err) => (cell, Some(err.to_string())),
            _ => return Ok(()),
        };
        if let Some((service, session_id)) = state.sessions.remove(&cell.get_id()) {
            if let Some(err) = failure {
                warn!(service = %service, session = session_id, "agent session failed: {err}");
            } else {
                debug!(service = %service, session = session_id, "agent session ended");
            }
            // Covers sessions that died without unregistering themselves.
            let _ = state.registry.cast(RegistryMsg::Unregister {
                service,
                session_id,
            });
        }
        Ok(())
    }
}

/// TLS, then the websocket upgrade with the service check.
// The upgrade callback's error type is tungstenite's, not ours to shrink.
#[allow(clippy::result_large_err)]
async fn admit(
    acceptor: TlsAcceptor,
    tcp: tokio::net::TcpStream,
    book: &ServiceBook,
    peer: &str,
) -> Result<GatewayMsg, String> {
    let tls = acceptor
        .accept(tcp)
        .await
        .map_err(|e| format!("TLS handshake failed: {e}"))?;
    let io: BoxedIo = Box::new(tls);
    let mut admitted = None;
    let mut refusal = String::new();
    let callback = |request: &Request, response: Response| -> Result<Response, ErrorResponse> {
        if request.uri().path() != CONNECT_PATH {
            refusal = format!("unknown path {}", request.uri().path());
            return Err(reject(StatusCode::NOT_FOUND));
        }
        let Some(lookup) = request
            .headers()
            .get(SERVICE_HEADER)
            .and_then(|v| v.to_str().ok())
        else {
            refusal = "no service named in the upgrade".into();
            return Err(reject(StatusCode::UNAUTHORIZED));
        };
        match book.by_lookup(lookup) {
            None => {
                refusal = "unknown service".into();
                Err(reject(StatusCode::FORBIDDEN))
            }
            Some(service) if !service.enabled => {
                refusal = format!("service `{}` is switched off", service.name);
                Err(reject(StatusCode::FORBIDDEN))
            }
            Some(service) => {
                admitted = Some((service, tunnel::prologue(lookup)));
                Ok(response)
            }
        }
    };
    let result = tokio_tungstenite::accept_hdr_async_with_config(
        io,
        callback,
        Some(crate::net::ws_config()),
    )
    .await;
    let ws = match result {
        Ok(ws) => ws,
        Err(e) => {
            return Err(if refusal.is_empty() {
                format!("websocket upgrade failed: {e}")
            } else {
                refusal
            })
        }
    };
    let (service, prologue) = admitted.ok_or("websocket accepted without a service")?;
    info!(peer = %peer, service = %service.name, "agent connected, starting key exchange");
    Ok(GatewayMsg::Accepted {
        ws,
        service: service.name,
        psk: service.psk,
        prologue,
        peer: peer.to_string(),
    })
}

fn reject(status: StatusCode) -> ErrorResponse {
    let mut response = ErrorResponse::new(None);
    *response.status_mut() = status;
    response
}
