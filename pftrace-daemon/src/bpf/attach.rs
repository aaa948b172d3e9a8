//! Attaching the loaded programs to the USDT sites of a binary with
//! kernel-managed semaphores: one uprobe_multi link per process (see
//! [`super::multi`]), or, on kernels without it, a uprobe perf event per site
//! (uprobe PMU, `ref_ctr_offset` in config) bound to the program by a BPF
//! perf link carrying the attach cookie. aya 0.14 can pass a cookie but not a
//! semaphore offset, hence this file.

use super::sys::{BPF_LINK_CREATE, bpf_fd};
use std::{
    ffi::CString,
    fs, io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    os::unix::ffi::OsStrExt as _,
    path::Path,
};

/// Errors while creating a uprobe attachment.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(
        "cannot read the kernel's uprobe PMU description at {path}: {source} (is CONFIG_UPROBE_EVENTS enabled?)"
    )]
    UprobePmu { path: String, source: io::Error },
    #[error("unexpected format in {path}: {text:?}")]
    PmuFormat { path: String, text: String },
    #[error("perf_event_open(uprobe {binary} +{offset:#x}, pid {pid}) failed: {source}")]
    PerfEventOpen { binary: String, offset: u64, pid: i32, source: io::Error },
    #[error("BPF_LINK_CREATE for uprobe {binary} +{offset:#x} failed: {source}")]
    LinkCreate { binary: String, offset: u64, source: io::Error },
    #[error("BPF_LINK_CREATE of a uprobe_multi link on {binary} (pid {pid}) failed: {source}")]
    MultiLink { binary: String, pid: u32, source: io::Error },
    #[error("binary path {binary} contains a NUL byte")]
    BadPath { binary: String },
    #[error("enabling uprobe {binary} +{offset:#x} failed: {source}")]
    Enable { binary: String, offset: u64, source: io::Error },
}

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

/// The live probes of one attachment (a process's sites, or a binary's
/// host-wide): dropping it detaches them, and the kernel lowers the
/// semaphores it raised (also when the daemon is killed).
#[derive(Debug)]
pub struct UprobeLink {
    _fds: Vec<OwnedFd>,
}

/// One probe site to attach.
#[derive(Debug, Clone, Copy)]
pub struct Site {
    /// File offset of the probe instruction.
    pub offset: u64,
    /// File offset of the semaphore, 0 if the probe has none.
    pub semaphore_offset: u64,
    /// Value returned by `bpf_get_attach_cookie()`: the spec id, plus
    /// [`pftrace_common::COOKIE_RETURN`] at return sites.
    pub cookie: u64,
}

/// How the kernel is asked for uprobes.
#[derive(Debug)]
pub enum Method {
    /// One uprobe_multi link for all sites, running the program serving both probes.
    Multi { prog: OwnedFd },
    /// One perf event and BPF perf link per site (kernels without uprobe_multi).
    Perf { pmu: UprobePmu, entry: OwnedFd, ret: OwnedFd },
}

/// A request to attach one program at one probe site.
pub struct UprobeRequest<'a> {
    /// The ELF file holding the probe, as a path this process can open.
    pub binary: &'a Path,
    /// File offset of the probe instruction.
    pub offset: u64,
    /// File offset of the semaphore, 0 if the probe has none.
    pub semaphore_offset: u64,
    /// Process to scope the uprobe to; `None` means every process mapping the file.
    pub pid: Option<u32>,
    /// Value returned by `bpf_get_attach_cookie()` in the program (the spec id).
    pub cookie: u64,
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

/// The attachment of every probe site of one binary, in one process or
/// host-wide, owning everything it needs so it can run on a blocking thread
/// (attaching to a process in the middle of exec waits for the exec to
/// finish, and the daemon's event loop must not wait with it).
#[derive(Debug)]
pub struct AttachJob {
    pub(crate) method: std::sync::Arc<Method>,
    pub(crate) binary: std::path::PathBuf,
    pub(crate) pid: Option<u32>,
    pub(crate) sites: Vec<Site>,
}

