//! Creating files as root in directories other users may control, without
//! being tricked into writing somewhere else. Every file pftraced writes
//! (final traces, PerfFlowAspect files, rolling files, the spill of calls)
//! goes through here.
//!
//! - A directory is opened once, walking its path one component at a time
//!   with `openat(O_PATH | O_NOFOLLOW)`; files are then created relative to
//!   that descriptor, so swapping a directory on the path afterwards changes
//!   nothing. A symbolic link on the path is followed only if root or the
//!   invoking (real) user made it, or it lies in a directory only they can
//!   change: in a directory others can write (`/tmp`-like), another user's
//!   link is refused, whatever `fs.protected_symlinks` says.
//! - A new file is created with `O_CREAT | O_EXCL | O_NOFOLLOW`: never through
//!   a symbolic link, never into an existing file.
//! - An existing name is replaced only if it is a regular file the invoking
//!   user owns, and only atomically: the content goes to a temporary file
//!   created `O_EXCL` in the same directory, which is then renamed over the
//!   name (`renameat2(RENAME_NOREPLACE)` when the name was free). Anything
//!   else there (a symbolic link, a FIFO, a device, another user's file) is
//!   refused before anything is written, and never opened.

use std::{
    ffi::{CString, OsStr, OsString},
    fs::File,
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::ffi::{OsStrExt as _, OsStringExt as _},
    },
    path::{Component, Path, PathBuf},
};

/// Symbolic links followed while opening one directory, at most (as the kernel's limit).
const MAX_LINKS: usize = 40;
/// Names tried for a temporary file before giving up (they are random).
const TEMP_TRIES: usize = 16;

/// Why a file cannot be written where asked.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("directory {dir}: {why}")]
    Dir { dir: String, why: String },
    #[error(
        "{path} exists and is {kind}; pftraced writes only regular files: remove it or choose another name"
    )]
    NotRegular { path: String, kind: &'static str },
    #[error(
        "{path} exists and belongs to uid {owner}, not to you (uid {uid}); pftraced replaces only \
         files you own: remove it or choose another name"
    )]
    NotOwned { path: String, owner: u32, uid: u32 },
    #[error("{path} is not a file name")]
    NoName { path: String },
    #[error("{action} {path}: {source}")]
    Io { action: &'static str, path: String, source: io::Error },
}

/// A directory opened without following untrusted symbolic links; files are
/// created relative to it.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

/// What is at a name in a directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    Absent,
    /// A regular file the invoking user owns: it may be replaced.
    OwnFile,
}

/// The invoking (real) user: the one whose files may be replaced.
fn real_uid() -> u32 {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::getuid() }
}

