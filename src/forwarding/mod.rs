//! The HTTP/1.1 client the agent uses toward its declared targets: request checks, TLS and the
//! per-target connection pool. No actors here; the dialer and forward actors drive it.
//!
//! This module owns the connection toward a target and the mapping of every failure to a typed
//! [`ForwardError`](crate::messages::ForwardError). It must never choose where to connect from
//! anything the hub sends (the address always comes from the local [`TargetSpec`]), never skip a
//! certificate check the local administrator did not allow, and never log a body or an
//! `Authorization` header.
//!
//! [`TargetSpec`]: crate::messages::agent::TargetSpec

pub mod client;
pub mod request;
pub mod tls;

pub use client::{LargeBodies, TargetClient};
pub use tls::TlsSetupError;
