//! Per-socket message rate (issue 6): `NEXUS_MSG_RATE` messages per second with a burst of one
//! second's worth; over it every message is answered `{"reason":"rate limited"}` (nothing else
//! happens), and a client that keeps going is closed with 1008. Other sockets are untouched.

mod common;

use std::time::Duration;

use common::*;

const WAIT: Duration = Duration::from_secs(10);
const RATE: usize = 20;

fn rate_limited(r: &str) -> String {
    v2_reply(None, Some(r), "phoenix", "error", r#"{"reason":"rate limited"}"#)
}

#[test]
fn over_the_rate_is_answered_then_closed_and_others_are_untouched() {
    let rate = RATE.to_string();
    let server = start_server(&[("NEXUS_MSG_RATE", rate.as_str())]);
    let mut flooder = connect_v2(server.port, &new_sub());
    let mut healthy = connect_v2(server.port, &new_sub());
    let topic = new_topic();
    healthy.join(&topic, "1");

    // One write of 60 heartbeats, so the server reads them in one go and its coarse clock
    // (which refills the bucket) cannot tick in between: the burst (20) is answered ok, every
    // other one `rate limited`, in order.
    let burst: Vec<String> = (0..60).map(|i| heartbeat(&format!("{i}"))).collect();
    flooder.send_burst(&burst);
    let mut ok = 0;
    for i in 0..60 {
        let got = flooder.recv_text(WAIT);
        let r = format!("{i}");
        if got == heartbeat_reply(&r) {
            assert_eq!(ok, i, "an ok after a refusal without time passing: {got}");
            ok += 1;
        } else {
            assert_eq!(got, rate_limited(&r), "reply {i}");
        }
    }
    assert!((RATE..=RATE + 10).contains(&ok), "{ok} heartbeats answered ok for a rate of {RATE}");

    // The other socket is unaffected: its messages go through and broadcast.
    healthy.heartbeat("h1");
    healthy.send_text(&v2(Some("1"), Some("2"), &topic, "new_msg", r#"{"body":"still here"}"#));
    healthy.recv_until(WAIT, |t| t.contains(r#""new_msg""#) && t.contains("still here"));
    healthy.expect(&v2_ok(Some("1"), "2", &topic));

    // Keep flooding: after MSG_RATE_STRIKES_MAX (100) refusals in a row the socket is closed.
    for i in 0..300 {
        flooder.send_text(&heartbeat(&format!("f{i}")));
    }
    assert_eq!(flooder.expect_close(WAIT), Some(1008));
    healthy.heartbeat("h2");
    server.wait_for_log("over the message rate");
}

#[test]
fn zero_means_unlimited() {
    let server = start_server(&[("NEXUS_MSG_RATE", "0")]);
    let mut c = connect_v2(server.port, &new_sub());
    for i in 0..2_000 {
        c.send_text(&heartbeat(&format!("{i}")));
    }
    for i in 0..2_000 {
        assert_eq!(c.recv_text(WAIT), heartbeat_reply(&format!("{i}")));
    }
}
