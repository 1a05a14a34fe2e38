//! Read-only access to the conntrack table over ctnetlink (`NETLINK_NETFILTER`, the
//! interface of `conntrack -L` and `conntrack -G`): a dump of every entry of the node,
//! including those of untraced pods and host processes that share its SNAT ports, and
//! lookups of single entries by their original tuple.
//!
//! No events, no changes to the table. Messages are parsed defensively: a malformed entry
//! is skipped, never trusted.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

const NETLINK_NETFILTER: libc::c_int = 12;
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_HEADER: usize = 16;
const NFGENMSG: usize = 4;
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLA_F_NESTED: u16 = 0x8000;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_STATUS_MASK: u16 = 26;

/// `IPS_SRC_NAT` status bit: the entry's source is translated (SNAT or MASQUERADE).
pub const IPS_SRC_NAT: u32 = 1 << 4;

/// One direction of an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuple {
    pub src: SocketAddr,
    pub dst: SocketAddr,
}

/// One conntrack entry (TCP, UDP and other port-based protocols).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub protocol: u8,
    pub original: Tuple,
    pub reply: Tuple,
    /// `IPS_*` bits.
    pub status: u32,
}

/// Dumps the entries of the caller's network namespace whose status has every bit of
/// `status` set, handing each to `visit` (entries are not collected, so memory does not
/// grow with the table). The kernel filters, so entries left out cost it no message;
/// kernels without dump filtering by status (`CTA_STATUS_MASK`) send every entry, so
/// `visit` must still check what it relies on.
pub fn dump(status: u32, mut visit: impl FnMut(&Entry)) -> io::Result<()> {
    let socket = open()?;
    send(&socket, &dump_request(status))?;
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let received = receive(&socket, &mut buffer)?;
        if received == 0 {
            return Ok(());
        }
        if parse_messages(&buffer[..received], &mut visit)? {
            return Ok(());
        }
    }
}

/// Looks up single entries by their original tuple (`conntrack -G`), one request at a
/// time on a socket kept open.
pub struct Lookups {
    socket: OwnedFd,
    sequence: u32,
    buffer: Vec<u8>,
}

impl Lookups {
    /// Opens the socket and makes one lookup, so that a missing permission
    /// (`CAP_NET_ADMIN`) or a missing `nf_conntrack_netlink` module shows now.
    pub fn open() -> io::Result<Self> {
        let socket = open()?;
        let timeout = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
        };
        // SAFETY: passes a valid `timeval` and its size.
        let set = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if set < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut lookups = Self {
            socket,
            sequence: 0,
            buffer: vec![0u8; 8 * 1024],
        };
        let nowhere = SocketAddr::from(([0, 0, 0, 0], 0));
        lookups.get(libc::IPPROTO_TCP as u8, nowhere, nowhere)?;
        Ok(lookups)
    }

    /// The entry whose original direction is `src` to `dst` over `protocol`, if the table
    /// has one.
    pub fn get(
        &mut self,
        protocol: u8,
        src: SocketAddr,
        dst: SocketAddr,
    ) -> io::Result<Option<Entry>> {
        self.sequence = self.sequence.wrapping_add(1);
        let Some(request) = get_request(self.sequence, protocol, src, dst) else {
            return Ok(None);
        };
        send(&self.socket, &request)?;
        loop {
            let received = receive(&self.socket, &mut self.buffer)?;
            // Answers to earlier requests that timed out are skipped by their sequence.
            if let Some(answer) = parse_answer(&self.buffer[..received], self.sequence)? {
                return Ok(answer);
            }
        }
    }
}

