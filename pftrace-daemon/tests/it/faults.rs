//! Reliability under faults ("Reliability and security"):
//!
//! 1. pftraced killed with SIGKILL leaves in the traced process only the +1
//!    it raised on the probe semaphores (the probe instructions are back to
//!    the ELF's `nop`: no uprobe), which the next pftraced to start lowers
//!    (src/ledger.rs), nothing in the kernel (every BPF program, map and
//!    link it held is freed: nothing pinned), and a restarted daemon
//!    replaces the stale control socket and serves again.
//! 2. A burst that overflows a 4 KiB ring buffer is counted (`lost`) in the
//!    trace, the summary and `pftracectl status`, and every matched probe
//!    hit is accounted for: delivered or lost.
//! 3. A process traced by pid and killed inside a traced call gets that call
//!    closed as incomplete at the kill; one that exits normally has none.
//! 4. Children: see children.rs.
//! 5. A full output directory: write errors are reported, tracing goes on in
//!    memory, the daemon keeps serving, and writing resumes once there is room.
//!
//! The tests of this file run one at a time (they measure timing, coverage
//! and memory on a small machine).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{ErrorKind, Write as _},
    os::unix::{
        fs::{FileExt as _, FileTypeExt as _, MetadataExt as _},
        net::UnixStream,
        process::ExitStatusExt as _,
    },
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use crate::common::*;
use serde_json::Value;

fn start_worker(dir: &TestDir) -> Worker {
    WorkerSpec::new(&python(), &worker_script(dir)).start("worker")
}

// ---------------------------------------------------------------------------
// pftracectl

// ---------------------------------------------------------------------------
// The probe sites as the traced process sees them (/proc/PID/mem)

/// Where `file_offset` of `binary` is in `pid`: in the mapping of that file
/// whose file range holds it (`want` picks the writable mapping for a
/// semaphore, the executable one for an instruction).
fn address_of(pid: u32, binary: &Path, file_offset: u64, want: char) -> u64 {
    let ino = fs::metadata(binary).unwrap().ino();
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    for line in maps.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 || f[4].parse::<u64>().ok() != Some(ino) || !f[1].contains(want) {
            continue;
        }
        let (start, end) = f[0].split_once('-').unwrap();
        let start = u64::from_str_radix(start, 16).unwrap();
        let end = u64::from_str_radix(end, 16).unwrap();
        let offset = u64::from_str_radix(f[2], 16).unwrap();
        if (offset..offset + (end - start)).contains(&file_offset) {
            return start + (file_offset - offset);
        }
    }
    panic!(
        "no {want} mapping of {} in pid {pid} holds file offset {file_offset:#x}:\n{maps}",
        binary.display()
    )
}

/// What the traced process has at its two probe sites.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SiteState {
    entry_semaphore: u16,
    return_semaphore: u16,
    entry_insn: u8,
    return_insn: u8,
}

/// CPython's function__entry / function__return sites of one interpreter binary.
struct Sites {
    binary: PathBuf,
    entry: pftrace::usdt::ProbeSite,
    ret: pftrace::usdt::ProbeSite,
}

impl Sites {
    fn of(binary: &Path) -> Self {
        let sites = pftrace::usdt::read_python_function_probes(binary).unwrap();
        let one = |name: &str| {
            let found: Vec<_> = sites.iter().filter(|s| s.name == name).collect();
            assert_eq!(found.len(), 1, "{name} sites of {}: {found:?}", binary.display());
            assert_ne!(found[0].semaphore_offset, 0, "{name} has no semaphore");
            found[0].clone()
        };
        Self { binary: binary.into(), entry: one("function__entry"), ret: one("function__return") }
    }

