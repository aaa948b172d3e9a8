//! pftraced: trace named Python functions through CPython's USDT probes, in
//! running processes (`--pid`), a command it launches (`-- CMD ARGS...`),
//! every Python in a cgroup (`--cgroup`, for batch jobs) or on the host
//! (`--all`); print a per-function summary and write a trace (Chrome JSON,
//! PerfFlowAspect's .pfw files, or the settrace prototype's records JSON).

use std::{ffi::OsString, os::unix::ffi::OsStrExt as _, path::PathBuf, process::ExitCode};

use anyhow::{Context as _, bail};
use clap::Parser;
use pftrace::{
    config::{Config, DEFAULT_CONFIG},
    daemon::{Daemon, DaemonOptions},
    kernel::sched,
    launch::{self, Launched},
    output::{self, Choice, destination::Destination, summary},
    target::Target,
    trace::Trace,
};
use tokio::signal::unix::{SignalKind, signal};

/// Trace named Python functions through CPython's USDT probes, with eBPF.
///
/// Names are matched in the kernel: calls of other functions cost a traced
/// process one probe hit each (about a microsecond) and produce no record.
/// The CPython must fire the probes: 3.6-3.10 or 3.15+, built --with-dtrace.
///
/// Name forms (-t), and where each is decided:
///   foo                        exact co_name: in the kernel
///   app/io.py:load             co_name in the kernel, then the path suffix in user space
///   test_*                     the literal prefix in the kernel, the rest in user space
///   JSONDecoder.raw_decode     qualified name (__qualname__), any module: co_name
///                              (`raw_decode`) in the kernel, the qualified name in user
///                              space once the code object is resolved
///   json.decoder:JSONDecoder.raw_decode, json.decoder:*
///                              MODULE:QUALNAME (a glob; `*` matches dots too): as above;
///                              when the last dotted part has a wildcard (`json.decoder:*`,
///                              `A.get_*`) the kernel passes every call and user space decides
/// A part before `:` that contains `/` or ends in `.py` is a file, else a module.
/// Records dropped in user space are counted (`pftracectl status`). See the README.
///
/// Examples:
///   sudo pftraced -t foo -t bar --pid 1234
///   sudo pftraced -t compute -o trace.json -- python3 app.py --size 10
///   sudo pftraced -t compute --format pfw -o pfw-traces -- python3 app.py
///   sudo pftraced -t 'solver.py:step' --cgroup /sys/fs/cgroup/unified/job42 --output-dir /var/lib/pftrace
///   sudo pftraced -t task --cgroup /sys/fs/cgroup/unified/job42 --binary /opt/env/bin/python3.9
///                                  # every call of the job's short-lived Pythons, from their first line
///   sudo pftraced -t step --jobs-under /sys/fs/cgroup/system.slice/slurmstepd.scope \
///        --job-pattern 'job_{id}' --job-output-dir /var/lib/pftrace/jobs
///                                  # one trace per Slurm job: pftrace-job-<id>.json, written when
///                                  # the job's cgroup is removed (`pftracectl status` lists the jobs)
///   sudo pftracectl stats          # while a daemon with --serve/--cgroup/--all runs
#[derive(Debug, Parser)]
#[command(name = "pftraced", version, verbatim_doc_comment)]
struct Cli {
    /// Function to trace: NAME, FILE:NAME, a glob, CLASS.NAME or MODULE:QUALNAME (see above).
    /// Repeat the flag or separate with commas.
    #[arg(short = 't', long = "trace", value_name = "NAME", value_delimiter = ',')]
    names: Vec<String>,

    /// Trace this running process until it exits (repeatable).
    #[arg(short, long = "pid", value_name = "PID")]
    pids: Vec<u32>,

    /// Trace every Python process in this cgroup v2 directory and its
    /// descendants, including ones started later (repeatable). Runs until stopped.
    #[arg(long = "cgroup", value_name = "DIR")]
    cgroups: Vec<PathBuf>,

