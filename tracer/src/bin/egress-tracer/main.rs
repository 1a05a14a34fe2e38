//! The `egress-tracer` command line.
//!
//! Exit codes: 0 success, 1 a failure while running, 2 a usage or environment error
//! (bad arguments, unknown pod, missing privileges, unsupported kernel).

mod agent;
mod cluster_source;
mod diagnose;
mod http;
mod policy;
mod remote;
mod trace;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use egress_tracer::{
    capture::{Capture, CaptureError},
    cluster::{LoadError, PodLookupError, api::ApiError},
    output::Format,
};

#[derive(Parser)]
#[command(
    name = "egress-tracer",
    version,
    about = "eBPF egress flow tracer for Kubernetes nodes",
    long_about = "Shows, from the kernel, what happens to the egress attempts of the pods on \
                  this node, and which hop stops them: DNS, a NetworkPolicy, the node's \
                  firewall, conntrack/NAT, routing, something beyond the node, a proxy or the \
                  endpoint itself, with the evidence and what to check next.\n\n\
                  trace and diagnose need root (or CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN; \
                  diagnose also CAP_SYS_ADMIN) and a kernel with BTF and BPF ring buffers \
                  (Linux 5.8 or newer); policy needs nothing."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Trace egress attempts live, one record per attempt or DNS lookup, with its verdict.
    #[command(after_help = "Examples:\n  \
        egress-tracer trace --pod shop/web --failures-only\n  \
        egress-tracer trace --cluster-state state/ --duration 30s -o json | jq .verdict\n\n\
        Without --cluster-state the pods, Services and NetworkPolicies come from the \
        Kubernetes API (kubeconfig or in-cluster). To work from files, save them with \
        `kubectl get pods -A -o yaml > pods.yaml` (add services,endpointslices,namespaces,\
        networkpolicies for names and policy verdicts; a file or a directory).")]
    Trace(TraceArgs),
    /// Explain what the NetworkPolicies decide for one flow of a pod, and why.
    #[command(after_help = "Exit codes: 0 allowed, 1 denied, 2 usage error.\n\n\
        Examples:\n  \
        egress-tracer policy --cluster-state state.yaml --pod shop/web --to 10.0.0.10:53/UDP\n  \
        egress-tracer policy --cluster-state state/ --pod shop/web --to 203.0.113.10:443 -o json\n\n\
        Save the state with `kubectl get pods,namespaces,networkpolicies -A -o yaml > state.yaml`. \
        In-cluster destinations are judged by the source's egress and the destination pod's ingress.")]
    Policy(PolicyArgs),
    /// Check whether a pod can reach a target, hop by hop, while the kernel watches.
    #[command(
        after_help = "Runs the troubleshooting checklist from inside the pod: DNS through \
        the pod's resolv.conf (and from the node, and straight to --upstream-dns), the pod's \
        proxy (HTTP(S)_PROXY, NO_PROXY) with its answer to CONNECT, a TCP connect to each \
        address, HTTP HEAD for http URLs or a TLS handshake for https, and the NetworkPolicy \
        decision; then one verdict.\n\n\
        Exit codes: 0 reachable, 1 a hop fails, 2 usage or environment error.\n\n\
        Examples:\n  \
        egress-tracer diagnose --pod shop/web https://api.example.test/\n  \
        egress-tracer diagnose --pod shop/web 203.0.113.10:443 --timeout 3s -o json"
    )]
    Diagnose(DiagnoseArgs),
    /// Trace every pod on this node continuously; serve metrics and recent flows over HTTP.
    #[command(after_help = "Serves, on --listen:\n  \
        /metrics        Prometheus metrics (OpenMetrics text)\n  \
        /healthz        200 while the process runs\n  \
        /readyz         200 once the kernel programs are attached and the cluster state \
        has synced, else 503 with the reason\n  \
        /api/v1/flows   recent records as NDJSON (the `trace -o json` records); filters: \
        namespace, pod (NAME or NS/NAME), hop, since (5m or an RFC 3339 time), \
        follow=true to stream new records\n\n\
        SIGTERM (or Ctrl-C) stops it: the last records are published, the kernel programs \
        detached, open streams ended, and it exits 0.\n\n\
        Examples:\n  \
        egress-tracer agent --listen 127.0.0.1:9090\n  \
        curl 'http://127.0.0.1:9090/api/v1/flows?namespace=shop&hop=dns&follow=true'\n\n\
        Needs what trace needs; in a cluster, deploy/ runs it as a DaemonSet.")]
    Agent(agent::AgentArgs),
    /// (internal) The checks diagnose runs inside the pod.
    #[command(hide = true)]
    Probe(ProbeArgs),
}

