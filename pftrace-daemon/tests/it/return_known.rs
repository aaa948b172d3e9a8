//! Returns sent without reading their name (issue 13, dense mode,
//! pftrace-ebpf/src/depth.rs), on the real CPython 3.9 built --with-dtrace:
//! a return whose entry the kernel saw match, within the thread's window of
//! its innermost 44 open levels, is sent
//! with its name and file arguments' addresses only, and pftraced pairs it
//! with that entry. `returns_known` equals the exact number of such returns
//! of a scripted workload (plain calls, recursion through traced and
//! untraced levels, exceptions, generator runs), every call is exact; a
//! call begun before the attachment still gives its one return without
//! entry; and a call whose name stops being traced while it runs is closed
//! by its return; threads switching mid-call keep their own windows. Each
//! process ends with `os._exit` and reads its go with
//! `os.read` (see return_skip.rs: no calls the test would have to guess).

use std::{path::Path, time::Duration};

use crate::common::*;

/// Calls of each kind the script makes once attached.
const HITS: u64 = 2000;
const GENERATORS: u64 = 200;
const RAISES: u64 = 300;
/// `a` and `b` alternate from a(DEPTH) and a(DEEP) down to 0.
const DEPTH: u64 = 40;
const DEEP: u64 = 100;

/// `hit`, `gen`, `boom` and `a` traced; `miss`, `b` and `top` not. `top`
/// (level 1 at the attachment, under the module) makes the calls.
const SCRIPT: &str = r#"
    import os, sys

    HITS, GENERATORS, RAISES, DEPTH, DEEP = {consts}

    def hit(i):
        return i

    def miss(i):
        return i

    def gen():
        yield 1
        yield 2
        yield 3

    def boom():
        raise ValueError

    def a(n):
        return b(n - 1) if n else 0

    def b(n):
        return a(n - 1) if n else 0

    def top():
        print("ready", flush=True)
        if os.read(0, 64).strip() != b"go":
            os._exit(3)
        for i in range(HITS):
            hit(i)
            miss(i)
        for i in range(GENERATORS):
            for _ in gen():
                pass
        for i in range(RAISES):
            try:
                boom()
            except ValueError:
                pass
        a(DEPTH)
        a(DEEP)
        return 0

    top()
    sys.stdout.flush()
    os._exit(0)
    "#;

#[test]
fn matched_returns_in_the_window_are_sent_unread_and_every_call_is_exact() {
    let dir = TestDir::new("retknown");
    let consts = format!("{HITS}, {GENERATORS}, {RAISES}, {DEPTH}, {DEEP}");
    let script = dir.script("retknown.py", &SCRIPT.replace("{consts}", &consts));
    let (run, attached) = traced_from_go(&dir, &script, &["hit", "gen", "boom", "a"]);
    assert!(attached.contains("CPython 3.9"), "{attached}");
    let trace = run.trace();
    let c = |name| trace.counter(name);
    let pf = trace.pftrace();
    // The thread is first seen at top's first callee; top's own return
    // comes with nothing known. a(DEPTH) opens 41 levels (21 `a` at the odd
    // ones, 20 `b`), all inside the 44-level window: 21 returns known, 20
    // skipped. a(DEEP) opens 101 levels; the window keeps the innermost 44
    // (levels 58 .. 101: 22 `a` at the odd ones, 22 `b`), the 57 outer
    // returns come with nothing known and are read.
    let a_calls = (DEPTH / 2 + 1) + (DEEP / 2 + 1);
    let known = HITS + GENERATORS * 4 + RAISES + 21 + 22;
    let skipped = HITS + 20 + 22;
    eprintln!(
        "counters: entry_seen {} return_seen {} returns_known {} returns_skipped {} return_matched {}",
        c("entry_seen"),
        c("return_seen"),
        c("returns_known"),
        c("returns_skipped"),
        c("return_matched")
    );
    assert_eq!(c("returns_known"), known, "returns sent unread: {pf}");
    assert_eq!(c("returns_skipped"), skipped, "returns dropped unread: {pf}");
    assert_eq!(c("entry_matched"), HITS + GENERATORS * 4 + RAISES + a_calls, "{pf}");
    trace.assert_clean();
    assert_eq!(trace.named("hit").len() as u64, HITS);
    assert_eq!(trace.named("gen").len() as u64, GENERATORS * 4);
    assert_eq!(trace.named("boom").len() as u64, RAISES);
    assert_eq!(trace.named("a").len() as u64, a_calls);
    assert_eq!(trace.calls.len() as u64, HITS + GENERATORS * 4 + RAISES + a_calls);
    // Each `a` but the outermost of a recursion is two levels under another `a`.
    let outer = trace.named("a").iter().filter(|c| c.depth == 0).count();
    assert_eq!(outer, 2, "{pf}");
    assert!(trace.named("a").iter().all(|c| c.line > 0 && c.file.ends_with("/retknown.py")));
}

