//! The default mode of a watched cgroup, race-free: every call of the first
//! Python started after pftraced (calling the traced function from its first
//! line) is traced, 20 daemons in a row; a batch of short Pythons each
//! complete; an untraced neighbour running the same interpreter file keeps
//! its semaphores at 0 and its untraced speed; and a SIGKILLed daemon leaves
//! the traced process running with what the README says raised.

mod common;

use std::{
    fs,
    os::unix::fs::FileExt as _,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use common::*;

/// Calls of `foo` each short Python makes, from its first line.
const CALLS: u64 = 200;

/// A script calling `foo` from its first line, every 0.1 ms (~40 ms in all).
const SHORT: &str = "\
import time
def foo():
    pass
for _ in range(200):
    foo()
    time.sleep(0.0001)
";

/// Starts `py script` inside cgroup `cg` (the shell moves itself there, then execs).
fn start_in(cg: &Path, py: &Path, script: &Path) -> Guard {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c").arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#).arg(cg).arg(py).arg(script);
    Guard::spawn(&mut cmd, false)
}

#[test]
fn first_process_after_the_daemon_starts_has_every_call_20_runs() {
    let dir = TestDir::new("rf-first");
    let py = python();
    let script = dir.script("short.py", SHORT);
    let socket = socket_of(&dir);
    let mut seen = Vec::new();
    for _ in 0..20 {
        let cg = Cgroup::new("rf-first");
        let tracer = serving(&dir, &["foo"]).arg("--cgroup").arg(cg.path()).spawn();
        wait_serving(&socket, &tracer);
        let mut p = start_in(cg.path(), &py, &script);
        let pid = p.pid();
        assert!(p.wait(Duration::from_secs(30), "the short Python").success());
        let run = stop(&socket, tracer);
        let n = counts_by_pid(&run.trace().calls, "foo").get(&pid).copied().unwrap_or(0);
        seen.push(n);
    }
    eprintln!("foo calls traced per first process: {seen:?}");
    assert_eq!(seen, vec![CALLS; 20], "every call of the first process, 20 runs");
}

#[test]
fn a_batch_of_short_pythons_each_has_every_call() {
    const BATCH: usize = 100;
    let dir = TestDir::new("rf-batch");
    let py = python();
    let script = dir.script("short.py", SHORT);
    let socket = socket_of(&dir);
    let cg = Cgroup::new("rf-batch");
    let tracer = serving(&dir, &["foo"]).arg("--cgroup").arg(cg.path()).spawn();
    wait_serving(&socket, &tracer);
    let mut pids = Vec::new();
    // Two at a time (2 cores), each from its first line.
    for _ in 0..BATCH / 2 {
        let mut a = start_in(cg.path(), &py, &script);
        let mut b = start_in(cg.path(), &py, &script);
        pids.extend([a.pid(), b.pid()]);
        assert!(a.wait(Duration::from_secs(30), "a short Python").success());
        assert!(b.wait(Duration::from_secs(30), "a short Python").success());
    }
    let run = stop(&socket, tracer);
    let by_pid = counts_by_pid(&run.trace().calls, "foo");
    let got: Vec<u64> = pids.iter().map(|p| by_pid.get(p).copied().unwrap_or(0)).collect();
    let short: Vec<_> = got.iter().filter(|&&n| n != CALLS).collect();
    eprintln!("{} of {BATCH} short Pythons incomplete: {short:?}", short.len());
    assert_eq!(got, vec![CALLS; BATCH], "every call of each of {BATCH} short Pythons");
}
