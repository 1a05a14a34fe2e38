//! Which hop stopped an attempt, and why: the verdicts of `docs/hops.md`.
//!
//! A verdict names a hop and a reason (exact strings, [`Hop`] and the `reason` field), the
//! facts it rests on (`evidence`, each saying where it was seen) and what to run next. When
//! the kernel only saw part of the path, `likely` is set and the evidence says what is
//! missing.
//!
//! Conntrack's own drops are told apart by where the kernel freed the packet and the
//! state of the packet's conntrack entry (both from the drop event):
//!
//! - a netfilter *hook function* (not a rule set) returned `NF_DROP`, so `nf_hook_slow`
//!   freed the packet: with an entry whose source NAT was set up but which never entered
//!   the table, confirming the entry failed (`insert-failed`: a clashing tuple, as in the
//!   parallel A/AAAA race or two flows NATed to one port); with no entry at all, conntrack
//!   could not make one (`table-full`); with an unconfirmed entry before source NAT, NAT
//!   setup failed (`nat-failed`), unless legacy iptables rules exist, whose drops look the
//!   same;
//! - a rule set (`nft_do_chain`) dropped a packet that has no entry: conntrack judged it
//!   invalid and a `ctstate INVALID` rule dropped it (`invalid`), when the node's invalid
//!   counter rose; otherwise it is a firewall rule (`node-firewall`).
//!
//! The node's conntrack counters (`/proc/net/stat/nf_conntrack`) corroborate: without a
//! matching rise the verdict is only `likely`.

use std::{
    borrow::Cow,
    fmt,
    net::{IpAddr, SocketAddr},
};

use serde::{Deserialize, Serialize};

use crate::{
    capture::{NetnsOwner, PacketConntrack},
    conntrack::ConntrackStats,
    dns::{Lookup, LookupResult},
    flow::{Attempt, Drops, IcmpError, Outcome, errno_name},
    policy::Decision,
};

/// The hops of the egress path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Hop {
    Dns,
    NetworkPolicy,
    NodeFirewall,
    Conntrack,
    Routing,
    Upstream,
    Proxy,
    Endpoint,
    None,
}

impl Hop {
    /// Every hop, in path order.
    pub const ALL: [Hop; 9] = [
        Hop::Dns,
        Hop::NetworkPolicy,
        Hop::NodeFirewall,
        Hop::Conntrack,
        Hop::Routing,
        Hop::Upstream,
        Hop::Proxy,
        Hop::Endpoint,
        Hop::None,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Hop::Dns => "dns",
            Hop::NetworkPolicy => "network-policy",
            Hop::NodeFirewall => "node-firewall",
            Hop::Conntrack => "conntrack",
            Hop::Routing => "routing",
            Hop::Upstream => "upstream",
            Hop::Proxy => "proxy",
            Hop::Endpoint => "endpoint",
            Hop::None => "none",
        }
    }
}

/// Why an attempt failed (or that it did not).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub hop: Hop,
    /// One of the hop's reasons in `hops.md` (`nxdomain`, `insert-failed`, `ok`…).
    pub reason: Cow<'static, str>,
    /// What the application saw, when that differs from the hop (`dns-timeout`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub symptom: Option<String>,
    /// The hop is inferred from partial evidence.
    pub likely: bool,
    pub summary: String,
    /// Observed facts, each with where it was seen.
    pub evidence: Vec<String>,
    /// The NetworkPolicy that decides it (`ns/name`), for `network-policy`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    pub next_steps: Vec<String>,
}

impl Verdict {
    fn new(hop: Hop, reason: impl Into<Cow<'static, str>>, summary: String) -> Self {
        Self {
            hop,
            reason: reason.into(),
            symptom: None,
            likely: false,
            summary,
            evidence: Vec::new(),
            policy: None,
            next_steps: Vec::new(),
        }
    }

    /// A verdict built from outside this module: `diagnose`'s own checks (and tests).
    pub fn for_check(hop: Hop, reason: impl Into<Cow<'static, str>>, summary: String) -> Self {
        Self::new(hop, reason, summary)
    }

    fn ok(summary: String) -> Self {
        Self::new(Hop::None, "ok", summary)
    }

    fn likely(mut self) -> Self {
        self.likely = true;
        self
    }

    fn evidence(mut self, fact: impl Into<String>) -> Self {
        self.evidence.push(fact.into());
        self
    }

    fn next(mut self, step: impl Into<String>) -> Self {
        self.next_steps.push(step.into());
        self
    }
}

/// What the verdicts need to know about the node, beyond the attempt itself.
#[derive(Clone, Debug, Default)]
pub struct NodeFacts {
    /// Legacy iptables (x_tables) tables exist in the node's namespace: their rule drops
    /// are freed by `nf_hook_slow`, like the drops of conntrack and NAT.
    pub legacy_iptables: bool,
    /// Growth of the node's conntrack counters while tracing.
    pub conntrack_growth: Option<ConntrackStats>,
    /// The node's own addresses (of the tracer's network namespace).
    pub addresses: Vec<IpAddr>,
}

impl NodeFacts {
    /// The facts of the node the tracer runs on (its network namespace).
    pub fn of_this_node() -> Self {
        Self {
            legacy_iptables: Self::legacy_iptables_present(),
            conntrack_growth: None,
            addresses: crate::node::local_addresses(),
        }
    }

    /// Whether the legacy iptables tables exist in the caller's network namespace.
    fn legacy_iptables_present() -> bool {
        ["/proc/net/ip_tables_names", "/proc/net/ip6_tables_names"]
            .iter()
            .any(|path| std::fs::read_to_string(path).is_ok_and(|names| !names.trim().is_empty()))
    }
}

/// The verdict of a finished attempt; `None` when its ending says nothing about the path
/// (still in progress, or aborted by the application before any retransmission).
/// `policy` is what the NetworkPolicies decide for it, when its pod is known.
pub fn of_attempt(
    attempt: &Attempt,
    node: &NodeFacts,
    policy: Option<&Decision>,
) -> Option<Verdict> {
    let verdict = of_path(attempt, node)?;
    Some(match policy {
        Some(decision) => with_policy(verdict, attempt, decision),
        None => verdict,
    })
}

