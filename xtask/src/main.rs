//! `cargo xtask`: everything a developer or CI runs, in one place.

mod setup;

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "egress-tracer developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (idempotent; says what it does).
    Setup,
    /// Build the kernel programs, the tracer and the lab.
    Build,
    /// Setup, build, unit tests, then the privileged lab tests (needs root).
    Test {
        /// Runs the lab tests (the scenario library among them) this many times in a row,
        /// stopping at the first round with a failure: a verdict that holds only
        /// sometimes is a bug.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
        repeat: u32,
    },
    /// Formatting and clippy, warnings as errors.
    Lint,
    /// Build a node lab, trace a pod while it connects, print the records, tear down.
    Demo,
    /// Remove every lab object (namespaces, cgroups, processes, state) left by killed runs.
    LabClean,
    /// Benchmarks (release builds, root): tracing overhead in the node lab against no
    /// tracing, tcpdump and bpftrace, the agent's loss at full rate and its RSS over a
    /// churn soak, the userspace pipeline; a table on stdout, JSON under bench/results/.
    Bench {
        /// Interleaved rounds; each figure is the median (at least 5). The machine's own
        /// noise is as large as the differences measured: more rounds narrow it.
        #[arg(long, default_value_t = 7)]
        rounds: usize,
        /// Length of each load run, in seconds.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Length of the agent's churn soak (RSS sampled every 10 s), in seconds; 0 skips it.
        #[arg(long, default_value_t = 600)]
        soak: u64,
        /// Instead of measuring: the rounds of earlier runs' kernel-*.json files taken
        /// together, median and 95% interval per mode (no root needed).
        #[arg(long, num_args = 1.., value_name = "RESULTS")]
        pool: Vec<PathBuf>,
    },
    /// Run every cargo-fuzz target in tracer/fuzz (DNS parser, event decoder, manifest
    /// loader) and report how many inputs each ran without a crash.
    Fuzz {
        /// Time per target, in seconds.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.task {
        Task::Setup => setup::run(),
        Task::Build => {
            setup::run()?;
            build(&root)
        }
        Task::Test { repeat } => test(&root, repeat),
        Task::Lint => lint(&root),
        Task::Demo => demo(&root),
        Task::LabClean => lab_clean(),
        Task::Bench {
            rounds,
            seconds,
            soak,
            pool,
        } if pool.is_empty() => bench(&root, rounds, seconds, soak),
        Task::Bench { pool, .. } => pool_results(&root, &pool),
        Task::Fuzz { seconds } => fuzz(&root, seconds),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

/// Runs a command in the workspace, failing if it fails.
fn cargo(root: &Path, args: &[&str], env: &[(&str, PathBuf)]) -> anyhow::Result<()> {
    println!("xtask: cargo {}", args.join(" "));
    let status = Command::new(env!("CARGO"))
        .args(args)
        .current_dir(root)
        .envs(env.iter().map(|(k, v)| (*k, v.as_os_str())))
        .status()
        .context("cannot run cargo")?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

fn build(root: &Path) -> anyhow::Result<()> {
    cargo(root, &["build", "--workspace", "--all-targets"], &[])
}

fn binaries(root: &Path) -> [(&'static str, PathBuf); 2] {
    let target = root.join("target").join("debug");
    [
        ("EGRESS_TRACER_BIN", target.join("egress-tracer")),
        ("EGRESS_LAB_HELPER", target.join("lab")),
    ]
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Totals of `cargo test` result lines.
#[derive(Default)]
struct TestTotals {
    passed: u64,
    failed: u64,
}

/// Runs `cargo test ARGS`, echoing its output and adding up its "test result" lines.
fn cargo_test(
    root: &Path,
    args: &[&str],
    env: &[(&str, PathBuf)],
    totals: &mut TestTotals,
) -> anyhow::Result<()> {
    println!("xtask: cargo test {}", args.join(" "));
    let mut child = Command::new(env!("CARGO"))
        .arg("test")
        .args(args)
        .current_dir(root)
        .envs(env.iter().map(|(k, v)| (*k, v.as_os_str())))
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run cargo test")?;
    let stdout = child.stdout.take().expect("piped");
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(result) = line.strip_prefix("test result: ") {
            let count = |word: &str| {
                result
                    .split(';')
                    .find_map(|part| {
                        part.trim()
                            .trim_start_matches("ok. ")
                            .trim_start_matches("FAILED. ")
                            .strip_suffix(word)
                    })
                    .and_then(|n| n.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            };
            totals.passed += count(" passed");
            totals.failed += count(" failed");
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("`cargo test {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

fn test(root: &Path, repeat: u32) -> anyhow::Result<()> {
    setup::run()?;
    build(root)?;
    let mut totals = TestTotals::default();
    let result = run_tests(root, repeat, &mut totals);
    // The closing line CI reads; the privileged tests are counted only when they ran.
    println!("xtask: {} passed, {} failed", totals.passed, totals.failed);
    result
}

fn run_tests(root: &Path, repeat: u32, totals: &mut TestTotals) -> anyhow::Result<()> {
    cargo_test(root, &["--workspace"], &[], totals)?;
    if !is_root() {
        bail!(
            "unit tests passed, but the lab tests were not run: they need root (network \
             namespaces, cgroups, BPF). Rerun as root: `sudo -E cargo xtask test`"
        );
    }
    // Lab tests are #[ignore]d in plain `cargo test`; here they run, with the binaries
    // just built. They may run in parallel: every lab has its own name prefix.
    for round in 1..=repeat {
        let mut lab = TestTotals::default();
        let result = cargo_test(
            root,
            &["--workspace", "--", "--ignored"],
            &binaries(root),
            &mut lab,
        );
        if repeat > 1 {
            println!(
                "xtask: lab round {round} of {repeat}: {} passed, {} failed",
                lab.passed, lab.failed
            );
        }
        totals.passed += lab.passed;
        totals.failed += lab.failed;
        result.with_context(|| format!("lab round {round} of {repeat} failed"))?;
    }
    // The test processes have exited: any lab of theirs still here leaked. (Labs of
    // other runs on the machine have live owners and do not count.)
    let leaked = egress_lab::stale_labs();
    if !leaked.is_empty() {
        bail!("lab tests left labs behind: {leaked:?} (remove them with `cargo xtask lab-clean`)");
    }
    Ok(())
}

fn lint(root: &Path) -> anyhow::Result<()> {
    cargo(root, &["fmt", "--all", "--check"], &[])?;
    cargo(
        root,
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
        &[],
    )?;
    // The kernel programs only really compile for the BPF target, with nightly.
    let args = [
        "run",
        "nightly",
        "cargo",
        "clippy",
        "-Z",
        "build-std=core",
        "--target",
        "bpfel-unknown-none",
        "--package",
        "tracer-ebpf",
        "--release",
        "--",
        "-D",
        "warnings",
    ];
    println!("xtask: rustup {}", args.join(" "));
    let status = Command::new("rustup")
        .args(args)
        .current_dir(root)
        .status()
        .context("cannot run rustup")?;
    if !status.success() {
        bail!("clippy of the kernel programs failed ({status})");
    }
    Ok(())
}

fn demo(root: &Path) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "the demo builds a node lab and loads BPF programs: run it as root (`sudo -E cargo xtask demo`)"
        );
    }
    setup::run()?;
    build(root)?;
    for (var, path) in binaries(root) {
        // SAFETY: single-threaded at this point; the lab reads these to find binaries.
        unsafe { std::env::set_var(var, path) };
    }
    egress_lab::demo::run()
}

fn bench(root: &Path, rounds: usize, seconds: f64, soak: u64) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the benchmarks build a node lab and load BPF programs: run them as root");
    }
    setup::run()?;
    setup::bench_tools()?;
    cargo(
        root,
        &[
            "build",
            "--release",
            "-p",
            "egress-tracer",
            "-p",
            "egress-lab",
            "--bins",
        ],
        &[],
    )?;
    let release = root.join("target").join("release");
    let status = Command::new(release.join("bench"))
        .args([
            "--rounds",
            &rounds.to_string(),
            "--seconds",
            &seconds.to_string(),
            "--soak",
            &soak.to_string(),
        ])
        .arg("--out")
        .arg(root.join("bench").join("results"))
        .env("EGRESS_TRACER_BIN", release.join("egress-tracer"))
        .env("EGRESS_LAB_HELPER", release.join("lab"))
        .status()
        .context("cannot run the benchmark")?;
    if !status.success() {
        bail!("the kernel benchmark failed ({status})");
    }
    pipeline_bench(root)
}

/// Pools earlier kernel bench results with the bench binary's `--pool`.
fn pool_results(root: &Path, files: &[PathBuf]) -> anyhow::Result<()> {
    let mut args = vec![
        "run",
        "--release",
        "-q",
        "-p",
        "egress-lab",
        "--bin",
        "bench",
        "--",
        "--pool",
    ];
    for file in files {
        args.push(
            file.to_str()
                .with_context(|| format!("{}: not a UTF-8 path", file.display()))?,
        );
    }
    cargo(root, &args, &[])
}

/// The fuzz targets, in the order the README lists them.
const FUZZ_TARGETS: [&str; 3] = ["dns_parse", "decode", "manifests"];

fn fuzz(root: &Path, seconds: u64) -> anyhow::Result<()> {
    if seconds == 0 {
        bail!("--seconds must be at least 1");
    }
    setup::fuzz_tools()?;
    let mut results = Vec::new();
    for target in FUZZ_TARGETS {
        let args = [
            "+nightly".to_owned(),
            "fuzz".into(),
            "run".into(),
            "-O".into(),
            target.into(),
            "--".into(),
            format!("-max_total_time={seconds}"),
            "-print_final_stats=1".into(),
        ];
        println!("xtask: cargo {} (in tracer/)", args.join(" "));
        // rustup's cargo proxy picks the toolchain from `+nightly`.
        let output = Command::new("cargo")
            .args(&args)
            .current_dir(root.join("tracer"))
            // The sanitizer flags cannot build the BPF object, which no target needs.
            .env("AYA_BUILD_SKIP", "1")
            .stdout(Stdio::inherit())
            .stderr(Stdio::piped())
            .output()
            .context("cannot run cargo fuzz")?;
        let log = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() {
            eprintln!("{log}");
            bail!(
                "fuzz target {target} failed ({}): the crashing input is under tracer/fuzz/artifacts/{target}/",
                output.status
            );
        }
        let executions = log
            .lines()
            .find_map(|line| line.strip_prefix("stat::number_of_executed_units:"))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .with_context(|| format!("fuzz target {target} printed no execution count"))?;
        results.push((target, executions));
    }
    println!("{:<12} {:>28}", "target", "executions without a crash");
    for (target, executions) in results {
        println!("{target:<12} {executions:>28}");
    }
    println!("({seconds} s per target)");
    Ok(())
}

/// The userspace pipeline on one thread, for a stream of connections and one of DNS
/// lookups: events per second and memory, then callgrind's instruction count per event
/// (the difference of two runs, so fixed costs cancel).
fn pipeline_bench(root: &Path) -> anyhow::Result<()> {
    println!("xtask: cargo bench -p egress-tracer --bench pipeline --no-run");
    let output = Command::new(env!("CARGO"))
        .args([
            "bench",
            "-p",
            "egress-tracer",
            "--bench",
            "pipeline",
            "--no-run",
        ])
        .args(["--message-format=json"])
        .current_dir(root)
        .stderr(Stdio::inherit())
        .output()
        .context("cannot build the pipeline benchmark")?;
    let executable = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| message["target"]["name"] == "pipeline")
        .find_map(|message| message["executable"].as_str().map(PathBuf::from))
        .context("cargo did not say where the pipeline benchmark is")?;
    let run = |args: &[&str]| -> anyhow::Result<serde_json::Value> {
        let output = Command::new(&executable).args(args).output()?;
        if !output.status.success() {
            bail!(
                "the pipeline benchmark failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(serde_json::from_slice(&output.stdout)?)
    };
    // Each stream's events per second (median of 5 runs) and the last run's report.
    let median_rate = |args: &[&str]| -> anyhow::Result<(f64, Vec<f64>, serde_json::Value)> {
        let mut throughputs = Vec::new();
        let mut report = serde_json::Value::Null;
        for _ in 0..5 {
            report = run(args)?;
            throughputs.push(report["events_per_second"].as_f64().unwrap_or(0.0));
        }
        throughputs.sort_by(f64::total_cmp);
        Ok((throughputs[throughputs.len() / 2], throughputs, report))
    };
    let (per_second, throughputs, report) = median_rate(&[])?;
    let (dns_per_second, dns_throughputs, _) =
        median_rate(&["--lookups", "200000", "--skip-memory"])?;
    let instructions = |stream: &str, count: u64| -> anyhow::Result<u64> {
        let out = root
            .join("target")
            .join(format!("callgrind-{stream}-{count}.out"));
        let status = Command::new("valgrind")
            .args(["--tool=callgrind", "--quiet"])
            .arg(format!("--callgrind-out-file={}", out.display()))
            .arg(&executable)
            .args([&format!("--{stream}"), &count.to_string(), "--skip-memory"])
            .stdout(Stdio::null())
            .status()
            .context("cannot run valgrind")?;
        if !status.success() {
            bail!("callgrind failed ({status})");
        }
        let text = std::fs::read_to_string(&out)?;
        let _ = std::fs::remove_file(&out);
        text.lines()
            .find_map(|line| line.strip_prefix("summary: "))
            .and_then(|n| n.trim().parse().ok())
            .context("no summary in the callgrind output")
    };
    let events_per_connection =
        report["events"].as_f64().unwrap_or(0.0) / report["connections"].as_f64().unwrap_or(1.0);
    let (small, large) = (10_000u64, 30_000u64);
    let per_event = (instructions("connections", large)?
        .saturating_sub(instructions("connections", small)?)) as f64
        / ((large - small) as f64 * events_per_connection);
    // A lookup is two events: the query and its answer.
    let dns_per_event = (instructions("lookups", large)?
        .saturating_sub(instructions("lookups", small)?)) as f64
        / ((large - small) as f64 * 2.0);
    let rss = report["rss_mib_100k_attempts_10k_pods"]
        .as_f64()
        .unwrap_or(0.0);
    println!("pipeline (decode, assemble, verdict, metrics), one thread:");
    println!(
        "  {per_second:>12.0} events/s (median of 5; target >= 1,000,000: {})",
        met(per_second >= 1e6)
    );
    println!("  {per_event:>12.0} instructions/event (callgrind)");
    println!(
        "  {dns_per_second:>12.0} DNS events/s (queries and answers, median of 5), {dns_per_event:.0} instructions/event (callgrind)"
    );
    println!(
        "  {rss:>12.1} MiB resident with 100,000 attempts held and 10,000 pods (target <= 128: {})",
        met(rss <= 128.0)
    );
    let results = root.join("bench").join("results");
    std::fs::create_dir_all(&results)?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let path = results.join(format!("pipeline-{stamp}.json"));
    let document = serde_json::json!({
        "benchmark": "userspace pipeline",
        "events_per_second_median": per_second,
        "events_per_second_runs": throughputs,
        "instructions_per_event": per_event,
        "dns_events_per_second_median": dns_per_second,
        "dns_events_per_second_runs": dns_throughputs,
        "dns_instructions_per_event": dns_per_event,
        "rss_mib_100k_attempts_10k_pods": rss,
    });
    std::fs::write(&path, format!("{document:#}\n"))?;
    println!("results: {}", path.display());
    Ok(())
}

fn met(yes: bool) -> &'static str {
    if yes { "met" } else { "NOT met" }
}

fn lab_clean() -> anyhow::Result<()> {
    if !is_root() {
        bail!("lab-clean removes network namespaces and cgroups: run it as root");
    }
    let found = egress_lab::clean_leftovers()?;
    if found.is_empty() {
        println!("xtask: no lab leftovers");
    } else {
        println!("xtask: removed {found:?}");
    }
    Ok(())
}
