//! The lab's NetworkPolicy enforcement: iptables rules in the node's namespace generated
//! from the policies, the way Azure NPM or Calico's iptables mode enforce them, so the
//! drops the tracer sees are real kernel drops.
//!
//! Written independently of the tracer's evaluator (the thing under test), for the subset
//! the lab's scenarios use: `podSelector`/`namespaceSelector` with `matchLabels` (lab
//! namespaces have only their `kubernetes.io/metadata.name` label), `ipBlock` with
//! `except`, numbered ports with protocol and `endPort`, `policyTypes`, IPv4. Anything
//! else is an error rather than a silently different policy.
//!
//! Shape: `FORWARD` jumps to `NP-FORWARD`, which lets established flows through and
//! sends each isolated pod's new flows to its chain; that chain marks what a rule allows,
//! returns marked packets and drops the rest.

use serde_json::Value;

use crate::LabPod;

const ALLOWED_MARK: &str = "0x10000/0x10000";

/// One rule's peers (`None`: any) and ports (`None`: any).
struct Rule<'a> {
    /// The policy's namespace (a `podSelector` peer alone means pods of it).
    namespace: &'a str,
    peers: Option<&'a Vec<Value>>,
    ports: Option<&'a Vec<Value>>,
}

/// The `iptables` argument lists that enforce `policies` for `pods`, in order.
pub fn iptables_rules(policies: &[Value], pods: &[LabPod]) -> Result<Vec<Vec<String>>, String> {
    let mut out: Vec<Vec<String>> = Vec::new();
    let mut add = |args: &[&str]| out.push(args.iter().map(|a| (*a).to_owned()).collect());
    add(&["-N", "NP-FORWARD"]);
    add(&["-I", "FORWARD", "1", "-j", "NP-FORWARD"]);
    add(&[
        "-A",
        "NP-FORWARD",
        "-m",
        "conntrack",
        "--ctstate",
        "ESTABLISHED,RELATED",
        "-j",
        "RETURN",
    ]);
    let mut chains = 0usize;
    for (index, pod) in pods.iter().enumerate() {
        for (direction, field, address_flag, peer_flag) in [
            ("Egress", "egress", "-s", "-d"),
            ("Ingress", "ingress", "-d", "-s"),
        ] {
            let mut rules: Vec<Rule> = Vec::new();
            let mut isolated = false;
            for policy in policies {
                if !selects(policy, pod)? || !has_type(policy, direction) {
                    continue;
                }
                isolated = true;
                for rule in policy["spec"][field].as_array().into_iter().flatten() {
                    let peers_field = if field == "egress" { "to" } else { "from" };
                    rules.push(Rule {
                        namespace: policy["metadata"]["namespace"]
                            .as_str()
                            .unwrap_or("default"),
                        peers: rule[peers_field].as_array().filter(|a| !a.is_empty()),
                        ports: rule["ports"].as_array().filter(|a| !a.is_empty()),
                    });
                }
            }
            if !isolated {
                continue;
            }
            let chain = format!("NP-{}-{index}", &field[..1].to_uppercase());
            let ip = pod.ip.to_string();
            out.push(vec!["-N".into(), chain.clone()]);
            out.push(
                ["-A", "NP-FORWARD", address_flag, &ip, "-j", &chain]
                    .map(String::from)
                    .to_vec(),
            );
            for rule in rules {
                let ports = port_matches(rule.ports)?;
                for peer in peer_matches(&rule, pods, peer_flag)? {
                    let (target, matches) = match peer {
                        Peer::Matches(matches) => (chain.clone(), matches),
                        // Packets in an excepted range return from the block's own chain
                        // unmarked.
                        Peer::Block { cidr, except } => {
                            chains += 1;
                            let block = format!("NP-BLOCK-{chains}");
                            out.push(vec!["-N".into(), block.clone()]);
                            for range in except {
                                out.push(
                                    ["-A", &block, peer_flag, &range, "-j", "RETURN"]
                                        .map(String::from)
                                        .to_vec(),
                                );
                            }
                            out.push(["-A", &chain, "-j", &block].map(String::from).to_vec());
                            (block, vec![peer_flag.to_owned(), cidr])
                        }
                    };
                    for port in &ports {
                        let mut args = vec!["-A".to_owned(), target.clone()];
                        args.extend(matches.iter().cloned());
                        args.extend(port.iter().cloned());
                        args.extend(["-j", "MARK", "--set-xmark", ALLOWED_MARK].map(String::from));
                        out.push(args);
                    }
                }
            }
            out.push(
                [
                    "-A",
                    &chain,
                    "-m",
                    "mark",
                    "--mark",
                    ALLOWED_MARK,
                    "-j",
                    "RETURN",
                ]
                .map(String::from)
                .to_vec(),
            );
            out.push(["-A", &chain, "-j", "DROP"].map(String::from).to_vec());
        }
    }
    Ok(out)
}

