//! `cargo xtask bench` (kernel part): what tracing costs the traced pods, measured side by
//! side in the node lab.
//!
//! A pod connects to a sink beyond the node (through its NAT) and closes, and asks the
//! cluster DNS, on four threads as fast as it can, for `--seconds` each, under each mode: untraced, the
//! egress-tracer agent, tcpdump writing the pod's traffic to a file (the troubleshooting
//! guide's packet capture) and, where it runs, a bpftrace script that counts the same
//! events. Every traced run is bracketed by untraced runs and divided by their mean rate;
//! the modes' order rotates every round, and the table shows the median of the rounds,
//! with a 95% confidence interval of that median (from the rounds' order statistics: how
//! far the rounds' scatter leaves the median from the true ratio).
//! Each rate is counted per second of CPU the machine had: on a virtual machine the
//! hypervisor takes CPU time away (steal, in `/proc/stat`) by amounts that change from
//! second to second, and a load that needs the whole machine loses as much rate. The
//! ratios of the raw rates are kept in the JSON too. Each watcher's own CPU time per
//! operation is measured in those runs; its kernel programs' run time per operation (the
//! kernel's BPF run-time statistics, which cost a little themselves) in one more run of
//! each load under each watcher.
//!
//! Then, with the agent: loss at the lab's full connection rate (events the kernel could
//! not queue, and whether the connection counters still match what the load made), and a
//! churn soak (`--soak` seconds of steady connections and lookups) that samples the
//! agent's RSS.
//!
//! SIGINT or SIGTERM stops it, and its lab is removed: at once when the loads get the
//! signal too (Ctrl-C), else before the next run.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, ExitCode, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use egress_lab::{CgroupDriver, Lab, LabPod, PodSpec, addresses as addr, agent, tracer::Tracer};
use serde_json::{Value, json};

/// What watches the pod's traffic during a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Untraced,
    Agent,
    Tcpdump,
    Bpftrace,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Untraced => "untraced",
            Mode::Agent => "egress-tracer agent",
            Mode::Tcpdump => "tcpdump -w",
            Mode::Bpftrace => "bpftrace",
        }
    }
}

/// Load threads: more than the machine's cores, so the connect load is bound by CPU (what
/// tracing costs) rather than by round-trip latency. The DNS load is not: each query
/// crosses two single-threaded dnsmasq hops (cluster DNS, then upstream), and with four
/// threads the CPUs stay about 30% idle, the rate bound by round trips (16 or 32 threads
/// still leave 13%, the dnsmasq hops then bounding it).
const LOAD_THREADS: u32 = 4;

/// The bpftrace stand-in for the tracer: the events of its tracing hooks (handshake
/// failures, socket ends, drops, freed packets where ICMP errors are found), counted in
/// maps. (This kernel has no syscall tracepoints or kprobes for a connect() probe.)
const BPFTRACE_SCRIPT: &str = "\
tracepoint:sock:inet_sk_error_report { @errors[args->error] = count(); }
tracepoint:tcp:tcp_destroy_sock { @closed = count(); }
tracepoint:skb:kfree_skb { @drops[args->reason] = count(); }
tracepoint:skb:consume_skb { @consumed = count(); }
";

struct Options {
    rounds: usize,
    seconds: f64,
    soak_seconds: u64,
    out: PathBuf,
}

/// The pause between starting a watcher and measuring: what leaving a watcher on costs is
/// measured once it has started, not its start (bpftrace attaches its probes after it
/// says so; the agent reads the node's conntrack table once on start, then every 10 s at
/// most 1% of a CPU). Untraced runs pause the same, so every run starts alike.
const WATCHER_SETTLE: Duration = Duration::from_secs(2);

/// Load threads for the loss run: more than `LOAD_THREADS`, the most the lab can carry.
const LOSS_THREADS: u32 = 8;
/// The soak's steady load (connections and lookups per second) and RSS sampling.
const SOAK_RATE: u32 = 2_000;
const SOAK_SAMPLE: Duration = Duration::from_secs(10);
/// RSS samples before this are start-up (the maps and caches filling), not drift.
const SOAK_WARM_UP: Duration = Duration::from_secs(60);

/// Set by SIGINT or SIGTERM: the bench stops at the next run and drops its lab (which
/// removes it) instead of dying with it in place.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

fn stop_on_signals() {
    let handler = on_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic (async-signal-safe).
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

fn unless_interrupted() -> Result<(), String> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        Err("interrupted; the lab is removed".into())
    } else {
        Ok(())
    }
}

