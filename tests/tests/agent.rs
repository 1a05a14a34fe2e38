//! `egress-tracer agent` in the node lab: exact metrics while traffic plays, the flows
//! API and its follow stream, SIGTERM, a ring buffer too small for the traffic, and DNS
//! summaries.
//! Needs root.

use std::{process::Command, time::Duration};

use egress_lab::{
    CgroupDriver, Lab, PodSpec, addresses as addr,
    agent::{self, Follow},
    fake_api::{FakeApiServer, Script},
    tracer::{BpfObjects, Tracer},
};
use serde_json::{Value, json};

const METRICS_WAIT: Duration = Duration::from_secs(15);

fn start_agent(lab: &Lab, extra: &[&str]) -> Tracer {
    start_agent_on(lab, &agent::listen_address(), extra)
}

/// An agent listening on `listen` (it must include the loopback address the tests ask).
fn start_agent_on(lab: &Lab, listen: &str, extra: &[&str]) -> Tracer {
    let state = lab.cluster_state();
    let node = lab.node_netns();
    let mut args = vec![
        "agent",
        "--cluster-state",
        state.to_str().unwrap(),
        "--node-name",
        &node,
        "--listen",
        listen,
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

/// default/client's established connections to the (internet) endpoint.
fn client_established() -> String {
    series(
        "egress_connections_total",
        &[
            ("namespace", "default"),
            ("pod", "client"),
            ("outcome", "established"),
            ("dst_class", "internet"),
        ],
    )
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
    let everything = flows(&lab, "since=2000-01-01T00:00:00Z");
    // The client's three connects, two refusals and lookup, and the other pod's timeout
    // (and other labs' pods' flows, when they run at the same time).
    assert!(everything.len() >= 7, "{everything:#?}");
    // The cluster DNS answered every lookup from port 53: answers are not attempts.
    assert!(
        !everything.iter().any(|r| r["process"]["comm"] == "dnsmasq"
            && !r["dst"].as_str().is_some_and(|dst| dst.ends_with(":53"))),
        "{everything:#?}"
    );
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
    // --agent auto: the pod's node and that node's agent from the API, the agent reached
    // through the API server's pods/proxy.
    let node = lab.node_netns();
    let agent_pod = "egress-tracer-x7k2p";
    let mut script = Script::default();
    script.objects.insert(
        "/api/v1/namespaces/default/pods/client".into(),
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "client", "namespace": "default"},
               "spec": {"nodeName": node, "containers": [{"name": "c"}]}}),
    );
    script.objects.insert(
        "/api/v1/namespaces/egress-tracer/pods".into(),
        json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "1"},
               "items": [{"apiVersion": "v1", "kind": "Pod",
                          "metadata": {"name": agent_pod, "namespace": "egress-tracer"},
                          "spec": {"nodeName": node, "containers": [{"name": "agent"}]},
                          "status": {"phase": "Running"}}]}),
    );
    script.proxies.push((
        format!("/api/v1/namespaces/egress-tracer/pods/{agent_pod}:9090/proxy"),
        agent::listen_address().parse().unwrap(),
    ));
    let api_address = "127.0.0.1:16444".parse().unwrap();
    let api = FakeApiServer::start_in_netns(&node, api_address, script).unwrap();
    let kubeconfig = write_kubeconfig(&lab, api_address);
    let (status, stdout, stderr) = agent::run_cli_on_node_with_env(
        &lab,
        &[
            "diagnose",
            "--agent",
            "auto",
            "--pod",
            "default/client",
            &closed,
            "-o",
            "json",
        ],
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    )
    .unwrap();
    assert_eq!(status.code(), Some(1), "{stdout}{stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["verdict"]["reason"], "refused", "{report:#}");
    let requests = api.requests();
    let listed = requests
        .iter()
        .find(|r| r.starts_with("/api/v1/namespaces/egress-tracer/pods?"))
        .unwrap_or_else(|| panic!("{requests:#?}"));
    assert!(
        listed.contains(&format!("spec.nodeName%3D{node}")),
        "{listed}"
    );
    assert!(
        listed.contains("app.kubernetes.io%2Fname%3Degress-tracer"),
        "{listed}"
    );
    assert!(
        requests.iter().any(|r| r.starts_with(&format!(
            "/api/v1/namespaces/egress-tracer/pods/{agent_pod}:9090/proxy/api/v1/diagnose?"
        ))),
        "{requests:#?}"
    );
    drop(api);

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
    // A target whose CR/LF would split the probe's request line is refused before
    // anything runs.
    let (status, body) = agent::get(
        &lab,
        "/api/v1/diagnose?pod=default/client&target=http://a.test/x%0d%0aHost:%20b",
    )
    .unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("the path has a control character"), "{body}");

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
    let established = lab
        .connect_burst(lab.pod("client"), &endpoint, 500)
        .unwrap();
    assert!(established, "the burst's connections did not all succeed");

    let established = client_established();
    let counted = agent::wait_for_metric(&lab, &established, 500.0, METRICS_WAIT);
    let metrics = agent::metrics(&lab).unwrap();
    // Exact, but for state changes the kernel itself skipped (a tracing program
    // interrupted by itself on one CPU), which are counted.
    let skipped = metrics[&series("egress_events_skipped_total", &[("program", "sock_state")])];
    assert!(
        counted <= 500.0 && 500.0 - counted <= skipped,
        "{counted} established of 500, {skipped} state changes skipped"
    );
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
    let kubeconfig = write_kubeconfig(&lab, api_address);
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

    let mut api = FakeApiServer::start_in_netns(&node, api_address, Script::default()).unwrap();
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

/// A kubeconfig for an API server at `address` (plain HTTP, no credentials).
fn write_kubeconfig(lab: &Lab, address: std::net::SocketAddr) -> std::path::PathBuf {
    let kubeconfig = lab
        .cluster_state()
        .with_file_name(format!("kubeconfig-{}", address.port()));
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: lab\n\
             clusters: [{{name: lab, cluster: {{server: 'http://{address}'}}}}]\n\
             users: [{{name: lab, user: {{}}}}]\n\
             contexts: [{{name: lab, context: {{cluster: lab, user: lab}}}}]\n"
        ),
    )
    .unwrap();
    kubeconfig
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

