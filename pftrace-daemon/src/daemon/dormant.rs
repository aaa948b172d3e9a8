//! The default mode (every scope but `--all` and `--binary`: `--pid`,
//! commands, watched cgroups and their descendants): one dormant host-wide
//! uprobe link per interpreter file (made once, reused; no kernel-managed
//! semaphore), the semaphores of in-scope processes raised by the daemon
//! (at exec for new ones), and the kernel's TRACKED set deciding which hits
//! count (SCOPE_FILTER).
//!
//! Why (bench/race-free/README.md, 2 cores under load): pid-scoped links
//! cost 765 -> 2,452 ns per hit from 1 to 50 traced processes (every hit
//! walks every link's filter), one host-wide consumer 888 -> 966 ns; a
//! neighbour whose semaphore stays 0 pays nothing; a semaphore written
//! through /proc/PID/mem lands 0.2-4 ms after exec, the first line runs
//! ~10 ms after it. Only the first process of a file must wait for the link
//! (4-12 ms): it is held stopped meanwhile ([`crate::hold`]).

use std::{
    collections::{HashMap, HashSet},
    os::unix::fs::MetadataExt as _,
    time::Instant,
};

use super::{Daemon, processes::FileId};
use crate::{
    bpf::UprobeLink,
    events::{printable, printable_path},
    hold::Hold,
    ledger::{Entry, Ledger},
    procwatch,
    semaphores::{SemaphoreError, Semaphores},
    target::Target,
};

/// Environment variable turning the mode off (`kernel`: pid-scoped links
/// with kernel-managed semaphores, as before; for comparisons).
pub const SEMAPHORES_ENV: &str = "PFTRACE_SEMAPHORES";

/// Interpreter files with a dormant link, at most: links stay for the
/// daemon's life, and a user of a watched cgroup could exec copy after copy
/// of an interpreter (each copy another inode, another host-wide link of
/// 4-12 ms to make). A site's conda environments are dozens; beyond this a
/// process is traced through pid-scoped probes, as before this mode.
pub const MAX_DORMANT_FILES: usize = 256;

/// Dormant links and the semaphores the daemon raised.
#[derive(Default)]
pub(super) struct Dormant {
    pub(super) enabled: bool,
    links: HashMap<FileId, UprobeLink>,
    /// pid -> (its start time, the semaphores raised in it).
    raised: HashMap<u32, (u64, Semaphores)>,
    /// Pids that exec'd since they were last seen: a new image, whose
    /// semaphores are 0 (-> the exec's time, monotonic ns).
    fresh: HashMap<u32, u64>,
    /// Pids forked by a process whose semaphores the daemon raised: the copy is raised already.
    inherited: HashSet<u32>,
    /// [`MAX_DORMANT_FILES`] was reached and said once.
    full_said: bool,
    /// The record of `raised` for a daemon started after this one, if this
    /// one is killed ([`crate::ledger`]); None until the first raise, or
    /// when it cannot be kept (said once).
    ledger: Option<Ledger>,
    ledger_said: bool,
    /// Files whose dormant link the kernel refused (another uprobe holds
    /// their sites with a kernel-managed semaphore: see
    /// [`crate::bpf::AttachError::is_semaphore_conflict`]) -> when: their
    /// processes take pid-scoped probes until [`CONFLICT_RETRY`] has passed.
    conflicts: HashMap<FileId, Instant>,
}

/// How long a file whose dormant link was refused is traced through
/// pid-scoped probes before a dormant link is tried again (the other tracer
/// may have gone; a refused try costs a link creation, ~4-12 ms here).
const CONFLICT_RETRY: std::time::Duration = std::time::Duration::from_secs(10);

/// Why [`Daemon::attach_dormant`] did not trace a process.
pub(super) enum NotDormant {
    /// Refused and recorded (the reason, for an explicit `--pid`).
    Refused(String),
    /// It exited meanwhile.
    Gone,
    /// The kernel refused the file's dormant link: another uprobe holds its
    /// sites with the other semaphore setting. The caller may attach the
    /// process with pid-scoped probes instead.
    Conflict(Box<Target>),
}

impl Dormant {
    pub(super) fn new(enabled: bool) -> Self {
        let enabled = enabled && std::env::var(SEMAPHORES_ENV).map_or(true, |v| v != "kernel");
        Self { enabled, ..Default::default() }
    }

