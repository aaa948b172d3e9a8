//! Decoding the kernel's raw CallEvent records (and the long variant for
//! file names over 191 bytes, and the bare CallHead of a return whose file,
//! or file and name, were not read) into owned events, with function and file names interned
//! (each distinct name is one allocation) and read as untrusted bytes:
//! bounded, invalid UTF-8 replaced.

use std::sync::Arc;

use crate::{
    fast_hash::FastMap,
    string_bound::{self, StringBound, Verdict},
};
use pftrace_common::{
    CallEvent, CallHead, FILE_LEN, KIND_OFFSET, LongCallEvent, NAME_LEN, ProcEvent, flag, kind,
};

/// Entry or return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Entry,
    Return,
}

/// One matched probe hit.
#[derive(Debug, Clone)]
pub struct Event {
    pub ts_ns: u64,
    pub pid: u32,
    pub tid: u32,
    pub kind: EventKind,
    pub name: Arc<str>,
    pub file: Arc<str>,
    pub line: i32,
    /// CPU time of the thread so far, ns (0 if unknown).
    pub thread_cpu_ns: u64,
    /// Resident memory of the process, bytes (0 if unknown).
    pub rss_bytes: u64,
    /// The interpreter frame's address, where the kernel read it (CPython
    /// 3.15): an entry and its return carry the same.
    pub frame: Option<u64>,
    /// The frame belongs to a generator or coroutine (a resumed run).
    pub generator: bool,
    /// The file name filled PATH_MAX bytes and may be cut.
    pub file_cut: bool,
    /// The probe's file-name argument, an address in the process (USDT
    /// records): an entry and the return of the same run carry the same,
    /// and a return whose file was not read ([`FILE_NOT_READ`]) is paired
    /// by it. None for the agent's records.
    pub file_ptr: Option<u64>,
    /// The probe's name argument, an address in the process (USDT records):
    /// with `file_ptr`, what pairs a return of a known-matched entry, whose
    /// name the kernel did not read (`name_not_read`). None for the agent's.
    pub name_ptr: Option<u64>,
    /// A return the kernel sent without reading its name, knowing its entry
    /// matched (pftrace-ebpf/src/depth.rs): `name` is [`NAME_NOT_READ`],
    /// the call is named from its entry, and no name check applies to it.
    pub name_not_read: bool,
}

/// A return the kernel sent bare (flags [`flag::NO_FILE`] and
/// [`flag::NAME_NOT_READ`]: it knew its entry matched, depth.rs), as
/// pairing needs it: the head's fields only, read without touching the
/// string paths ([`Decoder::known_return`]). Half of a dense trace's records
/// are these; decoded as an [`Event`] each took two spare string references
/// out of the recycle slots and two back in, and was moved whole (128
/// bytes) three times on its way to the pairer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownReturn {
    pub ts_ns: u64,
    pub pid: u32,
    pub tid: u32,
    pub thread_cpu_ns: u64,
    pub rss_bytes: u64,
    /// As [`Event::frame`].
    pub frame: Option<u64>,
    pub generator: bool,
    pub file_ptr: u64,
    pub name_ptr: u64,
}

/// The `file` of a return whose file name the kernel did not read (it pairs
/// by `file_ptr`, and its call is named from its entry): what a return
/// without an entry shows. Not looked up by address in the process's other
/// records: the address may have been freed and reused for another name
/// since (README, "Nothing lost silently").
pub const FILE_NOT_READ: &str = "<file not read: return without entry>";

/// The `name` of a return whose name the kernel did not read (its entry
/// matched: it pairs by the name and file arguments' addresses, and its
/// call is named from the entry): what a return without an entry shows.
pub const NAME_NOT_READ: &str = "<name not read: return without entry>";

/// A new process in scope (it called execve).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecEvent {
    pub ts_ns: u64,
    pub pid: u32,
    /// The thread that exec'd: not `pid` when a thread other than the main
    /// one did (its tid before the exec).
    pub thread: u32,
    pub cgroup_id: u64,
}

/// A traced process forked a new process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForkEvent {
    pub ts_ns: u64,
    /// The new process.
    pub pid: u32,
    /// The traced process that forked it.
    pub parent: u32,
}

/// A tracked process exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitEvent {
    pub ts_ns: u64,
    pub pid: u32,
}

/// Any ring-buffer record.
#[derive(Debug, Clone)]
pub enum Record {
    Call(Event),
    /// Events of one thread (the batched agent road), in the order it made them.
    Batch(Vec<Event>),
    Exec(ExecEvent),
    Fork(ForkEvent),
    Exit(ExitEvent),
}

/// Errors decoding a ring-buffer record.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("ring-buffer record of {got} bytes, expected {want}")]
    Size { got: usize, want: usize },
    #[error("ring-buffer record with unknown kind {0}")]
    Kind(u8),
    #[error("ring-buffer entry record without its file name")]
    EntryWithoutFile,
    #[error("ring-buffer record without its name that is not a return without its file")]
    NameNotRead,
}

