//! Turns ring-buffer records into typed events, checking kind and length first so a
//! record from a mismatched kernel object is reported, never misread.

use std::{
    mem::{offset_of, size_of},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use tracer_common::{
    AF_INET, AF_INET6, ConnectEvent, DNS_CAPTURE_BYTES, DnsEvent, DropEvent, Endpoint, EventHeader,
    EventKind, FirstPacketEvent, IcmpErrorEvent, SockStateEvent,
};

/// A decoded kernel event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelEvent {
    Connect(ConnectEvent),
    SockState(SockStateEvent),
    FirstPacket(FirstPacketEvent),
    IcmpError(IcmpErrorEvent),
    Drop(DropEvent),
    Dns(DnsCapture),
}

/// A [`DnsEvent`] with only the bytes the kernel copied of the message: most messages
/// are a fraction of the record's fixed capture size, and every traced lookup makes
/// several of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsCapture {
    pub header: EventHeader,
    pub sock_cookie: u64,
    pub cgroup_id: u64,
    /// `DNS_EGRESS` or `DNS_INGRESS`.
    pub direction: u8,
    /// `IPPROTO_UDP` or `IPPROTO_TCP` (TCP payloads start with a 2-byte length).
    pub protocol: u8,
    /// Length of the transport payload in the packet; more than `message` holds when the
    /// kernel copied only a prefix.
    pub payload_len: u32,
    pub src: Endpoint,
    pub dst: Endpoint,
    /// For a response to a query the kernel held back: when that query left; else 0.
    pub query_ns: u64,
    pub message: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes is shorter than an event header")]
    NoHeader(usize),
    #[error("unknown event kind {0}")]
    UnknownKind(u32),
    #[error("DNS record claims {0} captured bytes, more than the {DNS_CAPTURE_BYTES} copied")]
    DnsOverlong(u16),
    #[error("{kind:?} record has {got} bytes, expected {expected}")]
    WrongLength {
        kind: EventKind,
        got: usize,
        expected: usize,
    },
}

/// The kernel time a record's program took (its header's), if it has a header.
pub(super) fn event_time(record: &[u8]) -> Option<u64> {
    read::<EventHeader>(record).map(|header| header.ts_ns)
}

pub fn decode(record: &[u8]) -> Result<KernelEvent, DecodeError> {
    let header: EventHeader = read(record).ok_or(DecodeError::NoHeader(record.len()))?;
    let kind = EventKind::from_raw(header.kind).ok_or(DecodeError::UnknownKind(header.kind))?;
    let wrong_length = |expected| DecodeError::WrongLength {
        kind,
        got: record.len(),
        expected,
    };
    // The ring buffer pads records to 8 bytes, so an exact size is the only valid one.
    match kind {
        EventKind::Connect => exact::<ConnectEvent>(record)
            .map(KernelEvent::Connect)
            .ok_or_else(|| wrong_length(size_of::<ConnectEvent>())),
        EventKind::SockState => exact::<SockStateEvent>(record)
            .map(KernelEvent::SockState)
            .ok_or_else(|| wrong_length(size_of::<SockStateEvent>())),
        EventKind::FirstPacket => exact::<FirstPacketEvent>(record)
            .map(KernelEvent::FirstPacket)
            .ok_or_else(|| wrong_length(size_of::<FirstPacketEvent>())),
        EventKind::IcmpError => exact::<IcmpErrorEvent>(record)
            .map(KernelEvent::IcmpError)
            .ok_or_else(|| wrong_length(size_of::<IcmpErrorEvent>())),
        EventKind::Drop => exact::<DropEvent>(record)
            .map(KernelEvent::Drop)
            .ok_or_else(|| wrong_length(size_of::<DropEvent>())),
        EventKind::Dns => {
            if record.len() != size_of::<DnsEvent>() {
                return Err(wrong_length(size_of::<DnsEvent>()));
            }
            // Only what the kernel wrote is read, field by field, and the captured prefix
            // of `data`: copying the whole record (or zeroing a `DnsEvent` to copy into)
            // would touch most of its 512 bytes of data for every message.
            let field = |offset: usize| record.get(offset..).unwrap_or_default();
            let wrong = || wrong_length(size_of::<DnsEvent>());
            let captured: u16 = read(field(offset_of!(DnsEvent, captured))).ok_or_else(wrong)?;
            let message = field(offset_of!(DnsEvent, data))
                .get(..usize::from(captured))
                .ok_or(DecodeError::DnsOverlong(captured))?;
            Ok(KernelEvent::Dns(DnsCapture {
                header,
                sock_cookie: read(field(offset_of!(DnsEvent, sock_cookie))).ok_or_else(wrong)?,
                cgroup_id: read(field(offset_of!(DnsEvent, cgroup_id))).ok_or_else(wrong)?,
                direction: read(field(offset_of!(DnsEvent, direction))).ok_or_else(wrong)?,
                protocol: read(field(offset_of!(DnsEvent, protocol))).ok_or_else(wrong)?,
                payload_len: read(field(offset_of!(DnsEvent, payload_len))).ok_or_else(wrong)?,
                src: read(field(offset_of!(DnsEvent, src))).ok_or_else(wrong)?,
                dst: read(field(offset_of!(DnsEvent, dst))).ok_or_else(wrong)?,
                query_ns: read(field(offset_of!(DnsEvent, query_ns))).ok_or_else(wrong)?,
                message: message.to_vec(),
            }))
        }
    }
}

