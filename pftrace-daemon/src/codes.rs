//! What each traced function is (module, qualified name, args, locals; see
//! `pftrace-code`), resolved once per code object on a thread of its own,
//! never on the event loop and never per call, and shared with every output.
//!
//! A code object is known here by what the entry probe gives: (pid, file,
//! name, entry line). The event loop asks for a key the first time an entry
//! of it is read ([`CodeResolver::request`]: one look-up by the interned
//! strings' addresses per entry, no string hashing);
//! the resolver thread parses the file (once per file identity) and puts the
//! answer in the [`CodeTable`], which dumps and the final trace read. Bounds:
//! the queue holds [`QUEUE`] requests (a full queue drops the request,
//! counted, and the next entry of that code object asks again) and the table
//! [`MAX_CODES`] code objects (past it, new ones stay unresolved, counted).
//!
//! A field is null with its reason, never a guess: when the process exited
//! before its request was served (its files and `sys.path` can no longer be
//! read), when the request was dropped, or while it is still queued (a dump
//! taken in the first milliseconds). A process is opened when it is attached
//! ([`CodeResolver::hold`]: its root as a handle, its command line,
//! environment and working directory as read then), so requests served
//! after it exited are still answered. Analysing a file took 0.97 ms for
//! json/decoder.py (356 lines) and 41 ms for argparse.py (2,587 lines) here
//! (`codeinfo-dump --time`, machine loaded), so a process must live that
//! long past its first traced call in a file to be resolved.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock, mpsc},
    thread::JoinHandle,
};

use pftrace_code::{CodeInfo, Field, Held, Probe, Resolver};

use crate::{events::Event, pairing::Call, python};

/// Requests waiting for the resolver thread.
pub const QUEUE: usize = 4096;
/// Code objects the table holds at most (each a few hundred bytes, and a
/// copy of its file name).
pub const MAX_CODES: usize = 65_536;
/// Code objects one process may have resolved: a process making code
/// objects with distinct lines or file names would otherwise fill the table
/// for every other one.
pub const PROCESS_CODES: usize = 4096;
/// Bytes of answers one process may have in the table
/// ([`CodeInfo::heap_bytes`] and [`ENTRY_BYTES`] each), and all processes
/// together. A process chooses its file names: an answer about a 4,000-byte
/// one holds about 20 KB (the name again in each unknown field's reason),
/// and eight processes with 4,096 such code objects each took pftraced to
/// 613 MiB peak RSS with the count bounds alone. Typical answers (under
/// 1 KB) meet [`PROCESS_CODES`] and [`MAX_CODES`] first.
pub const PROCESS_CODE_BYTES: u64 = 4 << 20;
pub const TOTAL_CODE_BYTES: u64 = 64 << 20;
/// What the table's entry costs besides the answer: the key, the map's slot
/// and the answer's reference count.
pub const ENTRY_BYTES: u64 = 96;

/// A code object as the entry probe names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CodeKey {
    pub pid: u32,
    pub file: Arc<str>,
    pub name: Arc<str>,
    /// The entry probe's line (`co_firstlineno` on 3.6-3.10).
    pub line: i32,
}

impl CodeKey {
    pub fn of_call(call: &Call) -> Self {
        Self { pid: call.pid, file: call.file.clone(), name: call.name.clone(), line: call.line }
    }
}

/// The answers so far, shared by the resolver thread (writer) and outputs.
#[derive(Clone, Default)]
pub struct CodeTable(Arc<RwLock<Answers>>);

/// The table and what it is charged.
#[derive(Default)]
struct Answers {
    map: HashMap<CodeKey, Arc<CodeInfo>>,
    /// Bytes charged in all, and per process (its charge is forgotten when
    /// it ends; its answers stay, and count in the total).
    bytes: u64,
    by_pid: HashMap<u32, u64>,
    /// Answers not kept: their process's or the table's bytes were used up.
    over_bytes: u64,
}

impl std::fmt::Debug for CodeTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CodeTable({} code objects)", self.len())
    }
}

/// Why a call's function has no answer in the table.
pub const NOT_RESOLVED: &str = "not resolved: the resolver had not answered when this was written, or its \
                                request was dropped (queue or table full; see the counters)";

impl CodeTable {
    pub fn get(&self, key: &CodeKey) -> Option<Arc<CodeInfo>> {
        self.0.read().ok()?.map.get(key).cloned()
    }

    /// The answer for `call`'s code object, or every field null with the
    /// reason ([`NOT_RESOLVED`]).
    pub fn info(&self, call: &Call) -> Arc<CodeInfo> {
        self.get(&CodeKey::of_call(call)).unwrap_or_else(|| Arc::new(unresolved(call, NOT_RESOLVED)))
    }

