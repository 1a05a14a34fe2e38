//! `egress-tracer agent`: continuous tracing on one node, served over HTTP.
//!
//! One event loop owns the capture and the pipeline; it feeds finished records to the
//! metrics and the flow store, which the HTTP server ([`crate::http`]) reads. SIGTERM
//! marks the agent not ready, drains what the kernel already produced, detaches the
//! programs and ends open follow streams.

use std::{
    collections::HashMap,
    net::SocketAddr,
    os::{
        linux::net::SocketAddrExt,
        unix::net::{UnixListener, UnixStream},
    },
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context;
use egress_tracer::{
    capture::{Capture, CaptureOptions},
    cluster::{ClusterState, api::ClusterApi, cgroups::CgroupIndex},
    conntrack,
    flow::Origin,
    metrics::{Metrics, MetricsOptions},
    node::{self, Capability, MonotonicClock},
    pipeline::{NatLookups, Pipeline},
    store::{FlowStore, StoreLimits},
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, oneshot, watch},
    time::interval,
};

use crate::{cluster_source::ClusterSource, http, parse_duration, parse_ring_buffer_size};

/// How often held attempts and stored records are checked for expiry.
const EXPIRY_TICK: Duration = Duration::from_millis(200);
/// How often the cluster model, the kernel's counts and the metrics are refreshed.
const REFRESH: Duration = Duration::from_secs(1);
/// How often the node's conntrack counters and SNAT usage are read. The SNAT usage comes
/// from a dump of the translated conntrack entries, which costs in proportion to their
/// number (`conntrack::watch` reads less often when a dump takes long).
const CONNTRACK_REFRESH: Duration = Duration::from_secs(10);
/// How long open HTTP requests may take to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Between attempts to reach the Kubernetes API before the first sync.
const API_RETRY: Duration = Duration::from_secs(5);

#[derive(clap::Args)]
pub struct AgentArgs {
    /// Address to serve /metrics, /healthz, /readyz and /api/v1/flows on.
    #[arg(long, value_name = "ADDR:PORT", default_value = "0.0.0.0:9090")]
    listen: SocketAddr,
    /// Pods, Services, EndpointSlices, Namespaces and NetworkPolicies from files (see
    /// `trace --help`); without it, the Kubernetes API, watched continuously.
    #[arg(long, value_name = "PATH", env = "EGRESS_TRACER_CLUSTER_STATE")]
    cluster_state: Option<PathBuf>,
    /// This node's name (default: NODE_NAME, else the host name).
    #[arg(long, value_name = "NAME", env = "NODE_NAME")]
    node_name: Option<String>,
    /// Most records kept for /api/v1/flows (the oldest go first).
    #[arg(long, value_name = "N", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    flows_max_records: u32,
    /// How long records are kept for /api/v1/flows.
    #[arg(long, value_name = "D", value_parser = parse_duration, default_value = "15m")]
    flows_max_age: Duration,
    /// Label metrics by namespace only, not by pod (for nodes with many short-lived pods).
    #[arg(long)]
    no_pod_label: bool,
    /// DNS servers that count as `server="upstream"` in egress_dns_queries_total
    /// (repeatable; default: the node's own DNS servers).
    #[arg(long, value_name = "IP")]
    upstream_dns: Vec<std::net::IpAddr>,
    /// How long a DNS query may wait when the pod's resolv.conf sets no `timeout:`.
    #[arg(long, value_name = "D", value_parser = parse_duration, default_value = "5s")]
    dns_timeout: Duration,
    /// DNS summaries: within each period, a pod's UDP DNS exchange that repeats one
    /// already reported in the period (the same query, the same response) is counted in
    /// the kernel instead of being sent to the agent. The metrics still count every
    /// query, its response code and duration, and timeouts; the flows API reports the
    /// first of the repeated lookups of each period. Between 1ms and 1h.
    #[arg(
        long,
        value_name = "D",
        value_parser = parse_dns_summary_period,
        default_value = "1s",
        conflicts_with = "no_dns_summary"
    )]
    dns_summary_period: Duration,
    /// Send every DNS message to the agent (costs a node with busy resolvers more CPU).
    #[arg(long)]
    no_dns_summary: bool,
    /// Size of the kernel's event ring buffer in bytes (see `trace --help`).
    #[arg(long, value_name = "BYTES", value_parser = parse_ring_buffer_size)]
    ring_buffer_size: Option<u32>,
    /// SNAT ports the cloud gives this node (see `trace --help`).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    snat_port_budget: Option<u32>,
    /// BTF of the running kernel (see `trace --help`).
    #[arg(long, value_name = "PATH", default_value = egress_tracer::node::KERNEL_BTF)]
    btf: PathBuf,
    /// Refuse /api/v1/diagnose (then the agent needs no CAP_SYS_ADMIN: diagnose's probe
    /// enters pods' network namespaces).
    #[arg(long)]
    no_diagnose: bool,
    /// A file holding the token that /api/v1/* requests must present (as
    /// `Authorization: Bearer TOKEN` or `X-Egress-Tracer-Token: TOKEN`): recorded traffic
    /// is sensitive. Without it, the API answers only on a loopback --listen address.
    #[arg(long, value_name = "PATH", env = "EGRESS_TRACER_API_TOKEN_FILE")]
    api_token_file: Option<PathBuf>,
}

