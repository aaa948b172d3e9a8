//! Per-function figures, from one streaming aggregator: calls, incomplete
//! calls, total, mean and max exactly, and p50 / p95 / p99 from a
//! log-linear histogram whose memory does not grow with the number of calls.
//!
//! The daemon feeds every completed call into one [`Aggregator`] (so the
//! final summary and `pftracectl stats` count every call, also when memory
//! holds only the last `limits.max_calls_in_memory`); `stats` with a filter
//! feeds the calls in memory it selects into a fresh one.
//!
//! Percentiles are nearest-rank (the smallest duration with at least p% of
//! the calls at or below it), reported as the middle of the histogram bucket
//! holding it, clamped to the exact minimum and maximum (which are reported
//! exactly when the rank is the first or the last): durations below
//! 128 ns are exact, and above, a bucket is 1/128 of its lower bound wide,
//! so a percentile is within [`PERCENTILE_ERROR`] (1/256, 0.4%) of the
//! exact value. hdrhistogram gives the same precision but allocates every
//! bucket up front (58 KiB per histogram at 2 significant digits); here a
//! block of 128 buckets (1 KiB) is made only for the powers of two the
//! durations reach (typically 5–10 per function).

use std::{collections::HashMap, sync::Arc};

use pftrace_code::CodeInfo;

use crate::{
    codes::{CodeKey, CodeTable},
    pairing::{Call, CallEnd},
    protocol::{FunctionSeen, FunctionStats, StatsGrouping},
};

/// The most a reported percentile differs from the exact one, relative to it.
pub const PERCENTILE_ERROR: f64 = 1.0 / 256.0;

/// Buckets per power of two (and the values below which buckets are exact).
const SUB_BITS: u32 = 7;
const SUB: u64 = 1 << SUB_BITS;
/// Block 0 holds 0..128 exactly; block b >= 1 holds [2^(b+6), 2^(b+7)).
const BLOCKS: usize = 64 - SUB_BITS as usize + 1;

/// Durations in ns, with exact count, total, minimum and maximum.
#[derive(Debug, Clone)]
pub struct Histogram {
    blocks: Vec<Option<Box<[u64; SUB as usize]>>>,
    count: u64,
    total: u64,
    min: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self { blocks: vec![None; BLOCKS], count: 0, total: 0, min: u64::MAX, max: 0 }
    }
}

/// (block, slot) of a value.
fn bucket(v: u64) -> (usize, usize) {
    if v < SUB {
        return (0, v as usize);
    }
    let exp = 63 - v.leading_zeros(); // >= SUB_BITS
    let shift = exp - SUB_BITS;
    ((shift + 1) as usize, ((v >> shift) - SUB) as usize)
}

/// The value a bucket stands for: its middle (exact in block 0).
fn representative(block: usize, slot: usize) -> u64 {
    if block == 0 {
        return slot as u64;
    }
    let shift = block as u32 - 1;
    let low = (SUB + slot as u64) << shift;
    let width = 1u64 << shift;
    low + (width - 1) / 2
}

