//! The agent's report path in the kernel, as pftraced drives it: the
//! program `pftrace_agent_uprobe` (a uprobe on the agent's probe function,
//! attached once for every process mapping the agent's file), the TRACKED
//! set of processes allowed to report, and the ring buffer the records
//! arrive on.
//!
//! The attachment is host-wide and flat in the number of processes: a
//! process that is not reporting never reaches it (the probe function is
//! only called for traced functions), and one that is not in TRACKED is
//! dropped first thing (counted in AGENT_FOREIGN).

use std::{os::fd::AsRawFd as _, path::Path};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::{UProbe, uprobe::UProbeScope},
};
use pftrace::{bpf::BPF_OBJECT, kernel::task_layout::TaskOffsets};
use pftrace_common::{AgentEvent, agent, counter, kind, task_layout};

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("loading pftrace's eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program { name: &'static str, source: aya::programs::ProgramError },
    #[error("eBPF map {name}: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    #[error("the eBPF object has no {0}; was it built from this source tree?")]
    Missing(&'static str),
    #[error(transparent)]
    Symbol(#[from] pftrace::agent::SymbolError),
    #[error("the kernel's BTF: {0}")]
    Btf(String),
    #[error("freezing the CPU_SLOTS map: {0}")]
    Freeze(std::io::Error),
    #[error(transparent)]
    PidNamespace(#[from] pftrace::kernel::pidns::PidNsError),
}

const UPROBE_PROGRAM: &str = "pftrace_agent_uprobe";

/// The loaded agent programs and their maps.
pub struct AgentKernel {
    pub(crate) ebpf: Ebpf,
    uprobe_loaded: bool,
    /// What agents put in their report syscall (task_layout::AGENT_TOKEN).
    pub token: u64,
}

/// Options for loading (benchmarks vary them).
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    pub ring_bytes: u32,
    /// Copy name and file strings into records (false only to measure their cost).
    pub strings: bool,
    /// Parts of each report left out (`task_layout::bench_skip`; 0 but in benchmarks).
    pub skip: u32,
    /// Take one-record calls (`agent::ONE_CALL`; prototype, agent-bench only).
    pub one_call: bool,
    /// Take drain reports of per-thread call buffers (`agent::BATCH`;
    /// prototype, agent-bench and its test only; see crate::batch).
    pub batch: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { ring_bytes: 1 << 24, strings: true, skip: 0, one_call: false, batch: false }
    }
}

impl AgentKernel {
    /// Loads pftrace's eBPF object with the kernel's task layout (per-call
    /// CPU time and RSS), without attaching anything yet.
    pub fn load(opts: LoadOptions) -> Result<Self, KernelError> {
        let layout = TaskOffsets::discover().ok();
        let globals = layout.as_ref().map(TaskOffsets::globals);
        let mut loader = EbpfLoader::new();
        loader.map_max_entries("EVENTS", opts.ring_bytes);
        for (name, value) in globals.iter().flatten() {
            loader.override_global(name, value, true);
        }
        let strings = u32::from(opts.strings);
        loader.override_global(task_layout::AGENT_STRINGS, &strings, true);
        loader.override_global(task_layout::AGENT_BENCH_SKIP, &opts.skip, true);
        let one_call = u32::from(opts.one_call);
        loader.override_global(task_layout::AGENT_ONE_CALL, &one_call, true);
        let batch = u32::from(opts.batch);
        loader.override_global(task_layout::AGENT_BATCH, &batch, true);
        let token = pftrace::bpf::new_agent_token();
        loader.override_global(task_layout::AGENT_TOKEN, &token, true);
        let wakeup = opts.ring_bytes / 4;
        loader.override_global(task_layout::WAKEUP_BYTES, &wakeup, true);
        // Pids as this process's PID namespace numbers them (a container's).
        let pidns = pftrace::kernel::pidns::globals()?;
        for (name, value) in &pidns {
            loader.override_global(name, value, true);
        }
        let ebpf = loader.load(BPF_OBJECT)?;
        Ok(Self { ebpf, uprobe_loaded: false, token })
    }

    /// Puts the uprobe on the agent's probe function in `agent_so` (every
    /// process mapping that file; only TRACKED ones get through).
    /// `symbol` is normally [`agent::PROBE_SYMBOL`].
    pub fn attach_uprobe(&mut self, agent_so: &Path, symbol: &str) -> Result<(), KernelError> {
        self.attach_uprobe_extra(agent_so, symbol)
    }

    /// A program that returns at once on the probe function (benchmarks:
    /// the cost of the uprobe itself).
    pub fn attach_floor(&mut self, agent_so: &Path, symbol: &str) -> Result<(), KernelError> {
        const FLOOR: &str = "pftrace_noop";
        let offset = symbol_offset(agent_so, symbol)?;
        let prog: &mut UProbe = self
            .ebpf
            .program_mut(FLOOR)
            .ok_or(KernelError::Missing(FLOOR))?
            .try_into()
            .map_err(|source| KernelError::Program { name: FLOOR, source })?;
        prog.load().map_err(|source| KernelError::Program { name: FLOOR, source })?;
        let location = aya::programs::uprobe::UProbeAttachLocation::AbsoluteOffset(offset);
        prog.attach(location, agent_so, UProbeScope::AllProcesses)
            .map_err(|source| KernelError::Program { name: FLOOR, source })?;
        Ok(())
    }

    /// The same program on another symbol too (benchmarks: the 1-byte-nop probe).
    pub fn attach_uprobe_extra(&mut self, agent_so: &Path, symbol: &str) -> Result<(), KernelError> {
        let offset = symbol_offset(agent_so, symbol)?;
        let prog: &mut UProbe = self
            .ebpf
            .program_mut(UPROBE_PROGRAM)
            .ok_or(KernelError::Missing(UPROBE_PROGRAM))?
            .try_into()
            .map_err(|source| KernelError::Program { name: UPROBE_PROGRAM, source })?;
        if !self.uprobe_loaded {
            prog.load().map_err(|source| KernelError::Program { name: UPROBE_PROGRAM, source })?;
            self.uprobe_loaded = true;
        }
        let location = aya::programs::uprobe::UProbeAttachLocation::AbsoluteOffset(offset);
        prog.attach(location, agent_so, UProbeScope::AllProcesses)
            .map_err(|source| KernelError::Program { name: UPROBE_PROGRAM, source })?;
        Ok(())
    }

    /// Attaches the syscall road (`pftrace_agent_syscall` on the sys_enter
    /// raw tracepoint), or with `floor` a program there that returns at once.
    pub fn attach_syscall(&mut self, floor: bool) -> Result<(), KernelError> {
        let name = if floor { "pftrace_agent_syscall_floor" } else { pftrace::bpf::AGENT_SYSCALL_PROGRAM };
        let prog: &mut aya::programs::RawTracePoint = self
            .ebpf
            .program_mut(name)
            .ok_or(KernelError::Missing(name))?
            .try_into()
            .map_err(|source| KernelError::Program { name, source })?;
        prog.load().map_err(|source| KernelError::Program { name, source })?;
        prog.attach("sys_enter").map_err(|source| KernelError::Program { name, source })?;
        Ok(())
    }

    /// Attaches the syscall road as a BTF raw tracepoint
    /// (`pftrace_agent_syscall_btf`, tp_btf on sys_enter): benchmarks.
    pub fn attach_syscall_btf(&mut self) -> Result<(), KernelError> {
        self.attach_btf_tracepoint("pftrace_agent_syscall_btf", "sys_enter")
    }

    /// Loads program `name` as a BTF raw tracepoint (tp_btf) on `point` and attaches it.
    pub(crate) fn attach_btf_tracepoint(
        &mut self,
        name: &'static str,
        point: &str,
    ) -> Result<(), KernelError> {
        let btf = aya::Btf::from_sys_fs().map_err(|e| KernelError::Btf(e.to_string()))?;
        let prog: &mut aya::programs::BtfTracePoint = self
            .ebpf
            .program_mut(name)
            .ok_or(KernelError::Missing(name))?
            .try_into()
            .map_err(|source| KernelError::Program { name, source })?;
        prog.load(point, &btf).map_err(|source| KernelError::Program { name, source })?;
        prog.attach().map_err(|source| KernelError::Program { name, source })?;
        Ok(())
    }

    /// Attaches the fork program: a child of a TRACKED process is tracked
    /// from its first instruction (forked children keep the parent's agent).
    pub fn follow_forks(&mut self) -> Result<(), KernelError> {
        self.attach_raw_tracepoint("pftrace_fork", "sched_process_fork")
    }

    /// Loads program `name` as a raw tracepoint on `point` and attaches it.
    pub(crate) fn attach_raw_tracepoint(
        &mut self,
        name: &'static str,
        point: &str,
    ) -> Result<(), KernelError> {
        let prog: &mut aya::programs::RawTracePoint = self
            .ebpf
            .program_mut(name)
            .ok_or(KernelError::Missing(name))?
            .try_into()
            .map_err(|source| KernelError::Program { name, source })?;
        prog.load().map_err(|source| KernelError::Program { name, source })?;
        prog.attach(point).map_err(|source| KernelError::Program { name, source })?;
        Ok(())
    }

    /// Allows `pid` (and, through the fork program when it runs, its
    /// children) to report.
    pub fn track(&mut self, pid: u32) -> Result<(), KernelError> {
        self.tracked()?.insert(pid, 1, 0).map_err(|source| KernelError::Map { name: "TRACKED", source })
    }

    pub fn untrack(&mut self, pid: u32) -> Result<(), KernelError> {
        // Gone already is fine (the exit program removes exiting processes).
        self.remove_if_present("TRACKED", "map TRACKED", pid)
    }

    fn tracked(&mut self) -> Result<BpfHashMap<&mut MapData, u32, u32>, KernelError> {
        self.u32_map("TRACKED", "map TRACKED")
    }

    /// The hash map `name` of u32 keys and values (`missing`: what the
    /// error names when the object has none).
    fn u32_map(
        &mut self,
        name: &'static str,
        missing: &'static str,
    ) -> Result<BpfHashMap<&mut MapData, u32, u32>, KernelError> {
        let map = self.ebpf.map_mut(name).ok_or(KernelError::Missing(missing))?;
        BpfHashMap::try_from(map).map_err(|source| KernelError::Map { name, source })
    }

    /// Removes `key` from the hash map `name`; a key not there is no error.
    fn remove_if_present(
        &mut self,
        name: &'static str,
        missing: &'static str,
        key: u32,
    ) -> Result<(), KernelError> {
        match self.u32_map(name, missing)?.remove(&key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(())
            }
            Err(source) => Err(KernelError::Map { name, source }),
        }
    }

    /// A counter summed over CPUs (`pftrace_common::counter`).
    pub fn counter(&self, index: u32) -> Result<u64, KernelError> {
        let map = self.ebpf.map("COUNTERS").ok_or(KernelError::Missing("map COUNTERS"))?;
        let arr: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map).map_err(|source| KernelError::Map { name: "COUNTERS", source })?;
        let v = arr.get(&index, 0).map_err(|source| KernelError::Map { name: "COUNTERS", source })?;
        Ok(v.iter().sum())
    }

    /// The ring buffer (once).
    pub fn take_ring(&mut self) -> Result<Ring, KernelError> {
        let map = self.ebpf.take_map("EVENTS").ok_or(KernelError::Missing("map EVENTS"))?;
        Ok(Ring {
            ring: RingBuf::try_from(map).map_err(|source| KernelError::Map { name: "EVENTS", source })?,
            open: Default::default(),
            names: Default::default(),
        })
    }
}

