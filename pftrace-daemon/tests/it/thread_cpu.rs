//! Per-call CPU time to the ns (README, "Per-call figures"): a traced
//! function that burns a given CPU time measures `time.thread_time_ns()` at
//! its first and last line; pftraced's `cpu_ns` for each call must agree
//! with that reading within 5% + 10 us, for calls of ~20 us, ~1 ms and
//! ~10 ms, with exact call counts, on the USDT road (CPython 3.9 built with
//! dtrace) and the agent road (pyenv 3.12.1); with two busy threads of one
//! process pinned to one CPU (switched out in the middle of calls); and for
//! a thread running since before pftraced attached (`--pid`), whose first
//! records take the scheduler's last charge: counted in `cpu_coarse`, and
//! no more calls off the bound than such records.
//!
//! The bound: the probes sit outside the function body. Between the
//! entry's CPU reading and the body's first `thread_time_ns()` lie the rest
//! of the probe (its record, the uprobe's return), the frame's start and
//! one `clock_gettime` syscall (about 0.3 us here); after the last reading,
//! a list append, the return and the return probe up to its reading: a few
//! us in all, 10 us with room. The 5% covers IRQ and steal time, which the
//! slot counts as the thread's (wall time since its switch-in) and the
//! thread clock may not.
//!
//! Against the old figure (the scheduler's last charge; run once with the
//! slots turned off) every test here but the `--pid` one failed, on
//! `cpu_coarse` (522 records of 522 in `sizes`); its per-call figures were
//! within the bound for all but 6 calls of 280, because the body's own
//! `thread_time_ns()` brings the scheduler's sum up to date (update_curr)
//! just before the return, and a stale entry only overestimates, which the
//! cap at the wall time hides for a busy call. The tick error shows in
//! calls that read no clock (`quiet_calls`): with the old figure 236 of 250
//! such calls of 20 us and 1 ms read cpu_ns 0, on both roads (run once with
//! the slots turned off); with the slots, 0 of 250 were off the bound.

use std::collections::BTreeMap;

use crate::common::*;

const US: u64 = 1_000;

/// `busy(ns)` spins `ns` (wall) and returns its own CPU reading, after 50 us
/// of untraced spinning (the old figure, the scheduler's last charge, took
/// that in: its entry reading was stale by it); `main` runs the plan in
/// threads started after the attachment.
const SCRIPT: &str = r#"
import gc, json, os, sys, threading, time

readings = []

def spin(ns):
    # CLOCK_MONOTONIC (vDSO): no syscall. CLOCK_THREAD_CPUTIME_ID is one,
    # and it brings the scheduler's sum up to date (update_curr), which
    # would make the old figure look exact.
    end = time.perf_counter_ns() + ns
    while time.perf_counter_ns() < end:
        pass

def busy(ns):
    # Nothing after the last reading but a subtraction: the caller keeps
    # the result. Appended here, the list's growth and its new pages
    # (6-32 us of the thread's CPU in 2-4 of 251 appends, measured without
    # tracing) fell inside the call and outside its own reading.
    c0 = time.thread_time_ns()
    spin(ns)
    return time.thread_time_ns() - c0

def measured(ns):
    readings.append((threading.get_native_id(), ns, busy(ns)))

PLAN = [(20_000, 200), (1_000_000, 50), (10_000_000, 10)]

def realtime():
    # SCHED_FIFO: the scheduler then charges the thread's CPU time only at
    # its ticks and switches (no CFS wakeup on its CPU brings the figure up
    # to date), as on an otherwise idle CPU; the old figure is then a tick
    # stale. It also keeps the machine's other work from taking the CPU
    # in the middle of calls.
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))

def sizes():
    realtime()
    for ns, n in PLAN:
        for _ in range(n):
            spin(50_000)   # untraced CPU between calls
            measured(ns)

def pair():
    # Not real-time: two SCHED_FIFO threads of one priority on one CPU never
    # take the CPU from each other, so the GIL would not change hands.
    for _ in range(10):
        spin(50_000)
        measured(10_000_000)