fn main() -> ExitCode {
    stop_on_signals();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let outcome = match args.split_first() {
        Some((flag, files)) if flag == "--pool" => pool(files),
        _ => run(),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn options() -> Result<Options, String> {
    let mut options = Options {
        rounds: 7,
        seconds: 3.0,
        soak_seconds: 600,
        out: PathBuf::from("bench/results"),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut args = args.iter();
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--rounds" => {
                options.rounds = value.parse().map_err(|_| "--rounds takes a number")?;
                if options.rounds < 5 {
                    return Err("--rounds must be at least 5 (the median of five)".into());
                }
            }
            "--seconds" => {
                options.seconds = value.parse().map_err(|_| "--seconds takes a number")?;
                if !(0.5..=60.0).contains(&options.seconds) {
                    return Err("--seconds must be between 0.5 and 60".into());
                }
            }
            "--soak" => {
                options.soak_seconds = value.parse().map_err(|_| "--soak takes seconds")?;
                if options.soak_seconds != 0 && options.soak_seconds < 120 {
                    return Err("--soak must be 0 (skip) or at least 120 seconds".into());
                }
            }
            "--out" => options.out = PathBuf::from(value),
            other => {
                return Err(format!(
                    "unknown flag {other} (--rounds, --seconds, --soak, --out)"
                ));
            }
        }
    }
    Ok(options)
}

