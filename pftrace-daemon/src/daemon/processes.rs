//! The processes and interpreter binaries being traced: attaching to a
//! process (pid-scoped uprobes, so only its semaphore is raised) or to a
//! binary host-wide (`--all`), detaching when a process exits, and keeping
//! the reasons processes in scope could not be traced.

use std::collections::{HashMap, VecDeque};

use crate::{
    bpf::{AttachJob, BpfError, KernelProbes, ProbeKind, UprobeLink},
    events::printable_path,
    procinfo,
    protocol::{BinaryStatus, ProcessStatus, Refusal},
    target::{Target, TargetError},
    trace::TracedProcess,
};

/// Refusals kept for `status`.
const MAX_REFUSALS: usize = 100;

/// Errors attaching.
#[derive(Debug, thiserror::Error)]
pub enum AttachFailure {
    #[error("attaching to pid {pid} ({binary}): {source}")]
    Bpf { pid: u32, binary: String, source: Box<BpfError> },
    #[error("limit reached: already tracing {0} processes (limits.max_processes)")]
    TooMany(usize),
}

/// A process we trace (or traced: kept after exit for its metadata).
#[derive(Debug)]
pub struct ProcEntry {
    pub info: TracedProcess,
    /// Which attachment this is (a pid can be reused by a later process).
    pub serial: u64,
    /// The ELF its probes are attached to.
    pub file: FileId,
    /// Its start time (`Target::started`), telling it apart from a later process with its pid.
    pub started: u64,
    links: Vec<UprobeLink>,
    pub running: bool,
    pub calls: u64,
}

#[derive(Debug)]
struct BinaryEntry {
    path: String,
    version: Option<String>,
    host_links: Vec<UprobeLink>,
}

/// Identity of an ELF file: (device, inode).
pub type FileId = (u64, u64);

/// Every traced process and binary.
#[derive(Debug, Default)]
pub struct Processes {
    procs: HashMap<u32, ProcEntry>,
    binaries: HashMap<FileId, BinaryEntry>,
    refused: VecDeque<Refusal>,
    max_processes: usize,
    next_serial: u64,
}

/// The job attaching the programs to every entry and return site of `target`.
pub fn attach_job(
    probes: &mut KernelProbes,
    target: &Target,
    pid: Option<u32>,
) -> Result<AttachJob, AttachFailure> {
    let sites: Vec<_> = [(ProbeKind::Entry, &target.entry), (ProbeKind::Return, &target.ret)]
        .into_iter()
        .flat_map(|(kind, sites)| sites.iter().map(move |s| (kind, s.offset, s.semaphore_offset, s.spec)))
        .collect();
    probes.attach_job(&target.open_path, &sites, pid).map_err(|source| AttachFailure::Bpf {
        pid: target.pid,
        binary: printable_path(&target.binary),
        source: Box::new(source),
    })
}

/// Runs an attach job (blocking: attaching may wait for an exec in progress).
pub fn run_job(job: &AttachJob, target: &Target) -> Result<UprobeLink, AttachFailure> {
    job.run().map_err(|source| AttachFailure::Bpf {
        pid: target.pid,
        binary: printable_path(&target.binary),
        source: Box::new(source.into()),
    })
}

fn attach_sites(
    probes: &mut KernelProbes,
    target: &Target,
    pid: Option<u32>,
) -> Result<Vec<UprobeLink>, AttachFailure> {
    Ok(vec![run_job(&attach_job(probes, target, pid)?, target)?])
}

/// How many processes map the file `file` now (from /proc/*/maps).
pub fn processes_mapping(file: FileId) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else { return 0 };
    let (dev, ino) = file;
    let dev = format!("{:02x}:{:02x}", libc::major(dev), libc::minor(dev));
    let ino = ino.to_string();
    dir.flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())))
        .filter(|e| {
            std::fs::read_to_string(e.path().join("maps")).is_ok_and(|maps| {
                maps.lines().any(|l| {
                    let mut f = l.split_whitespace().skip(3);
                    f.next() == Some(dev.as_str()) && f.next() == Some(ino.as_str())
                })
            })
        })
        .count()
}