def quiet(ns):
    # No CPU clock read in the body: nothing brings the scheduler's sum up
    # to date inside the call, as in most real functions.
    spin(ns)

def quiets():
    realtime()
    for ns, n in [(20_000, 200), (1_000_000, 50)]:
        for _ in range(n):
            spin(50_000)
            quiet(ns)

def main(mode):
    # The collector would run inside some calls, outside the body's own
    # readings (real CPU of the call, invisible to the comparison).
    gc.disable()
    if mode == "mainquiet":
        # The main thread from its first call, never switched out on
        # purpose (no affinity change: a migration is a switch-out, which
        # would write its slot anyway), as a short CPU-bound script is.
        quiets()
        return
    # The code object's first call (the agent's first sight of it, its
    # name sent once) on the main thread: not among the compared calls.
    (quiet if mode == "quiet" else measured)(20_000)
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})
    if mode == "quiet":
        targets = [quiets]
    elif mode == "sizes":
        targets = [sizes]
    else:
        # Two busy threads on one CPU, the GIL handed over every 1 ms:
        # each is switched out in the middle of its calls.
        sys.setswitchinterval(0.001)
        targets = [pair, pair]
    threads = [threading.Thread(target=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("readings", json.dumps(readings), flush=True)

if __name__ == "__main__":
    main(sys.argv[1])
"#;

/// One traced call: (tid, wall ns, cpu ns, wall start us).
#[derive(Debug, Clone, Copy)]
struct Call {
    pid: u64,
    tid: u64,
    dur_ns: u64,
    cpu_ns: u64,
    ts_us: f64,
}

fn calls(trace: &Trace, name: &str) -> Vec<Call> {
    let mut v: Vec<Call> = trace.json()["traceEvents"]
        .as_array()
        .expect("traceEvents")
        .iter()
        .filter(|e| e["ph"] == "X" && e["name"] == name)
        .map(|e| Call {
            pid: e["pid"].as_u64().expect("pid"),
            tid: e["tid"].as_u64().expect("tid"),
            dur_ns: (e["dur"].as_f64().expect("dur") * 1000.0).round() as u64,
            cpu_ns: e["args"]["cpu_ns"].as_u64().unwrap_or_else(|| panic!("no cpu_ns in {e}")),
            ts_us: e["ts"].as_f64().expect("ts"),
        })
        .collect();
    v.sort_by(|a, b| a.ts_us.total_cmp(&b.ts_us));
    v
}

/// The script's own readings: (tid, asked ns, measured ns), in call order per thread.
fn readings(stdout: &str) -> Vec<(u64, u64, u64)> {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("readings "))
        .unwrap_or_else(|| panic!("the script printed no readings; stdout:\n{stdout}"));
    serde_json::from_str(line).expect("the script's readings")
}

fn bound(own: u64) -> u64 {
    own / 20 + 10 * US
}

/// Calls allowed off the bound among `n`: one in 20 (at least one). In a
/// VM, time the hypervisor gives another guest (steal) while a thread runs
/// counts in the slot's wall time since the switch-in and not in the
/// thread's clock, until the thread's next switch-in; here a 1 ms call
/// read 2.0 ms once and the next one 2 us (README, "Per-call figures").
fn allowed_off(n: usize) -> usize {
    n.div_ceil(20)
}

/// Pairs the trace's calls with the script's readings thread by thread, in
/// order (exact counts per thread first), and asserts each call of a
/// thread other than the main one is in bound (the main thread makes the
/// code object's first call, and takes its slot then: see `main` in
/// SCRIPT). Returns the compared calls with their readings.
/// `stolen`: steal ticks during the run; calls the slot put at their whole
/// wall time are then not counted against the bound (see below).
fn check_each(label: &str, calls: &[Call], own: &[(u64, u64, u64)], stolen: u64) -> Vec<(Call, u64)> {
    let mut by_tid: BTreeMap<u64, Vec<Call>> = BTreeMap::new();
    for c in calls {
        by_tid.entry(c.tid).or_default().push(*c);
    }
    let mut own_by_tid: BTreeMap<u64, Vec<(u64, u64)>> = BTreeMap::new();
    for &(tid, ns, got) in own {
        own_by_tid.entry(tid).or_default().push((ns, got));
    }
    let traced: Vec<(u64, usize)> = by_tid.iter().map(|(t, v)| (*t, v.len())).collect();
    let made: Vec<(u64, usize)> = own_by_tid.iter().map(|(t, v)| (*t, v.len())).collect();
    assert_eq!(traced, made, "{label}: calls per thread (tid, count), traced vs made");
    let mut out = Vec::new();
    let mut worst: BTreeMap<u64, i64> = BTreeMap::new();
    let mut bad = Vec::new();
    let mut capped = Vec::new();
    let mut diffs = Vec::new();
    for (tid, cs) in &by_tid {
        for (i, (c, &(ns, got))) in cs.iter().zip(&own_by_tid[tid]).enumerate() {
            if c.tid == c.pid {
                continue;
            }
            diffs.push(c.cpu_ns as i64 - got as i64);
            let diff = c.cpu_ns as i64 - got as i64;
            let w = worst.entry(ns).or_default();
            if diff.abs() > w.abs() {
                *w = diff;
            }
            if c.cpu_ns.abs_diff(got) > bound(got) && stolen > 0 && c.cpu_ns == c.dur_ns && got < c.cpu_ns {
                // The slot counted the call's whole wall time as run, the
                // thread's clock less: the hypervisor took the vCPU (steal,
                // seen machine-wide during this run), which the slot cannot
                // tell from running (README, "Per-call figures"). 14 and 15
                // of 260 such calls in two runs with 133 steal ticks.
                capped.push(format!("call {i} of tid {tid}: cpu_ns {} = wall, measured {got}", c.cpu_ns));
            } else if c.cpu_ns.abs_diff(got) > bound(got) {
                bad.push(format!(
                    "call {i} of tid {tid}, busy({ns}): cpu_ns {} (wall {} ns), the thread measured {got} ns",
                    c.cpu_ns, c.dur_ns
                ));
            }
            out.push((*c, got));
        }
    }
    diffs.sort();
    let q = |p: usize| diffs[(diffs.len() - 1) * p / 100];
    eprintln!(
        "{label}: {} calls compared; cpu_ns - own reading (ns): median {} [p5 {}, p95 {}]; worst per size: \
         {worst:?}",
        out.len(),
        q(50),
        q(5),
        q(95)
    );
    assert!(
        bad.len() <= allowed_off(out.len()),
        "{label}: {} of {} calls off the bound (5% + 10 us), more than {}:\n{}",
        bad.len(),
        out.len(),
        allowed_off(out.len()),
        bad.join("\n")
    );
    if !bad.is_empty() {
        eprintln!("{label}: off the bound (steal time, see allowed_off):\n{}", bad.join("\n"));
    }
    if !capped.is_empty() {
        eprintln!(
            "{label}: {} calls at their wall time while the machine had {stolen} steal ticks:\n{}",
            capped.len(),
            capped.join("\n")
        );
    }
    out
}

/// The host's steal time so far (/proc/stat, USER_HZ ticks): time the
/// hypervisor took from this VM's vCPUs.
fn steal_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let cpu = stat.lines().next().expect("/proc/stat's cpu line");
    cpu.split_whitespace().nth(8).and_then(|v| v.parse().ok()).expect("/proc/stat's steal field")
}

