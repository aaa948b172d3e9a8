//! The default mode of a watched cgroup, race-free: every call of the first
//! Python started after pftraced (calling the traced function from its first
//! line) is traced, 20 daemons in a row; a batch of short Pythons each
//! complete; an untraced neighbour running the same interpreter file keeps
//! its semaphores at 0 and its untraced speed; and a SIGKILLed daemon leaves
//! the traced process running with what the README says raised.

use std::{
    fs,
    os::unix::fs::FileExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::common::*;

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

/// Starts `py script` inside cgroup `cg` from its first instruction.
fn start_in(cg: &Path, py: &Path, script: &Path) -> Guard {
    Guard::spawn(&mut in_cgroup(cg, py, [script]), false)
}

#[test]
fn first_process_after_the_daemon_starts_has_every_call_20_runs() {
    require_root();
    // One at a time: they time calls and count every process of a file.
    let _serial = serial();
    let dir = TestDir::new("rf-first");
    let py = python();
    let script = dir.script("short.py", SHORT);
    let socket = socket_of(&dir);
    let (mut seen, mut held) = (Vec::new(), Vec::new());
    for _ in 0..20 {
        let cg = Cgroup::new("rf-first");
        let tracer = serving(&dir, &["foo"]).arg("--cgroup").arg(cg.path()).env("RUST_LOG", "info").spawn();
        wait_serving(&socket, &tracer);
        let mut p = start_in(cg.path(), &py, &script);
        let pid = p.pid();
        assert!(p.wait(Duration::from_secs(30), "the short Python").success());
        let run = stop(&socket, tracer);
        let n = counts_by_pid(&run.trace().calls, "foo").get(&pid).copied().unwrap_or(0);
        seen.push(n);
        let said = format!("pid {pid} was held stopped ");
        held.push(run.stderr.lines().find_map(|l| {
            let us = l.split_once(&said)?.1.split_once(" us")?.0;
            us.parse::<u64>().ok()
        }));
    }
    eprintln!("foo calls traced per first process: {seen:?}");
    eprintln!("held at exec while its file's probes were made (us): {held:?}");
    assert_eq!(seen, vec![CALLS; 20], "every call of the first process, 20 runs");
}

#[test]
fn a_batch_of_short_pythons_each_has_every_call() {
    require_root();
    // One at a time: they time calls and count every process of a file.
    let _serial = serial();
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

/// The values of `pid`'s `function__entry`/`function__return` semaphores
/// (in the interpreter file `py`), read through /proc/PID/maps and /proc/PID/mem.
fn semaphores(pid: u32, py: &Path) -> Vec<u16> {
    let mut offsets: Vec<u64> = pftrace::usdt::read_python_function_probes(py)
        .expect("the interpreter's probes")
        .iter()
        .map(|s| s.semaphore_offset)
        .collect();
    offsets.sort_unstable();
    offsets.dedup();
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let py = fs::canonicalize(py).unwrap();
    let mem = fs::File::open(format!("/proc/{pid}/mem")).expect("mem");
    offsets
        .iter()
        .map(|&off| {
            let address = maps
                .lines()
                .filter(|l| l.ends_with(py.to_str().unwrap()))
                .find_map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    let (start, end) = f[0].split_once('-').unwrap();
                    let (start, end) =
                        (u64::from_str_radix(start, 16).unwrap(), u64::from_str_radix(end, 16).unwrap());
                    let map_off = u64::from_str_radix(f[2], 16).unwrap();
                    (off >= map_off && off - map_off < end - start).then(|| start + off - map_off)
                })
                .unwrap_or_else(|| panic!("semaphore at file offset {off:#x} not mapped in pid {pid}"));
            let mut b = [0u8; 2];
            mem.read_exact_at(&mut b, address).expect("reading a semaphore");
            u16::from_ne_bytes(b)
        })
        .collect()
}

/// ns per call of `foo` in `w`: the fastest of `runs` timings of 300,000 calls (CPU time).
fn ns_per_call(w: &mut Worker, runs: usize) -> f64 {
    const N: u64 = 300_000;
    (0..runs).map(|_| w.time("foo", N).0 * 1e9 / N as f64).fold(f64::INFINITY, f64::min)
}

/// Timings per phase of the neighbour test, each process in turn.
const RUNS: usize = 15;

