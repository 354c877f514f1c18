//! Misbehaving targets behind the real agent and hub (`connect run` and `connect hub` as
//! processes): targets written here on tokio listeners that answer after the timeout, accept and
//! never answer, close in the middle of a body, stream a chunked body that never ends (slowly, or
//! fast past the size limit), declare a body larger than the limit, or trickle their answer one
//! byte a second. Each request must fail with its typed `ForwardError` as the hub sees it (the
//! admin API's pass-through carries it in `forward_error`, a sync's Last Sync names it), within
//! a bound; the per-target concurrency bound and the agent's memory must hold under many of them
//! at once, and the tunnel must stay the same session throughout.

mod common;

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::deploy::{deploy, App, DeploySpec, Deployment, Target, ADMIN_TOKEN};
use common::{http_request_within, wait_until, HttpResponse};
use scim_connect::messages::agent::{DialerLimits, MAX_RESPONSE_BODY_BYTES};
use scim_connect::messages::ForwardError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Every app's `request_timeout`: the agent's deadline for one request.
const TIMEOUT: Duration = Duration::from_secs(2);
/// How late after the deadline a timed-out request may be answered at the admin API.
const TIMEOUT_SLACK: Duration = Duration::from_millis(1500);

/// How a hostile target treats each request it reads.
#[derive(Debug, Clone, Copy)]
enum Behaviour {
    /// A well-behaved SCIM answer, at once.
    Fine,
    /// A well-behaved answer, but only after this long (unless the client leaves first).
    AnswerAfter(Duration),
    /// Accept, read the request, never answer; hold the connection until the client closes it.
    Silent,
    /// Declare `Content-Length: 1000`, send 100 bytes, close.
    CloseMidBody,
    /// A chunked body of 1 KiB every 100 ms, forever.
    EndlessTrickle,
    /// A chunked body of 256 KiB chunks as fast as the client reads, forever.
    EndlessFlood,
    /// Declare this many bytes and send them all.
    Declared(usize),
    /// A valid answer written one byte per second.
    SlowLoris,
}

/// A target listening on 127.0.0.1 that counts its connections: accepted in all, open now, and
/// the most open at once. "Open" is what the kernel says (a socket whose peer has closed it
/// counts as closed at once, before this side got round to reading the end), so the count
/// never lags behind the agent.
struct Hostile {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    sockets: Arc<Mutex<Vec<RawFd>>>,
    max_open: Arc<AtomicUsize>,
}

/// True when the peer of socket `fd` has closed it (or reset it).
fn peer_closed(fd: RawFd) -> bool {
    let mut byte = 0u8;
    // SAFETY: `fd` is an open socket owned by a live `Tracked`, and the buffer is one byte we
    // own; MSG_PEEK leaves the data where it is.
    let n = unsafe {
        libc::recv(
            fd,
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => true,
        n if n > 0 => false,
        _ => {
            let e = std::io::Error::last_os_error();
            e.kind() != std::io::ErrorKind::WouldBlock
        }
    }
}

fn open_now(sockets: &[RawFd]) -> usize {
    sockets.iter().filter(|fd| !peer_closed(**fd)).count()
}

/// An accepted connection, listed as open until dropped. The listing goes first, then the
/// socket, so a reused descriptor number is never listed twice.
struct Tracked {
    stream: TcpStream,
    sockets: Arc<Mutex<Vec<RawFd>>>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let fd = self.stream.as_raw_fd();
        self.sockets.lock().unwrap().retain(|s| *s != fd);
    }
}

