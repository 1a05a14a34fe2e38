//! From decoded kernel events to records: attributes events to pods, assembles attempts
//! ([`flow`](crate::flow)) and DNS lookups ([`dns`](crate::dns)), names destinations from
//! DNS answers and Services from the cluster model, and folds the resolver's own UDP
//! sockets into the lookups they carried.
//! (Sockets that carried DNS and were never reported as attempts, like TCP ones, are
//! forgotten once [`MAX_REMEMBERED`] is reached.)

use std::{borrow::Cow, fs, io, os::unix::fs::MetadataExt, sync::Arc, time::Duration};

use foldhash::{HashMap, HashSet};
use tracer_common::{DNS_EGRESS, DnsHeld, DnsHeldKey, IPPROTO_TCP, dns_message_hash};

use crate::{
    capture::{DecodeError, DnsCapture, KernelEvent, KernelNames, NetnsOwner, socket_addr},
    cluster::{ClusterState, PodInfo, cgroups::CgroupIndex},
    conntrack::{Translation, netlink, snat::SnatTable},
    dns::{self, DnsTracker, HeldQuery, Lookup, QueryOutcome, Resolver, SeenMessage},
    flow::{Attempt, ContainerRef, FlowAssembler, Origin, Protocol, ServiceTarget},
    node,
    policy::{self, Decision, Flow},
    verdict::{self, Hop, NodeFacts, Verdict},
};

/// Bound on remembered sockets that carried DNS and on cached search lists.
const MAX_REMEMBERED: usize = 65_536;
const DNS_PORT: u16 = 53;

/// A finished record.
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    // Boxed: both are large, and a record only passes through.
    Attempt(Box<Attempt>),
    Lookup {
        lookup: Box<Lookup>,
        origin: Arc<Origin>,
        verdict: Box<Verdict>,
    },
}

impl Record {
    /// Who made the attempt or the lookup.
    pub fn origin(&self) -> &Origin {
        match self {
            Record::Attempt(attempt) => &attempt.origin,
            Record::Lookup { origin, .. } => origin,
        }
    }

    /// The hop that failed it, `Hop::None` for a success.
    pub fn hop(&self) -> Hop {
        match self {
            Record::Attempt(attempt) => attempt.verdict.as_ref().map_or(Hop::None, |v| v.hop),
            Record::Lookup { verdict, .. } => verdict.hop,
        }
    }

    /// `CLOCK_MONOTONIC` nanoseconds of its start.
    pub fn monotonic_ns(&self) -> u64 {
        match self {
            Record::Attempt(attempt) => attempt.monotonic_ns,
            Record::Lookup { lookup, .. } => lookup.first_ns,
        }
    }
}

/// Counts kept by the pipeline itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PipelineStats {
    pub connects_received: u64,
    pub decode_errors: u64,
    /// Conntrack lookups of attempts' NAT that failed (other than "no such entry").
    pub nat_lookup_errors: u64,
}

/// ctnetlink cannot be used in the tracer's network namespace.
#[derive(Debug, thiserror::Error)]
#[error(
    "NAT translations will be missing: cannot look up conntrack entries over ctnetlink ({0}); \
     it needs CAP_NET_ADMIN and the nf_conntrack_netlink module"
)]
pub struct NatUnavailable(#[source] io::Error);

/// Which finished attempts have their NAT read from their conntrack entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NatLookups {
    /// Every attempt: each record shows its flow's translation.
    Every,
    /// Failed attempts only, whose verdicts need it. A lookup per successful connection
    /// would cost the node more than tracing the connection in the kernel does.
    Failed,
}

/// Reads attempts' NAT from their conntrack entries.
struct NatFinder {
    lookups: netlink::Lookups,
    which: NatLookups,
    errors: u64,
}

impl NatFinder {
    /// Fills in what the node's NAT made of `attempt`, from the conntrack entry of its
    /// tuple. The entry outlives the attempt's record by seconds at least: a failed or
    /// closed TCP flow's for 10 s (`CLOSE`) to 2 min (`SYN_SENT`, `TIME_WAIT`), a UDP
    /// flow's for 30 s.
    fn fill(&mut self, attempt: &mut Attempt) {
        let Some(src) = attempt.src else {
            return;
        };
        if self.which == NatLookups::Failed && !attempt.outcome.is_failure() {
            return;
        }
        match self
            .lookups
            .get(attempt.protocol.number(), src, attempt.dst)
        {
            Ok(entry) => {
                attempt.nat = entry
                    .as_ref()
                    .map(Translation::of)
                    .filter(|nat| nat.src.is_some() || nat.dst.is_some());
            }
            Err(_) => self.errors += 1,
        }
    }
}

