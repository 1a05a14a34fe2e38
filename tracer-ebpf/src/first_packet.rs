//! The first packet of each traced socket (on the egress path of [`packets`](crate::packets)).
//!
//! For TCP that is the first SYN. `connect()` runs before the kernel picks the source
//! port, and a socket whose handshake fails has released its port by the time it reports
//! the failure; the SYN is the one place where the full tuple is always visible. For UDP
//! it is the first datagram of a connected socket (or of an unconnected one to a new
//! destination): proof that the connect was an egress attempt, not an address-selection
//! probe. Its source address goes into `POD_ADDRESSES`, so drops of the flow's packets
//! can be recognised where the socket is not at hand.

use aya_ebpf::{EbpfContext, helpers::bpf_get_socket_cookie, programs::SkBuffContext};
use tracer_common::{Counter, EventKind, FirstPacketEvent, IPPROTO_TCP};

use crate::{
    maps::{FIRST_PACKET_REPORTED, TRACKED_SOCKS, count, emit, header, remember_pod_address},
    packets::{Packet, is_syn},
};

#[inline(always)]
pub fn on_egress(ctx: &SkBuffContext, packet: &Packet) -> Result<(), i64> {
    if packet.protocol == IPPROTO_TCP && !is_syn(packet.tcp_flags) {
        return Ok(());
    }
    // SAFETY: the helper takes the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(socket) = TRACKED_SOCKS.get_ptr_mut(cookie) else {
        return Ok(());
    };
    if packet.protocol == IPPROTO_TCP {
        // SAFETY: a valid map value pointer; a racing packet at worst reports twice.
        unsafe {
            (*socket).syns_sent = (*socket).syns_sent.saturating_add(1);
            if (*socket).reported & FIRST_PACKET_REPORTED != 0 {
                return Ok(());
            }
            (*socket).reported |= FIRST_PACKET_REPORTED;
        }
    } else {
        // Nothing more is reported about a UDP socket (its later packets are matched by
        // tuple): its entry goes now, warm for the next connect, rather than waiting for
        // LRU eviction (resolvers use a socket per lookup). Connecting it again, or a
        // first send to another destination, tracks it again.
        let _ = TRACKED_SOCKS.remove(cookie);
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
