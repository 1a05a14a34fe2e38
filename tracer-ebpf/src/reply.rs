//! The first answer to each traced socket's SYN (on the ingress path of
//! [`packets`](crate::packets)): a SYN-ACK or a reset, with the TTL it arrived with.
//!
//! The TTL tells how far away the sender is. A reset that arrives after fewer hops than
//! the endpoint's own SYN-ACKs was forged by something on the path (a firewall), not sent
//! by the endpoint. A SYN-ACK ends the handshake here ([`handshake::established`]); a
//! reset is kept in `FAILING_HANDSHAKES` for the failure it brings about right after this
//! hook, which [`handshake`] reports. The socket is still in `SYN_SENT` at this hook: the
//! kernel processes the answer after it.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_socket_cookie, bpf_skb_cgroup_id},
    programs::SkBuffContext,
};
use tracer_common::{AF_INET, IPPROTO_TCP, TCP_FLAG_RST, TCP_SYN_SENT};

use crate::{
    handshake,
    maps::{FAILING_HANDSHAKES, FailingHandshake, is_traced},
    packets::{Packet, is_syn_ack, load, socket, tcp_socket},
};

/// Offset of the TTL in an IPv4 header, of the hop limit in an IPv6 header.
const IPV4_TTL: usize = 8;
const IPV6_HOP_LIMIT: usize = 7;

#[inline(always)]
pub fn on_ingress(ctx: &SkBuffContext, packet: &Packet) -> Result<(), i64> {
    let syn_ack = is_syn_ack(packet.tcp_flags);
    if packet.protocol != IPPROTO_TCP || !(syn_ack || packet.tcp_flags & TCP_FLAG_RST != 0) {
        return Ok(());
    }
    let Some(sk) = socket(ctx) else {
        return Ok(());
    };
    if sk.state != u32::from(TCP_SYN_SENT) {
        return Ok(());
    }
    let Some(tcp) = tcp_socket(sk) else {
        return Ok(());
    };
    // SAFETY: the helpers take the program's own context.
    let (cgroup_id, cookie) = unsafe {
        (
            bpf_skb_cgroup_id(ctx.skb.skb),
            bpf_get_socket_cookie(ctx.as_ptr()),
        )
    };
    if !is_traced(cgroup_id) {
        return Ok(());
    }
    let ttl: u8 = load(
        ctx,
        if packet.family == AF_INET {
            IPV4_TTL
        } else {
            IPV6_HOP_LIMIT
        },
    )?;
    if syn_ack {
        return handshake::established(ctx, packet, cookie, cgroup_id, tcp.total_retrans, ttl);
    }
    // Only the first reset to this handshake's SYN.
    let syn_seq = tcp.snd_una;
    // SAFETY: the value is copied out at once.
    if unsafe { FAILING_HANDSHAKES.get(cookie) }.is_some_and(|known| known.syn_seq == syn_seq) {
        return Ok(());
    }
    let failing = FailingHandshake {
        syn_seq,
        reply_tcp_flags: packet.tcp_flags,
        reply_ttl: ttl,
        reported: 0,
        _pad: 0,
    };
    let _ = FAILING_HANDSHAKES.insert(cookie, failing, 0);
    Ok(())
}
