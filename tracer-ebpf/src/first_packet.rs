//! cgroup_skb egress: the first packet of each traced socket.
//!
//! For TCP that is the first SYN. `connect()` runs before the kernel picks the source
//! port, and a socket whose handshake fails has released its port by the time it reports
//! the failure; the SYN is the one place where the full tuple is always visible. For UDP
//! it is the first datagram of a connected socket: proof that the connect was an egress
//! attempt, not an address-selection probe.
//!
//! Attached at the cgroup v2 root, the program sees every egress packet of every process;
//! it stops after the IP header for anything that is not TCP or UDP, after the TCP flags
//! for TCP packets that are not a SYN, and after one map lookup otherwise. It never
//! changes a packet's fate. cgroup_skb data starts at the network header.

use aya_ebpf::{
    EbpfContext, helpers::bpf_get_socket_cookie, macros::cgroup_skb, programs::SkBuffContext,
};
use tracer_common::{
    AF_INET, AF_INET6, Counter, Endpoint, EventKind, FirstPacketEvent, FlowTuple, IPPROTO_TCP,
    IPPROTO_UDP,
};

use crate::maps::{
    EVENTS, FIRST_PACKET_PENDING, FIRST_PACKET_REPORTED, TRACKED_SOCKS, TRACKED_TUPLES, count,
    header,
};

/// Return value of cgroup_skb programs that lets the packet through.
const PASS: i32 = 1;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;
/// Offset of the flags byte in the TCP header.
const TCP_FLAGS_OFFSET: usize = 13;
const IPV6_HEADER_LEN: usize = 40;

#[cgroup_skb(egress)]
pub fn first_packet(ctx: SkBuffContext) -> i32 {
    let _ = report_first_packet(&ctx);
    PASS
}

#[inline(always)]
fn report_first_packet(ctx: &SkBuffContext) -> Result<(), i64> {
    let first: u8 = ctx.load(0)?;
    // Extension headers before the transport header are not followed: connection
    // openings do not carry them in practice.
    let (family, protocol, l4) = match first >> 4 {
        4 => (AF_INET, ctx.load::<u8>(9)?, usize::from(first & 0x0f) * 4),
        6 => (AF_INET6, ctx.load::<u8>(6)?, IPV6_HEADER_LEN),
        _ => return Ok(()),
    };
    match protocol {
        IPPROTO_TCP => {
            let flags: u8 = ctx.load(l4 + TCP_FLAGS_OFFSET)?;
            if flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) != TCP_FLAG_SYN {
                return Ok(());
            }
        }
        IPPROTO_UDP => {}
        _ => return Ok(()),
    }
    // SAFETY: the helper takes the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(state) = TRACKED_SOCKS.get_ptr_mut(cookie) else {
        return Ok(());
    };
    // SAFETY: a valid map value pointer; a racing packet at worst reports twice.
    unsafe {
        if *state != FIRST_PACKET_PENDING {
            return Ok(());
        }
        *state = FIRST_PACKET_REPORTED;
    }
    count(Counter::FirstPacketSeen);
    // Source and destination ports open both the TCP and the UDP header.
    let ports: [u8; 4] = ctx.load(l4)?;
    let mut src = Endpoint {
        family,
        port: u16::from_be_bytes([ports[0], ports[1]]),
        addr: [0; 16],
    };
    let mut dst = Endpoint {
        family,
        port: u16::from_be_bytes([ports[2], ports[3]]),
        addr: [0; 16],
    };
    if family == AF_INET {
        let addrs: [u8; 8] = ctx.load(12)?;
        src.addr[..4].copy_from_slice(&addrs[..4]);
        dst.addr[..4].copy_from_slice(&addrs[4..]);
    } else {
        src.addr = ctx.load(8)?;
        dst.addr = ctx.load(24)?;
    }
    let tuple = FlowTuple {
        family,
        protocol,
        _pad: 0,
        src_port: src.port,
        dst_port: dst.port,
        src: src.addr,
        dst: dst.addr,
    };
    // A full map evicts its oldest tuple; a missing tuple only hides this flow's drops.
    let _ = TRACKED_TUPLES.insert(tuple, cookie, 0);
    let event = FirstPacketEvent {
        header: header(EventKind::FirstPacket),
        sock_cookie: cookie,
        protocol,
        _pad: [0; 7],
        src,
        dst,
    };
    if EVENTS.output::<FirstPacketEvent>(&event, 0).is_err() {
        count(Counter::FirstPacketLost);
    }
    Ok(())
}
