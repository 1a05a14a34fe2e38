//! The agent's store of recent records, bounded by count and age, and the live feed that
//! `follow=true` clients read.
//!
//! Records are kept as they are and serialized (the `trace -o json` contract) only when
//! a client reads them: most are never read. The feed is a broadcast channel: the event path never waits for
//! a reader, and a reader that falls behind is told how many records it missed.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::sync::broadcast;

use crate::{node::MonotonicClock, output, pipeline::Record, verdict::Hop};

/// Records a follower may fall behind by before it skips some.
const FEED_CAPACITY: usize = 4096;

/// One finished record as the flows API serves it.
#[derive(Debug)]
pub struct StoredRecord {
    /// Position in the store's sequence (increasing, never reused).
    pub seq: u64,
    pub time: SystemTime,
    pub record: Record,
    clock: MonotonicClock,
}

impl StoredRecord {
    /// `namespace/name` of the pod, if known.
    pub fn pod(&self) -> Option<&str> {
        self.record.origin().pod.as_deref()
    }

    /// The NDJSON line, without the newline.
    pub fn line(&self) -> String {
        output::json_line(&self.record, self.clock)
    }
}

/// Bounds of the store.
#[derive(Clone, Copy, Debug)]
pub struct StoreLimits {
    pub max_records: usize,
    pub max_age: Duration,
}

pub struct FlowStore {
    records: VecDeque<Arc<StoredRecord>>,
    limits: StoreLimits,
    next_seq: u64,
    dropped_for_room: u64,
    feed: broadcast::Sender<Arc<StoredRecord>>,
}

impl FlowStore {
    pub fn new(limits: StoreLimits) -> Self {
        Self {
            records: VecDeque::new(),
            limits,
            next_seq: 0,
            dropped_for_room: 0,
            feed: broadcast::channel(FEED_CAPACITY).0,
        }
    }

    /// Adds a record (dropping the oldest beyond the count limit) and sends it to the
    /// followers.
    pub fn push(&mut self, record: Record, clock: MonotonicClock) {
        let record = Arc::new(StoredRecord {
            seq: self.next_seq,
            time: clock.to_wall(record.monotonic_ns()),
            record,
            clock,
        });
        self.next_seq += 1;
        if self.records.len() >= self.limits.max_records {
            self.records.pop_front();
            self.dropped_for_room += 1;
        }
        self.records.push_back(Arc::clone(&record));
        // No followers is not an error.
        let _ = self.feed.send(record);
    }

    /// Records dropped before their age limit, to stay within the count limit.
    pub fn dropped_for_room(&self) -> u64 {
        self.dropped_for_room
    }

    /// Drops records older than the age limit.
    pub fn expire(&mut self, now: SystemTime) {
        while let Some(oldest) = self.records.front() {
            let age = now.duration_since(oldest.time).unwrap_or_default();
            if age <= self.limits.max_age {
                break;
            }
            self.records.pop_front();
        }
    }

    /// The stored records `query` selects, oldest first, and (when following) a feed of
    /// the records added after them.
    pub fn select(
        &self,
        query: &FlowQuery,
    ) -> (
        Vec<Arc<StoredRecord>>,
        Option<broadcast::Receiver<Arc<StoredRecord>>>,
    ) {
        // Subscribed under the same lock as the snapshot: nothing falls between them.
        let feed = query.follow.then(|| self.feed.subscribe());
        let records = self
            .records
            .iter()
            .filter(|record| query.matches(record))
            .cloned()
            .collect();
        (records, feed)
    }
}

/// The filters of `/api/v1/flows`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FlowQuery {
    pub namespace: Option<String>,
    /// A pod name (with `namespace`) or `namespace/name`.
    pub pod: Option<String>,
    pub hop: Option<Hop>,
    /// Only stored records at or after this time (`0s`: none, only new ones).
    pub since: Option<SystemTime>,
    pub follow: bool,
}

/// A query parameter the flows API cannot use (HTTP 400).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct QueryError(String);

