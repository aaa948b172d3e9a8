//! The control protocol between `pftracectl` and `pftraced`, version 2.
//!
//! Transport: a Unix stream socket (default [`DEFAULT_SOCKET`]). The client
//! sends one request as a single line of JSON (at most [`MAX_REQUEST_BYTES`]
//! bytes, ending in `\n`, right after connecting: a connection that sends
//! nothing is closed after a short time) and reads one reply line of JSON:
//!
//! ```text
//! -> {"version":2,"command":{"cmd":"stats","per_pid":true}}
//! <- {"version":2,"ok":true,"result":{...}}
//! <- {"version":2,"ok":false,"error":"what was wrong and what to do"}
//! ```
//!
//! An error starting with [`BUSY`] means the request was not carried out
//! because pftraced is serving as many clients (or dumps) as it allows:
//! try again shortly (pftracectl does, for a few seconds).
//!
//! `dump` is the one streaming reply: its result is a [`DumpHeader`], then
//! the trace follows on the same stream in chunks, each a line holding its
//! length in hexadecimal and then that many bytes, up to a chunk of length
//! 0; after it comes a last reply line, whose result is a [`DumpTrailer`]
//! (or an error, if rendering failed part way):
//!
//! ```text
//! <- {"version":2,"ok":true,"result":{"format":"chrome"}}
//! <- 10000\n<65536 bytes>1a2\n<418 bytes>0\n
//! <- {"version":2,"ok":true,"result":{"calls":1234,"bytes":65954}}
//! ```
//!
//! The daemon renders a dump on a thread of its own from a snapshot of the
//! calls in memory, writing as the client reads, so a trace is never held
//! whole in memory and tracing never waits for it. A request with another
//! `version` gets an error reply naming both versions. One request per
//! connection.

use serde::{Deserialize, Serialize};

/// Version of this protocol. Bumped on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 2;
/// Requests longer than this are refused with an error reply.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// How an error reply starts when the request was refused only for want of
/// capacity (too many clients or dumps at once); worth retrying.
pub const BUSY: &str = "busy: ";
/// Where the daemon listens unless configured otherwise.
pub const DEFAULT_SOCKET: &str = "/run/pftrace/pftraced.sock";

/// A request line.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub version: u32,
    pub command: Command,
}

/// What the client asks for.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    /// Targets, attached binaries, processes, counters. Result: [`Status`].
    Status {},
    /// The trace so far (tracing continues). Result: [`DumpHeader`], then
    /// the trace in chunks and a [`DumpTrailer`].
    Dump {
        #[serde(default)]
        filter: CallFilter,
        #[serde(default)]
        format: Option<String>,
    },
    /// Per-function (optionally per-pid) figures. Result: [`StatsReply`].
    Stats {
        #[serde(default)]
        filter: CallFilter,
        #[serde(default)]
        per_pid: bool,
        /// One row per code object (default) or per (name, file).
        #[serde(default, skip_serializing_if = "StatsGrouping::is_default")]
        by: StatsGrouping,
    },
    /// Start tracing these names (same syntax as `-t`). Result: [`NamesReply`].
    Add { names: Vec<String> },
    /// Stop tracing these names. Result: [`NamesReply`].
    Remove { names: Vec<String> },
    /// Forget the calls kept in memory (files already written stay). Result: `{"cleared": N}`.
    Clear {},
    /// The shell line that starts programs with the in-process agent on
    /// their path (for CPython 3.11-3.13, which cannot load it once
    /// running). Result: `{"line": "export ..."}`.
    Env {},
    /// Flush outputs, detach and exit. Result: `{"stopping": true}`.
    Stop {},
}

/// Which calls a dump or stats request covers. All fields optional.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CallFilter {
    /// Only calls that started at or after this wall-clock time (ns since the Unix epoch).
    #[serde(default)]
    pub since_wall_ns: Option<i64>,
    /// Only calls of this process.
    #[serde(default)]
    pub pid: Option<u32>,
    /// Only calls of this function name (exact).
    #[serde(default)]
    pub function: Option<String>,
}

/// A reply line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    pub version: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    pub fn ok(result: serde_json::Value) -> Self {
        Self { version: PROTOCOL_VERSION, ok: true, result: Some(result), error: None }
    }
    pub fn err(message: impl Into<String>) -> Self {
        Self { version: PROTOCOL_VERSION, ok: false, result: None, error: Some(message.into()) }
    }
}

/// Precedes the chunks of a dump.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DumpHeader {
    /// The format as asked for, with any options (`pfw:log-format=Object`).
    pub format: String,
}

/// Follows the chunks of a dump that was rendered to its end.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DumpTrailer {
    /// Calls in the dump.
    pub calls: u64,
    /// Bytes of the trace (the chunks' contents).
    pub bytes: u64,
}

