//! The batched agent road (issue 12; pftrace-agent/README.md "Batched road
//! in pftraced"): no kernel entry per traced event. The agent stamps each
//! event of a traced call (entry: START/RESUME/THROW; close:
//! RETURN/YIELD/UNWIND) in user space (vDSO CLOCK_MONOTONIC and the
//! thread's CPU slot, `onecall::now_and_cpu_here`) and appends one 32-byte
//! record to a buffer of its thread ([`BatchBuf`], [`BATCH_LEN`] records,
//! thread-local: its address lives as long as the thread). The kernel drains
//! it into pftraced's ring with pid/tid of its own and RSS at the drain: at
//! the thread's drain report (buffer full, its first record, or its oldest
//! record older than [`MAX_AGE_NS`] at an append; made before an entry is
//! stamped, after a close is, so a drain never falls inside a call), at its
//! switch-out, its exit and its execve (pftrace-ebpf `agent_batch_report`,
//! `pftrace_agent_batch_switch`, `_exit`, `_exec`). Records are events, not
//! whole calls: pftraced pairs them with the thread's two-report events
//! (the agent drains its buffer before any report, so the ring has them in
//! the thread's order), and an entry still in the buffer when the process
//! exits or tracing stops is delivered and closed as incomplete, as a
//! two-report entry is.
//!
//! The agent cannot see the kernel's tail (bpf_probe_write_user is refused
//! under lockdown, so the kernel never writes here): it counts what its own
//! drain reports covered and never writes a slot past them, so a record is
//! overwritten only after a drain report that the kernel could not honour
//! (ring full, memory unreadable), and the kernel counts those (OVERRUN).
//!
//! On when pftraced gave the CPU slots (its default), or with the
//! prototype's `PFTRACE_AGENT_BATCH` and `PFTRACE_AGENT_ONE_CALL` (agent-bench,
//! agent-host's tests, which give the slots themselves).

use std::{
    cell::{Cell, UnsafeCell},
    sync::atomic::{AtomicBool, Ordering, compiler_fence},
};

use pftrace_common::{BATCH_LEN, BatchBuf, BatchRecord, agent};

static ON: AtomicBool = AtomicBool::new(false);

/// A record older than this at the next append makes it drain (5 ms): how
/// late an event of a thread that keeps calling can reach pftraced.
pub const MAX_AGE_NS: u64 = 5_000_000;

/// Whether this agent offers pftraced the batched road (`batch=1` in its
/// hello): unless `PFTRACE_AGENT_BATCH=0` in the process's environment, or
/// the prototype's own switch (`PFTRACE_AGENT_ONE_CALL`, agent-bench and
/// agent-host's tests, which give the slots themselves) is set.
pub fn offered() -> bool {
    std::env::var_os("PFTRACE_AGENT_ONE_CALL").is_none()
        && std::env::var_os("PFTRACE_AGENT_BATCH").is_none_or(|v| v != "0")
}

/// Turns batching on when the environment asks and the slots are mapped
/// (prototype switch: agent-bench and agent-host's tests).
pub fn from_env() {
    if std::env::var_os("PFTRACE_AGENT_BATCH").is_none() || !crate::onecall::on() {
        return;
    }
    turn_on();
}

/// Turns batching on (the slots are mapped).
pub fn turn_on() {
    if !crate::onecall::on() {
        return;
    }
    static ATFORK: std::sync::Once = std::sync::Once::new();
    // A forked child's one thread starts an empty buffer before fork()
    // returns in it (before any at-fork hook of Python's can call a traced
    // function): the parent's records stay the parent's to drain.
    // SAFETY: the handler only writes this thread's own thread-locals.
    ATFORK.call_once(|| unsafe {
        libc::pthread_atfork(None, None, Some(after_fork_child));
    });
    ON.store(true, Ordering::Release);
}

/// The agent stops (teardown): no more batching; every thread's next
/// drain report (in a later session) says it is its first.
pub fn turn_off() {
    ON.store(false, Ordering::Release);
    SESSION.fetch_add(1, Ordering::AcqRel);
}

static SESSION: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

#[inline]
pub fn on() -> bool {
    ON.load(Ordering::Relaxed)
}

struct Thread {
    buf: UnsafeCell<BatchBuf>,
    /// `head` as of this thread's last drain report: slots before it may be
    /// reused (the kernel took them, or counts them as overrun).
    synced: Cell<u64>,
    /// Clock of the oldest record past `synced`.
    oldest: Cell<u64>,
    /// No drain report yet from this thread (its first registers the buffer).
    first: Cell<bool>,
    /// [`SESSION`] of `first`.
    session: Cell<u32>,
}

const ZERO: BatchRecord = BatchRecord { code: 0, ts_ns: 0, cpu_ns: 0, lineno: 0, event: 0, _pad: [0; 3] };