/// What the event loop shares with the HTTP server.
pub struct Shared {
    pub metrics: Mutex<Metrics>,
    pub store: Mutex<FlowStore>,
    /// Why the agent is not ready (`None`: ready).
    pub not_ready: Mutex<Option<String>>,
    /// How diagnoses run here (`None`: refused, `--no-diagnose`).
    pub diagnose: Option<DiagnoseSetup>,
    /// Who may use /api/v1/*.
    pub api_access: ApiAccess,
}

/// Who may use the flows and diagnose API.
pub enum ApiAccess {
    /// Clients presenting this token.
    Token(String),
    /// Anyone: the agent listens on loopback only.
    Loopback,
    /// No one: no token, and a --listen address others can reach.
    Refused(String),
}

/// What a diagnosis on this agent needs besides its request.
pub struct DiagnoseSetup {
    pub node_name: Option<String>,
    pub btf: PathBuf,
    /// Asks the event loop for a copy of its cluster model.
    pub cluster: mpsc::Sender<oneshot::Sender<ClusterState>>,
    /// One diagnosis at a time: each loads its own programs and runs a probe.
    pub running: Arc<tokio::sync::Semaphore>,
}

impl Shared {
    fn set_not_ready(&self, reason: Option<String>) {
        *self.not_ready.lock().expect("not poisoned") = reason;
    }
}

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let node_name = crate::cluster_source::node_name(args.node_name.as_deref());
    let upstream_dns = if args.upstream_dns.is_empty() {
        node::dns_servers()
    } else {
        args.upstream_dns.clone()
    };
    let api_access = api_access(&args)?;
    let (cluster_requests, mut cluster_wanted) = mpsc::channel::<oneshot::Sender<ClusterState>>(4);
    let shared = Arc::new(Shared {
        metrics: Mutex::new(Metrics::new(MetricsOptions {
            pod_label: !args.no_pod_label,
            upstream_dns,
            kernel: node::kernel_release(),
        })),
        store: Mutex::new(FlowStore::new(StoreLimits {
            max_records: args.flows_max_records as usize,
            max_age: args.flows_max_age,
        })),
        not_ready: Mutex::new(Some("the kernel programs are not attached yet".into())),
        diagnose: (!args.no_diagnose).then(|| DiagnoseSetup {
            node_name: node_name.clone(),
            btf: args.btf.clone(),
            cluster: cluster_requests,
            running: Arc::new(tokio::sync::Semaphore::new(1)),
        }),
        api_access,
    });
    let _one_per_node = claim_node()?;
    // Signal handlers first: whoever waits for readiness may signal at once.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (choose another with --listen)",
                args.listen
            )
        })?;
    let (stop_server, server_stopped) = watch::channel(false);
    let server = http::spawn(
        listener
            .into_std()
            .context("cannot hand the listening socket to the HTTP thread")?,
        Arc::clone(&shared),
        server_stopped,
    )
    .context("cannot start the HTTP thread")?;

    let (cluster, mut source) = open_cluster(&args, node_name.as_deref()).await?;
    let cgroup_root = node::cgroup2_mount().context("cannot find the cgroup v2 hierarchy")?;
    let cgroups = CgroupIndex::new(cgroup_root.clone())
        .with_context(|| format!("cannot read cgroups under {}", cgroup_root.display()))?;
    let mut pipeline =
        Pipeline::new(cgroups, cluster, None, args.dns_timeout).with_query_outcomes();
    if !args.no_dns_summary {
        pipeline = pipeline.with_dns_summaries();
    }
    if let Err(e) = pipeline.look_up_nat(NatLookups::Failed) {
        eprintln!("warning: {e}");
    }
    let mut capture = Capture::start(&CaptureOptions {
        kernel_btf: args.btf.clone(),
        only_cgroups: None,
        ring_buffer_bytes: args.ring_buffer_size,
        dns_summary_period: (!args.no_dns_summary).then_some(args.dns_summary_period),
    })?;
    crate::report_capture(&capture);
    for warning in capability_warnings(args.no_diagnose) {
        eprintln!("warning: {warning}");
    }
    // In idle time: on a node whose CPUs are busy, the SNAT figures can wait; the
    // workloads should not (a dump of a large table takes tens of milliseconds of CPU).
    let mut node_conntrack =
        conntrack::watch(args.snat_port_budget, CONNTRACK_REFRESH, true, |e| {
            eprintln!("warning: {e}")
        })
        .context("cannot start the conntrack reader thread")?;
    shared.set_not_ready((!source.is_synced()).then(|| source.waiting_reason()));
    eprintln!(
        "egress-tracer: tracing every pod on this node (agent); serving on http://{}",
        args.listen
    );

    let clock = MonotonicClock::new();
    let mut events = Vec::new();
    let mut tick = interval(EXPIRY_TICK);
    let mut refresh = interval(REFRESH);
    loop {
        tokio::select! {
            read = capture.read_batch(&mut events) => read?,
            _ = tick.tick() => {
                pipeline.tick(capture.read_until_ns());
                shared.store.lock().expect("not poisoned").expire(SystemTime::now());
            }
            _ = refresh.tick() => {
                source.poll_connected();
                shared.set_not_ready((!source.is_synced()).then(|| source.waiting_reason()));
                if let Some(state) = source.refresh() {
                    pipeline.set_cluster(state);
                }
                let stale = source.is_stale();
                let mut metrics = shared.metrics.lock().expect("not poisoned");
                metrics.cluster_stale(stale);
                metrics.prune(pipeline.cluster(), Instant::now());
                drop(metrics);
                count_in_kernel(&shared, &mut capture, &mut pipeline)?;
            }
            Ok(()) = node_conntrack.changed() => {
                let latest = node_conntrack.borrow_and_update().clone();
                pipeline.set_snat(latest.snat.clone());
                shared.metrics.lock().expect("not poisoned").conntrack(&latest, pipeline.cluster());
            }
            Some(reply) = cluster_wanted.recv() => {
                let _ = reply.send(pipeline.cluster().clone());
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
        pipeline.handle(&mut events, capture.names());
        publish(&shared, &mut pipeline, clock);
    }

    eprintln!("egress-tracer agent: stopping");
    shared.set_not_ready(Some("shutting down".into()));
    capture.read_available(&mut events);
    pipeline.handle(&mut events, capture.names());
    pipeline.finish();
    publish(&shared, &mut pipeline, clock);
    count_in_kernel(&shared, &mut capture, &mut pipeline)?;
    // Detaches every program.
    drop(capture);
    let _ = stop_server.send(true);
    match tokio::time::timeout(SHUTDOWN_GRACE, server).await {
        Ok(Ok(result)) => result.context("the HTTP server failed")?,
        Ok(Err(_)) => anyhow::bail!("the HTTP server's thread ended without a word"),
        Err(_) => {
            eprintln!("warning: HTTP requests still open after {SHUTDOWN_GRACE:?}; closing them")
        }
    }
    eprintln!("egress-tracer agent: stopped; kernel programs detached");
    Ok(())
}

fn api_access(args: &AgentArgs) -> anyhow::Result<ApiAccess> {
    if let Some(path) = &args.api_token_file {
        let token = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the API token from {}", path.display()))?;
        let token = token.trim();
        if token.len() < 16 {
            return Err(crate::UsageError(format!(
                "the API token in {} is shorter than 16 characters: make a long random one \
                 (for example `openssl rand -hex 32`)",
                path.display()
            ))
            .into());
        }
        return Ok(ApiAccess::Token(token.to_owned()));
    }
    if args.listen.ip().is_loopback() {
        return Ok(ApiAccess::Loopback);
    }
    let reason = format!(
        "the flows and diagnose API is off: the agent listens on {} without --api-token-file",
        args.listen
    );
    eprintln!("warning: {reason}; /metrics, /healthz and /readyz are served");
    Ok(ApiAccess::Refused(reason))
}

fn parse_dns_summary_period(text: &str) -> Result<Duration, String> {
    let period = parse_duration(text)?;
    if period < Duration::from_millis(1) || period > Duration::from_secs(3600) {
        return Err("must be between 1ms and 1h".into());
    }
    Ok(period)
}

/// Name of the abstract Unix socket that marks a node's agent.
const AGENT_SOCKET: &[u8] = b"egress-tracer-agent";

/// Claims the node for this agent: two agents would attach every program twice and count
/// everything twice. The claim is an abstract Unix socket in the node's network
/// namespace (hostNetwork), which the kernel releases however the agent ends, SIGKILL
/// included.
fn claim_node() -> anyhow::Result<UnixListener> {
    let name = std::os::unix::net::SocketAddr::from_abstract_name(AGENT_SOCKET)?;
    match UnixListener::bind_addr(&name) {
        Ok(listener) => Ok(listener),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            let holder = UnixStream::connect_addr(&name)
                .ok()
                .and_then(|stream| peer_pid(&stream))
                .map_or_else(String::new, |pid| format!(" (pid {pid})"));
            Err(crate::UsageError(format!(
                "another egress-tracer agent runs on this node{holder}: stop it first (two \
                 would attach every program twice and count everything twice)"
            ))
            .into())
        }
        Err(e) => Err(e).context("cannot claim the node for this agent"),
    }
}

