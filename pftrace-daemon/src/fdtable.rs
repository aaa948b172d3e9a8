//! Growing pftraced's file-descriptor table once, at start, to what tracing
//! `limits.max_processes` processes needs: each traced process holds two
//! descriptors (its exit watch and its /proc/PID/mem), and the kernel grows
//! a multi-threaded process's table (64, 128, 256, ... slots) with a
//! synchronize_rcu() that blocks the opening thread. The event loop blocked
//! 16-67 ms there, at the ~70th Python of a watched cgroup (its pidfd was
//! descriptor 253 every time: the table growing past 256), while that
//! Python, and the ones exec'd behind it, ran their first lines with their
//! semaphores still 0: 1-3 of 80 Pythons missed every early call in 17 of
//! 29 runs (2 cores, load 4-11); with the table grown at start, 0 in 10 of
//! 10 runs. Grown before any thread starts, no
//! grace period is waited for; a table never shrinks.
//!
//! The soft RLIMIT_NOFILE is raised first (up to the hard limit) to what
//! that needs: at the usual soft limit of 1024 the 500th Python of a watched
//! cgroup would be refused with EMFILE. A command pftraced launches gets the
//! soft limit pftraced was started with ([`restore_for_child`]), not the
//! raised one: the traced program must run as it would untraced.

use std::{io, os::fd::AsRawFd as _, sync::OnceLock};

/// The soft and hard RLIMIT_NOFILE pftraced was started with, when
/// [`raise_limit`] changed them.
static STARTED_WITH: OnceLock<libc::rlimit> = OnceLock::new();

/// The soft RLIMIT_NOFILE before and after [`raise_limit`].
#[derive(Debug, PartialEq, Eq)]
pub struct SoftLimit {
    pub was: u64,
    pub now: u64,
}

/// Raises the soft RLIMIT_NOFILE to `fds` (at most the hard limit).
pub fn raise_limit(fds: usize) -> io::Result<SoftLimit> {
    let limit = current_limit()?;
    let want = (fds as u64).min(limit.rlim_max);
    if limit.rlim_cur >= want {
        return Ok(SoftLimit { was: limit.rlim_cur, now: limit.rlim_cur });
    }
    let raised = libc::rlimit { rlim_cur: want, rlim_max: limit.rlim_max };
    // SAFETY: setrlimit reads only `raised`.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let _ = STARTED_WITH.set(limit);
    Ok(SoftLimit { was: limit.rlim_cur, now: want })
}

/// In a child between fork and exec: puts back the soft limit pftraced was
/// started with, if it raised it. Async-signal-safe (one setrlimit call).
pub fn restore_for_child() -> io::Result<()> {
    if let Some(limit) = STARTED_WITH.get() {
        // SAFETY: setrlimit reads only `limit`.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, limit) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn current_limit() -> io::Result<libc::rlimit> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes only `limit`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(limit)
}

/// Descriptors to reserve for tracing `max_processes` processes: two per
/// process, and room for the kernel side's maps, programs and links, the
/// control socket's clients and the output files.
pub fn fds_for(max_processes: usize) -> usize {
    max_processes.saturating_mul(2).saturating_add(1024)
}

/// Grows the table to hold `fds` descriptors (at most the soft
/// RLIMIT_NOFILE); how many it holds now.
pub fn reserve(fds: usize) -> io::Result<usize> {
    let limit = current_limit()?;
    let top = fds.min(usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX)).min(i32::MAX as usize);
    if top == 0 {
        return Ok(0);
    }
    let file = std::fs::File::open("/dev/null")?;
    // A descriptor at `top - 1` or above makes the kernel size the table for
    // it; closed at once, the table stays.
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor we own returns a new one we close.
    let high = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_DUPFD_CLOEXEC, (top - 1) as libc::c_int) };
    if high < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `high` is ours and used nowhere else.
    unsafe { libc::close(high) };
    Ok(top)
}