    /// `pid` exec'd (reported by the kernel).
    pub(super) fn exec(&mut self, pid: u32, ts_ns: u64) {
        if self.enabled {
            self.fresh.insert(pid, ts_ns);
            self.inherited.remove(&pid);
        }
    }

    /// `parent` forked `pid` (reported by the kernel).
    pub(super) fn fork(&mut self, parent: u32, pid: u32) {
        if self.enabled && self.raised.contains_key(&parent) {
            self.inherited.insert(pid);
        }
    }

    /// Whether a process of `file` can be traced through a dormant link
    /// (its file has one, or there is room for one more).
    pub(super) fn has_room_for(&self, file: &FileId) -> bool {
        self.links.contains_key(file) || self.links.len() < MAX_DORMANT_FILES
    }

    /// Whether the kernel refused `file`'s dormant link less than
    /// [`CONFLICT_RETRY`] ago (its processes take pid-scoped probes meanwhile).
    pub(super) fn was_refused(&self, file: &FileId) -> bool {
        self.conflicts.get(file).is_some_and(|at| at.elapsed() < CONFLICT_RETRY)
    }

    /// Whether a process of `file` goes through a dormant link now: there is
    /// room, and the kernel did not just refuse the file's link.
    pub(super) fn takes(&self, file: &FileId) -> bool {
        self.has_room_for(file) && !self.was_refused(file)
    }

    /// Says once that the limit of files was reached.
    pub(super) fn note_full(&mut self, binary: &str) {
        if !std::mem::replace(&mut self.full_said, true) {
            log::warn!(
                "{MAX_DORMANT_FILES} interpreter files already have host-wide probes; {binary} and later new files \
                 are traced through pid-scoped probes (a process's first calls may then be missed)"
            );
        }
    }

    /// The process ended (exited, or exec'd something that is not ours).
    pub(super) fn forget(&mut self, pid: u32) {
        if let Some((started, _)) = self.raised.remove(&pid) {
            self.record(|ledger, live| ledger.forgotten(pid, started, live));
        }
    }

    /// Lowers the daemon's +1 in every process still running (clean stop).
    pub(super) fn lower_all(&mut self) {
        for (pid, (started, sems)) in self.raised.drain() {
            let same = crate::procinfo::stat(pid).is_some_and(|s| s.start_ticks == started);
            if same && let Err(err) = sems.adjust(-1) {
                log::debug!("lowering the semaphores of pid {pid}: {err}");
            }
        }
        if let Some(ledger) = &mut self.ledger {
            ledger.remove();
        }
    }

    /// Writes a change down (`change`, given the ledger and what is raised
    /// now), for a daemon started after this one if this one is killed: one
    /// write, after the semaphores are raised.
    fn record(
        &mut self,
        change: impl FnOnce(&mut Ledger, &mut dyn Iterator<Item = Entry>) -> std::io::Result<()>,
    ) {
        if self.ledger.is_none() && !self.ledger_said {
            match Ledger::new() {
                Ok(ledger) => self.ledger = Some(ledger),
                Err(err) => {
                    self.ledger_said = true;
                    log::warn!(
                        "cannot record the semaphores pftraced raises ({}: {err}): if pftraced is killed, \
                         the processes it traced keep them raised until they exit",
                        crate::ledger::DIR
                    );
                }
            }
        }
        let Some(ledger) = &mut self.ledger else { return };
        let mut live = self.raised.values().map(|(started, sems)| crate::ledger::entry(sems, *started));
        if let Err(err) = change(ledger, &mut live)
            && !std::mem::replace(&mut self.ledger_said, true)
        {
            log::warn!("recording the semaphores pftraced raised in {}: {err}", crate::ledger::DIR);
        }
    }
}

