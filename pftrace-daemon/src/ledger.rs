//! A record, in `/run/pftrace/raised`, of the USDT semaphores this pftraced
//! raised ([`crate::semaphores`]), so that a pftraced starting after one that
//! ended without a clean stop (SIGKILL, the OOM killer, a crash) lowers what
//! the dead one left raised: those processes would otherwise pay the probe
//! sites' argument set-up (+35-41 ns per Python call here) until they exit.
//!
//! One file per daemon, `PID-START` (its start time in clock ticks), a log:
//! `+ pid start dev ino offsets addresses` when a process is raised, `- pid
//! start` when it is forgotten (one write each), compacted (temporary file,
//! rename) when it has grown past twice what is live, removed at a clean
//! stop: a rewrite per change was O(processes) each (4,096 traced processes,
//! 290 KiB a rewrite). A starting daemon claims each dead daemon's file by renaming it (so
//! two starting daemons never lower twice) and lowers a recorded process
//! only when it is the same process (start time) and the same image: its
//! semaphores are found again from the file's offsets at the very addresses
//! recorded (an exec since maps the interpreter elsewhere: ASLR), so a +1
//! another pftraced raised in a new image is never taken away.
//!
//! The directory is root's (0700); files are opened without following
//! symlinks, must be root's regular files, and are read up to
//! [`MAX_BYTES`].

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Read as _, Write as _},
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use crate::semaphores::Semaphores;

/// Where the records are.
pub const DIR: &str = "/run/pftrace/raised";

/// A record is read up to this size (a line is under 120 bytes: some 35,000
/// processes); the rest is ignored, said in the log.
pub const MAX_BYTES: u64 = 4 << 20;

/// Dead daemons' records handled at one start, at most (a directory filled
/// by something else must not stall the start).
const MAX_FILES: usize = 256;

/// Bytes a record may grow to past twice its live lines before it is compacted.
const SLACK: u64 = 64 << 10;

/// This daemon's record.
#[derive(Debug)]
pub struct Ledger {
    path: PathBuf,
    tmp: PathBuf,
    /// Open for appending (None until the first change, or after an error).
    file: Option<File>,
    /// Bytes in the file.
    len: u64,
    /// The `+` line's length of each process raised now, and their sum:
    /// what a compacted file would hold.
    live: std::collections::HashMap<(u32, u64), u64>,
    live_len: u64,
}

/// One process's raised semaphores, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub pid: u32,
    pub started: u64,
    pub file: (u64, u64),
    pub offsets: Vec<u64>,
    pub addresses: Vec<u64>,
}

impl Entry {
    pub fn line(&self) -> String {
        let list = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
        format!(
            "{} {} {} {} {} {}\n",
            self.pid,
            self.started,
            self.file.0,
            self.file.1,
            list(&self.offsets),
            list(&self.addresses)
        )
    }

    pub fn parse(line: &str) -> Option<Self> {
        let mut f = line.split(' ');
        let mut num = || f.next()?.parse::<u64>().ok();
        let (pid, started, dev, ino) = (num()?, num()?, num()?, num()?);
        let list = |s: Option<&str>| -> Option<Vec<u64>> { s?.split(',').map(|x| x.parse().ok()).collect() };
        let offsets = list(f.next())?;
        let addresses = list(f.next())?;
        (f.next().is_none() && offsets.len() == addresses.len() && !offsets.is_empty()).then_some(Self {
            pid: u32::try_from(pid).ok()?,
            started,
            file: (dev, ino),
            offsets,
            addresses,
        })
    }
}

/// This process's start time (clock ticks), naming its record.
fn own_start() -> Option<u64> {
    crate::procinfo::stat(std::process::id()).map(|s| s.start_ticks)
}

/// Makes (or checks) the directory: root's, no access for others.
fn safe_dir() -> io::Result<&'static Path> {
    let dir = Path::new(DIR);
    if let Some(parent) = dir.parent()
        && fs::symlink_metadata(parent).is_err()
    {
        fs::DirBuilder::new().mode(0o755).create(parent)?;
    }
    if fs::symlink_metadata(dir).is_err() {
        fs::DirBuilder::new().mode(0o700).create(dir)?;
    }
    let meta = fs::symlink_metadata(dir)?;
    if !meta.is_dir() || meta.uid() != 0 || meta.mode() & 0o077 != 0 {
        return Err(io::Error::other(format!(
            "{DIR} is not a directory of root's alone (uid {}, mode {:o}): remove it",
            meta.uid(),
            meta.mode() & 0o7777
        )));
    }
    Ok(dir)
}

