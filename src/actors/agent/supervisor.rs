//! AgentSupervisor: the root of the agent's tree. Starts one TargetDialer per declared target,
//! the Session and the Control actor; restarts a failed Session, dialer or Control with backoff
//! and jitter (a Session restart leaves the dialers and their connection pools untouched) and
//! counts every restart.
//!
//! It also owns the live target set: it watches config.ini (and reloads on SIGHUP), validates
//! the whole file again, and only then brings the dialers in line and hands the new set to the
//! Session, which advertises it without reconnecting. A file that does not validate is refused
//! as a whole, in one log line, and the running targets stay.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent,
};
use tokio::net::UnixListener;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use super::backoff::Backoff;
use super::control::{Control, ControlArgs};
use super::dialer::Dialers;
use super::session::{Session, SessionArgs};
use crate::config::agent::AgentConfig;
use crate::forwarding::{LargeBodies, TargetClient};
use crate::messages::agent::{ControlMsg, ReloadStatus, SessionMsg};
use crate::messages::agent::{DialerLimits, TargetSpec};

/// How often config.ini is looked at for a change.
pub const WATCH_EVERY: Duration = Duration::from_secs(1);
/// Restart backoff bounds of a failed Session, dialer or Control.
const RESTART_FIRST: Duration = Duration::from_millis(250);
const RESTART_CAP: Duration = Duration::from_secs(30);
/// A Session that ran this long before failing starts its restart backoff over.
const STABLE_AFTER: Duration = Duration::from_secs(60);

/// Messages of the AgentSupervisor.
pub enum AgentSupervisorMsg {
    /// Start a new Session after a failed one (sent to itself after a backoff delay).
    RespawnSession,
    /// Start again the dialers that are no longer running (after a backoff delay).
    RespawnDialers,
    /// Start a new Control after a failed one (after a backoff delay).
    RespawnControl,
    /// Look whether config.ini changed since it was last read.
    WatchConfig,
    /// Read config.ini again now (SIGHUP).
    Reload,
    /// The current Session, for status queries and shutdown.
    CurrentSession(RpcReplyPort<Option<ActorRef<SessionMsg>>>),
    /// Restart counts per actor.
    Restarts(RpcReplyPort<BTreeMap<String, u64>>),
    /// What the Control actor needs to build a status report.
    Report(RpcReplyPort<ReportParts>),
}

/// What the agent is, as shown by `connect status`. Holds no secret.
#[derive(Debug, Clone, Default)]
pub struct AgentInfo {
    pub agent_name: String,
    pub config: Option<PathBuf>,
    /// The proxy as `scheme://host:port`, credentials left out.
    pub proxy: Option<String>,
}

/// The supervisor's share of a status report; the Control actor asks the Session and the
/// dialers for the rest itself, so the supervisor never waits on them.
pub struct ReportParts {
    pub info: AgentInfo,
    pub hub: String,
    pub session: Option<ActorRef<SessionMsg>>,
    pub dialers: Dialers,
    pub restarts: BTreeMap<String, u64>,
    pub last_reload: Option<ReloadStatus>,
}

/// The control socket the Control actor serves.
pub struct ControlSocket {
    pub path: PathBuf,
    /// Bound already by the caller (so that a second agent on the same state_dir fails at
    /// start); a restarted Control binds again.
    pub listener: Option<UnixListener>,
}

/// What the agent's tree starts from.
pub struct AgentSupervisorArgs {
    pub targets: Vec<TargetSpec>,
    pub limits: DialerLimits,
    /// Session arguments without the dialers, which the supervisor creates.
    pub session: SessionTemplate,
    /// The config.ini to watch for target changes; `None` keeps the targets fixed.
    pub config: Option<AgentConfig>,
    /// Where to serve `connect status`; `None` serves nothing.
    pub control: Option<ControlSocket>,
    pub info: AgentInfo,
}