/// Where to find a running agent (trace and diagnose).
#[derive(clap::Args)]
pub struct AgentLocation {
    /// Ask a running agent instead of tracing here: its URL (http://HOST:9090), or
    /// `auto` to reach the agent on the pod's node through the Kubernetes API server
    /// (pods/proxy; needs only a kubeconfig, no access to the node).
    #[arg(long, value_name = "URL|auto")]
    pub agent: Option<String>,
    /// Namespace of the agent's DaemonSet, for `--agent auto`.
    #[arg(long, value_name = "NS", default_value = "egress-tracer", value_parser = parse_namespace)]
    pub agent_namespace: String,
    /// A file with the agent's API token. Default with `--agent auto`: the `token` of the
    /// Secret egress-tracer-api-token in the agent's namespace, if you may read it.
    #[arg(long, value_name = "PATH", env = "EGRESS_TRACER_AGENT_TOKEN_FILE")]
    pub agent_token_file: Option<PathBuf>,
}

#[derive(clap::Args)]
struct DiagnoseArgs {
    /// The pod, as NAMESPACE/NAME (it must run on this node).
    #[arg(long, value_name = "NS/NAME", value_parser = parse_pod_reference)]
    pod: String,
    /// A URL (http://, https://), HOST:PORT or IP:PORT.
    target: String,
    /// How long a TCP connect may take.
    #[arg(long, value_name = "D", value_parser = parse_duration, default_value = "5s")]
    timeout: Duration,
    /// How long a DNS query may wait, when the pod's resolv.conf sets no `timeout:`.
    #[arg(long, value_name = "D", value_parser = parse_duration, default_value = "5s")]
    dns_timeout: Duration,
    /// A DNS server to ask directly, bypassing the cluster DNS (e.g. 168.63.129.16,
    /// Azure DNS, or the custom DNS server of the VNet). Default: the node's own DNS
    /// server (systemd-resolved's upstream, else /etc/resolv.conf).
    #[arg(long, value_name = "IP")]
    upstream_dns: Option<std::net::IpAddr>,
    /// Pods, Services, Namespaces and NetworkPolicies from kubectl YAML/JSON; without it,
    /// the Kubernetes API.
    #[arg(long, value_name = "PATH", env = "EGRESS_TRACER_CLUSTER_STATE")]
    cluster_state: Option<PathBuf>,
    /// This node's name (default: NODE_NAME, else the host name).
    #[arg(long, value_name = "NAME", env = "NODE_NAME")]
    node_name: Option<String>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
    /// BTF of the running kernel (see `trace --help`).
    #[arg(long, value_name = "PATH", default_value = egress_tracer::node::KERNEL_BTF)]
    btf: PathBuf,
    #[command(flatten)]
    remote: AgentLocation,
}

#[derive(clap::Args)]
struct ProbeArgs {
    /// The container cgroup to join.
    #[arg(long)]
    cgroup: PathBuf,
    /// The descriptor (inherited) of the pod's network namespace to enter.
    #[arg(long)]
    netns_fd: i32,
}

