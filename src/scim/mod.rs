//! SCIM 2.0 provisioning of users: resources, a client over an abstract transport, the plan
//! that turns current state into desired state, and the run that applies it.
//!
//! This module never starts an actor and never opens a socket on its own: requests leave
//! through a [`transport::Transport`] that the caller provides (the tunnel in the hub, a
//! direct HTTP connection in tests).

pub mod client;
pub mod diff;
pub mod error;
pub mod resources;
pub mod retry;
pub mod sync;
pub mod transport;

pub use client::ScimClient;
pub use diff::{plan_users, Deprovision, DeprovisionMode, DesiredUser, UserPlan, UserUpdate};
pub use error::ScimError;
pub use resources::{ListResponse, Name, PatchOp, PatchOpKind, ScimEmail, ScimErrorBody, ScimUser};
pub use retry::{Idempotency, RetryPolicy};
pub use sync::{sync_users, UserRunReport};
pub use transport::{
    HttpTransport, NoConnectorKind, ScimRequest, ScimResponse, Transport, TransportError,
};