impl Daemon {
    /// Traces `target` (found in a watched cgroup, or a child of a traced
    /// process) through its file's dormant link.
    pub(super) fn attach_dormant(&mut self, target: Target) -> Result<(), NotDormant> {
        let pid = target.pid;
        let binary = printable_path(&target.binary);
        let exec_ns = self.dormant.fresh.remove(&pid);
        let fresh = exec_ns.is_some();
        let inherited = self.dormant.inherited.remove(&pid);
        if let Err(err) = self.processes.check_limit() {
            log::warn!("{}", printable(&err.to_string()));
            self.processes.refuse(pid, &err);
            return Err(NotDormant::Refused(err.to_string()));
        }
        let pidfd = match procwatch::pidfd(pid) {
            Ok(pidfd) => pidfd,
            Err(err) if err.raw_os_error() == Some(libc::ESRCH) => {
                log::debug!("pid {pid} exited before it could be attached");
                return Err(NotDormant::Gone);
            }
            // Out of file descriptors (RLIMIT_NOFILE: two per traced
            // process), said, not dropped silently.
            Err(err) => {
                let err = format!("pid {pid} ({binary}) is not traced: watching its exit: {err}");
                log::warn!("{}", printable(&err));
                self.processes.refuse(pid, &err);
                return Err(NotDormant::Refused(err));
            }
        };
        let mut hold = None;
        let held_at = Instant::now();
        if !self.dormant.links.contains_key(&target.file) {
            // Its first line is ~10 ms away, the link 4-12 ms: hold it (a
            // process found by a scan is long past its first line: no use).
            if fresh {
                match Hold::stop(pid) {
                    Ok(h) => hold = Some(h),
                    Err(err) => log::warn!(
                        "pid {pid} could not be held at its exec while the probes of {binary} are made ({err}): \
                         its calls in the next ~10 ms may be missed"
                    ),
                }
            }
            // Others of the file that exec'd meanwhile wait too (their exec
            // reports come after this one: 1 of 100 short Pythons started
            // beside the first lost a call without this).
            let others = if fresh { self.hold_siblings(&target) } else { Vec::new() };
            let started = Instant::now();
            let link = self
                .probes
                .dormant_usdt_job(&target.open_path, &target.sites)
                .and_then(|job| job.run().map_err(Into::into));
            match link {
                Ok(link) => {
                    log::info!(
                        "probes of {binary} made for every process running it, dormant until pftraced raises a \
                         process's semaphores ({} us{})",
                        started.elapsed().as_micros(),
                        if hold.is_some() {
                            format!("; pid {pid} held stopped meanwhile")
                        } else {
                            String::new()
                        }
                    );
                    self.dormant.links.insert(target.file, link);
                    for (sibling, sibling_hold) in others {
                        if let Err(err) = self.raise(&sibling, true, None) {
                            log::debug!("pid {}: {err}", sibling.pid);
                        }
                        drop(sibling_hold);
                    }
                }
                Err(err) if err.is_semaphore_conflict() => {
                    // Its holds go with this return: pid-scoped probes
                    // (the caller's) take a few ms and miss what it runs meanwhile.
                    log::warn!(
                        "the probes of {binary} cannot be made for every process running it ({}): pid {pid} \
                         and its file's other processes for the next {} s get pid-scoped probes, whose \
                         first calls may be missed",
                        printable(&err.to_string()),
                        CONFLICT_RETRY.as_secs()
                    );
                    self.dormant.conflicts.insert(target.file, Instant::now());
                    return Err(NotDormant::Conflict(Box::new(target)));
                }
                Err(err) => {
                    let err = super::AttachFailure::Bpf { pid, binary, source: Box::new(err) };
                    log::warn!("{}", printable(&err.to_string()));
                    self.processes.refuse(pid, &err);
                    return Err(NotDormant::Refused(err.to_string()));
                }
            }
        }
        if let Err(err) = self.probes.track(pid) {
            log::warn!("pid {pid} is not in the kernel's tracked set, so it is not traced: {err}");
        }
        // Raised already while its file's probes were made ([`Self::hold_siblings`]).
        let raised = self.dormant.raised.get(&pid).is_some_and(|(started, _)| *started == target.started);
        if let Err(err) = self.raise(&target, !inherited && !raised, exec_ns) {
            drop(hold);
            if err.is_gone() || is_exiting(pid) {
                log::debug!("pid {pid} exited before it could be attached");
                return Err(NotDormant::Gone);
            }
            if inherited && matches!(err, SemaphoreError::NotMapped { .. }) {
                // A fork that exec'd before its report was read (4 of 30
                // children of `subprocess.run` here): not an error, its exec
                // report comes next and is handled as any exec.
                log::debug!("pid {pid} exec'd before its fork could be recorded");
                return Err(NotDormant::Gone);
            }
            log::warn!("{}", printable(&err.to_string()));
            self.processes.refuse(pid, &err);
            return Err(NotDormant::Refused(err.to_string()));
        }
        if hold.take().is_some() {
            log::info!(
                "pid {pid} was held stopped {} us at its exec while the probes of {binary} were made",
                held_at.elapsed().as_micros()
            );
        }
        let serial = self.processes.add_process(&target, Vec::new());
        // As the pid-scoped path does: what it ran is resolved even if it is
        // gone before its requests are served (qualified names of a launched
        // command that lived 50 ms were missing without it).
        self.codes.hold(pid);
        self.watch(pid, serial, pidfd);
        self.note_job_process(pid);
        log::info!("tracing pid {pid} ({binary})");
        Ok(())
    }

