//! Typed data that crosses a boundary: the frames that travel through the tunnel (`wire`) and
//! the messages actors send each other (`agent`, `hub`).
//!
//! This module owns data only. It must never do I/O or know about encryption: the tunnel module
//! turns frames into bytes, the actors decide what the messages mean.

pub mod agent;
pub mod hub;
pub mod liveness;
pub mod wire;

pub use wire::{
    ForwardError, ForwardRequest, ForwardResponse, Frame, HttpResponse, Scheme, TargetInfo,
    PROTOCOL_VERSION,
};

/// What the reader half of a tunnel link reports to the actor that owns it.
#[derive(Debug)]
pub enum LinkEvent {
    /// A complete, authenticated frame.
    Frame(Frame),
    /// The link is gone; the text says why (peer closed, decryption failed, I/O error).
    Closed(String),
}