/// Session arguments known before the dialers exist.
#[derive(Clone)]
pub struct SessionTemplate {
    pub hub: super::session::HubEndpoint,
    pub lookup_hash: String,
    pub psk: [u8; 32],
    pub agent_name: String,
    pub drain_deadline: Duration,
}

/// Identity of a version of config.ini on disk: a change of any part means "read it again".
type Fingerprint = Option<(u64, u64, i64, i64, u64)>;

fn fingerprint(path: &std::path::Path) -> Fingerprint {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino(), m.mtime(), m.mtime_nsec(), m.len()))
}

struct Watch {
    /// The configuration the agent runs with (its targets updated by each good reload).
    running: AgentConfig,
    seen: Fingerprint,
}

/// Supervisor state.
pub struct AgentSupervisorState {
    session_args: SessionArgs,
    session: Option<ActorRef<SessionMsg>>,
    session_started: Instant,
    session_backoff: Backoff,
    dialers: Dialers,
    specs: Vec<TargetSpec>,
    limits: DialerLimits,
    dialer_backoff: Backoff,
    control_path: Option<PathBuf>,
    control: Option<ActorRef<ControlMsg>>,
    control_backoff: Backoff,
    watch: Option<Watch>,
    last_reload: Option<ReloadStatus>,
    info: AgentInfo,
    restarts: BTreeMap<String, u64>,
    sighup: Option<JoinHandle<()>>,
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
        let dialers =
            Dialers::spawn_all(args.targets.clone(), args.limits.clone(), myself.get_cell())
                .await?;
        let t = args.session;
        let session_args = SessionArgs {
            hub: t.hub,
            lookup_hash: t.lookup_hash,
            psk: t.psk,
            agent_name: t.agent_name,
            // Drawn once for the whole tree: a restarted Session is still the same agent.
            instance: rand::random(),
            dialers: dialers.clone(),
            drain_deadline: t.drain_deadline,
        };
        let (session, _) =
            Actor::spawn_linked(None, Session, session_args.clone(), myself.get_cell()).await?;
        let (control_path, control) = match args.control {
            Some(socket) => {
                let control = spawn_control(&myself, socket.path.clone(), socket.listener).await?;
                (Some(socket.path), Some(control))
            }
            None => (None, None),
        };
        let watch = args.config.map(|running| Watch {
            seen: fingerprint(&running.path),
            running,
        });
        let sighup = if watch.is_some() {
            myself.send_interval(WATCH_EVERY, || AgentSupervisorMsg::WatchConfig);
            watch_sighup(&myself)
        } else {
            None
        };
        Ok(AgentSupervisorState {
            session_args,
            session: Some(session),
            session_started: Instant::now(),
            session_backoff: Backoff::new(RESTART_FIRST, RESTART_CAP),
            dialers,
            specs: args.targets,
            limits: args.limits,
            dialer_backoff: Backoff::new(RESTART_FIRST, RESTART_CAP),
            control_path,
            control,
            control_backoff: Backoff::new(RESTART_FIRST, RESTART_CAP),
            watch,
            last_reload: None,
            info: args.info,
            restarts: BTreeMap::new(),
            sighup,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(task) = state.sighup.take() {
            task.abort();
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
            AgentSupervisorMsg::RespawnSession => {
                if state.session.is_none() {
                    state.session_args.dialers = state.dialers.clone();
                    let (session, _) = Actor::spawn_linked(
                        None,
                        Session,
                        state.session_args.clone(),
                        myself.get_cell(),
                    )
                    .await?;
                    state.session = Some(session);
                    state.session_started = Instant::now();
                }
            }
            AgentSupervisorMsg::RespawnDialers => {
                let specs = state.specs.clone();
                match state
                    .dialers
                    .reconcile(specs, state.limits.clone(), myself.get_cell())
                    .await
                {
                    Ok(()) => {
                        state.dialer_backoff.reset();
                        self.hand_dialers_to_session(state);
                    }
                    Err(e) => {
                        let delay = state.dialer_backoff.next_delay();
                        error!("cannot restart a target dialer: {e}; trying again in {delay:?}");
                        myself.send_after(delay, || AgentSupervisorMsg::RespawnDialers);
                    }
                }
            }
            AgentSupervisorMsg::RespawnControl => {
                if let (None, Some(path)) = (&state.control, state.control_path.clone()) {
                    match spawn_control(&myself, path, None).await {
                        Ok(control) => state.control = Some(control),
                        Err(e) => {
                            let delay = state.control_backoff.next_delay();
                            error!(
                                "cannot restart the control socket: {e}; trying again in {delay:?}"
                            );
                            myself.send_after(delay, || AgentSupervisorMsg::RespawnControl);
                        }
                    }
                }
            }
            AgentSupervisorMsg::WatchConfig => {
                let changed = state
                    .watch
                    .as_ref()
                    .is_some_and(|w| fingerprint(&w.running.path) != w.seen);
                if changed {
                    self.reload(&myself, state, "config.ini changed").await;
                }
            }
            AgentSupervisorMsg::Reload => self.reload(&myself, state, "SIGHUP").await,
            AgentSupervisorMsg::CurrentSession(reply) => {
                let _ = reply.send(state.session.clone());
            }
            AgentSupervisorMsg::Restarts(reply) => {
                let _ = reply.send(state.restarts.clone());
            }
            AgentSupervisorMsg::Report(reply) => {
                let _ = reply.send(ReportParts {
                    info: state.info.clone(),
                    hub: state.session_args.hub.url.clone(),
                    session: state.session.clone(),
                    dialers: state.dialers.clone(),
                    restarts: state.restarts.clone(),
                    last_reload: state.last_reload.clone(),
                });
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
        let id = cell.get_id();
        let why = why.lines().next().unwrap_or_default().to_string();
        if is(&state.session, id) {
            state.session = None;
            *state.restarts.entry("session".into()).or_default() += 1;
            if state.session_started.elapsed() >= STABLE_AFTER {
                state.session_backoff.reset();
            }
            let delay = state.session_backoff.next_delay();
            warn!(
                "session ended ({why}); restarting it in {delay:?} (restart #{})",
                state.restarts["session"]
            );
            myself.send_after(delay, || AgentSupervisorMsg::RespawnSession);
        } else if is(&state.control, id) {
            state.control = None;
            *state.restarts.entry("control".into()).or_default() += 1;
            let delay = state.control_backoff.next_delay();
            warn!("control socket ended ({why}); restarting it in {delay:?}");
            myself.send_after(delay, || AgentSupervisorMsg::RespawnControl);
        } else if let Some(name) = state.dialers.name_of(id) {
            // A dialer stopped by a reload was taken out of the set first and lands below.
            *state.restarts.entry(format!("dialer:{name}")).or_default() += 1;
            let delay = state.dialer_backoff.next_delay();
            error!(target_name = %name, "target dialer ended ({why}); restarting it in {delay:?}");
            myself.send_after(delay, || AgentSupervisorMsg::RespawnDialers);
        }
        Ok(())
    }
}

fn is<M>(actor: &Option<ActorRef<M>>, id: ActorId) -> bool {
    actor.as_ref().is_some_and(|a| a.get_id() == id)
}

async fn spawn_control(
    myself: &ActorRef<AgentSupervisorMsg>,
    path: PathBuf,
    listener: Option<UnixListener>,
) -> Result<ActorRef<ControlMsg>, ractor::SpawnErr> {
    let cell: ActorCell = myself.get_cell();
    let args = ControlArgs {
        socket: path,
        listener,
        supervisor: myself.clone(),
    };
    let (control, _) = Actor::spawn_linked(None, Control, args, cell).await?;
    Ok(control)
}

/// Turns each SIGHUP into a reload. `None` when the signal cannot be watched (logged).
fn watch_sighup(myself: &ActorRef<AgentSupervisorMsg>) -> Option<JoinHandle<()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(hup) => hup,
        Err(e) => {
            warn!("cannot watch SIGHUP ({e}); config.ini changes are still picked up within {WATCH_EVERY:?}");
            return None;
        }
    };
    let me = myself.clone();
    Some(tokio::spawn(async move {
        while hup.recv().await.is_some() {
            if me.cast(AgentSupervisorMsg::Reload).is_err() {
                break;
            }
        }
    }))
}

impl AgentSupervisor {
    fn hand_dialers_to_session(&self, state: &mut AgentSupervisorState) {
        state.session_args.dialers = state.dialers.clone();
        if let Some(session) = &state.session {
            let _ = session.cast(SessionMsg::Dialers(state.dialers.clone()));
        }
    }

