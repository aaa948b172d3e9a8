//! Where a trace's calls are read from when it is written: memory (what
//! `pftracectl dump` sends) or the spill file (the final trace of a run,
//! every call), with what each format needs of them: a pass in any order,
//! a stream sorted by a key in bounded memory, and a tally.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
};

use super::{
    sort::{self, CallIter},
    spill::SpillFile,
};
use crate::pairing::{Call, CallEnd};

/// The calls a format writes.
#[derive(Debug, Clone, Copy)]
pub enum CallSource<'a> {
    Memory(&'a crate::trace::CallList),
    Spilled(&'a SpillFile),
}

/// Counts over all calls.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    pub calls: u64,
    pub incomplete: u64,
    /// (pid, tid) of every thread that made a call.
    pub threads: BTreeSet<(u32, u32)>,
    /// Calls per process.
    pub per_pid: BTreeMap<u32, u64>,
}

impl<'a> CallSource<'a> {
    /// Every call, in the order they were stored.
    pub fn iter(&self) -> CallIter<'a> {
        match *self {
            Self::Memory(calls) => Box::new(calls.iter().cloned().map(Ok)),
            Self::Spilled(spill) => Box::new(spill.reader()),
        }
    }

    /// Every call, sorted (stably) by `key`.
    pub fn sorted<K: Ord + 'a>(&self, key: impl Fn(&Call) -> K + Clone + 'a) -> io::Result<CallIter<'a>> {
        match *self {
            Self::Memory(calls) => {
                // Sort references, not copies: a dump's snapshot shares the
                // store's blocks, and copying them to sort took a slow dump
                // client's daemon from 63 to 185 MiB (3 dumps of 200,000 calls).
                let mut refs: Vec<&'a Call> = calls.iter().collect();
                refs.sort_by_cached_key(|c| key(c));
                Ok(Box::new(refs.into_iter().cloned().map(Ok)))
            }
            Self::Spilled(spill) => sort::sorted(spill.reader(), key, spill.sort_budget, Some(spill.dir())),
        }
    }

    /// Counts calls, incomplete calls, threads and calls per process.
    pub fn tally(&self) -> io::Result<Tally> {
        let mut t = Tally::default();
        for call in self.iter() {
            let call = call?;
            t.calls += 1;
            t.incomplete += u64::from(call.end == CallEnd::Incomplete);
            t.threads.insert((call.pid, call.tid));
            *t.per_pid.entry(call.pid).or_default() += 1;
        }
        Ok(t)
    }

    /// How many calls there are.
    pub fn len(&self) -> u64 {
        match *self {
            Self::Memory(calls) => calls.len() as u64,
            Self::Spilled(spill) => spill.calls,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
