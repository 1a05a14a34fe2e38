//! The lab's addresses. Private ranges follow AKS defaults (pods 10.244.0.0/16, services
//! 10.0.0.0/16, node subnet 10.224.0.0/16); everything "public" comes from the
//! documentation ranges (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32).

use std::net::{Ipv4Addr, Ipv6Addr};

pub const POD_CIDR: &str = "10.244.0.0/16";
pub const POD_CIDR6: &str = "fd00:10:244::/64";
pub const SERVICE_CIDR: &str = "10.0.0.0/16";
/// The node's bridge address, the pods' gateway.
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
pub const POD_GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 1);
/// Host part of the first pod's address (10.244.0.10); later pods count up.
pub const FIRST_POD_HOST: u8 = 10;

/// The node's uplink address (the SNAT source of pod traffic).
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 224, 0, 4);
pub const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x224, 0, 0, 0, 0, 4);
/// The upstream router on the node's subnet (Azure's default gateway).
pub const UPSTREAM_NODE_SIDE: Ipv4Addr = Ipv4Addr::new(10, 224, 0, 1);
pub const UPSTREAM_NODE_SIDE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x224, 0, 0, 0, 0, 1);
/// The upstream router (router 1) towards router 2.
pub const UPSTREAM_INET_SIDE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const UPSTREAM_INET_SIDE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x1, 0, 0, 0, 0, 1);
/// Router 2, between router 1 and the internet (a firewall or peering hop): its address
/// towards router 1, the one its ICMP errors to the node come from.
pub const ROUTER2: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
pub const ROUTER2_6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x1, 0, 0, 0, 0, 2);
/// Router 2's address towards the internet host.
pub const ROUTER2_INET_SIDE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 129);
pub const ROUTER2_INET_SIDE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x2, 0, 0, 0, 0, 1);
/// The internet host's own address on its link to router 2.
pub const INTERNET_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 130);
pub const INTERNET_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x2, 0, 0, 0, 0, 2);
/// An address on the internet side where nothing answers (router 2 may reset it).
pub const NOBODY: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 99);

/// The HTTP endpoint pods try to reach, and its DNS name.
pub const ENDPOINT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
pub const ENDPOINT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 0x10);
pub const ENDPOINT_NAME: &str = "api.example.test";
pub const HTTP_PORT: u16 = 80;
/// A port nothing listens on at the endpoint.
pub const CLOSED_PORT: u16 = 81;
/// The benchmarks' sink: accepts and closes at once.
pub const SINK_PORT: u16 = 9000;
/// A port where the endpoint answers HTTP 503.
pub const ERROR_PORT: u16 = 8503;
/// A forward proxy on the endpoint host that answers 403 to everything.
pub const PROXY_PORT: u16 = 3128;

/// A name under the endpoint's zone that does not exist (NXDOMAIN).
pub const MISSING_NAME: &str = "missing.example.test";
/// A name with so many addresses that its answer does not fit a 512-byte UDP message:
/// resolvers get a truncated answer and retry over TCP.
pub const BIG_NAME: &str = "big.example.test";
/// How many addresses [`BIG_NAME`] has (203.0.113.100 and up).
pub const BIG_NAME_ADDRESSES: u8 = 40;
/// A zone whose authoritative server answers SERVFAIL to everything.
pub const SERVFAIL_ZONE: &str = "servfail.test";

/// The upstream DNS server (Azure DNS's role).
pub const UPSTREAM_DNS: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 53);
/// The broken authoritative server of [`SERVFAIL_ZONE`].
pub const BROKEN_DNS: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 54);
/// The cluster DNS Service IP (CoreDNS's role).
pub const CLUSTER_DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
/// The point-to-point link between the node and the cluster DNS namespace.
pub const DNS_LINK_NODE: Ipv4Addr = Ipv4Addr::new(169, 254, 53, 1);
pub const DNS_LINK_DNS: Ipv4Addr = Ipv4Addr::new(169, 254, 53, 2);
