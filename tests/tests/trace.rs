//! `egress-tracer trace` against real traffic in the node lab. Needs root.

use egress_lab::{
    CgroupDriver, Lab, PodSpec, addresses as addr,
    tracer::{BpfObjects, Tracer},
};
use std::time::Duration;

use serde_json::Value;

fn lab() -> Lab {
    Lab::start(&[
        PodSpec::new("default", "client", CgroupDriver::Systemd),
        PodSpec::new("shop", "other", CgroupDriver::Cgroupfs),
    ])
    .unwrap()
}

fn curl(lab: &Lab, pod: &str, url: &str) -> u32 {
    let pod = lab.pod(pod);
    let (pid, status) = lab
        .exec_in_pod(pod, "curl", &["-s", "-m", "5", "-o", "/dev/null", url])
        .unwrap();
    assert!(
        status.success(),
        "curl {url} from {} failed: {status}",
        pod.key()
    );
    pid
}

fn records_of_pid(records: &[Value], pid: u32) -> Vec<&Value> {
    records
        .iter()
        .filter(|r| r["process"]["pid"] == pid)
        .collect()
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn traces_one_pods_connects_with_exact_fields_and_detaches_on_sigint() {
    let lab = lab();
    let state = lab.cluster_state();
    let tracer = Tracer::start(
        &lab,
        &[
            "trace",
            "--cluster-state",
            state.to_str().unwrap(),
            "--pod",
            "default/client",
            "-o",
            "json",
        ],
    )
    .unwrap();
    let attached = BpfObjects::owned_by(tracer.pid()).unwrap();
    // connect4, connect6, SYN egress and the state tracepoint: a program and a link each.
    assert_eq!(
        (attached.programs.len(), attached.links.len()),
        (4, 4),
        "{attached:?}"
    );

    let client_v4 = curl(
        &lab,
        "client",
        &format!("http://{}:{}/", addr::ENDPOINT, addr::HTTP_PORT),
    );
    let client_v6 = curl(
        &lab,
        "client",
        &format!("http://[{}]:{}/", addr::ENDPOINT6, addr::HTTP_PORT),
    );
    let other = curl(
        &lab,
        "other",
        &format!("http://{}:{}/", addr::ENDPOINT, addr::HTTP_PORT),
    );
    let refused_pid = {
        let url = format!("http://{}:{}/", addr::ENDPOINT, addr::CLOSED_PORT);
        let (pid, status) = lab
            .exec_in_pod(lab.pod("client"), "curl", &["-s", "-m", "5", &url])
            .unwrap();
        assert_eq!(
            status.code(),
            Some(7),
            "curl to a closed port must fail to connect"
        );
        pid
    };

    let output = tracer.stop(libc::SIGINT).unwrap();
    assert!(output.status.success(), "tracer failed: {}", output.stderr);
    let records = output.records();

    let client = lab.pod("client");
    let v4 = records_of_pid(&records, client_v4);
    assert_eq!(v4.len(), 1, "records: {records:#?}");
    let record = v4[0];
    assert_eq!(record["pod"], "default/client");
    assert_eq!(record["pod_uid"], client.uid.as_str());
    assert_eq!(record["process"]["comm"], "curl");
    assert_eq!(record["protocol"], "tcp");
    assert_eq!(
        record["dst"],
        format!("{}:{}", addr::ENDPOINT, addr::HTTP_PORT)
    );
    let src = record["src"].as_str().unwrap();
    let (src_ip, src_port) = src.rsplit_once(':').unwrap();
    assert_eq!(src_ip, client.ip.to_string());
    assert_ne!(src_port.parse::<u16>().unwrap(), 0);
    assert!(humantime::parse_rfc3339(record["time"].as_str().unwrap()).is_ok());

    let v6 = records_of_pid(&records, client_v6);
    assert_eq!(v6.len(), 1, "records: {records:#?}");
    assert_eq!(
        v6[0]["dst"],
        format!("[{}]:{}", addr::ENDPOINT6, addr::HTTP_PORT)
    );
    assert!(
        v6[0]["src"]
            .as_str()
            .unwrap()
            .starts_with(&format!("[{}]:", client.ipv6))
    );

    // A refused connect still has the source its SYN left with.
    let refused = records_of_pid(&records, refused_pid);
    assert_eq!(refused.len(), 1, "records: {records:#?}");
    assert_eq!(
        refused[0]["dst"],
        format!("{}:{}", addr::ENDPOINT, addr::CLOSED_PORT)
    );
    let (ip, port) = refused[0]["src"]
        .as_str()
        .unwrap()
        .rsplit_once(':')
        .unwrap();
    assert_eq!(
        (ip, port.parse::<u16>().unwrap() != 0),
        (client.ip.to_string().as_str(), true)
    );

    // The other pod's connect is not in this pod's trace, nor is anything else.
    assert!(
        records_of_pid(&records, other).is_empty(),
        "other pod leaked: {records:#?}"
    );
    assert!(
        records.iter().all(|r| r["pod"] == "default/client"),
        "{records:#?}"
    );

    assert_eq!(
        attached.wait_gone(Duration::from_secs(5)).unwrap(),
        BpfObjects::default()
    );
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn detaches_on_sigterm_and_sees_every_pod_without_filter() {
    let lab = lab();
    let state = lab.cluster_state();
    let tracer = Tracer::start(
        &lab,
        &[
            "trace",
            "--cluster-state",
            state.to_str().unwrap(),
            "-o",
            "json",
        ],
    )
    .unwrap();
    let attached = BpfObjects::owned_by(tracer.pid()).unwrap();
    assert!(!attached.is_empty());

    let client = curl(
        &lab,
        "client",
        &format!("http://{}:{}/", addr::ENDPOINT, addr::HTTP_PORT),
    );
    let other = curl(
        &lab,
        "other",
        &format!("http://{}:{}/", addr::ENDPOINT, addr::HTTP_PORT),
    );

    let output = tracer.stop(libc::SIGTERM).unwrap();
    assert!(output.status.success(), "tracer failed: {}", output.stderr);
    let records = output.records();
    let pods: Vec<&Value> = [client, other]
        .iter()
        .map(|&pid| {
            let found = records_of_pid(&records, pid);
            assert_eq!(found.len(), 1, "pid {pid}: {records:#?}");
            &found[0]["pod"]
        })
        .collect();
    // The cgroupfs-driver pod is attributed as well as the systemd one.
    assert_eq!(pods, vec!["default/client", "shop/other"]);
    assert_eq!(
        attached.wait_gone(Duration::from_secs(5)).unwrap(),
        BpfObjects::default()
    );
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn dns_lookups_of_a_pod_show_as_udp_connects_to_cluster_dns() {
    let lab = lab();
    let state = lab.cluster_state();
    let tracer = Tracer::start(
        &lab,
        &[
            "trace",
            "--cluster-state",
            state.to_str().unwrap(),
            "--pod",
            "default/client",
            "-o",
            "json",
        ],
    )
    .unwrap();
    let pid = curl(&lab, "client", &format!("http://{}/", addr::ENDPOINT_NAME));
    let output = tracer.stop(libc::SIGINT).unwrap();
    let records = output.records();
    let mine = records_of_pid(&records, pid);
    // glibc's resolver connects a UDP socket to the nameserver before querying.
    assert!(
        mine.iter()
            .any(|r| r["protocol"] == "udp" && r["dst"] == format!("{}:53", addr::CLUSTER_DNS)),
        "{mine:#?}"
    );
    assert!(
        mine.iter()
            .any(|r| r["protocol"] == "tcp" && r["dst"] == format!("{}:80", addr::ENDPOINT)),
        "{mine:#?}"
    );
}
