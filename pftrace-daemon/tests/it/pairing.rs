//! Entry/return pairing on a real CPython 3.9 with probes: many threads in
//! --pid mode, deep recursion, exceptions and generators. Counts are exact.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use crate::common::*;

/// 10,000 calls of `foo` from 4 threads (2,500 each), traced with --pid:
/// the script waits on stdin until pftraced reports it is attached.
#[test]
fn four_threads_in_pid_mode_give_exact_counts_per_thread() {
    const THREADS: usize = 4;
    const PER_THREAD: usize = 2500;
    let dir = TestDir::new("threads");
    let script = dir.script(
        "threads.py",
        r#"
        import sys, threading

        THREADS, PER_THREAD = 4, 2500

        def foo(i):
            return i + 1

        barrier = threading.Barrier(THREADS)
        tids = [None] * THREADS

        def worker(k):
            tids[k] = threading.get_native_id()
            barrier.wait()          # all threads call foo at the same time
            for i in range(PER_THREAD):
                foo(i)

        print("ready", flush=True)
        if sys.stdin.readline().strip() != "go":
            sys.exit(3)
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print("tids", *tids, flush=True)
        "#,
    );
    let mut py = PyProcess::spawn(&python(), &script, &[]);
    py.expect_line("ready");

    let tracer = Pftraced::new(&dir, &["foo"]).pid(py.pid()).spawn();
    let attached = tracer.wait_attached(py.pid());
    assert!(attached.contains("CPython 3.9"), "{attached}");
    assert!(attached.ends_with("tracing foo"), "{attached}");

    py.send_line("go");
    let tids_line = py.read_line();
    let (status, _) = py.wait(Duration::from_secs(60));
    assert!(status.success(), "the script failed: {status}");
    let script_tids: Vec<u32> = tids_line
        .strip_prefix("tids ")
        .unwrap_or_else(|| panic!("unexpected line {tids_line:?}"))
        .split(' ')
        .map(|t| t.parse().expect("tid"))
        .collect();
    assert_eq!(script_tids.len(), THREADS);

    // pftraced ends by itself, promptly, when the script exits.
    let script_exited = Instant::now();
    let run = tracer.finish();
    run.assert_code(0);
    assert!(
        script_exited.elapsed() < Duration::from_secs(10),
        "pftraced took {:?} to notice the script exited",
        script_exited.elapsed()
    );
    let trace = run.trace();
    trace.assert_clean();

    let foo = trace.named("foo");
    assert_eq!(foo.len(), THREADS * PER_THREAD, "foo calls");
    assert_eq!(trace.calls.len(), foo.len(), "only foo was traced");
    assert_eq!(trace.counter("entry_matched"), 10_000);
    assert_eq!(trace.counter("return_matched"), 10_000);
    assert_eq!(trace.counter("lost"), 0);
    assert_eq!(trace.incomplete_calls(), 0);
    assert!(trace.unmatched_returns().is_empty());
    assert_eq!(trace.names(), ["foo"]);
    assert_eq!(trace.process_pids(), [py.pid()]);
    assert!(trace.process_names.contains_key(&py.pid()));

    let mut per_tid: BTreeMap<u32, Vec<&CallEvent>> = BTreeMap::new();
    for c in &foo {
        assert_eq!(c.pid, py.pid(), "pid of {c:?}");
        assert_eq!(c.file, script.to_str().unwrap());
        assert_eq!(c.line, line_of(&script, "def foo("));
        assert_eq!(c.cat, "__main__");
        per_tid.entry(c.tid).or_default().push(c);
    }
    let mut want: Vec<u32> = script_tids.clone();
    want.sort();
    assert_eq!(
        per_tid.keys().copied().collect::<Vec<_>>(),
        want,
        "the tids in the trace are not those the script reported"
    );
    for (tid, calls) in &mut per_tid {
        assert_eq!(calls.len(), PER_THREAD, "calls on tid {tid}");
        // One thread's foo calls follow each other without overlapping.
        calls.sort_by_key(|c| c.ts_ns);
        for w in calls.windows(2) {
            let slack = w[0].ts_rounding_ns() + w[1].ts_rounding_ns();
            assert!(
                w[1].ts_ns + slack >= w[0].end_ns(),
                "calls overlap on tid {tid}: {:?} then {:?}",
                w[0],
                w[1]
            );
        }
    }
}

