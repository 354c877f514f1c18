//! The SCIM servers nobody here wrote, behind one trait so that a scenario runs unchanged against
//! each: `scim2-server` (PyPI, [`Scim2Server`]) and a small express app on `scimmy` +
//! `scimmy-routers` (npm, [`ScimmyServer`], source in `tests/scimmy/`).
//!
//! The two differ on purpose in their habits (PATCH 204 vs 200 with the resource, `Location` or
//! none, HTTP/1.0 close vs keep-alive, case-insensitive vs case-exact filters, two groups of one
//! displayName stored vs refused with 409, a `remove` carrying a value refused vs applied; scimmy
//! also leaves `members` out of an empty group and echoes the `count` asked for as
//! `itemsPerPage`): a client that relies on one server's habit fails against the other. Both
//! listen on 127.0.0.1 only, on a free port, and keep their state in memory. Each one's request
//! log ([`ScimPeer::request_log`]) shows what reached it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;

use super::{
    spawn_until_ready, start_on_free_port, wait_until, ChildGuard, HttpResponse, Scim2Server,
    ScimEndpoint,
};

/// How long [`ScimmyServer::start`] waits for node to answer (it is ready in well under 1 s),
/// and [`ScimPeer::settled_request_log`] for a line of a server's log.
const SCIMMY_READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Query parameter of the marker requests of [`ScimPeer::settled_request_log`].
const LOG_MARK: &str = "scim-connect-log-mark";

/// What scenario code needs from a SCIM server it provisions into.
///
/// `async fn` in a trait is fine here: scenarios await these on the test's own runtime and never
/// need the futures to be `Send`.
#[allow(async_fn_in_trait)]
pub trait ScimPeer: Sized {
    /// A name for messages and labels.
    const KIND: &'static str;
    /// Path of the SCIM root, e.g. `/v2`.
    const BASE_PATH: &'static str;

    /// Starts an empty server that demands `Authorization: Bearer <token>` and waits until it
    /// answers. Panics, with the server's output, when it cannot be started.
    async fn start_with_token(token: &str) -> Self;

    /// The port it listens on (on 127.0.0.1).
    fn port(&self) -> u16;

    /// The harness's own way in (address, base path, token).
    fn endpoint(&self) -> ScimEndpoint;

    /// What the server printed so far.
    fn logs(&self) -> String;

    /// The request `line` of the server's log records, if it is one (servers print other lines
    /// too: startup banners, warnings).
    fn parse_log_line(line: &str) -> Option<LoggedRequest>;

    /// Every request the server has answered so far, in the order it logged them: what reached
    /// it, which the client's own report cannot show (batches, order, writes that should not
    /// have happened).
    fn request_log(&self) -> Vec<LoggedRequest> {
        self.logs()
            .lines()
            .filter_map(Self::parse_log_line)
            .collect()
    }

    /// [`ScimPeer::request_log`] once every request answered before this call is in it: a
    /// server may log an answer only after the client has read it, so a marker request is sent
    /// and awaited in the log. Marker requests are left out of the result.
    async fn settled_request_log(&self) -> Vec<LoggedRequest> {
        static MARKS: AtomicUsize = AtomicUsize::new(0);
        let query = format!(
            "/ServiceProviderConfig?{LOG_MARK}={}",
            MARKS.fetch_add(1, Ordering::Relaxed)
        );
        let answer = self.request("GET", &query, None).await;
        assert_eq!(answer.status, 200, "{}: {}", Self::KIND, answer.text());
        let mark = format!("{}{query}", Self::BASE_PATH);
        let logged = |log: &[LoggedRequest]| log.iter().position(|r| r.path == mark);
        let seen = wait_until(
            &format!("{} to log {mark}", Self::KIND),
            SCIMMY_READY_TIMEOUT,
            || async { logged(&self.request_log()).is_some() },
        )
        .await;
        if let Err(e) = seen {
            panic!("{e}\n{}", self.logs());
        }
        let mut log = self.request_log();
        log.truncate(logged(&log).unwrap_or(log.len()));
        log.retain(|r| !r.path.contains(LOG_MARK));
        log
    }

    /// `127.0.0.1:<port>`.
    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port()))
    }

    /// The base URL an application in hub.toml names for this server: `host` (one only the
    /// agent's network would know; the agent dials the target's address, never this host), the
    /// server's port and its SCIM root.
    fn app_base_url(&self, host: &str) -> String {
        format!("http://{host}:{}{}", self.port(), Self::BASE_PATH)
    }

    /// One request to `<base><path_and_query>` with the server's token; any status.
    async fn request(
        &self,
        method: &str,
        path_and_query: &str,
        body: Option<&Value>,
    ) -> HttpResponse {
        self.endpoint()
            .request(method, path_and_query, body)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", Self::KIND))
    }

    /// `GET <base><path_and_query>`, asserting 200; the body as JSON.
    async fn get_json(&self, path_and_query: &str) -> Value {
        self.endpoint()
            .expect_json("GET", path_and_query, None, 200)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", Self::KIND))
    }

    /// `POST <base><path>` with `body`, asserting 201; the created resource.
    async fn post_json(&self, path: &str, body: &Value) -> Value {
        self.endpoint()
            .expect_json("POST", path, Some(body), 201)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", Self::KIND))
    }
}

