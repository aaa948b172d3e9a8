//! Process lifecycle edge cases, as root against the real CPython:
//!
//! 1. pid reuse: a traced process killed inside a call, then a new process
//!    given the same pid (by exec into the watched cgroup, and by fork of a
//!    traced Python): the dead one's open call is closed incomplete at its
//!    death, the new one's calls are its own, complete, and traced.
//! 2. A pid that is gone by the time pftraced looks (a zombie: the pid
//!    exists, the process does not): a clear error and a non-zero exit.
//! 3. Processes that exit while being attached, hundreds of them in a
//!    watched cgroup: no refusal, no descriptor left behind, the daemon
//!    serves on and traces the next process.
//! 4. The perf-event attach path (older kernels; forced here with
//!    PFTRACE_UPROBE_ATTACH=perf) traces exactly like uprobe_multi.
//! 5. With `--binary`, children forked by a traced process are traced from
//!    their first call, made straight after `fork()`.
//! 6. A thread other than the main one execs the interpreter again: the new
//!    image's calls are traced, by `--pid`/launch and in a watched cgroup.

use std::{
    collections::BTreeMap,
    fs,
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use crate::common::*;

/// The kernel's last allocated pid in this (the initial) pid namespace.
const NS_LAST_PID: &str = "/proc/sys/kernel/ns_last_pid";

/// A script that prints `ready`, waits for a line, then calls `hold`, which
/// prints `inside` and sleeps (to be killed there).
const HOLDER: &str = r#"
    import sys, time

    def hold():
        print("inside", flush=True)
        time.sleep(600)

    print("ready", flush=True)
    sys.stdin.readline()
    hold()
"#;

/// Prints `ready`, waits for a line, calls `hold` 3 times (quickly), prints `done`.
const CALLER: &str = r#"
    import sys

    def hold():
        pass

    print("ready", flush=True)
    sys.stdin.readline()
    for _ in range(3):
        hold()
    print("done", flush=True)
"#;

/// Prints `ready`; for each line `PID`, forks a child with that pid (setting
/// ns_last_pid first; the child waits 0.5 s, far longer than pftraced takes
/// to attach to a forked process, calls `hold` 3 times and exits) and prints
/// `child PID_IT_GOT`.
const FORKER: &str = r#"
    import os, sys, time

    def hold():
        pass

    print("ready", flush=True)
    for line in sys.stdin:
        want = int(line)
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(want - 1))
        pid = os.fork()
        if pid == 0:
            if os.getpid() == want:
                time.sleep(0.5)
                for _ in range(3):
                    hold()
            os._exit(0)
        os.waitpid(pid, 0)
        print("child %d" % pid, flush=True)
"#;

/// Kills a traced holder inside `hold` and returns (its pid, wall µs just
/// before the kill, wall µs after it was reaped).
fn kill_inside_hold(holder: &mut Worker) -> (u32, f64, f64) {
    holder.send("go");
    holder.expect("inside");
    thread::sleep(Duration::from_millis(200));
    let pid = holder.pid();
    let before = wall_us_now();
    kill(pid, libc::SIGKILL);
    while !exited(pid) {
        thread::sleep(Duration::from_millis(5));
    }
    (pid, before, wall_us_now())
}