impl Ledger {
    /// This daemon's record (made at the first change).
    pub fn new() -> io::Result<Self> {
        let dir = safe_dir()?;
        let start = own_start().ok_or_else(|| io::Error::other("reading /proc/self/stat"))?;
        let name = format!("{}-{start}", std::process::id());
        Ok(Self {
            path: dir.join(&name),
            tmp: dir.join(format!("{name}.tmp")),
            file: None,
            len: 0,
            live: Default::default(),
            live_len: 0,
        })
    }

    /// `e` was raised. `live`: every process raised now (`e` among them),
    /// read only when the log is due for compaction.
    pub fn raised(&mut self, e: &Entry, live: impl Iterator<Item = Entry>) -> io::Result<()> {
        let line = format!("+ {}", e.line());
        let old = self.live.insert((e.pid, e.started), line.len() as u64).unwrap_or(0);
        self.live_len = self.live_len + line.len() as u64 - old;
        self.append(&line, live)
    }

    /// The process `pid` that started at `started` is no longer raised by this daemon.
    pub fn forgotten(&mut self, pid: u32, started: u64, live: impl Iterator<Item = Entry>) -> io::Result<()> {
        self.live_len -= self.live.remove(&(pid, started)).unwrap_or(0);
        self.append(&format!("- {pid} {started}\n"), live)
    }

    fn append(&mut self, text: &str, live: impl Iterator<Item = Entry>) -> io::Result<()> {
        if self.file.is_none() || self.len + text.len() as u64 > 2 * self.live_len + SLACK {
            let text: String = live.map(|e| format!("+ {}", e.line())).collect();
            return self.rewrite(&text);
        }
        let f = self.file.as_mut().expect("checked above");
        let written = f.write_all(text.as_bytes());
        if written.is_err() {
            self.file = None;
        }
        self.len += text.len() as u64;
        written
    }

    /// Replaces the file with `text` (temporary file, rename) and appends to it from then on.
    fn rewrite(&mut self, text: &str) -> io::Result<()> {
        self.file = None;
        let _ = fs::remove_file(&self.tmp);
        let mut f = OpenOptions::new()
            .append(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&self.tmp)?;
        f.write_all(text.as_bytes())?;
        fs::rename(&self.tmp, &self.path)?;
        self.len = text.len() as u64;
        self.file = Some(f);
        Ok(())
    }

    /// Removes the record (a clean stop: everything was lowered).
    pub fn remove(&mut self) {
        self.file = None;
        let _ = fs::remove_file(&self.path);
        let _ = fs::remove_file(&self.tmp);
    }
}

/// The processes a record leaves raised: its `+` lines less its `-` lines,
/// the last `+` of a process (an exec of the same file raises anew) winning.
fn replay(text: &str) -> Vec<Entry> {
    let mut live: std::collections::BTreeMap<(u32, u64), Entry> = Default::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("+ ") {
            if let Some(e) = Entry::parse(rest) {
                live.insert((e.pid, e.started), e);
            }
        } else if let Some(rest) = line.strip_prefix("- ")
            && let Some((pid, started)) = rest.split_once(' ')
            && let (Ok(pid), Ok(started)) = (pid.parse(), started.parse())
        {
            live.remove(&(pid, started));
        }
    }
    live.into_values().collect()
}

/// The entry of `sems`, raised in the process that started at `started`.
pub fn entry(sems: &Semaphores, started: u64) -> Entry {
    Entry {
        pid: sems.pid,
        started,
        file: sems.file,
        offsets: sems.offsets.clone(),
        addresses: sems.addresses.clone(),
    }
}

/// `PID-START` (optionally `.tmp` or `.claimed-PID-START` after it): the
/// daemon whose file it is (the claimer's, for a claimed one).
fn owner(name: &str) -> Option<(u32, u64)> {
    let owner = name.rsplit_once(".claimed-").map_or(name, |(_, claimer)| claimer);
    let owner = owner.strip_suffix(".tmp").unwrap_or(owner);
    let (pid, start) = owner.split_once('-')?;
    Some((pid.parse().ok()?, start.parse().ok()?))
}

