//! pftrace's eBPF programs, attached to CPython's `python:function__entry` and
//! `python:function__return` USDT probes. Each hit: read the argument
//! locations of this probe site (spec id = attach cookie), read the function
//! name, drop it unless it is in NAMES, then reserve, fill and submit one
//! CallEvent, or for a return a CallHead without the file name
//! (`pftrace_usdt` serves both probes, the kind in the cookie).
//! On CPython 3.6-3.10 a return closing an entry its thread was seen to make
//! is decided before the name's read (depth.rs): dropped when that entry
//! did not match, sent unread (its name and file arguments' addresses, flag
//! NAME_NOT_READ) when it matched.
//! Counters are per CPU; the daemon sums them. A raw tracepoint on
//! sched_process_exec reports new processes in scope (all, or under watched cgroups).
//! Rare events that mean something is missing (a process report the event
//! ring had no room for, a probe site whose arguments cannot be read, kernel
//! offsets unknown) are also said in words through aya-log, on its own ring,
//! only on those paths: the hot path carries nothing of it, and the level is
//! a load-time constant (aya-log's `AYA_LOG_LEVEL`).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// BPF's atomic add, for the verdict cache's writer count (core has no
// atomic read-modify-write for the BPF target).
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]
// Map keys and values stay borrowed: passed by value they would be copied
// to new stack slots, and a BPF program has 512 bytes of stack in all.
#![allow(clippy::needless_borrows_for_generic_args)]

mod depth;

use aya_ebpf::{
    EbpfContext as _,
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user,
        bpf_probe_read_user_str_bytes,
        generated::{
            bpf_get_attach_cookie, bpf_get_current_cgroup_id, bpf_get_current_task,
            bpf_probe_read_user as bpf_probe_read_user_raw, bpf_probe_read_user_str,
        },
    },
    macros::{btf_tracepoint, map, raw_tracepoint, uprobe},
    maps::{Array, CgroupArray, HashMap, LpmTrie, LruHashMap, PerCpuArray, Queue, RingBuf, lpm_trie::Key},
    programs::{BtfTracePointContext, ProbeContext, RawTracePointContext},
};
use core::mem::MaybeUninit;

use aya_log_ebpf::warn;
use pftrace_common::{
    AgentBatchEvent, AgentCallEvent, AgentEvent, AgentLongNamedEvent, AgentNamedEvent, BATCH_LEN, BatchTail,
    COOKIE_RETURN, CallEvent, CallHead, CpuSlot, FILE_LEN, FRAME_REGS, FRAME_WINDOW, FrameSpec,
    LONG_FILE_LEN, LongCallEvent, MAX_CGROUPS, MAX_CPU_SLOT_ROWS, MAX_CPU_SLOTS, MAX_NAMES, MAX_PREFIXES,
    MAX_SPECS, MAX_TRACKED, NAME_LEN, NO_REG, ProcEvent, UsdtArg, UsdtSpec, agent, arg_kind, batch, config,
    counter, flag, kind,
    task_layout::{bench_skip as skip_bit, usdt_bench},
};

/// Argument locations per probe site, indexed by the attach cookie.
// Kernel layout, set by user space from BTF at load time (see
// pftrace_common::task_layout). Zero means unknown: the figure is not read.
#[unsafe(no_mangle)]
static TASK_SUM_EXEC_OFF: u32 = 0;
#[unsafe(no_mangle)]
static TASK_MM_OFF: u32 = 0;
#[unsafe(no_mangle)]
static TASK_PID_OFF: u32 = 0;
#[unsafe(no_mangle)]
static TASK_TGID_OFF: u32 = 0;
#[unsafe(no_mangle)]
static MM_RSS_BASE_OFF: u32 = 0;
#[unsafe(no_mangle)]
static MM_RSS_STRIDE: u32 = 0;
#[unsafe(no_mangle)]
static MM_RSS_FILE_IDX: u32 = 0;
#[unsafe(no_mangle)]
static MM_RSS_ANON_IDX: u32 = 0;
#[unsafe(no_mangle)]
static MM_RSS_SHMEM_IDX: u32 = 0;

/// pftraced's PID namespace (nsfs inode) when it is not the host's, and the
/// kernel layout to number tasks there (pftrace_common::task_layout::PIDNS_INO).
/// 0: the host's; pids are the kernel's own.
#[unsafe(no_mangle)]
static PIDNS_INO: u32 = 0;
#[unsafe(no_mangle)]
static TASK_THREAD_PID_OFF: u32 = 0;
#[unsafe(no_mangle)]
static TASK_GROUP_LEADER_OFF: u32 = 0;
#[unsafe(no_mangle)]
static PID_LEVEL_OFF: u32 = 0;
#[unsafe(no_mangle)]
static PID_NUMBERS_OFF: u32 = 0;
#[unsafe(no_mangle)]
static UPID_SIZE: u32 = 0;
#[unsafe(no_mangle)]
static UPID_NR_OFF: u32 = 0;
#[unsafe(no_mangle)]
static UPID_NS_OFF: u32 = 0;
#[unsafe(no_mangle)]
static NS_INUM_OFF: u32 = 0;

/// Ring-buffer fill (bytes) at which a submit wakes the reader; below it
/// records are submitted without a wakeup and the reader drains on its own
/// short timer. Set by user space (a quarter of the ring); 0 wakes on every record.
#[unsafe(no_mangle)]
static WAKEUP_BYTES: u32 = 0;

/// Non-zero: only processes in TRACKED are traced (`--binary` with pid or
/// cgroup scopes; see pftrace_common::task_layout::SCOPE_FILTER).
#[unsafe(no_mangle)]
static SCOPE_FILTER: u32 = 0;

/// What this daemon's agents put in r9 of their report syscall
/// (pftrace_common::task_layout::AGENT_TOKEN); set at load time.
#[unsafe(no_mangle)]
static AGENT_TOKEN: u64 = 0;

/// Measuring only (pftrace_common::task_layout::USDT_BENCH_STOP, _SKIP):
/// 0 in use, and the verifier drops every test of them.
#[unsafe(no_mangle)]
static USDT_BENCH_STOP: u32 = 0;
#[unsafe(no_mangle)]
static USDT_BENCH_SKIP: u32 = 0;

/// Whether a measurement stops a USDT hit after `step` (usdt_bench).
#[inline(always)]
fn bench_stop(step: u32) -> bool {
    global(&USDT_BENCH_STOP) == step as u64
}

/// Whether a measurement leaves `part` of a USDT record out.
#[inline(always)]
fn usdt_skip(part: u32) -> bool {
    global(&USDT_BENCH_SKIP) & part as u64 != 0
}

/// Non-zero: agent reports copy the name and file strings (see
/// pftrace_common::task_layout::AGENT_STRINGS).
#[unsafe(no_mangle)]
static AGENT_STRINGS: u32 = 1;

/// Parts of an agent report left out, only to measure what each costs
/// (pftrace_common::task_layout::AGENT_BENCH_SKIP); 0 outside benchmarks,
/// and then the verifier drops every test of it.
#[unsafe(no_mangle)]
static AGENT_BENCH_SKIP: u32 = 0;

/// Non-zero: agent reports with `agent::ONE_CALL` are taken (prototype,
/// pftrace_common::task_layout::AGENT_ONE_CALL); 0 in pftraced.
#[unsafe(no_mangle)]
static AGENT_ONE_CALL: u32 = 0;

/// Non-zero: agent drain reports with `agent::BATCH` are taken (prototype,
/// pftrace_common::task_layout::AGENT_BATCH); 0 in pftraced.
#[unsafe(no_mangle)]
static AGENT_BATCH: u32 = 0;

/// Non-zero (pftraced): CPU slots are handed out and taken back by the
/// kernel (pftrace_common::task_layout::CPU_SLOT_ALLOC); 0 in the agent
/// prototype, whose slots user space registers.
#[unsafe(no_mangle)]
static CPU_SLOT_ALLOC: u32 = 0;

/// The most CPU slots the threads of one process (kernel tgid) hold at once
/// (pftrace_common::task_layout::CPU_SLOTS_PER_PROCESS); its threads past
/// it get the scheduler's last charge, counted in CPU_SLOTS_PROCESS_FULL.
#[unsafe(no_mangle)]
static CPU_SLOTS_PER_PROCESS: u32 = MAX_CPU_SLOTS;

/// `task_struct.signal` and `signal_struct.live` (0 = unknown): a thread
/// exiting reads whether its thread group died with it, to forget the
/// group's count of slots (SLOTS_HELD).
#[unsafe(no_mangle)]
static TASK_SIGNAL_OFF: u32 = 0;
#[unsafe(no_mangle)]
static SIGNAL_LIVE_OFF: u32 = 0;

const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;

#[map]
static SPECS: Array<UsdtSpec> = Array::with_max_entries(MAX_SPECS, 0);

/// Traced function names (NUL-padded to NAME_LEN). The value is unused by the
/// kernel; user space keeps its meaning.
#[map]
static NAMES: HashMap<[u8; NAME_LEN], u32> = HashMap::with_max_entries(MAX_NAMES, 0);

/// Name prefixes of globs (`test_*` is stored as `test_`; `*x` as the empty
/// prefix). Consulted only when CONFIG[HAS_PREFIXES] is set and the exact
/// lookup missed; user space checks the rest of the glob.
#[map]
static PREFIXES: LpmTrie<[u8; NAME_LEN], u32> = LpmTrie::with_max_entries(MAX_PREFIXES, BPF_F_NO_PREALLOC);

/// Settings written by user space (indices in `pftrace_common::config`).
#[map]
static CONFIG: Array<u32> = Array::with_max_entries(config::COUNT, 0);

/// Traced processes (tgids) and their descendants: their forks and execs are
/// reported, and with SCOPE_FILTER only their probe hits count. User space
/// adds the processes it attaches to; the fork program adds each new child at
/// once, so a child that execs before user space has seen it is still
/// reported; the exit program removes a process when it exits. LRU, in case.
#[map]
static TRACKED: LruHashMap<u32, u32> = LruHashMap::with_max_entries(MAX_TRACKED, 0);

/// cgroup v2 directories whose processes' execs are reported.
#[map]
static CGROUPS: CgroupArray = CgroupArray::with_max_entries(MAX_CGROUPS, 0);

const BPF_F_NO_PREALLOC: u32 = 1;
/// The map's memory can be mmap'ed (BPF_F_MMAPABLE).
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Prototype (issue 12): per registered thread, its CPU time at its last
/// switch-in (pftrace_common::CpuSlot), mapped read-only by the agent.
/// Not BPF_F_RDONLY: its fd would be O_RDONLY, and the kernel drops
/// VM_SHARED from a shared mapping of a read-only file, which bpf_map_mmap
/// then refuses (EINVAL, seen here). User space freezes it instead
/// (BPF_MAP_FREEZE, AgentKernel::attach_cpu_slots): then a writable mapping
/// is refused (EPERM), a read-only one cannot be mprotect'ed writable, and
/// syscall-side writes are refused; this program still writes it.
#[map]
static CPU_SLOTS: Array<CpuSlot> = Array::with_max_entries(MAX_CPU_SLOTS, BPF_F_MMAPABLE);

