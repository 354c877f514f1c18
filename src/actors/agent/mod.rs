//! The agent's actors: target dialers and the per-request forwards they supervise.

pub mod dialer;
pub mod forward;

pub use dialer::{Dialers, TargetDialer};
pub use forward::Forward;

#[cfg(test)]
mod tests;
