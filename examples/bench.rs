//! The Rust side of `bench/run.sh` (see the README's Benchmarks section): everything the
//! shell script cannot do with nginx, wrk and /proc alone.
//!
//! - `files`: writes a loopback deployment for the real `connect` binary — hub certificate and
//!   CA, hub.toml (apps `nginx` and `hold`), the agent's config.ini (targets `nginx` and `hold`)
//!   and an empty directory — and prints the addresses as shell assignments. Secrets go into
//!   files (mode 0600), never to stdout.
//! - `provision` (B2, B3): hub, agent and the demo SCIM server in this process, talking through
//!   the real TLS + Noise tunnel on loopback; provisions `--users` users in `--groups` groups,
//!   then resyncs with nothing changed, and prints each run's wall time and request count.
//! - `ports`: free loopback ports for nginx and rathole.
//! - `get`: a fixed number of GETs, for `bench/profile.sh`.
//! - `inflight` (B4): serves the `hold` target itself, holding every request until `--count`
//!   are in flight at the agent (as its control socket reports), reads the agent's RSS at that
//!   moment, then answers them all.
//!
//! Every figure is printed as one `key=value` line so the script can pick it up. Nothing here
//! listens beyond 127.0.0.1.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use scim_connect::actors;
use scim_connect::admin_client;
use scim_connect::certs::{write_pem_files, TestCa};
use scim_connect::config::agent::AgentConfig;
use scim_connect::config::directory::{DirGroup, DirUser, Directory, Member, MemberKind};
use scim_connect::config::hub::HubConfig;
use scim_connect::config::Secret;
use scim_connect::demo::run::{free_port, random_token};
use scim_connect::demo::scim_server::DemoScimServer;
use scim_connect::messages::hub::RunSummary;

#[derive(Parser)]
#[command(about = "Benchmark driver for bench/run.sh")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write hub.toml, config.ini, certificates and a directory into DIR for `connect`.
    Files {
        #[arg(long)]
        dir: PathBuf,
        /// Where nginx (the `nginx` target) listens.
        #[arg(long)]
        nginx: SocketAddr,
        /// Where `inflight` will serve the `hold` target.
        #[arg(long)]
        hold: SocketAddr,
    },
    /// B2 and B3: provision through the tunnel into the in-process SCIM server, then resync.
    Provision {
        #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        users: u32,
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        groups: u32,
        /// The app's `page_size` in hub.toml.
        #[arg(long, default_value_t = 1000)]
        page_size: u32,
        /// The app's `concurrency` in hub.toml.
        #[arg(long, default_value_t = 8)]
        concurrency: u32,
        /// `provision_groups = false`: the groups only grant their users.
        #[arg(long)]
        users_only: bool,
    },
    /// Print `count` free loopback ports, one a line (all bound at once, so distinct).
    Ports {
        #[arg(default_value_t = 1)]
        count: usize,
    },
    /// Send exactly `count` GETs of `url` over `conns` keep-alive connections (for profiles,
    /// where a fixed amount of work matters more than a fixed time).
    Get {
        url: String,
        #[arg(long, default_value_t = 1000)]
        count: usize,
        #[arg(long, default_value_t = 8)]
        conns: usize,
        /// A file holding a bearer token to send.
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
    /// B4: hold `count` requests in flight at the agent and read its RSS.
    Inflight {
        #[arg(long)]
        admin: SocketAddr,
        #[arg(long)]
        token_file: PathBuf,
        #[arg(long)]
        hold: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        count: usize,
        #[arg(long)]
        agent_pid: u32,
        /// The agent's control socket (state_dir/control.sock).
        #[arg(long)]
        agent_socket: PathBuf,
    },
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    // Warnings and errors of the in-process hub and agent (RUST_LOG for more).
    scim_connect::logging::init("warn");
    let result = match cli.command {
        Command::Files { dir, nginx, hold } => files(&dir, nginx, hold),
        Command::Ports { count } => ports(count),
        Command::Get {
            url,
            count,
            conns,
            token_file,
        } => get(&url, count, conns, token_file.as_deref()).await,
        Command::Provision {
            users,
            groups,
            page_size,
            concurrency,
            users_only,
        } => {
            provision(
                users as usize,
                groups as usize,
                page_size,
                concurrency,
                users_only,
            )
            .await
        }
        Command::Inflight {
            admin,
            token_file,
            hold,
            count,
            agent_pid,
            agent_socket,
        } => inflight(admin, &token_file, hold, count, agent_pid, &agent_socket).await,
    };
    if let Err(e) = result {
        eprintln!("bench: {e}");
        std::process::exit(1);
    }
}

