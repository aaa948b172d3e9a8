//! A Python process outside the traced cgroup is untouched: its probe
//! semaphores stay 0 (pid-scoped uprobes raise only the traced processes'
//! semaphores, read here straight from /proc/PID/mem) and its call loop runs
//! as fast as with no daemon at all, while pftraced is kept busy by a traced
//! process in the cgroup calling the same function in a loop.
//!
//! Timing on a small (2-core) VM: the untraced loop is pinned to CPU 1, the
//! traced process and the daemon to CPU 0, so they do not compete for a core;
//! and the loop is measured in CPU time of the process (`time.process_time`,
//! user + system: probe traps would show there), which other load on the
//! machine does not inflate the way it does wall time. The median of 7 runs
//! of 2M calls beside the traced cgroup may be at most 75% above the median
//! of 14 undisturbed runs (7 before the daemon starts, 7 after it stops):
//! not a figure of the neighbour's cost (the semaphores, 0, are the exact
//! check), a bound no probe hit can pass. This VM's vCPU changes speed for
//! seconds at a time: in one CI run the same undisturbed process ran blocks
//! at 242-258 then 172-190 ms, and a whole "beside" block at +58% while the
//! semaphores read 0; with a 5% bound, 1 of the last 3 CI runs failed. The
//! comparison is retried (up to 3 attempts) only because a shared VM can
//! disturb one attempt, while a real cost fails them all: the test ends by
//! showing the measurement sees one (traced by pid, the same loop is ~50x
//! slower per call, asserted above 2x).

use crate::common;

use std::{
    fs,
    os::unix::fs::{FileExt as _, MetadataExt as _},
    path::Path,
};

use crate::common::*;

/// Calls per timed run, runs per block.
const CALLS: u64 = 2_000_000;
const RUNS: usize = 7;
const ATTEMPTS: usize = 3;
/// Largest accepted slowdown of the median (see the module's comment).
const TOLERANCE: f64 = 0.75;

/// Where a probe's semaphore is in `pid`: the binary's mapping whose file
/// range holds the semaphore's file offset (the writable one: semaphores are
/// data), at map start + (offset - the mapping's file offset).
fn semaphore_address(pid: u32, binary: &Path, semaphore_offset: u64) -> u64 {
    let ino = fs::metadata(binary).unwrap().ino();
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut found = Vec::new();
    for line in maps.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 || f[4].parse::<u64>().ok() != Some(ino) {
            continue;
        }
        let (start, end) = f[0].split_once('-').unwrap();
        let start = u64::from_str_radix(start, 16).unwrap();
        let end = u64::from_str_radix(end, 16).unwrap();
        let offset = u64::from_str_radix(f[2], 16).unwrap();
        if (offset..offset + (end - start)).contains(&semaphore_offset) {
            found.push((f[1].contains('w'), start + (semaphore_offset - offset)));
        }
    }
    found.sort(); // writable last
    found.last().map(|&(_, addr)| addr).unwrap_or_else(|| {
        panic!(
            "no mapping of {} in pid {pid} holds file offset {semaphore_offset:#x}:\n{maps}",
            binary.display()
        )
    })
}

/// (function__entry, function__return) semaphore values of `pid`.
fn semaphores(pid: u32, binary: &Path) -> (u16, u16) {
    let sites = pftrace::usdt::read_python_function_probes(binary).unwrap();
    let read = |name: &str| {
        let site = sites.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("no {name} probe"));
        assert_ne!(site.semaphore_offset, 0, "{name} has no semaphore");
        let addr = semaphore_address(pid, binary, site.semaphore_offset);
        let mem = fs::File::open(format!("/proc/{pid}/mem")).unwrap();
        let mut buf = [0u8; 2];
        mem.read_exact_at(&mut buf, addr).unwrap_or_else(|e| panic!("reading pid {pid} at {addr:#x}: {e}"));
        u16::from_ne_bytes(buf)
    };
    (read("function__entry"), read("function__return"))
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// `RUNS` timed loops: CPU seconds and wall seconds of each.
fn block(w: &mut Worker) -> (Vec<f64>, Vec<f64>) {
    (0..RUNS).map(|_| w.time("foo", CALLS)).unzip()
}

fn ms(v: &[f64]) -> String {
    v.iter().map(|s| format!("{:.1}", s * 1e3)).collect::<Vec<_>>().join(" ")
}