    /// The instruction bytes at the probe sites in the ELF file.
    fn in_file(&self) -> (u8, u8) {
        let f = fs::File::open(&self.binary).unwrap();
        let byte = |at: u64| {
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, at).unwrap();
            b[0]
        };
        (byte(self.entry.pc_offset), byte(self.ret.pc_offset))
    }

    fn read(&self, pid: u32) -> SiteState {
        let mem = fs::File::open(format!("/proc/{pid}/mem")).unwrap();
        let read = |offset: u64, want: char, buf: &mut [u8]| {
            let addr = address_of(pid, &self.binary, offset, want);
            mem.read_exact_at(buf, addr).unwrap_or_else(|e| panic!("reading pid {pid} at {addr:#x}: {e}"));
        };
        let sem = |offset| {
            let mut b = [0u8; 2];
            read(offset, 'w', &mut b);
            u16::from_ne_bytes(b)
        };
        let insn = |offset| {
            let mut b = [0u8; 1];
            read(offset, 'x', &mut b);
            b[0]
        };
        SiteState {
            entry_semaphore: sem(self.entry.semaphore_offset),
            return_semaphore: sem(self.ret.semaphore_offset),
            entry_insn: insn(self.entry.pc_offset),
            return_insn: insn(self.ret.pc_offset),
        }
    }
}

// ---------------------------------------------------------------------------
// BPF objects held by a process

#[derive(Debug, Default)]
struct BpfIds {
    progs: BTreeSet<u32>,
    maps: BTreeSet<u32>,
    links: BTreeSet<u32>,
}

/// The ids of the BPF programs, maps and links `pid` holds fds of.
fn bpf_ids(pid: u32) -> BpfIds {
    let mut ids = BpfIds::default();
    for e in fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap().flatten() {
        let Ok(info) = fs::read_to_string(e.path()) else { continue };
        for line in info.lines() {
            let mut it = line.split(':');
            let (Some(k), Some(v)) = (it.next(), it.next()) else { continue };
            let Ok(id) = v.trim().parse::<u32>() else { continue };
            match k {
                "prog_id" => ids.progs.insert(id),
                "map_id" => ids.maps.insert(id),
                "link_id" => ids.links.insert(id),
                _ => false,
            };
        }
    }
    ids
}

