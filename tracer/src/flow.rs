//! Flow assembly: joins the kernel events of one egress attempt into one record.
//!
//! - A TCP attempt starts with its `connect()`, learns its source address and port from
//!   its first SYN, and ends when its socket leaves `SYN_SENT`; that transition says how
//!   it ended ([`Outcome`]).
//! - A UDP attempt starts with its `connect()` and is an attempt once its first datagram
//!   leaves; it is reported [`UDP_SETTLE`] after the connect, or sooner when a fatal ICMP
//!   error answers it. A connected UDP socket that sent nothing by then was an
//!   address-selection probe (`getaddrinfo` makes those) and is counted, not reported.
//! - An unconnected UDP socket's first send to a destination is an attempt of its own,
//!   reported like a connected socket's.
//! - ICMP errors and drops of forwarded packets are matched to attempts by the tuple their
//!   packet carries.
//!
//! A record does not depend on the order in which its evidence arrives. The kernel does
//! not report it in one order: a socket whose SYN an ICMP error rejects is closed inside
//! `icmp_rcv()` before the ICMP event is taken, unless the application held the socket's
//! lock at that moment. So a failed attempt is held for [`EVIDENCE_WAIT`] of kernel time
//! after its ending, measured against how far the events have been read
//! ([`FlowAssembler::expire`]), and judged only when it leaves; of several ICMP errors a
//! fatal one (of equals the earliest) is kept, of several drops the earliest. Evidence naming a tuple that no attempt has yet waits as
//! long for it. Successful attempts are reported at once, and so is a failed attempt that
//! its socket's next `connect()` displaces: evidence that comes after either is counted
//! as unmatched, not joined.
//!
//! Memory is bounded: at most [`MAX_PENDING`] attempts wait, and none longer than
//! [`MAX_TCP_WAIT`]; beyond either limit an attempt is emitted early (outcome
//! `in-progress`) and counted in [`FlowStats::evicted`]. At most [`MAX_UNMATCHED`]
//! unmatched pieces of evidence wait; beyond that they are counted at once.

use std::{
    cmp::Reverse,
    collections::{VecDeque, hash_map::Entry},
    hash::{Hash, Hasher},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use foldhash::HashMap;
use serde::Serialize;
use tracer_common::{
    AF_INET6, CALL_SENDMSG, ConnectEvent, DropEvent, FirstPacketEvent, IPPROTO_TCP, IPPROTO_UDP,
    IcmpErrorEvent, SockStateEvent, TCP_ESTABLISHED, TCP_FLAG_RST, handshake_outcome,
};

use crate::{
    capture::{PacketDrop, comm, socket_addr},
    conntrack::{Translation, snat::SnatUsage},
    verdict::Verdict,
};

/// How long after its connect a UDP attempt is reported (ICMP errors come back within
/// this); a socket that sent nothing by then counts as a probe.
pub const UDP_SETTLE: Duration = Duration::from_secs(1);
/// Longest a TCP attempt waits for its handshake to end (the kernel gives up after about
/// 130 s with default `tcp_syn_retries`).
pub const MAX_TCP_WAIT: Duration = Duration::from_secs(300);
/// Most attempts held at once.
pub const MAX_PENDING: usize = 65_536;
/// How long, in kernel time, a failed attempt waits after its ending for evidence still
/// on its way (an ICMP error taken after the socket closed, a retransmission dropped on
/// another CPU: microseconds apart in practice).
pub const EVIDENCE_WAIT: Duration = Duration::from_millis(250);
/// Most ICMP errors and drops held while no attempt has their tuple.
pub const MAX_UNMATCHED: usize = 4_096;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
        }
    }

    /// The protocol of an IP protocol number, if it is TCP or UDP.
    fn of_number(number: u8) -> Option<Self> {
        match number {
            IPPROTO_TCP => Some(Protocol::Tcp),
            IPPROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }
}

/// How an attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// TCP handshake completed.
    Established,
    /// The destination (or something on the path) answered the SYN with a reset, or a
    /// UDP datagram with ICMP port unreachable.
    Refused,
    /// No answer to the SYN: the kernel gave up (`ETIMEDOUT`), or the application gave up
    /// after at least one SYN retransmission.
    Timeout,
    /// The handshake failed with an ICMP-reported error (host/net unreachable,
    /// administratively prohibited…); `error` names it.
    Unreachable,
    /// The application closed the socket before the handshake ended and before any
    /// retransmission.
    Aborted,
    /// The handshake failed with another error; `error` names it.
    Failed,
    /// A UDP datagram left the socket (UDP has no handshake to judge).
    Sent,
    /// Still unresolved when tracing stopped or the wait limit was reached.
    InProgress,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Established => "established",
            Outcome::Refused => "refused",
            Outcome::Timeout => "timeout",
            Outcome::Unreachable => "unreachable",
            Outcome::Aborted => "aborted",
            Outcome::Failed => "failed",
            Outcome::Sent => "sent",
            Outcome::InProgress => "in-progress",
        }
    }

    /// The outcome for a `tracer_common::HANDSHAKE_*` code.
    pub fn of_handshake(code: u8) -> Self {
        match code {
            tracer_common::HANDSHAKE_ESTABLISHED => Outcome::Established,
            tracer_common::HANDSHAKE_REFUSED => Outcome::Refused,
            tracer_common::HANDSHAKE_TIMEOUT => Outcome::Timeout,
            tracer_common::HANDSHAKE_UNREACHABLE => Outcome::Unreachable,
            tracer_common::HANDSHAKE_ABORTED => Outcome::Aborted,
            _ => Outcome::Failed,
        }
    }

    pub fn is_failure(self) -> bool {
        !matches!(
            self,
            Outcome::Established | Outcome::Sent | Outcome::InProgress
        )
    }
}

/// What the kernel said about a TCP handshake.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpHandshake {
    /// SYNs retransmitted before the handshake ended.
    pub syn_retransmits: u32,
    /// From `connect()` to the end of the handshake.
    pub duration: Option<Duration>,
    /// The socket error the handshake ended with (`ECONNREFUSED`…), if any.
    pub errno: Option<i32>,
    /// Whether the application, not the kernel, ended a failed handshake.
    pub closed_by_application: bool,
}

/// Who made the attempt.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Origin {
    /// `namespace/name` of the pod, `None` for host processes and unknown pods.
    pub pod: Option<String>,
    /// The pod UID from the cgroup path, even when the pod itself is unknown.
    pub pod_uid: Option<String>,
    /// The container, from the cgroup path (and its name from the pod's status).
    pub container: Option<ContainerRef>,
}

/// A container of a pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ContainerRef {
    /// The container's name in the pod, when the pod's status lists it.
    pub name: Option<String>,
    /// The runtime's container id.
    pub id: String,
}

/// One egress attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attempt {
    /// `CLOCK_MONOTONIC` nanoseconds of the `connect()`.
    pub monotonic_ns: u64,
    /// Shared: every attempt of a cgroup has the same origin.
    pub origin: Arc<Origin>,
    pub pid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    /// The socket's cookie (joins the socket's other events).
    pub sock_cookie: u64,
    pub protocol: Protocol,
    /// Source chosen by the kernel, when the kernel revealed it.
    pub src: Option<SocketAddr>,
    pub dst: SocketAddr,
    /// The name the process looked up for `dst`, when DNS named it.
    pub dst_name: Option<String>,
    pub outcome: Outcome,
    /// TCP only.
    pub tcp: Option<TcpHandshake>,
    /// The ICMP error that answered the attempt, if any.
    pub icmp: Option<IcmpError>,
    /// Packets of the attempt the kernel dropped.
    /// Boxed (like `verdict`): rare, large, and every held attempt has the field.
    pub drops: Option<Box<Drops>>,
    /// What the node's NAT made of its addresses.
    pub nat: Option<Translation>,
    /// The Service `dst` is, with the backend the node's DNAT chose.
    pub service: Option<ServiceTarget>,
    /// The first answer to its SYN.
    pub reply: Option<HandshakeReply>,
    /// The node's SNAT port usage towards the attempt's destination, for translated
    /// attempts.
    pub snat: Option<SnatUsage>,
    /// Which hop stopped it (or that none did).
    pub verdict: Option<Box<Verdict>>,
}

/// The first answer to a TCP attempt's SYN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandshakeReply {
    /// The TTL (hop limit) it arrived with.
    pub ttl: u8,
    /// A reset rather than a SYN-ACK.
    pub reset: bool,
    /// Hops to the destination as its earlier SYN-ACKs showed (filled in by the pipeline
    /// when an earlier connection to the same address succeeded).
    pub endpoint_hops: Option<u8>,
}

impl HandshakeReply {
    /// Hops the answer travelled: senders start from 64, 128 or 255.
    pub fn hops(&self) -> u8 {
        let initial = [64u8, 128, 255]
            .into_iter()
            .find(|initial| *initial >= self.ttl)
            .unwrap_or(255);
        initial - self.ttl
    }
}

/// A connection to a Service's cluster IP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceTarget {
    /// `namespace/name` of the Service.
    pub name: String,
    /// The backend the connection was translated to (from conntrack).
    pub backend: Option<SocketAddr>,
    /// `namespace/name` of the pod with the backend's address.
    pub backend_pod: Option<String>,
}

