//! Facts about the node the tracer runs on: where cgroup v2 is mounted, which
//! capabilities the process holds, and how to turn kernel timestamps into wall time.

use std::{
    fs, io,
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

/// How deep below the cgroup v2 root kubelet's pod cgroups are looked for: 1 on a node
/// (`/kubepods.slice`), 2 when kubelet runs with a cgroup root of its own (kind's
/// `kubelet.slice/kubelet-kubepods.slice`, the node lab's `elab-….slice/kubepods`), more
/// when the whole node runs in a container or a service's cgroup. The walk never enters
/// a pod root, so it stays small.
const POD_ROOT_DEPTH: usize = 6;

/// The cgroups kubelet keeps its pods below (`kubepods`, `kubepods.slice`, or
/// `…-kubepods.slice`, with either cgroup driver) within [`POD_ROOT_DEPTH`] levels of
/// `mount`, outermost only, sorted. Unreadable directories are skipped.
pub fn pod_cgroup_roots(mount: &Path) -> Vec<PathBuf> {
    let mut roots = Vec::new();
    let mut level = vec![mount.to_path_buf()];
    for _ in 0..POD_ROOT_DEPTH {
        let mut next = Vec::new();
        for dir in &level {
            let Ok(entries) = fs::read_dir(dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let path = entry.path();
                if entry
                    .file_name()
                    .to_str()
                    .is_some_and(crate::cluster::cgroup_path::is_kubepods_root)
                {
                    roots.push(path);
                } else {
                    next.push(path);
                }
            }
        }
        level = next;
    }
    roots.sort();
    roots
}

/// Finds the cgroup v2 mount point in a `/proc/self/mountinfo` text. On hybrid hosts
/// this is usually `/sys/fs/cgroup/unified`, on unified hosts (AKS) `/sys/fs/cgroup`.
pub fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        if fs.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mount_point = mount.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_octal(mount_point)))
    })
}

/// The cgroup v2 hierarchy: where this process's mount namespace has it, else where the
/// mount namespace of a parent process (or init) has it, reached through
/// `/proc/PID/root`. `ip netns exec` remounts `/sys` in a private mount namespace, which
/// hides the cgroup mounts below it; its parent still sees them.
pub fn cgroup2_mount() -> io::Result<PathBuf> {
    let own = fs::read_to_string("/proc/self/mountinfo")?;
    if let Some(mount) = cgroup2_mount_in(&own) {
        return Ok(mount);
    }
    let through = |pid: u32| {
        let mountinfo = fs::read_to_string(format!("/proc/{pid}/mountinfo")).ok()?;
        let mount = cgroup2_mount_in(&mountinfo)?;
        let path = Path::new(&format!("/proc/{pid}/root")).join(mount.strip_prefix("/").ok()?);
        path.is_dir().then_some(path)
    };
    if let Some(path) = ancestors().chain([1]).find_map(through) {
        return Ok(path);
    }
    mount_private_cgroup2().map_err(|e| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "no cgroup2 filesystem is mounted here (see /proc/self/mountinfo) nor reachable \
                 through a parent process, and mounting one privately failed ({e}); \
                 egress-tracer needs cgroup v2 to attach its hooks"
            ),
        )
    })
}

/// Mounts the cgroup v2 hierarchy on `/sys/fs/cgroup` in a mount namespace of this
/// process's own, so nothing changes for anyone else. Needs a single-threaded process.
fn mount_private_cgroup2() -> io::Result<PathBuf> {
    let target = PathBuf::from("/sys/fs/cgroup");
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let (root, target_c, fstype) = (c("/"), c("/sys/fs/cgroup"), c("cgroup2"));
    // SAFETY: plain syscalls on valid C strings.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(io::Error::last_os_error());
        }
        let private = libc::MS_REC | libc::MS_PRIVATE;
        if libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            private,
            std::ptr::null(),
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        if libc::mount(
            fstype.as_ptr(),
            target_c.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(target)
}

