//! The shared integration-test harness: free loopback ports, child processes that are always
//! stopped and whose output can be shown when a test fails, condition polling instead of sleeps,
//! a tiny HTTP/1.1 client, and real SCIM servers nobody here wrote as targets: `scim2-server`
//! (PyPI) here, `scimmy` (npm) in [`peers`], both behind the [`ScimPeer`] trait.
//!
//! It must never bind or dial anything but 127.0.0.1, never leave a child running after its guard
//! is dropped, and never wait a fixed time where a condition can be polled.

// Each test crate includes this module and uses only part of it.
#![allow(dead_code)]

pub mod conformance;
pub mod deploy;
pub mod faults;
pub mod hostile;
pub mod peers;
pub mod relay;
pub mod scenarios;
pub mod tinyproxy;
pub mod tls_front;

// Not every test crate uses both.
#[allow(unused_imports)]
pub use peers::{ScimPeer, ScimmyServer};

use std::fmt::Write as _;
use std::fs::File;
use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How often [`wait_until`] re-checks its condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How long a child gets to exit after SIGTERM before it is sent SIGKILL.
pub const TERM_GRACE: Duration = Duration::from_secs(3);
/// How long [`Scim2Server::start`] waits for the server to answer.
const SCIM2_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound for one harness HTTP exchange with a local server.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// A TCP port on 127.0.0.1 that was free a moment ago: bound to port 0, read, released.
/// Another process may take it before the caller binds it; [`Scim2Server::start`] retries for that.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to find a free port");
    listener
        .local_addr()
        .expect("local address of a bound listener")
        .port()
}

/// The `connect` binary built for this test run.
pub fn connect_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_connect"))
}

/// Polls `f` every [`POLL_INTERVAL`] until it yields `true`, or fails after `timeout` with a
/// message naming `what` was awaited.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if f().await {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Waits until something accepts TCP connections on `addr`.
pub async fn wait_for_tcp(addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    wait_until(
        &format!("a TCP listener on {addr}"),
        timeout,
        || async move { TcpStream::connect(addr).await.is_ok() },
    )
    .await
}

/// A child process that is stopped (SIGTERM, then SIGKILL after [`TERM_GRACE`]) and reaped when
/// the guard is dropped. Its stdout and stderr go to files in a private temporary directory, so a
/// test can show them with [`ChildGuard::logs`]; if the guard is dropped while the test panics,
/// the logs are printed to stderr, where the test runner shows them with the failure.
pub struct ChildGuard {
    label: String,
    child: Child,
    status: Option<ExitStatus>,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    // Declared last: removed only after the child is gone.
    dir: tempfile::TempDir,
}

