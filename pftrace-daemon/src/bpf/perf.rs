//! The per-point attach path, for kernels without uprobe_multi (before
//! 6.6): a uprobe perf event per point (uprobe PMU, `ref_ctr_offset` in its
//! config) bound to the program by a BPF perf link carrying the point's
//! cookie. aya 0.14 can pass a cookie but not a semaphore offset, hence
//! this file.

use std::{
    ffi::CString,
    fs, io,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
};

use super::{
    attach::AttachError,
    points::{ProbePoint, Scope},
    sys::{BPF_LINK_CREATE, bpf_fd},
};

/// Where the uprobe PMU's type and config layout come from.
const UPROBE_PMU: &str = "/sys/bus/event_source/devices/uprobe";

/// The kernel's uprobe PMU: its perf type and the bit where `ref_ctr_offset` goes.
#[derive(Debug, Clone, Copy)]
pub struct UprobePmu {
    pmu_type: u32,
    ref_ctr_shift: u32,
}

impl UprobePmu {
    /// Reads the PMU type and the `ref_ctr_offset` format (`config:32-63`) from sysfs.
    pub fn discover() -> Result<Self, AttachError> {
        let read = |rel: &str| {
            let path = format!("{UPROBE_PMU}/{rel}");
            fs::read_to_string(&path)
                .map(|s| (path.clone(), s.trim().to_string()))
                .map_err(|source| AttachError::UprobePmu { path, source })
        };
        let (path, text) = read("type")?;
        let pmu_type = text.parse().map_err(|_| AttachError::PmuFormat { path, text })?;
        let (path, text) = read("format/ref_ctr_offset")?;
        let ref_ctr_shift = text
            .strip_prefix("config:")
            .and_then(|bits| bits.split('-').next())
            .and_then(|lo| lo.parse().ok())
            .ok_or(AttachError::PmuFormat { path, text })?;
        Ok(Self { pmu_type, ref_ctr_shift })
    }
}

// perf_event_attr, as far as we use it (PERF_ATTR_SIZE_VER8 = 136 bytes).
const PERF_ATTR_SIZE: usize = 136;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
// Attach type from include/uapi/linux/bpf.h.
const BPF_PERF_EVENT: u32 = 41;

#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    bpf_cookie: u64,
    _reserved: [u64; 4],
}

/// Attaches `prog` at one point of the file `path` (`binary`: its name for
/// messages); returns the BPF link and the perf event, which live together.
pub fn attach_point(
    pmu: &UprobePmu,
    prog: BorrowedFd<'_>,
    path: &CString,
    binary: &str,
    point: &ProbePoint,
    scope: Scope,
) -> Result<[OwnedFd; 2], AttachError> {
    let mut attr = [0u8; PERF_ATTR_SIZE];
    let put = |attr: &mut [u8; PERF_ATTR_SIZE], at: usize, bytes: &[u8]| {
        attr[at..at + bytes.len()].copy_from_slice(bytes)
    };
    put(&mut attr, 0, &pmu.pmu_type.to_ne_bytes()); // type
    put(&mut attr, 4, &(PERF_ATTR_SIZE as u32).to_ne_bytes()); // size
    let config = point.ref_ctr_offset << pmu.ref_ctr_shift;
    put(&mut attr, 8, &config.to_ne_bytes()); // config: ref_ctr_offset
    put(&mut attr, 56, &(path.as_ptr() as u64).to_ne_bytes()); // config1: uprobe_path
    put(&mut attr, 64, &point.offset.to_ne_bytes()); // config2: probe_offset

    // pid-scoped events follow the process on any CPU; host-wide ones need a
    // CPU number, and CPU 0 still fires on every CPU for BPF (libbpf does the same).
    let (pid, cpu) = match scope {
        Scope::Process(pid) => (pid as i32, -1),
        Scope::Host => (-1, 0),
    };
    // SAFETY: attr is a valid perf_event_attr of the size it declares; path outlives the call.
    let fd = unsafe {
        libc::syscall(libc::SYS_perf_event_open, attr.as_ptr(), pid, cpu, -1, PERF_FLAG_FD_CLOEXEC)
    };
    let binary = binary.to_string();
    if fd < 0 {
        return Err(AttachError::PerfEventOpen {
            binary,
            offset: point.offset,
            pid,
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: fd was just returned by the kernel and is owned by nobody else.
    let perf = unsafe { OwnedFd::from_raw_fd(fd as i32) };

    let link_attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: perf.as_raw_fd() as u32,
        attach_type: BPF_PERF_EVENT,
        flags: 0,
        bpf_cookie: point.cookie,
        _reserved: [0; 4],
    };
    // SAFETY: link_attr is a zero-tailed prefix of union bpf_attr for BPF_LINK_CREATE.
    let link = unsafe { bpf_fd(BPF_LINK_CREATE, &link_attr) }.map_err(|source| AttachError::LinkCreate {
        binary: binary.clone(),
        offset: point.offset,
        source,
    })?;

    // SAFETY: ioctl on a perf event fd we own.
    if unsafe { libc::ioctl(perf.as_raw_fd(), PERF_EVENT_IOC_ENABLE as _, 0) } < 0 {
        return Err(AttachError::Enable { binary, offset: point.offset, source: io::Error::last_os_error() });
    }
    Ok([link, perf])
}
