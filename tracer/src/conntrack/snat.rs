//! SNAT port pressure: how many translated flows the node holds at once towards one
//! destination, per (translated address, destination address, destination port,
//! protocol), from a ctnetlink dump of the whole table (every pod and host process shares
//! the node's SNAT ports).
//!
//! Two limits matter. The node's own: the local port range
//! (`net.ipv4.ip_local_port_range`). The cloud's, usually smaller: an Azure load
//! balancer gives each node a fixed number of SNAT ports, reusable across different
//! destinations (so usage is counted per destination). AKS leaves `allocatedOutboundPorts`
//! at 0, which allocates by backend pool size: 1,024 ports per node up to 50 nodes, 512 up
//! to 100, 256 up to 200, 128 up to 400, 64 up to 800, 32 up to 1,000. A NAT gateway
//! shares 64,512 ports per public address across the subnet instead. The cloud's number
//! is not visible from the node, so it comes from the user (`--snat-port-budget`).

use std::{
    collections::HashMap,
    fs, io,
    net::{IpAddr, SocketAddr},
};

use super::netlink::{self, Entry};

/// At most this many destinations are counted; more are summed in
/// [`SnatTable::uncounted`].
const MAX_DESTINATIONS: usize = 65_536;
/// Usage at or above this share of the limit is "near" it.
const NEAR_PERCENT: u64 = 90;

/// The node's translated flows towards one destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Destination {
    translated: IpAddr,
    dst: SocketAddr,
    protocol: u8,
}

/// Concurrent SNAT usage of the node, from one dump.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnatTable {
    usage: HashMap<Destination, u32>,
    /// Translated flows to destinations beyond [`MAX_DESTINATIONS`].
    uncounted: u64,
    /// The node's local port range, as (first, last).
    pub port_range: (u16, u16),
    /// The cloud load balancer's allocation per node, from `--snat-port-budget`.
    pub budget: Option<u32>,
}

/// One destination's usage, with the limits it is judged against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnatUsage {
    pub translated: IpAddr,
    pub dst: SocketAddr,
    pub protocol: u8,
    pub in_use: u32,
    pub port_range: (u16, u16),
    pub budget: Option<u32>,
    /// The dump had more destinations than are counted, so `in_use` may be low.
    pub lower_bound: bool,
}

impl SnatUsage {
    fn range_size(&self) -> u32 {
        u32::from(self.port_range.1.saturating_sub(self.port_range.0)) + 1
    }

    /// The limit that binds first: the cloud's budget if known, else the node's range.
    pub fn limit(&self) -> u32 {
        self.budget.unwrap_or(u32::MAX).min(self.range_size())
    }

    /// Usage is within 10% of the limit.
    pub fn near_budget(&self) -> bool {
        u64::from(self.in_use) * 100 >= u64::from(self.limit()) * NEAR_PERCENT
    }

    pub fn describe(&self) -> String {
        let protocol = match self.protocol {
            6 => "TCP",
            17 => "UDP",
            _ => "other",
        };
        let budget = match self.budget {
            Some(budget) => format!("a SNAT budget of {budget} ports (--snat-port-budget)"),
            None => "no SNAT budget given (--snat-port-budget)".to_owned(),
        };
        format!(
            "{} {protocol} flows translated to {} towards {} at once (ctnetlink dump of the node's conntrack table), against {budget} and the node's local port range {}-{} ({} ports)",
            self.in_use,
            self.translated,
            self.dst,
            self.port_range.0,
            self.port_range.1,
            self.range_size()
        ) + if self.lower_bound {
            "; a lower bound: the node had more SNAT destinations than are counted"
        } else {
            ""
        }
    }
}

impl SnatTable {
    /// An empty table with the node's port range and the user's budget.
    pub fn new(port_range: (u16, u16), budget: Option<u32>) -> Self {
        Self {
            port_range,
            budget,
            ..Self::default()
        }
    }

    /// Dumps the translated entries of the caller's network namespace's conntrack table.
    pub fn read(budget: Option<u32>) -> io::Result<Self> {
        let mut table = Self::new(local_port_range()?, budget);
        netlink::dump(netlink::IPS_SRC_NAT, |entry| table.add(entry))?;
        Ok(table)
    }

    /// Counts one conntrack entry, if its source is translated.
    pub fn add(&mut self, entry: &Entry) {
        // The reply goes to the translated source; without SNAT it goes to the original.
        if entry.reply.dst == entry.original.src {
            return;
        }
        let key = Destination {
            translated: entry.reply.dst.ip(),
            // Where the flow really goes: after any DNAT, the reply's source.
            dst: entry.reply.src,
            protocol: entry.protocol,
        };
        if let Some(count) = self.usage.get_mut(&key) {
            *count += 1;
        } else if self.usage.len() < MAX_DESTINATIONS {
            self.usage.insert(key, 1);
        } else {
            self.uncounted += 1;
        }
    }

