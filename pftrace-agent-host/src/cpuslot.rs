//! Prototype measurements for issue 12's "one kernel entry per call"
//! (`agent-bench --cpuslot`; pftrace-agent/README.md has the figures): the
//! CPU slots kept by the sched_switch program, read in user space.
//!
//! - whether the traced process can write the slots (it must not);
//! - (a) what the agent's user-side entry costs (clock + slot read, and the
//!   whole push/pop of `pftrace_agent::onecall`), against
//!   CLOCK_THREAD_CPUTIME_ID;
//! - (c) the sched_switch program per context switch (bpf_stats) and a
//!   pipe ping-pong between two processes on one CPU with and without it;
//! - (d) the CPU figure against CLOCK_THREAD_CPUTIME_ID over calls of 1 us,
//!   100 us and 10 ms, and across preemption (two busy threads, one CPU),
//!   from the slot in user space and from the kernel's one-call record.
//!
//! Run as root, pinned (`taskset -c 1`), under the measurement locks.

use std::{
    os::fd::AsRawFd as _,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Context as _, bail};
use pftrace_common::{AgentCallEvent, AgentEvent, CpuSlot, MAX_CPU_SLOTS, agent, kind};

use crate::{
    kernel::{AgentKernel, LoadOptions},
    pingpong::PingPong,
};

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn tid() -> u32 {
    unsafe { libc::gettid() as u32 }
}

/// Fastest of 200 batches of 10,000, ns per call of `f`.
pub(crate) fn fastest(mut f: impl FnMut()) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..200 {
        let t0 = std::time::Instant::now();
        for _ in 0..10_000 {
            f();
        }
        best = best.min(t0.elapsed().as_nanos() as f64 / 10_000.0);
    }
    best
}

fn load() -> anyhow::Result<AgentKernel> {
    Ok(AgentKernel::load(LoadOptions { one_call: true, ..Default::default() })?)
}

const SLOTS_LEN: usize = MAX_CPU_SLOTS as usize * size_of::<CpuSlot>();

pub fn run() -> anyhow::Result<()> {
    let mut k = load()?;
    k.attach_cpu_slots().context("attaching the sched_switch program")?;
    k.attach_syscall_btf().context("attaching the syscall road (tp_btf)")?;
    let fd = k.slots_fd()?.as_raw_fd();
    writability(fd)?;
    let base =
        unsafe { libc::mmap(std::ptr::null_mut(), SLOTS_LEN, libc::PROT_READ, libc::MAP_SHARED, fd, 0) };
    if base == libc::MAP_FAILED {
        bail!("mmap of CPU_SLOTS: {}", std::io::Error::last_os_error());
    }
    let base = base as *const CpuSlot;
    k.register_slot(tid(), 0)?;
    std::thread::sleep(Duration::from_millis(2)); // a switch-in writes the slot
    let slot = base;
    let me = tid();
    if unsafe { pftrace_agent::onecall::read_slot(slot, me) }.is_none() {
        bail!("slot 0 not written for tid {me} after a sleep");
    }
    // AGENT_BENCH_CPUSLOT=c (or a, d): only those parts.
    let parts = std::env::var("AGENT_BENCH_CPUSLOT").unwrap_or_else(|_| "acd".into());
    if parts.contains('a') {
        entry_cost(slot, me)?;
    }
    let stats = |k: &AgentKernel| k.cpu_slot_stats().map(|(c, _)| c).unwrap_or(0);
    let runs = stats(&k);
    if parts.contains('d') {
        agreement(&mut k, slot, me)?;
        preemption(&mut k, base)?;
        println!("cpuslot: sched_switch program ran {} times during (d)", stats(&k) - runs);
    }
    drop(k);
    if parts.contains('c') {
        context_switches()?;
    }
    Ok(())
}

