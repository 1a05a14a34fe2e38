//! The cluster model: which pods exist, and which pod a kernel event belongs to.
//!
//! Pods come from `--cluster-state` manifests ([`manifests`]); the kernel names a task
//! by its cgroup id, which [`cgroups::CgroupIndex`] maps to a pod UID through kubelet's
//! cgroup layout ([`cgroup_path`]).

pub mod api;
pub mod cgroup_path;
pub mod cgroups;
pub mod manifests;

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::{IpAddr, SocketAddr},
    path::Path,
};

use k8s_openapi::api::core::v1::{Pod, Service};

use crate::policy::{self, ContainerPort, Policy};

pub use manifests::{LoadError, ManifestWarning};

/// What the tracer needs to know about a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    /// `metadata.uid`; empty when the manifest has none (such a pod cannot be matched to
    /// kernel events).
    pub uid: String,
    pub ips: Vec<IpAddr>,
    pub labels: BTreeMap<String, String>,
    pub host_network: bool,
    pub node_name: Option<String>,
    /// Named container ports (what NetworkPolicies' named ports resolve to).
    pub container_ports: Vec<ContainerPort>,
    /// (runtime container id, container name) from the pod's status.
    pub containers: Vec<(String, String)>,
}

impl PodInfo {
    fn from_pod(pod: Pod) -> Option<Self> {
        let metadata = pod.metadata;
        let status = pod.status.unwrap_or_default();
        let spec = pod.spec.unwrap_or_default();
        let mut ips: Vec<IpAddr> = status
            .pod_ips
            .unwrap_or_default()
            .iter()
            .filter_map(|ip| ip.ip.parse().ok())
            .collect();
        if let Some(ip) = status.pod_ip.and_then(|ip| ip.parse().ok())
            && !ips.contains(&ip)
        {
            ips.insert(0, ip);
        }
        let container_ports = spec
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .filter_map(|p| {
                Some(ContainerPort {
                    name: p.name.clone()?,
                    port: u16::try_from(p.container_port).ok()?,
                    protocol: policy::Protocol::parse(p.protocol.as_deref().unwrap_or("TCP"))?,
                })
            })
            .collect();
        // `containerd://<id>`, `cri-o://<id>`, `docker://<id>`: the id is the cgroup's.
        let containers = status
            .container_statuses
            .iter()
            .flatten()
            .chain(status.init_container_statuses.iter().flatten())
            .filter_map(|c| {
                let (_, id) = c.container_id.as_deref()?.split_once("://")?;
                Some((id.to_owned(), c.name.clone()))
            })
            .collect();
        Some(Self {
            containers,
            container_ports,
            namespace: metadata.namespace.unwrap_or_else(|| "default".to_owned()),
            name: metadata.name?,
            uid: metadata.uid.unwrap_or_default().to_ascii_lowercase(),
            ips,
            labels: metadata.labels.unwrap_or_default(),
            host_network: spec.host_network.unwrap_or(false),
            node_name: spec.node_name,
        })
    }
}

impl PodInfo {
    /// The name of the container with this runtime id.
    pub fn container_name(&self, id: &str) -> Option<&str> {
        self.containers
            .iter()
            .find(|(known, _)| known == id)
            .map(|(_, name)| name.as_str())
    }
}

/// `namespace/name`, the way pods are named on the command line and in records.
impl fmt::Display for PodInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Why `--pod` did not name a known pod.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PodLookupError {
    #[error("--pod must be NAMESPACE/NAME, got {0:?}")]
    BadFormat(String),
    #[error("pod {pod} not found{}", suggestion_text(.suggestions))]
    NotFound {
        pod: String,
        suggestions: Vec<String>,
    },
    #[error(
        "pod {0} has no metadata.uid in the cluster state, so its traffic cannot be recognised"
    )]
    NoUid(String),
}

fn suggestion_text(suggestions: &[String]) -> String {
    if suggestions.is_empty() {
        String::new()
    } else {
        format!("; did you mean: {}?", suggestions.join(", "))
    }
}

