//! Finding what to attach to in a process: the ELF that carries CPython's
//! probes (the executable, or a libpython mapped into it), read through
//! /proc/PID/root so processes in other mount namespaces work; and deciding,
//! with a message a user can act on, when a process cannot be traced.

use std::{
    fs, io,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use procfs::process::{MMapPath, MemoryMaps};

use crate::{
    elf_info,
    python::{self, Mechanism, PyVersion, USDT_WORKS, WHAT_WORKS},
    usdt::{ProbeSite, UsdtError},
};

/// Set once at start-up (`pftraced --agent`): trace every CPython 3.11+
/// through the in-process agent, also those whose USDT probes work.
static PREFER_AGENT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes [`inspect`] choose the agent for every CPython 3.11+ (`pftraced --agent`).
pub fn prefer_agent() {
    PREFER_AGENT.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// A process that can be traced.
#[derive(Debug, Clone)]
pub struct Target {
    pub pid: u32,
    /// The ELF carrying the probes, as the process sees it.
    pub binary: PathBuf,
    /// The same file, as a path this daemon can open.
    pub open_path: PathBuf,
    pub version: Option<PyVersion>,
    /// CPython's `function__entry` and `function__return` sites in `binary`
    /// (both present; their argument specs checked).
    pub sites: Arc<[ProbeSite]>,
    /// The process's command line, space-joined.
    pub command: String,
    /// (device, inode) of the ELF, taken when the process was inspected
    /// (later the process may be gone, and `open_path` with it).
    pub file: (u64, u64),
    /// When the process started (clock ticks after boot, /proc/PID/stat;
    /// 0 if unknown). Unchanged by exec: a different value under the same
    /// pid is another process that reused it.
    pub started: u64,
    /// How it is traced: its USDT probes (`sites`), or the in-process
    /// agent (`sites` empty), chosen by [`python::mechanism`].
    pub mechanism: Mechanism,
}

/// Why a process cannot be traced.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("no process with pid {0} (check the pid with `ps -p {0}`)")]
    PidNotFound(u32),
    #[error("pid {0} has exited (it is a zombie, not yet reaped by its parent); nothing to trace")]
    Zombie(u32),
    #[error("pid {pid} exited or cannot be inspected: {source}")]
    Gone { pid: u32, source: io::Error },
    #[error(
        "pid {pid} runs {exe}, which is not a CPython interpreter (no python executable or libpython \
         found); pftraced traces CPython processes"
    )]
    NotPython { pid: u32, exe: String },
    #[error(
        "pid {pid} runs CPython {version} ({binary}), which has no USDT probes: it was built without \
         --with-dtrace. Use {WHAT_WORKS}"
    )]
    NoProbes { pid: u32, binary: String, version: String },
    #[error("pid {pid} runs CPython {version} ({binary}): {why}. Use {WHAT_WORKS}")]
    Unsupported { pid: u32, binary: String, version: PyVersion, why: &'static str },
    #[error("pid {pid}: reading the probes of {binary}: {source}")]
    Usdt { pid: u32, binary: String, source: UsdtError },
}

