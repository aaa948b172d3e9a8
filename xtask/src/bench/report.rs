//! Benchmark results: one `Sample` per run, `Row`s of medians, the table and
//! the JSON document.

use serde_json::{Value, json};

/// Which time of the workload's loop a row is judged by: wall time for one
/// process (what a user sees), CPU time when several processes share the cores
/// (wall time would mostly measure time slicing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    Wall,
    Cpu,
}

impl Metric {
    pub fn name(self) -> &'static str {
        match self {
            Metric::Wall => "wall",
            Metric::Cpu => "cpu",
        }
    }
}

/// One run of a case.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// The interleaved round it ran in (1-based): the runs of one round, made
    /// one after another within seconds, saw the same machine speed.
    pub round: usize,
    /// Wall and CPU ns per Python call of the timed loop (mean over processes).
    pub wall_ns: f64,
    pub cpu_ns: f64,
    /// Longest loop (wall seconds) among the processes.
    pub loop_s: f64,
    /// Python calls made in the loops (all processes).
    pub calls: u64,
    /// Calls the tracer should have recorded, and did.
    pub expected: Option<u64>,
    pub delivered: Option<u64>,
    /// Kernel counters (pftraced only).
    pub lost: Option<u64>,
    pub read_errors: Option<u64>,
    pub entry_seen: Option<u64>,
    pub entry_matched: Option<u64>,
    pub return_matched: Option<u64>,
    /// The tracer's CPU seconds over its life (wait4), and over the loops
    /// (/proc/PID/stat before release and after the last loop).
    pub tracer_cpu_s: Option<f64>,
    pub loop_cpu_s: Option<f64>,
    /// Wall seconds from release to the end of the last loop.
    pub window_s: Option<f64>,
    /// The tracer's own peak RSS (VmHWM) and RSS when the loops ended, bytes.
    pub peak_rss: Option<u64>,
    pub rss_loop_end: Option<u64>,
    /// pftraced start to "attached" line(s), seconds.
    pub attach_s: Option<f64>,
    /// Tracers not started by the bench that were running when this run began.
    pub foreign_tracers: usize,
    /// The tracer's BPF programs that ran during the loop: name, runs and
    /// ns per run (bpf_stats; 0 ns unless they are on: progstats::enable).
    pub progs: Vec<(String, u64, f64)>,
}

impl Sample {
    pub fn ns(&self, m: Metric) -> f64 {
        match m {
            Metric::Wall => self.wall_ns,
            Metric::Cpu => self.cpu_ns,
        }
    }

    /// The tracer's share of one core while the loops ran.
    pub fn core_share(&self) -> Option<f64> {
        match (self.loop_cpu_s, self.window_s) {
            (Some(c), Some(w)) if w > 0.0 => Some(c / w),
            _ => None,
        }
    }

    /// Records (entry + return) delivered per second of loop.
    pub fn records_per_s(&self) -> Option<f64> {
        let d = self.delivered?;
        (self.loop_s > 0.0).then(|| 2.0 * d as f64 / self.loop_s)
    }

    pub fn to_json(&self) -> Value {
        json!({
            "round": self.round,
            "wall_ns_per_call": round(self.wall_ns, 1),
            "cpu_ns_per_call": round(self.cpu_ns, 1),
            "loop_s": round(self.loop_s, 6),
            "calls": self.calls,
            "expected": self.expected,
            "delivered": self.delivered,
            "lost": self.lost,
            "read_errors": self.read_errors,
            "entry_seen": self.entry_seen,
            "entry_matched": self.entry_matched,
            "return_matched": self.return_matched,
            "tracer_cpu_s": self.tracer_cpu_s.map(|v| round(v, 3)),
            "tracer_loop_cpu_s": self.loop_cpu_s.map(|v| round(v, 3)),
            "window_s": self.window_s.map(|v| round(v, 6)),
            "tracer_core_share": self.core_share().map(|v| round(v, 4)),
            "tracer_peak_rss_bytes": self.peak_rss,
            "tracer_rss_at_loop_end_bytes": self.rss_loop_end,
            "records_per_s": self.records_per_s().map(|v| v.round()),
            "attach_s": self.attach_s.map(|v| round(v, 4)),
            "other_tracers_running": self.foreign_tracers,
        })
    }
}

