//! A process's share of the CPU slots (README, "Bounds"): with
//! `--cpu-slots-per-process 8`, a traced Python of a main thread and 20
//! threads gets exact CPU for 8 of them (the main thread, slotted at its
//! fork, and the first 7 threads started); the other 13 get the scheduler's
//! figure, each of their records counted in `cpu_coarse`, each attempt to
//! take a slot in `cpu_slots_process_full`. A second process of 8 threads,
//! run while the first holds its share, gets slots for all of them (none of
//! its records coarse), and a third one like the first, started after both
//! exited, gets its 8 again. At the end every slot taken was given back and
//! every process's tally forgotten (`cpu_slots_taken` = `_returned`,
//! `cpu_slot_processes` = `_gone`).
//!
//! Before the share (the kernel's per-process tally), one process took
//! every free slot: the counts below read 0 process-full attempts and no
//! coarse records, the 20-thread process holding 21 slots.

use std::collections::BTreeMap;

use crate::common::*;

/// Calls of `work` per thread (the main thread's too).
const CALLS: u64 = 50;
/// The share given to pftraced.
const SHARE: u64 = 8;

/// `parent`: starts the wide child (main + 20 threads), waits until all its
/// threads made their calls and hold (slots are given back only at a
/// thread's exit), runs the narrow child (main + 7 threads) meanwhile, lets
/// the wide one end, then runs a second wide child. Each child's main
/// thread makes its calls before starting any thread, so the slots go to
/// the main thread and the first threads started.
const SCRIPT: &str = r#"
import subprocess, sys, threading

CALLS = 50

def work():
    return 1

def child(threads, hold):
    for _ in range(CALLS):
        work()
    made = threading.Barrier(threads + 1)
    go = threading.Event()
    def run():
        for _ in range(CALLS):
            work()
        made.wait()
        go.wait()
    ts = [threading.Thread(target=run) for _ in range(threads)]
    for t in ts:
        t.start()
    made.wait()
    if hold:
        print("held", flush=True)
        sys.stdin.readline()
    go.set()
    for t in ts:
        t.join()

def spawn(threads, hold):
    return subprocess.Popen(
        [sys.executable, __file__, "child", str(threads), hold],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )

def parent():
    wide = spawn(20, "hold")
    assert wide.stdout.readline() == "held\n"
    narrow = spawn(7, "")
    assert narrow.wait() == 0
    wide.stdin.write("go\n")
    wide.stdin.flush()
    assert wide.wait() == 0
    again = spawn(20, "")
    assert again.wait() == 0
    print("pids", wide.pid, narrow.pid, again.pid, flush=True)

if __name__ == "__main__":
    if sys.argv[1] == "child":
        child(int(sys.argv[2]), sys.argv[3] == "hold")
    else:
        parent()
"#;

#[test]
fn one_process_takes_only_its_share_of_the_cpu_slots() {
    require_root();
    let dir = TestDir::new("cpu-slot-share");
    let script = dir.script("share.py", SCRIPT);
    let run = Pftraced::new(&dir, &["work"])
        .args(&["--cpu-slots-per-process", &SHARE.to_string()])
        .launch(&[python().as_os_str(), script.as_os_str(), std::ffi::OsStr::new("parent")])
        .run();
    run.assert_code(0);
    let trace = run.trace();
    trace.assert_clean();
    let pids: Vec<u32> = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("pids "))
        .unwrap_or_else(|| panic!("the script printed no pids; stdout:\n{}", run.stdout))
        .split(' ')
        .map(|p| p.parse().expect("pid"))
        .collect();
    let (wide, narrow, again) = (pids[0], pids[1], pids[2]);

    // Calls per process and thread, exact.
    let mut threads: BTreeMap<u32, BTreeMap<u32, u64>> = BTreeMap::new();
    for c in trace.named("work") {
        *threads.entry(c.pid).or_default().entry(c.tid).or_default() += 1;
    }
    for (pid, n) in [(wide, 21), (narrow, 8), (again, 21)] {
        let per_thread = &threads[&pid];
        assert_eq!(per_thread.len(), n, "pid {pid}: threads that made calls");
        assert!(per_thread.values().all(|&c| c == CALLS), "pid {pid}: calls per thread {per_thread:?}");
    }
    assert_eq!(threads.len(), 3, "processes with calls: {:?}", threads.keys());

    let counter = |name: &str| trace.counter(name);
    eprintln!(
        "cpu_coarse {}, cpu_slots_process_full {}, cpu_slots_full {}, slots taken {} returned {}, \
         processes tallied {} forgotten {}",
        counter("cpu_coarse"),
        counter("cpu_slots_process_full"),
        counter("cpu_slots_full"),
        counter("cpu_slots_taken"),
        counter("cpu_slots_returned"),
        counter("cpu_slot_processes"),
        counter("cpu_slot_processes_gone"),
    );
    // Each wide process: 13 threads past the share; their every record
    // (an entry and a return per call) is coarse and tries a slot, as
    // did their creation. The narrow one: nothing coarse.
    let past = 2 * (21 - SHARE);
    assert_eq!(counter("cpu_coarse"), past * 2 * CALLS, "records without a slot");
    assert_eq!(counter("cpu_slots_process_full"), past * (1 + 2 * CALLS), "attempts past the share");
    assert_eq!(counter("cpu_slots_full"), 0, "the node's slots were never all taken");
    // 8 slots to each of the three: the third got its full share after the
    // first exited; and one to the launched parent's main thread, at its
    // exec stop. Every slot came back and every tally was forgotten.
    assert_eq!(counter("cpu_slots_taken"), 3 * SHARE + 1, "slots handed out");
    assert_eq!(counter("cpu_slots_returned"), 3 * SHARE + 1, "slots given back at the threads' exits");
    assert_eq!(counter("cpu_slot_processes"), 4, "processes tallied");
    assert_eq!(counter("cpu_slot_processes_gone"), 4, "tallies forgotten at the processes' ends");
}

