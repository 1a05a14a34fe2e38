//! The types that cross the kernel/userspace boundary, defined once.
//!
//! Every event the kernel programs write to the `EVENTS` ring buffer starts with an
//! [`EventHeader`]; its `kind` says which struct follows. All structs are `#[repr(C)]`
//! with explicit padding so their layout is identical on both sides; the tests at the
//! bottom pin sizes and field offsets, so a change that would silently desynchronise the
//! two sides fails to compile or test instead.
//!
//! Conventions: ports are in host byte order, addresses in network byte order (as they
//! are on the wire), timestamps are `CLOCK_MONOTONIC` nanoseconds (`bpf_ktime_get_ns`).
#![no_std]

/// `AF_INET`, as stored in [`Endpoint::family`].
pub const AF_INET: u16 = 2;
/// `AF_INET6`, as stored in [`Endpoint::family`].
pub const AF_INET6: u16 = 10;

/// `IPPROTO_TCP`.
pub const IPPROTO_TCP: u8 = 6;
/// `IPPROTO_UDP`.
pub const IPPROTO_UDP: u8 = 17;

/// Kernel `TCP_ESTABLISHED` socket state.
pub const TCP_ESTABLISHED: u8 = 1;
/// Kernel `TCP_SYN_SENT` socket state.
pub const TCP_SYN_SENT: u8 = 2;
/// Kernel `TCP_CLOSE` socket state.
pub const TCP_CLOSE: u8 = 7;

/// Length of a task's `comm` in the kernel (`TASK_COMM_LEN`).
pub const COMM_LEN: usize = 16;

/// What follows an [`EventHeader`] in the ring buffer.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A [`ConnectEvent`]: a process called `connect()`.
    Connect = 1,
    /// A [`SockStateEvent`]: a traced TCP socket left `SYN_SENT`.
    SockState = 2,
    /// A [`FirstPacketEvent`]: the first packet of a traced socket left its cgroup.
    FirstPacket = 3,
    /// An [`IcmpErrorEvent`]: the kernel received an ICMP or ICMPv6 error.
    IcmpError = 4,
    /// A [`DropEvent`]: the kernel dropped a packet of a traced flow.
    Drop = 5,
    /// A [`DnsEvent`]: a DNS message left or reached a traced process.
    Dns = 6,
}

impl EventKind {
    /// Decodes the `kind` field of a header; `None` for kinds this build does not know.
    pub fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            1 => Some(Self::Connect),
            2 => Some(Self::SockState),
            3 => Some(Self::FirstPacket),
            4 => Some(Self::IcmpError),
            5 => Some(Self::Drop),
            6 => Some(Self::Dns),
            _ => None,
        }
    }
}

/// Common prefix of every ring-buffer event.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventHeader {
    /// An [`EventKind`] as `u32`.
    pub kind: u32,
    /// CPU that produced the event (helps ordering events of one flow across CPUs).
    pub cpu: u32,
    /// `bpf_ktime_get_ns()` at the time of the event.
    pub ts_ns: u64,
}

/// One end of a flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// [`AF_INET`] or [`AF_INET6`]; 0 when unknown.
    pub family: u16,
    /// Port in host byte order.
    pub port: u16,
    /// IPv4 in the first 4 bytes, or IPv6; network byte order.
    pub addr: [u8; 16],
}

impl Endpoint {
    /// An endpoint with nothing known about it.
    pub const UNKNOWN: Self = Self {
        family: 0,
        port: 0,
        addr: [0; 16],
    };
}

/// A `connect()` call seen by the cgroup `connect4`/`connect6` hooks, or the first send
/// of an unconnected UDP socket to a destination (`sendmsg4`/`sendmsg6`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectEvent {
    pub header: EventHeader,
    /// cgroup v2 id of the calling task (the inode number of its cgroup directory).
    pub cgroup_id: u64,
    /// `bpf_get_socket_cookie()`: joins later events of the same socket.
    pub sock_cookie: u64,
    /// Thread-group id (the process id userspace sees) in the initial pid namespace.
    pub pid: u32,
    /// Thread id in the initial pid namespace.
    pub tid: u32,
    /// The calling task's `comm`, NUL-padded.
    pub comm: [u8; COMM_LEN],
    /// [`IPPROTO_TCP`] or [`IPPROTO_UDP`] (other protocols are not reported).
    pub protocol: u8,
    /// [`CALL_CONNECT`] or [`CALL_SENDMSG`].
    pub call: u8,
    pub _pad: [u8; 6],
    /// The address the application asked for.
    pub dst: Endpoint,
}

/// [`ConnectEvent::call`]: `connect()`.
pub const CALL_CONNECT: u8 = 0;
/// [`ConnectEvent::call`]: the first `sendmsg()`/`sendto()` of an unconnected UDP socket to
/// a destination (later sends to the same destination are not reported).
pub const CALL_SENDMSG: u8 = 1;

/// A traced TCP socket left `SYN_SENT`: the handshake completed, failed, or was given up.
///
/// Carries how it ended (the socket's error fields and SYN retransmissions) and the
/// socket's tuple (whose source port is already 0 when a failed socket reaches CLOSE).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockStateEvent {
    pub header: EventHeader,
    /// Same cookie as the [`ConnectEvent`] of this socket.
    pub sock_cookie: u64,
    /// Kernel TCP state before the transition ([`TCP_SYN_SENT`]).
    pub old_state: u8,
    /// Kernel TCP state after the transition ([`TCP_ESTABLISHED`] or [`TCP_CLOSE`]).
    pub new_state: u8,
    /// TCP flags of the first answer to the socket's SYN (a SYN-ACK or a reset, seen at
    /// the socket's cgroup ingress); 0 when nothing answered.
    pub reply_tcp_flags: u8,
    /// The TTL (IPv6: hop limit) that answer arrived with: the path length of whoever
    /// sent it. A reset that arrives after fewer hops than the endpoint's own SYN-ACKs was
    /// forged on the path (a firewall), not sent by the endpoint.
    pub reply_ttl: u8,
    /// `sk->sk_err`: the errno the connection failed with (0 when the application
    /// closed it, or when it succeeded).
    pub error: i32,
    /// `sk->sk_err_soft`: an error seen but not yet fatal (e.g. an ICMP unreachable
    /// while the handshake was still retrying).
    pub soft_error: i32,
    /// `tcp_sock.total_retrans`: SYNs retransmitted before the transition.
    pub syn_retransmits: u32,
    pub src: Endpoint,
    pub dst: Endpoint,
}

