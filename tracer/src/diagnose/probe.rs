//! The network checks `diagnose` runs from inside the pod (its network namespace and
//! cgroup, so the kernel programs see them as the pod's traffic): DNS through the pod's
//! resolver configuration and directly against a server, TCP connects, an HTTP HEAD, and
//! a CONNECT through the pod's proxy.
//!
//! All blocking, with explicit timeouts; every answer is parsed defensively.

use std::{
    io::{self, Write},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, Query, ResponseCode},
    rr::{Name, RData, RecordType},
};
use serde::{Deserialize, Serialize};

use crate::dns::Resolver;

/// The result of resolving one name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolution {
    /// `resolved`, `nxdomain`, `servfail`, `refused`, `no-answer` or `timeout`.
    pub result: String,
    pub addresses: Vec<IpAddr>,
    /// Every name asked, in the resolver's order.
    pub names: Vec<String>,
    pub server: SocketAddr,
}

/// The names a resolver tries for `host`: with fewer dots than `ndots`, the search
/// domains first, then the name itself; otherwise the name first.
pub fn expansions(host: &str, resolver: &Resolver) -> Vec<String> {
    if let Some(absolute) = host.strip_suffix('.') {
        return vec![absolute.to_owned()];
    }
    let searched = resolver
        .search
        .iter()
        .map(|domain| format!("{host}.{domain}"));
    let dots = host.matches('.').count();
    if dots >= usize::from(resolver.ndots.unwrap_or(1)) {
        std::iter::once(host.to_owned()).chain(searched).collect()
    } else {
        searched.chain(std::iter::once(host.to_owned())).collect()
    }
}

/// Asks `server` for the A records of every name at once (a resolver asks them one
/// after the other; at once, the whole lookup takes one timeout at most) and decides as
/// the resolver would: the first name in order that has addresses wins.
pub fn resolve(server: SocketAddr, names: &[String], timeout: Duration) -> io::Result<Resolution> {
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .map_err(io::Error::other)?;
    let socket = UdpSocket::bind(bind)?;
    socket.connect(server)?;
    let base_id = (Instant::now().elapsed().subsec_nanos() as u16) ^ std::process::id() as u16;
    for (index, name) in names.iter().enumerate() {
        socket.send(&query(base_id.wrapping_add(index as u16), name)?)?;
    }
    let mut answers: Vec<Option<(ResponseCode, Vec<IpAddr>)>> = vec![None; names.len()];
    let deadline = Instant::now() + timeout;
    let mut buffer = [0u8; 4096];
    while answers.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        socket.set_read_timeout(Some(left))?;
        let Ok(len) = socket.recv(&mut buffer) else {
            break;
        };
        let Ok(message) = Message::from_vec(&buffer[..len]) else {
            continue;
        };
        let index = usize::from(message.id().wrapping_sub(base_id));
        if index >= names.len() || message.message_type() != MessageType::Response {
            continue;
        }
        let addresses = message
            .answers()
            .iter()
            .filter_map(|record| match record.data() {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                _ => None,
            })
            .collect();
        answers[index] = Some((message.response_code(), addresses));
    }
    let result = decide(&answers);
    let addresses = answers
        .iter()
        .flatten()
        .find(|(_, addresses)| !addresses.is_empty())
        .map(|(_, addresses)| addresses.clone())
        .unwrap_or_default();
    Ok(Resolution {
        result: result.to_owned(),
        addresses,
        names: names.to_vec(),
        server,
    })
}

/// The resolver's verdict over the answers to each name, in order.
fn decide(answers: &[Option<(ResponseCode, Vec<IpAddr>)>]) -> &'static str {
    for answer in answers {
        match answer {
            Some((_, addresses)) if !addresses.is_empty() => return "resolved",
            // NXDOMAIN and empty answers move on to the next name.
            Some((ResponseCode::NXDomain | ResponseCode::NoError, _)) => {}
            Some((ResponseCode::ServFail, _)) => return "servfail",
            Some((ResponseCode::Refused, _)) => return "refused",
            Some(_) => return "servfail",
            None => return "timeout",
        }
    }
    match answers.last() {
        Some(Some((ResponseCode::NoError, _))) => "no-answer",
        _ => "nxdomain",
    }
}

fn query(id: u16, name: &str) -> io::Result<Vec<u8>> {
    let name = Name::from_ascii(format!("{name}.")).map_err(io::Error::other)?;
    let mut message = Message::new();
    message
        .set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(name, RecordType::A));
    message.to_vec().map_err(io::Error::other)
}

/// How a TCP connect ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connect {
    pub address: SocketAddr,
    /// `established`, `refused`, `timeout` or `unreachable`.
    pub result: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub millis: u64,
}

