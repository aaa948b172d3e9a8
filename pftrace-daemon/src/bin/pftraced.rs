//! pftraced: trace named Python functions in a running process (`--pid`) or
//! in a command it launches (`-- CMD ARGS...`), print a per-function summary
//! and write a Chrome trace.

use std::{ffi::OsString, fs::File, path::PathBuf, process::ExitCode};

use anyhow::{Context as _, bail};
use clap::Parser;
use pftrace::{
    launch::{self, Launched},
    output::{Chrome, TraceFormat as _},
    procwatch, summary, target,
    trace::Trace,
    tracer::{Tracer, TracerOptions},
};
use tokio::signal::unix::{SignalKind, signal};

/// Trace named Python functions through CPython's USDT probes, with eBPF.
///
/// Names are matched in the kernel: calls of other functions cost the
/// traced process one probe hit each (about a microsecond) and produce no
/// record. The traced CPython must fire the probes: 3.6-3.10 or 3.15+,
/// built --with-dtrace.
///
/// Examples:
///   sudo pftraced -t foo -t bar --pid 1234
///   sudo pftraced -t compute -o trace.json -- python3 app.py --size 10
#[derive(Debug, Parser)]
#[command(name = "pftraced", version, verbatim_doc_comment)]
struct Cli {
    /// Function name to trace (exact match of the code object's name, e.g. `raw_decode`).
    /// Repeat the flag or separate names with commas.
    #[arg(
        short = 't',
        long = "trace",
        value_name = "NAME",
        value_delimiter = ',',
        required = true
    )]
    names: Vec<String>,

    /// Trace this running process until it exits or you press Ctrl-C.
    #[arg(short, long, value_name = "PID", conflicts_with = "command")]
    pid: Option<u32>,

    /// Where to write the Chrome trace JSON (opens in Perfetto / chrome://tracing).
    /// Default: pftrace-<pid>.json in the current directory.
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,

    /// Size of the kernel-to-daemon ring buffer in bytes (a power of two, >= 4096).
    /// Records that do not fit are counted as lost, never dropped silently.
    #[arg(long, value_name = "BYTES", default_value_t = 16 << 20, value_parser = ring_size)]
    ring_buffer_size: u32,

    /// Do not print the per-function summary.
    #[arg(short, long)]
    quiet: bool,

    /// Command to launch and trace: probes are in place before its first line
    /// runs, and pftraced exits with the command's exit status.
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<OsString>,
}

fn ring_size(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|e| format!("{e}"))?;
    if n < 4096 || !n.is_power_of_two() {
        return Err(format!("{n} is not a power of two >= 4096"));
    }
    Ok(n)
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("pftraced: error: {err:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let names: Vec<String> = cli.names.iter().map(|n| n.trim().to_string()).collect();
    if cli.pid.is_none() && cli.command.is_empty() {
        bail!("nothing to trace: give --pid PID, or a command after `--` (see --help)");
    }
    let opts = TracerOptions {
        names,
        ring_bytes: cli.ring_buffer_size,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let mut tracer = Tracer::new(&opts)?;

    if let Some(pid) = cli.pid {
        let target = target::inspect(pid)?;
        let exit = procwatch::pidfd(pid).with_context(|| format!("watching pid {pid}"))?;
        tracer.attach(&target)?;
        announce(&opts.names, &target);
        let trace = rt.block_on(async {
            let mut int = signal(SignalKind::interrupt())?;
            let mut term = signal(SignalKind::terminate())?;
            let stop = async {
                tokio::select! {
                    _ = procwatch::exited(exit) => eprintln!("pftraced: pid {pid} exited"),
                    _ = int.recv() => eprintln!("pftraced: interrupted, stopping"),
                    _ = term.recv() => eprintln!("pftraced: terminated, stopping"),
                }
            };
            anyhow::Ok(tracer.run(stop).await?)
        })?;
        finish(&cli, &trace, pid)?;
        return Ok(ExitCode::SUCCESS);
    }

    let mut child = Launched::spawn_stopped(&cli.command)?;
    let pid = child.pid();
    let attached = target::inspect(pid)
        .map_err(anyhow::Error::from)
        .and_then(|t| Ok((procwatch::pidfd(pid)?, t)))
        .and_then(|(fd, t)| tracer.attach(&t).map(|()| (fd, t)).map_err(Into::into));
    let (exit, target) = match attached {
        Ok(v) => v,
        Err(err) => {
            child.kill();
            return Err(err.context(format!("cannot trace {:?}; it was not run", cli.command[0])));
        }
    };
    announce(&opts.names, &target);
    child.resume()?;
    let trace = rt.block_on(async {
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        let stop = async {
            let mut exited = std::pin::pin!(procwatch::exited(exit));
            let mut interrupts = 0;
            loop {
                tokio::select! {
                    _ = &mut exited => break,
                    // Ctrl-C reaches the command too (same terminal); keep
                    // tracing until it exits, unless pressed twice.
                    _ = int.recv() => {
                        interrupts += 1;
                        if interrupts >= 2 {
                            eprintln!("pftraced: interrupted twice, stopping (pid {pid} keeps running)");
                            break;
                        }
                        eprintln!("pftraced: waiting for pid {pid} to exit (Ctrl-C again to stop tracing)");
                    }
                    _ = term.recv() => child.signal(libc::SIGTERM),
                }
            }
        };
        anyhow::Ok(tracer.run(stop).await?)
    })?;
    let status = child.try_wait().context("waiting for the command")?;
    finish(&cli, &trace, pid)?;
    Ok(match status {
        Some(status) => ExitCode::from(launch::exit_code(status).clamp(0, 255) as u8),
        None => ExitCode::from(130),
    })
}

fn announce(names: &[String], target: &target::Target) {
    let version = target
        .version
        .map_or("CPython (version unknown)".into(), |v| {
            format!("CPython {v}")
        });
    eprintln!(
        "pftraced: attached to pid {} ({version}, {}), tracing {}",
        target.pid,
        target.binary.display(),
        names.join(", ")
    );
}

fn finish(cli: &Cli, trace: &Trace, pid: u32) -> anyhow::Result<()> {
    if !cli.quiet {
        eprint!("{}", summary::render(trace));
    }
    let path = cli
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("pftrace-{pid}.json")));
    let mut file =
        File::create(&path).with_context(|| format!("creating trace file {}", path.display()))?;
    Chrome
        .write(trace, &mut file)
        .with_context(|| format!("writing trace file {}", path.display()))?;
    eprintln!(
        "pftraced: wrote {} calls to {}",
        trace.calls.len(),
        path.display()
    );
    Ok(())
}