/// A NetworkPolicy that denies the flow explains a netfilter drop on the node, or a
/// silent loss before the node's NAT (an eBPF CNI drops without a kernel drop reason).
fn with_policy(verdict: Verdict, attempt: &Attempt, decision: &Decision) -> Verdict {
    let dropped_by_rule = verdict.hop == Hop::NodeFirewall;
    let lost_before_nat = verdict.hop == Hop::Upstream
        && verdict.reason == "silent-drop"
        && attempt.nat.is_none_or(|nat| nat.src.is_none());
    if decision.allowed {
        return if dropped_by_rule {
            verdict.evidence(format!(
                "the NetworkPolicies allow this flow ({}): the rule is not a policy's",
                decision.explanation
            ))
        } else {
            verdict
        };
    }
    if !(dropped_by_rule || lost_before_nat) {
        return verdict.evidence(format!(
            "a NetworkPolicy denies this flow, but the evidence points elsewhere: {}",
            decision.explanation
        ));
    }
    let mut denied = Verdict::new(
        Hop::NetworkPolicy,
        "denied",
        format!(
            "NetworkPolicy {} denies the traffic to {}",
            decision.denied_by.join(", "),
            Target(attempt)
        ),
    )
    .evidence(format!("NetworkPolicy: {}", decision.explanation));
    denied.evidence.extend(verdict.evidence);
    denied.likely = !dropped_by_rule || !decision.certain;
    if !dropped_by_rule {
        denied = denied
            .evidence("no kernel drop was seen: the CNI may drop without a drop reason (eBPF)");
    }
    if !decision.certain {
        denied = denied.evidence(format!(
            "{} is no pod this node knows, and a selector rule of the policy might match it",
            attempt.dst.ip()
        ));
    }
    denied.policy = Some(decision.denied_by.join(","));
    denied
        .next(format!(
            "kubectl describe networkpolicy -n {} {}",
            namespace_of(&decision.denied_by),
            names_of(&decision.denied_by)
        ))
        .next("add an egress rule (or, for in-cluster destinations, an ingress rule at the destination) that allows this port and peer")
}

fn namespace_of(policies: &[String]) -> &str {
    policies
        .first()
        .and_then(|p| p.split_once('/'))
        .map_or("default", |(ns, _)| ns)
}

fn names_of(policies: &[String]) -> String {
    policies
        .iter()
        .map(|p| p.split_once('/').map_or(p.as_str(), |(_, name)| name))
        .collect::<Vec<_>>()
        .join(" ")
}

fn of_path(attempt: &Attempt, node: &NodeFacts) -> Option<Verdict> {
    let target = Target(attempt);
    if let Some(drops) = &attempt.drops {
        return Some(of_drop(drops, target, node));
    }
    if let Some(icmp) = &attempt.icmp
        && attempt.outcome.is_failure()
    {
        return Some(of_icmp(icmp, attempt, target, node));
    }
    match attempt.outcome {
        Outcome::Established => Some(Verdict::ok(target.after("connected to "))),
        Outcome::Sent => Some(Verdict::ok(target.after("sent to "))),
        Outcome::Refused => Some(of_reset(attempt, target)),
        Outcome::Timeout => Some(of_timeout(attempt, target)),
        Outcome::Unreachable | Outcome::Failed => Some(of_socket_error(attempt, target)),
        Outcome::Aborted | Outcome::InProgress => None,
    }
}

/// An attempt's `dst`, with the name DNS gave it: written straight into the verdict's
/// text (one allocation per verdict; this runs for every attempt).
#[derive(Clone, Copy)]
struct Target<'a>(&'a Attempt);

impl Target<'_> {
    /// `prefix` and the target, in a string allocated once (`format!` guesses its
    /// capacity from the literal parts, and grows it again for every attempt).
    fn after(self, prefix: &str) -> String {
        let name = self.0.dst_name.as_deref().map_or(0, str::len);
        // The longest address with port, and the parentheses around it after a name.
        let mut text = String::with_capacity(prefix.len() + name + 50);
        text.push_str(prefix);
        let _ = fmt::Write::write_fmt(&mut text, format_args!("{self}"));
        text
    }
}

impl fmt::Display for Target<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0.dst_name {
            Some(name) => {
                f.write_str(name)?;
                f.write_str(" (")?;
                write_socket_addr(f, self.0.dst)?;
                f.write_str(")")
            }
            None => write_socket_addr(f, self.0.dst),
        }
    }
}

/// `addr` as its `Display` writes it. An IPv4 address is spelled out here: `Display`
/// goes through the formatting machinery for each octet and the port, which made a
/// quarter of the userspace cost of a traced connection (callgrind).
fn write_socket_addr(f: &mut fmt::Formatter<'_>, addr: SocketAddr) -> fmt::Result {
    let SocketAddr::V4(v4) = addr else {
        return write!(f, "{addr}");
    };
    // "255.255.255.255:65535"
    let mut text = [0u8; 21];
    let mut len = 0;
    for (index, octet) in v4.ip().octets().into_iter().enumerate() {
        if index > 0 {
            text[len] = b'.';
            len += 1;
        }
        len += write_decimal(&mut text[len..], u16::from(octet));
    }
    text[len] = b':';
    len += 1;
    len += write_decimal(&mut text[len..], v4.port());
    f.write_str(std::str::from_utf8(&text[..len]).map_err(|_| fmt::Error)?)
}

/// Writes `value` in decimal at the start of `out` (which must have room); returns its
/// length.
fn write_decimal(out: &mut [u8], value: u16) -> usize {
    let len = match value {
        10_000.. => 5,
        1_000.. => 4,
        100.. => 3,
        10.. => 2,
        _ => 1,
    };
    let mut rest = value;
    for digit in out[..len].iter_mut().rev() {
        *digit = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    len
}

fn packet_kind(attempt_reply: bool) -> &'static str {
    if attempt_reply {
        "a reply packet"
    } else {
        "the attempt's packet"
    }
}

