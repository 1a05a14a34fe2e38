//! Renders attempts for people (`-o table`) and programs (`-o json`, NDJSON).
//!
//! The JSON field names follow the output contract in `docs/hops.md`.

use std::{
    io::{self, Write},
    net::{IpAddr, SocketAddr},
    time::SystemTime,
};

use serde::Serialize;

use crate::{
    capture::{NetnsOwner, PacketConntrack},
    conntrack::snat::SnatUsage,
    dns::{Answer, AnswerValue, Lookup, LookupResult},
    flow::{
        Attempt, ContainerRef, HandshakeReply, IcmpError, Origin, Outcome, Protocol, TcpHandshake,
        errno_name,
    },
    node::MonotonicClock,
    pipeline::Record,
    verdict::{Hop, Verdict},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns for a terminal.
    Table,
    /// One JSON object per line (NDJSON).
    Json,
}

/// The NDJSON record of one attempt.
#[derive(Debug, Serialize, PartialEq)]
pub struct AttemptRecord<'a> {
    pub time: String,
    pub pod: Option<&'a str>,
    pub pod_uid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<&'a ContainerRef>,
    pub process: Process<'a>,
    pub protocol: Protocol,
    pub src: Option<SocketAddr>,
    pub dst: SocketAddr,
    pub dst_name: Option<&'a str>,
    pub outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmp: Option<IcmpRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drop: Option<DropRecord<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nat: Option<NatRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceRecord<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snat: Option<SnatRecord>,
    /// `null` when the attempt's ending says nothing about the path (aborted by the
    /// application, or still in progress).
    pub verdict: Option<&'a Verdict>,
    pub cgroup_id: u64,
}

/// The node's SNAT port usage towards the attempt's destination.
#[derive(Debug, Serialize, PartialEq)]
pub struct SnatRecord {
    /// Flows translated to the attempt's source address, towards its destination, at
    /// the last conntrack dump.
    pub ports_in_use: u32,
    /// The cloud load balancer's allocation, from `--snat-port-budget`.
    pub budget: Option<u32>,
    /// The node's local port range.
    pub port_range: [u16; 2],
}

impl From<&SnatUsage> for SnatRecord {
    fn from(usage: &SnatUsage) -> Self {
        Self {
            ports_in_use: usage.in_use,
            budget: usage.budget,
            port_range: [usage.port_range.0, usage.port_range.1],
        }
    }
}

/// The conntrack state of a dropped packet.
#[derive(Debug, Serialize, PartialEq)]
pub struct ConntrackRecord {
    /// `entry`, `none` (no entry: not tracked yet, table full or invalid), `untracked`,
    /// or `unknown` (not readable on this kernel).
    pub state: &'static str,
    /// The entry was in the conntrack table.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confirmed: Option<bool>,
    /// The entry's source NAT was set up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_nat_done: Option<bool>,
}

impl From<PacketConntrack> for ConntrackRecord {
    fn from(state: PacketConntrack) -> Self {
        let entry = matches!(state, PacketConntrack::Entry { .. });
        Self {
            state: match state {
                PacketConntrack::Unknown => "unknown",
                PacketConntrack::None => "none",
                PacketConntrack::Untracked => "untracked",
                PacketConntrack::Entry { .. } => "entry",
            },
            confirmed: entry.then(|| !state.unconfirmed()),
            source_nat_done: entry.then(|| state.source_nat_done()),
        }
    }
}

/// The Service the attempt went to, and its backend.
#[derive(Debug, Serialize, PartialEq)]
pub struct ServiceRecord<'a> {
    /// `namespace/name`.
    pub name: &'a str,
    /// The backend address the node's DNAT chose.
    pub backend: Option<SocketAddr>,
    /// `namespace/name` of the backend pod, when it is a known pod.
    pub backend_pod: Option<&'a str>,
}

/// What the node's NAT made of the attempt's addresses.
#[derive(Debug, Serialize, PartialEq)]
pub struct NatRecord {
    /// The source after SNAT/MASQUERADE (the node's address and port).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub src: Option<SocketAddr>,
    /// The destination after DNAT (a Service's backend).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst: Option<SocketAddr>,
}

