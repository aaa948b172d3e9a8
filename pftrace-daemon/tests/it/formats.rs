//! The output formats on the real probe-enabled CPython, each checked
//! against a schema written here, with exact call counts and names:
//! - chrome: a JSON object Perfetto opens (X calls with CPU, off-CPU and RSS
//!   args, M process/thread names and process labels, C CPU/memory
//!   counters), parsed by serde_json and by Python's `json.loads`;
//! - pfw: PerfFlowAspect's files, named as it names them, read back by a
//!   parser written to its documented format (array and object forms,
//!   verbose B/E and compact X, C counters) and by Hatchet's fix-up in Python;
//! - records: the settrace prototype's JSON shape;
//! - timestamps: wall-clock based and consistent across processes and
//!   daemons: calls made 1 s apart are 1 s apart (±50 ms) in every format.
//!   Formats are also asked for over the control socket (`dump`).

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::OsStr,
    fs,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crate::common::*;
use pftrace::{control, protocol::CallFilter};
use serde_json::Value;

// ---------------------------------------------------------------------------
// Running pftraced with exactly the arguments given (the shared harness
// always adds `-o FILE`, which --format pfw takes as a directory).

/// A pftraced started by these tests; stdout (where a launched command's
/// output goes too) and stderr go to files, so a test can wait for lines
/// while it runs. Killed on drop.
struct Tracer {
    guard: Guard,
    stdout: PathBuf,
    stderr: PathBuf,
    shown: String,
}

/// What a finished pftraced left.
struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

static TRACERS: AtomicU32 = AtomicU32::new(0);

impl Tracer {
    fn start<S: AsRef<OsStr>>(dir: &TestDir, args: &[S]) -> Self {
        let n = TRACERS.fetch_add(1, Ordering::Relaxed);
        let (stdout, stderr) =
            (dir.join(&format!("pftraced-{n}.stdout")), dir.join(&format!("pftraced-{n}.stderr")));
        let mut cmd = Command::new(PFTRACED);
        cmd.args(args)
            .current_dir(dir.path())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(fs::File::create(&stdout).unwrap())
            .stderr(fs::File::create(&stderr).unwrap());
        let shown = format!("{cmd:?}");
        Self { guard: Guard::spawn(&mut cmd, true), stdout, stderr, shown }
    }

    fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits until stderr has a line starting with `prefix`.
    fn wait_for(&mut self, prefix: &str) {
        let deadline = Instant::now() + LINE_TIMEOUT;
        while !self.stderr().lines().any(|l| l.starts_with(prefix)) {
            if let Some(status) = self.guard.try_wait() {
                panic!("pftraced exited ({status}) before {prefix:?}: {}\n{}", self.shown, self.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "no {prefix:?} from pftraced: {}\n{}",
                self.shown,
                self.stderr()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for pftraced to exit.
    fn finish(mut self) -> Finished {
        let status = self.guard.wait(RUN_TIMEOUT, "pftraced");
        Finished {
            status,
            stdout: fs::read_to_string(&self.stdout).unwrap_or_default(),
            stderr: self.stderr(),
        }
    }

    /// Runs pftraced to completion and asserts it succeeded.
    fn run_ok<S: AsRef<OsStr>>(dir: &TestDir, args: &[S]) -> Finished {
        let t = Self::start(dir, args);
        let shown = t.shown.clone();
        let done = t.finish();
        assert!(done.status.success(), "pftraced failed ({}): {shown}\n{}", done.status, done.stderr);
        done
    }
}

fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname").trim().to_string()
}

fn now_us() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64() * 1e6
}

/// Runs a Python snippet under the probe-enabled CPython (no tracing) and
/// returns its stdout; panics if it fails.
fn python_says(code: &str, args: &[&Path]) -> String {
    let out = Command::new(python()).arg("-c").arg(code).args(args).output().expect("running python");
    assert!(out.status.success(), "python failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

// ---------------------------------------------------------------------------
// The traced workload

/// `outer` calls `inner` n times; the main thread calls outer(4) three
/// times, a worker thread once, and `Solver.step` calls outer(2): 5 outer,
/// 18 inner, 1 step, on two threads. Then it idles so CPU/memory samples
/// are taken.
const WORK: &str = r#"
    import os, sys, threading, time

    def inner(i):
        return i * 2

    def outer(n):
        total = 0
        for i in range(n):
            total += inner(i)
        return total

    class Solver:
        def step(self):
            return outer(2)

    for _ in range(3):
        outer(4)
    worker = threading.Thread(target=outer, args=(4,))
    worker.start()
    worker.join()
    Solver().step()
    time.sleep(0.6)
    print("done", os.getpid(), threading.get_native_id(), worker.native_id, flush=True)
"#;

const WORK_NAMES: [&str; 3] = ["outer", "inner", "step"];

fn work_counts() -> BTreeMap<String, usize> {
    [("inner", 18), ("outer", 5), ("step", 1)].into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// The same by qualified name, as chrome and pfw name calls (`step` is `Solver.step`).
fn qualified_counts() -> BTreeMap<String, usize> {
    [("inner", 18), ("outer", 5), ("Solver.step", 1)].into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// `-t outer -t inner -t step`.
fn name_args() -> Vec<String> {
    WORK_NAMES.iter().flat_map(|n| ["-t".to_string(), n.to_string()]).collect()
}

/// The `done PID MAIN_TID WORKER_TID` line of WORK.
fn work_ids(stdout: &str) -> (u64, u64, u64) {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("done "))
        .unwrap_or_else(|| panic!("no done line: {stdout}"));
    let ids: Vec<u64> = line.split(' ').map(|s| s.parse().unwrap()).collect();
    (ids[0], ids[1], ids[2])
}

/// Runs WORK under pftraced with `extra` arguments (format, output); returns
/// (dir, script, pftraced's stderr, the script's stdout).
fn traced_work(tag: &str, extra: &[&str]) -> (TestDir, PathBuf, String, String) {
    let dir = TestDir::new(tag);
    let script = dir.script("work.py", WORK);
    let mut args = name_args();
    args.extend(["--sample-interval", "100"].map(String::from));
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push("--".into());
    args.push(python().display().to_string());
    args.push(script.display().to_string());
    let done = Tracer::run_ok(&dir, &args);
    (dir, script, done.stderr, done.stdout)
}

fn count_by<'a>(names: impl Iterator<Item = &'a str>) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for n in names {
        *m.entry(n.to_string()).or_default() += 1;
    }
    m
}

// ---------------------------------------------------------------------------
// Schemas

/// A field check: the value at `key` of `obj` has this type.
fn field<'a>(obj: &'a Value, key: &str, kind: &str) -> &'a Value {
    let v = &obj[key];
    let ok = match kind {
        "string" => v.is_string(),
        "uint" => v.is_u64(),
        "int" => v.is_i64(),
        "number" => v.is_number(),
        "object" => v.is_object(),
        "array" => v.is_array(),
        "bool" => v.is_boolean(),
        _ => unreachable!("unknown kind {kind}"),
    };
    assert!(ok, "{key:?} should be a {kind} in {obj}");
    v
}

/// Asserts `obj` has exactly these keys (plus any of `optional`).
fn keys_exactly(obj: &Value, required: &[&str], optional: &[&str]) {
    let have: BTreeSet<&str> = obj
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {obj}"))
        .keys()
        .map(String::as_str)
        .collect();
    for k in required {
        assert!(have.contains(k), "missing key {k:?} in {obj}");
    }
    for k in &have {
        assert!(required.contains(k) || optional.contains(k), "unexpected key {k:?} in {obj}");
    }
}

/// The Chrome trace schema; returns the events by phase.
fn check_chrome(json: &Value) -> BTreeMap<String, Vec<Value>> {
    keys_exactly(json, &["displayTimeUnit", "traceEvents", "otherData"], &[]);
    field(json, "displayTimeUnit", "string");
    field(&json["otherData"], "pftrace", "object");
    let mut by_ph: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for ev in field(json, "traceEvents", "array").as_array().unwrap() {
        let ph = field(ev, "ph", "string").as_str().unwrap();
        field(ev, "name", "string");
        field(ev, "pid", "uint");
        field(ev, "tid", "uint");
        match ph {
            "X" => {
                keys_exactly(ev, &["name", "cat", "ph", "pid", "tid", "ts", "dur", "args"], &[]);
                field(ev, "cat", "string");
                field(ev, "ts", "number");
                let dur = field(ev, "dur", "number").as_f64().unwrap();
                assert!(dur >= 0.0, "negative dur: {ev}");
                let args = &ev["args"];
                // cpu_ns and offcpu_ns come together, when the kernel gave CPU times.
                keys_exactly(
                    args,
                    &[
                        "function",
                        "module",
                        "qualname",
                        "path",
                        "file",
                        "line",
                        "rss_entry_bytes",
                        "rss_return_bytes",
                        "id",
                        "depth",
                        "parent",
                    ],
                    &["cpu_ns", "offcpu_ns", "incomplete"],
                );
                assert!(field(args, "id", "uint").as_u64().unwrap() > 0, "{ev}");
                field(args, "depth", "uint");
                field(args, "parent", "uint");
                field(args, "file", "string");
                field(args, "line", "int");
                assert!(field(args, "rss_entry_bytes", "uint").as_u64().unwrap() > 0, "{ev}");
                assert!(field(args, "rss_return_bytes", "uint").as_u64().unwrap() > 0, "{ev}");
                assert_eq!(args.get("cpu_ns").is_some(), args.get("offcpu_ns").is_some(), "{ev}");
                if args.get("cpu_ns").is_some() {
                    let cpu = field(args, "cpu_ns", "uint").as_u64().unwrap();
                    let off = field(args, "offcpu_ns", "uint").as_u64().unwrap();
                    // cpu + off-cpu is the duration (dur is µs, rounded in the JSON).
                    assert!(
                        ((cpu + off) as f64 - dur * 1000.0).abs() < 2.0,
                        "cpu_ns + offcpu_ns != dur: {ev}"
                    );
                }
            }
            "M" => {
                keys_exactly(ev, &["name", "ph", "pid", "tid", "args"], &[]);
                match ev["name"].as_str().unwrap() {
                    "process_name" | "thread_name" => field(&ev["args"], "name", "string"),
                    "process_labels" => field(&ev["args"], "labels", "string"),
                    other => panic!("unexpected metadata event {other}: {ev}"),
                };
            }
            "C" => {
                keys_exactly(ev, &["name", "ph", "pid", "tid", "ts", "args"], &[]);
                field(ev, "ts", "number");
                let args = &ev["args"];
                match ev["name"].as_str().unwrap() {
                    "cpu" => {
                        keys_exactly(args, &["cpu_percent"], &[]);
                        assert!(field(args, "cpu_percent", "number").as_f64().unwrap() >= 0.0);
                    }
                    "memory" => {
                        keys_exactly(args, &["rss_mb", "peak_rss_mb"], &[]);
                        let rss = field(args, "rss_mb", "number").as_f64().unwrap();
                        let peak = field(args, "peak_rss_mb", "number").as_f64().unwrap();
                        assert!(rss > 1.0 && peak >= rss, "{ev}");
                    }
                    other => panic!("unexpected counter {other}: {ev}"),
                }
            }
            other => panic!("unexpected phase {other}: {ev}"),
        }
        by_ph.entry(ph.to_string()).or_default().push(ev.clone());
    }
    by_ph
}

/// The records (prototype) schema; returns function -> its results.
fn check_records(json: &Value) -> BTreeMap<String, Vec<Value>> {
    keys_exactly(json, &["functions", "results", "metadata"], &[]);
    let functions: Vec<String> = field(json, "functions", "array")
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().expect("function names are strings").to_string())
        .collect();
    let results = field(json, "results", "object").as_object().unwrap();
    let metadata = field(json, "metadata", "object").as_object().unwrap();
    let keys: Vec<&String> = results.keys().collect();
    assert_eq!(BTreeSet::from_iter(&functions), BTreeSet::from_iter(keys), "functions vs results keys");
    assert_eq!(results.len(), metadata.len());
    let mut out = BTreeMap::new();
    for f in &functions {
        let meta = &metadata[f];
        keys_exactly(
            meta,
            &[
                "function",
                "lineno",
                "stacksize",
                "filename",
                "args",
                "locals",
                "module",
                "path",
                "qualname",
                "params",
                "origin",
            ],
            &["unresolved"],
        );
        assert_eq!(field(meta, "function", "string"), f.as_str());
        field(meta, "lineno", "int");
        field(meta, "filename", "string");
        field(meta, "args", "array");
        field(meta, "locals", "array");
        // The USDT path has no co_stacksize: null, with the reason.
        assert!(meta["stacksize"].is_null() && meta["unresolved"]["stacksize"].is_string(), "{meta}");
        let module = field(meta, "module", "string").as_str().unwrap();
        let qualname = field(meta, "qualname", "string").as_str().unwrap();
        assert!(qualname.ends_with(f.as_str()), "{meta}");
        assert_eq!(field(meta, "path", "string").as_str().unwrap(), format!("{module}.{qualname}"));
        let calls = results[f].as_array().expect("results per function are arrays");
        for r in calls {
            keys_exactly(
                r,
                &[
                    "name",
                    "cpu_start",
                    "time_start",
                    "time_end",
                    "time_elapsed",
                    "cpu_end",
                    "cpu_usage",
                    "mem_usage",
                    "pid",
                    "process_name",
                    "tid",
                    "id",
                    "depth",
                    "parent",
                ],
                &["incomplete"],
            );
            assert!(field(r, "id", "uint").as_u64().unwrap() > 0, "{r}");
            field(r, "depth", "uint");
            field(r, "parent", "uint");
            for k in
                ["cpu_start", "time_start", "time_end", "time_elapsed", "cpu_end", "cpu_usage", "mem_usage"]
            {
                assert!(field(r, k, "number").as_f64().unwrap() >= 0.0, "{k} negative: {r}");
            }
            field(r, "name", "string");
            field(r, "process_name", "string");
            field(r, "pid", "uint");
            field(r, "tid", "uint");
            let (start, end) = (r["time_start"].as_f64().unwrap(), r["time_end"].as_f64().unwrap());
            assert!(end >= start, "{r}");
            assert!((end - start - r["time_elapsed"].as_f64().unwrap()).abs() < 1e-5, "{r}");
            assert!(r["mem_usage"].as_f64().unwrap() > 1000.0, "mem_usage is kB of RSS: {r}");
        }
        out.insert(f.clone(), calls.clone());
    }
    out
}

