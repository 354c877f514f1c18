//! The Noise handshake's message parsing, in both roles.
//!
//! - Message 1 at the hub's responder: the input as the message, and a genuine message 1
//!   changed by the input (bytes XORed in, cut short or extended).
//! - Message 2 at the agent's initiator (after it wrote message 1): the input as the message,
//!   or a genuine message 2 changed by the input; the first byte chooses.
//!
//! Properties: without the key nothing authenticates; an unchanged genuine message is accepted
//! and any change refused; a side that failed refuses to go on and yields no transport. A
//! responder reading message 1 does no Diffie-Hellman, so that half is cheap; message 2 costs a
//! few scalar multiplications, hence one initiator per input.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use scim_connect::tunnel::{lookup_hash, prologue, service_psk, Handshake};

const ID: &str = "fuzz-service-id-0123456789";

fn keys() -> ([u8; 32], Vec<u8>) {
    (service_psk(ID), prologue(&lookup_hash(ID)))
}

/// A genuine message 1, made once (reading it needs no secret of the writer's).
fn genuine_first() -> &'static [u8] {
    static FIRST: OnceLock<Vec<u8>> = OnceLock::new();
    FIRST.get_or_init(|| {
        let (psk, p) = keys();
        Handshake::initiator(&psk, &p).write_message(&[]).unwrap()
    })
}

/// Applies the input to a genuine message: `how` says how (0: XOR the input in, 1: cut to the
/// input's first byte, 2: append the input).
fn alter(message: &[u8], how: u8, input: &[u8]) -> Vec<u8> {
    let mut out = message.to_vec();
    match how % 3 {
        0 => {
            for (byte, x) in out.iter_mut().zip(input) {
                *byte ^= x;
            }
        }
        1 => out.truncate(input.first().map_or(0, |&n| usize::from(n))),
        _ => out.extend_from_slice(input),
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let (psk, p) = keys();

    let mut hub = Handshake::responder(&psk, &p);
    if hub.read_message(data).is_err() {
        assert!(hub.write_message(&[]).is_err());
        assert!(hub.into_transport().is_err());
    }

    let Some((&mode, input)) = data.split_first() else {
        return;
    };
    let first = genuine_first();
    let altered = alter(first, mode >> 1, input);
    let accepted = Handshake::responder(&psk, &p)
        .read_message(&altered)
        .is_ok();
    assert_eq!(
        accepted,
        altered == first,
        "altered message 1 accepted: {accepted}"
    );

    let mut agent = Handshake::initiator(&psk, &p);
    let first = agent.write_message(&[]).unwrap();
    let (second, genuine) = if mode & 1 == 0 {
        (input.to_vec(), None)
    } else {
        let mut hub = Handshake::responder(&psk, &p);
        hub.read_message(&first).unwrap();
        let second = hub.write_message(&[]).unwrap();
        (alter(&second, mode >> 1, input), Some((second, hub)))
    };
    match agent.read_message(&second) {
        Ok(_) => {
            let (genuine, hub) = genuine.expect("only a genuine message 2 authenticates");
            assert_eq!(second, genuine, "an altered message 2 was accepted");
            assert_eq!(agent.handshake_hash(), hub.handshake_hash());
            assert!(agent.into_transport().is_ok());
        }
        Err(_) => {
            if let Some((genuine, _)) = genuine {
                assert_ne!(second, genuine, "an unchanged message 2 was refused");
            }
            assert!(!agent.is_finished());
            assert!(agent.into_transport().is_err());
        }
    }
});
