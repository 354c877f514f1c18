//! Starting and stopping the agent: turns a validated config.ini into the actor tree.
//!
//! Every start-up check (hub URL, trust anchors, proxy, state directory) runs before the first
//! actor is spawned, so a refused start leaves nothing running and nothing half-created.

use std::sync::Arc;
use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::{Actor, ActorRef};
use tokio::task::JoinHandle;

use super::control::{self, ControlError};
use super::session::{HubEndpoint, DRAIN_DEADLINE};
use super::supervisor::{
    AgentInfo, AgentSupervisor, AgentSupervisorArgs, AgentSupervisorMsg, ControlSocket,
    SessionTemplate,
};
use crate::config::agent::{parse_hub_url, AgentConfig, ProxyConfig, TlsMode};
use crate::messages::agent::{DialerLimits, TargetSpec, TargetTls};
use crate::messages::agent::{SessionMsg, SessionStatus};
use crate::net::proxy::Proxy;
use crate::tunnel;

/// Why the agent could not start. Each names the config.ini key involved.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{file}: hub = {url}: {why}")]
    HubUrl {
        file: String,
        url: String,
        why: String,
    },
    #[error("{file}: hub_ca: {source}")]
    HubCa {
        file: String,
        source: crate::net::NetError,
    },
    #[error("{file}: proxy_ca: {source}")]
    ProxyCa {
        file: String,
        source: crate::net::NetError,
    },
    #[error("{at}: `state_dir` = {dir:?}: the agent cannot write there ({source}); create the folder and give the agent's user write access to it, or point state_dir at one it may write")]
    StateDir {
        /// `file:line`, or just the file when state_dir is the default.
        at: String,
        dir: String,
        source: std::io::Error,
    },
    #[error("{file}: state_dir: {source}")]
    Control { file: String, source: ControlError },
    #[error("cannot start the agent's actors: {0}")]
    Spawn(String),
}

/// A running agent.
pub struct AgentHandle {
    supervisor: ActorRef<AgentSupervisorMsg>,
    join: JoinHandle<()>,
    drain_deadline: Duration,
}

impl AgentHandle {
    pub(crate) async fn session(&self) -> Option<ActorRef<SessionMsg>> {
        match self
            .supervisor
            .call(
                AgentSupervisorMsg::CurrentSession,
                Some(Duration::from_secs(2)),
            )
            .await
        {
            Ok(CallResult::Success(session)) => session,
            _ => None,
        }
    }

    /// The session's view of the tunnel, when a session is running.
    pub async fn status(&self) -> Option<SessionStatus> {
        let session = self.session().await?;
        match session
            .call(SessionMsg::State, Some(Duration::from_secs(2)))
            .await
        {
            Ok(CallResult::Success(status)) => Some(status),
            _ => None,
        }
    }

    /// Stops gracefully: the hub is told goodbye (it routes nothing more here), requests in
    /// flight get up to the drain deadline to finish, the tunnel is closed, then every actor
    /// stops.
    pub async fn shutdown(self) {
        if let Some(session) = self.session().await {
            let _ = session
                .call(
                    SessionMsg::Shutdown,
                    Some(self.drain_deadline + Duration::from_secs(5)),
                )
                .await;
        }
        self.supervisor.stop(None);
        let _ = self.join.await;
    }

    /// Waits until the agent's tree stops.
    pub async fn wait(self) {
        let _ = self.join.await;
    }
}

/// Parses the `hub` URL into what the session dials.
pub fn hub_endpoint(config: &AgentConfig) -> Result<HubEndpoint, AgentError> {
    let file = config.path.display().to_string();
    let bad = |why: &str| AgentError::HubUrl {
        file: file.clone(),
        url: config.hub.clone(),
        why: why.to_string(),
    };
    // Validated when the file was loaded; parsed again for its parts (IPv6 without brackets).
    let parsed = parse_hub_url(&config.hub).map_err(|why| bad(&why))?;
    let tls = crate::net::hub_client_config(config.hub_ca.as_deref()).map_err(|source| {
        AgentError::HubCa {
            file: file.clone(),
            source,
        }
    })?;
    let proxy = match &config.proxy {
        None => None,
        Some(proxy) => {
            let proxy_tls = if proxy.scheme_https {
                Some(
                    crate::net::hub_client_config(config.proxy_ca.as_deref()).map_err(
                        |source| AgentError::ProxyCa {
                            file: file.clone(),
                            source,
                        },
                    )?,
                )
            } else {
                None
            };
            Some(Arc::new(Proxy::new(proxy, proxy_tls)))
        }
    };
    Ok(HubEndpoint {
        url: config.hub.clone(),
        host: parsed.host,
        port: parsed.port,
        tls,
        proxy,
    })
}

