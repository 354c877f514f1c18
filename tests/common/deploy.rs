//! A deployment as an administrator makes one: `connect hub` and `connect run` started as
//! separate processes of the built binary, with their hub.toml, config.ini, directory.json and
//! certificates (a test CA, written at test time) in one temporary folder.
//!
//! Tests describe what they need with [`DeploySpec`] (services, applications, the agent's
//! targets, the directory) and get a [`Deployment`] that can force syncs the way a user does
//! (`connect sync`), call the admin API, restart the hub on the same ports, and start further
//! agents. Everything listens on 127.0.0.1 only.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use scim_connect::certs::{write_pem_files, TestCa};
use serde_json::{json, Value};

use super::{connect_bin, free_port, http_request, wait_until, ChildGuard, HttpResponse};

/// Bearer token of the hub's admin API in every deployment.
pub const ADMIN_TOKEN: &str = "admin-test-token";
/// Bearer token the SCIM servers of the tests expect.
pub const SCIM_TOKEN: &str = "scim-test-token";
/// Service id of the `onprem` service, held by the default agent.
pub const SERVICE_ID: &str = "svc-e2e-0123456789abcdef";
/// Service id of the `idle` service, which no agent holds.
pub const IDLE_SERVICE_ID: &str = "svc-with-no-agent-000000";

/// How long a test waits for an agent to (re)register with the hub.
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(30);

/// One `[[services]]` entry of hub.toml.
#[derive(Debug, Clone)]
pub struct Service {
    pub name: String,
    pub id: String,
    pub enabled: bool,
}

impl Service {
    pub fn new(name: &str, id: &str) -> Service {
        Service {
            name: name.into(),
            id: id.into(),
            enabled: true,
        }
    }
}

/// One `[apps.<name>]` table of hub.toml. Defaults: service `onprem`, bearer [`SCIM_TOKEN`],
/// deprovision `delete`, grant group `staff` and user `u11` (the [`sample_directory`] rule).
#[derive(Debug, Clone)]
pub struct App {
    pub name: String,
    pub base_url: String,
    pub service: String,
    pub target: String,
    pub token: String,
    pub deprovision: String,
    pub grant_groups: Vec<String>,
    pub grant_users: Vec<String>,
    /// Further `key = value` lines of the table, written as given (TOML syntax).
    pub extra: Vec<String>,
}

impl App {
    pub fn new(name: &str, base_url: &str, target: &str) -> App {
        App {
            name: name.into(),
            base_url: base_url.into(),
            service: "onprem".into(),
            target: target.into(),
            token: SCIM_TOKEN.into(),
            deprovision: "delete".into(),
            grant_groups: vec!["staff".into()],
            grant_users: vec!["u11".into()],
            extra: Vec::new(),
        }
    }

    pub fn service(mut self, service: &str) -> App {
        self.service = service.into();
        self
    }

    pub fn token(mut self, token: &str) -> App {
        self.token = token.into();
        self
    }

    pub fn deprovision(mut self, mode: &str) -> App {
        self.deprovision = mode.into();
        self
    }

    /// Adds a raw TOML line to the app's table, e.g. `interval = "2s"`.
    pub fn with(mut self, line: &str) -> App {
        self.extra.push(line.into());
        self
    }

    fn toml(&self) -> String {
        let list = |items: &[String]| {
            items
                .iter()
                .map(|s| format!("{s:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut out = format!(
            "[apps.{}]\nbase_url = {:?}\nservice = {:?}\ntarget = {:?}\nauth = \"bearer\"\ntoken = {:?}\ndeprovision = {:?}\ngrant_groups = [{}]\ngrant_users = [{}]\n",
            self.name,
            self.base_url,
            self.service,
            self.target,
            self.token,
            self.deprovision,
            list(&self.grant_groups),
            list(&self.grant_users),
        );
        for line in &self.extra {
            out.push_str(line);
            out.push('\n');
        }
        out.push('\n');
        out
    }
}

/// One `[target.<name>]` section of the agent's config.ini.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub addr: String,
    /// Further `key = value` lines of the section, e.g. `no_tls = true`.
    pub extra: Vec<String>,
}

impl Target {
    pub fn new(name: &str, addr: impl Into<String>) -> Target {
        Target {
            name: name.into(),
            addr: addr.into(),
            extra: Vec::new(),
        }
    }

