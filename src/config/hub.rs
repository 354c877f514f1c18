//! The hub's `hub.toml`: listener and TLS files, admin API, services (each with its secret
//! service id) and the applications provisioned through them.
//!
//! Owns the meaning and validation of every hub.toml field; every error names the field by its
//! path (e.g. `apps.crm.base_url`) and its line. It must never open the files it names (TLS
//! certificate, directory, state directory): the hub does that when it starts. Only `*_file`
//! secrets are read here.
//!
//! Shape:
//! ```toml
//! listen = "0.0.0.0:8443"
//! tls_cert = "hub-cert.pem"
//! tls_key = "hub-key.pem"
//! state_dir = "state"            # optional, default "state" beside hub.toml
//! directory = "directory.json"
//!
//! [admin]
//! listen = "127.0.0.1:8089"      # optional, this is the default
//! token = "env:HUB_ADMIN_TOKEN"  # or token_file = "admin.token"
//!
//! [[services]]
//! name = "acme"
//! service_id_file = "acme.id"    # or service_id = "..." / "env:NAME"
//! enabled = true                 # optional, default true
//!
//! [apps.crm]
//! base_url = "https://crm.internal:8443/scim/v2"
//! service = "acme"
//! target = "crm"
//! auth = "bearer"                # "bearer" (token), "basic" (username, password) or "none"
//! token = "env:CRM_TOKEN"
//! skip_tls_check = false
//! deprovision = "deactivate"     # or "delete"
//! interval = "5m"
//! grant_groups = ["Engineering"]
//! grant_users = ["alice"]
//! page_size = 100
//! request_timeout = "30s"
//! concurrency = 8                # SCIM requests in flight at once for this app
//! deletion_guard = "50%"         # or a count: deletion_guard = 25
//! member_batch_size = 100        # group members per PATCH
//! provision_groups = true        # false: users only (apps without /Groups)
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use toml::Spanned;

use super::agent::{validate_target_name, MIN_SERVICE_ID_LEN};
use super::netaddr::{parse_authority, split_scheme};
use super::secret::SecretSource;
use super::{line_of, one_line, resolve_path, ConfigError, Secret};
use crate::scim::guard::DeletionGuard;

/// Admin API address when `[admin] listen` is not given.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:8089";
/// Sync interval when an app gives none.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(300);
/// SCIM page size when an app gives none.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
/// SCIM requests one app may have in flight when it gives no `concurrency`.
pub const DEFAULT_CONCURRENCY: usize = 8;
/// Largest `concurrency` accepted: more only invites 429s from the SCIM server.
pub const MAX_CONCURRENCY: usize = 64;
/// Per-request timeout when an app gives none.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Group members per PATCH request when an app gives none.
pub const DEFAULT_MEMBER_BATCH_SIZE: u32 = 100;

/// The validated hub configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubConfig {
    /// The file it was read from.
    pub path: PathBuf,
    /// Where agents connect (websocket over TLS).
    pub listen: SocketAddr,
    /// PEM certificate chain for `listen`.
    pub tls_cert: PathBuf,
    /// PEM private key for `listen`.
    pub tls_key: PathBuf,
    /// Where the hub keeps its database; default `state` beside hub.toml.
    pub state_dir: PathBuf,
    /// The directory JSON (users and groups).
    pub directory: PathBuf,
    /// The admin API.
    pub admin: AdminConfig,
    /// Services in file order; names and ids are unique.
    pub services: Vec<ServiceConfig>,
    /// Applications sorted by name.
    pub apps: Vec<AppConfig>,
}

/// The admin HTTP API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// Listen address, default 127.0.0.1:8089.
    pub listen: SocketAddr,
    /// Bearer token the API requires.
    pub token: Secret,
}

/// A service: the unit agents connect as, keyed by its secret id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    /// Name used by apps (`service = "..."`).
    pub name: String,
    /// The shared secret agents of this service hold.
    pub service_id: Secret,
    /// When false, agents are refused and apps report "service off".
    pub enabled: bool,
}

/// An application provisioned over SCIM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppConfig {
    /// The app's name (`[apps.<name>]`).
    pub name: String,
    /// SCIM base URL; host gives SNI and `Host`, the target gives the TCP address.
    pub base_url: BaseUrl,
    /// Which service's agents carry the requests.
    pub service: String,
    /// The target name the agents declared.
    pub target: String,
    /// How requests authenticate to the SCIM server.
    pub auth: AuthConfig,
    /// Ask the agent to skip certificate checks (the target must allow it too).
    pub skip_tls_check: bool,
    /// What removing access does.
    pub deprovision: DeprovisionMode,
    /// Time between scheduled syncs.
    pub interval: Duration,
    /// Who is provisioned.
    pub grant: AccessRule,
    /// SCIM `count` per list request, 1..=1000.
    pub page_size: u32,
    /// Timeout of one SCIM request, end to end.
    pub request_timeout: Duration,
    /// SCIM requests in flight at once, 1..=[`MAX_CONCURRENCY`].
    pub concurrency: usize,
    /// The most one run may deprovision before it is stopped unapplied.
    pub deletion_guard: DeletionGuard,
    /// Group member values per PATCH request (and in a group's POST), 1..=1000.
    pub member_batch_size: u32,
    /// Whether granted groups are provisioned too (false for apps without `/Groups`).
    pub provision_groups: bool,
}

/// A parsed SCIM base URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    /// `https://` (else `http://`).
    pub https: bool,
    /// Host as in the URL, with `:port` when written and IPv6 brackets: the `Host` header.
    pub host: String,
    /// Host without port and brackets: the TLS server name.
    pub sni_host: String,
    /// Path without trailing slash (`/scim/v2`), empty for the root.
    pub path: String,
}

/// How the hub authenticates to an app's SCIM server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthConfig {
    /// No `Authorization` header.
    None,
    /// `Authorization: Bearer <token>`.
    Bearer {
        /// The token, with or without its `Bearer ` prefix.
        token: Secret,
    },
    /// `Authorization: Basic base64(username:password)`.
    Basic {
        /// User name (no `:`).
        username: String,
        /// Password.
        password: Secret,
    },
}

/// What removing a user's access does in the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeprovisionMode {
    /// `DELETE /Users/{id}`.
    Delete,
    /// `active = false`.
    Deactivate,
}

/// Who is granted an app: groups (id or displayName) and users (id or userName).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessRule {
    /// Group ids or displayNames.
    pub groups: Vec<String>,
    /// User ids or userNames.
    pub users: Vec<String>,
}