/// A `NETLINK_NETFILTER` socket.
fn open() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_NETFILTER,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn send(socket: &OwnedFd, request: &[u8]) -> io::Result<()> {
    // SAFETY: sends `request.len()` initialised bytes; the kernel is the destination of
    // an unbound netlink socket's send.
    let sent = unsafe {
        libc::send(
            socket.as_raw_fd(),
            request.as_ptr().cast(),
            request.len(),
            0,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One datagram into `buffer`; its length.
fn receive(socket: &OwnedFd, buffer: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: receives into a buffer of `buffer.len()` bytes.
        let received = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                0,
            )
        };
        if received >= 0 {
            return Ok(received as usize);
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// The netlink and nfgenmsg headers of a ctnetlink GET request; [`finish`] sets its length.
fn header(flags: u16, sequence: u32, family: u8) -> Vec<u8> {
    let mut request = Vec::with_capacity(128);
    request.extend_from_slice(&0u32.to_ne_bytes());
    request.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET).to_ne_bytes());
    request.extend_from_slice(&flags.to_ne_bytes());
    request.extend_from_slice(&sequence.to_ne_bytes());
    request.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
    // nfgenmsg: the family, version 0, resource id 0.
    request.extend_from_slice(&[family, 0, 0, 0]);
    request
}

fn finish(request: &mut [u8]) {
    let len = request.len() as u32;
    request[0..4].copy_from_slice(&len.to_ne_bytes());
}

/// Appends an attribute; `fill` writes its payload.
fn put(request: &mut Vec<u8>, kind: u16, fill: impl FnOnce(&mut Vec<u8>)) {
    let start = request.len();
    request.extend_from_slice(&[0; 4]);
    fill(request);
    let len = (request.len() - start) as u16;
    request[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    request[start + 2..start + 4].copy_from_slice(&kind.to_ne_bytes());
    request.resize(align(request.len()), 0);
}

/// A dump request for the entries whose status has every bit of `status`.
fn dump_request(status: u32) -> Vec<u8> {
    let mut request = header(NLM_F_REQUEST | NLM_F_DUMP, 1, libc::AF_UNSPEC as u8);
    put(&mut request, CTA_STATUS, |r| {
        r.extend_from_slice(&status.to_be_bytes())
    });
    put(&mut request, CTA_STATUS_MASK, |r| {
        r.extend_from_slice(&status.to_be_bytes())
    });
    finish(&mut request);
    request
}

/// A GET request for the entry with this original tuple; `None` when the addresses'
/// families differ.
fn get_request(sequence: u32, protocol: u8, src: SocketAddr, dst: SocketAddr) -> Option<Vec<u8>> {
    let (family, addresses) = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (
            libc::AF_INET,
            [
                (CTA_IP_V4_SRC, s.octets().to_vec()),
                (CTA_IP_V4_DST, d.octets().to_vec()),
            ],
        ),
        (IpAddr::V6(s), IpAddr::V6(d)) => (
            libc::AF_INET6,
            [
                (CTA_IP_V6_SRC, s.octets().to_vec()),
                (CTA_IP_V6_DST, d.octets().to_vec()),
            ],
        ),
        _ => return None,
    };
    let mut request = header(NLM_F_REQUEST, sequence, family as u8);
    put(&mut request, CTA_TUPLE_ORIG | NLA_F_NESTED, |r| {
        put(r, CTA_TUPLE_IP | NLA_F_NESTED, |r| {
            for (kind, address) in &addresses {
                put(r, *kind, |r| r.extend_from_slice(address));
            }
        });
        put(r, CTA_TUPLE_PROTO | NLA_F_NESTED, |r| {
            put(r, CTA_PROTO_NUM, |r| r.push(protocol));
            put(r, CTA_PROTO_SRC_PORT, |r| {
                r.extend_from_slice(&src.port().to_be_bytes())
            });
            put(r, CTA_PROTO_DST_PORT, |r| {
                r.extend_from_slice(&dst.port().to_be_bytes())
            });
        });
    });
    finish(&mut request);
    Some(request)
}

/// One netlink message: its type, sequence number and payload.
struct Message<'a> {
    kind: u16,
    sequence: u32,
    payload: &'a [u8],
}

