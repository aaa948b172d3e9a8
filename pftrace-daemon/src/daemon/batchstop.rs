//! The batched agent road when pftraced stops tracing (`pftracectl stop`,
//! SIGTERM, its launched command done): no event a thread buffered is lost
//! uncounted.
//!
//! 1. Every agent is told to stop, and pftraced waits (at most [`GRACE`])
//!    until each has closed its connection: it tore down holding the GIL,
//!    so every other Python thread of it let the GIL go since and blocked
//!    on it (a switch-out, which drains its buffer: pftrace_agent_batch_switch).
//! 2. Until [`GRACE`] has passed, the ring is read while any registered
//!    thread (`BATCH_OF`) still holds events past its tail (its head read
//!    with process_vm_readv).
//! 3. A thread still holding events then (one running C code without the
//!    GIL that never switched out, or whose agent did not answer) is taken
//!    from the kernel (lookup-and-delete: no later drain sends its events
//!    again) and pftraced reads its buffer itself: the process's own memory
//!    describing its own calls, the trust a kernel drain has (the tid is
//!    the kernel's map key, the pid and RSS from /proc). Counted as
//!    `batch.by_daemon`; a buffer that cannot be read is counted as
//!    `batch.stop_unread` (threads, events unknown).
//!
//! Read rather than only counted: a thread spinning in C holds its last
//! entries there, and an entry lost makes its call vanish where the
//! two-report road shows it incomplete; reading costs one syscall a thread.

use std::{
    sync::mpsc::TryRecvError,
    time::{Duration, Instant},
};

use pftrace_common::{AgentBatchEvent, AgentEvent, BATCH_LEN, BatchBuf, agent, batch, kind};

use super::Daemon;
use crate::{bpf::ringbuf::EventRing, clock::WallClock};

/// How long pftraced keeps the drains attached at its stop, at most, for
/// agents to tear down and threads to switch out. An agent tears down
/// within the GIL's switch interval (5 ms) of a Python thread spinning.
pub const GRACE: Duration = Duration::from_millis(200);

/// What pftraced did itself at its stop.
#[derive(Debug, Default)]
pub struct BatchStop {
    /// Events read from buffers by pftraced.
    pub by_daemon: u64,
    /// Threads whose buffer held events pftraced could not read.
    pub unread: u64,
}

/// A registered thread still holding events: its head if its buffer could
/// be read (None: not readable).
struct Holding {
    tid: u32,
    head: Option<u64>,
}

