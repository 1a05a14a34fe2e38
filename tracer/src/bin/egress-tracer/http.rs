//! The agent's HTTP API: `/metrics`, `/healthz`, `/readyz` and `/api/v1/flows`.

use std::{convert::Infallible, sync::Arc, time::SystemTime};

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
use tokio::sync::{broadcast, watch};

use crate::agent::Shared;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const NDJSON: &str = "application/x-ndjson";

/// Serves until `stop` turns true; follow streams end then too.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let router = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/api/v1/flows", get(flows))
        .fallback(not_found)
        .with_state((shared, stop.clone()));
    let mut stop = stop;
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|stopped| *stopped).await;
        })
        .await
}

type AppState = (Arc<Shared>, watch::Receiver<bool>);

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
        "not found; the agent serves /metrics, /healthz, /readyz and \
         /api/v1/flows?namespace=&pod=&hop=&since=&follow=\n",
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
    let (stored, feed) = shared.store.lock().expect("not poisoned").select(&query);
    let body = match feed {
        None => Body::from(lines(&stored)),
        Some(feed) => {
            let after = stored.last().map(|r| r.seq);
            let history = stream::once(async move { Ok::<_, Infallible>(lines(&stored)) });
            Body::from_stream(history.chain(follow(feed, query, after, stop)))
        }
    };
    ([(header::CONTENT_TYPE, NDJSON)], body).into_response()
}

fn lines(records: &[Arc<StoredRecord>]) -> String {
    let mut text = String::with_capacity(records.iter().map(|r| r.line.len() + 1).sum());
    for record in records {
        text.push_str(&record.line);
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
                    Ok(record) if query.matches(&record) => {
                        return Some((Ok(format!("{}\n", record.line)), (feed, query, stop)));
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
