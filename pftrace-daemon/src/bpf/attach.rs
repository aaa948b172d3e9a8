//! Attaching a loaded program to resolved probe points, through whichever
//! interface the kernel has: one uprobe_multi link for all points
//! ([`super::multi`]), or a perf event and link per point ([`super::perf`]).
//! Semaphores are kernel-managed either way (`ref_ctr_offset`): raised while
//! the link lives, lowered when it goes, also if the daemon is killed.
//!
//! An [`AttachJob`] owns everything it needs, so it can run on a blocking
//! thread (attaching to a process in the middle of exec waits for the exec
//! to finish, and the daemon's event loop must not wait with it) or inline.

use std::{
    ffi::CString,
    io,
    os::fd::{AsFd as _, OwnedFd},
    os::unix::ffi::OsStrExt as _,
    sync::Arc,
};

use super::{
    perf::UprobePmu,
    points::{ResolvedPoints, Scope},
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
    #[error(
        "perf_event_open(uprobe {binary} +{offset:#x}, pid {pid}) failed: {source}{}",
        conflict_hint(source)
    )]
    PerfEventOpen { binary: String, offset: u64, pid: i32, source: io::Error },
    #[error("BPF_LINK_CREATE for uprobe {binary} +{offset:#x} failed: {source}")]
    LinkCreate { binary: String, offset: u64, source: io::Error },
    #[error(
        "BPF_LINK_CREATE of a uprobe_multi link on {binary} (pid {pid}) failed: {source}{}",
        conflict_hint(source)
    )]
    MultiLink { binary: String, pid: u32, source: io::Error },
    #[error("binary path {binary} contains a NUL byte")]
    BadPath { binary: String },
    #[error("enabling uprobe {binary} +{offset:#x} failed: {source}")]
    Enable { binary: String, offset: u64, source: io::Error },
}

impl AttachError {
    /// Whether the kernel refused the probes as it refuses a probe site
    /// already held with the other semaphore setting: a uprobe made with a
    /// kernel-managed semaphore (`ref_ctr_offset`: pid-scoped probes,
    /// `--binary`, bpftrace, perf) and one without (pftraced's dormant
    /// probes of watched cgroups, which raise semaphores themselves) cannot
    /// be on one site of one file at once: EINVAL, and the kernel log says
    /// "ref_ctr_offset mismatch". (EINVAL may have other causes, which the
    /// other setting fails on too: a caller tries it once, then refuses.)
    pub fn is_semaphore_conflict(&self) -> bool {
        match self {
            Self::MultiLink { source, .. } | Self::PerfEventOpen { source, .. } => {
                source.raw_os_error() == Some(libc::EINVAL)
            }
            _ => false,
        }
    }
}

/// What an EINVAL from making uprobes most likely means, for the message.
fn conflict_hint(source: &io::Error) -> &'static str {
    if source.raw_os_error() == Some(libc::EINVAL) {
        " (EINVAL: most likely another tracer's uprobes hold these probe sites with the other \
         semaphore setting, see \"ref_ctr_offset mismatch\" in the kernel log: a watched cgroup's \
         processes get their semaphores raised by pftraced itself, while --pid, --binary, --all, \
         bpftrace and perf have the kernel raise them, and a file's site takes one setting at a \
         time; trace this process from the daemon already tracing the file, or stop the other tracer)"
    } else {
        ""
    }
}

/// The live probes of one attachment (a process's points, or a file's
/// host-wide): dropping it detaches them, and the kernel lowers the
/// semaphores it raised (also when the daemon is killed).
#[derive(Debug)]
pub struct UprobeLink {
    _fds: Vec<OwnedFd>,
}

/// A loaded program (or pair) and the kernel interface that attaches it.
#[derive(Debug)]
pub enum Programs {
    /// One uprobe_multi link for all points, running one program (a USDT
    /// program tells entry from return by the cookie).
    Multi { prog: OwnedFd },
    /// A perf event and BPF perf link per point (kernels without
    /// uprobe_multi): `ret` runs at points whose cookie has
    /// [`pftrace_common::COOKIE_RETURN`], `entry` at the others (the same
    /// program twice where one serves all).
    Perf { pmu: UprobePmu, entry: OwnedFd, ret: OwnedFd },
}

/// One attachment to make: programs, points and scope.
#[derive(Debug)]
pub struct AttachJob {
    pub(crate) programs: Arc<Programs>,
    pub(crate) points: ResolvedPoints,
    pub(crate) scope: Scope,
}

impl AttachJob {
    /// Makes the attachment (blocking: see the module's note).
    pub fn run(&self) -> Result<UprobeLink, AttachError> {
        let binary = crate::events::printable_path(&self.points.path);
        let path = CString::new(self.points.path.as_os_str().as_bytes())
            .map_err(|_| AttachError::BadPath { binary: binary.clone() })?;
        match &*self.programs {
            Programs::Multi { prog } => {
                let pid = self.scope.pid().unwrap_or(0);
                let link = super::multi::link(prog.as_fd(), &path, &self.points, self.scope)
                    .map_err(|source| AttachError::MultiLink { binary, pid, source })?;
                Ok(UprobeLink { _fds: vec![link] })
            }
            Programs::Perf { pmu, entry, ret } => {
                let mut fds = Vec::new();
                for point in &self.points.points {
                    let prog = if point.cookie & pftrace_common::COOKIE_RETURN != 0 { ret } else { entry };
                    fds.extend(super::perf::attach_point(
                        pmu,
                        prog.as_fd(),
                        &path,
                        &binary,
                        point,
                        self.scope,
                    )?);
                }
                Ok(UprobeLink { _fds: fds })
            }
        }
    }
}
