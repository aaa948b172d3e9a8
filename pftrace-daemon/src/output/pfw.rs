//! PerfFlowAspect's own trace files (`.pfw`), so tools that read
//! PerfFlowAspect traces (Hatchet's readers, Perfetto) read ours unchanged.
//!
//! What PerfFlowAspect's Python `around` advice writes for one call, and so
//! what this writes:
//! - Verbose (`log-event=Verbose`, its default): `"ph":"B"` at the start and
//!   `"ph":"E"` at the end. Compact (`log-event=Compact`): one `"ph":"X"` with
//!   `ts` = start and `dur` = end - start.
//! - With `cpu-mem-usage=True`: a `"ph":"C"` event at the start's `ts` with
//!   `args {"cpu_usage", "memory_usage"}` and one at the end's `ts` with both
//!   0, written when the call returns, before its `E`/`X`.
//! - Every event has `name`, `cat`, `pid`, `tid` (native), `ts` (wall-clock
//!   µs, a float), `ph`, in that key order, spaced as Python's `json.dumps`.
//! - Events appear in the order PerfFlowAspect would have written them: a
//!   `B` when its call starts, the `C`s and the `E`/`X` when it returns.
//! - Array form: a line `[`, then one event per line each followed by `,`,
//!   never closed. Object form: a first line
//!   `{"displayTimeUnit":"us","otherData":{},"traceEvents":[`, then the same.
//! - File name: `perfflow.<array|object>` then `.<name>`, `.<hostname>`,
//!   `.<pid>` as `log-filename-include` lists (default `hostname,pid`), then
//!   `.pfw`; one file per traced process.
//!
//! Where pftrace differs, because it watches from outside the process:
//! - `name` is the function's qualified name (`Solver.step`, as
//!   PerfFlowAspect's `__qualname__`) and `cat` its dotted module
//!   (`json.decoder`), both resolved from outside the process (see
//!   `codes.rs` and `pftrace-code`). Where that could not be done (the
//!   process exited before it was resolved, the source is unreadable or
//!   changed), `name` is the code object's name (`co_name`, what the probe
//!   gives) and `cat` the file as the probe gave it: never a guessed module.
//! - `cpu_usage`: PerfFlowAspect divides the process's user CPU seconds
//!   consumed during the call (psutil `cpu_times().user`) by the call's wall
//!   seconds, × 100. pftrace has the calling thread's CPU time (user +
//!   system) from the kernel at entry and return, so here it is that
//!   thread's CPU time over the call's wall time × 100: the same for
//!   single-threaded user-space work; it leaves out other threads' CPU
//!   (which PerfFlowAspect's counts) and counts system time (which it does
//!   not). 0 when the kernel gave no CPU time.
//! - `memory_usage` is as PerfFlowAspect's: resident memory at return in
//!   kB (bytes / 1000), read by the kernel at the return probe.
//! - A call still open when tracing ended (incomplete) gets its `B` in
//!   Verbose form and nothing in Compact form, as PerfFlowAspect leaves a
//!   call that never returns.
//! - pftrace's default is `cpu-mem-usage=True` (PerfFlowAspect's is False):
//!   the figures cost the traced process nothing extra here.
//! - Files are created afresh (PerfFlowAspect's Python appends to an
//!   existing file): an earlier file of the same name is replaced whole,
//!   atomically, and only if it is a regular file of the invoking user.

use std::{
    ffi::OsString,
    io::{self, Write},
    iter::Peekable,
    path::PathBuf,
};

use pftrace_code::CodeInfo;
use serde::Serialize;

use super::{
    TraceFormat,
    calls::CallSource,
    safe_file::{Dir, FileError},
    sort::CallIter,
};
use crate::{
    clock::WallClock,
    codes::{CodeReader, category, display_name},
    pairing::{Call, CallEnd},
    trace::Trace,
};

/// Array (`[` never closed) or object (`{"displayTimeUnit":...,"traceEvents":[`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PfwForm {
    Array,
    Object,
}

/// B/E pairs (Verbose) or one X per call (Compact).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PfwEvents {
    Verbose,
    Compact,
}

/// The PerfFlowAspect format, as one stream (all processes together).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pfw {
    pub form: PfwForm,
    pub event: PfwEvents,
    /// Write the `C` events with `cpu_usage` and `memory_usage`.
    pub cpu_mem: bool,
}

impl Default for Pfw {
    fn default() -> Self {
        Self { form: PfwForm::Array, event: PfwEvents::Verbose, cpu_mem: true }
    }
}

