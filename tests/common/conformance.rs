//! The `scim2-tester` conformance checker (PyPI), run through `scim2 … test` from `scim2-cli`,
//! and its report in a form two runs can be compared in.
//!
//! The report is the checker's own text: one `STATUS check_name` line per check and, under it,
//! the check's reason. The reasons name the resources the run created (server-assigned ids, the
//! checker's own random UUIDs) and the run's base URL, which legitimately differ between two runs;
//! [`Scim2TesterReport::normalized`] replaces exactly those with placeholders and keeps
//! everything else. (`-v` is not used: it adds the resources themselves, whose list order follows
//! the random ids, so two runs against the same server already differ there.)

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use super::scim2_server_bin;

/// Upper bound for one checker run (about 2 s against a local scim2-server).
const TESTER_TIMEOUT: Duration = Duration::from_secs(120);

/// The `scim2` command: `$SCIM2_CLI_BIN`, else next to the scim2-server in use (same venv).
pub fn scim2_cli_bin() -> PathBuf {
    match std::env::var_os("SCIM2_CLI_BIN") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => scim2_server_bin().with_file_name("scim2"),
    }
}

/// One run of the checker.
#[derive(Debug, Clone)]
pub struct Scim2TesterReport {
    /// The URL the checker was pointed at.
    pub url: String,
    /// Exit code: 0 when every check succeeded.
    pub code: i32,
    /// What it printed (stdout, then stderr).
    pub text: String,
    /// How long the run took.
    pub elapsed: Duration,
}

impl Scim2TesterReport {
    /// Runs `scim2 --url <url> test` with `authorization` as the `Authorization` header, passed
    /// in the environment (`SCIM_CLI_HEADERS`) so that it never shows in a process listing.
    /// Blocking; call it from `spawn_blocking` to run several at once.
    pub fn run(url: &str, authorization: &str) -> Scim2TesterReport {
        let bin = scim2_cli_bin();
        assert!(
            bin.exists(),
            "scim2 (scim2-cli) not found at {}: run ./scripts/test.sh (it installs scim2-cli and \
             scim2-tester into .venv)",
            bin.display()
        );
        let started = Instant::now();
        let mut child = Command::new(&bin)
            .args(["--url", url, "test"])
            .env(
                "SCIM_CLI_HEADERS",
                format!("Authorization: {authorization}"),
            )
            .env("PYTHONUNBUFFERED", "1")
            // click colours only a terminal, but say so: the report is compared as text.
            .env("NO_COLOR", "1")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("could not run {}: {e}", bin.display()));
        // Read both pipes on threads so that a full pipe cannot stall the child.
        let mut stdout = child.stdout.take().expect("piped stdout");
        let mut stderr = child.stderr.take().expect("piped stderr");
        let out = std::thread::spawn(move || {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut stdout, &mut s).map(|_| s)
        });
        let err = std::thread::spawn(move || {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut stderr, &mut s).map(|_| s)
        });
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for scim2") {
                break status;
            }
            if started.elapsed() > TESTER_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                panic!("scim2 test against {url} did not finish within {TESTER_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let text = format!(
            "{}{}",
            out.join().expect("stdout reader").unwrap_or_default(),
            err.join().expect("stderr reader").unwrap_or_default()
        );
        Scim2TesterReport {
            url: url.to_owned(),
            code: status.code().unwrap_or(-1),
            text,
            elapsed: started.elapsed(),
        }
    }

    /// The `(status, check)` pairs, in order.
    pub fn checks(&self) -> Vec<(&str, &str)> {
        self.text
            .lines()
            .filter(|line| !line.starts_with(' '))
            .filter_map(|line| line.split_once(' '))
            .filter(|(status, _)| {
                !status.is_empty() && status.chars().all(|c| c.is_ascii_uppercase() || c == '_')
            })
            .collect()
    }

    /// The report with what legitimately differs between two runs replaced: the run's own URL
    /// (`<base>`), any `host:port` of 127.0.0.1 or `*.example` (`<host>`), UUIDs (`<uuid>`),
    /// 32-digit hex ids (`<id>`) and RFC 3339 timestamps (`<time>`).
    pub fn normalized(&self) -> String {
        let text = self.text.replace(self.url.trim_end_matches('/'), "<base>");
        text.lines()
            .map(normalize_line)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// One line of a report, normalised as [`Scim2TesterReport::normalized`] says.
pub fn normalize_line(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while !rest.is_empty() {
        if let Some(n) = uuid_at(rest) {
            out.push_str("<uuid>");
            rest = &rest[n..];
        } else if let Some(n) = hex_id_at(rest) {
            out.push_str("<id>");
            rest = &rest[n..];
        } else if let Some(n) = timestamp_at(rest) {
            out.push_str("<time>");
            rest = &rest[n..];
        } else if let Some(n) = host_at(rest) {
            out.push_str("<host>");
            rest = &rest[n..];
        } else {
            let c = rest.chars().next().expect("rest is not empty");
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

fn hex_run(s: &str) -> usize {
    s.bytes()
        .take_while(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
        .count()
}

/// Length of an 8-4-4-4-12 lower-case UUID at the start of `s`.
fn uuid_at(s: &str) -> Option<usize> {
    let mut pos = 0;
    for (i, len) in [8, 4, 4, 4, 12].into_iter().enumerate() {
        if i > 0 {
            if s.as_bytes().get(pos) != Some(&b'-') {
                return None;
            }
            pos += 1;
        }
        if hex_run(&s[pos..]) != len {
            return None;
        }
        pos += len;
    }
    Some(pos)
}

/// Length of a 32-digit hex id (scim2-server's ids) at the start of `s`.
fn hex_id_at(s: &str) -> Option<usize> {
    (hex_run(s) == 32).then_some(32)
}

/// Length of an RFC 3339 timestamp (`2026-12-03T23:31:46.980445Z`, offset or fraction optional)
/// at the start of `s`.
fn timestamp_at(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    let digits = |from: usize, n: usize| {
        b.len() >= from + n && b[from..from + n].iter().all(u8::is_ascii_digit)
    };
    let at = |i: usize, c: u8| b.get(i) == Some(&c);
    let shape = digits(0, 4)
        && at(4, b'-')
        && digits(5, 2)
        && at(7, b'-')
        && digits(8, 2)
        && at(10, b'T')
        && digits(11, 2)
        && at(13, b':')
        && digits(14, 2)
        && at(16, b':')
        && digits(17, 2);
    if !shape {
        return None;
    }
    let mut n = 19;
    if at(n, b'.') {
        n += 1;
        while b.get(n).is_some_and(u8::is_ascii_digit) {
            n += 1;
        }
    }
    if at(n, b'Z') {
        n += 1;
    } else if (at(n, b'+') || at(n, b'-'))
        && digits(n + 1, 2)
        && at(n + 3, b':')
        && digits(n + 4, 2)
    {
        n += 6;
    }
    Some(n)
}

/// Length of `127.0.0.1:<port>` or `<name>.example:<port>` at the start of `s`.
fn host_at(s: &str) -> Option<usize> {
    let name_len = if s.starts_with("127.0.0.1") {
        "127.0.0.1".len()
    } else {
        let name = s
            .bytes()
            .take_while(|b| b.is_ascii_alphanumeric() || *b == b'.' || *b == b'-')
            .count();
        if !s[..name].ends_with(".example") {
            return None;
        }
        name
    };
    let port = s[name_len..]
        .strip_prefix(':')?
        .bytes()
        .take_while(u8::is_ascii_digit)
        .count();
    (port > 0).then_some(name_len + 1 + port)
}