/// `rec(50)` recursing to `rec(0)`, called from `outer()`: 51 nested rec
/// calls inside one outer call, each within its caller's interval.
#[test]
fn recursion_to_depth_50_nests_exactly() {
    let dir = TestDir::new("recursion");
    let script = dir.script(
        "recursion.py",
        r#"
        def rec(n):
            if n == 0:
                return 0
            return rec(n - 1) + 1

        def outer():
            return rec(50)

        assert outer() == 50
        "#,
    );
    let run =
        Pftraced::new(&dir, &["rec", "outer"]).launch(&[python().as_os_str(), script.as_os_str()]).run();
    run.assert_code(0);
    let trace = run.trace();
    trace.assert_clean();
    assert_eq!(trace.named("rec").len(), 51);
    assert_eq!(trace.named("outer").len(), 1);
    assert_eq!(trace.calls.len(), 52);

    // Sort by start; for equal written starts (ts is rounded to 0.25 µs) the
    // longer call is the caller.
    let mut calls: Vec<&CallEvent> = trace.calls.iter().collect();
    calls.sort_by(|a, b| a.ts_ns.cmp(&b.ts_ns).then(b.dur_ns.cmp(&a.dur_ns)));
    assert_eq!(calls[0].name, "outer", "outer must come first");
    assert_eq!(calls[0].line, line_of(&script, "def outer("));
    let tid = calls[0].tid;
    let mut min_margin = i128::MAX;
    for (depth, w) in calls.windows(2).enumerate() {
        let (caller, callee) = (w[0], w[1]);
        assert_eq!(callee.name, "rec", "depth {}", depth + 1);
        assert_eq!(callee.line, line_of(&script, "def rec("));
        assert_eq!(callee.tid, tid);
        // Durations are exact to the ns: strictly shorter than the caller's.
        assert!(
            callee.dur_ns < caller.dur_ns,
            "depth {}: callee {callee:?} not shorter than caller {caller:?}",
            depth + 1
        );
        // Starts: rounding is monotonic, so no slack is needed.
        assert!(
            callee.ts_ns >= caller.ts_ns,
            "depth {}: callee starts before its caller: {callee:?} {caller:?}",
            depth + 1
        );
        // Ends: each written ts may be off by its float rounding (see
        // CallEvent::ts_rounding_ns); nothing more is allowed.
        let slack = caller.ts_rounding_ns() + callee.ts_rounding_ns();
        assert!(
            callee.end_ns() <= caller.end_ns() + slack,
            "depth {}: callee ends {} ns after its caller (float slack {slack} ns): {callee:?} {caller:?}",
            depth + 1,
            callee.end_ns() - caller.end_ns()
        );
        min_margin = min_margin.min(caller.end_ns() - callee.end_ns());
    }
    eprintln!("smallest caller-end minus callee-end margin: {min_margin} ns");
}

/// A function that raises (caught by its caller), an exception unwinding
/// through two traced frames, a generator consumed by `for` (N items: N+1
/// frame runs) and a generator abandoned after K items (K resumes + the
/// close() that throws GeneratorExit into it).
#[test]
fn exceptions_and_generators_give_closed_balanced_calls() {
    const RAISES: usize = 300;
    const UNWINDS: usize = 200;
    const ITEMS: usize = 1000;
    const TAKEN: usize = 3;
    let dir = TestDir::new("exc-gen");
    let script = dir.script(
        "excgen.py",
        r#"
        RAISES, UNWINDS, ITEMS, TAKEN = 300, 200, 1000, 3

        def boom(i):
            raise ValueError(i)

        def catcher(i):
            try:
                boom(i)
            except ValueError:
                return 1

        def deep_boom(i):
            raise KeyError(i)

        def passthru(i):
            deep_boom(i)           # does not catch

        def numbers(n):
            for i in range(n):
                yield i

        def abandoned(n):
            for i in range(n):
                yield i

        assert sum(catcher(i) for i in range(RAISES)) == RAISES
        for i in range(UNWINDS):
            try:
                passthru(i)
            except KeyError:
                pass
        total = 0
        for x in numbers(ITEMS):
            total += x
        assert total == ITEMS * (ITEMS - 1) // 2
        for x in abandoned(ITEMS):
            if x == TAKEN - 1:
                break              # the generator is closed when dropped
        "#,
    );
    let names = ["boom", "catcher", "deep_boom", "passthru", "numbers", "abandoned"];
    let run = Pftraced::new(&dir, &names).launch(&[python().as_os_str(), script.as_os_str()]).run();
    run.assert_code(0);
    let trace = run.trace();
    trace.assert_clean();
    let counts = trace.counts();
    let want: BTreeMap<&str, usize> = [
        ("boom", RAISES),
        ("catcher", RAISES),
        ("deep_boom", UNWINDS),
        ("passthru", UNWINDS),
        ("numbers", ITEMS + 1),
        ("abandoned", TAKEN + 1),
    ]
    .into_iter()
    .collect();
    assert_eq!(counts, want);
    assert_eq!(trace.incomplete_calls(), 0);
    assert!(trace.unmatched_returns().is_empty());
    assert_eq!(trace.counter("entry_matched"), trace.calls.len() as u64);
    assert_eq!(trace.counter("return_matched"), trace.calls.len() as u64);

    // Each boom lies inside a catcher, each deep_boom inside a passthru.
    for (inner, outer) in [("boom", "catcher"), ("deep_boom", "passthru")] {
        let mut outers: Vec<&CallEvent> = trace.named(outer);
        outers.sort_by_key(|c| c.ts_ns);
        let mut inners: Vec<&CallEvent> = trace.named(inner);
        inners.sort_by_key(|c| c.ts_ns);
        for (o, i) in outers.iter().zip(&inners) {
            let slack = o.ts_rounding_ns() + i.ts_rounding_ns();
            assert!(
                i.ts_ns >= o.ts_ns && i.end_ns() <= o.end_ns() + slack && i.dur_ns < o.dur_ns,
                "{inner} {i:?} not inside {outer} {o:?}"
            );
        }
    }
    // Generator frame runs do not overlap: each resume ends before the next.
    let mut runs = trace.named("numbers");
    runs.sort_by_key(|c| c.ts_ns);
    for w in runs.windows(2) {
        let slack = w[0].ts_rounding_ns() + w[1].ts_rounding_ns();
        assert!(w[1].ts_ns + slack >= w[0].end_ns(), "{:?} {:?}", w[0], w[1]);
    }
}