/// Kernel tid -> its slot in CPU_SLOTS: written by the kernel with
/// CPU_SLOT_ALLOC (claim_cpu_slot, release_cpu_slot), else by user space.
#[map]
static SLOT_OF: HashMap<u32, u32> = HashMap::with_max_entries(MAX_CPU_SLOTS, 0);

/// SLOT_OF's answers for the record path, direct-mapped by tid (row = tid
/// mod MAX_CPU_SLOT_ROWS; value tid << 32 | slot index, 0 empty): an
/// array's lookup the verifier inlines, where the hash's costs a helper
/// call a record (see [`slot_cpu`]). Only a cache: SLOT_OF stays the
/// truth, a row is written from it on a miss, cleared when its slot is
/// given back, and a reader still checks the slot's own tid, so a row
/// two threads share, or one that went stale, costs a hash lookup and
/// never a wrong figure.
#[map]
static CPU_SLOT_ROWS: Array<u64> = Array::with_max_entries(MAX_CPU_SLOT_ROWS, 0);

/// Kernel tgid -> CPU slots its threads hold (with CPU_SLOT_ALLOC): taken
/// at claim_cpu_slot, given back at release_cpu_slot, the entry removed
/// when the thread group dies (pftrace_exit). At most one entry per live
/// process holding a slot, so never more entries than slots.
#[map]
static SLOTS_HELD: HashMap<u32, u64> = HashMap::with_max_entries(MAX_CPU_SLOTS, 0);

/// Slot index -> the kernel tgid charged for it in SLOTS_HELD: given back
/// to that process whichever thread frees the slot.
#[map]
static SLOT_TGID: Array<u32> = Array::with_max_entries(MAX_CPU_SLOTS, 0);

/// Prototype (issue 12, batched): kernel tid -> its agent buffer and the
/// records of it already on the ring (the tail the agent cannot touch).
/// LRU: entries of threads that exited while nothing drained them go first.
#[map]
static BATCH_OF: LruHashMap<u32, BatchTail> = LruHashMap::with_max_entries(MAX_CPU_SLOTS, 0);

/// Prototype (issue 12, batched): pftrace_common::batch::counter, per CPU.
#[map]
static BATCH_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(batch::counter::COUNT, 0);

/// Free slot indices of CPU_SLOTS (all of them pushed by user space at
/// load, with CPU_SLOT_ALLOC): a thread takes one, its exit gives it back.
#[map]
static FREE_SLOTS: Queue<u32> = Queue::with_max_entries(MAX_CPU_SLOTS, 0);

/// Per-CPU counters, indexed by `pftrace_common::counter`.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Matched calls for user space. The size is set by the loader at load time.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

/// What has been said once already through aya-log: slot 0, that kernel
/// offsets are unknown; slot 1 + spec id, that a probe site's arguments
/// could not be read.
#[map]
static SAID: Array<u32> = Array::with_max_entries(MAX_SPECS + 1, 0);
const SAID_OFFSETS: u32 = 0;

/// Whether `slot` of [`SAID`] is said for the first time now (marks it).
/// Two CPUs may both see it unsaid: at worst it is said twice.
#[inline(always)]
fn first_time(slot: u32) -> bool {
    match SAID.get_ptr_mut(slot) {
        Some(p) if unsafe { *p } == 0 => {
            unsafe { *p = 1 };
            true
        }
        _ => false,
    }
}

/// Argument positions in CPython's probes.
const ARG_FILENAME: usize = 0;
const ARG_FUNCNAME: usize = 1;
const ARG_LINENO: usize = 2;

/// Both probes in one program, the kind taken from the attach cookie: what a
/// uprobe_multi link runs (one link per process covers every site).
#[uprobe]
pub fn pftrace_usdt(ctx: ProbeContext) -> u32 {
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    if cookie & COOKIE_RETURN != 0 {
        on_probe(&ctx, cookie, kind::RETURN, counter::RETURN_SEEN)
    } else {
        on_probe(&ctx, cookie, kind::ENTRY, counter::ENTRY_SEEN)
    }
}

/// The entry probe alone (attached through a perf event where the kernel has no uprobe_multi).
#[uprobe]
pub fn pftrace_entry(ctx: ProbeContext) -> u32 {
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    on_probe(&ctx, cookie, kind::ENTRY, counter::ENTRY_SEEN)
}

/// The return probe alone (perf-event attachment).
#[uprobe]
pub fn pftrace_return(ctx: ProbeContext) -> u32 {
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    on_probe(&ctx, cookie, kind::RETURN, counter::RETURN_SEEN)
}

/// Benchmark floor: the same attach path with a program that returns at once.
#[uprobe]
pub fn pftrace_noop(_ctx: ProbeContext) -> u32 {
    0
}

/// One probe hit; `cookie` is the attach cookie (its low half the spec
/// id), read once by the caller.
#[inline(always)]
fn on_probe(ctx: &ProbeContext, cookie: u64, event_kind: u8, seen: u32) -> u32 {
    if bench_stop(usdt_bench::COOKIE) {
        return 0;
    }
    // Read once a hit, for the scope, the thread's window and the record (a
    // helper call and its return cost ~20-30 ns here: see [`call_cpu_of`]).
    let host = bpf_get_current_pid_tgid();
    if global(&SCOPE_FILTER) != 0 || global(&PIDNS_INO) != 0 {
        // 0: a process outside pftraced's PID namespace (host-wide probes).
        let pid_tgid = pid_tgid_in_ns(host);
        let tgid = (pid_tgid >> 32) as u32;
        if pid_tgid == 0 || (global(&SCOPE_FILTER) != 0 && unsafe { TRACKED.get(&tgid) }.is_none()) {
            bump(counter::OUT_OF_SCOPE);
            return 0;
        }
    }
    bump(seen);
    if bench_stop(usdt_bench::SEEN) {
        return 0;
    }
    let spec_id = cookie as u32;
    if let Err(err) = try_on_probe(ctx, cookie, event_kind, host) {
        bump(counter::READ_ERRORS);
        if first_time(spec_id.wrapping_add(1)) {
            warn!(
                ctx,
                "probe site with spec id {} (pid {}): reading its arguments failed (error {}); further \
                 failures at this site are only counted (read_errors)",
                spec_id,
                (host >> 32) as u32,
                err
            );
        }
    }
    0
}

#[inline(always)]
fn try_on_probe(ctx: &ProbeContext, cookie: u64, event_kind: u8, host: u64) -> Result<(), i32> {
    let matched = if event_kind == kind::RETURN { counter::RETURN_MATCHED } else { counter::ENTRY_MATCHED };
    let spec = SPECS.get(cookie as u32).ok_or(-1i32)?;

    // Where entries and returns pair (no frame spec: 3.6-3.10), a return
    // closing an entry this thread was seen to make is decided before the
    // name's read: dropped when the entry did not match, sent with the
    // arguments' addresses only when it did (see depth.rs).
    let mut opened = depth::Opened::NONE;
    let mut closing = depth::Closing::Unknown;
    // The name's address (a register on the CPythons built here), read once
    // for the whole hit: on 3.6-3.10 it also checks that a return closes
    // the level the window thinks it does (depth.rs).
    // Two plain words ([`read_arg_or_error`]), not read_arg's Result: spilled
    // across the window's step, a Result's error half is undefined while it
    // is Ok, and the verifier refused that spill (`R5 !read_ok`). Errors are
    // negative, never 0.
    let (name_ptr, name_err) = read_arg_or_error(ctx, &spec.args[ARG_FUNCNAME]);
    if spec.frame.regs[0] == NO_REG {
        let attachment = depth::attachment(cookie);
        if event_kind == kind::RETURN {
            closing = depth::leave(attachment, name_ptr, host as u32);
            if closing == depth::Closing::Unmatched {
                return Ok(());
            }
        } else {
            opened = depth::enter(attachment, name_ptr, host as u32);
            if name_err != 0 {
                depth::start_over(opened);
            }
        }
    }
    if name_err != 0 {
        return Err(name_err);
    }
    if bench_stop(usdt_bench::DEPTH) {
        return Ok(());
    }
    // One name buffer for both roads (zeros on the known one): the stack is 512 bytes.
    let mut words = MaybeUninit::<[u64; NAME_LEN / 8]>::uninit();
    let name = zeroed_name(&mut words);
    // Qualified names need the return's file (and its name with it): read.
    if closing == depth::Closing::Matched && config_value(config::RETURN_FILE) == 0 {
        return send_known_return(ctx, spec, matched, name_ptr, host, name);
    }
    let sent = read_and_send(ctx, spec, event_kind, matched, opened, name_ptr, host, name);
    if sent.is_err() {
        // Its bit must not say "matched and sent" (depth.rs).
        depth::start_over(opened);
    }
    sent
}

/// A name buffer of zeros in `words`, written as eight 8-byte stores.
/// Written `[0u8; NAME_LEN]` (or `[0u64; 8]`), the zeros compiled to a call
/// of a byte-by-byte memset subprogram (64 stores and a loop a hit, plus a
/// call and its return, dear with this CPU's return-thunk mitigation): 7.6%
/// of the dense program's own perf samples (1,113 of 14,701, `perf record
/// -a`, 3 M calls of bench/calls.py). Volatile, so that LLVM cannot fold the
/// stores back into that call. The zeros matter: the name is a hash key of
/// all NAME_LEN bytes and the record carries it whole.
#[inline(always)]
fn zeroed_name(words: &mut MaybeUninit<[u64; NAME_LEN / 8]>) -> &mut [u8; NAME_LEN] {
    const _: () = assert!(NAME_LEN.is_multiple_of(8));
    let first = words.as_mut_ptr().cast::<u64>();
    for i in 0..NAME_LEN / 8 {
        unsafe { first.add(i).write_volatile(0) };
    }
    // Every byte written above; u64s are valid as bytes.
    unsafe { &mut *words.as_mut_ptr().cast::<[u8; NAME_LEN]>() }
}

/// A return whose entry the kernel saw match and sent (depth.rs): sent
/// without reading its name or file from the traced process, only their
/// addresses (registers, on the CPythons that get here), which pair it
/// with that entry in user space (pairing.rs); the call is named from the
/// entry. Dense, this is one string read of the process less a call.
#[inline(always)]
fn send_known_return(
    ctx: &ProbeContext,
    spec: &UsdtSpec,
    matched: u32,
    name_ptr: u64,
    host: u64,
    zeros: &[u8; NAME_LEN],
) -> Result<(), i32> {
    // Measuring: where an entry stopped at this step its bit stayed set.
    if bench_stop(usdt_bench::NAME_PTR) {
        return Ok(());
    }
    let call = Call {
        kind: kind::RETURN,
        lineno: read_arg(ctx, &spec.args[ARG_LINENO])? as i32,
        flags: flag::NO_FILE | flag::NAME_NOT_READ,
        frame: 0,
        file_ptr: read_arg(ctx, &spec.args[ARG_FILENAME])?,
        name_ptr,
        host,
    };
    bump(matched);
    bump(counter::RETURNS_KNOWN);
    if usdt_skip(skip_bit::RING) {
        return Ok(());
    }
    send_head(&call, zeros);
    Ok(())
}

/// A bare [`CallHead`] record (a return without its file name).
#[inline(always)]
fn send_head(call: &Call, name: &[u8; NAME_LEN]) {
    let Some(mut entry) = EVENTS.reserve::<CallHead>(0) else {
        bump(counter::LOST);
        return;
    };
    unsafe { fill(entry.as_mut_ptr(), call, name) };
    entry.submit(wakeup_flag());
}

