//! The agent's `config.ini`: loading and validating it, and `connect set-target`'s
//! comment-preserving edit of its `[target.<name>]` sections.
//!
//! Owns the meaning of every key in config.ini. It reads the PEM files the file names (`hub_ca`,
//! `proxy_ca`, a target's `ca`) when loading, so that a missing or unusable one is reported with
//! its line; it must never check `state_dir` on disk (the agent does that when it starts), never
//! rewrite a line `set-target` was not asked to change, and never leave a half-written
//! config.ini behind.
//!
//! Format: top-level `key = value` lines (`service_id`, `state_dir`, `proxy`, `proxy_ca`, `hub`,
//! `hub_ca`, `agent_name`), then `[target.<name>]` sections with `addr`, `always_tls`, `no_tls`,
//! `insecure_allow_skip_tls_check` and `ca`. `#` and `;` start comments, whole-line or trailing after a
//! space. Values may be double-quoted. Booleans: true/false, yes/no, 1/0. The secrets
//! (`service_id`, `proxy`) may also be `env:NAME` or come from a sibling `<key>_file`.

use std::collections::BTreeMap;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::RootCertStore;

use super::ini::{self, LineKind};
use super::netaddr::{parse_authority, split_scheme};
use super::secret::SecretSource;
use super::suggest::unknown_key_fix;
use super::{resolve_path, ConfigError, Secret};

/// Top-level keys of config.ini.
const TOP_KEYS: &[&str] = &[
    "service_id",
    "service_id_file",
    "state_dir",
    "proxy",
    "proxy_file",
    "proxy_ca",
    "hub",
    "hub_ca",
    "agent_name",
];

/// Keys of a `[target.<name>]` section.
const TARGET_KEYS: &[&str] = &[
    "addr",
    "always_tls",
    "no_tls",
    "insecure_allow_skip_tls_check",
    "ca",
];

/// Section name prefix of a target.
const TARGET_PREFIX: &str = "target.";

/// A service id shorter than this is too weak to key the end-to-end encryption.
pub const MIN_SERVICE_ID_LEN: usize = 16;

/// The validated agent configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// The file it was read from (used for reloads and `set-target`).
    pub path: PathBuf,
    /// The service id: the pre-shared key of the end-to-end layer. Never sent, never logged.
    pub service_id: Secret,
    /// Where the control socket and runtime files live; default `run` beside the config file.
    pub state_dir: PathBuf,
    /// The hub's websocket URL, always `wss://`, as written.
    pub hub: String,
    /// Extra PEM trust anchors for the hub's certificate.
    pub hub_ca: Option<PathBuf>,
    /// HTTP CONNECT proxy on the way to the hub.
    pub proxy: Option<ProxyConfig>,
    /// Extra PEM trust anchors for an `https://` proxy's own certificate.
    pub proxy_ca: Option<PathBuf>,
    /// A name for this agent shown at the hub (e.g. the VM's host name).
    pub agent_name: Option<String>,
    /// Declared targets by name; the agent never dials anything else.
    pub targets: BTreeMap<String, TargetConfig>,
    /// The line of each top-level key as written, for errors found after loading (e.g. a
    /// `state_dir` the agent cannot write).
    pub lines: BTreeMap<String, usize>,
}

impl AgentConfig {
    /// The 1-based line a top-level key was written on, if it was.
    pub fn line_of(&self, key: &str) -> Option<usize> {
        self.lines.get(key).copied()
    }
}

/// An HTTP CONNECT proxy, from `proxy = http(s)://user:pass@host:port`. `Debug` shows neither
/// the user name nor the password.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    /// `https://` proxy: TLS to the proxy itself.
    pub scheme_https: bool,
    /// Host name or IP (IPv6 without brackets).
    pub host: String,
    /// Port; defaults to 80 for http:// and 443 for https://.
    pub port: u16,
    /// Percent-decoded user name for `Proxy-Authorization: Basic`.
    pub username: Option<String>,
    /// Percent-decoded password.
    pub password: Option<Secret>,
}

impl std::fmt::Debug for ProxyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyConfig")
            .field("scheme_https", &self.scheme_https)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username.as_ref().map(|_| "***"))
            .field("password", &self.password)
            .finish()
    }
}

/// One declared target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetConfig {
    /// The name the hub uses to address it.
    pub name: String,
    /// `host:port` as written.
    pub addr: String,
    /// Whether to speak TLS to it.
    pub tls: TlsMode,
    /// The hub may ask to skip certificate checks for this target.
    pub insecure_allow_skip_tls_check: bool,
    /// The `ca` PEM file: trust anchors added to the system's for this target.
    pub ca: Option<PathBuf>,
    /// The certificates of `ca` (DER), read and checked when the file was loaded.
    pub ca_certs: Vec<CertificateDer<'static>>,
}

/// TLS toward a target.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TlsMode {
    /// TLS when the application's base URL is `https://`.
    #[default]
    FromScheme,
    /// Always TLS (`always_tls = true`).
    Always,
    /// Never TLS (`no_tls = true`).
    Never,
}

/// The hub URL split into what a connection needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubEndpoint {
    /// Host name or IP (IPv6 without brackets): DNS, SNI and the proxy's CONNECT target.
    pub host: String,
    /// Port, 443 unless written.
    pub port: u16,
    /// Path and query, at least `/`.
    pub path: String,
}

/// Checks a target name: 1 to 64 characters from `A-Z a-z 0-9 . _ -`.
pub fn validate_target_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the name is empty".into());
    }
    if name.chars().count() > 64 {
        return Err(format!(
            "the name is {} characters long, the limit is 64",
            name.chars().count()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{c:?} is not allowed; use letters, digits, `.`, `_` and `-`"
        ));
    }
    Ok(())
}

/// Checks a target address: `host:port` with a DNS name, IPv4 or `[IPv6]` host and a port in
/// 1..=65535.
pub fn validate_addr(addr: &str) -> Result<(), String> {
    if addr.contains("://") {
        return Err("write host:port without a scheme, e.g. 10.0.0.12:443".into());
    }
    if addr.contains('/') {
        return Err("write host:port without a path, e.g. 10.0.0.12:443".into());
    }
    if addr.chars().any(char::is_whitespace) {
        return Err("the address contains a space".into());
    }
    let a = parse_authority(addr)?;
    if a.port.is_none() {
        return Err("the port is missing; write host:port, e.g. 10.0.0.12:443".into());
    }
    Ok(())
}