/// The first packet of a traced socket, seen at cgroup egress: a TCP socket's first
/// SYN, or a connected UDP socket's first datagram.
///
/// It carries the tuple the kernel chose, whatever happens later (a failed TCP socket has
/// released its port by the time it reports), and for UDP it is the evidence that the
/// connect was an egress attempt and not an address probe (`getaddrinfo` connects UDP
/// sockets it never sends on).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FirstPacketEvent {
    pub header: EventHeader,
    /// Same cookie as the [`ConnectEvent`] of this socket.
    pub sock_cookie: u64,
    /// [`IPPROTO_TCP`] or [`IPPROTO_UDP`].
    pub protocol: u8,
    pub _pad: [u8; 7],
    pub src: Endpoint,
    pub dst: Endpoint,
}

/// An ICMP or ICMPv6 error the kernel received and handled (destination unreachable,
/// time exceeded, fragmentation needed / packet too big), with the flow it is about, as
/// its embedded header names it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpErrorEvent {
    pub header: EventHeader,
    /// ICMP (family [`AF_INET`]) or ICMPv6 (family [`AF_INET6`]) type.
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// Protocol of the embedded packet ([`IPPROTO_TCP`] or [`IPPROTO_UDP`]).
    pub protocol: u8,
    pub _pad: u8,
    /// The MTU for "fragmentation needed" / "packet too big", else 0.
    pub mtu: u32,
    /// Who sent the ICMP error (a router on the path, or the destination); port 0.
    pub sender: Endpoint,
    /// Source of the packet that caused the error.
    pub src: Endpoint,
    /// Destination of the packet that caused the error.
    pub dst: Endpoint,
    pub _pad2: [u8; 4],
}

/// The addresses, ports and protocol that name a flow in its packets; the key of the
/// kernel's map of traced flows (filled from each traced socket's first packet).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowTuple {
    pub family: u16,
    pub protocol: u8,
    pub _pad: u8,
    pub src_port: u16,
    pub dst_port: u16,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

/// [`SockStateEvent::reply_tcp_flags`]: the answer was a reset.
pub const TCP_FLAG_RST: u8 = 0x04;

/// Direction of a dropped packet relative to its flow.
pub const DROP_DIRECTION_ORIGINAL: u8 = 0;
/// The dropped packet was a reply (destination to source).
pub const DROP_DIRECTION_REPLY: u8 = 1;

/// [`DropEvent::conntrack`]: conntrack's types are unknown on this kernel, so the packet's
/// conntrack state was not read.
pub const DROP_CT_UNKNOWN: u8 = 0;
/// The packet carried no conntrack entry: conntrack had not seen it yet, could not
/// allocate one (table full), or judged the packet invalid.
pub const DROP_CT_NONE: u8 = 1;
/// The packet was exempted from tracking (`NOTRACK`).
pub const DROP_CT_UNTRACKED: u8 = 2;
/// The packet carried a conntrack entry; [`DropEvent::ct_status`] holds its status bits.
pub const DROP_CT_ENTRY: u8 = 3;

/// `IPS_SRC_NAT_DONE`: source NAT (or its null binding) was set up for the entry.
pub const IPS_SRC_NAT_DONE: u32 = 1 << 7;
/// `IPS_DST_NAT_DONE`.
pub const IPS_DST_NAT_DONE: u32 = 1 << 8;
/// `IPS_CONFIRMED`: the entry is in the conntrack table (set when the first packet
/// leaves the last netfilter hook).
pub const IPS_CONFIRMED: u32 = 1 << 3;

/// The kernel dropped a packet of a traced flow (`kfree_skb` with a drop reason).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropEvent {
    pub header: EventHeader,
    /// Cookie of the socket whose flow the packet belongs to, when the packet still
    /// carried its socket; 0 otherwise (forwarded and incoming packets): userspace then
    /// finds the flow by [`flow_src`](Self::flow_src) and [`flow_dst`](Self::flow_dst).
    pub sock_cookie: u64,
    /// Code address that dropped it (symbolised through `/proc/kallsyms`).
    pub location: u64,
    /// `enum skb_drop_reason` value; its name comes from the kernel's BTF.
    pub reason: u32,
    /// [`DROP_DIRECTION_ORIGINAL`] or [`DROP_DIRECTION_REPLY`].
    pub direction: u8,
    pub protocol: u8,
    /// The packet's conntrack state: [`DROP_CT_ENTRY`], [`DROP_CT_NONE`]…
    pub conntrack: u8,
    pub _pad: u8,
    /// The packet's own source and destination (after any NAT already applied).
    pub src: Endpoint,
    pub dst: Endpoint,
    /// The low 32 bits of the conntrack entry's `status` (`IPS_*`), when it had one.
    pub ct_status: u32,
    /// Inode of the network namespace of the device the packet was on (0: unknown).
    pub netns: u32,
    /// The flow the packet belongs to, as the pod's socket sent its first packet: the
    /// source is the pod's side, and neither end has been rewritten by NAT (for a packet
    /// NAT rewrote, this is its conntrack entry's original tuple).
    pub flow_src: Endpoint,
    pub flow_dst: Endpoint,
}

