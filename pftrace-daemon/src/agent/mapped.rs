//! Copies of the agent's shared object other than this pftraced's that a
//! process maps: the uprobe road reports through the probe function of the
//! copy the process loaded, and each pftraced installs its own copy, so a
//! process that loaded the agent from an earlier pftraced (traced again by
//! `--pid` after a restart) would report where nobody listens.

use std::{
    io::Read as _,
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _},
    path::PathBuf,
};

use super::install::AGENT_SO as AGENT_SO_NAME;

/// A mapped copy of the agent: the process's own link to the file it maps
/// (`/proc/PID/map_files/START-END`: the inode, deleted or not), by which
/// the kernel attaches a uprobe to that inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedCopy {
    pub link: PathBuf,
    /// (st_dev, st_ino) of the file.
    pub id: (u64, u64),
}

/// Mapped files of `pid` named like the agent's shared object whose inode
/// is not one of `known` and whose bytes are exactly `so` (this pftraced's
/// agent: the probe function is at the same offset). Files with other bytes
/// (another pftrace build's agent) are returned apart, by path, to be said.
pub fn other_copies(
    pid: u32,
    known: &[(u64, u64)],
    so: &[u8],
) -> std::io::Result<(Vec<MappedCopy>, Vec<String>)> {
    let maps = procfs::process::Process::new(pid as i32)
        .and_then(|p| p.maps())
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let (mut same, mut other) = (Vec::new(), Vec::new());
    let mut seen: Vec<(u64, u64)> = known.to_vec();
    for map in maps {
        let procfs::process::MMapPath::Path(path) = &map.pathname else { continue };
        // " (deleted)" follows the name of a file removed since it was mapped.
        if !path.file_name().is_some_and(|n| n.to_string_lossy().starts_with(AGENT_SO_NAME)) {
            continue;
        }
        let link = PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", map.address.0, map.address.1));
        // The magic link opens the mapped inode itself, whatever its name now.
        let Ok(mut file) = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_CLOEXEC).open(&link)
        else {
            continue;
        };
        let Ok(meta) = file.metadata() else { continue };
        let id = (meta.dev(), meta.ino());
        if seen.contains(&id) || !meta.is_file() {
            continue;
        }
        seen.push(id);
        // Bounded: one byte more than ours tells a longer file apart.
        let mut bytes = Vec::with_capacity(so.len() + 1);
        if file.by_ref().take(so.len() as u64 + 1).read_to_end(&mut bytes).is_err() {
            continue;
        }
        if bytes == so {
            same.push(MappedCopy { link, id });
        } else {
            other.push(path.display().to_string());
        }
    }
    Ok((same, other))
}
