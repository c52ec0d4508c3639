//! The `nexus` binary: parse configuration, then run the server or a helper command.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::Parser;
use nexus::config::{self, Cli, Command, Config, LogFormat};
use nexus::{auth, ids, server};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc asks for transparent huge pages on its 2 MiB-aligned regions, which measured ~50 %
/// more memory per idle connection (1,580 B instead of 1,040 B at 15,000). Switching them off
/// for the process (as `MIMALLOC_ALLOW_THP=0` would, whatever the host's THP mode) leaves huge
/// pages only to the few regions touched before `main`. Best effort: a kernel without it is no
/// error.
#[cfg(feature = "mimalloc")]
fn no_transparent_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes plain integer arguments and touches no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// Exit code for configuration and start-up errors.
const EXIT_CONFIG: u8 = 2;

/// `NEXUS_LOG_FORMAT=json`: the line [`fail`] prints is JSON too.
static JSON_LOGS: AtomicBool = AtomicBool::new(false);

fn main() -> ExitCode {
    #[cfg(feature = "mimalloc")]
    no_transparent_huge_pages();
    let cli = Cli::parse();
    match LogFormat::from_args(&cli.server) {
        Ok(format) => init_logging(format),
        Err(e) => return fail(&e.to_string()),
    }
    abort_on_panic();
    match &cli.command {
        Some(Command::Token { sub, ttl, chats, chat }) => token(&cli, sub, *ttl, chats, chat.as_deref()),
        None => serve(&cli),
    }
}

fn serve(cli: &Cli) -> ExitCode {
    let config = match Config::from_args(&cli.server) {
        Ok(c) => c,
        Err(e) => return fail(&e.to_string()),
    };
    if config.jwt_secret.len() < 32 {
        tracing::warn!("JWT_SECRET is shorter than 32 bytes; use a long random secret in production");
    }
    match server::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e.to_string()),
    }
}

fn token(cli: &Cli, sub: &str, ttl: std::time::Duration, chats: &[String], chat: Option<&str>) -> ExitCode {
    let secret = match config::secret(&cli.server) {
        Ok(s) => s,
        Err(e) => return fail(&e.to_string()),
    };
    let Some(sub) = ids::parse_canonical_uuid(sub) else {
        return fail("--sub must be a UUID (canonical hyphenated form)");
    };
    let Some(chats) = chats.iter().map(|c| ids::parse_canonical_uuid(c)).collect::<Option<Vec<_>>>() else {
        return fail("--chats must be conversation ids (UUIDs, comma separated)");
    };
    let chat = match chat.map(ids::parse_canonical_uuid) {
        Some(None) => return fail("--chat must be a conversation id (UUID)"),
        Some(Some(c)) => Some(c),
        None => None,
    };
    match auth::mint(&secret, sub, ttl, &auth::Grant { chats, chat }) {
        Ok(t) => {
            println!("{t}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e.to_string()),
    }
}

/// Reports a configuration or start-up error on one line of stderr (whatever `RUST_LOG` says),
/// as a log line of the chosen format, and returns exit code 2.
fn fail(msg: &str) -> ExitCode {
    if JSON_LOGS.load(Ordering::Relaxed) {
        /// A JSON log line as init_logging's formatter writes it: same keys, order and timestamp.
        #[derive(serde::Serialize)]
        struct Line<'a> {
            timestamp: String,
            level: &'static str,
            message: &'a str,
            target: &'static str,
        }
        let timestamp = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let line = Line { timestamp, level: "ERROR", message: msg, target: "nexus" };
        eprintln!("{}", serde_json::to_string(&line).unwrap_or_else(|_| format!("nexus: {msg}")));
    } else {
        eprintln!("nexus: {msg}");
    }
    ExitCode::from(EXIT_CONFIG)
}

/// A panic is a bug. One in a core thread would leave the process half alive (that core's
/// sockets frozen, its mailbox filling until the writer blocks on it), so any panic ends the
/// process once it is printed: a supervisor restarts it and clients reconnect.
fn abort_on_panic() {
    let print = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        print(info);
        std::process::abort();
    }));
}

/// Logs go to stderr (stdout is `nexus token`'s output), filtered by `RUST_LOG` (default
/// `info`). `text`: one line per event, coloured on a terminal. `json`: one JSON object per
/// line with the same content, the event's fields at the top level beside `timestamp`, `level`,
/// `target` and `message` (no span fields: the server opens no spans).
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => {
            JSON_LOGS.store(true, Ordering::Relaxed);
            builder.with_ansi(false).json().flatten_event(true).with_current_span(false).with_span_list(false).init();
        }
    }
}
