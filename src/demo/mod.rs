//! Everything `connect demo` runs in-process so that the product can be tried with nothing
//! but `cargo`, and that tests use as a convenient peer.
//!
//! Code here serves demos and tests only: production roles must never depend on it.

pub mod run;
pub mod scim_server;
