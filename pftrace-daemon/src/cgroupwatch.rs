//! Watching a cgroup v2 directory without polling, with inotify: waiting for
//! it to exist (a job root made only when the first job starts, a slice
//! systemd removes when it is empty), seeing it go away and come back, and
//! (for a job root) its child cgroups being made and removed.
//!
//! Why inotify and not the kernel's `cgroup_mkdir`/`cgroup_rmdir`
//! tracepoints: cgroups are made and removed with mkdir(2)/rmdir(2) on
//! cgroupfs, which report IN_CREATE/IN_DELETE with IN_ISDIR like any
//! directory (checked on this kernel, 6.18); inotify needs no BPF program
//! and names the directory, where a tracepoint gives an id to resolve. It
//! does not hold a job's first process back, and need not: the job root is
//! in the kernel's set of watched cgroups, so a process exec'd in any cgroup
//! under it is reported at its exec whether or not its job was seen yet.
//!
//! One thread per watched directory (a few per daemon) blocks in read(2)
//! and sends [`CgroupEvent`]s; it ends when the receiver is gone.

use std::{
    ffi::OsStr,
    fs, io,
    mem::MaybeUninit,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
use tokio::sync::mpsc::UnboundedSender;

/// What a watcher saw of directory `slot`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupEvent {
    /// The directory exists (at start, or it was made); sent before any child event.
    Appeared {
        slot: usize,
    },
    /// The directory was removed.
    Gone {
        slot: usize,
    },
    /// A child directory was made (or existed when the directory appeared).
    ChildMade {
        slot: usize,
        name: String,
    },
    ChildRemoved {
        slot: usize,
        name: String,
    },
    /// The kernel's event queue overflowed: these are the children now.
    Children {
        slot: usize,
        names: Vec<String>,
    },
}

/// Starts a thread watching `path` (and its children when `children`),
/// sending what it sees for `slot` to `tx`.
pub fn spawn(slot: usize, path: PathBuf, children: bool, tx: UnboundedSender<CgroupEvent>) -> io::Result<()> {
    thread::Builder::new().name(format!("pftrace-cgwatch-{slot}")).spawn(move || {
        let mut watcher = Watcher { slot, path, children, tx };
        while !watcher.tx.is_closed() {
            if let Err(err) = watcher.round() {
                log::warn!("watching cgroup {}: {err}; trying again in 1 s", watcher.path.display());
                thread::sleep(Duration::from_secs(1));
            }
        }
    })?;
    Ok(())
}

struct Watcher {
    slot: usize,
    path: PathBuf,
    children: bool,
    tx: UnboundedSender<CgroupEvent>,
}

/// Enough for a burst of events (each 16 bytes and a name of at most 256).
const BUF_BYTES: usize = 64 * 1024;

