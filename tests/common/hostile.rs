//! A hostile hub and the listeners that watch what an agent does under it.
//!
//! [`HostileHub`] is a TLS websocket listener that plays the hub's part of the tunnel with the
//! project's own tunnel code (Noise responder, frame sealer and opener) and then lets a test send
//! whatever it likes: crafted [`Frame::Request`]s, frames the hub should never send, or raw bytes
//! beneath the websocket layer. [`CountingListener`] stands where a target (or an address the hub
//! would like the agent to reach) listens: it counts every TCP connection and records every raw
//! HTTP request it receives, so a test can prove that nothing was dialed, or that exactly one
//! well-formed request arrived.
//!
//! Everything listens on 127.0.0.1 only and stops when dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use scim_connect::certs::{write_pem_files, TestCa};
use scim_connect::messages::{
    ForwardError, ForwardRequest, Frame, HttpResponse, Scheme, PROTOCOL_VERSION,
};
use scim_connect::net::{BoxedIo, Ws, SERVICE_HEADER};
use scim_connect::tunnel::codec::{FLAG_LAST, FLAG_MORE, RECORD_CHUNK_BYTES};
use scim_connect::tunnel::{self, FrameOpener, Handshake, SendCipher};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::Message;

use super::deploy::{agent_config_text, Target};
use super::{connect_bin, ChildGuard};

/// How long the hostile hub waits for any one thing the agent should do.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(15);

/// A hub under the test's control. The agent trusts it (its CA is the agent's `hub_ca`).
pub struct HostileHub {
    pub port: u16,
    listener: TcpListener,
    acceptor: TlsAcceptor,
    dir: tempfile::TempDir,
}