impl BaseUrl {
    /// Parses `http(s)://host[:port][/path]`; no credentials, query or fragment.
    pub fn parse(url: &str) -> Result<BaseUrl, String> {
        let Some((scheme, rest)) = split_scheme(url) else {
            return Err("not a URL; write it like https://scim.example.com/scim/v2".into());
        };
        let https = match scheme.as_str() {
            "https" => true,
            "http" => false,
            other => {
                return Err(format!(
                    "scheme `{other}` is not supported; use https:// or http://"
                ))
            }
        };
        if url.chars().any(char::is_whitespace) {
            return Err("the URL contains a space".into());
        }
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        if authority.contains('@') {
            return Err(
                "credentials do not belong in the URL; set auth and its secret instead".into(),
            );
        }
        if path.contains(['?', '#']) {
            return Err("a base URL has no query or fragment".into());
        }
        let a = parse_authority(authority)?;
        Ok(BaseUrl {
            https,
            host: authority.to_string(),
            sni_host: a.bare_host,
            path: path.trim_end_matches('/').to_string(),
        })
    }
}

impl fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.https { "https" } else { "http" };
        write!(f, "{scheme}://{}{}", self.host, self.path)
    }
}

impl AuthConfig {
    /// The `Authorization` header value, if any. A bearer token gets its `Bearer ` prefix
    /// added unless it already has one (in any case).
    pub fn authorization(&self) -> Option<Secret> {
        match self {
            AuthConfig::None => None,
            AuthConfig::Bearer { token } => {
                let t = token.expose().trim();
                let has_prefix = t
                    .get(..7)
                    .is_some_and(|p| p.eq_ignore_ascii_case("bearer "));
                Some(if has_prefix {
                    Secret::new(t)
                } else {
                    Secret::new(format!("Bearer {t}"))
                })
            }
            AuthConfig::Basic { username, password } => {
                let pair = Secret::new(format!("{username}:{}", password.expose()));
                let encoded = base64::engine::general_purpose::STANDARD.encode(pair.expose());
                Some(Secret::new(format!("Basic {encoded}")))
            }
        }
    }
}

/// Parses `"5m"`, `"90s"`, `"1h30m"`, `"2d"`, `"500ms"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("the duration is empty".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!(
                "`{s}` is not a duration like \"90s\", \"5m\" or \"1h\""
            ));
        }
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("`{s}`: the number is too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Duration::from_millis(number),
            "s" => Duration::from_secs(number),
            "m" => Duration::from_secs(number.saturating_mul(60)),
            "h" => Duration::from_secs(number.saturating_mul(3600)),
            "d" => Duration::from_secs(number.saturating_mul(86400)),
            "" => {
                return Err(format!(
                    "`{s}` has no unit; add s, m or h (e.g. \"{number}s\")"
                ))
            }
            other => {
                return Err(format!(
                    "unknown unit `{other}` in `{s}`; use ms, s, m, h or d"
                ))
            }
        };
        total = total.saturating_add(part);
    }
    Ok(total)
}

/// A secret as read from TOML; type errors never echo the value.
struct RawSecret(Secret);

