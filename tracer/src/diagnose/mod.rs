//! `diagnose`: the troubleshooting guide's checklist for one target, run from inside the
//! pod while the kernel programs watch, ending in one verdict.
//!
//! The checks that need the pod's view run in a probe process placed in the pod's cgroup
//! and network namespace ([`run_probe`], like `kubectl exec` places a process): DNS
//! through the pod's resolver configuration, DNS straight to an upstream server, TCP
//! connects to each address, the pod's proxy (from its environment) with the answer to
//! CONNECT, and an HTTP HEAD. The caller adds what it sees from the node (DNS from the
//! node, the NetworkPolicy decision) and the kernel's records of the probe's traffic;
//! [`conclude`] turns them into the verdict, preferring the kernel's evidence.

pub mod path;
pub mod probe;
pub mod target;

use std::{
    io::{self, Write},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use self::{
    probe::{Connect, Resolution},
    target::{Scheme, Target},
};
use crate::{
    dns::Resolver,
    policy::Decision,
    verdict::{Hop, Verdict},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Fail,
    Warn,
    Skip,
}

/// One line of the checklist.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// `dns-cluster`, `dns-upstream`, `dns-node`, `proxy`, `tcp-connect`, `http`,
    /// `tls`, `network-policy`.
    pub id: String,
    pub status: Status,
    pub detail: String,
    /// The `path` check's probes, one per TTL.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hops: Vec<path::Hop>,
}

impl Check {
    pub fn new(id: &str, status: Status, detail: impl Into<String>) -> Self {
        Self {
            id: id.to_owned(),
            status,
            detail: detail.into(),
            hops: Vec::new(),
        }
    }
}

/// What the probe is asked to do.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan {
    pub host: String,
    pub port: u16,
    pub scheme: Option<Scheme>,
    pub path: String,
    /// The pod's resolver configuration (its own resolv.conf).
    pub search: Vec<String>,
    pub ndots: Option<u8>,
    pub nameservers: Vec<IpAddr>,
    /// A server to ask directly, bypassing the cluster DNS.
    pub upstream_dns: Option<IpAddr>,
    pub dns_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    /// The pod's proxy settings (HTTP(S)_PROXY and NO_PROXY), nothing else of its
    /// environment.
    pub environment: Vec<(String, String)>,
}

impl Plan {
    pub fn new(
        target: &Target,
        resolver: &Resolver,
        dns_timeout: Duration,
        connect_timeout: Duration,
    ) -> Self {
        Self {
            host: target.host.clone(),
            port: target.port,
            scheme: target.scheme,
            path: target.path.clone(),
            search: resolver.search.clone(),
            ndots: resolver.ndots,
            nameservers: resolver.nameservers.clone(),
            upstream_dns: None,
            dns_timeout_ms: dns_timeout.as_millis() as u64,
            connect_timeout_ms: connect_timeout.as_millis() as u64,
            environment: Vec::new(),
        }
    }

    fn resolver(&self) -> Resolver {
        Resolver {
            search: self.search.clone(),
            ndots: self.ndots,
            nameservers: self.nameservers.clone(),
            timeout: Some(Duration::from_millis(self.dns_timeout_ms)),
        }
    }
}

/// What a check found, beyond its line.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Facts {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolution: Option<Resolution>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub connects: Vec<Connect>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    /// The TTL-limited probes of a failed connection's path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub path: Vec<path::Hop>,
}

/// One check as the probe reports it (a JSON line on its standard output).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeLine {
    pub check: Check,
    #[serde(default)]
    pub facts: Facts,
}

