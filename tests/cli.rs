//! The `nexus` binary's command line: a missing JWT_SECRET is a clear exit 2, `nexus token`
//! mints HS256 tokens the server accepts, and `--help` documents the environment variables.

mod common;

use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use common::*;

const RUN_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `cmd` to completion, killing it and failing if it takes longer than [`RUN_TIMEOUT`].
fn run(mut cmd: Command) -> Output {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawn nexus");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(RUN_TIMEOUT) {
        Ok(output) => output.expect("wait for nexus"),
        Err(_) => {
            // SAFETY: plain kill(2) of the child this test spawned.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
            panic!("nexus did not exit within {RUN_TIMEOUT:?}");
        }
    }
}

/// `nexus` with a private data dir and loopback port 0, so that a binary that wrongly starts
/// serving binds nothing shared.
fn isolated_command(dir: &std::path::Path) -> Command {
    let mut cmd = nexus_command();
    cmd.env("PORT", "0").env("NEXUS_BIND", "127.0.0.1").env("DATABASE_PATH", dir.join("nexus.db"));
    cmd
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
}

fn mint(args: &[&str]) -> (String, Output) {
    let dir = unique_temp_dir();
    let mut cmd = isolated_command(&dir);
    cmd.env("JWT_SECRET", SECRET).arg("token").args(args);
    let out = run(cmd);
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8(out.stdout.clone()).expect("stdout is UTF-8");
    (stdout, out)
}

fn verify(token: &str) -> Claims {
    let header = jsonwebtoken::decode_header(token).expect("token header");
    assert_eq!(header.alg, Algorithm::HS256);
    let data = jsonwebtoken::decode::<Claims>(
        token,
        &DecodingKey::from_secret(SECRET.as_bytes()),
        &Validation::new(Algorithm::HS256),
    )
    .unwrap_or_else(|e| panic!("token {token:?} does not verify with JWT_SECRET: {e}"));
    data.claims
}

#[test]
fn missing_jwt_secret_exits_2_with_one_clear_line() {
    let dir = unique_temp_dir();
    let out = run(isolated_command(&dir));
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "status {:?}, stderr {stderr:?}", out.status);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr, got {stderr:?}");
    assert!(lines[0].contains("JWT_SECRET"), "{stderr:?}");
}

#[test]
fn token_prints_a_verifiable_hs256_token() {
    let sub = new_sub();
    let (stdout, out) = mint(&["--sub", &sub]);
    assert!(out.status.success(), "status {:?}, stderr {:?}", out.status, String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.lines().count(), 1, "one line expected: {stdout:?}");
    let token = stdout.trim();
    let claims = verify(token);
    assert_eq!(claims.sub, sub);
    let now = now_secs();
    // Default TTL 24 h.
    assert!(
        claims.exp > now + 24 * 3600 - 120 && claims.exp <= now + 24 * 3600 + 5,
        "exp {} is not ~24 h from now {now}",
        claims.exp
    );
}

#[test]
fn token_ttl_is_honoured() {
    let sub = new_sub();
    let (stdout, out) = mint(&["--sub", &sub, "--ttl", "1h"]);
    assert!(out.status.success(), "{:?}", String::from_utf8_lossy(&out.stderr));
    let claims = verify(stdout.trim());
    let now = now_secs();
    assert!(
        claims.exp > now + 3600 - 120 && claims.exp <= now + 3600 + 5,
        "exp {} is not ~1 h from now {now}",
        claims.exp
    );
}

#[test]
fn token_refuses_a_non_uuid_sub() {
    let (stdout, out) = mint(&["--sub", "alice"]);
    assert!(!out.status.success(), "minting for a non-UUID sub must fail, printed {stdout:?}");
}

#[test]
fn minted_token_opens_a_socket() {
    let server = start_server(&[]);
    let sub = new_sub();
    let (stdout, out) = mint(&["--sub", &sub]);
    assert!(out.status.success());
    let mut c = connect(server.port, &format!("vsn=2.0.0&token={}", stdout.trim()));
    c.heartbeat("1");
    // The token's sub is the sender of messages.
    let topic = new_topic();
    c.join(&topic, "1");
    c.send_text(&v2(Some("1"), Some("2"), &topic, "new_msg", r#"{"body":"cli"}"#));
    let frame = c.recv();
    assert!(frame.contains(&format!(r#""sender_id":"{sub}""#)), "{frame}");
    c.expect(&v2_ok(Some("1"), "2", &topic));
}

#[test]
fn help_lists_the_environment_variables() {
    let dir = unique_temp_dir();
    let mut cmd = isolated_command(&dir);
    cmd.arg("--help");
    let out = run(cmd);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "--help exit status {:?}", out.status);
    let help = String::from_utf8_lossy(&out.stdout);
    for var in [
        "PORT",
        "NEXUS_BIND",
        "JWT_SECRET",
        "NEXUS_WORKERS",
        "NEXUS_MAX_FRAME_BYTES",
        "NEXUS_IDLE_TIMEOUT",
        "NEXUS_ALLOWED_ORIGINS",
    ] {
        assert!(help.contains(var), "--help does not mention {var}:\n{help}");
    }
}

/// The start-up line names the driver in use; `MONOIO_FORCE_LEGACY_DRIVER=1` (set by the legacy
/// pass of tests/run.sh) must really select the epoll fallback.
#[test]
fn startup_line_names_the_driver() {
    let server = start_server(&[]);
    let logs = server.logs();
    let forced = std::env::var("MONOIO_FORCE_LEGACY_DRIVER").is_ok_and(|v| v == "1");
    let expected = if forced { "driver=epoll" } else { "driver=io_uring" };
    assert!(logs.contains(expected), "expected {expected} in:\n{logs}");
    assert!(logs.contains("workers=2") && logs.contains("open_files=") && logs.contains("max_connections="));
}
