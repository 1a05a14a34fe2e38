//! DNS as the tracer sees it in the node lab: lookups grouped with their search-domain
//! expansions, NXDOMAIN, SERVFAIL, timeouts, the TCP retry after a truncated answer, and
//! connections named by the lookups before them. Needs root.

use std::time::Duration;

use egress_lab::{
    CgroupDriver, Fault, Lab, PodSpec, addresses as addr,
    tracer::{Tracer, TracerOutput},
};
use serde_json::Value;

/// Runs `getent ahostsv4 NAME` (A queries only) in the pod; returns its pid.
fn resolve(lab: &Lab, pod: &str, name: &str) -> u32 {
    lab.exec_in_pod(lab.pod(pod), "getent", &["ahostsv4", name])
        .unwrap()
        .0
}

fn trace(lab: &Lab, pod: &str, extra: &[&str]) -> Tracer {
    Tracer::trace_pod(lab, &format!("default/{pod}"), extra).unwrap()
}

/// The single DNS lookup record of `pid`; also checks that the resolver's own UDP
/// sockets were folded into it.
fn lookup_of(output: &TracerOutput, pid: u32) -> Value {
    let records = output.records();
    let mine: Vec<&Value> = records
        .iter()
        .filter(|r| r["process"]["pid"] == pid)
        .collect();
    let lookups: Vec<&&Value> = mine.iter().filter(|r| r.get("dns").is_some()).collect();
    assert_eq!(
        lookups.len(),
        1,
        "one lookup expected: {mine:#?}\n{}",
        output.stderr
    );
    assert!(
        !mine.iter().any(|r| r.get("dns").is_none()
            && r["protocol"] == "udp"
            && r["dst"].as_str().unwrap().ends_with(":53")),
        "the resolver's UDP sockets are part of the lookup: {mine:#?}"
    );
    (*lookups[0]).clone()
}

