//! The manifest loader (YAML/JSON documents, Lists, NetworkPolicy validation) on
//! arbitrary text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let mut manifests = egress_tracer::cluster::manifests::Manifests::default();
    egress_tracer::cluster::manifests::load_text(
        std::path::Path::new("fuzz.yaml"),
        text,
        &mut manifests,
    );
});