pub fn round(v: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (v * p).round() / p
}

/// Median of the values (mean of the middle two for an even count).
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

/// A line of the table: one case, its runs and its medians.
#[derive(Debug, Clone)]
pub struct Row {
    pub id: String,
    pub label: String,
    pub group: &'static str,
    pub procs: usize,
    pub names: Option<usize>,
    pub metric: Metric,
    pub samples: Vec<Sample>,
    /// Runs that failed, with why.
    pub errors: Vec<String>,
    /// Why the row has no numbers (e.g. bpftrace not installed).
    pub note: Option<String>,
    /// Medians of the untraced run and of the floor this row is compared with.
    pub base_ns: Option<f64>,
    pub floor_ns: Option<f64>,
    /// Added cost over the floor's, by [`fastest_ratio`] and [`rounds_ratio`]
    /// (set by [`set_ratios`]); [`Row::ratio`] is the latter (see [`RATIO_METHOD`]).
    pub fastest_ratio: Option<f64>,
    pub rounds_ratio: Option<f64>,
}

impl Row {
    pub fn new(id: impl Into<String>, label: impl Into<String>, group: &'static str, metric: Metric) -> Self {
        Row {
            id: id.into(),
            label: label.into(),
            group,
            procs: 1,
            names: None,
            metric,
            samples: Vec::new(),
            errors: Vec::new(),
            note: None,
            base_ns: None,
            floor_ns: None,
            fastest_ratio: None,
            rounds_ratio: None,
        }
    }

    fn med(&self, f: impl Fn(&Sample) -> Option<f64>) -> Option<f64> {
        median(self.samples.iter().filter_map(f).collect())
    }

    pub fn ns(&self) -> Option<f64> {
        self.med(|s| Some(s.ns(self.metric)))
    }

    /// ns per call added over the untraced run.
    pub fn added(&self) -> Option<f64> {
        Some(self.ns()? - self.base_ns?)
    }

    /// Added cost as a multiple of the floor's added cost, medians against
    /// medians: mixes this machine's two speeds (see [`RATIO_METHOD`]), printed beside.
    pub fn median_ratio(&self) -> Option<f64> {
        let floor_added = self.floor_ns? - self.base_ns?;
        (floor_added > 0.0).then(|| self.added().map(|a| a / floor_added)).flatten()
    }

    /// Added cost as a multiple of the floor's added cost, the median of the
    /// ratios within rounds ([`RATIO_METHOD`]): the figure targets are checked on.
    pub fn ratio(&self) -> Option<f64> {
        self.rounds_ratio
    }

    /// The fastest run's ns per call.
    pub fn fastest(&self) -> Option<f64> {
        self.samples.iter().map(|s| s.ns(self.metric)).filter(|v| v.is_finite()).reduce(f64::min)
    }

    /// This row's ns per call in round `k`.
    fn in_round(&self, k: usize) -> Option<f64> {
        self.samples.iter().find(|s| s.round == k).map(|s| s.ns(self.metric))
    }

    /// The worst run: fewest calls delivered (with its expectation).
    pub fn delivered(&self) -> Option<(u64, u64)> {
        self.samples.iter().filter_map(|s| Some((s.delivered?, s.expected?))).min_by_key(|(d, e)| {
            // Lowest delivered fraction first.
            (((*d as f64 / (*e).max(1) as f64) * 1e9) as u64, *d)
        })
    }

    /// The most records lost in one run.
    pub fn lost(&self) -> Option<u64> {
        self.samples.iter().filter_map(|s| s.lost).max()
    }

    /// Records lost in each run, in run order (`0 / 900855 / 0`): a median
    /// or a maximum alone hid how often a row loses.
    pub fn lost_each(&self) -> Option<String> {
        let each: Vec<String> = self.samples.iter().filter_map(|s| s.lost).map(|l| l.to_string()).collect();
        (!each.is_empty()).then(|| each.join(" / "))
    }

