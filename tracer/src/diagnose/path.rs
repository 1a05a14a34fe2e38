//! Where on the path a TCP connection stops: SYNs to the target's port sent from inside
//! the pod with TTL 1, 2, 3, … (the way `traceroute -T` and `mtr --tcp` probe), each on a
//! socket of its own. A router that a SYN's TTL runs out at answers with ICMP time
//! exceeded, which the socket's error queue gives with the router's address and the
//! answer's TTL (`IP_RECVERR`, `IP_RECVTTL`); the target answers with a SYN-ACK or a
//! reset, whose TTL the kernel programs record.
//!
//! What it cannot show: hops that do not decrement the TTL (Azure's virtual network,
//! its load balancer and NAT gateway forward without a hop of their own) and devices
//! that drop expired packets without an answer; and ICMP rate limits may silence a router
//! that answers other probes.

use std::{
    io,
    mem::{size_of, zeroed},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

/// Most hops probed.
pub const MAX_HOPS: u8 = 16;
/// Longest the probe waits for answers, whatever the connect timeout.
pub const MAX_WAIT: Duration = Duration::from_secs(3);

/// What answered a SYN sent with a limited TTL.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Answer {
    /// ICMP time exceeded: a router this many hops away.
    TimeExceeded,
    /// Another ICMP error (unreachable, administratively prohibited…).
    IcmpError,
    /// A TCP reset.
    Reset,
    /// A SYN-ACK: the target itself.
    SynAck,
    /// Nothing within the wait.
    Nothing,
}

/// One TTL's probe and its answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hop {
    /// The TTL (hop limit) the SYN left with: the hop number.
    pub ttl: u8,
    pub answer: Answer,
    /// Who answered: the ICMP error's sender, or the target for a reset or SYN-ACK.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmp_type: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmp_code: Option<u8>,
    /// The TTL the answer arrived with: for ICMP from the socket, for a reset or SYN-ACK
    /// from the kernel programs' record of the probe's connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply_ttl: Option<u8>,
    /// The probe socket's source address (joins the kernel's record of its connection).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub src: Option<SocketAddr>,
}

impl Hop {
    /// Whether the target (or something speaking for it) answered this probe.
    fn reached(&self, target: IpAddr) -> bool {
        matches!(self.answer, Answer::Reset | Answer::SynAck)
            || (self.answer == Answer::IcmpError && self.from == Some(target))
    }

    /// Hops the answer travelled back: senders start from 64, 128 or 255.
    pub fn hops_back(&self) -> Option<u8> {
        let ttl = self.reply_ttl?;
        let initial = [64u8, 128, 255].into_iter().find(|i| *i >= ttl)?;
        Some(initial - ttl)
    }
}

/// Probes the path to `target` with TTLs 1 to `max_hops` at once, and waits up to `wait`
/// for the answers; the hops up to the first that reached the target.
pub fn trace(target: SocketAddr, max_hops: u8, wait: Duration) -> io::Result<Vec<Hop>> {
    let deadline = Instant::now() + wait.min(MAX_WAIT);
    let mut probes = Vec::new();
    for ttl in 1..=max_hops.min(MAX_HOPS) {
        let mut hop = Hop {
            ttl,
            answer: Answer::Nothing,
            from: None,
            icmp_type: None,
            icmp_code: None,
            reply_ttl: None,
            src: None,
        };
        match send_syn(target, ttl)? {
            Sent::Waiting(socket, src) => {
                hop.src = src;
                probes.push((hop, Some(socket)));
            }
            // The pod's own stack refused at once (no route in the pod): that is the
            // answer, for this TTL and every other.
            Sent::Refused => {
                hop.answer = Answer::IcmpError;
                probes.push((hop, None));
            }
        }
    }
    while probes.iter().any(|(_, socket)| socket.is_some()) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let mut polled: Vec<libc::pollfd> = probes
            .iter()
            .filter_map(|(_, socket)| socket.as_ref())
            .map(|socket| libc::pollfd {
                fd: socket.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            })
            .collect();
        // SAFETY: `polled` is a valid array of pollfds for the call's duration.
        let ready = unsafe {
            libc::poll(
                polled.as_mut_ptr(),
                polled.len() as libc::nfds_t,
                left.as_millis().clamp(1, i32::MAX as u128) as i32,
            )
        };
        if ready < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        for (hop, socket) in probes.iter_mut() {
            let Some(fd) = socket.as_ref().map(AsRawFd::as_raw_fd) else {
                continue;
            };
            let answered = polled.iter().any(|p| {
                p.fd == fd && p.revents & (libc::POLLOUT | libc::POLLERR | libc::POLLHUP) != 0
            });
            if answered {
                read_answer(fd, target, hop);
                *socket = None;
            }
        }
    }
    let mut hops: Vec<Hop> = probes.into_iter().map(|(hop, _)| hop).collect();
    // Probes beyond the target, or beyond an error that stops them, show nothing more.
    let end = hops
        .iter()
        .position(|hop| hop.reached(target.ip()) || hop.answer == Answer::IcmpError);
    if let Some(end) = end {
        hops.truncate(end + 1);
    }
    Ok(hops)
}

