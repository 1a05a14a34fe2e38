//! cgroup_skb egress and ingress on kubelet's pod cgroups: every packet of every pod,
//! parsed once and handed to [`first_packet`](crate::first_packet) (egress),
//! [`reply`](crate::reply) (ingress) and [`dns`](crate::dns) (both directions).
//!
//! The programs never change a packet's fate. cgroup_skb data starts at the network
//! header; IPv6 extension headers before the transport header are not followed
//! (connection openings and DNS do not carry them in practice).

use aya_ebpf::{
    bindings::{bpf_sock, bpf_tcp_sock},
    helpers::bpf_tcp_sock,
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use tracer_common::{
    AF_INET, AF_INET6, DNS_EGRESS, DNS_INGRESS, Endpoint, IPPROTO_TCP, IPPROTO_UDP,
};

use crate::{dns, first_packet, reply, skb::IPV6_HEADER_LEN};

/// Return value of cgroup_skb programs that lets the packet through.
const PASS: i32 = 1;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;

/// Whether a TCP packet with these flags opens a handshake: a SYN (or its retransmission).
#[inline(always)]
pub fn is_syn(tcp_flags: u8) -> bool {
    tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN
}

/// Whether a TCP packet with these flags is a SYN-ACK.
#[inline(always)]
pub fn is_syn_ack(tcp_flags: u8) -> bool {
    tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN | TCP_FLAG_ACK
}

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
            let addrs: [u8; 8] = load(ctx, 12)?;
            src.addr[..4].copy_from_slice(&addrs[..4]);
            dst.addr[..4].copy_from_slice(&addrs[4..]);
        } else {
            src.addr = load(ctx, 8)?;
            dst.addr = load(ctx, 24)?;
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
    // The version, and the protocol field of either version, in one read.
    let ip: [u8; 10] = load(ctx, 0)?;
    let (family, protocol, l4) = match ip[0] >> 4 {
        4 => (AF_INET, ip[9], usize::from(ip[0] & 0x0f) * 4),
        6 => (AF_INET6, ip[6], IPV6_HEADER_LEN),
        _ => return Ok(None),
    };
    let (ports, tcp_flags, payload) = match protocol {
        IPPROTO_TCP => {
            // Ports through the data-offset and flags bytes.
            let tcp: [u8; TCP_DATA_OFFSET_OFFSET + 2] = load(ctx, l4)?;
            let data_offset = tcp[TCP_DATA_OFFSET_OFFSET];
            (
                [tcp[0], tcp[1], tcp[2], tcp[3]],
                tcp[TCP_DATA_OFFSET_OFFSET + 1],
                l4 + usize::from(data_offset >> 4) * 4,
            )
        }
        IPPROTO_UDP => (load::<[u8; 4]>(ctx, l4)?, 0, l4 + UDP_HEADER_LEN),
        _ => return Ok(None),
    };
    Ok(Some(Packet {
        family,
        protocol,
        tcp_flags,
        payload,
        src_port: u16::from_be_bytes([ports[0], ports[1]]),
        dst_port: u16::from_be_bytes([ports[2], ports[3]]),
    }))
}

/// The packet's socket (the sender's on egress, the receiver's on ingress), if any.
#[inline(always)]
pub fn socket(ctx: &SkBuffContext) -> Option<&bpf_sock> {
    // SAFETY: the context pointer is valid for the duration of the program; the verifier
    // checks the socket pointer for null before use, as done here.
    unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk.as_ref() }
}

/// The kernel's TCP view of `sk`; `None` unless it is a full TCP socket (not a request
/// or time-wait one).
#[inline(always)]
pub fn tcp_socket(sk: &bpf_sock) -> Option<&bpf_tcp_sock> {
    // SAFETY: `sk` is the packet's socket; the helper returns null for anything but a
    // full TCP socket.
    unsafe { bpf_tcp_sock(sk as *const bpf_sock as *mut bpf_sock).as_ref() }
}

/// `T` at `offset` from the network header. Headers are in the packet's linear data in
/// practice, read in place; past it, `bpf_skb_load_bytes` copies (a helper call per read
/// is a large share of these programs' cost, which every packet pays).
#[inline(always)]
pub fn load<T: Copy>(ctx: &SkBuffContext, offset: usize) -> Result<T, i64> {
    let skb = ctx.skb.skb;
    // SAFETY: the context pointer is valid for the duration of the program.
    let (data, end) = unsafe { ((*skb).data as usize, (*skb).data_end as usize) };
    let at = data + offset;
    if at + size_of::<T>() <= end {
        // SAFETY: `at..at + size_of::<T>()` lies within the packet's linear data, checked
        // above (the verifier checks it too); `T` is plain bytes.
        Ok(unsafe { core::ptr::read_unaligned(at as *const T) })
    } else {
        ctx.load(offset)
    }
}