/// The messages of one datagram.
fn messages(mut data: &[u8]) -> impl Iterator<Item = io::Result<Message<'_>>> {
    std::iter::from_fn(move || {
        if data.len() < NLMSG_HEADER {
            return None;
        }
        let len = u32::from_ne_bytes(data[0..4].try_into().unwrap_or_default()) as usize;
        if len < NLMSG_HEADER || len > data.len() {
            data = &[];
            return Some(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "truncated netlink message",
            )));
        }
        let message = Message {
            kind: u16::from_ne_bytes([data[4], data[5]]),
            sequence: u32::from_ne_bytes(data[8..12].try_into().unwrap_or_default()),
            payload: &data[NLMSG_HEADER..len],
        };
        data = &data[align(len).min(data.len())..];
        Some(Ok(message))
    })
}

/// The errno of an `NLMSG_ERROR` message (0 for an acknowledgement).
fn errno(payload: &[u8]) -> i32 {
    payload
        .get(0..4)
        .map(|b| i32::from_ne_bytes(b.try_into().unwrap_or_default()))
        .unwrap_or(0)
}

/// Parses one datagram of a dump; `Ok(true)` once the dump is done.
fn parse_messages(data: &[u8], visit: &mut impl FnMut(&Entry)) -> io::Result<bool> {
    for message in messages(data) {
        let message = message?;
        match message.kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                return match errno(message.payload) {
                    0 => Ok(true),
                    errno => Err(io::Error::from_raw_os_error(-errno)),
                };
            }
            _ => {
                if let Some(entry) = message.payload.get(NFGENMSG..).and_then(parse_entry) {
                    visit(&entry);
                }
            }
        }
    }
    Ok(false)
}

/// The answer to GET request `sequence` in one datagram: `Some(None)` when the table has
/// no such entry, `None` when the datagram holds no answer to it.
fn parse_answer(data: &[u8], sequence: u32) -> io::Result<Option<Option<Entry>>> {
    for message in messages(data) {
        let message = message?;
        if message.sequence != sequence {
            continue;
        }
        if message.kind == NLMSG_ERROR {
            return match -errno(message.payload) {
                libc::ENOENT => Ok(Some(None)),
                errno => Err(io::Error::from_raw_os_error(errno)),
            };
        }
        return Ok(Some(message.payload.get(NFGENMSG..).and_then(parse_entry)));
    }
    Ok(None)
}

fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// The attributes of a netlink attribute stream: (type, payload).
fn attributes(mut data: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if data.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([data[0], data[1]]));
        let kind = u16::from_ne_bytes([data[2], data[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > data.len() {
            return None;
        }
        let payload = &data[4..len];
        data = &data[align(len).min(data.len())..];
        Some((kind, payload))
    })
}

fn parse_entry(data: &[u8]) -> Option<Entry> {
    let (mut original, mut reply, mut status) = (None, None, 0);
    for (kind, payload) in attributes(data) {
        match kind {
            CTA_TUPLE_ORIG => original = parse_tuple(payload),
            CTA_TUPLE_REPLY => reply = parse_tuple(payload),
            CTA_STATUS => status = u32::from_be_bytes(payload.get(0..4)?.try_into().ok()?),
            _ => {}
        }
    }
    let ((protocol, original), (_, reply)) = (original?, reply?);
    Some(Entry {
        protocol,
        original,
        reply,
        status,
    })
}