/// Children started by a launched Python, with another tracer already
/// holding the probes of the same interpreter file up in every process
/// that runs it (here a second pftraced attached host-wide with
/// `--binary`; in the field any USDT tracer does it). Each child's own
/// attachment then goes live site by site in the kernel, while the
/// breakpoints are already armed: with entry sites first, calls entered in
/// that window never saw their return (21-85 false incomplete calls per
/// child, 31-142 per run on the code before). Five runs of 20 children
/// must give no incomplete call, and every return the kernel matched must
/// be a completed call or a counted return without entry.
#[test]
fn children_attached_while_another_tracer_holds_the_probes_have_no_false_incomplete_calls() {
    // Not serial: --binary attaches host-wide, but only this test's private
    // copy of the interpreter (below), which no other test's process runs,
    // and the assertions are counts (no timing or memory figure).
    const RUNS: usize = 5;
    const CHILDREN: usize = 20;
    let dir = TestDir::new("children-staggered");
    // A private copy of the interpreter (its own inode), so the host-wide
    // attachment of the second tracer touches no other test's processes.
    // The copy finds its standard library at the prefix it was built with.
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let interpreter = bin.join("python3.9");
    std::fs::copy(python(), &interpreter).expect("copying the interpreter");
    let spawn = dir.script(
        "spawn.py",
        r#"
        import subprocess, sys
        for _ in range(int(sys.argv[1])):
            subprocess.run([sys.executable, '-c', 'import json, decimal, fractions, argparse'], check=True)
        "#,
    );
    let holder_script = dir.script("holder.py", "import sys\nprint('ready', flush=True)\nsys.stdin.read()\n");
    let holder = PyProcess::spawn(&interpreter, &holder_script, &[]);
    holder.expect_line("ready");
    let other = Pftraced::new(&dir, &["never_called_anywhere"])
        .arg("--binary")
        .arg(&interpreter)
        .pid(holder.pid())
        .spawn();
    other.wait_attached(holder.pid());

    for run in 0..RUNS {
        let tracer = Pftraced::new(&dir, &["__init__"])
            .arg("-q")
            .launch(&[interpreter.as_os_str(), spawn.as_os_str(), CHILDREN.to_string().as_ref()])
            .run();
        tracer.assert_code(0);
        let trace = tracer.trace();
        let pf = trace.pftrace();
        let parent = tracer.attached_pid();
        let unmatched = trace.unmatched_returns_total();
        eprintln!(
            "run {run}: {} calls, {} incomplete, entries matched {}, returns matched {}, {unmatched} returns without entry",
            trace.calls.len(),
            trace.incomplete_calls(),
            trace.counter("entry_matched"),
            trace.counter("return_matched"),
        );
        assert_eq!(trace.counter("lost"), 0, "run {run}: {pf}");
        assert_eq!(trace.counter("read_errors"), 0, "run {run}: {pf}");
        assert_eq!(trace.incomplete_calls(), 0, "run {run}: false incomplete calls: {pf}");
        assert_eq!(pf["skipped_entries"].as_u64(), Some(0), "run {run}: {pf}");
        assert_eq!(trace.counter("entry_matched"), trace.calls.len() as u64, "run {run}: {pf}");
        assert_eq!(
            trace.counter("return_matched"),
            trace.counter("entry_matched") + unmatched,
            "run {run}: every matched return is a call or a counted return without entry: {pf}"
        );
        // The launched parent has its probes before its first line: all of its
        // returns have entries; the children's start is where the window is.
        assert!(
            trace.unmatched_returns().iter().all(|r| r["pid"].as_u64() != Some(u64::from(parent))),
            "run {run}: returns without entry in the launched process {parent}: {pf}"
        );
        let pids: std::collections::BTreeSet<u32> = trace.calls.iter().map(|c| c.pid).collect();
        assert!(pids.contains(&parent), "run {run}: the parent's calls are missing");
    }
    drop(holder);
    other.finish().assert_code(0);
}

