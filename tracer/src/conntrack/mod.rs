//! The node's conntrack and NAT, from the sources that see them best:
//!
//! - eBPF (`tracer-ebpf`): conntrack's drops (`kfree_skb`, with the entry's state),
//!   joined to the flow by the entry's original tuple.
//! - ctnetlink ([`netlink`]): per flow, the [`Translation`] in its entry, looked up by
//!   the flow's original tuple when its record is made (the verdicts read it); and a dump
//!   of the whole table, for SNAT port pressure ([`snat`]): the node's SNAT ports are
//!   shared by every pod and host process, most of them untraced.
//! - `/proc/net/stat/nf_conntrack` (here, [`ConntrackStats`]): how full the table is and
//!   the per-CPU failure counters (`conntrack -S`), which no flow carries: they
//!   corroborate the kernel's drops.
//!
//! [`watch`] refreshes the last two in the background.

use std::{
    collections::HashMap,
    fs, io,
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

use tokio::sync::watch;

pub mod netlink;
pub mod snat;

/// What the node's NAT made of a flow's addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// The source after SNAT/MASQUERADE, when it changed.
    pub src: Option<SocketAddr>,
    /// The destination after DNAT (a Service to its backend), when it changed.
    pub dst: Option<SocketAddr>,
}

impl Translation {
    /// The translation of a conntrack entry: the reply direction is addressed to the
    /// translated source, and comes from the translated destination.
    pub fn of(entry: &netlink::Entry) -> Self {
        let changed = |reply: SocketAddr, original| (reply != original).then_some(reply);
        Self {
            src: changed(entry.reply.dst, entry.original.src),
            dst: changed(entry.reply.src, entry.original.dst),
        }
    }
}

/// What [`watch`] publishes.
#[derive(Clone, Debug, Default)]
pub struct NodeConntrack {
    pub stats: Option<ConntrackStats>,
    pub snat: Option<snat::SnatTable>,
}

/// The background reading may keep one CPU busy at most 1/`READ_DUTY_DIVISOR` of the
/// time: a dump of a node's table (hundreds of thousands of entries on busy nodes) costs
/// the kernel and the tracer a few microseconds per entry.
const READ_DUTY_DIVISOR: u32 = 100;

/// Reads the node's conntrack figures every `every` on a thread of its own (a dump of a
/// large table takes a while, and must not hold up the event path), until the receiver
/// is dropped; less often when a reading takes longer than a 1/`READ_DUTY_DIVISOR` share
/// of `every`. `in_idle_time`: the thread runs under `SCHED_IDLE`, on CPU time the
/// node's workloads leave (the agent's background figures; a busy node delays them).
/// `on_error` hears of each source's first failure.
pub fn watch(
    budget: Option<u32>,
    every: Duration,
    in_idle_time: bool,
    on_error: impl Fn(String) + Send + 'static,
) -> io::Result<watch::Receiver<NodeConntrack>> {
    let (sender, receiver) = watch::channel(NodeConntrack::default());
    thread::Builder::new()
        .name("conntrack".to_owned())
        .spawn(move || {
            if in_idle_time && let Err(e) = crate::schedule_calling_thread(libc::SCHED_IDLE) {
                on_error(format!(
                    "the conntrack reader runs at the tracer's priority: cannot set SCHED_IDLE ({e})"
                ));
            }
            let mut snat_failed = false;
            loop {
                let started = Instant::now();
                let stats = ConntrackStats::read().ok().flatten();
                let snat = match snat::SnatTable::read(budget) {
                    Ok(table) => Some(table),
                    Err(e) => {
                        if !snat_failed {
                            on_error(format!(
                                "SNAT port usage is unavailable: cannot dump the conntrack table over ctnetlink ({e}); it needs CAP_NET_ADMIN and the nf_conntrack_netlink module"
                            ));
                            snat_failed = true;
                        }
                        None
                    }
                };
                if sender.send(NodeConntrack { stats, snat }).is_err() {
                    return;
                }
                thread::sleep(pause_after(started.elapsed(), every));
            }
        })?;
    Ok(receiver)
}

/// How long to wait after a reading that took `took`: `every`, or long enough to keep the
/// reading's share of the time at 1/`READ_DUTY_DIVISOR`.
fn pause_after(took: Duration, every: Duration) -> Duration {
    every.max(took.saturating_mul(READ_DUTY_DIVISOR - 1))
}

