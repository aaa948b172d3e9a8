//! Batch jobs as cgroups (`--jobs-under ROOT --job-pattern 'job_{id}'`):
//! a fake scheduler makes job cgroups the way Slurm does
//! (`ROOT/job_<id>/step_<n>`, Python processes in the steps, jobs
//! overlapping), and each job gets exactly one trace file with exactly its
//! calls, written when its cgroup is removed; a job cgroup made and removed
//! ten times gets ten traces; a root that does not exist at start is waited
//! for (and is an error with --cgroups-must-exist).
//!
//! Every worker makes its calls only after `pftracectl status` lists it as
//! running (its probes are attached): the counts test jobs, not the attach
//! race of a process's first calls (issue 13).

use crate::common;

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use crate::common::*;
use serde_json::Value;

/// Removes a job (or step) cgroup once its processes have exited, as a
/// scheduler does (dying tasks keep it busy for a moment).
fn remove_cgroup(path: &Path) {
    let deadline = Instant::now() + WAIT;
    while let Err(e) = fs::remove_dir(path) {
        assert!(Instant::now() < deadline, "cannot remove cgroup {}: {e}", path.display());
        thread::sleep(Duration::from_millis(10));
    }
}

/// Makes cgroup `path` (its parent exists).
fn make_cgroup(path: &Path) {
    fs::create_dir(path).unwrap_or_else(|e| panic!("creating cgroup {}: {e}", path.display()));
}

/// Waits for a job's trace file and parses it.
fn job_trace(path: &Path, tracer: &RunningTracer) -> Trace {
    assert!(!exited(tracer.pid()), "pftraced exited before writing {}", path.display());
    wait_file(path);
    let text = fs::read_to_string(path).unwrap();
    Trace::parse(&text).unwrap_or_else(|e| panic!("bad job trace {}: {e}", path.display()))
}

/// A job trace holds complete calls only, and names its job in every process's metadata.
fn assert_job_trace(trace: &Trace, id: &str, want: &BTreeMap<(u32, String), u64>) {
    assert_eq!(counts(&trace.calls), *want, "job {id}: calls per (pid, function)");
    assert_eq!(trace.incomplete_calls(), 0, "job {id}: incomplete calls");
    assert_eq!(trace.unmatched_returns_total(), 0, "job {id}: unmatched returns");
    assert_eq!(trace.counter("lost"), 0, "job {id}: records lost");
    let pids: Vec<u32> = want.keys().map(|(pid, _)| *pid).collect();
    let mut listed = trace.process_pids();
    listed.sort_unstable();
    let mut pids = pids;
    pids.dedup();
    assert_eq!(listed, pids, "job {id}: the processes in its trace");
    for p in trace.pftrace()["processes"].as_array().unwrap() {
        assert_eq!(p["job"], serde_json::json!({"variable": "cgroup", "id": id}), "job {id}: {p}");
    }
}

fn job_status<'a>(status: &'a Value, id: &str, running: bool) -> Option<&'a Value> {
    status["jobs"].as_array()?.iter().find(|j| j["id"] == id && j["running"] == running)
}