fn of_drop(drops: &Drops, target: Target<'_>, node: &NodeFacts) -> Verdict {
    let drop = &drops.first;
    let function = drop.location.split('+').next().unwrap_or_default();
    let seen = format!(
        "the kernel dropped {} at {} with reason {} (kfree_skb, {} packet(s) in all){}{}",
        packet_kind(drop.reply),
        drop.location,
        drop.reason,
        drops.count,
        match (drop.src, drop.dst) {
            (Some(src), Some(dst)) => format!(", packet {src} -> {dst}"),
            _ => String::new(),
        },
        match &drop.netns_owner {
            Some(NetnsOwner::Node) => ", in the node's network namespace".to_owned(),
            Some(NetnsOwner::Pod(pod)) => format!(", in the network namespace of pod {pod}"),
            None => String::new(),
        }
    );
    let growth = node.conntrack_growth.unwrap_or_default();
    let counted = |what: &str, rise: u64| {
        format!(
            "the node's conntrack {what} counter rose by {rise} while tracing (/proc/net/stat/nf_conntrack)"
        )
    };
    let hook_function = function == "nf_hook_slow";
    if drop.reason == "NETFILTER_DROP" && hook_function {
        match drop.conntrack {
            ct if ct.unconfirmed() && ct.source_nat_done() => {
                let verdict = Verdict::new(
                    Hop::Conntrack,
                    "insert-failed",
                    format!("the node's conntrack could not insert the entry of the flow to {target}"),
                )
                .evidence(seen)
                .evidence("its conntrack entry had NAT set up but was never confirmed into the table: another entry holds the same tuple");
                let verdict = if growth.insert_failed > 0 {
                    verdict.evidence(counted("insert_failed", growth.insert_failed))
                } else {
                    verdict.likely()
                };
                return verdict
                    .next("`conntrack -S` on the node: insert_failed counts these")
                    .next("two flows translated to the same source port (SNAT port reuse or exhaustion): reuse connections, or give the node more SNAT addresses/ports")
                    .next("for DNS over UDP (parallel A/AAAA on one socket): `options single-request-reopen` in the pod's dnsConfig, or NodeLocal DNSCache");
            }
            PacketConntrack::None => {
                let verdict = Verdict::new(
                    Hop::Conntrack,
                    "table-full",
                    format!("the node's conntrack could not track the flow to {target}"),
                )
                .evidence(seen)
                .evidence("the packet had no conntrack entry when conntrack dropped it: none could be made");
                let verdict = if growth.drop + growth.early_drop > 0 {
                    verdict.evidence(counted("drop", growth.drop))
                } else {
                    verdict.likely()
                };
                return verdict
                    .evidence(format!(
                        "node conntrack table: {} of {} entries",
                        growth.entries, growth.limit
                    ))
                    .next("`sysctl net.netfilter.nf_conntrack_count net.netfilter.nf_conntrack_max` on the node")
                    .next("raise the limit (kube-proxy --conntrack-max-per-core) or find what fills the table (`conntrack -L | sort | uniq -c`)");
            }
            ct if ct.unconfirmed() && !node.legacy_iptables => {
                return Verdict::new(
                    Hop::Conntrack,
                    "nat-failed",
                    format!("the node's NAT could not translate the flow to {target}"),
                )
                .likely()
                .evidence(seen)
                .evidence("a netfilter hook returned NF_DROP before source NAT was set up, and the node has no legacy iptables rules that could have")
                .next("`iptables -t nat -S POSTROUTING` / `nft list ruleset` on the node: the SNAT/MASQUERADE rule for this traffic")
                .next("check that the egress interface has an address (MASQUERADE drops without one)");
            }
            _ => {}
        }
    }
    if drop.reason == "NETFILTER_DROP" {
        if !hook_function && drop.conntrack == PacketConntrack::None && growth.invalid > 0 {
            return Verdict::new(
                Hop::Conntrack,
                "invalid",
                format!("the node dropped a packet of the flow to {target} that conntrack judged invalid"),
            )
            .evidence(seen)
            .evidence("the packet had no conntrack entry: conntrack marked it invalid, and a rule dropping ctstate INVALID dropped it")
            .evidence(counted("invalid", growth.invalid))
            .next("`conntrack -S` on the node (invalid); look for asymmetric routing or a middlebox rewriting TCP sequence numbers");
        }
        let verdict = Verdict::new(
            Hop::NodeFirewall,
            "netfilter-drop",
            format!("a netfilter rule on the node dropped the traffic to {target}"),
        )
        .evidence(seen);
        let verdict = if hook_function {
            verdict.likely().evidence(
                "dropped by a netfilter hook's verdict: a legacy iptables rule, or conntrack/NAT",
            )
        } else {
            verdict
        };
        if let Some(NetnsOwner::Pod(pod)) = &drop.netns_owner {
            return verdict
                .next(format!(
                    "the rule is inside pod {pod}'s own network namespace (a sidecar or init container's rules): `nsenter -t <pid> -n iptables-save -c`"
                ));
        }
        return verdict
            .next("`iptables-save -c` / `nft list ruleset` on the node: find the rule whose counters rise")
            .next("no NetworkPolicy of this pod was matched to it: check rules added outside Kubernetes");
    }
    if drop.reason.contains("NEIGH") {
        return Verdict::new(
            Hop::Routing,
            "neighbour-failed",
            format!("the node could not resolve the next hop towards {target}"),
        )
        .evidence(seen)
        .next("`ip neigh` and `ip route get` on the node for the destination");
    }
    if drop.reason.contains("NOROUTE") || drop.reason.contains("NO_ROUTE") {
        return Verdict::new(
            Hop::Routing,
            "no-route",
            format!("the node has no route to {target}"),
        )
        .evidence(seen)
        .next(
            "`ip route get` on the node for the destination; check the node's route table (UDR)",
        );
    }
    if drop.reason.starts_with("TC_") {
        // An eBPF dataplane (Cilium, Azure CNI powered by Cilium) enforces policies in tc
        // programs on the pods' veths, not in netfilter.
        return Verdict::new(
            Hop::NodeFirewall,
            "ebpf-drop",
            format!("a tc (eBPF) program on the node dropped the traffic to {target}"),
        )
        .evidence(seen)
        .evidence("a tc program's verdict (TC_ACT_SHOT): with an eBPF CNI this is its policy enforcement or its own checks")
        .next("the CNI's own drop log (e.g. `cilium monitor --type drop`, `hubble observe --verdict DROPPED`)")
        .next("`tc filter show dev <the pod's host-side veth> ingress` on the node; `bpftool net` lists every attached program");
    }
    Verdict::new(
        Hop::NodeFirewall,
        "netfilter-drop",
        format!("the node dropped the traffic to {target}"),
    )
    .likely()
    .evidence(seen)
    .next("look up the drop reason in the kernel's `enum skb_drop_reason`")
}

