//! The deployment files (issue 17): `deploy/nexus.service` passes `systemd-analyze verify`
//! without a complaint about any of its lines, and keeps the values the docs promise (the
//! open-file limit of tuning.md's recipe, a stop timeout above the drain); the sysctl drop-in
//! `deploy/sysctl.d/60-nexus.conf` only names kernel settings that exist. Nothing is installed
//! or applied: the unit is verified offline, `/proc/sys` is only looked at.
//!
//! `systemd-analyze` comes with Debian's `systemd` package (tests/run.sh installs it); without
//! it the test fails and says so.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nexus::limits;

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_file(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// The value of the unit's one `key=` line.
fn unit_value<'a>(unit: &'a str, key: &str) -> &'a str {
    let prefix = format!("{key}=");
    let values: Vec<&str> = unit.lines().filter_map(|l| l.strip_prefix(prefix.as_str())).collect();
    assert_eq!(values.len(), 1, "deploy/nexus.service: expected one {key}= line, found {values:?}");
    values[0].trim()
}

/// A private directory holding `nexus.service` with `unit` as its text.
fn unit_copy(unit: &str) -> (PathBuf, PathBuf) {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("nexus-deploy-test-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    let path = dir.join("nexus.service");
    std::fs::write(&path, unit).expect("write the unit copy");
    (dir, path)
}

/// Runs `systemd-analyze verify` on `unit` (saved as `nexus.service`); returns whether it exited
/// 0 and the lines it printed about the unit (by file name or unit name).
fn verify(unit: &str) -> (bool, Vec<String>, String) {
    let (dir, path) = unit_copy(unit);
    let output =
        Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&path).env("SYSTEMD_LOG_COLOR", "0").output();
    let _ = std::fs::remove_dir_all(&dir);
    let output = match output {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("systemd-analyze is missing: install Debian's `systemd` package (tests/run.sh does)")
        }
        Err(e) => panic!("run systemd-analyze: {e}"),
    };
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    let about_unit = text.lines().filter(|l| l.contains("nexus.service")).map(str::to_string).collect();
    (output.status.success(), about_unit, text)
}

/// The unit as installed, but starting the binary this test run built (verify checks that
/// ExecStart names an executable).
fn unit_for_this_build() -> String {
    let unit = read("deploy/nexus.service");
    assert_eq!(unit_value(&unit, "ExecStart"), "/usr/local/bin/nexus", "the unit starts the installed binary");
    unit.replace("ExecStart=/usr/local/bin/nexus", &format!("ExecStart={}", env!("CARGO_BIN_EXE_nexus")))
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    let unit = unit_for_this_build();
    let (ok, complaints, output) = verify(&unit);
    assert!(ok, "systemd-analyze verify failed:\n{output}");
    assert!(complaints.is_empty(), "systemd-analyze verify complains about the unit:\n{output}");

    // The check above sees mistakes: a misspelt option and a bad value are reported.
    let broken = unit.replace("LockPersonality=yes", "LockPersonality=yes\nLockPersonalty=yes\nProtectSystem=strictly");
    let (_, complaints, output) = verify(&broken);
    assert!(
        complaints.iter().any(|l| l.contains("LockPersonalty")) && complaints.iter().any(|l| l.contains("strictly")),
        "systemd-analyze verify did not report a misspelt option and a bad value:\n{output}"
    );
}

