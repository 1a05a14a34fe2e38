//! Table-driven cases, each following the Kubernetes NetworkPolicy documentation
//! (concepts/services-networking/network-policies and the `networking.k8s.io/v1` API
//! reference); the comment of each case says which rule of it is exercised.

use std::path::Path;

use super::*;
use crate::cluster::manifests::{Manifests, load_text};

/// Namespaces, pods and their named ports shared by every case.
const CLUSTER: &str = r#"
kind: Namespace
apiVersion: v1
metadata: {name: shop, labels: {team: shop, env: prod}}
---
kind: Namespace
apiVersion: v1
metadata: {name: db, labels: {team: db, env: prod}}
---
kind: Namespace
apiVersion: v1
metadata: {name: dev, labels: {env: dev}}
---
kind: Pod
apiVersion: v1
metadata: {name: web, namespace: shop, uid: u1, labels: {app: web, tier: frontend}}
spec: {containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.244.0.10}
---
kind: Pod
apiVersion: v1
metadata: {name: api, namespace: shop, uid: u2, labels: {app: api, tier: backend}}
spec: {containers: [{name: c, ports: [{name: grpc, containerPort: 9090}, {name: metrics, containerPort: 9100}]}]}
status: {podIP: 10.244.0.11}
---
kind: Pod
apiVersion: v1
metadata: {name: postgres, namespace: db, uid: u3, labels: {app: postgres}}
spec: {containers: [{name: c, ports: [{name: pg, containerPort: 5432}]}]}
status: {podIP: 10.244.1.10}
---
kind: Pod
apiVersion: v1
metadata: {name: tool, namespace: dev, uid: u4, labels: {app: tool}}
spec: {containers: [{name: c}]}
status: {podIP: 10.244.2.10}
---
kind: Pod
apiVersion: v1
metadata: {name: coredns, namespace: kube-system, uid: u5, labels: {k8s-app: kube-dns}}
spec: {containers: [{name: c, ports: [{name: dns, containerPort: 53, protocol: UDP}, {name: dns-tcp, containerPort: 53}]}]}
status: {podIP: 10.244.3.10}
---
kind: Pod
apiVersion: v1
metadata: {name: agent, namespace: shop, uid: u6, labels: {app: agent}}
spec: {hostNetwork: true, containers: [{name: c}]}
status: {podIP: 10.224.0.4}
"#;

/// What a case expects.
enum Expect {
    /// Allowed; by `(policy, direction, rule)` or by no isolation at all.
    Allowed(Option<(&'static str, Direction, usize)>),
    /// Denied by these policies.
    Denied(&'static [&'static str]),
}
use Expect::{Allowed, Denied};

struct Case {
    name: &'static str,
    /// `(namespace, name, spec as YAML flow)`.
    policies: &'static [(&'static str, &'static str, &'static str)],
    src: &'static str,
    /// `ip:port/PROTO`.
    to: &'static str,
    expect: Expect,
}

const E: Direction = Direction::Egress;
const I: Direction = Direction::Ingress;

const DENY_ALL_EGRESS: (&str, &str, &str) = (
    "shop",
    "deny-egress",
    "{podSelector: {}, policyTypes: [Egress]}",
);