/// The name read and checked, then the record sent: an entry (it says to
/// `opened` whether it matched), a return the kernel knew nothing of, or
/// any hit at a site with a frame spec.
// Inlined into the one caller: the arguments are that caller's registers
// and locals, so a struct to carry them would only rename them.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn read_and_send(
    ctx: &ProbeContext,
    spec: &UsdtSpec,
    event_kind: u8,
    matched: u32,
    opened: depth::Opened,
    name_ptr: u64,
    host: u64,
    name: &mut [u8; NAME_LEN],
) -> Result<(), i32> {
    // Filter first: decide on the name before anything else.
    if bench_stop(usdt_bench::NAME_PTR) {
        return Ok(());
    }
    let verdict = name_matches(name_ptr, name)?;
    if verdict == verdict::NONE {
        depth::entry_unmatched(opened);
        return Ok(());
    }
    if verdict == verdict::PREFIX {
        // User space finishes the glob on the name: a return must be read.
        depth::start_over(opened);
    }

    let file_ptr = read_arg(ctx, &spec.args[ARG_FILENAME])?;
    let mut call = Call {
        kind: event_kind,
        lineno: read_arg(ctx, &spec.args[ARG_LINENO])? as i32,
        flags: 0,
        frame: 0,
        file_ptr: 0,
        name_ptr,
        host,
    };
    if spec.frame.regs[0] != NO_REG && !frame_corrections(ctx, &spec.frame, name_ptr, &mut call) {
        return Ok(());
    }
    bump(matched);
    if usdt_skip(skip_bit::RING) {
        return Ok(());
    }
    call.file_ptr = file_ptr;

    // A return needs no file name: user space pairs it with its entry by
    // `file_ptr` (the same co_filename while the frame runs) and names the
    // call from the entry. One read of the process less (~230 ns here:
    // dense 1,175 ns a record with it, 881 without) and a 128-byte record
    // instead of 320. Read only when user space checks returns by file.
    if event_kind == kind::RETURN && config_value(config::RETURN_FILE) == 0 {
        call.flags |= flag::NO_FILE;
        send_head(&call, name);
        return Ok(());
    }

    let Some(mut entry) = EVENTS.reserve::<CallEvent>(0) else {
        bump(counter::LOST);
        // Not sent: its bit must not say "sent", or its return would go
        // out unread as the close of a record user space never had.
        depth::start_over(opened);
        return Ok(());
    };
    let ev = entry.as_mut_ptr();
    let len = unsafe {
        fill(&raw mut (*ev).head, &call, name);
        if usdt_skip(usdt_bench::FILE) {
            (*ev).file[0] = 0;
            1
        } else {
            read_user_str((*ev).file.as_mut_ptr(), FILE_LEN as u32, file_ptr)
        }
    };
    if len < FILE_LEN as i64 {
        entry.submit(wakeup_flag());
        return Ok(());
    }
    // The name filled the common record: it may be longer. Send it again in
    // a record with room for PATH_MAX (rare; the common record stays small).
    entry.discard(0);
    bump(counter::LONG_FILES);
    let Some(mut entry) = EVENTS.reserve::<LongCallEvent>(0) else {
        bump(counter::LOST);
        depth::start_over(opened);
        return Ok(());
    };
    let ev = entry.as_mut_ptr();
    unsafe {
        call.flags |= flag::LONG;
        fill(&raw mut (*ev).head.head, &call, name);
        // head.file and more are one buffer of LONG_FILE_LEN bytes.
        let len = read_user_str((*ev).head.file.as_mut_ptr(), LONG_FILE_LEN as u32, file_ptr);
        if len >= LONG_FILE_LEN as i64 {
            (*ev).head.head.flags |= flag::FILE_CUT;
        }
    }
    entry.submit(wakeup_flag());
    Ok(())
}

/// What a record says about one probe hit besides its name and file.
struct Call {
    kind: u8,
    lineno: i32,
    flags: u8,
    frame: u64,
    file_ptr: u64,
    name_ptr: u64,
    /// The hitting thread's kernel pid_tgid (bpf_get_current_pid_tgid).
    host: u64,
}

/// Fills a record's fixed fields.
#[inline(always)]
unsafe fn fill(ev: *mut CallHead, call: &Call, name: &[u8; NAME_LEN]) {
    let host = call.host;
    let pid_tgid = pid_tgid_in_ns(host);
    let now = if usdt_skip(skip_bit::CLOCK) { 0 } else { unsafe { bpf_ktime_get_ns() } };
    let cpu = if usdt_skip(skip_bit::CPU) { 0 } else { call_cpu_of(now, host) };
    let rss = if usdt_skip(skip_bit::RSS) { 0 } else { task_rss() };
    unsafe {
        (*ev).ts_ns = now;
        (*ev).pid = (pid_tgid >> 32) as u32;
        (*ev).tid = pid_tgid as u32;
        (*ev).lineno = call.lineno;
        (*ev).kind = call.kind;
        (*ev).flags = call.flags;
        (*ev).agent_event = 0;
        (*ev)._pad = 0;
        (*ev).thread_cpu_ns = cpu;
        (*ev).rss_pages = rss;
        (*ev).frame = call.frame;
        (*ev).file_ptr = call.file_ptr;
        (*ev).name_ptr = call.name_ptr;
        (*ev).name = *name;
    }
}

/// Copies a NUL-terminated string of the traced process into `dest`
/// (`size` bytes); returns the helper's result: bytes written with the NUL
/// (`size` when the string filled the buffer), or a negative error (then
/// `dest` starts with a NUL).
#[inline(always)]
unsafe fn read_user_str(dest: *mut u8, size: u32, src: u64) -> i64 {
    let len = unsafe { bpf_probe_read_user_str(dest.cast(), size, src as *const core::ffi::c_void) };
    if len < 0 {
        unsafe { *dest = 0 };
    }
    len
}

/// The probed frame as read through a [`FrameSpec`].
struct Frame {
    addr: u64,
    code_flags: u32,
    firstlineno: i32,
    owner: u8,
}

/// Applies what the interpreter frame says to `call` (CPython 3.15+):
/// false when the hit must not be sent (a generator being created, or the
/// `__init__` shim frame), each counted. The line -1 of code starting with
/// MAKE_CELL/COPY_FREE_VARS becomes the code's first line.
#[inline(always)]
fn frame_corrections(ctx: &ProbeContext, fs: &FrameSpec, name_ptr: u64, call: &mut Call) -> bool {
    let Some(frame) = find_frame(ctx, fs, name_ptr) else {
        bump(counter::FRAME_UNKNOWN);
        return true;
    };
    if frame.code_flags & fs.shim_flags != 0 {
        bump(counter::SHIM_RETURNS);
        return false;
    }
    if call.kind == kind::ENTRY
        && frame.owner == fs.owner_thread
        && frame.code_flags & fs.generator_flags != 0
    {
        bump(counter::GENERATOR_CREATIONS);
        return false;
    }
    if call.kind == kind::ENTRY && call.lineno == -1 {
        call.lineno = frame.firstlineno;
        call.flags |= flag::LINE_FROM_CODE;
    }
    call.frame = frame.addr;
    call.flags |= flag::FRAME;
    if frame.owner == fs.owner_generator {
        call.flags |= flag::GENERATOR;
    }
    true
}

/// The interpreter frame: the first candidate register whose frame's code
/// object has the probed function's name (the name argument points into
/// that code's `co_name`), so a wrong register is never taken.
#[inline(always)]
fn find_frame(ctx: &ProbeContext, fs: &FrameSpec, name_ptr: u64) -> Option<Frame> {
    let mut i = 0;
    while i < FRAME_REGS {
        let reg = fs.regs[i];
        if reg == NO_REG {
            break;
        }
        if let Some(frame) = read_reg(ctx, reg).ok().and_then(|addr| frame_at(addr, fs, name_ptr)) {
            return Some(frame);
        }
        i += 1;
    }
    None
}

#[inline(always)]
fn frame_at(addr: u64, fs: &FrameSpec, name_ptr: u64) -> Option<Frame> {
    // One window of the frame, then one of its code object (see FrameSpec).
    // Not zeroed first: the zeroing was a call to a byte-by-byte memset
    // that the verifier walked 128 times over on every path reaching it:
    // 16,277 of pftrace_usdt's 78,058 verified instructions (log level 2,
    // issue 13), 64,733 without it. The helper writes the window's `len`
    // bytes, every field read lies inside them (python.rs `frame_spec`
    // sizes the window to the fields), and a failed read reads nothing.
    let mut buf = MaybeUninit::<[u8; FRAME_WINDOW]>::uninit();
    if !read_window(addr.wrapping_add(fs.frame_start as u64), fs.frame_len, &mut buf) {
        return None;
    }
    // A tagged reference: the low bits are flags, code objects are aligned.
    let code = field::<u64>(&buf, fs.frame_executable) & !7;
    let owner = field::<u8>(&buf, fs.frame_owner);
    if !read_window(code.wrapping_add(fs.code_start as u64), fs.code_len, &mut buf) {
        return None;
    }
    let name_obj = field::<u64>(&buf, fs.code_name);
    if name_obj.wrapping_add(fs.ascii_size as u64) != name_ptr {
        return None;
    }
    let code_flags = field::<u32>(&buf, fs.code_flags);
    let firstlineno = field::<i32>(&buf, fs.code_firstlineno);
    Some(Frame { addr, code_flags, firstlineno, owner })
}

/// Copies `len` (1..=FRAME_WINDOW) bytes of the traced process at `at`
/// into `buf`'s first `len` bytes.
#[inline(always)]
fn read_window(at: u64, len: u16, buf: &mut MaybeUninit<[u8; FRAME_WINDOW]>) -> bool {
    let len = len as u32;
    if len == 0 || len > FRAME_WINDOW as u32 {
        return false;
    }
    unsafe { bpf_probe_read_user_raw(buf.as_mut_ptr().cast(), len, at as *const core::ffi::c_void) == 0 }
}

/// A field of a window at `off` (clamped inside the buffer: user space
/// checked the offsets, the verifier wants to see it). The field lies in
/// the bytes the last [`read_window`] wrote (see [`frame_at`]).
#[inline(always)]
fn field<T: Copy>(buf: &MaybeUninit<[u8; FRAME_WINDOW]>, off: u16) -> T {
    let off = (off as usize).min(FRAME_WINDOW - core::mem::size_of::<T>());
    unsafe { core::ptr::read_unaligned(buf.as_ptr().cast::<u8>().add(off).cast::<T>()) }
}

/// Wake the reader only once the ring is filling up (batched draining).
#[inline(always)]
fn wakeup_flag() -> u64 {
    let threshold = global(&WAKEUP_BYTES);
    if usdt_skip(skip_bit::WAKEUP) {
        return BPF_RB_NO_WAKEUP;
    }
    if threshold == 0 {
        return 0;
    }
    if EVENTS.query(BPF_RB_AVAIL_DATA) >= threshold { BPF_RB_FORCE_WAKEUP } else { BPF_RB_NO_WAKEUP }
}

#[inline(always)]
fn global(v: &'static u32) -> u64 {
    unsafe { core::ptr::read_volatile(v) as u64 }
}

