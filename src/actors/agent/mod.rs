//! The agent's actors: the supervisor, the session to the hub (with its key exchange), one
//! dialer per declared target, one forward per in-flight request, and the control socket that
//! `connect status` asks. [`run::start`] builds the tree from a validated config.ini.

pub mod backoff;
pub mod control;
pub mod dialer;
pub mod forward;
pub mod run;
pub mod session;
pub mod supervisor;

pub use dialer::{Dialers, TargetDialer};
pub use forward::Forward;

#[cfg(test)]
mod lifecycle_tests;
#[cfg(test)]
mod tests;
