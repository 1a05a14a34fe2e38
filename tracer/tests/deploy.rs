//! deploy/: the Kubernetes manifests parse into their k8s-openapi types without unknown
//! fields and agree with each other and with the agent; the dashboard only uses metrics
//! the agent exports; the kubectl plugin runs the right command.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use std::{net::SocketAddr, sync::Arc, time::Duration};

use egress_tracer::{
    capture::{KernelCounters, PacketConntrack, PacketDrop},
    cluster::ClusterState,
    conntrack::{ConntrackStats, NodeConntrack, snat::SnatTable},
    dns::QueryOutcome,
    flow::{Attempt, Drops, Origin, Outcome, Protocol, TcpHandshake},
    metrics::{Metrics, MetricsOptions},
    pipeline::Record,
    verdict::{Hop, Verdict},
};
use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{Namespace, Service, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding, Role},
    },
    serde::de::DeserializeOwned,
};
use serde_json::Value;

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

/// The YAML documents of a manifest file, as JSON values.
fn documents(path: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(deploy(path)).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|document| serde::Deserialize::deserialize(document).unwrap())
        .collect()
}

/// Parses `document` as `T` and checks nothing was dropped: a misspelt or misplaced
/// field would be ignored by the API server's typed decoding too.
fn typed<T: DeserializeOwned + serde::Serialize>(document: &Value) -> T {
    let object: T =
        serde_json::from_value(document.clone()).unwrap_or_else(|e| panic!("{e}: {document:#}"));
    assert_eq!(&serde_json::to_value(&object).unwrap(), document);
    object
}

fn of_kind<'a>(documents: &'a [Value], kind: &str) -> Vec<&'a Value> {
    documents.iter().filter(|d| d["kind"] == kind).collect()
}

const AGENT_LABEL: (&str, &str) = ("app.kubernetes.io/name", "egress-tracer");

#[test]
fn every_manifest_is_a_valid_object_of_its_kind() {
    let mut kinds = Vec::new();
    for file in [
        "namespace.yaml",
        "rbac.yaml",
        "daemonset.yaml",
        "service.yaml",
        "servicemonitor.yaml",
    ] {
        for document in documents(&format!("kubernetes/{file}")) {
            let kind = document["kind"].as_str().unwrap().to_owned();
            match kind.as_str() {
                "Namespace" => drop(typed::<Namespace>(&document)),
                "ServiceAccount" => drop(typed::<ServiceAccount>(&document)),
                "ClusterRole" => drop(typed::<ClusterRole>(&document)),
                "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(&document)),
                "Role" => drop(typed::<Role>(&document)),
                "DaemonSet" => drop(typed::<DaemonSet>(&document)),
                "Service" => drop(typed::<Service>(&document)),
                // A CRD: no k8s-openapi type; its fields are checked below.
                "ServiceMonitor" => {}
                other => panic!("unexpected kind {other} in {file}"),
            }
            // Everything carries the agent's label, so it can be found and removed.
            assert_eq!(
                document["metadata"]["labels"][AGENT_LABEL.0], AGENT_LABEL.1,
                "{file}: {kind}"
            );
            kinds.push(kind);
        }
    }
    assert_eq!(
        kinds,
        [
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "ClusterRole",
            "Role",
            "DaemonSet",
            "Service",
            "ServiceMonitor"
        ]
    );
}

