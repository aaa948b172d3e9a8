//! The per-function summary printed when tracing ends: calls, total, mean,
//! max, plus the counters that show nothing was lost.

use std::{collections::BTreeMap, fmt::Write as _};

use crate::{pairing::CallEnd, trace::Trace};

/// Figures for one function (name + file).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FunctionStats {
    pub name: String,
    pub file: String,
    pub calls: u64,
    pub incomplete: u64,
    pub total_ns: u64,
    pub max_ns: u64,
}

impl FunctionStats {
    pub fn mean_ns(&self) -> u64 {
        if self.calls == 0 { 0 } else { self.total_ns / self.calls }
    }
}

/// Per-function figures, ordered by total time (largest first).
pub fn function_stats(trace: &Trace) -> Vec<FunctionStats> {
    let mut by_fn: BTreeMap<(&str, &str), FunctionStats> = BTreeMap::new();
    for call in &trace.calls {
        let s = by_fn.entry((&call.name, &call.file)).or_insert_with(|| FunctionStats {
            name: call.name.to_string(),
            file: call.file.to_string(),
            ..Default::default()
        });
        s.calls += 1;
        if call.end == CallEnd::Incomplete {
            s.incomplete += 1;
        }
        let d = call.duration_ns();
        s.total_ns += d;
        s.max_ns = s.max_ns.max(d);
    }
    let mut stats: Vec<_> = by_fn.into_values().collect();
    stats.sort_by(|a, b| b.total_ns.cmp(&a.total_ns).then_with(|| a.name.cmp(&b.name)));
    stats
}

/// Human-readable duration with a unit that keeps 3-4 significant digits.
pub fn human_ns(ns: u64) -> String {
    let ns = ns as f64;
    if ns < 1e3 {
        format!("{ns:.0}ns")
    } else if ns < 1e6 {
        format!("{:.2}us", ns / 1e3)
    } else if ns < 1e9 {
        format!("{:.2}ms", ns / 1e6)
    } else {
        format!("{:.3}s", ns / 1e9)
    }
}

/// The summary table and counters, as printed on stderr.
pub fn render(trace: &Trace) -> String {
    let stats = function_stats(trace);
    let mut s = String::new();
    let name_w = stats.iter().map(|f| f.name.len()).max().unwrap_or(8).max(8);
    let _ = writeln!(
        s,
        "{:<name_w$}  {:>9}  {:>11}  {:>11}  {:>11}  file",
        "function", "calls", "total", "mean", "max"
    );
    for f in &stats {
        let calls =
            if f.incomplete > 0 { format!("{}({}!)", f.calls, f.incomplete) } else { f.calls.to_string() };
        let _ = writeln!(
            s,
            "{:<name_w$}  {:>9}  {:>11}  {:>11}  {:>11}  {}",
            f.name,
            calls,
            human_ns(f.total_ns),
            human_ns(f.mean_ns()),
            human_ns(f.max_ns),
            f.file
        );
    }
    if stats.is_empty() {
        let _ = writeln!(s, "(no calls of {} were seen)", trace.names.join(", "));
    }
    let c = &trace.counters;
    let _ = writeln!(
        s,
        "probes: {} entries and {} returns seen, {} + {} matched; lost records: {}; read errors: {}",
        c.entry_seen, c.return_seen, c.entry_matched, c.return_matched, c.lost, c.read_errors
    );
    if trace.file_names_cut > 0 {
        let _ = writeln!(
            s,
            "CUT: {} records had file names over 4095 bytes (not paths: PATH_MAX is 4096); they were cut, \
             and FILE:NAME qualifiers cannot be checked on them",
            trace.file_names_cut
        );
    }
    let process_reports_lost = c.process_reports_lost();
    if process_reports_lost > 0 {
        let _ = writeln!(
            s,
            "LOST: {process_reports_lost} reports of processes starting or exiting (the ring buffer was full): \
             some children may not have been traced"
        );
    }
    let incomplete = trace.incomplete_calls();
    if incomplete > 0 || trace.unmatched_returns_total > 0 || trace.bad_records > 0 {
        let _ = writeln!(
            s,
            "incomplete calls (no return seen; marked (N!) above): {incomplete}; returns without an entry \
             (attached mid-call): {}; undecodable records: {}",
            trace.unmatched_returns_total, trace.bad_records
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(human_ns(12), "12ns");
        assert_eq!(human_ns(1_500), "1.50us");
        assert_eq!(human_ns(2_345_678), "2.35ms");
        assert_eq!(human_ns(3_000_000_000), "3.000s");
    }
}