pub fn connect(address: SocketAddr, timeout: Duration) -> (Connect, Option<TcpStream>) {
    let start = Instant::now();
    let outcome = TcpStream::connect_timeout(&address, timeout);
    let millis = start.elapsed().as_millis() as u64;
    match outcome {
        Ok(stream) => (
            Connect {
                address,
                result: "established".to_owned(),
                error: None,
                millis,
            },
            Some(stream),
        ),
        Err(error) => {
            let result = match error.kind() {
                io::ErrorKind::ConnectionRefused => "refused",
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => "timeout",
                _ => "unreachable",
            };
            (
                Connect {
                    address,
                    result: result.to_owned(),
                    error: Some(error.to_string()),
                    millis,
                },
                None,
            )
        }
    }
}

/// Sends `request` on `stream` and reads the status code of the answer.
pub fn http_status(stream: &mut TcpStream, request: &str, timeout: Duration) -> io::Result<u16> {
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(request.as_bytes())?;
    let line = read_line_within(stream, Instant::now() + timeout)?;
    line.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .filter(|_| line.starts_with("HTTP/"))
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("not an HTTP answer: {line:?}"),
            )
        })
}

/// Longest status line read from a server (or a proxy) before giving up on it.
const MAX_STATUS_LINE: usize = 8 * 1024;

/// The first line `stream` sends, read by `deadline` and within [`MAX_STATUS_LINE`]
/// bytes: a server that drips bytes holds the probe no longer than the deadline.
fn read_line_within(stream: &mut TcpStream, deadline: Instant) -> io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 512];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no complete answer in time",
            ));
        }
        stream.set_read_timeout(Some(left))?;
        let read = io::Read::read(stream, &mut byte)?;
        if read == 0 {
            break;
        }
        line.extend_from_slice(&byte[..read]);
        if let Some(end) = line.iter().position(|b| *b == b'\n') {
            line.truncate(end + 1);
            break;
        }
        if line.len() > MAX_STATUS_LINE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("no line end in the first {MAX_STATUS_LINE} bytes of the answer"),
            ));
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// Completes a TLS handshake with `host` over `stream`, verifying its certificate
/// against the node's CA certificates; the negotiated version, or why it failed.
pub fn tls_handshake(
    stream: &mut TcpStream,
    host: &str,
    timeout: Duration,
) -> Result<String, String> {
    use std::sync::Arc;

    use rustls::{ClientConfig, ClientConnection, RootCertStore, pki_types::ServerName};

    let mut roots = RootCertStore::empty();
    for certificate in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(certificate);
    }
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
    let name = ServerName::try_from(host.to_owned())
        .map_err(|e| format!("bad server name {host}: {e}"))?;
    let mut connection =
        ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    while connection.is_handshaking() {
        connection.complete_io(stream).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                format!("no TLS answer within {timeout:?}")
            }
            _ => e.to_string(),
        })?;
    }
    Ok(connection
        .protocol_version()
        .map_or_else(|| "TLS".to_owned(), |v| format!("{v:?}")))
}

pub fn head_request(host: &str, path: &str) -> String {
    format!(
        "HEAD {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: egress-tracer-diagnose\r\nConnection: close\r\n\r\n"
    )
}

pub fn connect_request(host: &str, port: u16) -> String {
    format!(
        "CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: egress-tracer-diagnose\r\n\r\n"
    )
}

/// The proxy the pod's environment sets for a URL scheme, unless `NO_PROXY` exempts the
/// host.
pub fn proxy_for(environment: &[(String, String)], https: bool, host: &str) -> Option<String> {
    let get = |name: &str| {
        environment
            .iter()
            .find(|(key, _)| key == name || key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.clone())
            .filter(|value| !value.is_empty())
    };
    let proxy = if https {
        get("HTTPS_PROXY")
    } else {
        get("HTTP_PROXY")
    }?;
    let exempt = get("NO_PROXY").is_some_and(|list| {
        list.split(',').map(str::trim).any(|entry| {
            let entry = entry.trim_start_matches('.');
            !entry.is_empty()
                && (entry == "*" || host == entry || host.ends_with(&format!(".{entry}")))
        })
    });
    (!exempt).then_some(proxy)
}

/// `http://proxy.example:3128/` → (`proxy.example`, 3128).
pub fn proxy_address(proxy: &str) -> Option<(String, u16)> {
    let rest = proxy.split_once("://").map_or(proxy, |(_, rest)| rest);
    let authority = rest.split('/').next()?;
    let authority = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    match authority.rsplit_once(':') {
        Some((host, port)) => Some((host.trim_matches(['[', ']']).to_owned(), port.parse().ok()?)),
        None => Some((authority.to_owned(), 80)),
    }
}

