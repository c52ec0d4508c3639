//! Log output (issue 17): text lines by default; `NEXUS_LOG_FORMAT=json` (or `--log-format
//! json`) writes one JSON object per line on stderr with the same content (timestamp, level,
//! target, message and the event's fields: core, conn, user, error, ...), and the start-up line
//! still names the address, so the harnesses that wait for `listening on` work in both formats.
//! A value other than `text` or `json` is exit 2 with one line naming the setting.

mod common;

use std::time::Duration;

use serde_json::{Map, Value};

use common::*;

const RUN_TIMEOUT: Duration = Duration::from_secs(10);

/// Every line of `logs` as a JSON object with the keys every line carries (panics naming the
/// first line that is not).
fn json_lines(logs: &str) -> Vec<Map<String, Value>> {
    let lines: Vec<Map<String, Value>> = logs
        .lines()
        .map(|line| {
            let Ok(Value::Object(object)) = serde_json::from_str::<Value>(line) else {
                panic!("log line is not a JSON object: {line:?}\nwhole log:\n{logs}");
            };
            for key in ["timestamp", "level", "target", "message"] {
                assert!(object.get(key).is_some_and(Value::is_string), "no string {key:?} in {line}");
            }
            let timestamp = object["timestamp"].as_str().unwrap_or_default();
            assert!(chrono::DateTime::parse_from_rfc3339(timestamp).is_ok(), "timestamp not RFC 3339: {line}");
            let level = object["level"].as_str().unwrap_or_default();
            assert!(["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&level), "level {level:?}: {line}");
            assert!(!object["target"].as_str().unwrap_or_default().is_empty(), "empty target: {line}");
            object
        })
        .collect();
    assert!(!lines.is_empty(), "no log lines at all");
    lines
}

/// The first line whose message starts with `message`.
fn event<'a>(lines: &'a [Map<String, Value>], message: &str) -> &'a Map<String, Value> {
    lines
        .iter()
        .find(|l| l["message"].as_str().is_some_and(|m| m.starts_with(message)))
        .unwrap_or_else(|| panic!("no {message:?} event in {lines:#?}"))
}

