//! The bound on the decoder's intern table: a traced process chooses its
//! file names (`compile(src, filename, ...)`, `CodeType.replace`), so
//! without one, 1,000,000 code objects with distinct 4,000-byte file names
//! would add ~8 GB to pftraced (each string is kept twice: the bytes as
//! received and the printable text).
//!
//! Each new distinct string is charged [`string_bytes`] to the process that
//! sent it, and to the table. Past [`PROCESS_BYTES`] for that process, or
//! [`TOTAL_BYTES`] for the table once strings nothing else holds any more
//! are swept out, a new string is not kept: the record names it
//! [`OTHER`] instead (counted as `strings_folded`, the process named in one
//! warning). Strings already known are found as before, so the calls of
//! well-behaved processes keep their names.

use crate::fast_hash::FastMap;

/// Bytes of new strings a process may add to the table: 4 MiB, about 500
/// distinct 4,000-byte file names, or 30,000 of a typical 60 bytes (the
/// in-process agent's own table has the same bound per process).
pub const PROCESS_BYTES: u64 = 4 << 20;

/// Bytes of strings the table holds in all: 64 MiB, sixteen processes at
/// their own bound.
pub const TOTAL_BYTES: u64 = 64 << 20;

/// What a record names a string that was not kept. Decoded strings have no
/// control characters ([`crate::events::printable`] escapes them), but a
/// process may send this text itself: it is counted then, not folded.
pub const OTHER: &str = "<other: over pftraced's string bound>";

/// Sweeps of unused strings when the table is full, at most one per this
/// many folded strings (a sweep walks the whole table).
const SWEEP_EVERY: u64 = 4096;

/// What one distinct string costs: its bytes twice (as received, and the
/// printable text), and 64 for the map's entry and two allocation headers.
pub const fn string_bytes(len: usize) -> u64 {
    2 * len as u64 + 64
}

/// One process's charge.
#[derive(Default)]
struct Charge {
    bytes: u64,
    warned: bool,
}

/// Per-process and total charges of the intern table.
#[derive(Default)]
pub struct StringBound {
    by_pid: FastMap<u32, Charge>,
    /// Bytes charged for the strings in the table.
    pub bytes: u64,
    /// Strings not kept (each time one is met).
    pub folded: u64,
    /// Call records with a string not kept (counted by the decoder).
    pub records_folded: u64,
    /// Sweeps of the table done, and the fold count at the last one.
    pub sweeps: u64,
    folded_at_sweep: u64,
}

/// What to do with a new string.
pub enum Verdict {
    Keep,
    /// The table is full: sweep it, then ask again.
    Sweep,
    Fold,
}

impl StringBound {
    /// Whether a new string of `len` bytes from `pid` may be kept (charged
    /// if so). `swept`: a sweep was just done.
    pub fn admit(&mut self, pid: u32, len: usize, swept: bool) -> Verdict {
        let cost = string_bytes(len);
        let charge = self.by_pid.entry(pid).or_default();
        let bound = if charge.bytes + cost > PROCESS_BYTES {
            format!("{} MiB of new names and file names a process", PROCESS_BYTES >> 20)
        } else if self.bytes + cost > TOTAL_BYTES {
            if !swept && (self.sweeps == 0 || self.folded >= self.folded_at_sweep + SWEEP_EVERY) {
                return Verdict::Sweep;
            }
            format!("{} MiB of names and file names in all", TOTAL_BYTES >> 20)
        } else {
            charge.bytes += cost;
            self.bytes += cost;
            return Verdict::Keep;
        };
        self.folded += 1;
        if !charge.warned {
            charge.warned = true;
            log::warn!(
                "pid {pid}: its distinct function and file names reached pftraced's bound of {bound}; \
                 calls with further new names are named {OTHER:?} (counted as strings_folded)"
            );
        }
        Verdict::Fold
    }

    /// A sweep freed `freed` bytes.
    pub fn swept(&mut self, freed: u64) {
        self.bytes -= freed;
        self.sweeps += 1;
        self.folded_at_sweep = self.folded;
    }

    /// Forgets a process's charge (it exec'd or exited; its strings stay
    /// while they are used, and count in the total).
    pub fn forget(&mut self, pid: u32) {
        self.by_pid.remove(&pid);
    }
}
