//! `egress-tracer trace`: live records of egress attempts.

use std::{
    io::{self, IsTerminal},
    time::Duration,
};

use anyhow::Context;
use egress_tracer::{
    capture::{Capture, CaptureOptions},
    cluster::cgroups::CgroupIndex,
    conntrack::{self, ConntrackStats},
    node::{self, MonotonicClock},
    output::Writer,
    pipeline::{NatLookups, Pipeline, Record},
};
use tokio::{
    signal::unix::{SignalKind, signal},
    time::{Instant, interval, sleep_until},
};

use crate::{TraceArgs, cluster_source, remote};
use futures::StreamExt;

/// How often held attempts are checked for expiry.
const EXPIRY_TICK: Duration = Duration::from_millis(200);
/// How often the traced pod's cgroups are looked up again (restarted containers).
const CGROUP_REFRESH: Duration = Duration::from_secs(2);
/// How often the node's conntrack counters and SNAT usage are read again.
const CONNTRACK_REFRESH: Duration = Duration::from_secs(2);

pub async fn run(args: TraceArgs) -> anyhow::Result<()> {
    if args.remote.agent.is_some() {
        return run_through_agent(&args).await;
    }
    let node_name = cluster_source::node_name(args.node_name.as_deref());
    let required = args.pod.as_ref().map(|pod| format!("--pod {pod}"));
    let (cluster, mut source) = cluster_source::open(
        args.cluster_state.as_deref(),
        node_name.as_deref(),
        required.as_deref(),
    )
    .await?;
    let target = match &args.pod {
        Some(pod) => Some(cluster.find_pod(pod)?.clone()),
        None => None,
    };

    let cgroup_root = node::cgroup2_mount().context("cannot find the cgroup v2 hierarchy")?;
    let cgroups = CgroupIndex::new(cgroup_root.clone())
        .with_context(|| format!("cannot read cgroups under {}", cgroup_root.display()))?;
    let mut pipeline = Pipeline::new(cgroups, cluster, target.as_ref(), args.dns_timeout);
    if let Err(e) = pipeline.look_up_nat(NatLookups::Every) {
        eprintln!("warning: {e}");
    }
    let only_cgroups = pipeline.target_cgroups();
    // The pod's cgroups outlive container restarts; once they are all gone, so is the pod.
    let mut pod_was_running = only_cgroups.as_ref().is_some_and(|c| !c.is_empty());
    if let (Some(pod), Some([])) = (&target, only_cgroups.as_deref()) {
        eprintln!(
            "warning: pod {pod} has no cgroups on this node (is it scheduled here and running?); \
             tracing it anyway, new containers are picked up as they start"
        );
    }
    let mut capture = Capture::start(&CaptureOptions {
        kernel_btf: args.btf.clone(),
        only_cgroups,
        ring_buffer_bytes: args.ring_buffer_size,
        // A trace shows every lookup.
        dns_summary_period: None,
    })?;
    crate::report_capture(&capture);
    let scope = target
        .as_ref()
        .map_or_else(|| "every pod".to_owned(), |p| format!("pod {p}"));
    // Handlers before the announcement: whoever waits for it may signal at once.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let conntrack_at_start = ConntrackStats::read().ok().flatten();
    // At the tracer's priority: a short trace needs fresh figures.
    let mut node_conntrack =
        conntrack::watch(args.snat_port_budget, CONNTRACK_REFRESH, false, |e| {
            eprintln!("warning: {e}")
        })
        .context("cannot start the conntrack reader thread")?;
    eprintln!("egress-tracer: tracing {scope}; Ctrl-C to stop");

    let clock = MonotonicClock::new();
    let mut writer = writer(&args, clock);
    let mut events = Vec::new();
    let mut tick = interval(EXPIRY_TICK);
    let mut refresh = interval(CGROUP_REFRESH);
    let deadline = args.duration.map(|d| Instant::now() + d);
    let stop_at = sleep_until(deadline.unwrap_or_else(far_future));
    tokio::pin!(stop_at);

    loop {
        tokio::select! {
            read = capture.read_batch(&mut events) => read?,
            _ = tick.tick() => pipeline.tick(capture.read_until_ns()),
            _ = refresh.tick() => {
                if let Some(state) = source.refresh() {
                    pipeline.set_cluster(state);
                }
                match (filter_in_kernel(&mut pipeline, &mut capture)?, &target) {
                    (Some(0), Some(pod)) if pod_was_running => {
                        eprintln!(
                            "egress-tracer: pod {pod} has left this node (its cgroups were \
                             removed: deleted, evicted or rescheduled); stopping"
                        );
                        break;
                    }
                    (Some(cgroups), _) if cgroups > 0 => pod_was_running = true,
                    _ => {}
                }
            }
            Ok(()) = node_conntrack.changed() => {
                let latest = node_conntrack.borrow_and_update().clone();
                pipeline.set_conntrack_growth(
                    conntrack_at_start
                        .zip(latest.stats)
                        .map(|(start, now)| now.since(&start)),
                );
                pipeline.set_snat(latest.snat);
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = &mut stop_at, if deadline.is_some() => break,
        }
        pipeline.handle(&mut events, capture.names());
        write_records(&mut writer, &mut pipeline)?;
    }

    capture.read_available(&mut events);
    pipeline.handle(&mut events, capture.names());
    if let (Some(start), Ok(Some(now))) = (conntrack_at_start, ConntrackStats::read()) {
        pipeline.set_conntrack_growth(Some(now.since(&start)));
    }
    pipeline.finish();
    write_records(&mut writer, &mut pipeline)?;
    let counters = capture.counters()?;
    drop(capture);
    let (stats, flows, dns) = (
        pipeline.stats(),
        pipeline.flow_stats(),
        pipeline.dns_stats(),
    );
    // Kernel counts are exact even when the ring buffer overflowed: what was counted
    // but not received was lost.
    eprintln!(
        "egress-tracer: {} connects and first sends traced in the kernel, {} received, {} lost; \
         {} UDP address probes skipped; {} dropped packets and {} ICMP errors matched no \
         pending attempt (late answers, a server's traffic); {} malformed DNS messages; {} \
         events lost in all to a full ring buffer; {} undecodable; {} attempts emitted before \
         their outcome (limits reached); {} conntrack lookups of NAT failed",
        counters.connects,
        stats.connects_received,
        counters.connects_lost,
        flows.udp_probes,
        flows.late_drops,
        flows.unmatched_icmp,
        dns.malformed,
        counters.lost(),
        stats.decode_errors,
        flows.evicted + dns.evicted,
        stats.nat_lookup_errors
    );
    if let (Some(start), Some(end)) = (conntrack_at_start, ConntrackStats::read().ok().flatten()) {
        let during = end.since(&start);
        eprintln!(
            "egress-tracer: node conntrack {} of {} entries; while tracing: {} insert failures, \
             {} drops, {} early drops, {} invalid",
            during.entries,
            during.limit,
            during.insert_failed,
            during.drop,
            during.early_drop,
            during.invalid
        );
    }
    Ok(())
}

/// Where records go: stdout, coloured on a terminal unless NO_COLOR is set.
fn writer(args: &TraceArgs, clock: MonotonicClock) -> Writer<io::StdoutLock<'static>> {
    let color = io::stdout().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty());
    Writer::new(io::stdout().lock(), args.output, clock)
        .with_color(color)
        .failures_only(args.failures_only)
}

