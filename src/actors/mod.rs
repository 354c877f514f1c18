//! The actors of both roles. `agent` and `hub` never import each other; they share only
//! `crate::messages` and `crate::tunnel`.

pub mod agent;
