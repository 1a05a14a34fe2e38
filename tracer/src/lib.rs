//! egress-tracer: eBPF evidence for "why can't this pod reach X".
//!
//! The pipeline, in the order events flow through it:
//!
//! - [`capture`]: loads the kernel programs (`tracer-ebpf`), attaches them and decodes
//!   their ring-buffer events.
//! - [`cluster`]: the cluster model; maps a kernel cgroup id to the pod it belongs to.
//! - [`flow`]: joins the events of one egress attempt into one record.
//! - [`dns`]: parses DNS messages, pairs them, and groups them into lookups.
//! - [`pipeline`]: drives the above from kernel events to finished records.
//! - [`policy`]: the NetworkPolicy evaluator (which policy allows or denies a flow).
//! - [`verdict`]: which hop stopped an attempt, with the evidence.
//! - [`output`]: renders records as a table or NDJSON.
//! - [`metrics`]: the agent's Prometheus metrics; [`store`]: its bounded store of recent
//!   records for the flows API.
//!
//! [`diagnose`] runs the troubleshooting checklist for one target from inside a pod.
//! [`node`] holds facts about the host (cgroup mount, capabilities, clocks), and
//! [`conntrack`] the node's conntrack table: its counters and SNAT port usage.

/// Every record allocates its strings and old records are freed as new ones arrive: under
/// connection load glibc's allocator took about half of the agent's CPU (perf), mimalloc
/// halves the agent's CPU. Set here so that the agent, its tests and the benchmarks
/// measure the same allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Makes the allocator return freed memory to the system after 250 ms. mimalloc's default
/// waits a second, which under the agent's churn held two fifths more than 250 ms (the
/// pipeline bench's 100k attempts: 99 MiB against 71); 10 ms returned and faulted the
/// same pages in again so often that page faults took a fifth of the agent's CPU under
/// connection load (perf; 1.08-1.21 us of agent CPU per connection against 0.86-0.90 at
/// 250 ms, same memory). Binaries call this first.
pub fn release_freed_memory_promptly() {
    /// `mi_option_purge_delay` in mimalloc.h (in milliseconds); the Rust binding does
    /// not name it.
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    const DELAY_MS: std::ffi::c_long = 250;
    // SAFETY: sets a process-wide option; mimalloc reads options atomically.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, DELAY_MS) }
}

/// Puts the calling thread (and threads it starts later) under scheduling `policy`
/// (`libc::SCHED_BATCH`, `libc::SCHED_IDLE`: neither needs a privilege).
pub fn schedule_calling_thread(policy: libc::c_int) -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain syscall on the calling thread with a valid parameter.
    if unsafe { libc::sched_setscheduler(0, policy, &param) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

pub mod capture;
pub mod cluster;
pub mod conntrack;
pub mod diagnose;
pub mod dns;
pub mod flow;
pub mod metrics;
pub mod node;
pub mod output;
pub mod pipeline;
pub mod policy;
pub mod store;
pub mod verdict;
