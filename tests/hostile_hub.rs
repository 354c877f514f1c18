//! A compromised or buggy hub against the real agent (`connect run`, the built binary).
//!
//! The hub here is the test's own ([`HostileHub`]): it completes a genuine Noise handshake with
//! the agent using the project's tunnel code, then sends requests no honest hub would. Every
//! declared target, and an address the hub would like to reach instead, is a
//! [`CountingListener`], so each case proves what was (not) dialed and what the target saw.
//! Each refusal is followed by a request that must work, so a count of zero means "refused",
//! not "broken".
//!
//! The last tests turn it around: a hub holding another service id learns nothing from the
//! agent, and the real hub (`connect hub`) sends nothing to an agent holding another id.

mod common;

use std::time::Duration;

use common::deploy::{deploy, DeploySpec, SERVICE_ID};
use common::hostile::{hub_request, next_binary, CountingListener, Ended, HostileHub, HubSession};
use common::{wait_until, ChildGuard};
use futures_util::{SinkExt, StreamExt};
use scim_connect::messages::{
    ForwardError, ForwardRequest, ForwardResponse, Frame, HttpResponse, TargetInfo,
    PROTOCOL_VERSION,
};
use scim_connect::tunnel::{self, Handshake};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

/// A service id no agent of these tests holds.
const OTHER_ID: &str = "svc-someone-else-76543210fedcba";

/// How long the agent may take to hang up on a hostile frame. Its own dead-peer detection
/// would end a stalled session only after 15 s, so a hang-up within this bound is a refusal.
const HANG_UP_WITHIN: Duration = Duration::from_secs(5);

/// A hostile hub with a connected, welcomed agent that declares `crm` and `wiki`, and a third
/// listener, `evil`, that nothing declares.
struct Scene {
    hub: HostileHub,
    crm: CountingListener,
    wiki: CountingListener,
    evil: CountingListener,
    agent: ChildGuard,
    session: HubSession,
    next_id: u64,
}

async fn scene() -> Scene {
    let hub = HostileHub::start().await;
    let crm = CountingListener::start().await;
    let wiki = CountingListener::start().await;
    let evil = CountingListener::start().await;
    let agent = hub.spawn_agent(SERVICE_ID, &[crm.target("crm"), wiki.target("wiki")]);
    let session = hub.accept_session(SERVICE_ID).await;
    Scene {
        hub,
        crm,
        wiki,
        evil,
        agent,
        session,
        next_id: 0,
    }
}

impl Scene {
    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// A GET to `crm` with a fresh id.
    fn get(&mut self, path: &str) -> ForwardRequest {
        let id = self.id();
        hub_request(id, "crm", "GET", path)
    }

    /// Connections made to each listener: (crm, wiki, evil).
    fn dialed(&self) -> (usize, usize, usize) {
        (
            self.crm.connections(),
            self.wiki.connections(),
            self.evil.connections(),
        )
    }

    async fn forward(&mut self, request: ForwardRequest) -> Result<HttpResponse, ForwardError> {
        self.session.request(request).await
    }

    /// Sends `request`, which must be refused by the agent's checks, and returns the reason.
    async fn refused(&mut self, what: &str, request: ForwardRequest) -> String {
        match self.forward(request).await {
            Err(ForwardError::Refused { reason }) => reason,
            other => panic!("{what}: expected a refusal, got {other:?}"),
        }
    }

    /// A well-formed request must still reach `crm`: the tunnel and the target are fine, so
    /// the zero counts before it mean refusal. Returns what `crm` received.
    async fn control(&mut self) -> Vec<u8> {
        let before = self.crm.requests().len();
        let request = self.get("/scim/v2/Users?count=1");
        let response = self.forward(request).await.expect("control request");
        assert_eq!(response.status, 200);
        let requests = self.crm.requests();
        assert_eq!(requests.len(), before + 1, "control request not seen once");
        requests.last().unwrap().clone()
    }

    fn logs(&self) -> String {
        self.agent.logs()
    }
}

fn header(name: &str, value: &[u8]) -> (String, Vec<u8>) {
    (name.to_owned(), value.to_vec())
}

