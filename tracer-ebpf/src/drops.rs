//! tp_btf `kfree_skb`: packets of traced flows the kernel dropped, with the reason.
//!
//! Only explicit drop reasons count (above `SKB_DROP_REASON_NOT_SPECIFIED`, whose value
//! userspace resolves by name from BTF, as they differ between kernels): freeing a
//! consumed packet is not a drop, nor is a closing socket purging its queues
//! (`QUEUE_PURGE`, once per connection closed with data unread). A packet belongs to a
//! traced flow when it goes from a traced pod's address (`POD_ADDRESSES`) or, as an
//! answer, to one: by the original tuple of its conntrack entry, which NAT leaves as the
//! pod sent it, or without one by its own header. TCP packets count during the handshake only (a SYN from
//! the pod, a SYN-ACK or reset to it), as the connection attempt ends there. The event
//! names the flow by that tuple and userspace finds the attempt; a packet that still
//! carries its traced socket (dropped on its way out of the pod) names the socket too.
//! This sees drops in every network namespace, including the node's forwarding path: a
//! NetworkPolicy or firewall rule dropping a pod's packet before SNAT, and conntrack
//! itself dropping it after.
//!
//! The event carries the packet's conntrack state (no entry, untracked, or the entry's
//! status bits), which tells userspace whether conntrack dropped it and why: an entry
//! that NAT set up but that never made it into the table is an insert failure.

use core::ptr::addr_of_mut;

use aya_ebpf::{Global, macros::btf_tracepoint, programs::BtfTracePointContext};
use tracer_common::{
    Counter, DROP_CT_ENTRY, DROP_CT_NONE, DROP_CT_UNKNOWN, DROP_CT_UNTRACKED,
    DROP_DIRECTION_ORIGINAL, DROP_DIRECTION_REPLY, DropEvent, DropOffsets, DropReasons, Endpoint,
    EventKind, FlowTuple, IPPROTO_TCP, TCP_FLAG_RST, TCP_SYN_SENT,
};

use crate::{
    conntrack::{Attached, attached, flow_key, original, status},
    maps::{EVENTS, PENDING_UDP_SOCKS, count, header, is_pod_address, is_traced, wakeup},
    packets::{is_syn, is_syn_ack},
    skb::{TuplePacket, headers, read, reversed, tuple_at},
    sock,
};

/// Set by userspace at load time from the kernel's BTF.
#[unsafe(no_mangle)]
static DROP_REASONS: Global<DropReasons> = Global::new(DropReasons {
    not_specified: u32::MAX,
    queue_purge: u32::MAX,
});

#[btf_tracepoint(function = "kfree_skb")]
pub fn kfree_skb(ctx: BtfTracePointContext) -> i32 {
    let reason: u32 = ctx.arg(2);
    let reasons = DROP_REASONS.load();
    if reason <= reasons.not_specified || reason == reasons.queue_purge {
        return 0;
    }
    let skb: *const u8 = ctx.arg(0);
    let location: u64 = ctx.arg(1);
    let _ = report(skb, location, reason);
    0
}

#[inline(always)]
fn report(skb: *const u8, location: u64, reason: u32) -> Result<(), i32> {
    let Some(packet) = tuple_at(headers(skb)?.network)? else {
        return Ok(());
    };
    // A conntrack entry's original tuple is the flow as the pod sent it, whatever NAT did
    // to this packet (a Service's address translated to a backend's, the pod's source to
    // the node's); without one, the packet's own header is.
    let mut traced = None;
    let mut ct_status = 0;
    let conntrack = match attached(skb) {
        Err(_) => DROP_CT_UNKNOWN,
        Ok(Attached::None) => DROP_CT_NONE,
        Ok(Attached::Untracked) => DROP_CT_UNTRACKED,
        Ok(Attached::Entry(entry, reply)) => {
            ct_status = status(entry).unwrap_or(0);
            traced = by_entry(entry, reply, packet.tcp_flags);
            DROP_CT_ENTRY
        }
    };
    if traced.is_none() {
        traced = by_header(&packet);
    }
    let mut cookie = NOT_TRACED;
    let (direction, flow) = match traced {
        Some(found) => found,
        None => {
            cookie = traced_by_socket(skb, packet.tuple.protocol);
            if cookie == NOT_TRACED {
                return Ok(());
            }
            (DROP_DIRECTION_ORIGINAL, packet.tuple)
        }
    };
    count(Counter::DropSeen);
    let Some(mut entry) = EVENTS.reserve::<DropEvent>(0) else {
        count(Counter::DropLost);
        return Ok(());
    };
    let event = entry.as_mut_ptr();
    let tuple = &packet.tuple;
    // SAFETY: `event` is the reserved, exclusively owned record; every field is written
    // before it is submitted.
    unsafe {
        addr_of_mut!((*event).header).write(header(EventKind::Drop));
        addr_of_mut!((*event).sock_cookie).write(cookie);
        addr_of_mut!((*event).location).write(location);
        addr_of_mut!((*event).reason).write(reason);
        addr_of_mut!((*event).direction).write(direction);
        addr_of_mut!((*event).protocol).write(tuple.protocol);
        addr_of_mut!((*event).conntrack).write(conntrack);
        addr_of_mut!((*event)._pad).write(0);
        addr_of_mut!((*event).src).write(source(tuple));
        addr_of_mut!((*event).dst).write(destination(tuple));
        addr_of_mut!((*event).ct_status).write(ct_status);
        addr_of_mut!((*event).netns).write(netns_of(skb));
        addr_of_mut!((*event).flow_src).write(source(&flow));
        addr_of_mut!((*event).flow_dst).write(destination(&flow));
    }
    entry.submit(wakeup());
    Ok(())
}

