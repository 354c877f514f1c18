//! Frames exchanged between agent and hub once the Noise handshake has finished.
//!
//! Every frame is encoded with bincode 2 and travels encrypted; nothing here is ever sent in
//! clear. Frames are versioned through [`Frame::Hello`]: a peer that sees a version it does not
//! speak says goodbye instead of guessing.

use serde::{Deserialize, Serialize};

/// Version of the frame vocabulary below. Bump on any incompatible change.
/// 2: `Hello` carries the agent's instance id.
pub const PROTOCOL_VERSION: u16 = 2;

/// One unit of the tunnel protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// First frame from the agent: who it is and which targets it forwards to.
    Hello {
        version: u16,
        /// Free-form agent name (host name by default), shown to administrators.
        agent_name: String,
        /// Random for each agent process and the same on all its reconnections: the hub drops
        /// an older session with the same instance at once, since the agent has given it up
        /// (e.g. after a silent network death), while two agents of one service never share
        /// an instance even when they share a name.
        instance: u64,
        targets: Vec<TargetInfo>,
    },
    /// The hub's answer to `Hello`: the session is registered and may receive requests.
    Welcome {
        version: u16,
        session_id: u64,
    },
    /// The agent's declared target set changed (sent without reconnecting).
    Targets {
        targets: Vec<TargetInfo>,
    },
    /// Hub → agent: forward one HTTP request to a declared target.
    Request(ForwardRequest),
    /// Agent → hub: the outcome of one forwarded request.
    Response(ForwardResponse),
    /// Hub → agent: the hub no longer waits for this request.
    Cancel {
        id: u64,
    },
    /// Liveness probe, either direction. `sent_micros` is echoed unchanged in the `Pong`.
    Ping {
        seq: u64,
        sent_micros: u64,
    },
    Pong {
        seq: u64,
        sent_micros: u64,
    },
    /// The sender is going away on purpose: stop routing to it at once.
    Goodbye {
        reason: String,
    },
}

/// A target as advertised to the hub. Only the name leaves the VM: addresses stay local.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TargetInfo {
    pub name: String,
}

/// The scheme of the application's SCIM base URL. It decides TLS toward the target unless the
/// target's own `always_tls` / `no_tls` setting overrides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Scheme {
    Http,
    Https,
}

/// One HTTP request the hub asks the agent to forward.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardRequest {
    /// Unique per tunnel session; the response carries the same id.
    pub id: u64,
    /// Name of a target declared in the agent's config.ini.
    pub target: String,
    pub scheme: Scheme,
    /// Host (and optional port) from the base URL: used for SNI and the `Host` header, never
    /// for choosing where to connect.
    pub host: String,
    pub method: String,
    /// Absolute path with optional query, e.g. `/scim/v2/Users?startIndex=1`.
    pub path_and_query: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    /// The application asks to skip certificate checks. Honoured only when the target was also
    /// declared with `insecure_allow_skip_tls_check`.
    pub skip_tls_verify: bool,
    /// How long the agent may take before answering with [`ForwardError::ResponseTimeout`].
    pub timeout_ms: u32,
}

/// The answer to a [`ForwardRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardResponse {
    pub id: u64,
    pub result: Result<HttpResponse, ForwardError>,
}

/// What the target answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

/// Why the agent could not obtain a response. Typed so the hub can name the actionable cause.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ForwardError {
    #[error("target `{name}` is not declared on the agent")]
    UndeclaredTarget { name: String },
    #[error("request refused by the agent: {reason}")]
    Refused { reason: String },
    #[error("connection to {addr} refused")]
    ConnectRefused { addr: String },
    #[error("connection to {addr} timed out")]
    ConnectTimeout { addr: String },
    #[error("cannot resolve {addr}: {detail}")]
    Dns { addr: String, detail: String },
    #[error("TLS handshake with {addr} failed: {detail}")]
    Tls { addr: String, detail: String },
    #[error("no response from {addr} within {timeout_ms} ms")]
    ResponseTimeout { addr: String, timeout_ms: u32 },
    #[error("response from {addr} exceeds {limit} bytes")]
    TooLarge { addr: String, limit: u64 },
    #[error("network error talking to {addr}: {detail}")]
    Network { addr: String, detail: String },
    #[error("agent internal error: {detail}")]
    Internal { detail: String },
    #[error("agent is shutting down")]
    ShuttingDown,
    /// The agent already holds as many requests for this target as it accepts; this one was
    /// never sent to the target.
    #[error("target `{name}` already has {queued} requests waiting on the agent")]
    Busy { name: String, queued: u32 },
}
