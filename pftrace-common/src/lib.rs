//! Types shared by the eBPF programs and user space: the ring-buffer record,
//! the USDT argument specs, and the counter indices. All `#[repr(C)]` with
//! explicit padding so both sides agree byte for byte.
#![no_std]

/// Bytes kept of a Python function name (NUL-padded). Longer names are truncated.
pub const NAME_LEN: usize = 64;
/// Bytes of a Python file name a [`CallEvent`] holds (NUL-padded). A name
/// that fills them is sent again in a [`LongCallEvent`] instead.
pub const FILE_LEN: usize = 192;
/// Bytes of a file name a [`LongCallEvent`] holds: PATH_MAX, so every path
/// the kernel can open fits with its NUL. A name that fills them anyway
/// (a code object's file name need not be a path) is marked
/// [`flag::FILE_CUT`], counted and reported.
pub const LONG_FILE_LEN: usize = 4096;
/// Arguments of `python:function__entry` / `function__return` we read:
/// 0 = filename, 1 = funcname, 2 = lineno.
pub const USDT_ARGS: usize = 3;
/// Maximum number of distinct probe sites (spec ids) one daemon can attach.
pub const MAX_SPECS: u32 = 256;
/// Maximum number of traced names in the kernel's name map.
pub const MAX_NAMES: u32 = 4096;

/// What a ring-buffer record is; the `kind` byte sits at offset
/// [`KIND_OFFSET`] in every record.
pub mod kind {
    /// A [`CallEvent`](super::CallEvent) from `function__entry`.
    pub const ENTRY: u8 = 1;
    /// A [`CallEvent`](super::CallEvent) from `function__return`.
    pub const RETURN: u8 = 2;
    /// A [`ProcEvent`](super::ProcEvent): a process in scope called execve.
    pub const EXEC: u8 = 3;
    /// A [`ProcEvent`](super::ProcEvent): a traced process forked a new
    /// process (`pid` is the child, `parent` the traced process).
    pub const FORK: u8 = 4;
    /// A [`ProcEvent`](super::ProcEvent): a tracked process exited (its main
    /// thread did). In ring order, so a later process reusing the pid is
    /// told apart from it.
    pub const EXIT: u8 = 5;
    /// An [`AgentEvent`](super::AgentEvent) (or [`AgentNamedEvent`](super::AgentNamedEvent))
    /// of the in-process agent.
    pub const AGENT: u8 = 6;
}

/// Reports of the in-process agent (`pftrace-agent`, for CPythons whose USDT
/// probes do not fire). The agent calls its probe function (or makes its
/// syscall) with these in registers; the kernel writes an [`AgentEvent`] of
/// kind [`kind::AGENT`] with the event below, or an [`AgentNamedEvent`]
/// when the report carries the code object's strings (the first report of
/// that code object in an agent session: see [`AgentEvent::code`]).
pub mod agent {
    /// A frame started (sys.monitoring PY_START; 3.11 profile "call").
    pub const START: u8 = 1;
    /// A generator or coroutine resumed (PY_RESUME): counted as a call, as
    /// CPython's profiler does.
    pub const RESUME: u8 = 2;
    /// An exception thrown into a generator resumed it (PY_THROW): a call.
    pub const THROW: u8 = 3;
    /// The frame returned (PY_RETURN; 3.11 profile "return").
    pub const RETURN: u8 = 4;
    /// A generator or coroutine yielded (PY_YIELD): a return.
    pub const YIELD: u8 = 5;
    /// The frame exited by an exception (PY_UNWIND): a return.
    pub const UNWIND: u8 = 6;
    /// Largest valid event.
    pub const LAST: u8 = UNWIND;

    /// Whether an agent event opens a call (START, RESUME, THROW).
    pub const fn is_entry(event: u8) -> bool {
        event >= START && event <= THROW
    }

    /// Bit of the event argument (above its low byte) that marks the first
    /// report with strings of an agent session ([`flag::SESSION`]); no
    /// other bit above the low byte may be set.
    pub const NEW_SESSION: u64 = 1 << 8;

    /// Code objects whose strings pftraced keeps per process (and agent
    /// session); an agent whose session has sent this many sends the
    /// strings with every report of any further code object.
    pub const MAX_CODES: u32 = 65_536;

    /// Bits of [`AgentEvent::flags`](super::AgentEvent).
    pub mod flag {
        /// The record is an [`AgentNamedEvent`](crate::AgentNamedEvent): it
        /// carries the code object's name and file.
        pub const STRINGS: u8 = 1;
        /// The first report with strings of a new agent session (the agent
        /// (re)connected, or its process forked or exec'd): strings of this
        /// process's earlier sessions are void.
        pub const SESSION: u8 = 2;
        /// The file name filled [`LONG_FILE_LEN`](crate::LONG_FILE_LEN) bytes: it may be cut.
        pub const FILE_CUT: u8 = 4;
        /// With [`STRINGS`]: the record is an
        /// [`AgentLongNamedEvent`](crate::AgentLongNamedEvent) (the file name
        /// did not fit in [`FILE_LEN`](crate::FILE_LEN) bytes; counted as
        /// `counter::LONG_FILES`).
        pub const LONG: u8 = 8;
        /// Prototype (issue 12): the record is an
        /// [`AgentCallEvent`](crate::AgentCallEvent), a whole call.
        pub const CALL: u8 = 16;
        /// The batched road: [`AgentBatchEvent`](crate::AgentBatchEvent),
        /// events copied from the agent's per-thread buffer.
        pub const BATCH: u8 = 32;
    }

    /// Prototype (issue 12): bit of the event argument of a closing report
    /// that carries its call's start (rsi = CLOCK_MONOTONIC ns, rdx = the
    /// thread's CPU ns, both from user space; no strings). Taken only by an
    /// object loaded with `task_layout::AGENT_ONE_CALL` non-zero.
    pub const ONE_CALL: u64 = 1 << 9;

