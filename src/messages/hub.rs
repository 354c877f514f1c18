//! Messages between the hub's actors: gateway, agent sessions, registry, reconcilers.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ractor::{ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};

use super::{HttpResponse, LinkEvent, Scheme, TargetInfo};
use crate::actors::hub::health::{AgentHealth, Health, InFlight};
use crate::net::Ws;
use crate::scim::sync::GroupCounts;
use crate::scim::transport::TransportError;

/// One request to send through some agent of a service; the agent session assigns the id.
#[derive(Debug, Clone)]
pub struct TunnelRequest {
    pub target: String,
    pub scheme: Scheme,
    pub host: String,
    pub method: String,
    pub path_and_query: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    pub skip_tls_verify: bool,
    pub timeout: Duration,
}

/// Where the answer to a [`TunnelRequest`] goes.
pub type TunnelReply = RpcReplyPort<Result<HttpResponse, TransportError>>;

/// Messages of the Gateway (accepts agent connections).
pub enum GatewayMsg {
    /// A websocket was accepted for a known, enabled service; start an AgentSession for it.
    Accepted {
        /// Boxed: the websocket is large, and the other variants travel more often.
        ws: Box<Ws>,
        service: String,
        psk: [u8; 32],
        prologue: Vec<u8>,
        peer: String,
    },
    /// Session `session_id` said hello as agent `instance` of its service: any older session of
    /// the same instance is stale and goes at once.
    Identified { session_id: u64, instance: u64 },
}

/// Messages of an AgentSession (one per connected agent).
pub enum AgentSessionMsg {
    /// Something happened on the tunnel.
    Link(LinkEvent),
    /// Send a request to this agent. `ticket` counts it in flight on this agent until the
    /// request ends, however it ends.
    Forward {
        request: TunnelRequest,
        reply: TunnelReply,
        ticket: InFlight,
    },
    /// The hub stops waiting for request `id`.
    Expire { id: u64 },
    /// Time to ping and to check that the agent is still alive.
    Heartbeat,
}

/// A connected agent as the registry sees it.
#[derive(Clone)]
pub struct AgentEntry {
    pub session_id: u64,
    pub agent_name: String,
    pub peer: String,
    pub targets: Vec<TargetInfo>,
    pub connected_at: SystemTime,
    pub session: ActorRef<AgentSessionMsg>,
    /// Written by the session, read by the registry to route and to report.
    pub health: Arc<AgentHealth>,
}

/// Messages of the Registry (services, connected agents, routing).
pub enum RegistryMsg {
    Register {
        service: String,
        agent: AgentEntry,
    },
    UpdateTargets {
        service: String,
        session_id: u64,
        targets: Vec<TargetInfo>,
    },
    Unregister {
        service: String,
        session_id: u64,
    },
    /// Route a request to an agent of `service` that advertises `request.target`.
    Route {
        service: String,
        request: TunnelRequest,
        reply: TunnelReply,
    },
    Snapshot(RpcReplyPort<Vec<ServiceStatus>>),
    /// A reconciler wants to hear when a connector for its app appears.
    Watch {
        service: String,
        target: String,
        reconciler: ActorRef<ReconcilerMsg>,
    },
}

/// A service and its connected agents, for the admin API and the demo.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub enabled: bool,
    pub agents: Vec<AgentStatus>,
}

/// One connected agent, for the admin API.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AgentStatus {
    pub session_id: u64,
    pub agent_name: String,
    pub peer: String,
    pub targets: Vec<String>,
    pub connected_since_unix: u64,
    /// Healthy, or silent (missed heartbeats: routed nothing until heard again).
    #[serde(default)]
    pub health: Health,
    /// Requests routed to this agent and not answered yet.
    #[serde(default)]
    pub in_flight: usize,
    /// Requests this agent answered since it connected.
    #[serde(default)]
    pub answered: u64,
    /// Requests that ended without its answer (hub deadline).
    #[serde(default)]
    pub failed: u64,
    /// When a frame from the agent last arrived (ms since the epoch).
    #[serde(default)]
    pub last_heard_unix_ms: u64,
    /// Round trip of the latest ping the agent answered, in µs.
    #[serde(default)]
    pub rtt_micros: Option<u64>,
}

