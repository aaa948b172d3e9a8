//! The kernel side as seen from user space: loading the eBPF object, its
//! maps (names, specs, counters, ring buffer), and attaching programs to
//! resolved probe points.
//!
//! Imports go one way: `loader` → `attach` → (`multi`, `perf`) → (`points`, `sys`).

mod attach;
mod batchtail;
mod cpuslots;
mod loader;
mod multi;
mod perf;
mod points;
pub mod ringbuf;
mod start;
mod sys;

pub use attach::{AttachError, AttachJob, UprobeLink};
pub use loader::{
    AGENT_SYSCALL_PROGRAM, ATTACH_ENV, AttachMethod, BPF_OBJECT, BpfError, Counters, KernelProbes, name_key,
    new_agent_token,
};
pub use points::{ProbePoint, ResolvedPoints, Scope};
pub use start::{PendingLoader, begin as begin_start};
