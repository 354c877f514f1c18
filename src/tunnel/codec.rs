//! Frames to encrypted records and back.
//!
//! A [`Frame`] is encoded with bincode 2 (serde, `config::standard()`). One encoded frame can be
//! megabytes long while a Noise transport message holds at most 65535 bytes, so the encoding is
//! cut into *records*. Each record is one websocket binary message and one Noise transport
//! message: `encrypt(flag ++ chunk)`, where `flag` is [`FLAG_MORE`] when more records of the same
//! frame follow and [`FLAG_LAST`] on the final one. The flag sits inside the encryption, so a
//! peer cannot be tricked into splicing frames; the Noise nonce already orders the records.
//!
//! This module must never trust a length it has not checked: a frame is refused as soon as its
//! accumulated size would pass the limit, before any memory is reserved for it, and bincode
//! decodes with a limit too. It does no I/O.

use bincode::config::{self, Configuration, LittleEndian, Varint};
use bincode::error::DecodeError;

use super::noise::{RecvCipher, SendCipher, MAX_TRANSPORT_PLAINTEXT};
use super::TunnelError;
use crate::messages::Frame;

/// The largest encoded frame either side accepts: 16 MiB.
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// Record flag: another record of the same frame follows.
pub const FLAG_MORE: u8 = 0;
/// Record flag: this record completes the frame.
pub const FLAG_LAST: u8 = 1;

/// Bytes of an encoded frame carried by one record (one byte of each message is the flag).
pub const RECORD_CHUNK_BYTES: usize = MAX_TRANSPORT_PLAINTEXT - 1;

type Standard = Configuration<LittleEndian, Varint>;

fn encode_config() -> Standard {
    config::standard()
}

/// Frames up to this many encoded bytes (every frame but those carrying large bodies) are
/// decoded with the tighter [`SMALL_FRAME_DECODE_LIMIT`].
pub const SMALL_FRAME_BYTES: usize = 64 * 1024;

/// What bincode may claim (and so allocate) while decoding a frame of at most
/// [`SMALL_FRAME_BYTES`]. Every encoded byte accounts for at most 8 claimed bytes (a one-byte
/// varint read into a `u64`), so a genuine small frame claims at most 512 KiB; the margin is
/// twice that. Without this tier, a 10-byte frame announcing a 16 MiB string would make bincode
/// allocate 16 MiB before noticing that the bytes are not there.
pub const SMALL_FRAME_DECODE_LIMIT: usize = 16 * SMALL_FRAME_BYTES;

/// Decodes with a bincode limit of `LIMIT` claimed bytes.
fn decode_limited<const LIMIT: usize>(bytes: &[u8]) -> Result<(Frame, usize), DecodeError> {
    bincode::serde::decode_from_slice(bytes, config::standard().with_limit::<LIMIT>())
}

/// Encodes a frame with bincode 2. Refuses a frame whose encoding exceeds [`MAX_FRAME_BYTES`],
/// since the peer would refuse it anyway.
pub fn encode_frame(frame: &Frame) -> Result<Vec<u8>, TunnelError> {
    let bytes = bincode::serde::encode_to_vec(frame, encode_config())
        .map_err(|e| TunnelError::Encode(e.to_string()))?;
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(TunnelError::FrameTooLarge {
            size: bytes.len(),
            limit: MAX_FRAME_BYTES,
        });
    }
    Ok(bytes)
}

