//! The NetworkPolicy evaluator: would `networking.k8s.io/v1` NetworkPolicies let a pod's
//! flow through, and which policy decides it.
//!
//! Semantics (the Kubernetes NetworkPolicy documentation):
//!
//! - A policy selects pods of its own namespace with `podSelector` (empty: all of them).
//!   `policyTypes` defaults to `Ingress`, plus `Egress` when the policy has egress rules.
//! - A pod selected by no policy of a type is not isolated for that direction: all
//!   traffic is allowed. A selected pod only allows what some rule of some selecting
//!   policy allows (the union); with no rules, nothing (default deny).
//! - A rule matches when one of its peers and one of its ports match; an empty or absent
//!   `to`/`from` or `ports` matches everything. `egress: [{}]` allows all; `egress: []`
//!   allows nothing.
//! - Peers: `podSelector` alone (pods of the policy's namespace), `namespaceSelector`
//!   alone (every pod of matching namespaces), both in one peer (matching pods in
//!   matching namespaces), or `ipBlock` (`cidr` minus `except`). ipBlock is matched
//!   against any address, pod addresses included, as Calico and Azure NPM do (the
//!   documentation leaves pod IPs in ipBlock to the implementation).
//! - Ports: protocol (default TCP; TCP, UDP, SCTP), a number, a range (`endPort`) or a
//!   name, resolved against the destination pod's container ports.
//! - A flow to a pod in the cluster needs the source's egress and the destination's
//!   ingress to allow it. hostNetwork pods are not subject to NetworkPolicy.

mod cidr;
mod selector;
#[cfg(test)]
mod tests;

use std::{collections::BTreeMap, fmt, net::IpAddr};

use k8s_openapi::{
    api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::Serialize;

pub use cidr::Cidr;
pub use selector::Selector;

use crate::cluster::{ClusterState, PodInfo};

/// A transport protocol NetworkPolicies name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn parse(text: &str) -> Option<Self> {
        match text.to_ascii_uppercase().as_str() {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        })
    }
}

/// A named container port of a pod (for named ports in policies).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerPort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Peer {
    /// `podSelector` and/or `namespaceSelector`; `None` namespaces: the policy's own.
    Pods {
        pods: Selector,
        namespaces: Option<Selector>,
    },
    Block {
        cidr: Cidr,
        except: Vec<Cidr>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum PortMatch {
    Any,
    Number { first: u16, last: u16 },
    Named(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct PortRule {
    protocol: Protocol,
    port: PortMatch,
}

/// One ingress or egress rule; empty lists match everything.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Rule {
    peers: Vec<Peer>,
    ports: Vec<PortRule>,
}

/// A NetworkPolicy, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    pod_selector: Selector,
    /// The ingress rules, when the policy is of type Ingress.
    ingress: Option<Vec<Rule>>,
    /// The egress rules, when the policy is of type Egress.
    egress: Option<Vec<Rule>>,
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Egress,
    Ingress,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Egress => "egress",
            Direction::Ingress => "ingress",
        }
    }
}

impl Policy {
    /// Validates a NetworkPolicy; an error names what is wrong with it.
    pub fn from_k8s(policy: &NetworkPolicy) -> Result<Self, String> {
        let name = policy.metadata.name.clone().ok_or("has no metadata.name")?;
        let namespace = policy
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned());
        let spec = policy.spec.clone().unwrap_or_default();
        let pod_selector = Selector::parse(&spec.pod_selector.unwrap_or_default())
            .map_err(|e| format!("podSelector: {e}"))?;
        let types = match &spec.policy_types {
            Some(types) => {
                for t in types {
                    if t != "Ingress" && t != "Egress" {
                        return Err(format!("unknown policyTypes entry {t:?}"));
                    }
                }
                types.clone()
            }
            // The API server's defaulting: Ingress, and Egress when there are egress rules.
            None => {
                let mut types = vec!["Ingress".to_owned()];
                if spec.egress.as_ref().is_some_and(|rules| !rules.is_empty()) {
                    types.push("Egress".to_owned());
                }
                types
            }
        };
        let has = |t: &str| types.iter().any(|x| x == t);
        // (peers, ports) of each rule, for the directions the policy is of.
        let ingress = has("Ingress").then(|| {
            let rules = spec.ingress.unwrap_or_default();
            parse_rules(
                "ingress",
                rules
                    .iter()
                    .map(|r| (r.from.as_deref(), r.ports.as_deref())),
            )
        });
        let egress = has("Egress").then(|| {
            let rules = spec.egress.unwrap_or_default();
            parse_rules(
                "egress",
                rules.iter().map(|r| (r.to.as_deref(), r.ports.as_deref())),
            )
        });
        let (ingress, egress) = (ingress.transpose()?, egress.transpose()?);
        Ok(Self {
            namespace,
            name,
            pod_selector,
            ingress,
            egress,
        })
    }

    fn rules(&self, direction: Direction) -> Option<&[Rule]> {
        match direction {
            Direction::Egress => self.egress.as_deref(),
            Direction::Ingress => self.ingress.as_deref(),
        }
    }

    fn selects(&self, pod: &PodInfo) -> bool {
        self.namespace == pod.namespace && self.pod_selector.matches(&pod.labels)
    }
}

