//! tp_btf `kfree_skb`: packets of traced flows the kernel dropped, with the reason.
//!
//! Only explicit drop reasons count (above `SKB_DROP_REASON_NOT_SPECIFIED`, whose value
//! userspace resolves by name from BTF, as they differ between kernels): freeing a
//! consumed packet is not a drop, nor is a closing socket purging its queues
//! (`QUEUE_PURGE`, once per connection closed with data unread). The packet is matched to a traced flow by its own tuple
//! (both directions, in `TRACKED_TUPLES`), or, once NAT rewrote its header, by the
//! original tuple of its conntrack entry. This sees drops in every network namespace,
//! including the node's forwarding path: a NetworkPolicy or firewall rule dropping a
//! pod's packet before SNAT, and conntrack itself dropping it after.
//!
//! The event carries the packet's conntrack state (no entry, untracked, or the entry's
//! status bits), which tells userspace whether conntrack dropped it and why: an entry
//! that NAT set up but that never made it into the table is an insert failure.

use core::ptr::addr_of_mut;

use aya_ebpf::{Global, macros::btf_tracepoint, programs::BtfTracePointContext};
use tracer_common::{
    Counter, DROP_CT_ENTRY, DROP_CT_NONE, DROP_CT_UNKNOWN, DROP_CT_UNTRACKED,
    DROP_DIRECTION_ORIGINAL, DROP_DIRECTION_REPLY, DropEvent, DropOffsets, DropReasons, Endpoint,
    EventKind, FlowTuple,
};

use crate::{
    conntrack::{Attached, attached, flow_key, original, status},
    maps::{EVENTS, TRACKED_SOCKS, TRACKED_TUPLES, count, header, wakeup},
    skb::{headers, read, reversed, tuple_at},
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
    let mut direction = DROP_DIRECTION_ORIGINAL;
    let mut cookie = traced(&packet, false);
    if cookie == NOT_TRACED {
        direction = DROP_DIRECTION_REPLY;
        cookie = traced(&packet, true);
    }
    let mut ct_status = 0;
    let conntrack = match attached(skb) {
        Err(_) => DROP_CT_UNKNOWN,
        Ok(Attached::None) => DROP_CT_NONE,
        Ok(Attached::Untracked) => DROP_CT_UNTRACKED,
        Ok(Attached::Entry(entry, reply)) => {
            ct_status = status(entry).unwrap_or(0);
            if cookie == NOT_TRACED {
                cookie = traced_by_entry(entry);
                direction = if reply {
                    DROP_DIRECTION_REPLY
                } else {
                    DROP_DIRECTION_ORIGINAL
                };
            }
            DROP_CT_ENTRY
        }
    };
    if cookie == NOT_TRACED {
        direction = DROP_DIRECTION_ORIGINAL;
        cookie = traced_by_socket(skb);
    }
    if cookie == NOT_TRACED {
        return Ok(());
    }
    count(Counter::DropSeen);
    let Some(mut entry) = EVENTS.reserve::<DropEvent>(0) else {
        count(Counter::DropLost);
        return Ok(());
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` is the reserved, exclusively owned record; every field is written
    // before it is submitted.
    unsafe {
        addr_of_mut!((*event).header).write(header(EventKind::Drop));
        addr_of_mut!((*event).sock_cookie).write(cookie);
        addr_of_mut!((*event).location).write(location);
        addr_of_mut!((*event).reason).write(reason);
        addr_of_mut!((*event).direction).write(direction);
        addr_of_mut!((*event).protocol).write(packet.protocol);
        addr_of_mut!((*event).conntrack).write(conntrack);
        addr_of_mut!((*event)._pad).write(0);
        addr_of_mut!((*event).src).write(Endpoint {
            family: packet.family,
            port: packet.src_port,
            addr: packet.src,
        });
        addr_of_mut!((*event).dst).write(Endpoint {
            family: packet.family,
            port: packet.dst_port,
            addr: packet.dst,
        });
        addr_of_mut!((*event).ct_status).write(ct_status);
        addr_of_mut!((*event).netns).write(netns_of(skb));
    }
    entry.submit(wakeup());
    Ok(())
}

/// Set by userspace at load time from the kernel's BTF.
#[unsafe(no_mangle)]
static DROP_OFFSETS: Global<DropOffsets> = Global::new(DropOffsets {
    skb_dev: 0,
    dev_net: 0,
    net_inum: 0,
    skb_sk: 0,
    sk_cookie: 0,
    sk_net: 0,
});

/// The packet's socket, when it is a traced one: packets dropped on their way out before
/// the cgroup hooks saw them (a pod's own OUTPUT rules) have no tracked tuple yet.
#[inline(never)]
fn traced_by_socket(skb: *const u8) -> u64 {
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
    let Ok(cookie) = read::<u64>(sk as *const u8, off.sk_cookie as usize) else {
        return NOT_TRACED;
    };
    // SAFETY: only the presence of the key is used.
    if cookie != NOT_TRACED && unsafe { TRACKED_SOCKS.get(cookie) }.is_some() {
        cookie
    } else {
        NOT_TRACED
    }
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

// The lookups are BPF subprograms (`inline(never)`) so that their tuple copies do not add
// to `kfree_skb`'s stack frame.

/// The cookie of the traced socket whose flow `tuple` (or, `reversed`, its reply) is.
#[inline(never)]
fn traced(tuple: &FlowTuple, reversed_tuple: bool) -> u64 {
    let found = if reversed_tuple {
        lookup(&reversed(tuple))
    } else {
        lookup(tuple)
    };
    found.unwrap_or(NOT_TRACED)
}

/// A packet NAT already rewrote is matched by its entry's original tuple (the pod's).
#[inline(never)]
fn traced_by_entry(entry: *const u8) -> u64 {
    original(entry)
        .ok()
        .and_then(|tuple| flow_key(&tuple))
        .and_then(|key| lookup(&key))
        .unwrap_or(NOT_TRACED)
}

#[inline(always)]
fn lookup(tuple: &FlowTuple) -> Option<u64> {
    // SAFETY: the value is copied out at once.
    unsafe { TRACKED_TUPLES.get(tuple) }.copied()
}