/// Attached inside a traced call: its return comes at depth 0, is read and
/// reaches pftraced as a return without entry; the traced calls made inside
/// it and after it are sent unread and exact.
#[test]
fn attached_inside_a_traced_call_its_return_is_read_and_later_calls_are_exact() {
    const INSIDE: u64 = 300;
    const AFTER: u64 = 700;
    let dir = TestDir::new("retknown-inside");
    let script = dir.script(
        "inside.py",
        &r#"
        import os, sys

        def hit(i):
            return i

        def traced():
            print("ready", flush=True)
            if os.read(0, 64).strip() != b"go":
                os._exit(3)
            for i in range(INSIDE):
                hit(i)
            return 0

        traced()
        for i in range(AFTER):
            hit(i)
        os._exit(0)
        "#
        .replace("INSIDE", &INSIDE.to_string())
        .replace("AFTER", &AFTER.to_string()),
    );
    let (run, _) = traced_from_go(&dir, &script, &["traced", "hit"]);
    let trace = run.trace();
    let pf = trace.pftrace();
    assert_eq!(trace.counter("returns_known"), INSIDE + AFTER, "{pf}");
    assert_eq!(trace.counter("return_matched"), INSIDE + AFTER + 1, "{pf}");
    assert_eq!(trace.unmatched_returns_total(), 1, "{pf}");
    assert_eq!(trace.unmatched_returns()[0]["name"], "traced", "{pf}");
    assert_eq!(trace.named("hit").len() as u64, INSIDE + AFTER);
    assert_eq!(trace.calls.len() as u64, INSIDE + AFTER);
    assert_eq!(trace.incomplete_calls(), 0, "{pf}");
    assert_eq!((trace.counter("lost"), trace.counter("read_errors")), (0, 0), "{pf}");
}

/// A traced call whose name is removed (pftracectl) while it runs is closed
/// by its return, sent unread: the call was traced when it began, and its
/// duration is known (before, its return was dropped as untraced and the
/// call shown incomplete, open until the end of the trace). Calls of the
/// name made after the removal are not traced.
#[test]
fn a_call_whose_name_is_removed_while_it_runs_is_closed_by_its_return() {
    const HITS: u64 = 100;
    let dir = TestDir::new("retknown-removed");
    let (ready, go) = (dir.join("ready"), dir.join("go"));
    let script = dir.script(
        "removed.py",
        &r#"
        import os, time

        def hit(i):
            return i

        def slow():
            open(READY, "w").close()
            deadline = time.monotonic() + 30
            while not os.path.exists(GO) and time.monotonic() < deadline:
                time.sleep(0.01)
            return 0

        for i in range(HITS):
            hit(i)
        slow()
        slow()
        for i in range(HITS):
            hit(i)
        os._exit(0)
        "#
        .replace("READY", &format!("{:?}", ready.to_str().unwrap()))
        .replace("GO", &format!("{:?}", go.to_str().unwrap()))
        .replace("HITS", &HITS.to_string()),
    );
    let socket = dir.join("pftraced.sock");
    let tracer = Pftraced::new(&dir, &["slow", "hit"])
        .arg("--socket")
        .arg(&socket)
        .launch(&[python().as_os_str(), script.as_os_str()])
        .spawn();
    wait_for(&ready);
    ctl_checked(&socket, &["remove", "-t", "slow"]);
    std::fs::write(&go, "").unwrap();
    let run = tracer.finish();
    run.assert_code(0);
    let trace = run.trace();
    let pf = trace.pftrace();
    let slow = trace.named("slow");
    assert_eq!(slow.len(), 1, "only the first slow call was traced: {pf}");
    assert!(!slow[0].incomplete, "{:?}: {pf}", slow[0]);
    assert_eq!(trace.named("hit").len() as u64, 2 * HITS, "{pf}");
    assert_eq!(trace.incomplete_calls(), 0, "{pf}");
    assert_eq!(trace.unmatched_returns_total(), 0, "{pf}");
    assert_eq!(trace.counter("returns_known"), 2 * HITS + 1, "{pf}");
}