/// A thread other than the main one execs: the kernel gives it the
/// process's pid (its old tid goes), so the slot under its old tid is given
/// back at the exec and the thread takes one under its new tid: at the end
/// every slot taken was given back (without that, the old tid's slot stayed
/// charged until a thread of that tid exited: run so, 2 taken, 1
/// returned). The new image's 10 calls are made under the main thread's id
/// (lifecycle.rs's `an_exec_from_a_thread_other_than_the_main_one_is_traced_after_it`).
#[test]
fn an_exec_from_a_thread_gives_its_old_tids_slot_back() {
    require_root();
    let dir = TestDir::new("cpu-slot-exec");
    let script = dir.script("exec.py", EXEC_FROM_A_THREAD);
    let run = Pftraced::new(&dir, &["work"])
        .launch(&[python().as_os_str(), script.as_os_str(), std::ffi::OsStr::new("parent")])
        .run();
    run.assert_code(0);
    let trace = run.trace();
    trace.assert_clean();
    let line = run.stdout.lines().find_map(|l| l.strip_prefix("after ")).expect("the exec'd image's line");
    let (pid, tid) = line.split_once(' ').expect("pid tid");
    let (pid, tid): (u32, u32) = (pid.parse().unwrap(), tid.parse().unwrap());
    assert_eq!(pid, tid, "after the exec the thread is the process's main thread");
    let mut per_thread: BTreeMap<u32, u64> = BTreeMap::new();
    for c in trace.named("work") {
        assert_eq!(c.pid, pid, "a call of another process: {c:?}");
        *per_thread.entry(c.tid).or_default() += 1;
    }
    assert_eq!(per_thread.len(), 2, "the main thread and the one that exec'd: {per_thread:?}");
    assert_eq!(per_thread.get(&pid), Some(&20), "10 before the exec, 10 after: {per_thread:?}");
    assert_eq!(per_thread.values().sum::<u64>(), 30, "and the thread's 10: {per_thread:?}");
    let counter = |name: &str| trace.counter(name);
    eprintln!(
        "cpu_coarse {}, slots taken {} returned {}, processes tallied {} forgotten {}",
        counter("cpu_coarse"),
        counter("cpu_slots_taken"),
        counter("cpu_slots_returned"),
        counter("cpu_slot_processes"),
        counter("cpu_slot_processes_gone"),
    );
    // The launched parent's main thread (at its exec stop); the child's
    // main thread (at its fork), its thread (at its creation), that
    // thread again under its new tid (at the exec).
    assert_eq!(counter("cpu_slots_taken"), 4, "slots handed out");
    assert_eq!(
        counter("cpu_slots_returned"),
        4,
        "the parent's, the old leader's at its exit, the old tid's at the exec, the last"
    );
    assert_eq!((counter("cpu_slot_processes"), counter("cpu_slot_processes_gone")), (2, 2));
    assert_eq!(counter("cpu_slots_full") + counter("cpu_slots_process_full"), 0);
}
