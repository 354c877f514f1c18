//! TLS toward targets, the whole matrix, end to end: `connect hub` and `connect run` as
//! processes, a real scim2-server (one tenant per application) behind TLS fronts — one with a
//! self-signed certificate, one with a certificate of a private CA that the agent is given as a
//! target's `ca` PEM file — and `connect sync <app>` for every combination of
//!
//!   base URL scheme (http / https) × target from-scheme / always_tls / no_tls
//!   × target insecure_allow_skip_tls_check × app skip_tls_check × server certificate.
//!
//! Each combination either provisions (created 11) or fails with the one-line cause that names
//! the fix. The base URLs name `scim.test`, which does not resolve: reaching the front at all
//! proves the TCP address comes from the target, and the front records that SNI and `Host`
//! come from the base URL.

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;

use common::deploy::{deploy, App, DeploySpec, Target, SCIM_TOKEN};
use common::tls_front::TlsFront;
use common::Scim2Server;
use scim_connect::certs::{self, TestCa};

/// The host every base URL names; only the certificates know it.
const HOST: &str = "scim.test";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Server {
    SelfSigned,
    PrivateCa,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    FromScheme,
    Always,
    Never,
}

/// One combination of the matrix.
#[derive(Debug, Clone)]
struct Case {
    app: String,
    target: String,
    https: bool,
    mode: Mode,
    allow_skip: bool,
    skip: bool,
    server: Server,
}

/// What a combination must produce: success, or a failure whose cause holds every fragment.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    Ok,
    Fails(Vec<String>),
}

fn target_name(server: Server, mode: Mode, allow_skip: bool) -> String {
    format!(
        "{}-{}-{}",
        match server {
            Server::SelfSigned => "selfsigned",
            Server::PrivateCa => "privateca",
        },
        match mode {
            Mode::FromScheme => "fromscheme",
            Mode::Always => "always",
            Mode::Never => "notls",
        },
        if allow_skip { "allowskip" } else { "strict" }
    )
}

/// DESIGN §4: TLS from the scheme unless the target overrides it; certificate checks skipped
/// only when the app asks *and* the target allows; otherwise the cause names the fix.
fn expected(case: &Case) -> Expect {
    let tls = match case.mode {
        Mode::Always => true,
        Mode::Never => false,
        Mode::FromScheme => case.https,
    };
    if !tls {
        let fix = if case.mode == Mode::Never {
            "is declared with -no-tls: declare it again without -no-tls".to_string()
        } else {
            format!(
                "use an https:// base URL for the application, or declare target `{}` with -always-tls",
                case.target
            )
        };
        return Expect::Fails(vec![
            "TLS".into(),
            "plain HTTP was sent, but the target answered in TLS".into(),
            fix,
        ]);
    }
    if case.allow_skip && case.skip {
        return Expect::Ok;
    }
    match case.server {
        Server::PrivateCa => Expect::Ok,
        Server::SelfSigned => {
            let mut fragments = vec!["TLS".to_string(), "self-signed certificate".to_string()];
            fragments.push(match (case.allow_skip, case.skip) {
                (false, false) => "declare the target with -insecure-allow-skip-tls-check and enable skip_tls_check on the application".to_string(),
                (true, false) => format!(
                    "target `{}` allows skipping certificate checks, but the application does not ask for it: enable skip_tls_check on the application",
                    case.target
                ),
                (false, true) => format!(
                    "the application asks to skip certificate checks, but target `{}` was not declared with -insecure-allow-skip-tls-check",
                    case.target
                ),
                (true, true) => unreachable!(),
            });
            Expect::Fails(fragments)
        }
    }
}

