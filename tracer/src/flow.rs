//! Flow assembly: joins the kernel events of one egress attempt into one record.
//!
//! A TCP attempt starts with its `connect()`, learns its source address and port from its
//! first SYN, and is complete when its socket leaves `SYN_SENT`. Attempts whose socket
//! does not leave `SYN_SENT` within [`TCP_HOLD`] are emitted as they are, so a hanging
//! handshake never delays the record. UDP attempts are complete at `connect()`.
//!
//! Memory is bounded: at most [`MAX_PENDING`] attempts wait; beyond that the oldest is
//! emitted early and counted in [`FlowAssembler::evicted`].

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    time::Duration,
};

use tracer_common::{ConnectEvent, IPPROTO_TCP, IPPROTO_UDP, SockStateEvent, SynEvent};

use crate::capture::{comm, socket_addr};

/// How long a TCP attempt waits for its socket to leave `SYN_SENT`.
pub const TCP_HOLD: Duration = Duration::from_secs(1);
/// Most attempts held at once.
pub const MAX_PENDING: usize = 65_536;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

/// Who made the attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    /// `namespace/name` of the pod, `None` for host processes and unknown pods.
    pub pod: Option<String>,
    /// The pod UID from the cgroup path, even when the pod itself is unknown.
    pub pod_uid: Option<String>,
}

/// One egress attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attempt {
    /// `CLOCK_MONOTONIC` nanoseconds of the `connect()`.
    pub monotonic_ns: u64,
    pub origin: Origin,
    pub pid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    pub protocol: Protocol,
    /// Source chosen by the kernel, when the kernel revealed it.
    pub src: Option<SocketAddr>,
    pub dst: SocketAddr,
}

#[derive(Default)]
pub struct FlowAssembler {
    pending: HashMap<u64, Attempt>,
    /// Cookies in arrival order; may hold cookies already completed (skipped lazily).
    order: VecDeque<u64>,
    evicted: u64,
}

