//! The first packet of each traced socket (on the egress path of [`packets`](crate::packets)).
//!
//! For TCP that is the first SYN. `connect()` runs before the kernel picks the source
//! port, and a socket whose handshake fails has released its port by the time it reports
//! the failure; the SYN is the one place where the full tuple is always visible. For UDP
//! it is the first datagram of a connected socket (or of an unconnected one to a new
//! destination): proof that the connect was an egress attempt, not an address-selection
//! probe. Its source address goes into `POD_ADDRESSES`, so drops of the flow's packets
//! can be recognised where the socket is not at hand.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_socket_cookie, bpf_skb_cgroup_id},
    programs::SkBuffContext,
};
use tracer_common::{Counter, EventKind, FirstPacketEvent, IPPROTO_TCP};

use crate::{
    maps::{PENDING_UDP_SOCKS, count, emit, header, is_traced_cgroup, remember_pod_address},
    packets::{Packet, is_syn, socket, tcp_socket},
};

#[inline(always)]
pub fn on_egress(ctx: &SkBuffContext, packet: &Packet) -> Result<(), i64> {
    if packet.protocol == IPPROTO_TCP && !is_first_syn(ctx, packet) {
        return Ok(());
    }
    // SAFETY: the helper takes the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if packet.protocol != IPPROTO_TCP {
        // SAFETY: only existence is checked.
        if unsafe { PENDING_UDP_SOCKS.get(cookie) }.is_none() {
            return Ok(());
        }
        // Nothing more is reported about a UDP socket (its later packets are matched by
        // tuple): its entry goes now, warm for the next connect, rather than waiting for
        // LRU eviction (resolvers use a socket per lookup). Connecting it again, or a
        // first send to another destination, tracks it again.
        let _ = PENDING_UDP_SOCKS.remove(cookie);
    }
    count(Counter::FirstPacketSeen);
    let (src, dst) = packet.endpoints(ctx)?;
    remember_pod_address(src.family, src.addr);
    let event = FirstPacketEvent {
        header: header(EventKind::FirstPacket),
        sock_cookie: cookie,
        protocol: packet.protocol,
        _pad: [0; 7],
        src,
        dst,
    };
    if emit(event).is_err() {
        count(Counter::FirstPacketLost);
    }
    Ok(())
}

/// Whether a TCP packet is a traced socket's SYN, sent for the first time (not a
/// retransmission): `connect()` leaves `snd_nxt` at the SYN's sequence number, which is
/// `snd_una` until the SYN is acknowledged, and moves it past the SYN only once the SYN
/// has been sent, after this hook.
#[inline(always)]
fn is_first_syn(ctx: &SkBuffContext, packet: &Packet) -> bool {
    if !is_syn(packet.tcp_flags) {
        return false;
    }
    let Some(tcp) = socket(ctx).and_then(tcp_socket) else {
        return false;
    };
    // SAFETY: the helper takes the program's own context.
    tcp.snd_nxt == tcp.snd_una
        && is_traced_cgroup(|| Some(unsafe { bpf_skb_cgroup_id(ctx.skb.skb) }))
}
