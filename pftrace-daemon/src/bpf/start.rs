//! A start's slow parts side by side: aya's loader parsing the kernel's BTF
//! on a thread of its own while `TaskOffsets` reads it, and the USDT
//! programs verified by the kernel while the rest of the start goes on
//! (the BTF tracepoint programs' own parse, the CPU slots' free list, the
//! scopes).
//!
//! Measured before (a `pftraced --pid` start, 2 vCPUs, load 5): pftraced's
//! own BTF read 15-35 ms, aya's loader (its constructor always parses the
//! kernel's BTF) 40-90 ms, the maps 25-60 ms, pftrace_usdt's verification
//! 370-570 ms (160 idle), the BTF tracepoint programs (another parse) and the CPU
//! slots' free list 70-135 ms, one after the other: 460-760 ms to
//! "attached" (the bench's idle figure: 406 ms, target 200). Side by side
//! (and with pftrace_usdt verified in 28,028 instructions instead of
//! 46,932), idle: 187.6-193.7 ms against 282.8-291.7 (README, "Where a
//! probe hit's time goes").

use std::{sync::Arc, thread::JoinHandle};

use aya::{Ebpf, EbpfLoader};

use super::{
    attach::Programs,
    loader::{BPF_OBJECT, BpfError, FLOOR_PROGRAM, USDT_PROGRAM, UsdtPrograms},
    multi::{self, MultiLoadError},
};

/// aya's loader, made on a thread by [`begin`]: its constructor always
/// parses the kernel's BTF. The tracepoint programs' parse is not begun
/// here too: three parses alive at once took pftraced's peak RSS from 37
/// to 45-48 MiB, and that one runs beside the verification anyway.
pub struct PendingLoader(JoinHandle<EbpfLoader<'static>>);

/// Starts making aya's loader on a thread of its own.
pub fn begin() -> Result<PendingLoader, BpfError> {
    one_malloc_arena();
    std::thread::Builder::new()
        .name("pftrace-btf".into())
        .spawn(EbpfLoader::new)
        .map(PendingLoader)
        .map_err(|e| BpfError::KernelBtf(format!("starting a thread to read it: {e}")))
}

impl PendingLoader {
    /// The loader, once its parse is done.
    pub(super) fn loader(self) -> Result<EbpfLoader<'static>, BpfError> {
        self.0.join().map_err(|_| BpfError::KernelBtf("the thread reading it panicked".into()))
    }
}

/// The USDT programs' load, running on a thread of its own.
pub(super) struct Verifying(JoinHandle<Result<UsdtPrograms, MultiLoadError>>);

/// Starts loading the USDT and floor programs for uprobe_multi links,
/// relocated against `ebpf`'s maps (their fds duplicated for the thread).
/// The kernel verifies pftrace_usdt for the length of it.
pub(super) fn verify(ebpf: &Ebpf) -> Result<Verifying, MultiLoadError> {
    let maps = multi::map_fds(ebpf).map_err(MultiLoadError::MapFds)?;
    let thread = std::thread::Builder::new()
        .name("pftrace-verify".into())
        .spawn(move || {
            let mut progs =
                multi::load_programs(&maps, BPF_OBJECT, &[USDT_PROGRAM, FLOOR_PROGRAM])?.into_iter();
            match (progs.next(), progs.next()) {
                (Some(usdt), Some(floor)) => Ok(UsdtPrograms {
                    usdt: Arc::new(Programs::Multi { prog: usdt }),
                    floor: Arc::new(Programs::Multi { prog: floor }),
                }),
                _ => Err(MultiLoadError::Missing(USDT_PROGRAM.into())),
            }
        })
        .map_err(MultiLoadError::Spawn)?;
    Ok(Verifying(thread))
}

impl Verifying {
    /// The programs, once verified; the kernel's refusal if it refused.
    pub(super) fn wait(self) -> Result<UsdtPrograms, BpfError> {
        Ok(self.0.join().map_err(|_| MultiLoadError::Thread)??)
    }
}

/// Every thread of pftraced allocates from glibc's main arena. The loader's
/// parse of the kernel's BTF (~14 MiB of small allocations) is made on its
/// thread: in a thread arena of its own it stayed resident once freed
/// (VmRSS 50 MiB after a `--pid` start, 37 before the thread), where the
/// main arena reuses it. pftraced's other threads (the code resolver, the
/// holds) allocate little, so sharing one arena costs no contention worth
/// the name.
fn one_malloc_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; M_ARENA_MAX (-8) is glibc's.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
