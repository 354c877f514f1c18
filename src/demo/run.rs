//! `connect demo`: the whole product on loopback in one process — an in-process SCIM server,
//! a hub and an agent with generated certificates — provisioning a sample directory (users and
//! the granted groups with their members) through the encrypted tunnel, then changing the
//! directory and syncing again.
//!
//! It writes real config files (config.ini, hub.toml, directory.json) into a temporary folder
//! and loads them through the same code as `connect run` / `connect hub`, so what it shows is
//! what a deployment does. It binds loopback only and removes its folder at exit unless asked
//! to keep it.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use rand::Rng;

use crate::actors;
use crate::admin_client;
use crate::certs::{write_pem_files, TestCa};
use crate::config::agent::AgentConfig;
use crate::config::directory::{DirGroup, DirUser, Directory, Member, MemberKind, PersonName};
use crate::config::hub::HubConfig;
use crate::messages::hub::RunSummary;

use super::scim_server::DemoScimServer;

const APP: &str = "demo-app";
const GRANTED_GROUPS: [&str; 3] = ["engineering", "sales", "support"];

/// Runs the demo with `users` granted users. Returns an error when a step fails or a run's
/// counts are not the expected ones.
pub async fn run(users: usize, keep: bool) -> Result<(), String> {
    let users = users.max(3);
    let tmp = tempfile::Builder::new()
        .prefix("scim-connect-demo-")
        .tempdir()
        .map_err(|e| format!("cannot create a temporary folder: {e}"))?;
    let dir = tmp.path().to_path_buf();
    let result = run_in(&dir, users).await;
    if keep {
        let kept = tmp.keep();
        println!("files kept in {}", kept.display());
    } else {
        println!(
            "(the demo folder {} is removed at exit; `connect demo --keep` keeps it)",
            dir.display()
        );
    }
    result
}

