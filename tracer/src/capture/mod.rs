//! Capture: loads the kernel programs, attaches them, and reads their events.
//!
//! Dropping a [`Capture`] detaches every program it attached (aya owns the link fds), so
//! a tracer that exits, however it exits short of SIGKILL, leaves nothing in the kernel.
//! Hooks other than `connect4` are optional: if the kernel lacks one, the capture starts
//! without it and [`Capture::warnings`] says what is lost.

mod btf;
mod decode;
mod kallsyms;

use std::{
    collections::HashMap,
    fs::File,
    io,
    os::{
        fd::{AsFd, AsRawFd},
        unix::fs::MetadataExt,
    },
    path::PathBuf,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, MapType, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{
        BtfTracePoint, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr,
        ProgramError,
    },
};
use tokio::io::unix::AsyncFd;
use tracer_common::{
    ConntrackOffsets, Counter, DnsHeld, DnsHeldKey, DnsRepeatKey, DnsRepeatTotals, DropEvent,
    DropOffsets, DropReasons, HandshakeKey, HandshakeTotals, IcmpReceivers, SETTING_CGROUP_FILTER,
    SETTING_DNS_SUMMARY_MS,
};

pub use btf::{BtfError, KernelBtf};
pub use decode::{DecodeError, DnsCapture, KernelEvent, comm, decode, socket_addr};
use kallsyms::Kallsyms;

use crate::node::{self, Capability};

/// The kernel programs, built by `build.rs` for the BPF target (public for tests that
/// load single programs, such as `BPF_PROG_TEST_RUN` of the packet programs).
pub static KERNEL_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer-ebpf"));

/// Capabilities needed to load and attach the programs: CAP_BPF to load, CAP_PERFMON for
/// tracing programs and kernel reads, CAP_NET_ADMIN to attach to cgroups.
pub const REQUIRED_CAPABILITIES: [Capability; 3] =
    [Capability::Bpf, Capability::Perfmon, Capability::NetAdmin];

/// How often the ring buffer is drained when no wakeup came (the programs wake the
/// reader only when the ring fills up; see `wakeup` in tracer-ebpf's maps.rs). Each
/// wake-up costs the node a context switch: 50 ms keeps records timely for a person
/// and the agent idle (100 wake-ups/s took 1% of a core doing nothing).
const DRAIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

/// At most this many records are drained per wake-up, so a flood cannot starve the
/// caller's other work (signals, timers).
const MAX_BATCH: usize = 4096;

