//! KeyExchange: runs the Noise NNpsk0 handshake on a freshly opened websocket, for either role,
//! and hands back the established tunnel (websocket plus the two cipher states).
//!
//! It lives for one handshake. Keeping it in its own actor means a malformed or hostile
//! handshake message can at worst fail this actor — the session that spawned it sees a
//! supervision event and a refused connection, nothing more. It never logs key material or
//! the service id, and never reads a frame after the handshake.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio_tungstenite::tungstenite::Message;

use crate::net::Ws;
use crate::tunnel::{FrameOpener, FrameSealer, Handshake};

/// Which side of the handshake this actor plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The agent: sends the first message.
    Initiator,
    /// The hub: answers it.
    Responder,
}

/// Everything the handshake needs. The PSK is derived from the service id by the caller.
pub struct KeyExchangeArgs {
    pub role: Role,
    pub psk: [u8; 32],
    pub prologue: Vec<u8>,
    /// Whole handshake deadline: a peer that stalls mid-handshake is dropped.
    pub timeout: Duration,
}

/// A tunnel ready for frames.
pub struct Established {
    pub ws: Ws,
    pub sealer: FrameSealer,
    pub opener: FrameOpener,
}

/// Why a handshake did not produce a tunnel.
#[derive(Debug, thiserror::Error)]
pub enum KeyExchangeError {
    #[error("handshake timed out after {0:?}")]
    Timeout(Duration),
    #[error("peer closed the connection during the handshake (wrong service id on one side?)")]
    PeerClosed,
    #[error("handshake failed: the peer does not know this service's id")]
    Refused,
    #[error("websocket error during the handshake: {0}")]
    Ws(String),
    #[error("unexpected handshake message: {0}")]
    Protocol(String),
}

/// Messages of the KeyExchange actor.
pub enum KeyExchangeMsg {
    /// Run the handshake over `ws` and reply with the established tunnel.
    Run {
        ws: Ws,
        reply: RpcReplyPort<Result<Established, KeyExchangeError>>,
    },
}

/// The KeyExchange actor.
pub struct KeyExchange;

impl Actor for KeyExchange {
    type Msg = KeyExchangeMsg;
    type State = Option<KeyExchangeArgs>;
    type Arguments = KeyExchangeArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: KeyExchangeArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(Some(args))
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let KeyExchangeMsg::Run { ws, reply } = message;
        // One handshake per actor: the secret material is taken out and dropped afterwards.
        let Some(args) = state.take() else {
            return Err("KeyExchange asked to run twice".into());
        };
        let timeout = args.timeout;
        let result = match tokio::time::timeout(timeout, run(args, ws)).await {
            Ok(result) => result,
            Err(_) => Err(KeyExchangeError::Timeout(timeout)),
        };
        let _ = reply.send(result);
        myself.stop(None);
        Ok(())
    }
}

async fn run(args: KeyExchangeArgs, mut ws: Ws) -> Result<Established, KeyExchangeError> {
    let handshake = match args.role {
        Role::Initiator => {
            let mut hs = Handshake::initiator(&args.psk, &args.prologue);
            let first = hs
                .write_message(&[])
                .map_err(|e| KeyExchangeError::Protocol(e.to_string()))?;
            send(&mut ws, first).await?;
            let second = receive(&mut ws).await?;
            hs.read_message(&second)
                .map_err(|_| KeyExchangeError::Refused)?;
            hs
        }
        Role::Responder => {
            let mut hs = Handshake::responder(&args.psk, &args.prologue);
            let first = receive(&mut ws).await?;
            if hs.read_message(&first).is_err() {
                // Say nothing the peer could learn from: just close.
                let _ = ws.close(None).await;
                return Err(KeyExchangeError::Refused);
            }
            let second = hs
                .write_message(&[])
                .map_err(|e| KeyExchangeError::Protocol(e.to_string()))?;
            send(&mut ws, second).await?;
            hs
        }
    };
    let (send_cipher, recv_cipher) = handshake
        .into_transport()
        .map_err(|e| KeyExchangeError::Protocol(e.to_string()))?;
    Ok(Established {
        ws,
        sealer: FrameSealer::new(send_cipher),
        opener: FrameOpener::new(recv_cipher),
    })
}

async fn send(ws: &mut Ws, bytes: Vec<u8>) -> Result<(), KeyExchangeError> {
    ws.send(Message::Binary(bytes.into()))
        .await
        .map_err(|e| KeyExchangeError::Ws(e.to_string()))
}

async fn receive(ws: &mut Ws) -> Result<Vec<u8>, KeyExchangeError> {
    loop {
        match ws.next().await {
            None | Some(Ok(Message::Close(_))) => return Err(KeyExchangeError::PeerClosed),
            Some(Err(e)) => return Err(KeyExchangeError::Ws(e.to_string())),
            Some(Ok(Message::Binary(bytes))) => return Ok(bytes.to_vec()),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(_)) => {
                return Err(KeyExchangeError::Protocol(
                    "expected a binary handshake message".into(),
                ))
            }
        }
    }
}