/// Packets of the attempt the kernel dropped.
#[derive(Debug, Serialize, PartialEq)]
pub struct DropRecord<'a> {
    /// The kernel's drop reason (`enum skb_drop_reason`, without its prefix).
    pub reason: &'a str,
    /// Where in the kernel, as `function+0xoffset`.
    pub location: &'a str,
    /// `original` (the attempt's own packet) or `reply`.
    pub direction: &'static str,
    /// How many packets of the attempt were dropped (the first is described).
    pub count: u32,
    /// The first dropped packet's source and destination.
    pub src: Option<SocketAddr>,
    pub dst: Option<SocketAddr>,
    /// Its conntrack state when it was dropped.
    pub conntrack: ConntrackRecord,
    /// Where: `node` (the node's network namespace), `pod:<ns/name>`, or `null` when
    /// the namespace is not known.
    pub netns: Option<String>,
}

/// The ICMP error that answered an attempt.
#[derive(Debug, Serialize, PartialEq)]
pub struct IcmpRecord {
    /// `icmp` or `icmpv6`.
    pub protocol: &'static str,
    #[serde(rename = "type")]
    pub icmp_type: u8,
    pub code: u8,
    /// `admin-prohibited`, `port-unreachable`, `time-exceeded`…
    pub meaning: &'static str,
    /// The address that sent it (a router on the path, or the destination).
    pub from: IpAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

impl From<&IcmpError> for IcmpRecord {
    fn from(error: &IcmpError) -> Self {
        Self {
            protocol: if error.v6 { "icmpv6" } else { "icmp" },
            icmp_type: error.icmp_type,
            code: error.code,
            meaning: error.meaning(),
            from: error.sender,
            mtu: error.mtu,
        }
    }
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Process<'a> {
    pub pid: u32,
    pub comm: &'a str,
}

/// How a TCP handshake went.
#[derive(Debug, Serialize, PartialEq)]
pub struct TcpRecord {
    pub syn_retransmits: u32,
    /// From `connect()` to the end of the handshake, in milliseconds.
    pub handshake_ms: Option<f64>,
    /// The socket error the handshake failed with (`ECONNREFUSED`…).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For failed handshakes: `kernel` (it gave up or was told to) or `application`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub closed_by: Option<&'static str>,
    /// The first answer to the SYN.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply: Option<ReplyRecord>,
}

/// The first answer to a SYN.
#[derive(Debug, Serialize, PartialEq)]
pub struct ReplyRecord {
    /// `syn-ack` or `reset`.
    pub kind: &'static str,
    pub ttl: u8,
    /// Hops it travelled (from the TTL).
    pub hops: u8,
}

impl TcpRecord {
    fn new(outcome: Outcome, handshake: &TcpHandshake, reply: Option<&HandshakeReply>) -> Self {
        Self {
            reply: reply.map(|reply| ReplyRecord {
                kind: if reply.reset { "reset" } else { "syn-ack" },
                ttl: reply.ttl,
                hops: reply.hops(),
            }),
            syn_retransmits: handshake.syn_retransmits,
            handshake_ms: (outcome != Outcome::InProgress)
                .then_some(handshake.duration)
                .flatten()
                .map(|d| d.as_secs_f64() * 1000.0),
            error: handshake.errno.map(errno_name),
            closed_by: outcome
                .is_failure()
                .then_some(if handshake.closed_by_application {
                    "application"
                } else {
                    "kernel"
                }),
        }
    }
}

impl<'a> AttemptRecord<'a> {
    pub fn new(attempt: &'a Attempt, clock: MonotonicClock) -> Self {
        Self {
            time: rfc3339(clock.to_wall(attempt.monotonic_ns)),
            pod: attempt.origin.pod.as_deref(),
            pod_uid: attempt.origin.pod_uid.as_deref(),
            container: attempt.origin.container.as_ref(),
            process: Process {
                pid: attempt.pid,
                comm: &attempt.comm,
            },
            protocol: attempt.protocol,
            src: attempt.src,
            dst: attempt.dst,
            dst_name: attempt.dst_name.as_deref(),
            outcome: attempt.outcome,
            tcp: attempt
                .tcp
                .as_ref()
                .map(|h| TcpRecord::new(attempt.outcome, h, attempt.reply.as_ref())),
            icmp: attempt.icmp.as_ref().map(IcmpRecord::from),
            drop: attempt.drops.as_ref().map(|d| DropRecord {
                reason: &d.first.reason,
                location: &d.first.location,
                direction: if d.first.reply { "reply" } else { "original" },
                count: d.count,
                src: d.first.src,
                dst: d.first.dst,
                conntrack: d.first.conntrack.into(),
                netns: d.first.netns_owner.as_ref().map(|owner| match owner {
                    NetnsOwner::Node => "node".to_owned(),
                    NetnsOwner::Pod(pod) => format!("pod:{pod}"),
                }),
            }),
            nat: attempt.nat.map(|t| NatRecord {
                src: t.src,
                dst: t.dst,
            }),
            service: attempt.service.as_ref().map(|s| ServiceRecord {
                name: &s.name,
                backend: s.backend,
                backend_pod: s.backend_pod.as_deref(),
            }),
            snat: attempt.snat.as_ref().map(SnatRecord::from),
            verdict: attempt.verdict.as_deref(),
            cgroup_id: attempt.cgroup_id,
        }
    }
}

/// The NDJSON line of a finished record (without the newline), as `trace -o json`
/// writes it.
pub fn json_line(record: &Record, clock: MonotonicClock) -> String {
    match record {
        Record::Attempt(attempt) => serde_json::to_string(&AttemptRecord::new(attempt, clock)),
        Record::Lookup {
            lookup,
            origin,
            verdict,
        } => serde_json::to_string(&LookupRecord::new(lookup, origin, verdict, clock)),
    }
    .expect("records serialize: every map key is a string")
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_micros(time).to_string()
}

/// The NDJSON record of one DNS lookup (all the queries of one name).
#[derive(Debug, Serialize, PartialEq)]
pub struct LookupRecord<'a> {
    pub time: String,
    pub pod: Option<&'a str>,
    pub pod_uid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<&'a ContainerRef>,
    pub process: Option<Process<'a>>,
    pub protocol: &'static str,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub outcome: LookupResult,
    pub dns: DnsRecord<'a>,
    pub verdict: &'a Verdict,
    pub cgroup_id: u64,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct DnsRecord<'a> {
    /// The name the application asked for.
    pub name: &'a str,
    pub types: Vec<&'a str>,
    /// The deciding response code, `null` when nothing answered.
    pub rcode: Option<&'a str>,
    /// Every name queried: the search-domain expansions, then the name itself.
    pub queried: &'a [String],
    pub answers: &'a [Answer],
    /// The server asked.
    pub server: SocketAddr,
    /// From the first query to the last response.
    pub latency_ms: Option<f64>,
    /// Queries that got no response within the resolver timeout.
    pub timeouts: u32,
    /// A UDP answer was truncated (the resolver should retry over TCP).
    pub truncated: bool,
    pub over_tcp: bool,
}

