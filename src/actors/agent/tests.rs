//! Dialer and forward behaviour against real sockets on 127.0.0.1. The small HTTP server here is
//! also used by the lifecycle tests.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::TlsAcceptor;

use super::dialer::Dialers;
use super::forward::TEST_PANIC_HEADER;
use crate::messages::agent::{DialerLimits, TargetSpec, TargetStats, TargetTls};
use crate::messages::{ForwardError, ForwardRequest, ForwardResponse, HttpResponse, Scheme};

const WAIT: Duration = Duration::from_secs(10);

/// Stands in for the AgentSupervisor: keeps running whatever its children do.
struct TestSupervisor;

impl Actor for TestSupervisor {
    type Msg = ();
    type State = ();
    type Arguments = ();

    async fn pre_start(&self, _myself: ActorRef<()>, _args: ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<()>,
        _event: SupervisionEvent,
        _state: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        Ok(())
    }
}

struct Agent {
    dialers: Dialers,
    supervisor: ActorRef<()>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.dialers.stop_all();
        self.supervisor.stop(None);
    }
}

async fn agent(specs: Vec<TargetSpec>, limits: DialerLimits) -> Agent {
    let (supervisor, _) = TestSupervisor::spawn(None, TestSupervisor, ())
        .await
        .unwrap();
    let dialers = Dialers::spawn_all(specs, limits, supervisor.get_cell())
        .await
        .unwrap();
    Agent {
        dialers,
        supervisor,
    }
}

fn spec(name: &str, addr: SocketAddr) -> TargetSpec {
    TargetSpec {
        name: name.into(),
        addr: addr.to_string(),
        tls: TargetTls::FromScheme,
        insecure_allow_skip_tls_check: false,
        extra_roots: Vec::new(),
    }
}

fn get(id: u64, target: &str, host: &str, path: &str) -> ForwardRequest {
    ForwardRequest {
        id,
        target: target.into(),
        scheme: Scheme::Http,
        host: host.into(),
        method: "GET".into(),
        path_and_query: path.into(),
        headers: vec![("Accept".into(), b"application/scim+json".to_vec())],
        body: Vec::new(),
        skip_tls_verify: false,
        timeout_ms: 5_000,
    }
}

impl Agent {
    /// Routes one request and waits for its answer.
    async fn send(&self, request: ForwardRequest) -> Result<HttpResponse, ForwardError> {
        let id = request.id;
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.dialers.route(request, tx);
        let response = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("no answer in time")
            .expect("answer channel closed without an answer");
        assert_eq!(response.id, id);
        response.result
    }

    async fn stats(&self, name: &str) -> TargetStats {
        self.dialers
            .stats()
            .await
            .into_iter()
            .find(|s| s.name == name)
            .expect("target listed")
    }
}

// ---------- a small raw HTTP/1.x server, plain or TLS ----------

#[derive(Debug, Clone)]
pub(super) struct Seen {
    method: String,
    pub(super) path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    sni: Option<String>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Clone)]
pub(super) enum Reply {
    /// Write these bytes, then keep the connection for the next request.
    KeepAlive(Vec<u8>),
    /// Write these bytes, then close.
    Close(Vec<u8>),
    /// Never answer, keep the connection open.
    Hang,
    /// Wait for the notification, then write and close.
    After(Arc<Notify>, Vec<u8>),
    /// Write, keep the connection open until the notification, then close it without notice
    /// and report on the channel.
    CloseLater(Vec<u8>, Arc<Notify>, mpsc::UnboundedSender<()>),
    /// Write the first bytes, wait for the notification, write the rest and close.
    Split(Vec<u8>, Arc<Notify>, Vec<u8>),
}

pub(super) type Handler = Arc<dyn Fn(&Seen) -> Reply + Send + Sync>;

pub(super) struct TestServer {
    pub(super) addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    seen: mpsc::UnboundedReceiver<Seen>,
}

impl TestServer {
    pub(super) fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    pub(super) async fn next_seen(&mut self) -> Seen {
        tokio::time::timeout(WAIT, self.seen.recv())
            .await
            .expect("server saw no request")
            .expect("server gone")
    }
}

fn response(status: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\n", body.len());
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

pub(super) fn ok(body: &[u8]) -> Vec<u8> {
    response("200 OK", &[("Content-Type", "application/scim+json")], body)
}

pub(super) async fn serve(handler: Handler, tls: Option<TlsAcceptor>) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let (seen_tx, seen) = mpsc::unbounded_channel();
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            stream.set_nodelay(true).unwrap();
            let handler = handler.clone();
            let seen_tx = seen_tx.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                match tls {
                    None => serve_connection(stream, None, handler, seen_tx).await,
                    Some(acceptor) => {
                        // A client that rejects our certificate ends the handshake: fine.
                        if let Ok(stream) = acceptor.accept(stream).await {
                            let sni = stream.get_ref().1.server_name().map(str::to_owned);
                            serve_connection(stream, sni, handler, seen_tx).await;
                        }
                    }
                }
            });
        }
    });
    TestServer {
        addr,
        accepted,
        seen,
    }
}

