//! Loading the agent into a running CPython 3.14+ through PEP 768, spoken by
//! pftrace itself: find the `.PyRuntime` section through /proc/PID/maps, read
//! `_Py_DebugOffsets` from the process, check that remote debugging is
//! enabled, write the loader script's path into a thread state that runs
//! Python, set its pending flag and the eval breaker's please-stop bit, all
//! through /proc/PID/mem. The interpreter runs the script at that thread's
//! next eval-breaker check.
//!
//! Which thread: `sys.remote_exec` aims at the main thread, which ran the
//! script 5 s late when it slept (FIELD-NOTES); this aims at the thread that
//! last held the GIL, which is running Python if any thread is, and falls
//! back to the main thread. That thread may block for good right after
//! (read as the holder just before it entered `join()`, the request waited
//! there until the timeout in 1 of 3 runs of a test), so a request not taken
//! within [`AIM_FOR`] is withdrawn and aimed again: at the holder then, or
//! at a thread not tried yet. If nothing runs the script within the
//! timeout, the pending flag is cleared again, so it does not run
//! unannounced later. A thread may take a request just as it is withdrawn:
//! the loader then runs twice, which it tolerates (the daemon asks again
//! anyway until the agent connects).
//!
//! Offsets: the prefix of `_Py_DebugOffsets` used here (runtime state,
//! interpreter state, the first thread-state fields) is the same in 3.14 and
//! 3.15 (read from Debian's 3.14.10 and 3.15.2); the `debugger_support` block
//! sits after fields that differ, so it is found by its fixed tail
//! (`debugger_pending_call` = 0, `debugger_script_path` = 4, path size 512),
//! and every offset is bounds-checked before use.

use std::{
    fs::File,
    io::{BufRead as _, BufReader},
    os::unix::fs::FileExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// How long one thread is given to take the request before it is aimed
/// again: a thread running Python checks its eval breaker at least every
/// switch interval (5 ms by default), so 50 ms is ten of them.
pub const AIM_FOR: Duration = Duration::from_millis(50);
/// Longest script path CPython accepts, with its NUL.
const SCRIPT_PATH_SIZE: u64 = 512;
/// `_PY_EVAL_PLEASE_STOP_BIT`.
const PLEASE_STOP: u64 = 1 << 5;
/// No structure the offsets point into is anywhere near this big.
const MAX_OFFSET: u64 = 1 << 20;
/// Words of `_Py_DebugOffsets` read (the struct is ~110 words in 3.14/3.15).
const WORDS: usize = 256;
/// Threads and interpreters followed at most.
const MAX_LINKS: usize = 4096;

// Word indices of `_Py_DebugOffsets` (u64 each), the same in 3.14 and 3.15.
const W_VERSION: usize = 1;
const W_FREE_THREADED: usize = 2;
const W_INTERPRETERS_HEAD: usize = 5;
const W_INTERP_ID: usize = 7;
const W_INTERP_NEXT: usize = 8;
const W_THREADS_HEAD: usize = 9;
const W_THREADS_MAIN: usize = 10;
const W_GIL_HOLDER: usize = 19;
const W_TSTATE_NEXT: usize = 24;

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error(
        "process {pid}: no CPython 3.13+ runtime (.PyRuntime section) in its mappings; a CPython 3.11 or 3.12 has no way to load the agent into a running process: {advice}"
    )]
    NoRuntime { pid: u32, advice: &'static str },
    #[error(
        "process {pid} runs CPython {version}: loading the agent into a running process needs 3.14 or later (PEP 768); {advice}"
    )]
    TooOld { pid: u32, version: String, advice: &'static str },
    #[error("process {pid} is a free-threaded CPython build, which the agent does not support")]
    FreeThreaded { pid: u32 },
    #[error(
        "process {pid} refuses remote debugging (started with PYTHON_DISABLE_REMOTE_DEBUG, -X disable-remote-debug, or built --without-remote-debug): pftrace cannot load its agent into it; {advice}"
    )]
    Disabled { pid: u32, advice: &'static str },
    #[error("process {pid}: another debugger's script is pending in its thread; try again")]
    Busy { pid: u32 },
    #[error(
        "process {pid} did not run pftrace's loader within {timeout:?}: none of its threads ran Python code (blocked in C code, sleeping or stopped); the request was withdrawn. Try again while it runs Python, or start it with the agent"
    )]
    Timeout { pid: u32, timeout: Duration },
    #[error(
        "process {pid}: unexpected _Py_DebugOffsets ({what}); this CPython's layout is not one pftrace knows"
    )]
    Layout { pid: u32, what: String },
    #[error("script path {0} is longer than CPython's 511 bytes")]
    PathTooLong(PathBuf),
    #[error("process {pid}: {what}: {source}")]
    Io { pid: u32, what: String, source: std::io::Error },
}

