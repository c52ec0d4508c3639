//! A cluster node's presence publication parser on arbitrary bytes (what the presence scripts
//! published, or anything else able to publish on a conversation's Redis channel).
//!
//! Property: no panic, and a publication parses into at most one change per line after the
//! version line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nexus::cluster::presence::parse_publication;

fuzz_target!(|data: &[u8]| {
    if let Ok(changes) = parse_publication(data) {
        let lines = data.split(|&b| b == b'\n').count();
        assert!(changes.changes.len() < lines);
    }
});