/// The proxy settings (`HTTP_PROXY`, `HTTPS_PROXY`, `NO_PROXY`, in any case) among the
/// `KEY=value` pairs of a `/proc/PID/environ` (NUL-separated): nothing else of a pod's
/// environment, which holds its secrets, leaves the agent.
pub fn proxy_environment(bytes: &[u8]) -> Vec<(String, String)> {
    bytes
        .split(|b| *b == 0)
        .filter_map(|entry| {
            let text = String::from_utf8_lossy(entry);
            let (key, value) = text.split_once('=')?;
            ["HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"]
                .iter()
                .any(|name| key.eq_ignore_ascii_case(name))
                .then(|| (key.to_owned(), value.to_owned()))
        })
        .collect()
}

/// A proxy URL without its credentials (`http://user:secret@proxy:3128` is shown as
/// `http://proxy:3128`).
pub fn without_userinfo(proxy: &str) -> String {
    let (scheme, rest) = proxy
        .split_once("://")
        .map_or(("", proxy), |(scheme, rest)| (scheme, rest));
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    if scheme.is_empty() {
        format!("{host}{path}")
    } else {
        format!("{scheme}://{host}{path}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_proxy_settings_leave_the_environment_and_never_their_credentials() {
        let environ = b"PATH=/bin\0https_proxy=http://u:secret@proxy.test:3128\0DB_PASSWORD=x\0NO_PROXY=.svc\0";
        assert_eq!(
            proxy_environment(environ),
            [
                (
                    "https_proxy".to_owned(),
                    "http://u:secret@proxy.test:3128".to_owned()
                ),
                ("NO_PROXY".to_owned(), ".svc".to_owned()),
            ]
        );
        assert_eq!(
            without_userinfo("http://u:secret@proxy.test:3128/"),
            "http://proxy.test:3128/"
        );
        assert_eq!(without_userinfo("u:p@proxy.test:3128"), "proxy.test:3128");
        assert_eq!(
            without_userinfo("http://proxy.test:3128"),
            "http://proxy.test:3128"
        );
    }

    #[test]
    fn expansions_follow_ndots() {
        let resolver = Resolver {
            search: vec!["shop.svc.cluster.local".into(), "cluster.local".into()],
            ndots: Some(5),
            ..Resolver::default()
        };
        assert_eq!(
            expansions("api.example.test", &resolver),
            [
                "api.example.test.shop.svc.cluster.local",
                "api.example.test.cluster.local",
                "api.example.test"
            ]
        );
        assert_eq!(
            expansions("api.example.test.", &resolver),
            ["api.example.test"]
        );
        let few = Resolver {
            ndots: Some(1),
            ..resolver
        };
        assert_eq!(expansions("a.b", &few)[0], "a.b");
    }

    #[test]
    fn the_first_name_with_addresses_decides() {
        let a = |ip: &str| vec![ip.parse::<IpAddr>().unwrap()];
        let nx = Some((ResponseCode::NXDomain, vec![]));
        assert_eq!(
            decide(&[nx.clone(), Some((ResponseCode::NoError, a("192.0.2.1")))]),
            "resolved"
        );
        assert_eq!(decide(&[nx.clone(), nx.clone()]), "nxdomain");
        assert_eq!(
            decide(&[nx.clone(), Some((ResponseCode::NoError, vec![]))]),
            "no-answer"
        );
        assert_eq!(
            decide(&[nx.clone(), Some((ResponseCode::ServFail, vec![]))]),
            "servfail"
        );
        assert_eq!(decide(&[None, nx]), "timeout");
    }

    #[test]
    fn proxies_from_the_environment() {
        let env = proxy_environment(
            b"PATH=/bin\0HTTPS_PROXY=http://proxy.corp:3128\0no_proxy=.svc,internal.test\0",
        );
        assert_eq!(
            proxy_for(&env, true, "api.example.test").as_deref(),
            Some("http://proxy.corp:3128")
        );
        assert_eq!(proxy_for(&env, true, "db.internal.test"), None);
        assert_eq!(proxy_for(&env, true, "kube-dns.svc"), None);
        assert_eq!(proxy_for(&env, false, "api.example.test"), None);
        assert_eq!(
            proxy_address("http://proxy.corp:3128"),
            Some(("proxy.corp".into(), 3128))
        );
        assert_eq!(
            proxy_address("http://user:pw@10.0.0.5:8080/"),
            Some(("10.0.0.5".into(), 8080))
        );
        assert_eq!(proxy_address("proxy"), Some(("proxy".into(), 80)));
    }
}
