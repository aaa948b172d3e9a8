//! The bpf(2) commands aya does not make for us (loading the uprobe_multi
//! program, creating perf and uprobe_multi links), each returning a new fd.

use std::{
    io,
    os::fd::{FromRawFd as _, OwnedFd},
};

// From include/uapi/linux/bpf.h.
pub const BPF_PROG_LOAD: libc::c_long = 5;
pub const BPF_LINK_CREATE: libc::c_long = 28;

/// Runs bpf(`cmd`, `attr`) and takes ownership of the fd it returns.
///
/// # Safety
/// `attr` must be a `#[repr(C)]` prefix of `union bpf_attr` as `cmd` reads
/// it, and every pointer in it must be valid for the duration of the call.
pub unsafe fn bpf_fd<T>(cmd: libc::c_long, attr: &T) -> io::Result<OwnedFd> {
    // SAFETY: the caller vouches for attr; its size is passed along.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *const T, size_of::<T>() as u32) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
