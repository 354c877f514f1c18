//! Line-level reading of the agent's `config.ini`: each line is blank, a comment, a `[section]`
//! header or a `key = value` entry.
//!
//! Owns syntax only (which keys exist is the agent module's business). It must never rewrite a
//! line: `set-target` relies on [`raw_lines`] giving back the file byte for byte.

use std::path::Path;

use super::ConfigError;

/// What one line holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LineKind {
    Blank,
    Comment,
    /// `[name]`, the name trimmed.
    Section(String),
    /// `key = value`, both trimmed, the value without quotes or trailing comment.
    Entry {
        key: String,
        value: String,
    },
}

/// A classified line with its 1-based number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Line {
    pub number: usize,
    pub kind: LineKind,
}

/// The file's lines, each with its terminator, so that concatenating them gives the text back.
pub(crate) fn raw_lines(text: &str) -> Vec<&str> {
    text.split_inclusive('\n').collect()
}

/// Classifies every line; the first syntax error names its line.
pub(crate) fn parse_lines(text: &str, path: &Path) -> Result<Vec<Line>, ConfigError> {
    raw_lines(text)
        .into_iter()
        .enumerate()
        .map(|(i, raw)| {
            let number = i + 1;
            let mut content = raw.trim_end_matches(['\n', '\r']);
            if number == 1 {
                content = content.strip_prefix('\u{feff}').unwrap_or(content);
            }
            classify(content)
                .map(|kind| Line { number, kind })
                .map_err(|(message, fix)| ConfigError::Syntax {
                    path: path.to_path_buf(),
                    line: Some(number),
                    message,
                    fix,
                })
        })
        .collect()
}

fn is_comment_start(s: &str) -> bool {
    s.starts_with('#') || s.starts_with(';')
}

fn classify(content: &str) -> Result<LineKind, (String, String)> {
    let t = content.trim();
    if t.is_empty() {
        return Ok(LineKind::Blank);
    }
    if is_comment_start(t) {
        return Ok(LineKind::Comment);
    }
    // A control character inside a section header or an entry would be repeated by the error
    // about it, and a CR or NUL in an error breaks the one-line message (found by fuzzing);
    // none belongs in a key, a name or a value anyway. Comments are never repeated, so keep them.
    if let Some(c) = t.chars().find(|c| c.is_control() && *c != '\t') {
        return Err((
            format!("the line contains the control character {c:?}"),
            "remove it; config.ini is plain text".into(),
        ));
    }
    if let Some(inner) = t.strip_prefix('[') {
        let Some((name, rest)) = inner.split_once(']') else {
            return Err((
                "section header has no closing `]`".into(),
                "write it as [target.<name>]".into(),
            ));
        };
        let rest = rest.trim();
        if !rest.is_empty() && !is_comment_start(rest) {
            return Err((
                "unexpected text after the section header".into(),
                "put only [target.<name>] on the line (a comment may follow after ` #`)".into(),
            ));
        }
        let name = name.trim();
        if name.is_empty() {
            return Err((
                "empty section header `[]`".into(),
                "write it as [target.<name>]".into(),
            ));
        }
        return Ok(LineKind::Section(name.to_string()));
    }
    // The line's content is not echoed: a line without `=` may well be a pasted secret.
    let Some((key, rest)) = t.split_once('=') else {
        return Err((
            "this line is not `key = value`, a [section] header or a comment".into(),
            "write `key = value`, or start the line with # to comment it out".into(),
        ));
    };
    let key = key.trim();
    if key.is_empty() {
        return Err((
            "a value has no key before `=`".into(),
            "write `key = value`".into(),
        ));
    }
    if let Some(c) = key
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return Err((
            format!("key {key:?} contains {c:?}"),
            "keys use letters, digits and `_` (e.g. service_id)".into(),
        ));
    }
    let value = parse_value(rest).map_err(|message| {
        (
            format!("value of `{key}`: {message}"),
            "close the quote, or drop the quotes".to_string(),
        )
    })?;
    Ok(LineKind::Entry {
        key: key.to_string(),
        value,
    })
}

