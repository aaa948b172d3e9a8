//! Loads pftrace's eBPF object (built by build.rs, embedded in the binary) and
//! owns its maps: the traced-name set, the per-site argument specs, the
//! per-CPU counters and the ring buffer of matched calls.

use std::{collections::HashMap, os::fd::AsFd as _, path::Path, sync::Arc};

use aya::{
    Ebpf,
    maps::{Array, CgroupArray, HashMap as BpfHashMap, LpmTrie, MapData, PerCpuArray, lpm_trie::Key},
    programs::{RawTracePoint, UProbe},
};
use pftrace_common::{MAX_CGROUPS, MAX_NAMES, MAX_SPECS, NAME_LEN, UsdtSpec, counter, kind, task_layout};
use serde::{Deserialize, Serialize};

use crate::{
    kernel::task_layout::TaskOffsets,
    usdt::{ProbeSite, UsdtError},
};

use super::{
    attach::{AttachError, AttachJob, Programs},
    multi::MultiLoadError,
    perf::UprobePmu,
    points::{ProbePoint, ResolvedPoints, Scope},
};

/// The eBPF object compiled from pftrace-ebpf.
pub static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/pftrace"));

/// Errors of the kernel side.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("loading the eBPF object failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program { name: &'static str, source: aya::programs::ProgramError },
    #[error("eBPF map {name}: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    #[error("eBPF object has no {0}; was it built from this source tree?")]
    Missing(&'static str),
    #[error("function name {name:?} is {len} bytes; at most {max} bytes can be matched in the kernel")]
    NameTooLong { name: String, len: usize, max: usize },
    #[error("function name must not be empty")]
    EmptyName,
    #[error("too many traced names: at most {MAX_NAMES}")]
    TooManyNames,
    #[error("duplicating the fd of eBPF program {name}: {source}")]
    Dup { name: &'static str, source: std::io::Error },
    #[error("too many cgroup targets: at most {MAX_CGROUPS}")]
    TooManyCgroups,
    #[error("too many distinct probe sites: at most {MAX_SPECS}")]
    TooManySpecs,
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error(transparent)]
    Multi(#[from] MultiLoadError),
    #[error(transparent)]
    PidNamespace(#[from] crate::kernel::pidns::PidNsError),
    #[error(transparent)]
    Spec(#[from] UsdtError),
    #[error("per-call CPU slots: {0}")]
    CpuSlots(String),
    #[error("reading the kernel's BTF (/sys/kernel/btf/vmlinux): {0}")]
    KernelBtf(String),
    #[error("the kernel side's log ring: {0}")]
    Logger(String),
}

impl BpfError {
    /// See [`AttachError::is_semaphore_conflict`].
    pub fn is_semaphore_conflict(&self) -> bool {
        matches!(self, Self::Attach(err) if err.is_semaphore_conflict())
    }
}

/// Which kernel interface attaches the uprobes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttachMethod {
    /// One uprobe_multi link per process (kernel 6.6 and later).
    UprobeMulti,
    /// A perf event per probe site (older kernels, or `PFTRACE_UPROBE_ATTACH=perf`).
    PerfEvent,
}

/// Environment variable forcing the perf-event attach method (`perf`).
pub const ATTACH_ENV: &str = "PFTRACE_UPROBE_ATTACH";

/// The program serving both probes through uprobe_multi links.
pub(super) const USDT_PROGRAM: &str = "pftrace_usdt";
/// The perf-event programs, one per probe.
const ENTRY_PROGRAM: &str = "pftrace_entry";
const RETURN_PROGRAM: &str = "pftrace_return";
/// A program that returns at once (benchmarks: the cost of the uprobe itself).
pub(super) const FLOOR_PROGRAM: &str = "pftrace_noop";

/// Totals of the kernel's per-CPU counters.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counters {
    pub entry_seen: u64,
    pub return_seen: u64,
    pub entry_matched: u64,
    pub return_matched: u64,
    /// Matched hits dropped because the ring buffer was full.
    pub lost: u64,
    /// Hits whose arguments could not be read from the traced process.
    pub read_errors: u64,
    /// New processes in scope reported by the exec tracepoint.
    pub execs: u64,
    /// Exec reports dropped because the ring buffer was full.
    pub exec_lost: u64,
    /// New processes forked by traced ones.
    #[serde(default)]
    pub forks: u64,
    /// Fork reports dropped because the ring buffer was full.
    #[serde(default)]
    pub fork_lost: u64,
    /// Probe hits whose name was decided by the kernel's per-pointer verdict cache.
    #[serde(default)]
    pub verdict_hits: u64,
    /// Probe hits of processes outside the scope, dropped first thing
    /// (host-wide `--binary` probes fire in every process running the binary).
    #[serde(default)]
    pub out_of_scope: u64,
    /// Exit reports dropped because the ring buffer was full.
    #[serde(default)]
    pub exit_lost: u64,
    /// Matched entries that only created a generator or coroutine (CPython
    /// 3.15 fires the entry probe then, and no return): not sent, not in
    /// `entry_matched`.
    #[serde(default)]
    pub generator_creations: u64,
    /// Matched returns of CPython 3.15's `__init__` shim frame (it has no
    /// entry): not sent, not in `return_matched`.
    #[serde(default)]
    pub shim_returns: u64,
    /// Matched hits at 3.15 sites where the interpreter frame was not found:
    /// sent as the probe gave them (a generator creation among them would
    /// open a call that never returns; line -1 stays -1).
    #[serde(default)]
    pub frame_unknown: u64,
    /// Matched hits whose file name needed the long record (over 191 bytes).
    #[serde(default)]
    pub long_files: u64,
    /// Call ends reported by in-process agents and accepted (an entry or a
    /// return, by its own report or in a batch).
    #[serde(default)]
    pub agent_reports: u64,
    /// Agent probe hits from processes pftraced did not accept, dropped first thing.
    #[serde(default)]
    pub agent_foreign: u64,
    /// Agent reports with an event number the kernel does not know, dropped.
    #[serde(default)]
    pub agent_bad: u64,
    /// Agent calls whose code object's name never reached pftraced (its
    /// first record lost, or a process not telling it): kept, named
    /// `<unknown: name not received>`. Counted in user space (agent/records.rs).
    #[serde(default)]
    pub agent_unnamed: u64,
    /// Records whose CPU figure is the scheduler's last charge (a tick
    /// stale), not the thread's CPU slot: threads older than the attachment
    /// not switched out since, or no free slot. Their calls' `cpu_ns` is
    /// exact only to a tick.
    #[serde(default)]
    pub cpu_coarse: u64,
    /// Threads' attempts to take a CPU slot that found none free (of
    /// pftrace_common::MAX_CPU_SLOTS).
    #[serde(default)]
    pub cpu_slots_full: u64,
    /// Threads' attempts to take a CPU slot while their process's threads
    /// held its share (`limits.cpu_slots_per_process`).
    #[serde(default)]
    pub cpu_slots_process_full: u64,
    /// CPU slots handed to threads and given back so far: the difference
    /// is held now (0 once every traced thread has exited).
    #[serde(default)]
    pub cpu_slots_taken: u64,
    #[serde(default)]
    pub cpu_slots_returned: u64,
    /// Processes given a tally of slots held, and those forgotten at their
    /// last thread's exit: the difference is tallied now.
    #[serde(default)]
    pub cpu_slot_processes: u64,
    #[serde(default)]
    pub cpu_slot_processes_gone: u64,
    /// Return hits dropped without reading their name: each closed an
    /// entry the kernel saw on its thread and whose name did not match
    /// (CPython 3.6-3.10; pftrace-ebpf/src/depth.rs). In `return_seen`.
    #[serde(default)]
    pub returns_skipped: u64,
    /// Return hits sent without reading their name: each closed an entry
    /// the kernel saw on its thread match and sent, and is paired with it
    /// by the name and file arguments' addresses (CPython 3.6-3.10;
    /// depth.rs). In `return_seen` and `return_matched`.
    #[serde(default)]
    pub returns_known: u64,
    /// Return hits whose name address was not the one the thread's window
    /// held for its innermost level: a switch between Python stacks the
    /// probes do not see (greenlet, gevent, eventlet), or the window's ring
    /// taken by a thread sharing its row. Read, as any return, and the
    /// thread's window started over (depth.rs). In `return_seen`.
    #[serde(default)]
    pub window_mismatches: u64,
    /// Entry hits that took a depth slot from another thread (tids equal
    /// mod pftrace_common::MAX_THREAD_DEPTHS): its returns are then read.
    #[serde(default)]
    pub thread_depths_full: u64,
    /// What met pftraced's memory bounds (counted in user space).
    #[serde(default)]
    pub bounds: crate::protocol::BoundCounts,
    /// The batched agent road's counters (all 0 when it is off).
    #[serde(default)]
    pub batch: BatchCounters,
}

/// The batched agent road (pftrace-agent/README.md "Batched road in
/// pftraced"): events the kernel drained from agents' per-thread buffers
/// (or pftraced read itself at its stop), and every way one could be missed.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct BatchCounters {
    /// Batches put on the ring.
    pub drains: u64,
    /// Events (an entry or a return each) put on the ring in batches.
    pub events: u64,
    /// Batches the ring had no room for (records stay in the buffer).
    pub lost: u64,
    /// Records the agent overwrote before the kernel took them: lost calls.
    pub overrun: u64,
    /// Drains whose read of the agent's memory failed (records stay).
    pub unread: u64,
    /// Threads that exited or exec'd with records unread: lost, number unknown.
    pub exit_unread: u64,
    /// Drain reports of threads the kernel had no entry for: their buffered records skipped.
    pub unknown: u64,
    /// Events pftraced read itself from a thread's buffer when it stopped
    /// tracing (the thread had not switched out within the grace period).
    #[serde(default)]
    pub by_daemon: u64,
    /// Threads whose buffer held events pftraced could neither see drained
    /// nor read itself when it stopped tracing: lost, number unknown.
    #[serde(default)]
    pub stop_unread: u64,
}