#[test]
fn reused_pids_never_inherit_a_dead_process_s_open_call() {
    require_root();
    let _serial = serial();
    assert!(
        fs::metadata(NS_LAST_PID).is_ok(),
        "prerequisite missing: {NS_LAST_PID} (needed to force pid reuse)"
    );
    let dir = TestDir::new("lifecycle-reuse");
    let py = python();
    let holder = dir.script("holder.py", HOLDER);
    let caller = dir.script("caller.py", CALLER);
    let forker = dir.script("forker.py", FORKER);
    let cg = Cgroup::new("reuse");
    let socket = socket_of(&dir);
    let tracer = serving(&dir, &["hold"]).arg("--cgroup").arg(cg.path()).spawn();
    wait_serving(&socket, &tracer);

    // Round 1: the pid comes back by exec into the cgroup.
    let mut a = WorkerSpec::new(&py, &holder).cgroup(cg.path()).start("holder 1");
    wait_traced(&socket, &tracer, a.pid());
    let (x1, killed1, reaped1) = kill_inside_hold(&mut a);
    drop(a);
    let mut tries = 0;
    let mut b = loop {
        tries += 1;
        fs::write(NS_LAST_PID, (x1 - 1).to_string()).unwrap();
        let w = WorkerSpec::new(&py, &caller).cgroup(cg.path()).start("caller reusing the pid");
        if w.pid() == x1 {
            break w;
        }
        // Another process took the pid first: try again.
        assert!(tries < 50, "could not get pid {x1} back in 50 tries");
    };
    let status = wait_traced(&socket, &tracer, x1);
    assert_eq!(process_entry(&status, x1).unwrap()["running"], true);
    b.send("go");
    b.expect("done");
    b.finish();

    // Round 2: the pid comes back by fork of a traced Python.
    let mut forker = WorkerSpec::new(&py, &forker).cgroup(cg.path()).start("forker");
    wait_traced(&socket, &tracer, forker.pid());
    let mut a = WorkerSpec::new(&py, &holder).cgroup(cg.path()).start("holder 2");
    wait_traced(&socket, &tracer, a.pid());
    let (x2, killed2, reaped2) = kill_inside_hold(&mut a);
    drop(a);
    let mut tries = 0;
    loop {
        tries += 1;
        forker.send(&x2.to_string());
        let got: u32 = forker.expect("child").parse().unwrap();
        if got == x2 {
            break;
        }
        assert!(tries < 50, "could not get pid {x2} back by fork in 50 tries");
    }
    // The forked child made its calls before exiting; wait until they are in.
    let deadline = Instant::now() + WAIT;
    let trace = loop {
        let trace = dump(&socket);
        if trace.named("hold").iter().filter(|c| c.pid == x2).count() >= 4 || Instant::now() > deadline {
            break trace;
        }
        thread::sleep(Duration::from_millis(50));
    };

    for (x, killed, reaped, how) in [(x1, killed1, reaped1, "exec"), (x2, killed2, reaped2, "fork")] {
        let mut calls: Vec<_> = trace.named("hold").into_iter().filter(|c| c.pid == x).collect();
        calls.sort_by_key(|c| c.ts_ns);
        let summary: Vec<_> = calls.iter().map(|c| (c.ts_ns, c.dur_ns, c.incomplete)).collect();
        assert_eq!(calls.len(), 4, "pid {x} (reused by {how}): {summary:?}");
        let dead = calls[0];
        assert!(dead.incomplete, "the killed process's call is not marked incomplete: {summary:?}");
        let end_us = (dead.ts_ns + dead.dur_ns) as f64 / 1000.0;
        assert!(
            end_us >= killed - 1.0 && end_us <= reaped + 50_000.0,
            "pid {x} ({how}): the dead call ends at {end_us} µs, the kill was at {killed}..{reaped} µs"
        );
        assert!(dead.dur >= 200_000.0, "the dead call lasted {} µs", dead.dur);
        for c in &calls[1..] {
            assert!(!c.incomplete, "pid {x} ({how}): the new process's call is incomplete: {summary:?}");
            assert!(c.ts_ns >= dead.ts_ns + dead.dur_ns, "pid {x} ({how}): overlapping calls {summary:?}");
            assert!(c.dur < 100_000.0, "pid {x} ({how}): a call of the new process spans {} µs", c.dur);
        }
        eprintln!(
            "MEASURED pid {x} reused by {how} after {:.1} ms: dead call closed {:.1} ms after the kill",
            (calls[1].ts_ns as f64 / 1000.0 - reaped) / 1000.0,
            (end_us - killed) / 1000.0
        );
    }
    assert!(trace.unmatched_returns().is_empty(), "{:?}", trace.unmatched_returns());
    forker.finish();
    stop(&socket, tracer);
}

#[test]
fn a_pid_that_is_gone_when_pftraced_looks_is_refused_clearly() {
    require_root();
    let _serial = serial();
    let dir = TestDir::new("lifecycle-zombie");
    let py = python();
    // A parent that never reaps its exited child: the child's pid exists
    // (a zombie) but the process is gone.
    let parent = dir.script(
        "parent.py",
        r#"
        import os, sys, time

        pid = os.fork()
        if pid == 0:
            os._exit(0)
        print("ready", flush=True)
        print(pid, flush=True)
        sys.stdin.readline()
        "#,
    );
    let mut w = WorkerSpec::new(&py, &parent).start("zombie's parent");
    let zombie: u32 = w.line().parse().unwrap();
    let deadline = Instant::now() + WAIT;
    while !fs::read_to_string(format!("/proc/{zombie}/stat")).is_ok_and(|s| s.contains(") Z ")) {
        assert!(Instant::now() < deadline, "pid {zombie} did not become a zombie");
        thread::sleep(Duration::from_millis(10));
    }
    let run = Pftraced::new(&dir, &["foo"]).pid(zombie).run();
    run.assert_code(1);
    assert_eq!(
        run.stderr.lines().last().unwrap_or_default(),
        format!(
            "pftraced: error: pid {zombie} has exited (it is a zombie, not yet reaped by its parent); \
             nothing to trace"
        ),
        "{}",
        run.stderr
    );
    w.finish();
}