/// Parses the hub URL; only `wss://` is accepted because the tunnel always runs over TLS.
pub fn parse_hub_url(url: &str) -> Result<HubEndpoint, String> {
    let Some((scheme, rest)) = split_scheme(url) else {
        return Err("not a URL; write it like wss://hub.example.com/v1/connect".into());
    };
    match scheme.as_str() {
        "wss" => {}
        "ws" => {
            return Err(
                "plain ws:// is not allowed, the tunnel always runs over TLS; use wss://".into(),
            )
        }
        "https" | "http" => {
            return Err(format!(
                "{scheme}:// is not a websocket URL; use wss:// with the same host and path"
            ))
        }
        other => return Err(format!("scheme `{other}` is not supported; use wss://")),
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    if authority.contains('@') {
        return Err(
            "the hub URL must not contain credentials; the service id authenticates the agent"
                .into(),
        );
    }
    if path.contains('#') {
        return Err("the hub URL must not contain a #fragment".into());
    }
    if url.chars().any(char::is_whitespace) {
        return Err("the URL contains a space".into());
    }
    let a = parse_authority(authority)?;
    Ok(HubEndpoint {
        host: a.bare_host,
        port: a.port.unwrap_or(443),
        path: if path.is_empty() {
            "/".into()
        } else {
            path.to_string()
        },
    })
}

/// Parses `http(s)://[user[:password]@]host[:port][/]`.
fn parse_proxy_url(url: &str) -> Result<ProxyConfig, String> {
    let Some((scheme, rest)) = split_scheme(url) else {
        return Err("not a URL; write it like http://proxy.example.com:3128".into());
    };
    let scheme_https = match scheme.as_str() {
        "http" => false,
        "https" => true,
        other => {
            return Err(format!(
                "scheme `{other}` is not supported; use http:// or https://"
            ))
        }
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    // The last `@` ends the credentials, so an unencoded `@` in a password still works.
    let (userinfo, hostport) = match rest.rfind('@') {
        Some(i) => (Some(&rest[..i]), &rest[i + 1..]),
        None => (None, rest),
    };
    if hostport.contains(['/', '?', '#']) {
        return Err(
            "a proxy URL has no path, query or fragment; write http(s)://[user:password@]host:port"
                .into(),
        );
    }
    let a = parse_authority(hostport)?;
    let decode = |s: &str, what: &str| -> Result<String, String> {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .map(|c| c.into_owned())
            .map_err(|_| format!("the {what} is not valid UTF-8 after percent-decoding"))
    };
    let (username, password) = match userinfo {
        None => (None, None),
        Some(info) => {
            let (user, pass) = match info.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (info, None),
            };
            if user.is_empty() {
                return Err("the user name before `:` is empty".into());
            }
            (
                Some(decode(user, "user name")?),
                pass.map(|p| decode(p, "password").map(Secret::new))
                    .transpose()?,
            )
        }
    };
    Ok(ProxyConfig {
        scheme_https,
        host: a.bare_host,
        port: a.port.unwrap_or(if scheme_https { 443 } else { 80 }),
        username,
        password,
    })
}

/// Reads a PEM file of extra trust anchors (`hub_ca`, `proxy_ca`, a target's `ca`): at least
/// one certificate, each usable as a trust anchor. The error is one line naming the file.
pub fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let unreadable = |e: std::io::Error| format!("cannot read {}: {e}", path.display());
    let file = std::fs::File::open(path).map_err(unreadable)?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .map_err(unreadable)?;
    if certs.is_empty() {
        return Err(format!(
            "{} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    let mut probe = RootCertStore::empty();
    for (index, cert) in certs.iter().enumerate() {
        probe.add(cert.clone()).map_err(|e| {
            format!(
                "certificate #{} of {} is not a usable trust anchor ({e})",
                index + 1,
                path.display()
            )
        })?;
    }
    Ok(certs)
}

/// What to do about a CA file [`read_ca_file`] refused.
const CA_FILE_FIX: &str =
    "give a PEM file holding the CA certificate, readable by the agent's user";

/// A proxy URL safe to print: everything before the last `@` but a genuine `scheme://` is
/// replaced by `***`. (Keeping whatever preceded the first `://` leaked the password of
/// `user:secret@host://...`.)
fn redact_url(url: &str) -> String {
    let Some(at) = url.rfind('@') else {
        return url.to_string();
    };
    let keep = split_scheme(url)
        .and_then(|_| url.find("://"))
        .map(|s| s + 3)
        .filter(|&k| k <= at)
        .unwrap_or(0);
    format!("{}***{}", &url[..keep], &url[at..])
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "yes" | "1" => Some(true),
        "false" | "no" | "0" => Some(false),
        _ => None,
    }
}

/// Whether to read secrets (`load`) or only check the file's shape (`set-target`, which may run
/// in a shell that lacks the agent's environment variables or secret files).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Secrets {
    Resolve,
    Skip,
}

/// A key's value and its line.
type Entries = BTreeMap<String, (String, usize)>;

struct RawTarget {
    line: usize,
    entries: Entries,
}

/// The file's entries grouped by section, with unknown keys, bad section headers and duplicates
/// already refused.
struct RawDoc {
    top: Entries,
    targets: BTreeMap<String, RawTarget>,
}

fn group(text: &str, path: &Path) -> Result<RawDoc, ConfigError> {
    let mut top = Entries::new();
    let mut targets: BTreeMap<String, RawTarget> = BTreeMap::new();
    // The section being read; moved into `targets` when the next one starts.
    let mut current: Option<(String, RawTarget)> = None;
    for line in ini::parse_lines(text, path)? {
        match line.kind {
            LineKind::Blank | LineKind::Comment => {}
            LineKind::Section(section) => {
                let name = target_section_name(&section, line.number, path)?;
                if let Some((done_name, done)) = current.take() {
                    targets.insert(done_name, done);
                }
                if let Some(first) = targets.get(name) {
                    return Err(ConfigError::Duplicate {
                        path: path.to_path_buf(),
                        line: line.number,
                        key: format!("[{section}]"),
                        first_line: first.line,
                    });
                }
                current = Some((
                    name.to_string(),
                    RawTarget {
                        line: line.number,
                        entries: Entries::new(),
                    },
                ));
            }
            LineKind::Entry { key, value } => {
                let in_target = current.is_some();
                let (known, other) = if in_target {
                    (TARGET_KEYS, TOP_KEYS)
                } else {
                    (TOP_KEYS, TARGET_KEYS)
                };
                if !known.contains(&key.as_str()) {
                    let fix = match (other.contains(&key.as_str()), in_target) {
                        (true, true) => format!(
                            "`{key}` is a top-level key: move it above the first [target.*] section"
                        ),
                        (true, false) => format!("`{key}` belongs in a [target.<name>] section"),
                        (false, _) => unknown_key_fix(&key, known),
                    };
                    return Err(ConfigError::UnknownKey {
                        path: path.to_path_buf(),
                        line: line.number,
                        key,
                        section: current.as_ref().map(|(n, _)| format!("{TARGET_PREFIX}{n}")),
                        fix,
                    });
                }
                let entries = match &mut current {
                    Some((_, target)) => &mut target.entries,
                    None => &mut top,
                };
                if let Some((_, first)) = entries.get(&key) {
                    return Err(ConfigError::Duplicate {
                        path: path.to_path_buf(),
                        line: line.number,
                        key,
                        first_line: *first,
                    });
                }
                entries.insert(key, (value, line.number));
            }
        }
    }
    if let Some((name, target)) = current {
        targets.insert(name, target);
    }
    Ok(RawDoc { top, targets })
}

/// The target name of a `[target.<name>]` header; any other section is refused.
fn target_section_name<'a>(
    section: &'a str,
    line: usize,
    path: &Path,
) -> Result<&'a str, ConfigError> {
    match section.strip_prefix(TARGET_PREFIX) {
        Some(name) => {
            validate_target_name(name).map_err(|reason| ConfigError::Invalid {
                path: path.to_path_buf(),
                line: Some(line),
                key: format!("[{section}]"),
                value: None,
                problem: format!(
                    "target name {name:?}: {reason}; rename the section to [target.<name>] with a valid name"
                ),
            })?;
            Ok(name)
        }
        None => {
            let (head, rest) = section.split_once('.').unwrap_or((section, ""));
            let fix = if section == "target" {
                "add the target's name: [target.<name>]".to_string()
            } else if !rest.is_empty() && super::suggest::closest(head, &["target"]).is_some() {
                format!("did you mean [target.{rest}]?")
            } else {
                "the only sections are [target.<name>]".to_string()
            };
            Err(ConfigError::Syntax {
                path: path.to_path_buf(),
                line: Some(line),
                message: format!("unknown section [{section}]"),
                fix,
            })
        }
    }
}

