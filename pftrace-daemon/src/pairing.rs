//! Pairs entry and return events per thread with a stack, so recursion,
//! exceptions and generator resumes give balanced, correctly nested calls.
//! A return closes the innermost open entry of the same frame where the
//! kernel read frames (CPython 3.15), else of the same function and file:
//! for USDT records the name and file arguments' addresses (the kernel does
//! not read a return's file name, nor its name when it knew the entry
//! matched; on CPython 3.6-3.10 both probes pass the running code object's
//! `co_name` and `co_filename` UTF-8, held while the frame runs, so a run's
//! entry and return carry the same two), for the agent's the interned
//! function and file names. A call is named from its entry.
//! A return with no open entry (the tracer attached mid-call) is counted,
//! never paired with the wrong entry; a sample of them is kept (bounded:
//! real code made 56,185 of them in one run on CPython 3.15 before its
//! `__init__` shim frames were recognised).

use std::sync::Arc;

use serde::Serialize;

use crate::{
    events::{Event, EventKind, KnownReturn},
    fast_hash::FastMap,
};

/// How a call record ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CallEnd {
    /// Its return was seen.
    Returned,
    /// Still open when tracing stopped or the thread's process exited;
    /// `end_ns` is that moment.
    Incomplete,
}

/// One traced call.
#[derive(Debug, Clone)]
pub struct Call {
    pub pid: u32,
    pub tid: u32,
    pub name: Arc<str>,
    pub file: Arc<str>,
    /// Line number reported by the entry probe.
    pub line: i32,
    pub start_ns: u64,
    pub end_ns: u64,
    /// Number of traced calls open below this one on the same thread.
    pub depth: u32,
    /// This call's id, unique in the trace (numbered from 1 in entry order).
    pub id: u64,
    /// The id of the traced call it was made in on its thread (the one
    /// below it on the stack), 0 for a call at depth 0.
    pub parent: u64,
    pub end: CallEnd,
    /// CPU time the thread consumed during the call, ns (None if unknown).
    pub cpu_ns: Option<u64>,
    /// Process resident memory at entry and at return (or at the close of
    /// an incomplete call: unknown, so equal to entry), bytes; 0 if unknown.
    pub rss_entry_bytes: u64,
    pub rss_return_bytes: u64,
}

impl Call {
    /// A returned call of `name` in `f.py` by process (and thread) `pid`, for unit tests.
    #[cfg(test)]
    pub(crate) fn for_test(pid: u32, name: &str, start_ns: u64, duration_ns: u64) -> Self {
        Self {
            pid,
            tid: pid,
            name: Arc::from(name),
            file: Arc::from("f.py"),
            line: 1,
            start_ns,
            end_ns: start_ns + duration_ns,
            depth: 0,
            id: 0,
            parent: 0,
            end: CallEnd::Returned,
            cpu_ns: None,
            rss_entry_bytes: 0,
            rss_return_bytes: 0,
        }
    }

    pub fn duration_ns(&self) -> u64 {
        self.end_ns.saturating_sub(self.start_ns)
    }

    /// Wall time minus CPU time: waiting (sleep, I/O, locks, run queue).
    pub fn offcpu_ns(&self) -> Option<u64> {
        self.cpu_ns.map(|cpu| self.duration_ns().saturating_sub(cpu))
    }
}

#[derive(Debug)]
struct Open {
    id: u64,
    parent: u64,
    name: Arc<str>,
    file: Arc<str>,
    frame: Option<u64>,
    file_ptr: Option<u64>,
    name_ptr: Option<u64>,
    line: i32,
    start_ns: u64,
    cpu_ns: u64,
    rss_bytes: u64,
}

/// What is known at the end of a call.
#[derive(Debug, Clone, Copy)]
struct Close {
    ts_ns: u64,
    /// Thread CPU time and RSS at the return; None for incomplete calls.
    figures: Option<(u64, u64)>,
}

/// A return seen with no matching open entry on its thread.
#[derive(Debug, Clone)]
pub struct UnmatchedReturn {
    pub pid: u32,
    pub tid: u32,
    pub name: Arc<str>,
    pub file: Arc<str>,
    pub ts_ns: u64,
    /// A generator's or coroutine's frame: on CPython 3.15 a run resumed by
    /// `throw()` (or by `close()` with a handler) fires no entry.
    pub generator: bool,
}

/// Returns without entries kept as examples; all are counted.
pub const UNMATCHED_SAMPLE: usize = 100;

/// Threads' stacks kept when empty, at least, before the empty ones are
/// dropped (see [`Pairer::push`]).
const IDLE_STACKS: usize = 1024;

/// An emptied stack is dropped rather than kept when it had grown past this
/// (deep recursion): the memory goes back.
const KEPT_CAPACITY: usize = 256;

/// Per-thread stacks of open calls.
#[derive(Debug, Default)]
pub struct Pairer {
    /// Empty stacks stay (a thread calling at depth 0 would otherwise insert
    /// and remove its stack, allocating it, on every call) until there are
    /// more stacks than `prune_at`.
    stacks: FastMap<Thread, Vec<Open>>,
    /// When there are more stacks than this, the empty ones go.
    prune_at: usize,
    /// The first [`UNMATCHED_SAMPLE`] returns without entries.
    unmatched: Vec<UnmatchedReturn>,
    /// Every return without an entry.
    pub unmatched_total: u64,
    /// Those of them from generator or coroutine frames.
    pub unmatched_generator: u64,
    /// Returns that matched an entry below the top of the stack: the entries
    /// above it never returned (a record was lost), and were closed as incomplete.
    pub skipped_entries: u64,
    /// The last call id given.
    last_id: u64,
    /// Calls open on all stacks.
    open: usize,
    /// Per thread, entries not kept because [`MAX_OPEN_CALLS`] were open:
    /// the next returns of the thread are theirs (calls nest), swallowed.
    overflow: FastMap<Thread, u64>,
    /// Calls not traced because [`MAX_OPEN_CALLS`] were open at their
    /// entry, or [`PROCESS_OPEN_CALLS`] in their process.
    pub dropped_open: u64,
    /// Per process: calls open, and whether it was named in a warning for
    /// [`PROCESS_OPEN_CALLS`] (forgotten at its exit).
    by_pid: FastMap<u32, (usize, bool)>,
    /// Stacks deeper than [`INDEXED_DEPTH`]: how many of their open calls
    /// each return key ([`return_key`]) has, so a return matching none of
    /// them is told in one look-up instead of a walk of the whole stack.
    index: FastMap<Thread, FastMap<ReturnKey, u32>>,
}