/// The run, its trace and the machine's steal ticks during it.
fn launched(label: &str, python: &std::path::Path, mode: &str) -> (TracedRun, Trace, u64) {
    let dir = TestDir::new(&format!("thread-cpu-{mode}"));
    let steal0 = steal_ticks();
    let script = dir.script("burn.py", SCRIPT);
    let run = Pftraced::new(&dir, &[if mode.ends_with("quiet") { "quiet" } else { "busy" }])
        .launch(&[python.as_os_str(), script.as_os_str(), std::ffi::OsStr::new(mode)])
        .run();
    let stolen = steal_ticks() - steal0;
    run.assert_code(0);
    let trace = run.trace();
    trace.assert_clean();
    eprintln!(
        "{label} {mode}: cpu_coarse {}, cpu_slots_full {}, steal ticks {stolen}",
        trace.counter("cpu_coarse"),
        trace.counter("cpu_slots_full")
    );
    (run, trace, stolen)
}

/// 200 calls of 20 us, 50 of 1 ms, 10 of 10 ms in a thread started after
/// the attachment: each in bound, none coarse.
fn sizes(label: &str, python: &std::path::Path) {
    let (run, trace, stolen) = launched(label, python, "sizes");
    let own = readings(&run.stdout);
    assert_eq!(own.len(), 261, "{label}: the script's calls");
    let calls = calls(&trace, "busy");
    assert_eq!(calls.len(), 261, "{label}: traced calls of busy");
    assert_eq!(check_each(label, &calls, &own, stolen).len(), 260, "{label}");
    check_coarse(label, &trace);
}

