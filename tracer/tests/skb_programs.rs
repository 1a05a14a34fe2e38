//! The packet programs under `BPF_PROG_TEST_RUN`: real verifier, real program, packets
//! built here, including malformed and truncated ones. Needs root.
//!
//! A test run hands the program an Ethernet frame; the kernel strips the Ethernet header
//! for cgroup_skb programs and attaches a dummy socket, whose cookie the programs read.

use aya::{
    Ebpf,
    maps::{Array, HashMap, RingBuf},
    programs::{CgroupSkb, TestRun, TestRunOptions},
};
use egress_tracer::capture::KERNEL_OBJECT;
use tracer_common::{
    AF_INET, DNS_CAPTURE_BYTES, DNS_EGRESS, DNS_INGRESS, DnsEvent, DnsHeld, DnsHeldKey,
    EventHeader, EventKind, IPPROTO_TCP, IPPROTO_UDP, SETTING_DNS_SUMMARY_MS, dns_message_hash,
};

const PASS: u32 = 1;

fn load(program: &str) -> Ebpf {
    let mut ebpf = Ebpf::load(KERNEL_OBJECT).expect("the kernel object loads");
    let skb: &mut CgroupSkb = ebpf.program_mut(program).unwrap().try_into().unwrap();
    skb.load().expect("the verifier accepts the program");
    ebpf
}

/// Turns DNS summaries on, with a period no test outlasts.
fn summarise_dns(ebpf: &mut Ebpf) {
    let mut settings: Array<_, u32> = Array::try_from(ebpf.map_mut("SETTINGS").unwrap()).unwrap();
    settings.set(SETTING_DNS_SUMMARY_MS, 3_600_000, 0).unwrap();
}

/// The queries the programs held back.
fn held(ebpf: &Ebpf) -> Vec<DnsHeld> {
    let map: HashMap<_, DnsHeldKey, DnsHeld> =
        HashMap::try_from(ebpf.map("DNS_HELD").unwrap()).unwrap();
    map.iter().map(|entry| entry.unwrap().1).collect()
}

/// Runs `program` on `frame`; returns its verdict and the events it wrote.
fn run(ebpf: &mut Ebpf, program: &str, frame: &[u8]) -> (u32, Vec<Vec<u8>>) {
    let skb: &CgroupSkb = ebpf.program(program).unwrap().try_into().unwrap();
    let result = skb
        .test_run(TestRunOptions {
            data_in: Some(frame),
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("test run of a {}-byte frame: {e}", frame.len()));
    let mut ring = RingBuf::try_from(ebpf.map_mut("EVENTS").unwrap()).unwrap();
    let mut events = Vec::new();
    while let Some(item) = ring.next() {
        events.push(item.to_vec());
    }
    (result.return_value, events)
}

fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

fn ipv4(protocol: u8, src: [u8; 4], dst: [u8; 4], l4: &[u8]) -> Vec<u8> {
    let total = (20 + l4.len()) as u16;
    let mut packet = vec![0x45, 0];
    packet.extend_from_slice(&total.to_be_bytes());
    packet.extend_from_slice(&[0, 0, 0x40, 0, 64, protocol, 0, 0]);
    packet.extend_from_slice(&src);
    packet.extend_from_slice(&dst);
    packet.extend_from_slice(l4);
    packet
}

fn udp(src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let mut datagram = Vec::new();
    datagram.extend_from_slice(&src_port.to_be_bytes());
    datagram.extend_from_slice(&dst_port.to_be_bytes());
    datagram.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    datagram.extend_from_slice(&[0, 0]);
    datagram.extend_from_slice(payload);
    datagram
}

fn dns_query() -> Vec<u8> {
    let mut m = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    m.extend_from_slice(&[3, b'a', b'p', b'i', 7]);
    m.extend_from_slice(b"example");
    m.extend_from_slice(&[4, b't', b'e', b's', b't', 0, 0, 1, 0, 1]);
    m
}

const ETH_P_IP: u16 = 0x0800;
/// IEEE 802 local experimental ethertype 1.
const ETH_P_EXPERIMENTAL: u16 = 0x88b5;
const POD: [u8; 4] = [10, 244, 0, 10];
const CLUSTER_DNS: [u8; 4] = [10, 0, 0, 10];

fn dns_event(bytes: &[u8]) -> DnsEvent {
    assert_eq!(bytes.len(), std::mem::size_of::<DnsEvent>());
    // SAFETY: length checked; DnsEvent is plain bytes.
    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<DnsEvent>()) }
}

