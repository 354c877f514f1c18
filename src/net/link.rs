//! One established tunnel: a reader task that decrypts websocket records into frames and a
//! writer task that encrypts frames into records.
//!
//! The two halves own their cipher states, so nonces advance strictly in order without a lock.
//! The link never interprets a frame; it hands every one to its owner's callback and reports
//! its own end exactly once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use crate::messages::{Frame, LinkEvent};
use crate::tunnel::{FrameOpener, FrameSealer};

use super::Ws;

/// What the writer task is asked to do, in order.
enum Outgoing {
    Frame(Frame),
    /// Flush what is queued before this, close the websocket and stop.
    Close,
}

/// Sending side of a link, cheap to clone. Sending on a closed link is a no-op returning false.
#[derive(Clone)]
pub struct LinkSender {
    tx: mpsc::UnboundedSender<Outgoing>,
}

impl LinkSender {
    /// Queues a frame for encryption and sending.
    pub fn send(&self, frame: Frame) -> bool {
        self.tx.send(Outgoing::Frame(frame)).is_ok()
    }
}

/// Owner's handle on a running link. Dropping it tears both tasks down.
pub struct Link {
    sender: LinkSender,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl Link {
    /// Starts the reader and writer over an established websocket. `on_event` runs on the
    /// reader task for every frame and once with [`LinkEvent::Closed`]; it must not block.
    pub fn spawn<F>(ws: Ws, sealer: FrameSealer, opener: FrameOpener, on_event: F) -> Link
    where
        F: Fn(LinkEvent) + Send + Sync + 'static,
    {
        let (mut sink, mut stream) = ws.split();
        let (tx, mut rx) = mpsc::unbounded_channel::<Outgoing>();
        let on_event = Arc::new(on_event);
        let closed = Arc::new(AtomicBool::new(false));

        let report_close = {
            let on_event = on_event.clone();
            let closed = closed.clone();
            move |why: String| {
                if !closed.swap(true, Ordering::SeqCst) {
                    on_event(LinkEvent::Closed(why));
                }
            }
        };

        let writer = {
            let report_close = report_close.clone();
            let mut sealer = sealer;
            tokio::spawn(async move {
                let why = 'link: loop {
                    let mut next = rx.recv().await;
                    // Batch whatever else is already queued before paying for a flush. A
                    // goodbye does not close the link: the sender may still owe responses.
                    loop {
                        match next {
                            None | Some(Outgoing::Close) => {
                                // Closing flushes what was fed before.
                                let _ = sink.close().await;
                                break 'link "link closed locally".to_string();
                            }
                            Some(Outgoing::Frame(frame)) => {
                                if let Err(why) = write_frame(&mut sealer, &mut sink, &frame).await
                                {
                                    break 'link why;
                                }
                            }
                        }
                        match rx.try_recv() {
                            Ok(item) => next = Some(item),
                            Err(_) => break,
                        }
                    }
                    if let Err(e) = sink.flush().await {
                        break format!("websocket write failed: {e}");
                    }
                };
                report_close(why);
            })
        };

        let reader = {
            let mut opener = opener;
            tokio::spawn(async move {
                let why = loop {
                    match stream.next().await {
                        None => break "connection closed by peer".to_string(),
                        Some(Err(e)) => break format!("websocket read failed: {e}"),
                        Some(Ok(Message::Binary(record))) => match opener.open(&record) {
                            Ok(Some(frame)) => on_event(LinkEvent::Frame(frame)),
                            Ok(None) => {}
                            Err(e) => break format!("tunnel integrity failure: {e}"),
                        },
                        Some(Ok(Message::Close(_))) => break "peer closed the tunnel".to_string(),
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                        Some(Ok(_)) => break "unexpected non-binary websocket message".to_string(),
                    }
                };
                report_close(why);
            })
        };

        Link {
            sender: LinkSender { tx },
            reader,
            writer,
        }
    }

    /// A clonable sender for this link.
    pub fn sender(&self) -> LinkSender {
        self.sender.clone()
    }

    /// Queues a frame.
    pub fn send(&self, frame: Frame) -> bool {
        self.sender.send(frame)
    }

    /// Whether the writer has ended (after a close or an error).
    pub fn is_finished(&self) -> bool {
        self.writer.is_finished()
    }

