//! The tracing daemon: one kernel side (programs, maps, ring buffer) serving
//! any mix of targets (pids, a launched command, cgroups, the whole host),
//! reading and pairing calls, keeping them in memory and in rolling files,
//! discovering new processes from exec events, and answering `pftracectl`.

mod control;
mod filter;
mod processes;
mod sampler;
mod store;
mod targets;

use std::{
    collections::HashMap,
    future::Future,
    os::fd::AsFd as _,
    path::PathBuf,
    pin::pin,
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use pftrace_common::{MAX_CGROUPS, config as kconfig};
use tokio::{io::unix::AsyncFd, sync::mpsc};

pub use self::{filter::FilterError, processes::AttachFailure, store::CallStore, targets::TargetScopeError};
use self::{filter::NameFilter, processes::Processes, targets::CgroupTarget};
use crate::{
    bpf::{BpfError, Counters, KernelProbes},
    caps::{self, PrivilegeError},
    clock::WallClock,
    config::Config,
    control::server::{ControlRequest, ControlServer},
    events::{Decoder, Record},
    kernel::btf::TaskOffsets,
    launch::Launched,
    output::spill::SpillWriter,
    pairing::{Call, Pairer},
    procwatch,
    rolling::RollingOutput,
    stats::Aggregator,
    target::{self, Target, TargetError},
    trace::{CallList, Trace},
};

/// What to trace and how.
#[derive(Debug, Clone, Default)]
pub struct DaemonOptions {
    pub names: Vec<String>,
    pub pids: Vec<u32>,
    pub cgroups: Vec<PathBuf>,
    pub all: bool,
    /// Interpreter files attached host-wide at start (`--binary`).
    pub binaries: Vec<PathBuf>,
    /// Listen on the control socket (config.socket).
    pub serve: bool,
    pub config: Config,
    /// Benchmarks only: attach programs that return at once (the uprobe floor).
    pub floor: bool,
}

/// Errors that stop the daemon from starting.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Privilege(#[from] PrivilegeError),
    #[error(transparent)]
    Bpf(Box<BpfError>),
    #[error(transparent)]
    Names(#[from] FilterError),
    #[error("no function names to trace: give at least one with -t NAME (or `names` in the config file)")]
    NoNames,
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    Binary(#[from] target::BinaryError),
    #[error(transparent)]
    Scope(#[from] TargetScopeError),
    #[error(transparent)]
    Attach(#[from] AttachFailure),
    #[error("pid {0} exited while pftraced was attaching to it; nothing to trace")]
    ExitedDuringAttach(u32),
    #[error("watching pid {pid}: {source}")]
    Watch { pid: u32, source: std::io::Error },
    #[error("rolling output: {0}")]
    Output(String),
    #[error("control socket: {0}")]
    Control(String),
    #[error("reading the ring buffer: {0}")]
    Ring(std::io::Error),
}

/// `?` on the kernel side's errors (boxed: they are large).
impl From<BpfError> for DaemonError {
    fn from(err: BpfError) -> Self {
        Self::Bpf(Box::new(err))
    }
}

/// How often the ring buffer is drained without a wakeup (the kernel wakes
/// the daemon only when the ring is a quarter full), and samples taken.
const TICK: Duration = Duration::from_millis(10);

/// The running daemon's state.
pub struct Daemon {
    probes: KernelProbes,
    filter: NameFilter,
    processes: Processes,
    cgroups: Vec<CgroupTarget>,
    all: bool,
    /// Exit when every pid / launched target has exited (no cgroup or --all scope).
    until_targets_exit: bool,
    targets: Vec<String>,
    store: CallStore,
    /// Per-function figures of every completed call (the summary's, and
    /// `stats` without a filter), whatever the store still holds.
    functions: Aggregator,
    /// Dumps being sent: each holds a permit until its thread ends.
    dumps: std::sync::Arc<tokio::sync::Semaphore>,
    max_dumps: usize,
    decoder: Decoder,
    pairer: Pairer,
    rolling: Option<RollingOutput>,
    /// Every completed call, for the run's trace file (see output/spill.rs).
    spill: Option<SpillWriter>,
    bad_records: u64,
    clock: WallClock,
    start_ns: u64,
    started: Instant,
    /// Exit notifications: (pid, attach serial), so a late notice about a
    /// process never touches a newer one that reused its pid.
    exits: (mpsc::UnboundedSender<(u32, u64)>, mpsc::UnboundedReceiver<(u32, u64)>),
    /// Exit watches not yet fired.
    watched: usize,
    stopping: bool,
    serve: Option<crate::config::SocketConfig>,
    sampler: sampler::Sampler,
    /// Attachments made on blocking threads, reported back here.
    attached: (mpsc::UnboundedSender<Attached>, mpsc::UnboundedReceiver<Attached>),
    /// Processes being attached: pid → the attachment in flight.
    pending: HashMap<u32, Pending>,
    next_ticket: u64,
    /// Probes of processes that are gone, detached one at a time off the
    /// event loop (see [`Self::retire`]).
    retired: std::collections::VecDeque<crate::bpf::UprobeLink>,
    /// Detaches running on blocking threads; each reports here when done.
    detaching: usize,
    detached: (mpsc::UnboundedSender<()>, mpsc::UnboundedReceiver<()>),
}

/// Retired probes held back while attachments are in flight, at most (then
/// they are detached anyway, one at a time, to bound the file descriptors
/// they hold: two per link).
const MAX_RETIRED: usize = 64;

/// Detaches running at once.
const MAX_DETACHING: usize = 8;

/// An attachment in flight.
struct Pending {
    ticket: u64,
    /// When the attachment was started (for the debug log of its latency).
    started: Instant,
    /// The process exec'd meanwhile: what it runs now, checked when the attachment completes.
    recheck: Option<Target>,
    /// It exec'd something that is not a traceable Python meanwhile (or is
    /// gone): the attachment is dropped when it lands.
    cancelled: bool,
}

/// A process change read from the ring buffer.
enum ProcChange {
    /// A process exec'd in scope or was forked by a traced one.
    Appeared(u32),
    /// A tracked process exited at this time.
    Exited(u32, u64),
}

/// The outcome of an attachment made off the event loop.
struct Attached {
    ticket: u64,
    target: Target,
    pidfd: std::os::fd::OwnedFd,
    result: Result<Vec<crate::bpf::UprobeLink>, AttachFailure>,
}

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
        let layout = match TaskOffsets::discover() {
            Ok(layout) => Some(layout),
            Err(err) => {
                log::warn!("per-call CPU time and memory are not available: {err}");
                None
            }
        };
        // Host-wide probes (--binary), but only processes in scope are traced.
        let scope_filter = !opts.binaries.is_empty() && !opts.all;
        let mut probes = KernelProbes::load(limits.ring_buffer_bytes, layout.as_ref(), scope_filter)?;
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
        let mut filter = NameFilter::default();
        filter.add(&mut probes, &opts.names)?;

        let mut cgroups = Vec::new();
        for path in &opts.cgroups {
            let cg = CgroupTarget::open(path)?;
            if cgroups.len() as u32 >= MAX_CGROUPS {
                return Err(BpfError::TooManyCgroups.into());
            }
            probes.set_cgroup(cgroups.len() as u32, cg.dir.as_fd())?;
            cgroups.push(cg);
        }
        let exec_mode = if opts.all {
            kconfig::EXEC_ALL
        } else if !cgroups.is_empty() {
            kconfig::EXEC_CGROUPS
        } else {
            kconfig::EXEC_OFF
        };
        // Execs are always watched: in scopes, and of traced processes and
        // their descendants (so a traced program's Python children are found).
        probes.set_config(kconfig::CGROUP_SLOTS, cgroups.len() as u32)?;
        probes.set_config(kconfig::EXEC_MODE, exec_mode)?;
        probes.attach_exec_watch()?;
        let mut processes = Processes::new(limits.max_processes);
        let mut binaries = Vec::new();
        for path in &opts.binaries {
            let binary = target::inspect_file(path)?;
            processes.attach_host_wide(&mut probes, &binary)?;
            let running = processes::processes_mapping(binary.file);
            let level = if running > 0 { log::Level::Warn } else { log::Level::Info };
            log::log!(
                level,
                "attached host-wide to {}: every process running it ({running} now, and any started while \
                 pftraced runs) pays the probe trap on every Python call (about 1.2 us here), in scope or not",
                crate::events::printable_path(path)
            );
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
        targets.extend(cgroups.iter().map(|c| format!("cgroup {} (id {})", c.path.display(), c.id)));
        if opts.all {
            targets.push("all probe-enabled Pythons on the host".into());
        }
        targets.extend(binaries);
        Ok(Self {
            probes,
            filter,
            processes,
            until_targets_exit: cgroups.is_empty() && !opts.all,
            cgroups,
            all: opts.all,
            targets,
            store: CallStore::new(limits.max_calls_in_memory),
            functions: Aggregator::new(false),
            dumps: std::sync::Arc::new(tokio::sync::Semaphore::new(limits.max_concurrent_dumps)),
            max_dumps: limits.max_concurrent_dumps,
            decoder: Decoder::default(),
            pairer: Pairer::default(),
            rolling,
            spill: None,
            bad_records: 0,
            clock: WallClock::measure(),
            start_ns: WallClock::monotonic_now_ns(),
            started: Instant::now(),
            exits: mpsc::unbounded_channel(),
            watched: 0,
            stopping: false,
            serve: opts.serve.then(|| opts.config.socket.clone()),
            sampler: sampler::Sampler::new(&opts.config.sampling),
            attached: mpsc::unbounded_channel(),
            pending: HashMap::new(),
            next_ticket: 0,
            retired: Default::default(),
            detaching: 0,
            detached: mpsc::unbounded_channel(),
        })
    }

    /// Attaches to an explicitly named process; its refusal is an error.
    /// Must be called inside the runtime (it starts an exit watch).
    pub fn attach_pid(&mut self, pid: u32) -> Result<Target, DaemonError> {
        let target = target::inspect(pid)?;
        self.attach_target(&target)?;
        Ok(target)
    }

    /// Attaches to a launched command stopped at its exec.
    pub fn attach_launched(&mut self, child: &Launched) -> Result<Target, DaemonError> {
        let target = self.attach_pid(child.pid())?;
        self.targets.push(format!("command {} (pid {})", target.command, target.pid));
        Ok(target)
    }

    fn attach_target(&mut self, target: &Target) -> Result<(), DaemonError> {
        let pid = target.pid;
        let pidfd = procwatch::pidfd(pid).map_err(|source| DaemonError::Watch { pid, source })?;
        self.track(pid);
        let attached = if self.all || self.processes.is_host_wide(target.file) {
            self.processes.attach_binary(&mut self.probes, target)
        } else {
            self.processes.attach_process(&mut self.probes, target)
        };
        let serial = match attached {
            Ok(serial) => serial,
            Err(_) if crate::procinfo::has_exited(pid) => return Err(DaemonError::ExitedDuringAttach(pid)),
            Err(err) => return Err(err.into()),
        };
        self.watch(pid, serial, pidfd);
        Ok(())
    }

    /// Attaches to the Python processes already running in the cgroup scopes,
    /// or on the host with `--all`. Processes that are not Python are skipped;
    /// Pythons that cannot be traced are recorded as refusals.
    pub fn scan_scopes(&mut self) {
        let mut pids: Vec<u32> = self.cgroups.iter().flat_map(|c| c.pids()).collect();
        if self.all {
            pids = targets::all_pids();
        }
        let me = std::process::id();
        for pid in pids.into_iter().filter(|&p| p != me) {
            self.discover(pid);
        }
    }

    /// A process appeared in scope (exec, fork, or found by a scan): attach
    /// if it is a traceable Python. The attachment is made on a blocking
    /// thread (perf_event_open waits for an exec in progress) and completed
    /// in [`Self::attached`], so the event loop keeps draining meanwhile.
    fn discover(&mut self, pid: u32) {
        let target = match target::inspect(pid) {
            Ok(target) => target,
            Err(err) => {
                if self.processes.is_running(pid) {
                    // It exec'd something that is not a traceable Python.
                    self.end_process(pid, WallClock::monotonic_now_ns());
                }
                self.cancel_pending(pid);
                if Processes::worth_reporting(&err) {
                    log::warn!("{}", crate::events::printable(&err.to_string()));
                    self.processes.refuse(pid, &err);
                }
                return;
            }
        };
        if let Some(p) = self.pending.get_mut(&pid) {
            // Decided when the attachment in flight lands (it may already fit).
            p.recheck = Some(target);
            p.cancelled = false;
            return;
        }
        if let Some((file, started)) = self.processes.identity_of(pid) {
            if file == target.file && started == target.started {
                // It exec'd the same interpreter: its probes still apply.
                self.processes.refresh(&target);
                return;
            }
            // Another interpreter, or another process reusing the pid (its
            // exit report was lost): the old one ends here.
            self.end_process(pid, WallClock::monotonic_now_ns());
        }
        if self.all || self.processes.is_host_wide(target.file) {
            // Host-wide probes already cover it (or are attached once per new binary).
            match self.attach_target(&target) {
                Ok(()) => log::info!("tracing pid {pid} ({})", crate::events::printable_path(&target.binary)),
                Err(err) => {
                    log::warn!("{}", crate::events::printable(&err.to_string()));
                    self.processes.refuse(pid, &err);
                }
            }
            return;
        }
        self.start_attach(target);
    }

    /// The attachment in flight for `pid`, if any, is dropped when it lands
    /// (it must still land: until then the pid counts as pending).
    fn cancel_pending(&mut self, pid: u32) {
        if let Some(p) = self.pending.get_mut(&pid) {
            p.recheck = None;
            p.cancelled = true;
        }
    }

    /// Starts attaching pid-scoped probes to `target` on a blocking thread.
    fn start_attach(&mut self, target: Target) {
        let pid = target.pid;
        let prepared = self
            .processes
            .check_limit()
            .and_then(|()| processes::attach_job(&mut self.probes, &target, Some(pid)));
        let job = match prepared {
            Ok(job) => job,
            Err(err) => {
                log::warn!("{}", crate::events::printable(&err.to_string()));
                self.processes.refuse(pid, &err);
                return;
            }
        };
        let Ok(pidfd) = procwatch::pidfd(pid) else {
            log::debug!("pid {pid} exited before it could be attached");
            return;
        };
        self.track(pid);
        self.next_ticket += 1;
        let ticket = self.next_ticket;
        self.pending
            .insert(pid, Pending { ticket, started: Instant::now(), recheck: None, cancelled: false });
        let tx = self.attached.0.clone();
        tokio::task::spawn_blocking(move || {
            let result = processes::run_job(&job, &target).map(|link| vec![link]);
            let _ = tx.send(Attached { ticket, target, pidfd, result });
        });
    }

    /// An attachment made off the event loop finished.
    fn attached(&mut self, done: Attached) {
        let pid = done.target.pid;
        if self.pending.get(&pid).is_none_or(|p| p.ticket != done.ticket) {
            // Not the attachment in flight for this pid (defensive: there is one at a time).
            if let Ok(links) = done.result {
                self.retire(links);
            }
            return;
        }
        let pending = self.pending.remove(&pid).expect("checked");
        if pending.cancelled {
            // The process exec'd something else, or exited, while we attached.
            if let Ok(links) = done.result {
                self.retire(links);
            }
            return;
        }
        let mut target = done.target;
        if let Some(now) = pending.recheck {
            if now.file != target.file || now.started != target.started {
                // It exec'd another interpreter while we attached, or it is
                // another process reusing the pid: start again.
                if let Ok(links) = done.result {
                    self.retire(links);
                }
                self.start_attach(now);
                return;
            }
            target = now;
        }
        match done.result {
            Ok(links) => {
                let serial = self.processes.add_process(&target, links);
                self.watch(pid, serial, done.pidfd);
                log::debug!("pid {pid} attached in {} us", pending.started.elapsed().as_micros());
                log::info!("tracing pid {pid} ({})", crate::events::printable_path(&target.binary));
            }
            Err(err) => {
                if !crate::procinfo::has_exited(pid) {
                    log::warn!("{}", crate::events::printable(&err.to_string()));
                    self.processes.refuse(pid, &err);
                } else {
                    log::debug!("pid {pid} exited before it could be attached");
                }
            }
        }
    }

    /// Queues the probes of a process that is gone (or exec'd another
    /// program) for detaching. Closing a uprobe waits for the kernel to
    /// unregister it (about 40 ms per uprobe_multi link here, 160 ms per
    /// process with perf events, which also hold a lock that attaching
    /// needs): so links are dropped on blocking threads, several at once
    /// (their grace periods overlap: 16 links closed in 61 ms in parallel,
    /// 756 ms one after another), and only while no attachment is in flight
    /// (unless too many wait), so new processes are attached first.
    fn retire(&mut self, links: Vec<crate::bpf::UprobeLink>) {
        self.retired.extend(links);
        self.next_detach();
    }

    /// Starts the detaches that are due.
    fn next_detach(&mut self) {
        while self.detaching < MAX_DETACHING && !self.retired.is_empty() {
            if !self.pending.is_empty() && self.retired.len() < MAX_RETIRED {
                return; // attachments first; called again when they land
            }
            let link = self.retired.pop_front().expect("not empty");
            let Ok(rt) = tokio::runtime::Handle::try_current() else {
                drop(link);
                continue;
            };
            self.detaching += 1;
            let tx = self.detached.0.clone();
            rt.spawn_blocking(move || {
                drop(link);
                let _ = tx.send(());
            });
        }
    }

    /// Puts `pid` in the kernel's tracked set before its probes are
    /// attached: its forks and execs are reported, and with `--binary` its
    /// probe hits count from the moment they fire (the kernel forgets it at exit).
    fn track(&mut self, pid: u32) {
        if let Err(err) = self.probes.track(pid) {
            log::warn!("forks of pid {pid} will not be followed: {err}");
        }
    }

    /// Follows a traced process: its exit is handled.
    fn watch(&mut self, pid: u32, serial: u64, pidfd: std::os::fd::OwnedFd) {
        self.watched += 1;
        let tx = self.exits.0.clone();
        tokio::spawn(async move {
            let _ = procwatch::exited(pidfd).await;
            let _ = tx.send((pid, serial));
        });
    }

    /// Appends every completed call to `spill`, which the finished trace
    /// then carries ([`Trace::spilled`]): the run's trace file gets them all,
    /// whatever `limits.max_calls_in_memory` keeps for `dump` and `stats`.
    pub fn spill_calls_to(&mut self, spill: SpillWriter) {
        self.spill = Some(spill);
    }

    /// The control socket path, when serving.
    pub fn socket_path(&self) -> Option<PathBuf> {
        self.serve.as_ref().map(|s| s.path.clone())
    }

    /// Runs until `stop` completes, a `stop` request arrives, or (when only
    /// pids and commands are traced) every target has exited. Then drains,
    /// closes open calls as incomplete, finishes outputs, detaches, and
    /// returns the trace of the calls in memory.
    pub async fn run(mut self, stop: impl Future<Output = ()>) -> Result<Trace, DaemonError> {
        let ring = self.probes.take_ring()?;
        // SAFETY: the ring buffer owns its fd and keeps it open while registered.
        let mut ring = unsafe { AsyncFd::register(ring) }.map_err(|e| DaemonError::Ring(e.into()))?;
        let (ctl_tx, mut ctl_rx) = mpsc::channel::<ControlRequest>(64);
        let server = match &self.serve {
            Some(cfg) => {
                let server = ControlServer::bind(cfg).map_err(|e| DaemonError::Control(e.to_string()))?;
                Some(server.spawn(ctl_tx))
            }
            None => {
                drop(ctl_tx);
                None
            }
        };
        crate::logging::notify_ready();
        let mut stop = pin!(stop);
        let mut tick = tokio::time::interval(TICK);
        let mut last_flush = Instant::now();
        while !self.stopping {
            // The ring's exit record comes early in the kernel's exit path;
            // the pidfd (watched) fires once the process can be reaped, which
            // a launched command's status needs.
            if self.until_targets_exit
                && self.processes.running_count() == 0
                && self.pending.is_empty()
                && self.watched == 0
            {
                break;
            }
            tokio::select! {
                biased;
                _ = &mut stop => break,
                Some((pid, serial)) = self.exits.1.recv() => {
                    self.watched = self.watched.saturating_sub(1);
                    self.drain(ring.get_mut());
                    if self.processes.serial(pid) == Some(serial) {
                        self.end_process(pid, WallClock::monotonic_now_ns());
                    }
                }
                Some(done) = self.attached.1.recv() => {
                    self.attached(done);
                    self.next_detach();
                }
                Some(()) = self.detached.1.recv() => {
                    self.detaching -= 1;
                    self.next_detach();
                }
                guard = ring.readable_mut() => {
                    let mut guard = guard.map_err(DaemonError::Ring)?;
                    self.drain(guard.get_inner_mut());
                    guard.clear_ready();
                }
                Some(req) = ctl_rx.recv() => {
                    self.drain(ring.get_mut());
                    let reply = self.handle(req.command);
                    let _ = req.reply.send(reply);
                }
                _ = tick.tick() => {
                    self.drain(ring.get_mut());
                    self.sampler.maybe_sample(self.processes.running_pids());
                    if last_flush.elapsed() >= Duration::from_secs(1) {
                        if let Some(r) = &mut self.rolling {
                            r.flush();
                        }
                        if let Some(s) = &mut self.spill {
                            s.flush();
                        }
                        last_flush = Instant::now();
                    }
                }
            }
        }
        if let Some(server) = server {
            server.abort();
            if self.stopping {
                // The `stop` reply is written by its connection task: let it
                // run before the runtime (and every task in it) is dropped,
                // or pftracectl sees the connection close without a reply.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        self.drain(ring.get_mut());
        Ok(self.finish())
    }

    /// Reads every record in the ring buffer.
    fn drain(&mut self, ring: &mut RingBuf<MapData>) {
        let mut completed = Vec::new();
        // Process changes, handled after the calls are stored, in ring order.
        let mut changes = Vec::new();
        while let Some(item) = ring.next() {
            match self.decoder.decode_record(&item) {
                Ok(Record::Call(ev)) => {
                    if self.filter.keep(&ev.name, &ev.file) {
                        self.pairer.push(ev, &mut completed);
                    }
                }
                Ok(Record::Exec(e)) => {
                    let late_us = WallClock::monotonic_now_ns().saturating_sub(e.ts_ns) / 1000;
                    log::debug!("pid {} exec'd ({late_us} us ago)", e.pid);
                    // Calls of the old image end here, before any of the new one.
                    self.pairer.close_open(Some(e.pid), e.ts_ns, &mut completed);
                    changes.push(ProcChange::Appeared(e.pid));
                }
                Ok(Record::Fork(f)) => {
                    let late_us = WallClock::monotonic_now_ns().saturating_sub(f.ts_ns) / 1000;
                    log::debug!("pid {} forked {} ({late_us} us ago)", f.parent, f.pid);
                    changes.push(ProcChange::Appeared(f.pid));
                }
                Ok(Record::Exit(e)) => {
                    log::debug!("pid {} exited", e.pid);
                    // Its open calls end here, before anything of a process reusing the pid.
                    self.pairer.close_open(Some(e.pid), e.ts_ns, &mut completed);
                    changes.push(ProcChange::Exited(e.pid, e.ts_ns));
                }
                Err(err) => {
                    self.bad_records += 1;
                    log::warn!("{err}");
                }
            }
        }
        self.store_calls(completed);
        for change in changes {
            match change {
                ProcChange::Appeared(pid) => self.discover(pid),
                ProcChange::Exited(pid, ts_ns) => {
                    if self.processes.is_running(pid) {
                        self.end_process(pid, ts_ns);
                    }
                    self.cancel_pending(pid);
                }
            }
        }
    }

    fn store_calls(&mut self, calls: Vec<Call>) {
        if calls.is_empty() {
            return;
        }
        if let Some(r) = &mut self.rolling {
            r.write_calls(&calls, &self.clock, |pid| self.processes.info(pid));
        }
        if let Some(s) = &mut self.spill {
            s.append(&calls);
        }
        for call in calls {
            self.processes.count_call(call.pid);
            self.functions.push(&call);
            self.store.push(call);
        }
    }

    /// A traced process exited (or exec'd another program): close its open
    /// calls at `end_ns` as incomplete and detach its probes.
    fn end_process(&mut self, pid: u32, end_ns: u64) {
        let mut closed = Vec::new();
        self.pairer.close_open(Some(pid), end_ns, &mut closed);
        self.store_calls(closed);
        let links = self.processes.exited(pid);
        self.retire(links);
        self.sampler.forget(pid);
        // Still tracked (its forks and execs reported) if it only exec'd
        // something else; the kernel forgets it when it exits.
        log::debug!("pid {pid} ended");
    }

    fn counters(&self) -> Counters {
        self.probes.counters().unwrap_or_else(|err| {
            log::warn!("reading counters: {err}");
            Counters::default()
        })
    }

    fn finish(mut self) -> Trace {
        let end_ns = WallClock::monotonic_now_ns();
        let counters = self.counters();
        let mut closed = Vec::new();
        self.pairer.close_open(None, end_ns, &mut closed);
        self.store_calls(closed);
        if let Some(r) = &mut self.rolling {
            r.close();
        }
        self.processes.detach_all();
        // Probes of processes that are gone cost nobody anything: detach them
        // without holding up the trace (at exit the kernel closes what is left).
        let retired = std::mem::take(&mut self.retired);
        if !retired.is_empty() {
            let _ = std::thread::Builder::new().name("pftrace-detach".into()).spawn(move || drop(retired));
        }
        if self.store.evicted > 0 && self.spill.is_none() {
            log::warn!(
                "{} older calls were dropped from memory (limits.max_calls_in_memory); they are only in the rolling \
                 output files, if configured",
                self.store.evicted
            );
        }
        let mut calls: Vec<Call> = self.store.all().cloned().collect();
        calls.sort_by_key(|c| (c.start_ns, c.depth));
        let mut trace = self.trace_of(calls.into(), None, end_ns, counters);
        trace.spilled = self.spill.take().map(SpillWriter::finish);
        trace.functions = self.functions.rows();
        trace
    }

    /// A trace of `calls` (and of the samples of `pid`, or all) with the
    /// daemon's metadata and counters.
    fn trace_of(&self, calls: CallList, pid: Option<u32>, end_ns: u64, counters: Counters) -> Trace {
        let mut processes: Vec<_> = self.processes.traced().cloned().collect();
        processes.sort_by_key(|p| p.pid);
        Trace {
            names: self.filter.texts(),
            processes,
            calls,
            samples: self.sampler.samples(pid),
            unmatched_returns: self.pairer.unmatched_returns().to_vec(),
            unmatched_returns_total: self.pairer.unmatched_total,
            unmatched_generator_returns: self.pairer.unmatched_generator,
            skipped_entries: self.pairer.skipped_entries,
            counters,
            bad_records: self.bad_records,
            file_names_cut: self.decoder.files_cut,
            filtered_in_user_space: self.filter.dropped,
            calls_total: self.store.total,
            calls_evicted: self.store.evicted,
            spilled: None,
            functions: Vec::new(),
            clock: self.clock,
            start_ns: self.start_ns,
            end_ns,
            hostname: hostname(),
        }
    }
}

/// This host's name, for file names and metadata.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}
