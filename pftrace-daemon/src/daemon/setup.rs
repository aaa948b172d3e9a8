//! Setting the daemon up: checking names and privileges, loading the
//! kernel side, opening the scopes (cgroups, `--all`) and attaching the
//! `--binary` files host-wide, the outputs; processes are attached after.

use std::{io, os::fd::AsFd as _, time::Instant};

use pftrace_common::{MAX_CGROUPS, config as kconfig};
use tokio::sync::mpsc;

use super::{
    Daemon, DaemonError, DaemonOptions,
    attach::AttachScheduler,
    filter::{FilterError, NameFilter},
    jobs::Jobs,
    processes::{self, Processes},
    sampler,
    store::CallStore,
    targets::{CgroupTarget, TargetScopeError},
};
use crate::{
    bpf::{BpfError, KernelProbes},
    caps, cgroupwatch,
    clock::WallClock,
    events::Decoder,
    kernel::task_layout::TaskOffsets,
    output::rolling::RollingOutput,
    pairing::Pairer,
    stats::Aggregator,
    target,
};

impl Daemon {
    /// Validates names, checks privileges, loads the kernel side and sets up
    /// scopes and outputs. Attaching to processes comes after.
    pub fn new(opts: &DaemonOptions) -> Result<Self, DaemonError> {
        if opts.names.is_empty() {
            return Err(DaemonError::NoNames);
        }
        for name in &opts.names {
            crate::names::NameSpec::parse(name).map_err(FilterError::from)?;
        }
        caps::check()?;
        let limits = &opts.config.limits;
        // aya's loader reads the kernel's BTF beside this read of it (bpf/start.rs).
        let loader = crate::bpf::begin_start()?;
        let layout = match TaskOffsets::discover() {
            Ok(layout) => Some(layout),
            Err(err) => {
                log::warn!("per-call CPU time and memory are not available: {err}");
                None
            }
        };
        // Every scope but --all: dormant host-wide probes, semaphores raised
        // by the daemon in the processes in scope (see dormant.rs). Commands
        // and --pid took pid-scoped links before: made 4-12 ms after a
        // child's exec, 1 of 30 children calling on their first line lost
        // every call, uncounted; and a file's sites take one semaphore
        // setting at a time, so two pftraceds, one with pid-scoped links and
        // one with a dormant link, refused each other.
        let dormant = super::dormant::Dormant::new(!opts.all);
        // What a pftraced that was killed left raised (ledger.rs).
        crate::ledger::recover();
        // Host-wide probes (--binary, dormant ones), but only processes in scope are traced.
        let scope_filter = (!opts.binaries.is_empty() || dormant.enabled) && !opts.all;
        let mut probes = KernelProbes::load(
            loader,
            limits.ring_buffer_bytes,
            layout.as_ref(),
            scope_filter,
            limits.cpu_slots_per_process,
        )?;
        if probes.attach_method() == crate::bpf::AttachMethod::PerfEvent {
            log::warn!(
                "attaching through uprobe perf events ({}): about 10 times slower per process than \
                 uprobe_multi links (kernel 6.6+), so new processes miss more of their first calls",
                if std::env::var_os(crate::bpf::ATTACH_ENV).is_some() {
                    format!("{}=perf", crate::bpf::ATTACH_ENV)
                } else {
                    "this kernel has no uprobe_multi".to_string()
                }
            );
        }
        probes.floor = opts.floor;
        probes.attach_fork_watch()?;
        probes.attach_exit_watch()?;
        if layout.is_some() {
            probes.attach_cpu_slots()?;
            if probes.batch {
                probes.attach_batch()?;
            }
        }
        probes.release_btf();
        let mut filter = NameFilter::default();
        filter.add(&mut probes, &opts.names)?;

        // Cgroup targets by slot, the jobs root last.
        let mut cgroup_paths = opts.cgroups.clone();
        let jobs_cfg = &opts.config.jobs;
        let jobs = match &jobs_cfg.root {
            Some(root) => {
                cgroup_paths.push(root.clone());
                let slot = cgroup_paths.len() - 1;
                let budget = limits.max_calls_in_memory;
                Some(
                    Jobs::new(jobs_cfg, opts.config.output.dir.as_deref(), slot, budget)
                        .map_err(DaemonError::Jobs)?,
                )
            }
            None => None,
        };
        if cgroup_paths.len() as u32 > MAX_CGROUPS {
            return Err(BpfError::TooManyCgroups.into());
        }
        let wait = opts.config.targets.wait_for_cgroups;
        let mut cgroups = Vec::new();
        for (slot, path) in cgroup_paths.iter().enumerate() {
            match CgroupTarget::open(path) {
                Ok(cg) => {
                    probes.set_cgroup(slot as u32, cg.dir.as_fd())?;
                    cgroups.push(Some(cg));
                }
                Err(TargetScopeError::Open { source, .. })
                    if wait && source.kind() == io::ErrorKind::NotFound =>
                {
                    log::warn!(
                        "cgroup {} does not exist yet: waiting for it to be made (inotify, no polling), then tracing                          it; set targets.wait_for_cgroups = false (or --cgroups-must-exist) to make this an error",
                        path.display()
                    );
                    cgroups.push(None);
                }
                Err(err) => return Err(err.into()),
            }
        }
        // Watchers for every cgroup target: made after start, removed and made again, and the jobs in the root.
        let (events_tx, cgroup_events) = mpsc::unbounded_channel();
        for (slot, path) in cgroup_paths.iter().enumerate() {
            let children = jobs.as_ref().is_some_and(|j| j.slot == slot);
            cgroupwatch::spawn(slot, path.clone(), children, events_tx.clone())
                .map_err(|e| DaemonError::Jobs(format!("watching cgroup {}: {e}", path.display())))?;
        }
        let exec_mode = if opts.all {
            kconfig::EXEC_ALL
        } else if !cgroup_paths.is_empty() {
            kconfig::EXEC_CGROUPS
        } else {
            kconfig::EXEC_OFF
        };
        // Execs are always watched: in scopes, and of traced processes and
        // their descendants (so a traced program's Python children are found).
        probes.set_config(kconfig::CGROUP_SLOTS, cgroup_paths.len() as u32)?;
        probes.set_config(kconfig::EXEC_MODE, exec_mode)?;
        probes.attach_exec_watch()?;
        let mut binaries = Vec::new();
        let mut binary_targets = Vec::new();
        for path in &opts.binaries {
            binary_targets.push(target::inspect_file(path)?);
            binaries.push(format!("binary {} (host-wide)", crate::events::printable_path(path)));
        }
        let rolling = match &opts.config.output.dir {
            Some(_) => Some(
                RollingOutput::new(&opts.config.output, &hostname())
                    .map_err(|e| DaemonError::Output(e.to_string()))?,
            ),
            None => None,
        };
        let mut targets: Vec<String> = opts.pids.iter().map(|p| format!("pid {p}")).collect();
        for (slot, path) in opts.cgroups.iter().enumerate() {
            targets.push(match &cgroups[slot] {
                Some(c) => format!("cgroup {} (id {})", path.display(), c.id),
                None => format!("cgroup {} (waited for: it did not exist at start)", path.display()),
            });
        }
        if let Some(jobs) = &jobs {
            targets.push(jobs.describe());
        }
        if opts.all {
            targets.push("all probe-enabled Pythons on the host".into());
        }
        targets.extend(binaries);
        // The USDT programs were verified beside all of the above (bpf/start.rs).
        probes.wait_programs()?;
        let codes = crate::codes::CodeResolver::start();
        let code_reader = crate::codes::CodeReader::new(&codes.table());
        // The batched agent road: exits settle once the process's threads are gone (exits.rs).
        let keep_past_exit = probes.batch;
        let mut daemon = Self {
            probes,
            filter,
            processes: Processes::new(limits.max_processes),
            until_targets_exit: cgroup_paths.is_empty() && !opts.all,
            cgroups,
            cgroup_paths,
            cgroup_events,
            jobs,
            all: opts.all,
            targets,
            store: CallStore::new(limits.max_calls_in_memory),
            codes,
            code_reader,
            functions: Aggregator::new(false).warning(),
            dumps: std::sync::Arc::new(tokio::sync::Semaphore::new(limits.max_concurrent_dumps)),
            max_dumps: limits.max_concurrent_dumps,
            decoder: {
                let mut d = Decoder::default();
                d.keep_past_exit = keep_past_exit;
                d
            },
            pairer: Pairer::default(),
            completed: Vec::new(),
            rolling,
            spill: None,
            bad_records: 0,
            batch_stop: Default::default(),
            exiting: Vec::new(),
            settle_all: false,
            clock: WallClock::measure(),
            start_ns: WallClock::monotonic_now_ns(),
            started: Instant::now(),
            exits: mpsc::unbounded_channel(),
            watched: 0,
            stopping: false,
            serve: opts.serve.then(|| opts.config.socket.clone()),
            sampler: sampler::Sampler::new(&opts.config.sampling),
            scheduler: AttachScheduler::new(),
            dormant,
            agent: None,
            agent_report: opts.config.agent.report,
            early_agents: Vec::new(),
        };
        if opts.all || !opts.cgroups.is_empty() {
            // New processes in scope may need it (3.11+ without working probes).
            daemon.enable_agent()?;
        }
        for binary in binary_targets {
            let (file, path) = (binary.file, binary.binary.clone());
            daemon.attach_binary(binary)?;
            let running = processes::processes_mapping(file);
            let level = if running > 0 { log::Level::Warn } else { log::Level::Info };
            log::log!(
                level,
                "attached host-wide to {}: every process running it ({running} now, and any started while \
                 pftraced runs) pays the probe trap on every Python call (about 1.2 us here), in scope or not",
                crate::events::printable_path(&path)
            );
        }
        Ok(daemon)
    }
}

/// This host's name, for file names and metadata.
pub fn hostname() -> String {
    let name = rustix::system::uname().nodename().to_string_lossy().trim().to_string();
    if name.is_empty() { "localhost".into() } else { name }
}
