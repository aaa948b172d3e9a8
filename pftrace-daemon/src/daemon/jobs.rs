//! Cgroups that come and go, and batch jobs as cgroups: what the cgroup
//! watchers (`cgroupwatch.rs`) report is handled here.
//!
//! - A cgroup target (or the jobs root) that is made after start, or
//!   removed and made again, is put (back) in the kernel's set of watched
//!   cgroups and the Python processes in it are attached.
//! - Jobs: each child cgroup of the jobs root whose name matches the
//!   pattern (`job_{id}`) is a job. Calls of the processes in it (and in its
//!   descendants: Slurm's `step_<n>`) are appended to the job's own spill as
//!   they complete; when the job's cgroup is removed (its processes have
//!   all exited: the kernel removes only empty cgroups) its open calls are
//!   closed and its trace is written in the jobs' format, named with the job
//!   id, through `Destination` (created without following other users'
//!   links, replaced atomically). Calls also go to the daemon's store,
//!   rolling files and run trace as before.

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use super::{Daemon, targets::CgroupTarget};
use crate::{
    cgroupwatch::CgroupEvent,
    clock::WallClock,
    codes::CodeTable,
    config::JobsConfig,
    job_pattern::{self, JobPattern},
    output::{Choice, destination::Destination, spill::SpillWriter},
    pairing::Call,
    protocol::{JobStatus, StatsGrouping},
    stats::Aggregator,
    trace::{CallList, JobId},
};

/// Finished jobs kept for `status` (most recent last).
const MAX_FINISHED: usize = 100;
/// Jobs followed at once: each running job with a traced process holds a
/// file open. Beyond this (a user making cgroups in a delegated subtree),
/// new jobs are refused with a warning; their calls still reach the
/// daemon's own outputs.
const MAX_ACTIVE: usize = 1024;

/// The jobs under one root.
pub(super) struct Jobs {
    /// The root's slot among the cgroup targets.
    pub slot: usize,
    root: PathBuf,
    pattern: JobPattern,
    dir: PathBuf,
    format: Choice,
    sort_budget: usize,
    active: HashMap<String, Job>,
    /// Which job (its cgroup name) each traced process is in.
    by_pid: HashMap<u32, String>,
    finished: VecDeque<JobStatus>,
}

struct Job {
    id: String,
    name: String,
    output: Option<(Destination, SpillWriter)>,
    file: Option<String>,
    error: Option<String>,
    pids: BTreeSet<u32>,
    calls: u64,
    functions: Aggregator,
    start_ns: u64,
}

impl Jobs {
    /// Jobs under `cfg.root` (which must be set), their traces in `cfg.dir`
    /// (else `output_dir`). Checked by the config: pattern, format, a directory.
    pub fn new(
        cfg: &JobsConfig,
        output_dir: Option<&Path>,
        slot: usize,
        sort_budget: usize,
    ) -> Result<Self, String> {
        let root = cfg.root.clone().ok_or("no jobs root")?;
        let pattern = JobPattern::parse(&cfg.pattern).map_err(|e| e.to_string())?;
        let format = crate::output::choose(&cfg.format, None).map_err(|e| format!("jobs.format: {e}"))?;
        let dir = cfg.dir.as_deref().or(output_dir).ok_or(
            "jobs.root is set but not where the jobs' traces go: set jobs.dir (--job-output-dir) or output.dir",
        )?;
        // Made (0750) and checked now, so a bad place is refused at start.
        crate::output::safe_file::Dir::open(dir, Some(0o750))
            .map_err(|e| format!("jobs' trace directory: {e}"))?;
        Ok(Self {
            slot,
            root,
            pattern,
            dir: dir.to_path_buf(),
            format,
            sort_budget,
            active: HashMap::new(),
            by_pid: HashMap::new(),
            finished: VecDeque::new(),
        })
    }

