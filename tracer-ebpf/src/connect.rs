//! cgroup `connect4`/`connect6`: one event per `connect()` of a TCP or UDP socket.
//!
//! Attached at the cgroup v2 root, so every process on the node (pods and host) is seen;
//! userspace attributes the event to a pod by its cgroup id. The programs never change
//! the call: they always return "allow".

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use tracer_common::{
    AF_INET, AF_INET6, COMM_LEN, ConnectEvent, Counter, Endpoint, EventKind, IPPROTO_TCP,
    IPPROTO_UDP,
};

use crate::maps::{EVENTS, FIRST_PACKET_PENDING, TRACKED_SOCKS, count, header, is_traced};

/// Return value of cgroup sock_addr programs that lets the syscall proceed.
const ALLOW: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the duration of the program.
    let sa = unsafe { &*ctx.sock_addr };
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&sa.user_ip4.to_ne_bytes());
    report(&ctx, AF_INET, sa.protocol, sa.user_port, addr);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as above.
    let sa = unsafe { &*ctx.sock_addr };
    let mut addr = [0u8; 16];
    for (i, word) in sa.user_ip6.iter().enumerate() {
        addr[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    report(&ctx, AF_INET6, sa.protocol, sa.user_port, addr);
    ALLOW
}

#[inline(always)]
fn report(ctx: &SockAddrContext, family: u16, protocol: u32, user_port: u32, addr: [u8; 16]) {
    let protocol = protocol as u8;
    if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
        return;
    }
    count(Counter::ConnectSeen);
    // SAFETY: no arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    if !is_traced(cgroup_id) {
        return;
    }
    // SAFETY: helpers valid in cgroup sock_addr programs.
    let sock_cookie = unsafe { aya_ebpf::helpers::bpf_get_socket_cookie(ctx.as_ptr()) };
    // Ignore a full map: LRU evicts, and a missing entry only costs the first packet.
    let _ = TRACKED_SOCKS.insert(sock_cookie, FIRST_PACKET_PENDING, 0);
    let pid_tgid = bpf_get_current_pid_tgid();
    let event = ConnectEvent {
        header: header(EventKind::Connect),
        cgroup_id,
        sock_cookie,
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        comm: bpf_get_current_comm().unwrap_or([0; COMM_LEN]),
        protocol,
        _pad: [0; 7],
        dst: Endpoint {
            family,
            // user_port holds the port in network byte order in its low 16 bits.
            port: u16::from_be(user_port as u16),
            addr,
        },
    };
    if EVENTS.output::<ConnectEvent>(&event, 0).is_err() {
        count(Counter::ConnectLost);
    }
}
