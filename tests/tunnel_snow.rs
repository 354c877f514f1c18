//! Interoperability of our Noise implementation with the `snow` crate, in both roles.
//!
//! If our handshake deviated from the Noise specification in any step (hashing, key mixing,
//! nonce layout, psk handling, split order), snow would fail to authenticate our messages or we
//! would fail on its, and the handshake hashes would differ.

use scim_connect::tunnel::{
    lookup_hash, prologue, service_psk, FrameOpener, FrameSealer, Handshake, RecvCipher,
    SendCipher, NOISE_PROTOCOL,
};
use snow::{Builder, HandshakeState, TransportState};

const SERVICE_ID: &str = "svc-4f1c2a9e-interop";

fn snow_state(initiator: bool, psk: &[u8; 32], prologue: &[u8]) -> HandshakeState {
    let builder = Builder::new(
        NOISE_PROTOCOL
            .parse()
            .expect("snow knows the protocol name"),
    )
    .psk(0, psk)
    .expect("psk accepted")
    .prologue(prologue)
    .expect("prologue accepted");
    if initiator {
        builder.build_initiator().expect("snow initiator")
    } else {
        builder.build_responder().expect("snow responder")
    }
}

fn snow_write(state: &mut HandshakeState, payload: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; 65535];
    let n = state.write_message(payload, &mut buf).expect("snow writes");
    buf.truncate(n);
    buf
}

