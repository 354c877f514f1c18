//! Host, port and authority checks shared by target addresses, the hub URL, the proxy URL and
//! SCIM base URLs.
//!
//! Owns syntax only. It must never resolve a name or open a connection.

use std::net::{Ipv4Addr, Ipv6Addr};

/// `host[:port]` split apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Authority {
    /// The host as written, IPv6 with its brackets.
    pub host: String,
    /// The host without brackets (for DNS, SNI, `IpAddr` parsing).
    pub bare_host: String,
    /// The port, when written.
    pub port: Option<u16>,
}

/// Checks a host: a DNS name, an IPv4 address or a bracketed IPv6 address.
pub(crate) fn validate_host(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("the host is empty".into());
    }
    if let Some(inner) = host.strip_prefix('[') {
        let inner = inner
            .strip_suffix(']')
            .ok_or("an IPv6 address opened with `[` has no closing `]`")?;
        return inner
            .parse::<Ipv6Addr>()
            .map(|_| ())
            .map_err(|_| format!("`{inner}` is not a valid IPv6 address"));
    }
    if host.contains(':') {
        return Err("an IPv6 address must be written in brackets, e.g. [fd00::12]:443".into());
    }
    if host.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return host
            .parse::<Ipv4Addr>()
            .map(|_| ())
            .map_err(|_| format!("`{host}` is not a valid IPv4 address"));
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.len() > 253 {
        return Err("the host name is longer than 253 characters".into());
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(format!("`{host}` has an empty label (two dots in a row?)"));
        }
        if label.len() > 63 {
            return Err(format!("`{label}` is longer than 63 characters"));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(format!(
                "`{host}` contains {c:?}; a host name uses letters, digits, `-` and `.`"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("`{label}` starts or ends with `-`"));
        }
    }
    Ok(())
}

/// Parses a port: digits only, 1..=65535.
pub(crate) fn parse_port(port: &str) -> Result<u16, String> {
    if port.is_empty() {
        return Err("the port after `:` is empty".into());
    }
    if !port.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!("port `{port}` is not a number"));
    }
    match port.parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        _ => Err(format!("port {port} is out of range 1..65535")),
    }
}

/// Splits and checks `host[:port]` (IPv6 in brackets).
pub(crate) fn parse_authority(s: &str) -> Result<Authority, String> {
    let (host, port) = if s.starts_with('[') {
        let close = s
            .find(']')
            .ok_or("an IPv6 address opened with `[` has no closing `]`")?;
        let (host, rest) = s.split_at(close + 1);
        match rest {
            "" => (host, None),
            _ => match rest.strip_prefix(':') {
                Some(p) => (host, Some(p)),
                None => return Err(format!("unexpected `{rest}` after `{host}`")),
            },
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, _)) if h.contains(':') => {
                return Err(
                    "an IPv6 address must be written in brackets, e.g. [fd00::12]:443".into(),
                )
            }
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    validate_host(host)?;
    let port = port.map(parse_port).transpose()?;
    let bare_host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
        .to_string();
    Ok(Authority {
        host: host.to_string(),
        bare_host,
        port,
    })
}

/// Splits `scheme://rest`, returning the scheme lower-cased. `None` unless the part before
/// `://` is a scheme by RFC 3986 §3.1 (a letter, then letters, digits, `+`, `-` or `.`):
/// callers repeat an unsupported scheme in their error, so it must not be able to carry control
/// characters (found by fuzzing config.ini) or credentials (`user:secret@host://`).
pub(crate) fn split_scheme(url: &str) -> Option<(String, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    let mut chars = scheme.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    valid.then(|| (scheme.to_ascii_lowercase(), rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_rfc_3986_schemes_are_split() {
        assert_eq!(split_scheme("WSS://h/x"), Some(("wss".into(), "h/x")));
        assert_eq!(split_scheme("svn+ssh://h"), Some(("svn+ssh".into(), "h")));
        for bad in [
            "\u{18}wss\0\r+se\0/://hub.example.com/v1/connect",
            "user:secret@proxy://host",
            "://host",
            "1http://host",
            "ht tp://host",
        ] {
            assert_eq!(split_scheme(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn hosts() {
        for ok in [
            "10.0.0.12",
            "scim.internal",
            "a-b.example.com.",
            "[::1]",
            "[fd00::12]",
            "my_host",
        ] {
            assert!(validate_host(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "999.1.1.1",
            "fd00::1",
            "[fd00::1",
            "[zz::]",
            "a..b",
            "-a.com",
            "a b",
            "a/b",
        ] {
            assert!(validate_host(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn authorities() {
        let a = parse_authority("[fd00::12]:8443").unwrap();
        assert_eq!(
            (a.host.as_str(), a.bare_host.as_str(), a.port),
            ("[fd00::12]", "fd00::12", Some(8443))
        );
        let a = parse_authority("crm.local").unwrap();
        assert_eq!(a.port, None);
        assert!(parse_authority("h:0").is_err());
        assert!(parse_authority("h:65536").is_err());
        assert!(parse_authority("h:").is_err());
        assert!(parse_authority("h:x1").is_err());
        assert!(parse_authority("[::1]x").is_err());
    }
}