/// Node-wide conntrack figures at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConntrackStats {
    /// Entries in the table (`nf_conntrack_count`).
    pub entries: u64,
    /// The table's size (`nf_conntrack_max`).
    pub limit: u64,
    /// New entries that could not be inserted (typically two packets of one new flow
    /// racing, such as parallel A and AAAA queries on one socket).
    pub insert_failed: u64,
    /// Packets dropped because no entry could be made (table full, early drop failed).
    pub drop: u64,
    /// Entries dropped early to make room.
    pub early_drop: u64,
    /// Packets conntrack could not track (invalid state).
    pub invalid: u64,
}

impl ConntrackStats {
    /// Reads the figures of the tracer's network namespace; `None` when conntrack is not
    /// loaded there.
    pub fn read() -> io::Result<Option<Self>> {
        let Ok(stat) = fs::read_to_string("/proc/net/stat/nf_conntrack") else {
            return Ok(None);
        };
        let read_number = |path: &str| -> io::Result<u64> {
            fs::read_to_string(path)?
                .trim()
                .parse()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{path}: {e}")))
        };
        let totals = per_cpu_totals(&stat);
        let total = |name: &str| totals.get(name).copied().unwrap_or(0);
        Ok(Some(Self {
            entries: read_number("/proc/sys/net/netfilter/nf_conntrack_count")?,
            limit: read_number("/proc/sys/net/netfilter/nf_conntrack_max")?,
            insert_failed: total("insert_failed"),
            drop: total("drop"),
            early_drop: total("early_drop"),
            invalid: total("invalid"),
        }))
    }

    /// The failure counters' growth since `earlier` (entries and limit are this reading's).
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            entries: self.entries,
            limit: self.limit,
            insert_failed: self.insert_failed.saturating_sub(earlier.insert_failed),
            drop: self.drop.saturating_sub(earlier.drop),
            early_drop: self.early_drop.saturating_sub(earlier.early_drop),
            invalid: self.invalid.saturating_sub(earlier.invalid),
        }
    }
}

/// Sums `/proc/net/stat/nf_conntrack`: a header of column names, then one line of hex
/// counters per CPU. Malformed lines are skipped.
fn per_cpu_totals(text: &str) -> HashMap<String, u64> {
    let mut lines = text.lines();
    let Some(header) = lines.next() else {
        return HashMap::new();
    };
    let names: Vec<&str> = header.split_whitespace().collect();
    let mut totals: HashMap<String, u64> = HashMap::new();
    for line in lines {
        let values: Option<Vec<u64>> = line
            .split_whitespace()
            .map(|v| u64::from_str_radix(v, 16).ok())
            .collect();
        let Some(values) = values.filter(|v| v.len() == names.len()) else {
            continue;
        };
        for (name, value) in names.iter().zip(values) {
            let total = totals.entry((*name).to_owned()).or_default();
            *total = total.saturating_add(value);
        }
    }
    totals
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_readings_are_spaced_to_keep_their_share_of_the_time() {
        let every = Duration::from_secs(10);
        assert_eq!(pause_after(Duration::from_millis(70), every), every);
        assert_eq!(
            pause_after(Duration::from_millis(650), every),
            Duration::from_millis(64_350)
        );
    }

    #[test]
    fn sums_per_cpu_columns() {
        let text = "\
entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart
00000005  00000000 00000000 00000000 00000002 00000000 00000000 00000000 00000000 00000003 00000001 00000000 00000000  00000000 00000000 00000000 00000000
00000005  00000001 00000000 00000000 0000000a 00000000 00000000 00000000 00000000 00000010 00000000 00000004 00000000  00000000 00000000 00000000 00000000
garbage line
";
        let totals = per_cpu_totals(text);
        assert_eq!(totals["insert_failed"], 0x13);
        assert_eq!(totals["invalid"], 0x0c);
        assert_eq!(totals["drop"], 1);
        assert_eq!(totals["early_drop"], 4);
        assert!(per_cpu_totals("").is_empty());
    }

    #[test]
    fn growth_since_an_earlier_reading() {
        let before = ConntrackStats {
            entries: 10,
            limit: 100,
            insert_failed: 2,
            drop: 0,
            early_drop: 1,
            invalid: 5,
        };
        let after = ConntrackStats {
            entries: 12,
            insert_failed: 3,
            invalid: 9,
            ..before
        };
        assert_eq!(
            after.since(&before),
            ConntrackStats {
                entries: 12,
                limit: 100,
                insert_failed: 1,
                drop: 0,
                early_drop: 0,
                invalid: 4
            }
        );
    }
}
