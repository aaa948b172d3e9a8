//! The completed calls kept in memory for `dump` and `stats`: a bounded
//! queue (oldest evicted first, counted) kept as immutable shared blocks, so
//! a dump's snapshot is a list of `Arc`s plus a copy of the newest, still
//! growing block (at most [`BLOCK`] calls), taken on the event loop in
//! microseconds and read on another thread while tracing goes on.

use std::{collections::VecDeque, sync::Arc};

use crate::{
    clock::WallClock,
    pairing::Call,
    protocol::CallFilter,
    trace::{CallBlock, CallList, CallSelector},
};

/// Calls per shared block: the copy a snapshot makes of the newest one
/// (at most 4096 calls, about 400 KiB), and the calls an evicted-from block
/// keeps alive until all of it is evicted.
pub const BLOCK: usize = 4096;

/// Completed calls, newest last.
#[derive(Debug)]
pub struct CallStore {
    /// Full blocks, oldest first; the first `skip` calls of the first are evicted.
    sealed: VecDeque<CallBlock>,
    skip: usize,
    /// The newest calls, sealed into a block when it holds [`BLOCK`].
    open: VecDeque<Call>,
    len: usize,
    max: usize,
    /// Calls ever stored.
    pub total: u64,
    /// Calls dropped from memory to respect `max`.
    pub evicted: u64,
}

impl CallStore {
    pub fn new(max: usize) -> Self {
        Self {
            sealed: VecDeque::new(),
            skip: 0,
            open: VecDeque::new(),
            len: 0,
            max: max.max(1),
            total: 0,
            evicted: 0,
        }
    }

    /// Stores `call`; returns the block whose last call it evicted, for its
    /// strings to be handed back to the decoder (dropped, each was an atomic
    /// decrement: all of a `Vec::drop` that took 4% of the dense loop's samples).
    #[must_use = "the evicted block's strings go back to the decoder"]
    pub fn push(&mut self, call: Call) -> Option<CallBlock> {
        let evicted = if self.len >= self.max { self.evict_oldest() } else { None };
        self.total += 1;
        self.len += 1;
        self.open.push_back(call);
        if self.open.len() >= BLOCK {
            // The next block is allocated whole (it would grow by doubling).
            // The full one is moved, not copied (CallBlock): a deque that
            // never popped from its front turns into a Vec in place.
            let full = std::mem::replace(&mut self.open, VecDeque::with_capacity(BLOCK));
            self.sealed.push_back(Arc::new(Vec::from(full)));
        }
        evicted
    }

    /// Evicts the oldest call; returns its block once all of it is evicted.
    fn evict_oldest(&mut self) -> Option<CallBlock> {
        self.evicted += 1;
        self.len -= 1;
        match self.sealed.front() {
            Some(first) => {
                self.skip += 1;
                if self.skip == first.len() {
                    self.skip = 0;
                    return self.sealed.pop_front();
                }
            }
            None => {
                self.open.pop_front();
            }
        }
        None
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets the calls in memory; returns how many.
    pub fn clear(&mut self) -> usize {
        let n = self.len;
        self.sealed.clear();
        self.open.clear();
        self.skip = 0;
        self.len = 0;
        n
    }

    /// The calls in memory now, to be read anywhere while the store moves on.
    pub fn snapshot(&self, select: Option<CallSelector>) -> CallList {
        let mut blocks: Vec<CallBlock> = self.sealed.iter().cloned().collect();
        let skip = if blocks.is_empty() { 0 } else { self.skip };
        if !self.open.is_empty() {
            blocks.push(Arc::new(self.open.iter().cloned().collect()));
        }
        CallList::new(blocks, skip, select)
    }

    /// Every call in memory, oldest first.
    pub fn all(&self) -> impl Iterator<Item = &Call> {
        let skip = self.skip;
        self.sealed
            .iter()
            .enumerate()
            .flat_map(move |(i, b)| &b[if i == 0 { skip } else { 0 }..])
            .chain(self.open.iter())
    }
}

/// A selector for the calls `filter` names (None: all of them).
pub fn selector(filter: &CallFilter, clock: WallClock) -> Option<CallSelector> {
    if *filter == CallFilter::default() {
        return None;
    }
    let filter = filter.clone();
    Some(Arc::new(move |call: &Call| {
        filter.pid.is_none_or(|pid| call.pid == pid)
            && filter.function.as_deref().is_none_or(|f| &*call.name == f)
            && filter.since_wall_ns.is_none_or(|since| clock.wall_ns(call.start_ns) >= since as i128)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(pid: u32, name: &str, start: u64, dur: u64) -> Call {
        Call::for_test(pid, name, start, dur)
    }

    #[test]
    fn bounded_and_filtered() {
        let clock = WallClock::measure();
        let mut s = CallStore::new(3);
        for i in 0..5 {
            let _ = s.push(call(if i % 2 == 0 { 1 } else { 2 }, "f", i * 10, 5));
        }
        assert_eq!((s.len(), s.total, s.evicted), (3, 5, 2));
        let f = CallFilter { pid: Some(1), ..Default::default() };
        assert_eq!(s.snapshot(selector(&f, clock)).len(), 2);
        assert_eq!(s.all().map(|c| c.start_ns).collect::<Vec<_>>(), [20, 30, 40]);
    }

    #[test]
    fn snapshots_share_blocks_and_survive_eviction() {
        let mut s = CallStore::new(2 * BLOCK + 10);
        let n = 3 * BLOCK as u64 + 5;
        let mut returned = Vec::new();
        for i in 0..n {
            returned.extend(s.push(call(1, "f", i, 1)));
        }
        // BLOCK - 5 calls evicted: no block whole yet.
        assert!(returned.is_empty());
        let expect_first = n - (2 * BLOCK as u64 + 10);
        assert_eq!((s.len(), s.evicted), (2 * BLOCK + 10, expect_first));
        let snap = s.snapshot(None);
        let starts: Vec<u64> = snap.iter().map(|c| c.start_ns).collect();
        assert_eq!(starts, (expect_first..n).collect::<Vec<_>>());
        assert_eq!(s.all().map(|c| c.start_ns).collect::<Vec<_>>(), starts);
        // The store moves on (everything in the snapshot is evicted); the snapshot stays.
        for i in n..n + 3 * BLOCK as u64 {
            returned.extend(s.push(call(1, "f", i, 1)));
        }
        // A block comes back once all its calls are evicted, oldest first
        // (4 * BLOCK - 5 evicted: three blocks whole).
        let back: Vec<u64> = returned.iter().flat_map(|b| b.iter().map(|c| c.start_ns)).collect();
        assert_eq!(back, (0..3 * BLOCK as u64).collect::<Vec<_>>());
        assert_eq!(s.evicted, 4 * BLOCK as u64 - 5);
        assert_eq!(snap.iter().map(|c| c.start_ns).collect::<Vec<_>>(), starts);
        assert_eq!(s.all().count(), s.len());
        assert_eq!(s.clear(), 2 * BLOCK + 10);
        assert!(s.is_empty() && s.snapshot(None).is_empty());
        // A store smaller than a block evicts from the open one.
        let mut s = CallStore::new(2);
        for i in 0..4 {
            assert!(s.push(call(1, "f", i, 1)).is_none());
        }
        assert_eq!(s.snapshot(None).iter().map(|c| c.start_ns).collect::<Vec<_>>(), [2, 3]);
    }
}
