//! Target scopes: cgroup v2 directories (their processes, descendants
//! included, now and later) and the whole host; finding the processes already
//! running in them when tracing starts.

use std::{
    fs::{self, File},
    io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// A watched cgroup v2 directory.
#[derive(Debug)]
pub struct CgroupTarget {
    pub path: PathBuf,
    /// Open directory: the kernel's cgroup array holds a reference through it.
    pub dir: File,
    /// cgroup id (the directory's inode number on cgroup2fs).
    pub id: u64,
}

/// Errors opening a cgroup target.
#[derive(Debug, thiserror::Error)]
pub enum TargetScopeError {
    #[error("cgroup {path}: {source} (give a cgroup v2 directory, e.g. /sys/fs/cgroup/unified/myjob)")]
    Open { path: String, source: io::Error },
    #[error(
        "{path} is not a cgroup v2 directory (no cgroup.procs with cgroup2 semantics); on this host cgroup v2 \
         is mounted at {mount}"
    )]
    NotCgroup2 { path: String, mount: String },
}

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

impl CgroupTarget {
    pub fn open(path: &Path) -> Result<Self, TargetScopeError> {
        let display = path.display().to_string();
        let err = |source| TargetScopeError::Open { path: display.clone(), source };
        let dir = File::open(path).map_err(err)?;
        let meta = dir.metadata().map_err(err)?;
        if !meta.is_dir() || !is_cgroup2(path) {
            return Err(TargetScopeError::NotCgroup2 {
                path: display,
                mount: cgroup2_mount().unwrap_or("(none found)".into()),
            });
        }
        Ok(Self { path: path.to_path_buf(), dir, id: meta.ino() })
    }

    /// Pids in this cgroup and every descendant cgroup.
    pub fn pids(&self) -> Vec<u32> {
        let mut pids = Vec::new();
        let mut stack = vec![self.path.clone()];
        while let Some(dir) = stack.pop() {
            if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
                pids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
            }
            if let Ok(entries) = fs::read_dir(&dir) {
                for e in entries.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        stack.push(e.path());
                    }
                }
            }
        }
        pids.sort_unstable();
        pids.dedup();
        pids
    }
}

fn is_cgroup2(path: &Path) -> bool {
    rustix::fs::statfs(path).is_ok_and(|st| st.f_type == CGROUP2_SUPER_MAGIC)
}

/// Where cgroup v2 is mounted, from /proc/self/mountinfo.
pub fn cgroup2_mount() -> Option<String> {
    let mounts = procfs::process::Process::myself().ok()?.mountinfo().ok()?;
    mounts.into_iter().find(|m| m.fs_type == "cgroup2").map(|m| m.mount_point.display().to_string())
}

/// Every pid on the host (for `--all` at start).
pub fn all_pids() -> Vec<u32> {
    procfs::process::all_processes()
        .map(|all| all.flatten().filter_map(|p| u32::try_from(p.pid()).ok()).collect())
        .unwrap_or_default()
}