/// The neighbour's ns per call over the control's, both the fastest of
/// `RUNS` timings taken in turn, both on CPU 0: this VM's two CPUs run one
/// loop at two speeds for seconds at a time (seen here: 80.8 vs 129.1 and
/// 144.5 vs 73.9 ns/call for two processes timed in turn), so one process
/// compared with itself before and after moved with the scheduler (1.61x
/// once in a full test run, 0.92-1.05x otherwise).
fn relative_speed(neighbour: &mut Worker, control: &mut Worker) -> (f64, f64, f64) {
    let (mut n, mut c) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..RUNS {
        n = n.min(ns_per_call(neighbour, 1));
        c = c.min(ns_per_call(control, 1));
    }
    (n / c, n, c)
}

/// The neighbour's relative speed while pftraced traces its interpreter
/// file: the best of up to `ATTEMPTS` measurements, stopping at the first
/// not above `untraced`. Retried only because this VM disturbs a single
/// measurement (a full CI run saw 1.053x once, with the untraced ratios of
/// that run 0.984 and 1.026); a real cost fails every attempt: one probe hit
/// costs at least 215 ns (an empty program on a 5-byte nop, measured here)
/// against ~70 ns per call of the loop, over 4x.
fn relative_speed_while_traced(
    neighbour: &mut Worker,
    control: &mut Worker,
    untraced: f64,
) -> (f64, f64, f64) {
    const ATTEMPTS: usize = 3;
    let mut best = relative_speed(neighbour, control);
    for _ in 1..ATTEMPTS {
        if best.0 <= untraced {
            break;
        }
        let again = relative_speed(neighbour, control);
        if again.0 < best.0 {
            best = again;
        }
    }
    best
}

/// A control interpreter: a copy of `py` (another file, so pftraced never
/// links it) running with `py`'s standard library.
fn control_python(dir: &TestDir, py: &Path) -> PathBuf {
    let copy = dir.path().join("python-control");
    fs::copy(py, &copy).expect("copying the interpreter for the control");
    copy
}

#[test]
fn an_untraced_neighbour_on_the_same_file_keeps_its_semaphores_at_0_and_its_speed() {
    require_root();
    // One at a time: they time calls and count every process of a file.
    let _serial = serial();
    let dir = TestDir::new("rf-neighbour");
    let py = python();
    let script = worker_script(&dir);
    let socket = socket_of(&dir);
    let cg = Cgroup::new("rf-neighbour");
    let mut neighbour = WorkerSpec::new(&py, &script).cpu(0).start("untraced neighbour");
    let home = fs::canonicalize(&py).unwrap().parent().and_then(Path::parent).unwrap().to_owned();
    let mut control = WorkerSpec::new(&control_python(&dir, &py), &script)
        .env("PYTHONHOME", home.to_str().unwrap())
        .cpu(0)
        .start("control, another interpreter file");
    let before = relative_speed(&mut neighbour, &mut control);

    let tracer = serving(&dir, &["foo"]).arg("--cgroup").arg(cg.path()).spawn();
    wait_serving(&socket, &tracer);
    let mut traced = WorkerSpec::new(&py, &script).cgroup(cg.path()).start("traced, in the cgroup");
    wait_traced(&socket, &tracer, traced.pid());
    traced.call("foo", 1234);
    let (n, t) = (neighbour.pid(), traced.pid());
    assert_eq!(semaphores(n, &py), vec![0, 0], "the neighbour's semaphores");
    assert_eq!(semaphores(t, &py), vec![1, 1], "the traced process's semaphores (pftraced's +1)");
    let during = relative_speed_while_traced(&mut neighbour, &mut control, before.0);
    neighbour.call("foo", 4321); // not traced: not in the cgroup
    assert_eq!(semaphores(n, &py), vec![0, 0], "the neighbour's semaphores after its calls");

    let run = stop(&socket, tracer);
    assert_eq!(semaphores(t, &py), vec![0, 0], "a clean stop lowers pftraced's +1");
    let after = relative_speed(&mut neighbour, &mut control);
    let counts = counts_by_pid(&run.trace().calls, "foo");
    assert_eq!(counts, [(t, 1234)].into(), "calls of foo per pid: only the traced process's");
    assert_eq!(run.trace().counter("out_of_scope"), 0, "no probe hit of the neighbour");

    // The mean of the two untraced measurements: one alone moved by 4% in a
    // CI run (0.984 after, 1.026 before).
    let untraced = (before.0 + after.0) / 2.0;
    let ratio = during.0 / untraced;
    let show = |(r, n, c): (f64, f64, f64)| format!("{n:.1}/{c:.1} = {r:.3}");
    eprintln!(
        "neighbour/control ns per call: before {}, with pftraced tracing the neighbour's interpreter file {}, \
         after {}: {ratio:.3}x",
        show(before),
        show(during),
        show(after)
    );
    // Not the 1.05: on this VM two processes pinned to one CPU and
    // timed in turn moved 20% apart within one test (before 102.1/125.0 =
    // 0.817, after 0.994, in a CI run), so the bound is what a real cost
    // cannot pass: a probe hit costs at least 215 ns against 70-125 ns per
    // call of the loop (2.7x or more). The semaphores (0) and out_of_scope
    // (0) above are the exact checks; runs print the ratio (0.97-1.09 seen).
    assert!(
        ratio <= 1.25,
        "the neighbour ran at {ratio:.3}x its untraced speed relative to the control ({} vs before {} and after {})",
        show(during),
        show(before),
        show(after)
    );
    traced.finish();
    neighbour.finish();
    control.finish();
}