    pub fn with(mut self, line: &str) -> Target {
        self.extra.push(line.into());
        self
    }
}

/// What to deploy.
#[derive(Debug, Clone)]
pub struct DeploySpec {
    /// Default: `onprem` ([`SERVICE_ID`]) and `idle` ([`IDLE_SERVICE_ID`]).
    pub services: Vec<Service>,
    pub apps: Vec<App>,
    /// The default agent's targets.
    pub targets: Vec<Target>,
    pub directory: Value,
    /// Top-level lines added to the default agent's config.ini (e.g. `proxy = ...`).
    pub agent_extra: Vec<String>,
    /// Start the default agent. When false, start agents with [`Deployment::spawn_agent`].
    pub start_agent: bool,
}

impl DeploySpec {
    pub fn new(apps: Vec<App>, targets: Vec<Target>) -> DeploySpec {
        DeploySpec {
            services: vec![
                Service::new("onprem", SERVICE_ID),
                Service::new("idle", IDLE_SERVICE_ID),
            ],
            apps,
            targets,
            directory: sample_directory(),
            agent_extra: Vec::new(),
            start_agent: true,
        }
    }
}

/// The text of an agent config.ini for `service_id` dialing `hub_url`, trusting `ca.pem` beside
/// it, with `targets` and extra top-level `lines`.
pub fn agent_config_text(
    hub_url: &str,
    service_id: &str,
    state_dir: &str,
    targets: &[Target],
    lines: &[String],
) -> String {
    let mut ini = format!(
        "# agent under test\nservice_id = {service_id}\nstate_dir = {state_dir}\nhub = {hub_url}\nhub_ca = ca.pem\n"
    );
    for line in lines {
        ini.push_str(line);
        ini.push('\n');
    }
    for t in targets {
        ini.push_str(&format!("\n[target.{}]\naddr = {}\n", t.name, t.addr));
        for line in &t.extra {
            ini.push_str(line);
            ini.push('\n');
        }
    }
    ini
}

/// A hub and (usually) one agent running as processes; every file lives in [`Deployment::dir`].
pub struct Deployment {
    pub dir: tempfile::TempDir,
    pub hub_port: u16,
    pub admin_port: u16,
    pub hub: ChildGuard,
    /// The default agent; `None` when [`DeploySpec::start_agent`] was false.
    pub agent: Option<ChildGuard>,
    /// hub.toml up to the first app: kept to rewrite the apps ([`Deployment::set_apps`]).
    hub_toml_head: String,
}

/// A user of the sample directory's shape: `userName` is also the work e-mail.
pub fn user(id: &str, user_name: &str, given: &str, family: &str) -> Value {
    json!({
        "id": id,
        "userName": user_name,
        "displayName": format!("{given} {family}"),
        "name": { "givenName": given, "familyName": family },
        "emails": [{ "value": user_name, "type": "work", "primary": true }],
        "active": true
    })
}

/// Twelve people u01..u12 (`personNN@example.com`, `GivenNN FamilyNN`): `staff` (u01..u08 and
/// the nested group `ops` with u09, u10) and u11 directly are granted by the default [`App`]
/// rule; u12 is only in `visitors`.
pub fn sample_directory() -> Value {
    let users: Vec<Value> = (1..=12)
        .map(|i| {
            user(
                &format!("u{i:02}"),
                &format!("person{i:02}@example.com"),
                &format!("Given{i:02}"),
                &format!("Family{i:02}"),
            )
        })
        .collect();
    let staff: Vec<Value> = (1..=8)
        .map(|i| json!({ "value": format!("u{i:02}"), "type": "User" }))
        .chain([json!({ "value": "g-ops", "type": "Group" })])
        .collect();
    json!({
        "users": users,
        "groups": [
            { "id": "g-staff", "displayName": "staff", "members": staff },
            { "id": "g-ops", "displayName": "ops", "members": [
                { "value": "u09", "type": "User" }, { "value": "u10", "type": "User" } ] },
            { "id": "g-visitors", "displayName": "visitors", "members": [
                { "value": "u12", "type": "User" } ] }
        ]
    })
}

/// Writes `directory` as pretty JSON (the hub reads it at every run).
pub fn write_directory(path: &Path, directory: &Value) {
    std::fs::write(path, serde_json::to_vec_pretty(directory).unwrap()).unwrap();
}

/// Writes the files of `spec` and starts the hub and, unless told otherwise, the agent.
pub async fn deploy(spec: DeploySpec) -> Deployment {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("e2e test CA").unwrap();
    let leaf = ca.issue(&["localhost", "127.0.0.1"]).unwrap();
    let (cert, key) = write_pem_files(dir.path(), "hub", &leaf).unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).unwrap();
    write_directory(&dir.path().join("directory.json"), &spec.directory);

