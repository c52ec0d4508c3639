//! A cluster node's message publication decoder on arbitrary bytes (what another node, or
//! anything else able to publish on the Redis channel, sent).
//!
//! Properties: no panic; whatever decodes re-encodes to exactly the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nexus::cluster::publication::{decode, encode};

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = decode(data) {
        assert_eq!(encode(p.incarnation, &p.entries), data);
    }
});
