//! A traced process cannot grow pftraced's memory without bound (README,
//! "Bounds"): it chooses its code objects' file names and lines
//! (`CodeType.replace`), and a root daemon on a shared node must keep
//! serving every other process meanwhile.
//!
//! One pftraced traces, at the same time, a hostile process calling a
//! traced name from 200,000 code objects with distinct 4,000-byte file
//! names, then from 20,000 with distinct lines, once each, and a
//! well-behaved one calling its own `foo` 5,000 times. Before the bounds,
//! the same run took pftraced to 1,115,748 kB VmHWM and lost 285,309
//! records (it could not keep up with allocating the new strings); with
//! them, 68 MB and none.

use std::{path::Path, time::Duration};

use crate::common::*;
use pftrace::string_bound::{OTHER, PROCESS_BYTES, string_bytes};
use serde_json::Value;

/// Code objects with distinct file names, then with distinct lines.
const FILES: u64 = 200_000;
const LINES: u64 = 20_000;
/// Code objects with distinct file names made before the process waits for
/// the daemon to store them: 2,000 entry records of 4.4 kB each, 8.8 MB, fit
/// the 16 MiB ring buffer with room to spare. A fixed pause of 2 ms every
/// 1,000 was not enough: CI's run on a busy machine lost 337 records.
const CHUNK: u64 = 2_000;
/// The well-behaved process's calls.
const GOOD: u64 = 5_000;
/// The bound asserted on pftraced's peak resident memory.
const PEAK_MIB: u64 = 160;

const HOSTILE: &str = r#"
    import sys, types
    base = [c for c in compile("def foo():\n    pass\n", "h.py", "exec").co_consts
            if isinstance(c, types.CodeType)][0]
    files, lines, chunk = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    print("ready", flush=True)
    made = 0
    for start in range(0, files, chunk):
        # One chunk at a time, when the test says the daemon has stored the
        # last one: the test is of memory, not of speed.
        sys.stdin.readline()
        for i in range(start, min(start + chunk, files)):
            # 3,997 bytes, distinct in the first 17.
            types.FunctionType(base.replace(co_filename="/hostile/%07d/" % i + "x" * 3980), {})()
            made += 1
        print(made, flush=True)
    sys.stdin.readline()
    for i in range(lines):
        types.FunctionType(base.replace(co_filename="/hostile/lines.py", co_firstlineno=i + 2), {})()
        made += 1
    print(made, flush=True)
    sys.stdin.readline()
"#;

const WELL_BEHAVED: &str = r#"
    import sys
    def foo():
        pass
    n = int(sys.argv[1])
    print("ready", flush=True)
    sys.stdin.readline()
    made = 0
    for i in range(n):
        foo()
        made += 1
    print(made, flush=True)
    sys.stdin.readline()
"#;

fn stats(socket: &Path, args: &[&str]) -> Value {
    let out = ctl_ok(socket, &[&["stats", "--json"], args].concat());
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("stats --json is not JSON ({e}):\n{out}"))
}