/// Inspects `pid` and returns what to attach to, or why it cannot be traced.
/// Everything is read through one [`procfs::process::Process`] (a
/// descriptor of `/proc/PID`), so it all describes one process even if the
/// pid is reused meanwhile.
pub fn inspect(pid: u32) -> Result<Target, TargetError> {
    let Some(process) = crate::procinfo::open(pid) else {
        return Err(TargetError::PidNotFound(pid));
    };
    let gone = |source| TargetError::Gone { pid, source };
    let proc_err = |e: procfs::ProcError| gone(io::Error::other(e));
    let stat = crate::procinfo::stat_of(&process);
    if stat.is_some_and(|s| s.exited()) {
        return Err(TargetError::Zombie(pid));
    }
    let exe = process.exe().map_err(proc_err)?;
    let maps = process.maps().map_err(proc_err)?;
    let command = crate::procinfo::command_line(&process);

    // Candidates: the executable, then any libpython it maps.
    let mut candidates = vec![exe.clone()];
    for lib in mapped_libpythons(&maps) {
        if !candidates.contains(&lib) {
            candidates.push(lib);
        }
    }

    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let mut python_like: Option<(PathBuf, Option<PyVersion>, (u64, u64))> = None;
    for binary in &candidates {
        let open_path = under_root(&root, binary);
        let display = crate::events::printable_path(binary);
        let opened = elf_info::open_beneath(&root, binary)
            .map_err(|source| UsdtError::Read { path: open_path.clone(), source })
            .and_then(|file| elf_info::inspect(file, binary, &open_path));
        let info = match opened {
            Ok(info) => info,
            // Not an ELF we can read (a script interpreter, a deleted file): not our binary.
            Err(_) if binary == &exe && !looks_like_python(binary) => continue,
            Err(source) => {
                // The process exited meanwhile: its /proc/PID/root went with it.
                process.root().map_err(proc_err)?;
                return Err(TargetError::Usdt { pid, binary: display, source });
            }
        };
        let version = info.version;
        let is_python = version.is_some() || looks_like_python(binary);
        check_specs(&info.sites).map_err(|source| TargetError::Usdt {
            pid,
            binary: display.clone(),
            source,
        })?;
        if !has_both_probes(&info.sites) {
            if is_python && python_like.is_none() {
                python_like = Some((binary.clone(), version, info.file));
            }
            continue;
        }
        let jit = version.is_some_and(|v| python::jit_enabled(v, env_var(&process, "PYTHON_JIT").as_deref()));
        let avoid_usdt = jit || PREFER_AGENT.load(std::sync::atomic::Ordering::Relaxed);
        let mechanism = python::mechanism(version, true, avoid_usdt).map_err(|why| match version {
            Some(version) => TargetError::Unsupported { pid, binary: display.clone(), version, why },
            None => {
                TargetError::NoProbes { pid, binary: display.clone(), version: "(version unknown)".into() }
            }
        })?;
        if jit && mechanism == Mechanism::Agent {
            log::info!(
                "pid {pid} runs CPython with PYTHON_JIT set: code its JIT compiles fires no USDT probe, so \
                 pftrace traces it through its in-process agent"
            );
        }
        let sites = match mechanism {
            Mechanism::Usdt => Arc::clone(&info.sites),
            Mechanism::Agent => Arc::from([]),
        };
        return target_of(&process, pid, binary, open_path, version, sites, command, mechanism, info.file);
    }

    let Some((binary, version, file)) = python_like else {
        return Err(TargetError::NotPython { pid, exe: crate::events::printable_path(&exe) });
    };
    let display = crate::events::printable_path(&binary);
    match python::mechanism(version, false, false) {
        Ok(mechanism) => {
            let open_path = under_root(&root, &binary);
            target_of(&process, pid, &binary, open_path, version, Arc::from([]), command, mechanism, file)
        }
        Err(why) => match version {
            Some(version) if why != python::NO_PROBES => {
                Err(TargetError::Unsupported { pid, binary: display, version, why })
            }
            v => Err(TargetError::NoProbes {
                pid,
                binary: display,
                version: v.map_or("(version unknown)".into(), |v| v.to_string()),
            }),
        },
    }
}

/// The [`Target`] of a process found traceable.
#[allow(clippy::too_many_arguments)]
fn target_of(
    process: &procfs::process::Process,
    pid: u32,
    binary: &Path,
    open_path: PathBuf,
    version: Option<PyVersion>,
    sites: Arc<[ProbeSite]>,
    command: String,
    mechanism: Mechanism,
    file: (u64, u64),
) -> Result<Target, TargetError> {
    let started = crate::procinfo::stat_of(process).map_or(0, |s| s.start_ticks);
    Ok(Target {
        pid,
        binary: binary.to_path_buf(),
        open_path,
        version,
        sites,
        command,
        file,
        started,
        mechanism,
    })
}

/// Whether a command's program (`program`, looked up on PATH like exec
/// does) is a CPython pftraced traces through its USDT probes, run with
/// `python_jit` as its PYTHON_JIT: then a launched command needs no agent
/// (its start-up code would fire the probes, and its imports add calls).
pub fn runs_usdt_python(program: &std::ffi::OsStr, python_jit: Option<&[u8]>) -> bool {
    let candidates: Vec<PathBuf> = if program.as_bytes().contains(&b'/') {
        vec![PathBuf::from(program)]
    } else {
        std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).map(|d| d.join(program)).collect())
            .unwrap_or_default()
    };
    let Some(path) = candidates.into_iter().find(|p| p.is_file()) else { return false };
    let Ok(info) = fs::File::open(&path)
        .map_err(|source| UsdtError::Read { path: path.clone(), source })
        .and_then(|file| elf_info::inspect(file, &path, &path))
    else {
        return false;
    };
    let Some(version) = info.version else { return false };
    let avoid =
        python::jit_enabled(version, python_jit) || PREFER_AGENT.load(std::sync::atomic::Ordering::Relaxed);
    has_both_probes(&info.sites) && python::mechanism(Some(version), true, avoid) == Ok(Mechanism::Usdt)
}

