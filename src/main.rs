//! The `nexus` binary: parse configuration, then run the server or a helper command.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use nexus::config::{self, Cli, Command, Config};
use nexus::{auth, ids, server};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for configuration and start-up errors.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
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

fn fail(msg: &str) -> ExitCode {
    eprintln!("nexus: {msg}");
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

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
