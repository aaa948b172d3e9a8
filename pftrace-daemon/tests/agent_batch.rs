//! The batched agent road through pftraced (issue 12; pftrace-agent/README.md
//! "Batched reports"): with `PFTRACE_AGENT_BATCH=1` pftraced loads the
//! batched road and gives each agent the CPU slots over its control socket;
//! whole calls then reach it in batches drained by the kernel. The calls in
//! the trace are exactly CPython's own recorder's (sys.setprofile in the
//! same process), per thread and function, with threads, recursion,
//! exceptions and generators, and most of them came batched.

mod common;

use std::collections::BTreeMap;

use common::*;

const NAMES: &[&str] = &["work", "rec", "boom", "catcher", "gen_count"];

/// Main thread and 4 workers; the recorder's entries printed as `REC tid name`.
const WORKLOAD: &str = r#"
import os, sys, threading, time

TRACED = {"work", "rec", "boom", "catcher", "gen_count"}
entries = []
lock = threading.Lock()

def profiler(frame, event, arg):
    if event == "call" and frame.f_code.co_name in TRACED:
        with lock:
            entries.append((threading.get_native_id(), frame.f_code.co_name))

def work(x):
    return x * 2

def rec(n):
    return 0 if n == 0 else 1 + rec(n - 1)

def boom(n):
    if n % 3 == 0:
        raise ValueError(n)
    return n

def catcher(n):
    try:
        return boom(n)
    except ValueError:
        return -1

def gen_count(n):
    for i in range(n):
        yield i

def worker():
    sys.setprofile(profiler)
    for i in range(300):
        work(i)
        catcher(i)
    sum(gen_count(10))
    sys.setprofile(None)

sys.setprofile(profiler)
for i in range(200):
    work(i)
time.sleep(0.02)
for i in range(200):
    work(i)
rec(50)
for i in range(30):
    catcher(i)
sum(gen_count(10))
threads = [threading.Thread(target=worker) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
sys.setprofile(None)
for tid, name in entries:
    print("REC", tid, name)
print("DONE", flush=True)
"#;

fn recorded(stdout: &str) -> BTreeMap<(u32, String), usize> {
    let mut out = BTreeMap::new();
    for line in stdout.lines().filter_map(|l| l.strip_prefix("REC ")) {
        let (tid, name) = line.split_once(' ').unwrap();
        *out.entry((tid.parse().unwrap(), name.to_string())).or_default() += 1;
    }
    out
}

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
        let script = dir.script("app.py", WORKLOAD);
        let mut tracer = Pftraced::new(&dir, NAMES).env("PFTRACE_AGENT_BATCH", "1");
        for (k, v) in &env {
            tracer = tracer.env(k, v);
        }
        let run = tracer.launch(&[py.as_os_str(), script.as_os_str()]).run();
        run.assert_code(0);
        assert!(run.stdout.contains("DONE"), "{label}: {}", run.stdout);
        assert!(run.stderr.contains(", in-process agent), tracing "), "{label}: {}", run.stderr);
        let want = recorded(&run.stdout);
        let total = |name: &str| want.iter().filter(|((_, n), _)| n == name).map(|(_, c)| c).sum::<usize>();
        assert_eq!(total("work"), 400 + 4 * 300, "{label}: recorder");
        assert_eq!(total("rec"), 51, "{label}: recorder");
        assert_eq!(total("catcher"), 30 + 4 * 300, "{label}: recorder");
        assert_eq!(total("boom"), 30 + 4 * 300, "{label}: recorder");
        // gen_count: the generator's start and its 10 resumes + the last one (StopIteration).
        assert_eq!(total("gen_count"), 5 * 11, "{label}: recorder");
        let trace = run.trace();
        trace.assert_clean();
        let mut got: BTreeMap<(u32, String), usize> = BTreeMap::new();
        for c in &trace.calls {
            assert_eq!(c.file, script.to_str().unwrap(), "{label}: {c:?}");
            assert!(!c.incomplete, "{label}: incomplete call {c:?}");
            *got.entry((c.tid, c.name.clone())).or_default() += 1;
        }
        assert_eq!(got, want, "{label}: calls per thread and function");
        // Nesting: rec(50)'s first call goes with its strings (two reports),
        // the 50 below it are batched, drained before its return: depths
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
        for b in trace.calls.iter().filter(|c| c.name == "boom") {
            let p = by_id.get(&b.parent).unwrap_or_else(|| panic!("{label}: boom without its parent {b:?}"));
            assert_eq!((p.name.as_str(), p.tid, p.depth + 1), ("catcher", b.tid, b.depth), "{label}: {b:?}");
        }
        let calls = trace.calls.len() as u64;
        let pf = trace.pftrace();
        let batch = &pf["counters"]["batch"];
        let n = |k: &str| batch[k].as_u64().unwrap_or_else(|| panic!("{label}: no batch counter {k}: {pf}"));
        // The workers are new threads of a tracked process: a CPU slot from
        // their creation, so every call of theirs is batched (the strings
        // were sent by the main thread's first calls): 300 work, 300
        // catcher, 300 boom, 11 gen_count runs each.
        assert!(n("calls") >= 4 * 911, "{label}: batched calls {}: {pf}", n("calls"));
        assert!(n("calls") < calls, "{label}: first calls go with their strings (two reports)");
        for k in ["lost", "overrun", "unread", "exit_unread", "unknown"] {
            assert_eq!(n(k), 0, "{label}: batch counter {k}: {pf}");
        }
        assert!(n("drains") > 0 && n("drains") <= n("calls"), "{label}: {pf}");
        assert_eq!(trace.counter("agent_reports"), 2 * calls, "{label}: both ends of every call");
        assert_eq!(trace.counter("agent_foreign") + trace.counter("agent_bad"), 0, "{label}: {pf}");
        let line = format!("batched agent road: {} calls in {} batches", n("calls"), n("drains"));
        assert!(run.stderr.contains(&line), "{label}: {}", run.stderr);
        eprintln!(
            "{label}: {calls} calls as CPython's recorder, {} batched in {} drains",
            n("calls"),
            n("drains")
        );
    }
}