fn build(doc: RawDoc, path: &Path, secrets: Secrets) -> Result<AgentConfig, ConfigError> {
    let entry = |key: &str| doc.top.get(key).map(|(v, l)| (v.as_str(), *l));
    // Optional keys written with an empty value mean "not set".
    let non_empty = |key: &str| entry(key).filter(|(v, _)| !v.is_empty());
    let invalid = |key: &str, line: usize, value: Option<String>, reason: String, fix: &str| {
        ConfigError::Invalid {
            path: path.to_path_buf(),
            line: Some(line),
            key: key.to_string(),
            value,
            problem: format!("{reason}; {fix}"),
        }
    };

    let id_source = SecretSource {
        key: "service_id",
        value: entry("service_id").map(|(v, l)| (v, Some(l))),
        file: entry("service_id_file").map(|(v, l)| (v, Some(l))),
    };
    if !id_source.is_given() {
        return Err(ConfigError::Missing {
            path: path.to_path_buf(),
            line: None,
            key: "service_id".into(),
            fix: "add `service_id = <the service id from the platform>` at the top of the file"
                .into(),
        });
    }
    let service_id = match secrets {
        Secrets::Resolve => {
            let id = id_source.resolve(path)?.unwrap_or_default();
            let len = id.expose().chars().count();
            if len < MIN_SERVICE_ID_LEN {
                let line = entry("service_id")
                    .or(entry("service_id_file"))
                    .map(|(_, l)| l)
                    .unwrap_or(1);
                return Err(invalid(
                    "service_id",
                    line,
                    None,
                    format!("the service id is only {len} characters long (at least {MIN_SERVICE_ID_LEN} expected)"),
                    "copy the complete service id from the platform",
                ));
            }
            id
        }
        Secrets::Skip => {
            id_source.check_exclusive(path)?;
            Secret::default()
        }
    };

    let hub = match entry("hub") {
        None => {
            return Err(ConfigError::Missing {
                path: path.to_path_buf(),
                line: None,
                key: "hub".into(),
                fix: "add `hub = wss://<hub host>/v1/connect` at the top of the file".into(),
            })
        }
        Some((v, line)) => {
            parse_hub_url(v).map_err(|reason| {
                invalid(
                    "hub",
                    line,
                    Some(v.to_string()),
                    reason,
                    "write it like wss://hub.example.com/v1/connect",
                )
            })?;
            v.to_string()
        }
    };

    let state_dir = match non_empty("state_dir") {
        Some((v, _)) => resolve_path(path, v),
        None => resolve_path(path, "run"),
    };
    // A PEM file named by `key` on `line`: resolved against the config's folder and, unless
    // only the file's shape is being checked, read and checked now so the error has its line.
    let ca_file = |key: &str,
                   line: usize,
                   written: &str|
     -> Result<(PathBuf, Vec<CertificateDer<'static>>), ConfigError> {
        let resolved = resolve_path(path, written);
        if secrets == Secrets::Skip {
            return Ok((resolved, Vec::new()));
        }
        let certs = read_ca_file(&resolved)
            .map_err(|reason| invalid(key, line, Some(written.to_string()), reason, CA_FILE_FIX))?;
        Ok((resolved, certs))
    };
    let hub_ca = non_empty("hub_ca")
        .map(|(v, line)| ca_file("hub_ca", line, v).map(|(p, _)| p))
        .transpose()?;

    let proxy_source = SecretSource {
        key: "proxy",
        value: non_empty("proxy").map(|(v, l)| (v, Some(l))),
        file: non_empty("proxy_file").map(|(v, l)| (v, Some(l))),
    };
    proxy_source.check_exclusive(path)?;
    let proxy_line = non_empty("proxy")
        .or(non_empty("proxy_file"))
        .map(|(_, l)| l)
        .unwrap_or(1);
    let proxy_text = match (secrets, proxy_source.value) {
        (Secrets::Resolve, _) => proxy_source.resolve(path)?,
        // Without resolving, only a literal URL can be checked.
        (Secrets::Skip, Some((v, _))) if !v.starts_with("env:") => Some(Secret::new(v)),
        (Secrets::Skip, _) => None,
    };
    let proxy = proxy_text
        .map(|url| {
            parse_proxy_url(url.expose()).map_err(|reason| {
                invalid(
                    "proxy",
                    proxy_line,
                    Some(redact_url(url.expose())),
                    reason,
                    "write it like http://user:password@proxy.example.com:3128 (percent-encode special characters)",
                )
            })
        })
        .transpose()?;
    let proxy_ca = match non_empty("proxy_ca") {
        None => None,
        Some((v, line)) => {
            if secrets == Secrets::Resolve && !proxy.as_ref().is_some_and(|p| p.scheme_https) {
                return Err(invalid(
                    "proxy_ca",
                    line,
                    Some(v.to_string()),
                    "proxy_ca only applies to an https:// proxy".into(),
                    "remove it, or write proxy = https://…",
                ));
            }
            Some(ca_file("proxy_ca", line, v)?.0)
        }
    };

    let agent_name = match non_empty("agent_name") {
        Some((v, line)) => {
            validate_target_name(v).map_err(|reason| {
                invalid(
                    "agent_name",
                    line,
                    Some(v.to_string()),
                    reason,
                    "use a short name such as the VM's host name",
                )
            })?;
            Some(v.to_string())
        }
        None => None,
    };

    let mut targets = BTreeMap::new();
    for (name, raw) in doc.targets {
        let section = format!("[{TARGET_PREFIX}{name}]");
        let key = |k: &str| format!("{section} {k}");
        let Some((addr, addr_line)) = raw.entries.get("addr") else {
            return Err(ConfigError::Missing {
                path: path.to_path_buf(),
                line: Some(raw.line),
                key: key("addr"),
                fix: "add `addr = host:port` to the section, e.g. addr = 10.0.0.12:443".into(),
            });
        };
        validate_addr(addr).map_err(|reason| {
            invalid(
                &key("addr"),
                *addr_line,
                Some(addr.clone()),
                reason,
                "write host:port, e.g. 10.0.0.12:443 or [fd00::12]:443",
            )
        })?;
        let flag = |k: &str| -> Result<bool, ConfigError> {
            match raw.entries.get(k) {
                None => Ok(false),
                Some((v, _)) if v.is_empty() => Ok(false),
                Some((v, line)) => parse_bool(v).ok_or_else(|| {
                    invalid(
                        &key(k),
                        *line,
                        Some(v.clone()),
                        "not a boolean".into(),
                        "write true or false",
                    )
                }),
            }
        };
        let always = flag("always_tls")?;
        let never = flag("no_tls")?;
        let tls = match (always, never) {
            (true, true) => {
                let line = raw
                    .entries
                    .get("no_tls")
                    .map(|(_, l)| *l)
                    .unwrap_or(raw.line);
                return Err(invalid(
                    &key("no_tls"),
                    line,
                    Some("true".into()),
                    "always_tls and no_tls are both true".into(),
                    "set at most one of them to true",
                ));
            }
            (true, false) => TlsMode::Always,
            (false, true) => TlsMode::Never,
            (false, false) => TlsMode::FromScheme,
        };
        let insecure_allow_skip_tls_check = flag("insecure_allow_skip_tls_check")?;
        let (ca, ca_certs) = match raw.entries.get("ca") {
            Some((v, line)) if !v.is_empty() => {
                let (p, certs) = ca_file(&key("ca"), *line, v)?;
                (Some(p), certs)
            }
            _ => (None, Vec::new()),
        };
        targets.insert(
            name.clone(),
            TargetConfig {
                name,
                addr: addr.clone(),
                tls,
                insecure_allow_skip_tls_check,
                ca,
                ca_certs,
            },
        );
    }

    Ok(AgentConfig {
        path: path.to_path_buf(),
        service_id,
        state_dir,
        hub,
        hub_ca,
        proxy,
        proxy_ca,
        agent_name,
        targets,
        lines: doc
            .top
            .iter()
            .map(|(key, (_, line))| (key.clone(), *line))
            .collect(),
    })
}

