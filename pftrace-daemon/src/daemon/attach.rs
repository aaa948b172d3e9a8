//! The attach scheduler: deciding what to attach for a process that
//! appeared (exec, fork, a scan, `--pid`, a launched command), and attaching
//! it along one path, [`Daemon::prepare`] → [`Prepared::run`] →
//! [`Daemon::land`], run inline ([`Daemon::attach_target`]: explicit targets,
//! host-wide probes) or with `run` on a blocking thread
//! ([`Daemon::start_attach`]: processes found while tracing, so the event loop
//! keeps draining while the kernel waits for an exec in progress). Also
//! detaching the probes of processes that are gone, off the event loop,
//! after the attachments in flight.

use std::{
    collections::{HashMap, VecDeque},
    os::fd::OwnedFd,
    time::Instant,
};

use tokio::sync::mpsc;

use super::{Daemon, DaemonError, dormant::NotDormant, processes::Processes};
use crate::{
    bpf::{AttachJob, BpfError, Scope, UprobeLink},
    clock::WallClock,
    events::{printable, printable_path},
    launch::Launched,
    procwatch,
    python::Mechanism,
    target::{self, Target},
};

/// Errors attaching.
#[derive(Debug, thiserror::Error)]
pub enum AttachFailure {
    #[error("attaching to pid {pid} ({binary}): {source}")]
    Bpf { pid: u32, binary: String, source: Box<BpfError> },
    #[error("limit reached: already tracing {0} processes (limits.max_processes)")]
    TooMany(usize),
}

impl AttachFailure {
    fn bpf(target: &Target, source: impl Into<BpfError>) -> Self {
        Self::Bpf { pid: target.pid, binary: printable_path(&target.binary), source: Box::new(source.into()) }
    }
}

/// Why an attachment could not be prepared.
enum PrepareError {
    Attach(AttachFailure),
    /// The process is gone: no pidfd could be opened.
    Watch {
        pid: u32,
        source: std::io::Error,
    },
}

/// Retired probes held back while attachments are in flight, at most (then
/// they are detached anyway, one at a time, to bound the file descriptors
/// they hold: two per link).
const MAX_RETIRED: usize = 64;

/// Detaches running at once.
const MAX_DETACHING: usize = 8;

/// An attachment ready to run: the process tracked in the kernel, its exit
/// watch open, and the kernel-side job.
struct Prepared {
    target: Target,
    /// `None` for an interpreter file named with `--binary` (no process).
    pidfd: Option<OwnedFd>,
    /// Host-wide probes cover the process (`--all`, `--binary`).
    host_wide: bool,
    /// `None`: host-wide probes on its binary already exist.
    job: Option<AttachJob>,
}

/// An attachment that ran: what [`Daemon::land`] records.
struct Landed {
    target: Target,
    pidfd: Option<OwnedFd>,
    host_wide: bool,
    result: Result<Option<UprobeLink>, AttachFailure>,
}

impl Prepared {
    /// Makes the attachment (blocking).
    fn run(self) -> Landed {
        let result = match &self.job {
            Some(job) => job.run().map(Some).map_err(|source| AttachFailure::bpf(&self.target, source)),
            None => Ok(None),
        };
        Landed { target: self.target, pidfd: self.pidfd, host_wide: self.host_wide, result }
    }
}

/// An attachment in flight on a blocking thread.
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

/// A background attachment that finished, as the event loop receives it.
pub(super) struct Finished {
    ticket: u64,
    landed: Landed,
}

/// Attachments in flight and detaches to do.
pub(super) struct AttachScheduler {
    /// Attachments made on blocking threads, reported back here.
    pub(super) finished: (mpsc::UnboundedSender<Finished>, mpsc::UnboundedReceiver<Finished>),
    /// Processes being attached: pid → the attachment in flight.
    pending: HashMap<u32, Pending>,
    next_ticket: u64,
    /// Probes of processes that are gone, waiting to be detached.
    retired: VecDeque<UprobeLink>,
    /// Detaches running on blocking threads; each reports here when done.
    detaching: usize,
    pub(super) detached: (mpsc::UnboundedSender<()>, mpsc::UnboundedReceiver<()>),
}

impl AttachScheduler {
    pub(super) fn new() -> Self {
        Self {
            finished: mpsc::unbounded_channel(),
            pending: HashMap::new(),
            next_ticket: 0,
            retired: VecDeque::new(),
            detaching: 0,
            detached: mpsc::unbounded_channel(),
        }
    }

    /// Whether no attachment is in flight.
    pub(super) fn is_idle(&self) -> bool {
        self.pending.is_empty()
    }

    /// A detach finished: start the next ones.
    pub(super) fn detach_done(&mut self) {
        self.detaching -= 1;
        self.next_detach();
    }