#[test]
fn a_sigkilled_daemon_leaves_the_traced_process_running_with_its_semaphores_raised() {
    require_root();
    // One at a time: they time calls and count every process of a file.
    let _serial = serial();
    let dir = TestDir::new("rf-sigkill");
    let py = python();
    let script = worker_script(&dir);
    let socket = socket_of(&dir);
    let cg = Cgroup::new("rf-sigkill");
    let mut control = WorkerSpec::new(&py, &script).cpu(0).start("untraced control");
    let tracer = serving(&dir, &["foo"]).arg("--cgroup").arg(cg.path()).spawn();
    wait_serving(&socket, &tracer);
    let mut traced = WorkerSpec::new(&py, &script).cgroup(cg.path()).cpu(0).start("traced, in the cgroup");
    wait_traced(&socket, &tracer, traced.pid());
    traced.call("foo", 100);
    assert_eq!(dump(&socket).calls.iter().filter(|c| c.name == "foo").count(), 100);

    // SAFETY: the daemon this test started.
    assert_eq!(unsafe { libc::kill(tracer.pid() as i32, libc::SIGKILL) }, 0);
    let run = tracer.finish();
    assert_eq!(run.code(), None, "pftraced was killed by SIGKILL");
    let t = traced.pid();
    // It keeps running and answering; its semaphores stay raised (nobody lowers them).
    traced.call("foo", 1000);
    assert_eq!(semaphores(t, &py), vec![1, 1], "what a SIGKILLed daemon leaves raised");
    // Timed in turn on one CPU, like the neighbour test: timed one after the
    // other (7 runs each), a switch of this VM's speed between the two once
    // read +51.5 ns (149.1 traced against 97.7 for the control).
    let (_, left, untraced) = relative_speed(&mut traced, &mut control);
    eprintln!(
        "after SIGKILL of pftraced: raised semaphores, no uprobe: {left:.1} ns/call, untraced control \
         {untraced:.1}: +{:.1} ns/call",
        left - untraced
    );
    assert!(
        left - untraced < 50.0,
        "the leftover raised semaphores cost {:.1} ns per call (README: under 50)",
        left - untraced
    );
    traced.finish();
    control.finish();
}