impl FlowAssembler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts an attempt. Pushes it to `done` at once when nothing more will be learned
    /// (UDP), along with any attempt evicted to make room.
    pub fn on_connect(&mut self, event: &ConnectEvent, origin: Origin, done: &mut Vec<Attempt>) {
        let protocol = match event.protocol {
            IPPROTO_TCP => Protocol::Tcp,
            IPPROTO_UDP => Protocol::Udp,
            _ => return,
        };
        let Some(dst) = socket_addr(&event.dst) else {
            return;
        };
        let attempt = Attempt {
            monotonic_ns: event.header.ts_ns,
            origin,
            pid: event.pid,
            comm: comm(&event.comm),
            cgroup_id: event.cgroup_id,
            protocol,
            src: None,
            dst,
        };
        if protocol == Protocol::Udp {
            done.push(attempt);
            return;
        }
        if self.pending.len() >= MAX_PENDING {
            self.evict_oldest(done);
        }
        if let Some(previous) = self.pending.insert(event.sock_cookie, attempt) {
            // Cookie reuse means the earlier socket is gone: finish it as it is.
            done.push(previous);
        }
        self.order.push_back(event.sock_cookie);
    }

    /// Records the source of the attempt whose first SYN this is.
    pub fn on_syn(&mut self, event: &SynEvent) {
        if let Some(attempt) = self.pending.get_mut(&event.sock_cookie) {
            attempt.src = socket_addr(&event.src);
        }
    }

    /// Completes the attempt of this socket, if one is pending.
    pub fn on_sock_state(&mut self, event: &SockStateEvent, done: &mut Vec<Attempt>) {
        if let Some(mut attempt) = self.pending.remove(&event.sock_cookie) {
            // The socket's own tuple stands in when no SYN was seen (the SYN hook is
            // optional). A socket that failed its handshake has already released its
            // port when it reaches CLOSE, so port 0 means "not known", not port 0.
            if attempt.src.is_none() {
                attempt.src = socket_addr(&event.src).filter(|src| src.port() != 0);
            }
            done.push(attempt);
        }
    }

    /// Emits attempts that waited longer than [`TCP_HOLD`] at monotonic time `now_ns`.
    pub fn expire(&mut self, now_ns: u64, done: &mut Vec<Attempt>) {
        let hold = TCP_HOLD.as_nanos() as u64;
        while let Some(&cookie) = self.order.front() {
            match self.pending.get(&cookie) {
                None => {
                    self.order.pop_front();
                }
                Some(attempt) if now_ns.saturating_sub(attempt.monotonic_ns) >= hold => {
                    self.order.pop_front();
                    done.extend(self.pending.remove(&cookie));
                }
                Some(_) => break,
            }
        }
        // Completed cookies left in `order` are bounded by the same cap as `pending`.
        if self.order.len() > 2 * MAX_PENDING {
            self.order.retain(|c| self.pending.contains_key(c));
        }
    }

    /// Emits everything still pending (at shutdown), oldest first.
    pub fn drain(&mut self, done: &mut Vec<Attempt>) {
        while let Some(cookie) = self.order.pop_front() {
            done.extend(self.pending.remove(&cookie));
        }
    }

    /// Attempts emitted early because [`MAX_PENDING`] was reached.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    fn evict_oldest(&mut self, done: &mut Vec<Attempt>) {
        while let Some(cookie) = self.order.pop_front() {
            if let Some(attempt) = self.pending.remove(&cookie) {
                self.evicted += 1;
                done.push(attempt);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tracer_common::{AF_INET, Endpoint, EventHeader, EventKind, TCP_ESTABLISHED, TCP_SYN_SENT};

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
            _pad: [0; 7],
            dst: endpoint([203, 0, 113, 10], 80),
        }
    }

    fn established(cookie: u64) -> SockStateEvent {
        SockStateEvent {
            header: EventHeader {
                kind: EventKind::SockState as u32,
                cpu: 0,
                ts_ns: 2,
            },
            sock_cookie: cookie,
            old_state: TCP_SYN_SENT,
            new_state: TCP_ESTABLISHED,
            _pad: [0; 6],
            src: endpoint([10, 244, 0, 5], 41234),
            dst: endpoint([203, 0, 113, 10], 80),
        }
    }

    fn origin() -> Origin {
        Origin {
            pod: Some("shop/web".into()),
            pod_uid: None,
        }
    }

    #[test]
    fn tcp_attempt_completes_with_source() {
        let mut flows = FlowAssembler::new();
        let mut done = Vec::new();
        flows.on_connect(&connect(1, 1, IPPROTO_TCP), origin(), &mut done);
        assert!(done.is_empty());
        flows.on_sock_state(&established(1), &mut done);
        assert_eq!(done.len(), 1);
        let a = &done[0];
        assert_eq!(a.src, Some("10.244.0.5:41234".parse().unwrap()));
        assert_eq!(a.dst, "203.0.113.10:80".parse().unwrap());
        assert_eq!(
            (a.pid, a.comm.as_str(), a.protocol),
            (100, "curl", Protocol::Tcp)
        );
        assert_eq!(a.origin.pod.as_deref(), Some("shop/web"));
    }

    fn syn(cookie: u64, port: u16) -> SynEvent {
        SynEvent {
            header: EventHeader {
                kind: EventKind::Syn as u32,
                cpu: 0,
                ts_ns: 2,
            },
            sock_cookie: cookie,
            src: endpoint([10, 244, 0, 5], port),
            dst: endpoint([203, 0, 113, 10], 81),
        }
    }

    #[test]
    fn failed_handshake_keeps_the_source_of_its_syn() {
        let mut flows = FlowAssembler::new();
        let mut done = Vec::new();
        flows.on_connect(&connect(1, 1, IPPROTO_TCP), origin(), &mut done);
        flows.on_syn(&syn(1, 50_000));
        flows.on_syn(&syn(2, 50_001));
        let mut refused = established(1);
        refused.new_state = tracer_common::TCP_CLOSE;
        refused.src.port = 0;
        flows.on_sock_state(&refused, &mut done);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].src, Some("10.244.0.5:50000".parse().unwrap()));
    }

    #[test]
    fn failed_handshake_has_no_source_port() {
        let mut flows = FlowAssembler::new();
        let mut done = Vec::new();
        flows.on_connect(&connect(1, 1, IPPROTO_TCP), origin(), &mut done);
        let mut refused = established(1);
        refused.new_state = tracer_common::TCP_CLOSE;
        refused.src.port = 0;
        flows.on_sock_state(&refused, &mut done);
        assert_eq!(done[0].src, None);
    }

    #[test]
    fn udp_attempt_is_immediate_and_unrelated_state_is_ignored() {
        let mut flows = FlowAssembler::new();
        let mut done = Vec::new();
        flows.on_connect(&connect(1, 1, IPPROTO_UDP), origin(), &mut done);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].protocol, Protocol::Udp);
        flows.on_sock_state(&established(9), &mut done);
        assert_eq!(done.len(), 1);
    }

    #[test]
    fn hanging_handshake_expires_without_source() {
        let mut flows = FlowAssembler::new();
        let mut done = Vec::new();
        let hold = TCP_HOLD.as_nanos() as u64;
        flows.on_connect(&connect(1, 1_000, IPPROTO_TCP), origin(), &mut done);
        flows.on_connect(&connect(2, 2_000, IPPROTO_TCP), origin(), &mut done);
        flows.expire(1_000 + hold - 1, &mut done);
        assert!(done.is_empty());
        flows.expire(1_000 + hold, &mut done);
        assert_eq!(done.len(), 1);
        assert_eq!((done[0].monotonic_ns, done[0].src), (1_000, None));
        flows.drain(&mut done);
        assert_eq!(done.len(), 2);
        assert_eq!(done[1].monotonic_ns, 2_000);
    }

    #[test]
    fn pending_is_bounded() {
        let mut flows = FlowAssembler::new();
        let mut done = Vec::new();
        for cookie in 0..(MAX_PENDING as u64 + 3) {
            flows.on_connect(&connect(cookie, cookie, IPPROTO_TCP), origin(), &mut done);
        }
        assert_eq!(flows.evicted(), 3);
        assert_eq!(
            done.iter().map(|a| a.monotonic_ns).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        assert_eq!(flows.pending.len(), MAX_PENDING);
    }
}
