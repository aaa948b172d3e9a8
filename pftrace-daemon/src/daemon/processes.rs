//! The processes and interpreter binaries being traced, with the links
//! that keep their probes (a process's pid-scoped link, so only its
//! semaphore is raised, or a binary's host-wide one); what `status` and the
//! trace say of them; and the reasons processes in scope could not be traced.

use std::collections::{HashMap, VecDeque};

use super::attach::AttachFailure;
use crate::{
    bpf::UprobeLink,
    events::printable_path,
    procinfo,
    protocol::{BinaryStatus, ProcessStatus, Refusal},
    target::{Target, TargetError},
    trace::TracedProcess,
};

/// Refusals kept for `status`.
const MAX_REFUSALS: usize = 100;

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
    procs: crate::fast_hash::FastMap<u32, ProcEntry>,
    binaries: HashMap<FileId, BinaryEntry>,
    refused: VecDeque<Refusal>,
    max_processes: usize,
    next_serial: u64,
}

/// How many processes map the file `file` now (from /proc/*/maps).
pub fn processes_mapping(file: FileId) -> usize {
    let Ok(all) = procfs::process::all_processes() else { return 0 };
    let (dev, ino) = file;
    let dev = (libc::major(dev) as i32, libc::minor(dev) as i32);
    all.flatten()
        .filter(|p| p.maps().is_ok_and(|maps| maps.iter().any(|m| m.dev == dev && m.inode == ino)))
        .count()
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
    /// Whether `pid` is traced through pid-scoped links of its own (not
    /// host-wide or dormant ones).
    pub fn has_own_links(&self, pid: u32) -> bool {
        self.procs.get(&pid).is_some_and(|p| !p.links.is_empty())
    }

    pub fn serial(&self, pid: u32) -> Option<u64> {
        self.procs.get(&pid).filter(|p| p.running).map(|p| p.serial)
    }

    fn new_serial(&mut self) -> u64 {
        self.next_serial += 1;
        self.next_serial
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
            file: target.file,
            started: target.started,
            links,
            running: true,
            calls: 0,
        };
        self.procs.insert(target.pid, entry);
        serial
    }

    /// How the running process `pid` is traced.
    pub fn mechanism_of(&self, pid: u32) -> Option<crate::python::Mechanism> {
        self.procs.get(&pid).filter(|p| p.running).map(|p| p.info.mechanism)
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

    /// Records the host-wide probes of the binary of `target`.
    pub fn set_host_wide(&mut self, target: &Target, link: UprobeLink) {
        self.note_binary(target);
        self.binaries.get_mut(&target.file).expect("noted").host_links = vec![link];
    }

    /// Whether the binary `file` has host-wide probes.
    pub fn is_host_wide(&self, file: FileId) -> bool {
        self.binaries.get(&file).is_some_and(|b| !b.host_links.is_empty())
    }

    fn note_binary(&mut self, target: &Target) {
        self.binaries.entry(target.file).or_insert_with(|| BinaryEntry {
            path: printable_path(&target.binary),
            version: target.version.map(|v| v.to_string()),
            host_links: Vec::new(),
        });
    }

    /// Marks the process ended (it exited or exec'd something else) and
    /// hands back its probes' links, for the caller to drop (which detaches
    /// them) where blocking is fine.
    #[must_use = "dropping the links detaches the probes; drop them off the event loop"]
    pub fn end_and_take_links(&mut self, pid: u32) -> Vec<UprobeLink> {
        match self.procs.get_mut(&pid) {
            Some(p) => {
                p.running = false;
                std::mem::take(&mut p.links)
            }
            None => Vec::new(),
        }
    }

    /// Counts `n` completed calls of `pid` (if it is tracked).
    pub fn count_calls(&mut self, pid: u32, n: u64) {
        if let Some(p) = self.procs.get_mut(&pid) {
            p.calls += n;
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
                mechanism: p.info.mechanism,
                agent_tracing: false,
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
        mechanism: target.mechanism,
    }
}
