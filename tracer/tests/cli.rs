//! The command line's answers to bad input: exit code 2 and a message that says what to do.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

const TRACER: &str = env!("CARGO_BIN_EXE_egress-tracer");

fn state_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("egress-tracer-cli-{test}-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    fs::write(
        dir.join("pods.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: default, uid: 6f1c2a3b-4d5e-4f60-8a9b-0c1d2e3f4a5b}\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata: {name: broken, namespace: shop}\nspec: {containers: 7}\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata: {name: client-2, namespace: default, uid: 11111111-2222-3333-4444-555555555555}\n",
    )
    .unwrap();
    dir
}

/// Runs the tracer where no Kubernetes configuration can be found.
fn tracer(args: &[&str]) -> Output {
    Command::new(TRACER)
        .args(args)
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("EGRESS_TRACER_CLUSTER_STATE")
        .output()
        .unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn is_root() -> bool {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn unknown_pod_lists_close_matches_and_exits_2() {
    let dir = state_dir("unknown");
    let output = tracer(&[
        "trace",
        "--cluster-state",
        dir.to_str().unwrap(),
        "--pod",
        "default/clinet",
    ]);
    assert_eq!(output.status.code(), Some(2));
    let err = stderr(&output);
    assert!(
        err.contains(
            "error: pod default/clinet not found; did you mean: default/client, default/client-2?"
        ),
        "{err}"
    );
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn malformed_object_is_named_and_the_rest_still_loads() {
    let dir = state_dir("malformed");
    let output = tracer(&[
        "trace",
        "--cluster-state",
        dir.to_str().unwrap(),
        "--pod",
        "default/clien",
    ]);
    let err = stderr(&output);
    let file = dir.join("pods.yaml");
    assert!(
        err.contains(&format!(
            "warning: skipped {} (document 2), Pod shop/broken: ",
            file.display()
        )),
        "{err}"
    );
    // Documents 1 and 3 were loaded: both are suggested.
    assert!(
        err.contains("did you mean: default/client, default/client-2?"),
        "{err}"
    );
    assert_eq!(output.status.code(), Some(2));
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn usage_errors_exit_2() {
    let cases: [(&[&str], &str); 11] = [
        (
            &["trace", "--pod", "default/client"],
            "needs the cluster state: pass --cluster-state PATH",
        ),
        (
            &[
                "trace",
                "--cluster-state",
                "/nonexistent/state",
                "--pod",
                "a/b",
            ],
            "cannot read cluster state at /nonexistent/state",
        ),
        (
            &["trace", "--duration", "soon"],
            "invalid value 'soon' for '--duration <D>'",
        ),
        (&["trace", "--duration", "0s"], "must be longer than zero"),
        (&["trace", "--duration", "0"], "must be longer than zero"),
        (
            &["trace", "--duration", "9999999d"],
            "must be at most a year",
        ),
        (
            &["trace", "--pod", "client"],
            "invalid value 'client' for '--pod <NS/NAME>': give the pod as NAMESPACE/NAME",
        ),
        (
            &["diagnose", "--pod", "Shop/Web", "10.0.0.1:80"],
            "give the pod as NAMESPACE/NAME in lower case",
        ),
        (
            &["trace", "--agent", "auto", "--agent-namespace", "Bad_NS"],
            "invalid value 'Bad_NS' for '--agent-namespace <NS>': not a namespace name",
        ),
        (
            &["agent", "--flows-max-records", "0"],
            "invalid value '0' for '--flows-max-records <N>'",
        ),
        (
            &["trace", "-o", "xml"],
            "invalid value 'xml' for '--output <OUTPUT>'",
        ),
    ];
    for (args, message) in cases {
        let output = tracer(args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
        assert!(
            stderr(&output).contains(message),
            "{args:?}: {}",
            stderr(&output)
        );
    }
}

#[test]
fn help_teaches_the_commands() {
    let output = tracer(&["trace", "--help"]);
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for needle in [
        "--pod <NS/NAME>",
        "--cluster-state <PATH>",
        "--duration <D>",
        "kubectl get pods -A -o yaml",
    ] {
        assert!(help.contains(needle), "missing {needle:?} in:\n{help}");
    }
    let output = tracer(&["--help"]);
    let help = String::from_utf8_lossy(&output.stdout);
    for needle in ["trace ", "policy ", "diagnose ", "which hop stops them"] {
        assert!(help.contains(needle), "missing {needle:?} in:\n{help}");
    }
    // The internal probe is not advertised.
    assert!(!help.contains("probe "), "{help}");
}

/// Without privileges the tracer names the capabilities it lacks. As root the test drops
/// to an unprivileged user with `setpriv` to see that message.
#[test]
fn unprivileged_run_names_missing_capabilities() {
    let output = if is_root() {
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
                TRACER,
                "trace",
            ])
            .output()
            .unwrap()
    } else {
        tracer(&["trace"])
    };
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains(
            "missing capabilities CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN: run egress-tracer as root"
        ),
        "{}",
        stderr(&output)
    );
}

#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn missing_kernel_btf_is_an_environment_error() {
    let output = tracer(&["trace", "--btf", "/nonexistent/vmlinux"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("no kernel BTF at /nonexistent/vmlinux"),
        "{}",
        stderr(&output)
    );
    assert!(!Path::new("/nonexistent/vmlinux").exists());
}

#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn a_pod_not_running_here_is_traced_with_a_warning() {
    let dir = state_dir("absent");
    let output = tracer(&[
        "trace",
        "--cluster-state",
        dir.to_str().unwrap(),
        "--pod",
        "default/client",
        "--duration",
        "1",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("warning: pod default/client has no cgroups on this node"),
        "{}",
        stderr(&output)
    );
    fs::remove_dir_all(dir).unwrap();
}

fn policy_state(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "egress-tracer-policy-{test}-{}",
        std::process::id()
    ));
    fs::create_dir_all(&dir).unwrap();
    fs::write(
        dir.join("state.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop, uid: u1, labels: {app: web}}\nstatus: {podIP: 10.244.0.10}\n\
         ---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-egress, namespace: shop}\n\
         spec: {podSelector: {matchLabels: {app: web}}, policyTypes: [Egress], egress: [{ports: [{port: 443}]}]}\n",
    )
    .unwrap();
    dir
}

#[test]
fn policy_exits_1_when_denied_and_explains_it_in_json() {
    let dir = policy_state("denied");
    let state = dir.to_str().unwrap();
    let output = tracer(&[
        "policy",
        "--cluster-state",
        state,
        "--pod",
        "shop/web",
        "--to",
        "10.0.0.10:53/UDP",
        "-o",
        "json",
    ]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let decision: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(decision["allowed"], false);
    assert_eq!(
        decision["policies"],
        serde_json::json!(["shop/deny-egress"])
    );
    assert_eq!(
        decision["denied_by"],
        serde_json::json!(["shop/deny-egress"])
    );
    assert_eq!(decision["allowed_by"], serde_json::Value::Null);
    assert_eq!(
        decision["explanation"],
        "shop/deny-egress selects shop/web (app=web) for egress; no egress rule allows UDP 53 to 10.0.0.10"
    );

    let output = tracer(&[
        "policy",
        "--cluster-state",
        state,
        "--pod",
        "shop/web",
        "--to",
        "203.0.113.10:443",
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.starts_with("ALLOWED  shop/web -> 203.0.113.10:443\n"),
        "{text}"
    );
    assert!(
        text.contains("shop/deny-egress egress[0] allows TCP 443 to 203.0.113.10"),
        "{text}"
    );
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn policy_usage_errors_exit_2() {
    let dir = policy_state("usage");
    let state = dir.to_str().unwrap();
    for (args, expected) in [
        (
            vec!["--pod", "shop/web", "--to", "10.0.0.10"],
            "expected IP:PORT[/PROTO]",
        ),
        (
            vec!["--pod", "shop/web", "--to", "10.0.0.10:53/icmp"],
            "unknown protocol",
        ),
        (
            vec!["--pod", "shop/nope", "--to", "10.0.0.10:53"],
            "pod shop/nope not found",
        ),
    ] {
        let mut all = vec!["policy", "--cluster-state", state];
        all.extend(args);
        let output = tracer(&all);
        assert_eq!(output.status.code(), Some(2), "{all:?}");
        assert!(
            stderr(&output).contains(expected),
            "{all:?}: {}",
            stderr(&output)
        );
    }
    let output = tracer(&["policy", "--pod", "shop/web", "--to", "10.0.0.10:53"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("policy needs the cluster state: pass --cluster-state PATH"),
        "{}",
        stderr(&output)
    );
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn an_unreachable_api_server_is_an_error_naming_the_address() {
    let dir = std::env::temp_dir().join(format!("egress-tracer-kubeconfig-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    // A port nobody listens on.
    let address = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let kubeconfig = dir.join("config");
    fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: 'http://{address}'}}}}]\n\
             users: [{{name: u, user: {{}}}}]\ncontexts: [{{name: x, context: {{cluster: c, user: u}}}}]\ncurrent-context: x\n"
        ),
    )
    .unwrap();
    let output = Command::new(TRACER)
        .args(["policy", "--pod", "shop/web", "--to", "10.0.0.10:53/UDP"])
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("EGRESS_TRACER_CLUSTER_STATE")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains(&format!(
            "cannot reach the Kubernetes API at http://{address}/"
        )),
        "{}",
        stderr(&output)
    );
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn diagnose_bad_input_is_one_line_that_says_what_to_do() {
    let dir = std::env::temp_dir().join(format!("egress-tracer-diagnose-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    fs::write(
        dir.join("state.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop, uid: 0a1b2c3d-0000-4000-8000-000000000001}\n\
         spec: {nodeName: node-b, containers: [{name: c}]}\nstatus: {podIP: 10.244.0.10}\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata: {name: idle, namespace: shop, uid: 0a1b2c3d-0000-4000-8000-000000000002}\n\
         spec: {nodeName: node-a, containers: [{name: c}]}\nstatus: {podIP: 10.244.0.11}\n",
    )
    .unwrap();
    let state = dir.to_str().unwrap();
    let cases: [(&[&str], &str); 4] = [
        (
            &["--pod", "shop/web", "example.test"],
            "cannot read target \"example.test\": no port",
        ),
        (
            &["--pod", "shop/nope", "10.0.0.1:80"],
            "pod shop/nope not found",
        ),
        (
            &["--pod", "shop/web", "10.0.0.1:80"],
            "pod shop/web runs on node node-b, not on this node (node-a): run diagnose there",
        ),
        (
            &["--pod", "shop/idle", "10.0.0.1:80"],
            "pod shop/idle has no running container on this node",
        ),
    ];
    for (args, expected) in cases {
        let mut all = vec![
            "diagnose",
            "--cluster-state",
            state,
            "--node-name",
            "node-a",
        ];
        all.extend_from_slice(args);
        let output = tracer(&all);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{all:?}: {}",
            stderr(&output)
        );
        let err = stderr(&output);
        assert!(err.contains(expected), "{all:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{all:?}: {err}");
    }
    fs::remove_dir_all(dir).unwrap();
}