async fn run_in(dir: &Path, users: usize) -> Result<(), String> {
    let started = Instant::now();
    println!(
        "scim-connect demo — hub, agent and a SCIM server, all on 127.0.0.1, files in {}",
        dir.display()
    );

    // The application: an in-process SCIM server standing in for an on-premises app.
    let scim_token = random_token();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("cannot bind a loopback port: {e}"))?;
    let scim = DemoScimServer::start(listener, Some(scim_token.clone()))
        .await
        .map_err(|e| format!("cannot start the demo SCIM server: {e}"))?;
    let scim_addr = scim.local_addr();
    println!(
        "  SCIM server   http://{scim_addr}{} (bearer token required)",
        scim.base_path()
    );

    // Certificates: a private CA that the agent trusts through hub_ca.
    let ca = TestCa::new("scim-connect demo CA").map_err(|e| e.to_string())?;
    let leaf = ca
        .issue(&["localhost", "127.0.0.1"])
        .map_err(|e| e.to_string())?;
    let (cert, key) = write_pem_files(dir, "hub", &leaf).map_err(|e| e.to_string())?;
    let ca_path = dir.join("hub-ca.pem");
    std::fs::write(&ca_path, ca.cert_pem()).map_err(|e| e.to_string())?;

    // The directory the hub provisions from.
    let directory_path = dir.join("directory.json");
    let mut directory = sample_directory(users);
    directory
        .save(&directory_path)
        .map_err(|e| format!("{}: {e}", directory_path.display()))?;

    // The hub, from a real hub.toml.
    let service_id = random_token();
    let admin_token = random_token();
    let hub_port = free_port()?;
    let admin_port = free_port()?;
    let hub_toml = dir.join("hub.toml");
    std::fs::write(
        &hub_toml,
        hub_toml_text(
            hub_port,
            admin_port,
            &cert,
            &key,
            dir,
            &directory_path,
            &service_id,
            &admin_token,
            &scim_token,
            scim_addr.port(),
        ),
    )
    .map_err(|e| e.to_string())?;
    let hub_config = HubConfig::load(&hub_toml).map_err(|e| e.to_string())?;
    let hub = actors::hub::start(&hub_config, Default::default())
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "  hub           agents wss://127.0.0.1:{}/v1/connect, admin API http://{}",
        hub.agent_addr.port(),
        hub.admin_addr
    );

    // The agent, from a real config.ini, with one target pointing at the SCIM server.
    let agent_dir = dir.join("agent");
    std::fs::create_dir_all(&agent_dir).map_err(|e| e.to_string())?;
    let config_ini = agent_dir.join("config.ini");
    std::fs::write(
        &config_ini,
        format!(
            "# written by `connect demo`\nservice_id = {service_id}\nstate_dir = run\nhub = wss://localhost:{hub_port}/v1/connect\nhub_ca = {}\nagent_name = demo-agent\n\n[target.scim]\naddr = {scim_addr}\n",
            ca_path.display()
        ),
    )
    .map_err(|e| e.to_string())?;
    let agent_config = AgentConfig::load(&config_ini).map_err(|e| e.to_string())?;
    let agent = actors::agent::run::start(&agent_config)
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "  agent         {} — target `scim` → {scim_addr}",
        config_ini.display()
    );

    let result = async {
        let waited = Instant::now();
        loop {
            let services = hub.services().await;
            if services.iter().any(|s| {
                s.agents
                    .iter()
                    .any(|a| a.targets.iter().any(|t| t == "scim"))
            }) {
                break;
            }
            if waited.elapsed() > Duration::from_secs(20) {
                return Err("the agent did not connect to the hub within 20 s".to_string());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        println!(
            "agent connected through TLS + Noise NNpsk0 in {} ms",
            waited.elapsed().as_millis()
        );
        let granted = directory.granted(&hub_config.apps[0].grant).users.len();
        println!(
            "directory: {} users in {} groups; `{APP}` grants groups {} → {granted} users\n",
            directory.users.len(),
            directory.groups.len(),
            GRANTED_GROUPS.join(", ")
        );

        let first = sync(&hub_config).await?;
        println!("run 1  {}", admin_client::describe_run(&first));
        println!(
            "       the SCIM server now holds {} users",
            scim.user_count()
        );
        println!("{}\n", groups_line(&scim));
        expect(&first, users, 0, 0)?;
        expect_groups(&first, GRANTED_GROUPS.len(), 0)?;

        let changes = change_directory(&mut directory);
        directory.save(&directory_path).map_err(|e| e.to_string())?;
        println!("directory changed: {changes}");
        let second = sync(&hub_config).await?;
        println!("run 2  {}", admin_client::describe_run(&second));
        println!(
            "       the SCIM server now holds {} users",
            scim.user_count()
        );
        println!("{}\n", groups_line(&scim));
        expect(&second, 1, 1, 1)?;
        // The leaver leaves each granted group it was in (one: users are spread over the
        // groups), the newcomer joins sales: two groups change.
        expect_groups(&second, 0, 2)?;
        Ok(())
    }
    .await;

    agent.shutdown().await;
    hub.stop().await;
    scim.shutdown().await;
    if result.is_ok() {
        println!("demo finished in {:.1} s: every request above went hub → encrypted tunnel → agent → SCIM server", started.elapsed().as_secs_f64());
    }
    result
}

async fn sync(config: &HubConfig) -> Result<RunSummary, String> {
    admin_client::force_sync(config.admin.listen, &config.admin.token, APP)
        .await
        .map_err(|e| e.to_string())
}

fn expect(
    run: &RunSummary,
    created: usize,
    updated: usize,
    deprovisioned: usize,
) -> Result<(), String> {
    if run.ok
        && run.created == created
        && run.updated == updated
        && run.deprovisioned() == deprovisioned
    {
        Ok(())
    } else {
        Err(format!(
            "expected {created} created, {updated} updated, {deprovisioned} deprovisioned; got {} / {} / {}{}",
            run.created,
            run.updated,
            run.deprovisioned(),
            run.message.as_deref().map(|m| format!(" ({m})")).unwrap_or_default()
        ))
    }
}

/// The groups as the SCIM server holds them, with their member counts.
fn groups_line(scim: &DemoScimServer) -> String {
    let groups: Vec<String> = scim
        .groups()
        .iter()
        .map(|g| format!("{} ({})", g.display_name, g.members.len()))
        .collect();
    format!("       and {} groups: {}", groups.len(), groups.join(", "))
}

fn expect_groups(run: &RunSummary, created: usize, updated: usize) -> Result<(), String> {
    let g = &run.groups;
    if g.created == created && g.updated == updated && g.deleted == 0 {
        Ok(())
    } else {
        Err(format!(
            "expected {created} groups created, {updated} updated, 0 deleted; got {} / {} / {}",
            g.created, g.updated, g.deleted
        ))
    }
}

#[allow(clippy::too_many_arguments)]
fn hub_toml_text(
    hub_port: u16,
    admin_port: u16,
    cert: &Path,
    key: &Path,
    dir: &Path,
    directory: &Path,
    service_id: &str,
    admin_token: &str,
    scim_token: &str,
    scim_port: u16,
) -> String {
    let mut t = String::new();
    let _ = writeln!(t, "# written by `connect demo`");
    let _ = writeln!(t, "listen = \"127.0.0.1:{hub_port}\"");
    let _ = writeln!(t, "tls_cert = \"{}\"", cert.display());
    let _ = writeln!(t, "tls_key = \"{}\"", key.display());
    let _ = writeln!(t, "state_dir = \"{}\"", dir.join("hub-state").display());
    let _ = writeln!(t, "directory = \"{}\"\n", directory.display());
    let _ = writeln!(
        t,
        "[admin]\nlisten = \"127.0.0.1:{admin_port}\"\ntoken = \"{admin_token}\"\n"
    );
    let _ = writeln!(
        t,
        "[[services]]\nname = \"demo\"\nservice_id = \"{service_id}\"\n"
    );
    let _ = writeln!(t, "[apps.{APP}]");
    let _ = writeln!(
        t,
        "base_url = \"http://demo-scim.local:{scim_port}/scim/v2\""
    );
    let _ = writeln!(
        t,
        "service = \"demo\"\ntarget = \"scim\"\nauth = \"bearer\"\ntoken = \"{scim_token}\""
    );
    let _ = writeln!(t, "deprovision = \"delete\"");
    let groups: Vec<String> = GRANTED_GROUPS.iter().map(|g| format!("\"{g}\"")).collect();
    let _ = writeln!(t, "grant_groups = [{}]", groups.join(", "));
    t
}

/// `users` granted users spread over three granted groups (one of them through a nested
/// group), plus contractors who are not granted.
fn sample_directory(users: usize) -> Directory {
    const GIVEN: [&str; 8] = [
        "Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken",
    ];
    const FAMILY: [&str; 8] = [
        "Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson",
    ];
    let contractors = 25;
    let mut dir_users = Vec::new();
    for i in 1..=users + contractors {
        let given = GIVEN[i % GIVEN.len()];
        let family = FAMILY[(i / GIVEN.len()) % FAMILY.len()];
        dir_users.push(person(i, given, family));
    }
    let mut groups: Vec<DirGroup> = GRANTED_GROUPS
        .iter()
        .map(|g| DirGroup {
            id: format!("g-{g}"),
            display_name: g.to_string(),
            members: Vec::new(),
        })
        .collect();
    let mut platform = DirGroup {
        id: "g-platform".into(),
        display_name: "platform".into(),
        members: Vec::new(),
    };
    for i in 1..=users {
        let member = Member {
            value: user_id(i),
            kind: MemberKind::User,
        };
        match i % 3 {
            // Every sixth user reaches engineering only through the nested platform group.
            0 if i % 6 == 0 => platform.members.push(member),
            n => groups[n].members.push(member),
        }
    }
    groups[0].members.push(Member {
        value: platform.id.clone(),
        kind: MemberKind::Group,
    });
    let contractors_group = DirGroup {
        id: "g-contractors".into(),
        display_name: "contractors".into(),
        members: (users + 1..=users + contractors)
            .map(|i| Member {
                value: user_id(i),
                kind: MemberKind::User,
            })
            .collect(),
    };
    groups.push(platform);
    groups.push(contractors_group);
    Directory {
        users: dir_users,
        groups,
    }
}

fn user_id(i: usize) -> String {
    format!("u{i:05}")
}

fn person(i: usize, given: &str, family: &str) -> DirUser {
    let login = format!(
        "{}.{}{i}@example.com",
        given.to_lowercase(),
        family.to_lowercase()
    );
    DirUser::person(user_id(i), login, given, family)
}

/// One rename, one user out of every granted group, one newcomer in a granted group.
fn change_directory(directory: &mut Directory) -> String {
    let renamed = &mut directory.users[0];
    let old = renamed.display_name.clone().unwrap_or_default();
    let given = renamed
        .name
        .as_ref()
        .and_then(|n| n.given_name.clone())
        .unwrap_or_default();
    let new_family = "Renamed-Smith";
    renamed.display_name = Some(format!("{given} {new_family}"));
    renamed.name = Some(PersonName {
        given_name: Some(given.clone()),
        family_name: Some(new_family.into()),
        formatted: Some(format!("{given} {new_family}")),
    });
    let renamed_text = format!(
        "{} renamed \"{old}\" → \"{given} {new_family}\"",
        renamed.id
    );

    let leaver = directory.users[1].id.clone();
    for group in &mut directory.groups {
        group.members.retain(|m| m.value != leaver);
    }

    let n = directory.users.len() + 1;
    let newcomer = person(n, "Radia", "Perlman");
    let newcomer_id = newcomer.id.clone();
    directory.users.push(newcomer);
    if let Some(sales) = directory
        .groups
        .iter_mut()
        .find(|g| g.display_name == "sales")
    {
        sales.members.push(Member {
            value: newcomer_id.clone(),
            kind: MemberKind::User,
        });
    }
    format!("{renamed_text}; {leaver} removed from every group; {newcomer_id} added to sales")
}

/// A fresh random secret (service id, tokens) of 32 hex digits, for throw-away loopback
/// deployments: the demo and the benchmarks.
pub fn random_token() -> String {
    let bytes: [u8; 16] = rand::rng().random();
    hex::encode(bytes)
}

/// A loopback port free at the time of asking.
pub fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free loopback port: {e}"))
}
