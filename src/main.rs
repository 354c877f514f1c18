//! `connect`: the command line. Parses arguments, loads configuration, starts a role, and maps
//! failures to one clear line and an exit code. Everything else lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use scim_connect::config::agent::{self, AgentConfig, SetTarget, SetTargetOutcome, TlsMode};
use scim_connect::config::hub::HubConfig;
use scim_connect::{actors, admin_client, demo, logging};

/// Exit code for bad configuration or usage.
const EXIT_CONFIG: u8 = 2;
/// `connect status`: the agent runs but has no tunnel to the hub.
const EXIT_NOT_CONNECTED: u8 = 1;
/// `connect status`: no agent answers on the control socket.
const EXIT_NO_AGENT: u8 = 2;

#[derive(Parser)]
#[command(
    name = "connect",
    version,
    about = "SCIM provisioning hub and on-premises agent"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: dial the hub and forward its SCIM requests to declared targets.
    Run {
        /// Agent configuration file.
        #[arg(long, default_value = "config.ini")]
        config: PathBuf,
    },
    /// Show the running agent's state: tunnel, targets, restarts (exit 0 connected, 1 not
    /// connected, 2 no agent answering).
    Status {
        /// Print the report as JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Agent configuration file (only its state_dir is used).
        #[arg(long, default_value = "config.ini")]
        config: PathBuf,
    },
    /// Declare (or with -override replace) a target in config.ini.
    #[command(name = "set-target")]
    SetTarget {
        /// Target name the hub's applications refer to.
        name: String,
        /// Where the agent connects: host:port.
        addr: String,
        /// Always use TLS toward the target, whatever the app's base URL says.
        #[arg(long = "always-tls", conflicts_with = "no_tls")]
        always_tls: bool,
        /// Never use TLS toward the target.
        #[arg(long = "no-tls")]
        no_tls: bool,
        /// Allow the hub to skip certificate checks for this target (only when the app asks too).
        #[arg(long = "insecure-allow-skip-tls-check")]
        insecure_allow_skip_tls_check: bool,
        /// Replace an existing target of the same name.
        #[arg(long = "override")]
        override_existing: bool,
        /// PEM file of the CA that signed the target's certificate (trusted besides the system's).
        #[arg(long = "ca", value_name = "PEM")]
        ca: Option<PathBuf>,
        /// Agent configuration file.
        #[arg(long, default_value = "config.ini")]
        config: PathBuf,
    },
    /// Run the hub: agent gateway, provisioning engine and admin API.
    Hub {
        /// Hub configuration file.
        #[arg(long, default_value = "hub.toml")]
        config: PathBuf,
        #[command(subcommand)]
        action: Option<HubAction>,
    },
    /// Run a full synchronisation of one application now and print its result.
    Sync {
        /// Application name (an [apps.<name>] table of hub.toml).
        app: String,
        /// Hub configuration file (for the admin API address and token).
        #[arg(long, default_value = "hub.toml")]
        config: PathBuf,
    },
    /// Hub, agent and a SCIM server on loopback: provision a sample directory and show it.
    Demo {
        /// Users granted access in the sample directory.
        #[arg(long, default_value_t = 500)]
        users: usize,
        /// Keep the demo's folder (configs, certificates, directory, hub state) after it ends.
        #[arg(long)]
        keep: bool,
    },
}

#[derive(Subcommand)]
enum HubAction {
    /// Ask the running hub (admin API) for its services, connected agents and targets, and
    /// each application's run and Last Sync. Exit 0 when no app's last sync failed.
    Status {
        /// Hub configuration file (for the admin API address and token); default: the one
        /// given to `connect hub`, else hub.toml.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print JSON instead of the readable listing.
        #[arg(long)]
        json: bool,
    },
}

/// The documented spellings are single-dash (`-override`); clap wants two dashes.
fn normalise_args() -> Vec<String> {
    const SINGLE_DASH: &[&str] = &[
        "-always-tls",
        "-no-tls",
        "-insecure-allow-skip-tls-check",
        "-override",
        "-ca",
        "-config",
    ];
    std::env::args()
        .map(|a| {
            let flag = a.split('=').next().unwrap_or(&a);
            if SINGLE_DASH.contains(&flag) {
                format!("-{a}")
            } else {
                a
            }
        })
        .collect()
}

