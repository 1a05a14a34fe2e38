//! The agent's Prometheus metrics (prometheus-client, OpenMetrics text).
//!
//! Every label is bounded: `namespace` and `pod` by the pods on the node (series of a
//! deleted pod are removed [`PRUNE_AFTER`] after it disappears, so a last scrape sees
//! their final values; `--no-pod-label` keeps the namespace only), and every other label
//! by a fixed set of values (`dst_class`, `outcome`, `hop`, `reason`, `rcode`, `qtype`,
//! `server`, `kind`, `program`). Processes outside any known pod count under empty
//! `namespace` and `pod`.
//!
//! Connection counts and SYN retransmissions come from the kernel's `HANDSHAKES` map,
//! and event totals and losses from its counters: they stay exact when the ring buffer
//! overflows. The rest is derived from the events received.

use std::{
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use foldhash::{HashMap, HashSet};
use histogram::BucketedHistogram;
use prometheus_client::{
    encoding::text,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
        info::Info,
    },
    registry::Registry,
};
use tracer_common::{
    AF_INET, DNS_DURATION_BUCKETS, DNS_DURATION_FIRST_BOUND_NS, DnsRepeatKey, DnsRepeatTotals,
    HandshakeKey, HandshakeTotals,
};

use crate::{
    capture::{KernelCounters, Totals, socket_addr},
    cluster::ClusterState,
    conntrack::{ConntrackStats, NodeConntrack},
    dns::{LookupResult, QueryOutcome, rcode_name},
    flow::{Origin, Outcome, Protocol},
    pipeline::Record,
    verdict::{Hop, Verdict},
};

mod histogram;

/// How long the series of a pod that left the node are kept.
pub const PRUNE_AFTER: Duration = Duration::from_secs(300);
/// Handshake and DNS summary keys unchanged for this many reads are removed from the
/// kernel map.
const IDLE_READS_BEFORE_FORGET: u32 = 30;

/// A label set: `namespace` (and `pod`) first, then the metric's own labels.
type Labels = Vec<(&'static str, String)>;

/// Where a destination is, for `dst_class`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DstClass {
    /// A pod, a Service or an EndpointSlice backend known to the cluster model.
    Cluster,
    /// A private, shared, link-local or loopback address (the VNet and its peers).
    Vnet,
    /// Anything else.
    Internet,
}

impl DstClass {
    pub fn of(ip: IpAddr, cluster: &ClusterState) -> Self {
        if cluster.is_cluster_address(ip) {
            return Self::Cluster;
        }
        let private = match ip {
            IpAddr::V4(v4) => {
                let [a, b, ..] = v4.octets();
                v4.is_private()
                    || v4.is_loopback()
                    || v4.is_link_local()
                    // 100.64.0.0/10, shared address space (carrier-grade NAT, some overlays).
                    || (a == 100 && (64..128).contains(&b))
            }
            IpAddr::V6(v6) => {
                let first = v6.segments()[0];
                v6.is_loopback()
                    || (first & 0xfe00) == 0xfc00
                    || (first & 0xffc0) == 0xfe80
                    || v6
                        .to_ipv4_mapped()
                        .is_some_and(|v4| Self::of(v4.into(), cluster) != Self::Internet)
            }
        };
        if private { Self::Vnet } else { Self::Internet }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cluster => "cluster",
            Self::Vnet => "vnet",
            Self::Internet => "internet",
        }
    }
}

