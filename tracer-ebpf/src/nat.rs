//! tp_btf `net_dev_queue`: the NAT the node applied to traced flows.
//!
//! Every packet queued on any device passes here with its conntrack entry attached
//! (`skb->_nfct`). When the entry's two directions disagree, NAT rewrote the flow: the
//! reply's destination is the translated source (SNAT/MASQUERADE to the node's address and
//! a new port), the reply's source the translated destination (a Service's DNAT to a
//! backend). The entry's original tuple is the pod's own, so `TRACKED_TUPLES` tells
//! whether the flow is traced; each socket's translation is reported once.
//!
//! `struct nf_conn` is read at offsets resolved from BTF (`NAT_OFFSETS`); the tuple's own
//! layout is checked against BTF by userspace (`tracer_common::nf_tuple`).

use core::ptr::addr_of_mut;

use aya_ebpf::{Global, macros::btf_tracepoint, programs::BtfTracePointContext};
use tracer_common::{
    AF_INET, AF_INET6, Counter, Endpoint, EventKind, FlowTuple, IPPROTO_TCP, IPPROTO_UDP, NatEvent,
    NatOffsets,
};

use crate::{
    maps::{EVENTS, NAT_REPORTED, TRACKED_SOCKS, TRACKED_TUPLES, count, header},
    skb::read,
};

/// Set by userspace at load time from the kernel's BTF.
#[unsafe(no_mangle)]
static NAT_OFFSETS: Global<NatOffsets> = Global::new(NatOffsets {
    nfct: 0,
    tuplehash: 0,
    tuple_hash_size: 0,
    tuple: 0,
});

/// `NFCT_PTRMASK`: `_nfct` keeps the ctinfo in its low bits.
const NFCT_PTRMASK: u64 = !7;
use tracer_common::nf_tuple::{
    DST_ADDR as TUPLE_DST_ADDR, DST_PORT as TUPLE_DST_PORT, L3NUM as TUPLE_L3NUM,
    PROTONUM as TUPLE_PROTONUM, SIZE as TUPLE_SIZE, SRC_PORT as TUPLE_SRC_PORT,
};

#[btf_tracepoint(function = "net_dev_queue")]
pub fn net_dev_queue(ctx: BtfTracePointContext) -> i32 {
    let skb: *const u8 = ctx.arg(0);
    let _ = report(skb);
    0
}

/// A `struct nf_conntrack_tuple`, read whole.
type RawTuple = [u8; TUPLE_SIZE];

/// An endpoint of a raw tuple: the address at `addr_at`, the port at `port_at`.
#[inline(always)]
fn endpoint(tuple: &RawTuple, addr_at: usize, port_at: usize) -> Endpoint {
    let mut addr = [0u8; 16];
    addr.copy_from_slice(&tuple[addr_at..addr_at + 16]);
    Endpoint {
        family: u16::from_ne_bytes([tuple[TUPLE_L3NUM], tuple[TUPLE_L3NUM + 1]]),
        port: u16::from_be_bytes([tuple[port_at], tuple[port_at + 1]]),
        addr,
    }
}

#[inline(always)]
fn report(skb: *const u8) -> Result<(), i32> {
    let off = NAT_OFFSETS.load();
    let nfct: u64 = read(skb, off.nfct as usize)?;
    let ct = (nfct & NFCT_PTRMASK) as *const u8;
    if ct.is_null() {
        return Ok(());
    }
    let original_at = ct.wrapping_add((off.tuplehash + off.tuple) as usize);
    let original: RawTuple = read(original_at, 0)?;
    let family = u16::from_ne_bytes([original[TUPLE_L3NUM], original[TUPLE_L3NUM + 1]]);
    let protocol = original[TUPLE_PROTONUM];
    if (family != AF_INET && family != AF_INET6)
        || (protocol != IPPROTO_TCP && protocol != IPPROTO_UDP)
    {
        return Ok(());
    }
    let reply: RawTuple = read(original_at, off.tuple_hash_size as usize)?;
    // Without NAT the reply is the original reversed: its source (address and port) is
    // the original destination, and the other way round.
    let reversed = reply[..TUPLE_L3NUM] == original[TUPLE_DST_ADDR..TUPLE_PROTONUM]
        && reply[TUPLE_DST_ADDR..TUPLE_PROTONUM] == original[..TUPLE_L3NUM];
    if reversed {
        return Ok(());
    }
    let mut key = FlowTuple {
        family,
        protocol,
        _pad: 0,
        src_port: u16::from_be_bytes([original[TUPLE_SRC_PORT], original[TUPLE_SRC_PORT + 1]]),
        dst_port: u16::from_be_bytes([original[TUPLE_DST_PORT], original[TUPLE_DST_PORT + 1]]),
        src: [0; 16],
        dst: [0; 16],
    };
    key.src.copy_from_slice(&original[..16]);
    key.dst
        .copy_from_slice(&original[TUPLE_DST_ADDR..TUPLE_DST_ADDR + 16]);
    // SAFETY: the value is copied out at once.
    let Some(cookie) = (unsafe { TRACKED_TUPLES.get(key) }).copied() else {
        return Ok(());
    };
    let Some(state) = TRACKED_SOCKS.get_ptr_mut(cookie) else {
        return Ok(());
    };
    // SAFETY: a valid map value pointer; a racing packet at worst reports twice.
    unsafe {
        if *state & NAT_REPORTED != 0 {
            return Ok(());
        }
        *state |= NAT_REPORTED;
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
        addr_of_mut!((*event).protocol).write(protocol);
        addr_of_mut!((*event)._pad).write([0; 7]);
        addr_of_mut!((*event).original_src).write(endpoint(&original, 0, TUPLE_SRC_PORT));
        addr_of_mut!((*event).original_dst).write(endpoint(
            &original,
            TUPLE_DST_ADDR,
            TUPLE_DST_PORT,
        ));
        addr_of_mut!((*event).reply_src).write(endpoint(&reply, 0, TUPLE_SRC_PORT));
        addr_of_mut!((*event).reply_dst).write(endpoint(&reply, TUPLE_DST_ADDR, TUPLE_DST_PORT));
    }
    entry.submit(0);
    Ok(())
}