#[test]
fn the_agent_may_only_list_and_watch_what_it_models() {
    let rbac = documents("kubernetes/rbac.yaml");
    let role: ClusterRole = typed(
        of_kind(&rbac, "ClusterRole")
            .into_iter()
            .find(|r| r["metadata"]["name"] == "egress-tracer")
            .unwrap(),
    );
    let mut granted = BTreeSet::new();
    for rule in role.rules.unwrap() {
        assert_eq!(rule.verbs, ["list", "watch"], "{rule:?}");
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
        for group in rule.api_groups.unwrap() {
            for resource in rule.resources.clone().unwrap() {
                granted.insert(format!("{group}/{resource}"));
            }
        }
    }
    // The reflectors of tracer/src/cluster/api.rs.
    let watched: BTreeSet<String> = [
        "/pods",
        "/namespaces",
        "/services",
        "discovery.k8s.io/endpointslices",
        "networking.k8s.io/networkpolicies",
    ]
    .map(str::to_owned)
    .into();
    assert_eq!(granted, watched);
    let binding: ClusterRoleBinding = typed(of_kind(&rbac, "ClusterRoleBinding")[0]);
    assert_eq!(binding.role_ref.name, "egress-tracer");
    let subject = &binding.subjects.unwrap()[0];
    assert_eq!(
        (
            subject.kind.as_str(),
            subject.name.as_str(),
            subject.namespace.as_deref()
        ),
        ("ServiceAccount", "egress-tracer", Some("egress-tracer"))
    );
    // The users' roles: find pods and their node's agent (cluster-wide), and talk to it
    // through the proxy (the agents' namespace only).
    let user: ClusterRole = typed(
        of_kind(&rbac, "ClusterRole")
            .into_iter()
            .find(|r| r["metadata"]["name"] == "egress-tracer-user")
            .unwrap(),
    );
    let rules: Vec<(Vec<String>, Vec<String>)> = user
        .rules
        .unwrap()
        .into_iter()
        .map(|r| (r.resources.unwrap(), r.verbs))
        .collect();
    assert_eq!(
        rules,
        [(
            vec!["pods".to_owned()],
            vec!["get".to_owned(), "list".to_owned()]
        )]
    );
    let namespaced: Role = typed(
        of_kind(&rbac, "Role")
            .into_iter()
            .find(|r| r["metadata"]["name"] == "egress-tracer-user")
            .unwrap(),
    );
    assert_eq!(
        namespaced.metadata.namespace.as_deref(),
        Some("egress-tracer")
    );
    // (resources, verbs, resource names), each joined.
    let rules: Vec<[String; 3]> = namespaced
        .rules
        .unwrap()
        .into_iter()
        .map(|r| {
            [
                r.resources.unwrap().join(","),
                r.verbs.join(","),
                r.resource_names.unwrap_or_default().join(","),
            ]
        })
        .collect();
    assert_eq!(
        rules,
        [
            ["pods/proxy", "get", ""].map(String::from),
            ["secrets", "get", "egress-tracer-api-token"].map(String::from),
        ]
    );
}

#[test]
fn the_daemonset_runs_the_agent_as_the_service_and_probes_expect() {
    let daemonset: DaemonSet = typed(&documents("kubernetes/daemonset.yaml")[0]);
    let spec = daemonset.spec.unwrap();
    let labels = spec.template.metadata.unwrap().labels.unwrap();
    assert_eq!(labels[AGENT_LABEL.0], AGENT_LABEL.1);
    assert_eq!(
        spec.selector.match_labels.unwrap()[AGENT_LABEL.0],
        AGENT_LABEL.1
    );
    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("egress-tracer"));
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.host_pid, Some(true));
    assert_eq!(pod.host_ipc, None);
    assert_eq!(pod.dns_policy.as_deref(), Some("Default"));
    let [container] = pod.containers.as_slice() else {
        panic!("one container");
    };
    let args = container.args.clone().unwrap();
    assert_eq!(
        args,
        [
            "agent",
            "--listen=0.0.0.0:9090",
            "--api-token-file=/var/run/egress-tracer/api/token"
        ]
    );
    let port = &container.ports.as_ref().unwrap()[0];
    assert_eq!(
        (port.name.as_deref(), port.container_port),
        (Some("http"), 9090)
    );
    let probe_path = |probe: &Option<k8s_openapi::api::core::v1::Probe>| {
        probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|g| g.path.clone())
    };
    assert_eq!(
        probe_path(&container.readiness_probe).as_deref(),
        Some("/readyz")
    );
    assert_eq!(
        probe_path(&container.liveness_probe).as_deref(),
        Some("/healthz")
    );
    let env = container.env.as_ref().unwrap();
    assert_eq!(env[0].name, "NODE_NAME");
    assert_eq!(
        env[0]
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str()),
        Some("spec.nodeName")
    );
    let resources = container.resources.as_ref().unwrap();
    assert!(resources.requests.as_ref().unwrap().contains_key("memory"));
    assert!(resources.limits.as_ref().unwrap().contains_key("memory"));
    let security = container.security_context.as_ref().unwrap();
    assert_eq!(security.privileged, Some(false));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    let capabilities = security.capabilities.as_ref().unwrap();
    assert_eq!(capabilities.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    assert_eq!(
        capabilities.add.clone().unwrap(),
        ["SYS_ADMIN", "NET_ADMIN", "SYSLOG", "SYS_PTRACE"]
    );
    let mounts = container.volume_mounts.as_ref().unwrap();
    assert_eq!(mounts[0].mount_path, "/sys/fs/cgroup");
    // The token file the args name, from the Secret the users' Role may read.
    assert_eq!(mounts[1].mount_path, "/var/run/egress-tracer/api");
    let volumes = pod.volumes.as_ref().unwrap();
    assert_eq!(
        volumes[1]
            .secret
            .as_ref()
            .and_then(|s| s.secret_name.as_deref()),
        Some("egress-tracer-api-token")
    );
    let rbac = documents("kubernetes/rbac.yaml");
    let role: Role = typed(of_kind(&rbac, "Role")[0]);
    let rules = role.rules.unwrap();
    let rule = rules
        .iter()
        .find(|rule| rule.resources.as_deref() == Some(&["secrets".to_owned()][..]))
        .unwrap();
    assert_eq!(
        (rule.resource_names.as_deref(), rule.verbs.as_slice()),
        (
            Some(&["egress-tracer-api-token".to_owned()][..]),
            &["get".to_owned()][..]
        )
    );
}

