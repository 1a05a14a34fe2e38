//! Reading packets from a kernel `struct sk_buff` pointer (tracing programs get the
//! pointer, not packet access), at offsets resolved from the kernel's BTF.

use aya_ebpf::{Global, helpers::bpf_probe_read_kernel};
use tracer_common::{AF_INET, AF_INET6, FlowTuple, IPPROTO_TCP, IPPROTO_UDP, SkbOffsets};

/// Set by userspace at load time from the kernel's BTF.
#[unsafe(no_mangle)]
static SKB_OFFSETS: Global<SkbOffsets> = Global::new(SkbOffsets {
    head: 0,
    network_header: 0,
    transport_header: 0,
    _pad: 0,
});

pub const IPV6_HEADER_LEN: usize = 40;

/// Reads `T` at `base + offset` in kernel memory.
#[inline(always)]
pub fn read<T>(base: *const u8, offset: usize) -> Result<T, i32> {
    // SAFETY: bpf_probe_read_kernel validates the address and fails instead of faulting.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset) as *const T) }
}

/// Where a packet's network and transport headers start.
pub struct Headers {
    pub network: *const u8,
    pub transport: *const u8,
}

#[inline(always)]
pub fn headers(skb: *const u8) -> Result<Headers, i32> {
    let off = SKB_OFFSETS.load();
    let head: u64 = read(skb, off.head as usize)?;
    let head = head as *const u8;
    let network: u16 = read(skb, off.network_header as usize)?;
    let transport: u16 = read(skb, off.transport_header as usize)?;
    Ok(Headers {
        network: head.wrapping_add(usize::from(network)),
        transport: head.wrapping_add(usize::from(transport)),
    })
}

/// A TCP or UDP packet's tuple, and its TCP flags (0 for UDP).
pub struct TuplePacket {
    pub tuple: FlowTuple,
    pub tcp_flags: u8,
}

/// Offset of the flags byte in the TCP header.
const TCP_FLAGS_OFFSET: usize = 13;

/// The TCP or UDP packet at `ip`; `None` for other protocols. IPv6 extension headers are
/// not followed.
#[inline(always)]
pub fn tuple_at(ip: *const u8) -> Result<Option<TuplePacket>, i32> {
    let first: u8 = read(ip, 0)?;
    let mut tuple = FlowTuple {
        family: 0,
        protocol: 0,
        _pad: 0,
        src_port: 0,
        dst_port: 0,
        src: [0; 16],
        dst: [0; 16],
    };
    let ports_at = match first >> 4 {
        4 => {
            tuple.family = AF_INET;
            tuple.protocol = read(ip, 9)?;
            let addrs: [u8; 8] = read(ip, 12)?;
            tuple.src[..4].copy_from_slice(&addrs[..4]);
            tuple.dst[..4].copy_from_slice(&addrs[4..]);
            usize::from(first & 0x0f) * 4
        }
        6 => {
            tuple.family = AF_INET6;
            tuple.protocol = read(ip, 6)?;
            tuple.src = read(ip, 8)?;
            tuple.dst = read(ip, 24)?;
            IPV6_HEADER_LEN
        }
        _ => return Ok(None),
    };
    let tcp_flags = match tuple.protocol {
        IPPROTO_TCP => read(ip, ports_at + TCP_FLAGS_OFFSET)?,
        IPPROTO_UDP => 0,
        _ => return Ok(None),
    };
    let ports: [u8; 4] = read(ip, ports_at)?;
    tuple.src_port = u16::from_be_bytes([ports[0], ports[1]]);
    tuple.dst_port = u16::from_be_bytes([ports[2], ports[3]]);
    Ok(Some(TuplePacket { tuple, tcp_flags }))
}

/// The same flow seen from the other end.
#[inline(always)]
pub fn reversed(tuple: &FlowTuple) -> FlowTuple {
    FlowTuple {
        src_port: tuple.dst_port,
        dst_port: tuple.src_port,
        src: tuple.dst,
        dst: tuple.src,
        ..*tuple
    }
}