/// What users of 3.11-3.13 (and refusing processes) are told to do instead.
pub const START_WITH_AGENT: &str = "start the program under pftraced (`pftraced -t NAME -- CMD`) or with the agent on its path (`eval \"$(pftracectl env)\"` before starting it)";

/// Where the script was delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    /// Address of the thread state that ran it.
    pub tstate: u64,
    /// It was the thread that last held the GIL when aimed at (else the
    /// main thread, or a thread not tried before).
    pub gil_holder: bool,
    /// Threads the request was aimed at, this one included (1: the first).
    pub aims: u32,
    pub after: Duration,
}

/// The CPython runtime of a process, as located in its memory.
struct Runtime {
    pid: u32,
    mem: File,
    addr: u64,
    w: Vec<u64>,
    /// debugger_support: eval_breaker, remote_debugger_support, remote_debugging_enabled (offsets).
    eval_breaker: u64,
    support: u64,
    enabled: u64,
}

/// Asks process `pid` to run `script` (the agent's loader) through PEP 768
/// and waits until a thread has taken it (at most `timeout`).
pub fn run_script(pid: u32, script: &Path, timeout: Duration) -> Result<Delivered, RemoteError> {
    let path = script.as_os_str().as_encoded_bytes();
    if path.len() as u64 >= SCRIPT_PATH_SIZE {
        return Err(RemoteError::PathTooLong(script.into()));
    }
    let rt = Runtime::find(pid)?;
    let interp = rt.main_interpreter()?;
    if rt.read_u32(interp + rt.enabled)? != 1 {
        return Err(RemoteError::Disabled { pid, advice: START_WITH_AGENT });
    }
    let mut buf = path.to_vec();
    buf.push(0);
    let start = Instant::now();
    let mut tried: Vec<u64> = Vec::new();
    loop {
        let (tstate, gil_holder) = rt.target_thread(interp, &tried)?;
        let pending_at = tstate + rt.support; // debugger_pending_call is at offset 0
        if rt.read_u32(pending_at)? != 0 {
            return Err(RemoteError::Busy { pid });
        }
        rt.write(tstate + rt.support + 4, &buf, "writing the script path")?;
        rt.write(pending_at, &1u32.to_ne_bytes(), "setting the pending flag")?;
        let eb_at = tstate + rt.eval_breaker;
        let eb = rt.read_u64(eb_at)?;
        rt.write(eb_at, &(eb | PLEASE_STOP).to_ne_bytes(), "setting the eval breaker")?;
        tried.push(tstate);
        // The interpreter clears the flag when it takes the script.
        let aimed = Instant::now();
        while aimed.elapsed() < AIM_FOR && start.elapsed() < timeout {
            match rt.read_u32(pending_at) {
                Ok(0) => {
                    return Ok(Delivered {
                        tstate,
                        gil_holder,
                        aims: tried.len() as u32,
                        after: start.elapsed(),
                    });
                }
                Ok(_) => std::thread::sleep(Duration::from_millis(2)),
                // The process exited or the thread ended: nothing more to do.
                Err(e) => return Err(e),
            }
        }
        let _ = rt.write(pending_at, &0u32.to_ne_bytes(), "withdrawing the request");
        if start.elapsed() >= timeout {
            return Err(RemoteError::Timeout { pid, timeout });
        }
    }
}