#[test]
fn the_service_and_servicemonitor_reach_the_agents_port() {
    let service: Service = typed(&documents("kubernetes/service.yaml")[0]);
    let spec = service.spec.unwrap();
    assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
    assert_eq!(spec.selector.unwrap()[AGENT_LABEL.0], AGENT_LABEL.1);
    let port = &spec.ports.unwrap()[0];
    assert_eq!((port.name.as_deref(), port.port), (Some("http"), 9090));
    let monitor = &documents("kubernetes/servicemonitor.yaml")[0];
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(
        monitor["spec"]["selector"]["matchLabels"][AGENT_LABEL.0],
        AGENT_LABEL.1
    );
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(endpoint["port"], "http");
    assert_eq!(endpoint["path"], "/metrics");
}

/// Metrics with a series in every family (families without series are not exposed).
fn exercised_metrics() -> Metrics {
    let mut metrics = Metrics::new(MetricsOptions {
        pod_label: true,
        upstream_dns: Vec::new(),
        kernel: "6.18.0".into(),
    });
    let cluster = ClusterState::default();
    let origin = Arc::new(Origin {
        pod: Some("shop/web".into()),
        ..Origin::default()
    });
    metrics.kernel(&KernelCounters {
        connects: 2,
        ..KernelCounters::default()
    });
    metrics.conntrack(
        &NodeConntrack {
            stats: Some(ConntrackStats::default()),
            snat: Some(SnatTable::new((32768, 60999), None)),
        },
        &cluster,
    );
    let key = tracer_common::HandshakeKey {
        cgroup_id: 7,
        addr: [203, 0, 113, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        family: tracer_common::AF_INET,
        outcome: tracer_common::HANDSHAKE_TIMEOUT,
        _pad: [0; 5],
    };
    let totals = tracer_common::HandshakeTotals {
        handshakes: 1,
        syn_retransmits: 2,
    };
    metrics.handshakes(&[(key, totals)], |_| origin.clone(), &cluster);
    let query = |rcode| QueryOutcome {
        cgroup_id: 7,
        server: "10.0.0.10".parse().unwrap(),
        qtype: "A".into(),
        rcode,
        duration: Duration::from_millis(3),
    };
    metrics.queries(
        &[
            (query(None), origin.clone()),
            (query(Some("NOERROR".into())), origin.clone()),
        ],
        &cluster,
    );
    let dst: SocketAddr = "203.0.113.10:443".parse().unwrap();
    let attempt = |outcome, drops, hop| Attempt {
        monotonic_ns: 0,
        origin: origin.clone(),
        pid: 1,
        comm: "curl".into(),
        cgroup_id: 7,
        sock_cookie: 1,
        protocol: Protocol::Tcp,
        src: None,
        dst,
        dst_name: None,
        outcome,
        tcp: Some(TcpHandshake {
            syn_retransmits: 0,
            duration: Some(Duration::from_millis(2)),
            errno: None,
            closed_by_application: false,
        }),
        icmp: None,
        drops,
        nat: None,
        service: None,
        reply: None,
        snat: None,
        verdict: Some(Box::new(Verdict {
            hop,
            reason: "denied".into(),
            symptom: None,
            likely: false,
            summary: String::new(),
            evidence: Vec::new(),
            policy: None,
            next_steps: Vec::new(),
        })),
    };
    let drop = PacketDrop {
        reason: "NETFILTER_DROP".into(),
        location: "nft_do_chain".into(),
        reply: false,
        src: None,
        dst: Some(dst),
        conntrack: PacketConntrack::Unknown,
        netns: None,
        netns_owner: None,
    };
    let records = [
        attempt(Outcome::Established, None, Hop::None),
        attempt(
            Outcome::Timeout,
            Some(Box::new(Drops {
                first: drop,
                count: 3,
            })),
            Hop::NetworkPolicy,
        ),
    ]
    .map(|record| Record::Attempt(Box::new(record)));
    metrics.records(&records, &cluster);
    metrics.cluster_stale(false);
    metrics
}

#[test]
fn the_dashboard_queries_only_metrics_the_agent_exports() {
    let exported: BTreeSet<String> = exercised_metrics()
        .encode()
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    assert!(exported.contains("egress_connections"), "{exported:?}");
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(deploy("grafana/egress-tracer.json")).unwrap(),
    )
    .unwrap();
    let mut used = BTreeSet::new();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            queries.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(query) = variable["query"]["query"].as_str() {
            queries.push(query.to_owned());
        }
    }
    for query in &queries {
        for word in query.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if !word.starts_with("egress_") {
                continue;
            }
            let family = ["_total", "_bucket", "_sum", "_count", "_info"]
                .iter()
                .find_map(|suffix| word.strip_suffix(suffix))
                .unwrap_or(word);
            assert!(
                exported.contains(family),
                "{word} in {query} is not exported"
            );
            used.insert(family.to_owned());
        }
    }
    // Every metric has a panel.
    assert_eq!(used, exported);
}

