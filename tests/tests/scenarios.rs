//! The scenario library: one fault each, with the verdict `trace` gives for an ordinary
//! client in the pod and the verdict `diagnose` gives for the same target. Needs root.
//!
//! `trace` sees the kernel's side of things only: where the HTTP layer decides (a proxy's
//! 403, an endpoint's 503) the connection itself succeeded, and its verdict is `none`.

use std::time::Duration;

use egress_lab::{
    CgroupDriver, Fault, Lab, PodSpec, addresses as addr,
    tracer::{Diagnosis, Tracer},
};
use serde_json::{Value, json};

/// The resolver options of every scenario's pod: a 1 s DNS timeout keeps DNS failures
/// quick.
const RESOLVER: &str = "ndots:5 timeout:1 attempts:1";
/// A DNS server address where queries vanish (a fault drops them).
const SILENT_DNS: std::net::Ipv4Addr = std::net::Ipv4Addr::new(192, 0, 2, 99);
/// diagnose's connect timeout.
const CONNECT_TIMEOUT_S: u64 = 2;

struct Scenario {
    name: &'static str,
    /// Environment of the pod's container.
    env: &'static [(&'static str, &'static str)],
    setup: fn(&Lab),
    /// What an ordinary client in the pod runs (curl's arguments).
    client: &'static [&'static str],
    /// The target diagnose is given, and its other arguments.
    target: &'static str,
    diagnose_args: &'static [&'static str],
    /// (hop, reason) of trace's record of the client's failing step.
    trace: (&'static str, &'static str),
    /// (hop, reason) of diagnose's verdict.
    diagnose: (&'static str, &'static str),
    /// A fact diagnose's evidence must state.
    evidence: &'static str,
    /// What diagnose's summary must say, if anything in particular.
    summary: &'static str,
}

fn no_setup(_: &Lab) {}

fn policy(lab: &Lab, name: &str, spec: Value) {
    lab.apply_network_policies(&[json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    })])
    .unwrap();
}

fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "success",
            env: &[],
            setup: no_setup,
            client: &["http://api.example.test/"],
            target: "http://api.example.test/",
            diagnose_args: &[],
            trace: ("none", "ok"),
            diagnose: ("none", "ok"),
            evidence: "HEAD / answered 200",
            summary: "",
        },
        Scenario {
            name: "DNS NXDOMAIN",
            env: &[],
            setup: no_setup,
            client: &["http://missing.example.test/"],
            target: "http://missing.example.test/",
            diagnose_args: &[],
            trace: ("dns", "nxdomain"),
            diagnose: ("dns", "nxdomain"),
            evidence: "every query answered NXDOMAIN",
            summary: "",
        },
        Scenario {
            name: "DNS NXDOMAIN while the upstream server asked directly is silent",
            env: &[],
            setup: |lab| {
                lab.inject(Fault::SilentDrop {
                    dst: SILENT_DNS.into(),
                    port: 53,
                })
                .unwrap()
            },
            client: &["http://missing.example.test/"],
            target: "http://missing.example.test/",
            diagnose_args: &["--upstream-dns", "192.0.2.99"],
            trace: ("dns", "nxdomain"),
            diagnose: ("dns", "nxdomain"),
            evidence: "every query answered NXDOMAIN",
            summary: "",
        },
        Scenario {
            name: "DNS SERVFAIL",
            env: &[],
            setup: no_setup,
            client: &["http://www.servfail.test/"],
            target: "http://www.servfail.test/",
            diagnose_args: &[],
            trace: ("dns", "servfail"),
            diagnose: ("dns", "servfail"),
            evidence: "SERVFAIL (RCODE 2)",
            summary: "",
        },
        Scenario {
            name: "upstream DNS unreachable",
            env: &[],
            setup: |lab| lab.inject(Fault::UpstreamDnsUnreachable).unwrap(),
            client: &["http://api.example.test/"],
            target: "http://api.example.test/",
            diagnose_args: &[],
            trace: ("dns", "timeout"),
            diagnose: ("dns", "timeout"),
            evidence: "got no response within the resolver timeout",
            summary: "",
        },
        Scenario {
            name: "NetworkPolicy denies DNS",
            env: &[],
            setup: |lab| {
                policy(
                    lab,
                    "https-only",
                    json!({"podSelector": {}, "policyTypes": ["Egress"],
                           "egress": [{"ports": [{"port": 443, "protocol": "TCP"}]}]}),
                )
            },
            client: &["http://api.example.test/"],
            target: "http://api.example.test/",
            diagnose_args: &[],
            trace: ("network-policy", "denied"),
            diagnose: ("network-policy", "denied"),
            evidence: "no egress rule allows UDP 53 to 10.0.0.10",
            summary: "",
        },
        Scenario {
            name: "NetworkPolicy denies the endpoint (ipBlock except)",
            env: &[],
            setup: |lab| {
                policy(
                    lab,
                    "no-endpoint",
                    json!({"podSelector": {}, "policyTypes": ["Egress"],
                           "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["203.0.113.0/24"]}}]}]}),
                )
            },
            client: &["http://api.example.test/"],
            target: "http://api.example.test/",
            diagnose_args: &[],
            trace: ("network-policy", "denied"),
            diagnose: ("network-policy", "denied"),
            evidence: "no egress rule allows TCP 80 to 203.0.113.10",
            summary: "",
        },
        Scenario {
            name: "node iptables drop that is no policy",
            env: &[],
            setup: |lab| {
                lab.inject(Fault::NodeFirewallDrop {
                    dst: addr::ENDPOINT.into(),
                    port: addr::HTTP_PORT,
                })
                .unwrap()
            },
            client: &["http://api.example.test/"],
            target: "http://api.example.test/",
            diagnose_args: &[],
            trace: ("node-firewall", "netfilter-drop"),
            diagnose: ("node-firewall", "netfilter-drop"),
            evidence: "with reason NETFILTER_DROP",
            summary: "",
        },
        Scenario {
            name: "an eBPF CNI drops what a NetworkPolicy denies",
            env: &[],
            setup: |lab| {
                // The policy is only known to the cluster; the tc program enforces it.
                lab.publish_network_policies(&[json!({
                    "apiVersion": "networking.k8s.io/v1",
                    "kind": "NetworkPolicy",
                    "metadata": {"name": "no-endpoint", "namespace": "default"},
                    "spec": {"podSelector": {}, "policyTypes": ["Egress"],
                             "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0",
                                                             "except": ["203.0.113.0/24"]}}]}]},
                })])
                .unwrap();
                lab.inject(Fault::EbpfDrop {
                    dst: addr::ENDPOINT,
                    port: addr::HTTP_PORT,
                })
                .unwrap()
            },
            client: &["http://api.example.test/"],
            target: "http://api.example.test/",
            diagnose_args: &[],
            trace: ("network-policy", "denied"),
            diagnose: ("network-policy", "denied"),
            evidence: "with reason TC_INGRESS",
            summary: "",
        },
        Scenario {
            name: "an eBPF program drops with no policy behind it",
            env: &[],
            setup: |lab| {
                lab.inject(Fault::EbpfDrop {
                    dst: addr::ENDPOINT,
                    port: addr::HTTP_PORT,
                })
                .unwrap()
            },
            client: &["http://api.example.test/"],
            target: "http://api.example.test/",
            diagnose_args: &[],
            trace: ("node-firewall", "ebpf-drop"),
            diagnose: ("node-firewall", "ebpf-drop"),
            evidence: "a tc program's verdict (TC_ACT_SHOT)",
            summary: "",
        },
        Scenario {
            name: "no route on the node",
            env: &[],
            setup: |lab| {
                lab.inject(Fault::NoRoute {
                    dst: addr::ENDPOINT.into(),
                })
                .unwrap()
            },
            client: &["http://api.example.test/"],
            target: "http://api.example.test/",
            diagnose_args: &[],
            trace: ("routing", "no-route"),
            diagnose: ("routing", "no-route"),
            evidence: "is an address of the node itself",
            summary: "",
        },
        Scenario {
            name: "upstream silent drop (NSG)",
            env: &[],
            setup: |lab| {
                lab.inject(Fault::SilentDrop {
                    dst: addr::ENDPOINT.into(),
                    port: addr::HTTP_PORT,
                })
                .unwrap()
            },
            client: &["http://api.example.test/"],
            target: "http://api.example.test/",
            diagnose_args: &[],
            trace: ("upstream", "silent-drop"),
            diagnose: ("upstream", "silent-drop"),
            evidence: "the SYN left the node translated to 10.224.0.4",
            summary: "",
        },
        Scenario {
            name: "upstream ICMP admin-prohibited",
            env: &[],
            setup: |lab| {
                lab.inject(Fault::AdminProhibited {
                    dst: addr::ENDPOINT.into(),
                    port: addr::HTTP_PORT,
                })
                .unwrap()
            },
            client: &["http://api.example.test/"],
            target: "http://api.example.test/",
            diagnose_args: &[],
            trace: ("upstream", "icmp-admin-prohibited"),
            diagnose: ("upstream", "icmp-admin-prohibited"),
            evidence: "(type 3 code 13) from 10.224.0.1",
            summary: "(hop 2 of the path)",
        },
        Scenario {
            name: "upstream reset by a firewall",
            env: &[],
            setup: |lab| {
                lab.inject(Fault::Reset {
                    dst: addr::ENDPOINT.into(),
                    port: 8443,
                })
                .unwrap()
            },
            // A connection that works first: its SYN-ACK tells how far the endpoint is.
            client: &[
                "http://api.example.test/",
                "-o",
                "/dev/null",
                "http://api.example.test:8443/",
            ],
            target: "http://api.example.test:8443/",
            diagnose_args: &[],
            trace: ("upstream", "reset"),
            diagnose: ("upstream", "reset"),
            evidence: "it was sent on the path, not by the endpoint",
            summary: "10.224.0.1 (hop 2) reset the connection",
        },
        Scenario {
            name: "a router two hops out resets every connection to an address",
            env: &[],
            setup: |lab| {
                lab.inject(Fault::Router2ResetsAll { dst: addr::NOBODY })
                    .unwrap()
            },
            client: &["http://203.0.113.99/"],
            target: "http://203.0.113.99/",
            diagnose_args: &[],
            // Passively, without an earlier connection to compare with, a reset is the
            // endpoint's as far as trace can tell.
            trace: ("endpoint", "refused"),
            diagnose: ("upstream", "reset"),
            evidence: "it was sent on the path, not by the endpoint",
            summary: "198.51.100.2 (hop 3) reset the connection",
        },
        Scenario {
            name: "a silent drop at router 2 (answers no probe)",
            env: &[],
            setup: |lab| {
                lab.inject(Fault::Router2SilentDrop {
                    dst: addr::ENDPOINT,
                    port: addr::HTTP_PORT,
                })
                .unwrap()
            },
            client: &["http://api.example.test/"],
            target: "http://api.example.test/",
            diagnose_args: &[],
            trace: ("upstream", "silent-drop"),
            diagnose: ("upstream", "silent-drop"),
            evidence: "the SYN left the node translated to 10.224.0.4",
            summary: "passed 10.224.0.1 at hop 2; nothing answered beyond it",
        },
        Scenario {
            name: "a proxy that answers 403 to CONNECT",
            env: &[("HTTPS_PROXY", "http://203.0.113.10:3128")],
            setup: no_setup,
            client: &[
                "-x",
                "http://203.0.113.10:3128",
                "https://api.example.test/",
            ],
            target: "https://api.example.test/",
            diagnose_args: &[],
            trace: ("none", "ok"),
            diagnose: ("proxy", "http-403"),
            evidence: "answered 403 to CONNECT api.example.test:443",
            summary: "",
        },
        Scenario {
            name: "the endpoint's port is closed",
            env: &[],
            setup: no_setup,
            client: &["http://api.example.test:81/"],
            target: "http://api.example.test:81/",
            diagnose_args: &[],
            trace: ("endpoint", "refused"),
            diagnose: ("endpoint", "refused"),
            evidence: "the SYN was answered with a TCP reset",
            summary: "",
        },
        Scenario {
            name: "the endpoint does not speak TLS",
            env: &[],
            setup: no_setup,
            client: &["https://api.example.test:80/"],
            target: "https://api.example.test:80/",
            diagnose_args: &[],
            trace: ("none", "ok"),
            diagnose: ("endpoint", "tls-failed"),
            evidence: "TLS handshake with api.example.test failed",
            summary: "",
        },
        Scenario {
            name: "the endpoint answers HTTP 503",
            env: &[],
            setup: no_setup,
            client: &["http://api.example.test:8503/"],
            target: "http://api.example.test:8503/",
            diagnose_args: &[],
            trace: ("none", "ok"),
            diagnose: ("endpoint", "http-503"),
            evidence: "HEAD / answered 503",
            summary: "",
        },
    ]
}