/// Decodes exactly one frame from `bytes`. Input over [`MAX_FRAME_BYTES`] is refused outright.
/// bincode runs with a limit too, so a forged length prefix cannot make it allocate more than
/// the input could hold: [`SMALL_FRAME_DECODE_LIMIT`] for a frame of up to
/// [`SMALL_FRAME_BYTES`], [`MAX_FRAME_BYTES`] otherwise. Trailing bytes after the frame are an
/// error.
pub fn decode_frame(bytes: &[u8]) -> Result<Frame, TunnelError> {
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(TunnelError::FrameTooLarge {
            size: bytes.len(),
            limit: MAX_FRAME_BYTES,
        });
    }
    let (limit, decoded) = if bytes.len() <= SMALL_FRAME_BYTES {
        (
            SMALL_FRAME_DECODE_LIMIT,
            decode_limited::<SMALL_FRAME_DECODE_LIMIT>(bytes),
        )
    } else {
        (MAX_FRAME_BYTES, decode_limited::<MAX_FRAME_BYTES>(bytes))
    };
    let (frame, used) = decoded.map_err(|e| match e {
        DecodeError::LimitExceeded => TunnelError::Decode(format!(
            "a length field claims more than a frame of {} bytes can hold (decode limit \
             {limit} bytes)",
            bytes.len()
        )),
        other => TunnelError::Decode(other.to_string()),
    })?;
    if used != bytes.len() {
        return Err(TunnelError::Decode(format!(
            "{} unexpected bytes after the frame",
            bytes.len() - used
        )));
    }
    Ok(frame)
}

/// Turns frames into encrypted records for one direction of a session.
#[derive(Debug)]
pub struct FrameSealer {
    cipher: SendCipher,
}

impl FrameSealer {
    /// Wraps the sending half of a finished handshake.
    pub fn new(cipher: SendCipher) -> Self {
        Self { cipher }
    }

    /// Encodes and encrypts one frame. Send every returned record, in order, each as one
    /// websocket binary message. If this fails the session must be closed, since records of a
    /// half-sealed frame may already have used nonces.
    pub fn seal(&mut self, frame: &Frame) -> Result<Vec<Vec<u8>>, TunnelError> {
        let encoded = encode_frame(frame)?;
        let mut chunks = encoded.chunks(RECORD_CHUNK_BYTES).peekable();
        let mut records = Vec::with_capacity(encoded.len() / RECORD_CHUNK_BYTES + 1);
        let mut plaintext = Vec::with_capacity(RECORD_CHUNK_BYTES.min(encoded.len()) + 1);
        // `chunks` yields nothing for empty input; an encoded frame is never empty, but a
        // frame must still end with a last record whatever happens.
        if chunks.peek().is_none() {
            records.push(self.cipher.encrypt(&[FLAG_LAST])?);
        }
        while let Some(chunk) = chunks.next() {
            let flag = if chunks.peek().is_some() {
                FLAG_MORE
            } else {
                FLAG_LAST
            };
            plaintext.clear();
            plaintext.push(flag);
            plaintext.extend_from_slice(chunk);
            records.push(self.cipher.encrypt(&plaintext)?);
        }
        Ok(records)
    }
}

/// Turns received records back into frames for one direction of a session.
///
/// Any error is final: the opener refuses everything afterwards, and the caller must close the
/// session.
#[derive(Debug)]
pub struct FrameOpener {
    cipher: RecvCipher,
    limit: usize,
    /// The encoded frame assembled so far; never grows past `limit`.
    partial: Vec<u8>,
    failed: bool,
}

impl FrameOpener {
    /// Wraps the receiving half of a finished handshake, accepting frames up to
    /// [`MAX_FRAME_BYTES`].
    pub fn new(cipher: RecvCipher) -> Self {
        Self::with_limit(cipher, MAX_FRAME_BYTES)
    }

    /// Like [`FrameOpener::new`] with a smaller frame limit (in encoded bytes). A limit above
    /// [`MAX_FRAME_BYTES`] is lowered to it, since [`decode_frame`] never accepts more.
    pub fn with_limit(cipher: RecvCipher, limit: usize) -> Self {
        Self {
            cipher,
            limit: limit.min(MAX_FRAME_BYTES),
            partial: Vec::new(),
            failed: false,
        }
    }