    let hub_port = free_port();
    let admin_port = free_port();
    let mut toml = format!(
        "listen = \"127.0.0.1:{hub_port}\"\ntls_cert = {:?}\ntls_key = {:?}\nstate_dir = \"state\"\ndirectory = \"directory.json\"\n\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\ntoken = \"{ADMIN_TOKEN}\"\n\n",
        cert.display().to_string(),
        key.display().to_string()
    );
    for s in &spec.services {
        toml.push_str(&format!(
            "[[services]]\nname = {:?}\nservice_id = {:?}\nenabled = {}\n\n",
            s.name, s.id, s.enabled
        ));
    }
    let hub_toml_head = toml;
    write_hub_toml(dir.path(), &hub_toml_head, &spec.apps);

    let hub = spawn_hub(dir.path());
    let mut deployment = Deployment {
        dir,
        hub_port,
        admin_port,
        hub,
        agent: None,
        hub_toml_head,
    };
    let ini = deployment.write_agent_config(
        "config.ini",
        SERVICE_ID,
        "agent-state",
        &spec.targets,
        &spec.agent_extra,
    );
    if spec.start_agent {
        deployment.agent = Some(deployment.spawn_agent("agent", &ini));
    }
    deployment
}

/// hub.toml: `head` (listen, TLS, admin, services), then one table per app.
fn write_hub_toml(dir: &Path, head: &str, apps: &[App]) {
    let mut toml = head.to_owned();
    for app in apps {
        toml.push_str(&app.toml());
    }
    std::fs::write(dir.join("hub.toml"), toml).unwrap();
}

fn spawn_hub(dir: &Path) -> ChildGuard {
    let mut cmd = Command::new(connect_bin());
    cmd.args(["hub", "--config"])
        .arg(dir.join("hub.toml"))
        .env("RUST_LOG", "info");
    ChildGuard::spawn("hub", cmd).expect("start connect hub")
}