/// How many bytes of a DNS message the kernel copies (a classic UDP DNS message's limit;
/// longer messages arrive truncated, flagged by [`DnsEvent::payload_len`]).
pub const DNS_CAPTURE_BYTES: usize = 512;
/// [`DnsEvent::direction`]: the message left the process (a query).
pub const DNS_EGRESS: u8 = 0;
/// [`DnsEvent::direction`]: the message reached the process (a response).
pub const DNS_INGRESS: u8 = 1;

/// A DNS message (to or from port 53, over UDP or TCP) of a traced process, seen at its
/// cgroup's socket level, with a bounded prefix of its bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsEvent {
    pub header: EventHeader,
    /// Cookie of the socket that sent or received it.
    pub sock_cookie: u64,
    /// cgroup v2 id of that socket.
    pub cgroup_id: u64,
    /// [`DNS_EGRESS`] or [`DNS_INGRESS`].
    pub direction: u8,
    /// [`IPPROTO_UDP`] or [`IPPROTO_TCP`] (TCP payloads start with a 2-byte length).
    pub protocol: u8,
    /// Bytes of `data` that hold the message: `min(payload_len, DNS_CAPTURE_BYTES)`.
    pub captured: u16,
    /// Length of the transport payload in the packet.
    pub payload_len: u32,
    pub src: Endpoint,
    pub dst: Endpoint,
    /// For a response to a query the kernel held back (see [`DnsHeld`]): when that query
    /// left (`bpf_ktime_get_ns`); 0 otherwise.
    pub query_ns: u64,
    pub data: [u8; DNS_CAPTURE_BYTES],
}

/// DNS summaries: within one period (`SETTING_DNS_SUMMARY_MS`), a UDP exchange of a cgroup
/// whose query and response repeat ones the kernel already sent in that period is counted
/// in `DNS_REPEATS` instead of being sent; a query is held back in `DNS_HELD` until its
/// response shows whether the exchange repeats. Messages are compared by
/// [`dns_message_hash`].
///
/// Key of the LRU map `DNS_RECENT`: a message (by hash) that a cgroup sent or received;
/// the value is the period in which the kernel last sent it to userspace.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DnsRecentKey {
    pub cgroup_id: u64,
    pub hash: u64,
}

/// Capacity of `DNS_RECENT` (messages of all pods sent in the current period).
pub const DNS_RECENT_MAX: u32 = 65_536;

/// Key of `DNS_HELD`: a query held back, by its socket and DNS id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DnsHeldKey {
    pub sock_cookie: u64,
    pub id: u16,
    pub _pad: [u8; 6],
}

/// Value of `DNS_HELD`. Its response removes the entry; userspace removes entries whose
/// response is overdue (the query timed out), and whoever removes an entry accounts for
/// the query.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsHeld {
    pub sent_ns: u64,
    pub cgroup_id: u64,
    /// [`dns_message_hash`] of the query: the same query was sent to userspace in the
    /// period (that is why it is held), which learned its question from it.
    pub query_hash: u64,
    pub client: Endpoint,
    pub server: Endpoint,
}

/// Capacity of `DNS_HELD` (not LRU: an eviction would lose a query; when it is full,
/// queries are sent instead).
pub const DNS_HELD_MAX: u32 = 16_384;

/// Key of `DNS_REPEATS`: repeated exchanges counted per cgroup, query, server, response
/// code and duration bucket.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DnsRepeatKey {
    pub cgroup_id: u64,
    pub query_hash: u64,
    pub server: Endpoint,
    /// The response's RCODE (the low 4 bits of its fourth byte).
    pub rcode: u8,
    /// The exchange's duration as a bucket of the `egress_dns_duration_seconds`
    /// histogram (see [`dns_duration_bucket`]).
    pub bucket: u8,
    pub _pad: [u8; 2],
}

/// Upper bound of the first duration bucket; bucket `i` ends at this `<< i`, and the last
/// one is unbounded (the buckets of the `egress_dns_duration_seconds` histogram).
pub const DNS_DURATION_FIRST_BOUND_NS: u64 = 500_000;
/// Number of duration buckets, the unbounded one included.
pub const DNS_DURATION_BUCKETS: usize = 17;

/// Value of `DNS_REPEATS` (per CPU, totals since the key was added; userspace sums the
/// CPUs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsRepeatTotals {
    pub exchanges: u64,
    /// The exchanges' durations added up.
    pub duration_ns: u64,
}

/// Capacity of `DNS_REPEATS` (not LRU: when it is full, exchanges are sent instead);
/// userspace removes keys that stay idle.
pub const DNS_REPEAT_KEYS: u32 = 16_384;

/// The duration bucket of `duration_ns` (see [`DnsRepeatKey::bucket`]).
#[inline(always)]
pub fn dns_duration_bucket(duration_ns: u64) -> usize {
    let mut bucket = 0;
    while bucket < DNS_DURATION_BUCKETS - 1 && duration_ns > DNS_DURATION_FIRST_BOUND_NS << bucket {
        bucket += 1;
    }
    bucket
}

/// Most bytes of a message [`dns_message_hash`] reads after the 2-byte id: those of a
/// captured message.
pub const DNS_HASH_BYTES: usize = DNS_CAPTURE_BYTES - 2;

/// One step of [`dns_message_hash`]: mixes in 8 bytes of the message (little-endian,
/// zero-padded at the end). FNV-1a's multiplication over words, with a rotation so that
/// the high bits of a word reach every bit of the hash; not collision-resistant against
/// a pod that crafts messages, which could at worst hide its own repeats.
#[inline(always)]
pub fn dns_hash_step(hash: u64, word: u64) -> u64 {
    (hash ^ word)
        .wrapping_mul(0x0000_0100_0000_01b3)
        .rotate_left(29)
}