/// The capabilities the DaemonSet grants (deploy/kubernetes/daemonset.yaml), as capsh
/// names (`cap_bpf`).
fn daemonset_capabilities() -> Vec<String> {
    let manifest = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/kubernetes/daemonset.yaml"),
    )
    .unwrap();
    let mut lines = manifest
        .lines()
        .skip_while(|line| line.trim() != "add:")
        .skip(1);
    let mut capabilities = Vec::new();
    while let Some(item) = lines.next().and_then(|line| line.trim().strip_prefix("- ")) {
        capabilities.push(format!("cap_{}", item.to_ascii_lowercase()));
    }
    assert!(
        !capabilities.is_empty(),
        "no capabilities in daemonset.yaml"
    );
    capabilities
}

/// `unshare --cgroup capsh --drop=… -- -c 'exec "$0" "$@"'`: the tracer then runs as a
/// root process whose bounding set, hence its every set, is exactly `keep`, in a cgroup
/// namespace of its own (as in a container).
fn with_exactly(keep: &[String]) -> Vec<String> {
    let current = std::fs::read_to_string("/proc/self/status").unwrap();
    let bounding = current
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .map(|hex| u64::from_str_radix(hex.trim(), 16).unwrap())
        .unwrap();
    let names = egress_lab::process::run("capsh", &[&format!("--decode={bounding:x}")]).unwrap();
    let all = names.trim().rsplit_once('=').unwrap().1;
    let drop: Vec<&str> = all
        .split(',')
        .filter(|cap| !keep.iter().any(|k| k == cap))
        .collect();
    [
        "unshare",
        "--cgroup",
        "capsh",
        &format!("--drop={}", drop.join(",")),
        "--",
        "-c",
        "exec \"$0\" \"$@\"",
    ]
    .map(str::to_owned)
    .to_vec()
}

fn effective_capabilities(pid: u32) -> Vec<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim();
    let names = egress_lab::process::run("capsh", &[&format!("--decode={hex}")]).unwrap();
    let mut caps: Vec<String> = names
        .trim()
        .rsplit_once('=')
        .unwrap()
        .1
        .split(',')
        .map(str::to_owned)
        .collect();
    caps.sort();
    caps
}

