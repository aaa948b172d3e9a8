//! One call of the spill (`spill.rs`) as a short record: each field a
//! LEB128 varint, most of them taken as the difference from the previous
//! call of the same spill (times, ids, pid, RSS) or from another field of
//! the same call (end from start, tid from pid, parent from id), so a call
//! of a dense loop takes 18 bytes (with its tag and length) instead of the
//! 83 of `call_record.rs`'s fixed-size record.
//!
//! Why: in the dense bench's profile (perf, 1 M calls on CPython 3.9),
//! writing the fixed-size entries was the largest single cost on the event
//! loop: the kernel's copy into the page cache
//! (`copy_folio_from_iter_atomic`) 17% of pftraced's CPU while receiving,
//! and ext4's write path a few % more, all of it in proportion to the bytes.
//! Spilling 1 M calls of that loop's shape (ext4, one thread's CPU time, 5
//! rounds): 48-51 ms as fixed-size records, 33-35 ms as these.
//!
//! Differences are taken with wrapping arithmetic and stored zigzag-encoded,
//! so every value round-trips exactly whatever order calls complete in. A
//! record is read from its own bytes ([`Delta::decode`]) and refused,
//! never misread, when a varint runs past them or past 10 bytes.

use std::{io, mem::MaybeUninit, sync::Arc};

#[cfg(test)]
use super::call_record::StringIds;
use crate::pairing::{Call, CallEnd};

/// Bytes of the longest record: a flags byte and 14 varints of up to 10 bytes.
pub const MAX_RECORD_BYTES: usize = 1 + 14 * 10;

/// Flag bits of a record's first byte.
const INCOMPLETE: u8 = 1;
const HAS_CPU: u8 = 2;
const HAS_PARENT: u8 = 4;
const KNOWN_FLAGS: u8 = INCOMPLETE | HAS_CPU | HAS_PARENT;

/// What the next record is a difference from: the previous call's fields.
/// The writer and the reader of one spill each keep one, in step.
#[derive(Debug, Default, Clone)]
pub struct Delta {
    pid: u32,
    start_ns: u64,
    id: u64,
    rss_entry_bytes: u64,
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    (v >> 1) as i64 ^ -((v & 1) as i64)
}

/// Writes `v` as a LEB128 varint at `out[*at..]`, every byte up to the new `*at`.
fn put(out: &mut [MaybeUninit<u8>; MAX_RECORD_BYTES], at: &mut usize, mut v: u64) {
    while v >= 0x80 {
        out[*at] = MaybeUninit::new(v as u8 | 0x80);
        *at += 1;
        v >>= 7;
    }
    out[*at] = MaybeUninit::new(v as u8);
    *at += 1;
}

/// A record's bytes, read from the front.
struct Fields<'a> {
    bytes: &'a [u8],
}

impl Fields<'_> {
    fn next(&mut self) -> io::Result<u64> {
        let mut v = 0u64;
        for (i, &b) in self.bytes.iter().enumerate().take(10) {
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                self.bytes = &self.bytes[i + 1..];
                return Ok(v);
            }
        }
        Err(bad("a number runs past its record"))
    }

    fn next_u32(&mut self) -> io::Result<u32> {
        u32::try_from(self.next()?).map_err(|_| bad("a 32-bit field over 32 bits"))
    }

    fn string(&mut self, table: &[Arc<str>]) -> io::Result<Arc<str>> {
        let id = self.next()?;
        usize::try_from(id)
            .ok()
            .and_then(|i| table.get(i))
            .cloned()
            .ok_or_else(|| bad(format!("string id {id} not in the table")))
    }
}

fn bad(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("a spilled call record: {what}"))
}

impl Delta {
    /// `call` as a record in `out`, returning its length; its new strings
    /// get ids in `strings` (the tests' form of [`Self::encode_with`]).
    #[cfg(test)]
    pub fn encode(
        &mut self,
        call: &Call,
        strings: &mut StringIds,
        out: &mut [u8; MAX_RECORD_BYTES],
    ) -> usize {
        let ids = (strings.id(&call.name), strings.id(&call.file));
        let mut record = [MaybeUninit::new(0); MAX_RECORD_BYTES];
        let n = self.encode_with(call, ids, &mut record);
        for (o, r) in out.iter_mut().zip(&record) {
            // SAFETY: every byte of `record` was initialised (to 0, then by encode_with).
            *o = unsafe { r.assume_init() };
        }
        n
    }

    /// As [`Self::encode`], with the ids of its name and file already
    /// made: the spill makes them first (their entries go before the
    /// record), and looking them up again was half of `StringIds::id`'s
    /// samples (4.4% of the dense loop's). Writes every byte of `out[..n]`
    /// and returns n; `out` may be uninitialised room (the spill's buffer:
    /// zeroing it first was a memset of 143 bytes a call, 1.3% of samples).
    pub fn encode_with(
        &mut self,
        call: &Call,
        (name, file): (u32, u32),
        out: &mut [MaybeUninit<u8>; MAX_RECORD_BYTES],
    ) -> usize {
        let flag = |set: bool, bit: u8| if set { bit } else { 0 };
        let flags = flag(call.end == CallEnd::Incomplete, INCOMPLETE)
            | flag(call.cpu_ns.is_some(), HAS_CPU)
            | flag(call.parent != 0, HAS_PARENT);
        out[0] = MaybeUninit::new(flags);
        let mut at = 1;
        let diff = |a: u64, b: u64| zigzag(a.wrapping_sub(b) as i64);
        put(out, &mut at, zigzag(i64::from(call.pid.wrapping_sub(self.pid) as i32)));
        put(out, &mut at, zigzag(i64::from(call.tid.wrapping_sub(call.pid) as i32)));
        put(out, &mut at, u64::from(name));
        put(out, &mut at, u64::from(file));
        put(out, &mut at, zigzag(i64::from(call.line)));
        put(out, &mut at, diff(call.start_ns, self.start_ns));
        put(out, &mut at, diff(call.end_ns, call.start_ns));
        put(out, &mut at, u64::from(call.depth));
        put(out, &mut at, diff(call.id, self.id));
        if call.parent != 0 {
            put(out, &mut at, diff(call.id, call.parent));
        }
        if let Some(cpu) = call.cpu_ns {
            put(out, &mut at, cpu);
        }
        put(out, &mut at, diff(call.rss_entry_bytes, self.rss_entry_bytes));
        put(out, &mut at, diff(call.rss_return_bytes, call.rss_entry_bytes));
        *self = Delta {
            pid: call.pid,
            start_ns: call.start_ns,
            id: call.id,
            rss_entry_bytes: call.rss_entry_bytes,
        };
        at
    }