#[derive(clap::Args)]
struct PolicyArgs {
    /// The source pod, as NAMESPACE/NAME.
    #[arg(long, value_name = "NS/NAME", value_parser = parse_pod_reference)]
    pod: String,
    /// The destination, as IP:PORT[/PROTO] (TCP, UDP or SCTP; TCP by default).
    #[arg(long, value_name = "IP:PORT[/PROTO]")]
    to: String,
    /// Pods, Namespaces and NetworkPolicies from kubectl YAML/JSON (files, Lists,
    /// multi-document files or a directory). Without it, they come from the Kubernetes
    /// API (KUBECONFIG, ~/.kube/config, or the in-cluster service account).
    #[arg(long, value_name = "PATH", env = "EGRESS_TRACER_CLUSTER_STATE")]
    cluster_state: Option<PathBuf>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

#[derive(clap::Args)]
struct TraceArgs {
    /// Only this pod's attempts, as NAMESPACE/NAME. Without it, every process on the node.
    #[arg(long, value_name = "NS/NAME", value_parser = parse_pod_reference)]
    pod: Option<String>,
    /// Pods, Services, EndpointSlices, Namespaces and NetworkPolicies from kubectl
    /// YAML/JSON (single objects, Lists, multi-document files or a directory of them).
    /// Without it, they come from the Kubernetes API (KUBECONFIG, ~/.kube/config, or the
    /// in-cluster service account), kept up to date while tracing.
    #[arg(long, value_name = "PATH", env = "EGRESS_TRACER_CLUSTER_STATE")]
    cluster_state: Option<PathBuf>,
    /// This node's name, to watch only its pods through the Kubernetes API (default: the
    /// NODE_NAME environment variable, else the host name).
    #[arg(long, value_name = "NAME", env = "NODE_NAME")]
    node_name: Option<String>,
    /// Stop after this long (e.g. 30s, 5m); without it, run until Ctrl-C or SIGTERM.
    #[arg(long, value_name = "D", value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Output format. The table is coloured on a terminal (NO_COLOR turns that off).
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
    /// Only attempts and lookups that failed (any verdict other than `none`).
    #[arg(long)]
    failures_only: bool,
    /// How long a DNS query may wait for its response before it counts as timed out, when
    /// the resolver's own `options timeout:` in the pod's resolv.conf cannot be read.
    #[arg(long, value_name = "D", value_parser = parse_duration, default_value = "5s")]
    dns_timeout: Duration,
    /// Size of the kernel's event ring buffer in bytes (a power of two, at least 4096);
    /// events beyond it are lost and counted, while the kernel's counters stay exact.
    #[arg(long, value_name = "BYTES", value_parser = parse_ring_buffer_size)]
    ring_buffer_size: Option<u32>,
    /// SNAT ports the cloud gives this node (an Azure load balancer's allocatedOutboundPorts;
    /// AKS's default allocation: 1024 per node for pools of up to 50 nodes, 512 up to
    /// 100, 256 up to 200, 128 up to 400, 64 up to 800, 32 up to 1000). When SYNs to a
    /// destination time out while the node's translated flows to it reach 90% of this,
    /// the verdict is `upstream`/`snat-exhaustion-suspected`. Without it, only the
    /// node's local port range counts.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub snat_port_budget: Option<u32>,
    /// BTF of the running kernel, for kernels without /sys/kernel/btf/vmlinux (a file
    /// for this exact kernel, e.g. from BTFHub).
    #[arg(long, value_name = "PATH", default_value = egress_tracer::node::KERNEL_BTF)]
    btf: PathBuf,
    #[command(flatten)]
    remote: AgentLocation,
}

/// A duration such as `30s`, `2m` or `1h30m`; a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = match text.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => {
            humantime::parse_duration(text).map_err(|e| format!("{e} (examples: 10s, 2m, 1h)"))?
        }
    };
    // Longer would overflow deadlines computed from it.
    const LONGEST: Duration = Duration::from_secs(366 * 24 * 3600);
    if duration.is_zero() {
        return Err("must be longer than zero".into());
    }
    if duration > LONGEST {
        return Err("must be at most a year (366d)".into());
    }
    Ok(duration)
}