fn cstr(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

fn open_at(dir: RawFd, name: &OsStr, flags: libc::c_int, mode: libc::mode_t) -> io::Result<OwnedFd> {
    let name = cstr(name)?;
    // SAFETY: a valid C string; the returned descriptor is owned by the OwnedFd.
    let fd =
        check(unsafe { libc::openat(dir, name.as_ptr(), flags | libc::O_CLOEXEC, mode as libc::c_uint) })?;
    // SAFETY: fd was just opened and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn stat_fd(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: an all-zero stat is valid; fstat only fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fd is open; st is valid for writes.
    check(unsafe { libc::fstat(fd, &mut st) })?;
    Ok(st)
}

/// `fstatat` without following a final symbolic link; None when nothing is there.
fn lstat_at(dir: RawFd, name: &OsStr) -> io::Result<Option<libc::stat>> {
    let name = cstr(name)?;
    // SAFETY: as in stat_fd.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a stat to fill.
    match check(unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) }) {
        Ok(_) => Ok(Some(st)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The target of the symbolic link open (O_PATH | O_NOFOLLOW) at `fd`.
fn read_link(fd: RawFd) -> io::Result<PathBuf> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: an empty path with an O_PATH descriptor reads that link; buf is valid for its length.
    let n = unsafe { libc::readlinkat(fd, c"".as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(PathBuf::from(OsString::from_vec(buf)))
}

/// What a file of this mode is, for messages.
fn kind(mode: libc::mode_t) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFREG => "a regular file",
        libc::S_IFDIR => "a directory",
        libc::S_IFLNK => "a symbolic link",
        libc::S_IFIFO => "a FIFO",
        libc::S_IFCHR => "a character device",
        libc::S_IFBLK => "a block device",
        libc::S_IFSOCK => "a socket",
        _ => "a special file",
    }
}

/// Whether a symbolic link (`link`) in directory `dir` may be followed:
/// root or the invoking user made it, or only they can change the directory
/// (owned by one of them, not writable by group or others).
fn may_follow(dir: &libc::stat, link: &libc::stat, uid: u32) -> bool {
    let trusted = |owner: u32| owner == 0 || owner == uid;
    trusted(link.st_uid) || (trusted(dir.st_uid) && dir.st_mode & 0o022 == 0)
}

/// A random number for temporary names (not a secret: names are created `O_EXCL`).
fn random() -> u64 {
    let mut n = 0u64;
    // SAFETY: writes at most 8 bytes into n.
    let got = unsafe { libc::getrandom((&raw mut n).cast(), 8, 0) };
    if got != 8 {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        n = t.as_nanos() as u64 ^ u64::from(std::process::id()) << 32;
    }
    n
}

/// Splits a file path into its directory (`.` for a bare name) and name.
pub fn split(path: &Path) -> Result<(PathBuf, OsString), FileError> {
    let name = match path.components().next_back() {
        Some(Component::Normal(name)) => name.to_os_string(),
        _ => return Err(FileError::NoName { path: path.display().to_string() }),
    };
    // A bare name is in the current directory: "" opens it and keeps messages short.
    let parent = path.parent().unwrap_or(Path::new(""));
    Ok((parent.to_path_buf(), name))
}

impl Dir {
    /// Opens directory `path` (see the module doc for which symbolic links
    /// are followed). With `create`, missing directories are made with that
    /// mode (as `mkdir -p`, relative to the descriptors already open).
    pub fn open(path: &Path, create: Option<u32>) -> Result<Self, FileError> {
        let uid = real_uid();
        let fail = |why: String| FileError::Dir { dir: path.display().to_string(), why };
        let os = |at: &Path, e: io::Error| match e.raw_os_error() {
            Some(libc::ENOENT) => {
                fail(format!("{} does not exist (create it, or give another path)", at.display()))
            }
            _ => fail(format!("{}: {e}", at.display())),
        };
        let dot = OsStr::new(".");
        let start = if path.is_absolute() { OsStr::new("/") } else { dot };
        let flags = libc::O_PATH | libc::O_DIRECTORY;
        let mut cur = open_at(libc::AT_FDCWD, start, flags, 0).map_err(|e| os(Path::new(start), e))?;
        // Where the walk is, for messages.
        let mut at = if path.is_absolute() { PathBuf::from("/") } else { PathBuf::new() };
        // Components still to walk, last first.
        let mut todo: Vec<OsString> = Vec::new();
        push_components(&mut todo, path);
        let mut links = 0;
        while let Some(name) = todo.pop() {
            if name == "/" {
                cur = open_at(libc::AT_FDCWD, &name, flags, 0).map_err(|e| os(Path::new("/"), e))?;
                at = PathBuf::from("/");
                continue;
            }
            let here = at.join(&name);
            let fd = match open_at(cur.as_raw_fd(), &name, libc::O_PATH | libc::O_NOFOLLOW, 0) {
                Ok(fd) => fd,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) && create.is_some() && name != ".." => {
                    let c = cstr(&name).map_err(|e| os(&here, e))?;
                    let mode = create.unwrap_or(0o755) as libc::mode_t;
                    // SAFETY: a valid C string; cur is an open directory.
                    match check(unsafe { libc::mkdirat(cur.as_raw_fd(), c.as_ptr(), mode) }) {
                        Ok(_) => {}
                        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                        Err(e) => return Err(fail(format!("cannot create {}: {e}", here.display()))),
                    }
                    open_at(cur.as_raw_fd(), &name, libc::O_PATH | libc::O_NOFOLLOW, 0)
                        .map_err(|e| os(&here, e))?
                }
                Err(e) => return Err(os(&here, e)),
            };
            let st = stat_fd(fd.as_raw_fd()).map_err(|e| os(&here, e))?;
            match st.st_mode & libc::S_IFMT {
                libc::S_IFDIR => {
                    cur = fd;
                    at = match at.parent() {
                        Some(up) if name == ".." && at.file_name().is_some() => up.to_path_buf(),
                        _ => here,
                    };
                }
                libc::S_IFLNK => {
                    links += 1;
                    if links > MAX_LINKS {
                        return Err(fail(format!("more than {MAX_LINKS} symbolic links on the way")));
                    }
                    let dir_st = stat_fd(cur.as_raw_fd()).map_err(|e| os(&at, e))?;
                    if !may_follow(&dir_st, &st, uid) {
                        return Err(fail(format!(
                            "{} is a symbolic link owned by uid {} in a directory other users can write; \
                             pftraced does not follow such links (it could lead anywhere): give the real path",
                            here.display(),
                            st.st_uid
                        )));
                    }
                    let target = read_link(fd.as_raw_fd()).map_err(|e| os(&here, e))?;
                    push_components(&mut todo, &target);
                }
                _ => {
                    return Err(fail(format!("{} is {}, not a directory", here.display(), kind(st.st_mode))));
                }
            }
        }
        Ok(Self { fd: cur, path: path.to_path_buf() })
    }

    /// Whether the directory is still in the file system (not removed since it was opened).
    pub fn exists(&self) -> bool {
        stat_fd(self.fd.as_raw_fd()).is_ok_and(|st| st.st_nlink > 0)
    }

    /// The path it was opened as.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path of `name` in it, for messages.
    pub fn join(&self, name: &OsStr) -> PathBuf {
        self.path.join(name)
    }

    /// Another descriptor of the same directory.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self { fd: self.fd.try_clone()?, path: self.path.clone() })
    }

    fn io_error(&self, action: &'static str, name: &OsStr, source: io::Error) -> FileError {
        FileError::Io { action, path: self.join(name).display().to_string(), source }
    }

    /// What is at `name`: nothing, or a regular file of the invoking user;
    /// anything else is refused.
    pub fn existing(&self, name: &OsStr) -> Result<Existing, FileError> {
        let st = match lstat_at(self.fd.as_raw_fd(), name) {
            Ok(None) => return Ok(Existing::Absent),
            Ok(Some(st)) => st,
            Err(e) => return Err(self.io_error("checking", name, e)),
        };
        let path = self.join(name).display().to_string();
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(FileError::NotRegular { path, kind: kind(st.st_mode) });
        }
        let uid = real_uid();
        if st.st_uid != uid {
            return Err(FileError::NotOwned { path, owner: st.st_uid, uid });
        }
        Ok(Existing::OwnFile)
    }

    /// Creates `name`, which must not exist (`O_EXCL`: never through a
    /// symbolic link). Opened for reading and writing, or appending.
    pub fn create_new(&self, name: &OsStr, mode: u32, append: bool) -> io::Result<File> {
        let flags = libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_RDWR;
        let flags = if append { flags | libc::O_APPEND } else { flags };
        Ok(File::from(open_at(self.fd.as_raw_fd(), name, flags, mode as libc::mode_t)?))
    }

    /// Creates `base` or, if that name is taken, `base` with a random suffix
    /// before its extension. Returns the name used.
    pub fn create_unique(&self, base: &str, ext: &str, mode: u32) -> Result<(OsString, File), FileError> {
        let mut name = OsString::from(format!("{base}{ext}"));
        for _ in 0..TEMP_TRIES {
            match self.create_new(&name, mode, false) {
                Ok(file) => return Ok((name, file)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    name = OsString::from(format!("{base}-{:08x}{ext}", random() as u32));
                }
                Err(e) => return Err(self.io_error("creating", &name, e)),
            }
        }
        Err(self.io_error("creating", &name, io::ErrorKind::AlreadyExists.into()))
    }

    /// An unnamed file in this directory (`O_TMPFILE`), gone when closed:
    /// scratch space on the same file system as the output.
    pub fn scratch(&self) -> io::Result<File> {
        let dot = OsStr::new(".");
        match open_at(self.fd.as_raw_fd(), dot, libc::O_TMPFILE | libc::O_RDWR, 0o600) {
            Ok(fd) => Ok(File::from(fd)),
            // File systems without O_TMPFILE: a named file, unlinked at once.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EISDIR)) => {
                let name =
                    OsString::from(format!(".pftrace-scratch-{}-{:016x}", std::process::id(), random()));
                let file = self.create_new(&name, 0o600, false)?;
                self.remove(&name)?;
                Ok(file)
            }
            Err(e) => Err(e),
        }
    }

    /// Removes `name` (a file).
    pub fn remove(&self, name: &OsStr) -> io::Result<()> {
        let c = cstr(name)?;
        // SAFETY: a valid C string; the descriptor is an open directory.
        check(unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), 0) }).map(drop)
    }

    /// Starts writing a file that will take the name `name` atomically when
    /// committed. Refused at once if `name` holds something that may not be
    /// replaced.
    pub fn replacement(&self, name: &OsStr, mode: u32) -> Result<Replacement<'_>, FileError> {
        self.existing(name)?;
        let base = format!(".pftrace-tmp-{}", std::process::id());
        let (temp, file) = self.create_unique(&base, "", mode)?;
        Ok(Replacement { dir: self, name: name.to_os_string(), temp, file, committed: false })
    }

    /// Makes the directory's entries durable (best effort: some file systems refuse).
    fn sync(&self) {
        if let Ok(fd) = open_at(self.fd.as_raw_fd(), OsStr::new("."), libc::O_RDONLY | libc::O_DIRECTORY, 0) {
            let _ = File::from(fd).sync_all();
        }
    }

    fn rename(&self, from: &OsStr, to: &OsStr, flags: libc::c_uint) -> io::Result<()> {
        let (from, to) = (cstr(from)?, cstr(to)?);
        let fd = self.fd.as_raw_fd();
        // SAFETY: valid C strings; both names are relative to the same open directory.
        check(unsafe { libc::renameat2(fd, from.as_ptr(), fd, to.as_ptr(), flags) }).map(drop)
    }
}