/// 80 Pythons started in a watched cgroup, one then two at a time, each
/// calling `early` CALLS times from its first line and then kept alive
/// until all are: every call of every one is traced. (1-3 of 80 missed all
/// their early calls in 17 of 29 runs under load: the daemon's file
/// descriptor table grew past 256 slots while it attached the ~70th, and
/// the kernel's grace period for that held the event loop 16-67 ms, past
/// their first lines; see pftrace::fdtable.)
#[test]
fn eighty_pythons_started_two_at_a_time_each_have_their_first_calls() {
    require_root();
    let _serial = serial();
    const PROCS: usize = 80;
    let dir = TestDir::new("rf-eighty");
    let py = python();
    let ready = dir.join("ready");
    fs::create_dir_all(&ready).unwrap();
    let go = dir.join("go");
    let script = dir.script(
        "held.py",
        &format!(
            "import os, time\n\
             t0 = time.monotonic_ns()\n\
             def early():\n    pass\n\
             def foo():\n    pass\n\
             for _ in range({CALLS}):\n    early()\n\
             t1 = time.monotonic_ns()\n\
             with open(os.path.join({ready:?}, str(os.getpid())), 'w') as f:\n    f.write(f'first line at {{t0}} ns, early done at {{t1}} ns')\n\
             while not os.path.exists({go:?}):\n    time.sleep(0.01)\n\
             for _ in range({CALLS}):\n    foo()\n"
        ),
    );
    let socket = socket_of(&dir);
    let cg = Cgroup::new("rf-eighty");
    let tracer = serving(&dir, &["early", "foo"])
        .arg("--cgroup")
        .arg(cg.path())
        .env("RUST_LOG", "info,pftrace::daemon=debug")
        .spawn();
    wait_serving(&socket, &tracer);
    // Its file descriptor table is grown at start, not while it attaches
    // (pftrace::fdtable): 2 per process of limits.max_processes (4096) + 1024,
    // at most the soft RLIMIT_NOFILE it inherits from this test.
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes only `limit`.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) }, 0);
    let want = (2 * 4096 + 1024).min(limit.rlim_cur);
    let status = fs::read_to_string(format!("/proc/{}/status", tracer.pid())).unwrap();
    let fd_size: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("FDSize:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("FDSize in /proc/PID/status");
    assert!(fd_size >= want, "pftraced's file descriptor table has {fd_size} slots, not >= {want}");
    const WAVE: usize = 2;
    let mut procs: Vec<Guard> = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while procs.len() < PROCS {
        let wave = if procs.is_empty() { 1 } else { WAVE.min(PROCS - procs.len()) };
        procs.extend((0..wave).map(|_| start_in(cg.path(), &py, &script)));
        while fs::read_dir(&ready).unwrap().count() < procs.len() {
            assert!(std::time::Instant::now() < deadline, "{PROCS} Pythons did not all start within 120 s");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    fs::write(&go, "").unwrap();
    let pids: Vec<u32> = procs.iter().map(Guard::pid).collect();
    for p in &mut procs {
        assert!(p.wait(Duration::from_secs(60), "a held Python").success());
    }
    let run = stop(&socket, tracer);
    let trace = run.trace();
    let of = |name: &str| {
        let by_pid = counts_by_pid(&trace.calls, name);
        pids.iter().map(|p| by_pid.get(p).copied().unwrap_or(0)).collect::<Vec<u64>>()
    };
    let early: Vec<(usize, u32, u64)> = of("early")
        .into_iter()
        .enumerate()
        .filter(|&(_, n)| n != CALLS)
        .map(|(i, n)| (i, pids[i], n))
        .collect();
    assert_eq!(of("foo"), vec![CALLS; PROCS], "every call of each of {PROCS} Pythons alive at once");
    let about: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| early.iter().any(|(_, pid, _)| l.contains(&format!("pid {pid} "))))
        .collect();
    // Exec to semaphores raised, per process (the daemon's debug lines).
    let mut raised_us: Vec<u64> = run
        .stderr
        .lines()
        .filter_map(|l| l.split_once(" us after its exec)")?.0.rsplit_once('(')?.1.parse().ok())
        .collect();
    raised_us.sort_unstable();
    if let (Some(first), Some(last)) = (raised_us.first(), raised_us.last()) {
        eprintln!(
            "exec to semaphores raised, {} processes: min {first} us, median {} us, p90 {} us, max {last} us",
            raised_us.len(),
            raised_us[raised_us.len() / 2],
            raised_us[raised_us.len() * 9 / 10]
        );
    }
    let said: Vec<String> = early
        .iter()
        .map(|(_, pid, _)| {
            format!("pid {pid}: {}", fs::read_to_string(ready.join(pid.to_string())).unwrap_or_default())
        })
        .collect();
    assert!(
        early.is_empty(),
        "Pythons (start order, pid, calls of early) that missed calls from their first line: {early:?}\n{}\n{}",
        said.join("\n"),
        about.join("\n")
    );
}
