//! `connect run` with a bad config.ini, as an administrator meets it: the real binary, one line
//! on stderr naming the file, the line, the key and the fix, exit code 2, and nothing
//! half-started — no state directory, no control socket, no file of any kind appears.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{connect_bin, free_port, wait_until, ChildGuard};

const SERVICE_ID: &str = "svc-config-errors-0123456789";
/// How long a refused start may take.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// A config.ini that `connect run` accepts (its hub is not running, so it just retries).
/// Lines: 1 comment, 2 service_id, 3 state_dir, 4 hub, 5 blank, 6 [target.crm], 7 addr.
fn valid(hub_port: u16) -> String {
    format!(
        "# agent\nservice_id = {SERVICE_ID}\nstate_dir = state\nhub = wss://127.0.0.1:{hub_port}/v1/connect\n\n[target.crm]\naddr = 127.0.0.1:9\n"
    )
}

/// Every path under `dir`, relative to it.
fn tree(dir: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            out.insert(path.strip_prefix(dir).unwrap().to_path_buf());
            if path.is_dir() {
                stack.push(path);
            }
        }
    }
    out
}

fn spawn_run(config: &Path) -> ChildGuard {
    let mut cmd = Command::new(connect_bin());
    cmd.args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "info");
    ChildGuard::spawn("connect run", cmd).expect("start connect run")
}

/// Runs `connect run` on `text` (written as config.ini in a fresh folder, after `prepare` put
/// its own files there) and checks the refusal; returns the one line and the folder.
async fn refused(text: &str, prepare: impl FnOnce(&Path)) -> (String, tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    prepare(dir.path());
    let config = dir.path().join("config.ini");
    std::fs::write(&config, text).unwrap();
    let before = tree(dir.path());

    let mut run = spawn_run(&config);
    let status = run
        .wait_exit(EXIT_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e}: the agent started with\n{text}\n{}", run.logs()));
    assert_eq!(status.code(), Some(2), "{}", run.logs());
    let stderr = run.stderr();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one line on stderr:\n{stderr}");
    assert_eq!(run.stdout(), "", "nothing on stdout");
    let line = lines[0].to_string();
    assert!(
        line.starts_with(&format!("error: {}", config.display())),
        "the line names the file first: {line}"
    );
    assert!(!line.contains(SERVICE_ID), "the service id leaked: {line}");
    assert_eq!(
        tree(dir.path()),
        before,
        "a refused start must create nothing (state dir, control socket, temp files)"
    );
    (line, dir, config)
}

fn assert_has(line: &str, fragments: &[&str]) {
    for f in fragments {
        assert!(line.contains(f), "missing {f:?} in: {line}");
    }
}

#[tokio::test]
async fn a_valid_config_starts_and_creates_its_state_dir() {
    // The control case: the checks below would mean nothing if a good start created nothing.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.ini");
    std::fs::write(&config, valid(free_port())).unwrap();
    let mut run = spawn_run(&config);
    let state = dir.path().join("state");
    wait_until("the agent to create its state dir", EXIT_TIMEOUT, || {
        std::future::ready(state.is_dir())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", run.logs()));
    assert!(run.is_running(), "{}", run.logs());
    run.stop();
}

#[tokio::test]
async fn missing_service_id() {
    let text = valid(free_port()).replace(&format!("service_id = {SERVICE_ID}\n"), "");
    let (line, _dir, config) = refused(&text, |_| {}).await;
    assert_eq!(
        line,
        format!(
            "error: {}: missing `service_id`; add `service_id = <the service id from the platform>` at the top of the file",
            config.display()
        )
    );
}

#[tokio::test]
async fn bad_target_address() {
    let text = valid(free_port()).replace("addr = 127.0.0.1:9", "addr = 10.0.0.12");
    let (line, _dir, config) = refused(&text, |_| {}).await;
    assert_has(
        &line,
        &[
            &format!(
                "{}:7: `[target.crm] addr` = \"10.0.0.12\": the port is missing",
                config.display()
            ),
            "write host:port, e.g. 10.0.0.12:443",
        ],
    );
}

#[tokio::test]
async fn unknown_key_gets_a_did_you_mean() {
    let text = valid(free_port()).replace("state_dir = state", "stat_dir = state");
    let (line, _dir, config) = refused(&text, |_| {}).await;
    assert_eq!(
        line,
        format!(
            "error: {}:3: unknown key `stat_dir`; did you mean `state_dir`?",
            config.display()
        )
    );
}

#[tokio::test]
async fn bad_proxy_url_hides_its_credentials() {
    let text = valid(free_port()).replace(
        "state_dir = state\n",
        "state_dir = state\nproxy = socks5://admin:hunter2@proxy.lan:1080\n",
    );
    let (line, _dir, config) = refused(&text, |_| {}).await;
    assert_has(
        &line,
        &[
            &format!(
                "{}:4: `proxy` = \"socks5://***@proxy.lan:1080\": scheme `socks5` is not supported; use http:// or https://",
                config.display()
            ),
            "write it like http://user:password@proxy.example.com:3128",
        ],
    );
    assert!(
        !line.contains("hunter2") && !line.contains("admin"),
        "{line}"
    );
}

#[tokio::test]
async fn unreadable_ca_files() {
    // A target's `ca` that does not exist.
    let text = format!("{}ca = missing-ca.pem\n", valid(free_port()));
    let (line, dir, config) = refused(&text, |_| {}).await;
    assert_has(
        &line,
        &[
            &format!(
                "{}:8: `[target.crm] ca` = \"missing-ca.pem\": cannot read {}: No such file or directory",
                config.display(),
                dir.path().join("missing-ca.pem").display()
            ),
            "give a PEM file holding the CA certificate, readable by the agent's user",
        ],
    );

    // A `hub_ca` that is no PEM certificate at all.
    let text = valid(free_port()).replace(
        "state_dir = state\n",
        "state_dir = state\nhub_ca = hub-ca.pem\n",
    );
    let (line, dir, config) = refused(&text, |dir| {
        std::fs::write(dir.join("hub-ca.pem"), "this is not a certificate\n").unwrap();
    })
    .await;
    assert_has(
        &line,
        &[
            &format!(
                "{}:4: `hub_ca` = \"hub-ca.pem\": {} holds no PEM certificate",
                config.display(),
                dir.path().join("hub-ca.pem").display()
            ),
            "give a PEM file holding the CA certificate",
        ],
    );
}

#[tokio::test]
async fn unwritable_state_dir() {
    // A regular file where the state directory's parent should be: no user, not even root,
    // can create the directory there.
    let text = valid(free_port()).replace("state_dir = state", "state_dir = blocker/state");
    let (line, dir, config) = refused(&text, |dir| {
        std::fs::write(dir.join("blocker"), "a file, not a folder\n").unwrap();
    })
    .await;
    assert_has(
        &line,
        &[
            &format!(
                "{}:3: `state_dir` = \"{}\": the agent cannot write there (",
                config.display(),
                dir.path().join("blocker/state").display()
            ),
            "Not a directory",
            "create the folder and give the agent's user write access to it",
        ],
    );
}