/// The current thread's CPU time so far as the scheduler last charged it
/// (at its last tick or switch: 4 ms stale at worst at HZ=250); the
/// fallback of [`call_cpu`]. A direct load through the BTF task pointer
/// (see [`current_task_btf`]): no bpf_probe_read_kernel call.
#[inline(always)]
fn task_cpu() -> u64 {
    let sum_exec = global(&TASK_SUM_EXEC_OFF) as usize;
    if sum_exec == 0 {
        return 0;
    }
    unsafe { btf_load::<u64>(current_task_btf(), sum_exec) }
}

/// The current task as a BTF-typed pointer (bpf_get_current_task_btf, in
/// kprobe/uprobe, raw tracepoint and tp_btf programs alike): loads through
/// it at a constant offset are plain loads the verifier checks against
/// `task_struct` and turns into fault-safe PROBE_MEM loads (a fault reads
/// 0), so a field costs a load instead of a bpf_probe_read_kernel call
/// (~20-30 ns a helper call on this CPU: SRSO safe-RET and retpoline;
/// bpf_probe_read_kernel far more). RSS by two bpf_probe_read_kernel
/// calls (task->mm, the counters' window) cost dense pftrace_usdt ~170 ns
/// a run: bpf_stats net 1,074 -> 899 ns, lower in each of 6 interleaved
/// rounds (verified_insns 78,058 -> 74,911). The offsets are .rodata globals, frozen at load, which the verifier
/// reads as constants (as pftrace_cpu_slot's load of `next->pid`).
#[inline(always)]
fn current_task_btf() -> *const u8 {
    unsafe { aya_ebpf::helpers::generated::bpf_get_current_task_btf() as *const u8 }
}

/// The `T` at `off` bytes into the BTF object at `obj` (a direct load; 0
/// when the object's memory faults).
#[inline(always)]
unsafe fn btf_load<T: Copy>(obj: *const u8, off: usize) -> T {
    unsafe { core::ptr::read_volatile(obj.add(off).cast::<T>()) }
}

/// The current process's resident pages: the sum of the `count`s of
/// mm->rss_stat[MM_FILEPAGES, MM_ANONPAGES, MM_SHMEMPAGES] (each taken at
/// 0 when negative, as the kernel's get_mm_counter), by direct loads
/// through the BTF task pointer (task->mm, then three counters: no helper
/// call but bpf_get_current_task_btf). 0 without an mm or the offsets.
#[inline(always)]
fn task_rss() -> u64 {
    let mm_off = global(&TASK_MM_OFF) as usize;
    if mm_off == 0 {
        return 0;
    }
    let mm = unsafe { btf_load::<*const u8>(current_task_btf(), mm_off) };
    if mm.is_null() {
        return 0;
    }
    let base = global(&MM_RSS_BASE_OFF) as usize;
    let stride = global(&MM_RSS_STRIDE) as usize;
    let mut rss: i64 = 0;
    for idx in [global(&MM_RSS_FILE_IDX), global(&MM_RSS_ANON_IDX), global(&MM_RSS_SHMEM_IDX)] {
        rss += unsafe { btf_load::<i64>(mm, base + idx as usize * stride) }.max(0);
    }
    rss as u64
}

/// One slot of the verdict cache: the verdict on the name at `ptr`, valid
/// while the 16 bytes there still hold `head` (a whole name of at most 15
/// bytes and its NUL) and the names have not changed since (`generation`).
/// A verdict depends only on the name's bytes and the traced names, so that
/// check is the whole of its validity, whichever process the pointer is in
/// (no tgid: it would cost a helper call per hit and decide nothing). A slot
/// is found by a hash of the pointer and checked against pointer, head and
/// generation, so two pointers sharing a slot evict each other (a miss) and
/// never borrow each other's verdict.
#[repr(C)]
#[derive(Clone, Copy)]
struct Verdict {
    /// Even while the slot is stable; odd while its one writer writes it.
    seq: u64,
    /// Writers that want the slot now; only one alone may write (see [`store_verdict`]).
    writers: u64,
    ptr: u64,
    head: [u64; 2],
    generation: u64,
    /// A [`verdict`] value.
    matched: u64,
}

/// log2 of the slots per CPU (8192 slots of 56 bytes: 448 KiB per CPU, less
/// than the 16,384-entry LRU hash it replaced).
const VERDICT_BITS: u32 = 13;

/// Per-pointer verdicts, so most calls are decided by reading 16 bytes and
/// one array slot instead of copying and hashing the whole name. Exact: only
/// names shorter than 16 bytes are cached, and their bytes are compared.
/// A direct-mapped per-CPU array, not a hash map: its lookup is a few
/// instructions the kernel inlines, where the LRU hash's cost ~20 ns per hit
/// (bpf_stats, sparse bench). Per CPU, so only programs on this CPU share a
/// slot; the seqlock in the slot keeps a preempted reader or writer (a
/// uprobe_multi program runs with migration, not preemption, disabled) from
/// ever taking half of one verdict and half of another.
#[map]
static VERDICTS: PerCpuArray<Verdict> = PerCpuArray::with_max_entries(1 << VERDICT_BITS, 0);

/// The slot of a name pointer (Fibonacci hashing: the top bits of the
/// product depend on every bit of the pointer). CPython's strings are
/// 16-byte aligned: without the 4 always-zero bits, 4,000 names of a test
/// took 3,382 distinct slots of 8,192, with them 2,640.
#[inline(always)]
fn verdict_slot(ptr: u64) -> u32 {
    ((ptr >> 4).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - VERDICT_BITS)) as u32
}

/// The verdict cached in `slot` for this name pointer, generation and head;
/// None when the slot holds anything else or was being written.
#[inline(always)]
fn cached_verdict(slot: *const Verdict, ptr: u64, generation: u64, head: [u64; 2]) -> Option<u64> {
    use core::ptr::read_volatile as rd;
    // SAFETY: a valid map value pointer; volatile keeps the loads in order
    // between the two reads of seq (a program on this CPU can only have
    // been preempted between them, never run beside this one).
    unsafe {
        let seq = rd(&raw const (*slot).seq);
        let same = rd(&raw const (*slot).ptr) == ptr
            && rd(&raw const (*slot).generation) == generation
            && rd(&raw const (*slot).head[0]) == head[0]
            && rd(&raw const (*slot).head[1]) == head[1];
        let matched = rd(&raw const (*slot).matched);
        if !same || seq == 0 || seq & 1 != 0 || rd(&raw const (*slot).seq) != seq {
            return None;
        }
        Some(matched)
    }
}

/// Caches a verdict in `slot`, unless another program on this CPU (one this
/// one preempted, or that preempted it) is writing it too: then neither or
/// one writes, never both.
#[inline(always)]
fn store_verdict(slot: *mut Verdict, ptr: u64, generation: u64, head: [u64; 2], matched: u64) {
    use core::ptr::{read_volatile as rd, write_volatile as wr};
    // SAFETY: a valid, aligned map value pointer. The adds are atomic, so
    // each program's count lands: a writer reading 1 back is the only one in
    // the slot until it leaves.
    unsafe {
        let writers = &raw mut (*slot).writers;
        atomic_add(writers, 1);
        if rd(&raw const (*slot).writers) == 1 {
            let seq = rd(&raw const (*slot).seq) & !1;
            wr(&raw mut (*slot).seq, seq + 1);
            wr(&raw mut (*slot).ptr, ptr);
            wr(&raw mut (*slot).generation, generation);
            wr(&raw mut (*slot).head[0], head[0]);
            wr(&raw mut (*slot).head[1], head[1]);
            wr(&raw mut (*slot).matched, matched);
            wr(&raw mut (*slot).seq, seq + 2);
        }
        atomic_add(writers, u64::MAX);
    }
}

/// `*at += v` in one instruction no program can be preempted in the middle of.
#[inline(always)]
unsafe fn atomic_add(at: *mut u64, v: u64) {
    #[cfg(target_arch = "bpf")]
    // SAFETY: the caller's pointer is valid and 8-byte aligned.
    unsafe {
        core::arch::asm!("lock *(u64 *)({0} + 0) += {1}", in(reg) at, in(reg) v, options(nostack));
    }
    #[cfg(not(target_arch = "bpf"))]
    // SAFETY: as above (the host build carries no programs).
    unsafe {
        *at = (*at).wrapping_add(v);
    }
}

/// Bytes of the first read of a name: a name of at most 15 bytes arrives
/// whole with its NUL (the helper's result is then at most 16), a longer
/// one is cut (17).
const HEAD_READ: u32 = 17;

/// What [`name_matches`] says of a name.
mod verdict {
    /// Not traced.
    pub const NONE: u64 = 0;
    /// In the exact name map: traced, decided here.
    pub const EXACT: u64 = 1;
    /// Only a glob's prefix matched: user space checks the rest.
    pub const PREFIX: u64 = 2;
}

/// Whether the name at `ptr` is traced (a [`verdict`]); fills `name`
/// (zeroed by the caller).
/// One string read of at most HEAD_READ bytes into `name` decides most
/// hits: a short name's first 16 bytes are then its whole verdict-cache
/// head (the name and zeros, never bytes past its NUL, so a name ending
/// just before an unmapped page reads too), a cached match needs no copy,
/// and a verdict miss no second read. This read is most of an unmatched
/// hit: ~230 ns of ~300 ns a run (bpf_stats, 2026-11-27, stops placed
/// before and after it with PFTRACE_USDT_BENCH); a 16-byte
/// bpf_probe_read_user cost the same within noise (sparse, 8 interleaved
/// rounds: median 12 ns less with this one, lower in 5 of 8).
#[inline(always)]
fn name_matches(ptr: u64, name: &mut [u8; NAME_LEN]) -> Result<u64, i32> {
    let generation = config_value(config::GENERATION) as u64;
    let n = unsafe {
        bpf_probe_read_user_str(name.as_mut_ptr().cast(), HEAD_READ, ptr as *const core::ffi::c_void)
    };
    if n < 0 {
        return Err(n as i32);
    }
    if bench_stop(usdt_bench::HEAD) {
        return Ok(verdict::NONE);
    }
    let head = (n < HEAD_READ as i64).then(|| unsafe {
        let words = name.as_ptr() as *const u64;
        [words.read_unaligned(), words.add(1).read_unaligned()]
    });
    let slot = VERDICTS.get_ptr_mut(verdict_slot(ptr));
    if let (Some(head), Some(slot)) = (head, slot)
        && let Some(matched) = cached_verdict(slot, ptr, generation, head)
    {
        bump(counter::VERDICT_HITS);
        return Ok(matched);
    }
    let len = if head.is_some() {
        // Whole already: its length without the NUL.
        (n - 1) as usize
    } else {
        unsafe { bpf_probe_read_user_str_bytes(ptr as *const u8, name) }?.len()
    };
    // A name filling the buffer may have been cut short: user space traces
    // names of at most NAME_LEN - 2 bytes, so such a name is never a match.
    let matched = if len >= NAME_LEN - 1 {
        verdict::NONE
    } else if unsafe { NAMES.get(&*name) }.is_some() {
        verdict::EXACT
    } else if prefix_match(name) {
        verdict::PREFIX
    } else {
        verdict::NONE
    };
    if let (Some(head), Some(slot)) = (head, slot) {
        store_verdict(slot, ptr, generation, head, matched);
    }
    Ok(matched)
}

