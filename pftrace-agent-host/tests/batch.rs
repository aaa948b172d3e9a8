//! The batched agent road's raw records (issue 12, pftrace-agent/README.md
//! "Batched road in pftraced"): real CPythons (3.12.1, 3.15.2) with the
//! agent buffering each event of a traced call (entry, return) per thread
//! and the kernel draining them (the thread's own drain report by the
//! syscall road, its switch-out, its exit). Every traced call's two events
//! arrive exactly once, in the thread's order (clock and CPU never go
//! back), with the pid and tid of the thread that made them, and nothing is
//! counted lost: at a clean interpreter exit, when another thread calls
//! os._exit while this one holds records, at a SIGKILL, at an execve, and
//! in a forked child (which must not send its parent's buffered events
//! again).

mod common;

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use pftrace_agent::protocol::Report;
use pftrace_agent_host::{
    batch,
    install::{self, Installed},
    kernel::{AgentKernel, LoadOptions, Ring},
    server::AgentServer,
};
use pftrace_common::{AgentEvent, AgentNamedEvent, BatchRecord, KIND_OFFSET, agent, batch as b, kind};

fn interpreters_batched() -> Vec<(&'static str, PathBuf)> {
    interpreters().into_iter().filter(|(l, _)| *l == "pyenv-3.12.1" || *l == "debian-3.15").collect()
}

struct Side {
    _tmp: TempDir,
    installed: Installed,
    server: AgentServer,
    k: AgentKernel,
    ring: Ring,
}

fn side(switch_drain: bool, exec_drain: bool) -> Side {
    require_root();
    let tmp = TempDir::new("batch");
    let installed = install::install(agent_so(), &tmp.0.join("agent"), &tmp.0.join("agent.sock")).unwrap();
    let server = AgentServer::bind(&installed.socket).unwrap();
    let mut k = AgentKernel::load(LoadOptions { one_call: true, batch: true, ..Default::default() })
        .expect("loading the eBPF object (root, BPF)");
    k.attach_syscall_btf().expect("tp_btf on sys_enter");
    k.attach_cpu_slots().expect("tp_btf on sched_switch (CPU slots)");
    k.attach_batch_exit().expect("sched_process_exit drain");
    if exec_drain {
        k.attach_batch_exec().expect("tp_btf on sys_enter (execve drain)");
    }
    if switch_drain {
        k.attach_batch_switch().expect("tp_btf on sched_switch (switch-out drain)");
    }
    let ring = k.take_ring().unwrap();
    Side { _tmp: tmp, installed, server, k, ring }
}

/// What arrived for one thread.
#[derive(Default, Debug)]
struct Thread {
    /// Two-report road records (a code object's first call: its strings).
    reports: usize,
    /// Batched events, in arrival order.
    events: Vec<BatchRecord>,
}

/// What one run of the workload gave.
struct Run {
    /// Per (pid, tid): what arrived.
    threads: BTreeMap<(u32, u32), Thread>,
    /// Code serial -> name (from the records with strings).
    names: BTreeMap<u64, String>,
    /// The script's thread ids, main first.
    tids: Vec<u32>,
    /// The forked child's pid.
    forked: Option<u32>,
}