/// Two threads of 10 calls of 10 ms, one CPU: each call in bound, and the
/// calls were indeed switched out (wall well above CPU).
fn preempted(label: &str, python: &std::path::Path) {
    // No steal allowance here: this test guards the switch program, whose
    // failure (a slot never rewritten) would put preempted calls at their wall time too.
    let (run, trace, _) = launched(label, python, "pair");
    let own = readings(&run.stdout);
    assert_eq!(own.len(), 21, "{label}: the script's calls");
    let calls = calls(&trace, "busy");
    assert_eq!(calls.len(), 21, "{label}: traced calls of busy");
    let checked = check_each(label, &calls, &own, 0);
    assert_eq!(checked.len(), 20, "{label}");
    let (wall, cpu): (u64, u64) =
        checked.iter().fold((0, 0), |(w, c), (call, got)| (w + call.dur_ns, c + got));
    assert!(
        wall > cpu * 3 / 2,
        "{label}: the two threads were not switched out in the middle of calls (wall {wall} ns, cpu {cpu} ns)"
    );
    check_coarse(label, &trace);
}

/// 200 calls of 20 us and 50 of 1 ms that read no CPU clock, in a
/// SCHED_FIFO thread alone on its CPU (nothing takes the CPU from it but
/// interrupts and the hypervisor): each call's CPU is its wall time, within
/// 5% + 10 us. The scheduler's last charge, the figure before the slots,
/// moves only at a tick (4 ms here) or a switch, so it reads 0 for most of
/// these calls.
/// `mode` "mainquiet": the same calls on the launched command's main
/// thread, from its first call: exact only because its slot is claimed
/// before it runs (before that, its records were coarse until its first
/// switch-out: 1,000 of 1,000 in a 500-call CPU-bound script).
fn quiet_calls(label: &str, python: &std::path::Path, mode: &str) {
    let (_run, trace, _) = launched(label, python, mode);
    let calls = calls(&trace, "quiet");
    let on_main = mode == "mainquiet";
    assert_eq!(calls.len(), if on_main { 250 } else { 251 }, "{label}: traced calls of quiet");
    let compared: Vec<&Call> = calls.iter().filter(|c| on_main || c.tid != c.pid).collect();
    assert_eq!(
        compared.len(),
        250,
        "{label}: calls of the {} thread",
        if on_main { "main" } else { "worker" }
    );
    let bad: Vec<String> = compared
        .iter()
        .filter(|c| c.cpu_ns.abs_diff(c.dur_ns) > bound(c.dur_ns))
        .map(|c| format!("cpu_ns {} for a call of {} ns wall", c.cpu_ns, c.dur_ns))
        .collect();
    let zero = compared.iter().filter(|c| c.cpu_ns == 0).count();
    eprintln!("{label} quiet: {} of {} calls off the bound, {zero} with cpu_ns 0", bad.len(), compared.len());
    assert!(
        bad.len() <= allowed_off(compared.len()),
        "{label}: {} of {} calls that read no clock are off their wall time by more than 5% + 10 us \
         ({zero} read 0), more than {}:\n{}",
        bad.len(),
        compared.len(),
        allowed_off(compared.len()),
        bad.join("\n")
    );
    check_coarse(label, &trace);
}