#[test]
fn the_kubectl_plugin_runs_trace_and_diagnose_through_the_agent() {
    let dir = std::env::temp_dir().join(format!("kubectl-egress-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fake = dir.join("egress-tracer");
    std::fs::write(&fake, "#!/bin/sh\necho \"$@\"\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(deploy("kubectl-egress"))
            .args(args)
            .env("EGRESS_TRACER", &fake)
            .output()
            .unwrap()
    };
    let output = run(&[
        "diagnose",
        "shop/web",
        "https://api.example.test/",
        "-o",
        "json",
    ]);
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "diagnose --agent auto --pod shop/web https://api.example.test/ -o json\n"
    );
    let output = run(&["trace", "shop/web", "--failures-only"]);
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "trace --agent auto --pod shop/web --failures-only\n"
    );
    let output = run(&["explain", "shop/web"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown command explain"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_image_builds_every_workspace_member() {
    let dockerfile = std::fs::read_to_string(deploy("Dockerfile")).unwrap();
    let manifest = std::fs::read_to_string(deploy("../Cargo.toml")).unwrap();
    let members: Vec<&str> = manifest
        .lines()
        .find_map(|line| line.strip_prefix("members = ["))
        .unwrap()
        .trim_end_matches(']')
        .split(", ")
        .map(|m| m.trim_matches('"'))
        .collect();
    for member in members {
        let top = member.split('/').next().unwrap();
        assert!(
            dockerfile.contains(&format!("COPY {top} {top}")),
            "the image build does not copy {top}"
        );
    }
    assert!(dockerfile.contains("cargo build --release --locked -p egress-tracer"));
    assert_eq!(
        dockerfile.matches("\nFROM ").count() + usize::from(dockerfile.starts_with("FROM ")),
        2
    );
}
