//! The completed calls kept in memory for `dump` and `stats`: a bounded
//! queue (oldest evicted first, counted), with the filters and the
//! per-function figures computed over exactly the calls a dump would return.

use std::collections::{BTreeMap, VecDeque};

use crate::{
    clock::WallClock,
    pairing::{Call, CallEnd},
    protocol::{CallFilter, FunctionStats},
};

/// Completed calls, newest last.
#[derive(Debug)]
pub struct CallStore {
    calls: VecDeque<Call>,
    max: usize,
    /// Calls ever stored.
    pub total: u64,
    /// Calls dropped from memory to respect `max`.
    pub evicted: u64,
}

impl CallStore {
    pub fn new(max: usize) -> Self {
        Self { calls: VecDeque::new(), max: max.max(1), total: 0, evicted: 0 }
    }

    pub fn push(&mut self, call: Call) {
        if self.calls.len() >= self.max {
            self.calls.pop_front();
            self.evicted += 1;
        }
        self.total += 1;
        self.calls.push_back(call);
    }

    pub fn len(&self) -> usize {
        self.calls.len()
    }

    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    /// Forgets the calls in memory; returns how many.
    pub fn clear(&mut self) -> usize {
        let n = self.calls.len();
        self.calls.clear();
        n
    }

    /// The calls a filter selects, oldest first.
    pub fn select(&self, filter: &CallFilter, clock: &WallClock) -> Vec<Call> {
        self.calls.iter().filter(|c| selects(filter, c, clock)).cloned().collect()
    }

    /// Every call in memory.
    pub fn all(&self) -> impl Iterator<Item = &Call> {
        self.calls.iter()
    }
}

fn selects(filter: &CallFilter, call: &Call, clock: &WallClock) -> bool {
    filter.pid.is_none_or(|pid| call.pid == pid)
        && filter.function.as_deref().is_none_or(|f| &*call.name == f)
        && filter.since_wall_ns.is_none_or(|since| clock.wall_ns(call.start_ns) >= since as i128)
}

/// Per-function (and, with `per_pid`, per-process) figures, largest total first.
pub fn stats<'a>(calls: impl IntoIterator<Item = &'a Call>, per_pid: bool) -> Vec<FunctionStats> {
    let mut groups: BTreeMap<(&str, &str, Option<u32>), (Vec<u64>, u64)> = BTreeMap::new();
    for c in calls {
        let key = (&*c.name, &*c.file, per_pid.then_some(c.pid));
        let entry = groups.entry(key).or_default();
        entry.0.push(c.duration_ns());
        if c.end == CallEnd::Incomplete {
            entry.1 += 1;
        }
    }
    let mut out: Vec<FunctionStats> = groups
        .into_iter()
        .map(|((function, file, pid), (mut durations, incomplete))| {
            durations.sort_unstable();
            let total: u64 = durations.iter().sum();
            let n = durations.len() as u64;
            FunctionStats {
                function: function.to_string(),
                file: file.to_string(),
                pid,
                calls: n,
                incomplete,
                total_ns: total,
                mean_ns: total / n.max(1),
                p50_ns: percentile(&durations, 50.0),
                p95_ns: percentile(&durations, 95.0),
                p99_ns: percentile(&durations, 99.0),
                max_ns: durations.last().copied().unwrap_or(0),
            }
        })
        .collect();
    out.sort_by(|a, b| b.total_ns.cmp(&a.total_ns).then_with(|| a.function.cmp(&b.function)));
    out
}

/// Nearest-rank percentile of sorted values: the smallest value with at
/// least p% of the values at or below it.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn call(pid: u32, name: &str, start: u64, dur: u64) -> Call {
        Call {
            pid,
            tid: pid,
            name: Arc::from(name),
            file: Arc::from("f.py"),
            line: 1,
            start_ns: start,
            end_ns: start + dur,
            depth: 0,
            end: CallEnd::Returned,
            cpu_ns: None,
            rss_entry_bytes: 0,
            rss_return_bytes: 0,
        }
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!((percentile(&v, 50.0), percentile(&v, 95.0), percentile(&v, 99.0)), (50, 95, 99));
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[], 50.0), 0);
    }

    #[test]
    fn bounded_and_filtered() {
        let clock = WallClock::measure();
        let mut s = CallStore::new(3);
        for i in 0..5 {
            s.push(call(if i % 2 == 0 { 1 } else { 2 }, "f", i * 10, 5));
        }
        assert_eq!((s.len(), s.total, s.evicted), (3, 5, 2));
        let f = CallFilter { pid: Some(1), ..Default::default() };
        assert_eq!(s.select(&f, &clock).len(), 2);
        let st = stats(s.all(), true);
        assert_eq!(st.len(), 2);
        assert_eq!(st.iter().map(|x| x.calls).sum::<u64>(), 3);
    }
}