/// One request as a server's own log records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedRequest {
    pub method: String,
    /// Path and query as sent, e.g. `/v2/Groups/abc`.
    pub path: String,
    pub status: u16,
}

impl LoggedRequest {
    /// `None` unless `method` is an HTTP method a SCIM client sends and `path` is absolute.
    fn new(method: &str, path: &str, status: u16) -> Option<LoggedRequest> {
        let known = ["GET", "POST", "PUT", "PATCH", "DELETE"].contains(&method);
        (known && path.starts_with('/')).then(|| LoggedRequest {
            method: method.to_owned(),
            path: path.to_owned(),
            status,
        })
    }

    /// True for `method` on exactly `path` (no query).
    pub fn is(&self, method: &str, path: &str) -> bool {
        self.method == method && self.path == path
    }

    /// True for a request that may change something (anything but GET).
    pub fn writes(&self) -> bool {
        self.method != "GET"
    }
}

impl ScimPeer for Scim2Server {
    const KIND: &'static str = "scim2-server";
    const BASE_PATH: &'static str = Scim2Server::BASE_PATH;

    async fn start_with_token(token: &str) -> Self {
        Scim2Server::start(Some(token)).await
    }

    fn port(&self) -> u16 {
        self.port
    }

    fn endpoint(&self) -> ScimEndpoint {
        Scim2Server::endpoint(self)
    }

    fn logs(&self) -> String {
        Scim2Server::logs(self)
    }

    /// werkzeug's access log: `127.0.0.1 - - [date] "PATCH /v2/Groups/x HTTP/1.1" 204 -`.
    fn parse_log_line(line: &str) -> Option<LoggedRequest> {
        let (_, rest) = line.split_once('"')?;
        let (request, rest) = rest.split_once('"')?;
        let mut parts = request.split(' ');
        let (method, path, _protocol) = (parts.next()?, parts.next()?, parts.next()?);
        let status = rest.split_whitespace().next()?.parse().ok()?;
        LoggedRequest::new(method, path, status)
    }
}

/// The folder of the scimmy app (`server.js`, `package.json`, `package-lock.json`).
pub fn scimmy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scimmy")
}

/// A running scimmy app (`tests/scimmy/server.js` under node) on 127.0.0.1: Users and Groups in
/// memory, bearer auth, served at `/scim/v2`; stopped when dropped.
pub struct ScimmyServer {
    /// The port it listens on.
    pub port: u16,
    /// `http://127.0.0.1:<port>/scim/v2`.
    pub base_url: String,
    bearer_token: String,
    guard: ChildGuard,
}

impl ScimmyServer {
    /// Starts the app with `token` and waits until `GET /scim/v2/ServiceProviderConfig` (which
    /// needs the token on this server) answers 200.
    pub async fn start(token: &str) -> ScimmyServer {
        let (port, guard) = start_on_free_port("scimmy", |port| launch_scimmy(port, token))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        ScimmyServer {
            port,
            base_url: format!("http://127.0.0.1:{port}{}", Self::BASE_PATH),
            bearer_token: token.to_owned(),
            guard,
        }
    }

    /// The server process.
    pub fn guard(&mut self) -> &mut ChildGuard {
        &mut self.guard
    }
}

impl ScimPeer for ScimmyServer {
    const KIND: &'static str = "scimmy";
    const BASE_PATH: &'static str = "/scim/v2";

    async fn start_with_token(token: &str) -> Self {
        ScimmyServer::start(token).await
    }

    fn port(&self) -> u16 {
        self.port
    }

    fn endpoint(&self) -> ScimEndpoint {
        ScimEndpoint {
            addr: self.addr(),
            base_path: Self::BASE_PATH,
            bearer_token: Some(self.bearer_token.clone()),
        }
    }

    fn logs(&self) -> String {
        self.guard.logs()
    }

    /// tests/scimmy/server.js prints `PATCH /scim/v2/Groups/x 200` once a response is sent.
    fn parse_log_line(line: &str) -> Option<LoggedRequest> {
        let mut parts = line.split(' ');
        let (method, path, status) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        LoggedRequest::new(method, path, status.parse().ok()?)
    }
}

async fn launch_scimmy(port: u16, token: &str) -> Result<ChildGuard, String> {
    let dir = scimmy_dir();
    assert!(
        dir.join("node_modules/scimmy-routers").is_dir(),
        "scimmy is not installed in {}: run ./scripts/test.sh (it runs `npm ci` there)",
        dir.display()
    );
    let mut cmd = Command::new("node");
    cmd.arg(dir.join("server.js"))
        .arg(port.to_string())
        .current_dir(&dir)
        // The environment, not argv: a process listing must not show the token.
        .env("SCIMMY_TOKEN", token);
    let auth = format!("Bearer {token}");
    spawn_until_ready(
        &format!("scimmy:{port}"),
        cmd,
        port,
        &format!("{}/ServiceProviderConfig", ScimmyServer::BASE_PATH),
        &[("Authorization", &auth)],
        SCIMMY_READY_TIMEOUT,
    )
    .await
}
