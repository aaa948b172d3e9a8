//! Prototype of issue 12 (pftrace-agent/README.md "One kernel entry per
//! call: measured"), driven from this process through the syscall road: a
//! thread's CPU slot, written by the sched_switch program and mapped
//! read-only, gives its CPU time in user space; a closing report with
//! `agent::ONE_CALL` carrying the start becomes one `AgentCallEvent` whose
//! CPU agrees with CLOCK_THREAD_CPUTIME_ID; and an object loaded as
//! pftraced loads it (AGENT_ONE_CALL 0) refuses such reports.

mod common;

use std::{os::fd::AsRawFd as _, time::Duration};

use common::*;
use pftrace_agent_host::kernel::{AgentKernel, LoadOptions};
use pftrace_common::{AgentCallEvent, CpuSlot, MAX_CPU_SLOTS, agent, counter};

/// This thread's time runnable but not running, in ns: the second field
/// of its schedstat, moved at each switch-in, so exact while it runs.
fn run_delay_ns() -> u64 {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").expect("/proc/thread-self/schedstat");
    text.split_whitespace().nth(1).and_then(|f| f.parse().ok()).expect("schedstat's run delay")
}

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Spins for `ns` of CLOCK_MONOTONIC without reading the thread's CPU
/// clock: reading it brings the scheduler's `sum_exec_runtime` up to date
/// (task_sched_runtime calls update_curr), which would make even the
/// tick-granular figure look exact at the report that follows.
fn spin(ns: u64) {
    let t0 = pftrace_agent::onecall::monotonic_ns();
    while pftrace_agent::onecall::monotonic_ns() - t0 < ns {
        std::hint::spin_loop();
    }
}

