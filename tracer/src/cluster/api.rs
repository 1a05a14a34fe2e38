//! The cluster state from the Kubernetes API: kube-rs reflectors (list, then watch;
//! re-list with backoff after errors and on `410 Gone`) over the Pods of this node (field
//! selector on `spec.nodeName`), Namespaces, Services, EndpointSlices and
//! NetworkPolicies. `managedFields` are dropped as objects arrive, to keep the caches
//! small.
//!
//! While any watch fails the state is *stale*: the caches keep their last contents, and
//! [`ClusterApi::is_stale`] says so until the API server lists that kind again (checked
//! every [`PROBE_EVERY`] with a one-item list: a resumed watch announces nothing by
//! itself, and catches up from its last resourceVersion within its retry backoff).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod, Service},
        discovery::v1::EndpointSlice,
        networking::v1::NetworkPolicy,
    },
    serde::de::DeserializeOwned,
};
use kube::{
    Api, Client, Config, Resource, ResourceExt,
    api::ListParams,
    runtime::{
        WatchStreamExt,
        reflector::{self, Store},
        watcher,
    },
};
use tokio::task::JoinHandle;

use super::{ClusterState, manifests::Manifests};
use crate::policy::Policy;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(
        "no Kubernetes configuration found (KUBECONFIG, ~/.kube/config, or the in-cluster service account): {0}"
    )]
    NoConfig(String),
    #[error("cannot reach the Kubernetes API at {server}: {message}")]
    Unreachable { server: String, message: String },
    #[error("the Kubernetes API at {server} did not send the cluster state within {timeout:?}")]
    NotSynced { server: String, timeout: Duration },
}

/// Watches that feed the stores; the state is stale while any of them fails.
const WATCHES: usize = 5;
/// How often a failing watch's kind is listed to see whether the server is back.
pub const PROBE_EVERY: Duration = Duration::from_secs(2);

/// Live caches of the cluster objects the tracer uses.
pub struct ClusterApi {
    server: String,
    pods: Store<Pod>,
    namespaces: Store<Namespace>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    policies: Store<NetworkPolicy>,
    failing: Arc<[AtomicBool; WATCHES]>,
    tasks: Vec<JoinHandle<()>>,
}

impl ClusterApi {
    /// The configuration kubectl would use: `KUBECONFIG`, `~/.kube/config`, or the
    /// in-cluster service account.
    pub async fn infer_config() -> Result<Config, ApiError> {
        Config::infer()
            .await
            .map_err(|e| ApiError::NoConfig(e.to_string()))
    }

    /// Connects (checking that the server answers) and starts the watches. `node_name`
    /// limits Pods to that node's.
    pub async fn connect(config: Config, node_name: Option<&str>) -> Result<Self, ApiError> {
        let server = config.cluster_url.to_string();
        let unreachable = |message: String| ApiError::Unreachable {
            server: server.clone(),
            message,
        };
        let client = Client::try_from(config).map_err(|e| unreachable(e.to_string()))?;
        client
            .apiserver_version()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let failing: Arc<[AtomicBool; WATCHES]> = Arc::new(Default::default());
        let mut tasks = Vec::new();
        let pods_config = match node_name {
            Some(node) => watcher::Config::default().fields(&format!("spec.nodeName={node}")),
            None => watcher::Config::default(),
        };
        let pods = watch(
            Api::all(client.clone()),
            pods_config,
            &failing,
            0,
            &mut tasks,
        );
        let namespaces = watch(
            Api::all(client.clone()),
            watcher::Config::default(),
            &failing,
            1,
            &mut tasks,
        );
        let services = watch(
            Api::all(client.clone()),
            watcher::Config::default(),
            &failing,
            2,
            &mut tasks,
        );
        let slices = watch(
            Api::all(client.clone()),
            watcher::Config::default(),
            &failing,
            3,
            &mut tasks,
        );
        let policies = watch(
            Api::all(client),
            watcher::Config::default(),
            &failing,
            4,
            &mut tasks,
        );
        Ok(Self {
            server,
            pods,
            namespaces,
            services,
            slices,
            policies,
            failing,
            tasks,
        })
    }

    /// The API server's address.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// Waits until every cache has its first complete list.
    pub async fn wait_synced(&self, timeout: Duration) -> Result<(), ApiError> {
        let all = async {
            let _ = self.pods.wait_until_ready().await;
            let _ = self.namespaces.wait_until_ready().await;
            let _ = self.services.wait_until_ready().await;
            let _ = self.slices.wait_until_ready().await;
            let _ = self.policies.wait_until_ready().await;
        };
        tokio::time::timeout(timeout, all)
            .await
            .map_err(|_| ApiError::NotSynced {
                server: self.server.clone(),
                timeout,
            })
    }

    /// Whether a watch is failing, so the caches may be out of date.
    pub fn is_stale(&self) -> bool {
        self.failing.iter().any(|f| f.load(Ordering::Relaxed))
    }

    /// The current contents of the caches as a cluster state; invalid NetworkPolicies are
    /// left out and described in the returned warnings.
    pub fn state(&self) -> (ClusterState, Vec<String>) {
        let mut warnings = Vec::new();
        let policies = self
            .policies
            .state()
            .iter()
            .filter_map(|policy| match Policy::from_k8s(policy) {
                Ok(policy) => Some(policy),
                Err(message) => {
                    warnings.push(format!(
                        "NetworkPolicy {}/{}: {message}",
                        policy.namespace().unwrap_or_default(),
                        policy.name_any()
                    ));
                    None
                }
            })
            .collect();
        let manifests = Manifests {
            pods: cloned(&self.pods),
            services: cloned(&self.services),
            namespaces: cloned(&self.namespaces),
            endpoint_slices: cloned(&self.slices),
            policies,
            warnings: Vec::new(),
        };
        (ClusterState::from_manifests(manifests), warnings)
    }
}

impl Drop for ClusterApi {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn cloned<K>(store: &Store<K>) -> Vec<K>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    store
        .state()
        .iter()
        .map(|object| (**object).clone())
        .collect()
}

/// Starts a reflector for `K`; its task marks watch `index` failing while errors come.
fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    failing: &Arc<[AtomicBool; WATCHES]>,
    index: usize,
    tasks: &mut Vec<JoinHandle<()>>,
) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (store, writer) = reflector::store();
    let probe = api.clone();
    let stream = watcher(api, config)
        .default_backoff()
        .modify(|object: &mut K| object.managed_fields_mut().clear())
        .reflect(writer);
    let failing_watch = Arc::clone(failing);
    tasks.push(tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            failing_watch[index].store(event.is_err(), Ordering::Relaxed);
        }
    }));
    let failing = Arc::clone(failing);
    tasks.push(tokio::spawn(async move {
        loop {
            tokio::time::sleep(PROBE_EVERY).await;
            if failing[index].load(Ordering::Relaxed)
                && probe
                    .list_metadata(&ListParams::default().limit(1))
                    .await
                    .is_ok()
            {
                failing[index].store(false, Ordering::Relaxed);
            }
        }
    }));
    store
}