/// A deadline that never comes (no --duration).
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(u32::MAX.into())
}

/// `trace --agent`: the agent's live records, printed as `trace` prints its own.
async fn run_through_agent(args: &TraceArgs) -> anyhow::Result<()> {
    let client = remote::AgentClient::new(&args.remote, args.pod.as_deref()).await?;
    // Live records only, as a local trace shows: no history.
    let mut query = vec![("since", "0s")];
    query.extend(args.pod.iter().map(|pod| ("pod", pod.as_str())));
    let lines = client.follow_flows(&query).await?;
    tokio::pin!(lines);
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let scope = args
        .pod
        .as_deref()
        .map_or_else(|| "all pods".to_owned(), |p| format!("pod {p}"));
    eprintln!("egress-tracer: tracing {scope} through the agent; Ctrl-C to stop");
    let mut writer = writer(args, MonotonicClock::new());
    let deadline = args.duration.map(|d| Instant::now() + d);
    let stop_at = sleep_until(deadline.unwrap_or_else(far_future));
    tokio::pin!(stop_at);
    loop {
        tokio::select! {
            line = lines.next() => match line {
                Some(line) => {
                    writer.write_json_line(&line?).context("cannot write to stdout")?;
                    writer.flush().context("cannot write to stdout")?;
                }
                None => anyhow::bail!("the agent ended the stream (it is stopping or restarting)"),
            },
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = &mut stop_at, if deadline.is_some() => break,
        }
    }
    Ok(())
}

/// When tracing one pod, tells the kernel its cgroups (again, to include containers
/// started since), so other pods' traffic stops in the kernel; how many it has.
fn filter_in_kernel(
    pipeline: &mut Pipeline,
    capture: &mut Capture,
) -> anyhow::Result<Option<usize>> {
    let Some(cgroups) = pipeline.target_cgroups() else {
        return Ok(None);
    };
    capture
        .trace_only_cgroups(&cgroups)
        .context("cannot set the kernel-side pod filter")?;
    Ok(Some(cgroups.len()))
}

fn write_records(
    writer: &mut Writer<impl io::Write>,
    pipeline: &mut Pipeline,
) -> anyhow::Result<()> {
    let records = pipeline.take_records();
    if records.is_empty() {
        return Ok(());
    }
    for record in &records {
        match record {
            Record::Attempt(attempt) => writer.write(attempt),
            Record::Lookup {
                lookup,
                origin,
                verdict,
            } => writer.write_lookup(lookup, origin, verdict),
        }
        .context("cannot write to stdout")?;
    }
    writer.flush().context("cannot write to stdout")
}
