//! Session: the agent's tunnel to the hub. Dials out (TCP, TLS, websocket upgrade naming the
//! service by lookup hash), runs the key exchange through a KeyExchange child, says hello with
//! the declared targets, hands each request to the dialers and sends their responses back,
//! pings the hub, and reconnects with exponential backoff and jitter when anything breaks.
//!
//! It never forwards a request itself and never sends the service id: only its hash and the
//! Noise handshake, which proves knowledge of the id without revealing it. Connection attempts
//! run in a task of their own, so the Session answers status queries and a shutdown while the
//! hub is slow or unreachable. Requests of a tunnel that is lost are cancelled at their
//! dialers: nobody is left to receive their answers, and the next tunnel's ids start over.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::backoff::Backoff;
use super::dialer::Dialers;
use crate::actors::key_exchange::{
    Established, KeyExchange, KeyExchangeArgs, KeyExchangeMsg, Role,
};
use crate::logging::untrusted;
use crate::messages::agent::{HandshakeInfo, SessionMsg, SessionPhase, SessionStatus};
use crate::messages::liveness::{self, CHECK_EVERY, DEAD_AFTER, PING_EVERY};
use crate::messages::{ForwardError, ForwardResponse, Frame, LinkEvent, PROTOCOL_VERSION};
pub use crate::net::dial::HubEndpoint;
use crate::net::link::Link;
use crate::net::Ws;
use crate::tunnel;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Backoff bounds between reconnection attempts.
const BACKOFF_FIRST: Duration = Duration::from_millis(250);
const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// During the first minute of an outage attempts stay at most this far apart, so a hub that
/// restarts (the usual outage) has its agents back within seconds; after that the full cap
/// spares a hub that is down for long.
const FAST_RETRY_CAP: Duration = Duration::from_secs(3);
const FAST_RETRY_WINDOW: Duration = Duration::from_secs(60);
/// How long the last frames get to leave when the tunnel is closed on purpose.
const CLOSE_FLUSH: Duration = Duration::from_secs(2);
/// How often a shutdown looks whether the requests in flight have drained.
const DRAIN_POLL: Duration = Duration::from_millis(20);
/// Default time requests in flight get to finish once the agent is stopping.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// What a Session starts from.
#[derive(Clone)]
pub struct SessionArgs {
    pub hub: HubEndpoint,
    pub lookup_hash: String,
    pub psk: [u8; 32],
    pub agent_name: String,
    /// This agent process's instance id, sent in every hello (see `Frame::Hello`).
    pub instance: u64,
    pub dialers: Dialers,
    /// How long requests in flight may take to finish once a shutdown began.
    pub drain_deadline: Duration,
}

/// The Session actor.
pub struct Session;

/// Ids of the requests received on one tunnel and not answered yet. The Session adds an id
/// when it routes the request; the response pump removes it once the response is queued on
/// the link, so an empty set means every answer is on its way.
type InFlight = Arc<Mutex<HashSet<u64>>>;

fn lock(set: &InFlight) -> std::sync::MutexGuard<'_, HashSet<u64>> {
    set.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One live connection. Dropping it (tunnel lost, Session stopped, killed or failed) cancels,
/// at their dialers, the requests still in flight on it: nobody is left to receive their
/// answers, and the next tunnel numbers its requests from 1 again.
struct Connection {
    generation: u64,
    /// The dialers its requests went to (kept in step with the Session's).
    dialers: Dialers,
    link: Link,
    pump: JoinHandle<()>,
    responses: mpsc::UnboundedSender<ForwardResponse>,
    in_flight: InFlight,
    welcomed: bool,
    since: SystemTime,
    last_heard: Instant,
    last_ping: Instant,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.pump.abort();
        let ids: Vec<u64> = lock(&self.in_flight).drain().collect();
        if !ids.is_empty() {
            debug!(
                count = ids.len(),
                "cancelling the requests of a closed tunnel"
            );
        }
        for id in ids {
            self.dialers.cancel(id);
        }
    }
}

/// A shutdown under way.
struct Stopping {
    reply: Option<RpcReplyPort<()>>,
    deadline: Instant,
}