#[test]
fn the_unit_keeps_what_the_docs_promise() {
    let unit = read("deploy/nexus.service");
    assert_eq!(unit_value(&unit, "User"), "nexus");
    assert_eq!(unit_value(&unit, "Restart"), "on-failure");
    assert_eq!(unit_value(&unit, "StateDirectory"), "nexus");
    assert!(unit_value(&unit, "EnvironmentFile").starts_with('/'), "an EnvironmentFile for JWT_SECRET");
    assert_eq!(unit_value(&unit, "CapabilityBoundingSet"), "", "no capabilities");
    assert_eq!(unit_value(&unit, "RestrictAddressFamilies"), "AF_INET AF_INET6 AF_UNIX");

    // LimitNOFILE is tuning.md's recipe, and the sysctl drop-in lets a process have it.
    let tuning = read("tuning.md");
    let recipe = tuning
        .split("LimitNOFILE=")
        .nth(1)
        .map(|rest| rest.chars().take_while(char::is_ascii_digit).collect::<String>())
        .expect("tuning.md names a LimitNOFILE");
    assert_eq!(unit_value(&unit, "LimitNOFILE"), recipe, "LimitNOFILE differs from tuning.md");
    let sysctl = sysctl_settings(&read("deploy/sysctl.d/60-nexus.conf"));
    let nr_open = sysctl.iter().find(|(k, _, _)| k == "fs.nr_open").expect("the drop-in sets fs.nr_open");
    let nr_open: u64 = nr_open.1.parse().expect("fs.nr_open is a number");
    assert!(nr_open >= recipe.parse::<u64>().expect("a number"), "fs.nr_open {nr_open} < LimitNOFILE {recipe}");

    // systemd's SIGKILL comes well after the default drain, its linger and the last commits.
    let stop = humantime::parse_duration(unit_value(&unit, "TimeoutStopSec")).expect("TimeoutStopSec is a duration");
    let drain = limits::DRAIN_DEFAULT + limits::CLOSE_LINGER;
    assert!(stop >= drain * 2, "TimeoutStopSec {stop:?} leaves too little room after the drain ({drain:?})");
    assert!(stop >= drain + Duration::from_secs(10));

    // io_uring stays allowed by the syscall filter.
    let filters: Vec<&str> = unit.lines().filter_map(|l| l.strip_prefix("SystemCallFilter=")).collect();
    let allowed = filters.iter().find(|f| !f.starts_with('~')).expect("an allow-list");
    for call in ["io_uring_setup", "io_uring_enter", "io_uring_register", "@system-service"] {
        assert!(allowed.split_whitespace().any(|c| c == call), "{call} not allowed: {allowed}");
    }
    for denied in filters.iter().filter(|f| f.starts_with('~')) {
        for group in ["@aio", "@resources", "@system-service", "@io-event", "@network-io"] {
            assert!(!denied.split_whitespace().any(|c| c.trim_start_matches('~') == group), "{group} denied");
        }
    }
}

/// The drop-in's settings: `(key, value, commented out)` for every `key = value` line.
fn sysctl_settings(text: &str) -> Vec<(String, String, bool)> {
    let mut settings = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let (body, commented) = match line.strip_prefix('#') {
            Some(rest) => (rest.trim(), true),
            None => (line, false),
        };
        let Some((key, value)) = body.split_once('=') else {
            assert!(commented, "line {}: not `key = value`: {line:?}", n + 1);
            continue;
        };
        let (key, value) = (key.trim(), value.trim());
        let is_key = !key.is_empty()
            && key.contains('.')
            && key.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.');
        if !is_key {
            assert!(commented, "line {}: not `key = value`: {line:?}", n + 1);
            continue;
        }
        assert!(!value.is_empty(), "line {}: no value: {line:?}", n + 1);
        settings.push((key.to_string(), value.to_string(), commented));
    }
    settings
}

#[test]
fn the_sysctl_drop_in_names_existing_settings() {
    let text = read("deploy/sysctl.d/60-nexus.conf");
    let settings = sysctl_settings(&text);
    let active: Vec<_> = settings.iter().filter(|(_, _, commented)| !commented).collect();
    assert!(active.len() >= 3, "expected the recipe's settings, found {active:?}");
    for (key, value, _) in &settings {
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        assert!(path.is_file(), "{key} (in deploy/sysctl.d/60-nexus.conf) is not a kernel setting: no {path:?}");
        let current = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path:?}: {e}"));
        // Same shape as the kernel's: as many numbers as the setting has.
        let fields = |s: &str| s.split_whitespace().count();
        assert_eq!(fields(value), fields(&current), "{key} = {value:?}: the kernel has {current:?}");
        assert!(value.split_whitespace().all(|v| v.parse::<u64>().is_ok()), "{key} = {value:?}: not numbers");
    }
    for key in ["fs.nr_open", "net.core.somaxconn", "net.ipv4.tcp_max_syn_backlog"] {
        assert!(active.iter().any(|(k, _, _)| k == key), "{key} is not set");
    }
}
