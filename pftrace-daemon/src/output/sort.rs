//! Calls in a chosen order while holding at most a budget of them in
//! memory: an external merge sort. Calls are read in chunks of the budget,
//! each chunk sorted and written as a run to an unnamed scratch file in the
//! output's directory; the runs are then merged, at most [`FAN_IN`] at a
//! time (more runs are first merged into longer ones). Stable: calls with
//! equal keys keep their input order. When everything fits in the budget,
//! nothing touches the disk.
//!
//! Runs hold the spill's fixed-size records (`call_record.rs`) with names
//! and files as ids into a table kept in memory (one entry per distinct
//! string; no string entries in the runs): JSON runs took 1.6 s to sort
//! 1 M calls here.

use std::{
    cmp::Reverse,
    collections::BinaryHeap,
    fs::File,
    io::{self, BufReader, BufWriter, Read as _, Write as _},
    sync::Arc,
};

use super::{
    call_record::{self, RECORD_BYTES, StringIds},
    safe_file::Dir,
    spill::Segment,
};
use crate::pairing::Call;

/// Calls in some order, each read possibly failing.
pub type CallIter<'a> = Box<dyn Iterator<Item = io::Result<Call>> + 'a>;

/// Runs merged at once, at most: bounds the read buffers to FAN_IN × [`RUN_BUFFER_BYTES`].
pub const FAN_IN: usize = 64;
const RUN_BUFFER_BYTES: usize = 64 * 1024;

/// `calls` sorted by `key`, holding at most `budget` calls in memory and
/// using a scratch file in `scratch` for the rest (no scratch: all in memory).
pub fn sorted<'a, K: Ord + 'a>(
    mut calls: impl Iterator<Item = io::Result<Call>> + 'a,
    key: impl Fn(&Call) -> K + Clone + 'a,
    budget: usize,
    scratch: Option<&Dir>,
) -> io::Result<CallIter<'a>> {
    match scratch {
        Some(dir) => sorted_with_fan_in(&mut calls, key, budget.max(1), dir, FAN_IN),
        None => {
            let mut all = calls.collect::<io::Result<Vec<Call>>>()?;
            all.sort_by_cached_key(|c| key(c));
            Ok(Box::new(all.into_iter().map(Ok)))
        }
    }
}

fn sorted_with_fan_in<'a, K: Ord + 'a>(
    calls: &mut dyn Iterator<Item = io::Result<Call>>,
    key: impl Fn(&Call) -> K + Clone + 'a,
    budget: usize,
    scratch: &Dir,
    fan_in: usize,
) -> io::Result<CallIter<'a>> {
    let mut chunk = next_chunk(calls, budget)?;
    if chunk.len() < budget {
        chunk.sort_by_cached_key(|c| key(c));
        return Ok(Box::new(chunk.into_iter().map(Ok)));
    }
    let mut strings = StringIds::default();
    let mut runs = Runs::new(scratch)?;
    while !chunk.is_empty() {
        chunk.sort_by_cached_key(|c| key(c));
        runs.write(chunk.drain(..).map(Ok), &mut strings)?;
        chunk = next_chunk(calls, budget)?;
    }
    let mut runs = runs.finish()?;
    let table: Arc<[Arc<str>]> = strings.table().into();
    while runs.ranges.len() > fan_in {
        let mut longer = Runs::new(scratch)?;
        for group in runs.ranges.chunks(fan_in) {
            longer.write(merge(&runs.file, group, &table, key.clone()), &mut strings)?;
        }
        runs = longer.finish()?;
    }
    Ok(Box::new(merge(&runs.file, &runs.ranges, &table, key)))
}

fn next_chunk(calls: &mut dyn Iterator<Item = io::Result<Call>>, budget: usize) -> io::Result<Vec<Call>> {
    let mut chunk = Vec::with_capacity(budget.min(1 << 16));
    for call in &mut *calls {
        chunk.push(call?);
        if chunk.len() == budget {
            break;
        }
    }
    Ok(chunk)
}

/// Sorted runs being written to a scratch file.
struct Runs {
    out: BufWriter<File>,
    ranges: Vec<(u64, u64)>,
    pos: u64,
}

/// Finished runs: the file and each run's byte range.
struct RunFile {
    file: Arc<File>,
    ranges: Vec<(u64, u64)>,
}

impl Runs {
    fn new(scratch: &Dir) -> io::Result<Self> {
        Ok(Self {
            out: BufWriter::with_capacity(RUN_BUFFER_BYTES, scratch.scratch()?),
            ranges: Vec::new(),
            pos: 0,
        })
    }