/// Parses a direction's rules; an error names the rule (`egress[1]: …`).
fn parse_rules<'a>(
    direction: &str,
    rules: impl Iterator<
        Item = (
            Option<&'a [NetworkPolicyPeer]>,
            Option<&'a [NetworkPolicyPort]>,
        ),
    >,
) -> Result<Vec<Rule>, String> {
    rules
        .enumerate()
        .map(|(i, (peers, ports))| {
            Rule::parse(peers, ports).map_err(|e| format!("{direction}[{i}]: {e}"))
        })
        .collect()
}

impl Rule {
    fn parse(
        peers: Option<&[NetworkPolicyPeer]>,
        ports: Option<&[NetworkPolicyPort]>,
    ) -> Result<Self, String> {
        let peers = peers
            .unwrap_or_default()
            .iter()
            .map(Peer::parse)
            .collect::<Result<_, _>>()?;
        let ports = ports
            .unwrap_or_default()
            .iter()
            .map(PortRule::parse)
            .collect::<Result<_, _>>()?;
        Ok(Self { peers, ports })
    }
}

impl Peer {
    fn parse(peer: &NetworkPolicyPeer) -> Result<Self, String> {
        match (&peer.ip_block, &peer.pod_selector, &peer.namespace_selector) {
            (Some(block), None, None) => Ok(Peer::Block {
                cidr: block.cidr.parse()?,
                except: block
                    .except
                    .iter()
                    .flatten()
                    .map(|c| c.parse())
                    .collect::<Result<_, _>>()?,
            }),
            (Some(_), _, _) => Err("a peer with ipBlock cannot have selectors".into()),
            (None, None, None) => {
                Err("a peer needs podSelector, namespaceSelector or ipBlock".into())
            }
            (None, pods, namespaces) => Ok(Peer::Pods {
                pods: Selector::parse(&pods.clone().unwrap_or_default())?,
                namespaces: namespaces.as_ref().map(Selector::parse).transpose()?,
            }),
        }
    }
}

impl PortRule {
    fn parse(port: &NetworkPolicyPort) -> Result<Self, String> {
        let protocol = match &port.protocol {
            None => Protocol::Tcp,
            Some(p) => Protocol::parse(p).ok_or_else(|| format!("unknown protocol {p:?}"))?,
        };
        let number = |n: i32| u16::try_from(n).ok().filter(|n| *n > 0);
        let port = match &port.port {
            None => PortMatch::Any,
            Some(IntOrString::Int(n)) => {
                let first = number(*n).ok_or_else(|| format!("port {n} out of range"))?;
                let last = match port.end_port {
                    None => first,
                    Some(end) => number(end)
                        .filter(|end| *end >= first)
                        .ok_or_else(|| format!("endPort {end} is below port {first}"))?,
                };
                PortMatch::Number { first, last }
            }
            Some(IntOrString::String(name)) => match name.parse::<i32>() {
                Ok(n) => {
                    let first = number(n).ok_or_else(|| format!("port {n} out of range"))?;
                    PortMatch::Number { first, last: first }
                }
                Err(_) => PortMatch::Named(name.clone()),
            },
        };
        Ok(Self { protocol, port })
    }
}

/// The flow being decided.
#[derive(Clone, Copy, Debug)]
pub struct Flow<'a> {
    pub src: &'a PodInfo,
    pub dst: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

/// The rule that allowed a flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AllowedBy {
    /// `namespace/name`.
    pub policy: String,
    /// The rule's index in the policy's `egress` or `ingress` list.
    pub rule: usize,
    pub direction: Direction,
}