impl BatchCounters {
    /// Says what the batched road lost or could not read, if anything.
    pub fn loss_note(&self) -> Option<String> {
        (self.lost + self.overrun + self.unread + self.exit_unread + self.unknown + self.stop_unread > 0).then(|| {
            format!(
                "BATCHED AGENT EVENTS MISSED: {} batches found the ring full, {} events overwritten before a \
                 drain, {} drains could not read the agent's memory, {} threads ended with records unread, \
                 {} drain reports of unknown threads (their records skipped), {} threads' buffers unread at \
                 pftraced's stop",
                self.lost, self.overrun, self.unread, self.exit_unread, self.unknown, self.stop_unread
            )
        })
    }
}

impl Counters {
    /// Reports of processes starting (exec, fork) or exiting that the ring buffer had no room for.
    pub fn process_reports_lost(&self) -> u64 {
        self.exec_lost + self.fork_lost + self.exit_lost
    }

    /// Says how many records carry a CPU figure exact only to a tick, if any.
    pub fn cpu_coarse_note(&self) -> Option<String> {
        (self.cpu_coarse + self.cpu_slots_full + self.cpu_slots_process_full > 0).then(|| {
            format!(
                "COARSE CPU (README, \"Per-call figures\"): {} records took the scheduler's last charge \
                 (exact to a tick only: threads older than the attachment not switched out since, or no free \
                 slot); {} slot claims found none of {} free, {} found their process's share \
                 (limits.cpu_slots_per_process) taken",
                self.cpu_coarse,
                self.cpu_slots_full,
                pftrace_common::MAX_CPU_SLOTS,
                self.cpu_slots_process_full
            )
        })
    }