/// Whether a glob prefix matches `name` (only when globs are traced).
#[inline(always)]
fn prefix_match(name: &[u8; NAME_LEN]) -> bool {
    if config_value(config::HAS_PREFIXES) == 0 {
        return false;
    }
    let key = Key::new((NAME_LEN * 8) as u32, *name);
    PREFIXES.get(&key).is_some()
}

#[inline(always)]
fn config_value(index: u32) -> u32 {
    CONFIG.get(index).copied().unwrap_or(0)
}

/// A report of the in-process agent through its probe function (a uprobe on
/// a 5-byte nop, attached to the agent's shared object for all processes):
/// rdi = event, rsi = name (0: no strings), rdx = file, rcx = line, r8 =
/// code id (pftrace_common::agent::PROBE_SYMBOL).
#[uprobe]
pub fn pftrace_agent_uprobe(ctx: ProbeContext) -> u32 {
    let event: u64 = ctx.arg(0).unwrap_or(0);
    let name: u64 = ctx.arg(1).unwrap_or(0);
    let file: u64 = ctx.arg(2).unwrap_or(0);
    let line: u64 = ctx.arg(3).unwrap_or(0);
    let code: u64 = ctx.arg(4).unwrap_or(0);
    agent_report(event, name, file, line, code);
    0
}

/// A report of the in-process agent through its syscall
/// (pftrace_common::agent::SYSCALL_NR), seen on every syscall of the host
/// while attached: anything else returns at the first test (+10-13 ns a
/// syscall with an empty program here; pftraced attaches it only while an
/// agent reports this way). Arguments from the syscall's registers:
/// rdi = event, rsi = name, rdx = file, r10 = line, r8 = code id, r9 =
/// this daemon's token (another pftraced's agents carry theirs: not ours,
/// not counted).
#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn pftrace_agent_syscall(ctx: RawTracePointContext) -> i32 {
    let id: u64 = ctx.arg(1);
    if id != agent::SYSCALL_NR {
        return 0;
    }
    let regs: u64 = ctx.arg(0);
    // struct pt_regs on x86-64 from r10 (offset 56): r10, r9, r8, ax, cx,
    // dx, si, di; one read of the eight words.
    let Ok(r) = (unsafe { bpf_probe_read_kernel((regs as usize + 56) as *const [u64; 8]) }) else {
        bump(counter::AGENT_BAD);
        return 0;
    };
    // SAFETY: a plain load of a load-time constant.
    if r[1] != unsafe { core::ptr::read_volatile(&AGENT_TOKEN) } {
        return 0;
    }
    agent_report(r[7], r[6], r[5], r[0], r[2]);
    0
}

/// The syscall road as a BTF raw tracepoint (tp_btf): the same report, the
/// registers read with direct loads (the verifier knows `struct pt_regs`)
/// instead of bpf_probe_read_kernel. Measured beside the raw tracepoint.
#[btf_tracepoint(function = "sys_enter")]
pub fn pftrace_agent_syscall_btf(ctx: BtfTracePointContext) -> i32 {
    let id: u64 = ctx.arg(1);
    if id != agent::SYSCALL_NR {
        return 0;
    }
    let regs: *const u64 = ctx.arg(0);
    // struct pt_regs on x86-64: r10 at word 7, then r9, r8, ax, cx, dx, si, di.
    let r = |i: usize| unsafe { core::ptr::read_volatile(regs.add(7 + i)) };
    // SAFETY: a plain load of a load-time constant.
    if r(1) != unsafe { core::ptr::read_volatile(&AGENT_TOKEN) } {
        return 0;
    }
    agent_report(r(7), r(6), r(5), r(0), r(2));
    0
}

/// Benchmark floor of the syscall road: the same attachment, returning at
/// once (what the tracepoint itself costs every syscall).
#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn pftrace_agent_syscall_floor(_ctx: RawTracePointContext) -> i32 {
    0
}

/// One agent report: only processes pftraced accepted (TRACKED, which also
/// holds their forked children) may report, and pid and tid come from the
/// kernel; the name and file are the process's own word about its own calls.
/// A report without strings (name_ptr 0: pftraced has them from this code
/// object's first report of the session) is a 48-byte AgentEvent; one with
/// them an AgentNamedEvent (or AgentLongNamedEvent), reserved only then.
#[inline(always)]
fn agent_report(event_arg: u64, name_ptr: u64, file_ptr: u64, line: u64, code: u64) {
    use pftrace_common::task_layout::bench_skip;
    let skip = global(&AGENT_BENCH_SKIP);
    let pid_tgid = current_pid_tgid();
    if skip & bench_skip::TRACKED as u64 == 0 && unsafe { TRACKED.get(&((pid_tgid >> 32) as u32)) }.is_none()
    {
        bump(counter::AGENT_FOREIGN);
        return;
    }
    if global(&AGENT_BATCH) != 0 && event_arg & agent::BATCH != 0 {
        // name_ptr: the calling thread's buffer.
        agent_batch_report(pid_tgid, event_arg, name_ptr);
        return;
    }
    let event = event_arg & 0xff;
    let one_call = if global(&AGENT_ONE_CALL) != 0 { agent::ONE_CALL } else { 0 };
    if event == 0 || event > agent::LAST as u64 || event_arg & !(0xff | agent::NEW_SESSION | one_call) != 0 {
        bump(counter::AGENT_BAD);
        return;
    }
    bump(counter::AGENT_REPORTS);
    if skip & bench_skip::RING as u64 != 0 {
        return;
    }
    if event_arg & one_call != 0 {
        // name_ptr, file_ptr: the start's clock and CPU (user space's word).
        agent_call(pid_tgid, event as u8, name_ptr, file_ptr, line, code);
        return;
    }
    let session = if event_arg & agent::NEW_SESSION != 0 { agent::flag::SESSION } else { 0 };
    if global(&AGENT_STRINGS) != 0 && name_ptr != 0 {
        agent_named(pid_tgid, event as u8, session, name_ptr, file_ptr, line, code, skip);
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<AgentEvent>(0) else {
        bump(counter::LOST);
        return;
    };
    unsafe { agent_head(entry.as_mut_ptr(), pid_tgid, event as u8, session, line, code, skip) };
    entry.submit(agent_wakeup(skip));
}

/// A report with the code object's strings: the 304-byte AgentNamedEvent,
/// or, when the file name fills its FILE_LEN bytes, the record discarded and
/// sent again as an AgentLongNamedEvent with room for PATH_MAX (counted as
/// LONG_FILES, as USDT records are).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn agent_named(
    pid_tgid: u64,
    event: u8,
    session: u8,
    name_ptr: u64,
    file_ptr: u64,
    line: u64,
    code: u64,
    skip: u64,
) {
    let flags = agent::flag::STRINGS | session;
    let Some(mut entry) = EVENTS.reserve::<AgentNamedEvent>(0) else {
        bump(counter::LOST);
        return;
    };
    let ev = entry.as_mut_ptr();
    let len = unsafe {
        read_user_str((*ev).name.as_mut_ptr(), NAME_LEN as u32, name_ptr);
        read_user_str((*ev).file.as_mut_ptr(), FILE_LEN as u32, file_ptr)
    };
    if len < FILE_LEN as i64 {
        unsafe { agent_head(&raw mut (*ev).head, pid_tgid, event, flags, line, code, skip) };
        entry.submit(agent_wakeup(skip));
        return;
    }
    entry.discard(0);
    bump(counter::LONG_FILES);
    let Some(mut entry) = EVENTS.reserve::<AgentLongNamedEvent>(0) else {
        bump(counter::LOST);
        return;
    };
    let ev = entry.as_mut_ptr();
    unsafe {
        let mut flags = flags | agent::flag::LONG;
        read_user_str((*ev).head.name.as_mut_ptr(), NAME_LEN as u32, name_ptr);
        // head.file and more are one buffer of LONG_FILE_LEN bytes.
        if read_user_str((*ev).head.file.as_mut_ptr(), LONG_FILE_LEN as u32, file_ptr) >= LONG_FILE_LEN as i64
        {
            flags |= agent::flag::FILE_CUT;
        }
        agent_head(&raw mut (*ev).head.head, pid_tgid, event, flags, line, code, skip);
    }
    entry.submit(agent_wakeup(skip));
}

/// Fills the common part of an agent record.
#[inline(always)]
unsafe fn agent_head(
    ev: *mut AgentEvent,
    pid_tgid: u64,
    event: u8,
    flags: u8,
    line: u64,
    code: u64,
    skip: u64,
) {
    use pftrace_common::task_layout::bench_skip;
    unsafe {
        let now = if skip & bench_skip::CLOCK as u64 == 0 { bpf_ktime_get_ns() } else { 0 };
        (*ev).ts_ns = now;
        (*ev).pid = (pid_tgid >> 32) as u32;
        (*ev).tid = pid_tgid as u32;
        (*ev).lineno = line as i32;
        (*ev).kind = kind::AGENT;
        (*ev).event = event;
        (*ev).flags = flags;
        (*ev)._pad = 0;
        (*ev).code = code;
        // Without the clock (a benchmark of its cost) the slot cannot serve.
        let cpu = || if now != 0 { call_cpu(now) } else { task_cpu() };
        let (cpu, rss) = match skip & (bench_skip::CPU | bench_skip::RSS) as u64 {
            0 => (cpu(), task_rss()),
            s if s == bench_skip::RSS as u64 => (cpu(), 0),
            _ => (0, 0),
        };
        (*ev).thread_cpu_ns = cpu;
        (*ev).rss_pages = rss;
    }
}

