//! End to end, as an administrator deploys it: `connect hub` and `connect run` started as
//! separate processes of the built binary, a real scim2-server (PyPI) as the application, and
//! `connect sync` forcing runs. What ends up in the application is read back through
//! scim2-server's own API.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{connect_bin, free_port, http_request, wait_until, ChildGuard, Scim2Server};
use scim_connect::certs::{write_pem_files, TestCa};
use serde_json::{json, Value};

const ADMIN_TOKEN: &str = "admin-test-token";
const SCIM_TOKEN: &str = "scim-test-token";
const SERVICE_ID: &str = "svc-e2e-0123456789abcdef";
const IMPOSTOR_ID: &str = "svc-impostor-fedcba9876543210";

/// A hub and an agent running as processes, with their files in one temporary folder.
struct Deployment {
    dir: tempfile::TempDir,
    admin_port: u16,
    hub: ChildGuard,
    agent: ChildGuard,
}

impl Deployment {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `connect sync <app>` as a user runs it: exit code and stdout+stderr.
    fn sync(&self, app: &str) -> (i32, String) {
        let out = Command::new(connect_bin())
            .args(["sync", app, "--config"])
            .arg(self.path("hub.toml"))
            .output()
            .expect("run connect sync");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), text)
    }

    fn logs(&self) -> String {
        format!(
            "--- hub ---\n{}\n--- agent ---\n{}",
            self.hub.logs(),
            self.agent.logs()
        )
    }

    /// Waits until the hub's admin API lists an agent advertising `target`.
    async fn wait_for_agent(&self, target: &str) {
        let addr = format!("127.0.0.1:{}", self.admin_port).parse().unwrap();
        let auth = format!("Bearer {ADMIN_TOKEN}");
        let ok = wait_until(
            "agent registered with the hub",
            Duration::from_secs(30),
            || {
                let auth = auth.clone();
                async move {
                    let Ok(resp) = http_request(
                        addr,
                        "GET",
                        "/api/services",
                        &[("Authorization", &auth)],
                        None,
                    )
                    .await
                    else {
                        return false;
                    };
                    let services: Value = serde_json::from_slice(&resp.body).unwrap_or(Value::Null);
                    services.as_array().into_iter().flatten().any(|s| {
                        s["agents"].as_array().into_iter().flatten().any(|a| {
                            a["targets"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .any(|t| t == target)
                        })
                    })
                }
            },
        )
        .await;
        if let Err(e) = ok {
            panic!("{e}\n{}", self.logs());
        }
    }
}

struct AppSpec<'a> {
    name: &'a str,
    base_url: String,
    target: &'a str,
    token: &'a str,
    deprovision: &'a str,
    service: &'a str,
}

fn write_directory(path: &Path, directory: &Value) {
    std::fs::write(path, serde_json::to_vec_pretty(directory).unwrap()).unwrap();
}

fn user(id: &str, user_name: &str, given: &str, family: &str) -> Value {
    json!({
        "id": id,
        "userName": user_name,
        "displayName": format!("{given} {family}"),
        "name": { "givenName": given, "familyName": family },
        "emails": [{ "value": user_name, "type": "work", "primary": true }],
        "active": true
    })
}