/// Runs the plan's checks, writing each as a JSON line as soon as it is done. Runs in
/// the pod's namespaces.
pub fn run_probe(plan: &Plan, out: &mut impl Write) -> io::Result<()> {
    let mut emit = |check: Check, facts: Facts| -> io::Result<()> {
        serde_json::to_writer(&mut *out, &ProbeLine { check, facts })?;
        writeln!(out)?;
        out.flush()
    };
    let dns_timeout = Duration::from_millis(plan.dns_timeout_ms);
    let connect_timeout = Duration::from_millis(plan.connect_timeout_ms);
    let resolver = plan.resolver();
    let addresses = match plan.host.parse::<IpAddr>() {
        Ok(ip) => {
            emit(
                Check::new("dns-cluster", Status::Skip, format!("{ip} is an address")),
                Facts::default(),
            )?;
            vec![ip]
        }
        Err(_) => {
            let Some(server) = plan.nameservers.first() else {
                emit(
                    Check::new(
                        "dns-cluster",
                        Status::Fail,
                        "the pod's resolv.conf has no nameserver",
                    ),
                    Facts::default(),
                )?;
                return Ok(());
            };
            // The direct question to the upstream server runs alongside, to stay within one
            // DNS timeout in all.
            let upstream = plan.upstream_dns.map(|upstream| {
                let name = plan.host.trim_end_matches('.').to_owned();
                std::thread::spawn(move || {
                    probe::resolve(SocketAddr::new(upstream, 53), &[name], dns_timeout)
                })
            });
            let names = probe::expansions(&plan.host, &resolver);
            let resolution = probe::resolve(SocketAddr::new(*server, 53), &names, dns_timeout)?;
            let status = if resolution.result == "resolved" {
                Status::Pass
            } else {
                Status::Fail
            };
            let detail = describe_resolution(&resolution, "the pod's resolver");
            let addresses = resolution.addresses.clone();
            emit(
                Check::new("dns-cluster", status, detail),
                Facts {
                    resolution: Some(resolution),
                    ..Facts::default()
                },
            )?;
            if let Some(upstream) = upstream {
                let direct = upstream
                    .join()
                    .map_err(|_| io::Error::other("the upstream DNS check failed"))??;
                let status = if direct.result == "resolved" {
                    Status::Pass
                } else {
                    Status::Fail
                };
                emit(
                    Check::new(
                        "dns-upstream",
                        status,
                        describe_resolution(&direct, "the upstream server, asked directly"),
                    ),
                    Facts {
                        resolution: Some(direct),
                        ..Facts::default()
                    },
                )?;
            }
            if addresses.is_empty() {
                return Ok(());
            }
            addresses
        }
    };
    let https = plan.scheme == Some(Scheme::Https);
    let proxy = plan
        .scheme
        .and_then(|_| probe::proxy_for(&plan.environment, https, &plan.host));
    if let Some(proxy) = proxy {
        return check_through_proxy(plan, &proxy, connect_timeout, &mut emit);
    }
    emit(
        Check::new(
            "proxy",
            Status::Skip,
            "no HTTP(S)_PROXY applies to this target in the pod's environment",
        ),
        Facts::default(),
    )?;
    let mut connects = Vec::new();
    let mut stream = None;
    // Every address gets a try, within one connect timeout in all.
    let deadline = std::time::Instant::now() + connect_timeout;
    for ip in addresses.iter().take(4) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break;
        }
        let (connect, established) = probe::connect(SocketAddr::new(*ip, plan.port), left);
        connects.push(connect);
        if established.is_some() {
            stream = established;
            break;
        }
    }
    let detail = connects
        .iter()
        .map(|c| format!("{} {} in {} ms", c.address, c.result, c.millis))
        .collect::<Vec<_>>()
        .join("; ");
    let status = if stream.is_some() {
        Status::Pass
    } else {
        Status::Fail
    };
    let reset = connects
        .iter()
        .find(|c| c.result == "refused")
        .map(|c| c.address);
    let failed = connects
        .iter()
        .find(|c| c.result != "established")
        .map(|c| c.address);
    emit(
        Check::new("tcp-connect", status, detail),
        Facts {
            connects,
            ..Facts::default()
        },
    )?;
    let Some(mut stream) = stream else {
        // Where on the path it stops: SYNs with TTL 1, 2, 3… to the first address that
        // failed, within one connect timeout (at most 3 s).
        if let Some(failed) = failed {
            match path::trace(failed, path::MAX_HOPS, connect_timeout) {
                Ok(hops) => {
                    let reached = hops
                        .last()
                        .is_some_and(|h| h.answer == path::Answer::SynAck);
                    emit(
                        Check::new(
                            "path",
                            if reached { Status::Pass } else { Status::Fail },
                            format!(
                                "SYNs to {} with TTL 1 to {}:\n{}",
                                failed,
                                hops.len(),
                                path::describe(&hops)
                            ),
                        ),
                        Facts {
                            path: hops,
                            ..Facts::default()
                        },
                    )?;
                }
                // No socket for a probe (the pod's limits): the other checks stand.
                Err(e) => emit(
                    Check::new("path", Status::Skip, format!("cannot probe the path: {e}")),
                    Facts::default(),
                )?,
            }
        }
        // A reset: a connection to another port of the same address shows how far away
        // the endpoint itself is (the kernel records the TTL of its answer), so a reset
        // forged on the path can be told from the endpoint's own.
        if let Some(reset) = reset {
            let reference = [443, 80]
                .into_iter()
                .find(|port| *port != plan.port)
                .map(|port| SocketAddr::new(reset.ip(), port));
            if let Some(address) = reference {
                let (connect, _) =
                    probe::connect(address, connect_timeout.min(Duration::from_secs(1)));
                emit(
                    Check::new(
                        "path-length",
                        Status::Skip,
                        format!(
                            "reference connection to {address}: {} (its answer's TTL gives the endpoint's distance)",
                            connect.result
                        ),
                    ),
                    Facts {
                        connects: vec![connect],
                        ..Facts::default()
                    },
                )?;
            }
        }
        return Ok(());
    };
    match plan.scheme {
        Some(Scheme::Http) => {
            let request = probe::head_request(&plan.host, &plan.path);
            match probe::http_status(&mut stream, &request, connect_timeout) {
                Ok(status) => emit(
                    Check::new(
                        "http",
                        if status < 400 {
                            Status::Pass
                        } else {
                            Status::Fail
                        },
                        format!("HEAD {} answered {status}", plan.path),
                    ),
                    Facts {
                        http_status: Some(status),
                        ..Facts::default()
                    },
                ),
                Err(e) => emit(
                    Check::new("http", Status::Fail, format!("no HTTP answer: {e}")),
                    Facts::default(),
                ),
            }
        }
        Some(Scheme::Https) => match probe::tls_handshake(&mut stream, &plan.host, connect_timeout)
        {
            Ok(version) => emit(
                Check::new(
                    "tls",
                    Status::Pass,
                    format!("TLS handshake with {} completed ({version})", plan.host),
                ),
                Facts::default(),
            ),
            Err(why) => emit(
                Check::new(
                    "tls",
                    Status::Fail,
                    format!("TLS handshake with {} failed: {why}", plan.host),
                ),
                Facts::default(),
            ),
        },
        None => Ok(()),
    }
}