/// The drops of one attempt: the first in detail, and how many there were.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Drops {
    pub first: PacketDrop,
    pub count: u32,
}

/// Counts kept by the assembler.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    /// Attempts emitted early because a limit was reached.
    pub evicted: u64,
    /// Connected UDP sockets that never sent (address-selection probes).
    pub udp_probes: u64,
    /// ICMP errors about flows that are not pending attempts (finished, or not traced).
    pub unmatched_icmp: u64,
    /// Drops of traced pods' packets that match no pending attempt: its attempt was
    /// reported already, or the pod did not open the flow (it answers as a server).
    pub late_drops: u64,
}

/// An ICMP error attributed to an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpError {
    /// ICMPv6 rather than ICMP.
    pub v6: bool,
    pub icmp_type: u8,
    pub code: u8,
    /// Who sent it: a router on the path, or the destination itself.
    pub sender: IpAddr,
    /// Next-hop MTU of "fragmentation needed" / "packet too big".
    pub mtu: Option<u32>,
}

impl IcmpError {
    fn from_event(event: &IcmpErrorEvent) -> Option<Self> {
        Some(Self {
            v6: event.sender.family == AF_INET6,
            icmp_type: event.icmp_type,
            code: event.icmp_code,
            sender: socket_addr(&event.sender)?.ip(),
            mtu: (event.mtu != 0).then_some(event.mtu),
        })
    }

    /// A short name for the type and code (RFC 792, RFC 1812, RFC 4443).
    pub fn meaning(&self) -> &'static str {
        match (self.v6, self.icmp_type, self.code) {
            (false, 3, 0) => "net-unreachable",
            (false, 3, 1) => "host-unreachable",
            (false, 3, 2) => "protocol-unreachable",
            (false, 3, 3) => "port-unreachable",
            (false, 3, 4) => "fragmentation-needed",
            (false, 3, 9 | 10 | 13) => "admin-prohibited",
            (false, 3, _) => "unreachable",
            (false, 11, _) => "time-exceeded",
            (true, 1, 0) => "no-route",
            (true, 1, 1) => "admin-prohibited",
            (true, 1, 3) => "address-unreachable",
            (true, 1, 4) => "port-unreachable",
            (true, 1, 5 | 6) => "policy-failed",
            (true, 1, _) => "unreachable",
            (true, 2, _) => "packet-too-big",
            (true, 3, _) => "time-exceeded",
            _ => "other",
        }
    }

    /// Whether the destination host itself says nothing listens on the port.
    fn is_port_unreachable(&self) -> bool {
        matches!(
            (self.v6, self.icmp_type, self.code),
            (false, 3, 3) | (true, 1, 4)
        )
    }

    /// Whether the error ends a connection attempt (not a path-MTU hint).
    fn is_fatal(&self) -> bool {
        !matches!(
            (self.v6, self.icmp_type, self.code),
            (false, 3, 4) | (true, 2, _)
        )
    }
}

/// The tuple that names a flow in packets: what the first packet carried and what an
/// ICMP error embeds. Hashed as a few machine words: the derived hash of two
/// `SocketAddr`s was a tenth of the userspace cost of a connection (callgrind).
#[derive(Clone, Copy, PartialEq, Eq)]
struct FlowKey {
    protocol: Protocol,
    src: SocketAddr,
    dst: SocketAddr,
}

impl FlowKey {
    fn new(protocol: Protocol, src: SocketAddr, dst: SocketAddr) -> Self {
        Self { protocol, src, dst }
    }
}

impl Hash for FlowKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let address = |addr: SocketAddr| match addr.ip() {
            IpAddr::V4(v4) => u128::from(v4.to_bits()),
            IpAddr::V6(v6) => v6.to_bits(),
        };
        state.write_u128(address(self.src));
        state.write_u128(address(self.dst));
        state.write_u64(
            u64::from(self.src.port()) << 24
                | u64::from(self.dst.port()) << 8
                | u64::from(self.protocol.number()),
        );
    }
}

/// An attempt's place in an arrival-order queue.
#[derive(Clone, Copy)]
struct Queued {
    cookie: u64,
    /// The attempt's `monotonic_ns`: a socket's next attempt (another `connect()`, an
    /// unconnected socket's send to a new destination) is queued anew at the back, and
    /// this tells its old place from its current one.
    connected_ns: u64,
}

impl Queued {
    /// Whether the attempt queued here is still pending.
    fn is_current(&self, pending: &HashMap<u64, Pending>, protocol: Protocol) -> bool {
        pending.get(&self.cookie).is_some_and(|p| {
            p.attempt.protocol == protocol && p.attempt.monotonic_ns == self.connected_ns
        })
    }
}

/// A failed attempt's place in the queue of those waiting for late evidence.
#[derive(Clone, Copy)]
struct Release {
    at_ns: u64,
    place: Queued,
}

/// A pending attempt and what the assembler keeps beside it.
struct Pending {
    attempt: Box<Attempt>,
    /// Kernel times of the ICMP error and of the first drop kept in `attempt`: of several,
    /// the earliest is kept, whatever order their events arrive in.
    icmp_ns: u64,
    first_drop_ns: u64,
    /// Whether the attempt has ended (it is judged when it leaves the assembler), and
    /// the socket's end of its TCP handshake (a UDP attempt ends with its ICMP error).
    ended: bool,
    handshake: Option<Box<SockStateEvent>>,
}

/// Evidence that names a flow no pending attempt has yet.
enum Evidence {
    Icmp(IcmpError),
    Drop(PacketDrop),
}

/// Evidence held until an attempt with its flow's tuple appears.
struct Unmatched {
    ts_ns: u64,
    evidence: Evidence,
}

#[derive(Default)]
pub struct FlowAssembler {
    pending: HashMap<u64, Pending>,
    /// Pending attempts whose source is known, by tuple, for ICMP errors and drops.
    by_tuple: HashMap<FlowKey, u64>,
    /// TCP and UDP attempts, each in arrival order (their waits differ); they may hold
    /// places of attempts already completed or displaced, skipped lazily.
    tcp_order: VecDeque<Queued>,
    udp_order: VecDeque<Queued>,
    /// Failed attempts waiting for evidence still on its way, in the order they ended.
    releases: VecDeque<Release>,
    /// ICMP errors and socket-less drops whose tuple no attempt has yet, and their order.
    unmatched: HashMap<FlowKey, Vec<Unmatched>>,
    unmatched_order: VecDeque<(u64, FlowKey)>,
    unmatched_held: usize,
    stats: FlowStats,
}

