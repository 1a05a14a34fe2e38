//! The DNS parser on arbitrary payloads, with and without TCP framing and truncation.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (bool, bool, &[u8])| {
    let (framed, cut, payload) = input;
    let _ = egress_tracer::dns::parse(payload, framed, cut);
});
