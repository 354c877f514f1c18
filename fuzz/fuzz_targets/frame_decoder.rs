//! The frame decoder, fed what a hostile peer controls after the handshake.
//!
//! 1. The bytes as one encoded frame (`decode_frame`: bincode 2 with the size limits). A frame
//!    that decodes must encode again and decode to the same frame.
//! 2. The bytes as a sequence of record plaintexts (`[len: u8][flag ++ chunk]...`), each
//!    encrypted with a genuine session key and fed to a `FrameOpener` with a small limit: flags,
//!    reassembly and the limit run on arbitrary input. A frame it yields is never larger than
//!    the limit, and after its first error it refuses everything.
//!
//! libFuzzer's `-malloc_limit_mb` (set by scripts/fuzz.sh) turns any allocation far beyond
//! what the input could hold into a crash.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use scim_connect::tunnel::{
    decode_frame, encode_frame, lookup_hash, prologue, service_psk, FrameOpener, Handshake,
    RecvCipher, SendCipher, TunnelError,
};

/// One genuine session, made once: a handshake per input would cost more than the decoding
/// under test. Each input gets fresh copies of its ciphers (a fuzzing-only API).
fn session() -> (SendCipher, RecvCipher) {
    static SESSION: OnceLock<(SendCipher, RecvCipher)> = OnceLock::new();
    let (send, recv) = SESSION.get_or_init(|| {
        let psk = service_psk("fuzz-service-id-0123456789");
        let p = prologue(&lookup_hash("fuzz-service-id-0123456789"));
        let mut agent = Handshake::initiator(&psk, &p);
        let mut hub = Handshake::responder(&psk, &p);
        hub.read_message(&agent.write_message(&[]).unwrap())
            .unwrap();
        agent
            .read_message(&hub.write_message(&[]).unwrap())
            .unwrap();
        let (send, _) = agent.into_transport().unwrap();
        let (_, recv) = hub.into_transport().unwrap();
        (send, recv)
    });
    (send.copy_for_fuzzing(), recv.copy_for_fuzzing())
}

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = decode_frame(data) {
        let again = encode_frame(&frame).expect("a decoded frame encodes again");
        assert_eq!(decode_frame(&again).expect("and decodes again"), frame);
    }

    let Some((&selector, mut rest)) = data.split_first() else {
        return;
    };
    // Limits from 16 bytes up: small enough that the fuzzer reaches them.
    let limit = 16 + usize::from(selector) * 64;
    let (mut send, recv) = session();
    let mut opener = FrameOpener::with_limit(recv, limit);
    let mut failed = false;
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len).min(tail.len());
        let (plaintext, next) = tail.split_at(len);
        rest = next;
        let record = send.encrypt(plaintext).expect("a small record encrypts");
        match opener.open(&record) {
            Ok(Some(frame)) => {
                assert!(!failed, "a frame after a failure");
                let size = encode_frame(&frame).map(|e| e.len()).unwrap_or(0);
                assert!(
                    size <= limit,
                    "a {size}-byte frame passed a {limit}-byte limit"
                );
            }
            Ok(None) => assert!(!failed, "a record accepted after a failure"),
            Err(TunnelError::ReceiverFailed) => assert!(failed),
            Err(_) => {
                assert!(!failed, "a second distinct error after a failure");
                failed = true;
            }
        }
    }
});
