//! The end of each traced TCP handshake, reported once per `connect()` with its tuple, the
//! first answer to its SYN (kept by [`reply`](crate::reply)), its error and its SYN
//! retransmissions:
//!
//! - established: at the SYN-ACK, seen by [`reply`](crate::reply) at the socket's cgroup
//!   ingress (the kernel establishes the socket right after that hook);
//! - failed: tp_btf `inet_sk_error_report`, when the kernel gives the handshake up (a
//!   reset, an ICMP error, the SYN retries exhausted) with `sk_err` set;
//! - abandoned: tp_btf `tcp_destroy_sock`, when the application closes a socket still
//!   in `SYN_SENT` (a client's own timeout).
//!
//! Whichever comes first removes the socket from `TRACKED_SOCKS`, so the others find
//! nothing. The two tracepoints run for every TCP socket of the node, but only on errors
//! and at destruction: far fewer runs than a hook on every state change, and one lookup
//! each for sockets that are not traced.
//!
//! `struct sock` is read at offsets resolved by userspace from the running kernel's BTF
//! (`SOCK_OFFSETS`): Rust eBPF has no CO-RE.

use core::ffi::c_void;

use aya_ebpf::{
    Global,
    helpers::bpf_probe_read_kernel,
    macros::btf_tracepoint,
    programs::{BtfTracePointContext, SkBuffContext},
};
use tracer_common::{
    AF_INET, AF_INET6, Counter, Endpoint, EventKind, HandshakeKey, HandshakeTotals, IPPROTO_TCP,
    SockOffsets, SockStateEvent, TCP_CLOSE, TCP_ESTABLISHED, TCP_FLAG_RST, TCP_SYN_SENT,
    handshake_outcome,
};

use crate::{
    maps::{HANDSHAKES, TRACKED_SOCKS, TrackedSocket, count, emit, header},
    packets::Packet,
};

/// Set by userspace at load time (`EbpfLoader::set_global`).
#[unsafe(no_mangle)]
static SOCK_OFFSETS: Global<SockOffsets> = Global::new(SockOffsets {
    family: 0,
    num: 0,
    dport: 0,
    rcv_saddr: 0,
    daddr: 0,
    v6_rcv_saddr: 0,
    v6_daddr: 0,
    err: 0,
    err_soft: 0,
    total_retrans: 0,
    cookie: 0,
});

#[btf_tracepoint(function = "inet_sk_error_report")]
pub fn inet_sk_error_report(ctx: BtfTracePointContext) -> i32 {
    handshake_failed(ctx.arg(0), Reporter::ErrorReport);
    0
}

#[btf_tracepoint(function = "tcp_destroy_sock")]
pub fn tcp_destroy_sock(ctx: BtfTracePointContext) -> i32 {
    handshake_failed(ctx.arg(0), Reporter::Destruction);
    0
}

/// Which tracepoint saw a handshake fail.
#[derive(PartialEq, Eq)]
enum Reporter {
    ErrorReport,
    Destruction,
}

/// Reports the established handshake of the traced socket `cookie`, whose SYN-ACK
/// `packet` (arrived with `ttl`) is.
#[inline(always)]
pub fn established(
    ctx: &SkBuffContext,
    packet: &Packet,
    cookie: u64,
    socket: TrackedSocket,
    ttl: u8,
) -> Result<(), i64> {
    // The answer comes from the far end: the socket's own tuple is its reverse.
    let (dst, src) = packet.endpoints(ctx)?;
    let _ = TRACKED_SOCKS.remove(cookie);
    report(
        cookie,
        &socket,
        Ending {
            new_state: TCP_ESTABLISHED,
            reply_tcp_flags: packet.tcp_flags,
            reply_ttl: ttl,
            error: 0,
            soft_error: 0,
            syn_retransmits: u32::from(socket.syns_sent.saturating_sub(1)),
        },
        src,
        dst,
    );
    Ok(())
}

/// Reports the failed (or abandoned) handshake of `sk`, if it is a traced socket's.
#[inline(always)]
fn handshake_failed(sk: *const c_void, reporter: Reporter) {
    let sk = sk as *const u8;
    let off = SOCK_OFFSETS.load();
    // The cookie as a plain load, not `bpf_get_socket_cookie`: that helper gives every
    // socket without one (most of those these tracepoints see: the node's other
    // sockets, servers' accepted ones) a cookie from a counter all CPUs share.
    // SAFETY: `sk` is the tracepoint's `struct sock *`; the offset is a field of it.
    let cookie = unsafe { *sk.add(off.cookie as usize).cast::<u64>() };
    if cookie == 0 {
        return;
    }
    // SAFETY: the value is copied out at once.
    let Some(&socket) = (unsafe { TRACKED_SOCKS.get(cookie) }) else {
        return;
    };
    if socket.protocol != IPPROTO_TCP {
        return;
    }
    // SAFETY: `sk` is the tracepoint's `struct sock *` and these are fields of it (plain
    // loads, as in `read_tuple`).
    let sock_field = |offset: u32| unsafe { *sk.add(offset as usize).cast::<i32>() };
    let (mut error, soft_error) = (sock_field(off.err), sock_field(off.err_soft));
    // A reset answering the SYN fails the handshake with ECONNREFUSED, which the
    // application may have read (and so cleared) before these hooks run: woken by the
    // socket's close, it can read before the error report is made.
    if error == 0 && socket.reply_tcp_flags & TCP_FLAG_RST != 0 {
        error = ECONNREFUSED;
    }
    // An error report without an error in the socket (as for ICMP errors on this
    // kernel) leaves the socket to its destruction, by when the ICMP error that
    // explains it has been seen.
    if reporter == Reporter::ErrorReport && error == 0 && soft_error == 0 {
        return;
    }
    let _ = TRACKED_SOCKS.remove(cookie);
    // `total_retrans` is a field of `struct tcp_sock`, beyond the `struct sock` the
    // verifier knows `sk` as: read with the helper, which fails instead of faulting (a
    // failed read leaves it 0, "not known").
    // SAFETY: as above.
    let syn_retransmits =
        unsafe { bpf_probe_read_kernel(sk.add(off.total_retrans as usize) as *const u32) }
            .unwrap_or(0);
    // A failed socket may have released its port already: userspace then keeps the
    // source its first packet showed.
    let (src, dst) = read_tuple(sk);
    report(
        cookie,
        &socket,
        Ending {
            new_state: TCP_CLOSE,
            reply_tcp_flags: socket.reply_tcp_flags,
            reply_ttl: socket.reply_ttl,
            error,
            soft_error,
            syn_retransmits,
        },
        src,
        dst,
    );
}