impl ChildGuard {
    /// Starts `cmd` (stdin closed, stdout/stderr captured) under the name `label`, which appears in
    /// logs and messages.
    pub fn spawn(label: &str, mut cmd: Command) -> std::io::Result<ChildGuard> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("scim-connect-{}-", sanitize(label)))
            .tempdir()?;
        let stdout_path = dir.path().join("stdout.log");
        let stderr_path = dir.path().join("stderr.log");
        cmd.stdin(Stdio::null())
            .stdout(File::create(&stdout_path)?)
            .stderr(File::create(&stderr_path)?);
        let child = cmd.spawn().map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("could not start {label} ({:?}): {e}", cmd.get_program()),
            )
        })?;
        Ok(ChildGuard {
            label: label.to_owned(),
            child,
            status: None,
            stdout_path,
            stderr_path,
            dir,
        })
    }

    /// The child's process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The name given at spawn time.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The private directory holding the captured output; tests may put the child's own files
    /// (configs, state) there too, and it is removed with the guard.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The exit status if the child has exited, without blocking.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Whether the child is still running.
    pub fn is_running(&mut self) -> bool {
        self.try_status().is_none()
    }

    /// Sends `signal` (e.g. `libc::SIGHUP`) to the child, unless it has already exited.
    pub fn signal(&mut self, signal: i32) {
        if self.is_running() {
            // SAFETY: kill(2) with the pid of our own unreaped child; it cannot name another
            // process because the pid is not recycled before we wait on it.
            unsafe {
                libc::kill(self.child.id() as libc::pid_t, signal);
            }
        }
    }

    /// Kills the child with SIGKILL at once and reaps it, as a crash would end it.
    pub fn kill_now(&mut self) -> ExitStatus {
        if let Some(status) = self.try_status() {
            return status;
        }
        let _ = self.child.kill();
        let status = self.child.wait().expect("wait for a killed child");
        self.status = Some(status);
        status
    }

    /// Stops the child: SIGTERM, up to [`TERM_GRACE`] to exit, then SIGKILL. Returns how it ended.
    pub fn stop(&mut self) -> ExitStatus {
        self.stop_within(TERM_GRACE)
    }

    /// Like [`ChildGuard::stop`] with a chosen grace period.
    pub fn stop_within(&mut self, grace: Duration) -> ExitStatus {
        if let Some(status) = self.try_status() {
            return status;
        }
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = self.try_status() {
                return status;
            }
            // Synchronous on purpose: Drop cannot await.
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill_now()
    }

    /// Waits for the child to exit on its own, for at most `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        let what = format!("{} to exit", self.label);
        let mut status = None;
        wait_until(&what, timeout, || {
            status = self.try_status();
            std::future::ready(status.is_some())
        })
        .await?;
        Ok(status.expect("set when the wait succeeded"))
    }

    /// What the child wrote to stdout so far.
    pub fn stdout(&self) -> String {
        read_lossy(&self.stdout_path)
    }

    /// What the child wrote to stderr so far.
    pub fn stderr(&self) -> String {
        read_lossy(&self.stderr_path)
    }

    /// What the child printed so far: stdout, then stderr, each under a header.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (stream, path) in [("stdout", &self.stdout_path), ("stderr", &self.stderr_path)] {
            let text = std::fs::read(path)
                .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
                .unwrap_or_else(|e| format!("<could not read {}: {e}>", path.display()));
            let _ = writeln!(out, "----- {} {stream} -----", self.label);
            out.push_str(&text);
            if !text.is_empty() && !text.ends_with('\n') {
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("{}", tail(&self.logs(), 200));
        }
    }
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_else(|e| format!("<could not read {}: {e}>", path.display()))
}

/// Keeps the last `lines` lines of `text`, saying how many were cut.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    if all.len() <= lines {
        return text.to_owned();
    }
    let cut = all.len() - lines;
    format!(
        "[... {cut} earlier lines cut ...]\n{}",
        all[cut..].join("\n")
    )
}

fn sanitize(label: &str) -> String {
    label
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

/// One HTTP answer as read by [`http_request`].
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code, e.g. 200.
    pub status: u16,
    /// Header names lower-cased, in the order received.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked when the server used chunked transfer encoding.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as UTF-8 text (lossy), for messages.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> Result<serde_json::Value, String> {
        serde_json::from_slice(&self.body)
            .map_err(|e| format!("body is not JSON ({e}): {}", self.text()))
    }
}

/// One HTTP/1.1 exchange over a fresh connection with `Connection: close`: the harness's own
/// minimal client, so assertions do not depend on the HTTP stack under test.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path_and_query: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Result<HttpResponse, String> {
    http_request_within(HTTP_TIMEOUT, addr, method, path_and_query, headers, body).await
}