fn diagnose_through_agent(lab: &Lab, target: &str) -> (Option<i32>, String) {
    let url = format!("http://{}", agent::listen_address());
    let (status, stdout, stderr) = agent::run_cli_on_node(
        lab,
        &[
            "diagnose",
            "--agent",
            &url,
            "--pod",
            "default/client",
            target,
        ],
    )
    .unwrap();
    (status.code(), format!("{stdout}{stderr}"))
}

/// Starts the agent with exactly `keep` and `extra` arguments, or says why it did not.
fn agent_with_exactly(lab: &Lab, keep: &[String], extra: &[&str]) -> Result<Tracer, String> {
    let mut args = agent::args(lab);
    args.extend(extra.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let wrapper = with_exactly(keep);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    Tracer::start_wrapped(lab, &wrapper, &args).map_err(|e| e.to_string())
}

/// With exactly `granted`, the agent counts connections (and, unless `--no-diagnose` is
/// in `extra`, diagnoses through the agent work) without a warning.
fn works_with_exactly(lab: &Lab, granted: &[String], extra: &[&str]) {
    let endpoint = format!("http://{}:{}/", addr::ENDPOINT, addr::HTTP_PORT);
    let tracer = agent_with_exactly(lab, granted, extra).unwrap();
    let mut expected = granted.to_vec();
    expected.sort();
    assert_eq!(effective_capabilities(tracer.pid()), expected);
    let established = client_established();
    assert_eq!(curl(lab, "client", &endpoint), Some(0));
    assert_eq!(
        agent::wait_for_metric(lab, &established, 1.0, METRICS_WAIT),
        1.0
    );
    if !extra.contains(&"--no-diagnose") {
        let (code, output) = diagnose_through_agent(lab, &endpoint);
        assert_eq!(code, Some(0), "{output}");
    }
    let stopped = tracer.stop(libc::SIGTERM).unwrap();
    assert!(!stopped.stderr.contains("warning:"), "{}", stopped.stderr);
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn runs_with_exactly_the_daemonsets_capabilities_and_needs_each() {
    let lab = Lab::start(&[PodSpec::new("default", "client", CgroupDriver::Systemd)]).unwrap();
    let endpoint = format!("http://{}:{}/", addr::ENDPOINT, addr::HTTP_PORT);
    let granted = daemonset_capabilities();
    works_with_exactly(&lab, &granted, &[]);
    // Where kallsyms shows addresses to anyone, CAP_SYSLOG changes nothing observable.
    let kallsyms_needs_syslog = std::fs::read_to_string("/proc/sys/kernel/kptr_restrict")
        .is_ok_and(|v| v.trim() != "0")
        || std::fs::read_to_string("/proc/sys/kernel/perf_event_paranoid")
            .is_ok_and(|v| v.trim().parse::<i32>().is_ok_and(|p| p > 1));
    for missing in &granted {
        let keep: Vec<String> = granted.iter().filter(|c| *c != missing).cloned().collect();
        match missing.as_str() {
            "cap_sys_admin" | "cap_net_admin" => {
                let error = agent_with_exactly(&lab, &keep, &[])
                    .err()
                    .unwrap_or_else(|| panic!("started without {missing}"));
                assert!(
                    error.contains("missing capabilities CAP_"),
                    "{missing}: {error}"
                );
            }
            "cap_syslog" => {
                let tracer = agent_with_exactly(&lab, &keep, &[]).unwrap();
                let stderr = tracer.stop(libc::SIGTERM).unwrap().stderr;
                if kallsyms_needs_syslog {
                    assert!(stderr.contains("not found in /proc/kallsyms"), "{stderr}");
                }
            }
            "cap_sys_ptrace" => {
                let tracer = agent_with_exactly(&lab, &keep, &[]).unwrap();
                // The pod's processes are out of reach: which read fails first depends on
                // the pod's processes' own capabilities.
                let (code, output) = diagnose_through_agent(&lab, &endpoint);
                assert_ne!(code, Some(0), "{output}");
                assert!(
                    output.contains("has no running container")
                        || output.contains("network namespace /proc/")
                            && output.contains("Permission denied"),
                    "{output}"
                );
                let stderr = tracer.stop(libc::SIGTERM).unwrap().stderr;
                assert!(stderr.contains("no CAP_SYS_PTRACE"), "{stderr}");
            }
            other => panic!("{other} is granted but this test does not know why"),
        }
    }

    // Without diagnose, CAP_SYS_ADMIN gives way to CAP_BPF and CAP_PERFMON.
    let without_diagnose: Vec<String> = [
        "cap_bpf",
        "cap_perfmon",
        "cap_net_admin",
        "cap_syslog",
        "cap_sys_ptrace",
    ]
    .map(str::to_owned)
    .to_vec();
    works_with_exactly(&lab, &without_diagnose, &["--no-diagnose"]);
    for missing in ["cap_bpf", "cap_perfmon"] {
        let keep: Vec<String> = without_diagnose
            .iter()
            .filter(|c| *c != missing)
            .cloned()
            .collect();
        let error = agent_with_exactly(&lab, &keep, &["--no-diagnose"])
            .err()
            .unwrap_or_else(|| panic!("started without {missing}"));
        let wanted = format!("missing capabilities {}", missing.to_ascii_uppercase());
        assert!(error.contains(&wanted), "{missing}: {error}");
    }
    // And then diagnose is refused, not failed.
    let tracer = agent_with_exactly(&lab, &without_diagnose, &["--no-diagnose"]).unwrap();
    let (code, output) = diagnose_through_agent(&lab, &endpoint);
    assert_eq!(code, Some(1), "{output}");
    assert!(
        output.contains("diagnose is disabled on this agent"),
        "{output}"
    );
    assert!(tracer.stop(libc::SIGTERM).unwrap().status.success());
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn a_stalled_follower_holds_up_neither_the_agent_nor_other_clients() {
    let lab = Lab::start(&[PodSpec::new("default", "client", CgroupDriver::Systemd)]).unwrap();
    let agent = start_agent(&lab, &[]);
    let query = "/api/v1/flows?pod=default/client&follow=true";
    // A client that never reads: its socket buffers fill and stay full.
    let url = format!("http://{}{query}", agent::listen_address());
    let mut stalled = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.node_netns(), "curl", "-sgN", &url])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let reader = Follow::open(&lab, query).unwrap();
    let endpoint = format!("{}:{}", addr::ENDPOINT, addr::HTTP_PORT);
    let bursts = 4;
    for _ in 0..bursts {
        let established = lab
            .connect_burst(lab.pod("client"), &endpoint, 500)
            .unwrap();
        assert!(established);
    }
    let total = 500 * bursts;
    let records = reader.read_until(Duration::from_secs(30), |records| records.len() >= total);
    assert_eq!(records.len(), total);
    assert!(
        records
            .iter()
            .all(|r| r["pod"] == "default/client" && r["outcome"] == "established")
    );
    assert_eq!(agent::get(&lab, "/healthz").unwrap(), (200, "ok".into()));
    let established = client_established();
    assert_eq!(
        agent::wait_for_metric(&lab, &established, total as f64, METRICS_WAIT),
        total as f64
    );
    // The stalled client is still connected, its pipe full (it really stalled), and
    // stopping is not held up by it.
    assert_eq!(stalled.try_wait().unwrap(), None);
    let pipe = std::os::fd::AsRawFd::as_raw_fd(stalled.stdout.as_ref().unwrap());
    let mut unread: libc::c_int = 0;
    // SAFETY: FIONREAD on a pipe we own, into a c_int.
    assert_eq!(unsafe { libc::ioctl(pipe, libc::FIONREAD, &mut unread) }, 0);
    // curl blocks once its next write (up to 16 KiB) does not fit the 64 KiB pipe.
    assert!(
        unread >= 48 * 1024,
        "only {unread} bytes waiting: the client did not stall"
    );
    assert!(agent.stop(libc::SIGTERM).unwrap().status.success());
    let _ = stalled.kill();
    let _ = stalled.wait();
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn the_nodes_own_failed_handshakes_are_not_counted_even_with_a_socket_cookie() {
    let lab = Lab::start(&[PodSpec::new("default", "client", CgroupDriver::Systemd)]).unwrap();
    // An unused address of the node's subnet (VNet class, to which no other test of this
    // file fails to connect: they run in parallel, and each one's agent sees every lab's
    // pods, as unknown pods): its neighbour never answers, and connects to it time out.
    let silent = std::net::Ipv4Addr::new(10, 224, 0, 99);
    let agent = start_agent(&lab, &[]);
    let url = format!("http://{silent}:{}/", addr::HTTP_PORT);
    // A node process (outside the pod cgroups) connects; `ss -e` gives its socket a
    // cookie, as a CNI's BPF programs or any sock_diag user do.
    let mut command = Command::new("curl");
    command.args(["-s", "-4", "-m", "2", "-o", "/dev/null", &url]);
    let mut node_curl = lab.spawn_on_node(command).unwrap();
    let cookie_given = wait_until(Duration::from_secs(2), || {
        lab.run_on_node("ss", &["-tnHe", "state", "syn-sent"])
            .is_ok_and(|out| out.contains(" sk:"))
    });
    assert!(cookie_given, "the node's SYN_SENT socket never showed");
    assert_eq!(node_curl.wait().unwrap().code(), Some(28));
    // The pod's own failed attempt is counted: the failure hooks are working. (It times
    // out, or fails at once if the node has given the neighbour up meanwhile.)
    let code = curl(&lab, "client", &url);
    assert!(matches!(code, Some(7 | 28)), "curl: {code:?}");
    // Failed handshakes only: other tests' pods (unknown pods here) connect to the node's
    // own address (vnet) and succeed.
    let vnet_failures = |pod: &str| -> Vec<(String, f64)> {
        agent::metrics(&lab)
            .unwrap()
            .into_iter()
            .filter(|(k, _)| {
                k.starts_with("egress_connections_total{")
                    && k.contains(&format!(",pod=\"{pod}\","))
                    && k.contains("dst_class=\"vnet\"")
                    && !k.contains("outcome=\"established\"")
            })
            .collect()
    };
    assert!(
        wait_until(METRICS_WAIT, || vnet_failures("client").len() == 1),
        "{:#?}",
        agent::metrics(&lab)
    );
    assert_eq!(vnet_failures(""), []);
    assert!(agent.stop(libc::SIGTERM).unwrap().status.success());
}

/// Runs `lab dns-loop SERVER NAME --seconds S` in default/client: (answered, failed).
fn dns_loop(lab: &Lab, server: &str, name: &str, seconds: &str) -> (f64, f64) {
    let helper = egress_lab::lab_helper().unwrap();
    let output = lab
        .output_in_pod(
            lab.pod("client"),
            helper.to_str().unwrap(),
            &["dns-loop", server, name, "--seconds", seconds],
        )
        .unwrap();
    let fields: Vec<f64> = output
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    match fields.as_slice() {
        [answered, failed, _] => (*answered, *failed),
        _ => panic!("dns-loop printed {output:?}"),
    }
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn dns_summaries_keep_query_counts_durations_and_timeouts_exact() {
    let lab = Lab::start(&[PodSpec::new("default", "client", CgroupDriver::Systemd)]).unwrap();
    let upstream = addr::UPSTREAM_DNS.to_string();
    // One period for the whole test: every repeat is summarised.
    let _agent = start_agent(
        &lab,
        &[
            "--dns-summary-period",
            "1h",
            "--dns-timeout",
            "2s",
            "--upstream-dns",
            &upstream,
        ],
    );
    let labels = |rcode: &str, server: &str| {
        series(
            "egress_dns_queries_total",
            &[
                ("namespace", "default"),
                ("pod", "client"),
                ("rcode", rcode),
                ("qtype", "A"),
                ("server", server),
            ],
        )
    };
    let wait =
        |series: &str, expected: f64| agent::wait_for_metric(&lab, series, expected, METRICS_WAIT);

    // Thousands of identical exchanges: each counted, with its duration.
    let cluster_dns = addr::CLUSTER_DNS.to_string();
    let (answered, failed) = dns_loop(&lab, &cluster_dns, addr::ENDPOINT_NAME, "1");
    assert_eq!(failed, 0.0);
    assert!(answered > 100.0, "{answered}");
    assert_eq!(wait(&labels("NOERROR", "cluster"), answered), answered);
    let durations = series(
        "egress_dns_duration_seconds_count",
        &[
            ("namespace", "default"),
            ("pod", "client"),
            ("server", "cluster"),
        ],
    );
    assert_eq!(wait(&durations, answered), answered);
    // The flows hold the exchanges that were sent, far fewer than were made.
    let lookups = flows(&lab, "pod=default/client&since=2000-01-01T00:00:00Z");
    let resolved: Vec<&Value> = lookups
        .iter()
        .filter(|r| r["dns"]["name"] == addr::ENDPOINT_NAME && r["outcome"] == "resolved")
        .collect();
    assert!(
        !resolved.is_empty() && (resolved.len() as f64) < answered / 10.0,
        "{} lookups for {answered} exchanges",
        resolved.len()
    );

    // Unanswered: the first query is sent, the repeats are held back in the kernel,
    // and the agent times each out (after --dns-timeout) and counts it.
    lab.inject(egress_lab::Fault::UpstreamDnsUnreachable)
        .unwrap();
    let (answered, failed) = dns_loop(&lab, &upstream, addr::ENDPOINT_NAME, "3");
    assert_eq!((answered, failed >= 2.0), (0.0, true), "{failed}");
    let timeouts = labels("TIMEOUT", "upstream");
    assert_eq!(wait(&timeouts, failed), failed);
    let timed_out = flows(&lab, "pod=default/client&since=2000-01-01T00:00:00Z");
    assert!(
        timed_out.iter().any(|r| r["outcome"] == "timeout"
            && r["dns"]["name"] == addr::ENDPOINT_NAME
            && r["dns"]["server"] == format!("{upstream}:53")),
        "{timed_out:#?}"
    );
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn slow_clients_hold_up_neither_the_probes_nor_the_tracing() {
    let lab = Lab::start(&[
        PodSpec::new("default", "client", CgroupDriver::Systemd),
        PodSpec::new("default", "other", CgroupDriver::Systemd),
    ])
    .unwrap();
    // Listening on every address of the node, as the DaemonSet's agent does: a pod
    // reaches it at the node's address.
    let tracer = start_agent_on(&lab, &format!("0.0.0.0:{}", agent::AGENT_PORT), &[]);
    let helper = egress_lab::lab_helper().unwrap();
    let target = format!("{}:{}", addr::POD_GATEWAY, agent::AGENT_PORT);
    std::thread::scope(|scope| {
        let attack = scope.spawn(|| {
            lab.output_in_pod(
                lab.pod("client"),
                helper.to_str().unwrap(),
                &["slow-clients", &target, "--count", "500", "--seconds", "12"],
            )
        });
        std::thread::sleep(Duration::from_secs(3));
        // While the pod's 500 slow connections are on: the probes answer within a
        // second, and another pod's traffic is counted exactly.
        for _ in 0..3 {
            let asked = std::time::Instant::now();
            assert_eq!(agent::get(&lab, "/healthz").unwrap(), (200, "ok".into()));
            assert!(
                asked.elapsed() < Duration::from_secs(1),
                "{:?}",
                asked.elapsed()
            );
        }
        let endpoint = format!("{}:{}", addr::ENDPOINT, addr::HTTP_PORT);
        assert!(lab.connect_burst(lab.pod("other"), &endpoint, 50).unwrap());
        let established = "egress_connections_total{namespace=\"default\",pod=\"other\",outcome=\"established\",dst_class=\"internet\"}";
        assert_eq!(
            agent::wait_for_metric(&lab, established, 50.0, METRICS_WAIT),
            50.0
        );
        // Under the DaemonSet's memory limit (256 MiB) by far.
        let status = std::fs::read_to_string(format!("/proc/{}/status", tracer.pid())).unwrap();
        let rss_kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.split_whitespace().next()?.parse().ok())
            .unwrap();
        assert!(rss_kib < 256 * 1024, "RSS {rss_kib} KiB");
        let said = attack.join().unwrap().unwrap();
        let counts: Vec<usize> = said
            .split_whitespace()
            .filter_map(|word| word.parse().ok())
            .collect();
        // Beyond the 16 connections one client may hold, the agent closed them at once;
        // the 16 it held, when their headers did not come within 5 s: none is left.
        assert!(
            matches!(counts[..], [opened, closed] if opened > 16 && closed == opened),
            "{said}"
        );
    });
    assert!(tracer.stop(libc::SIGTERM).unwrap().status.success());
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn a_pods_hostile_resolv_conf_holds_up_nothing() {
    let lab = Lab::start(&[
        PodSpec::new("default", "client", CgroupDriver::Systemd),
        PodSpec::new("default", "other", CgroupDriver::Systemd),
    ])
    .unwrap();
    let agent = start_agent(&lab, &[]);
    let hostile = lab.pod("client").resolv_conf.clone();
    let endpoint = format!("{}:{}", addr::ENDPOINT, addr::HTTP_PORT);
    let established = "egress_connections_total{namespace=\"default\",pod=\"other\",outcome=\"established\",dst_class=\"internet\"}";
    let fifo = || {
        let path = std::ffi::CString::new(hostile.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o644) }, 0);
    };
    let dev_zero = || std::os::unix::fs::symlink("/dev/zero", &hostile).unwrap();
    for (round, make) in [&fifo as &dyn Fn(), &dev_zero].into_iter().enumerate() {
        // The pod's next process sees this as its /etc/resolv.conf; its DNS messages
        // make the agent read it.
        std::fs::remove_file(&hostile).unwrap();
        make();
        let (answered, _) = dns_loop(
            &lab,
            &addr::CLUSTER_DNS.to_string(),
            addr::ENDPOINT_NAME,
            "1",
        );
        assert!(answered > 0.0);
        // The agent still traces: the other pod's connections are counted exactly.
        assert!(lab.connect_burst(lab.pod("other"), &endpoint, 20).unwrap());
        let total = 20.0 * (round + 1) as f64;
        assert_eq!(
            agent::wait_for_metric(&lab, established, total, METRICS_WAIT),
            total
        );
    }
    assert_eq!(agent::get(&lab, "/healthz").unwrap(), (200, "ok".into()));
    assert!(agent.stop(libc::SIGTERM).unwrap().status.success());
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn a_pods_huge_resolver_timeout_holds_back_no_other_pods_timeouts() {
    let lab = Lab::start(&[
        PodSpec::new("default", "client", CgroupDriver::Systemd)
            .with_resolver_options("timeout:1000000 attempts:1"),
        PodSpec::new("default", "other", CgroupDriver::Systemd)
            .with_resolver_options("timeout:1 attempts:1"),
    ])
    .unwrap();
    lab.inject(egress_lab::Fault::UpstreamDnsUnreachable)
        .unwrap();
    let agent = start_agent(&lab, &[]);
    let helper = egress_lab::lab_helper().unwrap();
    let silent = addr::UPSTREAM_DNS.to_string();
    // The hostile pod's query, never answered, is the oldest the agent waits for; then
    // the other pod's.
    for (pod, name) in [("client", "a.example.test"), ("other", "b.example.test")] {
        lab.output_in_pod(
            lab.pod(pod),
            helper.to_str().unwrap(),
            &["dns-loop", &silent, name, "--seconds", "1"],
        )
        .unwrap();
    }
    // The other pod's query times out after its own 1 s, whatever the first one waits.
    let timed_out = || {
        flows(&lab, "pod=default/other&hop=dns")
            .iter()
            .any(|r| r["dns"]["name"] == "b.example.test" && r["outcome"] == "timeout")
    };
    assert!(
        wait_until(Duration::from_secs(10), timed_out),
        "{:#?}",
        flows(&lab, "pod=default/other")
    );
    assert!(agent.stop(libc::SIGTERM).unwrap().status.success());
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn a_diagnosis_whose_client_left_still_holds_its_place() {
    let lab = Lab::start(&[PodSpec::new("default", "client", CgroupDriver::Systemd)]).unwrap();
    // A target that takes seconds: its SYNs vanish (connect timeout, then the path).
    lab.inject(egress_lab::Fault::SilentDrop {
        dst: addr::ENDPOINT.into(),
        port: addr::HTTP_PORT,
    })
    .unwrap();
    let agent = start_agent(&lab, &[]);
    let diagnose = |target: &str| {
        format!("/api/v1/diagnose?pod=default/client&target={target}&timeout=3s&dns_timeout=1s")
    };
    let slow = format!(
        "http://{}{}",
        agent::listen_address(),
        diagnose("http://203.0.113.10/")
    );
    // The client gives up after a second; the diagnosis goes on without it.
    let gave_up = lab.run_on_node("curl", &["-s", "-m", "1", &slow]);
    assert!(gave_up.is_err(), "{gave_up:?}");
    let (status, body) = agent::get(&lab, &diagnose("http://203.0.113.10:81/")).unwrap();
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("another diagnosis is running"), "{body}");
    // Once it has ended (3 s connect timeout, at most 3 s of path), the next one runs.
    let ran = wait_until(Duration::from_secs(15), || {
        agent::get(&lab, &diagnose("http://203.0.113.10:81/"))
            .is_ok_and(|(status, _)| status == 200)
    });
    assert!(ran);
    assert!(agent.stop(libc::SIGTERM).unwrap().status.success());
}