fn of_icmp(icmp: &IcmpError, attempt: &Attempt, target: Target<'_>, node: &NodeFacts) -> Verdict {
    let seen = format!(
        "{} {} (type {} code {}) from {} answered it (seen in the pod's namespace)",
        if icmp.v6 { "ICMPv6" } else { "ICMP" },
        icmp.meaning(),
        icmp.icmp_type,
        icmp.code,
        icmp.sender
    );
    let from_destination = icmp.sender == attempt.dst.ip();
    match icmp.meaning() {
        "admin-prohibited" | "policy-failed" => Verdict::new(
            Hop::Upstream,
            "icmp-admin-prohibited",
            format!("{} beyond the node rejected the traffic to {target}", icmp.sender),
        )
        .evidence(seen)
        .next(format!(
            "the device at {} filters this traffic: check Azure Firewall / NVA rules and the NSG on the path (Azure Virtual Network Verifier)",
            icmp.sender
        )),
        "port-unreachable" if from_destination => Verdict::new(
            Hop::Endpoint,
            "refused",
            format!("{target}: nothing listens on the port"),
        )
        .evidence(seen)
        .next(format!("check the service on {}", attempt.dst)),
        "net-unreachable" | "host-unreachable" | "no-route" | "address-unreachable"
            if is_node_address(icmp.sender, attempt, node) =>
        {
            Verdict::new(
                Hop::Routing,
                "no-route",
                format!("the node has no route to {target}"),
            )
            .evidence(seen)
            .evidence(format!("{} is an address of the node itself", icmp.sender))
            .next(format!("`ip route get {}` on the node; check its route table (and the subnet's UDR)", attempt.dst.ip()))
        }
        _ if is_node_address(icmp.sender, attempt, node) => Verdict::new(
            Hop::Routing,
            "unreachable",
            format!("the node could not forward the traffic to {target}"),
        )
        .evidence(seen)
        .evidence(format!("{} is an address of the node itself", icmp.sender))
        .next("`ip route get` on the node for the destination"),
        _ => Verdict::new(
            Hop::Upstream,
            "icmp-unreachable",
            format!("{} reported {target} unreachable", icmp.sender),
        )
        .evidence(seen)
        .next("check the route tables (UDR), peering and VPN on the path: Azure Virtual Network Verifier from the node's subnet"),
    }
}

/// Whether an ICMP error came from the node: one of its addresses (the pods' gateway,
/// the uplink), or the attempt's SNAT address.
fn is_node_address(sender: IpAddr, attempt: &Attempt, node: &NodeFacts) -> bool {
    node.addresses.contains(&sender)
        || attempt
            .nat
            .and_then(|nat| nat.src)
            .is_some_and(|src| src.ip() == sender)
}

/// A reset: the endpoint's, unless it came from closer than the endpoint is.
fn of_reset(attempt: &Attempt, target: Target<'_>) -> Verdict {
    let error = attempt
        .tcp
        .and_then(|tcp| tcp.errno)
        .map_or_else(|| "ECONNREFUSED".to_owned(), errno_name);
    let seen = format!("the SYN was answered with a TCP reset (the pod's socket: {error})");
    let endpoint = |verdict: Verdict| {
        verdict.next(format!(
            "check that a server listens on {} (from the node: `curl -Ivm5` to it)",
            attempt.dst
        ))
    };
    let Some(reply) = attempt.reply.filter(|reply| reply.reset) else {
        return endpoint(
            Verdict::new(
                Hop::Endpoint,
                "refused",
                format!("{target} refused the connection"),
            )
            .likely()
            .evidence(seen)
            .evidence(
                "the reset's TTL was not seen, so a firewall on the path cannot be ruled out",
            ),
        );
    };
    let hops = reply.hops();
    let arrived = format!(
        "the reset arrived with TTL {} ({hops} hop(s) away; cgroup ingress of the pod's socket)",
        reply.ttl
    );
    match reply.endpoint_hops {
        Some(endpoint_hops) if hops < endpoint_hops => Verdict::new(
            Hop::Upstream,
            "reset",
            format!("a device {hops} hop(s) away reset the connection to {target}, before the endpoint"),
        )
        .evidence(seen)
        .evidence(arrived)
        .evidence(format!(
            "the endpoint's own SYN-ACKs come from {endpoint_hops} hop(s) away: the reset was forged on the path"
        ))
        .next("a firewall or proxy on the path rejects this port: Azure Firewall / NVA rules, NSG flow logs")
        .next("Azure Virtual Network Verifier from the node to the destination"),
        Some(endpoint_hops) => endpoint(
            Verdict::new(Hop::Endpoint, "refused", format!("{target} refused the connection"))
                .evidence(seen)
                .evidence(arrived)
                .evidence(format!(
                    "as far away as the endpoint's own SYN-ACKs ({endpoint_hops} hop(s)): the endpoint sent it"
                )),
        ),
        None => endpoint(
            Verdict::new(Hop::Endpoint, "refused", format!("{target} refused the connection"))
                .likely()
                .evidence(seen)
                .evidence(arrived)
                .evidence("no earlier connection to this address to compare the path length with"),
        ),
    }
}