fn main() -> ExitCode {
    let cli = Cli::parse_from(normalise_args());
    let quiet = matches!(
        cli.command,
        Command::Demo { .. }
            | Command::Sync { .. }
            | Command::SetTarget { .. }
            | Command::Hub {
                action: Some(_),
                ..
            }
            | Command::Status { .. }
    );
    logging::init(if quiet { "warn" } else { "info" });
    match cli.command {
        Command::SetTarget {
            name,
            addr,
            always_tls,
            no_tls,
            insecure_allow_skip_tls_check,
            override_existing,
            ca,
            config,
        } => set_target(
            config,
            SetTarget {
                name,
                addr,
                tls: if always_tls {
                    TlsMode::Always
                } else if no_tls {
                    TlsMode::Never
                } else {
                    TlsMode::FromScheme
                },
                insecure_allow_skip_tls_check,
                override_existing,
                ca,
            },
        ),
        Command::Run { config } => runtime().block_on(run_agent(config)),
        Command::Status { json, config } => runtime().block_on(status(config, json)),
        Command::Hub {
            config,
            action: None,
        } => runtime().block_on(run_hub(config)),
        Command::Hub {
            config,
            action: Some(HubAction::Status { config: own, json }),
        } => runtime().block_on(hub_status(own.unwrap_or(config), json)),
        Command::Sync { app, config } => runtime().block_on(sync(app, config)),
        Command::Demo { users, keep } => runtime().block_on(async move {
            match demo::run::run(users, keep).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("demo failed: {e}");
                    ExitCode::FAILURE
                }
            }
        }),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("cannot start the async runtime")
}

fn set_target(config: PathBuf, change: SetTarget) -> ExitCode {
    match agent::set_target(&config, &change) {
        Ok(SetTargetOutcome::Added) => {
            println!(
                "{}: added target `{}` → {}",
                config.display(),
                change.name,
                change.addr
            );
            ExitCode::SUCCESS
        }
        Ok(SetTargetOutcome::Replaced) => {
            println!(
                "{}: replaced target `{}` → {}",
                config.display(),
                change.name,
                change.addr
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

async fn run_agent(path: PathBuf) -> ExitCode {
    let config = match AgentConfig::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let agent = match actors::agent::run::start(&config).await {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    tracing::info!(config = %path.display(), targets = config.targets.len(), "agent started");
    let stop = shutdown_signal().await;
    tracing::info!("{stop}: saying goodbye to the hub");
    agent.shutdown().await;
    ExitCode::SUCCESS
}

async fn status(path: PathBuf, json: bool) -> ExitCode {
    let state_dir = match AgentConfig::state_dir_of(&path) {
        Ok(dir) => dir,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let socket = actors::agent::control::socket_path(&state_dir);
    match actors::agent::control::query(&socket).await {
        Ok(report) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                print!("{}", actors::agent::control::render(&report));
            }
            if report.session.connected {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_NOT_CONNECTED)
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_NO_AGENT)
        }
    }
}

async fn run_hub(path: PathBuf) -> ExitCode {
    let config = match HubConfig::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let hub = match actors::hub::start(&config, Default::default()).await {
        Ok(h) => h,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match hub.run_until(shutdown_signal()).await {
        Some(stop) => {
            tracing::info!("{stop}: hub stopped");
            ExitCode::SUCCESS
        }
        None => {
            tracing::error!("the hub stopped after a component failure");
            ExitCode::FAILURE
        }
    }
}

async fn sync(app: String, path: PathBuf) -> ExitCode {
    let config = match HubConfig::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match admin_client::sync_now(config.admin.listen, &config.admin.token, &app).await {
        Ok(outcome) => {
            println!("{}", admin_client::describe_sync(&outcome));
            if outcome.run.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn hub_status(path: PathBuf, json: bool) -> ExitCode {
    let config = match HubConfig::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let status = match admin_client::hub_status(config.admin.listen, &config.admin.token).await {
        Ok(status) => status,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if json {
        match serde_json::to_string_pretty(&status) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("error: cannot render the status as JSON: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        println!(
            "hub admin API {}\n{}",
            config.admin.listen,
            admin_client::describe_status(&status, std::time::SystemTime::now())
        );
    }
    if status.healthy() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Resolves on SIGTERM or SIGINT and says which.
async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("cannot watch SIGTERM");
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
    }
}