#[test]
fn processes_exiting_while_being_attached_leave_nothing_behind() {
    require_root();
    let _serial = serial();
    const PROCS: usize = 300;
    let dir = TestDir::new("lifecycle-attach-exit");
    let py = python();
    let cg = Cgroup::new("attach-exit");
    let socket = socket_of(&dir);
    let tracer = serving(&dir, &["foo"]).arg("--cgroup").arg(cg.path()).spawn();
    wait_serving(&socket, &tracer);
    let fd_count = || fs::read_dir(format!("/proc/{}/fd", tracer.pid())).unwrap().count();
    // Once no process runs: the descriptors the daemon holds, counted when
    // no control connection is open (the status request's own closes a
    // little after its reply).
    let idle = |what| {
        let st = wait_status(&socket, tracer.pid(), what, |st| {
            st["processes"].as_array().unwrap().iter().all(|p| p["running"] == false)
        });
        wait_connections_closed(&socket);
        st
    };
    // The interpreter file's dormant probes (made at its first process,
    // then kept for the daemon's life: daemon/dormant.rs) exist before the count.
    let mut first = WorkerSpec::new(&py, &worker_script(&dir)).cgroup(cg.path()).start("first");
    wait_traced(&socket, &tracer, first.pid());
    first.finish();
    idle("no process running before");
    let fds_before = fd_count();

    // Pythons killed 0-12 ms after their exec: about when pftraced sees
    // them, inspects them, attaches (a few ms here), or has just attached.
    let mut died_in_flight = 0;
    for i in 0..PROCS {
        let mut child = in_cgroup(cg.path(), &py, ["-c", "import time; time.sleep(5)"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        thread::sleep(Duration::from_micros((i as u64 * 40) % 12_000));
        child.kill().unwrap();
        child.wait().unwrap();
        died_in_flight += 1;
    }
    // Every exit seen; then the links of the processes attached before they
    // died are closed in the background, 8 at a time (about 40 ms each
    // here, longer under load): wait for that, up to WAIT. A descriptor
    // left behind stays, and fails below.
    let st = idle("every process seen exiting");
    let deadline = Instant::now() + WAIT;
    let mut fds_after = fd_count();
    while fds_after != fds_before && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
        fds_after = fd_count();
    }
    let refused = st["refused"].as_array().unwrap();
    assert!(refused.is_empty(), "processes that exited were refused: {refused:?}");
    assert_eq!(fds_after, fds_before, "descriptors left behind after {PROCS} processes: {st}");
    let traced = st["processes"].as_array().unwrap().len();
    eprintln!(
        "MEASURED {died_in_flight} Pythons killed 0-12 ms after exec: {traced} were attached before they \
         died, the rest were gone first; no refusal, descriptors {fds_before} -> {fds_after}"
    );

    // The daemon still traces the next process, exactly.
    let script = worker_script(&dir);
    let mut w = WorkerSpec::new(&py, &script).cgroup(cg.path()).start("after the churn");
    wait_traced(&socket, &tracer, w.pid());
    w.call("foo", 7);
    let pid = w.pid();
    w.finish();
    let trace = dump(&socket);
    assert_eq!(trace.named("foo").iter().filter(|c| c.pid == pid).count(), 7);
    stop(&socket, tracer);
}

#[test]
fn perf_event_attachment_traces_like_uprobe_multi() {
    require_root();
    // Beside other tests: its links (dormant, --binary) are on a copy of the
    // interpreter of its own (common::private_python).
    let dir = TestDir::new("lifecycle-perf");
    let py = private_python(&dir);
    let script = worker_script(&dir);
    let cg = Cgroup::new("perf");
    let socket = socket_of(&dir);
    let tracer =
        serving(&dir, &["foo"]).arg("--cgroup").arg(cg.path()).env("PFTRACE_UPROBE_ATTACH", "perf").spawn();
    wait_serving(&socket, &tracer);
    let mut w = WorkerSpec::new(&py, &script).cgroup(cg.path()).start("worker");
    wait_traced(&socket, &tracer, w.pid());
    let perf_events = fs::read_dir(format!("/proc/{}/fd", tracer.pid()))
        .unwrap()
        .flatten()
        .filter(|e| fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy() == "anon_inode:[perf_event]"))
        .count();
    assert_eq!(perf_events, 2, "expected one uprobe perf event per probe site");
    w.call("foo", 5);
    w.call("bar", 2);
    let pid = w.pid();
    w.finish();
    let trace = dump(&socket);
    assert_eq!(trace.named("foo").iter().filter(|c| c.pid == pid).count(), 5);
    assert!(trace.named("bar").is_empty());
    let run = stop(&socket, tracer);
    assert!(
        run.stderr.contains("attaching through uprobe perf events (PFTRACE_UPROBE_ATTACH=perf)"),
        "{}",
        run.stderr
    );
}

