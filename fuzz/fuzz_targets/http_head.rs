//! The HTTP request-head parser and router on arbitrary bytes.
//!
//! Properties: no panic; a complete head ends inside the input and parses to the same end
//! from its own bytes alone; routing (default "allow all" origin policy and an explicit
//! list) and `vsn` negotiation accept whatever the parser produced.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use nexus::http::origin::{OriginEntry, OriginPolicy};
use nexus::http::{parse_head, route, Route};
use nexus::phoenix::Vsn;

fn listed() -> &'static OriginPolicy {
    static POLICY: OnceLock<OriginPolicy> = OnceLock::new();
    POLICY.get_or_init(|| {
        let entries = ["https://chat.example.com", "//localhost:4000", "https://*.example.org", "[::1]:4000"];
        OriginPolicy::new(entries.iter().map(|e| OriginEntry::parse(e).expect("entry")).collect())
    })
}

fuzz_target!(|data: &[u8]| {
    let (head, n) = match parse_head(data) {
        Ok(Some(parsed)) => parsed,
        Ok(None) => return,
        Err(e) => {
            let _ = e.status();
            return;
        }
    };
    assert!(n <= data.len(), "head end {n} past the input ({} bytes)", data.len());
    let again = parse_head(&data[..n]).expect("the head alone parses").expect("the head alone is complete");
    assert_eq!(again.1, n);
    for policy in [&OriginPolicy::default(), listed()] {
        if let Route::Upgrade(up) = route(&head, policy) {
            let _ = Vsn::negotiate(up.vsn.as_deref());
        }
    }
    // The header values are arbitrary UTF-8 here: the policy parses them as entries too.
    if let Some(origin) = head.origin.as_deref() {
        if let Some(entry) = OriginEntry::parse(origin) {
            let _ = OriginPolicy::new(vec![entry]).allows(Some(origin));
        }
    }
});