/// Session state across connections.
pub struct SessionState {
    args: SessionArgs,
    conn: Option<Connection>,
    /// Number of the connection attempt under way or last made.
    attempt: u64,
    attempting: bool,
    generation: u64,
    backoff: Backoff,
    /// When the hub was last lost (or first tried), while no tunnel is welcomed.
    outage_since: Option<Instant>,
    ping_seq: u64,
    status: SessionStatus,
    stopping: Option<Stopping>,
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
        myself.send_interval(CHECK_EVERY, || SessionMsg::Heartbeat);
        let status = SessionStatus {
            hub: args.hub.url.clone(),
            ..Default::default()
        };
        Ok(SessionState {
            args,
            conn: None,
            attempt: 0,
            attempting: false,
            generation: 0,
            backoff: Backoff::new(BACKOFF_FIRST, BACKOFF_CAP),
            outage_since: Some(Instant::now()),
            ping_seq: 0,
            status,
            stopping: None,
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
                if state.conn.is_none() && !state.attempting && state.stopping.is_none() {
                    self.start_attempt(&myself, state);
                }
            }
            SessionMsg::Attempted {
                attempt,
                took,
                result,
            } => {
                if attempt == state.attempt {
                    state.attempting = false;
                    self.attempted(&myself, state, took, result);
                }
            }
            SessionMsg::Link { generation, event } => {
                let current = state.conn.as_ref().map(|c| c.generation);
                if current != Some(generation) {
                    return Ok(());
                }
                match event {
                    LinkEvent::Frame(frame) => self.on_frame(&myself, state, frame),
                    LinkEvent::Closed(why) => self.lost(&myself, state, why).await,
                }
            }
            SessionMsg::Heartbeat => self.heartbeat(&myself, state).await,
            SessionMsg::Dialers(dialers) => {
                state.args.dialers = dialers;
                let targets = state.args.dialers.targets();
                if let Some(conn) = state.conn.as_mut() {
                    conn.dialers = state.args.dialers.clone();
                }
                match &state.conn {
                    Some(conn) if conn.welcomed && state.stopping.is_none() => {
                        info!(targets = ?names(&targets), "advertising the new target set to the hub");
                        conn.link.send(Frame::Targets { targets });
                    }
                    // The next hello carries the new set.
                    _ => {}
                }
            }
            SessionMsg::Shutdown(reply) => {
                if state.stopping.is_some() {
                    let _ = reply.send(());
                    return Ok(());
                }
                state.stopping = Some(Stopping {
                    reply: Some(reply),
                    deadline: Instant::now() + state.args.drain_deadline,
                });
                if let Some(conn) = &state.conn {
                    state.status.phase = SessionPhase::Draining;
                    if conn.welcomed {
                        // First of all, so the hub routes nothing more here.
                        conn.link.send(Frame::Goodbye {
                            reason: "agent stopping".into(),
                        });
                    }
                    let waiting = lock(&conn.in_flight).len();
                    info!(
                        in_flight = waiting,
                        "goodbye sent to the hub; letting requests in flight finish"
                    );
                }
                self.drain(&myself, state).await;
            }
            SessionMsg::Drain => self.drain(&myself, state).await,
            SessionMsg::State(reply) => {
                state.status.in_flight = state
                    .conn
                    .as_ref()
                    .map(|c| lock(&c.in_flight).len())
                    .unwrap_or(0);
                let _ = reply.send(state.status.clone());
            }
        }
        Ok(())
    }
}

fn names(targets: &[crate::messages::TargetInfo]) -> Vec<&str> {
    targets.iter().map(|t| t.name.as_str()).collect()
}