fn cases() -> Vec<Case> {
    vec![
        // No policy selects the pod: not isolated, everything is allowed.
        Case {
            name: "no policies",
            policies: &[],
            src: "shop/web",
            to: "203.0.113.10:443/TCP",
            expect: Allowed(None),
        },
        // A policy in another namespace does not select the pod.
        Case {
            name: "policy of another namespace",
            policies: &[("db", "deny", "{podSelector: {}, policyTypes: [Egress]}")],
            src: "shop/web",
            to: "203.0.113.10:443/TCP",
            expect: Allowed(None),
        },
        // podSelector picks pods by label: a non-matching pod is not isolated.
        Case {
            name: "podSelector does not match",
            policies: &[(
                "shop",
                "deny-api",
                "{podSelector: {matchLabels: {app: api}}, policyTypes: [Egress]}",
            )],
            src: "shop/web",
            to: "203.0.113.10:443/TCP",
            expect: Allowed(None),
        },
        // Default deny all egress: empty podSelector, policyTypes Egress, no rules.
        Case {
            name: "default deny egress",
            policies: &[DENY_ALL_EGRESS],
            src: "shop/web",
            to: "203.0.113.10:443/TCP",
            expect: Denied(&["shop/deny-egress"]),
        },
        // Default deny egress also stops DNS.
        Case {
            name: "default deny egress stops DNS",
            policies: &[DENY_ALL_EGRESS],
            src: "shop/web",
            to: "10.0.0.10:53/UDP",
            expect: Denied(&["shop/deny-egress"]),
        },
        // Allow all egress: one empty rule.
        Case {
            name: "allow all egress",
            policies: &[(
                "shop",
                "allow-all",
                "{podSelector: {}, egress: [{}], policyTypes: [Egress]}",
            )],
            src: "shop/web",
            to: "203.0.113.10:443/TCP",
            expect: Allowed(Some(("shop/allow-all", E, 0))),
        },
        // `egress: []` with Egress: no rule, deny all.
        Case {
            name: "empty egress list denies",
            policies: &[(
                "shop",
                "none",
                "{podSelector: {}, egress: [], policyTypes: [Egress]}",
            )],
            src: "shop/web",
            to: "203.0.113.10:443/TCP",
            expect: Denied(&["shop/none"]),
        },
        // policyTypes defaults: without it and without egress rules, only Ingress.
        Case {
            name: "policyTypes default without egress is ingress only",
            policies: &[("shop", "ingress-only", "{podSelector: {}}")],
            src: "shop/web",
            to: "203.0.113.10:443/TCP",
            expect: Allowed(None),
        },
        // policyTypes defaults: egress rules make it an Egress policy too.
        Case {
            name: "policyTypes default with egress rules",
            policies: &[(
                "shop",
                "dns-only",
                "{podSelector: {}, egress: [{ports: [{port: 53, protocol: UDP}]}]}",
            )],
            src: "shop/web",
            to: "203.0.113.10:443/TCP",
            expect: Denied(&["shop/dns-only"]),
        },
        Case {
            name: "policyTypes default egress rule allows",
            policies: &[(
                "shop",
                "dns-only",
                "{podSelector: {}, egress: [{ports: [{port: 53, protocol: UDP}]}]}",
            )],
            src: "shop/web",
            to: "10.0.0.10:53/UDP",
            expect: Allowed(Some(("shop/dns-only", E, 0))),
        },
        // policyTypes [Ingress] with egress rules: egress rules are ignored.
        Case {
            name: "explicit Ingress type ignores egress rules",
            policies: &[(
                "shop",
                "x",
                "{podSelector: {}, egress: [], policyTypes: [Ingress]}",
            )],
            src: "shop/web",
            to: "203.0.113.10:443/TCP",
            expect: Allowed(None),
        },
        // `to` absent: all destinations, on the listed ports.
        Case {
            name: "to absent matches any destination",
            policies: &[(
                "shop",
                "https",
                "{podSelector: {}, policyTypes: [Egress], egress: [{ports: [{port: 443}]}]}",
            )],
            src: "shop/web",
            to: "198.51.100.5:443/TCP",
            expect: Allowed(Some(("shop/https", E, 0))),
        },
        // `to: []` (empty): all destinations too.
        Case {
            name: "to empty matches any destination",
            policies: &[(
                "shop",
                "https",
                "{podSelector: {}, policyTypes: [Egress], egress: [{to: [], ports: [{port: 443}]}]}",
            )],
            src: "shop/web",
            to: "198.51.100.5:443/TCP",
            expect: Allowed(Some(("shop/https", E, 0))),
        },
        // `ports` absent: all ports to the listed peers.
        Case {
            name: "ports absent matches any port",
            policies: &[(
                "shop",
                "net",
                "{podSelector: {}, policyTypes: [Egress], egress: [{to: [{ipBlock: {cidr: 203.0.113.0/24}}]}]}",
            )],
            src: "shop/web",
            to: "203.0.113.10:8443/TCP",
            expect: Allowed(Some(("shop/net", E, 0))),
        },
        // `ports: []` (empty): all ports too.
        Case {
            name: "ports empty matches any port",
            policies: &[(
                "shop",
                "net",
                "{podSelector: {}, policyTypes: [Egress], egress: [{to: [{ipBlock: {cidr: 203.0.113.0/24}}], ports: []}]}",
            )],
            src: "shop/web",
            to: "203.0.113.10:8443/UDP",
            expect: Allowed(Some(("shop/net", E, 0))),
        },
        // Protocol defaults to TCP.
        Case {
            name: "protocol defaults to TCP (TCP allowed)",
            policies: &[(
                "shop",
                "p",
                "{podSelector: {}, policyTypes: [Egress], egress: [{ports: [{port: 53}]}]}",
            )],
            src: "shop/web",
            to: "10.0.0.10:53/TCP",
            expect: Allowed(Some(("shop/p", E, 0))),
        },
        Case {
            name: "protocol defaults to TCP (UDP denied)",
            policies: &[(
                "shop",
                "p",
                "{podSelector: {}, policyTypes: [Egress], egress: [{ports: [{port: 53}]}]}",
            )],
            src: "shop/web",
            to: "10.0.0.10:53/UDP",
            expect: Denied(&["shop/p"]),
        },
        // SCTP is a protocol of its own.
        Case {
            name: "SCTP port",
            policies: &[(
                "shop",
                "s",
                "{podSelector: {}, policyTypes: [Egress], egress: [{ports: [{port: 3868, protocol: SCTP}]}]}",
            )],
            src: "shop/web",
            to: "198.51.100.5:3868/SCTP",
            expect: Allowed(Some(("shop/s", E, 0))),
        },
        Case {
            name: "SCTP rule does not allow TCP",
            policies: &[(
                "shop",
                "s",
                "{podSelector: {}, policyTypes: [Egress], egress: [{ports: [{port: 3868, protocol: SCTP}]}]}",
            )],
            src: "shop/web",
            to: "198.51.100.5:3868/TCP",
            expect: Denied(&["shop/s"]),
        },
        // A protocol without a port: every port of that protocol.
        Case {
            name: "protocol without port",
            policies: &[(
                "shop",
                "udp",
                "{podSelector: {}, policyTypes: [Egress], egress: [{ports: [{protocol: UDP}]}]}",
            )],
            src: "shop/web",
            to: "198.51.100.5:5000/UDP",
            expect: Allowed(Some(("shop/udp", E, 0))),
        },
        // endPort: a range, inclusive at both ends.
        Case {
            name: "endPort lower bound",
            policies: &[(
                "shop",
                "range",
                "{podSelector: {}, policyTypes: [Egress], egress: [{ports: [{port: 32000, endPort: 32768}]}]}",
            )],
            src: "shop/web",
            to: "198.51.100.5:32000/TCP",
            expect: Allowed(Some(("shop/range", E, 0))),
        },
        Case {
            name: "endPort upper bound",
            policies: &[(
                "shop",
                "range",
                "{podSelector: {}, policyTypes: [Egress], egress: [{ports: [{port: 32000, endPort: 32768}]}]}",
            )],
            src: "shop/web",
            to: "198.51.100.5:32768/TCP",
            expect: Allowed(Some(("shop/range", E, 0))),
        },
        Case {
            name: "endPort outside",
            policies: &[(
                "shop",
                "range",
                "{podSelector: {}, policyTypes: [Egress], egress: [{ports: [{port: 32000, endPort: 32768}]}]}",
            )],
            src: "shop/web",
            to: "198.51.100.5:32769/TCP",
            expect: Denied(&["shop/range"]),
        },
        Case {
            name: "below the range",
            policies: &[(
                "shop",
                "range",
                "{podSelector: {}, policyTypes: [Egress], egress: [{ports: [{port: 32000, endPort: 32768}]}]}",
            )],
            src: "shop/web",
            to: "198.51.100.5:31999/TCP",
            expect: Denied(&["shop/range"]),
        },
        // A single port is exact.
        Case {
            name: "single port mismatch",
            policies: &[(
                "shop",
                "https",
                "{podSelector: {}, policyTypes: [Egress], egress: [{ports: [{port: 443}]}]}",
            )],
            src: "shop/web",
            to: "198.51.100.5:80/TCP",
            expect: Denied(&["shop/https"]),
        },
        // Several ports in one rule: any of them.
        Case {
            name: "one of several ports",
            policies: &[(
                "shop",
                "web",
                "{podSelector: {}, policyTypes: [Egress], egress: [{ports: [{port: 80}, {port: 443}]}]}",
            )],
            src: "shop/web",
            to: "198.51.100.5:80/TCP",
            expect: Allowed(Some(("shop/web", E, 0))),
        },
        // ipBlock: inside the CIDR.
        Case {
            name: "ipBlock inside",
            policies: &[(
                "shop",
                "ext",
                "{podSelector: {}, policyTypes: [Egress], egress: [{to: [{ipBlock: {cidr: 203.0.113.0/24}}]}]}",
            )],
            src: "shop/web",
            to: "203.0.113.10:443/TCP",
            expect: Allowed(Some(("shop/ext", E, 0))),
        },
        Case {
            name: "ipBlock outside",
            policies: &[(
                "shop",
                "ext",
                "{podSelector: {}, policyTypes: [Egress], egress: [{to: [{ipBlock: {cidr: 203.0.113.0/24}}]}]}",
            )],
            src: "shop/web",
            to: "198.51.100.5:443/TCP",
            expect: Denied(&["shop/ext"]),
        },
        // ipBlock except carves addresses out.
        Case {
            name: "ipBlock except excludes",
            policies: &[(
                "shop",
                "ext",
                "{podSelector: {}, policyTypes: [Egress], egress: [{to: [{ipBlock: {cidr: 0.0.0.0/0, except: [203.0.113.0/28]}}]}]}",
            )],
            src: "shop/web",
            to: "203.0.113.10:443/TCP",
            expect: Denied(&["shop/ext"]),
        },
        Case {
            name: "ipBlock except elsewhere",
            policies: &[(
                "shop",
                "ext",
                "{podSelector: {}, policyTypes: [Egress], egress: [{to: [{ipBlock: {cidr: 0.0.0.0/0, except: [203.0.113.0/28]}}]}]}",
            )],
            src: "shop/web",
            to: "203.0.113.20:443/TCP",
            expect: Allowed(Some(("shop/ext", E, 0))),
        },
        // An IPv4 block does not match IPv6 destinations.
        Case {
            name: "ipBlock family",
            policies: &[(
                "shop",
                "ext",
                "{podSelector: {}, policyTypes: [Egress], egress: [{to: [{ipBlock: {cidr: 0.0.0.0/0}}]}]}",
            )],
            src: "shop/web",
            to: "[2001:db8::10]:443/TCP",
            expect: Denied(&["shop/ext"]),
        },
        Case {
            name: "ipBlock IPv6",
            policies: &[(
                "shop",
                "ext",
                "{podSelector: {}, policyTypes: [Egress], egress: [{to: [{ipBlock: {cidr: '2001:db8::/32'}}]}]}",
            )],
            src: "shop/web",
            to: "[2001:db8::10]:443/TCP",
            expect: Allowed(Some(("shop/ext", E, 0))),
        },
        // ipBlock with ports: both must match.
        Case {
            name: "ipBlock and port both needed",
            policies: &[(
                "shop",
                "ext",
                "{podSelector: {}, policyTypes: [Egress], egress: [{to: [{ipBlock: {cidr: 203.0.113.0/24}}], ports: [{port: 443}]}]}",
            )],
            src: "shop/web",
            to: "203.0.113.10:80/TCP",
            expect: Denied(&["shop/ext"]),
        },
        // podSelector peer alone: pods of the policy's namespace.
        Case {
            name: "podSelector peer same namespace",
            policies: &[(
                "shop",
                "to-api",
                "{podSelector: {matchLabels: {app: web}}, policyTypes: [Egress], egress: [{to: [{podSelector: {matchLabels: {app: api}}}]}]}",
            )],
            src: "shop/web",
            to: "10.244.0.11:9090/TCP",
            expect: Allowed(Some(("shop/to-api", E, 0))),
        },
        Case {
            name: "podSelector peer other namespace",
            policies: &[(
                "shop",
                "to-pg",
                "{podSelector: {matchLabels: {app: web}}, policyTypes: [Egress], egress: [{to: [{podSelector: {matchLabels: {app: postgres}}}]}]}",
            )],
            src: "shop/web",
            to: "10.244.1.10:5432/TCP",
            expect: Denied(&["shop/to-pg"]),
        },
        // An empty podSelector peer: every pod of the namespace.
        Case {
            name: "empty podSelector peer",
            policies: &[(
                "shop",
                "in-ns",
                "{podSelector: {}, policyTypes: [Egress], egress: [{to: [{podSelector: {}}]}]}",
            )],
            src: "shop/web",
            to: "10.244.0.11:9090/TCP",
            expect: Allowed(Some(("shop/in-ns", E, 0))),
        },
        // A pod selector peer never matches addresses outside the cluster.
        Case {
            name: "podSelector peer and external IP",
            policies: &[(
                "shop",
                "in-ns",
                "{podSelector: {}, policyTypes: [Egress], egress: [{to: [{podSelector: {}}]}]}",
            )],
            src: "shop/web",
            to: "203.0.113.10:443/TCP",
            expect: Denied(&["shop/in-ns"]),
        },
        // namespaceSelector alone: every pod of matching namespaces.
        Case {
            name: "namespaceSelector peer",
            policies: &[(
                "shop",
                "to-db",
                "{podSelector: {}, policyTypes: [Egress], egress: [{to: [{namespaceSelector: {matchLabels: {team: db}}}]}]}",
            )],
            src: "shop/web",
            to: "10.244.1.10:5432/TCP",
            expect: Allowed(Some(("shop/to-db", E, 0))),
        },
        Case {
            name: "namespaceSelector peer mismatch",
            policies: &[(
                "shop",
                "to-db",
                "{podSelector: {}, policyTypes: [Egress], egress: [{to: [{namespaceSelector: {matchLabels: {team: db}}}]}]}",
            )],
            src: "shop/web",
            to: "10.244.2.10:80/TCP",
            expect: Denied(&["shop/to-db"]),
        },
        // An empty namespaceSelector: all namespaces.
        Case {
            name: "empty namespaceSelector",
            policies: &[(
                "shop",
                "cluster",
                "{podSelector: {}, policyTypes: [Egress], egress: [{to: [{namespaceSelector: {}}]}]}",
            )],
            src: "shop/web",
            to: "10.244.2.10:80/TCP",
            expect: Allowed(Some(("shop/cluster", E, 0))),
        },
        // The automatic kubernetes.io/metadata.name label selects a namespace by name.
        Case {
            name: "metadata.name namespace label",
            policies: &[(
                "shop",
                "dns",
                "{podSelector: {}, policyTypes: [Egress], egress: [{to: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: kube-system}}, podSelector: {matchLabels: {k8s-app: kube-dns}}}], ports: [{port: 53, protocol: UDP}]}]}",
            )],
            src: "shop/web",
            to: "10.244.3.10:53/UDP",
            expect: Allowed(Some(("shop/dns", E, 0))),
        },
        // Both selectors in one peer: matching pods in matching namespaces (AND).
        Case {
            name: "both selectors in one peer match",
            policies: &[(
                "shop",
                "pg",
                "{podSelector: {}, policyTypes: [Egress], egress: [{to: [{namespaceSelector: {matchLabels: {team: db}}, podSelector: {matchLabels: {app: postgres}}}]}]}",
            )],
            src: "shop/web",
            to: "10.244.1.10:5432/TCP",
            expect: Allowed(Some(("shop/pg", E, 0))),
        },
        Case {
            name: "both selectors in one peer: pod mismatch",
            policies: &[(
                "shop",
                "pg",
                "{podSelector: {}, policyTypes: [Egress], egress: [{to: [{namespaceSelector: {matchLabels: {env: prod}}, podSelector: {matchLabels: {app: postgres}}}]}]}",
            )],
            src: "shop/web",
            to: "10.244.0.11:9090/TCP",
            expect: Denied(&["shop/pg"]),
        },
        Case {
            name: "both selectors in one peer: namespace mismatch",
            policies: &[(
                "shop",
                "pg",
                "{podSelector: {}, policyTypes: [Egress], egress: [{to: [{namespaceSelector: {matchLabels: {env: dev}}, podSelector: {matchLabels: {app: postgres}}}]}]}",
            )],
            src: "shop/web",
            to: "10.244.1.10:5432/TCP",
            expect: Denied(&["shop/pg"]),
        },
        // Two peers in one rule: OR.
        Case {
            name: "two peers are alternatives",
            policies: &[(
                "shop",
                "either",
                "{podSelector: {}, policyTypes: [Egress], egress: [{to: [{namespaceSelector: {matchLabels: {env: dev}}}, {podSelector: {matchLabels: {app: postgres}}}]}]}",
            )],
            src: "shop/web",
            to: "10.244.2.10:80/TCP",
            expect: Allowed(Some(("shop/either", E, 0))),
        },
        // matchExpressions In.
        Case {
            name: "matchExpressions In",
            policies: &[(
                "shop",
                "tiers",
                "{podSelector: {matchExpressions: [{key: tier, operator: In, values: [frontend, edge]}]}, policyTypes: [Egress]}",
            )],
            src: "shop/web",
            to: "203.0.113.10:443/TCP",
            expect: Denied(&["shop/tiers"]),
        },
        Case {
            name: "matchExpressions In no match",
            policies: &[(
                "shop",
                "tiers",
                "{podSelector: {matchExpressions: [{key: tier, operator: In, values: [edge]}]}, policyTypes: [Egress]}",
            )],
            src: "shop/web",
            to: "203.0.113.10:443/TCP",
            expect: Allowed(None),
        },
        // NotIn: also matches pods without the key.
        Case {
            name: "matchExpressions NotIn",
            policies: &[(
                "shop",
                "nb",
                "{podSelector: {matchExpressions: [{key: tier, operator: NotIn, values: [backend]}]}, policyTypes: [Egress]}",
            )],
            src: "shop/web",
            to: "203.0.113.10:443/TCP",
            expect: Denied(&["shop/nb"]),
        },
        Case {
            name: "matchExpressions NotIn excludes",
            policies: &[(
                "shop",
                "nb",
                "{podSelector: {matchExpressions: [{key: tier, operator: NotIn, values: [backend]}]}, policyTypes: [Egress]}",
            )],
            src: "shop/api",
            to: "203.0.113.10:443/TCP",
            expect: Allowed(None),
        },
        Case {
            name: "NotIn matches a pod without the key",
            policies: &[(
                "shop",
                "to-untiered",
                "{podSelector: {}, policyTypes: [Egress], egress: [{to: [{namespaceSelector: {}, podSelector: {matchExpressions: [{key: tier, operator: NotIn, values: [backend]}]}}]}]}",
            )],
            src: "shop/web",
            to: "10.244.1.10:5432/TCP",
            expect: Allowed(Some(("shop/to-untiered", E, 0))),
        },
        // Exists / DoesNotExist.
        Case {
            name: "matchExpressions Exists",
            policies: &[(
                "shop",
                "tiered",
                "{podSelector: {matchExpressions: [{key: tier, operator: Exists}]}, policyTypes: [Egress]}",
            )],
            src: "shop/web",
            to: "203.0.113.10:443/TCP",
            expect: Denied(&["shop/tiered"]),
        },
        Case {
            name: "matchExpressions DoesNotExist",
            policies: &[(
                "shop",
                "untiered",
                "{podSelector: {matchExpressions: [{key: tier, operator: DoesNotExist}]}, policyTypes: [Egress]}",
            )],
            src: "shop/web",
            to: "203.0.113.10:443/TCP",
            expect: Allowed(None),
        },
        // matchLabels and matchExpressions are ANDed.
        Case {
            name: "matchLabels AND matchExpressions",
            policies: &[(
                "shop",
                "and",
                "{podSelector: {matchLabels: {app: web}, matchExpressions: [{key: tier, operator: In, values: [backend]}]}, policyTypes: [Egress]}",
            )],
            src: "shop/web",
            to: "203.0.113.10:443/TCP",
            expect: Allowed(None),
        },
        // The union of policies: one allowing is enough.
        Case {
            name: "union of policies",
            policies: &[
                DENY_ALL_EGRESS,
                (
                    "shop",
                    "allow-dns",
                    "{podSelector: {}, policyTypes: [Egress], egress: [{ports: [{port: 53, protocol: UDP}]}]}",
                ),
            ],
            src: "shop/web",
            to: "10.0.0.10:53/UDP",
            expect: Allowed(Some(("shop/allow-dns", E, 0))),
        },
        Case {
            name: "union of policies: nothing allows",
            policies: &[
                DENY_ALL_EGRESS,
                (
                    "shop",
                    "allow-dns",
                    "{podSelector: {}, policyTypes: [Egress], egress: [{ports: [{port: 53, protocol: UDP}]}]}",
                ),
            ],
            src: "shop/web",
            to: "203.0.113.10:443/TCP",
            expect: Denied(&["shop/deny-egress", "shop/allow-dns"]),
        },
        // The allowing rule's index is reported.
        Case {
            name: "second rule allows",
            policies: &[(
                "shop",
                "two",
                "{podSelector: {}, policyTypes: [Egress], egress: [{ports: [{port: 53, protocol: UDP}]}, {ports: [{port: 443}]}]}",
            )],
            src: "shop/web",
            to: "203.0.113.10:443/TCP",
            expect: Allowed(Some(("shop/two", E, 1))),
        },
        // Named ports resolve against the destination pod's container ports.
        Case {
            name: "named port on destination pod",
            policies: &[(
                "shop",
                "grpc",
                "{podSelector: {}, policyTypes: [Egress], egress: [{ports: [{port: grpc}]}]}",
            )],
            src: "shop/web",
            to: "10.244.0.11:9090/TCP",
            expect: Allowed(Some(("shop/grpc", E, 0))),
        },
        Case {
            name: "named port, other number",
            policies: &[(
                "shop",
                "grpc",
                "{podSelector: {}, policyTypes: [Egress], egress: [{ports: [{port: grpc}]}]}",
            )],
            src: "shop/web",
            to: "10.244.0.11:9100/TCP",
            expect: Denied(&["shop/grpc"]),
        },
        Case {
            name: "named port to a non-pod",
            policies: &[(
                "shop",
                "grpc",
                "{podSelector: {}, policyTypes: [Egress], egress: [{ports: [{port: grpc}]}]}",
            )],
            src: "shop/web",
            to: "203.0.113.10:9090/TCP",
            expect: Denied(&["shop/grpc"]),
        },
        Case {
            name: "named port protocol",
            policies: &[(
                "shop",
                "dns",
                "{podSelector: {}, policyTypes: [Egress], egress: [{ports: [{port: dns, protocol: UDP}]}]}",
            )],
            src: "shop/web",
            to: "10.244.3.10:53/UDP",
            expect: Allowed(Some(("shop/dns", E, 0))),
        },
        Case {
            name: "named port wrong protocol",
            policies: &[(
                "shop",
                "dns",
                "{podSelector: {}, policyTypes: [Egress], egress: [{ports: [{port: dns}]}]}",
            )],
            src: "shop/web",
            to: "10.244.3.10:53/UDP",
            expect: Denied(&["shop/dns"]),
        },
        // In-cluster destinations: the destination's ingress counts too.
        Case {
            name: "default deny ingress at the destination",
            policies: &[("db", "deny-in", "{podSelector: {}, policyTypes: [Ingress]}")],
            src: "shop/web",
            to: "10.244.1.10:5432/TCP",
            expect: Denied(&["db/deny-in"]),
        },
        Case {
            name: "ingress from a namespace",
            policies: &[(
                "db",
                "from-shop",
                "{podSelector: {}, ingress: [{from: [{namespaceSelector: {matchLabels: {team: shop}}}]}]}",
            )],
            src: "shop/web",
            to: "10.244.1.10:5432/TCP",
            expect: Allowed(Some(("db/from-shop", I, 0))),
        },
        Case {
            name: "ingress from another namespace denied",
            policies: &[(
                "db",
                "from-shop",
                "{podSelector: {}, ingress: [{from: [{namespaceSelector: {matchLabels: {team: shop}}}]}]}",
            )],
            src: "dev/tool",
            to: "10.244.1.10:5432/TCP",
            expect: Denied(&["db/from-shop"]),
        },
        Case {
            name: "ingress podSelector is the policy's namespace",
            policies: &[(
                "db",
                "from-web",
                "{podSelector: {}, ingress: [{from: [{podSelector: {matchLabels: {app: web}}}]}]}",
            )],
            src: "shop/web",
            to: "10.244.1.10:5432/TCP",
            expect: Denied(&["db/from-web"]),
        },
        Case {
            name: "ingress named port",
            policies: &[(
                "db",
                "pg",
                "{podSelector: {}, ingress: [{ports: [{port: pg}]}]}",
            )],
            src: "shop/web",
            to: "10.244.1.10:5432/TCP",
            expect: Allowed(Some(("db/pg", I, 0))),
        },
        Case {
            name: "ingress ipBlock matches the source pod's IP",
            policies: &[(
                "db",
                "pods",
                "{podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.244.0.0/24}}]}]}",
            )],
            src: "shop/web",
            to: "10.244.1.10:5432/TCP",
            expect: Allowed(Some(("db/pods", I, 0))),
        },
        // Egress allowed but ingress denied: denied by the ingress policies.
        Case {
            name: "egress allows, ingress denies",
            policies: &[
                (
                    "shop",
                    "all-out",
                    "{podSelector: {}, policyTypes: [Egress], egress: [{}]}",
                ),
                ("db", "deny-in", "{podSelector: {}, policyTypes: [Ingress]}"),
            ],
            src: "shop/web",
            to: "10.244.1.10:5432/TCP",
            expect: Denied(&["db/deny-in"]),
        },
        // Egress denied: ingress does not matter.
        Case {
            name: "egress denies first",
            policies: &[
                DENY_ALL_EGRESS,
                ("db", "all-in", "{podSelector: {}, ingress: [{}]}"),
            ],
            src: "shop/web",
            to: "10.244.1.10:5432/TCP",
            expect: Denied(&["shop/deny-egress"]),
        },
        // Both allow: the egress rule is named.
        Case {
            name: "both directions allow",
            policies: &[
                (
                    "shop",
                    "all-out",
                    "{podSelector: {}, policyTypes: [Egress], egress: [{}]}",
                ),
                ("db", "all-in", "{podSelector: {}, ingress: [{}]}"),
            ],
            src: "shop/web",
            to: "10.244.1.10:5432/TCP",
            expect: Allowed(Some(("shop/all-out", E, 0))),
        },
        // hostNetwork pods are not subject to NetworkPolicy.
        Case {
            name: "hostNetwork source",
            policies: &[(
                "shop",
                "deny-all",
                "{podSelector: {}, policyTypes: [Egress, Ingress]}",
            )],
            src: "shop/agent",
            to: "203.0.113.10:443/TCP",
            expect: Allowed(None),
        },
        // A policy of both types: egress and ingress rules are separate.
        Case {
            name: "both types, egress rule allows",
            policies: &[(
                "shop",
                "both",
                "{podSelector: {}, policyTypes: [Ingress, Egress], egress: [{ports: [{port: 443}]}]}",
            )],
            src: "shop/web",
            to: "203.0.113.10:443/TCP",
            expect: Allowed(Some(("shop/both", E, 0))),
        },
    ]
}