#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn dns_query_is_copied_with_exact_fields() {
    let mut ebpf = load("skb_egress");
    let query = dns_query();
    let frame = ethernet(
        ETH_P_IP,
        &ipv4(IPPROTO_UDP, POD, CLUSTER_DNS, &udp(40000, 53, &query)),
    );
    let (verdict, events) = run(&mut ebpf, "skb_egress", &frame);
    assert_eq!(verdict, PASS);
    assert_eq!(events.len(), 1);
    let event = dns_event(&events[0]);
    let EventHeader { kind, .. } = event.header;
    assert_eq!(kind, EventKind::Dns as u32);
    assert_eq!((event.direction, event.protocol), (DNS_EGRESS, IPPROTO_UDP));
    assert_eq!(
        (event.payload_len, usize::from(event.captured)),
        (query.len() as u32, query.len())
    );
    assert_eq!(&event.data[..query.len()], &query[..]);
    assert_eq!(
        (event.src.family, event.src.port, &event.src.addr[..4]),
        (AF_INET, 40000, &POD[..])
    );
    assert_eq!(
        (event.dst.port, &event.dst.addr[..4]),
        (53, &CLUSTER_DNS[..])
    );
}

#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn long_dns_message_is_cut_to_the_capture_size() {
    let mut ebpf = load("skb_ingress");
    let mut response = dns_query();
    response.resize(1400, 0xab);
    let frame = ethernet(
        ETH_P_IP,
        &ipv4(IPPROTO_UDP, CLUSTER_DNS, POD, &udp(53, 40000, &response)),
    );
    let (verdict, events) = run(&mut ebpf, "skb_ingress", &frame);
    assert_eq!(verdict, PASS);
    let event = dns_event(&events[0]);
    assert_eq!(event.direction, DNS_INGRESS);
    assert_eq!(
        (event.payload_len, usize::from(event.captured)),
        (1400, DNS_CAPTURE_BYTES)
    );
    assert_eq!(&event.data[..], &response[..DNS_CAPTURE_BYTES]);
}

#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn a_repeated_query_is_held_back_under_the_hash_userspace_computes() {
    let mut ebpf = load("skb_egress");
    summarise_dns(&mut ebpf);
    let mut long = dns_query();
    long.resize(1400, 0xab);
    for query in [dns_query(), long] {
        let frame = ethernet(
            ETH_P_IP,
            &ipv4(IPPROTO_UDP, POD, CLUSTER_DNS, &udp(40000, 53, &query)),
        );
        let mut repeat = frame.clone();
        // Another DNS id: the same query to the summaries.
        let id_at = frame.len() - query.len();
        repeat[id_at..id_at + 2].copy_from_slice(&[0xab, 0xcd]);
        let (verdict, events) = run(&mut ebpf, "skb_egress", &frame);
        assert_eq!((verdict, events.len()), (PASS, 1));
        let sent = dns_event(&events[0]);
        let captured = &sent.data[..usize::from(sent.captured)];
        let before = held(&ebpf).len();
        let (verdict, events) = run(&mut ebpf, "skb_egress", &repeat);
        assert_eq!((verdict, events.len()), (PASS, 0), "{} bytes", query.len());
        let held = held(&ebpf);
        assert_eq!(held.len(), before + 1);
        let entry = held
            .iter()
            .find(|h| h.query_hash == dns_message_hash(captured, sent.payload_len))
            .unwrap_or_else(|| panic!("{} bytes: {held:?}", query.len()));
        assert_eq!(
            (entry.client.port, &entry.client.addr[..4]),
            (40000, &POD[..])
        );
        assert_eq!(
            (entry.server.port, &entry.server.addr[..4]),
            (53, &CLUSTER_DNS[..])
        );
        assert_eq!(entry.cgroup_id, sent.cgroup_id);
    }
}

