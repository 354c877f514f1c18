//! Control: the agent's status socket, `control.sock` in `state_dir` (a Unix socket, mode 0600),
//! and the client side that `connect status` uses.
//!
//! A client writes one line, `status`, and reads one JSON line back: an [`AgentReport`] built
//! from the supervisor (restarts, last reload), the Session (tunnel state) and the dialers
//! (per-target counters). The socket is created under a temporary name, restricted to its owner,
//! then renamed into place, so it is never reachable with looser permissions. The report must
//! never carry a secret: no service id, no proxy credentials, no request content.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;
use tracing::{debug, info};

use super::supervisor::AgentSupervisorMsg;
use crate::display::coarse_duration;
use crate::messages::agent::{
    AgentReport, ControlMsg, SessionMsg, SessionPhase, SessionStatus, REPORT_VERSION,
};

/// File name of the control socket inside `state_dir`.
pub const SOCKET_NAME: &str = "control.sock";
/// The one request the socket understands.
const STATUS_REQUEST: &str = "status";
/// Bound on each step of an exchange, on both sides.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `connect status` waits for the whole answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(8);
/// Longest request line accepted.
const MAX_REQUEST: u64 = 256;

/// The control socket of an agent whose state_dir is `state_dir`.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_NAME)
}

/// Why the control socket could not be served or asked.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("another agent already runs with this state_dir: its control socket {socket} answers; stop that agent, or give this one its own state_dir")]
    AlreadyRunning { socket: String },
    #[error("cannot create the control socket {socket}: {source} (state_dir must be writable by the agent's user, and the socket path shorter than 108 bytes)")]
    Bind {
        socket: String,
        source: std::io::Error,
    },
    #[error("no agent answers on {socket}: {reason}; is `connect run` running with this config.ini (same state_dir)?")]
    NoAgent { socket: String, reason: String },
    #[error("the agent on {socket} gave an answer this version cannot read: {detail}")]
    BadAnswer { socket: String, detail: String },
}

/// Binds the control socket at `path` with mode 0600. A socket file left by an agent that is
/// gone is replaced; one that still answers means another agent runs here.
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    use std::os::unix::fs::PermissionsExt;
    let socket = path.display().to_string();
    let failed = |source| ControlError::Bind {
        socket: socket.clone(),
        source,
    };
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(ControlError::AlreadyRunning { socket });
    }
    match std::fs::remove_file(path) {
        Ok(()) => debug!(socket = %socket, "removed a stale control socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(failed(e)),
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| SOCKET_NAME.into());
    let staging = path.with_file_name(format!(".{name}.{}", std::process::id()));
    let _ = std::fs::remove_file(&staging);
    let listener = std::os::unix::net::UnixListener::bind(&staging).map_err(failed)?;
    let placed = std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&staging, path))
        .and_then(|()| listener.set_nonblocking(true));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&staging);
        return Err(failed(e));
    }
    UnixListener::from_std(listener).map_err(failed)
}

/// What the Control actor starts from.
pub struct ControlArgs {
    pub socket: PathBuf,
    /// Already bound (at agent start); `None` binds `socket` (after a restart).
    pub listener: Option<UnixListener>,
    pub supervisor: ActorRef<AgentSupervisorMsg>,
}

/// Control state: the accept loop and the socket file it owns.
pub struct ControlState {
    socket: PathBuf,
    inode: Option<u64>,
    accept: JoinHandle<()>,
}

/// The Control actor.
pub struct Control;

impl Actor for Control {
    type Msg = ControlMsg;
    type State = ControlState;
    type Arguments = ControlArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: ControlArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        use std::os::unix::fs::MetadataExt;
        let listener = match args.listener {
            Some(listener) => listener,
            None => bind(&args.socket)?,
        };
        let inode = std::fs::metadata(&args.socket).ok().map(|m| m.ino());
        let supervisor = args.supervisor;
        let accept = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let supervisor = supervisor.clone();
                        tokio::spawn(async move { serve(stream, &supervisor).await });
                    }
                    Err(e) => {
                        let _ = myself.cast(ControlMsg::ListenerFailed(e.to_string()));
                        break;
                    }
                }
            }
        });
        info!(socket = %args.socket.display(), "control socket ready for `connect status`");
        Ok(ControlState {
            socket: args.socket,
            inode,
            accept,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: ControlMsg,
        _state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            ControlMsg::ListenerFailed(why) => {
                Err(format!("control socket stopped accepting: {why}").into())
            }
        }
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.accept.abort();
        remove_own_socket(state);
        Ok(())
    }
}

