//! Launch mode (`pftraced -t ... -- CMD ARGS...`): probes are live before
//! the command's first line (even before the interpreter's own startup
//! code), arguments reach the command, and its exit status comes back; its
//! trace file has every call, however many more than `limits.max_calls_in_memory`.

use std::{collections::BTreeMap, fs, os::unix::process::ExitStatusExt as _, path::Path};

use crate::common::*;
use serde_json::Value;

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
        import time; time.sleep(0.3)  # alive while pftraced resolves raw_decode's module
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
    assert!(raw.iter().all(|c| c.cat == "json.decoder" && c.qualname == "JSONDecoder.raw_decode"));
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
    // The summary marks it, qualified although the process is gone (pftraced
    // held its root and cwd from the attach): `__main__.die  1(1!) ...`.
    assert!(
        run.stderr.lines().any(|l| l.split_whitespace().take(2).eq(["__main__.die", "1(1!)"])),
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

/// 2,000 calls of `mid`, each calling `leaf` 9 times: 20,000 calls, counted
/// by a sys.setprofile recorder in the same process (printed `mid N leaf M`).
const MANY: &str = r#"
    import collections, sys

    counts = collections.Counter()

    def record(frame, event, arg):
        if event == "call" and frame.f_code.co_name in ("leaf", "mid"):
            counts[frame.f_code.co_name] += 1

    def leaf(i):
        return i

    def mid(n):
        total = 0
        for i in range(n):
            total += leaf(i)
        return total

    sys.setprofile(record)
    for _ in range(2000):
        mid(9)
    sys.setprofile(None)
    print("mid", counts["mid"], "leaf", counts["leaf"], flush=True)
"#;

/// Names in `dir` (and its subdirectories) left by pftraced besides its output:
/// the spill of calls and temporary files.
fn leftovers(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        if entry.file_type().unwrap().is_dir() {
            found.extend(leftovers(&entry.path()));
        } else if name.ends_with(".calls.bin") || name.starts_with(".pftrace-") {
            found.push(name);
        }
    }
    found
}

/// With `--max-calls-in-memory 1000`, a run of 20,000 calls still gets all
/// of them in its trace file, in each format, matching CPython's own count.
#[test]
fn every_call_of_a_run_beyond_the_memory_limit_is_in_each_format() {
    for format in ["chrome", "records", "pfw"] {
        let dir = TestDir::new(&format!("launch-many-{format}"));
        let script = dir.script("many.py", MANY);
        let run = Pftraced::new(&dir, &["leaf", "mid"])
            .arg("--max-calls-in-memory")
            .arg("1000")
            .arg("--format")
            .arg(format)
            .launch(&[python().as_os_str(), script.as_os_str()])
            .run();
        run.assert_code(0);
        let truth: Vec<usize> = run.stdout.split_whitespace().filter_map(|w| w.parse().ok()).collect();
        assert_eq!(truth, [2000, 18_000], "the recorder's counts: {}", run.stdout);
        let want = BTreeMap::from([("leaf", 18_000), ("mid", 2000)]);
        let pid = run.attached_pid();
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        match format {
            "chrome" => {
                let trace = run.trace();
                trace.assert_clean();
                assert_eq!(trace.counts(), want);
                assert!(trace.calls.windows(2).all(|w| w[0].ts <= w[1].ts), "calls are in start order");
                assert_eq!(trace.pftrace()["calls_total"], 20_000);
                assert_eq!(trace.pftrace()["calls_evicted"], 19_000, "memory held 1000 calls");
            }
            "records" => {
                let doc: Value = serde_json::from_str(&fs::read_to_string(&run.output).unwrap()).unwrap();
                for name in ["leaf", "mid"] {
                    let calls = doc["results"][name].as_array().unwrap();
                    counts.insert(name, calls.len());
                    let starts: Vec<f64> = calls.iter().map(|c| c["time_start"].as_f64().unwrap()).collect();
                    assert!(starts.windows(2).all(|w| w[0] <= w[1]), "{name}: calls in start order");
                    assert!(calls.iter().all(|c| c["pid"] == pid && c.get("incomplete").is_none()));
                }
                assert_eq!(counts, want);
                let wrote = format!("pftraced: wrote 20000 calls to {}", run.output.display());
                assert!(run.stderr.lines().any(|l| l == wrote), "{}", run.stderr);
            }
            _ => {
                let file = run.output.join(format!("perfflow.array.{}.{pid}.pfw", hostname()));
                let text = fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
                let events: Vec<Value> = text
                    .lines()
                    .skip(1)
                    .map(|l| serde_json::from_str(l.strip_suffix(',').expect("a trailing comma")).unwrap())
                    .collect();
                let ph = |p: &str| events.iter().filter(|e| e["ph"] == p).count();
                assert_eq!((ph("B"), ph("E"), ph("C")), (20_000, 20_000, 40_000));
                for e in events.iter().filter(|e| e["ph"] == "B") {
                    *counts.entry(if e["name"] == "leaf" { "leaf" } else { "mid" }).or_default() += 1;
                }
                assert_eq!(counts, want);
                // In writing order every E closes the innermost open B (one thread).
                let mut open = Vec::new();
                for e in events.iter().filter(|e| e["ph"] != "C") {
                    match e["ph"].as_str() {
                        Some("B") => open.push(e["name"].clone()),
                        _ => assert_eq!(open.pop().as_ref(), Some(&e["name"]), "{e}"),
                    }
                }
                assert!(open.is_empty());
                let wrote = format!("pftraced: wrote 20000 calls to {}", file.display());
                assert!(run.stderr.lines().any(|l| l == wrote), "{}", run.stderr);
            }
        }
        assert_eq!(leftovers(dir.path()), Vec::<String>::new(), "files left beside the trace");
    }
}

fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname").trim().to_string()
}