/// (file, line, calls) of each row of `pid` (every row when None) in a stats reply.
fn rows(reply: &Value, pid: Option<u32>) -> Vec<(String, i64, u64)> {
    reply["functions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| pid.is_none_or(|p| r["pid"].as_u64() == Some(u64::from(p))))
        .map(|r| {
            assert_eq!(r["function"], "foo", "{r}");
            assert_eq!(r["incomplete"], 0, "{r}");
            (
                r["file"].as_str().unwrap().to_string(),
                r["line"].as_i64().unwrap_or(-1),
                r["calls"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn a_process_making_distinct_code_objects_is_bounded_and_others_stay_exact() {
    let _serial = serial();
    let dir = TestDir::new("hostile");
    let py = python();
    let mut hostile = PyProcess::spawn(
        &py,
        &dir.script("hostile.py", HOSTILE),
        &[&FILES.to_string(), &LINES.to_string(), &CHUNK.to_string()],
    );
    let good_script = dir.script("good.py", WELL_BEHAVED);
    let mut good = PyProcess::spawn(&py, &good_script, &[&GOOD.to_string()]);
    hostile.expect_line("ready");
    good.expect_line("ready");
    let (h, g) = (hostile.pid(), good.pid());
    let socket = socket_of(&dir);
    let tracer = serving(&dir, &["foo"]).pid(h).pid(g).spawn();
    tracer.wait_attached(h);
    tracer.wait_attached(g);
    wait_serving(&socket, &tracer);

    // The well-behaved process runs alongside the hostile one's first chunk.
    hostile.send("go");
    good.send("go");
    let good_made: u64 = good.read_line().parse().unwrap();
    assert_eq!(good_made, GOOD);
    let stored = |made: u64| {
        wait_status_within(&socket, tracer.pid(), "every call stored", Duration::from_secs(20), |s| {
            s["calls_total"].as_u64() >= Some(made + good_made) || s["counters"]["lost"] != 0
        })
    };
    for chunk in 0..FILES.div_ceil(CHUNK) {
        if chunk > 0 {
            hostile.send("go");
        }
        let made: u64 = hostile.read_line().parse().unwrap();
        let status = stored(made);
        assert_eq!(status["counters"]["lost"], 0, "records were lost after {made} calls\n{status:#}");
    }
    hostile.send("go");
    let made: u64 = hostile.read_line().parse().unwrap();
    assert_eq!(made, FILES + LINES);
    let status = stored(made);
    let peak = peak_mib(tracer.pid());
    let counters = &status["counters"];
    assert_eq!(counters["lost"], 0, "records were lost\n{status:#}");
    assert_eq!(status["calls_total"], made + good_made, "{status:#}");

    // Memory: under the bound (1,090 MiB before it).
    assert!(peak < PEAK_MIB, "pftraced's peak RSS {peak} MiB, bound {PEAK_MIB} MiB");

    // The hostile process's first file names fit its string bound ("foo"
    // may be charged to it too: its first record came first), each one call;
    // the rest of them are named `<other...>`, counted. "/hostile/lines.py"
    // (98 bytes charged) still fits.
    let per_pid = stats(&socket, &["--per-pid"]);
    let hostile_rows = rows(&per_pid, Some(h));
    assert_eq!(hostile_rows.iter().map(|r| r.2).sum::<u64>(), made, "every call counted");
    let long: Vec<_> = hostile_rows.iter().filter(|r| r.0.len() == 3997).collect();
    let cost = string_bytes(3997);
    let kept = long.len() as u64;
    assert!([PROCESS_BYTES / cost, (PROCESS_BYTES - string_bytes(3)) / cost].contains(&kept), "{kept} kept");
    assert!(long.iter().all(|r| r.0.starts_with("/hostile/") && r.1 == 1 && r.2 == 1), "{long:?}");
    let folded_files = FILES - kept;
    // Records with a file name not kept: the entry of each such call (its
    // return carries no file name, only the address that pairs it).
    let bounds = &counters["bounds"];
    assert_eq!(bounds["strings_folded"], folded_files, "{bounds}");
    assert!(bounds["string_bytes"].as_u64().unwrap() <= PROCESS_BYTES + 4096, "{bounds}");
    // Groups (one per function, file and line) of the process: the kept
    // files', the `<other...>` file's at line 1, then one per line of
    // lines.py up to 4,096; its further calls count in the `<other...>` row
    // at line 0.
    let groups_left = 4096 - (kept + 1);
    let stats_folded = LINES - groups_left;
    assert_eq!(per_pid["bounds"]["stats_folded"], stats_folded, "{}", per_pid["bounds"]);
    let lines: Vec<_> = hostile_rows.iter().filter(|r| r.0 == "/hostile/lines.py").collect();
    assert_eq!(lines.len() as u64, groups_left);
    assert!(lines.iter().all(|r| r.2 == 1), "{lines:?}");
    let mut other: Vec<_> = hostile_rows.iter().filter(|r| r.0 == OTHER).map(|r| (r.1, r.2)).collect();
    other.sort();
    assert_eq!(other, [(0, stats_folded), (1, folded_files)]);
    assert_eq!(kept + folded_files + groups_left + stats_folded, made);
    assert_eq!(stats(&socket, &[])["bounds"]["stats_folded"], stats_folded);
    let note = format!(
        "BOUNDS (README, \"Bounds\"): {} records with names not kept, {stats_folded} calls counted in <other> \
         rows, 0 calls not traced",
        folded_files
    );
    for args in [&["status"][..], &["stats"]] {
        let text = ctl_ok(&socket, args);
        assert!(text.contains(&note), "pftracectl {args:?} says what met the bounds:\n{note}\n{text}");
    }

    // The well-behaved process: exact count and name, nothing folded.
    let good_path = good_script.to_str().unwrap();
    assert_eq!(rows(&per_pid, Some(g)), [(good_path.to_string(), 2, GOOD)]);

    // Stopped while both still run (with them gone it would end by itself).
    ctl_ok(&socket, &["stop"]);
    let run = tracer.finish();
    hostile.send("exit");
    good.send("exit");
    // One warning for each bound, naming the hostile process only.
    for (what, n) in [("its distinct function and file names reached", 1), ("its calls reached", 1)] {
        assert_eq!(run.stderr.matches(&format!("pid {h}: {what}")).count(), n, "{what}\n{}", run.stderr);
        assert_eq!(run.stderr.matches(&format!("pid {g}: {what}")).count(), 0, "{}", run.stderr);
    }
    assert!(run.stderr.contains("BOUNDS: "), "the summary names the bounds met:\n{}", run.stderr);
}