/// The map is frozen (BPF_MAP_FREEZE) before anything maps it: a writable
/// shared mapping, a later mprotect to writable, a writable mapping of the
/// fd reopened through /proc and a write through the bpf syscall are each
/// refused, though the fd itself is read-write.
fn writability(fd: i32) -> anyhow::Result<()> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap_or_default();
    println!(
        "cpuslot: CPU_SLOTS fdinfo: {}",
        info.lines().filter(|l| l.starts_with("map_")).collect::<Vec<_>>().join(", ")
    );
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    println!("cpuslot: map fd access mode {} (O_RDWR is 2)", flags & libc::O_ACCMODE);
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            SLOTS_LEN,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    let e = std::io::Error::last_os_error();
    if p != libc::MAP_FAILED {
        bail!("a writable shared mapping of CPU_SLOTS was allowed");
    }
    println!("cpuslot: mmap PROT_READ|PROT_WRITE MAP_SHARED refused: {e}");
    let p = unsafe { libc::mmap(std::ptr::null_mut(), SLOTS_LEN, libc::PROT_READ, libc::MAP_SHARED, fd, 0) };
    if p == libc::MAP_FAILED {
        bail!("read-only mapping refused: {}", std::io::Error::last_os_error());
    }
    let rc = unsafe { libc::mprotect(p, 4096, libc::PROT_READ | libc::PROT_WRITE) };
    let e = std::io::Error::last_os_error();
    if rc == 0 {
        bail!("mprotect to PROT_WRITE of the read-only mapping was allowed");
    }
    println!("cpuslot: mprotect PROT_WRITE refused: {e}");
    unsafe { libc::munmap(p, SLOTS_LEN) };
    let path = std::ffi::CString::new(format!("/proc/self/fd/{fd}"))?;
    let rw = unsafe { libc::open(path.as_ptr(), libc::O_RDWR) };
    let e = std::io::Error::last_os_error();
    if rw >= 0 {
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                rw,
                0,
            )
        };
        let e2 = std::io::Error::last_os_error();
        unsafe { libc::close(rw) };
        if p != libc::MAP_FAILED {
            bail!("reopened /proc/self/fd/{fd} O_RDWR and mapped it writable");
        }
        println!("cpuslot: /proc/self/fd reopened O_RDWR, but the writable mapping refused: {e2}");
    } else {
        println!("cpuslot: reopening /proc/self/fd/{fd} O_RDWR refused: {e}");
    }
    // BPF_MAP_UPDATE_ELEM through the read-only fd (as root).
    #[repr(C)]
    struct Update {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let (key, value) = (0u32, CpuSlot::default());
    let attr = Update {
        map_fd: fd as u32,
        _pad: 0,
        key: &key as *const u32 as u64,
        value: &value as *const CpuSlot as u64,
        flags: 0,
    };
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_MAP_UPDATE_ELEM, &attr as *const Update, size_of::<Update>() as u32)
    };
    let e = std::io::Error::last_os_error();
    if rc == 0 {
        bail!("BPF_MAP_UPDATE_ELEM through the map's fd was allowed");
    }
    println!("cpuslot: BPF_MAP_UPDATE_ELEM refused: {e}");
    Ok(())
}

/// (a) What the entry costs in user space.
fn entry_cost(slot: *const CpuSlot, me: u32) -> anyhow::Result<()> {
    for round in 0..3 {
        let clock = fastest(|| {
            std::hint::black_box(pftrace_agent::onecall::monotonic_ns());
        });
        let read = fastest(|| {
            std::hint::black_box(unsafe { pftrace_agent::onecall::read_slot(slot, me) });
        });
        let thread = fastest(|| {
            std::hint::black_box(thread_cpu_ns());
        });
        println!(
            "cpuslot (a) round {round}: CLOCK_MONOTONIC (vDSO) {clock:.1} ns; clock + slot read with sequence \
             check {read:.1} ns; CLOCK_THREAD_CPUTIME_ID {thread:.1} ns"
        );
    }
    Ok(())
}

/// Spins until `ns` of CLOCK_MONOTONIC passed.
fn spin(ns: u64) {
    let t0 = pftrace_agent::onecall::monotonic_ns();
    while pftrace_agent::onecall::monotonic_ns() - t0 < ns {
        std::hint::spin_loop();
    }
}

/// `f` between two CLOCK_THREAD_CPUTIME_ID reads: its result and the
/// midpoint of the two (the thread's CPU time "at" `f`, within half the
/// bracket: about 110 ns here, a syscall each).
fn bracketed<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let a = thread_cpu_ns();
    let r = f();
    let b = thread_cpu_ns();
    (r, a / 2 + b / 2)
}

