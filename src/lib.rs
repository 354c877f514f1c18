//! scim-connect: a SCIM 2.0 provisioning hub and the outbound agent that tunnels its requests
//! into private networks. One library, two roles; `main.rs` only picks the role.

pub mod actors;
pub mod admin_client;
pub mod certs;
pub mod config;
pub mod demo;
pub mod display;
pub mod forwarding;
pub mod logging;
pub mod messages;
pub mod net;
pub mod scim;
pub mod store;
pub mod tunnel;