/// Which calls `stats` figures cover.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StatsSource {
    /// Every call completed since tracing started (no filter, or only
    /// `function`): from the daemon's running aggregate.
    AllCalls,
    /// The calls still in memory that the filter selects (`since`, `pid`, or
    /// per process): older calls dropped from memory are not counted.
    CallsInMemory,
}

/// How `stats` groups calls into rows.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StatsGrouping {
    /// One row per function (code object: name, file and first line), named
    /// by its qualified name: `A.run` and `B.run` of one file are two rows.
    #[default]
    Function,
    /// One row per (code object name, file), as before qualified names.
    Name,
}

impl StatsGrouping {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// Result of `stats`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatsReply {
    pub source: StatsSource,
    /// Calls completed since tracing started, and how many are in memory.
    pub calls_total: u64,
    pub calls_in_memory: u64,
    /// The most p50/p95/p99 differ from the exact nearest-rank values,
    /// relative to them (calls, totals, means and maxima are exact).
    pub percentile_error: f64,
    /// Largest total first.
    pub functions: Vec<FunctionStats>,
    /// Calls that met a memory bound of pftraced (the `<other...>` rows).
    #[serde(default)]
    pub bounds: BoundCounts,
}

/// What met pftraced's bounds on what traced processes make it keep
/// (README, "Bounds"): counted here, never dropped silently.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct BoundCounts {
    /// Call records (entries and returns) with a function or file name not
    /// kept: named `<other: over pftraced's string bound>` (string_bound.rs).
    pub strings_folded: u64,
    /// Bytes charged for the names and file names kept.
    pub string_bytes: u64,
    /// Calls counted in their function's `<other...>` row, past the bound on
    /// distinct (function, file, line) per process or in all (stats.rs).
    pub stats_folded: u64,
    /// Calls not traced: entered while 262,144 calls were open, or 65,536
    /// in their process (pairing.rs).
    pub open_calls_dropped: u64,
    /// Connections to the in-process agent's socket refused: no hello
    /// within 5 s or before 32 newer connections, or a malformed one
    /// (daemon/agent.rs).
    #[serde(default)]
    pub agent_connections_refused: u64,
    /// Functions left unresolved because the answers about their process's
    /// functions, or all processes', reached their bound in bytes (4 MiB,
    /// 64 MiB; codes.rs).
    #[serde(default)]
    pub codes_over_bytes: u64,
}

/// Result of `add` / `remove`: the names traced afterwards.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NamesReply {
    pub names: Vec<String>,
}

/// Figures for one function (and pid, when asked per pid).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FunctionStats {
    /// The code object's name (`co_name`).
    pub function: String,
    pub file: String,
    /// The entry probe's line (`co_firstlineno` on 3.6-3.10); absent when
    /// grouped by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<i32>,
    /// Dotted module, qualified name and their join (`json.decoder`,
    /// `JSONDecoder.raw_decode`, `json.decoder.JSONDecoder.raw_decode`),
    /// where resolved; absent when grouped by name or not resolved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qualname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    pub calls: u64,
    /// Calls with no return seen (closed at process exit or daemon stop).
    pub incomplete: u64,
    pub total_ns: u64,
    pub mean_ns: u64,
    pub p50_ns: u64,
    pub p95_ns: u64,
    pub p99_ns: u64,
    pub max_ns: u64,
}

impl FunctionStats {
    /// How a table names the row: the qualified path where known
    /// (`json.decoder.JSONDecoder.raw_decode`), else the code object's name.
    pub fn label(&self) -> &str {
        self.path.as_deref().unwrap_or(&self.function)
    }
}

/// Daemon state as reported by `status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub daemon_pid: u32,
    pub daemon_version: String,
    pub uptime_s: f64,
    /// Traced names as given (`foo`, `json/decoder.py:raw_decode`, `test_*`).
    pub names: Vec<String>,
    /// Target descriptions (`pid 1234`, `cgroup /sys/fs/cgroup/...`, `all`, `command ...`).
    pub targets: Vec<String>,
    pub binaries: Vec<BinaryStatus>,
    pub processes: Vec<ProcessStatus>,
    /// Processes in scope that could not be traced, with the reason (most recent last).
    pub refused: Vec<Refusal>,
    /// The kernel's counters (summed over CPUs).
    pub counters: crate::bpf::Counters,
    /// Records the kernel passed but user space dropped because the file or
    /// glob part of a name did not match (the cost of those name forms).
    pub filtered_in_user_space: u64,
    /// Of those: records whose qualified name or module did not match a
    /// qualified form (`A.run`, `json.decoder:*`), and of these, records
    /// whose code object could not be resolved (so none could match).
    #[serde(default)]
    pub filtered_by_qualified_name: u64,
    #[serde(default)]
    pub filtered_unresolved: u64,
    pub calls_total: u64,
    pub calls_in_memory: u64,
    /// Calls dropped from memory to respect the memory bound (they are in the output files, if configured).
    pub calls_evicted: u64,
    pub unmatched_returns: u64,
    /// Calls closed without a return seen, of all calls since tracing started.
    pub incomplete_calls: u64,
    /// Dumps being sent now, and how many may be at once (`limits.max_concurrent_dumps`).
    #[serde(default)]
    pub dumps_in_progress: u64,
    #[serde(default)]
    pub max_concurrent_dumps: u64,
    pub output: Option<OutputStatus>,
    /// Batch jobs (cgroups under the jobs root): finished ones (the last
    /// 100), then running ones. Absent from older daemons: none.
    #[serde(default)]
    pub jobs: Vec<JobStatus>,
    /// The functions called so far, most calls first (at most
    /// [`STATUS_FUNCTIONS`]), and how many there are.
    #[serde(default)]
    pub functions: Vec<FunctionSeen>,
    #[serde(default)]
    pub functions_total: u64,
    /// The resolver of what each function is (see `codes.rs`).
    #[serde(default)]
    pub codes: CodeCounts,
}

