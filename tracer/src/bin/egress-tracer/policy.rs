//! `egress-tracer policy`: what the NetworkPolicies decide for one flow, and why.

use std::{
    io::{self, Write},
    net::SocketAddr,
};

use anyhow::Context;
use egress_tracer::{
    output::Format,
    policy::{self, Decision, Flow, Protocol},
};

use crate::{PolicyArgs, UsageError, cluster_source};

/// Prints the decision; `Ok(true)` when the flow is allowed.
pub async fn run(args: PolicyArgs) -> anyhow::Result<bool> {
    let (address, protocol) = parse_target(&args.to)?;
    // Every node's pods: the source and the destination may be anywhere.
    let (cluster, _source) =
        cluster_source::open(args.cluster_state.as_deref(), None, Some("policy")).await?;
    let src = cluster.find_pod(&args.pod)?;
    let decision = policy::decide(
        &cluster,
        &Flow {
            src,
            dst: address.ip(),
            port: address.port(),
            protocol,
        },
    );
    let mut out = io::stdout().lock();
    match args.output {
        Format::Json => {
            serde_json::to_writer(&mut out, &decision)?;
            writeln!(out)
        }
        Format::Table => write_text(&mut out, &args.pod, &args.to, &decision),
    }
    .context("cannot write to stdout")?;
    Ok(decision.allowed)
}

/// `IP:PORT[/PROTO]`, TCP by default; IPv6 as `[ADDR]:PORT`.
fn parse_target(text: &str) -> Result<(SocketAddr, Protocol), UsageError> {
    let (address, protocol) = match text.rsplit_once('/') {
        Some((address, protocol)) => (
            address,
            Protocol::parse(protocol).ok_or_else(|| {
                UsageError(format!(
                    "--to {text}: unknown protocol {protocol:?} (use TCP, UDP or SCTP)"
                ))
            })?,
        ),
        None => (text, Protocol::Tcp),
    };
    let address: SocketAddr = address.parse().map_err(|_| {
        UsageError(format!(
            "--to {text}: expected IP:PORT[/PROTO], e.g. 10.0.0.10:53/UDP or [2001:db8::1]:443"
        ))
    })?;
    Ok((address, protocol))
}

fn write_text(out: &mut impl Write, pod: &str, to: &str, decision: &Decision) -> io::Result<()> {
    let verdict = if decision.allowed {
        "ALLOWED"
    } else {
        "DENIED"
    };
    writeln!(out, "{verdict}  {pod} -> {to}")?;
    writeln!(out, "  {}", decision.explanation)?;
    let policies = |list: &[String]| {
        if list.is_empty() {
            "no policy selects the pod (not isolated)".to_owned()
        } else {
            list.join(", ")
        }
    };
    writeln!(out, "  egress:  {}", policies(&decision.egress.policies))?;
    match &decision.ingress {
        Some(ingress) => writeln!(out, "  ingress: {}", policies(&ingress.policies)),
        None => writeln!(
            out,
            "  ingress: the destination is not a pod subject to NetworkPolicy"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(
            parse_target("10.0.0.10:53/udp").unwrap(),
            ("10.0.0.10:53".parse().unwrap(), Protocol::Udp)
        );
        assert_eq!(
            parse_target("[2001:db8::1]:443").unwrap(),
            ("[2001:db8::1]:443".parse().unwrap(), Protocol::Tcp)
        );
        for bad in [
            "10.0.0.10",
            "10.0.0.10:53/icmp",
            "host:80",
            "10.0.0.10:99999",
            "",
        ] {
            assert!(parse_target(bad).is_err(), "{bad}");
        }
    }
}