    /// CPU slots held now, and by how many processes (the per-CPU counters
    /// are summed one CPU after another: a claim in flight may show as a
    /// slot taken and not yet given back, never as a negative figure).
    pub fn cpu_slots_held(&self) -> (u64, u64) {
        (
            self.cpu_slots_taken.saturating_sub(self.cpu_slots_returned),
            self.cpu_slot_processes.saturating_sub(self.cpu_slot_processes_gone),
        )
    }
}

/// The programs attached to CPython's probe sites: pftraced's, and the
/// floor program attached the same way (benchmarks).
pub struct UsdtPrograms {
    pub(super) usdt: Arc<Programs>,
    pub(super) floor: Arc<Programs>,
}

/// The loaded eBPF programs and maps.
pub struct KernelProbes {
    /// Attach the floor program instead of the real ones (benchmarks).
    pub floor: bool,
    ebpf: Ebpf,
    /// How uprobes are attached.
    method: AttachMethod,
    /// The USDT programs and the floor program, once verified ([`Self::wait_programs`]).
    programs: Option<UsdtPrograms>,
    /// Their load, while the kernel verifies them on a thread of its own.
    verifying: Option<super::start::Verifying>,
    specs: HashMap<UsdtSpec, u32>,
    /// The agent's syscall road (sys_enter raw tracepoint) while attached.
    agent_syscall: Option<AgentSyscallLink>,
    /// What this object's agents put in their report syscall (task_layout::AGENT_TOKEN).
    agent_token: u64,
    /// The batched agent road is loaded ([`batch_wanted`]); its drain
    /// programs are attached by [`Self::attach_batch`].
    pub batch: bool,
    /// `limits.cpu_slots_per_process`, and whether the kernel hands slots
    /// out and numbers threads as pftraced does (its PID namespace is the
    /// host's: the slot maps are keyed by kernel tids).
    slots_per_process: u32,
    slot_alloc: bool,
    /// The kernel's BTF for the BTF tracepoint programs, parsed at the
    /// first one's load and kept until [`Self::release_btf`] ([`kernel_btf`]).
    btf: Option<aya::Btf>,
    /// Slots [`Self::claim_cpu_slot_stopped`] took: added to the kernel's
    /// CPU_SLOTS_TAKEN and CPU_SLOT_PROCESSES, which count only its own claims.
    slots_claimed_here: u64,
    /// USDT attachments made so far: the next one's number goes into its
    /// cookies (pftrace_common::COOKIE_ATTACHMENT_SHIFT).
    attachments: u32,
}

/// Environment switch of pftraced for the batched agent road
/// (pftrace-agent/README.md "Batched road in pftraced"): on unless `0`.
pub const BATCH_ENV: &str = "PFTRACE_AGENT_BATCH";

/// Measuring only: `PFTRACE_USDT_BENCH=STOP[,SKIP]` stops each USDT hit
/// after a step, or leaves parts of its record out
/// (pftrace_common::task_layout::USDT_BENCH_STOP, USDT_BENCH_SKIP), to
/// say from bpf_stats what each step costs. Unset (always, but in such a
/// measurement): (0, 0), the whole program.
pub const USDT_BENCH_ENV: &str = "PFTRACE_USDT_BENCH";

fn usdt_bench() -> (u32, u32) {
    let Ok(v) = std::env::var(USDT_BENCH_ENV) else { return (0, 0) };
    let mut it = v.split(',').map(|x| x.trim().parse::<u32>().unwrap_or(0));
    let pair = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    log::warn!(
        "{USDT_BENCH_ENV}={v}: USDT hits stop at step {} and skip {:#x} (measuring only)",
        pair.0,
        pair.1
    );
    pair
}

/// Whether pftraced takes the batched agent road: unless `PFTRACE_AGENT_BATCH=0`.
pub fn batch_wanted() -> bool {
    std::env::var_os(BATCH_ENV).is_none_or(|v| v != "0")
}

impl KernelProbes {
    /// Loads and verifies the programs; `ring_bytes` sizes the ring buffer
    /// (a power of two, multiple of the page size).
    /// `layout` gives the kernel offsets for per-call CPU time and RSS; without
    /// it those figures read as 0. `scope_filter`: only processes in the
    /// tracked set are traced (host-wide probes with pid or cgroup scopes).
    /// `slots_per_process`: the most CPU slots one process's threads hold
    /// (`limits.cpu_slots_per_process`).
    pub fn load(
        loader: super::start::PendingLoader,
        ring_bytes: u32,
        layout: Option<&TaskOffsets>,
        scope_filter: bool,
        slots_per_process: u32,
    ) -> Result<Self, BpfError> {
        let mut loader = loader.loader()?;
        loader.map_max_entries("EVENTS", ring_bytes);
        let globals = layout.map(TaskOffsets::globals);
        // Batched draining: wake the reader when a quarter of the ring is used;
        // the daemon also drains on a short timer (DRAIN_INTERVAL in the daemon).
        let wakeup = ring_bytes / 4;
        loader.override_global(task_layout::WAKEUP_BYTES, &wakeup, true);
        let scope_filter = u32::from(scope_filter);
        loader.override_global(task_layout::SCOPE_FILTER, &scope_filter, true);
        let (stop, skip) = usdt_bench();
        loader.override_global(task_layout::USDT_BENCH_STOP, &stop, true);
        loader.override_global(task_layout::USDT_BENCH_SKIP, &skip, true);
        // The kernel side's words (aya-log) at the daemon's log level, fixed
        // now: the verifier drops the messages the level turns off.
        let level = kernel_log_level(log::max_level());
        loader.override_global(aya_log::LEVEL, &level, true);
        let agent_token = new_agent_token();
        loader.override_global(task_layout::AGENT_TOKEN, &agent_token, true);
        // The kernel hands per-thread CPU slots out (attach_cpu_slots); only
        // with the task offsets the sched_switch program needs.
        let slot_alloc = u32::from(layout.is_some());
        loader.override_global(task_layout::CPU_SLOT_ALLOC, &slot_alloc, true);
        loader.override_global(task_layout::CPU_SLOTS_PER_PROCESS, &slots_per_process, true);
        // The batched agent road (issue 12; pftrace-agent/README.md "Batched
        // road in pftraced"): drain reports taken, with the CPU slots it
        // needs. One-record calls (agent-bench's prototype) stay refused.
        let batch = batch_wanted() && layout.is_some();
        let batch_global = u32::from(batch);
        loader.override_global(task_layout::AGENT_BATCH, &batch_global, true);
        if let Some(globals) = &globals {
            for (name, value) in globals {
                loader.override_global(name, value, true);
            }
        }
        // Pids as pftraced's PID namespace numbers them (a container's).
        let pidns = crate::kernel::pidns::globals()?;
        for (name, value) in &pidns {
            loader.override_global(name, value, true);
        }
        let mut ebpf = loader.load(BPF_OBJECT)?;
        let method = choose_method();
        let (programs, verifying) = match method {
            AttachMethod::UprobeMulti => (None, Some(super::start::verify(&ebpf)?)),
            AttachMethod::PerfEvent => {
                let pmu = UprobePmu::discover()?;
                let entry = load_uprobe(&mut ebpf, ENTRY_PROGRAM)?;
                let ret = load_uprobe(&mut ebpf, RETURN_PROGRAM)?;
                let floor = load_uprobe(&mut ebpf, FLOOR_PROGRAM)?;
                let floor2 =
                    floor.try_clone().map_err(|source| BpfError::Dup { name: FLOOR_PROGRAM, source })?;
                let programs = UsdtPrograms {
                    usdt: Arc::new(Programs::Perf { pmu, entry, ret }),
                    floor: Arc::new(Programs::Perf { pmu, entry: floor, ret: floor2 }),
                };
                (Some(programs), None)
            }
        };
        Ok(Self {
            floor: false,
            ebpf,
            method,
            programs,
            verifying,
            specs: HashMap::new(),
            agent_syscall: None,
            btf: None,
            agent_token,
            batch,
            slots_per_process,
            slot_alloc: slot_alloc != 0
                && crate::kernel::pidns::PidNamespace::current().is_ok_and(|ns| ns.is_initial()),
            slots_claimed_here: 0,
            attachments: 0,
        })
    }

