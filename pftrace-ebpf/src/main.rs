//! pftrace's eBPF programs, attached to CPython's `python:function__entry` and
//! `python:function__return` USDT probes. Each hit: read the argument
//! locations of this probe site (spec id = attach cookie), read the function
//! name, drop it unless it is in NAMES, then reserve, fill and submit one
//! CallEvent. Counters are per CPU; the daemon sums them.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext as _,
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user,
        bpf_probe_read_user_str_bytes, generated::bpf_get_attach_cookie,
    },
    macros::{map, uprobe},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::ProbeContext,
};
use pftrace_common::{
    CallEvent, FILE_LEN, MAX_NAMES, MAX_SPECS, NAME_LEN, UsdtArg, UsdtSpec, arg_kind, counter, kind,
};

/// Argument locations per probe site, indexed by the attach cookie.
#[map]
static SPECS: Array<UsdtSpec> = Array::with_max_entries(MAX_SPECS, 0);

/// Traced function names (NUL-padded to NAME_LEN). The value is unused by the
/// kernel; user space keeps its meaning.
#[map]
static NAMES: HashMap<[u8; NAME_LEN], u32> = HashMap::with_max_entries(MAX_NAMES, 0);

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
    if unsafe { NAMES.get(&name) }.is_none() {
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
        (*ev).name = name;
        let file: &mut [u8; FILE_LEN] = &mut (*ev).file;
        if bpf_probe_read_user_str_bytes(file_ptr as *const u8, file).is_err() {
            file[0] = 0;
        }
    }
    entry.submit(0);
    Ok(())
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