fn has_type(policy: &Value, direction: &str) -> bool {
    match policy["spec"]["policyTypes"].as_array() {
        Some(types) => types.iter().any(|t| t == direction),
        None => {
            direction == "Ingress"
                || policy["spec"]["egress"]
                    .as_array()
                    .is_some_and(|e| !e.is_empty())
        }
    }
}

fn selects(policy: &Value, pod: &LabPod) -> Result<bool, String> {
    let namespace = policy["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default");
    Ok(namespace == pod.namespace && labels_match(&policy["spec"]["podSelector"], &pod.labels)?)
}

fn labels_match(selector: &Value, labels: &[(String, String)]) -> Result<bool, String> {
    if selector.get("matchExpressions").is_some() {
        return Err("the lab's enforcement supports matchLabels only".into());
    }
    let Some(wanted) = selector["matchLabels"].as_object() else {
        return Ok(true);
    };
    Ok(wanted.iter().all(|(key, value)| {
        labels
            .iter()
            .any(|(k, v)| k == key && Some(v.as_str()) == value.as_str())
    }))
}

/// How a peer is matched: plain iptables matches, or an ipBlock with `except`, which
/// needs a chain of its own.
enum Peer {
    Matches(Vec<String>),
    Block { cidr: String, except: Vec<String> },
}

/// The matches of each peer (one empty match for "any peer").
fn peer_matches(rule: &Rule, pods: &[LabPod], flag: &str) -> Result<Vec<Peer>, String> {
    let Some(peers) = rule.peers else {
        return Ok(vec![Peer::Matches(Vec::new())]);
    };
    let mut matches = Vec::new();
    for peer in peers {
        if let Some(block) = peer.get("ipBlock") {
            let cidr = block["cidr"]
                .as_str()
                .ok_or("ipBlock without cidr")?
                .to_owned();
            let except: Vec<String> = block["except"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect();
            matches.push(if except.is_empty() {
                Peer::Matches(vec![flag.to_owned(), cidr])
            } else {
                Peer::Block { cidr, except }
            });
            continue;
        }
        let pod_selector = peer.get("podSelector");
        let namespace_selector = peer.get("namespaceSelector");
        for pod in pods {
            let namespace_ok = match namespace_selector {
                Some(selector) => labels_match(
                    selector,
                    &[("kubernetes.io/metadata.name".into(), pod.namespace.clone())],
                )?,
                None => pod.namespace == rule.namespace,
            };
            let pod_ok = match pod_selector {
                Some(selector) => labels_match(selector, &pod.labels)?,
                None => true,
            };
            if namespace_ok && pod_ok {
                matches.push(Peer::Matches(vec![flag.to_owned(), pod.ip.to_string()]));
            }
        }
    }
    Ok(matches)
}

/// iptables matches for each port (an empty list for "any port").
fn port_matches(ports: Option<&Vec<Value>>) -> Result<Vec<Vec<String>>, String> {
    let Some(ports) = ports else {
        return Ok(vec![Vec::new()]);
    };
    ports
        .iter()
        .map(|port| {
            let protocol = port["protocol"]
                .as_str()
                .unwrap_or("TCP")
                .to_ascii_lowercase();
            let mut args = vec!["-p".to_owned(), protocol];
            match (&port["port"], port["endPort"].as_u64()) {
                (Value::Null, _) => {}
                (Value::Number(n), None) => args.extend(["--dport".to_owned(), n.to_string()]),
                (Value::Number(n), Some(end)) => {
                    args.extend(["--dport".to_owned(), format!("{n}:{end}")])
                }
                (other, _) => {
                    return Err(format!(
                        "the lab's enforcement supports numbered ports only, got {other}"
                    ));
                }
            }
            Ok(args)
        })
        .collect()
}