// ---------------------------------------------------------------------------
// PerfFlowAspect's format, read as its documentation describes it

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PfwForm {
    Array,
    Object,
}

/// A PerfFlowAspect trace read back: the form and the events.
#[derive(Debug)]
struct PfwTrace {
    form: PfwForm,
    events: Vec<Value>,
}

/// Reads a PerfFlowAspect trace: the array form is `[` followed by events
/// each followed by `,`, usually never closed; the object form starts with
/// `{"displayTimeUnit":"us","otherData":{},"traceEvents":[` and continues
/// the same way. Tolerates a trailing `,` and a missing (or present) close.
fn parse_pfw(text: &str) -> Result<PfwTrace, String> {
    let t = text.trim_start();
    let (form, body) = if let Some(rest) = t.strip_prefix('[') {
        (PfwForm::Array, rest)
    } else if t.starts_with('{') {
        let at = t.find("\"traceEvents\"").ok_or("object form without traceEvents")?;
        let open = at + t[at..].find('[').ok_or("traceEvents without [")?;
        let header: Value = serde_json::from_str(&format!("{}]}}", &t[..=open]))
            .map_err(|e| format!("object header is not JSON: {e}"))?;
        if header["displayTimeUnit"] != "us" {
            return Err(format!(
                "displayTimeUnit is {}, PerfFlowAspect writes us",
                header["displayTimeUnit"]
            ));
        }
        if !header["otherData"].is_object() {
            return Err("otherData is not an object".into());
        }
        (PfwForm::Object, &t[open + 1..])
    } else {
        return Err(format!("neither form: starts with {:?}", &t[..t.len().min(20)]));
    };
    let mut body = body.trim_end();
    let close = if form == PfwForm::Array { "]" } else { "]}" };
    body = body.strip_suffix(close).unwrap_or(body).trim_end();
    body = body.strip_suffix(',').unwrap_or(body);
    let events: Vec<Value> =
        serde_json::from_str(&format!("[{body}]")).map_err(|e| format!("events are not JSON: {e}"))?;
    for line in text.lines().skip(1).filter(|l| !l.trim().is_empty()) {
        if !line.ends_with(',') {
            return Err(format!("event line not followed by a comma: {line}"));
        }
    }
    for ev in &events {
        for k in ["name", "cat", "ph"] {
            if !ev[k].is_string() {
                return Err(format!("event without string {k}: {ev}"));
            }
        }
        for k in ["pid", "tid"] {
            if !ev[k].is_u64() {
                return Err(format!("event without integer {k}: {ev}"));
            }
        }
        if !ev["ts"].is_f64() {
            return Err(format!("ts is not a float of µs: {ev}"));
        }
    }
    Ok(PfwTrace { form, events })
}