/// Prototype (issue 12): a whole call in one record, at its end. The start
/// (clock and thread CPU) was measured by the agent in user space from its
/// thread's CpuSlot; the end is the kernel's: clock, CPU from the same slot
/// (to the ns, not the scheduler's last tick), RSS at the end only.
#[inline(always)]
fn agent_call(pid_tgid: u64, event: u8, entry_ts: u64, entry_cpu: u64, line: u64, code: u64) {
    if agent::is_entry(event) {
        bump(counter::AGENT_BAD);
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<AgentCallEvent>(0) else {
        bump(counter::LOST);
        return;
    };
    let ev = entry.as_mut_ptr();
    let now = unsafe { bpf_ktime_get_ns() };
    let cpu = call_cpu(now);
    unsafe {
        (*ev).head.ts_ns = now;
        (*ev).head.pid = (pid_tgid >> 32) as u32;
        (*ev).head.tid = pid_tgid as u32;
        (*ev).head.lineno = line as i32;
        (*ev).head.kind = kind::AGENT;
        (*ev).head.event = event;
        (*ev).head.flags = agent::flag::CALL;
        (*ev).head._pad = 0;
        (*ev).head.code = code;
        (*ev).head.thread_cpu_ns = cpu;
        (*ev).head.rss_pages = task_rss();
        (*ev).entry_ts_ns = entry_ts;
        (*ev).entry_cpu_ns = entry_cpu;
    }
    entry.submit(wakeup_flag());
}

/// The running thread `tid`'s CPU time at `now` from its slot: the sum at
/// its last switch-in plus the time since. None: no valid slot.
#[inline(always)]
fn slot_cpu(tid: u32, now: u64) -> Option<u64> {
    let row = CPU_SLOT_ROWS.get_ptr_mut(tid & (MAX_CPU_SLOT_ROWS - 1))?;
    // SAFETY: a valid, aligned map value, read and written whole.
    let cached = unsafe { core::ptr::read_volatile(row) };
    if (cached >> 32) as u32 == tid
        && let Some(cpu) = slot_cpu_at(cached as u32, tid, now)
    {
        return Some(cpu);
    }
    let idx = *unsafe { SLOT_OF.get(&tid) }?;
    unsafe { core::ptr::write_volatile(row, slot_row(tid, idx)) };
    slot_cpu_at(idx, tid, now)
}

/// A CPU_SLOT_ROWS row saying thread `tid` holds slot `idx`.
#[inline(always)]
fn slot_row(tid: u32, idx: u32) -> u64 {
    ((tid as u64) << 32) | idx as u64
}

/// [`slot_cpu`] from slot `idx`, if it holds thread `tid`'s figures.
#[inline(always)]
fn slot_cpu_at(idx: u32, tid: u32, now: u64) -> Option<u64> {
    let slot = CPU_SLOTS.get_ptr(idx)?;
    unsafe {
        let seq = core::ptr::read_volatile(&raw const (*slot).seq);
        let sum = core::ptr::read_volatile(&raw const (*slot).sum_exec_ns);
        let t_in = core::ptr::read_volatile(&raw const (*slot).t_in_ns);
        if core::ptr::read_volatile(&raw const (*slot).tid) != tid || seq & 1 != 0 || seq == 0 {
            return None;
        }
        Some(sum + now.saturating_sub(t_in))
    }
}

/// The current thread's CPU time at `now` (bpf_ktime_get_ns): from its slot
/// to the ns; else the scheduler's last charge, counted in CPU_COARSE (a
/// thread older than the attachment, not switched in since it took its
/// slot, which it takes now; or no slot was free).
#[inline(always)]
fn call_cpu(now: u64) -> u64 {
    call_cpu_of(now, bpf_get_current_pid_tgid())
}

/// [`call_cpu`] with the current thread's kernel pid_tgid already read
/// (one helper call less a record: a helper call and its return cost
/// ~20-30 ns here, the kernel's returns going through the SRSO safe-RET thunk).
#[inline(always)]
fn call_cpu_of(now: u64, host_pid_tgid: u64) -> u64 {
    let tid = host_pid_tgid as u32;
    if let Some(cpu) = slot_cpu(tid, now) {
        return cpu;
    }
    bump(counter::CPU_COARSE);
    if global(&CPU_SLOT_ALLOC) != 0 && unsafe { SLOT_OF.get(&tid) }.is_none() {
        claim_cpu_slot(tid, (host_pid_tgid >> 32) as u32);
    }
    task_cpu()
}

/// Gives kernel thread `tid` of process `tgid` a free CPU slot (valid from
/// its next switch-in on), within the process's share: counted in
/// CPU_SLOTS_PROCESS_FULL when its threads hold CPU_SLOTS_PER_PROCESS
/// already, in CPU_SLOTS_FULL when no slot is free.
#[inline(always)]
fn claim_cpu_slot(tid: u32, tgid: u32) {
    let Some(held) = slots_held(tgid) else {
        bump(counter::CPU_SLOTS_FULL);
        return;
    };
    // Add, then look: two threads of one process on two CPUs both count
    // themselves before either decides, so the threads that keep a slot
    // never exceed the share (a race can only turn one away that would
    // have fitted: counted, and its next call claims again).
    unsafe { atomic_add(held, 1) };
    if unsafe { core::ptr::read_volatile(held) } > global(&CPU_SLOTS_PER_PROCESS) {
        unsafe { atomic_add(held, u64::MAX) };
        bump(counter::CPU_SLOTS_PROCESS_FULL);
        return;
    }
    let Ok(Some(idx)) = FREE_SLOTS.pop() else {
        unsafe { atomic_add(held, u64::MAX) };
        bump(counter::CPU_SLOTS_FULL);
        return;
    };
    let Some(owner) = SLOT_TGID.get_ptr_mut(idx) else {
        unsafe { atomic_add(held, u64::MAX) };
        let _ = FREE_SLOTS.push(&idx, 0);
        return;
    };
    unsafe { *owner = tgid };
    // BPF_NOEXIST: a thread claims only for itself or, at its creation,
    // its creator for it; should both race, the loser's slot goes back.
    if SLOT_OF.insert(&tid, &idx, BPF_NOEXIST).is_err() {
        unsafe { atomic_add(held, u64::MAX) };
        let _ = FREE_SLOTS.push(&idx, 0);
        return;
    }
    bump(counter::CPU_SLOTS_TAKEN);
}

/// Process `tgid`'s count of slots held (made at 0 on its first claim);
/// None when SLOTS_HELD is full (as many live processes hold slots as
/// there are slots: none would be free anyway).
#[inline(always)]
fn slots_held(tgid: u32) -> Option<*mut u64> {
    if let Some(held) = SLOTS_HELD.get_ptr_mut(&tgid) {
        return Some(held);
    }
    // On the stack: a literal `&0` becomes a constant of .rodata, which the
    // linker merged with another zero there, a load-time global (the agent
    // token: every process's tally started at it, and every claim failed).
    let mut zero = 0u64;
    unsafe { core::ptr::write_volatile(&mut zero, 0) };
    // BPF_NOEXIST: two threads of a new process may both get here; the
    // second insert fails and both take the first one's entry.
    if SLOTS_HELD.insert(&tgid, &zero, BPF_NOEXIST).is_ok() {
        bump(counter::CPU_SLOT_PROCESSES);
    }
    SLOTS_HELD.get_ptr_mut(&tgid)
}

/// A thread exits: its slot (if any) is cleared (tid 0, so no reader takes
/// its figures for a later thread's) and goes back to the free list.
#[inline(always)]
fn release_cpu_slot(tid: u32) {
    let Some(idx) = (unsafe { SLOT_OF.get(&tid) }).copied() else {
        return;
    };
    if SLOT_OF.remove(&tid).is_err() {
        return;
    }
    if let Some(row) = CPU_SLOT_ROWS.get_ptr_mut(tid & (MAX_CPU_SLOT_ROWS - 1)) {
        // SAFETY: as in [`slot_cpu`]. Another thread's row is left alone.
        unsafe {
            if core::ptr::read_volatile(row) == slot_row(tid, idx) {
                core::ptr::write_volatile(row, 0);
            }
        }
    }
    if let Some(slot) = CPU_SLOTS.get_ptr_mut(idx) {
        unsafe {
            let seq = core::ptr::read_volatile(&raw const (*slot).seq);
            core::ptr::write_volatile(&raw mut (*slot).seq, seq | 1);
            core::ptr::write_volatile(&raw mut (*slot).tid, 0);
            core::ptr::write_volatile(&raw mut (*slot).seq, (seq | 1).wrapping_add(1));
        }
    }
    // Given back to the process charged at the claim (an exec changes the
    // tid of a thread, never its process). Its entry may be gone already:
    // the group's last thread to exit can remove it first (pftrace_exit).
    if let Some(&tgid) = SLOT_TGID.get(idx)
        && let Some(held) = SLOTS_HELD.get_ptr_mut(&tgid)
    {
        unsafe { atomic_add(held, u64::MAX) };
    }
    let _ = FREE_SLOTS.push(&idx, 0);
    bump(counter::CPU_SLOTS_RETURNED);
}

/// The current thread exits: when it was the last of its thread group
/// (`signal->live`, decremented before sched_process_exit fires, now 0),
/// forget the group's count of slots. No thread of the group can claim
/// any more: claims are made by a live thread of the group (its own call,
/// or its fork of a new thread); a thread of the group exiting meanwhile
/// finds the entry gone and gives its slot back to the free list alone.
#[inline(always)]
fn forget_dead_group(tgid: u32) {
    if unsafe { SLOTS_HELD.get(&tgid) }.is_some()
        && group_live() == Some(0)
        && SLOTS_HELD.remove(&tgid).is_ok()
    {
        bump(counter::CPU_SLOT_PROCESSES_GONE);
    }
}

/// The current thread's group's live threads (`signal->live`: at
/// sched_process_exit already without the exiting one); None without the
/// kernel offsets.
#[inline(always)]
fn group_live() -> Option<i32> {
    let (signal_off, live_off) = (global(&TASK_SIGNAL_OFF) as usize, global(&SIGNAL_LIVE_OFF) as usize);
    if signal_off == 0 || live_off == 0 {
        return None;
    }
    let task = unsafe { bpf_get_current_task() } as usize;
    let signal = read_kernel::<usize>(task + signal_off)?;
    read_kernel::<i32>(signal + live_off)
}

const BPF_NOEXIST: u64 = 1;

/// At every context switch of the host, when the
/// thread switched in has a slot (SLOT_OF), write its slot: the
/// scheduler's sum of its run time (exact at a switch-in: charged when it
/// last went off the CPU) and the clock now. Unregistered threads cost one
/// hash lookup (measured with bpf_stats: README.md, "Per-call figures").
#[btf_tracepoint(function = "sched_switch")]
pub fn pftrace_cpu_slot(ctx: BtfTracePointContext) -> i32 {
    // sched_switch(bool preempt, struct task_struct *prev, struct task_struct *next, ...)
    let next: *const u8 = ctx.arg(2);
    let (pid_off, sum_off) = (global(&TASK_PID_OFF) as usize, global(&TASK_SUM_EXEC_OFF) as usize);
    if pid_off == 0 || sum_off == 0 {
        return 0;
    }
    // A direct load: `next` is a BTF pointer and the offset a load-time
    // constant, so the verifier checks it against task_struct (no helper
    // call on the path every context switch of the host takes).
    let tid = unsafe { core::ptr::read_volatile(next.add(pid_off) as *const u32) };
    let next = next as usize;
    let Some(idx) = (unsafe { SLOT_OF.get(&tid) }) else {
        return 0;
    };
    let Some(slot) = CPU_SLOTS.get_ptr_mut(*idx) else {
        return 0;
    };
    let sum = read_kernel::<u64>(next + sum_off).unwrap_or(0);
    let now = unsafe { bpf_ktime_get_ns() };
    unsafe {
        let seq = core::ptr::read_volatile(&raw const (*slot).seq);
        core::ptr::write_volatile(&raw mut (*slot).seq, seq | 1);
        core::ptr::write_volatile(&raw mut (*slot).sum_exec_ns, sum);
        core::ptr::write_volatile(&raw mut (*slot).t_in_ns, now);
        core::ptr::write_volatile(&raw mut (*slot).tid, tid);
        core::ptr::write_volatile(&raw mut (*slot).seq, (seq | 1).wrapping_add(1));
    }
    0
}

/// Prototype (issue 12, batched): a thread's drain report (its buffer full,
/// or its oldest record older than the agent's bound). The kernel keeps the
/// tail per tid: `agent::BATCH_FIRST` (a new thread, a forked child's
/// thread) starts it at 0; a drain of a thread it has no entry for (evicted)
/// or of another buffer, without that flag, starts at the buffer's head:
/// what it held is skipped, and counted (UNKNOWN), never sent twice.
#[inline(always)]
fn agent_batch_report(pid_tgid: u64, event_arg: u64, addr: u64) {
    if event_arg & !(agent::BATCH | agent::BATCH_FIRST) != 0 || addr == 0 {
        bump(counter::AGENT_BAD);
        return;
    }
    let key = bpf_get_current_pid_tgid() as u32;
    let first = event_arg & agent::BATCH_FIRST != 0;
    let existing = BATCH_OF.get_ptr_mut(&key);
    // Disarmed by an execve that failed (the thread goes on with its buffer,
    // drained at the execve): armed again at its head, nothing skipped.
    let disarmed = existing.is_some_and(|s| unsafe { (*s).addr } == 0);
    let state = match existing.filter(|s| !first && unsafe { (**s).addr } == addr) {
        Some(s) => s,
        None => {
            let tail = if first {
                0
            } else {
                if !disarmed {
                    batch_bump(batch::counter::UNKNOWN, 1);
                }
                match unsafe { bpf_probe_read_user(addr as *const u64) } {
                    Ok(head) => head,
                    Err(_) => {
                        batch_bump(batch::counter::UNREAD, 1);
                        return;
                    }
                }
            };
            if BATCH_OF.insert(&key, &BatchTail { addr, tail }, 0).is_err() {
                bump(counter::AGENT_BAD);
                return;
            }
            let Some(s) = BATCH_OF.get_ptr_mut(&key) else { return };
            s
        }
    };
    batch_drain(state, pid_tgid, batch::SYSCALL);
}

/// What a drain did.
#[derive(PartialEq, Eq)]
enum Drained {
    /// Nothing to drain, or the records are on the ring.
    Done,
    /// The ring had no room (counted; the records stay in the buffer).
    RingFull,
    /// The agent's memory could not be read (counted; the records stay).
    Unread,
}

/// Puts the records of the current thread's buffer past its tail on the
/// ring, as one AgentBatchEvent (one read of the whole buffer), with pid and
/// tid from the kernel and RSS now. The current thread must be the buffer's
/// (its own syscall, its switch-out, its exit): bpf_probe_read_user reads
/// the current process's memory, never faults a page in, and so fails
/// rather than sleeps on a page that is not resident.
#[inline(always)]
fn batch_drain(state: *mut BatchTail, pid_tgid: u64, why: u32) -> Drained {
    let (addr, mut tail) = unsafe { ((*state).addr, (*state).tail) };
    if addr == 0 {
        return Drained::Done; // disarmed at an execve
    }
    let Ok(head) = (unsafe { bpf_probe_read_user(addr as *const u64) }) else {
        batch_bump(batch::counter::UNREAD, 1);
        return Drained::Unread;
    };
    if head == tail {
        return Drained::Done;
    }
    if head < tail {
        // Not a buffer this tail belongs to (the agent never moves head
        // back without BATCH_FIRST): start again at its head, counted.
        batch_bump(batch::counter::UNKNOWN, 1);
        unsafe { (*state).tail = head };
        return Drained::Done;
    }
    let mut n = head - tail;
    // More than the buffer holds: the agent wrote over records the kernel
    // had not taken (a drain that found the ring full or the memory
    // unreadable); counted once they are passed over, below.
    let overrun = n.saturating_sub(BATCH_LEN as u64);
    if overrun > 0 {
        tail = head - BATCH_LEN as u64;
        n = BATCH_LEN as u64;
    }
    let Some(mut entry) = EVENTS.reserve::<AgentBatchEvent>(0) else {
        batch_bump(batch::counter::LOST, 1);
        return Drained::RingFull;
    };
    let ev = entry.as_mut_ptr();
    let rc = unsafe {
        bpf_probe_read_user_raw(
            (&raw mut (*ev).records).cast(),
            (BATCH_LEN * size_of::<pftrace_common::BatchRecord>()) as u32,
            (addr + core::mem::offset_of!(pftrace_common::BatchBuf, records) as u64) as *const _,
        )
    };
    if rc != 0 {
        entry.discard(0);
        batch_bump(batch::counter::UNREAD, 1);
        return Drained::Unread;
    }
    unsafe {
        (*ev).head.ts_ns = bpf_ktime_get_ns();
        (*ev).head.pid = (pid_tgid >> 32) as u32;
        (*ev).head.tid = pid_tgid as u32;
        (*ev).head.lineno = 0;
        (*ev).head.kind = kind::AGENT;
        (*ev).head.event = 0;
        (*ev).head.flags = agent::flag::BATCH;
        (*ev).head._pad = 0;
        (*ev).head.code = 0;
        (*ev).head.thread_cpu_ns = 0;
        (*ev).head.rss_pages = task_rss();
        (*ev).tail = tail;
        (*ev).count = n as u32;
        (*ev).why = why;
        (*state).tail = head;
    }
    entry.submit(wakeup_flag());
    batch_bump(batch::counter::DRAINS, 1);
    batch_bump(batch::counter::RECORDS, n);
    if overrun > 0 {
        batch_bump(batch::counter::OVERRUN, overrun);
    }
    batch_bump(
        match why {
            batch::SWITCH => batch::counter::BY_SWITCH,
            batch::EXIT => batch::counter::BY_EXIT,
            batch::EXEC => batch::counter::BY_EXEC,
            _ => batch::counter::BY_SYSCALL,
        },
        1,
    );
    Drained::Done
}

#[inline(always)]
fn batch_bump(index: u32, v: u64) {
    if let Some(c) = BATCH_COUNTERS.get_ptr_mut(index) {
        unsafe { *c += v };
    }
}

/// Prototype (issue 12, batched): at a switch-out of a thread with a
/// buffer (BATCH_OF), drain it. Every context switch of the host looks the
/// thread switched out up; current is still that thread here (the
/// tracepoint runs before the switch), so its memory is the one read.
#[btf_tracepoint(function = "sched_switch")]
pub fn pftrace_agent_batch_switch(ctx: BtfTracePointContext) -> i32 {
    // sched_switch(bool preempt, struct task_struct *prev, struct task_struct *next, ...)
    let prev: *const u8 = ctx.arg(1);
    let pid_off = global(&TASK_PID_OFF) as usize;
    if pid_off == 0 {
        return 0;
    }
    // A direct load (see pftrace_cpu_slot).
    let tid = unsafe { core::ptr::read_volatile(prev.add(pid_off) as *const u32) };
    let Some(state) = BATCH_OF.get_ptr_mut(&tid) else {
        return 0;
    };
    batch_drain(state, current_pid_tgid(), batch::SWITCH);
    0
}

/// Prototype (issue 12, batched): a thread with a buffer exits (its own
/// exit, exit_group from another thread, a fatal signal: each thread runs
/// do_exit): drain what it holds and forget it. The tracepoint fires
/// before the thread's memory is released (exit_mm), on 6.18.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn pftrace_agent_batch_exit(_ctx: RawTracePointContext) -> i32 {
    let key = bpf_get_current_pid_tgid() as u32;
    let Some(state) = BATCH_OF.get_ptr_mut(&key) else {
        return 0;
    };
    if batch_drain(state, current_pid_tgid(), batch::EXIT) == Drained::Unread {
        batch_bump(batch::counter::EXIT_UNREAD, 1);
    }
    let _ = BATCH_OF.remove(&key);
    0
}