/// (d) Calls of 1 us, 100 us and 10 ms: the call's CPU by the slot (user
/// space at both ends; start in user space and end in the kernel's one-call
/// record) and today's figure (the scheduler's last charge, read by both
/// reports) against CLOCK_THREAD_CPUTIME_ID taken around each read.
fn agreement(k: &mut AgentKernel, slot: *const CpuSlot, me: u32) -> anyhow::Result<()> {
    k.track(std::process::id())?;
    let token = k.token;
    let mut ring = k.take_ring()?;
    let read = || unsafe { pftrace_agent::onecall::read_slot(slot, me) };
    let report = |event: u64, a: u64, b: u64| {
        pftrace_agent::report_syscall(event, a as *const u8, b as *const u8, 1, 1, token);
    };
    for (label, ns, n) in [("1 us", 1_000u64, 2000usize), ("100 us", 100_000, 300), ("10 ms", 10_000_000, 30)]
    {
        let (mut user_err, mut kern_err, mut today_err) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..n {
            // Today's figure: two reports, the kernel reads sum_exec_runtime.
            let ((), c0) = bracketed(|| report(agent::START as u64, 0, 0));
            spin(ns);
            let ((), c1) = bracketed(|| report(agent::RETURN as u64, 0, 0));
            let mut today = Vec::new();
            ring.drain_raw(|b| {
                if b.len() == size_of::<AgentEvent>() && b[pftrace_common::KIND_OFFSET] == kind::AGENT {
                    let ev: AgentEvent = unsafe { std::ptr::read_unaligned(b.as_ptr() as *const AgentEvent) };
                    today.push(ev.thread_cpu_ns);
                }
            });
            if today.len() == 2 {
                today_err.push((today[1] as i64 - today[0] as i64) - (c1 as i64 - c0 as i64));
            }
            // The prototype: the start from the slot, one report at the end.
            let (Some((ts, cpu0)), c0) = bracketed(read) else { continue };
            spin(ns);
            let (Some((_, cpu1)), c1) = bracketed(read) else { continue };
            let ((), c2) = bracketed(|| report(agent::RETURN as u64 | agent::ONE_CALL, ts, cpu0));
            user_err.push((cpu1 as i64 - cpu0 as i64) - (c1 as i64 - c0 as i64));
            let mut rec = None;
            ring.drain_raw(|b| {
                if b.len() == size_of::<AgentCallEvent>() {
                    rec = Some(unsafe { std::ptr::read_unaligned(b.as_ptr() as *const AgentCallEvent) });
                }
            });
            let Some(rec) = rec else { bail!("no one-call record") };
            if rec.head.flags & agent::flag::CALL == 0 || rec.entry_cpu_ns != cpu0 || rec.entry_ts_ns != ts {
                bail!("one-call record does not carry its start");
            }
            kern_err
                .push((rec.head.thread_cpu_ns as i64 - rec.entry_cpu_ns as i64) - (c2 as i64 - c0 as i64));
        }
        println!("cpuslot (d) {label} call, the call's CPU minus CLOCK_THREAD_CPUTIME_ID's (ns):");
        println!("    {}", summary("slot, user space at both ends", &mut user_err));
        println!("    {}", summary("slot, start in user space, end in the kernel's record", &mut kern_err));
        println!("    {}", summary("today (sum_exec_runtime in both reports)", &mut today_err));
    }
    k.untrack(std::process::id())?;
    Ok(())
}

fn summary(name: &str, v: &mut [i64]) -> String {
    v.sort();
    if v.is_empty() {
        return format!("{name}: none");
    }
    let p = |q: usize| v[(v.len() - 1) * q / 100];
    let far = v.iter().filter(|x| x.abs() > 10_000).count();
    format!(
        "{name}: min {} p5 {} median {} p95 {} max {} (n {}, {far} off by more than 10 us)",
        v[0],
        p(5),
        p(50),
        p(95),
        v[v.len() - 1],
        v.len()
    )
}