/// A thread, as the maps of [`Pairer`] key it: its pid and tid in one
/// word, made from values in registers. Keyed by the `(pid, tid)` tuple, the
/// return's two halves were stored apart on the stack and loaded back as
/// one word for the hash, a load the store buffer cannot forward (17% of
/// `pair_return`'s samples, on the instruction after it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Thread(u64);

impl Thread {
    fn new(pid: u32, tid: u32) -> Self {
        Self(u64::from(pid) << 32 | u64::from(tid))
    }

    fn pid(self) -> u32 {
        (self.0 >> 32) as u32
    }

    fn tid(self) -> u32 {
        self.0 as u32
    }
}

/// What a return is paired by: its frame where the kernel read one (or the
/// agent's code id); else the name and file arguments' addresses in the
/// process (USDT records: a return's file name is not read, nor its name
/// when the kernel knew its entry matched); else the addresses of its
/// interned name and file names (the agent's records; and the unit tests'
/// USDT records without a name address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ReturnKey {
    Frame(u64),
    Args(u64, u64),
    FileArg(usize, u64),
    File(usize, usize),
}

/// What pairing takes of a return besides its key and strings.
#[derive(Clone, Copy)]
struct ReturnAt {
    pid: u32,
    tid: u32,
    ts_ns: u64,
    thread_cpu_ns: u64,
    rss_bytes: u64,
    generator: bool,
}

/// The addresses an event carries, for [`return_key`].
#[derive(Clone, Copy)]
struct Addresses {
    frame: Option<u64>,
    name_ptr: Option<u64>,
    file_ptr: Option<u64>,
}

/// The key the addresses alone give (a frame, else both arguments'
/// addresses), or None when it needs the interned strings too.
fn address_key(at: Addresses) -> Option<ReturnKey> {
    match (at.frame, at.name_ptr, at.file_ptr) {
        (Some(f), _, _) => Some(ReturnKey::Frame(f)),
        (None, Some(n), Some(p)) => Some(ReturnKey::Args(n, p)),
        _ => None,
    }
}

fn return_key(at: Addresses, name: &Arc<str>, file: &Arc<str>) -> ReturnKey {
    let ptr = |s: &Arc<str>| Arc::as_ptr(s) as *const u8 as usize;
    address_key(at).unwrap_or_else(|| match at.file_ptr {
        // No frame and no name address (else address_key had answered).
        Some(p) => ReturnKey::FileArg(ptr(name), p),
        None => ReturnKey::File(ptr(name), ptr(file)),
    })
}

fn event_key(ev: &Event) -> ReturnKey {
    return_key(
        Addresses { frame: ev.frame, name_ptr: ev.name_ptr, file_ptr: ev.file_ptr },
        &ev.name,
        &ev.file,
    )
}

fn open_key(o: &Open) -> ReturnKey {
    return_key(Addresses { frame: o.frame, name_ptr: o.name_ptr, file_ptr: o.file_ptr }, &o.name, &o.file)
}

/// Stacks deeper than this are indexed by return key ([`Pairer::push`]).
/// A return that matches no open call walks its whole stack to find that
/// out: a process entering without returning (262,144 entries kept) then
/// sending 5,000 returns of another code object held pftraced's event loop
/// 6.8 s (1.4 ms a return), the ring overflowed and `status` took 6.9 s.
/// CPython's default recursion limit (1,000) keeps real stacks under it.
const INDEXED_DEPTH: usize = 1024;

fn index_of(stack: &[Open]) -> FastMap<ReturnKey, u32> {
    let mut index = FastMap::default();
    for o in stack {
        *index.entry(open_key(o)).or_default() += 1;
    }
    index
}

/// Calls open at once on all threads, at most: each is about 100 bytes
/// (its stack may have twice the room), so 262,144 hold 25-50 MiB, while a
/// thread entering without returning (a record stream an agent makes up, or
/// recursion with a raised limit on 3.12+, where Python calls use no C
/// stack) would otherwise grow them by one per entry. Past it an entry is
/// not kept, and counted as `open_calls_dropped` with its return.
pub const MAX_OPEN_CALLS: usize = 262_144;

/// Calls one process may have open at once: a quarter of
/// [`MAX_OPEN_CALLS`], so a process that enters without returning cannot
/// take the others' room (with the bound over all processes only, a
/// process sending a million entries left no room for the calls of a
/// well-behaved one beside it: 253,400 of its 300,000 calls not traced).
pub const PROCESS_OPEN_CALLS: usize = MAX_OPEN_CALLS / 4;

