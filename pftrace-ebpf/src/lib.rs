//! Empty library target: lets pftrace-daemon declare a build-dependency on this
//! crate so cargo rebuilds the eBPF object when it changes. The programs are in main.rs.
#![no_std]
