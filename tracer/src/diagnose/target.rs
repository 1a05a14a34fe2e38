//! What `diagnose` is asked to reach: a URL, `host:port` or `ip:port`.

use std::{fmt, net::IpAddr};

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    Http,
    Https,
}

/// A parsed target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// As the user wrote it.
    pub input: String,
    pub host: String,
    pub port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheme: Option<Scheme>,
    /// The path of a URL (`/` by default).
    #[serde(skip)]
    pub path: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "cannot read target {input:?}: {why} (use a URL such as https://example.test/, or HOST:PORT, or IP:PORT)"
)]
pub struct TargetError {
    input: String,
    why: String,
}

impl Target {
    pub fn parse(input: &str) -> Result<Self, TargetError> {
        let error = |why: &str| TargetError {
            input: input.chars().take(MAX_TARGET_LEN).collect(),
            why: why.to_owned(),
        };
        if input.len() > MAX_TARGET_LEN {
            return Err(error(&format!("longer than {MAX_TARGET_LEN} bytes")));
        }
        let (scheme, rest) = match input.split_once("://") {
            Some(("http", rest)) => (Some(Scheme::Http), rest),
            Some(("https", rest)) => (Some(Scheme::Https), rest),
            Some((other, _)) => return Err(error(&format!("unsupported scheme {other:?}"))),
            None => (None, input),
        };
        let (authority, path) = match rest.find('/') {
            Some(at) => (&rest[..at], &rest[at..]),
            None => (rest, "/"),
        };
        let authority = authority
            .rsplit_once('@')
            .map_or(authority, |(_, host)| host);
        let (host, port) = split_host_port(authority).map_err(|why| error(&why))?;
        let port = match (port, scheme) {
            (Some(port), _) => port,
            (None, Some(Scheme::Http)) => 80,
            (None, Some(Scheme::Https)) => 443,
            (None, None) => return Err(error("no port")),
        };
        if host.is_empty() {
            return Err(error("no host"));
        }
        if host.parse::<IpAddr>().is_err()
            && !host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
        {
            return Err(error("the host is neither an IP address nor a DNS name"));
        }
        // The path goes into the request line the probe sends: only what RFC 3986 allows
        // there, and no control character, raw or percent-encoded (no request splitting).
        let path = path.split_once('#').map_or(path, |(path, _)| path);
        check_path(path).map_err(|why| error(&why))?;
        Ok(Self {
            input: input.to_owned(),
            host,
            port,
            scheme,
            path: path.to_owned(),
        })
    }

    /// The address, when the host is one.
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.input)
    }
}

/// Longest target accepted.
pub const MAX_TARGET_LEN: usize = 2048;

/// Whether `path` is an RFC 3986 path and query without control characters.
fn check_path(path: &str) -> Result<(), String> {
    let bytes = path.as_bytes();
    let mut at = 0;
    while at < bytes.len() {
        let byte = bytes[at];
        if byte == b'%' {
            let decoded = bytes
                .get(at + 1..at + 3)
                .and_then(|hex| std::str::from_utf8(hex).ok())
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                .ok_or_else(|| format!("a bad percent-escape at byte {at} of the path"))?;
            if decoded.is_ascii_control() {
                return Err(format!(
                    "the path has an encoded control character (%{decoded:02X})"
                ));
            }
            at += 3;
            continue;
        }
        let allowed = byte.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?".contains(&byte);
        if !allowed {
            return Err(if byte.is_ascii_control() {
                "the path has a control character".to_owned()
            } else {
                format!(
                    "the path has {:?}, which a URL must percent-encode",
                    char::from(byte)
                )
            });
        }
        at += 1;
    }
    Ok(())
}

/// `host`, `host:port`, `[v6]`, `[v6]:port`.
fn split_host_port(authority: &str) -> Result<(String, Option<u16>), String> {
    let port = |text: &str| {
        text.parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("bad port {text:?}"))
    };
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or("unclosed [")?;
        return match after.strip_prefix(':') {
            Some(p) => Ok((host.to_owned(), Some(port(p)?))),
            None if after.is_empty() => Ok((host.to_owned(), None)),
            None => Err(format!("unexpected {after:?}")),
        };
    }
    match authority.rsplit_once(':') {
        Some((host, _)) if host.contains(':') => {
            Err("IPv6 addresses go in brackets: [2001:db8::1]:443".into())
        }
        Some((host, p)) => Ok((host.to_owned(), Some(port(p)?))),
        None => Ok((authority.to_owned(), None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_host_ports_and_addresses() {
        let t = Target::parse("https://api.example.test/health?x=1").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.scheme),
            ("api.example.test", 443, Some(Scheme::Https))
        );
        assert_eq!(t.path, "/health?x=1");
        let t = Target::parse("http://203.0.113.10:8080").unwrap();
        assert_eq!(
            (t.ip(), t.port, t.path.as_str()),
            (Some("203.0.113.10".parse().unwrap()), 8080, "/")
        );
        let t = Target::parse("db.internal:5432").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.scheme),
            ("db.internal", 5432, None)
        );
        let t = Target::parse("[2001:db8::10]:443").unwrap();
        assert_eq!(t.ip(), Some("2001:db8::10".parse().unwrap()));
        let t = Target::parse("https://user@[2001:db8::10]/").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("2001:db8::10", 443));
        let t = Target::parse("http://a.test/p%20q?x=%2F#frag").unwrap();
        assert_eq!(t.path, "/p%20q?x=%2F");
        let long = format!("http://a.test/{}", "x".repeat(MAX_TARGET_LEN));
        assert!(
            Target::parse(&long)
                .unwrap_err()
                .to_string()
                .contains("longer than 2048 bytes")
        );
    }

    #[test]
    fn unparsable_targets_say_why() {
        for (input, why) in [
            ("example.test", "no port"),
            ("ftp://example.test/", "unsupported scheme"),
            ("example.test:0", "bad port"),
            ("example.test:99999", "bad port"),
            ("2001:db8::1:443", "brackets"),
            ("http://exa mple/", "neither an IP address"),
            ("http://:80/", "no host"),
            ("", "no port"),
            (
                "http://a.test/x%0d%0aHost: b",
                "encoded control character (%0D)",
            ),
            ("http://a.test/x\r\nHost: b", "control character"),
            ("http://a.test/a b", "which a URL must percent-encode"),
            ("http://a.test/%zz", "bad percent-escape"),
            ("http://a.test/%2", "bad percent-escape"),
        ] {
            let error = Target::parse(input).unwrap_err().to_string();
            assert!(error.contains(why), "{input}: {error}");
        }
    }
}