fn snow_read(state: &mut HandshakeState, message: &[u8]) -> Result<Vec<u8>, snow::Error> {
    let mut buf = vec![0u8; 65535];
    let n = state.read_message(message, &mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

fn snow_encrypt(t: &mut TransportState, plaintext: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; 65535];
    let n = t.write_message(plaintext, &mut buf).expect("snow encrypts");
    buf.truncate(n);
    buf
}

fn snow_decrypt(t: &mut TransportState, ciphertext: &[u8]) -> Result<Vec<u8>, snow::Error> {
    let mut buf = vec![0u8; 65535];
    let n = t.read_message(ciphertext, &mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

/// Messages of assorted sizes, including empty and the transport maximum.
fn samples() -> Vec<Vec<u8>> {
    vec![
        Vec::new(),
        b"GET /scim/v2/Users".to_vec(),
        (0..1000u32).map(|i| i as u8).collect(),
        vec![0x5A; 65535 - 16],
    ]
}

fn exchange(send: &mut SendCipher, recv: &mut RecvCipher, snow_t: &mut TransportState) {
    for _round in 0..3 {
        for msg in samples() {
            let c = send.encrypt(&msg).unwrap();
            assert_eq!(snow_decrypt(snow_t, &c).expect("snow decrypts ours"), msg);
            let c = snow_encrypt(snow_t, &msg);
            assert_eq!(recv.decrypt(&c).expect("we decrypt snow's"), msg);
        }
    }
}

#[test]
fn our_initiator_with_snow_responder() {
    let psk = service_psk(SERVICE_ID);
    let p = prologue(&lookup_hash(SERVICE_ID));
    let mut ours = Handshake::initiator(&psk, &p);
    let mut theirs = snow_state(false, &psk, &p);

    let m1 = ours.write_message(b"agent hello").unwrap();
    assert_eq!(snow_read(&mut theirs, &m1).unwrap(), b"agent hello");
    let m2 = snow_write(&mut theirs, b"hub hello");
    assert_eq!(ours.read_message(&m2).unwrap(), b"hub hello");

    assert!(ours.is_finished());
    assert!(theirs.is_handshake_finished());
    assert_eq!(&ours.handshake_hash()[..], theirs.get_handshake_hash());

    let (mut send, mut recv) = ours.into_transport().unwrap();
    let mut t = theirs.into_transport_mode().unwrap();
    exchange(&mut send, &mut recv, &mut t);
}

#[test]
fn snow_initiator_with_our_responder() {
    let psk = service_psk(SERVICE_ID);
    let p = prologue(&lookup_hash(SERVICE_ID));
    let mut theirs = snow_state(true, &psk, &p);
    let mut ours = Handshake::responder(&psk, &p);

    let m1 = snow_write(&mut theirs, b"agent hello");
    assert_eq!(ours.read_message(&m1).unwrap(), b"agent hello");
    let m2 = ours.write_message(b"hub hello").unwrap();
    assert_eq!(snow_read(&mut theirs, &m2).unwrap(), b"hub hello");

    assert!(ours.is_finished());
    assert!(theirs.is_handshake_finished());
    assert_eq!(&ours.handshake_hash()[..], theirs.get_handshake_hash());

    let (mut send, mut recv) = ours.into_transport().unwrap();
    let mut t = theirs.into_transport_mode().unwrap();
    exchange(&mut send, &mut recv, &mut t);
}

#[test]
fn empty_handshake_payloads_interoperate() {
    let psk = service_psk(SERVICE_ID);
    let p = prologue(&lookup_hash(SERVICE_ID));
    let mut ours = Handshake::initiator(&psk, &p);
    let mut theirs = snow_state(false, &psk, &p);
    let m1 = ours.write_message(b"").unwrap();
    // 32-byte ephemeral plus the tag of the (empty) encrypted payload.
    assert_eq!(m1.len(), 48);
    assert_eq!(snow_read(&mut theirs, &m1).unwrap(), b"");
    let m2 = snow_write(&mut theirs, b"");
    assert_eq!(m2.len(), 48);
    assert_eq!(ours.read_message(&m2).unwrap(), b"");
    assert_eq!(&ours.handshake_hash()[..], theirs.get_handshake_hash());
}

#[test]
fn snow_refuses_our_message_under_a_different_service_id() {
    let p = prologue(&lookup_hash(SERVICE_ID));
    let mut ours = Handshake::initiator(&service_psk("another-service"), &p);
    let mut theirs = snow_state(false, &service_psk(SERVICE_ID), &p);
    let m1 = ours.write_message(b"").unwrap();
    assert!(snow_read(&mut theirs, &m1).is_err());
}

#[test]
fn we_refuse_snow_message_under_a_different_service_id() {
    let p = prologue(&lookup_hash(SERVICE_ID));
    let mut theirs = snow_state(true, &service_psk("another-service"), &p);
    let mut ours = Handshake::responder(&service_psk(SERVICE_ID), &p);
    let m1 = snow_write(&mut theirs, b"");
    assert!(ours.read_message(&m1).is_err());
    assert!(!ours.is_finished());
    assert!(ours.into_transport().is_err());
}

#[test]
fn records_sealed_by_us_are_plain_noise_transport_messages() {
    // A record is one Noise transport message: snow must be able to open it, and we must be able
    // to open a record snow built with the same layout.
    let psk = service_psk(SERVICE_ID);
    let p = prologue(&lookup_hash(SERVICE_ID));
    let mut ours = Handshake::initiator(&psk, &p);
    let mut theirs = snow_state(false, &psk, &p);
    snow_read(&mut theirs, &ours.write_message(b"").unwrap()).unwrap();
    ours.read_message(&snow_write(&mut theirs, b"")).unwrap();
    let (send, recv) = ours.into_transport().unwrap();
    let mut t = theirs.into_transport_mode().unwrap();

    let frame = scim_connect::messages::Frame::Ping {
        seq: 9,
        sent_micros: 77,
    };
    let mut sealer = FrameSealer::new(send);
    let records = sealer.seal(&frame).unwrap();
    assert_eq!(records.len(), 1);
    let plain = snow_decrypt(&mut t, &records[0]).unwrap();
    assert_eq!(plain[0], 1, "last-record flag");
    assert_eq!(
        scim_connect::tunnel::decode_frame(&plain[1..]).unwrap(),
        frame
    );

    let mut opener = FrameOpener::new(recv);
    let mut record = vec![1u8];
    record.extend(scim_connect::tunnel::encode_frame(&frame).unwrap());
    let c = snow_encrypt(&mut t, &record);
    assert_eq!(opener.open(&c).unwrap(), Some(frame));
}