/// Text from a traced process made safe to show anywhere: control
/// characters (which could drive a terminal, e.g. ESC) become `\xNN` escapes.
/// Invalid UTF-8 is already replaced by U+FFFD when decoding.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return s.into();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.push_str(&format!("\\x{:02x}", c as u32));
        } else {
            out.push(c);
        }
    }
    out.into()
}

/// A path from a traced process (its interpreter, a library it maps) made
/// safe to show, as [`printable`] does for text: a user can install a Python
/// under any name, escape sequences included.
pub fn printable_path(path: &std::path::Path) -> String {
    printable(&path.to_string_lossy()).into_owned()
}

/// The system page size in bytes.
pub fn page_size() -> u64 {
    static SIZE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    // SAFETY: sysconf has no preconditions.
    *SIZE.get_or_init(|| unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64)
}

/// Turns raw records into events, interning the strings.
#[derive(Default)]
pub struct Decoder {
    strings: FastMap<Box<[u8]>, Arc<str>>,
    /// Strings seen lately, in front of `strings` (see [`Recent`]).
    recent: Recent,
    /// Call records whose file name filled PATH_MAX bytes (it may be cut:
    /// a path qualifier cannot be checked on it).
    pub files_cut: u64,
    /// The strings of in-process agents' code objects (agent/records.rs).
    pub agent: crate::agent::records::AgentNames,
    /// The bound on `strings` (string_bound.rs).
    pub bound: StringBound,
    /// What a string not kept is named ([`string_bound::OTHER`]); not in
    /// `strings`, so a process sending that text is not counted as folded.
    other: Option<Arc<str>>,
    /// [`FILE_NOT_READ`], the file of every return sent without one; not in
    /// `strings` either (a process sending that text gets its own string).
    not_read: Option<Arc<str>>,
    /// [`NAME_NOT_READ`], the name of every return sent without one (as `not_read`).
    name_not_read: Option<Arc<str>>,
    /// A process's strings stay past its exit record until the daemon
    /// forgets them ([`Self::forget_process`]): the batched agent road's
    /// drains of its other threads may follow it (daemon/exits.rs).
    pub keep_past_exit: bool,
}

/// A direct-mapped cache of interned strings, by a cheap hash of their
/// length and first and last 8 bytes, checked by comparing the bytes: a
/// record's name and file are found without hashing all their bytes with
/// the map's hasher. In the dense bench's profile (synthetic records, no
/// BPF) interning was 28% of the loop (memchr, foldhash, the map's compare);
/// this took it to a compare of the bytes and a word-wise NUL search.
/// Colliding strings only evict each other (the map still answers).
///
/// It also keeps spare references to interned strings, handed back by the
/// pairer from return events and by the call store from the calls it
/// evicts ([`Decoder::recycle`]), and handed out again instead of new
/// clones: an `Arc` clone and drop are atomic read-modify-writes (a `lock`
/// instruction, which waits for every store before it). In the dense loop's
/// profile the clone was 16% of `intern`'s samples and the drops of evicted
/// calls' strings all of a `Vec::drop` (4% of pftraced's samples).
struct Recent {
    slots: Box<[Option<RecentString>]>,
    /// Spares per slot, by the string's address (see [`Spare`]).
    spares: Box<[Option<Spare>]>,
}

/// Spare references to one interned string: the `Arc`, and `more` strong
/// references given up with `Arc::into_raw` that this slot owns besides:
/// each is handed out again with `Arc::from_raw`, neither an atomic
/// operation (a count kept beside the string, not a `Vec` of `Arc`s: no
/// memory per reference). They are references the calls held already:
/// the string lives no longer than before, and a sweep, which makes a new
/// [`Recent`], gives them up first ([`Recent`]'s `Drop`).
type Spare = (Arc<str>, usize);

impl Drop for Recent {
    fn drop(&mut self) {
        for (s, more) in self.spares.iter().flatten() {
            for _ in 0..*more {
                // SAFETY: the slot owns `more` strong references to `s`,
                // each given up by `Arc::into_raw` (Decoder::recycle), whose
                // pointer `Arc::as_ptr` gives again; `s` itself keeps one, so
                // the count never reaches zero here.
                unsafe { Arc::decrement_strong_count(Arc::as_ptr(s)) };
            }
        }
    }
}

/// A string's bytes as the record had them, and the interned string.
type RecentString = (Box<[u8]>, Arc<str>);

/// Slots in [`Recent`] (a power of two).
const RECENT_SLOTS: usize = 256;

impl Default for Recent {
    fn default() -> Self {
        Self {
            slots: vec![None; RECENT_SLOTS].into_boxed_slice(),
            spares: (0..RECENT_SLOTS).map(|_| None).collect(),
        }
    }
}

