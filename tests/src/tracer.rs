//! Running `egress-tracer` in the lab's node namespace and collecting what it prints.

use std::{
    io::{self, BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc::{self, Receiver},
    thread,
    time::{Duration, Instant},
};

use crate::{Lab, process};

/// The line the tracer prints on stderr once its programs are attached.
const READY_MARKER: &str = "egress-tracer: tracing";
/// The line before it, listing where the cgroup hooks are attached.
const HOOKS_MARKER: &str = "egress-tracer: hooks attached to the cgroups ";

/// A running tracer.
pub struct Tracer {
    child: Child,
    stdout: Receiver<String>,
    stderr: Receiver<String>,
    stderr_seen: Vec<String>,
}

/// What a stopped tracer printed.
#[derive(Debug)]
pub struct TracerOutput {
    pub status: ExitStatus,
    pub stdout: Vec<String>,
    pub stderr: String,
}

/// What `diagnose` printed.
pub struct Diagnosis {
    pub status: ExitStatus,
    /// The JSON report (`null` if there was none, or for `table`).
    pub report: serde_json::Value,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl TracerOutput {
    /// The stdout lines parsed as JSON (NDJSON output).
    pub fn records(&self) -> Vec<serde_json::Value> {
        self.stdout
            .iter()
            .map(|line| {
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON: {line:?}: {e}"))
            })
            .collect()
    }
}

/// The egress-tracer binary: `EGRESS_TRACER_BIN`, or the one cargo built next to the
/// running executable.
pub fn tracer_binary() -> io::Result<PathBuf> {
    crate::find_binary("EGRESS_TRACER_BIN", "egress-tracer")
}

impl Tracer {
    /// Starts `egress-tracer ARGS` in the node namespace and waits until it is attached.
    pub fn start(lab: &Lab, args: &[&str]) -> io::Result<Self> {
        Self::start_with_env(lab, args, &[])
    }

    /// Starts `WRAPPER… egress-tracer ARGS` in the node namespace (a wrapper that ends by
    /// exec'ing its arguments, such as `capsh` or `unshare`, so the pid stays the tracer's).
    pub fn start_wrapped(lab: &Lab, wrapper: &[&str], args: &[&str]) -> io::Result<Self> {
        let (program, wrapper_args) = wrapper
            .split_first()
            .ok_or_else(|| io::Error::other("empty wrapper"))?;
        let mut command = Command::new(program);
        command.args(wrapper_args).arg(tracer_binary()?).args(args);
        Self::attach(lab.spawn_on_node(piped(command))?)
    }

    /// The same, with these environment variables set (e.g. `KUBECONFIG`).
    pub fn start_with_env(lab: &Lab, args: &[&str], env: &[(&str, &str)]) -> io::Result<Self> {
        let mut command = Command::new(tracer_binary()?);
        command.args(args).envs(env.iter().copied());
        Self::attach(lab.spawn_on_node(piped(command))?)
    }

    /// Starts `egress-tracer trace --pod POD -o json EXTRA…` on the lab's cluster state.
    pub fn trace_pod(lab: &Lab, pod: &str, extra: &[&str]) -> io::Result<Self> {
        let state = lab.cluster_state();
        let state = state
            .to_str()
            .ok_or_else(|| io::Error::other("non-UTF-8 state path"))?;
        let mut args = vec![
            "trace",
            "--cluster-state",
            state,
            "--pod",
            pod,
            "-o",
            "json",
        ];
        args.extend_from_slice(extra);
        Self::start(lab, &args)
    }

    /// Runs `egress-tracer diagnose -o json` in the node's namespace for `pod` and
    /// `target`, to completion.
    pub fn diagnose(lab: &Lab, pod: &str, target: &str, extra: &[&str]) -> io::Result<Diagnosis> {
        Self::diagnose_as(lab, pod, target, "json", extra)
    }

    /// The same, with the output format `format` (`json` or `table`).
    pub fn diagnose_as(
        lab: &Lab,
        pod: &str,
        target: &str,
        format: &str,
        extra: &[&str],
    ) -> io::Result<Diagnosis> {
        let state = lab.cluster_state();
        let node = lab.node_netns();
        // The lab's upstream DNS, unless the test names another.
        let upstream = crate::addresses::UPSTREAM_DNS.to_string();
        let default_upstream: &[&str] = if extra.contains(&"--upstream-dns") {
            &[]
        } else {
            &["--upstream-dns", &upstream]
        };
        let started = Instant::now();
        let output = Command::new("ip")
            .args(["netns", "exec", &node])
            .arg(tracer_binary()?)
            .args(["diagnose", "--cluster-state"])
            .arg(&state)
            .args(["--node-name", &node, "--pod", pod, target, "-o", format])
            .args(default_upstream)
            .args(extra)
            .stdin(Stdio::null())
            .output()?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        let report = serde_json::from_str(stdout.trim()).unwrap_or(serde_json::Value::Null);
        Ok(Diagnosis {
            status: output.status,
            report,
            stdout,
            stderr,
            elapsed: started.elapsed(),
        })
    }

    /// Starts it the way an operator would on a node: `ip netns exec NODE egress-tracer
    /// ARGS`, which also gives it a private mount namespace with a fresh `/sys`.
    pub fn start_with_ip_netns_exec(lab: &Lab, args: &[&str]) -> io::Result<Self> {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &lab.node_netns()])
            .arg(tracer_binary()?)
            .args(args);
        Self::attach(piped(command).spawn()?)
    }

    fn attach(mut child: Child) -> io::Result<Self> {
        let stdout = lines_of(child.stdout.take().expect("piped"));
        let stderr = lines_of(child.stderr.take().expect("piped"));
        let mut tracer = Tracer {
            child,
            stdout,
            stderr,
            stderr_seen: Vec::new(),
        };
        tracer.wait_ready(Duration::from_secs(20))?;
        Ok(tracer)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The cgroups the tracer said at start-up its hooks are attached to.
    pub fn hooked_cgroups(&self) -> Vec<PathBuf> {
        self.stderr_seen
            .iter()
            .find_map(|line| line.strip_prefix(HOOKS_MARKER))
            .map(|list| list.split(", ").map(PathBuf::from).collect())
            .unwrap_or_default()
    }

    fn wait_ready(&mut self, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    let ready = line.starts_with(READY_MARKER);
                    self.stderr_seen.push(line);
                    if ready {
                        return Ok(());
                    }
                }
                Err(_) => {
                    let _ = self.child.kill();
                    let status = self.child.wait()?;
                    return Err(io::Error::other(format!(
                        "tracer did not start ({status}); stderr:\n{}",
                        self.stderr_seen.join("\n")
                    )));
                }
            }
        }
    }

    /// Sends `signal` (SIGINT, SIGTERM) and collects the output after it exits; an exit
    /// other than success is an error.
    pub fn stop(self, signal: i32) -> io::Result<TracerOutput> {
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        self.finish()
    }

    /// Waits for the tracer to exit on its own (e.g. `--duration`).
    pub fn finish(mut self) -> io::Result<TracerOutput> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return Err(io::Error::other("tracer did not exit within 30 s"));
            }
            thread::sleep(Duration::from_millis(20));
        };
        let stdout: Vec<String> = self.stdout.iter().collect();
        self.stderr_seen.extend(self.stderr.iter());
        if !status.success() {
            return Err(io::Error::other(format!(
                "tracer exited with {status}; stderr:\n{}",
                self.stderr_seen.join("\n")
            )));
        }
        Ok(TracerOutput {
            status,
            stdout,
            stderr: self.stderr_seen.join("\n"),
        })
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if process::is_alive(self.child.id()) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn piped(mut command: Command) -> Command {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

fn lines_of(stream: impl io::Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// BPF programs and links held by a process, from `bpftool`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BpfObjects {
    pub programs: Vec<u64>,
    pub links: Vec<u64>,
}

impl BpfObjects {
    /// The programs and links `pid` holds file descriptors for (from `/proc/PID/fdinfo`,
    /// where the kernel prints `prog_id:` and `link_id:` for BPF fds).
    pub fn owned_by(pid: u32) -> io::Result<Self> {
        let mut objects = Self::default();
        for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
            let Ok(info) = std::fs::read_to_string(entry?.path()) else {
                continue;
            };
            let field = |name: &str| {
                info.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            };
            if let Some(link) = field("link_id:") {
                objects.links.push(link);
            } else if let Some(program) = field("prog_id:") {
                objects.programs.push(program);
            }
        }
        objects.programs.sort_unstable();
        objects.programs.dedup();
        objects.links.sort_unstable();
        Ok(objects)
    }

    /// Which of these objects still exist in the kernel, held by anyone (`bpftool`).
    pub fn still_present(&self) -> io::Result<Self> {
        let programs = ids(&["prog", "show"])?;
        let links = ids(&["link", "show"])?;
        Ok(Self {
            programs: self
                .programs
                .iter()
                .copied()
                .filter(|id| programs.contains(id))
                .collect(),
            links: self
                .links
                .iter()
                .copied()
                .filter(|id| links.contains(id))
                .collect(),
        })
    }

    /// Waits for the kernel to free these objects (it does so asynchronously after the
    /// last fd closes) and returns those still present after `timeout`.
    pub fn wait_gone(&self, timeout: Duration) -> io::Result<Self> {
        let deadline = Instant::now() + timeout;
        loop {
            let present = self.still_present()?;
            if present.is_empty() || Instant::now() > deadline {
                return Ok(present);
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn is_empty(&self) -> bool {
        self.programs.is_empty() && self.links.is_empty()
    }
}

fn ids(what: &[&str]) -> io::Result<Vec<u64>> {
    let mut args = vec!["-j"];
    args.extend_from_slice(what);
    let text = process::run("bpftool", &args)?;
    let objects: Vec<serde_json::Value> = serde_json::from_str(&text).map_err(io::Error::other)?;
    Ok(objects.iter().filter_map(|o| o["id"].as_u64()).collect())
}
