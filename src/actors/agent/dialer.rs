//! The TargetDialer actor (one per declared target) and [`Dialers`], the handle the Session
//! uses to reach them.
//!
//! A dialer owns its target's client (connection pool, TLS settings, concurrency bound) and the
//! table of requests in flight. It spawns one [`Forward`] per request, linked to itself, and
//! answers for any Forward that fails, so one bad request never takes the dialer or the tunnel
//! down. It must never dial a target that was not declared locally: [`Dialers::route`] refuses
//! unknown names before any dialer sees them.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, MessagingErr, SpawnErr,
    SupervisionEvent,
};
use tokio::sync::Semaphore;

use super::forward::{AnswerOnce, Forward, ForwardArgs, ForwardCounters, ForwardMsg};
use crate::forwarding::{LargeBodies, TargetClient};
use crate::logging::untrusted;
use crate::messages::agent::{DialerLimits, DialerMsg, ResponseSink, TargetSpec, TargetStats};
use crate::messages::{ForwardError, ForwardRequest, ForwardResponse, TargetInfo};

/// How long [`Dialers::stats`] waits for one dialer.
const STATS_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest failure detail kept from a panic message.
const MAX_DETAIL: usize = 300;

/// The dialer actor. All its data is in [`DialerState`].
#[derive(Debug, Default)]
pub struct TargetDialer;

/// Start arguments of a dialer.
#[derive(Debug, Clone)]
pub struct DialerArgs {
    pub spec: TargetSpec,
    pub limits: DialerLimits,
    /// Shared by every dialer of the agent.
    pub large_bodies: LargeBodies,
}

struct InFlight {
    actor: ActorRef<ForwardMsg>,
    reply: ResponseSink,
    answer: Arc<AnswerOnce>,
    /// Size of the request body this entry holds, for [`DialerState::queued_bytes`].
    body_len: usize,
}

/// A dialer's live state.
pub struct DialerState {
    limits: DialerLimits,
    permits: Arc<Semaphore>,
    large_bodies: LargeBodies,
    client: Arc<TargetClient>,
    counters: Arc<ForwardCounters>,
    in_flight: HashMap<u64, InFlight>,
    by_actor: HashMap<ActorId, u64>,
    /// Sum of the request bodies of the entries in `in_flight`.
    queued_bytes: usize,
    forward_restarts: u64,
}

impl DialerState {
    fn name(&self) -> &str {
        &self.client.spec().name
    }

    /// Answers request `id` with `error` (and counts it) unless someone already answered.
    fn answer_error(
        &self,
        id: u64,
        reply: &ResponseSink,
        answer: &AnswerOnce,
        error: ForwardError,
    ) {
        if answer.claim() {
            self.counters.record_error(&error);
            let _ = reply.send(ForwardResponse {
                id,
                result: Err(error),
            });
        }
    }

    /// Requests accepted and neither answered nor cancelled. An entry whose answer is claimed
    /// stays in the table until its Forward has ended (the dialer learns of that through
    /// supervision, a moment later), but it is no longer in flight.
    fn in_flight_count(&self) -> usize {
        self.in_flight
            .values()
            .filter(|f| !f.answer.is_claimed())
            .count()
    }

    /// Takes request `id` out of the table when actor `actor` is the one working on it: a
    /// request of the same id accepted after the first was answered or cancelled (the next
    /// tunnel numbers its requests from 1 again) belongs to another Forward.
    fn remove_if_run_by(&mut self, id: u64, actor: ActorId) -> Option<InFlight> {
        match self.in_flight.get(&id) {
            Some(in_flight) if in_flight.actor.get_id() == actor => {
                let removed = self.in_flight.remove(&id)?;
                self.queued_bytes -= removed.body_len;
                Some(removed)
            }
            _ => None,
        }
    }

    /// Puts a started Forward in the table. An entry of the same id still there has been
    /// answered or cancelled (checked before starting): its Forward is ending and is no longer
    /// looked up by id.
    fn insert(&mut self, id: u64, in_flight: InFlight) {
        self.queued_bytes += in_flight.body_len;
        if let Some(old) = self.in_flight.insert(id, in_flight) {
            self.queued_bytes -= old.body_len;
        }
    }

