//! Faults the tracer must survive or refuse clearly: SIGKILL (nothing left in the kernel,
//! a restart works), a second agent on the same node, and the traced pod deleted while
//! `trace` runs. Needs root.

use std::time::Duration;

use egress_lab::{
    CgroupDriver, Lab, PodSpec, addresses as addr, agent,
    tracer::{BpfObjects, Tracer},
};

fn start_agent(lab: &Lab, args: &[String]) -> Result<Tracer, String> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Tracer::start(lab, &args).map_err(|e| e.to_string())
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn a_killed_agent_leaves_nothing_attached_and_restarts() {
    let lab = Lab::start(&[PodSpec::new("default", "client", CgroupDriver::Systemd)]).unwrap();
    let args = agent::args(&lab);
    let agent = start_agent(&lab, &args).unwrap();
    let attached = BpfObjects::owned_by(agent.pid()).unwrap();
    assert!(!attached.links.is_empty() && !attached.programs.is_empty());
    // SAFETY: kill(2) of our own child.
    assert_eq!(unsafe { libc::kill(agent.pid() as i32, libc::SIGKILL) }, 0);
    let killed = agent.finish().unwrap_err().to_string();
    assert!(killed.contains("signal: 9"), "{killed}");
    // The kernel frees programs and links with the last file descriptor.
    assert_eq!(
        attached.wait_gone(Duration::from_secs(10)).unwrap(),
        BpfObjects::default()
    );
    let again = start_agent(&lab, &args).unwrap();
    assert_eq!(agent::get(&lab, "/readyz").unwrap(), (200, "ready".into()));
    assert!(again.stop(libc::SIGTERM).unwrap().status.success());
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn a_second_agent_on_the_node_is_refused_without_attaching() {
    let lab = Lab::start(&[PodSpec::new("default", "client", CgroupDriver::Systemd)]).unwrap();
    let first = start_agent(&lab, &agent::args(&lab)).unwrap();
    let attached = BpfObjects::owned_by(first.pid()).unwrap();
    // Another port, so only the node claim can stop it.
    let mut args = agent::args(&lab);
    *args.last_mut().unwrap() = "127.0.0.1:9099".into();
    let refused = start_agent(&lab, &args)
        .err()
        .expect("a second agent started");
    assert!(
        refused.contains(&format!(
            "another egress-tracer agent runs on this node (pid {})",
            first.pid()
        )),
        "{refused}"
    );
    assert!(refused.contains("exit status: 2"), "{refused}");
    // The first is untouched and alone.
    assert_eq!(BpfObjects::owned_by(first.pid()).unwrap(), attached);
    assert_eq!(agent::get(&lab, "/readyz").unwrap(), (200, "ready".into()));
    assert!(first.stop(libc::SIGTERM).unwrap().status.success());
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn the_flows_api_needs_the_token_beyond_loopback() {
    let lab = Lab::start(&[PodSpec::new("default", "client", CgroupDriver::Systemd)]).unwrap();
    let node_address = format!("{}:9090", egress_lab::addresses::NODE_IP);
    let mut args = agent::args(&lab);
    *args.last_mut().unwrap() = node_address.clone();

    // No token, on an address others reach: metrics yes, recorded traffic no.
    let open = start_agent(&lab, &args).unwrap();
    assert_eq!(
        agent::get_from(&lab, &node_address, "/readyz", &[])
            .unwrap()
            .0,
        200
    );
    assert_eq!(
        agent::get_from(&lab, &node_address, "/metrics", &[])
            .unwrap()
            .0,
        200
    );
    let (status, body) = agent::get_from(&lab, &node_address, "/api/v1/flows", &[]).unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("without --api-token-file"), "{body}");
    let stopped = open.stop(libc::SIGTERM).unwrap();
    assert!(
        stopped.stderr.contains("the flows and diagnose API is off"),
        "{}",
        stopped.stderr
    );

    // With a token: only with it, in either header.
    let token = "0123456789abcdef0123456789abcdef";
    let token_file = lab.cluster_state().with_file_name("api-token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    args.extend([
        "--api-token-file".into(),
        token_file.to_str().unwrap().into(),
    ]);
    let guarded = start_agent(&lab, &args).unwrap();
    let flows = "/api/v1/flows?namespace=default";
    let (status, body) = agent::get_from(&lab, &node_address, flows, &[]).unwrap();
    assert_eq!(status, 401, "{body}");
    let wrong = "X-Egress-Tracer-Token: 0123456789abcdef0123456789abcdee";
    assert_eq!(
        agent::get_from(&lab, &node_address, flows, &[wrong])
            .unwrap()
            .0,
        401
    );
    let bearer = format!("Authorization: Bearer {token}");
    assert_eq!(
        agent::get_from(&lab, &node_address, flows, &[&bearer])
            .unwrap()
            .0,
        200
    );
    let custom = format!("X-Egress-Tracer-Token: {token}");
    assert_eq!(
        agent::get_from(&lab, &node_address, flows, &[&custom])
            .unwrap()
            .0,
        200
    );
    // The CLI sends it from --agent-token-file.
    let url = format!("http://{node_address}");
    let endpoint = format!(
        "http://{}:{}/",
        egress_lab::addresses::ENDPOINT,
        egress_lab::addresses::HTTP_PORT
    );
    let (status, stdout, stderr) = agent::run_cli_on_node(
        &lab,
        &[
            "diagnose",
            "--agent",
            &url,
            "--agent-token-file",
            token_file.to_str().unwrap(),
            "--pod",
            "default/client",
            &endpoint,
        ],
    )
    .unwrap();
    assert_eq!(status.code(), Some(0), "{stdout}{stderr}");
    let (status, stdout, stderr) = agent::run_cli_on_node(
        &lab,
        &[
            "diagnose",
            "--agent",
            &url,
            "--pod",
            "default/client",
            &endpoint,
        ],
    )
    .unwrap();
    assert_eq!(status.code(), Some(1), "{stdout}{stderr}");
    assert!(stderr.contains("needs the agent's token"), "{stderr}");
    assert!(guarded.stop(libc::SIGTERM).unwrap().status.success());
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn a_pod_deleted_mid_trace_ends_the_trace_with_its_records() {
    let mut lab = Lab::start(&[PodSpec::new("default", "client", CgroupDriver::Cgroupfs)]).unwrap();
    let tracer = Tracer::trace_pod(&lab, "default/client", &[]).unwrap();
    let endpoint = format!("{}:{}", addr::ENDPOINT, addr::HTTP_PORT);
    let established = lab.connect_burst(lab.pod("client"), &endpoint, 3).unwrap();
    assert!(established);
    lab.delete_pod("client").unwrap();
    // No signal: the tracer notices the pod is gone and stops by itself.
    let output = tracer.finish().unwrap();
    assert!(
        output
            .stderr
            .contains("pod default/client has left this node"),
        "{}",
        output.stderr
    );
    let records = output.records();
    let to_endpoint: Vec<_> = records.iter().filter(|r| r["dst"] == endpoint).collect();
    assert_eq!(to_endpoint.len(), 3, "{records:?}");
    assert!(
        to_endpoint
            .iter()
            .all(|r| r["pod"] == "default/client" && r["outcome"] == "established"),
        "{to_endpoint:?}"
    );
}
