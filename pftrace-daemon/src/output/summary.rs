//! The per-function summary printed when tracing ends, one row per
//! function named by its qualified path where resolved (else its code name): calls, total, mean,
//! p50, p95, p99 and max over every call completed while tracing ran (from
//! the daemon's aggregator, so also calls no longer kept in memory), plus
//! the counters that show nothing was lost.

use std::fmt::Write as _;

use crate::{stats::PERCENTILE_ERROR, trace::Trace};

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
    let stats = &trace.functions;
    let mut s = String::new();
    let name_w = stats.iter().map(|f| f.label().len()).max().unwrap_or(8).max(8);
    let _ = writeln!(
        s,
        "{:<name_w$}  {:>9}  {:>11}  {:>11}  {:>11}  {:>11}  {:>11}  {:>11}  file",
        "function", "calls", "total", "mean", "p50", "p95", "p99", "max"
    );
    for f in stats {
        let calls =
            if f.incomplete > 0 { format!("{}({}!)", f.calls, f.incomplete) } else { f.calls.to_string() };
        let _ = writeln!(
            s,
            "{:<name_w$}  {:>9}  {:>11}  {:>11}  {:>11}  {:>11}  {:>11}  {:>11}  {}",
            f.label(),
            calls,
            human_ns(f.total_ns),
            human_ns(f.mean_ns),
            human_ns(f.p50_ns),
            human_ns(f.p95_ns),
            human_ns(f.p99_ns),
            human_ns(f.max_ns),
            f.file
        );
    }
    if stats.is_empty() {
        let _ = writeln!(s, "(no calls of {} were seen)", trace.names.join(", "));
    } else {
        let calls: u64 = stats.iter().map(|f| f.calls).sum();
        let _ = writeln!(
            s,
            "({calls} calls; p50/p95/p99 within {:.1}% of the exact values)",
            PERCENTILE_ERROR * 100.0
        );
    }
    let c = &trace.counters;
    let _ = writeln!(
        s,
        "probes: {} entries and {} returns seen, {} + {} matched; lost records: {}; read errors: {}",
        c.entry_seen, c.return_seen, c.entry_matched, c.return_matched, c.lost, c.read_errors
    );
    if let Some(note) = c.cpu_coarse_note() {
        let _ = writeln!(s, "{note}");
    }
    let agents: Vec<String> = trace
        .processes
        .iter()
        .filter(|p| p.mechanism == crate::python::Mechanism::Agent)
        .map(|p| p.pid.to_string())
        .collect();
    if !agents.is_empty() {
        let _ = writeln!(
            s,
            "in-process agent (pid {}): {} reports; refused: {} from processes not accepted, {} malformed; \
             {} calls named {:?} (their code object's name never arrived)",
            agents.join(", "),
            c.agent_reports,
            c.agent_foreign,
            c.agent_bad,
            c.agent_unnamed,
            crate::agent::records::UNKNOWN_NAME
        );
        if c.batch.drains > 0 {
            let _ = writeln!(
                s,
                "batched agent road: {} events in {} batches, {} read by pftraced at its stop",
                c.batch.events, c.batch.drains, c.batch.by_daemon
            );
        }
    }
    if let Some(note) = c.batch.loss_note() {
        let _ = writeln!(s, "{note}");
    }
    if trace.file_names_cut > 0 {
        let _ = writeln!(
            s,
            "CUT: {} records had file names over 4095 bytes (not paths: PATH_MAX is 4096); they were cut, \
             and FILE:NAME qualifiers cannot be checked on them",
            trace.file_names_cut
        );
    }
    let b = &c.bounds;
    if b.agent_connections_refused > 0 {
        let _ = writeln!(
            s,
            "BOUNDS: {} connections to the in-process agent's socket were refused (no hello within 5 s or \
             before 32 newer connections, or a malformed one); see README, \"Bounds\"",
            b.agent_connections_refused
        );
    }
    if b.codes_over_bytes > 0 {
        let _ = writeln!(
            s,
            "BOUNDS: {} functions were not resolved: the answers about their process's functions reached {} \
             MiB (or all processes' {} MiB); see README, \"Bounds\"",
            b.codes_over_bytes,
            crate::codes::PROCESS_CODE_BYTES >> 20,
            crate::codes::TOTAL_CODE_BYTES >> 20
        );
    }
    if b.strings_folded + b.stats_folded + b.open_calls_dropped > 0 {
        let _ = writeln!(
            s,
            "BOUNDS: {} records had a name or file name over pftraced's string bound (named {:?}); {} calls \
             were counted in <other> rows past the bound on distinct functions; {} calls were not traced \
             (entered while {} calls were open, or {} in their process); see README, \"Bounds\"",
            b.strings_folded,
            crate::string_bound::OTHER,
            b.stats_folded,
            b.open_calls_dropped,
            crate::pairing::MAX_OPEN_CALLS,
            crate::pairing::PROCESS_OPEN_CALLS
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
    let incomplete: u64 = stats.iter().map(|f| f.incomplete).sum();
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
    use crate::{output::testing::sample_trace, stats::Aggregator};

    #[test]
    fn every_call_of_the_aggregate_with_percentiles() {
        let mut trace = sample_trace();
        let mut functions = Aggregator::new(false);
        for call in trace.calls.iter() {
            functions.push(call);
        }
        trace.functions = functions.rows(Default::default(), &trace.codes);
        let text = render(&trace);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[..4],
            [
                "function           calls        total         mean          p50          p95          p99          max  file",
                "app.Job.inner          2     140.00ms      70.00ms      40.00ms     100.00ms     100.00ms     100.00ms  /srv/app.py",
                "app.outer              1     100.00ms     100.00ms     100.00ms     100.00ms     100.00ms     100.00ms  /srv/app.py",
                "outer              1(1!)     100.00ms     100.00ms     100.00ms     100.00ms     100.00ms     100.00ms  /srv/other.py",
            ]
        );
        assert_eq!(lines[4], "(4 calls; p50/p95/p99 within 0.4% of the exact values)");
        assert!(lines[6].starts_with("incomplete calls (no return seen; marked (N!) above): 1;"), "{text}");
    }

    #[test]
    fn human_units() {
        assert_eq!(human_ns(12), "12ns");
        assert_eq!(human_ns(1_500), "1.50us");
        assert_eq!(human_ns(2_345_678), "2.35ms");
        assert_eq!(human_ns(3_000_000_000), "3.000s");
    }
}