impl FlowQuery {
    /// Parses the query parameters; `now` anchors relative `since` values.
    pub fn parse(params: &[(String, String)], now: SystemTime) -> Result<Self, QueryError> {
        let mut query = Self::default();
        let mut seen: HashMap<&str, ()> = HashMap::new();
        for (key, value) in params {
            if seen.insert(key.as_str(), ()).is_some() {
                return Err(QueryError(format!("parameter {key} is given twice")));
            }
            match key.as_str() {
                "namespace" => query.namespace = Some(kubernetes_name(key, value)?.to_owned()),
                "pod" => query.pod = Some(pod_reference(value)?),
                "hop" => query.hop = Some(hop(value)?),
                "since" => query.since = Some(since(value, now)?),
                "follow" => query.follow = boolean(key, value)?,
                other => {
                    return Err(QueryError(format!(
                        "unknown parameter {other:?}; the flows API takes namespace, pod, hop, \
                         since and follow"
                    )));
                }
            }
        }
        if let (Some(namespace), Some(pod)) = (&query.namespace, &mut query.pod) {
            match pod.split_once('/') {
                Some((pod_namespace, _)) if pod_namespace != namespace => {
                    return Err(QueryError(format!(
                        "pod {pod} is not in namespace {namespace}"
                    )));
                }
                Some(_) => {}
                None => *pod = format!("{namespace}/{pod}"),
            }
        }
        Ok(query)
    }

    /// Whether a stored record is selected (`since` included).
    pub fn matches(&self, record: &StoredRecord) -> bool {
        self.since.is_none_or(|since| record.time >= since) && self.matches_live(record)
    }

    /// Whether a new record goes to a follower: `since` only limits the history.
    pub fn matches_live(&self, record: &StoredRecord) -> bool {
        let pod = record.pod();
        let namespace = pod.and_then(|p| p.split_once('/')).map(|(ns, _)| ns);
        self.namespace
            .as_deref()
            .is_none_or(|wanted| namespace == Some(wanted))
            && self
                .pod
                .as_deref()
                .is_none_or(|wanted| match wanted.split_once('/') {
                    Some(_) => pod == Some(wanted),
                    None => {
                        pod.and_then(|p| p.split_once('/')).map(|(_, name)| name) == Some(wanted)
                    }
                })
            && self.hop.is_none_or(|wanted| record.record.hop() == wanted)
    }
}

/// A namespace or pod name: a DNS-1123 subdomain (at most 253 characters).
fn kubernetes_name<'a>(key: &str, value: &'a str) -> Result<&'a str, QueryError> {
    let valid = !value.is_empty()
        && value.len() <= 253
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && value.starts_with(|c: char| c.is_ascii_alphanumeric())
        && value.ends_with(|c: char| c.is_ascii_alphanumeric());
    if valid {
        Ok(value)
    } else {
        Err(QueryError(format!(
            "{key} {value:?} is not a Kubernetes name (lower-case letters, digits, '-' and '.')"
        )))
    }
}

fn pod_reference(value: &str) -> Result<String, QueryError> {
    match value.split_once('/') {
        Some((namespace, name)) => {
            kubernetes_name("namespace", namespace)?;
            kubernetes_name("pod", name)?;
        }
        None => {
            kubernetes_name("pod", value)?;
        }
    }
    Ok(value.to_owned())
}

fn hop(value: &str) -> Result<Hop, QueryError> {
    Hop::ALL
        .into_iter()
        .find(|hop| hop.as_str() == value)
        .ok_or_else(|| {
            let names: Vec<&str> = Hop::ALL.iter().map(|hop| hop.as_str()).collect();
            QueryError(format!("hop {value:?} is not one of {}", names.join(", ")))
        })
}

/// A duration back from now (`5m`, `90s`) or an RFC 3339 time.
fn since(value: &str, now: SystemTime) -> Result<SystemTime, QueryError> {
    if let Ok(ago) = humantime::parse_duration(value) {
        return Ok(now.checked_sub(ago).unwrap_or(SystemTime::UNIX_EPOCH));
    }
    humantime::parse_rfc3339_weak(value).map_err(|_| {
        QueryError(format!(
            "since {value:?} is neither a duration (30s, 5m, 1h) nor an RFC 3339 time \
             (2026-11-26T12:00:00Z)"
        ))
    })
}

