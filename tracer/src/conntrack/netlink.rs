//! A read-only dump of the conntrack table over ctnetlink (`NETLINK_NETFILTER`, the
//! interface `conntrack -L` uses), for what eBPF cannot see: every entry of the node,
//! including those of untraced pods and host processes that share its SNAT ports.
//!
//! Only the dump request is implemented (no events, no changes to the table). Messages
//! are parsed defensively: a malformed entry is skipped, never trusted.

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

/// Dumps the conntrack table of the caller's network namespace, handing each entry to
/// `visit` (entries are not collected, so memory does not grow with the table).
pub fn dump(mut visit: impl FnMut(&Entry)) -> io::Result<()> {
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
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut request = Vec::with_capacity(NLMSG_HEADER + NFGENMSG);
    let len = (NLMSG_HEADER + NFGENMSG) as u32;
    request.extend_from_slice(&len.to_ne_bytes());
    request.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET).to_ne_bytes());
    request.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    request.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    request.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
    // nfgenmsg: AF_UNSPEC (every family), version 0, resource id 0.
    request.extend_from_slice(&[0, 0, 0, 0]);
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
    let mut buffer = vec![0u8; 64 * 1024];
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
        if received < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        if received == 0 {
            return Ok(());
        }
        if parse_messages(&buffer[..received as usize], &mut visit)? {
            return Ok(());
        }
    }
}

/// Parses one datagram of netlink messages; `Ok(true)` once the dump is done.
fn parse_messages(mut data: &[u8], visit: &mut impl FnMut(&Entry)) -> io::Result<bool> {
    while data.len() >= NLMSG_HEADER {
        let len = u32::from_ne_bytes(data[0..4].try_into().unwrap_or_default()) as usize;
        let kind = u16::from_ne_bytes([data[4], data[5]]);
        if len < NLMSG_HEADER || len > data.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "truncated netlink message",
            ));
        }
        let payload = &data[NLMSG_HEADER..len];
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = payload
                    .get(0..4)
                    .map(|b| i32::from_ne_bytes(b.try_into().unwrap_or_default()))
                    .unwrap_or(0);
                if errno == 0 {
                    return Ok(true);
                }
                return Err(io::Error::from_raw_os_error(-errno));
            }
            _ => {
                if let Some(entry) = payload.get(NFGENMSG..).and_then(parse_entry) {
                    visit(&entry);
                }
            }
        }
        data = &data[align(len).min(data.len())..];
    }
    Ok(false)
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

    #[test]
    fn parses_a_snat_entry_and_the_end_of_the_dump() {
        let entry = [
            vec![0, 0, 0, 0],
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
        .concat();
        let data = [message(0x100, &entry), message(NLMSG_DONE, &[0; 4])].concat();
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
}