/// Pushes the components of `path` onto `todo` so that they pop in order;
/// an absolute path starts with `/`.
fn push_components(todo: &mut Vec<OsString>, path: &Path) {
    for c in path.components().rev() {
        match c {
            Component::RootDir => todo.push("/".into()),
            Component::Normal(n) => todo.push(n.to_os_string()),
            Component::ParentDir => todo.push("..".into()),
            Component::CurDir | Component::Prefix(_) => {}
        }
    }
}

/// A file being written under a temporary name, renamed over its final name
/// by [`Replacement::commit`]; removed if dropped uncommitted.
#[derive(Debug)]
pub struct Replacement<'d> {
    dir: &'d Dir,
    name: OsString,
    temp: OsString,
    file: File,
    committed: bool,
}

impl Replacement<'_> {
    /// The file to write.
    pub fn file(&mut self) -> &mut File {
        &mut self.file
    }

    /// The final path, for messages.
    pub fn path(&self) -> PathBuf {
        self.dir.join(&self.name)
    }

    /// Makes the content durable and gives it the final name: if nothing
    /// is there, only if nothing appeared meanwhile; if an own regular file
    /// is there, replacing it in one step.
    pub fn commit(mut self) -> Result<(), FileError> {
        let dir = self.dir;
        self.file.sync_all().map_err(|e| dir.io_error("writing", &self.name, e))?;
        let renamed = match dir.existing(&self.name)? {
            Existing::Absent => match dir.rename(&self.temp, &self.name, libc::RENAME_NOREPLACE) {
                // A file system without RENAME_NOREPLACE: checked just above.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => dir.rename(&self.temp, &self.name, 0),
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    // Something appeared since the check: replace it only if it may be replaced.
                    dir.existing(&self.name)?;
                    dir.rename(&self.temp, &self.name, 0)
                }
                other => other,
            },
            Existing::OwnFile => dir.rename(&self.temp, &self.name, 0),
        };
        renamed.map_err(|e| dir.io_error("renaming the finished file to", &self.name, e))?;
        self.committed = true;
        dir.sync();
        Ok(())
    }
}