impl FlowAssembler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts an attempt. Pushes any attempt it displaces (a limit, a reused cookie) to
    /// `done`.
    pub fn on_connect(
        &mut self,
        event: &ConnectEvent,
        origin: Arc<Origin>,
        done: &mut Vec<Box<Attempt>>,
    ) {
        let (protocol, tcp) = match event.protocol {
            IPPROTO_TCP => (Protocol::Tcp, Some(TcpHandshake::default())),
            IPPROTO_UDP => (Protocol::Udp, None),
            _ => return,
        };
        let Some(dst) = socket_addr(&event.dst) else {
            return;
        };
        // Boxed from the start: an attempt is moved several times on its way to a record,
        // and it is hundreds of bytes.
        let mut attempt = Box::new(Attempt {
            monotonic_ns: event.header.ts_ns,
            origin,
            pid: event.pid,
            comm: comm(&event.comm),
            cgroup_id: event.cgroup_id,
            sock_cookie: event.sock_cookie,
            protocol,
            src: None,
            dst,
            dst_name: None,
            outcome: Outcome::InProgress,
            tcp,
            icmp: None,
            drops: None,
            nat: None,
            service: None,
            reply: None,
            snat: None,
            verdict: None,
        });
        if self.pending.len() >= MAX_PENDING {
            self.evict_oldest(done);
        }
        if let Some(previous) = self.take(event.sock_cookie) {
            // The same socket again: its source does not change (its address may, with
            // the route, but the port does not: keep what the first packet showed).
            if protocol == Protocol::Udp {
                attempt.src = previous.src;
            }
            self.finish_displaced(previous, done);
        }
        if event.call == CALL_SENDMSG {
            // Reported from inside sendmsg(): the datagram is on its way.
            attempt.outcome = Outcome::Sent;
        }
        let key = attempt
            .src
            .map(|src| FlowKey::new(protocol, src, attempt.dst));
        let queued = Queued {
            cookie: event.sock_cookie,
            connected_ns: attempt.monotonic_ns,
        };
        self.pending.insert(
            event.sock_cookie,
            Pending {
                attempt,
                icmp_ns: 0,
                first_drop_ns: 0,
                ended: false,
                handshake: None,
            },
        );
        match protocol {
            Protocol::Tcp => self.tcp_order.push_back(queued),
            Protocol::Udp => self.udp_order.push_back(queued),
        }
        if let Some(key) = key {
            self.learn_tuple(key, event.sock_cookie);
        }
    }

    /// Records the source of an attempt; for UDP it makes the connect an attempt.
    pub fn on_first_packet(&mut self, event: &FirstPacketEvent) {
        let Some(pending) = self.pending.get_mut(&event.sock_cookie) else {
            return;
        };
        let Some(src) = socket_addr(&event.src) else {
            return;
        };
        let attempt = &mut pending.attempt;
        // A source learnt before (the socket's earlier attempt) that the packet
        // contradicts no longer names this attempt.
        if let Some(earlier) = attempt.src.replace(src)
            && earlier != src
        {
            self.by_tuple
                .remove(&FlowKey::new(attempt.protocol, earlier, attempt.dst));
        }
        if attempt.protocol == Protocol::Udp && attempt.outcome == Outcome::InProgress {
            attempt.outcome = Outcome::Sent;
        }
        let key = FlowKey::new(attempt.protocol, src, attempt.dst);
        self.learn_tuple(key, event.sock_cookie);
    }

    /// Attributes an ICMP error to the attempt whose packet it embeds. A fatal error ends
    /// a UDP attempt; a TCP attempt ends with its socket.
    pub fn on_icmp_error(&mut self, event: &IcmpErrorEvent) {
        let Some(protocol) = Protocol::of_number(event.protocol) else {
            return;
        };
        let (Some(src), Some(dst), Some(icmp)) = (
            socket_addr(&event.src),
            socket_addr(&event.dst),
            IcmpError::from_event(event),
        ) else {
            return;
        };
        let key = FlowKey::new(protocol, src, dst);
        match self.by_tuple.get(&key) {
            Some(&cookie) => self.add_icmp(cookie, icmp, event.header.ts_ns),
            None => self.hold_unmatched(key, event.header.ts_ns, Evidence::Icmp(icmp)),
        }
    }

    /// Attributes a dropped packet (`drop`, described from `event`) to its attempt: the
    /// socket's, when the kernel knew it, or else the one whose source had the flow's
    /// tuple.
    pub fn on_drop(&mut self, event: &DropEvent, drop: PacketDrop) {
        let ts_ns = event.header.ts_ns;
        if event.sock_cookie != 0 {
            // A socket's packet leaves after its connect: no attempt means a late drop.
            let Some(pending) = self.pending.get_mut(&event.sock_cookie) else {
                self.stats.late_drops += 1;
                return;
            };
            // A packet dropped before any cgroup hook saw it (so before its first packet
            // event) still tells the source the kernel chose.
            let attempt = &pending.attempt;
            let learnt = (ts_ns >= attempt.monotonic_ns
                && attempt.src.is_none()
                && socket_addr(&event.flow_dst) == Some(attempt.dst))
            .then(|| socket_addr(&event.flow_src))
            .flatten();
            if let Some(src) = learnt {
                pending.attempt.src = Some(src);
            }
            let protocol = pending.attempt.protocol;
            let dst = pending.attempt.dst;
            if !keep_drop(pending, drop, ts_ns) {
                self.stats.late_drops += 1;
            }
            if let Some(src) = learnt {
                self.learn_tuple(FlowKey::new(protocol, src, dst), event.sock_cookie);
            }
            return;
        }
        let Some(key) = Protocol::of_number(event.protocol).and_then(|protocol| {
            Some(FlowKey::new(
                protocol,
                socket_addr(&event.flow_src)?,
                socket_addr(&event.flow_dst)?,
            ))
        }) else {
            self.stats.late_drops += 1;
            return;
        };
        match self.by_tuple.get(&key) {
            Some(cookie) => {
                let pending = self.pending.get_mut(cookie).expect("tuples name pending");
                if !keep_drop(pending, drop, ts_ns) {
                    self.stats.late_drops += 1;
                }
            }
            None => self.hold_unmatched(key, ts_ns, Evidence::Drop(drop)),
        }
    }

    /// Ends the TCP attempt of this socket, if one is pending: an established one is
    /// reported at once, a failed one after [`EVIDENCE_WAIT`].
    pub fn on_sock_state(&mut self, event: &SockStateEvent, done: &mut Vec<Box<Attempt>>) {
        let Some(pending) = self.pending.get_mut(&event.sock_cookie) else {
            return;
        };
        // The socket's own tuple stands in when no SYN was seen (that hook is optional).
        // A failed socket has already released its port when it reaches CLOSE, so port 0
        // means "not known", not port 0.
        let attempt = &mut pending.attempt;
        let learnt = match socket_addr(&event.src) {
            Some(src) if attempt.src.is_none() && src.port() != 0 => {
                attempt.src = Some(src);
                Some(FlowKey::new(attempt.protocol, src, attempt.dst))
            }
            _ => None,
        };
        if event.new_state == TCP_ESTABLISHED {
            // A success is reported at once: nothing can still change it.
            if let Some(mut attempt) = self.take(event.sock_cookie) {
                apply_handshake(&mut attempt, event);
                done.push(attempt);
            }
            return;
        }
        // The kernel reports a handshake's end once; should it repeat, the first stands.
        if !pending.ended {
            pending.handshake = Some(Box::new(*event));
            self.end(event.sock_cookie, event.header.ts_ns);
        }
        if let Some(key) = learnt {
            self.learn_tuple(key, event.sock_cookie);
        }
    }

    /// Settles what waited long enough, where `read_ns` is the kernel time
    /// (`CLOCK_MONOTONIC`) up to which every event has been handed to the assembler:
    /// failed attempts whose evidence had [`EVIDENCE_WAIT`] to arrive, UDP attempts after
    /// [`UDP_SETTLE`] (silent ones are probes), TCP handshakes beyond [`MAX_TCP_WAIT`]
    /// (emitted as in progress).
    pub fn expire(&mut self, read_ns: u64, done: &mut Vec<Box<Attempt>>) {
        while let Some(release) = self.releases.front().copied() {
            if release.at_ns > read_ns {
                break;
            }
            self.releases.pop_front();
            // The attempt may have left already (displaced by its socket's next one).
            if release.place.is_current(&self.pending, Protocol::Tcp)
                || release.place.is_current(&self.pending, Protocol::Udp)
            {
                done.extend(self.take(release.place.cookie));
            }
        }
        self.expire_unmatched(read_ns);
        self.take_older_than(
            Protocol::Udp,
            UDP_SETTLE,
            read_ns,
            done,
            Self::finish_displaced,
        );
        self.take_older_than(
            Protocol::Tcp,
            MAX_TCP_WAIT,
            read_ns,
            done,
            Self::finish_evicted,
        );
    }

    /// Emits everything still pending (at shutdown), oldest first; silent UDP sockets are
    /// counted as probes, evidence that matched no attempt as unmatched.
    pub fn drain(&mut self, done: &mut Vec<Box<Attempt>>) {
        let cookies: Vec<u64> = self
            .udp_order
            .drain(..)
            .chain(self.tcp_order.drain(..))
            .map(|queued| queued.cookie)
            .collect();
        for cookie in cookies {
            if let Some(attempt) = self.take(cookie) {
                self.finish_displaced(attempt, done);
            }
        }
        // Ended attempts that left their arrival queue wait only in `releases`.
        let mut ended: Vec<(u64, u64)> = self
            .pending
            .iter()
            .map(|(cookie, p)| (p.attempt.monotonic_ns, *cookie))
            .collect();
        ended.sort_unstable();
        for (_, cookie) in ended {
            if let Some(attempt) = self.take(cookie) {
                self.finish_displaced(attempt, done);
            }
        }
        self.releases.clear();
        self.expire_unmatched(u64::MAX);
    }

    pub fn stats(&self) -> FlowStats {
        self.stats
    }

    /// The pending attempt of a socket, if any (to learn a socket's process).
    pub fn pending(&self, cookie: u64) -> Option<&Attempt> {
        self.pending.get(&cookie).map(|p| p.attempt.as_ref())
    }

    /// Marks the attempt of `cookie` ended at kernel time `at_ns`; a failure is released
    /// once the events up to [`EVIDENCE_WAIT`] later have been read.
    fn end(&mut self, cookie: u64, at_ns: u64) {
        let Some(pending) = self.pending.get_mut(&cookie) else {
            return;
        };
        pending.ended = true;
        self.releases.push_back(Release {
            at_ns: at_ns.saturating_add(EVIDENCE_WAIT.as_nanos() as u64),
            place: Queued {
                cookie,
                connected_ns: pending.attempt.monotonic_ns,
            },
        });
        // Places of attempts that left early (displaced, established) are bounded too.
        if self.releases.len() > 2 * MAX_PENDING {
            let pending = &self.pending;
            self.releases
                .retain(|release| pending.get(&release.place.cookie).is_some_and(|p| p.ended));
        }
    }

    /// Keeps an ICMP error of the attempt of `cookie`; a fatal one ends a UDP attempt.
    fn add_icmp(&mut self, cookie: u64, icmp: IcmpError, ts_ns: u64) {
        let Some(pending) = self.pending.get_mut(&cookie) else {
            return;
        };
        // About a packet of the socket's earlier attempt (the same tuple again).
        if ts_ns < pending.attempt.monotonic_ns {
            self.stats.unmatched_icmp += 1;
            return;
        }
        // A fatal error outweighs a path-MTU hint; of equals, the earlier.
        let outweighs = pending.attempt.icmp.is_none_or(|kept| {
            (icmp.is_fatal(), Reverse(ts_ns)) > (kept.is_fatal(), Reverse(pending.icmp_ns))
        });
        if outweighs {
            pending.attempt.icmp = Some(icmp);
            pending.icmp_ns = ts_ns;
        }
        if pending.attempt.protocol == Protocol::Udp && icmp.is_fatal() && !pending.ended {
            self.end(cookie, ts_ns);
        }
    }

    /// Files the tuple of the attempt of `cookie`, and gives it the evidence that waited
    /// for that tuple.
    fn learn_tuple(&mut self, key: FlowKey, cookie: u64) {
        self.by_tuple.insert(key, cookie);
        if self.unmatched.is_empty() {
            return;
        }
        let Some(held) = self.unmatched.remove(&key) else {
            return;
        };
        self.unmatched_held -= held.len();
        for Unmatched { ts_ns, evidence } in held {
            match evidence {
                Evidence::Icmp(icmp) => self.add_icmp(cookie, icmp, ts_ns),
                Evidence::Drop(drop) => {
                    let kept = self
                        .pending
                        .get_mut(&cookie)
                        .is_some_and(|pending| keep_drop(pending, drop, ts_ns));
                    if !kept {
                        self.stats.late_drops += 1;
                    }
                }
            }
        }
    }

    /// Holds evidence whose tuple no attempt has yet (its attempt's source may still be
    /// on its way), for [`EVIDENCE_WAIT`]; beyond [`MAX_UNMATCHED`] it is counted at once.
    fn hold_unmatched(&mut self, key: FlowKey, ts_ns: u64, evidence: Evidence) {
        if self.unmatched_held >= MAX_UNMATCHED {
            self.count_unmatched(&evidence);
            return;
        }
        self.unmatched
            .entry(key)
            .or_default()
            .push(Unmatched { ts_ns, evidence });
        self.unmatched_held += 1;
        self.unmatched_order.push_back((ts_ns, key));
        if self.unmatched_order.len() > 2 * MAX_UNMATCHED {
            let unmatched = &self.unmatched;
            self.unmatched_order
                .retain(|(_, key)| unmatched.contains_key(key));
        }
    }

    /// Counts the held evidence whose wait ended by `read_ns`.
    fn expire_unmatched(&mut self, read_ns: u64) {
        let wait = EVIDENCE_WAIT.as_nanos() as u64;
        while let Some(&(ts_ns, key)) = self.unmatched_order.front() {
            if ts_ns.saturating_add(wait) > read_ns {
                break;
            }
            self.unmatched_order.pop_front();
            let Entry::Occupied(mut entry) = self.unmatched.entry(key) else {
                continue;
            };
            let (expired, kept): (Vec<_>, Vec<_>) = std::mem::take(entry.get_mut())
                .into_iter()
                .partition(|held| held.ts_ns.saturating_add(wait) <= read_ns);
            if kept.is_empty() {
                entry.remove();
            } else {
                *entry.get_mut() = kept;
            }
            self.unmatched_held -= expired.len();
            for held in expired {
                self.count_unmatched(&held.evidence);
            }
        }
    }

    fn count_unmatched(&mut self, evidence: &Evidence) {
        match evidence {
            Evidence::Icmp(_) => self.stats.unmatched_icmp += 1,
            Evidence::Drop(_) => self.stats.late_drops += 1,
        }
    }

    /// Removes a pending attempt and its tuple, judged on all its evidence.
    fn take(&mut self, cookie: u64) -> Option<Box<Attempt>> {
        let Pending {
            mut attempt,
            handshake,
            ..
        } = self.pending.remove(&cookie)?;
        if let Some(src) = attempt.src {
            // The tuple may name a newer attempt of another socket by now.
            if let Entry::Occupied(entry) =
                self.by_tuple
                    .entry(FlowKey::new(attempt.protocol, src, attempt.dst))
                && *entry.get() == cookie
            {
                entry.remove();
            }
        }
        match handshake {
            Some(handshake) => apply_handshake(&mut attempt, &handshake),
            None if attempt.protocol == Protocol::Udp => {
                if let Some(icmp) = attempt.icmp.filter(IcmpError::is_fatal) {
                    attempt.outcome = if icmp.is_port_unreachable() {
                        Outcome::Refused
                    } else {
                        Outcome::Unreachable
                    };
                }
            }
            None => {}
        }
        Some(attempt)
    }

    /// Removes the attempts of `protocol` connected at least `age` before `now_ns` and
    /// hands each to `finish`; those that ended wait for their release instead. Straight
    /// into `done`: a busy node expires thousands of UDP attempts per tick, and a vector
    /// of them built per call is memory faulted in anew.
    fn take_older_than(
        &mut self,
        protocol: Protocol,
        age: Duration,
        now_ns: u64,
        done: &mut Vec<Box<Attempt>>,
        finish: fn(&mut Self, Box<Attempt>, &mut Vec<Box<Attempt>>),
    ) {
        loop {
            let order = match protocol {
                Protocol::Tcp => &mut self.tcp_order,
                Protocol::Udp => &mut self.udp_order,
            };
            let Some(&queued) = order.front() else { break };
            // A place whose attempt completed or was displaced by the socket's next one
            // is only skipped (the next attempt waits at its own, later place).
            let current = queued.is_current(&self.pending, protocol);
            let due =
                !current || Duration::from_nanos(now_ns.saturating_sub(queued.connected_ns)) >= age;
            if !due {
                break;
            }
            order.pop_front();
            let ended = self.pending.get(&queued.cookie).is_some_and(|p| p.ended);
            if current
                && !ended
                && let Some(attempt) = self.take(queued.cookie)
            {
                finish(self, attempt, done);
            }
        }
        // Stale places left in the queues are bounded by the same cap as `pending`.
        let pending = &self.pending;
        for (order, protocol) in [
            (&mut self.tcp_order, Protocol::Tcp),
            (&mut self.udp_order, Protocol::Udp),
        ] {
            if order.len() > 2 * MAX_PENDING {
                order.retain(|queued| queued.is_current(pending, protocol));
            }
        }
    }

    /// A TCP attempt whose handshake outlived the wait is reported as it is.
    fn finish_evicted(&mut self, attempt: Box<Attempt>, done: &mut Vec<Box<Attempt>>) {
        self.stats.evicted += 1;
        done.push(attempt);
    }

    /// A UDP attempt that never sent was a probe; anything else is reported as it is.
    fn finish_displaced(&mut self, attempt: Box<Attempt>, done: &mut Vec<Box<Attempt>>) {
        if attempt.protocol == Protocol::Udp && attempt.outcome == Outcome::InProgress {
            self.stats.udp_probes += 1;
        } else {
            done.push(attempt);
        }
    }

    /// Emits the oldest pending attempt early: the older of the two queues' fronts.
    fn evict_oldest(&mut self, done: &mut Vec<Box<Attempt>>) {
        let pending = &self.pending;
        let mut oldest: Option<(u64, u64)> = None;
        for (order, protocol) in [
            (&mut self.udp_order, Protocol::Udp),
            (&mut self.tcp_order, Protocol::Tcp),
        ] {
            while let Some(&queued) = order.front() {
                if queued.is_current(pending, protocol) {
                    if oldest.is_none_or(|(_, ts)| queued.connected_ns < ts) {
                        oldest = Some((queued.cookie, queued.connected_ns));
                    }
                    break;
                }
                order.pop_front();
            }
        }
        // Ended attempts may have left their arrival queue: they wait in `releases`.
        while let Some(release) = self.releases.front() {
            let place = release.place;
            if place.is_current(pending, Protocol::Tcp) || place.is_current(pending, Protocol::Udp)
            {
                if oldest.is_none_or(|(_, ts)| place.connected_ns < ts) {
                    oldest = Some((place.cookie, place.connected_ns));
                }
                break;
            }
            self.releases.pop_front();
        }
        if let Some(attempt) = oldest.and_then(|(cookie, _)| self.take(cookie)) {
            self.stats.evicted += 1;
            done.push(attempt);
        }
    }
}