/// The spare slot of an interned string, by its address.
fn spare_slot(s: &Arc<str>) -> usize {
    let address = Arc::as_ptr(s) as *const u8 as usize;
    address.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (usize::BITS - RECENT_SLOTS.trailing_zeros())
}

/// A reference to `s`: a spare one if there is, else a clone.
fn spare_or_clone(spares: &mut [Option<Spare>], s: &Arc<str>) -> Arc<str> {
    let spare = &mut spares[spare_slot(s)];
    match spare {
        Some((x, more)) if Arc::ptr_eq(x, s) && *more > 0 => {
            *more -= 1;
            // SAFETY: one of the `more` references the slot owns, given up
            // by `Arc::into_raw` of an `Arc` of this allocation (whose
            // pointer `Arc::as_ptr` gives again): taken back once.
            unsafe { Arc::from_raw(Arc::as_ptr(x)) }
        }
        Some((x, _)) if Arc::ptr_eq(x, s) => spare.take().expect("matched").0,
        _ => s.clone(),
    }
}

impl Recent {
    /// The slot of the string `padded[..len]`, from its length and its first
    /// and last 8 bytes (read as whole words where the buffer allows).
    fn slot(padded: &[u8], len: usize) -> usize {
        let word = |at: usize| match padded.get(at..at + 8) {
            Some(w) => u64::from_le_bytes(w.try_into().expect("8 bytes")),
            None => padded[at..].iter().rev().fold(0, |w, &b| w << 8 | u64::from(b)),
        };
        // Only the string's bytes count: what follows its NUL is not ours.
        let keep = if len >= 8 { u64::MAX } else { (1u64 << (8 * len)) - 1 };
        let first = word(0) & keep;
        let last = if len >= 8 { word(len - 8) } else { first };
        let h = (first ^ last.rotate_left(29) ^ len as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        (h >> (64 - RECENT_SLOTS.trailing_zeros())) as usize
    }
}

/// Where the first NUL is in `padded` (its length if none): eight bytes at a
/// time, as names are short and the call has to be cheap.
pub(crate) fn nul_at(padded: &[u8]) -> usize {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    let mut chunks = padded.chunks_exact(8);
    let mut at = 0;
    for chunk in &mut chunks {
        let w = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        // The lowest set bit marks the first zero byte (bits above it may be
        // false positives from the borrow; they are never looked at).
        let zero = w.wrapping_sub(ONES) & !w & HIGHS;
        if zero != 0 {
            return at + (zero.trailing_zeros() / 8) as usize;
        }
        at += 8;
    }
    at + chunks.remainder().iter().position(|&b| b == 0).unwrap_or(chunks.remainder().len())
}

/// A field of a record at `offset`, read without copying the record.
/// The caller checked that `bytes` holds the record the offset is in.
fn field<T: Copy>(bytes: &[u8], offset: usize) -> T {
    assert!(offset + size_of::<T>() <= bytes.len(), "record length checked by the caller");
    // SAFETY: in bounds (asserted); T is a plain integer type; read_unaligned
    // makes no alignment assumption about the ring buffer.
    unsafe { std::ptr::read_unaligned(bytes.as_ptr().add(offset).cast()) }
}

impl Decoder {
    /// Decodes any record, by the kind byte every record has at KIND_OFFSET.
    pub fn decode_record(&mut self, bytes: &[u8]) -> Result<Record, DecodeError> {
        match bytes.get(KIND_OFFSET) {
            Some(&k @ (kind::EXEC | kind::FORK | kind::EXIT)) => {
                let want = size_of::<ProcEvent>();
                if bytes.len() < want {
                    return Err(DecodeError::Size { got: bytes.len(), want });
                }
                // SAFETY: length checked; ProcEvent is plain old data.
                let raw: ProcEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
                if k == kind::EXEC || k == kind::EXIT && !self.keep_past_exit {
                    self.forget_process(raw.pid);
                }
                Ok(match k {
                    kind::EXEC => Record::Exec(ExecEvent {
                        ts_ns: raw.ts_ns,
                        pid: raw.pid,
                        thread: raw.parent,
                        cgroup_id: raw.cgroup_id,
                    }),
                    kind::FORK => {
                        Record::Fork(ForkEvent { ts_ns: raw.ts_ns, pid: raw.pid, parent: raw.parent })
                    }
                    _ => Record::Exit(ExitEvent { ts_ns: raw.ts_ns, pid: raw.pid }),
                })
            }
            Some(&kind::AGENT) if self.is_agent_batch(bytes) => {
                self.decode_agent_batch(bytes).map(Record::Batch)
            }
            Some(&kind::AGENT) => self.decode_agent(bytes).map(Record::Call),
            _ => self.decode(bytes).map(Record::Call),
        }
    }

    /// Forgets what is kept for process `pid` (it exec'd or exited).
    pub fn forget_process(&mut self, pid: u32) {
        self.agent.forget(pid);
        self.bound.forget(pid);
    }

