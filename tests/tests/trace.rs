//! `egress-tracer trace` against real traffic in the node lab. Needs root.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use egress_lab::{
    CgroupDriver, Fault, Lab, PodSpec, addresses as addr,
    tracer::{BpfObjects, Tracer},
};
use serde_json::Value;

fn lab() -> Lab {
    Lab::start(&[
        PodSpec::new("default", "client", CgroupDriver::Systemd),
        PodSpec::new("shop", "other", CgroupDriver::Cgroupfs),
    ])
    .unwrap()
}

/// Runs curl in a pod; returns its pid and exit code.
fn curl(lab: &Lab, pod: &str, url: &str, timeout_s: u32) -> (u32, Option<i32>) {
    let timeout = timeout_s.to_string();
    let (pid, status) = lab
        .exec_in_pod(
            lab.pod(pod),
            "curl",
            &["-s", "-m", &timeout, "-o", "/dev/null", url],
        )
        .unwrap();
    (pid, status.code())
}

fn url(host: impl std::fmt::Display, port: u16) -> String {
    format!("http://{host}:{port}/")
}

/// The programs attached to `cgroup` (ids and names), from `bpftool cgroup show`.
fn cgroup_hooks(cgroup: &Path) -> Vec<(u64, String)> {
    let output = Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(cgroup)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let hooks: Vec<Value> = serde_json::from_slice(&output.stdout).unwrap();
    hooks
        .iter()
        .map(|h| {
            (
                h["id"].as_u64().unwrap(),
                h["name"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn trace_client(lab: &Lab) -> Tracer {
    Tracer::trace_pod(lab, "default/client", &[]).unwrap()
}

fn records_of_pid(records: &[Value], pid: u32) -> Vec<&Value> {
    records
        .iter()
        .filter(|r| r["process"]["pid"] == pid)
        .collect()
}

/// The single TCP record of `pid`.
fn tcp_record(records: &[Value], pid: u32) -> &Value {
    let found: Vec<&Value> = records_of_pid(records, pid)
        .into_iter()
        .filter(|r| r["protocol"] == "tcp")
        .collect();
    assert_eq!(found.len(), 1, "pid {pid}: {records:#?}");
    found[0]
}

/// Traces the client pod while its curl to `url` times out after `timeout_s`: the single
/// TCP record of that curl, an attempt that timed out.
fn timed_out_attempt(lab: &Lab, url: &str, timeout_s: u32) -> Value {
    let tracer = trace_client(lab);
    let (pid, code) = curl(lab, "client", url, timeout_s);
    assert_eq!(code, Some(28), "curl must time out");
    let records = tracer.stop(libc::SIGINT).unwrap().records();
    let record = tcp_record(&records, pid).clone();
    assert_eq!(record["outcome"], "timeout", "{record}");
    record
}

/// The verdict's hop, reason and whether it is only likely.
fn assert_verdict(record: &Value, hop: &str, reason: &str, likely: bool) {
    let verdict = &record["verdict"];
    assert_eq!(
        (&verdict["hop"], &verdict["reason"], &verdict["likely"]),
        (
            &Value::from(hop),
            &Value::from(reason),
            &Value::from(likely)
        ),
        "{record}"
    );
}

fn assert_source_is(record: &Value, ip: impl std::fmt::Display) {
    let src = record["src"]
        .as_str()
        .unwrap_or_else(|| panic!("no src: {record}"));
    let (src_ip, port) = src.rsplit_once(':').unwrap();
    assert_eq!(src_ip, ip.to_string(), "{record}");
    assert_ne!(port.parse::<u16>().unwrap(), 0, "{record}");
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn traces_one_pods_connects_with_exact_fields_and_detaches_on_sigint() {
    let lab = lab();
    let tracer = trace_client(&lab);
    let attached = BpfObjects::owned_by(tracer.pid()).unwrap();
    // connect4/6, sendmsg4/6, packets out and in, handshake errors, socket destruction,
    // ICMP and drops: a program each.
    assert_eq!(attached.programs.len(), 10, "{attached:?}");
    // The cgroup programs hook kubelet's pod cgroups (this lab's for both drivers, and
    // other labs' running now), not the whole hierarchy.
    let hooked = tracer.hooked_cgroups();
    for pod in ["client", "other"] {
        let pod_root = lab
            .pod(pod)
            .cgroup
            .ancestors()
            .find(|c| {
                c.file_name()
                    .is_some_and(|n| n == "kubepods" || n == "kubepods.slice")
            })
            .unwrap();
        assert!(hooked.iter().any(|c| c == pod_root), "{hooked:?}");
        let mut hooks = cgroup_hooks(pod_root);
        hooks.retain(|(id, _)| attached.programs.contains(id));
        let mut names: Vec<String> = hooks.into_iter().map(|(_, name)| name).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "connect4",
                "connect6",
                "sendmsg4",
                "sendmsg6",
                "skb_egress",
                "skb_ingress"
            ],
            "{pod_root:?}"
        );
    }
    // A link per cgroup program and hooked cgroup, and one per tracepoint program.
    assert!(attached.links.len() >= 2 * 6 + 4, "{attached:?}");

    let (v4, code) = curl(&lab, "client", &url(addr::ENDPOINT, addr::HTTP_PORT), 5);
    assert_eq!(code, Some(0));
    let (v6, code) = curl(
        &lab,
        "client",
        &url(format!("[{}]", addr::ENDPOINT6), addr::HTTP_PORT),
        5,
    );
    assert_eq!(code, Some(0));
    let (other, code) = curl(&lab, "other", &url(addr::ENDPOINT, addr::HTTP_PORT), 5);
    assert_eq!(code, Some(0));

    let output = tracer.stop(libc::SIGINT).unwrap();
    assert!(output.status.success(), "tracer failed: {}", output.stderr);
    let records = output.records();
    let client = lab.pod("client");

    let record = tcp_record(&records, v4);
    assert_eq!(record["pod"], "default/client");
    assert_eq!(record["pod_uid"], client.uid.as_str());
    // The container from the cgroup path, named from the pod's status.
    assert_eq!(
        record["container"],
        serde_json::json!({"name": "client", "id": client.container_id})
    );
    assert_eq!(record["process"]["comm"], "curl");
    assert_eq!(
        record["dst"],
        format!("{}:{}", addr::ENDPOINT, addr::HTTP_PORT)
    );
    assert_eq!(record["outcome"], "established");
    assert_eq!(record["tcp"]["syn_retransmits"], 0);
    assert!(
        record["tcp"]["handshake_ms"].as_f64().unwrap() > 0.0,
        "{record}"
    );
    assert_source_is(record, client.ip);
    assert!(humantime::parse_rfc3339(record["time"].as_str().unwrap()).is_ok());

    let record = tcp_record(&records, v6);
    assert_eq!(
        record["dst"],
        format!("[{}]:{}", addr::ENDPOINT6, addr::HTTP_PORT)
    );
    assert_eq!(record["outcome"], "established");
    assert_source_is(record, format!("[{}]", client.ipv6));

    // The other pod's connect is not in this pod's trace, nor is anything else.
    assert!(
        records_of_pid(&records, other).is_empty(),
        "other pod leaked: {records:#?}"
    );
    assert!(
        records.iter().all(|r| r["pod"] == "default/client"),
        "{records:#?}"
    );

    assert_eq!(
        attached.wait_gone(Duration::from_secs(5)).unwrap(),
        BpfObjects::default()
    );
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn detaches_on_sigterm_and_sees_every_pod_but_not_the_node_without_filter() {
    let lab = lab();
    let state = lab.cluster_state();
    let tracer = Tracer::start(
        &lab,
        &[
            "trace",
            "--cluster-state",
            state.to_str().unwrap(),
            "-o",
            "json",
        ],
    )
    .unwrap();
    let attached = BpfObjects::owned_by(tracer.pid()).unwrap();
    assert!(!attached.is_empty());

    let (client, _) = curl(&lab, "client", &url(addr::ENDPOINT, addr::HTTP_PORT), 5);
    let (other, _) = curl(&lab, "other", &url(addr::ENDPOINT, addr::HTTP_PORT), 5);
    // A node process (outside kubelet's pod cgroups) connecting to the same endpoint.
    let mut node_curl = Command::new("curl");
    node_curl
        .args(["-s", "-m", "5", "-o", "/dev/null"])
        .arg(url(addr::ENDPOINT, addr::HTTP_PORT))
        .stdout(Stdio::null());
    let mut node_curl = lab.spawn_on_node(node_curl).unwrap();
    let node_pid = node_curl.id();
    assert!(node_curl.wait().unwrap().success());

    let output = tracer.stop(libc::SIGTERM).unwrap();
    assert!(output.status.success(), "tracer failed: {}", output.stderr);
    let records = output.records();
    // The cgroupfs-driver pod is attributed as well as the systemd one.
    assert_eq!(tcp_record(&records, client)["pod"], "default/client");
    assert_eq!(tcp_record(&records, other)["pod"], "shop/other");
    assert_eq!(records_of_pid(&records, node_pid), Vec::<&Value>::new());
    assert_eq!(
        attached.wait_gone(Duration::from_secs(5)).unwrap(),
        BpfObjects::default()
    );
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn refused_by_the_endpoint() {
    let lab = lab();
    let tracer = trace_client(&lab);
    let (pid, code) = curl(&lab, "client", &url(addr::ENDPOINT, addr::CLOSED_PORT), 5);
    assert_eq!(code, Some(7), "curl must fail to connect");
    let records = tracer.stop(libc::SIGINT).unwrap().records();
    let record = tcp_record(&records, pid);
    assert_eq!(
        record["dst"],
        format!("{}:{}", addr::ENDPOINT, addr::CLOSED_PORT)
    );
    assert_eq!(record["outcome"], "refused");
    assert_eq!(record["tcp"]["error"], "ECONNREFUSED");
    assert_eq!(record["tcp"]["closed_by"], "kernel");
    assert_eq!(record["tcp"]["syn_retransmits"], 0);
    // A reset: the endpoint's, unless a firewall on the path forged it.
    assert_verdict(record, "endpoint", "refused", true);
    // The SYN's source survives the socket releasing its port.
    assert_source_is(record, lab.pod("client").ip);
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn an_established_handshake_counts_the_syns_it_retransmitted() {
    let lab = lab();
    let (dst, port) = (addr::ENDPOINT.to_string(), addr::HTTP_PORT.to_string());
    // The node drops the first SYN only; its retransmission (after 1 s) gets through.
    lab.run_on_node(
        "iptables",
        &[
            "-I",
            "FORWARD",
            "-p",
            "tcp",
            "--syn",
            "-d",
            &dst,
            "--dport",
            &port,
            "-m",
            "statistic",
            "--mode",
            "nth",
            "--every",
            "1000",
            "--packet",
            "0",
            "-j",
            "DROP",
        ],
    )
    .unwrap();
    let tracer = trace_client(&lab);
    let (pid, code) = curl(&lab, "client", &url(addr::ENDPOINT, addr::HTTP_PORT), 5);
    assert_eq!(code, Some(0));
    let records = tracer.stop(libc::SIGINT).unwrap().records();
    let record = tcp_record(&records, pid);
    assert_eq!(record["outcome"], "established", "{record}");
    assert_eq!(record["tcp"]["syn_retransmits"], 1, "{record}");
    assert!(
        record["tcp"]["handshake_ms"].as_f64().unwrap() >= 1000.0,
        "{record}"
    );
    assert_source_is(record, lab.pod("client").ip);
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn a_connect_that_fails_before_its_syn_is_reported_as_aborted() {
    let lab = lab();
    let route = format!("{}/32", addr::ENDPOINT);
    // connect() finds no route and fails at once: no SYN, no port, no destination kept.
    lab.run_in_pod_netns(
        lab.pod("client"),
        "ip",
        &["route", "add", "unreachable", &route],
    )
    .unwrap();
    let tracer = trace_client(&lab);
    let (pid, code) = curl(&lab, "client", &url(addr::ENDPOINT, addr::HTTP_PORT), 5);
    assert_eq!(code, Some(7), "curl must fail to connect");
    let records = tracer.stop(libc::SIGINT).unwrap().records();
    let record = tcp_record(&records, pid);
    assert_eq!(record["outcome"], "aborted", "{record}");
    assert_eq!(record["tcp"]["closed_by"], "application", "{record}");
    assert!(record["src"].is_null(), "{record}");
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn a_firewall_reset_is_told_apart_from_the_endpoints_own_by_its_ttl() {
    let lab = lab();
    const FIREWALLED_PORT: u16 = 8443;
    lab.inject(Fault::Reset {
        dst: addr::ENDPOINT.into(),
        port: FIREWALLED_PORT,
    })
    .unwrap();
    let tracer = trace_client(&lab);
    // A connection that succeeds tells how far the endpoint is.
    let (ok, code) = curl(&lab, "client", &url(addr::ENDPOINT, addr::HTTP_PORT), 5);
    assert_eq!(code, Some(0));
    let (closed, code) = curl(&lab, "client", &url(addr::ENDPOINT, addr::CLOSED_PORT), 5);
    assert_eq!(code, Some(7));
    let (firewalled, code) = curl(&lab, "client", &url(addr::ENDPOINT, FIREWALLED_PORT), 5);
    assert_eq!(code, Some(7));
    let records = tracer.stop(libc::SIGINT).unwrap().records();
    // The endpoint's answers cross three routers to the pod (router 2, router 1, the
    // node); router 1's reset only the node.
    let record = tcp_record(&records, ok);
    assert_eq!(
        record["tcp"]["reply"],
        serde_json::json!({"kind": "syn-ack", "ttl": 61, "hops": 3}),
        "{record}"
    );
    let record = tcp_record(&records, closed);
    assert_eq!(
        record["tcp"]["reply"],
        serde_json::json!({"kind": "reset", "ttl": 61, "hops": 3}),
        "{record}"
    );
    assert_verdict(record, "endpoint", "refused", false);
    let record = tcp_record(&records, firewalled);
    assert_eq!(
        record["tcp"]["reply"],
        serde_json::json!({"kind": "reset", "ttl": 63, "hops": 1}),
        "{record}"
    );
    assert_verdict(record, "upstream", "reset", false);
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn timeout_when_the_upstream_drops_silently() {
    let lab = lab();
    let dst = std::net::IpAddr::V4(addr::ENDPOINT);
    lab.inject(Fault::SilentDrop {
        dst,
        port: addr::HTTP_PORT,
    })
    .unwrap();
    // curl gives up after 2 s: the first SYN retransmission happens at 1 s.
    let record = &timed_out_attempt(&lab, &url(addr::ENDPOINT, addr::HTTP_PORT), 2);
    assert_eq!(record["tcp"]["syn_retransmits"], 1);
    assert_eq!(record["tcp"]["closed_by"], "application");
    assert!(record["tcp"].get("error").is_none(), "{record}");
    assert_source_is(record, lab.pod("client").ip);
    // The SYN left the node translated (its conntrack entry says so), then vanished.
    assert_eq!(
        record["nat"]["src"].as_str().unwrap().split(':').next(),
        Some(addr::NODE_IP.to_string().as_str()),
        "{record}"
    );
    assert_verdict(record, "upstream", "silent-drop", false);
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn node_firewall_drop_is_reported_with_its_reason_and_tuple() {
    let lab = lab();
    let dst = std::net::IpAddr::V4(addr::ENDPOINT);
    lab.inject(Fault::NodeFirewallDrop {
        dst,
        port: addr::HTTP_PORT,
    })
    .unwrap();
    let record = &timed_out_attempt(&lab, &url(addr::ENDPOINT, addr::HTTP_PORT), 2);
    assert_eq!(
        record["dst"],
        format!("{}:{}", addr::ENDPOINT, addr::HTTP_PORT)
    );
    assert_source_is(record, lab.pod("client").ip);
    let drop = &record["drop"];
    assert_eq!(drop["reason"], "NETFILTER_DROP", "{record}");
    assert_eq!(drop["direction"], "original");
    // The dropped packet is the pod's own SYN, before the node's SNAT.
    assert_eq!(
        (&drop["src"], &drop["dst"]),
        (&record["src"], &record["dst"])
    );
    // The first SYN and its retransmission, both dropped in the node's FORWARD chain.
    assert_eq!(drop["count"], 2, "{record}");
    // Where depends on the iptables flavour: nf_tables or legacy xtables.
    let location = drop["location"].as_str().unwrap();
    assert!(
        ["nf_hook_slow+0x", "nft_do_chain+0x", "ipt_do_table+0x"]
            .iter()
            .any(|f| location.starts_with(f)),
        "{record}"
    );
    // Seen in the node's namespace (the tracer's own).
    assert_eq!(drop["netns"], "node", "{record}");
    assert_eq!(record["verdict"]["hop"], "node-firewall", "{record}");
    assert_eq!(record["verdict"]["reason"], "netfilter-drop", "{record}");
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn a_drop_in_the_pods_own_namespace_is_matched_by_its_socket() {
    let lab = lab();
    let client = lab.pod("client");
    let (dst, port) = (addr::ENDPOINT.to_string(), addr::HTTP_PORT.to_string());
    // The pod's own OUTPUT rule drops the SYN before any cgroup hook sees a packet.
    lab.run_in_pod_netns(
        client,
        "iptables",
        &[
            "-A", "OUTPUT", "-p", "tcp", "-d", &dst, "--dport", &port, "-j", "DROP",
        ],
    )
    .unwrap();
    let record = &timed_out_attempt(&lab, &url(addr::ENDPOINT, addr::HTTP_PORT), 2);
    let drop = &record["drop"];
    assert_eq!(drop["reason"], "NETFILTER_DROP", "{record}");
    assert_eq!(drop["netns"], "pod:default/client", "{record}");
    assert_eq!(
        drop["src"].as_str().unwrap().split(':').next(),
        Some(client.ip.to_string().as_str()),
        "{record}"
    );
    assert_verdict(record, "node-firewall", "netfilter-drop", false);
    assert!(
        record["verdict"]["evidence"][0]
            .as_str()
            .unwrap()
            .ends_with("in the network namespace of pod default/client"),
        "{record}"
    );
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn unreachable_when_the_upstream_rejects_with_admin_prohibited() {
    let lab = lab();
    for dst in [
        std::net::IpAddr::V4(addr::ENDPOINT),
        std::net::IpAddr::V6(addr::ENDPOINT6),
    ] {
        lab.inject(Fault::AdminProhibited {
            dst,
            port: addr::HTTP_PORT,
        })
        .unwrap();
    }
    let tracer = trace_client(&lab);
    let (v4, code) = curl(&lab, "client", &url(addr::ENDPOINT, addr::HTTP_PORT), 5);
    assert_eq!(code, Some(7));
    let (v6, code) = curl(
        &lab,
        "client",
        &url(format!("[{}]", addr::ENDPOINT6), addr::HTTP_PORT),
        5,
    );
    assert_eq!(code, Some(7));
    let records = tracer.stop(libc::SIGINT).unwrap().records();
    let expected = [
        (v4, "icmp", 3, 13, addr::UPSTREAM_NODE_SIDE.to_string()),
        (v6, "icmpv6", 1, 1, addr::UPSTREAM_NODE_SIDE6.to_string()),
    ];
    for (pid, protocol, icmp_type, code, from) in expected {
        let record = tcp_record(&records, pid);
        assert_eq!(record["outcome"], "unreachable", "{record}");
        // The router's answer, de-NATed by the node, reached the pod's socket.
        assert_eq!(
            record["icmp"],
            serde_json::json!({"protocol": protocol, "type": icmp_type, "code": code,
                               "meaning": "admin-prohibited", "from": from}),
            "{record}"
        );
        assert_source_is(
            record,
            if protocol == "icmp" {
                lab.pod("client").ip.to_string()
            } else {
                format!("[{}]", lab.pod("client").ipv6)
            },
        );
        assert_verdict(record, "upstream", "icmp-admin-prohibited", false);
    }
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn address_selection_probes_are_not_attempts() {
    let lab = lab();
    let tracer = trace_client(&lab);
    // A name with an A and an AAAA address: getaddrinfo connects a UDP socket to each to
    // sort them (RFC 6724) and sends nothing on them.
    let (pid, code) = curl(
        &lab,
        "client",
        &format!("http://{}/", addr::ENDPOINT_NAME),
        5,
    );
    assert_eq!(code, Some(0));
    let output = tracer.stop(libc::SIGINT).unwrap();
    let records = output.records();
    let mine = records_of_pid(&records, pid);
    assert!(
        !mine
            .iter()
            .any(|r| r["protocol"] == "udp" && r["dst"].as_str().unwrap().ends_with(":80")),
        "{mine:#?}"
    );
    let probes: u64 = output
        .stderr
        .split("; ")
        .find_map(|part| part.strip_suffix(" UDP address probes skipped"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{}", output.stderr));
    assert!(probes >= 2, "{}", output.stderr);
    // The lookup itself, and one of the two families connecting (happy eyeballs).
    assert!(
        mine.iter().any(|r| r["dns"]["name"] == addr::ENDPOINT_NAME),
        "{mine:#?}"
    );
    assert!(
        mine.iter().any(|r| r["protocol"] == "tcp"
            && r["outcome"] == "established"
            && r["dst_name"] == addr::ENDPOINT_NAME),
        "{mine:#?}"
    );
}

/// Parses "N connects and first sends traced in the kernel, M received, L lost" from the
/// summary.
fn connect_counts(stderr: &str) -> (u64, u64, u64) {
    let line = stderr
        .lines()
        .find(|l| l.contains("connects and first sends traced in the kernel"))
        .unwrap_or_else(|| panic!("no summary in: {stderr}"));
    let numbers: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    (numbers[0], numbers[1], numbers[2])
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn other_pods_traffic_stops_in_the_kernel_when_tracing_one_pod() {
    let lab = lab();
    let tracer = trace_client(&lab);
    let others = 10;
    for _ in 0..others {
        let (_, code) = curl(&lab, "other", &url(addr::ENDPOINT, addr::HTTP_PORT), 5);
        assert_eq!(code, Some(0));
    }
    let (pid, _) = curl(&lab, "client", &url(addr::ENDPOINT, addr::HTTP_PORT), 5);
    let output = tracer.stop(libc::SIGINT).unwrap();
    // The other pod's connects stop at the kernel's filter: only the client's one connect
    // (curl to an IP literal) is traced and received.
    assert_eq!(
        connect_counts(&output.stderr),
        (1, 1, 0),
        "{}",
        output.stderr
    );
    assert_eq!(tcp_record(&output.records(), pid)["outcome"], "established");
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn udp_to_a_closed_port_is_refused_by_icmp_port_unreachable() {
    let lab = lab();
    let tracer = trace_client(&lab);
    let helper = egress_lab::lab_helper().unwrap();
    let helper = helper.to_str().unwrap();
    let closed = format!("{}:9999", addr::ENDPOINT);
    let (unconnected, status) = lab
        .exec_in_pod(lab.pod("client"), helper, &["udp-send", &closed])
        .unwrap();
    assert!(status.success());
    let (connected, status) = lab
        .exec_in_pod(
            lab.pod("client"),
            helper,
            &["udp-send", &closed, "--connect"],
        )
        .unwrap();
    assert!(status.success());
    let records = tracer.stop(libc::SIGINT).unwrap().records();
    for pid in [unconnected, connected] {
        let mine = records_of_pid(&records, pid);
        assert_eq!(mine.len(), 1, "{records:#?}");
        let record = mine[0];
        assert_eq!(record["protocol"], "udp");
        assert_eq!(record["dst"], closed.as_str());
        assert_eq!(record["outcome"], "refused", "{record}");
        assert_eq!(
            record["icmp"],
            serde_json::json!({"protocol": "icmp", "type": 3, "code": 3,
                               "meaning": "port-unreachable", "from": addr::ENDPOINT.to_string()})
        );
        assert_source_is(record, lab.pod("client").ip);
    }
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn each_destination_of_one_unconnected_udp_socket_is_an_attempt_of_its_own() {
    let lab = lab();
    let tracer = trace_client(&lab);
    let helper = egress_lab::lab_helper().unwrap();
    // One socket, first sends to three closed ports: each answered by port unreachable
    // (three stay within the endpoint's ICMP rate limit burst).
    let (pid, status) = lab
        .exec_in_pod(
            lab.pod("client"),
            helper.to_str().unwrap(),
            &[
                "udp-send",
                &format!("{}:9997", addr::ENDPOINT),
                "--count",
                "3",
            ],
        )
        .unwrap();
    assert!(status.success());
    let records = tracer.stop(libc::SIGINT).unwrap().records();
    let mut mine = records_of_pid(&records, pid);
    mine.sort_by_key(|r| r["dst"].as_str().unwrap_or_default().to_owned());
    let seen: Vec<(&str, &str)> = mine
        .iter()
        .map(|r| (r["dst"].as_str().unwrap(), r["outcome"].as_str().unwrap()))
        .collect();
    let dst = |port: u16| format!("{}:{port}", addr::ENDPOINT);
    assert_eq!(
        seen,
        [
            (dst(9997).as_str(), "refused"),
            (dst(9998).as_str(), "refused"),
            (dst(9999).as_str(), "refused"),
        ],
        "{records:#?}"
    );
    assert_source_is(mine[0], lab.pod("client").ip);
    assert!(mine.iter().all(|r| r["src"] == mine[0]["src"]), "{mine:#?}");
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn counts_stay_exact_when_a_tiny_ring_buffer_overflows() {
    let lab = lab();
    let tracer =
        Tracer::trace_pod(&lab, "default/client", &["--ring-buffer-size", "4096"]).unwrap();
    let helper = egress_lab::lab_helper().unwrap();
    let sends = 20_000;
    let (_, status) = lab
        .exec_in_pod(
            lab.pod("client"),
            helper.to_str().unwrap(),
            &[
                "udp-send",
                &format!("{}:10000", addr::ENDPOINT),
                "--count",
                &sends.to_string(),
            ],
        )
        .unwrap();
    assert!(status.success());
    let output = tracer.stop(libc::SIGINT).unwrap();
    let (traced, received, lost) = connect_counts(&output.stderr);
    // Every first send to a new port was counted; the ring buffer could not hold them all,
    // and what it dropped is exactly what userspace did not receive.
    assert_eq!(traced, sends, "{}", output.stderr);
    assert!(lost > 0, "{}", output.stderr);
    assert_eq!(received + lost, traced, "{}", output.stderr);
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn snat_mapping_matches_the_nodes_conntrack_table() {
    let lab = lab();
    let tracer = trace_client(&lab);
    let (pid, code) = curl(&lab, "client", &url(addr::ENDPOINT, addr::HTTP_PORT), 5);
    assert_eq!(code, Some(0));
    let output = tracer.stop(libc::SIGINT).unwrap();
    let records = output.records();
    let record = tcp_record(&records, pid);
    let src = record["src"].as_str().unwrap();
    let (_, pod_port) = src.rsplit_once(':').unwrap();
    // The node-wide table figures: this flow's entry is in it.
    let summary = output
        .stderr
        .lines()
        .find(|l| l.starts_with("egress-tracer: node conntrack "))
        .unwrap_or_else(|| panic!("{}", output.stderr));
    let entries: u64 = summary["egress-tracer: node conntrack ".len()..]
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(entries >= 1, "{summary}");
    // The node's own view: the conntrack entry of this flow, reply direction.
    let client_ip = lab.pod("client").ip.to_string();
    let table = lab
        .run_on_node(
            "conntrack",
            &[
                "-L",
                "-p",
                "tcp",
                "--orig-src",
                &client_ip,
                "--orig-port-dst",
                "80",
            ],
        )
        .unwrap();
    let entry = table
        .lines()
        .find(|line| line.contains(&format!("sport={pod_port} ")))
        .unwrap_or_else(|| panic!("no conntrack entry for {src} in:\n{table}"));
    let field = |name: &str, nth: usize| {
        entry
            .split_whitespace()
            .filter_map(|f| f.strip_prefix(name))
            .nth(nth)
            .unwrap_or_else(|| panic!("{name} #{nth} in {entry}"))
            .to_owned()
    };
    // Reply direction: from the endpoint to the translated source.
    let translated = format!("{}:{}", field("dst=", 1), field("dport=", 1));
    assert_eq!(
        record["nat"],
        serde_json::json!({"src": translated}),
        "{record}\n{entry}"
    );
    assert_eq!(field("dst=", 1), addr::NODE_IP.to_string());
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn works_when_started_with_ip_netns_exec() {
    let lab = lab();
    let state = lab.cluster_state();
    // `ip netns exec` remounts /sys privately: the cgroup mounts are not visible there.
    let tracer = Tracer::start_with_ip_netns_exec(
        &lab,
        &[
            "trace",
            "--cluster-state",
            state.to_str().unwrap(),
            "--pod",
            "default/client",
            "-o",
            "json",
        ],
    )
    .unwrap();
    let (pid, code) = curl(&lab, "client", &url(addr::ENDPOINT, addr::HTTP_PORT), 5);
    assert_eq!(code, Some(0));
    let output = tracer.stop(libc::SIGINT).unwrap();
    assert!(output.status.success(), "{}", output.stderr);
    let records = output.records();
    let record = tcp_record(&records, pid);
    assert_eq!(
        (record["pod"].as_str(), record["outcome"].as_str()),
        (Some("default/client"), Some("established"))
    );
}

/// A lab with the client and a pod `shop/web` serving HTTP on 8080 behind the ClusterIP
/// Service `shop/web` (10.0.1.10:80); returns the lab and the Service's address.
fn lab_with_service() -> (Lab, std::net::Ipv4Addr) {
    let lab = Lab::start(&[
        PodSpec::new("default", "client", CgroupDriver::Systemd),
        PodSpec::new("shop", "web", CgroupDriver::Cgroupfs).serving_http(8080),
    ])
    .unwrap();
    let cluster_ip = std::net::Ipv4Addr::new(10, 0, 1, 10);
    lab.add_cluster_ip_service("shop", "web", cluster_ip, 80, lab.pod("web"), 8080)
        .unwrap();
    (lab, cluster_ip)
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn cluster_ip_service_is_attributed_to_its_service_and_backend_pod() {
    let (lab, cluster_ip) = lab_with_service();
    let tracer = trace_client(&lab);
    let (pid, code) = curl(&lab, "client", &url(cluster_ip, 80), 5);
    assert_eq!(code, Some(0), "the Service must answer");
    let records = tracer.stop(libc::SIGINT).unwrap().records();
    let record = tcp_record(&records, pid);
    assert_eq!(record["dst"], "10.0.1.10:80");
    assert_eq!(record["outcome"], "established");
    let backend = format!("{}:8080", lab.pod("web").ip);
    // kube-proxy's DNAT, read from the flow's conntrack entry; no SNAT inside the cluster.
    assert_eq!(
        record["nat"],
        serde_json::json!({"dst": backend}),
        "{record}"
    );
    assert_eq!(
        record["service"],
        serde_json::json!({"name": "shop/web", "backend": backend, "backend_pod": "shop/web"})
    );
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn a_drop_after_a_services_translation_is_attributed_to_its_flow() {
    let (lab, cluster_ip) = lab_with_service();
    // The node drops what goes to the backend: after kube-proxy's DNAT, so the dropped
    // packet names the backend, not the Service address the pod connected to.
    lab.inject(Fault::NodeFirewallDrop {
        dst: lab.pod("web").ip.into(),
        port: 8080,
    })
    .unwrap();
    let record = &timed_out_attempt(&lab, &url(cluster_ip, 80), 3);
    assert_eq!(record["dst"], "10.0.1.10:80", "{record}");
    let drop = &record["drop"];
    assert_eq!(drop["reason"], "NETFILTER_DROP", "{record}");
    assert_eq!(drop["direction"], "original", "{record}");
    assert_eq!(
        drop["dst"],
        format!("{}:8080", lab.pod("web").ip),
        "{record}"
    );
    assert_verdict(record, "node-firewall", "netfilter-drop", false);
}

/// Idle TCP connections held by a helper process, which is ended (by its PID) on drop.
struct HeldConnections(std::process::Child);

impl Drop for HeldConnections {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Holds `count` idle TCP connections from `pod` to the endpoint's HTTP port, and waits
/// until the node's conntrack table has them.
fn hold_connections(lab: &Lab, pod: &str, count: usize) -> HeldConnections {
    let helper = egress_lab::lab_helper().unwrap();
    let target = format!("{}:{}", addr::ENDPOINT, addr::HTTP_PORT);
    let count_text = count.to_string();
    let held = HeldConnections(
        lab.spawn_in_pod(
            lab.pod(pod),
            helper.to_str().unwrap(),
            &[
                "hold-tcp",
                &target,
                "--count",
                &count_text,
                "--seconds",
                "30",
            ],
        )
        .unwrap(),
    );
    let pod_ip = lab.pod(pod).ip.to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let table = lab
            .run_on_node(
                "conntrack",
                &[
                    "-L",
                    "-p",
                    "tcp",
                    "--orig-src",
                    &pod_ip,
                    "--state",
                    "ESTABLISHED",
                ],
            )
            .unwrap_or_default();
        if table.lines().filter(|l| l.contains("dport=80 ")).count() >= count {
            return held;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the held connections never showed up in conntrack:\n{table}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn conntrack_insert_failure_is_attributed_to_its_flow() {
    let lab = lab();
    // The node NATs flows to the endpoint to one source port: a second concurrent flow
    // gets the same translated tuple, and conntrack cannot insert its entry.
    lab.inject(Fault::SnatSinglePort {
        dst: addr::ENDPOINT.into(),
        port: addr::HTTP_PORT,
    })
    .unwrap();
    let tracer = trace_client(&lab);
    let holder = hold_connections(&lab, "client", 1);
    let (pid, code) = curl(&lab, "client", &url(addr::ENDPOINT, addr::HTTP_PORT), 3);
    assert_eq!(code, Some(28), "curl should time out");
    let output = tracer.stop(libc::SIGINT).unwrap();
    drop(holder);
    let records = output.records();
    let record = tcp_record(&records, pid);
    assert_eq!(record["outcome"], "timeout", "{record}");
    let drop = &record["drop"];
    assert_eq!(drop["reason"], "NETFILTER_DROP", "{record}");
    assert_eq!(drop["direction"], "original", "{record}");
    assert!(
        drop["location"]
            .as_str()
            .unwrap()
            .starts_with("nf_hook_slow+"),
        "{record}"
    );
    assert_eq!(
        drop["conntrack"],
        serde_json::json!({"state": "entry", "confirmed": false, "source_nat_done": true}),
        "{record}"
    );
    // The dropped packet was already translated to the single port.
    assert_eq!(
        drop["src"],
        format!("{}:{}", addr::NODE_IP, egress_lab::SINGLE_SNAT_PORT),
        "{record}"
    );
    let verdict = &record["verdict"];
    assert_eq!(verdict["hop"], "conntrack", "{record}");
    assert_eq!(verdict["reason"], "insert-failed", "{record}");
    // The node's insert_failed counter corroborates it, so it is not just likely.
    assert_eq!(verdict["likely"], false, "{record}");
    let evidence = verdict["evidence"].to_string();
    assert!(evidence.contains("insert_failed counter rose"), "{record}");
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn a_dropped_answer_is_attributed_to_its_flow_as_a_reply() {
    let lab = lab();
    // The node drops the endpoint's SYN-ACKs on their way back to the pod: a packet that
    // carries no socket, addressed to the pod once the node undid its NAT.
    lab.inject(Fault::NodeFirewallDropsReplies {
        dst: addr::ENDPOINT.into(),
        port: addr::HTTP_PORT,
    })
    .unwrap();
    let record = &timed_out_attempt(&lab, &url(addr::ENDPOINT, addr::HTTP_PORT), 3);
    let drop = &record["drop"];
    assert_eq!(drop["reason"], "NETFILTER_DROP", "{record}");
    assert_eq!(drop["direction"], "reply", "{record}");
    assert_eq!(
        drop["src"],
        format!("{}:{}", addr::ENDPOINT, addr::HTTP_PORT),
        "{record}"
    );
    let client_ip = lab.pod("client").ip.to_string();
    assert_eq!(
        drop["dst"].as_str().unwrap().split(':').next(),
        Some(client_ip.as_str()),
        "{record}"
    );
    assert_eq!(
        record["src"], drop["dst"],
        "the drop is of this flow: {record}"
    );
    assert_verdict(record, "node-firewall", "netfilter-drop", false);
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn snat_exhaustion_is_suspected_when_syns_time_out_near_the_budget() {
    let lab = lab();
    let tracer = Tracer::trace_pod(&lab, "default/client", &["--snat-port-budget", "2"]).unwrap();
    // Two flows hold the node's two budgeted ports; then new SYNs vanish beyond the node,
    // as when a load balancer has no SNAT port left for them.
    let holder = hold_connections(&lab, "client", 2);
    lab.inject(Fault::SilentDrop {
        dst: addr::ENDPOINT.into(),
        port: addr::HTTP_PORT,
    })
    .unwrap();
    let (pid, code) = curl(&lab, "client", &url(addr::ENDPOINT, addr::HTTP_PORT), 4);
    assert_eq!(code, Some(28), "curl should time out");
    let output = tracer.stop(libc::SIGINT).unwrap();
    drop(holder);
    let records = output.records();
    let record = tcp_record(&records, pid);
    assert_eq!(record["outcome"], "timeout", "{record}");
    // The two held flows and this one, all translated to the node's address, towards
    // the endpoint (the conntrack table is dumped every 2 s, during curl's 4 s).
    assert_eq!(
        record["snat"],
        serde_json::json!({"ports_in_use": 3, "budget": 2, "port_range": record["snat"]["port_range"]}),
        "{record}"
    );
    let verdict = &record["verdict"];
    assert_eq!(verdict["hop"], "upstream", "{record}");
    assert_eq!(verdict["reason"], "snat-exhaustion-suspected", "{record}");
    assert!(
        verdict["evidence"].to_string().contains(&format!(
            "3 TCP flows translated to {} towards {}:{}",
            addr::NODE_IP,
            addr::ENDPOINT,
            addr::HTTP_PORT
        )),
        "{record}"
    );
}
