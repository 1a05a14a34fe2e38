//! `egress-tracer agent` in the node lab: exact metrics while traffic plays, the flows
//! API and its follow stream, SIGTERM, and a ring buffer too small for the traffic.
//! Needs root.

use std::time::Duration;

use egress_lab::{
    CgroupDriver, Lab, PodSpec, addresses as addr,
    agent::{self, Follow},
    fake_api::FakeApiServer,
    tracer::{BpfObjects, Tracer},
};
use serde_json::{Value, json};

const METRICS_WAIT: Duration = Duration::from_secs(15);

fn start_agent(lab: &Lab, extra: &[&str]) -> Tracer {
    let state = lab.cluster_state();
    let node = lab.node_netns();
    let listen = agent::listen_address();
    let mut args = vec![
        "agent",
        "--cluster-state",
        state.to_str().unwrap(),
        "--node-name",
        &node,
        "--listen",
        &listen,
    ];
    args.extend_from_slice(extra);
    let tracer = Tracer::start(lab, &args).unwrap();
    assert_eq!(agent::get(lab, "/readyz").unwrap(), (200, "ready".into()));
    tracer
}

fn curl(lab: &Lab, pod: &str, url: &str) -> Option<i32> {
    let (_, status) = lab
        .exec_in_pod(
            lab.pod(pod),
            "curl",
            &["-s", "-4", "-m", "2", "-o", "/dev/null", url],
        )
        .unwrap();
    status.code()
}

fn series(name: &str, labels: &[(&str, &str)]) -> String {
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("{name}{{{}}}", labels.join(","))
}

