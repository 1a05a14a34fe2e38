//! DNS messages of traced processes (both directions of [`packets`](crate::packets)):
//! anything to or from port 53 over UDP or TCP, with up to `DNS_CAPTURE_BYTES` of the
//! payload. Userspace parses and pairs them; the kernel only copies them, and, with DNS
//! summaries on, counts instead of copying the UDP exchanges that repeat one it copied in
//! the current period (see `tracer_common::DnsRecentKey`): a pod that resolves the same
//! name thousands of times a second costs a hash and a few map operations per message.

use core::ptr::addr_of_mut;

use aya_ebpf::{
    EbpfContext,
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_skb_cgroup_id, bpf_skb_load_bytes},
    programs::SkBuffContext,
};
use tracer_common::{
    Counter, DNS_CAPTURE_BYTES, DNS_EGRESS, DNS_HASH_BYTES, DNS_HASH_SEED, DnsEvent, DnsHeld,
    DnsHeldKey, DnsRecentKey, DnsRepeatKey, DnsRepeatTotals, EventKind, IPPROTO_UDP,
    dns_duration_bucket, dns_hash_step,
};

use crate::{
    maps::{
        DNS_HELD, DNS_RECENT, DNS_REPEATS, DNS_SCRATCH, EVENTS, count, dns_summary_period_ns,
        header, is_traced, wakeup,
    },
    packets::{Packet, load},
};

const DNS_PORT: u16 = 53;
/// A DNS message's fixed header: id, flags, four counts.
const DNS_HEADER_LEN: usize = 12;

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
    let mut query_ns = 0;
    // The message as the current period's, once it has been sent.
    let mut sent_as = None;
    let period_ns = dns_summary_period_ns();
    if period_ns != 0 && packet.protocol == IPPROTO_UDP && payload_len >= DNS_HEADER_LEN {
        // SAFETY: a plain helper call.
        let now = unsafe { bpf_ktime_get_ns() };
        let period = now / period_ns;
        let (hash, rcode) = message_hash(ctx, packet.payload, payload_len)?;
        let recent = DnsRecentKey { cgroup_id, hash };
        // SAFETY: the value is copied out at once.
        let repeated = unsafe { DNS_RECENT.get(recent) }.is_some_and(|p| *p == period);
        let held_key = DnsHeldKey {
            sock_cookie: cookie,
            id: u16::from_ne_bytes(load(ctx, packet.payload)?),
            _pad: [0; 6],
        };
        if direction == DNS_EGRESS {
            let held = DnsHeld {
                sent_ns: now,
                cgroup_id,
                query_hash: recent.hash,
                client: src,
                server: dst,
            };
            // A full map, or a retransmission (the same id on the same socket), is sent.
            if repeated && DNS_HELD.insert(held_key, held, BPF_NOEXIST as u64).is_ok() {
                return Ok(());
            }
        } else if let Some(held) = held_query(held_key) {
            // Whoever removes the entry accounts for the query: userspace removes it when
            // the response is overdue, and then this response is a late one.
            if DNS_HELD.remove(held_key).is_ok() {
                if repeated && count_repeat(&held, rcode, now) {
                    return Ok(());
                }
                query_ns = held.sent_ns;
            }
        }
        sent_as = Some((recent, period));
    }
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
        addr_of_mut!((*event).query_ns).write(query_ns);
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
    if let Some((recent, period)) = sent_as {
        // A full map evicts its least recently used message, which is then sent again.
        let _ = DNS_RECENT.insert(recent, period, 0);
    }
    Ok(())
}

/// The query held back under `key`, copied out.
#[inline(always)]
fn held_query(key: DnsHeldKey) -> Option<DnsHeld> {
    // SAFETY: the value is copied out at once.
    unsafe { DNS_HELD.get(key) }.copied()
}

/// `tracer_common::dns_message_hash` of the UDP payload at `payload` (at least
/// `DNS_HEADER_LEN` bytes), over the packet, and the message's RCODE.
#[inline(always)]
fn message_hash(ctx: &SkBuffContext, payload: usize, payload_len: usize) -> Result<(u64, u8), i64> {
    let scratch = DNS_SCRATCH.get_ptr_mut(0).ok_or(0)?;
    let body = payload_len - 2;
    let length = if body < DNS_HASH_BYTES {
        body
    } else {
        DNS_HASH_BYTES
    };
    // As for the capture: a length the verifier can bound, equal to `length` (1..=510).
    let copy = ((length as u32 - 1) & (DNS_CAPTURE_BYTES as u32 - 1)) + 1;
    // SAFETY: the scratch value holds DNS_CAPTURE_BYTES bytes, at least `copy`.
    let loaded =
        unsafe { bpf_skb_load_bytes(ctx.as_ptr(), (payload + 2) as u32, scratch.cast(), copy) };
    if loaded != 0 {
        return Err(loaded);
    }
    let words = scratch.cast::<u64>();
    // SAFETY: within the scratch value. The RCODE is the low 4 bits of the message's
    // fourth byte, the second of the first word (little-endian).
    let rcode = ((unsafe { *words } >> 8) & 0x0f) as u8;
    let mut hash = DNS_HASH_SEED;
    let mut word_index = 0;
    while word_index < DNS_CAPTURE_BYTES / 8 {
        let start = word_index * 8;
        if start >= length {
            break;
        }
        // SAFETY: `word_index` < DNS_CAPTURE_BYTES / 8, within the scratch value.
        let mut word = unsafe { *words.add(word_index) };
        let rest = length - start;
        if rest < 8 {
            // Bytes past the message are left over from an earlier one: zero them, as
            // the userspace hash pads.
            word &= (1u64 << (rest * 8)) - 1;
        }
        hash = dns_hash_step(hash, word);
        word_index += 1;
    }
    Ok((dns_hash_step(hash, payload_len as u64), rcode))
}

/// Counts a repeated exchange in `DNS_REPEATS`; `false` when the map is full (the
/// response is then sent).
#[inline(always)]
fn count_repeat(held: &DnsHeld, rcode: u8, now: u64) -> bool {
    let duration = now.saturating_sub(held.sent_ns);
    let key = DnsRepeatKey {
        cgroup_id: held.cgroup_id,
        query_hash: held.query_hash,
        server: held.server,
        rcode,
        bucket: dns_duration_bucket(duration) as u8,
        _pad: [0; 2],
    };
    if let Some(totals) = DNS_REPEATS.get_ptr_mut(key) {
        // SAFETY: this CPU's value; see DNS_REPEATS for why nothing else writes it now.
        unsafe {
            (*totals).exchanges += 1;
            (*totals).duration_ns += duration;
        }
        return true;
    }
    let first = DnsRepeatTotals {
        exchanges: 1,
        duration_ns: duration,
    };
    // A new key's value is `first` on this CPU and zero on the others. Another CPU that
    // added the key in the meantime makes this insert fail: the response is then sent.
    DNS_REPEATS.insert(key, first, BPF_NOEXIST as u64).is_ok()
}