/// Prototype (issue 12): per-thread CPU-time slots kept by a sched_switch
/// program, read by the agent from a read-only mapping.
impl AgentKernel {
    /// Attaches `pftrace_cpu_slot` (tp_btf on sched_switch): from now on every
    /// context switch of the host looks the thread switched in up in SLOT_OF.
    pub fn attach_cpu_slots(&mut self) -> Result<(), KernelError> {
        self.freeze_slots()?;
        self.attach_btf_tracepoint("pftrace_cpu_slot", "sched_switch")
    }

    /// Freezes CPU_SLOTS (BPF_MAP_FREEZE): from now on user space (the
    /// traced process included, whatever fd it holds) can neither map it
    /// writable (EPERM) nor update it; programs still write it.
    fn freeze_slots(&self) -> Result<(), KernelError> {
        const BPF_MAP_FREEZE: libc::c_long = 22;
        let fd = self.slots_fd()?.as_raw_fd();
        let attr: [u32; 2] = [fd as u32, 0];
        // SAFETY: the attr is the map_fd the command reads.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_FREEZE, attr.as_ptr(), 8u32) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            // Frozen already (attached before in this object).
            if e.raw_os_error() != Some(libc::EBUSY) {
                return Err(KernelError::Freeze(e));
            }
        }
        Ok(())
    }

    /// Gives kernel thread `tid` slot `slot` (its figures appear at its next switch-in).
    pub fn register_slot(&mut self, tid: u32, slot: u32) -> Result<(), KernelError> {
        self.slot_of()?.insert(tid, slot, 0).map_err(|source| KernelError::Map { name: "SLOT_OF", source })
    }

    fn slot_of(&mut self) -> Result<BpfHashMap<&mut MapData, u32, u32>, KernelError> {
        self.u32_map("SLOT_OF", "map SLOT_OF")
    }

    pub fn unregister_slot(&mut self, tid: u32) -> Result<(), KernelError> {
        self.remove_if_present("SLOT_OF", "map SLOT_OF", tid)
    }

    /// The CPU_SLOTS map's fd (frozen once the program is attached).
    pub fn slots_fd(&self) -> Result<std::os::fd::BorrowedFd<'_>, KernelError> {
        use std::os::fd::AsFd as _;
        let map = self.ebpf.map("CPU_SLOTS").ok_or(KernelError::Missing("map CPU_SLOTS"))?;
        match map {
            aya::maps::Map::Array(data) => Ok(data.fd().as_fd()),
            _ => Err(KernelError::Missing("CPU_SLOTS as an array")),
        }
    }

    /// (run_cnt, run_time_ns) of the sched_switch program (bpf_stats).
    pub fn cpu_slot_stats(&self) -> Option<(u64, u64)> {
        use std::os::fd::AsFd as _;
        let p: &aya::programs::BtfTracePoint = self.ebpf.program("pftrace_cpu_slot")?.try_into().ok()?;
        fd_stats(p.fd().ok()?.as_fd().as_raw_fd())
    }
}

