//! Messages between the agent's actors, and the plain inputs the target dialers are built from.
//!
//! Plain data only: nothing here opens a socket, spawns a task or reads a file. The dialer and
//! forward actors (`crate::actors::agent`) give these messages their meaning.

use std::fmt;
use std::time::Duration;

use tokio_rustls::rustls::pki_types::CertificateDer;

use super::wire::ForwardResponse;
use super::ForwardRequest;

/// Where a dialer sends the outcome of one request. The Session turns each item into a
/// `Frame::Response`. Exactly one response is sent per request, except for cancelled ones, which
/// get none.
pub type ResponseSink = tokio::sync::mpsc::UnboundedSender<ForwardResponse>;

/// Whether the connection toward a target uses TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TargetTls {
    /// TLS when the application's base URL is `https`, plain when it is `http`.
    #[default]
    FromScheme,
    /// Always TLS (`always_tls = true`), whatever the base URL says.
    Always,
    /// Never TLS (`no_tls = true`), whatever the base URL says.
    Never,
}

impl fmt::Display for TargetTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TargetTls::FromScheme => "from-scheme",
            TargetTls::Always => "always",
            TargetTls::Never => "never",
        })
    }
}

/// One target declared in the agent's config.ini, as the dialer needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetSpec {
    /// The name the hub uses (`[target.<name>]`).
    pub name: String,
    /// Where to connect: `host:port`. Never taken from the request.
    pub addr: String,
    pub tls: TargetTls,
    /// The administrator allows certificate checks to be skipped for this target, when the hub
    /// also asks for it on a request.
    pub insecure_allow_skip_tls_check: bool,
    /// Trust anchors added to the system's roots for this target (DER).
    pub extra_roots: Vec<CertificateDer<'static>>,
}

/// Room a response frame keeps for everything but the body: the status, the relayed headers
/// (never more than the response head the client reads, see
/// [`MAX_RESPONSE_HEAD_BYTES`]) and their encoding overhead.
pub const RESPONSE_FRAME_HEADROOM: usize = 1024 * 1024;

/// Largest response head (status line and headers) the agent reads from a target.
pub const MAX_RESPONSE_HEAD_BYTES: usize = 400 * 1024;

/// Largest response body that still fits, with its head, in one tunnel frame. A larger limit
/// would let an accepted answer fail to encode and take the tunnel down, so the dialers never
/// use one.
pub const MAX_RESPONSE_BODY_BYTES: usize = crate::tunnel::MAX_FRAME_BYTES - RESPONSE_FRAME_HEADROOM;

// A head, plus a few bytes of length prefix for each of hyper's at most 100 headers, must fit
// in the headroom.
const _: () = assert!(MAX_RESPONSE_HEAD_BYTES + 100 * 32 < RESPONSE_FRAME_HEADROOM);

/// Per-target resource bounds, the same for every target of one agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DialerLimits {
    /// Requests forwarded to one target at the same time; further ones wait (within their own
    /// timeout) for a slot.
    pub max_in_flight: usize,
    /// Bound on name resolution, and separately on TCP connect plus TLS handshake.
    pub connect_timeout: Duration,
    /// Largest response body accepted from a target; values above
    /// [`MAX_RESPONSE_BODY_BYTES`] are lowered to it.
    pub max_response_bytes: usize,
    /// Idle keep-alive connections kept per target (0 disables reuse).
    pub max_idle_per_target: usize,
    /// A response body may grow to this size without asking; past it, reading goes on only
    /// while holding one of the [`DialerLimits::large_bodies`] slots.
    pub unreserved_body_bytes: usize,
    /// Response bodies larger than [`DialerLimits::unreserved_body_bytes`] read at the same
    /// time, for the whole agent (all targets together). With the other bounds this caps the
    /// memory held by bodies being read at
    /// `targets × max_in_flight × unreserved_body_bytes + large_bodies × max_response_bytes`.
    pub large_bodies: usize,
    /// Requests one target may hold at once, running or waiting for a slot; past it a request
    /// is answered [`ForwardError::Busy`] at once. Bounds how many Forwards a hub (buggy or
    /// compromised) can make the agent keep.
    ///
    /// [`ForwardError::Busy`]: crate::messages::ForwardError::Busy
    pub max_queued: usize,
    /// Request bodies one target may hold at once, in bytes, running or waiting; past it a
    /// request is answered [`ForwardError::Busy`] at once. A frame may carry 16 MiB, so a
    /// count alone would not bound the memory.
    ///
    /// [`ForwardError::Busy`]: crate::messages::ForwardError::Busy
    pub max_queued_bytes: usize,
}