    /// How uprobes are attached on this kernel.
    pub fn attach_method(&self) -> AttachMethod {
        self.method
    }

    /// Waits for the USDT programs' verification, started by [`Self::load`]:
    /// its refusal is a start's error, said here.
    pub fn wait_programs(&mut self) -> Result<&UsdtPrograms, BpfError> {
        if let Some(thread) = self.verifying.take() {
            self.programs = Some(thread.wait()?);
        }
        self.programs.as_ref().ok_or(BpfError::Missing(USDT_PROGRAM))
    }

    /// Adds a function name to the kernel's filter.
    pub fn add_name(&mut self, name: &str) -> Result<(), BpfError> {
        let key = name_key(name)?;
        let mut names = self.names_map()?;
        names.insert(key, 1, 0).map_err(|source| match source {
            aya::maps::MapError::SyscallError(ref e) if e.io_error.raw_os_error() == Some(libc::E2BIG) => {
                BpfError::TooManyNames
            }
            source => BpfError::Map { name: "NAMES", source },
        })
    }

    /// Removes a function name from the kernel's filter (no error if absent).
    pub fn remove_name(&mut self, name: &str) -> Result<(), BpfError> {
        let key = name_key(name)?;
        let mut names = self.names_map()?;
        match names.remove(&key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(BpfError::Map { name: "NAMES", source }),
        }
    }

    fn names_map(&mut self) -> Result<BpfHashMap<&mut MapData, [u8; NAME_LEN], u32>, BpfError> {
        let map = self.ebpf.map_mut("NAMES").ok_or(BpfError::Missing("map NAMES"))?;
        BpfHashMap::try_from(map).map_err(|source| BpfError::Map { name: "NAMES", source })
    }

    /// Adds a glob prefix to the kernel's prefix trie (the empty prefix matches every name).
    pub fn add_prefix(&mut self, prefix: &str) -> Result<(), BpfError> {
        let key = prefix_key(prefix)?;
        let map = self.ebpf.map_mut("PREFIXES").ok_or(BpfError::Missing("map PREFIXES"))?;
        let mut trie: LpmTrie<&mut MapData, [u8; NAME_LEN], u32> =
            LpmTrie::try_from(map).map_err(|source| BpfError::Map { name: "PREFIXES", source })?;
        trie.insert(&key, 1, 0).map_err(|source| BpfError::Map { name: "PREFIXES", source })
    }

    /// Removes a glob prefix (no error if absent).
    pub fn remove_prefix(&mut self, prefix: &str) -> Result<(), BpfError> {
        let key = prefix_key(prefix)?;
        let map = self.ebpf.map_mut("PREFIXES").ok_or(BpfError::Missing("map PREFIXES"))?;
        let mut trie: LpmTrie<&mut MapData, [u8; NAME_LEN], u32> =
            LpmTrie::try_from(map).map_err(|source| BpfError::Map { name: "PREFIXES", source })?;
        match trie.remove(&key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(BpfError::Map { name: "PREFIXES", source }),
        }
    }

    /// Sets one of the kernel's settings (`pftrace_common::config`).
    pub fn set_config(&mut self, index: u32, value: u32) -> Result<(), BpfError> {
        let map = self.ebpf.map_mut("CONFIG").ok_or(BpfError::Missing("map CONFIG"))?;
        let mut cfg: Array<&mut MapData, u32> =
            Array::try_from(map).map_err(|source| BpfError::Map { name: "CONFIG", source })?;
        cfg.set(index, value, 0).map_err(|source| BpfError::Map { name: "CONFIG", source })
    }

