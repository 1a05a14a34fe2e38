//! `egress-tracer diagnose`: the troubleshooting checklist for one target, from inside
//! the pod, while the kernel programs watch; then the verdict.
//!
//! The checks run in a probe: this binary again (`probe`, hidden), moved into one of the
//! pod's container cgroups and its network namespace, so its traffic is the pod's to the
//! kernel programs, NetworkPolicies and the node's NAT.

use std::{
    fs,
    io::{self, IsTerminal, Write},
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::Context;
use egress_tracer::{
    capture::{Capture, CaptureOptions},
    cluster::{ClusterState, PodInfo, cgroups::CgroupIndex},
    diagnose::{
        self, Check, Observed, Plan, ProbeLine, Status, path,
        probe::{self, Resolution},
        target::Target,
    },
    dns::resolver_config,
    flow::Attempt,
    node,
    output::Format,
    pipeline::{NatLookups, Pipeline, Record},
    policy::{self, Flow, Protocol},
    verdict::{self, Hop, NodeFacts, Verdict},
};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::{DiagnoseArgs, ProbeArgs, UsageError, cluster_source, remote};

/// The `diagnose -o json` object (docs/hops.md).
#[derive(Debug, Serialize, Deserialize)]
pub struct Report {
    pub pod: String,
    pub target: Target,
    pub checks: Vec<Check>,
    pub verdict: Verdict,
}

/// What to diagnose: from the command line, or from a request to the agent.
#[derive(Clone, Debug)]
pub struct Request {
    pub pod: String,
    pub target: String,
    pub timeout: Duration,
    pub dns_timeout: Duration,
    pub upstream_dns: Option<IpAddr>,
    /// This node's name (to refuse pods of other nodes).
    pub node_name: Option<String>,
    pub btf: PathBuf,
}

impl Request {
    /// The longest a whole run may take: every stage at its timeout (DNS for the target
    /// and a proxy; connects, the path probe, a reference connection, the HTTP or TLS
    /// answer), and loading the kernel programs.
    pub fn deadline(&self) -> Duration {
        // The pod's own resolv.conf timeout (up to 30 s) may be what the DNS stages use.
        let dns = self
            .dns_timeout
            .max(egress_tracer::dns::MAX_RESOLVER_TIMEOUT);
        2 * dns + 4 * self.timeout + diagnose::path::MAX_WAIT + Duration::from_secs(30)
    }
}

/// Runs the checklist; `Ok(true)` when the target is reachable.
pub async fn run(args: DiagnoseArgs) -> anyhow::Result<bool> {
    let request = Request {
        pod: args.pod.clone(),
        target: args.target.clone(),
        timeout: args.timeout,
        dns_timeout: args.dns_timeout,
        upstream_dns: args.upstream_dns,
        node_name: cluster_source::node_name(args.node_name.as_deref()),
        btf: args.btf.clone(),
    };
    let report = match &args.remote.agent {
        Some(_) => {
            let agent = remote::AgentClient::new(&args.remote, Some(&args.pod)).await?;
            agent.diagnose(&request).await?
        }
        None => {
            // Every node's pods: a pod on another node is then named as such.
            let (cluster, _source) =
                cluster_source::open(args.cluster_state.as_deref(), None, Some("diagnose")).await?;
            let tty = io::stdout().is_terminal();
            let progress = args.output == Format::Table;
            if progress {
                println!("diagnosing {} from pod {}", request.target, request.pod);
            }
            examine(&request, cluster, &mut |check| {
                if progress {
                    print_check(check, tty);
                }
            })
            .await?
        }
    };
    let mut out = io::stdout().lock();
    match args.output {
        Format::Json => {
            serde_json::to_writer(&mut out, &report)?;
            writeln!(out)?;
        }
        Format::Table => {
            if args.remote.agent.is_some() {
                let tty = io::stdout().is_terminal();
                writeln!(
                    out,
                    "diagnosing {} from pod {} (through the agent)",
                    request.target, report.pod
                )?;
                for check in &report.checks {
                    print_check(check, tty);
                }
            }
            print_verdict(&mut out, &report.verdict)?
        }
    }
    Ok(report.verdict.hop == Hop::None)
}

/// Runs the checklist for `request` with the cluster model `cluster`, telling `progress`
/// each check as it completes.
pub async fn examine(
    request: &Request,
    cluster: ClusterState,
    progress: &mut (dyn FnMut(&Check) + Send),
) -> anyhow::Result<Report> {
    let target = Target::parse(&request.target).map_err(|e| UsageError(e.to_string()))?;
    let node_name = request.node_name.clone();
    let pod = cluster.find_pod(&request.pod)?.clone();
    if let (Some(theirs), Some(ours)) = (&pod.node_name, &node_name)
        && theirs != ours
    {
        return Err(UsageError(format!(
            "pod {pod} runs on node {theirs}, not on this node ({ours}): run diagnose there \
             (--node-name tells this node's name if it differs from the host name)"
        ))
        .into());
    }
    let cgroup_root = node::cgroup2_mount().context("cannot find the cgroup v2 hierarchy")?;
    let mut cgroups = CgroupIndex::new(cgroup_root.clone())
        .with_context(|| format!("cannot read cgroups under {}", cgroup_root.display()))?;
    let status_ids: Vec<&str> = pod.containers.iter().map(|(id, _)| id.as_str()).collect();
    let Some((container_cgroup, pid)) = cgroups.container_process(&pod.uid, &status_ids) else {
        return Err(UsageError(format!(
            "pod {pod} has no running container on this node (no process in its cgroups): \
             check `kubectl get pod` that it is Running here"
        ))
        .into());
    };
    let resolver = node::read_pod_file(pid, "etc/resolv.conf")
        .map(|text| resolver_config(&text))
        .unwrap_or_default();
    let dns_timeout = resolver.timeout.unwrap_or(request.dns_timeout);
    let mut plan = Plan::new(&target, &resolver, dns_timeout, request.timeout);
    plan.upstream_dns = request
        .upstream_dns
        .or_else(|| node_upstream_dns(&resolver.nameservers));
    plan.environment = probe::proxy_environment(&read_capped(
        &format!("/proc/{pid}/environ"),
        MAX_PLAN_BYTES,
    ));

    let pod_cgroups = cgroups.cgroups_of_pod(&pod.uid);
    let mut capture = Capture::start(&CaptureOptions {
        kernel_btf: request.btf.clone(),
        only_cgroups: Some(pod_cgroups.clone()),
        ring_buffer_bytes: None,
        dns_summary_period: None,
    })?;
    crate::report_capture(&capture);
    let mut pipeline = Pipeline::new(cgroups, cluster, Some(&pod), dns_timeout);
    if let Err(e) = pipeline.look_up_nat(NatLookups::Every) {
        eprintln!("warning: {e}");
    }
    pipeline.preset_resolver(&pod_cgroups, &resolver);
    if let Some(upstream) = plan.upstream_dns {
        pipeline.separate_dns_server(upstream);
    }

    // The pod's network namespace, held from here on: the process that showed it may
    // exit, and its PID be reused, before the probe enters the namespace.
    let netns = fs::File::open(format!("/proc/{pid}/ns/net")).with_context(|| {
        format!("cannot open the network namespace /proc/{pid}/ns/net of pod {pod}")
    })?;
    // Still in the container's cgroup (named by the container's id; seen from a cgroup
    // namespace of its own, the agent's view of the path's beginning differs).
    let still_the_pods = fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|text| {
        text.lines().any(|line| {
            line.rsplit(':').next().is_some_and(|path| {
                Path::new(path).file_name().is_some()
                    && Path::new(path).file_name() == container_cgroup.file_name()
            })
        })
    });
    if !still_the_pods {
        anyhow::bail!(
            "pod {pod}'s process {pid} left its container while diagnose started: try again"
        );
    }
    let netns_fd = netns.as_raw_fd();
    let mut command = tokio::process::Command::new(
        std::env::current_exe().context("cannot find this program to run the probe")?,
    );
    // SAFETY: between fork and exec only dup2, which is async-signal-safe: the
    // namespace's descriptor becomes the probe's fd 3, without close-on-exec.
    unsafe {
        command.pre_exec(move || {
            if libc::dup2(netns_fd, PROBE_NETNS_FD) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command
        .arg("probe")
        .arg("--cgroup")
        .arg(&container_cgroup)
        .arg("--netns-fd")
        .arg(PROBE_NETNS_FD.to_string())
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the probe")?;
    let probe_pid = child.id();
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().context("the probe has no input")?;
        stdin
            .write_all(serde_json::to_string(&plan)?.as_bytes())
            .await
            .context("cannot hand the probe its plan")?;
        // Dropped: the probe reads to the end.
    }
    let stdout = child.stdout.take().context("the probe has no output")?;
    let mut lines = BufReader::new(stdout).lines();
    // From the node: the pod's nameserver, asked the same question (the guide's
    // "compare with the node").
    let node_dns = resolver
        .nameservers
        .first()
        .copied()
        .filter(|_| target.ip().is_none())
        .map(|server| {
            let names = probe::expansions(&target.host, &resolver);
            tokio::task::spawn_blocking(move || {
                probe::resolve(SocketAddr::new(server, 53), &names, dns_timeout)
            })
        });

    let mut probe_lines: Vec<ProbeLine> = Vec::new();
    let mut events = Vec::new();
    let mut records = Vec::new();
    loop {
        tokio::select! {
            read = capture.read_batch(&mut events) => read?,
            line = lines.next_line() => match line? {
                Some(line) => {
                    let parsed: ProbeLine = serde_json::from_str(&line)
                        .with_context(|| format!("the probe said something unexpected: {line}"))?;
                    // The path is told once the kernel's records give its answers' TTLs.
                    if parsed.check.id != "path" {
                        progress(&parsed.check);
                    }
                    probe_lines.push(parsed);
                }
                None => break,
            },
        }
        pipeline.handle(&mut events, capture.names());
        records.extend(pipeline.take_records());
    }
    let mut complaint = String::new();
    if let Some(mut stderr) = child.stderr.take() {
        use tokio::io::AsyncReadExt;
        // The probe says at most one line of error; bounded anyway.
        let _ = (&mut stderr)
            .take(4096)
            .read_to_string(&mut complaint)
            .await;
    }
    let status = child.wait().await.context("the probe did not finish")?;
    if !status.success() {
        anyhow::bail!(
            "the probe in the pod failed ({status}): {}",
            complaint.trim().trim_start_matches("error: ")
        );
    }
    // The probe's last packets, then everything still open.
    tokio::time::sleep(Duration::from_millis(100)).await;
    capture.read_available(&mut events);
    pipeline.handle(&mut events, capture.names());
    // The probe waited out its DNS timeouts: those queries are timed out now.
    pipeline.tick(capture.read_until_ns());
    pipeline.finish();
    records.extend(pipeline.take_records());

    let mut node_checks = Vec::new();
    if let Some(task) = node_dns {
        let check = match task.await? {
            Ok(resolution) => node_check(&resolution),
            Err(e) => Check::new(
                "dns-node",
                Status::Warn,
                format!("could not ask from the node: {e}"),
            ),
        };
        progress(&check);
        node_checks.push(check);
    }
    let addresses = resolved_addresses(&target, &probe_lines);
    if let Some(check) = policy_check(&pipeline, &pod, &addresses, target.port) {
        progress(&check);
        node_checks.push(check);
    }
    // The pod's own lookup of the target's name decides. The direct question to the
    // upstream server is a lookup of its own (see `separate_dns_server`): evidence beside
    // it, in its check.
    let lookup_verdict = records.iter().find_map(|record| match record {
        Record::Lookup {
            lookup, verdict, ..
        } if lookup.name.trim_end_matches('.') == target.host.trim_end_matches('.')
            && Some(lookup.server.ip()) != plan.upstream_dns =>
        {
            Some(verdict.as_ref())
        }
        _ => None,
    });
    let probe_attempts: Vec<&Attempt> = records
        .iter()
        .filter_map(|record| match record {
            Record::Attempt(attempt) if Some(attempt.pid) == probe_pid => Some(attempt.as_ref()),
            _ => None,
        })
        .collect();
    if let Some(line) = probe_lines.iter_mut().find(|line| line.check.id == "path") {
        complete_path(line, &probe_attempts);
        progress(&line.check);
    }
    // The connection the checklist made is the first to the target's port; the path
    // probe's came after it.
    let connection = probe_attempts
        .iter()
        .filter(|attempt| attempt.dst.port() == target.port)
        .min_by_key(|attempt| attempt.monotonic_ns);
    let connect_verdict = judge_reset_by_reference(&probe_attempts, target.port)
        .or_else(|| connection.and_then(|attempt| attempt.verdict.as_deref().cloned()));
    let connect_icmp_sender = connection.and_then(|attempt| attempt.icmp.map(|icmp| icmp.sender));
    // DNS from the pod to its nameserver, as the NetworkPolicies see it.
    let dns_policy = resolver.nameservers.first().map(|server| {
        policy::decide(
            pipeline.cluster(),
            &Flow {
                src: &pod,
                dst: *server,
                port: 53,
                protocol: Protocol::Udp,
            },
        )
    });
    let verdict = diagnose::conclude(
        &target,
        &Observed {
            probe: &probe_lines,
            lookup_verdict,
            connect_verdict: connect_verdict.as_ref(),
            connect_icmp_sender,
            dns_policy: dns_policy.as_ref(),
            node_checks: &node_checks,
        },
    );
    let checks = probe_lines
        .iter()
        .map(|line| line.check.clone())
        .chain(node_checks)
        .collect();
    Ok(Report {
        pod: pod.to_string(),
        target,
        checks,
        verdict,
    })
}

/// Gives the path probe's resets and SYN-ACKs the TTL they arrived with, from the kernel's
/// record of each probe connection (joined by source address), and tells the hops.
fn complete_path(line: &mut ProbeLine, attempts: &[&Attempt]) {
    if line.facts.path.is_empty() {
        return;
    }
    for hop in &mut line.facts.path {
        if hop.reply_ttl.is_none()
            && let Some(src) = hop.src
        {
            hop.reply_ttl = attempts
                .iter()
                .find(|attempt| attempt.src == Some(src))
                .and_then(|attempt| attempt.reply)
                .map(|reply| reply.ttl);
        }
    }
    let first = line
        .check
        .detail
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    line.check.detail = format!("{first}\n{}", path::describe(&line.facts.path));
    line.check.hops = line.facts.path.clone();
}

/// The verdict on a reset connection, judged again with the path length the reference
/// connection to the same address showed (the pipeline judged it before that connection).
fn judge_reset_by_reference(attempts: &[&Attempt], port: u16) -> Option<Verdict> {
    // The checklist's own connection: the path probe's came after it.
    let reset = attempts
        .iter()
        .filter(|a| a.dst.port() == port)
        .min_by_key(|a| a.monotonic_ns)
        .filter(|a| a.reply.is_some_and(|r| r.reset))?;
    let reference_hops = attempts
        .iter()
        .filter(|a| a.dst.ip() == reset.dst.ip() && a.dst.port() != port)
        .find_map(|a| a.reply.map(|r| r.hops()))?;
    let mut judged = (*reset).clone();
    if let Some(reply) = judged.reply.as_mut() {
        reply.endpoint_hops = Some(reference_hops);
    }
    verdict::of_attempt(&judged, &NodeFacts::of_this_node(), None)
}

/// The DNS server the node itself uses, when it is not the pod's own server.
fn node_upstream_dns(pod_servers: &[IpAddr]) -> Option<IpAddr> {
    node::dns_servers()
        .into_iter()
        .find(|server| !pod_servers.contains(server))
}

fn node_check(resolution: &Resolution) -> Check {
    let status = if resolution.result == "resolved" {
        Status::Pass
    } else {
        Status::Fail
    };
    Check::new(
        "dns-node",
        status,
        format!(
            "from the node, {} answers: {}",
            resolution.server, resolution.result
        ),
    )
}

/// The target's addresses: its own, or what the pod's DNS gave.
fn resolved_addresses(target: &Target, lines: &[ProbeLine]) -> Vec<IpAddr> {
    if let Some(ip) = target.ip() {
        return vec![ip];
    }
    lines
        .iter()
        .find(|line| line.check.id == "dns-cluster")
        .and_then(|line| line.facts.resolution.as_ref())
        .map(|resolution| resolution.addresses.clone())
        .unwrap_or_default()
}

fn policy_check(
    pipeline: &Pipeline,
    pod: &PodInfo,
    addresses: &[IpAddr],
    port: u16,
) -> Option<Check> {
    let dst = *addresses.first()?;
    let decision = policy::decide(
        pipeline.cluster(),
        &Flow {
            src: pod,
            dst,
            port,
            protocol: Protocol::Tcp,
        },
    );
    let status = if decision.allowed {
        Status::Pass
    } else {
        Status::Fail
    };
    Some(Check::new("network-policy", status, decision.explanation))
}

fn print_check(check: &Check, tty: bool) {
    let (mark, color) = match check.status {
        Status::Pass => ("ok  ", "32"),
        Status::Fail => ("FAIL", "31"),
        Status::Warn => ("warn", "33"),
        Status::Skip => ("skip", "2"),
    };
    let mark = if tty && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) {
        format!("\x1b[{color}m{mark}\x1b[0m")
    } else {
        mark.to_owned()
    };
    // Lines after the first (the path's hops) under the first's text.
    let detail = check.detail.replace('\n', &format!("\n{:23}", ""));
    println!("  {mark} {:<15} {detail}", check.id);
}

fn print_verdict(out: &mut impl Write, verdict: &Verdict) -> io::Result<()> {
    let likely = if verdict.likely { " (likely)" } else { "" };
    writeln!(
        out,
        "verdict: {}/{}{likely}: {}",
        verdict.hop.as_str(),
        verdict.reason,
        verdict.summary
    )?;
    if let Some(symptom) = &verdict.symptom {
        writeln!(out, "  symptom: {symptom}")?;
    }
    if let Some(policy) = &verdict.policy {
        writeln!(out, "  policy: {policy}")?;
    }
    for fact in &verdict.evidence {
        writeln!(out, "  evidence: {fact}")?;
    }
    for step in &verdict.next_steps {
        writeln!(out, "  next: {step}")?;
    }
    Ok(())
}

/// The probe: joins the pod's container cgroup and network namespace, then runs the plan.
pub fn run_probe(args: ProbeArgs) -> anyhow::Result<()> {
    // The probe ends with the diagnosis that started it, however that ends.
    // SAFETY: prctl with plain integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error()).context("cannot tie the probe to its parent");
    }
    join_host_cgroup_namespace()?;
    // Writing 0 moves the writing process, as the container runtime does for `exec`.
    fs::write(args.cgroup.join("cgroup.procs"), "0")
        .with_context(|| format!("cannot join the pod's cgroup {}", args.cgroup.display()))?;
    join_netns(args.netns_fd)?;
    // The plan comes on standard input: it holds the pod's proxy settings, which may
    // carry credentials, and a command line is readable by every process of the node.
    let mut text = String::new();
    io::Read::read_to_string(&mut io::Read::take(io::stdin(), MAX_PLAN_BYTES), &mut text)
        .context("cannot read the probe's plan")?;
    let plan: Plan = serde_json::from_str(&text).context("bad probe plan")?;
    // The checks parse what the pod's network answers: without any privilege.
    drop_privileges()?;
    // Changing users cleared the death signal: set it again, and check that the parent
    // did not end meanwhile.
    // SAFETY: prctl with plain integer arguments; getppid has no preconditions.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0
        || unsafe { libc::getppid() } == 1
    {
        anyhow::bail!("the diagnosis that started the probe has ended");
    }
    diagnose::run_probe(&plan, &mut io::stdout().lock()).context("probe check failed")
}