fn check_through_proxy(
    plan: &Plan,
    proxy: &str,
    timeout: Duration,
    emit: &mut impl FnMut(Check, Facts) -> io::Result<()>,
) -> io::Result<()> {
    // What is shown of the proxy: never its credentials.
    let shown = probe::without_userinfo(proxy);
    let Some((host, port)) = probe::proxy_address(proxy) else {
        return emit(
            Check::new(
                "proxy",
                Status::Fail,
                format!("cannot read the proxy address {shown:?}"),
            ),
            Facts::default(),
        );
    };
    let address = match host.parse::<IpAddr>() {
        Ok(ip) => Some(ip),
        Err(_) => {
            let names = probe::expansions(&host, &plan.resolver());
            plan.nameservers
                .first()
                .and_then(|server| {
                    probe::resolve(SocketAddr::new(*server, 53), &names, timeout).ok()
                })
                .and_then(|r| r.addresses.first().copied())
        }
    };
    let Some(address) = address else {
        return emit(
            Check::new(
                "proxy",
                Status::Fail,
                format!("the proxy {host} does not resolve"),
            ),
            Facts::default(),
        );
    };
    let (connect, stream) = probe::connect(SocketAddr::new(address, port), timeout);
    let facts = Facts {
        proxy: Some(shown.clone()),
        connects: vec![connect.clone()],
        ..Facts::default()
    };
    let Some(mut stream) = stream else {
        return emit(
            Check::new(
                "proxy",
                Status::Fail,
                format!(
                    "the proxy {shown}: {} ({})",
                    connect.result, connect.address
                ),
            ),
            facts,
        );
    };
    let request = probe::connect_request(&plan.host, plan.port);
    match probe::http_status(&mut stream, &request, timeout) {
        Ok(status) => emit(
            Check::new(
                "proxy",
                if status == 200 {
                    Status::Pass
                } else {
                    Status::Fail
                },
                format!(
                    "the pod's proxy {shown} answered {status} to CONNECT {}:{}",
                    plan.host, plan.port
                ),
            ),
            Facts {
                http_status: Some(status),
                ..facts
            },
        ),
        Err(e) => emit(
            Check::new(
                "proxy",
                Status::Fail,
                format!("the proxy {shown} did not answer CONNECT: {e}"),
            ),
            facts,
        ),
    }
}

