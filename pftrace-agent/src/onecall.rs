//! Prototype (issue 12, pftrace-agent/README.md "One kernel entry per call:
//! measured"): a traced call enters the kernel once, at its end. Its start
//! is taken here, in user space: CLOCK_MONOTONIC from the vDSO (the clock of
//! bpf_ktime_get_ns) and the thread's CPU time from its slot in a read-only
//! mapping of pftraced's CPU_SLOTS map (written by a sched_switch program at
//! each switch-in: CPU = sum at switch-in + time since), kept on a
//! per-thread stack until the return, whose single report carries both in
//! its registers (rsi = start clock, rdx = start CPU, event | ONE_CALL).
//!
//! Off unless the process has `PFTRACE_AGENT_ONE_CALL` and the slot map's fd
//! in `PFTRACE_AGENT_SLOT_FD` (agent-bench passes both; pftraced never does).
//! The slot mapping and [`now_and_cpu_here`] also serve the batched road
//! (`crate::batch`), which pftraced uses by default.
//! A code object's first call in a session (its strings go with it), a
//! thread without a slot, and calls nested deeper than [`DEPTH`] go the
//! two-report road as before.

use std::{
    cell::{Cell, UnsafeCell},
    sync::atomic::{AtomicUsize, Ordering},
};

use pftrace_common::{CpuSlot, MAX_CPU_SLOTS, agent};

/// Base of the read-only mapping of the slots (0: the prototype is off).
static SLOTS: AtomicUsize = AtomicUsize::new(0);

/// Maps the slots when the environment asks for the prototype (at start).
pub fn from_env() -> Result<bool, String> {
    if std::env::var_os("PFTRACE_AGENT_ONE_CALL").is_none() || SLOTS.load(Ordering::Relaxed) != 0 {
        return Ok(SLOTS.load(Ordering::Relaxed) != 0);
    }
    let fd: i32 = std::env::var("PFTRACE_AGENT_SLOT_FD")
        .ok()
        .and_then(|v| v.parse().ok())
        .ok_or("PFTRACE_AGENT_ONE_CALL without PFTRACE_AGENT_SLOT_FD")?;
    let len = MAX_CPU_SLOTS as usize * size_of::<CpuSlot>();
    // SAFETY: a new shared read-only mapping of the map's memory.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, fd, 0) };
    if p == libc::MAP_FAILED {
        return Err(format!("mapping the CPU slots: {}", std::io::Error::last_os_error()));
    }
    SLOTS.store(p as usize, Ordering::Release);
    Ok(true)
}

/// Maps the slots from the fd pftraced gave over the control socket (the
/// batched road; read-only: the map is frozen).
pub fn from_fd(fd: &std::os::fd::OwnedFd) -> Result<(), String> {
    use std::os::fd::AsRawFd as _;
    if SLOTS.load(Ordering::Relaxed) != 0 {
        return Err("the CPU slots are mapped already".into());
    }
    let len = MAX_CPU_SLOTS as usize * size_of::<CpuSlot>();
    // SAFETY: a new shared read-only mapping of the map's memory (it stays
    // after the fd is closed).
    let p = unsafe {
        libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, fd.as_raw_fd(), 0)
    };
    if p == libc::MAP_FAILED {
        return Err(format!("mapping the CPU slots: {}", std::io::Error::last_os_error()));
    }
    SLOTS.store(p as usize, Ordering::Release);
    Ok(())
}

/// Session of the slots: a thread's cached slot index is of an earlier
/// mapping when its own number differs.
pub static GEN: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// The agent stops (teardown): forget the mapping (left mapped: another
/// thread may be reading it; 512 KiB, once a session) so the next pftraced's
/// slots are mapped anew, and every thread looks its slot up again.
pub fn turn_off() {
    SLOTS.store(0, Ordering::Release);
    GEN.fetch_add(1, Ordering::AcqRel);
}

pub fn on() -> bool {
    SLOTS.load(Ordering::Relaxed) != 0
}

/// Start clock of an entry reported the old way (its return goes the old way too).
const OLD: u64 = u64::MAX;

#[derive(Clone, Copy)]
struct Open {
    code: u64,
    ts: u64,
    cpu: u64,
}

/// Open calls kept per thread (deeper ones go the old way).
pub const DEPTH: usize = 256;

struct Calls {
    /// -1: not looked for yet; -2: none; else the slot's index.
    slot: Cell<isize>,
    /// [`GEN`] when `slot` was found.
    slot_gen: Cell<u32>,
    /// No slot found: when to look again (a thread older than pftraced's
    /// attachment gets one at its first report and may use it from its
    /// next switch-in).
    retry_at: Cell<u64>,
    depth: Cell<usize>,
    /// Entries past DEPTH still open (reported the old way).
    over: Cell<usize>,
    stack: UnsafeCell<[Open; DEPTH]>,
}

thread_local! {
    static CALLS: Calls = const {
        Calls {
            slot: Cell::new(-1),
            slot_gen: Cell::new(0),
            retry_at: Cell::new(0),
            depth: Cell::new(0),
            over: Cell::new(0),
            stack: UnsafeCell::new([Open { code: 0, ts: 0, cpu: 0 }; DEPTH]),
        }
    };
}

/// What to do with a report.
pub enum Action {
    /// Nothing more: the entry is kept here.
    Kept,
    /// A one-record call: report (event | ONE_CALL, start clock, start CPU).
    Call(Closed),
    /// The old road (two reports per call).
    Old,
}

