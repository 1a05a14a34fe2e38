//! The node lab: an AKS node in a box, built from network namespaces on this machine.
//!
//! ```text
//!  pod netns ──veth──┐
//!  pod netns ──veth──┤ cni0 (10.244.0.1)
//!                    node netns ── eth0 10.224.0.4 ── upstream netns ── router 2 ── internet netns
//!                    │  MASQUERADE, policy rules       (router 1; faults  (up2)    203.0.113.10 HTTP
//!                    │                                  go here)                   192.0.2.53 DNS
//!                    └─ kube-dns ── dns netns 10.0.0.10 (dnsmasq → 192.0.2.53)
//! ```
//!
//! Rules this crate keeps (see `docs/lab.md`): nothing touches the root network
//! namespace; only documentation ranges stand for public addresses; every object carries a
//! per-run prefix; [`Lab`] tears everything down on drop (including on panic), and
//! [`clean_leftovers`] removes what a killed run left behind.
//!
//! Every lab process (pods, DNS servers, endpoints) runs in a cgroup below the lab's own
//! cgroup parent, so teardown can end exactly the processes the lab started.

pub mod addresses;
pub mod agent;
mod cleanup;
pub mod demo;
pub mod dns_server;
pub mod fake_api;
pub mod http;
mod manifest;
pub mod network_policy;
pub mod process;
pub mod tracer;

use std::{
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub use cleanup::{Leftovers, clean_leftovers, clean_stale, leftovers_of, stale_labs};
pub use manifest::PodManifest;

use addresses as addr;
use process::{Placement, run, run_in};

/// Prefix of every lab object name (network namespaces, cgroups, state directories).
pub const PREFIX: &str = "elab-";
/// The one source port of [`Fault::SnatSinglePort`].
pub const SINGLE_SNAT_PORT: u16 = 40000;

/// How a pod's cgroups are laid out, as kubelet's two cgroup drivers do it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupDriver {
    /// `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice/cri-containerd-<id>.scope`
    Systemd,
    /// `kubepods/besteffort/pod<uid>/<id>`
    Cgroupfs,
}

/// A fault injected on the path for TCP traffic to `dst:port`: on the node (its own
/// firewall), or in the upstream router (Azure LB / NSG / firewall's role).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// A node iptables rule that drops the traffic (no NetworkPolicy behind it).
    NodeFirewallDrop { dst: std::net::IpAddr, port: u16 },
    /// A node iptables rule that drops the answers from `dst:port` (the SYN-ACKs), as a
    /// firewall that sees only one direction of a flow does.
    NodeFirewallDropsReplies { dst: std::net::IpAddr, port: u16 },
    /// TCP and UDP packets to `dst:port` vanish (an NSG deny, a black-holing firewall).
    SilentDrop { dst: std::net::IpAddr, port: u16 },
    /// The router answers with ICMP destination unreachable, code 13 (communication
    /// administratively prohibited), or its ICMPv6 equivalent.
    AdminProhibited { dst: std::net::IpAddr, port: u16 },
    /// The router answers the SYN with a TCP reset, as some firewalls do.
    Reset { dst: std::net::IpAddr, port: u16 },
    /// The upstream DNS server cannot be reached (UDP and TCP port 53 dropped).
    UpstreamDnsUnreachable,
    /// The node has no route to `dst` (an `unreachable` route in its table).
    NoRoute { dst: std::net::IpAddr },
    /// Router 2 answers every TCP SYN to `dst` with a reset of its own (a firewall that
    /// rejects), whatever the port: nothing else answers at `dst`.
    Router2ResetsAll { dst: std::net::Ipv4Addr },
    /// Router 2 drops TCP to `dst:port` before routing it, so it answers nothing, not even
    /// expired probes (as a cloud firewall or NSG that does not decrement the TTL).
    Router2SilentDrop { dst: std::net::Ipv4Addr, port: u16 },
    /// A tc program on every pod's host-side veth (the way an eBPF CNI such as Cilium
    /// enforces NetworkPolicies) drops IPv4 TCP to `dst:port`: the kernel reports drop
    /// reason `TC_INGRESS`, and no netfilter rule is involved.
    EbpfDrop { dst: std::net::Ipv4Addr, port: u16 },
    /// The node translates TCP to `dst:port` to a single source port, so a second
    /// concurrent flow clashes with the first and conntrack fails to insert it.
    SnatSinglePort { dst: std::net::IpAddr, port: u16 },
}

/// A pod to create.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub driver: CgroupDriver,
    /// The `options` line of the pod's resolv.conf.
    pub resolver_options: String,
    /// A port the pod serves HTTP on (a Service backend).
    pub http_port: Option<u16>,
    /// Environment of the pod's container process (e.g. `HTTPS_PROXY`).
    pub env: Vec<(String, String)>,
}

impl PodSpec {
    pub fn new(namespace: &str, name: &str, driver: CgroupDriver) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            labels: vec![("app".to_owned(), name.to_owned())],
            driver,
            resolver_options: "ndots:5".to_owned(),
            http_port: None,
            env: Vec::new(),
        }
    }

    /// Sets an environment variable of the pod's container process.
    pub fn with_env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Makes the pod serve HTTP on `port` of its address.
    pub fn serving_http(mut self, port: u16) -> Self {
        self.http_port = Some(port);
        self
    }

    /// Replaces the resolv.conf `options` (e.g. `ndots:5 timeout:1 attempts:1`).
    pub fn with_resolver_options(mut self, options: &str) -> Self {
        options.clone_into(&mut self.resolver_options);
        self
    }
}