/// The head of a raw request as the target received it, lower-cased, and its body.
fn split(raw: &[u8]) -> (String, Vec<u8>) {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete request head")
        + 4;
    (
        String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase(),
        raw[end..].to_vec(),
    )
}

#[tokio::test]
async fn hello_names_targets_but_never_their_addresses() {
    let s = scene().await;
    let Frame::Hello {
        version, targets, ..
    } = &s.session.hello
    else {
        unreachable!("accept_session checks for a Hello")
    };
    assert_eq!(*version, PROTOCOL_VERSION);
    assert_eq!(
        targets,
        &vec![
            TargetInfo { name: "crm".into() },
            TargetInfo {
                name: "wiki".into()
            }
        ]
    );
    let encoded = tunnel::encode_frame(&s.session.hello).unwrap();
    for addr in [s.crm.addr.to_string(), s.crm.addr.port().to_string()] {
        assert!(
            !encoded.windows(addr.len()).any(|w| w == addr.as_bytes()),
            "the hello carries `{addr}`"
        );
    }
}

#[tokio::test]
async fn cr_lf_or_nul_in_any_field_never_reaches_a_target() {
    let mut s = scene().await;
    let smuggle = b"1\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: evil\r\n\r\n";
    let mut cases: Vec<(&str, ForwardRequest)> = Vec::new();
    for method in [
        "GET\r\nX-Evil: 1",
        "GET\n",
        "GET\0",
        "GET /x HTTP/1.1\r\n\r\nGET",
    ] {
        let mut r = s.get("/scim/v2/Users");
        r.method = method.into();
        cases.push(("method", r));
    }
    for path in [
        "/scim/v2/Users\r\nX-Evil: 1",
        "/scim/v2/Users\n",
        "/scim/v2/Users\0",
        "/scim/v2/Users HTTP/1.1\r\nHost: evil\r\n\r\nGET /smuggled",
        "/scim/v2/Users?filter=userName%20eq%20%22a%22\r\nX-Evil: 1",
        "/scim/v2/Users?count=1\0",
        "/scim/v2/Users?count=1\n\nGET /smuggled HTTP/1.1",
    ] {
        cases.push(("path or query", s.get(path)));
    }
    for name in [
        "X-A\r\nX-B",
        "X-A\n",
        "X-A\0",
        "X-A: 1\r\nX-B",
        "",
        "X A",
        "X-A:",
    ] {
        let mut r = s.get("/scim/v2/Users");
        r.headers.push(header(name, b"1"));
        cases.push(("header name", r));
    }
    for value in [&b"1\r\nX-B: 2"[..], b"1\n", b"1\r", b"a\0b", smuggle] {
        let mut r = s.get("/scim/v2/Users");
        r.headers.push(header("X-A", value));
        cases.push(("header value", r));
    }
    for host in [
        "scim.example\r\nX-Evil: 1",
        "scim.example\0",
        "scim.example:8080\r\n",
        "scim.example\n",
    ] {
        let mut r = s.get("/scim/v2/Users");
        r.host = host.into();
        cases.push(("host", r));
    }
    for (what, request) in cases {
        let shown = format!("{what} {:?}", request);
        let reason = s.refused(&shown, request).await;
        assert!(
            !reason.contains('\r') && !reason.contains('\n'),
            "{reason:?}"
        );
        assert_eq!(s.dialed(), (0, 0, 0), "{shown} dialed something");
    }
    let seen = s.control().await;
    assert!(seen.starts_with(b"GET /scim/v2/Users?count=1 HTTP/1.1\r\n"));
    assert_eq!(s.dialed(), (1, 0, 0));
}

