//! Stack switching the probes do not see: greenlet (what gevent and
//! eventlet run on) switches between Python stacks on one thread without
//! firing a return or an entry, on the real CPython 3.9 built --with-dtrace
//! and greenlet 3.2.5 (`cargo xtask setup` installs it). The kernel's
//! window of a thread's innermost calls (pftrace-ebpf/src/depth.rs) decides
//! a return without reading it only when the return's name address is the
//! one its innermost known level holds; before that check, a traced call
//! that switched to a greenlet running untraced code had its return dropped
//! as that code's (every call incomplete, every untraced return counted as
//! a return without an entry). Counts are checked against a
//! `sys.setprofile` recorder in the same process: CPython's own view.

use std::path::PathBuf;

use crate::common::*;

/// `$PFTRACE_GREENLET_PATH` (set by `cargo xtask test`), else setup's
/// default: a directory giving the probe-enabled 3.9 `import greenlet`.
fn greenlet_path() -> PathBuf {
    let p = std::env::var_os("PFTRACE_GREENLET_PATH")
        .filter(|p| !p.is_empty())
        .map_or_else(|| PathBuf::from("/var/cache/pftrace/greenlet-cp39"), PathBuf::from);
    assert!(
        p.join("greenlet").is_dir(),
        "prerequisite missing: greenlet for CPython 3.9 at {}: run `cargo xtask setup` (as root), or set \
         PFTRACE_GREENLET_PATH",
        p.display()
    );
    p
}

/// The recorder's counts, printed by the script as `profile CALLS RETURNS`.
fn profiled(stdout: &str) -> (u64, u64) {
    let line = stdout.lines().find_map(|l| l.strip_prefix("profile ")).unwrap_or_else(|| panic!("{stdout}"));
    let mut n = line.split_whitespace().map(|v| v.parse::<u64>().unwrap());
    (n.next().unwrap(), n.next().unwrap())
}

/// The recorder counts the profile events of code named `traced`/`work`.
const RECORDER: &str = r#"
    import greenlet, sys
    N = int(sys.argv[1])
    seen = {"call": 0, "return": 0}

    def prof(frame, event, arg):
        if event in seen and frame.f_code.co_name in ("traced", "work"):
            seen[event] += 1
    "#;

fn run(tag: &str, body: &str, names: &[&str], calls: u64) -> (TracedRun, Trace) {
    let dir = TestDir::new(tag);
    let source = format!(
        "{}\n{}\n    sys.setprofile(None)\n    print('profile', seen['call'], seen['return'], flush=True)\n",
        RECORDER,
        body.trim_end()
    );
    let script = dir.script("greenlets.py", &source);
    let run = Pftraced::new(&dir, names)
        .env("PYTHONPATH", greenlet_path())
        .launch(&[python().as_os_str(), script.as_os_str(), calls.to_string().as_ref()])
        .run();
    run.assert_code(0);
    let trace = run.trace();
    (run, trace)
}

/// A traced call switches, mid-call, to a greenlet running an untraced one,
/// which switches back: the thread's last entry is then never the one the
/// next return closes. Every call is traced and complete, as CPython's
/// recorder counts them; before the name check, 100 of 100 were incomplete
/// and 100 untraced returns were shown as returns without an entry.
#[test]
fn a_traced_call_switching_to_untraced_code_is_complete() {
    const N: u64 = 100;
    let (run, trace) = run(
        "greenlet-untraced",
        r#"
    def inner(i):
        return i

    def traced(other, i):
        inner(i)
        other.switch()
        return i

    def untraced(other, i):
        other.switch()
        return i

    def loop_a():
        for i in range(N):
            traced(gb, i)

    def loop_b():
        for i in range(N):
            untraced(ga, i)

    ga = greenlet.greenlet(loop_a)
    gb = greenlet.greenlet(loop_b)
    sys.setprofile(prof)
    ga.switch()
    gb.switch()
    "#,
        &["traced"],
        N,
    );
    let pf = trace.pftrace();
    assert_eq!(profiled(&run.stdout), (N, N), "{}", run.stdout);
    trace.assert_clean();
    assert_eq!(trace.named("traced").len() as u64, N, "{pf}");
    assert_eq!(trace.incomplete_calls(), 0, "{pf}");
    assert_eq!(trace.unmatched_returns_total(), 0, "{pf}");
    assert_eq!((trace.counter("entry_matched"), trace.counter("return_matched")), (N, N), "{pf}");
    // Each switch back lands on a return of the other greenlet's function:
    // `traced` closing a level `untraced` opened (N times), `untraced`
    // closing one `traced` opened (N - 1 times: its last return comes after
    // loop_a returned and gb was switched to from the module, with nothing
    // known since loop_a's own unknown return). Each is read.
    assert_eq!(trace.counter("window_mismatches"), 2 * N - 1, "{pf}");
    // The calls that did not switch were still decided unread: `inner`'s
    // returns, N of them, were dropped.
    assert!(trace.counter("returns_skipped") >= N, "{pf}");
}

/// One traced function running in two greenlets of a thread at once, each
/// call switching to the other greenlet mid-call: both greenlets' calls are
/// all traced and complete, as CPython's recorder counts them. Their ends
/// pair innermost-first by name, as CPython's own profilers (cProfile) pair
/// them on one thread: which call's return closes which entry across
/// greenlets is not known (README "Known limits").
#[test]
fn one_traced_function_in_two_greenlets_at_once_is_counted_exactly() {
    const N: u64 = 100;
    let (run, trace) = run(
        "greenlet-both",
        r#"
    def work(other, i):
        other.switch()
        return i

    def loop(peer):
        def run():
            for i in range(N):
                work(peer(), i)
        return run

    ga = greenlet.greenlet(loop(lambda: gb))
    gb = greenlet.greenlet(loop(lambda: ga))
    sys.setprofile(prof)
    ga.switch()
    gb.switch()
    "#,
        &["work"],
        N,
    );
    let pf = trace.pftrace();
    assert_eq!(profiled(&run.stdout), (2 * N, 2 * N), "{}", run.stdout);
    trace.assert_clean();
    assert_eq!(trace.named("work").len() as u64, 2 * N, "{pf}");
    assert_eq!(trace.incomplete_calls(), 0, "{pf}");
    assert_eq!(trace.unmatched_returns_total(), 0, "{pf}");
    // Each return closes a level that `work` opened: decided unread.
    assert_eq!(trace.counter("returns_known"), 2 * N, "{pf}");
    assert_eq!(trace.counter("window_mismatches"), 0, "{pf}");
}
