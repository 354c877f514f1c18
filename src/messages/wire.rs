//! Frames exchanged between agent and hub once the Noise handshake has finished.
//!
//! Every frame is encoded with bincode 2 and travels encrypted; nothing here is ever sent in
//! clear. Frames are versioned through [`Frame::Hello`]: a peer that sees a version it does not
//! speak says goodbye instead of guessing.

use serde::{Deserialize, Serialize};

/// Version of the frame vocabulary below. Bump on any incompatible change.
/// 2: `Hello` carries the agent's instance id.
pub const PROTOCOL_VERSION: u16 = 2;

/// One unit of the tunnel protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// First frame from the agent: who it is and which targets it forwards to.
    Hello {
        version: u16,
        /// Free-form agent name (host name by default), shown to administrators.
        agent_name: String,
        /// Random for each agent process and the same on all its reconnections: the hub drops
        /// an older session with the same instance at once, since the agent has given it up
        /// (e.g. after a silent network death), while two agents of one service never share
        /// an instance even when they share a name.
        instance: u64,
        targets: Vec<TargetInfo>,
    },
    /// The hub's answer to `Hello`: the session is registered and may receive requests.
    Welcome {
        version: u16,
        session_id: u64,
    },
    /// The agent's declared target set changed (sent without reconnecting).
    Targets {
        targets: Vec<TargetInfo>,
    },
    /// Hub → agent: forward one HTTP request to a declared target.
    Request(ForwardRequest),
    /// Agent → hub: the outcome of one forwarded request.
    Response(ForwardResponse),
    /// Hub → agent: the hub no longer waits for this request.
    Cancel {
        id: u64,
    },
    /// Liveness probe, either direction. `sent_micros` is echoed unchanged in the `Pong`.
    Ping {
        seq: u64,
        sent_micros: u64,
    },
    Pong {
        seq: u64,
        sent_micros: u64,
    },
    /// The sender is going away on purpose: stop routing to it at once.
    Goodbye {
        reason: String,
    },
}

/// A target as advertised to the hub. Only the name leaves the VM: addresses stay local.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TargetInfo {
    pub name: String,
}

/// The scheme of the application's SCIM base URL. It decides TLS toward the target unless the
/// target's own `always_tls` / `no_tls` setting overrides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Scheme {
    Http,
    Https,
}

/// One HTTP request the hub asks the agent to forward.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardRequest {
    /// Unique per tunnel session; the response carries the same id.
    pub id: u64,
    /// Name of a target declared in the agent's config.ini.
    pub target: String,
    pub scheme: Scheme,
    /// Host (and optional port) from the base URL: used for SNI and the `Host` header, never
    /// for choosing where to connect.
    pub host: String,
    pub method: String,
    /// Absolute path with optional query, e.g. `/scim/v2/Users?startIndex=1`.
    pub path_and_query: String,
    #[serde(with = "header_list")]
    pub headers: Vec<(String, Vec<u8>)>,
    #[serde(with = "byte_string")]
    pub body: Vec<u8>,
    /// The application asks to skip certificate checks. Honoured only when the target was also
    /// declared with `insecure_allow_skip_tls_check`.
    pub skip_tls_verify: bool,
    /// How long the agent may take before answering with [`ForwardError::ResponseTimeout`].
    pub timeout_ms: u32,
}

/// The answer to a [`ForwardRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardResponse {
    pub id: u64,
    pub result: Result<HttpResponse, ForwardError>,
}

/// What the target answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpResponse {
    pub status: u16,
    #[serde(with = "header_list")]
    pub headers: Vec<(String, Vec<u8>)>,
    #[serde(with = "byte_string")]
    pub body: Vec<u8>,
}

/// Why the agent could not obtain a response. Typed so the hub can name the actionable cause.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ForwardError {
    #[error("target `{name}` is not declared on the agent")]
    UndeclaredTarget { name: String },
    #[error("request refused by the agent: {reason}")]
    Refused { reason: String },
    #[error("connection to {addr} refused")]
    ConnectRefused { addr: String },
    #[error("connection to {addr} timed out")]
    ConnectTimeout { addr: String },
    #[error("cannot resolve {addr}: {detail}")]
    Dns { addr: String, detail: String },
    #[error("TLS handshake with {addr} failed: {detail}")]
    Tls { addr: String, detail: String },
    #[error("no response from {addr} within {timeout_ms} ms")]
    ResponseTimeout { addr: String, timeout_ms: u32 },
    #[error("response from {addr} exceeds {limit} bytes")]
    TooLarge { addr: String, limit: u64 },
    #[error("network error talking to {addr}: {detail}")]
    Network { addr: String, detail: String },
    #[error("agent internal error: {detail}")]
    Internal { detail: String },
    #[error("agent is shutting down")]
    ShuttingDown,
    /// The agent already holds as many requests for this target as it accepts; this one was
    /// never sent to the target.
    #[error("target `{name}` already has {queued} requests waiting on the agent")]
    Busy { name: String, queued: u32 },
}