    /// How `status` and the log name the jobs target.
    pub fn describe(&self) -> String {
        format!(
            "jobs: cgroups {}/{} (traces in {}, {})",
            self.root.display(),
            self.pattern.text(),
            self.dir.display(),
            self.format.name()
        )
    }

    /// A name for the job's trace not used by an earlier trace or a running job:
    /// `pftrace-job-<id>.json`, then `pftrace-job-<id>.2.json`, ...
    fn trace_path(&self, id: &str) -> PathBuf {
        let id = job_pattern::file_safe(id);
        let name = |n: u32| {
            let seq = if n == 1 { String::new() } else { format!(".{n}") };
            match self.format {
                Choice::Chrome => format!("pftrace-job-{id}{seq}.json"),
                Choice::Records => format!("pftrace-job-{id}{seq}.records.json"),
                Choice::Pfw(_) => format!("pftrace-job-{id}{seq}"),
            }
        };
        let taken = |p: &PathBuf| {
            p.symlink_metadata().is_ok()
                || self.active.values().any(|j| j.file.as_deref() == Some(&*p.display().to_string()))
        };
        (1..).map(|n| self.dir.join(name(n))).find(|p| !taken(p)).expect("a free name")
    }

    /// Starts job `name` (a child cgroup name of the root) if it matches the
    /// pattern and is new. Its trace file is made when its first process is traced.
    fn start(&mut self, name: &str) -> bool {
        if self.active.contains_key(name) {
            return true;
        }
        let Some(id) = self.pattern.job_id(name) else { return false };
        if self.active.len() >= MAX_ACTIVE {
            log::warn!(
                "job {id} (cgroup {}/{name}) is not followed: {MAX_ACTIVE} jobs are already; its calls go only \
                 to the daemon's own outputs",
                self.root.display()
            );
            return false;
        }
        log::info!("job {id} started (cgroup {}/{name})", self.root.display());
        let job = Job {
            id,
            name: name.into(),
            output: None,
            file: None,
            error: None,
            pids: BTreeSet::new(),
            calls: 0,
            functions: Aggregator::new(false),
            start_ns: WallClock::monotonic_now_ns(),
        };
        self.active.insert(name.into(), job);
        true
    }

    /// Makes job `name`'s trace place and calls file, once (its first traced process).
    fn open_output(&mut self, name: &str) {
        let Some(job) = self.active.get(name) else { return };
        if job.file.is_some() {
            return;
        }
        let id = job.id.clone();
        let path = self.trace_path(&id);
        let shown = path.display().to_string();
        let result = Destination::prepare(&path, &self.format, &super::hostname(), &[], self.sort_budget);
        let job = self.active.get_mut(name).expect("checked");
        job.file = Some(shown.clone());
        match result {
            Ok(output) => {
                log::info!("job {id}: its trace goes to {shown}");
                job.output = Some(output);
            }
            Err(err) => {
                log::warn!("job {id}: no trace will be written: {err}");
                job.error = Some(err.to_string());
            }
        }
    }

    /// The job cgroup name of a process, from /proc/PID/cgroup (the cgroup v2 line).
    fn job_name_of(&self, pid: u32) -> Option<String> {
        let mount = super::targets::cgroup2_mount()?;
        let root = self.root.strip_prefix(&mount).ok()?;
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        let line = text.lines().find_map(|l| l.strip_prefix("0::"))?;
        let rel = Path::new(line.trim()).strip_prefix("/").ok()?;
        let under = rel.strip_prefix(root).ok()?;
        Some(under.components().next()?.as_os_str().to_string_lossy().into_owned())
    }

    pub fn status(&self, codes: &CodeTable) -> Vec<JobStatus> {
        let mut v: Vec<JobStatus> = self.finished.iter().cloned().collect();
        let mut running: Vec<&Job> = self.active.values().collect();
        running.sort_by_key(|j| j.start_ns);
        v.extend(running.into_iter().map(|j| j.status(&self.root, true, codes)));
        v
    }
}

