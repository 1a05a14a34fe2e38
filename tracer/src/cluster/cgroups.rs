//! Maps cgroup v2 ids (what `bpf_get_current_cgroup_id` returns) to pod cgroups.
//!
//! A cgroup v2 id is the inode number of the cgroup's directory, so the index walks the
//! cgroup2 mount once and rebuilds itself when it meets an id it does not know (a new
//! container), at most once per [`RESCAN_INTERVAL`]. Its size is the number of cgroups on
//! the node, whatever the traffic.

use std::{
    collections::{HashMap, HashSet},
    fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use super::cgroup_path::{self, PodCgroup};

/// Minimum time between two walks of the cgroup tree.
pub const RESCAN_INTERVAL: Duration = Duration::from_millis(250);
/// Kubelet layouts are at most ~6 levels deep; the bound protects against odd hosts.
const MAX_DEPTH: usize = 24;

pub struct CgroupIndex {
    root: PathBuf,
    pods: HashMap<u64, PodCgroup>,
    /// Directories of the pod cgroups, relative to `root`.
    paths: HashMap<u64, String>,
    /// Network namespace inodes of pods (by UID), found from their processes; refreshed
    /// with the index.
    netns: HashMap<u64, String>,
    known: HashSet<u64>,
    last_scan: Option<Instant>,
}

impl CgroupIndex {
    /// An index over the cgroup v2 hierarchy mounted at `root`, scanned once now.
    pub fn new(root: PathBuf) -> io::Result<Self> {
        let mut index = Self {
            root,
            pods: HashMap::new(),
            paths: HashMap::new(),
            netns: HashMap::new(),
            known: HashSet::new(),
            last_scan: None,
        };
        index.rescan()?;
        Ok(index)
    }

    /// The pod cgroup with this id, rescanning if the id is new to the index.
    pub fn lookup(&mut self, cgroup_id: u64) -> Option<&PodCgroup> {
        if !self.known.contains(&cgroup_id) && self.may_rescan() {
            // An unreadable tree leaves the previous index in place.
            let _ = self.rescan();
        }
        self.pods.get(&cgroup_id)
    }

    /// Ids of every cgroup of the pod with this UID, after a rescan if one is due (so
    /// containers started since are included).
    pub fn cgroups_of_pod(&mut self, pod_uid: &str) -> Vec<u64> {
        if self.may_rescan() {
            let _ = self.rescan();
        }
        self.pods
            .iter()
            .filter(|(_, pod)| pod.pod_uid == pod_uid)
            .map(|(id, _)| *id)
            .collect()
    }

    /// The UID of the pod whose network namespace has this inode, looking at one process
    /// of each pod container (rescanning if the namespace is new to the index).
    pub fn pod_of_netns(&mut self, inode: u64) -> Option<&str> {
        if !self.netns.contains_key(&inode) && self.may_rescan() {
            let _ = self.rescan();
        }
        if !self.netns.contains_key(&inode) {
            self.learn_netns();
        }
        self.netns.get(&inode).map(String::as_str)
    }

    /// A running process of one of the pod's containers, with that container's cgroup
    /// directory (absolute): where a probe joins the pod, as `kubectl exec` would.
    /// `status_ids` are the runtime ids of the pod's containers from its status, in order:
    /// only those are taken, so never the pod's sandbox (whose `pause` process has no
    /// resolv.conf of the pod's and an empty environment). Without them, any container but
    /// one whose process is `pause`.
    pub fn container_process(
        &mut self,
        pod_uid: &str,
        status_ids: &[&str],
    ) -> Option<(PathBuf, u32)> {
        if self.may_rescan() {
            let _ = self.rescan();
        }
        let mut containers: Vec<(usize, u64)> = self
            .pods
            .iter()
            .filter(|(_, pod)| pod.pod_uid == pod_uid)
            .filter_map(|(cgroup_id, pod)| {
                let container = pod.container.as_ref().filter(|c| !c.is_monitor)?;
                let rank = match status_ids.iter().position(|id| *id == container.id) {
                    Some(rank) => rank,
                    None if status_ids.is_empty() => 0,
                    None => return None,
                };
                Some((rank, *cgroup_id))
            })
            .collect();
        containers.sort_unstable();
        containers.into_iter().find_map(|(_, id)| {
            let dir = self.root.join(self.paths.get(&id)?.trim_start_matches('/'));
            let pid: u32 = fs::read_to_string(dir.join("cgroup.procs"))
                .ok()?
                .lines()
                .next()?
                .parse()
                .ok()?;
            let is_sandbox = status_ids.is_empty()
                && fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|comm| comm.trim_end() == "pause");
            (!is_sandbox).then_some((dir, pid))
        })
    }

    fn learn_netns(&mut self) {
        for (id, pod) in &self.pods {
            if pod.container.is_none() || self.netns.values().any(|uid| *uid == pod.pod_uid) {
                continue;
            }
            let Some(relative) = self.paths.get(id) else {
                continue;
            };
            let procs = self
                .root
                .join(relative.trim_start_matches('/'))
                .join("cgroup.procs");
            let first_pid = fs::read_to_string(procs)
                .ok()
                .and_then(|text| text.lines().next().map(str::to_owned));
            if let Some(inode) = first_pid
                .and_then(|pid| fs::metadata(format!("/proc/{pid}/ns/net")).ok())
                .map(|meta| meta.ino())
            {
                self.netns.insert(inode, pod.pod_uid.clone());
            }
        }
    }

    fn may_rescan(&self) -> bool {
        self.last_scan
            .is_none_or(|t| t.elapsed() >= RESCAN_INTERVAL)
    }

    fn rescan(&mut self) -> io::Result<()> {
        self.last_scan = Some(Instant::now());
        let mut pods = HashMap::new();
        let mut paths = HashMap::new();
        let mut known = HashSet::new();
        walk(&self.root, &self.root, 0, &mut |id, relative| {
            known.insert(id);
            if let Some(pod) = cgroup_path::parse(relative) {
                pods.insert(id, pod);
                paths.insert(id, relative.to_owned());
            }
        })?;
        self.pods = pods;
        self.paths = paths;
        self.known = known;
        self.netns.clear();
        Ok(())
    }
}

