//! A traced process seen from outside, as untrusted input: its command line,
//! initial environment, working directory and executable read through one
//! `/proc/PID` directory handle (so a reused pid reads nothing), each read
//! bounded; its files opened beneath `/proc/PID/root` (its own root and
//! mounts, symbolic links never leaving that root, no magic links), as
//! regular files only, size-capped, and with the process's own file-system
//! credentials, so pftraced (root) never reads for a trace what the process
//! could not read itself.

use std::{
    collections::HashMap,
    ffi::CString,
    fs::File,
    io::{self, Read},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    os::unix::fs::MetadataExt,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

/// Caps on what is read from a process.
pub const CMDLINE_MAX: usize = 128 * 1024;
pub const ENVIRON_MAX: usize = 256 * 1024;
/// The largest source file parsed (the largest stdlib file, 3.15's
/// pydoc_data/topics.py, is about 900 KiB).
pub const SOURCE_MAX: u64 = 4 * 1024 * 1024;
/// A `.pth` file's cap.
pub const PTH_MAX: u64 = 64 * 1024;

/// The environment variables that decide where Python imports from.
const ENV_KEPT: [&str; 10] = [
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONUSERBASE",
    "PYTHONNOUSERSITE",
    "PYTHONSAFEPATH",
    "PYTHONOPTIMIZE",
    "PYTHONPLATLIBDIR",
    "HOME",
    "PWD",
    "VIRTUAL_ENV",
];

/// The process's file-system credentials (`/proc/PID/status`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Creds {
    pub fsuid: u32,
    pub fsgid: u32,
    pub groups: Vec<u32>,
}

/// Identity of a file as read: (dev, inode, mtime ns, size).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
    pub mtime_ns: i128,
    pub size: u64,
}

/// One traced process.
pub struct Process {
    pub pid: u32,
    /// Start time in clock ticks after boot (`/proc/PID/stat` field 22):
    /// with the pid, names this process and no later one.
    pub start_ticks: u64,
    /// Its start as wall-clock time, rounded down (never later than the
    /// real start).
    pub started: SystemTime,
    root: OwnedFd,
    pub creds: Creds,
    /// `/proc/PID/exe`, `cwd` as the process sees them.
    pub exe: Option<String>,
    pub cwd: Option<String>,
    /// `/proc/PID/root` as read at open (`/` when it shares pftraced's).
    pub root_link: Option<String>,
    pub argv: Vec<String>,
    /// The initial environment, the variables in `ENV_KEPT` only.
    pub env: HashMap<String, String>,
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r) }
}

fn open_dir_at(dirfd: libc::c_int, name: &str, flags: libc::c_int) -> io::Result<OwnedFd> {
    let c = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: c is a valid C string; the returned fd is owned below.
    let fd = cvt(unsafe { libc::openat(dirfd, c.as_ptr(), flags | libc::O_CLOEXEC) })?;
    // SAFETY: fd was just opened and is not owned elsewhere.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn read_at(dirfd: libc::c_int, name: &str, max: usize) -> io::Result<Vec<u8>> {
    let fd = open_dir_at(dirfd, name, libc::O_RDONLY | libc::O_NOFOLLOW)?;
    let mut buf = Vec::new();
    File::from(fd).take(max as u64).read_to_end(&mut buf)?;
    Ok(buf)
}