pub struct Pipeline {
    flows: FlowAssembler,
    dns: DnsTracker,
    cgroups: CgroupIndex,
    cluster: ClusterState,
    /// Only this pod's events, when tracing one pod.
    target_uid: Option<String>,
    /// Sockets that carried DNS: their UDP/TCP attempts to port 53 are part of a lookup.
    dns_sockets: HashSet<u64>,
    /// TCP DNS streams (socket, direction) whose last segment was a lone length prefix.
    tcp_length_only: HashSet<(u64, u8)>,
    /// Resolver configurations read from the resolv.conf of a process in each cgroup.
    resolvers: HashMap<u64, Resolver>,
    /// (cgroup, process) whose resolv.conf could not be read.
    unreadable_resolvers: HashSet<(u64, u32)>,
    /// Origins of the pod cgroups seen since the cluster model last changed.
    origins: HashMap<u64, Arc<Origin>>,
    /// The origin of processes outside pods (and of pods not found).
    no_pod: Arc<Origin>,
    attempts: Vec<Box<Attempt>>,
    lookups: Vec<Lookup>,
    stats: PipelineStats,
    /// The latest SNAT port usage of the node.
    snat: Option<SnatTable>,
    nat: Option<NatFinder>,
    node: NodeFacts,
    /// Inode of the tracer's own network namespace (the node's).
    own_netns: Option<u64>,
    /// Hops to destinations, from the SYN-ACKs of connections to them.
    endpoint_hops: HashMap<std::net::IpAddr, u8>,
    /// The kernel summarises repeated DNS exchanges (see [`dns`]).
    dns_summaries: bool,
}

impl Pipeline {
    /// `dns_timeout`: how long a DNS query may wait for its response.
    pub fn new(
        cgroups: CgroupIndex,
        cluster: ClusterState,
        target: Option<&PodInfo>,
        dns_timeout: Duration,
    ) -> Self {
        Self {
            flows: FlowAssembler::new(),
            dns: DnsTracker::new(dns_timeout),
            cgroups,
            cluster,
            target_uid: target.map(|pod| pod.uid.clone()),
            dns_sockets: HashSet::default(),
            tcp_length_only: HashSet::default(),
            resolvers: HashMap::default(),
            unreadable_resolvers: HashSet::default(),
            origins: HashMap::default(),
            no_pod: Arc::default(),
            attempts: Vec::new(),
            lookups: Vec::new(),
            stats: PipelineStats::default(),
            snat: None,
            nat: None,
            node: NodeFacts::of_this_node(),
            own_netns: fs::metadata("/proc/self/ns/net").ok().map(|m| m.ino()),
            endpoint_hops: HashMap::default(),
            dns_summaries: false,
        }
    }

    /// The kernel summarises repeated DNS exchanges (`CaptureOptions::dns_summary_period`):
    /// the queries it sends are remembered by hash, to account for those it holds back.
    pub fn with_dns_summaries(mut self) -> Self {
        self.dns_summaries = true;
        self
    }

    /// Uses `resolver` for DNS messages of these cgroups instead of reading it from the
    /// sending process's resolv.conf (diagnose's probe sees the node's files, not the
    /// pod's, but speaks for the pod).
    pub fn preset_resolver(&mut self, cgroups: &[u64], resolver: &Resolver) {
        for cgroup in cgroups {
            self.resolvers.insert(*cgroup, resolver.clone());
        }
    }

    /// Questions to `server` are lookups of their own, apart from the pods' resolvers'
    /// (diagnose's direct question to the upstream server).
    pub fn separate_dns_server(&mut self, server: std::net::IpAddr) {
        self.dns.separate_server(server);
    }

    /// Also reports every DNS query's end ([`take_query_outcomes`](Self::take_query_outcomes)),
    /// for the metrics.
    pub fn with_query_outcomes(mut self) -> Self {
        self.dns = std::mem::take(&mut self.dns).with_query_outcomes();
        self
    }