/// `struct __user_cap_header_struct` and `struct __user_cap_data_struct` of capset(2).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The descriptor number the probe finds the pod's network namespace at.
const PROBE_NETNS_FD: i32 = 3;
/// `nobody`: the probe's user once it is in the pod's namespaces.
const PROBE_UID: libc::uid_t = 65_534;

/// Gives up every capability, for good (no_new_privs), and becomes `nobody` when the
/// agent may change users (the DaemonSet grants no CAP_SETUID: there the probe stays
/// uid 0 without any capability); checks that none is left.
fn drop_privileges() -> anyhow::Result<()> {
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error()).context("cannot set no_new_privs on the probe");
    }
    // SAFETY: plain syscalls with integer arguments (and a null list for setgroups).
    let became_nobody = unsafe {
        libc::setgroups(0, std::ptr::null()) == 0
            && libc::setgid(PROBE_UID) == 0
            && libc::setuid(PROBE_UID) == 0
    };
    if !became_nobody {
        // Empty effective, permitted and inheritable sets (version 3: two 32-bit words).
        let mut header = CapHeader {
            version: 0x2008_0522,
            pid: 0,
        };
        let empty = [CapData::default(); 2];
        // SAFETY: capset with a valid header and two data words, as version 3 takes.
        let set = unsafe {
            libc::syscall(
                libc::SYS_capset,
                &mut header as *mut CapHeader,
                empty.as_ptr(),
            )
        };
        if set != 0 {
            return Err(io::Error::last_os_error()).context("cannot drop the probe's capabilities");
        }
    }
    match node::effective_capabilities() {
        Ok(0) => Ok(()),
        Ok(left) => anyhow::bail!("the probe kept capabilities {left:#x} after dropping them"),
        Err(e) => Err(e).context("cannot check the probe's capabilities"),
    }
}