fn ports(count: usize) -> Result<(), String> {
    let held: Vec<std::net::TcpListener> = (0..count)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cannot find a free loopback port: {e}"))?;
    for listener in &held {
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        println!("{port}");
    }
    Ok(())
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

fn write_secret(path: &Path, text: &str) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    std::io::Write::write_all(&mut file, text.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The files of one loopback deployment: where they are and what the hub listens on.
struct Deployment {
    hub_toml: PathBuf,
    config_ini: PathBuf,
    admin: SocketAddr,
    agent_state: PathBuf,
}

/// One application of the deployment: its name, target and where the target listens.
struct App<'a> {
    name: &'a str,
    target: SocketAddr,
    /// hub.toml lines of the app beyond base_url, service and target.
    extra: String,
}

/// Writes hub.toml (with `apps`), config.ini (one target per app, named like it), the hub's
/// certificate and CA and `directory` into `dir`. Secrets are random and stay in those files
/// (and `admin-token`, mode 0600).
fn write_deployment(dir: &Path, apps: &[App], directory: &Directory) -> Result<Deployment, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let ca = TestCa::new("scim-connect bench CA").map_err(|e| e.to_string())?;
    let leaf = ca
        .issue(&["localhost", "127.0.0.1"])
        .map_err(|e| e.to_string())?;
    let (cert, key) = write_pem_files(dir, "hub", &leaf).map_err(|e| e.to_string())?;
    let ca_path = dir.join("hub-ca.pem");
    write(&ca_path, &ca.cert_pem())?;
    let directory_path = dir.join("directory.json");
    directory
        .save(&directory_path)
        .map_err(|e| format!("{}: {e}", directory_path.display()))?;

    let service_id = random_token();
    let admin_token = random_token();
    let hub_port = free_port()?;
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()?)
        .parse()
        .map_err(|e| format!("{e}"))?;
    let mut hub = format!(
        "# written by examples/bench.rs\nlisten = \"127.0.0.1:{hub_port}\"\ntls_cert = \"{}\"\n\
         tls_key = \"{}\"\nstate_dir = \"{}\"\ndirectory = \"{}\"\n\n\
         [admin]\nlisten = \"{admin}\"\ntoken = \"{admin_token}\"\n\n\
         [[services]]\nname = \"bench\"\nservice_id = \"{service_id}\"\n",
        cert.display(),
        key.display(),
        dir.join("hub-state").display(),
        directory_path.display(),
    );
    let agent_dir = dir.join("agent");
    std::fs::create_dir_all(&agent_dir).map_err(|e| e.to_string())?;
    let mut ini = format!(
        "# written by examples/bench.rs\nservice_id = {service_id}\nstate_dir = {}\n\
         hub = wss://localhost:{hub_port}/v1/connect\nhub_ca = {}\nagent_name = bench-agent\n",
        agent_dir.join("run").display(),
        ca_path.display()
    );
    for app in apps {
        hub.push_str(&format!(
            "\n[apps.{name}]\nbase_url = \"http://127.0.0.1:{port}/scim/v2\"\nservice = \"bench\"\n\
             target = \"{name}\"\n{extra}",
            name = app.name,
            port = app.target.port(),
            extra = app.extra
        ));
        ini.push_str(&format!("\n[target.{}]\naddr = {}\n", app.name, app.target));
    }
    let hub_toml = dir.join("hub.toml");
    write_secret(&hub_toml, &hub)?;
    let config_ini = agent_dir.join("config.ini");
    write_secret(&config_ini, &ini)?;
    write_secret(&dir.join("admin-token"), &admin_token)?;
    Ok(Deployment {
        hub_toml,
        config_ini,
        admin,
        agent_state: agent_dir.join("run"),
    })
}

