//! Prototype measurements for issue 12's batched road (`agent-bench
//! --batch-raw`; pftrace-agent/README.md "Batched reports: measured"):
//!
//! - a drain report from this thread, by the syscall road (tp_btf), with 0,
//!   1, 8 and 32 records waiting: ns per drain timed here, and in the
//!   program by bpf_stats (which also counts every other syscall of the host
//!   returning at its first test: a few ns each);
//! - the switch-out drain program per context switch: a pipe ping-pong
//!   between two processes pinned to one CPU, without the program, with it
//!   for threads without a buffer (a lookup that misses), with buffers that
//!   hold nothing new (lookup + one read of the head), and with one new
//!   record at every switch (a batch on the ring each switch).
//!
//! Run as root, pinned (`taskset -c 1`), under the measurement locks.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::bail;
use pftrace_common::{BATCH_LEN, BatchBuf, BatchRecord, agent, batch};

use crate::{
    cpuslot::{fastest, pin},
    kernel::{AgentKernel, LoadOptions, Ring},
    pingpong,
};

fn load() -> anyhow::Result<AgentKernel> {
    Ok(AgentKernel::load(LoadOptions { one_call: true, batch: true, ..Default::default() })?)
}

fn new_buf() -> Box<BatchBuf> {
    Box::new(BatchBuf { head: 0, _pad: 0, records: [BatchRecord::default(); BATCH_LEN] })
}

/// Appends `n` records (content: a counter) and publishes them.
fn append(buf: &mut BatchBuf, n: u64) {
    for _ in 0..n {
        let h = buf.head;
        buf.records[(h % BATCH_LEN as u64) as usize] =
            BatchRecord { code: h, ts_ns: h, event: 1, ..Default::default() };
        std::sync::atomic::compiler_fence(Ordering::Release);
        unsafe { std::ptr::write_volatile(&raw mut buf.head, h + 1) };
    }
}

fn drain_report(buf: &BatchBuf, first: bool, token: u64) {
    let ev = agent::BATCH | if first { agent::BATCH_FIRST } else { 0 };
    pftrace_agent::report_syscall(ev, buf as *const BatchBuf as *const u8, std::ptr::null(), 0, 0, token);
}