    /// Decodes a call record, common, long or without a file (a return),
    /// reading its fields where they are (the record is not copied).
    pub fn decode(&mut self, bytes: &[u8]) -> Result<Event, DecodeError> {
        use std::mem::offset_of;
        let want = size_of::<CallHead>();
        if bytes.len() < want {
            return Err(DecodeError::Size { got: bytes.len(), want });
        }
        let kind = match bytes[offset_of!(CallHead, kind)] {
            kind::ENTRY => EventKind::Entry,
            kind::RETURN => EventKind::Return,
            other => return Err(DecodeError::Kind(other)),
        };
        let flags = bytes[offset_of!(CallHead, flags)];
        let pid = field(bytes, offset_of!(CallHead, pid));
        let folded = self.bound.folded;
        let file = if flags & flag::NO_FILE != 0 {
            if kind == EventKind::Entry {
                return Err(DecodeError::EntryWithoutFile);
            }
            let not_read = self.not_read.get_or_insert_with(|| Arc::from(FILE_NOT_READ));
            spare_or_clone(&mut self.recent.spares, not_read)
        } else {
            let want = size_of::<CallEvent>();
            if bytes.len() < want {
                return Err(DecodeError::Size { got: bytes.len(), want });
            }
            self.files_cut += u64::from(flags & flag::FILE_CUT != 0);
            let at = offset_of!(CallEvent, file);
            if flags & flag::LONG != 0 {
                let want = size_of::<LongCallEvent>();
                if bytes.len() < want {
                    return Err(DecodeError::Size { got: bytes.len(), want });
                }
                // The file name starts in the common part and goes on in `more`.
                self.intern(pid, &bytes[at..at + pftrace_common::LONG_FILE_LEN])
            } else {
                self.intern(pid, &bytes[at..at + FILE_LEN])
            }
        };
        let name_not_read = flags & flag::NAME_NOT_READ != 0;
        let name = if name_not_read {
            // Only the kernel's known-matched return (depth.rs) comes so.
            if kind != EventKind::Return || flags & flag::NO_FILE == 0 {
                return Err(DecodeError::NameNotRead);
            }
            let not_read = self.name_not_read.get_or_insert_with(|| Arc::from(NAME_NOT_READ));
            spare_or_clone(&mut self.recent.spares, not_read)
        } else {
            let name_at = offset_of!(CallHead, name);
            self.intern(pid, &bytes[name_at..name_at + NAME_LEN])
        };
        self.bound.records_folded += u64::from(self.bound.folded != folded);
        Ok(Event {
            ts_ns: field(bytes, offset_of!(CallHead, ts_ns)),
            pid,
            tid: field(bytes, offset_of!(CallHead, tid)),
            kind,
            name,
            file,
            line: field(bytes, offset_of!(CallHead, lineno)),
            thread_cpu_ns: field(bytes, offset_of!(CallHead, thread_cpu_ns)),
            rss_bytes: field::<u64>(bytes, offset_of!(CallHead, rss_pages)).saturating_mul(page_size()),
            frame: (flags & flag::FRAME != 0).then(|| field(bytes, offset_of!(CallHead, frame))),
            generator: flags & flag::GENERATOR != 0,
            file_cut: flags & flag::FILE_CUT != 0,
            file_ptr: Some(field(bytes, offset_of!(CallHead, file_ptr))),
            name_ptr: Some(field(bytes, offset_of!(CallHead, name_ptr))),
            name_not_read,
        })
    }

    /// `bytes` as a [`KnownReturn`] if it is one (a USDT return record of
    /// at least a [`CallHead`] with both [`flag::NO_FILE`] and
    /// [`flag::NAME_NOT_READ`]), else None: [`Self::decode_record`] reads
    /// it, and says what is wrong with it. The same fields as
    /// [`Self::decode`] gives such a record (which keeps deciding the rest).
    pub fn known_return(bytes: &[u8]) -> Option<KnownReturn> {
        use std::mem::offset_of;
        const BARE: u8 = flag::NO_FILE | flag::NAME_NOT_READ;
        if bytes.len() < size_of::<CallHead>()
            || bytes[offset_of!(CallHead, kind)] != kind::RETURN
            || bytes[offset_of!(CallHead, flags)] & BARE != BARE
        {
            return None;
        }
        let flags = bytes[offset_of!(CallHead, flags)];
        Some(KnownReturn {
            ts_ns: field(bytes, offset_of!(CallHead, ts_ns)),
            pid: field(bytes, offset_of!(CallHead, pid)),
            tid: field(bytes, offset_of!(CallHead, tid)),
            thread_cpu_ns: field(bytes, offset_of!(CallHead, thread_cpu_ns)),
            rss_bytes: field::<u64>(bytes, offset_of!(CallHead, rss_pages)).saturating_mul(page_size()),
            frame: (flags & flag::FRAME != 0).then(|| field(bytes, offset_of!(CallHead, frame))),
            generator: flags & flag::GENERATOR != 0,
            file_ptr: field(bytes, offset_of!(CallHead, file_ptr)),
            name_ptr: field(bytes, offset_of!(CallHead, name_ptr)),
        })
    }