/// The (device, inode) of the ELF a target's probes are in (as inspected:
/// the process may have exited since, and its /proc/PID/root with it).
pub fn file_id(target: &Target) -> FileId {
    target.file
}

impl Processes {
    pub fn new(max_processes: usize) -> Self {
        Self { max_processes, ..Default::default() }
    }

    /// Whether `pid` is traced and running.
    pub fn is_running(&self, pid: u32) -> bool {
        self.procs.get(&pid).is_some_and(|p| p.running)
    }

    /// The attach serial of the running process `pid`.
    pub fn serial(&self, pid: u32) -> Option<u64> {
        self.procs.get(&pid).filter(|p| p.running).map(|p| p.serial)
    }

    fn new_serial(&mut self) -> u64 {
        self.next_serial += 1;
        self.next_serial
    }

    /// Attaches pid-scoped probes to one process; returns its attach serial.
    pub fn attach_process(
        &mut self,
        probes: &mut KernelProbes,
        target: &Target,
    ) -> Result<u64, AttachFailure> {
        self.check_limit()?;
        let links = attach_sites(probes, target, Some(target.pid))?;
        Ok(self.add_process(target, links))
    }

    /// Refuses one more process beyond `limits.max_processes`.
    pub fn check_limit(&self) -> Result<(), AttachFailure> {
        let running = self.procs.values().filter(|p| p.running).count();
        if running >= self.max_processes {
            return Err(AttachFailure::TooMany(running));
        }
        Ok(())
    }

    /// Records a process whose pid-scoped probes were attached; returns its serial.
    pub fn add_process(&mut self, target: &Target, links: Vec<UprobeLink>) -> u64 {
        self.note_binary(target);
        let serial = self.new_serial();
        let entry = ProcEntry {
            info: traced(target),
            serial,
            file: file_id(target),
            started: target.started,
            links,
            running: true,
            calls: 0,
        };
        self.procs.insert(target.pid, entry);
        serial
    }

    /// The ELF the running process `pid` has probes attached to, and its start time.
    pub fn identity_of(&self, pid: u32) -> Option<(FileId, u64)> {
        self.procs.get(&pid).filter(|p| p.running).map(|p| (p.file, p.started))
    }

    /// The process exec'd the same interpreter: its probes still apply; refresh what we show.
    pub fn refresh(&mut self, target: &Target) {
        if let Some(p) = self.procs.get_mut(&target.pid) {
            p.info = traced(target);
        }
    }

    /// Attaches host-wide probes to the binary of `target`, once per binary,
    /// and records the process; returns its attach serial.
    pub fn attach_binary(
        &mut self,
        probes: &mut KernelProbes,
        target: &Target,
    ) -> Result<u64, AttachFailure> {
        self.attach_host_wide(probes, target)?;
        let serial = self.new_serial();
        let file = file_id(target);
        let started = target.started;
        let entry = ProcEntry {
            info: traced(target),
            serial,
            file,
            started,
            links: Vec::new(),
            running: true,
            calls: 0,
        };
        self.procs.insert(target.pid, entry);
        Ok(serial)
    }

    /// Attaches host-wide probes to the binary of `target` unless it has them.
    pub fn attach_host_wide(
        &mut self,
        probes: &mut KernelProbes,
        target: &Target,
    ) -> Result<(), AttachFailure> {
        let id = file_id(target);
        if !self.is_host_wide(id) {
            let links = attach_sites(probes, target, None)?;
            self.note_binary(target);
            self.binaries.get_mut(&id).expect("noted").host_links = links;
        }
        Ok(())
    }

    /// Whether the binary `file` has host-wide probes.
    pub fn is_host_wide(&self, file: FileId) -> bool {
        self.binaries.get(&file).is_some_and(|b| !b.host_links.is_empty())
    }