/// Tells what the kernel programs could not do, and where they are attached.
pub fn report_capture(capture: &Capture) {
    for warning in capture.warnings() {
        eprintln!("warning: {warning}");
    }
    let cgroups: Vec<String> = capture
        .traced_cgroups()
        .iter()
        .map(|c| c.display().to_string())
        .collect();
    eprintln!(
        "egress-tracer: hooks attached to the cgroups {}",
        cgroups.join(", ")
    );
}

/// An error and its causes on one line, each cause only where the text before does not
/// already quote it (library errors often include their source in their own message).
pub fn describe(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

/// `--pod`: NAMESPACE/NAME, both Kubernetes names.
fn parse_pod_reference(text: &str) -> Result<String, String> {
    let valid = |part: &str| {
        !part.is_empty()
            && part.len() <= 253
            && part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && part.starts_with(|c: char| c.is_ascii_alphanumeric())
            && part.ends_with(|c: char| c.is_ascii_alphanumeric())
    };
    match text.split_once('/') {
        Some((namespace, name)) if valid(namespace) && valid(name) => Ok(text.to_owned()),
        _ => Err(
            "give the pod as NAMESPACE/NAME in lower case (e.g. shop/web-5d9c7b6f4-x2x8k)".into(),
        ),
    }
}

/// `--agent-namespace`: a Kubernetes namespace name (DNS-1123 label).
fn parse_namespace(text: &str) -> Result<String, String> {
    let valid = !text.is_empty()
        && text.len() <= 63
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && text.starts_with(|c: char| c.is_ascii_alphanumeric())
        && text.ends_with(|c: char| c.is_ascii_alphanumeric());
    if valid {
        Ok(text.to_owned())
    } else {
        Err("not a namespace name (lower-case letters, digits and '-', at most 63)".into())
    }
}

fn parse_ring_buffer_size(text: &str) -> Result<u32, String> {
    let bytes: u32 = text.parse().map_err(|e| format!("{e}"))?;
    if bytes < 4096 || !bytes.is_power_of_two() {
        return Err("must be a power of two of at least 4096 (the page size)".into());
    }
    Ok(bytes)
}

/// Puts this thread, and so every thread it starts, under `SCHED_BATCH`: the same share
/// of CPU, but its wakeups (a batch of events every 50 ms) no longer preempt the
/// workloads it observes. A preempted DNS server holds up every client waiting on it;
/// the tracer's work can wait a few milliseconds.
fn run_as_batch_work() {
    if let Err(e) = egress_tracer::schedule_calling_thread(libc::SCHED_BATCH) {
        eprintln!(
            "egress-tracer: warning: cannot run as SCHED_BATCH ({e}); its wakeups may preempt the node's workloads"
        );
    }
}

/// An error in what the user asked for (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(String);

fn main() -> ExitCode {
    egress_tracer::release_freed_memory_promptly();
    let cli = Cli::parse();
    if matches!(cli.command, Command::Trace(_) | Command::Agent(_)) {
        run_as_batch_work();
    }
    // One thread for every command. The agent's event loop and its HTTP server take turns
    // (a request waits at most for one batch of events); a second worker thread only
    // added wakeups between the two (~15% more agent CPU per traced connection).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Trace(args) => runtime
            .block_on(trace::run(args))
            .map(|()| ExitCode::SUCCESS),
        Command::Diagnose(args) => runtime.block_on(diagnose::run(args)).map(|reachable| {
            if reachable {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }),
        Command::Agent(args) => runtime
            .block_on(agent::run(args))
            .map(|()| ExitCode::SUCCESS),
        Command::Probe(args) => diagnose::run_probe(args).map(|()| ExitCode::SUCCESS),
        Command::Policy(args) => runtime.block_on(policy::run(args)).map(|allowed| {
            if allowed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {}", describe(&error));
            if is_usage_or_environment(&error) {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

pub fn is_usage_or_environment(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause.is::<UsageError>()
            || cause.is::<PodLookupError>()
            || cause.is::<LoadError>()
            || cause.is::<ApiError>()
            || cause
                .downcast_ref::<CaptureError>()
                .is_some_and(CaptureError::is_environment)
    })
}
