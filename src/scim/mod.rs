//! SCIM 2.0 provisioning of users and groups: resources, a client over an abstract transport,
//! the plans that turn current state into desired state, the deletion guard, and the run that
//! applies them.
//!
//! This module never starts an actor and never opens a socket on its own: requests leave
//! through a [`transport::Transport`] that the caller provides (the tunnel in the hub, a
//! direct HTTP connection in tests).

pub mod client;
pub mod diff;
pub mod error;
pub mod group_diff;
pub mod guard;
pub mod outcome;
pub mod resources;
pub mod retry;
pub mod sync;
pub mod transport;

pub use client::ScimClient;
pub use diff::{plan_users, Deprovision, DeprovisionMode, DesiredUser, UserPlan, UserUpdate};
pub use error::ScimError;
pub use group_diff::{plan_groups, DesiredGroup, GroupChange, GroupDelete, GroupPlan};
pub use guard::{DeletionGuard, GuardRefusal};
pub use outcome::{OpKind, OpResult, ResourceKind, ResourceOp};
pub use resources::{
    GroupMember, ListResponse, Name, PatchOp, PatchOpKind, ScimEmail, ScimErrorBody, ScimGroup,
    ScimUser,
};
pub use retry::{Idempotency, RetryPolicy};
pub use sync::{sync, GroupCounts, Managed, SyncError, SyncOptions, SyncReport};
pub use transport::{
    HttpTransport, NoConnectorKind, ScimRequest, ScimResponse, Transport, TransportError,
};
