//! `cargo xtask setup`: installs what is missing, and says so. Safe to run again.
//!
//! What and why (versions from `docs/toolchain.md`):
//! - the nightly toolchain's `rust-src`, to build `core` for the BPF target, and clippy;
//! - LLVM 22 development files, which bpf-linker 0.13 links against;
//! - bpf-linker 0.13.0, which links the kernel programs;
//! - the Debian tools the node lab drives (iproute2, iptables, nftables, conntrack,
//!   dnsmasq, curl, bpftool, tcpdump, ping, setpriv), and clang 22 with the kernel's
//!   headers for the lab's stand-in of an eBPF CNI (a tc program that drops).

use std::process::Command;

use anyhow::{Context, bail};

/// Debian packages: (package, why).
const PACKAGES: [(&str, &str); 15] = [
    ("llvm-22-dev", "bpf-linker links against LLVM 22"),
    (
        "libpolly-22-dev",
        "LLVM 22's Polly library, needed to link bpf-linker",
    ),
    ("bpftool", "inspecting loaded programs and links in tests"),
    ("iproute2", "the lab's namespaces, veths, bridge and routes"),
    ("iptables", "the lab's NAT and policy rules"),
    ("nftables", "nftables-based rules in the lab"),
    ("conntrack", "reading the lab node's conntrack table"),
    ("dnsmasq-base", "the lab's cluster and upstream DNS servers"),
    ("curl", "the pods' HTTP client"),
    ("tcpdump", "packet captures when debugging the lab"),
    ("iputils-ping", "reachability checks in the lab"),
    ("util-linux", "setpriv, to test unprivileged runs"),
    ("libc-bin", "getent, the lab's DNS readiness check"),
    (
        "clang-22",
        "builds the lab's tc program standing in for an eBPF CNI",
    ),
    (
        "linux-libc-dev",
        "the kernel headers that tc program includes",
    ),
];

const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

pub fn run() -> anyhow::Result<()> {
    install_packages(&PACKAGES)?;
    install_nightly_components()?;
    install_bpf_linker()?;
    println!("xtask: setup complete");
    Ok(())
}

/// Debian packages only the benchmarks use.
const BENCH_PACKAGES: [(&str, &str); 2] = [
    ("bpftrace", "the bpftrace comparison in `cargo xtask bench`"),
    (
        "valgrind",
        "callgrind instruction counts in `cargo xtask bench`",
    ),
];

/// What `cargo xtask bench` needs beyond the build and test tools.
pub fn bench_tools() -> anyhow::Result<()> {
    install_packages(&BENCH_PACKAGES)
}

/// cargo-fuzz (nightly, with its sanitizers) for `cargo xtask fuzz`.
pub fn fuzz_tools() -> anyhow::Result<()> {
    install_nightly_components()?;
    let installed = Command::new(env!("CARGO"))
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if installed {
        println!("xtask: cargo-fuzz present");
        return Ok(());
    }
    println!("xtask: installing cargo-fuzz (runs the fuzz targets in tracer/fuzz)");
    run_cmd(Command::new(env!("CARGO")).args(["install", "cargo-fuzz", "--locked"]))
}

fn install_packages(packages: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<(&str, &str)> = packages
        .iter()
        .copied()
        .filter(|(p, _)| !is_installed(p))
        .collect();
    if missing.is_empty() {
        println!("xtask: Debian packages present");
        return Ok(());
    }
    for (package, why) in &missing {
        println!("xtask: installing {package} ({why})");
    }
    if !crate::is_root() {
        bail!(
            "missing Debian packages {}: run `sudo -E cargo xtask setup` (or install them yourself)",
            missing
                .iter()
                .map(|(p, _)| *p)
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    run_cmd(Command::new("apt-get").args(["update", "-qq"]))?;
    let mut install = Command::new("apt-get");
    install
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(missing.iter().map(|(p, _)| *p))
        .env("DEBIAN_FRONTEND", "noninteractive");
    run_cmd(&mut install)
}

fn is_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout) == "install ok installed")
}

fn install_nightly_components() -> anyhow::Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        println!("xtask: installing the nightly toolchain (builds the kernel programs)");
        run_cmd(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    for (component, why) in [
        ("rust-src", "to build `core` for the BPF target"),
        ("clippy", "to lint the kernel programs"),
    ] {
        if components.lines().any(|l| l.starts_with(component)) {
            println!("xtask: nightly {component} present");
            continue;
        }
        println!("xtask: installing nightly {component} ({why})");
        run_cmd(Command::new("rustup").args([
            "component",
            "add",
            component,
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

fn install_bpf_linker() -> anyhow::Result<()> {
    let installed = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION));
    if installed {
        println!("xtask: bpf-linker {BPF_LINKER_VERSION} present");
        return Ok(());
    }
    println!("xtask: installing bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)");
    run_cmd(
        Command::new(env!("CARGO"))
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
            ])
            .args(["--no-default-features", "--features", "llvm-22"])
            // llvm-sys finds LLVM through the first, bpf-linker's build script through
            // the second; without them both pick Debian's default LLVM 14 and fail.
            .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX)
            .env("LLVM_PREFIX", LLVM_PREFIX),
    )
}

fn run_cmd(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("cannot run {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed ({status})");
    }
    Ok(())
}

fn output(command: &mut Command) -> anyhow::Result<String> {
    let output = command
        .output()
        .with_context(|| format!("cannot run {command:?}"))?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