/// A `Vec<u8>` as one serde byte string rather than a sequence of `u8`s. bincode encodes both
/// alike (a length, then the bytes), so the wire format is unchanged; but a sequence is encoded
/// and decoded one byte at a time through serde, which was a fifth of the hub's instructions per
/// forwarded request (README, Benchmarks). Formats that write bytes as an array (JSON) still
/// read back.
mod byte_string {
    use std::fmt;

    use serde::de::{SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        deserializer.deserialize_byte_buf(ByteStringVisitor)
    }

    pub(super) struct ByteStringVisitor;

    impl<'de> Visitor<'de> for ByteStringVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a byte string")
        }

        fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            // Never trust a size hint for more than a small start.
            let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
            while let Some(byte) = seq.next_element::<u8>()? {
                bytes.push(byte);
            }
            Ok(bytes)
        }
    }
}

/// Header lists (`Vec<(name, value)>`) with each value as a byte string; see [`byte_string`].
mod header_list {
    use serde::ser::SerializeSeq;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    struct Value<'a>(&'a [u8]);

    impl Serialize for Value<'_> {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.serialize_bytes(self.0)
        }
    }

    struct OwnedValue(Vec<u8>);

    impl<'de> Deserialize<'de> for OwnedValue {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            deserializer
                .deserialize_byte_buf(super::byte_string::ByteStringVisitor)
                .map(OwnedValue)
        }
    }

    pub fn serialize<S: Serializer>(
        headers: &[(String, Vec<u8>)],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(headers.len()))?;
        for (name, value) in headers {
            seq.serialize_element(&(name, Value(value)))?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<(String, Vec<u8>)>, D::Error> {
        let headers = Vec::<(String, OwnedValue)>::deserialize(deserializer)?;
        Ok(headers
            .into_iter()
            .map(|(name, value)| (name, value.0))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bincode::config::standard;

    fn headers() -> Vec<(String, Vec<u8>)> {
        vec![
            ("content-type".into(), b"application/scim+json".to_vec()),
            ("etag".into(), vec![b'W', b'/', 0xff, 0x00]),
        ]
    }

    /// The byte-string encoding must be the one plain `Vec<u8>` fields had, byte for byte, so
    /// that agents and hubs of either side of the change still understand each other.
    #[test]
    fn bodies_and_headers_encode_as_before() {
        let body: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
        let response = Frame::Response(ForwardResponse {
            id: 7,
            result: Ok(HttpResponse {
                status: 200,
                headers: headers(),
                body: body.clone(),
            }),
        });
        // The same frame as plain serde data: enum variants are their indexes, structs their
        // fields in order, and the byte fields plain `Vec<u8>` sequences.
        let plain = (4u32, 7u64, 0u32, 200u16, headers(), body.clone());
        let new = bincode::serde::encode_to_vec(&response, standard()).unwrap();
        assert_eq!(
            new,
            bincode::serde::encode_to_vec(&plain, standard()).unwrap()
        );
        let (back, _): (Frame, usize) =
            bincode::serde::decode_from_slice(&new, standard()).unwrap();
        assert_eq!(back, response);

        let request = Frame::Request(ForwardRequest {
            id: 9,
            target: "crm".into(),
            scheme: Scheme::Https,
            host: "crm.example".into(),
            method: "PUT".into(),
            path_and_query: "/scim/v2/Users/1".into(),
            headers: headers(),
            body: body.clone(),
            skip_tls_verify: false,
            timeout_ms: 30_000,
        });
        let plain = (
            3u32,
            9u64,
            "crm",
            1u32,
            "crm.example",
            "PUT",
            "/scim/v2/Users/1",
            headers(),
            body,
            false,
            30_000u32,
        );
        let new = bincode::serde::encode_to_vec(&request, standard()).unwrap();
        assert_eq!(
            new,
            bincode::serde::encode_to_vec(&plain, standard()).unwrap()
        );
        let (back, _): (Frame, usize) =
            bincode::serde::decode_from_slice(&new, standard()).unwrap();
        assert_eq!(back, request);
    }

    #[test]
    fn byte_fields_still_read_back_from_json_arrays() {
        let response = HttpResponse {
            status: 201,
            headers: headers(),
            body: b"{}".to_vec(),
        };
        let json = serde_json::to_string(&response).unwrap();
        assert!(json.contains("\"body\":[123,125]"), "{json}");
        assert_eq!(
            serde_json::from_str::<HttpResponse>(&json).unwrap(),
            response
        );
    }
}