    pub fn tracer_cpu_s(&self) -> Option<f64> {
        self.med(|s| s.tracer_cpu_s)
    }

    pub fn core_share(&self) -> Option<f64> {
        self.med(Sample::core_share)
    }

    pub fn peak_rss(&self) -> Option<u64> {
        self.samples.iter().filter_map(|s| s.peak_rss).max()
    }

    pub fn rss_loop_end(&self) -> Option<u64> {
        self.samples.iter().filter_map(|s| s.rss_loop_end).max()
    }

    pub fn records_per_s(&self) -> Option<f64> {
        self.med(Sample::records_per_s)
    }

    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "case": self.label,
            "group": self.group,
            "processes": self.procs,
            "names": self.names,
            "metric": self.metric.name(),
            "runs": self.samples.len(),
            "failed_runs": self.errors,
            "note": self.note,
            "ns_per_call": self.ns().map(|v| round(v, 1)),
            "untraced_ns_per_call": self.base_ns.map(|v| round(v, 1)),
            "floor_ns_per_call": self.floor_ns.map(|v| round(v, 1)),
            "added_ns_per_call": self.added().map(|v| round(v, 1)),
            "ratio_to_floor": self.ratio().map(|v| round(v, 3)),
            "ratio_method": RATIO_METHOD,
            "ratio_to_floor_fastest_runs": self.fastest_ratio.map(|v| round(v, 3)),
            "ratio_to_floor_median_of_rounds": self.rounds_ratio.map(|v| round(v, 3)),
            "ratio_to_floor_medians": self.median_ratio().map(|v| round(v, 3)),
            "fastest_ns_per_call": self.fastest().map(|v| round(v, 1)),
            "delivered_worst_run": self.delivered().map(|d| d.0),
            "expected": self.delivered().map(|d| d.1),
            "lost_max": self.lost(),
            "lost_each_run": self.samples.iter().filter_map(|s| s.lost).collect::<Vec<_>>(),
            "tracer_cpu_s": self.tracer_cpu_s().map(|v| round(v, 3)),
            "tracer_core_share_during_loop": self.core_share().map(|v| round(v, 4)),
            "tracer_peak_rss_bytes": self.peak_rss(),
            "tracer_rss_at_loop_end_bytes": self.rss_loop_end(),
            "records_per_s": self.records_per_s().map(|v| v.round()),
            "samples": self.samples.iter().map(Sample::to_json).collect::<Vec<_>>(),
        })
    }
}

/// How [`Row::ratio`], the figure targets are checked on, compares a row's
/// added cost with the floor's: within each interleaved round (its runs made
/// within seconds of each other), the median over rounds. This VM runs the
/// same loop at two speeds for seconds to minutes at a time (bench/calls.py
/// untraced: 46-57 or 83-99 ns/call minutes apart, 2026-11-27), so medians of
/// runs made minutes apart mix the two: the full run of 2026-11-27 06:54 put
/// bpftrace at 0.97x the floor, whose programs return at once. Tried here in
/// 3 `--sparse-only` sittings (5, 5, 7 rounds; load 3-4, 2-3, idle),
/// bpftrace / sparse / dense / 1000 names: per-round medians 1.13 1.19 1.01 /
/// 1.23 1.25 1.21 / 1.89 1.67 1.63 / 1.21 1.11 1.21; fastest run against
/// fastest 1.21 1.15 1.01 / 1.33 1.28 1.12 / 1.86 1.64 1.58 / 1.20 1.17 1.10;
/// medians 1.23 1.00 1.06 / 1.24 1.24 1.43 / 1.62 1.50 1.59 / 1.11 0.95 1.21.
/// Per-round medians moved least between sittings (summed ranges 0.60,
/// against 0.80 and 0.80); single rounds still ranged 0.82-1.88 for one row
/// on the idle machine, so differences under about 0.1 are not resolved.
pub const RATIO_METHOD: &str = "median of per-round ratios";

/// (x - untraced) / (floor - untraced), None when the floor adds nothing.
fn added_ratio(x: f64, base: f64, floor: f64) -> Option<f64> {
    let d = floor - base;
    (d > 0.0).then(|| (x - base) / d)
}