fn boolean(key: &str, value: &str) -> Result<bool, QueryError> {
    match value {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(QueryError(format!(
            "{key} must be true or false, not {value:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        flow::{Attempt, Origin, Outcome, Protocol},
        verdict::Verdict,
    };

    fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(seconds)
    }

    /// A failed (or, with `Hop::None`, successful) TCP attempt `seconds` after boot.
    fn attempt(seconds: u64, pod: Option<&str>, hop: Hop) -> Record {
        Record::Attempt(Box::new(Attempt {
            monotonic_ns: seconds * 1_000_000_000,
            origin: Arc::new(Origin {
                pod: pod.map(str::to_owned),
                pod_uid: None,
                container: None,
            }),
            pid: 7,
            comm: "curl".into(),
            cgroup_id: 1,
            sock_cookie: seconds,
            protocol: Protocol::Tcp,
            src: None,
            dst: "203.0.113.10:443".parse().unwrap(),
            dst_name: None,
            outcome: Outcome::Established,
            tcp: None,
            icmp: None,
            drops: None,
            nat: None,
            service: None,
            reply: None,
            snat: None,
            verdict: Some(Box::new(Verdict {
                hop,
                reason: "test".into(),
                symptom: None,
                likely: false,
                summary: String::new(),
                evidence: Vec::new(),
                policy: None,
                next_steps: Vec::new(),
            })),
        }))
    }

    fn record(seq: u64, seconds: u64, pod: Option<&str>, hop: Hop) -> StoredRecord {
        StoredRecord {
            seq,
            time: at(seconds),
            record: attempt(seconds, pod, hop),
            clock: MonotonicClock::new(),
        }
    }

    #[test]
    fn parses_every_filter() {
        let query = FlowQuery::parse(
            &params(&[
                ("namespace", "shop"),
                ("pod", "web"),
                ("hop", "network-policy"),
                ("since", "5m"),
                ("follow", "true"),
            ]),
            at(1000),
        )
        .unwrap();
        assert_eq!(
            query,
            FlowQuery {
                namespace: Some("shop".into()),
                pod: Some("shop/web".into()),
                hop: Some(Hop::NetworkPolicy),
                since: Some(at(700)),
                follow: true,
            }
        );
        let query =
            FlowQuery::parse(&params(&[("since", "1970-01-01T00:10:00Z")]), at(1000)).unwrap();
        assert_eq!(query.since, Some(at(600)));
    }

    #[test]
    fn rejects_bad_parameters_with_the_reason() {
        let now = at(1000);
        let error = |pairs: &[(&str, &str)]| FlowQuery::parse(&params(pairs), now).unwrap_err().0;
        assert!(error(&[("hop", "dnss")]).contains("is not one of dns, network-policy"));
        assert!(error(&[("since", "yesterday")]).contains("neither a duration"));
        assert!(error(&[("follow", "yes")]).contains("true or false"));
        assert!(error(&[("namespace", "Shop")]).contains("not a Kubernetes name"));
        assert!(error(&[("pod", "a/b/c")]).contains("not a Kubernetes name"));
        assert!(error(&[("pods", "x")]).contains("unknown parameter \"pods\""));
        assert!(error(&[("hop", "dns"), ("hop", "proxy")]).contains("given twice"));
        assert!(error(&[("namespace", "a"), ("pod", "b/web")]).contains("not in namespace a"));
    }

    #[test]
    fn filters_by_namespace_pod_hop_and_time() {
        let web = record(1, 100, Some("shop/web"), Hop::NetworkPolicy);
        let db = record(2, 200, Some("shop/db"), Hop::None);
        let host = record(3, 300, None, Hop::Dns);
        let select = |pairs: &[(&str, &str)]| -> Vec<u64> {
            let query = FlowQuery::parse(&params(pairs), at(1000)).unwrap();
            [&web, &db, &host]
                .into_iter()
                .filter(|r| query.matches(r))
                .map(|r| r.seq)
                .collect()
        };
        assert_eq!(select(&[]), [1, 2, 3]);
        assert_eq!(select(&[("namespace", "shop")]), [1, 2]);
        assert_eq!(select(&[("pod", "web")]), [1]);
        assert_eq!(select(&[("pod", "shop/db")]), [2]);
        assert_eq!(select(&[("hop", "dns")]), [3]);
        assert_eq!(select(&[("since", "1970-01-01T00:03:00Z")]), [2, 3]);
    }

    #[test]
    fn bounded_by_count_and_age_and_feeds_followers() {
        let mut store = FlowStore::new(StoreLimits {
            max_records: 2,
            max_age: Duration::from_secs(60),
        });
        let (_, feed) = store.select(&FlowQuery {
            follow: true,
            ..FlowQuery::default()
        });
        let mut feed = feed.unwrap();
        let clock = MonotonicClock::new();
        for seconds in [10, 20, 30] {
            store.push(attempt(seconds, None, Hop::None), clock);
        }
        let (kept, _) = store.select(&FlowQuery::default());
        assert_eq!(kept.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(feed.try_recv().unwrap().seq, 0);
        store.expire(clock.to_wall(85_000_000_000));
        let (kept, _) = store.select(&FlowQuery::default());
        assert_eq!(kept.iter().map(|r| r.seq).collect::<Vec<_>>(), [2]);
    }
}