/// The value after `=`: trimmed, optional double quotes removed, trailing ` # comment` or
/// ` ; comment` removed. A `#` or `;` not preceded by whitespace belongs to the value, so URLs
/// and passwords containing them survive.
fn parse_value(rest: &str) -> Result<String, String> {
    let v = rest.trim_start();
    if let Some(quoted) = v.strip_prefix('"') {
        let Some((inside, after)) = quoted.split_once('"') else {
            return Err("the opening `\"` has no closing `\"`".into());
        };
        let after = after.trim();
        if !after.is_empty() && !is_comment_start(after) {
            return Err("unexpected text after the closing `\"`".into());
        }
        return Ok(inside.to_string());
    }
    if is_comment_start(v) {
        return Ok(String::new());
    }
    let mut end = v.len();
    let mut prev_space = false;
    for (i, c) in v.char_indices() {
        if prev_space && (c == '#' || c == ';') {
            end = i;
            break;
        }
        prev_space = c.is_whitespace();
    }
    Ok(v[..end].trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(text: &str) -> Vec<LineKind> {
        parse_lines(text, Path::new("c.ini"))
            .unwrap()
            .into_iter()
            .map(|l| l.kind)
            .collect()
    }

    fn entry(k: &str, v: &str) -> LineKind {
        LineKind::Entry {
            key: k.into(),
            value: v.into(),
        }
    }

    #[test]
    fn classifies_lines() {
        let text = "\u{feff}# c\n; c2\n\n a = b \n[target.x] # t\nk = v # trailing\nq = \"a # b\" ; c\nu = http://h/#frag\ne =\nf = # nothing\n";
        assert_eq!(
            kinds(text),
            vec![
                LineKind::Comment,
                LineKind::Comment,
                LineKind::Blank,
                entry("a", "b"),
                LineKind::Section("target.x".into()),
                entry("k", "v"),
                entry("q", "a # b"),
                entry("u", "http://h/#frag"),
                entry("e", ""),
                entry("f", ""),
            ]
        );
    }

    #[test]
    fn raw_lines_round_trip() {
        let text = "a = 1\r\n\r\n# x\nb = 2";
        assert_eq!(raw_lines(text).concat(), text);
        assert_eq!(kinds(text)[0], entry("a", "1"));
    }

    #[test]
    fn syntax_errors_name_the_line_and_hide_the_content() {
        let e = parse_lines("a = 1\n2jy34wpcohrhdytr\n", Path::new("/x/c.ini")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("/x/c.ini:2: "), "{msg}");
        assert!(!msg.contains("2jy34"), "{msg}");
        assert!(msg.contains("start the line with #"), "{msg}");
        for bad in [
            "[target.x",
            "[target.x] junk",
            "[]",
            "= v",
            "a b = c",
            "k = \"open",
        ] {
            let msg = parse_lines(bad, Path::new("c.ini"))
                .unwrap_err()
                .to_string();
            assert!(msg.starts_with("c.ini:1: "), "{bad}: {msg}");
            assert!(!msg.contains('\n'));
        }
    }

    #[test]
    fn control_characters_outside_comments_are_refused_without_being_repeated() {
        // fuzz/artifacts/config_ini/crash-d54383c6…: a section name holding NUL and CR was
        // repeated raw in the error about it.
        for bad in [
            "[target.wiki.\0\rGG.lan]",
            "addr = 10.0.0.1:80\r\0",
            "hub = \u{18}wss://h",
            "service\u{7f}_id = x",
        ] {
            let msg = parse_lines(bad, Path::new("c.ini"))
                .unwrap_err()
                .to_string();
            assert!(msg.starts_with("c.ini:1: "), "{bad:?}: {msg}");
            assert!(!msg.contains(|c: char| c.is_control()), "{msg:?}");
        }
        // CRLF line ends, tabs and control characters inside comments stay fine.
        let lines = parse_lines("a\t= 1\r\n# bell \u{7}\r\n", Path::new("c.ini")).unwrap();
        assert_eq!(lines.len(), 2);
    }
}
