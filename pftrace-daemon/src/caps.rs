//! Checks, before touching the kernel, that this process may load BPF
//! programs and open uprobes, so the user gets a message naming what is missing.

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Missing privileges, with what to do about them.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error(
        "pftraced needs root (CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN) to load eBPF programs and attach uprobes; \
         run it with sudo"
    )]
    NotRoot,
    #[error(
        "pftraced is missing {0}; run it as root with the full capability set (e.g. plain `sudo`, not a restricted container)"
    )]
    MissingCapability(String),
    #[error("cannot read this process's capabilities from /proc/self/status: {0}")]
    Unreadable(std::io::Error),
}

/// Effective capability set of this process, from /proc/self/status.
fn effective_caps() -> Result<u64, PrivilegeError> {
    let status = procfs::process::Process::myself().and_then(|me| me.status());
    Ok(status.map_err(|e| PrivilegeError::Unreadable(std::io::Error::other(e)))?.capeff)
}

/// Ok when the process can load BPF programs, open uprobe perf events on
/// other processes and read their binaries through /proc/PID/root: CAP_BPF,
/// CAP_PERFMON and CAP_SYS_ADMIN (measured here: without CAP_SYS_ADMIN the
/// uprobe perf_event_open is refused even with the other two).
pub fn check() -> Result<(), PrivilegeError> {
    let caps = effective_caps()?;
    let has = |cap: u32| caps & (1u64 << cap) != 0;
    let needed = [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON"), (CAP_SYS_ADMIN, "CAP_SYS_ADMIN")];
    let missing: Vec<&str> = needed.iter().filter(|(cap, _)| !has(*cap)).map(|(_, name)| *name).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !rustix::process::geteuid().is_root() && missing.len() == needed.len() {
        return Err(PrivilegeError::NotRoot);
    }
    Err(PrivilegeError::MissingCapability(missing.join(" and ")))
}