impl<'de> Deserialize<'de> for RawSecret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        const EXPECTED: &str = "expected a string (the secret, or \"env:NAME\")";
        impl Visitor<'_> for V {
            type Value = RawSecret;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string (the secret, or \"env:NAME\")")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawSecret, E> {
                Ok(RawSecret(Secret::new(v)))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<RawSecret, E> {
                Err(E::custom(format!("{EXPECTED}, found a boolean")))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<RawSecret, E> {
                Err(E::custom(format!("{EXPECTED}, found a number")))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<RawSecret, E> {
                Err(E::custom(format!("{EXPECTED}, found a number")))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<RawSecret, E> {
                Err(E::custom(format!("{EXPECTED}, found a number")))
            }
        }
        d.deserialize_str(V)
    }
}

/// A duration as read from TOML: `"5m"` or an integer number of seconds.
struct RawDuration(Result<Duration, String>);

impl<'de> Deserialize<'de> for RawDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = RawDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration like \"90s\", \"5m\" or \"1h\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawDuration, E> {
                // Kept as a value so validation reports it with the field path.
                Ok(RawDuration(parse_duration(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawDuration, E> {
                Ok(RawDuration(
                    u64::try_from(v)
                        .map(Duration::from_secs)
                        .map_err(|_| format!("{v} seconds is negative")),
                ))
            }
        }
        d.deserialize_any(V)
    }
}

/// A deletion guard as read from TOML: a count (`25`) or a percentage (`"10%"`).
struct RawGuard(Result<DeletionGuard, String>);

impl<'de> Deserialize<'de> for RawGuard {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = RawGuard;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a count like 25 or a percentage like \"10%\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawGuard, E> {
                // Kept as a value so validation reports it with the field path.
                Ok(RawGuard(parse_deletion_guard(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawGuard, E> {
                Ok(RawGuard(
                    usize::try_from(v)
                        .map(DeletionGuard::Count)
                        .map_err(|_| format!("{v} is negative")),
                ))
            }
        }
        d.deserialize_any(V)
    }
}

/// Parses `"25"` (a count) or `"10%"` (a percentage, 1 to 100).
pub fn parse_deletion_guard(s: &str) -> Result<DeletionGuard, String> {
    let t = s.trim();
    if let Some(number) = t.strip_suffix('%') {
        let p: u32 = number
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not a percentage like \"10%\""))?;
        return match p {
            1..=100 => Ok(DeletionGuard::Percent(p)),
            0 => {
                Err("0% is not a percentage guard (write 0 to refuse every deprovisioning)".into())
            }
            _ => Err(format!("{p}% is more than 100%")),
        };
    }
    t.parse()
        .map(DeletionGuard::Count)
        .map_err(|_| format!("`{s}` is neither a count like 25 nor a percentage like \"10%\""))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHub {
    listen: Option<Spanned<String>>,
    tls_cert: Option<Spanned<String>>,
    tls_key: Option<Spanned<String>>,
    state_dir: Option<Spanned<String>>,
    directory: Option<Spanned<String>>,
    admin: Option<Spanned<RawAdmin>>,
    #[serde(default)]
    services: Vec<Spanned<RawService>>,
    #[serde(default)]
    apps: BTreeMap<String, Spanned<RawApp>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<Spanned<String>>,
    token: Option<Spanned<RawSecret>>,
    token_file: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Option<Spanned<String>>,
    service_id: Option<Spanned<RawSecret>>,
    service_id_file: Option<Spanned<String>>,
    enabled: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApp {
    base_url: Option<Spanned<String>>,
    service: Option<Spanned<String>>,
    target: Option<Spanned<String>>,
    auth: Option<Spanned<String>>,
    token: Option<Spanned<RawSecret>>,
    token_file: Option<Spanned<String>>,
    username: Option<Spanned<String>>,
    password: Option<Spanned<RawSecret>>,
    password_file: Option<Spanned<String>>,
    skip_tls_check: Option<bool>,
    deprovision: Option<Spanned<String>>,
    interval: Option<Spanned<RawDuration>>,
    grant_groups: Option<Spanned<Vec<String>>>,
    grant_users: Option<Spanned<Vec<String>>>,
    page_size: Option<Spanned<i64>>,
    request_timeout: Option<Spanned<RawDuration>>,
    concurrency: Option<Spanned<i64>>,
    deletion_guard: Option<Spanned<RawGuard>>,
    member_batch_size: Option<Spanned<i64>>,
    provision_groups: Option<bool>,
}

/// Builds errors for one file, turning byte spans into lines.
struct Ctx<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Ctx<'_> {
    fn line<T>(&self, s: &Spanned<T>) -> Option<usize> {
        Some(line_of(self.text, s.span().start))
    }

    fn invalid<T>(
        &self,
        at: &Spanned<T>,
        key: &str,
        value: Option<&str>,
        reason: impl Into<String>,
        fix: &str,
    ) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            line: self.line(at),
            key: key.to_string(),
            value: value.map(str::to_string),
            problem: format!("{}; {fix}", reason.into()),
        }
    }

    fn missing(&self, line: Option<usize>, key: &str, fix: &str) -> ConfigError {
        ConfigError::Missing {
            path: self.path.to_path_buf(),
            line,
            key: key.to_string(),
            fix: fix.to_string(),
        }
    }

    fn socket_addr(&self, s: &Spanned<String>, key: &str) -> Result<SocketAddr, ConfigError> {
        s.get_ref().trim().parse().map_err(|_| {
            self.invalid(
                s,
                key,
                Some(s.get_ref()),
                "not an ip:port address",
                "write it like 0.0.0.0:8443 or 127.0.0.1:8089 (an IP, not a host name)",
            )
        })
    }

    fn secret(
        &self,
        key: &str,
        value: &Option<Spanned<RawSecret>>,
        file: &Option<Spanned<String>>,
    ) -> Result<Option<Secret>, ConfigError> {
        SecretSource {
            key,
            value: value
                .as_ref()
                .map(|v| (v.get_ref().0.expose(), self.line(v))),
            file: file.as_ref().map(|f| (f.get_ref().as_str(), self.line(f))),
        }
        .resolve(self.path)
    }

    fn duration(
        &self,
        raw: &Option<Spanned<RawDuration>>,
        key: &str,
        default: Duration,
        min: Duration,
        max: Duration,
    ) -> Result<Duration, ConfigError> {
        let Some(raw) = raw else { return Ok(default) };
        let d = raw.get_ref().0.clone().map_err(|reason| {
            self.invalid(
                raw,
                key,
                None,
                reason,
                "write a duration like \"90s\", \"5m\" or \"1h\"",
            )
        })?;
        if d < min || d > max {
            return Err(self.invalid(
                raw,
                key,
                None,
                format!(
                    "{} s is outside {} s ..= {} s",
                    d.as_secs_f64(),
                    min.as_secs_f64(),
                    max.as_secs_f64()
                ),
                "pick a value inside that range",
            ));
        }
        Ok(d)
    }
}

/// Checks a service or app name: same rule as target names.
fn check_name(ctx: &Ctx<'_>, s: &Spanned<String>, key: &str) -> Result<(), ConfigError> {
    validate_target_name(s.get_ref()).map_err(|reason| {
        ctx.invalid(
            s,
            key,
            Some(s.get_ref()),
            reason,
            "use 1 to 64 letters, digits, `.`, `_` or `-`",
        )
    })
}

impl HubConfig {
    /// Reads and validates `path` (and any `*_file` secret it names).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Validates hub.toml text; `path` names the file in errors and anchors relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw: RawHub = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            line: e.span().map(|s| line_of(text, s.start)),
            message: one_line(e.message()),
            fix: "fix this line (config/hub.toml in the project is a commented sample)".into(),
        })?;
        let ctx = Ctx { path, text };

        let required = |v: Option<Spanned<String>>, key: &str, fix: &str| {
            v.ok_or_else(|| ctx.missing(None, key, fix))
        };
        let listen = required(
            raw.listen,
            "listen",
            "add `listen = \"0.0.0.0:8443\"` (where agents connect) at the top",
        )?;
        let listen = ctx.socket_addr(&listen, "listen")?;
        let tls_cert = required(
            raw.tls_cert,
            "tls_cert",
            "add `tls_cert = \"hub-cert.pem\"` (PEM certificate chain) at the top",
        )?;
        let tls_key = required(
            raw.tls_key,
            "tls_key",
            "add `tls_key = \"hub-key.pem\"` (PEM private key) at the top",
        )?;
        let directory = required(
            raw.directory,
            "directory",
            "add `directory = \"directory.json\"` (users and groups) at the top",
        )?;
        let state_dir = raw
            .state_dir
            .map_or_else(|| "state".to_string(), Spanned::into_inner);

        let admin_raw = raw.admin.ok_or_else(|| {
            ctx.missing(
                None,
                "admin",
                "add an [admin] section with `token = \"...\"` (or token_file)",
            )
        })?;
        let admin_line = ctx.line(&admin_raw);
        let admin_raw = admin_raw.into_inner();
        let admin_listen = match &admin_raw.listen {
            Some(l) => ctx.socket_addr(l, "admin.listen")?,
            None => DEFAULT_ADMIN_LISTEN.parse().map_err(|_| {
                ctx.missing(
                    admin_line,
                    "admin.listen",
                    "write listen = \"127.0.0.1:8089\"",
                )
            })?,
        };
        let token = ctx
            .secret("admin.token", &admin_raw.token, &admin_raw.token_file)?
            .ok_or_else(|| ctx.missing(admin_line, "admin.token", "add `token = \"...\"`, `token = \"env:NAME\"` or `token_file = \"/path\"` to [admin]"))?;

        let services = build_services(&ctx, raw.services)?;
        let mut apps = Vec::with_capacity(raw.apps.len());
        for (name, app) in raw.apps {
            apps.push(build_app(&ctx, name, app, &services)?);
        }

        Ok(HubConfig {
            path: path.to_path_buf(),
            listen,
            tls_cert: resolve_path(path, tls_cert.get_ref()),
            tls_key: resolve_path(path, tls_key.get_ref()),
            state_dir: resolve_path(path, &state_dir),
            directory: resolve_path(path, directory.get_ref()),
            admin: AdminConfig {
                listen: admin_listen,
                token,
            },
            services,
            apps,
        })
    }

    /// The app called `name`.
    pub fn app(&self, name: &str) -> Option<&AppConfig> {
        self.apps.iter().find(|a| a.name == name)
    }

    /// The service called `name`.
    pub fn service(&self, name: &str) -> Option<&ServiceConfig> {
        self.services.iter().find(|s| s.name == name)
    }
}