    /// Batch jobs: trace every Python in the child cgroups of this cgroup v2
    /// directory whose names match --job-pattern, one trace file per job.
    /// Jobs may start and end any number of times while pftraced runs; they
    /// are seen with inotify as their cgroups are made and removed. A job's
    /// trace is written to --job-output-dir when its cgroup is removed.
    /// Slurm (cgroup v2): /sys/fs/cgroup/system.slice/slurmstepd.scope;
    /// `systemd-run --scope --slice=pyjob --unit=jobID ...`:
    /// /sys/fs/cgroup/pyjob.slice with --job-pattern 'job{id}.scope'. A
    /// directory that does not exist yet is waited for. Runs until stopped.
    #[arg(long = "jobs-under", value_name = "DIR")]
    jobs_root: Option<PathBuf>,

    /// What a job's cgroup is called: {id} stands for the job id (it names
    /// the trace file), * for any text, the rest is literal. Default: job_{id} (Slurm).
    #[arg(long, value_name = "PATTERN")]
    job_pattern: Option<String>,

    /// Directory for the jobs' traces (created 0750 if missing):
    /// pftrace-job-<id>.json (records: .records.json; pfw: a directory
    /// pftrace-job-<id> of PerfFlowAspect files); a job id seen again gets
    /// pftrace-job-<id>.2.json, ... Default: --output-dir.
    #[arg(long, value_name = "DIR")]
    job_output_dir: Option<PathBuf>,

    /// Format of the jobs' traces: chrome (default), records, pfw or pfw:PERFFLOW_OPTIONS.
    #[arg(long, value_name = "FMT")]
    job_format: Option<String>,

    /// Fail at start if a --cgroup or --jobs-under directory does not exist.
    /// Without it, pftraced says it waits, and traces the cgroup once it is made.
    #[arg(long)]
    cgroups_must_exist: bool,

    /// Trace every probe-enabled Python on the host (probes are attached to
    /// whole binaries: every process using them pays the probe cost). Runs until stopped.
    #[arg(long)]
    all: bool,

    /// Attach to this interpreter file (a python executable or libpython)
    /// host-wide at start, so processes that start in scope running it are
    /// traced from their first instruction, however short-lived. Without it,
    /// a new process's probes go live when pftraced handles its exec (0.3-5 ms
    /// after it here, while a CPython 3.9 needs about 12 ms to its first line),
    /// and calls it makes before that are not seen. Cost: while
    /// pftraced runs, every process on the host running this file takes the
    /// probe trap on each Python call (about 1.2 us here), though only calls in
    /// scope are recorded (repeatable).
    #[arg(long = "binary", value_name = "FILE")]
    binaries: Vec<PathBuf>,

    /// Configuration file (TOML). Flags given here override it.
    #[arg(long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
    config: PathBuf,

    /// Listen on the control socket for pftracectl (implied by --cgroup, --all and --socket).
    #[arg(long)]
    serve: bool,

    /// Control socket path (default from the config, else /run/pftrace/pftraced.sock).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,

    /// Write completed calls continuously to rolling trace files in this directory.
    #[arg(long, value_name = "DIR")]
    output_dir: Option<PathBuf>,

    /// Write the trace here when tracing ends. For --format pfw this is a
    /// directory (created if missing) that gets one PerfFlowAspect file per
    /// traced process, perfflow.<array|object>.<hostname>.<pid>.pfw; without
    /// -o, log-dir from --pfw-options. Default for --pid and commands:
    /// pftrace-<pid>.json (records: pftrace-<pid>.records.json; pfw: the
    /// current directory). Checked before tracing starts; an existing file is
    /// replaced (atomically) only if it is a regular file you own, and
    /// symbolic links other users made are never followed.
    #[arg(short, long, value_name = "FILE|DIR")]
    output: Option<PathBuf>,