    /// The DNS queries that ended since the last call, with their origin (empty unless
    /// enabled).
    pub fn take_query_outcomes(&mut self) -> Vec<(QueryOutcome, Arc<Origin>)> {
        self.dns
            .take_query_outcomes()
            .into_iter()
            .map(|query| {
                let origin = self.origin_of(query.cgroup_id);
                (query, origin)
            })
            .collect()
    }

    /// The cluster model in use.
    pub fn cluster(&self) -> &ClusterState {
        &self.cluster
    }

    /// Replaces the cluster model (the API's latest state).
    pub fn set_cluster(&mut self, cluster: ClusterState) {
        self.cluster = cluster;
        self.origins.clear();
    }

    /// Reads the NAT of `which` attempts from the conntrack table of the tracer's network
    /// namespace (the node's) as their records are made. Fails when ctnetlink is not
    /// usable here (it needs `CAP_NET_ADMIN` and the `nf_conntrack_netlink` module).
    pub fn look_up_nat(&mut self, which: NatLookups) -> Result<(), NatUnavailable> {
        self.nat = Some(NatFinder {
            lookups: netlink::Lookups::open().map_err(NatUnavailable)?,
            which,
            errors: 0,
        });
        Ok(())
    }

    /// The node's latest SNAT port usage, for the verdicts of translated attempts.
    pub fn set_snat(&mut self, table: Option<SnatTable>) {
        self.snat = table;
    }

    /// How much the node's conntrack counters grew while tracing.
    pub fn set_conntrack_growth(&mut self, growth: Option<crate::conntrack::ConntrackStats>) {
        self.node.conntrack_growth = growth;
    }

    /// The cgroups of the traced pod (rescanned for new containers), if tracing one pod.
    pub fn target_cgroups(&mut self) -> Option<Vec<u64>> {
        let uid = self.target_uid.as_ref()?;
        Some(self.cgroups.cgroups_of_pod(uid))
    }

    /// Takes decoded events (draining `events`).
    pub fn handle(
        &mut self,
        events: &mut Vec<Result<KernelEvent, DecodeError>>,
        names: &KernelNames,
    ) {
        for event in events.drain(..) {
            match event {
                Ok(KernelEvent::Connect(connect)) => {
                    self.stats.connects_received += 1;
                    let origin = self.origin_of(connect.cgroup_id);
                    if self.wanted(&origin) {
                        self.flows.on_connect(&connect, origin, &mut self.attempts);
                    }
                }
                Ok(KernelEvent::FirstPacket(packet)) => self.flows.on_first_packet(&packet),
                Ok(KernelEvent::IcmpError(error)) => self.flows.on_icmp_error(&error),
                Ok(KernelEvent::SockState(state)) => {
                    self.flows.on_sock_state(&state, &mut self.attempts)
                }
                Ok(KernelEvent::Drop(drop)) => {
                    let mut described = names.describe_drop(&drop);
                    described.netns_owner =
                        described.netns.and_then(|inode| self.netns_owner(inode));
                    self.flows.on_drop(&drop, described);
                }
                Ok(KernelEvent::Dns(event)) => self.on_dns(&event),
                Err(_) => self.stats.decode_errors += 1,
            }
        }
    }