fn cluster(policies: &[(&str, &str, &str)]) -> ClusterState {
    let mut manifests = Manifests::default();
    load_text(Path::new("cluster.yaml"), CLUSTER, &mut manifests);
    for (namespace, name, spec) in policies {
        let text = format!(
            "kind: NetworkPolicy\napiVersion: networking.k8s.io/v1\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n"
        );
        load_text(Path::new("policies.yaml"), &text, &mut manifests);
    }
    assert!(manifests.warnings.is_empty(), "{:?}", manifests.warnings);
    ClusterState::from_manifests(manifests)
}

fn parse_target(to: &str) -> (IpAddr, u16, Protocol) {
    let (address, protocol) = to.rsplit_once('/').unwrap();
    let address: std::net::SocketAddr = address.parse().unwrap();
    (
        address.ip(),
        address.port(),
        Protocol::parse(protocol).unwrap(),
    )
}

#[test]
fn the_documented_semantics() {
    let cases = cases();
    assert!(cases.len() >= 60, "{} cases", cases.len());
    for case in cases {
        let state = cluster(case.policies);
        let src = state.find_pod(case.src).unwrap();
        let (dst, port, protocol) = parse_target(case.to);
        let decision = decide(
            &state,
            &Flow {
                src,
                dst,
                port,
                protocol,
            },
        );
        let context = format!("case {:?}: {decision:#?}", case.name);
        match case.expect {
            Allowed(by) => {
                assert!(decision.allowed, "{context}");
                assert!(decision.denied_by.is_empty(), "{context}");
                let expected = by.map(|(policy, direction, rule)| AllowedBy {
                    policy: policy.to_owned(),
                    rule,
                    direction,
                });
                assert_eq!(decision.allowed_by, expected, "{context}");
            }
            Denied(by) => {
                assert!(!decision.allowed, "{context}");
                assert_eq!(decision.denied_by, by, "{context}");
                assert_eq!(decision.allowed_by, None, "{context}");
            }
        }
    }
}