/// Runs the workload and collects what arrived.
fn run(s: &mut Side, python: &Path, mode: &str) -> Run {
    const CHILD_FD: i32 = 100;
    let slots = s.k.slots_fd().unwrap().as_raw_fd();
    let mut cmd = Command::new(python);
    cmd.arg(scripts_dir().join("batch_workload.py"))
        .arg(&s.installed.socket)
        .arg(mode)
        .env("PFTRACE_AGENT_DIR", &s.installed.dir)
        .env("PFTRACE_AGENT_ONE_CALL", "1")
        .env("PFTRACE_AGENT_SLOT_FD", CHILD_FD.to_string())
        .env("PFTRACE_AGENT_BATCH", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: dup2 is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(slots, CHILD_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let mut child = cmd.spawn().unwrap();
    let pid = child.id();
    let mut conn = s.server.accept(Duration::from_secs(20)).expect("the agent did not connect");
    assert_eq!(conn.pid, pid, "SO_PEERCRED pid");
    s.k.track(pid).unwrap();
    conn.configure(Report::Syscall(s.k.token), &["traced".to_string(), "rec".to_string()]).unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut stdin = child.stdin.take().unwrap();
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let tids: Vec<u32> = match line.strip_prefix("TIDS ") {
        Some(rest) => rest.split_whitespace().map(|t| t.parse().unwrap()).collect(),
        None => panic!("{mode}: expected TIDS, got {line:?}"),
    };
    // The prototype's registration of CPU slots (one function, see batch::give_slots).
    batch::give_slots(&mut s.k, &tids, 0).unwrap();
    writeln!(stdin, "go").unwrap();
    let mut forked = None;
    if mode == "fork" {
        line.clear();
        out.read_line(&mut line).unwrap();
        let c: u32 = line.strip_prefix("CHILD ").and_then(|p| p.trim().parse().ok()).expect("CHILD pid");
        s.k.track(c).unwrap();
        batch::give_slots(&mut s.k, &[c], tids.len() as u32).unwrap();
        writeln!(stdin, "go").unwrap();
        forked = Some(c);
    }
    if mode == "kill" {
        line.clear();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "HOLD", "{mode}");
        // SAFETY: a signal to our own child.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    }
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let st = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    if mode == "kill" {
        use std::os::unix::process::ExitStatusExt as _;
        assert_eq!(st.signal(), Some(libc::SIGKILL), "{mode}: {st}; stderr {err}");
    } else {
        assert!(st.success(), "{mode}: exit {st}; stdout {rest:?}; stderr {err}");
    }
    if mode != "os_exit" && mode != "kill" {
        assert_eq!(rest.trim(), "DONE", "{mode}: stderr {err}");
    }
    let mut by_thread: BTreeMap<(u32, u32), Thread> = BTreeMap::new();
    let mut names = BTreeMap::new();
    let mut quiet = Instant::now();
    while quiet.elapsed() < Duration::from_millis(300) {
        s.ring.drain_raw(|item| {
            quiet = Instant::now();
            if item.len() < size_of::<AgentEvent>() || item[KIND_OFFSET] != kind::AGENT {
                return;
            }
            if let Some(bt) = batch::decode(item) {
                let t = by_thread.entry((bt.head.pid, bt.head.tid)).or_default();
                t.events.extend_from_slice(&bt.events);
                return;
            }
            let ev: AgentEvent = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const AgentEvent) };
            if ev.flags & agent::flag::STRINGS != 0 && item.len() >= size_of::<AgentNamedEvent>() {
                let at = std::mem::offset_of!(AgentNamedEvent, name);
                let raw = &item[at..at + pftrace_common::NAME_LEN];
                let name =
                    String::from_utf8_lossy(&raw[..raw.iter().position(|&c| c == 0).unwrap_or(raw.len())]);
                names.insert(ev.code, name.into_owned());
            }
            by_thread.entry((ev.pid, ev.tid)).or_default().reports += 1;
        });
        std::thread::sleep(Duration::from_millis(10));
    }
    batch::take_slots(&mut s.k, &tids).unwrap();
    if let Some(c) = forked {
        batch::take_slots(&mut s.k, &[c]).unwrap();
        s.k.untrack(c).unwrap();
    }
    s.k.untrack(pid).unwrap();
    Run { threads: by_thread, names, tids, forked }
}

/// The calls per worker thread (the script's PER_THREAD) and the main thread's.
const PER_THREAD: [usize; 3] = [100, 257, 1000];
const MAIN_CALLS: usize = 20;