/// A running lab pod.
#[derive(Clone, Debug)]
pub struct LabPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub ip: std::net::Ipv4Addr,
    pub ipv6: std::net::Ipv6Addr,
    /// Network namespace name (under `/run/netns`).
    pub netns: String,
    /// The container's cgroup directory (absolute path).
    pub cgroup: PathBuf,
    /// The pod's own resolv.conf (bind-mounted over /etc/resolv.conf for its processes).
    pub resolv_conf: PathBuf,
    /// The pod's long-lived process (its "container").
    pub pid: u32,
    pub labels: Vec<(String, String)>,
    /// The runtime id of its one container (named like the pod).
    pub container_id: String,
}

impl LabPod {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A running node lab. Dropping it tears it down.
pub struct Lab {
    id: String,
    cgroup_parent: PathBuf,
    state_dir: PathBuf,
    netns: Vec<String>,
    children: Vec<Child>,
    pods: Vec<LabPod>,
}

impl Lab {
    /// Builds the lab with the given pods. Cleans up stale labs of dead test runs first.
    pub fn start(pods: &[PodSpec]) -> io::Result<Self> {
        check_root()?;
        cleanup::clean_stale()?;
        let id = format!("{:06x}", rand_u32() & 0xff_ffff);
        let cgroup_root = cgroup2_mount()?;
        let mut lab = Lab {
            cgroup_parent: cgroup_root.join(format!("{PREFIX}{id}.slice")),
            state_dir: cleanup::state_root().join(format!("{PREFIX}{id}")),
            id,
            netns: Vec::new(),
            children: Vec::new(),
            pods: Vec::new(),
        };
        // From here on, Drop cleans up whatever was built if a step fails.
        let step = |what: &str| {
            let what = what.to_owned();
            move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"))
        };
        cleanup::create_state_dir(&lab.state_dir).map_err(step("creating the state directory"))?;
        fs::create_dir_all(lab.cluster_state()).map_err(step("creating cluster-state/"))?;
        fs::write(
            lab.cluster_state()
                .join("kube-system_kube-dns_service.json"),
            manifest::cluster_dns_service(addr::CLUSTER_DNS),
        )
        .map_err(step("writing the kube-dns Service"))?;
        fs::create_dir_all(lab.cgroup_parent.join("infra"))
            .map_err(step("creating the lab cgroup"))?;
        lab.build_network().map_err(step("building the network"))?;
        lab.start_services()
            .map_err(step("starting DNS and the endpoint"))?;
        for (index, spec) in pods.iter().enumerate() {
            lab.add_pod(spec, index).map_err(step(&format!(
                "adding pod {}/{}",
                spec.namespace, spec.name
            )))?;
        }
        lab.wait_ready()?;
        Ok(lab)
    }

    /// The per-run id (part of every object name).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Directory of Pod manifests, for `egress-tracer --cluster-state`.
    pub fn cluster_state(&self) -> PathBuf {
        self.state_dir.join("cluster-state")
    }

    /// The node's network namespace (where the tracer runs, like a hostNetwork pod).
    pub fn node_netns(&self) -> String {
        self.ns("node")
    }

    pub fn pods(&self) -> &[LabPod] {
        &self.pods
    }

    pub fn pod(&self, name: &str) -> &LabPod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no lab pod {name}"))
    }

    /// Deletes a pod as kubelet would: ends its processes (the lab's own, by PID), removes
    /// its container and pod cgroups and its manifest. Processes a test started in the
    /// pod must be ended by the test first (the cgroups cannot go while they run).
    pub fn delete_pod(&mut self, name: &str) -> io::Result<()> {
        let index = self
            .pods
            .iter()
            .position(|p| p.name == name)
            .ok_or_else(|| io::Error::other(format!("no lab pod {name}")))?;
        let pod = self.pods.remove(index);
        let in_pod: Vec<u32> = fs::read_to_string(pod.cgroup.join("cgroup.procs"))?
            .lines()
            .filter_map(|line| line.parse().ok())
            .collect();
        for child in self
            .children
            .iter_mut()
            .filter(|c| in_pod.contains(&c.id()))
        {
            child.kill()?;
            child.wait()?;
        }
        self.children.retain(|c| !in_pod.contains(&c.id()));
        fs::remove_file(
            self.cluster_state()
                .join(format!("{}_{}.json", pod.namespace, pod.name)),
        )?;
        // The container's cgroup, then the pod's (its parent in both drivers' layouts).
        fs::remove_dir(&pod.cgroup)?;
        match pod.cgroup.parent() {
            Some(pod_level) => fs::remove_dir(pod_level),
            None => Ok(()),
        }
    }