/// How a handshake ended, as its [`SockStateEvent`] tells.
struct Ending {
    new_state: u8,
    reply_tcp_flags: u8,
    reply_ttl: u8,
    error: i32,
    soft_error: i32,
    syn_retransmits: u32,
}

#[inline(always)]
fn report(cookie: u64, socket: &TrackedSocket, ending: Ending, src: Endpoint, dst: Endpoint) {
    count(Counter::SockStateSeen);
    let event = SockStateEvent {
        header: header(EventKind::SockState),
        sock_cookie: cookie,
        old_state: TCP_SYN_SENT,
        new_state: ending.new_state,
        reply_tcp_flags: ending.reply_tcp_flags,
        reply_ttl: ending.reply_ttl,
        error: ending.error,
        soft_error: ending.soft_error,
        syn_retransmits: ending.syn_retransmits,
        src,
        dst,
    };
    count_handshake(socket.cgroup_id, &event);
    if emit(event).is_err() {
        count(Counter::SockStateLost);
    }
}

/// Adds the handshake to `HANDSHAKES`, which counts what the ring buffer may lose. A
/// socket leaves `SYN_SENT` once per `connect()`, so each handshake counts once.
#[inline(always)]
fn count_handshake(cgroup_id: u64, event: &SockStateEvent) {
    let key = HandshakeKey {
        cgroup_id,
        addr: event.dst.addr,
        family: event.dst.family,
        outcome: handshake_outcome(
            event.new_state,
            event.error,
            event.soft_error,
            event.syn_retransmits,
        ),
        _pad: [0; 5],
    };
    let retransmits = u64::from(event.syn_retransmits);
    for _ in 0..2 {
        if let Some(totals) = HANDSHAKES.get_ptr_mut(key) {
            // SAFETY: a per-CPU value: only this CPU writes it, and it stays valid while
            // this program runs (RCU).
            unsafe {
                (*totals).handshakes += 1;
                (*totals).syn_retransmits += retransmits;
            }
            return;
        }
        let first = HandshakeTotals {
            handshakes: 1,
            syn_retransmits: retransmits,
        };
        // BPF_NOEXIST: if another CPU created the key meanwhile, add to it instead.
        match HANDSHAKES.insert(key, first, BPF_NOEXIST) {
            Ok(()) => return,
            Err(EEXIST) => continue,
            Err(_) => break,
        }
    }
    count(Counter::HandshakeUncounted);
}

const BPF_NOEXIST: u64 = 1;
const EEXIST: i32 = -17;
const ECONNREFUSED: i32 = 111;

/// The tuple from `struct sock_common`, read with plain loads: the verifier knows `sk`'s
/// type from the tracepoint's BTF, checks each constant offset (the frozen
/// `SOCK_OFFSETS`) against it, and makes the loads fault-safe, without a helper call each.
#[inline(always)]
fn read_tuple(sk: *const u8) -> (Endpoint, Endpoint) {
    let off = SOCK_OFFSETS.load();
    // SAFETY: `sk` is the tracepoint's `struct sock *`; every offset is a field of it.
    unsafe {
        let field = |offset: u32| sk.add(offset as usize);
        let family = *field(off.family).cast::<u16>();
        let mut src = Endpoint {
            family,
            port: *field(off.num).cast::<u16>(),
            addr: [0; 16],
        };
        let mut dst = Endpoint {
            family,
            port: u16::from_be(*field(off.dport).cast::<u16>()),
            addr: [0; 16],
        };
        if family == AF_INET {
            src.addr[..4].copy_from_slice(&(*field(off.rcv_saddr).cast::<u32>()).to_ne_bytes());
            dst.addr[..4].copy_from_slice(&(*field(off.daddr).cast::<u32>()).to_ne_bytes());
        } else if family == AF_INET6 {
            src.addr = ipv6(field(off.v6_rcv_saddr));
            dst.addr = ipv6(field(off.v6_daddr));
        }
        (src, dst)
    }
}

/// A `struct in6_addr` in 32-bit loads (its alignment).
///
/// # Safety
/// `at` is a `struct in6_addr` field of the tracepoint's `struct sock`.
#[inline(always)]
unsafe fn ipv6(at: *const u8) -> [u8; 16] {
    let mut addr = [0u8; 16];
    for word in 0..4 {
        // SAFETY: per the contract, within the field.
        let value = unsafe { *at.add(word * 4).cast::<u32>() };
        addr[word * 4..word * 4 + 4].copy_from_slice(&value.to_ne_bytes());
    }
    addr
}