    /// Appends one run, already in order.
    fn write(
        &mut self,
        calls: impl Iterator<Item = io::Result<Call>>,
        strings: &mut StringIds,
    ) -> io::Result<()> {
        let start = self.pos;
        for call in calls {
            self.out.write_all(&call_record::encode(&call?, strings))?;
            self.pos += RECORD_BYTES as u64;
        }
        self.ranges.push((start, self.pos));
        Ok(())
    }

    fn finish(self) -> io::Result<RunFile> {
        let file = self.out.into_inner().map_err(|e| e.into_error())?;
        Ok(RunFile { file: Arc::new(file), ranges: self.ranges })
    }
}

/// Reads one run back.
struct RunReader {
    input: BufReader<Segment>,
    strings: Arc<[Arc<str>]>,
}

impl RunReader {
    fn next_call(&mut self) -> io::Result<Option<Call>> {
        let mut r = [0u8; RECORD_BYTES];
        match self.input.read_exact(&mut r) {
            Ok(()) => call_record::decode(&r, &self.strings).map(Some),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// The k-way merge of sorted runs; ties go to the earlier run (stable).
struct Merge<K, F> {
    readers: Vec<RunReader>,
    heads: Vec<Option<Call>>,
    heap: BinaryHeap<Reverse<(K, usize)>>,
    key: F,
    /// A read error met while refilling, returned next.
    error: Option<io::Error>,
}

fn merge<K: Ord, F: Fn(&Call) -> K>(
    file: &Arc<File>,
    ranges: &[(u64, u64)],
    strings: &Arc<[Arc<str>]>,
    key: F,
) -> Merge<K, F> {
    let mut m = Merge {
        readers: ranges
            .iter()
            .map(|&(start, end)| RunReader {
                input: BufReader::with_capacity(RUN_BUFFER_BYTES, Segment::new(Arc::clone(file), start, end)),
                strings: Arc::clone(strings),
            })
            .collect(),
        heads: vec![None; ranges.len()],
        heap: BinaryHeap::with_capacity(ranges.len()),
        key,
        error: None,
    };
    for i in 0..ranges.len() {
        m.refill(i);
    }
    m
}

impl<K: Ord, F: Fn(&Call) -> K> Merge<K, F> {
    fn refill(&mut self, run: usize) {
        match self.readers[run].next_call() {
            Ok(Some(call)) => {
                self.heap.push(Reverse(((self.key)(&call), run)));
                self.heads[run] = Some(call);
            }
            Ok(None) => {}
            Err(e) => self.error = Some(e),
        }
    }
}

impl<K: Ord, F: Fn(&Call) -> K> Iterator for Merge<K, F> {
    type Item = io::Result<Call>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(e) = self.error.take() {
            return Some(Err(e));
        }
        let Reverse((_, run)) = self.heap.pop()?;
        let call = self.heads[run].take().expect("a head for every heap entry");
        self.refill(run);
        Some(Ok(call))
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::output::spill::tests::{call, same, temp};

    fn lines(calls: CallIter) -> Vec<i32> {
        calls.map(|c| c.unwrap().line).collect()
    }

    #[test]
    fn in_memory_external_and_multi_level_agree_with_a_stable_sort() {
        let base = temp("sort");
        let dir = Dir::open(&base, None).unwrap();
        let calls: Vec<Call> = (0..10_000).map(|i| call((i * 7919) % 10_000)).collect();
        // Many equal keys (pid and depth only) show stability.
        let key = |c: &Call| (c.pid, c.depth);
        let mut want = calls.clone();
        want.sort_by_key(key);
        for (budget, fan_in) in [(20_000, FAN_IN), (1_000, FAN_IN), (37, 4), (1, 2)] {
            let got =
                sorted_with_fan_in(&mut calls.iter().cloned().map(Ok), key, budget, &dir, fan_in).unwrap();
            let got: Vec<Call> = got.collect::<io::Result<_>>().unwrap();
            assert_eq!(got.len(), want.len());
            // Every field survives a run record.
            assert!(want.iter().zip(&got).all(|(a, b)| same(a, b)), "budget {budget}, fan-in {fan_in}");
        }
        // Scratch files have no name: nothing is left in the directory.
        assert_eq!(fs::read_dir(&base).unwrap().count(), 0);
        let by_start =
            sorted(calls.iter().cloned().map(Ok), |c: &Call| (c.start_ns, c.depth), 999, Some(&dir));
        assert_eq!(lines(by_start.unwrap()), (0..10_000).collect::<Vec<_>>());
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn read_errors_reach_the_caller() {
        let base = temp("sort-error");
        let dir = Dir::open(&base, None).unwrap();
        let input = (0..10).map(|i| if i == 5 { Err(io::Error::other("bad line")) } else { Ok(call(i)) });
        let err = sorted(input, |c: &Call| c.start_ns, 3, Some(&dir)).err().unwrap();
        assert_eq!(err.to_string(), "bad line");
        fs::remove_dir_all(&base).unwrap();
    }
}