fn of_timeout(attempt: &Attempt, target: Target<'_>) -> Verdict {
    let retransmits = attempt.tcp.map_or(0, |tcp| tcp.syn_retransmits);
    let translated = attempt.nat.and_then(|nat| nat.src);
    let sent = match translated {
        Some(src) => format!(
            "{retransmits} SYN retransmissions, no answer; the SYN left the node translated to {src} (its conntrack entry)"
        ),
        None => format!("{retransmits} SYN retransmissions, no answer (the pod's socket)"),
    };
    if let Some(usage) = &attempt.snat
        && usage.near_budget()
    {
        return Verdict::new(
            Hop::Upstream,
            "snat-exhaustion-suspected",
            format!(
                "SYNs to {target} time out while the node's SNAT ports to it are nearly used up"
            ),
        )
        .likely()
        .evidence(sent)
        .evidence(usage.describe())
        .next("Azure load balancer outbound rules: `az network lb outbound-rule show` (allocatedOutboundPorts), and the LB's SNAT Connection Count metric")
        .next("reuse connections (keep-alive, pooling), or move egress to a NAT gateway / more outbound IPs");
    }
    let verdict = Verdict::new(
        Hop::Upstream,
        "silent-drop",
        format!("nothing answered the connection to {target}: dropped beyond the node"),
    )
    .evidence(sent)
    .evidence("no drop of its packets on the node (kfree_skb) and no ICMP error");
    let verdict = if translated.is_none() {
        verdict.likely().evidence(
            "the node's NAT was not seen (no SNAT, or conntrack's types unknown), so the SYN leaving the node is inferred",
        )
    } else {
        verdict
    };
    verdict
        .next(format!(
            "Azure Virtual Network Verifier from the node to {}; NSG flow logs for the node's subnet",
            attempt.dst
        ))
        .next("Azure Firewall / NVA logs, and the route table (UDR) of the node's subnet")
}

fn of_socket_error(attempt: &Attempt, target: Target<'_>) -> Verdict {
    let errno = attempt.tcp.and_then(|tcp| tcp.errno);
    let name = errno
        .map(errno_name)
        .unwrap_or_else(|| "an error".to_owned());
    let seen =
        format!("the pod's socket failed with {name} without an ICMP error or a drop being seen");
    match name.as_str() {
        "ENETUNREACH" => Verdict::new(Hop::Routing, "no-route", format!("no route to {target}"))
            .evidence(seen)
            .next("`ip route` in the pod and on the node"),
        "EHOSTUNREACH" => Verdict::new(
            Hop::Routing,
            "neighbour-failed",
            format!("the next hop towards {target} did not answer"),
        )
        .likely()
        .evidence(seen)
        .next("`ip neigh` on the node"),
        _ => Verdict::new(
            Hop::Routing,
            "unreachable",
            format!("the connection to {target} failed"),
        )
        .likely()
        .evidence(seen),
    }
}

/// The verdict of a DNS lookup; a timeout that a NetworkPolicy explains (UDP/53 to the
/// server denied) is the policy's, with the symptom `dns-timeout`. `cluster_dns` names
/// the cluster DNS Service when the server is its address.
pub fn of_lookup(lookup: &Lookup, policy: Option<&Decision>, cluster_dns: Option<&str>) -> Verdict {
    let verdict = of_dns(lookup, cluster_dns);
    match policy {
        Some(decision) if !decision.allowed && lookup.result == LookupResult::Timeout => {
            let mut denied = Verdict::new(
                Hop::NetworkPolicy,
                "denied",
                format!(
                    "NetworkPolicy {} denies DNS to {}: the lookup of {} timed out",
                    decision.denied_by.join(", "),
                    lookup.server,
                    lookup.name
                ),
            )
            .evidence(format!("NetworkPolicy: {}", decision.explanation));
            denied.evidence.extend(verdict.evidence);
            denied.symptom = Some("dns-timeout".to_owned());
            denied.policy = Some(decision.denied_by.join(","));
            denied
                .next(format!(
                    "kubectl describe networkpolicy -n {} {}",
                    namespace_of(&decision.denied_by),
                    names_of(&decision.denied_by)
                ))
                .next("allow egress to the cluster DNS Service's pods on UDP and TCP 53")
        }
        _ => verdict,
    }
}