    /// Processes of the watched cgroups running `target`'s interpreter file
    /// that pftraced does not trace yet (they exec'd after it), held stopped.
    fn hold_siblings(&self, target: &Target) -> Vec<(Target, Hold)> {
        let (dev, ino) = target.file;
        let mut held = Vec::new();
        // Each hold may wait up to 50 ms for a stop: all of them together at
        // most this long, so many processes in uninterruptible sleeps cannot
        // stall the event loop (the rest are raised after the link, as any
        // process found later).
        let budget = Instant::now() + std::time::Duration::from_millis(100);
        for pid in self.cgroups.iter().flatten().flat_map(|c| c.pids()) {
            if Instant::now() >= budget {
                log::debug!(
                    "holding processes of {} beside pid {}: out of time",
                    printable_path(&target.binary),
                    target.pid
                );
                break;
            }
            if pid == target.pid || self.processes.is_running(pid) || self.dormant.raised.contains_key(&pid) {
                continue;
            }
            let same = std::fs::metadata(format!("/proc/{pid}/exe"))
                .is_ok_and(|m| std::os::unix::fs::MetadataExt::dev(&m) == dev && m.ino() == ino);
            if !same {
                continue;
            }
            let Ok(hold) = Hold::stop(pid) else { continue };
            match crate::target::inspect(pid) {
                Ok(t) if t.file == target.file => held.push((t, hold)),
                _ => drop(hold),
            }
        }
        held
    }

    /// The process exec'd the interpreter it ran before: its new image
    /// needs its semaphores raised again. Whether it was handled here.
    pub(super) fn reraise_after_exec(&mut self, target: &Target) -> bool {
        let pid = target.pid;
        if !self.dormant.raised.contains_key(&pid) {
            return false;
        }
        if let Some(exec_ns) = self.dormant.fresh.remove(&pid)
            && let Err(err) = self.raise(target, true, Some(exec_ns))
        {
            log::warn!("{}", printable(&err.to_string()));
        }
        true
    }

    /// Finds the semaphores of `target` and raises them (`add`) or only
    /// records them (a fork's copy, raised already).
    fn raise(&mut self, target: &Target, add: bool, exec_ns: Option<u64>) -> Result<(), SemaphoreError> {
        // Return sites' semaphores first (Semaphores::adjust).
        let mut offsets: Vec<(bool, u64)> = target
            .sites
            .iter()
            .map(|s| (s.python_kind() != Some(pftrace_common::kind::RETURN), s.semaphore_offset))
            .collect();
        offsets.sort_unstable();
        let offsets: Vec<u64> = offsets.into_iter().map(|(_, o)| o).collect();
        let sems = Semaphores::locate(target.pid, target.file, &offsets)?;
        if add {
            sems.adjust(1)?;
            let now = crate::clock::WallClock::monotonic_now_ns();
            log::debug!(
                "pid {} semaphores raised at {now} ns ({} us after its exec)",
                target.pid,
                exec_ns.map_or(-1, |e| (now.saturating_sub(e) / 1000) as i64)
            );
        }
        let entry = crate::ledger::entry(&sems, target.started);
        self.dormant.raised.insert(target.pid, (target.started, sems));
        self.dormant.record(|ledger, live| ledger.raised(&entry, live));
        Ok(())
    }
}

/// Whether `pid` is gone or on its way out (PF_EXITING: its memory may be
/// gone before it is a zombie; killed 0-12 ms after exec in lifecycle's test).
fn is_exiting(pid: u32) -> bool {
    const PF_EXITING: u32 = 0x4;
    procfs::process::Process::new(pid as i32)
        .and_then(|p| p.stat())
        .map_or(true, |s| s.flags & PF_EXITING != 0 || matches!(s.state, 'Z' | 'X'))
}