/// A probe's SYN: on its way (the socket and its source), or refused by the pod's own
/// stack before it left.
enum Sent {
    Waiting(OwnedFd, Option<SocketAddr>),
    Refused,
}

/// Opens a non-blocking TCP socket whose packets leave with `ttl` and whose ICMP errors
/// are queued with their sender, and starts connecting to `target`.
fn send_syn(target: SocketAddr, ttl: u8) -> io::Result<Sent> {
    let family = if target.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket creation; the descriptor is owned at once.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let options: [(i32, i32, i32); 3] = if target.is_ipv4() {
        [
            (libc::IPPROTO_IP, libc::IP_TTL, i32::from(ttl)),
            (libc::IPPROTO_IP, libc::IP_RECVERR, 1),
            (libc::IPPROTO_IP, libc::IP_RECVTTL, 1),
        ]
    } else {
        [
            (libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS, i32::from(ttl)),
            (libc::IPPROTO_IPV6, libc::IPV6_RECVERR, 1),
            (libc::IPPROTO_IPV6, libc::IPV6_RECVHOPLIMIT, 1),
        ]
    };
    for (level, name, value) in options {
        // SAFETY: an int option of the right size.
        let set = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&value as *const i32).cast(),
                size_of::<i32>() as libc::socklen_t,
            )
        };
        if set != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let (address, length) = sockaddr_of(target);
    // SAFETY: `address` holds a sockaddr of `length` bytes.
    let connected = unsafe {
        libc::connect(
            fd,
            (&address as *const libc::sockaddr_storage).cast(),
            length,
        )
    };
    if connected != 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINPROGRESS) {
        return Ok(Sent::Refused);
    }
    Ok(Sent::Waiting(socket, local_address(fd)))
}

/// Reads how the probe on `fd` was answered into `hop`.
fn read_answer(fd: i32, target: SocketAddr, hop: &mut Hop) {
    if let Some(icmp) = read_error_queue(fd) {
        let time_exceeded = if target.is_ipv4() {
            icmp.icmp_type == 11
        } else {
            icmp.icmp_type == 3
        };
        hop.answer = if time_exceeded {
            Answer::TimeExceeded
        } else {
            Answer::IcmpError
        };
        hop.from = icmp.sender;
        hop.icmp_type = Some(icmp.icmp_type);
        hop.icmp_code = Some(icmp.icmp_code);
        hop.reply_ttl = icmp.ttl;
        return;
    }
    let mut error: i32 = 0;
    let mut length = size_of::<i32>() as libc::socklen_t;
    // SAFETY: an int option of the right size.
    let read = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut error as *mut i32).cast(),
            &mut length,
        )
    };
    hop.answer = match (read, error) {
        (0, 0) => Answer::SynAck,
        (0, libc::ECONNREFUSED) => Answer::Reset,
        (0, _) => Answer::IcmpError,
        _ => Answer::Nothing,
    };
    if matches!(hop.answer, Answer::SynAck | Answer::Reset) {
        hop.from = Some(target.ip());
    }
}