/// One direction's decision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SideDecision {
    pub allowed: bool,
    /// The policies that select the pod for this direction (`ns/name`).
    pub policies: Vec<String>,
    pub allowed_by: Option<AllowedBy>,
}

/// The decision of the NetworkPolicies on one flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub allowed: bool,
    /// Every policy that selects the source (egress) or the destination (ingress).
    pub policies: Vec<String>,
    /// For a denial: the policies of the direction that denies it.
    pub denied_by: Vec<String>,
    pub allowed_by: Option<AllowedBy>,
    pub explanation: String,
    /// False when a denial may be wrong: the destination is no pod the cluster state
    /// knows (the tracer watches only its node's pods), yet a selecting policy has
    /// pod or namespace selector peers that could have matched it.
    pub certain: bool,
    pub egress: SideDecision,
    /// `null` when the destination is not a pod subject to NetworkPolicy.
    pub ingress: Option<SideDecision>,
}

/// Decides `flow` under the NetworkPolicies of `cluster`.
pub fn decide(cluster: &ClusterState, flow: &Flow<'_>) -> Decision {
    let dst_pod = cluster.pod_by_ip(flow.dst);
    let what = format!("{} {}", flow.protocol, flow.port);
    if flow.src.host_network {
        return Decision {
            allowed: true,
            policies: Vec::new(),
            denied_by: Vec::new(),
            allowed_by: None,
            explanation: format!(
                "{} uses the host network, which NetworkPolicies do not apply to",
                flow.src
            ),
            certain: true,
            egress: SideDecision {
                allowed: true,
                policies: Vec::new(),
                allowed_by: None,
            },
            ingress: None,
        };
    }
    let egress = side(cluster, Direction::Egress, flow.src, |rule| {
        rule_allows(cluster, rule, flow.src, dst_pod, flow.dst, flow, dst_pod)
    });
    let ingress = dst_pod.filter(|pod| !pod.host_network).map(|pod| {
        let src_ip = flow.src.ips.first().copied();
        side(cluster, Direction::Ingress, pod, |rule| {
            src_ip.is_some_and(|ip| {
                rule_allows(cluster, rule, pod, Some(flow.src), ip, flow, Some(pod))
            })
        })
    });
    let to = match dst_pod {
        Some(pod) => format!("{} ({pod})", flow.dst),
        None => flow.dst.to_string(),
    };
    let mut policies = egress.policies.clone();
    if let Some(ingress) = &ingress {
        policies.extend(ingress.policies.iter().cloned());
    }
    let (allowed, denied_by, explanation) = if !egress.allowed {
        (
            false,
            egress.policies.clone(),
            format!(
                "{} {} {} for egress; no egress rule allows {what} to {to}",
                egress.policies.join(", "),
                if egress.policies.len() == 1 {
                    "selects"
                } else {
                    "select"
                },
                describe_pod(cluster, flow.src, Direction::Egress),
            ),
        )
    } else if let Some(ingress) = ingress.as_ref().filter(|i| !i.allowed) {
        let dst = dst_pod
            .map(|p| describe_pod(cluster, p, Direction::Ingress))
            .unwrap_or_default();
        (
            false,
            ingress.policies.clone(),
            format!(
                "{} {} {dst} for ingress; no ingress rule allows {what} from {} ({})",
                ingress.policies.join(", "),
                if ingress.policies.len() == 1 {
                    "selects"
                } else {
                    "select"
                },
                flow.src,
                flow.src
                    .ips
                    .first()
                    .map_or_else(|| "no IP".to_owned(), ToString::to_string),
            ),
        )
    } else {
        let mut parts = Vec::new();
        let sides = [
            (Direction::Egress, Some(&egress), Some(flow.src)),
            (Direction::Ingress, ingress.as_ref(), dst_pod),
        ];
        for (direction, side, pod) in sides {
            let (Some(side), Some(pod)) = (side, pod) else {
                continue;
            };
            let peer = match direction {
                Direction::Egress => format!("to {to}"),
                Direction::Ingress => format!("from {}", flow.src),
            };
            parts.push(match &side.allowed_by {
                Some(by) => format!(
                    "{} {}[{}] allows {what} {peer}",
                    by.policy,
                    direction.as_str(),
                    by.rule
                ),
                None => format!("no policy selects {pod} for {}", direction.as_str()),
            });
        }
        (true, Vec::new(), format!("allowed: {}", parts.join("; ")))
    };
    let certain = allowed
        || dst_pod.is_some()
        || !cluster.policies().iter().any(|p| {
            p.selects(flow.src)
                && p.egress.iter().flatten().any(|rule| {
                    rule.peers
                        .iter()
                        .any(|peer| matches!(peer, Peer::Pods { .. }))
                })
        });
    let allowed_by = egress
        .allowed_by
        .clone()
        .or_else(|| ingress.as_ref().and_then(|i| i.allowed_by.clone()))
        .filter(|_| allowed);
    Decision {
        allowed,
        policies,
        denied_by,
        allowed_by,
        explanation,
        certain,
        egress,
        ingress,
    }
}

