//! Waiting for a process to exit without polling: a pidfd becomes readable
//! when its process terminates.

use std::{
    io,
    os::fd::{FromRawFd as _, OwnedFd},
};

use tokio::io::{Interest, unix::AsyncFd};

/// Opens a pidfd for `pid`.
pub fn pidfd(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Completes when the process behind `fd` has exited.
pub async fn exited(fd: OwnedFd) -> io::Result<()> {
    // SAFETY: we own the pidfd and it stays open while registered.
    let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }?;
    let _guard = fd.readable().await?;
    Ok(())
}
