//! Recognises the cgroup paths kubelet creates for pods and containers.
//!
//! Both cgroup drivers and the common runtimes are handled, anywhere below a `kubepods`
//! ancestor (so nested layouts such as kind's `kubelet.slice/kubelet-kubepods.slice` or a
//! test parent work too):
//!
//! ```text
//! systemd:  …/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope
//!           …/kubepods.slice/kubepods-pod<uid>.slice/crio-<id>.scope              (Guaranteed QoS)
//! cgroupfs: …/kubepods/besteffort/pod<uid>/<id>
//!           …/kubepods/pod<uid>/crio-<id>
//! ```

/// What a kubepods cgroup path says about the pod and container it belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodCgroup {
    /// The pod's `metadata.uid`, lowercase with dashes.
    pub pod_uid: String,
    pub qos: QosClass,
    pub driver: CgroupDriver,
    /// `None` for the pod-level cgroup itself.
    pub container: Option<ContainerCgroup>,
}

/// A container's cgroup below its pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerCgroup {
    pub runtime: Runtime,
    /// The runtime's container id (64 hex digits with the usual runtimes).
    pub id: String,
    /// CRI-O's per-container monitor (`crio-conmon-<id>`), not the workload itself.
    pub is_monitor: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupDriver {
    Systemd,
    Cgroupfs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    Containerd,
    CriO,
    Docker,
    /// A bare id, as the cgroupfs driver writes for containerd and Docker.
    Unspecified,
}

/// Parses a cgroup path (absolute or relative to the cgroup v2 root). Returns `None` for
/// anything that is not a pod or container cgroup.
pub fn parse(path: &str) -> Option<PodCgroup> {
    let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    let kubepods = components.iter().position(|c| is_kubepods_root(c))?;
    let rest = &components[kubepods + 1..];
    let (pod_index, pod_uid, driver) = rest
        .iter()
        .enumerate()
        .find_map(|(i, c)| pod_uid_of(c).map(|(uid, driver)| (i, uid, driver)))?;
    let qos = qos_of(&rest[..=pod_index]);
    // Deeper cgroups belong to something a container created itself: keep the container
    // they live in.
    let container = rest.get(pod_index + 1).map(|name| container_of(name));
    Some(PodCgroup {
        pod_uid,
        qos,
        driver,
        container,
    })
}

/// Whether a cgroup directory name is one kubelet keeps all its pods below.
pub fn is_kubepods_root(component: &str) -> bool {
    component == "kubepods"
        || component == "kubepods.slice"
        || component.ends_with("-kubepods.slice")
}

fn pod_uid_of(component: &str) -> Option<(String, CgroupDriver)> {
    if let Some(unit) = component.strip_suffix(".slice") {
        let (_, uid) = unit.rsplit_once("-pod")?;
        let uid = uid.replace('_', "-");
        return is_uid(&uid).then_some((uid, CgroupDriver::Systemd));
    }
    let uid = component.strip_prefix("pod")?;
    is_uid(uid).then(|| (uid.to_ascii_lowercase(), CgroupDriver::Cgroupfs))
}

/// A Kubernetes UID: an RFC 4122 UUID in its 8-4-4-4-12 text form.
fn is_uid(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, len)| g.len() == len && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn qos_of(components: &[&str]) -> QosClass {
    let joined = components.join("/");
    if joined.contains("besteffort") {
        QosClass::BestEffort
    } else if joined.contains("burstable") {
        QosClass::Burstable
    } else {
        QosClass::Guaranteed
    }
}

