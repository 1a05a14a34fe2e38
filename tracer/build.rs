//! Builds the kernel programs (`tracer-ebpf`) for the BPF target with the nightly
//! toolchain and bpf-linker, and leaves the object in `OUT_DIR/tracer-ebpf`, where
//! `capture` embeds it.
//!
//! `AYA_BUILD_SKIP=1` skips that build (for `cargo clippy` or docs on machines without the
//! BPF toolchain); the binary then carries an empty object and says so when it starts.

use std::{env, fs, path::PathBuf};

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let object = out_dir.join("tracer-ebpf");
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    if skip {
        fs::write(&object, [])?;
        return Ok(());
    }
    let root_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../tracer-ebpf");
    let root_dir = root_dir.canonicalize()?;
    let root_dir = root_dir.to_str().expect("workspace path is UTF-8");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "tracer-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