    /// The name and file a [`KnownReturn`] shows when it pairs with
    /// nothing ([`NAME_NOT_READ`], [`FILE_NOT_READ`]), as [`Self::decode`]
    /// gives them to the [`Event`] of such a record.
    pub fn not_read_strings(&mut self) -> (Arc<str>, Arc<str>) {
        let name = self.name_not_read.get_or_insert_with(|| Arc::from(NAME_NOT_READ));
        let name = spare_or_clone(&mut self.recent.spares, name);
        let file = self.not_read.get_or_insert_with(|| Arc::from(FILE_NOT_READ));
        (name, spare_or_clone(&mut self.recent.spares, file))
    }

    /// The string up to the first NUL, shared with earlier identical strings;
    /// a new one is charged to `pid`, and past the bound not kept
    /// ([`string_bound::OTHER`] instead).
    pub fn intern(&mut self, pid: u32, padded: &[u8]) -> Arc<str> {
        let len = nul_at(padded);
        let bytes = &padded[..len];
        let Recent { slots, spares } = &mut self.recent;
        let slot = &mut slots[Recent::slot(padded, len)];
        if let Some((seen, s)) = slot
            && **seen == *bytes
        {
            return spare_or_clone(spares, s);
        }
        let s = match self.strings.get(bytes) {
            Some(s) => s.clone(),
            None => return self.intern_new(pid, bytes),
        };
        *slot = Some((bytes.into(), s.clone()));
        s
    }

    /// A string not in the table: kept if the bound allows.
    #[cold]
    fn intern_new(&mut self, pid: u32, bytes: &[u8]) -> Arc<str> {
        let mut verdict = self.bound.admit(pid, bytes.len(), false);
        if let Verdict::Sweep = verdict {
            self.sweep();
            verdict = self.bound.admit(pid, bytes.len(), true);
        }
        if let Verdict::Fold = verdict {
            return self.other.get_or_insert_with(|| Arc::from(string_bound::OTHER)).clone();
        }
        let s: Arc<str> = Arc::from(printable(&String::from_utf8_lossy(bytes)).as_ref());
        self.strings.insert(bytes.into(), s.clone());
        let Recent { slots, .. } = &mut self.recent;
        slots[Recent::slot(bytes, bytes.len())] = Some((bytes.into(), s.clone()));
        s
    }

    /// Drops the strings nothing but the table holds (the recent cache's
    /// references go first). Whoever keys a cache by a string's address
    /// without holding the string must forget it when `bound.sweeps` changes:
    /// a new string may be given a swept one's address.
    fn sweep(&mut self) {
        self.recent = Recent::default();
        let mut freed = 0;
        self.strings.retain(|bytes, s| {
            let used = Arc::strong_count(s) > 1;
            if !used {
                freed += string_bound::string_bytes(bytes.len());
            }
            used
        });
        log::debug!("string table swept: {freed} bytes freed, {} strings left", self.strings.len());
        self.bound.swept(freed);
    }