    /// The call of a whole record, its strings from `table`.
    pub fn decode(&mut self, record: &[u8], table: &[Arc<str>]) -> io::Result<Call> {
        let (&flags, rest) = record.split_first().ok_or_else(|| bad("an empty record"))?;
        if flags & !KNOWN_FLAGS != 0 {
            return Err(bad(format!("flags {flags:#x}")));
        }
        let mut f = Fields { bytes: rest };
        let undiff = |base: u64, v: u64| base.wrapping_add(unzigzag(v) as u64);
        let pid = self.pid.wrapping_add(i32::try_from(unzigzag(f.next()?)).map_err(|_| bad("a pid"))? as u32);
        let tid = pid.wrapping_add(i32::try_from(unzigzag(f.next()?)).map_err(|_| bad("a tid"))? as u32);
        let name = f.string(table)?;
        let file = f.string(table)?;
        let line = i32::try_from(unzigzag(f.next()?)).map_err(|_| bad("a line number"))?;
        let start_ns = undiff(self.start_ns, f.next()?);
        let end_ns = undiff(start_ns, f.next()?);
        let depth = f.next_u32()?;
        let id = undiff(self.id, f.next()?);
        let parent = if flags & HAS_PARENT != 0 { id.wrapping_sub(unzigzag(f.next()?) as u64) } else { 0 };
        let cpu_ns = if flags & HAS_CPU != 0 { Some(f.next()?) } else { None };
        let rss_entry_bytes = undiff(self.rss_entry_bytes, f.next()?);
        let rss_return_bytes = undiff(rss_entry_bytes, f.next()?);
        if !f.bytes.is_empty() {
            return Err(bad(format!("{} bytes after its last field", f.bytes.len())));
        }
        *self = Delta { pid, start_ns, id, rss_entry_bytes };
        Ok(Call {
            pid,
            tid,
            name,
            file,
            line,
            start_ns,
            end_ns,
            depth,
            id,
            parent,
            end: if flags & INCOMPLETE != 0 { CallEnd::Incomplete } else { CallEnd::Returned },
            cpu_ns,
            rss_entry_bytes,
            rss_return_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::spill::tests::{call, same};

    #[test]
    fn extremes_and_out_of_order_calls_round_trip_exactly() {
        let mut calls: Vec<Call> = (0..1000).map(call).collect();
        // Completion order is not entry order; values at the ends of their ranges.
        calls.swap(3, 700);
        let mut odd = call(5);
        (odd.pid, odd.tid, odd.line, odd.depth) = (u32::MAX, 0, i32::MIN, u32::MAX);
        (odd.start_ns, odd.end_ns, odd.id, odd.parent) = (u64::MAX, 0, 1, u64::MAX);
        (odd.cpu_ns, odd.rss_entry_bytes, odd.rss_return_bytes) = (Some(u64::MAX), u64::MAX, 0);
        calls.insert(10, odd.clone());
        calls.push(Call { line: i32::MAX, start_ns: 0, end_ns: u64::MAX, parent: 0, ..odd });
        let mut ids = StringIds::default();
        let (mut writer, mut reader) = (Delta::default(), Delta::default());
        let mut buf = [0u8; MAX_RECORD_BYTES];
        let mut longest = 0;
        for c in &calls {
            let n = writer.encode(c, &mut ids, &mut buf);
            longest = longest.max(n);
            let back = reader.decode(&buf[..n], ids.table()).unwrap();
            assert!(same(c, &back), "{c:?} came back as {back:?}");
        }
        assert!(longest <= MAX_RECORD_BYTES);
        // The test calls of spill.rs: a few bytes each, not 92.
        let n = Delta::default().encode(&call(1), &mut ids, &mut buf);
        assert!(n <= 20, "{n} bytes");
    }

    #[test]
    fn damaged_records_are_refused() {
        let mut ids = StringIds::default();
        let mut buf = [0u8; MAX_RECORD_BYTES];
        let n = Delta::default().encode(&call(1), &mut ids, &mut buf);
        let table = ids.table();
        let err = |bytes: &[u8]| Delta::default().decode(bytes, table).unwrap_err().to_string();
        assert_eq!(err(&buf[..n - 1]), "a spilled call record: a number runs past its record");
        assert_eq!(err(&[]), "a spilled call record: an empty record");
        let mut longer = buf[..n].to_vec();
        longer.push(0);
        assert_eq!(err(&longer), "a spilled call record: 1 bytes after its last field");
        assert_eq!(err(&[0x80, 0, 0]), "a spilled call record: flags 0x80");
        // A string id past the table; a varint of 11 bytes.
        assert_eq!(err(&[0, 0, 0, 9]), "a spilled call record: string id 9 not in the table");
        assert_eq!(
            err(&[0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1]),
            err(&buf[..n - 1])
        );
    }
}