impl Pairer {
    /// Feeds one event; completed calls are pushed to `out`. Returns the
    /// strings of a return event that nothing keeps, to be handed back to
    /// the decoder ([`crate::events::Decoder::recycle`]).
    pub fn push(&mut self, ev: Event, out: &mut Vec<Call>) -> Option<(Arc<str>, Arc<str>)> {
        let thread = Thread::new(ev.pid, ev.tid);
        match ev.kind {
            EventKind::Entry => {
                // One look-up of the process's count, for the check and the count.
                let process = self.by_pid.entry(ev.pid).or_default();
                if self.open >= MAX_OPEN_CALLS || process.0 >= PROCESS_OPEN_CALLS {
                    if process.0 >= PROCESS_OPEN_CALLS && !process.1 {
                        process.1 = true;
                        log::warn!(
                            "pid {}: its calls open at once reached pftraced's bound of {PROCESS_OPEN_CALLS} a \
                             process (pairing.rs PROCESS_OPEN_CALLS); its calls entered past it are not traced \
                             (counted as open_calls_dropped)",
                            ev.pid
                        );
                    } else if process.0 < PROCESS_OPEN_CALLS && self.dropped_open == 0 {
                        log::warn!(
                            "pid {}: {MAX_OPEN_CALLS} calls were open at once (pairing.rs MAX_OPEN_CALLS); calls \
                             entered past it are not traced (counted as open_calls_dropped)",
                            ev.pid
                        );
                    }
                    self.dropped_open += 1;
                    *self.overflow.entry(thread).or_default() += 1;
                    return Some((ev.name, ev.file));
                }
                process.0 += 1;
                self.open += 1;
                let stack = self.stacks.entry(thread).or_default();
                // Indexed from INDEXED_DEPTH on, and while the index lasts
                // (until the stack is back under half of it).
                let indexed = stack.len() >= INDEXED_DEPTH
                    || !self.index.is_empty() && self.index.contains_key(&thread);
                let key = indexed.then(|| event_key(&ev));
                self.last_id += 1;
                let (id, parent) = (self.last_id, stack.last().map_or(0, |o| o.id));
                push_in_place(stack, || Open {
                    id,
                    parent,
                    name: ev.name,
                    file: ev.file,
                    frame: ev.frame,
                    file_ptr: ev.file_ptr,
                    name_ptr: ev.name_ptr,
                    line: ev.line,
                    start_ns: ev.ts_ns,
                    cpu_ns: ev.thread_cpu_ns,
                    rss_bytes: ev.rss_bytes,
                });
                if let Some(key) = key {
                    match self.index.entry(thread) {
                        std::collections::hash_map::Entry::Occupied(mut i) => {
                            *i.get_mut().entry(key).or_default() += 1
                        }
                        std::collections::hash_map::Entry::Vacant(v) => {
                            v.insert(index_of(stack));
                        }
                    }
                }
                None
            }
            EventKind::Return => {
                let at = ReturnAt {
                    pid: ev.pid,
                    tid: ev.tid,
                    ts_ns: ev.ts_ns,
                    thread_cpu_ns: ev.thread_cpu_ns,
                    rss_bytes: ev.rss_bytes,
                    generator: ev.generator,
                };
                if self.pair_return(at, event_key(&ev), out) {
                    Some((ev.name, ev.file))
                } else {
                    self.note_unmatched(at, ev.name, ev.file)
                }
            }
        }
    }

    /// Feeds a return the kernel sent bare ([`KnownReturn`]), as [`Self::push`]
    /// feeds its [`Event`]; `names` gives the name and file it shows if it
    /// pairs with nothing (then returned as `push` returns a return's).
    pub fn push_known_return(
        &mut self,
        r: &KnownReturn,
        out: &mut Vec<Call>,
        names: impl FnOnce() -> (Arc<str>, Arc<str>),
    ) -> Option<(Arc<str>, Arc<str>)> {
        let at = ReturnAt {
            pid: r.pid,
            tid: r.tid,
            ts_ns: r.ts_ns,
            thread_cpu_ns: r.thread_cpu_ns,
            rss_bytes: r.rss_bytes,
            generator: r.generator,
        };
        // Both argument addresses are there: the key needs no strings.
        let addresses = Addresses { frame: r.frame, name_ptr: Some(r.name_ptr), file_ptr: Some(r.file_ptr) };
        let key = address_key(addresses).expect("a name and a file address make a key");
        if self.pair_return(at, key, out) {
            return None;
        }
        let (name, file) = names();
        self.note_unmatched(at, name, file)
    }

    /// Closes the innermost open call of the return's thread with `key`
    /// (and those above it, incomplete), or swallows the return of an entry
    /// not kept; false if it has no open entry (not counted yet: see
    /// [`Self::note_unmatched`]).
    fn pair_return(&mut self, r: ReturnAt, key: ReturnKey, out: &mut Vec<Call>) -> bool {
        let thread = Thread::new(r.pid, r.tid);
        if !self.overflow.is_empty()
            && let Some(n) = self.overflow.get_mut(&thread)
        {
            // The return of the innermost entry not kept.
            *n -= 1;
            if *n == 0 {
                self.overflow.remove(&thread);
            }
            return true;
        }
        // A thread without a stack has no entry to close (and gets no
        // stack for it: returns from ever new threads hold no memory).
        let Some(stack) = self.stacks.get_mut(&thread) else {
            return false;
        };
        let index = if self.index.is_empty() { None } else { self.index.get_mut(&thread) };
        let found = if index.as_ref().is_some_and(|i| !i.contains_key(&key)) {
            None
        } else {
            stack.iter().rposition(|o| open_key(o) == key)
        };
        // A return the kernel sent unread (`name_not_read`) has an
        // entry by construction: the kernel saw it match and sent it
        // (pftrace-ebpf/src/depth.rs). It finds none only when that
        // record was lost (counted as lost), and is counted here as
        // any return without its entry.
        let Some(at) = found else {
            return false;
        };
        self.open -= stack.len() - at;
        if let Some(p) = self.by_pid.get_mut(&r.pid) {
            p.0 -= stack.len() - at;
        }
        if let Some(index) = index {
            if at < INDEXED_DEPTH / 2 {
                self.index.remove(&thread);
            } else {
                for o in &stack[at..] {
                    let k = open_key(o);
                    if let Some(n) = index.get_mut(&k) {
                        *n -= 1;
                        if *n == 0 {
                            index.remove(&k);
                        }
                    }
                }
            }
        }
        // Entries above the match never returned: close them first.
        while stack.len() > at + 1 {
            self.skipped_entries += 1;
            let open = stack.pop().expect("len checked");
            let depth = stack.len() as u32;
            let close_at = Close { ts_ns: r.ts_ns, figures: None };
            push_in_place(out, || close(r.pid, r.tid, open, depth, close_at, CallEnd::Incomplete));
        }
        let open = stack.pop().expect("found above");
        let depth = stack.len() as u32;
        let close_at = Close { ts_ns: r.ts_ns, figures: Some((r.thread_cpu_ns, r.rss_bytes)) };
        push_in_place(out, || close(r.pid, r.tid, open, depth, close_at, CallEnd::Returned));
        if stack.is_empty() {
            if stack.capacity() > KEPT_CAPACITY {
                self.stacks.remove(&thread);
            } else if self.stacks.len() > self.prune_at.max(IDLE_STACKS) {
                // Threads that ended: amortised, as the bound doubles
                // with the stacks still open.
                self.stacks.retain(|_, s| !s.is_empty());
                self.prune_at = 2 * self.stacks.len();
            }
        }
        true
    }

