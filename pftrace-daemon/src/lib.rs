//! pftrace: trace named Python functions through CPython's USDT probes with
//! eBPF. This library holds the logic; `pftraced` and `pftracectl` are thin
//! binaries over it.

pub mod bpf;
pub mod caps;
pub mod clock;
pub mod events;
pub mod launch;
pub mod output;
pub mod pairing;
pub mod procwatch;
pub mod python;
pub mod summary;
pub mod target;
pub mod trace;
pub mod tracer;
pub mod usdt;