    /// Trace format of -o: chrome (Chrome Trace Event JSON for Perfetto and
    /// chrome://tracing), pfw (PerfFlowAspect's trace files, read by its
    /// tools and Hatchet) or records (the settrace prototype's JSON).
    #[arg(long, value_name = "FMT", default_value = "chrome")]
    format: String,

    /// PerfFlowAspect options for --format pfw, in PERFFLOW_OPTIONS form:
    /// log-format=Array|Object, log-event=Verbose|Compact,
    /// cpu-mem-usage=True|False, log-filename-include=hostname,pid,name,
    /// name=NAME, log-dir=DIR. Default: Array, Verbose, cpu-mem-usage=True.
    /// Example: --pfw-options 'log-format=Object:log-event=Compact'
    #[arg(long, value_name = "OPTIONS")]
    pfw_options: Option<String>,

    /// Kernel-to-daemon ring buffer size in bytes (a power of two, >= 4096).
    /// Records that do not fit are counted as lost, never dropped silently.
    #[arg(long, value_name = "BYTES", value_parser = ring_size)]
    ring_buffer_size: Option<u32>,

    /// Completed calls kept in memory for `dump` and `stats` (default
    /// 500000). The trace file written at the end has every call: they are
    /// kept in a file beside it meanwhile, and N is also how many it sorts
    /// in memory at once when writing it.
    #[arg(long, value_name = "N")]
    max_calls_in_memory: Option<usize>,

    /// CPU slots (per-call CPU time to the microsecond) the threads of one
    /// traced process hold at once, of the node's 16384 (default 1024):
    /// its further threads get the scheduler's figure, exact to a tick,
    /// counted (cpu_slots_process_full). Config file: `[limits]
    /// cpu_slots_per_process`.
    #[arg(long, value_name = "N", value_parser = slots_per_process)]
    cpu_slots_per_process: Option<u32>,

    /// Milliseconds between CPU/memory readings of each traced process (counter
    /// tracks in the trace); 0 turns sampling off. Default 1000.
    #[arg(long, value_name = "MS")]
    sample_interval: Option<u64>,

    /// Trace every CPython 3.11+ through pftrace's in-process agent, also
    /// 3.15+ whose USDT probes work (they are used by default: no code
    /// enters the process). With the agent, calls of untraced functions run
    /// at their untraced speed (each function is decided once), where USDT
    /// costs about 1.1 us on every Python call of a traced process. A traced
    /// call's entry and return are stamped in the process and drained by
    /// the kernel in batches: +0.30-0.35 us per traced call through pftraced
    /// (measured here); `PFTRACE_AGENT_BATCH=0` in pftraced's environment
    /// reports each of them to the kernel instead (+2.4-3.3 us that day).
    #[arg(long)]
    agent: bool,

    /// How the agent reports each traced call to the kernel: `uprobe`
    /// (default: a uprobe on a function of the agent; only traced processes
    /// pay) or `syscall` (a syscall that does not exist, seen by a tracepoint
    /// on every syscall of the host: about 1/3 less per traced call, +665-747
    /// against +1,015-1,063 ns here, but every syscall of every process on
    /// the host pays about +18 ns while an agent is connected, and a process
    /// that later installs a seccomp filter killing on unknown syscalls would
    /// be killed; processes with a seccomp filter at start report by uprobe).
    /// Config file: `[agent] report`.
    #[arg(long, value_name = "ROAD")]
    agent_report: Option<pftrace::config::AgentReport>,

    /// Benchmarks: attach eBPF programs that return at once, to measure the
    /// cost of the uprobes alone (nothing is recorded).
    #[arg(long, hide = true)]
    floor: bool,

    /// Do not print the per-function summary (calls, total, mean, p50, p95,
    /// p99 and max of every call traced, also those no longer in memory;
    /// p50/p95/p99 within 0.4% of the exact values, the rest exact).
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

fn slots_per_process(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|e| format!("{e}"))?;
    pftrace::config::check_cpu_slots_per_process(n)?;
    Ok(n)
}