/// How long after taking its event's time a program may still be reserving the event in
/// the ring: microseconds, unless it was preempted.
const RESERVE_SLACK_NS: u64 = 10_000_000;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(
        "this egress-tracer binary was built without its kernel programs (AYA_BUILD_SKIP); \
         rebuild it with `cargo xtask build`"
    )]
    NoKernelObject,
    #[error(
        "missing capabilities {}: run egress-tracer as root, or grant them \
         (for example `setcap cap_bpf,cap_perfmon,cap_net_admin+ep egress-tracer`)",
        .0.iter().map(|c| c.name()).collect::<Vec<_>>().join(", ")
    )]
    MissingCapabilities(Vec<Capability>),
    #[error(
        "no kernel BTF at {0}: egress-tracer needs a kernel built with \
         CONFIG_DEBUG_INFO_BTF=y (Linux 5.8 or newer; AKS node images have it), \
         or a BTF file for this exact kernel passed with --btf"
    )]
    NoKernelBtf(PathBuf),
    #[error("the kernel has no BPF ring buffer (BPF_MAP_TYPE_RINGBUF, Linux 5.8 or newer)")]
    NoRingBuffer,
    #[error(transparent)]
    Btf(#[from] BtfError),
    #[error("cannot find the cgroup v2 hierarchy: {0}")]
    Cgroup(#[source] io::Error),
    #[error("loading the kernel programs failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the {hook} hook failed: {source}")]
    Hook {
        hook: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("kernel object is missing {0}")]
    MissingPart(&'static str),
    #[error("reading kernel maps failed: {0}")]
    Map(#[from] aya::maps::MapError),
    #[error("waiting for kernel events failed: {0}")]
    Io(#[from] io::Error),
    #[error("a DNS summary period of {0:?} is not between 1 ms and 49 days")]
    BadDnsSummaryPeriod(std::time::Duration),
}

impl CaptureError {
    /// Whether the error is about the environment (kernel, privileges) rather than a
    /// failure while running; the CLI exits with 2 for these.
    pub fn is_environment(&self) -> bool {
        matches!(
            self,
            Self::NoKernelObject
                | Self::MissingCapabilities(_)
                | Self::NoKernelBtf(_)
                | Self::NoRingBuffer
                | Self::Btf(_)
                | Self::Cgroup(_)
        )
    }
}

/// Event totals counted in the kernel, exact even when events were lost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounters {
    pub connects: u64,
    pub connects_lost: u64,
    pub sock_states: u64,
    pub sock_states_lost: u64,
    pub first_packets: u64,
    pub first_packets_lost: u64,
    pub icmp_errors: u64,
    pub icmp_errors_lost: u64,
    pub drops: u64,
    pub drops_lost: u64,
    pub dns_messages: u64,
    pub dns_messages_lost: u64,
    /// Runs of the tracing programs the kernel skipped because the same program was
    /// already running on that CPU (e.g. a socket's state change in a softirq while
    /// another's is traced in process context): events lost before any ring buffer.
    pub sock_states_skipped: u64,
    pub icmp_errors_skipped: u64,
    pub drops_skipped: u64,
    /// Handshakes the kernel could not count because its `HANDSHAKES` map was full.
    pub handshakes_uncounted: u64,
}

impl KernelCounters {
    pub fn lost(&self) -> u64 {
        self.connects_lost
            + self.sock_states_lost
            + self.first_packets_lost
            + self.icmp_errors_lost
            + self.drops_lost
            + self.dns_messages_lost
    }

    /// (kernel program, events it produced, events it lost to a full ring buffer).
    pub fn by_program(&self) -> [(&'static str, u64, u64); 6] {
        [
            ("connect", self.connects, self.connects_lost),
            ("sock_state", self.sock_states, self.sock_states_lost),
            ("first_packet", self.first_packets, self.first_packets_lost),
            ("icmp", self.icmp_errors, self.icmp_errors_lost),
            ("drops", self.drops, self.drops_lost),
            ("dns", self.dns_messages, self.dns_messages_lost),
        ]
    }

    /// (tracing program, runs the kernel skipped for recursion).
    pub fn skipped_by_program(&self) -> [(&'static str, u64); 3] {
        [
            ("sock_state", self.sock_states_skipped),
            ("icmp", self.icmp_errors_skipped),
            ("drops", self.drops_skipped),
        ]
    }
}

/// Loaded and attached kernel programs plus the reader of their ring buffer.
pub struct Capture {
    // Field order matters: the ring buffer and counters are dropped before the programs.
    ring: AsyncFd<RingBuf<MapData>>,
    counters: PerCpuArray<MapData, u64>,
    ebpf: Ebpf,
    warnings: Vec<String>,
    traced_cgroups: Vec<PathBuf>,
    names: KernelNames,
    read_until: ReadUntil,
}

/// How far the ring has been read, in kernel time: the clock read before the last read
/// that emptied the ring (the ring holds events in the order they were reserved), or,
/// while it never empties, the newest event's time; either less [`RESERVE_SLACK_NS`].
#[derive(Clone, Copy, Default)]
struct ReadUntil {
    emptied_ns: u64,
    newest_event_ns: u64,
}

impl ReadUntil {
    fn ns(&self) -> u64 {
        self.emptied_ns
            .max(self.newest_event_ns.saturating_sub(RESERVE_SLACK_NS))
    }
}

/// Names for the numbers kernel events carry (none known by default, as without BTF and
/// kallsyms).
#[derive(Default)]
pub struct KernelNames {
    drop_reasons: HashMap<u32, String>,
    kallsyms: Kallsyms,
}

impl KernelNames {
    /// The drop reason's name without its `SKB_DROP_REASON_` prefix (`NETFILTER_DROP`).
    pub fn drop_reason(&self, value: u32) -> String {
        match self.drop_reasons.get(&value) {
            Some(name) => name
                .strip_prefix("SKB_DROP_REASON_")
                .unwrap_or(name)
                .to_owned(),
            None => format!("reason {value}"),
        }
    }

    /// `function+0xoffset`, or the raw address when kallsyms is unavailable.
    pub fn location(&self, address: u64) -> String {
        self.kallsyms
            .symbolize(address)
            .unwrap_or_else(|| format!("{address:#x}"))
    }

    /// Describes a drop event for the flow assembler.
    pub fn describe_drop(&self, event: &DropEvent) -> PacketDrop {
        PacketDrop {
            reason: self.drop_reason(event.reason),
            location: self.location(event.location),
            reply: event.direction == tracer_common::DROP_DIRECTION_REPLY,
            src: socket_addr(&event.src),
            dst: socket_addr(&event.dst),
            conntrack: match event.conntrack {
                tracer_common::DROP_CT_NONE => PacketConntrack::None,
                tracer_common::DROP_CT_UNTRACKED => PacketConntrack::Untracked,
                tracer_common::DROP_CT_ENTRY => PacketConntrack::Entry {
                    status: event.ct_status,
                },
                _ => PacketConntrack::Unknown,
            },
            netns: (event.netns != 0).then_some(u64::from(event.netns)),
            netns_owner: None,
        }
    }
}

/// The conntrack state of a dropped packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PacketConntrack {
    /// Not read (conntrack's types are unknown on this kernel).
    Unknown,
    /// No entry: conntrack had not seen the packet, could not make an entry, or judged
    /// the packet invalid.
    None,
    /// Exempted from tracking.
    Untracked,
    /// An entry with these `IPS_*` status bits.
    Entry { status: u32 },
}

impl PacketConntrack {
    /// An entry that is not in the conntrack table yet (the flow's first packet).
    pub fn unconfirmed(self) -> bool {
        matches!(self, Self::Entry { status } if status & tracer_common::IPS_CONFIRMED == 0)
    }

    /// An entry whose source NAT (or its null binding) was already set up.
    pub fn source_nat_done(self) -> bool {
        matches!(self, Self::Entry { status } if status & tracer_common::IPS_SRC_NAT_DONE != 0)
    }
}

/// A dropped packet of an attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PacketDrop {
    /// `NETFILTER_DROP`, `NO_SOCKET`, …
    pub reason: String,
    /// Where in the kernel: `nf_hook_slow+0x9e`.
    pub location: String,
    /// The packet was a reply (destination to source), not the attempt's own packet.
    pub reply: bool,
    /// The dropped packet's own source and destination.
    pub src: Option<std::net::SocketAddr>,
    pub dst: Option<std::net::SocketAddr>,
    pub conntrack: PacketConntrack,
    /// Inode of the network namespace the packet was dropped in.
    pub netns: Option<u64>,
    /// Whose namespace that is (filled in by the pipeline).
    pub netns_owner: Option<NetnsOwner>,
}

/// Whose network namespace a drop happened in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetnsOwner {
    /// The namespace the tracer runs in: the node's.
    Node,
    /// A pod's (`namespace/name`, or its UID when the pod is unknown).
    Pod(String),
}

/// How to start a capture.
#[derive(Clone, Debug)]
pub struct CaptureOptions {
    /// The running kernel's BTF: normally [`node::KERNEL_BTF`]; for kernels without
    /// built-in BTF, a file for that exact kernel (for example from BTFHub).
    pub kernel_btf: PathBuf,
    /// Trace only processes in these cgroups (one pod's), from the first event on; `None`
    /// traces every process in the hooked cgroups.
    pub only_cgroups: Option<Vec<u64>>,
    /// Size of the event ring buffer in bytes (a power of two, at least a page); `None`
    /// keeps the built-in [`tracer_common::RING_BUFFER_BYTES`].
    pub ring_buffer_bytes: Option<u32>,
    /// DNS summaries' period (see [`tracer_common::DnsRecentKey`]): repeats of a UDP
    /// exchange sent in the same period are only counted ([`Capture::dns_repeats`]).
    /// `None` sends every DNS message.
    pub dns_summary_period: Option<std::time::Duration>,
}

impl Default for CaptureOptions {
    fn default() -> Self {
        Self {
            kernel_btf: PathBuf::from(node::KERNEL_BTF),
            only_cgroups: None,
            ring_buffer_bytes: None,
            dns_summary_period: None,
        }
    }
}

impl Capture {
    /// Checks the environment, resolves kernel offsets, loads and attaches the programs.
    pub fn start(options: &CaptureOptions) -> Result<Self, CaptureError> {
        if KERNEL_OBJECT.is_empty() {
            return Err(CaptureError::NoKernelObject);
        }
        let effective = node::effective_capabilities()?;
        let missing = node::missing_capabilities(effective, &REQUIRED_CAPABILITIES);
        if !missing.is_empty() {
            return Err(CaptureError::MissingCapabilities(missing));
        }
        if !options.kernel_btf.is_file() {
            return Err(CaptureError::NoKernelBtf(options.kernel_btf.clone()));
        }
        if !aya::sys::is_map_supported(MapType::RingBuf).unwrap_or(false) {
            return Err(CaptureError::NoRingBuffer);
        }
        let kernel_btf = KernelBtf::from_file(&options.kernel_btf)?;
        let sock_offsets = kernel_btf.sock_offsets()?;
        let skb_offsets = kernel_btf.skb_offsets()?;
        let mut warnings = Vec::new();
        let cgroup_mount = node::cgroup2_mount().map_err(CaptureError::Cgroup)?;
        // Hooks on kubelet's pod cgroups leave the node's own processes (and the other end
        // of pods' connections, when it is local) without any cost.
        let mut traced_cgroups = node::pod_cgroup_roots(&cgroup_mount);
        if traced_cgroups.is_empty() {
            warnings.push(format!(
                "no kubelet pod cgroups (kubepods, kubepods.slice) below {}: tracing every process on the node",
                cgroup_mount.display()
            ));
            traced_cgroups.push(cgroup_mount);
        }
        let cgroups = open_cgroups(&mut traced_cgroups)?;
        let kallsyms = Kallsyms::load().unwrap_or_else(|e| {
            warnings.push(format!("cannot read /proc/kallsyms: {e}"));
            Kallsyms::parse("")
        });
        let icmp_receivers = icmp_receivers(&kallsyms).unwrap_or_else(|why| {
            warnings.push(format!(
                "ICMP errors will not be attributed to attempts: {why}"
            ));
            IcmpReceivers::default()
        });
        let conntrack_offsets = conntrack_offsets(&kernel_btf).unwrap_or_else(|e| {
            warnings.push(format!(
                "drops after the node's NAT will not be matched to their flows, nor say their conntrack state: {e}"
            ));
            ConntrackOffsets::default()
        });
        let drop_offsets = kernel_btf.drop_offsets().unwrap_or_else(|e| {
            warnings.push(format!(
                "drops will not say which network namespace they happened in: {e}"
            ));
            DropOffsets::default()
        });
        let drop_reasons = kernel_btf
            .enum_members("skb_drop_reason")
            .unwrap_or_else(|e| {
                warnings.push(format!("packet drops will not be reported: {e}"));
                HashMap::new()
            });
        let reason_value = |wanted: &str| {
            drop_reasons
                .iter()
                .find(|(_, name)| *name == wanted)
                .map(|(value, _)| *value)
        };
        let not_specified = reason_value("SKB_DROP_REASON_NOT_SPECIFIED");

        let mut loader = EbpfLoader::new();
        if let Some(bytes) = options.ring_buffer_bytes {
            loader.map_max_entries("EVENTS", bytes);
        }
        let mut ebpf = loader
            .override_global("SOCK_OFFSETS", &sock_offsets, true)
            .override_global("SKB_OFFSETS", &skb_offsets, true)
            .override_global("ICMP_RECEIVERS", &icmp_receivers, true)
            .override_global("CONNTRACK_OFFSETS", &conntrack_offsets, true)
            .override_global("DROP_OFFSETS", &drop_offsets, true)
            .override_global(
                "DROP_REASONS",
                &DropReasons {
                    not_specified: not_specified.unwrap_or(u32::MAX),
                    queue_purge: reason_value("SKB_DROP_REASON_QUEUE_PURGE").unwrap_or(u32::MAX),
                },
                true,
            )
            .load(KERNEL_OBJECT)?;
        // The filters are in place before any program is attached.
        mark_pod_cgroup_roots(&mut ebpf, &cgroups)?;
        if let Some(cgroups) = &options.only_cgroups {
            trace_only_cgroups(&mut ebpf, cgroups)?;
        }
        if let Some(period) = options.dns_summary_period {
            let milliseconds = u32::try_from(period.as_millis())
                .ok()
                .filter(|ms| *ms > 0)
                .ok_or(CaptureError::BadDnsSummaryPeriod(period))?;
            setting(&mut ebpf, SETTING_DNS_SUMMARY_MS, milliseconds)?;
        }
        attach_sock_addr(&mut ebpf, "connect4", &cgroups)?;
        if let Err(e) = attach_sock_addr(&mut ebpf, "connect6", &cgroups) {
            warnings.push(format!("IPv6 connects will not be traced: {e}"));
        }
        for (hook, family) in [("sendmsg4", "IPv4"), ("sendmsg6", "IPv6")] {
            if let Err(e) = attach_sock_addr(&mut ebpf, hook, &cgroups) {
                warnings.push(format!(
                    "{family} sends of unconnected UDP sockets will not be traced: {e}"
                ));
            }
        }
        if let Err(e) = attach_skb(
            &mut ebpf,
            "skb_egress",
            CgroupSkbAttachType::Egress,
            &cgroups,
        ) {
            warnings.push(format!(
                "DNS queries, source ports of failed TCP connections and drops will be missing, \
                 and UDP connects will not be told from address probes: {e}"
            ));
        }
        let sees_answers = attach_skb(
            &mut ebpf,
            "skb_ingress",
            CgroupSkbAttachType::Ingress,
            &cgroups,
        )
        .map_err(|e| {
            warnings.push(format!(
                "DNS responses and established TCP handshakes will be missing: {e}"
            ))
        })
        .is_ok();
        match aya::Btf::parse_file(&options.kernel_btf, aya::Endianness::default()) {
            Ok(btf) => {
                if let Err(e) = attach_btf_tracepoint(&mut ebpf, "inet_sk_error_report", &btf) {
                    warnings.push(format!(
                        "failed TCP handshakes (refused, timeout, unreachable) will be missing: {e}"
                    ));
                }
                // Without the SYN-ACKs, every connection would look abandoned at its end.
                if sees_answers
                    && let Err(e) = attach_btf_tracepoint(&mut ebpf, "tcp_destroy_sock", &btf)
                {
                    warnings.push(format!(
                        "TCP connects the application gives up during the handshake will be missing: {e}"
                    ));
                }
                if icmp_receivers != IcmpReceivers::default()
                    && let Err(e) = attach_btf_tracepoint(&mut ebpf, "consume_skb", &btf)
                {
                    warnings.push(format!(
                        "ICMP errors will not be attributed to attempts: {e}"
                    ));
                }
                if not_specified.is_some()
                    && let Err(e) = attach_btf_tracepoint(&mut ebpf, "kfree_skb", &btf)
                {
                    warnings.push(format!("packet drops will not be reported: {e}"));
                }
            }
            Err(e) => warnings.push(format!(
                "TCP outcomes and ICMP errors will be missing: cannot parse {}: {e}",
                options.kernel_btf.display()
            )),
        }

        let ring = RingBuf::try_from(
            ebpf.take_map("EVENTS")
                .ok_or(CaptureError::MissingPart("map EVENTS"))?,
        )?;
        let counters = PerCpuArray::try_from(
            ebpf.take_map("COUNTERS")
                .ok_or(CaptureError::MissingPart("map COUNTERS"))?,
        )?;
        // SAFETY: the ring buffer owns its fd, which stays open and unchanged until the
        // AsyncFd (which owns the ring buffer) is dropped.
        let ring = unsafe { AsyncFd::register(ring) }.map_err(|e| e.into_parts().1)?;
        Ok(Self {
            ring,
            counters,
            ebpf,
            warnings,
            traced_cgroups,
            names: KernelNames {
                drop_reasons,
                kallsyms,
            },
            read_until: ReadUntil::default(),
        })
    }

    /// The kernel time (`CLOCK_MONOTONIC` nanoseconds) before which every event the
    /// programs made has been read: what settles time-bound decisions (the assembler's
    /// waits, DNS timeouts) whatever the reader's delays and wherever a batch ended.
    pub fn read_until_ns(&self) -> u64 {
        self.read_until.ns()
    }

    /// Restricts tracing, in the kernel, to processes in these cgroups (adding to any set
    /// before); other processes' connects then cost one map lookup and reach no one.
    pub fn trace_only_cgroups(&mut self, cgroup_ids: &[u64]) -> Result<(), CaptureError> {
        trace_only_cgroups(&mut self.ebpf, cgroup_ids)
    }

    /// Names for the numbers in kernel events.
    pub fn names(&self) -> &KernelNames {
        &self.names
    }

    /// Hooks that could not be attached, each with what is lost.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The cgroups whose processes' sockets the hooks see: kubelet's pod cgroups, or the
    /// whole hierarchy when there are none.
    pub fn traced_cgroups(&self) -> &[PathBuf] {
        &self.traced_cgroups
    }

    /// Waits for events (at most [`DRAIN_INTERVAL`]) and appends up to [`MAX_BATCH`] of
    /// them to `out`. The programs wake the reader only when the ring fills up, so it is
    /// also drained on this interval.
    pub async fn read_batch(
        &mut self,
        out: &mut Vec<Result<KernelEvent, DecodeError>>,
    ) -> Result<(), CaptureError> {
        let Ok(guard) = tokio::time::timeout(DRAIN_INTERVAL, self.ring.readable_mut()).await else {
            drain(self.ring.get_mut(), out, MAX_BATCH, &mut self.read_until);
            return Ok(());
        };
        let mut guard = guard?;
        if drain(guard.get_inner_mut(), out, MAX_BATCH, &mut self.read_until) < MAX_BATCH {
            guard.clear_ready();
        }
        Ok(())
    }

    /// Reads every event already in the ring buffer without waiting (at shutdown, so the
    /// events of the last moments are not lost).
    pub fn read_available(&mut self, out: &mut Vec<Result<KernelEvent, DecodeError>>) {
        drain(self.ring.get_mut(), out, usize::MAX, &mut self.read_until);
    }

    /// Sums the per-CPU kernel counters.
    pub fn counters(&self) -> Result<KernelCounters, CaptureError> {
        let total = |counter: Counter| -> Result<u64, CaptureError> {
            Ok(self.counters.get(&(counter as u32), 0)?.iter().sum())
        };
        Ok(KernelCounters {
            connects: total(Counter::ConnectSeen)?,
            connects_lost: total(Counter::ConnectLost)?,
            sock_states: total(Counter::SockStateSeen)?,
            sock_states_lost: total(Counter::SockStateLost)?,
            first_packets: total(Counter::FirstPacketSeen)?,
            first_packets_lost: total(Counter::FirstPacketLost)?,
            icmp_errors: total(Counter::IcmpErrorSeen)?,
            icmp_errors_lost: total(Counter::IcmpErrorLost)?,
            drops: total(Counter::DropSeen)?,
            drops_lost: total(Counter::DropLost)?,
            dns_messages: total(Counter::DnsSeen)?,
            dns_messages_lost: total(Counter::DnsLost)?,
            handshakes_uncounted: total(Counter::HandshakeUncounted)?,
            sock_states_skipped: self.skipped_runs("inet_sk_error_report")
                + self.skipped_runs("tcp_destroy_sock"),
            icmp_errors_skipped: self.skipped_runs("consume_skb"),
            drops_skipped: self.skipped_runs("kfree_skb"),
        })
    }

    /// How often the kernel skipped the program `hook` for recursion
    /// (`bpf_prog_info.recursion_misses`); 0 when it is not loaded or cannot be asked.
    fn skipped_runs(&self, hook: &str) -> u64 {
        let Some(fd) = self.ebpf.program(hook).and_then(|p| p.fd().ok()) else {
            return 0;
        };
        let fd = fd.as_fd().as_raw_fd();
        let mut info: aya_obj::generated::bpf_prog_info = unsafe { std::mem::zeroed() };
        /// `bpf_attr` for BPF_OBJ_GET_INFO_BY_FD.
        #[repr(C)]
        struct InfoByFd {
            bpf_fd: u32,
            info_len: u32,
            info: u64,
        }
        let mut attr = InfoByFd {
            bpf_fd: fd as u32,
            info_len: std::mem::size_of_val(&info) as u32,
            info: std::ptr::addr_of_mut!(info) as u64,
        };
        const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
        // SAFETY: the attribute points at a zeroed bpf_prog_info of the size it states;
        // the kernel writes at most that much.
        let done = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_OBJ_GET_INFO_BY_FD,
                std::ptr::addr_of_mut!(attr),
                std::mem::size_of::<InfoByFd>(),
            )
        };
        if done == 0 { info.recursion_misses } else { 0 }
    }

    /// The kernel's handshake counts (summed over CPUs), exact even when events were lost.
    pub fn handshakes(&self) -> Result<Vec<(HandshakeKey, HandshakeTotals)>, CaptureError> {
        self.totals("HANDSHAKES")
    }

    /// Removes handshake keys that stay idle, so the map keeps room for new ones.
    pub fn forget_handshakes(&mut self, keys: &[HandshakeKey]) -> Result<(), CaptureError> {
        self.forget::<HandshakeKey, HandshakeTotals>("HANDSHAKES", keys)
    }

    /// The kernel's counts of the DNS exchanges it summarised (summed over CPUs).
    pub fn dns_repeats(&self) -> Result<Vec<(DnsRepeatKey, DnsRepeatTotals)>, CaptureError> {
        self.totals("DNS_REPEATS")
    }

    /// Removes summarised-exchange keys that stay idle.
    pub fn forget_dns_repeats(&mut self, keys: &[DnsRepeatKey]) -> Result<(), CaptureError> {
        self.forget::<DnsRepeatKey, DnsRepeatTotals>("DNS_REPEATS", keys)
    }

    /// Every key of the per-CPU map `name`, with its totals summed over the CPUs.
    fn totals<K: aya::Pod, V: Totals>(
        &self,
        name: &'static str,
    ) -> Result<Vec<(K, V)>, CaptureError> {
        let map = self.ebpf.map(name).ok_or(CaptureError::MissingPart(name))?;
        let map = PerCpuHashMap::<_, K, V>::try_from(map)?;
        map.iter()
            .map(|entry| {
                let (key, per_cpu) = entry?;
                Ok((
                    key,
                    per_cpu.iter().fold(V::default(), |sum, cpu| sum.plus(cpu)),
                ))
            })
            .collect()
    }

    /// Removes the queries the kernel held back for which `overdue` holds (their response
    /// did not come in time), and returns those: the ones whose response removed them in
    /// the meantime are the kernel's to account for, and are not returned.
    pub fn take_overdue_dns_queries(
        &mut self,
        mut overdue: impl FnMut(&DnsHeld) -> bool,
    ) -> Result<Vec<(DnsHeldKey, DnsHeld)>, CaptureError> {
        let map = self
            .ebpf
            .map_mut("DNS_HELD")
            .ok_or(CaptureError::MissingPart("map DNS_HELD"))?;
        let mut map = aya::maps::HashMap::<_, DnsHeldKey, DnsHeld>::try_from(map)?;
        let mut candidates = Vec::new();
        for entry in map.iter() {
            let (key, held) = entry?;
            if overdue(&held) {
                candidates.push((key, held));
            }
        }
        let mut taken = Vec::with_capacity(candidates.len());
        for (key, held) in candidates {
            match map.remove(&key) {
                Ok(()) => taken.push((key, held)),
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(taken)
    }

    fn forget<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
        keys: &[K],
    ) -> Result<(), CaptureError> {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(CaptureError::MissingPart(name))?;
        let mut map = PerCpuHashMap::<_, K, V>::try_from(map)?;
        for key in keys {
            match map.remove(key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// Counts the kernel keeps per key (and CPU) in a map, which only ever grow.
pub trait Totals: aya::Pod + Default {
    fn plus(&self, other: &Self) -> Self;
    /// What was added since `earlier` (a key removed and made again counts from zero).
    fn since(&self, earlier: &Self) -> Self;
    /// Whether nothing was counted.
    fn is_zero(&self) -> bool;
}

impl Totals for HandshakeTotals {
    fn plus(&self, other: &Self) -> Self {
        Self {
            handshakes: self.handshakes + other.handshakes,
            syn_retransmits: self.syn_retransmits + other.syn_retransmits,
        }
    }

    fn since(&self, earlier: &Self) -> Self {
        Self {
            handshakes: self.handshakes.saturating_sub(earlier.handshakes),
            syn_retransmits: self.syn_retransmits.saturating_sub(earlier.syn_retransmits),
        }
    }

    fn is_zero(&self) -> bool {
        self.handshakes == 0
    }
}

impl Totals for DnsRepeatTotals {
    fn plus(&self, other: &Self) -> Self {
        Self {
            exchanges: self.exchanges + other.exchanges,
            duration_ns: self.duration_ns + other.duration_ns,
        }
    }

    fn since(&self, earlier: &Self) -> Self {
        Self {
            exchanges: self.exchanges.saturating_sub(earlier.exchanges),
            duration_ns: self.duration_ns.saturating_sub(earlier.duration_ns),
        }
    }

    fn is_zero(&self) -> bool {
        self.exchanges == 0
    }
}

/// Appends up to `most` events from the ring to `out`, and moves `read_until` on; how
/// many.
fn drain(
    ring: &mut RingBuf<MapData>,
    out: &mut Vec<Result<KernelEvent, DecodeError>>,
    most: usize,
    read_until: &mut ReadUntil,
) -> usize {
    let started_ns = node::monotonic_now().as_nanos() as u64;
    let mut drained = 0;
    while drained < most {
        let Some(item) = ring.next() else {
            // A program takes its event's time before it reserves the event: one that was
            // still reserving when the ring read as empty stamped its event just before.
            read_until.emptied_ns = started_ns.saturating_sub(RESERVE_SLACK_NS);
            break;
        };
        if let Some(ts_ns) = decode::event_time(&item) {
            read_until.newest_event_ns = read_until.newest_event_ns.max(ts_ns);
        }
        out.push(decode(&item));
        drained += 1;
    }
    drained
}

/// The program named `hook`, as its type.
fn program<'a, T>(ebpf: &'a mut Ebpf, hook: &'static str) -> Result<&'a mut T, CaptureError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(hook)
        .ok_or(CaptureError::MissingPart(hook))?
        .try_into()
        .map_err(|source| CaptureError::Hook { hook, source })
}

/// Opens the cgroups to attach to, leaving out (from `paths` too) any removed since they
/// were found.
fn open_cgroups(paths: &mut Vec<PathBuf>) -> Result<Vec<File>, CaptureError> {
    let mut cgroups = Vec::with_capacity(paths.len());
    let mut result = Ok(());
    paths.retain(|path| match File::open(path) {
        Ok(file) => {
            cgroups.push(file);
            true
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => {
            result = Err(CaptureError::Cgroup(e));
            true
        }
    });
    result.map(|()| cgroups)
}

/// Attaches with `attach` to each cgroup; one removed meanwhile is no error (kubelet
/// removes its pod roots only when reconfigured; test labs come and go).
fn attach_each(
    cgroups: &[File],
    mut attach: impl FnMut(&File) -> Result<(), ProgramError>,
) -> Result<(), ProgramError> {
    cgroups.iter().try_for_each(|cgroup| match attach(cgroup) {
        Err(ProgramError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(())
        }
        other => other,
    })
}

fn attach_sock_addr(
    ebpf: &mut Ebpf,
    hook: &'static str,
    cgroups: &[File],
) -> Result<(), CaptureError> {
    let program: &mut CgroupSockAddr = program(ebpf, hook)?;
    // On kernels with BPF links (5.7+) aya attaches through a link, which always coexists
    // with the CNI's and other tools' programs; the kernel rejects explicit flags there.
    program
        .load()
        .and_then(|()| {
            attach_each(cgroups, |cgroup| {
                program
                    .attach(cgroup, CgroupAttachMode::default())
                    .map(drop)
            })
        })
        .map_err(|source| CaptureError::Hook { hook, source })
}

fn attach_skb(
    ebpf: &mut Ebpf,
    hook: &'static str,
    direction: CgroupSkbAttachType,
    cgroups: &[File],
) -> Result<(), CaptureError> {
    let program: &mut CgroupSkb = program(ebpf, hook)?;
    program
        .load()
        .and_then(|()| {
            attach_each(cgroups, |cgroup| {
                program
                    .attach(cgroup, direction, CgroupAttachMode::default())
                    .map(drop)
            })
        })
        .map_err(|source| CaptureError::Hook { hook, source })
}

/// Tells the tracepoints which cgroups the hooks are attached to (a cgroup's id is its
/// directory's inode number), so that they leave the node's own sockets alone.
fn mark_pod_cgroup_roots(ebpf: &mut Ebpf, cgroups: &[File]) -> Result<(), CaptureError> {
    let ids = cgroups
        .iter()
        .map(|cgroup| cgroup.metadata().map(|m| m.ino()))
        .collect::<io::Result<Vec<u64>>>()
        .map_err(CaptureError::Cgroup)?;
    insert_cgroup_ids(ebpf, "POD_CGROUP_ROOTS", &ids)
}

/// Adds `ids` to the cgroup-id set `map` (a hash map whose keys alone count).
fn insert_cgroup_ids(ebpf: &mut Ebpf, map: &'static str, ids: &[u64]) -> Result<(), CaptureError> {
    let map = ebpf.map_mut(map).ok_or(CaptureError::MissingPart(map))?;
    let mut set: aya::maps::HashMap<_, u64, u8> = aya::maps::HashMap::try_from(map)?;
    for id in ids {
        set.insert(id, 1, 0)?;
    }
    Ok(())
}

fn trace_only_cgroups(ebpf: &mut Ebpf, cgroup_ids: &[u64]) -> Result<(), CaptureError> {
    insert_cgroup_ids(ebpf, "TRACED_CGROUPS", cgroup_ids)?;
    setting(ebpf, SETTING_CGROUP_FILTER, 1)
}

/// Writes entry `index` (a `SETTING_*`) of the programs' `SETTINGS`.
fn setting(ebpf: &mut Ebpf, index: u32, value: u32) -> Result<(), CaptureError> {
    let map = ebpf
        .map_mut("SETTINGS")
        .ok_or(CaptureError::MissingPart("map SETTINGS"))?;
    let mut settings: aya::maps::Array<_, u32> = aya::maps::Array::try_from(map)?;
    settings.set(index, value, 0)?;
    Ok(())
}

/// Loads and attaches the tp_btf program named after its tracepoint.
fn attach_btf_tracepoint(
    ebpf: &mut Ebpf,
    hook: &'static str,
    btf: &aya::Btf,
) -> Result<(), CaptureError> {
    let program: &mut BtfTracePoint = program(ebpf, hook)?;
    program
        .load(hook, btf)
        .and_then(|()| program.attach())
        .map(drop)
        .map_err(|source| CaptureError::Hook { hook, source })
}

/// Conntrack offsets, from the kernel's BTF or, when conntrack is a module, the module's.
fn conntrack_offsets(kernel_btf: &KernelBtf) -> Result<ConntrackOffsets, BtfError> {
    match kernel_btf.conntrack_offsets() {
        Err(BtfError::NoStruct(_)) => kernel_btf.with_module("nf_conntrack")?.conntrack_offsets(),
        other => other,
    }
}

/// Where `icmp_rcv` and `icmpv6_rcv` live in kernel text.
fn icmp_receivers(symbols: &Kallsyms) -> Result<IcmpReceivers, String> {
    let range = |name: &str| {
        symbols.range(name).ok_or_else(|| {
            format!(
                "{name} not found in /proc/kallsyms (addresses hidden by kernel.kptr_restrict?)"
            )
        })
    };
    let v4 = range("icmp_rcv")?;
    // IPv6 may be a module that is not loaded: then only ICMPv4 is watched.
    let v6 = range("icmpv6_rcv").unwrap_or(kallsyms::SymbolRange { start: 0, end: 0 });
    Ok(IcmpReceivers {
        icmp_rcv_start: v4.start,
        icmp_rcv_end: v4.end,
        icmpv6_rcv_start: v6.start,
        icmpv6_rcv_end: v6.end,
    })
}