fn walk(
    root: &Path,
    dir: &Path,
    depth: usize,
    visit: &mut impl FnMut(u64, &str),
) -> io::Result<()> {
    let id = fs::metadata(dir)?.ino();
    let relative = dir.strip_prefix(root).unwrap_or(dir);
    visit(id, &format!("/{}", relative.display()));
    if depth >= MAX_DEPTH {
        return Ok(());
    }
    for entry in fs::read_dir(dir)? {
        let Ok(entry) = entry else { continue };
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            // Cgroups vanish all the time; a failed subtree is not an error.
            let _ = walk(root, &entry.path(), depth + 1, visit);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_pod_directories_by_inode() {
        let root = std::env::temp_dir().join(format!("cgroup-index-test-{}", std::process::id()));
        let uid = "6f1c2a3b_4d5e_4f60_8a9b_0c1d2e3f4a5b";
        let id = "ab".repeat(32);
        let container = root.join(format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid}.slice/cri-containerd-{id}.scope"
        ));
        fs::create_dir_all(&container).unwrap();
        let other = root.join("system.slice/sshd.service");
        fs::create_dir_all(&other).unwrap();

        let mut index = CgroupIndex::new(root.clone()).unwrap();
        let container_ino = fs::metadata(&container).unwrap().ino();
        let other_ino = fs::metadata(&other).unwrap().ino();
        let pod = index.lookup(container_ino).cloned().unwrap();
        assert_eq!(pod.pod_uid, "6f1c2a3b-4d5e-4f60-8a9b-0c1d2e3f4a5b");
        assert_eq!(pod.container.unwrap().id, id);
        assert!(index.lookup(other_ino).is_none());
        let pod_slice_ino = fs::metadata(container.parent().unwrap()).unwrap().ino();
        let mut of_pod = index.cgroups_of_pod("6f1c2a3b-4d5e-4f60-8a9b-0c1d2e3f4a5b");
        of_pod.sort();
        let mut expected = vec![container_ino, pod_slice_ino];
        expected.sort();
        assert_eq!(of_pod, expected);
        let pod_slice = index.lookup(pod_slice_ino).cloned().unwrap();
        assert_eq!(
            (pod_slice.pod_uid.as_str(), pod_slice.container),
            ("6f1c2a3b-4d5e-4f60-8a9b-0c1d2e3f4a5b", None)
        );
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn the_probe_joins_a_container_of_the_pods_status_never_its_sandbox() {
        let root = std::env::temp_dir().join(format!("cgroup-probe-test-{}", std::process::id()));
        let uid = "6f1c2a3b_4d5e_4f60_8a9b_0c1d2e3f4a5b";
        let pod_uid = uid.replace('_', "-");
        let pod = root.join(format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid}.slice"
        ));
        // The sandbox is made first (the lowest inode); the app container after it.
        let (sandbox, app) = ("5a".repeat(32), "ab".repeat(32));
        for (id, pid) in [(&sandbox, "101"), (&app, "202")] {
            let dir = pod.join(format!("cri-containerd-{id}.scope"));
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("cgroup.procs"), format!("{pid}\n")).unwrap();
        }
        let mut index = CgroupIndex::new(root.clone()).unwrap();
        let (dir, pid) = index.container_process(&pod_uid, &[&app]).unwrap();
        assert_eq!(
            (dir, pid),
            (pod.join(format!("cri-containerd-{app}.scope")), 202)
        );
        // A container the status does not list is never taken.
        assert_eq!(
            index.container_process(&pod_uid, &["cd".repeat(32).as_str()]),
            None
        );
        fs::remove_dir_all(&root).unwrap();
    }
}