    /// Counts a return without an open entry, keeping the first
    /// [`UNMATCHED_SAMPLE`]; returns its strings if not kept.
    fn note_unmatched(
        &mut self,
        r: ReturnAt,
        name: Arc<str>,
        file: Arc<str>,
    ) -> Option<(Arc<str>, Arc<str>)> {
        self.unmatched_total += 1;
        self.unmatched_generator += u64::from(r.generator);
        if self.unmatched.len() >= UNMATCHED_SAMPLE {
            return Some((name, file));
        }
        self.unmatched.push(UnmatchedReturn {
            pid: r.pid,
            tid: r.tid,
            name,
            file,
            ts_ns: r.ts_ns,
            generator: r.generator,
        });
        None
    }

    /// Closes every open call of process `pid` (or of all processes) at `end_ns`
    /// as incomplete.
    pub fn close_open(&mut self, pid: Option<u32>, end_ns: u64, out: &mut Vec<Call>) {
        let keys: Vec<Thread> =
            self.stacks.keys().filter(|t| pid.is_none_or(|want| t.pid() == want)).copied().collect();
        self.overflow.retain(|t, _| pid.is_some_and(|want| t.pid() != want));
        match pid {
            Some(pid) => {
                self.by_pid.remove(&pid);
            }
            None => self.by_pid.clear(),
        }
        for key in keys {
            self.index.remove(&key);
            let mut stack = self.stacks.remove(&key).unwrap_or_default();
            self.open -= stack.len();
            while let Some(open) = stack.pop() {
                let depth = stack.len() as u32;
                let at = Close { ts_ns: end_ns, figures: None };
                out.push(close(key.pid(), key.tid(), open, depth, at, CallEnd::Incomplete));
            }
        }
    }

    /// Number of calls currently open.
    pub fn open_calls(&self) -> usize {
        self.open
    }

    /// The first [`UNMATCHED_SAMPLE`] returns seen without a matching entry
    /// (all of them are counted in `unmatched_total`).
    pub fn unmatched_returns(&self) -> &[UnmatchedReturn] {
        &self.unmatched
    }
}

/// `v.push(make())`, with `make`'s value built where it goes. Built by
/// `push` on the stack across its growth check and copied in, an entry's
/// Open and a return's Call had fields stored narrow and read back wide (a
/// store-buffer stall: 25% of `Pairer::push`'s samples and 20% of the
/// return's, on the copy's first load).
#[inline(always)]
fn push_in_place<T>(v: &mut Vec<T>, make: impl FnOnce() -> T) {
    v.reserve(1);
    let len = v.len();
    let value = make();
    // SAFETY: `reserve(1)` made room for one element past `len`; the slot is
    // written before `len` is raised to cover it, and nothing between reads
    // the vector.
    unsafe {
        v.as_mut_ptr().add(len).write(value);
        v.set_len(len + 1);
    }
}

