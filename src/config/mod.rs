//! Configuration files: the agent's `config.ini` (reading it, and the comment-preserving edit done
//! by `connect set-target`), the hub's `hub.toml`, the directory JSON of users and groups, and the
//! secrets those files refer to.
//!
//! This module owns turning text into validated values and every error message a user sees about
//! a file. It must never start actors, open sockets or check anything on disk beyond the files it
//! is asked to read (and the `*_file` secrets and PEM trust-anchor files they name, so that a bad
//! one is reported with its line): whether `state_dir` is usable is the running role's business. It must never put a secret value into an error, `Debug` or
//! `Display` output.

pub mod agent;
pub mod directory;
pub mod hub;
pub mod secret;

mod fsutil;
mod ini;
mod netaddr;
mod suggest;

use std::path::{Path, PathBuf};

pub use secret::Secret;

/// Everything that can be wrong with a configuration file or a `set-target` request.
///
/// Each message is a single line that names the file (and the line when known), the key or
/// field, the offending value unless it is a secret, and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file itself could not be read.
    #[error("{}: cannot read the file ({source}); check the path, that it is UTF-8 text and that this user may read it", .path.display())]
    Read {
        /// The file that was asked for.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },

    /// An edited file could not be written; the original is left as it was.
    #[error("{}: cannot write the file ({source}); nothing was changed; check that this user may write to the file and its folder", .path.display())]
    Write {
        /// The file being replaced.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },

    /// Text that is not valid syntax for the file's format.
    #[error("{}: {message}; {fix}", at(.path, .line))]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line, when known.
        line: Option<usize>,
        /// What is wrong.
        message: String,
        /// What to do about it.
        fix: String,
    },

    /// A key the format does not know (possibly a typo).
    #[error("{}: unknown key `{key}`{}; {fix}", at(.path, &Some(*.line)), in_section(.section))]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// The key as written.
        key: String,
        /// The section it appeared in (`None` for the top level).
        section: Option<String>,
        /// A did-you-mean suggestion or the list of known keys.
        fix: String,
    },

    /// A required key or field is absent.
    #[error("{}: missing `{key}`; {fix}", at(.path, .line))]
    Missing {
        /// The file.
        path: PathBuf,
        /// The line of the section that lacks the key, when there is one.
        line: Option<usize>,
        /// The missing key, with its section prefix (e.g. `[target.crm] addr`).
        key: String,
        /// What to add.
        fix: String,
    },

    /// A key or section given more than once.
    #[error("{}: `{key}` is given twice (first on line {first_line}); keep only one", at(.path, &Some(*.line)))]
    Duplicate {
        /// The file.
        path: PathBuf,
        /// 1-based line of the second occurrence.
        line: usize,
        /// The key or section header.
        key: String,
        /// 1-based line of the first occurrence.
        first_line: usize,
    },

    /// A value that is present but not acceptable.
    #[error("{}: `{key}`{}: {problem}", at(.path, .line), shown(.value))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based line, when known.
        line: Option<usize>,
        /// The key or field path (e.g. `apps.crm.base_url`, `users[2].userName`).
        key: String,
        /// The value as written; `None` when it is a secret or not worth repeating.
        value: Option<String>,
        /// What is wrong with it and what to do about it (`reason; fix`).
        problem: String,
    },

    /// A secret reference (`env:NAME` or `<key>_file`) that cannot be resolved.
    #[error("{}: `{key}`: {reason}; {fix}", at(.path, .line))]
    Secret {
        /// The file holding the reference.
        path: PathBuf,
        /// 1-based line, when known.
        line: Option<usize>,
        /// The key holding the reference.
        key: String,
        /// What failed; names the variable or the file, never the secret.
        reason: String,
        /// What to do about it.
        fix: String,
    },

    /// `set-target` for a name that is already declared, without `-override`.
    #[error("{}:{line}: target `{name}` already exists; add -override to replace its whole [target.{name}] section (file left unchanged)", .path.display())]
    TargetExists {
        /// The config file.
        path: PathBuf,
        /// 1-based line of the existing section header.
        line: usize,
        /// The target name.
        name: String,
    },

    /// A `set-target` argument is invalid; the file was not touched.
    #[error("set-target: {what} {value:?} is invalid: {reason}; {fix} ({} left unchanged)", .path.display())]
    Argument {
        /// The config file that was not modified.
        path: PathBuf,
        /// Which argument (`target name`, `address`).
        what: &'static str,
        /// The argument as given.
        value: String,
        /// What is wrong with it.
        reason: String,
        /// What to do about it.
        fix: String,
    },
}

/// `path:line` or `path`.
fn at(path: &Path, line: &Option<usize>) -> String {
    match line {
        Some(n) => format!("{}:{n}", path.display()),
        None => path.display().to_string(),
    }
}

fn in_section(section: &Option<String>) -> String {
    match section {
        Some(s) => format!(" in [{s}]"),
        None => String::new(),
    }
}

fn shown(value: &Option<String>) -> String {
    match value {
        // Debug quoting keeps the message on one line whatever the value holds.
        Some(v) => format!(" = {v:?}"),
        None => String::new(),
    }
}

/// The folder that relative paths in a config file are resolved against.
fn base_dir(config_path: &Path) -> &Path {
    config_path.parent().unwrap_or(Path::new(""))
}

/// Resolves a path written in a config file against the file's folder.
fn resolve_path(config_path: &Path, written: &str) -> PathBuf {
    base_dir(config_path).join(written)
}

/// 1-based line number of a byte offset in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// Keeps a message from a parser library on one line.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}