    pub fn len(&self) -> usize {
        self.0.read().map(|t| t.map.len()).unwrap_or(0)
    }

    /// Bytes charged for the answers kept, and answers not kept for bytes.
    pub fn bytes(&self) -> (u64, u64) {
        self.0.read().map(|t| (t.bytes, t.over_bytes)).unwrap_or((0, 0))
    }

    /// Forgets what process `pid` was charged (it ended; a new process
    /// of that pid starts from nothing).
    pub fn forget(&self, pid: u32) {
        if let Ok(mut t) = self.0.write() {
            t.by_pid.remove(&pid);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Puts an answer in (tests and the resolver thread), if its process's
    /// and the table's bounds in bytes allow; an answer not kept is
    /// counted, and its function stays unresolved ([`NOT_RESOLVED`]).
    pub fn insert(&self, key: CodeKey, info: Arc<CodeInfo>) {
        let Ok(mut t) = self.0.write() else { return };
        let t = &mut *t;
        let charge = |i: &CodeInfo| i.heap_bytes() + ENTRY_BYTES;
        let (cost, old) = (charge(&info), t.map.get(&key).map_or(0, |i| charge(i)));
        let process = t.by_pid.get(&key.pid).map_or(0, |b| b.saturating_sub(old));
        let total = t.bytes - old;
        if process + cost > PROCESS_CODE_BYTES || total + cost > TOTAL_CODE_BYTES {
            if t.over_bytes == 0 {
                log::warn!(
                    "pid {}: the answers about its functions reached pftraced's bound of {} MiB a process or \
                     {} MiB in all (codes.rs); further functions stay unresolved (counted as \
                     bounds.codes_over_bytes)",
                    key.pid,
                    PROCESS_CODE_BYTES >> 20,
                    TOTAL_CODE_BYTES >> 20
                );
            }
            t.over_bytes += 1;
            return;
        }
        t.bytes = total + cost;
        t.by_pid.insert(key.pid, process + cost);
        t.map.insert(key, info);
    }
}

/// An answer and the file and name strings it was found for.
type Found = (Arc<CodeInfo>, Arc<str>, Arc<str>);

/// Per-call look-ups for one writer (a dump, the final trace, the rolling
/// files): each code object found in the table once, then by its interned
/// strings' addresses, without hashing strings or taking the table's lock.
/// Answers not there yet are looked up again at the next call.
pub struct CodeReader {
    table: CodeTable,
    /// Each answer, with the strings whose addresses key it.
    found: crate::fast_hash::FastMap<AddressKey, Found>,
}

impl CodeReader {
    pub fn new(table: &CodeTable) -> Self {
        Self { table: table.clone(), found: Default::default() }
    }

    /// What `call`'s function is (see [`CodeTable::info`]).
    pub fn info(&mut self, call: &Call) -> Arc<CodeInfo> {
        let address = |s: &Arc<str>| Arc::as_ptr(s) as *const u8 as usize;
        let key = (address(&call.file), address(&call.name), call.line, call.pid);
        if let Some((info, ..)) = self.found.get(&key) {
            return info.clone();
        }
        match self.table.get(&CodeKey::of_call(call)) {
            Some(info) => {
                if self.found.len() >= MAX_CODES {
                    self.found.clear();
                }
                self.found.insert(key, (info.clone(), call.file.clone(), call.name.clone()));
                info
            }
            None => Arc::new(unresolved(call, NOT_RESOLVED)),
        }
    }
}

/// A [`CodeInfo`] with every derived field null for `why`.
pub fn unresolved(call: &Call, why: &str) -> CodeInfo {
    CodeInfo {
        function: call.name.to_string(),
        filename: call.file.to_string(),
        lineno: Field::unknown(why),
        module: Field::unknown(why),
        qualname: Field::unknown(why),
        params: Field::unknown(why),
        locals: Field::unknown(why),
        stacksize: Field::unknown(why),
        origin: pftrace_code::Origin::Source,
    }
}

/// How outputs name a call: its qualified name when known, else `co_name`.
pub fn display_name(info: &CodeInfo) -> &str {
    info.qualname.known().map_or(info.function.as_str(), String::as_str)
}

/// How outputs categorise a call (PerfFlowAspect's `cat`): its dotted
/// module when known, else its file as the probe gave it (never a guessed
/// module: the file's stem is not one).
pub fn category(info: &CodeInfo) -> &str {
    info.module.known().map_or(info.filename.as_str(), String::as_str)
}

enum Job {
    Resolve(CodeKey, Option<pftrace_code::PyVersion>),
    /// A process ended: forget its cache, and let go of the process opened
    /// when it was attached (if it is still that one).
    Forget(u32, Option<Arc<pftrace_code::process::Process>>),
}

/// The addresses of a code object's interned file and name, its line and pid.
type AddressKey = (usize, usize, i32, u32);

/// The event loop's handle on the resolver thread.
pub struct CodeResolver {
    table: CodeTable,
    /// Code objects asked for, keyed by the addresses of their interned
    /// file and name (the decoder interns them, as stats.rs relies on), so
    /// an entry costs no string hashing; the strings are held so the
    /// addresses stay theirs.
    requested: crate::fast_hash::FastMap<AddressKey, (Arc<str>, Arc<str>)>,
    /// The last key found or put in `requested` (most entries are of the
    /// code object the last one was): its addresses are held there.
    last_requested: Option<AddressKey>,
    tx: Option<mpsc::SyncSender<Job>>,
    thread: Option<JoinHandle<()>>,
    /// Processes opened at attach, shared with the thread.
    held: Held,
    /// Resolves on the event loop what a selection by qualified name needs
    /// at once ([`Self::resolve_now`]); answers go into the same table.
    now: Option<Resolver>,
    /// Requests dropped because the queue was full (asked again later).
    pub queue_full: u64,
    /// Code objects left unresolved because the table was full.
    pub table_full: u64,
    /// Code objects asked for per process ([`PROCESS_CODES`] at most).
    per_process: crate::fast_hash::FastMap<u32, usize>,
    /// Entries of code objects left unresolved because their process had
    /// asked for [`PROCESS_CODES`] already.
    pub process_full: u64,
}

impl Default for CodeResolver {
    fn default() -> Self {
        Self::start()
    }
}

impl CodeResolver {
    /// Starts the resolver thread.
    pub fn start() -> Self {
        let table = CodeTable::default();
        let held = Held::default();
        let (tx, rx) = mpsc::sync_channel::<Job>(QUEUE);
        let (shared, held_there) = (table.clone(), held.clone());
        let thread = std::thread::Builder::new()
            .name("pftrace-codes".into())
            .spawn(move || serve(rx, shared, held_there))
            .map_err(|e| log::warn!("cannot start the code resolver thread: {e}; functions stay unresolved"))
            .ok();
        Self {
            table,
            requested: Default::default(),
            last_requested: None,
            tx: thread.is_some().then_some(tx),
            thread,
            held,
            now: None,
            queue_full: 0,
            table_full: 0,
            per_process: Default::default(),
            process_full: 0,
        }
    }

    pub fn table(&self) -> CodeTable {
        self.table.clone()
    }

    /// For `status`.
    pub fn counts(&self) -> crate::protocol::CodeCounts {
        crate::protocol::CodeCounts {
            resolved: self.table.len() as u64,
            queue_full: self.queue_full,
            table_full: self.table_full,
            process_full: self.process_full,
        }
    }

    /// Asks for the code object of an entry event, the first time it is seen.
    /// `version`: the process's CPython, asked only for a new code object.
    pub fn request(&mut self, ev: &Event, version: impl FnOnce() -> Option<python::PyVersion>) {
        let address = |s: &Arc<str>| Arc::as_ptr(s) as *const u8 as usize;
        let fast = (address(&ev.file), address(&ev.name), ev.line, ev.pid);
        if self.last_requested == Some(fast) {
            return;
        }
        if self.requested.contains_key(&fast) {
            self.last_requested = Some(fast);
            return;
        }
        // A name the decoder did not keep is no file to read.
        if *ev.file == *crate::string_bound::OTHER {
            return;
        }
        if self.per_process.get(&ev.pid).is_some_and(|&n| n >= PROCESS_CODES) {
            self.process_full += 1;
            return;
        }
        let key = CodeKey { pid: ev.pid, file: ev.file.clone(), name: ev.name.clone(), line: ev.line };
        if self.requested.len() < MAX_CODES && self.table.get(&key).is_some() {
            // Resolved already for the selection by qualified name.
            self.requested.insert(fast, (ev.file.clone(), ev.name.clone()));
            *self.per_process.entry(ev.pid).or_default() += 1;
            return;
        }
        if self.requested.len() >= MAX_CODES {
            self.table_full += 1;
            return;
        }
        let Some(tx) = &self.tx else { return };
        let version = pftrace_version(version());
        match tx.try_send(Job::Resolve(key.clone(), version)) {
            Ok(()) => {
                self.requested.insert(fast, (ev.file.clone(), ev.name.clone()));
                *self.per_process.entry(ev.pid).or_default() += 1;
            }
            Err(_) => self.queue_full += 1,
        }
    }

    /// A traced process was attached: opens it now (a few /proc reads), so
    /// what it ran is resolved even if it exits before its requests are served.
    pub fn hold(&mut self, pid: u32) {
        if let Err(e) = self.held.hold(pid) {
            log::debug!("cannot hold {e}: its functions are resolved only while it runs");
        }
    }

    /// The answer for an entry or return event's code object, resolved here
    /// and now when not in the table yet (once per code object and line; the
    /// selection by qualified name cannot wait for the thread). It goes into
    /// the table, so outputs and the thread reuse it.
    pub fn resolve_now(
        &mut self,
        ev: &Event,
        version: impl FnOnce() -> Option<python::PyVersion>,
    ) -> Arc<CodeInfo> {
        let key = CodeKey { pid: ev.pid, file: ev.file.clone(), name: ev.name.clone(), line: ev.line };
        if let Some(info) = self.table.get(&key) {
            return info;
        }
        let held = self.held.clone();
        let resolver = self.now.get_or_insert_with(|| Resolver::with_held(held));
        let probe = Probe {
            pid: key.pid,
            filename: key.file.to_string(),
            function: key.name.to_string(),
            line: i64::from(key.line),
        };
        let info = resolver.resolve(&probe, pftrace_version(version()));
        if self.table.len() < MAX_CODES {
            self.table.insert(key, info.clone());
        }
        info
    }

    /// A traced process ended: the resolver forgets its cached process state
    /// once the requests before this are served (answers stay in the table).
    pub fn forget(&mut self, pid: u32) {
        self.per_process.remove(&pid);
        if let Some(r) = &mut self.now {
            r.forget(pid);
        }
        let which = self.held.get(pid);
        // The table forgets the process's charge on the thread, after its
        // requests still queued: forgotten here, a process that exits right
        // after its calls would have them all charged afresh.
        let sent = self.tx.as_ref().is_some_and(|tx| tx.try_send(Job::Forget(pid, which.clone())).is_ok());
        if !sent {
            self.table.forget(pid);
            if let Some(w) = &which {
                self.held.release(pid, w);
            }
        }
    }

    /// Waits until every request made is answered (the end of a run, before
    /// its trace is written); the table stays readable.
    pub fn finish(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The process's CPython as pftrace-code names versions.
fn pftrace_version(v: Option<python::PyVersion>) -> Option<pftrace_code::PyVersion> {
    let v = v?;
    Some(pftrace_code::PyVersion::new(u8::try_from(v.major).ok()?, u8::try_from(v.minor).ok()?))
}

fn serve(rx: mpsc::Receiver<Job>, table: CodeTable, held: Held) {
    let mut resolver = Resolver::with_held(held.clone());
    while let Ok(job) = rx.recv() {
        match job {
            Job::Forget(pid, which) => {
                resolver.forget(pid);
                table.forget(pid);
                if let Some(w) = &which {
                    held.release(pid, w);
                }
            }
            Job::Resolve(key, version) => {
                let probe = Probe {
                    pid: key.pid,
                    filename: key.file.to_string(),
                    function: key.name.to_string(),
                    line: i64::from(key.line),
                };
                let info = resolver.resolve(&probe, version);
                table.insert(key, info);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_gone_gives_nulls_with_the_reason() {
        let mut r = CodeResolver::start();
        let mut call = Call::for_test(4_200_001, "f", 0, 1);
        call.file = Arc::from("/srv/app.py");
        let ev = Event {
            ts_ns: 0,
            pid: call.pid,
            tid: call.tid,
            kind: crate::events::EventKind::Entry,
            name: call.name.clone(),
            file: call.file.clone(),
            line: call.line,
            thread_cpu_ns: 0,
            rss_bytes: 0,
            frame: None,
            generator: false,
            file_cut: false,
            file_ptr: None,
            name_ptr: None,
            name_not_read: false,
        };
        let table = r.table();
        assert!(table.info(&call).module.reason() == Some(NOT_RESOLVED));
        r.request(&ev, || None);
        r.request(&ev, || None);
        r.finish();
        assert_eq!(table.len(), 1);
        let info = table.info(&call);
        assert_eq!(info.function, "f");
        let why = info.module.reason().unwrap();
        assert!(why.contains("process 4200001"), "{why}");
        assert!(info.qualname.known().is_none() && info.params.known().is_none());
        assert_eq!((display_name(&info), category(&info)), ("f", "/srv/app.py"));
    }
}