/// `row`'s added cost over the floor's, fastest runs of each.
pub fn fastest_ratio(row: &Row, base: &Row, floor: &Row) -> Option<f64> {
    added_ratio(row.fastest()?, base.fastest()?, floor.fastest()?)
}

/// `row`'s added cost over the floor's within each round where all three
/// ran, the median over those rounds.
pub fn rounds_ratio(row: &Row, base: &Row, floor: &Row) -> Option<f64> {
    let each = row
        .samples
        .iter()
        .filter_map(|s| added_ratio(s.ns(row.metric), base.in_round(s.round)?, floor.in_round(s.round)?));
    median(each.collect())
}

/// Sets every row's medians of the untraced run and floor, and its ratios,
/// against `base` and `floor`.
pub fn set_ratios<'a>(rows: impl IntoIterator<Item = &'a mut Row>, base: Option<&Row>, floor: Option<&Row>) {
    for r in rows {
        (r.base_ns, r.floor_ns) = (base.and_then(Row::ns), floor.and_then(Row::ns));
        (r.fastest_ratio, r.rounds_ratio) = match (base, floor) {
            (Some(b), Some(f)) => (fastest_ratio(r, b, f), rounds_ratio(r, b, f)),
            _ => (None, None),
        };
    }
}

const MIB: f64 = 1024.0 * 1024.0;

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.digits$}"))
}

fn si(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2} M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1} k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

/// Renders rows as an aligned text table.
pub fn table(rows: &[Row]) -> String {
    let header = [
        "case",
        "runs",
        "ns/call",
        "+ns/call",
        "x floor",
        "(medians)",
        "calls delivered/expected",
        "lost, each run",
        "tracer CPU s",
        "core % in loop",
        "peak RSS MiB",
        "records/s",
    ];
    let mut lines: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    let mut group = "";
    let mut separators = Vec::new();
    for r in rows {
        if r.group != group {
            if !group.is_empty() {
                separators.push(lines.len());
            }
            group = r.group;
        }
        let mut cells = vec![r.label.clone(), r.samples.len().to_string()];
        if let Some(note) = &r.note {
            cells.push(note.clone());
            lines.push(cells);
            continue;
        }
        cells.push(opt(r.ns(), 1));
        cells.push(opt(r.added(), 1));
        cells.push(opt(r.ratio(), 2));
        cells.push(opt(r.median_ratio(), 2));
        cells.push(r.delivered().map_or("-".into(), |(d, e)| format!("{d}/{e}")));
        cells.push(r.lost_each().unwrap_or_else(|| "-".into()));
        cells.push(opt(r.tracer_cpu_s(), 2));
        cells.push(opt(r.core_share().map(|c| c * 100.0), 1));
        cells.push(opt(r.peak_rss().map(|b| b as f64 / MIB), 1));
        cells.push(r.records_per_s().map_or("-".into(), si));
        lines.push(cells);
    }
    let cols = header.len();
    let mut width = vec![0; cols];
    for l in &lines {
        if l.len() == cols {
            for (i, c) in l.iter().enumerate() {
                width[i] = width[i].max(c.chars().count());
            }
        }
    }
    let mut out = String::new();
    let total: usize = width.iter().sum::<usize>() + 2 * (cols - 1);
    for (n, l) in lines.iter().enumerate() {
        if separators.contains(&n) {
            out.push_str(&"-".repeat(total));
            out.push('\n');
        }
        let mut s = String::new();
        for (i, c) in l.iter().enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            if l.len() < cols && i == l.len() - 1 {
                s.push_str(c);
            } else if i == 0 {
                s.push_str(&format!("{c:<w$}", w = width[i]));
            } else {
                s.push_str(&format!("{c:>w$}", w = width[i]));
            }
        }
        out.push_str(s.trim_end());
        out.push('\n');
        if n == 0 {
            out.push_str(&"=".repeat(total));
            out.push('\n');
        }
    }
    out
}

