//! The actors of both roles. `agent` and `hub` never import each other; they share only
//! `crate::messages`, `crate::tunnel`, `crate::net` and the role-neutral KeyExchange.

pub mod agent;
pub mod hub;
pub mod key_exchange;