    /// Puts a cgroup v2 directory (opened fd) in slot `slot` of the watched set.
    pub fn set_cgroup(&mut self, slot: u32, cgroup: std::os::fd::BorrowedFd<'_>) -> Result<(), BpfError> {
        if slot >= MAX_CGROUPS {
            return Err(BpfError::TooManyCgroups);
        }
        let map = self.ebpf.map_mut("CGROUPS").ok_or(BpfError::Missing("map CGROUPS"))?;
        let mut cgroups: CgroupArray<&mut MapData> =
            CgroupArray::try_from(map).map_err(|source| BpfError::Map { name: "CGROUPS", source })?;
        cgroups.set(slot, cgroup, 0).map_err(|source| BpfError::Map { name: "CGROUPS", source })
    }

    /// Loads and attaches the sched_process_fork tracepoint that reports new
    /// processes forked by tracked ones ([`Self::track`]). Lives as long as this object.
    pub fn attach_fork_watch(&mut self) -> Result<(), BpfError> {
        self.attach_raw_tracepoint("pftrace_fork", "sched_process_fork")
    }

    /// Loads and attaches the sched_process_exit tracepoint that forgets
    /// tracked processes when they exit (so a reused pid is not tracked).
    /// Lives as long as this object.
    pub fn attach_exit_watch(&mut self) -> Result<(), BpfError> {
        self.attach_raw_tracepoint("pftrace_exit", "sched_process_exit")
    }

    /// Attaches the sched_switch program keeping per-thread CPU slots
    /// (crate::bpf::cpuslots): from now on every context switch of the
    /// host runs it (measured: README.md, "Per-call figures"). Lives as
    /// long as this object.
    pub fn attach_cpu_slots(&mut self) -> Result<(), BpfError> {
        let btf = kernel_btf(&mut self.btf)?;
        super::cpuslots::attach(&mut self.ebpf, btf)
    }

    /// Attaches the batched road's drains (crate::bpf::cpuslots): a
    /// thread's exit, its execve and its switch-out (every context switch
    /// of the host pays a hash lookup: 50-70 ns measured, README "Batched
    /// reports"). Lives as long as this object.
    pub fn attach_batch(&mut self) -> Result<(), BpfError> {
        self.attach_raw_tracepoint("pftrace_agent_batch_exit", "sched_process_exit")?;
        let btf = kernel_btf(&mut self.btf)?;
        super::cpuslots::attach_btf(&mut self.ebpf, btf, "pftrace_agent_batch_exec", "sys_enter")?;
        super::cpuslots::attach_btf(&mut self.ebpf, btf, "pftrace_agent_batch_switch", "sched_switch")
    }

    /// Drops the parsed BTF once start-up's programs are loaded: kept, it
    /// is ~14 MiB of pftraced's resident memory for good (VmRSS after a
    /// `--pid` start 50.8 MiB against 36.1; the bench's peak RSS 50.0
    /// against 36.1, the limit 53). A later load (the agent's syscall
    /// road, only where configured) parses it again.
    pub fn release_btf(&mut self) {
        self.btf = None;
    }

    /// The batched road's registered threads: (kernel tid, buffer address, tail).
    pub fn batch_threads(&self) -> Vec<(u32, pftrace_common::BatchTail)> {
        super::batchtail::threads(&self.ebpf)
    }

    /// Takes thread `tid` away from the kernel's drains: its tail, if it had one.
    pub fn batch_take(&self, tid: u32) -> Option<pftrace_common::BatchTail> {
        super::batchtail::take(&self.ebpf, tid)
    }

    /// A CPU slot for launched process `pid` (kernel numbering), stopped at
    /// its exec with one thread ([`super::cpuslots::claim_stopped`]), so its
    /// first call's CPU is exact. Whether one was taken.
    pub fn claim_cpu_slot_stopped(&mut self, pid: u32) -> Result<bool, BpfError> {
        if !self.slot_alloc {
            return Ok(false);
        }
        let claimed = super::cpuslots::claim_stopped(&mut self.ebpf, pid, self.slots_per_process)?;
        self.slots_claimed_here += u64::from(claimed);
        Ok(claimed)
    }

    /// A new fd of the frozen CPU_SLOTS map, for an agent to map read-only.
    pub fn cpu_slots_fd(&self) -> Option<std::os::fd::OwnedFd> {
        super::cpuslots::slots_fd(&self.ebpf)
    }