/// A performance target and whether this run met it (None: not measured).
#[derive(Debug, Clone)]
pub struct Target {
    pub what: String,
    pub limit: String,
    pub value: String,
    pub met: Option<bool>,
}

impl Target {
    pub fn to_json(&self) -> Value {
        json!({"target": self.what, "limit": self.limit, "value": self.value, "met": self.met})
    }
}

pub fn targets_text(targets: &[Target]) -> String {
    let w = targets.iter().map(|t| t.what.chars().count()).max().unwrap_or(0);
    let mut out = String::new();
    for t in targets {
        let mark = match t.met {
            Some(true) => "met   ",
            Some(false) => "MISSED",
            None => "n/a   ",
        };
        out.push_str(&format!("  {mark}  {:<w$}  {} (limit {})\n", t.what, t.value, t.limit));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(ns: f64, delivered: u64, expected: u64, lost: u64) -> Sample {
        Sample {
            wall_ns: ns,
            cpu_ns: ns,
            loop_s: 1.0,
            calls: 1000,
            expected: Some(expected),
            delivered: Some(delivered),
            lost: Some(lost),
            ..Sample::default()
        }
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![f64::NAN, 1.0]), Some(1.0));
    }

    #[test]
    fn row_figures() {
        let mut r = Row::new("dense", "dense", "main", Metric::Wall);
        r.samples = vec![sample(1300.0, 10, 10, 0), sample(1200.0, 8, 10, 2), sample(1250.0, 10, 10, 0)];
        r.base_ns = Some(100.0);
        r.floor_ns = Some(1100.0);
        assert_eq!(r.ns(), Some(1250.0));
        assert_eq!(r.added(), Some(1150.0));
        assert!((r.median_ratio().unwrap() - 1.15).abs() < 1e-9);
        assert_eq!(r.delivered(), Some((8, 10)));
        assert_eq!(r.lost(), Some(2));
        assert_eq!(r.records_per_s(), Some(20.0));
        let t = table(&[r.clone()]);
        assert!(t.contains("8/10"), "{t}");
        assert!(t.contains("0 / 2 / 0"), "{t}");
        let j = r.to_json();
        assert_eq!(j["runs"], 3);
        assert_eq!(j["lost_max"], 2);
    }

    /// A row of `ns` per round (rounds 1, 2, ...), rounds listed in `skip` missing.
    fn rounds(id: &str, ns: &[f64], skip: &[usize]) -> Row {
        let mut r = Row::new(id, id, "main", Metric::Wall);
        r.samples = (1..=ns.len())
            .filter(|k| !skip.contains(k))
            .map(|k| Sample { round: k, ..sample(ns[k - 1], 0, 0, 0) })
            .collect();
        r
    }

    #[test]
    fn ratios_by_round_and_by_fastest_run() {
        // Round 2 ran at half the speed: its ratio is the same, its times not.
        let base = rounds("untraced", &[100.0, 200.0, 100.0], &[]);
        let floor = rounds("floor", &[1100.0, 2200.0, 1100.0], &[]);
        let mut x = rounds("sparse", &[1200.0, 2400.0, 1300.0], &[3]);
        assert_eq!(rounds_ratio(&x, &base, &floor), Some(1.1));
        assert_eq!(fastest_ratio(&x, &base, &floor), Some(1.1));
        set_ratios([&mut x], Some(&base), Some(&floor));
        assert_eq!(x.rounds_ratio, Some(1.1));
        assert_eq!(x.ratio(), Some(1.1));
        // Medians mix the speeds: (1800 - 100) / (1100 - 100).
        assert_eq!(x.median_ratio(), Some(1.7));
        // A round without the floor is left out; no floor added cost, no ratio.
        let floor2 = rounds("floor", &[1100.0, 2200.0, 1100.0], &[1]);
        assert_eq!(rounds_ratio(&x, &base, &floor2), Some(1.1));
        assert_eq!(rounds_ratio(&x, &base, &base), None);
    }

    #[test]
    fn note_rows_render() {
        let mut r = Row::new("bpftrace", "bpftrace", "main", Metric::Wall);
        r.note = Some("not installed".into());
        assert!(table(&[r]).contains("not installed"));
    }
}