fn build_services(
    ctx: &Ctx<'_>,
    raw: Vec<Spanned<RawService>>,
) -> Result<Vec<ServiceConfig>, ConfigError> {
    let mut out: Vec<ServiceConfig> = Vec::with_capacity(raw.len());
    for (i, spanned) in raw.into_iter().enumerate() {
        let line = ctx.line(&spanned);
        let s = spanned.get_ref();
        let name = s.name.as_ref().ok_or_else(|| {
            ctx.missing(
                line,
                &format!("services[{i}].name"),
                "add `name = \"...\"` to this [[services]] entry",
            )
        })?;
        let key = format!("services.{}", name.get_ref());
        check_name(ctx, name, &format!("services[{i}].name"))?;
        if out.iter().any(|o| o.name == *name.get_ref()) {
            return Err(ctx.invalid(
                name,
                &format!("{key}.name"),
                Some(name.get_ref()),
                "another service has the same name",
                "give every service its own name",
            ));
        }
        let id_key = format!("{key}.service_id");
        let service_id = ctx
            .secret(&id_key, &s.service_id, &s.service_id_file)?
            .ok_or_else(|| ctx.missing(line, &id_key, "add `service_id = \"...\"`, `service_id = \"env:NAME\"` or `service_id_file = \"/path\"`"))?;
        let id_line = s
            .service_id
            .as_ref()
            .map(|v| ctx.line(v))
            .or(s.service_id_file.as_ref().map(|f| ctx.line(f)))
            .flatten()
            .or(line);
        let len = service_id.expose().chars().count();
        if len < MIN_SERVICE_ID_LEN {
            return Err(ConfigError::Invalid {
                path: ctx.path.to_path_buf(),
                line: id_line,
                key: id_key,
                value: None,
                problem: format!(
                    "the service id is only {len} characters long (at least {MIN_SERVICE_ID_LEN} expected); use a long random id, e.g. the output of `openssl rand -hex 16`"
                ),
            });
        }
        if let Some(other) = out.iter().find(|o| o.service_id == service_id) {
            return Err(ConfigError::Invalid {
                path: ctx.path.to_path_buf(),
                line: id_line,
                key: id_key,
                value: None,
                problem: format!(
                    "the same service id as service `{}`; give every service its own id",
                    other.name
                ),
            });
        }
        out.push(ServiceConfig {
            name: name.get_ref().clone(),
            service_id,
            enabled: s.enabled.unwrap_or(true),
        });
    }
    Ok(out)
}