/// Judges a TCP attempt by the end of its handshake and the evidence it has.
fn apply_handshake(attempt: &mut Attempt, handshake: &SockStateEvent) {
    // Flags 0: nothing answered the SYN.
    if handshake.reply_tcp_flags != 0 {
        attempt.reply = Some(HandshakeReply {
            ttl: handshake.reply_ttl,
            reset: handshake.reply_tcp_flags & TCP_FLAG_RST != 0,
            endpoint_hops: None,
        });
    }
    let (outcome, tcp) = judge_handshake(handshake, attempt.monotonic_ns, attempt.icmp);
    attempt.outcome = outcome;
    attempt.tcp = Some(tcp);
}

/// Counts a dropped packet of an attempt, keeping the earliest in detail; false for a
/// drop from before the attempt began (its socket's or tuple's earlier attempt).
#[must_use]
fn keep_drop(pending: &mut Pending, drop: PacketDrop, ts_ns: u64) -> bool {
    if ts_ns < pending.attempt.monotonic_ns {
        return false;
    }
    match &mut pending.attempt.drops {
        Some(drops) => {
            drops.count = drops.count.saturating_add(1);
            if ts_ns < pending.first_drop_ns {
                drops.first = drop;
                pending.first_drop_ns = ts_ns;
            }
        }
        None => {
            pending.attempt.drops = Some(Box::new(Drops {
                first: drop,
                count: 1,
            }));
            pending.first_drop_ns = ts_ns;
        }
    }
    true
}

