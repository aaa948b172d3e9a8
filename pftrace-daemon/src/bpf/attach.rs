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
