//! pftraced watching a cgroup: the Python processes already in it, those
//! exec'd into it later, and those in its child cgroups are traced — each
//! one's calls exactly — and nothing outside it is; two different
//! interpreter binaries in the scope are both found and attached; a
//! `--pid` target and a watched cgroup on one interpreter file, in one
//! daemon or two, are both traced (the kernel takes a file's probe sites
//! with one semaphore setting at a time: two daemons in the default mode
//! share them), and where they cannot be, the refusal says why.
//!
//! Every worker makes its calls only after `pftracectl status` lists it as
//! running (its probes are attached), so the counts are exact.

use crate::common;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
};

use crate::common::*;

#[test]
fn cgroup_scope_traces_exactly_its_processes_now_later_and_in_children() {
    // Beside other tests: the dormant link is on a copy of the interpreter
    // of its own (common::private_python).
    let dir = TestDir::new("svc-cgroup");
    let py = private_python(&dir);
    let script = worker_script(&dir);
    let mut cg = Cgroup::new("scope");
    let inner = cg.child("inner");
    let socket = socket_of(&dir);

    // Before the daemon: one worker in the cgroup, one outside it.
    let mut before = WorkerSpec::new(&py, &script).cgroup(cg.path()).start("in the cgroup, started first");
    let mut outside = WorkerSpec::new(&py, &script).start("outside the cgroup");

    let tracer = serving(&dir, &["foo"]).arg("--cgroup").arg(cg.path()).spawn();
    wait_serving(&socket, &tracer);
    wait_traced(&socket, &tracer, before.pid());

    // After it: one in the cgroup, one in a child cgroup (found at exec).
    let mut after = WorkerSpec::new(&py, &script).cgroup(cg.path()).start("in the cgroup, started later");
    wait_traced(&socket, &tracer, after.pid());
    let mut child = WorkerSpec::new(&py, &script).cgroup(&inner).start("in a child cgroup");
    let status = wait_traced(&socket, &tracer, child.pid());

    let (b, a, c, o) = (before.pid(), after.pid(), child.pid(), outside.pid());
    // Different figures per process, so a miscounted or misattributed call shows.
    for (w, n) in [(&mut before, 101), (&mut after, 202), (&mut child, 303), (&mut outside, 404)] {
        w.call("foo", n);
        w.call("bar", 11); // not traced
    }

    let want = expected(&[(b, "foo", 101), (a, "foo", 202), (c, "foo", 303)]);
    let listed: BTreeSet<u32> = status_pids(&status).into_iter().collect();
    assert_eq!(listed, BTreeSet::from([a, b, c]), "status lists exactly the three processes in scope");

    let live = dump(&socket);
    assert_eq!(counts(&live.calls), want, "pftracectl dump: calls per (pid, function)");
    live.assert_clean();
    let status = common::status(&socket);
    for (pid, n) in [(b, 101), (a, 202), (c, 303)] {
        let p = process_entry(&status, pid).unwrap();
        assert_eq!(
            (p["running"].as_bool(), p["calls"].as_u64()),
            (Some(true), Some(n)),
            "status of {pid}: {p}"
        );
    }
    assert!(process_entry(&status, o).is_none(), "the process outside the cgroup is listed:\n{status:#}");
    assert_eq!(status["calls_total"], 606, "{status:#}");
    assert_eq!(status["refused"], serde_json::json!([]), "{status:#}");
    let binaries = status["binaries"].as_array().unwrap();
    assert_eq!(binaries.len(), 1, "{status:#}");
    assert_eq!((binaries[0]["path"].as_str(), binaries[0]["processes"].as_u64()), (py.to_str(), Some(3)));

    let run = stop(&socket, tracer);
    let trace = run.trace();
    assert_eq!(counts(&trace.calls), want, "the -o trace: calls per (pid, function)");
    trace.assert_clean();
    assert_eq!(trace.process_pids().into_iter().collect::<BTreeSet<_>>(), BTreeSet::from([a, b, c]));

    for w in [&mut before, &mut after, &mut child, &mut outside] {
        w.finish();
    }
}