/// A part of the file name (`log-filename-include`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NamePart {
    /// The `name` option (default `generic`).
    Name,
    Hostname,
    Pid,
}

/// Everything a PERFFLOW_OPTIONS-style string can set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PfwOptions {
    pub pfw: Pfw,
    /// The workflow component name, used when `include` has [`NamePart::Name`].
    pub name: String,
    pub include: Vec<NamePart>,
    /// `log-dir`: where the files go unless the caller says otherwise.
    pub log_dir: Option<PathBuf>,
}

impl Default for PfwOptions {
    fn default() -> Self {
        Self {
            pfw: Pfw::default(),
            name: "generic".into(),
            include: vec![NamePart::Hostname, NamePart::Pid],
            log_dir: None,
        }
    }
}

/// The keys [`PfwOptions::parse`] accepts.
pub const OPTION_KEYS: &str =
    "log-format, log-event, cpu-mem-usage, log-filename-include, name, log-dir, log-enable";

/// A PERFFLOW_OPTIONS-style string that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PfwOptionError {
    #[error(
        "PerfFlowAspect option {0:?} is not KEY=VALUE (options look like \
         log-format=Object:log-event=Compact:cpu-mem-usage=False)"
    )]
    Malformed(String),
    #[error("unknown PerfFlowAspect option {0:?}; known options: {OPTION_KEYS}")]
    UnknownKey(String),
    #[error("PerfFlowAspect option {key}={value:?} is not valid; expected {expected}")]
    BadValue { key: String, value: String, expected: &'static str },
    #[error(
        "log-filename-include: instance-path is not supported (PerfFlowAspect derives it from \
         the traced process's Flux/Slurm/LSF environment); use name, hostname and pid"
    )]
    InstancePath,
    #[error("log-filename-include: unknown part {0:?}; use name, hostname and pid")]
    UnknownNamePart(String),
}

/// PerfFlowAspect takes `True`, `true` and `TRUE` (and the same for False).
fn boolean(key: &str, value: &str) -> Result<bool, PfwOptionError> {
    match value {
        "True" | "true" | "TRUE" => Ok(true),
        "False" | "false" | "FALSE" => Ok(false),
        _ => {
            Err(PfwOptionError::BadValue { key: key.into(), value: value.into(), expected: "True or False" })
        }
    }
}

impl PfwOptions {
    /// Parses `log-format=Object:log-event=Compact:cpu-mem-usage=False` (the
    /// form of PerfFlowAspect's PERFFLOW_OPTIONS) over the defaults. Values
    /// are taken as PerfFlowAspect takes them (`Array`, `array`, `ARRAY`, ...).
    pub fn parse(text: &str) -> Result<Self, PfwOptionError> {
        let mut opts = Self::default();
        for item in text.split(':').map(str::trim).filter(|s| !s.is_empty()) {
            let (key, value) = item.split_once('=').ok_or_else(|| PfwOptionError::Malformed(item.into()))?;
            let bad = |expected| PfwOptionError::BadValue { key: key.into(), value: value.into(), expected };
            match key {
                "log-format" => {
                    opts.pfw.form = match value {
                        "Array" | "array" | "ARRAY" => PfwForm::Array,
                        "Object" | "object" | "OBJECT" => PfwForm::Object,
                        _ => return Err(bad("Array or Object")),
                    }
                }
                "log-event" => {
                    opts.pfw.event = match value {
                        "Verbose" | "verbose" | "VERBOSE" => PfwEvents::Verbose,
                        "Compact" | "compact" | "COMPACT" => PfwEvents::Compact,
                        _ => return Err(bad("Verbose or Compact")),
                    }
                }
                // Older PerfFlowAspect releases spelled it with underscores.
                "cpu-mem-usage" | "cpu_mem_usage" => opts.pfw.cpu_mem = boolean(key, value)?,
                "log-enable" => {
                    if !boolean(key, value)? {
                        return Err(bad("True (with False nothing would be written)"));
                    }
                }
                "name" => opts.name = value.into(),
                "log-dir" => opts.log_dir = Some(PathBuf::from(value)),
                "log-filename-include" => {
                    opts.include = value
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(|part| match part {
                            "name" => Ok(NamePart::Name),
                            "hostname" => Ok(NamePart::Hostname),
                            "pid" => Ok(NamePart::Pid),
                            "instance-path" => Err(PfwOptionError::InstancePath),
                            other => Err(PfwOptionError::UnknownNamePart(other.into())),
                        })
                        .collect::<Result<_, _>>()?;
                }
                _ => return Err(PfwOptionError::UnknownKey(key.into())),
            }
        }
        Ok(opts)
    }