async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    sni: Option<String>,
    handler: Handler,
    seen_tx: mpsc::UnboundedSender<Seen>,
) {
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if buf.first() == Some(&0x16) {
                // A TLS ClientHello on a plain port: answer like a plain HTTP server would.
                let _ = stream
                    .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await;
                return;
            }
            if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break pos + 4;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let mut request_line = lines.next().unwrap_or_default().split(' ');
        let method = request_line.next().unwrap_or_default().to_owned();
        let path = request_line.next().unwrap_or_default().to_owned();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
            .collect();
        let length: usize = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + length {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body = buf[head_end..head_end + length].to_vec();
        buf.drain(..head_end + length);
        let seen = Seen {
            method,
            path,
            headers,
            body,
            sni: sni.clone(),
        };
        let reply = handler(&seen);
        let _ = seen_tx.send(seen);
        match reply {
            Reply::KeepAlive(bytes) => {
                if stream.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            Reply::Close(bytes) => {
                let _ = stream.write_all(&bytes).await;
                let _ = stream.shutdown().await;
                return;
            }
            Reply::Hang => std::future::pending::<()>().await,
            Reply::CloseLater(bytes, gate, closed) => {
                let _ = stream.write_all(&bytes).await;
                gate.notified().await;
                let _ = stream.shutdown().await;
                drop(stream);
                let _ = closed.send(());
                return;
            }
            Reply::After(gate, bytes) => {
                gate.notified().await;
                let _ = stream.write_all(&bytes).await;
                let _ = stream.shutdown().await;
                return;
            }
            Reply::Split(first, gate, rest) => {
                let _ = stream.write_all(&first).await;
                gate.notified().await;
                let _ = stream.write_all(&rest).await;
                let _ = stream.shutdown().await;
                return;
            }
        }
    }
}

pub(super) fn handler(f: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Handler {
    Arc::new(f)
}

// ---------- tests ----------

#[tokio::test]
async fn forwards_to_plain_http_target() {
    use axum::http::{HeaderMap, StatusCode};

    async fn create_user(
        headers: HeaderMap,
        body: axum::body::Bytes,
    ) -> impl axum::response::IntoResponse {
        let host = headers
            .get("host")
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let auth = if headers.contains_key("authorization") {
            "true"
        } else {
            "false"
        };
        let mut echoed = body.to_vec();
        echoed.extend_from_slice(b"|");
        echoed.extend_from_slice(host.as_bytes());
        (
            StatusCode::CREATED,
            [
                ("content-type", "application/scim+json"),
                ("x-saw-authorization", auth),
                ("etag", "W/\"1\""),
            ],
            echoed,
        )
    }

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route("/scim/v2/Users", axum::routing::post(create_user));
    tokio::spawn(async move { axum::serve(listener, app).await });

    let agent = agent(vec![spec("app", addr)], DialerLimits::default()).await;
    let mut request = get(7, "app", "scim.example.com:8080", "/scim/v2/Users");
    request.method = "POST".into();
    request.body = br#"{"userName":"ada"}"#.to_vec();
    request
        .headers
        .push(("Authorization".into(), b"Bearer secret".to_vec()));
    request
        .headers
        .push(("Connection".into(), b"close".to_vec()));

    let response = agent.send(request).await.expect("forwarded");
    assert_eq!(response.status, 201);
    assert_eq!(
        response.body,
        br#"{"userName":"ada"}|scim.example.com:8080"#
    );
    let header = |name: &str| {
        response
            .headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(
        header("content-type").as_deref(),
        Some(&b"application/scim+json"[..])
    );
    assert_eq!(header("x-saw-authorization").as_deref(), Some(&b"true"[..]));
    assert_eq!(header("etag").as_deref(), Some(&b"W/\"1\""[..]));

    let stats = agent.stats("app").await;
    assert_eq!((stats.forwarded, stats.errors, stats.in_flight), (1, 0, 0));
    assert_eq!(stats.addr, addr.to_string());
    assert_eq!(stats.tls, "from-scheme");
}

#[tokio::test]
async fn hop_by_hop_headers_do_not_reach_the_target() {
    let mut server = serve(handler(|_| Reply::Close(ok(b"{}"))), None).await;
    let agent = agent(vec![spec("app", server.addr)], DialerLimits::default()).await;
    let mut request = get(1, "app", "app.internal", "/Users?filter=x");
    request.headers.extend([
        ("Upgrade".into(), b"websocket".to_vec()),
        ("Proxy-Authorization".into(), b"Basic eDp5".to_vec()),
        ("Host".into(), b"elsewhere.example".to_vec()),
        ("X-Kept".into(), b"1".to_vec()),
    ]);
    agent.send(request).await.expect("forwarded");
    let seen = server.next_seen().await;
    assert_eq!(seen.method, "GET");
    assert_eq!(seen.path, "/Users?filter=x");
    assert_eq!(seen.header("host"), Some("app.internal"));
    assert_eq!(seen.header("x-kept"), Some("1"));
    assert_eq!(seen.header("upgrade"), None);
    assert_eq!(seen.header("proxy-authorization"), None);
    assert!(seen.body.is_empty());
}

#[tokio::test]
async fn undeclared_target_is_never_dialed() {
    let server = serve(handler(|_| Reply::Close(ok(b"{}"))), None).await;
    let agent = agent(vec![spec("declared", server.addr)], DialerLimits::default()).await;

    let error = agent
        .send(get(1, "other", "app.internal", "/Users"))
        .await
        .unwrap_err();
    assert_eq!(
        error,
        ForwardError::UndeclaredTarget {
            name: "other".into()
        }
    );
    assert_eq!(server.accepted(), 0);

    agent
        .send(get(2, "declared", "app.internal", "/Users"))
        .await
        .expect("declared target answers");
    assert_eq!(server.accepted(), 1);
    assert_eq!(agent.dialers.targets().len(), 1);
}

#[tokio::test]
async fn refused_requests_open_no_connection() {
    let server = serve(handler(|_| Reply::Close(ok(b"{}"))), None).await;
    let agent = agent(vec![spec("app", server.addr)], DialerLimits::default()).await;

    let mut trace = get(1, "app", "app.internal", "/Users");
    trace.method = "TRACE".into();
    assert!(matches!(
        agent.send(trace).await,
        Err(ForwardError::Refused { .. })
    ));
    let split = get(2, "app", "app.internal", "/Users\r\nX-Injected: 1");
    assert!(matches!(
        agent.send(split).await,
        Err(ForwardError::Refused { .. })
    ));
    let mut bad_header = get(3, "app", "app.internal", "/Users");
    bad_header
        .headers
        .push(("X-A".into(), b"1\r\nX-Injected: 1".to_vec()));
    assert!(matches!(
        agent.send(bad_header).await,
        Err(ForwardError::Refused { .. })
    ));
    assert_eq!(server.accepted(), 0);
    assert_eq!(agent.stats("app").await.errors, 3);
}

#[tokio::test]
async fn a_panicking_forward_is_answered_and_others_continue() {
    let gate = Arc::new(Notify::new());
    let slow_gate = gate.clone();
    let mut server = serve(
        handler(move |_| Reply::After(slow_gate.clone(), ok(b"slow"))),
        None,
    )
    .await;
    let agent = agent(vec![spec("app", server.addr)], DialerLimits::default()).await;

    let (slow_tx, mut slow_rx) = mpsc::unbounded_channel();
    agent
        .dialers
        .route(get(1, "app", "app.internal", "/slow"), slow_tx);
    server.next_seen().await; // the slow request is at the target

    let mut doomed = get(2, "app", "app.internal", "/Users");
    doomed
        .headers
        .push((TEST_PANIC_HEADER.into(), b"1".to_vec()));
    match agent.send(doomed).await {
        Err(ForwardError::Internal { detail }) => {
            assert!(detail.contains("forced panic"), "{detail}");
            assert!(!detail.contains('\n'), "{detail}");
        }
        other => panic!("expected Internal, got {other:?}"),
    }
    let stats = agent.stats("app").await;
    assert_eq!(stats.forward_restarts, 1);
    assert_eq!(stats.in_flight, 1);

    gate.notify_one();
    let slow: ForwardResponse = tokio::time::timeout(WAIT, slow_rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(slow.id, 1);
    assert_eq!(slow.result.unwrap().body, b"slow");

    // The dialer still serves new requests.
    gate.notify_one();
    agent
        .send(get(3, "app", "app.internal", "/again"))
        .await
        .expect("dialer still up");
    let stats = agent.stats("app").await;
    assert_eq!(
        (stats.forward_restarts, stats.forwarded, stats.errors),
        (1, 2, 1)
    );
}

#[tokio::test]
async fn cancel_stops_the_request_and_answers_nothing() {
    let mut server = serve(handler(|_| Reply::Hang), None).await;
    let agent = agent(vec![spec("app", server.addr)], DialerLimits::default()).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    agent
        .dialers
        .route(get(9, "app", "app.internal", "/Users"), tx);
    server.next_seen().await;
    assert_eq!(agent.stats("app").await.in_flight, 1);

    agent.dialers.cancel(9);
    // Every sender is dropped once the forward is gone, without a message.
    let next = tokio::time::timeout(WAIT, rx.recv()).await.unwrap();
    assert!(next.is_none(), "cancelled request was answered: {next:?}");
    let stats = agent.stats("app").await;
    assert_eq!((stats.in_flight, stats.forwarded, stats.errors), (0, 0, 0));
}

#[tokio::test]
async fn connect_refused_is_typed() {
    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let agent = agent(vec![spec("app", closed)], DialerLimits::default()).await;
    assert_eq!(
        agent.send(get(1, "app", "app.internal", "/Users")).await,
        Err(ForwardError::ConnectRefused {
            addr: closed.to_string()
        })
    );
    let stats = agent.stats("app").await;
    assert_eq!(stats.errors, 1);
    assert!(stats.last_error.unwrap().contains("refused"));
}

#[tokio::test]
async fn address_without_port_is_a_resolution_error() {
    let mut target = spec("app", "127.0.0.1:1".parse().unwrap());
    target.addr = "localhost".into();
    let agent = agent(vec![target], DialerLimits::default()).await;
    assert!(matches!(
        agent.send(get(1, "app", "app.internal", "/Users")).await,
        Err(ForwardError::Dns { .. })
    ));
}

#[tokio::test]
async fn silent_target_times_out_within_bound() {
    let server = serve(handler(|_| Reply::Hang), None).await;
    let agent = agent(vec![spec("app", server.addr)], DialerLimits::default()).await;
    let mut request = get(1, "app", "app.internal", "/Users");
    request.timeout_ms = 300;
    let started = Instant::now();
    let result = agent.send(request).await;
    let elapsed = started.elapsed();
    assert_eq!(
        result,
        Err(ForwardError::ResponseTimeout {
            addr: server.addr.to_string(),
            timeout_ms: 300
        })
    );
    assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
}

#[tokio::test]
async fn requests_waiting_for_a_slot_still_time_out() {
    let gate = Arc::new(Notify::new());
    let slow_gate = gate.clone();
    let mut server = serve(
        handler(move |_| Reply::After(slow_gate.clone(), ok(b"{}"))),
        None,
    )
    .await;
    let limits = DialerLimits {
        max_in_flight: 1,
        ..DialerLimits::default()
    };
    let agent = agent(vec![spec("app", server.addr)], limits).await;
    let (tx, mut first) = mpsc::unbounded_channel();
    agent.dialers.route(get(1, "app", "app.internal", "/a"), tx);
    server.next_seen().await;

    let mut waiting = get(2, "app", "app.internal", "/b");
    waiting.timeout_ms = 200;
    assert!(matches!(
        agent.send(waiting).await,
        Err(ForwardError::ResponseTimeout { .. })
    ));
    assert_eq!(server.accepted(), 1, "the waiting request must not connect");

    gate.notify_one();
    let answer = tokio::time::timeout(WAIT, first.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(answer.result.is_ok());
}

#[tokio::test]
async fn oversized_responses_are_refused() {
    let big = vec![b'x'; 4096];
    let declared_body = big.clone();
    let declared = serve(handler(move |_| Reply::Close(ok(&declared_body))), None).await;
    // No Content-Length: the limit must hold while streaming the chunked body.
    let chunked = serve(
        handler(|_| {
            let mut bytes = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            for _ in 0..8 {
                bytes.extend_from_slice(b"200\r\n");
                bytes.extend_from_slice(&[b'y'; 512]);
                bytes.extend_from_slice(b"\r\n");
            }
            bytes.extend_from_slice(b"0\r\n\r\n");
            Reply::Close(bytes)
        }),
        None,
    )
    .await;
    let fits = serve(handler(|_| Reply::Close(ok(&[b'z'; 1024]))), None).await;
    let limits = DialerLimits {
        max_response_bytes: 1024,
        ..DialerLimits::default()
    };
    let agent = agent(
        vec![
            spec("declared", declared.addr),
            spec("chunked", chunked.addr),
            spec("fits", fits.addr),
        ],
        limits,
    )
    .await;
    for name in ["declared", "chunked"] {
        let error = agent
            .send(get(1, name, "app.internal", "/Users"))
            .await
            .unwrap_err();
        assert!(
            matches!(error, ForwardError::TooLarge { limit: 1024, .. }),
            "{name}: {error:?}"
        );
    }
    let fits = agent
        .send(get(2, "fits", "app.internal", "/Users"))
        .await
        .unwrap();
    assert_eq!(fits.body.len(), 1024);
}

/// A limit above what one tunnel frame carries would let an accepted answer fail to encode and
/// take the tunnel down: it is lowered, and an answer at the lowered limit does encode.
#[tokio::test]
async fn response_limits_beyond_a_tunnel_frame_are_lowered_to_what_fits() {
    use crate::messages::agent::MAX_RESPONSE_BODY_BYTES;
    use crate::messages::Frame;

    let over = MAX_RESPONSE_BODY_BYTES + 1;
    // Declares one byte too many and then sends nothing: refused on the header alone.
    let declared = serve(
        handler(move |_| {
            Reply::KeepAlive(
                format!("HTTP/1.1 200 OK\r\nContent-Length: {over}\r\n\r\n").into_bytes(),
            )
        }),
        None,
    )
    .await;
    // Exactly at the limit, with a head as large as the client reads.
    let at_limit = serve(
        handler(|_| {
            let filler = "v".repeat(1000);
            let mut head =
                format!("HTTP/1.1 200 OK\r\nContent-Length: {MAX_RESPONSE_BODY_BYTES}\r\n");
            for i in 0..90 {
                head.push_str(&format!("x-filler-{i}: {filler}\r\n"));
            }
            head.push_str("\r\n");
            let mut bytes = head.into_bytes();
            bytes.resize(bytes.len() + MAX_RESPONSE_BODY_BYTES, b'b');
            Reply::Close(bytes)
        }),
        None,
    )
    .await;
    let limits = DialerLimits {
        max_response_bytes: 32 * 1024 * 1024,
        ..DialerLimits::default()
    };
    let agent = agent(
        vec![
            spec("declared", declared.addr),
            spec("at-limit", at_limit.addr),
        ],
        limits,
    )
    .await;

    let started = Instant::now();
    let refused = agent
        .send(get(1, "declared", "app.internal", "/Users"))
        .await;
    assert_eq!(
        refused,
        Err(ForwardError::TooLarge {
            addr: declared.addr.to_string(),
            limit: MAX_RESPONSE_BODY_BYTES as u64
        })
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    let answer = agent
        .send(get(2, "at-limit", "app.internal", "/Users"))
        .await
        .expect("an answer at the limit is accepted");
    assert_eq!(answer.body.len(), MAX_RESPONSE_BODY_BYTES);
    let frame = Frame::Response(ForwardResponse {
        id: 2,
        result: Ok(answer),
    });
    crate::tunnel::encode_frame(&frame).expect("the largest accepted answer fits in a frame");
}

/// Past the unreserved size a body is read only while holding one of the agent-wide large-body
/// slots: with one slot taken by a body on one target, a large body on another target waits
/// (and times out), a small one does not, and the large one goes through once the slot is free.
#[tokio::test]
async fn large_bodies_share_a_few_slots_across_targets() {
    let gate = Arc::new(Notify::new());
    let hog_gate = gate.clone();
    let hog = serve(
        handler(move |_| {
            let mut first = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            first.extend_from_slice(b"800\r\n");
            first.extend_from_slice(&[b'h'; 2048]);
            first.extend_from_slice(b"\r\n");
            let mut rest = b"400\r\n".to_vec();
            rest.extend_from_slice(&[b'h'; 1024]);
            rest.extend_from_slice(b"\r\n0\r\n\r\n");
            Reply::Split(first, hog_gate.clone(), rest)
        }),
        None,
    )
    .await;
    let big = serve(handler(|_| Reply::Close(ok(&[b'B'; 4096]))), None).await;
    let small = serve(handler(|_| Reply::Close(ok(&[b's'; 512]))), None).await;
    let limits = DialerLimits {
        unreserved_body_bytes: 1024,
        large_bodies: 1,
        ..DialerLimits::default()
    };
    let agent = agent(
        vec![
            spec("hog", hog.addr),
            spec("big", big.addr),
            spec("small", small.addr),
        ],
        limits,
    )
    .await;
    let slots = agent
        .dialers
        .large_bodies()
        .expect("slots made with the dialers")
        .clone();
    assert_eq!(slots.available(), 1);

    let (tx, mut hogged) = mpsc::unbounded_channel();
    agent
        .dialers
        .route(get(1, "hog", "app.internal", "/Users"), tx);
    let deadline = Instant::now() + WAIT;
    while slots.available() != 0 {
        assert!(Instant::now() < deadline, "the hog never took the slot");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let mut waiting = get(2, "big", "app.internal", "/Users");
    waiting.timeout_ms = 300;
    assert!(
        matches!(
            agent.send(waiting).await,
            Err(ForwardError::ResponseTimeout { .. })
        ),
        "a large body must wait for the slot"
    );
    let fits = agent
        .send(get(3, "small", "app.internal", "/Users"))
        .await
        .expect("a small body needs no slot");
    assert_eq!(fits.body.len(), 512);

    gate.notify_one();
    let answer = tokio::time::timeout(WAIT, hogged.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer.result.unwrap().body.len(), 3072);
    let answer = agent
        .send(get(4, "big", "app.internal", "/Users"))
        .await
        .expect("the slot is free again");
    assert_eq!(answer.body.len(), 4096);
    assert_eq!(slots.available(), 1);
}

#[tokio::test]
async fn target_closing_after_every_response_is_fine() {
    // HTTP/1.0 style: no keep-alive, close after each answer (like scim2-server).
    let http10 = serve(
        handler(|_| Reply::Close(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec())),
        None,
    )
    .await;
    // HTTP/1.1 announcing Connection: close.
    let announced = serve(
        handler(|_| Reply::Close(response("200 OK", &[("Connection", "close")], b"ok"))),
        None,
    )
    .await;
    // HTTP/1.1 that looks keep-alive but closes anyway.
    let silent = serve(handler(|_| Reply::Close(ok(b"ok"))), None).await;
    let agent = agent(
        vec![
            spec("http10", http10.addr),
            spec("announced", announced.addr),
            spec("silent", silent.addr),
        ],
        DialerLimits::default(),
    )
    .await;
    for name in ["http10", "announced", "silent"] {
        for id in 0..20 {
            let mut request = get(id, name, "app.internal", "/Users");
            if id % 2 == 1 {
                request.method = "POST".into();
                request.body = b"{}".to_vec();
            }
            let response = agent
                .send(request)
                .await
                .unwrap_or_else(|e| panic!("{name} request {id}: {e}"));
            assert_eq!(response.body, b"ok");
        }
    }
    assert_eq!(http10.accepted(), 20);
    assert_eq!(announced.accepted(), 20);
    assert_eq!(silent.accepted(), 20);
}

#[tokio::test]
async fn keep_alive_connections_are_reused() {
    let server = serve(handler(|_| Reply::KeepAlive(ok(b"ok"))), None).await;
    let agent = agent(vec![spec("app", server.addr)], DialerLimits::default()).await;
    for id in 0..20 {
        agent
            .send(get(id, "app", "app.internal", "/Users"))
            .await
            .expect("forwarded");
    }
    assert!(server.accepted() <= 2, "{} connections", server.accepted());
}

#[tokio::test]
async fn update_takes_effect_for_new_requests() {
    let first = serve(handler(|_| Reply::Close(ok(b"first"))), None).await;
    let second = serve(handler(|_| Reply::Close(ok(b"second"))), None).await;
    let (supervisor, _) = TestSupervisor::spawn(None, TestSupervisor, ())
        .await
        .unwrap();
    let mut dialers = Dialers::spawn_all(
        vec![spec("app", first.addr), spec("gone", first.addr)],
        DialerLimits::default(),
        supervisor.get_cell(),
    )
    .await
    .unwrap();
    let agent = Agent {
        dialers: dialers.clone(),
        supervisor: supervisor.clone(),
    };
    let body = agent.send(get(1, "app", "h", "/")).await.unwrap().body;
    assert_eq!(body, b"first");

    dialers
        .reconcile(
            vec![spec("app", second.addr), spec("new", second.addr)],
            DialerLimits::default(),
            supervisor.get_cell(),
        )
        .await
        .unwrap();
    let agent = Agent {
        dialers: dialers.clone(),
        supervisor,
    };
    let body = agent.send(get(2, "app", "h", "/")).await.unwrap().body;
    assert_eq!(body, b"second");
    let names: Vec<String> = dialers.targets().into_iter().map(|t| t.name).collect();
    assert_eq!(names, ["app", "new"]);
    assert!(matches!(
        agent.send(get(3, "gone", "h", "/")).await,
        Err(ForwardError::UndeclaredTarget { .. })
    ));
}

// ---------- TLS ----------

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn acceptor(cert: CertificateDer<'static>, key: &rcgen::KeyPair) -> TlsAcceptor {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    TlsAcceptor::from(Arc::new(config))
}

/// A CA and a server certificate it signed for `localhost` and `127.0.0.1`.
fn ca_and_leaf() -> (
    CertificateDer<'static>,
    CertificateDer<'static>,
    rcgen::KeyPair,
) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "scim-connect test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &ca)
            .unwrap();
    (ca.der().clone(), leaf.der().clone(), leaf_key)
}

fn https(id: u64, target: &str, host: &str) -> ForwardRequest {
    ForwardRequest {
        scheme: Scheme::Https,
        ..get(id, target, host, "/scim/v2/Users")
    }
}

fn tls_detail(result: Result<HttpResponse, ForwardError>) -> String {
    match result {
        Err(ForwardError::Tls { detail, .. }) => detail,
        other => panic!("expected a TLS error, got {other:?}"),
    }
}

#[tokio::test]
async fn self_signed_target_needs_both_skip_flags() {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let mut server = serve(
        handler(|_| Reply::KeepAlive(ok(b"tls"))),
        Some(acceptor(cert.der().clone(), &signing_key)),
    )
    .await;
    let strict = spec("strict", server.addr);
    let lenient = TargetSpec {
        insecure_allow_skip_tls_check: true,
        ..spec("lenient", server.addr)
    };
    let agent = agent(vec![strict, lenient], DialerLimits::default()).await;
    let host = format!("localhost:{}", server.addr.port());

    let detail = tls_detail(agent.send(https(1, "strict", &host)).await);
    assert!(detail.contains("self-signed"), "{detail}");
    assert!(
        detail.contains("-insecure-allow-skip-tls-check"),
        "{detail}"
    );

    let mut asks_skip = https(2, "strict", &host);
    asks_skip.skip_tls_verify = true;
    let detail = tls_detail(agent.send(asks_skip).await);
    assert!(detail.contains("self-signed"), "{detail}");
    assert!(detail.contains("was not declared"), "{detail}");

    // Allowed by the target but not asked for by the application: still checked.
    let detail = tls_detail(agent.send(https(3, "lenient", &host)).await);
    assert!(detail.contains("self-signed"), "{detail}");

    let mut both = https(4, "lenient", &host);
    both.skip_tls_verify = true;
    let response = agent.send(both).await.expect("skip allowed and asked");
    assert_eq!(response.body, b"tls");
    let seen = server.next_seen().await;
    assert_eq!(seen.sni.as_deref(), Some("localhost"));
    assert_eq!(seen.header("host"), Some(host.as_str()));
}

#[tokio::test]
async fn ca_signed_target_verifies_with_extra_root() {
    let (ca, leaf, leaf_key) = ca_and_leaf();
    let mut server = serve(
        handler(|_| Reply::KeepAlive(ok(b"verified"))),
        Some(acceptor(leaf, &leaf_key)),
    )
    .await;
    let trusted = TargetSpec {
        extra_roots: vec![ca],
        ..spec("trusted", server.addr)
    };
    let always = TargetSpec {
        tls: TargetTls::Always,
        ..trusted.clone()
    };
    let always = TargetSpec {
        name: "always".into(),
        ..always
    };
    let agent = agent(
        vec![trusted, always, spec("untrusted", server.addr)],
        DialerLimits::default(),
    )
    .await;
    let port = server.addr.port();

    let response = agent
        .send(https(1, "trusted", &format!("localhost:{port}")))
        .await
        .expect("verified by the extra root");
    assert_eq!(response.body, b"verified");
    assert_eq!(server.next_seen().await.sni.as_deref(), Some("localhost"));

    // An IP literal host is verified against the certificate's IP address.
    let response = agent
        .send(https(2, "trusted", &format!("127.0.0.1:{port}")))
        .await
        .expect("IP SAN verified");
    assert_eq!(response.body, b"verified");

    // Wrong name for the certificate.
    let detail = tls_detail(agent.send(https(3, "trusted", "other.example")).await);
    assert!(detail.contains("not valid for"), "{detail}");

    // Without the CA: unknown issuer, not self-signed.
    let detail = tls_detail(agent.send(https(4, "untrusted", "localhost")).await);
    assert!(detail.contains("unknown issuer"), "{detail}");

    // http:// base URL, but the target says always TLS: the TLS-only server answers.
    let plain_scheme = get(5, "always", &format!("localhost:{port}"), "/scim/v2/Users");
    let response = agent
        .send(plain_scheme)
        .await
        .expect("TLS used for http scheme");
    assert_eq!(response.body, b"verified");
}

#[tokio::test]
async fn never_tls_target_speaks_plain_http_for_https_urls() {
    let server = serve(handler(|_| Reply::KeepAlive(ok(b"plain"))), None).await;
    let never = TargetSpec {
        tls: TargetTls::Never,
        ..spec("never", server.addr)
    };
    let agent = agent(
        vec![never, spec("from-scheme", server.addr)],
        DialerLimits::default(),
    )
    .await;
    let response = agent
        .send(https(1, "never", "localhost"))
        .await
        .expect("plain HTTP despite https scheme");
    assert_eq!(response.body, b"plain");

    // The same plain server reached with TLS: a clear hint instead of a certificate error.
    let detail = tls_detail(agent.send(https(2, "from-scheme", "localhost")).await);
    assert!(detail.contains("-no-tls"), "{detail}");
}

#[tokio::test]
async fn dead_pooled_connection_is_replaced_without_failing_the_request() {
    let gate = Arc::new(Notify::new());
    let (closed_tx, mut closed_rx) = mpsc::unbounded_channel();
    let server_gate = gate.clone();
    let server = serve(
        handler(move |_| Reply::CloseLater(ok(b"ok"), server_gate.clone(), closed_tx.clone())),
        None,
    )
    .await;
    let client = crate::forwarding::TargetClient::new(
        spec("app", server.addr),
        DialerLimits::default(),
        Arc::new(tokio::sync::Semaphore::new(4)),
        crate::forwarding::LargeBodies::new(&DialerLimits::default()),
    )
    .unwrap();

    let mut post = get(1, "app", "app.internal", "/Users");
    post.method = "POST".into();
    post.body = b"{}".to_vec();
    client.forward(&post).await.expect("first request");
    let deadline = Instant::now() + WAIT;
    while client.idle_connections() == 0 {
        assert!(
            Instant::now() < deadline,
            "connection never returned to the pool"
        );
        tokio::task::yield_now().await;
    }

    // The target drops the idle connection without telling; a POST must not fail because of it.
    gate.notify_one();
    tokio::time::timeout(WAIT, closed_rx.recv()).await.unwrap();
    post.id = 2;
    client
        .forward(&post)
        .await
        .expect("second request on a fresh connection");
    assert_eq!(server.accepted(), 2);
}

#[tokio::test]
async fn a_cancelled_request_stops_counting_in_flight_at_once() {
    let mut server = serve(handler(|_| Reply::Hang), None).await;
    let agent = agent(vec![spec("app", server.addr)], DialerLimits::default()).await;
    let (tx, _rx) = mpsc::unbounded_channel();
    agent
        .dialers
        .route(get(9, "app", "app.internal", "/Users"), tx);
    server.next_seen().await;
    assert_eq!(agent.stats("app").await.in_flight, 1);
    agent.dialers.cancel(9);
    // The dialer reads the Cancel before the Stats; the forward it killed may still be ending.
    assert_eq!(agent.stats("app").await.in_flight, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answered_request_stops_counting_in_flight_at_once() {
    let server = serve(handler(|_| Reply::KeepAlive(ok(b"ok"))), None).await;
    let agent = agent(vec![spec("app", server.addr)], DialerLimits::default()).await;
    for id in 0..200 {
        agent
            .send(get(id, "app", "app.internal", "/Users"))
            .await
            .expect("forwarded");
        assert_eq!(agent.stats("app").await.in_flight, 0, "request {id}");
    }
}

#[tokio::test]
async fn an_id_is_free_again_once_its_request_is_cancelled() {
    // A restarted Session numbers its requests from 1 again, right after cancelling those of
    // the dead tunnel: the new request must not be refused while the old forward is ending.
    let mut server = serve(
        handler(|seen| {
            if seen.path.contains("/hang") {
                Reply::Hang
            } else {
                Reply::Close(ok(b"fresh"))
            }
        }),
        None,
    )
    .await;
    let agent = agent(vec![spec("app", server.addr)], DialerLimits::default()).await;
    let (tx, mut old) = mpsc::unbounded_channel();
    agent
        .dialers
        .route(get(1, "app", "app.internal", "/hang"), tx);
    server.next_seen().await;
    agent.dialers.cancel(1);
    let fresh = agent
        .send(get(1, "app", "app.internal", "/Users"))
        .await
        .expect("the cancelled request is out of the way");
    assert_eq!(fresh.body, b"fresh");
    let next = tokio::time::timeout(WAIT, old.recv()).await.unwrap();
    assert!(next.is_none(), "cancelled request was answered: {next:?}");
    let stats = agent.stats("app").await;
    assert_eq!((stats.in_flight, stats.forwarded, stats.errors), (0, 1, 0));
}

#[tokio::test]
async fn requests_past_the_queue_bound_are_refused_at_once() {
    let mut server = serve(handler(|_| Reply::Hang), None).await;
    let limits = DialerLimits {
        max_in_flight: 1,
        max_queued: 3,
        ..DialerLimits::default()
    };
    let agent = agent(vec![spec("app", server.addr)], limits).await;
    let (tx, mut held) = mpsc::unbounded_channel();
    for id in 1..=3 {
        agent
            .dialers
            .route(get(id, "app", "app.internal", "/Users"), tx.clone());
    }
    server.next_seen().await;
    match agent.send(get(4, "app", "app.internal", "/Users")).await {
        Err(ForwardError::Busy { name, queued }) => assert_eq!((name.as_str(), queued), ("app", 3)),
        other => panic!("expected Busy, got {other:?}"),
    }
    assert_eq!(server.accepted(), 1, "a refused request never connects");
    // Once one of the held requests is gone, there is room again.
    agent.dialers.cancel(3);
    let (tx4, mut rx4) = mpsc::unbounded_channel();
    let mut accepted = get(5, "app", "app.internal", "/Users");
    accepted.timeout_ms = 200;
    let answer = tokio::time::timeout(WAIT, async {
        loop {
            agent.dialers.route(accepted.clone(), tx4.clone());
            let answer = rx4.recv().await.unwrap();
            // The cancelled Forward may still be ending when the first attempt arrives.
            if !matches!(answer.result, Err(ForwardError::Busy { .. })) {
                break answer;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("room again after a cancel");
    assert!(
        matches!(answer.result, Err(ForwardError::ResponseTimeout { .. })),
        "it waited for the slot: {:?}",
        answer.result
    );
    assert!(
        held.try_recv().is_err(),
        "the held requests are still in flight"
    );
}

#[tokio::test]
async fn request_bodies_past_the_byte_bound_are_refused_at_once() {
    let mut server = serve(handler(|_| Reply::Hang), None).await;
    let limits = DialerLimits {
        max_in_flight: 1,
        max_queued_bytes: 1000,
        ..DialerLimits::default()
    };
    let agent = agent(vec![spec("app", server.addr)], limits).await;
    let (tx, _held) = mpsc::unbounded_channel();
    let mut first = get(1, "app", "app.internal", "/Users");
    first.method = "POST".into();
    first.body = vec![b'a'; 600];
    agent.dialers.route(first, tx);
    server.next_seen().await;
    let mut second = get(2, "app", "app.internal", "/Users");
    second.method = "POST".into();
    second.body = vec![b'b'; 600];
    assert!(matches!(
        agent.send(second).await,
        Err(ForwardError::Busy { .. })
    ));
    // A small one still fits beside the first.
    let mut small = get(3, "app", "app.internal", "/Users");
    small.timeout_ms = 100;
    assert!(matches!(
        agent.send(small).await,
        Err(ForwardError::ResponseTimeout { .. })
    ));
}