fn parse_with(text: &str, path: &Path, secrets: Secrets) -> Result<AgentConfig, ConfigError> {
    build(group(text, path)?, path, secrets)
}

impl AgentConfig {
    /// Reads and validates `path` (and any `*_file` secret it names).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Validates config.ini text; `path` names the file in errors and anchors relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        parse_with(text, path, Secrets::Resolve)
    }

    /// The `state_dir` that config.ini at `path` names (default `run` beside it), read from
    /// its top-level lines only: `connect status` needs nothing else, and must work from a shell
    /// without the agent's environment and while a target section is being edited.
    pub fn state_dir_of(path: &Path) -> Result<PathBuf, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let top: String = ini::raw_lines(&text)
            .into_iter()
            .take_while(|line| !line.trim_start().starts_with('['))
            .collect();
        let named = ini::parse_lines(&top, path)?
            .into_iter()
            .find_map(|line| match line.kind {
                LineKind::Entry { key, value } if key == "state_dir" && !value.is_empty() => {
                    Some(value)
                }
                _ => None,
            });
        Ok(resolve_path(path, named.as_deref().unwrap_or("run")))
    }

    /// Like [`AgentConfig::parse`], but resolves no secret (`service_id` comes back empty and
    /// its length unchecked, `proxy` only when written literally): checks the text alone,
    /// touching neither the environment nor the disk, as `set-target` does before an edit. The
    /// fuzz target uses it, so arbitrary input cannot make it read `/dev/zero`.
    pub fn parse_offline(text: &str, path: &Path) -> Result<Self, ConfigError> {
        parse_with(text, path, Secrets::Skip)
    }
}

/// A `connect set-target` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetTarget {
    /// Target name.
    pub name: String,
    /// `host:port`.
    pub addr: String,
    /// `-always-tls` / `-no-tls` / neither.
    pub tls: TlsMode,
    /// `-insecure-allow-skip-tls-check`.
    pub insecure_allow_skip_tls_check: bool,
    /// `-override`: replace an existing section.
    pub override_existing: bool,
    /// `-ca <file>`: a PEM file of CA certificates the target's certificate is checked against,
    /// besides the system's.
    pub ca: Option<PathBuf>,
}

/// What `set_target` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetTargetOutcome {
    /// A new section was appended.
    Added,
    /// An existing section was replaced in place.
    Replaced,
}

/// Writes `[target.<name>]` into config.ini.
///
/// Every other line stays byte for byte. A new section is appended at the end after a blank
/// line; with `override_existing` an existing section's header and entries (up to its last
/// `key = value` line) are replaced in place, and the comments and blank lines that follow it,
/// which usually introduce the next section, are kept. The section is always written with all
/// four keys (`addr`, `always_tls`, `no_tls`, `insecure_allow_skip_tls_check`), like the
/// sample, plus `ca` (made absolute, after the file was read and checked) when one is given.
/// The file is left untouched on any error: bad name, address or CA file, an existing name
/// without override, or a result that does not validate (secrets are not resolved for this
/// check, so it works in a shell without the agent's environment). The new file is written
/// atomically with the original's permissions and owner.
pub fn set_target(path: &Path, change: &SetTarget) -> Result<SetTargetOutcome, ConfigError> {
    let argument =
        |what: &'static str, value: &str, reason: String, fix: &str| ConfigError::Argument {
            path: path.to_path_buf(),
            what,
            value: value.to_string(),
            reason,
            fix: fix.to_string(),
        };
    validate_target_name(&change.name).map_err(|r| {
        argument(
            "target name",
            &change.name,
            r,
            "use 1 to 64 letters, digits, `.`, `_` or `-`",
        )
    })?;
    validate_addr(&change.addr).map_err(|r| {
        argument(
            "address",
            &change.addr,
            r,
            "give host:port, e.g. 10.0.0.12:443 or [fd00::12]:443",
        )
    })?;

    let ca = match &change.ca {
        None => None,
        Some(given) => {
            let shown = given.display().to_string();
            let absolute = std::path::absolute(given)
                .map_err(|e| argument("CA file", &shown, e.to_string(), CA_FILE_FIX))?;
            read_ca_file(&absolute).map_err(|r| argument("CA file", &shown, r, CA_FILE_FIX))?;
            let written = absolute.to_str().filter(|p| !p.contains(['"', '\n', '\r']));
            let Some(written) = written else {
                return Err(argument(
                    "CA file",
                    &shown,
                    "the path holds a quote, a line break or non-UTF-8 bytes".into(),
                    "move the file to a plainer path",
                ));
            };
            Some(written.to_string())
        }
    };

    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let original_check = parse_with(&text, path, Secrets::Skip);

    let eol = if text.contains("\r\n") { "\r\n" } else { "\n" };
    let section = render_section(change, ca.as_deref(), eol);
    let lines = ini::parse_lines(&text, path)?;
    let raw = ini::raw_lines(&text);
    let header = format!("{TARGET_PREFIX}{}", change.name);
    let existing = lines
        .iter()
        .position(|l| matches!(&l.kind, LineKind::Section(s) if *s == header));

    let (new_text, outcome) = match existing {
        Some(start) => {
            if !change.override_existing {
                return Err(ConfigError::TargetExists {
                    path: path.to_path_buf(),
                    line: start + 1,
                    name: change.name.clone(),
                });
            }
            let next = lines[start + 1..]
                .iter()
                .position(|l| matches!(l.kind, LineKind::Section(_)))
                .map_or(lines.len(), |i| start + 1 + i);
            let last_entry = lines[start..next]
                .iter()
                .rposition(|l| matches!(l.kind, LineKind::Entry { .. }))
                .map_or(start, |i| start + i);
            let mut out = raw[..start].concat();
            out.push_str(&section);
            out.push_str(&raw[last_entry + 1..].concat());
            (out, SetTargetOutcome::Replaced)
        }
        None => {
            let mut out = text.clone();
            if !out.is_empty() {
                if !out.ends_with('\n') {
                    out.push_str(eol);
                }
                let last_is_blank = raw.last().is_some_and(|l| l.trim().is_empty());
                if !last_is_blank {
                    out.push_str(eol);
                }
            }
            out.push_str(&section);
            (out, SetTargetOutcome::Added)
        }
    };

    // The result must validate, so a running agent never reloads a broken file. When it does
    // not, the original's own error is reported (its line numbers match what the user sees);
    // an edit that repairs the file (e.g. -override of a section lacking addr) is allowed.
    if let Err(e) = parse_with(&new_text, path, Secrets::Skip) {
        return Err(original_check.err().unwrap_or(e));
    }
    super::fsutil::write_atomic(path, new_text.as_bytes(), 0o600).map_err(|source| {
        ConfigError::Write {
            path: path.to_path_buf(),
            source,
        }
    })?;
    Ok(outcome)
}