/// A call as the events show it: name, pid, tid, start and end µs.
#[derive(Debug, Clone)]
struct PfwCall {
    name: String,
    cat: String,
    pid: u64,
    tid: u64,
    start: f64,
    end: f64,
}

impl PfwTrace {
    /// Checks the events follow PerfFlowAspect's rules and returns the calls:
    /// verbose B/E properly nested per thread, or compact X with dur; with
    /// `cpu_mem`, each call preceded (before its E/X) by a C at its start
    /// with cpu_usage and memory_usage and a C at its end with both 0.
    fn calls(&self, compact: bool, cpu_mem: bool) -> Vec<PfwCall> {
        let mut calls = Vec::new();
        let mut stacks: BTreeMap<(u64, u64), Vec<&Value>> = BTreeMap::new();
        // The C events seen since the last E/X, per thread.
        let mut counters: BTreeMap<(u64, u64), Vec<&Value>> = BTreeMap::new();
        for ev in &self.events {
            let key = (ev["pid"].as_u64().unwrap(), ev["tid"].as_u64().unwrap());
            let ts = ev["ts"].as_f64().unwrap();
            let mut finish = |start: &Value, end: f64| {
                let c = counters.remove(&key).unwrap_or_default();
                let start_ts = start["ts"].as_f64().unwrap();
                if cpu_mem {
                    assert_eq!(c.len(), 2, "a call needs 2 C events before its end: {start} {c:?}");
                    let (open, close) = (c[0], c[1]);
                    assert_eq!(
                        open["ts"].as_f64(),
                        Some(start_ts),
                        "start C not at the call's start: {open}"
                    );
                    assert_eq!(close["ts"].as_f64(), Some(end), "end C not at the call's end: {close}");
                    let cpu = open["args"]["cpu_usage"].as_f64().expect("cpu_usage");
                    let mem = open["args"]["memory_usage"].as_f64().expect("memory_usage");
                    assert!(cpu >= 0.0 && mem > 1000.0, "start C: {open}");
                    assert_eq!(close["args"]["cpu_usage"], 0, "end C: {close}");
                    assert_eq!(close["args"]["memory_usage"], 0, "end C: {close}");
                } else {
                    assert!(c.is_empty(), "C events although cpu-mem-usage is off: {c:?}");
                }
                PfwCall {
                    name: start["name"].as_str().unwrap().into(),
                    cat: start["cat"].as_str().unwrap().into(),
                    pid: key.0,
                    tid: key.1,
                    start: start_ts,
                    end,
                }
            };
            match ev["ph"].as_str().unwrap() {
                "B" if !compact => stacks.entry(key).or_default().push(ev),
                "E" if !compact => {
                    let open = stacks
                        .get_mut(&key)
                        .and_then(Vec::pop)
                        .unwrap_or_else(|| panic!("E without B: {ev}"));
                    assert_eq!(
                        open["name"], ev["name"],
                        "E closes another call than the last B: {open} {ev}"
                    );
                    assert!(ts >= open["ts"].as_f64().unwrap(), "E before its B: {ev}");
                    calls.push(finish(open, ts));
                }
                "X" if compact => {
                    let dur = ev["dur"].as_f64().unwrap_or_else(|| panic!("X without dur: {ev}"));
                    assert!(dur >= 0.0, "{ev}");
                    calls.push(finish(ev, ts + dur));
                }
                "C" => {
                    let args = &ev["args"];
                    assert!(
                        args["cpu_usage"].is_number() && args["memory_usage"].is_number(),
                        "C args: {ev}"
                    );
                    counters.entry(key).or_default().push(ev);
                }
                other => panic!("unexpected phase {other} (compact {compact}): {ev}"),
            }
        }
        assert!(stacks.values().all(Vec::is_empty), "B events left open: {stacks:?}");
        assert!(counters.values().all(Vec::is_empty), "C events without a call: {counters:?}");
        calls
    }
}

