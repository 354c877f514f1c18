//! The command line as a user types it: `connect demo` end to end, and `connect set-target`
//! with the single-dash flags of the platform's documentation.

mod common;

use std::process::Command;

use common::connect_bin;

fn connect(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(connect_bin())
        .args(args)
        .output()
        .expect("run connect");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn demo_provisions_then_applies_one_of_each_change() {
    let (code, out, err) = connect(&["demo"]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    let runs: Vec<&str> = out.lines().filter(|l| l.starts_with("run ")).collect();
    assert_eq!(runs.len(), 2, "{out}");
    assert!(
        runs[0].contains("created 500, updated 0, deprovisioned 0"),
        "{out}"
    );
    assert!(
        runs[1].contains("created 1, updated 1, deprovisioned 1"),
        "{out}"
    );
    assert!(out.contains("the SCIM server now holds 500 users"), "{out}");
    // The three granted groups follow: created with all 500 members, then one leaver and one
    // newcomer change two of them.
    assert!(
        runs[0].contains("groups: desired 3 — 3 created, 0 updated, 0 deleted")
            && runs[0].contains("members 500 added, 0 removed"),
        "{out}"
    );
    assert!(
        runs[1].contains("0 created, 2 updated, 0 deleted, 1 unchanged")
            && runs[1].contains("members 1 added, 1 removed"),
        "{out}"
    );
}

const BASE: &str = "# agent\nservice_id = 0123456789abcdef0123\nhub = wss://hub.example.com/v1/connect ; the hub\n\n[target.crm]\naddr = 10.0.0.1:443 # the CRM\nalways_tls = false\nno_tls = false\ninsecure_allow_skip_tls_check = false\n";

#[test]
fn set_target_single_dash_flags_edit_config_ini() {
    let dir = tempfile::tempdir().unwrap();
    let ini = dir.path().join("config.ini");
    std::fs::write(&ini, BASE).unwrap();
    let path = ini.to_str().unwrap();

    let (code, out, err) = connect(&[
        "set-target",
        "wiki",
        "wiki.lan:8443",
        "-always-tls",
        "-insecure-allow-skip-tls-check",
        "-config",
        path,
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let text = std::fs::read_to_string(&ini).unwrap();
    assert!(
        text.starts_with(BASE),
        "existing lines and comments kept:\n{text}"
    );
    assert!(
        text.contains("[target.wiki]\naddr = wiki.lan:8443\nalways_tls = true"),
        "{text}"
    );
    assert!(
        text.contains("insecure_allow_skip_tls_check = true"),
        "{text}"
    );

    // An existing name needs -override; the file stays as it was.
    let (code, _, err) = connect(&["set-target", "crm", "10.0.0.2:443", "-config", path]);
    assert_eq!(code, 2);
    assert!(err.contains("-override"), "{err}");
    assert_eq!(std::fs::read_to_string(&ini).unwrap(), text);

    let (code, out, err) = connect(&[
        "set-target",
        "crm",
        "10.0.0.2:443",
        "-no-tls",
        "-override",
        "-config",
        path,
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let replaced = std::fs::read_to_string(&ini).unwrap();
    assert!(
        replaced.contains("[target.crm]\naddr = 10.0.0.2:443\nalways_tls = false\nno_tls = true"),
        "{replaced}"
    );
    assert!(
        replaced.contains("# agent\n") && replaced.contains("; the hub"),
        "{replaced}"
    );

    // Bad address and bad name: one clear line, exit 2, file untouched.
    for args in [["bad", "no-port-here"], ["bad name!", "10.0.0.3:80"]] {
        let (code, _, err) = connect(&["set-target", args[0], args[1], "-config", path]);
        assert_eq!(code, 2, "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert_eq!(std::fs::read_to_string(&ini).unwrap(), replaced);
    }
}

#[test]
fn set_target_ca_flag_checks_the_file_and_writes_its_absolute_path() {
    let dir = tempfile::tempdir().unwrap();
    let ini = dir.path().join("config.ini");
    std::fs::write(&ini, BASE).unwrap();
    let ca = scim_connect::certs::TestCa::new("hr CA").unwrap();
    std::fs::write(dir.path().join("hr-ca.pem"), ca.cert_pem()).unwrap();
    std::fs::write(dir.path().join("not-a-ca.pem"), "hello\n").unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(connect_bin())
            .current_dir(dir.path())
            .args(args)
            .output()
            .expect("run connect");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    // A relative -ca is taken from the current folder and written absolute.
    let (code, err) = run(&[
        "set-target",
        "hr",
        "hr.lan:443",
        "-ca",
        "hr-ca.pem",
        "-config",
        "config.ini",
    ]);
    assert_eq!(code, 0, "{err}");
    let text = std::fs::read_to_string(&ini).unwrap();
    assert!(
        text.ends_with(&format!(
            "[target.hr]\naddr = hr.lan:443\nalways_tls = false\nno_tls = false\ninsecure_allow_skip_tls_check = false\nca = {}\n",
            dir.path().join("hr-ca.pem").display()
        )),
        "{text}"
    );

    // A file that holds no certificate: one line, exit 2, config.ini untouched.
    let (code, err) = run(&[
        "set-target",
        "hr2",
        "hr.lan:443",
        "-ca=not-a-ca.pem",
        "-config",
        "config.ini",
    ]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("CA file \"not-a-ca.pem\" is invalid")
            && err.contains("holds no PEM certificate"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&ini).unwrap(), text);
}