impl<'a> LookupRecord<'a> {
    pub fn new(
        lookup: &'a Lookup,
        origin: &'a Origin,
        verdict: &'a Verdict,
        clock: MonotonicClock,
    ) -> Self {
        Self {
            time: rfc3339(clock.to_wall(lookup.first_ns)),
            pod: origin.pod.as_deref(),
            pod_uid: origin.pod_uid.as_deref(),
            container: origin.container.as_ref(),
            process: lookup
                .process
                .as_ref()
                .map(|(pid, comm)| Process { pid: *pid, comm }),
            protocol: if lookup.over_tcp && !lookup.truncated {
                "tcp"
            } else {
                "udp"
            },
            src: lookup.client,
            dst: lookup.server,
            outcome: lookup.result,
            dns: DnsRecord {
                name: &lookup.name,
                types: lookup.qtypes.iter().map(AsRef::as_ref).collect(),
                rcode: lookup.rcode.as_deref(),
                queried: &lookup.queried,
                answers: &lookup.answers,
                server: lookup.server,
                latency_ms: lookup.duration.map(|d| d.as_secs_f64() * 1000.0),
                timeouts: lookup.timeouts,
                truncated: lookup.truncated,
                over_tcp: lookup.over_tcp,
            },
            verdict,
            cgroup_id: lookup.cgroup_id,
        }
    }
}

/// Writes attempts in one format; the table header is written before the first row.
pub struct Writer<W: Write> {
    out: W,
    format: Format,
    clock: MonotonicClock,
    header_written: bool,
    color: bool,
    failures_only: bool,
}

const VERDICT_WIDTH: usize = 30;

const TABLE_COLUMNS: [(&str, usize); 10] = [
    ("TIME", 15),
    ("POD", 24),
    ("PID", 7),
    ("COMM", 15),
    ("PROTO", 5),
    ("SRC", 22),
    ("DST", 22),
    ("NAME", 20),
    ("VERDICT", VERDICT_WIDTH),
    ("OUTCOME", 0),
];