    /// Sends what is queued, closes the websocket and waits (at most `within`) for the writer
    /// to finish. Frames queued after this are dropped.
    pub async fn close(&mut self, within: std::time::Duration) {
        let _ = self.sender.tx.send(Outgoing::Close);
        let _ = tokio::time::timeout(within, &mut self.writer).await;
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

async fn write_frame<S>(sealer: &mut FrameSealer, sink: &mut S, frame: &Frame) -> Result<(), String>
where
    S: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    let records = sealer
        .seal(frame)
        .map_err(|e| format!("cannot seal frame: {e}"))?;
    for record in records {
        sink.feed(Message::Binary(record.into()))
            .await
            .map_err(|e| format!("websocket write failed: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::BoxedIo;
    use crate::tunnel::{self, Handshake};
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::WebSocketStream;

    /// A finished handshake: the agent's sealer and the hub's opener/sealer.
    fn ciphers() -> (FrameSealer, FrameOpener, FrameSealer, FrameOpener) {
        let psk = tunnel::service_psk("link-test-service-id");
        let prologue = tunnel::prologue(&tunnel::lookup_hash("link-test-service-id"));
        let mut a = Handshake::initiator(&psk, &prologue);
        let mut b = Handshake::responder(&psk, &prologue);
        b.read_message(&a.write_message(&[]).unwrap()).unwrap();
        a.read_message(&b.write_message(&[]).unwrap()).unwrap();
        let (a_send, a_recv) = a.into_transport().unwrap();
        let (b_send, b_recv) = b.into_transport().unwrap();
        (
            FrameSealer::new(a_send),
            FrameOpener::new(a_recv),
            FrameSealer::new(b_send),
            FrameOpener::new(b_recv),
        )
    }

    async fn ws_pair() -> (Ws, Ws) {
        let (x, y) = tokio::io::duplex(1 << 20);
        let x: BoxedIo = Box::new(x);
        let y: BoxedIo = Box::new(y);
        (
            WebSocketStream::from_raw_socket(x, Role::Client, None).await,
            WebSocketStream::from_raw_socket(y, Role::Server, None).await,
        )
    }

    #[tokio::test]
    async fn frames_flow_and_a_flipped_byte_ends_the_link() {
        let (mut agent_sealer, _agent_opener, hub_sealer, hub_opener) = ciphers();
        let (mut agent_ws, hub_ws) = ws_pair().await;
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let _hub = Link::spawn(hub_ws, hub_sealer, hub_opener, move |event| {
            let _ = events_tx.send(event);
        });

        let ping = Frame::Ping {
            seq: 1,
            sent_micros: 7,
        };
        for record in agent_sealer.seal(&ping).unwrap() {
            agent_ws.send(Message::Binary(record.into())).await.unwrap();
        }
        match events.recv().await.unwrap() {
            LinkEvent::Frame(frame) => assert_eq!(frame, ping),
            other => panic!("expected the ping, got {other:?}"),
        }

        let mut record = agent_sealer.seal(&ping).unwrap().remove(0);
        let last = record.len() - 1;
        record[last] ^= 0x01;
        agent_ws.send(Message::Binary(record.into())).await.unwrap();
        match events.recv().await.unwrap() {
            LinkEvent::Closed(why) => assert!(why.contains("integrity"), "{why}"),
            other => panic!("expected the link to close, got {other:?}"),
        }
    }

    /// A goodbye announces a stop; it must not cut off the responses the sender still owes.
    /// `close` sends everything queued before it, then closes the websocket.
    #[tokio::test]
    async fn a_goodbye_leaves_the_link_open_and_close_flushes_what_is_queued() {
        let (agent_sealer, agent_opener, _hub_sealer, hub_opener) = ciphers();
        let (agent_ws, mut hub_ws) = ws_pair().await;
        let mut agent = Link::spawn(agent_ws, agent_sealer, agent_opener, |_| {});
        let mut hub_opener = hub_opener;
        let goodbye = Frame::Goodbye {
            reason: "stopping".into(),
        };
        let pong = Frame::Pong {
            seq: 9,
            sent_micros: 9,
        };
        agent.send(goodbye.clone());
        agent.send(pong.clone());
        agent.send(pong.clone());
        agent.close(std::time::Duration::from_secs(2)).await;
        assert!(agent.is_finished());
        assert!(!agent.send(pong.clone()), "nothing is sent after close");

        let mut received = Vec::new();
        let closed = loop {
            match hub_ws.next().await {
                Some(Ok(Message::Binary(record))) => {
                    if let Some(frame) = hub_opener.open(&record).unwrap() {
                        received.push(frame);
                    }
                }
                Some(Ok(Message::Close(_))) | None => break true,
                Some(Ok(_)) => {}
                Some(Err(_)) => break false,
            }
        };
        assert_eq!(received, vec![goodbye, pong.clone(), pong]);
        assert!(closed, "the websocket was closed cleanly");
    }

    #[tokio::test]
    async fn a_replayed_record_ends_the_link() {
        let (mut agent_sealer, _agent_opener, hub_sealer, hub_opener) = ciphers();
        let (mut agent_ws, hub_ws) = ws_pair().await;
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let _hub = Link::spawn(hub_ws, hub_sealer, hub_opener, move |event| {
            let _ = events_tx.send(event);
        });
        let record = agent_sealer
            .seal(&Frame::Pong {
                seq: 1,
                sent_micros: 1,
            })
            .unwrap()
            .remove(0);
        agent_ws
            .send(Message::Binary(record.clone().into()))
            .await
            .unwrap();
        assert!(matches!(events.recv().await.unwrap(), LinkEvent::Frame(_)));
        agent_ws.send(Message::Binary(record.into())).await.unwrap();
        assert!(matches!(events.recv().await.unwrap(), LinkEvent::Closed(_)));
    }
}