#[tokio::test]
async fn request_targets_that_name_another_host_are_refused() {
    let mut s = scene().await;
    let evil = s.evil.addr;
    for path in [
        format!("http://{evil}/scim/v2/Users"),
        format!("https://{evil}/scim/v2/Users"),
        format!("//{evil}/scim/v2/Users"),
        format!("{evil}"),
        "evil.example:80".to_owned(),
        "*".to_owned(),
        String::new(),
        format!("/scim/v2/Users#@{evil}"),
        "scim/v2/Users".to_owned(),
    ] {
        let request = s.get(&path);
        s.refused(&format!("path {path:?}"), request).await;
        assert_eq!(s.dialed(), (0, 0, 0), "path {path:?} dialed something");
    }
    s.control().await;
    assert_eq!(s.dialed(), (1, 0, 0));
}

#[tokio::test]
async fn neither_host_header_nor_host_field_chooses_the_address() {
    let mut s = scene().await;
    let evil = s.evil.addr.to_string();

    // The hub's own `Host` header (and friends) are dropped; the agent sets Host itself.
    let mut r = s.get("/scim/v2/Users");
    r.headers.push(header("Host", evil.as_bytes()));
    r.headers.push(header("host", b"evil.example"));
    s.forward(r).await.expect("forwarded to crm");
    let (head, _) = split(s.crm.requests().last().unwrap());
    assert_eq!(head.matches("\r\nhost:").count(), 1, "{head}");
    assert!(head.contains("\r\nhost: scim.example:8080\r\n"), "{head}");
    assert_eq!(s.dialed(), (1, 0, 0));

    // The `host` field is the base URL's host: it becomes the Host header, never the address.
    let mut r = s.get("/scim/v2/Users");
    r.host = evil.clone();
    s.forward(r).await.expect("forwarded to crm");
    let (head, _) = split(s.crm.requests().last().unwrap());
    assert!(head.contains(&format!("\r\nhost: {evil}\r\n")), "{head}");
    assert_eq!(s.evil.connections(), 0);
    assert_eq!(s.wiki.connections(), 0);

    // Nor for TLS: an https base URL naming evil makes a TLS attempt to crm (which speaks
    // plain HTTP, so it fails), never a connection to evil.
    let mut r = s.get("/scim/v2/Users");
    r.host = evil.clone();
    r.scheme = scim_connect::messages::Scheme::Https;
    let result = s.forward(r).await;
    assert!(
        matches!(result, Err(ForwardError::Tls { ref addr, .. }) if *addr == s.crm.addr.to_string()),
        "{result:?}"
    );
    assert_eq!(s.evil.connections(), 0);

    // A host field carrying user information is refused outright.
    let mut r = s.get("/scim/v2/Users");
    r.host = format!("user:pw@{evil}");
    s.refused("host with userinfo", r).await;
    assert_eq!(s.evil.connections(), 0);
    assert_eq!(s.wiki.connections(), 0);
}