#[test]
fn two_interpreter_binaries_in_the_cgroup_are_both_traced() {
    // Beside other tests: the dormant link is on a copy of the interpreter
    // of its own (common::private_python).
    let dir = TestDir::new("svc-twobin");
    let py = private_python(&dir);
    let script = worker_script(&dir);
    let cg = Cgroup::new("twobin");
    let socket = socket_of(&dir);

    // Another binary (another inode) with the same probes; PYTHONHOME points
    // it at the original's standard library.
    let copy = dir.join("python3.9-copy");
    fs::copy(&py, &copy).unwrap_or_else(|e| panic!("copying {} to {}: {e}", py.display(), copy.display()));
    let home = py.parent().and_then(|bin| bin.parent()).expect("PREFIX/bin/python3.9").to_str().unwrap();

    let mut first = WorkerSpec::new(&py, &script).cgroup(cg.path()).start("the original, started first");
    let tracer = serving(&dir, &["foo"]).arg("--cgroup").arg(cg.path()).spawn();
    wait_serving(&socket, &tracer);
    wait_traced(&socket, &tracer, first.pid());
    let mut second = WorkerSpec::new(&copy, &script)
        .cgroup(cg.path())
        .env("PYTHONHOME", home)
        .start("the copy, started later");
    let status = wait_traced(&socket, &tracer, second.pid());

    let mut binaries: Vec<(String, u64)> = status["binaries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["path"].as_str().unwrap().to_string(), b["processes"].as_u64().unwrap()))
        .collect();
    binaries.sort();
    let mut want_binaries = vec![(py.display().to_string(), 1), (copy.display().to_string(), 1)];
    want_binaries.sort();
    assert_eq!(binaries, want_binaries, "status lists both binaries, one process each:\n{status:#}");
    for (w, bin) in [(&first, &py), (&second, &copy)] {
        let p = process_entry(&status, w.pid()).unwrap();
        assert_eq!(p["binary"].as_str(), bin.to_str(), "{p}");
    }

    first.call("foo", 150);
    second.call("foo", 250);
    first.call("bar", 5);
    second.call("bar", 5);
    let want = expected(&[(first.pid(), "foo", 150), (second.pid(), "foo", 250)]);
    let live = dump(&socket);
    assert_eq!(counts(&live.calls), want, "pftracectl dump: calls per (pid, function)");
    live.assert_clean();

    let run = stop(&socket, tracer);
    let trace = run.trace();
    assert_eq!(counts(&trace.calls), want, "the -o trace: calls per (pid, function)");
    trace.assert_clean();
    first.finish();
    second.finish();
}

/// Calls of `foo` per pid in a trace.
fn foo_counts(calls: &[CallEvent]) -> BTreeMap<u32, u64> {
    counts_by_pid(calls, "foo")
}

#[test]
fn a_pid_target_beside_a_watched_cgroup_on_the_same_file_is_traced_in_one_daemon() {
    // Beside other tests: the dormant link is on a copy of the interpreter
    // of its own (common::private_python).
    // Before: `--pid` took pid-scoped probes with kernel-managed semaphores,
    // the cgroup's process dormant ones without, and the kernel refused the
    // second ("ref_ctr_offset mismatch", EINVAL): the cgroup's process was
    // never traced. Now the `--pid` target joins the dormant probes.
    let dir = TestDir::new("svc-cgroup-pid");
    let py = private_python(&dir);
    let script = worker_script(&dir);
    let cg = Cgroup::new("beside-pid");
    let socket = socket_of(&dir);
    let mut named = WorkerSpec::new(&py, &script).start("named with --pid");
    let tracer = serving(&dir, &["foo"]).arg("--cgroup").arg(cg.path()).pid(named.pid()).spawn();
    wait_serving(&socket, &tracer);
    wait_traced(&socket, &tracer, named.pid());
    let mut inside = WorkerSpec::new(&py, &script).cgroup(cg.path()).start("in the cgroup, started later");
    let status = wait_traced(&socket, &tracer, inside.pid());
    assert_eq!(status["refused"], serde_json::json!([]), "{status:#}");
    named.call("foo", 123);
    inside.call("foo", 321);
    let run = stop(&socket, tracer);
    let trace = run.trace();
    assert_eq!(foo_counts(&trace.calls), BTreeMap::from([(named.pid(), 123), (inside.pid(), 321)]));
    trace.assert_clean();
    named.finish();
    inside.finish();
}

#[test]
fn two_daemons_on_one_file_share_its_dormant_probes_and_beside_pid_scoped_ones_fall_back_or_refuse_clearly() {
    // Beside other tests: the dormant link is on a copy of the interpreter
    // of its own (common::private_python).
    let (dir_x, dir_y) = (TestDir::new("svc-two-x"), TestDir::new("svc-two-y"));
    let py = private_python(&dir_x);
    let script = worker_script(&dir_x);
    let cg = Cgroup::new("two-daemons");
    let (socket_x, socket_y) = (socket_of(&dir_x), socket_of(&dir_y));

    // 1. X traces a process with `--pid` and pid-scoped probes
    //    (PFTRACE_SEMAPHORES=kernel: kernel-managed semaphores, as bpftrace
    //    and perf); Y watches a cgroup on the same file: its dormant probes
    //    are refused by the kernel, so its process gets pid-scoped ones,
    //    said in Y's log.
    let mut named = WorkerSpec::new(&py, &script).start("named with --pid");
    let x = serving(&dir_x, &["foo"]).env("PFTRACE_SEMAPHORES", "kernel").pid(named.pid()).spawn();
    x.wait_attached(named.pid());
    wait_serving(&socket_x, &x);
    let y = serving(&dir_y, &["foo"]).arg("--cgroup").arg(cg.path()).spawn();
    wait_serving(&socket_y, &y);
    let mut inside = WorkerSpec::new(&py, &script).cgroup(cg.path()).start("in the cgroup");
    let status = wait_traced(&socket_y, &y, inside.pid());
    assert_eq!(status["refused"], serde_json::json!([]), "{status:#}");
    named.call("foo", 111);
    inside.call("foo", 222);
    let run_y = stop(&socket_y, y);
    assert!(
        run_y.stderr.contains("cannot be made for every process running it")
            && run_y.stderr.contains("ref_ctr_offset mismatch")
            && run_y.stderr.contains("get pid-scoped probes"),
        "Y's log: {}",
        run_y.stderr
    );
    let run_x = stop(&socket_x, x);
    assert_eq!(foo_counts(&run_x.trace().calls), BTreeMap::from([(named.pid(), 111)]));
    assert_eq!(foo_counts(&run_y.trace().calls), BTreeMap::from([(inside.pid(), 222)]));
    run_x.trace().assert_clean();
    run_y.trace().assert_clean();

    // 2. The other way round: Y's dormant probes first; a daemon with only
    //    `--pid` and pid-scoped probes is refused by the kernel and says why
    //    and what to do, exit 1.
    let y = serving(&dir_y, &["foo"]).arg("--cgroup").arg(cg.path()).spawn();
    wait_serving(&socket_y, &y);
    wait_traced(&socket_y, &y, inside.pid());
    let dir_z = TestDir::new("svc-two-z");
    let refused = Pftraced::new(&dir_z, &["foo"]).env("PFTRACE_SEMAPHORES", "kernel").pid(named.pid()).run();
    let err = refused.assert_refused(&["ref_ctr_offset mismatch", "trace this process from the daemon"]);
    assert!(err.contains(&format!("pid {}", named.pid())), "{err}");

    // 3. In the default mode a `--pid` daemon takes a dormant link too: the
    //    two daemons share the file's sites, each counting its own process
    //    only (its own tracked set), both exact.
    let z = serving(&dir_z, &["foo"]).pid(named.pid()).spawn();
    z.wait_attached(named.pid());
    let socket_z = socket_of(&dir_z);
    wait_serving(&socket_z, &z);
    inside.call("foo", 7);
    named.call("foo", 9);
    let run_z = stop(&socket_z, z);
    let run_y = stop(&socket_y, y);
    assert_eq!(foo_counts(&run_y.trace().calls), BTreeMap::from([(inside.pid(), 7)]));
    assert_eq!(foo_counts(&run_z.trace().calls), BTreeMap::from([(named.pid(), 9)]));
    run_y.trace().assert_clean();
    run_z.trace().assert_clean();
    assert!(!run_z.stderr.contains("ref_ctr_offset"), "Z's log: {}", run_z.stderr);
    named.finish();
    inside.finish();
}