/// A call closed whose start this thread measured.
#[derive(Clone, Copy)]
pub struct Closed {
    /// The closing event | ONE_CALL.
    pub event: u64,
    pub ts: u64,
    pub cpu: u64,
}

/// Decides a report of code object `code` (`strings_sent`: pftraced has its
/// strings). Holds the GIL (callbacks), so no other thread's report interleaves.
#[inline]
pub fn decide(event: u8, code: u64, strings_sent: bool) -> Action {
    CALLS.with(|c| {
        // SAFETY: only this thread touches its stack, and not re-entrantly.
        let stack = unsafe { &mut *c.stack.get() };
        let depth = c.depth.get();
        if agent::is_entry(event) {
            if depth >= DEPTH {
                c.over.set(c.over.get() + 1);
                return Action::Old;
            }
            let (ts, cpu) = if strings_sent { now_and_cpu(c).unwrap_or((OLD, 0)) } else { (OLD, 0) };
            stack[depth] = Open { code, ts, cpu };
            c.depth.set(depth + 1);
            if ts == OLD { Action::Old } else { Action::Kept }
        } else {
            if c.over.get() > 0 {
                c.over.set(c.over.get() - 1);
                return Action::Old;
            }
            // The innermost open call of this code object (entries whose
            // return never came, e.g. a generator closed without an event,
            // are dropped: their calls are lost, see the README's risks).
            let Some(at) = stack[..depth].iter().rposition(|o| o.code == code) else {
                return Action::Old;
            };
            c.depth.set(at);
            let o = stack[at];
            if o.ts == OLD {
                Action::Old
            } else {
                Action::Call(Closed { event: event as u64 | agent::ONE_CALL, ts: o.ts, cpu: o.cpu })
            }
        }
    })
}

/// CLOCK_MONOTONIC now and this thread's CPU time at that instant, from its
/// slot (None: the thread has no slot).
#[inline]
pub fn now_and_cpu_here() -> Option<(u64, u64)> {
    CALLS.with(now_and_cpu)
}

/// CLOCK_MONOTONIC now and this thread's CPU time at that instant, from its slot.
#[inline]
fn now_and_cpu(c: &Calls) -> Option<(u64, u64)> {
    let mut slot = c.slot.get();
    let generation = GEN.load(Ordering::Relaxed);
    if slot == -2 && c.slot_gen.get() == generation {
        // Look again at most every 10 ms (a scan of the slots is 512 KiB).
        let now = monotonic_ns();
        if now >= c.retry_at.get() {
            c.retry_at.set(now + 10_000_000);
            slot = -1;
        }
    }
    if slot == -1 || c.slot_gen.get() != generation {
        c.slot_gen.set(generation);
        slot = find_slot();
        c.slot.set(slot);
    }
    if slot < 0 {
        return None;
    }
    let base = SLOTS.load(Ordering::Relaxed) as *const CpuSlot;
    // SAFETY: slot < MAX_CPU_SLOTS, inside the mapping.
    unsafe { read_slot(base.add(slot as usize), gettid_cached()) }
}

/// Reads a slot: clock and CPU between two equal even sequence numbers (a
/// switch-in between them rewrote the slot: read again).
///
/// # Safety
/// `slot` points into the mapping.
#[inline]
pub unsafe fn read_slot(slot: *const CpuSlot, tid: u32) -> Option<(u64, u64)> {
    use std::ptr::read_volatile as rv;
    use std::sync::atomic::{Ordering::SeqCst, compiler_fence};
    for _ in 0..4 {
        unsafe {
            let s1 = rv(&raw const (*slot).seq);
            compiler_fence(SeqCst);
            let t = monotonic_ns();
            let sum = rv(&raw const (*slot).sum_exec_ns);
            let t_in = rv(&raw const (*slot).t_in_ns);
            let owner = rv(&raw const (*slot).tid);
            compiler_fence(SeqCst);
            let s2 = rv(&raw const (*slot).seq);
            if s1 != s2 || s1 & 1 != 0 || s1 == 0 {
                continue;
            }
            if owner != tid {
                return None;
            }
            return Some((t, sum + t.saturating_sub(t_in)));
        }
    }
    None
}

/// CLOCK_MONOTONIC in ns (vDSO: no kernel entry).
#[inline]
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

thread_local! {
    static TID: Cell<u32> = const { Cell::new(0) };
}

fn gettid_cached() -> u32 {
    TID.with(|t| {
        if t.get() == 0 {
            // SAFETY: gettid has no preconditions.
            t.set(unsafe { libc::gettid() } as u32);
        }
        t.get()
    })
}

/// This thread's slot: the one the kernel last wrote for its tid (once per thread).
#[cold]
fn find_slot() -> isize {
    let tid = gettid_cached();
    let base = SLOTS.load(Ordering::Relaxed) as *const CpuSlot;
    (0..MAX_CPU_SLOTS as usize)
        .find(|&i| unsafe { std::ptr::read_volatile(&raw const (*base.add(i)).tid) } == tid)
        .map_or(-2, |i| i as isize)
}

/// A forked child: its one thread has a new tid and no slot yet.
pub fn after_fork() {
    TID.with(|t| t.set(0));
    CALLS.with(|c| {
        c.slot.set(-1);
        c.depth.set(0);
        c.over.set(0);
    });
}
