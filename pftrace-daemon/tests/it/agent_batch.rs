//! The batched agent road through pftraced (issue 12; pftrace-agent/README.md
//! "Batched road in pftraced"), pftraced's default (`PFTRACE_AGENT_BATCH=0`
//! turns it off): pftraced gives each agent the CPU slots over its control
//! socket; each event of a traced call then reaches it in batches drained
//! by the kernel, paired with the two-report events as they are.
//! - The calls in the trace are exactly CPython's own recorder's
//!   (sys.setprofile in the same process), per thread and function, on the
//!   agent tests' call-kinds workload (threads, recursion, exceptions,
//!   generators, a coroutine), and most of them came batched.
//! - Calls open at a clean exit, at `os._exit`, at a SIGKILL and at
//!   `pftracectl stop` (a thread spinning in Python, one in C code without
//!   the GIL, one parked) are in the trace as incomplete exactly as the
//!   two-report road (`PFTRACE_AGENT_BATCH=0`) has them on the same script;
//!   every batched event is accounted for (on the ring, read by pftraced at
//!   its stop, or counted).
//! - A two-report call (a code object's first call) inside a batched one,
//!   and recursion past the one-call prototype's 256, nest right.

use std::{collections::BTreeMap, time::Duration};

use crate::common::*;

/// Launch mode on 3.12.1 and Debian's 3.15 (JIT on: the agent serves it).
#[test]
fn batched_road_exact_counts_through_pftraced() {
    require_root();
    let interpreters = [
        ("pyenv 3.12.1", pyenv_python("3.12.1"), vec![]),
        ("debian 3.15 PYTHON_JIT=1", sid_python("3.15"), vec![("PYTHON_JIT", "1")]),
    ];
    for (label, py, env) in interpreters {
        let dir = TestDir::new("agent-batch");
        let script = call_kinds_workload(&dir);
        // The default road (no PFTRACE_AGENT_BATCH).
        let mut tracer = Pftraced::new(&dir, CALL_KINDS_NAMES);
        for (k, v) in &env {
            tracer = tracer.env(k, v);
        }
        let run = tracer.launch(&[py.as_os_str(), script.as_os_str()]).run();
        run.assert_code(0);
        assert!(run.stdout.contains("DONE"), "{label}: {}", run.stdout);
        assert!(run.stderr.contains(", in-process agent), tracing "), "{label}: {}", run.stderr);
        let want = recorded(&run.stdout);
        check_recorder(label, &want);
        let trace = run.trace();
        trace.assert_clean();
        let mut got: BTreeMap<(u32, String), usize> = BTreeMap::new();
        for c in &trace.calls {
            assert_eq!(c.file, script.to_str().unwrap(), "{label}: {c:?}");
            assert!(!c.incomplete, "{label}: incomplete call {c:?}");
            *got.entry((c.tid, c.name.clone())).or_default() += 1;
        }
        assert_eq!(got, want, "{label}: calls per thread and function");
        // Nesting: rec(50)'s first call's entry goes with its strings, the
        // 50 below it are batched, drained before its return: depths
        // 0..=50 once each, each parent the call one level below; every
        // boom under a catcher of its thread, one level deeper.
        let by_id: BTreeMap<u64, _> = trace.calls.iter().map(|c| (c.id, c)).collect();
        let mut recs: Vec<_> = trace.calls.iter().filter(|c| c.name == "rec").collect();
        recs.sort_by_key(|c| c.depth);
        assert_eq!(recs.iter().map(|c| c.depth).collect::<Vec<_>>(), (0..=50).collect::<Vec<_>>(), "{label}");
        for w in recs.windows(2) {
            assert_eq!(
                w[1].parent, w[0].id,
                "{label}: rec at depth {} under the one at {}",
                w[1].depth, w[0].depth
            );
        }
        assert_eq!(recs[0].parent, 0, "{label}");
        // (but the one uncaught boom, called directly by untraced code).
        let booms: Vec<_> = trace.calls.iter().filter(|c| c.name == "boom").collect();
        assert_eq!(booms.iter().filter(|b| b.parent == 0).count(), 1, "{label}: the direct boom");
        for b in booms.iter().filter(|b| b.parent != 0) {
            let p = by_id.get(&b.parent).unwrap_or_else(|| panic!("{label}: boom without its parent {b:?}"));
            assert_eq!((p.name.as_str(), p.tid, p.depth + 1), ("catcher", b.tid, b.depth), "{label}: {b:?}");
        }
        let calls = trace.calls.len() as u64;
        let pf = trace.pftrace();
        let batch = &pf["counters"]["batch"];
        let n = |k: &str| batch[k].as_u64().unwrap_or_else(|| panic!("{label}: no batch counter {k}: {pf}"));
        // The workers are new threads of a tracked process: a CPU slot from
        // their creation, so every event of theirs is batched (the strings
        // were sent by the main thread's first calls): 300 work, 300
        // catcher, 300 boom each, two events a call.
        assert!(n("events") >= 4 * 2 * 900, "{label}: batched events {}: {pf}", n("events"));
        assert!(n("events") < 2 * calls, "{label}: first entries go with their strings (by the kernel)");
        for k in ["lost", "overrun", "unread", "exit_unread", "unknown", "stop_unread"] {
            assert_eq!(n(k), 0, "{label}: batch counter {k}: {pf}");
        }
        assert!(n("drains") > 0 && n("drains") <= n("events"), "{label}: {pf}");
        assert_eq!(trace.counter("agent_reports"), 2 * calls, "{label}: both ends of every call");
        assert_eq!(trace.counter("agent_foreign") + trace.counter("agent_bad"), 0, "{label}: {pf}");
        let line = format!(
            "batched agent road: {} events in {} batches, {} read by pftraced at its stop",
            n("events"),
            n("drains"),
            n("by_daemon")
        );
        assert!(run.stderr.contains(&line), "{label}: {}", run.stderr);
        eprintln!(
            "{label}: {calls} calls as CPython's recorder, {} events batched in {} drains",
            n("events"),
            n("drains")
        );
    }
}

