//! The hub's actors: the gateway agents dial into, one session per connected agent, the
//! registry that routes requests, one reconciler per application and the admin API, all under
//! one supervisor. [`start`] binds the sockets and builds the tree.

pub mod admin;
pub mod agent_session;
pub mod gateway;
pub mod health;
pub mod reconciler;
pub mod registry;
pub mod services;
pub mod supervisor;
pub mod tunnel_transport;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ractor::{Actor, ActorRef};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::config::hub::HubConfig;
use crate::messages::hub::{RegistryMsg, ServiceStatus};
use crate::store::Store;
use admin::{Admin, AdminArgs};
use gateway::{Gateway, GatewayArgs};
use reconciler::ReconcilerArgs;
use registry::Registry;
use services::ServiceBook;
use supervisor::{HubSupervisor, HubSupervisorArgs, ReconcilerTable};

/// Why the hub could not start. Each names the hub.toml field involved.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("cannot listen on {addr} ({field} in {file}): {source}")]
    Listen {
        addr: SocketAddr,
        field: &'static str,
        file: String,
        source: std::io::Error,
    },
    #[error("TLS certificate or key (tls_cert / tls_key in {file}): {source}")]
    Tls {
        file: String,
        source: crate::net::NetError,
    },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("cannot start the hub's actors: {0}")]
    Spawn(String),
}

/// Tuning that tests and the demo change.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// Delay before each reconciler's first scheduled run.
    pub startup_grace: Duration,
}

impl Default for HubOptions {
    fn default() -> Self {
        HubOptions {
            startup_grace: Duration::from_secs(10),
        }
    }
}

/// A running hub.
pub struct HubHandle {
    pub supervisor: ActorRef<()>,
    pub registry: ActorRef<RegistryMsg>,
    pub agent_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub reconcilers: ReconcilerTable,
    join: JoinHandle<()>,
}

impl HubHandle {
    /// Services and their connected agents.
    pub async fn services(&self) -> Vec<ServiceStatus> {
        match self
            .registry
            .call(RegistryMsg::Snapshot, Some(Duration::from_secs(5)))
            .await
        {
            Ok(ractor::rpc::CallResult::Success(list)) => list,
            _ => Vec::new(),
        }
    }

    /// Waits until the hub stops (a fatal component failure, or [`HubHandle::stop`]).
    pub async fn wait(self) {
        let _ = self.join.await;
    }

    /// Runs until `stop` resolves (then stops the hub and returns its output) or until the hub
    /// stops by itself after a fatal failure (then returns `None`).
    pub async fn run_until<F: std::future::Future>(mut self, stop: F) -> Option<F::Output> {
        tokio::select! {
            out = stop => {
                self.supervisor.stop(None);
                let _ = (&mut self.join).await;
                Some(out)
            }
            _ = &mut self.join => None,
        }
    }

    /// Stops every actor of the hub and waits for them.
    pub async fn stop(self) {
        self.supervisor.stop(None);
        let _ = self.join.await;
    }
}

/// Binds the agent and admin listeners and starts the actor tree.
pub async fn start(config: &HubConfig, options: HubOptions) -> Result<HubHandle, HubError> {
    let file = config.path.display().to_string();
    let tls =
        crate::net::hub_server_config(&config.tls_cert, &config.tls_key).map_err(|source| {
            HubError::Tls {
                file: file.clone(),
                source,
            }
        })?;
    let agent_listener = bind(config.listen, "listen", &file).await?;
    let admin_listener = bind(config.admin.listen, "admin.listen", &file).await?;
    let agent_addr = agent_listener.local_addr().unwrap_or(config.listen);
    let admin_addr = admin_listener.local_addr().unwrap_or(config.admin.listen);
    let store = Arc::new(Store::open(&config.state_dir)?);
    // Runs still "running" belong to a hub process that is gone: it stopped or crashed during
    // them. They are kept, as interrupted.
    let interrupted = store.interrupt_unfinished(reconciler::INTERRUPTED)?;
    if interrupted > 0 {
        tracing::warn!(
            runs = interrupted,
            "runs the previous hub never finished are recorded as interrupted"
        );
    }
    let book = ServiceBook::new(&config.services);
    let book_for_admin = book.clone();

    let spawn_err = |e: ractor::SpawnErr| HubError::Spawn(e.to_string());
    let (registry, _) = Actor::spawn(None, Registry, book.clone())
        .await
        .map_err(spawn_err)?;
    let table: ReconcilerTable = Arc::new(RwLock::new(BTreeMap::new()));
    let reconcilers = config
        .apps
        .iter()
        .map(|app| ReconcilerArgs {
            app: app.clone(),
            directory: config.directory.clone(),
            registry: registry.clone(),
            store: store.clone(),
            startup_grace: options.startup_grace,
        })
        .collect();
    let (supervisor, join) = Actor::spawn(
        None,
        HubSupervisor,
        HubSupervisorArgs {
            reconcilers,
            table: table.clone(),
        },
    )
    .await
    .map_err(spawn_err)?;
    registry.link(supervisor.get_cell());
    let live_sessions = Arc::new(AtomicUsize::new(0));
    Actor::spawn_linked(
        None,
        Gateway,
        GatewayArgs {
            listener: agent_listener,
            tls,
            book,
            registry: registry.clone(),
            live_sessions: live_sessions.clone(),
        },
        supervisor.get_cell(),
    )
    .await
    .map_err(spawn_err)?;
    Actor::spawn_linked(
        None,
        Admin,
        AdminArgs {
            listener: admin_listener,
            token: config.admin.token.clone(),
            registry: registry.clone(),
            reconcilers: table.clone(),
            book: book_for_admin,
            apps: config.apps.clone(),
            store: store.clone(),
            live_sessions,
        },
        supervisor.get_cell(),
    )
    .await
    .map_err(spawn_err)?;
    tracing::info!(%agent_addr, %admin_addr, "hub started");
    Ok(HubHandle {
        supervisor,
        registry,
        agent_addr,
        admin_addr,
        reconcilers: table,
        join,
    })
}

async fn bind(addr: SocketAddr, field: &'static str, file: &str) -> Result<TcpListener, HubError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| HubError::Listen {
            addr,
            field,
            file: file.to_string(),
            source,
        })
}