#[test]
fn explanations_name_the_policy_the_selector_and_what_is_missing() {
    let state = cluster(&[(
        "shop",
        "deny-egress",
        "{podSelector: {matchLabels: {app: web}}, policyTypes: [Egress]}",
    )]);
    let src = state.find_pod("shop/web").unwrap();
    let decision = decide(
        &state,
        &Flow {
            src,
            dst: "10.0.0.10".parse().unwrap(),
            port: 53,
            protocol: Protocol::Udp,
        },
    );
    assert_eq!(
        decision.explanation,
        "shop/deny-egress selects shop/web (app=web) for egress; no egress rule allows UDP 53 to 10.0.0.10"
    );
    assert_eq!(decision.policies, ["shop/deny-egress"]);

    let state = cluster(&[(
        "shop",
        "dns",
        "{podSelector: {}, policyTypes: [Egress], egress: [{ports: [{port: 53, protocol: UDP}]}]}",
    )]);
    let src = state.find_pod("shop/web").unwrap();
    let decision = decide(
        &state,
        &Flow {
            src,
            dst: "10.244.3.10".parse().unwrap(),
            port: 53,
            protocol: Protocol::Udp,
        },
    );
    assert_eq!(
        decision.explanation,
        "allowed: shop/dns egress[0] allows UDP 53 to 10.244.3.10 (kube-system/coredns); no policy selects kube-system/coredns for ingress"
    );
}

