//! tp_btf `kfree_skb`: packets of traced flows the kernel dropped, with the reason.
//!
//! Only explicit drop reasons count (above `SKB_DROP_REASON_NOT_SPECIFIED`, whose value
//! userspace resolves by name from BTF, as they differ between kernels): freeing a
//! consumed packet is not a drop. The packet's tuple is looked up in `TRACKED_TUPLES`, in
//! both directions, so drops of untraced traffic cost a parse and two lookups. This sees
//! drops in every network namespace, including the node's forwarding path (a
//! NetworkPolicy or firewall rule dropping a pod's packet before SNAT).

use aya_ebpf::{Global, macros::btf_tracepoint, programs::BtfTracePointContext};
use tracer_common::{
    Counter, DROP_DIRECTION_ORIGINAL, DROP_DIRECTION_REPLY, DropEvent, DropReasons, Endpoint,
    EventKind, FlowTuple,
};

use crate::{
    maps::{EVENTS, TRACKED_TUPLES, count, header},
    skb::{headers, reversed, tuple_at},
};

/// Set by userspace at load time from the kernel's BTF.
#[unsafe(no_mangle)]
static DROP_REASONS: Global<DropReasons> = Global::new(DropReasons {
    not_specified: u32::MAX,
    _pad: 0,
});

#[btf_tracepoint(function = "kfree_skb")]
pub fn kfree_skb(ctx: BtfTracePointContext) -> i32 {
    let reason: u32 = ctx.arg(2);
    if reason <= DROP_REASONS.load().not_specified {
        return 0;
    }
    let skb: *const u8 = ctx.arg(0);
    let location: u64 = ctx.arg(1);
    let _ = report(skb, location, reason);
    0
}

#[inline(always)]
fn report(skb: *const u8, location: u64, reason: u32) -> Result<(), i32> {
    let Some(tuple) = tuple_at(headers(skb)?.network)? else {
        return Ok(());
    };
    let (cookie, direction) = if let Some(cookie) = lookup(&tuple) {
        (cookie, DROP_DIRECTION_ORIGINAL)
    } else if let Some(cookie) = lookup(&reversed(&tuple)) {
        (cookie, DROP_DIRECTION_REPLY)
    } else {
        return Ok(());
    };
    count(Counter::DropSeen);
    let endpoint = |addr: [u8; 16], port: u16| Endpoint {
        family: tuple.family,
        port,
        addr,
    };
    let event = DropEvent {
        header: header(EventKind::Drop),
        sock_cookie: cookie,
        location,
        reason,
        direction,
        protocol: tuple.protocol,
        _pad: [0; 2],
        src: endpoint(tuple.src, tuple.src_port),
        dst: endpoint(tuple.dst, tuple.dst_port),
    };
    if EVENTS.output::<DropEvent>(&event, 0).is_err() {
        count(Counter::DropLost);
    }
    Ok(())
}

#[inline(always)]
fn lookup(tuple: &FlowTuple) -> Option<u64> {
    // SAFETY: the value is copied out at once.
    unsafe { TRACKED_TUPLES.get(tuple) }.copied()
}