impl<W: Write> Writer<W> {
    pub fn new(out: W, format: Format, clock: MonotonicClock) -> Self {
        Self {
            out,
            format,
            clock,
            header_written: false,
            color: false,
            failures_only: false,
        }
    }

    /// Colours the table's verdicts (for a terminal).
    pub fn with_color(mut self, color: bool) -> Self {
        self.color = color;
        self
    }

    /// Writes only failed attempts and lookups.
    pub fn failures_only(mut self, failures_only: bool) -> Self {
        self.failures_only = failures_only;
        self
    }

    pub fn write(&mut self, attempt: &Attempt) -> io::Result<()> {
        let failed = match &attempt.verdict {
            Some(verdict) => verdict.hop != Hop::None,
            None => attempt.outcome.is_failure(),
        };
        if self.failures_only && !failed {
            return Ok(());
        }
        let record = AttemptRecord::new(attempt, self.clock);
        match self.format {
            Format::Json => self.json_line(&record),
            Format::Table => {
                self.header()?;
                let time = table_time(&record.time);
                let pod = record.pod.unwrap_or("(host)");
                let pid = record.process.pid.to_string();
                let protocol = match record.protocol {
                    Protocol::Tcp => "tcp",
                    Protocol::Udp => "udp",
                };
                let src = record.src.map_or_else(|| "-".to_owned(), |s| s.to_string());
                let dst = record.dst.to_string();
                let outcome = outcome_text(&record);
                let verdict = record
                    .verdict
                    .map_or_else(|| "-".to_owned(), |v| self.verdict_cell(v));
                self.row(&[
                    &time,
                    pod,
                    &pid,
                    record.process.comm,
                    protocol,
                    &src,
                    &dst,
                    record.dst_name.unwrap_or("-"),
                    &verdict,
                    &outcome,
                ])
            }
        }
    }

    /// Writes one DNS lookup.
    pub fn write_lookup(
        &mut self,
        lookup: &Lookup,
        origin: &Origin,
        verdict: &Verdict,
    ) -> io::Result<()> {
        if self.failures_only && verdict.hop == Hop::None {
            return Ok(());
        }
        let record = LookupRecord::new(lookup, origin, verdict, self.clock);
        match self.format {
            Format::Json => self.json_line(&record),
            Format::Table => {
                self.header()?;
                let time = table_time(&record.time);
                let (pid, comm) = record
                    .process
                    .as_ref()
                    .map_or(("-".to_owned(), "-"), |p| (p.pid.to_string(), p.comm));
                let mut outcome = record.outcome.as_str().to_owned();
                if let Some(answer) = record
                    .dns
                    .answers
                    .iter()
                    .find(|a| matches!(a.value, AnswerValue::Address(_)))
                {
                    outcome.push_str(&format!(" → {}", answer.value));
                }
                if record.dns.queried.len() > 1 {
                    outcome.push_str(&format!(" ({} names tried)", record.dns.queried.len()));
                }
                let src = record.src.to_string();
                let dst = record.dst.to_string();
                let pod = record.pod.unwrap_or("(host)");
                let verdict = self.verdict_cell(record.verdict);
                self.row(&[
                    &time,
                    pod,
                    &pid,
                    comm,
                    "dns",
                    &src,
                    &dst,
                    record.dns.name,
                    &verdict,
                    &outcome,
                ])
            }
        }
    }