fn run() -> Result<(), String> {
    let options = options()?;
    let lab = Lab::start(&[PodSpec::new("default", "client", CgroupDriver::Systemd)])
        .map_err(|e| format!("cannot start the lab: {e}"))?;
    // Hundreds of thousands of short connections: their conntrack entries (in the lab
    // node's namespace only) must not outlive a round by minutes.
    lab.run_on_node(
        "sysctl",
        &["-qw", "net.netfilter.nf_conntrack_tcp_timeout_time_wait=1"],
    )
    .map_err(|e| e.to_string())?;
    let mut modes = vec![Mode::Untraced, Mode::Agent, Mode::Tcpdump];
    let mut notes = Vec::new();
    match bpftrace_runs() {
        Ok(()) => modes.push(Mode::Bpftrace),
        Err(why) => notes.push(format!("bpftrace not compared: {why}")),
    }
    // Every traced run sits between two untraced runs and is divided by their mean: the
    // machine's speed drifts within a round (by a quarter on this shared machine), and
    // the neighbours see the same drift. Modes rotate their order every round.
    // (mode, round) -> (connects, DNS queries), and the (connect, DNS) ratios of the
    // steal-corrected and of the raw rates.
    let mut rates: Vec<Vec<(Rate, Rate)>> = vec![Vec::new(); modes.len()];
    let mut ratios: Vec<Vec<(f64, f64)>> = vec![Vec::new(); modes.len()];
    let mut raw_ratios: Vec<Vec<(f64, f64)>> = vec![Vec::new(); modes.len()];
    let traced = modes.len() - 1;
    let ratio = |rate: fn(&Rate) -> f64,
                 run: &(Rate, Rate),
                 before: &(Rate, Rate),
                 after: &(Rate, Rate)| {
        (
            rate(&run.0) / ((rate(&before.0) + rate(&after.0)) / 2.0),
            rate(&run.1) / ((rate(&before.1) + rate(&after.1)) / 2.0),
        )
    };
    for round in 0..options.rounds {
        let mut before = measure(&lab, Mode::Untraced, round, &options)?;
        rates[0].push(before);
        for offset in 0..traced {
            let index = 1 + (round + offset) % traced;
            let run = measure(&lab, modes[index], round, &options)?;
            let after = measure(&lab, Mode::Untraced, round, &options)?;
            rates[index].push(run);
            rates[0].push(after);
            ratios[index].push(ratio(Rate::corrected, &run, &before, &after));
            raw_ratios[index].push(ratio(|r| r.per_second, &run, &before, &after));
            before = after;
        }
    }
    let mut results = Vec::new();
    println!(
        "{:<22} {:>16} {:>16} {:>12} {:>10}   (traced / neighbouring untraced runs per second of CPU not stolen, median of {} rounds; raw: of the rates alone)",
        "mode", "connect+close", "DNS queries", "raw connect", "raw DNS", options.rounds
    );
    for (index, mode) in modes.iter().enumerate() {
        let column = |of: &[Rate], pick: fn(&Rate) -> f64| of.iter().map(pick).collect::<Vec<_>>();
        let connects: Vec<Rate> = rates[index].iter().map(|r| r.0).collect();
        let queries: Vec<Rate> = rates[index].iter().map(|r| r.1).collect();
        let mut result = json!({
            "mode": mode.name(),
            "connects_per_second": column(&connects, |r| r.per_second),
            "connect_steal_share": column(&connects, |r| r.steal),
            "dns_queries_per_second": column(&queries, |r| r.per_second),
            "dns_steal_share": column(&queries, |r| r.steal),
        });
        if index > 0 {
            let per_round = |of: &[(f64, f64)], pick: fn(&(f64, f64)) -> f64| -> Vec<f64> {
                of.iter().map(pick).collect()
            };
            let (connect_rounds, dns_rounds) = (
                per_round(&ratios[index], |r| r.0),
                per_round(&ratios[index], |r| r.1),
            );
            let (raw_connect_rounds, raw_dns_rounds) = (
                per_round(&raw_ratios[index], |r| r.0),
                per_round(&raw_ratios[index], |r| r.1),
            );
            let (connect, dns) = (median(&connect_rounds), median(&dns_rounds));
            let (raw_connect, raw_dns) = (median(&raw_connect_rounds), median(&raw_dns_rounds));
            println!(
                "{:<22} {connect:>16.3} {dns:>16.3} {raw_connect:>12.3} {raw_dns:>10.3}",
                mode.name()
            );
            result["connect_ratio"] = json!(connect);
            result["connect_ratio_interval"] = json!(median_interval(&connect_rounds));
            result["connect_ratio_per_round"] = json!(connect_rounds);
            result["dns_ratio"] = json!(dns);
            result["dns_ratio_interval"] = json!(median_interval(&dns_rounds));
            result["dns_ratio_per_round"] = json!(dns_rounds);
            result["raw_connect_ratio"] = json!(raw_connect);
            result["raw_connect_ratio_per_round"] = json!(raw_connect_rounds);
            result["raw_dns_ratio"] = json!(raw_dns);
            result["raw_dns_ratio_per_round"] = json!(raw_dns_rounds);
            let own = |of: &[Rate]| of.iter().filter_map(|r| r.watcher_us).collect::<Vec<_>>();
            let (connect_cpu, dns_cpu) = (own(&connects), own(&queries));
            let middle = |of: &[f64]| (!of.is_empty()).then(|| median(of));
            result["watcher_cpu_us_per_connection"] = json!(middle(&connect_cpu));
            result["watcher_cpu_us_per_connection_per_round"] = json!(connect_cpu);
            result["watcher_cpu_us_per_query"] = json!(middle(&dns_cpu));
            result["watcher_cpu_us_per_query_per_round"] = json!(dns_cpu);
        }
        results.push(result);
    }
    print_per_watcher(
        &results[1..],
        ("connect+close", "DNS queries"),
        "95% confidence interval of each median above, from the order statistics of its rounds; none below 6 rounds",
        |result| {
            (
                interval_text(&result["connect_ratio_interval"]),
                interval_text(&result["dns_ratio_interval"]),
            )
        },
    );
    print_per_watcher(
        &results[1..],
        ("µs/connection", "µs/DNS query"),
        "CPU time of the watcher's own threads per operation, median; the agent's kernel programs run in the load's threads, outside it",
        |result| {
            let us = |field: &str| format!("{:.2}", result[field].as_f64().unwrap_or(f64::NAN));
            (
                us("watcher_cpu_us_per_connection"),
                us("watcher_cpu_us_per_query"),
            )
        },
    );
    println!(
        "{:<22} {:>16} {:>16}   (the watcher's kernel programs' run time per operation, from the kernel's BPF run-time statistics during a run of each load; a separate run, so that the statistics' own cost stays out of the ratios)",
        "mode", "µs/connection", "µs/DNS query"
    );
    for (index, mode) in modes.iter().enumerate().skip(1) {
        let cost = kernel_programs_cost(&lab, *mode, &options)?;
        match cost {
            Some((connection, query)) => {
                println!("{:<22} {connection:>16.2} {query:>16.2}", mode.name());
                results[index]["kernel_programs_us_per_connection"] = json!(connection);
                results[index]["kernel_programs_us_per_query"] = json!(query);
            }
            None => println!(
                "{:<22} {:>16} {:>16}   (no BPF programs: a packet socket's filter is not counted)",
                mode.name(),
                "-",
                "-"
            ),
        }
    }
    let agent = &results[1];
    let verdicts = [
        ("agent connect ratio >= 0.95", "connect_ratio", 0.95),
        ("agent DNS ratio >= 0.97", "dns_ratio", 0.97),
    ];
    for note in &notes {
        println!("note: {note}");
    }
    for (target, field, bound) in verdicts {
        let met = agent[field].as_f64() >= Some(bound);
        let interval = &agent[format!("{field}_interval")];
        // Whether the rounds' scatter leaves the verdict open.
        let open = interval[0].as_f64() < Some(bound) && interval[1].as_f64() >= Some(bound);
        println!(
            "target {target}: {}{}",
            if met { "met" } else { "NOT met" },
            if open {
                format!(
                    " (median {:.3}; its 95% interval {} includes {bound})",
                    agent[field].as_f64().unwrap_or(f64::NAN),
                    interval_text(interval)
                )
            } else {
                String::new()
            }
        );
    }
    for other in &results[2..] {
        let cheaper = agent["connect_ratio"].as_f64() > other["connect_ratio"].as_f64()
            && agent["dns_ratio"].as_f64() >= other["dns_ratio"].as_f64();
        println!(
            "target lower overhead than {}: {}",
            other["mode"].as_str().unwrap_or("?"),
            if cheaper { "met" } else { "NOT met" }
        );
    }
    let loss = loss_at_full_rate(&lab, options.seconds.max(5.0))?;
    println!(
        "loss at full rate: {:.0} connects/s, {} events lost, {} skipped; connections made {}, counted {}",
        loss["connects_per_second"].as_f64().unwrap_or_default(),
        loss["events_lost"],
        loss["events_skipped"],
        loss["connections_made"],
        loss["connections_counted"]
    );
    let soak = if options.soak_seconds > 0 {
        let soak = churn_soak(&lab, options.soak_seconds)?;
        println!(
            "soak {} s: agent RSS {} KiB after warm-up, {} KiB at the end (max {} KiB)",
            options.soak_seconds,
            soak["rss_kib_after_warm_up"],
            soak["rss_kib_at_end"],
            soak["rss_kib_max"]
        );
        soak
    } else {
        Value::Null
    };
    write_results(
        &options,
        &results,
        &notes,
        json!({ "loss": loss, "soak": soak }),
    )
}

