//! A record's RSS is the traced process's, counter by counter: the kernel
//! sums mm->rss_stat's file, anon and shmem counters of the probed thread's
//! mm (pftrace-ebpf's `task_rss`), and each call here reads its own
//! /proc/self/status between its entry and return records, with 32 MiB of
//! anonymous, 16 MiB of shared (shmem) and the interpreter's file pages
//! resident. The record must agree with VmRSS within what the kernel's
//! per-CPU batching allows; a load of the wrong field, the wrong counter or
//! one counter left out misses by thousands of pages.

use crate::common::*;
use serde_json::Value;

const SCRIPT: &str = r#"
    import json, mmap, os, sys

    MIB = 1 << 20
    # Anonymous private memory (MM_ANONPAGES), every page touched.
    heap = bytearray(32 * MIB)
    for i in range(0, len(heap), 4096):
        heap[i] = 1
    # A shared anonymous mapping is shmem (MM_SHMEMPAGES).
    shared = mmap.mmap(-1, 16 * MIB)
    for i in range(0, len(shared), 4096):
        shared[i] = 1
    # The interpreter's file, read through a mapping (MM_FILEPAGES).
    with open(sys.executable, "rb") as f:
        exe = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    for i in range(0, len(exe), 4096):
        exe[i]

    def status_now():
        with open("/proc/self/status") as f:
            return f.read()

    def kib(status, key):
        line = next(l for l in status.splitlines() if l.startswith(key + ":"))
        return int(line.split()[1])

    readings = []
    for _ in range(20):
        s = status_now()
        readings.append({k: kib(s, k) for k in ("VmRSS", "RssAnon", "RssFile", "RssShmem")})
    print("readings", json.dumps(readings), flush=True)
"#;

/// Pages the kernel's sum of counters may differ from the exact count by:
/// each counter keeps per-CPU deltas below its batch before folding them in
/// (percpu_counter_batch: max(32, 2 x CPUs)), and /proc may sum them where
/// the record reads only the folded count: 3 counters x CPUs x batch.
fn batching_bound_pages() -> u64 {
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) }.max(1) as u64;
    3 * cpus * 32u64.max(2 * cpus)
}

#[test]
fn record_rss_is_the_sum_of_the_three_counters_proc_reports() {
    require_root();
    let dir = TestDir::new("rss");
    let script = dir.script("rss.py", SCRIPT);
    let python = python();
    let run = Pftraced::new(&dir, &["status_now"]).launch(&[python.as_os_str(), script.as_os_str()]).run();
    run.assert_code(0);
    let trace = run.trace();
    trace.assert_clean();
    assert_eq!(trace.counts().get("status_now"), Some(&20), "calls per name: {:?}", trace.counts());

    let line = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("readings "))
        .unwrap_or_else(|| panic!("the script printed no readings; stdout:\n{}", run.stdout));
    let readings: Vec<Value> = serde_json::from_str(line).expect("the script's readings");
    let mut calls: Vec<(f64, u64, u64)> = trace.json()["traceEvents"]
        .as_array()
        .expect("traceEvents")
        .iter()
        .filter(|e| e["ph"] == "X" && e["name"] == "status_now")
        .map(|e| {
            let a = &e["args"];
            let u = |k: &str| a[k].as_u64().unwrap_or_else(|| panic!("{k} missing in {e}"));
            (e["ts"].as_f64().expect("ts"), u("rss_entry_bytes"), u("rss_return_bytes"))
        })
        .collect();
    calls.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert_eq!(calls.len(), readings.len());

    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    let bound = batching_bound_pages() * page;
    for (i, ((_, entry, ret), r)) in calls.iter().zip(&readings).enumerate() {
        let kib = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("{k} missing in {r}")) * 1024;
        let (vm_rss, anon, file, shmem) = (kib("VmRSS"), kib("RssAnon"), kib("RssFile"), kib("RssShmem"));
        eprintln!(
            "call {i}: record {entry} -> {ret} bytes; /proc VmRSS {vm_rss} (anon {anon} file {file} shmem {shmem}); \
             bound {bound}"
        );
        // Each counter is far above the bound: leaving any one out, or
        // reading another in its place, cannot pass.
        for (what, v) in [("RssAnon", anon), ("RssFile", file), ("RssShmem", shmem)] {
            assert!(v > 4 * bound, "call {i}: {what} {v} bytes is not well above the bound {bound}: {r}");
        }
        let (lo, hi) = (entry.min(ret), entry.max(ret));
        assert!(
            vm_rss + bound >= *lo && vm_rss <= hi + bound,
            "call {i}: /proc's VmRSS {vm_rss} bytes, read between the entry's record ({entry}) and the \
             return's ({ret}), is more than {bound} bytes (the per-CPU batching) outside them"
        );
    }
}
