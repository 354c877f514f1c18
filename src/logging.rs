//! Log set-up shared by every command: one line per event on stderr through `tracing`, and a
//! panic hook that logs a panic as one line instead of a backtrace (ractor turns the panic into
//! a supervision event; the backtrace would only be noise in an administrator's journal).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the subscriber (level from `RUST_LOG`, else `default_level`) and the panic hook.
pub fn init(default_level: &str) {
    // ractor opens an info span for every actor it starts and carries the current span along
    // with every message; at the default level that was a span (with formatted fields) per
    // forwarded request and an enter/exit per message, for lines nobody reads. RUST_LOG can
    // still ask for them.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{default_level},ractor=warn")));
    // Colours only for a person at a terminal (and not with NO_COLOR): a journal or a log file
    // gets plain lines, and escaping every field was 8 % of the agent's instructions per
    // forwarded request (README, Benchmarks).
    let ansi = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false)
        .try_init();
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".into());
        tracing::error!("panic{location}: {message}");
    }));
}

/// Longest piece of peer-supplied text a log line or error message repeats.
pub const UNTRUSTED_MAX_CHARS: usize = 80;

/// Text that came from a peer (a hub's target name, method or goodbye reason), made safe to put
/// on a log line or into an error message: control characters are escaped (`\n`, `\r`,
/// `\u{1b}`, ...) so the text cannot forge log lines, and it is cut after
/// [`UNTRUSTED_MAX_CHARS`] characters so a megabyte-long name is not repeated back.
pub fn untrusted(text: &str) -> Untrusted<'_> {
    Untrusted(text)
}

/// See [`untrusted`].
#[derive(Clone, Copy)]
pub struct Untrusted<'a>(&'a str);

impl std::fmt::Display for Untrusted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Runs of plain characters are written whole: one call per character was 3 % of the
        // agent's instructions per forwarded request.
        let mut plain_from = 0;
        for (i, (at, c)) in self.0.char_indices().enumerate() {
            if i == UNTRUSTED_MAX_CHARS {
                f.write_str(&self.0[plain_from..at])?;
                return f.write_str("…");
            }
            if c.is_control() {
                f.write_str(&self.0[plain_from..at])?;
                write!(f, "{}", c.escape_default())?;
                plain_from = at + c.len_utf8();
            }
        }
        f.write_str(&self.0[plain_from..])
    }
}

impl std::fmt::Debug for Untrusted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "\"{self}\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untrusted_text_stays_on_one_line_and_is_bounded() {
        assert_eq!(untrusted("crm").to_string(), "crm");
        assert_eq!(
            untrusted("x\r\nINFO forged line\0\u{1b}[2J").to_string(),
            "x\\r\\nINFO forged line\\u{0}\\u{1b}[2J"
        );
        let long = "é".repeat(10 * UNTRUSTED_MAX_CHARS);
        let shown = untrusted(&long).to_string();
        assert_eq!(shown.chars().count(), UNTRUSTED_MAX_CHARS + 1);
        assert!(shown.ends_with('…'));
        // Exactly at the bound nothing is cut; a control at the very end is escaped.
        let full = "a".repeat(UNTRUSTED_MAX_CHARS);
        assert_eq!(untrusted(&full).to_string(), full);
        assert_eq!(untrusted("ab\n").to_string(), "ab\\n");
        assert_eq!(untrusted("\te").to_string(), "\\te");
        // C1 controls (which some terminals obey) are escaped as well.
        assert_eq!(untrusted("\u{9b}").to_string(), "\\u{9b}");
    }
}
