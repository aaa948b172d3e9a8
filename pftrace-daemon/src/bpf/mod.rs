//! The kernel side as seen from user space: loading the eBPF object, its
//! maps (names, specs, counters, ring buffer), and attaching to probe sites.

mod attach;
mod loader;
mod multi;
mod sys;

pub use attach::{AttachError, AttachJob, Site, UprobeLink};
pub use loader::{
    ATTACH_ENV, AttachMethod, BPF_OBJECT, BpfError, Counters, KernelProbes, ProbeKind, name_key,
};