    /// The batched agent road (issue 12): bit of the event argument of a drain
    /// report: rsi = the calling thread's [`BatchBuf`](crate::BatchBuf) in
    /// its process (no event in the low byte). Taken only by an object
    /// loaded with `task_layout::AGENT_BATCH` non-zero.
    pub const BATCH: u64 = 1 << 10;
    /// With [`BATCH`]: the thread's first drain (a new thread, or the one
    /// thread of a forked child): the kernel starts its tail at 0 for this
    /// buffer, whatever it kept for the tid before.
    pub const BATCH_FIRST: u64 = 1 << 11;

    /// Exported function of the agent's shared object that pftraced puts a
    /// uprobe on: a 5-byte nop (`0f 1f 44 00 00`, which this kernel turns into
    /// a call to a trampoline instead of a trap) and `ret`. Arguments
    /// (System V): rdi = event (| [`NEW_SESSION`]), rsi = function name,
    /// rdx = file name (NUL-terminated UTF-8 in the process), rcx = first
    /// line, r8 = the code object's id in the process (its serial, never
    /// reused). rsi = 0: no strings (pftraced has them from an earlier
    /// report of this code object in this session); the record is then
    /// the 48-byte [`AgentEvent`](super::AgentEvent).
    pub const PROBE_SYMBOL: &str = "pftrace_agent_probe";

    /// The other road, where the process has no seccomp filter: a syscall
    /// with this number (far above any x86-64 syscall, below the x32 bit:
    /// the kernel answers -ENOSYS and does nothing else), taken by
    /// pftraced's raw tracepoint on `sys_enter` before the dispatch. The
    /// report is in the syscall's argument registers: rdi = event, rsi =
    /// name, rdx = file, r10 = line, r8 = code id (the probe function's
    /// meaning). 103 ns a report with an empty program, against 270 ns for
    /// the nop5 uprobe (agent-bench --raw, same sitting).
    pub const SYSCALL_NR: u64 = 0x0070_6674;
}

/// Bits of [`CallHead::flags`].
pub mod flag {
    /// `frame` holds the address of the probed interpreter frame (found and
    /// checked against the probe's function name; CPython 3.15+).
    pub const FRAME: u8 = 1;
    /// The frame belongs to a generator or coroutine object (a resumed run).
    pub const GENERATOR: u8 = 2;
    /// The line argument was -1 (no location: a function with cells starts
    /// with MAKE_CELL) and was replaced by the code's first line.
    pub const LINE_FROM_CODE: u8 = 4;
    /// The file name filled [`LONG_FILE_LEN`](super::LONG_FILE_LEN) bytes: it may be cut.
    pub const FILE_CUT: u8 = 8;
    /// The record is a [`LongCallEvent`](super::LongCallEvent).
    pub const LONG: u8 = 16;
    /// The record is a bare [`CallHead`](super::CallHead): a return whose
    /// file name was not read (its `file_ptr` pairs it with its entry).
    pub const NO_FILE: u8 = 32;
    /// With [`NO_FILE`]: a return whose name was not read either (`name` is
    /// zeros): the kernel knew its entry matched (pftrace-ebpf/src/depth.rs),
    /// and its `name_ptr` and `file_ptr` pair it with that entry.
    pub const NAME_NOT_READ: u8 = 64;
}

/// Attach-cookie bit marking a `function__return` site. The cookie's low 32
/// bits are the site's spec id; `pftrace_usdt` (one program for both probes,
/// attached with one uprobe_multi link per process) reads the kind from here.
pub const COOKIE_RETURN: u64 = 1 << 32;

/// The attach cookie's bits from here up: the number of the attachment
/// (one link per process, or per file host-wide), so a thread's
/// depth of seen calls (pftrace-ebpf/src/depth.rs) left from an earlier attachment of its process starts
/// over instead of pairing returns with entries seen before a detach.
pub const COOKIE_ATTACHMENT_SHIFT: u32 = 40;

/// Slots of the kernel's per-thread window of seen calls (issue 13: a
/// return of a call the kernel saw enter unmatched is dropped without
/// reading its name; pftrace-ebpf/src/depth.rs): one 8-byte word each,
/// slot = tid mod this (a power of two), 512 KiB. Two threads sharing a
/// slot take it from each other, counted in `counter::THREAD_DEPTHS_FULL`:
/// their returns are then read as before.
pub const MAX_THREAD_DEPTHS: u32 = 65536;

/// Rows of the kernel's per-thread rings of the window's name addresses
/// (depth.rs `THREAD_NAMES`): row = tid mod this (a power of two), 360
/// bytes each, 5.6 MiB. Two threads sharing a row take it from each other:
/// their returns are then read, counted in `counter::WINDOW_MISMATCHES`.
pub const MAX_THREAD_NAME_RINGS: u32 = 16384;

/// Byte offset of the `kind` field, the same in every record type.
pub const KIND_OFFSET: usize = 20;

/// Slots in the cgroup target array (cgroup v2 directories watched at once).
pub const MAX_CGROUPS: u32 = 64;
/// Processes whose forks are reported (the traced ones).
pub const MAX_TRACKED: u32 = 65536;
/// Glob prefixes in the kernel's prefix trie.
pub const MAX_PREFIXES: u32 = 1024;

