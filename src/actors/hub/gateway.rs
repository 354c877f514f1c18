//! Gateway: the hub's TLS websocket listener. Admits an agent only when the upgrade names a
//! known, switched-on service (by lookup hash) and then starts one AgentSession for it.
//!
//! It also keeps one session per agent instance: an agent that gave up a silent connection
//! and dialed again says hello with the same instance id, and its older session is stopped at
//! once instead of lingering until its heartbeat runs out.
//!
//! It never runs the handshake or reads frames itself, and never logs a service id: a refused
//! agent is logged with its address and the reason only.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
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
use crate::messages::hub::{AgentSessionMsg, GatewayMsg, RegistryMsg};
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
    /// Kept equal to the number of agent sessions alive, for the admin API.
    pub live_sessions: Arc<AtomicUsize>,
}

/// One agent session the Gateway started.
struct SessionEntry {
    service: String,
    session_id: u64,
    session: ActorRef<AgentSessionMsg>,
    /// Set once the agent said hello.
    instance: Option<u64>,
}

/// Gateway state: the accept loop and the sessions it started.
pub struct GatewayState {
    accept: JoinHandle<()>,
    registry: ActorRef<RegistryMsg>,
    next_session: u64,
    sessions: HashMap<ractor::ActorId, SessionEntry>,
    live_sessions: Arc<AtomicUsize>,
}

impl GatewayState {
    fn count_sessions(&self) {
        self.live_sessions
            .store(self.sessions.len(), Ordering::Relaxed);
    }

