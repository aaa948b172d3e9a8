//! Decoding the agent's ring records ([`AgentEvent`], and [`AgentNamedEvent`]
//! or [`AgentLongNamedEvent`] for a code object's first report of an agent
//! session) into the same
//! [`Event`]s USDT records become. The strings come once per code object
//! and session; they are kept per process, by the code object's serial, in a
//! table bounded in entries (`agent::MAX_CODES` a process) and in bytes
//! ([`MAX_PROCESS_BYTES`] a process, [`MAX_TOTAL_BYTES`] in all), forgotten
//! when the process execs or exits, or when its agent starts a new session.
//! Records are the process's own word: it can only name its own calls, and
//! a hostile one makes pftraced keep no more than the bounds. A call whose
//! strings are not kept (past a bound: the record's strings are then not
//! taken either; one lost on a full ring; a lying process) is named
//! [`UNKNOWN_NAME`] and counted ([`AgentNames::unnamed`], shown in status
//! and the summary as `agent_unnamed`), never misnamed; a process that
//! passes a bound is named in a warning, once.

use std::sync::Arc;

use pftrace_common::{
    AgentBatchEvent, AgentEvent, AgentLongNamedEvent, AgentNamedEvent, BATCH_LEN, FILE_LEN, LONG_FILE_LEN,
    NAME_LEN, agent,
};

use crate::{
    events::{DecodeError, Decoder, Event, EventKind, nul_at, page_size},
    fast_hash::FastMap,
};

/// Bit set on an agent record's code id in [`Event::frame`]: no user-space
/// address has it, so agent records are told from CPython 3.15's frame
/// addresses (see [`super::pairs_by_code`]).
pub const CODE_ID_BIT: u64 = 1 << 63;

/// The name given to a call whose code object's strings never arrived.
pub const UNKNOWN_NAME: &str = "<unknown: name not received>";

/// Processes whose strings are kept at once, at most (beyond, a new one
/// evicts an arbitrary other: its calls would then be counted unnamed).
const MAX_PROCESSES: usize = 4096;

/// Bytes of strings kept per process (and agent session), charged
/// [`code_bytes`] a code object. 4 MiB: only traced code objects send
/// strings, typically under 300 bytes with the charge (about 14,000 of them
/// fit), while 65,536 entries of a 4 KB path would be 256 MiB. From 64
/// bytes of strings down, it comes before `agent::MAX_CODES`.
pub const MAX_PROCESS_BYTES: u64 = 4 << 20;

/// Bytes of strings kept for all processes together: 64 MiB, sixteen
/// processes at their own bound, or 4,096 (the most kept at once) at 16 KB,
/// some fifty traced functions each.
pub const MAX_TOTAL_BYTES: u64 = 64 << 20;

/// What keeping one code object's strings is charged: the bytes of its name
/// and file as the record has them, and 72 for the table's entry (serial,
/// two string handles, the charge) and the strings' allocation headers.
pub const fn code_bytes(name_len: usize, file_len: usize) -> u64 {
    (name_len + file_len) as u64 + 72
}

/// One process's code objects: serial -> (name, file, bytes charged).
type CodeStrings = FastMap<u64, (Arc<str>, Arc<str>, u64)>;

/// One process's table and what it holds.
#[derive(Default)]
struct Codes {
    strings: CodeStrings,
    /// Bytes charged for `strings` ([`code_bytes`] each).
    bytes: u64,
    /// Whether this process was named in a warning for a bound.
    warned: bool,
}

/// The strings of agents' code objects, per process.
#[derive(Default)]
pub struct AgentNames {
    by_pid: FastMap<u32, Codes>,
    /// Bytes charged in all tables.
    bytes: u64,
    /// Entries named [`UNKNOWN_NAME`] (their returns pair by code id).
    pub unnamed: u64,
    /// Records of a batch with an event number out of range (the
    /// process's word): skipped, and counted with pftraced's bad records.
    pub bad_events: u64,
    /// Strings not kept because a bound was reached (a well-behaved agent
    /// then sends them with every report: not an error by itself).
    pub not_kept: u64,
}

impl AgentNames {
    /// Forgets a process (it exec'd or exited).
    pub fn forget(&mut self, pid: u32) {
        if let Some(codes) = self.by_pid.remove(&pid) {
            self.bytes -= codes.bytes;
        }
    }