impl Hostile {
    async fn start(behaviour: Behaviour) -> Hostile {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let sockets: Arc<Mutex<Vec<RawFd>>> = Arc::default();
        let max_open = Arc::new(AtomicUsize::new(0));
        let (a, s, m) = (accepted.clone(), sockets.clone(), max_open.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let _ = stream.set_nodelay(true);
                {
                    let mut list = s.lock().unwrap();
                    list.push(stream.as_raw_fd());
                    m.fetch_max(open_now(&list), Ordering::SeqCst);
                }
                let mut tracked = Tracked {
                    stream,
                    sockets: s.clone(),
                };
                tokio::spawn(async move { serve(&mut tracked.stream, behaviour).await });
            }
        });
        Hostile {
            addr,
            accepted,
            sockets,
            max_open,
        }
    }

    fn open(&self) -> usize {
        open_now(&self.sockets.lock().unwrap())
    }

    fn max_open(&self) -> usize {
        self.max_open.load(Ordering::SeqCst)
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

const FINE_BODY: &[u8] = br#"{"schemas":["urn:ietf:params:scim:api:messages:2.0:ListResponse"],"totalResults":0,"Resources":[]}"#;

fn fine_answer() -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/scim+json\r\nContent-Length: {}\r\n\r\n",
        FINE_BODY.len()
    )
    .into_bytes();
    out.extend_from_slice(FINE_BODY);
    out
}

/// Reads one request head (the agent's requests here carry no body); `None` when the client
/// closed first.
async fn read_head(stream: &mut TcpStream) -> Option<()> {
    let mut seen = Vec::new();
    let mut chunk = [0u8; 4096];
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => seen.extend_from_slice(&chunk[..n]),
        }
    }
    Some(())
}

/// Waits until the client closes the connection.
async fn until_closed(stream: &mut TcpStream) {
    let mut chunk = [0u8; 4096];
    while let Ok(n) = stream.read(&mut chunk).await {
        if n == 0 {
            break;
        }
    }
}