/// Indices into the CONFIG array map (u32 values), set by user space.
pub mod config {
    /// How exec events are reported: [`EXEC_OFF`], [`EXEC_ALL`] or [`EXEC_CGROUPS`].
    pub const EXEC_MODE: u32 = 0;
    /// Number of used slots in the cgroup array (slots 0..n are checked).
    pub const CGROUP_SLOTS: u32 = 1;
    /// Non-zero when the prefix trie holds entries (globs).
    pub const HAS_PREFIXES: u32 = 2;
    /// Bumped by user space whenever the traced names change: the kernel's
    /// per-pointer verdict cache ignores entries of older generations.
    pub const GENERATION: u32 = 3;
    /// Non-zero when user space needs returns' file names (a traced name
    /// qualified by a file, or by a qualified name or module, is checked
    /// on every record): returns then come as [`CallEvent`](crate::CallEvent)s.
    /// 0: a return is a [`CallHead`](crate::CallHead), its file not read.
    pub const RETURN_FILE: u32 = 4;
    /// Number of config entries.
    pub const COUNT: u32 = 5;

    pub const EXEC_OFF: u32 = 0;
    pub const EXEC_ALL: u32 = 1;
    pub const EXEC_CGROUPS: u32 = 2;
}

/// What every USDT record carries besides the file name: the whole record
/// of a return when the file name is not read (flag [`flag::NO_FILE`], 128
/// bytes), and the head of a [`CallEvent`].
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CallHead {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC, nanoseconds.
    pub ts_ns: u64,
    /// Process id (tgid).
    pub pid: u32,
    /// Thread id (kernel tid, the same as Python's `threading.get_native_id()`).
    pub tid: u32,
    /// Line number argument of the probe.
    pub lineno: i32,
    /// [`kind::ENTRY`] or [`kind::RETURN`].
    pub kind: u8,
    /// Bits of [`flag`].
    pub flags: u8,
    /// 0 (the in-process agent's reports are [`AgentEvent`]s).
    pub agent_event: u8,
    pub _pad: u8,
    /// CPU time the calling thread has consumed so far (the scheduler's
    /// `se.sum_exec_runtime`), ns; 0 when the kernel layout is unknown.
    pub thread_cpu_ns: u64,
    /// Resident pages of the process (file + anon + shmem) at the event.
    pub rss_pages: u64,
    /// Address of the interpreter frame (with [`flag::FRAME`]): an entry and
    /// the return of the same frame run carry the same address.
    pub frame: u64,
    /// The probe's file-name argument, an address in the traced process:
    /// on CPython 3.6-3.10 the UTF-8 of the running code object's
    /// `co_filename`, which the frame holds while it runs, so an entry and
    /// the return of the same run carry the same (user space pairs by it).
    pub file_ptr: u64,
    /// The probe's name argument, an address in the traced process: on
    /// CPython 3.6-3.10 the UTF-8 of the running code object's `co_name`,
    /// held while the frame runs like `file_ptr`. A return whose name was
    /// not read ([`flag::NAME_NOT_READ`]) is paired by the two addresses.
    pub name_ptr: u64,
    /// Function name, NUL-padded (zeros with [`flag::NAME_NOT_READ`]).
    pub name: [u8; NAME_LEN],
}

/// One matched probe hit with its file name, as written by the kernel into
/// the ring buffer (every entry; a return only when user space asks for
/// returns' files, `config::RETURN_FILE`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CallEvent {
    pub head: CallHead,
    /// File name, NUL-padded.
    pub file: [u8; FILE_LEN],
}

/// A [`CallEvent`] whose file name did not fit in [`FILE_LEN`] bytes: the
/// same fields, with room for a path of PATH_MAX. Reserved only then, so
/// the common record stays small.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct LongCallEvent {
    pub head: CallEvent,
    /// The rest of the file name: `head.file` then `more` are one NUL-padded buffer.
    pub more: [u8; LONG_FILE_LEN - FILE_LEN],
}

/// A report of the in-process agent (kind [`kind::AGENT`]): 48 bytes, no
/// strings. The code object's name and file come once per agent session in
/// an [`AgentNamedEvent`]; pftraced keeps them per process by `code`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct AgentEvent {
    pub ts_ns: u64,
    pub pid: u32,
    pub tid: u32,
    /// The code object's first line.
    pub lineno: i32,
    /// [`kind::AGENT`].
    pub kind: u8,
    /// The agent's event ([`agent::START`] ... [`agent::UNWIND`]).
    pub event: u8,
    /// Bits of [`agent::flag`].
    pub flags: u8,
    pub _pad: u8,
    pub thread_cpu_ns: u64,
    pub rss_pages: u64,
    /// The code object's serial in its process (a counter of the agent,
    /// never reused, unlike the object's address): an entry and its return
    /// carry the same, and the strings sent once are kept under it.
    pub code: u64,
}

/// An [`AgentEvent`] with the code object's strings (flag
/// [`agent::flag::STRINGS`]): the first report of a code object in an agent
/// session, 304 bytes. A file name that does not fit in [`FILE_LEN`] goes
/// in an [`AgentLongNamedEvent`] instead: a burst of first reports of
/// thousands of code objects (an import, a glob that matches many) then
/// takes 304 bytes of the ring a code object, not 4,208.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct AgentNamedEvent {
    pub head: AgentEvent,
    /// Function name, NUL-terminated (cut at [`NAME_LEN`] - 1 bytes, as USDT names are).
    pub name: [u8; NAME_LEN],
    /// File name, NUL-terminated.
    pub file: [u8; FILE_LEN],
}

/// An [`AgentNamedEvent`] with room for a file name of PATH_MAX (flags
/// [`agent::flag::STRINGS`] and [`agent::flag::LONG`]).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct AgentLongNamedEvent {
    pub head: AgentNamedEvent,
    /// The rest of the file name: `head.file` then `more` are one NUL-padded buffer.
    pub more: [u8; LONG_FILE_LEN - FILE_LEN],
}