impl Watcher {
    /// Waits for the directory, reports it and its children until it is removed.
    fn round(&mut self) -> io::Result<()> {
        wait_for_dir(&self.path, &self.tx)?;
        let fd = inotify::init(CreateFlags::CLOEXEC)?;
        let mut mask = WatchFlags::DELETE_SELF | WatchFlags::ONLYDIR | WatchFlags::DONT_FOLLOW;
        if self.children {
            mask |= WatchFlags::CREATE | WatchFlags::DELETE | WatchFlags::MOVED_TO | WatchFlags::MOVED_FROM;
        }
        match inotify::add_watch(&fd, &self.path, mask) {
            Ok(_) => {}
            // Removed again before the watch was placed: wait again.
            Err(e) if e == rustix::io::Errno::NOENT => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        if !self.send(CgroupEvent::Appeared { slot: self.slot }) {
            return Ok(());
        }
        // Children made before the watch was placed (duplicates are harmless).
        if self.children {
            for name in child_dirs(&self.path) {
                if !self.send(CgroupEvent::ChildMade { slot: self.slot, name }) {
                    return Ok(());
                }
            }
        }
        read_events(&fd, BUF_BYTES, |event| {
            let flags = event.events();
            let name = event.file_name().map(|n| String::from_utf8_lossy(n.to_bytes()).into_owned());
            let slot = self.slot;
            let message = if flags.contains(ReadFlags::QUEUE_OVERFLOW) {
                Some(CgroupEvent::Children { slot, names: child_dirs(&self.path) })
            } else if flags.intersects(ReadFlags::DELETE_SELF | ReadFlags::IGNORED) {
                self.send(CgroupEvent::Gone { slot });
                return Some(());
            } else if !flags.contains(ReadFlags::ISDIR) {
                None
            } else if flags.intersects(ReadFlags::CREATE | ReadFlags::MOVED_TO) {
                name.map(|name| CgroupEvent::ChildMade { slot, name })
            } else if flags.intersects(ReadFlags::DELETE | ReadFlags::MOVED_FROM) {
                name.map(|name| CgroupEvent::ChildRemoved { slot, name })
            } else {
                None
            };
            // Stop when the receiver is gone.
            message.and_then(|message| (!self.send(message)).then_some(()))
        })
    }

    /// Whether the receiver still listens.
    fn send(&self, event: CgroupEvent) -> bool {
        self.tx.send(event).is_ok()
    }
}

/// Names of the child directories of `dir`.
fn child_dirs(dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else { return Vec::new() };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Returns once `path` is a directory: watches its nearest existing
/// ancestor for the next component to be made, and descends. Returns early
/// (Ok) if the receiver is gone.
fn wait_for_dir<T>(path: &Path, tx: &UnboundedSender<T>) -> io::Result<()> {
    let mut logged = false;
    loop {
        if path.is_dir() || tx.is_closed() {
            return Ok(());
        }
        let (ancestor, next) = nearest_existing(path)?;
        if !logged {
            log::debug!("waiting for {} ({} exists)", path.display(), ancestor.display());
            logged = true;
        }
        let fd = inotify::init(CreateFlags::CLOEXEC)?;
        let mask = WatchFlags::CREATE | WatchFlags::MOVED_TO | WatchFlags::DELETE_SELF | WatchFlags::ONLYDIR;
        match inotify::add_watch(&fd, &ancestor, mask) {
            Ok(_) => {}
            Err(e) if e == rustix::io::Errno::NOENT => continue,
            Err(e) => return Err(e.into()),
        }
        // Made between the check above and the watch: look again.
        if ancestor.join(&next).exists() {
            continue;
        }
        read_events(&fd, 4096, |event| {
            let flags = event.events();
            let ours = event.file_name().is_some_and(|n| OsStr::from_bytes(n.to_bytes()) == next);
            let changed =
                flags.intersects(ReadFlags::DELETE_SELF | ReadFlags::IGNORED | ReadFlags::QUEUE_OVERFLOW);
            (ours || changed).then_some(())
        })?;
    }
}

/// Reads the events of inotify instance `fd` (through a buffer of
/// `buf_bytes`) and gives each to `each` until it returns a value, which is
/// returned; a read interrupted by a signal is retried.
fn read_events<R>(
    fd: &rustix::fd::OwnedFd,
    buf_bytes: usize,
    mut each: impl FnMut(&inotify::InotifyEvent<'_>) -> Option<R>,
) -> io::Result<R> {
    let mut buf = vec![MaybeUninit::<u8>::uninit(); buf_bytes];
    let mut reader = inotify::Reader::new(fd, &mut buf);
    loop {
        match reader.next() {
            Ok(event) => {
                if let Some(done) = each(&event) {
                    return Ok(done);
                }
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// The deepest existing ancestor of `path` and the name under it that leads to `path`.
fn nearest_existing(path: &Path) -> io::Result<(PathBuf, std::ffi::OsString)> {
    let mut child = path;
    while let Some(parent) = child.parent() {
        if parent.is_dir() {
            let name = child.file_name().ok_or_else(|| io::Error::other("path ends in .."))?;
            return Ok((parent.to_path_buf(), name.to_os_string()));
        }
        child = parent;
    }
    Err(io::Error::new(io::ErrorKind::NotFound, "no part of the path exists"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory tree made level by level is waited for and its children
    /// reported (plain directories: inotify reports them as it does cgroups).
    #[test]
    fn waits_then_reports_children_made_and_removed() {
        let base = std::env::temp_dir().join(format!("pftrace-cgwatch-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir(&base).unwrap();
        let root = base.join("a/b");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        spawn(3, root.clone(), true, tx).unwrap();
        thread::sleep(Duration::from_millis(100));
        assert!(rx.try_recv().is_err(), "nothing exists yet");
        fs::create_dir(base.join("a")).unwrap();
        fs::create_dir(&root).unwrap();
        let next = |rx: &mut tokio::sync::mpsc::UnboundedReceiver<CgroupEvent>| {
            rx.blocking_recv().expect("the watcher runs")
        };
        assert_eq!(next(&mut rx), CgroupEvent::Appeared { slot: 3 });
        fs::create_dir(root.join("job_1")).unwrap();
        fs::write(root.join("file"), "").unwrap();
        fs::remove_dir(root.join("job_1")).unwrap();
        // The listing after the watch is placed may report job_1 as well (duplicates are allowed).
        let mut seen = vec![next(&mut rx)];
        while seen.last() == Some(&CgroupEvent::ChildMade { slot: 3, name: "job_1".into() }) {
            seen.push(next(&mut rx));
        }
        assert_eq!(
            seen.last(),
            Some(&CgroupEvent::ChildRemoved { slot: 3, name: "job_1".into() }),
            "{seen:?}"
        );
        assert!(seen.len() >= 2 && seen.len() <= 3, "{seen:?}");
        fs::remove_file(root.join("file")).unwrap();
        fs::remove_dir(&root).unwrap();
        assert_eq!(next(&mut rx), CgroupEvent::Gone { slot: 3 });
        fs::create_dir(&root).unwrap();
        assert_eq!(next(&mut rx), CgroupEvent::Appeared { slot: 3 });
        drop(rx);
        fs::remove_dir_all(&base).unwrap();
    }
}