/// [`http_request`] for an exchange that may take up to `limit` (e.g. one the server holds
/// until a long deadline of its own).
pub async fn http_request_within(
    limit: Duration,
    addr: SocketAddr,
    method: &str,
    path_and_query: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Result<HttpResponse, String> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect to {addr}: {e}"))?;
        let mut request =
            format!("{method} {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        for (name, value) in headers {
            let _ = write!(request, "{name}: {value}\r\n");
        }
        if let Some(body) = body {
            let _ = write!(request, "Content-Length: {}\r\n", body.len());
        }
        request.push_str("\r\n");
        let mut bytes = request.into_bytes();
        bytes.extend_from_slice(body.unwrap_or_default());
        stream
            .write_all(&bytes)
            .await
            .map_err(|e| format!("send {method} {path_and_query} to {addr}: {e}"))?;
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .await
            .map_err(|e| format!("read answer to {method} {path_and_query} from {addr}: {e}"))?;
        parse_response(&raw, method.eq_ignore_ascii_case("HEAD"))
            .map_err(|e| format!("answer to {method} {path_and_query} from {addr}: {e}"))
    };
    tokio::time::timeout(limit, exchange)
        .await
        .map_err(|_| format!("{method} {path_and_query} to {addr}: no answer within {limit:?}"))?
}

/// Parses one raw HTTP/1.x answer. `head_request` says the request was HEAD, whose answer has no body
/// whatever its Content-Length says (RFC 9110 §9.3.2); so do 1xx, 204 and 304 answers.
fn parse_response(raw: &[u8], head_request: bool) -> Result<HttpResponse, String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no end of headers in {:?}", String::from_utf8_lossy(raw)))?;
    // Lossy: a server may echo raw bytes of a request path in a header (scim2-server does in
    // `Location`); the harness must still read the answer.
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let rest = &raw[split + 4..];
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
    let bodiless = head_request || status < 200 || status == 204 || status == 304;
    let body = if bodiless {
        Vec::new()
    } else if chunked {
        dechunk(rest)?
    } else if let Some((_, len)) = headers.iter().find(|(n, _)| n == "content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| format!("bad Content-Length {len:?}"))?;
        rest.get(..len)
            .ok_or_else(|| {
                format!(
                    "body shorter than Content-Length {len}: {} bytes",
                    rest.len()
                )
            })?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("chunk size line not terminated")?;
        let size_field =
            std::str::from_utf8(&rest[..line_end]).map_err(|_| "chunk size not text")?;
        let size_hex = size_field.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| format!("bad chunk size {size_hex:?}"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        let chunk = rest
            .get(..size)
            .ok_or_else(|| format!("chunk of {size} bytes cut short"))?;
        body.extend_from_slice(chunk);
        rest = rest.get(size + 2..).ok_or("chunk not followed by CRLF")?;
    }
}

/// Where the harness looks for `scim2-server`: `$SCIM2_SERVER_BIN`, else the project's `.venv`.
pub fn scim2_server_bin() -> PathBuf {
    match std::env::var_os("SCIM2_SERVER_BIN") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/scim2-server"),
    }
}

/// How the harness itself talks to a SCIM server it started: its address, the path of its SCIM
/// root and its bearer token.
#[derive(Debug, Clone)]
pub struct ScimEndpoint {
    pub addr: SocketAddr,
    /// e.g. `/v2`.
    pub base_path: &'static str,
    pub bearer_token: Option<String>,
}