/// `--pool RESULTS...`: the rounds of earlier runs' JSON files taken together, per mode:
/// the median of the pooled per-round ratios and its 95% interval (one file gives that
/// run's own figures, intervals included for runs from before they were printed).
fn pool(files: &[String]) -> Result<(), String> {
    if files.is_empty() {
        return Err("--pool takes one or more bench/results/kernel-*.json files".into());
    }
    // mode -> (connect ratios, DNS ratios), in the order the modes first appear.
    let mut pooled: Vec<(String, Vec<f64>, Vec<f64>)> = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file).map_err(|e| format!("{file}: {e}"))?;
        let run: Value = serde_json::from_str(&text).map_err(|e| format!("{file}: {e}"))?;
        let results = run["results"]
            .as_array()
            .ok_or_else(|| format!("{file}: no results (not a kernel bench file?)"))?;
        for result in results.iter().skip(1) {
            let mode = result["mode"].as_str().unwrap_or("?").to_string();
            let rounds = |field: &str| -> Vec<f64> {
                result[field]
                    .as_array()
                    .map(|values| values.iter().filter_map(Value::as_f64).collect())
                    .unwrap_or_default()
            };
            let index = match pooled.iter().position(|(known, ..)| *known == mode) {
                Some(index) => index,
                None => {
                    pooled.push((mode, Vec::new(), Vec::new()));
                    pooled.len() - 1
                }
            };
            pooled[index].1.extend(rounds("connect_ratio_per_round"));
            pooled[index].2.extend(rounds("dns_ratio_per_round"));
        }
    }
    println!(
        "{:<22} {:>7} {:>24} {:>24}   (median of the pooled rounds, and its 95% interval)",
        "mode", "rounds", "connect+close", "DNS queries"
    );
    for (mode, connects, queries) in &pooled {
        let cell = |of: &[f64]| {
            let interval = json!(median_interval(of));
            format!("{:.3} ({})", median(of), interval_text(&interval))
        };
        println!(
            "{mode:<22} {:>7} {:>24} {:>24}",
            connects.len(),
            cell(connects),
            cell(queries)
        );
    }
    Ok(())
}

/// A load's rate over one run, and the share of the machine's CPU time stolen meanwhile.
#[derive(Clone, Copy, Debug)]
struct Rate {
    per_second: f64,
    steal: f64,
    /// The watcher's own CPU time (all its threads, user and kernel) per operation, in
    /// µs; `None` without a watcher.
    watcher_us: Option<f64>,
}

impl Rate {
    /// Per second of CPU time the machine had.
    fn corrected(&self) -> f64 {
        self.per_second / (1.0 - self.steal)
    }
}

