//! Decoding the agent's ring records ([`AgentEvent`], and [`AgentNamedEvent`]
//! for a code object's first report of an agent session) into the same
//! [`Event`]s USDT records become. The strings come once per code object
//! and session; they are kept per process, by the code object's serial, in a
//! bounded table (at most `agent::MAX_CODES` serials a process, the number
//! past which the agent sends the strings with every report, so no call of
//! a well-behaved agent is left unnamed), forgotten when the process execs
//! or exits, or when its agent starts a new session. Records are the
//! process's own word: it can only name its own calls. A record whose
//! serial has no strings here (one lost on a full ring, or a lying process)
//! is kept with the name [`UNKNOWN_NAME`] and counted ([`AgentNames::unnamed`],
//! shown in status and the summary as `agent_unnamed`).

use std::sync::Arc;

use pftrace_common::{AgentEvent, AgentNamedEvent, LONG_FILE_LEN, agent};

use crate::{
    events::{DecodeError, Decoder, Event, EventKind, page_size},
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

/// One process's code objects: serial -> (name, file).
type CodeStrings = FastMap<u64, (Arc<str>, Arc<str>)>;

/// The strings of agents' code objects, per process.
#[derive(Default)]
pub struct AgentNames {
    by_pid: FastMap<u32, CodeStrings>,
    /// Entries named [`UNKNOWN_NAME`] (their returns pair by code id).
    pub unnamed: u64,
    /// Strings not kept because the process's table was full (the agent
    /// then sends them with every report: not an error by itself).
    pub not_kept: u64,
}

impl AgentNames {
    /// Forgets a process (it exec'd or exited).
    pub fn forget(&mut self, pid: u32) {
        self.by_pid.remove(&pid);
    }
}

impl Decoder {
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
            self.agent.forget(raw.pid);
        }
        let mut file_cut = false;
        let strings = if raw.flags & agent::flag::STRINGS != 0 {
            let want = size_of::<AgentNamedEvent>();
            if bytes.len() < want {
                return Err(DecodeError::Size { got: bytes.len(), want });
            }
            let at = std::mem::offset_of!(AgentNamedEvent, name);
            let name = self.intern(&bytes[at..at + pftrace_common::NAME_LEN]);
            let at = std::mem::offset_of!(AgentNamedEvent, file);
            let file = self.intern(&bytes[at..at + LONG_FILE_LEN]);
            file_cut = raw.flags & agent::flag::FILE_CUT != 0;
            self.files_cut += u64::from(file_cut);
            let names = &mut self.agent;
            if !names.by_pid.contains_key(&raw.pid) && names.by_pid.len() >= MAX_PROCESSES {
                let evict = *names.by_pid.keys().next().expect("not empty");
                names.by_pid.remove(&evict);
            }
            let table = names.by_pid.entry(raw.pid).or_default();
            if table.len() < agent::MAX_CODES as usize || table.contains_key(&raw.code) {
                table.insert(raw.code, (name.clone(), file.clone()));
            } else {
                names.not_kept += 1;
            }
            Some((name, file))
        } else {
            self.agent.by_pid.get(&raw.pid).and_then(|t| t.get(&raw.code)).cloned()
        };
        let (name, file) = match strings {
            Some(s) => s,
            // A return pairs with its entry by code id and takes its name;
            // only an entry is named unknown here.
            None if kind == EventKind::Return => (self.intern(b""), self.intern(b"")),
            None => {
                self.agent.unnamed += 1;
                (self.intern(UNKNOWN_NAME.as_bytes()), self.intern(b""))
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

    fn named(event: u8, flags: u8, code: u64, pid: u32, name: &str, file: &str) -> Vec<u8> {
        let mut r = AgentNamedEvent {
            head: head(event, flags | agent::flag::STRINGS, code, pid),
            name: [0; NAME_LEN],
            file: [0; LONG_FILE_LEN],
        };
        r.name[..name.len()].copy_from_slice(name.as_bytes());
        r.file[..file.len()].copy_from_slice(file.as_bytes());
        // SAFETY: plain old data.
        unsafe {
            std::slice::from_raw_parts(
                (&r as *const AgentNamedEvent).cast::<u8>(),
                size_of::<AgentNamedEvent>(),
            )
        }
        .to_vec()
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
    }

    #[test]
    fn bounded_per_process_and_refuses_bad_records() {
        let mut d = Decoder::default();
        for code in 1..=agent::MAX_CODES as u64 + 5 {
            call(&mut d, &named(agent::START, 0, code, 100, "f", "/a.py"));
        }
        assert_eq!(d.agent.by_pid[&100].len(), agent::MAX_CODES as usize);
        assert_eq!(d.agent.not_kept, 5);
        // Past the cap the agent sends strings every time: still named.
        let e = call(&mut d, &named(agent::RETURN, 0, agent::MAX_CODES as u64 + 3, 100, "f", "/a.py"));
        assert_eq!(&*e.name, "f");
        assert!(matches!(d.decode_record(&short(0, 1, 100)), Err(DecodeError::Kind(0))));
        assert!(matches!(d.decode_record(&short(agent::LAST + 1, 1, 100)), Err(DecodeError::Kind(_))));
        let mut cut = named(agent::START, 0, 1, 100, "f", "/a.py");
        cut.truncate(size_of::<AgentEvent>() + 10);
        assert!(matches!(d.decode_record(&cut), Err(DecodeError::Size { .. })));
        assert!(matches!(d.decode_record(&short(agent::START, 1, 100)[..40]), Err(DecodeError::Size { .. })));
    }
}