impl HostileHub {
    /// Listens on a free port of 127.0.0.1 with a certificate for `localhost` from a fresh CA,
    /// written to `ca.pem` in [`HostileHub::dir`].
    pub async fn start() -> HostileHub {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("hostile hub CA").unwrap();
        let leaf = ca.issue(&["localhost", "127.0.0.1"]).unwrap();
        let (cert, key) = write_pem_files(dir.path(), "hub", &leaf).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).unwrap();
        let tls = scim_connect::net::hub_server_config(&cert, &key).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        HostileHub {
            port,
            listener,
            acceptor: TlsAcceptor::from(tls),
            dir,
        }
    }

    /// The folder holding `ca.pem` and whatever the test writes (agent configs, state).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `wss://localhost:<port>/v1/connect`.
    pub fn url(&self) -> String {
        format!("wss://localhost:{}/v1/connect", self.port)
    }

    /// Writes `<name>.ini` for an agent of `service_id` that dials this hub, with `targets`;
    /// returns its path.
    pub fn write_agent_config(&self, name: &str, service_id: &str, targets: &[Target]) -> PathBuf {
        let text = agent_config_text(
            &self.url(),
            service_id,
            &format!("{name}-state"),
            targets,
            &[],
        );
        let path = self.dir().join(format!("{name}.ini"));
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Starts `connect run` (the real binary) for `service_id` with `targets`, dialing this hub.
    pub fn spawn_agent(&self, service_id: &str, targets: &[Target]) -> ChildGuard {
        let config = self.write_agent_config("agent", service_id, targets);
        let mut cmd = Command::new(connect_bin());
        cmd.args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info,scim_connect=debug");
        ChildGuard::spawn("agent", cmd).expect("start connect run")
    }

    /// The next connection: TCP, TLS, websocket upgrade. Returns the websocket and the service
    /// name the agent sent in the upgrade (its lookup hash).
    // The upgrade callback's error type is tungstenite's, not ours to shrink.
    #[allow(clippy::result_large_err)]
    pub async fn accept_ws(&self) -> (Ws, String) {
        let step = async {
            let (tcp, _) = self.listener.accept().await.unwrap();
            tcp.set_nodelay(true).unwrap();
            let tls = self.acceptor.accept(tcp).await.unwrap();
            let io: BoxedIo = Box::new(tls);
            let mut lookup = String::new();
            let callback = |request: &Request, response: Response| {
                lookup = request
                    .headers()
                    .get(SERVICE_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                Ok(response)
            };
            let ws = tokio_tungstenite::accept_hdr_async(io, callback)
                .await
                .unwrap();
            (ws, lookup)
        };
        tokio::time::timeout(STEP_TIMEOUT, step)
            .await
            .expect("the agent did not connect to the hostile hub")
    }

    /// A full session as a genuine hub would open it: upgrade, Noise handshake as responder
    /// holding `service_id`, the agent's Hello, our Welcome.
    pub async fn accept_session(&self, service_id: &str) -> HubSession {
        let mut session = self.accept_unwelcomed(service_id).await;
        session
            .send(&Frame::Welcome {
                version: PROTOCOL_VERSION,
                session_id: 1,
            })
            .await;
        session
    }

    /// Like [`HostileHub::accept_session`], but stops after the agent's Hello: no Welcome yet.
    pub async fn accept_unwelcomed(&self, service_id: &str) -> HubSession {
        let (mut ws, lookup) = self.accept_ws().await;
        assert_eq!(lookup, tunnel::lookup_hash(service_id));
        let psk = tunnel::service_psk(service_id);
        let mut handshake = Handshake::responder(&psk, &tunnel::prologue(&lookup));
        let first = next_binary(&mut ws).await.expect("handshake message 1");
        handshake
            .read_message(&first)
            .expect("the agent's first handshake message authenticates");
        let second = handshake.write_message(&[]).unwrap();
        ws.send(Message::Binary(second.into())).await.unwrap();
        let (send, recv) = handshake.into_transport().unwrap();
        let mut session = HubSession {
            ws,
            cipher: send,
            opener: FrameOpener::new(recv),
            hello: Frame::Goodbye {
                reason: String::new(),
            },
        };
        session.hello = session.next_frame().await.expect("the agent's hello");
        assert!(
            matches!(session.hello, Frame::Hello { .. }),
            "{:?}",
            session.hello
        );
        session
    }
}

/// Reads websocket messages until a binary one; `None` when the peer closed first.
pub async fn next_binary(ws: &mut Ws) -> Option<Vec<u8>> {
    loop {
        match tokio::time::timeout(STEP_TIMEOUT, ws.next()).await.ok()?? {
            Ok(Message::Binary(bytes)) => return Some(bytes.to_vec()),
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            Ok(_) | Err(_) => return None,
        }
    }
}

/// How a tunnel session ended, as seen by the hostile hub.
#[derive(Debug)]
pub enum Ended {
    /// A websocket close frame, or the connection ended.
    Closed(String),
    /// Still open after the wait.
    StillOpen,
}

/// The hub's end of one established tunnel. It seals records itself (the same format as the
/// project's `FrameSealer`), so that a test can also send records no genuine sealer would make.
pub struct HubSession {
    pub ws: Ws,
    cipher: SendCipher,
    pub opener: FrameOpener,
    /// The agent's Hello.
    pub hello: Frame,
}

impl HubSession {
    /// Seals and sends one frame.
    pub async fn send(&mut self, frame: &Frame) {
        let encoded = tunnel::encode_frame(frame).unwrap();
        let records = self.seal_encoded(&encoded);
        self.send_records(records).await;
    }

    /// Cuts `encoded` (a frame's bincode bytes, or forged ones) into encrypted records.
    pub fn seal_encoded(&mut self, encoded: &[u8]) -> Vec<Vec<u8>> {
        let chunks: Vec<&[u8]> = encoded.chunks(RECORD_CHUNK_BYTES).collect();
        let last = chunks.len().saturating_sub(1);
        chunks
            .iter()
            .enumerate()
            .map(|(i, chunk)| {
                self.seal_record(if i == last { FLAG_LAST } else { FLAG_MORE }, chunk)
            })
            .collect()
    }

    /// One encrypted record: `flag` then `chunk`.
    pub fn seal_record(&mut self, flag: u8, chunk: &[u8]) -> Vec<u8> {
        let mut plaintext = Vec::with_capacity(chunk.len() + 1);
        plaintext.push(flag);
        plaintext.extend_from_slice(chunk);
        self.cipher.encrypt(&plaintext).unwrap()
    }

    /// Sends already sealed records, one websocket message each.
    pub async fn send_records(&mut self, records: Vec<Vec<u8>>) {
        self.try_send_records(records)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// [`HubSession::send_records`] for a test that expects the agent to hang up midway.
    pub async fn try_send_records(&mut self, records: Vec<Vec<u8>>) -> Result<(), String> {
        for record in records {
            self.ws
                .feed(Message::Binary(record.into()))
                .await
                .map_err(|e| format!("sending a record failed: {e}"))?;
        }
        self.ws
            .flush()
            .await
            .map_err(|e| format!("flushing records failed: {e}"))
    }

    /// Writes `bytes` to the TLS stream beneath the websocket, e.g. a forged frame header.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.ws.flush().await.ok();
        let io = self.ws.get_mut();
        io.write_all(bytes).await?;
        io.flush().await
    }

    /// The next frame from the agent other than a ping (answered) or pong.
    pub async fn next_frame(&mut self) -> Result<Frame, String> {
        loop {
            let record = next_binary(&mut self.ws)
                .await
                .ok_or("the agent closed the tunnel")?;
            match self.opener.open(&record).map_err(|e| e.to_string())? {
                None => continue,
                Some(Frame::Ping { seq, sent_micros }) => {
                    self.send(&Frame::Pong { seq, sent_micros }).await
                }
                Some(Frame::Pong { .. }) => continue,
                Some(frame) => return Ok(frame),
            }
        }
    }

    /// Sends `request` and waits for its answer.
    pub async fn request(&mut self, request: ForwardRequest) -> Result<HttpResponse, ForwardError> {
        let id = request.id;
        self.send(&Frame::Request(request)).await;
        match self.next_frame().await {
            Ok(Frame::Response(response)) if response.id == id => response.result,
            Ok(other) => panic!("expected the answer to request {id}, got {other:?}"),
            Err(e) => panic!("no answer to request {id}: {e}"),
        }
    }

    /// Waits up to `timeout` for the agent to end the session, discarding what it sends.
    pub async fn ended_within(&mut self, timeout: Duration) -> Ended {
        let wait = async {
            loop {
                match self.ws.next().await {
                    None => return "connection ended".to_owned(),
                    Some(Err(e)) => return format!("connection failed: {e}"),
                    Some(Ok(Message::Close(frame))) => return format!("close frame {frame:?}"),
                    Some(Ok(_)) => continue,
                }
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(why) => Ended::Closed(why),
            Err(_) => Ended::StillOpen,
        }
    }
}

/// A request as the hub sends it, to `target`, with the `Host` of `http://scim.example:8080`.
pub fn hub_request(id: u64, target: &str, method: &str, path: &str) -> ForwardRequest {
    ForwardRequest {
        id,
        target: target.into(),
        scheme: Scheme::Http,
        host: "scim.example:8080".into(),
        method: method.into(),
        path_and_query: path.into(),
        headers: vec![("Accept".into(), b"application/scim+json".to_vec())],
        body: Vec::new(),
        skip_tls_verify: false,
        timeout_ms: 5_000,
    }
}

/// A TCP listener that counts connections and records each raw HTTP/1.1 request (head and
/// body, as received) before answering `200 {}`. A request carrying `Transfer-Encoding` is
/// recorded and its connection closed, since the agent should never send one.
pub struct CountingListener {
    pub addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<Vec<u8>>>>,
    task: JoinHandle<()>,
}

impl Drop for CountingListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CountingListener {
    pub async fn start() -> CountingListener {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (count, seen) = (connections.clone(), requests.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream, seen.clone()));
            }
        });
        CountingListener {
            addr,
            connections,
            requests,
            task,
        }
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Every request received so far, raw.
    pub fn requests(&self) -> Vec<Vec<u8>> {
        self.requests.lock().unwrap().clone()
    }

    /// The `Target` declaration of this listener (plain HTTP).
    pub fn target(&self, name: &str) -> Target {
        Target::new(name, self.addr.to_string())
    }
}