#[test]
fn slurm_like_jobs_overlapping_get_one_exact_trace_each() {
    // Beside other tests: the dormant link is on a copy of the interpreter
    // of its own (common::private_python).
    let dir = TestDir::new("jobs-slurm");
    let py = private_python(&dir);
    let script = worker_script(&dir);
    let scope = Cgroup::new("slurmstepd");
    let root = scope.path().to_path_buf();
    let out = dir.join("jobs");
    let socket = socket_of(&dir);
    let tracer =
        serving(&dir, &["foo"]).arg("--jobs-under").arg(&root).arg("--job-output-dir").arg(&out).spawn();
    wait_serving(&socket, &tracer);

    // Job 101: step_0 with two tasks, step_1 with one; job 102 starts while
    // 101 runs (step_0, one task); a Python right in the root is in no job.
    let job = |id: u32| root.join(format!("job_{id}"));
    make_cgroup(&job(101));
    let steps101 = [job(101).join("step_0"), job(101).join("step_1")];
    steps101.iter().for_each(|s| make_cgroup(s));
    let mut a = WorkerSpec::new(&py, &script).cgroup(&steps101[0]).start("job 101 step 0 task 0");
    let mut b = WorkerSpec::new(&py, &script).cgroup(&steps101[0]).start("job 101 step 0 task 1");
    make_cgroup(&job(102));
    let step102 = job(102).join("step_0");
    make_cgroup(&step102);
    let mut c = WorkerSpec::new(&py, &script).cgroup(&steps101[1]).start("job 101 step 1");
    let mut d = WorkerSpec::new(&py, &script).cgroup(&step102).start("job 102 step 0");
    let mut loose = WorkerSpec::new(&py, &script).cgroup(&root).start("in the root, no job");
    // Job 104 runs no Python: it is listed, and gets no file.
    make_cgroup(&job(104));
    for w in [&a, &b, &c, &d, &loose] {
        wait_traced(&socket, &tracer, w.pid());
    }
    for (w, n) in [(&mut a, 11), (&mut b, 22), (&mut c, 33), (&mut d, 44), (&mut loose, 55)] {
        w.call("foo", n);
        w.call("bar", 3); // not traced
    }
    let status = wait_status(&socket, tracer.pid(), "jobs 101 and 102 running with their calls", |s| {
        job_status(s, "101", true).is_some_and(|j| j["calls"] == 66)
            && job_status(s, "102", true).is_some_and(|j| j["calls"] == 44)
    });
    let j101 = job_status(&status, "101", true).unwrap();
    let mut pids101 = vec![a.pid(), b.pid(), c.pid()];
    pids101.sort_unstable();
    assert_eq!(j101["pids"], serde_json::json!(pids101), "{j101}");
    assert_eq!(j101["functions"][0]["function"], "foo", "{j101}");
    assert_eq!(j101["functions"][0]["calls"], 66, "{j101}");
    let text = ctl_ok(&socket, &["status"]);
    assert!(text.contains("job 101: running, 3 processes, 66 calls"), "pftracectl status:\n{text}");

    // Job 101 ends: its tasks exit, the scheduler removes the steps, then the job.
    for w in [&mut a, &mut b, &mut c] {
        w.finish();
    }
    steps101.iter().for_each(|s| remove_cgroup(s));
    remove_cgroup(&job(101));
    remove_cgroup(&job(104));
    let t101 = job_trace(&out.join("pftrace-job-101.json"), &tracer);
    assert_job_trace(
        &t101,
        "101",
        &expected(&[(a.pid(), "foo", 11), (b.pid(), "foo", 22), (c.pid(), "foo", 33)]),
    );

    // Job 103 starts after 101 ended, while 102 still runs; it calls more.
    make_cgroup(&job(103));
    let step103 = job(103).join("step_0");
    make_cgroup(&step103);
    let mut e = WorkerSpec::new(&py, &script).cgroup(&step103).start("job 103 step 0");
    wait_traced(&socket, &tracer, e.pid());
    e.call("foo", 66);
    d.call("foo", 6);
    for (w, step, id) in [(&mut d, &step102, 102), (&mut e, &step103, 103)] {
        w.finish();
        remove_cgroup(step);
        remove_cgroup(&job(id));
    }
    let t102 = job_trace(&out.join("pftrace-job-102.json"), &tracer);
    assert_job_trace(&t102, "102", &expected(&[(d.pid(), "foo", 50)]));
    let t103 = job_trace(&out.join("pftrace-job-103.json"), &tracer);
    assert_job_trace(&t103, "103", &expected(&[(e.pid(), "foo", 66)]));

    let status = wait_status(&socket, tracer.pid(), "three finished jobs", |s| {
        ["101", "102", "103", "104"].iter().all(|id| job_status(s, id, false).is_some())
    });
    for (id, calls) in [("101", 66), ("102", 50), ("103", 66)] {
        let j = job_status(&status, id, false).unwrap();
        assert_eq!(j["calls"], calls, "{j}");
        let want = out.join(format!("pftrace-job-{id}.json"));
        assert_eq!(j["trace"].as_str(), want.to_str(), "{j}");
    }
    let j104 = job_status(&status, "104", false).expect("job 104 is listed as finished");
    assert_eq!(
        (&j104["calls"], &j104["trace"], &j104["pids"]),
        (&serde_json::json!(0), &Value::Null, &serde_json::json!([]))
    );
    let mut files: Vec<String> =
        fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    files.sort();
    assert_eq!(files, ["pftrace-job-101.json", "pftrace-job-102.json", "pftrace-job-103.json"]);

    // The run's own trace still has every call, the root's loose process too.
    let run = stop(&socket, tracer);
    let all = run.trace();
    assert_eq!(
        counts(&all.calls),
        expected(&[
            (a.pid(), "foo", 11),
            (b.pid(), "foo", 22),
            (c.pid(), "foo", 33),
            (d.pid(), "foo", 50),
            (e.pid(), "foo", 66),
            (loose.pid(), "foo", 55)
        ])
    );
    loose.finish();
}