#[test]
fn one_call_records_carry_their_start_and_cpu_from_the_slot() {
    let _g = serial();
    require_root();
    let mut k = AgentKernel::load(LoadOptions { one_call: true, ..Default::default() })
        .expect("loading the eBPF object (root, BPF)");
    k.attach_syscall(false).unwrap();
    k.attach_cpu_slots().expect("tp_btf on sched_switch");
    let mut ring = k.take_ring().unwrap();
    let fd = k.slots_fd().unwrap().as_raw_fd();
    let len = MAX_CPU_SLOTS as usize * size_of::<CpuSlot>();
    // Frozen: no writable mapping, whatever the fd's mode.
    let w = unsafe {
        libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0)
    };
    assert_eq!(w, libc::MAP_FAILED, "a writable mapping of the CPU slots");
    assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::EPERM));
    let base = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, fd, 0) };
    assert_ne!(base, libc::MAP_FAILED, "a read-only mapping: {}", std::io::Error::last_os_error());
    let slot = (base as *const CpuSlot).wrapping_add(5);
    let tid = unsafe { libc::gettid() } as u32;
    k.track(std::process::id()).unwrap();
    k.register_slot(tid, 5).unwrap();
    std::thread::sleep(Duration::from_millis(5)); // the switch-in writes the slot

    const CALLS: usize = 20;
    const BURN: u64 = 2_000_000;
    let mut sent = Vec::new();
    for _ in 0..CALLS {
        // The slot's figure is the scheduler's sum at the thread's last
        // switch-in plus the wall time since, so what the hypervisor took
        // from the vCPU while the thread ran (steal) counts in it and not
        // in the thread's clock, until the next switch-in sets the slot
        // back to the scheduler's sum. A sleep first puts that switch-in
        // just before the call: the steal since it is the call's own
        // (without it, under three busy loops, one call read 761 us
        // short, the slot set back in mid-call by steal before the call).
        // The wall time the thread then neither ran nor waited for a CPU
        // is that steal, read outside the clock's readings, so it can
        // only come out larger than the steal.
        std::thread::sleep(Duration::from_micros(100));
        let (w0, d0) = (pftrace_agent::onecall::monotonic_ns(), run_delay_ns());
        let c0 = thread_cpu_ns();
        let (ts, cpu0) =
            unsafe { pftrace_agent::onecall::read_slot(slot, tid) }.expect("the slot is this thread's");
        spin(BURN);
        let rc = pftrace_agent::report_syscall(
            agent::RETURN as u64 | agent::ONE_CALL,
            ts as *const u8,
            cpu0 as *const u8,
            42,
            0xc0de,
            k.token,
        );
        let c3 = thread_cpu_ns();
        let (d3, w3) = (run_delay_ns(), pftrace_agent::onecall::monotonic_ns());
        assert_eq!(rc, -(libc::ENOSYS as i64));
        // The call's CPU is at most c3 - c0 and short of it by the slot
        // read and the report (a few us), up to the slot's wall-clock view
        // (steal time counts as the thread's: one run under the parallel
        // tests read 2,004,156 ns by the slot, 1,773,976 by the clock):
        // 5% + 50 us either way, plus what was stolen above.
        let stolen = ((w3 - w0) + d0).saturating_sub((c3 - c0) + d3);
        sent.push((ts, cpu0, c3 - c0, stolen));
    }
    assert_eq!(k.counter(counter::AGENT_REPORTS).unwrap(), CALLS as u64);
    assert_eq!(k.counter(counter::AGENT_BAD).unwrap(), 0);
    let mut records = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while records.len() < CALLS && std::time::Instant::now() < deadline {
        ring.drain_raw(|b| {
            assert_eq!(b.len(), size_of::<AgentCallEvent>(), "only one-call records");
            records.push(unsafe { std::ptr::read_unaligned(b.as_ptr() as *const AgentCallEvent) });
        });
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(records.len(), CALLS, "one record a call");
    for (r, (ts, cpu0, truth, stolen)) in records.iter().zip(&sent) {
        assert_eq!((r.head.pid, r.head.tid), (std::process::id(), tid), "pid and tid from the kernel");
        assert_eq!(
            (r.head.event, r.head.flags, r.head.lineno, r.head.code),
            (agent::RETURN, agent::flag::CALL, 42, 0xc0de)
        );
        assert_eq!((r.entry_ts_ns, r.entry_cpu_ns), (*ts, *cpu0), "the start as the agent sent it");
        assert!(r.head.ts_ns > *ts + BURN, "the end after the start and the spin: {} {}", r.head.ts_ns, ts);
        let cpu = r.head.thread_cpu_ns - r.entry_cpu_ns;
        let slack = truth / 20 + 50_000;
        assert!(
            cpu + slack >= *truth && cpu <= truth + slack + stolen,
            "the call's CPU {cpu} ns by the slot, {truth} by CLOCK_THREAD_CPUTIME_ID around it ({stolen} ns \
             stolen)"
        );
        assert!(r.head.rss_pages > 0, "RSS at the end");
    }
    k.unregister_slot(tid).unwrap();
    unsafe { libc::munmap(base, len) };
}

#[test]
fn an_object_loaded_as_pftraced_loads_it_refuses_one_call_reports() {
    let _g = serial();
    require_root();
    let mut k = AgentKernel::load(LoadOptions::default()).expect("loading the eBPF object (root, BPF)");
    k.attach_syscall(false).unwrap();
    let mut ring = k.take_ring().unwrap();
    k.track(std::process::id()).unwrap();
    for _ in 0..3 {
        pftrace_agent::report_syscall(
            agent::RETURN as u64 | agent::ONE_CALL,
            1 as _,
            2 as _,
            42,
            0xc0de,
            k.token,
        );
    }
    assert_eq!(k.counter(counter::AGENT_BAD).unwrap(), 3, "refused and counted");
    assert_eq!(k.counter(counter::AGENT_REPORTS).unwrap(), 0);
    let mut n = 0;
    ring.drain_raw(|_| n += 1);
    assert_eq!(n, 0, "no record");
}