/// All CPUs' time (ticks since boot) and its stolen part, from `/proc/stat`.
fn cpu_ticks() -> Result<(u64, u64), String> {
    let stat = std::fs::read_to_string("/proc/stat").map_err(|e| format!("/proc/stat: {e}"))?;
    // user nice system idle iowait irq softirq steal (guest time is within user).
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|line| line.strip_prefix("cpu "))
        .map(|fields| {
            fields
                .split_whitespace()
                .take(8)
                .filter_map(|f| f.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    match ticks.as_slice() {
        [.., steal] if ticks.len() == 8 => Ok((ticks.iter().sum(), *steal)),
        _ => Err("/proc/stat has no cpu line with steal time".into()),
    }
}

/// CPU time (ns) the threads of process `pid` have run, from their `schedstat`.
fn process_cpu_ns(pid: u32) -> Result<u64, String> {
    let tasks = format!("/proc/{pid}/task");
    let entries = std::fs::read_dir(&tasks).map_err(|e| format!("{tasks}: {e}"))?;
    Ok(entries
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|text| text.split_whitespace().next()?.parse::<u64>().ok())
        .sum())
}

/// Runs a load generator in the pod: its rate, with the CPU time stolen meanwhile and
/// the CPU time the watcher (process `watcher`) used per operation.
fn timed_load(
    lab: &Lab,
    what: &str,
    args: &[String],
    watcher: Option<u32>,
) -> Result<Rate, String> {
    let (total_before, steal_before) = cpu_ticks()?;
    let watcher_before = watcher.map(process_cpu_ns).transpose()?;
    let (done, _, seconds) = load_counts(lab, what, args)?;
    let watcher_after = watcher.map(process_cpu_ns).transpose()?;
    let (total_after, steal_after) = cpu_ticks()?;
    let total = total_after.saturating_sub(total_before);
    let steal = steal_after.saturating_sub(steal_before);
    Ok(Rate {
        per_second: done / seconds,
        watcher_us: watcher_before
            .zip(watcher_after)
            .map(|(before, after)| after.saturating_sub(before) as f64 / 1e3 / done.max(1.0)),
        // Capped, so that a run the hypervisor took almost entirely cannot weigh more
        // than ten runs.
        steal: if total == 0 {
            0.0
        } else {
            (steal as f64 / total as f64).min(0.9)
        },
    })
}

/// One run of both loads under `mode`: (connects, DNS queries).
fn measure(lab: &Lab, mode: Mode, round: usize, options: &Options) -> Result<(Rate, Rate), String> {
    unless_interrupted()?;
    let watcher = start(lab, mode)?;
    thread::sleep(WATCHER_SETTLE);
    let pid = watcher.as_ref().map(Watcher::pid);
    let loads = timed_load(
        lab,
        "connect-loop",
        &connect_args(options.seconds, LOAD_THREADS),
        pid,
    )
    .and_then(|connects| {
        let queries = timed_load(lab, "dns-loop", &dns_args(options.seconds), pid)?;
        Ok((connects, queries))
    });
    // Stopped whatever the loads did: a watcher left running would skew every later run.
    if let Some(watcher) = watcher {
        watcher.stop()?;
    }
    let (connects, queries) = loads?;
    eprintln!(
        "bench: round {} {:<22} {:>9.0} connects/s ({:.0}% stolen) {:>9.0} queries/s ({:.0}% stolen)",
        round + 1,
        mode.name(),
        connects.per_second,
        connects.steal * 100.0,
        queries.per_second,
        queries.steal * 100.0,
    );
    Ok((connects, queries))
}

/// The agent under the most connections the lab carries: what it lost, and whether the
/// exact counters match the connections the load made.
fn loss_at_full_rate(lab: &Lab, seconds: f64) -> Result<Value, String> {
    unless_interrupted()?;
    let agent = start_agent(lab)?;
    let args = connect_args(seconds, LOSS_THREADS);
    let (made, _, elapsed) = load_counts(lab, "connect-loop", &args)?;
    // The agent reads the kernel's handshake counts every second.
    thread::sleep(Duration::from_secs(3));
    let metrics = agent::metrics(lab).map_err(|e| format!("cannot read the metrics: {e}"))?;
    agent.stop(libc::SIGTERM).map_err(|e| e.to_string())?;
    let sum = |name: &str, wanted: &[&str]| -> f64 {
        metrics
            .iter()
            .filter(|(series, _)| {
                series.starts_with(&format!("{name}{{"))
                    && wanted.iter().all(|w| series.contains(w))
            })
            .map(|(_, value)| value)
            .sum()
    };
    Ok(json!({
        "threads": LOSS_THREADS,
        "connects_per_second": made / elapsed,
        "connections_made": made,
        "connections_counted": sum(
            "egress_connections_total",
            &["pod=\"client\"", "outcome=\"established\""]
        ),
        "events_lost": sum("egress_events_lost_total", &[]),
        "events_skipped": sum("egress_events_skipped_total", &[]),
    }))
}

/// The agent under steady connection and lookup churn for `seconds`: its RSS every
/// `SOAK_SAMPLE`.
fn churn_soak(lab: &Lab, seconds: u64) -> Result<Value, String> {
    unless_interrupted()?;
    let agent = start_agent(lab)?;
    let helper = egress_lab::lab_helper().map_err(|e| e.to_string())?;
    let helper = helper.to_str().unwrap_or("lab");
    let rate = SOAK_RATE.to_string();
    let duration = seconds.to_string();
    let sink = format!("{}:{}", addr::ENDPOINT, addr::SINK_PORT);
    let dns = addr::CLUSTER_DNS.to_string();
    let loads: [Vec<&str>; 2] = [
        vec![
            "connect-loop",
            &sink,
            "--seconds",
            &duration,
            "--rate",
            &rate,
        ],
        vec![
            "dns-loop",
            &dns,
            addr::ENDPOINT_NAME,
            "--seconds",
            &duration,
            "--rate",
            &rate,
        ],
    ];
    let mut children = Vec::new();
    for args in &loads {
        children.push(
            lab.spawn_in_pod(pod(lab), helper, args)
                .map_err(|e| e.to_string())?,
        );
    }
    let start = Instant::now();
    let mut samples = Vec::new();
    while start.elapsed() < Duration::from_secs(seconds) {
        unless_interrupted()?;
        thread::sleep(SOAK_SAMPLE);
        samples.push((start.elapsed().as_secs(), rss_kib(agent.pid())?));
    }
    for mut child in children {
        child.wait().map_err(|e| e.to_string())?;
    }
    agent.stop(libc::SIGTERM).map_err(|e| e.to_string())?;
    let after_warm_up = samples
        .iter()
        .find(|(at, _)| *at >= SOAK_WARM_UP.as_secs())
        .map_or(0, |(_, rss)| *rss);
    Ok(json!({
        "seconds": seconds,
        "rate_per_second": SOAK_RATE,
        "rss_kib_after_warm_up": after_warm_up,
        "rss_kib_at_end": samples.last().map_or(0, |(_, rss)| *rss),
        "rss_kib_max": samples.iter().map(|(_, rss)| *rss).max().unwrap_or(0),
        "rss_kib_samples": samples,
    }))
}

fn rss_kib(pid: u32) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("cannot read the agent's status: {e}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| "no VmRSS in the agent's status".into())
}

fn connect_args(seconds: f64, threads: u32) -> Vec<String> {
    vec![
        "connect-loop".into(),
        format!("{}:{}", addr::ENDPOINT, addr::SINK_PORT),
        "--seconds".into(),
        seconds.to_string(),
        "--parallel".into(),
        threads.to_string(),
    ]
}

fn dns_args(seconds: f64) -> Vec<String> {
    vec![
        "dns-loop".into(),
        addr::CLUSTER_DNS.to_string(),
        addr::ENDPOINT_NAME.into(),
        "--seconds".into(),
        seconds.to_string(),
        "--parallel".into(),
        LOAD_THREADS.to_string(),
    ]
}

/// The run time of the BPF programs `mode`'s watcher loads, per connection and per DNS
/// query (µs), over one run of each load; `None` when it loads none (tcpdump).
fn kernel_programs_cost(
    lab: &Lab,
    mode: Mode,
    options: &Options,
) -> Result<Option<(f64, f64)>, String> {
    unless_interrupted()?;
    let before = program_run_times()?;
    let watcher = start(lab, mode)?;
    // The programs loaded meanwhile are the watcher's: nothing else here loads any.
    let ours = |times: &[(u32, u64)]| -> u64 {
        times
            .iter()
            .filter(|(id, _)| !before.iter().any(|(old, _)| old == id))
            .map(|(_, ns)| ns)
            .sum()
    };
    let measured = (|| {
        let loaded = settled_program_count(before.len())? > before.len();
        let stats = RunTimeStats::enable()?;
        let start = ours(&program_run_times()?);
        let (connections, _, _) = load_counts(
            lab,
            "connect-loop",
            &connect_args(options.seconds, LOAD_THREADS),
        )?;
        let after_connects = ours(&program_run_times()?);
        let (queries, _, _) = load_counts(lab, "dns-loop", &dns_args(options.seconds))?;
        let after_queries = ours(&program_run_times()?);
        drop(stats);
        Ok::<_, String>(loaded.then(|| {
            (
                after_connects.saturating_sub(start) as f64 / 1e3 / connections.max(1.0),
                after_queries.saturating_sub(after_connects) as f64 / 1e3 / queries.max(1.0),
            )
        }))
    })();
    if let Some(watcher) = watcher {
        watcher.stop()?;
    }
    measured
}

/// The number of loaded BPF programs once it stops growing: a watcher may say it is
/// ready before it has loaded them all (bpftrace announces its probes first). Gives up
/// after 5 s, when the watcher loads none.
fn settled_program_count(before: usize) -> Result<usize, String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = before;
    loop {
        thread::sleep(Duration::from_millis(200));
        let now = program_run_times()?.len();
        if (now > before && now == last) || Instant::now() > deadline {
            return Ok(now);
        }
        last = now;
    }
}