impl Drop for ControlState {
    // Also when the actor is killed (post_stop does not run then).
    fn drop(&mut self) {
        self.accept.abort();
        remove_own_socket(self);
    }
}

/// Removes the socket file unless another agent has put its own there since.
fn remove_own_socket(state: &mut ControlState) {
    use std::os::unix::fs::MetadataExt;
    let Some(inode) = state.inode.take() else {
        return;
    };
    if std::fs::metadata(&state.socket).is_ok_and(|m| m.ino() == inode) {
        let _ = std::fs::remove_file(&state.socket);
    }
}

/// Answers one client.
async fn serve(stream: UnixStream, supervisor: &ActorRef<AgentSupervisorMsg>) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST));
    let asked = tokio::time::timeout(ASK_TIMEOUT, reader.read_line(&mut line)).await;
    let answer = match asked {
        Ok(Ok(_)) if line.trim() == STATUS_REQUEST => {
            serde_json::to_string(&report(supervisor).await).unwrap_or_default()
        }
        Ok(Ok(_)) => serde_json::json!({
            "error": format!("unknown request; the only request is `{STATUS_REQUEST}`")
        })
        .to_string(),
        _ => return,
    };
    let _ = tokio::time::timeout(ASK_TIMEOUT, async {
        write.write_all(answer.as_bytes()).await?;
        write.write_all(b"\n").await?;
        write.shutdown().await
    })
    .await;
}

/// Builds the report; parts that do not answer in time are shown as such, never waited for.
pub async fn report(supervisor: &ActorRef<AgentSupervisorMsg>) -> AgentReport {
    let parts = match supervisor
        .call(AgentSupervisorMsg::Report, Some(ASK_TIMEOUT))
        .await
    {
        Ok(CallResult::Success(parts)) => parts,
        _ => {
            return AgentReport {
                version: REPORT_VERSION,
                agent_name: String::new(),
                pid: std::process::id(),
                config: None,
                proxy: None,
                session: SessionStatus {
                    last_error: Some("the agent's supervisor is not responding".into()),
                    ..Default::default()
                },
                targets: Vec::new(),
                restarts: Default::default(),
                last_reload: None,
            }
        }
    };
    let session = match &parts.session {
        Some(session) => match session.call(SessionMsg::State, Some(ASK_TIMEOUT)).await {
            Ok(CallResult::Success(status)) => status,
            _ => SessionStatus {
                hub: parts.hub.clone(),
                last_error: Some("the session is not responding".into()),
                ..Default::default()
            },
        },
        None => SessionStatus {
            phase: SessionPhase::Restarting,
            hub: parts.hub.clone(),
            ..Default::default()
        },
    };
    let targets = parts.dialers.stats().await;
    // Every actor is listed, restarted or not, so scripts can rely on the keys.
    let mut restarts = parts.restarts;
    for actor in ["session", "control"] {
        restarts.entry(actor.to_string()).or_insert(0);
    }
    for t in &targets {
        restarts.entry(format!("dialer:{}", t.name)).or_insert(0);
        restarts.insert(format!("forward:{}", t.name), t.forward_restarts);
    }
    AgentReport {
        version: REPORT_VERSION,
        agent_name: parts.info.agent_name,
        pid: std::process::id(),
        config: parts.info.config.map(|p| p.display().to_string()),
        proxy: parts.info.proxy,
        session,
        targets,
        restarts,
        last_reload: parts.last_reload,
    }
}