impl Runtime {
    fn find(pid: u32) -> Result<Self, RemoteError> {
        let io = |what: &str| {
            let what = what.to_string();
            move |source| RemoteError::Io { pid, what, source }
        };
        let mem = File::options()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/mem"))
            .map_err(io("opening /proc/PID/mem"))?;
        let maps = File::open(format!("/proc/{pid}/maps")).map_err(io("reading /proc/PID/maps"))?;
        let mut seen: Vec<String> = Vec::new();
        let mut mappings = Vec::new();
        for line in BufReader::new(maps).lines().take(100_000) {
            let line = line.map_err(io("reading /proc/PID/maps"))?;
            if let Some(m) = Mapping::parse(&line) {
                mappings.push(m);
            }
        }
        for m in mappings.iter().filter(|m| is_python_file(&m.path)) {
            if seen.contains(&m.path) {
                continue;
            }
            seen.push(m.path.clone());
            // The file as mapped (not whatever the path names now).
            let file = PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end));
            let Some(section_off) = pyruntime_file_offset(&file) else { continue };
            let Some(addr) = mappings
                .iter()
                .filter(|n| n.path == m.path)
                .find(|n| section_off >= n.offset && section_off < n.offset + (n.end - n.start))
                .map(|n| n.start + (section_off - n.offset))
            else {
                continue;
            };
            let mut bytes = vec![0u8; WORDS * 8];
            mem.read_exact_at(&mut bytes, addr).map_err(io("reading _Py_DebugOffsets"))?;
            if &bytes[..8] != b"xdebugpy" {
                continue;
            }
            let w: Vec<u64> =
                bytes.chunks_exact(8).map(|c| u64::from_ne_bytes(c.try_into().unwrap())).collect();
            return Self::from_words(pid, mem, addr, w);
        }
        Err(RemoteError::NoRuntime { pid, advice: START_WITH_AGENT })
    }

    fn from_words(pid: u32, mem: File, addr: u64, w: Vec<u64>) -> Result<Self, RemoteError> {
        let layout = |what: &str| RemoteError::Layout { pid, what: what.into() };
        let version = w[W_VERSION];
        let (major, minor) = (version >> 24, (version >> 16) & 0xff);
        if (major, minor) < (3, 14) {
            return Err(RemoteError::TooOld {
                pid,
                version: format!("{major}.{minor}"),
                advice: START_WITH_AGENT,
            });
        }
        if w[W_FREE_THREADED] != 0 {
            return Err(RemoteError::FreeThreaded { pid });
        }
        // debugger_support's tail: pending_call = 0, script_path = 4, size = 512.
        let tail = (W_TSTATE_NEXT..WORDS - 2)
            .find(|&i| w[i] == 0 && w[i + 1] == 4 && w[i + 2] == SCRIPT_PATH_SIZE)
            .ok_or_else(|| layout("no debugger_support block"))?;
        let (eval_breaker, support, enabled) = (w[tail - 3], w[tail - 2], w[tail - 1]);
        for (name, v) in [
            ("eval_breaker", eval_breaker),
            ("remote_debugger_support", support),
            ("remote_debugging_enabled", enabled),
            ("interpreters_head", w[W_INTERPRETERS_HEAD]),
            ("threads_head", w[W_THREADS_HEAD]),
            ("threads_main", w[W_THREADS_MAIN]),
            ("gil last_holder", w[W_GIL_HOLDER]),
            ("tstate next", w[W_TSTATE_NEXT]),
        ] {
            if v >= MAX_OFFSET {
                return Err(layout(&format!("{name} offset {v}")));
            }
        }
        Ok(Self { pid, mem, addr, w, eval_breaker, support, enabled })
    }

    /// The main interpreter (id 0), following `next` from the list head.
    fn main_interpreter(&self) -> Result<u64, RemoteError> {
        let mut interp = self.read_u64(self.addr + self.w[W_INTERPRETERS_HEAD])?;
        for _ in 0..MAX_LINKS {
            if interp == 0 {
                break;
            }
            if self.read_u64(interp + self.w[W_INTERP_ID])? == 0 {
                return Ok(interp);
            }
            interp = self.read_u64(interp + self.w[W_INTERP_NEXT])?;
        }
        Err(RemoteError::Layout { pid: self.pid, what: "no main interpreter in the list".into() })
    }

    /// Where to aim next: the thread that last held the GIL if it is still
    /// a thread of the interpreter and was not the last one `tried`, else
    /// the main thread if not tried, else the first thread not tried, else
    /// (every thread tried) the holder or the main thread again. Also says
    /// whether it is the GIL's holder.
    fn target_thread(&self, interp: u64, tried: &[u64]) -> Result<(u64, bool), RemoteError> {
        let holder = self.read_u64(interp + self.w[W_GIL_HOLDER])?;
        let main = self.read_u64(interp + self.w[W_THREADS_MAIN])?;
        let mut threads = Vec::new();
        let mut t = self.read_u64(interp + self.w[W_THREADS_HEAD])?;
        for _ in 0..MAX_LINKS {
            if t == 0 {
                break;
            }
            threads.push(t);
            t = self.read_u64(t + self.w[W_TSTATE_NEXT])?;
        }
        let is_holder = threads.contains(&holder);
        if is_holder && tried.last() != Some(&holder) {
            return Ok((holder, true));
        }
        if main != 0 && !tried.contains(&main) {
            return Ok((main, main == holder));
        }
        if let Some(&t) = threads.iter().find(|t| !tried.contains(t)) {
            return Ok((t, t == holder));
        }
        if is_holder {
            return Ok((holder, true));
        }
        if main == 0 {
            return Err(RemoteError::Layout { pid: self.pid, what: "no main thread state".into() });
        }
        Ok((main, false))
    }

    fn read_u64(&self, at: u64) -> Result<u64, RemoteError> {
        let mut b = [0u8; 8];
        self.mem.read_exact_at(&mut b, at).map_err(|source| RemoteError::Io {
            pid: self.pid,
            what: format!("reading {at:#x}"),
            source,
        })?;
        Ok(u64::from_ne_bytes(b))
    }

    fn read_u32(&self, at: u64) -> Result<u32, RemoteError> {
        let mut b = [0u8; 4];
        self.mem.read_exact_at(&mut b, at).map_err(|source| RemoteError::Io {
            pid: self.pid,
            what: format!("reading {at:#x}"),
            source,
        })?;
        Ok(u32::from_ne_bytes(b))
    }

    fn write(&self, at: u64, bytes: &[u8], what: &str) -> Result<(), RemoteError> {
        self.mem.write_all_at(bytes, at).map_err(|source| RemoteError::Io {
            pid: self.pid,
            what: what.into(),
            source,
        })
    }
}

