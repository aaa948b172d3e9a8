//! pftrace's eBPF programs, attached to CPython's `python:function__entry` and
//! `python:function__return` USDT probes. Each hit: read the argument
//! locations of this probe site (spec id = attach cookie), read the function
//! name, drop it unless it is in NAMES, then reserve, fill and submit one
//! CallEvent. Counters are per CPU; the daemon sums them. A raw tracepoint on
//! sched_process_exec reports new processes in scope (all, or under watched cgroups).
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext as _,
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user,
        bpf_probe_read_user_str_bytes,
        generated::{bpf_get_attach_cookie, bpf_get_current_cgroup_id, bpf_get_current_task},
    },
    macros::{map, raw_tracepoint, uprobe},
    maps::{Array, CgroupArray, HashMap, LpmTrie, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{ProbeContext, RawTracePointContext},
};
use pftrace_common::{
    CallEvent, FILE_LEN, MAX_CGROUPS, MAX_NAMES, MAX_PREFIXES, MAX_SPECS, NAME_LEN, ProcEvent,
    UsdtArg, UsdtSpec, arg_kind, config, counter, kind,
};

/// Argument locations per probe site, indexed by the attach cookie.
// Kernel layout, set by user space from BTF at load time (see
// pftrace_common::task_layout). Zero means unknown: the figure is not read.
#[unsafe(no_mangle)]
static TASK_SUM_EXEC_OFF: u32 = 0;
#[unsafe(no_mangle)]
static TASK_MM_OFF: u32 = 0;
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
static PREFIXES: LpmTrie<[u8; NAME_LEN], u32> =
    LpmTrie::with_max_entries(MAX_PREFIXES, BPF_F_NO_PREALLOC);

/// Settings written by user space (indices in `pftrace_common::config`).
#[map]
static CONFIG: Array<u32> = Array::with_max_entries(config::COUNT, 0);

/// cgroup v2 directories whose processes' execs are reported.
#[map]
static CGROUPS: CgroupArray = CgroupArray::with_max_entries(MAX_CGROUPS, 0);

const BPF_F_NO_PREALLOC: u32 = 1;

/// Per-CPU counters, indexed by `pftrace_common::counter`.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Matched calls for user space. The size is set by the loader at load time.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

/// Argument positions in CPython's probes.
const ARG_FILENAME: usize = 0;
const ARG_FUNCNAME: usize = 1;
const ARG_LINENO: usize = 2;

#[uprobe]
pub fn pftrace_entry(ctx: ProbeContext) -> u32 {
    on_probe(
        &ctx,
        kind::ENTRY,
        counter::ENTRY_SEEN,
        counter::ENTRY_MATCHED,
    )
}

#[uprobe]
pub fn pftrace_return(ctx: ProbeContext) -> u32 {
    on_probe(
        &ctx,
        kind::RETURN,
        counter::RETURN_SEEN,
        counter::RETURN_MATCHED,
    )
}

#[inline(always)]
fn on_probe(ctx: &ProbeContext, event_kind: u8, seen: u32, matched: u32) -> u32 {
    bump(seen);
    if try_on_probe(ctx, event_kind, matched).is_err() {
        bump(counter::READ_ERRORS);
    }
    0
}

#[inline(always)]
fn try_on_probe(ctx: &ProbeContext, event_kind: u8, matched: u32) -> Result<(), i32> {
    let spec_id = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) } as u32;
    let spec = SPECS.get(spec_id).ok_or(-1i32)?;

    // Filter first: read the name and look it up before anything else.
    let name_ptr = read_arg(ctx, &spec.args[ARG_FUNCNAME])?;
    let mut name = [0u8; NAME_LEN];
    unsafe { bpf_probe_read_user_str_bytes(name_ptr as *const u8, &mut name) }?;
    if unsafe { NAMES.get(&name) }.is_none() && !prefix_match(&name) {
        return Ok(());
    }
    bump(matched);

    let file_ptr = read_arg(ctx, &spec.args[ARG_FILENAME])?;
    let lineno = read_arg(ctx, &spec.args[ARG_LINENO])? as i32;

    let Some(mut entry) = EVENTS.reserve::<CallEvent>(0) else {
        bump(counter::LOST);
        return Ok(());
    };
    let ev = entry.as_mut_ptr();
    let pid_tgid = bpf_get_current_pid_tgid();
    unsafe {
        (*ev).ts_ns = bpf_ktime_get_ns();
        (*ev).pid = (pid_tgid >> 32) as u32;
        (*ev).tid = pid_tgid as u32;
        (*ev).lineno = lineno;
        (*ev).kind = event_kind;
        (*ev)._pad = [0; 3];
        let (cpu, rss) = task_figures();
        (*ev).thread_cpu_ns = cpu;
        (*ev).rss_pages = rss;
        (*ev).name = name;
        let file: &mut [u8; FILE_LEN] = &mut (*ev).file;
        if bpf_probe_read_user_str_bytes(file_ptr as *const u8, file).is_err() {
            file[0] = 0;
        }
    }
    entry.submit(0);
    Ok(())
}