/// Where [`dns_message_hash`] starts.
pub const DNS_HASH_SEED: u64 = 0xcbf2_9ce4_8422_2325;

/// Hash of a DNS message without its id (`message[2..]`, at most [`DNS_HASH_BYTES`]
/// of it) and with the payload's full length: two messages that differ only in their
/// id hash the same. The kernel computes the same over the packet.
pub fn dns_message_hash(message: &[u8], payload_len: u32) -> u64 {
    let body = message.get(2..).unwrap_or_default();
    let body = &body[..body.len().min(DNS_HASH_BYTES)];
    let mut hash = DNS_HASH_SEED;
    for chunk in body.chunks(8) {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        hash = dns_hash_step(hash, u64::from_le_bytes(word));
    }
    dns_hash_step(hash, u64::from(payload_len))
}

/// Where a packet's conntrack entry and its tuples are, resolved from BTF at load time
/// (`struct nf_conn` comes from the `nf_conntrack` module's BTF when it is a module).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConntrackOffsets {
    /// `sk_buff._nfct`: the `nf_conn` pointer, with the ctinfo in its low 3 bits.
    pub nfct: u32,
    /// `nf_conn.tuplehash`: the original direction's `nf_conntrack_tuple_hash`.
    pub tuplehash: u32,
    /// `nf_conntrack_tuple_hash.tuple`.
    pub tuple: u32,
    /// `nf_conn.status`.
    pub status: u32,
}

/// Layout of `struct nf_conntrack_tuple` the drop program reads (it copies the 40-byte
/// tuple whole and indexes it with constants, which the verifier can check). Userspace
/// checks these against the running kernel's BTF and leaves conntrack off if they differ.
pub mod nf_tuple {
    /// `src.u3`: the source address (`union nf_inet_addr`, 16 bytes).
    pub const SRC_ADDR: usize = 0;
    /// `src.u.all`: the source port.
    pub const SRC_PORT: usize = 16;
    /// `src.l3num`: the address family.
    pub const L3NUM: usize = 18;
    /// `dst.u3`.
    pub const DST_ADDR: usize = 20;
    /// `dst.u.all`.
    pub const DST_PORT: usize = 36;
    /// `dst.protonum`.
    pub const PROTONUM: usize = 38;
    /// `sizeof(struct nf_conntrack_tuple)`.
    pub const SIZE: usize = 40;
}

/// Values of `enum skb_drop_reason` the drop program needs, resolved by name from BTF
/// (they differ between kernels).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropReasons {
    /// `SKB_DROP_REASON_NOT_SPECIFIED`: reasons at or below it (`SKB_CONSUMED`…) are not
    /// drops worth reporting.
    pub not_specified: u32,
    /// `SKB_DROP_REASON_QUEUE_PURGE`: a closing socket freeing what nobody will read, not
    /// a drop on the path (`u32::MAX` on kernels without it).
    pub queue_purge: u32,
}

/// What the drop program reads beyond the packet, resolved from BTF at load time: the
/// network namespace (`skb->dev->nd_net.net->ns.inum`) and the packet's socket
/// (`skb->sk`, whose cookie, at [`SockOffsets::cookie`], names packets dropped before
/// they reached the cgroup hooks). All zero when not resolvable: neither is reported.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropOffsets {
    /// `sk_buff.dev`.
    pub skb_dev: u32,
    /// `net_device.nd_net.net`.
    pub dev_net: u32,
    /// `net.ns.inum`.
    pub net_inum: u32,
    /// `sk_buff.sk`.
    pub skb_sk: u32,
    /// `sock.__sk_common.skc_net.net`: the namespace of packets without a device yet.
    pub sk_net: u32,
}

/// Field offsets inside the kernel's `struct sk_buff`, resolved from BTF at load time.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SkbOffsets {
    /// `unsigned char *head`.
    pub head: u32,
    /// `__u16 network_header`, relative to `head`.
    pub network_header: u32,
    /// `__u16 transport_header`, relative to `head`.
    pub transport_header: u32,
    pub _pad: u32,
}

/// Kernel text ranges `[start, end)` of functions, resolved from `/proc/kallsyms`, used to
/// recognise a tracepoint's caller cheaply.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IcmpReceivers {
    pub icmp_rcv_start: u64,
    pub icmp_rcv_end: u64,
    pub icmpv6_rcv_start: u64,
    pub icmpv6_rcv_end: u64,
}

/// Field offsets inside the kernel's `struct sock`, resolved at load time from the
/// running kernel's BTF (`/sys/kernel/btf/vmlinux`) and handed to the programs as the
/// global `SOCK_OFFSETS`. Rust eBPF has no CO-RE relocations, so this is how the programs
/// stay portable across kernel builds.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockOffsets {
    pub family: u32,
    pub num: u32,
    pub dport: u32,
    pub rcv_saddr: u32,
    pub daddr: u32,
    pub v6_rcv_saddr: u32,
    pub v6_daddr: u32,
    /// `struct sock.sk_err`.
    pub err: u32,
    /// `struct sock.sk_err_soft`.
    pub err_soft: u32,
    /// `struct tcp_sock.total_retrans`.
    pub total_retrans: u32,
    /// `struct sock.__sk_common.skc_cookie`: the socket's cookie, 0 until something asked
    /// for it (as `connect4` did for every traced socket).
    pub cookie: u32,
    /// `struct sock.__sk_common.skc_state` (one byte).
    pub state: u32,
    /// `struct sock.sk_protocol` (two bytes).
    pub protocol: u32,
    /// `struct tcp_sock.rcv_nxt`: 0 from `connect()` until an answer to the SYN
    /// establishes the connection.
    pub rcv_nxt: u32,
    /// `struct tcp_sock.snd_una`: the SYN's sequence number until it is acknowledged.
    pub snd_una: u32,
    /// `struct sock.sk_cgrp_data.cgroup`, `struct cgroup.kn` and `struct kernfs_node.id`:
    /// the cgroup id of the socket's creator, as `bpf_get_current_cgroup_id` gives it.
    pub cgroup: u32,
    pub cgroup_kn: u32,
    pub kn_id: u32,
    /// `struct cgroup.level` and `struct cgroup.ancestors`: the cgroup's depth, and its
    /// ancestors from the root down to itself, to tell a pod's socket from the node's.
    pub cgroup_level: u32,
    pub cgroup_ancestors: u32,
}

