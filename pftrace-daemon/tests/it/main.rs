//! pftraced's integration tests, one test binary: each file of the former
//! tests/ is a module here (`cargo xtask test -- --test it agent::` runs one).
//! One binary links the daemon library once instead of 40 times (after
//! touching common/mod.rs, `cargo xtask test`'s build took 300.6 s for the
//! 40 binaries, once, and 73.6-212.0 s for this one, median 128 s of 5, at
//! load 2.5-5), and lets cargo's test threads run tests of different files
//! side by side. The tests that
//! must run alone on the host take [`common::serial`]; every test's
//! `TestDir` and process holds a turn such a test waits for (see
//! common/serial.rs). The tests that
//! must run alone on the host take [`common::serial`]; every process a test
//! starts through common holds a turn that such a test waits for (see
//! common/serial.rs).

mod common;
mod systemd_support;

mod agent;
mod agent_batch;
mod agent_disable;
mod agent_hostile;
mod children;
mod cli;
mod control_cli;
mod control_packaging;
mod control_server;
mod cpu_slot_share;
mod daemon_limits;
mod faults;
mod figures;
mod filter;
mod first_inspection;
mod formats;
mod greenlets;
mod hostile;
mod interpreters;
mod launch;
mod lifecycle;
mod output_files;
mod pairing;
mod paths;
mod pid_namespace;
mod qualnames;
mod qualsel;
mod racefree;
mod refusals;
mod return_known;
mod return_skip;
mod rss;
mod security;
mod semantics;
mod service_cgroup;
mod service_control;
mod service_jobs;
mod service_output;
mod service_overhead;
mod systemd_service;
mod thread_cpu;
