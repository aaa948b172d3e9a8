//! Per-thread CPU slots: the sched_switch program (`pftrace_cpu_slot`)
//! writes, at each switch-in of a thread holding a slot, the scheduler's
//! sum of its run time (exact then) and the clock, so a probe hit reads the
//! thread's CPU time to the ns as `sum + (now - t_in)` instead of the
//! scheduler's last charge (a tick stale). The kernel hands slots out and
//! takes them back (CPU_SLOT_ALLOC); user space only fills the free list.

use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::{
    Btf, Ebpf,
    maps::{MapData, Queue},
    programs::BtfTracePoint,
};
use pftrace_common::MAX_CPU_SLOTS;

use super::loader::BpfError;

const PROGRAM: &str = "pftrace_cpu_slot";

/// Pushes every slot index on FREE_SLOTS, freezes CPU_SLOTS (no user-space
/// writes or writable mappings from now on: an agent may be given a
/// read-only mapping) and attaches the sched_switch program.
pub(super) fn attach(ebpf: &mut Ebpf) -> Result<(), BpfError> {
    {
        let map = ebpf.map_mut("FREE_SLOTS").ok_or(BpfError::Missing("map FREE_SLOTS"))?;
        let mut free: Queue<&mut MapData, u32> =
            Queue::try_from(map).map_err(|source| BpfError::Map { name: "FREE_SLOTS", source })?;
        for idx in 0..MAX_CPU_SLOTS {
            free.push(idx, 0).map_err(|source| BpfError::Map { name: "FREE_SLOTS", source })?;
        }
    }
    freeze(ebpf)?;
    let btf = Btf::from_sys_fs().map_err(|e| BpfError::CpuSlots(format!("reading the kernel's BTF: {e}")))?;
    let prog: &mut BtfTracePoint = ebpf
        .program_mut(PROGRAM)
        .ok_or(BpfError::Missing(PROGRAM))?
        .try_into()
        .map_err(|source| BpfError::Program { name: PROGRAM, source })?;
    prog.load("sched_switch", &btf).map_err(|source| BpfError::Program { name: PROGRAM, source })?;
    prog.attach().map_err(|source| BpfError::Program { name: PROGRAM, source })?;
    Ok(())
}

/// BPF_MAP_FREEZE on CPU_SLOTS (BPF_F_RDONLY would make a shared read-only
/// mapping impossible: see pftrace-agent/README.md).
fn freeze(ebpf: &Ebpf) -> Result<(), BpfError> {
    const BPF_MAP_FREEZE: libc::c_long = 22;
    let map = ebpf.map("CPU_SLOTS").ok_or(BpfError::Missing("map CPU_SLOTS"))?;
    let fd = match map {
        aya::maps::Map::Array(data) => data.fd().as_fd().as_raw_fd(),
        _ => return Err(BpfError::Missing("CPU_SLOTS as an array")),
    };
    let attr: [u32; 2] = [fd as u32, 0];
    // SAFETY: the attr is the map_fd the command reads.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_FREEZE, attr.as_ptr(), 8u32) };
    if rc != 0 {
        return Err(BpfError::CpuSlots(format!("freezing CPU_SLOTS: {}", std::io::Error::last_os_error())));
    }
    Ok(())
}

/// (run_cnt, run_time_ns) of the sched_switch program, from its fdinfo
/// (run time only while `kernel.bpf_stats_enabled` is 1).
pub(super) fn stats(ebpf: &Ebpf) -> Option<(u64, u64)> {
    let p: &BtfTracePoint = ebpf.program(PROGRAM)?.try_into().ok()?;
    let fd = p.fd().ok()?.as_fd().as_raw_fd();
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    let field =
        |k: &str| text.lines().find_map(|l| l.strip_prefix(k)).and_then(|v| v.trim().parse::<u64>().ok());
    Some((field("run_cnt:")?, field("run_time_ns:")?))
}

/// Loads and attaches a BTF tracepoint program of the batched agent road.
pub(super) fn attach_btf(ebpf: &mut Ebpf, name: &'static str, tracepoint: &str) -> Result<(), BpfError> {
    let btf = Btf::from_sys_fs().map_err(|e| BpfError::CpuSlots(format!("reading the kernel's BTF: {e}")))?;
    let prog: &mut BtfTracePoint = ebpf
        .program_mut(name)
        .ok_or(BpfError::Missing(name))?
        .try_into()
        .map_err(|source| BpfError::Program { name, source })?;
    prog.load(tracepoint, &btf).map_err(|source| BpfError::Program { name, source })?;
    prog.attach().map_err(|source| BpfError::Program { name, source })?;
    Ok(())
}

/// A new fd of the (frozen) CPU_SLOTS map: what an agent is given to map
/// read-only (a writable mapping of it is refused: frozen).
pub(super) fn slots_fd(ebpf: &Ebpf) -> Option<std::os::fd::OwnedFd> {
    match ebpf.map("CPU_SLOTS")? {
        aya::maps::Map::Array(data) => data.fd().as_fd().try_clone_to_owned().ok(),
        _ => None,
    }
}
