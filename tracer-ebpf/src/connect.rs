//! cgroup `connect4`/`connect6`: one event per `connect()` of a TCP or UDP socket; and
//! cgroup `sendmsg4`/`sendmsg6`: one event for the first send of an unconnected UDP socket
//! to each destination (resolvers such as musl's, and `sendto()` users), except a DNS
//! server's answers (sent from port 53).
//!
//! Attached to kubelet's pod cgroups, so every pod's process is seen (and the node's own
//! processes cost nothing); userspace attributes the event to a pod by its cgroup id.
//! The programs never change the call: they always return "allow".

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use tracer_common::{
    AF_INET, AF_INET6, CALL_CONNECT, CALL_SENDMSG, COMM_LEN, ConnectEvent, Counter, Endpoint,
    EventKind, IPPROTO_TCP, IPPROTO_UDP, SocketDestination,
};

use crate::maps::{PENDING_UDP_SOCKS, UDP_DESTINATIONS_SEEN, count, emit, header, is_traced};

/// Return value of cgroup sock_addr programs that lets the syscall proceed.
const ALLOW: i32 = 1;
/// A DNS server's sends leave from this port: answers to lookups (which the packet
/// programs trace as DNS messages), not egress attempts.
const DNS_PORT: u32 = 53;

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    report(&ctx, AF_INET, CALL_CONNECT);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    report(&ctx, AF_INET6, CALL_CONNECT);
    ALLOW
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    report(&ctx, AF_INET, CALL_SENDMSG);
    ALLOW
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    report(&ctx, AF_INET6, CALL_SENDMSG);
    ALLOW
}

/// The destination the application passed.
#[inline(always)]
fn destination(ctx: &SockAddrContext, family: u16) -> Endpoint {
    // SAFETY: the context pointer is valid for the duration of the program.
    let sa = unsafe { &*ctx.sock_addr };
    let mut addr = [0u8; 16];
    if family == AF_INET {
        addr[..4].copy_from_slice(&sa.user_ip4.to_ne_bytes());
    } else {
        for (i, word) in sa.user_ip6.iter().enumerate() {
            addr[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
    }
    Endpoint {
        family,
        // user_port holds the port in network byte order in its low 16 bits.
        port: u16::from_be(sa.user_port as u16),
        addr,
    }
}

#[inline(always)]
fn report(ctx: &SockAddrContext, family: u16, call: u8) {
    // SAFETY: as above.
    let protocol = unsafe { (*ctx.sock_addr).protocol } as u8;
    if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
        return;
    }
    let dst = destination(ctx, family);
    // SAFETY: helper valid in cgroup sock_addr programs.
    let sock_cookie = unsafe { aya_ebpf::helpers::bpf_get_socket_cookie(ctx.as_ptr()) };
    if call == CALL_SENDMSG {
        // SAFETY: as above; `sk` is the calling socket, never null in these programs.
        if unsafe { (*(*ctx.sock_addr).__bindgen_anon_1.sk).src_port } == DNS_PORT {
            return;
        }
        // Report a socket's first send to each destination only.
        let key = SocketDestination {
            sock_cookie,
            dst,
            _pad: [0; 4],
        };
        // SAFETY: only existence is checked.
        if unsafe { UDP_DESTINATIONS_SEEN.get(key) }.is_some() {
            return;
        }
        let _ = UDP_DESTINATIONS_SEEN.insert(key, 0, 0);
    }
    // SAFETY: no arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    if !is_traced(cgroup_id) {
        return;
    }
    count(Counter::ConnectSeen);
    if protocol == IPPROTO_UDP {
        // Every attempt starts over: a new connect(), or the first send of an unconnected
        // UDP socket to another destination (its entry went with its earlier first
        // packet). Ignore a full map: LRU evicts, and a missing entry only costs the
        // socket's first packet.
        let _ = PENDING_UDP_SOCKS.insert(sock_cookie, 0, 0);
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let event = ConnectEvent {
        header: header(EventKind::Connect),
        cgroup_id,
        sock_cookie,
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        comm: bpf_get_current_comm().unwrap_or([0; COMM_LEN]),
        protocol,
        call,
        _pad: [0; 6],
        dst,
    };
    if emit(event).is_err() {
        count(Counter::ConnectLost);
    }
}