#[test]
fn a_denial_to_an_unknown_address_is_uncertain_only_with_selector_peers() {
    let decide_to = |spec: &'static str, dst: &str| {
        let state = cluster(&[("shop", "p", spec)]);
        let src = state.find_pod("shop/web").unwrap();
        decide(
            &state,
            &Flow {
                src,
                dst: dst.parse().unwrap(),
                port: 80,
                protocol: Protocol::Tcp,
            },
        )
    };
    let selectors = "{podSelector: {}, policyTypes: [Egress], egress: [{to: [{podSelector: {}}]}]}";
    // 10.244.9.9 may be a pod of another node, which this state does not know.
    let decision = decide_to(selectors, "10.244.9.9");
    assert!(!decision.allowed && !decision.certain);
    // A known pod's denial is certain; so is one by ipBlock rules only.
    let decision = decide_to(selectors, "10.244.2.10");
    assert!(!decision.allowed && decision.certain);
    let blocks = "{podSelector: {}, policyTypes: [Egress], egress: [{to: [{ipBlock: {cidr: 192.0.2.0/24}}]}]}";
    let decision = decide_to(blocks, "10.244.9.9");
    assert!(!decision.allowed && decision.certain);
}

#[test]
fn invalid_policies_are_rejected_with_the_reason() {
    let bad = [
        (
            "{podSelector: {matchExpressions: [{key: a, operator: Near, values: [b]}]}}",
            "unknown matchExpressions operator",
        ),
        (
            "{podSelector: {matchExpressions: [{key: a, operator: In}]}}",
            "needs values",
        ),
        (
            "{podSelector: {}, egress: [{to: [{ipBlock: {cidr: 10.0.0.0/33}}]}]}",
            "prefix must be",
        ),
        ("{podSelector: {}, egress: [{to: [{}]}]}", "a peer needs"),
        (
            "{podSelector: {}, egress: [{ports: [{port: 80, protocol: ICMP}]}]}",
            "unknown protocol",
        ),
        (
            "{podSelector: {}, egress: [{ports: [{port: 100, endPort: 50}]}]}",
            "endPort 50 is below port 100",
        ),
        (
            "{podSelector: {}, policyTypes: [Sideways]}",
            "unknown policyTypes",
        ),
        (
            "{podSelector: {}, egress: [{ports: [{port: 70000}]}]}",
            "out of range",
        ),
    ];
    for (spec, expected) in bad {
        let mut manifests = Manifests::default();
        let text = format!(
            "kind: NetworkPolicy\napiVersion: networking.k8s.io/v1\nmetadata: {{name: bad, namespace: shop}}\nspec: {spec}\n"
        );
        load_text(Path::new("p.yaml"), &text, &mut manifests);
        assert!(manifests.policies.is_empty(), "{spec}");
        let warning = &manifests.warnings[0];
        assert_eq!(warning.object.as_deref(), Some("NetworkPolicy shop/bad"));
        assert!(
            warning.message.contains(expected),
            "{spec}: {}",
            warning.message
        );
    }
}

