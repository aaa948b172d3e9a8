//! The agent's syscall road in the kernel (pftrace_common::agent::SYSCALL_NR
//! read by `pftrace_agent_syscall` on sys_enter), driven from this process:
//! a report carrying the loaded object's token from a tracked process is a
//! record with the kernel's pid and tid and the process's own strings; from
//! an untracked process it is refused and counted (agent_foreign); a bad
//! event is refused and counted (agent_bad); another object's token (the
//! agents of another pftraced on the host) is neither taken nor counted.

mod common;

use common::*;
use pftrace_agent_host::kernel::{AgentKernel, LoadOptions};
use pftrace_common::{agent, counter};

/// `n` reports (entry, return, entry, ...) of one code object through the
/// syscall, each answered -ENOSYS.
fn report(n: u64, token: u64, event_of: impl Fn(u64) -> u8) {
    // On the heap, so their pages are resident: the kernel's read of a
    // process's memory cannot fault a page in, and a literal's page of the
    // test binary's .rodata may never have been touched (CI's fresh build
    // read the name as "" once).
    let (name, file) = (c"victim".to_owned(), c"/srv/app.py".to_owned());
    let (name, file) = (name.as_ptr() as *const u8, file.as_ptr() as *const u8);
    for i in 0..n {
        let rc = pftrace_agent::report_syscall(event_of(i) as u64, name, file, 42, 0xc0de, token);
        assert_eq!(rc, -(libc::ENOSYS as i64), "the kernel's answer to the report syscall");
    }
}

fn alternating(i: u64) -> u8 {
    if i.is_multiple_of(2) { agent::START } else { agent::RETURN }
}

#[test]
fn syscall_reports_take_only_their_token_and_tracked_processes() {
    let _g = serial();
    require_root();
    let mut k = AgentKernel::load(LoadOptions::default()).expect("loading the eBPF object (root, BPF)");
    k.attach_syscall(false).unwrap();
    let mut ring = k.take_ring().unwrap();
    // Another pftraced's object on the same host, with its own token.
    let mut other = AgentKernel::load(LoadOptions::default()).unwrap();
    other.attach_syscall(false).unwrap();
    assert_ne!(k.token, other.token);
    let counters = |k: &AgentKernel| {
        [counter::AGENT_REPORTS, counter::AGENT_FOREIGN, counter::AGENT_BAD].map(|c| k.counter(c).unwrap())
    };

    // Not tracked yet: refused, counted by the object whose token it carries only.
    report(7, k.token, alternating);
    assert_eq!(counters(&k), [0, 7, 0], "untracked: refused and counted");
    assert_eq!(counters(&other), [0, 0, 0], "not its token: not counted");

    k.track(std::process::id()).unwrap();
    // A token of no loaded object: nothing taken, nothing counted.
    report(5, k.token ^ other.token ^ 1, alternating);
    // An event out of range: refused and counted.
    report(3, k.token, |_| agent::LAST + 1);
    // Ten good reports: five calls.
    report(10, k.token, alternating);
    assert_eq!(counters(&k), [10, 7, 3], "tracked: reports, foreign, bad");
    assert_eq!(counters(&other), [0, 0, 0], "another pftraced takes none of them");

    let mut records = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while records.len() < 10 && std::time::Instant::now() < deadline {
        ring.drain(&mut records);
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(records.len(), 10, "one record a report");
    let tid = unsafe { libc::gettid() } as u32;
    for (i, r) in records.iter().enumerate() {
        assert_eq!((r.pid, r.tid), (std::process::id(), tid), "pid and tid from the kernel");
        assert_eq!(r.entry, i % 2 == 0, "record {i}");
        assert_eq!((r.name.as_str(), r.file.as_str(), r.line, r.code), ("victim", "/srv/app.py", 42, 0xc0de));
        assert!(r.ts_ns > 0 && r.thread_cpu_ns > 0, "kernel figures: {r:?}");
    }
}