/// Prototype (issue 12, "One kernel entry per call", pftrace-agent/README.md):
/// a call reported once, at its end, with its start measured in user space.
/// `head` is the end as the kernel saw it (`ts_ns`, `thread_cpu_ns` from
/// the thread's [`CpuSlot`], RSS at the end only), `head.flags` has
/// [`agent::flag::CALL`]; the start's time and CPU are the agent's word.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct AgentCallEvent {
    pub head: AgentEvent,
    /// CLOCK_MONOTONIC at the start (vDSO; the clock of bpf_ktime_get_ns).
    pub entry_ts_ns: u64,
    /// The thread's CPU time at the start, read from its [`CpuSlot`].
    pub entry_cpu_ns: u64,
}

/// Prototype (issue 12): one registered thread's CPU-time slot, in a
/// BPF_F_MMAPABLE | BPF_F_RDONLY array the traced process maps read-only.
/// The sched_switch program writes it at each switch-in of the thread, so
/// while the thread runs its CPU time at CLOCK_MONOTONIC `t` is
/// `sum_exec_ns + (t - t_in_ns)`, to the ns. `seq` is odd during a write.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct CpuSlot {
    pub seq: u64,
    /// `se.sum_exec_runtime` at the switch-in (exact: charged at the switch-out).
    pub sum_exec_ns: u64,
    /// bpf_ktime_get_ns() at the switch-in.
    pub t_in_ns: u64,
    /// The thread (kernel tid) the slot was last written for.
    pub tid: u32,
    pub _pad: u32,
}

/// Slots of the CpuSlot array: threads of traced processes alive at once
/// that get CPU figures to the ns (more are counted in
/// `counter::CPU_SLOTS_FULL` and get the scheduler's last charge). 32 bytes
/// each; kernel memory (memlock in fdinfo): 528 KB for the slots, 1.31 MB
/// for SLOT_OF (a preallocated hash), 66 KB for the free list, 1.31 MB
/// for SLOTS_HELD (per-process tallies), 131 KB for SLOT_TGID. A node's
/// traced job of 64 processes of 64 threads uses a quarter; one process
/// holds at most `task_layout::CPU_SLOTS_PER_PROCESS` of them.
pub const MAX_CPU_SLOTS: u32 = 16384;

/// Rows of the record path's cache of SLOT_OF (CPU_SLOT_ROWS: tid mod this
/// picks a row of 8 bytes, 512 KiB): as many as the window's words
/// ([`MAX_THREAD_DEPTHS`]), so tids below 65,536 (pid_max is 32,768 by
/// default) never share one.
pub const MAX_CPU_SLOT_ROWS: u32 = 65536;
const _: () = assert!(MAX_CPU_SLOT_ROWS.is_power_of_two());

/// Records a thread's buffer holds (the batched agent road: an entry and a
/// return are a record each). 64: a dense thread drains every 32 calls, as
/// the whole-call prototype's 32 records did (a drain is ~300 ns fixed plus
/// ~20 ns a record: pftrace-agent/README.md "Batched road in pftraced").
pub const BATCH_LEN: usize = 64;

/// One event of a traced call (the batched agent road), measured by the
/// agent in user space (CLOCK_MONOTONIC from the vDSO, the thread's CPU
/// from its [`CpuSlot`]): the process's word; pid, tid and RSS (at the
/// drain) are the kernel's. A thread's records and its two-report reports
/// reach the ring in the order it made them (it drains its buffer before
/// any report), so pftraced pairs them as it pairs two-report events.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct BatchRecord {
    /// The code object's serial (as [`AgentEvent::code`]).
    pub code: u64,
    /// CLOCK_MONOTONIC at the event.
    pub ts_ns: u64,
    /// The thread's CPU time at the event.
    pub cpu_ns: u64,
    /// The code object's first line.
    pub lineno: i32,
    /// [`agent::START`] ... [`agent::UNWIND`].
    pub event: u8,
    pub _pad: [u8; 3],
}

/// The batched agent road: a thread's buffer in the agent's memory.
/// The agent writes `records[head % BATCH_LEN]`, then (after a compiler
/// fence) `head + 1`; it never writes a slot the kernel may not have drained
/// (it drains by syscall when BATCH_LEN records are past its last own drain).
/// The kernel keeps the tail (records it has put on the ring) in its own map.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BatchBuf {
    /// Records ever appended by this thread (to this buffer).
    pub head: u64,
    pub _pad: u64,
    pub records: [BatchRecord; BATCH_LEN],
}

/// The batched agent road (issue 12): a drain of one thread's buffer on the
/// ring. `head`: kind AGENT, flags [`agent::flag::BATCH`], `ts_ns` the
/// drain's time, pid/tid from the kernel, RSS at the drain, event 0, code 0.
/// The events are `records[(tail + i) % BATCH_LEN]` for i in 0..count (the
/// whole buffer is copied: one read of the agent's memory).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct AgentBatchEvent {
    pub head: AgentEvent,
    /// The first record's number in the thread's buffer.
    pub tail: u64,
    pub count: u32,
    /// What drained it ([`batch::SYSCALL`], [`batch::SWITCH`], [`batch::EXIT`]).
    pub why: u32,
    pub records: [BatchRecord; BATCH_LEN],
}

