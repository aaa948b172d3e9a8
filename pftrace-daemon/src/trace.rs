//! A finished (or in-progress) trace: the calls, the processes they came
//! from with their metadata and sampled CPU/memory, what was traced, and
//! the counters that say whether anything was lost. Output formats read this.

use std::{
    fmt,
    sync::{Arc, OnceLock},
};

use serde::{Deserialize, Serialize};

use crate::{
    bpf::Counters,
    clock::WallClock,
    output::{calls::CallSource, spill::SpillFile},
    pairing::{Call, UnmatchedReturn},
    protocol::FunctionStats,
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
    /// How it was traced: "usdt" (CPython's probes) or "agent" (the in-process agent).
    pub mechanism: crate::python::Mechanism,
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
    pub calls: CallList,
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
    /// Of those: by a qualified name or module, and of these, of code
    /// objects that could not be resolved.
    pub filtered_by_qualified_name: u64,
    pub filtered_unresolved: u64,
    /// Calls completed since tracing started, and how many of them were
    /// dropped from memory (`limits.max_calls_in_memory`) and so are not in `calls`.
    pub calls_total: u64,
    pub calls_evicted: u64,
    /// Every completed call, when the run writes a trace file (`calls` then
    /// holds only those still in memory): what the formats write.
    pub spilled: Option<SpillFile>,
    /// Per-function figures over every call completed while tracing ran,
    /// also those no longer in `calls` (the summary's); empty in dumps.
    pub functions: Vec<FunctionStats>,
    pub clock: WallClock,
    /// Monotonic ns when tracing started and stopped.
    pub start_ns: u64,
    pub end_ns: u64,
    /// The host the trace was taken on.
    pub hostname: String,
    /// What each call's function is (module, qualified name, args,
    /// locals), as resolved so far.
    pub codes: crate::codes::CodeTable,
}

impl Trace {
    /// Calls closed as incomplete.
    pub fn incomplete_calls(&self) -> usize {
        self.calls.iter().filter(|c| c.end == crate::pairing::CallEnd::Incomplete).count()
    }

    /// The calls an output format writes: every call (the spill) if kept, else those in memory.
    pub fn call_source(&self) -> CallSource<'_> {
        match &self.spilled {
            Some(spill) => CallSource::Spilled(spill),
            None => CallSource::Memory(&self.calls),
        }
    }

    /// The traced process with this pid, if known.
    pub fn process(&self, pid: u32) -> Option<&TracedProcess> {
        self.processes.iter().find(|p| p.pid == pid)
    }
}

/// A block of calls shared by the call store and the lists read from it.
/// A `Vec` behind the `Arc`, not an `Arc<[Call]>`: sealing a full block then
/// moves the vector in, where `Arc<[Call]>::from(Vec)` copied its 4096 calls
/// (about 480 KiB) into a new allocation; that copy was 4.0% of pftraced's
/// samples in a dense 3.9 launch (perf, 2026-11-27).
pub type CallBlock = Arc<Vec<Call>>;

/// Which calls of a [`CallList`] it holds.
pub type CallSelector = Arc<dyn Fn(&Call) -> bool + Send + Sync>;

/// The calls of a trace, oldest first: blocks shared with the daemon's call
/// store (a dump holds references to them, not copies), optionally narrowed
/// by a selector applied as they are read.
#[derive(Clone, Default)]
pub struct CallList {
    blocks: Vec<CallBlock>,
    /// Calls at the start of the first block that are not in the list.
    skip: usize,
    select: Option<CallSelector>,
    len: OnceLock<usize>,
}

impl CallList {
    /// The calls of `blocks` after the first `skip`, those `select` keeps.
    pub fn new(blocks: Vec<CallBlock>, skip: usize, select: Option<CallSelector>) -> Self {
        Self { blocks, skip, select, len: OnceLock::new() }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Call> + '_ {
        let skip = self.skip;
        self.blocks
            .iter()
            .enumerate()
            .flat_map(move |(i, b)| b.get(if i == 0 { skip } else { 0 }..).unwrap_or_default())
            .filter(move |c| self.select.as_ref().is_none_or(|keep| keep(c)))
    }

    /// How many calls the list holds (counted once, on first use).
    pub fn len(&self) -> usize {
        *self.len.get_or_init(|| self.iter().count())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl From<Vec<Call>> for CallList {
    fn from(calls: Vec<Call>) -> Self {
        Self::new(vec![calls.into()], 0, None)
    }
}

impl<'a> IntoIterator for &'a CallList {
    type Item = &'a Call;
    type IntoIter = Box<dyn Iterator<Item = &'a Call> + 'a>;

    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter())
    }
}

impl fmt::Debug for CallList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallList")
            .field("blocks", &self.blocks.len())
            .field("skip", &self.skip)
            .field("selected", &self.select.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(pid: u32) -> Call {
        Call::for_test(pid, "f", 0, 1)
    }

    #[test]
    fn blocks_skip_and_selector() {
        let a: CallBlock = Arc::new((1..=3).map(call).collect());
        let b: CallBlock = Arc::new((4..=5).map(call).collect());
        let list = CallList::new(vec![a.clone(), b.clone()], 2, None);
        assert_eq!(list.iter().map(|c| c.pid).collect::<Vec<_>>(), [3, 4, 5]);
        assert_eq!(list.len(), 3);
        let odd: CallSelector = Arc::new(|c: &Call| c.pid % 2 == 1);
        let list = CallList::new(vec![a, b], 0, Some(odd));
        assert_eq!((&list).into_iter().map(|c| c.pid).collect::<Vec<_>>(), [1, 3, 5]);
        assert_eq!(list.len(), 3);
        assert!(CallList::default().is_empty());
    }
}
