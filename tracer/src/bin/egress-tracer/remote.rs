//! `trace --agent` and `diagnose --agent`: the same commands served by a running agent,
//! reached directly by URL or, with `auto`, through the Kubernetes API server's
//! `pods/proxy` to the agent pod on the target pod's node (what a user on a laptop with
//! kubectl access has).

use std::time::Duration;

use anyhow::{Context, bail};
use bytes::{Buf, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use http_body_util::BodyExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client, Config, api::ListParams, client::Body};

use crate::{UsageError, diagnose};

/// Label the agent's pods carry (deploy/daemonset.yaml).
const AGENT_SELECTOR: &str = "app.kubernetes.io/name=egress-tracer";
/// The agent's HTTP port (its --listen in deploy/daemonset.yaml).
const AGENT_PORT: u16 = 9090;
/// Longest wait for a diagnosis: the checks' own timeouts bound it well below this.
const DIAGNOSE_WAIT: Duration = Duration::from_secs(120);

/// An agent to ask.
pub struct AgentClient {
    client: Client,
    /// Path prefix before the agent's own paths (the API server's proxy path, if any).
    prefix: String,
    /// For messages: where the agent is.
    describe: String,
    /// The agent's API token, if known.
    token: Option<String>,
}

/// The Secret that holds the agents' API token (deploy/README.md).
const TOKEN_SECRET: &str = "egress-tracer-api-token";

impl AgentClient {
    /// `agent`: the agent's URL, or `auto` to find the agent on `pod`'s node through the
    /// Kubernetes API (`pod` as NAMESPACE/NAME; `agent_namespace` where the agent runs).
    pub async fn new(location: &crate::AgentLocation, pod: Option<&str>) -> anyhow::Result<Self> {
        let agent = location.agent.as_deref().unwrap_or("auto");
        let agent_namespace = location.agent_namespace.as_str();
        let token = match &location.agent_token_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| {
                        format!("cannot read the agent token from {}", path.display())
                    })?
                    .trim()
                    .to_owned(),
            ),
            None => None,
        };
        if agent != "auto" {
            let url: http::Uri = agent.parse().map_err(|e| {
                UsageError(format!(
                    "--agent {agent:?} is not a URL ({e}); give http://HOST:PORT or auto"
                ))
            })?;
            let client = Client::try_from(Config::new(url))
                .with_context(|| format!("cannot make an HTTP client for {agent}"))?;
            return Ok(Self {
                client,
                prefix: String::new(),
                describe: agent.to_owned(),
                token,
            });
        }
        let Some(pod) = pod else {
            return Err(UsageError(
                "--agent auto finds the agent on the pod's node: give --pod NAMESPACE/NAME, or \
                 the agent's URL"
                    .into(),
            )
            .into());
        };
        let (namespace, name) = pod
            .split_once('/')
            .ok_or_else(|| UsageError(format!("--pod {pod:?} must be NAMESPACE/NAME")))?;
        let config = Config::infer().await.map_err(|e| {
            UsageError(format!(
                "--agent auto needs the Kubernetes API (a kubeconfig, as kubectl uses): {e}"
            ))
        })?;
        let client = Client::try_from(config).context("cannot connect to the Kubernetes API")?;
        let target = Api::<Pod>::namespaced(client.clone(), namespace)
            .get(name)
            .await
            .with_context(|| format!("cannot get pod {pod}"))?;
        let node = target
            .spec
            .and_then(|spec| spec.node_name)
            .ok_or_else(|| UsageError(format!("pod {pod} is not scheduled on a node yet")))?;
        let agents = Api::<Pod>::namespaced(client.clone(), agent_namespace)
            .list(
                &ListParams::default()
                    .labels(AGENT_SELECTOR)
                    .fields(&format!("spec.nodeName={node}")),
            )
            .await
            .with_context(|| {
                format!("cannot list the agent pods in namespace {agent_namespace}")
            })?;
        let running = agents.items.into_iter().find(|agent| {
            agent
                .status
                .as_ref()
                .and_then(|status| status.phase.as_deref())
                == Some("Running")
        });
        let Some(agent) = running.and_then(|agent| agent.metadata.name) else {
            bail!(
                "no running egress-tracer agent on node {node} (pods labelled {AGENT_SELECTOR} \
                 in namespace {agent_namespace}; see deploy/, or --agent-namespace)"
            );
        };
        let token = match token {
            Some(token) => Some(token),
            None => secret_token(&client, agent_namespace).await,
        };
        Ok(Self {
            token,
            client,
            prefix: format!("/api/v1/namespaces/{agent_namespace}/pods/{agent}:{AGENT_PORT}/proxy"),
            describe: format!("agent {agent_namespace}/{agent} on node {node}"),
        })
    }

    /// The records the agent's flows API streams for `query` (without `follow`, which this
    /// adds), as NDJSON lines.
    pub async fn follow_flows(
        &self,
        query: &[(&str, &str)],
    ) -> anyhow::Result<impl Stream<Item = anyhow::Result<String>> + use<>> {
        let mut params = query.to_vec();
        params.push(("follow", "true"));
        let body = self.get("/api/v1/flows", &params).await?;
        Ok(ndjson_lines(body.into_data_stream()))
    }

    /// Asks the agent to run the checklist on its node.
    pub async fn diagnose(&self, request: &diagnose::Request) -> anyhow::Result<diagnose::Report> {
        let timeout = humantime::format_duration(request.timeout).to_string();
        let dns_timeout = humantime::format_duration(request.dns_timeout).to_string();
        let upstream = request.upstream_dns.map(|ip| ip.to_string());
        let mut params = vec![
            ("pod", request.pod.as_str()),
            ("target", request.target.as_str()),
            ("timeout", &timeout),
            ("dns_timeout", &dns_timeout),
        ];
        if let Some(upstream) = &upstream {
            params.push(("upstream_dns", upstream));
        }
        let body = tokio::time::timeout(DIAGNOSE_WAIT, async {
            let body = self.get("/api/v1/diagnose", &params).await?;
            Ok::<_, anyhow::Error>(body.collect().await?.to_bytes())
        })
        .await
        .with_context(|| format!("{} did not answer within {DIAGNOSE_WAIT:?}", self.describe))??;
        serde_json::from_slice(&body)
            .with_context(|| format!("{} sent an unexpected diagnosis", self.describe))
    }

    async fn get(&self, path: &str, params: &[(&str, &str)]) -> anyhow::Result<Body> {
        let query = serde_urlencoded::to_string(params).context("cannot encode the query")?;
        let uri = format!("{}{path}?{query}", self.prefix);
        let mut request = http::Request::get(&uri);
        if let Some(token) = &self.token {
            // Not `Authorization`: through the API server, that header is the user's own.
            request = request.header(crate::http::TOKEN_HEADER, token);
        }
        let request = request
            .body(Body::empty())
            .context("cannot build the request")?;
        let response = self
            .client
            .send(request)
            .await
            .with_context(|| format!("cannot reach {}", self.describe))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response.into_body());
        }
        let body = response.into_body().collect().await?.to_bytes();
        let reason = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| {
                v["error"]
                    .as_str()
                    .or(v["message"].as_str())
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_owned());
        if status == http::StatusCode::BAD_REQUEST {
            return Err(
                UsageError(format!("{} refused the request: {reason}", self.describe)).into(),
            );
        }
        bail!("{} answered {status}: {reason}", self.describe)
    }
}