mod generated {
    //! Properties over generated policies and flows.

    use proptest::prelude::*;
    use serde_json::{Value, json};

    use super::*;

    fn labels() -> impl Strategy<Value = Value> {
        prop::collection::btree_map(
            prop::sample::select(vec!["app", "tier", "team", "env", "k8s-app"]),
            prop::sample::select(vec![
                "web", "api", "frontend", "backend", "db", "prod", "kube-dns",
            ]),
            0..3,
        )
        .prop_map(|m| json!(m))
    }

    fn selector() -> impl Strategy<Value = Value> {
        let expression = (
            prop::sample::select(vec!["app", "tier", "env"]),
            prop::sample::select(vec!["In", "NotIn", "Exists", "DoesNotExist", "Bogus"]),
            prop::collection::vec(prop::sample::select(vec!["web", "api", "backend", "prod"]), 0..3),
        )
            .prop_map(|(key, operator, values)| json!({"key": key, "operator": operator, "values": values}));
        (labels(), prop::collection::vec(expression, 0..2)).prop_map(
            |(labels, expressions)| json!({"matchLabels": labels, "matchExpressions": expressions}),
        )
    }

    fn peer() -> impl Strategy<Value = Value> {
        let cidrs = vec![
            "0.0.0.0/0",
            "10.244.0.0/16",
            "10.244.0.10/32",
            "203.0.113.0/24",
            "203.0.113.0/28",
            "2001:db8::/32",
            "10.0.0.0/33",
            "garbage",
        ];
        prop_oneof![
            selector().prop_map(|s| json!({"podSelector": s})),
            selector().prop_map(|s| json!({"namespaceSelector": s})),
            (selector(), selector())
                .prop_map(|(p, n)| json!({"podSelector": p, "namespaceSelector": n})),
            (
                prop::sample::select(cidrs.clone()),
                prop::collection::vec(prop::sample::select(cidrs), 0..2)
            )
                .prop_map(|(cidr, except)| json!({"ipBlock": {"cidr": cidr, "except": except}})),
            Just(json!({})),
        ]
    }

