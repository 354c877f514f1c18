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

/// Per-target resource bounds, the same for every target of one agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DialerLimits {
    /// Requests forwarded to one target at the same time; further ones wait (within their own
    /// timeout) for a slot.
    pub max_in_flight: usize,
    /// Bound on name resolution, and separately on TCP connect plus TLS handshake.
    pub connect_timeout: Duration,
    /// Largest response body accepted from a target.
    pub max_response_bytes: usize,
    /// Idle keep-alive connections kept per target (0 disables reuse).
    pub max_idle_per_target: usize,
}

impl Default for DialerLimits {
    fn default() -> Self {
        DialerLimits {
            max_in_flight: 64,
            connect_timeout: Duration::from_secs(10),
            max_response_bytes: 32 * 1024 * 1024,
            max_idle_per_target: 8,
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
#[derive(Debug, Clone, PartialEq, Eq)]
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
#[derive(Debug)]
pub enum SessionMsg {
    /// Dial the hub now (first start, or after a backoff delay).
    Connect,
    /// Something happened on the tunnel of connection `generation`.
    Link {
        generation: u64,
        event: super::LinkEvent,
    },
    /// Time to ping the hub and check it is still alive.
    Heartbeat,
    /// Say goodbye to the hub and stop forwarding.
    Shutdown(ractor::RpcReplyPort<()>),
    /// The current state, for status and tests.
    State(ractor::RpcReplyPort<SessionStatus>),
}

/// What the Session reports about itself.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct SessionStatus {
    pub connected: bool,
    pub hub: String,
    pub connected_since_unix: Option<u64>,
    pub last_rtt_micros: Option<u64>,
    pub connects: u64,
    pub last_error: Option<String>,
}
