//! A fault-injecting HTTP layer of our own, put between the agent and a real SCIM server: it
//! passes requests through unchanged, except those a [`Rule`] picks, which get a [`Fault`]
//! instead — an answer of its own (429 with `Retry-After`, 503, 403 with a SCIM error body), a
//! dropped connection before or after the request reached the server, a delay, no answer at
//! all, a response cut in the middle, an oversized body.
//!
//! Rules are matched per method, path and query, in the order they were added, and each can be
//! limited to its first N matches; they can be changed while a deployment runs. Every request
//! is logged (what it was, when, which fault it met, whether it reached the server), and the
//! number of requests in flight is tracked, so tests can assert on retries, waits and
//! concurrency from the outside. The proxy runs on its own thread and runtime, so a test may
//! block (e.g. on `connect sync`) while it serves. It listens on 127.0.0.1 only, and handles
//! one request per connection (`Connection: close` both ways), which HTTP/1.1 clients and
//! pools must cope with anyway.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Longest request head the proxy reads.
const MAX_HEAD: usize = 64 * 1024;
/// Upper bound for one exchange with the upstream server.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(60);

/// What happens to a request a rule picks.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer this instead of the server; the request never reaches it.
    Answer {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// Close the connection without an answer; the request never reaches the server.
    Drop,
    /// Pass the request to the server, then close without passing its answer back: the
    /// request landed, but the client cannot know.
    DropAfterForward,
    /// Wait this long, then pass the request through.
    Delay(Duration),
    /// Keep the connection open and never answer (until the proxy stops).
    NeverAnswer,
    /// Pass the request through and send back only the first half of the server's answer,
    /// then close.
    CloseMidResponse,
    /// Answer 200 with a JSON-looking body of this many bytes; the request never reaches the
    /// server.
    Oversized { bytes: usize },
}

impl Fault {
    /// A bare status answer.
    pub fn status(status: u16) -> Fault {
        Fault::Answer {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// `status` (429 or 503) with `Retry-After: value` (seconds or an HTTP date).
    pub fn retry_after(status: u16, value: &str) -> Fault {
        Fault::Answer {
            status,
            headers: vec![("Retry-After".into(), value.into())],
            body: Vec::new(),
        }
    }

    /// A SCIM error answer (RFC 7644 §3.12) with optional `scimType` and a `detail`.
    pub fn scim_error(status: u16, scim_type: Option<&str>, detail: &str) -> Fault {
        let mut body = serde_json::json!({
            "schemas": ["urn:ietf:params:scim:api:messages:2.0:Error"],
            "status": status.to_string(),
            "detail": detail,
        });
        if let Some(t) = scim_type {
            body["scimType"] = serde_json::json!(t);
        }
        Fault::Answer {
            status,
            headers: vec![("Content-Type".into(), "application/scim+json".into())],
            body: serde_json::to_vec(&body).unwrap(),
        }
    }

    fn name(&self) -> String {
        match self {
            Fault::Answer { status, .. } => format!("answer {status}"),
            Fault::Drop => "drop".into(),
            Fault::DropAfterForward => "drop after forward".into(),
            Fault::Delay(d) => format!("delay {d:?}"),
            Fault::NeverAnswer => "never answer".into(),
            Fault::CloseMidResponse => "close mid-response".into(),
            Fault::Oversized { bytes } => format!("oversized {bytes} bytes"),
        }
    }
}

/// Which requests get a fault.
#[derive(Debug, Clone)]
pub struct Rule {
    method: Option<String>,
    path: Option<String>,
    query: Option<String>,
    /// Matches left; `None` for every match.
    times: Option<usize>,
    fault: Fault,
}

impl Rule {
    /// Every request gets `fault`; narrow it with the builder methods.
    pub fn new(fault: Fault) -> Rule {
        Rule {
            method: None,
            path: None,
            query: None,
            times: None,
            fault,
        }
    }

    /// Only requests with this method (case-insensitive).
    pub fn method(mut self, method: &str) -> Rule {
        self.method = Some(method.to_ascii_uppercase());
        self
    }

    /// Only requests whose path (without query) contains `part`, e.g. `/Users`.
    pub fn path(mut self, part: &str) -> Rule {
        self.path = Some(part.into());
        self
    }

    /// Only requests whose query contains `part`, e.g. `startIndex=` for list pages or
    /// `filter=` for lookups.
    pub fn query(mut self, part: &str) -> Rule {
        self.query = Some(part.into());
        self
    }

    /// Only the first `n` matching requests.
    pub fn times(mut self, n: usize) -> Rule {
        self.times = Some(n);
        self
    }

    fn matches(&self, method: &str, path: &str, query: &str) -> bool {
        self.times != Some(0)
            && self.method.as_deref().is_none_or(|m| m == method)
            && self.path.as_deref().is_none_or(|p| path.contains(p))
            && self.query.as_deref().is_none_or(|q| query.contains(q))
    }
}

/// One request the proxy saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// Path and query as sent.
    pub target: String,
    /// When its head had been read.
    pub at: Instant,
    /// The fault it met, if any.
    pub fault: Option<String>,
    /// Whether it was passed to the server.
    pub forwarded: bool,
    /// The request body, to tell a retry of one request from another request.
    pub body: Vec<u8>,
}

impl Seen {
    /// Path without the query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or_default()
    }
}