/// Prototype (issue 12, batched): a thread with a buffer calls execve or
/// execveat: drain it while its memory is still the image it describes, and
/// disarm its entry (addr 0): if the exec succeeds nothing of the new image
/// is read as a buffer (its agent, if any, registers anew); if it fails the
/// thread's next drain report arms it again.
#[btf_tracepoint(function = "sys_enter")]
pub fn pftrace_agent_batch_exec(ctx: BtfTracePointContext) -> i32 {
    const EXECVE: u64 = 59;
    const EXECVEAT: u64 = 322;
    let id: u64 = ctx.arg(1);
    if id != EXECVE && id != EXECVEAT {
        return 0;
    }
    let key = bpf_get_current_pid_tgid() as u32;
    let Some(state) = BATCH_OF.get_ptr_mut(&key) else {
        return 0;
    };
    if batch_drain(state, current_pid_tgid(), batch::EXEC) == Drained::Unread {
        batch_bump(batch::counter::EXIT_UNREAD, 1);
    }
    unsafe { (*state).addr = 0 };
    0
}

/// An exec by a thread other than the group leader takes the leader's tid
/// (de_thread); the slot under its old tid (sched_process_exec's old_pid)
/// would stay in SLOT_OF, charged to the process, until that tid exited
/// again. It is given back, and the thread under its new tid gets one
/// (exact from its next switch-in).
#[inline(always)]
fn exec_moves_slot(ctx: &RawTracePointContext) {
    // sched_process_exec(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)
    let old: u64 = ctx.arg(1);
    let host = bpf_get_current_pid_tgid();
    let (old, tid) = (old as u32, host as u32);
    if old == tid || unsafe { SLOT_OF.get(&old) }.is_none() {
        return;
    }
    release_cpu_slot(old);
    claim_cpu_slot(tid, (host >> 32) as u32);
}

#[inline(always)]
fn agent_wakeup(skip: u64) -> u64 {
    if skip & pftrace_common::task_layout::bench_skip::WAKEUP as u64 != 0 {
        BPF_RB_NO_WAKEUP
    } else {
        wakeup_flag()
    }
}

/// A process called execve: report it when it is in scope (every process,
/// or one under a watched cgroup), so user space can attach to it.
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn pftrace_exec(ctx: RawTracePointContext) -> i32 {
    // The old image's frames are gone; the thread keeps its tid, or takes
    // the main thread's (old_pid, arg 1, is the kernel's tid it had).
    depth::forget(bpf_get_current_pid_tgid() as u32);
    depth::forget(ctx.arg::<u64>(1) as u32);
    if global(&CPU_SLOT_ALLOC) != 0 {
        exec_moves_slot(&ctx);
    }
    let mode = config_value(config::EXEC_MODE);
    let pid_tgid = current_pid_tgid();
    if pid_tgid == 0 {
        return 0; // outside pftraced's PID namespace
    }
    let tracked = unsafe { TRACKED.get(&((pid_tgid >> 32) as u32)) }.is_some();
    let in_scope =
        tracked || mode == config::EXEC_ALL || (mode == config::EXEC_CGROUPS && under_watched_cgroup());
    if !in_scope {
        return 0;
    }
    if !tracked && global(&SCOPE_FILTER) != 0 {
        // Host-wide probes already fire in this process: trace it from its
        // first instruction, before user space has even seen it.
        let _ = TRACKED.insert(&((pid_tgid >> 32) as u32), &1, 0);
    }
    bump(counter::EXECS);
    let Some(mut entry) = EVENTS.reserve::<ProcEvent>(0) else {
        bump(counter::EXEC_LOST);
        warn!(
            &ctx,
            "the event ring was full: the exec of pid {} was not reported, so it will not be traced \
             (exec_lost counts these)",
            (pid_tgid >> 32) as u32
        );
        return 0;
    };
    entry.write(ProcEvent {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        // sched_process_exec(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)
        parent: ctx.arg::<u64>(1) as u32,
        kind: kind::EXEC,
        _pad: [0; 3],
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
    });
    // New processes are rare and urgent: wake the reader now.
    entry.submit(BPF_RB_FORCE_WAKEUP);
    0
}