fn describe_resolution(resolution: &Resolution, asked: &str) -> String {
    let result = match resolution.result.as_str() {
        "resolved" => format!(
            "resolved to {}",
            resolution
                .addresses
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => other.to_owned(),
    };
    format!(
        "{asked} ({}): {result} ({} name(s) tried)",
        resolution.server,
        resolution.names.len()
    )
}

/// What the node and the kernel saw while the probe ran.
pub struct Observed<'a> {
    pub probe: &'a [ProbeLine],
    /// The kernel's verdict on the probe's lookup of the target name, if there was one.
    pub lookup_verdict: Option<&'a Verdict>,
    /// The kernel's verdict on the probe's failed connection, if there was one.
    pub connect_verdict: Option<&'a Verdict>,
    /// The sender of the ICMP error that ended that connection, if one did.
    pub connect_icmp_sender: Option<IpAddr>,
    /// Checks made from the node (DNS from the node, the NetworkPolicy decision).
    pub node_checks: &'a [Check],
    /// What the NetworkPolicies decide for DNS from the pod to its nameserver.
    pub dns_policy: Option<&'a Decision>,
}

/// The verdict: the first stage that failed (DNS, proxy, connection, HTTP), with the
/// kernel's evidence when it has some.
pub fn conclude(target: &Target, observed: &Observed<'_>) -> Verdict {
    let line = |id: &str| observed.probe.iter().find(|l| l.check.id == id);
    let node_evidence: Vec<String> = observed
        .node_checks
        .iter()
        .chain(observed.probe.iter().map(|l| &l.check))
        // One line each (the path's hops joined).
        .map(|c| {
            let detail: Vec<&str> = c.detail.lines().map(str::trim).collect();
            format!("{} {}: {}", c.id, status_word(c.status), detail.join("; "))
        })
        .collect();
    let with_checks = |mut verdict: Verdict| {
        verdict.evidence.extend(node_evidence.iter().cloned());
        verdict
    };
    if let Some(dns) = line("dns-cluster").filter(|l| l.check.status == Status::Fail) {
        let timed_out = dns
            .facts
            .resolution
            .as_ref()
            .is_some_and(|r| r.result == "timeout");
        if let Some(decision) = observed.dns_policy.filter(|d| timed_out && !d.allowed) {
            let mut verdict = Verdict::for_check(
                Hop::NetworkPolicy,
                "denied",
                format!(
                    "NetworkPolicy {} denies the pod's DNS: {} does not resolve",
                    decision.denied_by.join(", "),
                    target.host
                ),
            );
            verdict.symptom = Some("dns-timeout".to_owned());
            verdict.policy = Some(decision.denied_by.join(","));
            verdict
                .evidence
                .push(format!("NetworkPolicy: {}", decision.explanation));
            verdict.next_steps.push(
                "allow egress to the cluster DNS Service's pods on UDP and TCP 53".to_owned(),
            );
            return with_checks(verdict);
        }
        if let Some(verdict) = observed.lookup_verdict.filter(|v| v.hop != Hop::None) {
            return with_checks(verdict.clone());
        }
        let reason = dns
            .facts
            .resolution
            .as_ref()
            .map_or_else(|| "no-nameserver".to_owned(), |r| r.result.clone());
        return with_checks(Verdict::for_check(
            Hop::Dns,
            reason,
            format!("{} does not resolve in the pod", target.host),
        ));
    }
    if let Some(proxy) = line("proxy").filter(|l| l.check.status == Status::Fail) {
        let reason = proxy
            .facts
            .http_status
            .map_or_else(|| "http-502".to_owned(), |status| format!("http-{status}"));
        let mut verdict = Verdict::for_check(
            Hop::Proxy,
            reason,
            format!("the pod's proxy refused to reach {}", target.input),
        );
        verdict.next_steps.push(
            "check the proxy's (or Azure Firewall application rules') allow list for this host"
                .to_owned(),
        );
        return with_checks(verdict);
    }
    if let Some(connect) = line("tcp-connect").filter(|l| l.check.status == Status::Fail) {
        let hops = line("path").map_or(&[][..], |l| l.facts.path.as_slice());
        let failed = connect
            .facts
            .connects
            .iter()
            .find(|c| c.result != "established")
            .map(|c| c.address.ip());
        let reading = failed.map(|ip| path::read(hops, ip));
        if let Some((hop, device)) = reading.and_then(|r| r.forged_reset) {
            return with_checks(forged_reset(target, hop, device));
        }
        let mut verdict = match observed.connect_verdict.filter(|v| v.hop != Hop::None) {
            Some(verdict) => verdict.clone(),
            None => {
                let mut verdict = Verdict::for_check(
                    Hop::Upstream,
                    "silent-drop",
                    format!("no connection to {}", target.input),
                );
                verdict.likely = true;
                verdict
            }
        };
        if verdict.reason == "silent-drop"
            && let Some((hop, address)) = reading.and_then(|r| r.last_answer)
        {
            verdict.summary = format!(
                "{}; passed {address} at hop {hop}; nothing answered beyond it",
                verdict.summary
            );
        }
        if let Some(hop) = observed
            .connect_icmp_sender
            .and_then(|sender| path::hop_of(hops, sender))
        {
            verdict.summary = format!("{} (hop {hop} of the path)", verdict.summary);
        }
        return with_checks(verdict);
    }
    if line("tls").is_some_and(|l| l.check.status == Status::Fail) {
        let mut verdict = Verdict::for_check(
            Hop::Endpoint,
            "tls-failed",
            format!("{} did not complete a TLS handshake", target.input),
        );
        verdict.next_steps.push(format!(
            "`openssl s_client -connect {}:{} -servername {}` from the node: is it TLS on that port, with a certificate the client trusts?",
            target.host, target.port, target.host
        ));
        return with_checks(verdict);
    }
    if let Some(http) = line("http").filter(|l| l.check.status == Status::Fail) {
        let reason = http
            .facts
            .http_status
            .map_or_else(|| "closed".to_owned(), |status| format!("http-{status}"));
        return with_checks(Verdict::for_check(
            Hop::Endpoint,
            reason,
            format!("{} answered with an error", target.input),
        ));
    }
    with_checks(Verdict::for_check(
        Hop::None,
        "ok",
        format!("{} is reachable from the pod", target.input),
    ))
}

