//! Faults the agent must survive or refuse clearly: SIGKILL (nothing left in the kernel,
//! a restart works) and a second agent on the same node. Needs root.

use std::time::Duration;

use egress_lab::{
    CgroupDriver, Lab, PodSpec, agent,
    tracer::{BpfObjects, Tracer},
};

fn agent_args(lab: &Lab) -> Vec<String> {
    vec![
        "agent".into(),
        "--cluster-state".into(),
        lab.cluster_state().to_str().unwrap().into(),
        "--node-name".into(),
        lab.node_netns(),
        "--listen".into(),
        agent::listen_address(),
    ]
}

fn start_agent(lab: &Lab, args: &[String]) -> Result<Tracer, String> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Tracer::start(lab, &args).map_err(|e| e.to_string())
}

#[test]
#[ignore = "needs root and the node lab: run `cargo xtask test`"]
fn a_killed_agent_leaves_nothing_attached_and_restarts() {
    let lab = Lab::start(&[PodSpec::new("default", "client", CgroupDriver::Systemd)]).unwrap();
    let args = agent_args(&lab);
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
    let first = start_agent(&lab, &agent_args(&lab)).unwrap();
    let attached = BpfObjects::owned_by(first.pid()).unwrap();
    // Another port, so only the node claim can stop it.
    let mut args = agent_args(&lab);
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
