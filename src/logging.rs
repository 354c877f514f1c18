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