pub(crate) fn fd_stats(fd: i32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    let field =
        |k: &str| text.lines().find_map(|l| l.strip_prefix(k)).and_then(|v| v.trim().parse::<u64>().ok());
    Some((field("run_cnt:")?, field("run_time_ns:")?))
}

/// The counters the agent path adds.
pub fn agent_counters(k: &AgentKernel) -> Result<[u64; 3], KernelError> {
    Ok([
        k.counter(counter::AGENT_REPORTS)?,
        k.counter(counter::AGENT_FOREIGN)?,
        k.counter(counter::AGENT_BAD)?,
    ])
}

/// Records read off the ring buffer.
pub struct Ring {
    ring: RingBuf<MapData>,
    /// Per (pid, tid): open entries (code id), innermost last, to tell
    /// which returns close the innermost entry.
    open: std::collections::HashMap<(u32, u32), Vec<u64>>,
    /// Per pid: code id -> (name, file), from the records that carried
    /// them (a code object's first report of a session), as pftraced keeps them.
    names: std::collections::HashMap<u32, std::collections::HashMap<u64, (String, String)>>,
}

/// One agent record, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRecord {
    pub ts_ns: u64,
    pub pid: u32,
    pub tid: u32,
    pub event: u8,
    pub entry: bool,
    pub line: i32,
    /// From the record, or from an earlier record of the same code id
    /// (empty when none carried it).
    pub name: String,
    pub file: String,
    pub thread_cpu_ns: u64,
    pub rss_pages: u64,
    /// The code object's id in the process.
    pub code: u64,
    /// A return that closes the innermost entry its thread reported.
    pub named_by_entry: bool,
    /// The record carried the strings (a named record, common or long).
    pub with_strings: bool,
}

