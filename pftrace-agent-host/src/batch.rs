//! The kernel side of the batched agent road (issue 12, pftrace-agent/README.md
//! "Batched reports: measured", "Batched road in pftraced") as agent-bench and
//! its test drive it: the drain programs at a thread's switch-out and exit,
//! their counters, decoding a batch off the ring, and giving threads their
//! CPU slot (the one place that does, so kernel-side slot allocation can
//! replace it).

use std::os::fd::{AsFd as _, AsRawFd as _};

use pftrace_common::{AgentBatchEvent, AgentEvent, BATCH_LEN, BatchRecord, agent, batch, kind};

use crate::kernel::{AgentKernel, KernelError, fd_stats};

const SWITCH: &str = "pftrace_agent_batch_switch";
const EXIT: &str = "pftrace_agent_batch_exit";
const EXEC: &str = "pftrace_agent_batch_exec";

/// Gives each thread in `tids` a CPU slot (slot numbers from `first`): the
/// prototype's user-space registration (SLOT_OF). Its figures appear at the
/// thread's next switch-in.
pub fn give_slots(k: &mut AgentKernel, tids: &[u32], first: u32) -> Result<(), KernelError> {
    for (i, &tid) in tids.iter().enumerate() {
        k.register_slot(tid, first + i as u32)?;
    }
    Ok(())
}

/// Takes the slots of `tids` back.
pub fn take_slots(k: &mut AgentKernel, tids: &[u32]) -> Result<(), KernelError> {
    for &tid in tids {
        k.unregister_slot(tid)?;
    }
    Ok(())
}

impl AgentKernel {
    /// Attaches `pftrace_agent_batch_switch` (tp_btf on sched_switch): every
    /// context switch of the host looks the thread switched out up in BATCH_OF.
    pub fn attach_batch_switch(&mut self) -> Result<(), KernelError> {
        self.attach_btf_tracepoint(SWITCH, "sched_switch")
    }

    /// Attaches `pftrace_agent_batch_exit` (raw tracepoint on sched_process_exit).
    pub fn attach_batch_exit(&mut self) -> Result<(), KernelError> {
        self.attach_raw_tracepoint(EXIT, "sched_process_exit")
    }

    /// Attaches `pftrace_agent_batch_exec` (tp_btf on sys_enter): drains a
    /// registered thread at its execve/execveat (every syscall of the host
    /// runs it to its first test).
    pub fn attach_batch_exec(&mut self) -> Result<(), KernelError> {
        self.attach_btf_tracepoint(EXEC, "sys_enter")
    }

    /// The batch counters summed over CPUs (`pftrace_common::batch::counter`).
    pub fn batch_counters(&self) -> Result<[u64; batch::counter::COUNT as usize], KernelError> {
        let map = self.ebpf.map("BATCH_COUNTERS").ok_or(KernelError::Missing("map BATCH_COUNTERS"))?;
        let arr: aya::maps::PerCpuArray<&aya::maps::MapData, u64> = aya::maps::PerCpuArray::try_from(map)
            .map_err(|source| KernelError::Map { name: "BATCH_COUNTERS", source })?;
        let mut out = [0; batch::counter::COUNT as usize];
        for (i, o) in out.iter_mut().enumerate() {
            let v = arr
                .get(&(i as u32), 0)
                .map_err(|source| KernelError::Map { name: "BATCH_COUNTERS", source })?;
            *o = v.iter().sum();
        }
        Ok(out)
    }

    /// (run_cnt, run_time_ns) of the switch-out drain program (bpf_stats).
    pub fn batch_switch_stats(&self) -> Option<(u64, u64)> {
        let p: &aya::programs::BtfTracePoint = self.ebpf.program(SWITCH)?.try_into().ok()?;
        fd_stats(p.fd().ok()?.as_fd().as_raw_fd())
    }

    /// (run_cnt, run_time_ns) of the syscall road's tp_btf program (bpf_stats).
    pub fn syscall_btf_stats(&self) -> Option<(u64, u64)> {
        let p: &aya::programs::BtfTracePoint =
            self.ebpf.program("pftrace_agent_syscall_btf")?.try_into().ok()?;
        fd_stats(p.fd().ok()?.as_fd().as_raw_fd())
    }
}

/// The counters as `name=value` words.
pub fn counters_text(c: &[u64; batch::counter::COUNT as usize]) -> String {
    use batch::counter::*;
    [
        ("drains", DRAINS),
        ("records", RECORDS),
        ("by_syscall", BY_SYSCALL),
        ("by_switch", BY_SWITCH),
        ("by_exit", BY_EXIT),
        ("by_exec", BY_EXEC),
        ("lost", LOST),
        ("overrun", OVERRUN),
        ("unread", UNREAD),
        ("exit_unread", EXIT_UNREAD),
        ("unknown", UNKNOWN),
    ]
    .iter()
    .map(|(n, i)| format!("{n}={}", c[*i as usize]))
    .collect::<Vec<_>>()
    .join(" ")
}

/// One batch off the ring, decoded: the kernel's head (pid, tid, drain
/// time, RSS), what drained it, and its events in order.
#[derive(Clone)]
pub struct Batch {
    pub head: AgentEvent,
    pub why: u32,
    pub first: u64,
    pub events: Vec<BatchRecord>,
}

/// Whether `item` is a batch; the number of events it holds.
pub fn events_in(item: &[u8]) -> Option<u64> {
    decode(item).map(|b| b.events.len() as u64)
}

/// Decodes a ring record that is a batch (None: another record).
pub fn decode(item: &[u8]) -> Option<Batch> {
    if item.len() < size_of::<AgentBatchEvent>() || item[pftrace_common::KIND_OFFSET] != kind::AGENT {
        return None;
    }
    // SAFETY: length checked; plain data.
    let ev: AgentBatchEvent = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const AgentBatchEvent) };
    if ev.head.flags & agent::flag::BATCH == 0 {
        return None;
    }
    let n = (ev.count as usize).min(BATCH_LEN);
    let events = (0..n).map(|i| ev.records[((ev.tail + i as u64) % BATCH_LEN as u64) as usize]).collect();
    Some(Batch { head: ev.head, why: ev.why, first: ev.tail, events })
}
