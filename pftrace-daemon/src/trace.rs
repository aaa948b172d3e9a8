//! A finished (or in-progress) trace: the calls, what was traced, and the
//! counters that say whether anything was lost. Output formats read this.

use serde::Serialize;

use crate::{
    bpf::Counters,
    clock::WallClock,
    pairing::{Call, UnmatchedReturn},
    python::PyVersion,
};

/// A process that was traced.
#[derive(Debug, Clone, Serialize)]
pub struct TracedProcess {
    pub pid: u32,
    /// The interpreter binary or libpython that carries the probes.
    pub binary: String,
    pub version: Option<PyVersion>,
    /// Command line, space-joined.
    pub command: String,
}

/// Everything an output format needs.
#[derive(Debug)]
pub struct Trace {
    pub names: Vec<String>,
    pub processes: Vec<TracedProcess>,
    pub calls: Vec<Call>,
    pub unmatched_returns: Vec<UnmatchedReturn>,
    /// Returns that closed entries above them on the stack (see pairing).
    pub skipped_entries: u64,
    pub counters: Counters,
    /// Records that user space could not decode.
    pub bad_records: u64,
    pub clock: WallClock,
    /// Monotonic ns when tracing started and stopped.
    pub start_ns: u64,
    pub end_ns: u64,
}

impl Trace {
    /// Calls closed as incomplete.
    pub fn incomplete_calls(&self) -> usize {
        self.calls
            .iter()
            .filter(|c| c.end == crate::pairing::CallEnd::Incomplete)
            .count()
    }
}
