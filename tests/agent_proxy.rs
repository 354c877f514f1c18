//! The agent reaches the hub through an HTTP CONNECT proxy: a real `tinyproxy` (Debian) with
//! Basic authentication, and for `https://` proxies a TLS front (trusting a test CA through
//! `proxy_ca`) in front of it. Wrong or missing credentials and a proxy that is down each give
//! one line naming the proxy; the credentials never show up in logs or status.

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::deploy::{deploy, App, DeploySpec, Deployment, Target, SCIM_TOKEN, SERVICE_ID};
use common::tinyproxy::TinyProxy;
use common::tls_front::TlsFront;
use common::{free_port, wait_until, ChildGuard, Scim2Server};
use scim_connect::actors::agent::run;
use scim_connect::certs::TestCa;
use scim_connect::config::agent::AgentConfig;

const USER: &str = "agent-user";
const PASSWORD: &str = "pa.ss-w0rd";
/// The same credentials percent-encoded as an administrator may write them: decoding must
/// give exactly USER and PASSWORD, or tinyproxy says no.
const ENCODED: &str = "agent-%75ser:pa%2Ess-w0rd";

/// How long a test waits for an agent's first connection attempt to be reported.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(20);

/// A hub (no agent yet) with one app `crm` on a real scim2-server.
async fn hub_with_crm(scim: &Scim2Server) -> Deployment {
    let mut spec = DeploySpec::new(
        vec![App::new(
            "crm",
            &format!("http://crm.internal.example:{}/v2", scim.port),
            "crm",
        )],
        vec![Target::new("crm", scim.addr().to_string())],
    );
    spec.start_agent = false;
    deploy(spec).await
}

fn crm_target(scim: &Scim2Server) -> Vec<Target> {
    vec![Target::new("crm", scim.addr().to_string())]
}

/// Every form in which the credentials could leak.
fn secret_forms() -> Vec<String> {
    vec![
        PASSWORD.to_string(),
        ENCODED.to_string(),
        "pa%2Ess".to_string(),
        format!("{USER}:"),
        base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}")),
        base64::engine::general_purpose::STANDARD.encode(format!("{USER}:wrong-pw")),
        "wrong-pw".to_string(),
    ]
}

fn assert_no_secret(what: &str, text: &str) {
    for secret in secret_forms() {
        assert!(
            !text.contains(&secret),
            "{what} shows the proxy credentials ({secret}):\n{text}"
        );
    }
}

/// Waits until the agent's output holds a line containing `needle`; returns that line.
async fn log_line(agent: &mut ChildGuard, needle: &str) -> String {
    let mut found = None;
    let waited = wait_until(
        &format!("an agent log line with {needle:?}"),
        ATTEMPT_TIMEOUT,
        || {
            found = agent
                .logs()
                .lines()
                .find(|l| l.contains(needle))
                .map(str::to_owned);
            std::future::ready(found.is_some())
        },
    )
    .await;
    if let Err(e) = waited {
        panic!("{e}\n{}", agent.logs());
    }
    found.unwrap()
}

/// Starts an agent (`label`, its own config file and state) with the top-level `lines` and
/// returns it with its first "cannot connect to the hub" log line.
async fn first_failure(
    d: &Deployment,
    scim: &Scim2Server,
    label: &str,
    lines: &[String],
) -> (ChildGuard, String) {
    let config = d.write_agent_config(
        &format!("{label}.ini"),
        SERVICE_ID,
        &format!("{label}-state"),
        &crm_target(scim),
        lines,
    );
    let mut agent = d.spawn_agent_logging(label, &config, "debug");
    let line = log_line(&mut agent, "cannot connect to the hub").await;
    (agent, line)
}

