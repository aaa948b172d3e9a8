//! pftrace: trace named Python functions through CPython's USDT probes with
//! eBPF. This library holds the logic; `pftraced` and `pftracectl` are thin
//! binaries over it.

pub mod agent;
pub mod bpf;
pub mod caps;
pub mod cgroupwatch;
pub mod clock;
pub mod codes;
pub mod config;
pub mod control;
pub mod daemon;
pub mod elf_info;
pub mod events;
pub mod fast_hash;
pub mod fdtable;
pub mod hold;
pub mod job_pattern;
pub mod kernel;
pub mod launch;
pub mod ledger;
pub mod logging;
pub mod output;
pub mod pairing;
pub mod procinfo;
pub mod procwatch;
pub mod protocol;
pub mod python;
pub mod semaphores;
pub mod stats;
pub mod string_bound;
pub mod target;
pub mod trace;
pub mod usdt;

/// The name forms, shared with the agent (crate pftrace-names).
pub use pftrace_names as names;