/// All pods known to the tracer.
#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    pods: Vec<PodInfo>,
    by_uid: HashMap<String, usize>,
    /// Pod IPs (not hostNetwork pods') to pods.
    by_ip: HashMap<IpAddr, usize>,
    services: Vec<ServiceInfo>,
    /// Service backend addresses to their pods (`ns/name`), from EndpointSlices: pods
    /// of other nodes are known this way.
    backends: HashMap<IpAddr, String>,
    /// Labels of the namespaces known from manifests.
    namespaces: HashMap<String, BTreeMap<String, String>>,
    policies: Vec<Policy>,
}

/// What the tracer needs to know about a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    pub namespace: String,
    pub name: String,
    /// `spec.clusterIPs` (or `clusterIP`); empty for headless Services.
    pub cluster_ips: Vec<IpAddr>,
    /// `spec.ports[].port`.
    pub ports: Vec<u16>,
}

impl ServiceInfo {
    fn from_service(service: Service) -> Option<Self> {
        let spec = service.spec.unwrap_or_default();
        // clusterIPs includes clusterIP when set; older objects have only clusterIP.
        let ips = spec
            .cluster_ips
            .filter(|ips| !ips.is_empty())
            .unwrap_or_else(|| spec.cluster_ip.into_iter().collect());
        let cluster_ips: Vec<IpAddr> = ips.iter().filter_map(|ip| ip.parse().ok()).collect();
        Some(Self {
            namespace: service
                .metadata
                .namespace
                .unwrap_or_else(|| "default".to_owned()),
            name: service.metadata.name?,
            cluster_ips,
            ports: spec
                .ports
                .unwrap_or_default()
                .iter()
                .filter_map(|p| u16::try_from(p.port).ok())
                .collect(),
        })
    }
}

impl fmt::Display for ServiceInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl ClusterState {
    /// Loads `--cluster-state PATH`; returns the per-object problems alongside.
    pub fn load(path: &Path) -> Result<(Self, Vec<ManifestWarning>), LoadError> {
        let mut manifests = manifests::load(path)?;
        let warnings = std::mem::take(&mut manifests.warnings);
        Ok((Self::from_manifests(manifests), warnings))
    }

    /// The state made of loaded objects.
    pub fn from_manifests(manifests: manifests::Manifests) -> Self {
        let mut state = Self::from_pods(manifests.pods);
        state.services = manifests
            .services
            .into_iter()
            .filter_map(ServiceInfo::from_service)
            .collect();
        state.namespaces = manifests
            .namespaces
            .into_iter()
            .filter_map(|ns| Some((ns.metadata.name?, ns.metadata.labels.unwrap_or_default())))
            .collect();
        state.policies = manifests.policies;
        state.backends = manifests
            .endpoint_slices
            .iter()
            .flat_map(|slice| slice.endpoints.iter())
            .filter_map(|endpoint| {
                let target = endpoint
                    .target_ref
                    .as_ref()
                    .filter(|t| t.kind.as_deref() == Some("Pod"))?;
                let pod = format!(
                    "{}/{}",
                    target.namespace.as_deref().unwrap_or("default"),
                    target.name.as_deref()?
                );
                Some(
                    endpoint
                        .addresses
                        .iter()
                        .filter_map(move |a| Some((a.parse().ok()?, pod.clone()))),
                )
            })
            .flatten()
            .collect();
        state
    }

    /// The pod (`ns/name`) behind a Service backend address: a known pod, else the
    /// EndpointSlices' target.
    pub fn backend_pod(&self, ip: IpAddr) -> Option<String> {
        self.pod_by_ip(ip)
            .map(PodInfo::to_string)
            .or_else(|| self.backends.get(&ip).cloned())
    }

    /// Whether `ip` belongs to the cluster: a known pod, a Service's cluster IP or an
    /// EndpointSlice backend.
    pub fn is_cluster_address(&self, ip: IpAddr) -> bool {
        self.by_ip.contains_key(&ip)
            || self.backends.contains_key(&ip)
            || self.services.iter().any(|s| s.cluster_ips.contains(&ip))
    }

    /// The cluster DNS Service (`kube-system/kube-dns`, as CoreDNS is installed on AKS
    /// and by kubeadm), when known.
    pub fn cluster_dns(&self) -> Option<&ServiceInfo> {
        self.services
            .iter()
            .find(|s| s.namespace == "kube-system" && s.name == "kube-dns")
    }

