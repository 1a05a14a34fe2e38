//! The end of each traced TCP handshake, reported once per `connect()` with its tuple, the
//! first answer to its SYN (seen by [`reply`](crate::reply)), its error and its SYN
//! retransmissions:
//!
//! - established: at the SYN-ACK, seen by [`reply`](crate::reply) at the socket's cgroup
//!   ingress (the kernel establishes the socket right after that hook);
//! - failed: tp_btf `inet_sk_error_report`, when the kernel gives the handshake up (a
//!   reset, an ICMP error, the SYN retries exhausted) with `sk_err` set;
//! - abandoned: tp_btf `tcp_destroy_sock`, when the application closes a socket whose
//!   handshake never ended (a client's own timeout), or one whose failure the error
//!   report did not carry.
//!
//! The two tracepoints run for every TCP socket of the node, but only on errors and at
//! destruction, and they keep to plain loads from the socket until it proves to be a
//! client's (a cookie, and not a listening or bound one) that no answer established
//! (`tcp_sock.rcv_nxt` is 0 from `connect()` until the SYN-ACK), then check that it is a
//! pod's (its cgroup below a pod cgroup root: other BPF programs, such as a CNI's, and
//! `ss` give the node's own sockets cookies too). `FAILING_HANDSHAKES`
//! keeps a failure that the error report made from being reported again at destruction.

use core::ffi::c_void;

use aya_ebpf::{
    macros::btf_tracepoint,
    programs::{BtfTracePointContext, SkBuffContext},
};
use tracer_common::{
    Counter, Endpoint, EventKind, HandshakeKey, HandshakeTotals, IPPROTO_TCP, SockStateEvent,
    TCP_CLOSE, TCP_ESTABLISHED, TCP_FLAG_RST, TCP_SYN_SENT, handshake_outcome,
};

use crate::{
    maps::{FAILING_HANDSHAKES, FailingHandshake, HANDSHAKES, count, emit, header, is_traced},
    packets::Packet,
    skb::read,
    sock,
};

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

/// Reports the established handshake of the traced socket `cookie` (connected in
/// `cgroup_id`), whose SYN-ACK `packet` (arrived with `ttl`) is.
#[inline(always)]
pub fn established(
    ctx: &SkBuffContext,
    packet: &Packet,
    cookie: u64,
    cgroup_id: u64,
    syn_retransmits: u32,
    ttl: u8,
) -> Result<(), i64> {
    // The answer comes from the far end: the socket's own tuple is its reverse.
    let (dst, src) = packet.endpoints(ctx)?;
    report(
        cookie,
        cgroup_id,
        Ending {
            new_state: TCP_ESTABLISHED,
            reply_tcp_flags: packet.tcp_flags,
            reply_ttl: ttl,
            error: 0,
            soft_error: 0,
            syn_retransmits,
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
    let off = sock::offsets();
    // The cookie as a plain load, not `bpf_get_socket_cookie`: that helper gives every
    // socket without one (most of those these tracepoints see: the node's other
    // sockets, servers' accepted ones) a cookie from a counter all CPUs share.
    // SAFETY: `sk` is the tracepoint's `struct sock *`; the offsets are fields of it.
    let (cookie, local_port, dport, protocol) = unsafe {
        (
            sock::cookie(sk),
            sock::field::<u16>(sk, off.num),
            sock::field::<u16>(sk, off.dport),
            sock::field::<u16>(sk, off.protocol),
        )
    };
    // No cookie: not a socket whose connect() a hook saw. A local port but no destination: a
    // listening or bound socket that never connected. (A connect() that failed before
    // sending, for want of a route or a free port, leaves neither: reported, as the
    // application gave it up.)
    if cookie == 0 || (dport == 0 && local_port != 0) || protocol != u16::from(IPPROTO_TCP) {
        return;
    }
    // `tcp_sock` fields lie beyond the `struct sock` the verifier knows `sk` as: read
    // with the helper, which fails instead of faulting.
    let tcp_field = |offset: u32| read::<u32>(sk, offset as usize);
    if tcp_field(off.rcv_nxt) != Ok(0) {
        return;
    }
    // Not a pod's socket: the node's own.
    let Some(cgroup_id) = sock::pod_cgroup_id(sk) else {
        return;
    };
    if !is_traced(cgroup_id) {
        return;
    }
    // The SYN's sequence number: nothing acknowledged it.
    let syn_seq = tcp_field(off.snd_una).unwrap_or(0);
    // SAFETY: the value is copied out at once.
    let failing = unsafe { FAILING_HANDSHAKES.get(cookie) }
        .copied()
        .filter(|known| known.syn_seq == syn_seq)
        .unwrap_or(FailingHandshake {
            syn_seq,
            reply_tcp_flags: 0,
            reply_ttl: 0,
            reported: 0,
            _pad: 0,
        });
    // Reported already. The error report can come again for the same socket (a second
    // ICMP error, for a retransmitted SYN, or `tcp_disconnect()`): only the socket's
    // destruction ends the entry, or the destruction would report the failure again.
    if failing.reported != 0 {
        if reporter == Reporter::Destruction {
            let _ = FAILING_HANDSHAKES.remove(cookie);
        }
        return;
    }
    // SAFETY: `sk` is the tracepoint's `struct sock *` and these are fields of it.
    let (mut error, soft_error) = unsafe {
        (
            sock::field::<i32>(sk, off.err),
            sock::field::<i32>(sk, off.err_soft),
        )
    };
    // A reset answering the SYN fails the handshake with ECONNREFUSED, which the
    // application may have read (and so cleared) before these hooks run: woken by the
    // socket's close, it can read before the error report is made.
    if error == 0 && failing.reply_tcp_flags & TCP_FLAG_RST != 0 {
        error = ECONNREFUSED;
    }
    // An error report without an error in the socket (as for ICMP errors on this
    // kernel) leaves the socket to its destruction, by when the ICMP error that
    // explains it has been seen.
    if reporter == Reporter::ErrorReport && error == 0 && soft_error == 0 {
        return;
    }
    // A failed socket may have released its port already: userspace then keeps the
    // source its first packet showed.
    // SAFETY: as above.
    let (src, dst) = unsafe { sock::tuple(sk) };
    report(
        cookie,
        cgroup_id,
        Ending {
            new_state: TCP_CLOSE,
            reply_tcp_flags: failing.reply_tcp_flags,
            reply_ttl: failing.reply_ttl,
            error,
            soft_error,
            // A failed read leaves it 0, "not known".
            syn_retransmits: tcp_field(off.total_retrans).unwrap_or(0),
        },
        src,
        dst,
    );
    if reporter == Reporter::ErrorReport {
        let reported = FailingHandshake {
            reported: 1,
            ..failing
        };
        let _ = FAILING_HANDSHAKES.insert(cookie, reported, 0);
    } else {
        let _ = FAILING_HANDSHAKES.remove(cookie);
    }
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
fn report(cookie: u64, cgroup_id: u64, ending: Ending, src: Endpoint, dst: Endpoint) {
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
    count_handshake(cgroup_id, &event);
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
