//! Holding a process that just exec'd an interpreter file pftraced has no
//! probes on yet, while they are made: PTRACE_SEIZE then PTRACE_INTERRUPT
//! stop it (a ptrace event stop: no SIGSTOP, so its parent sees no job
//! control change), and PTRACE_DETACH lets it go. Making a file's host-wide
//! probes takes 4-12 ms here, and a Python reaches its first line about
//! 10 ms after exec: without the hold the first process of a file lost
//! calls (bench/race-free/README.md: 2 of 15 late).
//!
//! ptrace's tracer is a thread: hold and release on the same thread.

use std::{
    io,
    time::{Duration, Instant},
};

/// How long to poll for the stop; then wait for it without polling (it
/// stops at its next return to user space; PTRACE_INTERRUPT ends an
/// interruptible sleep, so only an uninterruptible one delays it). It must
/// be waited for: a running tracee cannot be detached.
const POLL: Duration = Duration::from_millis(20);

/// A process held stopped; released (detached) on drop.
#[derive(Debug)]
pub struct Hold {
    pid: libc::pid_t,
    /// A signal the process got while held: given back on release.
    signal: i32,
}

impl Hold {
    /// Stops `pid`. Fails when it cannot be traced (another tracer has it,
    /// or it is gone).
    pub fn stop(pid: u32) -> io::Result<Self> {
        let pid = pid as libc::pid_t;
        // SAFETY: ptrace requests on another process touch none of our memory.
        if unsafe { libc::ptrace(libc::PTRACE_SEIZE, pid, 0, 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut hold = Self { pid, signal: 0 };
        // SAFETY: as above.
        if unsafe { libc::ptrace(libc::PTRACE_INTERRUPT, pid, 0, 0) } < 0 {
            return Err(io::Error::last_os_error()); // dropping detaches
        }
        let deadline = Instant::now() + POLL;
        loop {
            let mut status = 0;
            let flags = if Instant::now() < deadline { libc::__WALL | libc::WNOHANG } else { libc::__WALL };
            // SAFETY: waitpid on one pid writes only `status`.
            let r = unsafe { libc::waitpid(pid, &mut status, flags) };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
            if r == pid {
                if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                if libc::WIFSTOPPED(status) {
                    if status >> 16 == libc::PTRACE_EVENT_STOP {
                        return Ok(hold);
                    }
                    // A signal-delivery stop came first: keep the signal
                    // for the release, and wait for the interrupt's stop.
                    hold.signal = libc::WSTOPSIG(status);
                    // SAFETY: as above.
                    unsafe { libc::ptrace(libc::PTRACE_CONT, pid, 0, 0) };
                    unsafe { libc::ptrace(libc::PTRACE_INTERRUPT, pid, 0, 0) };
                }
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        // SAFETY: detaching a process we seized; the signal it had pending is given back.
        unsafe { libc::ptrace(libc::PTRACE_DETACH, self.pid, 0, self.signal as libc::c_long) };
    }
}
