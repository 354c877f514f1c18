//! Secret values (service ids, tokens, passwords, proxy credentials) and how config files refer
//! to them: inline, `env:NAME`, or a sibling `<key>_file = "/path"`.
//!
//! This module owns keeping a secret out of every `Debug`, `Display` and error message. It must
//! never print, log or compare a secret in a way that reveals it; code that needs the value calls
//! [`Secret::expose`] at the one place it is used.

use std::fmt;
use std::path::Path;

use super::ConfigError;

/// A secret string. `Debug` and `Display` print `***`; the bytes are overwritten on drop.
#[derive(Clone, Default)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The secret itself, for the one place that must use it (a header, a key derivation).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the secret is the empty string.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl PartialEq for Secret {
    /// Compares without stopping at the first differing byte, so timing reveals only the length.
    fn eq(&self, other: &Self) -> bool {
        let (a, b) = (self.0.as_bytes(), other.0.as_bytes());
        if a.len() != b.len() {
            return false;
        }
        a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl Eq for Secret {}

impl Drop for Secret {
    fn drop(&mut self) {
        let mut bytes = std::mem::take(&mut self.0).into_bytes();
        bytes.iter_mut().for_each(|b| *b = 0);
        // Keeps the zeroing from being optimised away as a dead store.
        std::hint::black_box(&bytes);
    }
}

/// Where a secret key's value came from in a config file: the key's own value and/or its
/// `<key>_file` sibling, each with its line when the format gives one.
pub(crate) struct SecretSource<'a> {
    /// The key name, e.g. `service_id` or `apps.crm.token`.
    pub key: &'a str,
    /// `<key> = ...` as written (literal or `env:NAME`).
    pub value: Option<(&'a str, Option<usize>)>,
    /// `<key>_file = ...` as written.
    pub file: Option<(&'a str, Option<usize>)>,
}

/// Prefix that makes a secret value name an environment variable instead.
const ENV_PREFIX: &str = "env:";

impl SecretSource<'_> {
    /// Checks that at most one source is given, without reading anything.
    pub(crate) fn check_exclusive(&self, config_path: &Path) -> Result<(), ConfigError> {
        if let (Some(_), Some((_, line))) = (self.value, self.file) {
            return Err(ConfigError::Invalid {
                path: config_path.to_path_buf(),
                line,
                key: format!("{}_file", self.key),
                value: None,
                problem: format!(
                    "both `{0}` and `{0}_file` are given; keep only one of them",
                    self.key
                ),
            });
        }
        Ok(())
    }

    /// Whether either source is present.
    pub(crate) fn is_given(&self) -> bool {
        self.value.is_some() || self.file.is_some()
    }

    /// Reads the secret: a literal value, `env:NAME`, or the trimmed content of the
    /// `<key>_file` (relative paths against the config file's folder). `Ok(None)` when neither
    /// is given. An empty result is an error.
    pub(crate) fn resolve(&self, config_path: &Path) -> Result<Option<Secret>, ConfigError> {
        self.check_exclusive(config_path)?;
        let err =
            |line: Option<usize>, key: String, reason: String, fix: String| ConfigError::Secret {
                path: config_path.to_path_buf(),
                line,
                key,
                reason,
                fix,
            };
        if let Some((written, line)) = self.value {
            if let Some(var) = written.strip_prefix(ENV_PREFIX) {
                let var = var.trim();
                if var.is_empty() {
                    return Err(err(
                        line,
                        self.key.to_string(),
                        "`env:` is not followed by a variable name".into(),
                        "write `env:NAME` with the variable's name".into(),
                    ));
                }
                return match std::env::var(var) {
                    Ok(v) if v.trim().is_empty() => Err(err(
                        line,
                        self.key.to_string(),
                        format!("environment variable {var} is empty"),
                        format!("set {var} to the secret in the environment of this process"),
                    )),
                    Ok(v) => Ok(Some(Secret::new(v.trim()))),
                    Err(std::env::VarError::NotPresent) => Err(err(
                        line,
                        self.key.to_string(),
                        format!("environment variable {var} is not set"),
                        format!("set {var} in the environment of this process (e.g. systemd Environment=) or write the secret in the file"),
                    )),
                    Err(std::env::VarError::NotUnicode(_)) => Err(err(
                        line,
                        self.key.to_string(),
                        format!("environment variable {var} is not valid UTF-8"),
                        format!("set {var} to a UTF-8 value"),
                    )),
                };
            }
            if written.trim().is_empty() {
                return Err(err(
                    line,
                    self.key.to_string(),
                    "the value is empty".into(),
                    format!(
                        "write the secret, `env:NAME`, or use `{}_file = \"/path\"`",
                        self.key
                    ),
                ));
            }
            return Ok(Some(Secret::new(written)));
        }
        if let Some((written, line)) = self.file {
            let key = format!("{}_file", self.key);
            if written.trim().is_empty() {
                return Err(err(
                    line,
                    key,
                    "the path is empty".into(),
                    "write the path of a file holding the secret".into(),
                ));
            }
            let file = super::resolve_path(config_path, written);
            return match std::fs::read_to_string(&file) {
                Ok(content) if content.trim().is_empty() => Err(err(
                    line,
                    key,
                    format!("{} is empty", file.display()),
                    "put the secret in that file".into(),
                )),
                Ok(content) => Ok(Some(Secret::new(content.trim()))),
                Err(e) => Err(err(
                    line,
                    key,
                    format!("cannot read {} ({e})", file.display()),
                    "fix the path (relative paths start at the config file's folder) or the file's permissions".into(),
                )),
            };
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn debug_and_display_hide_the_value() {
        let s = Secret::new("hunter2-very-secret");
        assert_eq!(format!("{s:?}"), "***");
        assert_eq!(format!("{s}"), "***");
        assert_eq!(format!("{:?}", Some(s.clone())), "Some(***)");
        assert_eq!(s.expose(), "hunter2-very-secret");
    }

    #[test]
    fn equality_compares_the_value() {
        assert_eq!(Secret::new("abc"), Secret::new("abc"));
        assert_ne!(Secret::new("abc"), Secret::new("abd"));
        assert_ne!(Secret::new("abc"), Secret::new("abcd"));
    }

    fn cfg() -> PathBuf {
        PathBuf::from("/etc/connect/test.conf")
    }

    #[test]
    fn env_reference_reads_the_variable() {
        std::env::set_var("SCIM_CONNECT_TEST_SECRET_A", "  from-env  ");
        let src = SecretSource {
            key: "token",
            value: Some(("env:SCIM_CONNECT_TEST_SECRET_A", Some(3))),
            file: None,
        };
        assert_eq!(src.resolve(&cfg()).unwrap().unwrap().expose(), "from-env");
    }

    #[test]
    fn unset_env_variable_is_named_in_the_error() {
        let src = SecretSource {
            key: "token",
            value: Some(("env:SCIM_CONNECT_TEST_SURELY_UNSET", Some(4))),
            file: None,
        };
        let msg = src.resolve(&cfg()).unwrap_err().to_string();
        assert!(
            msg.starts_with("/etc/connect/test.conf:4: `token`"),
            "{msg}"
        );
        assert!(
            msg.contains("SCIM_CONNECT_TEST_SURELY_UNSET is not set"),
            "{msg}"
        );
        assert!(!msg.contains('\n'));
    }

    #[test]
    fn file_reference_is_read_trimmed_and_relative_to_the_config() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tok"), "file-secret\n").unwrap();
        let conf = dir.path().join("hub.toml");
        let src = SecretSource {
            key: "token",
            value: None,
            file: Some(("tok", Some(2))),
        };
        assert_eq!(src.resolve(&conf).unwrap().unwrap().expose(), "file-secret");
    }

    #[test]
    fn missing_file_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("hub.toml");
        let src = SecretSource {
            key: "token",
            value: None,
            file: Some(("nope.txt", Some(7))),
        };
        let msg = src.resolve(&conf).unwrap_err().to_string();
        assert!(msg.contains(":7: `token_file`"), "{msg}");
        assert!(msg.contains("nope.txt"), "{msg}");
        assert!(msg.contains("fix the path"), "{msg}");
    }

    #[test]
    fn both_sources_is_an_error_without_the_secret() {
        let src = SecretSource {
            key: "token",
            value: Some(("s3cr3t-value", Some(1))),
            file: Some(("f", Some(2))),
        };
        let msg = src.resolve(&cfg()).unwrap_err().to_string();
        assert!(msg.contains(":2: `token_file`"), "{msg}");
        assert!(msg.contains("keep only one"), "{msg}");
        assert!(!msg.contains("s3cr3t"), "{msg}");
    }

    #[test]
    fn empty_values_are_refused() {
        let src = SecretSource {
            key: "token",
            value: Some(("  ", Some(1))),
            file: None,
        };
        assert!(src
            .resolve(&cfg())
            .unwrap_err()
            .to_string()
            .contains("empty"));
        let none = SecretSource {
            key: "token",
            value: None,
            file: None,
        };
        assert!(none.resolve(&cfg()).unwrap().is_none());
    }
}