/// The container a cgroup below the pod's is for. Runtimes name it `<prefix>-<id>.scope`
/// (systemd driver) or `<id>` (cgroupfs driver); an unusual name is kept as the id rather
/// than losing the pod.
fn container_of(component: &str) -> ContainerCgroup {
    let name = component.strip_suffix(".scope").unwrap_or(component);
    let (runtime, is_monitor, id) = if let Some(id) = name.strip_prefix("cri-containerd-") {
        (Runtime::Containerd, false, id)
    } else if let Some(id) = name.strip_prefix("crio-conmon-") {
        (Runtime::CriO, true, id)
    } else if let Some(id) = name.strip_prefix("crio-") {
        (Runtime::CriO, false, id)
    } else if let Some(id) = name.strip_prefix("docker-") {
        (Runtime::Docker, false, id)
    } else {
        (Runtime::Unspecified, false, name)
    };
    ContainerCgroup {
        runtime,
        id: id.to_owned(),
        is_monitor,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "6f1c2a3b-4d5e-4f60-8a9b-0c1d2e3f4a5b";
    const UID_SYSTEMD: &str = "6f1c2a3b_4d5e_4f60_8a9b_0c1d2e3f4a5b";
    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn container(runtime: Runtime) -> Option<ContainerCgroup> {
        Some(ContainerCgroup {
            runtime,
            id: ID.to_owned(),
            is_monitor: false,
        })
    }

    #[test]
    fn systemd_containerd_besteffort() {
        let path = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_SYSTEMD}.slice/cri-containerd-{ID}.scope"
        );
        assert_eq!(
            parse(&path),
            Some(PodCgroup {
                pod_uid: UID.to_owned(),
                qos: QosClass::BestEffort,
                driver: CgroupDriver::Systemd,
                container: container(Runtime::Containerd),
            })
        );
    }

    #[test]
    fn systemd_crio_burstable() {
        let path = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice/crio-{ID}.scope"
        );
        let parsed = parse(&path).unwrap();
        assert_eq!(parsed.qos, QosClass::Burstable);
        assert_eq!(parsed.container, container(Runtime::CriO));
    }

    #[test]
    fn systemd_guaranteed_has_no_qos_slice() {
        let path =
            format!("/kubepods.slice/kubepods-pod{UID_SYSTEMD}.slice/cri-containerd-{ID}.scope");
        let parsed = parse(&path).unwrap();
        assert_eq!(parsed.pod_uid, UID);
        assert_eq!(parsed.qos, QosClass::Guaranteed);
    }

    #[test]
    fn crio_conmon_is_a_monitor() {
        let path = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice/crio-conmon-{ID}.scope"
        );
        let parsed = parse(&path).unwrap();
        let c = parsed.container.unwrap();
        assert_eq!(
            (c.runtime, c.is_monitor, c.id.as_str()),
            (Runtime::CriO, true, ID)
        );
    }

    #[test]
    fn cgroupfs_containerd() {
        let path = format!("/kubepods/besteffort/pod{UID}/{ID}");
        assert_eq!(
            parse(&path),
            Some(PodCgroup {
                pod_uid: UID.to_owned(),
                qos: QosClass::BestEffort,
                driver: CgroupDriver::Cgroupfs,
                container: container(Runtime::Unspecified),
            })
        );
    }

    #[test]
    fn cgroupfs_crio_guaranteed() {
        let path = format!("/kubepods/pod{UID}/crio-{ID}");
        let parsed = parse(&path).unwrap();
        assert_eq!(parsed.qos, QosClass::Guaranteed);
        assert_eq!(parsed.driver, CgroupDriver::Cgroupfs);
        assert_eq!(parsed.container, container(Runtime::CriO));
    }

    #[test]
    fn docker_scope() {
        let path = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice/docker-{ID}.scope"
        );
        assert_eq!(parse(&path).unwrap().container, container(Runtime::Docker));
    }

    #[test]
    fn pod_level_cgroup_has_no_container() {
        let path = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_SYSTEMD}.slice"
        );
        let parsed = parse(&path).unwrap();
        assert_eq!(parsed.pod_uid, UID);
        assert_eq!(parsed.container, None);
    }

    #[test]
    fn nested_under_a_parent_and_kind_layout() {
        let lab = format!(
            "/lab-1234.slice/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_SYSTEMD}.slice/cri-containerd-{ID}.scope"
        );
        assert_eq!(parse(&lab).unwrap().pod_uid, UID);
        let kind = format!(
            "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_SYSTEMD}.slice/cri-containerd-{ID}.scope"
        );
        assert_eq!(parse(&kind).unwrap().qos, QosClass::BestEffort);
    }

    #[test]
    fn cgroup_inside_a_container_keeps_the_container() {
        let path = format!("/kubepods/burstable/pod{UID}/{ID}/init.scope");
        assert_eq!(
            parse(&path).unwrap().container,
            container(Runtime::Unspecified)
        );
    }

    #[test]
    fn unusual_container_names_keep_the_pod() {
        let parsed = parse(&format!("/kubepods/besteffort/pod{UID}/ctr1")).unwrap();
        assert_eq!(parsed.pod_uid, UID);
        assert_eq!(
            parsed.container,
            Some(ContainerCgroup {
                runtime: Runtime::Unspecified,
                id: "ctr1".into(),
                is_monitor: false
            })
        );
    }

    #[test]
    fn not_pods() {
        for path in [
            "/",
            "/system.slice/containerd.service",
            "/user.slice/user-0.slice/session-1.scope",
            "/kubepods.slice",
            "/kubepods.slice/kubepods-besteffort.slice",
            // A pod-like name outside kubepods.
            &format!("/system.slice/pod{UID}"),
            // Malformed UIDs.
            "/kubepods/besteffort/pod1234/abc",
            &format!("/kubepods.slice/kubepods-pod{UID_SYSTEMD}x.slice"),
        ] {
            assert_eq!(parse(path), None, "{path}");
        }
    }
}