fn expansions(name: &str) -> Vec<String> {
    [
        "default.svc.cluster.local",
        "svc.cluster.local",
        "cluster.local",
    ]
    .iter()
    .map(|domain| format!("{name}.{domain}"))
    .chain([name.to_owned()])
    .collect()
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn nxdomain_after_every_expansion_is_one_lookup() {
    let lab = Lab::start(&[PodSpec::new("default", "client", CgroupDriver::Systemd)]).unwrap();
    let tracer = trace(&lab, "client", &[]);
    let pid = resolve(&lab, "client", addr::MISSING_NAME);
    let output = tracer.stop(libc::SIGINT).unwrap();
    let lookup = lookup_of(&output, pid);
    assert_eq!(lookup["pod"], "default/client");
    assert_eq!(lookup["process"]["comm"], "getent");
    assert_eq!(lookup["outcome"], "nxdomain");
    assert_eq!(
        (&lookup["verdict"]["hop"], &lookup["verdict"]["reason"]),
        (&"dns".into(), &"nxdomain".into()),
        "{lookup}"
    );
    // The server is recognised as the cluster DNS Service.
    assert!(
        lookup["verdict"]["evidence"][0]
            .as_str()
            .unwrap()
            .contains("10.0.0.10:53 (the cluster DNS Service kube-system/kube-dns)"),
        "{lookup}"
    );
    assert_eq!(lookup["dst"], format!("{}:53", addr::CLUSTER_DNS));
    let dns = &lookup["dns"];
    assert_eq!(dns["name"], addr::MISSING_NAME);
    assert_eq!(dns["rcode"], "NXDOMAIN");
    assert_eq!(dns["types"], serde_json::json!(["A"]));
    assert_eq!(
        dns["queried"],
        serde_json::json!(expansions(addr::MISSING_NAME))
    );
    assert_eq!(dns["answers"], serde_json::json!([]));
    assert_eq!(
        (dns["timeouts"].as_u64(), dns["truncated"].as_bool()),
        (Some(0), Some(false))
    );
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn servfail_from_the_authoritative_server() {
    let lab = Lab::start(&[PodSpec::new("default", "client", CgroupDriver::Systemd)]).unwrap();
    let tracer = trace(&lab, "client", &[]);
    let name = format!("api.{}", addr::SERVFAIL_ZONE);
    let pid = resolve(&lab, "client", &name);
    let output = tracer.stop(libc::SIGINT).unwrap();
    let lookup = lookup_of(&output, pid);
    assert_eq!(lookup["outcome"], "servfail", "{lookup}");
    assert_eq!(
        (&lookup["verdict"]["hop"], &lookup["verdict"]["reason"]),
        (&"dns".into(), &"servfail".into()),
        "{lookup}"
    );
    assert_eq!(lookup["dns"]["name"], name.as_str());
    assert_eq!(lookup["dns"]["rcode"], "SERVFAIL");
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn timeout_when_the_upstream_dns_is_unreachable() {
    let pod = PodSpec::new("default", "client", CgroupDriver::Systemd)
        .with_resolver_options("ndots:5 timeout:1 attempts:1");
    let lab = Lab::start(&[pod]).unwrap();
    lab.inject(Fault::UpstreamDnsUnreachable).unwrap();
    // The tracer takes the 1 s timeout from the pod's own resolv.conf.
    let tracer = trace(&lab, "client", &[]);
    let pid = resolve(&lab, "client", addr::ENDPOINT_NAME);
    // Let the tracer's own timeout pass before stopping it.
    std::thread::sleep(Duration::from_millis(1500));
    let output = tracer.stop(libc::SIGINT).unwrap();
    let lookup = lookup_of(&output, pid);
    assert_eq!(lookup["outcome"], "timeout", "{lookup}");
    assert_eq!(
        (
            &lookup["verdict"]["hop"],
            &lookup["verdict"]["reason"],
            &lookup["verdict"]["symptom"]
        ),
        (&"dns".into(), &"timeout".into(), &"dns-timeout".into()),
        "{lookup}"
    );
    let dns = &lookup["dns"];
    assert_eq!(dns["name"], addr::ENDPOINT_NAME);
    assert!(dns["timeouts"].as_u64().unwrap() >= 1, "{lookup}");
    assert_eq!(dns["answers"], serde_json::json!([]));
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn truncated_answer_is_retried_over_tcp() {
    let lab = Lab::start(&[PodSpec::new("default", "client", CgroupDriver::Systemd)]).unwrap();
    let tracer = trace(&lab, "client", &[]);
    let pid = resolve(&lab, "client", addr::BIG_NAME);
    let output = tracer.stop(libc::SIGINT).unwrap();
    let lookup = lookup_of(&output, pid);
    assert_eq!(lookup["outcome"], "resolved", "{lookup}");
    let dns = &lookup["dns"];
    assert_eq!(
        (dns["truncated"].as_bool(), dns["over_tcp"].as_bool()),
        (Some(true), Some(true)),
        "{lookup}"
    ); // The TCP answer is longer than the kernel copies: the answers that fit are kept.
    let answers = dns["answers"].as_array().unwrap().len();
    assert!(
        (20..=usize::from(addr::BIG_NAME_ADDRESSES)).contains(&answers),
        "{lookup}"
    );
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn connections_are_named_by_the_lookup_before_them() {
    let lab = Lab::start(&[PodSpec::new("default", "client", CgroupDriver::Systemd)]).unwrap();
    let tracer = trace(&lab, "client", &[]);
    let url = format!("http://{}/", addr::ENDPOINT_NAME);
    let (pid, status) = lab
        .exec_in_pod(
            lab.pod("client"),
            "curl",
            &["-4", "-s", "-m", "5", "-o", "/dev/null", &url],
        )
        .unwrap();
    assert!(status.success());
    let output = tracer.stop(libc::SIGINT).unwrap();
    let records = output.records();
    let connect = records
        .iter()
        .find(|r| r["process"]["pid"] == pid && r["protocol"] == "tcp")
        .unwrap_or_else(|| panic!("{records:#?}"));
    assert_eq!(connect["dst"], format!("{}:80", addr::ENDPOINT));
    assert_eq!(connect["dst_name"], addr::ENDPOINT_NAME);
    let lookup = lookup_of(&output, pid);
    assert_eq!(lookup["outcome"], "resolved");
    assert_eq!(
        lookup["dns"]["answers"],
        serde_json::json!([{"name": addr::ENDPOINT_NAME, "type": "A", "value": addr::ENDPOINT.to_string()}])
    );
}