impl ScimEndpoint {
    /// Sends one request to `<base_path><path_and_query>` with the bearer token (if any) and a
    /// SCIM JSON body (if any). Does not check the status.
    pub async fn request(
        &self,
        method: &str,
        path_and_query: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<HttpResponse, String> {
        let path = format!("{}{path_and_query}", self.base_path);
        let auth = self
            .bearer_token
            .as_ref()
            .map(|token| format!("Bearer {token}"));
        let mut headers = vec![("Accept", "application/scim+json")];
        if let Some(auth) = &auth {
            headers.push(("Authorization", auth.as_str()));
        }
        let encoded = body.map(|b| serde_json::to_vec(b).expect("serialize a JSON value"));
        if encoded.is_some() {
            headers.push(("Content-Type", "application/scim+json"));
        }
        http_request(self.addr, method, &path, &headers, encoded.as_deref()).await
    }

    /// [`ScimEndpoint::request`], asserting the answer's `status`; returns its body as JSON.
    pub async fn expect_json(
        &self,
        method: &str,
        path_and_query: &str,
        body: Option<&serde_json::Value>,
        status: u16,
    ) -> Result<serde_json::Value, String> {
        let response = self.request(method, path_and_query, body).await?;
        let url = format!("http://{}{}{path_and_query}", self.addr, self.base_path);
        if response.status != status {
            return Err(format!(
                "{method} {url} answered {} (expected {status}): {}",
                response.status,
                response.text()
            ));
        }
        response.json().map_err(|e| format!("{method} {url}: {e}"))
    }
}

/// A running `scim2-server` (PyPI) on 127.0.0.1, in-memory and empty when started; stopped when
/// dropped.
pub struct Scim2Server {
    /// The port it listens on.
    pub port: u16,
    /// `http://127.0.0.1:<port>/v2`.
    pub base_url: String,
    bearer_token: Option<String>,
    /// Started with `--dynamic-tenants`.
    tenants: bool,
    guard: ChildGuard,
}

impl Scim2Server {
    /// Path of the SCIM root.
    pub const BASE_PATH: &'static str = "/v2";

    /// Starts a server, with `--bearer-token` when `bearer_token` is given, and waits until
    /// `GET /v2/ServiceProviderConfig` answers 200. Panics (with the server's output) when it
    /// cannot be started.
    pub async fn start(bearer_token: Option<&str>) -> Scim2Server {
        Self::start_with(bearer_token, false).await
    }

    /// Like [`Scim2Server::start`], with `--dynamic-tenants`: each first path segment is a
    /// tenant of its own (`/<tenant>/v2`, see [`Scim2Server::tenant_path`]), so applications
    /// sharing one server never see each other's resources. The `/v2` helpers below do not
    /// apply to such a server.
    pub async fn start_with_tenants(bearer_token: Option<&str>) -> Scim2Server {
        Self::start_with(bearer_token, true).await
    }

    /// The SCIM root path of `tenant` on a server started with tenants: `/<tenant>/v2`.
    pub fn tenant_path(tenant: &str) -> String {
        format!("/{tenant}/v2")
    }

    async fn start_with(bearer_token: Option<&str>, tenants: bool) -> Scim2Server {
        let (port, guard) =
            start_on_free_port("scim2-server", |port| launch(port, bearer_token, tenants))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        Scim2Server {
            port,
            base_url: format!("http://127.0.0.1:{port}{}", Self::BASE_PATH),
            bearer_token: bearer_token.map(str::to_owned),
            tenants,
            guard,
        }
    }

    /// Stops the server and starts a fresh one on the same port with the same token: all
    /// resources are gone afterwards, as after a crash of a real in-memory target.
    pub async fn restart(&mut self) {
        self.guard.stop();
        let token = self.bearer_token.clone();
        self.guard = launch(self.port, token.as_deref(), self.tenants)
            .await
            .unwrap_or_else(|failure| panic!("scim2-server did not restart: {failure}"));
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The server process, e.g. to kill it outright.
    pub fn guard(&mut self) -> &mut ChildGuard {
        &mut self.guard
    }

    /// What the server printed so far (its request log is on stderr).
    pub fn logs(&self) -> String {
        self.guard.logs()
    }

    /// The harness's own way in.
    pub fn endpoint(&self) -> ScimEndpoint {
        ScimEndpoint {
            addr: self.addr(),
            base_path: Self::BASE_PATH,
            bearer_token: self.bearer_token.clone(),
        }
    }

    /// Sends one request to `/v2<path_and_query>` with the server's bearer token (if any) and a
    /// SCIM JSON body (if any). Does not check the status.
    pub async fn request(
        &self,
        method: &str,
        path_and_query: &str,
        body: Option<&serde_json::Value>,
    ) -> HttpResponse {
        self.endpoint()
            .request(method, path_and_query, body)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()))
    }

