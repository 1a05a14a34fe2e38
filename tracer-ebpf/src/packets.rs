//! cgroup_skb egress and ingress at the cgroup v2 root: every packet of every process,
//! parsed once and handed to [`first_packet`](crate::first_packet) (egress),
//! [`reply`](crate::reply) (ingress) and [`dns`](crate::dns) (both directions).
//!
//! The programs never change a packet's fate. cgroup_skb data starts at the network
//! header; IPv6 extension headers before the transport header are not followed
//! (connection openings and DNS do not carry them in practice).

use aya_ebpf::{macros::cgroup_skb, programs::SkBuffContext};
use tracer_common::{
    AF_INET, AF_INET6, DNS_EGRESS, DNS_INGRESS, Endpoint, IPPROTO_TCP, IPPROTO_UDP,
};

use crate::{dns, first_packet, reply, skb::IPV6_HEADER_LEN};

/// Return value of cgroup_skb programs that lets the packet through.
const PASS: i32 = 1;
/// Offset of the data-offset and flags bytes in the TCP header.
const TCP_DATA_OFFSET_OFFSET: usize = 12;
const UDP_HEADER_LEN: usize = 8;

/// What the consumers need of a TCP or UDP packet; addresses are read only on demand.
pub struct Packet {
    pub family: u16,
    pub protocol: u8,
    pub tcp_flags: u8,
    /// Offset of the transport payload.
    pub payload: usize,
    pub src_port: u16,
    pub dst_port: u16,
}

impl Packet {
    /// The packet's source and destination.
    #[inline(always)]
    pub fn endpoints(&self, ctx: &SkBuffContext) -> Result<(Endpoint, Endpoint), i64> {
        let mut src = Endpoint {
            family: self.family,
            port: self.src_port,
            addr: [0; 16],
        };
        let mut dst = Endpoint {
            port: self.dst_port,
            ..src
        };
        if self.family == AF_INET {
            let addrs: [u8; 8] = ctx.load(12)?;
            src.addr[..4].copy_from_slice(&addrs[..4]);
            dst.addr[..4].copy_from_slice(&addrs[4..]);
        } else {
            src.addr = ctx.load(8)?;
            dst.addr = ctx.load(24)?;
        }
        Ok((src, dst))
    }
}

#[cgroup_skb(egress)]
pub fn skb_egress(ctx: SkBuffContext) -> i32 {
    if let Ok(Some(packet)) = parse(&ctx) {
        let _ = first_packet::on_egress(&ctx, &packet);
        let _ = dns::on_packet(&ctx, &packet, DNS_EGRESS);
    }
    PASS
}

#[cgroup_skb(ingress)]
pub fn skb_ingress(ctx: SkBuffContext) -> i32 {
    if let Ok(Some(packet)) = parse(&ctx) {
        let _ = reply::on_ingress(&ctx, &packet);
        let _ = dns::on_packet(&ctx, &packet, DNS_INGRESS);
    }
    PASS
}

/// Parses the IP and TCP/UDP headers; `None` for anything else.
#[inline(always)]
fn parse(ctx: &SkBuffContext) -> Result<Option<Packet>, i64> {
    let first: u8 = ctx.load(0)?;
    let (family, protocol, l4) = match first >> 4 {
        4 => (AF_INET, ctx.load::<u8>(9)?, usize::from(first & 0x0f) * 4),
        6 => (AF_INET6, ctx.load::<u8>(6)?, IPV6_HEADER_LEN),
        _ => return Ok(None),
    };
    let (tcp_flags, payload) = match protocol {
        IPPROTO_TCP => {
            let [data_offset, flags]: [u8; 2] = ctx.load(l4 + TCP_DATA_OFFSET_OFFSET)?;
            (flags, l4 + usize::from(data_offset >> 4) * 4)
        }
        IPPROTO_UDP => (0, l4 + UDP_HEADER_LEN),
        _ => return Ok(None),
    };
    let ports: [u8; 4] = ctx.load(l4)?;
    Ok(Some(Packet {
        family,
        protocol,
        tcp_flags,
        payload,
        src_port: u16::from_be_bytes([ports[0], ports[1]]),
        dst_port: u16::from_be_bytes([ports[2], ports[3]]),
    }))
}