/// Asks the agent behind `socket` for its report (what `connect status` does).
pub async fn query(socket: &Path) -> Result<AgentReport, ControlError> {
    let name = socket.display().to_string();
    let no_agent = |reason: String| ControlError::NoAgent {
        socket: name.clone(),
        reason,
    };
    let exchange = async {
        let mut stream = UnixStream::connect(socket)
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => no_agent("the socket does not exist".into()),
                std::io::ErrorKind::ConnectionRefused => {
                    no_agent("the socket is left over from an agent that is gone".into())
                }
                _ => no_agent(e.to_string()),
            })?;
        stream
            .write_all(format!("{STATUS_REQUEST}\n").as_bytes())
            .await
            .map_err(|e| no_agent(e.to_string()))?;
        let mut answer = Vec::new();
        stream
            .read_to_end(&mut answer)
            .await
            .map_err(|e| no_agent(e.to_string()))?;
        if answer.is_empty() {
            return Err(no_agent(
                "it closed the connection without an answer".into(),
            ));
        }
        serde_json::from_slice::<AgentReport>(&answer).map_err(|e| ControlError::BadAnswer {
            socket: name.clone(),
            detail: e.to_string(),
        })
    };
    tokio::time::timeout(ANSWER_TIMEOUT, exchange)
        .await
        .map_err(|_| no_agent(format!("no answer within {ANSWER_TIMEOUT:?}")))?
}

