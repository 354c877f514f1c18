//! scim-connect: a SCIM 2.0 provisioning hub and the outbound agent that tunnels its requests
//! into private networks. One library, two roles; `main.rs` only picks the role.

pub mod demo;
pub mod messages;
pub mod scim;