    /// Totals of the batched road's per-CPU counters (BATCH_COUNTERS).
    pub fn batch_counters(&self) -> Result<BatchCounters, BpfError> {
        use pftrace_common::batch::counter as c;
        let map = self.ebpf.map("BATCH_COUNTERS").ok_or(BpfError::Missing("map BATCH_COUNTERS"))?;
        let counters: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map).map_err(|source| BpfError::Map { name: "BATCH_COUNTERS", source })?;
        let total = |index: u32| -> Result<u64, BpfError> {
            let values =
                counters.get(&index, 0).map_err(|source| BpfError::Map { name: "BATCH_COUNTERS", source })?;
            Ok(values.iter().sum())
        };
        Ok(BatchCounters {
            drains: total(c::DRAINS)?,
            events: total(c::RECORDS)?,
            lost: total(c::LOST)?,
            overrun: total(c::OVERRUN)?,
            unread: total(c::UNREAD)?,
            exit_unread: total(c::EXIT_UNREAD)?,
            unknown: total(c::UNKNOWN)?,
            by_daemon: 0,
            stop_unread: 0,
        })
    }

    /// (run_cnt, run_time_ns) of the sched_switch program (bpf_stats).
    pub fn cpu_slot_stats(&self) -> Option<(u64, u64)> {
        super::cpuslots::stats(&self.ebpf)
    }

    /// Loads and attaches the sched_process_exec tracepoint that reports new
    /// processes in scope; what it reports is set with `config::EXEC_MODE`.
    /// The attachment lives as long as this object.
    pub fn attach_exec_watch(&mut self) -> Result<(), BpfError> {
        self.attach_raw_tracepoint("pftrace_exec", "sched_process_exec")
    }

    fn attach_raw_tracepoint(&mut self, name: &'static str, tracepoint: &str) -> Result<(), BpfError> {
        let prog: &mut RawTracePoint = program(&mut self.ebpf, name)?;
        prog.load().map_err(|source| BpfError::Program { name, source })?;
        prog.attach(tracepoint).map_err(|source| BpfError::Program { name, source })?;
        Ok(())
    }

    /// Reports forks of process `pid` from now on.
    pub fn track(&mut self, pid: u32) -> Result<(), BpfError> {
        self.tracked_map()?.insert(pid, 1, 0).map_err(|source| BpfError::Map { name: "TRACKED", source })
    }

    fn tracked_map(&mut self) -> Result<BpfHashMap<&mut MapData, u32, u32>, BpfError> {
        let map = self.ebpf.map_mut("TRACKED").ok_or(BpfError::Missing("map TRACKED"))?;
        BpfHashMap::try_from(map).map_err(|source| BpfError::Map { name: "TRACKED", source })
    }

    /// The job attaching the USDT programs (the floor program with
    /// [`Self::floor`]) to CPython's probe `sites` of the file at `path`, in
    /// the processes of `scope`, to run later on any thread
    /// ([`AttachJob::run`]). The sites' argument specs are stored in the
    /// kernel now; each point's cookie is its spec id, with
    /// [`pftrace_common::COOKIE_RETURN`] at `function__return` sites, and
    /// the attachment's number above [`pftrace_common::COOKIE_ATTACHMENT_SHIFT`]
    /// (a thread's depth of seen calls counts within one attachment).
    ///
    /// Return sites come first, whatever the order of `sites`: the kernel
    /// makes a link's probes live one site after another (a uprobe_multi
    /// link registers its sites in array order, each after a walk of every
    /// process mapping the file; perf events are enabled one by one). Where
    /// another tracer already keeps a site's breakpoint and semaphore up in
    /// the process, our program runs there from that site's registration
    /// on, so entries going live first opened calls whose returns were never
    /// seen: 21-85 false incomplete calls in a child process, 1.3-19 ms of
    /// entries without returns, measured here. Returns first leaves only
    /// returns of calls entered before the attachment, which are counted as
    /// unmatched returns like any mid-call attachment.
    pub fn usdt_job(
        &mut self,
        path: &Path,
        sites: &[ProbeSite],
        scope: Scope,
    ) -> Result<AttachJob, BpfError> {
        // 24 bits: wraps after 16.7 M attachments, long after any thread
        // of the first has gone.
        self.attachments = (self.attachments + 1) & 0xff_ffff;
        let attachment = u64::from(self.attachments) << pftrace_common::COOKIE_ATTACHMENT_SHIFT;
        let mut points = sites
            .iter()
            .map(|site| {
                let id = u64::from(self.spec_id(site.spec()?)?) | attachment;
                let ret = site.python_kind() == Some(kind::RETURN);
                let cookie = if ret { id | pftrace_common::COOKIE_RETURN } else { id };
                Ok(ProbePoint { offset: site.pc_offset, ref_ctr_offset: site.semaphore_offset, cookie })
            })
            .collect::<Result<Vec<_>, BpfError>>()?;
        points.sort_by_key(|p| p.cookie & pftrace_common::COOKIE_RETURN == 0);
        let floor = self.floor;
        let programs = self.wait_programs()?;
        let programs = Arc::clone(if floor { &programs.floor } else { &programs.usdt });
        let points = ResolvedPoints { path: path.to_path_buf(), points };
        Ok(AttachJob { programs, points, scope })
    }

    /// [`Self::usdt_job`] for every process mapping the file, without a
    /// kernel-managed semaphore (`ref_ctr_offset` 0): dormant, since a
    /// probe site is never reached while its semaphore is 0, until pftraced
    /// raises a process's semaphores itself (see crate::semaphores). With
    /// SCOPE_FILTER, only processes in TRACKED are traced.
    pub fn dormant_usdt_job(&mut self, path: &Path, sites: &[ProbeSite]) -> Result<AttachJob, BpfError> {
        let mut job = self.usdt_job(path, sites, Scope::Host)?;
        for point in &mut job.points.points {
            point.ref_ctr_offset = 0;
        }
        Ok(job)
    }

    /// The spec id of `spec`, storing it in the kernel's spec map on first use.
    fn spec_id(&mut self, spec: UsdtSpec) -> Result<u32, BpfError> {
        if let Some(&id) = self.specs.get(&spec) {
            return Ok(id);
        }
        let id = self.specs.len() as u32;
        if id >= MAX_SPECS {
            return Err(BpfError::TooManySpecs);
        }
        let map = self.ebpf.map_mut("SPECS").ok_or(BpfError::Missing("map SPECS"))?;
        let mut specs: Array<&mut MapData, UsdtSpec> =
            Array::try_from(map).map_err(|source| BpfError::Map { name: "SPECS", source })?;
        specs.set(id, spec, 0).map_err(|source| BpfError::Map { name: "SPECS", source })?;
        self.specs.insert(spec, id);
        Ok(id)
    }

    /// Sums the per-CPU counters.
    pub fn counters(&self) -> Result<Counters, BpfError> {
        let map = self.ebpf.map("COUNTERS").ok_or(BpfError::Missing("map COUNTERS"))?;
        let counters: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map).map_err(|source| BpfError::Map { name: "COUNTERS", source })?;
        let total = |index: u32| -> Result<u64, BpfError> {
            let values =
                counters.get(&index, 0).map_err(|source| BpfError::Map { name: "COUNTERS", source })?;
            Ok(values.iter().sum())
        };
        Ok(Counters {
            entry_seen: total(counter::ENTRY_SEEN)?,
            return_seen: total(counter::RETURN_SEEN)?,
            entry_matched: total(counter::ENTRY_MATCHED)?,
            return_matched: total(counter::RETURN_MATCHED)?,
            lost: total(counter::LOST)?,
            read_errors: total(counter::READ_ERRORS)?,
            execs: total(counter::EXECS)?,
            exec_lost: total(counter::EXEC_LOST)?,
            forks: total(counter::FORKS)?,
            fork_lost: total(counter::FORK_LOST)?,
            verdict_hits: total(counter::VERDICT_HITS)?,
            out_of_scope: total(counter::OUT_OF_SCOPE)?,
            exit_lost: total(counter::EXIT_LOST)?,
            generator_creations: total(counter::GENERATOR_CREATIONS)?,
            shim_returns: total(counter::SHIM_RETURNS)?,
            frame_unknown: total(counter::FRAME_UNKNOWN)?,
            long_files: total(counter::LONG_FILES)?,
            agent_reports: total(counter::AGENT_REPORTS)?,
            agent_foreign: total(counter::AGENT_FOREIGN)?,
            agent_bad: total(counter::AGENT_BAD)?,
            agent_unnamed: 0,
            cpu_coarse: total(counter::CPU_COARSE)?,
            cpu_slots_full: total(counter::CPU_SLOTS_FULL)?,
            cpu_slots_process_full: total(counter::CPU_SLOTS_PROCESS_FULL)?,
            cpu_slots_taken: total(counter::CPU_SLOTS_TAKEN)? + self.slots_claimed_here,
            cpu_slots_returned: total(counter::CPU_SLOTS_RETURNED)?,
            cpu_slot_processes: total(counter::CPU_SLOT_PROCESSES)? + self.slots_claimed_here,
            cpu_slot_processes_gone: total(counter::CPU_SLOT_PROCESSES_GONE)?,
            returns_skipped: total(counter::RETURNS_SKIPPED)?,
            returns_known: total(counter::RETURNS_KNOWN)?,
            window_mismatches: total(counter::WINDOW_MISMATCHES)?,
            thread_depths_full: total(counter::THREAD_DEPTHS_FULL)?,
            bounds: Default::default(),
            batch: if self.batch { self.batch_counters()? } else { BatchCounters::default() },
        })
    }

    /// Takes the kernel side's log ring (once): what it says in words of
    /// rare events, passed to the daemon's logger by [`aya_log::EbpfLogger::flush`].
    pub fn take_logger(&mut self) -> Result<aya_log::EbpfLogger<&'static dyn log::Log>, BpfError> {
        aya_log::EbpfLogger::init(&mut self.ebpf).map_err(|e| BpfError::Logger(e.to_string()))
    }

    /// Puts the agent's uprobe on its probe function (`offset` in the file
    /// `agent_so`), for every process mapping that file: only TRACKED ones
    /// get through (the others are counted in AGENT_FOREIGN). Once per run.
    pub fn attach_agent(&mut self, agent_so: &std::path::Path, offset: u64) -> Result<(), BpfError> {
        let (name, prog) = self.agent_uprobe()?;
        prog.load().map_err(|source| BpfError::Program { name, source })?;
        self.attach_agent_copy(agent_so, offset)
    }

    /// The agent's uprobe program and its name.
    fn agent_uprobe(&mut self) -> Result<(&'static str, &mut UProbe), BpfError> {
        const NAME: &str = "pftrace_agent_uprobe";
        let prog: &mut UProbe = program(&mut self.ebpf, NAME)?;
        Ok((NAME, prog))
    }

    /// Puts the (loaded) agent uprobe on another copy of the agent's file
    /// too: `path` names its inode (a process's /proc/PID/map_files link to
    /// a copy an earlier pftraced installed), `offset` the probe function.
    pub fn attach_agent_copy(&mut self, path: &std::path::Path, offset: u64) -> Result<(), BpfError> {
        let (name, prog) = self.agent_uprobe()?;
        let location = aya::programs::uprobe::UProbeAttachLocation::AbsoluteOffset(offset);
        prog.attach(location, path, aya::programs::uprobe::UProbeScope::AllProcesses)
            .map_err(|source| BpfError::Program { name, source })?;
        Ok(())
    }

    /// Attaches the agent's syscall road (a raw tracepoint on sys_enter,
    /// pftrace_common::agent::SYSCALL_NR) unless it is attached. It runs on
    /// every syscall of the host (+10-13 ns each here, most of it the
    /// kernel's slow syscall path the tracepoint turns on), so pftraced
    /// holds it only while an agent reports through it
    /// ([`Self::detach_agent_syscall`]).
    pub fn attach_agent_syscall(&mut self) -> Result<(), BpfError> {
        if self.agent_syscall.is_some() {
            return Ok(());
        }
        // The BTF raw tracepoint first: it reads the registers with direct
        // loads, 8-11 ns a report less in the program than the raw
        // tracepoint's bpf_probe_read_kernel (agent-bench --raw, bpf_stats,
        // load 7.6). The raw tracepoint where the kernel refuses it.
        match self.attach_agent_syscall_btf() {
            Ok(link) => {
                self.agent_syscall = Some(AgentSyscallLink::Btf(link));
                return Ok(());
            }
            Err(err) => log::debug!("{err}; the agent's syscall road takes the raw tracepoint"),
        }
        const NAME: &str = AGENT_SYSCALL_PROGRAM;
        let prog: &mut RawTracePoint = program(&mut self.ebpf, NAME)?;
        if prog.fd().is_err() {
            prog.load().map_err(|source| BpfError::Program { name: NAME, source })?;
        }
        let link = prog.attach("sys_enter").map_err(|source| BpfError::Program { name: NAME, source })?;
        self.agent_syscall = Some(AgentSyscallLink::Raw(link));
        Ok(())
    }

    fn attach_agent_syscall_btf(&mut self) -> Result<aya::programs::tp_btf::BtfTracePointLinkId, BpfError> {
        const NAME: &str = AGENT_SYSCALL_BTF_PROGRAM;
        let prog: &mut aya::programs::BtfTracePoint = program(&mut self.ebpf, NAME)?;
        if prog.fd().is_err() {
            let btf = kernel_btf(&mut self.btf)?;
            prog.load("sys_enter", btf).map_err(|source| BpfError::Program { name: NAME, source })?;
        }
        prog.attach().map_err(|source| BpfError::Program { name: NAME, source })
    }

    /// The token this daemon's agents put in their report syscall.
    pub fn agent_token(&self) -> u64 {
        self.agent_token
    }

    /// Detaches the agent's syscall road (no agent reports through it).
    pub fn detach_agent_syscall(&mut self) {
        let Some(link) = self.agent_syscall.take() else { return };
        let result = match link {
            AgentSyscallLink::Btf(link) => {
                match self
                    .ebpf
                    .program_mut(AGENT_SYSCALL_BTF_PROGRAM)
                    .map(<&mut aya::programs::BtfTracePoint>::try_from)
                {
                    Some(Ok(prog)) => prog.detach(link),
                    _ => return,
                }
            }
            AgentSyscallLink::Raw(link) => {
                match self.ebpf.program_mut(AGENT_SYSCALL_PROGRAM).map(<&mut RawTracePoint>::try_from) {
                    Some(Ok(prog)) => prog.detach(link),
                    _ => return,
                }
            }
        };
        if let Err(err) = result {
            log::warn!("detaching the agent's syscall road: {err}");
        }
    }

    /// Takes the ring buffer of matched calls (once).
    pub fn take_ring(&mut self) -> Result<super::ringbuf::EventRing, BpfError> {
        let map = self.ebpf.take_map("EVENTS").ok_or(BpfError::Missing("map EVENTS"))?;
        let aya::maps::Map::RingBuf(map) = map else {
            return Err(BpfError::Missing("ring buffer map EVENTS"));
        };
        super::ringbuf::EventRing::new(map).map_err(|source| BpfError::Map { name: "EVENTS", source })
    }
}