    /// The file name PerfFlowAspect gives process `pid`'s trace on `hostname`.
    pub fn file_name(&self, hostname: &str, pid: u32) -> String {
        let mut name = String::from(match self.pfw.form {
            PfwForm::Array => "perfflow.array",
            PfwForm::Object => "perfflow.object",
        });
        for part in &self.include {
            name.push('.');
            match part {
                NamePart::Name => name.push_str(&self.name),
                NamePart::Hostname => name.push_str(hostname),
                NamePart::Pid => name.push_str(&pid.to_string()),
            }
        }
        name.push_str(".pfw");
        name
    }
}

/// A number as Python's json.dumps writes it: the end counter's `0` is an int.
#[derive(Serialize)]
#[serde(untagged)]
enum Num {
    Int(u64),
    Float(f64),
}

#[derive(Serialize)]
struct Usage {
    cpu_usage: Num,
    memory_usage: Num,
}

/// A call event's args: its id, depth in its thread's traced stack and
/// parent call's id (0: none), so readers rebuild the call tree without
/// relying on timestamps. PerfFlowAspect writes no args on call events;
/// Hatchet's reader ignores them.
#[derive(Serialize)]
struct CallArgs {
    id: u64,
    depth: u32,
    parent: u64,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Args {
    Usage(Usage),
    Call(CallArgs),
}

/// One event, keys in PerfFlowAspect's order.
#[derive(Serialize)]
struct Event<'a> {
    name: &'a str,
    cat: &'a str,
    pid: u32,
    tid: u32,
    ts: f64,
    ph: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    dur: Option<f64>,
    /// Last, as in PerfFlowAspect's C events: a line then ends in its only
    /// `},`, which readers such as Hatchet's rewrite to close the array.
    #[serde(skip_serializing_if = "Option::is_none")]
    args: Option<Args>,
}

/// Python's `json.dumps` spacing: `", "` between items, `": "` after keys.
struct PythonSpacing;

impl serde_json::ser::Formatter for PythonSpacing {
    fn begin_array_value<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }
    fn begin_object_key<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }
    fn begin_object_value<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }
}

/// When PerfFlowAspect would write a call's events: at its start (`B`) or at
/// its return (`C`, `C`, `E`/`X`).
#[derive(Clone, Copy)]
enum Moment {
    Start,
    Return,
}

/// Writing order: by process (when writing one file per process), then by
/// time; at the same ns returns before starts, inner calls' returns before
/// outer ones', outer calls' starts before inner ones'.
type MomentKey = (u32, u64, u8, u32, u64);

fn start_key(call: &Call, by_pid: bool) -> MomentKey {
    (if by_pid { call.pid } else { 0 }, call.start_ns, 1, call.depth, 0)
}

fn return_key(call: &Call, by_pid: bool) -> MomentKey {
    (if by_pid { call.pid } else { 0 }, call.end_ns, 0, u32::MAX - call.depth, call.start_ns)
}

/// The moments of all calls in writing order: the merge of the calls
/// sorted by start and the returned calls sorted by return.
struct Moments<'a> {
    starts: Peekable<CallIter<'a>>,
    returns: Peekable<CallIter<'a>>,
    by_pid: bool,
}

impl<'a> Moments<'a> {
    fn new(source: CallSource<'a>, event: PfwEvents, by_pid: bool) -> io::Result<Self> {
        let starts: CallIter<'a> = match event {
            PfwEvents::Verbose => source.sorted(move |c: &Call| start_key(c, by_pid))?,
            PfwEvents::Compact => Box::new(std::iter::empty()),
        };
        let returns = source.sorted(move |c: &Call| return_key(c, by_pid))?;
        let returns: CallIter<'a> =
            Box::new(returns.filter(|c| c.as_ref().map_or(true, |c| c.end == CallEnd::Returned)));
        Ok(Self { starts: starts.peekable(), returns: returns.peekable(), by_pid })
    }

    /// The process of the next moment.
    fn peek_pid(&mut self) -> Option<u32> {
        let pid = |c: Option<&io::Result<Call>>| c.and_then(|c| c.as_ref().ok()).map(|c| c.pid);
        match (pid(self.starts.peek()), pid(self.returns.peek())) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

impl Iterator for Moments<'_> {
    type Item = io::Result<(Moment, Call)>;

    fn next(&mut self) -> Option<Self::Item> {
        let take_start = match (self.starts.peek(), self.returns.peek()) {
            (None, None) => return None,
            (Some(Err(_)), _) | (Some(Ok(_)), None) => true,
            (_, Some(Err(_))) | (None, Some(Ok(_))) => false,
            (Some(Ok(s)), Some(Ok(r))) => start_key(s, self.by_pid) < return_key(r, self.by_pid),
        };
        Some(if take_start {
            self.starts.next()?.map(|c| (Moment::Start, c))
        } else {
            self.returns.next()?.map(|c| (Moment::Return, c))
        })
    }
}