pub fn run() -> anyhow::Result<()> {
    user_side()?;
    for round in 0..2 {
        drains(round)?;
    }
    for round in 0..3 {
        for mode in ["none", "miss", "empty", "one-record"] {
            let (ns, stats, counters) = ping_pong(mode)?;
            let prog = match stats {
                Some((c, t)) if c > 0 => {
                    format!("; program {:.1} ns per run ({c} runs)", t as f64 / c as f64)
                }
                _ => String::new(),
            };
            println!(
                "batch (switch) round {round} ping-pong, switch-out drain {mode}: {ns:.1} ns per round trip{prog}{}",
                counters.map(|c| format!("; {c}")).unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// What a batched call costs the agent in user space, without Python: the
/// start (clock and slot read), the end (the same) and the append, against
/// the start alone (what the one-report road does in user space).
fn user_side() -> anyhow::Result<()> {
    use pftrace_common::{CpuSlot, MAX_CPU_SLOTS};
    let mut k = load()?;
    k.attach_cpu_slots()?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&k.slots_fd()?);
    let len = MAX_CPU_SLOTS as usize * size_of::<CpuSlot>();
    let base = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, fd, 0) };
    if base == libc::MAP_FAILED {
        bail!("mmap of CPU_SLOTS: {}", std::io::Error::last_os_error());
    }
    let tid = unsafe { libc::gettid() } as u32;
    crate::batch::give_slots(&mut k, &[tid], 0)?;
    std::thread::sleep(Duration::from_millis(2));
    let slot = base as *const CpuSlot;
    let read = || unsafe { pftrace_agent::onecall::read_slot(slot, tid) };
    if read().is_none() {
        bail!("the slot was not written");
    }
    let mut buf = new_buf();
    for round in 0..2 {
        let start = fastest(|| {
            std::hint::black_box(read());
        });
        let call = fastest(|| {
            for event in [1u8, 4] {
                let (ts, cpu) = read().unwrap_or_default();
                let h = buf.head;
                buf.records[(h % BATCH_LEN as u64) as usize] =
                    BatchRecord { code: 7, ts_ns: ts, cpu_ns: cpu, lineno: 1, event, _pad: [0; 3] };
                std::sync::atomic::compiler_fence(Ordering::Release);
                unsafe { std::ptr::write_volatile(&raw mut buf.head, h + 1) };
            }
        });
        println!(
            "batch (user) round {round}: clock + slot read {start:.1} ns; a whole call (two events, each stamped and appended) {call:.1} ns"
        );
    }
    crate::batch::take_slots(&mut k, &[tid])?;
    unsafe { libc::munmap(base, len) };
    Ok(())
}

/// Drain reports with `n` records waiting each time.
fn drains(round: usize) -> anyhow::Result<()> {
    let mut k = load()?;
    k.attach_syscall_btf()?;
    k.track(std::process::id())?;
    let token = k.token;
    let (stop, drainer) = count_calls(k.take_ring()?, None);
    let mut buf = new_buf();
    drain_report(&buf, true, token);
    let mut appended = 0u64;
    for n in [0u64, 1, 8, 32] {
        let before = k.syscall_btf_stats();
        let mut best = f64::MAX;
        for _ in 0..100 {
            let mut spent = Duration::ZERO;
            for _ in 0..1000 {
                append(&mut buf, n);
                let t0 = std::time::Instant::now();
                drain_report(&buf, false, token);
                spent += t0.elapsed();
            }
            appended += 1000 * n;
            best = best.min(spent.as_nanos() as f64 / 1000.0);
        }
        let after = k.syscall_btf_stats();
        let prog = match (before, after) {
            (Some((c0, t0)), Some((c1, t1))) if c1 > c0 => format!(
                "; in the program {:.1} ns a run (bpf_stats, {} runs of which 100,000 drains)",
                (t1 - t0) as f64 / (c1 - c0) as f64,
                c1 - c0
            ),
            _ => "; bpf_stats off".into(),
        };
        println!(
            "batch (drain) round {round}: {n:>2} records a drain: {best:.1} ns a drain report ({:.1} a record){prog}",
            if n > 0 { best / n as f64 } else { 0.0 }
        );
    }
    std::thread::sleep(Duration::from_millis(50));
    stop.store(true, Ordering::Relaxed);
    let calls = drainer.join().map_err(|_| anyhow::anyhow!("drainer panicked"))?;
    let c = k.batch_counters()?;
    println!(
        "batch (drain) round {round}: {appended} appended, {calls} on the ring; {}",
        crate::batch::counters_text(&c)
    );
    if calls != appended || c[batch::counter::OVERRUN as usize] != 0 || c[batch::counter::LOST as usize] != 0
    {
        bail!("records lost or duplicated: {appended} appended, {calls} arrived");
    }
    k.untrack(std::process::id())?;
    Ok(())
}

/// A thread (on `cpu` if given) counting the calls of the batches on
/// `ring` until told to stop; it returns the count.
fn count_calls(mut ring: Ring, cpu: Option<usize>) -> (Arc<AtomicBool>, std::thread::JoinHandle<u64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let drainer = std::thread::spawn(move || {
        if let Some(cpu) = cpu {
            pin(cpu);
        }
        let mut calls = 0u64;
        loop {
            let done = s.load(Ordering::Relaxed);
            let mut got = 0;
            ring.drain_raw(|b| {
                got += 1;
                calls += crate::batch::events_in(b).unwrap_or(0);
            });
            if done {
                return calls;
            }
            if got == 0 {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    });
    (stop, drainer)
}

/// A ping-pong's fastest round trip (ns), the program's (run_cnt,
/// run_time_ns) and the counters in words.
type PingPong = (f64, Option<(u64, u64)>, Option<String>);

/// Round trip of a byte between two processes on this CPU (two switches).
fn ping_pong(mode: &str) -> anyhow::Result<PingPong> {
    let cpu = unsafe { libc::sched_getcpu() } as usize;
    let rounds = 100_000;
    let mut k = None;
    if mode != "none" {
        let mut kk = load()?;
        kk.attach_syscall_btf()?;
        kk.attach_batch_switch()?;
        kk.track(std::process::id())?;
        k = Some(kk);
    }
    let token = k.as_ref().map_or(0, |k| k.token);
    let register = mode == "empty" || mode == "one-record";
    let mut buf = new_buf();
    let mut cbuf = new_buf();
    let mut registered = !register;
    let mut pp = pingpong::PingPong::start(cpu, move || {
        // After the first byte: the parent has tracked this process by
        // then (before, the report would be refused as foreign).
        if !registered {
            drain_report(&cbuf, true, token);
            registered = true;
        }
        if mode == "one-record" {
            append(&mut cbuf, 1);
        }
    })?;
    if let Some(kk) = k.as_mut() {
        kk.track(pp.child as u32)?;
    }
    if register {
        drain_report(&buf, true, token);
    }
    // A thread on another CPU empties the ring as it fills (1.6 KB a batch).
    let drainer = match k.as_mut() {
        Some(kk) => Some(count_calls(kk.take_ring()?, Some(1 - cpu.min(1)))),
        None => None,
    };
    let before = k.as_ref().and_then(|k| k.batch_switch_stats());
    let best = pp.fastest(rounds, || {
        if mode == "one-record" {
            append(&mut buf, 1);
        }
    });
    let after = k.as_ref().and_then(|k| k.batch_switch_stats());
    pp.finish();
    std::thread::sleep(Duration::from_millis(20));
    let calls = drainer.map(|(stop, d)| {
        stop.store(true, Ordering::Relaxed);
        d.join().unwrap_or(0)
    });
    let stats = match (before, after) {
        (Some((c0, t0)), Some((c1, t1))) => Some((c1 - c0, t1 - t0)),
        _ => None,
    };
    let counters = match k.as_ref() {
        Some(kk) => Some(format!(
            "{} calls on the ring; {}",
            calls.unwrap_or(0),
            crate::batch::counters_text(&kk.batch_counters()?)
        )),
        None => None,
    };
    Ok((best, stats, counters))
}
