//! What a call is, on each CPython whose probes pftrace reads: the real
//! CPython 3.9 built --with-dtrace and Debian's CPython 3.15, each checked
//! against the interpreter's own account of the same run. A recorder in the
//! traced process counts frame runs (`sys.setprofile` 'call' events on 3.9;
//! `sys.monitoring` PY_START and PY_RESUME on 3.15, events that do not change
//! how generators are closed), and pftrace's calls per function must equal
//! its counts exactly: generators (list, next, send, throw, close, early
//! break), coroutines under asyncio, recursion, exceptions, threads,
//! classes with `__init__` and `super().__init__()`, closures.
//!
//! Also the 3.15 defects one by one, each failing on the code before it:
//! a phantom call per generator object, returns of the `__init__` shim
//! frame, and line -1 for functions with cells.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use crate::common::*;
use serde_json::Value;

/// Debian's CPython 3.15, as `cargo xtask setup` provides it.
fn python315() -> PathBuf {
    sid_python("3.15")
}

/// Runs `python script` under pftraced tracing `names`; the trace, checked
/// clean (nothing lost, no incomplete call, no return without entry).
fn clean_trace(dir: &TestDir, python: &Path, script: &Path, names: &[&str]) -> Trace {
    let run = Pftraced::new(dir, names).launch(&[python.as_os_str(), script.as_os_str()]).run();
    run.assert_code(0);
    let trace = run.trace();
    trace.assert_clean();
    trace
}