#[tokio::test]
async fn hub_through_tinyproxy_with_basic_auth_and_a_sync_works() {
    let scim = Scim2Server::start(Some(SCIM_TOKEN)).await;
    let mut d = hub_with_crm(&scim).await;
    let proxy = TinyProxy::start(USER, PASSWORD, &[d.hub_port]).await;
    let config = d.write_agent_config(
        "config.ini",
        SERVICE_ID,
        "agent-state",
        &crm_target(&scim),
        &[format!("proxy = http://{ENCODED}@127.0.0.1:{}", proxy.port)],
    );
    d.agent = Some(d.spawn_agent_logging("agent", &config, "debug"));
    d.wait_for_agent("crm").await;

    let (code, out) = d.sync("crm");
    assert_eq!(code, 0, "{out}\n{}\n{}", d.logs(), proxy.logs());
    assert!(out.contains("sync ok"), "{out}");
    assert!(
        out.contains("created 11"),
        "the first run provisions the 11 granted users: {out}"
    );

    // The tunnel really went through the proxy, to the hub's port.
    let proxy_log = proxy.logs();
    assert!(
        proxy_log.contains(&format!("CONNECT localhost:{} HTTP/1.1", d.hub_port)),
        "{proxy_log}"
    );
    assert!(
        proxy_log.contains("Established connection to host \"localhost\""),
        "{proxy_log}"
    );
    let agent_log = d.agent().logs();
    assert!(agent_log.contains("connected to the hub"), "{agent_log}");
    assert_no_secret("the agent's debug log", &agent_log);
}