impl Session {
    /// Starts connection attempt `state.attempt + 1` in a task of its own; its outcome arrives
    /// as [`SessionMsg::Attempted`].
    fn start_attempt(&self, myself: &ActorRef<SessionMsg>, state: &mut SessionState) {
        state.attempt += 1;
        state.attempting = true;
        state.status.phase = SessionPhase::Connecting;
        let attempt = state.attempt;
        let args = state.args.clone();
        let me = myself.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let result = establish(&me, &args).await.map(Box::new);
            let _ = me.cast(SessionMsg::Attempted {
                attempt,
                took: started.elapsed(),
                result,
            });
        });
    }

    fn attempted(
        &self,
        myself: &ActorRef<SessionMsg>,
        state: &mut SessionState,
        took: Duration,
        result: Result<Box<Established>, String>,
    ) {
        let hub = state.args.hub.url.clone();
        state.status.last_handshake = Some(HandshakeInfo {
            at_unix: unix_secs(SystemTime::now()),
            duration_ms: took.as_millis() as u64,
            error: result.as_ref().err().cloned(),
        });
        if state.stopping.is_some() {
            // A tunnel that finished opening after the shutdown began is dropped unused.
            return;
        }
        let established = match result {
            Ok(established) => *established,
            Err(why) => {
                state.status.last_error = Some(why.clone());
                state.status.phase = SessionPhase::Retrying;
                let delay = self.retry_delay(state);
                warn!(hub = %hub, "cannot connect to the hub: {why}; retrying in {delay:?}");
                myself.send_after(delay, || SessionMsg::Connect);
                return;
            }
        };
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
        let in_flight: InFlight = Arc::default();
        let sender = link.sender();
        let pump = {
            let in_flight = in_flight.clone();
            tokio::spawn(async move {
                while let Some(response) = rx.recv().await {
                    let id = response.id;
                    let sent = sender.send(Frame::Response(response));
                    lock(&in_flight).remove(&id);
                    if !sent {
                        break;
                    }
                }
            })
        };
        link.send(Frame::Hello {
            version: PROTOCOL_VERSION,
            agent_name: state.args.agent_name.clone(),
            instance: state.args.instance,
            targets: state.args.dialers.targets(),
        });
        state.conn = Some(Connection {
            generation,
            dialers: state.args.dialers.clone(),
            link,
            pump,
            responses,
            in_flight,
            welcomed: false,
            since: SystemTime::now(),
            last_heard: Instant::now(),
            last_ping: Instant::now(),
        });
        debug!(hub = %hub, "tunnel established, waiting for the hub's welcome");
    }

    fn retry_delay(&self, state: &mut SessionState) -> Duration {
        let outage = state
            .outage_since
            .get_or_insert_with(Instant::now)
            .elapsed();
        retry_delay(&mut state.backoff, outage)
    }

    async fn heartbeat(&self, myself: &ActorRef<SessionMsg>, state: &mut SessionState) {
        let Some(conn) = state.conn.as_mut() else {
            return;
        };
        let silent = conn.last_heard.elapsed();
        if liveness::is_dead(silent) {
            let why = format!(
                "no word from the hub for {:.1} s (limit {DEAD_AFTER:?})",
                silent.as_secs_f64()
            );
            self.lost(myself, state, why).await;
        } else if conn.last_ping.elapsed() >= PING_EVERY {
            conn.last_ping = Instant::now();
            state.ping_seq += 1;
            conn.link.send(Frame::Ping {
                seq: state.ping_seq,
                sent_micros: now_micros(),
            });
        }
    }

    async fn lost(&self, myself: &ActorRef<SessionMsg>, state: &mut SessionState, why: String) {
        state.conn = None;
        state.status.connected = false;
        state.status.connected_since_unix = None;
        if state.stopping.is_some() {
            self.drain(myself, state).await;
            return;
        }
        state.status.last_error = Some(why.clone());
        state.status.phase = SessionPhase::Retrying;
        state.outage_since.get_or_insert_with(Instant::now);
        let delay = self.retry_delay(state);
        warn!(hub = %state.args.hub.url, "tunnel lost: {why}; reconnecting in {delay:?}");
        myself.send_after(delay, || SessionMsg::Connect);
    }

    /// During a shutdown: once nothing is in flight any more (or the deadline passed, or the
    /// tunnel is gone), answers what is left with `ShuttingDown`, closes the tunnel and replies
    /// to the shutdown. Otherwise looks again shortly.
    async fn drain(&self, myself: &ActorRef<SessionMsg>, state: &mut SessionState) {
        let Some(stopping) = state.stopping.as_mut() else {
            return;
        };
        if let Some(conn) = state.conn.as_mut() {
            let waiting: Vec<u64> = lock(&conn.in_flight).iter().copied().collect();
            let overdue = Instant::now() >= stopping.deadline;
            if !waiting.is_empty() && !overdue {
                myself.send_after(DRAIN_POLL, || SessionMsg::Drain);
                return;
            }
            if !waiting.is_empty() {
                warn!(
                    count = waiting.len(),
                    "requests still in flight at the stop deadline; answering them as shutting down"
                );
                for id in waiting {
                    state.args.dialers.cancel(id);
                    conn.link.send(Frame::Response(ForwardResponse {
                        id,
                        result: Err(ForwardError::ShuttingDown),
                    }));
                }
                lock(&conn.in_flight).clear();
            }
            conn.link.close(CLOSE_FLUSH).await;
        }
        state.conn = None;
        state.status.connected = false;
        state.status.connected_since_unix = None;
        state.status.phase = SessionPhase::Stopped;
        if let Some(reply) = stopping.reply.take() {
            let _ = reply.send(());
        }
    }

    fn on_frame(&self, myself: &ActorRef<SessionMsg>, state: &mut SessionState, frame: Frame) {
        let Some(conn) = state.conn.as_mut() else {
            return;
        };
        conn.last_heard = Instant::now();
        state.status.last_heard_unix_ms = Some(now_micros() / 1000);
        match frame {
            Frame::Welcome {
                version,
                session_id,
            } => {
                if version != PROTOCOL_VERSION {
                    let why =
                        format!("hub speaks protocol {version}, agent speaks {PROTOCOL_VERSION}");
                    let me = myself.clone();
                    let _ = me.cast(SessionMsg::Link {
                        generation: conn.generation,
                        event: LinkEvent::Closed(why),
                    });
                    return;
                }
                conn.welcomed = true;
                state.backoff.reset();
                state.outage_since = None;
                state.status.connected = true;
                state.status.connects += 1;
                state.status.last_error = None;
                state.status.connected_since_unix = Some(unix_secs(conn.since));
                if state.stopping.is_none() {
                    state.status.phase = SessionPhase::Connected;
                }
                info!(hub = %state.args.hub.url, session = session_id, "connected to the hub");
            }
            Frame::Request(request) => {
                if state.stopping.is_some() {
                    conn.link.send(Frame::Response(ForwardResponse {
                        id: request.id,
                        result: Err(ForwardError::ShuttingDown),
                    }));
                } else if conn.welcomed {
                    lock(&conn.in_flight).insert(request.id);
                    state.args.dialers.route(request, conn.responses.clone());
                }
            }
            Frame::Cancel { id } => {
                lock(&conn.in_flight).remove(&id);
                state.args.dialers.cancel(id);
            }
            Frame::Ping { seq, sent_micros } => {
                conn.link.send(Frame::Pong { seq, sent_micros });
            }
            Frame::Pong { sent_micros, .. } => {
                state.status.last_rtt_micros = Some(now_micros().saturating_sub(sent_micros));
            }
            Frame::Goodbye { reason } => {
                let _ = myself.cast(SessionMsg::Link {
                    generation: conn.generation,
                    event: LinkEvent::Closed(format!(
                        "the hub closed the session: {}",
                        untrusted(&reason)
                    )),
                });
            }
            Frame::Hello { .. } | Frame::Targets { .. } | Frame::Response(_) => {
                let _ = myself.cast(SessionMsg::Link {
                    generation: conn.generation,
                    event: LinkEvent::Closed("the hub sent an agent-only frame".into()),
                });
            }
        }
    }
}

