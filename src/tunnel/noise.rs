//! The Noise protocol `Noise_NNpsk0_25519_ChaChaPoly_SHA256`, written against the Noise
//! Protocol Framework specification, revision 34.
//!
//! The layering follows the spec one to one:
//! - [`CipherState`] is §5.1: a key `k` (possibly empty) and a 64-bit nonce `n`;
//!   `EncryptWithAd` / `DecryptWithAd` pass plaintext through unchanged while `k` is empty, and
//!   otherwise use ChaCha20-Poly1305 with the 96-bit nonce `0x00000000 || n` (little-endian `n`,
//!   §12.3). The nonce value 2^64-1 is reserved and never used (§5.1). A failed decryption does not
//!   advance `n` (§5.1); the transport wrappers below additionally refuse any further use.
//! - [`SymmetricState`] is §5.2: chaining key `ck`, handshake hash `h`, and `MixKey`, `MixHash`,
//!   `MixKeyAndHash`, `EncryptAndHash`, `DecryptAndHash`, `Split`. `HKDF` is §4.3's construction
//!   with HMAC-SHA256, which equals RFC 5869 extract (salt = `ck`) then expand with empty info.
//! - [`Handshake`] is §5.3's HandshakeState restricted to what NNpsk0 needs: the tokens `e`,
//!   `ee` and `psk` (§7, §9). Pattern: `-> psk, e` then `<- e, ee`. Because this is a psk
//!   handshake, every `e` token also performs `MixKey(e.public_key)` (§9.2), which is what lets
//!   the first message's payload be encrypted.
//!
//! The protocol name is 36 bytes, longer than `HASHLEN`, so `h` starts as its SHA-256 (§5.2
//! `InitializeSymmetric`). DH is X25519 (§12.1); a peer's ephemeral that is a low-order point is
//! refused, since it would make the `ee` secret predictable.
//!
//! This module must never expose key material: the secret types zero themselves on drop and the
//! `Debug` impls print only non-secret state.

use std::fmt;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hkdf::Hkdf;
use sha2::{Digest, Sha256};
use x25519_dalek::{EphemeralSecret, PublicKey};
use zeroize::Zeroize;

use super::{TunnelError, NOISE_PROTOCOL};

/// `HASHLEN` for SHA-256.
const HASHLEN: usize = 32;
/// `DHLEN` for X25519.
const DHLEN: usize = 32;
/// Poly1305 tag length.
const TAGLEN: usize = 16;
/// Noise messages, handshake or transport, are at most 65535 bytes (§3).
pub const MAX_MESSAGE_LEN: usize = 65535;
/// The largest plaintext one transport message can carry.
pub const MAX_TRANSPORT_PLAINTEXT: usize = MAX_MESSAGE_LEN - TAGLEN;

/// A 32-byte secret (cipher key, chaining key, psk) that is wiped when dropped.
#[derive(Clone)]
struct SecretBytes([u8; 32]);

impl Drop for SecretBytes {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// Noise `HKDF(chaining_key, input_key_material, num_outputs)` (§4.3) with HMAC-SHA256.
///
/// RFC 5869 with salt = `chaining_key` and empty info computes `temp_key = HMAC(ck, ikm)`,
/// `output1 = HMAC(temp_key, 0x01)`, `output_i = HMAC(temp_key, output_{i-1} || i)`, which is
/// exactly the spec's definition.
fn hkdf<const N: usize>(chaining_key: &SecretBytes, ikm: &[u8]) -> [SecretBytes; N] {
    let kdf = Hkdf::<Sha256>::new(Some(&chaining_key.0), ikm);
    let mut okm = [0u8; 96];
    kdf.expand(&[], &mut okm[..N * HASHLEN])
        .expect("at most 3 * HASHLEN bytes, far below the HKDF limit of 255 * HASHLEN");
    let out = std::array::from_fn(|i| {
        let mut block = [0u8; 32];
        block.copy_from_slice(&okm[i * HASHLEN..(i + 1) * HASHLEN]);
        SecretBytes(block)
    });
    okm.zeroize();
    out
}

/// §5.1 CipherState: an optional key and a nonce counter.
pub(crate) struct CipherState {
    /// `None` is the spec's "empty" key. The AEAD instance holds the key; chacha20poly1305 is
    /// built with its `zeroize` feature so the key is wiped on drop.
    cipher: Option<ChaCha20Poly1305>,
    n: u64,
}

impl CipherState {
    /// `InitializeKey(empty)`.
    fn empty() -> Self {
        Self { cipher: None, n: 0 }
    }