impl Default for DialerLimits {
    fn default() -> Self {
        DialerLimits {
            max_in_flight: 64,
            connect_timeout: Duration::from_secs(10),
            max_response_bytes: MAX_RESPONSE_BODY_BYTES,
            // As many as may be in flight: with fewer, a busy target has its connections
            // closed and opened again all the time (at 64 requests in flight and 8 kept idle,
            // 29 % of requests opened a new connection; README, Benchmarks).
            max_idle_per_target: 64,
            unreserved_body_bytes: 1024 * 1024,
            large_bodies: 4,
            max_queued: 2048,
            max_queued_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Messages a `TargetDialer` handles.
pub enum DialerMsg {
    /// Forward one request; its outcome goes to `reply`.
    Forward {
        request: ForwardRequest,
        reply: ResponseSink,
    },
    /// The hub no longer waits for this request: stop working on it and answer nothing.
    Cancel { id: u64 },
    /// Report live counters (for `connect status`).
    Stats(ractor::RpcReplyPort<TargetStats>),
    /// The target's declaration changed; requests received from now on use the new one.
    Update(TargetSpec),
}

impl fmt::Debug for DialerMsg {
    // Hand-written so that a debug print of a message never shows headers or bodies.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DialerMsg::Forward { request, .. } => f
                .debug_struct("Forward")
                .field("id", &request.id)
                .field("target", &request.target)
                .finish_non_exhaustive(),
            DialerMsg::Cancel { id } => f.debug_struct("Cancel").field("id", id).finish(),
            DialerMsg::Stats(_) => f.write_str("Stats"),
            DialerMsg::Update(spec) => f.debug_tuple("Update").field(&spec.name).finish(),
        }
    }
}

/// Live state of one target dialer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TargetStats {
    pub name: String,
    pub addr: String,
    /// `from-scheme`, `always` or `never`.
    pub tls: String,
    /// Requests accepted and not yet answered or cancelled.
    pub in_flight: usize,
    /// Requests answered with a target response (any HTTP status).
    pub forwarded: u64,
    /// Requests answered with a `ForwardError`.
    pub errors: u64,
    /// The most recent error, one line.
    pub last_error: Option<String>,
    /// Forward actors that failed (panic or error) and were answered by the dialer.
    pub forward_restarts: u64,
}
/// Messages of the agent's Session actor.
pub enum SessionMsg {
    /// Dial the hub now (first start, or after a backoff delay).
    Connect,
    /// Connection attempt `attempt` finished after `took`: a tunnel ready for the hello, or
    /// why there is none.
    Attempted {
        attempt: u64,
        took: Duration,
        result: Result<Box<crate::actors::key_exchange::Established>, String>,
    },
    /// Something happened on the tunnel of connection `generation`.
    Link {
        generation: u64,
        event: super::LinkEvent,
    },
    /// Time to check the hub is still alive, and to ping it when a ping is due.
    Heartbeat,
    /// The declared targets changed: route through these dialers from now on and advertise
    /// their names to the hub.
    Dialers(crate::actors::agent::Dialers),
    /// Stop taking requests, say goodbye to the hub, let the requests in flight finish (up to
    /// the drain deadline), then close the tunnel. Replies when the tunnel is closed.
    Shutdown(ractor::RpcReplyPort<()>),
    /// Time to look whether the requests in flight have drained (during a shutdown).
    Drain,
    /// The current state, for status and tests.
    State(ractor::RpcReplyPort<SessionStatus>),
}

