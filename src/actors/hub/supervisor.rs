//! HubSupervisor: the root of the hub's tree. Starts the registry, the gateway, one reconciler
//! per application and the admin API; restarts a failed reconciler (counting it) and stops the
//! hub when a part it cannot rebuild in place fails, so the service manager restarts it whole.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SupervisionEvent};
use tracing::{error, warn};

use super::reconciler::{Reconciler, ReconcilerArgs};
use crate::messages::hub::ReconcilerMsg;

/// Current reconciler of each application; swapped when one is restarted.
pub type ReconcilerTable = Arc<RwLock<BTreeMap<String, ActorRef<ReconcilerMsg>>>>;

/// What the supervisor starts from. The gateway and admin are started by the caller as its
/// children (they need bound sockets); the supervisor starts and restarts reconcilers.
pub struct HubSupervisorArgs {
    pub reconcilers: Vec<ReconcilerArgs>,
    pub table: ReconcilerTable,
}

/// Supervisor state.
pub struct HubSupervisorState {
    table: ReconcilerTable,
    /// Reconciler actor id → its arguments, to respawn it the same way.
    reconcilers: HashMap<ractor::ActorId, ReconcilerArgs>,
    /// Restarts per actor name, shown by the admin API.
    pub restarts: BTreeMap<String, u64>,
}

/// The HubSupervisor actor.
pub struct HubSupervisor;

impl HubSupervisor {
    async fn spawn_reconciler(
        myself: &ActorRef<()>,
        state: &mut HubSupervisorState,
        args: ReconcilerArgs,
    ) -> Result<(), ActorProcessingErr> {
        let name = args.app.name.clone();
        let cell: ActorCell = myself.get_cell();
        let (actor, _) = Actor::spawn_linked(None, Reconciler, args.clone(), cell).await?;
        state
            .table
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name, actor.clone());
        state.reconcilers.insert(actor.get_id(), args);
        Ok(())
    }
}

impl Actor for HubSupervisor {
    type Msg = ();
    type State = HubSupervisorState;
    type Arguments = HubSupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: HubSupervisorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mut state = HubSupervisorState {
            table: args.table,
            reconcilers: HashMap::new(),
            restarts: BTreeMap::new(),
        };
        for r in args.reconcilers {
            Self::spawn_reconciler(&myself, &mut state, r).await?;
        }
        Ok(state)
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorFailed(cell, err) => {
                if let Some(args) = state.reconcilers.remove(&cell.get_id()) {
                    let name = format!("reconciler[{}]", args.app.name);
                    let count = state.restarts.entry(name.clone()).or_default();
                    *count += 1;
                    warn!("{name} failed ({err}); restarting (restart #{count})");
                    Self::spawn_reconciler(&myself, state, args).await?;
                } else {
                    error!(
                        "hub component {} failed: {err}; stopping the hub",
                        cell.get_name().unwrap_or_else(|| cell.get_id().to_string())
                    );
                    myself.stop(Some("a hub component failed".into()));
                }
            }
            SupervisionEvent::ActorTerminated(cell, _, _)
                if state.reconcilers.remove(&cell.get_id()).is_none() =>
            {
                warn!("hub component stopped; stopping the hub");
                myself.stop(None);
            }
            _ => {}
        }
        Ok(())
    }
}