    fn on_dns(&mut self, event: &DnsCapture) {
        let origin = self.origin_of(event.cgroup_id);
        if !self.wanted(&origin) {
            return;
        }
        let (Some(src), Some(dst)) = (socket_addr(&event.src), socket_addr(&event.dst)) else {
            return;
        };
        let tcp = event.protocol == IPPROTO_TCP;
        let payload = event.message.as_slice();
        let cut = event.payload_len as usize > payload.len();
        // Over TCP a message is a 2-byte length and the message, which some servers send
        // as two segments: remember a lone length, and read the next segment unframed.
        let framed = if tcp {
            let stream = (event.sock_cookie, event.direction);
            if payload.len() == 2 && !cut {
                if self.tcp_length_only.len() >= MAX_REMEMBERED {
                    self.tcp_length_only.clear();
                }
                self.tcp_length_only.insert(stream);
                return;
            }
            !self.tcp_length_only.remove(&stream)
        } else {
            false
        };
        let process = self
            .flows
            .pending(event.sock_cookie)
            .map(|a| (a.pid, a.comm.clone()));
        self.learn_resolver(event.cgroup_id, process.as_ref());
        if self.dns_sockets.len() >= MAX_REMEMBERED {
            self.dns_sockets.clear();
        }
        self.dns_sockets.insert(event.sock_cookie);
        let seen = SeenMessage {
            monotonic_ns: event.header.ts_ns,
            cgroup_id: event.cgroup_id,
            sock_cookie: event.sock_cookie,
            tcp,
            src,
            dst,
            process,
            message: dns::parse(payload, framed, cut),
            // Only queries': a held query's question is found by its hash.
            hash: (self.dns_summaries && !tcp && event.direction == DNS_EGRESS)
                .then(|| dns_message_hash(payload, event.payload_len)),
            query_ns: (event.query_ns != 0).then_some(event.query_ns),
        };
        let resolver = resolver_of(&self.resolvers, event.cgroup_id, &origin);
        self.dns.on_message(seen, &resolver, &mut self.lookups);
    }

    /// Whether the response to a query the kernel held back is overdue at `now_ns`.
    pub fn held_dns_query_overdue(&mut self, held: &DnsHeld, now_ns: u64) -> bool {
        let origin = self.origin_of(held.cgroup_id);
        let resolver = resolver_of(&self.resolvers, held.cgroup_id, &origin);
        now_ns >= self.dns.deadline_ns(held.sent_ns, &resolver)
    }

    /// Queries the kernel held back that got no response in time (taken from the kernel
    /// with `Capture::take_overdue_dns_queries`).
    pub fn held_dns_queries_timed_out(&mut self, taken: &[(DnsHeldKey, DnsHeld)]) {
        for (key, held) in taken {
            let (Some(client), Some(server)) =
                (socket_addr(&held.client), socket_addr(&held.server))
            else {
                continue;
            };
            let origin = self.origin_of(held.cgroup_id);
            if !self.wanted(&origin) {
                continue;
            }
            let query = HeldQuery {
                sent_ns: held.sent_ns,
                cgroup_id: held.cgroup_id,
                sock_cookie: key.sock_cookie,
                // The kernel keeps the id's bytes as they are on the wire.
                id: u16::from_be_bytes(key.id.to_ne_bytes()),
                query_hash: held.query_hash,
                client,
                server,
            };
            let resolver = resolver_of(&self.resolvers, held.cgroup_id, &origin);
            self.dns
                .held_query_timed_out(&query, &resolver, &mut self.lookups);
        }
    }

    /// The type of the query with this hash that `cgroup_id` sent, if remembered.
    pub fn dns_query_type(&self, cgroup_id: u64, query_hash: u64) -> Option<&str> {
        self.dns
            .question(cgroup_id, query_hash)
            .map(|question| question.qtype.as_ref())
    }

    /// Settles what waited long enough, where `read_ns` is the kernel time up to which
    /// every event has been handled (`Capture::read_until_ns`): not the clock, so that
    /// what a record holds does not depend on how late its events were read.
    pub fn tick(&mut self, read_ns: u64) {
        self.flows.expire(read_ns, &mut self.attempts);
        self.dns.expire(read_ns, &mut self.lookups);
    }

    /// Settles everything still open (at shutdown).
    pub fn finish(&mut self) {
        self.flows.drain(&mut self.attempts);
        self.dns.drain(&mut self.lookups);
    }

