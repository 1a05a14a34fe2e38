//! egress-tracer kernel programs, one module per hook.
//!
//! - [`connect`]: cgroup `connect4`/`connect6`, every `connect()` of the pods' processes.
//! - [`packets`]: cgroup_skb egress and ingress, every pod packet parsed once for
//!   [`first_packet`] (the first TCP SYN or UDP datagram of the sockets that `connect` saw,
//!   with the tuple the kernel chose), [`reply`] (the first answer to their SYN, with its
//!   TTL) and [`dns`] (DNS messages, both directions).
//! - [`handshake`]: the end of those sockets' TCP handshakes: established at the
//!   SYN-ACK [`reply`] sees, failed at tp_btf `inet_sk_error_report`, abandoned by the
//!   application at tp_btf `tcp_destroy_sock`.
//! - [`icmp`]: tp_btf `consume_skb` filtered to the ICMP receive functions, the ICMP
//!   errors that explain failed attempts.
//! - [`drops`]: tp_btf `kfree_skb`, packets of traced flows dropped, with the reason.
//!
//! [`skb`] reads packets from `struct sk_buff` pointers for the tracing programs,
//! [`sock`] sockets from `struct sock` pointers, and [`conntrack`] the conntrack entries
//! packets carry. (What NAT made of a flow, userspace
//! reads from the flow's conntrack entry over ctnetlink: once per flow, not per packet.)
//!
//! All of them write to the ring buffer and counters in [`maps`]. Event layouts live in
//! `tracer-common`, shared with userspace.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod connect;
#[cfg(target_arch = "bpf")]
mod conntrack;
#[cfg(target_arch = "bpf")]
mod dns;
#[cfg(target_arch = "bpf")]
mod drops;
#[cfg(target_arch = "bpf")]
mod first_packet;
#[cfg(target_arch = "bpf")]
mod handshake;
#[cfg(target_arch = "bpf")]
mod icmp;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod packets;
#[cfg(target_arch = "bpf")]
mod reply;
#[cfg(target_arch = "bpf")]
mod skb;
#[cfg(target_arch = "bpf")]
mod sock;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic, so this is never called.
    loop {}
}

/// Host builds (`cargo build --workspace`, clippy) compile this crate as an empty binary;
/// the real object is built for `bpfel-unknown-none` by `tracer/build.rs`.
#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