#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn malformed_and_truncated_packets_pass_untouched_and_report_nothing() {
    let mut ebpf = load("skb_egress");
    let query = dns_query();
    let good = ipv4(IPPROTO_UDP, POD, CLUSTER_DNS, &udp(40000, 53, &query));
    let mut long_ihl = good.clone();
    long_ihl[0] = 0x4f;
    let mut tcp = ipv4(
        IPPROTO_TCP,
        POD,
        CLUSTER_DNS,
        &[
            0x9c, 0x40, 0, 53, 0, 0, 0, 1, 0, 0, 0, 0, 0xf0, 0x02, 0, 0, 0, 0, 0, 0,
        ],
    );
    // A TCP header claiming 60 bytes in a 20-byte segment.
    tcp.truncate(40);
    // The kernel refuses to test-run IP frames shorter than their IP header, so cut
    // headers travel under an experimental ethertype: the program only looks at bytes.
    let cases: [(&str, Vec<u8>); 7] = [
        ("IPv4 header cut", ethernet(ETH_P_EXPERIMENTAL, &good[..10])),
        ("UDP header cut", ethernet(ETH_P_IP, &good[..24])),
        ("IHL past the end", ethernet(ETH_P_IP, &long_ihl)),
        (
            "UDP to 53 without payload",
            ethernet(
                ETH_P_IP,
                &ipv4(IPPROTO_UDP, POD, CLUSTER_DNS, &udp(40000, 53, &[])),
            ),
        ),
        ("TCP data offset past the end", ethernet(ETH_P_IP, &tcp)),
        (
            "IPv6 header cut",
            ethernet(ETH_P_EXPERIMENTAL, &[0x60, 0, 0, 0, 0, 20, 17]),
        ),
        ("not IP", ethernet(0x0806, &[0u8; 28])),
    ];
    for (what, frame) in cases {
        let (verdict, events) = run(&mut ebpf, "skb_egress", &frame);
        assert_eq!(verdict, PASS, "{what}");
        assert!(events.is_empty(), "{what}: {} events", events.len());
    }
}

#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn random_frames_never_change_a_verdict_or_overrun_the_capture() {
    let mut ebpf = load("skb_egress");
    random_frames(&mut ebpf);
    // Again through the summaries' hashing and held queries.
    summarise_dns(&mut ebpf);
    random_frames(&mut ebpf);
}

fn random_frames(ebpf: &mut Ebpf) {
    // xorshift64: reproducible without a dependency.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for round in 0..300 {
        let length = 14 + (next() % 200) as usize;
        let mut frame: Vec<u8> = (0..length).map(|_| next() as u8).collect();
        // Half of them IPv4 UDP to port 53 with random content, to reach the DNS path.
        if round % 2 == 0 && length > 14 + 28 {
            frame[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
            frame[14] = 0x45;
            frame[14 + 9] = IPPROTO_UDP;
            frame[14 + 22..14 + 24].copy_from_slice(&53u16.to_be_bytes());
        }
        let (verdict, events) = run(ebpf, "skb_egress", &frame);
        assert_eq!(verdict, PASS, "round {round}");
        for event in events {
            let event = dns_event(&event);
            assert!(
                usize::from(event.captured) <= DNS_CAPTURE_BYTES,
                "round {round}"
            );
            assert!(
                u32::from(event.captured) <= event.payload_len,
                "round {round}"
            );
        }
    }
}
