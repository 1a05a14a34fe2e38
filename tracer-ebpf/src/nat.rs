//! tp_btf `net_dev_queue`: the NAT the node applied to traced flows.
//!
//! Every packet queued on any device passes here with its conntrack entry attached
//! (`skb->_nfct`). When the entry's two directions disagree, NAT rewrote the flow: the
//! reply's destination is the translated source (SNAT/MASQUERADE to the node's address and
//! a new port), the reply's source the translated destination (a Service's DNAT to a
//! backend). The entry's original tuple is the pod's own, so `TRACKED_TUPLES` tells
//! whether the flow is traced; each socket's translation is reported once.

use core::ptr::addr_of_mut;

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use tracer_common::{Counter, EventKind, IPS_DST_NAT, IPS_SRC_NAT, NatEvent};

use crate::{
    conntrack::{endpoint, flow_key, opening_entry, original, reply, status},
    maps::{EVENTS, NAT_REPORTED, TRACKED_SOCKS, TRACKED_TUPLES, count, header, wakeup},
};

#[btf_tracepoint(function = "net_dev_queue")]
pub fn net_dev_queue(ctx: BtfTracePointContext) -> i32 {
    let skb: *const u8 = ctx.arg(0);
    let _ = report(skb);
    0
}

#[inline(always)]
fn report(skb: *const u8) -> Result<(), i32> {
    // A flow's translation is settled by its first packet; replies and every packet after
    // the first answer (the bulk of all traffic) need no more than the skb's own ctinfo.
    // Flows NAT left alone need one more read: NAT marks the entries whose tuple it changed.
    let Some(ct) = opening_entry(skb)? else {
        return Ok(());
    };
    if status(ct)? & (IPS_SRC_NAT | IPS_DST_NAT) == 0 {
        return Ok(());
    }
    let (original, reply) = (original(ct)?, reply(ct)?);
    let Some(key) = flow_key(&original) else {
        return Ok(());
    };
    // SAFETY: the value is copied out at once.
    let Some(cookie) = (unsafe { TRACKED_TUPLES.get(key) }).copied() else {
        return Ok(());
    };
    let Some(socket) = TRACKED_SOCKS.get_ptr_mut(cookie) else {
        return Ok(());
    };
    // SAFETY: a valid map value pointer; a racing packet at worst reports twice.
    unsafe {
        if (*socket).reported & NAT_REPORTED != 0 {
            return Ok(());
        }
        (*socket).reported |= NAT_REPORTED;
    }
    count(Counter::NatSeen);
    let Some(mut entry) = EVENTS.reserve::<NatEvent>(0) else {
        count(Counter::NatLost);
        return Ok(());
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` is the reserved, exclusively owned record; every field is written
    // before it is submitted.
    unsafe {
        addr_of_mut!((*event).header).write(header(EventKind::Nat));
        addr_of_mut!((*event).sock_cookie).write(cookie);
        addr_of_mut!((*event).protocol).write(key.protocol);
        addr_of_mut!((*event)._pad).write([0; 7]);
        addr_of_mut!((*event).original_src).write(endpoint(&original, true));
        addr_of_mut!((*event).original_dst).write(endpoint(&original, false));
        addr_of_mut!((*event).reply_src).write(endpoint(&reply, true));
        addr_of_mut!((*event).reply_dst).write(endpoint(&reply, false));
    }
    entry.submit(wakeup());
    Ok(())
}