/// The delay before the next attempt, `outage` into an outage: at most [`FAST_RETRY_CAP`]
/// during the first [`FAST_RETRY_WINDOW`], then growing to [`BACKOFF_CAP`].
fn retry_delay(backoff: &mut Backoff, outage: Duration) -> Duration {
    let cap = if outage < FAST_RETRY_WINDOW {
        FAST_RETRY_CAP
    } else {
        BACKOFF_CAP
    };
    backoff.next_delay_capped(cap)
}

/// TCP, TLS, websocket upgrade and key exchange.
async fn establish(
    myself: &ActorRef<SessionMsg>,
    args: &SessionArgs,
) -> Result<Established, String> {
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

/// Opens the websocket to the hub, directly or through the configured proxy (`crate::net`).
async fn dial(hub: &HubEndpoint, lookup_hash: &str) -> Result<Ws, String> {
    hub.dial(lookup_hash, CONNECT_TIMEOUT)
        .await
        .map_err(|e| e.to_string())
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hub that restarts is found again within seconds however many attempts failed while
    /// it was down; a hub that stays away is tried less and less often, up to the cap.
    #[test]
    fn retries_stay_quick_in_the_first_minute_then_back_off_to_the_cap() {
        let mut backoff = Backoff::new(BACKOFF_FIRST, BACKOFF_CAP);
        let mut outage = Duration::ZERO;
        while outage < FAST_RETRY_WINDOW {
            let delay = retry_delay(&mut backoff, outage);
            assert!(delay <= FAST_RETRY_CAP, "{delay:?} at {outage:?}");
            outage += delay;
        }
        let later: Vec<Duration> = (0..5)
            .map(|_| retry_delay(&mut backoff, FAST_RETRY_WINDOW * 2))
            .collect();
        assert!(later.iter().all(|d| *d <= BACKOFF_CAP), "{later:?}");
        assert!(later.iter().all(|d| *d >= BACKOFF_CAP / 2), "{later:?}");
    }
}
