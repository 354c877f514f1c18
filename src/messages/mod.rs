//! Typed data that crosses a boundary: the frames that travel through the tunnel (`wire`) and
//! the messages actors send each other (`agent`, `hub`).
//!
//! This module owns plain data only. It must never do I/O, hold a socket, or know about
//! encryption: the tunnel module turns frames into bytes, the actors decide what they mean.

pub mod agent;
pub mod wire;

pub use wire::{
    ForwardError, ForwardRequest, ForwardResponse, Frame, HttpResponse, Scheme, TargetInfo,
    PROTOCOL_VERSION,
};