    /// Every counted destination (after DNAT) with its translated flows.
    pub fn destinations(&self) -> impl Iterator<Item = (SocketAddr, u32)> + '_ {
        self.usage.iter().map(|(key, in_use)| (key.dst, *in_use))
    }

    /// The usage towards `dst` of flows translated to `translated`.
    pub fn usage(&self, translated: IpAddr, dst: SocketAddr, protocol: u8) -> SnatUsage {
        let key = Destination {
            translated,
            dst,
            protocol,
        };
        SnatUsage {
            translated,
            dst,
            protocol,
            in_use: self.usage.get(&key).copied().unwrap_or(0),
            port_range: self.port_range,
            budget: self.budget,
            lower_bound: self.uncounted > 0,
        }
    }
}

/// `net.ipv4.ip_local_port_range` of the caller's network namespace.
pub fn local_port_range() -> io::Result<(u16, u16)> {
    let text = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")?;
    parse_port_range(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected ip_local_port_range {text:?}"),
        )
    })
}

fn parse_port_range(text: &str) -> Option<(u16, u16)> {
    let mut parts = text.split_whitespace().map(str::parse::<u16>);
    let (first, last) = (parts.next()?.ok()?, parts.next()?.ok()?);
    (first <= last).then_some((first, last))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::netlink::Tuple;

    fn entry(pod: &str, dst: &str, translated: &str) -> Entry {
        let (pod, dst, translated) = (
            pod.parse().unwrap(),
            dst.parse().unwrap(),
            translated.parse().unwrap(),
        );
        Entry {
            protocol: 6,
            original: Tuple { src: pod, dst },
            reply: Tuple {
                src: dst,
                dst: translated,
            },
            status: 0,
        }
    }

    #[test]
    fn counts_translated_flows_per_destination() {
        let mut table = SnatTable::new((32768, 60999), Some(4));
        table.add(&entry(
            "10.244.0.10:40001",
            "203.0.113.10:443",
            "10.224.0.4:1024",
        ));
        table.add(&entry(
            "10.244.0.11:40002",
            "203.0.113.10:443",
            "10.224.0.4:1025",
        ));
        table.add(&entry(
            "10.244.0.11:40003",
            "203.0.113.10:443",
            "10.224.0.4:1026",
        ));
        table.add(&entry(
            "10.244.0.11:40004",
            "203.0.113.10:80",
            "10.224.0.4:1027",
        ));
        // Not translated: the reply returns to the original source.
        table.add(&entry(
            "10.244.0.12:40005",
            "203.0.113.10:443",
            "10.244.0.12:40005",
        ));
        let node: IpAddr = "10.224.0.4".parse().unwrap();
        let usage = table.usage(node, "203.0.113.10:443".parse().unwrap(), 6);
        assert_eq!((usage.in_use, usage.limit()), (3, 4));
        assert!(!usage.near_budget());
        table.add(&entry(
            "10.244.0.13:40006",
            "203.0.113.10:443",
            "10.224.0.4:1028",
        ));
        let usage = table.usage(node, "203.0.113.10:443".parse().unwrap(), 6);
        assert_eq!(usage.in_use, 4);
        assert!(usage.near_budget());
        assert_eq!(
            table
                .usage(node, "203.0.113.10:80".parse().unwrap(), 17)
                .in_use,
            0
        );
    }

    #[test]
    fn destinations_beyond_the_bound_are_counted_as_missing() {
        let mut table = SnatTable::new((32768, 60999), None);
        for n in 0..=MAX_DESTINATIONS as u32 {
            let dst = format!("{}:443", std::net::Ipv4Addr::from(0xcb00_0000 + n));
            table.add(&entry("10.244.0.10:40000", &dst, "10.224.0.4:1024"));
        }
        let node: IpAddr = "10.224.0.4".parse().unwrap();
        let usage = table.usage(node, "203.0.0.0:443".parse().unwrap(), 6);
        assert_eq!((usage.in_use, usage.lower_bound), (1, true));
        assert!(
            usage
                .describe()
                .ends_with("a lower bound: the node had more SNAT destinations than are counted")
        );
        assert!(
            !SnatTable::new((1, 2), None)
                .usage(node, "203.0.0.0:443".parse().unwrap(), 6)
                .lower_bound
        );
    }

    #[test]
    fn without_a_budget_the_node_range_is_the_limit() {
        let table = SnatTable::new((60000, 60009), None);
        let mut usage = table.usage(
            "10.224.0.4".parse().unwrap(),
            "192.0.2.1:53".parse().unwrap(),
            17,
        );
        assert_eq!(usage.limit(), 10);
        usage.in_use = 8;
        assert!(!usage.near_budget());
        usage.in_use = 9;
        assert!(usage.near_budget());
        assert!(
            usage.describe().contains("no SNAT budget given"),
            "{}",
            usage.describe()
        );
    }

    #[test]
    fn parses_the_port_range() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_port_range("5 4"), None);
        assert_eq!(parse_port_range("x"), None);
        assert_eq!(parse_port_range(""), None);
    }
}