/// The launched process's main thread existed before pftraced tracked it,
/// so it gets its slot while it is stopped at its exec (before that, its
/// first call had none and took one, exact only from its next switch-in:
/// 1 or 2 coarse records, every record of a CPU-bound main thread that
/// never switched out); the threads it starts have theirs from their
/// creation: no record coarse.
fn check_coarse(label: &str, trace: &Trace) {
    let coarse = trace.counter("cpu_coarse");
    assert_eq!(
        coarse, 0,
        "{label}: cpu_coarse {coarse}, want 0 (the main thread's slot is claimed at its exec stop)"
    );
    assert_eq!(trace.counter("cpu_slots_full"), 0, "{label}");
}

#[test]
fn usdt_road_calls_of_20us_1ms_10ms() {
    require_root();
    sizes("3.9 dtrace", &python());
}

#[test]
fn usdt_road_two_threads_on_one_cpu() {
    // Alone: CPU time and wall time measured on the 2 vCPUs (common/serial.rs).
    let _serial = serial();
    require_root();
    preempted("3.9 dtrace", &python());
}

#[test]
fn usdt_road_calls_that_read_no_clock() {
    require_root();
    quiet_calls("3.9 dtrace", &python(), "quiet");
}

#[test]
fn agent_road_calls_that_read_no_clock() {
    require_root();
    quiet_calls("pyenv 3.12.1 agent", &pyenv_python("3.12.1"), "quiet");
}

#[test]
fn usdt_road_launched_main_thread_exact_from_its_first_call() {
    require_root();
    quiet_calls("3.9 dtrace", &python(), "mainquiet");
}

#[test]
fn agent_road_launched_main_thread_exact_from_its_first_call() {
    require_root();
    quiet_calls("pyenv 3.12.1 agent", &pyenv_python("3.12.1"), "mainquiet");
}

#[test]
fn agent_road_calls_of_20us_1ms_10ms() {
    require_root();
    sizes("pyenv 3.12.1 agent", &pyenv_python("3.12.1"));
}

#[test]
fn agent_road_two_threads_on_one_cpu() {
    // Alone: CPU time and wall time measured on the 2 vCPUs (common/serial.rs).
    let _serial = serial();
    require_root();
    preempted("pyenv 3.12.1 agent", &pyenv_python("3.12.1"));
}