/// Messages of a Reconciler (one per application).
pub enum ReconcilerMsg {
    /// The schedule says it is time for a run.
    Tick,
    /// Run now, or join the run already going, and reply with its result.
    ForceSync(RpcReplyPort<SyncOutcome>),
    /// The most recent finished run, if any.
    LastRun(RpcReplyPort<Option<RunSummary>>),
    /// The most recent finished run and the run going now, if any.
    Status(RpcReplyPort<ReconcilerStatus>),
    /// An agent advertising this app's target just registered.
    ConnectorAvailable,
    /// The run task finished (sent by the reconciler's own run task).
    RunFinished(Box<RunSummary>),
}

/// The answer to a forced sync.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncOutcome {
    #[serde(flatten)]
    pub run: RunSummary,
    /// True when a run was already going and this caller got its result instead of a new run.
    pub joined: bool,
}

/// What a reconciler is doing, for the admin API.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconcilerStatus {
    pub last: Option<RunSummary>,
    /// When the run going now started (Unix ms), if one is.
    pub running_since_unix_ms: Option<u64>,
}

/// The outcome of one reconciliation run, as stored and shown to the administrator.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSummary {
    pub app: String,
    pub run_id: i64,
    pub started_unix_ms: u64,
    pub duration_ms: u64,
    pub ok: bool,
    pub desired: usize,
    pub created: usize,
    pub updated: usize,
    pub deactivated: usize,
    pub deleted: usize,
    pub unchanged: usize,
    pub unmanaged: usize,
    pub failed: usize,
    pub requests: usize,
    /// Of those requests, how many were retries of a transient fault or a throttled answer.
    #[serde(default)]
    pub retries: usize,
    /// The one actionable line when the run failed or had failures.
    pub message: Option<String>,
    /// Groups granted by the access rule (0 when the app does not provision groups).
    #[serde(default)]
    pub groups_desired: usize,
    /// What the run did to groups; absent in runs recorded before groups were provisioned.
    #[serde(default)]
    pub groups: GroupCounts,
    /// Finished, going on, or interrupted; runs recorded before this field existed finished.
    #[serde(default)]
    pub state: RunState,
    /// Agents whose tunnel was lost while they carried requests of this run (failover).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agents_lost: Vec<LostAgent>,
    /// Requests sent again through another agent after the agent carrying them was lost.
    #[serde(default)]
    pub rerouted: usize,
}

/// Where a run stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    #[default]
    Finished,
    /// Recorded when it started and still going (seen in the run history only).
    Running,
    /// It started but never finished: the hub stopped or crashed during it. What it changed
    /// before is not in its counts; the next run lists the application afresh.
    Interrupted,
}

/// An agent lost during a run with some of the run's requests in flight.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostAgent {
    /// The agent's name (its `agent_name`, or its host name).
    pub agent: String,
    /// The run's requests it carried when it was lost: each was re-sent through another agent,
    /// or (a create) looked up first, or reported failed.
    pub requests: usize,
}

impl RunSummary {
    /// Users taken out of the application, whichever deprovisioning mode is set.
    pub fn deprovisioned(&self) -> usize {
        self.deactivated + self.deleted
    }
}

/// How the hub process itself is doing, for the admin API's `GET /api/runtime` and
/// `connect hub status`: what a leak would make grow.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeStats {
    /// Agent session actors alive, registered or not (one per agent connection).
    pub agent_sessions: usize,
    /// Tasks alive in the hub's async runtime.
    pub tasks: usize,
    /// Resident memory of the hub process, when the platform tells (Linux: VmRSS).
    pub rss_bytes: Option<u64>,
}

/// One application in the admin API's `GET /api/apps`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppStatus {
    pub name: String,
    pub service: String,
    pub target: String,
    /// When the run going now started (Unix ms), if one is.
    pub running_since_unix_ms: Option<u64>,
    pub last_sync: Option<RunSummary>,
    /// Set when the app's reconciler did not answer (it is being restarted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