/// The batched agent road (issue 12): what drained a batch, and the counters.
pub mod batch {
    /// The thread's own drain report (buffer full, or its oldest record older than the bound).
    pub const SYSCALL: u32 = 1;
    /// The thread's switch-out (sched_switch, the thread still current).
    pub const SWITCH: u32 = 2;
    /// The thread's exit (sched_process_exit, before its memory goes).
    pub const EXIT: u32 = 3;
    /// The thread's execve/execveat (sys_enter, before the image is replaced).
    pub const EXEC: u32 = 4;
    /// Read by pftraced itself (process_vm_readv) when it stopped tracing
    /// and the thread had not switched out within the grace period.
    pub const DAEMON: u32 = 5;
    /// Indices of the BATCH_COUNTERS map (per CPU).
    pub mod counter {
        /// Drains that put a batch on the ring.
        pub const DRAINS: u32 = 0;
        /// Records put on the ring.
        pub const RECORDS: u32 = 1;
        /// Batches the ring had no room for (their records stay in the
        /// buffer; if the agent overwrites them, OVERRUN counts them).
        pub const LOST: u32 = 2;
        /// Records overwritten by the agent before the kernel drained them.
        pub const OVERRUN: u32 = 3;
        /// Drains whose read of the agent's buffer failed (page not
        /// resident, memory gone); at a switch-out the records stay.
        pub const UNREAD: u32 = 4;
        /// Threads that exited with records the kernel could not read (their number unknown).
        pub const EXIT_UNREAD: u32 = 5;
        /// Drain reports of a thread the kernel had no entry for and that
        /// did not say it was its first (evicted or forged): its buffered records were skipped.
        pub const UNKNOWN: u32 = 6;
        /// Drains by the thread's switch-out / exit / syscall (of DRAINS).
        pub const BY_SWITCH: u32 = 7;
        pub const BY_EXIT: u32 = 8;
        pub const BY_SYSCALL: u32 = 9;
        pub const BY_EXEC: u32 = 10;
        pub const COUNT: u32 = 11;
    }
}

/// The batched agent road (issue 12): what the kernel keeps per registered thread.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct BatchTail {
    /// The thread's [`BatchBuf`] in its process; 0 after its execve (the
    /// image it described is going: nothing is read there again).
    pub addr: u64,
    /// Records of it already on the ring.
    pub tail: u64,
}

/// A process event (exec), as written by the kernel into the ring buffer.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ProcEvent {
    pub ts_ns: u64,
    pub pid: u32,
    pub tid: u32,
    /// For FORK: the process that forked. For EXEC: the thread that exec'd
    /// (sched_process_exec's old_pid), not `pid` when a thread other than
    /// the main one did (it takes the main thread's id at the exec).
    pub parent: u32,
    /// [`kind::EXEC`] or [`kind::FORK`].
    pub kind: u8,
    pub _pad: [u8; 3],
    /// cgroup v2 id of the process at the event.
    pub cgroup_id: u64,
}

/// How one USDT argument is located (libbpf's design): a constant, a
/// register, memory at register + offset, or memory at base + index*scale + offset.
pub mod arg_kind {
    pub const NONE: u32 = 0;
    pub const CONST: u32 = 1;
    pub const REG: u32 = 2;
    pub const REG_DEREF: u32 = 3;
    pub const SIB_DEREF: u32 = 4;
}

/// Location of one USDT argument, computed by user space from the note's
/// argument string and read by the eBPF program at each hit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UsdtArg {
    /// Constant value (CONST) or displacement added to the address (DEREF kinds).
    pub val_off: u64,
    /// One of [`arg_kind`].
    pub kind: u32,
    /// Byte offset of the (base) register in `struct pt_regs`.
    pub reg_off: u16,
    /// Byte offset of the index register in `struct pt_regs` (SIB_DEREF).
    pub idx_reg_off: u16,
    /// log2 of the index scale (SIB_DEREF): 0, 1, 2 or 3.
    pub scale_shift: u8,
    /// Size of the argument in bytes: 1, 2, 4 or 8.
    pub size: u8,
    /// 1 if the argument is signed (negative size in the note).
    pub signed: u8,
    /// 64 - 8 * size: shift left then right to truncate and sign-extend.
    pub bitshift: u8,
    pub _pad: [u8; 4],
}

/// Registers a [`FrameSpec`] may name (pt_regs offsets), at most this many.
pub const FRAME_REGS: usize = 4;
/// Most bytes the kernel reads at once from a frame or a code object: the
/// fields it needs of each are read in one window (one read costs about
/// what four 8-byte reads cost together, measured on 3.15 dense tracing).
pub const FRAME_WINDOW: usize = 128;
/// [`FrameSpec::regs`] entry that ends the list.
pub const NO_REG: u16 = u16::MAX;

/// How to find and read the interpreter frame at a probe site (CPython
/// 3.15+, where the probes fire for generator creation, in `__init__` shim
/// frames and with line -1; see the daemon's `python.rs`). Offsets come from
/// the interpreter's own `_Py_DebugOffsets`; the frame is held in one of
/// `regs` at the probe, tried in order, and a register is taken only when
/// the frame's code object names the function the probe passed. The fields
/// are read in two windows, `frame_len` bytes at `frame + frame_start` and
/// `code_len` bytes at `code + code_start`; field offsets are relative to
/// their window (user space checks they fit in [`FRAME_WINDOW`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FrameSpec {
    /// pt_regs offsets of candidate registers, [`NO_REG`] after the last;
    /// all [`NO_REG`]: frames are not read at this site.
    pub regs: [u16; FRAME_REGS],
    pub frame_start: u16,
    pub frame_len: u16,
    /// `_PyInterpreterFrame.f_executable` (a tagged reference to the code object).
    pub frame_executable: u16,
    /// `_PyInterpreterFrame.owner` (one byte).
    pub frame_owner: u16,
    pub code_start: u16,
    pub code_len: u16,
    /// `PyCodeObject.co_flags` (i32).
    pub code_flags: u16,
    /// `PyCodeObject.co_firstlineno` (i32).
    pub code_firstlineno: u16,
    /// `PyCodeObject.co_name`.
    pub code_name: u16,
    /// `sizeof(PyASCIIObject)`: a compact ASCII string's bytes follow it.
    pub ascii_size: u16,
    /// co_flags bits of generator, coroutine and async generator code.
    pub generator_flags: u32,
    /// co_flags bit of the interpreter's internal shim code (`__init__` shim).
    pub shim_flags: u32,
    /// `owner` of a frame on the thread's stack (a call, or a generator being created).
    pub owner_thread: u8,
    /// `owner` of a frame inside a generator or coroutine object.
    pub owner_generator: u8,
    pub _pad: [u8; 2],
}