/// Indexes of the per-CPU `COUNTERS` array. Counted in the kernel so that totals stay
/// exact even when the ring buffer is full and events are lost.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// `connect()` calls, and first sends of unconnected UDP sockets to a destination, of
    /// traced processes (IPv4 and IPv6, TCP and UDP).
    ConnectSeen = 0,
    /// [`ConnectEvent`]s that could not be written because the ring buffer was full.
    ConnectLost = 1,
    /// `SYN_SENT` exits seen on traced sockets.
    SockStateSeen = 2,
    /// [`SockStateEvent`]s lost to a full ring buffer.
    SockStateLost = 3,
    /// First packets of traced sockets seen at cgroup egress.
    FirstPacketSeen = 4,
    /// [`FirstPacketEvent`]s lost to a full ring buffer.
    FirstPacketLost = 5,
    /// ICMP errors about TCP or UDP packets received.
    IcmpErrorSeen = 6,
    /// [`IcmpErrorEvent`]s lost to a full ring buffer.
    IcmpErrorLost = 7,
    /// Packets of traced flows dropped by the kernel.
    DropSeen = 8,
    /// [`DropEvent`]s lost to a full ring buffer.
    DropLost = 9,
    /// DNS messages of traced processes.
    DnsSeen = 10,
    /// [`DnsEvent`]s lost to a full ring buffer.
    DnsLost = 11,
    /// Handshakes that could not be counted in the `HANDSHAKES` map because it was full.
    HandshakeUncounted = 12,
}

impl Counter {
    /// Number of counters, i.e. the size of the `COUNTERS` array.
    pub const COUNT: u32 = 13;
    /// All counters, in index order.
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Self::ConnectSeen,
        Self::ConnectLost,
        Self::SockStateSeen,
        Self::SockStateLost,
        Self::FirstPacketSeen,
        Self::FirstPacketLost,
        Self::IcmpErrorSeen,
        Self::IcmpErrorLost,
        Self::DropSeen,
        Self::DropLost,
        Self::DnsSeen,
        Self::DnsLost,
        Self::HandshakeUncounted,
    ];
}

/// Index in the `SETTINGS` array: 1 when only the cgroups in `TRACED_CGROUPS` are traced
/// (tracing one pod), 0 when every process is.
pub const SETTING_CGROUP_FILTER: u32 = 0;
/// Index in the `SETTINGS` array: the length of a DNS summary period in milliseconds (see
/// [`DnsRecentKey`]); 0 sends every DNS message.
pub const SETTING_DNS_SUMMARY_MS: u32 = 1;
/// Number of entries in the `SETTINGS` array.
pub const SETTINGS_COUNT: u32 = 2;
/// Capacity of the `TRACED_CGROUPS` map (cgroups of the traced pods).
pub const TRACED_CGROUPS_MAX: u32 = 4096;

/// Size of the `EVENTS` ring buffer in bytes (a power of two, a multiple of the page size).
pub const RING_BUFFER_BYTES: u32 = 1 << 22;
/// Capacity of the LRU map of (unconnected UDP socket, destination) pairs already reported.
pub const UDP_DESTINATIONS: u32 = 65_536;

/// Key of that map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketDestination {
    pub sock_cookie: u64,
    pub dst: Endpoint,
    pub _pad: [u8; 4],
}

/// Capacity of the LRU map of connected UDP sockets whose first datagram is awaited.
pub const PENDING_UDP_SOCKETS: u32 = 65_536;
/// Capacity of the map of the pod cgroup roots the programs are attached to (a node has
/// one or two; test labs running side by side add theirs).
pub const POD_CGROUP_ROOTS_MAX: u32 = 64;
/// Capacity of the LRU map of failing TCP handshakes (answered by a reset, or reported
/// failed before the socket's destruction).
pub const FAILING_HANDSHAKES_MAX: u32 = 16_384;
/// Capacity of the LRU map of the traced pods' addresses (a node's pods, each with an
/// IPv4 and an IPv6 address, and the node's own addresses for host-network pods).
pub const POD_ADDRESSES_MAX: u32 = 4096;

/// Key of the `HANDSHAKES` map: the TCP handshakes of traced processes counted in the
/// kernel per cgroup, destination address and outcome, so connection metrics stay exact
/// when the ring buffer overflows and events are lost.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HandshakeKey {
    pub cgroup_id: u64,
    /// IPv4 addresses use the first 4 bytes.
    pub addr: [u8; 16],
    pub family: u16,
    /// One of the `HANDSHAKE_*` outcomes.
    pub outcome: u8,
    pub _pad: [u8; 5],
}

/// Value of the `HANDSHAKES` map (per CPU; userspace sums the CPUs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HandshakeTotals {
    pub handshakes: u64,
    pub syn_retransmits: u64,
}

/// Capacity of the `HANDSHAKES` map; userspace removes keys that stay idle.
pub const HANDSHAKE_KEYS: u32 = 65_536;