    /// Reads config.ini again and, when it validates, applies its targets.
    async fn reload(
        &self,
        myself: &ActorRef<AgentSupervisorMsg>,
        state: &mut AgentSupervisorState,
        why: &str,
    ) {
        let Some(watch) = state.watch.as_mut() else {
            return;
        };
        let path = watch.running.path.clone();
        watch.seen = fingerprint(&path);
        let outcome = match AgentConfig::load(&path) {
            Ok(new) => self.apply(myself, state, new).await,
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = &outcome {
            warn!("config.ini reload ({why}) refused, the running targets stay: {e}");
        }
        state.last_reload = Some(ReloadStatus {
            at_unix: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            error: outcome.err(),
        });
    }

    async fn apply(
        &self,
        myself: &ActorRef<AgentSupervisorMsg>,
        state: &mut AgentSupervisorState,
        new: AgentConfig,
    ) -> Result<(), String> {
        let Some(watch) = state.watch.as_mut() else {
            return Ok(());
        };
        let file = new.path.display().to_string();
        let specs: Vec<TargetSpec> = new.targets.values().map(super::run::target_spec).collect();
        // Every target must be usable before any dialer changes: all or nothing.
        for spec in &specs {
            TargetClient::new(
                spec.clone(),
                state.limits.clone(),
                Arc::new(tokio::sync::Semaphore::new(1)),
                LargeBodies::new(&state.limits),
            )
            .map_err(|e| format!("{file}: [target.{}]: {e}", spec.name))?;
        }
        let needs_restart = restart_only_keys(&watch.running, &new);
        if !needs_restart.is_empty() {
            warn!(
                "{file}: {} changed; restart the agent to apply (a reload only changes targets)",
                needs_restart.join(", ")
            );
        }
        watch.running.targets = new.targets;
        if specs == state.specs {
            info!("{file} reloaded; targets unchanged");
            return Ok(());
        }
        let result = state
            .dialers
            .reconcile(specs.clone(), state.limits.clone(), myself.get_cell())
            .await
            .map_err(|e| format!("{file}: {e}"));
        state.specs = specs;
        self.hand_dialers_to_session(state);
        if result.is_ok() {
            let names: Vec<String> = state.specs.iter().map(|s| s.name.clone()).collect();
            info!(targets = ?names, "{file} reloaded; targets applied");
        }
        result
    }
}

/// Keys whose change a reload does not apply.
fn restart_only_keys(running: &AgentConfig, new: &AgentConfig) -> Vec<&'static str> {
    let mut keys = Vec::new();
    if running.service_id != new.service_id {
        keys.push("service_id");
    }
    if running.hub != new.hub {
        keys.push("hub");
    }
    if running.hub_ca != new.hub_ca {
        keys.push("hub_ca");
    }
    if running.proxy != new.proxy {
        keys.push("proxy");
    }
    if running.state_dir != new.state_dir {
        keys.push("state_dir");
    }
    if running.agent_name != new.agent_name {
        keys.push("agent_name");
    }
    keys
}