    /// The NetworkPolicies, in the order they were loaded.
    pub fn policies(&self) -> &[Policy] {
        &self.policies
    }

    /// A namespace's labels (with `kubernetes.io/metadata.name`, which every namespace
    /// has, even when its object is unknown).
    pub fn namespace_labels(&self, namespace: &str) -> BTreeMap<String, String> {
        policy::namespace_labels(namespace, self.namespaces.get(namespace))
    }

    /// The Service whose cluster IP and port `dst` is.
    pub fn service_at(&self, dst: SocketAddr) -> Option<&ServiceInfo> {
        self.services
            .iter()
            .find(|s| s.cluster_ips.contains(&dst.ip()) && s.ports.contains(&dst.port()))
    }

    /// The pod with this IP (not hostNetwork pods, which share the node's).
    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&PodInfo> {
        self.by_ip.get(&ip).map(|&i| &self.pods[i])
    }

    pub fn from_pods(pods: impl IntoIterator<Item = Pod>) -> Self {
        let mut state = Self::default();
        for pod in pods.into_iter().filter_map(PodInfo::from_pod) {
            // A later manifest for the same pod replaces the earlier one.
            let existing = state
                .pods
                .iter()
                .position(|p| p.namespace == pod.namespace && p.name == pod.name);
            let index = match existing {
                Some(i) => {
                    state.by_uid.remove(&state.pods[i].uid);
                    state.pods[i] = pod;
                    i
                }
                None => {
                    state.pods.push(pod);
                    state.pods.len() - 1
                }
            };
            if !state.pods[index].uid.is_empty() {
                state.by_uid.insert(state.pods[index].uid.clone(), index);
            }
        }
        state.by_ip = state
            .pods
            .iter()
            .enumerate()
            .filter(|(_, p)| !p.host_network)
            .flat_map(|(i, p)| p.ips.iter().map(move |ip| (*ip, i)))
            .collect();
        state
    }

    pub fn pods(&self) -> &[PodInfo] {
        &self.pods
    }

    pub fn pod_by_uid(&self, uid: &str) -> Option<&PodInfo> {
        self.by_uid.get(uid).map(|&i| &self.pods[i])
    }

    /// Finds `NAMESPACE/NAME`; when absent, suggests the closest known pods.
    pub fn find_pod(&self, reference: &str) -> Result<&PodInfo, PodLookupError> {
        let (namespace, name) = reference
            .split_once('/')
            .filter(|(ns, name)| !ns.is_empty() && !name.is_empty() && !name.contains('/'))
            .ok_or_else(|| PodLookupError::BadFormat(reference.to_owned()))?;
        let pod = self
            .pods
            .iter()
            .find(|p| p.namespace == namespace && p.name == name)
            .ok_or_else(|| PodLookupError::NotFound {
                pod: reference.to_owned(),
                suggestions: self.close_matches(reference),
            })?;
        if pod.uid.is_empty() {
            return Err(PodLookupError::NoUid(reference.to_owned()));
        }
        Ok(pod)
    }