/// Twelve people: `staff` (with the nested group `ops`) is granted, u11 is granted directly,
/// u12 is in no granted group.
fn initial_directory() -> Value {
    let mut users = Vec::new();
    for i in 1..=12 {
        users.push(user(
            &format!("u{i:02}"),
            &format!("person{i:02}@example.com"),
            &format!("Given{i:02}"),
            &format!("Family{i:02}"),
        ));
    }
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

/// Starts hub and agent processes. `targets` are the agent's declared targets.
async fn deploy(apps: &[AppSpec<'_>], targets: &[(&str, String)], directory: &Value) -> Deployment {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("e2e test CA").unwrap();
    let leaf = ca.issue(&["localhost", "127.0.0.1"]).unwrap();
    let (cert, key) = write_pem_files(dir.path(), "hub", &leaf).unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).unwrap();
    write_directory(&dir.path().join("directory.json"), directory);

    let hub_port = free_port();
    let admin_port = free_port();
    let mut toml = format!(
        "listen = \"127.0.0.1:{hub_port}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\nstate_dir = \"state\"\ndirectory = \"directory.json\"\n\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\ntoken = \"{ADMIN_TOKEN}\"\n\n[[services]]\nname = \"onprem\"\nservice_id = \"{SERVICE_ID}\"\n\n[[services]]\nname = \"idle\"\nservice_id = \"svc-with-no-agent-000000\"\n\n",
        cert.display(),
        key.display()
    );
    for app in apps {
        toml.push_str(&format!(
            "[apps.{}]\nbase_url = \"{}\"\nservice = \"{}\"\ntarget = \"{}\"\nauth = \"bearer\"\ntoken = \"{}\"\ndeprovision = \"{}\"\ngrant_groups = [\"staff\"]\ngrant_users = [\"u11\"]\n\n",
            app.name, app.base_url, app.service, app.target, app.token, app.deprovision
        ));
    }
    std::fs::write(dir.path().join("hub.toml"), toml).unwrap();

    let mut ini = format!(
        "# agent under test\nservice_id = {SERVICE_ID}\nstate_dir = agent-state\nhub = wss://localhost:{hub_port}/v1/connect\nhub_ca = ca.pem\n"
    );
    for (name, addr) in targets {
        ini.push_str(&format!("\n[target.{name}]\naddr = {addr}\n"));
    }
    std::fs::write(dir.path().join("config.ini"), ini).unwrap();

    let mut hub_cmd = Command::new(connect_bin());
    hub_cmd
        .args(["hub", "--config"])
        .arg(dir.path().join("hub.toml"))
        .env("RUST_LOG", "info");
    let hub = ChildGuard::spawn("hub", hub_cmd).expect("start connect hub");
    let mut agent_cmd = Command::new(connect_bin());
    agent_cmd
        .args(["run", "--config"])
        .arg(dir.path().join("config.ini"))
        .env("RUST_LOG", "info");
    let agent = ChildGuard::spawn("agent", agent_cmd).expect("start connect run");
    Deployment {
        dir,
        admin_port,
        hub,
        agent,
    }
}

/// All users of a scim2-server, by externalId (unmanaged users without one under their userName).
async fn users_of(server: &Scim2Server) -> std::collections::BTreeMap<String, Value> {
    let list = server.get_json("/Users?count=1000").await;
    assert!(
        list["totalResults"].as_u64().unwrap() <= 1000,
        "test expects a single page"
    );
    list["Resources"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|u| {
            let key = u["externalId"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("unmanaged:{}", u["userName"].as_str().unwrap()));
            (key, u)
        })
        .collect()
}

fn assert_user(u: &Value, i: u32, family: &str) {
    assert_eq!(u["userName"], format!("person{i:02}@example.com"), "{u}");
    assert_eq!(u["name"]["givenName"], format!("Given{i:02}"), "{u}");
    assert_eq!(u["name"]["familyName"], family, "{u}");
    assert_eq!(
        u["emails"][0]["value"],
        format!("person{i:02}@example.com"),
        "{u}"
    );
    assert_eq!(u["active"], true, "{u}");
}

#[tokio::test]
async fn provisions_updates_and_deprovisions_through_the_tunnel() {
    let crm = Scim2Server::start(Some(SCIM_TOKEN)).await;
    let wiki = Scim2Server::start(Some(SCIM_TOKEN)).await;
    // A user that existed before the hub: it matches nobody and must never be touched.
    crm.post_json(
        "/Users",
        &json!({ "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": "legacy-admin" }),
    )
    .await;

    let apps = [
        AppSpec {
            name: "crm",
            // The base URL names a host the agent's VM would know; the agent connects to the
            // target's address, never to this host.
            base_url: format!("http://crm.internal.example:{}/v2", crm.port),
            target: "crm-scim",
            token: SCIM_TOKEN,
            deprovision: "delete",
            service: "onprem",
        },
        AppSpec {
            name: "wiki",
            base_url: format!("http://wiki.internal.example:{}/v2", wiki.port),
            target: "wiki-scim",
            token: SCIM_TOKEN,
            deprovision: "deactivate",
            service: "onprem",
        },
    ];
    let targets = [
        ("crm-scim", format!("127.0.0.1:{}", crm.port)),
        ("wiki-scim", format!("127.0.0.1:{}", wiki.port)),
    ];
    let deployment = deploy(&apps, &targets, &initial_directory()).await;
    deployment.wait_for_agent("wiki-scim").await;

    for app in ["crm", "wiki"] {
        let (code, out) = deployment.sync(app);
        assert_eq!(code, 0, "{out}\n{}", deployment.logs());
        assert!(out.contains("created 11"), "{out}");
    }
    for server in [&crm, &wiki] {
        let users = users_of(server).await;
        let managed: Vec<&String> = users
            .keys()
            .filter(|k| !k.starts_with("unmanaged:"))
            .collect();
        assert_eq!(managed.len(), 11, "{users:?}");
        for i in 1..=11 {
            assert_user(&users[&format!("u{i:02}")], i, &format!("Family{i:02}"));
        }
        assert!(!users.contains_key("u12"), "u12 is not granted");
    }
    assert!(users_of(&crm).await.contains_key("unmanaged:legacy-admin"));

    // A second run with nothing changed changes nothing.
    let (code, out) = deployment.sync("crm");
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("created 0, updated 0, deprovisioned 0"),
        "{out}"
    );
    assert!(out.contains("unchanged 11"), "{out}");

    // Rename u01, take u02 out of staff, add u13 to staff.
    let mut directory = initial_directory();
    directory["users"][0]["name"]["familyName"] = json!("Renamed");
    directory["users"][0]["displayName"] = json!("Given01 Renamed");
    directory["users"].as_array_mut().unwrap().push(user(
        "u13",
        "person13@example.com",
        "Given13",
        "Family13",
    ));
    let staff = directory["groups"][0]["members"].as_array_mut().unwrap();
    staff.retain(|m| m["value"] != "u02");
    staff.push(json!({ "value": "u13", "type": "User" }));
    write_directory(&deployment.path("directory.json"), &directory);

    for app in ["crm", "wiki"] {
        let (code, out) = deployment.sync(app);
        assert_eq!(code, 0, "{out}\n{}", deployment.logs());
        assert!(
            out.contains("created 1, updated 1, deprovisioned 1"),
            "{app}: {out}"
        );
    }
    let crm_users = users_of(&crm).await;
    assert_user(&crm_users["u01"], 1, "Renamed");
    assert_eq!(crm_users["u01"]["displayName"], "Given01 Renamed");
    assert!(!crm_users.contains_key("u02"), "delete mode removes u02");
    assert_user(&crm_users["u13"], 13, "Family13");
    assert!(
        crm_users.contains_key("unmanaged:legacy-admin"),
        "unmanaged user left alone"
    );
    assert_eq!(crm_users.len(), 12);

    let wiki_users = users_of(&wiki).await;
    assert_eq!(
        wiki_users["u02"]["active"], false,
        "deactivate mode keeps u02, inactive"
    );
    assert_user(&wiki_users["u01"], 1, "Renamed");
    assert_user(&wiki_users["u13"], 13, "Family13");
}