    /// Decrypts one record. Returns `Some(frame)` when it completes a frame, `None` when more
    /// records are needed.
    pub fn open(&mut self, record: &[u8]) -> Result<Option<Frame>, TunnelError> {
        if self.failed {
            return Err(TunnelError::ReceiverFailed);
        }
        let result = self.open_inner(record);
        if result.is_err() {
            self.failed = true;
            self.partial = Vec::new();
        }
        result
    }

    fn open_inner(&mut self, record: &[u8]) -> Result<Option<Frame>, TunnelError> {
        let plaintext = self.cipher.decrypt(record)?;
        let Some((&flag, chunk)) = plaintext.split_first() else {
            return Err(TunnelError::BadRecord("record without a flag byte".into()));
        };
        if flag != FLAG_MORE && flag != FLAG_LAST {
            return Err(TunnelError::BadRecord(format!(
                "unknown flag byte {flag:#04x} (expected {FLAG_MORE} or {FLAG_LAST})"
            )));
        }
        let size = self.partial.len() + chunk.len();
        if size > self.limit {
            return Err(TunnelError::FrameTooLarge {
                size,
                limit: self.limit,
            });
        }
        if size > self.partial.capacity() {
            // Grow geometrically but never past the limit, so a frame at the limit costs at most
            // `limit` bytes of buffer.
            let target = size
                .max(self.partial.capacity().saturating_mul(2))
                .min(self.limit);
            self.partial.reserve_exact(target - self.partial.len());
        }
        self.partial.extend_from_slice(chunk);
        if flag == FLAG_MORE {
            return Ok(None);
        }
        let encoded = std::mem::take(&mut self.partial);
        decode_frame(&encoded).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{
        ForwardError, ForwardRequest, ForwardResponse, HttpResponse, Scheme, TargetInfo,
        PROTOCOL_VERSION,
    };
    use crate::tunnel::{lookup_hash, prologue, service_psk, Handshake};

    fn ciphers() -> (SendCipher, RecvCipher) {
        let psk = service_psk("svc");
        let p = prologue(&lookup_hash("svc"));
        let mut a = Handshake::initiator(&psk, &p);
        let mut h = Handshake::responder(&psk, &p);
        h.read_message(&a.write_message(b"").unwrap()).unwrap();
        a.read_message(&h.write_message(b"").unwrap()).unwrap();
        let (send, _) = a.into_transport().unwrap();
        let (_, recv) = h.into_transport().unwrap();
        (send, recv)
    }

    fn channel(limit: usize) -> (FrameSealer, FrameOpener) {
        let (send, recv) = ciphers();
        (FrameSealer::new(send), FrameOpener::with_limit(recv, limit))
    }

    fn request(body_len: usize) -> Frame {
        Frame::Request(ForwardRequest {
            id: 42,
            target: "hr-app".into(),
            scheme: Scheme::Https,
            host: "hr.internal:8443".into(),
            method: "POST".into(),
            path_and_query: "/scim/v2/Users?x=1".into(),
            headers: vec![
                ("content-type".into(), b"application/scim+json".to_vec()),
                ("authorization".into(), b"Bearer t".to_vec()),
            ],
            body: (0..body_len).map(|i| (i % 251) as u8).collect(),
            skip_tls_verify: false,
            timeout_ms: 30_000,
        })
    }

    fn every_variant() -> Vec<Frame> {
        let targets = vec![
            TargetInfo { name: "a".into() },
            TargetInfo { name: "b".into() },
        ];
        vec![
            Frame::Hello {
                version: PROTOCOL_VERSION,
                agent_name: "vm-01".into(),
                instance: u64::MAX,
                targets: targets.clone(),
            },
            Frame::Welcome {
                version: PROTOCOL_VERSION,
                session_id: u64::MAX,
            },
            Frame::Targets { targets },
            request(10),
            Frame::Response(ForwardResponse {
                id: 42,
                result: Ok(HttpResponse {
                    status: 201,
                    headers: vec![("etag".into(), b"W/\"1\"".to_vec())],
                    body: b"{}".to_vec(),
                }),
            }),
            Frame::Response(ForwardResponse {
                id: 43,
                result: Err(ForwardError::ConnectRefused {
                    addr: "10.0.0.1:80".into(),
                }),
            }),
            Frame::Response(ForwardResponse {
                id: 44,
                result: Err(ForwardError::ShuttingDown),
            }),
            Frame::Cancel { id: 7 },
            Frame::Ping {
                seq: 1,
                sent_micros: 123_456,
            },
            Frame::Pong {
                seq: 1,
                sent_micros: 123_456,
            },
            Frame::Goodbye {
                reason: "shutting down".into(),
            },
        ]
    }

    #[test]
    fn every_variant_round_trips_through_the_codec() {
        for frame in every_variant() {
            let bytes = encode_frame(&frame).unwrap();
            assert_eq!(decode_frame(&bytes).unwrap(), frame);
        }
    }

    #[test]
    fn every_variant_round_trips_through_records() {
        let (mut sealer, mut opener) = channel(MAX_FRAME_BYTES);
        for frame in every_variant() {
            let records = sealer.seal(&frame).unwrap();
            assert_eq!(records.len(), 1);
            assert_eq!(opener.open(&records[0]).unwrap(), Some(frame));
        }
    }

    #[test]
    fn large_frame_splits_and_reassembles() {
        let (mut sealer, mut opener) = channel(MAX_FRAME_BYTES);
        let frame = request(3 * 1024 * 1024);
        let records = sealer.seal(&frame).unwrap();
        assert!(records.len() >= 3 * 1024 * 1024 / RECORD_CHUNK_BYTES);
        assert!(records.iter().all(|r| r.len() <= 65535));
        let (last, rest) = records.split_last().unwrap();
        for record in rest {
            assert_eq!(opener.open(record).unwrap(), None);
        }
        assert_eq!(opener.open(last).unwrap(), Some(frame));
        // The opener is ready for the next frame.
        let ping = Frame::Ping {
            seq: 2,
            sent_micros: 0,
        };
        let records = sealer.seal(&ping).unwrap();
        assert_eq!(opener.open(&records[0]).unwrap(), Some(ping));
    }

    #[test]
    fn frame_exactly_filling_records_round_trips() {
        // Find a body length whose encoding is a whole number of chunks, so no short tail.
        let (mut sealer, mut opener) = channel(MAX_FRAME_BYTES);
        let base = encode_frame(&request(0)).unwrap().len();
        // The body length prefix is a varint: 1 byte for 0, 5 bytes for lengths in 2^16..2^32.
        let body = 2 * RECORD_CHUNK_BYTES - base - 4;
        let frame = request(body);
        assert_eq!(encode_frame(&frame).unwrap().len(), 2 * RECORD_CHUNK_BYTES);
        let records = sealer.seal(&frame).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(opener.open(&records[0]).unwrap(), None);
        assert_eq!(opener.open(&records[1]).unwrap(), Some(frame));
    }

    #[test]
    fn opener_refuses_an_oversized_frame_before_buffering_it() {
        let limit = 100_000;
        let (mut sealer, mut opener) = channel(limit);
        let records = sealer.seal(&request(200_000)).unwrap();
        assert!(records.len() >= 3);
        assert_eq!(opener.open(&records[0]).unwrap(), None);
        assert!(opener.partial.capacity() <= limit);
        match opener.open(&records[1]) {
            Err(TunnelError::FrameTooLarge { size, limit: l }) => {
                assert_eq!(l, limit);
                assert_eq!(size, 2 * RECORD_CHUNK_BYTES);
            }
            other => panic!("expected FrameTooLarge, got {other:?}"),
        }
        assert!(opener.partial.capacity() <= limit);
        // The session is over.
        assert!(matches!(
            opener.open(&records[2]),
            Err(TunnelError::ReceiverFailed)
        ));
    }

    #[test]
    fn opener_buffer_never_exceeds_the_limit() {
        let limit = 3 * RECORD_CHUNK_BYTES + 10;
        let (mut sealer, mut opener) = channel(limit);
        let frame = request(limit - 200);
        let encoded_len = encode_frame(&frame).unwrap().len();
        assert!(encoded_len <= limit);
        let records = sealer.seal(&frame).unwrap();
        let (last, rest) = records.split_last().unwrap();
        for record in rest {
            assert_eq!(opener.open(record).unwrap(), None);
            assert!(opener.partial.capacity() <= limit);
        }
        assert_eq!(opener.open(last).unwrap(), Some(frame));
    }

    #[test]
    fn encode_and_decode_refuse_frames_over_the_limit() {
        let big = request(MAX_FRAME_BYTES);
        assert!(matches!(
            encode_frame(&big),
            Err(TunnelError::FrameTooLarge { .. })
        ));
        let bytes = vec![0u8; MAX_FRAME_BYTES + 1];
        assert!(matches!(
            decode_frame(&bytes),
            Err(TunnelError::FrameTooLarge { size, limit })
                if size == MAX_FRAME_BYTES + 1 && limit == MAX_FRAME_BYTES
        ));
    }

    #[test]
    fn forged_length_prefix_is_a_decode_error() {
        // Variant 8 (Goodbye), then a varint string length (0xFD = u64 follows) of 2^62:
        // bincode must refuse it from the limit, not try to allocate it.
        let mut bytes = vec![8u8, 0xFD];
        bytes.extend_from_slice(&(1u64 << 62).to_le_bytes());
        match decode_frame(&bytes) {
            Err(TunnelError::Decode(msg)) => assert!(msg.contains("limit"), "{msg}"),
            other => panic!("expected a Decode error, got {other:?}"),
        }
        // Same for a Vec<u8> body length inside a Request.
        let mut encoded = encode_frame(&request(0)).unwrap();
        encoded.truncate(encoded.len() - 1);
        assert!(matches!(
            decode_frame(&encoded),
            Err(TunnelError::Decode(_))
        ));
    }

    #[test]
    fn a_small_frame_cannot_claim_more_than_it_could_hold() {
        // Goodbye (variant 8) whose reason claims 2 MiB (0xFC: a u32 length follows). That is
        // within the 16 MiB frame limit, but a 6-byte frame cannot hold it: bincode must refuse
        // the claim (LimitExceeded, checked before it allocates), not allocate 2 MiB and then
        // find the input too short.
        let mut bytes = vec![8u8, 0xFC];
        bytes.extend_from_slice(&(2u32 << 20).to_le_bytes());
        match decode_frame(&bytes) {
            Err(TunnelError::Decode(msg)) => assert!(msg.contains("limit"), "{msg}"),
            other => panic!("expected a Decode error naming the limit, got {other:?}"),
        }
        // Just under the tier's limit the claim passes and the short input is what fails.
        let mut bytes = vec![8u8, 0xFC];
        bytes.extend_from_slice(&((SMALL_FRAME_DECODE_LIMIT - 64) as u32).to_le_bytes());
        match decode_frame(&bytes) {
            Err(TunnelError::Decode(msg)) => assert!(!msg.contains("limit"), "{msg}"),
            other => panic!("expected a Decode error, got {other:?}"),
        }
    }

    #[test]
    fn the_small_tier_never_refuses_a_genuine_frame() {
        // The worst claimed-to-encoded ratio: one byte per element that claims 8 (an empty
        // name is a one-byte varint length read as a u64).
        let targets = vec![
            TargetInfo {
                name: String::new()
            };
            SMALL_FRAME_BYTES - 8
        ];
        let frame = Frame::Targets { targets };
        let bytes = encode_frame(&frame).unwrap();
        assert!(bytes.len() <= SMALL_FRAME_BYTES, "{}", bytes.len());
        assert_eq!(decode_frame(&bytes).unwrap(), frame);
        // A frame just over the tier boundary decodes with the full limit.
        let frame = request(SMALL_FRAME_BYTES);
        let bytes = encode_frame(&frame).unwrap();
        assert!(bytes.len() > SMALL_FRAME_BYTES);
        assert_eq!(decode_frame(&bytes).unwrap(), frame);
    }

    #[test]
    fn garbage_is_a_decode_error_not_a_panic() {
        let samples: Vec<Vec<u8>> = vec![
            vec![],
            vec![0xFF],
            vec![200, 1, 2, 3],
            vec![0, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF],
            (0..=255u8).collect(),
            (0..=255u8).rev().cycle().take(5000).collect(),
        ];
        for bytes in samples {
            assert!(
                matches!(decode_frame(&bytes), Err(TunnelError::Decode(_))),
                "{bytes:?}"
            );
        }
        // Pseudo-random bytes with a deterministic generator.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for len in 0..300 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            // Some random inputs may happen to be a valid frame; none may panic.
            let _ = decode_frame(&bytes);
        }
    }

