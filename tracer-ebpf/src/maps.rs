//! Maps shared by all programs, and the helpers that write to them.

use aya_ebpf::{
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns},
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use tracer_common::{
    Counter, DNS_CAPTURE_BYTES, DNS_HELD_MAX, DNS_RECENT_MAX, DNS_REPEAT_KEYS, DnsHeld, DnsHeldKey,
    DnsRecentKey, DnsRepeatKey, DnsRepeatTotals, Endpoint, EventHeader, EventKind,
    FAILING_HANDSHAKES_MAX, HANDSHAKE_KEYS, HandshakeKey, HandshakeTotals, PENDING_UDP_SOCKETS,
    POD_ADDRESSES_MAX, POD_CGROUP_ROOTS_MAX, RING_BUFFER_BYTES, SETTING_CGROUP_FILTER,
    SETTING_DNS_SUMMARY_MS, SETTINGS_COUNT, SocketDestination, TRACED_CGROUPS_MAX,
    UDP_DESTINATIONS,
};

/// LRU maps keep one LRU list per CPU: no lock shared between CPUs on the connect and
/// first-packet paths. Each CPU evicts from its own share of the entries.
const BPF_F_NO_COMMON_LRU: u32 = 1 << 1;

/// Every event goes here; userspace reads it with one consumer.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(RING_BUFFER_BYTES, 0);

/// Per-CPU counters indexed by [`Counter`]: exact even when the ring buffer overflows.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

/// Connected UDP sockets of traced processes whose first datagram has not left yet (the
/// first-packet hook reports it and removes the entry). LRU so that sockets that never
/// send (a UDP connect that only selects an address) cannot fill it. TCP sockets need no
/// entry: the kernel's own socket tells what the hooks need (its state, whether a SYN is
/// the first, its retransmissions, its cgroup), which spares every connection a map
/// insert and delete.
#[map]
pub static PENDING_UDP_SOCKS: LruHashMap<u64, u8> =
    LruHashMap::with_max_entries(PENDING_UDP_SOCKETS, BPF_F_NO_COMMON_LRU);

/// TCP handshakes on their way to failing, by socket cookie: answered by a reset (whose
/// flags and TTL the failure report carries), or reported failed already (so that the
/// socket's destruction does not report it again). Only failing handshakes have an entry;
/// LRU so that sockets that are never destroyed cannot fill it.
#[map]
pub static FAILING_HANDSHAKES: LruHashMap<u64, FailingHandshake> =
    LruHashMap::with_max_entries(FAILING_HANDSHAKES_MAX, 0);

/// An entry of [`FAILING_HANDSHAKES`].
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FailingHandshake {
    /// The handshake's SYN sequence number: a socket can `connect()` again after a
    /// failure, and an entry holds for one handshake only.
    pub syn_seq: u32,
    /// The reset's TCP flags (0 if none arrived) and TTL.
    pub reply_tcp_flags: u8,
    pub reply_ttl: u8,
    /// Whether the failure was reported.
    pub reported: u8,
    pub _pad: u8,
}

/// The pod-side addresses of the traced sockets (from each one's first packet, port 0),
/// so the drop hook, which sees packets without their socket (forwarding, NAT), can tell
/// the traced pods' packets apart; userspace then finds the attempt by the flow's tuple.
/// One entry per pod address, written only when missing: no map update per connection.
/// A host-network pod's address is the node's, so the node's own dropped UDP packets and
/// TCP handshakes reach userspace too, which finds no attempt for them (late drops).
/// A common LRU (not per-CPU lists): any CPU may see a pod's first packet, and each CPU's
/// share of a per-CPU LRU would be small on a large node.
#[map]
pub static POD_ADDRESSES: LruHashMap<Endpoint, u8> =
    LruHashMap::with_max_entries(POD_ADDRESSES_MAX, 0);

/// (unconnected UDP socket, destination) pairs already reported by `sendmsg4`/`sendmsg6`.
#[map]
pub static UDP_DESTINATIONS_SEEN: LruHashMap<SocketDestination, u8> =
    LruHashMap::with_max_entries(UDP_DESTINATIONS, BPF_F_NO_COMMON_LRU);

/// Handshakes counted per cgroup, destination and outcome (see [`HandshakeKey`]). Not LRU:
/// an eviction would lose counts silently, while a full map is counted
/// ([`Counter::HandshakeUncounted`]) and userspace removes idle keys.
#[map]
pub static HANDSHAKES: PerCpuHashMap<HandshakeKey, HandshakeTotals> =
    PerCpuHashMap::with_max_entries(HANDSHAKE_KEYS, 0);

/// DNS summaries (see `tracer_common::DnsRecentKey`): the messages each cgroup had sent to
/// userspace, with the period they were last sent in. LRU: an evicted message is sent
/// again, which costs only the saving.
#[map]
pub static DNS_RECENT: LruHashMap<DnsRecentKey, u64> =
    LruHashMap::with_max_entries(DNS_RECENT_MAX, 0);

/// Queries held back until their response (see `tracer_common::DnsHeld`).
#[map]
pub static DNS_HELD: HashMap<DnsHeldKey, DnsHeld> = HashMap::with_max_entries(DNS_HELD_MAX, 0);

