//! The USDT path's entry point: (pid, file, name, line) from a probe to a
//! [`CodeInfo`], resolved once per code object. Three caches, each bounded:
//! processes (by pid and start time), parsed files (by file identity: dev,
//! inode, mtime, size — shared by every process that runs the file), and
//! answers (by process, file, name and line).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, UNIX_EPOCH},
};

use crate::{
    info::{CodeInfo, Field, Origin},
    module::Roots,
    process::{FileId, Process, SOURCE_MAX},
    source::FileCodes,
    version::PyVersion,
};

/// What a probe gives.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Probe {
    pub pid: u32,
    /// `co_filename`.
    pub filename: String,
    /// `co_name`.
    pub function: String,
    /// The probe's line: `co_firstlineno` at entry on 3.6-3.10 (and the
    /// agent's reports), a line of the body at returns and generator
    /// resumptions, -1 or 0 at 3.15's entry for some code objects.
    pub line: i64,
}

/// Cache bounds: past them a cache is emptied (entries are cheap to redo).
pub const MAX_PROCESSES: usize = 1024;
pub const MAX_FILES: usize = 4096;
pub const MAX_ANSWERS: usize = 65_536;
/// Bytes of answers cached ([`CodeInfo::heap_bytes`] and the key's strings
/// each): a traced process chooses its file names, and an answer about a
/// 4,000-byte one held about 24 KB (a flood of 4,096 such code objects a
/// process: 100 MB here besides pftraced's own table of answers, which asks
/// for each code object once, so this cache saves it little).
pub const MAX_ANSWER_BYTES: u64 = 4 << 20;

struct ProcessEntry {
    process: Arc<Process>,
    roots: Result<Roots, String>,
}

/// Processes opened while they ran (when tracing began), for requests
/// served after they exited: a [`Process`] holds its root as a handle and
/// its command line, environment and working directory as read then, which
/// is all a resolution needs. Shared by every [`Resolver`] made with it.
#[derive(Clone, Default)]
pub struct Held(Arc<Mutex<HashMap<u32, Arc<Process>>>>);

impl Held {
    /// Opens process `pid` now and keeps it (replacing an older one of that pid).
    pub fn hold(&self, pid: u32) -> Result<(), String> {
        let p = Process::open(pid).map_err(|e| format!("process {pid}: {e}"))?;
        if let Ok(mut m) = self.0.lock() {
            if m.len() >= MAX_PROCESSES && !m.contains_key(&pid) {
                return Err(format!("{MAX_PROCESSES} processes held already"));
            }
            m.insert(pid, Arc::new(p));
        }
        Ok(())
    }

    /// The held process of `pid`, if any.
    pub fn get(&self, pid: u32) -> Option<Arc<Process>> {
        self.0.lock().ok()?.get(&pid).cloned()
    }

    /// Lets go of `pid`'s process if it is still `which` (not a later one of that pid).
    pub fn release(&self, pid: u32, which: &Arc<Process>) {
        if let Ok(mut m) = self.0.lock()
            && m.get(&pid).is_some_and(|p| Arc::ptr_eq(p, which))
        {
            m.remove(&pid);
        }
    }

