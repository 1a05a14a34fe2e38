//! Talking to an `egress-tracer agent` running in the lab's node namespace: HTTP
//! requests and follow streams through `curl` in that namespace, and the metrics parsed.

use std::{
    collections::BTreeMap,
    io::{self, BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc::{self, Receiver},
    thread,
    time::{Duration, Instant},
};

use crate::{Lab, process};

/// The port the agent listens on in the node namespace (each lab has its own).
pub const AGENT_PORT: u16 = 9090;

/// `--listen` for the agent.
pub fn listen_address() -> String {
    format!("127.0.0.1:{AGENT_PORT}")
}

/// `egress-tracer agent` arguments for this lab: its cluster state and node, listening on
/// [`listen_address`].
pub fn args(lab: &Lab) -> Vec<String> {
    vec![
        "agent".into(),
        "--cluster-state".into(),
        lab.cluster_state().to_string_lossy().into_owned(),
        "--node-name".into(),
        lab.node_netns(),
        "--listen".into(),
        listen_address(),
    ]
}

/// GET `path` (with its query) from the agent: (HTTP status, body).
pub fn get(lab: &Lab, path: &str) -> io::Result<(u16, String)> {
    get_from(lab, &listen_address(), path, &[])
}

/// GET `path` from an agent listening on `address`, with extra request headers.
pub fn get_from(
    lab: &Lab,
    address: &str,
    path: &str,
    headers: &[&str],
) -> io::Result<(u16, String)> {
    let url = format!("http://{address}{path}");
    let node = lab.node_netns();
    let mut args = vec![
        "netns",
        "exec",
        &node,
        "curl",
        "-sg",
        "-m",
        "10",
        "-w",
        "\n%{http_code}",
    ];
    for header in headers {
        args.extend(["-H", header]);
    }
    args.push(&url);
    let output = process::run("ip", &args)?;
    let (body, status) = output
        .trim_end()
        .rsplit_once('\n')
        .unwrap_or(("", output.trim()));
    let status = status
        .parse()
        .map_err(|_| io::Error::other(format!("no HTTP status from {url}: {output:?}")))?;
    // The body's own last newline is not part of what the tests compare.
    Ok((status, body.strip_suffix('\n').unwrap_or(body).to_owned()))
}

/// The metrics: each series (`name{labels}` as exposed) to its value.
pub fn metrics(lab: &Lab) -> io::Result<BTreeMap<String, f64>> {
    let (status, body) = get(lab, "/metrics")?;
    if status != 200 {
        return Err(io::Error::other(format!(
            "/metrics answered {status}: {body}"
        )));
    }
    Ok(parse_metrics(&body))
}

/// Parses the OpenMetrics text exposition.
pub fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Polls the metrics until `series` has the value `expected` or `timeout` passes; returns
/// the last value seen (0 when the series never appeared).
pub fn wait_for_metric(lab: &Lab, series: &str, expected: f64, timeout: Duration) -> f64 {
    let deadline = Instant::now() + timeout;
    loop {
        let value = metrics(lab)
            .ok()
            .and_then(|m| m.get(series).copied())
            .unwrap_or(0.0);
        if value == expected || Instant::now() > deadline {
            return value;
        }
        thread::sleep(Duration::from_millis(250));
    }
}

/// Runs `egress-tracer ARGS` in the node's namespace to completion: (status, stdout,
/// stderr).
pub fn run_cli_on_node(
    lab: &Lab,
    args: &[&str],
) -> io::Result<(std::process::ExitStatus, String, String)> {
    run_cli_on_node_with_env(lab, args, &[])
}

/// The same, with these environment variables set.
pub fn run_cli_on_node_with_env(
    lab: &Lab,
    args: &[&str],
    env: &[(&str, &str)],
) -> io::Result<(std::process::ExitStatus, String, String)> {
    let output = Command::new("ip")
        .args(["netns", "exec", &lab.node_netns()])
        .arg(crate::tracer::tracer_binary()?)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()?;
    Ok((
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

/// A `follow=true` stream being read.
pub struct Follow {
    child: Child,
    lines: Receiver<String>,
}

impl Follow {
    /// Opens `path` (a flows query with `follow=true`) and reads its lines.
    pub fn open(lab: &Lab, path: &str) -> io::Result<Self> {
        let url = format!("http://127.0.0.1:{AGENT_PORT}{path}");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &lab.node_netns(), "curl", "-sgN", &url])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Ok(Self { child, lines })
    }

    /// The lines received within `timeout`, until `done` says enough.
    pub fn read_until(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        let mut records = Vec::new();
        while !done(&records) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => records.push(
                    serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON: {line}: {e}")),
                ),
                Err(_) => break,
            }
        }
        records
    }

    /// Waits for the stream to end (the server closed it); true if it did within `timeout`.
    pub fn ends_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for Follow {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