/// `files`: the deployment for B1 and B4, run by the real binary.
fn files(dir: &Path, nginx: SocketAddr, hold: SocketAddr) -> Result<(), String> {
    // No user is granted: the reconcilers' runs at start change nothing, and the interval keeps
    // them from running again during the measurements.
    let quiet = "auth = \"none\"\ndeprovision = \"delete\"\ninterval = \"24h\"\n";
    let apps = [
        App {
            name: "nginx",
            target: nginx,
            extra: quiet.to_string(),
        },
        App {
            name: "hold",
            target: hold,
            extra: format!("{quiet}request_timeout = \"120s\"\n"),
        },
    ];
    let d = write_deployment(dir, &apps, &Directory::default())?;
    println!("HUB_TOML={}", d.hub_toml.display());
    println!("AGENT_INI={}", d.config_ini.display());
    println!("ADMIN_ADDR={}", d.admin);
    println!("ADMIN_TOKEN_FILE={}", dir.join("admin-token").display());
    println!(
        "AGENT_SOCKET={}",
        d.agent_state.join("control.sock").display()
    );
    Ok(())
}

/// `users` users spread round-robin over `groups` groups, every group granted.
fn bench_directory(users: usize, groups: usize) -> Directory {
    let mut dir_groups: Vec<DirGroup> = (0..groups)
        .map(|g| DirGroup {
            id: format!("g{g:05}"),
            display_name: format!("group-{g:05}"),
            members: Vec::new(),
        })
        .collect();
    let dir_users = (0..users)
        .map(|i| {
            dir_groups[i % groups].members.push(Member {
                value: format!("u{i:06}"),
                kind: MemberKind::User,
            });
            DirUser::person(
                format!("u{i:06}"),
                format!("user{i:06}@example.org"),
                "User",
                &format!("N{i}"),
            )
        })
        .collect();
    Directory {
        users: dir_users,
        groups: dir_groups,
    }
}

/// `provision`: B2 (first run) and B3 (no-change resync) through the in-process tunnel.
async fn provision(
    users: usize,
    groups: usize,
    page_size: u32,
    concurrency: u32,
    users_only: bool,
) -> Result<(), String> {
    let tmp = tempfile::Builder::new()
        .prefix("scim-connect-bench-")
        .tempdir()
        .map_err(|e| format!("cannot create a temporary folder: {e}"))?;
    let scim_token = random_token();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("cannot bind a loopback port: {e}"))?;
    let scim = DemoScimServer::start(listener, Some(scim_token.clone()))
        .await
        .map_err(|e| format!("cannot start the demo SCIM server: {e}"))?;
    let directory = bench_directory(users, groups);
    let grant: Vec<String> = directory
        .groups
        .iter()
        .map(|g| format!("\"{}\"", g.display_name))
        .collect();
    let app = App {
        name: "bench-app",
        target: scim.local_addr(),
        extra: format!(
            "auth = \"bearer\"\ntoken = \"{scim_token}\"\ndeprovision = \"delete\"\n\
             interval = \"24h\"\npage_size = {page_size}\nconcurrency = {concurrency}\n\
             provision_groups = {}\ngrant_groups = [{}]\n",
            !users_only,
            grant.join(", ")
        ),
    };
    let d = write_deployment(tmp.path(), &[app], &directory)?;
    let hub_config = HubConfig::load(&d.hub_toml).map_err(|e| e.to_string())?;
    let agent_config = AgentConfig::load(&d.config_ini).map_err(|e| e.to_string())?;
    let token = hub_config.admin.token.clone();
    let hub = actors::hub::start(&hub_config, Default::default())
        .await
        .map_err(|e| e.to_string())?;
    let agent = actors::agent::run::start(&agent_config)
        .await
        .map_err(|e| e.to_string())?;

    let result = async {
        // The reconciler starts its first run as soon as the agent's tunnel is up; this joins
        // it (or starts it), and the run's own duration is what B2 reports.
        let before = scim.request_count();
        let first = sync(d.admin, &token).await?;
        let first_requests = scim.request_count() - before;
        let groups = if users_only { 0 } else { groups };
        if !first.ok || first.created != users || first.groups.created != groups {
            return Err(format!(
                "first run: expected {users} users and {groups} groups created, got {} and {} ({})",
                first.created,
                first.groups.created,
                first.message.as_deref().unwrap_or("no message")
            ));
        }
        let objects = first.created + first.groups.created + first.groups.members_added;
        let secs = first.duration_ms as f64 / 1000.0;
        println!("b2_users={users}");
        println!("b2_groups={groups}");
        println!("b2_memberships={}", first.groups.members_added);
        println!("b2_objects={objects}");
        println!("b2_wall_s={secs:.2}");
        println!("b2_objects_per_s={:.0}", objects as f64 / secs.max(0.001));
        println!("b2_requests={first_requests}");

        let before = scim.request_count();
        let again = sync(d.admin, &token).await?;
        let resync_requests = scim.request_count() - before;
        if !again.ok || again.unchanged != users || again.groups.unchanged != groups {
            return Err(format!(
                "resync: expected {users} users and {groups} groups unchanged, got {} and {} ({})",
                again.unchanged,
                again.groups.unchanged,
                again.message.as_deref().unwrap_or("no message")
            ));
        }
        println!("b3_users={users}");
        println!("b3_wall_s={:.2}", again.duration_ms as f64 / 1000.0);
        println!("b3_requests={resync_requests}");
        Ok(())
    }
    .await;
    agent.shutdown().await;
    hub.stop().await;
    scim.shutdown().await;
    result
}