fn main() -> ExitCode {
    pftrace::logging::init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("pftraced: error: {}", pftrace::logging::chain(&err));
            ExitCode::from(1)
        }
    }
}

/// Merges the config file and the flags.
fn options(cli: &Cli) -> anyhow::Result<DaemonOptions> {
    let explicit = cli.config.as_os_str() != DEFAULT_CONFIG;
    let mut config = Config::load(&cli.config, explicit)?;
    let names = if cli.names.is_empty() { config.names.clone() } else { cli.names.clone() };
    let mut pids = config.targets.pids.clone();
    pids.extend(&cli.pids);
    let mut cgroups = config.targets.cgroups.clone();
    cgroups.extend(cli.cgroups.iter().cloned());
    let all = cli.all || config.targets.all;
    let mut binaries = config.targets.binaries.clone();
    binaries.extend(cli.binaries.iter().cloned());
    if let Some(path) = &cli.socket {
        config.socket.path = path.clone();
    }
    if let Some(dir) = &cli.output_dir {
        config.output.dir = Some(dir.clone());
    }
    if let Some(n) = cli.ring_buffer_size {
        config.limits.ring_buffer_bytes = n;
    }
    if let Some(road) = cli.agent_report {
        config.agent.report = road;
    }
    if let Some(ms) = cli.sample_interval {
        config.sampling.interval_ms = ms;
    }
    if let Some(n) = cli.max_calls_in_memory {
        config.limits.max_calls_in_memory = n.max(1);
    }
    if let Some(n) = cli.cpu_slots_per_process {
        config.limits.cpu_slots_per_process = n;
    }
    if cli.cgroups_must_exist {
        config.targets.wait_for_cgroups = false;
    }
    let jobs = &mut config.jobs;
    jobs.root = cli.jobs_root.clone().or(jobs.root.take());
    if let Some(p) = &cli.job_pattern {
        jobs.pattern = p.clone();
    }
    if let Some(d) = &cli.job_output_dir {
        jobs.dir = Some(d.clone());
    }
    if let Some(f) = &cli.job_format {
        jobs.format = f.clone();
    }
    pftrace::job_pattern::JobPattern::parse(&jobs.pattern).context("--job-pattern")?;
    output::choose(&jobs.format, None).context("--job-format")?;
    let has_jobs = jobs.root.is_some();
    if has_jobs && jobs.dir.is_none() && config.output.dir.is_none() {
        bail!(
            "--jobs-under needs a directory for the jobs' traces: give --job-output-dir DIR (or --output-dir)"
        );
    }
    let serve = cli.serve || cli.socket.is_some() || all || !cgroups.is_empty() || has_jobs;
    if pids.is_empty() && cgroups.is_empty() && !all && !has_jobs && cli.command.is_empty() {
        bail!(
            "nothing to trace: give --pid PID, --cgroup DIR, --jobs-under DIR, --all, or a command after `--` \
             (see --help)"
        );
    }
    Ok(DaemonOptions { names, pids, cgroups, all, binaries, serve, config, floor: cli.floor })
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let opts = options(&cli)?;
    if cli.agent {
        pftrace::target::prefer_agent();
    }
    let format = output::choose(&cli.format, cli.pfw_options.as_deref()).context("--format")?;
    // The event loop and the attaching threads wake promptly for new
    // processes (see pftrace::kernel::sched); nothing is lost without it.
    if let Err(err) = sched::short_slice() {
        log::debug!("no short scheduler slice: {err}");
    }
    // Before any thread starts (pftrace::fdtable).
    let fds = pftrace::fdtable::fds_for(opts.config.limits.max_processes);
    match pftrace::fdtable::raise_limit(fds) {
        // The hard limit is lower than what max_processes needs.
        Ok(limit) if (limit.now as usize) < fds => log::warn!(
            "open-file limit {} (the hard limit): limits.max_processes = {} needs {fds} (two per traced \
             process, and room for pftraced's own); past what it holds, new processes are refused with a \
             message (raise the hard limit, e.g. LimitNOFILE= in the unit, or lower limits.max_processes)",
            limit.now,
            opts.config.limits.max_processes
        ),
        Ok(limit) => log::debug!("open-file limit {} (was {})", limit.now, limit.was),
        Err(err) => {
            log::warn!("open-file limit not raised ({err}): tracing many processes may fail with EMFILE")
        }
    }
    match pftrace::fdtable::reserve(fds) {
        Ok(n) => log::debug!("file descriptor table sized for {n}"),
        Err(err) => log::warn!("file descriptor table not grown ({err}): attaching may stall while it grows"),
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .on_thread_start(|| {
            let _ = sched::short_slice();
        })
        .build()
        .context("starting the async runtime")?;
    let _enter = rt.enter();
    let mut daemon = Daemon::new(&opts)?;

    // A command starts stopped at its exec (nothing of it has run): the
    // default file name needs its pid, and the output is checked before it
    // runs or anything is attached.
    // A command's Pythons of 3.11+ without working probes are traced by the
    // agent, which must be on their path from the start.
    // Not for a CPython traced through its probes (3.6-3.10, 3.15+): the
    // agent's start-up code would run in it for nothing, and show in a trace.
    let jit = std::env::var_os("PYTHON_JIT");
    if !cli.command.is_empty()
        && !pftrace::target::runs_usdt_python(&cli.command[0], jit.as_ref().map(|v| v.as_bytes()))
    {
        daemon.enable_agent()?;
    }
    let mut launched = match cli.command.is_empty() {
        true => None,
        false => Some(Launched::spawn_stopped(&cli.command, &daemon.agent_env())?),
    };
    let not_run = |launched: Option<Launched>, err: anyhow::Error| {
        if let Some(l) = launched {
            l.kill();
            return err.context(format!("cannot trace {:?}; it was not run", cli.command[0]));
        }
        err
    };
    let child_pid = launched.as_ref().map(Launched::pid);
    let destination = match output_path(&cli, &format, child_pid.or(opts.pids.first().copied())) {
        Some(path) => {
            let known: Vec<u32> = opts.pids.iter().copied().chain(child_pid).collect();
            let budget = opts.config.limits.max_calls_in_memory;
            match Destination::prepare(&path, &format, &pftrace::daemon::hostname(), &known, budget) {
                Ok((destination, spill)) => {
                    daemon.spill_calls_to(spill);
                    Some(destination)
                }
                Err(err) => return Err(not_run(launched, err.into())),
            }
        }
        None => None,
    };
    for &pid in &opts.pids {
        match daemon.attach_pid(pid) {
            Ok(target) => announce(&opts.names, &target),
            Err(err) => return Err(not_run(launched, err.into())),
        }
    }
    let mut child = None;
    if let Some(mut launched) = launched.take() {
        let argv: Vec<String> = cli.command.iter().map(|a| a.to_string_lossy().into_owned()).collect();
        let target = match daemon.attach_launched(&launched, &argv) {
            Ok(t) => t,
            Err(err) => {
                launched.kill();
                return Err(anyhow::Error::from(err)
                    .context(format!("cannot trace {:?}; it was not run", cli.command[0])));
            }
        };
        announce(&opts.names, &target);
        launched.resume()?;
        child = Some(launched);
    }
    daemon.scan_scopes();
    if let Some(path) = daemon.socket_path() {
        eprintln!("pftraced: serving pftracectl on {}", path.display());
    }

    let trace = rt.block_on(async {
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        let stop = async {
            let mut interrupts = 0;
            loop {
                tokio::select! {
                    _ = int.recv() => {
                        interrupts += 1;
                        // Ctrl-C also reaches a launched command (same terminal): keep
                        // tracing until it exits, unless pressed twice.
                        if child_pid.is_some_and(still_running) && interrupts < 2 {
                            eprintln!("pftraced: waiting for the command to exit (Ctrl-C again to stop tracing)");
                            continue;
                        }
                        eprintln!("pftraced: interrupted, stopping");
                        break;
                    }
                    _ = term.recv() => {
                        // Passed on to a launched command that still runs (it ends
                        // tracing by exiting); once it has exited, this stops us.
                        if let Some(pid) = child_pid.filter(|&pid| still_running(pid)) {
                            // SAFETY: signalling our own child.
                            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
                            continue;
                        }
                        eprintln!("pftraced: terminated, stopping");
                        break;
                    }
                }
            }
        };
        anyhow::Ok(daemon.run(stop).await?)
    })?;

    let status = match &mut child {
        Some(c) => c.try_wait().context("waiting for the command")?,
        None => None,
    };
    finish(&cli, &trace, destination.as_ref())?;
    Ok(match (child_pid, status) {
        (Some(_), Some(status)) => ExitCode::from(launch::exit_code(status).clamp(0, 255) as u8),
        (Some(_), None) => ExitCode::from(130),
        _ => ExitCode::SUCCESS,
    })
}

/// Whether our launched command has not exited yet (it is reaped only
/// after tracing ends, so its pid cannot have been reused).
fn still_running(pid: u32) -> bool {
    use rustix::process::{Pid, WaitId, WaitidOptions, waitid};
    let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) else { return false };
    // WNOWAIT: look without reaping; WNOHANG: no status while it runs.
    let flags = WaitidOptions::EXITED | WaitidOptions::NOHANG | WaitidOptions::NOWAIT;
    matches!(waitid(WaitId::Pid(pid), flags), Ok(None))
}