/// `f` in a.py and `f` in b.py calling each other (a.f(4) -> b.f(3) -> ...
/// -> a.f(0)), traced by name only: the kernel reads no return's file name,
/// nor its name (each return closes an entry it saw match, inside the
/// thread's window: `returns_known`), and pftraced pairs each return with its entry by
/// the name and file arguments' addresses, so every call keeps its own file
/// and nests in the other file's caller. A
/// return of `mid`, entered before pftraced attached (--pid), is counted and
/// shown with the marker for a file not read (nothing may misname it).
#[test]
fn same_name_in_two_files_recursing_into_each_other_pairs_exactly_without_returns_files() {
    const ROUNDS: usize = 500;
    let dir = TestDir::new("two-files");
    dir.script("a.py", "import b\n\ndef f(n):\n    if n:\n        b.f(n - 1)\n");
    dir.script("b.py", "import a\n\ndef f(n):\n    if n:\n        a.f(n - 1)\n");
    let script = dir.script(
        "main.py",
        r#"
        import sys, os
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import a, b

        def mid():
            print("ready", flush=True)
            if sys.stdin.readline().strip() != "go":
                sys.exit(3)

        mid()
        for _ in range(500):
            a.f(4)      # a, b, a, b, a
            b.f(3)      # b, a, b, a
        "#,
    );
    let (run, _) = traced_from_go(&dir, &script, &["f", "mid"]);
    let trace = run.trace();
    let pf = trace.pftrace();
    assert_eq!(trace.counter("lost"), 0, "{pf}");
    assert_eq!(trace.incomplete_calls(), 0, "{pf}");
    assert_eq!(pf["skipped_entries"].as_u64(), Some(0), "{pf}");
    let (a, b) = (trace.named_in("f", "/a.py"), trace.named_in("f", "/b.py"));
    assert_eq!((a.len(), b.len(), trace.calls.len()), (5 * ROUNDS, 4 * ROUNDS, 9 * ROUNDS), "{pf}");
    assert!(a.iter().all(|c| c.line == 3) && b.iter().all(|c| c.line == 3));
    // Each call's parent is the other file's f, one level up.
    let by_id: BTreeMap<u64, &CallEvent> = trace.calls.iter().map(|c| (c.id, c)).collect();
    for c in &trace.calls {
        match by_id.get(&c.parent) {
            None => assert_eq!((c.parent, c.depth), (0, 0), "{c:?}"),
            Some(p) => {
                assert_ne!(p.file, c.file, "{c:?} in {p:?}");
                assert_eq!(p.depth + 1, c.depth, "{c:?} in {p:?}");
                let slack = p.ts_rounding_ns() + c.ts_rounding_ns();
                assert!(c.ts_ns >= p.ts_ns && c.end_ns() <= p.end_ns() + slack, "{c:?} outside {p:?}");
            }
        }
    }
    let depth0: BTreeMap<&str, usize> =
        trace.calls.iter().filter(|c| c.depth == 0).fold(BTreeMap::new(), |mut m, c| {
            *m.entry(if c.file.ends_with("/a.py") { "a" } else { "b" }).or_default() += 1;
            m
        });
    assert_eq!(depth0, [("a", ROUNDS), ("b", ROUNDS)].into_iter().collect(), "{pf}");
    // mid's return, without entry: counted, its file not guessed.
    assert_eq!(trace.unmatched_returns_total(), 1, "{pf}");
    let u = &trace.unmatched_returns()[0];
    assert_eq!(u["name"].as_str(), Some("mid"), "{pf}");
    assert_eq!(u["file"].as_str(), Some("<file not read: return without entry>"), "{pf}");
    assert_eq!(trace.counter("return_matched"), trace.counter("entry_matched") + 1, "{pf}");
    assert_eq!(trace.counter("returns_known"), 9 * ROUNDS as u64, "{pf}");
}