/// Most bytes of a probe plan, and of a pod's environment read for its proxy settings.
const MAX_PLAN_BYTES: u64 = 1 << 20;

/// The first `most` bytes of a file (empty when it cannot be read).
fn read_capped(path: &str, most: u64) -> Vec<u8> {
    let mut bytes = Vec::new();
    if let Ok(file) = fs::File::open(path) {
        let _ = io::Read::read_to_end(&mut io::Read::take(file, most), &mut bytes);
    }
    bytes
}

/// In a container (the agent's DaemonSet) the probe starts in the container's own cgroup
/// namespace, from which the kernel refuses moves into a pod's cgroup; the node's
/// namespace (of PID 1, with hostPID) allows them.
fn join_host_cgroup_namespace() -> anyhow::Result<()> {
    let inode = |path: &str| fs::metadata(path).map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    let (Ok(ours), Ok(host)) = (inode("/proc/self/ns/cgroup"), inode("/proc/1/ns/cgroup")) else {
        return Ok(());
    };
    if ours == host {
        return Ok(());
    }
    let namespace = fs::File::open("/proc/1/ns/cgroup")
        .context("cannot open the node's cgroup namespace (/proc/1/ns/cgroup; hostPID?)")?;
    // SAFETY: setns on a valid descriptor; the probe is single-threaded here.
    if unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWCGROUP) } != 0 {
        return Err(io::Error::last_os_error()).context("cannot enter the node's cgroup namespace");
    }
    Ok(())
}

fn join_netns(fd: i32) -> anyhow::Result<()> {
    // SAFETY: the descriptor was handed down for this alone; it is owned (and closed)
    // here.
    let netns = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: setns on a valid descriptor; the probe is single-threaded here.
    if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error()).context("cannot enter the pod's network namespace");
    }
    Ok(())
}