impl Pfw {
    /// The events of one moment of one call, in writing order.
    fn events<'a>(
        &self,
        call: &'a Call,
        info: &'a CodeInfo,
        moment: Moment,
        clock: &WallClock,
    ) -> Vec<Event<'a>> {
        let start = clock.wall_us(call.start_ns);
        let end = clock.wall_us(call.end_ns);
        let ev = |ph: &'static str, ts: f64| Event {
            name: display_name(info),
            cat: category(info),
            pid: call.pid,
            tid: call.tid,
            ts,
            ph,
            args: (ph != "C").then_some(Args::Call(CallArgs {
                id: call.id,
                depth: call.depth,
                parent: call.parent,
            })),
            dur: None,
        };
        let mut out = Vec::new();
        match moment {
            Moment::Start => out.push(ev("B", start)),
            Moment::Return => {
                if self.cpu_mem {
                    let wall_ns = call.duration_ns();
                    let cpu_usage = match call.cpu_ns {
                        Some(cpu) if wall_ns > 0 => cpu as f64 / wall_ns as f64 * 100.0,
                        _ => 0.0,
                    };
                    let memory_usage = match call.rss_return_bytes {
                        0 => Num::Int(0),
                        rss => Num::Float(rss as f64 / 1000.0),
                    };
                    out.push(Event {
                        args: Some(Args::Usage(Usage { cpu_usage: Num::Float(cpu_usage), memory_usage })),
                        ..ev("C", start)
                    });
                    out.push(Event {
                        args: Some(Args::Usage(Usage { cpu_usage: Num::Int(0), memory_usage: Num::Int(0) })),
                        ..ev("C", end)
                    });
                }
                match self.event {
                    PfwEvents::Verbose => out.push(ev("E", end)),
                    PfwEvents::Compact => out.push(Event { dur: Some(end - start), ..ev("X", start) }),
                }
            }
        }
        out
    }

    fn write_header(&self, w: &mut dyn Write) -> io::Result<()> {
        match self.form {
            PfwForm::Array => w.write_all(b"[\n"),
            PfwForm::Object => {
                w.write_all(b"{\"displayTimeUnit\":\"us\",\"otherData\":{},\"traceEvents\":[\n")
            }
        }
    }

    fn write_moment(
        &self,
        moment: Moment,
        call: &Call,
        codes: &mut CodeReader,
        clock: &WallClock,
        w: &mut dyn Write,
    ) -> io::Result<()> {
        let info = codes.info(call);
        for event in self.events(call, &info, moment, clock) {
            let mut ser = serde_json::Serializer::with_formatter(&mut *w, PythonSpacing);
            event.serialize(&mut ser).map_err(io::Error::from)?;
            w.write_all(b",\n")?;
        }
        Ok(())
    }
}

impl TraceFormat for Pfw {
    /// All processes' events in one stream (as `pftracectl dump` sends it).
    fn write(&self, trace: &Trace, out: &mut dyn Write) -> io::Result<()> {
        let mut w = io::BufWriter::new(out);
        self.write_header(&mut w)?;
        let mut codes = CodeReader::new(&trace.codes);
        for m in Moments::new(trace.call_source(), self.event, false)? {
            let (moment, call) = m?;
            self.write_moment(moment, &call, &mut codes, &trace.clock, &mut w)?;
        }
        w.into_inner().map_err(|e| e.into_error())?.flush()
    }
}

/// One file written by [`write_files`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PfwFile {
    pub path: PathBuf,
    pub pid: u32,
    /// Calls in it (incomplete ones included).
    pub calls: u64,
}

