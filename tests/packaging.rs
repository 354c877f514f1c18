//! Linux packaging: `packaging/setup.sh` installing into a temporary root (its dry mode prints
//! the user creation and systemctl steps instead of running them), and the systemd unit checked
//! by `systemd-analyze verify` and `systemd-analyze security`.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::connect_bin;
use scim_connect::config::agent::AgentConfig;

const INSTALL_DIR: &str = "opt/connect";
const STATE_DIR: &str = "var/lib/connect";
const UNIT: &str = "etc/systemd/system/connect-agent.service";
/// The unit's exposure score (`systemd-analyze security`, 0 best … 10 worst) may not get worse
/// than this without someone deciding so.
const MAX_EXPOSURE: f64 = 2.0;

fn packaging() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging")
}

fn setup(args: &[&str]) -> Output {
    Command::new("bash")
        .arg(packaging().join("setup.sh"))
        .args(args)
        .output()
        .expect("run setup.sh")
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn install_into(root: &Path, extra: &[&str]) -> Output {
    let bin = connect_bin();
    let mut args = vec![
        "--root",
        root.to_str().unwrap(),
        "--binary",
        bin.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = setup(&args);
    assert!(out.status.success(), "{}", text(&out));
    out
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// `key=value` lines of the unit's `[Service]` section.
fn service_lines(unit: &str) -> Vec<(String, String)> {
    unit.lines()
        .skip_while(|l| l.trim() != "[Service]")
        .skip(1)
        .take_while(|l| !l.starts_with('['))
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn value<'a>(lines: &'a [(String, String)], key: &str) -> Option<&'a str> {
    lines
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

#[test]
fn setup_installs_into_a_temporary_root_and_only_prints_system_changes() {
    let host_unit = Path::new("/").join(UNIT);
    let host_unit_before = host_unit.exists();
    let root = tempfile::tempdir().unwrap();
    let out = install_into(root.path(), &[]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();

    // The binary, identical to the one built, runnable.
    let bin = root.path().join(INSTALL_DIR).join("connect");
    assert_eq!(mode(&bin), 0o755);
    assert_eq!(
        std::fs::read(&bin).unwrap(),
        std::fs::read(connect_bin()).unwrap()
    );
    let version = Command::new(&bin).arg("--version").output().unwrap();
    assert!(version.status.success(), "{}", text(&version));

    // config.ini: the sample, private, with the state directory the unit expects.
    let config = root.path().join(INSTALL_DIR).join("config.ini");
    assert_eq!(mode(&config), 0o600);
    let parsed = AgentConfig::load(&config).unwrap();
    assert_eq!(parsed.state_dir, Path::new("/").join(STATE_DIR));
    assert_eq!(mode(&root.path().join(STATE_DIR)), 0o700);

    // The unit, whose paths are those of the installed files.
    let unit = std::fs::read_to_string(root.path().join(UNIT)).unwrap();
    let lines = service_lines(&unit);
    let exec = value(&lines, "ExecStart").unwrap();
    let mut words = exec.split_whitespace();
    let exec_bin = words.next().unwrap();
    assert_eq!(
        root.path().join(exec_bin.trim_start_matches('/')),
        bin,
        "{exec}"
    );
    assert_eq!(words.next(), Some("run"), "{exec}");
    assert_eq!(words.next(), Some("--config"), "{exec}");
    assert_eq!(
        root.path()
            .join(words.next().unwrap().trim_start_matches('/')),
        config,
        "{exec}"
    );
    assert_eq!(value(&lines, "User"), Some("connect"));

    // Dry mode: the system is left alone, the steps are shown.
    assert!(
        stdout.contains("dry run, would run: useradd --system --user-group")
            && stdout.contains(" connect\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("dry run, would run: systemctl daemon-reload\n")
            && stdout.contains("dry run, would run: systemctl enable connect-agent.service\n"),
        "{stdout}"
    );
    assert_eq!(host_unit.exists(), host_unit_before, "the host was touched");
}

#[test]
fn rerunning_upgrades_the_binary_and_keeps_an_edited_config() {
    let root = tempfile::tempdir().unwrap();
    install_into(root.path(), &[]);
    let config = root.path().join(INSTALL_DIR).join("config.ini");
    let edited = "# edited by the administrator\nservice_id = svc-packaging-0123456789\nstate_dir = /var/lib/connect\nhub = wss://hub.example.com/v1/connect\n";
    std::fs::write(&config, edited).unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let bin = root.path().join(INSTALL_DIR).join("connect");
    std::fs::write(&bin, b"old binary").unwrap();

    let out = install_into(root.path(), &[]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("kept the existing"),
        "{}",
        text(&out)
    );
    assert_eq!(std::fs::read_to_string(&config).unwrap(), edited);
    assert_eq!(mode(&config), 0o600, "the mode is narrowed again");
    assert_eq!(
        std::fs::read(&bin).unwrap(),
        std::fs::read(connect_bin()).unwrap()
    );
    // No temporary file left in the install folder.
    let names: Vec<_> = std::fs::read_dir(root.path().join(INSTALL_DIR))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(sorted, ["config.ini", "connect"], "{names:?}");
}

#[test]
fn files_belong_to_the_service_user() {
    // chown needs root; this test runs as root in CI and on the project's machines.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: ownership can only be given away by root");
        return;
    }
    // `nobody` exists everywhere, so the real chown path runs inside the temporary root.
    let root = tempfile::tempdir().unwrap();
    let out = install_into(root.path(), &["--user", "nobody"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("user nobody exists"), "{stdout}");
    let nobody = Command::new("id").args(["-u", "nobody"]).output().unwrap();
    let uid: u32 = String::from_utf8_lossy(&nobody.stdout)
        .trim()
        .parse()
        .unwrap();
    let group = Command::new("id").args(["-gn", "nobody"]).output().unwrap();
    let group = String::from_utf8_lossy(&group.stdout).trim().to_string();
    for (path, want_mode) in [
        (root.path().join(INSTALL_DIR).join("config.ini"), 0o600),
        (root.path().join(STATE_DIR), 0o700),
    ] {
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.uid(), uid, "{}", path.display());
        assert_eq!(mode(&path), want_mode, "{}", path.display());
    }
    // The binary stays root's: the service user must not be able to replace it.
    let bin = std::fs::metadata(root.path().join(INSTALL_DIR).join("connect")).unwrap();
    assert_eq!(bin.uid(), 0);
    let unit = std::fs::read_to_string(root.path().join(UNIT)).unwrap();
    let lines = service_lines(&unit);
    assert_eq!(value(&lines, "User"), Some("nobody"));
    assert_eq!(value(&lines, "Group"), Some(group.as_str()));
}

#[test]
fn setup_refuses_bad_arguments_with_one_line() {
    let root = tempfile::tempdir().unwrap();
    let missing = root.path().join("no-such-binary");
    for (args, want) in [
        (
            vec![
                "--root",
                root.path().to_str().unwrap(),
                "--binary",
                missing.to_str().unwrap(),
            ],
            "not found or not executable",
        ),
        (vec!["--frobnicate"], "unknown option --frobnicate"),
        (
            vec![
                "--root",
                root.path().to_str().unwrap(),
                "--user",
                "Bad User",
            ],
            "--user Bad User: use lower-case letters",
        ),
    ] {
        let out = setup(&args);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{}", text(&out));
        assert!(stderr.contains(want), "{}", text(&out));
    }
    assert!(!root.path().join(INSTALL_DIR).exists());
}

#[test]
fn the_unit_is_hardened_and_verifies() {
    let unit_path = packaging().join("connect-agent.service");
    let unit = std::fs::read_to_string(&unit_path).unwrap();
    let lines = service_lines(&unit);
    for (key, want) in [
        ("User", "connect"),
        ("Group", "connect"),
        ("Restart", "on-failure"),
        ("RestartPreventExitStatus", "2"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("CapabilityBoundingSet", ""),
        ("StateDirectory", "connect"),
        ("StateDirectoryMode", "0700"),
        ("KillSignal", "SIGTERM"),
    ] {
        assert_eq!(
            value(&lines, key),
            Some(want),
            "{key} in {}",
            unit_path.display()
        );
    }
    assert!(unit.contains("\nWantedBy=multi-user.target\n"));

    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: systemd-analyze is not installed");
        return;
    }
    // verify checks that ExecStart's binary exists: point a copy at the one just built.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("connect-agent.service");
    std::fs::write(
        &copy,
        unit.replace(
            "ExecStart=/opt/connect/connect ",
            &format!("ExecStart={} ", connect_bin().display()),
        ),
    )
    .unwrap();
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    assert!(verify.status.success(), "{}", text(&verify));
    assert_eq!(
        String::from_utf8_lossy(&verify.stderr),
        "",
        "systemd-analyze verify complains"
    );

    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&copy)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&security.stdout).into_owned();
    let exposure = report
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for connect-agent.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|score| score.parse::<f64>().ok());
    match exposure {
        Some(score) => assert!(
            score <= MAX_EXPOSURE,
            "exposure {score} > {MAX_EXPOSURE}:\n{report}"
        ),
        None => eprintln!(
            "skipped: this systemd-analyze has no offline security report\n{}",
            text(&security)
        ),
    }
}