    /// The records finished since the last call, attempts first.
    pub fn take_records(&mut self) -> Vec<Record> {
        let mut records = Vec::with_capacity(self.attempts.len() + self.lookups.len());
        for mut attempt in self.attempts.drain(..) {
            // A UDP attempt is reported after its first datagrams, so its DNS messages
            // are known by then. TCP connections to a DNS server stay attempts of their
            // own: they are reported when the handshake ends, before any message.
            let carried_dns = attempt.protocol == Protocol::Udp
                && attempt.dst.port() == DNS_PORT
                && self.dns_sockets.remove(&attempt.sock_cookie);
            if carried_dns {
                continue;
            }
            if let Some(nat) = &mut self.nat {
                nat.fill(&mut attempt);
            }
            if let Some(reply) = attempt.reply.as_mut() {
                if reply.reset {
                    reply.endpoint_hops = self.endpoint_hops.get(&attempt.dst.ip()).copied();
                } else {
                    if self.endpoint_hops.len() >= MAX_REMEMBERED {
                        self.endpoint_hops.clear();
                    }
                    self.endpoint_hops.insert(attempt.dst.ip(), reply.hops());
                }
            }
            attempt.dst_name = self
                .dns
                .name_of(attempt.cgroup_id, attempt.dst.ip())
                .map(str::to_owned);
            attempt.service = self.cluster.service_at(attempt.dst).map(|service| {
                let backend = attempt.nat.and_then(|nat| nat.dst);
                ServiceTarget {
                    name: service.to_string(),
                    backend,
                    backend_pod: backend.and_then(|b| self.cluster.backend_pod(b.ip())),
                }
            });
            if let (Some(table), Some(nat)) = (&self.snat, attempt.nat)
                && let Some(src) = nat.src
            {
                let dst = nat.dst.unwrap_or(attempt.dst);
                attempt.snat = Some(table.usage(src.ip(), dst, attempt.protocol.number()));
            }
            let protocol = match attempt.protocol {
                Protocol::Tcp => policy::Protocol::Tcp,
                Protocol::Udp => policy::Protocol::Udp,
            };
            // Policies only explain failures; successes skip the evaluation.
            let decision = attempt
                .outcome
                .is_failure()
                .then(|| policy_decision(&self.cluster, &attempt.origin, attempt.dst, protocol))
                .flatten();
            attempt.verdict =
                verdict::of_attempt(&attempt, &self.node, decision.as_ref()).map(Box::new);
            records.push(Record::Attempt(attempt));
        }
        for lookup in std::mem::take(&mut self.lookups) {
            let origin = self.origin_of(lookup.cgroup_id);
            let protocol = if lookup.over_tcp && !lookup.truncated {
                policy::Protocol::Tcp
            } else {
                policy::Protocol::Udp
            };
            // Only a timeout can be a policy's doing.
            let decision = (lookup.result == dns::LookupResult::Timeout)
                .then(|| policy_decision(&self.cluster, &origin, lookup.server, protocol))
                .flatten();
            let cluster_dns = self
                .cluster
                .cluster_dns()
                .filter(|service| service.cluster_ips.contains(&lookup.server.ip()))
                .map(ToString::to_string);
            let verdict = Box::new(verdict::of_lookup(
                &lookup,
                decision.as_ref(),
                cluster_dns.as_deref(),
            ));
            records.push(Record::Lookup {
                lookup: Box::new(lookup),
                origin,
                verdict,
            });
        }
        records
    }

    pub fn stats(&self) -> PipelineStats {
        PipelineStats {
            nat_lookup_errors: self.nat.as_ref().map_or(0, |nat| nat.errors),
            ..self.stats
        }
    }