/// How the ends' workload ends: a clean exit with a thread parked in a
/// traced call; `os._exit` inside one; SIGKILL from the test while the main
/// thread spins in one; `pftracectl stop` while the main thread spins in
/// Python, a thread runs C code without the GIL (sha256 of 32 MiB) and one is parked,
/// each inside a traced call with its children's events buffered.
const ENDS: &str = r#"
import hashlib, os, sys, threading, time

mode, ready, stop = sys.argv[1], sys.argv[2], sys.argv[3]

def leaf(i):
    return i

def parked(ev, there, warm=False):
    if warm:
        return
    for i in range(3):
        leaf(i)
    there.set()
    ev.wait()

def crunch(there, warm=False):
    if warm:
        return
    for i in range(4):
        leaf(i)
    there.set()
    data = b"x" * (32 << 20)
    while not os.path.exists(stop):
        hashlib.sha256(data)  # 0.2 s in C without the GIL (Debian's 3.15 has no pbkdf2)

def spin(warm=False):
    if warm:
        return
    for i in range(5):
        leaf(i)
    with open(ready, "w") as f:
        f.write(str(os.getpid()))
    end = time.monotonic() + 20
    while not os.path.exists(stop) and time.monotonic() < end:
        pass

def outer(warm=False):
    if warm:
        return
    for i in range(5):
        leaf(i)
    os._exit(0)

# Every function's first call (its entry's strings go by the kernel) before
# the ends, so what is open at the end was batched.
leaf(0)
parked(None, None, True)
crunch(None, True)
spin(True)
outer(True)
never = threading.Event()
there = threading.Event()
threading.Thread(target=parked, args=(never, there), daemon=True).start()
there.wait()
if mode == "stop":
    there2 = threading.Event()
    threading.Thread(target=crunch, args=(there2,), daemon=True).start()
    there2.wait()
time.sleep(0.05)
if mode == "exit":
    for i in range(5):
        leaf(i)
elif mode == "os_exit":
    outer()
else:
    spin()
"#;

const END_NAMES: &[&str] = &["leaf", "parked", "crunch", "spin", "outer"];

/// A call as both roads must show it: its thread (main or not), name,
/// whether incomplete, depth and its parent's name.
type Shape = (bool, String, bool, u64, String);