/// The process at the other end of a Unix socket.
fn peer_pid(stream: &UnixStream) -> Option<i32> {
    let mut credentials = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut length = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED fills a ucred of the given length on a valid socket.
    let done = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(stream),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut credentials as *mut libc::ucred).cast(),
            &mut length,
        )
    };
    (done == 0 && credentials.pid > 0).then_some(credentials.pid)
}

/// What the agent cannot do with the capabilities it has, beyond the hooks (which
/// `Capture::start` checks).
fn capability_warnings(no_diagnose: bool) -> Vec<String> {
    let Ok(effective) = node::effective_capabilities() else {
        return Vec::new();
    };
    let lacks = |cap: Capability| !node::missing_capabilities(effective, &[cap]).is_empty();
    let mut warnings = Vec::new();
    if lacks(Capability::SysPtrace) {
        warnings.push(
            "no CAP_SYS_PTRACE: pods' resolv.conf and network namespaces cannot be read \
             (DNS lookups are grouped with Kubernetes' default search list; drops are not \
             mapped to pods' namespaces; diagnose fails)"
                .to_owned(),
        );
    }
    if lacks(Capability::SysAdmin) && !no_diagnose {
        warnings.push(
            "no CAP_SYS_ADMIN: /api/v1/diagnose will fail (its probe enters the pod's network \
             namespace); pass --no-diagnose to refuse it instead"
                .to_owned(),
        );
    }
    warnings
}