/// Hatchet's PerfFlowAspect readers, in Python: turn the last `},` into
/// `}]` (array) or `}]}` (object) and `json.loads` the file. Returns the
/// number of events Python read.
fn hatchet_reads(path: &Path, form: PfwForm) -> usize {
    let close = if form == PfwForm::Array { "}]" } else { "}]}" };
    let code = format!(
        "import json, sys\n\
         lines = open(sys.argv[1]).readlines()\n\
         last = lines[-1].strip()\n\
         if last.endswith('}},'):\n    lines[-1] = last.replace('}},', '{close}')\n\
         data = json.loads(''.join(lines))\n\
         events = data if isinstance(data, list) else data['traceEvents']\n\
         print(len(events))\n"
    );
    python_says(&code, &[path]).trim().parse().expect("a count")
}

/// The nesting WORK makes: every inner inside an outer, the 5th outer inside step.
fn assert_nesting(calls: &[PfwCall]) {
    let inside = |c: &PfwCall, parent: &str| {
        calls.iter().any(|p| p.name == parent && p.tid == c.tid && p.start <= c.start && c.end <= p.end)
    };
    for c in calls.iter().filter(|c| c.name == "inner") {
        assert!(inside(c, "outer"), "inner not inside an outer: {c:?}");
    }
    assert_eq!(calls.iter().filter(|c| c.name == "outer" && inside(c, "Solver.step")).count(), 1);
}

// ---------------------------------------------------------------------------
// The tests

#[test]
fn chrome_trace_validates_and_python_json_loads_it() {
    let dir = TestDir::new("fmt-chrome");
    let script = dir.script("work.py", WORK);
    let run = Pftraced::new(&dir, &WORK_NAMES)
        .arg("--sample-interval")
        .arg("100")
        .env("SLURM_JOB_ID", "4242")
        .launch(&[python().as_os_str(), script.as_os_str()])
        .run();
    run.assert_code(0);
    let (pid, main_tid, worker_tid) = work_ids(&run.stdout);
    let trace = run.trace();
    trace.assert_clean();
    let by_ph = check_chrome(trace.json());

    let calls = &by_ph["X"];
    assert_eq!(count_by(calls.iter().map(|e| e["name"].as_str().unwrap())), qualified_counts());
    // The script is __main__; the args name each call's code object.
    assert!(calls.iter().all(|e| e["pid"] == pid && e["cat"] == "__main__"), "pid and category");
    for e in calls {
        let (function, qualname) = (e["args"]["function"].as_str().unwrap(), e["name"].as_str().unwrap());
        assert!(qualname.ends_with(function) && e["args"]["qualname"] == qualname, "{e}");
        assert_eq!(e["args"]["path"], format!("__main__.{qualname}"), "{e}");
    }
    let tids: BTreeSet<u64> = calls.iter().map(|e| e["tid"].as_u64().unwrap()).collect();
    assert_eq!(tids, BTreeSet::from([main_tid, worker_tid]));
    // The main thread's calls all have CPU figures (tests/it/figures.rs checks their values).
    for e in calls.iter().filter(|e| e["tid"] == main_tid) {
        assert!(e["args"]["cpu_ns"].is_u64() && e["args"]["offcpu_ns"].is_u64(), "{e}");
    }
    // Wall-clock µs, inside the trace's window and before now.
    let pf = &trace.json()["otherData"]["pftrace"];
    let (start, end) = (pf["start_us"].as_f64().unwrap(), pf["end_us"].as_f64().unwrap());
    for e in calls {
        let ts = e["ts"].as_f64().unwrap();
        assert!(start <= ts && ts <= end && end <= now_us(), "ts {ts} outside [{start}, {end}]");
    }

    let meta = &by_ph["M"];
    let named = |n: &str| meta.iter().filter(|e| e["name"] == n).collect::<Vec<_>>();
    let pname = named("process_name");
    assert_eq!(pname.len(), 1);
    assert_eq!(pname[0]["args"]["name"], format!("python3.9 {pid}"));
    let labels = named("process_labels");
    assert_eq!(labels.len(), 1);
    let labels = labels[0]["args"]["labels"].as_str().unwrap();
    assert!(labels.starts_with("slurm job 4242,") && labels.contains("work.py"), "{labels}");
    let threads: BTreeSet<u64> = named("thread_name").iter().map(|e| e["tid"].as_u64().unwrap()).collect();
    assert_eq!(threads, tids, "one thread_name per thread that made calls");
    assert!(named("thread_name").iter().all(|e| e["pid"] == pid));

    // The script idles 0.6 s with a 100 ms sampling interval.
    let counters = &by_ph["C"];
    for name in ["cpu", "memory"] {
        let n = counters.iter().filter(|e| e["name"] == name && e["pid"] == pid).count();
        assert!(n >= 2, "{n} {name} counter events");
    }

    // Python's json module reads it and sees the same events.
    let py = python_says(
        "import json, sys\n\
         d = json.loads(open(sys.argv[1]).read())\n\
         print(len(d['traceEvents']), sum(1 for e in d['traceEvents'] if e['ph'] == 'X'))",
        &[&run.output],
    );
    let total: usize = by_ph.values().map(Vec::len).sum();
    assert_eq!(py.trim(), format!("{total} {}", calls.len()));
}

