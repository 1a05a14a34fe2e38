//! The agent's HTTP API: `/metrics`, `/healthz`, `/readyz` and `/api/v1/flows`.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use axum::{
    Router,
    body::Body,
    extract::{RawQuery, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use egress_tracer::store::{FlowQuery, StoredRecord};
use futures::{Stream, StreamExt, stream};
use tokio::sync::{Semaphore, broadcast, oneshot, watch};

use crate::agent::{ApiAccess, Shared};

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const NDJSON: &str = "application/x-ndjson";

/// Most connections open at once, and from one client address: a few hundred slow
/// clients (or a pod that opens them) cannot take the agent's memory or its probes'
/// answers.
const MAX_CONNECTIONS: usize = 256;
const MAX_CONNECTIONS_PER_CLIENT: usize = 16;
/// Most `follow=true` streams at once.
const MAX_FOLLOWERS: usize = 32;
static FOLLOWERS: Semaphore = Semaphore::const_new(MAX_FOLLOWERS);
/// How long a client may take to send its request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves on a thread and runtime of its own (HTTP work, such as encoding the metrics
/// or a slow client, never holds up the event loop) until `stop` turns true; follow
/// streams end then too. The receiver gets how it ended.
pub fn spawn(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
) -> std::io::Result<oneshot::Receiver<std::io::Result<()>>> {
    let (done, ended) = oneshot::channel();
    std::thread::Builder::new()
        .name("http".into())
        .spawn(move || {
            let result = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .and_then(|runtime| {
                    runtime.block_on(async {
                        let listener = tokio::net::TcpListener::from_std(listener)?;
                        serve(listener, shared, stop).await
                    })
                });
            let _ = done.send(result);
        })?;
    Ok(ended)
}

async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let router = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/api/v1/flows", get(flows))
        .route("/api/v1/diagnose", get(diagnose))
        .route_layer(axum::middleware::from_fn_with_state(
            (Arc::clone(&shared), stop.clone()),
            authorize,
        ))
        .fallback(not_found)
        .with_state((shared, stop.clone()));
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_client: Arc<Mutex<HashMap<IpAddr, usize>>> = Arc::default();
    let mut open = tokio::task::JoinSet::new();
    loop {
        let (stream, client) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                // Out of descriptors, or the client already gone: the connection stays
                // queued, so wait a moment rather than spin on it.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.wait_for(|stopped| *stopped) => break,
        };
        // Beyond a limit the connection is closed at once, before anything is read.
        let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
            continue;
        };
        let Some(client_slot) = ClientSlot::take(&per_client, client.ip()) else {
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let mut stopping = stop.clone();
        open.spawn(async move {
            let stopped = async move {
                let _ = stopping.wait_for(|stopped| *stopped).await;
            };
            let _held = (permit, client_slot);
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                // One request per connection: no idle connection waits for a next one.
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = stopped => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
        // Finished connections are collected as new ones come.
        while open.try_join_next().is_some() {}
    }
    while open.join_next().await.is_some() {}
    Ok(())
}

/// A client address's share of the connections, given back when its connection ends.
struct ClientSlot {
    clients: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl ClientSlot {
    fn take(clients: &Arc<Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr) -> Option<Self> {
        let mut open = clients.lock().expect("not poisoned");
        let count = open.entry(ip).or_default();
        if *count >= MAX_CONNECTIONS_PER_CLIENT {
            return None;
        }
        *count += 1;
        Some(Self {
            clients: Arc::clone(clients),
            ip,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.clients.lock().expect("not poisoned");
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

type AppState = (Arc<Shared>, watch::Receiver<bool>);

/// /api/v1/* needs the agent's token (see `ApiAccess`); the rest is open.
async fn authorize(
    State((shared, _)): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if !request.uri().path().starts_with("/api/") {
        return next.run(request).await;
    }
    match &shared.api_access {
        ApiAccess::Loopback => next.run(request).await,
        ApiAccess::Refused(reason) => {
            (StatusCode::FORBIDDEN, format!("{reason}\n")).into_response()
        }
        ApiAccess::Token(token) => {
            let headers = request.headers();
            let presented = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .or_else(|| headers.get(TOKEN_HEADER).and_then(|v| v.to_str().ok()));
            if presented.is_some_and(|p| same(p.as_bytes(), token.as_bytes())) {
                next.run(request).await
            } else {
                (
                    StatusCode::UNAUTHORIZED,
                    [(header::WWW_AUTHENTICATE, "Bearer")],
                    "this API needs the agent's token (Authorization: Bearer TOKEN); \
                     `--agent auto` reads it from the egress-tracer-api-token Secret\n",
                )
                    .into_response()
            }
        }
    }
}

/// The header a client may carry the token in when a proxy takes `Authorization`.
pub const TOKEN_HEADER: &str = "x-egress-tracer-token";

/// Compares in time independent of where the inputs differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

async fn metrics(State((shared, _)): State<AppState>) -> Response {
    let text = shared.metrics.lock().expect("not poisoned").encode();
    ([(header::CONTENT_TYPE, OPENMETRICS)], text).into_response()
}

async fn readyz(State((shared, _)): State<AppState>) -> Response {
    match shared.not_ready.lock().expect("not poisoned").clone() {
        None => (StatusCode::OK, "ready\n").into_response(),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        )
            .into_response(),
    }
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        "not found; the agent serves /metrics, /healthz, /readyz, \
         /api/v1/flows?namespace=&pod=&hop=&since=&follow= and \
         /api/v1/diagnose?pod=&target=&timeout=&dns_timeout=&upstream_dns=\n",
    )
        .into_response()
}

fn bad_request(reason: impl std::fmt::Display) -> Response {
    let body = serde_json::json!({ "error": reason.to_string() });
    (
        StatusCode::BAD_REQUEST,
        [(header::CONTENT_TYPE, "application/json")],
        format!("{body}\n"),
    )
        .into_response()
}

async fn flows(State((shared, stop)): State<AppState>, RawQuery(raw): RawQuery) -> Response {
    let params: Vec<(String, String)> =
        match serde_urlencoded::from_str(raw.as_deref().unwrap_or("")) {
            Ok(params) => params,
            Err(e) => return bad_request(format!("cannot parse the query string: {e}")),
        };
    let query = match FlowQuery::parse(&params, SystemTime::now()) {
        Ok(query) => query,
        Err(e) => return bad_request(e),
    };
    // A follower holds its place until its stream ends.
    let place = if query.follow {
        let Ok(place) = FOLLOWERS.try_acquire() else {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "{MAX_FOLLOWERS} clients follow this agent's flows already; try again later\n"
                ),
            )
                .into_response();
        };
        Some(place)
    } else {
        None
    };
    let (stored, feed) = shared.store.lock().expect("not poisoned").select(&query);
    let body = match feed {
        None => Body::from(lines(&stored)),
        Some(feed) => {
            let after = stored.last().map(|r| r.seq);
            let history = stream::once(async move { Ok::<_, Infallible>(lines(&stored)) });
            let feed = follow(feed, query, after, stop).map(move |item| {
                let _held = &place;
                item
            });
            Body::from_stream(history.chain(feed))
        }
    };
    ([(header::CONTENT_TYPE, NDJSON)], body).into_response()
}

/// Runs `diagnose` on this node: `pod` (NAMESPACE/NAME) and `target` are required;
/// `timeout`, `dns_timeout` and `upstream_dns` as the command's flags.
async fn diagnose(State((shared, _)): State<AppState>, RawQuery(raw): RawQuery) -> Response {
    let Some(setup) = &shared.diagnose else {
        return (
            StatusCode::FORBIDDEN,
            "diagnose is disabled on this agent (--no-diagnose)\n",
        )
            .into_response();
    };
    let params: Vec<(String, String)> =
        match serde_urlencoded::from_str(raw.as_deref().unwrap_or("")) {
            Ok(params) => params,
            Err(e) => return bad_request(format!("cannot parse the query string: {e}")),
        };
    let request = match diagnose_request(&params, setup) {
        Ok(request) => request,
        Err(reason) => return bad_request(reason),
    };
    // Owned by the diagnosis itself: a client that goes away does not end it, so the
    // next one waits until it has.
    let Ok(permit) = Arc::clone(&setup.running).try_acquire_owned() else {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            "another diagnosis is running on this node; try again when it ends\n",
        )
            .into_response();
    };
    let (reply, cluster) = tokio::sync::oneshot::channel();
    if setup.cluster.send(reply).await.is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "the agent is stopping\n").into_response();
    }
    let Ok(cluster) = cluster.await else {
        return (StatusCode::SERVICE_UNAVAILABLE, "the agent is stopping\n").into_response();
    };
    // The diagnosis holds kernel objects that are not Send: it runs on a thread of its own.
    let deadline = request.deadline();
    let outcome = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            tokio::time::timeout(
                deadline,
                crate::diagnose::examine(&request, cluster, &mut |_| {}),
            )
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "the diagnosis took longer than {} s and was stopped",
                    deadline.as_secs()
                )
            })?
        })
    })
    .await;
    match outcome {
        Ok(Ok(report)) => (
            [(header::CONTENT_TYPE, "application/json")],
            format!("{}\n", serde_json::to_string(&report).unwrap_or_default()),
        )
            .into_response(),
        Ok(Err(error)) if crate::is_usage_or_environment(&error) => {
            bad_request(crate::describe(&error))
        }
        Ok(Err(error)) => {
            let body = serde_json::json!({ "error": crate::describe(&error) });
            (StatusCode::INTERNAL_SERVER_ERROR, format!("{body}\n")).into_response()
        }
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the diagnosis failed: {e}\n"),
        )
            .into_response(),
    }
}