impl Job {
    fn status(&self, root: &Path, running: bool, codes: &CodeTable) -> JobStatus {
        JobStatus {
            id: self.id.clone(),
            cgroup: root.join(&self.name).display().to_string(),
            running,
            pids: self.pids.iter().copied().collect(),
            calls: self.calls,
            trace: self.file.clone().filter(|_| self.error.is_none()),
            error: self.error.clone(),
            functions: self.functions.rows(StatsGrouping::Function, codes),
        }
    }
}

impl Daemon {
    /// Handles what a cgroup watcher saw (the ring was drained just before).
    pub(super) fn cgroup_event(&mut self, event: CgroupEvent) {
        let job_slot = self.jobs.as_ref().map(|j| j.slot);
        match event {
            CgroupEvent::Appeared { slot } => self.cgroup_appeared(slot),
            CgroupEvent::Gone { slot } => {
                if self.cgroups[slot].take().is_some() {
                    log::info!(
                        "cgroup {} was removed; it will be traced again if it is made again",
                        self.cgroup_paths[slot].display()
                    );
                }
                if job_slot == Some(slot) {
                    let names: Vec<String> =
                        self.jobs.as_ref().map_or(vec![], |j| j.active.keys().cloned().collect());
                    for name in names {
                        self.finish_job(&name);
                    }
                }
            }
            CgroupEvent::ChildMade { slot, name } if job_slot == Some(slot) => {
                if let Some(jobs) = &mut self.jobs {
                    jobs.start(&name);
                }
            }
            CgroupEvent::ChildRemoved { slot, name } if job_slot == Some(slot) => self.finish_job(&name),
            CgroupEvent::Children { slot, names } if job_slot == Some(slot) => {
                log::warn!("cgroup events were lost (inotify queue overflow); listing the jobs again");
                let gone: Vec<String> = self
                    .jobs
                    .as_ref()
                    .map_or(vec![], |j| j.active.keys().filter(|n| !names.contains(n)).cloned().collect());
                for name in gone {
                    self.finish_job(&name);
                }
                if let Some(jobs) = &mut self.jobs {
                    for name in &names {
                        jobs.start(name);
                    }
                }
            }
            _ => {}
        }
    }

    /// Cgroup target `slot` exists (again): watch it in the kernel and attach its Pythons.
    fn cgroup_appeared(&mut self, slot: usize) {
        let path = self.cgroup_paths[slot].clone();
        let cg = match CgroupTarget::open(&path) {
            Ok(cg) => cg,
            Err(err) => {
                log::warn!("{err}");
                return;
            }
        };
        if self.cgroups[slot].as_ref().is_some_and(|c| c.id == cg.id) {
            return; // opened at start
        }
        if let Err(err) = self.probes.set_cgroup(slot as u32, cg.dir.as_fd()) {
            log::warn!("cgroup {}: {err}; its processes are not traced", path.display());
            return;
        }
        log::info!("cgroup {} exists now (id {}): tracing the Python processes in it", path.display(), cg.id);
        let pids = cg.pids();
        self.cgroups[slot] = Some(cg);
        let me = std::process::id();
        for pid in pids.into_iter().filter(|&p| p != me) {
            self.discover(pid);
        }
    }

    /// A process was attached: note its job, if it is in one.
    pub(super) fn note_job_process(&mut self, pid: u32) {
        let Some(jobs) = &mut self.jobs else { return };
        // A job whose cgroup is already gone (a process attached as its job
        // ended) is not started again: no removal would ever finish it.
        let name = jobs.job_name_of(pid).filter(|name| jobs.root.join(name).is_dir());
        match name {
            Some(name) if jobs.start(&name) => {
                jobs.open_output(&name);
                jobs.active.get_mut(&name).expect("started").pids.insert(pid);
                jobs.by_pid.insert(pid, name);
            }
            _ => {
                jobs.by_pid.remove(&pid);
            }
        }
    }