impl Daemon {
    /// Stops the agents and waits until their threads' buffers are on the
    /// ring, then reads what is left itself (see the module's comment).
    pub(super) async fn batch_stop(&mut self, ring: &mut EventRing) {
        if !self.probes.batch {
            return;
        }
        // Exits not settled yet are settled at the end (their threads' drains
        // are on the ring by then, or never come).
        let started = Instant::now();
        let waits = self.agent.as_mut().map(|a| a.stop_all_waiting()).unwrap_or_default();
        let mut agents_done = false;
        loop {
            self.drain(ring);
            agents_done =
                agents_done || waits.iter().all(|rx| !matches!(rx.try_recv(), Err(TryRecvError::Empty)));
            let holding = self.batch_holding();
            if agents_done && holding.iter().all(|h| h.head.is_none()) || started.elapsed() >= GRACE {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.drain(ring);
        let mut completed = std::mem::take(&mut self.completed);
        for h in self.batch_holding() {
            self.batch_read_self(h, &mut completed);
        }
        self.store_calls(std::mem::take(&mut completed));
        self.completed = completed;
        self.settle_all = true;
        self.drain(ring);
        if self.batch_stop.by_daemon + self.batch_stop.unread > 0 {
            log::info!(
                "batched agent road at stop: {} events read from threads' buffers by pftraced, {} buffers unreadable \
                 (after {:?})",
                self.batch_stop.by_daemon,
                self.batch_stop.unread,
                started.elapsed()
            );
        }
    }

    /// Registered threads whose buffer holds events past their tail, or
    /// could not be read (a thread gone since is not listed: its exit
    /// drained it and removed it).
    fn batch_holding(&self) -> Vec<Holding> {
        self.probes
            .batch_threads()
            .into_iter()
            .filter(|(_, t)| t.addr != 0)
            .filter_map(|(tid, tail)| {
                let mut head = [0u8; 8];
                match vm_read(tid, tail.addr, &mut head) {
                    Ok(()) => {
                        let head = u64::from_ne_bytes(head);
                        (head != tail.tail).then_some(Holding { tid, head: Some(head) })
                    }
                    Err(_) if std::path::Path::new(&format!("/proc/{tid}")).exists() => {
                        Some(Holding { tid, head: None })
                    }
                    Err(_) => None,
                }
            })
            .collect()
    }

    /// Takes one thread from the kernel and reads its buffer's events past
    /// its tail as a drain would, into the pairing.
    fn batch_read_self(&mut self, h: Holding, completed: &mut Vec<crate::pairing::Call>) {
        // Its tail as the kernel last left it; no kernel drain after this.
        let Some(tail) = self.probes.batch_take(h.tid) else { return };
        let mut raw = [0u8; size_of::<BatchBuf>()];
        // Only a thread of a process pftraced traces: the kernel removes a
        // thread's entry at its exit, before its tid can be reused, so this
        // only guards against a mistake here, at the cost of one lookup.
        let pid = tgid_of(h.tid).filter(|&pid| self.processes.is_running(pid));
        let (Some(pid), Ok(())) = (pid, vm_read(h.tid, tail.addr, &mut raw)) else {
            self.batch_stop.unread += 1;
            return;
        };
        // SAFETY: the size of a BatchBuf; plain old data.
        let buf: BatchBuf = unsafe { std::ptr::read_unaligned(raw.as_ptr().cast()) };
        if buf.head <= tail.tail {
            return;
        }
        let mut from = tail.tail;
        if buf.head - from > BATCH_LEN as u64 {
            // Overwritten before any drain took them: not readable any more.
            self.batch_stop.unread += 1;
            from = buf.head - BATCH_LEN as u64;
        }
        let ev = AgentBatchEvent {
            head: AgentEvent {
                ts_ns: WallClock::monotonic_now_ns(),
                pid,
                tid: h.tid,
                lineno: 0,
                kind: kind::AGENT,
                event: 0,
                flags: agent::flag::BATCH,
                _pad: 0,
                thread_cpu_ns: 0,
                rss_pages: rss_pages(h.tid),
                code: 0,
            },
            tail: from,
            count: (buf.head - from) as u32,
            why: batch::DAEMON,
            records: buf.records,
        };
        // SAFETY: plain old data, read as the ring's bytes would be.
        let bytes =
            unsafe { std::slice::from_raw_parts((&raw const ev).cast::<u8>(), size_of::<AgentBatchEvent>()) };
        match self.decoder.decode_agent_batch(bytes) {
            Ok(events) => {
                self.batch_stop.by_daemon += events.len() as u64;
                for ev in events {
                    self.take_call(ev, completed);
                }
            }
            Err(err) => log::warn!("{err}"),
        }
    }
}

/// Reads `out.len()` bytes at `addr` of thread `tid`'s process.
fn vm_read(tid: u32, addr: u64, out: &mut [u8]) -> std::io::Result<()> {
    let local = libc::iovec { iov_base: out.as_mut_ptr().cast(), iov_len: out.len() };
    let remote = libc::iovec { iov_base: addr as *mut _, iov_len: out.len() };
    // SAFETY: local points at `out`; the remote range is only read.
    let n = unsafe { libc::process_vm_readv(tid as libc::pid_t, &local, 1, &remote, 1, 0) };
    if n == out.len() as isize {
        Ok(())
    } else if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof))
    }
}

/// The process (thread group) of thread `tid`, from /proc.
fn tgid_of(tid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("Tgid:")).and_then(|v| v.trim().parse().ok())
}

/// Resident pages of thread `tid`'s process (statm's second field).
fn rss_pages(tid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{tid}/statm"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}
