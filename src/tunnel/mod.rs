//! The end-to-end layer between agent and hub: the Noise handshake, the transport ciphers, and
//! the codec that turns [`Frame`](crate::messages::Frame)s into encrypted records and back.
//!
//! Everything here is pure computation over byte slices. This module must never open a socket,
//! spawn a task, sleep, or log: the connection code feeds it websocket messages and sends what it
//! returns. It must never put key material or the service id into an error, a `Debug` output or
//! a handshake message.
//!
//! Keys: the service id is never used directly. [`service_psk`] derives the Noise pre-shared key
//! from it, and [`lookup_hash`] derives a different, public name for it that the agent sends in
//! the websocket upgrade so the hub can find the right service. The two derivations use distinct
//! labels, so knowing the lookup hash tells nothing about the psk. The lookup hash is bound into
//! the handshake through the [`prologue`]: a hub that looked up one service cannot complete a
//! handshake meant for another.

pub mod codec;
pub mod noise;

use sha2::{Digest, Sha256};

pub use codec::{decode_frame, encode_frame, FrameOpener, FrameSealer, MAX_FRAME_BYTES};
pub use noise::{Handshake, RecvCipher, SendCipher, MAX_TRANSPORT_PLAINTEXT};

/// The full Noise protocol name. Agent = initiator, hub = responder.
pub const NOISE_PROTOCOL: &str = "Noise_NNpsk0_25519_ChaChaPoly_SHA256";

/// Domain-separation label for the pre-shared key. Changing it breaks every deployed pairing.
const PSK_LABEL: &[u8] = b"scim-connect/v1/noise-psk\0";
/// Domain-separation label for the public lookup hash; must differ from [`PSK_LABEL`].
const LOOKUP_LABEL: &[u8] = b"scim-connect/v1/service-lookup\0";
/// Fixed prefix of the prologue; names the tunnel protocol so that another use of the same
/// psk (should one ever exist) cannot be confused with this one.
const PROLOGUE_PREFIX: &[u8] = b"scim-connect/1\n";

/// The 32-byte Noise pre-shared key for a service id: SHA-256 over a label and the id's bytes.
///
/// The id is used exactly as given (no trimming or case folding): both sides must read it from
/// their configuration the same way.
pub fn service_psk(service_id: &str) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(PSK_LABEL);
    hasher.update(service_id.as_bytes());
    hasher.finalize().into()
}

/// The public name of a service: lowercase hex SHA-256 over a label (distinct from the psk's)
/// and the id. Sent in the websocket upgrade so the hub can find the service without the id
/// crossing the wire.
pub fn lookup_hash(service_id: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(LOOKUP_LABEL);
    hasher.update(service_id.as_bytes());
    hex::encode(hasher.finalize())
}

/// The Noise prologue for a session: `scim-connect/1\n` followed by the lookup hash. Both sides
/// must use the lookup hash that travelled in the upgrade request; a mismatch fails the handshake.
pub fn prologue(lookup_hash: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(PROLOGUE_PREFIX.len() + lookup_hash.len());
    out.extend_from_slice(PROLOGUE_PREFIX);
    out.extend_from_slice(lookup_hash.as_bytes());
    out
}

/// Everything that can go wrong in the tunnel layer. Every variant is fatal for the session it
/// happened in: the caller closes the connection and, for an agent, reconnects.
///
/// No variant ever carries key material, a psk or the service id.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The handshake was driven wrongly or received a malformed message.
    #[error("Noise handshake failed: {0}")]
    Handshake(String),
    /// A handshake message did not authenticate. With NNpsk0 that almost always means the two
    /// sides derived different keys from different service ids.
    #[error(
        "Noise handshake message failed authentication: the agent and the hub do not hold the \
         same service id (check `service_id` in the agent configuration against the service \
         registered on the hub), or the message was altered in transit"
    )]
    HandshakeAuth,
    /// A transport message did not authenticate: it was altered, replayed, dropped or reordered.
    #[error(
        "tunnel message failed authentication (altered, replayed, dropped or reordered in \
         transit); the session must be closed"
    )]
    Decrypt,
    /// The receiving side already failed once; nothing more can be read from this session.
    #[error("the tunnel's receiving side already failed; the session must be closed")]
    ReceiverFailed,
    /// 2^64 - 1 messages were sent with one key; Noise forbids reusing the last nonce.
    #[error("Noise nonce counter exhausted; open a new session")]
    NonceExhausted,
    /// A Noise message would exceed 65535 bytes.
    #[error("message of {len} bytes exceeds the Noise limit of {max} bytes")]
    MessageTooLong { len: usize, max: usize },
    /// An encoded frame is, or would become, larger than the accepted limit.
    #[error("frame of {size} bytes exceeds the limit of {limit} bytes")]
    FrameTooLarge { size: usize, limit: usize },
    /// A frame could not be encoded with bincode.
    #[error("cannot encode frame: {0}")]
    Encode(String),
    /// Bytes that authenticated correctly do not form a valid frame (peer speaks another
    /// version, or is broken).
    #[error("cannot decode frame: {0}")]
    Decode(String),
    /// A decrypted record is malformed (missing or unknown continuation flag).
    #[error("malformed tunnel record: {0}")]
    BadRecord(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derivations_are_stable_and_separated() {
        let psk = service_psk("svc-123");
        assert_eq!(psk, service_psk("svc-123"));
        assert_ne!(psk, service_psk("svc-124"));

        let lookup = lookup_hash("svc-123");
        assert_eq!(lookup.len(), 64);
        assert!(lookup
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        // The lookup hash is public; it must not be the psk in another spelling.
        assert_ne!(lookup, hex::encode(psk));
        assert_ne!(lookup, lookup_hash("svc-124"));
    }

    #[test]
    fn prologue_binds_the_lookup_hash() {
        let lookup = lookup_hash("svc");
        let p = prologue(&lookup);
        assert!(p.starts_with(b"scim-connect/1\n"));
        assert!(p.ends_with(lookup.as_bytes()));
        assert_ne!(p, prologue(&lookup_hash("other")));
    }
}
