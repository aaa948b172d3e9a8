//! USDT semaphores raised by pftraced itself, in one process at a time (the
//! default mode, daemon/dormant.rs): the probes are host-wide uprobes made
//! without a kernel-managed semaphore (`ref_ctr_offset` 0), so a process
//! whose semaphores stay 0 never reaches a probe site and pays nothing; the
//! daemon raises them (+1, through /proc/PID/mem) in the processes it
//! traces, and lowers its own +1 again on a clean stop.
//!
//! Why not the kernel: `bpf_probe_write_user` is refused by the verifier on
//! this kind of host (lockdown=integrity), so an eBPF program cannot raise
//! them; and a kernel-managed semaphore on a host-wide uprobe is raised in
//! every process mapping the file (1.2 us per call for the neighbours).
//!
//! A SIGKILLed daemon cannot lower them: those processes keep reaching the
//! probe sites (no uprobe behind them), +35-41 ns per call measured here
//! (bench/race-free/README.md), until they exit or the next pftraced starts
//! and lowers what the dead one recorded ([`crate::ledger`]).

use std::{
    fs::{File, OpenOptions},
    io,
    os::unix::fs::FileExt as _,
};

/// The semaphores of one process, by address in its memory.
#[derive(Debug)]
pub struct Semaphores {
    pub pid: u32,
    /// The interpreter file (device, inode) and the semaphores' offsets in
    /// it, in the order of `addresses` (what [`crate::ledger`] records).
    pub file: (u64, u64),
    pub offsets: Vec<u64>,
    pub addresses: Vec<u64>,
    /// `/proc/PID/mem`, opened before the memory map was read: it stays bound
    /// to that address space, so after an exec or an exit (and a reuse of
    /// the pid) writes through it fail instead of landing in another image
    /// (where the addresses mean something else: /proc/PID/mem writes even
    /// read-only pages). Lowering at a clean stop may come long after `locate`.
    mem: File,
}

/// Errors finding or changing a process's semaphores.
#[derive(Debug, thiserror::Error)]
pub enum SemaphoreError {
    #[error("pid {pid}: reading its memory map: {source}")]
    Maps { pid: u32, source: procfs::ProcError },
    #[error(
        "pid {pid}: no mapping of the interpreter file (device {dev:#x}, inode {ino}) holds its semaphore at \
         file offset {offset:#x}"
    )]
    NotMapped { pid: u32, dev: u64, ino: u64, offset: u64 },
    #[error("pid {pid}: /proc/{pid}/mem at {address:#x}: {source}")]
    Memory { pid: u32, address: u64, source: io::Error },
}

impl SemaphoreError {
    /// Whether the process is gone (or dying: its memory went first).
    pub fn is_gone(&self) -> bool {
        match self {
            Self::Maps { source, .. } => matches!(source, procfs::ProcError::NotFound(_)),
            Self::Memory { source, .. } => {
                matches!(source.raw_os_error(), Some(libc::ESRCH | libc::ENOENT))
                    || source.kind() == std::io::ErrorKind::UnexpectedEof
            }
            Self::NotMapped { .. } => false,
        }
    }
}

impl Semaphores {
    /// Where the semaphores at file offsets `offsets` (0: none) of the file
    /// `file` = (device, inode) are in process `pid`'s memory, in the order
    /// given ([`Self::adjust`] raises them in it: return sites' first).
    pub fn locate(pid: u32, file: (u64, u64), offsets: &[u64]) -> Result<Self, SemaphoreError> {
        let mem = open_mem(pid).map_err(|source| SemaphoreError::Memory { pid, address: 0, source })?;
        let maps = procfs::process::Process::new(pid as i32)
            .and_then(|p| p.maps())
            .map_err(|source| SemaphoreError::Maps { pid, source })?;
        let (dev, ino) = file;
        let want_dev = (libc::major(dev) as i32, libc::minor(dev) as i32);
        let mut offsets: Vec<u64> = offsets.iter().copied().filter(|&o| o != 0).collect();
        let mut seen = std::collections::HashSet::new();
        offsets.retain(|&o| seen.insert(o));
        let addresses = offsets
            .iter()
            .map(|&offset| {
                maps.iter()
                    .filter(|m| m.dev == want_dev && m.inode == ino)
                    .find(|m| offset >= m.offset && offset - m.offset < m.address.1 - m.address.0)
                    .map(|m| m.address.0 + (offset - m.offset))
                    .ok_or(SemaphoreError::NotMapped { pid, dev, ino, offset })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { pid, file, offsets, addresses, mem })
    }

    /// Adds `delta` to each semaphore (a u16, as CPython's `_semaphore`;
    /// saturating, so a lowering never wraps what another tracer raised).
    /// Raised in their order, lowered in the reverse: a probe whose
    /// semaphore comes first is live before and after the others (return
    /// sites: no entry is seen whose return is not; the kernel's depth of
    /// seen calls, pftrace-ebpf/src/depth.rs, must never run ahead).
    pub fn adjust(&self, delta: i32) -> Result<(), SemaphoreError> {
        let (pid, mem) = (self.pid, &self.mem);
        let raising = delta > 0;
        let order: Box<dyn Iterator<Item = &u64>> =
            if raising { Box::new(self.addresses.iter()) } else { Box::new(self.addresses.iter().rev()) };
        for &address in order {
            let err = |source| SemaphoreError::Memory { pid, address, source };
            let mut value = [0u8; 2];
            mem.read_exact_at(&mut value, address).map_err(err)?;
            let now = i32::from(u16::from_ne_bytes(value));
            let new = (now + delta).clamp(0, i32::from(u16::MAX)) as u16;
            mem.write_all_at(&new.to_ne_bytes(), address).map_err(err)?;
        }
        Ok(())
    }

    /// The semaphores' current values.
    pub fn values(&self) -> Result<Vec<u16>, SemaphoreError> {
        let (pid, mem) = (self.pid, &self.mem);
        self.addresses
            .iter()
            .map(|&address| {
                let mut value = [0u8; 2];
                mem.read_exact_at(&mut value, address).map_err(|source| SemaphoreError::Memory {
                    pid,
                    address,
                    source,
                })?;
                Ok(u16::from_ne_bytes(value))
            })
            .collect()
    }
}

fn open_mem(pid: u32) -> io::Result<File> {
    OpenOptions::new().read(true).write(true).open(format!("/proc/{pid}/mem"))
}