impl Ring {
    /// Drains what is there; only agent records.
    pub fn drain(&mut self, out: &mut Vec<AgentRecord>) {
        use pftrace_common::{AgentLongNamedEvent, AgentNamedEvent, agent::flag};
        while let Some(item) = self.ring.next() {
            if item.len() < size_of::<AgentEvent>() || item[pftrace_common::KIND_OFFSET] != kind::AGENT {
                continue;
            }
            // SAFETY: length checked; AgentEvent is plain data.
            let ev: AgentEvent = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const AgentEvent) };
            let text = |b: &[u8]| {
                String::from_utf8_lossy(&b[..b.iter().position(|&c| c == 0).unwrap_or(b.len())]).into_owned()
            };
            let names = self.names.entry(ev.pid).or_default();
            if ev.flags & flag::SESSION != 0 {
                names.clear();
            }
            // The long record's file name goes on past the common one's.
            let (size, file_len) = if ev.flags & flag::LONG != 0 {
                (size_of::<AgentLongNamedEvent>(), pftrace_common::LONG_FILE_LEN)
            } else {
                (size_of::<AgentNamedEvent>(), pftrace_common::FILE_LEN)
            };
            let with_strings = ev.flags & flag::STRINGS != 0 && item.len() >= size;
            let (name, file) = if with_strings {
                let (name_at, file_at) = (
                    std::mem::offset_of!(AgentNamedEvent, name),
                    std::mem::offset_of!(AgentNamedEvent, file),
                );
                let nf = (
                    text(&item[name_at..name_at + pftrace_common::NAME_LEN]),
                    text(&item[file_at..file_at + file_len]),
                );
                names.insert(ev.code, nf.clone());
                nf
            } else {
                names.get(&ev.code).cloned().unwrap_or_default()
            };
            let entry = agent::is_entry(ev.event);
            let stack = self.open.entry((ev.pid, ev.tid)).or_default();
            let code = ev.code;
            let mut named_by_entry = false;
            if entry {
                stack.push(code);
            } else if let Some(at) = stack.iter().rposition(|c| *c == code) {
                named_by_entry = at + 1 == stack.len();
                stack.truncate(at);
            }
            out.push(AgentRecord {
                ts_ns: ev.ts_ns,
                pid: ev.pid,
                tid: ev.tid,
                event: ev.event,
                entry,
                line: ev.lineno,
                name,
                file,
                thread_cpu_ns: ev.thread_cpu_ns,
                rss_pages: ev.rss_pages,
                code,
                named_by_entry,
                with_strings,
            });
        }
    }

    /// Hands every record there is, as bytes, to `f` (prototype measurements).
    pub fn drain_raw(&mut self, mut f: impl FnMut(&[u8])) {
        while let Some(item) = self.ring.next() {
            f(&item);
        }
    }

    /// Drains what is there, counting the agent records of process `pid`
    /// (benchmarks: no decoding); a batch (prototype) counts its calls.
    pub fn count_for(&mut self, pid: u32) -> u64 {
        let mut n = 0;
        while let Some(item) = self.ring.next() {
            if item.len() >= size_of::<AgentEvent>()
                && item[pftrace_common::KIND_OFFSET] == kind::AGENT
                && u32::from_ne_bytes([item[8], item[9], item[10], item[11]]) == pid
            {
                n += crate::batch::events_in(&item).unwrap_or(1);
            }
        }
        n
    }

    pub fn fd(&self) -> i32 {
        self.ring.as_raw_fd()
    }
}

