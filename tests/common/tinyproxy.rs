//! A real HTTP CONNECT proxy for tests: Debian's `tinyproxy`, run in the foreground with a
//! config file written at test time (loopback only, Basic authentication, CONNECT allowed only
//! to the ports the test names).
//!
//! Quirk worth knowing: tinyproxy 1.11 answers a request *without* credentials with 407, but a
//! request with *wrong* credentials with 401. Its BasicAuth line accepts only
//! `[A-Za-z0-9._-]` in user names and passwords.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use super::{free_port, wait_until, ChildGuard};

const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the harness finds tinyproxy: `$TINYPROXY_BIN`, else `tinyproxy` on `PATH`.
pub fn tinyproxy_bin() -> PathBuf {
    match std::env::var_os("TINYPROXY_BIN") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => PathBuf::from("tinyproxy"),
    }
}

/// A running tinyproxy on 127.0.0.1; stopped when dropped.
pub struct TinyProxy {
    pub port: u16,
    pub user: String,
    pub password: String,
    guard: ChildGuard,
    // Holds the config file; removed after the proxy is stopped.
    _dir: tempfile::TempDir,
}

impl TinyProxy {
    /// Starts tinyproxy requiring `user`/`password` (Basic) and allowing CONNECT to
    /// `connect_ports` only; waits until it accepts connections. Panics with its output when it
    /// cannot be started.
    pub async fn start(user: &str, password: &str, connect_ports: &[u16]) -> TinyProxy {
        let mut failures = Vec::new();
        for _ in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let port = free_port();
            let mut conf = format!(
                "Port {port}\nListen 127.0.0.1\nTimeout 30\nAllow 127.0.0.1\nLogLevel Info\nMaxClients 50\nBasicAuth {user} {password}\n"
            );
            for p in connect_ports {
                conf.push_str(&format!("ConnectPort {p}\n"));
            }
            let file = dir.path().join("tinyproxy.conf");
            std::fs::write(&file, conf).unwrap();
            let mut cmd = Command::new(tinyproxy_bin());
            cmd.arg("-d").arg("-c").arg(&file);
            let mut guard =
                ChildGuard::spawn(&format!("tinyproxy:{port}"), cmd).unwrap_or_else(|e| {
                    panic!(
                        "{e}: install it with `apt-get install tinyproxy` (./scripts/test.sh does)"
                    )
                });
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let mut exited = false;
            let ready = wait_until(&format!("tinyproxy on {addr}"), READY_TIMEOUT, || {
                exited = guard.try_status().is_some();
                let done = exited;
                async move { done || tokio::net::TcpStream::connect(addr).await.is_ok() }
            })
            .await;
            if ready.is_ok() && !exited {
                return TinyProxy {
                    port,
                    user: user.into(),
                    password: password.into(),
                    guard,
                    _dir: dir,
                };
            }
            guard.stop();
            failures.push(guard.logs());
        }
        panic!("tinyproxy did not start:\n{}", failures.join("\n"));
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// What tinyproxy logged so far (its CONNECT lines name each tunnel's target).
    pub fn logs(&self) -> String {
        self.guard.logs()
    }

    /// The process, e.g. to stop it.
    pub fn guard(&mut self) -> &mut ChildGuard {
        &mut self.guard
    }
}