#[test]
fn a_job_cgroup_made_and_removed_ten_times_gets_ten_traces() {
    // Beside other tests: the dormant link is on a copy of the interpreter
    // of its own (common::private_python).
    let dir = TestDir::new("jobs-ten");
    let py = private_python(&dir);
    let script = worker_script(&dir);
    let scope = Cgroup::new("tenjobs");
    let root = scope.path().to_path_buf();
    let out = dir.join("jobs");
    let socket = socket_of(&dir);
    let tracer = serving(&dir, &["foo"])
        .args(&["--jobs-under", root.to_str().unwrap(), "--job-pattern", "batch-{id}.scope"])
        .args(&["--job-output-dir", out.to_str().unwrap()])
        .spawn();
    wait_serving(&socket, &tracer);
    let job = root.join("batch-7.scope");
    let mut pids = Vec::new();
    for round in 1..=10u64 {
        make_cgroup(&job);
        let mut w = WorkerSpec::new(&py, &script).cgroup(&job).start(&format!("round {round}"));
        wait_traced(&socket, &tracer, w.pid());
        w.call("foo", round);
        w.finish();
        remove_cgroup(&job);
        let name =
            if round == 1 { "pftrace-job-7.json".to_string() } else { format!("pftrace-job-7.{round}.json") };
        let trace = job_trace(&out.join(name), &tracer);
        assert_job_trace(&trace, "7", &expected(&[(w.pid(), "foo", round)]));
        pids.push(w.pid());
    }
    let status = common::status(&socket);
    let finished: Vec<u64> = status["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["id"] == "7" && j["running"] == false)
        .map(|j| j["calls"].as_u64().unwrap())
        .collect();
    assert_eq!(finished, (1..=10).collect::<Vec<u64>>(), "{status:#}");
    assert_eq!(fs::read_dir(&out).unwrap().count(), 10);
    stop(&socket, tracer);
}

#[test]
fn a_jobs_root_made_after_start_is_waited_for_then_traced() {
    // Beside other tests: the dormant link is on a copy of the interpreter
    // of its own (common::private_python).
    let dir = TestDir::new("jobs-later");
    let py = private_python(&dir);
    let script = worker_script(&dir);
    let mut base = Cgroup::new("later");
    let root: PathBuf = base.path().join("system.slice/slurmstepd.scope");
    let out = dir.join("jobs");

    // Strict: a clear error, nothing started.
    let strict = Pftraced::new(&dir, &["foo"])
        .args(&["--jobs-under", root.to_str().unwrap(), "--job-output-dir", out.to_str().unwrap()])
        .arg("--cgroups-must-exist")
        .arg("--socket")
        .arg(dir.join("strict.sock"))
        .run();
    strict.assert_refused(&[root.to_str().unwrap(), "No such file or directory"]);

    // Default: it says it waits, keeps serving, and traces once the root is made.
    let socket = socket_of(&dir);
    let tracer = serving(&dir, &["foo"])
        .args(&["--jobs-under", root.to_str().unwrap(), "--job-output-dir", out.to_str().unwrap()])
        .spawn();
    let line = tracer.wait_stderr("does not exist yet");
    assert!(line.contains(root.to_str().unwrap()) && line.contains("waiting"), "{line}");
    wait_serving(&socket, &tracer);
    thread::sleep(Duration::from_millis(300));
    assert!(!exited(tracer.pid()), "pftraced exited while its jobs root did not exist");

    base.child("system.slice");
    base.child("system.slice/slurmstepd.scope");
    let job = root.join("job_9");
    make_cgroup(&job);
    let mut w = WorkerSpec::new(&py, &script).cgroup(&job).start("job 9");
    wait_traced(&socket, &tracer, w.pid());
    w.call("foo", 9);
    w.finish();
    remove_cgroup(&job);
    let trace = job_trace(&out.join("pftrace-job-9.json"), &tracer);
    assert_job_trace(&trace, "9", &expected(&[(w.pid(), "foo", 9)]));
    stop(&socket, tracer);
}

#[test]
fn a_cgroup_target_made_after_start_is_waited_for_then_traced() {
    // Beside other tests: the dormant link is on a copy of the interpreter
    // of its own (common::private_python).
    let dir = TestDir::new("cgroup-later");
    let py = private_python(&dir);
    let script = worker_script(&dir);
    let mut base = Cgroup::new("cglater");
    let target = base.path().join("jobs.slice");
    let socket = socket_of(&dir);
    let tracer = serving(&dir, &["foo"]).arg("--cgroup").arg(&target).spawn();
    tracer.wait_stderr("does not exist yet");
    wait_serving(&socket, &tracer);
    base.child("jobs.slice");
    let mut w = WorkerSpec::new(&py, &script).cgroup(&target).start("in the late cgroup");
    wait_traced(&socket, &tracer, w.pid());
    w.call("foo", 21);
    let live = dump(&socket);
    assert_eq!(counts(&live.calls), expected(&[(w.pid(), "foo", 21)]));
    w.finish();
    stop(&socket, tracer);
}

/// Runs one job (two processes calling foo `n1` and `n2` times) under a
/// daemon writing jobs' traces in `format`; returns the jobs directory and the pids.
fn one_job_in_format(tag: &str, format: &str, id: &str, n1: u64, n2: u64) -> (TestDir, PathBuf, u32, u32) {
    let dir = TestDir::new(tag);
    let py = private_python(&dir);
    let script = worker_script(&dir);
    let scope = Cgroup::new(tag);
    let out = dir.join("jobs");
    let socket = socket_of(&dir);
    let tracer = serving(&dir, &["foo"])
        .args(&["--jobs-under", scope.path().to_str().unwrap(), "--job-format", format])
        .args(&["--job-output-dir", out.to_str().unwrap()])
        .spawn();
    wait_serving(&socket, &tracer);
    let job = scope.path().join(format!("job_{id}"));
    make_cgroup(&job);
    let mut a = WorkerSpec::new(&py, &script).cgroup(&job).start("task 0");
    let mut b = WorkerSpec::new(&py, &script).cgroup(&job).start("task 1");
    wait_traced(&socket, &tracer, a.pid());
    wait_traced(&socket, &tracer, b.pid());
    a.call("foo", n1);
    b.call("foo", n2);
    a.finish();
    b.finish();
    remove_cgroup(&job);
    wait_status(&socket, tracer.pid(), "the job to finish", |s| job_status(s, id, false).is_some());
    let (pa, pb) = (a.pid(), b.pid());
    stop(&socket, tracer);
    (dir, out, pa, pb)
}

/// Waits for `path` to exist (a job's trace is renamed into place whole).
fn wait_file(path: &Path) {
    let deadline = Instant::now() + WAIT;
    while !path.exists() {
        assert!(Instant::now() < deadline, "no {} after {WAIT:?}", path.display());
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn jobs_traces_in_pfw_are_a_directory_of_perfflow_files_per_job() {
    // Beside other tests: the dormant link is on a copy of the interpreter
    // of its own (common::private_python).
    let (_dir, out, a, b) = one_job_in_format("jobs-pfw", "pfw", "5", 12, 34);
    let job_dir = out.join("pftrace-job-5");
    let host = pftrace::daemon::hostname();
    for (pid, n) in [(a, 12), (b, 34)] {
        let path = job_dir.join(format!("perfflow.array.{host}.{pid}.pfw"));
        wait_file(&path);
        let text = fs::read_to_string(&path).unwrap();
        // Array form: "[" then one event per line, each followed by a comma.
        let begins = text
            .lines()
            .map(|l| l.trim().trim_start_matches('[').trim_end_matches(','))
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .filter(|ev| ev["ph"] == "B" && ev["name"] == "foo" && ev["pid"] == pid)
            .count();
        assert_eq!(begins, n, "{}:\n{text}", path.display());
    }
    assert_eq!(fs::read_dir(&job_dir).unwrap().count(), 2, "one file per process of the job");
}

#[test]
fn jobs_traces_in_records_format() {
    // Beside other tests: the dormant link is on a copy of the interpreter
    // of its own (common::private_python).
    let (_dir, out, _a, _b) = one_job_in_format("jobs-records", "records", "6", 7, 8);
    let path = out.join("pftrace-job-6.records.json");
    wait_file(&path);
    let json: Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    let foo = json["results"]["foo"].as_array().unwrap_or_else(|| panic!("no results.foo: {json:#}"));
    assert_eq!(foo.len(), 15, "{json:#}");
}

#[test]
fn bad_job_options_are_refused_saying_what_to_write() {
    let dir = TestDir::new("jobs-bad");
    let root = cgroup_root().join("pftrace-no-such-root").display().to_string();
    let out = dir.join("jobs").display().to_string();
    let cases: [(&[&str], &[&str]); 3] = [
        (
            &["--jobs-under", &root, "--job-output-dir", &out, "--job-pattern", "job_*"],
            &["--job-pattern", "has no {id}", "job_{id}"],
        ),
        (&["--jobs-under", &root], &["--job-output-dir"]),
        (
            &["--jobs-under", &root, "--job-output-dir", &out, "--job-format", "perfetto"],
            &["--job-format", "unknown trace format"],
        ),
    ];
    for (args, parts) in cases {
        Pftraced::new(&dir, &["foo"]).args(args).run().assert_refused(parts);
    }
}