async fn serve(stream: &mut TcpStream, behaviour: Behaviour) {
    if read_head(stream).await.is_none() {
        return;
    }
    // Only the well-behaved target keeps its connection alive for further requests; every
    // hostile answer makes the agent drop the connection anyway.
    match behaviour {
        Behaviour::Fine => loop {
            if stream.write_all(&fine_answer()).await.is_err() || read_head(stream).await.is_none()
            {
                return;
            }
        },
        Behaviour::AnswerAfter(delay) => {
            let (mut read, mut write) = stream.split();
            let mut chunk = [0u8; 64];
            tokio::select! {
                _ = tokio::time::sleep(delay) => {
                    let _ = write.write_all(&fine_answer()).await;
                }
                // The client gave up first: nothing is left to answer.
                _ = read.read(&mut chunk) => {}
            }
        }
        Behaviour::Silent => until_closed(stream).await,
        Behaviour::CloseMidBody => {
            let mut out =
                b"HTTP/1.1 200 OK\r\nContent-Type: application/scim+json\r\nContent-Length: 1000\r\n\r\n"
                    .to_vec();
            out.extend_from_slice(&[b'{'; 100]);
            let _ = stream.write_all(&out).await;
            let _ = stream.shutdown().await;
        }
        Behaviour::EndlessTrickle => {
            let head = b"HTTP/1.1 200 OK\r\nContent-Type: application/scim+json\r\nTransfer-Encoding: chunked\r\n\r\n";
            if stream.write_all(head).await.is_err() {
                return;
            }
            let mut chunk = b"400\r\n".to_vec();
            chunk.extend_from_slice(&[b' '; 1024]);
            chunk.extend_from_slice(b"\r\n");
            while stream.write_all(&chunk).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Behaviour::EndlessFlood => {
            let head = b"HTTP/1.1 200 OK\r\nContent-Type: application/scim+json\r\nTransfer-Encoding: chunked\r\n\r\n";
            if stream.write_all(head).await.is_err() {
                return;
            }
            let mut chunk = b"40000\r\n".to_vec();
            chunk.extend_from_slice(&[b' '; 256 * 1024]);
            chunk.extend_from_slice(b"\r\n");
            while stream.write_all(&chunk).await.is_ok() {}
        }
        Behaviour::Declared(len) => {
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/scim+json\r\nContent-Length: {len}\r\n\r\n"
            );
            if stream.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let piece = vec![b' '; 1024 * 1024];
            let mut left = len;
            while left > 0 {
                let n = left.min(piece.len());
                if stream.write_all(&piece[..n]).await.is_err() {
                    return;
                }
                left -= n;
            }
            until_closed(stream).await;
        }
        Behaviour::SlowLoris => {
            for byte in fine_answer() {
                if stream.write_all(&[byte]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// An app called `name` whose target `name` is `addr`, with `request_timeout`; scheduled runs
/// are far away.
fn app(name: &str, addr: SocketAddr, timeout: Duration) -> (App, Target) {
    let base = format!("http://{name}.internal.example:{}/v2", addr.port());
    (
        App::new(name, &base, name)
            .with(&format!("request_timeout = \"{}s\"", timeout.as_secs()))
            .with("interval = \"7d\""),
        Target::new(name, addr.to_string()),
    )
}

/// A hub and an agent whose targets are `targets`, one app each, every app with `timeout`.
async fn deploy_targets(targets: &[(&str, &Hostile)], timeout: Duration) -> Deployment {
    let (apps, targets): (Vec<App>, Vec<Target>) = targets
        .iter()
        .map(|(name, t)| app(name, t.addr, timeout))
        .unzip();
    let names: Vec<String> = targets.iter().map(|t| t.name.clone()).collect();
    let deployment = deploy(DeploySpec::new(apps, targets)).await;
    for name in names {
        deployment.wait_for_agent(&name).await;
    }
    deployment
}

/// The one session of service `onprem`, as `GET /api/services` lists it.
async fn session_id(d: &Deployment) -> u64 {
    let resp = d.admin("GET", "/api/services", None).await;
    let services = resp.json().unwrap();
    let ids: Vec<u64> = services
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["name"] == "onprem")
        .flat_map(|s| s["agents"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a["session_id"].as_u64())
        .collect();
    assert_eq!(ids.len(), 1, "one agent session expected: {services}");
    ids[0]
}

/// One GET through the pass-through of `app`, timed; the hub answers within the app's
/// `request_timeout` (at most [`MEMORY_TIMEOUT`] here) plus its slack.
async fn get_through(admin: SocketAddr, app: &str) -> (Result<HttpResponse, String>, Duration) {
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let started = Instant::now();
    let answer = http_request_within(
        MEMORY_TIMEOUT + Duration::from_secs(5),
        admin,
        "GET",
        &format!("/api/apps/{app}/scim/Users?startIndex=1&count=100"),
        &[("Authorization", &auth)],
        None,
    )
    .await;
    (answer, started.elapsed())
}

/// The agent's typed reason in a pass-through answer (a 502 with `forward_error`).
fn forward_error(app: &str, answer: &Result<HttpResponse, String>, d: &Deployment) -> ForwardError {
    let answer = answer
        .as_ref()
        .unwrap_or_else(|e| panic!("{app}: no answer from the admin API: {e}\n{}", d.logs()));
    assert_eq!(answer.status, 502, "{app}: {}", answer.text());
    let body = answer.json().unwrap();
    serde_json::from_value(body["forward_error"].clone()).unwrap_or_else(|e| {
        panic!(
            "{app}: no typed forward_error ({e}) in {body}\n{}",
            d.logs()
        )
    })
}

/// `VmRSS` or `VmHWM` (peak) of process `pid`, in bytes.
fn memory_of(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    let kib: u64 = line
        .trim_start_matches(field)
        .trim_start_matches(':')
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kib * 1024
}

#[tokio::test]
async fn each_hostile_target_fails_with_its_typed_error_in_bounded_time() {
    let fine = Hostile::start(Behaviour::Fine).await;
    let late = Hostile::start(Behaviour::AnswerAfter(TIMEOUT + Duration::from_secs(2))).await;
    let silent = Hostile::start(Behaviour::Silent).await;
    let cut = Hostile::start(Behaviour::CloseMidBody).await;
    let trickle = Hostile::start(Behaviour::EndlessTrickle).await;
    let flood = Hostile::start(Behaviour::EndlessFlood).await;
    // Over the frame-sized limit, under the 32 MiB the agent once accepted: such an answer
    // used to be read whole and then close the tunnel, since no frame could carry it.
    let huge = Hostile::start(Behaviour::Declared(20 * 1024 * 1024)).await;
    let loris = Hostile::start(Behaviour::SlowLoris).await;
    let d = deploy_targets(
        &[
            ("fine", &fine),
            ("late", &late),
            ("silent", &silent),
            ("cut", &cut),
            ("trickle", &trickle),
            ("flood", &flood),
            ("huge", &huge),
            ("loris", &loris),
        ],
        TIMEOUT,
    )
    .await;
    let session = session_id(&d).await;
    let admin = d.admin_addr();
    let timeout_ms = TIMEOUT.as_millis() as u32;
    let limit = MAX_RESPONSE_BODY_BYTES as u64;

    let (answer, took) = get_through(admin, "fine").await;
    let answer = answer.unwrap();
    assert_eq!(answer.status, 200, "{}\n{}", answer.text(), d.logs());
    eprintln!("fine: 200 in {took:?}");

    // (app, target, expected error, answered no earlier than, no later than)
    let timed_out = |t: &Hostile| ForwardError::ResponseTimeout {
        addr: t.addr.to_string(),
        timeout_ms,
    };
    let cases: Vec<(&str, &Hostile, ForwardError, Duration, Duration)> = vec![
        (
            "late",
            &late,
            timed_out(&late),
            TIMEOUT,
            TIMEOUT + TIMEOUT_SLACK,
        ),
        (
            "silent",
            &silent,
            timed_out(&silent),
            TIMEOUT,
            TIMEOUT + TIMEOUT_SLACK,
        ),
        (
            "trickle",
            &trickle,
            timed_out(&trickle),
            TIMEOUT,
            TIMEOUT + TIMEOUT_SLACK,
        ),
        (
            "loris",
            &loris,
            timed_out(&loris),
            TIMEOUT,
            TIMEOUT + TIMEOUT_SLACK,
        ),
        (
            "huge",
            &huge,
            ForwardError::TooLarge {
                addr: huge.addr.to_string(),
                limit,
            },
            Duration::ZERO,
            TIMEOUT,
        ),
        (
            "flood",
            &flood,
            ForwardError::TooLarge {
                addr: flood.addr.to_string(),
                limit,
            },
            Duration::ZERO,
            TIMEOUT,
        ),
    ];
    for (app, target, want, at_least, at_most) in &cases {
        let (answer, took) = get_through(admin, app).await;
        let got = forward_error(app, &answer, &d);
        eprintln!("{app}: {got:?} in {took:?}");
        assert_eq!(&got, want, "{app}\n{}", d.logs());
        assert!(
            took >= *at_least && took <= *at_most,
            "{app}: answered after {took:?}, expected {at_least:?} ..= {at_most:?}"
        );
        // The agent let go of the hostile connection; it keeps nothing open toward it.
        wait_until(
            &format!("{app}: the agent to close its connection"),
            Duration::from_secs(5),
            || async { target.open() == 0 },
        )
        .await
        .unwrap();
        assert_eq!(
            session_id(&d).await,
            session,
            "{app}: the tunnel was replaced\n{}",
            d.logs()
        );
    }

    // Cut mid-body: a network error that says the body was interrupted.
    let (answer, took) = get_through(admin, "cut").await;
    let got = forward_error("cut", &answer, &d);
    eprintln!("cut: {got:?} in {took:?}");
    match &got {
        ForwardError::Network { addr, detail } => {
            assert_eq!(addr, &cut.addr.to_string());
            assert!(detail.contains("response body interrupted"), "{detail}");
        }
        other => panic!("cut: {other:?}"),
    }
    assert!(took < TIMEOUT, "cut: {took:?}");

    // A sync against a hostile target names the cause in its Last Sync message.
    let outcome = d.force_sync("huge").await;
    assert_eq!(outcome["ok"], false, "{outcome}");
    let message = outcome["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("response too large") && message.contains(&limit.to_string()),
        "{message}"
    );
    let last = d.app_status("huge").await;
    assert_eq!(last["last_sync"]["message"], outcome["message"], "{last}");

    // The same tunnel still carries good requests.
    assert_eq!(session_id(&d).await, session, "{}", d.logs());
    let (answer, _) = get_through(admin, "fine").await;
    assert_eq!(answer.unwrap().status, 200);
    let status = d.status_json().expect("the agent answers connect status");
    assert_eq!(status["session"]["connected"], true, "{status}");
}

/// Many more requests than the per-target bound to a target that never answers: the agent never
/// has more than `max_in_flight` connections open toward it, every request still fails with a
/// response timeout in bounded time, and the tunnel stays up.
#[tokio::test]
async fn concurrent_hostile_requests_never_exceed_the_per_target_bound() {
    let bound = DialerLimits::default().max_in_flight;
    let requests = bound + 36;
    let silent = Hostile::start(Behaviour::Silent).await;
    let d = deploy_targets(&[("silent", &silent)], TIMEOUT).await;
    let session = session_id(&d).await;
    let admin = d.admin_addr();

    let started = Instant::now();
    let calls: Vec<_> = (0..requests)
        .map(|_| tokio::spawn(async move { get_through(admin, "silent").await }))
        .collect();
    let mut slowest = Duration::ZERO;
    for call in calls {
        let (answer, took) = call.await.unwrap();
        let got = forward_error("silent", &answer, &d);
        assert!(
            matches!(got, ForwardError::ResponseTimeout { timeout_ms, .. } if timeout_ms == TIMEOUT.as_millis() as u32),
            "{got:?}"
        );
        slowest = slowest.max(took);
    }
    let all = started.elapsed();
    eprintln!(
        "{requests} requests: all answered in {all:?} (slowest {slowest:?}); target saw {} connections, at most {} open at once",
        silent.accepted(),
        silent.max_open()
    );
    assert!(all <= TIMEOUT + TIMEOUT_SLACK, "{all:?}");
    assert_eq!(silent.max_open(), bound, "the per-target bound is {bound}");
    wait_until(
        "the agent to close every connection",
        Duration::from_secs(5),
        || async { silent.open() == 0 },
    )
    .await
    .unwrap();
    assert_eq!(session_id(&d).await, session, "{}", d.logs());
}

/// Peak resident memory allowed to the agent while it refuses 64 endless bodies at once. The
/// bodies being read are bounded by 64 × 1 MiB unreserved plus 4 large-body slots × 15 MiB
/// (124 MiB); reading them all to the limit at once would take 64 × 15 MiB (960 MiB).
const AGENT_PEAK_BOUND: u64 = 320 * 1024 * 1024;
/// Time for the 64 refusals: each is read to the 15 MiB limit, a few at a time (about 4 s here
/// for all of them; the margin is for a loaded machine).
const MEMORY_TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn agent_memory_stays_bounded_while_64_oversized_bodies_are_refused() {
    let flood = Hostile::start(Behaviour::EndlessFlood).await;
    let fine = Hostile::start(Behaviour::Fine).await;
    let d = deploy_targets(&[("flood", &flood), ("fine", &fine)], MEMORY_TIMEOUT).await;
    let session = session_id(&d).await;
    let admin = d.admin_addr();
    let pid = d.agent.as_ref().unwrap().id();
    let before = memory_of(pid, "VmRSS");

    let started = Instant::now();
    let calls: Vec<_> = (0..64)
        .map(|_| tokio::spawn(async move { get_through(admin, "flood").await }))
        .collect();
    let mut errors = Vec::new();
    for call in calls {
        let (answer, _) = call.await.unwrap();
        errors.push(forward_error("flood", &answer, &d));
    }
    let took = started.elapsed();
    let peak = memory_of(pid, "VmHWM");
    let after = memory_of(pid, "VmRSS");
    let mib = |b: u64| b / (1024 * 1024);
    eprintln!(
        "64 oversized bodies answered in {took:?}; agent RSS before {} MiB, peak {} MiB, after {} MiB",
        mib(before),
        mib(peak),
        mib(after)
    );
    assert!(
        peak < AGENT_PEAK_BOUND,
        "agent peak RSS {} MiB over the {} MiB bound",
        mib(peak),
        mib(AGENT_PEAK_BOUND)
    );
    let too_large = ForwardError::TooLarge {
        addr: flood.addr.to_string(),
        limit: MAX_RESPONSE_BODY_BYTES as u64,
    };
    for got in errors {
        assert_eq!(got, too_large);
    }
    assert_eq!(session_id(&d).await, session, "{}", d.logs());
    let (answer, _) = get_through(admin, "fine").await;
    assert_eq!(answer.unwrap().status, 200);
}
