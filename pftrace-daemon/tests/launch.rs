//! Launch mode (`pftraced -t ... -- CMD ARGS...`): probes are live before
//! the command's first line (even before the interpreter's own startup
//! code), arguments reach the command, and its exit status comes back.

mod common;

use std::os::unix::process::ExitStatusExt as _;

use common::*;

/// The script's first line calls json.loads three times; it exits with 7.
#[test]
fn first_line_calls_are_traced_and_exit_status_passes_through() {
    let dir = TestDir::new("launch");
    let script = dir.script(
        "first_line.py",
        r#"
        import json, os, sys; parsed = [json.loads("[%d]" % i) for i in range(3)]
        assert parsed == [[0], [1], [2]]
        print("pid", os.getpid(), "argv", *sys.argv[1:], flush=True)
        if sys.argv[1:] != ["--size", "10", "two words"]:
            sys.exit(99)
        sys.exit(7)
        "#,
    );
    let py = python();
    let run = Pftraced::new(&dir, &["raw_decode", "decode", "_install"])
        .launch(&[py.as_os_str(), script.as_os_str(), "--size".as_ref(), "10".as_ref(), "two words".as_ref()])
        .run();
    // The command's own exit status, not pftraced's.
    run.assert_code(7);
    let pid = run.attached_pid();
    assert_eq!(
        run.stdout.trim(),
        format!("pid {pid} argv --size 10 two words"),
        "the command's stdout (it inherits pftraced's)"
    );
    let trace = run.trace();
    trace.assert_clean();

    // Line 1: three json.loads, each one decode and one raw_decode.
    let raw = trace.named("raw_decode");
    assert_eq!(raw.len(), 3, "raw_decode calls: {raw:?}");
    assert!(raw.iter().all(|c| c.file.ends_with("/json/decoder.py")));
    assert!(raw.iter().all(|c| c.cat == "decoder"));
    assert_eq!(trace.named_in("decode", "/json/decoder.py").len(), 3);
    // Each raw_decode runs inside a json decode.
    for r in &raw {
        assert!(
            trace
                .named_in("decode", "/json/decoder.py")
                .iter()
                .any(|d| d.ts_ns <= r.ts_ns && r.dur_ns < d.dur_ns),
            "raw_decode {r:?} is not inside a decode"
        );
    }
    // CPython's own startup: importlib's _install runs once per bootstrap
    // module while the interpreter initialises, long before line 1. Seeing
    // both proves the probes were in place when the process started.
    let mut install: Vec<&str> = trace.named("_install").iter().map(|c| c.file.as_str()).collect();
    install.sort();
    assert_eq!(install, ["<frozen importlib._bootstrap>", "<frozen importlib._bootstrap_external>"]);

    assert!(trace.calls.iter().all(|c| c.pid == pid && c.tid == pid));
    assert_eq!(trace.process_pids(), [pid]);
    assert_eq!(trace.process_names.get(&pid).map(String::as_str), Some(format!("python3.9 {pid}").as_str()));
    assert_eq!(trace.names(), ["raw_decode", "decode", "_install"]);
    // The process exited cleanly, so the kernel saw as many returns as entries.
    assert_eq!(trace.counter("entry_seen"), trace.counter("return_seen"));
}

/// A command killed by a signal inside a traced call: pftraced exits with
/// 128 + signal, still writes the trace, and the open call is incomplete.
#[test]
fn killed_command_gives_128_plus_signal_and_an_incomplete_call() {
    let dir = TestDir::new("launch-kill");
    let script = dir.script(
        "killed.py",
        r#"
        import os, signal

        def work(i):
            return i * 2

        def die():
            os.kill(os.getpid(), signal.SIGKILL)

        for i in range(25):
            work(i)
        die()
        "#,
    );
    let run = Pftraced::new(&dir, &["work", "die"]).launch(&[python().as_os_str(), script.as_os_str()]).run();
    run.assert_code(128 + libc::SIGKILL);
    assert!(run.status.signal().is_none());
    let trace = run.trace();
    assert_eq!(trace.named("work").len(), 25);
    assert!(trace.named("work").iter().all(|c| !c.incomplete));
    let die = trace.named("die");
    assert_eq!(die.len(), 1);
    assert!(die[0].incomplete, "die never returned: {:?}", die[0]);
    assert_eq!(trace.incomplete_calls(), 1);
    assert_eq!(trace.counter("entry_matched"), 26);
    assert_eq!(trace.counter("return_matched"), 25);
    assert_eq!(trace.counter("lost"), 0);
    assert!(trace.unmatched_returns().is_empty());
    // The summary marks it: `die  1(1!) ...`.
    assert!(
        run.stderr.lines().any(|l| l.split_whitespace().take(2).eq(["die", "1(1!)"])),
        "summary does not mark die incomplete:\n{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("incomplete calls (no return seen; marked (N!) above): 1;"),
        "{}",
        run.stderr
    );
}

/// A command that exits 0 gives 0; one that never calls a traced name gives
/// an empty, clean trace and says so in the summary.
#[test]
fn success_with_no_matching_calls_writes_an_empty_trace() {
    let dir = TestDir::new("launch-empty");
    let script = dir.script(
        "nothing.py",
        r#"
        def other():
            pass
        for _ in range(50):
            other()
        "#,
    );
    let run =
        Pftraced::new(&dir, &["never_called_here"]).launch(&[python().as_os_str(), script.as_os_str()]).run();
    run.assert_code(0);
    let trace = run.trace();
    trace.assert_clean();
    assert!(trace.calls.is_empty());
    assert_eq!(trace.counter("entry_matched"), 0);
    assert!(trace.counter("entry_seen") >= 50);
    assert!(run.stderr.contains("(no calls of never_called_here were seen)"), "{}", run.stderr);
}