    /// `InitializeKey(key)`: set the key and reset the nonce to zero.
    fn initialize_key(&mut self, key: &SecretBytes) {
        let key: &Key = (&key.0).into();
        self.cipher = Some(ChaCha20Poly1305::new(key));
        self.n = 0;
    }

    /// `HasKey()`.
    fn has_key(&self) -> bool {
        self.cipher.is_some()
    }

    /// §12.3: 32 bits of zeros followed by the little-endian 64-bit counter.
    fn nonce(n: u64) -> Nonce {
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&n.to_le_bytes());
        nonce.into()
    }

    /// `EncryptWithAd(ad, plaintext)`.
    fn encrypt_with_ad(&mut self, ad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, TunnelError> {
        let Some(cipher) = &self.cipher else {
            return Ok(plaintext.to_vec());
        };
        if self.n == u64::MAX {
            return Err(TunnelError::NonceExhausted);
        }
        let ciphertext = cipher
            .encrypt(
                &Self::nonce(self.n),
                Payload {
                    msg: plaintext,
                    aad: ad,
                },
            )
            // ChaCha20-Poly1305 only refuses inputs of ~256 GiB; callers cap at 64 KiB.
            .map_err(|_| TunnelError::MessageTooLong {
                len: plaintext.len(),
                max: MAX_TRANSPORT_PLAINTEXT,
            })?;
        self.n += 1;
        Ok(ciphertext)
    }

    /// `DecryptWithAd(ad, ciphertext)`. On failure `n` is left unchanged (§5.1).
    fn decrypt_with_ad(&mut self, ad: &[u8], ciphertext: &[u8]) -> Result<Vec<u8>, TunnelError> {
        let Some(cipher) = &self.cipher else {
            return Ok(ciphertext.to_vec());
        };
        if self.n == u64::MAX {
            return Err(TunnelError::NonceExhausted);
        }
        let plaintext = cipher
            .decrypt(
                &Self::nonce(self.n),
                Payload {
                    msg: ciphertext,
                    aad: ad,
                },
            )
            .map_err(|_| TunnelError::Decrypt)?;
        self.n += 1;
        Ok(plaintext)
    }
}

/// §5.2 SymmetricState.
pub(crate) struct SymmetricState {
    cs: CipherState,
    ck: SecretBytes,
    h: [u8; HASHLEN],
}

impl SymmetricState {
    /// `InitializeSymmetric(protocol_name)`.
    fn initialize(protocol_name: &[u8]) -> Self {
        let mut h = [0u8; HASHLEN];
        if protocol_name.len() <= HASHLEN {
            h[..protocol_name.len()].copy_from_slice(protocol_name);
        } else {
            h = Sha256::digest(protocol_name).into();
        }
        Self {
            cs: CipherState::empty(),
            ck: SecretBytes(h),
            h,
        }
    }

    /// `MixKey(input_key_material)`.
    fn mix_key(&mut self, ikm: &[u8]) {
        let [ck, temp_k] = hkdf::<2>(&self.ck, ikm);
        self.ck = ck;
        self.cs.initialize_key(&temp_k);
    }

    /// `MixHash(data)`: `h = HASH(h || data)`.
    fn mix_hash(&mut self, data: &[u8]) {
        let mut hasher = Sha256::new();
        hasher.update(self.h);
        hasher.update(data);
        self.h = hasher.finalize().into();
    }

    /// `MixKeyAndHash(input_key_material)`, used by the `psk` token.
    fn mix_key_and_hash(&mut self, ikm: &[u8]) {
        let [ck, temp_h, temp_k] = hkdf::<3>(&self.ck, ikm);
        self.ck = ck;
        self.mix_hash(&temp_h.0);
        self.cs.initialize_key(&temp_k);
    }

