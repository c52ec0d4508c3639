//! Start-up with a database the server cannot use (issue 3): a file that is not SQLite, a
//! corrupt one, one written by a newer schema, a path in a missing directory, a directory, an
//! unreadable file. Each is refused before listening: exit code 2, exactly one clear line on
//! stderr naming the file, no panic, and no data changed (the garbage file stays byte for byte
//! the same; the newer database keeps its version and rows).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

const RUN_TIMEOUT: Duration = Duration::from_secs(10);

/// `nexus` on loopback port 0 with the test secret and `db` as its database.
fn nexus_with_db(db: &Path) -> Command {
    let mut cmd = nexus_command();
    cmd.env("JWT_SECRET", SECRET)
        .env("DATABASE_PATH", db)
        .env("PORT", "0")
        .env("NEXUS_BIND", "127.0.0.1")
        .env("NEXUS_WORKERS", "1");
    cmd
}

/// Runs `cmd`, asserts exit code 2 with exactly one line on stderr naming `db`, and returns it.
#[track_caller]
fn refused(cmd: Command, db: &Path, case: &str) -> String {
    let (status, stderr) = run_to_exit(cmd, RUN_TIMEOUT);
    assert_eq!(status.code(), Some(2), "{case}: exit status {status:?}; stderr:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{case}: panic instead of a clear error:\n{stderr}");
    assert!(!stderr.contains("listening on"), "{case}: started listening:\n{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{case}: exactly one line on stderr, got:\n{stderr}");
    let line = lines[0].to_string();
    assert!(line.contains(&db.display().to_string()), "{case}: the line names the database file: {line}");
    line
}

/// Deterministic pseudo-random bytes (xorshift64*).
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed >> 12;
            seed ^= seed << 25;
            seed ^= seed >> 27;
            (seed.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

/// A real database: start a server on `db`, save a message, stop it with SIGTERM (exit 0).
fn make_real_database(db: &Path) {
    let db_str = db.to_str().expect("UTF-8 temp path");
    let mut server = start_server(&[("DATABASE_PATH", db_str)]);
    let topic = new_topic();
    send_all(&mut joined(server.port, &new_sub(), &topic), "1", &topic, &["kept".to_string()]);
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(RUN_TIMEOUT);
    assert_eq!(status.code(), Some(0), "{status:?}; stderr:\n{}", server.logs());
}

#[test]
fn garbage_file_is_refused_with_exit_2() {
    let dir = unique_temp_dir();
    let db = dir.join("garbage.db");
    let bytes = noise(64 * 1024, 0x9e37_79b9_7f4a_7c15);
    std::fs::write(&db, &bytes).expect("write garbage");
    let line = refused(nexus_with_db(&db), &db, "garbage");
    assert!(line.to_ascii_lowercase().contains("not a database"), "says why: {line}");
    assert_eq!(std::fs::read(&db).expect("read back"), bytes, "the file must not be touched");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn newer_schema_version_is_refused_naming_the_version() {
    let dir = unique_temp_dir();
    let db = dir.join("newer.db");
    make_real_database(&db);
    {
        let conn = rusqlite::Connection::open(&db).expect("open");
        conn.pragma_update(None, "user_version", 99).expect("set user_version");
    }
    let line = refused(nexus_with_db(&db), &db, "user_version 99");
    assert!(line.contains("99"), "names the version found: {line}");
    assert!(line.contains("version"), "says it is about the schema version: {line}");
    // Refused without migrating or changing anything.
    let conn = rusqlite::Connection::open(&db).expect("open");
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).expect("user_version");
    assert_eq!(version, 99);
    drop(conn);
    let bodies: Vec<String> = db_rows(&db).into_iter().map(|r| r.body).collect();
    assert_eq!(bodies, ["kept"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn corrupt_database_is_refused_with_exit_2() {
    let dir = unique_temp_dir();
    let db = dir.join("corrupt.db");
    make_real_database(&db);
    {
        // Fold the WAL into the file, then overwrite page 1 after the 100-byte header (the
        // schema table's root page).
        let conn = rusqlite::Connection::open(&db).expect("open");
        let mode: String = conn.query_row("PRAGMA journal_mode = DELETE", [], |r| r.get(0)).expect("journal_mode");
        assert_eq!(mode, "delete");
    }
    assert!(!dir.join("corrupt.db-wal").exists(), "WAL folded into the file");
    let mut bytes = std::fs::read(&db).expect("read");
    bytes[100..4096].copy_from_slice(&noise(3996, 7));
    std::fs::write(&db, &bytes).expect("corrupt");
    refused(nexus_with_db(&db), &db, "corrupt page 1");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn path_in_a_missing_directory_is_refused_with_exit_2() {
    let dir = unique_temp_dir();
    let missing = dir.join("no-such-dir");
    let db = missing.join("nexus.db");
    refused(nexus_with_db(&db), &db, "missing directory");
    assert!(!missing.exists(), "the directory must not be created");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn directory_as_database_is_refused_with_exit_2() {
    let dir = unique_temp_dir();
    let db = dir.join("a-directory");
    std::fs::create_dir(&db).expect("mkdir");
    refused(nexus_with_db(&db), &db, "directory");
    assert!(std::fs::read_dir(&db).expect("still a directory").next().is_none(), "nothing created inside");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unreadable_database_is_refused_with_exit_2() {
    use std::os::unix::fs::PermissionsExt as _;
    use std::os::unix::process::CommandExt as _;

    let dir = unique_temp_dir();
    let db = dir.join("unreadable.db");
    {
        let conn = rusqlite::Connection::open(&db).expect("create");
        conn.execute_batch("CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1);").expect("fill");
    }
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o000)).expect("chmod 000");
    let mut cmd = nexus_with_db(&db);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // Root reads any file: run the server as `nobody` so the permission bits count.
        cmd.uid(65534).gid(65534);
    }
    refused(cmd, &db, "mode 000");
    let _ = std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o600));
    let _ = std::fs::remove_dir_all(&dir);
}