impl AttachJob {
    /// Makes the attachment.
    pub fn run(&self) -> Result<UprobeLink, AttachError> {
        match &*self.method {
            Method::Multi { prog } => {
                let binary = crate::events::printable_path(&self.binary);
                let path = CString::new(self.binary.as_os_str().as_bytes())
                    .map_err(|_| AttachError::BadPath { binary: binary.clone() })?;
                let pid = self.pid.unwrap_or(0);
                let link = super::multi::link(prog.as_fd(), &path, &self.sites, pid)
                    .map_err(|source| AttachError::MultiLink { binary, pid, source })?;
                Ok(UprobeLink { _fds: vec![link] })
            }
            Method::Perf { pmu, entry, ret } => {
                let mut fds = Vec::new();
                for site in &self.sites {
                    let prog = if site.cookie & pftrace_common::COOKIE_RETURN != 0 { ret } else { entry };
                    let req = UprobeRequest {
                        binary: &self.binary,
                        offset: site.offset,
                        semaphore_offset: site.semaphore_offset,
                        pid: self.pid,
                        cookie: site.cookie,
                    };
                    fds.extend(attach_uprobe(pmu, prog.as_fd(), &req)?);
                }
                Ok(UprobeLink { _fds: fds })
            }
        }
    }
}

/// Attaches `prog` at the site described by `req`.
pub fn attach_uprobe(
    pmu: &UprobePmu,
    prog: BorrowedFd<'_>,
    req: &UprobeRequest<'_>,
) -> Result<[OwnedFd; 2], AttachError> {
    let binary = crate::events::printable_path(req.binary);
    let path = CString::new(req.binary.as_os_str().as_bytes()).map_err(|_| AttachError::PerfEventOpen {
        binary: binary.clone(),
        offset: req.offset,
        pid: -1,
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })?;

    let mut attr = [0u8; PERF_ATTR_SIZE];
    let put = |attr: &mut [u8; PERF_ATTR_SIZE], at: usize, bytes: &[u8]| {
        attr[at..at + bytes.len()].copy_from_slice(bytes)
    };
    put(&mut attr, 0, &pmu.pmu_type.to_ne_bytes()); // type
    put(&mut attr, 4, &(PERF_ATTR_SIZE as u32).to_ne_bytes()); // size
    let config = req.semaphore_offset << pmu.ref_ctr_shift;
    put(&mut attr, 8, &config.to_ne_bytes()); // config: ref_ctr_offset
    put(&mut attr, 56, &(path.as_ptr() as u64).to_ne_bytes()); // config1: uprobe_path
    put(&mut attr, 64, &req.offset.to_ne_bytes()); // config2: probe_offset

    // pid-scoped events follow the process on any CPU; host-wide ones need a
    // CPU number, and CPU 0 still fires on every CPU for BPF (libbpf does the same).
    let (pid, cpu) = match req.pid {
        Some(pid) => (pid as i32, -1),
        None => (-1, 0),
    };
    // SAFETY: attr is a valid perf_event_attr of the size it declares; path outlives the call.
    let fd = unsafe {
        libc::syscall(libc::SYS_perf_event_open, attr.as_ptr(), pid, cpu, -1, PERF_FLAG_FD_CLOEXEC)
    };
    if fd < 0 {
        return Err(AttachError::PerfEventOpen {
            binary,
            offset: req.offset,
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
        bpf_cookie: req.cookie,
        _reserved: [0; 4],
    };
    // SAFETY: link_attr is a zero-tailed prefix of union bpf_attr for BPF_LINK_CREATE.
    let link = unsafe { bpf_fd(BPF_LINK_CREATE, &link_attr) }.map_err(|source| AttachError::LinkCreate {
        binary: binary.clone(),
        offset: req.offset,
        source,
    })?;

    // SAFETY: ioctl on a perf event fd we own.
    if unsafe { libc::ioctl(perf.as_raw_fd(), PERF_EVENT_IOC_ENABLE as _, 0) } < 0 {
        return Err(AttachError::Enable { binary, offset: req.offset, source: io::Error::last_os_error() });
    }
    Ok([link, perf])
}