    fn port() -> impl Strategy<Value = Value> {
        let number = prop_oneof![
            Just(Value::Null),
            (0i64..70_000).prop_map(|n| json!(n)),
            prop::sample::select(vec!["http", "grpc", "dns", "pg", "53", "nope"])
                .prop_map(|s| json!(s)),
        ];
        (
            number,
            prop::option::of(0i64..70_000),
            prop::option::of(prop::sample::select(vec!["TCP", "UDP", "SCTP", "ICMP"])),
        )
            .prop_map(|(port, end_port, protocol)| json!({"port": port, "endPort": end_port, "protocol": protocol}))
    }

    fn rule(peer_field: &'static str) -> impl Strategy<Value = Value> {
        (
            prop::option::of(prop::collection::vec(peer(), 0..3)),
            prop::option::of(prop::collection::vec(port(), 0..3)),
        )
            .prop_map(move |(peers, ports)| json!({peer_field: peers, "ports": ports}))
    }

    fn policy() -> impl Strategy<Value = Value> {
        (
            prop::sample::select(vec!["shop", "db", "dev", "kube-system"]),
            selector(),
            prop::option::of(prop::sample::subsequence(vec!["Ingress", "Egress"], 0..=2)),
            prop::option::of(prop::collection::vec(rule("from"), 0..3)),
            prop::option::of(prop::collection::vec(rule("to"), 0..3)),
        )
            .prop_map(|(namespace, pod_selector, types, ingress, egress)| {
                json!({
                    "apiVersion": "networking.k8s.io/v1",
                    "kind": "NetworkPolicy",
                    "metadata": {"name": "generated", "namespace": namespace},
                    "spec": {"podSelector": pod_selector, "policyTypes": types, "ingress": ingress, "egress": egress},
                })
            })
    }