fn flows(lab: &Lab, query: &str) -> Vec<Value> {
    let (status, body) = agent::get(lab, &format!("/api/v1/flows?{query}")).unwrap();
    assert_eq!(status, 200, "{body}");
    body.lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn agent_counts_exactly_serves_flows_and_detaches_on_sigterm() {
    let lab = Lab::start(&[
        PodSpec::new("default", "client", CgroupDriver::Systemd),
        PodSpec::new("shop", "other", CgroupDriver::Cgroupfs),
    ])
    .unwrap();
    // shop/other may not leave the cluster: its connection to the endpoint is dropped.
    lab.apply_network_policies(&[json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "no-egress", "namespace": "shop"},
        "spec": {"podSelector": {}, "policyTypes": ["Egress"]},
    })])
    .unwrap();
    let agent = start_agent(&lab, &[]);
    let attached = BpfObjects::owned_by(agent.pid()).unwrap();
    assert!(!attached.links.is_empty(), "{attached:?}");
    let mut follow = Follow::open(&lab, "/api/v1/flows?namespace=default&follow=true").unwrap();

    let endpoint = format!("http://{}:{}/", addr::ENDPOINT, addr::HTTP_PORT);
    let closed = format!("http://{}:{}/", addr::ENDPOINT, addr::CLOSED_PORT);
    for _ in 0..3 {
        assert_eq!(curl(&lab, "client", &endpoint), Some(0));
    }
    for _ in 0..2 {
        assert_eq!(curl(&lab, "client", &closed), Some(7));
    }
    // An absolute name: exactly one A query, answered NXDOMAIN by the cluster DNS.
    let missing = format!("http://{}./", addr::MISSING_NAME);
    assert_eq!(curl(&lab, "client", &missing), Some(6));
    assert_eq!(curl(&lab, "other", &endpoint), Some(28));

    let client = [("namespace", "default"), ("pod", "client")];
    let connections = |pod: &[(&str, &str)], outcome: &str| {
        let mut labels = pod.to_vec();
        labels.extend([("outcome", outcome), ("dst_class", "internet")]);
        series("egress_connections_total", &labels)
    };
    let wait =
        |series: &str, expected: f64| agent::wait_for_metric(&lab, series, expected, METRICS_WAIT);
    assert_eq!(wait(&connections(&client, "established"), 3.0), 3.0);
    assert_eq!(wait(&connections(&client, "refused"), 2.0), 2.0);
    let other = [("namespace", "shop"), ("pod", "other")];
    assert_eq!(wait(&connections(&other, "timeout"), 1.0), 1.0);
    let nxdomain = series(
        "egress_dns_queries_total",
        &[
            ("namespace", "default"),
            ("pod", "client"),
            ("rcode", "NXDOMAIN"),
            ("qtype", "A"),
            ("server", "cluster"),
        ],
    );
    assert_eq!(wait(&nxdomain, 1.0), 1.0);
    let verdicts = |pod: &[(&str, &str)], hop: &str, reason: &str| {
        let mut labels = pod.to_vec();
        labels.extend([("hop", hop), ("reason", reason)]);
        series("egress_verdicts_total", &labels)
    };
    assert_eq!(wait(&verdicts(&client, "endpoint", "refused"), 2.0), 2.0);
    assert_eq!(wait(&verdicts(&client, "dns", "nxdomain"), 1.0), 1.0);
    assert_eq!(
        wait(&verdicts(&other, "network-policy", "denied"), 1.0),
        1.0
    );

    let metrics = agent::metrics(&lab).unwrap();
    // The drops counted are the drops on the flow's record.
    let denied = flows(&lab, "pod=shop/other&hop=network-policy");
    assert_eq!(denied.len(), 1, "{denied:#?}");
    let dropped = denied[0]["drop"]["count"].as_f64().unwrap();
    assert!(dropped >= 1.0, "{:#}", denied[0]);
    let drops = series(
        "egress_drops_total",
        &[
            ("namespace", "shop"),
            ("pod", "other"),
            ("hop", "network-policy"),
            ("reason", "denied"),
        ],
    );
    assert_eq!(metrics.get(&drops), Some(&dropped), "{metrics:#?}");
    let syn_retransmits = series("egress_tcp_syn_retransmits_total", &other);
    assert!(
        metrics.get(&syn_retransmits).is_some_and(|n| *n >= 1.0),
        "{metrics:#?}"
    );
    assert_eq!(
        metrics.get(&series(
            "egress_connect_duration_seconds_count",
            &[
                ("namespace", "default"),
                ("pod", "client"),
                ("dst_class", "internet")
            ]
        )),
        Some(&3.0)
    );
    assert_eq!(
        metrics.get(&series(
            "egress_events_lost_total",
            &[("program", "connect")]
        )),
        Some(&0.0)
    );
    assert!(metrics[&series("egress_events_total", &[("kind", "connect")])] >= 7.0);
    assert_eq!(metrics.get("egress_cluster_cache_stale"), Some(&0.0));
    assert!(
        metrics
            .keys()
            .any(|k| k.starts_with("egress_tracer_build_info{version=\"")),
        "{metrics:#?}"
    );

    // Filters.
    let refused = flows(&lab, "namespace=default&pod=client&hop=endpoint");
    assert_eq!(refused.len(), 2, "{refused:#?}");
    assert!(refused.iter().all(|r| r["outcome"] == "refused"
        && r["dst"] == format!("{}:{}", addr::ENDPOINT, addr::CLOSED_PORT)));
    let lookups = flows(&lab, "pod=default/client&hop=dns");
    assert_eq!(lookups.len(), 1, "{lookups:#?}");
    assert_eq!(lookups[0]["dns"]["name"], format!("{}", addr::MISSING_NAME));
    assert!(flows(&lab, "namespace=kube-system").is_empty());
    assert!(flows(&lab, "since=2000-01-01T00:00:00Z").len() >= 8);
    for (query, reason) in [
        ("hop=dnss", "is not one of dns"),
        ("since=yesterday", "neither a duration"),
        ("follow=maybe", "true or false"),
        ("pod=Web", "not a Kubernetes name"),
        ("limit=5", "unknown parameter"),
    ] {
        let (status, body) = agent::get(&lab, &format!("/api/v1/flows?{query}")).unwrap();
        assert_eq!(status, 400, "{query}: {body}");
        assert!(body.contains(reason), "{query}: {body}");
    }

    // The stream saw default's records as they came, and none of shop's.
    let streamed = follow.read_until(Duration::from_secs(5), |records| records.len() >= 6);
    assert_eq!(streamed.len(), 6, "{streamed:#?}");
    assert!(
        streamed
            .iter()
            .all(|r| r["pod"].as_str().unwrap().starts_with("default/")),
        "{streamed:#?}"
    );

    // trace and diagnose through the agent, as from a laptop.
    let url = format!("http://{}", agent::listen_address());
    let remote_trace = Tracer::start_with_ip_netns_exec(
        &lab,
        &[
            "trace",
            "--agent",
            &url,
            "--pod",
            "default/client",
            "-o",
            "json",
            "--duration",
            "8s",
        ],
    )
    .unwrap();
    assert_eq!(curl(&lab, "client", &closed), Some(7));
    let traced = remote_trace.finish().unwrap().records();
    assert_eq!(traced.len(), 1, "{traced:#?}");
    assert_eq!(traced[0]["pod"], "default/client");
    assert_eq!(traced[0]["outcome"], "refused");
    assert_eq!(traced[0]["verdict"]["hop"], "endpoint");
    let diagnosis = agent::run_cli_on_node(
        &lab,
        &[
            "diagnose",
            "--agent",
            &url,
            "--pod",
            "default/client",
            &closed,
            "-o",
            "json",
        ],
    )
    .unwrap();
    assert_eq!(diagnosis.0.code(), Some(1), "{diagnosis:?}");
    let report: Value = serde_json::from_str(&diagnosis.1).unwrap();
    assert_eq!(report["pod"], "default/client");
    assert_eq!(report["verdict"]["hop"], "endpoint", "{report:#}");
    assert_eq!(report["verdict"]["reason"], "refused", "{report:#}");
    let bad = agent::run_cli_on_node(
        &lab,
        &[
            "diagnose",
            "--agent",
            &url,
            "--pod",
            "default/nobody",
            &closed,
        ],
    )
    .unwrap();
    assert_eq!(bad.0.code(), Some(2), "{bad:?}");
    assert!(bad.2.contains("nobody"), "{bad:?}");

    let output = agent.stop(libc::SIGTERM).unwrap();
    assert!(output.status.success());
    assert!(
        follow.ends_within(Duration::from_secs(5)),
        "the follow stream stayed open"
    );
    assert_eq!(
        attached.wait_gone(Duration::from_secs(5)).unwrap(),
        BpfObjects::default()
    );
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn a_tiny_ring_buffer_loses_events_but_connection_counts_stay_exact() {
    let lab = Lab::start(&[PodSpec::new("default", "client", CgroupDriver::Systemd)]).unwrap();
    let agent = start_agent(&lab, &["--ring-buffer-size", "4096"]);
    let endpoint = format!("{}:{}", addr::ENDPOINT, addr::HTTP_PORT);
    let helper = egress_lab::lab_helper().unwrap();
    let (_, status) = lab
        .exec_in_pod(
            lab.pod("client"),
            helper.to_str().unwrap(),
            &["connect-burst", &endpoint, "--count", "500"],
        )
        .unwrap();
    assert!(
        status.success(),
        "the burst's connections did not all succeed"
    );

    let established = series(
        "egress_connections_total",
        &[
            ("namespace", "default"),
            ("pod", "client"),
            ("outcome", "established"),
            ("dst_class", "internet"),
        ],
    );
    assert_eq!(
        agent::wait_for_metric(&lab, &established, 500.0, METRICS_WAIT),
        500.0
    );
    let metrics = agent::metrics(&lab).unwrap();
    let lost: f64 = metrics
        .iter()
        .filter(|(k, _)| k.starts_with("egress_events_lost_total{"))
        .map(|(_, v)| v)
        .sum();
    assert!(
        lost > 0.0,
        "no events lost with a 4 KiB ring buffer: {metrics:#?}"
    );
    assert_eq!(
        metrics.get(&series(
            "egress_events_lost_total",
            &[("program", "handshake_counts")]
        )),
        Some(&0.0)
    );
    // The kernel counted every connect, received or not.
    assert!(metrics[&series("egress_events_total", &[("kind", "connect")])] >= 500.0);
    let output = agent.stop(libc::SIGTERM).unwrap();
    assert!(output.status.success());
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn readiness_waits_for_the_kubernetes_api_and_staleness_is_a_metric() {
    let lab = Lab::start(&[PodSpec::new("default", "client", CgroupDriver::Systemd)]).unwrap();
    // An API server address in the node's namespace where nothing listens yet.
    let api_address: std::net::SocketAddr = "127.0.0.1:16443".parse().unwrap();
    let kubeconfig = lab.cluster_state().with_file_name("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: lab\n\
             clusters: [{{name: lab, cluster: {{server: 'http://{api_address}'}}}}]\n\
             users: [{{name: lab, user: {{}}}}]\n\
             contexts: [{{name: lab, context: {{cluster: lab, user: lab}}}}]\n"
        ),
    )
    .unwrap();
    let node = lab.node_netns();
    let listen = agent::listen_address();
    let agent = Tracer::start_with_env(
        &lab,
        &["agent", "--node-name", &node, "--listen", &listen],
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    )
    .unwrap();
    let (status, body) = agent::get(&lab, "/readyz").unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("waiting for the Kubernetes API"), "{body}");
    assert_eq!(agent::get(&lab, "/healthz").unwrap(), (200, "ok".into()));
    assert_eq!(
        agent::metrics(&lab)
            .unwrap()
            .get("egress_cluster_cache_stale"),
        Some(&1.0)
    );

    let mut api = FakeApiServer::start_in_netns(&node, api_address).unwrap();
    let ready = wait_until(Duration::from_secs(20), || {
        agent::get(&lab, "/readyz").is_ok_and(|(status, _)| status == 200)
    });
    assert!(ready, "{:?}", agent::get(&lab, "/readyz"));
    assert_eq!(
        agent::wait_for_metric(&lab, "egress_cluster_cache_stale", 0.0, METRICS_WAIT),
        0.0
    );
    // The API goes away: still ready (the programs keep tracing), but stale.
    api.outage();
    assert_eq!(
        agent::wait_for_metric(
            &lab,
            "egress_cluster_cache_stale",
            1.0,
            Duration::from_secs(60)
        ),
        1.0
    );
    assert_eq!(agent::get(&lab, "/readyz").unwrap().0, 200);
    assert!(agent.stop(libc::SIGTERM).unwrap().status.success());
}

fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    check()
}