#[test]
fn untraced_python_beside_a_traced_cgroup_is_not_slowed_and_its_semaphore_stays_zero() {
    // Alone: CPU time and wall time measured on the 2 vCPUs (common/serial.rs).
    let _serial = serial();
    require_tool("taskset", "util-linux");
    let dir = TestDir::new("svc-overhead");
    let py = python();
    let script = worker_script(&dir);
    let cg = Cgroup::new("overhead");
    let socket = socket_of(&dir);
    let stopfile = dir.join("stop-loop");

    let mut untraced = WorkerSpec::new(&py, &script).cpu(1).start("untraced, on CPU 1");
    let mut traced = WorkerSpec::new(&py, &script).cgroup(cg.path()).cpu(0).start("traced, on CPU 0");
    let (u, t) = (untraced.pid(), traced.pid());
    assert_eq!(semaphores(u, &py), (0, 0), "before any daemon");
    assert_eq!(semaphores(t, &py), (0, 0), "before any daemon");
    for _ in 0..2 {
        untraced.time("foo", CALLS); // warm up
    }

    let mut report = Vec::new();
    let mut passed = false;
    for attempt in 1..=ATTEMPTS {
        let (base1, base1_wall) = block(&mut untraced);

        let tracer = serving(&dir, &["foo"])
            .wrapped(&["taskset", "-c", "0"])
            .arg("--cgroup")
            .arg(cg.path())
            .arg("--max-calls-in-memory")
            .arg("1000")
            .arg("--quiet")
            .spawn();
        wait_serving(&socket, &tracer);
        wait_traced(&socket, &tracer, t);
        let _ = fs::remove_file(&stopfile);
        traced.send(&format!("loop foo {}", stopfile.display()));
        let calls_of_t = |s: &serde_json::Value| process_entry(s, t).unwrap()["calls"].as_u64().unwrap();
        let busy =
            wait_status(&socket, tracer.pid(), "the traced loop to be recorded", |s| calls_of_t(s) > 10_000);
        let busy_from = calls_of_t(&busy);

        let sem_t = semaphores(t, &py);
        let sem_u = semaphores(u, &py);
        assert!(
            sem_t.0 > 0 && sem_t.1 > 0,
            "the traced process's semaphores read {sem_t:?}: the method is broken"
        );
        assert_eq!(sem_u, (0, 0), "the untraced process's semaphores (entry, return) are raised");

        let (during, during_wall) = block(&mut untraced);

        let status = common::status(&socket);
        assert!(process_entry(&status, u).is_none(), "the untraced process is listed:\n{status:#}");
        let busy_to = calls_of_t(&status);
        assert!(busy_to > busy_from, "the traced loop stopped being recorded while the untraced one ran");
        assert_eq!(semaphores(u, &py), (0, 0), "the untraced process's semaphores are raised");
        fs::write(&stopfile, "").unwrap();
        let loop_calls: u64 = traced.expect("done").parse().unwrap();
        let lost = status["counters"]["lost"].as_u64().unwrap();
        let run = stop(&socket, tracer);
        assert_eq!(semaphores(t, &py), (0, 0), "the traced process's semaphores after the daemon stopped");

        let (base2, base2_wall) = block(&mut untraced);
        let base: Vec<f64> = base1.iter().chain(&base2).copied().collect();
        let (b, d) = (median(&base), median(&during));
        let diff = d / b - 1.0;
        let line = format!(
            "attempt {attempt}: CPU ms per {CALLS} calls: undisturbed {} | {}; beside the traced cgroup {} \
             => medians {:.2} vs {:.2} ms ({:+.2}%); wall ms: {} | {} vs {}; semaphores (entry, return): \
             traced {sem_t:?}, untraced {sem_u:?}; traced loop: {loop_calls} calls ({} recorded while \
             timing, {lost} lost), daemon ran {:.1} s",
            ms(&base1),
            ms(&base2),
            ms(&during),
            b * 1e3,
            d * 1e3,
            diff * 100.0,
            ms(&base1_wall),
            ms(&base2_wall),
            ms(&during_wall),
            busy_to - busy_from,
            run.elapsed.as_secs_f64()
        );
        eprintln!("{line}");
        report.push(line);
        // Only a slowdown counts: on this VM whole blocks sometimes run
        // faster (the host moves the vCPU), which no tracer can cause.
        if diff <= TOLERANCE {
            passed = true;
            break;
        }
    }
    assert!(
        passed,
        "the untraced loop's median CPU time was more than {:.0}% slower in all {ATTEMPTS} attempts:\n{}",
        TOLERANCE * 100.0,
        report.join("\n")
    );

    // The measurement does see probes: the same process traced by pid.
    let (base, _) = block(&mut untraced);
    let per_call_base = median(&base) / CALLS as f64;
    let socket2 = dir.join("by-pid.sock");
    let tracer = Pftraced::new(&dir, &["foo"])
        .wrapped(&["taskset", "-c", "0"])
        .pid(u)
        .arg("--socket")
        .arg(&socket2)
        .arg("--max-calls-in-memory")
        .arg("1000")
        .arg("--quiet")
        .spawn();
    tracer.wait_attached(u);
    let sem = semaphores(u, &py);
    assert!(sem.0 > 0 && sem.1 > 0, "traced by pid, its semaphores read {sem:?}");
    let n = 200_000;
    let (cpu, _) = untraced.time("foo", n);
    let per_call = cpu / n as f64;
    stop(&socket2, tracer);
    eprintln!(
        "traced by pid: {:.0} ns per call vs {:.0} ns untraced ({:.1}x); semaphores {sem:?}",
        per_call * 1e9,
        per_call_base * 1e9,
        per_call / per_call_base
    );
    assert!(
        per_call > 2.0 * per_call_base,
        "tracing the process itself should slow its loop a lot: {per_call:e} s vs {per_call_base:e} s per call"
    );
    assert_eq!(semaphores(u, &py), (0, 0), "after the by-pid daemon stopped");

    untraced.finish();
    traced.finish();
}