/// `connect sync` output: verdict line, then `  cause: …` when it failed.
fn cause_of(output: &str) -> Option<&str> {
    output
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("cause: "))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_tls_combination_provisions_or_names_the_fix() {
    let scim = Scim2Server::start_with_tenants(Some(SCIM_TOKEN)).await;
    let private_ca = TestCa::new("private SCIM CA").unwrap();
    let ca_dir = tempfile::tempdir().unwrap();
    let ca_file = ca_dir.path().join("private-ca.pem");
    std::fs::write(&ca_file, private_ca.cert_pem()).unwrap();
    let fronts: BTreeMap<&str, TlsFront> = [
        (
            "selfsigned",
            TlsFront::start(&certs::self_signed(&[HOST]).unwrap(), scim.addr()),
        ),
        (
            "privateca",
            TlsFront::start(&private_ca.issue(&[HOST]).unwrap(), scim.addr()),
        ),
    ]
    .into_iter()
    .collect();
    let front_of = |server: Server| match server {
        Server::SelfSigned => &fronts["selfsigned"],
        Server::PrivateCa => &fronts["privateca"],
    };

    let mut targets = Vec::new();
    let mut cases = Vec::new();
    for server in [Server::SelfSigned, Server::PrivateCa] {
        for mode in [Mode::FromScheme, Mode::Always, Mode::Never] {
            for allow_skip in [false, true] {
                let name = target_name(server, mode, allow_skip);
                let mut target = Target::new(&name, front_of(server).addr.to_string());
                match mode {
                    Mode::Always => target = target.with("always_tls = true"),
                    Mode::Never => target = target.with("no_tls = true"),
                    Mode::FromScheme => {}
                }
                if allow_skip {
                    target = target.with("insecure_allow_skip_tls_check = true");
                }
                if server == Server::PrivateCa {
                    target = target.with(&format!("ca = {}", ca_file.display()));
                }
                targets.push(target);
                for https in [false, true] {
                    for skip in [false, true] {
                        cases.push(Case {
                            app: format!(
                                "{name}-{}-{}",
                                if https { "https" } else { "http" },
                                if skip { "skip" } else { "check" }
                            ),
                            target: name.clone(),
                            https,
                            mode,
                            allow_skip,
                            skip,
                            server,
                        });
                    }
                }
            }
        }
    }
    // Beyond the matrix: the private CA's server without its `ca`, a name the certificate does
    // not carry, and a plain-HTTP server reached with and without TLS.
    targets.push(Target::new(
        "privateca-noca",
        fronts["privateca"].addr.to_string(),
    ));
    targets.push(Target::new("plain", scim.addr().to_string()));
    let extra: Vec<(&str, String, &str, Expect)> = vec![
        (
            "privateca-noca-https-check",
            format!("https://{HOST}:{}", fronts["privateca"].port()),
            "privateca-noca",
            Expect::Fails(vec![
                "TLS".into(),
                "unknown issuer: the target's certificate is signed by a CA this agent does not trust".into(),
                "trust its CA with `ca = <PEM file>` on target `privateca-noca`".into(),
            ]),
        ),
        (
            "privateca-wrongname-https-check",
            format!("https://other.test:{}", fronts["privateca"].port()),
            &cases
                .iter()
                .find(|c| c.server == Server::PrivateCa && c.mode == Mode::FromScheme && !c.allow_skip)
                .unwrap()
                .target,
            Expect::Fails(vec![
                "TLS".into(),
                "certificate is not valid for host \"other.test\" (it names scim.test)".into(),
                "use one of those names in the application's base URL".into(),
            ]),
        ),
        (
            "plain-https-check",
            format!("https://{HOST}:{}", scim.port),
            "plain",
            Expect::Fails(vec![
                "TLS".into(),
                "does not speak TLS on this port".into(),
                "declare target `plain` with -no-tls".into(),
            ]),
        ),
        (
            "plain-http-check",
            format!("http://{HOST}:{}", scim.port),
            "plain",
            Expect::Ok,
        ),
    ];

    let mut apps: Vec<App> = cases
        .iter()
        .map(|c| {
            let base = format!(
                "{}://{HOST}:{}{}",
                if c.https { "https" } else { "http" },
                front_of(c.server).port(),
                Scim2Server::tenant_path(&c.app)
            );
            App::new(&c.app, &base, &c.target).with(&format!("skip_tls_check = {}", c.skip))
        })
        .collect();
    for (app, origin, target, _) in &extra {
        let base = format!("{origin}{}", Scim2Server::tenant_path(app));
        apps.push(App::new(app, &base, target));
    }
    let mut wanted: Vec<(String, Expect)> =
        cases.iter().map(|c| (c.app.clone(), expected(c))).collect();
    wanted.extend(
        extra
            .iter()
            .map(|(app, _, _, e)| (app.to_string(), e.clone())),
    );

    let d = deploy(DeploySpec::new(apps, targets)).await;
    d.wait_for_agent("plain").await;

    // Several `connect sync` at once: each is its own process and the hub runs apps in
    // parallel, so the whole matrix takes a few seconds.
    let results: BTreeMap<String, (i32, String)> = std::thread::scope(|scope| {
        let chunks: Vec<Vec<String>> = wanted
            .chunks(wanted.len().div_ceil(6))
            .map(|chunk| chunk.iter().map(|(app, _)| app.clone()).collect())
            .collect();
        let d = &d;
        let workers: Vec<_> = chunks
            .into_iter()
            .map(|apps| {
                scope.spawn(move || {
                    apps.into_iter()
                        .map(|app| {
                            let out = d.sync(&app);
                            (app, out)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });

    let mut table = String::from("app | expected | got\n");
    let mut wrong = Vec::new();
    for (app, expect) in &wanted {
        let (code, out) = &results[app];
        let got_ok = *code == 0 && out.contains("sync ok") && out.contains("created 11");
        let cause = cause_of(out).unwrap_or("").to_string();
        let matches = match expect {
            Expect::Ok => got_ok,
            Expect::Fails(fragments) => {
                *code != 0 && fragments.iter().all(|f| cause.contains(f.as_str()))
            }
        };
        let _ = writeln!(
            table,
            "{app} | {} | {}",
            match expect {
                Expect::Ok => "ok".to_string(),
                Expect::Fails(_) => "fails".to_string(),
            },
            if got_ok {
                "ok".to_string()
            } else {
                cause.clone()
            }
        );
        if !matches {
            wrong.push(format!(
                "{app}: expected {expect:?}, `connect sync` said ({code}):\n{out}"
            ));
        }
    }
    println!("{table}");
    assert!(
        wrong.is_empty(),
        "{} of {} combinations differ:\n{}\n{}",
        wrong.len(),
        wanted.len(),
        wrong.join("\n"),
        d.logs()
    );

    // The engine's diagnosis of the most common mistake, word for word where it matters: a
    // self-signed server, https, neither skip setting.
    let (_, out) = &results["selfsigned-fromscheme-strict-https-check"];
    let cause = cause_of(out).unwrap();
    assert!(cause.starts_with("TLS"), "{cause}");
    for needed in [
        "self-signed",
        "-insecure-allow-skip-tls-check",
        "skip_tls_check",
    ] {
        assert!(cause.contains(needed), "{cause}");
    }

    // SNI and Host come from the base URL, whatever address the target has.
    for (name, front) in &fronts {
        let seen = front.seen();
        let completed: Vec<_> = seen.iter().filter(|s| s.handshake_ok).collect();
        assert!(!completed.is_empty(), "{name}: no TLS connection completed");
        for s in completed {
            assert_eq!(s.server_name.as_deref(), Some(HOST), "{name}: {s:?}");
            if !s.head.is_empty() {
                let host = format!("host: {HOST}:{}", front.port());
                assert!(s.head.to_ascii_lowercase().contains(&host), "{name}: {s:?}");
            }
        }
    }
}
