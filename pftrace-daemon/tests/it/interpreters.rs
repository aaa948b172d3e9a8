//! Debian's own CPython packages (sid's python3.13, 3.14 and 3.15, unpacked by
//! `cargo xtask setup` and run on sid's loader): pftraced traces 3.15, whose
//! function probes are back, with exact counts through its USDT probes, and
//! 3.14 and 3.13, whose probes were removed, through the in-process agent.

use std::time::Duration;

use crate::common::*;

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
/// probes): traced through the in-process agent at launch, with exact
/// counts; by --pid, 3.13 (no PEP 768) is refused with what works, the
/// process left running undisturbed (3.14 by --pid: tests/it/agent.rs).
#[test]
fn debian_3_14_and_3_13_through_the_agent() {
    require_root();
    for version in ["3.14", "3.13"] {
        let py = sid_python(version);
        let dir = TestDir::new(&format!("sid-{version}-agent"));
        let script = dir.script(
            "plain.py",
            r#"
            def leaf(i):
                return i + 1
            total = 0
            for _ in range(1000):
                total = leaf(total)
            print("total", total, flush=True)
            "#,
        );
        let run = Pftraced::new(&dir, &["leaf"]).launch(&[py.as_os_str(), script.as_os_str()]).run();
        run.assert_code(0);
        assert_eq!(run.stdout.trim(), "total 1000");
        assert!(
            run.stderr
                .contains(&format!("(CPython {version}, {}, in-process agent), tracing leaf", py.display())),
            "{}",
            run.stderr
        );
        let trace = run.trace();
        trace.assert_clean();
        assert_eq!(trace.named_in("leaf", script.to_str().unwrap()).len(), 1000, "{version}");
        assert_eq!(trace.calls.len(), 1000, "{version}: {:?}", trace.counts());
        if version != "3.13" {
            continue;
        }
        let waiting =
            dir.script("waiting.py", "import sys\nprint('ready', flush=True)\nsys.stdin.readline()\n");
        let mut process = PyProcess::spawn(&py, &waiting, &[]);
        process.expect_line("ready");
        let pid = process.pid();
        let run = Pftraced::new(&dir, &["foo"]).pid(pid).run();
        let msg = run.assert_refused(&[]);
        assert_eq!(
            msg,
            format!(
                "pid {pid} runs CPython 3.13 ({}), which pftrace traces through its in-process agent, and a \
                 running CPython 3.13 has no way to load it (PEP 768 remote execution is 3.14+): start the \
                 program under pftraced (`pftraced -t NAME -- CMD`) or with the agent on its path (`eval \
                 \"$(pftracectl env)\"` before starting it)",
                py.display()
            )
        );
        process.send_line("done");
        let (status, _) = process.wait(Duration::from_secs(30));
        assert!(status.success(), "the refused process was disturbed: {status}");
    }
}
