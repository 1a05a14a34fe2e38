//! tp_btf `consume_skb`: ICMP and ICMPv6 errors the kernel received and handled.
//!
//! There is no tracepoint in the ICMP receive path, but `icmp_rcv`/`icmpv6_rcv` free every
//! message they handled with `consume_skb`, whose tracepoint passes the caller's address.
//! Userspace resolves the text ranges of both functions from `/proc/kallsyms`
//! (`ICMP_RECEIVERS`), so every other consumed packet costs one range check. The error is
//! seen where it is delivered (the pod's namespace, after the node's NAT was undone), so
//! its embedded header names the pod's own tuple.

use aya_ebpf::{Global, macros::btf_tracepoint, programs::BtfTracePointContext};
use tracer_common::{
    AF_INET, AF_INET6, Counter, Endpoint, EventKind, IPPROTO_TCP, IPPROTO_UDP, IcmpErrorEvent,
    IcmpReceivers,
};

use crate::{
    maps::{count, emit, header},
    skb::{Headers, IPV6_HEADER_LEN, headers, read},
};

/// Set by userspace at load time from `/proc/kallsyms`.
#[unsafe(no_mangle)]
static ICMP_RECEIVERS: Global<IcmpReceivers> = Global::new(IcmpReceivers {
    icmp_rcv_start: 0,
    icmp_rcv_end: 0,
    icmpv6_rcv_start: 0,
    icmpv6_rcv_end: 0,
});

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PKT_TOOBIG: u8 = 2;
const ICMPV6_TIME_EXCEED: u8 = 3;
/// ICMP header length before the embedded packet, for both families.
const ICMP_HEADER_LEN: usize = 8;

#[btf_tracepoint(function = "consume_skb")]
pub fn consume_skb(ctx: BtfTracePointContext) -> i32 {
    let location: u64 = ctx.arg(1);
    let receivers = ICMP_RECEIVERS.load();
    let family = if (receivers.icmp_rcv_start..receivers.icmp_rcv_end).contains(&location) {
        AF_INET
    } else if (receivers.icmpv6_rcv_start..receivers.icmpv6_rcv_end).contains(&location) {
        AF_INET6
    } else {
        return 0;
    };
    let skb: *const u8 = ctx.arg(0);
    let _ = report(skb, family);
    0
}

#[inline(always)]
fn report(skb: *const u8, family: u16) -> Result<(), i32> {
    let Headers {
        network: ip,
        transport: icmp,
    } = headers(skb)?;
    let [icmp_type, icmp_code]: [u8; 2] = read(icmp, 0)?;
    let is_error = if family == AF_INET {
        icmp_type == ICMP_DEST_UNREACH || icmp_type == ICMP_TIME_EXCEEDED
    } else {
        matches!(
            icmp_type,
            ICMPV6_DEST_UNREACH | ICMPV6_PKT_TOOBIG | ICMPV6_TIME_EXCEED
        )
    };
    if !is_error {
        return Ok(());
    }
    let rest: [u8; 4] = read(icmp, 4)?;
    let inner = icmp.wrapping_add(ICMP_HEADER_LEN);
    let mut sender = Endpoint {
        family,
        port: 0,
        addr: [0; 16],
    };
    let mut src = sender;
    let mut dst = sender;
    let (protocol, mtu, ports_at) = if family == AF_INET {
        sender.addr[..4].copy_from_slice(&read::<[u8; 4]>(ip, 12)?);
        let version_ihl: u8 = read(inner, 0)?;
        let addrs: [u8; 8] = read(inner, 12)?;
        src.addr[..4].copy_from_slice(&addrs[..4]);
        dst.addr[..4].copy_from_slice(&addrs[4..]);
        // "Fragmentation needed" carries the next-hop MTU in the low 16 bits.
        let mtu = u32::from(u16::from_be_bytes([rest[2], rest[3]]));
        (
            read::<u8>(inner, 9)?,
            mtu,
            usize::from(version_ihl & 0x0f) * 4,
        )
    } else {
        sender.addr = read(ip, 8)?;
        src.addr = read(inner, 8)?;
        dst.addr = read(inner, 24)?;
        (
            read::<u8>(inner, 6)?,
            u32::from_be_bytes(rest),
            IPV6_HEADER_LEN,
        )
    };
    if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
        return Ok(());
    }
    let ports: [u8; 4] = read(inner, ports_at)?;
    src.port = u16::from_be_bytes([ports[0], ports[1]]);
    dst.port = u16::from_be_bytes([ports[2], ports[3]]);
    count(Counter::IcmpErrorSeen);
    let event = IcmpErrorEvent {
        header: header(EventKind::IcmpError),
        icmp_type,
        icmp_code,
        protocol,
        _pad: 0,
        mtu: if icmp_type == ICMP_DEST_UNREACH || icmp_type == ICMPV6_PKT_TOOBIG {
            mtu
        } else {
            0
        },
        sender,
        src,
        dst,
        _pad2: [0; 4],
    };
    if emit(event).is_err() {
        count(Counter::IcmpErrorLost);
    }
    Ok(())
}
