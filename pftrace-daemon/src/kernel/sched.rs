//! A short scheduler slice for the daemon's threads, so that a wakeup (a new
//! process in scope to attach to) preempts the CPU-bound process running
//! there instead of waiting for its slice to end.
//!
//! Measured here (kernel 6.18, 2 vCPUs): with the default slice, the daemon
//! read a new process's exec record 3.6-3.8 ms after the exec when the new
//! Python's start-up ran on its CPU; with a 100 µs slice, 70-230 µs. A Python
//! reaches its first line about 8 ms after being spawned, so those 3.6 ms
//! decide whether its first calls are traced. The share of CPU the daemon
//! gets is unchanged (the slice is a latency hint for EEVDF, kernel 6.12+;
//! older kernels ignore it for SCHED_OTHER).

use std::io;

/// The slice asked for, nanoseconds (the kernel's minimum is 100 µs).
pub const SLICE_NS: u64 = 100_000;

#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    sched_policy: u32,
    sched_flags: u64,
    sched_nice: i32,
    sched_priority: u32,
    sched_runtime: u64,
    sched_deadline: u64,
    sched_period: u64,
}

/// Gives the calling thread a short slice, keeping its nice value. Threads
/// do not inherit it: call it in each thread that should wake promptly. A
/// thread run under another policy (e.g. `chrt`) is left as it is.
pub fn short_slice() -> io::Result<()> {
    // SAFETY: plain syscalls on the calling thread.
    if unsafe { libc::sched_getscheduler(0) } != libc::SCHED_OTHER {
        return Ok(());
    }
    // SAFETY: as above; -1 is a valid nice value, so errno tells errors apart.
    let nice = unsafe {
        *libc::__errno_location() = 0;
        libc::getpriority(libc::PRIO_PROCESS, 0)
    };
    let attr = SchedAttr {
        size: size_of::<SchedAttr>() as u32,
        sched_policy: libc::SCHED_OTHER as u32,
        sched_nice: nice,
        sched_runtime: SLICE_NS,
        ..Default::default()
    };
    // SAFETY: attr is a valid struct sched_attr of the size it declares.
    if unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
