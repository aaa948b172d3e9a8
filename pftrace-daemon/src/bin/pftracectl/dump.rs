//! `pftracectl dump`: the trace so far (tracing continues), streamed to
//! stdout or a file; `--since` takes a duration back from now or a Unix time.

use std::{
    fs::File,
    io::{self, IsTerminal as _, Write},
    path::{Path, PathBuf},
    process::ExitCode,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use clap::Args;
use pftrace::{
    control::{self, ClientError},
    protocol::CallFilter,
};

/// Write the trace so far (Chrome Trace Event JSON by default) to stdout; tracing goes on.
///
/// Examples:
///   pftracectl dump > trace.json
///   pftracectl dump --since 5m --function raw_decode -o recent.json
///   pftracectl dump --since 1732540000.5 --pid 1234 > trace.json
///   pftracectl dump --format pfw --pfw-options 'log-format=Object:log-event=Compact' > trace.pfw
///   pftracectl dump --format records > records.json
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct DumpArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Output format: chrome (default), pfw (PerfFlowAspect's format, every
    /// process in one stream) or records (the settrace prototype's JSON).
    #[arg(long, value_name = "FMT")]
    pub format: Option<String>,
    /// PerfFlowAspect options for --format pfw, as in PERFFLOW_OPTIONS
    /// (log-format=Array|Object:log-event=Verbose|Compact:cpu-mem-usage=True|False).
    #[arg(long, value_name = "OPTIONS")]
    pub pfw_options: Option<String>,
    /// Write to FILE instead of stdout.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// The call filter shared by `dump` and `stats`.
#[derive(Debug, Args)]
pub struct FilterArgs {
    /// Only calls that started in the last DURATION (`30s`, `5m`, `2h`, `1d`)
    /// or at/after a Unix time in seconds (`1732540000.5`).
    #[arg(long, value_name = "DURATION_OR_TIME")]
    pub since: Option<String>,
    /// Only calls of this process.
    #[arg(long, value_name = "PID")]
    pub pid: Option<u32>,
    /// Only calls of this function (exact name).
    #[arg(long, value_name = "NAME")]
    pub function: Option<String>,
}

impl FilterArgs {
    pub fn to_filter(&self) -> anyhow::Result<CallFilter> {
        let since_wall_ns = match &self.since {
            None => None,
            Some(text) => Some(parse_since(text, now_ns()).map_err(anyhow::Error::msg)?),
        };
        Ok(CallFilter { since_wall_ns, pid: self.pid, function: self.function.clone() })
    }
}

/// The format as the daemon takes it: PerfFlowAspect options ride after the
/// name (`pfw:log-format=Object`); the daemon checks both (options with
/// another format than pfw are refused, as by pftraced).
fn format(args: &DumpArgs) -> Option<String> {
    match (&args.format, &args.pfw_options) {
        (format, Some(opts)) => Some(format!("{}:{opts}", format.as_deref().unwrap_or("chrome"))),
        (format, None) => format.clone(),
    }
}

pub fn run(socket: &Path, args: &DumpArgs) -> anyhow::Result<ExitCode> {
    let filter = args.filter.to_filter()?;
    let format = format(args);
    let done = match &args.output {
        Some(path) => {
            let mut file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
            let done = control::dump(socket, filter, format.clone(), &mut file)?;
            file.sync_all().with_context(|| format!("writing {}", path.display()))?;
            done
        }
        None => {
            let stdout = io::stdout();
            if stdout.is_terminal() {
                bail!(
                    "refusing to write a trace to a terminal; redirect it (`pftracectl dump > trace.json`) or use -o FILE"
                );
            }
            let mut out = stdout.lock();
            match control::dump(socket, filter, format.clone(), &mut out) {
                Ok(done) => done,
                // `pftracectl dump | head`: the reader left; not our error.
                Err(ClientError::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => {
                    return Ok(ExitCode::from(141));
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    let _ = io::stdout().flush();
    let to = args.output.as_ref().map_or_else(|| "stdout".to_string(), |p| p.display().to_string());
    eprintln!(
        "pftracectl: wrote {} calls ({}, {}) to {to}",
        done.calls,
        super::human::bytes(done.bytes),
        done.format
    );
    Ok(ExitCode::SUCCESS)
}

/// Wall-clock ns now.
fn now_ns() -> i128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i128)
}

/// `30s` / `5m` / `2h` / `1d` back from `now_ns`, or a Unix time in seconds.
pub fn parse_since(text: &str, now_ns: i128) -> Result<i64, String> {
    let text = text.trim();
    let bad = || {
        format!(
            "--since {text:?}: expected a duration like 30s, 5m, 2h or 1d, or a Unix time in seconds like 1732540000"
        )
    };
    let unit = match text.chars().last() {
        Some('s') => Some(1e9),
        Some('m') => Some(60e9),
        Some('h') => Some(3600e9),
        Some('d') => Some(86_400e9),
        _ => None,
    };
    let ns = if let Some(unit) = unit {
        let n: f64 = text[..text.len() - 1].parse().map_err(|_| bad())?;
        if !n.is_finite() || n < 0.0 {
            return Err(bad());
        }
        now_ns - (n * unit) as i128
    } else {
        let ns = unix_ns(text).ok_or_else(bad)?;
        // 2000-01-01: anything earlier is surely a duration missing its unit.
        if ns < 946_684_800 * 1_000_000_000 {
            return Err(format!(
                "--since {text}: that is a Unix time before 2000; for a duration add a unit (e.g. {text}s or {text}m)"
            ));
        }
        ns
    };
    i64::try_from(ns.max(0)).map_err(|_| bad())
}

/// `SECONDS[.FRACTION]` as exact ns (an f64 would be off by hundreds of ns).
fn unix_ns(text: &str) -> Option<i128> {
    let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || whole.len() > 12 || !digits(whole) || !digits(frac) {
        return None;
    }
    let frac_ns: i128 = format!("{:0<9}", &frac[..frac.len().min(9)]).parse().ok()?;
    Some(whole.parse::<i128>().ok()? * 1_000_000_000 + frac_ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_forms() {
        let now = 1_732_540_000 * 1_000_000_000i128;
        assert_eq!(parse_since("30s", now).unwrap() as i128, now - 30_000_000_000);
        assert_eq!(parse_since("5m", now).unwrap() as i128, now - 300_000_000_000);
        assert_eq!(parse_since("1.5h", now).unwrap() as i128, now - 5_400_000_000_000);
        assert_eq!(parse_since("1d", now).unwrap() as i128, now - 86_400_000_000_000);
        assert_eq!(parse_since("1732539000.5", now).unwrap(), 1_732_539_000_500_000_000);
        assert_eq!(parse_since("1732539000.000000001", now).unwrap(), 1_732_539_000_000_000_001);
        assert_eq!(parse_since("1732539000", now).unwrap(), 1_732_539_000_000_000_000);
        assert!(parse_since("1e9", now).is_err());
        assert!(parse_since("30", now).unwrap_err().contains("add a unit (e.g. 30s or 30m)"));
        assert!(parse_since("5x", now).unwrap_err().contains("expected a duration like 30s"));
        assert!(parse_since("-5m", now).is_err());
        assert!(parse_since("m", now).is_err());
    }
}
