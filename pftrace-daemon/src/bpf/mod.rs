//! The kernel side as seen from user space: loading the eBPF object, its
//! maps (names, specs, counters, ring buffer), and attaching to probe sites.

mod attach;
mod loader;

pub use attach::{AttachError, AttachJob, UprobeLink};
pub use loader::{BpfError, Counters, KernelProbes, ProbeKind, name_key};