/// Why a file given with `--binary` cannot be attached to.
#[derive(Debug, thiserror::Error)]
pub enum BinaryError {
    #[error("--binary {path}: {source} (give the interpreter or libpython file, e.g. /usr/bin/python3.9)")]
    Open { path: String, source: io::Error },
    #[error("--binary {path}: reading its probes: {source}")]
    Usdt { path: String, source: UsdtError },
    #[error(
        "--binary {path} has no python:function__entry and function__return probes (not a CPython built \
         --with-dtrace). Use {USDT_WORKS}"
    )]
    NoProbes { path: String },
    #[error("--binary {path} is CPython {version}: {why}. Use {USDT_WORKS}")]
    Unsupported { path: String, version: PyVersion, why: &'static str },
}

/// Inspects an interpreter file named by the user (`--binary`): what to
/// attach to host-wide. The result's pid is 0.
pub fn inspect_file(path: &Path) -> Result<Target, BinaryError> {
    let display = crate::events::printable_path(path);
    let meta = fs::metadata(path).map_err(|source| BinaryError::Open { path: display.clone(), source })?;
    if !meta.is_file() {
        let source = io::Error::new(io::ErrorKind::InvalidInput, "not a regular file");
        return Err(BinaryError::Open { path: display, source });
    }
    // The administrator's own argument: symbolic links followed (/usr/bin/python3).
    let info = fs::File::open(path)
        .map_err(|source| UsdtError::Read { path: path.to_path_buf(), source })
        .and_then(|file| elf_info::inspect(file, path, path))
        .map_err(|source| BinaryError::Usdt { path: display.clone(), source })?;
    check_specs(&info.sites).map_err(|source| BinaryError::Usdt { path: display.clone(), source })?;
    if !has_both_probes(&info.sites) {
        return Err(BinaryError::NoProbes { path: display });
    }
    if let Some(version) = info.version
        && let Some(why) = version.probe_support().refusal()
    {
        return Err(BinaryError::Unsupported { path: display, version, why });
    }
    Ok(Target {
        pid: 0,
        binary: path.to_path_buf(),
        open_path: path.to_path_buf(),
        version: info.version,
        sites: Arc::clone(&info.sites),
        command: String::new(),
        file: info.file,
        started: 0,
        mechanism: Mechanism::Usdt,
    })
}

/// Mapped files whose name starts with `libpython`.
fn mapped_libpythons(maps: &MemoryMaps) -> Vec<PathBuf> {
    let mut libs = Vec::new();
    for map in maps {
        let MMapPath::Path(path) = &map.pathname else { continue };
        let text = path.as_os_str().as_encoded_bytes();
        let path = Path::new(std::ffi::OsStr::from_bytes(text.strip_suffix(b" (deleted)").unwrap_or(text)));
        if path.is_absolute()
            && path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libpython"))
            && !libs.iter().any(|l: &PathBuf| l == path)
        {
            libs.push(path.to_path_buf());
        }
    }
    libs
}

fn under_root(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

fn looks_like_python(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("python") || n.starts_with("libpython"))
}

/// The value of variable `name` in the initial environment of `process`.
pub(crate) fn env_var(process: &procfs::process::Process, name: &str) -> Option<Vec<u8>> {
    let environ = process.environ().ok()?;
    environ.get(std::ffi::OsStr::new(name)).map(|v| v.as_bytes().to_vec())
}

/// Whether `sites` hold both a `function__entry` and a `function__return` site.
fn has_both_probes(sites: &[ProbeSite]) -> bool {
    let has = |kind| sites.iter().any(|s| s.python_kind() == Some(kind));
    has(pftrace_common::kind::ENTRY) && has(pftrace_common::kind::RETURN)
}

/// Checks that the eBPF program can read the arguments of every site.
fn check_specs(sites: &[ProbeSite]) -> Result<(), UsdtError> {
    sites.iter().try_for_each(|s| s.spec().map(drop))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_libpython_in_maps() {
        let maps = "\
7f00-7f01 r--p 00000000 08:01 123 /usr/lib/libpython3.9.so.1.0
7f01-7f02 r-xp 00001000 08:01 123 /usr/lib/libpython3.9.so.1.0
7f02-7f03 r--p 00000000 08:01 124 /usr/lib/libc.so.6
7f03-7f04 rw-p 00000000 00:00 0 
7f04-7f05 r-xp 00000000 08:01 125 /opt/my dir/libpython3.10d.so (deleted)
";
        let maps = <MemoryMaps as procfs::FromBufRead>::from_buf_read(maps.as_bytes()).unwrap();
        assert_eq!(
            mapped_libpythons(&maps),
            vec![
                PathBuf::from("/usr/lib/libpython3.9.so.1.0"),
                PathBuf::from("/opt/my dir/libpython3.10d.so")
            ]
        );
    }
}
