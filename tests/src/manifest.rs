//! Pod manifests as `kubectl get pod -o json` prints them, for the tracer's
//! `--cluster-state`.

use std::net::{Ipv4Addr, Ipv6Addr};

use serde_json::{Map, Value, json};

use crate::LabPod;

/// A ClusterIP Service and its EndpointSlice, as a kubectl `List`.
pub fn service_manifests(
    namespace: &str,
    name: &str,
    cluster_ip: Ipv4Addr,
    port: u16,
    backend: &LabPod,
    target_port: u16,
) -> String {
    let list = json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {
                    "type": "ClusterIP",
                    "clusterIP": cluster_ip.to_string(),
                    "clusterIPs": [cluster_ip.to_string()],
                    "ports": [{"port": port, "targetPort": target_port, "protocol": "TCP"}],
                },
            },
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": format!("{name}-lab"),
                    "namespace": namespace,
                    "labels": {"kubernetes.io/service-name": name},
                },
                "addressType": "IPv4",
                "endpoints": [{
                    "addresses": [backend.ip.to_string()],
                    "targetRef": {"kind": "Pod", "name": backend.name, "namespace": backend.namespace},
                }],
                "ports": [{"port": target_port, "protocol": "TCP"}],
            },
        ],
    });
    serde_json::to_string_pretty(&list).expect("a JSON value serialises")
}

/// The cluster DNS Service, as a cluster has it (`kube-system/kube-dns`).
pub fn cluster_dns_service(cluster_ip: Ipv4Addr) -> String {
    let service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": {"k8s-app": "kube-dns"}},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ip.to_string(),
            "clusterIPs": [cluster_ip.to_string()],
            "ports": [
                {"name": "dns", "port": 53, "protocol": "UDP"},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
            ],
        },
    });
    serde_json::to_string_pretty(&service).expect("a JSON value serialises")
}

pub struct PodManifest<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
    pub labels: &'a [(String, String)],
    pub ip: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub node_name: &'a str,
    pub container_id: &'a str,
}

impl PodManifest<'_> {
    pub fn to_json(&self) -> String {
        let labels: Map<String, Value> = self
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        let pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "uid": self.uid,
                "labels": labels,
            },
            "spec": {
                "nodeName": self.node_name,
                "containers": [{"name": self.name, "image": "lab/sleep:1"}],
            },
            "status": {
                "phase": "Running",
                "podIP": self.ip.to_string(),
                "podIPs": [{"ip": self.ip.to_string()}, {"ip": self.ipv6.to_string()}],
                "containerStatuses": [{
                    "name": self.name,
                    "containerID": format!("containerd://{}", self.container_id),
                    "ready": true,
                    "restartCount": 0,
                    "image": "lab/sleep:1",
                    "imageID": "",
                }],
            },
        });
        serde_json::to_string_pretty(&pod).expect("a JSON value serialises")
    }
}
