//! pftracectl: ask a running pftraced what it is tracing, fetch the trace or
//! per-function figures, change the traced names, clear or stop it — over
//! the daemon's Unix socket (see `pftrace::protocol`).

// A binary's root resolves modules next to itself (src/bin/), so point at
// the subcommand modules explicitly.
#[path = "pftracectl/dump.rs"]
mod dump;
#[path = "pftracectl/human.rs"]
mod human;
#[path = "pftracectl/names.rs"]
mod names;
#[path = "pftracectl/stats.rs"]
mod stats;
#[path = "pftracectl/status.rs"]
mod status;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use pftrace::{
    control::{self, ClientError},
    protocol::{Command, DEFAULT_SOCKET},
};

/// Control a running pftraced: status, trace dumps, statistics, traced names.
///
/// pftracectl talks to pftraced over its control socket, which only root
/// (and members of the socket group set in pftraced.toml) may use. When
/// pftraced answers "busy" (as many clients or dumps as it serves at once),
/// pftracectl tries again with growing pauses for up to 5 s, then says so.
///
/// Examples:
///   sudo pftracectl status
///   sudo pftracectl dump > trace.json                # open in https://ui.perfetto.dev
///   sudo pftracectl dump --since 5m --pid 1234 > last5m.json
///   sudo pftracectl stats --per-pid --function raw_decode
///   sudo pftracectl add -t compute -t 'json/decoder.py:raw_decode'
///   sudo pftracectl remove -t compute
///   sudo pftracectl --socket /tmp/pf.sock status --json
#[derive(Debug, Parser)]
#[command(name = "pftracectl", version, verbatim_doc_comment)]
struct Cli {
    /// The daemon's control socket (socket.path in pftraced.toml).
    #[arg(long, global = true, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,

    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// What is traced: names, targets, interpreters, processes, counters
    /// (including records lost in the kernel), output files, refusals.
    Status {
        /// Print the daemon's reply as JSON instead of a summary.
        #[arg(long)]
        json: bool,
    },
    Dump(dump::DumpArgs),
    Stats(stats::StatsArgs),
    /// Start tracing more names (same syntax as pftraced -t).
    ///
    /// Example: pftracectl add -t compute -t 'json/decoder.py:raw_decode' -t 'test_*'
    #[command(verbatim_doc_comment)]
    Add(names::NamesArgs),
    /// Stop tracing some names (as listed by `pftracectl status`).
    ///
    /// Example: pftracectl remove -t compute
    #[command(verbatim_doc_comment)]
    Remove(names::NamesArgs),
    /// Forget the calls kept in memory (trace files already written are kept).
    Clear,
    /// Make pftraced finish its output files, detach its probes and exit.
    Stop,
    /// Print the shell line that starts programs with pftrace's in-process
    /// agent on their path, for CPython 3.11-3.13 (which cannot load it once
    /// running; 3.14+ can, through `pftraced --pid`). Their Pythons then
    /// connect to this pftraced at start-up, and are traced when in its scope.
    ///
    /// Example: eval "$(sudo pftracectl env)"; python3.12 job.py
    #[command(verbatim_doc_comment)]
    Env,
    /// Print a file of calls pftraced kept (it names it when a trace could
    /// not be written: `pftraced-<pid>.calls.bin`) as JSON lines, one call a
    /// line: pid, tid, name, file, line, start_ns, end_ns (the kernel's
    /// monotonic ns), depth, incomplete, cpu_ns, rss_entry_bytes, rss_return_bytes.
    ///
    /// Example: pftracectl calls /data/pftraced-1234.calls.bin > calls.jsonl
    #[command(verbatim_doc_comment)]
    Calls {
        /// The calls file.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("pftracectl: error: {err:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let socket = cli.socket.as_path();
    match cli.command {
        Cmd::Status { json } => status::run(socket, json)?,
        Cmd::Dump(args) => return dump::run(socket, &args),
        Cmd::Stats(args) => stats::run(socket, &args)?,
        Cmd::Add(args) => names::run(socket, Command::Add { names: args.names })?,
        Cmd::Remove(args) => names::run(socket, Command::Remove { names: args.names })?,
        Cmd::Clear => {
            let result = request(socket, Command::Clear {})?;
            let n = result["cleared"].as_u64().unwrap_or(0);
            println!("cleared {n} calls from memory (trace files already written are kept)");
        }
        Cmd::Calls { file } => print_calls(&file)?,
        Cmd::Env => {
            let result = request(socket, Command::Env {})?;
            println!("{}", result["line"].as_str().unwrap_or_default());
        }
        Cmd::Stop => {
            request(socket, Command::Stop {})?;
            println!("pftraced is stopping: finishing its output files and detaching");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints a kept calls file as JSON lines (needs no daemon).
fn print_calls(path: &std::path::Path) -> anyhow::Result<()> {
    use std::io::Write as _;

    use anyhow::Context as _;
    use pftrace::output::spill::{CallReader, json_line};

    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let reader = CallReader::open(file).with_context(|| format!("reading {}", path.display()))?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut line = Vec::new();
    for call in reader {
        let call = call.with_context(|| format!("reading {}", path.display()))?;
        line.clear();
        json_line(&call, &mut line);
        out.write_all(&line)?;
    }
    out.flush()?;
    Ok(())
}

/// Sends `command`; returns the reply's result.
fn request(socket: &std::path::Path, command: Command) -> Result<serde_json::Value, ClientError> {
    Ok(control::request(socket, command)?.result.unwrap_or_default())
}
