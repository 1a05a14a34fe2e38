//! Starting lab processes inside a network namespace and a cgroup, the way a container
//! runtime would: the process joins its cgroup and netns before `exec`, so its very first
//! instruction already runs "in the pod".

use std::{
    ffi::CString,
    fs::{File, OpenOptions},
    io,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::Path,
    process::{Child, Command, Stdio},
};

/// Where a process runs.
pub struct Placement<'a> {
    /// Name of a network namespace under `/run/netns`.
    pub netns: &'a str,
    /// Absolute path of the cgroup v2 directory to join.
    pub cgroup: &'a Path,
    /// A file bind-mounted over `/etc/resolv.conf` in a private mount namespace (a pod's
    /// own resolver configuration).
    pub resolv_conf: Option<&'a Path>,
}

/// Spawns `command` placed as described; stdio is whatever the caller set on `command`.
pub fn spawn(mut command: Command, placement: &Placement<'_>) -> io::Result<Child> {
    // Everything the child needs is prepared here: between fork and exec only raw
    // syscalls are allowed (no allocation, no locks).
    let netns = File::open(Path::new("/run/netns").join(placement.netns))?;
    let cgroup_procs = OpenOptions::new()
        .write(true)
        .open(placement.cgroup.join("cgroup.procs"))?;
    let resolv = match placement.resolv_conf {
        Some(path) => Some((
            CString::new(path.as_os_str().as_encoded_bytes())?,
            CString::new("/etc/resolv.conf")?,
        )),
        None => None,
    };
    let root = CString::new("/")?;
    let netns_fd = netns.as_raw_fd();
    let procs_fd = cgroup_procs.as_raw_fd();
    // SAFETY: the closure only makes async-signal-safe syscalls on data prepared above.
    unsafe {
        command.pre_exec(move || {
            // "0" moves the writing process itself.
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(io::Error::last_os_error());
            }
            if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some((source, target)) = &resolv {
                if libc::unshare(libc::CLONE_NEWNS) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // Keep our mounts from propagating back to the host.
                let flags = libc::MS_REC | libc::MS_SLAVE;
                if libc::mount(
                    std::ptr::null(),
                    root.as_ptr(),
                    std::ptr::null(),
                    flags,
                    std::ptr::null(),
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                if libc::mount(
                    source.as_ptr(),
                    target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = command.spawn();
    drop((netns, cgroup_procs));
    child
}

/// Sends a command's stdout and stderr to a log file (appending) and closes its stdin.
pub fn log_to(command: &mut Command, log: &Path) -> io::Result<()> {
    let file = OpenOptions::new().create(true).append(true).open(log)?;
    command
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    Ok(())
}

/// Runs a command to completion, failing with its output when it fails.
pub fn run(program: &str, args: &[&str]) -> io::Result<String> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    if !output.status.success() {
        return Err(io::Error::other(format!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs `program args` inside network namespace `netns` (`ip netns exec`).
pub fn run_in(netns: &str, program: &str, args: &[&str]) -> io::Result<String> {
    let mut full = vec!["netns", "exec", netns, program];
    full.extend_from_slice(args);
    run("ip", &full)
}

/// Whether a process with this pid exists (and is not a zombie we have reaped).
pub fn is_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence and permission.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}