fn of_dns(lookup: &Lookup, cluster_dns: Option<&str>) -> Verdict {
    let name = &lookup.name;
    let servers = match cluster_dns {
        Some(service) => format!("{} (the cluster DNS Service {service})", lookup.server),
        None => lookup.server.to_string(),
    };
    let dns = |reason: &'static str, summary: String| {
        let verdict = Verdict::new(Hop::Dns, reason, summary);
        match cluster_dns {
            Some(_) => verdict
                .next("CoreDNS: `kubectl -n kube-system logs -l k8s-app=kube-dns`")
                .next(format!(
                    "ask the upstream server directly: `nslookup {name} <upstream>` from the node"
                )),
            None => verdict.next(format!(
                "the pod asks {} directly, not the cluster DNS: check that server (`nslookup {name} {}` from the node)",
                lookup.server,
                lookup.server.ip()
            )),
        }
    };
    let seen = |what: &str| format!("{what} from {servers} (DNS messages at the pod's sockets)");
    match lookup.result {
        LookupResult::Resolved => Verdict::ok(format!("{name} resolved")),
        LookupResult::Nxdomain => dns("nxdomain", format!("{name} does not exist"))
            .evidence(seen("every query answered NXDOMAIN (RCODE 3)")),
        LookupResult::Servfail => dns(
            "servfail",
            format!("the DNS server failed to resolve {name}"),
        )
        .evidence(seen("SERVFAIL (RCODE 2)")),
        LookupResult::Refused => dns(
            "refused",
            format!("the DNS server refused to resolve {name}"),
        )
        .evidence(seen("REFUSED (RCODE 5)")),
        LookupResult::NoAnswer => dns("no-answer", format!("{name} has no address records"))
            .evidence(seen("NOERROR without addresses")),
        LookupResult::Timeout => {
            let mut verdict = dns("timeout", format!("no DNS answer for {name}")).evidence(
                format!("queries to {servers} got no response within the resolver timeout"),
            );
            verdict.symptom = Some("dns-timeout".to_owned());
            verdict
        }
        LookupResult::Malformed | LookupResult::Failed => dns(
            "servfail",
            format!("the DNS answer for {name} was unusable"),
        )
        .likely()
        .evidence(seen("a malformed response or an unusual response code")),
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use super::*;
    use crate::{
        capture::PacketDrop,
        conntrack::{Translation, snat::SnatTable},
        flow::{Origin, Protocol, TcpHandshake},
    };

    const CONFIRMED: u32 = tracer_common::IPS_CONFIRMED;
    const SRC_NAT_DONE: u32 = tracer_common::IPS_SRC_NAT_DONE;
    const DST_NAT_DONE: u32 = tracer_common::IPS_DST_NAT_DONE;

    #[test]
    fn targets_are_written_as_display_writes_their_addresses() {
        let mut attempt = attempt(Outcome::Established);
        for dst in [
            "0.0.0.0:0",
            "203.0.113.10:443",
            "10.9.100.255:65535",
            "1.22.3.44:80",
            "[2001:db8::10]:8443",
        ] {
            attempt.dst = dst.parse().unwrap();
            attempt.dst_name = None;
            assert_eq!(Target(&attempt).to_string(), dst);
            attempt.dst_name = Some("api.example.test".into());
            assert_eq!(
                Target(&attempt).to_string(),
                format!("api.example.test ({dst})")
            );
        }
        assert_eq!(
            of_path(&attempt, &NodeFacts::default()).map(|v| v.summary),
            Some("connected to api.example.test ([2001:db8::10]:8443)".to_owned())
        );
    }

    /// A TCP attempt from a pod to 203.0.113.10:443 that ended with `outcome`.
    fn attempt(outcome: Outcome) -> Attempt {
        Attempt {
            monotonic_ns: 1,
            origin: Arc::new(Origin {
                pod: Some("shop/web".into()),
                pod_uid: None,
                container: None,
            }),
            pid: 10,
            comm: "curl".into(),
            cgroup_id: 1,
            sock_cookie: 1,
            protocol: Protocol::Tcp,
            src: Some("10.244.0.10:41000".parse().unwrap()),
            dst: "203.0.113.10:443".parse().unwrap(),
            dst_name: Some("api.example.test".into()),
            outcome,
            tcp: Some(TcpHandshake {
                syn_retransmits: if outcome == Outcome::Timeout { 2 } else { 0 },
                duration: Some(Duration::from_secs(3)),
                errno: None,
                closed_by_application: true,
            }),
            icmp: None,
            drops: None,
            nat: None,
            service: None,
            reply: None,
            snat: None,
            verdict: None,
        }
    }

    fn dropped(location: &str, reason: &str, conntrack: PacketConntrack) -> Attempt {
        let mut a = attempt(Outcome::Timeout);
        a.drops = Some(Box::new(Drops {
            first: PacketDrop {
                reason: reason.into(),
                location: location.into(),
                reply: false,
                src: Some("10.224.0.4:40000".parse().unwrap()),
                dst: a.dst.into(),
                conntrack,
                netns: None,
                netns_owner: None,
            },
            count: 3,
        }));
        a
    }

    fn facts(growth: ConntrackStats, legacy_iptables: bool) -> NodeFacts {
        NodeFacts {
            legacy_iptables,
            conntrack_growth: Some(growth),
            addresses: Vec::new(),
        }
    }

    fn judge(attempt: &Attempt, node: &NodeFacts) -> Option<Verdict> {
        of_attempt(attempt, node, None)
    }

    fn hop_reason(verdict: &Verdict) -> (Hop, &str, bool) {
        (verdict.hop, verdict.reason.as_ref(), verdict.likely)
    }

    #[test]
    fn insert_failure_after_nat_is_conntrack_and_corroborated_by_the_counter() {
        let a = dropped(
            "nf_hook_slow+0x9e",
            "NETFILTER_DROP",
            PacketConntrack::Entry {
                status: SRC_NAT_DONE | DST_NAT_DONE,
            },
        );
        let counted = ConntrackStats {
            insert_failed: 3,
            ..Default::default()
        };
        let verdict = judge(&a, &facts(counted, false)).unwrap();
        assert_eq!(
            hop_reason(&verdict),
            (Hop::Conntrack, "insert-failed", false)
        );
        assert!(
            verdict
                .evidence
                .iter()
                .any(|e| e.contains("insert_failed counter rose by 3"))
        );
        // Without the counter's rise it is only likely.
        let verdict = judge(&a, &facts(ConntrackStats::default(), false)).unwrap();
        assert_eq!(
            hop_reason(&verdict),
            (Hop::Conntrack, "insert-failed", true)
        );
    }

    #[test]
    fn no_entry_at_a_hook_drop_is_a_full_table() {
        let a = dropped("nf_hook_slow+0x9e", "NETFILTER_DROP", PacketConntrack::None);
        let full = ConntrackStats {
            entries: 262_144,
            limit: 262_144,
            drop: 5,
            ..Default::default()
        };
        let verdict = judge(&a, &facts(full, false)).unwrap();
        assert_eq!(hop_reason(&verdict), (Hop::Conntrack, "table-full", false));
        assert!(
            verdict
                .evidence
                .iter()
                .any(|e| e.contains("262144 of 262144 entries"))
        );
    }

    #[test]
    fn a_hook_drop_before_source_nat_is_nat_failed_only_without_legacy_iptables() {
        let a = dropped(
            "nf_hook_slow+0x9e",
            "NETFILTER_DROP",
            PacketConntrack::Entry {
                status: DST_NAT_DONE,
            },
        );
        let verdict = judge(&a, &facts(ConntrackStats::default(), false)).unwrap();
        assert_eq!(hop_reason(&verdict), (Hop::Conntrack, "nat-failed", true));
        // Legacy iptables rules are freed by nf_hook_slow too: a rule is likelier.
        let verdict = judge(&a, &facts(ConntrackStats::default(), true)).unwrap();
        assert_eq!(
            hop_reason(&verdict),
            (Hop::NodeFirewall, "netfilter-drop", true)
        );
    }

    #[test]
    fn a_rule_dropping_an_untracked_packet_is_invalid_when_the_counter_rose() {
        let a = dropped(
            "nft_do_chain+0x3f5",
            "NETFILTER_DROP",
            PacketConntrack::None,
        );
        let invalid = ConntrackStats {
            invalid: 2,
            ..Default::default()
        };
        let verdict = judge(&a, &facts(invalid, false)).unwrap();
        assert_eq!(hop_reason(&verdict), (Hop::Conntrack, "invalid", false));
        let verdict = judge(&a, &facts(ConntrackStats::default(), false)).unwrap();
        assert_eq!(
            hop_reason(&verdict),
            (Hop::NodeFirewall, "netfilter-drop", false)
        );
    }

    #[test]
    fn a_rule_drop_of_a_tracked_packet_is_the_node_firewall() {
        let a = dropped(
            "nft_do_chain+0x3f5",
            "NETFILTER_DROP",
            PacketConntrack::Entry { status: 0 },
        );
        let verdict = judge(&a, &NodeFacts::default()).unwrap();
        assert_eq!(
            hop_reason(&verdict),
            (Hop::NodeFirewall, "netfilter-drop", false)
        );
        assert!(verdict.evidence[0].contains("nft_do_chain+0x3f5 with reason NETFILTER_DROP"));
        // A confirmed entry dropped by a hook's verdict: a legacy rule, likely.
        let a = dropped(
            "nf_hook_slow+0x9e",
            "NETFILTER_DROP",
            PacketConntrack::Entry {
                status: CONFIRMED | SRC_NAT_DONE,
            },
        );
        let verdict = judge(&a, &NodeFacts::default()).unwrap();
        assert_eq!(
            hop_reason(&verdict),
            (Hop::NodeFirewall, "netfilter-drop", true)
        );
    }

    #[test]
    fn routing_drop_reasons() {
        let a = dropped(
            "ip_finish_output2+0x1",
            "NEIGH_FAILED",
            PacketConntrack::Unknown,
        );
        let verdict = judge(&a, &NodeFacts::default()).unwrap();
        assert_eq!(
            hop_reason(&verdict),
            (Hop::Routing, "neighbour-failed", false)
        );
        let a = dropped(
            "ip_route_output+0x1",
            "IP_OUTNOROUTES",
            PacketConntrack::Unknown,
        );
        let verdict = judge(&a, &NodeFacts::default()).unwrap();
        assert_eq!(hop_reason(&verdict), (Hop::Routing, "no-route", false));
    }

    #[test]
    fn timeouts_are_upstream_and_snat_pressure_is_named() {
        let mut a = attempt(Outcome::Timeout);
        a.nat = Some(Translation {
            src: Some("10.224.0.4:1024".parse().unwrap()),
            dst: None,
        });
        let verdict = judge(&a, &NodeFacts::default()).unwrap();
        assert_eq!(hop_reason(&verdict), (Hop::Upstream, "silent-drop", false));
        assert!(verdict.evidence[0].contains("translated to 10.224.0.4:1024"));
        // The same, without the NAT seen: only likely.
        a.nat = None;
        let verdict = judge(&a, &NodeFacts::default()).unwrap();
        assert_eq!(hop_reason(&verdict), (Hop::Upstream, "silent-drop", true));

        let mut usage = SnatTable::new((32768, 60999), Some(1024)).usage(
            "10.224.0.4".parse().unwrap(),
            a.dst,
            6,
        );
        usage.in_use = 1000;
        a.snat = Some(usage);
        let verdict = judge(&a, &NodeFacts::default()).unwrap();
        assert_eq!(
            hop_reason(&verdict),
            (Hop::Upstream, "snat-exhaustion-suspected", true)
        );
        // Far below the budget, a timeout is a plain silent drop.
        usage.in_use = 10;
        a.snat = Some(usage);
        let verdict = judge(&a, &NodeFacts::default()).unwrap();
        assert_eq!(verdict.reason, "silent-drop");
    }

    #[test]
    fn icmp_errors_name_the_upstream_or_the_endpoint() {
        let mut a = attempt(Outcome::Unreachable);
        a.icmp = Some(IcmpError {
            v6: false,
            icmp_type: 3,
            code: 13,
            sender: "10.224.0.1".parse().unwrap(),
            mtu: None,
        });
        let verdict = judge(&a, &NodeFacts::default()).unwrap();
        assert_eq!(
            hop_reason(&verdict),
            (Hop::Upstream, "icmp-admin-prohibited", false)
        );
        assert!(verdict.evidence[0].contains("admin-prohibited (type 3 code 13) from 10.224.0.1"));
        a.icmp = Some(IcmpError {
            v6: false,
            icmp_type: 3,
            code: 3,
            sender: a.dst.ip(),
            mtu: None,
        });
        let verdict = judge(&a, &NodeFacts::default()).unwrap();
        assert_eq!(hop_reason(&verdict), (Hop::Endpoint, "refused", false));
        a.icmp = Some(IcmpError {
            v6: false,
            icmp_type: 3,
            code: 1,
            sender: "198.51.100.1".parse().unwrap(),
            mtu: None,
        });
        let verdict = judge(&a, &NodeFacts::default()).unwrap();
        assert_eq!(
            hop_reason(&verdict),
            (Hop::Upstream, "icmp-unreachable", false)
        );
    }

    #[test]
    fn successes_refusals_and_silent_endings() {
        let verdict = judge(&attempt(Outcome::Established), &NodeFacts::default()).unwrap();
        assert_eq!(hop_reason(&verdict), (Hop::None, "ok", false));
        let verdict = judge(&attempt(Outcome::Refused), &NodeFacts::default()).unwrap();
        assert_eq!(hop_reason(&verdict), (Hop::Endpoint, "refused", true));
        assert_eq!(
            judge(&attempt(Outcome::Aborted), &NodeFacts::default()),
            None
        );
        assert_eq!(
            judge(&attempt(Outcome::InProgress), &NodeFacts::default()),
            None
        );
    }

    #[test]
    fn hop_names_follow_the_contract() {
        let names: Vec<String> = Hop::ALL
            .iter()
            .map(|hop| {
                let json = serde_json::to_string(hop).unwrap();
                assert_eq!(json, format!("\"{}\"", hop.as_str()));
                hop.as_str().to_owned()
            })
            .collect();
        assert_eq!(
            names,
            [
                "dns",
                "network-policy",
                "node-firewall",
                "conntrack",
                "routing",
                "upstream",
                "proxy",
                "endpoint",
                "none"
            ]
        );
    }

    fn denial() -> Decision {
        use crate::policy::SideDecision;
        Decision {
            allowed: false,
            policies: vec!["shop/deny-egress".into()],
            denied_by: vec!["shop/deny-egress".into()],
            allowed_by: None,
            certain: true,
            explanation: "shop/deny-egress selects shop/web (app=web) for egress; no egress rule allows TCP 443 to 203.0.113.10".into(),
            egress: SideDecision {
                allowed: false,
                policies: vec!["shop/deny-egress".into()],
                allowed_by: None,
            },
            ingress: None,
        }
    }

    #[test]
    fn a_denying_policy_explains_a_rule_drop_or_a_loss_before_nat() {
        let a = dropped(
            "nft_do_chain+0x3f5",
            "NETFILTER_DROP",
            PacketConntrack::Entry { status: 0 },
        );
        let verdict = of_attempt(&a, &NodeFacts::default(), Some(&denial())).unwrap();
        assert_eq!(hop_reason(&verdict), (Hop::NetworkPolicy, "denied", false));
        assert_eq!(verdict.policy.as_deref(), Some("shop/deny-egress"));
        assert!(verdict.evidence[0].starts_with("NetworkPolicy: shop/deny-egress selects"));
        assert!(verdict.evidence[1].contains("nft_do_chain+0x3f5"));
        assert_eq!(
            verdict.next_steps[0],
            "kubectl describe networkpolicy -n shop deny-egress"
        );
        // A timeout with no drop seen and no NAT: an eBPF CNI's drop, likely.
        let verdict = of_attempt(
            &attempt(Outcome::Timeout),
            &NodeFacts::default(),
            Some(&denial()),
        )
        .unwrap();
        assert_eq!(hop_reason(&verdict), (Hop::NetworkPolicy, "denied", true));
        // A conntrack drop stays conntrack's, with the policy noted.
        let a = dropped(
            "nf_hook_slow+0x9e",
            "NETFILTER_DROP",
            PacketConntrack::Entry {
                status: SRC_NAT_DONE,
            },
        );
        let verdict = of_attempt(&a, &NodeFacts::default(), Some(&denial())).unwrap();
        assert_eq!(verdict.hop, Hop::Conntrack);
        assert!(
            verdict
                .evidence
                .last()
                .unwrap()
                .contains("a NetworkPolicy denies this flow")
        );
    }

    #[test]
    fn a_tc_programs_drop_is_the_policy_that_explains_it_else_the_node_firewall() {
        // An eBPF CNI enforces policies in tc programs on the pods' veths.
        let a = dropped("tcf_classify+0x2c", "TC_INGRESS", PacketConntrack::None);
        let verdict = of_attempt(&a, &NodeFacts::default(), Some(&denial())).unwrap();
        assert_eq!(hop_reason(&verdict), (Hop::NetworkPolicy, "denied", false));
        assert_eq!(verdict.policy.as_deref(), Some("shop/deny-egress"));
        assert!(verdict.evidence[1].contains("with reason TC_INGRESS"));
        let verdict = of_attempt(&a, &NodeFacts::default(), None).unwrap();
        assert_eq!(
            hop_reason(&verdict),
            (Hop::NodeFirewall, "ebpf-drop", false)
        );
        assert!(verdict.evidence[1].contains("a tc program's verdict (TC_ACT_SHOT)"));
        let a = dropped("tcx_run+0x1", "TC_EGRESS", PacketConntrack::None);
        let verdict = judge(&a, &NodeFacts::default()).unwrap();
        assert_eq!(
            hop_reason(&verdict),
            (Hop::NodeFirewall, "ebpf-drop", false)
        );
    }

    #[test]
    fn an_allowing_policy_clears_the_policies_of_a_rule_drop() {
        let mut allowed = denial();
        allowed.allowed = true;
        allowed.denied_by.clear();
        allowed.explanation =
            "allowed: shop/web-out egress[0] allows TCP 443 to 203.0.113.10".into();
        let a = dropped(
            "nft_do_chain+0x3f5",
            "NETFILTER_DROP",
            PacketConntrack::Entry { status: 0 },
        );
        let verdict = of_attempt(&a, &NodeFacts::default(), Some(&allowed)).unwrap();
        assert_eq!(
            hop_reason(&verdict),
            (Hop::NodeFirewall, "netfilter-drop", false)
        );
        assert!(
            verdict
                .evidence
                .last()
                .unwrap()
                .contains("the rule is not a policy's")
        );
    }
}
