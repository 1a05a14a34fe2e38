//! The ring-buffer record decoder on arbitrary bytes (any kind, any length).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|record: &[u8]| {
    let _ = egress_tracer::capture::decode(record);
});