    /// `EncryptAndHash(plaintext)`.
    fn encrypt_and_hash(&mut self, plaintext: &[u8]) -> Result<Vec<u8>, TunnelError> {
        let ciphertext = self.cs.encrypt_with_ad(&self.h, plaintext)?;
        self.mix_hash(&ciphertext);
        Ok(ciphertext)
    }

    /// `DecryptAndHash(ciphertext)`.
    fn decrypt_and_hash(&mut self, ciphertext: &[u8]) -> Result<Vec<u8>, TunnelError> {
        let plaintext = self.cs.decrypt_with_ad(&self.h, ciphertext)?;
        self.mix_hash(ciphertext);
        Ok(plaintext)
    }

    /// `Split()`: the initiator→responder and responder→initiator cipher states.
    fn split(&self) -> (CipherState, CipherState) {
        let [k1, k2] = hkdf::<2>(&self.ck, &[]);
        let mut c1 = CipherState::empty();
        c1.initialize_key(&k1);
        let mut c2 = CipherState::empty();
        c2.initialize_key(&k2);
        (c1, c2)
    }
}

/// Handshake pattern tokens used by NNpsk0 (§7.1, §9).
#[derive(Clone, Copy)]
enum Token {
    E,
    Ee,
    Psk,
}

/// `NNpsk0`: `-> psk, e` then `<- e, ee` (§9.4). Message 0 is the initiator's.
const PATTERN: [&[Token]; 2] = [&[Token::Psk, Token::E], &[Token::E, Token::Ee]];

/// The pattern contains a psk token, so `e` tokens also run `MixKey` (§9.2).
const PSK_MODE: bool = true;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Role {
    Initiator,
    Responder,
}

/// One side of a `Noise_NNpsk0_25519_ChaChaPoly_SHA256` handshake (§5.3 HandshakeState).
///
/// The agent is the initiator, the hub the responder. Drive it with [`write_message`] /
/// [`read_message`] in turn, then call [`into_transport`]. Any error leaves the handshake
/// failed for good: further calls return errors and no transport can be derived.
///
/// [`write_message`]: Handshake::write_message
/// [`read_message`]: Handshake::read_message
/// [`into_transport`]: Handshake::into_transport
pub struct Handshake {
    role: Role,
    ss: SymmetricState,
    psk: SecretBytes,
    /// Our ephemeral; generated by the `e` token, consumed by `ee`.
    e: Option<EphemeralSecret>,
    /// The peer's ephemeral public key.
    re: Option<PublicKey>,
    /// Index into [`PATTERN`] of the next message; 2 when done.
    next: usize,
    failed: bool,
}

impl fmt::Debug for Handshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handshake")
            .field("role", &self.role)
            .field("next_message", &self.next)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl Handshake {
    /// The agent's side. A fresh random ephemeral key is generated when the first message is
    /// written, so every session gets new transport keys.
    pub fn initiator(psk: &[u8; 32], prologue: &[u8]) -> Self {
        Self::new(Role::Initiator, psk, prologue)
    }

    /// The hub's side. Its ephemeral key is generated when it writes its message.
    pub fn responder(psk: &[u8; 32], prologue: &[u8]) -> Self {
        Self::new(Role::Responder, psk, prologue)
    }

    /// `Initialize()` (§5.3): no static keys or pre-messages in NN.
    fn new(role: Role, psk: &[u8; 32], prologue: &[u8]) -> Self {
        let mut ss = SymmetricState::initialize(NOISE_PROTOCOL.as_bytes());
        ss.mix_hash(prologue);
        Self {
            role,
            ss,
            psk: SecretBytes(*psk),
            e: None,
            re: None,
            next: 0,
            failed: false,
        }
    }

    /// Whether this side writes message `next`.
    fn writes(&self, index: usize) -> bool {
        (index % 2 == 0) == (self.role == Role::Initiator)
    }

    fn check_turn(&self, writing: bool) -> Result<(), TunnelError> {
        if self.failed {
            return Err(TunnelError::Handshake(
                "the handshake already failed; start a new session".into(),
            ));
        }
        if self.next >= PATTERN.len() {
            return Err(TunnelError::Handshake(
                "the handshake is already finished".into(),
            ));
        }
        if self.writes(self.next) != writing {
            let expected = if writing { "read" } else { "write" };
            return Err(TunnelError::Handshake(format!(
                "out of turn: the {:?} must {expected} handshake message {} next",
                self.role,
                self.next + 1
            )));
        }
        Ok(())
    }

    /// `WriteMessage(payload, message_buffer)`: the next handshake message, carrying `payload`
    /// encrypted (the psk keys it from the very first message).
    pub fn write_message(&mut self, payload: &[u8]) -> Result<Vec<u8>, TunnelError> {
        self.check_turn(true)?;
        let tokens = PATTERN[self.next];
        let e_count = tokens.iter().filter(|t| matches!(t, Token::E)).count();
        // Every NNpsk0 message has a key by the time its payload is written.
        let max_payload = MAX_MESSAGE_LEN - e_count * DHLEN - TAGLEN;
        if payload.len() > max_payload {
            return Err(TunnelError::MessageTooLong {
                len: payload.len(),
                max: max_payload,
            });
        }
        let result = self.write_tokens(tokens, payload);
        self.finish_step(result)
    }

    fn write_tokens(&mut self, tokens: &[Token], payload: &[u8]) -> Result<Vec<u8>, TunnelError> {
        let mut message = Vec::with_capacity(DHLEN + payload.len() + TAGLEN);
        for token in tokens {
            match token {
                Token::E => {
                    let secret = EphemeralSecret::random();
                    let public = PublicKey::from(&secret);
                    message.extend_from_slice(public.as_bytes());
                    self.ss.mix_hash(public.as_bytes());
                    if PSK_MODE {
                        self.ss.mix_key(public.as_bytes());
                    }
                    self.e = Some(secret);
                }
                Token::Ee => self.mix_ee()?,
                Token::Psk => self.ss.mix_key_and_hash(&self.psk.0),
            }
        }
        message.extend_from_slice(&self.ss.encrypt_and_hash(payload)?);
        Ok(message)
    }

    /// `ReadMessage(message, payload_buffer)`: processes the peer's handshake message and returns
    /// its decrypted payload. A peer holding a different psk (service id) or prologue (lookup
    /// hash) makes this fail with [`TunnelError::HandshakeAuth`]; it never succeeds.
    pub fn read_message(&mut self, message: &[u8]) -> Result<Vec<u8>, TunnelError> {
        self.check_turn(false)?;
        if message.len() > MAX_MESSAGE_LEN {
            self.failed = true;
            return Err(TunnelError::MessageTooLong {
                len: message.len(),
                max: MAX_MESSAGE_LEN,
            });
        }
        let tokens = PATTERN[self.next];
        let result = self.read_tokens(tokens, message);
        self.finish_step(result)
    }

    fn read_tokens(&mut self, tokens: &[Token], message: &[u8]) -> Result<Vec<u8>, TunnelError> {
        let mut rest = message;
        for token in tokens {
            match token {
                Token::E => {
                    let Some((re, tail)) = rest.split_first_chunk::<DHLEN>() else {
                        return Err(TunnelError::Handshake(format!(
                            "handshake message {} is {} bytes, too short to hold an ephemeral key",
                            self.next + 1,
                            message.len()
                        )));
                    };
                    rest = tail;
                    self.ss.mix_hash(re);
                    if PSK_MODE {
                        self.ss.mix_key(re);
                    }
                    self.re = Some(PublicKey::from(*re));
                }
                Token::Ee => self.mix_ee()?,
                Token::Psk => self.ss.mix_key_and_hash(&self.psk.0),
            }
        }
        if self.ss.cs.has_key() && rest.len() < TAGLEN {
            return Err(TunnelError::Handshake(format!(
                "handshake message {} is {} bytes, too short to hold an authentication tag",
                self.next + 1,
                message.len()
            )));
        }
        self.ss.decrypt_and_hash(rest).map_err(|err| match err {
            TunnelError::Decrypt => TunnelError::HandshakeAuth,
            other => other,
        })
    }

    /// The `ee` token: `MixKey(DH(e, re))`. Our ephemeral is consumed; NN uses it only once.
    fn mix_ee(&mut self) -> Result<(), TunnelError> {
        let (Some(e), Some(re)) = (self.e.take(), self.re.as_ref()) else {
            return Err(TunnelError::Handshake(
                "ee token without both ephemeral keys".into(),
            ));
        };
        let shared = e.diffie_hellman(re);
        if !shared.was_contributory() {
            return Err(TunnelError::Handshake(
                "the peer's ephemeral key is a low-order point".into(),
            ));
        }
        self.ss.mix_key(shared.as_bytes());
        Ok(())
    }

    fn finish_step(
        &mut self,
        result: Result<Vec<u8>, TunnelError>,
    ) -> Result<Vec<u8>, TunnelError> {
        match result {
            Ok(out) => {
                self.next += 1;
                Ok(out)
            }
            Err(err) => {
                self.failed = true;
                self.e = None;
                Err(err)
            }
        }
    }

    /// Both messages were exchanged successfully.
    pub fn is_finished(&self) -> bool {
        !self.failed && self.next == PATTERN.len()
    }

    /// The handshake hash `h` (§11.2): identical on both sides once finished; usable as a
    /// session identifier for channel binding. Not secret.
    pub fn handshake_hash(&self) -> [u8; 32] {
        self.ss.h
    }

    /// `Split()` into the two transport directions. The initiator sends with the first key and
    /// receives with the second; the responder the other way round.
    pub fn into_transport(self) -> Result<(SendCipher, RecvCipher), TunnelError> {
        if !self.is_finished() {
            return Err(TunnelError::Handshake(
                "cannot start the transport before the handshake has finished".into(),
            ));
        }
        let (c1, c2) = self.ss.split();
        let (send, recv) = match self.role {
            Role::Initiator => (c1, c2),
            Role::Responder => (c2, c1),
        };
        Ok((
            SendCipher { cs: send },
            RecvCipher {
                cs: recv,
                failed: false,
            },
        ))
    }
}

/// Copies of cipher states, for fuzz targets only (`cargo fuzz` builds with `--cfg fuzzing`;
/// no other build contains this). A fuzz target runs one handshake at start-up and replays its
/// keys for every input, which a real session must never do: two copies would reuse nonces.
#[cfg(fuzzing)]
impl CipherState {
    fn copy_for_fuzzing(&self) -> Self {
        Self {
            cipher: self.cipher.clone(),
            n: self.n,
        }
    }
}

#[cfg(fuzzing)]
impl SendCipher {
    /// See [`CipherState::copy_for_fuzzing`].
    pub fn copy_for_fuzzing(&self) -> Self {
        Self {
            cs: self.cs.copy_for_fuzzing(),
        }
    }
}

#[cfg(fuzzing)]
impl RecvCipher {
    /// See [`CipherState::copy_for_fuzzing`].
    pub fn copy_for_fuzzing(&self) -> Self {
        Self {
            cs: self.cs.copy_for_fuzzing(),
            failed: self.failed,
        }
    }
}

/// The sending half of a transport session. Nonces count up from zero.
pub struct SendCipher {
    cs: CipherState,
}

impl fmt::Debug for SendCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SendCipher")
            .field("nonce", &self.cs.n)
            .finish_non_exhaustive()
    }
}