    /// `GET /v2<path_and_query>` (e.g. `"/Users?count=1000"`), asserting 200, parsed as JSON.
    pub async fn get_json(&self, path_and_query: &str) -> serde_json::Value {
        self.endpoint()
            .expect_json("GET", path_and_query, None, 200)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Every User the server holds (asserting they fit one page of 1000).
    pub async fn users(&self) -> Vec<serde_json::Value> {
        let list = self.get_json("/Users?count=1000").await;
        assert!(
            list["totalResults"].as_u64().unwrap_or(0) <= 1000,
            "more users than one page: {list}"
        );
        list["Resources"].as_array().cloned().unwrap_or_default()
    }

    /// Every User the server holds, page by page (1000 at a time), however many there are.
    pub async fn all_users(&self) -> Vec<serde_json::Value> {
        let mut users = Vec::new();
        loop {
            let page = self
                .get_json(&format!("/Users?startIndex={}&count=1000", users.len() + 1))
                .await;
            let resources = page["Resources"].as_array().cloned().unwrap_or_default();
            let total = page["totalResults"].as_u64().unwrap_or(0) as usize;
            if resources.is_empty() {
                break;
            }
            users.extend(resources);
            if users.len() >= total {
                break;
            }
        }
        users
    }

    /// The externalIds of every User the server holds, asserting that none is there twice (by
    /// externalId or by userName) and that each has one.
    pub async fn external_ids(&self) -> std::collections::BTreeSet<String> {
        let users = self.all_users().await;
        let ids: Vec<String> = users
            .iter()
            .map(|u| u["externalId"].as_str().expect("externalId").to_string())
            .collect();
        let unique: std::collections::BTreeSet<String> = ids.iter().cloned().collect();
        assert_eq!(unique.len(), ids.len(), "a user exists twice");
        let names: std::collections::BTreeSet<String> = users
            .iter()
            .map(|u| u["userName"].as_str().unwrap().to_lowercase())
            .collect();
        assert_eq!(names.len(), users.len(), "a userName exists twice");
        unique
    }

    /// `POST /v2<path>` with `body`, asserting 201 Created; returns the created resource.
    pub async fn post_json(&self, path: &str, body: &serde_json::Value) -> serde_json::Value {
        self.endpoint()
            .expect_json("POST", path, Some(body), 201)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

/// Tries `launch` on up to three free ports: another process may take a port between
/// [`free_port`] and the server's bind. Returns the port and the running child, or every
/// attempt's failure.
pub async fn start_on_free_port<F, Fut>(
    what: &str,
    mut launch: F,
) -> Result<(u16, ChildGuard), String>
where
    F: FnMut(u16) -> Fut,
    Fut: Future<Output = Result<ChildGuard, String>>,
{
    const ATTEMPTS: usize = 3;
    let mut failures = Vec::new();
    for _ in 0..ATTEMPTS {
        let port = free_port();
        match launch(port).await {
            Ok(guard) => return Ok((port, guard)),
            Err(failure) => failures.push(failure),
        }
    }
    Err(format!(
        "{what} did not start in {ATTEMPTS} attempts:\n{}",
        failures.join("\n")
    ))
}

/// Starts `cmd` as `label` and waits, for at most `timeout`, until `GET <ready_path>` on
/// 127.0.0.1:`port` (with `headers`) answers 200. On failure the child is stopped and its output
/// returned in the error.
pub async fn spawn_until_ready(
    label: &str,
    cmd: Command,
    port: u16,
    ready_path: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> Result<ChildGuard, String> {
    let program = cmd.get_program().to_owned();
    let mut guard = ChildGuard::spawn(label, cmd)
        .map_err(|e| format!("could not run {}: {e}", Path::new(&program).display()))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut exited = None;
    let ready = wait_until(&format!("{label} to answer"), timeout, || {
        exited = guard.try_status();
        let done = exited.is_some();
        async move {
            if done {
                return true;
            }
            matches!(
                http_request(addr, "GET", ready_path, headers, None).await,
                Ok(response) if response.status == 200
            )
        }
    })
    .await;
    match (ready, exited) {
        (Ok(()), None) => Ok(guard),
        (Ok(()), Some(status)) => Err(format!("{label} exited ({status}):\n{}", guard.logs())),
        (Err(e), _) => {
            guard.stop();
            Err(format!("{e}\n{}", guard.logs()))
        }
    }
}

/// Starts one scim2-server on `port` (with `--dynamic-tenants` when `tenants`) and waits until
/// it is ready; on failure the child is stopped and its output returned in the error.
async fn launch(
    port: u16,
    bearer_token: Option<&str>,
    tenants: bool,
) -> Result<ChildGuard, String> {
    let bin = scim2_server_bin();
    assert!(
        bin.exists(),
        "scim2-server not found at {}: run ./scripts/test.sh (it installs scim2-server into .venv)",
        bin.display()
    );
    let mut cmd = Command::new(&bin);
    cmd.args(["--hostname", "127.0.0.1", "--port", &port.to_string()]);
    if let Some(token) = bearer_token {
        cmd.args(["--bearer-token", token]);
    }
    if tenants {
        cmd.arg("--dynamic-tenants");
    }
    let ready_path = if tenants {
        format!(
            "{}/ServiceProviderConfig",
            Scim2Server::tenant_path("ready")
        )
    } else {
        "/v2/ServiceProviderConfig".to_owned()
    };
    // Python buffers stdout when it is a file; unbuffered output keeps logs() current.
    cmd.env("PYTHONUNBUFFERED", "1");
    // ServiceProviderConfig needs no token on this server.
    spawn_until_ready(
        &format!("scim2-server:{port}"),
        cmd,
        port,
        &ready_path,
        &[],
        SCIM2_READY_TIMEOUT,
    )
    .await
}

/// A tiny HTTP/1.1 target on 127.0.0.1 whose answers to paths containing `/slow` wait until
/// [`GatedServer::open`] is called; every other request is answered at once. Each answer is a
/// small JSON body, then the connection is closed. Runs on the test's runtime (use a
/// multi-threaded one when the test also blocks on child processes).
pub struct GatedServer {
    pub addr: SocketAddr,
    gate: tokio::sync::watch::Sender<bool>,
    waiting: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    seen: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    accept: tokio::task::JoinHandle<()>,
}

impl GatedServer {
    pub async fn start() -> GatedServer {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let (gate, open) = tokio::sync::watch::channel(false);
        let waiting = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (w, s) = (waiting.clone(), seen.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut open = open.clone();
                let (waiting, seen) = (w.clone(), s.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match stream.read(&mut byte).await {
                            Ok(1) => head.push(byte[0]),
                            _ => return,
                        }
                    }
                    seen.fetch_add(1, Ordering::SeqCst);
                    let head = String::from_utf8_lossy(&head).into_owned();
                    let path = head.split(' ').nth(1).unwrap_or_default().to_owned();
                    if path.contains("/slow") {
                        waiting.fetch_add(1, Ordering::SeqCst);
                        let _ = open.wait_for(|open| *open).await;
                        waiting.fetch_sub(1, Ordering::SeqCst);
                    }
                    let body = format!("{{\"path\":{path:?}}}");
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(answer.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        GatedServer {
            addr,
            gate,
            waiting,
            seen,
            accept,
        }
    }

    /// Requests to `/slow` paths currently held.
    pub fn waiting(&self) -> usize {
        self.waiting.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Requests received so far.
    pub fn seen(&self) -> usize {
        self.seen.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Lets every held and future `/slow` request be answered.
    pub fn open(&self) {
        let _ = self.gate.send(true);
    }
}

impl Drop for GatedServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}
