//! The userspace pipeline on synthetic kernel events, on one thread: raw ring-buffer
//! records are decoded, assembled into attempts, judged and counted in the metrics, as
//! the agent does. Prints JSON: events per second, and the process's resident memory
//! while 100,000 attempts are held with 10,000 pods in the cluster model.
//!
//! `cargo bench -p egress-tracer --bench pipeline -- [--connections N | --lookups N]
//! [--skip-memory]`: a stream of established TCP connections (three events each), or of
//! DNS lookups (a query and its answer; the lookups settled and counted as the agent's
//! ticks do). `cargo xtask bench` runs it, and again under callgrind for instruction
//! counts.

use std::{
    mem::offset_of,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use egress_tracer::{
    capture::{KernelNames, decode},
    cluster::{ClusterState, cgroups::CgroupIndex},
    metrics::{Metrics, MetricsOptions},
    pipeline::Pipeline,
};
use k8s_openapi::api::core::v1::{Pod, PodStatus};
use kube::api::ObjectMeta;
use tracer_common::{
    AF_INET, CALL_CONNECT, ConnectEvent, DNS_CAPTURE_BYTES, DNS_EGRESS, DNS_INGRESS, DnsEvent,
    Endpoint, EventHeader, EventKind, FirstPacketEvent, IPPROTO_TCP, IPPROTO_UDP, SockStateEvent,
    TCP_ESTABLISHED, TCP_SYN_SENT,
};

fn main() {
    // As the agent does.
    egress_tracer::release_freed_memory_promptly();
    let mut stream = Stream::Connections(200_000);
    let mut memory = true;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--connections" => {
                stream = Stream::Connections(
                    args.next()
                        .and_then(|n| n.parse().ok())
                        .expect("--connections takes a number"),
                )
            }
            "--lookups" => {
                stream = Stream::Lookups(
                    args.next()
                        .and_then(|n| n.parse().ok())
                        .expect("--lookups takes a number"),
                )
            }
            "--skip-memory" => memory = false,
            // What cargo bench passes to every bench target.
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    let cgroups = empty_cgroup_root();
    let (records, units): (Vec<Vec<u8>>, _) = match stream {
        Stream::Connections(n) => ((0..n).flat_map(connection).collect(), "connections"),
        Stream::Lookups(n) => {
            let messages = dns_messages();
            (
                (0..n).flat_map(|n| lookup(n, &messages)).collect(),
                "lookups",
            )
        }
    };
    let (events, per_second) = throughput(&cgroups, &records);
    // Freed before the memory is measured.
    drop(records);
    let mut report = serde_json::json!({
        units: match stream {
            Stream::Connections(n) | Stream::Lookups(n) => n,
        },
        "events": events,
        "events_per_second": per_second,
    });
    if memory {
        report["rss_mib_100k_attempts_10k_pods"] = serde_json::json!(memory_with(&cgroups));
    }
    println!("{report}");
    let _ = std::fs::remove_dir_all(&cgroups);
}

/// What the synthetic events describe, and how many.
#[derive(Clone, Copy)]
enum Stream {
    Connections(u64),
    Lookups(u64),
}

/// A cgroup root without cgroups: the events' cgroups are then unknown, as host processes.
fn empty_cgroup_root() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("egress-bench-cgroups-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temporary directory");
    dir
}

fn endpoint(ip: Ipv4Addr, port: u16) -> Endpoint {
    let mut addr = [0; 16];
    addr[..4].copy_from_slice(&ip.octets());
    Endpoint {
        family: AF_INET,
        port,
        addr,
    }
}

fn header(kind: EventKind, ts_ns: u64) -> EventHeader {
    EventHeader {
        kind: kind as u32,
        cpu: 0,
        ts_ns,
    }
}