#[tokio::test]
async fn wrong_and_missing_credentials_are_named_in_one_line() {
    let scim = Scim2Server::start(Some(SCIM_TOKEN)).await;
    let d = hub_with_crm(&scim).await;
    let proxy = TinyProxy::start(USER, PASSWORD, &[d.hub_port]).await;
    let proxy_url = format!("http://127.0.0.1:{}", proxy.port);

    let wrong = format!("proxy = http://{USER}:wrong-pw@127.0.0.1:{}", proxy.port);
    let (agent, line) = first_failure(&d, &scim, "wrong-credentials", &[wrong]).await;
    assert!(
        line.contains(&format!(
            "the proxy {proxy_url} rejected the credentials in `proxy` for CONNECT localhost:{} (401 Unauthorized); check the user name and password",
            d.hub_port
        )),
        "{line}"
    );
    assert_no_secret("the agent's log", &agent.logs());

    let missing = format!("proxy = http://127.0.0.1:{}", proxy.port);
    let (_agent, line) = first_failure(&d, &scim, "no-credentials", &[missing]).await;
    assert!(
        line.contains(&format!(
            "the proxy {proxy_url} requires authentication for CONNECT localhost:{} (407 Proxy Authentication Required); write proxy = http://user:password@host:port",
            d.hub_port
        )),
        "{line}"
    );
    assert!(
        d.agents_with_target("onprem", "crm").await.is_empty(),
        "no agent may register without passing the proxy"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_names_the_refusing_proxy_without_its_credentials() {
    let scim = Scim2Server::start(Some(SCIM_TOKEN)).await;
    let d = hub_with_crm(&scim).await;
    let proxy = TinyProxy::start(USER, PASSWORD, &[d.hub_port]).await;
    let config = d.write_agent_config(
        "config.ini",
        SERVICE_ID,
        "agent-state",
        &crm_target(&scim),
        &[format!(
            "proxy = http://{USER}:wrong-pw@127.0.0.1:{}",
            proxy.port
        )],
    );
    let config = AgentConfig::load(&config).unwrap();
    let agent = run::start(&config).await.unwrap();
    let deadline = tokio::time::Instant::now() + ATTEMPT_TIMEOUT;
    let status = loop {
        if let Some(status) = agent.status().await.filter(|s| s.last_error.is_some()) {
            break status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the session never reported its failed attempt"
        );
        tokio::time::sleep(common::POLL_INTERVAL).await;
    };
    let error = status.last_error.clone().unwrap();
    assert!(!status.connected);
    assert!(
        error.starts_with(&format!(
            "the proxy http://127.0.0.1:{} rejected the credentials",
            proxy.port
        )) && error.contains("401"),
        "{error}"
    );
    assert_no_secret("the status", &format!("{status:?}"));
    assert_no_secret("the status JSON", &serde_json::to_string(&status).unwrap());
    assert_no_secret("the config's Debug", &format!("{config:?}"));
    agent.shutdown().await;
}

#[tokio::test]
async fn a_proxy_that_is_down_is_named() {
    let scim = Scim2Server::start(Some(SCIM_TOKEN)).await;
    let d = hub_with_crm(&scim).await;
    let port = free_port();
    let down = format!("proxy = http://{USER}:{PASSWORD}@127.0.0.1:{port}");
    let (mut agent, line) = first_failure(&d, &scim, "proxy-down", &[down]).await;
    assert!(
        line.contains(&format!(
            "cannot reach the proxy http://127.0.0.1:{port}: Connection refused"
        )) && line.contains("check `proxy` in config.ini and that the proxy is running"),
        "{line}"
    );
    assert_no_secret("the agent's log", &agent.logs());
    assert!(agent.is_running(), "the agent keeps retrying");
}

/// An `https://` proxy: TLS to the proxy itself (a front with a certificate of a private CA
/// named by `proxy_ca`), CONNECT inside it, then the hub's own TLS inside the tunnel.
#[tokio::test]
async fn https_proxy_trusted_through_proxy_ca() {
    let scim = Scim2Server::start(Some(SCIM_TOKEN)).await;
    let mut d = hub_with_crm(&scim).await;
    let proxy = TinyProxy::start(USER, PASSWORD, &[d.hub_port]).await;
    let proxy_ca = TestCa::new("corporate proxy CA").unwrap();
    let front = TlsFront::start(
        &proxy_ca.issue(&["localhost", "127.0.0.1"]).unwrap(),
        proxy.addr(),
    );
    std::fs::write(d.path("proxy-ca.pem"), proxy_ca.cert_pem()).unwrap();
    let proxy_line = format!("proxy = https://{ENCODED}@localhost:{}", front.port());

    // Without the proxy's CA the agent says which certificate it could not trust.
    let (mut agent, line) =
        first_failure(&d, &scim, "untrusted", std::slice::from_ref(&proxy_line)).await;
    assert!(
        line.contains(&format!(
            "TLS handshake with the proxy https://localhost:{} failed",
            front.port()
        )) && line.contains("UnknownIssuer")
            && line.contains("proxy_ca"),
        "{line}"
    );
    agent.stop();

    let config = d.write_agent_config(
        "config.ini",
        SERVICE_ID,
        "agent-state",
        &crm_target(&scim),
        &[proxy_line, "proxy_ca = proxy-ca.pem".to_string()],
    );
    d.agent = Some(d.spawn_agent_logging("agent", &config, "debug"));
    d.wait_for_agent("crm").await;
    let (code, out) = d.sync("crm");
    assert_eq!(code, 0, "{out}\n{}", d.logs());

    let seen = front.seen();
    let tunnel = seen
        .iter()
        .find(|s| s.handshake_ok)
        .unwrap_or_else(|| panic!("no TLS connection reached the proxy front: {seen:?}"));
    assert_eq!(tunnel.server_name.as_deref(), Some("localhost"), "{seen:?}");
    assert!(
        tunnel
            .head
            .starts_with(&format!("CONNECT localhost:{} HTTP/1.1\r\n", d.hub_port)),
        "{seen:?}"
    );
    let expected = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    assert!(
        tunnel.head.to_ascii_lowercase().contains(&format!(
            "proxy-authorization: basic {}",
            expected.to_ascii_lowercase()
        )),
        "the percent-decoded credentials go to the proxy: {seen:?}"
    );
    assert_no_secret("the agent's debug log", &d.agent().logs());
}