impl fmt::Debug for SessionMsg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionMsg::Connect => f.write_str("Connect"),
            SessionMsg::Attempted {
                attempt, result, ..
            } => f
                .debug_struct("Attempted")
                .field("attempt", attempt)
                .field("ok", &result.is_ok())
                .finish(),
            SessionMsg::Link { generation, event } => f
                .debug_struct("Link")
                .field("generation", generation)
                .field("event", event)
                .finish(),
            SessionMsg::Heartbeat => f.write_str("Heartbeat"),
            SessionMsg::Dialers(d) => f.debug_tuple("Dialers").field(&d.targets()).finish(),
            SessionMsg::Shutdown(_) => f.write_str("Shutdown"),
            SessionMsg::Drain => f.write_str("Drain"),
            SessionMsg::State(_) => f.write_str("State"),
        }
    }
}

/// Messages of the agent's Control actor (the `connect status` socket).
#[derive(Debug)]
pub enum ControlMsg {
    /// The socket's accept loop ended; the actor fails so that its supervisor binds again.
    ListenerFailed(String),
}

/// Where the Session stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionPhase {
    /// Dialing the hub, or waiting for its welcome.
    #[default]
    Connecting,
    /// Welcomed by the hub: requests flow.
    Connected,
    /// The last attempt failed or the tunnel was lost; the next attempt is scheduled.
    Retrying,
    /// Stopping: the hub was told goodbye, requests in flight are finishing.
    Draining,
    /// The tunnel is closed for good (the agent is stopping).
    Stopped,
    /// No Session is running right now (it failed and the supervisor restarts it).
    Restarting,
}

impl fmt::Display for SessionPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SessionPhase::Connecting => "connecting",
            SessionPhase::Connected => "connected",
            SessionPhase::Retrying => "retrying",
            SessionPhase::Draining => "draining",
            SessionPhase::Stopped => "stopped",
            SessionPhase::Restarting => "restarting",
        })
    }
}

/// The outcome of the most recent key exchange with the hub.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HandshakeInfo {
    /// When it finished (seconds since the epoch).
    pub at_unix: u64,
    /// How long TCP, TLS, websocket upgrade and Noise handshake took together.
    pub duration_ms: u64,
    /// `None` when it succeeded; else why it failed, one line.
    pub error: Option<String>,
}

/// What the Session reports about itself.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct SessionStatus {
    pub phase: SessionPhase,
    /// True while the hub has welcomed the current tunnel.
    pub connected: bool,
    /// The `hub` URL (never holds credentials: config.ini refuses them).
    pub hub: String,
    pub connected_since_unix: Option<u64>,
    /// Round trip of the most recent ping answered by the hub.
    pub last_rtt_micros: Option<u64>,
    /// When a frame from the hub last arrived (milliseconds since the epoch).
    pub last_heard_unix_ms: Option<u64>,
    pub last_handshake: Option<HandshakeInfo>,
    /// Tunnels the hub welcomed since the agent started.
    pub connects: u64,
    /// Requests received on the current tunnel and not yet answered.
    pub in_flight: usize,
    pub last_error: Option<String>,
}

/// The outcome of the most recent config.ini reload.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReloadStatus {
    /// When it ran (seconds since the epoch).
    pub at_unix: u64,
    /// `None` when the new targets were taken; else why the file was refused, one line.
    pub error: Option<String>,
}

/// Version of [`AgentReport`]'s JSON shape, for scripts that read `connect status --json`.
pub const REPORT_VERSION: u16 = 1;

/// Everything `connect status` shows: the agent's live state as its Control actor reports it.
/// Holds no secret: no service id, no proxy credentials, no request content.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct AgentReport {
    pub version: u16,
    pub agent_name: String,
    pub pid: u32,
    /// The config.ini the agent runs from.
    pub config: Option<String>,
    /// The HTTP CONNECT proxy toward the hub, as `scheme://host:port` (credentials left out).
    pub proxy: Option<String>,
    pub session: SessionStatus,
    /// Every declared target, sorted by name.
    pub targets: Vec<TargetStats>,
    /// Restarts per actor: `session`, `control`, `dialer:<target>`, `forward:<target>`.
    pub restarts: std::collections::BTreeMap<String, u64>,
    pub last_reload: Option<ReloadStatus>,
}