/// The agent's syscall road: the raw tracepoint program on sys_enter.
pub const AGENT_SYSCALL_PROGRAM: &str = "pftrace_agent_syscall";
/// The same road as a BTF raw tracepoint (tp_btf), taken where the kernel allows it.
pub const AGENT_SYSCALL_BTF_PROGRAM: &str = "pftrace_agent_syscall_btf";

/// How the agent's syscall road is attached.
enum AgentSyscallLink {
    Btf(aya::programs::tp_btf::BtfTracePointLinkId),
    Raw(aya::programs::raw_trace_point::RawTracePointLinkId),
}

/// A fresh token for task_layout::AGENT_TOKEN (random; never 0).
pub fn new_agent_token() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most 8 bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), 8, 0) };
    match u64::from_ne_bytes(b) {
        t if n == 8 && t != 0 => t,
        _ => (std::process::id() as u64) << 32 | 1,
    }
}

/// aya-log's level number (`AYA_LOG_LEVEL`: 0 off, 1 error ... 5 trace, as
/// `aya_log::Level`) for a `log` filter, which numbers them the same way.
fn kernel_log_level(filter: log::LevelFilter) -> u8 {
    const _: () = assert!(aya_log::Level::Warn as usize == log::Level::Warn as usize);
    filter as usize as u8
}