fn bytes<T: Copy>(event: &T) -> Vec<u8> {
    // SAFETY: the event types are #[repr(C)] with explicit padding (aya::Pod).
    unsafe { std::slice::from_raw_parts((event as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
}

/// The ring-buffer records of one established connection: connect, first packet, state
/// change (which carries the SYN-ACK).
fn connection(n: u64) -> [Vec<u8>; 3] {
    let ts = 1_000_000 + n * 10_000;
    let src = endpoint(Ipv4Addr::new(10, 244, 0, 10), 20_000 + (n % 40_000) as u16);
    let dst = endpoint(Ipv4Addr::new(203, 0, 113, (n % 200) as u8 + 1), 443);
    let cookie = n + 1;
    let connect = ConnectEvent {
        header: header(EventKind::Connect, ts),
        cgroup_id: 7,
        sock_cookie: cookie,
        pid: 4242,
        tid: 4242,
        comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
        protocol: IPPROTO_TCP,
        call: CALL_CONNECT,
        _pad: [0; 6],
        dst,
    };
    let first = FirstPacketEvent {
        header: header(EventKind::FirstPacket, ts + 10),
        sock_cookie: cookie,
        protocol: IPPROTO_TCP,
        _pad: [0; 7],
        src,
        dst,
    };
    let state = SockStateEvent {
        header: header(EventKind::SockState, ts + 510),
        sock_cookie: cookie,
        old_state: TCP_SYN_SENT,
        new_state: TCP_ESTABLISHED,
        reply_tcp_flags: 0x12,
        reply_ttl: 57,
        error: 0,
        soft_error: 0,
        syn_retransmits: 0,
        src,
        dst,
    };
    [bytes(&connect), bytes(&first), bytes(&state)]
}

/// An A query for each of a hundred names (`apiN.example.test`), and its answer; their
/// ids are set per lookup.
fn dns_messages() -> Vec<(Vec<u8>, Vec<u8>)> {
    (0..100u8)
        .map(|n| {
            // Id 0, recursion desired; one question.
            let mut query = vec![0, 0, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
            for label in [format!("api{n}").as_str(), "example", "test"] {
                query.push(label.len() as u8);
                query.extend_from_slice(label.as_bytes());
            }
            query.extend_from_slice(&[0, 0, 1, 0, 1]);
            let mut answer = query.clone();
            // A response, recursion available, NOERROR; one answer: the question's name
            // (a pointer to it), A, IN, TTL 30, an address.
            answer[2..4].copy_from_slice(&[0x81, 0x80]);
            answer[6..8].copy_from_slice(&[0, 1]);
            answer.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4]);
            answer.extend_from_slice(&[203, 0, 113, n + 1]);
            (query, answer)
        })
        .collect()
}

/// The ring-buffer records of one DNS lookup over UDP: a query of `messages` and its
/// answer, 200 µs later.
fn lookup(n: u64, messages: &[(Vec<u8>, Vec<u8>)]) -> [Vec<u8>; 2] {
    let ts = 1_000_000 + n * 10_000;
    let client = endpoint(Ipv4Addr::new(10, 244, 0, 10), 30_000 + (n % 30_000) as u16);
    let server = endpoint(Ipv4Addr::new(10, 0, 0, 10), 53);
    let (query, answer) = &messages[n as usize % messages.len()];
    let id = (n % 65_536) as u16;
    let message = |kind_ts: u64, direction: u8, payload: &[u8], src, dst| {
        let mut data = [0u8; DNS_CAPTURE_BYTES];
        data[..payload.len()].copy_from_slice(payload);
        data[..2].copy_from_slice(&id.to_be_bytes());
        bytes(&DnsEvent {
            header: header(EventKind::Dns, kind_ts),
            sock_cookie: n + 1,
            cgroup_id: 7,
            direction,
            protocol: IPPROTO_UDP,
            captured: payload.len() as u16,
            payload_len: payload.len() as u32,
            src,
            dst,
            query_ns: 0,
            data,
        })
    };
    [
        message(ts, DNS_EGRESS, query, client, server),
        message(ts + 200_000, DNS_INGRESS, answer, server, client),
    ]
}

/// Decodes, assembles, judges and counts `records` as the agent does: batches handled,
/// then the pipeline's clock advanced to the batch's last event, and what settled counted
/// in the metrics; (events, per second).
fn throughput(cgroups: &Path, records: &[Vec<u8>]) -> (u64, f64) {
    let names = KernelNames::default();
    let mut pipeline = Pipeline::new(
        CgroupIndex::new(cgroups.to_path_buf()).expect("cgroup index"),
        ClusterState::default(),
        None,
        Duration::from_secs(5),
    )
    .with_query_outcomes();
    let mut metrics = Metrics::new(MetricsOptions::default());
    let mut batch = Vec::with_capacity(4096);
    let started = Instant::now();
    let mut last_ns = 0;
    for chunk in records.chunks(4096) {
        batch.extend(chunk.iter().map(|record| decode(record)));
        if let Some(record) = chunk.last() {
            let at = offset_of!(EventHeader, ts_ns);
            last_ns = u64::from_ne_bytes(record[at..at + 8].try_into().expect("8 bytes"));
        }
        pipeline.handle(&mut batch, &names);
        pipeline.tick(last_ns);
        metrics.queries(&pipeline.take_query_outcomes(), pipeline.cluster());
        metrics.records(&pipeline.take_records(), pipeline.cluster());
    }
    // Whatever is still settling (the last half second of lookups) counts too.
    pipeline.tick(last_ns + 10_000_000_000);
    metrics.queries(&pipeline.take_query_outcomes(), pipeline.cluster());
    metrics.records(&pipeline.take_records(), pipeline.cluster());
    let elapsed = started.elapsed().as_secs_f64();
    let events = records.len() as u64;
    (events, events as f64 / elapsed)
}

/// Resident memory (MiB) with 10,000 pods in the cluster model and 100,000 attempts held
/// (connects without an outcome yet).
fn memory_with(cgroups: &Path) -> f64 {
    let pods = (0..10_000u32).map(|i| Pod {
        metadata: ObjectMeta {
            name: Some(format!("pod-{i}")),
            namespace: Some(format!("ns-{}", i % 100)),
            uid: Some(format!("uid-{i}")),
            ..ObjectMeta::default()
        },
        status: Some(PodStatus {
            pod_ip: Some(IpAddr::from([10, 244, (i / 250) as u8, (i % 250) as u8]).to_string()),
            ..PodStatus::default()
        }),
        ..Pod::default()
    });
    let mut pipeline = Pipeline::new(
        CgroupIndex::new(cgroups.to_path_buf()).expect("cgroup index"),
        ClusterState::from_pods(pods),
        None,
        Duration::from_secs(5),
    );
    let names = KernelNames::default();
    let mut batch = Vec::new();
    for n in 0..100_000 {
        let [connect, ..] = connection(n);
        batch.push(decode(&connect));
        if batch.len() == 4096 {
            pipeline.handle(&mut batch, &names);
        }
    }
    pipeline.handle(&mut batch, &names);
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    // Keep the pipeline alive until measured.
    drop(pipeline);
    kib / 1024.0
}