    /// The attachment in flight for `pid`, if any, is dropped when it lands
    /// (it must still land: until then the pid counts as pending).
    pub(super) fn cancel(&mut self, pid: u32) {
        if let Some(p) = self.pending.get_mut(&pid) {
            p.recheck = None;
            p.cancelled = true;
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
    pub(super) fn retire(&mut self, links: impl IntoIterator<Item = UprobeLink>) {
        self.retired.extend(links);
        self.next_detach();
    }

    /// Starts the detaches that are due.
    pub(super) fn next_detach(&mut self) {
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

    /// Detaches what is still retired on a thread of its own, without
    /// holding up the caller (tracing is over: probes of processes that are
    /// gone cost nobody anything, and at exit the kernel closes what is left).
    pub(super) fn detach_rest_in_background(&mut self) {
        let retired = std::mem::take(&mut self.retired);
        if !retired.is_empty() {
            let _ = std::thread::Builder::new().name("pftrace-detach".into()).spawn(move || drop(retired));
        }
    }
}

impl Daemon {
    /// Attaches to an explicitly named process; its refusal is an error.
    /// Must be called inside the runtime (it starts an exit watch).
    pub fn attach_pid(&mut self, pid: u32) -> Result<Target, DaemonError> {
        let target = target::inspect(pid)?;
        if target.mechanism == Mechanism::Agent {
            self.attach_agent_pid(target.clone())?;
            return Ok(target);
        }
        let host_wide = self.covers_host_wide(&target);
        if self.dormant.enabled && !host_wide && self.dormant.takes(&target.file) {
            // Beside watched cgroups, through the same dormant probes: pid-scoped
            // ones (kernel-managed semaphores) on a file that has them would be
            // refused by the kernel, and the other way round.
            return match self.attach_dormant(target.clone()) {
                Ok(()) => Ok(target),
                Err(NotDormant::Refused(why)) => Err(DaemonError::Refused(why)),
                Err(NotDormant::Gone) => Err(DaemonError::ExitedDuringAttach(pid)),
                Err(NotDormant::Conflict(target)) => {
                    self.attach_target((*target).clone(), false)?;
                    Ok(*target)
                }
            };
        }
        self.attach_target(target.clone(), host_wide)?;
        Ok(target)
    }

    /// Attaches to a launched command stopped at its exec (started with
    /// [`Self::agent_env`] when the agent is enabled). A CPython the agent
    /// must trace is refused if its command line keeps the agent out
    /// (`-E`, `-I`, `-S`).
    pub fn attach_launched(&mut self, child: &Launched, argv: &[String]) -> Result<Target, DaemonError> {
        let target = target::inspect(child.pid())?;
        let target = match target.mechanism {
            Mechanism::Agent => {
                if let Some(why) = crate::agent::launch::refusal(argv) {
                    return Err(DaemonError::Agent(why));
                }
                self.attach_agent_target(target.clone())?;
                target
            }
            Mechanism::Usdt => self.attach_pid(child.pid())?,
        };
        // Its CPU slot now, while it is stopped: else its main thread,
        // older than tracing, gets one only at its first traced call, and
        // exact figures only after its first switch-out.
        if let Err(err) = self.probes.claim_cpu_slot_stopped(child.pid()) {
            log::warn!(
                "pid {}: no CPU slot before it runs ({err}): its calls' CPU is exact only from its first switch-out",
                child.pid()
            );
        }
        self.targets.push(format!("command {} (pid {})", target.command, target.pid));
        Ok(target)
    }

    /// Attaches the interpreter file `binary` (inspected with
    /// [`target::inspect_file`], pid 0) host-wide.
    pub(super) fn attach_binary(&mut self, binary: Target) -> Result<(), DaemonError> {
        self.attach_target(binary, true)
    }

    /// Attaches to the Python processes already running in the cgroup scopes,
    /// or on the host with `--all`. Processes that are not Python are skipped;
    /// Pythons that cannot be traced are recorded as refusals.
    pub fn scan_scopes(&mut self) {
        let mut pids: Vec<u32> = self.cgroups.iter().flatten().flat_map(|c| c.pids()).collect();
        if self.all {
            pids = super::targets::all_pids();
        }
        let me = std::process::id();
        for pid in pids.into_iter().filter(|&p| p != me) {
            self.discover(pid);
        }
    }

    /// Whether host-wide probes serve `target` (`--all`, or its binary was
    /// named with `--binary`) rather than pid-scoped ones.
    fn covers_host_wide(&self, target: &Target) -> bool {
        self.all || self.processes.is_host_wide(target.file)
    }

    /// The one attach path, first half, on the event loop: checks the limit,
    /// stores the sites' specs in the kernel and makes the job, opens the
    /// process's exit watch and puts it in the kernel's tracked set (before
    /// its probes exist: its forks and execs are reported, and with
    /// `--binary` its probe hits count from the moment they fire).
    fn prepare(&mut self, target: Target, host_wide: bool) -> Result<Prepared, PrepareError> {
        let pid = target.pid;
        let job = if target.mechanism == Mechanism::Agent {
            // Its agent reports through the agent's uprobe, attached once.
            self.processes.check_limit().map_err(PrepareError::Attach)?;
            None
        } else if host_wide {
            if self.processes.is_host_wide(target.file) {
                None
            } else {
                Some(self.probes.usdt_job(&target.open_path, &target.sites, Scope::Host))
            }
        } else {
            self.processes.check_limit().map_err(PrepareError::Attach)?;
            Some(self.probes.usdt_job(&target.open_path, &target.sites, Scope::Process(pid)))
        };
        let job =
            job.transpose().map_err(|source| PrepareError::Attach(AttachFailure::bpf(&target, source)))?;
        let pidfd = match pid {
            0 => None,
            _ => Some(procwatch::pidfd(pid).map_err(|source| PrepareError::Watch { pid, source })?),
        };
        if pid != 0
            && let Err(err) = self.probes.track(pid)
        {
            log::warn!("forks of pid {pid} will not be followed: {err}");
        }
        Ok(Prepared { target, pidfd, host_wide, job })
    }

    /// The one attach path, second half, on the event loop: records what
    /// was attached and watches the process's exit.
    fn land(&mut self, landed: Landed) -> Result<(), AttachFailure> {
        let Landed { target, pidfd, host_wide, result } = landed;
        let link = result?;
        let links = match (host_wide, link) {
            (true, Some(link)) => {
                self.processes.set_host_wide(&target, link);
                Vec::new()
            }
            (true, None) => Vec::new(),
            (false, link) => link.into_iter().collect(),
        };
        if let Some(pidfd) = pidfd {
            let serial = self.processes.add_process(&target, links);
            self.codes.hold(target.pid);
            self.watch(target.pid, serial, pidfd);
            self.note_job_process(target.pid);
        }
        Ok(())
    }

    /// Attaches `target` at once (explicit targets, host-wide probes).
    pub(super) fn attach_target(&mut self, target: Target, host_wide: bool) -> Result<(), DaemonError> {
        let pid = target.pid;
        let prepared = match self.prepare(target, host_wide) {
            Ok(prepared) => prepared,
            Err(PrepareError::Attach(err)) => return Err(err.into()),
            Err(PrepareError::Watch { pid, source }) => return Err(DaemonError::Watch { pid, source }),
        };
        match self.land(prepared.run()) {
            Ok(()) => Ok(()),
            Err(_) if pid != 0 && crate::procinfo::has_exited(pid) => {
                Err(DaemonError::ExitedDuringAttach(pid))
            }
            Err(err) => Err(err.into()),
        }
    }

    /// A process appeared in scope (exec, fork, or found by a scan): attach
    /// if it is a traceable Python, in the background unless host-wide
    /// probes cover it.
    pub(super) fn discover(&mut self, pid: u32) {
        let target = match target::inspect(pid) {
            Ok(target) => target,
            Err(err) => {
                if self.processes.is_running(pid) {
                    // It exec'd something that is not a traceable Python.
                    self.end_process(pid, WallClock::monotonic_now_ns());
                }
                self.scheduler.cancel(pid);
                if Processes::worth_reporting(&err) {
                    log::warn!("{}", printable(&err.to_string()));
                    self.processes.refuse(pid, &err);
                }
                return;
            }
        };
        if target.mechanism == Mechanism::Agent {
            match self.processes.identity_of(pid) {
                Some((file, started)) if file == target.file && started == target.started => {
                    self.processes.refresh(&target);
                    self.codes.hold(target.pid);
                }
                Some(_) => {
                    self.end_process(pid, WallClock::monotonic_now_ns());
                    self.discover_agent(target);
                }
                None => self.discover_agent(target),
            }
            return;
        }
        if let Some(p) = self.scheduler.pending.get_mut(&pid) {
            // Decided when the attachment in flight lands (it may already fit).
            p.recheck = Some(target);
            p.cancelled = false;
            return;
        }
        if let Some((file, started)) = self.processes.identity_of(pid) {
            if file == target.file && started == target.started {
                // It exec'd the same interpreter: its probes still apply
                // (dormant ones once its new image's semaphores are raised).
                self.reraise_after_exec(&target);
                self.processes.refresh(&target);
                self.codes.hold(target.pid);
                return;
            }
            // Another interpreter, or another process reusing the pid (its
            // exit report was lost): the old one ends here.
            self.end_process(pid, WallClock::monotonic_now_ns());
        }
        // A file whose dormant link was just refused goes pid-scoped, unsaid
        // here (attach_dormant said it when the kernel refused).
        if self.dormant.enabled && !self.covers_host_wide(&target) && !self.dormant.was_refused(&target.file)
        {
            if self.dormant.has_room_for(&target.file) {
                if let Err(NotDormant::Conflict(target)) = self.attach_dormant(target) {
                    self.start_attach(*target);
                }
                return;
            }
            self.dormant.note_full(&printable_path(&target.binary));
        }
        if self.covers_host_wide(&target) {
            // Host-wide probes already cover it (or are attached once per new binary).
            let binary = printable_path(&target.binary);
            match self.attach_target(target, true) {
                Ok(()) => log::info!("tracing pid {pid} ({binary})"),
                Err(err) => {
                    log::warn!("{}", printable(&err.to_string()));
                    self.processes.refuse(pid, &err);
                }
            }
            return;
        }
        self.start_attach(target);
    }

    /// Starts attaching pid-scoped probes to `target` on a blocking thread;
    /// [`Self::finished`] completes it.
    fn start_attach(&mut self, target: Target) {
        let pid = target.pid;
        let prepared = match self.prepare(target, false) {
            Ok(prepared) => prepared,
            Err(PrepareError::Attach(err)) => {
                log::warn!("{}", printable(&err.to_string()));
                self.processes.refuse(pid, &err);
                return;
            }
            Err(PrepareError::Watch { .. }) => {
                log::debug!("pid {pid} exited before it could be attached");
                return;
            }
        };
        let scheduler = &mut self.scheduler;
        scheduler.next_ticket += 1;
        let ticket = scheduler.next_ticket;
        scheduler
            .pending
            .insert(pid, Pending { ticket, started: Instant::now(), recheck: None, cancelled: false });
        let tx = scheduler.finished.0.clone();
        tokio::task::spawn_blocking(move || {
            let _ = tx.send(Finished { ticket, landed: prepared.run() });
        });
    }

    /// A background attachment finished.
    pub(super) fn finished(&mut self, done: Finished) {
        let Finished { ticket, mut landed } = done;
        let pid = landed.target.pid;
        let scheduler = &mut self.scheduler;
        let current = scheduler.pending.get(&pid).is_some_and(|p| p.ticket == ticket);
        // Not the attachment in flight for this pid (defensive: there is one
        // at a time), or the process exec'd something else, or exited, while
        // we attached: drop what was attached.
        let pending = current.then(|| scheduler.pending.remove(&pid)).flatten().filter(|p| !p.cancelled);
        let Some(pending) = pending else {
            if let Ok(Some(link)) = landed.result {
                scheduler.retire([link]);
            }
            scheduler.next_detach();
            return;
        };
        if let Some(now) = pending.recheck {
            if now.file != landed.target.file || now.started != landed.target.started {
                // It exec'd another interpreter while we attached, or it is
                // another process reusing the pid: start again.
                if let Ok(Some(link)) = landed.result {
                    scheduler.retire([link]);
                }
                self.start_attach(now);
                self.scheduler.next_detach();
                return;
            }
            landed.target = now;
        }
        let conflict = matches!(&landed.result, Err(AttachFailure::Bpf { source, .. }) if source.is_semaphore_conflict());
        if conflict
            && self.dormant.enabled
            && !crate::procinfo::has_exited(pid)
            && self.dormant.takes(&landed.target.file)
        {
            // Another tracer holds the file's sites without a kernel-managed
            // semaphore: dormant probes (pftraced raises the semaphores) fit beside it.
            log::info!(
                "pid {pid}: pid-scoped probes of {} refused by the kernel; trying dormant ones",
                printable_path(&landed.target.binary)
            );
            if let Err(NotDormant::Conflict(target)) = self.attach_dormant(landed.target) {
                let why =
                    "the kernel refused both pid-scoped and dormant probes of its file (EINVAL both ways)";
                self.processes.refuse(pid, &format!("pid {pid} ({}): {why}", printable_path(&target.binary)));
            }
            self.scheduler.next_detach();
            return;
        }
        let binary = printable_path(&landed.target.binary);
        match self.land(landed) {
            Ok(()) => {
                log::debug!("pid {pid} attached in {} us", pending.started.elapsed().as_micros());
                log::info!("tracing pid {pid} ({binary})");
            }
            Err(err) if !crate::procinfo::has_exited(pid) => {
                log::warn!("{}", printable(&err.to_string()));
                self.processes.refuse(pid, &err);
            }
            Err(_) => log::debug!("pid {pid} exited before it could be attached"),
        }
        self.scheduler.next_detach();
    }

    /// Follows a traced process: its exit is handled.
    pub(super) fn watch(&mut self, pid: u32, serial: u64, pidfd: OwnedFd) {
        self.watched += 1;
        let tx = self.exits.0.clone();
        tokio::spawn(async move {
            let _ = procwatch::exited(pidfd).await;
            let _ = tx.send((pid, serial));
        });
    }
}
