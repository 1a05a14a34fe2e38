//! `egress-tracer trace`: live records of egress attempts.

use std::{io, time::Duration};

use anyhow::Context;
use egress_tracer::{
    capture::{Capture, CaptureOptions, DecodeError, KernelEvent, KernelNames},
    cluster::{ClusterState, PodInfo, cgroups::CgroupIndex},
    flow::{Attempt, FlowAssembler, Origin},
    node::{self, MonotonicClock},
    output::Writer,
};
use tokio::{
    signal::unix::{SignalKind, signal},
    time::{Instant, interval, sleep_until},
};

use crate::{TraceArgs, UsageError};

/// How often held attempts are checked for expiry.
const EXPIRY_TICK: Duration = Duration::from_millis(200);
/// How often the traced pod's cgroups are looked up again (restarted containers).
const CGROUP_REFRESH: Duration = Duration::from_secs(2);

pub async fn run(args: TraceArgs) -> anyhow::Result<()> {
    let cluster = match &args.cluster_state {
        Some(path) => {
            let (state, warnings) = ClusterState::load(path)?;
            for warning in warnings {
                eprintln!("warning: skipped {warning}");
            }
            state
        }
        None => ClusterState::default(),
    };
    let target = match &args.pod {
        Some(pod) if args.cluster_state.is_none() => {
            return Err(UsageError(format!(
                "--pod {pod} needs the pods' metadata: pass --cluster-state PATH \
                 (for example the output of `kubectl get pods -A -o yaml`)"
            ))
            .into());
        }
        Some(pod) => Some(cluster.find_pod(pod)?.clone()),
        None => None,
    };

    let cgroup_root = node::cgroup2_mount().context("cannot find the cgroup v2 hierarchy")?;
    let cgroups = CgroupIndex::new(cgroup_root.clone())
        .with_context(|| format!("cannot read cgroups under {}", cgroup_root.display()))?;
    let mut capture = Capture::start(&CaptureOptions {
        kernel_btf: args.btf.clone(),
    })?;
    for warning in capture.warnings() {
        eprintln!("warning: {warning}");
    }
    let mut pipeline = Pipeline {
        flows: FlowAssembler::new(),
        cgroups,
        cluster,
        target_uid: target.as_ref().map(|pod| pod.uid.clone()),
        connects_received: 0,
        decode_errors: 0,
    };
    pipeline.filter_in_kernel(&mut capture)?;
    let scope = target
        .as_ref()
        .map_or_else(|| "all processes".to_owned(), |p| format!("pod {p}"));
    eprintln!("egress-tracer: tracing {scope}; Ctrl-C to stop");

    let clock = MonotonicClock::new();
    let mut writer = Writer::new(io::stdout().lock(), args.output, clock);
    let mut events = Vec::new();
    let mut done = Vec::new();
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut tick = interval(EXPIRY_TICK);
    let mut refresh = interval(CGROUP_REFRESH);
    let deadline = args.duration.map(|d| Instant::now() + d);
    let stop_at = sleep_until(
        deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(u32::MAX.into())),
    );
    tokio::pin!(stop_at);

    loop {
        tokio::select! {
            read = capture.read_batch(&mut events) => read?,
            _ = tick.tick() => {
                pipeline.flows.expire(node::monotonic_now().as_nanos() as u64, &mut done);
            }
            _ = refresh.tick() => pipeline.filter_in_kernel(&mut capture)?,
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = &mut stop_at, if deadline.is_some() => break,
        }
        pipeline.handle(&mut events, capture.names(), &mut done);
        write_all(&mut writer, &mut done)?;
    }

    capture.read_available(&mut events);
    pipeline.handle(&mut events, capture.names(), &mut done);
    pipeline.flows.drain(&mut done);
    write_all(&mut writer, &mut done)?;
    let counters = capture.counters()?;
    drop(capture);
    let stats = pipeline.flows.stats();
    eprintln!(
        "egress-tracer: {} connect() calls seen on the node, {} received for tracing; \
         {} UDP address probes skipped; {} events lost to a full ring buffer; {} undecodable; \
         {} attempts emitted before their outcome (limits reached)",
        counters.connects,
        pipeline.connects_received,
        stats.udp_probes,
        counters.lost(),
        pipeline.decode_errors,
        stats.evicted
    );
    Ok(())
}

/// From decoded kernel events to finished attempts.
struct Pipeline {
    flows: FlowAssembler,
    cgroups: CgroupIndex,
    cluster: ClusterState,
    /// Only this pod's attempts, when tracing one pod.
    target_uid: Option<String>,
    connects_received: u64,
    decode_errors: u64,
}

impl Pipeline {
    /// When tracing one pod, tells the kernel its cgroups (again, to include containers
    /// started since), so other pods' traffic stops in the kernel.
    fn filter_in_kernel(&mut self, capture: &mut Capture) -> anyhow::Result<()> {
        if let Some(uid) = &self.target_uid {
            let cgroups = self.cgroups.cgroups_of_pod(uid);
            capture
                .trace_only_cgroups(&cgroups)
                .context("cannot set the kernel-side pod filter")?;
        }
        Ok(())
    }

    fn handle(
        &mut self,
        events: &mut Vec<Result<KernelEvent, DecodeError>>,
        names: &KernelNames,
        done: &mut Vec<Attempt>,
    ) {
        for event in events.drain(..) {
            match event {
                Ok(KernelEvent::Connect(connect)) => {
                    self.connects_received += 1;
                    let origin = origin_of(connect.cgroup_id, &mut self.cgroups, &self.cluster);
                    if self
                        .target_uid
                        .as_ref()
                        .is_none_or(|uid| origin.pod_uid.as_ref() == Some(uid))
                    {
                        self.flows.on_connect(&connect, origin, done);
                    }
                }
                Ok(KernelEvent::FirstPacket(packet)) => self.flows.on_first_packet(&packet),
                Ok(KernelEvent::IcmpError(error)) => self.flows.on_icmp_error(&error, done),
                Ok(KernelEvent::SockState(state)) => self.flows.on_sock_state(&state, done),
                Ok(KernelEvent::Drop(drop)) => {
                    self.flows
                        .on_drop(drop.sock_cookie, names.describe_drop(&drop));
                }
                Err(_) => self.decode_errors += 1,
            }
        }
    }
}

fn origin_of(cgroup_id: u64, cgroups: &mut CgroupIndex, cluster: &ClusterState) -> Origin {
    let pod_uid = cgroups.lookup(cgroup_id).map(|c| c.pod_uid.clone());
    let pod = pod_uid
        .as_deref()
        .and_then(|uid| cluster.pod_by_uid(uid))
        .map(PodInfo::to_string);
    Origin { pod, pod_uid }
}

fn write_all(writer: &mut Writer<impl io::Write>, done: &mut Vec<Attempt>) -> anyhow::Result<()> {
    if done.is_empty() {
        return Ok(());
    }
    for attempt in done.drain(..) {
        writer.write(&attempt).context("cannot write to stdout")?;
    }
    writer.flush().context("cannot write to stdout")
}