/// What the metrics need to know besides the records.
#[derive(Clone, Debug, Default)]
pub struct MetricsOptions {
    /// Label per pod (`false`: per namespace only, for large clusters).
    pub pod_label: bool,
    /// The DNS servers the node itself uses (what the cluster DNS forwards to), for
    /// `server="upstream"`.
    pub upstream_dns: Vec<IpAddr>,
    /// The running kernel's release, for `egress_tracer_build_info`.
    pub kernel: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum PerPod {
    Connections,
    ConnectDuration,
    DnsQueries,
    DnsDuration,
    DnsTimeouts,
    Drops,
    SynRetransmits,
    Verdicts,
}

pub struct Metrics {
    registry: Registry,
    options: MetricsOptions,
    connections: Family<Labels, Counter>,
    connect_duration: Family<Labels, Histogram>,
    dns_queries: Family<Labels, Counter>,
    dns_duration: Family<Labels, BucketedHistogram>,
    dns_timeouts: Family<Labels, Counter>,
    drops: Family<Labels, Counter>,
    syn_retransmits: Family<Labels, Counter>,
    verdicts: Family<Labels, Counter>,
    conntrack_entries: Gauge,
    conntrack_limit: Gauge,
    conntrack_failures: Family<Labels, Counter>,
    snat_ports_in_use: Family<Labels, Gauge>,
    events: Family<Labels, Counter>,
    events_lost: Family<Labels, Counter>,
    events_skipped: Family<Labels, Counter>,
    discarded: Family<Labels, Counter>,
    cluster_cache_stale: Gauge,
    /// The series of each `namespace/pod` (or namespace), for pruning.
    series: HashMap<String, HashMap<PerPod, HashSet<Labels>>>,
    /// When each pod with series was first missing from the cluster model.
    missing_since: HashMap<String, Instant>,
    kernel_seen: KernelCounters,
    discarded_seen: HashMap<&'static str, u64>,
    conntrack_seen: Option<ConntrackStats>,
    handshakes_seen: TotalsSeen<HandshakeKey, HandshakeTotals>,
    dns_repeats_seen: TotalsSeen<DnsRepeatKey, DnsRepeatTotals>,
}

impl Metrics {
    pub fn new(options: MetricsOptions) -> Self {
        let mut registry = Registry::default();
        let connections = Family::default();
        registry.register(
            "egress_connections",
            "TCP connection attempts by outcome and destination class (counted in the kernel)",
            connections.clone(),
        );
        let connect_duration =
            Family::<Labels, Histogram>::new_with_constructor(connect_buckets as fn() -> _);
        registry.register(
            "egress_connect_duration_seconds",
            "Time from connect() to an established connection",
            connect_duration.clone(),
        );
        let dns_queries = Family::default();
        registry.register(
            "egress_dns_queries",
            "DNS queries by response code (TIMEOUT: none in time), type and server class",
            dns_queries.clone(),
        );
        let dns_duration =
            Family::<Labels, BucketedHistogram>::new_with_constructor(dns_buckets as fn() -> _);
        registry.register(
            "egress_dns_duration_seconds",
            "Time from a DNS query to its response",
            dns_duration.clone(),
        );
        let dns_timeouts = Family::default();
        registry.register(
            "egress_dns_timeouts",
            "DNS queries without a response within the resolver's timeout",
            dns_timeouts.clone(),
        );
        let drops = Family::default();
        registry.register(
            "egress_drops",
            "Packets of egress attempts dropped in the kernel, by the attempt's failing hop",
            drops.clone(),
        );
        let syn_retransmits = Family::default();
        registry.register(
            "egress_tcp_syn_retransmits",
            "SYN retransmissions of connection attempts (counted in the kernel)",
            syn_retransmits.clone(),
        );
        let verdicts = Family::default();
        registry.register(
            "egress_verdicts",
            "Failed attempts and lookups by the hop that failed them",
            verdicts.clone(),
        );
        let conntrack_entries = Gauge::default();
        registry.register(
            "egress_conntrack_entries",
            "Entries in the node's conntrack table",
            conntrack_entries.clone(),
        );
        let conntrack_limit = Gauge::default();
        registry.register(
            "egress_conntrack_limit",
            "Size limit of the node's conntrack table (nf_conntrack_max)",
            conntrack_limit.clone(),
        );
        let conntrack_failures = Family::default();
        registry.register(
            "egress_conntrack_failures",
            "The node's conntrack failures since boot (/proc/net/stat/nf_conntrack)",
            conntrack_failures.clone(),
        );
        let snat_ports_in_use = Family::default();
        registry.register(
            "egress_snat_ports_in_use",
            "Source-NATed flows on the node by destination class",
            snat_ports_in_use.clone(),
        );
        let events = Family::default();
        registry.register(
            "egress_events",
            "Events produced by the kernel programs, by kind",
            events.clone(),
        );
        let events_lost = Family::default();
        registry.register(
            "egress_events_lost",
            "Events lost to a full ring buffer, or handshakes not counted for a full map",
            events_lost.clone(),
        );
        let discarded = Family::default();
        registry.register(
            "egress_userspace_discarded",
            "Evidence the agent's userspace discarded, by reason: what it could not decode or \
             match, and what its bounds made it drop or report early",
            discarded.clone(),
        );
        let events_skipped = Family::default();
        registry.register(
            "egress_events_skipped",
            "Runs of a tracing program the kernel skipped because it was already running on \
             that CPU (its events are lost too)",
            events_skipped.clone(),
        );
        let cluster_cache_stale = Gauge::default();
        registry.register(
            "egress_cluster_cache_stale",
            "1 while the cluster model cannot be refreshed from the Kubernetes API",
            cluster_cache_stale.clone(),
        );
        registry.register(
            "egress_tracer_build",
            "The tracer's version and the node's kernel",
            Info::new(vec![
                ("version", env!("CARGO_PKG_VERSION").to_owned()),
                ("kernel", options.kernel.clone()),
            ]),
        );
        Self {
            registry,
            options,
            connections,
            connect_duration,
            dns_queries,
            dns_duration,
            dns_timeouts,
            drops,
            syn_retransmits,
            verdicts,
            conntrack_entries,
            conntrack_limit,
            conntrack_failures,
            snat_ports_in_use,
            events,
            events_lost,
            events_skipped,
            discarded,
            cluster_cache_stale,
            series: HashMap::default(),
            missing_since: HashMap::default(),
            kernel_seen: KernelCounters::default(),
            discarded_seen: HashMap::default(),
            conntrack_seen: None,
            handshakes_seen: TotalsSeen::default(),
            dns_repeats_seen: TotalsSeen::default(),
        }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }

    /// Counts finished records. Like [`queries`](Self::queries), each series is looked up
    /// once per call, however many of the records fall into it.
    pub fn records(&mut self, records: &[Record], cluster: &ClusterState) {
        // Series keys start with the origin's address: every record of a cgroup shares it.
        let mut durations: HashMap<(*const Origin, DstClass), (&Origin, Vec<f64>)> =
            HashMap::default();
        let mut verdicts = VerdictSeries::default();
        let mut drops = VerdictSeries::default();
        for record in records {
            match record {
                Record::Attempt(attempt) => {
                    let origin = attempt.origin.as_ref();
                    if let (Protocol::Tcp, Outcome::Established, Some(duration)) = (
                        attempt.protocol,
                        attempt.outcome,
                        attempt.tcp.as_ref().and_then(|t| t.duration),
                    ) {
                        let class = DstClass::of(attempt.dst.ip(), cluster);
                        durations
                            .entry((origin, class))
                            .or_insert_with(|| (origin, Vec::new()))
                            .1
                            .push(duration.as_secs_f64());
                    }
                    if let Some(verdict) = &attempt.verdict {
                        if let Some(dropped) = &attempt.drops {
                            drops.add(origin, verdict, u64::from(dropped.count));
                        }
                        if verdict.hop != Hop::None {
                            verdicts.add(origin, verdict, 1);
                        }
                    }
                }
                Record::Lookup {
                    lookup,
                    origin,
                    verdict,
                } => {
                    // A lookup fails as a whole; its single queries are counted in `query`.
                    if lookup.result != LookupResult::Resolved && verdict.hop != Hop::None {
                        verdicts.add(origin, verdict, 1);
                    }
                }
            }
        }
        for ((_, class), (origin, seconds)) in durations {
            let labels = self.labels(origin, [("dst_class", class.as_str())]);
            self.touch(PerPod::ConnectDuration, origin, &labels);
            let histogram = self.connect_duration.get_or_create(&labels);
            for duration in seconds {
                histogram.observe(duration);
            }
        }
        for ((_, hop, reason), (origin, count)) in drops.0 {
            let labels = self.labels(origin, [("hop", hop.as_str()), ("reason", reason)]);
            self.touch(PerPod::Drops, origin, &labels);
            self.drops.get_or_create(&labels).inc_by(count);
        }
        for ((_, hop, reason), (origin, count)) in verdicts.0 {
            let labels = self.labels(origin, [("hop", hop.as_str()), ("reason", reason)]);
            self.touch(PerPod::Verdicts, origin, &labels);
            self.verdicts.get_or_create(&labels).inc_by(count);
        }
    }

    /// Counts DNS queries' ends. Between two calls a busy node ends thousands of queries
    /// that fall into a handful of series: each series is looked up once per call.
    pub fn queries(&mut self, queries: &[(QueryOutcome, Arc<Origin>)], cluster: &ClusterState) {
        // (origin, rcode, qtype, server) → the origin, how many, their durations.
        type Series<'a> = (&'a Origin, u64, Vec<f64>);
        let mut series: HashMap<(*const Origin, &str, &str, &str), Series> = HashMap::default();
        for (query, origin) in queries {
            let rcode = query.rcode.as_deref().map_or(TIMEOUT, bounded_rcode);
            let key = (
                Arc::as_ptr(origin),
                rcode,
                bounded_qtype(&query.qtype),
                self.server_class(query.server, cluster),
            );
            let (_, count, durations) = series
                .entry(key)
                .or_insert_with(|| (origin.as_ref(), 0, Vec::new()));
            *count += 1;
            if query.rcode.is_some() {
                durations.push(query.duration.as_secs_f64());
            }
        }
        for ((_, rcode, qtype, server), (origin, count, durations)) in series {
            let labels = self.labels(
                origin,
                [("rcode", rcode), ("qtype", qtype), ("server", server)],
            );
            self.touch(PerPod::DnsQueries, origin, &labels);
            self.dns_queries.get_or_create(&labels).inc_by(count);
            if rcode == TIMEOUT {
                let pod = self.labels(origin, []);
                self.touch(PerPod::DnsTimeouts, origin, &pod);
                self.dns_timeouts.get_or_create(&pod).inc_by(count);
            } else {
                let labels = self.labels(origin, [("server", server)]);
                self.touch(PerPod::DnsDuration, origin, &labels);
                let histogram = self.dns_duration.get_or_create(&labels);
                for duration in durations {
                    histogram.observe(duration);
                }
            }
        }
    }

