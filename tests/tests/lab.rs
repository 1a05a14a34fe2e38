//! The lab itself: it builds, works, and leaves nothing behind. Needs root.

use egress_lab::{CgroupDriver, Lab, PodSpec, addresses as addr, leftovers_of, process};

fn pods() -> Vec<PodSpec> {
    vec![
        PodSpec::new("default", "client", CgroupDriver::Systemd),
        PodSpec::new("shop", "other", CgroupDriver::Cgroupfs),
    ]
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn pods_reach_the_endpoint_by_name_through_cluster_dns() {
    let lab = Lab::start(&pods()).unwrap();
    for pod in lab.pods() {
        let url = format!("http://{}/", addr::ENDPOINT_NAME);
        let (_, status) = lab
            .exec_in_pod(pod, "curl", &["-sf", "-m", "5", "-o", "/dev/null", &url])
            .unwrap();
        assert!(status.success(), "{} could not fetch {url}", pod.key());
        let url6 = format!("http://[{}]/", addr::ENDPOINT6);
        let (_, status) = lab
            .exec_in_pod(pod, "curl", &["-sf", "-m", "5", "-o", "/dev/null", &url6])
            .unwrap();
        assert!(status.success(), "{} could not fetch {url6}", pod.key());
    }
    // The pod's process really is in the kubelet-style cgroup and the pod's netns.
    let client = lab.pod("client");
    let cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", client.pid)).unwrap();
    assert!(
        cgroup.contains("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod"),
        "{cgroup}"
    );
    let other = lab.pod("other");
    let cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", other.pid)).unwrap();
    assert!(
        cgroup.contains(&format!("/kubepods/besteffort/pod{}/", other.uid)),
        "{cgroup}"
    );
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn teardown_leaves_nothing_behind() {
    let lab = Lab::start(&pods()).unwrap();
    let id = lab.id().to_owned();
    let pids: Vec<u32> = lab.pods().iter().map(|p| p.pid).collect();
    let before = leftovers_of(Some(&id)).unwrap();
    // node, router 1, router 2, internet, cluster DNS and the two pods.
    assert_eq!(before.netns.len(), 7, "{before:?}");
    assert_eq!(before.cgroups.len(), 1);
    assert_eq!(before.state_dirs.len(), 1);
    drop(lab);
    assert!(leftovers_of(Some(&id)).unwrap().is_empty());
    for pid in pids {
        assert!(
            !process::is_alive(pid),
            "pod process {pid} survived teardown"
        );
    }
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn teardown_runs_on_panic() {
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::panic::catch_unwind(move || {
        let lab = Lab::start(&pods()).unwrap();
        tx.send(lab.id().to_owned()).unwrap();
        panic!("a failing test");
    });
    assert!(result.is_err());
    let id = rx.recv().unwrap();
    assert!(leftovers_of(Some(&id)).unwrap().is_empty());
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn a_killed_runs_lab_is_removed_by_the_next_run() {
    use std::io::{BufRead, BufReader};
    let mut up = std::process::Command::new(egress_lab::lab_helper().unwrap())
        .arg("up")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first_line = String::new();
    BufReader::new(up.stdout.take().unwrap())
        .read_line(&mut first_line)
        .unwrap();
    let id = first_line.split_whitespace().nth(1).unwrap().to_owned();
    assert_eq!(first_line, format!("lab {id} is up\n"));
    // SIGKILL: no destructor runs, the lab's processes are orphaned.
    up.kill().unwrap();
    up.wait().unwrap();
    let left = leftovers_of(Some(&id)).unwrap();
    assert_eq!((left.netns.len(), left.cgroups.len()), (7, 1), "{left:?}");
    egress_lab::clean_stale().unwrap();
    assert!(leftovers_of(Some(&id)).unwrap().is_empty());
}