    /// Appends completed calls to their jobs' traces.
    pub(super) fn route_job_calls(&mut self, calls: &[Call]) {
        let Some(jobs) = &mut self.jobs else { return };
        if jobs.by_pid.is_empty() {
            return;
        }
        for call in calls {
            let Some(job) = jobs.by_pid.get(&call.pid).and_then(|name| jobs.active.get_mut(name)) else {
                continue;
            };
            job.calls += 1;
            job.functions.push(call);
            if let Some((_, spill)) = &mut job.output {
                spill.append(std::slice::from_ref(call));
            }
        }
    }

    /// Job cgroup `name` is gone: close its processes' open calls and write its trace.
    fn finish_job(&mut self, name: &str) {
        let Some(pids) = self.jobs.as_ref().and_then(|j| j.active.get(name)).map(|j| j.pids.clone()) else {
            return;
        };
        let end_ns = WallClock::monotonic_now_ns();
        for &pid in &pids {
            if self.processes.is_running(pid) {
                self.end_process(pid, end_ns);
            }
        }
        let jobs = self.jobs.as_mut().expect("checked");
        let mut job = jobs.active.remove(name).expect("checked");
        for pid in &pids {
            if jobs.by_pid.get(pid).is_some_and(|n| n == name) {
                jobs.by_pid.remove(pid);
            }
        }
        let root = jobs.root.clone();
        let output = job.output.take();
        let codes = self.codes.table();
        let status = job.status(&root, false, &codes);
        let counters = self.counters();
        let mut trace = self.trace_of(CallList::default(), None, end_ns, counters);
        trace.processes.retain(|p| pids.contains(&p.pid));
        for p in &mut trace.processes {
            p.job = Some(JobId { variable: "cgroup".into(), id: job.id.clone() });
        }
        trace.samples.retain(|s| pids.contains(&s.pid));
        trace.start_ns = job.start_ns;
        trace.calls_total = job.calls;
        trace.calls_evicted = 0;
        trace.functions = job.functions.rows(StatsGrouping::Function, &codes);
        let id = job.id.clone();
        let Some((destination, spill)) = output else {
            if status.error.is_none() {
                log::info!("job {id} ended; no Python process was traced in it, so it has no trace");
                self.jobs.as_mut().expect("checked").remember(status);
                return;
            }
            log::warn!(
                "job {id} ended ({} calls); no trace was written: {}",
                job.calls,
                status.error.as_deref().unwrap_or("?")
            );
            self.jobs.as_mut().expect("checked").remember(status);
            return;
        };
        trace.spilled = Some(spill.finish());
        let write = move || match destination.write(&trace) {
            Ok(files) => {
                let calls: u64 = files.iter().map(|(_, n)| n).sum();
                log::info!("job {id} ended: wrote {calls} calls to {}", destination.path().display());
            }
            Err(err) => log::warn!("job {id} ended; its trace could not be written: {err}"),
        };
        // Rendering sorts every call of the job: off the event loop while tracing runs.
        if self.stopping_now() {
            write();
        } else {
            tokio::task::spawn_blocking(write);
        }
        self.jobs.as_mut().expect("checked").remember(status);
    }

    /// Finishes every running job (tracing stops).
    pub(super) fn finish_jobs(&mut self) {
        let names: Vec<String> = self.jobs.as_ref().map_or(vec![], |j| j.active.keys().cloned().collect());
        for name in names {
            self.finish_job(&name);
        }
    }

    fn stopping_now(&self) -> bool {
        self.stopping || tokio::runtime::Handle::try_current().is_err()
    }
}

impl Jobs {
    fn remember(&mut self, status: JobStatus) {
        if self.finished.len() == MAX_FINISHED {
            self.finished.pop_front();
        }
        self.finished.push_back(status);
    }
}
