//! Holding a process that just exec'd an interpreter file pftraced has no
//! probes on yet, while they are made: PTRACE_SEIZE then PTRACE_INTERRUPT
//! stop it (a ptrace event stop: no SIGSTOP, so its parent sees no job
//! control change), and PTRACE_DETACH lets it go. Making a file's host-wide
//! probes takes 4-12 ms here, and a Python reaches its first line about
//! 10 ms after exec: without the hold the first process of a file lost
//! calls (bench/race-free/README.md: 2 of 15 late).
//!
//! ptrace's tracer is a thread, and a stop may be slow to come (a process in
//! an uninterruptible sleep, e.g. reading a file on a FUSE mount its owner
//! serves, stops only when the sleep ends): so each hold is a thread of its
//! own that seizes, waits and detaches, and the daemon waits for the stop at
//! most [`MAX_WAIT`], never blocked by a traced user's process.

use std::{
    io,
    sync::mpsc,
    time::{Duration, Instant},
};

/// How long to poll for the stop; then wait for it without polling (it
/// stops at its next return to user space; PTRACE_INTERRUPT ends an
/// interruptible sleep, so only an uninterruptible one delays it). It must
/// be waited for: a running tracee cannot be detached.
const POLL: Duration = Duration::from_millis(20);

/// How long the daemon waits for a held process to stop (then it goes on
/// without the hold; the hold's thread lets the process go once it stops).
/// Stops came within 0.3 ms here (median of the holds logged by the
/// racefree test).
const MAX_WAIT: Duration = Duration::from_millis(50);

/// A process held stopped; released on drop (by its thread, which
/// detaches it).
#[derive(Debug)]
pub struct Hold {
    /// Dropped to release.
    _release: mpsc::Sender<()>,
}

impl Hold {
    /// Stops `pid`. Fails when it cannot be traced (another tracer has it,
    /// or it is gone) or did not stop within [`MAX_WAIT`].
    pub fn stop(pid: u32) -> io::Result<Self> {
        let (stopped_tx, stopped_rx) = mpsc::channel::<io::Result<()>>();
        let (release, released) = mpsc::channel::<()>();
        std::thread::Builder::new().name(format!("pftrace-hold-{pid}")).spawn(move || {
            match Tracee::stop(pid) {
                Ok(tracee) => {
                    let _ = stopped_tx.send(Ok(()));
                    // Until the Hold is dropped (its sender goes), then detach.
                    let _ = released.recv();
                    drop(tracee);
                }
                Err(err) => {
                    let _ = stopped_tx.send(Err(err));
                }
            }
        })?;
        match stopped_rx.recv_timeout(MAX_WAIT) {
            Ok(Ok(())) => Ok(Self { _release: release }),
            Ok(Err(err)) => Err(err),
            // `release` goes here: the thread detaches it as soon as it stops.
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("it did not stop within {} ms (in an uninterruptible sleep?)", MAX_WAIT.as_millis()),
            )),
        }
    }
}

/// A process stopped by this thread (its tracer); detached on drop.
#[derive(Debug)]
struct Tracee {
    pid: libc::pid_t,
    /// A signal the process got while held: given back on release.
    signal: i32,
    /// It died while we traced it (its exit was collected: nothing to release).
    dead: bool,
}

/// What a wait on the tracee said.
enum Waited {
    /// In a ptrace stop after PTRACE_INTERRUPT (or a group stop).
    EventStop,
    /// In a signal-delivery stop: the signal.
    Signal(i32),
    /// Exited or killed (its exit is collected, so its parent can reap it).
    Gone,
    /// Nothing yet (polling).
    Nothing,
}

impl Tracee {
    /// Stops `pid`, waiting as long as that takes.
    fn stop(pid: u32) -> io::Result<Self> {
        let pid = pid as libc::pid_t;
        // SAFETY: ptrace requests on another process touch none of our memory.
        if unsafe { libc::ptrace(libc::PTRACE_SEIZE, pid, 0, 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // From here on, dropping `hold` detaches it, or collects its exit.
        let mut hold = Self { pid, signal: 0, dead: false };
        // SAFETY: as above. If it fails the process is dying: the wait below sees its exit.
        unsafe { libc::ptrace(libc::PTRACE_INTERRUPT, pid, 0, 0) };
        let deadline = Instant::now() + POLL;
        loop {
            match hold.wait(Instant::now() >= deadline)? {
                Waited::EventStop => return Ok(hold),
                Waited::Signal(sig) => {
                    // A signal-delivery stop came first: keep the signal for
                    // the release; the interrupt's stop comes next.
                    hold.signal = sig;
                    // SAFETY: as above.
                    unsafe { libc::ptrace(libc::PTRACE_CONT, pid, 0, 0) };
                }
                Waited::Gone => return Err(io::Error::from_raw_os_error(libc::ESRCH)),
                Waited::Nothing => std::thread::sleep(Duration::from_micros(50)),
            }
        }
    }

    /// One wait for the tracee (`block`: until something happens).
    fn wait(&mut self, block: bool) -> io::Result<Waited> {
        let mut status = 0;
        let flags = if block { libc::__WALL } else { libc::__WALL | libc::WNOHANG };
        // SAFETY: waitpid on one pid writes only `status`.
        let r = unsafe { libc::waitpid(self.pid, &mut status, flags) };
        if r < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ECHILD) {
                self.dead = true; // nothing of it left to wait for
            }
            return Err(err);
        }
        if r == 0 {
            return Ok(Waited::Nothing);
        }
        if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
            self.dead = true;
            return Ok(Waited::Gone);
        }
        if libc::WIFSTOPPED(status) && status >> 16 == 0 {
            return Ok(Waited::Signal(libc::WSTOPSIG(status)));
        }
        Ok(Waited::EventStop)
    }
}

impl Drop for Tracee {
    /// Detaches the process, giving back a signal it got meanwhile. A
    /// tracee that is not stopped (it was killed while held) cannot be
    /// detached: its exit is collected instead, or its parent could never
    /// reap it.
    fn drop(&mut self) {
        while !self.dead {
            // SAFETY: detaching a process we seized.
            if unsafe { libc::ptrace(libc::PTRACE_DETACH, self.pid, 0, self.signal as libc::c_long) } == 0 {
                return;
            }
            match self.wait(true) {
                Ok(Waited::Signal(sig)) => self.signal = sig,
                Ok(_) => {}
                Err(_) => return,
            }
        }
    }
}