#[derive(Default)]
struct State {
    rules: Vec<Rule>,
    log: Vec<Seen>,
    in_flight: usize,
    max_in_flight: usize,
}

/// The running proxy; stopped (every connection closed) when dropped.
pub struct FaultProxy {
    /// Where it listens (127.0.0.1).
    pub addr: SocketAddr,
    upstream: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts a proxy in front of `upstream` (e.g. a [`super::Scim2Server`]'s address), without
    /// rules: everything passes through.
    pub fn start(upstream: SocketAddr) -> FaultProxy {
        let state = Arc::new(Mutex::new(State::default()));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let shared = state.clone();
        let thread = std::thread::Builder::new()
            .name("fault-proxy".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("fault proxy runtime");
                // Leaving block_on drops the runtime and with it every connection task.
                runtime.block_on(async move {
                    let listener = TcpListener::bind("127.0.0.1:0")
                        .await
                        .expect("bind the fault proxy on 127.0.0.1");
                    addr_tx.send(listener.local_addr().unwrap()).unwrap();
                    let accept = async {
                        loop {
                            let Ok((conn, _)) = listener.accept().await else {
                                continue;
                            };
                            let _ = conn.set_nodelay(true);
                            tokio::spawn(serve(conn, upstream, shared.clone()));
                        }
                    };
                    tokio::select! {
                        _ = accept => {}
                        _ = stop_rx => {}
                    }
                });
            })
            .expect("start the fault proxy thread");
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("fault proxy address");
        FaultProxy {
            addr,
            upstream,
            state,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// The server behind the proxy.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a rule after the existing ones.
    pub fn add(&self, rule: Rule) {
        self.lock().rules.push(rule);
    }

    /// Removes every rule: everything passes through again.
    pub fn clear(&self) {
        self.lock().rules.clear();
    }

    /// Every request seen so far, in arrival order.
    pub fn log(&self) -> Vec<Seen> {
        self.lock().log.clone()
    }

    /// Forgets the log and the in-flight high-water mark.
    pub fn reset_log(&self) {
        let mut state = self.lock();
        state.log.clear();
        state.max_in_flight = state.in_flight;
    }

    /// Requests seen with `method` whose path contains `path`.
    pub fn seen(&self, method: &str, path: &str) -> Vec<Seen> {
        self.log()
            .into_iter()
            .filter(|s| s.method.eq_ignore_ascii_case(method) && s.path().contains(path))
            .collect()
    }

    /// How many requests with `method` and a path containing `path` reached the server.
    pub fn forwarded(&self, method: &str, path: &str) -> usize {
        self.seen(method, path)
            .iter()
            .filter(|s| s.forwarded)
            .count()
    }

    /// The most requests the proxy had in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.lock().max_in_flight
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One parsed request: method, target, headers and body, and the bytes to send upstream.
struct Request {
    method: String,
    target: String,
    body: Vec<u8>,
    upstream_bytes: Vec<u8>,
}

/// Decrements the in-flight count however the exchange ends.
struct InFlight(Arc<Mutex<State>>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut state = self.0.lock().unwrap_or_else(|p| p.into_inner());
        state.in_flight = state.in_flight.saturating_sub(1);
    }
}

async fn serve(mut conn: TcpStream, upstream: SocketAddr, state: Arc<Mutex<State>>) {
    let Ok(Some(request)) = read_request(&mut conn).await else {
        return;
    };
    let (path, query) = request
        .target
        .split_once('?')
        .unwrap_or((request.target.as_str(), ""));
    let fault = {
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        let fault = s
            .rules
            .iter_mut()
            .find(|r| r.matches(&request.method, path, query))
            .map(|r| {
                if let Some(n) = r.times.as_mut() {
                    *n -= 1;
                }
                r.fault.clone()
            });
        let forwarded = !matches!(
            fault,
            Some(Fault::Answer { .. } | Fault::Drop | Fault::Oversized { .. })
        );
        s.log.push(Seen {
            method: request.method.clone(),
            target: request.target.clone(),
            at: Instant::now(),
            fault: fault.as_ref().map(Fault::name),
            forwarded,
            body: request.body.clone(),
        });
        s.in_flight += 1;
        s.max_in_flight = s.max_in_flight.max(s.in_flight);
        fault
    };
    let _in_flight = InFlight(state);
    match fault {
        None => {
            if let Some(answer) = forward(upstream, &request).await {
                let _ = conn.write_all(&answer).await;
            }
        }
        Some(Fault::Answer {
            status,
            headers,
            body,
        }) => {
            let mut head = format!(
                "HTTP/1.1 {status} {}\r\nConnection: close\r\nContent-Length: {}\r\n",
                reason(status),
                body.len()
            );
            for (name, value) in headers {
                head.push_str(&format!("{name}: {value}\r\n"));
            }
            head.push_str("\r\n");
            let _ = conn.write_all(head.as_bytes()).await;
            let _ = conn.write_all(&body).await;
        }
        Some(Fault::Drop) => {}
        Some(Fault::DropAfterForward) => {
            let _ = forward(upstream, &request).await;
        }
        Some(Fault::Delay(d)) => {
            tokio::time::sleep(d).await;
            if let Some(answer) = forward(upstream, &request).await {
                let _ = conn.write_all(&answer).await;
            }
        }
        Some(Fault::NeverAnswer) => std::future::pending::<()>().await,
        Some(Fault::CloseMidResponse) => {
            if let Some(answer) = forward(upstream, &request).await {
                let _ = conn.write_all(&answer[..answer.len() / 2]).await;
            }
        }
        Some(Fault::Oversized { bytes }) => {
            let head = format!(
                "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: application/scim+json\r\nContent-Length: {bytes}\r\n\r\n"
            );
            if conn.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let chunk = vec![b' '; 64 * 1024];
            let mut left = bytes;
            while left > 0 {
                let n = left.min(chunk.len());
                if conn.write_all(&chunk[..n]).await.is_err() {
                    return;
                }
                left -= n;
            }
        }
    }
    let _ = conn.shutdown().await;
}

/// Reads one request: its head and a `Content-Length` body. `None` when the client closed
/// before sending anything.
async fn read_request(conn: &mut TcpStream) -> std::io::Result<Option<Request>> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if raw.len() > MAX_HEAD {
            return Ok(None);
        }
        let n = conn.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap_or_default().split(' ');
    let method = request_line.next().unwrap_or_default().to_ascii_uppercase();
    let target = request_line.next().unwrap_or_default().to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = raw[head_end + 4..].to_vec();
    while body.len() < length {
        let n = conn.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        body.extend_from_slice(&buf[..n]);
    }
    body.truncate(length);

    let mut upstream = format!("{method} {target} HTTP/1.1\r\n");
    for (name, value) in &headers {
        if !["connection", "keep-alive"].contains(&name.to_ascii_lowercase().as_str()) {
            upstream.push_str(&format!("{name}: {value}\r\n"));
        }
    }
    upstream.push_str("Connection: close\r\n\r\n");
    let mut upstream_bytes = upstream.into_bytes();
    upstream_bytes.extend_from_slice(&body);
    let body = body.to_vec();
    Ok(Some(Request {
        method,
        target,
        body,
        upstream_bytes,
    }))
}

/// Sends the request to the server and returns its whole answer with `Connection: close`, or
/// `None` when the server could not be reached.
async fn forward(upstream: SocketAddr, request: &Request) -> Option<Vec<u8>> {
    let exchange = async {
        let mut server = TcpStream::connect(upstream).await.ok()?;
        let _ = server.set_nodelay(true);
        server.write_all(&request.upstream_bytes).await.ok()?;
        let mut answer = Vec::new();
        server.read_to_end(&mut answer).await.ok()?;
        Some(answer)
    };
    let answer = tokio::time::timeout(UPSTREAM_TIMEOUT, exchange)
        .await
        .ok()??;
    Some(with_connection_close(answer))
}

/// Replaces the answer's `Connection` header with `Connection: close`: the proxy closes after
/// every answer, whatever the server meant to do.
fn with_connection_close(answer: Vec<u8>) -> Vec<u8> {
    let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
        return answer;
    };
    let head = String::from_utf8_lossy(&answer[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut out = String::new();
    out.push_str(lines.next().unwrap_or_default());
    out.push_str("\r\n");
    for line in lines {
        let name = line.split(':').next().unwrap_or_default().trim();
        if !name.eq_ignore_ascii_case("connection") && !name.eq_ignore_ascii_case("keep-alive") {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    out.push_str("Connection: close\r\n\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(&answer[end + 4..]);
    bytes
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        409 => "Conflict",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Fault",
    }
}