fn close(pid: u32, tid: u32, open: Open, depth: u32, at: Close, end: CallEnd) -> Call {
    // CPU time needs the return reading (0 there means the layout was unknown; at
    // entry 0 is real for a thread the scheduler has not yet charged). The
    // scheduler charges a running thread at ticks and switches, so the entry
    // reading can be stale and the difference exceed the call's wall time
    // (seen: 42 µs of CPU in a 37 µs call): no thread runs longer than the
    // call lasted, so it is capped there.
    let end_ns = at.ts_ns.max(open.start_ns);
    let cpu_ns = match at.figures {
        Some((cpu, _)) if cpu != 0 => Some(cpu.saturating_sub(open.cpu_ns).min(end_ns - open.start_ns)),
        _ => None,
    };
    Call {
        pid,
        tid,
        name: open.name,
        file: open.file,
        line: open.line,
        start_ns: open.start_ns,
        end_ns,
        depth,
        id: open.id,
        parent: open.parent,
        end,
        cpu_ns,
        rss_entry_bytes: open.rss_bytes,
        rss_return_bytes: at.figures.map_or(open.rss_bytes, |(_, rss)| rss),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Decoder;

    struct Feed {
        d: Decoder,
        p: Pairer,
        out: Vec<Call>,
        pid: u32,
    }

    impl Feed {
        fn new() -> Self {
            Self { d: Decoder::default(), p: Pairer::default(), out: vec![], pid: 1 }
        }
        fn ev(&mut self, tid: u32, kind: EventKind, name: &str, ts: u64) {
            self.ev_cpu(tid, kind, name, ts, 1000 + ts);
        }
        fn ev_cpu(&mut self, tid: u32, kind: EventKind, name: &str, ts: u64, cpu: u64) {
            self.ev_full(tid, kind, name, ts, cpu, None);
        }
        fn ev_frame(&mut self, kind: EventKind, name: &str, ts: u64, frame: u64) {
            self.ev_full(1, kind, name, ts, 1000 + ts, Some(frame));
        }
        fn ev_full(&mut self, tid: u32, kind: EventKind, name: &str, ts: u64, cpu: u64, frame: Option<u64>) {
            let (name, file) = (self.d.intern(0, name.as_bytes()), self.d.intern(0, b"t.py"));
            let ev = Event { tid, thread_cpu_ns: cpu, frame, ..self.event(kind, name, file, ts) };
            let _ = self.p.push(ev, &mut self.out);
        }
        /// What every test record here shares: thread 1, line 1, CPU
        /// 1000 + `ts`, no addresses.
        fn event(&self, kind: EventKind, name: Arc<str>, file: Arc<str>, ts: u64) -> Event {
            Event {
                ts_ns: ts,
                pid: self.pid,
                tid: 1,
                kind,
                name,
                file,
                line: 1,
                thread_cpu_ns: 1000 + ts,
                rss_bytes: 4096,
                frame: None,
                generator: false,
                file_cut: false,
                file_ptr: None,
                name_ptr: None,
                name_not_read: false,
            }
        }
        /// A USDT record as the kernel sends it: an entry with its file name
        /// and the file argument's address, a return with the address only.
        fn usdt(&mut self, kind: EventKind, name: &str, file: &str, file_ptr: u64, ts: u64) {
            let file = match kind {
                EventKind::Entry => self.d.intern(0, file.as_bytes()),
                EventKind::Return => Arc::from(crate::events::FILE_NOT_READ),
            };
            let name = self.d.intern(0, name.as_bytes());
            let ev = Event { file_ptr: Some(file_ptr), ..self.event(kind, name, file, ts) };
            let _ = self.p.push(ev, &mut self.out);
        }
        /// A USDT record with the name argument's address too (as the
        /// kernel sends them all): an entry with its name and file.
        fn usdt_named(
            &mut self,
            kind: EventKind,
            name: &str,
            file: &str,
            name_ptr: u64,
            file_ptr: u64,
            ts: u64,
        ) {
            let (name, file) = (self.d.intern(0, name.as_bytes()), self.d.intern(0, file.as_bytes()));
            let ev = Event {
                file_ptr: Some(file_ptr),
                name_ptr: Some(name_ptr),
                ..self.event(kind, name, file, ts)
            };
            let _ = self.p.push(ev, &mut self.out);
        }
    }

    #[test]
    fn returns_without_their_file_pair_by_the_file_argument() {
        use EventKind::{Entry, Return};
        let mut f = Feed::new();
        // f in a.py (file argument 0xa0) and f in b.py (0xb0) calling each
        // other: a(b(a(b))), each return with no file name.
        let (a, b) = (("a.py", 0xa0), ("b.py", 0xb0));
        let order = [a, b, a, b];
        for (i, (file, ptr)) in order.iter().enumerate() {
            f.usdt(Entry, "f", file, *ptr, i as u64);
        }
        for (i, (file, ptr)) in order.iter().enumerate().rev() {
            f.usdt(Return, "f", file, *ptr, 10 + (3 - i as u64));
        }
        let got: Vec<(&str, u64, u64, u32)> =
            f.out.iter().map(|c| (&*c.file, c.start_ns, c.end_ns, c.depth)).collect();
        assert_eq!(got, [("b.py", 3, 10, 3), ("a.py", 2, 11, 2), ("b.py", 1, 12, 1), ("a.py", 0, 13, 0)]);
        // A return of b.py's f while a.py's is innermost closes b.py's (the
        // one above is closed as incomplete: its return was lost), never a.py's.
        f.usdt(Entry, "f", "b.py", 0xb0, 20);
        f.usdt(Entry, "f", "a.py", 0xa0, 21);
        f.usdt(Return, "f", "b.py", 0xb0, 22);
        let last: Vec<(&str, CallEnd)> = f.out[4..].iter().map(|c| (&*c.file, c.end)).collect();
        assert_eq!(last, [("a.py", CallEnd::Incomplete), ("b.py", CallEnd::Returned)]);
        // A return with no open entry: counted, its file shown as not read.
        f.usdt(Return, "f", "c.py", 0xc0, 30);
        assert_eq!((f.p.unmatched_total, f.p.open_calls()), (1, 0));
        assert_eq!(&*f.p.unmatched_returns()[0].file, crate::events::FILE_NOT_READ);
    }

    /// A return the kernel sent without its name (it knew the entry
    /// matched): only the two arguments' addresses, fed as the daemon feeds
    /// it ([`Pairer::push_known_return`]).
    fn known_return(f: &mut Feed, name_ptr: u64, file_ptr: u64, ts: u64) {
        let r = KnownReturn {
            ts_ns: ts,
            pid: f.pid,
            tid: 1,
            thread_cpu_ns: 1000 + ts,
            rss_bytes: 4096,
            frame: None,
            generator: false,
            file_ptr,
            name_ptr,
        };
        let names = || (Arc::from(crate::events::NAME_NOT_READ), Arc::from(crate::events::FILE_NOT_READ));
        let _ = f.p.push_known_return(&r, &mut f.out, names);
    }

    /// The same return as an [`Event`] (what `decode` makes of its record).
    fn known_return_event(f: &mut Feed, name_ptr: u64, file_ptr: u64, ts: u64) {
        let (name, file) = (Arc::from(crate::events::NAME_NOT_READ), Arc::from(crate::events::FILE_NOT_READ));
        let ev = Event {
            file_ptr: Some(file_ptr),
            name_ptr: Some(name_ptr),
            name_not_read: true,
            ..f.event(EventKind::Return, name, file, ts)
        };
        let _ = f.p.push(ev, &mut f.out);
    }

    #[test]
    fn known_returns_pair_as_their_events_do() {
        use EventKind::Entry;
        let feeds: [fn(&mut Feed, u64, u64, u64); 2] = [known_return, known_return_event];
        let runs: Vec<_> = feeds
            .iter()
            .map(|feed| {
                let mut f = Feed::new();
                // f(g(f)), a return lost (g's), a return without entry, one on
                // a thread that never entered.
                f.usdt_named(Entry, "f", "a.py", 0x1a, 0xa0, 0);
                f.usdt_named(Entry, "g", "a.py", 0x2a, 0xa0, 1);
                f.usdt_named(Entry, "f", "a.py", 0x1a, 0xa0, 2);
                feed(&mut f, 0x1a, 0xa0, 3);
                feed(&mut f, 0x1a, 0xa0, 4);
                feed(&mut f, 0x3a, 0xa0, 5);
                f.pid = 9;
                feed(&mut f, 0x1a, 0xa0, 6);
                let calls: Vec<_> = f
                    .out
                    .iter()
                    .map(|c| {
                        (c.name.to_string(), c.start_ns, c.end_ns, c.depth, c.id, c.parent, c.end, c.cpu_ns)
                    })
                    .collect();
                let unmatched: Vec<_> =
                    f.p.unmatched_returns()
                        .iter()
                        .map(|u| (u.pid, u.name.to_string(), u.file.to_string()))
                        .collect();
                (calls, unmatched, f.p.unmatched_total, f.p.skipped_entries, f.p.open_calls())
            })
            .collect();
        assert_eq!(runs[0], runs[1]);
        let (calls, unmatched, total, skipped, open) = &runs[0];
        assert_eq!((calls.len(), *total, *skipped, *open), (3, 2, 1, 0));
        assert_eq!(calls[1].6, CallEnd::Incomplete);
        assert_eq!(
            unmatched[1],
            (9, crate::events::NAME_NOT_READ.to_string(), crate::events::FILE_NOT_READ.to_string())
        );
    }

    #[test]
    fn returns_without_their_name_pair_by_both_arguments_addresses() {
        use EventKind::Entry;
        let mut f = Feed::new();
        // f in a.py (name 0x1a, file 0xa0) and f in b.py (0x1b, 0xb0), and g
        // in a.py (0x2a, 0xa0): f(a) -> g(a) -> f(b) -> f(a).
        let order = [("f", "a.py", 0x1a, 0xa0), ("g", "a.py", 0x2a, 0xa0), ("f", "b.py", 0x1b, 0xb0)];
        let order = [order[0], order[1], order[2], order[0]];
        for (i, &(name, file, n, p)) in order.iter().enumerate() {
            f.usdt_named(Entry, name, file, n, p, i as u64);
        }
        for (i, &(_, _, n, p)) in order.iter().enumerate().rev() {
            known_return(&mut f, n, p, 10 + (3 - i as u64));
        }
        let got: Vec<(&str, &str, u64, u32, CallEnd)> =
            f.out.iter().map(|c| (&*c.name, &*c.file, c.start_ns, c.depth, c.end)).collect();
        use CallEnd::Returned;
        assert_eq!(
            got,
            [
                ("f", "a.py", 3, 3, Returned),
                ("f", "b.py", 2, 2, Returned),
                ("g", "a.py", 1, 1, Returned),
                ("f", "a.py", 0, 0, Returned)
            ]
        );
        // One whose entry was lost (another function of a.py is open):
        // counted as a return without entry, nothing closed.
        f.usdt_named(Entry, "g", "a.py", 0x2a, 0xa0, 20);
        known_return(&mut f, 0x1a, 0xa0, 21);
        assert_eq!((f.p.unmatched_total, f.p.open_calls(), f.out.len()), (1, 1, 4));
        assert_eq!(&*f.p.unmatched_returns()[0].name, crate::events::NAME_NOT_READ);
    }

    #[test]
    fn deep_stacks_index_returns_by_the_file_argument() {
        use EventKind::{Entry, Return};
        let mut f = Feed::new();
        let depth = 2 * INDEXED_DEPTH as u64;
        for i in 0..depth {
            let (file, ptr) = if i % 2 == 0 { ("a.py", 0xa0) } else { ("b.py", 0xb0) };
            f.usdt(Entry, "f", file, ptr, i);
        }
        assert!(f.p.index.contains_key(&Thread::new(1, 1)));
        // No open f at 0xc0: unmatched by the index, nothing closed.
        f.usdt(Return, "f", "c.py", 0xc0, depth);
        assert_eq!((f.p.unmatched_total, f.out.len()), (1, 0));
        for i in (0..depth).rev() {
            let (file, ptr) = if i % 2 == 0 { ("a.py", 0xa0) } else { ("b.py", 0xb0) };
            f.usdt(Return, "f", file, ptr, 2 * depth - i);
        }
        assert_eq!((f.p.unmatched_total, f.p.skipped_entries, f.p.open_calls()), (1, 0, 0));
        let a = f.out.iter().filter(|c| &*c.file == "a.py" && c.end == CallEnd::Returned).count();
        assert_eq!((a, f.out.len()), (INDEXED_DEPTH, depth as usize));
    }

    #[test]
    fn entries_past_the_open_calls_bounds_are_counted_with_their_returns() {
        use EventKind::{Entry, Return};
        let mut f = Feed::new();
        let extra = 5;
        for i in 0..(PROCESS_OPEN_CALLS + extra) as u64 {
            f.ev(1, Entry, "deep", i);
        }
        // Another thread of the process meanwhile: over its bound too.
        f.ev(2, Entry, "other", 0);
        f.ev(2, Return, "other", 1);
        assert_eq!((f.p.open_calls(), f.p.dropped_open), (PROCESS_OPEN_CALLS, extra as u64 + 1));
        // Another process is not: until all processes have MAX_OPEN_CALLS open.
        for pid in 2..=4 {
            f.pid = pid;
            for i in 0..PROCESS_OPEN_CALLS as u64 {
                f.ev(1, Entry, "deep", i);
            }
        }
        assert_eq!((f.p.open_calls(), f.p.dropped_open), (MAX_OPEN_CALLS, extra as u64 + 1));
        f.pid = 5;
        f.ev(1, Entry, "late", 0);
        f.ev(1, Return, "late", 1);
        assert_eq!((f.out.len(), f.p.dropped_open, f.p.unmatched_total), (0, extra as u64 + 2, 0));
        f.p.close_open(Some(4), 10, &mut f.out);
        f.ev(1, Entry, "late", 2);
        f.ev(1, Return, "late", 3);
        assert_eq!(f.out.len(), PROCESS_OPEN_CALLS + 1);
        f.out.clear();
        f.pid = 1;
        for i in 0..(PROCESS_OPEN_CALLS + extra) as u64 {
            f.ev(1, Return, "deep", 1_000_000 + i);
        }
        // The returns of the entries not kept were theirs: the kept calls pair exactly.
        assert_eq!(
            (f.out.len(), f.p.unmatched_total, f.p.open_calls()),
            (PROCESS_OPEN_CALLS, 0, 2 * PROCESS_OPEN_CALLS)
        );
        assert!(f.out.iter().all(|c| c.end == CallEnd::Returned));
        let outer = f.out.last().unwrap();
        assert_eq!(
            (outer.depth, outer.start_ns, outer.end_ns),
            (0, 0, 1_000_000 + (PROCESS_OPEN_CALLS + extra) as u64 - 1)
        );
        // Under the bound again, an entry is kept.
        f.ev(2, Entry, "other", 2);
        f.ev(2, Return, "other", 3);
        assert_eq!((f.out.len(), f.p.dropped_open), (PROCESS_OPEN_CALLS + 1, extra as u64 + 2));
    }

    #[test]
    fn deep_stacks_are_indexed_and_pair_as_before() {
        use EventKind::{Entry, Return};
        let mut f = Feed::new();
        let depth = 3 * INDEXED_DEPTH as u64;
        // Frames 1..=depth, then returns of a frame open nowhere: unmatched
        // at once (the index says so), nothing closed.
        for i in 1..=depth {
            f.ev_frame(Entry, "deep", i, i);
        }
        assert!(f.p.index.contains_key(&Thread::new(1, 1)));
        for i in 0..100 {
            f.ev_frame(Return, "deep", depth + i, 1 << 40);
        }
        assert_eq!((f.p.unmatched_total, f.out.len(), f.p.open_calls()), (100, 0, depth as usize));
        // A return of a frame below the top closes those above it as
        // incomplete; the index follows.
        f.ev_frame(Return, "deep", 2 * depth, depth - 10);
        assert_eq!(f.out.iter().filter(|c| c.end == CallEnd::Incomplete).count(), 10);
        assert_eq!(f.p.open_calls(), depth as usize - 11);
        f.ev_frame(Return, "deep", 2 * depth, depth - 5);
        assert_eq!(f.p.unmatched_total, 101, "closed already");
        // Down under half the indexed depth and up again: the index is
        // dropped, then made again, and every frame still pairs.
        for i in (100..depth - 10).rev() {
            f.ev_frame(Return, "deep", 3 * depth, i);
        }
        assert!(!f.p.index.contains_key(&Thread::new(1, 1)));
        for i in 100..depth {
            f.ev_frame(Entry, "deep", 4 * depth, i);
        }
        assert!(f.p.index.contains_key(&Thread::new(1, 1)));
        for i in (1..depth).rev() {
            f.ev_frame(Return, "deep", 5 * depth, i);
        }
        assert_eq!((f.p.unmatched_total, f.p.open_calls(), f.p.index.len()), (101, 0, 0));
        let returned = f.out.iter().filter(|c| c.end == CallEnd::Returned).count() as u64;
        // depth - 10, then 100..depth - 10, then 100..depth again and 1..100.
        assert_eq!(returned, 1 + (depth - 110) + (depth - 100) + 99);
    }

    #[test]
    fn ids_and_parents_name_the_call_tree() {
        use EventKind::{Entry, Return};
        let mut f = Feed::new();
        // Thread 1: a(b(c), b); thread 2: a, interleaved.
        f.ev(1, Entry, "a", 1);
        f.ev(2, Entry, "a", 2);
        f.ev(1, Entry, "b", 3);
        f.ev(1, Entry, "c", 4);
        f.ev(1, Return, "c", 5);
        f.ev(1, Return, "b", 6);
        f.ev(2, Return, "a", 7);
        f.ev(1, Entry, "b", 8);
        f.ev(1, Return, "b", 9);
        f.ev(1, Return, "a", 10);
        let got: Vec<(u32, &str, u64, u64, u32)> =
            f.out.iter().map(|c| (c.tid, &*c.name, c.id, c.parent, c.depth)).collect();
        assert_eq!(
            got,
            [(1, "c", 4, 3, 2), (1, "b", 3, 1, 1), (2, "a", 2, 0, 0), (1, "b", 5, 1, 1), (1, "a", 1, 0, 0)]
        );
    }

    #[test]
    fn cpu_time_is_the_difference_capped_at_the_wall_time() {
        let mut f = Feed::new();
        f.ev_cpu(1, EventKind::Entry, "c", 1_000, 5_000);
        f.ev_cpu(1, EventKind::Return, "c", 2_000, 5_600); // 600 ns of CPU in 1000 ns
        f.ev_cpu(1, EventKind::Entry, "c", 3_000, 5_600); // a stale entry reading: the
        f.ev_cpu(1, EventKind::Return, "c", 3_500, 6_400); // difference (800) exceeds the call (500)
        let got: Vec<_> = f.out.iter().map(|c| (c.cpu_ns, c.offcpu_ns())).collect();
        assert_eq!(got, vec![(Some(600), Some(400)), (Some(500), Some(0))]);
    }

    #[test]
    fn recursion_nests() {
        let mut f = Feed::new();
        for i in 0..3 {
            f.ev(1, EventKind::Entry, "r", i);
        }
        for i in 0..3 {
            f.ev(1, EventKind::Return, "r", 10 + i);
        }
        let spans: Vec<_> = f.out.iter().map(|c| (c.start_ns, c.end_ns, c.depth)).collect();
        assert_eq!(spans, vec![(2, 10, 2), (1, 11, 1), (0, 12, 0)]);
        assert_eq!(f.p.open_calls(), 0);
    }

    #[test]
    fn threads_are_separate_and_unmatched_returns_counted() {
        let mut f = Feed::new();
        f.ev(1, EventKind::Entry, "a", 1);
        f.ev(2, EventKind::Return, "a", 2); // other thread: no entry there
        f.ev(1, EventKind::Return, "a", 3);
        assert_eq!(f.out.len(), 1);
        assert_eq!(f.out[0].tid, 1);
        assert_eq!(f.p.unmatched_returns().len(), 1);
    }

    #[test]
    fn unmatched_returns_are_all_counted_and_a_bounded_sample_kept() {
        let mut f = Feed::new();
        for i in 0..(UNMATCHED_SAMPLE as u64 + 50) {
            f.ev(1, EventKind::Return, "a", i);
        }
        assert_eq!(f.p.unmatched_total, UNMATCHED_SAMPLE as u64 + 50);
        assert_eq!(f.p.unmatched_returns().len(), UNMATCHED_SAMPLE);
        assert_eq!(f.p.unmatched_returns()[0].ts_ns, 0);
    }

    #[test]
    fn lost_return_closes_inner_as_incomplete() {
        let mut f = Feed::new();
        f.ev(1, EventKind::Entry, "outer", 1);
        f.ev(1, EventKind::Entry, "inner", 2);
        f.ev(1, EventKind::Return, "outer", 5); // inner's return was lost
        assert_eq!(f.out.len(), 2);
        assert_eq!((&*f.out[0].name, f.out[0].end), ("inner", CallEnd::Incomplete));
        assert_eq!((&*f.out[1].name, f.out[1].end), ("outer", CallEnd::Returned));
        assert_eq!(f.p.skipped_entries, 1);
    }

    #[test]
    fn frames_pair_a_return_with_its_own_frame_run() {
        // Generator frame 0x20 runs inside a run of another generator of the
        // same function (frame 0x10); a return of 0x30 (resumed by throw(),
        // no entry) must not close 0x10's run.
        let mut f = Feed::new();
        f.ev_frame(EventKind::Entry, "g", 1, 0x10);
        f.ev_frame(EventKind::Entry, "g", 2, 0x20);
        f.ev_frame(EventKind::Return, "g", 3, 0x20);
        f.ev_frame(EventKind::Return, "g", 4, 0x30);
        f.ev_frame(EventKind::Return, "g", 5, 0x10);
        let spans: Vec<_> = f.out.iter().map(|c| (c.start_ns, c.end_ns, c.end)).collect();
        assert_eq!(spans, vec![(2, 3, CallEnd::Returned), (1, 5, CallEnd::Returned)]);
        assert_eq!((f.p.unmatched_total, f.p.skipped_entries), (1, 0));
    }

    #[test]
    fn emptied_stacks_are_kept_then_pruned_in_bulk() {
        let mut f = Feed::new();
        // A thread calling at depth 0 keeps its (empty) stack between calls.
        f.ev(1, EventKind::Entry, "a", 1);
        f.ev(1, EventKind::Return, "a", 2);
        assert_eq!((f.p.stacks.len(), f.p.open_calls()), (1, 0));
        // Threads that made one call each and ended: their empty stacks go
        // once there are more than IDLE_STACKS, while an open call stays.
        f.ev(9_999, EventKind::Entry, "open", 3);
        for tid in 2..(IDLE_STACKS as u32 + 10) {
            f.ev(tid, EventKind::Entry, "a", 10 + u64::from(tid));
            f.ev(tid, EventKind::Return, "a", 11 + u64::from(tid));
        }
        assert!(f.p.stacks.len() <= IDLE_STACKS + 1, "{} stacks", f.p.stacks.len());
        assert_eq!(f.p.open_calls(), 1);
        assert_eq!(f.out.len(), IDLE_STACKS + 8 + 1);
        f.ev(9_999, EventKind::Return, "open", 100_000);
        assert_eq!((f.out.len(), f.out.last().map(|c| &*c.name)), (IDLE_STACKS + 10, Some("open")));
        // A stack grown deep is dropped when emptied.
        for i in 0..(KEPT_CAPACITY as u64 + 1) {
            f.ev(7, EventKind::Entry, "r", 200_000 + i);
        }
        for i in 0..(KEPT_CAPACITY as u64 + 1) {
            f.ev(7, EventKind::Return, "r", 300_000 + i);
        }
        assert!(!f.p.stacks.contains_key(&Thread::new(1, 7)));
    }

    #[test]
    fn close_open_marks_incomplete() {
        let mut f = Feed::new();
        f.ev(1, EventKind::Entry, "a", 1);
        let mut out = vec![];
        f.p.close_open(Some(1), 9, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].end, out[0].end_ns), (CallEnd::Incomplete, 9));
    }
}