impl Default for FrameSpec {
    fn default() -> Self {
        Self {
            regs: [NO_REG; FRAME_REGS],
            frame_start: 0,
            frame_len: 0,
            frame_executable: 0,
            frame_owner: 0,
            code_start: 0,
            code_len: 0,
            code_flags: 0,
            code_firstlineno: 0,
            code_name: 0,
            ascii_size: 0,
            generator_flags: 0,
            shim_flags: 0,
            owner_thread: 0,
            owner_generator: 0,
            _pad: [0; 2],
        }
    }
}

/// The argument locations of one probe site, stored in the spec map under the
/// spec id that is passed to the program as its BPF attach cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UsdtSpec {
    pub args: [UsdtArg; USDT_ARGS],
    pub frame: FrameSpec,
}

/// Kernel struct offsets the programs need, found by user space in the
/// kernel's BTF and written to the program's read-only globals at load time.
pub mod task_layout {
    /// `task_struct.se.sum_exec_runtime` (0 = unknown: CPU time not read).
    pub const SUM_EXEC: &str = "TASK_SUM_EXEC_OFF";
    /// `task_struct.mm` (0 = unknown: RSS not read).
    pub const MM: &str = "TASK_MM_OFF";
    /// `mm_struct.rss_stat` + counter offset within an element.
    pub const RSS_BASE: &str = "MM_RSS_BASE_OFF";
    /// Bytes between consecutive rss_stat elements.
    pub const RSS_STRIDE: &str = "MM_RSS_STRIDE";
    /// Indices of MM_FILEPAGES, MM_ANONPAGES, MM_SHMEMPAGES.
    pub const RSS_FILE: &str = "MM_RSS_FILE_IDX";
    pub const RSS_ANON: &str = "MM_RSS_ANON_IDX";
    pub const RSS_SHMEM: &str = "MM_RSS_SHMEM_IDX";
    /// `task_struct.pid` and `task_struct.tgid` (0 = unknown: forks are not followed).
    pub const TASK_PID: &str = "TASK_PID_OFF";
    pub const TASK_TGID: &str = "TASK_TGID_OFF";
    /// nsfs inode of pftraced's PID namespace when it is not the host's (0:
    /// the host's, and pids are the kernel's own): pids and tids are then
    /// reported as numbered in that namespace, through the offsets below
    /// (see pftrace-daemon's kernel::btf::PidNsOffsets), and tasks not
    /// visible there are left out.
    pub const PIDNS_INO: &str = "PIDNS_INO";
    pub const TASK_THREAD_PID: &str = "TASK_THREAD_PID_OFF";
    pub const TASK_GROUP_LEADER: &str = "TASK_GROUP_LEADER_OFF";
    pub const PID_LEVEL: &str = "PID_LEVEL_OFF";
    pub const PID_NUMBERS: &str = "PID_NUMBERS_OFF";
    pub const UPID_SIZE: &str = "UPID_SIZE";
    pub const UPID_NR: &str = "UPID_NR_OFF";
    pub const UPID_NS: &str = "UPID_NS_OFF";
    pub const NS_INUM: &str = "NS_INUM_OFF";
    /// Ring-buffer fill in bytes at which a submit wakes the reader (0: every record).
    pub const WAKEUP_BYTES: &str = "WAKEUP_BYTES";
    /// Non-zero when probes are attached host-wide to a binary but only
    /// processes in TRACKED are traced (`--binary` with pid or cgroup
    /// scopes): probe hits of other processes are dropped first thing, and
    /// processes entering a watched cgroup by exec are added to TRACKED.
    /// Fixed at load time, so the verifier drops the check when it is 0.
    pub const SCOPE_FILTER: &str = "SCOPE_FILTER";
    /// Non-zero: agent reports that pass strings get the long record with
    /// them (the default). 0: every report is the short record: only used
    /// to measure what the strings cost.
    pub const AGENT_STRINGS: &str = "AGENT_STRINGS";
    /// Parts of an agent report left out (bits of [`bench_skip`]): only
    /// for agent-bench to measure what each part costs. 0 otherwise.
    pub const AGENT_BENCH_SKIP: &str = "AGENT_BENCH_SKIP";
    /// The token (random, per loaded object) an agent puts in r9 of its
    /// report syscall (pftrace_common::agent::SYSCALL_NR): the sys_enter
    /// program of every pftraced on the host sees every such syscall, and
    /// takes only those carrying its own token (the others are another
    /// pftraced's; a wrong token from a process is not counted as refused).
    pub const AGENT_TOKEN: &str = "AGENT_TOKEN";
    /// Non-zero: agent reports with `agent::ONE_CALL` are taken (prototype,
    /// agent-bench only); 0 (pftraced) and the verifier drops that path.
    pub const AGENT_ONE_CALL: &str = "AGENT_ONE_CALL";
    /// Non-zero: agent drain reports (`agent::BATCH`) are taken (prototype,
    /// agent-bench and its test only); 0 (pftraced) and the verifier drops that path.
    pub const AGENT_BATCH: &str = "AGENT_BATCH";