#[test]
fn json_logs_are_one_object_per_line_with_the_event_fields() {
    let mut server = start_server(&[("NEXUS_LOG_FORMAT", "json"), ("RUST_LOG", "info,nexus=debug")]);
    let port = server.port;
    // A connect (debug: core, conn, user, vsn) ...
    let sub = new_sub();
    let mut client = connect_v2(port, &sub);
    client.heartbeat("1");
    server.wait_for_log(r#""message":"connected""#);
    // ... a refused upgrade (info: core, conn, error) ...
    match try_connect(port, "vsn=2.0.0&token=not-a-jwt", &[], &[]) {
        Err(ConnectError::Status(403)) => {}
        Err(e) => panic!("a bad token must be refused with 403, got {e:?}"),
        Ok(_) => panic!("a bad token must be refused with 403, got a socket"),
    }
    server.wait_for_log("upgrade refused");
    // ... a malformed message (warn: core, conn, user, error), and the drain.
    client.send_text("[not json");
    server.wait_for_log("dropped malformed message");
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(RUN_TIMEOUT);
    assert_eq!(status.code(), Some(0), "{status:?}; stderr:\n{}", server.logs());

    let logs = server.logs();
    let lines = json_lines(&logs);

    let listening = event(&lines, "listening on ");
    assert_eq!(listening["level"], "INFO");
    let expected = format!("listening on 127.0.0.1:{port} ");
    assert!(listening["message"].as_str().is_some_and(|m| m.starts_with(&expected)), "{listening:?}");

    let connected = event(&lines, "connected");
    assert_eq!(connected["level"], "DEBUG");
    assert_eq!(connected["target"], "nexus::server::task");
    assert_eq!(connected["user"], sub.as_str(), "{connected:?}");
    assert!(connected["core"].is_u64() && connected["conn"].is_u64(), "numeric fields stay numbers: {connected:?}");
    assert!(connected.contains_key("vsn"), "{connected:?}");

    let refused = event(&lines, "upgrade refused");
    assert_eq!(refused["level"], "INFO");
    assert!(refused["error"].as_str().is_some_and(|e| !e.is_empty()), "{refused:?}");
    assert!(refused["core"].is_u64() && refused["conn"].is_u64(), "{refused:?}");

    let dropped = event(&lines, "dropped malformed message");
    assert_eq!(dropped["level"], "WARN");
    assert_eq!(dropped["user"], sub.as_str());
    assert!(dropped.contains_key("error"), "{dropped:?}");

    let draining = event(&lines, "draining: ");
    assert_eq!(draining["signal"], "SIGTERM", "{draining:?}");
    assert!(draining["connections"].is_u64(), "{draining:?}");
}

#[test]
fn text_logs_stay_the_default() {
    let server = start_server(&[]);
    match try_connect(server.port, "vsn=2.0.0&token=not-a-jwt", &[], &[]) {
        Err(ConnectError::Status(403)) => {}
        Err(e) => panic!("a bad token must be refused with 403, got {e:?}"),
        Ok(_) => panic!("a bad token must be refused with 403, got a socket"),
    }
    let logs = server.wait_for_log("upgrade refused");
    for line in logs.lines() {
        assert!(serde_json::from_str::<Value>(line).is_err(), "a JSON line in the default format: {line}");
    }
    let listening = logs.lines().find(|l| l.contains("listening on 127.0.0.1:")).expect("a listening line");
    assert!(listening.contains(" INFO ") && listening.contains("nexus::server"), "{listening}");
    let refused = logs.lines().find(|l| l.contains("upgrade refused")).expect("an upgrade refused line");
    assert!(refused.contains(" INFO ") && refused.contains("error="), "{refused}");
    // `text` said explicitly is the same format.
    let explicit = start_server(&[("NEXUS_LOG_FORMAT", "text")]);
    let first = explicit.logs().lines().next().unwrap_or_default().to_string();
    assert!(!first.starts_with('{'), "{first}");
}

#[test]
fn an_unknown_log_format_is_exit_2_with_one_line_naming_the_setting() {
    for (env, args) in [(Some("xml"), &[][..]), (None, &["--log-format", "JSON-lines"][..])] {
        let dir = unique_temp_dir();
        let mut cmd = nexus_command();
        cmd.env("JWT_SECRET", SECRET).env("PORT", "0").env("NEXUS_BIND", "127.0.0.1");
        cmd.env("DATABASE_PATH", dir.join("nexus.db")).args(args);
        if let Some(value) = env {
            cmd.env("NEXUS_LOG_FORMAT", value);
        }
        let (status, stderr) = run_to_exit(cmd, RUN_TIMEOUT);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(status.code(), Some(2), "{env:?} {args:?}: {status:?}; stderr:\n{stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "one line expected: {stderr:?}");
        assert!(lines[0].contains("NEXUS_LOG_FORMAT"), "{stderr:?}");
    }
}

/// With JSON logs a configuration error is one JSON line too (level ERROR, naming the setting),
/// still exit 2; the flag selects the format like the variable.
#[test]
fn json_configuration_errors_are_one_json_line() {
    let dir = unique_temp_dir();
    let mut cmd = nexus_command();
    cmd.env("JWT_SECRET", SECRET).env("PORT", "0").env("NEXUS_BIND", "127.0.0.1").env("NEXUS_WORKERS", "0");
    cmd.env("DATABASE_PATH", dir.join("nexus.db")).args(["--log-format", "json"]);
    let (status, stderr) = run_to_exit(cmd, RUN_TIMEOUT);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(status.code(), Some(2), "{status:?}; stderr:\n{stderr}");
    let lines = json_lines(stderr.trim_end());
    assert_eq!(lines.len(), 1, "one line expected: {stderr:?}");
    assert_eq!(lines[0]["level"], "ERROR");
    assert!(lines[0]["message"].as_str().is_some_and(|m| m.contains("NEXUS_WORKERS")), "{stderr:?}");
}
