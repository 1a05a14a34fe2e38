//! The first answer to each traced socket's SYN (on the ingress path of
//! [`packets`](crate::packets)): a SYN-ACK or a reset, with the TTL it arrived with.
//!
//! The TTL tells how far away the sender is. A reset that arrives after fewer hops than
//! the endpoint's own SYN-ACKs was forged by something on the path (a firewall), not sent
//! by the endpoint. A SYN-ACK ends the handshake here ([`handshake::established`]); a
//! reset is kept in the socket's `TRACKED_SOCKS` entry for the failure it brings about
//! right after this hook, which [`handshake`] reports.

use aya_ebpf::{EbpfContext, helpers::bpf_get_socket_cookie, programs::SkBuffContext};
use tracer_common::{AF_INET, IPPROTO_TCP, TCP_FLAG_RST};

use crate::{
    handshake,
    maps::{FIRST_PACKET_REPORTED, REPLY_REPORTED, TRACKED_SOCKS},
    packets::{Packet, is_syn_ack, load},
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
    // SAFETY: the helper takes the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(socket) = TRACKED_SOCKS.get_ptr_mut(cookie) else {
        return Ok(());
    };
    let ttl: u8 = load(
        ctx,
        if packet.family == AF_INET {
            IPV4_TTL
        } else {
            IPV6_HOP_LIMIT
        },
    )?;
    // SAFETY: a valid map value pointer; a racing packet at worst overwrites the answer
    // with another answer to the same SYN.
    unsafe {
        if syn_ack {
            return handshake::established(ctx, packet, cookie, *socket, ttl);
        }
        // Only the first reset to a SYN this socket sent.
        if (*socket).reported & FIRST_PACKET_REPORTED == 0
            || (*socket).reported & REPLY_REPORTED != 0
        {
            return Ok(());
        }
        (*socket).reported |= REPLY_REPORTED;
        (*socket).reply_tcp_flags = packet.tcp_flags;
        (*socket).reply_ttl = ttl;
    }
    Ok(())
}
