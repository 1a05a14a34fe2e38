//! `cargo xtask demo`: a node lab, a traced pod making a few connections (some of them
//! failing in different places), the records.

use anyhow::Context;

use crate::{CgroupDriver, Fault, Lab, PodSpec, addresses as addr, tracer::Tracer};

pub fn run() -> anyhow::Result<()> {
    println!("demo: building a node lab (node, upstream router, internet, cluster DNS, two pods)…");
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
    let id = lab.id().to_owned();
    lab.teardown().context("lab teardown")?;
    println!("\ndemo: lab {id} removed; nothing is left behind.");
    Ok(())
}
