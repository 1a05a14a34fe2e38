//! tp_btf `inet_sock_set_state`: the tuple and handshake result of traced TCP sockets, with
//! the first answer to their SYN that [`reply`](crate::reply) kept.
//!
//! `connect()` runs before the kernel picks the source port, so the full tuple is only
//! known when the socket leaves `SYN_SENT`. Only sockets that `connect` put into
//! `TRACKED_SOCKS` are reported, which keeps the cost for other sockets to one lookup;
//! leaving `SYN_SENT` also ends their tracking.
//!
//! `struct sock` is read at offsets resolved by userspace from the running kernel's BTF
//! (`SOCK_OFFSETS`): Rust eBPF has no CO-RE.

use core::ffi::c_void;

use aya_ebpf::{
    Global,
    helpers::{bpf_get_socket_cookie, bpf_probe_read_kernel},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use tracer_common::{
    AF_INET, AF_INET6, Counter, Endpoint, EventKind, FlowTuple, HandshakeKey, HandshakeTotals,
    IPPROTO_TCP, SockOffsets, SockStateEvent, TCP_ESTABLISHED, TCP_SYN_SENT, handshake_outcome,
};

use crate::maps::{
    EVENTS, HANDSHAKES, TRACKED_SOCKS, TRACKED_TUPLES, TrackedSocket, count, header, wakeup,
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
});

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: BtfTracePointContext) -> i32 {
    let sk: *const c_void = ctx.arg(0);
    let old_state: i32 = ctx.arg(1);
    let new_state: i32 = ctx.arg(2);
    if old_state != i32::from(TCP_SYN_SENT) {
        return 0;
    }
    // SAFETY: `sk` is the tracepoint's `struct sock *` argument.
    let cookie = unsafe { bpf_get_socket_cookie(sk as *mut c_void) };
    // SAFETY: the value is copied out at once.
    let Some(&TrackedSocket {
        cgroup_id,
        reply_tcp_flags,
        reply_ttl,
        ..
    }) = (unsafe { TRACKED_SOCKS.get(cookie) })
    else {
        return 0;
    };
    // The handshake is over, and with it everything reported about the socket. Freed now,
    // the entries go to the next connects while their memory is still in cache; left to
    // LRU eviction, every connect would replace a long-cold entry (measured ~1 µs more
    // per connection).
    let _ = TRACKED_SOCKS.remove(cookie);
    count(Counter::SockStateSeen);
    let sk = sk as *const u8;
    let (src, dst) = read_tuple(sk);
    // A failed socket has released its port, so only an established one still has the
    // tuple its first packet recorded.
    if new_state == i32::from(TCP_ESTABLISHED) {
        let _ = TRACKED_TUPLES.remove(FlowTuple {
            family: src.family,
            protocol: IPPROTO_TCP,
            _pad: 0,
            src_port: src.port,
            dst_port: dst.port,
            src: src.addr,
            dst: dst.addr,
        });
    }
    let off = SOCK_OFFSETS.load();
    // SAFETY: `sk` is the tracepoint's `struct sock *` and these are fields of it (plain
    // loads, as in `read_tuple`).
    let sock_field = |offset: u32| unsafe { *sk.add(offset as usize).cast::<i32>() };
    // `total_retrans` is a field of `struct tcp_sock`, beyond the `struct sock` the
    // verifier knows `sk` as: read with the helper, which fails instead of faulting (a
    // failed read leaves it 0, "not known").
    // SAFETY: as above.
    let syn_retransmits =
        unsafe { bpf_probe_read_kernel(sk.add(off.total_retrans as usize) as *const u32) }
            .unwrap_or(0);
    let event = SockStateEvent {
        header: header(EventKind::SockState),
        sock_cookie: cookie,
        old_state: old_state as u8,
        new_state: new_state as u8,
        reply_tcp_flags,
        reply_ttl,
        error: sock_field(off.err),
        soft_error: sock_field(off.err_soft),
        syn_retransmits,
        src,
        dst,
    };
    count_handshake(cgroup_id, &event);
    if EVENTS.output::<SockStateEvent>(&event, wakeup()).is_err() {
        count(Counter::SockStateLost);
    }
    0
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