fn check(label: &str, mode: &str, s: &mut Side, python: &Path) -> [u64; b::counter::COUNT as usize] {
    let Run { threads, names, tids, forked } = run(s, python, mode);
    let pid = tids[0];
    let name = |code: u64| names.get(&code).cloned().unwrap_or_else(|| format!("<code {code}>"));
    // Main: traced(0) and rec(1) went the two-report road (their entries'
    // strings; their returns found no slot yet: the test gives it after).
    let main =
        threads.get(&(pid, pid)).unwrap_or_else(|| panic!("{label} {mode}: nothing from the main thread"));
    assert_eq!(main.reports, 4, "{label} {mode}: the first calls' two reports each");
    let main_calls = MAIN_CALLS + if mode == "fork" { 3 } else { 0 };
    assert_eq!(main.events.len(), 2 * main_calls, "{label} {mode}: the main thread's batched events");
    for (i, (&n, &tid)) in PER_THREAD.iter().zip(&tids[1..]).enumerate() {
        let t = threads.get(&(pid, tid)).unwrap_or_else(|| panic!("{label} {mode}: nothing from worker {i}"));
        assert_eq!(t.reports, 0, "{label} {mode}: worker {i} sent no two-report events");
        assert_eq!(
            t.events.len(),
            2 * (n + 5),
            "{label} {mode}: worker {i} (tid {tid}): {n} traced + 5 rec, entry and return once each"
        );
        let traced = t.events.iter().filter(|c| name(c.code) == "traced" && c.event == agent::START).count();
        assert_eq!(traced, n, "{label} {mode}: worker {i}'s traced calls");
        // rec(5): five entries, then five returns, in the thread's order.
        let rec: Vec<u8> = t.events.iter().filter(|c| name(c.code) == "rec").map(|c| c.event).collect();
        let want: Vec<u8> = [agent::START; 5].into_iter().chain([agent::RETURN; 5]).collect();
        assert_eq!(rec, want, "{label} {mode}: worker {i}'s rec(5) nesting");
    }
    let mut expected: Vec<(u32, u32)> = tids.iter().map(|&t| (pid, t)).collect();
    if let Some(c) = forked {
        // The child: its own 7 calls (the first entry with strings again: a
        // new session), none of its parent's buffered ones.
        let t = threads.get(&(c, c)).unwrap_or_else(|| panic!("{label} {mode}: nothing from the child"));
        assert_eq!((t.reports, t.events.len()), (1, 13), "{label} {mode}: the child's events, once");
        expected.push((c, c));
    }
    let mut seen: Vec<(u32, u32)> = threads.keys().copied().collect();
    expected.sort();
    seen.sort();
    assert_eq!(
        seen, expected,
        "{label} {mode}: records only from the script's threads, pid/tid from the kernel"
    );
    for (k, t) in &threads {
        // Traced calls here never nest but rec's: entries and returns
        // alternate per code object as the thread made them, and clock and
        // CPU never go back (one thread's events keep its order on the ring).
        for w in t.events.windows(2) {
            assert!(
                w[1].ts_ns >= w[0].ts_ns && w[1].cpu_ns >= w[0].cpu_ns,
                "{label} {mode} {k:?}: events out of order: {w:?}"
            );
        }
        for c in &t.events {
            assert!(
                c.event == agent::START || c.event == agent::RETURN,
                "{label} {mode} {k:?}: events: {c:?}"
            );
            assert!(c.ts_ns > 0 && c.cpu_ns > 0, "{label} {mode} {k:?}: clock and CPU measured: {c:?}");
        }
    }
    let c = s.k.batch_counters().unwrap();
    for (what, i) in [
        ("lost", b::counter::LOST),
        ("overrun", b::counter::OVERRUN),
        ("unread", b::counter::UNREAD),
        ("exit_unread", b::counter::EXIT_UNREAD),
        ("unknown", b::counter::UNKNOWN),
    ] {
        assert_eq!(c[i as usize], 0, "{label} {mode}: {what} ({})", batch::counters_text(&c));
    }
    let all: usize = threads.values().map(|t| t.events.len()).sum();
    assert_eq!(c[b::counter::RECORDS as usize] as usize, all, "{label} {mode}: records the kernel counted");
    eprintln!("{label} {mode}: {all} batched events; {}", batch::counters_text(&c));
    c
}

#[test]
fn clean_exit_every_call_once_through_drain_reports_and_exit_drains() {
    let _g = serial();
    for (label, python) in interpreters_batched() {
        let mut s = side(false, false);
        let c = check(label, "clean", &mut s, &python);
        assert_eq!(c[b::counter::BY_SWITCH as usize], 0);
        // The main thread's last calls (fewer than a buffer) and each
        // worker's last ones reach the ring only by their thread's exit.
        assert!(c[b::counter::BY_EXIT as usize] >= 4, "{label}: {}", batch::counters_text(&c));
    }
}

#[test]
fn os_exit_from_another_thread_drains_the_threads_it_kills() {
    let _g = serial();
    for (label, python) in interpreters_batched() {
        let mut s = side(false, false);
        let c = check(label, "os_exit", &mut s, &python);
        assert!(c[b::counter::BY_EXIT as usize] >= 2, "{label}: {}", batch::counters_text(&c));
    }
}

#[test]
fn a_forked_child_sends_only_its_own_calls_and_switch_outs_drain() {
    let _g = serial();
    for (label, python) in interpreters_batched() {
        let mut s = side(true, false);
        let c = check(label, "fork", &mut s, &python);
        assert!(c[b::counter::BY_SWITCH as usize] > 0, "{label}: {}", batch::counters_text(&c));
    }
}

#[test]
fn a_sigkill_drains_every_thread_at_its_exit() {
    let _g = serial();
    for (label, python) in interpreters_batched() {
        let mut s = side(false, false);
        let c = check(label, "kill", &mut s, &python);
        assert!(c[b::counter::BY_EXIT as usize] >= 2, "{label}: {}", batch::counters_text(&c));
    }
}

#[test]
fn an_execve_drains_the_calls_its_thread_still_holds() {
    let _g = serial();
    for (label, python) in interpreters_batched() {
        let mut s = side(false, true);
        let c = check(label, "exec", &mut s, &python);
        assert_eq!(c[b::counter::BY_EXEC as usize], 1, "{label}: {}", batch::counters_text(&c));
    }
}