    /// Session `session_id` is agent `instance`: of all sessions of that instance, only the
    /// newest stays. An older one is stale (the agent dialed again because it gave up on it);
    /// a hello that arrives late on an older connection loses to the newer one the same way.
    fn identified(&mut self, session_id: u64, instance: u64) {
        let Some(service) = self
            .sessions
            .values_mut()
            .find(|e| e.session_id == session_id)
            .map(|e| {
                e.instance = Some(instance);
                e.service.clone()
            })
        else {
            return;
        };
        let newest = self
            .sessions
            .values()
            .filter(|e| e.service == service && e.instance == Some(instance))
            .map(|e| e.session_id)
            .max()
            .unwrap_or(session_id);
        for entry in self.sessions.values_mut() {
            if entry.service == service
                && entry.instance == Some(instance)
                && entry.session_id != newest
            {
                // It no longer stands for the agent (and is not stopped twice).
                entry.instance = None;
                info!(
                    service = %service,
                    session = entry.session_id,
                    replaced_by = newest,
                    "agent connected again; dropping its previous session at once"
                );
                // Unregister first, so nothing more is routed there while it stops.
                let _ = self.registry.cast(RegistryMsg::Unregister {
                    service: service.clone(),
                    session_id: entry.session_id,
                });
                entry
                    .session
                    .stop(Some("replaced by a newer session of the same agent".into()));
            }
        }
    }
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
        args.live_sessions.store(0, Ordering::Relaxed);
        Ok(GatewayState {
            accept,
            registry: args.registry,
            next_session: 0,
            sessions: HashMap::new(),
            live_sessions: args.live_sessions,
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
        let (ws, service, psk, prologue, peer) = match message {
            GatewayMsg::Accepted {
                ws,
                service,
                psk,
                prologue,
                peer,
            } => (ws, service, psk, prologue, peer),
            GatewayMsg::Identified {
                session_id,
                instance,
            } => {
                state.identified(session_id, instance);
                return Ok(());
            }
        };
        state.next_session += 1;
        let session_id = state.next_session;
        let args = AgentSessionArgs {
            ws: *ws,
            service: service.clone(),
            psk,
            prologue,
            peer,
            session_id,
            registry: state.registry.clone(),
            gateway: myself.clone(),
        };
        let supervisor: ActorCell = myself.get_cell();
        match Actor::spawn_linked(None, AgentSession, args, supervisor).await {
            Ok((session, _)) => {
                state.sessions.insert(
                    session.get_id(),
                    SessionEntry {
                        service,
                        session_id,
                        session,
                        instance: None,
                    },
                );
                state.count_sessions();
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
        if let Some(SessionEntry {
            service,
            session_id,
            ..
        }) = state.sessions.remove(&cell.get_id())
        {
            state.count_sessions();
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
        Some(crate::net::tunnel_ws_config()),
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
        ws: Box::new(ws),
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

#[cfg(test)]
mod tests {
    use super::*;
    use ractor::ActorStatus;

    /// Stands in for an AgentSession or the Registry: handles (and forgets) every message, and
    /// counts the registry's unregistrations.
    struct Sink<M>(std::marker::PhantomData<fn() -> M>);

    impl<M: ractor::Message> Actor for Sink<M> {
        type Msg = M;
        type State = Arc<AtomicUsize>;
        type Arguments = Arc<AtomicUsize>;

        async fn pre_start(
            &self,
            _myself: ActorRef<M>,
            seen: Arc<AtomicUsize>,
        ) -> Result<Self::State, ActorProcessingErr> {
            Ok(seen)
        }

        async fn handle(
            &self,
            _myself: ActorRef<M>,
            _message: M,
            seen: &mut Self::State,
        ) -> Result<(), ActorProcessingErr> {
            seen.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    async fn sink<M: ractor::Message>(seen: &Arc<AtomicUsize>) -> ActorRef<M> {
        Actor::spawn(None, Sink(std::marker::PhantomData), seen.clone())
            .await
            .unwrap()
            .0
    }

    fn alive(session: &ActorRef<AgentSessionMsg>) -> bool {
        !matches!(
            session.get_status(),
            ActorStatus::Stopping | ActorStatus::Stopped
        )
    }

    async fn stopped(session: &ActorRef<AgentSessionMsg>) -> bool {
        session
            .get_cell()
            .wait(Some(Duration::from_millis(200)))
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn only_the_newest_session_of_an_agent_instance_stays() {
        let unregistered = Arc::new(AtomicUsize::new(0));
        let mut state = GatewayState {
            accept: tokio::spawn(async {}),
            registry: sink(&unregistered).await,
            next_session: 0,
            sessions: HashMap::new(),
            live_sessions: Arc::default(),
        };
        let ignored = Arc::new(AtomicUsize::new(0));
        let mut refs = Vec::new();
        // Sessions 1, 2 and 5 of `onprem`, 3 of `onprem` as another agent, 4 of `other`.
        for (session_id, service) in [
            (1, "onprem"),
            (2, "onprem"),
            (3, "onprem"),
            (4, "other"),
            (5, "onprem"),
        ] {
            let session: ActorRef<AgentSessionMsg> = sink(&ignored).await;
            state.sessions.insert(
                session.get_id(),
                SessionEntry {
                    service: service.into(),
                    session_id,
                    session: session.clone(),
                    instance: None,
                },
            );
            refs.push(session);
        }
        const A: u64 = 0xA;
        const B: u64 = 0xB;

        state.identified(1, A);
        state.identified(3, B);
        state.identified(4, A);
        for session in &refs {
            assert!(alive(session));
        }

        // Agent A dialed again: its first session goes, nobody else's.
        state.identified(5, A);
        assert!(stopped(&refs[0]).await, "session 1 is stale");
        for kept in [1, 2, 3, 4] {
            assert_eq!(
                refs[kept].get_status(),
                ActorStatus::Running,
                "session {}",
                kept + 1
            );
        }

        // A hello that arrives late on an older connection loses to the newer session.
        state.identified(2, A);
        assert!(stopped(&refs[1]).await, "session 2 is older than session 5");
        assert!(alive(&refs[4]));
        assert_eq!(unregistered.load(Ordering::SeqCst), 2);
    }
}