    /// Pods whose name contains the wanted name (a Deployment's pods for its name) or
    /// whose `namespace/name` is a few edits away (typos), best first.
    fn close_matches(&self, reference: &str) -> Vec<String> {
        const MAX_SUGGESTIONS: usize = 5;
        const MIN_SIMILARITY: f64 = 0.7;
        let wanted_name = reference.rsplit('/').next().unwrap_or(reference);
        let mut scored: Vec<(f64, String)> = self
            .pods
            .iter()
            .filter_map(|p| {
                let key = p.to_string();
                let similarity = strsim::normalized_levenshtein(&key, reference);
                let contains = !wanted_name.is_empty() && p.name.contains(wanted_name);
                (contains || similarity >= MIN_SIMILARITY).then_some((similarity, key))
            })
            .collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        scored
            .into_iter()
            .take(MAX_SUGGESTIONS)
            .map(|(_, key)| key)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str, uid: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": ns, "name": name, "uid": uid},
            "status": {"podIP": "10.244.0.7", "podIPs": [{"ip": "10.244.0.7"}, {"ip": "fd00::7"}]}
        }))
        .unwrap()
    }

    fn state() -> ClusterState {
        ClusterState::from_pods([
            pod("shop", "web-7d9f", "6F1C2A3B-4D5E-4F60-8A9B-0C1D2E3F4A5B"),
            pod("shop", "worker", "11111111-2222-3333-4444-555555555555"),
            pod("kube-system", "coredns", ""),
        ])
    }

    #[test]
    fn finds_pods_and_normalises_uids() {
        let s = state();
        let web = s.find_pod("shop/web-7d9f").unwrap();
        assert_eq!(web.uid, "6f1c2a3b-4d5e-4f60-8a9b-0c1d2e3f4a5b");
        assert_eq!(
            web.ips,
            vec![
                "10.244.0.7".parse::<IpAddr>().unwrap(),
                "fd00::7".parse().unwrap()
            ]
        );
        assert_eq!(
            s.pod_by_uid("6f1c2a3b-4d5e-4f60-8a9b-0c1d2e3f4a5b")
                .unwrap()
                .name,
            "web-7d9f"
        );
        assert_eq!(web.to_string(), "shop/web-7d9f");
    }

    #[test]
    fn missing_pod_suggests_close_matches() {
        let err = state().find_pod("shop/web").unwrap_err();
        assert_eq!(
            err,
            PodLookupError::NotFound {
                pod: "shop/web".into(),
                suggestions: vec!["shop/web-7d9f".into()],
            }
        );
        assert_eq!(
            err.to_string(),
            "pod shop/web not found; did you mean: shop/web-7d9f?"
        );
        let typo = state().find_pod("shop/wroker").unwrap_err();
        assert_eq!(
            typo.to_string(),
            "pod shop/wroker not found; did you mean: shop/worker?"
        );
        let far = state().find_pod("billing/zzz").unwrap_err();
        assert_eq!(far.to_string(), "pod billing/zzz not found");
    }

    #[test]
    fn malformed_references() {
        for bad in ["web", "/web", "shop/", "a/b/c"] {
            assert_eq!(
                state().find_pod(bad),
                Err(PodLookupError::BadFormat(bad.into()))
            );
        }
    }

    #[test]
    fn pod_without_uid_cannot_be_traced() {
        assert_eq!(
            state().find_pod("kube-system/coredns"),
            Err(PodLookupError::NoUid("kube-system/coredns".into()))
        );
    }

    #[test]
    fn services_by_cluster_ip_and_port() {
        let dir = std::env::temp_dir().join(format!("cluster-services-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("state.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
             spec: {clusterIP: 10.0.1.10, clusterIPs: [10.0.1.10, 'fd00::10'], ports: [{port: 80}, {port: 443}]}\n\
             ---\napiVersion: v1\nkind: Pod\nmetadata: {name: web-1, namespace: shop, uid: 11111111-2222-3333-4444-555555555555}\n\
             status: {podIP: 10.244.0.11}\n",
        )
        .unwrap();
        let (state, warnings) = ClusterState::load(&dir).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        let service = state.service_at("10.0.1.10:443".parse().unwrap()).unwrap();
        assert_eq!(service.to_string(), "shop/web");
        assert_eq!(service.cluster_ips.len(), 2);
        assert!(state.service_at("[fd00::10]:80".parse().unwrap()).is_some());
        assert!(
            state
                .service_at("10.0.1.10:8080".parse().unwrap())
                .is_none()
        );
        assert_eq!(
            state
                .pod_by_ip("10.244.0.11".parse().unwrap())
                .unwrap()
                .name,
            "web-1"
        );
        assert!(state.pod_by_ip("10.244.0.99".parse().unwrap()).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn later_manifest_replaces_earlier() {
        let s = ClusterState::from_pods([
            pod("a", "p", "11111111-2222-3333-4444-555555555555"),
            pod("a", "p", "66666666-2222-3333-4444-555555555555"),
        ]);
        assert_eq!(s.pods().len(), 1);
        assert_eq!(
            s.find_pod("a/p").unwrap().uid,
            "66666666-2222-3333-4444-555555555555"
        );
    }
}