    /// A new agent session of `pid`: its strings are void, its warning stays.
    fn new_session(&mut self, pid: u32) {
        if let Some(codes) = self.by_pid.get_mut(&pid) {
            self.bytes -= codes.bytes;
            codes.bytes = 0;
            codes.strings = CodeStrings::default();
        }
    }

    /// The strings of `code` in `pid`'s table, if kept.
    fn get(&self, pid: u32, code: u64) -> Option<(Arc<str>, Arc<str>)> {
        self.by_pid.get(&pid).and_then(|t| t.strings.get(&code)).map(|(n, f, _)| (n.clone(), f.clone()))
    }

    /// Whether `code`'s strings (of `cost` bytes, [`code_bytes`]) may be
    /// kept for `pid`; if so they are charged and [`Self::insert`] follows.
    /// If not, an earlier entry of `code` goes too (its strings are not the
    /// process's latest word) and the first refusal of a process is warned.
    fn admit(&mut self, pid: u32, code: u64, cost: u64) -> bool {
        if !self.by_pid.contains_key(&pid) && self.by_pid.len() >= MAX_PROCESSES {
            let evict = *self.by_pid.keys().next().expect("not empty");
            self.forget(evict);
        }
        let codes = self.by_pid.entry(pid).or_default();
        if let Some((_, _, old)) = codes.strings.remove(&code) {
            codes.bytes -= old;
            self.bytes -= old;
        }
        let bound = if codes.strings.len() >= agent::MAX_CODES as usize {
            format!("{} code objects a process", agent::MAX_CODES)
        } else if codes.bytes + cost > MAX_PROCESS_BYTES {
            format!("{} MiB of names a process", MAX_PROCESS_BYTES >> 20)
        } else if self.bytes + cost > MAX_TOTAL_BYTES {
            format!("{} MiB of names in all", MAX_TOTAL_BYTES >> 20)
        } else {
            codes.bytes += cost;
            self.bytes += cost;
            return true;
        };
        self.not_kept += 1;
        if !codes.warned {
            codes.warned = true;
            log::warn!(
                "pid {pid}: the in-process agent's names reached pftraced's bound of {bound}; \
                 calls of further code objects are named {UNKNOWN_NAME:?} (counted as agent_unnamed)"
            );
        }
        false
    }

    /// Keeps strings [`Self::admit`] allowed.
    fn insert(&mut self, pid: u32, code: u64, strings: &(Arc<str>, Arc<str>), cost: u64) {
        if let Some(codes) = self.by_pid.get_mut(&pid) {
            codes.strings.insert(code, (strings.0.clone(), strings.1.clone(), cost));
        }
    }
}

impl Decoder {
    /// Whether an agent record is a batch (the batched road's [`AgentBatchEvent`]).
    pub fn is_agent_batch(&self, bytes: &[u8]) -> bool {
        bytes.get(std::mem::offset_of!(AgentEvent, flags)).is_some_and(|f| f & agent::flag::BATCH != 0)
    }

    /// Decodes a batch of the batched road ([`AgentBatchEvent`]) into the
    /// events it holds, in the order the thread made them: the same
    /// [`Event`]s as its two-report reports, paired the same way. Clock
    /// and CPU are the process's word (the agent stamped them), pid, tid
    /// and RSS (at the drain, for every event of the batch) the kernel's;
    /// names those of the code object's first report (two reports).
    pub fn decode_agent_batch(&mut self, bytes: &[u8]) -> Result<Vec<Event>, DecodeError> {
        let want = size_of::<AgentBatchEvent>();
        if bytes.len() < want {
            return Err(DecodeError::Size { got: bytes.len(), want });
        }
        // SAFETY: length checked; plain old data.
        let raw: AgentBatchEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        let (head, rss) = (raw.head, raw.head.rss_pages.saturating_mul(page_size()));
        let count = (raw.count as usize).min(BATCH_LEN);
        let mut out = Vec::with_capacity(count);
        for i in 0..count {
            let r = raw.records[((raw.tail + i as u64) % BATCH_LEN as u64) as usize];
            if r.event == 0 || r.event > agent::LAST {
                self.agent.bad_events += 1;
                continue;
            }
            let kind = if agent::is_entry(r.event) { EventKind::Entry } else { EventKind::Return };
            let (name, file) = match self.agent.get(head.pid, r.code) {
                Some(s) => s,
                // A return pairs with its entry by code id and takes its name.
                None if kind == EventKind::Return => (self.intern(head.pid, b""), self.intern(head.pid, b"")),
                None => {
                    self.agent.unnamed += 1;
                    (self.intern(head.pid, UNKNOWN_NAME.as_bytes()), self.intern(head.pid, b""))
                }
            };
            out.push(Event {
                ts_ns: r.ts_ns,
                pid: head.pid,
                tid: head.tid,
                kind,
                name,
                file,
                line: r.lineno,
                thread_cpu_ns: r.cpu_ns,
                rss_bytes: rss,
                frame: Some(r.code | CODE_ID_BIT),
                generator: false,
                file_cut: false,
                file_ptr: None,
                name_ptr: None,
                name_not_read: false,
            });
        }
        Ok(out)
    }

