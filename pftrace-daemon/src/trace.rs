//! A finished (or in-progress) trace: the calls, the processes they came
//! from with their metadata and sampled CPU/memory, what was traced, and
//! the counters that say whether anything was lost. Output formats read this.

use serde::{Deserialize, Serialize};

use crate::{
    bpf::Counters,
    clock::WallClock,
    pairing::{Call, UnmatchedReturn},
    python::PyVersion,
};

/// A batch-system job a process belongs to, from its environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobId {
    /// The environment variable it came from: `SLURM_JOB_ID`, `FLUX_JOB_ID` or `LSB_JOBID`.
    pub variable: String,
    pub id: String,
}

/// A process that was traced.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TracedProcess {
    pub pid: u32,
    /// The interpreter binary or libpython that carries the probes.
    pub binary: String,
    pub version: Option<PyVersion>,
    /// Command line, space-joined.
    pub command: String,
    /// The process name (`/proc/PID/comm`).
    pub comm: String,
    pub job: Option<JobId>,
}

/// One reading of a process's CPU and memory, taken from procfs while it is traced.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ProcessSample {
    pub pid: u32,
    /// Monotonic ns (the clock of the call timestamps).
    pub ts_ns: u64,
    /// CPU utilisation since the previous sample, % of one core (user + system).
    pub cpu_percent: f64,
    /// User CPU seconds since the previous sample (what PerfFlowAspect's cpu_usage uses).
    pub user_cpu_s: f64,
    pub rss_bytes: u64,
    /// Peak resident memory so far (VmHWM).
    pub peak_rss_bytes: u64,
}

/// Everything an output format needs.
#[derive(Debug)]
pub struct Trace {
    pub names: Vec<String>,
    pub processes: Vec<TracedProcess>,
    pub calls: Vec<Call>,
    /// Per-process CPU and memory readings, oldest first.
    pub samples: Vec<ProcessSample>,
    /// The first returns without an entry (at most
    /// [`crate::pairing::UNMATCHED_SAMPLE`]); `unmatched_returns_total` counts them all.
    pub unmatched_returns: Vec<UnmatchedReturn>,
    pub unmatched_returns_total: u64,
    /// Returns without an entry from generator or coroutine frames (on
    /// CPython 3.15, runs resumed by `throw()` or `close()` fire no entry).
    pub unmatched_generator_returns: u64,
    /// Returns that closed entries above them on the stack (see pairing).
    pub skipped_entries: u64,
    pub counters: Counters,
    /// Records that user space could not decode.
    pub bad_records: u64,
    /// Call records whose file name was over PATH_MAX (4095 bytes) and cut.
    pub file_names_cut: u64,
    /// Records the kernel passed that user space dropped (path qualifier or
    /// glob did not match): the cost of those name forms.
    pub filtered_in_user_space: u64,
    /// Calls completed since tracing started, and how many of them were
    /// dropped from memory (`limits.max_calls_in_memory`) and so are not in `calls`.
    pub calls_total: u64,
    pub calls_evicted: u64,
    pub clock: WallClock,
    /// Monotonic ns when tracing started and stopped.
    pub start_ns: u64,
    pub end_ns: u64,
    /// The host the trace was taken on.
    pub hostname: String,
}

impl Trace {
    /// Calls closed as incomplete.
    pub fn incomplete_calls(&self) -> usize {
        self.calls.iter().filter(|c| c.end == crate::pairing::CallEnd::Incomplete).count()
    }

    /// The traced process with this pid, if known.
    pub fn process(&self, pid: u32) -> Option<&TracedProcess> {
        self.processes.iter().find(|p| p.pid == pid)
    }
}