    /// Why a request of `body_len` bytes cannot be taken now, if it cannot. Entries whose
    /// Forward is still ending count too: their memory is not free yet.
    fn over_queue_bound(&self, body_len: usize) -> Option<ForwardError> {
        let full = self.in_flight.len() >= self.limits.max_queued
            || self.queued_bytes.saturating_add(body_len) > self.limits.max_queued_bytes;
        full.then(|| ForwardError::Busy {
            name: self.name().to_owned(),
            queued: u32::try_from(self.in_flight.len()).unwrap_or(u32::MAX),
        })
    }

    fn stats(&self) -> TargetStats {
        let spec = self.client.spec();
        let (forwarded, errors, last_error) = self.counters.snapshot();
        TargetStats {
            name: spec.name.clone(),
            addr: spec.addr.clone(),
            tls: spec.tls.to_string(),
            in_flight: self.in_flight_count(),
            forwarded,
            errors,
            last_error,
            forward_restarts: self.forward_restarts,
        }
    }

    async fn start_forward(
        &mut self,
        myself: &ActorRef<DialerMsg>,
        request: ForwardRequest,
        reply: ResponseSink,
    ) {
        let id = request.id;
        let answer = Arc::new(AnswerOnce::default());
        if self
            .in_flight
            .get(&id)
            .is_some_and(|f| !f.answer.is_claimed())
        {
            let error = ForwardError::Refused {
                reason: format!(
                    "request id {id} is already in flight on target `{}`",
                    self.name()
                ),
            };
            self.answer_error(id, &reply, &answer, error);
            return;
        }
        let body_len = request.body.len();
        if let Some(error) = self.over_queue_bound(body_len) {
            tracing::warn!(request_id = id, target_name = %self.name(), queued = self.in_flight.len(), "request refused: too many requests held for this target");
            self.answer_error(id, &reply, &answer, error);
            return;
        }
        let args = ForwardArgs {
            request,
            reply: reply.clone(),
            client: self.client.clone(),
            answer: answer.clone(),
            counters: self.counters.clone(),
        };
        match Forward::spawn_linked(None, Forward, args, myself.get_cell()).await {
            Ok((actor, _)) => {
                self.by_actor.insert(actor.get_id(), id);
                self.insert(
                    id,
                    InFlight {
                        actor,
                        reply,
                        answer,
                        body_len,
                    },
                );
            }
            Err(e) => {
                let detail = one_line(&format!("cannot start a forward: {e}"));
                tracing::error!(request_id = id, target_name = %self.name(), detail = %detail, "forward not started");
                self.answer_error(id, &reply, &answer, ForwardError::Internal { detail });
            }
        }
    }
}

/// First line of `text`, bounded, so a panic message never brings a backtrace along.
fn one_line(text: &str) -> String {
    let line = text.lines().next().unwrap_or_default().trim();
    if line.len() <= MAX_DETAIL {
        return line.to_owned();
    }
    let mut cut = MAX_DETAIL;
    while !line.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}…", &line[..cut])
}