    /// Injects a fault; it lasts until teardown.
    pub fn inject(&self, fault: Fault) -> io::Result<()> {
        use std::net::IpAddr;
        const TCP: &[&str] = &["tcp"];

        match fault {
            Fault::EbpfDrop { dst, port } => return self.attach_tc_drop(dst, port),
            Fault::Router2ResetsAll { dst } => {
                let dst = dst.to_string();
                return run_in(
                    &self.ns("up2"),
                    "iptables",
                    &[
                        "-I",
                        "FORWARD",
                        "-p",
                        "tcp",
                        "-d",
                        &dst,
                        "-j",
                        "REJECT",
                        "--reject-with",
                        "tcp-reset",
                    ],
                )
                .map(drop);
            }
            Fault::Router2SilentDrop { dst, port } => {
                let (dst, port) = (dst.to_string(), port.to_string());
                return run_in(
                    &self.ns("up2"),
                    "iptables",
                    &[
                        "-t",
                        "raw",
                        "-I",
                        "PREROUTING",
                        "-p",
                        "tcp",
                        "-d",
                        &dst,
                        "--dport",
                        &port,
                        "-j",
                        "DROP",
                    ],
                )
                .map(drop);
            }
            _ => {}
        }
        let router = match fault {
            Fault::NodeFirewallDrop { .. } | Fault::NodeFirewallDropsReplies { .. } => {
                self.node_netns()
            }
            _ => self.ns("up"),
        };
        let (dst, port, protocols, action): (IpAddr, u16, &[&str], &[&str]) = match fault {
            Fault::NodeFirewallDrop { dst, port } => (dst, port, TCP, &["-j", "DROP"]),
            Fault::SilentDrop { dst, port } => (dst, port, &["tcp", "udp"], &["-j", "DROP"]),
            Fault::NodeFirewallDropsReplies { dst, port } => {
                return run_in(
                    &router,
                    iptables_for(dst),
                    &[
                        "-I",
                        "FORWARD",
                        "-p",
                        "tcp",
                        "-s",
                        &dst.to_string(),
                        "--sport",
                        &port.to_string(),
                        "-j",
                        "DROP",
                    ],
                )
                .map(drop);
            }
            Fault::AdminProhibited { dst, port } if dst.is_ipv4() => (
                dst,
                port,
                TCP,
                &["-j", "REJECT", "--reject-with", "icmp-admin-prohibited"],
            ),
            Fault::AdminProhibited { dst, port } => (
                dst,
                port,
                TCP,
                &["-j", "REJECT", "--reject-with", "adm-prohibited"],
            ),
            Fault::Reset { dst, port } => (
                dst,
                port,
                TCP,
                &["-j", "REJECT", "--reject-with", "tcp-reset"],
            ),
            Fault::SnatSinglePort { dst, port } => return self.snat_to_single_port(dst, port),
            Fault::EbpfDrop { .. }
            | Fault::Router2ResetsAll { .. }
            | Fault::Router2SilentDrop { .. } => unreachable!("handled above"),
            Fault::NoRoute { dst } => {
                let prefix = if dst.is_ipv4() { 32 } else { 128 };
                return run_in(
                    &self.node_netns(),
                    "ip",
                    &["route", "add", "unreachable", &format!("{dst}/{prefix}")],
                )
                .map(drop);
            }
            Fault::UpstreamDnsUnreachable => (
                IpAddr::V4(addr::UPSTREAM_DNS),
                53,
                &["udp", "tcp"],
                &["-j", "DROP"],
            ),
        };
        let iptables = iptables_for(dst);
        let (dst, port) = (dst.to_string(), port.to_string());
        for protocol in protocols {
            let mut args = vec![
                "-I", "FORWARD", "-p", protocol, "-d", &dst, "--dport", &port,
            ];
            args.extend_from_slice(action);
            run_in(&router, iptables, &args)?;
        }
        Ok(())
    }

    fn snat_to_single_port(&self, dst: std::net::IpAddr, port: u16) -> io::Result<()> {
        let (iptables, to_source) = match dst {
            std::net::IpAddr::V4(_) => {
                ("iptables", format!("{}:{SINGLE_SNAT_PORT}", addr::NODE_IP))
            }
            std::net::IpAddr::V6(_) => (
                "ip6tables",
                format!("[{}]:{SINGLE_SNAT_PORT}", addr::NODE_IP6),
            ),
        };
        let (dst, port) = (dst.to_string(), port.to_string());
        run_in(
            &self.node_netns(),
            iptables,
            &[
                "-t",
                "nat",
                "-I",
                "POSTROUTING",
                "-p",
                "tcp",
                "-d",
                &dst,
                "--dport",
                &port,
                "-o",
                "eth0",
                "-j",
                "SNAT",
                "--to-source",
                &to_source,
            ],
        )
        .map(drop)
    }

    /// Starts `program args` in `pod` (its netns, cgroup and resolv.conf), like `kubectl exec`.
    pub fn spawn_in_pod(&self, pod: &LabPod, program: &str, args: &[&str]) -> io::Result<Child> {
        let mut command = Command::new(program);
        command.args(args);
        process::log_to(
            &mut command,
            &self.state_dir.join(format!("exec-{}.log", pod.name)),
        )?;
        process::spawn(
            command,
            &Placement {
                netns: &pod.netns,
                cgroup: &pod.cgroup,
                resolv_conf: Some(&pod.resolv_conf),
            },
        )
    }