/// Each loaded BPF program's id and total run time in ns (0 while run-time statistics
/// are off), from `bpftool prog show`.
fn program_run_times() -> Result<Vec<(u32, u64)>, String> {
    let output = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .map_err(|e| format!("cannot run bpftool: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "bpftool prog show failed: {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let programs: Vec<Value> = serde_json::from_slice(&output.stdout)
        .map_err(|e| format!("bpftool prog show printed no JSON list: {e}"))?;
    Ok(programs
        .iter()
        .filter_map(|program| {
            let id = u32::try_from(program["id"].as_u64()?).ok()?;
            Some((id, program["run_time_ns"].as_u64().unwrap_or(0)))
        })
        .collect())
}

/// The kernel's BPF run-time statistics, on while this lives: `BPF_ENABLE_STATS` hands
/// out a file descriptor that keeps them on until it is closed (also when the bench dies),
/// unlike the `kernel.bpf_stats_enabled` sysctl.
struct RunTimeStats {
    _enabled: std::os::fd::OwnedFd,
}

impl RunTimeStats {
    fn enable() -> Result<Self, String> {
        const BPF_ENABLE_STATS: libc::c_long = 32;
        const BPF_STATS_RUN_TIME: u32 = 0;
        // `union bpf_attr`'s `enable_stats` member: its `type`, zero-padded.
        let mut attr = [0u8; 16];
        attr[..4].copy_from_slice(&BPF_STATS_RUN_TIME.to_ne_bytes());
        // SAFETY: bpf(2) reads `attr.len()` bytes of `attr`.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_ENABLE_STATS,
                attr.as_ptr(),
                attr.len() as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(format!(
                "BPF_ENABLE_STATS failed: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: a new file descriptor that nothing else owns.
        let enabled = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd as i32) };
        Ok(Self { _enabled: enabled })
    }
}

/// Runs a load generator in the pod; what it did, failed, and for how long.
fn load_counts(lab: &Lab, what: &str, args: &[String]) -> Result<(f64, f64, f64), String> {
    let helper = egress_lab::lab_helper().map_err(|e| e.to_string())?;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = lab
        .output_in_pod(pod(lab), helper.to_str().unwrap_or("lab"), &args)
        .map_err(|e| e.to_string())?;
    let fields: Vec<f64> = output
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    match fields.as_slice() {
        [done, failed, seconds] if *seconds > 0.0 => Ok((*done, *failed, *seconds)),
        _ => Err(format!("{what} printed {output:?}")),
    }
}

fn pod(lab: &Lab) -> &LabPod {
    lab.pod("client")
}

/// A running watcher, stopped with SIGTERM (and SIGKILL after 10 s).
enum Watcher {
    Agent(Tracer),
    Process(Child),
}

impl Watcher {
    fn pid(&self) -> u32 {
        match self {
            Watcher::Agent(tracer) => tracer.pid(),
            Watcher::Process(child) => child.id(),
        }
    }

    fn stop(self) -> Result<(), String> {
        match self {
            Watcher::Agent(tracer) => tracer
                .stop(libc::SIGTERM)
                .map(drop)
                .map_err(|e| e.to_string()),
            Watcher::Process(mut child) => {
                // SAFETY: kill(2) of our own child.
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
                let deadline = Instant::now() + Duration::from_secs(10);
                while child.try_wait().map_err(|e| e.to_string())?.is_none() {
                    if Instant::now() > deadline {
                        let _ = child.kill();
                    }
                    thread::sleep(Duration::from_millis(20));
                }
                Ok(())
            }
        }
    }
}

fn start(lab: &Lab, mode: Mode) -> Result<Option<Watcher>, String> {
    match mode {
        Mode::Untraced => Ok(None),
        Mode::Agent => start_agent(lab).map(|tracer| Some(Watcher::Agent(tracer))),
        Mode::Tcpdump => {
            let file = lab.cluster_state().with_file_name("bench.pcap");
            let mut command = Command::new("ip");
            command.args([
                "netns",
                "exec",
                &pod(lab).netns,
                "tcpdump",
                "-i",
                "any",
                "-n",
                "-U",
                "-w",
            ]);
            command.arg(&file);
            started(command, "listening on").map(|child| Some(Watcher::Process(child)))
        }
        Mode::Bpftrace => {
            started(bpftrace(), "Attaching").map(|child| Some(Watcher::Process(child)))
        }
    }
}

fn start_agent(lab: &Lab) -> Result<Tracer, String> {
    let args = agent::args(lab);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Tracer::start(lab, &args).map_err(|e| e.to_string())
}

/// Starts `command` and waits for `ready` in its output.
fn started(mut command: Command, ready: &'static str) -> Result<Child, String> {
    let program = format!("{:?}", command.get_program());
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {program}: {e}"))?;
    let (tx, rx) = mpsc::channel();
    for stream in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(ready) => {
                // Keep draining so the tool never blocks on a full pipe.
                thread::spawn(move || while rx.recv().is_ok() {});
                return Ok(child);
            }
            Ok(line) => seen.push(line),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{program} did not start: {}", seen.join(" | ")));
            }
        }
    }
}

