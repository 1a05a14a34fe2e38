use which::which;

/// The kernel programs are linked by `bpf-linker`, which cargo does not track: rebuild
/// when the linker binary changes. `cargo xtask setup` installs it.
fn main() {
    match which("bpf-linker") {
        Ok(linker) => println!("cargo:rerun-if-changed={}", linker.display()),
        Err(_) => println!("cargo:warning=bpf-linker not found on PATH; run `cargo xtask setup`"),
    }
}
