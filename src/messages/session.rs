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