async fn serve(mut stream: TcpStream, seen: Arc<Mutex<Vec<Vec<u8>>>>) {
    let mut buffer = Vec::new();
    loop {
        let head_end = loop {
            if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => {
                    if !buffer.is_empty() {
                        seen.lock().unwrap().push(buffer);
                    }
                    return;
                }
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
            // Not HTTP (e.g. a TLS ClientHello): record what came and hang up, as a plain HTTP
            // server would, instead of waiting for a request head that never comes.
            if !buffer[0].is_ascii_uppercase() {
                seen.lock().unwrap().push(buffer);
                return;
            }
        };
        let head = String::from_utf8_lossy(&buffer[..head_end]).to_ascii_lowercase();
        let chunked = head.contains("\r\ntransfer-encoding:");
        let length: usize = head
            .split("\r\n")
            .find_map(|line| line.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buffer.len() < head_end + length {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        }
        let end = (head_end + length).min(buffer.len());
        let rest = buffer.split_off(end);
        seen.lock()
            .unwrap()
            .push(std::mem::replace(&mut buffer, rest));
        if chunked {
            return;
        }
        let answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/scim+json\r\nContent-Length: 2\r\n\r\n{}";
        if stream.write_all(answer).await.is_err() {
            return;
        }
    }
}
