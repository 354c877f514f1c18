//! Proves the shared harness itself: the real scim2-server fixture stores and serves what is sent
//! to it, honours its bearer token and loses its state on restart, and ChildGuard never leaves a
//! process behind.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{wait_until, ChildGuard, Scim2Server};
use serde_json::json;

fn user(user_name: &str) -> serde_json::Value {
    json!({
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
        "userName": user_name,
        "externalId": format!("ext-{user_name}"),
        "active": true
    })
}

/// kill(pid, 0) fails with ESRCH once the process is gone and reaped.
fn process_exists(pid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence; it delivers nothing.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

#[tokio::test]
async fn scim2_server_stores_and_lists_a_user() {
    let server = Scim2Server::start(None).await;
    assert_eq!(
        server.base_url,
        format!("http://127.0.0.1:{}/v2", server.port)
    );

    let created = server.post_json("/Users", &user("bjensen")).await;
    let id = created["id"].as_str().expect("created user has an id");
    assert_eq!(created["userName"], "bjensen");

    let fetched = server.get_json(&format!("/Users/{id}")).await;
    assert_eq!(fetched["externalId"], "ext-bjensen");

    let list = server.get_json("/Users?count=1000").await;
    assert_eq!(list["totalResults"], 1, "{list}");
    assert_eq!(list["Resources"][0]["id"], id);

    // The same userName in another case is a conflict on this server.
    let duplicate = server
        .request("POST", "/Users", Some(&user("BJensen")))
        .await;
    assert_eq!(duplicate.status, 409, "{}", duplicate.text());

    assert!(
        server.logs().contains("POST /v2/Users"),
        "request log is captured:\n{}",
        server.logs()
    );
}

#[tokio::test]
async fn scim2_server_enforces_its_bearer_token() {
    let server = Scim2Server::start(Some("harness-token")).await;
    // The fixture's own helpers send the token.
    let list = server.get_json("/Users").await;
    assert_eq!(list["totalResults"], 0);

    let anonymous = common::http_request(server.addr(), "GET", "/v2/Users", &[], None)
        .await
        .unwrap();
    assert_eq!(anonymous.status, 401, "{}", anonymous.text());
    let wrong = common::http_request(
        server.addr(),
        "GET",
        "/v2/Users",
        &[("Authorization", "Bearer not-the-token")],
        None,
    )
    .await
    .unwrap();
    assert_eq!(wrong.status, 401, "{}", wrong.text());
}

#[tokio::test]
async fn scim2_server_restart_forgets_everything() {
    let mut server = Scim2Server::start(None).await;
    server.post_json("/Users", &user("restart-me")).await;
    let port = server.port;
    server.restart().await;
    assert_eq!(server.port, port);
    assert_eq!(server.get_json("/Users").await["totalResults"], 0);
}

#[tokio::test]
async fn child_guard_stops_the_child_on_drop_and_captures_output() {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "echo to-stdout; echo to-stderr >&2; exec sleep 60"]);
    let guard = ChildGuard::spawn("sleeper", cmd).unwrap();
    let pid = guard.id();
    let dir = guard.dir().to_path_buf();
    wait_until("both lines to be captured", Duration::from_secs(10), || {
        let logs = guard.logs();
        async move { logs.contains("to-stdout") && logs.contains("to-stderr") }
    })
    .await
    .unwrap();
    assert!(process_exists(pid));

    let started = Instant::now();
    drop(guard);
    assert!(!process_exists(pid), "pid {pid} survived its guard");
    // sleep dies of SIGTERM at once; no need to wait for the SIGKILL deadline.
    assert!(started.elapsed() < common::TERM_GRACE);
    assert!(!dir.exists(), "log directory {} left behind", dir.display());
}

#[tokio::test]
async fn child_guard_escalates_to_sigkill_when_sigterm_is_ignored() {
    let mut cmd = Command::new("sh");
    // An ignored signal stays ignored across exec, so sleep itself ignores SIGTERM.
    cmd.args(["-c", "trap '' TERM; echo armed; exec sleep 60"]);
    let mut guard = ChildGuard::spawn("stubborn", cmd).unwrap();
    let pid = guard.id();
    // Signal only after the trap is in place, or SIGTERM would kill sh before it.
    wait_until("the trap to be set", Duration::from_secs(10), || {
        let armed = guard.logs().contains("armed");
        async move { armed }
    })
    .await
    .unwrap();
    let status = guard.stop_within(Duration::from_millis(300));
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    assert!(!guard.is_running());
    drop(guard);
    assert!(!process_exists(pid));
}

#[tokio::test]
async fn child_guard_reports_a_child_that_exits_by_itself() {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "echo bye; exit 3"]);
    let mut guard = ChildGuard::spawn("quitter", cmd).unwrap();
    let status = guard.wait_exit(Duration::from_secs(10)).await.unwrap();
    assert_eq!(status.code(), Some(3));
    assert!(guard.logs().contains("bye"));
}

#[test]
fn free_ports_are_bindable_on_loopback() {
    let port = common::free_port();
    assert_ne!(port, 0);
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("port from free_port() is free");
}

#[tokio::test]
async fn wait_until_times_out_with_the_awaited_thing_named() {
    let err = wait_until("the impossible", Duration::from_millis(120), || async {
        false
    })
    .await
    .unwrap_err();
    assert!(err.contains("the impossible"), "{err}");
}

#[test]
fn connect_binary_is_built() {
    assert!(common::connect_bin().exists());
}
