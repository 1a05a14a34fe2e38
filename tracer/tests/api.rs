//! The Kubernetes API source against a fake API server speaking the real list+watch
//! protocol over HTTP: lists with a resourceVersion, chunked watch streams with
//! BOOKMARK events, `410 Gone` forcing a re-list, and an outage the caches survive.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use egress_tracer::cluster::api::ClusterApi;
use serde_json::{Value, json};

/// What the fake server answers: per resource path, the objects of each list (one list
/// per re-list, the last repeated) and the events of each watch request in turn.
#[derive(Default)]
struct Script {
    lists: HashMap<&'static str, Vec<(u64, Vec<Value>)>>,
    watches: HashMap<&'static str, Vec<Vec<Value>>>,
}

struct FakeApiServer {
    address: SocketAddr,
    requests: Arc<Mutex<Vec<String>>>,
    running: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<TcpStream>>>,
    accept: Option<thread::JoinHandle<()>>,
    script: Arc<Mutex<Script>>,
    served_lists: Arc<Mutex<HashMap<String, usize>>>,
}

const PODS: &str = "/api/v1/pods";
const RESOURCES: [&str; 5] = [
    PODS,
    "/api/v1/namespaces",
    "/api/v1/services",
    "/apis/discovery.k8s.io/v1/endpointslices",
    "/apis/networking.k8s.io/v1/networkpolicies",
];

impl FakeApiServer {
    fn start(script: Script, address: SocketAddr) -> Self {
        let mut server = Self {
            address,
            requests: Arc::default(),
            running: Arc::new(AtomicBool::new(true)),
            connections: Arc::default(),
            accept: None,
            script: Arc::new(Mutex::new(script)),
            served_lists: Arc::default(),
        };
        server.listen();
        server
    }

    fn listen(&mut self) {
        let listener = TcpListener::bind(self.address).unwrap();
        listener.set_nonblocking(true).unwrap();
        self.address = listener.local_addr().unwrap();
        self.running.store(true, Ordering::SeqCst);
        let (running, connections) = (Arc::clone(&self.running), Arc::clone(&self.connections));
        let (requests, script, served) = (
            Arc::clone(&self.requests),
            Arc::clone(&self.script),
            Arc::clone(&self.served_lists),
        );
        self.accept = Some(thread::spawn(move || {
            while running.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        stream.set_nonblocking(false).unwrap();
                        connections
                            .lock()
                            .unwrap()
                            .push(stream.try_clone().unwrap());
                        let (requests, script, served, running) = (
                            Arc::clone(&requests),
                            Arc::clone(&script),
                            Arc::clone(&served),
                            Arc::clone(&running),
                        );
                        thread::spawn(move || serve(stream, &requests, &script, &served, &running));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        }));
    }

    /// Stops answering: the listener closes and every open connection is cut.
    fn outage(&mut self) {
        self.running.store(false, Ordering::SeqCst);
        if let Some(accept) = self.accept.take() {
            accept.join().unwrap();
        }
        for connection in self.connections.lock().unwrap().drain(..) {
            let _ = connection.shutdown(Shutdown::Both);
        }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.outage();
    }
}

fn serve(
    stream: TcpStream,
    requests: &Mutex<Vec<String>>,
    script: &Mutex<Script>,
    served: &Mutex<HashMap<String, usize>>,
    running: &AtomicBool,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut out = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        // Headers, up to the blank line (GET requests have no body).
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
                break;
            }
        }
        let target = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or("/")
            .to_owned();
        requests.lock().unwrap().push(target.clone());
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        if path == "/version" {
            let version = json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0", "gitCommit": "fake",
                "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.24",
                "compiler": "gc", "platform": "linux/amd64"});
            respond(&mut out, 200, &version);
            continue;
        }
        let Some(resource) = RESOURCES.iter().find(|r| **r == path) else {
            respond(&mut out, 404, &json!({"kind": "Status", "code": 404}));
            continue;
        };
        let kind = list_kind(resource);
        if !query.contains("watch=true") {
            let index = {
                let mut served = served.lock().unwrap();
                let count = served.entry((*resource).to_owned()).or_default();
                *count += 1;
                *count - 1
            };
            let script = script.lock().unwrap();
            let lists = script.lists.get(resource).cloned().unwrap_or_default();
            let (version, items) = lists
                .get(index.min(lists.len().saturating_sub(1)))
                .cloned()
                .unwrap_or((1, Vec::new()));
            let list = json!({"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": version.to_string()}, "items": items});
            respond(&mut out, 200, &list);
            continue;
        }
        // A watch: the events scripted after the latest list, then hold the stream open
        // (until the connection is cut) as the API server does.
        let events = {
            let mut served = served.lock().unwrap();
            let count = served.entry(format!("{resource}?watch")).or_default();
            *count += 1;
            let script = script.lock().unwrap();
            script
                .watches
                .get(resource)
                .and_then(|w| w.get(*count - 1))
                .cloned()
                .unwrap_or_default()
        };
        let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
        if out.write_all(head.as_bytes()).is_err() {
            return;
        }
        for event in events {
            let line = format!("{event}\n");
            if write!(out, "{:x}\r\n{line}\r\n", line.len()).is_err() {
                return;
            }
            let _ = out.flush();
            thread::sleep(Duration::from_millis(50));
        }
        while running.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(50));
        }
        return;
    }
}

fn respond(out: &mut TcpStream, status: u16, body: &Value) {
    let body = body.to_string();
    let _ = write!(
        out,
        "HTTP/1.1 {status} OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = out.flush();
}

fn list_kind(resource: &str) -> &'static str {
    match resource {
        PODS => "PodList",
        "/api/v1/namespaces" => "NamespaceList",
        "/api/v1/services" => "ServiceList",
        "/apis/discovery.k8s.io/v1/endpointslices" => "EndpointSliceList",
        _ => "NetworkPolicyList",
    }
}

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
    assert!(
        eventually(Duration::from_secs(10), || pod_names(&api)
            == ["shop/api", "shop/db", "shop/web"]),
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
    // meanwhile, as the API server sends it from the resourceVersion asked for.
    script.watches.insert(
        PODS,
        vec![vec![], vec![event("ADDED", pod("new", "10.244.0.13", 30))]],
    );
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
