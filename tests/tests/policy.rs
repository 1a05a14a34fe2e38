//! NetworkPolicies enforced by the lab's iptables rules, and the tracer naming the policy
//! that explains a real drop. Needs root.

use std::time::Duration;

use egress_lab::{CgroupDriver, Lab, PodSpec, addresses as addr, tracer::Tracer};
use serde_json::{Value, json};

fn trace(lab: &Lab) -> Tracer {
    Tracer::trace_pod(lab, "default/client", &[]).unwrap()
}

fn policy(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    })
}

fn records_of(records: &[Value], pid: u32) -> Vec<&Value> {
    records
        .iter()
        .filter(|r| r["process"]["pid"] == pid)
        .collect()
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn a_policy_drop_is_attributed_to_the_policy_that_explains_it() {
    let lab = Lab::start(&[PodSpec::new("default", "client", CgroupDriver::Systemd)]).unwrap();
    // Egress anywhere but the endpoint's network (ipBlock with except).
    lab.apply_network_policies(&[policy(
        "no-endpoint",
        json!({
            "podSelector": {"matchLabels": {"app": "client"}},
            "policyTypes": ["Egress"],
            "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["203.0.113.0/24"]}}]}],
        }),
    )])
    .unwrap();
    let tracer = trace(&lab);
    let url = format!("http://{}:{}/", addr::ENDPOINT_NAME, addr::HTTP_PORT);
    let (pid, status) = lab
        .exec_in_pod(
            lab.pod("client"),
            "curl",
            &["-s", "-4", "-m", "2", "-o", "/dev/null", &url],
        )
        .unwrap();
    assert_eq!(status.code(), Some(28), "curl must time out");
    let output = tracer.stop(libc::SIGINT).unwrap();
    let records = output.records();
    let mine = records_of(&records, pid);
    // DNS is allowed (the cluster DNS is outside the excepted range) and resolves.
    let lookup = mine
        .iter()
        .find(|r| r["dns"]["name"] == addr::ENDPOINT_NAME)
        .unwrap_or_else(|| panic!("{mine:#?}"));
    assert_eq!(lookup["verdict"]["hop"], "none", "{lookup}");
    let record = mine
        .iter()
        .find(|r| r["protocol"] == "tcp")
        .unwrap_or_else(|| panic!("{mine:#?}"));
    assert_eq!(record["outcome"], "timeout", "{record}");
    assert_eq!(record["dst_name"], addr::ENDPOINT_NAME, "{record}");
    assert_eq!(record["drop"]["reason"], "NETFILTER_DROP", "{record}");
    let verdict = &record["verdict"];
    assert_eq!(verdict["hop"], "network-policy", "{record}");
    assert_eq!(verdict["reason"], "denied", "{record}");
    assert_eq!(verdict["policy"], "default/no-endpoint", "{record}");
    assert_eq!(verdict["likely"], false, "{record}");
    assert!(
        verdict["evidence"][0]
            .as_str()
            .unwrap()
            .contains("default/no-endpoint selects default/client (app=client) for egress; no egress rule allows TCP 80 to 203.0.113.10"),
        "{record}"
    );
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn a_policy_that_blocks_dns_is_a_dns_timeout_symptom() {
    let pod = PodSpec::new("default", "client", CgroupDriver::Cgroupfs)
        .with_resolver_options("ndots:5 timeout:1 attempts:1");
    let lab = Lab::start(&[pod]).unwrap();
    // Only HTTPS out: DNS is denied.
    lab.apply_network_policies(&[policy(
        "https-only",
        json!({
            "podSelector": {},
            "policyTypes": ["Egress"],
            "egress": [{"ports": [{"port": 443, "protocol": "TCP"}]}],
        }),
    )])
    .unwrap();
    let tracer = trace(&lab);
    let (pid, _) = lab
        .exec_in_pod(
            lab.pod("client"),
            "getent",
            &["ahostsv4", addr::ENDPOINT_NAME],
        )
        .unwrap();
    // Let the tracer's own 1 s query timeout pass.
    std::thread::sleep(Duration::from_millis(1500));
    let output = tracer.stop(libc::SIGINT).unwrap();
    let records = output.records();
    let mine = records_of(&records, pid);
    let lookup = mine
        .iter()
        .find(|r| r["dns"]["name"] == addr::ENDPOINT_NAME)
        .unwrap_or_else(|| panic!("{mine:#?}\n{}", output.stderr));
    assert_eq!(lookup["outcome"], "timeout", "{lookup}");
    let verdict = &lookup["verdict"];
    assert_eq!(
        (
            &verdict["hop"],
            &verdict["reason"],
            &verdict["symptom"],
            &verdict["policy"]
        ),
        (
            &json!("network-policy"),
            &json!("denied"),
            &json!("dns-timeout"),
            &json!("default/https-only")
        ),
        "{lookup}"
    );
    assert!(
        verdict["evidence"][0].as_str().unwrap().contains(&format!(
            "no egress rule allows UDP 53 to {}",
            addr::CLUSTER_DNS
        )),
        "{lookup}"
    );
}