    /// Writes a record received as its NDJSON line (from an agent's flows API).
    pub fn write_json_line(&mut self, line: &str) -> io::Result<()> {
        let record: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{e}: {line}")))?;
        // A note from the stream itself (records skipped for a slow reader).
        if record.get("time").is_none() {
            eprintln!("egress-tracer: the agent says {line}");
            return Ok(());
        }
        let verdict: Option<Verdict> = serde_json::from_value(record["verdict"].clone()).ok();
        let text = |value: &serde_json::Value| value.as_str().unwrap_or("-").to_owned();
        let outcome = text(&record["outcome"]);
        let failed = match &verdict {
            Some(verdict) => verdict.hop != Hop::None,
            None => !matches!(outcome.as_str(), "established" | "sent" | "in-progress"),
        };
        if self.failures_only && !failed {
            return Ok(());
        }
        match self.format {
            Format::Json => writeln!(self.out, "{line}"),
            Format::Table => {
                self.header()?;
                let dns = record.get("dns");
                let protocol = if dns.is_some() {
                    "dns".to_owned()
                } else {
                    text(&record["protocol"])
                };
                let name = match dns {
                    Some(dns) => text(&dns["name"]),
                    None => text(&record["dst_name"]),
                };
                let pid = record["process"]["pid"]
                    .as_u64()
                    .map_or_else(|| "-".to_owned(), |pid| pid.to_string());
                let pod = record["pod"].as_str().unwrap_or("(host)");
                let verdict = verdict.map_or_else(|| "-".to_owned(), |v| self.verdict_cell(&v));
                self.row(&[
                    &table_time(&text(&record["time"])),
                    pod,
                    &pid,
                    &text(&record["process"]["comm"]),
                    &protocol,
                    &text(&record["src"]),
                    &text(&record["dst"]),
                    &name,
                    &verdict,
                    &outcome,
                ])
            }
        }
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    fn json_line(&mut self, record: &impl Serialize) -> io::Result<()> {
        serde_json::to_writer(&mut self.out, record)?;
        writeln!(self.out)
    }

    fn header(&mut self) -> io::Result<()> {
        if !self.header_written {
            let header: Vec<&str> = TABLE_COLUMNS.iter().map(|(name, _)| *name).collect();
            self.row(&header)?;
            self.header_written = true;
        }
        Ok(())
    }

    /// `hop/reason`, padded to its column and coloured on a terminal: green for
    /// success, red for a failure, yellow for a likely one.
    fn verdict_cell(&self, verdict: &Verdict) -> String {
        let text = verdict_text(verdict);
        if !self.color {
            return text;
        }
        let color = match (verdict.hop, verdict.likely) {
            (Hop::None, _) => "32",
            (_, true) => "33",
            (_, false) => "31",
        };
        let width = VERDICT_WIDTH;
        format!("\x1b[{color}m{text:<width$}\x1b[0m")
    }

    fn row(&mut self, cells: &[&str]) -> io::Result<()> {
        let mut line = String::new();
        for ((_, width), cell) in TABLE_COLUMNS.iter().zip(cells) {
            if *width == 0 {
                line.push_str(cell);
            } else {
                // Escape codes take no room on screen: pad by visible width.
                let visible = visible_width(cell);
                line.push_str(cell);
                line.push_str(&" ".repeat(width.saturating_sub(visible) + 1));
            }
        }
        writeln!(self.out, "{}", line.trim_end())
    }
}

/// Characters on screen, without ANSI colour sequences.
fn visible_width(text: &str) -> usize {
    let mut width = 0;
    let mut in_escape = false;
    for c in text.chars() {
        match (in_escape, c) {
            (false, '\x1b') => in_escape = true,
            (true, 'm') => in_escape = false,
            (true, _) => {}
            (false, _) => width += 1,
        }
    }
    width
}

/// `hop/reason`, marked when only likely.
fn verdict_text(verdict: &Verdict) -> String {
    let likely = if verdict.likely { " (likely)" } else { "" };
    format!("{}/{}{likely}", verdict.hop.as_str(), verdict.reason)
}

/// `HH:MM:SS.micros` of an RFC 3339 time (the date is noise in a live table).
fn table_time(rfc3339: &str) -> String {
    rfc3339.get(11..26).unwrap_or(rfc3339).to_owned()
}

/// The outcome with its most telling detail, e.g. `established 1.2ms`,
/// `timeout after 2 SYN retransmits`, `unreachable EHOSTUNREACH`.
fn outcome_text(record: &AttemptRecord<'_>) -> String {
    let mut text = record.outcome.as_str().to_owned();
    if let Some(icmp) = &record.icmp {
        text.push_str(&format!(" (ICMP {} from {})", icmp.meaning, icmp.from));
    }
    if let Some(drop) = &record.drop {
        text.push_str(&format!(
            " ({}× dropped: {} at {})",
            drop.count, drop.reason, drop.location
        ));
    }
    let Some(tcp) = &record.tcp else { return text };
    match record.outcome {
        Outcome::Established => {
            if let Some(ms) = tcp.handshake_ms {
                text.push_str(&format!(" {ms:.1}ms"));
            }
        }
        Outcome::Unreachable | Outcome::Failed => {
            if let Some(error) = &tcp.error {
                text.push_str(&format!(" {error}"));
            }
        }
        _ => {}
    }
    if tcp.syn_retransmits > 0 {
        text.push_str(&format!(" after {} SYN retransmits", tcp.syn_retransmits));
    }
    text
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::flow::Origin;

    fn attempt(pod: Option<&str>) -> Attempt {
        Attempt {
            monotonic_ns: 5_000_000_000,
            origin: Arc::new(Origin {
                pod: pod.map(str::to_owned),
                pod_uid: pod.map(|_| "6f1c2a3b-4d5e-4f60-8a9b-0c1d2e3f4a5b".to_owned()),
                container: None,
            }),
            pid: 4242,
            comm: "curl".into(),
            cgroup_id: 77,
            sock_cookie: 9,
            protocol: Protocol::Tcp,
            src: Some("10.244.0.5:41234".parse().unwrap()),
            dst: "203.0.113.10:80".parse().unwrap(),
            dst_name: Some("api.example.test".into()),
            outcome: Outcome::Established,
            tcp: Some(TcpHandshake {
                syn_retransmits: 0,
                duration: Some(std::time::Duration::from_micros(1500)),
                errno: None,
                closed_by_application: false,
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

    fn render(format: Format, attempts: &[Attempt]) -> String {
        let clock = MonotonicClock::new();
        let mut writer = Writer::new(Vec::new(), format, clock);
        for a in attempts {
            writer.write(a).unwrap();
        }
        String::from_utf8(writer.out).unwrap()
    }

    #[test]
    fn json_has_the_contract_fields() {
        let text = render(Format::Json, &[attempt(Some("shop/web"))]);
        let value: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(value["pod"], "shop/web");
        assert_eq!(
            value["process"],
            serde_json::json!({"pid": 4242, "comm": "curl"})
        );
        assert_eq!(value["protocol"], "tcp");
        assert_eq!(value["src"], "10.244.0.5:41234");
        assert_eq!(value["dst"], "203.0.113.10:80");
        assert_eq!(value["dst_name"], "api.example.test");
        assert_eq!(value["outcome"], "established");
        assert_eq!(
            value["tcp"],
            serde_json::json!({"syn_retransmits": 0, "handshake_ms": 1.5})
        );
        let time = value["time"].as_str().unwrap();
        assert!(humantime::parse_rfc3339(time).is_ok(), "{time}");
        assert_eq!(text.lines().count(), 1);
    }

    #[test]
    fn json_failed_handshake_names_error_and_closer() {
        let mut a = attempt(Some("shop/web"));
        a.outcome = Outcome::Unreachable;
        a.tcp = Some(TcpHandshake {
            syn_retransmits: 1,
            duration: Some(std::time::Duration::from_millis(1020)),
            errno: Some(113),
            closed_by_application: false,
        });
        let value: serde_json::Value =
            serde_json::from_str(render(Format::Json, &[a.clone()]).trim_end()).unwrap();
        assert_eq!(value["outcome"], "unreachable");
        assert_eq!(
            value["tcp"],
            serde_json::json!({"syn_retransmits": 1, "handshake_ms": 1020.0,
                               "error": "EHOSTUNREACH", "closed_by": "kernel"})
        );
        let table = render(Format::Table, &[a]);
        assert!(
            table
                .lines()
                .nth(1)
                .unwrap()
                .ends_with("unreachable EHOSTUNREACH after 1 SYN retransmits"),
            "{table}"
        );
    }

    #[test]
    fn icmp_error_is_shown_with_its_sender() {
        let mut a = attempt(Some("shop/web"));
        a.outcome = Outcome::Unreachable;
        a.icmp = Some(IcmpError {
            v6: false,
            icmp_type: 3,
            code: 13,
            sender: "198.51.100.1".parse().unwrap(),
            mtu: None,
        });
        let value: serde_json::Value =
            serde_json::from_str(render(Format::Json, &[a.clone()]).trim_end()).unwrap();
        assert_eq!(
            value["icmp"],
            serde_json::json!({"protocol": "icmp", "type": 3, "code": 13,
                               "meaning": "admin-prohibited", "from": "198.51.100.1"})
        );
        let table = render(Format::Table, &[a]);
        assert!(
            table.contains("unreachable (ICMP admin-prohibited from 198.51.100.1)"),
            "{table}"
        );
    }

    #[test]
    fn table_and_json_name_outcomes_alike() {
        let outcomes = [
            Outcome::Established,
            Outcome::Refused,
            Outcome::Timeout,
            Outcome::Unreachable,
            Outcome::Aborted,
            Outcome::Failed,
            Outcome::Sent,
            Outcome::InProgress,
        ];
        for outcome in outcomes {
            assert_eq!(serde_json::to_value(outcome).unwrap(), outcome.as_str());
        }
        let results = [
            LookupResult::Resolved,
            LookupResult::Nxdomain,
            LookupResult::Servfail,
            LookupResult::Refused,
            LookupResult::NoAnswer,
            LookupResult::Timeout,
            LookupResult::Malformed,
            LookupResult::Failed,
        ];
        for result in results {
            assert_eq!(serde_json::to_value(result).unwrap(), result.as_str());
        }
    }

    #[test]
    fn udp_records_have_no_tcp_object() {
        let mut a = attempt(None);
        a.protocol = Protocol::Udp;
        a.outcome = Outcome::Sent;
        a.tcp = None;
        let value: serde_json::Value =
            serde_json::from_str(render(Format::Json, &[a]).trim_end()).unwrap();
        assert_eq!(
            (value["protocol"].as_str(), value["outcome"].as_str()),
            (Some("udp"), Some("sent"))
        );
        assert!(value.get("tcp").is_none());
    }

    #[test]
    fn json_host_process_has_null_pod_and_ipv6_brackets() {
        let mut a = attempt(None);
        a.src = None;
        a.dst = "[2001:db8::10]:443".parse().unwrap();
        let value: serde_json::Value =
            serde_json::from_str(render(Format::Json, &[a]).trim_end()).unwrap();
        assert_eq!(value["pod"], serde_json::Value::Null);
        assert_eq!(value["src"], serde_json::Value::Null);
        assert_eq!(value["dst"], "[2001:db8::10]:443");
    }

    #[test]
    fn table_has_one_header_and_aligned_rows() {
        let text = render(Format::Table, &[attempt(Some("shop/web")), attempt(None)]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("TIME"));
        let dst_column = lines[0].find("DST").unwrap();
        assert_eq!(lines[1].find("203.0.113.10:80"), Some(dst_column));
        assert_eq!(lines[2].find("203.0.113.10:80"), Some(dst_column));
        assert!(
            lines[1].contains("shop/web") && lines[1].contains("4242") && lines[1].contains("curl")
        );
        assert!(lines[2].contains("(host)"));
    }

    fn with_verdict(mut a: Attempt, hop: Hop, reason: &str, likely: bool) -> Attempt {
        a.verdict = Some(Box::new(Verdict {
            hop,
            reason: reason.to_owned().into(),
            symptom: None,
            likely,
            summary: String::new(),
            evidence: Vec::new(),
            policy: None,
            next_steps: Vec::new(),
        }));
        a
    }

    #[test]
    fn failures_only_skips_successes() {
        let ok = with_verdict(attempt(Some("shop/web")), Hop::None, "ok", false);
        let mut failed = with_verdict(
            attempt(Some("shop/web")),
            Hop::Upstream,
            "silent-drop",
            false,
        );
        failed.outcome = Outcome::Timeout;
        let mut writer =
            Writer::new(Vec::new(), Format::Json, MonotonicClock::new()).failures_only(true);
        writer.write(&ok).unwrap();
        writer.write(&failed).unwrap();
        let text = String::from_utf8(writer.out).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains("\"silent-drop\""), "{text}");
    }

    #[test]
    fn colours_keep_the_columns_aligned() {
        let ok = with_verdict(attempt(Some("shop/web")), Hop::None, "ok", false);
        let likely = with_verdict(attempt(Some("shop/web")), Hop::Endpoint, "refused", true);
        let mut writer =
            Writer::new(Vec::new(), Format::Table, MonotonicClock::new()).with_color(true);
        writer.write(&ok).unwrap();
        writer.write(&likely).unwrap();
        let text = String::from_utf8(writer.out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[1].contains("\x1b[32mnone/ok"), "{text}");
        assert!(
            lines[2].contains("\x1b[33mendpoint/refused (likely)"),
            "{text}"
        );
        // The OUTCOME column starts at the same screen position on every line.
        let outcome_at = |line: &str| {
            visible_width(
                &line[..line
                    .find("established")
                    .or_else(|| line.find("OUTCOME"))
                    .unwrap()],
            )
        };
        assert_eq!(outcome_at(lines[0]), outcome_at(lines[1]));
        assert_eq!(outcome_at(lines[1]), outcome_at(lines[2]));
    }
}