/// The handshake completed.
pub const HANDSHAKE_ESTABLISHED: u8 = 0;
/// Answered with a reset (`ECONNREFUSED`).
pub const HANDSHAKE_REFUSED: u8 = 1;
/// No answer: `ETIMEDOUT`, or closed by the application after SYN retransmissions.
pub const HANDSHAKE_TIMEOUT: u8 = 2;
/// An ICMP-reported error (see [`is_unreachable_errno`]).
pub const HANDSHAKE_UNREACHABLE: u8 = 3;
/// Closed by the application before any retransmission.
pub const HANDSHAKE_ABORTED: u8 = 4;
/// Another socket error.
pub const HANDSHAKE_FAILED: u8 = 5;

/// The outcome of a handshake from the state the socket left `SYN_SENT` for, its error
/// (`sk_err`), soft error (`sk_err_soft`, e.g. an ICMP unreachable while retrying) and
/// SYN retransmissions. Shared by the kernel's counts and userspace's records.
#[inline(always)]
pub fn handshake_outcome(new_state: u8, error: i32, soft_error: i32, syn_retransmits: u32) -> u8 {
    const ECONNREFUSED: i32 = 111;
    const ETIMEDOUT: i32 = 110;
    if new_state == TCP_ESTABLISHED {
        return HANDSHAKE_ESTABLISHED;
    }
    let errno = if error != 0 { error } else { soft_error };
    match errno {
        ECONNREFUSED => HANDSHAKE_REFUSED,
        ETIMEDOUT => HANDSHAKE_TIMEOUT,
        0 if syn_retransmits > 0 => HANDSHAKE_TIMEOUT,
        0 => HANDSHAKE_ABORTED,
        e if is_unreachable_errno(e) => HANDSHAKE_UNREACHABLE,
        _ => HANDSHAKE_FAILED,
    }
}

/// Errors the kernel derives from ICMP destination-unreachable messages
/// (`icmp_err_convert`, `icmpv6_err_convert`).
#[inline(always)]
pub fn is_unreachable_errno(errno: i32) -> bool {
    const EACCES: i32 = 13;
    const ENONET: i32 = 64;
    const EPROTO: i32 = 71;
    const EMSGSIZE: i32 = 90;
    const EOPNOTSUPP: i32 = 95;
    const ENETUNREACH: i32 = 101;
    const EHOSTDOWN: i32 = 112;
    const EHOSTUNREACH: i32 = 113;
    matches!(
        errno,
        EACCES | ENONET | EPROTO | EMSGSIZE | EOPNOTSUPP | ENETUNREACH | EHOSTUNREACH | EHOSTDOWN
    )
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all these types are `#[repr(C)]`, `Copy`, contain only integers and byte
    // arrays, and have explicit padding fields, so every bit pattern is valid.
    unsafe impl aya::Pod for super::EventHeader {}
    unsafe impl aya::Pod for super::Endpoint {}
    unsafe impl aya::Pod for super::ConnectEvent {}
    unsafe impl aya::Pod for super::SockStateEvent {}
    unsafe impl aya::Pod for super::FirstPacketEvent {}
    unsafe impl aya::Pod for super::IcmpErrorEvent {}
    unsafe impl aya::Pod for super::DropEvent {}
    unsafe impl aya::Pod for super::DnsEvent {}
    unsafe impl aya::Pod for super::HandshakeKey {}
    unsafe impl aya::Pod for super::HandshakeTotals {}
    unsafe impl aya::Pod for super::DnsRecentKey {}
    unsafe impl aya::Pod for super::DnsHeldKey {}
    unsafe impl aya::Pod for super::DnsHeld {}
    unsafe impl aya::Pod for super::DnsRepeatKey {}
    unsafe impl aya::Pod for super::DnsRepeatTotals {}
    unsafe impl aya::Pod for super::ConntrackOffsets {}
    unsafe impl aya::Pod for super::DropReasons {}
    unsafe impl aya::Pod for super::FlowTuple {}
    unsafe impl aya::Pod for super::SocketDestination {}
    unsafe impl aya::Pod for super::SkbOffsets {}
    unsafe impl aya::Pod for super::DropOffsets {}
    unsafe impl aya::Pod for super::IcmpReceivers {}
    unsafe impl aya::Pod for super::SockOffsets {}
}

#[cfg(test)]
mod tests {
    use core::mem::{align_of, offset_of, size_of};

    use super::*;

    #[test]
    fn header_layout() {
        assert_eq!(size_of::<EventHeader>(), 16);
        assert_eq!(align_of::<EventHeader>(), 8);
        assert_eq!(offset_of!(EventHeader, kind), 0);
        assert_eq!(offset_of!(EventHeader, cpu), 4);
        assert_eq!(offset_of!(EventHeader, ts_ns), 8);
    }

    #[test]
    fn handshake_map_layout() {
        assert_eq!(size_of::<HandshakeKey>(), 32);
        assert_eq!(offset_of!(HandshakeKey, cgroup_id), 0);
        assert_eq!(offset_of!(HandshakeKey, addr), 8);
        assert_eq!(offset_of!(HandshakeKey, family), 24);
        assert_eq!(offset_of!(HandshakeKey, outcome), 26);
        assert_eq!(size_of::<HandshakeTotals>(), 16);
        assert_eq!(offset_of!(HandshakeTotals, syn_retransmits), 8);
    }