/// How many functions `status` lists.
pub const STATUS_FUNCTIONS: usize = 50;

/// A function called so far (one code object).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FunctionSeen {
    /// `co_name`.
    pub function: String,
    /// The qualified path (`json.decoder.JSONDecoder.raw_decode`), where resolved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    pub file: String,
    pub line: i32,
    pub calls: u64,
}

/// The resolver's figures: functions answered, and requests not made
/// (they stay unresolved, with the reason, in outputs).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CodeCounts {
    pub resolved: u64,
    /// Requests dropped because the queue was full (asked again at the next entry).
    pub queue_full: u64,
    /// Functions left unresolved because the table was full.
    pub table_full: u64,
    /// Entries of functions left unresolved because their process had
    /// 4,096 resolved already (codes::PROCESS_CODES).
    #[serde(default)]
    pub process_full: u64,
}

/// A batch job: a cgroup under the jobs root whose name matches the pattern.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobStatus {
    /// The job id, from the cgroup's name.
    pub id: String,
    pub cgroup: String,
    /// False once its cgroup was removed (and its trace written).
    pub running: bool,
    /// Processes of the job that were traced.
    pub pids: Vec<u32>,
    /// Calls completed in the job.
    pub calls: u64,
    /// The job's trace file (or PerfFlowAspect directory), written when the job ends.
    pub trace: Option<String>,
    /// Why the job's trace cannot be written.
    pub error: Option<String>,
    /// Per-function figures of the job's calls.
    pub functions: Vec<FunctionStats>,
}

/// An interpreter binary (or libpython) with probes attached.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BinaryStatus {
    pub path: String,
    pub version: Option<String>,
    /// Attached host-wide (`--all`) rather than per process.
    pub host_wide: bool,
    pub processes: u64,
}

/// A traced process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessStatus {
    pub pid: u32,
    pub binary: String,
    pub version: Option<String>,
    pub command: String,
    pub running: bool,
    pub calls: u64,
    /// How it is traced: "usdt" or "agent".
    #[serde(default)]
    pub mechanism: crate::python::Mechanism,
    /// For the agent: whether it is tracing (it has confirmed the names) or
    /// not yet (waiting for it to connect).
    #[serde(default)]
    pub agent_tracing: bool,
}

/// A process that could not be traced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Refusal {
    pub pid: u32,
    pub reason: String,
}

/// State of the rolling output files.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OutputStatus {
    pub dir: String,
    pub files_written: u64,
    pub current_file: Option<String>,
    pub calls_written: u64,
    pub bytes_written: u64,
    pub write_errors: u64,
    pub last_error: Option<String>,
    /// Calls that could not be written (a write failed, or the output was
    /// waiting to retry after one). Absent from older daemons: 0.
    #[serde(default)]
    pub calls_not_written: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip_and_shape() {
        let req = Request {
            version: 2,
            command: Command::Stats {
                filter: CallFilter::default(),
                per_pid: true,
                by: StatsGrouping::Function,
            },
        };
        let line = serde_json::to_string(&req).unwrap();
        assert_eq!(
            line,
            r#"{"version":2,"command":{"cmd":"stats","filter":{"since_wall_ns":null,"pid":null,"function":null},"per_pid":true}}"#
        );
        let back: Request = serde_json::from_str(r#"{"version":2,"command":{"cmd":"stats"}}"#).unwrap();
        assert_eq!(
            back.command,
            Command::Stats { filter: CallFilter::default(), per_pid: false, by: StatsGrouping::Function }
        );
    }

    #[test]
    fn unknown_commands_and_fields_are_errors() {
        assert!(serde_json::from_str::<Request>(r#"{"version":1,"command":{"cmd":"reboot"}}"#).is_err());
        assert!(
            serde_json::from_str::<Request>(r#"{"version":1,"command":{"cmd":"status","x":1}}"#).is_err()
        );
        assert!(serde_json::from_str::<Request>(r#"{"version":1}"#).is_err());
    }
}
