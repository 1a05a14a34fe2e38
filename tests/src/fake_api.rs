//! A fake Kubernetes API server speaking the real list+watch protocol over HTTP: lists
//! with a resourceVersion, chunked watch streams, scripted events, and outages. For the
//! tests of the API source (`tracer/tests/api.rs`) and of the agent's readiness.

use std::{
    collections::HashMap,
    fs::File,
    io::{BufRead, BufReader, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use serde_json::{Value, json};

/// What the fake server answers: per resource path, the objects of each list (one list
/// per re-list, the last repeated) and the events of each watch request in turn.
#[derive(Default)]
pub struct Script {
    pub lists: HashMap<&'static str, Vec<(u64, Vec<Value>)>>,
    pub watches: HashMap<&'static str, Vec<Vec<Value>>>,
    /// Other GETs: the object (or list) served at exactly this path, whatever the query.
    pub objects: HashMap<String, Value>,
    /// Requests whose path starts with the prefix are forwarded, without it, to the
    /// address (as the API server's `pods/proxy` does).
    pub proxies: Vec<(String, SocketAddr)>,
}

pub struct FakeApiServer {
    pub address: SocketAddr,
    requests: Arc<Mutex<Vec<String>>>,
    running: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<TcpStream>>>,
    accept: Option<thread::JoinHandle<()>>,
    script: Arc<Mutex<Script>>,
    served_lists: Arc<Mutex<HashMap<String, usize>>>,
}

pub const PODS: &str = "/api/v1/pods";
const RESOURCES: [&str; 5] = [
    PODS,
    "/api/v1/namespaces",
    "/api/v1/services",
    "/apis/discovery.k8s.io/v1/endpointslices",
    "/apis/networking.k8s.io/v1/networkpolicies",
];

impl FakeApiServer {
    pub fn start(script: Script, address: SocketAddr) -> Self {
        let mut server = Self::new(script, address);
        server.listen();
        server
    }

    fn new(script: Script, address: SocketAddr) -> Self {
        Self {
            address,
            requests: Arc::default(),
            running: Arc::new(AtomicBool::new(true)),
            connections: Arc::default(),
            accept: None,
            script: Arc::new(Mutex::new(script)),
            served_lists: Arc::default(),
        }
    }

    /// Starts serving `script` on `address` in the network namespace `netns` (a name
    /// under /run/netns); its connections, proxied ones too, are made from there.
    pub fn start_in_netns(
        netns: &str,
        address: SocketAddr,
        script: Script,
    ) -> std::io::Result<Self> {
        let path = Path::new("/run/netns").join(netns);
        let mut server = Self::new(script, address);
        thread::scope(|scope| {
            scope
                .spawn(|| {
                    let netns = File::open(&path)?;
                    // SAFETY: setns(2) on a valid fd, affecting only this thread and the
                    // threads it starts (the server's).
                    if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    server.serve_on(TcpListener::bind(address)?);
                    Ok(())
                })
                .join()
                .expect("the serving thread does not panic")
        })?;
        Ok(server)
    }

    /// Listens again on the same address (after an [`outage`](Self::outage)).
    pub fn listen(&mut self) {
        let listener = TcpListener::bind(self.address).unwrap();
        self.serve_on(listener);
    }

    fn serve_on(&mut self, listener: TcpListener) {
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
    pub fn outage(&mut self) {
        self.running.store(false, Ordering::SeqCst);
        if let Some(accept) = self.accept.take() {
            accept.join().unwrap();
        }
        for connection in self.connections.lock().unwrap().drain(..) {
            let _ = connection.shutdown(Shutdown::Both);
        }
    }

    /// The request targets (path and query) received, in order.
    pub fn requests(&self) -> Vec<String> {
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
        let proxy = {
            let script = script.lock().unwrap();
            script.proxies.iter().find_map(|(prefix, to)| {
                Some((path.strip_prefix(prefix.as_str())?.to_owned(), *to))
            })
        };
        if let Some((rest, upstream)) = proxy {
            let rest = if query.is_empty() {
                rest
            } else {
                format!("{rest}?{query}")
            };
            forward(&mut out, &rest, upstream);
            return;
        }
        let object = script.lock().unwrap().objects.get(path).cloned();
        if let Some(object) = object {
            respond(&mut out, 200, &object);
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

/// Sends `GET path` to `upstream` and copies its whole response back, then closes.
fn forward(out: &mut TcpStream, path: &str, upstream: SocketAddr) {
    let Ok(mut upstream) = TcpStream::connect(upstream) else {
        respond(
            out,
            503,
            &json!({"kind": "Status", "code": 503, "message": "no endpoint"}),
        );
        return;
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {upstream}\r\nConnection: close\r\n\r\n",
        upstream = upstream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_default()
    );
    if upstream.write_all(request.as_bytes()).is_ok() {
        let _ = std::io::copy(&mut upstream, out);
    }
    let _ = out.shutdown(Shutdown::Both);
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
