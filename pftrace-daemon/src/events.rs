//! Decoding the kernel's raw CallEvent records (and the long variant for
//! file names over 191 bytes) into owned events, with function and file
//! names interned (each distinct name is one allocation) and read as
//! untrusted bytes: bounded, invalid UTF-8 replaced.

use std::sync::Arc;

use crate::fast_hash::FastMap;
use pftrace_common::{CallEvent, FILE_LEN, KIND_OFFSET, LongCallEvent, ProcEvent, flag, kind};

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
}

/// A new process in scope (it called execve).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecEvent {
    pub ts_ns: u64,
    pub pid: u32,
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
    /// Call records whose file name filled PATH_MAX bytes (it may be cut:
    /// a path qualifier cannot be checked on it).
    pub files_cut: u64,
    /// The strings of in-process agents' code objects (agent/records.rs).
    pub agent: crate::agent::records::AgentNames,
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
                if k != kind::FORK {
                    self.agent.forget(raw.pid);
                }
                Ok(match k {
                    kind::EXEC => {
                        Record::Exec(ExecEvent { ts_ns: raw.ts_ns, pid: raw.pid, cgroup_id: raw.cgroup_id })
                    }
                    kind::FORK => {
                        Record::Fork(ForkEvent { ts_ns: raw.ts_ns, pid: raw.pid, parent: raw.parent })
                    }
                    _ => Record::Exit(ExitEvent { ts_ns: raw.ts_ns, pid: raw.pid }),
                })
            }
            Some(&kind::AGENT) => self.decode_agent(bytes).map(Record::Call),
            _ => self.decode(bytes).map(Record::Call),
        }
    }

    /// Decodes a call record, common or long.
    pub fn decode(&mut self, bytes: &[u8]) -> Result<Event, DecodeError> {
        let want = size_of::<CallEvent>();
        if bytes.len() < want {
            return Err(DecodeError::Size { got: bytes.len(), want });
        }
        // SAFETY: length checked; CallEvent is plain old data; read_unaligned
        // makes no alignment assumption about the ring buffer.
        let raw: CallEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        let kind = match raw.kind {
            kind::ENTRY => EventKind::Entry,
            kind::RETURN => EventKind::Return,
            other => return Err(DecodeError::Kind(other)),
        };
        self.files_cut += u64::from(raw.flags & flag::FILE_CUT != 0);
        let file = if raw.flags & flag::LONG != 0 {
            let want = size_of::<LongCallEvent>();
            if bytes.len() < want {
                return Err(DecodeError::Size { got: bytes.len(), want });
            }
            // The file name starts in the common part and goes on in `more`.
            let at = std::mem::offset_of!(CallEvent, file);
            self.intern(&bytes[at..at + pftrace_common::LONG_FILE_LEN])
        } else {
            debug_assert_eq!(raw.file.len(), FILE_LEN);
            self.intern(&raw.file)
        };
        Ok(Event {
            ts_ns: raw.ts_ns,
            pid: raw.pid,
            tid: raw.tid,
            kind,
            name: self.intern(&raw.name),
            file,
            line: raw.lineno,
            thread_cpu_ns: raw.thread_cpu_ns,
            rss_bytes: raw.rss_pages.saturating_mul(page_size()),
            frame: (raw.flags & flag::FRAME != 0).then_some(raw.frame),
            generator: raw.flags & flag::GENERATOR != 0,
            file_cut: raw.flags & flag::FILE_CUT != 0,
        })
    }

    /// The string up to the first NUL, shared with earlier identical strings.
    pub fn intern(&mut self, padded: &[u8]) -> Arc<str> {
        let end = memchr::memchr(0, padded).unwrap_or(padded.len());
        let bytes = &padded[..end];
        if let Some(s) = self.strings.get(bytes) {
            return s.clone();
        }
        let s: Arc<str> = Arc::from(printable(&String::from_utf8_lossy(bytes)).as_ref());
        self.strings.insert(bytes.into(), s.clone());
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pftrace_common::NAME_LEN;

    fn raw(kind: u8, name: &[u8]) -> Vec<u8> {
        let mut ev = CallEvent {
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
            name: [0; NAME_LEN],
            file: [0; FILE_LEN],
        };
        ev.name[..name.len()].copy_from_slice(name);
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
    }

    #[test]
    fn long_records_carry_the_whole_file_name_and_frames_their_address() {
        let path: String = "/d".repeat(1500) + "/m.py"; // 3005 bytes
        let mut bytes = raw(kind::ENTRY, b"f");
        bytes[std::mem::offset_of!(CallEvent, flags)] = flag::LONG | flag::FRAME;
        bytes[std::mem::offset_of!(CallEvent, frame)..][..8].copy_from_slice(&0x7f00_1234u64.to_ne_bytes());
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