/// Whether bpftrace is installed and can attach its script on this kernel.
fn bpftrace_runs() -> Result<(), String> {
    Watcher::Process(started(bpftrace(), "Attaching")?).stop()
}

/// bpftrace with the script, in a mount namespace of its own with tracefs mounted (it
/// finds tracepoints there; the machine's own mounts are left alone).
fn bpftrace() -> Command {
    let mut command = Command::new("unshare");
    command.args([
        "--mount",
        "sh",
        "-c",
        "mount -t tracefs nodev /sys/kernel/tracing && exec bpftrace -e \"$0\"",
        BPFTRACE_SCRIPT,
    ]);
    command
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[middle]
    } else {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    }
}

/// A table of one line per watcher: its mode and the two cells `cells` makes of its
/// result.
fn print_per_watcher(
    results: &[Value],
    (connect, dns): (&str, &str),
    about: &str,
    cells: impl Fn(&Value) -> (String, String),
) {
    println!("{:<22} {connect:>16} {dns:>16}   ({about})", "mode");
    for result in results {
        let (connect, dns) = cells(result);
        println!(
            "{:<22} {connect:>16} {dns:>16}",
            result["mode"].as_str().unwrap_or("?")
        );
    }
}

/// `lo-hi` of a JSON interval, `-` for none.
fn interval_text(interval: &Value) -> String {
    match (interval[0].as_f64(), interval[1].as_f64()) {
        (Some(lo), Some(hi)) => format!("{lo:.3}-{hi:.3}"),
        _ => "-".into(),
    }
}