/// Waits (the kernel frees programs and maps after an RCU grace period)
/// until none of `ids` exists; panics naming the survivors after 10 s.
fn assert_bpf_freed(ids: &BpfIds, when: &str) -> Duration {
    let t0 = Instant::now();
    loop {
        let alive: Vec<String> = ids
            .progs
            .iter()
            .filter(|&&id| bpf_object_exists(BPF_PROG_GET_FD_BY_ID, id))
            .map(|id| format!("prog {id}"))
            .chain(
                ids.maps
                    .iter()
                    .filter(|&&id| bpf_object_exists(BPF_MAP_GET_FD_BY_ID, id))
                    .map(|id| format!("map {id}")),
            )
            .chain(
                ids.links
                    .iter()
                    .filter(|&&id| bpf_object_exists(BPF_LINK_GET_FD_BY_ID, id))
                    .map(|id| format!("link {id}")),
            )
            .collect();
        if alive.is_empty() {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{when}: BPF objects of pftraced still exist 10 s after it ended (pinned or leaked): {alive:?}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------
// 1. SIGKILL

#[test]
fn sigkill_of_pftraced_leaves_its_semaphores_which_a_restart_lowers_and_replaces_the_stale_socket() {
    let _serial = serial();
    let dir = TestDir::new("fault-kill9");
    // A copy of its own: pftraced's probes are host-wide links on the
    // interpreter file (int3 in every process mapping it), and other tests'
    // daemons on the shared file would show theirs in this worker.
    let py = private_python(&dir);
    let sites = Sites::of(&py);
    let (file_entry, file_return) = sites.in_file();
    assert_eq!((file_entry, file_return), (0x90, 0x90), "the probe sites in {} are not nops", py.display());

    let mut w = WorkerSpec::new(&py, &worker_script(&dir)).start("worker");
    let pid = w.pid();
    let untouched = SiteState {
        entry_semaphore: 0,
        return_semaphore: 0,
        entry_insn: file_entry,
        return_insn: file_return,
    };
    assert_eq!(sites.read(pid), untouched, "before any daemon (other pftraced: {})", other_daemons(&[]));

    let (socket, tracer) = serve_on(&dir, &["foo"], pid, &[]);
    let daemon = tracer.pid();
    w.call("foo", 100);
    let st = wait_status(&socket, daemon, "100 calls", |s| s["calls_total"] == 100);
    assert_eq!(st["counters"]["entry_matched"], 100, "{st}");
    let traced = sites.read(pid);
    assert!(
        traced.entry_semaphore > 0 && traced.return_semaphore > 0,
        "traced, the semaphores read {traced:?}"
    );
    assert_eq!((traced.entry_insn, traced.return_insn), (0xcc, 0xcc), "traced, the probe sites are not int3");
    let ids = bpf_ids(daemon);
    assert!(!ids.progs.is_empty() && !ids.maps.is_empty() && !ids.links.is_empty(), "{ids:?}");
    let ctime = |m: &fs::Metadata| (m.ctime(), m.ctime_nsec());
    let stale = ctime(&fs::metadata(&socket).unwrap());

    kill(daemon, libc::SIGKILL);
    let killed = tracer.finish(); // reaps it
    assert_eq!(killed.status.signal(), Some(libc::SIGKILL), "{}", killed.stderr);
    let after = sites.read(pid);
    // Its uprobes went with it; its +1 stays until a pftraced starts (one
    // of another test may have started meanwhile and lowered it already).
    let left = SiteState { entry_semaphore: 1, return_semaphore: 1, ..untouched };
    assert!(
        after == left || after == untouched,
        "right after pftraced was killed and reaped, pid {pid} reads {after:?}, neither its +1 left nor \
         untouched (traced: {traced:?}; other pftraced: {})",
        other_daemons(&[])
    );
    let freed_in = assert_bpf_freed(&ids, "after SIGKILL");
    // The process runs on, unharmed, at full speed: no probe is hit any more.
    w.call("foo", 1000);
    assert!(!exited(pid));

    // The socket file stays (nobody removed it); nothing listens on it.
    let meta = fs::symlink_metadata(&socket).expect("the killed daemon's socket file");
    assert!(meta.file_type().is_socket());
    let refused = UnixStream::connect(&socket).expect_err("connecting to a dead daemon's socket");
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused, "{refused}");
    let out = ctl(&socket, &["status"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!(
            "pftracectl: error: {} exists but no pftraced is listening (a stale socket left by a daemon \
             that died); restart pftraced, which replaces it\n",
            socket.display()
        )
    );

    // A new daemon on the same socket replaces it and serves.
    let tracer = Pftraced::new(&dir, &["foo"]).pid(pid).arg("--socket").arg(&socket).spawn();
    let daemon2 = tracer.pid();
    tracer.wait_attached(pid);
    let st = wait_status(&socket, daemon2, "the restarted daemon to serve", |_| true);
    assert_eq!(st["daemon_pid"], daemon2);
    // A new socket file (the inode number may be reused, its change time is not).
    assert!(ctime(&fs::metadata(&socket).unwrap()) > stale, "the stale socket was not replaced");
    let human = ctl_ok(&socket, &["status"]);
    assert!(
        human.starts_with(&format!("pftraced {} (pid {daemon2}), up ", env!("CARGO_PKG_VERSION"))),
        "{human}"
    );
    w.call("foo", 100);
    let st = wait_status(&socket, daemon2, "100 calls", |s| s["calls_total"] == 100);
    assert_eq!(st["counters"]["entry_matched"], 100, "only the new daemon's calls: {st}");
    // The killed daemon's +1 was lowered at the restart (or before it), so
    // the new one's +1 is all there is; and none after a clean stop.
    let retraced = sites.read(pid);
    assert_eq!(retraced, traced, "traced again");
    let ids2 = bpf_ids(daemon2);
    let run = stop(&socket, tracer);
    let trace = run.trace();
    trace.assert_clean();
    assert_eq!(trace.named("foo").len(), 100);
    assert_eq!(sites.read(pid), untouched, "after a clean stop");
    assert_bpf_freed(&ids2, "after stop");

    w.send_line("call foo 10");
    w.expect_line("done");
    let (status, _) = w.wait(WAIT);
    assert!(status.success(), "worker: {status}");
    eprintln!(
        "MEASURED kill -9: semaphores (entry, return) before {:?} traced {:?} after {:?}; insn before \
         {:#04x}/{:#04x} traced {:#04x}/{:#04x} after {:#04x}/{:#04x}; {} progs {} maps {} links freed \
         {:?} after reaping",
        (untouched.entry_semaphore, untouched.return_semaphore),
        (traced.entry_semaphore, traced.return_semaphore),
        (after.entry_semaphore, after.return_semaphore),
        untouched.entry_insn,
        untouched.return_insn,
        traced.entry_insn,
        traced.return_insn,
        after.entry_insn,
        after.return_insn,
        ids.progs.len(),
        ids.maps.len(),
        ids.links.len(),
        freed_in
    );
}

// ---------------------------------------------------------------------------
// 2. Ring-buffer overflow

#[test]
fn ring_buffer_overflow_is_counted_in_trace_summary_and_status_and_every_hit_is_accounted_for() {
    let _serial = serial();
    const CALLS: u64 = 200_000;
    let dir = TestDir::new("fault-lost");
    let mut w = start_worker(&dir);
    let pid = w.pid();
    let (socket, tracer) = serve_on(&dir, &["f"], pid, &["--ring-buffer-size", "4096"]);
    w.call("f", CALLS);

    // Serving: the kernel's counters are final once the loop is done.
    let st = status(&socket);
    let c = &st["counters"];
    let lost = c["lost"].as_u64().unwrap();
    assert_eq!(c["entry_matched"], CALLS, "{st}");
    assert_eq!(c["return_matched"], CALLS, "{st}");
    assert_eq!(c["read_errors"], 0, "{st}");
    assert!(lost > 0, "200k calls into a 4 KiB ring lost nothing? {st}");
    assert!(lost < 2 * CALLS, "nothing delivered at all: {st}");
    let human = ctl_ok(&socket, &["status"]);
    let want = format!(
        "LOST:      {lost} call records and 0 process start/exit reports (the ring buffer was full); raise \
         limits.ring_buffer_bytes in pftraced.toml"
    );
    assert!(human.lines().any(|l| l == want), "status lacks {want:?}:\n{human}");

    let (status, _) = w.wait(WAIT);
    assert!(status.success());
    let run = tracer.finish(); // its only target exited
    run.assert_code(0);
    let trace = run.trace();
    assert_eq!(trace.counter("lost"), lost, "the trace and status disagree");
    assert_eq!(trace.counter("entry_matched"), CALLS);
    assert_eq!(trace.counter("return_matched"), CALLS);
    assert_eq!(trace.counter("read_errors"), 0);
    assert_eq!(trace.pftrace()["bad_records"], 0);
    let summary = format!(
        "probes: {} entries and {} returns seen, {CALLS} + {CALLS} matched; lost records: {lost}; read errors: 0",
        trace.counter("entry_seen"),
        trace.counter("return_seen")
    );
    assert!(run.stderr.lines().any(|l| l == summary), "summary lacks {summary:?}:\n{}", run.stderr);

    // Every matched hit was delivered or counted lost. Each call in the trace
    // is one delivered entry; a returned one also one delivered return; a
    // return whose entry was lost is listed as unmatched.
    let calls = trace.calls.len() as u64;
    let incomplete = trace.incomplete_calls();
    let unmatched = trace.unmatched_returns().len() as u64;
    assert!(trace.calls.iter().all(|c| c.name == "f" && c.pid == pid));
    // A return whose entry was lost is read and named, not sent unread as
    // the close of an entry the kernel took for sent (depth.rs): until
    // 2026-11-28 a lost entry kept its "sent" bit and its return came as
    // "<name not read: return without entry>".
    assert!(
        trace.unmatched_returns().iter().all(|r| r["name"] == "f"),
        "unmatched returns not named f: {:?}",
        trace.unmatched_returns()
    );
    let entries_delivered = calls;
    let returns_delivered = calls - incomplete + unmatched;
    assert_eq!(
        entries_delivered + returns_delivered + lost,
        2 * CALLS,
        "delivered {entries_delivered} entries + {returns_delivered} returns + {lost} lost != {} matched \
         (calls {calls}, incomplete {incomplete}, unmatched returns {unmatched})",
        2 * CALLS
    );
    eprintln!(
        "MEASURED ring 4096 B, {CALLS} calls: lost {lost} of {} records ({:.1}%); trace: {calls} calls, \
         {incomplete} incomplete, {unmatched} unmatched returns, skipped entries {}",
        2 * CALLS,
        lost as f64 * 100.0 / (2 * CALLS) as f64,
        trace.pftrace()["skipped_entries"]
    );
}

// ---------------------------------------------------------------------------
// 3. Killed mid-call (--pid)

#[test]
fn pid_mode_process_killed_inside_a_traced_call_gets_it_closed_incomplete_at_the_kill() {
    let _serial = serial();
    let dir = TestDir::new("fault-midcall");
    let mut w = start_worker(&dir);
    let pid = w.pid();
    let tracer = Pftraced::new(&dir, &["slow", "quick"]).pid(pid).spawn();
    tracer.wait_attached(pid);
    w.send_line("slow 60");
    w.expect_line("inside");
    thread::sleep(Duration::from_millis(300));
    let before_kill = wall_us_now();
    kill(pid, libc::SIGKILL);
    let (status, _) = w.wait(WAIT);
    let after_reap = wall_us_now();
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    let run = tracer.finish();
    run.assert_code(0);
    let trace = run.trace();
    assert_eq!(trace.named("quick").len(), 5);
    assert!(trace.named("quick").iter().all(|c| !c.incomplete));
    let slow = trace.named("slow");
    assert_eq!(slow.len(), 1, "{slow:?}");
    let slow = slow[0];
    assert!(slow.incomplete, "slow never returned: {slow:?}");
    assert_eq!(trace.incomplete_calls(), 1);
    assert_eq!((trace.counter("entry_matched"), trace.counter("return_matched")), (6, 5));
    // The five quick returns were decided in the kernel (depth.rs: their
    // entries seen to match) and sent unread; slow's open level died with
    // the process.
    assert_eq!(trace.counter("returns_known"), 5, "{}", trace.pftrace());
    assert_eq!(trace.counter("lost"), 0);
    assert!(trace.unmatched_returns().is_empty());
    let end_us = (slow.ts_ns + slow.dur_ns) as f64 / 1000.0;
    // Closed when the daemon saw the exit: after the kill, and before the
    // test had even reaped the process plus a little scheduling slack.
    assert!(
        end_us >= before_kill - 1.0 && end_us <= after_reap + 50_000.0,
        "slow was closed at {end_us} µs, the kill was at {before_kill}..{after_reap} µs"
    );
    assert!(slow.dur >= 300_000.0, "slow lasted {} µs", slow.dur);
    assert!(
        run.stderr.lines().any(|l| l.split_whitespace().take(2).eq(["__main__.slow", "1(1!)"])),
        "summary does not mark slow incomplete:\n{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("incomplete calls (no return seen; marked (N!) above): 1;"),
        "{}",
        run.stderr
    );
    eprintln!(
        "MEASURED killed mid-call: slow closed {:.1} ms after the kill signal was sent",
        (end_us - before_kill) / 1000.0
    );
}

#[test]
fn pid_mode_process_that_exits_normally_has_no_incomplete_call() {
    let _serial = serial();
    let dir = TestDir::new("fault-normal-exit");
    let mut w = start_worker(&dir);
    let pid = w.pid();
    let tracer = Pftraced::new(&dir, &["slow", "quick"]).pid(pid).spawn();
    tracer.wait_attached(pid);
    w.send_line("slow 0.2");
    w.expect_line("inside");
    w.expect_line("done");
    let (status, _) = w.wait(WAIT);
    assert!(status.success());
    let run = tracer.finish();
    run.assert_code(0);
    let trace = run.trace();
    trace.assert_clean();
    assert_eq!(trace.named("quick").len(), 5);
    let slow = trace.named("slow");
    assert_eq!(slow.len(), 1);
    assert!(!slow[0].incomplete && slow[0].dur >= 200_000.0, "{:?}", slow[0]);
    assert!(!run.stderr.contains("incomplete calls"), "{}", run.stderr);
}

// ---------------------------------------------------------------------------
// 5. Output directory full

/// Fills the file system holding `path` by writing to it until ENOSPC.
fn fill(path: &Path) -> u64 {
    let mut f = fs::File::create(path).unwrap();
    let chunk = vec![b'x'; 4096];
    let mut n = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(k) => n += k as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    let _ = f.sync_all();
    n
}

/// The calls in one rolling file (a JSON array, possibly unterminated).
fn rolling_calls(path: &Path) -> usize {
    let text = fs::read_to_string(path).unwrap();
    let t = text.trim_end();
    let whole = if t.ends_with(']') { t.to_string() } else { format!("{t}\n]") };
    let v: Value = serde_json::from_str(&whole)
        .unwrap_or_else(|e| panic!("{} is not a (prefix of a) JSON array: {e}\n{text}", path.display()));
    v.as_array().unwrap().iter().filter(|e| e["ph"] == "X").count()
}

#[test]
fn full_output_directory_is_reported_while_tracing_goes_on_in_memory() {
    let _serial = serial();
    let dir = TestDir::new("fault-full");
    let out_dir = dir.join("out");
    let mount = Tmpfs::mount(&out_dir, "256k");
    let mut w = start_worker(&dir);
    let pid = w.pid();
    let (socket, tracer) = serve_on(&dir, &["foo", "f"], pid, &["--output-dir", out_dir.to_str().unwrap()]);
    let daemon = tracer.pid();

    w.call("foo", 100);
    wait_status(&socket, daemon, "100 calls written", |s| s["output"]["calls_written"] == 100);

    let filler = out_dir.join("filler");
    let filled = fill(&filler);
    w.call("f", 3000);
    let st =
        wait_status(&socket, daemon, "a write error", |s| s["output"]["write_errors"].as_u64() > Some(0));
    let o = &st["output"];
    let error = o["last_error"].as_str().expect("last_error");
    assert!(
        error.starts_with("writing ") && error.ends_with(": No space left on device (os error 28)")
            || error.starts_with("cannot create trace file ") && error.contains("No space left on device"),
        "last_error: {error}"
    );
    assert!(error.contains(out_dir.to_str().unwrap()), "last_error names the file: {error}");
    assert!(o["calls_not_written"].as_u64() > Some(0), "{o}");
    assert_eq!(o["calls_written"], 100, "{o}");
    let human = ctl_ok(&socket, &["status"]);
    let line = human.lines().find(|l| l.starts_with("WRITE ERRORS: ")).unwrap_or_else(|| panic!("{human}"));
    assert!(line.ends_with(&format!("; last: {error}")), "{line}");

    // Tracing goes on in memory: dump has every call, and more calls still come.
    let counts =
        dump(&socket).counts().into_iter().map(|(k, v)| (k.to_string(), v)).collect::<BTreeMap<_, _>>();
    assert_eq!(counts, BTreeMap::from([("f".into(), 3000), ("foo".into(), 100)]));
    w.call("foo", 50);
    let st = wait_status(&socket, daemon, "150 foo calls in memory", |s| s["calls_total"] == 3150);
    assert_eq!(st["counters"]["lost"], 0);
    assert!(!exited(daemon));

    // Room again: after its retry pause the daemon writes a new file.
    fs::remove_file(&filler).unwrap();
    let errors = st["output"]["write_errors"].as_u64().unwrap();
    let t0 = Instant::now();
    let mut resumed = None;
    while t0.elapsed() < Duration::from_secs(15) {
        w.call("foo", 10);
        let s = status(&socket);
        if s["output"]["calls_written"].as_u64() > Some(100) {
            resumed = Some(s);
            break;
        }
        thread::sleep(Duration::from_millis(200));
    }
    let resumed = resumed.unwrap_or_else(|| panic!("no calls written within 15 s of freeing space"));
    assert_eq!(resumed["output"]["write_errors"].as_u64(), Some(errors), "new errors after freeing space");
    let run = stop(&socket, tracer);
    let trace = run.trace();
    trace.assert_clean();
    let mut files: Vec<PathBuf> = fs::read_dir(&out_dir).unwrap().flatten().map(|e| e.path()).collect();
    files.sort();
    let on_disk: usize = files.iter().map(|f| rolling_calls(f)).sum();
    let status_written = resumed["output"]["calls_written"].as_u64().unwrap() as usize;
    assert!(on_disk >= status_written, "{on_disk} calls in the files, status said {status_written} written");
    assert!(on_disk < trace.calls.len(), "the calls of the full-disk period are not in the files");
    let (ws, _) = w.wait(WAIT);
    assert!(ws.success());
    eprintln!(
        "MEASURED full output dir: filler {filled} B; last_error {error:?}; {} calls not written; \
         {on_disk} of {} calls in {} files; writing resumed {:.1} s after space was freed",
        resumed["output"]["calls_not_written"],
        trace.calls.len(),
        files.len(),
        t0.elapsed().as_secs_f64()
    );
    drop(mount);
}