#[test]
fn pfw_default_files_are_verbose_arrays_with_counters() {
    let (dir, _script, stderr, stdout) = traced_work("fmt-pfw", &["--format", "pfw", "-o", "pfw-out"]);
    let (pid, main_tid, worker_tid) = work_ids(&stdout);
    let name = format!("perfflow.array.{}.{pid}.pfw", hostname());
    let files: Vec<String> = fs::read_dir(dir.join("pfw-out"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        files,
        std::slice::from_ref(&name),
        "one file per traced process, named as PerfFlowAspect names it"
    );
    let path = dir.join("pfw-out").join(&name);
    assert!(
        stderr
            .contains(&format!("pftraced: wrote 24 calls to {}", Path::new("pfw-out").join(&name).display())),
        "{stderr}"
    );

    let text = fs::read_to_string(&path).unwrap();
    assert!(text.starts_with("[\n"), "array form starts with a [ line");
    let pfw = parse_pfw(&text).unwrap_or_else(|e| panic!("{e}:\n{text}"));
    assert_eq!(pfw.form, PfwForm::Array);
    let calls = pfw.calls(false, true);
    assert_eq!(count_by(calls.iter().map(|c| c.name.as_str())), qualified_counts());
    assert!(calls.iter().all(|c| c.pid == pid && c.cat == "__main__"));
    assert_eq!(calls.iter().map(|c| c.tid).collect::<BTreeSet<_>>(), BTreeSet::from([main_tid, worker_tid]));
    assert_eq!(pfw.events.len(), 24 * 4, "B, C, C, E per call");
    assert_nesting(&calls);
    assert_eq!(hatchet_reads(&path, PfwForm::Array), pfw.events.len());
}

#[test]
fn pfw_options_give_compact_objects_named_as_asked() {
    let opts = "log-format=Object:log-event=Compact:cpu-mem-usage=False:name=formats:log-filename-include=name,hostname,pid";
    let (dir, _script, _stderr, stdout) =
        traced_work("fmt-pfw-obj", &["--format", "pfw", "--pfw-options", opts, "-o", "out"]);
    let (pid, _, _) = work_ids(&stdout);
    let path = dir.join("out").join(format!("perfflow.object.formats.{}.{pid}.pfw", hostname()));
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(text.starts_with("{\"displayTimeUnit\":\"us\",\"otherData\":{},\"traceEvents\":[\n"), "{text}");
    let pfw = parse_pfw(&text).unwrap_or_else(|e| panic!("{e}:\n{text}"));
    assert_eq!(pfw.form, PfwForm::Object);
    let calls = pfw.calls(true, false);
    assert_eq!(pfw.events.len(), 24, "one X per call, no C");
    assert_eq!(count_by(calls.iter().map(|c| c.name.as_str())), qualified_counts());
    assert_nesting(&calls);
    assert_eq!(hatchet_reads(&path, PfwForm::Object), 24);
}

#[test]
fn records_follow_the_prototype_shape() {
    let (dir, script, stderr, stdout) =
        traced_work("fmt-records", &["--format", "records", "-o", "records.json"]);
    let (pid, main_tid, worker_tid) = work_ids(&stdout);
    assert!(stderr.contains("pftraced: wrote 24 calls to records.json"), "{stderr}");
    let json: Value = serde_json::from_str(&fs::read_to_string(dir.join("records.json")).unwrap()).unwrap();
    let results = check_records(&json);
    assert_eq!(json["functions"], serde_json::json!(["outer", "inner", "step"]), "in order of first call");
    assert_eq!(results.iter().map(|(k, v)| (k.clone(), v.len())).collect::<BTreeMap<_, _>>(), work_counts());
    for (f, needle) in [("outer", "def outer("), ("inner", "def inner("), ("step", "def step(")] {
        let meta = &json["metadata"][f];
        assert_eq!(meta["lineno"].as_i64(), Some(line_of(&script, needle)), "{meta}");
        assert_eq!(meta["filename"].as_str(), script.to_str());
        assert_eq!(meta["module"], "__main__");
    }
    let all: Vec<&Value> = results.values().flatten().collect();
    assert!(
        all.iter().all(|r| r["pid"] == pid && r["process_name"] == "python3.9" && r["name"] == "python3.9")
    );
    let tids: BTreeSet<u64> = all.iter().map(|r| r["tid"].as_u64().unwrap()).collect();
    assert_eq!(tids, BTreeSet::from([main_tid, worker_tid]));
    // Each function's calls in start order, wall-clock seconds.
    for calls in results.values() {
        let starts: Vec<f64> = calls.iter().map(|r| r["time_start"].as_f64().unwrap()).collect();
        assert!(starts.windows(2).all(|w| w[0] <= w[1]), "{starts:?}");
        assert!(starts.iter().all(|&s| s <= now_us() / 1e6 && s > now_us() / 1e6 - 120.0));
    }
}

/// The script for the timing tests: waits for `go` (or goes at once with
/// `now`), calls `mark` right away, prints the wall time it read on entry,
/// then waits for `exit`.
const MARK: &str = r#"
    import sys, time

    def mark():
        return time.time()

    if sys.argv[1:] != ["now"]:
        print("ready", flush=True)
        if sys.stdin.readline().strip() != "go":
            sys.exit(3)
    t = mark()
    print("marked", repr(t), flush=True)
    if sys.argv[1:] != ["now"]:
        sys.stdin.readline()
"#;

fn marked_at(line: &str) -> f64 {
    line.strip_prefix("marked ").unwrap_or_else(|| panic!("unexpected line {line:?}")).parse().unwrap()
}

/// Two processes under one daemon call `mark` 1.0 s apart: the calls are
/// 1.0 s apart (±50 ms) and each within 20 ms of the process's own
/// `time.time()`, in chrome, records and pfw alike (dumped over the control
/// socket, each format named as `pftracectl dump --format` names it).
#[test]
fn calls_1s_apart_in_two_processes_are_1s_apart_in_every_format() {
    let dir = TestDir::new("fmt-1s");
    let script = dir.script("mark.py", MARK);
    let socket = dir.join("ctl.sock");
    let mut a = PyProcess::spawn(&python(), &script, &[]);
    let mut b = PyProcess::spawn(&python(), &script, &[]);
    a.expect_line("ready");
    b.expect_line("ready");
    let (pa, pb) = (a.pid(), b.pid());
    let mut tracer = Tracer::start(
        &dir,
        &[
            "-t",
            "mark",
            "--pid",
            &pa.to_string(),
            "--pid",
            &pb.to_string(),
            "--serve",
            "--socket",
            socket.to_str().unwrap(),
            "-o",
            "final.json",
        ],
    );
    tracer.wait_for(&format!("pftraced: attached to pid {pa} ("));
    tracer.wait_for(&format!("pftraced: attached to pid {pb} ("));
    tracer.wait_for("pftraced: serving pftracectl on ");
    a.send_line("go");
    let ta = marked_at(&a.read_line());
    thread::sleep(Duration::from_secs(1));
    b.send_line("go");
    let tb = marked_at(&b.read_line());
    eprintln!("the processes read time.time() {:.6} s apart", tb - ta);

    let dump = |format: &str| -> Vec<u8> {
        let mut out = Vec::new();
        let header = control::dump(&socket, CallFilter::default(), Some(format.into()), &mut out)
            .unwrap_or_else(|e| panic!("dump --format {format}: {e}\n{}", tracer.stderr()));
        assert_eq!(header.calls, 2, "dump --format {format}");
        assert_eq!(header.format, format);
        out
    };
    // Each format's first-call timestamp per pid, in µs.
    let mut firsts: BTreeMap<&str, BTreeMap<u64, f64>> = BTreeMap::new();
    let chrome: Value = serde_json::from_slice(&dump("chrome")).unwrap();
    let by_ph = check_chrome(&chrome);
    for e in &by_ph["X"] {
        assert_eq!(e["name"], "mark");
        firsts.entry("chrome").or_default().insert(e["pid"].as_u64().unwrap(), e["ts"].as_f64().unwrap());
    }
    let records: Value = serde_json::from_slice(&dump("records")).unwrap();
    for r in &check_records(&records)["mark"] {
        let t = r["time_start"].as_f64().unwrap() * 1e6;
        firsts.entry("records").or_default().insert(r["pid"].as_u64().unwrap(), t);
    }
    for format in ["pfw", "pfw:log-format=Object:log-event=Compact"] {
        let text = String::from_utf8(dump(format)).unwrap();
        let pfw = parse_pfw(&text).unwrap_or_else(|e| panic!("{e}:\n{text}"));
        let calls = pfw.calls(format != "pfw", true);
        assert_eq!(calls.len(), 2);
        for c in calls {
            firsts.entry(format).or_default().insert(c.pid, c.start);
        }
    }
    // pftracectl carries --pfw-options to the daemon the same way.
    let via_ctl = dir.join("ctl.pfw");
    let out = Command::new(env!("CARGO_BIN_EXE_pftracectl"))
        .arg("--socket")
        .arg(&socket)
        .args(["dump", "--format", "pfw", "--pfw-options", "log-format=Object:cpu-mem-usage=False", "-o"])
        .arg(&via_ctl)
        .output()
        .expect("running pftracectl");
    assert!(out.status.success(), "pftracectl dump: {}", String::from_utf8_lossy(&out.stderr));
    let text = fs::read_to_string(&via_ctl).unwrap();
    let pfw = parse_pfw(&text).unwrap_or_else(|e| panic!("{e}:\n{text}"));
    assert_eq!(pfw.form, PfwForm::Object);
    for c in pfw.calls(false, false) {
        firsts.entry("pftracectl dump --format pfw").or_default().insert(c.pid, c.start);
    }
    let unknown = control::dump(&socket, CallFilter::default(), Some("svg".into()), &mut Vec::new())
        .expect_err("an unknown format is refused");
    assert_eq!(
        unknown.to_string(),
        "unknown trace format \"svg\"; known formats: chrome (default), pfw, records"
    );

    a.send_line("exit");
    b.send_line("exit");
    a.wait(Duration::from_secs(10));
    b.wait(Duration::from_secs(10));
    let done = tracer.finish();
    assert!(done.status.success(), "pftraced: {}\n{}", done.status, done.stderr);
    let fin: Value = serde_json::from_str(&fs::read_to_string(dir.join("final.json")).unwrap()).unwrap();
    for e in &check_chrome(&fin)["X"] {
        firsts
            .entry("final chrome")
            .or_default()
            .insert(e["pid"].as_u64().unwrap(), e["ts"].as_f64().unwrap());
    }

    assert_eq!(firsts.len(), 6);
    for (format, ts) in &firsts {
        let (a_us, b_us) = (ts[&u64::from(pa)], ts[&u64::from(pb)]);
        let gap = (b_us - a_us) / 1e6;
        eprintln!("{format:>40}: second call {gap:.6} s after the first");
        assert!((gap - 1.0).abs() <= 0.05, "{format}: the calls are {gap} s apart, not 1 s (±50 ms)");
        for (us, own) in [(a_us, ta), (b_us, tb)] {
            assert!((us / 1e6 - own).abs() <= 0.02, "{format}: ts {us} µs vs the process's own time {own} s");
        }
    }
}

/// Two daemons, each launching a process, started 1 s apart: every call's
/// timestamp is within 20 ms of the process's own wall clock, so the two
/// traces' gap is the processes' gap (±50 ms), with a clock offset measured
/// by each daemon separately.
#[test]
fn two_daemons_started_1s_apart_share_the_wall_clock() {
    let dir = TestDir::new("fmt-2d");
    let script = dir.script("mark.py", MARK);
    let py = python();
    let start = |n: usize| {
        let out = format!("d{n}.json");
        Tracer::start(
            &dir,
            &["-t", "mark", "-o", out.as_str(), "--", py.to_str().unwrap(), script.to_str().unwrap(), "now"],
        )
    };
    let first = start(0);
    thread::sleep(Duration::from_secs(1));
    let second = start(1);
    let mut marks = Vec::new();
    for (n, t) in [first, second].into_iter().enumerate() {
        let done = t.finish();
        assert!(done.status.success(), "{}\n{}", done.status, done.stderr);
        let own = done.stdout.lines().find(|l| l.starts_with("marked ")).map(marked_at);
        let json: Value =
            serde_json::from_str(&fs::read_to_string(dir.join(&format!("d{n}.json"))).unwrap()).unwrap();
        let calls = &check_chrome(&json)["X"];
        assert_eq!(calls.len(), 1, "one call of mark");
        marks.push((calls[0]["ts"].as_f64().unwrap() / 1e6, own));
    }
    let (traced_gap, own_gap) = match (marks[0], marks[1]) {
        ((a, Some(oa)), (b, Some(ob))) => {
            assert!((a - oa).abs() <= 0.02 && (b - ob).abs() <= 0.02, "trace vs own clock: {marks:?}");
            (b - a, ob - oa)
        }
        _ => panic!("the scripts did not print their marks: {marks:?}"),
    };
    eprintln!(
        "processes started 1 s apart: calls {own_gap:.6} s apart by their clocks, {traced_gap:.6} s in the traces"
    );
    assert!((traced_gap - own_gap).abs() <= 0.05);
    assert!(
        traced_gap > 0.5,
        "the second daemon's process called mark only {traced_gap} s after the first's"
    );
}

#[test]
fn unknown_formats_and_bad_pfw_options_are_refused_before_tracing() {
    let dir = TestDir::new("fmt-refuse");
    let script = dir.script("mark.py", MARK);
    let py = python();
    for (args, message) in [
        (
            vec!["--format", "svg"],
            "unknown trace format \"svg\"; known formats: chrome (default), pfw, records",
        ),
        (
            vec!["--format", "pfw", "--pfw-options", "log-event=Loud"],
            "PerfFlowAspect option log-event=\"Loud\" is not valid; expected Verbose or Compact",
        ),
        (
            vec!["--pfw-options", "log-format=Object"],
            "PerfFlowAspect options only apply to the pfw format, not chrome",
        ),
    ] {
        let mut all = vec!["-t", "mark"];
        all.extend(&args);
        all.extend(["--", py.to_str().unwrap(), script.to_str().unwrap(), "now"]);
        let Finished { status, stderr, .. } = Tracer::start(&dir, &all).finish();
        assert_eq!(status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        assert!(!stderr.contains("attached to pid"), "{args:?} attached first: {stderr}");
    }
}