/// Both interpreters, labelled.
fn interpreters() -> [(&'static str, PathBuf); 2] {
    [("3.9", python()), ("3.15", python315())]
}

/// `def g(): yield 1`, `list(g())` five times: each generator runs twice
/// (to its yield, then to its end), so 10 calls, on 3.9 as on 3.15 (whose
/// entry probe also fires when `g()` creates the generator: 15 calls with
/// 5 incomplete before).
#[test]
fn generator_objects_add_no_phantom_calls() {
    let dir = TestDir::new("gen-phantom");
    let script = dir.script(
        "gen.py",
        r#"
        def g():
            yield 1

        for _ in range(5):
            list(g())
        "#,
    );
    for (version, python) in interpreters() {
        let trace = clean_trace(&dir, &python, &script, &["g"]);
        assert_eq!(trace.named("g").len(), 10, "{version}: calls of g");
        let creations = trace.counter("generator_creations");
        assert_eq!(creations, if version == "3.9" { 0 } else { 5 }, "{version}: {}", trace.pftrace());
        let line = line_of(&script, "def g(");
        let mut lines: Vec<i64> = trace.named("g").iter().map(|c| c.line).collect();
        lines.sort();
        // Each first run starts at the def line, each resume at the yield.
        assert_eq!(lines, [vec![line; 5], vec![line + 1; 5]].concat(), "{version}: lines");
    }
}

/// `class A: def __init__(self): self.x = 1`, `A()` 100 times, tracing
/// `__init__` from the first line: every call of every `__init__` (the
/// script's and the standard library's at start-up) pairs, and 3.15's shim
/// frame (file `__init__`, which returns from specialised `A()` calls with
/// no entry) is dropped and counted, not reported as 155 returns without
/// entries.
#[test]
fn init_shim_frames_give_no_returns_without_entries() {
    let dir = TestDir::new("init-shim");
    let script = dir.script(
        "init.py",
        r#"
        class A:
            def __init__(self):
                self.x = 1

        for _ in range(100):
            A()
        "#,
    );
    for (version, python) in interpreters() {
        let trace = clean_trace(&dir, &python, &script, &["__init__"]);
        assert_eq!(trace.named_in("__init__", "/init.py").len(), 100, "{version}");
        assert!(
            trace.calls.iter().all(|c| c.file != "__init__"),
            "{version}: a shim frame reported as a call"
        );
        let shims = trace.counter("shim_returns");
        if version == "3.9" {
            assert_eq!(shims, 0);
        } else {
            // The shim appears once `A()` is specialised (after a few calls).
            assert!(shims >= 90, "3.15: {shims} shim returns for 100 specialisable A() calls");
        }
    }
}

/// Functions with cells or free variables (a closure; `super()`'s
/// `__class__`): reported at their first line, as 3.9 reports them (3.15's
/// probe passes -1 there: their code starts with MAKE_CELL/COPY_FREE_VARS,
/// which have no line).
#[test]
fn functions_with_cells_are_reported_at_their_first_line() {
    let dir = TestDir::new("cells");
    let script = dir.script(
        "cells.py",
        r#"
        class Base:
            def __init__(self):
                self.x = 1

        class Child(Base):
            def __init__(self):
                super().__init__()

        def outer():
            v = 3
            def inner():
                return v
            return inner()

        for _ in range(10):
            Child()
            outer()
        "#,
    );
    let want = [
        ("__init__", line_of(&script, "super().__init__()") - 1, 10),
        ("__init__", line_of(&script, "self.x = 1") - 1, 10),
        ("outer", line_of(&script, "def outer("), 10),
        ("inner", line_of(&script, "def inner("), 10),
    ];
    for (version, python) in interpreters() {
        let trace = clean_trace(&dir, &python, &script, &["__init__", "outer", "inner"]);
        let mut got: BTreeMap<(&str, i64), usize> = BTreeMap::new();
        for c in trace.calls.iter().filter(|c| c.file == script.to_str().unwrap()) {
            *got.entry((c.name.as_str(), c.line)).or_default() += 1;
        }
        let want: BTreeMap<(&str, i64), usize> = want.iter().map(|&(n, l, k)| ((n, l), k)).collect();
        assert_eq!(got, want, "{version}: calls per (function, line)");
    }
}

/// The recorder: counts frame runs of the workload's code per function
/// (`name`, or `__init__:FIRSTLINE`) and prints them as `GROUND {json}`.
const RECORDER: &str = r#"
import collections, json, sys, threading

counts = collections.Counter()
first_lines = {}
lock = threading.Lock()
target = None

def _count(code):
    if code.co_filename == target:
        key = code.co_name if code.co_name != "__init__" else "__init__:%d" % code.co_firstlineno
        with lock:
            counts[key] += 1
            first_lines[key] = code.co_firstlineno

def _profile(frame, event, arg):
    if event == "call":
        _count(frame.f_code)

def _monitor(code, offset):
    _count(code)

def start(path):
    global target
    target = path
    if hasattr(sys, "monitoring"):
        m = sys.monitoring
        m.use_tool_id(5, "ground truth")
        m.register_callback(5, m.events.PY_START, _monitor)
        m.register_callback(5, m.events.PY_RESUME, _monitor)
        m.set_events(5, m.events.PY_START | m.events.PY_RESUME)
    else:
        sys.setprofile(_profile)
        threading.setprofile(_profile)

def stop():
    if hasattr(sys, "monitoring"):
        sys.monitoring.set_events(5, 0)
    else:
        sys.setprofile(None)
        threading.setprofile(None)
    print("GROUND " + json.dumps({"counts": counts, "first_lines": first_lines}), flush=True)
"#;

/// The workload. THROWS throws into a suspended generator that catches
/// them, and two closes of generators suspended inside a try block: on
/// 3.15 those frame runs fire a return but no entry.
const WORKLOAD: &str = r#"
import asyncio, os, sys, threading
import recorder

THROWS = 3

def plain(i):
    return i + 1

def countdown(n):
    while n:
        yield n
        n -= 1

def stepper():
    got = yield 1
    while True:
        try:
            got = yield got
        except KeyError:
            got = -1

def closer():
    try:
        yield 1
        yield 2
    finally:
        pass

def boom(i):
    raise ValueError(i)

def catcher(i):
    try:
        boom(i)
    except ValueError:
        return 1

def passthru(i):
    boom(i)

def fact(n):
    return 1 if n <= 1 else n * fact(n - 1)

def outer_cell():
    v = 3
    def inner_cell():
        return v
    return inner_cell()

class Base:
    def __init__(self):
        self.x = 1

class Child(Base):
    def __init__(self):
        super().__init__()

async def leaf_co(i):
    await asyncio.sleep(0)
    return i

async def main_co():
    return sum(await asyncio.gather(*(leaf_co(i) for i in range(20))))

def worker(k):
    for i in range(200):
        plain(i)
        list(countdown(3))

def main():
    for i in range(500):
        plain(i)
    for _ in range(5):
        list(countdown(4))
    s = stepper()
    next(s)
    s.send(5)
    for _ in range(THROWS):
        assert s.throw(KeyError) == -1
    s.close()
    for x in countdown(10):
        if x == 7:
            break
    c = closer()
    next(c)
    c.close()
    for i in range(300):
        catcher(i)
    for i in range(200):
        try:
            passthru(i)
        except ValueError:
            pass
    for _ in range(10):
        fact(30)
    for _ in range(50):
        outer_cell()
    for _ in range(100):
        Base()
        Child()
    for _ in range(3):
        asyncio.run(main_co())
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

if "record" in sys.argv:
    recorder.start(os.path.abspath(__file__))
main()
if "record" in sys.argv:
    recorder.stop()
"#;

/// Traced names: every function of the workload.
const WORKLOAD_NAMES: [&str; 14] = [
    "plain",
    "countdown",
    "stepper",
    "closer",
    "boom",
    "catcher",
    "passthru",
    "fact",
    "outer_cell",
    "inner_cell",
    "__init__",
    "leaf_co",
    "main_co",
    "worker",
];

/// Runs the workload under pftraced and compares with its recorder.
fn workload_matches_ground_truth(version: &str, python: PathBuf) {
    let dir = TestDir::new(&format!("ground-truth-{version}"));
    dir.script("recorder.py", RECORDER);
    let script = dir.script("work.py", WORKLOAD);
    let run = Pftraced::new(&dir, &WORKLOAD_NAMES)
        .arg("-q")
        .launch(&[python.as_os_str(), script.as_os_str(), "record".as_ref()])
        .run();
    run.assert_code(0);
    let ground: Value = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("GROUND "))
        .map(|j| serde_json::from_str(j).expect("recorder JSON"))
        .unwrap_or_else(|| panic!("no GROUND line in the workload's output:\n{}", run.stdout));
    // The recorder sees every frame of the file; pftrace only the traced names.
    let traced = |key: &str| WORKLOAD_NAMES.contains(&key.split(':').next().unwrap_or(key));
    let want: BTreeMap<String, u64> = ground["counts"]
        .as_object()
        .expect("counts")
        .iter()
        .filter(|(k, _)| traced(k))
        .map(|(k, v)| (k.clone(), v.as_u64().expect("count")))
        .collect();
    let first_lines: BTreeMap<&str, i64> = ground["first_lines"]
        .as_object()
        .expect("first_lines")
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_i64().expect("line")))
        .collect();

    let trace = run.trace();
    let pf = trace.pftrace();
    let file = script.to_str().unwrap();
    let mut got: BTreeMap<String, u64> = BTreeMap::new();
    for c in trace.calls.iter().filter(|c| c.file == file) {
        let key = if c.name == "__init__" { format!("__init__:{}", c.line) } else { c.name.clone() };
        *got.entry(key).or_default() += 1;
    }
    assert_eq!(got, want, "{version}: calls per function, pftrace (left) and the interpreter (right)");
    // Calls that are not generator resumes start at the code's first line.
    for c in trace.calls.iter().filter(|c| c.file == file) {
        let key = if c.name == "__init__" { format!("__init__:{}", c.line) } else { c.name.clone() };
        if !["countdown", "stepper", "closer", "leaf_co", "main_co"].contains(&c.name.as_str()) {
            assert_eq!(Some(&c.line), first_lines.get(key.as_str()), "{version}: line of {c:?}");
        }
    }
    assert_eq!(trace.counter("lost"), 0, "{pf}");
    assert_eq!(trace.counter("read_errors"), 0, "{pf}");
    assert_eq!(trace.counter("frame_unknown"), 0, "{pf}");
    assert_eq!(trace.incomplete_calls(), 0, "{version}: {pf}");
    assert_eq!(pf["skipped_entries"].as_u64(), Some(0), "{pf}");
    // 3.9 fires an entry for every frame run. 3.15 fires none when throw()
    // or close() resumes a generator: THROWS throws and the two closes of
    // generators suspended in a try block give returns without entries,
    // flagged as generator frames, and nothing else does.
    let unmatched = trace.unmatched_returns();
    if version == "3.9" {
        assert_eq!(trace.unmatched_returns_total(), 0, "{pf}");
    } else {
        assert_eq!(trace.unmatched_returns_total(), 3 + 2, "{pf}");
        assert_eq!(pf["unmatched_generator_returns"].as_u64(), Some(5), "{pf}");
        let mut names: Vec<&str> = unmatched.iter().map(|u| u["name"].as_str().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["closer", "stepper", "stepper", "stepper", "stepper"], "{pf}");
        assert!(trace.counter("generator_creations") > 0, "{pf}");
        assert!(trace.counter("shim_returns") > 0, "{pf}");
    }
    assert_eq!(
        trace.counter("entry_matched") + trace.unmatched_returns_total(),
        trace.counter("return_matched"),
        "{pf}"
    );
    assert_eq!(trace.counter("entry_matched"), trace.calls.len() as u64, "{pf}");
}

#[test]
fn workload_matches_the_interpreter_own_count_on_3_9() {
    workload_matches_ground_truth("3.9", python());
}

#[test]
fn workload_matches_the_interpreter_own_count_on_3_15() {
    workload_matches_ground_truth("3.15", python315());
}