/// Which way a packet of a traced pod's flow went, and the flow as the pod sent it.
type Traced = Option<(u8, FlowTuple)>;

// The matchers are BPF subprograms (`inline(never)`) so that their tuple copies do not
// add to `kfree_skb`'s stack frame.

/// A packet whose header names a traced pod: from it, or an answer to it.
#[inline(never)]
fn by_header(packet: &TuplePacket) -> Traced {
    let tuple = &packet.tuple;
    if sent_by_pod(tuple.protocol, packet.tcp_flags) && is_pod_address(tuple.family, tuple.src) {
        Some((DROP_DIRECTION_ORIGINAL, *tuple))
    } else if answers_pod(tuple.protocol, packet.tcp_flags)
        && is_pod_address(tuple.family, tuple.dst)
    {
        Some((DROP_DIRECTION_REPLY, reversed(tuple)))
    } else {
        None
    }
}

/// A packet with a conntrack entry, by the entry's original tuple (the pod's).
#[inline(never)]
fn by_entry(entry: *const u8, reply: bool, tcp_flags: u8) -> Traced {
    let flow = original(entry).ok().and_then(|tuple| flow_key(&tuple))?;
    let (direction, counts) = if reply {
        (DROP_DIRECTION_REPLY, answers_pod(flow.protocol, tcp_flags))
    } else {
        (
            DROP_DIRECTION_ORIGINAL,
            sent_by_pod(flow.protocol, tcp_flags),
        )
    };
    (counts && is_pod_address(flow.family, flow.src)).then_some((direction, flow))
}

/// Whether a packet from the pod with these flags is part of an attempt: any UDP
/// datagram, a TCP SYN.
#[inline(always)]
fn sent_by_pod(protocol: u8, tcp_flags: u8) -> bool {
    protocol != IPPROTO_TCP || is_syn(tcp_flags)
}

/// Whether a packet to the pod with these flags answers an attempt: any UDP datagram, a
/// TCP SYN-ACK or reset.
#[inline(always)]
fn answers_pod(protocol: u8, tcp_flags: u8) -> bool {
    protocol != IPPROTO_TCP || is_syn_ack(tcp_flags) || tcp_flags & TCP_FLAG_RST != 0
}

#[inline(always)]
fn source(tuple: &FlowTuple) -> Endpoint {
    Endpoint {
        family: tuple.family,
        port: tuple.src_port,
        addr: tuple.src,
    }
}

#[inline(always)]
fn destination(tuple: &FlowTuple) -> Endpoint {
    Endpoint {
        family: tuple.family,
        port: tuple.dst_port,
        addr: tuple.dst,
    }
}

/// Set by userspace at load time from the kernel's BTF.
#[unsafe(no_mangle)]
static DROP_OFFSETS: Global<DropOffsets> = Global::new(DropOffsets {
    skb_dev: 0,
    dev_net: 0,
    net_inum: 0,
    skb_sk: 0,
    sk_net: 0,
});

/// The packet's socket, when it is a traced one in an attempt (a TCP socket in its
/// handshake, a UDP socket before its first datagram left): packets dropped on their way
/// out before the cgroup hooks saw them (a pod's own OUTPUT rules) have no tracked tuple
/// yet.
#[inline(never)]
fn traced_by_socket(skb: *const u8, protocol: u8) -> u64 {
    let off = DROP_OFFSETS.load();
    if off.skb_sk == 0 {
        return NOT_TRACED;
    }
    let Ok(sk) = read::<u64>(skb, off.skb_sk as usize) else {
        return NOT_TRACED;
    };
    if sk == 0 {
        return NOT_TRACED;
    }
    let sk = sk as *const u8;
    let Ok(cookie) = read::<u64>(sk, sock::offsets().cookie as usize) else {
        return NOT_TRACED;
    };
    if cookie == NOT_TRACED {
        return NOT_TRACED;
    }
    let in_attempt = if protocol == IPPROTO_TCP {
        read::<u8>(sk, sock::offsets().state as usize) == Ok(TCP_SYN_SENT)
            && sock::pod_cgroup_id(sk).is_some_and(is_traced)
    } else {
        // SAFETY: only the presence of the key is used.
        unsafe { PENDING_UDP_SOCKS.get(cookie) }.is_some()
    };
    if in_attempt { cookie } else { NOT_TRACED }
}

/// The inode of the network namespace the packet was in when dropped: its device's, or,
/// before it has one (a local packet at OUTPUT), its socket's; 0 if unknown.
#[inline(never)]
fn netns_of(skb: *const u8) -> u32 {
    let off = DROP_OFFSETS.load();
    if off.skb_dev == 0 {
        return 0;
    }
    let dev = read::<u64>(skb, off.skb_dev as usize).unwrap_or(0);
    let net = if dev != 0 {
        read::<u64>(dev as *const u8, off.dev_net as usize)
    } else {
        match read::<u64>(skb, off.skb_sk as usize) {
            Ok(sk) if sk != 0 => read::<u64>(sk as *const u8, off.sk_net as usize),
            _ => return 0,
        }
    };
    let Ok(net) = net else {
        return 0;
    };
    if net == 0 {
        return 0;
    }
    read::<u32>(net as *const u8, off.net_inum as usize).unwrap_or(0)
}

/// Socket cookies start at 1.
const NOT_TRACED: u64 = 0;