    /// Non-zero (pftraced): the kernel hands CPU slots out itself, from the
    /// FREE_SLOTS queue user space fills at load, to every thread of a
    /// TRACKED process (at its creation, or at its first matched call for a
    /// thread older than the attachment) and takes them back at the
    /// thread's exit. 0 (the agent prototype): only slots user space
    /// registers in SLOT_OF exist.
    pub const CPU_SLOT_ALLOC: &str = "CPU_SLOT_ALLOC";
    /// With CPU_SLOT_ALLOC: the most CPU slots the threads of one process
    /// hold at once (pftraced's `limits.cpu_slots_per_process`), so one
    /// process making thousands of threads cannot leave every other
    /// traced process the scheduler's coarse figure.
    pub const CPU_SLOTS_PER_PROCESS: &str = "CPU_SLOTS_PER_PROCESS";
    /// `task_struct.signal` and `signal_struct.live` (its counter): whether
    /// an exiting thread was the last of its process, whose tally of slots
    /// is then forgotten (0 = unknown: tallies stay until the map is full).
    pub const TASK_SIGNAL: &str = "TASK_SIGNAL_OFF";
    pub const SIGNAL_LIVE: &str = "SIGNAL_LIVE_OFF";
    /// Measuring only (pftraced's `PFTRACE_USDT_BENCH=STOP[,SKIP]`, read
    /// by the loader; 0 otherwise, and the verifier drops every test of
    /// it): a USDT hit returns after step STOP of [`usdt_bench`] (0: runs
    /// whole), so bpf_stats of builds that stop one step later each say
    /// what each step costs.
    pub const USDT_BENCH_STOP: &str = "USDT_BENCH_STOP";
    /// Measuring only: parts of a matched USDT hit's record left out (bits
    /// of [`bench_skip`]: RSS, CPU, CLOCK, WAKEUP, RING; and
    /// [`usdt_bench::FILE`]).
    pub const USDT_BENCH_SKIP: &str = "USDT_BENCH_SKIP";
    /// Steps of a USDT hit for USDT_BENCH_STOP, in the order they run.
    pub mod usdt_bench {
        /// The attach cookie read (the program's entry).
        pub const COOKIE: u32 = 1;
        /// The scope test and the `seen` counter.
        pub const SEEN: u32 = 2;
        /// The spec lookup and the name pointer's register.
        pub const NAME_PTR: u32 = 3;
        /// The 16-byte read of the name's head (user memory).
        pub const HEAD: u32 = 4;
        /// The thread's depth looked up and updated (after the spec
        /// lookup, before the name pointer: between SEEN and NAME_PTR).
        pub const DEPTH: u32 = 5;
        /// USDT_BENCH_SKIP bit: the file name string is not read.
        pub const FILE: u32 = 64;
    }
    /// Bits of AGENT_BENCH_SKIP.
    pub mod bench_skip {
        /// Process's RSS (mm and three counters).
        pub const RSS: u32 = 1;
        /// Thread CPU and RSS.
        pub const CPU: u32 = 2;
        /// bpf_ktime_get_ns.
        pub const CLOCK: u32 = 4;
        /// The ring-buffer query for a wakeup (submit without wakeup).
        pub const WAKEUP: u32 = 8;
        /// The whole record (reserve, fill, submit): count only.
        pub const RING: u32 = 16;
        /// The TRACKED lookup.
        pub const TRACKED: u32 = 32;
    }
}