/// Reads the end of a handshake from the socket's state, error fields and retransmits,
/// and the ICMP error that answered it (the application may have consumed the socket
/// error with `SO_ERROR` before closing, so the ICMP error is the firmer evidence).
fn judge_handshake(
    event: &SockStateEvent,
    connect_ns: u64,
    icmp: Option<IcmpError>,
) -> (Outcome, TcpHandshake) {
    let mut handshake = TcpHandshake {
        syn_retransmits: event.syn_retransmits,
        duration: event
            .header
            .ts_ns
            .checked_sub(connect_ns)
            .map(Duration::from_nanos),
        errno: None,
        closed_by_application: false,
    };
    if event.new_state == TCP_ESTABLISHED {
        return (Outcome::Established, handshake);
    }
    // A soft error (e.g. an ICMP unreachable while retrying) explains a failure the
    // kernel had not yet made fatal.
    let errno = [event.error, event.soft_error]
        .into_iter()
        .find(|&e| e != 0);
    handshake.errno = errno;
    handshake.closed_by_application = event.error == 0;
    let outcome = if icmp.is_some_and(|i| i.is_fatal()) {
        Outcome::Unreachable
    } else {
        Outcome::of_handshake(handshake_outcome(
            event.new_state,
            event.error,
            event.soft_error,
            event.syn_retransmits,
        ))
    };
    (outcome, handshake)
}

