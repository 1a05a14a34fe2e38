//! DNS: parses the message prefixes the kernel copied, pairs queries with responses,
//! notices queries that were never answered, groups the search-domain expansions of one
//! lookup, and remembers answers so that connections can be named.
//!
//! A *lookup* is what an application asked for: `api.example.test` with `ndots:5` makes
//! the resolver try `api.example.test.<ns>.svc.cluster.local`, `….svc.cluster.local`,
//! `….cluster.local` and `api.example.test`, each for A and AAAA. Those queries share a
//! lookup when they come from the same cgroup and strip to the same base name with the
//! pod's search list; the lookup is reported once, [`LOOKUP_SETTLE`] after its last query
//! was answered or timed out.
//!
//! With DNS summaries on, the kernel holds back the queries that repeat one it sent in the
//! current period, and counts their exchanges when the response repeats too. The tracker
//! then meets a held query only when it turns out differently: its response arrives with
//! the query's time ([`SeenMessage::query_ns`]), or it times out
//! ([`DnsTracker::held_query_timed_out`]); either way the question is known from the
//! query the kernel sent, by its hash ([`SeenMessage::hash`]).
//!
//! Everything is bounded: [`MAX_PENDING_QUERIES`], [`MAX_LOOKUPS`], [`MAX_NAMES`] and
//! [`MAX_QUESTIONS`] entries at most, the oldest evicted first and counted (questions are
//! forgotten all at once).

use std::{
    borrow::Cow,
    cmp::Reverse,
    collections::{BTreeSet, BinaryHeap, VecDeque},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use foldhash::HashMap;
use serde::Serialize;

pub use wire::{Answer, AnswerValue, DnsError, DnsMessage, Question, parse, rcode_name};

mod wire;

/// How long after its last query settled a lookup is reported.
pub const LOOKUP_SETTLE: Duration = Duration::from_millis(500);
/// Most queries awaiting a response.
pub const MAX_PENDING_QUERIES: usize = 65_536;
/// Most lookups in progress.
pub const MAX_LOOKUPS: usize = 16_384;
/// Most remembered (cgroup, address) → name answers.
pub const MAX_NAMES: usize = 65_536;
/// Most remembered (cgroup, query hash) → question entries.
pub const MAX_QUESTIONS: usize = 65_536;
/// Most distinct answers a lookup keeps (a pod's own DNS server can answer for ever).
pub const MAX_ANSWERS: usize = 64;
/// The longest `options timeout:` the resolver (glibc's, musl's) honours.
pub const MAX_RESOLVER_TIMEOUT: Duration = Duration::from_secs(30);

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// What the tracer needs of a process's resolver configuration (its resolv.conf).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolver {
    /// `search`: the domains a short name is tried in.
    pub search: Vec<String>,
    /// `options timeout:N`: how long the resolver waits for a response.
    pub timeout: Option<Duration>,
    /// `nameserver` lines, in order.
    pub nameservers: Vec<IpAddr>,
    /// `options ndots:N`: names with fewer dots are tried in the search domains first.
    pub ndots: Option<u8>,
}

/// Reads the parts of a resolv.conf that matter for grouping queries and timing them out.
pub fn resolver_config(resolv_conf: &str) -> Resolver {
    let mut resolver = Resolver::default();
    for line in resolv_conf.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("search") => resolver.search = words.map(normalize).collect(),
            Some("nameserver") => {
                if let Some(server) = words.next().and_then(|s| s.parse().ok()) {
                    resolver.nameservers.push(server);
                }
            }
            Some("options") => {
                for option in words {
                    if let Some(seconds) = option
                        .strip_prefix("timeout:")
                        .and_then(|s| s.parse::<u64>().ok())
                    {
                        // As the resolver itself reads it: 1 to 30 s. A pod controls this
                        // file; an unbounded timeout would keep its queries for ever.
                        resolver.timeout = Some(Duration::from_secs(
                            seconds.clamp(1, MAX_RESOLVER_TIMEOUT.as_secs()),
                        ));
                    }
                    if let Some(ndots) = option.strip_prefix("ndots:").and_then(|s| s.parse().ok())
                    {
                        resolver.ndots = Some(ndots);
                    }
                }
            }
            _ => {}
        }
    }
    resolver
}

/// The name an application asked for, given a query name and the search list: the
/// query name without the first search domain it ends with.
pub fn base_name<'a>(qname: &'a str, search: &[String]) -> &'a str {
    search
        .iter()
        .find_map(|domain| {
            qname
                .strip_suffix(domain.as_str())
                .and_then(|rest| rest.strip_suffix('.'))
                .filter(|base| !base.is_empty())
        })
        .unwrap_or(qname)
}

/// One DNS message seen by the kernel, with what the tracer knows of its sender.
#[derive(Clone, Debug)]
pub struct SeenMessage {
    pub monotonic_ns: u64,
    pub cgroup_id: u64,
    pub sock_cookie: u64,
    pub tcp: bool,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// The process (pid, comm) behind the socket, when known.
    pub process: Option<(u32, String)>,
    /// The parsed message, or why it could not be parsed.
    pub message: Result<DnsMessage, DnsError>,
    /// With DNS summaries on, the UDP message's `tracer_common::dns_message_hash`.
    pub hash: Option<u64>,
    /// A response to a query the kernel held back: when that query left.
    pub query_ns: Option<u64>,
}

/// A query the kernel held back (`tracer_common::DnsHeld`), as userspace took it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldQuery {
    pub sent_ns: u64,
    pub cgroup_id: u64,
    pub sock_cookie: u64,
    pub id: u16,
    pub query_hash: u64,
    pub client: SocketAddr,
    pub server: SocketAddr,
}