/// The agents' API token from their Secret, when the user may read it.
async fn secret_token(client: &Client, namespace: &str) -> Option<String> {
    let secret = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), namespace)
        .get(TOKEN_SECRET)
        .await
        .ok()?;
    let token = secret.data?.get("token")?.0.clone();
    String::from_utf8(token).ok().map(|t| t.trim().to_owned())
}

/// Splits a byte stream into lines (without the newline).
fn ndjson_lines<E: std::error::Error + Send + Sync + 'static>(
    chunks: impl Stream<Item = Result<Bytes, E>> + Unpin,
) -> impl Stream<Item = anyhow::Result<String>> {
    futures::stream::unfold(
        (chunks, BytesMut::new(), false),
        |(mut chunks, mut buffer, mut ended)| async move {
            loop {
                if let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                    let line = buffer.split_to(end + 1);
                    let text = String::from_utf8_lossy(&line[..end]).into_owned();
                    return Some((Ok(text), (chunks, buffer, ended)));
                }
                if ended {
                    if buffer.has_remaining() {
                        let text = String::from_utf8_lossy(&buffer.split()).into_owned();
                        return Some((Ok(text), (chunks, buffer, ended)));
                    }
                    return None;
                }
                match chunks.next().await {
                    Some(Ok(chunk)) => buffer.extend_from_slice(&chunk),
                    Some(Err(e)) => {
                        ended = true;
                        return Some((
                            Err(anyhow::Error::new(e).context("the agent's stream broke")),
                            (chunks, buffer, ended),
                        ));
                    }
                    None => ended = true,
                }
            }
        },
    )
}