impl Drop for Replacement<'_> {
    fn drop(&mut self) {
        if !self.committed {
            let _ = self.dir.remove(&self.temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        fs,
        io::{Read as _, Write as _},
        os::unix::fs::{MetadataExt as _, PermissionsExt as _, symlink},
    };

    use super::*;

    fn temp(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pftrace-safe-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn new_files_and_atomic_replacement() {
        let base = temp("replace");
        let dir = Dir::open(&base, None).unwrap();
        let name = OsStr::new("trace.json");
        assert_eq!(dir.existing(name).unwrap(), Existing::Absent);
        let mut r = dir.replacement(name, 0o644).unwrap();
        r.file().write_all(b"first").unwrap();
        r.commit().unwrap();
        let inode = fs::metadata(base.join(name)).unwrap().ino();
        let mut r = dir.replacement(name, 0o644).unwrap();
        r.file().write_all(b"second").unwrap();
        // Until committed the old content stays in place.
        assert_eq!(fs::read_to_string(base.join(name)).unwrap(), "first");
        r.commit().unwrap();
        assert_eq!(fs::read_to_string(base.join(name)).unwrap(), "second");
        assert_ne!(fs::metadata(base.join(name)).unwrap().ino(), inode, "replaced in place, not renamed");
        // An abandoned replacement leaves nothing behind.
        let mut r = dir.replacement(name, 0o644).unwrap();
        r.file().write_all(b"third").unwrap();
        drop(r);
        let names: Vec<_> = fs::read_dir(&base).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, [name]);
        assert!(dir.create_new(name, 0o644, false).is_err_and(|e| e.kind() == io::ErrorKind::AlreadyExists));
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn special_files_and_links_are_refused_unopened() {
        let base = temp("special");
        let dir = Dir::open(&base, None).unwrap();
        let fifo = CString::new(base.join("fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        fs::write(base.join("victim"), "keep").unwrap();
        symlink(base.join("victim"), base.join("link")).unwrap();
        let err = dir.replacement(OsStr::new("fifo"), 0o644).unwrap_err().to_string();
        assert!(err.ends_with("fifo exists and is a FIFO; pftraced writes only regular files: remove it or choose another name"), "{err}");
        let err = dir.replacement(OsStr::new("link"), 0o644).unwrap_err().to_string();
        assert!(err.contains("link exists and is a symbolic link"), "{err}");
        let err = Dir::open(Path::new("/dev/full"), None).unwrap_err().to_string();
        assert_eq!(err, "directory /dev/full: /dev/full is a character device, not a directory");
        let dev = Dir::open(Path::new("/dev"), None).unwrap();
        let err = dev.existing(OsStr::new("full")).unwrap_err().to_string();
        assert!(err.starts_with("/dev/full exists and is a character device"), "{err}");
        assert!(dir.create_new(OsStr::new("link"), 0o644, false).is_err());
        assert_eq!(fs::read_to_string(base.join("victim")).unwrap(), "keep");
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn directories_are_walked_and_created_without_untrusted_links() {
        let base = temp("walk");
        let err = Dir::open(&base.join("no/such"), None).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "directory {0}/no/such: {0}/no does not exist (create it, or give another path)",
                base.display()
            )
        );
        let made = Dir::open(&base.join("a/b/../c"), Some(0o750)).unwrap();
        assert!(base.join("a/c").is_dir() && base.join("a/b").is_dir());
        assert_eq!(fs::metadata(base.join("a/c")).unwrap().permissions().mode() & 0o777, 0o750);
        made.create_new(OsStr::new("x"), 0o600, false).unwrap();
        assert!(base.join("a/c/x").is_file());
        // Our own links are followed, relative and absolute, and loops end.
        symlink("a/c", base.join("rel")).unwrap();
        symlink(base.join("a"), base.join("abs")).unwrap();
        Dir::open(&base.join("rel"), None).unwrap().create_new(OsStr::new("y"), 0o600, false).unwrap();
        Dir::open(&base.join("abs/c"), None).unwrap().create_new(OsStr::new("z"), 0o600, false).unwrap();
        assert!(base.join("a/c/y").is_file() && base.join("a/c/z").is_file());
        symlink("loop", base.join("loop")).unwrap();
        let err = Dir::open(&base.join("loop"), None).unwrap_err().to_string();
        assert!(err.ends_with("more than 40 symbolic links on the way"), "{err}");
        fs::write(base.join("plain"), "").unwrap();
        let err = Dir::open(&base.join("plain/d"), Some(0o755)).unwrap_err().to_string();
        assert!(err.ends_with("plain is a regular file, not a directory"), "{err}");
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn another_users_link_in_a_shared_directory_is_not_followed() {
        let base = temp("shared");
        fs::create_dir(base.join("target")).unwrap();
        fs::set_permissions(&base, fs::Permissions::from_mode(0o1777)).unwrap();
        symlink(base.join("target"), base.join("theirs")).unwrap();
        let link = CString::new(base.join("theirs").as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid C string; changes the link itself.
        assert_eq!(unsafe { libc::lchown(link.as_ptr(), 4_000_123, 4_000_123) }, 0, "needs root");
        let err = Dir::open(&base.join("theirs"), None).unwrap_err().to_string();
        assert!(
            err.contains(
                "theirs is a symbolic link owned by uid 4000123 in a directory other users can write"
            ),
            "{err}"
        );
        // In a directory only root can change, the same link is followed.
        fs::set_permissions(&base, fs::Permissions::from_mode(0o755)).unwrap();
        Dir::open(&base.join("theirs"), None).unwrap();
        // A regular file of another user is never replaced.
        fs::write(base.join("target/f"), "theirs").unwrap();
        let f = CString::new(base.join("target/f").as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::chown(f.as_ptr(), 4_000_123, 4_000_123) }, 0);
        let dir = Dir::open(&base.join("target"), None).unwrap();
        let err = dir.replacement(OsStr::new("f"), 0o644).unwrap_err().to_string();
        assert!(err.contains("f exists and belongs to uid 4000123, not to you (uid 0)"), "{err}");
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn scratch_files_have_no_name() {
        let base = temp("scratch");
        let dir = Dir::open(&base, None).unwrap();
        let mut f = dir.scratch().unwrap();
        f.write_all(b"abc").unwrap();
        let mut back = String::new();
        std::io::Seek::rewind(&mut f).unwrap();
        f.read_to_string(&mut back).unwrap();
        assert_eq!(back, "abc");
        assert_eq!(fs::read_dir(&base).unwrap().count(), 0);
        let (name, _) = dir.create_unique("x", ".jsonl", 0o644).unwrap();
        let (other, _) = dir.create_unique("x", ".jsonl", 0o644).unwrap();
        assert_eq!(name, "x.jsonl");
        assert!(other.to_str().unwrap().starts_with("x-") && other.to_str().unwrap().ends_with(".jsonl"));
        assert_eq!(split(Path::new("t.json")).unwrap(), (PathBuf::new(), OsString::from("t.json")));
        assert_eq!(split(Path::new("/a/t.json")).unwrap(), (PathBuf::from("/a"), OsString::from("t.json")));
        assert!(split(Path::new("/")).is_err() && split(Path::new("a/..")).is_err());
        fs::remove_dir_all(&base).unwrap();
    }
}