fn alive(pid: u32, start: u64) -> bool {
    crate::procinfo::stat(pid).is_some_and(|s| s.start_ticks == start)
}

/// Reads a record: a regular file of root's, at most [`MAX_BYTES`].
fn read_record(path: &Path) -> io::Result<String> {
    let f = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() || meta.uid() != 0 {
        return Err(io::Error::other("not a regular file of root's"));
    }
    if meta.len() > MAX_BYTES {
        log::warn!(
            "{}: {} bytes, only the first {MAX_BYTES} are read (processes recorded after them keep their \
             semaphores raised)",
            path.display(),
            meta.len()
        );
    }
    let mut text = String::new();
    File::take(f, MAX_BYTES).read_to_string(&mut text)?;
    Ok(text)
}

/// Lowers what dead daemons left raised, and removes their records.
/// Returns the number of processes lowered.
pub fn recover() -> usize {
    let dir = match safe_dir() {
        Ok(dir) => dir,
        Err(err) => {
            log::warn!("semaphores left raised by a killed pftraced cannot be lowered: {DIR}: {err}");
            return 0;
        }
    };
    let Ok(entries) = fs::read_dir(dir) else { return 0 };
    let me = (std::process::id(), own_start().unwrap_or(0));
    let mut total = 0;
    for entry in entries.flatten().take(MAX_FILES) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((pid, start)) = owner(&name) else { continue };
        if (pid, start) == me || alive(pid, start) {
            continue;
        }
        let path = dir.join(&name);
        if name.ends_with(".tmp") {
            let _ = fs::remove_file(&path);
            continue;
        }
        // Ours from here: a daemon starting beside this one finds it gone.
        let base = name.split(".claimed-").next().unwrap_or(&name);
        let claimed = dir.join(format!("{base}.claimed-{}-{}", me.0, me.1));
        if fs::rename(&path, &claimed).is_err() {
            continue;
        }
        let text = match read_record(&claimed) {
            Ok(text) => text,
            Err(err) => {
                log::warn!("{}: {err}; removed", path.display());
                let _ = fs::remove_file(&claimed);
                continue;
            }
        };
        let mut lowered = Vec::new();
        for e in replay(&text) {
            if !alive(e.pid, e.started) {
                continue;
            }
            match Semaphores::locate(e.pid, e.file, &e.offsets) {
                Ok(sems) if sems.addresses == e.addresses => match sems.adjust(-1) {
                    Ok(()) => lowered.push(e.pid),
                    Err(err) => log::debug!("lowering what a killed pftraced raised: {err}"),
                },
                // Another image since (an exec): not the one raised.
                _ => {}
            }
        }
        let _ = fs::remove_file(&claimed);
        if !lowered.is_empty() {
            log::info!(
                "pftraced pid {} ended without lowering the semaphores it raised: lowered them in {} \
                 process(es) still running ({:?})",
                base.split('-').next().unwrap_or("?"),
                lowered.len(),
                lowered
            );
        }
        total += lowered.len();
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_reads_back_and_bad_ones_are_refused() {
        let e = Entry {
            pid: 42,
            started: 7,
            file: (0xfe00, 860208),
            offsets: vec![10, 12],
            addresses: vec![1, 3],
        };
        assert_eq!(Entry::parse(e.line().trim_end()), Some(e));
        for bad in ["", "1 2 3 4 5", "1 2 3 4 5,6 7", "1 2 3 4 5 7 8", "x 2 3 4 5 6", "99999999999 2 3 4 5 6"]
        {
            assert_eq!(Entry::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_log_replays_to_what_is_still_raised() {
        let e =
            |pid: u32, a: u64| Entry { pid, started: 5, file: (1, 2), offsets: vec![8], addresses: vec![a] };
        let log =
            format!("+ {}+ {}- 1 5\n+ {}garbage\n- 3 5\n", e(1, 10).line(), e(2, 20).line(), e(2, 30).line());
        assert_eq!(replay(&log), vec![e(2, 30)]);
    }

    #[test]
    fn a_files_owner_is_its_daemon_or_its_claimer() {
        assert_eq!(owner("12-345"), Some((12, 345)));
        assert_eq!(owner("12-345.tmp"), Some((12, 345)));
        assert_eq!(owner("12-345.claimed-7-8"), Some((7, 8)));
        assert_eq!(owner("junk"), None);
    }
}