/// With `--binary`, a child forked by a traced process is traced from its
/// first call, made straight after `fork()` (before pftraced could have
/// attached anything to it), and so are its own children.
#[test]
fn binary_flag_traces_forked_children_from_their_first_call() {
    require_root();
    // Beside other tests: its links (dormant, --binary) are on a copy of the
    // interpreter of its own (common::private_python).
    let dir = TestDir::new("lifecycle-binary-fork");
    let py = private_python(&dir);
    let script = dir.script(
        "forks.py",
        r#"
        import os

        def foo():
            pass

        def spawn(depth):
            pid = os.fork()
            if pid == 0:
                for _ in range(5):
                    foo()
                if depth:
                    spawn(depth - 1)
                os._exit(0)
            os.waitpid(pid, 0)
            return pid

        child = spawn(1)
        foo()
        foo()
        print(child, flush=True)
        "#,
    );
    let run = Pftraced::new(&dir, &["foo"]).arg("--binary").arg(&py).launch(&[&py, &script]).run();
    run.assert_code(0);
    let trace = run.trace();
    let counts = counts_by_pid(&trace.calls, "foo");
    let child: u32 = run.stdout.trim().parse().unwrap_or_else(|_| panic!("stdout: {:?}", run.stdout));
    assert_eq!(counts.len(), 3, "calls by pid: {counts:?}");
    assert_eq!(counts.get(&child), Some(&5), "calls by pid: {counts:?}");
    assert_eq!(counts.values().sum::<u64>(), 12, "calls by pid: {counts:?}");
    assert!(trace.calls.iter().all(|c| !c.incomplete));
}

#[test]
fn an_exec_from_a_thread_other_than_the_main_one_is_traced_after_it() {
    // Beside other tests: the dormant link is on a copy of the interpreter
    // of its own (common::private_python).
    // Before: a pid-scoped uprobe_multi link follows the task it was made
    // for, the old main thread, gone at such an exec: 0 of the new image's
    // 10 calls were seen. In a watched cgroup the link is host-wide.
    let dir = TestDir::new("exec-thread");
    let script = dir.script("exec.py", EXEC_FROM_A_THREAD);
    let check = |trace: &Trace, main: u32, how: &str| {
        trace.assert_clean();
        let mut per_thread: BTreeMap<u32, u64> = BTreeMap::new();
        for c in trace.named("work") {
            assert_eq!(c.pid, main, "{how}: a call of another process: {c:?}");
            *per_thread.entry(c.tid).or_default() += 1;
        }
        // The main thread's 10, then its tid's 10 in the new image; the worker's 10.
        assert_eq!(per_thread.get(&main), Some(&20), "{how}: {per_thread:?}");
        assert_eq!(per_thread.values().sum::<u64>(), 30, "{how}: {per_thread:?}");
    };
    let run = Pftraced::new(&dir, &["work"])
        .launch(&[private_python(&dir).as_os_str(), script.as_os_str(), std::ffi::OsStr::new("before")])
        .run();
    run.assert_code(0);
    let line = run.stdout.lines().find_map(|l| l.strip_prefix("after ")).expect("the exec'd image's line");
    let (pid, tid) = line.split_once(' ').expect("pid tid");
    assert_eq!(pid, tid.trim(), "after the exec the thread is the main thread");
    check(&run.trace(), pid.parse().unwrap(), "launched");

    // In a watched cgroup (dormant probes: the process must stay tracked
    // and its new image's semaphores be raised).
    let dir = TestDir::new("exec-thread-cg");
    let script = dir.script("exec.py", EXEC_FROM_A_THREAD);
    let cg = Cgroup::new("exec-thread");
    let socket = socket_of(&dir);
    let tracer = serving(&dir, &["work"]).arg("--cgroup").arg(cg.path()).spawn();
    wait_serving(&socket, &tracer);
    let mut p = Guard::spawn(
        &mut in_cgroup(cg.path(), private_python(&dir), [script.as_os_str(), "before".as_ref()]),
        false,
    );
    let pid = p.pid();
    assert!(p.wait(Duration::from_secs(30), "the exec'ing Python").success());
    let run = stop(&socket, tracer);
    check(&run.trace(), pid, "watched cgroup");
}
