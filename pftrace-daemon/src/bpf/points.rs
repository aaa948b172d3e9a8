//! The probe points of one attachment, resolved for the kernel: what a
//! uprobe_multi link takes as three arrays (offsets, `ref_ctr_offsets`,
//! cookies) and what the per-point perf-event path takes one at a time.
//! Like aya 0.16's `ResolvedPoints`: whatever the probes are (CPython's USDT
//! sites, a function of an agent's shared object), they reach the kernel as
//! this, so both attach paths serve every kind of probe.

use std::path::PathBuf;

/// One point to put a uprobe on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbePoint {
    /// File offset of the probed instruction.
    pub offset: u64,
    /// File offset of the USDT semaphore the kernel raises while the uprobe
    /// exists (`ref_ctr_offset`); 0 for none (a plain function, or a probe
    /// without semaphore).
    pub ref_ctr_offset: u64,
    /// What `bpf_get_attach_cookie()` returns in the program at this point.
    pub cookie: u64,
}

/// Which processes an attachment fires in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Only this process (pid-scoped uprobes: only its semaphores are raised).
    Process(u32),
    /// Every process that maps the file, now and later.
    Host,
}

impl Scope {
    /// The pid a pid-scoped uprobe is bound to, if any.
    pub fn pid(self) -> Option<u32> {
        match self {
            Self::Process(pid) => Some(pid),
            Self::Host => None,
        }
    }
}

/// The points of one file, ready to attach.
#[derive(Debug, Clone)]
pub struct ResolvedPoints {
    /// The file, as a path this daemon can open (`/proc/PID/root/...` for a process).
    pub path: PathBuf,
    pub points: Vec<ProbePoint>,
}

impl ResolvedPoints {
    pub fn offsets(&self) -> Vec<u64> {
        self.points.iter().map(|p| p.offset).collect()
    }

    pub fn ref_ctr_offsets(&self) -> Vec<u64> {
        self.points.iter().map(|p| p.ref_ctr_offset).collect()
    }

    pub fn cookies(&self) -> Vec<u64> {
        self.points.iter().map(|p| p.cookie).collect()
    }
}
