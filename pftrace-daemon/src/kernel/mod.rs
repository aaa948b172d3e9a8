//! Facts about the running kernel that the eBPF programs need.

pub mod btf;
pub mod pidns;
pub mod sched;
pub mod task_layout;
