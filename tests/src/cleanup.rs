//! Finding and removing lab objects: the teardown of one lab, stale labs whose test run
//! died, and `cargo xtask lab-clean`.
//!
//! A lab is identified by its id; everything it creates is named from it:
//! `/run/netns/elab-<id>-*`, the cgroup `<cgroup2>/elab-<id>.slice`, and the state
//! directory `/run/egress-lab/elab-<id>` (with the owning test process's pid in `owner`).

use std::{
    fs, io,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use crate::{PREFIX, cgroup2_mount, process};

/// Where labs keep their state (manifests, logs, owner pid).
pub fn state_root() -> PathBuf {
    PathBuf::from("/run/egress-lab")
}

/// What is left of a lab (or of all labs) on this machine.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Leftovers {
    pub netns: Vec<String>,
    pub cgroups: Vec<PathBuf>,
    pub state_dirs: Vec<PathBuf>,
}

impl Leftovers {
    pub fn is_empty(&self) -> bool {
        self.netns.is_empty() && self.cgroups.is_empty() && self.state_dirs.is_empty()
    }
}

/// Lab objects of lab `id`, or of every lab when `id` is `None`.
pub fn leftovers_of(id: Option<&str>) -> io::Result<Leftovers> {
    let prefix = match id {
        Some(id) => format!("{PREFIX}{id}"),
        None => PREFIX.to_owned(),
    };
    let matching = |dir: &Path, suffix_ok: &dyn Fn(&str) -> bool| -> Vec<String> {
        let Ok(entries) = fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|name| name.strip_prefix(&prefix).is_some_and(suffix_ok))
            .collect();
        names.sort();
        names
    };
    let exact_id = id.is_some();
    let netns = matching(Path::new("/run/netns"), &|rest| {
        !exact_id || rest.starts_with('-')
    });
    let cgroup_root = cgroup2_mount()?;
    let cgroups = matching(&cgroup_root, &|rest| !exact_id || rest == ".slice")
        .into_iter()
        .map(|n| cgroup_root.join(n))
        .collect();
    let state_dirs = matching(&state_root(), &|rest| !exact_id || rest.is_empty())
        .into_iter()
        .map(|n| state_root().join(n))
        .collect();
    Ok(Leftovers {
        netns,
        cgroups,
        state_dirs,
    })
}

/// Removes every object of lab `id`: ends its processes, deletes its namespaces,
/// cgroups and state.
pub fn remove_lab(id: &str) -> io::Result<()> {
    remove(&leftovers_of(Some(id))?)?;
    let left = leftovers_of(Some(id))?;
    if left.is_empty() {
        Ok(())
    } else {
        Err(io::Error::other(format!("could not remove {left:?}")))
    }
}

/// Creates a lab's state directory with its `owner` file already inside (built under a
/// temporary name, then renamed), so another run never sees a lab without an owner.
pub fn create_state_dir(dir: &Path) -> io::Result<()> {
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .expect("lab state dirs have a name");
    let temporary = dir.with_file_name(format!(".{name}.{}", std::process::id()));
    fs::create_dir_all(&temporary)?;
    fs::write(temporary.join("owner"), std::process::id().to_string())?;
    fs::rename(&temporary, dir)
}

/// How long a lab without an owner file must be untouched before it counts as abandoned.
const ABANDONED_TEARDOWN: std::time::Duration = std::time::Duration::from_secs(60);

/// Ids of the labs whose owning process has exited (a killed or crashed run, or a
/// teardown that failed); labs of running tests elsewhere on the machine are not stale.
pub fn stale_labs() -> Vec<String> {
    let Ok(entries) = fs::read_dir(state_root()) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let id = name.strip_prefix(PREFIX)?.to_owned();
            let owner = fs::read_to_string(entry.path().join("owner"))
                .ok()
                .and_then(|pid| pid.trim().parse::<u32>().ok());
            let stale = match owner {
                Some(pid) => !process::is_alive(pid),
                // Every lab is created with its owner file: without one it is being torn
                // down right now (by a test running in parallel), unless that teardown
                // died half-way, long enough ago.
                None => entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|modified| modified.elapsed().ok())
                    .is_some_and(|age| age > ABANDONED_TEARDOWN),
            };
            stale.then_some(id)
        })
        .collect()
}

/// Removes the labs whose owning process has exited.
pub fn clean_stale() -> io::Result<()> {
    for id in stale_labs() {
        remove_lab(&id)?;
    }
    Ok(())
}

/// Removes every lab on this machine (`cargo xtask lab-clean`); returns what was found.
pub fn clean_leftovers() -> io::Result<Leftovers> {
    let found = leftovers_of(None)?;
    remove(&found)?;
    let left = leftovers_of(None)?;
    if !left.is_empty() {
        return Err(io::Error::other(format!("could not remove {left:?}")));
    }
    Ok(found)
}

fn remove(found: &Leftovers) -> io::Result<()> {
    // Processes first: a namespace or cgroup with live members cannot really go away.
    for cgroup in &found.cgroups {
        kill_cgroup(cgroup)?;
    }
    // Another run cleaning stale labs at the same time (a test starting in parallel) may
    // remove any of these first: what is gone meanwhile is no error.
    for netns in &found.netns {
        kill_netns_members(netns);
        if let Err(err) = process::run("ip", &["netns", "del", netns])
            && Path::new("/run/netns").join(netns).exists()
        {
            return Err(err);
        }
    }
    for cgroup in &found.cgroups {
        remove_cgroup_tree(cgroup).or_else(unless_gone)?;
    }
    for dir in &found.state_dirs {
        fs::remove_dir_all(dir).or_else(unless_gone)?;
    }
    Ok(())
}

/// `Ok` for an error that says the thing is gone already.
fn unless_gone(err: io::Error) -> io::Result<()> {
    if err.kind() == io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(err)
    }
}

/// Ends every process in a cgroup subtree (cgroup.kill, Linux 5.14+) and waits for them.
fn kill_cgroup(cgroup: &Path) -> io::Result<()> {
    if !cgroup.exists() {
        return Ok(());
    }
    fs::write(cgroup.join("cgroup.kill"), "1")?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while has_processes(cgroup) {
        if Instant::now() > deadline {
            return Err(io::Error::other(format!(
                "processes in {} did not exit",
                cgroup.display()
            )));
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn has_processes(cgroup: &Path) -> bool {
    // cgroup.events "populated 1" covers the whole subtree.
    fs::read_to_string(cgroup.join("cgroup.events"))
        .map(|events| events.lines().any(|l| l == "populated 1"))
        .unwrap_or(false)
}

/// Processes still inside a lab namespace (started there by the lab, outside its cgroups).
fn kill_netns_members(netns: &str) {
    let Ok(pids) = process::run("ip", &["netns", "pids", netns]) else {
        return;
    };
    for pid in pids
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
    {
        // SAFETY: plain kill(2) of a process inside our own lab namespace.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

fn remove_cgroup_tree(cgroup: &Path) -> io::Result<()> {
    if !cgroup.exists() {
        return Ok(());
    }
    for entry in fs::read_dir(cgroup)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_cgroup_tree(&entry.path())?;
        }
    }
    // cgroupfs directories are removed with rmdir even though they list files.
    fs::remove_dir(cgroup)
}