/// A thread busy since before `--pid` attaches (never blocking while
/// traced): its first record has no slot (it takes one then; the slot is
/// written at its next switch-in), counted in `cpu_coarse`; no more calls
/// are off the bound than coarse records, and none is garbage (CPU within
/// its wall time, off by at most a tick and the bound).
#[test]
fn thread_running_since_before_attach_is_counted_never_garbage() {
    require_root();
    const OLD: &str = r#"
import json, os, sys, threading, time

readings = []

def run_delay():
    # The thread's time runnable but not running, in ns (its schedstat's
    # second field; moved at each switch-in, so exact while it runs).
    with open("/proc/thread-self/schedstat", "rb") as f:
        return int(f.read().split()[1])

def busy(ns):
    # Only subtractions after the last reading (see SCRIPT's busy). The
    # wall time the thread neither ran nor waited for a CPU is what the
    # hypervisor took while it ran (steal): the slot counts it, the
    # thread's clock does not. Read outside the CPU clock's readings, so
    # it can only come out larger than the steal, never smaller.
    w0 = time.perf_counter_ns()
    d0 = run_delay()
    c0 = time.thread_time_ns()
    end = time.perf_counter_ns() + ns
    while time.perf_counter_ns() < end:
        pass
    c1 = time.thread_time_ns()
    d1 = run_delay()
    w1 = time.perf_counter_ns()
    return c1 - c0, max(0, (w1 - w0) - (c1 - c0) - (d1 - d0))

def spin(stop):
    while not os.path.exists(stop):
        t0 = time.time_ns()
        readings.append((threading.get_native_id(), t0, *busy(1_000_000)))

t = threading.Thread(target=spin, args=(sys.argv[1],))
t.start()
print("ready", flush=True)
t.join()
print("readings", json.dumps(readings), flush=True)
"#;
    let dir = TestDir::new("thread-cpu-old");
    let script = dir.script("old.py", OLD);
    let stop = dir.join("stop");
    let mut py = PyProcess::spawn(&python(), &script, &[stop.to_str().unwrap()]);
    py.expect_line("ready");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let tracer = Pftraced::new(&dir, &["busy"]).pid(py.pid()).spawn();
    tracer.wait_attached(py.pid());
    std::thread::sleep(std::time::Duration::from_millis(1000));
    std::fs::write(&stop, b"").unwrap();
    let line = py.expect("readings");
    assert!(py.finish().success(), "the script failed");
    let run = tracer.finish();
    run.assert_code(0);
    let trace = run.trace();
    let coarse = trace.counter("cpu_coarse");
    assert_eq!(trace.counter("cpu_slots_full"), 0);
    let own: Vec<(u64, u64, u64, u64)> =
        serde_json::from_str(line.strip_prefix("readings ").unwrap_or(&line)).expect("readings");
    let calls = calls(&trace, "busy");
    assert!(
        calls.len() >= 100,
        "only {} calls traced in 1 s of 1 ms calls (0.5 s gave 100 once, with both CPUs loaded)",
        calls.len()
    );
    // Pair by start time: each call with the reading whose wall start is nearest.
    let (mut off, mut stolen_calls) = (0u64, 0u64);
    for c in &calls {
        let start_ns = (c.ts_us * 1000.0) as i64;
        let &(_, _, got, stolen) =
            own.iter().min_by_key(|(_, t0, _, _)| (*t0 as i64 - start_ns).abs()).expect("readings");
        assert!(c.cpu_ns <= c.dur_ns, "cpu_ns {} over the wall time {}", c.cpu_ns, c.dur_ns);
        // Two ticks: a call whose entry had no slot yet (the scheduler's
        // last charge, up to a tick stale) and whose return had one (exact)
        // is over by that staleness, and the VM's steal time on top (one
        // run: 5.71 ms for a call the thread measured at 0.56 ms, over one
        // tick + the bound); garbage would be far off either way.
        assert!(
            c.cpu_ns.abs_diff(got) <= bound(got) + 2 * 4_000 * US + stolen,
            "garbage: cpu_ns {} for a call the thread measured at {got} ns ({stolen} ns stolen)",
            c.cpu_ns
        );
        // The slot counts the steal of its call (its wall time since the
        // switch-in), the thread's clock does not: above the thread's
        // figure by at most what was stolen, measured by the script.
        // Under the parallel tests, one run: 31 of 446 calls over the
        // bound by the thread's clock alone, 2 of them coarse.
        if stolen > bound(got) {
            stolen_calls += 1;
        }
        if c.cpu_ns + bound(got) < got || c.cpu_ns > got + stolen + bound(got) {
            off += 1;
        }
    }
    eprintln!(
        "{} calls; {off} off the bound; {stolen_calls} with steal over it; cpu_coarse {coarse}",
        calls.len()
    );
    assert!(coarse >= 1, "the thread's first record had no slot: counted");
    assert!(
        off as usize <= coarse as usize + allowed_off(calls.len()),
        "{off} calls off the bound but only {coarse} coarse records counted (and {} allowed for steal time)",
        allowed_off(calls.len())
    );
}