/// Runs the ends' workload under pftraced (`road`: the value of
/// PFTRACE_AGENT_BATCH, None for the default) and returns its calls'
/// shapes with their counts, and the trace's batch counters.
fn ends_run(
    python: &std::path::Path,
    mode: &str,
    road: Option<&str>,
) -> (BTreeMap<Shape, usize>, serde_json::Value) {
    let dir = TestDir::new("agent-batch-ends");
    let script = dir.script("ends.py", ENDS);
    let (ready, stop_file) = (dir.join("ready"), dir.join("stop"));
    let mut tracer = serving(&dir, END_NAMES).arg("--agent");
    if let Some(v) = road {
        tracer = tracer.env("PFTRACE_AGENT_BATCH", v);
    }
    let cmd =
        [python.as_os_str(), script.as_os_str(), mode.as_ref(), ready.as_os_str(), stop_file.as_os_str()];
    let tracer = tracer.launch(&cmd).spawn();
    let wait_ready = || {
        for _ in 0..2000 {
            if let Some(pid) = std::fs::read_to_string(&ready).ok().and_then(|s| s.trim().parse::<u32>().ok())
            {
                return pid;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("{mode}: the workload never got ready");
    };
    let run = match mode {
        "kill" => {
            let pid = wait_ready();
            std::thread::sleep(Duration::from_millis(50));
            // SAFETY: a signal to the launched workload.
            assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
            tracer.finish()
        }
        "stop" => {
            wait_ready();
            std::thread::sleep(Duration::from_millis(50));
            let socket = socket_of(&dir);
            ctl_ok(&socket, &["stop"]);
            let run = tracer.finish();
            std::fs::write(&stop_file, "").unwrap();
            run
        }
        _ => {
            let run = tracer.finish();
            run.assert_code(0);
            run
        }
    };
    let trace = run.trace();
    let by_id: BTreeMap<u64, &CallEvent> = trace.calls.iter().map(|c| (c.id, c)).collect();
    let mut shapes = BTreeMap::new();
    for c in &trace.calls {
        let parent = by_id.get(&c.parent).map_or(String::new(), |p| p.name.clone());
        *shapes.entry((c.tid == c.pid, c.name.clone(), c.incomplete, c.depth, parent)).or_default() += 1;
    }
    let pf = trace.pftrace().clone();
    assert_eq!(trace.counter("agent_bad") + trace.counter("agent_foreign"), 0, "{mode} {road:?}: {pf}");
    (shapes, pf["counters"]["batch"].clone())
}

fn shape(main: bool, name: &str, incomplete: bool, depth: u64, parent: &str) -> Shape {
    (main, name.to_string(), incomplete, depth, parent.to_string())
}

#[test]
fn open_calls_at_exit_kill_and_stop_as_the_two_report_road_has_them() {
    require_root();
    let interpreters = [("pyenv 3.12.1", pyenv_python("3.12.1")), ("debian 3.15", sid_python("3.15"))];
    for (label, py) in interpreters {
        for mode in ["exit", "os_exit", "kill", "stop"] {
            let (two, _) = ends_run(&py, mode, Some("0"));
            let (batched, batch) = ends_run(&py, mode, None);
            let n = |k: &str| {
                batch[k].as_u64().unwrap_or_else(|| panic!("{label} {mode}: no counter {k}: {batch}"))
            };
            assert!(n("events") > 0, "{label} {mode}: nothing batched: {batch}");
            for k in ["lost", "overrun", "unread", "exit_unread", "unknown", "stop_unread"] {
                assert_eq!(n(k), 0, "{label} {mode}: batch counter {k}: {batch}");
            }
            // What both roads must show (the parked thread's call is open in
            // every mode: a daemon thread, never returning).
            let mut want: BTreeMap<Shape, usize> = BTreeMap::new();
            want.insert(shape(true, "leaf", false, 0, ""), 1);
            want.insert(shape(false, "parked", true, 0, ""), 1);
            want.insert(shape(false, "leaf", false, 1, "parked"), 3);
            for warm in ["parked", "crunch", "spin", "outer"] {
                want.insert(shape(true, warm, false, 0, ""), 1);
            }
            match mode {
                "exit" => *want.get_mut(&shape(true, "leaf", false, 0, "")).unwrap() += 5,
                "os_exit" => {
                    want.insert(shape(true, "outer", true, 0, ""), 1);
                    want.insert(shape(true, "leaf", false, 1, "outer"), 5);
                }
                _ => {
                    want.insert(shape(true, "spin", true, 0, ""), 1);
                    want.insert(shape(true, "leaf", false, 1, "spin"), 5);
                }
            }
            if mode == "stop" {
                want.insert(shape(false, "crunch", true, 0, ""), 1);
                want.insert(shape(false, "leaf", false, 1, "crunch"), 4);
            }
            assert_eq!(two, want, "{label} {mode}: the two-report road");
            assert_eq!(batched, want, "{label} {mode}: the batched road, as the two-report road");
            eprintln!(
                "{label} {mode}: as the two-report road; {} events batched, {} read by pftraced at its stop",
                n("events"),
                n("by_daemon")
            );
        }
    }
}

/// A code object's first call (its entry goes by the kernel, with its
/// strings) inside batched calls, and recursion past 256 (the one-call
/// prototype's stack, which sent deeper calls by the kernel without a
/// depth): every call under its caller.
const NESTED: &str = r#"
import sys, time

def leaf(i):
    return i

def inner():
    return leaf(1) + leaf(2)

def outer(first_inner):
    leaf(0)
    if first_inner:
        return inner()
    return 0

def rec(n):
    return 0 if n == 0 else 1 + rec(n - 1)

sys.setrecursionlimit(2000)
# The main thread's CPU slot (given at its first report) is valid from its
# next switch-in; the agent looks again every 10 ms.
leaf(0)
time.sleep(0.03)
for i in range(3):
    outer(False)
outer(True)
rec(299)
print("DONE", flush=True)
"#;

#[test]
fn a_two_report_call_inside_batched_ones_and_deep_recursion_nest_right() {
    require_root();
    for (label, py) in [("pyenv 3.12.1", pyenv_python("3.12.1")), ("debian 3.15", sid_python("3.15"))] {
        let dir = TestDir::new("agent-batch-nest");
        let script = dir.script("nest.py", NESTED);
        let run = Pftraced::new(&dir, &["leaf", "inner", "outer", "rec"])
            .arg("--agent")
            .launch(&[py.as_os_str(), script.as_os_str()])
            .run();
        run.assert_code(0);
        let trace = run.trace();
        trace.assert_clean();
        let by_id: BTreeMap<u64, &CallEvent> = trace.calls.iter().map(|c| (c.id, c)).collect();
        let parent = |c: &CallEvent| by_id.get(&c.parent).map(|p| (p.name.clone(), p.depth));
        assert!(trace.calls.iter().all(|c| !c.incomplete), "{label}");
        let inner: Vec<_> = trace.calls.iter().filter(|c| c.name == "inner").collect();
        assert_eq!(inner.len(), 1, "{label}");
        assert_eq!(
            (inner[0].depth, parent(inner[0])),
            (1, Some(("outer".into(), 0))),
            "{label}: inner under outer"
        );
        let outers: Vec<_> = trace.calls.iter().filter(|c| c.name == "outer").collect();
        assert_eq!(outers.len(), 4, "{label}");
        let under_inner: Vec<_> = trace.calls.iter().filter(|c| c.parent == inner[0].id).collect();
        assert_eq!(under_inner.len(), 2, "{label}: leaf(1), leaf(2) under inner");
        assert!(under_inner.iter().all(|c| c.name == "leaf" && c.depth == 2), "{label}: {under_inner:?}");
        let leaves_under_outer = trace.calls.iter().filter(|c| c.name == "leaf" && c.depth == 1).count();
        assert_eq!(trace.calls.iter().filter(|c| c.name == "leaf" && c.depth == 0).count(), 1, "{label}");
        assert_eq!(leaves_under_outer, 4, "{label}: each outer's leaf(0)");
        let mut recs: Vec<_> = trace.calls.iter().filter(|c| c.name == "rec").collect();
        recs.sort_by_key(|c| c.depth);
        assert_eq!(recs.iter().map(|c| c.depth).collect::<Vec<_>>(), (0..300).collect::<Vec<_>>(), "{label}");
        for w in recs.windows(2) {
            assert_eq!(
                w[1].parent, w[0].id,
                "{label}: rec at depth {} under the one at {}",
                w[1].depth, w[0].depth
            );
            // Inside its parent, to the trace's rounding of µs (0.25 µs a
            // value at today's epoch, start and duration each).
            let slack = 2 * (w[0].ts_rounding_ns() + w[1].ts_rounding_ns());
            assert!(
                w[1].ts_ns + slack >= w[0].ts_ns && w[1].end_ns() <= w[0].end_ns() + slack,
                "{label}: inside its parent: {:?} {:?}",
                w[0],
                w[1]
            );
        }
        let batch = &trace.pftrace()["counters"]["batch"];
        assert!(batch["events"].as_u64().unwrap() >= 2 * 299, "{label}: recursion batched: {batch}");
    }
}