    fn flow() -> impl Strategy<Value = (&'static str, IpAddr, u16, Protocol)> {
        (
            prop::sample::select(vec![
                "shop/web",
                "shop/api",
                "db/postgres",
                "dev/tool",
                "kube-system/coredns",
                "shop/agent",
            ]),
            prop::sample::select(vec![
                "10.244.0.10",
                "10.244.0.11",
                "10.244.1.10",
                "10.244.3.10",
                "203.0.113.10",
                "10.0.0.10",
                "2001:db8::10",
            ])
            .prop_map(|ip| ip.parse().unwrap()),
            prop::sample::select(vec![53u16, 80, 443, 5432, 8080, 9090]),
            prop::sample::select(vec![Protocol::Tcp, Protocol::Udp, Protocol::Sctp]),
        )
    }

    /// The fixture cluster with `policies` (invalid ones are skipped, as when loading).
    fn cluster_with(policies: &[Value]) -> ClusterState {
        let mut manifests = Manifests::default();
        load_text(Path::new("cluster.yaml"), CLUSTER, &mut manifests);
        for policy in policies {
            load_text(
                Path::new("generated.json"),
                &policy.to_string(),
                &mut manifests,
            );
        }
        ClusterState::from_manifests(manifests)
    }

    fn decide_for(
        state: &ClusterState,
        (src, dst, port, protocol): (&str, IpAddr, u16, Protocol),
    ) -> Decision {
        let src = state.find_pod(src).unwrap();
        decide(
            state,
            &Flow {
                src,
                dst,
                port,
                protocol,
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Any policies, any flow: a decision, never a panic, and a consistent one.
        #[test]
        fn never_panics_and_is_consistent(policies in prop::collection::vec(policy(), 0..4), flow in flow()) {
            let state = cluster_with(&policies);
            let decision = decide_for(&state, flow);
            prop_assert_eq!(decision.allowed, decision.denied_by.is_empty());
            prop_assert!(!decision.explanation.is_empty());
            if !decision.allowed {
                prop_assert!(decision.allowed_by.is_none());
            }
        }

        /// Policies only add allowed traffic: a policy allowing all egress of every pod
        /// in every namespace never turns an allowed flow into a denied one.
        #[test]
        fn allow_all_egress_never_denies_what_was_allowed(
            policies in prop::collection::vec(policy(), 0..4),
            flow in flow(),
        ) {
            let before = decide_for(&cluster_with(&policies), flow);
            let mut with_allow_all = policies.clone();
            for namespace in ["shop", "db", "dev", "kube-system"] {
                with_allow_all.push(json!({
                    "apiVersion": "networking.k8s.io/v1",
                    "kind": "NetworkPolicy",
                    "metadata": {"name": "allow-all-egress", "namespace": namespace},
                    "spec": {"podSelector": {}, "policyTypes": ["Egress"], "egress": [{}]},
                }));
            }
            let after = decide_for(&cluster_with(&with_allow_all), flow);
            if before.allowed {
                prop_assert!(after.allowed, "{:?} -> {:?}", before, after);
            }
            prop_assert!(after.egress.allowed);
        }
    }
}