#[inline(always)]
fn global(v: &'static u32) -> u64 {
    unsafe { core::ptr::read_volatile(v) as u64 }
}

/// The current thread's CPU time so far and its process's resident pages,
/// read from the task with the offsets user space found in BTF.
#[inline(always)]
fn task_figures() -> (u64, u64) {
    let task = unsafe { bpf_get_current_task() } as usize;
    let sum_exec = global(&TASK_SUM_EXEC_OFF) as usize;
    let cpu = if sum_exec != 0 {
        unsafe { bpf_probe_read_kernel((task + sum_exec) as *const u64) }.unwrap_or(0)
    } else {
        0
    };
    let mm_off = global(&TASK_MM_OFF) as usize;
    if mm_off == 0 {
        return (cpu, 0);
    }
    let mm = unsafe { bpf_probe_read_kernel((task + mm_off) as *const u64) }.unwrap_or(0) as usize;
    if mm == 0 {
        return (cpu, 0);
    }
    let base = mm + global(&MM_RSS_BASE_OFF) as usize;
    let stride = global(&MM_RSS_STRIDE) as usize;
    let mut rss: i64 = 0;
    for idx in [
        global(&MM_RSS_FILE_IDX),
        global(&MM_RSS_ANON_IDX),
        global(&MM_RSS_SHMEM_IDX),
    ] {
        let at = base + idx as usize * stride;
        rss += unsafe { bpf_probe_read_kernel(at as *const i64) }
            .unwrap_or(0)
            .max(0);
    }
    (cpu, rss as u64)
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

/// A process called execve: report it when it is in scope (every process,
/// or one under a watched cgroup), so user space can attach to it.
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn pftrace_exec(_ctx: RawTracePointContext) -> i32 {
    let mode = config_value(config::EXEC_MODE);
    if mode == config::EXEC_OFF {
        return 0;
    }
    if mode == config::EXEC_CGROUPS && !under_watched_cgroup() {
        return 0;
    }
    bump(counter::EXECS);
    let Some(mut entry) = EVENTS.reserve::<ProcEvent>(0) else {
        bump(counter::EXEC_LOST);
        return 0;
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    entry.write(ProcEvent {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        _reserved: 0,
        kind: kind::EXEC,
        _pad: [0; 3],
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
    });
    entry.submit(0);
    0
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
    let regs = ctx.as_ptr() as *const u8;
    let mut val: u64 = match arg.kind {
        arg_kind::CONST => arg.val_off,
        arg_kind::REG => read_reg(regs, arg.reg_off)?,
        arg_kind::REG_DEREF => {
            let addr = read_reg(regs, arg.reg_off)?.wrapping_add(arg.val_off);
            unsafe { bpf_probe_read_user(addr as *const u64) }?
        }
        arg_kind::SIB_DEREF => {
            let base = read_reg(regs, arg.reg_off)?;
            let index = read_reg(regs, arg.idx_reg_off)?;
            let addr = base
                .wrapping_add(index << (arg.scale_shift & 3))
                .wrapping_add(arg.val_off);
            unsafe { bpf_probe_read_user(addr as *const u64) }?
        }
        _ => return Err(-1),
    };
    // Truncate to the argument's size, sign-extending signed arguments.
    let shift = (arg.bitshift & 63) as u32;
    val <<= shift;
    if arg.signed != 0 {
        val = ((val as i64) >> shift) as u64;
    } else {
        val >>= shift;
    }
    Ok(val)
}

#[inline(always)]
fn read_reg(regs: *const u8, reg_off: u16) -> Result<u64, i32> {
    // pt_regs is 168 bytes on x86-64; the bound keeps the read inside it.
    if reg_off > 160 {
        return Err(-1);
    }
    unsafe { bpf_probe_read_kernel(regs.add(reg_off as usize) as *const u64) }
}

#[inline(always)]
fn bump(index: u32) {
    if let Some(count) = COUNTERS.get_ptr_mut(index) {
        unsafe { *count += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
