//! pftraced's own PID namespace, and how the eBPF programs number processes in it.
//!
//! The kernel's pid and tgid helpers give host pids. In a container (its own
//! PID namespace: `systemd-nspawn`, `unshare --pid`), everything else
//! pftraced does speaks that namespace's pids: /proc, cgroup.procs,
//! pidfd_open, and the pid of a uprobe_multi link or a uprobe perf event (the
//! kernel reads those with find_vpid / find_task_by_vpid, in the caller's
//! namespace). So the eBPF programs number tasks in pftraced's namespace
//! too, given its nsfs inode and the offsets of [`PidNsOffsets`]; in the
//! host's namespace they keep the kernel's own ids (no extra reads).

use std::os::unix::fs::MetadataExt as _;

use super::btf::{BtfError, PidNsOffsets};

/// The nsfs inode of the host's (initial) PID namespace: PROC_PID_INIT_INO
/// in the kernel's include/linux/proc_ns.h, fixed since 3.8.
pub const INIT_PID_NS_INODE: u64 = 0xEFFF_FFFC;

#[derive(Debug, thiserror::Error)]
pub enum PidNsError {
    #[error("cannot read pftraced's PID namespace from /proc/self/ns/pid: {0} (is /proc mounted?)")]
    Namespace(std::io::Error),
    #[error("cannot resolve /proc/self: {0} (is /proc mounted?)")]
    ProcSelf(std::io::Error),
    #[error(
        "/proc belongs to another PID namespace than pftraced's (/proc/self is {proc_says}, pftraced is pid \
         {getpid}): processes would be looked up under the wrong numbers; mount a proc of this namespace \
         first (e.g. `unshare --pid --fork --mount-proc`)"
    )]
    ForeignProc { proc_says: String, getpid: u32 },
    #[error(
        "pftraced runs in a PID namespace of its own (nsfs inode {inode}), where the kernel's pids are not \
         the ones it sees, and the kernel's layout needed to translate them is unknown: {source}; run \
         pftraced in the host's PID namespace"
    )]
    Layout { inode: u64, source: BtfError },
    #[error("PID namespace inode {0} does not fit the eBPF programs' 32 bits")]
    Inode(u64),
}

/// pftraced's PID namespace, as its nsfs inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PidNamespace {
    pub inode: u64,
}

impl PidNamespace {
    /// The namespace pftraced runs in, after checking that /proc is that
    /// namespace's own (else every pid read from /proc would be another's).
    pub fn current() -> Result<Self, PidNsError> {
        let inode = std::fs::metadata("/proc/self/ns/pid").map_err(PidNsError::Namespace)?.ino();
        let proc_says = std::fs::read_link("/proc/self").map_err(PidNsError::ProcSelf)?;
        let getpid = std::process::id();
        if proc_says.as_os_str() != getpid.to_string().as_str() {
            return Err(PidNsError::ForeignProc { proc_says: proc_says.display().to_string(), getpid });
        }
        Ok(Self { inode })
    }

    /// Whether it is the host's namespace (pids are the kernel's own).
    pub fn is_initial(&self) -> bool {
        self.inode == INIT_PID_NS_INODE
    }

    /// The eBPF programs' globals for this namespace: none in the host's;
    /// elsewhere the inode and the kernel's offsets (an error when BTF lacks them).
    pub fn globals(&self) -> Result<Vec<(&'static str, u32)>, PidNsError> {
        if self.is_initial() {
            return Ok(Vec::new());
        }
        let inode = u32::try_from(self.inode).map_err(|_| PidNsError::Inode(self.inode))?;
        let offsets =
            PidNsOffsets::discover().map_err(|source| PidNsError::Layout { inode: self.inode, source })?;
        Ok(offsets.globals(inode).to_vec())
    }
}

/// The globals for the eBPF programs of a loader in this process (see [`PidNamespace::globals`]).
pub fn globals() -> Result<Vec<(&'static str, u32)>, PidNsError> {
    PidNamespace::current()?.globals()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tests run in the host's namespace (`unshare` tests of the
    /// translated case are pftrace-daemon/tests/it/pid_namespace.rs).
    #[test]
    fn the_test_process_is_in_the_hosts_namespace() {
        let ns = PidNamespace::current().unwrap();
        assert!(ns.is_initial(), "{ns:?}: the tests expect to run in the host's PID namespace");
        assert_eq!(ns.globals().unwrap(), Vec::new());
        let other = PidNamespace { inode: 4026532000 };
        let globals = other.globals().unwrap();
        assert_eq!(globals[0], (pftrace_common::task_layout::PIDNS_INO, 4026532000));
        assert_eq!(globals.len(), 9, "{globals:?}");
        assert!(matches!(PidNamespace { inode: 1 << 40 }.globals(), Err(PidNsError::Inode(_))));
    }
}