/// Threads: each has its own depth word, and the interpreter switches
/// between them every 0.5 ms, so the words are written in turn while each
/// thread's calls are open. `_thread.start_new_thread` and C-level locks
/// make the threads' only Python frames `work` and its callees (no
/// `threading` bootstrap frames to count): per thread `work` (entered after
/// the attachment, unmatched: its return skipped), THREAD_HITS `hit`
/// (known) and `miss` (skipped), and a(DEPTH): 21 `a` known, 20 `b` skipped.
/// The main thread's only Python frame once attached is `top`, whose return
/// comes with nothing known. Every count is exact, and per thread.
#[test]
fn threads_switching_mid_call_keep_their_own_windows_and_every_call_is_exact() {
    const THREADS: u64 = 4;
    const THREAD_HITS: u64 = 3000;
    let dir = TestDir::new("retknown-threads");
    let script = dir.script(
        "threads.py",
        &r#"
        import _thread, os, sys

        THREADS, HITS, DEPTH = CONSTS
        sys.setswitchinterval(0.0005)

        def hit(i):
            return i

        def miss(i):
            return i

        def a(n):
            return b(n - 1) if n else 0

        def b(n):
            return a(n - 1) if n else 0

        start = _thread.allocate_lock()
        start.acquire()
        done = [_thread.allocate_lock() for _ in range(THREADS)]
        # Halfway through its hits each thread waits for the others to
        # get there too, so that their loops overlap (on a fast machine
        # one thread's 3,000 hits ended before the last one's began: 2 of
        # 25 runs). Locks only: their methods fire no probes, so the
        # counts below stay exact.
        halfway = [_thread.allocate_lock() for _ in range(THREADS)]
        go_on = _thread.allocate_lock()
        go_on.acquire()

        def work(k):
            start.acquire()
            start.release()
            for i in range(HITS):
                if i == HITS // 2:
                    halfway[k].release()
                    go_on.acquire()
                    go_on.release()
                hit(i)
                miss(i)
            a(DEPTH)
            done[k].release()

        def top():
            print("ready", flush=True)
            if os.read(0, 64).strip() != b"go":
                os._exit(3)
            for k in range(THREADS):
                done[k].acquire()
                halfway[k].acquire()
                _thread.start_new_thread(work, (k,))
            start.release()
            for k in range(THREADS):
                halfway[k].acquire()
            go_on.release()
            for k in range(THREADS):
                done[k].acquire()
            return 0

        top()
        os._exit(0)
        "#
        .replace("CONSTS", &format!("{THREADS}, {THREAD_HITS}, {DEPTH}")),
    );
    let (run, _) = traced_from_go(&dir, &script, &["hit", "a"]);
    let trace = run.trace();
    let pf = trace.pftrace();
    let c = |name| trace.counter(name);
    let a_calls = DEPTH / 2 + 1;
    assert_eq!(c("returns_known"), THREADS * (THREAD_HITS + a_calls), "returns sent unread: {pf}");
    assert_eq!(c("returns_skipped"), THREADS * (THREAD_HITS + DEPTH / 2 + 1), "returns dropped unread: {pf}");
    assert_eq!(c("entry_matched"), THREADS * (THREAD_HITS + a_calls), "{pf}");
    assert_eq!(c("thread_depths_full"), 0, "{pf}");
    trace.assert_clean();
    assert_eq!(trace.calls.len() as u64, THREADS * (THREAD_HITS + a_calls), "{pf}");
    let mut tids: Vec<u32> = trace.calls.iter().map(|c| c.tid).collect();
    tids.sort_unstable();
    tids.dedup();
    assert_eq!(tids.len() as u64, THREADS, "{pf}");
    let mut spans = Vec::new();
    for tid in tids {
        let hits: Vec<_> = trace.named("hit").into_iter().filter(|c| c.tid == tid).collect();
        assert_eq!(hits.len() as u64, THREAD_HITS, "thread {tid}: {pf}");
        let a: Vec<_> = trace.named("a").into_iter().filter(|c| c.tid == tid).collect();
        assert_eq!(a.len() as u64, a_calls, "thread {tid}: {pf}");
        assert_eq!(a.iter().filter(|c| c.depth == 0).count(), 1, "thread {tid}: {pf}");
        spans.push((hits[0].ts_ns, hits[hits.len() - 1].end_ns()));
    }
    // The threads ran at the same time (each began before another ended:
    // the script's halfway wait), so their words were written in turn.
    let last_start = spans.iter().map(|s| s.0).max().unwrap();
    let first_end = spans.iter().map(|s| s.1).min().unwrap();
    assert!(last_start < first_end, "the threads ran one after another: {spans:?}");
}

fn wait_for(path: &Path) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        assert!(std::time::Instant::now() < deadline, "the script did not reach {}", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}
