//! Where the cluster state comes from: `--cluster-state` files, or the Kubernetes API
//! (kubeconfig resolved as kubectl does), or, for a node-wide trace with neither, nothing.

use std::{collections::HashSet, path::Path, time::Duration};

use anyhow::Context;
use egress_tracer::cluster::{ClusterState, api::ClusterApi};

use crate::UsageError;

/// How long the API may take to send the first complete state.
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);

pub enum ClusterSource {
    Files,
    Api {
        api: ClusterApi,
        was_stale: bool,
        warned: HashSet<String>,
    },
    None,
}

/// `required`: what needs the cluster state, for the error when there is none (`None`
/// allows running without it).
pub async fn open(
    files: Option<&Path>,
    node_name: Option<&str>,
    required: Option<&str>,
) -> anyhow::Result<(ClusterState, ClusterSource)> {
    if let Some(path) = files {
        let (state, warnings) = ClusterState::load(path)?;
        for warning in warnings {
            eprintln!("warning: skipped {warning}");
        }
        return Ok((state, ClusterSource::Files));
    }
    let config = match ClusterApi::infer_config().await {
        Ok(config) => config,
        Err(e) => {
            if let Some(what) = required {
                return Err(UsageError(format!(
                    "{what} needs the cluster state: pass --cluster-state PATH (for example \
                     `kubectl get pods,services,namespaces,networkpolicies -A -o yaml > state.yaml`) \
                     or make a Kubernetes configuration available ({e})"
                ))
                .into());
            }
            eprintln!(
                "warning: no --cluster-state and no Kubernetes configuration: pods are shown by \
                 UID only, without names or NetworkPolicies"
            );
            return Ok((ClusterState::default(), ClusterSource::None));
        }
    };
    let api = ClusterApi::connect(config, node_name).await?;
    api.wait_synced(SYNC_TIMEOUT)
        .await
        .context("pass --cluster-state PATH to work from files instead")?;
    let mut source = ClusterSource::from_api(api);
    let state = source.refresh().unwrap_or_default();
    Ok((state, source))
}

impl ClusterSource {
    /// A source of the API's state (synced).
    pub fn from_api(api: ClusterApi) -> Self {
        ClusterSource::Api {
            api,
            was_stale: false,
            warned: HashSet::new(),
        }
    }

    /// Whether the API's state may be out of date.
    pub fn is_stale(&self) -> bool {
        matches!(self, ClusterSource::Api { api, .. } if api.is_stale())
    }

    /// The API's latest state (warning once about invalid objects, and when the API
    /// becomes unreachable or comes back); `None` for the other sources.
    pub fn refresh(&mut self) -> Option<ClusterState> {
        let ClusterSource::Api {
            api,
            was_stale,
            warned,
        } = self
        else {
            return None;
        };
        let stale = api.is_stale();
        if stale != *was_stale {
            if stale {
                eprintln!(
                    "warning: the Kubernetes API at {} is unreachable; using the last known cluster state",
                    api.server()
                );
            } else {
                eprintln!(
                    "egress-tracer: the Kubernetes API at {} is reachable again",
                    api.server()
                );
            }
            *was_stale = stale;
        }
        let (state, warnings) = api.state();
        for warning in warnings {
            if warned.insert(warning.clone()) {
                eprintln!("warning: skipped {warning}");
            }
        }
        Some(state)
    }
}

/// This node's name: `--node-name`, else `NODE_NAME` (the downward API in the
/// DaemonSet), else the host name (kubelet's default node name).
pub fn node_name(flag: Option<&str>) -> Option<String> {
    flag.map(str::to_owned).or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|name| name.trim().to_owned())
            .filter(|name| !name.is_empty())
    })
}