thread_local! {
    // const and without a destructor: a plain TLS slot, no lazy init, and
    // its memory stays until the thread has exited (the exit drain reads it).
    static T: Thread = const {
        Thread {
            buf: UnsafeCell::new(BatchBuf { head: 0, _pad: 0, records: [ZERO; BATCH_LEN] }),
            synced: Cell::new(0),
            oldest: Cell::new(0),
            first: Cell::new(true),
            session: Cell::new(0),
        }
    };
}

/// What became of an event.
pub enum Appended {
    /// In the buffer.
    Kept,
    /// In the buffer; now report a drain: (event argument, buffer), then call [`drained`].
    Drain(u64, *const u8),
    /// Not in the buffer: an entry that would make the buffer drain. Report
    /// the drain first (then [`drained`]) and append it again, stamped after
    /// the drain: the drain's cost (a trap into the kernel and a copy of the
    /// whole buffer) then falls before the call, not in its wall and CPU
    /// time. Drained after the entry's stamp, in one CI run the 20 us calls
    /// at which the buffer drained (calls 32, 64, ... of a thread) read
    /// 12-14 us over the body's own CPU reading, against a median of 3.9 us
    /// (tests/it/thread_cpu.rs).
    DrainFirst(u64, *const u8),
    /// The thread has no CPU slot: report it the two-report way (after
    /// draining what the buffer holds, [`pending`]).
    NoSlot,
}

/// Appends event `event` of code object `code`, stamped now.
#[inline]
pub fn append(event: u8, code: u64, line: i32) -> Appended {
    let Some((ts, cpu)) = crate::onecall::now_and_cpu_here() else {
        return Appended::NoSlot;
    };
    T.with(|t| {
        let session = SESSION.load(Ordering::Relaxed);
        if t.session.get() != session {
            // A new session: the kernel has no entry for this thread.
            t.session.set(session);
            // (as after a fork: an empty buffer, which BATCH_FIRST starts at 0)
            t.first.set(true);
            t.synced.set(0);
            t.oldest.set(0);
            unsafe { std::ptr::write_volatile(&raw mut (*t.buf.get()).head, 0) };
        }
        let buf = t.buf.get();
        // SAFETY: only this thread writes its buffer (the kernel only reads).
        let head = unsafe { std::ptr::read_volatile(&raw const (*buf).head) };
        let synced = t.synced.get();
        let first = t.first.get();
        let drain = first
            || head + 1 - synced >= BATCH_LEN as u64
            || head != synced && ts.saturating_sub(t.oldest.get()) > MAX_AGE_NS;
        if drain && agent::is_entry(event) {
            let event = agent::BATCH | if first { agent::BATCH_FIRST } else { 0 };
            return Appended::DrainFirst(event, buf as *const u8);
        }
        let rec = BatchRecord { code, ts_ns: ts, cpu_ns: cpu, lineno: line, event, _pad: [0; 3] };
        unsafe {
            std::ptr::write_volatile(&raw mut (*buf).records[(head % BATCH_LEN as u64) as usize], rec);
            // The record before the head that publishes it (the kernel reads
            // this thread's memory on this CPU, at its syscall or switch-out).
            compiler_fence(Ordering::Release);
            std::ptr::write_volatile(&raw mut (*buf).head, head + 1);
        }
        if head == synced {
            t.oldest.set(ts);
        }
        if drain {
            let event = agent::BATCH | if first { agent::BATCH_FIRST } else { 0 };
            Appended::Drain(event, buf as *const u8)
        } else {
            Appended::Kept
        }
    })
}

/// A drain report to make now if this thread holds records past its last
/// one (in this session): (event argument, buffer).
#[inline]
pub fn pending() -> Option<(u64, *const u8)> {
    T.with(|t| {
        if t.session.get() != SESSION.load(Ordering::Relaxed) {
            return None;
        }
        let head = unsafe { std::ptr::read_volatile(&raw const (*t.buf.get()).head) };
        (head != t.synced.get()).then(|| {
            let event = agent::BATCH | if t.first.get() { agent::BATCH_FIRST } else { 0 };
            (event, t.buf.get() as *const u8)
        })
    })
}

/// After a drain report: every record so far is the kernel's.
#[inline]
pub fn drained() {
    T.with(|t| {
        t.synced.set(unsafe { std::ptr::read_volatile(&raw const (*t.buf.get()).head) });
        t.first.set(false);
    })
}

/// pthread_atfork child handler: a new thread (to the kernel) with an empty buffer.
extern "C" fn after_fork_child() {
    T.with(|t| {
        unsafe { std::ptr::write_volatile(&raw mut (*t.buf.get()).head, 0) };
        t.synced.set(0);
        t.oldest.set(0);
        t.first.set(true);
    })
}