/// Writes one file per process that made a traced call into `dir`, named as
/// PerfFlowAspect names them, each replacing any earlier file of that name
/// atomically (see `safe_file.rs`). Refuses, before writing anything, when
/// the names would collide (`log-filename-include` without `pid` and more
/// than one process) or a name holds something that may not be replaced.
pub fn write_files(trace: &Trace, dir: &Dir, opts: &PfwOptions) -> Result<Vec<PfwFile>, FileError> {
    let source = trace.call_source();
    let io_error = |source| FileError::Io {
        action: "writing PerfFlowAspect files in",
        path: dir.path().display().to_string(),
        source,
    };
    let per_pid = source.tally().map_err(io_error)?.per_pid;
    if per_pid.len() > 1 && !opts.include.contains(&NamePart::Pid) {
        return Err(io_error(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} processes made traced calls but log-filename-include has no `pid`: \
                 their PerfFlowAspect files would overwrite each other",
                per_pid.len()
            ),
        )));
    }
    let name = |pid: u32| OsString::from(opts.file_name(&trace.hostname, pid));
    for &pid in per_pid.keys() {
        dir.existing(&name(pid))?;
    }
    let mut moments = Moments::new(source, opts.pfw.event, true).map_err(io_error)?;
    let mut codes = CodeReader::new(&trace.codes);
    let mut written = Vec::new();
    for (&pid, &calls) in &per_pid {
        let mut file = dir.replacement(&name(pid), 0o644)?;
        let path = file.path();
        let failed = |source| FileError::Io { action: "writing", path: path.display().to_string(), source };
        let mut w = io::BufWriter::new(file.file());
        opts.pfw.write_header(&mut w).map_err(failed)?;
        // Incomplete calls in Compact form have no moment: a process may have none.
        while moments.peek_pid() == Some(pid) {
            let (moment, call) = moments.next().expect("peeked").map_err(io_error)?;
            opts.pfw.write_moment(moment, &call, &mut codes, &trace.clock, &mut w).map_err(failed)?;
        }
        w.flush().map_err(failed)?;
        drop(w);
        file.commit()?;
        written.push(PfwFile { path, pid, calls });
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use std::{fs, path::Path};

    use serde_json::Value;

    use super::*;
    use crate::output::testing::sample_trace;

    /// Reads a `.pfw` stream back: header, then `EVENT,` per line.
    fn read_back(text: &str, form: PfwForm) -> Vec<Value> {
        let mut lines = text.lines();
        let header = lines.next().unwrap();
        match form {
            PfwForm::Array => assert_eq!(header, "["),
            PfwForm::Object => {
                assert_eq!(header, r#"{"displayTimeUnit":"us","otherData":{},"traceEvents":["#)
            }
        }
        lines.map(|l| serde_json::from_str(l.strip_suffix(',').expect("trailing comma")).unwrap()).collect()
    }

    #[test]
    fn options_parse_like_perfflow_options() {
        let o = PfwOptions::parse("log-format=Object:log-event=Compact:cpu-mem-usage=False").unwrap();
        assert_eq!(o.pfw, Pfw { form: PfwForm::Object, event: PfwEvents::Compact, cpu_mem: false });
        assert_eq!(PfwOptions::parse("").unwrap(), PfwOptions::default());
        let o =
            PfwOptions::parse("name=solver:log-filename-include=name,pid:log-dir=/tmp/x:log-format=ARRAY")
                .unwrap();
        assert_eq!(o.file_name("node1", 77), "perfflow.array.solver.77.pfw");
        assert_eq!(o.log_dir.as_deref(), Some(Path::new("/tmp/x")));
        assert_eq!(PfwOptions::default().file_name("node1", 77), "perfflow.array.node1.77.pfw");
        assert!(matches!(PfwOptions::parse("log-format=Json"), Err(PfwOptionError::BadValue { .. })));
        assert!(matches!(PfwOptions::parse("verbose"), Err(PfwOptionError::Malformed(_))));
        let err = PfwOptions::parse("log-level=3").unwrap_err().to_string();
        assert!(err.contains("log-level") && err.contains("log-format, log-event"), "{err}");
        assert_eq!(
            PfwOptions::parse("log-filename-include=instance-path"),
            Err(PfwOptionError::InstancePath)
        );
        assert!(PfwOptions::parse("log-enable=False").is_err());
    }

    #[test]
    fn verbose_array_with_counters() {
        let trace = sample_trace();
        let mut out = Vec::new();
        Pfw::default().write(&trace, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        // Python's json.dumps spacing, keys in PerfFlowAspect's order.
        let second = text.lines().nth(1).unwrap();
        assert!(
            second.starts_with(r#"{"name": "outer", "cat": "app", "pid": 4200001, "tid": 4200001, "ts": "#)
        );
        let events = read_back(&text, PfwForm::Array);
        let returned = trace.calls.iter().filter(|c| c.end == CallEnd::Returned).count();
        let ph = |p: &str| events.iter().filter(|e| e["ph"] == p).count();
        assert_eq!(ph("B"), trace.calls.len());
        assert_eq!(ph("E"), returned);
        assert_eq!(ph("C"), 2 * returned);
        // B at entry time: outer's B comes before inner's, inner's E before outer's.
        let order: Vec<String> = events
            .iter()
            .filter(|e| e["pid"] == 4_200_001 && e["ph"] != "C")
            .map(|e| format!("{}{}", e["ph"].as_str().unwrap(), e["name"].as_str().unwrap()))
            .collect();
        assert_eq!(order[..4], ["Bouter", "BJob.inner", "EJob.inner", "Eouter"]);
        // Never resolved: co_name, and the file as the category.
        let other = events.iter().find(|e| e["pid"] == 4_200_002).unwrap();
        assert_eq!((other["name"].as_str(), other["cat"].as_str()), (Some("outer"), Some("/srv/other.py")));
        // inner: 30 ms of CPU over 40 ms of wall time, 300 MB at return.
        let c = events.iter().find(|e| e["ph"] == "C" && e["name"] == "Job.inner").unwrap();
        assert!((c["args"]["cpu_usage"].as_f64().unwrap() - 75.0).abs() < 1e-9);
        assert_eq!(c["args"]["memory_usage"].as_f64(), Some(300_000.0));
        let b = events.iter().find(|e| e["ph"] == "B" && e["name"] == "Job.inner").unwrap();
        assert_eq!(c["ts"], b["ts"]);
        assert!(text.contains(r#""args": {"cpu_usage": 0, "memory_usage": 0}"#));
    }

    #[test]
    fn compact_object_without_counters() {
        let trace = sample_trace();
        let pfw = Pfw { form: PfwForm::Object, event: PfwEvents::Compact, cpu_mem: false };
        let mut out = Vec::new();
        pfw.write(&trace, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let events = read_back(&text, PfwForm::Object);
        let returned: Vec<&Call> = trace.calls.iter().filter(|c| c.end == CallEnd::Returned).collect();
        assert_eq!(events.len(), returned.len());
        assert!(
            events.iter().all(|e| e["ph"] == "X" && e["args"]["id"].is_u64() && e["args"]["parent"].is_u64())
        );
        let inner = events.iter().find(|e| e["name"] == "Job.inner").unwrap();
        assert!((inner["dur"].as_f64().unwrap() - 40_000.0).abs() < 0.5);
        // Hatchet's fix-up: the last "}," becomes "}]}" and the whole parses.
        let fixed = format!("{}}}]}}", text.trim_end().strip_suffix("},").unwrap());
        let v: Value = serde_json::from_str(&fixed).unwrap();
        assert_eq!(v["traceEvents"].as_array().unwrap().len(), events.len());
    }

    #[test]
    fn one_file_per_process() {
        let trace = sample_trace();
        let path = std::env::temp_dir().join(format!("pftrace-pfw-unit-{}", std::process::id()));
        let dir = Dir::open(&path, Some(0o755)).unwrap();
        let files = write_files(&trace, &dir, &PfwOptions::default()).unwrap();
        let names: Vec<String> =
            files.iter().map(|f| f.path.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["perfflow.array.testhost.4200001.pfw", "perfflow.array.testhost.4200002.pfw"]);
        assert_eq!(files.iter().map(|f| f.calls).sum::<u64>(), trace.calls.len() as u64);
        let text = fs::read_to_string(&files[1].path).unwrap();
        assert!(read_back(&text, PfwForm::Array).iter().all(|e| e["pid"] == 4_200_002));
        let no_pid = PfwOptions::parse("log-filename-include=hostname").unwrap();
        let err = write_files(&trace, &dir, &no_pid).unwrap_err();
        assert!(
            matches!(&err, FileError::Io { source, .. } if source.kind() == io::ErrorKind::InvalidInput),
            "{err}"
        );
        // A second run replaces the files whole.
        let again = write_files(&trace, &dir, &PfwOptions::default()).unwrap();
        assert_eq!(fs::read_to_string(&again[1].path).unwrap(), text);
        assert_eq!(fs::read_dir(&path).unwrap().count(), 2);
        fs::remove_dir_all(&path).unwrap();
    }
}
