//! Per-thread CPU slots: the sched_switch program (`pftrace_cpu_slot`)
//! writes, at each switch-in of a thread holding a slot, the scheduler's
//! sum of its run time (exact then) and the clock, so a probe hit reads the
//! thread's CPU time to the ns as `sum + (now - t_in)` instead of the
//! scheduler's last charge (a tick stale). The kernel hands slots out and
//! takes them back (CPU_SLOT_ALLOC); user space fills the free list, and
//! claims one for a launched command stopped at its exec ([`claim_stopped`]).

use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::{
    Btf, Ebpf,
    maps::{Array, HashMap, MapData, Queue},
    programs::BtfTracePoint,
};
use pftrace_common::MAX_CPU_SLOTS;

use super::loader::BpfError;

const PROGRAM: &str = "pftrace_cpu_slot";

/// Pushes every slot index on FREE_SLOTS, freezes CPU_SLOTS (no user-space
/// writes or writable mappings from now on: an agent may be given a
/// read-only mapping) and attaches the sched_switch program.
pub(super) fn attach(ebpf: &mut Ebpf, btf: &Btf) -> Result<(), BpfError> {
    {
        let map = ebpf.map_mut("FREE_SLOTS").ok_or(BpfError::Missing("map FREE_SLOTS"))?;
        let mut free: Queue<&mut MapData, u32> =
            Queue::try_from(map).map_err(|source| BpfError::Map { name: "FREE_SLOTS", source })?;
        for idx in 0..MAX_CPU_SLOTS {
            free.push(idx, 0).map_err(|source| BpfError::Map { name: "FREE_SLOTS", source })?;
        }
    }
    freeze(ebpf)?;
    attach_btf(ebpf, btf, PROGRAM, "sched_switch")
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

/// Gives the single thread of process `pid` (kernel numbering), stopped at its exec (a
/// launched command, before it runs its first instruction) a slot, as the
/// kernel's claim_cpu_slot would. The kernel claims for a thread only at
/// its creation or at its first traced call, valid from its next
/// switch-in: a command's main thread exists before tracing, and a
/// CPU-bound one may never switch out, so every record of a 500-call
/// script took the scheduler's tick-coarse charge (1,000 of 1,000
/// `cpu_coarse`; the demo 1 of 60). Claimed now, the slot is written at the
/// switch-in that resumes it. Safe from user space because no thread of
/// the process can run, so none claims or releases beside this (the
/// free list is the kernel's queue, atomic on its own). Ok(false): no
/// slot was free, or the share is 0; Ok(true): claimed (the caller counts
/// it: the kernel's CPU_SLOTS_TAKEN does not).
pub(super) fn claim_stopped(ebpf: &mut Ebpf, pid: u32, share: u32) -> Result<bool, BpfError> {
    let err = |name: &'static str| move |source| BpfError::Map { name, source };
    {
        let slot_of: HashMap<&MapData, u32, u32> =
            HashMap::try_from(ebpf.map("SLOT_OF").ok_or(BpfError::Missing("map SLOT_OF"))?)
                .map_err(err("SLOT_OF"))?;
        if share == 0 || slot_of.get(&pid, 0).is_ok() {
            return Ok(false);
        }
    }
    let idx = {
        let map = ebpf.map_mut("FREE_SLOTS").ok_or(BpfError::Missing("map FREE_SLOTS"))?;
        let mut free: Queue<&mut MapData, u32> = Queue::try_from(map).map_err(err("FREE_SLOTS"))?;
        match free.pop(0) {
            Ok(idx) => idx,
            Err(_) => return Ok(false), // empty: every slot is held
        }
    };
    if let Err(e) = charge_slot(ebpf, pid, idx) {
        if let Some(map) = ebpf.map_mut("FREE_SLOTS")
            && let Ok(mut free) = Queue::<&mut MapData, u32>::try_from(map)
        {
            let _ = free.push(idx, 0);
        }
        return Err(e);
    }
    Ok(true)
}

/// [`claim_stopped`]'s writes once slot `idx` is popped: its owner, the
/// process's count, and last the thread's entry (what makes it used).
fn charge_slot(ebpf: &mut Ebpf, pid: u32, idx: u32) -> Result<(), BpfError> {
    let err = |name: &'static str| move |source| BpfError::Map { name, source };
    let map = ebpf.map_mut("SLOT_TGID").ok_or(BpfError::Missing("map SLOT_TGID"))?;
    let mut owner: Array<&mut MapData, u32> = Array::try_from(map).map_err(err("SLOT_TGID"))?;
    owner.set(idx, pid, 0).map_err(err("SLOT_TGID"))?;
    let map = ebpf.map_mut("SLOTS_HELD").ok_or(BpfError::Missing("map SLOTS_HELD"))?;
    let mut held: HashMap<&mut MapData, u32, u64> = HashMap::try_from(map).map_err(err("SLOTS_HELD"))?;
    // Its one thread holds no slot (checked by the caller), so its count
    // is 1; the thread's tid is the process's pid.
    held.insert(pid, 1, 0).map_err(err("SLOTS_HELD"))?;
    let map = ebpf.map_mut("SLOT_OF").ok_or(BpfError::Missing("map SLOT_OF"))?;
    let mut slot_of: HashMap<&mut MapData, u32, u32> = HashMap::try_from(map).map_err(err("SLOT_OF"))?;
    const BPF_NOEXIST: u64 = 1;
    if let Err(e) = slot_of.insert(pid, idx, BPF_NOEXIST) {
        let map = ebpf.map_mut("SLOTS_HELD").ok_or(BpfError::Missing("map SLOTS_HELD"))?;
        if let Ok(mut held) = HashMap::<&mut MapData, u32, u64>::try_from(map) {
            let _ = held.remove(&pid);
        }
        return Err(err("SLOT_OF")(e));
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

/// Loads and attaches a BTF tracepoint program (the CPU slots' and the
/// batched agent road's).
pub(super) fn attach_btf(
    ebpf: &mut Ebpf,
    btf: &Btf,
    name: &'static str,
    tracepoint: &str,
) -> Result<(), BpfError> {
    let prog: &mut BtfTracePoint = ebpf
        .program_mut(name)
        .ok_or(BpfError::Missing(name))?
        .try_into()
        .map_err(|source| BpfError::Program { name, source })?;
    prog.load(tracepoint, btf).map_err(|source| BpfError::Program { name, source })?;
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
