//! `pftracectl stats`: per-function (optionally per-process) call counts and
//! latency percentiles, as a table or JSON.

use std::{fmt::Write as _, path::Path};

use clap::Args;
use pftrace::protocol::{Command, FunctionStats, StatsGrouping, StatsReply, StatsSource, Status};

use super::{dump::FilterArgs, human::human_ns};

/// Per-function figures: calls, total, mean, p50, p95, p99, max.
///
/// One row per function, named by its qualified path where pftraced
/// resolved it (`json.decoder.JSONDecoder.raw_decode`; methods `A.run` and
/// `B.run` of one file are two rows), else by its code name; `--by name`
/// gives one row per (code name, file) instead.
///
/// Without a filter (or with only --function) they cover every call since
/// tracing started; with --since, --pid or --per-pid only the calls still in
/// memory (limits.max_calls_in_memory), and the first line says which.
/// Calls, total, mean and max are exact; p50, p95 and p99 come from a
/// histogram of bounded size and are within 0.4% of the exact values.
///
/// Examples:
///   pftracectl stats
///   pftracectl stats --per-pid --since 10m
///   pftracectl stats --function raw_decode --json
///   pftracectl stats --job 4242     # one batch job's calls (pftraced --jobs-under)
///   pftracectl stats --by name
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct StatsArgs {
    /// One row per function and process.
    #[arg(long)]
    pub per_pid: bool,
    /// Rows per qualified function (`function`, the default) or per code
    /// name and file (`name`).
    #[arg(long, value_enum, default_value = "function")]
    pub by: By,
    /// Print the daemon's reply as JSON.
    #[arg(long)]
    pub json: bool,
    /// Figures of one batch job's calls (every call of it, running or
    /// finished; the most recent job with this id).
    #[arg(long, value_name = "ID", conflicts_with_all = ["per_pid", "since", "pid", "function"])]
    pub job: Option<String>,
    #[command(flatten)]
    pub filter: FilterArgs,
}

/// `--by`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum By {
    Function,
    Name,
}

pub fn run(socket: &Path, args: &StatsArgs) -> anyhow::Result<()> {
    if let Some(id) = &args.job {
        return job(socket, id, args.json);
    }
    let filter = args.filter.to_filter()?;
    let by = match args.by {
        By::Function => StatsGrouping::Function,
        By::Name => StatsGrouping::Name,
    };
    let result = super::request(socket, Command::Stats { filter, per_pid: args.per_pid, by })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
        return Ok(());
    }
    let reply: StatsReply = serde_json::from_value(result)
        .map_err(|e| anyhow::anyhow!("pftraced sent stats this pftracectl cannot read ({e}); try --json"))?;
    println!("{}", source_line(&reply));
    print!("{}", render(&reply.functions, args.per_pid));
    if let Some(note) = bounds_note(&reply.bounds) {
        println!("{note}");
    }
    Ok(())
}

/// What met pftraced's memory bounds, if anything did.
pub fn bounds_note(b: &pftrace::protocol::BoundCounts) -> Option<String> {
    let others = b.agent_connections_refused + b.codes_over_bytes;
    (b.strings_folded + b.stats_folded + b.open_calls_dropped + others > 0).then(|| {
        let mut note = format!(
            "BOUNDS (README, \"Bounds\"): {} records with names not kept, {} calls counted in <other> rows, {} \
             calls not traced (too many open at once)",
            b.strings_folded, b.stats_folded, b.open_calls_dropped
        );
        if b.agent_connections_refused > 0 {
            note += &format!(", {} connections to the agent socket refused", b.agent_connections_refused);
        }
        if b.codes_over_bytes > 0 {
            note += &format!(", {} functions not resolved (answers over their bytes)", b.codes_over_bytes);
        }
        note
    })
}

/// `--job ID`: the job's figures, from the daemon's status.
fn job(socket: &Path, id: &str, json: bool) -> anyhow::Result<()> {
    let result = super::request(socket, Command::Status {})?;
    let status: Status = serde_json::from_value(result)
        .map_err(|e| anyhow::anyhow!("pftraced sent a status this pftracectl cannot read ({e})"))?;
    let Some(job) = status.jobs.iter().rev().find(|j| j.id == id) else {
        let known: Vec<&str> = status.jobs.iter().map(|j| j.id.as_str()).collect();
        anyhow::bail!(
            "no job {id:?} (pftraced knows {}; jobs come from --jobs-under)",
            if known.is_empty() { "no jobs".to_string() } else { format!("jobs {}", known.join(", ")) }
        );
    };
    if json {
        println!("{}", serde_json::to_string_pretty(job)?);
        return Ok(());
    }
    let state = if job.running { "running" } else { "finished" };
    println!("job {} ({state}, {}): every call of its processes ({} calls)", job.id, job.cgroup, job.calls);
    print!("{}", render(&job.functions, false));
    Ok(())
}