    /// What userspace discarded so far (totals), by reason: evidence it could not decode
    /// or match, and what a bound made it drop or report early.
    pub fn discarded(&self) -> [(&'static str, u64); 9] {
        let (pipeline, flows, dns) = (self.stats(), self.flows.stats(), self.dns.stats());
        [
            ("undecodable_event", pipeline.decode_errors),
            ("nat_lookup_failed", pipeline.nat_lookup_errors),
            ("attempt_reported_early", flows.evicted),
            ("icmp_error_unmatched", flows.unmatched_icmp),
            ("drop_unmatched", flows.late_drops),
            ("dns_message_malformed", dns.malformed),
            ("dns_response_unmatched", dns.unmatched_responses),
            ("dns_query_evicted", dns.evicted),
            ("dns_answer_not_kept", dns.answers_not_kept),
        ]
    }

    pub fn flow_stats(&self) -> crate::flow::FlowStats {
        self.flows.stats()
    }

    pub fn dns_stats(&self) -> dns::DnsStats {
        self.dns.stats()
    }

    /// Whose network namespace this is: the tracer's own (the node's) or a pod's.
    fn netns_owner(&mut self, inode: u64) -> Option<NetnsOwner> {
        if Some(inode) == self.own_netns {
            return Some(NetnsOwner::Node);
        }
        let uid = self.cgroups.pod_of_netns(inode)?.to_owned();
        let pod = self
            .cluster
            .pod_by_uid(&uid)
            .map_or(uid, |pod| pod.to_string());
        Some(NetnsOwner::Pod(pod))
    }

    fn wanted(&self, origin: &Origin) -> bool {
        self.target_uid
            .as_ref()
            .is_none_or(|uid| origin.pod_uid.as_ref() == Some(uid))
    }

    /// The pod and container a cgroup belongs to.
    pub fn origin_of(&mut self, cgroup_id: u64) -> Arc<Origin> {
        if let Some(origin) = self.origins.get(&cgroup_id) {
            return Arc::clone(origin);
        }
        let Some(cgroup) = self.cgroups.lookup(cgroup_id) else {
            // Not cached: the cgroup may be a pod's that the index has not scanned yet.
            return Arc::clone(&self.no_pod);
        };
        let pod = self.cluster.pod_by_uid(&cgroup.pod_uid);
        let container = cgroup.container.as_ref().map(|c| ContainerRef {
            name: pod.and_then(|p| p.container_name(&c.id)).map(str::to_owned),
            id: c.id.clone(),
        });
        let origin = Arc::new(Origin {
            pod: pod.map(PodInfo::to_string),
            pod_uid: Some(cgroup.pod_uid.clone()),
            container,
        });
        if self.origins.len() >= MAX_REMEMBERED {
            self.origins.clear();
        }
        self.origins.insert(cgroup_id, Arc::clone(&origin));
        origin
    }

    /// Remembers the resolver configuration of `cgroup_id` from the resolv.conf a
    /// process of the cgroup sees (its own mount namespace), once one can be read.
    fn learn_resolver(&mut self, cgroup_id: u64, process: Option<&(u32, String)>) {
        if self.resolvers.contains_key(&cgroup_id) {
            return;
        }
        let Some(&(pid, _)) = process else {
            return;
        };
        // A process whose file could not be read is not asked again (its cgroup's next
        // process is).
        if self.unreadable_resolvers.contains(&(cgroup_id, pid)) {
            return;
        }
        let text = match node::read_pod_file(pid, "etc/resolv.conf") {
            Ok(text) => text,
            Err(_) => {
                if self.unreadable_resolvers.len() >= MAX_REMEMBERED {
                    self.unreadable_resolvers.clear();
                }
                self.unreadable_resolvers.insert((cgroup_id, pid));
                return;
            }
        };
        if self.resolvers.len() >= MAX_REMEMBERED {
            self.resolvers.clear();
        }
        self.resolvers
            .insert(cgroup_id, dns::resolver_config(&text));
    }
}

/// The resolver configuration of `cgroup_id`: the one read from its pod (borrowed, not
/// cloned: this runs for every DNS message), else the default for its namespace.
fn resolver_of<'a>(
    resolvers: &'a HashMap<u64, Resolver>,
    cgroup_id: u64,
    origin: &Origin,
) -> Cow<'a, Resolver> {
    match resolvers.get(&cgroup_id) {
        Some(resolver) => Cow::Borrowed(resolver),
        None => Cow::Owned(default_resolver(origin)),
    }
}

/// Kubernetes' default resolver configuration for a pod's namespace, for pods whose own
/// resolv.conf could not be read.
fn default_resolver(origin: &Origin) -> Resolver {
    let search = match origin.pod.as_deref().and_then(|pod| pod.split_once('/')) {
        Some((namespace, _)) => vec![
            format!("{namespace}.svc.cluster.local"),
            "svc.cluster.local".to_owned(),
            "cluster.local".to_owned(),
        ],
        None => Vec::new(),
    };
    Resolver {
        search,
        ..Resolver::default()
    }
}

/// What the NetworkPolicies decide for a pod's flow, when the pod is known.
fn policy_decision(
    cluster: &ClusterState,
    origin: &Origin,
    dst: std::net::SocketAddr,
    protocol: policy::Protocol,
) -> Option<Decision> {
    let src = cluster.pod_by_uid(origin.pod_uid.as_deref()?)?;
    Some(policy::decide(
        cluster,
        &Flow {
            src,
            dst: dst.ip(),
            port: dst.port(),
            protocol,
        },
    ))
}