/// An ICMP error from a socket's error queue.
struct QueuedIcmp {
    icmp_type: u8,
    icmp_code: u8,
    sender: Option<IpAddr>,
    ttl: Option<u8>,
}

/// The first ICMP error queued on `fd`, with its sender and the TTL it arrived with.
fn read_error_queue(fd: i32) -> Option<QueuedIcmp> {
    let mut name: libc::sockaddr_storage = unsafe { zeroed() };
    let mut data = [0u8; 64];
    let mut control = [0u64; 64];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: a zeroed msghdr is valid; its pointers are set below.
    let mut message: libc::msghdr = unsafe { zeroed() };
    message.msg_name = (&mut name as *mut libc::sockaddr_storage).cast();
    message.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    message.msg_iov = &mut iov;
    message.msg_iovlen = 1;
    message.msg_control = control.as_mut_ptr().cast();
    message.msg_controllen = size_of::<[u64; 64]>();
    // SAFETY: `message` points at buffers that outlive the call.
    let read = unsafe { libc::recvmsg(fd, &mut message, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
    if read < 0 {
        return None;
    }
    let mut icmp = None;
    let mut ttl = None;
    // SAFETY: the CMSG macros walk the control buffer the kernel filled, within
    // `msg_controllen`; each payload is read unaligned at its reported length.
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(&message);
        while !header.is_null() {
            let (level, kind) = ((*header).cmsg_level, (*header).cmsg_type);
            let payload = libc::CMSG_DATA(header);
            let is_error = (level == libc::IPPROTO_IP && kind == libc::IP_RECVERR)
                || (level == libc::IPPROTO_IPV6 && kind == libc::IPV6_RECVERR);
            if is_error {
                let error: libc::sock_extended_err =
                    payload.cast::<libc::sock_extended_err>().read_unaligned();
                let from_icmp = error.ee_origin == libc::SO_EE_ORIGIN_ICMP
                    || error.ee_origin == libc::SO_EE_ORIGIN_ICMP6;
                if from_icmp {
                    // The sender follows the error (SO_EE_OFFENDER).
                    let offender = payload.add(size_of::<libc::sock_extended_err>());
                    icmp = Some(QueuedIcmp {
                        icmp_type: error.ee_type,
                        icmp_code: error.ee_code,
                        sender: address_at(offender),
                        ttl: None,
                    });
                }
            } else if (level == libc::IPPROTO_IP && kind == libc::IP_TTL)
                || (level == libc::IPPROTO_IPV6 && kind == libc::IPV6_HOPLIMIT)
            {
                let value: i32 = payload.cast::<i32>().read_unaligned();
                ttl = u8::try_from(value).ok();
            }
            header = libc::CMSG_NXTHDR(&message, header);
        }
    }
    icmp.map(|icmp| QueuedIcmp { ttl, ..icmp })
}

/// The address of the `sockaddr` at `at`.
///
/// # Safety
/// `at` points at a `sockaddr_in` or `sockaddr_in6` the kernel wrote.
unsafe fn address_at(at: *const u8) -> Option<IpAddr> {
    // SAFETY: per the contract; unaligned reads of the kernel's struct.
    unsafe {
        match i32::from(at.cast::<libc::sa_family_t>().read_unaligned()) {
            libc::AF_INET => {
                let v4: libc::sockaddr_in = at.cast::<libc::sockaddr_in>().read_unaligned();
                Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr))))
            }
            libc::AF_INET6 => {
                let v6: libc::sockaddr_in6 = at.cast::<libc::sockaddr_in6>().read_unaligned();
                Some(IpAddr::V6(Ipv6Addr::from(v6.sin6_addr.s6_addr)))
            }
            _ => None,
        }
    }
}