/// A reset that came back from closer than the target: the device at `hop` sent it.
fn forged_reset(target: &Target, hop: u8, device: Option<IpAddr>) -> Verdict {
    let who = device.map_or_else(
        || format!("the device at hop {hop}"),
        |ip| format!("{ip} (hop {hop})"),
    );
    let mut verdict = Verdict::for_check(
        Hop::Upstream,
        "reset",
        format!(
            "{who} reset the connection to {}, before the endpoint",
            target.input
        ),
    );
    verdict.evidence.push(format!(
        "the path probe's reset came back over {} router(s) while the SYN it answered needed more hops: it was sent on the path, not by the endpoint",
        hop - 1
    ));
    verdict.next_steps.push(format!(
        "the firewall or proxy at {} rejects this port: Azure Firewall / NVA rules, NSG flow logs",
        device.map_or_else(|| format!("hop {hop}"), |ip| ip.to_string())
    ));
    verdict
}

fn status_word(status: Status) -> &'static str {
    match status {
        Status::Pass => "passed",
        Status::Fail => "failed",
        Status::Warn => "warned",
        Status::Skip => "skipped",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(id: &str, status: Status, facts: Facts) -> ProbeLine {
        ProbeLine {
            check: Check::new(id, status, format!("{id} detail")),
            facts,
        }
    }

    fn conclude_for(target: &str, lines: &[ProbeLine], connect: Option<&Verdict>) -> Verdict {
        let target = Target::parse(target).unwrap();
        conclude(
            &target,
            &Observed {
                probe: lines,
                lookup_verdict: None,
                connect_verdict: connect,
                connect_icmp_sender: None,
                node_checks: &[],
                dns_policy: None,
            },
        )
    }

    fn status_facts(status: u16) -> Facts {
        Facts {
            http_status: Some(status),
            ..Facts::default()
        }
    }

    #[test]
    fn the_first_failed_stage_decides() {
        let resolution = Resolution {
            result: "servfail".into(),
            addresses: vec![],
            names: vec!["a.test".into()],
            server: "10.0.0.10:53".parse().unwrap(),
        };
        let dns = line(
            "dns-cluster",
            Status::Fail,
            Facts {
                resolution: Some(resolution),
                ..Facts::default()
            },
        );
        let verdict = conclude_for("http://a.test/", &[dns], None);
        assert_eq!(
            (verdict.hop, verdict.reason.as_ref()),
            (Hop::Dns, "servfail")
        );
        // Every check is part of the evidence.
        assert_eq!(verdict.evidence, ["dns-cluster failed: dns-cluster detail"]);

        let proxy = line("proxy", Status::Fail, status_facts(407));
        let verdict = conclude_for("https://a.test/", &[proxy], None);
        assert_eq!(
            (verdict.hop, verdict.reason.as_ref()),
            (Hop::Proxy, "http-407")
        );

        let tls = [
            line("tcp-connect", Status::Pass, Facts::default()),
            line("tls", Status::Fail, Facts::default()),
        ];
        let verdict = conclude_for("https://a.test/", &tls, None);
        assert_eq!(
            (verdict.hop, verdict.reason.as_ref()),
            (Hop::Endpoint, "tls-failed")
        );

        let http = [
            line("tcp-connect", Status::Pass, Facts::default()),
            line("http", Status::Fail, status_facts(503)),
        ];
        let verdict = conclude_for("http://a.test/", &http, None);
        assert_eq!(
            (verdict.hop, verdict.reason.as_ref()),
            (Hop::Endpoint, "http-503")
        );

        let ok = [
            line("tcp-connect", Status::Pass, Facts::default()),
            line("http", Status::Pass, status_facts(200)),
        ];
        let verdict = conclude_for("http://a.test/", &ok, None);
        assert_eq!((verdict.hop, verdict.reason.as_ref()), (Hop::None, "ok"));
    }

    #[test]
    fn a_failed_connection_takes_the_kernels_verdict() {
        let failed = [line("tcp-connect", Status::Fail, Facts::default())];
        let kernel = Verdict::for_check(Hop::NodeFirewall, "netfilter-drop", "dropped".into());
        let verdict = conclude_for("203.0.113.10:443", &failed, Some(&kernel));
        assert_eq!(
            (verdict.hop, verdict.reason.as_ref(), verdict.likely),
            (Hop::NodeFirewall, "netfilter-drop", false)
        );
        // Without the kernel's record, only likely.
        let verdict = conclude_for("203.0.113.10:443", &failed, None);
        assert_eq!(
            (verdict.hop, verdict.reason.as_ref(), verdict.likely),
            (Hop::Upstream, "silent-drop", true)
        );
    }

    fn path_hop(ttl: u8, answer: path::Answer, from: Option<&str>, reply_ttl: u8) -> path::Hop {
        path::Hop {
            ttl,
            answer,
            from: from.map(|f| f.parse().unwrap()),
            icmp_type: None,
            icmp_code: None,
            reply_ttl: Some(reply_ttl),
            src: None,
        }
    }

    fn failed_connect(result: &str) -> ProbeLine {
        line(
            "tcp-connect",
            Status::Fail,
            Facts {
                connects: vec![Connect {
                    address: "203.0.113.99:443".parse().unwrap(),
                    result: result.into(),
                    error: None,
                    millis: 2,
                }],
                ..Facts::default()
            },
        )
    }

    fn path_line(hops: Vec<path::Hop>) -> ProbeLine {
        line(
            "path",
            Status::Fail,
            Facts {
                path: hops,
                ..Facts::default()
            },
        )
    }

    #[test]
    fn the_path_probe_places_a_forged_reset_and_a_silent_drop() {
        use path::Answer::{Nothing, Reset, TimeExceeded};
        let router = |ttl, from| path_hop(ttl, TimeExceeded, Some(from), 250);
        let forged = [
            failed_connect("refused"),
            path_line(vec![
                router(1, "10.244.0.1"),
                router(2, "10.224.0.1"),
                router(3, "198.51.100.2"),
                path_hop(4, Reset, Some("203.0.113.99"), 62),
            ]),
        ];
        // The kernel alone (no earlier connection) could only call it the endpoint's.
        let kernel = Verdict::for_check(Hop::Endpoint, "refused", "refused".into());
        let verdict = conclude_for("203.0.113.99:443", &forged, Some(&kernel));
        assert_eq!(
            (verdict.hop, verdict.reason.as_ref()),
            (Hop::Upstream, "reset")
        );
        assert!(
            verdict
                .summary
                .starts_with("198.51.100.2 (hop 3) reset the connection")
        );

        let silent = [
            failed_connect("timeout"),
            path_line(vec![
                router(1, "10.244.0.1"),
                router(2, "10.224.0.1"),
                path_hop(3, Nothing, None, 0),
            ]),
        ];
        let kernel = Verdict::for_check(Hop::Upstream, "silent-drop", "nothing answered".into());
        let verdict = conclude_for("203.0.113.99:443", &silent, Some(&kernel));
        assert_eq!(
            (verdict.hop, verdict.reason.as_ref()),
            (Hop::Upstream, "silent-drop")
        );
        assert_eq!(
            verdict.summary,
            "nothing answered; passed 10.224.0.1 at hop 2; nothing answered beyond it"
        );
    }
}