fn exact<T: aya::Pod>(record: &[u8]) -> Option<T> {
    (record.len() == size_of::<T>())
        .then(|| read(record))
        .flatten()
}

fn read<T: aya::Pod>(bytes: &[u8]) -> Option<T> {
    (bytes.len() >= size_of::<T>()).then(|| {
        // SAFETY: length checked above; `T: Pod` accepts any bit pattern; the read is
        // unaligned because ring-buffer records carry no alignment guarantee for us.
        unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
    })
}

/// The socket address of an endpoint; `None` when the family is unknown.
pub fn socket_addr(endpoint: &Endpoint) -> Option<SocketAddr> {
    let ip = match endpoint.family {
        AF_INET => {
            let [a, b, c, d, ..] = endpoint.addr;
            IpAddr::V4(Ipv4Addr::new(a, b, c, d))
        }
        // IPv4-mapped addresses (an IPv6 socket talking IPv4) are shown as IPv4.
        AF_INET6 => Ipv6Addr::from(endpoint.addr).to_canonical(),
        _ => return None,
    };
    Some(SocketAddr::new(ip, endpoint.port))
}

/// A NUL-padded kernel `comm` as text.
pub fn comm(raw: &[u8]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use tracer_common::IPPROTO_TCP;

    use super::*;

    fn bytes_of<T: aya::Pod>(value: &T) -> Vec<u8> {
        // SAFETY: Pod types are plain bytes.
        unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }
            .to_vec()
    }

    fn connect_fixture() -> ConnectEvent {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"curl");
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[203, 0, 113, 10]);
        ConnectEvent {
            header: EventHeader {
                kind: EventKind::Connect as u32,
                cpu: 1,
                ts_ns: 42,
            },
            cgroup_id: 7,
            sock_cookie: 99,
            pid: 1234,
            tid: 1235,
            comm,
            protocol: IPPROTO_TCP,
            call: tracer_common::CALL_CONNECT,
            _pad: [0; 6],
            dst: Endpoint {
                family: AF_INET,
                port: 80,
                addr,
            },
        }
    }

    #[test]
    fn decodes_a_connect_record() {
        let event = connect_fixture();
        let bytes = bytes_of(&event);
        // Byte-level fixture check: kind, pid and port at their documented offsets.
        assert_eq!(&bytes[0..4], &1u32.to_ne_bytes());
        assert_eq!(&bytes[32..36], &1234u32.to_ne_bytes());
        assert_eq!(&bytes[64..66], &AF_INET.to_ne_bytes());
        assert_eq!(decode(&bytes), Ok(KernelEvent::Connect(event)));
        assert_eq!(
            socket_addr(&event.dst),
            Some("203.0.113.10:80".parse().unwrap())
        );
        assert_eq!(comm(&event.comm), "curl");
    }

    #[test]
    fn rejects_short_unknown_and_mis_sized_records() {
        assert_eq!(decode(&[1, 0, 0]), Err(DecodeError::NoHeader(3)));
        let mut unknown = bytes_of(&connect_fixture());
        unknown[0..4].copy_from_slice(&77u32.to_ne_bytes());
        assert_eq!(decode(&unknown), Err(DecodeError::UnknownKind(77)));
        let bytes = bytes_of(&connect_fixture());
        assert_eq!(
            decode(&bytes[..40]),
            Err(DecodeError::WrongLength {
                kind: EventKind::Connect,
                got: 40,
                expected: 88
            })
        );
        // A connect header on a first-packet-sized record is not accepted either.
        assert!(decode(&bytes[..72]).is_err());
        let first_packet = FirstPacketEvent {
            header: EventHeader {
                kind: EventKind::FirstPacket as u32,
                cpu: 0,
                ts_ns: 5,
            },
            sock_cookie: 99,
            protocol: IPPROTO_TCP,
            _pad: [0; 7],
            src: Endpoint::UNKNOWN,
            dst: connect_fixture().dst,
        };
        let bytes = bytes_of(&first_packet);
        assert_eq!(decode(&bytes), Ok(KernelEvent::FirstPacket(first_packet)));
        assert!(decode(&bytes[..64]).is_err());
    }

    #[test]
    fn a_dns_record_keeps_only_the_captured_bytes() {
        let mut data = [0xee; DNS_CAPTURE_BYTES];
        data[..5].copy_from_slice(b"query");
        let mut event = DnsEvent {
            header: EventHeader {
                kind: EventKind::Dns as u32,
                cpu: 1,
                ts_ns: 9,
            },
            sock_cookie: 99,
            cgroup_id: 7,
            direction: tracer_common::DNS_EGRESS,
            protocol: tracer_common::IPPROTO_UDP,
            captured: 5,
            payload_len: 700,
            src: Endpoint::UNKNOWN,
            dst: connect_fixture().dst,
            query_ns: 5,
            data,
        };
        let Ok(KernelEvent::Dns(capture)) = decode(&bytes_of(&event)) else {
            panic!("not a DNS event");
        };
        assert_eq!(
            (
                capture.message.as_slice(),
                capture.payload_len,
                capture.sock_cookie
            ),
            (&b"query"[..], 700, 99)
        );
        assert_eq!(
            (capture.cgroup_id, capture.dst, capture.query_ns),
            (7, connect_fixture().dst, 5)
        );
        assert_eq!(
            (
                capture.header,
                capture.direction,
                capture.protocol,
                capture.src
            ),
            (
                event.header,
                tracer_common::DNS_EGRESS,
                tracer_common::IPPROTO_UDP,
                Endpoint::UNKNOWN
            )
        );
        assert_eq!(
            decode(&bytes_of(&event)[..100]),
            Err(DecodeError::WrongLength {
                kind: EventKind::Dns,
                got: 100,
                expected: 600
            })
        );
        event.captured = DNS_CAPTURE_BYTES as u16 + 1;
        assert_eq!(
            decode(&bytes_of(&event)),
            Err(DecodeError::DnsOverlong(DNS_CAPTURE_BYTES as u16 + 1))
        );
    }

    #[test]
    fn ipv6_and_unknown_family() {
        let v6 = Endpoint {
            family: AF_INET6,
            port: 443,
            addr: "2001:db8::10".parse::<Ipv6Addr>().unwrap().octets(),
        };
        assert_eq!(
            socket_addr(&v6),
            Some("[2001:db8::10]:443".parse().unwrap())
        );
        assert_eq!(socket_addr(&Endpoint::UNKNOWN), None);
        let mapped = Endpoint {
            family: AF_INET6,
            port: 80,
            addr: "::ffff:203.0.113.10".parse::<Ipv6Addr>().unwrap().octets(),
        };
        assert_eq!(
            socket_addr(&mapped),
            Some("203.0.113.10:80".parse().unwrap())
        );
    }

    #[test]
    fn comm_without_nul_and_with_invalid_utf8() {
        assert_eq!(comm(b"0123456789abcdef"), "0123456789abcdef");
        assert_eq!(comm(&[0xff, b'a', 0, b'b']), "\u{fffd}a");
    }
}