/// Indices into the per-CPU counter array.
pub mod counter {
    /// `function__entry` hits seen (every Python call in a traced process).
    pub const ENTRY_SEEN: u32 = 0;
    /// `function__return` hits seen.
    pub const RETURN_SEEN: u32 = 1;
    /// Entry hits whose name matched a traced name.
    pub const ENTRY_MATCHED: u32 = 2;
    /// Return hits whose name matched a traced name.
    pub const RETURN_MATCHED: u32 = 3;
    /// Matched hits for which no ring-buffer space could be reserved.
    pub const LOST: u32 = 4;
    /// Hits whose spec or arguments could not be read.
    pub const READ_ERRORS: u32 = 5;
    /// Exec events for which no ring-buffer space could be reserved.
    pub const EXEC_LOST: u32 = 6;
    /// Exec events reported.
    pub const EXECS: u32 = 7;
    /// Names decided by the per-pointer verdict cache (no string copy).
    pub const VERDICT_HITS: u32 = 8;
    /// Forks of traced processes reported.
    pub const FORKS: u32 = 9;
    /// Fork reports dropped because the ring buffer was full.
    pub const FORK_LOST: u32 = 10;
    /// Probe hits of processes outside the scope (host-wide `--binary` probes).
    pub const OUT_OF_SCOPE: u32 = 11;
    /// Exit reports dropped because the ring buffer was full.
    pub const EXIT_LOST: u32 = 12;
    /// Matched entries that only created a generator or coroutine (3.15
    /// fires the entry probe when the frame starts and runs
    /// RETURN_GENERATOR, with no return): not sent.
    pub const GENERATOR_CREATIONS: u32 = 13;
    /// Matched returns of the interpreter's `__init__` shim frame (3.15; it
    /// has no entry): not sent.
    pub const SHIM_RETURNS: u32 = 14;
    /// Matched hits at sites with a frame spec where no register held the
    /// frame (sent without the frame's corrections).
    pub const FRAME_UNKNOWN: u32 = 15;
    /// Matched hits whose file name did not fit in the common record (and
    /// agent reports with strings whose file name did not: the long agent record).
    pub const LONG_FILES: u32 = 16;
    /// Reports from in-process agents accepted (each becomes one CallEvent).
    pub const AGENT_REPORTS: u32 = 17;
    /// Agent reports from processes not in TRACKED (dropped: only processes
    /// pftraced accepted may report).
    pub const AGENT_FOREIGN: u32 = 18;
    /// Agent reports with an unknown event kind (dropped).
    pub const AGENT_BAD: u32 = 19;
    /// Records (probe hits and agent reports) whose CPU figure is the
    /// scheduler's last charge (exact only to a tick), because their thread
    /// had no CPU slot written since its last switch-in: a thread running
    /// since before the attachment and not switched out since, or one that
    /// found no free slot.
    pub const CPU_COARSE: u32 = 20;
    /// Threads' attempts to take a CPU slot that found none free (each such
    /// record is also in CPU_COARSE).
    pub const CPU_SLOTS_FULL: u32 = 21;
    /// Threads' attempts to take a CPU slot while their process's threads
    /// held its share already (`task_layout::CPU_SLOTS_PER_PROCESS`; each
    /// such record is also in CPU_COARSE).
    pub const CPU_SLOTS_PROCESS_FULL: u32 = 22;
    /// CPU slots handed to threads, and given back (at a thread's exit, or
    /// its exec under a new tid): their difference is the slots held now.
    pub const CPU_SLOTS_TAKEN: u32 = 23;
    pub const CPU_SLOTS_RETURNED: u32 = 24;
    /// Processes counted in the kernel's per-process tally of slots, and
    /// those forgotten at their last thread's exit: their difference is
    /// the processes tallied now.
    pub const CPU_SLOT_PROCESSES: u32 = 25;
    pub const CPU_SLOT_PROCESSES_GONE: u32 = 26;
    /// Return hits dropped without reading their name: they closed an entry
    /// this thread was seen to make, whose name did not match
    /// (pftrace-ebpf/src/depth.rs). Also in RETURN_SEEN.
    pub const RETURNS_SKIPPED: u32 = 27;
    /// Entry hits that took a depth slot from another thread (tids equal
    /// mod `MAX_THREAD_DEPTHS`): that thread's returns are read as before.
    pub const THREAD_DEPTHS_FULL: u32 = 28;
    /// Return hits sent without reading their name: they closed an entry
    /// this thread was seen to make whose name matched (flag
    /// [`NAME_NOT_READ`](crate::flag::NAME_NOT_READ), depth.rs). Also in
    /// RETURN_SEEN and RETURN_MATCHED.
    pub const RETURNS_KNOWN: u32 = 29;
    /// Return hits whose name address was not the one their thread's
    /// window held for its innermost level (a greenlet or other switch
    /// between Python stacks the probes do not see, or the window's ring
    /// taken by a thread sharing its row): read as any return, and the
    /// thread's window started over (depth.rs). Also in RETURN_SEEN.
    pub const WINDOW_MISMATCHES: u32 = 30;
    /// Number of counters.
    pub const COUNT: u32 = 31;
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain old data, #[repr(C)], no implicit padding, every bit pattern valid.
    unsafe impl aya::Pod for super::CallHead {}
    unsafe impl aya::Pod for super::CallEvent {}
    unsafe impl aya::Pod for super::LongCallEvent {}
    unsafe impl aya::Pod for super::FrameSpec {}
    unsafe impl aya::Pod for super::ProcEvent {}
    unsafe impl aya::Pod for super::AgentEvent {}
    unsafe impl aya::Pod for super::AgentNamedEvent {}
    unsafe impl aya::Pod for super::AgentLongNamedEvent {}
    unsafe impl aya::Pod for super::BatchTail {}
    unsafe impl aya::Pod for super::UsdtArg {}
    unsafe impl aya::Pod for super::UsdtSpec {}
}

// Layout checks: the kernel and user space must agree, with no implicit padding.
const _: () = assert!(core::mem::size_of::<CallHead>() == 64 + NAME_LEN);
const _: () = assert!(core::mem::size_of::<CallEvent>() == 64 + NAME_LEN + FILE_LEN);
const _: () = assert!(core::mem::size_of::<LongCallEvent>() == 64 + NAME_LEN + LONG_FILE_LEN);
const _: () = assert!(core::mem::offset_of!(LongCallEvent, more) == core::mem::size_of::<CallEvent>());
const _: () = assert!(core::mem::size_of::<FrameSpec>() == 40);
const _: () = assert!(core::mem::size_of::<ProcEvent>() == 32);
const _: () = assert!(core::mem::offset_of!(CallHead, kind) == KIND_OFFSET);
const _: () = assert!(core::mem::offset_of!(CallEvent, head) == 0);
const _: () = assert!(core::mem::offset_of!(ProcEvent, kind) == KIND_OFFSET);
const _: () = assert!(core::mem::offset_of!(AgentEvent, kind) == KIND_OFFSET);
const _: () = assert!(core::mem::size_of::<AgentEvent>() == 48);
const _: () = assert!(core::mem::size_of::<AgentCallEvent>() == 64);
const _: () = assert!(core::mem::size_of::<CpuSlot>() == 32);
const _: () = assert!(core::mem::size_of::<BatchRecord>() == 32);
const _: () = assert!(core::mem::size_of::<BatchBuf>() == 16 + 32 * BATCH_LEN);
const _: () = assert!(core::mem::size_of::<AgentBatchEvent>() == 64 + 32 * BATCH_LEN);
const _: () = assert!(core::mem::offset_of!(BatchBuf, records) == 16);
const _: () = assert!(core::mem::size_of::<AgentNamedEvent>() == 48 + NAME_LEN + FILE_LEN);
const _: () = assert!(core::mem::size_of::<AgentLongNamedEvent>() == 48 + NAME_LEN + LONG_FILE_LEN);
const _: () =
    assert!(core::mem::offset_of!(AgentLongNamedEvent, more) == core::mem::size_of::<AgentNamedEvent>());
const _: () = assert!(core::mem::size_of::<UsdtArg>() == 24);
const _: () = assert!(core::mem::size_of::<UsdtSpec>() == 24 * USDT_ARGS + 40);