/// Which calls the figures cover.
pub fn source_line(reply: &StatsReply) -> String {
    let error = format!("p50/p95/p99 within {:.1}%", reply.percentile_error * 100.0);
    match reply.source {
        StatsSource::AllCalls => {
            let n: u64 = reply.functions.iter().map(|f| f.calls).sum();
            format!("every call since tracing started ({n} calls); {error}")
        }
        StatsSource::CallsInMemory => format!(
            "calls in memory only ({} of the {} since tracing started; --since, --pid and --per-pid see only \
             these); {error}",
            reply.calls_in_memory, reply.calls_total
        ),
    }
}

/// The table, with a note when some calls never returned.
pub fn render(rows: &[FunctionStats], per_pid: bool) -> String {
    if rows.is_empty() {
        return "no calls recorded (for this filter)\n".into();
    }
    let mut header = vec!["function", "file"];
    if per_pid {
        header.push("pid");
    }
    header.extend(["calls", "total", "mean", "p50", "p95", "p99", "max"]);
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut cells = vec![r.label().to_string(), r.file.clone()];
            if per_pid {
                cells.push(r.pid.map_or_else(|| "-".into(), |p| p.to_string()));
            }
            let calls = if r.incomplete > 0 {
                format!("{}({}!)", r.calls, r.incomplete)
            } else {
                r.calls.to_string()
            };
            cells.push(calls);
            for ns in [r.total_ns, r.mean_ns, r.p50_ns, r.p95_ns, r.p99_ns, r.max_ns] {
                cells.push(human_ns(ns));
            }
            cells
        })
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|i| table.iter().map(|row| row[i].len()).chain([header[i].len()]).max().unwrap_or(0))
        .collect();
    // function and file left-aligned, numbers right-aligned.
    let text_columns = 2;
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let w = widths[i];
            let _ = if i < text_columns { write!(s, "{cell:<w$}  ") } else { write!(s, "{cell:>w$}  ") };
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(&header);
    for row in &table {
        line(&row.iter().map(String::as_str).collect::<Vec<_>>());
    }
    if rows.iter().any(|r| r.incomplete > 0) {
        out.push_str(
            "(N!) = calls with no return seen (closed when the process exited or tracing stopped)\n",
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(function: &str, pid: Option<u32>, incomplete: u64) -> FunctionStats {
        FunctionStats {
            function: function.into(),
            file: "/srv/app.py".into(),
            line: None,
            module: None,
            qualname: None,
            path: None,
            pid,
            calls: 12,
            incomplete,
            total_ns: 3_000_000_000,
            mean_ns: 250_000_000,
            p50_ns: 1_500,
            p95_ns: 2_000_000,
            p99_ns: 900,
            max_ns: 12,
        }
    }

    #[test]
    fn table() {
        let text = render(&[row("compute", Some(42), 0), row("f", Some(7), 2)], true);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "function  file         pid   calls   total      mean     p50     p95    p99   max"
        );
        assert_eq!(
            lines[1],
            "compute   /srv/app.py   42      12  3.000s  250.00ms  1.50us  2.00ms  900ns  12ns"
        );
        assert_eq!(
            lines[2],
            "f         /srv/app.py    7  12(2!)  3.000s  250.00ms  1.50us  2.00ms  900ns  12ns"
        );
        assert!(lines[3].starts_with("(N!) = calls with no return seen"));
        let text = render(&[row("compute", None, 0)], false);
        // Resolved rows are named by their qualified path.
        let mut resolved = row("run", None, 0);
        resolved.path = Some("app.Solver.run".into());
        assert!(
            render(&[resolved], false).lines().nth(1).unwrap().starts_with("app.Solver.run  /srv/app.py")
        );
        assert!(text.starts_with("function  file         calls   total"), "{text}");
        assert_eq!(render(&[], false), "no calls recorded (for this filter)\n");
    }

    #[test]
    fn says_which_calls_it_covers() {
        let mut reply = StatsReply {
            source: StatsSource::AllCalls,
            calls_total: 2_019_134,
            calls_in_memory: 500_000,
            percentile_error: 1.0 / 256.0,
            functions: vec![row("f", None, 0), row("g", None, 0)],
            bounds: Default::default(),
        };
        assert_eq!(
            source_line(&reply),
            "every call since tracing started (24 calls); p50/p95/p99 within 0.4%"
        );
        reply.source = StatsSource::CallsInMemory;
        assert_eq!(
            source_line(&reply),
            "calls in memory only (500000 of the 2019134 since tracing started; --since, --pid and --per-pid \
             see only these); p50/p95/p99 within 0.4%"
        );
    }
}