impl AgentKernel {
    /// (run_cnt, run_time_ns) of the agent program as the kernel counts them
    /// (only while `kernel.bpf_stats_enabled` is 1), from the program fd's fdinfo.
    pub fn program_stats(&self) -> Option<(u64, u64)> {
        use std::os::fd::AsFd as _;
        let fd = match <&UProbe>::try_from(self.ebpf.program(UPROBE_PROGRAM)?).ok()?.fd() {
            Ok(fd) => fd.as_fd().as_raw_fd(),
            Err(_) => {
                let p: &aya::programs::RawTracePoint =
                    self.ebpf.program("pftrace_agent_syscall")?.try_into().ok()?;
                match p.fd() {
                    Ok(fd) => fd.as_fd().as_raw_fd(),
                    Err(_) => {
                        let p: &aya::programs::BtfTracePoint =
                            self.ebpf.program("pftrace_agent_syscall_btf")?.try_into().ok()?;
                        p.fd().ok()?.as_fd().as_raw_fd()
                    }
                }
            }
        };
        let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
        let field =
            |k: &str| text.lines().find_map(|l| l.strip_prefix(k)).and_then(|v| v.trim().parse::<u64>().ok());
        Some((field("run_cnt:")?, field("run_time_ns:")?))
    }
}

/// File offset of an exported function in an ELF shared object.
pub fn symbol_offset(path: &Path, symbol: &str) -> Result<u64, KernelError> {
    Ok(pftrace::agent::symbol_offset(path, symbol)?)
}