    fn server_class(&self, server: IpAddr, cluster: &ClusterState) -> &'static str {
        // NodeLocal DNSCache listens on this link-local address on every node.
        const NODE_LOCAL_DNS: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(169, 254, 20, 10));
        let cluster_dns = cluster
            .cluster_dns()
            .is_some_and(|dns| dns.cluster_ips.contains(&server));
        if cluster_dns || server == NODE_LOCAL_DNS {
            "cluster"
        } else if self.options.upstream_dns.contains(&server) {
            "upstream"
        } else {
            "other"
        }
    }

    /// Adds what the kernel counted since the last call to the connection counters, and
    /// returns the keys idle long enough to be removed from the kernel map (call
    /// [`forgotten`](Self::forgotten) once they are).
    pub fn handshakes(
        &mut self,
        totals: &[(HandshakeKey, HandshakeTotals)],
        mut origin_of: impl FnMut(u64) -> Arc<Origin>,
        cluster: &ClusterState,
    ) -> Vec<HandshakeKey> {
        let mut idle = Vec::new();
        for (key, now) in totals {
            let Some(added) = self.handshakes_seen.added(*key, now, &mut idle) else {
                continue;
            };
            let origin = origin_of(key.cgroup_id);
            let class = DstClass::of(handshake_address(key), cluster);
            let outcome = Outcome::of_handshake(key.outcome).as_str();
            let labels = self.labels(
                &origin,
                [("outcome", outcome), ("dst_class", class.as_str())],
            );
            self.touch(PerPod::Connections, &origin, &labels);
            self.connections
                .get_or_create(&labels)
                .inc_by(added.handshakes);
            if added.syn_retransmits > 0 {
                let labels = self.labels(&origin, []);
                self.touch(PerPod::SynRetransmits, &origin, &labels);
                self.syn_retransmits
                    .get_or_create(&labels)
                    .inc_by(added.syn_retransmits);
            }
        }
        idle
    }

    /// Adds the DNS exchanges the kernel summarised since the last call to the DNS query
    /// counters and durations (`qtype_of`: the type of a cgroup's query by hash), and
    /// returns the keys idle long enough to be removed from the kernel map (call
    /// [`forgotten_dns_repeats`](Self::forgotten_dns_repeats) once they are).
    pub fn dns_repeats(
        &mut self,
        totals: &[(DnsRepeatKey, DnsRepeatTotals)],
        mut origin_of: impl FnMut(u64) -> Arc<Origin>,
        mut qtype_of: impl FnMut(u64, u64) -> Option<String>,
        cluster: &ClusterState,
    ) -> Vec<DnsRepeatKey> {
        let mut idle = Vec::new();
        for (key, now) in totals {
            let Some(added) = self.dns_repeats_seen.added(*key, now, &mut idle) else {
                continue;
            };
            let Some(server) = socket_addr(&key.server) else {
                continue;
            };
            let origin = origin_of(key.cgroup_id);
            let qtype = qtype_of(key.cgroup_id, key.query_hash);
            let qtype = qtype.as_deref().map_or("unknown", bounded_qtype);
            let rcode = bounded_rcode(&rcode_name(key.rcode.into()));
            let server = self.server_class(server.ip(), cluster);
            let labels = self.labels(
                &origin,
                [("rcode", rcode), ("qtype", qtype), ("server", server)],
            );
            self.touch(PerPod::DnsQueries, &origin, &labels);
            self.dns_queries
                .get_or_create(&labels)
                .inc_by(added.exchanges);
            let labels = self.labels(&origin, [("server", server)]);
            self.touch(PerPod::DnsDuration, &origin, &labels);
            self.dns_duration.get_or_create(&labels).add_bucketed(
                key.bucket.into(),
                added.exchanges,
                added.duration_ns as f64 / 1e9,
            );
        }
        idle
    }

    /// The keys [`dns_repeats`](Self::dns_repeats) returned are gone from the kernel map.
    pub fn forgotten_dns_repeats(&mut self, keys: &[DnsRepeatKey]) {
        self.dns_repeats_seen.forget(keys);
    }

    /// The keys [`handshakes`](Self::handshakes) returned are gone from the kernel map.
    pub fn forgotten(&mut self, keys: &[HandshakeKey]) {
        self.handshakes_seen.forget(keys);
    }

    /// The kernel's event counters (totals since the programs were loaded).
    pub fn kernel(&mut self, counters: &KernelCounters) {
        for ((program, seen, lost), (_, seen_before, lost_before)) in counters
            .by_program()
            .into_iter()
            .zip(self.kernel_seen.by_program())
        {
            let labels = vec![("kind", program.to_owned())];
            self.events
                .get_or_create(&labels)
                .inc_by(seen.saturating_sub(seen_before));
            let labels = vec![("program", program.to_owned())];
            self.events_lost
                .get_or_create(&labels)
                .inc_by(lost.saturating_sub(lost_before));
        }
        for ((program, skipped), (_, skipped_before)) in counters
            .skipped_by_program()
            .into_iter()
            .zip(self.kernel_seen.skipped_by_program())
        {
            self.events_skipped
                .get_or_create(&vec![("program", program.to_owned())])
                .inc_by(skipped.saturating_sub(skipped_before));
        }
        let labels = vec![("program", "handshake_counts".to_owned())];
        self.events_lost.get_or_create(&labels).inc_by(
            counters
                .handshakes_uncounted
                .saturating_sub(self.kernel_seen.handshakes_uncounted),
        );
        self.kernel_seen = *counters;
    }

    /// What userspace discarded, as totals by reason since the agent started.
    pub fn discarded(&mut self, totals: &[(&'static str, u64)]) {
        for &(reason, total) in totals {
            let before = self.discarded_seen.insert(reason, total).unwrap_or(0);
            self.discarded
                .get_or_create(&vec![("reason", reason.to_owned())])
                .inc_by(total.saturating_sub(before));
        }
    }

    /// The node's conntrack table and SNAT usage.
    pub fn conntrack(&mut self, node: &NodeConntrack, cluster: &ClusterState) {
        if let Some(stats) = node.stats {
            self.conntrack_entries.set(stats.entries as i64);
            self.conntrack_limit.set(stats.limit as i64);
            let before = self.conntrack_seen.unwrap_or_default();
            for (kind, now, then) in [
                ("insert_failed", stats.insert_failed, before.insert_failed),
                ("drop", stats.drop, before.drop),
                ("early_drop", stats.early_drop, before.early_drop),
                ("invalid", stats.invalid, before.invalid),
            ] {
                self.conntrack_failures
                    .get_or_create(&vec![("kind", kind.to_owned())])
                    .inc_by(now.saturating_sub(then));
            }
            self.conntrack_seen = Some(stats);
        }
        if let Some(snat) = &node.snat {
            let mut by_class = [0i64; 3];
            for (dst, in_use) in snat.destinations() {
                by_class[DstClass::of(dst.ip(), cluster) as usize] += i64::from(in_use);
            }
            for class in [DstClass::Cluster, DstClass::Vnet, DstClass::Internet] {
                self.snat_ports_in_use
                    .get_or_create(&vec![("dst_class", class.as_str().to_owned())])
                    .set(by_class[class as usize]);
            }
        }
    }

    pub fn cluster_stale(&self, stale: bool) {
        self.cluster_cache_stale.set(i64::from(stale));
    }

    /// Removes the series of pods gone from the cluster model for [`PRUNE_AFTER`].
    pub fn prune(&mut self, cluster: &ClusterState, now: Instant) {
        if !self.options.pod_label {
            return;
        }
        let present: HashSet<String> = cluster.pods().iter().map(ToString::to_string).collect();
        self.missing_since.retain(|pod, _| !present.contains(pod));
        let mut gone = Vec::new();
        for pod in self.series.keys().filter(|pod| !present.contains(*pod)) {
            let since = *self.missing_since.entry(pod.clone()).or_insert(now);
            if now.duration_since(since) >= PRUNE_AFTER {
                gone.push(pod.clone());
            }
        }
        for pod in gone {
            self.missing_since.remove(&pod);
            let families = self.series.remove(&pod).unwrap_or_default();
            for (family, labels) in families
                .into_iter()
                .flat_map(|(family, set)| set.into_iter().map(move |labels| (family, labels)))
            {
                match family {
                    PerPod::Connections => self.connections.remove(&labels),
                    PerPod::ConnectDuration => self.connect_duration.remove(&labels),
                    PerPod::DnsQueries => self.dns_queries.remove(&labels),
                    PerPod::DnsDuration => self.dns_duration.remove(&labels),
                    PerPod::DnsTimeouts => self.dns_timeouts.remove(&labels),
                    PerPod::Drops => self.drops.remove(&labels),
                    PerPod::SynRetransmits => self.syn_retransmits.remove(&labels),
                    PerPod::Verdicts => self.verdicts.remove(&labels),
                };
            }
        }
    }

    /// Remembers a per-pod series so it can be pruned with its pod.
    fn touch(&mut self, family: PerPod, origin: &Origin, labels: &Labels) {
        // Pods without a name (host processes, unknown pods) are never pruned.
        let Some(pod) = origin.pod.as_deref().filter(|_| self.options.pod_label) else {
            return;
        };
        // Looked up before anything is allocated: nearly every series exists already.
        let known = self
            .series
            .get(pod)
            .and_then(|families| families.get(&family))
            .is_some_and(|set| set.contains(labels));
        if !known {
            self.series
                .entry(pod.to_owned())
                .or_default()
                .entry(family)
                .or_default()
                .insert(labels.clone());
        }
    }

    fn labels<const N: usize>(&self, origin: &Origin, extra: [(&'static str, &str); N]) -> Labels {
        let (namespace, pod) = origin
            .pod
            .as_deref()
            .and_then(|pod| pod.split_once('/'))
            .unwrap_or(("", ""));
        let mut labels = vec![("namespace", namespace.to_owned())];
        if self.options.pod_label {
            labels.push(("pod", pod.to_owned()));
        }
        labels.extend(extra.into_iter().map(|(k, v)| (k, v.to_owned())));
        labels
    }
}

/// Counts per (origin, hop, reason) series, keyed by the origin's address.
#[derive(Default)]
struct VerdictSeries<'a>(HashMap<(*const Origin, Hop, &'a str), (&'a Origin, u64)>);

impl<'a> VerdictSeries<'a> {
    fn add(&mut self, origin: &'a Origin, verdict: &'a Verdict, count: u64) {
        let key = (
            origin as *const Origin,
            verdict.hop,
            verdict.reason.as_ref(),
        );
        self.0.entry(key).or_insert((origin, 0)).1 += count;
    }
}

fn handshake_address(key: &HandshakeKey) -> IpAddr {
    if key.family == AF_INET {
        let [a, b, c, d, ..] = key.addr;
        IpAddr::from([a, b, c, d])
    } else {
        IpAddr::from(key.addr)
    }
}

/// The kernel's totals per key as last read, and for how many reads each stayed the same.
struct TotalsSeen<K, V> {
    seen: HashMap<K, (V, u32)>,
}

impl<K, V> Default for TotalsSeen<K, V> {
    fn default() -> Self {
        Self {
            seen: HashMap::default(),
        }
    }
}

impl<K: Copy + Eq + std::hash::Hash, V: Totals> TotalsSeen<K, V> {
    /// What `now` adds to the last read of `key`; `None` when nothing, and `key` goes
    /// into `idle` once it has stayed the same for [`IDLE_READS_BEFORE_FORGET`] reads.
    fn added(&mut self, key: K, now: &V, idle: &mut Vec<K>) -> Option<V> {
        let (before, idle_reads) = self.seen.entry(key).or_insert((V::default(), 0));
        let added = now.since(before);
        *before = *now;
        if added.is_zero() {
            *idle_reads += 1;
            if *idle_reads >= IDLE_READS_BEFORE_FORGET {
                idle.push(key);
            }
            return None;
        }
        *idle_reads = 0;
        Some(added)
    }

    /// The keys are gone from the kernel map: a key made again counts from zero.
    fn forget(&mut self, keys: &[K]) {
        for key in keys {
            self.seen.remove(key);
        }
    }
}

fn connect_buckets() -> Histogram {
    // 1 ms to about 131 s (the kernel's default SYN give-up time).
    Histogram::new(exponential_buckets(0.001, 2.0, 18))
}

fn dns_buckets() -> BucketedHistogram {
    // 0.5 ms to about 16 s, the buckets the kernel counts summarised exchanges in.
    BucketedHistogram::new(
        (0..DNS_DURATION_BUCKETS - 1).map(|i| (DNS_DURATION_FIRST_BOUND_NS << i) as f64 / 1e9),
    )
}

/// The `rcode` label of a query that got no response.
const TIMEOUT: &str = "TIMEOUT";

fn bounded_rcode(rcode: &str) -> &'static str {
    const KNOWN: [&str; 7] = [
        "NOERROR",
        "NXDOMAIN",
        "SERVFAIL",
        "REFUSED",
        "FORMERR",
        "NOTIMP",
        "MALFORMED",
    ];
    KNOWN.into_iter().find(|k| *k == rcode).unwrap_or("OTHER")
}

/// A query type as a label: a common type, `unknown` (a query the kernel summarised whose
/// question the agent no longer remembers), else `OTHER`.
fn bounded_qtype(qtype: &str) -> &'static str {
    const KNOWN: [&str; 13] = [
        "A", "AAAA", "CNAME", "SRV", "PTR", "MX", "TXT", "NS", "SOA", "HTTPS", "SVCB", "ANY",
        "unknown",
    ];
    KNOWN.into_iter().find(|k| *k == qtype).unwrap_or("OTHER")
}

#[cfg(test)]
mod tests {
    #[test]
    fn userspace_discards_are_counted_by_reason_from_totals() {
        let mut metrics = Metrics::new(MetricsOptions::default());
        metrics.discarded(&[("dns_answer_not_kept", 4), ("drop_unmatched", 0)]);
        metrics.discarded(&[("dns_answer_not_kept", 10), ("drop_unmatched", 2)]);
        let text = metrics.encode();
        assert!(
            text.contains("egress_userspace_discarded_total{reason=\"dns_answer_not_kept\"} 10\n"),
            "{text}"
        );
        assert!(
            text.contains("egress_userspace_discarded_total{reason=\"drop_unmatched\"} 2\n"),
            "{text}"
        );
    }

    use k8s_openapi::api::core::v1::{Pod, PodStatus};
    use kube::api::ObjectMeta;
    use tracer_common::{HANDSHAKE_ESTABLISHED, HANDSHAKE_REFUSED};

    use super::*;

    fn cluster_with(pods: &[(&str, &str, &str)]) -> ClusterState {
        ClusterState::from_pods(pods.iter().map(|(namespace, name, ip)| Pod {
            metadata: ObjectMeta {
                name: Some((*name).into()),
                namespace: Some((*namespace).into()),
                uid: Some(format!("uid-{name}")),
                ..ObjectMeta::default()
            },
            status: Some(PodStatus {
                pod_ip: Some((*ip).into()),
                ..PodStatus::default()
            }),
            ..Pod::default()
        }))
    }

    fn origin(pod: &str) -> Arc<Origin> {
        Arc::new(Origin {
            pod: Some(pod.into()),
            ..Origin::default()
        })
    }

    fn key(outcome: u8) -> HandshakeKey {
        HandshakeKey {
            cgroup_id: 42,
            addr: [203, 0, 113, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            family: AF_INET,
            outcome,
            _pad: [0; 5],
        }
    }

    fn totals(handshakes: u64, syn_retransmits: u64) -> HandshakeTotals {
        HandshakeTotals {
            handshakes,
            syn_retransmits,
        }
    }

    fn metrics(pod_label: bool) -> Metrics {
        Metrics::new(MetricsOptions {
            pod_label,
            upstream_dns: vec!["192.0.2.53".parse().unwrap()],
            kernel: "6.18.0".into(),
        })
    }

    /// The value of one series in the exposition.
    fn value(metrics: &Metrics, series: &str) -> Option<f64> {
        metrics.encode().lines().find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().unwrap())
        })
    }

    #[test]
    fn destination_classes() {
        let cluster = cluster_with(&[("shop", "db", "10.244.0.12")]);
        let class = |ip: &str| DstClass::of(ip.parse().unwrap(), &cluster);
        assert_eq!(class("10.244.0.12"), DstClass::Cluster);
        for vnet in [
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "169.254.169.254",
            "127.0.0.1",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
        ] {
            assert_eq!(class(vnet), DstClass::Vnet, "{vnet}");
        }
        for internet in [
            "203.0.113.10",
            "100.128.0.1",
            "2001:db8::1",
            "::ffff:8.8.8.8",
        ] {
            assert_eq!(class(internet), DstClass::Internet, "{internet}");
        }
    }

    #[test]
    fn kernel_handshake_totals_become_exact_counters() {
        let mut metrics = metrics(true);
        let cluster = ClusterState::default();
        let web = |_| origin("shop/web");
        let established = "egress_connections_total{namespace=\"shop\",pod=\"web\",outcome=\"established\",dst_class=\"internet\"}";
        let refused = "egress_connections_total{namespace=\"shop\",pod=\"web\",outcome=\"refused\",dst_class=\"internet\"}";
        let retransmits = "egress_tcp_syn_retransmits_total{namespace=\"shop\",pod=\"web\"}";
        metrics.handshakes(&[(key(HANDSHAKE_ESTABLISHED), totals(3, 1))], web, &cluster);
        assert_eq!(value(&metrics, established), Some(3.0));
        assert_eq!(value(&metrics, retransmits), Some(1.0));
        metrics.handshakes(
            &[
                (key(HANDSHAKE_ESTABLISHED), totals(5, 1)),
                (key(HANDSHAKE_REFUSED), totals(2, 0)),
            ],
            web,
            &cluster,
        );
        assert_eq!(value(&metrics, established), Some(5.0));
        assert_eq!(value(&metrics, refused), Some(2.0));
        assert_eq!(value(&metrics, retransmits), Some(1.0));
        // Idle keys are handed back for removal after enough unchanged reads, once.
        let mut idle = Vec::new();
        for _ in 0..IDLE_READS_BEFORE_FORGET {
            idle = metrics.handshakes(&[(key(HANDSHAKE_REFUSED), totals(2, 0))], web, &cluster);
        }
        assert_eq!(idle, [key(HANDSHAKE_REFUSED)]);
        metrics.forgotten(&idle);
        // A key made again after removal counts from zero, on top of what was counted.
        metrics.handshakes(&[(key(HANDSHAKE_REFUSED), totals(1, 0))], web, &cluster);
        assert_eq!(value(&metrics, refused), Some(3.0));
    }

    #[test]
    fn kernel_dns_summaries_add_to_the_query_counts_and_durations() {
        let mut metrics = metrics(true);
        let cluster = ClusterState::default();
        let web = |_| origin("shop/web");
        let key = |rcode: u8, bucket: u8| DnsRepeatKey {
            cgroup_id: 1,
            query_hash: 0xfeed,
            server: tracer_common::Endpoint {
                family: AF_INET,
                port: 53,
                addr: [192, 0, 2, 53, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            },
            rcode,
            bucket,
            _pad: [0; 2],
        };
        let totals = |exchanges, duration_ns| DnsRepeatTotals {
            exchanges,
            duration_ns,
        };
        let qtype_of = |cgroup, hash| (cgroup == 1 && hash == 0xfeed).then(|| "AAAA".to_owned());
        metrics.queries(
            &[(
                QueryOutcome {
                    cgroup_id: 1,
                    server: "192.0.2.53".parse().unwrap(),
                    qtype: "AAAA".into(),
                    rcode: Some("NOERROR".into()),
                    duration: Duration::from_micros(400),
                },
                origin("shop/web"),
            )],
            &cluster,
        );
        // 4 exchanges of 0.5-1 ms (bucket 1), 2 answered NXDOMAIN in 2-4 ms (bucket 3).
        let read = [
            (key(0, 1), totals(4, 3_000_000)),
            (key(3, 3), totals(2, 5_000_000)),
        ];
        assert!(
            metrics
                .dns_repeats(&read, web, qtype_of, &cluster)
                .is_empty()
        );
        let noerror = "egress_dns_queries_total{namespace=\"shop\",pod=\"web\",rcode=\"NOERROR\",qtype=\"AAAA\",server=\"upstream\"}";
        let nxdomain = "egress_dns_queries_total{namespace=\"shop\",pod=\"web\",rcode=\"NXDOMAIN\",qtype=\"AAAA\",server=\"upstream\"}";
        let duration = |part: &str| {
            format!(
                "egress_dns_duration_seconds_{part}{{namespace=\"shop\",pod=\"web\",server=\"upstream\""
            )
        };
        assert_eq!(value(&metrics, noerror), Some(5.0));
        assert_eq!(value(&metrics, nxdomain), Some(2.0));
        assert_eq!(value(&metrics, &(duration("count") + "}")), Some(7.0));
        let sum = value(&metrics, &(duration("sum") + "}")).unwrap();
        assert!((sum - 0.0084).abs() < 1e-9, "{sum}");
        for (le, count) in [
            ("0.0005", 1.0),
            ("0.001", 5.0),
            ("0.002", 5.0),
            ("0.004", 7.0),
        ] {
            let bucket = format!(
                "egress_dns_duration_seconds_bucket{{le=\"{le}\",namespace=\"shop\",pod=\"web\",server=\"upstream\"}}"
            );
            assert_eq!(value(&metrics, &bucket), Some(count), "{bucket}");
        }
        // Only what was added since the last read counts; a forgotten query type is
        // `unknown`.
        let read = [
            (key(0, 1), totals(5, 3_700_000)),
            (key(3, 3), totals(2, 5_000_000)),
        ];
        metrics.dns_repeats(&read, web, |_, _| None, &cluster);
        assert_eq!(value(&metrics, noerror), Some(5.0));
        let unknown = "egress_dns_queries_total{namespace=\"shop\",pod=\"web\",rcode=\"NOERROR\",qtype=\"unknown\",server=\"upstream\"}";
        assert_eq!(value(&metrics, unknown), Some(1.0));
        let mut idle = Vec::new();
        for _ in 0..IDLE_READS_BEFORE_FORGET {
            idle = metrics.dns_repeats(&read, web, qtype_of, &cluster);
        }
        assert_eq!(idle, [key(0, 1), key(3, 3)]);
    }

    #[test]
    fn dns_queries_by_server_class_and_bounded_labels() {
        let mut metrics = metrics(true);
        let mut manifests = crate::cluster::manifests::Manifests::default();
        let dns = "apiVersion: v1\nkind: Service\nmetadata: {name: kube-dns, namespace: kube-system}\n\
                   spec: {clusterIP: 10.0.0.10, ports: [{port: 53}]}\n";
        crate::cluster::manifests::load_text(std::path::Path::new("dns.yaml"), dns, &mut manifests);
        assert!(manifests.warnings.is_empty(), "{:?}", manifests.warnings);
        let cluster = ClusterState::from_manifests(manifests);
        let query = |server: &str, qtype: &'static str, rcode: Option<&'static str>| QueryOutcome {
            cgroup_id: 1,
            server: server.parse().unwrap(),
            qtype: qtype.into(),
            rcode: rcode.map(Into::into),
            duration: Duration::from_millis(2),
        };
        let web = origin("shop/web");
        metrics.queries(
            &[
                (query("10.0.0.10", "A", Some("NXDOMAIN")), web.clone()),
                (
                    query("192.0.2.53", "TYPE65534", Some("RCODE11")),
                    web.clone(),
                ),
                (query("198.51.100.7", "AAAA", None), web.clone()),
            ],
            &cluster,
        );
        let series = |rcode: &str, qtype: &str, server: &str| {
            format!(
                "egress_dns_queries_total{{namespace=\"shop\",pod=\"web\",rcode=\"{rcode}\",qtype=\"{qtype}\",server=\"{server}\"}}"
            )
        };
        assert_eq!(
            value(&metrics, &series("NXDOMAIN", "A", "cluster")),
            Some(1.0)
        );
        assert_eq!(
            value(&metrics, &series("OTHER", "OTHER", "upstream")),
            Some(1.0)
        );
        assert_eq!(
            value(&metrics, &series("TIMEOUT", "AAAA", "other")),
            Some(1.0)
        );
        assert_eq!(
            value(
                &metrics,
                "egress_dns_timeouts_total{namespace=\"shop\",pod=\"web\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &metrics,
                "egress_dns_duration_seconds_count{namespace=\"shop\",pod=\"web\",server=\"cluster\"}"
            ),
            Some(1.0)
        );
        // Alike queries of one batch add up in their series.
        let nxdomain = || (query("10.0.0.10", "A", Some("NXDOMAIN")), web.clone());
        let timeout = (query("198.51.100.7", "AAAA", None), web.clone());
        metrics.queries(&[nxdomain(), nxdomain(), timeout], &cluster);
        assert_eq!(
            value(&metrics, &series("NXDOMAIN", "A", "cluster")),
            Some(3.0)
        );
        assert_eq!(
            value(
                &metrics,
                "egress_dns_timeouts_total{namespace=\"shop\",pod=\"web\"}"
            ),
            Some(2.0)
        );
        assert_eq!(
            value(
                &metrics,
                "egress_dns_duration_seconds_count{namespace=\"shop\",pod=\"web\",server=\"cluster\"}"
            ),
            Some(3.0)
        );
    }

    #[test]
    fn without_the_pod_label_series_are_per_namespace() {
        let mut metrics = metrics(false);
        let cluster = ClusterState::default();
        for pod in ["shop/web", "shop/api"] {
            metrics.handshakes(
                &[(key(HANDSHAKE_ESTABLISHED), totals(1, 0))],
                |_| origin(pod),
                &cluster,
            );
            metrics.forgotten(&[key(HANDSHAKE_ESTABLISHED)]);
        }
        assert_eq!(
            value(
                &metrics,
                "egress_connections_total{namespace=\"shop\",outcome=\"established\",dst_class=\"internet\"}"
            ),
            Some(2.0)
        );
        assert!(!metrics.encode().contains("pod=\""));
    }

    #[test]
    fn series_of_deleted_pods_are_pruned_after_a_grace_period() {
        let mut metrics = metrics(true);
        let present = cluster_with(&[("shop", "web", "10.244.0.10")]);
        let gone = ClusterState::default();
        metrics.handshakes(
            &[(key(HANDSHAKE_ESTABLISHED), totals(1, 0))],
            |_| origin("shop/web"),
            &present,
        );
        let series = "egress_connections_total{namespace=\"shop\",pod=\"web\",outcome=\"established\",dst_class=\"internet\"}";
        let start = Instant::now();
        metrics.prune(&present, start + PRUNE_AFTER * 2);
        assert_eq!(value(&metrics, series), Some(1.0));
        metrics.prune(&gone, start);
        metrics.prune(&gone, start + PRUNE_AFTER / 2);
        assert_eq!(value(&metrics, series), Some(1.0), "kept for a last scrape");
        metrics.prune(&gone, start + PRUNE_AFTER);
        assert_eq!(value(&metrics, series), None);
    }

    fn attempt(origin: &Arc<Origin>, outcome: Outcome, dropped: u32, hop: Hop) -> Record {
        let drop = crate::capture::PacketDrop {
            reason: "NETFILTER_DROP".into(),
            location: "nft_do_chain".into(),
            reply: false,
            src: None,
            dst: None,
            conntrack: crate::capture::PacketConntrack::Unknown,
            netns: None,
            netns_owner: None,
        };
        Record::Attempt(Box::new(crate::flow::Attempt {
            monotonic_ns: 0,
            origin: Arc::clone(origin),
            pid: 1,
            comm: "curl".into(),
            cgroup_id: 7,
            sock_cookie: 1,
            protocol: Protocol::Tcp,
            src: None,
            dst: "203.0.113.10:443".parse().unwrap(),
            dst_name: None,
            outcome,
            tcp: Some(crate::flow::TcpHandshake {
                syn_retransmits: 0,
                duration: Some(Duration::from_millis(2)),
                errno: None,
                closed_by_application: false,
            }),
            icmp: None,
            drops: (dropped > 0).then(|| {
                Box::new(crate::flow::Drops {
                    first: drop,
                    count: dropped,
                })
            }),
            nat: None,
            service: None,
            reply: None,
            snat: None,
            verdict: Some(Box::new(Verdict::for_check(
                hop,
                if hop == Hop::None { "ok" } else { "denied" },
                String::new(),
            ))),
        }))
    }

    #[test]
    fn records_of_a_batch_add_up_per_series() {
        let mut metrics = metrics(true);
        let cluster = ClusterState::default();
        let (web, db) = (origin("shop/web"), origin("shop/db"));
        let records = [
            attempt(&web, Outcome::Established, 0, Hop::None),
            attempt(&web, Outcome::Established, 0, Hop::None),
            attempt(&db, Outcome::Established, 0, Hop::None),
            attempt(&web, Outcome::Timeout, 3, Hop::NetworkPolicy),
            attempt(&web, Outcome::Timeout, 2, Hop::NetworkPolicy),
        ];
        metrics.records(&records, &cluster);
        // A second batch adds to the same series.
        metrics.records(&records[3..], &cluster);
        let web_labels = "namespace=\"shop\",pod=\"web\"";
        let duration = |pod: &str| {
            value(
                &metrics,
                &format!(
                    "egress_connect_duration_seconds_count{{namespace=\"shop\",pod=\"{pod}\",dst_class=\"internet\"}}"
                ),
            )
        };
        assert_eq!((duration("web"), duration("db")), (Some(2.0), Some(1.0)));
        let denied = format!("{web_labels},hop=\"network-policy\",reason=\"denied\"");
        assert_eq!(
            value(&metrics, &format!("egress_drops_total{{{denied}}}")),
            Some(10.0)
        );
        assert_eq!(
            value(&metrics, &format!("egress_verdicts_total{{{denied}}}")),
            Some(4.0)
        );
        // Successes are no verdict series.
        assert!(!metrics.encode().contains("reason=\"ok\""));
    }
}
