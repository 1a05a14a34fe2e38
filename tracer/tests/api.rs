//! The Kubernetes API source against a fake API server speaking the real list+watch
//! protocol over HTTP: lists with a resourceVersion, chunked watch streams with
//! BOOKMARK events, `410 Gone` forcing a re-list, and an outage the caches survive.

use std::{
    net::TcpListener,
    thread,
    time::{Duration, Instant},
};

use egress_lab::fake_api::{FakeApiServer, PODS, Script};
use egress_tracer::cluster::api::ClusterApi;
use serde_json::{Value, json};

fn pod(name: &str, ip: &str, version: u64) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"),
                     "resourceVersion": version.to_string(), "labels": {"app": name},
                     "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
        "spec": {"nodeName": "node-a", "containers": [{"name": "c"}]},
        "status": {"podIP": ip},
    })
}

fn event(kind: &str, object: Value) -> Value {
    json!({"type": kind, "object": object})
}

fn config(server: &FakeApiServer) -> kube::Config {
    kube::Config::new(format!("http://{}", server.address).parse().unwrap())
}

/// Polls `check` until it holds or `timeout` passes.
fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        thread::sleep(Duration::from_millis(50));
    }
    check()
}

fn pod_names(api: &ClusterApi) -> Vec<String> {
    let (state, _) = api.state();
    let mut names: Vec<String> = state.pods().iter().map(|p| p.to_string()).collect();
    names.sort();
    names
}

#[test]
fn lists_watches_bookmarks_and_relists_after_410_gone() {
    let mut script = Script::default();
    script.lists.insert(
        PODS,
        vec![
            (10, vec![pod("web", "10.244.0.10", 10)]),
            (
                20,
                vec![
                    pod("web", "10.244.0.10", 10),
                    pod("api", "10.244.0.11", 12),
                    pod("db", "10.244.0.12", 19),
                ],
            ),
        ],
    );
    script.watches.insert(
        PODS,
        vec![
            vec![
                event("BOOKMARK", json!({"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": "11"}})),
                event("ADDED", pod("api", "10.244.0.11", 12)),
                event("ERROR", json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                      "message": "too old resource version: 12 (15)", "reason": "Expired", "code": 410})),
            ],
            vec![event("BOOKMARK", json!({"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": "21"}}))],
        ],
    );
    let server = FakeApiServer::start(script, "127.0.0.1:0".parse().unwrap());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let api = runtime
        .block_on(ClusterApi::connect(config(&server), Some("node-a")))
        .unwrap();
    runtime
        .block_on(api.wait_synced(Duration::from_secs(10)))
        .unwrap();
    // The watch from the relist's version follows the relist: wait for both.
    assert!(
        eventually(Duration::from_secs(10), || pod_names(&api)
            == ["shop/api", "shop/db", "shop/web"]
            && server.requests().iter().any(|r| r.starts_with(PODS)
                && r.contains("watch=true")
                && r.contains("resourceVersion=20"))),
        "{:?}\n{:#?}",
        pod_names(&api),
        server.requests()
    );
    let pod_requests: Vec<String> = server
        .requests()
        .into_iter()
        .filter(|r| r.starts_with(PODS))
        .collect();
    // Every pod request selects this node's pods.
    assert!(
        pod_requests
            .iter()
            .all(|r| r.contains("fieldSelector=spec.nodeName%3Dnode-a")),
        "{pod_requests:#?}"
    );
    let lists = pod_requests
        .iter()
        .filter(|r| !r.contains("watch=true"))
        .count();
    let watches: Vec<&String> = pod_requests
        .iter()
        .filter(|r| r.contains("watch=true"))
        .collect();
    // One list, a watch from its resourceVersion with bookmarks, then after 410 Gone a
    // second list and a watch from the new version.
    assert_eq!(lists, 2, "{pod_requests:#?}");
    assert!(
        watches[0].contains("resourceVersion=10")
            && watches[0].contains("allowWatchBookmarks=true"),
        "{watches:#?}"
    );
    assert!(
        watches.iter().any(|w| w.contains("resourceVersion=20")),
        "{watches:#?}"
    );
    assert!(!api.is_stale());
    // managedFields are dropped from the cache; the rest of the pod is there.
    let (state, warnings) = api.state();
    assert!(warnings.is_empty());
    let web = state.find_pod("shop/web").unwrap();
    assert_eq!(web.uid, "uid-web");
    assert_eq!(
        web.ips,
        ["10.244.0.10".parse::<std::net::IpAddr>().unwrap()]
    );
}

#[test]
fn an_outage_keeps_the_last_state_reports_stale_and_recovers() {
    let mut script = Script::default();
    script
        .lists
        .insert(PODS, vec![(10, vec![pod("web", "10.244.0.10", 10)])]);
    // The first watch sends nothing; the watch resumed after the outage gets what changed
    // meanwhile, as the API server sends it from the resourceVersion asked for. (A
    // reconnect can race the outage and be cut with its events: the next watches carry
    // the same event, which the reflector takes once.)
    let added = vec![event("ADDED", pod("new", "10.244.0.13", 30))];
    script
        .watches
        .insert(PODS, vec![vec![], added.clone(), added.clone(), added]);
    let mut server = FakeApiServer::start(script, "127.0.0.1:0".parse().unwrap());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let api = runtime
        .block_on(ClusterApi::connect(config(&server), None))
        .unwrap();
    runtime
        .block_on(api.wait_synced(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(pod_names(&api), ["shop/web"]);
    assert!(!api.is_stale());

    server.outage();
    assert!(
        eventually(Duration::from_secs(10), || api.is_stale()),
        "never stale"
    );
    // The last state is kept.
    assert_eq!(pod_names(&api), ["shop/web"]);

    server.listen();
    assert!(
        eventually(Duration::from_secs(30), || !api.is_stale()
            && pod_names(&api) == ["shop/new", "shop/web"]),
        "not recovered: stale {} pods {:?}",
        api.is_stale(),
        pod_names(&api)
    );
}

#[test]
fn an_unreachable_server_is_an_error_naming_it() {
    // A port nobody listens on: bind, note it, close.
    let address = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let config = kube::Config::new(format!("http://{address}").parse().unwrap());
    let error = runtime
        .block_on(ClusterApi::connect(config, None))
        .err()
        .unwrap();
    let message = error.to_string();
    assert!(
        message.starts_with(&format!(
            "cannot reach the Kubernetes API at http://{address}/"
        )),
        "{message}"
    );
}