/// Hands finished records to the metrics and the flow store.
fn publish(shared: &Shared, pipeline: &mut Pipeline, clock: MonotonicClock) {
    let records = pipeline.take_records();
    let queries = pipeline.take_query_outcomes();
    if records.is_empty() && queries.is_empty() {
        return;
    }
    let mut metrics = shared.metrics.lock().expect("not poisoned");
    metrics.queries(&queries, pipeline.cluster());
    metrics.records(&records, pipeline.cluster());
    drop(metrics);
    let mut store = shared.store.lock().expect("not poisoned");
    for record in records {
        store.push(record, clock);
    }
}

/// Reads what the kernel counted (events, losses, handshakes, summarised DNS exchanges)
/// into the metrics, and takes the held DNS queries whose response is overdue.
fn count_in_kernel(
    shared: &Shared,
    capture: &mut Capture,
    pipeline: &mut Pipeline,
) -> anyhow::Result<()> {
    let counters = capture
        .counters()
        .context("cannot read the kernel counters")?;
    let handshakes = capture
        .handshakes()
        .context("cannot read the kernel's handshake counts")?;
    let dns_repeats = capture
        .dns_repeats()
        .context("cannot read the kernel's DNS summaries")?;
    let now_ns = node::monotonic_now().as_nanos() as u64;
    let overdue = capture
        .take_overdue_dns_queries(|held| pipeline.held_dns_query_overdue(held, now_ns))
        .context("cannot read the DNS queries the kernel held back")?;
    pipeline.held_dns_queries_timed_out(&overdue);
    let mut origins: HashMap<u64, Arc<Origin>> = HashMap::new();
    let cgroups = handshakes.iter().map(|(key, _)| key.cgroup_id);
    for cgroup in cgroups.chain(dns_repeats.iter().map(|(key, _)| key.cgroup_id)) {
        origins
            .entry(cgroup)
            .or_insert_with(|| pipeline.origin_of(cgroup));
    }
    let qtypes: HashMap<(u64, u64), String> = dns_repeats
        .iter()
        .filter_map(|(key, _)| {
            let qtype = pipeline.dns_query_type(key.cgroup_id, key.query_hash)?;
            Some(((key.cgroup_id, key.query_hash), qtype.to_owned()))
        })
        .collect();
    let dropped_for_room = shared
        .store
        .lock()
        .expect("not poisoned")
        .dropped_for_room();
    let mut metrics = shared.metrics.lock().expect("not poisoned");
    metrics.kernel(&counters);
    metrics.discarded(&pipeline.discarded());
    metrics.discarded(&[("flow_record_dropped_for_room", dropped_for_room)]);
    let idle = metrics.handshakes(
        &handshakes,
        |cgroup| origins.get(&cgroup).cloned().unwrap_or_default(),
        pipeline.cluster(),
    );
    if !idle.is_empty() {
        capture
            .forget_handshakes(&idle)
            .context("cannot remove idle handshake counts")?;
        metrics.forgotten(&idle);
    }
    let idle = metrics.dns_repeats(
        &dns_repeats,
        |cgroup| origins.get(&cgroup).cloned().unwrap_or_default(),
        |cgroup, hash| qtypes.get(&(cgroup, hash)).cloned(),
        pipeline.cluster(),
    );
    if !idle.is_empty() {
        capture
            .forget_dns_repeats(&idle)
            .context("cannot remove idle DNS summaries")?;
        metrics.forgotten_dns_repeats(&idle);
    }
    Ok(())
}