    #[test]
    fn handshake_outcomes() {
        assert_eq!(
            handshake_outcome(TCP_ESTABLISHED, 0, 0, 2),
            HANDSHAKE_ESTABLISHED
        );
        assert_eq!(handshake_outcome(TCP_CLOSE, 111, 0, 0), HANDSHAKE_REFUSED);
        assert_eq!(handshake_outcome(TCP_CLOSE, 110, 0, 6), HANDSHAKE_TIMEOUT);
        assert_eq!(handshake_outcome(TCP_CLOSE, 0, 0, 1), HANDSHAKE_TIMEOUT);
        assert_eq!(handshake_outcome(TCP_CLOSE, 0, 0, 0), HANDSHAKE_ABORTED);
        // The soft error explains a close the application made while the kernel retried.
        assert_eq!(
            handshake_outcome(TCP_CLOSE, 0, 113, 3),
            HANDSHAKE_UNREACHABLE
        );
        assert_eq!(
            handshake_outcome(TCP_CLOSE, 113, 0, 0),
            HANDSHAKE_UNREACHABLE
        );
        assert_eq!(handshake_outcome(TCP_CLOSE, 1, 0, 0), HANDSHAKE_FAILED);
    }

    #[test]
    fn endpoint_layout() {
        assert_eq!(size_of::<Endpoint>(), 20);
        assert_eq!(offset_of!(Endpoint, family), 0);
        assert_eq!(offset_of!(Endpoint, port), 2);
        assert_eq!(offset_of!(Endpoint, addr), 4);
    }

    #[test]
    fn connect_event_layout() {
        assert_eq!(size_of::<ConnectEvent>(), 88);
        assert_eq!(offset_of!(ConnectEvent, header), 0);
        assert_eq!(offset_of!(ConnectEvent, cgroup_id), 16);
        assert_eq!(offset_of!(ConnectEvent, sock_cookie), 24);
        assert_eq!(offset_of!(ConnectEvent, pid), 32);
        assert_eq!(offset_of!(ConnectEvent, tid), 36);
        assert_eq!(offset_of!(ConnectEvent, comm), 40);
        assert_eq!(offset_of!(ConnectEvent, protocol), 56);
        assert_eq!(offset_of!(ConnectEvent, call), 57);
        assert_eq!(offset_of!(ConnectEvent, dst), 64);
    }

    #[test]
    fn sock_state_event_layout() {
        assert_eq!(size_of::<SockStateEvent>(), 80);
        assert_eq!(offset_of!(SockStateEvent, sock_cookie), 16);
        assert_eq!(offset_of!(SockStateEvent, old_state), 24);
        assert_eq!(offset_of!(SockStateEvent, new_state), 25);
        assert_eq!(offset_of!(SockStateEvent, reply_tcp_flags), 26);
        assert_eq!(offset_of!(SockStateEvent, reply_ttl), 27);
        assert_eq!(offset_of!(SockStateEvent, error), 28);
        assert_eq!(offset_of!(SockStateEvent, soft_error), 32);
        assert_eq!(offset_of!(SockStateEvent, syn_retransmits), 36);
        assert_eq!(offset_of!(SockStateEvent, src), 40);
        assert_eq!(offset_of!(SockStateEvent, dst), 60);
    }

    #[test]
    fn first_packet_event_layout() {
        assert_eq!(size_of::<FirstPacketEvent>(), 72);
        assert_eq!(offset_of!(FirstPacketEvent, sock_cookie), 16);
        assert_eq!(offset_of!(FirstPacketEvent, protocol), 24);
        assert_eq!(offset_of!(FirstPacketEvent, src), 32);
        assert_eq!(offset_of!(FirstPacketEvent, dst), 52);
    }

    #[test]
    fn icmp_error_event_layout() {
        assert_eq!(size_of::<IcmpErrorEvent>(), 88);
        assert_eq!(offset_of!(IcmpErrorEvent, icmp_type), 16);
        assert_eq!(offset_of!(IcmpErrorEvent, icmp_code), 17);
        assert_eq!(offset_of!(IcmpErrorEvent, protocol), 18);
        assert_eq!(offset_of!(IcmpErrorEvent, mtu), 20);
        assert_eq!(offset_of!(IcmpErrorEvent, sender), 24);
        assert_eq!(offset_of!(IcmpErrorEvent, src), 44);
        assert_eq!(offset_of!(IcmpErrorEvent, dst), 64);
    }

    #[test]
    fn drop_event_layout() {
        assert_eq!(size_of::<DropEvent>(), 128);
        assert_eq!(offset_of!(DropEvent, sock_cookie), 16);
        assert_eq!(offset_of!(DropEvent, location), 24);
        assert_eq!(offset_of!(DropEvent, reason), 32);
        assert_eq!(offset_of!(DropEvent, direction), 36);
        assert_eq!(offset_of!(DropEvent, protocol), 37);
        assert_eq!(offset_of!(DropEvent, src), 40);
        assert_eq!(offset_of!(DropEvent, conntrack), 38);
        assert_eq!(offset_of!(DropEvent, dst), 60);
        assert_eq!(offset_of!(DropEvent, ct_status), 80);
        assert_eq!(offset_of!(DropEvent, netns), 84);
        assert_eq!(offset_of!(DropEvent, flow_src), 88);
        assert_eq!(offset_of!(DropEvent, flow_dst), 108);
    }

    #[test]
    fn dns_event_layout() {
        assert_eq!(size_of::<DnsEvent>(), 600);
        assert_eq!(offset_of!(DnsEvent, sock_cookie), 16);
        assert_eq!(offset_of!(DnsEvent, cgroup_id), 24);
        assert_eq!(offset_of!(DnsEvent, direction), 32);
        assert_eq!(offset_of!(DnsEvent, protocol), 33);
        assert_eq!(offset_of!(DnsEvent, captured), 34);
        assert_eq!(offset_of!(DnsEvent, payload_len), 36);
        assert_eq!(offset_of!(DnsEvent, src), 40);
        assert_eq!(offset_of!(DnsEvent, dst), 60);
        assert_eq!(offset_of!(DnsEvent, query_ns), 80);
        assert_eq!(offset_of!(DnsEvent, data), 88);
    }

