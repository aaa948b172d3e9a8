//! pftraced's side of the in-process agent (`pftrace-agent`) outside the
//! daemon: the kernel report path as the benchmark and the tests drive it
//! (`kernel`). The control socket, installing the agent's files, launch mode
//! and PEP 768 are the daemon's (`pftrace::agent`), re-exported here.

pub mod batch;
pub mod batchbench;
pub mod cpuslot;
pub mod kernel;
mod pingpong;

pub use pftrace::agent::{install, launch, remote, server};
