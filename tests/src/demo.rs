//! `cargo xtask demo`: a node lab, a traced pod making a few connections (some of them
//! failing in different places), the records; then `diagnose` on three contrasting
//! failures: a name that does not exist, a NetworkPolicy denial, and packets silently
//! dropped beyond the node.

use anyhow::Context;

use crate::{CgroupDriver, Fault, Lab, PodSpec, addresses as addr, tracer::Tracer};

/// `diagnose` answers "why can't this pod reach X" for three different reasons.
fn diagnose_three_failures(lab: &Lab) -> anyhow::Result<()> {
    println!(
        "\ndemo: now `egress-tracer diagnose`, the checklist from inside the pod, for three failures."
    );
    println!(
        "demo: a NetworkPolicy lets default/client out on ports 53, 80, 443, 8080 and 9443 only"
    );
    lab.apply_network_policies(&[serde_json::json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "no-8443", "namespace": "default"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "client"}},
            "policyTypes": ["Egress"],
            "egress": [{"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"},
                                  {"port": 80}, {"port": 443}, {"port": 8080}, {"port": 9443}]}],
        },
    })])?;
    println!("demo: and beyond the node, something silently drops port 9443 (an NSG would)");
    lab.inject(Fault::SilentDrop {
        dst: addr::ENDPOINT.into(),
        port: 9443,
    })?;
    let targets = [
        format!("http://{}/", addr::MISSING_NAME),
        format!("{}:8443", addr::ENDPOINT),
        format!("{}:9443", addr::ENDPOINT),
    ];
    for target in &targets {
        println!(
            "\ndemo: on the node: egress-tracer diagnose --pod default/client {target} --timeout 2s\n"
        );
        let diagnosis =
            Tracer::diagnose_as(lab, "default/client", target, "table", &["--timeout", "2s"])?;
        for line in diagnosis.stdout.lines() {
            println!("  {line}");
        }
    }
    Ok(())
}

pub fn run() -> anyhow::Result<()> {
    println!("demo: building a node lab (node, two routers, internet, cluster DNS, two pods)…");
    let lab = Lab::start(&[
        PodSpec::new("default", "client", CgroupDriver::Systemd),
        PodSpec::new("shop", "other", CgroupDriver::Cgroupfs),
    ])
    .context("cannot build the lab (try `cargo xtask lab-clean`, then again)")?;
    let blocked = std::net::IpAddr::V4(addr::ENDPOINT);
    println!(
        "demo: the upstream router rejects port 443 (ICMP admin-prohibited, as a firewall would)"
    );
    lab.inject(Fault::AdminProhibited {
        dst: blocked,
        port: 443,
    })?;
    println!("demo: the node's firewall drops port 8080");
    lab.inject(Fault::NodeFirewallDrop {
        dst: blocked,
        port: 8080,
    })?;

    let state = lab.cluster_state();
    let args = [
        "trace",
        "--cluster-state",
        state.to_str().context("UTF-8 path")?,
        "--pod",
        "default/client",
        "-o",
        "table",
    ];
    println!("demo: on the node: egress-tracer {}", args.join(" "));
    let tracer = Tracer::start(&lab, &args)?;

    let steps: [(&str, String); 7] = [
        ("client", format!("http://{}/", addr::ENDPOINT_NAME)),
        ("client", format!("http://[{}]/", addr::ENDPOINT6)),
        ("client", format!("http://{}/", addr::MISSING_NAME)),
        (
            "client",
            format!("http://{}:{}/", addr::ENDPOINT, addr::CLOSED_PORT),
        ),
        ("client", format!("http://{}:443/", addr::ENDPOINT)),
        ("client", format!("http://{}:8080/", addr::ENDPOINT)),
        ("other", format!("http://{}/", addr::ENDPOINT)),
    ];
    for (pod, url) in &steps {
        let pod = lab.pod(pod);
        let (pid, status) =
            lab.exec_in_pod(pod, "curl", &["-s", "-m", "2", "-o", "/dev/null", url])?;
        let result = if status.success() {
            "ok".to_owned()
        } else {
            format!("failed ({status})")
        };
        println!("demo: {}$ curl {url}   → pid {pid}, {result}", pod.key());
    }

    let output = tracer.stop(libc::SIGINT)?;
    println!("\ndemo: what egress-tracer saw for default/client (shop/other is filtered out):\n");
    for line in &output.stdout {
        println!("  {line}");
    }
    println!();
    for line in output
        .stderr
        .lines()
        .filter(|l| !l.starts_with("egress-tracer: tracing"))
    {
        println!("  {line}");
    }
    diagnose_three_failures(&lab)?;
    let id = lab.id().to_owned();
    lab.teardown().context("lab teardown")?;
    println!("\ndemo: lab {id} removed; nothing is left behind.");
    Ok(())
}