/// Repeated DNS exchanges counted instead of sent (see `tracer_common::DnsRepeatKey`).
/// Per CPU, so that counting needs no atomics: only the ingress program adds, in softirq
/// context, where it cannot interrupt itself.
#[map]
pub static DNS_REPEATS: PerCpuHashMap<DnsRepeatKey, DnsRepeatTotals> =
    PerCpuHashMap::with_max_entries(DNS_REPEAT_KEYS, 0);

/// A DNS message's bytes, for hashing (too large for the stack).
#[map]
pub static DNS_SCRATCH: PerCpuArray<[u64; DNS_CAPTURE_BYTES / 8]> =
    PerCpuArray::with_max_entries(1, 0);

/// Runtime settings written by userspace, indexed by `SETTING_*`.
#[map]
pub static SETTINGS: Array<u32> = Array::with_max_entries(SETTINGS_COUNT, 0);

/// The cgroups the programs are attached to (kubelet's pod cgroup roots), by id. The
/// tracepoints run for every socket of the node: they take a socket for a pod's only
/// when its cgroup lies below one of these.
#[map]
pub static POD_CGROUP_ROOTS: HashMap<u64, u8> = HashMap::with_max_entries(POD_CGROUP_ROOTS_MAX, 0);

/// cgroup ids of the traced pods' containers, when tracing only some pods: the kernel-side
/// filter that keeps other pods' traffic from costing more than a lookup.
#[map]
pub static TRACED_CGROUPS: HashMap<u64, u8> = HashMap::with_max_entries(TRACED_CGROUPS_MAX, 0);

/// Ring buffer flags for one event: wake the reader only once an eighth of the ring is
/// waiting. Userspace also drains the ring on a short timer, so under load most events
/// cost no wakeup (a wakeup per event is a large share of the tracing cost). Called with
/// a record reserved: the reservation has just brought the ring's positions into this
/// CPU's cache (queried before it, they cost cache misses: perf showed the query costing
/// as much as a packet program).
#[inline(always)]
pub fn wakeup() -> u64 {
    const BPF_RB_NO_WAKEUP: u64 = 1;
    const BPF_RB_FORCE_WAKEUP: u64 = 2;
    const BPF_RB_AVAIL_DATA: u64 = 0;
    // The size is chosen at load time (`--ring-buffer-size`); it sits in the ring's
    // read-mostly header.
    const BPF_RB_RING_SIZE: u64 = 1;
    if EVENTS.query(BPF_RB_AVAIL_DATA) >= EVENTS.query(BPF_RB_RING_SIZE) / 8 {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

/// Writes `event` into the ring; `Err` when the ring is full (the caller counts the loss).
/// Written in place, not copied from the stack by `bpf_ringbuf_output`.
#[inline(always)]
pub fn emit<T: 'static>(event: T) -> Result<(), ()> {
    let Some(mut entry) = EVENTS.reserve::<T>(0) else {
        return Err(());
    };
    entry.write(event);
    entry.submit(wakeup());
    Ok(())
}

/// The length of a DNS summary period in nanoseconds; 0 when summaries are off.
#[inline(always)]
pub fn dns_summary_period_ns() -> u64 {
    SETTINGS
        .get(SETTING_DNS_SUMMARY_MS)
        .map_or(0, |ms| u64::from(*ms) * 1_000_000)
}

/// Whether processes in `cgroup_id` are traced.
#[inline(always)]
pub fn is_traced(cgroup_id: u64) -> bool {
    is_traced_cgroup(|| Some(cgroup_id))
}

/// Whether processes in the cgroup `cgroup_id` finds are traced; `cgroup_id` is only
/// called when tracing some pods only (`None`: not traced).
#[inline(always)]
pub fn is_traced_cgroup(cgroup_id: impl FnOnce() -> Option<u64>) -> bool {
    let filtering = SETTINGS.get(SETTING_CGROUP_FILTER).is_some_and(|v| *v != 0);
    // SAFETY: only existence is checked.
    !filtering || cgroup_id().is_some_and(|id| unsafe { TRACED_CGROUPS.get(id) }.is_some())
}

/// Adds the pod-side address of a traced socket's first packet to [`POD_ADDRESSES`],
/// unless it is there already (the common case: a lookup, no update).
#[inline(always)]
pub fn remember_pod_address(family: u16, addr: [u8; 16]) {
    let key = Endpoint {
        family,
        port: 0,
        addr,
    };
    // SAFETY: only existence is checked.
    if unsafe { POD_ADDRESSES.get(key) }.is_none() {
        // A full map evicts its least recently used address: that pod's next first packet
        // adds it again.
        let _ = POD_ADDRESSES.insert(key, 0, 0);
    }
}

/// Whether `addr` is a traced pod's address.
#[inline(always)]
pub fn is_pod_address(family: u16, addr: [u8; 16]) -> bool {
    let key = Endpoint {
        family,
        port: 0,
        addr,
    };
    // SAFETY: only existence is checked.
    unsafe { POD_ADDRESSES.get(key) }.is_some()
}

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: a per-CPU slot is only touched by programs on this CPU, which do not
        // preempt each other for these program types.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
pub fn header(kind: EventKind) -> EventHeader {
    // SAFETY: plain helper calls without arguments.
    let (cpu, ts_ns) = unsafe { (bpf_get_smp_processor_id(), bpf_ktime_get_ns()) };
    EventHeader {
        kind: kind as u32,
        cpu,
        ts_ns,
    }
}