impl Deployment {
    /// A file of the deployment's folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `127.0.0.1:<admin port>`.
    pub fn admin_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.admin_port))
    }

    /// The hub's agent URL as an agent's config.ini names it.
    pub fn hub_url(&self) -> String {
        format!("wss://localhost:{}/v1/connect", self.hub_port)
    }

    /// The default agent (panics when the deployment was made without one).
    pub fn agent(&mut self) -> &mut ChildGuard {
        self.agent.as_mut().expect("deployment has a default agent")
    }

    /// Writes an agent config.ini called `file` for `service_id`, trusting the test CA, with
    /// `targets` and extra top-level `lines`; returns its path.
    pub fn write_agent_config(
        &self,
        file: &str,
        service_id: &str,
        state_dir: &str,
        targets: &[Target],
        lines: &[String],
    ) -> PathBuf {
        self.write_agent_config_dialing(
            &self.hub_url(),
            file,
            service_id,
            state_dir,
            targets,
            lines,
        )
    }

    /// Like [`Deployment::write_agent_config`], for an agent that dials `hub_url` (e.g. a relay
    /// in front of the hub, `wss://localhost:<port>/v1/connect`) instead of the hub itself.
    pub fn write_agent_config_dialing(
        &self,
        hub_url: &str,
        file: &str,
        service_id: &str,
        state_dir: &str,
        targets: &[Target],
        lines: &[String],
    ) -> PathBuf {
        let ini = agent_config_text(hub_url, service_id, state_dir, targets, lines);
        let path = self.path(file);
        std::fs::write(&path, ini).unwrap();
        path
    }

    /// Starts `connect run --config <config>` as a process called `label`.
    pub fn spawn_agent(&self, label: &str, config: &Path) -> ChildGuard {
        self.spawn_agent_with(label, config, "info", &[])
    }

    /// Like [`Deployment::spawn_agent`] with `RUST_LOG=<rust_log>` (e.g. `debug`, to check
    /// that not even debug lines carry a secret).
    pub fn spawn_agent_logging(&self, label: &str, config: &Path, rust_log: &str) -> ChildGuard {
        self.spawn_agent_with(label, config, rust_log, &[])
    }

    /// Like [`Deployment::spawn_agent`], with extra environment variables (e.g. the one an
    /// `env:NAME` service id names).
    pub fn spawn_agent_with_env(
        &self,
        label: &str,
        config: &Path,
        env: &[(&str, &str)],
    ) -> ChildGuard {
        self.spawn_agent_with(label, config, "info", env)
    }

    fn spawn_agent_with(
        &self,
        label: &str,
        config: &Path,
        rust_log: &str,
        env: &[(&str, &str)],
    ) -> ChildGuard {
        let mut cmd = Command::new(connect_bin());
        cmd.args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", rust_log);
        for (name, value) in env {
            cmd.env(name, value);
        }
        ChildGuard::spawn(label, cmd).expect("start connect run")
    }

    /// Rewrites the `[apps.*]` tables of hub.toml as `apps`, as an administrator edits the
    /// access rule; the hub reads them when it starts ([`Deployment::restart_hub`]).
    pub fn set_apps(&self, apps: &[App]) {
        write_hub_toml(self.dir.path(), &self.hub_toml_head, apps);
    }

    /// Stops the hub (SIGTERM) and starts it again on the same ports with the same files.
    /// The old hub's output is returned, since its guard is replaced.
    pub fn restart_hub(&mut self) -> String {
        self.hub.stop();
        let old = self.hub.logs();
        self.hub = spawn_hub(self.dir.path());
        old
    }

    /// Kills the hub with SIGKILL, as a crash would; returns its output. Start it again with
    /// [`Deployment::start_hub`].
    pub fn kill_hub(&mut self) -> String {
        self.hub.kill_now();
        self.hub.logs()
    }

    /// Starts the hub again on the same ports with the same files (after [`Deployment::kill_hub`]
    /// or a stop). The previous hub's output is returned, since its guard is replaced.
    pub fn start_hub(&mut self) -> String {
        let old = self.hub.logs();
        self.hub = spawn_hub(self.dir.path());
        old
    }

    /// `connect status [--json] --config <config>` as an administrator runs it on the agent's
    /// VM (without the agent's environment): exit code, stdout, stderr.
    pub fn status(&self, config: &Path, json: bool) -> (i32, String, String) {
        let mut cmd = Command::new(connect_bin());
        cmd.arg("status");
        if json {
            cmd.arg("--json");
        }
        let out = cmd
            .arg("--config")
            .arg(config)
            .output()
            .expect("run connect status");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The default agent's `connect status --json` report, or `None` when it does not answer
    /// (exit code 2).
    pub fn status_json(&self) -> Option<Value> {
        let (code, out, err) = self.status(&self.path("config.ini"), true);
        if code == 2 {
            return None;
        }
        Some(serde_json::from_str(&out).unwrap_or_else(|e| {
            panic!("connect status --json printed no JSON ({e}): {out}\n{err}")
        }))
    }

    /// One request through the admin API's SCIM pass-through, `/api/apps/<app>/scim/<path>`;
    /// `Err` when the hub does not answer (e.g. it was killed mid-request).
    pub async fn pass_through(&self, app: &str, path: &str) -> Result<HttpResponse, String> {
        let auth = format!("Bearer {ADMIN_TOKEN}");
        http_request(
            self.admin_addr(),
            "GET",
            &format!("/api/apps/{app}/scim/{path}"),
            &[("Authorization", &auth)],
            None,
        )
        .await
    }

    /// `connect <args...> --config hub.toml` as a user runs it: exit code and stdout+stderr.
    pub fn connect_with_hub_config(&self, args: &[&str]) -> (i32, String) {
        let out = Command::new(connect_bin())
            .args(args)
            .arg("--config")
            .arg(self.path("hub.toml"))
            .output()
            .expect("run connect");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), text)
    }

    /// `connect sync <app>`: exit code and stdout+stderr.
    pub fn sync(&self, app: &str) -> (i32, String) {
        self.connect_with_hub_config(&["sync", app])
    }

    /// [`Deployment::sync`] without blocking the test's runtime, so that the test can act
    /// while the run goes on (kill an agent, restart the hub or the SCIM server). The command
    /// starts when the future is first polled; the future does not borrow the deployment.
    pub fn sync_async(
        &self,
        app: &str,
    ) -> impl std::future::Future<Output = (i32, String)> + Send + 'static {
        let mut cmd = tokio::process::Command::new(connect_bin());
        cmd.args(["sync", app, "--config"])
            .arg(self.path("hub.toml"))
            .kill_on_drop(true);
        async move {
            let out = cmd.output().await.expect("run connect sync");
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            (out.status.code().unwrap_or(-1), text)
        }
    }

    /// Hub and default agent output, for failure messages.
    pub fn logs(&self) -> String {
        let agent = self
            .agent
            .as_ref()
            .map(|a| a.logs())
            .unwrap_or_else(|| "(no default agent)".into());
        format!("--- hub ---\n{}\n--- agent ---\n{agent}", self.hub.logs())
    }

    /// One admin API request with the admin token (and a JSON body when given).
    pub async fn admin(&self, method: &str, path: &str, body: Option<&Value>) -> HttpResponse {
        let auth = format!("Bearer {ADMIN_TOKEN}");
        let mut headers = vec![("Authorization", auth.as_str())];
        let encoded = body.map(|b| serde_json::to_vec(b).unwrap());
        if encoded.is_some() {
            headers.push(("Content-Type", "application/json"));
        }
        http_request(
            self.admin_addr(),
            method,
            path,
            &headers,
            encoded.as_deref(),
        )
        .await
        .unwrap_or_else(|e| panic!("admin API {method} {path}: {e}\n{}", self.logs()))
    }

    /// The admin API's SCIM pass-through of `app`, as a SCIM base URL: requests under it go
    /// through the tunnel to the app's server, with the app's own credentials added; callers
    /// authenticate with the admin token.
    pub fn pass_through_url(&self, app: &str) -> String {
        format!("http://{}/api/apps/{app}/scim", self.admin_addr())
    }

    /// The connected agents of `service` as the admin API lists them (name, health, requests
    /// in flight, targets...); empty when the hub does not answer.
    pub async fn agents(&self, service: &str) -> Vec<Value> {
        let auth = format!("Bearer {ADMIN_TOKEN}");
        let Ok(resp) = http_request(
            self.admin_addr(),
            "GET",
            "/api/services",
            &[("Authorization", &auth)],
            None,
        )
        .await
        else {
            return Vec::new();
        };
        let services: Value = serde_json::from_slice(&resp.body).unwrap_or(Value::Null);
        services
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["name"] == service)
            .flat_map(|s| s["agents"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// The connected agents (session ids) of `service` that advertise `target`, as the admin
    /// API lists them; empty when the hub does not answer.
    pub async fn agents_with_target(&self, service: &str, target: &str) -> Vec<u64> {
        self.agents(service)
            .await
            .into_iter()
            .filter(|a| {
                a["targets"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|t| t == target)
            })
            .filter_map(|a| a["session_id"].as_u64())
            .collect()
    }

    /// Waits until an agent of `onprem` advertising `target` is registered with the hub.
    pub async fn wait_for_agent(&self, target: &str) {
        let ok = wait_until(
            &format!("an agent advertising `{target}` registered with the hub"),
            REGISTER_TIMEOUT,
            || async move { !self.agents_with_target("onprem", target).await.is_empty() },
        )
        .await;
        if let Err(e) = ok {
            panic!("{e}\n{}", self.logs());
        }
    }

    /// Waits until the first agent's own `connect status` says connected (exit 0). The hub
    /// registers an agent a moment before the agent has heard so, so a test that judges the
    /// agent's view must wait for it too, not only for [`Deployment::wait_for_agent`].
    pub async fn wait_for_agent_connected(&self) {
        let ini = self.path("config.ini");
        let ok = wait_until(
            "the agent's `connect status` to say connected",
            REGISTER_TIMEOUT,
            || {
                let (code, _, _) = self.status(&ini, false);
                async move { code == 0 }
            },
        )
        .await;
        if let Err(e) = ok {
            panic!("{e}\n{}", self.logs());
        }
    }

    /// `POST /api/apps/<app>/sync`: runs (or joins) a sync and returns its result, asserting
    /// the API answered 200.
    pub async fn force_sync(&self, app: &str) -> Value {
        let resp = self
            .admin("POST", &format!("/api/apps/{app}/sync"), None)
            .await;
        assert_eq!(
            resp.status,
            200,
            "sync {app}: {}\n{}",
            resp.text(),
            self.logs()
        );
        resp.json().unwrap()
    }

    /// The entry of `app` in `GET /api/apps` (Last Sync, run going now).
    pub async fn app_status(&self, app: &str) -> Value {
        let resp = self.admin("GET", "/api/apps", None).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        let apps = resp.json().unwrap();
        apps.as_array()
            .into_iter()
            .flatten()
            .find(|a| a["name"] == app)
            .cloned()
            .unwrap_or_else(|| panic!("no app `{app}` in GET /api/apps: {apps}"))
    }

    /// The hub's `GET /api/runtime`: agent sessions alive, runtime tasks, resident bytes.
    pub async fn runtime(&self) -> Value {
        let resp = self.admin("GET", "/api/runtime", None).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        resp.json().unwrap()
    }

    /// `connect hub status [extra...] --config hub.toml`: exit code and stdout+stderr.
    pub fn hub_status(&self, extra: &[&str]) -> (i32, String) {
        let mut args = vec!["hub", "status"];
        args.extend_from_slice(extra);
        self.connect_with_hub_config(&args)
    }
}