async fn sync(admin: SocketAddr, token: &Secret) -> Result<RunSummary, String> {
    admin_client::sync_now(admin, token, "bench-app")
        .await
        .map(|o| o.run)
        .map_err(|e| e.to_string())
}

/// `get`: `count` GETs over `conns` connections; fails on any answer but 200.
async fn get(
    url: &str,
    count: usize,
    conns: usize,
    token_file: Option<&Path>,
) -> Result<(), String> {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::TokioIo;

    let uri: hyper::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let authority = uri
        .authority()
        .ok_or_else(|| format!("{url}: no host:port"))?
        .to_string();
    let path = uri
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_else(|| "/".into());
    let auth = match token_file {
        Some(file) => Some(format!(
            "Bearer {}",
            std::fs::read_to_string(file)
                .map_err(|e| format!("{}: {e}", file.display()))?
                .trim()
        )),
        None => None,
    };
    let left = Arc::new(AtomicUsize::new(count));
    let clock = Instant::now();
    let workers: Vec<_> = (0..conns.max(1))
        .map(|_| {
            let (left, authority, path, auth) =
                (left.clone(), authority.clone(), path.clone(), auth.clone());
            tokio::spawn(async move {
                let connect = || async {
                    let tcp = tokio::net::TcpStream::connect(&authority)
                        .await
                        .map_err(|e| format!("{authority}: {e}"))?;
                    let _ = tcp.set_nodelay(true);
                    let (sender, conn) = hyper::client::conn::http1::handshake::<
                        _,
                        Empty<bytes::Bytes>,
                    >(TokioIo::new(tcp))
                    .await
                    .map_err(|e| e.to_string())?;
                    tokio::spawn(conn);
                    Ok::<_, String>(sender)
                };
                let mut sender = connect().await?;
                while left
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_ok()
                {
                    let mut request = hyper::Request::get(path.as_str())
                        .header(hyper::header::HOST, authority.as_str());
                    if let Some(auth) = &auth {
                        request = request.header(hyper::header::AUTHORIZATION, auth.as_str());
                    }
                    let request = request
                        .body(Empty::<bytes::Bytes>::new())
                        .map_err(|e| e.to_string())?;
                    sender.ready().await.map_err(|e| e.to_string())?;
                    let response = sender
                        .send_request(request)
                        .await
                        .map_err(|e| e.to_string())?;
                    let status = response.status();
                    // nginx ends a keep-alive connection after 1,000 requests (its default)
                    // and says so in the last answer.
                    let closing = response
                        .headers()
                        .get(hyper::header::CONNECTION)
                        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
                    response
                        .into_body()
                        .collect()
                        .await
                        .map_err(|e| e.to_string())?;
                    if status != hyper::StatusCode::OK {
                        return Err(format!("answered {status}"));
                    }
                    if closing {
                        sender = connect().await?;
                    }
                }
                Ok::<(), String>(())
            })
        })
        .collect();
    for worker in workers {
        worker.await.map_err(|e| e.to_string())??;
    }
    println!(
        "get_requests={count}\nget_wall_s={:.3}",
        clock.elapsed().as_secs_f64()
    );
    Ok(())
}