/// The dialer's view of a declared target.
pub fn target_spec(target: &crate::config::agent::TargetConfig) -> TargetSpec {
    TargetSpec {
        name: target.name.clone(),
        addr: target.addr.clone(),
        tls: match target.tls {
            TlsMode::FromScheme => TargetTls::FromScheme,
            TlsMode::Always => TargetTls::Always,
            TlsMode::Never => TargetTls::Never,
        },
        insecure_allow_skip_tls_check: target.insecure_allow_skip_tls_check,
        extra_roots: target.ca_certs.clone(),
    }
}

/// Tuning that tests change.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// How long requests in flight may take to finish once the agent is stopping.
    pub drain_deadline: Duration,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            drain_deadline: DRAIN_DEADLINE,
        }
    }
}

/// Checks the hub endpoint, the proxy and the state directory, then starts the agent's actor
/// tree.
pub async fn start(config: &AgentConfig) -> Result<AgentHandle, AgentError> {
    start_with(config, AgentOptions::default()).await
}

/// [`start`] with chosen options.
pub async fn start_with(
    config: &AgentConfig,
    options: AgentOptions,
) -> Result<AgentHandle, AgentError> {
    let file = config.path.display().to_string();
    let hub = hub_endpoint(config)?;
    check_state_dir(config).map_err(|source| AgentError::StateDir {
        at: match config.line_of("state_dir") {
            Some(line) => format!("{}:{line}", config.path.display()),
            None => config.path.display().to_string(),
        },
        dir: config.state_dir.display().to_string(),
        source,
    })?;
    let socket = control::socket_path(&config.state_dir);
    let listener = control::bind(&socket).map_err(|source| AgentError::Control {
        file: file.clone(),
        source,
    })?;
    let service_id = config.service_id.expose();
    let agent_name = config.agent_name.clone().unwrap_or_else(host_name);
    let args = AgentSupervisorArgs {
        targets: config.targets.values().map(target_spec).collect(),
        limits: DialerLimits::default(),
        session: SessionTemplate {
            hub,
            lookup_hash: tunnel::lookup_hash(service_id),
            psk: tunnel::service_psk(service_id),
            agent_name: agent_name.clone(),
            drain_deadline: options.drain_deadline,
        },
        config: Some(config.clone()),
        control: Some(ControlSocket {
            path: socket,
            listener: Some(listener),
        }),
        info: AgentInfo {
            agent_name,
            config: Some(config.path.clone()),
            proxy: config.proxy.as_ref().map(proxy_display),
        },
    };
    let (supervisor, join) = Actor::spawn(None, AgentSupervisor, args)
        .await
        .map_err(|e| AgentError::Spawn(e.to_string()))?;
    Ok(AgentHandle {
        supervisor,
        join,
        drain_deadline: options.drain_deadline,
    })
}

/// The proxy as status shows it: scheme, host and port, never the credentials.
pub fn proxy_display(proxy: &ProxyConfig) -> String {
    let host = if proxy.host.contains(':') {
        format!("[{}]", proxy.host)
    } else {
        proxy.host.clone()
    };
    let scheme = if proxy.scheme_https { "https" } else { "http" };
    let auth = if proxy.username.is_some() || proxy.password.is_some() {
        " (with credentials)"
    } else {
        ""
    };
    format!("{scheme}://{host}:{}{auth}", proxy.port)
}

fn check_state_dir(config: &AgentConfig) -> std::io::Result<()> {
    std::fs::create_dir_all(&config.state_dir)?;
    let probe = config.state_dir.join(".write-test");
    std::fs::write(&probe, b"")?;
    std::fs::remove_file(&probe)
}

/// The machine's host name, the default agent name shown to administrators.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "agent".into())
}
