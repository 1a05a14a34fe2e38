//! Reading the conntrack entry (`struct nf_conn`) a packet carries in `skb->_nfct`, for
//! [`crate::drops`]: drops after NAT rewrote the packet, and the entry's state when
//! conntrack itself dropped it.
//!
//! `struct nf_conn` is read at offsets resolved from BTF (`CONNTRACK_OFFSETS`); the tuple's own
//! layout is checked against BTF by userspace (`tracer_common::nf_tuple`).

use aya_ebpf::Global;
use tracer_common::{
    AF_INET, AF_INET6, ConntrackOffsets, FlowTuple, IPPROTO_TCP, IPPROTO_UDP,
    nf_tuple::{DST_ADDR, DST_PORT, L3NUM, PROTONUM, SIZE, SRC_PORT},
};

use crate::skb::read;

/// Set by userspace at load time from the kernel's BTF; all zero when conntrack's types
/// are unknown, which turns every reader here off.
#[unsafe(no_mangle)]
static CONNTRACK_OFFSETS: Global<ConntrackOffsets> = Global::new(ConntrackOffsets {
    nfct: 0,
    tuplehash: 0,
    tuple: 0,
    status: 0,
});

/// `NFCT_PTRMASK`: `_nfct` keeps the ctinfo in its low bits.
const NFCT_PTRMASK: u64 = !7;
/// `IP_CT_UNTRACKED`: the ctinfo of a packet exempted from tracking (`NOTRACK`).
const IP_CT_UNTRACKED: u64 = 7;
/// `IP_CT_IS_REPLY`: ctinfo values from here on (below untracked) are reply packets.
const IP_CT_IS_REPLY: u64 = 3;

/// A `struct nf_conntrack_tuple`, read whole.
pub type RawTuple = [u8; SIZE];

/// What a packet carries in `skb->_nfct`.
pub enum Attached {
    /// No entry: conntrack has not seen the packet, or judged it invalid.
    None,
    /// Exempted from tracking.
    Untracked,
    /// A pointer to the `struct nf_conn`, and whether the packet goes in the entry's
    /// reply direction.
    Entry(*const u8, bool),
}

#[inline(always)]
pub fn attached(skb: *const u8) -> Result<Attached, i32> {
    let nfct = nfct(skb)?;
    let ct = (nfct & NFCT_PTRMASK) as *const u8;
    let ctinfo = nfct & !NFCT_PTRMASK;
    Ok(if !ct.is_null() {
        Attached::Entry(ct, ctinfo >= IP_CT_IS_REPLY)
    } else if ctinfo == IP_CT_UNTRACKED {
        Attached::Untracked
    } else {
        Attached::None
    })
}

/// `skb->_nfct`: the entry's address with the packet's ctinfo in the low bits.
#[inline(always)]
fn nfct(skb: *const u8) -> Result<u64, i32> {
    let off = CONNTRACK_OFFSETS.load();
    if off.nfct == 0 {
        return Err(0);
    }
    // A plain load, not a helper call: the verifier knows `skb`'s type from the
    // tracepoint's BTF and the offset is a constant of the frozen `.rodata`, so it checks
    // the field and makes the load fault-safe.
    // SAFETY: `skb` is the tracepoint's `struct sk_buff *` and `nfct` its `_nfct` offset.
    Ok(unsafe { *skb.add(off.nfct as usize).cast::<u64>() })
}

/// The entry's original tuple.
#[inline(always)]
pub fn original(ct: *const u8) -> Result<RawTuple, i32> {
    let off = CONNTRACK_OFFSETS.load();
    read(ct, (off.tuplehash + off.tuple) as usize)
}

/// The low 32 bits of `nf_conn.status` (the `IPS_*` bits).
#[inline(always)]
pub fn status(ct: *const u8) -> Result<u32, i32> {
    read(ct, CONNTRACK_OFFSETS.load().status as usize)
}

/// The flow key of a tuple, when it is TCP or UDP over IPv4 or IPv6.
#[inline(always)]
pub fn flow_key(tuple: &RawTuple) -> Option<FlowTuple> {
    let family = u16::from_ne_bytes([tuple[L3NUM], tuple[L3NUM + 1]]);
    let protocol = tuple[PROTONUM];
    if (family != AF_INET && family != AF_INET6)
        || (protocol != IPPROTO_TCP && protocol != IPPROTO_UDP)
    {
        return None;
    }
    let mut key = FlowTuple {
        family,
        protocol,
        _pad: 0,
        src_port: u16::from_be_bytes([tuple[SRC_PORT], tuple[SRC_PORT + 1]]),
        dst_port: u16::from_be_bytes([tuple[DST_PORT], tuple[DST_PORT + 1]]),
        src: [0; 16],
        dst: [0; 16],
    };
    key.src.copy_from_slice(&tuple[..16]);
    key.dst.copy_from_slice(&tuple[DST_ADDR..DST_ADDR + 16]);
    Some(key)
}
