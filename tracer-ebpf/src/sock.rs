//! Reading a kernel `struct sock` from the tracing programs, at offsets resolved by
//! userspace from the running kernel's BTF (`SOCK_OFFSETS`): Rust eBPF has no CO-RE.
//!
//! Plain loads where the verifier knows the pointer as the tracepoint's `struct sock *`
//! (it checks each constant offset against the type and makes the load fault-safe,
//! without a helper call); `bpf_probe_read_kernel` for fields beyond `struct sock` (those
//! of `struct tcp_sock`) and for pointers read from memory.

use aya_ebpf::Global;
use tracer_common::{AF_INET, AF_INET6, Endpoint, SockOffsets};

use crate::{maps::POD_CGROUP_ROOTS, skb::read};

/// Set by userspace at load time (`EbpfLoader::set_global`).
#[unsafe(no_mangle)]
static SOCK_OFFSETS: Global<SockOffsets> = Global::new(SockOffsets {
    family: 0,
    num: 0,
    dport: 0,
    rcv_saddr: 0,
    daddr: 0,
    v6_rcv_saddr: 0,
    v6_daddr: 0,
    err: 0,
    err_soft: 0,
    total_retrans: 0,
    cookie: 0,
    state: 0,
    protocol: 0,
    rcv_nxt: 0,
    snd_una: 0,
    cgroup: 0,
    cgroup_kn: 0,
    kn_id: 0,
    cgroup_level: 0,
    cgroup_ancestors: 0,
});

#[inline(always)]
pub fn offsets() -> SockOffsets {
    SOCK_OFFSETS.load()
}

/// A `struct sock` field at `offset`, by a plain load.
///
/// # Safety
/// `sk` is a tracepoint's `struct sock *` argument and `offset` one of [`offsets`]'
/// `struct sock` fields, of type `T`.
#[inline(always)]
pub unsafe fn field<T: Copy>(sk: *const u8, offset: u32) -> T {
    // SAFETY: per the contract.
    unsafe { *sk.add(offset as usize).cast::<T>() }
}

/// The socket's cookie, 0 until something asked for it: `connect4` did for every socket
/// of the pods' processes.
///
/// # Safety
/// As for [`field`].
#[inline(always)]
pub unsafe fn cookie(sk: *const u8) -> u64 {
    // SAFETY: per the contract.
    unsafe { field(sk, offsets().cookie) }
}

/// cgroup levels walked down from the root looking for a pod cgroup root: kubelet's sit
/// a few levels down, and the verifier needs a bound.
const MAX_CGROUP_DEPTH: usize = 16;

/// The id of the cgroup the socket's creator was in (`bpf_get_current_cgroup_id` in that
/// process), when that cgroup lies below one of `POD_CGROUP_ROOTS`; `None` for the
/// node's own sockets, or if unreadable.
#[inline(always)]
pub fn pod_cgroup_id(sk: *const u8) -> Option<u64> {
    let off = offsets();
    let cgroup: u64 = read(sk, off.cgroup as usize).ok()?;
    if cgroup == 0 {
        return None;
    }
    let cgroup = cgroup as *const u8;
    let level: i32 = read(cgroup, off.cgroup_level as usize).ok()?;
    let id_of = |cgroup: u64| -> Option<u64> {
        let kn: u64 = read(cgroup as *const u8, off.cgroup_kn as usize).ok()?;
        if kn == 0 {
            return None;
        }
        read(kn as *const u8, off.kn_id as usize).ok()
    };
    // `ancestors[level]` is the cgroup itself.
    for depth in 0..MAX_CGROUP_DEPTH {
        if depth as i32 > level {
            return None;
        }
        let at = off.cgroup_ancestors as usize + depth * size_of::<u64>();
        let ancestor: u64 = read(cgroup, at).ok()?;
        // SAFETY: only existence is checked.
        if ancestor != 0 && unsafe { POD_CGROUP_ROOTS.get(id_of(ancestor)?) }.is_some() {
            return id_of(cgroup as u64);
        }
    }
    None
}

/// The tuple from `struct sock_common`, by plain loads.
///
/// # Safety
/// As for [`field`].
#[inline(always)]
pub unsafe fn tuple(sk: *const u8) -> (Endpoint, Endpoint) {
    let off = offsets();
    // SAFETY: per the contract; every offset is a field of `struct sock_common`.
    unsafe {
        let family: u16 = field(sk, off.family);
        let mut src = Endpoint {
            family,
            port: field(sk, off.num),
            addr: [0; 16],
        };
        let mut dst = Endpoint {
            family,
            port: u16::from_be(field(sk, off.dport)),
            addr: [0; 16],
        };
        if family == AF_INET {
            src.addr[..4].copy_from_slice(&field::<u32>(sk, off.rcv_saddr).to_ne_bytes());
            dst.addr[..4].copy_from_slice(&field::<u32>(sk, off.daddr).to_ne_bytes());
        } else if family == AF_INET6 {
            src.addr = ipv6(sk, off.v6_rcv_saddr);
            dst.addr = ipv6(sk, off.v6_daddr);
        }
        (src, dst)
    }
}

/// A `struct in6_addr` field in 32-bit loads (its alignment).
///
/// # Safety
/// As for [`field`], with a `struct in6_addr` field.
#[inline(always)]
unsafe fn ipv6(sk: *const u8, offset: u32) -> [u8; 16] {
    let mut addr = [0u8; 16];
    for word in 0..4 {
        // SAFETY: per the contract, within the field.
        let value: u32 = unsafe { field(sk, offset + word * 4) };
        addr[word as usize * 4..word as usize * 4 + 4].copy_from_slice(&value.to_ne_bytes());
    }
    addr
}