fn parse_tuple(data: &[u8]) -> Option<(u8, Tuple)> {
    let (mut src, mut dst, mut protocol, mut sport, mut dport) = (None, None, None, 0, 0);
    for (kind, payload) in attributes(data) {
        match kind {
            CTA_TUPLE_IP => {
                for (kind, address) in attributes(payload) {
                    let parsed = match address.len() {
                        4 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(address).ok()?)),
                        16 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(address).ok()?)),
                        _ => return None,
                    };
                    match kind {
                        CTA_IP_V4_SRC | CTA_IP_V6_SRC => src = Some(parsed),
                        CTA_IP_V4_DST | CTA_IP_V6_DST => dst = Some(parsed),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (kind, value) in attributes(payload) {
                    match kind {
                        CTA_PROTO_NUM => protocol = value.first().copied(),
                        CTA_PROTO_SRC_PORT => {
                            sport = u16::from_be_bytes(value.get(0..2)?.try_into().ok()?)
                        }
                        CTA_PROTO_DST_PORT => {
                            dport = u16::from_be_bytes(value.get(0..2)?.try_into().ok()?)
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some((
        protocol?,
        Tuple {
            src: SocketAddr::new(src?, sport),
            dst: SocketAddr::new(dst?, dport),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attribute(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(payload);
        out.resize(align(out.len()), 0);
        out
    }

    fn nested(kind: u16, children: &[Vec<u8>]) -> Vec<u8> {
        attribute(kind | 0x8000, &children.concat())
    }

    fn tuple(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        [
            nested(
                CTA_TUPLE_IP,
                &[
                    attribute(CTA_IP_V4_SRC, &src),
                    attribute(CTA_IP_V4_DST, &dst),
                ],
            ),
            nested(
                CTA_TUPLE_PROTO,
                &[
                    attribute(CTA_PROTO_NUM, &[6]),
                    attribute(CTA_PROTO_SRC_PORT, &sport.to_be_bytes()),
                    attribute(CTA_PROTO_DST_PORT, &dport.to_be_bytes()),
                ],
            ),
        ]
        .concat()
    }

    fn message(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&((NLMSG_HEADER + payload.len()) as u32).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&[0; 10]);
        out.extend_from_slice(payload);
        out
    }

    /// The payload of an IPv4 entry: a pod's flow to 203.0.113.10:80, source-NATed to
    /// the node's 10.224.0.4:40000.
    fn snat_entry() -> Vec<u8> {
        [
            vec![libc::AF_INET as u8, 0, 0, 0],
            attribute(
                CTA_TUPLE_ORIG | 0x8000,
                &tuple([10, 244, 0, 10], [203, 0, 113, 10], 41000, 80),
            ),
            attribute(
                CTA_TUPLE_REPLY | 0x8000,
                &tuple([203, 0, 113, 10], [10, 224, 0, 4], 80, 40000),
            ),
            attribute(CTA_STATUS, &0x19eu32.to_be_bytes()),
        ]
        .concat()
    }

    #[test]
    fn parses_a_snat_entry_and_the_end_of_the_dump() {
        let data = [message(0x100, &snat_entry()), message(NLMSG_DONE, &[0; 4])].concat();
        let mut seen = Vec::new();
        assert!(parse_messages(&data, &mut |e: &Entry| seen.push(*e)).unwrap());
        assert_eq!(
            seen,
            [Entry {
                protocol: 6,
                original: Tuple {
                    src: "10.244.0.10:41000".parse().unwrap(),
                    dst: "203.0.113.10:80".parse().unwrap(),
                },
                reply: Tuple {
                    src: "203.0.113.10:80".parse().unwrap(),
                    dst: "10.224.0.4:40000".parse().unwrap(),
                },
                status: 0x19e,
            }]
        );
    }

    #[test]
    fn malformed_input_is_skipped_or_an_error_never_a_panic() {
        let mut count = 0;
        let mut visit = |_: &Entry| count += 1;
        // An entry without a reply tuple is skipped.
        let half = [
            vec![0; 4],
            attribute(
                CTA_TUPLE_ORIG | 0x8000,
                &tuple([10, 0, 0, 1], [10, 0, 0, 2], 1, 2),
            ),
        ]
        .concat();
        assert!(!parse_messages(&message(0x100, &half), &mut visit).unwrap());
        // A length beyond the datagram is an error.
        let mut bad = message(0x100, &half);
        bad[0] = 0xff;
        assert!(parse_messages(&bad, &mut visit).is_err());
        // An error message carries the errno.
        let error = message(NLMSG_ERROR, &(-libc::EPERM).to_ne_bytes());
        assert_eq!(
            parse_messages(&error, &mut visit)
                .unwrap_err()
                .raw_os_error(),
            Some(libc::EPERM)
        );
        for len in 0..half.len() {
            let _ = parse_entry(&half[..len]);
        }
        assert_eq!(count, 0);
    }

    #[test]
    fn a_dump_request_asks_the_kernel_to_filter_by_status() {
        let request = dump_request(IPS_SRC_NAT);
        let message = messages(&request).next().unwrap().unwrap();
        assert_eq!(
            (message.kind, message.sequence, message.payload.len()),
            (0x101, 1, request.len() - NLMSG_HEADER)
        );
        assert_eq!(
            message.payload[..NFGENMSG],
            [libc::AF_UNSPEC as u8, 0, 0, 0]
        );
        let filter: Vec<(u16, Vec<u8>)> = attributes(&message.payload[NFGENMSG..])
            .map(|(kind, payload)| (kind, payload.to_vec()))
            .collect();
        assert_eq!(
            filter,
            [
                (CTA_STATUS, vec![0, 0, 0, 0x10]),
                (CTA_STATUS_MASK, vec![0, 0, 0, 0x10])
            ]
        );
        assert_eq!(
            u16::from_ne_bytes([request[6], request[7]]),
            NLM_F_REQUEST | NLM_F_DUMP
        );
    }

    #[test]
    fn a_get_request_carries_the_original_tuple() {
        let (src, dst) = (
            "10.244.0.10:41000".parse().unwrap(),
            "203.0.113.10:80".parse().unwrap(),
        );
        let request = get_request(7, 6, src, dst).unwrap();
        let message = messages(&request).next().unwrap().unwrap();
        assert_eq!(
            (message.kind, message.sequence, message.payload.len()),
            (0x101, 7, request.len() - NLMSG_HEADER)
        );
        assert_eq!(message.payload[..NFGENMSG], [libc::AF_INET as u8, 0, 0, 0]);
        let (kind, tuple) = attributes(&message.payload[NFGENMSG..]).next().unwrap();
        assert_eq!(kind, CTA_TUPLE_ORIG);
        assert_eq!(parse_tuple(tuple), Some((6, Tuple { src, dst })));

        let v6 = get_request(
            8,
            17,
            "[fd00::a]:5353".parse().unwrap(),
            "[2001:db8::1]:53".parse().unwrap(),
        )
        .unwrap();
        let message = messages(&v6).next().unwrap().unwrap();
        assert_eq!(message.payload[0], libc::AF_INET6 as u8);
        let (_, tuple) = attributes(&message.payload[NFGENMSG..]).next().unwrap();
        assert_eq!(
            parse_tuple(tuple).map(|(protocol, t)| (protocol, t.dst.to_string())),
            Some((17, "[2001:db8::1]:53".to_owned()))
        );
        assert!(get_request(9, 6, src, "[2001:db8::1]:53".parse().unwrap()).is_none());
    }

    #[test]
    fn the_answer_to_a_get_is_the_entry_or_its_absence() {
        let with_sequence = |mut message: Vec<u8>, sequence: u32| {
            message[8..12].copy_from_slice(&sequence.to_ne_bytes());
            message
        };
        let found = with_sequence(message(0x100, &snat_entry()), 5);
        let answer = parse_answer(&found, 5).unwrap().unwrap().unwrap();
        assert_eq!(answer.reply.dst, "10.224.0.4:40000".parse().unwrap());
        // A late answer to an earlier request is not this one's.
        assert_eq!(parse_answer(&found, 6).unwrap(), None);
        let missing = with_sequence(message(NLMSG_ERROR, &(-libc::ENOENT).to_ne_bytes()), 6);
        assert_eq!(parse_answer(&missing, 6).unwrap(), Some(None));
        let denied = with_sequence(message(NLMSG_ERROR, &(-libc::EPERM).to_ne_bytes()), 6);
        assert_eq!(
            parse_answer(&denied, 6).unwrap_err().raw_os_error(),
            Some(libc::EPERM)
        );
    }
}
