//! At the open-file limit: the server says what the limit allows, serves up to it, answers
//! connections beyond it with 503 (no crash, no accept-loop spin), keeps existing
//! connections working, and admits again once a slot frees.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn max_connections(logs: &str) -> usize {
    let at = logs.find("max_connections=").expect("start-up line names max_connections");
    let digits: String = logs[at + "max_connections=".len()..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().expect("a number")
}

#[test]
fn connections_beyond_the_descriptor_limit_get_503_and_others_keep_working() {
    let server = start_server(&[("RLIMIT_NOFILE", "160")]);
    let logs = server.logs();
    assert!(logs.contains("open_files=160"), "start-up line states the limit: {logs}");
    let max = max_connections(&logs);
    assert!((10..160).contains(&max), "max_connections={max} leaves room below 160 descriptors");

    let mut held: Vec<Client> = (0..max).map(|_| connect_v2(server.port, &new_sub())).collect();
    for _ in 0..5 {
        let mut refused = http_raw(server.port, upgrade_request(server.port, &v2_query(), &[]).as_bytes());
        refused.assert_error(503);
    }
    assert!(held.len() == max);
    for (i, c) in held.iter_mut().enumerate().step_by(7) {
        c.heartbeat(&i.to_string());
    }

    // Free one slot: a new connection is admitted once the server has seen the close.
    let mut gone = held.pop().expect("one");
    gone.close_handshake();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut admitted = loop {
        match try_connect(server.port, &v2_query(), &[], &[]) {
            Ok(c) => break c,
            Err(ConnectError::Status(503)) if Instant::now() < deadline => continue,
            Err(e) => panic!("no slot freed within 5 s: {e:?}"),
        }
    };
    admitted.heartbeat("after");
    held[0].heartbeat("still");
    server.wait_for_log("at capacity");
}

/// With a connection cap above what the descriptors allow, `accept` runs out of descriptors
/// (EMFILE). The core must not spin or crash: it refuses pending connections (closing them)
/// and backs off, existing connections keep working, and new ones are admitted once
/// descriptors free up.
#[test]
fn running_out_of_descriptors_refuses_and_backs_off_without_harm() {
    // Idle timeout well above the flood's duration: a connection whose refusal could not be
    // made at once (both cores' spare descriptors taken) waits out the client's timeout.
    let env = [("RLIMIT_NOFILE", "120"), ("NEXUS_MAX_CONNECTIONS", "10000"), ("NEXUS_IDLE_TIMEOUT", "600")];
    let server = start_server(&env);
    let mut held = Vec::new();
    let mut refused = 0;
    // Stop once the out-of-descriptors path has refused a few (bounded in count either way).
    while held.len() + refused < 150 && refused < 3 {
        match try_connect(server.port, &v2_query(), &[], &[]) {
            Ok(c) => held.push(c),
            Err(ConnectError::Other(_)) => refused += 1,
            Err(e) => panic!("unexpected answer while out of descriptors: {e:?}"),
        }
    }
    assert!(held.len() >= 20 && refused > 0, "held {} refused {refused}", held.len());
    server.wait_for_log("out of descriptors");
    for (i, c) in held.iter_mut().enumerate().step_by(9) {
        c.heartbeat(&i.to_string());
    }

    // Free a few descriptors: a new connection gets in again.
    for mut c in held.drain(..5) {
        c.close_handshake();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut admitted = loop {
        match try_connect(server.port, &v2_query(), &[], &[]) {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => continue,
            Err(e) => panic!("no descriptor freed within 5 s: {e:?}"),
        }
    };
    admitted.heartbeat("after");
    held[0].heartbeat("still");
}