#[tokio::test]
async fn sync_failures_name_the_actionable_cause() {
    let server = Scim2Server::start(Some(SCIM_TOKEN)).await;
    let closed_port = free_port();
    let base = format!("http://app.internal.example:{}/v2", server.port);
    let apps = [
        AppSpec {
            name: "ok",
            base_url: base.clone(),
            target: "scim",
            token: SCIM_TOKEN,
            deprovision: "delete",
            service: "onprem",
        },
        AppSpec {
            name: "badtoken",
            base_url: base.clone(),
            target: "scim",
            token: "wrong-token",
            deprovision: "delete",
            service: "onprem",
        },
        AppSpec {
            name: "badpath",
            base_url: format!("http://app.internal.example:{}/nope/v2", server.port),
            target: "scim",
            token: SCIM_TOKEN,
            deprovision: "delete",
            service: "onprem",
        },
        AppSpec {
            name: "closed",
            base_url: base.clone(),
            target: "closed",
            token: SCIM_TOKEN,
            deprovision: "delete",
            service: "onprem",
        },
        AppSpec {
            name: "undeclared",
            base_url: base.clone(),
            target: "not-declared",
            token: SCIM_TOKEN,
            deprovision: "delete",
            service: "onprem",
        },
        AppSpec {
            name: "noagent",
            base_url: base.clone(),
            target: "scim",
            token: SCIM_TOKEN,
            deprovision: "delete",
            service: "idle",
        },
    ];
    let targets = [
        ("scim", format!("127.0.0.1:{}", server.port)),
        ("closed", format!("127.0.0.1:{closed_port}")),
    ];
    let deployment = deploy(&apps, &targets, &initial_directory()).await;
    deployment.wait_for_agent("scim").await;

    let (code, out) = deployment.sync("ok");
    assert_eq!(code, 0, "{out}\n{}", deployment.logs());

    // The admin API's SCIM pass-through returns the server's own answer, unchanged.
    let addr = format!("127.0.0.1:{}", deployment.admin_port)
        .parse()
        .unwrap();
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let through = http_request(
        addr,
        "GET",
        "/api/apps/ok/scim/Users?count=2&startIndex=1",
        &[("Authorization", &auth)],
        None,
    )
    .await
    .unwrap();
    assert_eq!(through.status, 200, "{}", through.text());
    let direct = server
        .request("GET", "/Users?count=2&startIndex=1", None)
        .await;
    // The hub sends the base URL's host as `Host` (the TCP address comes from the target), so
    // the server builds its `meta.location` from that name; the rest is byte for byte the same.
    let direct = direct.text().replace(
        &format!("127.0.0.1:{}", server.port),
        &format!("app.internal.example:{}", server.port),
    );
    assert_eq!(
        through.json().unwrap(),
        serde_json::from_str::<serde_json::Value>(&direct).unwrap()
    );
    let missing = http_request(
        addr,
        "GET",
        "/api/apps/ok/scim/Users/no-such-id",
        &[("Authorization", &auth)],
        None,
    )
    .await
    .unwrap();
    assert_eq!(missing.status, 404, "the server's 404 is passed through");
    let unauthenticated = http_request(addr, "GET", "/api/apps/ok/scim/Users", &[], None)
        .await
        .unwrap();
    assert_eq!(unauthenticated.status, 401);

    // Run history: the ok run is recorded.
    let runs = http_request(
        addr,
        "GET",
        "/api/apps/ok/runs?limit=5",
        &[("Authorization", &auth)],
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        runs.json().unwrap()["runs"][0]["created"],
        11,
        "{}",
        runs.text()
    );

    // A service switched off is named as such.
    let off = http_request(
        addr,
        "PUT",
        "/api/services/onprem/enabled",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        Some(br#"{"enabled":false}"#),
    )
    .await
    .unwrap();
    assert_eq!(off.status, 200, "{}", off.text());
    let (code, out) = deployment.sync("ok");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("service `onprem` is switched off"), "{out}");
    http_request(
        addr,
        "PUT",
        "/api/services/onprem/enabled",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        Some(br#"{"enabled":true}"#),
    )
    .await
    .unwrap();
    let (code, out) = deployment.sync("ok");
    assert_eq!(code, 0, "{out}");

    let cases = [
        ("badtoken", "authentication failed"),
        ("badpath", "endpoint not found"),
        ("closed", "network error"),
        ("undeclared", "no connector available"),
        ("noagent", "no connector available"),
    ];
    for (app, expected) in cases {
        let (code, out) = deployment.sync(app);
        assert_eq!(code, 1, "{app}: {out}");
        assert!(
            out.to_lowercase().contains(expected),
            "{app}: expected `{expected}` in:\n{out}"
        );
    }
    let (_, out) = deployment.sync("undeclared");
    assert!(
        out.contains("none advertises target `not-declared`"),
        "{out}"
    );
    let (_, out) = deployment.sync("noagent");
    assert!(
        out.contains("no agent is connected for service `idle`"),
        "{out}"
    );

    // An agent holding a service id the hub does not know gets no session.
    let impostor_ini = deployment.path("impostor.ini");
    let ini = std::fs::read_to_string(deployment.path("config.ini"))
        .unwrap()
        .replace(SERVICE_ID, IMPOSTOR_ID)
        .replace("agent-state", "impostor-state");
    std::fs::write(&impostor_ini, ini).unwrap();
    let mut cmd = Command::new(connect_bin());
    cmd.args(["run", "--config"]).arg(&impostor_ini);
    let impostor = ChildGuard::spawn("impostor", cmd).unwrap();
    wait_until("impostor refused", Duration::from_secs(20), || {
        let refused = impostor.logs().contains("does not accept this service");
        async move { refused }
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}
{}",
            impostor.logs()
        )
    });
    assert!(
        deployment.hub.logs().contains("unknown service"),
        "{}",
        deployment.logs()
    );
    let addr = format!("127.0.0.1:{}", deployment.admin_port)
        .parse()
        .unwrap();
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let services = http_request(
        addr,
        "GET",
        "/api/services",
        &[("Authorization", &auth)],
        None,
    )
    .await
    .unwrap();
    let services: Value = serde_json::from_slice(&services.body).unwrap();
    let agents: usize = services
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["agents"].as_array().unwrap().len())
        .sum();
    assert_eq!(agents, 1, "only the real agent is registered: {services}");
    let impostor_logs = impostor.logs();
    drop(impostor);

    // An unknown application is a clear error, not a hang.
    let (code, out) = deployment.sync("missing");
    assert_ne!(code, 0);
    assert!(out.contains("no application `missing`"), "{out}");

    // No secret reaches the logs.
    let logs = format!("{}\n{impostor_logs}", deployment.logs());
    for secret in [
        SERVICE_ID,
        IMPOSTOR_ID,
        SCIM_TOKEN,
        ADMIN_TOKEN,
        "wrong-token",
    ] {
        assert!(!logs.contains(secret), "secret `{secret}` in logs:\n{logs}");
    }
}