fn sockaddr_of(address: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is valid.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let length = match address {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*v4.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably aligned.
            unsafe {
                (&mut storage as *mut libc::sockaddr_storage)
                    .cast::<libc::sockaddr_in>()
                    .write(sin)
            };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe {
                (&mut storage as *mut libc::sockaddr_storage)
                    .cast::<libc::sockaddr_in6>()
                    .write(sin6)
            };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, length as libc::socklen_t)
}

/// The local address the kernel bound `fd` to when it connected.
fn local_address(fd: i32) -> Option<SocketAddr> {
    // SAFETY: an all-zero sockaddr_storage is valid.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let mut length = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `storage` can hold any address; `length` says how much.
    let got = unsafe {
        libc::getsockname(
            fd,
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut length,
        )
    };
    if got != 0 {
        return None;
    }
    let port_at = |port: u16| u16::from_be(port);
    // SAFETY: the kernel wrote a sockaddr of the socket's family.
    unsafe {
        let at = (&storage as *const libc::sockaddr_storage).cast::<u8>();
        let ip = address_at(at)?;
        let port = match ip {
            IpAddr::V4(_) => port_at(at.cast::<libc::sockaddr_in>().read_unaligned().sin_port),
            IpAddr::V6(_) => port_at(at.cast::<libc::sockaddr_in6>().read_unaligned().sin6_port),
        };
        Some(SocketAddr::new(ip, port))
    }
}

/// What the path shows, for the verdicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reading {
    /// The last hop that answered before the target (or before the probes went silent).
    pub last_answer: Option<(u8, IpAddr)>,
    /// The hop at which the target answered, if it did.
    pub target_at: Option<u8>,
    /// A reset that came from closer than the hop it answered: the hop of the device that
    /// forged it and that hop's address, when a probe showed it.
    pub forged_reset: Option<(u8, Option<IpAddr>)>,
}

/// Reads the hops of one probe of `target`.
pub fn read(hops: &[Hop], target: IpAddr) -> Reading {
    let target_hop = hops.iter().find(|hop| hop.reached(target));
    let last_answer = hops
        .iter()
        .filter(|hop| hop.answer == Answer::TimeExceeded)
        .filter_map(|hop| Some((hop.ttl, hop.from?)))
        .next_back();
    // The answer to a probe that needed `ttl` hops comes back over `ttl - 1` routers; one
    // that travelled fewer was sent by a device before the target.
    let forged_reset = target_hop
        .filter(|hop| hop.answer == Answer::Reset)
        .and_then(|hop| {
            let back = hop.hops_back()?;
            (back + 1 < hop.ttl).then(|| {
                let at = back + 1;
                let address = hops
                    .iter()
                    .find(|h| h.ttl == at && h.answer == Answer::TimeExceeded)
                    .and_then(|h| h.from);
                (at, address)
            })
        });
    Reading {
        last_answer,
        target_at: target_hop.map(|hop| hop.ttl),
        forged_reset,
    }
}

/// The hop number of `address` on the path, if a probe's answer came from it.
pub fn hop_of(hops: &[Hop], address: IpAddr) -> Option<u8> {
    hops.iter()
        .find(|hop| hop.from == Some(address))
        .map(|hop| hop.ttl)
}