impl SendCipher {
    /// Encrypts one transport message (at most [`MAX_TRANSPORT_PLAINTEXT`] bytes; the result is
    /// 16 bytes longer). Fails with [`TunnelError::NonceExhausted`] rather than reuse a nonce.
    pub fn encrypt(&mut self, plaintext: &[u8]) -> Result<Vec<u8>, TunnelError> {
        if plaintext.len() > MAX_TRANSPORT_PLAINTEXT {
            return Err(TunnelError::MessageTooLong {
                len: plaintext.len(),
                max: MAX_TRANSPORT_PLAINTEXT,
            });
        }
        self.cs.encrypt_with_ad(&[], plaintext)
    }

    #[cfg(test)]
    pub(crate) fn set_nonce_for_test(&mut self, n: u64) {
        self.cs.n = n;
    }
}

/// The receiving half of a transport session.
///
/// Messages must arrive exactly in the order sent: the nonce is implicit, so a tampered,
/// replayed, dropped or reordered message fails authentication. The first failure is final:
/// every later call fails too, so the caller cannot accidentally resynchronise.
pub struct RecvCipher {
    cs: CipherState,
    failed: bool,
}

impl fmt::Debug for RecvCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecvCipher")
            .field("nonce", &self.cs.n)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl RecvCipher {
    /// Decrypts the next transport message.
    pub fn decrypt(&mut self, ciphertext: &[u8]) -> Result<Vec<u8>, TunnelError> {
        if self.failed {
            return Err(TunnelError::ReceiverFailed);
        }
        let result = if ciphertext.len() > MAX_MESSAGE_LEN {
            Err(TunnelError::MessageTooLong {
                len: ciphertext.len(),
                max: MAX_MESSAGE_LEN,
            })
        } else if ciphertext.len() < TAGLEN {
            Err(TunnelError::Decrypt)
        } else {
            self.cs.decrypt_with_ad(&[], ciphertext)
        };
        if result.is_err() {
            self.failed = true;
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::{lookup_hash, prologue, service_psk};

    type Transport = (SendCipher, RecvCipher);

    /// Runs a full handshake; returns both sides' transports and the two handshake messages.
    fn pair(
        agent_id: &str,
        hub_id: &str,
    ) -> Result<(Transport, Transport, Vec<Vec<u8>>), TunnelError> {
        let p = prologue(&lookup_hash(hub_id));
        let mut agent = Handshake::initiator(&service_psk(agent_id), &p);
        let mut hub = Handshake::responder(&service_psk(hub_id), &p);
        let m1 = agent.write_message(b"hello hub")?;
        assert_eq!(hub.read_message(&m1)?, b"hello hub");
        let m2 = hub.write_message(b"hello agent")?;
        assert_eq!(agent.read_message(&m2)?, b"hello agent");
        assert!(agent.is_finished() && hub.is_finished());
        assert_eq!(agent.handshake_hash(), hub.handshake_hash());
        Ok((agent.into_transport()?, hub.into_transport()?, vec![m1, m2]))
    }

    #[test]
    fn hkdf_matches_the_spec_definition() {
        use hmac::{Hmac, Mac};
        let hmac = |key: &[u8], data: &[&[u8]]| -> [u8; 32] {
            let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
            for d in data {
                mac.update(d);
            }
            mac.finalize().into_bytes().into()
        };
        let ck = SecretBytes([7u8; 32]);
        let ikm = b"input key material";
        let temp = hmac(&ck.0, &[ikm]);
        let o1 = hmac(&temp, &[&[1]]);
        let o2 = hmac(&temp, &[&o1, &[2]]);
        let o3 = hmac(&temp, &[&o2, &[3]]);
        let [a, b, c] = hkdf::<3>(&ck, ikm);
        assert_eq!((a.0, b.0, c.0), (o1, o2, o3));
    }

    #[test]
    fn nonce_layout_is_zero_prefix_then_little_endian_counter() {
        let nonce = CipherState::nonce(0x0102_0304_0506_0708);
        assert_eq!(nonce.as_slice(), &[0, 0, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1][..]);
    }

    #[test]
    fn transport_both_ways() {
        let ((mut a_send, mut a_recv), (mut h_send, mut h_recv), _) = pair("svc", "svc").unwrap();
        for i in 0..5u8 {
            let msg = vec![i; 100 * i as usize];
            assert_eq!(h_recv.decrypt(&a_send.encrypt(&msg).unwrap()).unwrap(), msg);
            assert_eq!(a_recv.decrypt(&h_send.encrypt(&msg).unwrap()).unwrap(), msg);
        }
        // Empty plaintext still carries a tag.
        let empty = a_send.encrypt(b"").unwrap();
        assert_eq!(empty.len(), TAGLEN);
        assert_eq!(h_recv.decrypt(&empty).unwrap(), b"");
    }

    #[test]
    fn wrong_service_id_is_refused_by_the_responder() {
        let err = pair("agent-thinks-this", "hub-has-that").err().unwrap();
        assert!(matches!(err, TunnelError::HandshakeAuth), "{err:?}");
    }

    #[test]
    fn wrong_psk_with_right_prologue_never_yields_a_transport() {
        let p = prologue(&lookup_hash("svc"));
        let mut agent = Handshake::initiator(&service_psk("svc"), &p);
        let mut hub = Handshake::responder(&service_psk("other"), &p);
        let m1 = agent.write_message(b"").unwrap();
        assert!(matches!(
            hub.read_message(&m1),
            Err(TunnelError::HandshakeAuth)
        ));
        assert!(!hub.is_finished());
        // Once failed, the responder refuses to continue and cannot produce ciphers.
        assert!(hub.write_message(b"").is_err());
        assert!(hub.into_transport().is_err());
        assert!(agent.into_transport().is_err());
    }

    #[test]
    fn mismatched_prologue_is_refused() {
        let psk = service_psk("svc");
        let mut agent = Handshake::initiator(&psk, &prologue(&lookup_hash("svc")));
        let mut hub = Handshake::responder(&psk, &prologue(&lookup_hash("another")));
        let m1 = agent.write_message(b"").unwrap();
        assert!(matches!(
            hub.read_message(&m1),
            Err(TunnelError::HandshakeAuth)
        ));
    }

    #[test]
    fn tampered_second_message_fails_at_the_initiator() {
        let p = prologue("x");
        let psk = service_psk("svc");
        let mut agent = Handshake::initiator(&psk, &p);
        let mut hub = Handshake::responder(&psk, &p);
        let m1 = agent.write_message(b"").unwrap();
        hub.read_message(&m1).unwrap();
        let mut m2 = hub.write_message(b"payload").unwrap();
        m2[40] ^= 1;
        assert!(matches!(
            agent.read_message(&m2),
            Err(TunnelError::HandshakeAuth)
        ));
        assert!(agent.into_transport().is_err());
    }

    #[test]
    fn secrets_never_appear_in_handshake_messages() {
        let id = "my-service-id-0123456789";
        let psk = service_psk(id);
        let (_, _, messages) = pair(id, id).unwrap();
        for message in &messages {
            assert!(!contains(message, id.as_bytes()));
            assert!(!contains(message, &psk));
            assert!(!contains(message, hex::encode(psk).as_bytes()));
            // Payloads are encrypted too.
            assert!(!contains(message, b"hello"));
        }
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn tampered_transport_message_fails_and_ends_the_session() {
        let ((mut send, _), (_, mut recv), _) = pair("svc", "svc").unwrap();
        let mut c = send.encrypt(b"record").unwrap();
        c[0] ^= 0x80;
        assert!(matches!(recv.decrypt(&c), Err(TunnelError::Decrypt)));
        // Even the next genuine message is refused now.
        let next = send.encrypt(b"next").unwrap();
        assert!(matches!(
            recv.decrypt(&next),
            Err(TunnelError::ReceiverFailed)
        ));
    }

    #[test]
    fn replayed_transport_message_fails() {
        let ((mut send, _), (_, mut recv), _) = pair("svc", "svc").unwrap();
        let c = send.encrypt(b"once").unwrap();
        assert_eq!(recv.decrypt(&c).unwrap(), b"once");
        assert!(matches!(recv.decrypt(&c), Err(TunnelError::Decrypt)));
    }

    #[test]
    fn dropped_transport_message_fails() {
        let ((mut send, _), (_, mut recv), _) = pair("svc", "svc").unwrap();
        let _lost = send.encrypt(b"first").unwrap();
        let second = send.encrypt(b"second").unwrap();
        assert!(matches!(recv.decrypt(&second), Err(TunnelError::Decrypt)));
    }

    #[test]
    fn reordered_transport_messages_fail() {
        let ((mut send, _), (_, mut recv), _) = pair("svc", "svc").unwrap();
        let first = send.encrypt(b"first").unwrap();
        let second = send.encrypt(b"second").unwrap();
        assert!(matches!(recv.decrypt(&second), Err(TunnelError::Decrypt)));
        assert!(recv.decrypt(&first).is_err());
    }

    #[test]
    fn truncated_and_oversized_transport_messages_fail() {
        let ((mut send, _), (_, mut recv), _) = pair("svc", "svc").unwrap();
        let c = send.encrypt(b"x").unwrap();
        assert!(matches!(recv.decrypt(&c[..10]), Err(TunnelError::Decrypt)));

        let ((_, _), (_, mut recv), _) = pair("svc", "svc").unwrap();
        assert!(matches!(
            recv.decrypt(&vec![0u8; MAX_MESSAGE_LEN + 1]),
            Err(TunnelError::MessageTooLong { .. })
        ));
    }

    #[test]
    fn reflected_message_is_not_accepted() {
        // A message sent by the agent, bounced back to it, must not decrypt: the two directions
        // use different keys.
        let ((mut a_send, mut a_recv), _, _) = pair("svc", "svc").unwrap();
        let c = a_send.encrypt(b"mirror").unwrap();
        assert!(matches!(a_recv.decrypt(&c), Err(TunnelError::Decrypt)));
    }

    #[test]
    fn every_session_has_fresh_keys() {
        let ((mut s1, _), _, m1) = pair("svc", "svc").unwrap();
        let ((mut s2, _), _, m2) = pair("svc", "svc").unwrap();
        assert_ne!(
            m1[0][..DHLEN],
            m2[0][..DHLEN],
            "initiator ephemerals repeat"
        );
        assert_ne!(
            m1[1][..DHLEN],
            m2[1][..DHLEN],
            "responder ephemerals repeat"
        );
        assert_ne!(
            s1.encrypt(b"same plaintext").unwrap(),
            s2.encrypt(b"same plaintext").unwrap()
        );
    }

    #[test]
    fn handshake_hashes_differ_between_sessions() {
        let psk = service_psk("svc");
        let p = prologue(&lookup_hash("svc"));
        let run = || {
            let mut a = Handshake::initiator(&psk, &p);
            let mut h = Handshake::responder(&psk, &p);
            h.read_message(&a.write_message(b"").unwrap()).unwrap();
            a.read_message(&h.write_message(b"").unwrap()).unwrap();
            a.handshake_hash()
        };
        assert_ne!(run(), run());
    }

    #[test]
    fn nonce_exhaustion_is_an_error_not_a_reuse() {
        let ((mut send, _), _, _) = pair("svc", "svc").unwrap();
        send.set_nonce_for_test(u64::MAX - 1);
        send.encrypt(b"last allowed").unwrap();
        assert!(matches!(
            send.encrypt(b"one too many"),
            Err(TunnelError::NonceExhausted)
        ));
    }

    #[test]
    fn transport_plaintext_limit() {
        let ((mut send, _), (_, mut recv), _) = pair("svc", "svc").unwrap();
        let max = vec![0xAB; MAX_TRANSPORT_PLAINTEXT];
        let c = send.encrypt(&max).unwrap();
        assert_eq!(c.len(), MAX_MESSAGE_LEN);
        assert_eq!(recv.decrypt(&c).unwrap(), max);
        assert!(matches!(
            send.encrypt(&[0u8; MAX_TRANSPORT_PLAINTEXT + 1]),
            Err(TunnelError::MessageTooLong { .. })
        ));
    }

    #[test]
    fn out_of_turn_calls_are_errors() {
        let psk = service_psk("svc");
        let mut hub = Handshake::responder(&psk, b"");
        assert!(matches!(
            hub.write_message(b""),
            Err(TunnelError::Handshake(_))
        ));
        let mut agent = Handshake::initiator(&psk, b"");
        assert!(agent.read_message(&[0u8; 48]).is_err());
        let mut hub = Handshake::responder(&psk, b"");
        assert!(hub.read_message(&[0u8; 10]).is_err());
    }

    #[test]
    fn debug_output_has_no_key_material() {
        let psk = service_psk("svc");
        let hs = Handshake::initiator(&psk, b"");
        let text = format!("{hs:?}");
        assert!(!text.contains(&hex::encode(psk)));
        assert!(!text.contains(&format!("{:?}", psk)));
        let ((send, recv), _, _) = pair("svc", "svc").unwrap();
        assert!(format!("{send:?} {recv:?}").contains("nonce"));
    }
}