fn render_section(change: &SetTarget, ca: Option<&str>, eol: &str) -> String {
    let mut section = format!(
        "[{TARGET_PREFIX}{name}]{eol}addr = {addr}{eol}always_tls = {always}{eol}no_tls = {never}{eol}insecure_allow_skip_tls_check = {skip}{eol}",
        name = change.name,
        addr = change.addr,
        always = change.tls == TlsMode::Always,
        never = change.tls == TlsMode::Never,
        skip = change.insecure_allow_skip_tls_check,
    );
    if let Some(ca) = ca {
        // Quoted when a space, `#` or `;` would otherwise end the value.
        if ca.contains(char::is_whitespace) || ca.contains(['#', ';']) {
            section.push_str(&format!("ca = \"{ca}\"{eol}"));
        } else {
            section.push_str(&format!("ca = {ca}{eol}"));
        }
    }
    section
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    const ID: &str = "test-service-id-0123456789abcdef";

    fn p() -> PathBuf {
        PathBuf::from("/etc/connect/config.ini")
    }

    fn base() -> String {
        format!("service_id = {ID}\nhub = wss://hub.example.com/v1/connect\n")
    }

    fn err(text: &str) -> String {
        let msg = AgentConfig::parse(text, &p()).unwrap_err().to_string();
        assert!(!msg.contains('\n'), "multi-line: {msg}");
        assert!(!msg.contains(ID), "secret leaked: {msg}");
        msg
    }

    /// A folder holding `ca/hub-ca.pem`, `ca/proxy-ca.pem` and `ca/crm-ca.pem`, each one CA
    /// certificate.
    fn ca_files() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("ca")).unwrap();
        for name in ["hub-ca", "proxy-ca", "crm-ca"] {
            let ca = crate::certs::TestCa::new(name).unwrap();
            fs::write(dir.path().join(format!("ca/{name}.pem")), ca.cert_pem()).unwrap();
        }
        dir
    }

    #[test]
    fn full_example_parses() {
        let dir = ca_files();
        let conf = dir.path().join("config.ini");
        let text = format!(
            "# agent\nservice_id = {ID}   # the id\nstate_dir = run/\n\
             proxy = https://us%40er:p%3Ass@proxy_host.local:3128     # optional\n\
             hub = wss://hub.example.com/v1/connect\nhub_ca = ca/hub-ca.pem\nagent_name = vm-01\n\
             proxy_ca = ca/proxy-ca.pem\n\n\
             [target.scim-server]\naddr = 10.0.0.12:443\nalways_tls = false\nno_tls = false\n\
             insecure_allow_skip_tls_check = false\n\n; second\n[target.crm]\naddr = [fd00::12]:8443\n\
             always_tls = yes\ninsecure_allow_skip_tls_check = 1\nca = ca/crm-ca.pem\n"
        );
        let c = AgentConfig::parse(&text, &conf).unwrap();
        assert_eq!(c.service_id.expose(), ID);
        assert_eq!(c.state_dir, dir.path().join("run/"));
        assert_eq!(c.hub_ca, Some(dir.path().join("ca/hub-ca.pem")));
        assert_eq!(c.proxy_ca, Some(dir.path().join("ca/proxy-ca.pem")));
        assert_eq!(
            (
                c.line_of("state_dir"),
                c.line_of("proxy_ca"),
                c.line_of("nope")
            ),
            (Some(3), Some(8), None)
        );
        assert_eq!(c.hub, "wss://hub.example.com/v1/connect");
        assert_eq!(c.agent_name.as_deref(), Some("vm-01"));
        let proxy = c.proxy.clone().unwrap();
        assert!(proxy.scheme_https);
        assert_eq!(
            (proxy.host.as_str(), proxy.port),
            ("proxy_host.local", 3128)
        );
        assert_eq!(proxy.username.as_deref(), Some("us@er"));
        assert_eq!(proxy.password.as_ref().unwrap().expose(), "p:ss");
        assert_eq!(c.targets.len(), 2);
        let t = &c.targets["scim-server"];
        assert_eq!(
            (t.addr.as_str(), t.tls, t.insecure_allow_skip_tls_check),
            ("10.0.0.12:443", TlsMode::FromScheme, false)
        );
        assert!(t.ca.is_none() && t.ca_certs.is_empty());
        let t = &c.targets["crm"];
        assert_eq!(
            (t.addr.as_str(), t.tls, t.insecure_allow_skip_tls_check),
            ("[fd00::12]:8443", TlsMode::Always, true)
        );
        assert_eq!(t.ca, Some(dir.path().join("ca/crm-ca.pem")));
        assert_eq!(t.ca_certs.len(), 1);
        let debug = format!("{c:?}");
        assert!(!debug.contains(ID) && !debug.contains("p:ss"), "{debug}");
        assert!(!debug.contains("us@er"), "{debug}");
    }

    #[test]
    fn ca_files_are_read_at_load_and_named_with_their_line() {
        let dir = ca_files();
        let conf = dir.path().join("config.ini");
        fs::write(dir.path().join("garbage.pem"), "not a certificate\n").unwrap();
        fs::write(
            dir.path().join("broken.pem"),
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let load = |text: &str| {
            let m = AgentConfig::parse(text, &conf).unwrap_err().to_string();
            assert!(!m.contains('\n'), "{m}");
            m
        };
        let m = load(&format!("{}hub_ca = ca/missing.pem\n", base()));
        assert!(
            m.starts_with(&format!(
                "{}:3: `hub_ca` = \"ca/missing.pem\": cannot read {}",
                conf.display(),
                dir.path().join("ca/missing.pem").display()
            )),
            "{m}"
        );
        assert!(
            m.contains("No such file") && m.ends_with(CA_FILE_FIX),
            "{m}"
        );
        let m = load(&format!(
            "{}[target.crm]\naddr = h:1\nca = garbage.pem\n",
            base()
        ));
        assert!(
            m.contains(":5: `[target.crm] ca` = \"garbage.pem\": ")
                && m.contains("garbage.pem holds no PEM certificate"),
            "{m}"
        );
        let m = load(&format!(
            "{}[target.crm]\naddr = h:1\nca = broken.pem\n",
            base()
        ));
        assert!(
            m.contains(":5: `[target.crm] ca`") && m.contains("certificate #1 of"),
            "{m}"
        );
        let m = load(&format!("{}proxy_ca = ca/proxy-ca.pem\n", base()));
        assert!(
            m.contains(":3: `proxy_ca`") && m.contains("only applies to an https:// proxy"),
            "{m}"
        );
        let m = load(&format!(
            "{}proxy = http://p:3128\nproxy_ca = ca/proxy-ca.pem\n",
            base()
        ));
        assert!(m.contains(":4: `proxy_ca`"), "{m}");
        // An empty `ca` means none, like the other optional keys.
        let c = AgentConfig::parse(
            &format!("{}[target.crm]\naddr = h:1\nca =\n", base()),
            &conf,
        )
        .unwrap();
        assert!(c.targets["crm"].ca.is_none());
    }

    #[test]
    fn set_target_with_a_ca_file_writes_its_absolute_path() {
        let (dir, conf) = write_conf(ORIGINAL);
        let ca = crate::certs::TestCa::new("private").unwrap();
        let ca_path = dir.path().join("my ca.pem");
        fs::write(&ca_path, ca.cert_pem()).unwrap();
        let mut c = change("secure", "10.0.0.7:443", false);
        c.ca = Some(ca_path.clone());
        set_target(&conf, &c).unwrap();
        let after = fs::read_to_string(&conf).unwrap();
        assert!(
            after.ends_with(&format!(
                "insecure_allow_skip_tls_check = false\nca = \"{}\"\n",
                ca_path.display()
            )),
            "{after}"
        );
        let t = &AgentConfig::load(&conf).unwrap().targets["secure"];
        assert_eq!(t.ca.as_deref(), Some(ca_path.as_path()));
        assert_eq!(t.ca_certs.len(), 1);

        // A file that is no CA certificate: refused, config.ini untouched.
        let before = fs::read_to_string(&conf).unwrap();
        let mut c = change("other", "10.0.0.8:443", false);
        c.ca = Some(conf.clone());
        let m = set_target(&conf, &c).unwrap_err().to_string();
        assert!(
            m.starts_with("set-target: CA file") && m.contains("holds no PEM certificate"),
            "{m}"
        );
        c.ca = Some(dir.path().join("absent.pem"));
        let m = set_target(&conf, &c).unwrap_err().to_string();
        assert!(
            m.contains("cannot read") && m.contains("left unchanged"),
            "{m}"
        );
        assert_eq!(fs::read_to_string(&conf).unwrap(), before);
    }

    #[test]
    fn defaults() {
        let c = AgentConfig::parse(&base(), Path::new("config.ini")).unwrap();
        assert_eq!(c.state_dir, PathBuf::from("run"));
        assert!(
            c.proxy.is_none()
                && c.hub_ca.is_none()
                && c.agent_name.is_none()
                && c.targets.is_empty()
        );
        let c = AgentConfig::parse(
            &format!(
                "{}proxy =\nstate_dir = /var/lib/connect\n[target.x]\naddr = h:1\nno_tls = true\n",
                base()
            ),
            &p(),
        )
        .unwrap();
        assert!(c.proxy.is_none());
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/connect"));
        assert_eq!(c.targets["x"].tls, TlsMode::Never);
        let proxy = AgentConfig::parse(&format!("{}proxy = http://proxy:8080/\n", base()), &p())
            .unwrap()
            .proxy
            .unwrap();
        assert_eq!(
            (proxy.scheme_https, proxy.port, proxy.username),
            (false, 8080, None)
        );
        let proxy = AgentConfig::parse(&format!("{}proxy = http://proxy\n", base()), &p())
            .unwrap()
            .proxy
            .unwrap();
        assert_eq!(proxy.port, 80);
    }

    #[test]
    fn missing_required_keys() {
        let m = err("hub = wss://h/x\n");
        assert!(
            m.starts_with("/etc/connect/config.ini: missing `service_id`; add `service_id ="),
            "{m}"
        );
        let m = err(&format!("service_id = {ID}\n"));
        assert!(
            m.starts_with("/etc/connect/config.ini: missing `hub`; add `hub = wss://"),
            "{m}"
        );
        let m = err(&format!("{}\n[target.a]\nno_tls = true\n", base()));
        assert!(
            m.starts_with(
                "/etc/connect/config.ini:4: missing `[target.a] addr`; add `addr = host:port`"
            ),
            "{m}"
        );
    }

    #[test]
    fn unknown_keys_suggest_the_right_one() {
        let m = err(&format!("{}servce_id = x\n", base()));
        assert!(
            m.starts_with(
                "/etc/connect/config.ini:3: unknown key `servce_id`; did you mean `service_id`?"
            ),
            "{m}"
        );
        let m = err(&format!(
            "{}[target.a]\naddr = h:1\nalways_tsl = true\n",
            base()
        ));
        assert!(m.starts_with("/etc/connect/config.ini:5: unknown key `always_tsl` in [target.a]; did you mean `always_tls`?"), "{m}");
        let m = err(&format!("{}colour = blue\n", base()));
        assert!(
            m.contains(":3: unknown key `colour`; known keys here: service_id"),
            "{m}"
        );
        let m = err(&format!("{}addr = h:1\n", base()));
        assert!(
            m.contains(":3: unknown key `addr`; `addr` belongs in a [target.<name>] section"),
            "{m}"
        );
        let m = err(&format!(
            "service_id = {ID}\n[target.a]\naddr = h:1\nhub = wss://h/\n"
        ));
        assert!(
            m.contains(
                ":4: unknown key `hub` in [target.a]; `hub` is a top-level key: move it above"
            ),
            "{m}"
        );
    }

    #[test]
    fn unknown_and_bad_sections() {
        let m = err(&format!("{}[targets.crm]\naddr = h:1\n", base()));
        assert!(
            m.contains(":3: unknown section [targets.crm]; did you mean [target.crm]?"),
            "{m}"
        );
        let m = err(&format!("{}[target]\n", base()));
        assert!(
            m.contains(":3: unknown section [target]; add the target's name"),
            "{m}"
        );
        let m = err(&format!("{}[general]\n", base()));
        assert!(m.contains("the only sections are [target.<name>]"), "{m}");
        let m = err(&format!("{}[target.a b]\n", base()));
        assert!(m.contains(":3: `[target.a b]`: target name \"a b\""), "{m}");
        assert!(m.contains("rename the section"), "{m}");
    }

    #[test]
    fn duplicates_name_both_lines() {
        let m = err(&format!("{}hub = wss://other/\n", base()));
        assert!(
            m.contains(":3: `hub` is given twice (first on line 2); keep only one"),
            "{m}"
        );
        let m = err(&format!(
            "{}[target.a]\naddr = h:1\n[target.b]\naddr = h:2\n[target.a]\naddr = h:3\n",
            base()
        ));
        assert!(
            m.contains(":7: `[target.a]` is given twice (first on line 3)"),
            "{m}"
        );
        let m = err(&format!("{}[target.a]\naddr = h:1\naddr = h:2\n", base()));
        assert!(
            m.contains(":5: `addr` is given twice (first on line 4)"),
            "{m}"
        );
    }

    #[test]
    fn bad_values() {
        let cases = [
            (
                "hub = ws://h/x",
                ":1: `hub` = \"ws://h/x\": plain ws:// is not allowed",
                "use wss://",
            ),
            (
                "hub = https://h/x",
                "https:// is not a websocket URL",
                "wss://",
            ),
            (
                "hub = hub.example.com",
                "not a URL",
                "wss://hub.example.com/v1/connect",
            ),
            (
                "hub = wss://u:p@h/",
                "must not contain credentials",
                "write it like",
            ),
            ("hub = wss://h:99999/", "out of range", "write it like"),
        ];
        for (line, want, fix) in cases {
            let m = err(&format!("{line}\nservice_id = {ID}\n"));
            assert!(m.contains(want) && m.contains(fix), "{line}: {m}");
        }
        let m = err(&format!("{}[target.a]\naddr = 10.0.0.12\n", base()));
        assert!(
            m.contains(":4: `[target.a] addr` = \"10.0.0.12\": the port is missing"),
            "{m}"
        );
        assert!(m.contains("write host:port"), "{m}");
        let m = err(&format!(
            "{}[target.a]\naddr = h:1\nalways_tls = maybe\n",
            base()
        ));
        assert!(
            m.contains(
                ":5: `[target.a] always_tls` = \"maybe\": not a boolean; write true or false"
            ),
            "{m}"
        );
        let m = err(&format!(
            "{}[target.a]\naddr = h:1\nalways_tls = true\nno_tls = true\n",
            base()
        ));
        assert!(m.contains(":6: `[target.a] no_tls` = \"true\": always_tls and no_tls are both true; set at most one"), "{m}");
        let m = err(&format!("{}agent_name = my vm\n", base()));
        assert!(m.contains(":3: `agent_name` = \"my vm\""), "{m}");
        let m = err("service_id = short\nhub = wss://h/\n");
        assert!(
            m.contains(":1: `service_id`: the service id is only 5 characters long"),
            "{m}"
        );
        assert!(!m.contains("short\""), "{m}");
    }

    #[test]
    fn bad_proxy_url_hides_credentials() {
        let m = err(&format!("{}proxy = socks5://user:hunter2@p:1080\n", base()));
        assert!(
            m.contains(":3: `proxy` = \"socks5://***@p:1080\": scheme `socks5` is not supported"),
            "{m}"
        );
        assert!(!m.contains("hunter2") && !m.contains("user:hunter2"), "{m}");
        let m = err(&format!(
            "{}proxy = http://user:hunter2@p:3128/path\n",
            base()
        ));
        assert!(m.contains("no path") && !m.contains("hunter2"), "{m}");
        let m = err(&format!("{}proxy = http://:pw@p:3128\n", base()));
        assert!(m.contains("user name before `:` is empty"), "{m}");
    }

    #[test]
    fn secrets_from_env_and_file() {
        std::env::set_var("SCIM_CONNECT_TEST_AGENT_ID", ID);
        let c = AgentConfig::parse(
            "service_id = env:SCIM_CONNECT_TEST_AGENT_ID\nhub = wss://h/\n",
            &p(),
        )
        .unwrap();
        assert_eq!(c.service_id.expose(), ID);
        let m = err("service_id = env:SCIM_CONNECT_TEST_AGENT_UNSET\nhub = wss://h/\n");
        assert!(
            m.contains(
                ":1: `service_id`: environment variable SCIM_CONNECT_TEST_AGENT_UNSET is not set"
            ),
            "{m}"
        );

        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("id.txt"), format!("{ID}\n")).unwrap();
        fs::write(dir.path().join("proxy.txt"), "http://u:pw@proxy:3128\n").unwrap();
        let conf = dir.path().join("config.ini");
        let c = AgentConfig::parse(
            "service_id_file = id.txt\nproxy_file = proxy.txt\nhub = wss://h/\n",
            &conf,
        )
        .unwrap();
        assert_eq!(c.service_id.expose(), ID);
        assert_eq!(c.proxy.unwrap().password.unwrap().expose(), "pw");
        let m = AgentConfig::parse("service_id_file = missing.txt\nhub = wss://h/\n", &conf)
            .unwrap_err()
            .to_string();
        assert!(
            m.contains(":1: `service_id_file`: cannot read") && m.contains("missing.txt"),
            "{m}"
        );
        let m = err(&format!(
            "service_id = {ID}\nservice_id_file = /x\nhub = wss://h/\n"
        ));
        assert!(m.contains(":2: `service_id_file`: both `service_id` and `service_id_file` are given; keep only one"), "{m}");
    }

    #[test]
    fn load_reads_the_file_and_names_it_when_missing() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("config.ini");
        let m = AgentConfig::load(&conf).unwrap_err().to_string();
        assert!(
            m.starts_with(&format!("{}: cannot read the file", conf.display())),
            "{m}"
        );
        fs::write(&conf, base()).unwrap();
        let c = AgentConfig::load(&conf).unwrap();
        assert_eq!(c.path, conf);
        assert_eq!(c.state_dir, dir.path().join("run"));
    }

    #[test]
    fn names_and_addresses() {
        for ok in ["a", "scim-server", "crm.prod_1", &"x".repeat(64)] {
            assert!(validate_target_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "é", "a/b", &"x".repeat(65)] {
            assert!(validate_target_name(bad).is_err(), "{bad}");
        }
        for ok in [
            "10.0.0.12:443",
            "scim.internal:8443",
            "[fd00::12]:443",
            "localhost:1",
            "h:65535",
        ] {
            assert!(validate_addr(ok).is_ok(), "{ok}");
        }
        for bad in [
            "10.0.0.12",
            "https://h:443",
            "h:443/scim",
            "h:0",
            "h:70000",
            "fd00::12:443",
            ":443",
            "h :1",
            "300.1.1.1:80",
        ] {
            assert!(validate_addr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hub_endpoint() {
        let e = parse_hub_url("wss://hub.example.com/v1/connect").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.path.as_str()),
            ("hub.example.com", 443, "/v1/connect")
        );
        let e = parse_hub_url("WSS://[::1]:8443").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.path.as_str()),
            ("::1", 8443, "/")
        );
    }

    // ---- set-target ----

    const ORIGINAL: &str = "# Agent config, keep comments!\n\
service_id = test-service-id-0123456789abcdef   # from the platform\n\
hub = wss://hub.example.com/v1/connect\n\
\n\
; the CRM\n\
[target.crm]\n\
# internal\n\
addr = 10.0.0.12:443\n\
always_tls = true\n\
\n\
# The HR system comes next\n\
[target.hr]\n\
addr = hr.local:8443   # port 8443\n\
;trailing comment at the end\n";

    fn write_conf(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("config.ini");
        fs::write(&conf, text).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&conf, fs::Permissions::from_mode(0o600)).unwrap();
        }
        (dir, conf)
    }

    fn change(name: &str, addr: &str, override_existing: bool) -> SetTarget {
        SetTarget {
            name: name.into(),
            addr: addr.into(),
            tls: TlsMode::FromScheme,
            insecure_allow_skip_tls_check: false,
            override_existing,
            ca: None,
        }
    }

    #[test]
    fn set_target_appends_and_keeps_every_other_byte() {
        let (_dir, conf) = write_conf(ORIGINAL);
        let mut c = change("new-one", "[fd00::1]:8443", false);
        c.tls = TlsMode::Never;
        c.insecure_allow_skip_tls_check = true;
        assert_eq!(set_target(&conf, &c).unwrap(), SetTargetOutcome::Added);
        let after = fs::read_to_string(&conf).unwrap();
        assert_eq!(
            after,
            format!("{ORIGINAL}\n[target.new-one]\naddr = [fd00::1]:8443\nalways_tls = false\nno_tls = true\ninsecure_allow_skip_tls_check = true\n")
        );
        let parsed = AgentConfig::load(&conf).unwrap();
        assert_eq!(parsed.targets.len(), 3);
        let t = &parsed.targets["new-one"];
        assert_eq!(
            (t.tls, t.insecure_allow_skip_tls_check),
            (TlsMode::Never, true)
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                fs::metadata(&conf).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
    }

    #[test]
    fn set_target_append_handles_missing_final_newline_and_crlf() {
        let (_dir, conf) =
            write_conf("service_id = test-service-id-0123456789abcdef\r\nhub = wss://h/\r\n\r\n");
        set_target(&conf, &change("a", "h:1", false)).unwrap();
        assert_eq!(
            fs::read_to_string(&conf).unwrap(),
            "service_id = test-service-id-0123456789abcdef\r\nhub = wss://h/\r\n\r\n[target.a]\r\naddr = h:1\r\nalways_tls = false\r\nno_tls = false\r\ninsecure_allow_skip_tls_check = false\r\n"
        );
        let (_dir, conf) =
            write_conf("service_id = test-service-id-0123456789abcdef\nhub = wss://h/");
        set_target(&conf, &change("a", "h:1", false)).unwrap();
        assert!(fs::read_to_string(&conf).unwrap().starts_with("service_id = test-service-id-0123456789abcdef\nhub = wss://h/\n\n[target.a]\naddr = h:1\n"));
    }

    #[test]
    fn set_target_override_replaces_the_section_in_place() {
        let (_dir, conf) = write_conf(ORIGINAL);
        let mut c = change("crm", "10.0.0.99:8443", true);
        c.tls = TlsMode::Always;
        assert_eq!(set_target(&conf, &c).unwrap(), SetTargetOutcome::Replaced);
        let after = fs::read_to_string(&conf).unwrap();
        let expected = ORIGINAL.replace(
            "[target.crm]\n# internal\naddr = 10.0.0.12:443\nalways_tls = true\n",
            "[target.crm]\naddr = 10.0.0.99:8443\nalways_tls = true\nno_tls = false\ninsecure_allow_skip_tls_check = false\n",
        );
        assert_ne!(expected, ORIGINAL);
        assert_eq!(after, expected);
        // The last section: its trailing comment stays.
        set_target(&conf, &change("hr", "hr.local:443", true)).unwrap();
        let after = fs::read_to_string(&conf).unwrap();
        assert!(after.ends_with("[target.hr]\naddr = hr.local:443\nalways_tls = false\nno_tls = false\ninsecure_allow_skip_tls_check = false\n;trailing comment at the end\n"), "{after}");
        assert!(after.contains("\n# The HR system comes next\n[target.hr]\n"));
        let parsed = AgentConfig::load(&conf).unwrap();
        assert_eq!(parsed.targets["crm"].addr, "10.0.0.99:8443");
        assert_eq!(parsed.targets["hr"].addr, "hr.local:443");
        // -override for a name that does not exist yet simply adds it.
        assert_eq!(
            set_target(&conf, &change("fresh", "h:1", true)).unwrap(),
            SetTargetOutcome::Added
        );
    }

    #[test]
    fn set_target_override_of_an_empty_section() {
        let (_dir, conf) = write_conf(&format!(
            "{}[target.a]\n# nothing yet\n[target.b]\naddr = h:2\n",
            base()
        ));
        set_target(&conf, &change("a", "h:1", true)).unwrap();
        assert_eq!(
            fs::read_to_string(&conf).unwrap(),
            format!("{}[target.a]\naddr = h:1\nalways_tls = false\nno_tls = false\ninsecure_allow_skip_tls_check = false\n# nothing yet\n[target.b]\naddr = h:2\n", base())
        );
    }

    fn assert_untouched(conf: &Path, before: &fs::Metadata) {
        assert_eq!(fs::read_to_string(conf).unwrap(), ORIGINAL);
        let now = fs::metadata(conf).unwrap();
        assert_eq!(now.modified().unwrap(), before.modified().unwrap());
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            assert_eq!(now.ino(), before.ino());
        }
        // No temp file left behind.
        assert_eq!(fs::read_dir(conf.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn set_target_refuses_existing_name_with_the_hint() {
        let (_dir, conf) = write_conf(ORIGINAL);
        let before = fs::metadata(&conf).unwrap();
        let m = set_target(&conf, &change("crm", "h:1", false))
            .unwrap_err()
            .to_string();
        assert!(
            m.starts_with(&format!(
                "{}:6: target `crm` already exists; add -override",
                conf.display()
            )),
            "{m}"
        );
        assert_untouched(&conf, &before);
    }

    #[test]
    fn set_target_bad_arguments_leave_the_file_untouched() {
        let (_dir, conf) = write_conf(ORIGINAL);
        let before = fs::metadata(&conf).unwrap();
        let m = set_target(&conf, &change("bad name", "h:1", false))
            .unwrap_err()
            .to_string();
        assert!(
            m.starts_with("set-target: target name \"bad name\" is invalid: ' ' is not allowed"),
            "{m}"
        );
        assert!(m.contains("left unchanged"), "{m}");
        let m = set_target(&conf, &change("ok", "10.0.0.12", false))
            .unwrap_err()
            .to_string();
        assert!(
            m.starts_with("set-target: address \"10.0.0.12\" is invalid: the port is missing"),
            "{m}"
        );
        let m = set_target(&conf, &change("ok", "h:99999", true))
            .unwrap_err()
            .to_string();
        assert!(m.contains("out of range"), "{m}");
        assert_untouched(&conf, &before);
    }

    #[test]
    fn set_target_refuses_to_edit_an_invalid_file() {
        let bad = format!("{ORIGINAL}servce = 1\n");
        let (_dir, conf) = write_conf(&bad);
        let m = set_target(&conf, &change("x", "h:1", false))
            .unwrap_err()
            .to_string();
        assert!(m.contains(":15: unknown key `servce`"), "{m}");
        assert_eq!(fs::read_to_string(&conf).unwrap(), bad);
    }

    #[test]
    fn set_target_does_not_need_the_secrets() {
        let text = "service_id = env:SCIM_CONNECT_TEST_NOT_IN_THIS_SHELL\nproxy = env:ALSO_UNSET_HERE\nhub = wss://h/\n";
        let (_dir, conf) = write_conf(text);
        set_target(&conf, &change("x", "h:1", false)).unwrap();
        assert!(fs::read_to_string(&conf).unwrap().starts_with(text));
    }

    #[test]
    fn set_target_on_missing_file_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("config.ini");
        let m = set_target(&conf, &change("x", "h:1", false))
            .unwrap_err()
            .to_string();
        assert!(m.contains("config.ini: cannot read the file"), "{m}");
        assert!(!conf.exists());
    }

    #[test]
    fn sample_config_ini_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/config.ini");
        let c = AgentConfig::load(&path).unwrap();
        assert!(c.hub.starts_with("wss://"));
        assert!(!c.targets.is_empty());
    }

    #[test]
    fn fuzz_found_raw_scheme_in_errors() {
        // fuzz/artifacts/config_ini/crash-832e613f…: the would-be scheme of `hub` held CR and
        // NUL and was repeated raw, so the "one line" error was not one line.
        let text = "service_id =\u{0}0123456789abcd\u{1} ef0123\nhub =\u{18}wss\0\0\0\0\0\0\0\0\r\0+se\0\0\0\0\0\0\0\0\0\0\0\0/://hub^example.com/v0/connect\n";
        let msg = AgentConfig::parse_offline(text, &p())
            .unwrap_err()
            .to_string();
        assert!(
            !msg.contains(['\r', '\n', '\0', '\u{18}']),
            "raw control characters in: {msg:?}"
        );
        // The same path would have repeated credentials written before `://`.
        let msg = err(&format!(
            "{}proxy = user:s3cret@proxy://host:3128\n",
            base()
        ));
        assert!(!msg.contains("s3cret"), "{msg}");
    }

    #[test]
    fn fuzz_found_raw_section_name_in_errors() {
        // fuzz/artifacts/config_ini/crash-d54383c6…, cut down to the section that broke it.
        let text = format!(
            "{}[target.wikiGGG.\0\rGGGG.lan]\naddr = [fd01::/]:80\n",
            base()
        );
        let msg = AgentConfig::parse_offline(&text, &p())
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("/etc/connect/config.ini:3: "), "{msg}");
        assert!(!msg.contains(|c: char| c.is_control()), "{msg:?}");
    }
}