fn build_app(
    ctx: &Ctx<'_>,
    name: String,
    spanned: Spanned<RawApp>,
    services: &[ServiceConfig],
) -> Result<AppConfig, ConfigError> {
    let key = format!("apps.{name}");
    let k = |field: &str| format!("{key}.{field}");
    let line = ctx.line(&spanned);
    validate_target_name(&name).map_err(|reason| ConfigError::Invalid {
        path: ctx.path.to_path_buf(),
        line,
        key: key.clone(),
        value: Some(name.clone()),
        problem: format!(
            "app name: {reason}; rename the [apps.<name>] table with 1 to 64 letters, digits, `.`, `_` or `-`"
        ),
    })?;
    let a = spanned.into_inner();

    let base_url = a.base_url.as_ref().ok_or_else(|| {
        ctx.missing(
            line,
            &k("base_url"),
            "add `base_url = \"https://<scim host>/scim/v2\"`",
        )
    })?;
    let base_url = BaseUrl::parse(base_url.get_ref()).map_err(|reason| {
        ctx.invalid(
            base_url,
            &k("base_url"),
            Some(base_url.get_ref()),
            reason,
            "write it like https://scim.example.com/scim/v2",
        )
    })?;

    let service = a.service.as_ref().ok_or_else(|| {
        ctx.missing(
            line,
            &k("service"),
            "add `service = \"<name of a [[services]] entry>\"`",
        )
    })?;
    if !services.iter().any(|s| s.name == *service.get_ref()) {
        let known: Vec<&str> = services.iter().map(|s| s.name.as_str()).collect();
        let fix = if known.is_empty() {
            "declare it in a [[services]] entry".to_string()
        } else {
            format!("use one of: {}", known.join(", "))
        };
        return Err(ctx.invalid(
            service,
            &k("service"),
            Some(service.get_ref()),
            "no [[services]] entry has this name",
            &fix,
        ));
    }

    let target = a.target.as_ref().ok_or_else(|| {
        ctx.missing(
            line,
            &k("target"),
            "add `target = \"<target name declared on the agent>\"`",
        )
    })?;
    validate_target_name(target.get_ref()).map_err(|reason| {
        ctx.invalid(
            target,
            &k("target"),
            Some(target.get_ref()),
            reason,
            "use the name given to `connect set-target` on the agent",
        )
    })?;

    let auth = build_auth(ctx, &key, line, &a)?;

    let deprovision = match &a.deprovision {
        None => DeprovisionMode::Deactivate,
        Some(d) => match d.get_ref().as_str() {
            "delete" => DeprovisionMode::Delete,
            "deactivate" => DeprovisionMode::Deactivate,
            other => {
                return Err(ctx.invalid(
                    d,
                    &k("deprovision"),
                    Some(other),
                    "unknown mode",
                    "write \"delete\" or \"deactivate\"",
                ))
            }
        },
    };

    let interval = ctx.duration(
        &a.interval,
        &k("interval"),
        DEFAULT_INTERVAL,
        Duration::from_secs(1),
        Duration::from_secs(7 * 86400),
    )?;
    let request_timeout = ctx.duration(
        &a.request_timeout,
        &k("request_timeout"),
        DEFAULT_REQUEST_TIMEOUT,
        Duration::from_secs(1),
        Duration::from_secs(600),
    )?;

    let page_size = match &a.page_size {
        None => DEFAULT_PAGE_SIZE,
        Some(p) => match u32::try_from(*p.get_ref()) {
            Ok(n) if (1..=1000).contains(&n) => n,
            _ => {
                return Err(ctx.invalid(
                    p,
                    &k("page_size"),
                    Some(&p.get_ref().to_string()),
                    "outside 1..=1000",
                    "pick a page size between 1 and 1000 (100 is typical)",
                ))
            }
        },
    };

    let concurrency = match &a.concurrency {
        None => DEFAULT_CONCURRENCY,
        Some(n) => match usize::try_from(*n.get_ref()) {
            Ok(n) if (1..=MAX_CONCURRENCY).contains(&n) => n,
            _ => {
                return Err(ctx.invalid(
                    n,
                    &k("concurrency"),
                    Some(&n.get_ref().to_string()),
                    format!("outside 1..={MAX_CONCURRENCY}"),
                    "pick how many SCIM requests may be in flight at once (8 is typical; 1 for a fragile server)",
                ))
            }
        },
    };

    let member_batch_size = match &a.member_batch_size {
        None => DEFAULT_MEMBER_BATCH_SIZE,
        Some(p) => match u32::try_from(*p.get_ref()) {
            Ok(n) if (1..=1000).contains(&n) => n,
            _ => {
                return Err(ctx.invalid(
                    p,
                    &k("member_batch_size"),
                    Some(&p.get_ref().to_string()),
                    "outside 1..=1000",
                    "pick how many group members one PATCH carries, between 1 and 1000 (100 is typical)",
                ))
            }
        },
    };

    let deletion_guard = match &a.deletion_guard {
        None => DeletionGuard::DEFAULT,
        Some(g) => g.get_ref().0.clone().map_err(|reason| {
            ctx.invalid(
                g,
                &k("deletion_guard"),
                None,
                reason,
                "write a count like deletion_guard = 25 or a percentage like deletion_guard = \"10%\"",
            )
        })?,
    };

    let list =
        |v: &Option<Spanned<Vec<String>>>, field: &str| -> Result<Vec<String>, ConfigError> {
            let Some(v) = v else { return Ok(Vec::new()) };
            if v.get_ref().iter().any(|e| e.trim().is_empty()) {
                return Err(ctx.invalid(
                    v,
                    &k(field),
                    None,
                    "an entry is empty",
                    "remove the empty string from the list",
                ));
            }
            Ok(v.get_ref().clone())
        };
    let grant = AccessRule {
        groups: list(&a.grant_groups, "grant_groups")?,
        users: list(&a.grant_users, "grant_users")?,
    };

    Ok(AppConfig {
        name,
        base_url,
        service: service.get_ref().clone(),
        target: target.get_ref().clone(),
        auth,
        skip_tls_check: a.skip_tls_check.unwrap_or(false),
        deprovision,
        interval,
        grant,
        page_size,
        request_timeout,
        concurrency,
        deletion_guard,
        member_batch_size,
        provision_groups: a.provision_groups.unwrap_or(true),
    })
}