fn diagnose_request(
    params: &[(String, String)],
    setup: &crate::agent::DiagnoseSetup,
) -> Result<crate::diagnose::Request, String> {
    let mut pod = None;
    let mut target = None;
    let mut timeout = std::time::Duration::from_secs(5);
    let mut dns_timeout = std::time::Duration::from_secs(5);
    let mut upstream_dns = None;
    for (key, value) in params {
        match key.as_str() {
            "pod" => pod = Some(value.clone()),
            "target" => target = Some(value.clone()),
            "timeout" => {
                timeout = crate::parse_duration(value).map_err(|e| format!("timeout: {e}"))?
            }
            "dns_timeout" => {
                dns_timeout =
                    crate::parse_duration(value).map_err(|e| format!("dns_timeout: {e}"))?
            }
            "upstream_dns" => {
                upstream_dns = Some(
                    value
                        .parse()
                        .map_err(|_| format!("upstream_dns {value:?} is not an IP address"))?,
                )
            }
            other => {
                return Err(format!(
                    "unknown parameter {other:?}; diagnose takes pod, target, timeout, \
                     dns_timeout and upstream_dns"
                ));
            }
        }
    }
    const LONGEST: std::time::Duration = std::time::Duration::from_secs(60);
    if timeout > LONGEST || dns_timeout > LONGEST {
        return Err(format!("timeouts are limited to {}s", LONGEST.as_secs()));
    }
    Ok(crate::diagnose::Request {
        pod: pod.ok_or("pod (NAMESPACE/NAME) is required")?,
        target: target
            .ok_or_else(|| "target (a URL or HOST:PORT) is required".to_owned())
            .and_then(|target| {
                // Refused before anything runs (a request line split by CR/LF, …).
                egress_tracer::diagnose::target::Target::parse(&target)
                    .map(|_| target)
                    .map_err(|e| e.to_string())
            })?,
        timeout,
        dns_timeout,
        upstream_dns,
        node_name: setup.node_name.clone(),
        btf: setup.btf.clone(),
    })
}