    /// Runs `program args` in `pod` to completion and returns what it printed; a failure
    /// is an error with its output.
    pub fn output_in_pod(&self, pod: &LabPod, program: &str, args: &[&str]) -> io::Result<String> {
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let child = process::spawn(
            command,
            &Placement {
                netns: &pod.netns,
                cgroup: &pod.cgroup,
                resolv_conf: Some(&pod.resolv_conf),
            },
        )?;
        let output = child.wait_with_output()?;
        if !output.status.success() {
            return Err(io::Error::other(format!(
                "`{program} {}` in {} failed ({}): {}",
                args.join(" "),
                pod.key(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Runs `program args` in `pod` to completion and returns its exit status and pid.
    pub fn exec_in_pod(
        &self,
        pod: &LabPod,
        program: &str,
        args: &[&str],
    ) -> io::Result<(u32, std::process::ExitStatus)> {
        let mut child = self.spawn_in_pod(pod, program, args)?;
        let pid = child.id();
        Ok((pid, child.wait()?))
    }

    /// Makes `count` TCP connections from `pod` to `endpoint` (`ip:port`), one after the
    /// other, each closed at once; whether every one was established.
    pub fn connect_burst(&self, pod: &LabPod, endpoint: &str, count: u32) -> io::Result<bool> {
        let helper = lab_helper()?;
        let helper = helper
            .to_str()
            .ok_or_else(|| io::Error::other("non-UTF-8 lab helper path"))?;
        let count = count.to_string();
        let (_, status) =
            self.exec_in_pod(pod, helper, &["connect-burst", endpoint, "--count", &count])?;
        Ok(status.success())
    }

    /// Adds a ClusterIP Service: kube-proxy's DNAT rule in the node namespace (cluster IP
    /// and port to the backend pod's address and target port), and the Service and
    /// EndpointSlice manifests in the cluster state.
    pub fn add_cluster_ip_service(
        &self,
        namespace: &str,
        name: &str,
        cluster_ip: std::net::Ipv4Addr,
        port: u16,
        backend: &LabPod,
        target_port: u16,
    ) -> io::Result<()> {
        let (ip, port_text) = (cluster_ip.to_string(), port.to_string());
        let backend_address = format!("{}:{target_port}", backend.ip);
        let rule = [
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-d",
            &ip,
            "-p",
            "tcp",
            "--dport",
            &port_text,
            "-j",
            "DNAT",
            "--to-destination",
            &backend_address,
        ];
        self.run_on_node("iptables", &rule)?;
        let manifests =
            manifest::service_manifests(namespace, name, cluster_ip, port, backend, target_port);
        fs::write(
            self.cluster_state()
                .join(format!("{namespace}_{name}_service.json")),
            manifests,
        )
    }

    /// Applies NetworkPolicies (JSON objects, as `kubectl get networkpolicy -o json`
    /// prints them): writes them to the cluster state and enforces them with iptables
    /// rules in the node's namespace ([`network_policy`]). Call it once, with all of them.
    pub fn apply_network_policies(&self, policies: &[serde_json::Value]) -> io::Result<()> {
        let rules = network_policy::iptables_rules(policies, &self.pods)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        for rule in rules {
            let args: Vec<&str> = rule.iter().map(String::as_str).collect();
            self.run_on_node("iptables", &args)?;
        }
        self.publish_network_policies(policies)
    }

    /// Adds NetworkPolicy manifests to the cluster state only, without enforcing them in
    /// iptables: an eBPF CNI's enforcement ([`Fault::EbpfDrop`]) stands in for them.
    pub fn publish_network_policies(&self, policies: &[serde_json::Value]) -> io::Result<()> {
        for policy in policies {
            let name = policy["metadata"]["name"].as_str().unwrap_or("policy");
            let namespace = policy["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default");
            fs::write(
                self.cluster_state()
                    .join(format!("{namespace}_{name}_networkpolicy.json")),
                serde_json::to_string_pretty(policy)?,
            )?;
        }
        Ok(())
    }

    /// Runs `program args` to completion in a pod's network namespace (its own iptables
    /// rules, as a sidecar's init container would add).
    pub fn run_in_pod_netns(
        &self,
        pod: &LabPod,
        program: &str,
        args: &[&str],
    ) -> io::Result<String> {
        run_in(&pod.netns, program, args)
    }

    /// Runs `program args` to completion in the node's network namespace (for `conntrack`,
    /// `iptables`, … in tests) and returns its standard output.
    pub fn run_on_node(&self, program: &str, args: &[&str]) -> io::Result<String> {
        run_in(&self.node_netns(), program, args)
    }

    /// Starts a process in the node's network namespace (as a hostNetwork DaemonSet pod
    /// runs) inside the lab's cgroup, so teardown ends it even if the caller forgets.
    /// Stdio is as the caller set it on `command`.
    pub fn spawn_on_node(&self, command: Command) -> io::Result<Child> {
        let cgroup = self.cgroup_parent.join("infra").join("node");
        fs::create_dir_all(&cgroup)?;
        process::spawn(
            command,
            &Placement {
                netns: &self.node_netns(),
                cgroup: &cgroup,
                resolv_conf: None,
            },
        )
    }

    fn ns(&self, role: &str) -> String {
        format!("{PREFIX}{}-{role}", self.id)
    }

    fn add_netns(&mut self, role: &str) -> io::Result<String> {
        let name = self.ns(role);
        run("ip", &["netns", "add", &name])?;
        self.netns.push(name.clone());
        run("ip", &["-n", &name, "link", "set", "lo", "up"])?;
        // No duplicate address detection: link-local addresses would stay tentative for a
        // second and the first IPv6 packets of a test would be lost to it.
        for scope in ["all", "default"] {
            sysctl(&name, &format!("net/ipv6/conf/{scope}/accept_dad"), "0")?;
        }
        Ok(name)
    }

    fn build_network(&mut self) -> io::Result<()> {
        let node = self.add_netns("node")?;
        let up = self.add_netns("up")?;
        let up2 = self.add_netns("up2")?;
        let inet = self.add_netns("inet")?;
        let dns = self.add_netns("dns")?;

        // Links are created inside the namespaces (`ip -n`), never in the root namespace.
        veth(&node, "eth0", &up, "eth-node")?;
        veth(&up, "eth-inet", &up2, "eth-r1")?;
        veth(&up2, "eth-inet", &inet, "eth0")?;
        veth(&node, "kube-dns", &dns, "eth0")?;
        ip(&node, &["link", "add", "cni0", "type", "bridge"])?;
        ip(&node, &["link", "set", "cni0", "up"])?;

        addr_add(&node, "eth0", &format!("{}/24", addr::NODE_IP))?;
        addr_add(&node, "eth0", &format!("{}/64", addr::NODE_IP6))?;
        addr_add(&node, "cni0", &format!("{}/24", addr::POD_GATEWAY))?;
        addr_add(&node, "cni0", &format!("{}/64", addr::POD_GATEWAY6))?;
        addr_add(&node, "kube-dns", &format!("{}/30", addr::DNS_LINK_NODE))?;
        ip(
            &node,
            &[
                "route",
                "add",
                "default",
                "via",
                &addr::UPSTREAM_NODE_SIDE.to_string(),
            ],
        )?;
        ip(
            &node,
            &[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &addr::UPSTREAM_NODE_SIDE6.to_string(),
            ],
        )?;
        ip(
            &node,
            &[
                "route",
                "add",
                &format!("{}/32", addr::CLUSTER_DNS),
                "via",
                &addr::DNS_LINK_DNS.to_string(),
            ],
        )?;

        addr_add(&up, "eth-node", &format!("{}/24", addr::UPSTREAM_NODE_SIDE))?;
        addr_add(
            &up,
            "eth-node",
            &format!("{}/64", addr::UPSTREAM_NODE_SIDE6),
        )?;
        addr_add(&up, "eth-inet", &format!("{}/25", addr::UPSTREAM_INET_SIDE))?;
        addr_add(
            &up,
            "eth-inet",
            &format!("{}/64", addr::UPSTREAM_INET_SIDE6),
        )?;
        addr_add(&up2, "eth-r1", &format!("{}/25", addr::ROUTER2))?;
        addr_add(&up2, "eth-r1", &format!("{}/64", addr::ROUTER2_6))?;
        addr_add(&up2, "eth-inet", &format!("{}/25", addr::ROUTER2_INET_SIDE))?;
        addr_add(
            &up2,
            "eth-inet",
            &format!("{}/64", addr::ROUTER2_INET_SIDE6),
        )?;
        // Router 1 reaches the internet's prefixes through router 2, which reaches them
        // on its link to the internet host and everything else back through router 1.
        let (router2, router2_6) = (addr::ROUTER2.to_string(), addr::ROUTER2_6.to_string());
        let (internet, internet6) = (
            addr::INTERNET_IP.to_string(),
            addr::INTERNET_IP6.to_string(),
        );
        for (router, via, via6) in [(&up, &router2, &router2_6), (&up2, &internet, &internet6)] {
            for prefix in ["203.0.113.0/24", "192.0.2.0/24"] {
                ip(router, &["route", "add", prefix, "via", via])?;
            }
            ip(
                router,
                &["-6", "route", "add", "2001:db8:10::/48", "via", via6],
            )?;
        }
        ip(
            &up2,
            &[
                "route",
                "add",
                "default",
                "via",
                &addr::UPSTREAM_INET_SIDE.to_string(),
            ],
        )?;
        ip(
            &up2,
            &[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &addr::UPSTREAM_INET_SIDE6.to_string(),
            ],
        )?;

        addr_add(&inet, "eth0", &format!("{}/25", addr::INTERNET_IP))?;
        addr_add(&inet, "eth0", &format!("{}/64", addr::INTERNET_IP6))?;
        addr_add(&inet, "lo", &format!("{}/32", addr::ENDPOINT))?;
        addr_add(&inet, "lo", &format!("{}/128", addr::ENDPOINT6))?;
        addr_add(&inet, "lo", &format!("{}/32", addr::UPSTREAM_DNS))?;
        addr_add(&inet, "lo", &format!("{}/32", addr::BROKEN_DNS))?;
        ip(
            &inet,
            &[
                "route",
                "add",
                "default",
                "via",
                &addr::ROUTER2_INET_SIDE.to_string(),
            ],
        )?;
        ip(
            &inet,
            &[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &addr::ROUTER2_INET_SIDE6.to_string(),
            ],
        )?;

        addr_add(&dns, "eth0", &format!("{}/30", addr::DNS_LINK_DNS))?;
        addr_add(&dns, "lo", &format!("{}/32", addr::CLUSTER_DNS))?;
        // Forwarded queries leave from the Service IP, which the node masquerades.
        ip(
            &dns,
            &[
                "route",
                "add",
                "default",
                "via",
                &addr::DNS_LINK_NODE.to_string(),
                "src",
                &addr::CLUSTER_DNS.to_string(),
            ],
        )?;

        for router in [&node, &up, &up2] {
            sysctl(router, "net/ipv4/ip_forward", "1")?;
            sysctl(router, "net/ipv6/conf/all/forwarding", "1")?;
        }
        // Pods and cluster DNS leave the node masqueraded behind the node's address, as
        // on AKS with kubenet/overlay.
        for source in [addr::POD_CIDR, addr::SERVICE_CIDR] {
            run_in(
                &node,
                "iptables",
                &[
                    "-t",
                    "nat",
                    "-A",
                    "POSTROUTING",
                    "-s",
                    source,
                    "-o",
                    "eth0",
                    "-j",
                    "MASQUERADE",
                ],
            )?;
        }
        run_in(
            &node,
            "ip6tables",
            &[
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-s",
                addr::POD_CIDR6,
                "-o",
                "eth0",
                "-j",
                "MASQUERADE",
            ],
        )?;
        Ok(())
    }

    fn start_services(&mut self) -> io::Result<()> {
        let dnsmasq = which("dnsmasq")?;
        let common = [
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-hosts",
            "--no-resolv",
            "--bind-interfaces",
            "--pid-file=",
            "--user=root",
            "--cache-size=0",
            "--log-facility=-",
            "--log-queries",
        ];
        let big_hosts = self.state_dir.join("big-hosts");
        let lines: String = (0..addr::BIG_NAME_ADDRESSES)
            .map(|i| format!("203.0.113.{} {}\n", 100 + u16::from(i), addr::BIG_NAME))
            .collect();
        fs::write(&big_hosts, lines)?;
        // Upstream DNS in the "internet": authoritative for example.test.
        let mut upstream = Command::new(&dnsmasq);
        upstream.args(common).args([
            &format!("--listen-address={}", addr::UPSTREAM_DNS),
            "--except-interface=eth0",
            "--local=/example.test/",
            &format!(
                "--host-record={},{},{}",
                addr::ENDPOINT_NAME,
                addr::ENDPOINT,
                addr::ENDPOINT6
            ),
            &format!("--addn-hosts={}", big_hosts.display()),
            &format!("--server=/{}/{}", addr::SERVFAIL_ZONE, addr::BROKEN_DNS),
        ]);
        self.spawn_service("upstream-dns", upstream, "inet")?;
        // Cluster DNS (the CoreDNS Service IP), forwarding everything else upstream.
        let mut cluster = Command::new(&dnsmasq);
        cluster.args(common).args([
            &format!("--listen-address={}", addr::CLUSTER_DNS),
            "--local=/cluster.local/",
            "--host-record=kubernetes.default.svc.cluster.local,10.0.0.1",
            &format!("--server={}", addr::UPSTREAM_DNS),
        ]);
        self.spawn_service("cluster-dns", cluster, "dns")?;
        // The HTTP endpoint.
        let mut endpoint = Command::new(lab_helper()?);
        endpoint.args([
            "serve-http",
            "--listen",
            &format!("{}:{}", addr::ENDPOINT, addr::HTTP_PORT),
            "--listen",
            &format!("[{}]:{}", addr::ENDPOINT6, addr::HTTP_PORT),
        ]);
        self.spawn_service("endpoint", endpoint, "inet")?;
        // On the same host: a port answering 503, and a proxy that answers 403 to
        // everything, CONNECT included.
        for (name, port, status) in [
            ("endpoint-503", addr::ERROR_PORT, "503"),
            ("proxy", addr::PROXY_PORT, "403"),
        ] {
            let mut server = Command::new(lab_helper()?);
            server.args([
                "serve-http",
                "--listen",
                &format!("{}:{port}", addr::ENDPOINT),
                "--status",
                status,
            ]);
            self.spawn_service(name, server, "inet")?;
        }
        // A sink that accepts and closes at once: the benchmarks' endpoint.
        let mut sink = Command::new(lab_helper()?);
        sink.args([
            "serve-sink",
            "--listen",
            &format!("{}:{}", addr::ENDPOINT, addr::SINK_PORT),
        ]);
        self.spawn_service("sink", sink, "inet")?;
        // The broken authoritative server of the SERVFAIL zone.
        let mut broken = Command::new(lab_helper()?);
        broken.args([
            "serve-dns",
            "--listen",
            &format!("{}:53", addr::BROKEN_DNS),
            "--rcode",
            "2",
        ]);
        self.spawn_service("broken-dns", broken, "inet")?;
        Ok(())
    }

    fn spawn_service(&mut self, name: &str, mut command: Command, role: &str) -> io::Result<()> {
        let cgroup = self.cgroup_parent.join("infra").join(name);
        fs::create_dir_all(&cgroup)?;
        process::log_to(&mut command, &self.state_dir.join(format!("{name}.log")))?;
        let child = process::spawn(
            command,
            &Placement {
                netns: &self.ns(role),
                cgroup: &cgroup,
                resolv_conf: None,
            },
        )?;
        self.children.push(child);
        Ok(())
    }

    /// Builds `bpf/tc_drop.c` with clang for `dst:port` and attaches it at tc ingress of
    /// every pod's host-side veth (gone with the node's namespace at teardown).
    fn attach_tc_drop(&self, dst: std::net::Ipv4Addr, port: u16) -> io::Result<()> {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("bpf/tc_drop.c");
        let object = self.state_dir.join("tc_drop.o");
        run(
            "clang-22",
            &[
                "-O2",
                "-target",
                "bpf",
                // Debian keeps `asm/` of the kernel's headers under the multiarch directory.
                "-I/usr/include/x86_64-linux-gnu",
                &format!("-DDROP_ADDR={:#x}", u32::from(dst)),
                &format!("-DDROP_PORT={port}"),
                "-c",
                &source.to_string_lossy(),
                "-o",
                &object.to_string_lossy(),
            ],
        )?;
        let node = self.node_netns();
        for index in 0..self.pods.len() {
            let veth = format!("veth{index}");
            run_in(&node, "tc", &["qdisc", "add", "dev", &veth, "clsact"])?;
            run_in(
                &node,
                "tc",
                &[
                    "filter",
                    "add",
                    "dev",
                    &veth,
                    "ingress",
                    "bpf",
                    "direct-action",
                    "obj",
                    &object.to_string_lossy(),
                    "sec",
                    "tc",
                ],
            )?;
        }
        Ok(())
    }

    fn add_pod(&mut self, spec: &PodSpec, index: usize) -> io::Result<()> {
        let host = addr::FIRST_POD_HOST + index as u8;
        let pod_ip = std::net::Ipv4Addr::new(10, 244, 0, host);
        let pod_ip6: std::net::Ipv6Addr = format!("fd00:10:244::{host:x}")
            .parse()
            .expect("valid IPv6");
        let netns = self.add_netns(&format!("pod-{}", spec.name))?;
        let node = self.ns("node");
        let host_side = format!("veth{index}");
        veth(&node, &host_side, &netns, "eth0")?;
        ip(&node, &["link", "set", &host_side, "master", "cni0"])?;
        addr_add(&netns, "eth0", &format!("{pod_ip}/24"))?;
        addr_add(&netns, "eth0", &format!("{pod_ip6}/64"))?;
        ip(
            &netns,
            &[
                "route",
                "add",
                "default",
                "via",
                &addr::POD_GATEWAY.to_string(),
            ],
        )?;
        ip(
            &netns,
            &[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &addr::POD_GATEWAY6.to_string(),
            ],
        )?;

        let uid = random_uid();
        let container_id = format!("{:08x}", rand_u32()).repeat(8);
        let cgroup = self
            .cgroup_parent
            .join(pod_cgroup_path(spec.driver, &uid, &container_id));
        fs::create_dir_all(&cgroup)?;

        let resolv_conf = self.state_dir.join(format!("resolv-{}.conf", spec.name));
        fs::write(
            &resolv_conf,
            format!(
                "search {ns}.svc.cluster.local svc.cluster.local cluster.local\nnameserver {dns}\noptions {options}\n",
                ns = spec.namespace,
                dns = addr::CLUSTER_DNS,
                options = spec.resolver_options
            ),
        )?;
        let mut pod = LabPod {
            namespace: spec.namespace.clone(),
            name: spec.name.clone(),
            uid,
            ip: pod_ip,
            ipv6: pod_ip6,
            netns,
            cgroup,
            resolv_conf,
            pid: 0,
            labels: spec.labels.clone(),
            container_id: container_id.clone(),
        };
        let mut sleeper = Command::new("sleep");
        sleeper
            .arg("infinity")
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = process::spawn(
            sleeper,
            &Placement {
                netns: &pod.netns,
                cgroup: &pod.cgroup,
                resolv_conf: Some(&pod.resolv_conf),
            },
        )?;
        pod.pid = child.id();
        self.children.push(child);
        if let Some(port) = spec.http_port {
            let mut server = Command::new(lab_helper()?);
            server.args(["serve-http", "--listen", &format!("{}:{port}", pod.ip)]);
            process::log_to(
                &mut server,
                &self.state_dir.join(format!("http-{}.log", spec.name)),
            )?;
            let placement = Placement {
                netns: &pod.netns,
                cgroup: &pod.cgroup,
                resolv_conf: None,
            };
            self.children.push(process::spawn(server, &placement)?);
        }

        let manifest = PodManifest {
            namespace: &pod.namespace,
            name: &pod.name,
            uid: &pod.uid,
            labels: &spec.labels,
            ip: pod.ip,
            ipv6: pod.ipv6,
            node_name: &self.node_netns(),
            container_id: &container_id,
        };
        let path = self
            .cluster_state()
            .join(format!("{}_{}.json", pod.namespace, pod.name));
        fs::File::create(path)?.write_all(manifest.to_json().as_bytes())?;
        self.pods.push(pod);
        Ok(())
    }

    /// Waits until the endpoint answers from the node and cluster DNS resolves its name
    /// (through the upstream DNS).
    fn wait_ready(&self) -> io::Result<()> {
        let node = self.node_netns();
        let resolv_conf = self.state_dir.join("resolv-node.conf");
        fs::write(&resolv_conf, format!("nameserver {}\n", addr::CLUSTER_DNS))?;
        let cgroup = self.cgroup_parent.join("infra").join("node");
        fs::create_dir_all(&cgroup)?;
        let resolves = || -> io::Result<bool> {
            let mut getent = Command::new("getent");
            getent
                .args(["ahostsv4", addr::ENDPOINT_NAME])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let placement = Placement {
                netns: &node,
                cgroup: &cgroup,
                resolv_conf: Some(&resolv_conf),
            };
            Ok(process::spawn(getent, &placement)?.wait()?.success())
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let url = format!("http://{}:{}/", addr::ENDPOINT, addr::HTTP_PORT);
        loop {
            let http = run_in(&node, "curl", &["-s", "-o", "/dev/null", "-m", "1", &url]);
            let dns = resolves();
            if http.is_ok() && matches!(dns, Ok(true)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "lab {} did not become ready (http: {http:?}, dns resolves: {dns:?})\n{}",
                    self.id,
                    self.service_logs()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last lines of every service log, for failure messages (the state directory
    /// is gone after teardown).
    pub fn service_logs(&self) -> String {
        let mut text = String::new();
        for service in ["upstream-dns", "cluster-dns", "endpoint", "broken-dns"] {
            let log = fs::read_to_string(self.state_dir.join(format!("{service}.log")))
                .unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(10)..];
            text.push_str(&format!("--- {service}.log\n{}\n", tail.join("\n")));
        }
        text
    }

    /// Tears the lab down now (also done on drop); returns what could not be removed.
    pub fn teardown(mut self) -> io::Result<()> {
        self.teardown_inner()
    }

    fn teardown_inner(&mut self) -> io::Result<()> {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.children.clear();
        let result = cleanup::remove_lab(&self.id);
        self.netns.clear();
        result
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = self.teardown_inner() {
            eprintln!(
                "lab {}: teardown incomplete: {e}; run `cargo xtask lab-clean`",
                self.id
            );
        }
    }
}

/// The cgroup path of a container below the lab parent, as kubelet's driver lays it out.
pub fn pod_cgroup_path(driver: CgroupDriver, uid: &str, container_id: &str) -> PathBuf {
    match driver {
        CgroupDriver::Systemd => {
            let unit_uid = uid.replace('-', "_");
            PathBuf::from(format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{unit_uid}.slice/cri-containerd-{container_id}.scope"
            ))
        }
        CgroupDriver::Cgroupfs => {
            PathBuf::from(format!("kubepods/besteffort/pod{uid}/{container_id}"))
        }
    }
}

fn veth(ns_a: &str, name_a: &str, ns_b: &str, name_b: &str) -> io::Result<()> {
    ip(
        ns_a,
        &[
            "link", "add", name_a, "type", "veth", "peer", "name", name_b, "netns", ns_b,
        ],
    )?;
    ip(ns_a, &["link", "set", name_a, "up"])?;
    ip(ns_b, &["link", "set", name_b, "up"])
}

fn ip(netns: &str, args: &[&str]) -> io::Result<()> {
    let mut full = vec!["-n", netns];
    full.extend_from_slice(args);
    run("ip", &full).map(drop)
}

fn addr_add(netns: &str, dev: &str, cidr: &str) -> io::Result<()> {
    // nodad: IPv6 addresses are usable at once instead of after duplicate detection.
    if cidr.contains(':') {
        ip(netns, &["addr", "add", cidr, "dev", dev, "nodad"])
    } else {
        ip(netns, &["addr", "add", cidr, "dev", dev])
    }
}

fn sysctl(netns: &str, key: &str, value: &str) -> io::Result<()> {
    // /proc/sys/net is per network namespace: this only changes the lab's namespace.
    run_in(
        netns,
        "sh",
        &["-c", &format!("echo {value} > /proc/sys/{key}")],
    )
    .map(drop)
}

fn which(program: &str) -> io::Result<PathBuf> {
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
    {
        let candidate = Path::new(dir).join(program);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("{program} not found: run `cargo xtask setup` to install the lab's tools"),
    ))
}

/// The `lab` helper binary (HTTP endpoint and friends).
pub fn lab_helper() -> io::Result<PathBuf> {
    find_binary("EGRESS_LAB_HELPER", "lab")
}

/// A workspace binary: the path in `env_var`, or `name` next to the running executable
/// (cargo puts test binaries in `target/<profile>/deps/`, binaries one level up).
pub(crate) fn find_binary(env_var: &str, name: &str) -> io::Result<PathBuf> {
    if let Some(path) = std::env::var_os(env_var) {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!(
            "{name} was not found next to {}: run `cargo xtask build`, or set {env_var}",
            exe.display()
        ),
    ))
}

fn check_root() -> io::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the node lab needs root (network namespaces, cgroups, BPF): run it with sudo",
        ));
    }
    Ok(())
}

/// The cgroup v2 mount point. (The tracer has its own, fuller lookup; the lab does not
/// depend on the tracer crate because xtask, which must build before the BPF toolchain is
/// installed, depends on the lab.)
pub(crate) fn cgroup2_mount() -> io::Result<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    mountinfo
        .lines()
        .find_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            let mount_point = mount.split_whitespace().nth(4)?;
            (fs.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cgroup2 mount"))
}

fn rand_u32() -> u32 {
    let mut buf = [0u8; 4];
    // SAFETY: getrandom writes at most buf.len() bytes into buf.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    assert_eq!(n, 4, "getrandom failed");
    u32::from_ne_bytes(buf)
}

fn random_uid() -> String {
    let hex: String = (0..4).map(|_| format!("{:08x}", rand_u32())).collect();
    // RFC 4122 version 4 layout, as the API server generates.
    format!(
        "{}-{}-4{}-a{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[13..16],
        &hex[17..20],
        &hex[20..32]
    )
}

/// The iptables command for `dst`'s family.
fn iptables_for(dst: std::net::IpAddr) -> &'static str {
    if dst.is_ipv4() {
        "iptables"
    } else {
        "ip6tables"
    }
}