/// The verdict of the record that tells what happened to the client: a failed lookup of
/// its name, else its TCP connection.
fn trace_verdict(records: &[Value], pid: u32) -> &Value {
    let mine: Vec<&Value> = records
        .iter()
        .filter(|r| r["process"]["pid"] == pid)
        .collect();
    let failed_lookup = mine
        .iter()
        .find(|r| r.get("dns").is_some() && r["verdict"]["hop"] != "none");
    let connections: Vec<&&Value> = mine.iter().filter(|r| r["protocol"] == "tcp").collect();
    let connection = connections
        .iter()
        .find(|r| r["verdict"]["hop"] != "none")
        .or(connections.first())
        .copied();
    failed_lookup
        .or(connection)
        .map(|r| &r["verdict"])
        .unwrap_or_else(|| panic!("no record of pid {pid}: {mine:#?}"))
}

fn check_diagnosis(scenario: &Scenario, diagnosis: &Diagnosis) {
    let report = &diagnosis.report;
    let context = format!("{}: {report:#}\n{}", scenario.name, diagnosis.stderr);
    let verdict = &report["verdict"];
    assert_eq!(
        (verdict["hop"].as_str(), verdict["reason"].as_str()),
        (Some(scenario.diagnose.0), Some(scenario.diagnose.1)),
        "{context}"
    );
    assert_eq!(report["pod"], "default/client", "{context}");
    assert_eq!(report["target"]["input"], scenario.target, "{context}");
    assert!(
        verdict["evidence"].to_string().contains(scenario.evidence),
        "{context}"
    );
    assert!(
        verdict["summary"]
            .as_str()
            .is_some_and(|summary| summary.contains(scenario.summary)),
        "{context}"
    );
    // A failed connection's path probe is in the JSON: one hop per TTL from 1, each
    // with its answer.
    if let Some(path) = report["checks"]
        .as_array()
        .and_then(|checks| checks.iter().find(|c| c["id"] == "path"))
    {
        let hops = path["hops"]
            .as_array()
            .expect("the path check lists its hops");
        assert!(!hops.is_empty(), "{context}");
        for (at, hop) in hops.iter().enumerate() {
            assert_eq!(hop["ttl"], at + 1, "{context}");
            assert!(hop["answer"].is_string(), "{context}");
        }
    }
    let expected_exit = if scenario.diagnose.0 == "none" { 0 } else { 1 };
    assert_eq!(diagnosis.status.code(), Some(expected_exit), "{context}");
    // Within the DNS timeout + the connect timeout + 3 s (the path probe of a failed
    // connection, at most the connect timeout, and the process's start included).
    let budget = Duration::from_secs(1 + CONNECT_TIMEOUT_S + 3);
    assert!(
        diagnosis.elapsed <= budget,
        "{}: took {:?}, more than {budget:?}",
        scenario.name,
        diagnosis.elapsed
    );
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn every_scenario_gets_its_verdict_from_trace_and_from_diagnose() {
    for scenario in scenarios() {
        let mut pod = PodSpec::new("default", "client", CgroupDriver::Systemd)
            .with_resolver_options(RESOLVER);
        for (key, value) in scenario.env {
            pod = pod.with_env(key, value);
        }
        let lab = Lab::start(&[pod]).unwrap();
        (scenario.setup)(&lab);

        let tracer = Tracer::trace_pod(&lab, "default/client", &[]).unwrap();
        // IPv4: the lab enforces NetworkPolicies for IPv4 only.
        let mut args = vec!["-4", "-s", "-m", "3", "-o", "/dev/null"];
        args.extend_from_slice(scenario.client);
        let (pid, _) = lab.exec_in_pod(lab.pod("client"), "curl", &args).unwrap();
        // The tracer's own DNS timeout (1 s, from the pod's resolv.conf) must pass.
        std::thread::sleep(Duration::from_millis(1200));
        let output = tracer.stop(libc::SIGINT).unwrap();
        let records = output.records();
        let verdict = trace_verdict(&records, pid);
        assert_eq!(
            (verdict["hop"].as_str(), verdict["reason"].as_str()),
            (Some(scenario.trace.0), Some(scenario.trace.1)),
            "{}: {verdict:#}\n{records:#?}",
            scenario.name
        );

        let timeout = format!("{CONNECT_TIMEOUT_S}s");
        let mut args = vec!["--timeout", &timeout];
        args.extend_from_slice(scenario.diagnose_args);
        let diagnosis = Tracer::diagnose(&lab, "default/client", scenario.target, &args).unwrap();
        check_diagnosis(&scenario, &diagnosis);
    }
}
