//! DNS messages of traced processes (both directions of [`packets`](crate::packets)):
//! anything to or from port 53 over UDP or TCP, with up to `DNS_CAPTURE_BYTES` of the
//! payload. Userspace parses and pairs them; the kernel only copies.

use core::ptr::addr_of_mut;

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_socket_cookie, bpf_skb_cgroup_id, bpf_skb_load_bytes},
    programs::SkBuffContext,
};
use tracer_common::{Counter, DNS_CAPTURE_BYTES, DNS_EGRESS, DnsEvent, EventKind};

use crate::{
    maps::{EVENTS, count, header, is_traced, wakeup},
    packets::Packet,
};

const DNS_PORT: u16 = 53;

#[inline(always)]
pub fn on_packet(ctx: &SkBuffContext, packet: &Packet, direction: u8) -> Result<(), i64> {
    let server_port = if direction == DNS_EGRESS {
        packet.dst_port
    } else {
        packet.src_port
    };
    if server_port != DNS_PORT {
        return Ok(());
    }
    let total = ctx.len() as usize;
    if packet.payload >= total {
        // A bare TCP segment (handshake, ACK): no message.
        return Ok(());
    }
    // SAFETY: the helpers take the program's own context.
    let (cgroup_id, cookie) = unsafe {
        (
            bpf_skb_cgroup_id(ctx.as_ptr().cast()),
            bpf_get_socket_cookie(ctx.as_ptr()),
        )
    };
    if !is_traced(cgroup_id) {
        return Ok(());
    }
    count(Counter::DnsSeen);
    let payload_len = total - packet.payload;
    let (src, dst) = packet.endpoints(ctx)?;
    let Some(mut entry) = EVENTS.reserve::<DnsEvent>(0) else {
        count(Counter::DnsLost);
        return Ok(());
    };
    let event = entry.as_mut_ptr();
    let captured = if payload_len < DNS_CAPTURE_BYTES {
        payload_len
    } else {
        DNS_CAPTURE_BYTES
    };
    // SAFETY: `event` points to the reserved, exclusively owned ring-buffer record; every
    // field is written before it is submitted (bytes of `data` past `captured` are not
    // read by userspace).
    unsafe {
        addr_of_mut!((*event).header).write(header(EventKind::Dns));
        addr_of_mut!((*event).sock_cookie).write(cookie);
        addr_of_mut!((*event).cgroup_id).write(cgroup_id);
        addr_of_mut!((*event).direction).write(direction);
        addr_of_mut!((*event).protocol).write(packet.protocol);
        addr_of_mut!((*event).payload_len).write(payload_len as u32);
        addr_of_mut!((*event).src).write(src);
        addr_of_mut!((*event).dst).write(dst);
        // The verifier needs a copy length it can prove to be in 1..=DNS_CAPTURE_BYTES
        // (a power of two): `captured` is at least 1 here, so the mask keeps its value.
        let length = ((captured as u32 - 1) & (DNS_CAPTURE_BYTES as u32 - 1)) + 1;
        let data = addr_of_mut!((*event).data).cast::<core::ffi::c_void>();
        let copied = if bpf_skb_load_bytes(ctx.as_ptr(), packet.payload as u32, data, length) == 0 {
            length as u16
        } else {
            0
        };
        addr_of_mut!((*event).captured).write(copied);
    }
    entry.submit(wakeup());
    Ok(())
}