/// uprobe_multi where the kernel has it (6.6+), unless [`ATTACH_ENV`] says `perf`.
fn choose_method() -> AttachMethod {
    if std::env::var(ATTACH_ENV).is_ok_and(|v| v == "perf") {
        return AttachMethod::PerfEvent;
    }
    match aya::util::KernelVersion::current() {
        Ok(v) if v < aya::util::KernelVersion::new(6, 6, 0) => AttachMethod::PerfEvent,
        _ => AttachMethod::UprobeMulti,
    }
}

/// Program `name` as its type `T`; a missing program or one of another
/// type is an error naming it.
fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, BpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(BpfError::Missing(name))?
        .try_into()
        .map_err(|source| BpfError::Program { name, source })
}

/// Loads a program through aya for perf-event attachment; returns its fd.
fn load_uprobe(ebpf: &mut Ebpf, name: &'static str) -> Result<std::os::fd::OwnedFd, BpfError> {
    let prog: &mut UProbe = program(ebpf, name)?;
    prog.load().map_err(|source| BpfError::Program { name, source })?;
    let fd = prog.fd().map_err(|source| BpfError::Program { name, source })?;
    fd.as_fd().try_clone_to_owned().map_err(|source| BpfError::Dup { name, source })
}

/// The LPM trie key for a glob prefix: its bytes, matched on their length only.
fn prefix_key(prefix: &str) -> Result<Key<[u8; NAME_LEN]>, BpfError> {
    Ok(Key::new((prefix.len() * 8) as u32, padded(prefix)?))
}

/// The kernel map key for a name: its bytes, NUL-padded to NAME_LEN. The
/// kernel reads at most NAME_LEN - 1 bytes of a name, so longer ones are refused.
pub fn name_key(name: &str) -> Result<[u8; NAME_LEN], BpfError> {
    if name.is_empty() {
        return Err(BpfError::EmptyName);
    }
    padded(name)
}

/// `text` NUL-padded to NAME_LEN, refused beyond the longest name the kernel compares.
fn padded(text: &str) -> Result<[u8; NAME_LEN], BpfError> {
    if text.len() > crate::names::MAX_NAME {
        return Err(BpfError::NameTooLong {
            name: text.into(),
            len: text.len(),
            max: crate::names::MAX_NAME,
        });
    }
    let mut key = [0u8; NAME_LEN];
    key[..text.len()].copy_from_slice(text.as_bytes());
    Ok(key)
}

/// The kernel's BTF, parsed once per daemon: each parse of
/// /sys/kernel/btf/vmlinux took 130-150 ms here (strace, load 4), and
/// three BTF tracepoint programs each parsed it again, most of a
/// `pftraced --pid` start's 491 ms before its first record (bench,
/// 2026-11-28).
fn kernel_btf(cache: &mut Option<aya::Btf>) -> Result<&aya::Btf, BpfError> {
    if cache.is_none() {
        let btf = aya::Btf::from_sys_fs().map_err(|e| BpfError::KernelBtf(e.to_string()))?;
        *cache = Some(btf);
    }
    Ok(cache.as_ref().expect("just parsed"))
}