/// How a lookup ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LookupResult {
    /// At least one query got addresses (or a CNAME) back.
    Resolved,
    Nxdomain,
    Servfail,
    Refused,
    /// `NOERROR` without any answer of the asked types.
    NoAnswer,
    /// At least one query got no response within the resolver timeout, and none resolved.
    Timeout,
    /// A response could not be parsed.
    Malformed,
    /// Another response code.
    Failed,
}

impl LookupResult {
    pub fn as_str(self) -> &'static str {
        match self {
            LookupResult::Resolved => "resolved",
            LookupResult::Nxdomain => "nxdomain",
            LookupResult::Servfail => "servfail",
            LookupResult::Refused => "refused",
            LookupResult::NoAnswer => "no-answer",
            LookupResult::Timeout => "timeout",
            LookupResult::Malformed => "malformed",
            LookupResult::Failed => "failed",
        }
    }
}

/// One lookup: every query an application's resolver made for one name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lookup {
    pub first_ns: u64,
    pub cgroup_id: u64,
    /// The process (pid, comm) that made the first query, when known.
    pub process: Option<(u32, String)>,
    /// The name the application asked for.
    pub name: String,
    /// Every name queried, in order (the search-domain expansions and the name itself).
    pub queried: Vec<String>,
    pub qtypes: BTreeSet<Cow<'static, str>>,
    pub result: LookupResult,
    /// The response code of the deciding response, if any.
    pub rcode: Option<Cow<'static, str>>,
    pub answers: Vec<Answer>,
    /// The server asked (of the first query).
    pub server: SocketAddr,
    /// The client address of the first query.
    pub client: SocketAddr,
    /// From the first query to the last response.
    pub duration: Option<Duration>,
    pub timeouts: u32,
    /// A UDP answer came back truncated.
    pub truncated: bool,
    /// Some queries went over TCP.
    pub over_tcp: bool,
}

struct PendingQuery {
    sent_ns: u64,
    /// When the query counts as timed out.
    deadline_ns: u64,
    qtype: Cow<'static, str>,
    lookup: LookupKey,
}

/// One query's end: its response, or its timeout (`rcode` `None`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueryOutcome {
    pub cgroup_id: u64,
    pub server: IpAddr,
    pub qtype: Cow<'static, str>,
    pub rcode: Option<Cow<'static, str>>,
    /// From the query to its response or timeout.
    pub duration: Duration,
}

/// (protocol is TCP, client, server, DNS id).
type QueryKey = (bool, SocketAddr, SocketAddr, u16);
/// (cgroup, base name); shared by the lookup's queries and the lookup order.
/// A lookup's cgroup, the server it asked when that is one of the direct servers (see
/// [`DnsTracker::separate_server`]), and its base name.
type LookupKey = (u64, Option<IpAddr>, Arc<str>);

/// A [`LookupKey`] borrowed from a query, to find its open lookup without allocating; it
/// hashes as the tuple does.
#[derive(Hash)]
struct LookupRef<'a>(u64, Option<IpAddr>, &'a str);

impl hashbrown::Equivalent<LookupKey> for LookupRef<'_> {
    fn equivalent(&self, key: &LookupKey) -> bool {
        self.0 == key.0 && self.1 == key.1 && self.2 == &*key.2
    }
}

struct OpenLookup {
    lookup: Lookup,
    outstanding: u32,
    /// When the last query was answered or timed out.
    settled_ns: u64,
    /// Response code of the last response to the base name itself, else of any.
    base_rcode: Option<Cow<'static, str>>,
    last_rcode: Option<Cow<'static, str>>,
    malformed: bool,
}

/// Counts kept by the tracker.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsStats {
    pub malformed: u64,
    pub unmatched_responses: u64,
    pub evicted: u64,
    /// Answers beyond a lookup's [`MAX_ANSWERS`].
    pub answers_not_kept: u64,
}

/// Pairs queries and responses into lookups.
#[derive(Default)]
pub struct DnsTracker {
    timeout: Duration,
    pending: HashMap<QueryKey, PendingQuery>,
    /// Pending queries by deadline (each query times out on its own, whatever the
    /// others' timeouts); entries of queries answered or sent again are skipped.
    pending_order: BinaryHeap<Reverse<(u64, QueryKey)>>,
    lookups: hashbrown::HashMap<LookupKey, OpenLookup, foldhash::fast::RandomState>,
    lookup_order: VecDeque<LookupKey>,
    names: HashMap<(u64, IpAddr), String>,
    names_order: VecDeque<(u64, IpAddr)>,
    stats: DnsStats,
    /// Each query's end, when asked for (see [`DnsTracker::with_query_outcomes`]).
    query_outcomes: Option<Vec<QueryOutcome>>,
    /// Servers whose questions are lookups of their own.
    direct_servers: foldhash::HashSet<IpAddr>,
    /// The questions of the queries that came with a hash, by (cgroup, hash).
    questions: HashMap<(u64, u64), Question>,
}