fn lines(records: &[Arc<StoredRecord>]) -> String {
    let mut text = String::new();
    for record in records {
        text.push_str(&record.line());
        text.push('\n');
    }
    text
}

/// The live records `query` selects, newer than `after`, until the agent stops. A client
/// that reads too slowly skips records (the broadcast channel drops them for it alone),
/// and is told how many with a line `{"skipped": N}`.
fn follow(
    feed: broadcast::Receiver<Arc<StoredRecord>>,
    query: FlowQuery,
    after: Option<u64>,
    stop: watch::Receiver<bool>,
) -> impl Stream<Item = Result<String, Infallible>> {
    stream::unfold(
        (feed, query, stop),
        move |(mut feed, query, mut stop)| async move {
            loop {
                let received = tokio::select! {
                    received = feed.recv() => received,
                    _ = stop.wait_for(|stopped| *stopped) => return None,
                };
                match received {
                    Ok(record) if after.is_some_and(|seq| record.seq <= seq) => continue,
                    Ok(record) if query.matches_live(&record) => {
                        return Some((Ok(format!("{}\n", record.line())), (feed, query, stop)));
                    }
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(skipped)) => {
                        let line = format!("{}\n", serde_json::json!({ "skipped": skipped }));
                        return Some((Ok(line), (feed, query, stop)));
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        },
    )
}