/// A 95% confidence interval of the median of `values`, free of any assumption about
/// their distribution: the k-th smallest and k-th largest value, for the largest k that
/// leaves at most 2.5% probability on each side (each value falls below the true median
/// with probability one half). `None` for fewer than 6 values, which no such pair covers.
/// What it tells: whether a median's distance from a target is more than the rounds'
/// scatter.
fn median_interval(values: &[f64]) -> Option<(f64, f64)> {
    let n = values.len();
    // P(at most j of the n values fall below the median), cumulated.
    let mut below = 0.0;
    let mut ways = 1.0;
    let mut k = 0;
    for j in 0..n {
        below += ways / 2f64.powi(n as i32);
        if below > 0.025 {
            break;
        }
        k = j + 1;
        ways = ways * (n - j) as f64 / (j + 1) as f64;
    }
    if k == 0 {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    Some((sorted[k - 1], sorted[n - k]))
}

fn write_results(
    options: &Options,
    results: &[Value],
    notes: &[String],
    agent_runs: Value,
) -> Result<(), String> {
    std::fs::create_dir_all(&options.out)
        .map_err(|e| format!("cannot create {}: {e}", options.out.display()))?;
    let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        .to_string()
        .replace(':', "");
    let path = options.out.join(format!("kernel-{stamp}.json"));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let document = json!({
        "benchmark": "kernel overhead",
        "kernel": kernel.trim(),
        "rounds": options.rounds,
        "seconds_per_run": options.seconds,
        "results": results,
        "agent": agent_runs,
        "notes": notes,
    });
    std::fs::write(&path, format!("{document:#}\n"))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    println!("results: {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_interval_takes_the_order_statistics_of_a_95_percent_interval() {
        // Fewer than six rounds: even the smallest and largest cover only 1 - 2/2^5.
        assert_eq!(median_interval(&[1.0, 2.0, 3.0, 4.0, 5.0]), None);
        // Six: 1 - 2/64 = 96.9%, the extremes.
        assert_eq!(
            median_interval(&[6.0, 1.0, 5.0, 2.0, 4.0, 3.0]),
            Some((1.0, 6.0))
        );
        // Fifteen: the 4th and 12th (P(at most 3 below) = 1.76%, at most 4: 5.9%).
        let fifteen: Vec<f64> = (1..=15).rev().map(f64::from).collect();
        assert_eq!(median_interval(&fifteen), Some((4.0, 12.0)));
        // Twenty: the 6th and 15th (2.07%; at most 6 below: 5.8%).
        let twenty: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(median_interval(&twenty), Some((6.0, 15.0)));
    }
}