fn announce(names: &[String], target: &Target) {
    let version = target.version.map_or("CPython (version unknown)".into(), |v| format!("CPython {v}"));
    eprintln!(
        "pftraced: attached to pid {} ({version}, {}{}), tracing {}",
        target.pid,
        pftrace::events::printable_path(&target.binary),
        match target.mechanism {
            pftrace::python::Mechanism::Usdt => "",
            pftrace::python::Mechanism::Agent => ", in-process agent",
        },
        names.join(", ")
    );
}

/// Where the trace goes: `-o`, else PerfFlowAspect's log-dir, else the
/// default for a traced pid (`pftrace-<pid>.json`; records:
/// `pftrace-<pid>.records.json`; pfw: the current directory); None without one.
fn output_path(cli: &Cli, format: &Choice, pid: Option<u32>) -> Option<PathBuf> {
    let log_dir = match format {
        Choice::Pfw(o) => o.log_dir.clone(),
        _ => None,
    };
    let default_name = pid.map(|pid| match format {
        Choice::Pfw(_) => PathBuf::from("."),
        Choice::Records => PathBuf::from(format!("pftrace-{pid}.records.json")),
        Choice::Chrome => PathBuf::from(format!("pftrace-{pid}.json")),
    });
    cli.output.clone().or(log_dir).or(default_name)
}

fn finish(cli: &Cli, trace: &Trace, destination: Option<&Destination>) -> anyhow::Result<()> {
    if !cli.quiet {
        eprint!("{}", summary::render(trace));
    }
    let Some(destination) = destination else { return Ok(()) };
    if let Some(spill) = trace.spilled.as_ref().filter(|s| s.dropped > 0) {
        eprintln!(
            "pftraced: LOST: {} calls could not be written to {} ({}) and are not in the trace",
            spill.dropped,
            spill.path.display(),
            spill.error.as_deref().unwrap_or("write failed")
        );
    }
    let files = destination.write(trace)?;
    if files.is_empty() {
        eprintln!(
            "pftraced: no traced calls, so no PerfFlowAspect files in {}",
            destination.path().display()
        );
    }
    for (path, calls) in files {
        eprintln!("pftraced: wrote {calls} calls to {}", path.display());
    }
    Ok(())
}