#[tokio::test]
async fn methods_beyond_scim_are_refused_and_upgrades_are_stripped() {
    let mut s = scene().await;
    let evil = s.evil.addr.to_string();
    for (method, path) in [
        ("CONNECT", evil.as_str()),
        ("CONNECT", "/"),
        ("TRACE", "/scim/v2/Users"),
        ("OPTIONS", "*"),
        ("OPTIONS", "/scim/v2/Users"),
        ("HEAD", "/scim/v2/Users"),
        ("PROPFIND", "/scim/v2/Users"),
        ("get", "/scim/v2/Users"),
        ("", "/scim/v2/Users"),
    ] {
        let id = s.id();
        let request = hub_request(id, "crm", method, path);
        s.refused(&format!("{method} {path}"), request).await;
        assert_eq!(s.dialed(), (0, 0, 0), "{method} {path} dialed something");
    }

    // An upgrade asked for by the hub never reaches the target: the request goes out as a
    // plain one and its answer comes back as a plain answer.
    for headers in [
        vec![
            header("Connection", b"Upgrade"),
            header("Upgrade", b"websocket"),
            header("Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
            header("Sec-WebSocket-Version", b"13"),
        ],
        vec![
            header("Connection", b"Upgrade, HTTP2-Settings"),
            header("Upgrade", b"h2c"),
            header("HTTP2-Settings", b"AAMAAABkAARAAAAAAAIAAAAA"),
        ],
        vec![
            header("Upgrade", b"TLS/1.2"),
            header("Connection", b"upgrade"),
        ],
    ] {
        let mut r = s.get("/scim/v2/Users");
        r.headers.extend(headers);
        let response = s.forward(r).await.expect("forwarded without the upgrade");
        assert_eq!(response.status, 200);
        let (head, _) = split(s.crm.requests().last().unwrap());
        for banned in ["\r\nupgrade:", "upgrade\r\n", "\r\nhttp2-settings:"] {
            assert!(
                !head.contains(banned),
                "`{banned}` reached the target:\n{head}"
            );
        }
    }
    assert_eq!(s.wiki.connections() + s.evil.connections(), 0);
    s.control().await;
}

#[tokio::test]
async fn conflicting_length_headers_cannot_smuggle_a_second_request() {
    let mut s = scene().await;
    let body = b"{\"schemas\":[]}\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: evil\r\n\r\n".to_vec();
    let header_sets = [
        vec![
            header("Transfer-Encoding", b"chunked"),
            header("Content-Length", b"2"),
        ],
        vec![header("Content-Length", b"0")],
        vec![
            header("Content-Length", b"5"),
            header("Content-Length", b"500"),
        ],
        vec![header("Transfer-Encoding", b"gzip, chunked")],
        vec![
            header("Content-Length", b"16"),
            header("Connection", b"Content-Length"),
        ],
    ];
    let count = header_sets.len();
    for headers in header_sets {
        let id = s.id();
        let mut r = hub_request(id, "crm", "POST", "/scim/v2/Users");
        r.headers.extend(headers);
        r.headers
            .push(header("Content-Type", b"application/scim+json"));
        r.body = body.clone();
        let response = s.forward(r).await.expect("forwarded");
        assert_eq!(response.status, 200);
    }
    let requests = s.crm.requests();
    assert_eq!(
        requests.len(),
        count,
        "one request at the target per forward"
    );
    for raw in &requests {
        let (head, received) = split(raw);
        assert!(
            head.starts_with("post /scim/v2/users http/1.1\r\n"),
            "{head}"
        );
        assert!(!head.contains("transfer-encoding"), "{head}");
        assert_eq!(head.matches("\r\ncontent-length:").count(), 1, "{head}");
        assert!(
            head.contains(&format!("\r\ncontent-length: {}\r\n", body.len())),
            "{head}"
        );
        assert_eq!(received, body, "the body arrived whole, as one body");
    }
    assert_eq!(s.dialed().2, 0);
}

#[tokio::test]
async fn undeclared_empty_and_address_like_target_names_dial_nothing() {
    let mut s = scene().await;
    let crm_addr = s.crm.addr.to_string();
    let evil_addr = s.evil.addr.to_string();
    let names = [
        "",
        "nope",
        "CRM",
        "crm ",
        " crm",
        "crm:80",
        crm_addr.as_str(),
        evil_addr.as_str(),
        "127.0.0.1",
        "localhost",
        "crm\0",
        "target.crm",
        "[target.crm]",
        "../crm",
        "crm/wiki",
        "*",
    ];
    for name in names {
        let id = s.id();
        let request = hub_request(id, name, "GET", "/scim/v2/Users");
        match s.forward(request).await {
            Err(ForwardError::UndeclaredTarget { name: echoed }) => assert_eq!(echoed, name),
            other => panic!("target {name:?}: expected UndeclaredTarget, got {other:?}"),
        }
        assert_eq!(s.dialed(), (0, 0, 0), "target {name:?} dialed something");
    }
    s.control().await;
    assert_eq!(s.dialed(), (1, 0, 0));
}

#[tokio::test]
async fn requests_before_the_welcome_are_not_forwarded() {
    let hub = HostileHub::start().await;
    let crm = CountingListener::start().await;
    let _agent = hub.spawn_agent(SERVICE_ID, &[crm.target("crm")]);
    let mut session = hub.accept_unwelcomed(SERVICE_ID).await;
    session
        .send(&Frame::Request(hub_request(1, "crm", "GET", "/early")))
        .await;
    session
        .send(&Frame::Welcome {
            version: PROTOCOL_VERSION,
            session_id: 7,
        })
        .await;
    let response = session
        .request(hub_request(2, "crm", "GET", "/scim/v2/Users"))
        .await
        .expect("a request after the welcome is forwarded");
    assert_eq!(response.status, 200);
    let requests = crm.requests();
    assert_eq!(requests.len(), 1, "only the request after the welcome");
    assert!(requests[0].starts_with(b"GET /scim/v2/Users "));
}

#[tokio::test]
async fn frames_only_an_agent_sends_end_the_session() {
    let hub = HostileHub::start().await;
    let crm = CountingListener::start().await;
    let agent = hub.spawn_agent(SERVICE_ID, &[crm.target("crm")]);
    let impostor_frames = [
        Frame::Hello {
            version: PROTOCOL_VERSION,
            agent_name: "hub".into(),
            instance: 1,
            targets: vec![],
        },
        Frame::Targets { targets: vec![] },
        Frame::Response(ForwardResponse {
            id: 1,
            result: Err(ForwardError::ShuttingDown),
        }),
    ];
    for frame in impostor_frames {
        let mut session = hub.accept_session(SERVICE_ID).await;
        session.send(&frame).await;
        match session.ended_within(HANG_UP_WITHIN).await {
            Ended::Closed(_) => {}
            Ended::StillOpen => panic!("{frame:?} from the hub did not end the session"),
        }
    }
    assert!(
        agent.logs().contains("agent-only frame"),
        "{}",
        agent.logs()
    );
    assert_eq!(crm.connections(), 0);
}

/// Opcode byte of a final binary websocket frame.
const WS_BINARY_FINAL: u8 = 0x82;
/// Opcode byte of the first, non-final frame of a fragmented binary message.
const WS_BINARY_FIRST: u8 = 0x02;
/// Opcode byte of a final continuation frame.
const WS_CONTINUATION_FINAL: u8 = 0x80;

/// A websocket frame header (server to client, so unmasked) announcing `len` payload bytes.
fn ws_frame_header(opcode: u8, len: u64) -> Vec<u8> {
    let mut header = vec![opcode, 127];
    header.extend_from_slice(&len.to_be_bytes());
    header
}

impl Scene {
    /// Waits for the agent to hang up within `within` and to log `reason` for the `nth` time,
    /// then lets it reconnect. The log line is the proof that the agent refused (rather than,
    /// say, gave up on a silent hub).
    async fn expect_hang_up(&mut self, what: &str, within: Duration, reason: &str, nth: usize) {
        if let Ended::StillOpen = self.session.ended_within(within).await {
            panic!("{what}: the agent kept the session open\n{}", self.logs());
        }
        let agent = &self.agent;
        let logged = wait_until(&format!("`{reason}` in the agent log"), within, || {
            let seen = agent.logs().matches(reason).count() >= nth;
            async move { seen }
        })
        .await;
        if let Err(e) = logged {
            panic!("{what}: {e}\n{}", self.logs());
        }
        self.session = self.hub.accept_session(SERVICE_ID).await;
    }
}

#[tokio::test]
async fn oversized_frames_end_the_session_before_their_payload() {
    let mut s = scene().await;
    let too_long = "Message too long";

    // A websocket frame header announcing 16 MiB, then nothing: refused on the header alone
    // (the agent's dead-hub detection would take 15 s, so an early hang-up is a refusal).
    s.session
        .send_raw(&ws_frame_header(WS_BINARY_FINAL, 16 << 20))
        .await
        .unwrap();
    s.expect_hang_up("16 MiB frame header", HANG_UP_WITHIN, too_long, 1)
        .await;

    // The same with the largest length the format can carry.
    s.session
        .send_raw(&ws_frame_header(WS_BINARY_FINAL, i64::MAX as u64))
        .await
        .unwrap();
    s.expect_hang_up("2^63-1 frame header", HANG_UP_WITHIN, too_long, 2)
        .await;

    // A message in fragments, each small, together over the 65535-byte Noise maximum.
    for opcode in [WS_BINARY_FIRST, WS_CONTINUATION_FINAL] {
        let mut fragment = ws_frame_header(opcode, 40_000);
        fragment.resize(fragment.len() + 40_000, 0);
        if s.session.send_raw(&fragment).await.is_err() {
            break;
        }
    }
    s.expect_hang_up("80000-byte fragmented message", HANG_UP_WITHIN, too_long, 3)
        .await;

    // Records that keep saying "more" past the 16 MiB frame limit are tests/hostile_alloc.rs's
    // (with what the agent allocated for them), and tunnel::codec's unit tests.

    // Inside a frame: a 7-byte Goodbye whose reason claims 15 MiB.
    let mut forged = vec![8u8, 0xFC];
    forged.extend_from_slice(&(15u32 << 20).to_le_bytes());
    let records = s.session.seal_encoded(&forged);
    s.session.send_records(records).await;
    s.expect_hang_up("forged string length", HANG_UP_WITHIN, "decode limit", 1)
        .await;

    // Nothing of it reached a target, and the agent is still fine.
    assert_eq!(s.dialed(), (0, 0, 0));
    s.control().await;
}

#[tokio::test]
async fn hub_text_cannot_forge_agent_log_lines() {
    let mut s = scene().await;
    let forged = "\nFORGED-LOG-LINE level=ERROR";
    let id = s.id();
    let request = hub_request(id, &format!("nope{forged}"), "GET", "/scim/v2/Users");
    let _ = s.forward(request).await;
    let mut r = s.get("/scim/v2/Users");
    r.method = format!("GET{forged}");
    let _ = s.forward(r).await;
    let r = s.get(&format!("/scim/v2/Users{forged}"));
    let _ = s.forward(r).await;
    s.session
        .send(&Frame::Goodbye {
            reason: format!("bye{forged}"),
        })
        .await;
    let agent = &s.agent;
    wait_until(
        "the agent to log the goodbye",
        Duration::from_secs(10),
        || {
            let seen = agent.logs().contains("the hub closed the session");
            async move { seen }
        },
    )
    .await
    .unwrap();
    let logs = s.logs();
    assert!(logs.contains("\\nFORGED-LOG-LINE"), "{logs}");
    assert!(
        !logs.lines().any(|line| line.starts_with("FORGED-LOG-LINE")),
        "a hub-supplied string started a log line:\n{logs}"
    );
}

/// Handshake message 1 of NNpsk0 with an empty payload: an ephemeral key and a tag.
const FIRST_MESSAGE_LEN: usize = 32 + 16;

#[tokio::test]
async fn a_hub_with_another_service_id_learns_nothing() {
    let hub = HostileHub::start().await;
    let crm = CountingListener::start().await;
    let agent = hub.spawn_agent(SERVICE_ID, &[crm.target("crm")]);
    let psk = tunnel::service_psk(SERVICE_ID);
    for attempt in 0..2 {
        let (mut ws, lookup) = hub.accept_ws().await;
        // The only name the agent gives is the public lookup hash.
        assert_eq!(lookup, tunnel::lookup_hash(SERVICE_ID));
        let prologue = tunnel::prologue(&lookup);
        let first = next_binary(&mut ws).await.expect("handshake message 1");
        assert_eq!(
            first.len(),
            FIRST_MESSAGE_LEN,
            "message 1 carries a payload"
        );
        for secret in [SERVICE_ID.as_bytes(), &psk[..], b"crm"] {
            assert!(!first.windows(secret.len()).any(|w| w == secret));
        }
        // This hub holds another id: it cannot authenticate the agent's message...
        let mut ours = Handshake::responder(&tunnel::service_psk(OTHER_ID), &prologue);
        assert!(ours.read_message(&first).is_err());
        // ...and answers with a well-formed message 2 under its own key (attempt 0), or with
        // garbage (attempt 1), then pretends the session is up.
        let second = if attempt == 0 {
            let mut initiator = Handshake::initiator(&tunnel::service_psk(OTHER_ID), &prologue);
            let mut responder = Handshake::responder(&tunnel::service_psk(OTHER_ID), &prologue);
            responder
                .read_message(&initiator.write_message(&[]).unwrap())
                .unwrap();
            responder.write_message(&[]).unwrap()
        } else {
            vec![0x42; 48]
        };
        ws.send(Message::Binary(second.into())).await.unwrap();
        ws.send(Message::Binary(vec![1u8; 64].into()))
            .await
            .unwrap();
        // Everything the agent sends from now on: nothing but the end of the connection.
        let mut sent = Vec::new();
        let ended = tokio::time::timeout(HANG_UP_WITHIN, async {
            while let Some(Ok(message)) = ws.next().await {
                match message {
                    Message::Close(_) => break,
                    other => sent.push(other),
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "the agent kept the connection open");
        assert!(
            sent.is_empty(),
            "the agent sent {sent:?} to a hub that does not know its id"
        );
    }
    assert_eq!(crm.connections(), 0);
    let logs = agent.logs();
    assert!(
        logs.contains("the peer does not know this service's id"),
        "{logs}"
    );
    assert!(!logs.contains(SERVICE_ID), "the service id is in the log");
}

#[tokio::test]
async fn the_hub_sends_nothing_to_an_agent_with_another_service_id() {
    let crm = CountingListener::start().await;
    let deployment = deploy(DeploySpec::new(vec![], vec![crm.target("crm")])).await;
    deployment.wait_for_agent("crm").await;
    let client_tls =
        scim_connect::net::hub_client_config(Some(&deployment.path("ca.pem"))).unwrap();

    // Opens a websocket to the real hub naming the service by `lookup`.
    let open = |lookup: String| {
        let tls = client_tls.clone();
        let url = deployment.hub_url();
        let port = deployment.hub_port;
        async move {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            let name = tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let tls = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await
                .unwrap();
            let io: scim_connect::net::BoxedIo = Box::new(tls);
            let mut request = url.as_str().into_client_request().unwrap();
            request.headers_mut().insert(
                scim_connect::net::SERVICE_HEADER,
                HeaderValue::from_str(&lookup).unwrap(),
            );
            tokio_tungstenite::client_async(request, io).await
        }
    };

    // Right public name, wrong id: the hub's only answer is to close.
    let lookup = tunnel::lookup_hash(SERVICE_ID);
    let (mut ws, _) = open(lookup.clone()).await.expect("upgrade accepted");
    let prologue = tunnel::prologue(&lookup);
    let mut impostor = Handshake::initiator(&tunnel::service_psk(OTHER_ID), &prologue);
    ws.send(Message::Binary(impostor.write_message(&[]).unwrap().into()))
        .await
        .unwrap();
    let mut received = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(message)) = ws.next().await {
            match message {
                Message::Close(_) => break,
                other => received.push(other),
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the hub kept the impostor's connection open");
    assert!(
        received.is_empty(),
        "the hub sent {received:?} to an impostor"
    );

    // The same client with the right id gets a message 2 that authenticates: the capture
    // above would have seen one.
    let (mut ws, _) = open(lookup.clone()).await.expect("upgrade accepted");
    let mut genuine = Handshake::initiator(&tunnel::service_psk(SERVICE_ID), &prologue);
    ws.send(Message::Binary(genuine.write_message(&[]).unwrap().into()))
        .await
        .unwrap();
    let second = next_binary(&mut ws).await.expect("message 2");
    genuine
        .read_message(&second)
        .expect("the real hub's message 2 authenticates");
    drop(ws);

    // A name the hub does not know: a bare 403 that names no service and no target.
    match open(tunnel::lookup_hash(OTHER_ID)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403);
            let mut shown = format!("{:?}", response.headers());
            if let Some(body) = response.body() {
                shown.push_str(&String::from_utf8_lossy(body));
            }
            for name in ["onprem", "idle", "crm"] {
                assert!(!shown.contains(name), "`{name}` in the refusal: {shown}");
            }
        }
        other => panic!("expected a 403, got {:?}", other.map(|_| "an upgrade")),
    }
    assert_eq!(crm.connections(), 0, "nothing was forwarded");
}