impl Histogram {
    pub fn record(&mut self, v: u64) {
        let (block, slot) = bucket(v);
        self.blocks[block].get_or_insert_with(|| Box::new([0; SUB as usize]))[slot] += 1;
        self.count += 1;
        self.total = self.total.saturating_add(v);
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    /// Adds every value recorded in `other` (exactly: the same buckets).
    pub fn merge(&mut self, other: &Histogram) {
        for (mine, theirs) in self.blocks.iter_mut().zip(&other.blocks) {
            if let Some(theirs) = theirs {
                let mine = mine.get_or_insert_with(|| Box::new([0; SUB as usize]));
                for (m, t) in mine.iter_mut().zip(theirs.iter()) {
                    *m += t;
                }
            }
        }
        self.count += other.count;
        self.total = self.total.saturating_add(other.total);
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// Nearest-rank percentile `p` (0-100), within [`PERCENTILE_ERROR`]; 0 when empty.
    pub fn percentile(&self, p: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((p / 100.0) * self.count as f64).ceil().clamp(1.0, self.count as f64) as u64;
        // The ends are known exactly.
        if rank == self.count {
            return self.max;
        }
        if rank == 1 {
            return self.min;
        }
        let mut seen = 0;
        for (b, block) in self.blocks.iter().enumerate() {
            let Some(block) = block else { continue };
            for (s, &n) in block.iter().enumerate() {
                seen += n;
                if seen >= rank {
                    return representative(b, s).clamp(self.min, self.max);
                }
            }
        }
        self.max
    }
}

/// The figures of one code object (name, file, entry line; and process,
/// when asked per process).
#[derive(Debug, Clone)]
struct Group {
    function: Arc<str>,
    file: Arc<str>,
    line: i32,
    pid: Option<u32>,
    /// The first process seen calling it: whose answer names it.
    first_pid: u32,
    durations: Histogram,
    incomplete: u64,
}

/// (function, file, entry line, pid) as given.
type TextKey = (Arc<str>, Arc<str>, i32, Option<u32>);
/// The addresses of a call's function and file strings, its line and pid.
type AddressKey = (usize, usize, i32, Option<u32>);
/// A group's index, and the strings whose addresses key it (held so the
/// addresses cannot be reused while they are keys).
type AddressEntry = (usize, Arc<str>, Arc<str>);

/// The groups one row merges, its line and what its function is.
struct Row {
    groups: Vec<usize>,
    line: Option<i32>,
    info: Option<Arc<CodeInfo>>,
}

/// Per-function (optionally per-process) figures of the calls pushed in.
#[derive(Debug, Default, Clone)]
pub struct Aggregator {
    per_pid: bool,
    groups: Vec<Group>,
    by_text: HashMap<TextKey, usize>,
    /// The same, keyed by the strings' addresses: the decoder interns names,
    /// so this finds a call's group without hashing its strings.
    by_address: crate::fast_hash::FastMap<AddressKey, AddressEntry>,
    /// The key and group of the last call pushed (most calls are of the
    /// function the last one was). Its addresses are held in `by_address`.
    last: Option<(AddressKey, usize)>,
    /// Groups made for calls of each process (the first to call a code object).
    groups_of: crate::fast_hash::FastMap<u32, usize>,
    /// Calls counted in an `<other>` row past [`PROCESS_GROUPS`] or [`MAX_GROUPS`].
    folded: u64,
    /// Processes named in a warning for it ([`Aggregator::warning`]).
    warned: std::collections::HashSet<u32>,
    /// Whether to warn: only the daemon's own aggregator does (the others
    /// see the same calls).
    warns: bool,
}

/// Groups (one per code object a process called: function, file, entry
/// line) made for one process's calls, at most: a group is about 1.7 KiB
/// (its histogram's first block is 1 KiB), so 4,096 are 7 MiB, while a
/// process making code objects with distinct lines or file names would
/// otherwise grow the table by one per call.
pub const PROCESS_GROUPS: usize = 4096;
/// Groups in all, at most (about 110 MiB).
pub const MAX_GROUPS: usize = 65_536;
/// Processes named in a warning, at most (then the counter says it).
const MAX_WARNED: usize = 1024;
/// The file of the rows calls past the bounds are counted in.
pub use crate::string_bound::OTHER;

fn address(s: &Arc<str>) -> usize {
    Arc::as_ptr(s) as *const u8 as usize
}

impl Aggregator {
    /// One group per code object (function, file, entry line), or per
    /// (code object, pid); [`Aggregator::rows`] merges them as asked.
    pub fn new(per_pid: bool) -> Self {
        Self { per_pid, ..Default::default() }
    }

    /// This aggregator names a process in a warning when its calls are
    /// first folded (the daemon's own: every call goes through it).
    pub fn warning(mut self) -> Self {
        self.warns = true;
        self
    }

    pub fn push(&mut self, call: &Call) {
        let pid = self.per_pid.then_some(call.pid);
        let key = (address(&call.name), address(&call.file), call.line, pid);
        let cached = self.last.filter(|(last, _)| *last == key).map(|(_, index)| index);
        let index = match cached.or_else(|| self.by_address.get(&key).map(|&(index, ..)| index)) {
            Some(index) => index,
            None => {
                let text = (call.name.clone(), call.file.clone(), call.line, pid);
                let index = match self.by_text.get(&text) {
                    Some(&index) => index,
                    None if self.has_room_for(call.pid) => {
                        *self.groups_of.entry(call.pid).or_default() += 1;
                        self.new_group(text, call.pid)
                    }
                    // Past the bound: the call counts in its function's
                    // `<other>` row, and is not remembered by address.
                    None => {
                        self.folded += 1;
                        self.warn_folded(call.pid);
                        let other = (call.name.clone(), Arc::from(OTHER), 0, pid);
                        let index = match self.by_text.get(&other) {
                            Some(&index) => index,
                            None => self.new_group(other, call.pid),
                        };
                        self.record(index, call);
                        return;
                    }
                };
                self.by_address.insert(key, (index, call.name.clone(), call.file.clone()));
                index
            }
        };
        self.last = Some((key, index));
        self.record(index, call);
    }

    fn record(&mut self, index: usize, call: &Call) {
        let group = &mut self.groups[index];
        group.durations.record(call.duration_ns());
        if call.end == CallEnd::Incomplete {
            group.incomplete += 1;
        }
    }

    /// Whether a new group of a call of `pid` is within the bounds.
    fn has_room_for(&self, pid: u32) -> bool {
        self.groups.len() < MAX_GROUPS && self.groups_of.get(&pid).is_none_or(|&n| n < PROCESS_GROUPS)
    }

    fn new_group(&mut self, text: TextKey, first_pid: u32) -> usize {
        let index = self.groups.len();
        let (function, file, line, pid) = text.clone();
        self.groups.push(Group {
            function,
            file,
            line,
            pid,
            first_pid,
            durations: Histogram::default(),
            incomplete: 0,
        });
        self.by_text.insert(text, index);
        index
    }

    /// Names a process in one warning the first time its calls are folded.
    fn warn_folded(&mut self, pid: u32) {
        if self.warns && self.warned.len() < MAX_WARNED && self.warned.insert(pid) {
            log::warn!(
                "pid {pid}: its calls reached pftraced's bound of {PROCESS_GROUPS} distinct (function, file, \
                 line) a process or {MAX_GROUPS} in all; calls of further ones are counted in their \
                 function's {OTHER:?} row (counted as stats_folded)"
            );
        }
    }

    /// Calls counted in an `<other>` row because a bound was reached.
    pub fn folded(&self) -> u64 {
        self.folded
    }

    /// Calls pushed in.
    pub fn calls(&self) -> u64 {
        self.groups.iter().map(|g| g.durations.count()).sum()
    }

    /// Incomplete calls pushed in.
    pub fn incomplete(&self) -> u64 {
        self.groups.iter().map(|g| g.incomplete).sum()
    }

    /// One row per function, largest total first (then by name, file, line
    /// and pid): per code object, named by what the resolver said of it
    /// (`codes`), or per (name, file) as `by` asks. Groups of one code
    /// object reported at different lines (a generator resumed at a `yield`
    /// reports that line on 3.6-3.10) are one row, at its first line.
    pub fn rows(&self, by: StatsGrouping, codes: &CodeTable) -> Vec<FunctionStats> {
        let merged = self.plan(by, codes).into_iter().map(|row| {
            let mut g = self.groups[row.groups[0]].clone();
            for &i in &row.groups[1..] {
                g.durations.merge(&self.groups[i].durations);
                g.incomplete += self.groups[i].incomplete;
            }
            (g, row.line, row.info)
        });
        let mut rows: Vec<FunctionStats> = merged
            .map(|(g, line, info)| {
                let h = &g.durations;
                let known = |f: Option<&String>| f.cloned();
                FunctionStats {
                    function: g.function.to_string(),
                    file: g.file.to_string(),
                    line,
                    module: info.as_ref().and_then(|i| known(i.module.known())),
                    qualname: info.as_ref().and_then(|i| known(i.qualname.known())),
                    path: info.as_ref().and_then(|i| i.path().known().cloned()),
                    pid: g.pid,
                    calls: h.count(),
                    incomplete: g.incomplete,
                    total_ns: h.total(),
                    mean_ns: h.total() / h.count().max(1),
                    p50_ns: h.percentile(50.0),
                    p95_ns: h.percentile(95.0),
                    p99_ns: h.percentile(99.0),
                    max_ns: h.max(),
                }
            })
            .collect();
        rows.sort_by(|a, b| {
            b.total_ns
                .cmp(&a.total_ns)
                .then_with(|| a.function.cmp(&b.function))
                .then_with(|| a.file.cmp(&b.file))
                .then_with(|| a.line.cmp(&b.line))
                .then_with(|| a.pid.cmp(&b.pid))
        });
        rows
    }

    /// Which groups make each row (see [`Aggregator::rows`]).
    fn plan(&self, by: StatsGrouping, codes: &CodeTable) -> Vec<Row> {
        // The text of (function, file) is hashed once per pair of string
        // addresses, not per group: groups mostly share the decoder's
        // interned strings, and hashing the text of each took every
        // `status` through 262 MB with 32,768 groups of 4,000-byte file
        // names (a process's distinct lines of one file).
        type Identity = (usize, Option<u32>, Option<i32>);
        let ptr = |s: &Arc<str>| Arc::as_ptr(s) as *const u8 as usize;
        let mut by_address: HashMap<(usize, usize), usize> = HashMap::new();
        let mut by_text: HashMap<(Arc<str>, Arc<str>), usize> = HashMap::new();
        let mut rows: Vec<Row> = Vec::new();
        let mut index: HashMap<Identity, usize> = HashMap::new();
        for (i, g) in self.groups.iter().enumerate() {
            let (line, info) = match by {
                StatsGrouping::Name => (None, None),
                StatsGrouping::Function => {
                    let key = CodeKey {
                        pid: g.first_pid,
                        file: g.file.clone(),
                        name: g.function.clone(),
                        line: g.line,
                    };
                    let info = codes.get(&key);
                    let first = info.as_ref().and_then(|i| i.lineno.known().map(|&l| l as i32));
                    (Some(first.unwrap_or(g.line)), info)
                }
            };
            let text = *by_address.entry((ptr(&g.function), ptr(&g.file))).or_insert_with(|| {
                let next = by_text.len();
                *by_text.entry((g.function.clone(), g.file.clone())).or_insert(next)
            });
            let identity = (text, g.pid, line);
            match index.get(&identity) {
                Some(&r) => rows[r].groups.push(i),
                None => {
                    index.insert(identity, rows.len());
                    rows.push(Row { groups: vec![i], line, info });
                }
            }
        }
        rows
    }

    /// The functions called so far with their call counts, most calls first
    /// (at most `max`), named by qualified path where resolved, and how many
    /// there are: what `status` shows, without percentiles.
    ///
    /// Only the rows shown are made into text: a process's 4,096 groups of
    /// 4,000-byte file names copied for each `status` (eight such processes:
    /// 131 MB a call, then cut to `max` rows) took pftraced from 73 to 374 MiB
    /// RSS while `status` was asked every 100 ms.
    pub fn seen(&self, codes: &CodeTable, max: usize) -> (Vec<FunctionSeen>, u64) {
        let plan = self.plan(StatsGrouping::Function, codes);
        let total = plan.len() as u64;
        let mut counted: Vec<(u64, Row)> = plan
            .into_iter()
            .map(|row| (row.groups.iter().map(|&i| self.groups[i].durations.count()).sum(), row))
            .collect();
        let function = |row: &Row| &self.groups[row.groups[0]].function;
        counted.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| function(&a.1).cmp(function(&b.1))));
        counted.truncate(max);
        let seen = counted
            .into_iter()
            .map(|(calls, row)| FunctionSeen {
                function: self.groups[row.groups[0]].function.to_string(),
                path: row.info.as_ref().and_then(|i| i.path().known().cloned()),
                file: self.groups[row.groups[0]].file.to_string(),
                line: row.line.unwrap_or_default(),
                calls,
            })
            .collect();
        (seen, total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact(sorted: &[u64], p: f64) -> u64 {
        let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        sorted[rank.clamp(1, sorted.len()) - 1]
    }

    #[test]
    fn buckets_cover_every_value_in_order() {
        assert_eq!(bucket(0), (0, 0));
        assert_eq!(bucket(127), (0, 127));
        assert_eq!(bucket(128), (1, 0));
        assert_eq!(bucket(255), (1, 127));
        assert_eq!(bucket(256), (2, 0));
        assert_eq!(bucket(257), (2, 0));
        assert_eq!(bucket(u64::MAX), (BLOCKS - 1, 127));
        for v in [1u64, 200, 1_000, 65_537, 1 << 40, (1 << 40) + 12_345, u64::MAX / 3, u64::MAX] {
            let (b, s) = bucket(v);
            let r = representative(b, s);
            assert_eq!(bucket(r), (b, s), "{v}: the representative lies in the bucket");
            assert!((r as f64 - v as f64).abs() <= v as f64 * PERCENTILE_ERROR, "{v} -> {r}");
        }
    }

    #[test]
    fn percentiles_within_the_stated_error_and_exact_figures() {
        // Durations spread over 6 orders of magnitude, from a fixed LCG.
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut values = Vec::new();
        let mut h = Histogram::default();
        for _ in 0..100_000 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            let v = 50 + (x >> 33) % (1 << ((x >> 7) % 24));
            values.push(v);
            h.record(v);
        }
        values.sort_unstable();
        assert_eq!((h.count(), h.total(), h.max()), (100_000, values.iter().sum(), *values.last().unwrap()));
        for p in [0.1, 1.0, 50.0, 90.0, 95.0, 99.0, 99.9, 100.0] {
            let (got, want) = (h.percentile(p), exact(&values, p));
            assert!(
                (got as f64 - want as f64).abs() <= want as f64 * PERCENTILE_ERROR,
                "p{p}: {got} vs exact {want}"
            );
        }
        assert_eq!(h.percentile(100.0), *values.last().unwrap());
        // Small values are exact.
        let mut h = Histogram::default();
        for v in 1..=100 {
            h.record(v);
        }
        assert_eq!((h.percentile(50.0), h.percentile(95.0), h.percentile(99.0)), (50, 95, 99));
        assert_eq!(Histogram::default().percentile(50.0), 0);
    }

    #[test]
    fn groups_by_function_file_and_pid() {
        let mut all = Aggregator::new(false);
        let mut per_pid = Aggregator::new(true);
        let mut incomplete = Call::for_test(2, "f", 1000, 30);
        incomplete.end = CallEnd::Incomplete;
        let calls = [Call::for_test(1, "f", 1000, 10), incomplete, Call::for_test(1, "g", 1000, 100)];
        for c in &calls {
            all.push(c);
            per_pid.push(c);
        }
        // Another allocation of the same name joins the same group.
        all.push(&Call::for_test(1, "f", 1000, 20));
        let codes = CodeTable::default();
        let rows = all.rows(StatsGrouping::Function, &codes);
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].function.as_str(), rows[0].calls, rows[0].total_ns), ("g", 1, 100));
        assert_eq!(
            (rows[1].function.as_str(), rows[1].calls, rows[1].incomplete, rows[1].mean_ns, rows[1].max_ns),
            ("f", 3, 1, 20, 30)
        );
        assert_eq!((all.calls(), all.incomplete()), (4, 1));
        let rows = per_pid.rows(StatsGrouping::Function, &codes);
        assert_eq!(rows.len(), 3);
        assert_eq!(rows.iter().map(|r| r.pid).collect::<Vec<_>>(), [Some(1), Some(2), Some(1)]);
    }

    #[test]
    fn distinct_code_objects_past_the_bounds_count_in_an_other_row() {
        let mut agg = Aggregator::new(false);
        let at = |pid: u32, line: i32| {
            let mut c = Call::for_test(pid, "foo", 0, 10);
            c.line = line;
            c
        };
        // Process 1: one call each of PROCESS_GROUPS + 100 code objects, twice over.
        for round in 0..2 {
            for line in 0..(PROCESS_GROUPS + 100) as i32 {
                agg.push(&at(1, line + 1));
            }
            assert_eq!(agg.folded(), 100 * (round + 1));
        }
        // Process 2 is not affected; every call is counted.
        agg.push(&at(2, 0));
        assert_eq!(agg.folded(), 200);
        let rows = agg.rows(StatsGrouping::Name, &CodeTable::default());
        let calls = |file: &str| rows.iter().filter(|r| r.file == file).map(|r| r.calls).sum::<u64>();
        assert_eq!((calls(OTHER), calls("f.py"), agg.calls()), (200, 2 * 4096 + 1, 2 * 4196 + 1));
        assert_eq!(agg.groups.len(), PROCESS_GROUPS + 2);
    }

    #[test]
    fn same_named_methods_are_two_rows_unless_by_name() {
        // A.run (line 2) and B.run (line 6) of one file; A.run resolved, B.run not.
        let run = |line: i32, start: u64, dur: u64| {
            let mut c = Call::for_test(1, "run", start, dur);
            c.line = line;
            c
        };
        let mut agg = Aggregator::new(false);
        // Line 3: A.run reported at a line of its body (a resumed generator).
        for c in [run(2, 0, 10), run(2, 100, 30), run(6, 200, 1000), run(3, 300, 5)] {
            agg.push(&c);
        }
        let codes = CodeTable::default();
        let a = run(2, 0, 0);
        let mut info = crate::codes::unresolved(&a, "x");
        info.module = pftrace_code::Field::Known("m".into());
        info.qualname = pftrace_code::Field::Known("A.run".into());
        info.lineno = pftrace_code::Field::Known(2);
        codes.insert(CodeKey::of_call(&a), Arc::new(info.clone()));
        codes.insert(CodeKey::of_call(&run(3, 0, 0)), Arc::new(info));
        let rows = agg.rows(StatsGrouping::Function, &codes);
        let seen: Vec<_> = rows.iter().map(|r| (r.line, r.path.as_deref(), r.calls, r.total_ns)).collect();
        assert_eq!(seen, [(Some(6), None, 1, 1000), (Some(2), Some("m.A.run"), 3, 45)]);
        assert_eq!((rows[1].module.as_deref(), rows[1].qualname.as_deref()), (Some("m"), Some("A.run")));
        // By name: today's one row per (name, file), histograms merged exactly.
        let rows = agg.rows(StatsGrouping::Name, &codes);
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!((r.line, r.path.as_deref(), r.calls, r.total_ns, r.max_ns), (None, None, 4, 1045, 1000));
        assert_eq!((r.p50_ns, r.mean_ns), (10, 261));
    }
}