    pub fn len(&self) -> usize {
        self.0.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Resolves probes to code objects, once each.
#[derive(Default)]
pub struct Resolver {
    processes: HashMap<(u32, u64), Arc<ProcessEntry>>,
    files: HashMap<(FileId, PyVersion, u8), Arc<Result<FileCodes, String>>>,
    answers: HashMap<(u32, u64, String, String, i64), Arc<CodeInfo>>,
    /// Bytes charged for `answers` (see [`MAX_ANSWER_BYTES`]).
    answer_bytes: u64,
    /// Processes opened earlier, used when one can no longer be read.
    held: Held,
    /// How many files were parsed (for tests and status).
    pub parses: u64,
}

/// What a cached answer is charged: its key's strings and the answer.
fn answer_bytes(key: &(u32, u64, String, String, i64), info: &CodeInfo) -> u64 {
    (key.2.len() + key.3.len()) as u64 + info.heap_bytes()
}

fn unknown_all(p: &Probe, module: Field<String>, why: &str) -> CodeInfo {
    CodeInfo {
        function: p.function.clone(),
        filename: p.filename.clone(),
        lineno: Field::unknown(why),
        module,
        qualname: Field::unknown(why),
        params: Field::unknown(why),
        locals: Field::unknown(why),
        stacksize: Field::unknown(STACKSIZE_WHY),
        origin: Origin::Source,
    }
}

/// Why the source path has no `stacksize`.
pub const STACKSIZE_WHY: &str = "co_stacksize is computed by CPython's compiler from the bytecode it \
     generates, which the source file does not give (the agent path reads it from the code object)";

impl Resolver {
    pub fn new() -> Self {
        Self::default()
    }

    /// A resolver that falls back on `held` processes once they exited.
    pub fn with_held(held: Held) -> Self {
        Self { held, ..Self::default() }
    }

    /// The process `pid` as it is now (a new entry if the pid was reused),
    /// or as held when it was opened earlier and has exited since.
    fn process(&mut self, pid: u32, version: Option<PyVersion>) -> Result<Arc<ProcessEntry>, String> {
        let process = match Process::open(pid) {
            // A process past exit_mm() (its memory map going away; unmapping
            // a CPython takes milliseconds, more on a loaded machine) still
            // opens, but without executable or command line: its import roots
            // would be wrong. Its held copy, taken while it ran, is used then
            // (a process that ended within 50 ms lost its qualified names
            // this way in 6 of 25 runs on a loaded machine).
            Ok(p) if p.exe.is_none() => match self.held.get(pid) {
                Some(h) if h.start_ticks == p.start_ticks => h,
                _ => Arc::new(p),
            },
            Ok(p) => Arc::new(p),
            Err(e) => self.held.get(pid).ok_or_else(|| format!("process {pid}: {e}"))?,
        };
        let key = (pid, process.start_ticks);
        if let Some(e) = self.processes.get(&key) {
            return Ok(e.clone());
        }
        if self.processes.len() >= MAX_PROCESSES {
            self.processes.clear();
        }
        let roots = Roots::of(&process, version);
        let e = Arc::new(ProcessEntry { process, roots });
        self.processes.insert(key, e.clone());
        Ok(e)
    }

    /// Forgets what is cached for a process that exited.
    pub fn forget(&mut self, pid: u32) {
        self.processes.retain(|k, _| k.0 != pid);
        self.answers.retain(|k, _| k.0 != pid);
        self.answer_bytes = self.answers.iter().map(|(k, a)| answer_bytes(k, a)).sum();
    }

    /// The code object a probe ran. `version`: the process's CPython, when
    /// the caller knows it (else read from its executable's name or
    /// `pyvenv.cfg`).
    pub fn resolve(&mut self, probe: &Probe, version: Option<PyVersion>) -> Arc<CodeInfo> {
        let entry = match self.process(probe.pid, version) {
            Ok(e) => e,
            Err(why) => return Arc::new(unknown_all(probe, Field::unknown(why.clone()), &why)),
        };
        let key = (
            probe.pid,
            entry.process.start_ticks,
            probe.filename.clone(),
            probe.function.clone(),
            probe.line,
        );
        if let Some(a) = self.answers.get(&key) {
            return a.clone();
        }
        let info = Arc::new(self.resolve_uncached(&entry, probe));
        let cost = answer_bytes(&key, &info);
        if self.answers.len() >= MAX_ANSWERS || self.answer_bytes + cost > MAX_ANSWER_BYTES {
            self.answers.clear();
            self.answer_bytes = 0;
        }
        self.answer_bytes += cost;
        self.answers.insert(key, info.clone());
        info
    }

    fn resolve_uncached(&mut self, entry: &ProcessEntry, probe: &Probe) -> CodeInfo {
        let roots = match &entry.roots {
            Ok(r) => r,
            Err(why) => {
                let why = format!("the process's import roots: {why}");
                return unknown_all(probe, Field::unknown(why.clone()), &why);
            }
        };
        let p = &entry.process;
        let module = roots.module_of(p, &probe.filename);
        if probe.filename.starts_with('<') {
            return unknown_all(probe, module, &format!("{:?} names no source file", probe.filename));
        }
        let (bytes, id) = match p.read_file(&probe.filename, SOURCE_MAX) {
            Ok(x) => x,
            Err(e) => return unknown_all(probe, module, &format!("the source file cannot be read: {e}")),
        };
        // A file changed after the process started may not be what it
        // compiled (mtime at or after the start, rounded down, is refused).
        let started_ns = p.started.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_nanos() as i128;
        if id.mtime_ns >= started_ns {
            return unknown_all(probe, module, "the source file was modified after the process started");
        }
        let version = roots.version;
        let optimize = roots.launch.optimize.max(if roots.launch.ignore_env {
            0
        } else {
            p.env
                .get("PYTHONOPTIMIZE")
                .and_then(|v| v.parse::<u8>().ok().map(|n| n.min(2)).or(Some(1)))
                .unwrap_or(0)
        });
        let fkey = (id, version, optimize);
        let codes = match self.files.get(&fkey) {
            Some(c) => c.clone(),
            None => {
                if self.files.len() >= MAX_FILES {
                    self.files.clear();
                }
                self.parses += 1;
                let parsed = match std::str::from_utf8(&bytes) {
                    Ok(src) => FileCodes::analyze(src, version, optimize),
                    Err(_) => {
                        Err("the source file is not UTF-8 (PEP 263 encodings are not read)".to_string())
                    }
                };
                let c = Arc::new(parsed);
                self.files.insert(fkey, c.clone());
                c
            }
        };
        let codes = match codes.as_ref() {
            Ok(c) => c,
            Err(why) => return unknown_all(probe, module, why),
        };
        match codes.find(&probe.function, probe.line) {
            Err(why) => unknown_all(probe, module, &why),
            Ok(c) => CodeInfo {
                function: probe.function.clone(),
                filename: probe.filename.clone(),
                lineno: c.lineno.clone().map_or_else(Field::Unknown, Field::Known),
                module,
                qualname: c.qualname.clone().map_or_else(Field::Unknown, Field::Known),
                params: Field::Known(c.params.clone()),
                locals: c.locals.clone().map_or_else(Field::Unknown, Field::Known),
                stacksize: Field::unknown(STACKSIZE_WHY),
                origin: Origin::Source,
            },
        }
    }
}