/// The hops as `mtr` prints them, one line each; the silent ones after the last answer
/// share a line.
pub fn describe(hops: &[Hop]) -> String {
    let answered = hops
        .iter()
        .rposition(|hop| hop.answer != Answer::Nothing)
        .map_or(0, |at| at + 1);
    let silent = match &hops[answered..] {
        [] => None,
        [only] => Some(format!("{:>2}  {:<39} no answer", only.ttl, "*")),
        [first, .., last] => Some(format!(
            "{:>2}-{}  {:<36} no answer",
            first.ttl, last.ttl, "*"
        )),
    };
    hops[..answered]
        .iter()
        .map(|hop| {
            let from = hop.from.map_or_else(|| "*".to_owned(), |ip| ip.to_string());
            let answer = match hop.answer {
                Answer::TimeExceeded => "time exceeded".to_owned(),
                Answer::IcmpError => match (hop.icmp_type, hop.icmp_code) {
                    (Some(t), Some(c)) => format!("ICMP error type {t} code {c}"),
                    _ => "ICMP error".to_owned(),
                },
                Answer::Reset => "reset".to_owned(),
                Answer::SynAck => "SYN-ACK".to_owned(),
                Answer::Nothing => "no answer".to_owned(),
            };
            let ttl = hop
                .reply_ttl
                .map_or_else(String::new, |ttl| format!(", arrived with TTL {ttl}"));
            format!("{:>2}  {from:<39} {answer}{ttl}", hop.ttl)
        })
        .chain(silent)
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hop(ttl: u8, answer: Answer, from: Option<&str>, reply_ttl: Option<u8>) -> Hop {
        Hop {
            ttl,
            answer,
            from: from.map(|f| f.parse().unwrap()),
            icmp_type: None,
            icmp_code: None,
            reply_ttl,
            src: None,
        }
    }

    const TARGET: &str = "203.0.113.99";

    fn target() -> IpAddr {
        TARGET.parse().unwrap()
    }

    #[test]
    fn a_reset_from_closer_than_the_target_was_forged_on_the_path() {
        // node, router 1, router 2 answer time exceeded; the reset to TTL 4 came back
        // over two routers only: router 2 (hop 3) sent it.
        let hops = [
            hop(1, Answer::TimeExceeded, Some("10.244.0.1"), Some(64)),
            hop(2, Answer::TimeExceeded, Some("10.224.0.1"), Some(254)),
            hop(3, Answer::TimeExceeded, Some("198.51.100.2"), Some(253)),
            hop(4, Answer::Reset, Some(TARGET), Some(62)),
        ];
        let reading = read(&hops, target());
        assert_eq!(reading.target_at, Some(4));
        assert_eq!(
            reading.forged_reset,
            Some((3, Some("198.51.100.2".parse().unwrap())))
        );
        // The target's own reset comes back over three routers.
        let mut genuine = hops.clone();
        genuine[3].reply_ttl = Some(61);
        assert_eq!(read(&genuine, target()).forged_reset, None);
        // Without the reset's TTL nothing is claimed.
        genuine[3].reply_ttl = None;
        assert_eq!(read(&genuine, target()).forged_reset, None);
    }

    #[test]
    fn a_silent_path_names_the_last_hop_that_answered() {
        let hops = [
            hop(1, Answer::TimeExceeded, Some("10.244.0.1"), Some(64)),
            hop(2, Answer::TimeExceeded, Some("10.224.0.1"), Some(254)),
            hop(3, Answer::Nothing, None, None),
            hop(4, Answer::Nothing, None, None),
        ];
        let reading = read(&hops, target());
        assert_eq!(
            reading.last_answer,
            Some((2, "10.224.0.1".parse().unwrap()))
        );
        assert_eq!((reading.target_at, reading.forged_reset), (None, None));
        assert_eq!(hop_of(&hops, "10.224.0.1".parse().unwrap()), Some(2));
        assert_eq!(
            describe(&hops[1..3]),
            format!(
                " 2  {:<39} time exceeded, arrived with TTL 254\n 3  {:<39} no answer",
                "10.224.0.1", "*"
            )
        );
        assert_eq!(
            describe(&hops).lines().last(),
            Some(format!(" 3-4  {:<36} no answer", "*").as_str())
        );
    }

    #[test]
    fn hops_back_count_down_from_the_usual_initial_ttls() {
        let back = |ttl| hop(1, Answer::Reset, None, Some(ttl)).hops_back();
        assert_eq!(
            (back(64), back(61), back(250), back(120)),
            (Some(0), Some(3), Some(5), Some(8))
        );
        assert_eq!(hop(1, Answer::Reset, None, None).hops_back(), None);
    }
}