    #[test]
    fn dns_summary_maps_layout() {
        assert_eq!(size_of::<DnsRecentKey>(), 16);
        assert_eq!(offset_of!(DnsRecentKey, hash), 8);
        assert_eq!(size_of::<DnsHeldKey>(), 16);
        assert_eq!(offset_of!(DnsHeldKey, id), 8);
        assert_eq!(size_of::<DnsHeld>(), 64);
        assert_eq!(offset_of!(DnsHeld, cgroup_id), 8);
        assert_eq!(offset_of!(DnsHeld, query_hash), 16);
        assert_eq!(offset_of!(DnsHeld, client), 24);
        assert_eq!(offset_of!(DnsHeld, server), 44);
        assert_eq!(size_of::<DnsRepeatKey>(), 40);
        assert_eq!(offset_of!(DnsRepeatKey, query_hash), 8);
        assert_eq!(offset_of!(DnsRepeatKey, server), 16);
        assert_eq!(offset_of!(DnsRepeatKey, rcode), 36);
        assert_eq!(offset_of!(DnsRepeatKey, bucket), 37);
        assert_eq!(size_of::<DnsRepeatTotals>(), 16);
        assert_eq!(offset_of!(DnsRepeatTotals, duration_ns), 8);
    }

    #[test]
    fn dns_duration_buckets_match_the_histogram() {
        assert_eq!(dns_duration_bucket(0), 0);
        assert_eq!(dns_duration_bucket(500_000), 0);
        assert_eq!(dns_duration_bucket(500_001), 1);
        assert_eq!(dns_duration_bucket(1_000_000), 1);
        assert_eq!(dns_duration_bucket(3_000_000), 3);
        assert_eq!(dns_duration_bucket(500_000 << 15), 15);
        assert_eq!(dns_duration_bucket((500_000 << 15) + 1), 16);
        assert_eq!(dns_duration_bucket(u64::MAX), 16);
    }

    #[test]
    fn dns_hash_ignores_the_id_and_sees_every_byte() {
        let query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03api\x07example\x04test\x00\x00\x01\x00\x01";
        let mut other_id = *query;
        other_id[..2].copy_from_slice(&[0xab, 0xcd]);
        let len = query.len() as u32;
        assert_eq!(
            dns_message_hash(query, len),
            dns_message_hash(&other_id, len)
        );
        // Every byte after the id matters, the zero-padded tail's included.
        for at in 2..query.len() {
            let mut changed = *query;
            changed[at] ^= 0x80;
            assert_ne!(
                dns_message_hash(query, len),
                dns_message_hash(&changed, len),
                "byte {at}"
            );
        }
        // So does the payload's length beyond what was read.
        assert_ne!(
            dns_message_hash(query, len),
            dns_message_hash(query, len + 1)
        );
    }

    #[test]
    fn dns_capture_length_is_a_power_of_two() {
        // The kernel program bounds its copy length with a mask.
        assert!(DNS_CAPTURE_BYTES.is_power_of_two());
    }

    #[test]
    fn conntrack_offsets_layout() {
        assert_eq!(size_of::<ConntrackOffsets>(), 16);
        assert_eq!(offset_of!(ConntrackOffsets, status), 12);
    }

    #[test]
    fn flow_tuple_layout() {
        assert_eq!(size_of::<FlowTuple>(), 40);
        assert_eq!(offset_of!(FlowTuple, src_port), 4);
        assert_eq!(offset_of!(FlowTuple, dst_port), 6);
        assert_eq!(offset_of!(FlowTuple, src), 8);
        assert_eq!(offset_of!(FlowTuple, dst), 24);
    }

    #[test]
    fn globals_layout() {
        assert_eq!(size_of::<DropReasons>(), 8);
        assert_eq!(offset_of!(DropReasons, queue_purge), 4);
        assert_eq!(size_of::<SkbOffsets>(), 16);
        assert_eq!(size_of::<DropOffsets>(), 20);
        assert_eq!(offset_of!(DropOffsets, sk_net), 16);
        assert_eq!(size_of::<IcmpReceivers>(), 32);
        assert_eq!(offset_of!(IcmpReceivers, icmpv6_rcv_end), 24);
    }

    #[test]
    fn sock_offsets_layout() {
        assert_eq!(size_of::<SockOffsets>(), 80);
        assert_eq!(offset_of!(SockOffsets, cgroup_ancestors), 76);
        assert_eq!(offset_of!(SockOffsets, state), 44);
        assert_eq!(offset_of!(SockOffsets, rcv_nxt), 52);
        assert_eq!(offset_of!(SockOffsets, snd_una), 56);
        assert_eq!(offset_of!(SockOffsets, kn_id), 68);
        assert_eq!(offset_of!(SockOffsets, v6_daddr), 24);
        assert_eq!(offset_of!(SockOffsets, total_retrans), 36);
        assert_eq!(offset_of!(SockOffsets, cookie), 40);
    }

    #[test]
    fn event_kind_round_trips() {
        for kind in [
            EventKind::Connect,
            EventKind::SockState,
            EventKind::FirstPacket,
            EventKind::IcmpError,
            EventKind::Drop,
            EventKind::Dns,
        ] {
            assert_eq!(EventKind::from_raw(kind as u32), Some(kind));
        }
        assert_eq!(EventKind::from_raw(0), None);
        assert_eq!(EventKind::from_raw(99), None);
    }

    #[test]
    fn counters_are_dense() {
        for (index, counter) in Counter::ALL.iter().enumerate() {
            assert_eq!(*counter as usize, index);
        }
    }
}