    fn note_binary(&mut self, target: &Target) {
        self.binaries.entry(file_id(target)).or_insert_with(|| BinaryEntry {
            path: printable_path(&target.binary),
            version: target.version.map(|v| v.to_string()),
            host_links: Vec::new(),
        });
    }

    /// The process exited (or exec'd something else): returns its probes'
    /// links, for the caller to drop (which detaches them) where blocking is fine.
    #[must_use = "dropping the links detaches the probes; drop them off the event loop"]
    pub fn exited(&mut self, pid: u32) -> Vec<UprobeLink> {
        match self.procs.get_mut(&pid) {
            Some(p) => {
                p.running = false;
                std::mem::take(&mut p.links)
            }
            None => Vec::new(),
        }
    }

    /// Counts a completed call for its process.
    pub fn count_call(&mut self, pid: u32) {
        if let Some(p) = self.procs.get_mut(&pid) {
            p.calls += 1;
        }
    }

    pub fn refuse(&mut self, pid: u32, err: &dyn std::fmt::Display) {
        if self.refused.len() >= MAX_REFUSALS {
            self.refused.pop_front();
        }
        // The reason may quote paths the traced process chose.
        let reason = crate::events::printable(&err.to_string()).into_owned();
        self.refused.push_back(Refusal { pid, reason });
    }

    /// Whether a refusal is worth reporting: a process in scope that is not
    /// a Python at all (a shell, `sleep`) is simply not ours.
    pub fn worth_reporting(err: &TargetError) -> bool {
        !matches!(
            err,
            TargetError::NotPython { .. }
                | TargetError::Gone { .. }
                | TargetError::PidNotFound(_)
                | TargetError::Zombie(_)
        )
    }

    pub fn running_pids(&self) -> Vec<u32> {
        self.procs.values().filter(|p| p.running).map(|p| p.info.pid).collect()
    }

    pub fn running_count(&self) -> usize {
        self.procs.values().filter(|p| p.running).count()
    }

    pub fn traced(&self) -> impl Iterator<Item = &TracedProcess> {
        self.procs.values().map(|p| &p.info)
    }

    /// What is known of process `pid`.
    pub fn info(&self, pid: u32) -> Option<&TracedProcess> {
        self.procs.get(&pid).map(|p| &p.info)
    }

    pub fn process_status(&self) -> Vec<ProcessStatus> {
        let mut v: Vec<ProcessStatus> = self
            .procs
            .values()
            .map(|p| ProcessStatus {
                pid: p.info.pid,
                binary: p.info.binary.clone(),
                version: p.info.version.map(|v| v.to_string()),
                command: p.info.command.clone(),
                running: p.running,
                calls: p.calls,
            })
            .collect();
        v.sort_by_key(|p| p.pid);
        v
    }

    pub fn binary_status(&self) -> Vec<BinaryStatus> {
        let mut v: Vec<BinaryStatus> = self
            .binaries
            .values()
            .map(|b| BinaryStatus {
                path: b.path.clone(),
                version: b.version.clone(),
                host_wide: !b.host_links.is_empty(),
                processes: self.procs.values().filter(|p| p.running && p.info.binary == b.path).count()
                    as u64,
            })
            .collect();
        v.sort_by(|a, b| a.path.cmp(&b.path));
        v
    }

    pub fn refusals(&self) -> Vec<Refusal> {
        self.refused.iter().cloned().collect()
    }

    /// Detaches everything.
    pub fn detach_all(&mut self) {
        for p in self.procs.values_mut() {
            p.links.clear();
        }
        for b in self.binaries.values_mut() {
            b.host_links.clear();
        }
    }
}

fn traced(target: &Target) -> TracedProcess {
    TracedProcess {
        pid: target.pid,
        binary: printable_path(&target.binary),
        version: target.version,
        command: target.command.clone(),
        comm: procinfo::comm(target.pid),
        job: procinfo::job_id(target.pid),
    }
}