/// The symbolic name of an errno the handshake can end with.
pub fn errno_name(errno: i32) -> String {
    let name = match errno {
        1 => "EPERM",
        13 => "EACCES",
        64 => "ENONET",
        71 => "EPROTO",
        90 => "EMSGSIZE",
        95 => "EOPNOTSUPP",
        101 => "ENETUNREACH",
        103 => "ECONNABORTED",
        104 => "ECONNRESET",
        110 => "ETIMEDOUT",
        111 => "ECONNREFUSED",
        112 => "EHOSTDOWN",
        113 => "EHOSTUNREACH",
        _ => return format!("errno {errno}"),
    };
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use tracer_common::{
        AF_INET, Endpoint, EventHeader, EventKind, TCP_CLOSE, TCP_ESTABLISHED, TCP_SYN_SENT,
    };

    use super::*;

    fn endpoint(ip: [u8; 4], port: u16) -> Endpoint {
        let mut addr = [0; 16];
        addr[..4].copy_from_slice(&ip);
        Endpoint {
            family: AF_INET,
            port,
            addr,
        }
    }

    fn connect(cookie: u64, ts_ns: u64, protocol: u8) -> ConnectEvent {
        ConnectEvent {
            header: EventHeader {
                kind: EventKind::Connect as u32,
                cpu: 0,
                ts_ns,
            },
            cgroup_id: 5,
            sock_cookie: cookie,
            pid: 100,
            tid: 100,
            comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
            protocol,
            call: tracer_common::CALL_CONNECT,
            _pad: [0; 6],
            dst: endpoint([203, 0, 113, 10], 80),
        }
    }

    fn state(
        cookie: u64,
        ts_ns: u64,
        new_state: u8,
        error: i32,
        retransmits: u32,
    ) -> SockStateEvent {
        SockStateEvent {
            header: EventHeader {
                kind: EventKind::SockState as u32,
                cpu: 0,
                ts_ns,
            },
            sock_cookie: cookie,
            old_state: TCP_SYN_SENT,
            new_state,
            reply_tcp_flags: 0,
            reply_ttl: 0,
            error,
            soft_error: 0,
            syn_retransmits: retransmits,
            src: endpoint(
                [10, 244, 0, 5],
                if new_state == TCP_CLOSE { 0 } else { 41234 },
            ),
            dst: endpoint([203, 0, 113, 10], 80),
        }
    }

    fn first_packet(cookie: u64, protocol: u8, port: u16) -> FirstPacketEvent {
        FirstPacketEvent {
            header: EventHeader {
                kind: EventKind::FirstPacket as u32,
                cpu: 0,
                ts_ns: 2,
            },
            sock_cookie: cookie,
            protocol,
            _pad: [0; 7],
            src: endpoint([10, 244, 0, 5], port),
            dst: endpoint([203, 0, 113, 10], 80),
        }
    }

    fn origin() -> Arc<Origin> {
        Arc::new(Origin {
            pod: Some("shop/web".into()),
            pod_uid: None,
            container: None,
        })
    }

    const WAIT_NS: u64 = EVIDENCE_WAIT.as_nanos() as u64;

    /// Runs connect → first SYN → state change and returns the one attempt, once its
    /// evidence had time to arrive.
    fn tcp_attempt(state_event: SockStateEvent) -> Attempt {
        let mut flows = FlowAssembler::new();
        let mut done = Vec::new();
        flows.on_connect(&connect(1, 1_000, IPPROTO_TCP), origin(), &mut done);
        flows.on_first_packet(&first_packet(1, IPPROTO_TCP, 50_000));
        assert!(done.is_empty());
        flows.on_sock_state(&state_event, &mut done);
        flows.expire(state_event.header.ts_ns + WAIT_NS, &mut done);
        assert_eq!(done.len(), 1);
        *done.pop().unwrap()
    }

    #[test]
    fn established_with_latency_and_source() {
        let a = tcp_attempt(state(1, 3_001_000, TCP_ESTABLISHED, 0, 0));
        assert_eq!(a.outcome, Outcome::Established);
        assert_eq!(a.src, Some("10.244.0.5:50000".parse().unwrap()));
        assert_eq!(a.dst, "203.0.113.10:80".parse().unwrap());
        assert_eq!(
            (a.pid, a.comm.as_str(), a.protocol),
            (100, "curl", Protocol::Tcp)
        );
        let tcp = a.tcp.unwrap();
        assert_eq!(tcp.duration, Some(Duration::from_millis(3)));
        assert_eq!((tcp.syn_retransmits, tcp.errno), (0, None));
    }

    #[test]
    fn outcomes_of_failed_handshakes() {
        let cases = [
            // (error, soft error, retransmits) → outcome, closed by application
            ((111, 0, 0), Outcome::Refused, false),
            ((110, 0, 6), Outcome::Timeout, false),
            ((113, 0, 0), Outcome::Unreachable, false),
            ((101, 0, 1), Outcome::Unreachable, false),
            ((0, 113, 2), Outcome::Unreachable, true),
            ((0, 0, 2), Outcome::Timeout, true),
            ((0, 0, 0), Outcome::Aborted, true),
            ((1, 0, 0), Outcome::Failed, false),
        ];
        for ((error, soft_error, retransmits), outcome, by_app) in cases {
            let mut event = state(1, 2_000, TCP_CLOSE, error, retransmits);
            event.soft_error = soft_error;
            let a = tcp_attempt(event);
            let tcp = a.tcp.unwrap();
            assert_eq!(a.outcome, outcome, "{error}/{soft_error}/{retransmits}");
            assert_eq!(tcp.closed_by_application, by_app, "{error}/{soft_error}");
            assert_eq!(tcp.syn_retransmits, retransmits);
            assert_eq!(tcp.errno, [error, soft_error].into_iter().find(|&e| e != 0));
            // The SYN's source survives the CLOSE tuple's released port.
            assert_eq!(a.src, Some("10.244.0.5:50000".parse().unwrap()));
        }
    }

    #[test]
    fn the_answer_to_the_syn_comes_with_the_handshake_result() {
        let mut refused = state(1, 2_000, TCP_CLOSE, 111, 0);
        refused.reply_tcp_flags = TCP_FLAG_RST | 0x10;
        refused.reply_ttl = 62;
        assert_eq!(
            tcp_attempt(refused).reply,
            Some(HandshakeReply {
                ttl: 62,
                reset: true,
                endpoint_hops: None,
            })
        );
        let mut established = state(1, 2_000, TCP_ESTABLISHED, 0, 0);
        established.reply_tcp_flags = 0x12;
        established.reply_ttl = 57;
        let reply = tcp_attempt(established).reply.unwrap();
        assert_eq!((reply.ttl, reply.reset), (57, false));
        // Nothing answered a SYN that timed out.
        assert_eq!(tcp_attempt(state(1, 2_000, TCP_CLOSE, 110, 6)).reply, None);
    }

    #[test]
    fn without_a_syn_the_sockets_own_tuple_is_used_unless_its_port_is_gone() {
        let mut flows = FlowAssembler::new();
        let mut done = Vec::new();
        flows.on_connect(&connect(1, 1, IPPROTO_TCP), origin(), &mut done);
        flows.on_connect(&connect(2, 1, IPPROTO_TCP), origin(), &mut done);
        flows.on_sock_state(&state(1, 2, TCP_ESTABLISHED, 0, 0), &mut done);
        flows.on_sock_state(&state(2, 2, TCP_CLOSE, 111, 0), &mut done);
        assert_eq!(
            done.len(),
            1,
            "an established handshake is reported at once"
        );
        flows.expire(2 + WAIT_NS, &mut done);
        assert_eq!(done[0].src, Some("10.244.0.5:41234".parse().unwrap()));
        assert_eq!(done[1].src, None);
    }

    #[test]
    fn udp_attempt_is_reported_once_settled() {
        let mut flows = FlowAssembler::new();
        let mut done = Vec::new();
        let settle = UDP_SETTLE.as_nanos() as u64;
        flows.on_connect(&connect(1, 1_000, IPPROTO_UDP), origin(), &mut done);
        flows.on_first_packet(&first_packet(1, IPPROTO_UDP, 40_000));
        flows.expire(1_000 + settle - 1, &mut done);
        assert!(done.is_empty());
        flows.expire(1_000 + settle, &mut done);
        assert_eq!(done.len(), 1);
        assert_eq!(
            (done[0].protocol, done[0].outcome),
            (Protocol::Udp, Outcome::Sent)
        );
        assert_eq!(done[0].src, Some("10.244.0.5:40000".parse().unwrap()));
        assert_eq!((done[0].tcp, done[0].icmp), (None, None));
    }

    #[test]
    fn a_socket_sending_to_new_destinations_holds_no_other_attempt_back() {
        let mut flows = FlowAssembler::new();
        let mut done = Vec::new();
        let settle = UDP_SETTLE.as_nanos() as u64;
        // A server's unconnected socket answers one client, a pod connects, then the
        // server answers the next client (the socket's next attempt, queued anew).
        let send = |ts_ns, port| ConnectEvent {
            call: CALL_SENDMSG,
            dst: endpoint([10, 244, 0, 9], port),
            ..connect(1, ts_ns, IPPROTO_UDP)
        };
        flows.on_connect(&send(0, 5353), origin(), &mut done);
        flows.on_connect(&connect(2, 100, IPPROTO_UDP), origin(), &mut done);
        flows.on_first_packet(&first_packet(2, IPPROTO_UDP, 40_000));
        flows.on_connect(&send(settle / 2, 5354), origin(), &mut done);
        assert_eq!(
            done.len(),
            1,
            "the first answer is displaced: reported as sent"
        );
        flows.expire(100 + settle, &mut done);
        let reported: Vec<(u64, u16)> =
            done.iter().map(|a| (a.sock_cookie, a.dst.port())).collect();
        assert_eq!(reported, [(1, 5353), (2, 80)]);
        flows.expire(settle / 2 + settle, &mut done);
        assert_eq!(
            done.last().map(|a| (a.sock_cookie, a.dst.port())),
            Some((1, 5354))
        );
        assert_eq!(flows.stats().evicted, 0);
    }

    fn icmp(cookie_src_port: u16, protocol: u8, icmp_type: u8, code: u8) -> IcmpErrorEvent {
        IcmpErrorEvent {
            header: EventHeader {
                kind: EventKind::IcmpError as u32,
                cpu: 0,
                ts_ns: 1_500,
            },
            icmp_type,
            icmp_code: code,
            protocol,
            _pad: 0,
            mtu: 0,
            sender: endpoint([198, 51, 100, 1], 0),
            src: endpoint([10, 244, 0, 5], cookie_src_port),
            dst: endpoint([203, 0, 113, 10], 80),
            _pad2: [0; 4],
        }
    }

    #[test]
    fn icmp_port_unreachable_refuses_a_udp_attempt_before_it_settles() {
        let mut flows = FlowAssembler::new();
        let mut done = Vec::new();
        flows.on_connect(&connect(1, 1_000, IPPROTO_UDP), origin(), &mut done);
        flows.on_first_packet(&first_packet(1, IPPROTO_UDP, 40_000));
        flows.on_icmp_error(&icmp(40_000, IPPROTO_UDP, 3, 3));
        flows.expire(1_500 + WAIT_NS - 1, &mut done);
        assert!(
            done.is_empty(),
            "a drop of the datagram may still be on its way"
        );
        flows.expire(1_500 + WAIT_NS, &mut done);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].outcome, Outcome::Refused);
        let icmp_error = done[0].icmp.unwrap();
        assert_eq!(icmp_error.meaning(), "port-unreachable");
        assert_eq!(icmp_error.sender, "198.51.100.1".parse::<IpAddr>().unwrap());
        // The attempt is gone: a repeated error waits for an attempt with its tuple, then
        // is counted as matching none.
        let mut late = icmp(40_000, IPPROTO_UDP, 3, 3);
        late.header.ts_ns = 10 * WAIT_NS;
        flows.on_icmp_error(&late);
        assert_eq!(flows.stats().unmatched_icmp, 0);
        flows.expire(11 * WAIT_NS, &mut done);
        assert_eq!((done.len(), flows.stats().unmatched_icmp), (1, 1));
    }

    #[test]
    fn icmp_admin_prohibited_explains_a_handshake_the_application_closed() {
        let mut flows = FlowAssembler::new();
        let mut done = Vec::new();
        flows.on_connect(&connect(1, 1_000, IPPROTO_TCP), origin(), &mut done);
        flows.on_first_packet(&first_packet(1, IPPROTO_TCP, 50_000));
        flows.on_icmp_error(&icmp(40_000, IPPROTO_TCP, 3, 13));
        flows.on_icmp_error(&icmp(50_000, IPPROTO_TCP, 3, 13));
        flows.expire(1_500 + WAIT_NS, &mut done);
        assert!(done.is_empty(), "TCP attempts end with their socket");
        assert_eq!(
            flows.stats().unmatched_icmp,
            1,
            "wrong source port must not match"
        );
        // The application read the error with SO_ERROR and closed: no error left on it.
        flows.on_sock_state(&state(1, 2_000, TCP_CLOSE, 0, 0), &mut done);
        flows.expire(2_000 + WAIT_NS, &mut done);
        assert_eq!(done[0].outcome, Outcome::Unreachable);
        assert_eq!(done[0].icmp.unwrap().meaning(), "admin-prohibited");
    }

    /// A drop event of the attempt to 203.0.113.10:80 from source port `port`, with the
    /// socket's `cookie` (0: not known to the kernel).
    fn drop_event(cookie: u64, port: u16) -> DropEvent {
        DropEvent {
            header: EventHeader {
                kind: EventKind::Drop as u32,
                cpu: 0,
                ts_ns: 1_500,
            },
            sock_cookie: cookie,
            location: 0,
            reason: 0,
            direction: tracer_common::DROP_DIRECTION_ORIGINAL,
            protocol: IPPROTO_TCP,
            conntrack: tracer_common::DROP_CT_ENTRY,
            _pad: 0,
            // After SNAT: the packet's own source is the node's.
            src: endpoint([192, 0, 2, 1], 61_000),
            dst: endpoint([203, 0, 113, 10], 80),
            ct_status: 0,
            netns: 0,
            flow_src: endpoint([10, 244, 0, 5], port),
            flow_dst: endpoint([203, 0, 113, 10], 80),
        }
    }

    fn netfilter_drop() -> PacketDrop {
        PacketDrop {
            reason: "NETFILTER_DROP".into(),
            location: "nf_hook_slow+0x9e".into(),
            reply: false,
            src: Some("192.0.2.1:61000".parse().unwrap()),
            dst: Some("203.0.113.10:80".parse().unwrap()),
            conntrack: crate::capture::PacketConntrack::Entry { status: 0 },
            netns: None,
            netns_owner: None,
        }
    }

    #[test]
    fn drops_are_counted_on_their_socket_attempt() {
        let mut flows = FlowAssembler::new();
        let mut done = Vec::new();
        flows.on_connect(&connect(1, 1_000, IPPROTO_TCP), origin(), &mut done);
        let drop = netfilter_drop();
        flows.on_drop(&drop_event(1, 50_000), drop.clone());
        flows.on_drop(&drop_event(1, 50_000), drop.clone());
        flows.on_drop(&drop_event(7, 50_000), drop.clone());
        flows.on_sock_state(&state(1, 2_000, TCP_CLOSE, 0, 2), &mut done);
        flows.expire(2_000 + WAIT_NS, &mut done);
        assert_eq!(done[0].outcome, Outcome::Timeout);
        assert_eq!(
            done[0].drops,
            Some(Box::new(Drops {
                first: drop,
                count: 2
            }))
        );
        assert_eq!(
            done[0].src,
            Some("10.244.0.5:50000".parse().unwrap()),
            "the flow's source stands in for a first packet not seen"
        );
        assert_eq!(flows.stats().late_drops, 1);
    }

    #[test]
    fn drops_without_a_socket_are_matched_by_the_flow_tuple() {
        let mut flows = FlowAssembler::new();
        let mut done = Vec::new();
        flows.on_connect(&connect(1, 1_000, IPPROTO_TCP), origin(), &mut done);
        let drop = netfilter_drop();
        // Before the first packet no attempt has the tuple: the drop waits for one.
        flows.on_drop(&drop_event(0, 50_000), drop.clone());
        flows.on_first_packet(&first_packet(1, IPPROTO_TCP, 50_000));
        flows.on_drop(&drop_event(0, 50_000), drop.clone());
        flows.on_drop(&drop_event(0, 50_001), drop.clone());
        flows.on_sock_state(&state(1, 2_000, TCP_CLOSE, 0, 2), &mut done);
        flows.expire(2_000 + WAIT_NS, &mut done);
        assert_eq!(
            flows.stats().late_drops,
            1,
            "another source port is another flow"
        );
        assert_eq!(
            done[0].drops,
            Some(Box::new(Drops {
                first: drop,
                count: 2
            }))
        );
        assert_eq!(
            done[0].src,
            Some("10.244.0.5:50000".parse().unwrap()),
            "a packet after SNAT does not name the attempt's source"
        );
    }

    /// One kernel event of an attempt after its connect, as the pipeline hands it over.
    #[derive(Clone)]
    enum Event {
        First(FirstPacketEvent),
        State(SockStateEvent),
        Icmp(IcmpErrorEvent),
        Drop(Box<(DropEvent, PacketDrop)>),
    }

    impl Event {
        fn ts_ns(&self) -> u64 {
            match self {
                Event::First(e) => e.header.ts_ns,
                Event::State(e) => e.header.ts_ns,
                Event::Icmp(e) => e.header.ts_ns,
                Event::Drop(drop) => drop.0.header.ts_ns,
            }
        }

        fn feed(&self, flows: &mut FlowAssembler, done: &mut Vec<Box<Attempt>>) {
            match self {
                Event::First(e) => flows.on_first_packet(e),
                Event::State(e) => flows.on_sock_state(e, done),
                Event::Icmp(e) => flows.on_icmp_error(e),
                Event::Drop(drop) => flows.on_drop(&drop.0, drop.1.clone()),
            }
        }
    }

    /// Every order of `items` (Heap's algorithm).
    fn permutations<T: Clone>(items: &[T]) -> Vec<Vec<T>> {
        fn permute<T: Clone>(k: usize, items: &mut Vec<T>, out: &mut Vec<Vec<T>>) {
            if k <= 1 {
                out.push(items.clone());
                return;
            }
            for i in 0..k {
                permute(k - 1, items, out);
                let swap = if k.is_multiple_of(2) { i } else { 0 };
                items.swap(swap, k - 1);
            }
        }
        let mut out = Vec::new();
        permute(items.len(), &mut items.to_vec(), &mut out);
        out
    }

    /// Feeds the events after `connect` in every order, telling the assembler after each
    /// one how far the events were read (just short of the earliest not yet fed: what
    /// `Capture::read_until_ns` guarantees), and checks that every order gives the same
    /// one record and the same counts. Returns that record.
    fn in_every_order(connect: ConnectEvent, events: &[Event]) -> Attempt {
        let orders = permutations(events);
        let mut records = Vec::new();
        for order in &orders {
            let mut flows = FlowAssembler::new();
            let mut done = Vec::new();
            flows.on_connect(&connect, origin(), &mut done);
            for (fed, event) in order.iter().enumerate() {
                event.feed(&mut flows, &mut done);
                let unread = order[fed + 1..].iter().map(Event::ts_ns).min();
                if let Some(earliest) = unread {
                    flows.expire(earliest - 1, &mut done);
                }
            }
            let last = events.iter().map(Event::ts_ns).max().unwrap();
            flows.expire(last + WAIT_NS, &mut done);
            assert_eq!(done.len(), 1, "one record in every order");
            assert_eq!(flows.stats(), FlowStats::default());
            records.push(done.pop().unwrap());
        }
        for record in &records[1..] {
            assert_eq!(record, &records[0]);
        }
        assert_eq!(records.len(), (1..=events.len()).product::<usize>());
        *records.swap_remove(0)
    }

    fn at<T>(mut event: T, ts_ns: u64, header: impl Fn(&mut T) -> &mut EventHeader) -> T {
        header(&mut event).ts_ns = ts_ns;
        event
    }

    fn first_at(ts_ns: u64, protocol: u8, port: u16) -> Event {
        Event::First(at(first_packet(1, protocol, port), ts_ns, |e| {
            &mut e.header
        }))
    }

    fn icmp_at(ts_ns: u64, protocol: u8, (icmp_type, code): (u8, u8), sender: [u8; 4]) -> Event {
        let mut event = at(icmp(50_000, protocol, icmp_type, code), ts_ns, |e| {
            &mut e.header
        });
        event.sender = endpoint(sender, 0);
        Event::Icmp(event)
    }

    fn closed_at(ts_ns: u64, error: i32, retransmits: u32) -> SockStateEvent {
        state(1, ts_ns, TCP_CLOSE, error, retransmits)
    }

    #[test]
    fn a_syn_rejected_with_admin_prohibited_is_judged_alike_in_every_order() {
        // The kernel closes the socket inside icmp_rcv() (EHOSTUNREACH) before the ICMP
        // event is taken, unless the application holds the socket's lock at that moment.
        let record = in_every_order(
            connect(1, 1_000, IPPROTO_TCP),
            &[
                first_at(1_100, IPPROTO_TCP, 50_000),
                Event::State(closed_at(5_000_000, 113, 0)),
                icmp_at(5_000_400, IPPROTO_TCP, (3, 13), [198, 51, 100, 1]),
            ],
        );
        assert_eq!(record.outcome, Outcome::Unreachable);
        let icmp = record.icmp.unwrap();
        assert_eq!(
            (icmp.meaning(), icmp.sender),
            ("admin-prohibited", IpAddr::from([198, 51, 100, 1]))
        );
        let tcp = record.tcp.unwrap();
        assert_eq!((tcp.errno, tcp.closed_by_application), (Some(113), false));
        assert_eq!(record.src, Some("10.244.0.5:50000".parse().unwrap()));
    }

    #[test]
    fn a_syn_the_node_cannot_route_is_judged_alike_in_every_order() {
        let record = in_every_order(
            connect(1, 1_000, IPPROTO_TCP),
            &[
                first_at(1_100, IPPROTO_TCP, 50_000),
                icmp_at(1_900, IPPROTO_TCP, (3, 1), [10, 224, 0, 1]),
                Event::State(closed_at(1_800, 113, 0)),
            ],
        );
        assert_eq!(record.outcome, Outcome::Unreachable);
        let icmp = record.icmp.unwrap();
        assert_eq!(
            (icmp.meaning(), icmp.sender),
            ("host-unreachable", IpAddr::from([10, 224, 0, 1]))
        );
    }

    #[test]
    fn of_two_icmp_errors_the_fatal_one_is_kept_in_every_order() {
        let record = in_every_order(
            connect(1, 1_000, IPPROTO_TCP),
            &[
                first_at(1_100, IPPROTO_TCP, 50_000),
                icmp_at(2_000, IPPROTO_TCP, (3, 4), [198, 51, 100, 7]),
                icmp_at(3_000, IPPROTO_TCP, (3, 13), [198, 51, 100, 1]),
                icmp_at(4_000, IPPROTO_TCP, (3, 13), [198, 51, 100, 2]),
                Event::State(closed_at(3_500, 113, 0)),
            ],
        );
        let icmp = record.icmp.unwrap();
        assert_eq!(
            (icmp.meaning(), icmp.sender),
            ("admin-prohibited", IpAddr::from([198, 51, 100, 1]))
        );
    }

    #[test]
    fn a_reset_is_judged_alike_in_every_order() {
        let mut reset = closed_at(3_000, 111, 0);
        reset.reply_tcp_flags = TCP_FLAG_RST | 0x10;
        reset.reply_ttl = 63;
        let record = in_every_order(
            connect(1, 1_000, IPPROTO_TCP),
            &[first_at(1_100, IPPROTO_TCP, 50_000), Event::State(reset)],
        );
        assert_eq!(record.outcome, Outcome::Refused);
        assert_eq!(record.reply.map(|r| (r.reset, r.ttl)), Some((true, 63)));
    }

    #[test]
    fn syns_dropped_by_the_node_are_judged_alike_in_every_order() {
        // The SYN and two retransmissions dropped where they were forwarded (no socket:
        // matched by tuple), then the application gave up.
        let dropped = |ts_ns: u64, location: &str| {
            let event = at(drop_event(0, 50_000), ts_ns, |e| &mut e.header);
            let drop = PacketDrop {
                location: location.into(),
                ..netfilter_drop()
            };
            Event::Drop(Box::new((event, drop)))
        };
        let record = in_every_order(
            connect(1, 1_000, IPPROTO_TCP),
            &[
                first_at(1_100, IPPROTO_TCP, 50_000),
                dropped(1_200, "nf_hook_slow+0x1"),
                dropped(1_000_001_200, "nf_hook_slow+0x2"),
                dropped(3_000_001_200, "nf_hook_slow+0x3"),
                Event::State(closed_at(5_000_000_000, 0, 2)),
            ],
        );
        assert_eq!(record.outcome, Outcome::Timeout);
        let drops = record.drops.unwrap();
        assert_eq!(
            (drops.count, drops.first.location.as_str()),
            (3, "nf_hook_slow+0x1")
        );
    }

    #[test]
    fn a_datagram_refused_or_rejected_is_judged_alike_in_every_order() {
        let record = in_every_order(
            connect(1, 1_000, IPPROTO_UDP),
            &[
                first_at(1_100, IPPROTO_UDP, 50_000),
                icmp_at(1_500, IPPROTO_UDP, (3, 3), [203, 0, 113, 10]),
            ],
        );
        assert_eq!(record.outcome, Outcome::Refused);
        // A node rule that rejects: the datagram dropped, an ICMP error from the node.
        let mut dropped = at(drop_event(0, 50_000), 1_300, |e| &mut e.header);
        dropped.protocol = IPPROTO_UDP;
        let record = in_every_order(
            connect(1, 1_000, IPPROTO_UDP),
            &[
                first_at(1_100, IPPROTO_UDP, 50_000),
                Event::Drop(Box::new((dropped, netfilter_drop()))),
                icmp_at(1_500, IPPROTO_UDP, (3, 13), [10, 224, 0, 1]),
            ],
        );
        assert_eq!(record.outcome, Outcome::Unreachable);
        assert_eq!(record.drops.map(|d| d.count), Some(1));
        assert_eq!(record.icmp.map(|i| i.meaning()), Some("admin-prohibited"));
    }

    #[test]
    fn evidence_from_before_an_attempt_is_not_its_own() {
        // A connected UDP socket connects again: same tuple, a new attempt at 5_000. An
        // ICMP error and a drop about the earlier datagram (sent before 5_000) arrive late.
        let mut flows = FlowAssembler::new();
        let mut done = Vec::new();
        flows.on_connect(&connect(1, 1_000, IPPROTO_UDP), origin(), &mut done);
        flows.on_first_packet(&first_packet(1, IPPROTO_UDP, 50_000));
        flows.on_connect(&connect(1, 5_000, IPPROTO_UDP), origin(), &mut done);
        assert_eq!(
            done.len(),
            1,
            "the first attempt is reported when displaced"
        );
        flows.on_first_packet(&first_packet(1, IPPROTO_UDP, 50_000));
        let mut late = icmp(50_000, IPPROTO_UDP, 3, 3);
        late.header.ts_ns = 4_000;
        flows.on_icmp_error(&late);
        let mut dropped = drop_event(1, 50_000);
        dropped.header.ts_ns = 4_500;
        dropped.protocol = IPPROTO_UDP;
        flows.on_drop(&dropped, netfilter_drop());
        flows.drain(&mut done);
        assert_eq!(done.len(), 2);
        assert_eq!(
            (done[1].monotonic_ns, done[1].outcome),
            (5_000, Outcome::Sent)
        );
        assert_eq!((done[1].icmp, done[1].drops.is_none()), (None, true));
        assert_eq!(
            (flows.stats().unmatched_icmp, flows.stats().late_drops),
            (1, 1)
        );
    }

    #[test]
    fn an_ended_attempt_out_of_its_queue_is_still_reported_at_shutdown() {
        // A UDP attempt whose fatal ICMP error came late in its settling time leaves its
        // arrival queue at the settling time, and waits for its release only.
        let mut flows = FlowAssembler::new();
        let mut done = Vec::new();
        let settle = UDP_SETTLE.as_nanos() as u64;
        flows.on_connect(&connect(1, 1_000, IPPROTO_UDP), origin(), &mut done);
        flows.on_first_packet(&first_packet(1, IPPROTO_UDP, 40_000));
        let mut refused = icmp(40_000, IPPROTO_UDP, 3, 3);
        refused.header.ts_ns = settle - 10;
        flows.on_icmp_error(&refused);
        flows.expire(1_000 + settle, &mut done);
        assert!(done.is_empty(), "its evidence may still come");
        flows.drain(&mut done);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].outcome, Outcome::Refused);
    }

    #[test]
    fn icmp_meanings() {
        let meaning = |v6, icmp_type, code| {
            IcmpError {
                v6,
                icmp_type,
                code,
                sender: IpAddr::from([0, 0, 0, 0]),
                mtu: None,
            }
            .meaning()
        };
        assert_eq!(meaning(false, 3, 13), "admin-prohibited");
        assert_eq!(meaning(false, 3, 1), "host-unreachable");
        assert_eq!(meaning(false, 3, 4), "fragmentation-needed");
        assert_eq!(meaning(false, 11, 0), "time-exceeded");
        assert_eq!(meaning(true, 1, 1), "admin-prohibited");
        assert_eq!(meaning(true, 1, 4), "port-unreachable");
        assert_eq!(meaning(true, 2, 0), "packet-too-big");
    }

    #[test]
    fn unconnected_udp_sends_are_attempts_to_each_destination() {
        let mut flows = FlowAssembler::new();
        let mut done = Vec::new();
        let mut first = connect(1, 1_000, IPPROTO_UDP);
        first.call = CALL_SENDMSG;
        flows.on_connect(&first, origin(), &mut done);
        flows.on_first_packet(&first_packet(1, IPPROTO_UDP, 40_000));
        let mut second = connect(1, 2_000, IPPROTO_UDP);
        second.call = CALL_SENDMSG;
        second.dst = endpoint([203, 0, 113, 11], 53);
        flows.on_connect(&second, origin(), &mut done);
        // The first destination is reported when the second displaces it.
        assert_eq!(done.len(), 1);
        assert_eq!((done[0].outcome, done[0].dst.port()), (Outcome::Sent, 80));
        flows.drain(&mut done);
        assert_eq!(done.len(), 2);
        assert_eq!(done[1].outcome, Outcome::Sent);
        assert_eq!(done[1].dst, "203.0.113.11:53".parse().unwrap());
        // Same socket, same source port.
        assert_eq!(done[1].src, Some("10.244.0.5:40000".parse().unwrap()));
        assert_eq!(flows.stats().udp_probes, 0);
    }

    #[test]
    fn silent_udp_connects_are_probes_not_attempts() {
        let mut flows = FlowAssembler::new();
        let mut done = Vec::new();
        let window = UDP_SETTLE.as_nanos() as u64;
        flows.on_connect(&connect(1, 1_000, IPPROTO_UDP), origin(), &mut done);
        flows.expire(1_000 + window - 1, &mut done);
        assert_eq!(flows.stats().udp_probes, 0);
        flows.expire(1_000 + window, &mut done);
        assert!(done.is_empty());
        assert_eq!(flows.stats().udp_probes, 1);
        // Also at shutdown.
        flows.on_connect(&connect(2, 5_000, IPPROTO_UDP), origin(), &mut done);
        flows.drain(&mut done);
        assert!(done.is_empty());
        assert_eq!(flows.stats().udp_probes, 2);
    }

    #[test]
    fn unresolved_handshakes_are_emitted_in_progress() {
        let mut flows = FlowAssembler::new();
        let mut done = Vec::new();
        let limit = MAX_TCP_WAIT.as_nanos() as u64;
        flows.on_connect(&connect(1, 1_000, IPPROTO_TCP), origin(), &mut done);
        flows.on_connect(&connect(2, 2_000, IPPROTO_TCP), origin(), &mut done);
        flows.expire(1_000 + limit, &mut done);
        assert_eq!(done.len(), 1);
        assert_eq!(
            (done[0].monotonic_ns, done[0].outcome),
            (1_000, Outcome::InProgress)
        );
        assert_eq!(flows.stats().evicted, 1);
        flows.drain(&mut done);
        assert_eq!(done.len(), 2);
        assert_eq!(
            (done[1].monotonic_ns, done[1].outcome),
            (2_000, Outcome::InProgress)
        );
    }

    #[test]
    fn events_of_unknown_sockets_are_ignored() {
        let mut flows = FlowAssembler::new();
        let mut done = Vec::new();
        flows.on_first_packet(&first_packet(9, IPPROTO_UDP, 1));
        flows.on_sock_state(&state(9, 2, TCP_ESTABLISHED, 0, 0), &mut done);
        assert!(done.is_empty());
    }

    #[test]
    fn pending_is_bounded() {
        let mut flows = FlowAssembler::new();
        let mut done = Vec::new();
        for cookie in 0..(MAX_PENDING as u64 + 3) {
            flows.on_connect(&connect(cookie, cookie, IPPROTO_TCP), origin(), &mut done);
        }
        assert_eq!(flows.stats().evicted, 3);
        assert_eq!(
            done.iter().map(|a| a.monotonic_ns).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        assert_eq!(flows.pending.len(), MAX_PENDING);
    }

    #[test]
    fn errno_names() {
        assert_eq!(errno_name(111), "ECONNREFUSED");
        assert_eq!(errno_name(113), "EHOSTUNREACH");
        assert_eq!(errno_name(4242), "errno 4242");
    }

    #[test]
    fn reply_hops_count_down_from_the_usual_initial_ttls() {
        let hops = |ttl| {
            HandshakeReply {
                ttl,
                reset: true,
                endpoint_hops: None,
            }
            .hops()
        };
        assert_eq!((hops(64), hops(62), hops(1)), (0, 2, 63));
        assert_eq!((hops(120), hops(128)), (8, 0));
        assert_eq!((hops(250), hops(255)), (5, 0));
    }
}