fn readlink_at(dirfd: libc::c_int, name: &str) -> Option<String> {
    let c = CString::new(name).ok()?;
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: buf is writable for its length.
    let n = unsafe { libc::readlinkat(dirfd, c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n <= 0 || n as usize >= buf.len() {
        return None;
    }
    buf.truncate(n as usize);
    String::from_utf8(buf).ok()
}

fn split_nul(b: &[u8]) -> Vec<String> {
    b.split(|&c| c == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8_lossy(s).into_owned()).collect()
}

/// Wall-clock time of a point `ticks` after boot, rounded down.
fn boot_ticks_to_wall(ticks: u64) -> SystemTime {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let mut rt = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    let mut bt = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out-pointers.
    unsafe {
        libc::clock_gettime(libc::CLOCK_REALTIME, &mut rt);
        libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut bt);
    }
    let ns = |t: &libc::timespec| t.tv_sec as i128 * 1_000_000_000 + t.tv_nsec as i128;
    let boot_wall = ns(&rt) - ns(&bt);
    let start = boot_wall + (ticks as i128 * 1_000_000_000) / hz as i128 - 1_000_000; // 1 ms for the two reads
    UNIX_EPOCH + Duration::from_nanos(start.max(0) as u64)
}

impl Process {
    /// Reads what is needed of process `pid`.
    pub fn open(pid: u32) -> io::Result<Self> {
        let proc_dir =
            open_dir_at(libc::AT_FDCWD, &format!("/proc/{pid}"), libc::O_RDONLY | libc::O_DIRECTORY)?;
        let pd = proc_dir.as_raw_fd();
        let stat = read_at(pd, "stat", 4096)?;
        let stat = String::from_utf8_lossy(&stat);
        // Fields after the last ')' (the name may contain anything).
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
        let start_ticks: u64 = after
            .split_whitespace()
            .nth(19)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unreadable /proc/PID/stat"))?;
        let status = String::from_utf8_lossy(&read_at(pd, "status", 16 * 1024)?).into_owned();
        let field = |k: &str| status.lines().find_map(|l| l.strip_prefix(k)).unwrap_or_default().to_string();
        let nums = |s: String| s.split_whitespace().filter_map(|x| x.parse::<u32>().ok()).collect::<Vec<_>>();
        let uids = nums(field("Uid:"));
        let gids = nums(field("Gid:"));
        let creds = Creds {
            fsuid: *uids.get(3).unwrap_or(&u32::MAX),
            fsgid: *gids.get(3).unwrap_or(&u32::MAX),
            groups: nums(field("Groups:")),
        };
        let argv = split_nul(&read_at(pd, "cmdline", CMDLINE_MAX)?);
        let env = split_nul(&read_at(pd, "environ", ENVIRON_MAX).unwrap_or_default())
            .into_iter()
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                ENV_KEPT.contains(&k).then(|| (k.to_string(), v.to_string()))
            })
            .collect();
        let root = open_dir_at(pd, "root", libc::O_PATH | libc::O_DIRECTORY)?;
        let proc = Self {
            pid,
            start_ticks,
            started: boot_ticks_to_wall(start_ticks),
            root,
            creds,
            exe: readlink_at(pd, "exe"),
            cwd: readlink_at(pd, "cwd"),
            root_link: readlink_at(pd, "root"),
            argv,
            env,
        };
        // Still the same process (the handle would fail otherwise, but a
        // stat read before an exec would not be this program's).
        let again = read_at(pd, "stat", 4096)?;
        if String::from_utf8_lossy(&again)
            .rsplit_once(')')
            .map(|(_, r)| r)
            .unwrap_or_default()
            .split_whitespace()
            .nth(19)
            != Some(&start_ticks.to_string())
        {
            return Err(io::Error::new(io::ErrorKind::NotFound, "the process changed while read"));
        }
        Ok(proc)
    }

    /// Runs `f` on a thread whose file-system uid, gid and groups are the
    /// process's, so the kernel checks every open as it would for it. The
    /// thread's capabilities fall with its fsuid (capabilities(7)); other
    /// threads are untouched. When pftraced is not root, `f` runs as is.
    pub fn as_process<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 || self.creds.fsuid == 0 {
            return f();
        }
        let creds = self.creds.clone();
        std::thread::scope(|s| {
            s.spawn(move || {
                // Raw syscalls: per thread (glibc would broadcast setgroups).
                // SAFETY: plain syscalls on this thread's credentials.
                unsafe {
                    libc::syscall(libc::SYS_setgroups, creds.groups.len(), creds.groups.as_ptr());
                    libc::syscall(libc::SYS_setfsgid, creds.fsgid);
                    libc::syscall(libc::SYS_setfsuid, creds.fsuid);
                }
                f()
            })
            .join()
            .expect("file reader thread panicked")
        })
    }

    /// Opens `path` (as the process names it) beneath its root: symbolic
    /// links are followed only within that root, magic links never, FIFOs
    /// do not block. Call inside [`Self::as_process`].
    pub fn open_in_root(&self, path: &str, o_path: bool) -> io::Result<File> {
        let c = CString::new(path).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let flags = if o_path { libc::O_PATH } else { libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY };
        // SAFETY: open_how is plain data; zero is valid for every field.
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        how.flags = (flags | libc::O_CLOEXEC) as u64;
        how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
        // SAFETY: valid pointers and size for openat2.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                self.root.as_raw_fd(),
                c.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just opened.
        Ok(unsafe { File::from_raw_fd(fd as i32) })
    }

    /// A regular file's content (at most `max` bytes, else an error) and
    /// identity, both from the same open file.
    pub fn read_file(&self, path: &str, max: u64) -> io::Result<(Vec<u8>, FileId)> {
        self.as_process(|| {
            let f = self.open_in_root(path, false)?;
            let md = f.metadata()?;
            if !md.file_type().is_file() {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
            }
            if md.len() > max {
                return Err(io::Error::new(io::ErrorKind::InvalidData, format!("larger than {max} bytes")));
            }
            let mut buf = Vec::with_capacity(md.len() as usize);
            f.take(max + 1).read_to_end(&mut buf)?;
            if buf.len() as u64 != md.len() {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "the file changed while read"));
            }
            let id = FileId {
                dev: md.dev(),
                ino: md.ino(),
                mtime_ns: md.mtime() as i128 * 1_000_000_000 + md.mtime_nsec() as i128,
                size: md.len(),
            };
            Ok((buf, id))
        })
    }

    /// What kind of thing `path` is, in the process's view: `Some(true)` a
    /// regular file, `Some(false)` a directory, `None` neither or absent.
    pub fn kind(&self, path: &str) -> Option<bool> {
        self.as_process(|| self.kind_here(path))
    }

    /// [`Self::kind`] without switching credentials (inside `as_process`).
    pub fn kind_here(&self, path: &str) -> Option<bool> {
        let md = self.open_in_root(path, true).ok()?.metadata().ok()?;
        if md.file_type().is_file() {
            Some(true)
        } else if md.file_type().is_dir() {
            Some(false)
        } else {
            None
        }
    }

    /// Names in a directory of the process's view (at most `max`).
    pub fn list_here(&self, dir: &str, max: usize) -> Vec<String> {
        let Ok(f) = self.open_in_root(dir, false) else { return Vec::new() };
        let fd = std::os::fd::IntoRawFd::into_raw_fd(f);
        // SAFETY: fdopendir takes ownership of fd; closedir releases both.
        let d = unsafe { libc::fdopendir(fd) };
        if d.is_null() {
            // SAFETY: fd is still ours when fdopendir failed.
            unsafe { libc::close(fd) };
            return Vec::new();
        }
        let mut out = Vec::new();
        loop {
            // SAFETY: d is a valid DIR*; the entry is read before the next call.
            let e = unsafe { libc::readdir(d) };
            if e.is_null() || out.len() >= max {
                break;
            }
            // SAFETY: d_name is NUL-terminated.
            let name = unsafe { std::ffi::CStr::from_ptr((*e).d_name.as_ptr()) };
            if let Ok(n) = name.to_str() {
                out.push(n.to_string());
            }
        }
        // SAFETY: d is valid and closed once.
        unsafe { libc::closedir(d) };
        out
    }

    /// A short text file (`pyvenv.cfg`, `.pth`), capped.
    pub fn read_text_here(&self, path: &str, max: u64) -> Option<String> {
        let f = self.open_in_root(path, false).ok()?;
        let md = f.metadata().ok()?;
        if !md.file_type().is_file() || md.len() > max {
            return None;
        }
        let mut s = String::new();
        f.take(max).read_to_string(&mut s).ok()?;
        Some(s)
    }
}