    /// Takes back a reference to an interned string that is no longer
    /// needed (a paired return's), to hand it out again from [`Self::intern`].
    pub fn recycle(&mut self, s: Arc<str>) {
        let spare = &mut self.recent.spares[spare_slot(&s)];
        match spare {
            None => *spare = Some((s, 0)),
            Some((x, more)) if Arc::ptr_eq(x, &s) => {
                // Kept without touching the count: Recent's Drop or
                // spare_or_clone takes it back.
                let _ = Arc::into_raw(s);
                *more += 1;
            }
            // Another string's slot: dropped.
            Some(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(kind: u8, name: &[u8]) -> Vec<u8> {
        let mut ev = CallEvent {
            head: CallHead {
                ts_ns: 42,
                pid: 7,
                tid: 8,
                lineno: 3,
                kind,
                flags: 0,
                agent_event: 0,
                _pad: 0,
                thread_cpu_ns: 5,
                rss_pages: 2,
                frame: 0,
                file_ptr: 0x5500_0010,
                name_ptr: 0x5500_0080,
                name: [0; NAME_LEN],
            },
            file: [0; FILE_LEN],
        };
        ev.head.name[..name.len()].copy_from_slice(name);
        ev.file[..4].copy_from_slice(b"a.py");
        // SAFETY: CallEvent is plain old data.
        unsafe { std::slice::from_raw_parts((&ev as *const CallEvent).cast::<u8>(), size_of::<CallEvent>()) }
            .to_vec()
    }

    #[test]
    fn decodes_and_interns() {
        let mut d = Decoder::default();
        let a = d.decode(&raw(kind::ENTRY, b"foo")).unwrap();
        let b = d.decode(&raw(kind::RETURN, b"foo")).unwrap();
        assert_eq!((a.kind, b.kind), (EventKind::Entry, EventKind::Return));
        assert_eq!((&*a.name, &*a.file, a.line, a.pid, a.tid), ("foo", "a.py", 3, 7, 8));
        assert!(Arc::ptr_eq(&a.name, &b.name));
        assert_eq!((a.thread_cpu_ns, a.rss_bytes), (5, 2 * page_size()));
        assert_eq!((a.file_ptr, b.file_ptr), (Some(0x5500_0010), Some(0x5500_0010)));
    }

    #[test]
    fn a_return_without_its_file_is_read_from_the_head_alone() {
        let mut d = Decoder::default();
        let mut bytes = raw(kind::RETURN, b"foo");
        bytes[std::mem::offset_of!(CallHead, flags)] = flag::NO_FILE;
        bytes.truncate(size_of::<CallHead>());
        let r = d.decode(&bytes).unwrap();
        assert_eq!((&*r.name, &*r.file, r.file_ptr, r.line), ("foo", FILE_NOT_READ, Some(0x5500_0010), 3));
        // The marker is one string, not interned (a process's own file of
        // that text is its own string), and not counted as cut.
        let again = d.decode(&bytes).unwrap();
        assert!(Arc::ptr_eq(&r.file, &again.file));
        let mut named = raw(kind::ENTRY, b"foo");
        let at = std::mem::offset_of!(CallEvent, file);
        named[at..at + FILE_NOT_READ.len() + 1].copy_from_slice(format!("{FILE_NOT_READ}\0").as_bytes());
        let e = d.decode(&named).unwrap();
        assert_eq!(&*e.file, FILE_NOT_READ);
        assert!(!Arc::ptr_eq(&e.file, &r.file));
        assert_eq!(d.files_cut, 0);
        // Shorter than the head: refused. An entry without its file: refused.
        assert!(matches!(d.decode(&bytes[..size_of::<CallHead>() - 1]), Err(DecodeError::Size { .. })));
        let mut entry = bytes.clone();
        entry[std::mem::offset_of!(CallHead, kind)] = kind::ENTRY;
        assert!(matches!(d.decode(&entry), Err(DecodeError::EntryWithoutFile)));
        // A record with its file still needs the whole of it.
        let cut = &raw(kind::RETURN, b"foo")[..size_of::<CallHead>()];
        assert!(matches!(d.decode(cut), Err(DecodeError::Size { .. })));
    }

    #[test]
    fn a_bare_return_is_read_as_decode_reads_it() {
        let mut d = Decoder::default();
        let mut bytes = raw(kind::RETURN, b"");
        bytes[std::mem::offset_of!(CallHead, flags)] = flag::NO_FILE | flag::NAME_NOT_READ | flag::GENERATOR;
        bytes.truncate(size_of::<CallHead>());
        let r = Decoder::known_return(&bytes).expect("a bare return");
        let ev = d.decode(&bytes).unwrap();
        assert_eq!(
            (r.ts_ns, r.pid, r.tid, r.thread_cpu_ns, r.rss_bytes, r.frame, r.generator),
            (ev.ts_ns, ev.pid, ev.tid, ev.thread_cpu_ns, ev.rss_bytes, ev.frame, ev.generator)
        );
        assert_eq!((Some(r.name_ptr), Some(r.file_ptr)), (ev.name_ptr, ev.file_ptr));
        let (name, file) = d.not_read_strings();
        assert!(Arc::ptr_eq(&name, &ev.name) && Arc::ptr_eq(&file, &ev.file));
        // With its frame: read as decode reads it.
        bytes[std::mem::offset_of!(CallHead, flags)] |= flag::FRAME;
        bytes[std::mem::offset_of!(CallHead, frame)] = 0x77;
        assert_eq!(Decoder::known_return(&bytes).unwrap().frame, d.decode(&bytes).unwrap().frame);
        assert_eq!(Decoder::known_return(&bytes).unwrap().frame, Some(0x77));
        // Anything else is left to decode_record: an entry, a return with
        // its file or its name, a record cut short.
        let with = |k: u8, flags: u8| {
            let mut b = raw(k, b"");
            b[std::mem::offset_of!(CallHead, flags)] = flags;
            b
        };
        assert!(Decoder::known_return(&with(kind::ENTRY, flag::NO_FILE | flag::NAME_NOT_READ)).is_none());
        assert!(Decoder::known_return(&with(kind::RETURN, flag::NAME_NOT_READ)).is_none());
        assert!(Decoder::known_return(&with(kind::RETURN, flag::NO_FILE)).is_none());
        assert!(Decoder::known_return(&with(kind::RETURN, 0)).is_none());
        assert!(Decoder::known_return(&bytes[..size_of::<CallHead>() - 1]).is_none());
    }

    #[test]
    fn a_return_without_its_name_pairs_by_the_addresses_alone() {
        let mut d = Decoder::default();
        let mut bytes = raw(kind::RETURN, b"");
        bytes[std::mem::offset_of!(CallHead, flags)] = flag::NO_FILE | flag::NAME_NOT_READ;
        bytes.truncate(size_of::<CallHead>());
        let r = d.decode(&bytes).unwrap();
        assert_eq!(
            (&*r.name, &*r.file, r.name_ptr, r.file_ptr, r.name_not_read),
            (NAME_NOT_READ, FILE_NOT_READ, Some(0x5500_0080), Some(0x5500_0010), true)
        );
        // Not interned: a process's own function of that text is its own string.
        assert!(Arc::ptr_eq(&r.name, &d.decode(&bytes).unwrap().name));
        assert!(!d.decode(&raw(kind::ENTRY, b"f")).unwrap().name_not_read);
        // Only a return without its file comes without its name.
        let mut entry = raw(kind::ENTRY, b"");
        entry[std::mem::offset_of!(CallHead, flags)] = flag::NAME_NOT_READ;
        assert!(matches!(d.decode(&entry), Err(DecodeError::NameNotRead)));
        let mut with_file = raw(kind::RETURN, b"");
        with_file[std::mem::offset_of!(CallHead, flags)] = flag::NAME_NOT_READ;
        assert!(matches!(d.decode(&with_file), Err(DecodeError::NameNotRead)));
    }

    #[test]
    fn long_records_carry_the_whole_file_name_and_frames_their_address() {
        let path: String = "/d".repeat(1500) + "/m.py"; // 3005 bytes
        let mut bytes = raw(kind::ENTRY, b"f");
        bytes[std::mem::offset_of!(CallHead, flags)] = flag::LONG | flag::FRAME;
        bytes[std::mem::offset_of!(CallHead, frame)..][..8].copy_from_slice(&0x7f00_1234u64.to_ne_bytes());
        bytes.resize(size_of::<LongCallEvent>(), 0);
        let at = std::mem::offset_of!(CallEvent, file);
        bytes[at..at + FILE_LEN].fill(0);
        bytes[at..at + path.len()].copy_from_slice(path.as_bytes());
        let mut d = Decoder::default();
        let e = d.decode(&bytes).unwrap();
        assert_eq!(&*e.file, path);
        assert_eq!((e.frame, e.generator, e.file_cut), (Some(0x7f00_1234), false, false));
        // A long record cut short is refused, not read past its end.
        assert!(matches!(d.decode(&bytes[..size_of::<CallEvent>()]), Err(DecodeError::Size { .. })));
        // A common record's frame is ignored unless flagged.
        assert_eq!(d.decode(&raw(kind::RETURN, b"f")).unwrap().frame, None);
    }

    #[test]
    fn interning_tells_apart_strings_the_recent_cache_confuses() {
        let mut d = Decoder::default();
        let padded = |s: &[u8], junk: u8| {
            let mut b = vec![junk; NAME_LEN];
            b[..s.len()].copy_from_slice(s);
            if s.len() < NAME_LEN {
                b[s.len()] = 0;
            }
            b
        };
        // Same length, first and last 8 bytes: one slot, different strings.
        let (a, b) = (b"01234567AA01234567".as_slice(), b"01234567BB01234567".as_slice());
        assert_eq!(Recent::slot(&padded(a, 0), a.len()), Recent::slot(&padded(b, 0), b.len()));
        let mut seen = Vec::new();
        for round in 0..3u8 {
            let all: [&[u8]; 6] = [a, b, b"f", b"", &[b'n'; NAME_LEN], b"f\xffo"];
            for s in all {
                // Bytes after the NUL are not the string's (the ring is not zeroed).
                let got = d.intern(0, &padded(s, round * 0x41));
                assert_eq!(got.as_bytes(), printable(&String::from_utf8_lossy(s)).as_bytes());
                seen.push(got);
            }
        }
        // Each distinct string is one allocation, whichever path found it.
        for (i, s) in seen.iter().enumerate() {
            assert!(Arc::ptr_eq(s, &seen[i % 6]), "{s:?}");
        }
        let cases: [(&[u8], usize); 5] =
            [(b"abc\0def", 3), (b"", 0), (b"12345678\0", 8), (b"123456789", 9), (b"\0", 0)];
        for (s, at) in cases {
            assert_eq!(nul_at(s), at, "{s:?}");
        }
    }

    #[test]
    fn recycled_references_are_handed_out_again() {
        let mut d = Decoder::default();
        let a = d.intern(0, b"f\0\0\0");
        let n = Arc::strong_count(&a);
        let b = d.intern(0, b"f\0\0\0");
        assert_eq!(Arc::strong_count(&a), n + 1);
        d.recycle(b);
        // Kept as a spare, then handed out instead of a new clone.
        assert_eq!(Arc::strong_count(&a), n + 1);
        let c = d.intern(0, b"f\0\0\0");
        assert!(Arc::ptr_eq(&a, &c));
        assert_eq!(Arc::strong_count(&a), n + 1);
        // No spare: a clone.
        let e = d.intern(0, b"f\0\0\0");
        assert_eq!(Arc::strong_count(&a), n + 2);
        // Every reference handed back is kept (an evicted block of calls
        // gives back thousands), and handed out again without a clone.
        let mut held: Vec<Arc<str>> = (0..1000).map(|_| d.intern(0, b"f\0\0\0")).collect();
        held.extend([c, e]);
        assert_eq!(Arc::strong_count(&a), n + 1002);
        for s in held.drain(..) {
            d.recycle(s);
        }
        assert_eq!(Arc::strong_count(&a), n + 1002);
        held.extend((0..1002).map(|_| d.intern(0, b"f\0\0\0")));
        assert!(held.iter().all(|s| Arc::ptr_eq(s, &a)));
        assert_eq!(Arc::strong_count(&a), n + 1002);
        held.push(d.intern(0, b"f\0\0\0"));
        assert_eq!(Arc::strong_count(&a), n + 1003);
        assert_eq!(&*d.intern(0, b"g\0"), "g");
        // A sweep gives the spares up (the table keeps what is held elsewhere),
        // and so does the decoder when dropped.
        for s in held.drain(..) {
            d.recycle(s);
        }
        d.sweep();
        assert_eq!(Arc::strong_count(&a), 2);
        let (b, c) = (d.intern(0, b"f\0\0\0"), d.intern(0, b"f\0\0\0"));
        d.recycle(b);
        d.recycle(c);
        drop(d);
        assert_eq!(Arc::strong_count(&a), 1);
    }

    #[test]
    fn new_strings_past_a_process_bound_are_folded_and_counted_others_keep_theirs() {
        use crate::string_bound::{OTHER, PROCESS_BYTES, TOTAL_BYTES, string_bytes};
        let mut d = Decoder::default();
        let file = |pid: u32, i: u64| format!("/hostile/{pid}/{i:04000}\0").into_bytes();
        let per_process = PROCESS_BYTES / string_bytes(file(1, 0).len() - 1);
        // Process 1: its first strings are kept, the rest folded; known ones still found.
        let mut held = vec![d.intern(1, &file(1, 0))];
        for i in 1..per_process + 10 {
            let s = d.intern(1, &file(1, i));
            assert_eq!(&*s == OTHER, i >= per_process, "string {i} of {per_process}");
            held.push(s);
        }
        assert!(Arc::ptr_eq(&held[0], &d.intern(1, &file(1, 0))));
        assert_eq!(d.bound.folded, 10);
        // Another process is not affected, and a record counts once.
        let good = d.intern(2, b"/good/app.py\0");
        assert_eq!(&*good, "/good/app.py");
        // Up to the total: processes 2.. fill it; strings still held are not swept.
        let mut pid = 2;
        while d.bound.bytes + string_bytes(file(pid, 0).len() - 1) <= TOTAL_BYTES {
            held.push(d.intern(pid, &file(pid, 0)));
            pid += 1;
        }
        let total = d.bound.bytes;
        assert_eq!(&*d.intern(pid, &file(pid, 0)), OTHER);
        assert_eq!(d.bound.sweeps, 1);
        assert_eq!(d.bound.bytes, total);
        // Once nothing else holds them, a sweep frees them: new strings are kept again.
        held.truncate(1);
        for i in 0..5000 {
            if &*d.intern(pid, &file(pid, i + 1)) != OTHER {
                break;
            }
        }
        assert_eq!(d.bound.sweeps, 2);
        assert!(d.bound.bytes < total / 2, "{} of {total}", d.bound.bytes);
        assert_eq!(&*d.intern(pid + 1, b"/good/b.py\0"), "/good/b.py");
        assert!(Arc::ptr_eq(&held[0], &d.intern(1, &file(1, 0))));
        assert!(Arc::ptr_eq(&good, &d.intern(2, b"/good/app.py\0")));
    }

    #[test]
    fn rejects_short_and_unknown_records_and_replaces_bad_utf8() {
        let mut d = Decoder::default();
        assert!(matches!(d.decode(&[0u8; 10]), Err(DecodeError::Size { .. })));
        assert!(matches!(d.decode(&raw(9, b"x")), Err(DecodeError::Kind(9))));
        let e = d.decode(&raw(kind::ENTRY, b"f\xffo")).unwrap();
        assert_eq!(&*e.name, "f\u{fffd}o");
        let e = d.decode(&raw(kind::ENTRY, b"a\x1b[2Jb")).unwrap();
        assert_eq!(&*e.name, "a\\x1b[2Jb");
    }
}