fn build_auth(
    ctx: &Ctx<'_>,
    key: &str,
    line: Option<usize>,
    a: &RawApp,
) -> Result<AuthConfig, ConfigError> {
    let k = |field: &str| format!("{key}.{field}");
    let mode = a.auth.as_ref().ok_or_else(|| {
        ctx.missing(
            line,
            &k("auth"),
            "add `auth = \"bearer\"`, `\"basic\"` or `\"none\"`",
        )
    })?;
    let mode_name = mode.get_ref().as_str();
    // A secret that the chosen mode would ignore is almost always a mistake in `auth`.
    let refuse = |present: Option<Option<usize>>, field: &str| -> Result<(), ConfigError> {
        match present {
            Some(l) => Err(ConfigError::Invalid {
                path: ctx.path.to_path_buf(),
                line: l,
                key: k(field),
                value: None,
                problem: format!(
                    "is set but auth = {mode_name:?} does not use it; remove it, or change auth"
                ),
            }),
            None => Ok(()),
        }
    };
    let token_at = a
        .token
        .as_ref()
        .map(|s| ctx.line(s))
        .or(a.token_file.as_ref().map(|s| ctx.line(s)));
    let user_at = a.username.as_ref().map(|s| ctx.line(s));
    let pass_at = a
        .password
        .as_ref()
        .map(|s| ctx.line(s))
        .or(a.password_file.as_ref().map(|s| ctx.line(s)));
    match mode_name {
        "none" => {
            refuse(token_at, "token")?;
            refuse(user_at, "username")?;
            refuse(pass_at, "password")?;
            Ok(AuthConfig::None)
        }
        "bearer" => {
            refuse(user_at, "username")?;
            refuse(pass_at, "password")?;
            let token = ctx
                .secret(&k("token"), &a.token, &a.token_file)?
                .ok_or_else(|| {
                    ctx.missing(
                        line,
                        &k("token"),
                        "add `token = \"...\"`, `token = \"env:NAME\"` or `token_file = \"/path\"`",
                    )
                })?;
            Ok(AuthConfig::Bearer { token })
        }
        "basic" => {
            refuse(token_at, "token")?;
            let username = a
                .username
                .as_ref()
                .ok_or_else(|| ctx.missing(line, &k("username"), "add `username = \"...\"`"))?;
            if username.get_ref().is_empty() || username.get_ref().contains(':') {
                return Err(ctx.invalid(
                    username,
                    &k("username"),
                    Some(username.get_ref()),
                    "a basic-auth user name is non-empty and has no `:`",
                    "fix the user name",
                ));
            }
            let password = ctx
                .secret(&k("password"), &a.password, &a.password_file)?
                .ok_or_else(|| ctx.missing(line, &k("password"), "add `password = \"...\"`, `password = \"env:NAME\"` or `password_file = \"/path\"`"))?;
            Ok(AuthConfig::Basic {
                username: username.get_ref().clone(),
                password,
            })
        }
        other => Err(ctx.invalid(
            mode,
            &k("auth"),
            Some(other),
            "unknown auth mode",
            "write \"bearer\", \"basic\" or \"none\"",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SID: &str = "0123456789abcdef0123";

    fn p() -> PathBuf {
        PathBuf::from("/etc/connect/hub.toml")
    }

    fn head() -> String {
        format!(
            "listen = \"0.0.0.0:8443\"\ntls_cert = \"hub-cert.pem\"\ntls_key = \"/keys/hub-key.pem\"\ndirectory = \"directory.json\"\n\n\
             [admin]\ntoken = \"admin-secret-token\"\n\n[[services]]\nname = \"acme\"\nservice_id = \"{SID}\"\n\n"
        )
    }

    fn app(extra: &str) -> String {
        format!(
            "{}[apps.crm]\nbase_url = \"https://crm.local:8443/scim/v2/\"\nservice = \"acme\"\ntarget = \"crm\"\nauth = \"bearer\"\ntoken = \"tok-abc\"\n{extra}",
            head()
        )
    }

    fn err(text: &str) -> String {
        let msg = HubConfig::parse(text, &p()).unwrap_err().to_string();
        assert!(!msg.contains('\n'), "multi-line: {msg}");
        for secret in [SID, "admin-secret-token", "tok-abc", "pw-xyz"] {
            assert!(!msg.contains(secret), "secret leaked: {msg}");
        }
        msg
    }

    #[test]
    fn happy_path_and_defaults() {
        let c = HubConfig::parse(&app(""), &p()).unwrap();
        assert_eq!(c.listen, "0.0.0.0:8443".parse().unwrap());
        assert_eq!(c.tls_cert, PathBuf::from("/etc/connect/hub-cert.pem"));
        assert_eq!(c.tls_key, PathBuf::from("/keys/hub-key.pem"));
        assert_eq!(c.state_dir, PathBuf::from("/etc/connect/state"));
        assert_eq!(c.directory, PathBuf::from("/etc/connect/directory.json"));
        assert_eq!(c.admin.listen, "127.0.0.1:8089".parse().unwrap());
        assert_eq!(c.admin.token.expose(), "admin-secret-token");
        let s = c.service("acme").unwrap();
        assert_eq!((s.service_id.expose(), s.enabled), (SID, true));
        let a = c.app("crm").unwrap();
        assert_eq!(a.base_url.to_string(), "https://crm.local:8443/scim/v2");
        assert_eq!(
            (
                a.base_url.host.as_str(),
                a.base_url.sni_host.as_str(),
                a.base_url.path.as_str()
            ),
            ("crm.local:8443", "crm.local", "/scim/v2")
        );
        assert_eq!((a.service.as_str(), a.target.as_str()), ("acme", "crm"));
        assert_eq!(a.deprovision, DeprovisionMode::Deactivate);
        assert_eq!(a.interval, DEFAULT_INTERVAL);
        assert_eq!(a.page_size, 100);
        assert_eq!(a.request_timeout, Duration::from_secs(30));
        assert_eq!(a.concurrency, DEFAULT_CONCURRENCY);
        assert_eq!(a.deletion_guard, DeletionGuard::DEFAULT);
        assert_eq!(a.member_batch_size, DEFAULT_MEMBER_BATCH_SIZE);
        assert!(a.provision_groups);
        assert!(!a.skip_tls_check);
        assert_eq!(a.grant, AccessRule::default());
        assert!(c.app("nope").is_none() && c.service("nope").is_none());
        let debug = format!("{c:?}");
        for secret in [SID, "admin-secret-token", "tok-abc"] {
            assert!(!debug.contains(secret), "{debug}");
        }
    }

    #[test]
    fn every_app_field() {
        let text = format!(
            "{}[apps.hr]\nbase_url = \"http://[fd00::5]/\"\nservice = \"acme\"\ntarget = \"hr\"\nauth = \"basic\"\nusername = \"svc\"\npassword = \"pw-xyz\"\n\
             skip_tls_check = true\ndeprovision = \"delete\"\ninterval = \"1h30m\"\ngrant_groups = [\"Engineering\", \"g-2\"]\ngrant_users = [\"alice\"]\n\
             page_size = 500\nrequest_timeout = 45\nconcurrency = 2\ndeletion_guard = 25\nmember_batch_size = 7\nprovision_groups = false\n\n\
             [apps.open]\nbase_url = \"https://scim.example.com\"\nservice = \"acme\"\ntarget = \"t\"\nauth = \"none\"\n",
            head()
        );
        let c = HubConfig::parse(&text, &p()).unwrap();
        assert_eq!(
            c.apps.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(),
            ["hr", "open"]
        );
        let a = c.app("hr").unwrap();
        assert_eq!(a.base_url.to_string(), "http://[fd00::5]");
        assert_eq!(
            (
                a.base_url.https,
                a.base_url.sni_host.as_str(),
                a.base_url.path.as_str()
            ),
            (false, "fd00::5", "")
        );
        assert!(a.skip_tls_check);
        assert_eq!(a.deprovision, DeprovisionMode::Delete);
        assert_eq!(a.interval, Duration::from_secs(5400));
        assert_eq!(a.grant.groups, ["Engineering", "g-2"]);
        assert_eq!(a.grant.users, ["alice"]);
        assert_eq!(a.page_size, 500);
        assert_eq!(a.request_timeout, Duration::from_secs(45));
        assert_eq!(a.concurrency, 2);
        assert_eq!(a.deletion_guard, DeletionGuard::Count(25));
        assert_eq!(a.member_batch_size, 7);
        assert!(!a.provision_groups);
        assert_eq!(
            a.auth.authorization().unwrap().expose(),
            "Basic c3ZjOnB3LXh5eg=="
        );
        assert_eq!(c.app("open").unwrap().auth, AuthConfig::None);
        assert!(c.app("open").unwrap().auth.authorization().is_none());
    }

    #[test]
    fn bearer_prefix_is_added_only_when_missing() {
        let auth = |t: &str| {
            AuthConfig::Bearer {
                token: Secret::new(t),
            }
            .authorization()
            .unwrap()
            .expose()
            .to_string()
        };
        assert_eq!(auth("abc"), "Bearer abc");
        assert_eq!(auth("Bearer abc"), "Bearer abc");
        assert_eq!(auth("bearer abc"), "bearer abc");
        assert_eq!(auth("  abc \n"), "Bearer abc");
        assert_eq!(auth("Bearerabc"), "Bearer Bearerabc");
    }

    #[test]
    fn secrets_from_env_and_files() {
        std::env::set_var("SCIM_CONNECT_TEST_HUB_TOKEN", "env-token");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("acme.id"), format!("{SID}\n")).unwrap();
        std::fs::write(dir.path().join("admin.token"), "file-admin\n").unwrap();
        let text = "listen = \"0.0.0.0:8443\"\ntls_cert = \"c\"\ntls_key = \"k\"\ndirectory = \"d\"\n[admin]\nlisten = \"127.0.0.1:9000\"\ntoken_file = \"admin.token\"\n\
                    [[services]]\nname = \"acme\"\nservice_id_file = \"acme.id\"\nenabled = false\n\
                    [apps.a]\nbase_url = \"https://h/\"\nservice = \"acme\"\ntarget = \"t\"\nauth = \"bearer\"\ntoken = \"env:SCIM_CONNECT_TEST_HUB_TOKEN\"\n";
        let c = HubConfig::parse(text, &dir.path().join("hub.toml")).unwrap();
        assert_eq!(c.admin.token.expose(), "file-admin");
        assert_eq!(c.admin.listen.port(), 9000);
        assert_eq!(c.services[0].service_id.expose(), SID);
        assert!(!c.services[0].enabled);
        assert_eq!(
            c.apps[0].auth.authorization().unwrap().expose(),
            "Bearer env-token"
        );
        let m = err(&app("").replace("tok-abc", "env:SCIM_CONNECT_TEST_HUB_UNSET"));
        assert!(m.contains(":18: `apps.crm.token`: environment variable SCIM_CONNECT_TEST_HUB_UNSET is not set"), "{m}");
    }

    #[test]
    fn toml_errors_name_the_line() {
        let m = err(&app("tokn = \"x\"\n"));
        assert!(
            m.starts_with("/etc/connect/hub.toml:19: unknown field `tokn`, expected one of"),
            "{m}"
        );
        assert!(
            m.contains("config/hub.toml in the project is a commented sample"),
            "{m}"
        );
        let m = err("listen = \n");
        assert!(m.starts_with("/etc/connect/hub.toml:1: "), "{m}");
        let m = err(&head().replace("token = \"admin-secret-token\"", "token = 12345"));
        assert!(
            m.contains(":7: ") && m.contains("expected a string") && !m.contains("12345"),
            "{m}"
        );
        let m = err(&app("skip_tls_check = \"yes\"\n"));
        assert!(m.contains(":19: "), "{m}");
    }

    #[test]
    fn missing_fields() {
        let cases = [
            (
                "listen = \"0.0.0.0:8443\"\n",
                "",
                "hub.toml: missing `listen`; add `listen =",
            ),
            (
                "tls_cert = \"hub-cert.pem\"\n",
                "",
                "missing `tls_cert`; add",
            ),
            (
                "tls_key = \"/keys/hub-key.pem\"\n",
                "",
                "missing `tls_key`; add",
            ),
            (
                "directory = \"directory.json\"\n",
                "",
                "missing `directory`; add",
            ),
            (
                "[admin]\ntoken = \"admin-secret-token\"\n",
                "",
                "missing `admin`; add an [admin] section",
            ),
            (
                "token = \"admin-secret-token\"\n",
                "",
                ":6: missing `admin.token`; add `token =",
            ),
            (
                "service_id = \"0123456789abcdef0123\"\n",
                "",
                ":9: missing `services.acme.service_id`; add",
            ),
            (
                "name = \"acme\"\n",
                "",
                ":9: missing `services[0].name`; add `name =",
            ),
        ];
        for (remove, add, want) in cases {
            let text = head().replace(remove, add);
            assert_ne!(text, head());
            let m = err(&text);
            assert!(m.contains(want), "{remove}: {m}");
        }
        for (field, written) in [
            (
                "base_url",
                "base_url = \"https://crm.local:8443/scim/v2/\"\n",
            ),
            ("service", "service = \"acme\"\n"),
            ("target", "target = \"crm\"\n"),
            ("auth", "auth = \"bearer\"\n"),
            ("token", "token = \"tok-abc\"\n"),
        ] {
            let text = app("").replace(written, "");
            assert_ne!(text, app(""));
            let m = err(&text);
            // The line of the [apps.crm] header.
            assert!(
                m.contains(&format!(":13: missing `apps.crm.{field}`; add")),
                "{field}: {m}"
            );
        }
    }

    #[test]
    fn invalid_values_name_the_field() {
        let cases: &[(&str, &str, &str)] = &[
            ("base_url = \"https://crm.local:8443/scim/v2/\"", "base_url = \"ftp://x/\"", ":14: `apps.crm.base_url` = \"ftp://x/\": scheme `ftp` is not supported"),
            ("base_url = \"https://crm.local:8443/scim/v2/\"", "base_url = \"https://u:p@h/\"", "credentials do not belong in the URL"),
            ("base_url = \"https://crm.local:8443/scim/v2/\"", "base_url = \"https://h/s?x=1\"", "no query or fragment"),
            ("base_url = \"https://crm.local:8443/scim/v2/\"", "base_url = \"https://h:0/\"", "out of range"),
            ("service = \"acme\"\ntarget", "service = \"other\"\ntarget", ":15: `apps.crm.service` = \"other\": no [[services]] entry has this name; use one of: acme"),
            ("target = \"crm\"", "target = \"c r m\"", ":16: `apps.crm.target` = \"c r m\""),
            ("auth = \"bearer\"", "auth = \"oauth\"", ":17: `apps.crm.auth` = \"oauth\": unknown auth mode; write \"bearer\", \"basic\" or \"none\""),
            ("listen = \"0.0.0.0:8443\"", "listen = \"localhost:8443\"", ":1: `listen` = \"localhost:8443\": not an ip:port address; write it like"),
            ("[admin]\n", "[admin]\nlisten = \"1.2.3.4\"\n", ":7: `admin.listen` = \"1.2.3.4\": not an ip:port"),
            ("service_id = \"0123456789abcdef0123\"", "service_id = \"short\"", ":11: `services.acme.service_id`: the service id is only 5 characters long"),
            ("name = \"acme\"", "name = \"ac me\"", ":10: `services[0].name` = \"ac me\""),
        ];
        for (from, to, want) in cases {
            let text = app("").replacen(from, to, 1);
            assert_ne!(text, app(""), "{from}");
            let m = err(&text);
            assert!(m.contains(want), "{to}: {m}");
        }
        let extra: &[(&str, &str)] = &[
            ("deprovision = \"archive\"\n", ":19: `apps.crm.deprovision` = \"archive\": unknown mode; write \"delete\" or \"deactivate\""),
            ("interval = \"5 minutes\"\n", ":19: `apps.crm.interval`: unknown unit"),
            ("interval = \"300\"\n", ":19: `apps.crm.interval`: `300` has no unit; add s, m or h"),
            ("interval = \"0s\"\n", ":19: `apps.crm.interval`: 0 s is outside 1 s ..= 604800 s"),
            ("request_timeout = \"1h\"\n", ":19: `apps.crm.request_timeout`: 3600 s is outside"),
            ("page_size = 0\n", ":19: `apps.crm.page_size` = \"0\": outside 1..=1000"),
            ("page_size = 1001\n", "outside 1..=1000"),
            ("concurrency = 0\n", ":19: `apps.crm.concurrency` = \"0\": outside 1..=64"),
            ("concurrency = 65\n", "outside 1..=64; pick how many SCIM requests"),
            ("grant_users = [\"\"]\n", ":19: `apps.crm.grant_users`: an entry is empty"),
            ("member_batch_size = 0\n", ":19: `apps.crm.member_batch_size` = \"0\": outside 1..=1000"),
            ("deletion_guard = \"ten\"\n", ":19: `apps.crm.deletion_guard`: `ten` is neither a count like 25 nor a percentage like \"10%\"; write a count like deletion_guard = 25 or a percentage like deletion_guard = \"10%\""),
            ("deletion_guard = \"150%\"\n", ":19: `apps.crm.deletion_guard`: 150% is more than 100%"),
            ("deletion_guard = \"0%\"\n", "write 0 to refuse every deprovisioning"),
            ("deletion_guard = -3\n", ":19: `apps.crm.deletion_guard`: -3 is negative"),
            ("deletion_guard = true\n", ":19: "),
            ("username = \"u\"\n", ":19: `apps.crm.username`: is set but auth = \"bearer\" does not use it; remove it, or change auth"),
        ];
        for (line, want) in extra {
            let m = err(&app(line));
            assert!(m.contains(want), "{line}: {m}");
        }
        let m = err(&app("").replace("[apps.crm]", "[apps.\"c r m\"]"));
        assert!(
            m.contains(":13: `apps.c r m` = \"c r m\": app name:"),
            "{m}"
        );
    }

    #[test]
    fn auth_combinations() {
        let basic = app("").replace(
            "auth = \"bearer\"\ntoken = \"tok-abc\"\n",
            "auth = \"basic\"\nusername = \"a:b\"\npassword = \"pw-xyz\"\n",
        );
        let m = err(&basic);
        assert!(m.contains(":18: `apps.crm.username` = \"a:b\": a basic-auth user name is non-empty and has no `:`"), "{m}");
        let m = err(&basic.replace("username = \"a:b\"\n", ""));
        assert!(m.contains(":13: missing `apps.crm.username`"), "{m}");
        let m = err(&basic
            .replace("username = \"a:b\"", "username = \"u\"")
            .replace("password = \"pw-xyz\"\n", ""));
        assert!(m.contains(":13: missing `apps.crm.password`"), "{m}");
        let m = err(&app("token_file = \"t\"\n"));
        assert!(m.contains(":19: `apps.crm.token_file`: both `apps.crm.token` and `apps.crm.token_file` are given; keep only one"), "{m}");
        let m = err(&app("").replace("auth = \"bearer\"", "auth = \"none\""));
        assert!(
            m.contains(":18: `apps.crm.token`: is set but auth = \"none\" does not use it"),
            "{m}"
        );
    }

    #[test]
    fn services_must_be_unique() {
        let dup_id = format!(
            "{}[[services]]\nname = \"other\"\nservice_id = \"{SID}\"\n",
            head()
        );
        let m = err(&dup_id);
        assert!(m.contains(":15: `services.other.service_id`: the same service id as service `acme`; give every service its own id"), "{m}");
        let dup_name = format!(
            "{}[[services]]\nname = \"acme\"\nservice_id = \"another-long-service-id\"\n",
            head()
        );
        let m = err(&dup_name);
        assert!(
            m.contains(":14: `services.acme.name` = \"acme\": another service has the same name"),
            "{m}"
        );
    }

    #[test]
    fn deletion_guards() {
        for (text, want) in [
            ("10%", DeletionGuard::Percent(10)),
            (" 100% ", DeletionGuard::Percent(100)),
            ("25", DeletionGuard::Count(25)),
            ("0", DeletionGuard::Count(0)),
        ] {
            assert_eq!(parse_deletion_guard(text).unwrap(), want, "{text}");
        }
        for bad in ["", "%", "x%", "-1", "1.5%", "101%"] {
            assert!(parse_deletion_guard(bad).is_err(), "{bad}");
        }
        let c = HubConfig::parse(&app("deletion_guard = \"10%\"\n"), &p()).unwrap();
        assert_eq!(c.apps[0].deletion_guard, DeletionGuard::Percent(10));
        let c = HubConfig::parse(&app("deletion_guard = 0\n"), &p()).unwrap();
        assert_eq!(c.apps[0].deletion_guard, DeletionGuard::Count(0));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("2d").unwrap(), Duration::from_secs(172800));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        for bad in ["", "m", "5", "5x", "1.5h", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        let m = err(&app("interval = -5\n"));
        assert!(
            m.contains(":19: `apps.crm.interval`: -5 seconds is negative"),
            "{m}"
        );
    }

    #[test]
    fn base_urls() {
        let u = BaseUrl::parse("HTTPS://Scim.Example.com:443/v2//").unwrap();
        assert_eq!(
            (
                u.https,
                u.host.as_str(),
                u.sni_host.as_str(),
                u.path.as_str()
            ),
            (true, "Scim.Example.com:443", "Scim.Example.com", "/v2")
        );
        assert_eq!(u.to_string(), "https://Scim.Example.com:443/v2");
        for bad in [
            "scim.example.com/v2",
            "https:///v2",
            "https://h h/",
            "https://[::1/",
        ] {
            assert!(BaseUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn load_names_the_missing_file() {
        let m = HubConfig::load(Path::new("/nonexistent/hub.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            m.starts_with("/nonexistent/hub.toml: cannot read the file"),
            "{m}"
        );
    }

    #[test]
    fn sample_hub_toml_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/hub.toml");
        let c = HubConfig::load(&path).unwrap();
        assert_eq!(c.services.len(), 1);
        let app = &c.apps[0];
        assert_eq!(
            c.service(&app.service).map(|s| s.name.as_str()),
            Some("acme")
        );
        assert_eq!(c.directory, path.parent().unwrap().join("directory.json"));
    }
}
