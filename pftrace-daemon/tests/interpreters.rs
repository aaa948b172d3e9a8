//! Debian's own CPython packages (sid's python3.13, 3.14 and 3.15, unpacked by
//! `cargo xtask setup` and run on sid's loader): pftraced traces 3.15, whose
//! function probes are back, with exact counts, and refuses 3.14 and 3.13,
//! whose probes were removed, with the message it prints today.

mod common;

use std::{path::Path, time::Duration};

use common::*;

/// What pftraced prints for a CPython 3.12-3.14 launched under it
/// (target.rs's `Unsupported` with python.rs's refusal, after pftraced's launch prefix).
fn probes_removed_at_launch(python: &Path, pid: u32, version: &str) -> String {
    format!(
        "cannot trace {python:?}; it was not run: pid {pid} runs CPython {version} ({}): CPython \
         3.12-3.14 removed the function__entry/function__return probes (python/cpython#104280). Use \
         CPython 3.6-3.10 or 3.15+ built with --with-dtrace",
        python.display()
    )
}

/// The pid a launch refusal names (`... it was not run: pid N runs ...`).
fn pid_in(msg: &str) -> u32 {
    msg.split("not run: pid ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {msg}"))
}

/// 3.15 in launch mode: `leaf` called exactly 1000 times from 10 calls of
/// `outer` gives 1000 and 10 complete calls, each leaf inside its outer,
/// with the script's file and lines, and nothing lost or unmatched.
#[test]
fn debian_3_15_launch_exact_counts() {
    require_root();
    let py = sid_python("3.15");
    let dir = TestDir::new("sid-315-launch");
    let script = dir.script(
        "plain.py",
        r#"
        import sys
        def leaf(i):
            return i + 1
        def outer(n):
            s = 0
            for _ in range(n):
                s = leaf(s)
            return s
        total = sum(outer(100) for _ in range(10))
        print("total", total, "%d.%d" % sys.version_info[:2], flush=True)
        "#,
    );
    let run = Pftraced::new(&dir, &["leaf", "outer"]).launch(&[py.as_os_str(), script.as_os_str()]).run();
    run.assert_code(0);
    assert_eq!(run.stdout.trim(), "total 1000 3.15", "the script's own output");
    let pid = run.attached_pid();
    assert!(
        run.stderr.contains(&format!("(CPython 3.15, {}), tracing leaf, outer", py.display())),
        "{}",
        run.stderr
    );
    let trace = run.trace();
    trace.assert_clean();
    let script_name = script.to_str().unwrap();
    let leaves = trace.named_in("leaf", script_name);
    let outers = trace.named_in("outer", script_name);
    assert_eq!(leaves.len(), 1000, "complete leaf calls");
    assert_eq!(outers.len(), 10, "complete outer calls");
    assert_eq!(trace.calls.len(), 1010, "no other calls: {:?}", trace.counts());
    assert!(leaves.iter().all(|c| c.line == line_of(&script, "def leaf") && !c.incomplete));
    assert!(outers.iter().all(|c| c.line == line_of(&script, "def outer") && !c.incomplete));
    for outer in &outers {
        let inside = leaves.iter().filter(|l| outer.ts_ns <= l.ts_ns && l.end_ns() <= outer.end_ns()).count();
        assert_eq!(inside, 100, "leaf calls inside {outer:?}");
    }
    assert!(trace.calls.iter().all(|c| c.pid == pid && c.tid == pid));
    assert_eq!(trace.process_names.get(&pid).map(String::as_str), Some(format!("python3.15 {pid}").as_str()));
    assert_eq!(trace.counter("entry_matched"), 1010);
}

/// 3.14 and 3.13 (Debian's builds have only the audit, gc and import
/// probes): refused at launch, the command never run; and by --pid, the
/// process left running undisturbed.
#[test]
fn debian_3_14_and_3_13_refused() {
    require_root();
    for version in ["3.14", "3.13"] {
        let py = sid_python(version);
        let dir = TestDir::new(&format!("sid-{version}-refused"));
        let marker = dir.join("ran");
        let code = format!("open({:?}, 'w').close()", marker.to_str().unwrap());
        let run = Pftraced::new(&dir, &["foo"]).launch(&[py.as_os_str(), "-c".as_ref(), code.as_ref()]).run();
        let msg = run.assert_refused(&[]);
        assert_eq!(msg, probes_removed_at_launch(&py, pid_in(&msg), version));
        assert!(!marker.exists(), "the refused command ran: {msg}");

        let waiting =
            dir.script("waiting.py", "import sys\nprint('ready', flush=True)\nsys.stdin.readline()\n");
        let mut process = PyProcess::spawn(&py, &waiting, &[]);
        process.expect_line("ready");
        let run = Pftraced::new(&dir, &["foo"]).pid(process.pid()).run();
        let msg = run.assert_refused(&[]);
        let launch_msg = probes_removed_at_launch(&py, process.pid(), version);
        let (_, want) = launch_msg.split_once("it was not run: ").unwrap();
        assert_eq!(msg, want);
        process.send_line("done");
        let (status, _) = process.wait(Duration::from_secs(30));
        assert!(status.success(), "the refused process was disturbed: {status}");
    }
}