/// VmRSS of `pid` in KiB.
fn rss_kib(pid: u32) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("cannot read /proc/{pid}/status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("no VmRSS in /proc/{pid}/status"))
}

/// `inflight`: B4 at `count` requests in flight.
async fn inflight(
    admin: SocketAddr,
    token_file: &Path,
    hold: SocketAddr,
    count: usize,
    agent_pid: u32,
    agent_socket: &Path,
) -> Result<(), String> {
    let token = std::fs::read_to_string(token_file)
        .map_err(|e| format!("{}: {e}", token_file.display()))?
        .trim()
        .to_string();
    let arrived = Arc::new(AtomicUsize::new(0));
    let (release, released) = tokio::sync::watch::channel(false);
    let origin = {
        let arrived = arrived.clone();
        let listener = tokio::net::TcpListener::bind(hold)
            .await
            .map_err(|e| format!("cannot bind {hold}: {e}"))?;
        let app = axum::Router::new().fallback(move || {
            let arrived = arrived.clone();
            let mut released = released.clone();
            async move {
                arrived.fetch_add(1, Ordering::Relaxed);
                let _ = released.wait_for(|r| *r).await;
                (
                    [(axum::http::header::CONTENT_TYPE, "application/scim+json")],
                    "{\"schemas\":[\"urn:ietf:params:scim:schemas:core:2.0:User\"],\"id\":\"held\",\"userName\":\"held\"}",
                )
            }
        });
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        })
    };

    let idle_before = rss_kib(agent_pid)?;
    let request = format!(
        "GET /api/apps/hold/scim/Users/held HTTP/1.1\r\nHost: {admin}\r\n\
         Authorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    let clients: Vec<_> = (0..count)
        .map(|_| {
            let request = request.clone();
            tokio::spawn(async move {
                let mut tcp = tokio::net::TcpStream::connect(admin).await.ok()?;
                tcp.write_all(request.as_bytes()).await.ok()?;
                let mut answer = Vec::new();
                tcp.read_to_end(&mut answer).await.ok()?;
                Some(answer.starts_with(b"HTTP/1.1 200"))
            })
        })
        .collect();

    let waited = Instant::now();
    let mut in_flight = 0;
    while waited.elapsed() < Duration::from_secs(60) {
        if let Ok(report) = actors::agent::control::query(agent_socket).await {
            in_flight = report
                .targets
                .iter()
                .find(|t| t.name == "hold")
                .map(|t| t.in_flight)
                .unwrap_or(0);
            if in_flight >= count {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let held_rss = rss_kib(agent_pid)?;
    let at_origin = arrived.load(Ordering::Relaxed);
    let _ = release.send(true);
    let mut ok = 0;
    for client in clients {
        if let Ok(Some(true)) = client.await {
            ok += 1;
        }
    }
    origin.abort();
    println!("b4_rss_before_kib={idle_before}");
    println!("b4_inflight={in_flight}");
    println!("b4_inflight_at_origin={at_origin}");
    println!("b4_inflight_rss_kib={held_rss}");
    println!("b4_inflight_ok={ok}");
    if in_flight < count {
        return Err(format!(
            "only {in_flight} of {count} requests were in flight at the agent after 60 s"
        ));
    }
    if ok != count {
        return Err(format!("{ok} of {count} held requests were answered 200"));
    }
    Ok(())
}