/// A thread exited: its CPU slot is freed; when it is the last thread of a tracked process, report
/// the exit (in ring order, before anything of a process that reuses the
/// pid) and forget the process.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn pftrace_exit(ctx: RawTracePointContext) -> i32 {
    depth::forget(bpf_get_current_pid_tgid() as u32);
    if global(&CPU_SLOT_ALLOC) != 0 {
        let host = bpf_get_current_pid_tgid();
        release_cpu_slot(host as u32);
        forget_dead_group((host >> 32) as u32);
    }
    let pid_tgid = current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if unsafe { TRACKED.get(&tgid) }.is_none() {
        return 0;
    }
    // The process ends with its last thread, not its main one: when a
    // thread other than the main one execs, the main thread exits first
    // (de_thread) while the process goes on under its pid (reported as its
    // end, the exec went unseen and the new image untraced: 0 of 10 calls).
    // Without the offsets, the main thread's exit, as before.
    let ended = match group_live() {
        Some(live) => live == 0,
        None => tgid == pid_tgid as u32,
    };
    // Two last threads exiting at once on two CPUs both read live 0: the
    // one that removes the process reports it.
    if !ended || TRACKED.remove(&tgid).is_err() {
        return 0;
    }
    let Some(mut entry) = EVENTS.reserve::<ProcEvent>(0) else {
        bump(counter::EXIT_LOST);
        warn!(
            &ctx,
            "the event ring was full: the exit of traced pid {} was not reported; its open calls are \
             closed when pftraced sees it gone (exit_lost counts these)",
            tgid
        );
        return 0;
    };
    entry.write(ProcEvent {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        pid: tgid,
        tid: tgid,
        parent: 0,
        kind: kind::EXIT,
        _pad: [0; 3],
        cgroup_id: 0,
    });
    entry.submit(wakeup_flag());
    0
}

/// A traced process forked: report the new process (not new threads) so
/// user space attaches to it too; every new thread of it gets a CPU slot.
#[raw_tracepoint(tracepoint = "sched_process_fork")]
pub fn pftrace_fork(ctx: RawTracePointContext) -> i32 {
    let parent = (current_pid_tgid() >> 32) as u32;
    if unsafe { TRACKED.get(&parent) }.is_none() {
        return 0;
    }
    let (pid_off, tgid_off) = (global(&TASK_PID_OFF) as usize, global(&TASK_TGID_OFF) as usize);
    if pid_off == 0 || tgid_off == 0 {
        if first_time(SAID_OFFSETS) {
            warn!(
                &ctx,
                "kernel offsets of task_struct.pid/tgid are unknown (no usable BTF): children forked by \
                 traced processes are not followed"
            );
        }
        return 0;
    }
    let child: u64 = ctx.arg(1);
    let child = child as usize;
    let pid = unsafe { bpf_probe_read_kernel((child + pid_off) as *const u32) }.unwrap_or(0);
    let tgid = unsafe { bpf_probe_read_kernel((child + tgid_off) as *const u32) }.unwrap_or(0);
    if pid != 0 {
        // A new thread starts with depth 0 (its copied stack's frames return unseen-entered).
        depth::forget(pid);
    }
    if pid != 0 && tgid != 0 && global(&CPU_SLOT_ALLOC) != 0 {
        // Every new thread (and process) of a traced process: its slot is
        // written from its first switch-in, so its first call is exact.
        claim_cpu_slot(pid, tgid);
    }
    if pid == 0 || pid != tgid {
        return 0; // a thread, not a process
    }
    let pid = tid_in_ns(child, pid);
    if pid == 0 {
        return 0; // its struct pid could not be read
    }
    bump(counter::FORKS);
    let _ = TRACKED.insert(&pid, &1, 0);
    let Some(mut entry) = EVENTS.reserve::<ProcEvent>(0) else {
        bump(counter::FORK_LOST);
        warn!(
            &ctx,
            "the event ring was full: the fork of pid {} by traced pid {} was not reported, so it will not \
             be traced (fork_lost counts these)",
            pid,
            parent
        );
        return 0;
    };
    entry.write(ProcEvent {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        pid,
        tid: pid,
        parent,
        kind: kind::FORK,
        _pad: [0; 3],
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
    });
    entry.submit(BPF_RB_FORCE_WAKEUP);
    0
}

/// The current thread's `tgid << 32 | tid` as pftraced's PID namespace
/// numbers them: the kernel's own in the host's namespace; else translated,
/// and 0 for a thread not visible there (the host's, another container's).
#[inline(always)]
fn current_pid_tgid() -> u64 {
    pid_tgid_in_ns(bpf_get_current_pid_tgid())
}

/// [`current_pid_tgid`] from the kernel's pid_tgid of the current thread.
#[inline(always)]
fn pid_tgid_in_ns(host: u64) -> u64 {
    if global(&PIDNS_INO) == 0 {
        return host;
    }
    let task = unsafe { bpf_get_current_task() } as usize;
    let tid = tid_in_ns(task, host as u32);
    let leader = read_kernel::<usize>(task + global(&TASK_GROUP_LEADER_OFF) as usize);
    let tgid = match leader {
        Some(leader) if leader == task => tid,
        Some(leader) if leader != 0 => tid_in_ns(leader, (host >> 32) as u32),
        _ => 0,
    };
    if tid == 0 || tgid == 0 { 0 } else { (tgid as u64) << 32 | tid as u64 }
}

/// How deep PID namespaces nest at most (MAX_PID_NS_LEVEL in the kernel).
const MAX_PIDNS_LEVEL: u32 = 32;

/// The number of `task` (its kernel id is `host`) in pftraced's PID
/// namespace: `host` when that is the host's; else found among the
/// numbers of the task's `struct pid`, from its own level upwards (one step
/// for a task of pftraced's own namespace); 0 when the task is not visible there.
#[inline(always)]
fn tid_in_ns(task: usize, host: u32) -> u32 {
    let ino = global(&PIDNS_INO) as u32;
    if ino == 0 {
        return host;
    }
    let Some(pid) = read_kernel::<usize>(task + global(&TASK_THREAD_PID_OFF) as usize) else { return 0 };
    let Some(level) = read_kernel::<u32>(pid + global(&PID_LEVEL_OFF) as usize) else { return 0 };
    let numbers = pid + global(&PID_NUMBERS_OFF) as usize;
    let (size, nr_off, ns_off) =
        (global(&UPID_SIZE) as usize, global(&UPID_NR_OFF) as usize, global(&UPID_NS_OFF) as usize);
    let mut up = 0;
    while up <= MAX_PIDNS_LEVEL {
        if up > level {
            break;
        }
        let upid = numbers + (level - up) as usize * size;
        let ns = read_kernel::<usize>(upid + ns_off).unwrap_or(0);
        if ns != 0 && read_kernel::<u32>(ns + global(&NS_INUM_OFF) as usize) == Some(ino) {
            return read_kernel::<u32>(upid + nr_off).unwrap_or(0);
        }
        up += 1;
    }
    0
}

/// A value of kernel memory (None when it cannot be read, or at address 0).
#[inline(always)]
fn read_kernel<T: Copy>(at: usize) -> Option<T> {
    if at == 0 {
        return None;
    }
    unsafe { bpf_probe_read_kernel(at as *const T) }.ok()
}

#[inline(always)]
fn under_watched_cgroup() -> bool {
    let slots = config_value(config::CGROUP_SLOTS).min(MAX_CGROUPS);
    let mut i = 0;
    while i < MAX_CGROUPS {
        if i >= slots {
            break;
        }
        if let Ok(true) = CGROUPS.current_task_under_cgroup(i) {
            return true;
        }
        i += 1;
    }
    false
}

/// Value of one USDT argument, located as its spec says (libbpf's method).
#[inline(always)]
fn read_arg(ctx: &ProbeContext, arg: &UsdtArg) -> Result<u64, i32> {
    match read_arg_or_error(ctx, arg) {
        (val, 0) => Ok(val),
        (_, err) => Err(err),
    }
}

/// [`read_arg`]'s value and error as two words, both defined on every path
/// (value 0 on an error, error 0 on success). Built as a `Result` from the
/// start, the error half was undefined on the success paths, LLVM kept it
/// in whatever register the error paths used, and copied that register on
/// paths where a register read had clobbered it: the verifier refuses any
/// read of a clobbered register (`R4 !read_ok`), so an unrelated change (the
/// name buffer's zeroing) made the program fail to load.
#[inline(always)]
fn read_arg_or_error(ctx: &ProbeContext, arg: &UsdtArg) -> (u64, i32) {
    // One register read for the three kinds that have a register, not one
    // in each kind's arm: the verifier walks all 18 arms of `read_reg` at
    // every copy of it, and those arms were 38% of pftrace_usdt's verified
    // instructions (16,061 of 42,279, log level 2) with four copies a read.
    if arg.kind == arg_kind::CONST {
        return truncated(arg, arg.val_off);
    }
    let base = match read_reg(ctx, arg.reg_off) {
        Ok(v) => v,
        Err(e) => return (0, e),
    };
    let addr = match arg.kind {
        arg_kind::REG => return truncated(arg, base),
        arg_kind::REG_DEREF => base.wrapping_add(arg.val_off),
        arg_kind::SIB_DEREF => {
            let Ok(index) = read_reg(ctx, arg.idx_reg_off) else { return (0, -1) };
            base.wrapping_add(index << (arg.scale_shift & 3)).wrapping_add(arg.val_off)
        }
        _ => return (0, -1),
    };
    match unsafe { bpf_probe_read_user(addr as *const u64) } {
        Ok(v) => truncated(arg, v),
        Err(e) => (0, e),
    }
}

/// `val` truncated to the argument's size, sign-extended when it is signed:
/// [`read_arg_or_error`]'s success.
#[inline(always)]
fn truncated(arg: &UsdtArg, mut val: u64) -> (u64, i32) {
    // Truncate to the argument's size, sign-extending signed arguments.
    let shift = (arg.bitshift & 63) as u32;
    val <<= shift;
    if arg.signed != 0 {
        val = ((val as i64) >> shift) as u64;
    } else {
        val >>= shift;
    }
    (val, 0)
}

/// A register of the probed thread, read straight from the context. Each
/// register has its own small subprogram doing one constant-offset load (the
/// verifier allows no other; a shared load would use a computed pointer).
#[inline(always)]
fn read_reg(ctx: &ProbeContext, reg_off: u16) -> Result<u64, i32> {
    macro_rules! regs {
        ($($off:literal => $field:ident),* $(,)?) => {{
            $(
                #[inline(never)]
                fn $field(r: *const aya_ebpf::bindings::pt_regs) -> u64 {
                    unsafe { core::ptr::read_volatile(&raw const (*r).$field) }
                }
            )*
            match reg_off {
                $($off => Ok($field(ctx.regs)),)*
                _ => Err(-1),
            }
        }};
    }
    regs!(0 => r15, 8 => r14, 16 => r13, 24 => r12, 32 => rbp, 40 => rbx, 48 => r11, 56 => r10,
          64 => r9, 72 => r8, 80 => rax, 88 => rcx, 96 => rdx, 104 => rsi, 112 => rdi,
          120 => orig_rax, 128 => rip, 152 => rsp)
}

#[inline(always)]
fn bump(index: u32) {
    if let Some(count) = COUNTERS.get_ptr_mut(index) {
        unsafe { *count += 1 };
    }
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// Built for the host (`cargo clippy --workspace --all-targets`, which
/// links std into it through pftrace-common's user-space feature) it is an
/// ordinary program that does nothing: only the BPF build carries programs.
#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