    /// Decodes an agent record (kind AGENT).
    pub fn decode_agent(&mut self, bytes: &[u8]) -> Result<Event, DecodeError> {
        let want = size_of::<AgentEvent>();
        if bytes.len() < want {
            return Err(DecodeError::Size { got: bytes.len(), want });
        }
        // SAFETY: length checked; AgentEvent is plain old data.
        let raw: AgentEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        if raw.event == 0 || raw.event > agent::LAST {
            return Err(DecodeError::Kind(raw.event));
        }
        let kind = if agent::is_entry(raw.event) { EventKind::Entry } else { EventKind::Return };
        if raw.flags & agent::flag::SESSION != 0 {
            self.agent.new_session(raw.pid);
        }
        let mut file_cut = false;
        let strings = if raw.flags & agent::flag::STRINGS != 0 {
            // The long record's file name goes on past the common one's.
            let (want, file_len) = if raw.flags & agent::flag::LONG != 0 {
                (size_of::<AgentLongNamedEvent>(), LONG_FILE_LEN)
            } else {
                (size_of::<AgentNamedEvent>(), FILE_LEN)
            };
            if bytes.len() < want {
                return Err(DecodeError::Size { got: bytes.len(), want });
            }
            let at = std::mem::offset_of!(AgentNamedEvent, name);
            let name = &bytes[at..at + NAME_LEN];
            let at = std::mem::offset_of!(AgentNamedEvent, file);
            let file = &bytes[at..at + file_len];
            file_cut = raw.flags & agent::flag::FILE_CUT != 0;
            self.files_cut += u64::from(file_cut);
            let cost = code_bytes(nul_at(name), nul_at(file));
            // Interned (pftraced's filter caches its answers by the strings'
            // addresses) only when kept: past a bound they are not taken.
            self.agent.admit(raw.pid, raw.code, cost).then(|| {
                let folded = self.bound.folded;
                let strings = (self.intern(raw.pid, name), self.intern(raw.pid, file));
                self.bound.records_folded += u64::from(self.bound.folded != folded);
                self.agent.insert(raw.pid, raw.code, &strings, cost);
                strings
            })
        } else {
            self.agent.get(raw.pid, raw.code)
        };
        let (name, file) = match strings {
            Some(s) => s,
            // A return pairs with its entry by code id and takes its name;
            // only an entry is named unknown here.
            None if kind == EventKind::Return => (self.intern(raw.pid, b""), self.intern(raw.pid, b"")),
            None => {
                self.agent.unnamed += 1;
                (self.intern(raw.pid, UNKNOWN_NAME.as_bytes()), self.intern(raw.pid, b""))
            }
        };
        Ok(Event {
            ts_ns: raw.ts_ns,
            pid: raw.pid,
            tid: raw.tid,
            kind,
            name,
            file,
            line: raw.lineno,
            thread_cpu_ns: raw.thread_cpu_ns,
            rss_bytes: raw.rss_pages.saturating_mul(page_size()),
            frame: Some(raw.code | CODE_ID_BIT),
            generator: false,
            file_cut,
            file_ptr: None,
            name_ptr: None,
            name_not_read: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Record;
    use pftrace_common::{NAME_LEN, kind};

    fn head(event: u8, flags: u8, code: u64, pid: u32) -> AgentEvent {
        AgentEvent {
            ts_ns: 10,
            pid,
            tid: pid + 1,
            lineno: 3,
            kind: kind::AGENT,
            event,
            flags,
            _pad: 0,
            thread_cpu_ns: 5,
            rss_pages: 2,
            code,
        }
    }

    fn short(event: u8, code: u64, pid: u32) -> Vec<u8> {
        let h = head(event, 0, code, pid);
        // SAFETY: plain old data.
        unsafe { std::slice::from_raw_parts((&h as *const AgentEvent).cast::<u8>(), size_of::<AgentEvent>()) }
            .to_vec()
    }

    /// A record with strings: the common one, or the long one when the
    /// file does not fit (as the kernel writes them).
    fn named(event: u8, flags: u8, code: u64, pid: u32, name: &str, file: &str) -> Vec<u8> {
        let long = file.len() >= FILE_LEN;
        let flags = flags | agent::flag::STRINGS | if long { agent::flag::LONG } else { 0 };
        let mut r = AgentLongNamedEvent {
            head: AgentNamedEvent {
                head: head(event, flags, code, pid),
                name: [0; NAME_LEN],
                file: [0; FILE_LEN],
            },
            more: [0; LONG_FILE_LEN - FILE_LEN],
        };
        r.head.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: plain old data; file and more are one buffer.
        let mut bytes = unsafe {
            std::slice::from_raw_parts(
                (&r as *const AgentLongNamedEvent).cast::<u8>(),
                size_of::<AgentLongNamedEvent>(),
            )
        }
        .to_vec();
        let at = std::mem::offset_of!(AgentNamedEvent, file);
        bytes[at..at + file.len()].copy_from_slice(file.as_bytes());
        bytes.truncate(if long { size_of::<AgentLongNamedEvent>() } else { size_of::<AgentNamedEvent>() });
        bytes
    }

    fn call(d: &mut Decoder, bytes: &[u8]) -> Event {
        match d.decode_record(bytes).unwrap() {
            Record::Call(e) => e,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn strings_once_then_by_serial_per_process_and_session() {
        let mut d = Decoder::default();
        let e = call(&mut d, &named(agent::START, agent::flag::SESSION, 7, 100, "work", "/a.py"));
        assert_eq!(
            (&*e.name, &*e.file, e.kind, e.frame),
            ("work", "/a.py", EventKind::Entry, Some(7 | CODE_ID_BIT))
        );
        let r = call(&mut d, &short(agent::RETURN, 7, 100));
        assert_eq!((&*r.name, r.kind, r.rss_bytes), ("work", EventKind::Return, 2 * page_size()));
        assert!(super::super::pairs_by_code(&r) && !super::super::pairs_by_code(&e));
        // Another process's serial 7 is not this one's.
        let other = call(&mut d, &short(agent::START, 7, 200));
        assert_eq!(&*other.name, UNKNOWN_NAME);
        assert_eq!(d.agent.unnamed, 1);
        // A new session of pid 100 voids its strings; the session's first
        // record brings new ones.
        let e = call(&mut d, &named(agent::START, agent::flag::SESSION, 8, 100, "other", "/b.py"));
        assert_eq!(&*e.name, "other");
        assert_eq!(&*call(&mut d, &short(agent::START, 7, 100)).name, UNKNOWN_NAME);
        assert_eq!(&*call(&mut d, &short(agent::START, 8, 100)).name, "other");
        assert_eq!(d.agent.unnamed, 2);
        // Exit forgets the process.
        let exit = pftrace_common::ProcEvent {
            ts_ns: 1,
            pid: 100,
            tid: 100,
            parent: 0,
            kind: kind::EXIT,
            _pad: [0; 3],
            cgroup_id: 0,
        };
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&exit as *const pftrace_common::ProcEvent).cast::<u8>(),
                size_of::<pftrace_common::ProcEvent>(),
            )
        };
        d.decode_record(bytes).unwrap();
        assert!(d.agent.by_pid.is_empty());
        assert_eq!(d.agent.bytes, 0);
    }

    #[test]
    fn bounded_in_bytes_per_process_and_in_all() {
        let mut d = Decoder::default();
        let file = "/".repeat(LONG_FILE_LEN - 1);
        let cost = code_bytes(4, LONG_FILE_LEN - 1);
        assert_eq!(cost, 4 + 4095 + 72);
        let per_process = MAX_PROCESS_BYTES / cost;
        let named_long =
            |d: &mut Decoder, code, pid| call(d, &named(agent::START, 0, code, pid, "work", &file));
        // One process: up to its bound; past it the call is unknown, its
        // record's strings not taken, and later reports unknown too.
        for code in 1..=per_process {
            assert_eq!(&*named_long(&mut d, code, 100).name, "work");
        }
        for code in per_process + 1..=per_process + 3 {
            let e = named_long(&mut d, code, 100);
            assert_eq!((&*e.name, &*e.file), (UNKNOWN_NAME, ""));
        }
        assert_eq!(d.agent.by_pid[&100].strings.len() as u64, per_process);
        assert_eq!(d.agent.by_pid[&100].bytes, per_process * cost);
        assert_eq!((d.agent.not_kept, d.agent.unnamed), (3, 3));
        assert_eq!(&*call(&mut d, &short(agent::START, per_process, 100)).name, "work");
        assert_eq!(&*call(&mut d, &short(agent::START, per_process + 1, 100)).name, UNKNOWN_NAME);
        assert_eq!(d.agent.unnamed, 4);
        // A return of such a call pairs by code id (no name of its own).
        assert_eq!(&*call(&mut d, &short(agent::RETURN, per_process + 1, 100)).name, "");
        // In all: sixteen processes at their bound fill MAX_TOTAL_BYTES but
        // for less than one entry a process.
        let pids: Vec<u32> = (101..116).collect();
        for &pid in &pids {
            for code in 1..=per_process {
                named_long(&mut d, code, pid);
            }
        }
        assert_eq!(d.agent.bytes, 16 * per_process * cost);
        let room = (MAX_TOTAL_BYTES - d.agent.bytes) / cost;
        for code in 1..=room + 2 {
            named_long(&mut d, code, 200);
        }
        assert_eq!(d.agent.by_pid[&200].strings.len() as u64, room);
        assert_eq!(d.agent.not_kept, 3 + 2);
        assert!(d.agent.bytes <= MAX_TOTAL_BYTES);
        // A process forgotten gives its bytes back; a new session too.
        d.agent.forget(101);
        assert_eq!(d.agent.bytes, (15 * per_process + room) * cost);
        call(&mut d, &named(agent::START, agent::flag::SESSION, 1, 102, "w", "/a.py"));
        assert_eq!(d.agent.bytes, (14 * per_process + room) * cost + code_bytes(1, 5));
        assert_eq!(d.agent.by_pid[&102].strings.len(), 1);
        // A serial sent again replaces its strings and their charge.
        call(&mut d, &named(agent::START, 0, 1, 102, "w2", "/a.py"));
        assert_eq!(&*call(&mut d, &short(agent::START, 1, 102)).name, "w2");
        assert_eq!(d.agent.by_pid[&102].bytes, code_bytes(2, 5));
        for pid in pids[2..].iter().copied().chain([100, 102, 200]) {
            d.agent.forget(pid);
        }
        assert_eq!((d.agent.bytes, d.agent.by_pid.len()), (0, 0));
    }

    #[test]
    fn bounded_per_process_and_refuses_bad_records() {
        let mut d = Decoder::default();
        // At 78 bytes an entry the byte bound comes before MAX_CODES.
        let fit = MAX_PROCESS_BYTES / code_bytes(1, 5);
        assert!(fit < agent::MAX_CODES as u64);
        for code in 1..=fit + 5 {
            call(&mut d, &named(agent::START, 0, code, 100, "f", "/a.py"));
        }
        assert_eq!(d.agent.by_pid[&100].strings.len() as u64, fit);
        assert_eq!((d.agent.not_kept, d.agent.unnamed), (5, 5));
        assert!(matches!(d.decode_record(&short(0, 1, 100)), Err(DecodeError::Kind(0))));
        assert!(matches!(d.decode_record(&short(agent::LAST + 1, 1, 100)), Err(DecodeError::Kind(_))));
        let mut cut = named(agent::START, 0, 1, 100, "f", "/a.py");
        cut.truncate(size_of::<AgentEvent>() + 10);
        assert!(matches!(d.decode_record(&cut), Err(DecodeError::Size { .. })));
        // The common record holds a file of FILE_LEN - 1 bytes; a longer one
        // comes in the long record, which must be whole.
        let mut d = Decoder::default();
        for (code, len) in [(1, FILE_LEN - 1), (2, FILE_LEN), (3, LONG_FILE_LEN - 1)] {
            let r = named(agent::START, 0, code, 7, "f", &"a".repeat(len));
            let long = len >= FILE_LEN;
            assert_eq!(r.len(), if long { 4208 } else { 304 });
            assert_eq!(call(&mut d, &r).file.len(), len);
            assert_eq!(call(&mut d, &short(agent::START, code, 7)).file.len(), len);
        }
        let mut cut = named(agent::START, 0, 4, 7, "f", &"a".repeat(FILE_LEN));
        cut.truncate(size_of::<AgentNamedEvent>());
        assert!(matches!(d.decode_record(&cut), Err(DecodeError::Size { .. })));
        assert!(matches!(d.decode_record(&short(agent::START, 1, 100)[..40]), Err(DecodeError::Size { .. })));
    }
}