impl DnsTracker {
    /// `timeout`: how long a query may wait for its response when the resolver's own
    /// timeout is not known.
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            ..Self::default()
        }
    }

    /// Questions to `server` make lookups of their own, apart from the resolver's (a
    /// direct question such as diagnose's to the upstream server). Not inferred from the
    /// resolv.conf: a socket-level load balancer (Cilium's) sends the resolver's own
    /// queries to DNS pods, not to the nameserver the file names.
    pub fn separate_server(&mut self, server: IpAddr) {
        self.direct_servers.insert(server);
    }

    /// Also reports the end of every single query, for
    /// [`take_query_outcomes`](Self::take_query_outcomes) (the metrics count queries).
    pub fn with_query_outcomes(mut self) -> Self {
        self.query_outcomes = Some(Vec::new());
        self
    }

    /// The query ends since the last call (empty unless enabled).
    pub fn take_query_outcomes(&mut self) -> Vec<QueryOutcome> {
        self.query_outcomes
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    fn query_ended(
        &mut self,
        query: &PendingQuery,
        server: IpAddr,
        rcode: Option<Cow<'static, str>>,
        at_ns: u64,
    ) {
        if let Some(outcomes) = self.query_outcomes.as_mut() {
            outcomes.push(QueryOutcome {
                cgroup_id: query.lookup.0,
                server,
                qtype: query.qtype.clone(),
                rcode,
                duration: Duration::from_nanos(at_ns.saturating_sub(query.sent_ns)),
            });
        }
    }

    /// Takes one message; `resolver` is the sender's configuration (search list for
    /// grouping, timeout).
    pub fn on_message(
        &mut self,
        mut seen: SeenMessage,
        resolver: &Resolver,
        done: &mut Vec<Lookup>,
    ) {
        let parsed = std::mem::replace(&mut seen.message, Err(DnsError::Empty));
        let message = match parsed {
            Ok(message) => message,
            Err(_) => {
                self.stats.malformed += 1;
                // A malformed response to a pending query still settles that query.
                self.mark_malformed(&seen);
                return;
            }
        };
        if message.is_response {
            if let (Some(query_ns), Some(question)) = (seen.query_ns, &message.question) {
                // The query was held back: it is the one this response answers.
                let query = SeenMessage {
                    monotonic_ns: query_ns,
                    src: seen.dst,
                    dst: seen.src,
                    process: seen.process.clone(),
                    message: Err(DnsError::Empty),
                    hash: None,
                    query_ns: None,
                    ..seen
                };
                self.on_query(&query, message.id, question.clone(), resolver, done);
            }
            self.on_response(&seen, message);
        } else if let Some(question) = message.question {
            if let Some(hash) = seen.hash {
                let key = (seen.cgroup_id, hash);
                if !self.questions.contains_key(&key) {
                    if self.questions.len() >= MAX_QUESTIONS {
                        self.questions.clear();
                    }
                    self.questions.insert(key, question.clone());
                }
            }
            self.on_query(&seen, message.id, question, resolver, done);
        }
    }

    /// The question of the query with this hash that `cgroup_id` sent, if remembered.
    pub fn question(&self, cgroup_id: u64, hash: u64) -> Option<&Question> {
        self.questions.get(&(cgroup_id, hash))
    }

    /// A query the kernel held back got no response in time. Known by its hash, it joins
    /// its lookup as a query sent at `sent_ns` and times out at the next
    /// [`expire`](Self::expire); otherwise only its end is counted (type `unknown`).
    pub fn held_query_timed_out(
        &mut self,
        held: &HeldQuery,
        resolver: &Resolver,
        done: &mut Vec<Lookup>,
    ) {
        let Some(question) = self.question(held.cgroup_id, held.query_hash).cloned() else {
            if let Some(outcomes) = self.query_outcomes.as_mut() {
                outcomes.push(QueryOutcome {
                    cgroup_id: held.cgroup_id,
                    server: held.server.ip(),
                    qtype: Cow::Borrowed("unknown"),
                    rcode: None,
                    duration: resolver.timeout.unwrap_or(self.timeout),
                });
            }
            return;
        };
        let query = SeenMessage {
            monotonic_ns: held.sent_ns,
            cgroup_id: held.cgroup_id,
            sock_cookie: held.sock_cookie,
            tcp: false,
            src: held.client,
            dst: held.server,
            process: None,
            message: Err(DnsError::Empty),
            hash: None,
            query_ns: None,
        };
        self.on_query(&query, held.id, question, resolver, done);
    }

    /// When a query sent at `sent_ns` by a process with this resolver times out.
    pub fn deadline_ns(&self, sent_ns: u64, resolver: &Resolver) -> u64 {
        sent_ns + resolver.timeout.unwrap_or(self.timeout).as_nanos() as u64
    }

    fn on_query(
        &mut self,
        seen: &SeenMessage,
        id: u16,
        question: Question,
        resolver: &Resolver,
        done: &mut Vec<Lookup>,
    ) {
        let base = base_name(&question.name, &resolver.search);
        let server = seen.dst.ip();
        let direct = self.direct_servers.contains(&server).then_some(server);
        // Nothing is allocated for a query of a lookup already open (most of them).
        let open_key = self
            .lookups
            .get_key_value(&LookupRef(seen.cgroup_id, direct, base))
            .map(|(key, _)| key.clone());
        let lookup_key = if let Some(key) = open_key {
            key
        } else {
            if self.lookups.len() >= MAX_LOOKUPS {
                self.evict_lookup(done);
            }
            let lookup_key: LookupKey = (seen.cgroup_id, direct, Arc::from(base));
            self.lookup_order.push_back(lookup_key.clone());
            self.lookups.insert(
                lookup_key.clone(),
                OpenLookup {
                    lookup: Lookup {
                        first_ns: seen.monotonic_ns,
                        cgroup_id: seen.cgroup_id,
                        process: seen.process.clone(),
                        name: base.to_owned(),
                        queried: Vec::new(),
                        qtypes: BTreeSet::new(),
                        result: LookupResult::Timeout,
                        rcode: None,
                        answers: Vec::new(),
                        server: seen.dst,
                        client: seen.src,
                        duration: None,
                        timeouts: 0,
                        truncated: false,
                        over_tcp: false,
                    },
                    outstanding: 0,
                    settled_ns: seen.monotonic_ns,
                    base_rcode: None,
                    last_rcode: None,
                    malformed: false,
                },
            );
            lookup_key
        };
        let open = self.lookups.get_mut(&lookup_key).expect("inserted above");
        if !open.lookup.queried.contains(&question.name) {
            open.lookup.queried.push(question.name.clone());
        }
        open.lookup.qtypes.insert(question.qtype.clone());
        open.lookup.over_tcp |= seen.tcp;
        open.outstanding += 1;
        if self.pending.len() >= MAX_PENDING_QUERIES {
            self.evict_query();
        }
        let key = (seen.tcp, seen.src, seen.dst, id);
        let deadline_ns = self.deadline_ns(seen.monotonic_ns, resolver);
        let previous = self.pending.insert(
            key,
            PendingQuery {
                sent_ns: seen.monotonic_ns,
                deadline_ns,
                qtype: question.qtype,
                lookup: lookup_key,
            },
        );
        // The same id again on the same socket is a retransmission: one outstanding.
        if let Some(previous) = previous {
            self.settle_one(&previous.lookup, None);
        }
        self.pending_order.push(Reverse((deadline_ns, key)));
        if self.pending_order.len() > 2 * MAX_PENDING_QUERIES {
            let pending = &self.pending;
            self.pending_order
                .retain(|Reverse((deadline, key))| is_pending(pending, key, *deadline));
        }
    }

    fn on_response(&mut self, seen: &SeenMessage, message: DnsMessage) {
        let key = (seen.tcp, seen.dst, seen.src, message.id);
        let Some(query) = self.pending.remove(&key) else {
            self.stats.unmatched_responses += 1;
            return;
        };
        self.query_ended(
            &query,
            seen.src.ip(),
            Some(message.rcode.clone()),
            seen.monotonic_ns,
        );
        let Some(open) = self.lookups.get_mut(&query.lookup) else {
            return;
        };
        let lookup = &mut open.lookup;
        lookup.duration = Some(Duration::from_nanos(
            seen.monotonic_ns.saturating_sub(lookup.first_ns),
        ));
        lookup.truncated |= message.truncated;
        if let Some(question) = &message.question {
            if question.name == lookup.name {
                open.base_rcode = Some(message.rcode.clone());
            }
            for answer in &message.answers {
                if let AnswerValue::Address(ip) = answer.value {
                    remember(
                        &mut self.names,
                        &mut self.names_order,
                        (seen.cgroup_id, ip),
                        &question.name,
                    );
                }
            }
        }
        open.last_rcode = Some(message.rcode.clone());
        let truncated_udp = message.truncated && !seen.tcp;
        if !message.answers.is_empty() && !truncated_udp {
            for answer in message.answers {
                if lookup.answers.contains(&answer) {
                    continue;
                }
                if lookup.answers.len() >= MAX_ANSWERS {
                    self.stats.answers_not_kept += 1;
                } else {
                    lookup.answers.push(answer);
                }
            }
        }
        self.settle_one(&query.lookup, Some(seen.monotonic_ns));
    }

    fn mark_malformed(&mut self, seen: &SeenMessage) {
        // Without a parsed id the query cannot be matched exactly: settle the oldest
        // query on the same socket pair.
        let key = self
            .pending
            .keys()
            .find(|(tcp, client, server, _)| {
                *tcp == seen.tcp && *client == seen.dst && *server == seen.src
            })
            .copied();
        if let Some(key) = key {
            let query = self.pending.remove(&key).expect("found above");
            self.query_ended(
                &query,
                seen.src.ip(),
                Some("MALFORMED".into()),
                seen.monotonic_ns,
            );
            if let Some(open) = self.lookups.get_mut(&query.lookup) {
                open.malformed = true;
            }
            self.settle_one(&query.lookup, Some(seen.monotonic_ns));
        }
    }

    fn settle_one(&mut self, key: &LookupKey, at_ns: Option<u64>) {
        if let Some(open) = self.lookups.get_mut(key) {
            open.outstanding = open.outstanding.saturating_sub(1);
            if let Some(at) = at_ns {
                open.settled_ns = open.settled_ns.max(at);
            }
        }
    }

    /// Times out unanswered queries and reports lookups that have settled, at monotonic
    /// time `now_ns`.
    pub fn expire(&mut self, now_ns: u64, done: &mut Vec<Lookup>) {
        while let Some(&Reverse((deadline_ns, key))) = self.pending_order.peek() {
            if now_ns < deadline_ns {
                break;
            }
            self.pending_order.pop();
            if !is_pending(&self.pending, &key, deadline_ns) {
                continue;
            }
            let query = self.pending.remove(&key).expect("present");
            self.query_ended(&query, key.2.ip(), None, query.deadline_ns);
            if let Some(open) = self.lookups.get_mut(&query.lookup) {
                open.lookup.timeouts += 1;
            }
            self.settle_one(&query.lookup, Some(query.deadline_ns));
        }
        let settle = LOOKUP_SETTLE.as_nanos() as u64;
        let ready: Vec<LookupKey> = self
            .lookups
            .iter()
            .filter(|(_, open)| {
                open.outstanding == 0 && now_ns.saturating_sub(open.settled_ns) >= settle
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in ready {
            if let Some(open) = self.lookups.remove(&key) {
                done.push(finish(open));
            }
        }
        if self.lookup_order.len() > 2 * MAX_LOOKUPS {
            let lookups = &self.lookups;
            self.lookup_order.retain(|k| lookups.contains_key(k));
        }
    }

    /// Reports every lookup still open (at shutdown).
    pub fn drain(&mut self, done: &mut Vec<Lookup>) {
        self.pending.clear();
        self.pending_order.clear();
        for key in std::mem::take(&mut self.lookup_order) {
            if let Some(open) = self.lookups.remove(&key) {
                done.push(finish(open));
            }
        }
    }

    /// The name a process in `cgroup_id` looked up for `ip`, if it did.
    pub fn name_of(&self, cgroup_id: u64, ip: IpAddr) -> Option<&str> {
        self.names.get(&(cgroup_id, ip)).map(String::as_str)
    }

    pub fn stats(&self) -> DnsStats {
        self.stats
    }

    fn evict_query(&mut self) {
        while let Some(Reverse((deadline_ns, key))) = self.pending_order.pop() {
            if is_pending(&self.pending, &key, deadline_ns) {
                let query = self.pending.remove(&key).expect("present");
                self.stats.evicted += 1;
                self.settle_one(&query.lookup, None);
                return;
            }
        }
    }

    fn evict_lookup(&mut self, done: &mut Vec<Lookup>) {
        while let Some(key) = self.lookup_order.pop_front() {
            if let Some(open) = self.lookups.remove(&key) {
                self.stats.evicted += 1;
                done.push(finish(open));
                return;
            }
        }
    }
}

fn remember(
    names: &mut HashMap<(u64, IpAddr), String>,
    order: &mut VecDeque<(u64, IpAddr)>,
    key: (u64, IpAddr),
    name: &str,
) {
    // Allocates only for an address new to the cgroup or named anew.
    if let Some(known) = names.get_mut(&key) {
        if known != name {
            name.clone_into(known);
        }
    } else {
        names.insert(key, name.to_owned());
        order.push_back(key);
        if names.len() > MAX_NAMES
            && let Some(oldest) = order.pop_front()
        {
            names.remove(&oldest);
        }
    }
}

/// Whether the query `key` with this deadline is still pending (not answered, nor sent
/// again with a later deadline).
fn is_pending(pending: &HashMap<QueryKey, PendingQuery>, key: &QueryKey, deadline_ns: u64) -> bool {
    pending
        .get(key)
        .is_some_and(|query| query.deadline_ns == deadline_ns)
}

/// Decides how a lookup ended. The name itself decides when it was asked: its answer,
/// or its silence (timed out, or still unanswered when tracing stopped), whatever the
/// search-domain expansions before it got; otherwise the last response does.
fn finish(open: OpenLookup) -> Lookup {
    let mut lookup = open.lookup;
    let asked_name = lookup.queried.contains(&lookup.name);
    let rcode = if asked_name {
        open.base_rcode
    } else {
        open.last_rcode.clone()
    };
    lookup.result = if !lookup.answers.is_empty() {
        LookupResult::Resolved
    } else if open.malformed {
        LookupResult::Malformed
    } else {
        match rcode.as_deref() {
            None => LookupResult::Timeout,
            // A timed-out query explains a failure better than an empty NOERROR for
            // another record type.
            Some(_) if lookup.timeouts > 0 => LookupResult::Timeout,
            Some("NOERROR") => LookupResult::NoAnswer,
            Some("NXDOMAIN") => LookupResult::Nxdomain,
            Some("SERVFAIL") => LookupResult::Servfail,
            Some("REFUSED") => LookupResult::Refused,
            Some(_) => LookupResult::Failed,
        }
    };
    lookup.rcode = rcode.or(open.last_rcode);
    lookup
}

#[cfg(test)]
mod tests {
    use super::{wire::test_messages::*, *};

    #[test]
    fn resolver_configuration_and_base_names() {
        let resolver = resolver_config(
            "nameserver 10.0.0.10\nsearch shop.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5 timeout:2 attempts:1\nsearchx no\n",
        );
        assert_eq!(resolver.timeout, Some(Duration::from_secs(2)));
        assert_eq!(resolver.ndots, Some(5));
        assert_eq!(
            resolver.nameservers,
            ["10.0.0.10".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            resolver_config("nameserver 1.1.1.1\nnameserver bogus\n"),
            Resolver {
                nameservers: vec!["1.1.1.1".parse().unwrap()],
                ..Resolver::default()
            }
        );
        let search = resolver.search;
        assert_eq!(
            search,
            vec![
                "shop.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local"
            ]
        );
        assert_eq!(
            base_name("api.example.test.shop.svc.cluster.local", &search),
            "api.example.test"
        );
        assert_eq!(
            base_name("api.example.test.cluster.local", &search),
            "api.example.test"
        );
        assert_eq!(base_name("api.example.test", &search), "api.example.test");
        assert_eq!(base_name("cluster.local", &search), "cluster.local");
    }

    fn seen(ns: u64, src: &str, dst: &str, bytes: Vec<u8>) -> SeenMessage {
        SeenMessage {
            monotonic_ns: ns,
            cgroup_id: 42,
            sock_cookie: 5,
            tcp: false,
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            process: Some((100, "curl".into())),
            message: parse(&bytes, false, false),
            hash: None,
            query_ns: None,
        }
    }

    const CLIENT: &str = "10.244.0.10:40000";
    const SERVER: &str = "10.0.0.10:53";
    const MS: u64 = 1_000_000;

    fn search() -> Resolver {
        resolver_config("search default.svc.cluster.local svc.cluster.local cluster.local")
    }

    #[test]
    fn expansions_are_one_lookup_reported_once() {
        let mut dns = DnsTracker::new(Duration::from_secs(5));
        let mut done = Vec::new();
        let names = [
            "api.example.test.default.svc.cluster.local",
            "api.example.test.svc.cluster.local",
            "api.example.test.cluster.local",
            "api.example.test",
        ];
        for (i, name) in names.iter().enumerate() {
            let id = i as u16 * 2;
            let t = i as u64 * 10 * MS;
            dns.on_message(
                seen(t, CLIENT, SERVER, message(id, QUERY, name, A, &[])),
                &search(),
                &mut done,
            );
            dns.on_message(
                seen(t, CLIENT, SERVER, message(id + 1, QUERY, name, AAAA, &[])),
                &search(),
                &mut done,
            );
            dns.on_message(
                seen(t + MS, SERVER, CLIENT, message(id, NXDOMAIN, name, A, &[])),
                &search(),
                &mut done,
            );
            dns.on_message(
                seen(
                    t + MS,
                    SERVER,
                    CLIENT,
                    message(id + 1, NXDOMAIN, name, AAAA, &[]),
                ),
                &search(),
                &mut done,
            );
        }
        let last = 31 * MS;
        dns.expire(last + LOOKUP_SETTLE.as_nanos() as u64 - 1, &mut done);
        assert!(done.is_empty(), "not settled yet");
        dns.expire(last + LOOKUP_SETTLE.as_nanos() as u64, &mut done);
        assert_eq!(done.len(), 1);
        let lookup = &done[0];
        assert_eq!(lookup.name, "api.example.test");
        assert_eq!(lookup.queried, names);
        assert_eq!(lookup.qtypes, BTreeSet::from(["A".into(), "AAAA".into()]));
        assert_eq!(lookup.result, LookupResult::Nxdomain);
        assert_eq!(lookup.rcode.as_deref(), Some("NXDOMAIN"));
        assert_eq!(lookup.server, SERVER.parse().unwrap());
        assert_eq!(lookup.duration, Some(Duration::from_millis(31)));
    }

    #[test]
    fn a_lookup_keeps_a_bounded_number_of_answers() {
        let mut dns = DnsTracker::new(Duration::from_secs(5));
        let mut done = Vec::new();
        let name = "many.example.test";
        // A pod's own server answers the same name again and again, each time with
        // other addresses.
        for round in 0..10u16 {
            let addresses: Vec<[u8; 4]> = (0..10).map(|i| [203, 0, round as u8, i]).collect();
            dns.on_message(
                seen(0, CLIENT, SERVER, message(round, QUERY, name, A, &[])),
                &search(),
                &mut done,
            );
            dns.on_message(
                seen(
                    MS,
                    SERVER,
                    CLIENT,
                    message(round, RESPONSE, name, A, &addresses),
                ),
                &search(),
                &mut done,
            );
        }
        dns.expire(MS + LOOKUP_SETTLE.as_nanos() as u64, &mut done);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].answers.len(), MAX_ANSWERS);
        assert_eq!(dns.stats().answers_not_kept, 100 - MAX_ANSWERS as u64);
    }

    #[test]
    fn a_pods_huge_timeout_is_clamped_and_holds_no_other_query_back() {
        let hostile = resolver_config("options timeout:1000000");
        assert_eq!(hostile.timeout, Some(MAX_RESOLVER_TIMEOUT));
        assert_eq!(
            resolver_config("options timeout:0").timeout,
            Some(Duration::from_secs(1))
        );
        // The hostile pod's query is sent first and never answered; another pod's query
        // (1 s timeout) still times out on time.
        let mut dns = DnsTracker::new(Duration::from_secs(5));
        let mut done = Vec::new();
        let mut first = seen(
            0,
            CLIENT,
            SERVER,
            message(1, QUERY, "a.example.test", A, &[]),
        );
        first.cgroup_id = 7;
        dns.on_message(first, &hostile, &mut done);
        let polite = resolver_config("options timeout:1");
        let second = seen(
            MS,
            "10.244.0.11:40000",
            SERVER,
            message(2, QUERY, "b.example.test", A, &[]),
        );
        dns.on_message(second, &polite, &mut done);
        dns.expire(1_001 * MS + LOOKUP_SETTLE.as_nanos() as u64, &mut done);
        let found: Vec<_> = done.iter().map(|l| (l.name.as_str(), l.result)).collect();
        assert_eq!(found, [("b.example.test", LookupResult::Timeout)]);
        // The hostile one at 30 s, not later.
        dns.expire(30_000 * MS + LOOKUP_SETTLE.as_nanos() as u64, &mut done);
        assert_eq!(done.len(), 2);
        assert_eq!(
            (done[1].name.as_str(), done[1].result),
            ("a.example.test", LookupResult::Timeout)
        );
    }

    #[test]
    fn a_question_to_a_separate_server_is_a_lookup_of_its_own() {
        // diagnose asks the pod's nameserver and, at the same time, an upstream server
        // directly: the name does not exist, and the upstream server is silent.
        let mut dns = DnsTracker::new(Duration::from_secs(1));
        let mut done = Vec::new();
        let resolver = resolver_config("nameserver 10.0.0.10\noptions timeout:1");
        const UPSTREAM: &str = "192.0.2.99:53";
        dns.separate_server("192.0.2.99".parse().unwrap());
        let name = "missing.example.test";
        for message_seen in [
            seen(0, CLIENT, SERVER, message(1, QUERY, name, A, &[])),
            seen(0, CLIENT, UPSTREAM, message(2, QUERY, name, A, &[])),
            seen(MS, SERVER, CLIENT, message(1, NXDOMAIN, name, A, &[])),
        ] {
            dns.on_message(message_seen, &resolver, &mut done);
        }
        dns.expire(1_000 * MS + LOOKUP_SETTLE.as_nanos() as u64, &mut done);
        done.sort_by_key(|lookup| lookup.server);
        let found: Vec<_> = done
            .iter()
            .map(|l| (l.name.as_str(), l.server.to_string(), l.result))
            .collect();
        assert_eq!(
            found,
            [
                (name, SERVER.to_owned(), LookupResult::Nxdomain),
                (name, UPSTREAM.to_owned(), LookupResult::Timeout),
            ]
        );
    }

    #[test]
    fn a_response_to_a_held_query_brings_its_query() {
        let mut dns = DnsTracker::new(Duration::from_secs(5)).with_query_outcomes();
        let mut done = Vec::new();
        let mut response = seen(
            12 * MS,
            SERVER,
            CLIENT,
            message(7, RESPONSE, "api.example.test", A, &[[203, 0, 113, 10]]),
        );
        response.query_ns = Some(10 * MS);
        dns.on_message(response, &search(), &mut done);
        dns.expire(12 * MS + LOOKUP_SETTLE.as_nanos() as u64, &mut done);
        assert_eq!(dns.stats().unmatched_responses, 0);
        assert_eq!(done.len(), 1);
        let lookup = &done[0];
        assert_eq!(
            (lookup.name.as_str(), lookup.result, lookup.first_ns),
            ("api.example.test", LookupResult::Resolved, 10 * MS)
        );
        assert_eq!(
            (lookup.client, lookup.server),
            (CLIENT.parse().unwrap(), SERVER.parse().unwrap())
        );
        assert_eq!(lookup.duration, Some(Duration::from_millis(2)));
        assert_eq!(
            dns.take_query_outcomes(),
            [QueryOutcome {
                cgroup_id: 42,
                server: "10.0.0.10".parse().unwrap(),
                qtype: "A".into(),
                rcode: Some("NOERROR".into()),
                duration: Duration::from_millis(2),
            }]
        );
    }

    #[test]
    fn a_held_query_that_timed_out_is_known_by_its_hash() {
        let mut dns = DnsTracker::new(Duration::from_secs(5)).with_query_outcomes();
        let mut done = Vec::new();
        let mut query = seen(
            0,
            CLIENT,
            SERVER,
            message(1, QUERY, "api.example.test", A, &[]),
        );
        query.hash = Some(0xfeed);
        dns.on_message(query, &search(), &mut done);
        assert_eq!(
            dns.question(42, 0xfeed)
                .map(|q| (q.name.as_str(), q.qtype.as_ref())),
            Some(("api.example.test", "A"))
        );
        assert_eq!(dns.question(43, 0xfeed), None);
        dns.expire(5_000 * MS, &mut done);
        dns.expire(5_000 * MS + LOOKUP_SETTLE.as_nanos() as u64, &mut done);
        assert_eq!(done.len(), 1);
        dns.take_query_outcomes();
        done.clear();

        let held = |query_hash| HeldQuery {
            sent_ns: 6_000 * MS,
            cgroup_id: 42,
            sock_cookie: 5,
            id: 2,
            query_hash,
            client: CLIENT.parse().unwrap(),
            server: SERVER.parse().unwrap(),
        };
        let resolver = resolver_config("options timeout:2");
        assert_eq!(dns.deadline_ns(6_000 * MS, &resolver), 8_000 * MS);
        dns.held_query_timed_out(&held(0xfeed), &resolver, &mut done);
        dns.expire(8_000 * MS + LOOKUP_SETTLE.as_nanos() as u64, &mut done);
        assert_eq!(done.len(), 1);
        assert_eq!(
            (done[0].name.as_str(), done[0].result, done[0].timeouts),
            ("api.example.test", LookupResult::Timeout, 1)
        );
        // Unknown (its question forgotten): only its end is counted.
        dns.held_query_timed_out(&held(0xbad), &resolver, &mut done);
        let outcomes = dns.take_query_outcomes();
        assert_eq!(
            outcomes
                .iter()
                .map(|o| (o.qtype.as_ref(), o.rcode.is_none(), o.duration))
                .collect::<Vec<_>>(),
            [
                ("A", true, Duration::from_secs(2)),
                ("unknown", true, Duration::from_secs(2))
            ]
        );
        assert_eq!(done.len(), 1);
    }

    #[test]
    fn a_resolved_expansion_resolves_the_lookup_and_names_the_address() {
        let mut dns = DnsTracker::new(Duration::from_secs(5));
        let mut done = Vec::new();
        dns.on_message(
            seen(
                0,
                CLIENT,
                SERVER,
                message(1, QUERY, "api.example.test.svc.cluster.local", A, &[]),
            ),
            &search(),
            &mut done,
        );
        dns.on_message(
            seen(
                MS,
                SERVER,
                CLIENT,
                message(1, NXDOMAIN, "api.example.test.svc.cluster.local", A, &[]),
            ),
            &search(),
            &mut done,
        );
        dns.on_message(
            seen(
                2 * MS,
                CLIENT,
                SERVER,
                message(2, QUERY, "api.example.test", A, &[]),
            ),
            &search(),
            &mut done,
        );
        dns.on_message(
            seen(
                3 * MS,
                SERVER,
                CLIENT,
                message(2, RESPONSE, "api.example.test", A, &[[203, 0, 113, 10]]),
            ),
            &search(),
            &mut done,
        );
        dns.expire(3 * MS + LOOKUP_SETTLE.as_nanos() as u64, &mut done);
        assert_eq!(done[0].result, LookupResult::Resolved);
        assert_eq!(done[0].answers[0].value.to_string(), "203.0.113.10");
        assert_eq!(
            dns.name_of(42, "203.0.113.10".parse().unwrap()),
            Some("api.example.test")
        );
        assert_eq!(dns.name_of(43, "203.0.113.10".parse().unwrap()), None);
    }

    #[test]
    fn unanswered_query_times_out() {
        let mut dns = DnsTracker::new(Duration::from_secs(2));
        let mut done = Vec::new();
        dns.on_message(
            seen(
                0,
                CLIENT,
                SERVER,
                message(1, QUERY, "api.example.test", A, &[]),
            ),
            &search(),
            &mut done,
        );
        dns.expire(2_000 * MS - 1, &mut done);
        assert!(done.is_empty());
        dns.expire(2_000 * MS + LOOKUP_SETTLE.as_nanos() as u64, &mut done);
        assert_eq!(done.len(), 1);
        assert_eq!(
            (done[0].result, done[0].timeouts),
            (LookupResult::Timeout, 1)
        );
    }

    #[test]
    fn the_name_itself_unanswered_is_a_timeout_even_after_nxdomain_expansions() {
        let mut dns = DnsTracker::new(Duration::from_secs(5));
        let mut done = Vec::new();
        let expansion = "api.example.test.cluster.local";
        dns.on_message(
            seen(0, CLIENT, SERVER, message(1, QUERY, expansion, A, &[])),
            &search(),
            &mut done,
        );
        dns.on_message(
            seen(MS, SERVER, CLIENT, message(1, NXDOMAIN, expansion, A, &[])),
            &search(),
            &mut done,
        );
        dns.on_message(
            seen(
                2 * MS,
                CLIENT,
                SERVER,
                message(2, QUERY, "api.example.test", A, &[]),
            ),
            &search(),
            &mut done,
        );
        // Tracing stops before the resolver's timeout.
        dns.drain(&mut done);
        assert_eq!(done[0].result, LookupResult::Timeout);
        assert_eq!(
            done[0].rcode.as_deref(),
            Some("NXDOMAIN"),
            "the expansions' answer is kept"
        );
    }

    #[test]
    fn the_resolvers_own_timeout_applies() {
        let mut dns = DnsTracker::new(Duration::from_secs(5));
        let mut done = Vec::new();
        let resolver = resolver_config("options timeout:1");
        dns.on_message(
            seen(
                0,
                CLIENT,
                SERVER,
                message(1, QUERY, "api.example.test", A, &[]),
            ),
            &resolver,
            &mut done,
        );
        dns.expire(1_000 * MS + LOOKUP_SETTLE.as_nanos() as u64, &mut done);
        assert_eq!((done.len(), done[0].timeouts), (1, 1));
    }

    #[test]
    fn servfail_and_truncation() {
        let mut dns = DnsTracker::new(Duration::from_secs(5));
        let mut done = Vec::new();
        dns.on_message(
            seen(0, CLIENT, SERVER, message(1, QUERY, "broken.test", A, &[])),
            &search(),
            &mut done,
        );
        dns.on_message(
            seen(
                MS,
                SERVER,
                CLIENT,
                message(1, SERVFAIL, "broken.test", A, &[]),
            ),
            &search(),
            &mut done,
        );
        dns.on_message(
            seen(
                0,
                CLIENT,
                SERVER,
                message(3, QUERY, "big.example.test", A, &[]),
            ),
            &search(),
            &mut done,
        );
        dns.on_message(
            seen(
                MS,
                SERVER,
                CLIENT,
                message(3, TRUNCATED, "big.example.test", A, &[]),
            ),
            &search(),
            &mut done,
        );
        dns.drain(&mut done);
        let by_name = |n: &str| done.iter().find(|l| l.name == n).unwrap();
        assert_eq!(by_name("broken.test").result, LookupResult::Servfail);
        assert!(by_name("big.example.test").truncated);
    }

    #[test]
    fn malformed_response_settles_its_query_as_malformed() {
        let mut dns = DnsTracker::new(Duration::from_secs(5));
        let mut done = Vec::new();
        dns.on_message(
            seen(
                0,
                CLIENT,
                SERVER,
                message(1, QUERY, "api.example.test", A, &[]),
            ),
            &search(),
            &mut done,
        );
        dns.on_message(
            seen(MS, SERVER, CLIENT, vec![0xff; 5]),
            &search(),
            &mut done,
        );
        dns.expire(MS + LOOKUP_SETTLE.as_nanos() as u64, &mut done);
        assert_eq!(done[0].result, LookupResult::Malformed);
        assert_eq!(dns.stats().malformed, 1);
    }

    #[test]
    fn unmatched_responses_are_counted() {
        let mut dns = DnsTracker::new(Duration::from_secs(5));
        let mut done = Vec::new();
        dns.on_message(
            seen(MS, SERVER, CLIENT, message(9, RESPONSE, "x.test", A, &[])),
            &search(),
            &mut done,
        );
        assert_eq!(dns.stats().unmatched_responses, 1);
        assert!(done.is_empty());
    }
}