/// The report as a readable table, for `connect status`.
pub fn render(report: &AgentReport) -> String {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let ago = |at: u64| format!("{} ago", coarse_duration(now.saturating_sub(at)));
    let s = &report.session;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "agent       {} (pid {}){}",
        if report.agent_name.is_empty() {
            "?"
        } else {
            &report.agent_name
        },
        report.pid,
        report
            .config
            .as_deref()
            .map(|c| format!(", {c}"))
            .unwrap_or_default()
    );
    let since = s
        .connected_since_unix
        .map(|t| format!(", since {}", ago(t)))
        .unwrap_or_default();
    let _ = writeln!(out, "session     {}{since}", s.phase);
    let _ = writeln!(out, "hub         {}", s.hub);
    if let Some(proxy) = &report.proxy {
        let _ = writeln!(out, "proxy       {proxy}");
    }
    let rtt = s
        .last_rtt_micros
        .map(|us| format!("round trip {:.1} ms", us as f64 / 1000.0))
        .unwrap_or_else(|| "no answer to a ping yet".into());
    let heard = s
        .last_heard_unix_ms
        .map(|ms| format!(", last heard {}", ago(ms / 1000)))
        .unwrap_or_default();
    let _ = writeln!(out, "heartbeat   {rtt}{heard}");
    let handshake = match &s.last_handshake {
        None => "none yet".to_string(),
        Some(h) => match &h.error {
            None => format!("ok in {} ms, {}", h.duration_ms, ago(h.at_unix)),
            Some(e) => format!("failed after {} ms, {}: {e}", h.duration_ms, ago(h.at_unix)),
        },
    };
    let _ = writeln!(out, "handshake   {handshake}");
    let _ = writeln!(
        out,
        "tunnel      {} connect(s), {} request(s) in flight",
        s.connects, s.in_flight
    );
    if let Some(e) = &s.last_error {
        let _ = writeln!(out, "last error  {e}");
    }
    if let Some(r) = &report.last_reload {
        let outcome = match &r.error {
            None => "ok".to_string(),
            Some(e) => format!("refused: {e}"),
        };
        let _ = writeln!(out, "reload      {outcome}, {}", ago(r.at_unix));
    }
    let restarts = if report.restarts.values().all(|n| *n == 0) {
        "none".to_string()
    } else {
        report
            .restarts
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(actor, n)| format!("{actor} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(out, "restarts    {restarts}");
    out.push('\n');

    let header = [
        "TARGET",
        "ADDRESS",
        "TLS",
        "IN FLIGHT",
        "FORWARDED",
        "ERRORS",
        "LAST ERROR",
    ];
    let rows: Vec<[String; 7]> = report
        .targets
        .iter()
        .map(|t| {
            [
                t.name.clone(),
                t.addr.clone(),
                t.tls.clone(),
                t.in_flight.to_string(),
                t.forwarded.to_string(),
                t.errors.to_string(),
                t.last_error.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    if rows.is_empty() {
        out.push_str(
            "no targets declared (add one with `connect set-target <name> <host:port>`)\n",
        );
        return out;
    }
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[&str]| {
        let mut text = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                let _ = write!(text, "{cell:<w$}  ");
            }
        }
        text.trim_end().to_string()
    };
    let _ = writeln!(out, "{}", line(&header));
    for row in &rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        let _ = writeln!(out, "{}", line(&cells));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actors::agent::run::proxy_display;
    use crate::config::agent::AgentConfig;
    use crate::messages::agent::{HandshakeInfo, TargetStats};

    const ID: &str = "status-test-service-id-0123456789";

    fn config(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.ini");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn the_report_shows_the_proxy_without_its_credentials() {
        let (_dir, path) = config(&format!(
            "service_id = {ID}\nhub = wss://hub.example.com/v1/connect\nproxy = https://squid-user:pr0xy-pa55@proxy.lan:3128\n"
        ));
        let agent = AgentConfig::load(&path).unwrap();
        let report = AgentReport {
            version: REPORT_VERSION,
            agent_name: "vm-01".into(),
            pid: 42,
            config: Some(path.display().to_string()),
            proxy: agent.proxy.as_ref().map(proxy_display),
            session: SessionStatus {
                phase: SessionPhase::Connected,
                connected: true,
                hub: agent.hub.clone(),
                connected_since_unix: Some(1),
                last_rtt_micros: Some(1500),
                last_heard_unix_ms: Some(1000),
                last_handshake: Some(HandshakeInfo {
                    at_unix: 1,
                    duration_ms: 12,
                    error: None,
                }),
                connects: 3,
                in_flight: 2,
                last_error: None,
            },
            targets: vec![TargetStats {
                name: "crm".into(),
                addr: "10.0.0.12:443".into(),
                tls: "always".into(),
                in_flight: 2,
                forwarded: 120,
                errors: 1,
                last_error: Some("connection to 10.0.0.12:443 refused".into()),
                forward_restarts: 0,
            }],
            restarts: [("session".to_string(), 2)].into_iter().collect(),
            last_reload: None,
        };
        let table = render(&report);
        let json = serde_json::to_string(&report).unwrap();
        for text in [&table, &json] {
            for secret in [ID, "squid-user", "pr0xy-pa55"] {
                assert!(!text.contains(secret), "`{secret}` shown:\n{text}");
            }
        }
        assert!(
            table.contains("proxy       https://proxy.lan:3128 (with credentials)"),
            "{table}"
        );
        assert!(table.contains("session     connected, since "), "{table}");
        assert!(table.contains("round trip 1.5 ms"), "{table}");
        assert!(table.contains("tunnel      3 connect(s), 2 request(s) in flight"));
        assert!(table.contains("restarts    session 2"), "{table}");
        assert!(
            table.contains("crm     10.0.0.12:443  always  2          120        1       connection to 10.0.0.12:443 refused"),
            "{table}"
        );
        let back: AgentReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back.targets, report.targets);
    }

    #[test]
    fn status_finds_state_dir_without_secrets_and_despite_a_broken_target() {
        let (dir, path) = config(
            "service_id = env:CONNECT_STATUS_TEST_UNSET_VARIABLE\nstate_dir = /var/lib/connect\nhub = wss://h/\n\n[target.broken]\naddr = no-port\n",
        );
        assert!(AgentConfig::load(&path).is_err());
        assert_eq!(
            AgentConfig::state_dir_of(&path).unwrap(),
            PathBuf::from("/var/lib/connect")
        );
        std::fs::write(&path, "service_id = env:X\nhub = wss://h/\n").unwrap();
        assert_eq!(
            AgentConfig::state_dir_of(&path).unwrap(),
            dir.path().join("run")
        );
    }

    #[tokio::test]
    async fn a_missing_or_stale_socket_means_no_agent() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(dir.path());
        let missing = query(&path).await.unwrap_err().to_string();
        assert!(missing.contains("does not exist"), "{missing}");
        assert!(missing.contains(&path.display().to_string()), "{missing}");

        // A socket file whose agent is gone: refused on connect, and replaced by the next bind.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let stale = query(&path).await.unwrap_err().to_string();
        assert!(stale.contains("left over"), "{stale}");
        let listener = bind(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(
            bind(&path),
            Err(ControlError::AlreadyRunning { .. })
        ));
        drop(listener);
    }
}