/// The cluster model at start: from files (complete at once), or from the API, which
/// the agent keeps trying to reach in the background (not ready until it syncs).
async fn open_cluster(
    args: &AgentArgs,
    node_name: Option<&str>,
) -> anyhow::Result<(ClusterState, AgentCluster)> {
    if let Some(path) = &args.cluster_state {
        let (state, warnings) = ClusterState::load(path)?;
        for warning in warnings {
            eprintln!("warning: skipped {warning}");
        }
        return Ok((state, AgentCluster::Files));
    }
    let config = ClusterApi::infer_config().await.map_err(|e| {
        crate::UsageError(format!(
            "the agent needs the cluster state: run it in the cluster (the DaemonSet in \
             deploy/), make a kubeconfig available, or pass --cluster-state PATH ({e})"
        ))
    })?;
    let server = config.cluster_url.to_string();
    let node = node_name.map(str::to_owned);
    let (connected, receive) = oneshot::channel();
    let reason = Arc::new(Mutex::new(format!(
        "waiting for the Kubernetes API at {server}"
    )));
    let task_reason = Arc::clone(&reason);
    tokio::spawn(async move {
        loop {
            let attempt = async {
                let api = ClusterApi::connect(config.clone(), node.as_deref()).await?;
                api.wait_synced(Duration::from_secs(30)).await?;
                Ok::<_, egress_tracer::cluster::api::ApiError>(api)
            };
            match attempt.await {
                Ok(api) => {
                    let _ = connected.send(api);
                    return;
                }
                Err(e) => {
                    eprintln!("warning: {e}; retrying in {API_RETRY:?}");
                    *task_reason.lock().expect("not poisoned") =
                        format!("waiting for the Kubernetes API: {e}");
                }
            }
            tokio::time::sleep(API_RETRY).await;
        }
    });
    Ok((
        ClusterState::default(),
        AgentCluster::Connecting { receive, reason },
    ))
}

/// The agent's cluster source through its life.
enum AgentCluster {
    Files,
    Connecting {
        receive: oneshot::Receiver<ClusterApi>,
        reason: Arc<Mutex<String>>,
    },
    Api(ClusterSource),
}

impl AgentCluster {
    fn is_synced(&self) -> bool {
        !matches!(self, Self::Connecting { .. })
    }

    fn waiting_reason(&self) -> String {
        match self {
            Self::Connecting { reason, .. } => reason.lock().expect("not poisoned").clone(),
            _ => String::new(),
        }
    }

    /// Takes the API once it has synced.
    fn poll_connected(&mut self) {
        if let Self::Connecting { receive, .. } = self
            && let Ok(api) = receive.try_recv()
        {
            eprintln!(
                "egress-tracer agent: cluster state from the Kubernetes API at {}",
                api.server()
            );
            *self = Self::Api(ClusterSource::from_api(api));
        }
    }

    fn refresh(&mut self) -> Option<ClusterState> {
        match self {
            Self::Api(source) => source.refresh(),
            _ => None,
        }
    }

    fn is_stale(&self) -> bool {
        match self {
            Self::Files => false,
            Self::Connecting { .. } => true,
            Self::Api(source) => source.is_stale(),
        }
    }
}