    #[test]
    fn committed_frame_seeds_decode() {
        // The fuzz seeds are written by hand (fuzz/seeds/make_seeds.py); they must stay
        // genuine frames, one of each variant.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/frame_decoder");
        let mut variants = std::collections::HashSet::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if !name.starts_with("frame-") {
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            let frame = decode_frame(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(
                encode_frame(&frame).unwrap(),
                bytes,
                "{name} is not canonical"
            );
            variants.insert(std::mem::discriminant(&frame));
        }
        assert_eq!(
            variants.len(),
            every_variant()
                .iter()
                .map(std::mem::discriminant)
                .collect::<std::collections::HashSet<_>>()
                .len()
        );
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = encode_frame(&Frame::Cancel { id: 1 }).unwrap();
        bytes.push(0);
        assert!(matches!(decode_frame(&bytes), Err(TunnelError::Decode(_))));
    }

    #[test]
    fn bad_flag_byte_is_an_error() {
        let (mut send, recv) = ciphers();
        let mut opener = FrameOpener::new(recv);
        let mut plaintext = vec![2u8];
        plaintext.extend(encode_frame(&Frame::Cancel { id: 1 }).unwrap());
        let record = send.encrypt(&plaintext).unwrap();
        assert!(matches!(
            opener.open(&record),
            Err(TunnelError::BadRecord(_))
        ));
    }

    #[test]
    fn empty_record_is_an_error() {
        let (mut send, recv) = ciphers();
        let mut opener = FrameOpener::new(recv);
        let record = send.encrypt(b"").unwrap();
        assert!(matches!(
            opener.open(&record),
            Err(TunnelError::BadRecord(_))
        ));
    }

    #[test]
    fn tampered_or_reordered_records_fail() {
        let (mut sealer, mut opener) = channel(MAX_FRAME_BYTES);
        let records = sealer.seal(&request(200_000)).unwrap();
        assert!(matches!(
            opener.open(&records[1]),
            Err(TunnelError::Decrypt)
        ));

        let (mut sealer, mut opener) = channel(MAX_FRAME_BYTES);
        let mut records = sealer.seal(&request(10)).unwrap();
        records[0][5] ^= 1;
        assert!(matches!(
            opener.open(&records[0]),
            Err(TunnelError::Decrypt)
        ));
    }

    #[test]
    fn a_frame_cannot_be_cut_short_by_a_forged_last_flag() {
        // An attacker without the key cannot turn a "more" record into a "last" one: the flag
        // is encrypted, so flipping it breaks authentication.
        let (mut sealer, mut opener) = channel(MAX_FRAME_BYTES);
        let mut records = sealer.seal(&request(100_000)).unwrap();
        let first = &mut records[0];
        first[0] ^= FLAG_MORE ^ FLAG_LAST;
        assert!(matches!(opener.open(first), Err(TunnelError::Decrypt)));
    }
}