/// One line of /proc/PID/maps with a file.
struct Mapping {
    start: u64,
    end: u64,
    offset: u64,
    path: String,
}

impl Mapping {
    fn parse(line: &str) -> Option<Self> {
        let mut f = line.splitn(6, ' ');
        let range = f.next()?;
        let _perms = f.next()?;
        let offset = u64::from_str_radix(f.next()?, 16).ok()?;
        let _dev = f.next()?;
        let _inode = f.next()?;
        let path = f.next()?.trim_start().to_string();
        let (a, b) = range.split_once('-')?;
        path.starts_with('/').then_some(())?;
        Some(Self {
            start: u64::from_str_radix(a, 16).ok()?,
            end: u64::from_str_radix(b, 16).ok()?,
            offset,
            path,
        })
    }
}

/// The interpreter executable or libpython.
fn is_python_file(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or("");
    name.starts_with("python") || name.starts_with("libpython")
}

/// File offset of the `.PyRuntime` section of an ELF file (bounded read of
/// its headers through the `object` crate).
fn pyruntime_file_offset(path: &Path) -> Option<u64> {
    use object::{Object as _, ObjectSection as _};
    let file = File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    if len > 1 << 30 {
        return None;
    }
    let data = read_whole(&file, len)?;
    let elf = object::File::parse(&*data).ok()?;
    let section = elf.section_by_name(".PyRuntime")?;
    section.file_range().map(|(off, _)| off)
}

fn read_whole(file: &File, len: u64) -> Option<Vec<u8>> {
    let mut data = vec![0u8; len as usize];
    file.read_exact_at(&mut data, 0).ok()?;
    Some(data)
}