impl Actor for TargetDialer {
    type Msg = DialerMsg;
    type State = DialerState;
    type Arguments = DialerArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        DialerArgs {
            spec,
            limits,
            large_bodies,
        }: DialerArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let permits = Arc::new(Semaphore::new(limits.max_in_flight.max(1)));
        let client =
            TargetClient::new(spec, limits.clone(), permits.clone(), large_bodies.clone())?;
        let spec = client.spec();
        tracing::info!(
            target_name = %spec.name,
            addr = %spec.addr,
            tls = %spec.tls,
            skip_tls_check_allowed = spec.insecure_allow_skip_tls_check,
            "target dialer started"
        );
        Ok(DialerState {
            limits,
            permits,
            large_bodies,
            client: Arc::new(client),
            counters: Arc::default(),
            in_flight: HashMap::new(),
            by_actor: HashMap::new(),
            queued_bytes: 0,
            forward_restarts: 0,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: DialerMsg,
        state: &mut DialerState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            DialerMsg::Forward { request, reply } => {
                state.start_forward(&myself, request, reply).await;
            }
            DialerMsg::Cancel { id } => match state.in_flight.get(&id) {
                Some(in_flight) => {
                    // Claim the answer first so the Forward's termination sends nothing.
                    in_flight.answer.claim();
                    in_flight.actor.kill();
                    tracing::debug!(request_id = id, target_name = %state.name(), "request cancelled");
                }
                None => {
                    tracing::debug!(request_id = id, target_name = %state.name(), "cancel for a request not in flight here")
                }
            },
            DialerMsg::Stats(port) => {
                let _ = port.send(state.stats());
            }
            DialerMsg::Update(spec) => {
                if spec == *state.client.spec() {
                    return Ok(());
                }
                match TargetClient::new(
                    spec,
                    state.limits.clone(),
                    state.permits.clone(),
                    state.large_bodies.clone(),
                ) {
                    Ok(client) => {
                        let spec = client.spec();
                        tracing::info!(
                            target_name = %spec.name,
                            addr = %spec.addr,
                            tls = %spec.tls,
                            skip_tls_check_allowed = spec.insecure_allow_skip_tls_check,
                            "target declaration updated"
                        );
                        state.client = Arc::new(client);
                    }
                    Err(e) => {
                        tracing::error!(target_name = %state.name(), error = %e, "target update rejected; keeping the previous declaration");
                        state.counters.set_last_error(e.to_string());
                    }
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut DialerState,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorFailed(cell, err) => {
                let Some(id) = state.by_actor.remove(&cell.get_id()) else {
                    return Ok(());
                };
                state.forward_restarts += 1;
                let detail = one_line(&format!("forward of request {id} failed: {err}"));
                tracing::warn!(request_id = id, target_name = %state.name(), detail = %detail, "forward failed; answering with an internal error");
                if let Some(in_flight) = state.remove_if_run_by(id, cell.get_id()) {
                    state.answer_error(
                        id,
                        &in_flight.reply,
                        &in_flight.answer,
                        ForwardError::Internal { detail },
                    );
                }
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                let Some(id) = state.by_actor.remove(&cell.get_id()) else {
                    return Ok(());
                };
                if let Some(in_flight) = state.remove_if_run_by(id, cell.get_id()) {
                    let detail = format!(
                        "forward of request {id} ended without an answer ({})",
                        reason.as_deref().unwrap_or("no reason given")
                    );
                    state.answer_error(
                        id,
                        &in_flight.reply,
                        &in_flight.answer,
                        ForwardError::Internal { detail },
                    );
                }
            }
            _ => {}
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut DialerState,
    ) -> Result<(), ActorProcessingErr> {
        for (id, in_flight) in state.in_flight.drain() {
            if in_flight.answer.claim() {
                let _ = in_flight.reply.send(ForwardResponse {
                    id,
                    result: Err(ForwardError::ShuttingDown),
                });
            }
            in_flight.actor.kill();
        }
        tracing::info!(target_name = %state.client.spec().name, "target dialer stopped");
        Ok(())
    }
}

/// The agent's dialers by target name: what the Session routes requests through. Cheap to
/// clone; every clone reaches the same actors.
#[derive(Debug, Clone, Default)]
pub struct Dialers {
    by_name: BTreeMap<String, ActorRef<DialerMsg>>,
    /// The large-body slots every dialer of this set shares; made with the first dialer.
    large_bodies: Option<LargeBodies>,
}

async fn spawn_dialer(
    spec: TargetSpec,
    limits: DialerLimits,
    large_bodies: LargeBodies,
    supervisor: ActorCell,
) -> Result<ActorRef<DialerMsg>, SpawnErr> {
    let args = DialerArgs {
        spec,
        limits,
        large_bodies,
    };
    let (actor, _) = TargetDialer::spawn_linked(None, TargetDialer, args, supervisor).await?;
    Ok(actor)
}

impl Dialers {
    /// Starts one dialer per target, each linked to `supervisor`. A target declared twice, or
    /// one whose TLS settings are unusable, fails the whole set (and stops what was started).
    pub async fn spawn_all(
        specs: Vec<TargetSpec>,
        limits: DialerLimits,
        supervisor: ActorCell,
    ) -> Result<Dialers, SpawnErr> {
        let mut dialers = Dialers::default();
        if let Err(e) = dialers.reconcile(specs, limits, supervisor).await {
            dialers.stop_all();
            return Err(e);
        }
        Ok(dialers)
    }

    /// Brings the set in line with `specs`: new targets get a dialer, changed ones an
    /// [`DialerMsg::Update`], removed ones are stopped (their in-flight requests are answered
    /// with `ShuttingDown`). Dialers that are no longer running are started again. On error the
    /// targets handled so far keep their new state and the rest are unchanged.
    pub async fn reconcile(
        &mut self,
        specs: Vec<TargetSpec>,
        limits: DialerLimits,
        supervisor: ActorCell,
    ) -> Result<(), SpawnErr> {
        let mut seen = std::collections::BTreeSet::new();
        for spec in &specs {
            if !seen.insert(spec.name.clone()) {
                return Err(SpawnErr::StartupFailed(
                    format!(
                        "target `{}` is declared twice; keep one [target.{}] section",
                        spec.name, spec.name
                    )
                    .into(),
                ));
            }
        }
        let large_bodies = self
            .large_bodies
            .get_or_insert_with(|| LargeBodies::new(&limits))
            .clone();
        let removed: Vec<String> = self
            .by_name
            .keys()
            .filter(|name| !seen.contains(*name))
            .cloned()
            .collect();
        for name in removed {
            if let Some(actor) = self.by_name.remove(&name) {
                actor.stop(Some("target removed".to_owned()));
            }
        }
        for spec in specs {
            let running = self
                .by_name
                .get(&spec.name)
                .filter(|a| ractor::ACTIVE_STATES.contains(&a.get_status()))
                .cloned();
            // A running dialer takes the update; one that is gone (or stops as the update
            // arrives, handing it back) is replaced by a new one.
            let spec = match running {
                Some(actor) => match actor.send_message(DialerMsg::Update(spec)) {
                    Err(MessagingErr::SendErr(DialerMsg::Update(spec))) => spec,
                    _ => continue,
                },
                None => spec,
            };
            let name = spec.name.clone();
            let actor = spawn_dialer(
                spec,
                limits.clone(),
                large_bodies.clone(),
                supervisor.clone(),
            )
            .await?;
            self.by_name.insert(name, actor);
        }
        Ok(())
    }

    /// Hands `request` to its target's dialer; the outcome arrives on `reply`. A target not
    /// declared here is answered at once with [`ForwardError::UndeclaredTarget`], and nothing is
    /// dialed.
    pub fn route(&self, request: ForwardRequest, reply: ResponseSink) {
        let id = request.id;
        let Some(dialer) = self.by_name.get(&request.target) else {
            // The name is the hub's, unchecked: it must not be able to forge log lines.
            tracing::warn!(request_id = id, target_name = %untrusted(&request.target), "request for an undeclared target refused");
            let _ = reply.send(ForwardResponse {
                id,
                result: Err(ForwardError::UndeclaredTarget {
                    name: request.target,
                }),
            });
            return;
        };
        if let Err(MessagingErr::SendErr(DialerMsg::Forward { request, reply })) =
            dialer.send_message(DialerMsg::Forward { request, reply })
        {
            tracing::warn!(request_id = id, target_name = %request.target, "target dialer is not running");
            let _ = reply.send(ForwardResponse {
                id,
                result: Err(ForwardError::ShuttingDown),
            });
        }
    }

    /// Cancels request `id` wherever it runs (the hub's Cancel frame names no target).
    pub fn cancel(&self, id: u64) {
        for dialer in self.by_name.values() {
            let _ = dialer.send_message(DialerMsg::Cancel { id });
        }
    }

    /// The large-body slots shared by every dialer of this set (none before the first dialer).
    pub fn large_bodies(&self) -> Option<&LargeBodies> {
        self.large_bodies.as_ref()
    }

    /// The target whose dialer is actor `id`, if it is one of this set.
    pub fn name_of(&self, id: ActorId) -> Option<String> {
        self.by_name
            .iter()
            .find(|(_, actor)| actor.get_id() == id)
            .map(|(name, _)| name.clone())
    }

    /// The targets to advertise to the hub, sorted by name.
    pub fn targets(&self) -> Vec<TargetInfo> {
        self.by_name
            .keys()
            .map(|name| TargetInfo { name: name.clone() })
            .collect()
    }

    /// Live counters of every dialer, sorted by name. A dialer that does not answer within two
    /// seconds is listed with that as its last error.
    pub async fn stats(&self) -> Vec<TargetStats> {
        let mut all = Vec::with_capacity(self.by_name.len());
        for (name, dialer) in &self.by_name {
            let answer = dialer.call(DialerMsg::Stats, Some(STATS_TIMEOUT)).await;
            match answer {
                Ok(CallResult::Success(stats)) => all.push(stats),
                _ => all.push(TargetStats {
                    name: name.clone(),
                    addr: String::new(),
                    tls: String::new(),
                    in_flight: 0,
                    forwarded: 0,
                    errors: 0,
                    last_error: Some("target dialer is not responding".to_owned()),
                    forward_restarts: 0,
                }),
            }
        }
        all
    }

    /// Stops every dialer (in-flight requests are answered with `ShuttingDown`).
    pub fn stop_all(&self) {
        for dialer in self.by_name.values() {
            dialer.stop(None);
        }
    }
}