/// `shop/web (app=web)`: the pod with the selectors of the policies that select it.
fn describe_pod(cluster: &ClusterState, pod: &PodInfo, direction: Direction) -> String {
    let selectors: Vec<String> = cluster
        .policies()
        .iter()
        .filter(|p| p.rules(direction).is_some() && p.selects(pod))
        .map(|p| p.pod_selector.to_string())
        .collect();
    format!("{pod} ({})", selectors.join("; "))
}

fn side(
    cluster: &ClusterState,
    direction: Direction,
    pod: &PodInfo,
    allows: impl Fn(&Rule) -> bool,
) -> SideDecision {
    let mut policies = Vec::new();
    let mut allowed_by = None;
    for policy in cluster.policies() {
        let Some(rules) = policy.rules(direction) else {
            continue;
        };
        if !policy.selects(pod) {
            continue;
        }
        policies.push(policy.to_string());
        if allowed_by.is_none()
            && let Some(index) = rules.iter().position(&allows)
        {
            allowed_by = Some(AllowedBy {
                policy: policy.to_string(),
                rule: index,
                direction,
            });
        }
    }
    SideDecision {
        allowed: policies.is_empty() || allowed_by.is_some(),
        policies,
        allowed_by,
    }
}

/// Whether `rule` of a policy in `owner`'s namespace matches the peer (`peer_pod` at
/// `peer_ip`) and the flow's port on `port_owner` (the destination pod, for named ports).
fn rule_allows(
    cluster: &ClusterState,
    rule: &Rule,
    owner: &PodInfo,
    peer_pod: Option<&PodInfo>,
    peer_ip: IpAddr,
    flow: &Flow<'_>,
    port_owner: Option<&PodInfo>,
) -> bool {
    let peer_matches = rule.peers.is_empty()
        || rule
            .peers
            .iter()
            .any(|peer| peer_allows(cluster, peer, &owner.namespace, peer_pod, peer_ip));
    let port_matches = rule.ports.is_empty()
        || rule
            .ports
            .iter()
            .any(|port| port_allows(port, flow.port, flow.protocol, port_owner));
    peer_matches && port_matches
}

fn peer_allows(
    cluster: &ClusterState,
    peer: &Peer,
    policy_namespace: &str,
    pod: Option<&PodInfo>,
    ip: IpAddr,
) -> bool {
    match peer {
        Peer::Block { cidr, except } => cidr.contains(ip) && !except.iter().any(|e| e.contains(ip)),
        Peer::Pods { pods, namespaces } => {
            let Some(pod) = pod.filter(|p| !p.host_network) else {
                return false;
            };
            let namespace_matches = match namespaces {
                None => pod.namespace == policy_namespace,
                Some(selector) => selector.matches(&cluster.namespace_labels(&pod.namespace)),
            };
            namespace_matches && pods.matches(&pod.labels)
        }
    }
}

fn port_allows(rule: &PortRule, port: u16, protocol: Protocol, owner: Option<&PodInfo>) -> bool {
    if rule.protocol != protocol {
        return false;
    }
    match &rule.port {
        PortMatch::Any => true,
        PortMatch::Number { first, last } => (*first..=*last).contains(&port),
        PortMatch::Named(name) => owner.is_some_and(|pod| {
            pod.container_ports
                .iter()
                .any(|p| &p.name == name && p.port == port && p.protocol == protocol)
        }),
    }
}

/// Namespace labels, with the `kubernetes.io/metadata.name` label every namespace has.
pub fn namespace_labels(
    name: &str,
    labels: Option<&BTreeMap<String, String>>,
) -> BTreeMap<String, String> {
    let mut labels = labels.cloned().unwrap_or_default();
    labels.insert("kubernetes.io/metadata.name".to_owned(), name.to_owned());
    labels
}