pub(crate) fn pin(cpu: usize) {
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

fn current_cpu() -> usize {
    unsafe { libc::sched_getcpu() as usize }
}

/// (d) Across preemption: a measured thread and a busy neighbour on one
/// CPU; each "call" of 20 ms wall is preempted several times.
fn preemption(k: &mut AgentKernel, base: *const CpuSlot) -> anyhow::Result<()> {
    let cpu = current_cpu();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let neighbour = std::thread::spawn(move || {
        pin(cpu);
        while !s.load(Ordering::Relaxed) {
            std::hint::spin_loop();
        }
    });
    let (tx, rx) = std::sync::mpsc::channel();
    let base = base as usize;
    let measured = std::thread::spawn(move || {
        pin(cpu);
        tx.send(tid()).ok();
        std::thread::sleep(Duration::from_millis(50));
        let me = tid();
        let slot = (base as *const CpuSlot).wrapping_add(1);
        let mut out = Vec::new();
        for _ in 0..20 {
            let read = || unsafe { pftrace_agent::onecall::read_slot(slot, me) };
            let (Some((t0, s0)), c0) = bracketed(read) else { continue };
            spin(20_000_000);
            let (Some((t1, s1)), c1) = bracketed(read) else { continue };
            out.push((t1 - t0, s1 - s0, c1 - c0));
        }
        out
    });
    let t = rx.recv()?;
    k.register_slot(t, 1)?;
    let out = measured.join().map_err(|_| anyhow::anyhow!("measured thread panicked"))?;
    stop.store(true, Ordering::Relaxed);
    let _ = neighbour.join();
    k.unregister_slot(t)?;
    if out.is_empty() {
        bail!("preemption: the slot was never valid");
    }
    let mut errs: Vec<i64> = out.iter().map(|(_, s, c)| *s as i64 - *c as i64).collect();
    let share: f64 = out.iter().map(|(w, _, c)| *c as f64 / *w as f64).sum::<f64>() / out.len() as f64;
    println!(
        "cpuslot (d) preempted 20 ms calls (a busy neighbour on CPU {cpu}; the thread got {:.0}% of the wall \
         time): {}",
        share * 100.0,
        summary("slot minus CLOCK_THREAD_CPUTIME_ID", &mut errs)
    );
    Ok(())
}

/// (c) Pipe ping-pong between two processes on one CPU: every message a
/// context switch. Round trip without the program, with it (no thread
/// registered: the lookup misses), and with both registered (hits), in
/// turn; and the program's own time per run (bpf_stats).
fn context_switches() -> anyhow::Result<()> {
    let cpu = current_cpu();
    let rounds = 100_000;
    for round in 0..3 {
        for mode in ["none", "miss", "hit"] {
            let mut k = None;
            if mode != "none" {
                let mut kk = load()?;
                kk.attach_cpu_slots()?;
                k = Some(kk);
            }
            let (ns, stats) = ping_pong(cpu, rounds, k.as_mut(), mode == "hit")?;
            let prog = match stats {
                Some((c, t)) if c > 0 => format!(
                    "; program {:.1} ns per run (bpf_stats, {c} runs, {:.2} per round trip)",
                    t as f64 / c as f64,
                    c as f64 / rounds as f64
                ),
                _ => String::new(),
            };
            println!(
                "cpuslot (c) round {round} ping-pong, sched_switch program {mode}: {ns:.1} ns per round trip{prog}"
            );
        }
    }
    Ok(())
}

fn ping_pong(
    cpu: usize,
    rounds: usize,
    k: Option<&mut AgentKernel>,
    hit: bool,
) -> anyhow::Result<(f64, Option<(u64, u64)>)> {
    let mut pp = PingPong::start(cpu, || {})?;
    let mut k = k;
    if hit && let Some(kk) = k.as_mut() {
        kk.register_slot(tid(), 2)?;
        kk.register_slot(pp.child as u32, 3)?;
    }
    let before = k.as_ref().and_then(|k| k.cpu_slot_stats());
    let best = pp.fastest(rounds, || {});
    let after = k.as_ref().and_then(|k| k.cpu_slot_stats());
    if hit && let Some(kk) = k.as_mut() {
        kk.unregister_slot(tid())?;
        kk.unregister_slot(pp.child as u32)?;
    }
    pp.finish();
    let stats = match (before, after) {
        (Some((c0, t0)), Some((c1, t1))) => Some((c1 - c0, t1 - t0)),
        _ => None,
    };
    Ok((best, stats))
}