/// This process's parent, grandparent, … (at most 32 of them), by pid.
fn ancestors() -> impl Iterator<Item = u32> {
    let parent_of = |pid: &str| {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let ppid: u32 = status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))?
            .trim()
            .parse()
            .ok()?;
        (ppid > 1).then_some(ppid)
    };
    std::iter::successors(parent_of("self"), move |pid| parent_of(&pid.to_string())).take(32)
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Linux capabilities the tracer's hooks need (numbers from `linux/capability.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capability {
    NetAdmin = 12,
    SysPtrace = 19,
    SysAdmin = 21,
    Syslog = 34,
    Perfmon = 38,
    Bpf = 39,
}

impl Capability {
    pub fn name(self) -> &'static str {
        match self {
            Capability::NetAdmin => "CAP_NET_ADMIN",
            Capability::SysPtrace => "CAP_SYS_PTRACE",
            Capability::SysAdmin => "CAP_SYS_ADMIN",
            Capability::Syslog => "CAP_SYSLOG",
            Capability::Perfmon => "CAP_PERFMON",
            Capability::Bpf => "CAP_BPF",
        }
    }
}

/// The effective capability set of this process, from `/proc/self/status`.
pub fn effective_capabilities() -> io::Result<u64> {
    let status = fs::read_to_string("/proc/self/status")?;
    parse_cap_eff(&status)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no CapEff in /proc/self/status"))
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// Which of `needed` the set `effective` lacks. `CAP_SYS_ADMIN` stands in for `CAP_BPF`
/// and `CAP_PERFMON`, as on kernels before 5.8.
pub fn missing_capabilities(effective: u64, needed: &[Capability]) -> Vec<Capability> {
    let has = |cap: Capability| effective & (1u64 << cap as u32) != 0;
    needed
        .iter()
        .copied()
        .filter(|&cap| {
            let covered_by_sys_admin =
                matches!(cap, Capability::Bpf | Capability::Perfmon) && has(Capability::SysAdmin);
            !has(cap) && !covered_by_sys_admin
        })
        .collect()
}

/// Where the running kernel exposes its BTF (`CONFIG_DEBUG_INFO_BTF`).
pub const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Converts `CLOCK_MONOTONIC` timestamps (what `bpf_ktime_get_ns` returns) to wall time.
#[derive(Clone, Copy, Debug)]
pub struct MonotonicClock {
    /// Wall time at monotonic zero.
    epoch: SystemTime,
}

impl MonotonicClock {
    pub fn new() -> Self {
        let monotonic = monotonic_now();
        let wall = SystemTime::now();
        Self {
            epoch: wall - monotonic,
        }
    }

    pub fn to_wall(self, monotonic_ns: u64) -> SystemTime {
        self.epoch + Duration::from_nanos(monotonic_ns)
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

/// Current `CLOCK_MONOTONIC` reading.
/// The addresses of this network namespace's interfaces.
pub fn local_addresses() -> Vec<IpAddr> {
    let mut addresses = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list`, freed below with freeifaddrs; every node is read
    // only while the list is alive, and null pointers are checked.
    unsafe {
        if libc::getifaddrs(&mut list) != 0 {
            return addresses;
        }
        let mut node = list;
        while !node.is_null() {
            let address = (*node).ifa_addr;
            if !address.is_null() {
                match i32::from((*address).sa_family) {
                    libc::AF_INET => {
                        let v4 = &*(address as *const libc::sockaddr_in);
                        addresses.push(IpAddr::V4(std::net::Ipv4Addr::from(u32::from_be(
                            v4.sin_addr.s_addr,
                        ))));
                    }
                    libc::AF_INET6 => {
                        let v6 = &*(address as *const libc::sockaddr_in6);
                        addresses.push(IpAddr::V6(std::net::Ipv6Addr::from(v6.sin6_addr.s6_addr)));
                    }
                    _ => {}
                }
            }
            node = (*node).ifa_next;
        }
        libc::freeifaddrs(list);
    }
    addresses
}

pub fn monotonic_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The DNS servers the node itself uses: systemd-resolved's upstreams first (its
/// /etc/resolv.conf points at a local stub), then /etc/resolv.conf's, without loopback.
pub fn dns_servers() -> Vec<std::net::IpAddr> {
    let mut servers = Vec::new();
    for text in ["/run/systemd/resolve/resolv.conf", "/etc/resolv.conf"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
    {
        for server in crate::dns::resolver_config(&text).nameservers {
            if !server.is_loopback() && !servers.contains(&server) {
                servers.push(server);
            }
        }
    }
    servers
}

/// The running kernel's release (`uname -r`).
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|release| release.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// Most bytes read of a file a pod controls (a resolv.conf is a few hundred).
pub const MAX_POD_FILE_BYTES: u64 = 64 * 1024;

/// Why a pod's file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PodFileError {
    #[error("cannot open {path} in the root of process {pid}: {source}")]
    Open {
        pid: u32,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path} in the root of process {pid} is not a regular file")]
    NotRegular { pid: u32, path: String },
}

/// Reads `path` (relative, such as `etc/resolv.conf`) as process `pid` sees it, confined
/// to that process's root: a pod controls the file and everything on the way to it, so
/// symlinks resolve inside its root (an absolute one cannot reach the node's files),
/// magic links (`/proc/self/…`) are refused, the file must be a regular one (opened
/// without blocking: a FIFO cannot hang the reader, nor a device such as `/dev/zero`
/// feed it), and at most [`MAX_POD_FILE_BYTES`] are read.
pub fn read_pod_file(pid: u32, path: &str) -> Result<String, PodFileError> {
    use std::os::{
        fd::{FromRawFd, OwnedFd},
        unix::fs::OpenOptionsExt,
    };
    let open_error = |source: io::Error| PodFileError::Open {
        pid,
        path: path.to_owned(),
        source,
    };
    let root = fs::File::open(format!("/proc/{pid}/root")).map_err(open_error)?;
    let relative = std::ffi::CString::new(path.trim_start_matches('/'))
        .map_err(|e| open_error(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    // Found without opening it (O_PATH): opening a device node would run its driver's
    // open (a watchdog starts on it). Opened for reading only once it is a regular file.
    // SAFETY: an all-zero open_how is valid; the fields are set below.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2 with a directory descriptor we own, a NUL-terminated path and an
    // open_how of the size given.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            std::os::fd::AsRawFd::as_raw_fd(&root),
            relative.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(open_error(io::Error::last_os_error()));
    }
    // SAFETY: a new descriptor nothing else owns.
    let found = fs::File::from(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    let regular = found.metadata().map_err(open_error)?.file_type().is_file();
    if !regular {
        return Err(PodFileError::NotRegular {
            pid,
            path: path.to_owned(),
        });
    }
    // The very file found, reopened through its descriptor, without blocking.
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&found)
        ))
        .map_err(open_error)?;
    let mut bytes = Vec::new();
    io::Read::read_to_end(&mut io::Read::take(file, MAX_POD_FILE_BYTES), &mut bytes)
        .map_err(open_error)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pods_file_is_read_only_when_regular_and_only_so_far() {
        let dir = std::env::temp_dir().join(format!("egress-pod-file-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        // Paths relative to this process's root, as a pod's are to its own.
        let relative = |name: &str| dir.join(name).to_string_lossy().into_owned();
        let pid = std::process::id();
        fs::write(dir.join("resolv.conf"), "nameserver 10.0.0.10\n").unwrap();
        assert_eq!(
            read_pod_file(pid, &relative("resolv.conf")).unwrap(),
            "nameserver 10.0.0.10\n"
        );
        fs::write(dir.join("huge"), vec![b'#'; 200 * 1024]).unwrap();
        assert_eq!(
            read_pod_file(pid, &relative("huge")).unwrap().len() as u64,
            MAX_POD_FILE_BYTES
        );
        let fifo = std::ffi::CString::new(relative("fifo")).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        // Opened without blocking, and refused: nobody writes to it.
        assert!(matches!(
            read_pod_file(pid, &relative("fifo")),
            Err(PodFileError::NotRegular { .. })
        ));
        std::os::unix::fs::symlink("/dev/zero", dir.join("zero")).unwrap();
        assert!(matches!(
            read_pod_file(pid, &relative("zero")),
            Err(PodFileError::NotRegular { .. })
        ));
        std::os::unix::fs::symlink("/proc/self/fd/0", dir.join("magic")).unwrap();
        assert!(matches!(
            read_pod_file(pid, &relative("magic")),
            Err(PodFileError::Open { .. })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn finds_cgroup2_in_hybrid_layout() {
        let mountinfo = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(
            cgroup2_mount_in(mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn finds_cgroup2_in_unified_layout_with_optional_fields() {
        let mountinfo = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
";
        assert_eq!(
            cgroup2_mount_in(mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
    }

    #[test]
    fn unescapes_mount_points() {
        let mountinfo = "41 31 0:38 / /mnt/my\\040cgroups rw - cgroup2 none rw\n";
        assert_eq!(
            cgroup2_mount_in(mountinfo),
            Some(PathBuf::from("/mnt/my cgroups"))
        );
    }

    #[test]
    fn no_cgroup2() {
        let mountinfo = "32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(cgroup2_mount_in(mountinfo), None);
    }

    #[test]
    fn finds_the_outermost_pod_cgroup_roots_of_both_drivers() {
        let root = std::env::temp_dir().join(format!("pod-roots-test-{}", std::process::id()));
        for dir in [
            "system.slice/containerd.service",
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice",
            "kubelet.slice/kubelet-kubepods.slice/kubepods-pod2.slice",
            "lab.slice/kubepods/burstable/pod3",
            "s/t/u/v/w/kubepods.slice/kubepods-pod4.slice",
            "a/b/c/d/e/f/kubepods",
            "kubepods-besteffort.slice",
        ] {
            fs::create_dir_all(root.join(dir)).unwrap();
        }
        fs::write(root.join("kubepods"), "a file, not a cgroup").unwrap();
        let roots = pod_cgroup_roots(&root);
        let relative: Vec<_> = roots
            .iter()
            .map(|r| r.strip_prefix(&root).unwrap().to_str().unwrap())
            .collect();
        fs::remove_dir_all(&root).unwrap();
        assert_eq!(
            relative,
            [
                "kubelet.slice/kubelet-kubepods.slice",
                "kubepods.slice",
                "lab.slice/kubepods",
                "s/t/u/v/w/kubepods.slice"
            ]
        );
    }

    #[test]
    fn capabilities() {
        let status = "Name:\tx\nCapEff:\t000001c000001000\n";
        let eff = parse_cap_eff(status).unwrap();
        // CAP_NET_ADMIN (12), CAP_PERFMON (38), CAP_BPF (39) and bit 40.
        assert_eq!(
            missing_capabilities(
                eff,
                &[Capability::Bpf, Capability::Perfmon, Capability::NetAdmin]
            ),
            vec![]
        );
        assert_eq!(
            missing_capabilities(0, &[Capability::Bpf, Capability::NetAdmin]),
            vec![Capability::Bpf, Capability::NetAdmin]
        );
        let sys_admin_only = 1u64 << Capability::SysAdmin as u32;
        assert_eq!(
            missing_capabilities(
                sys_admin_only,
                &[Capability::Bpf, Capability::Perfmon, Capability::NetAdmin]
            ),
            vec![Capability::NetAdmin]
        );
    }
}
