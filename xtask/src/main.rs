//! xtask: pftrace's own tasks, run as `cargo xtask <task>` (alias in .cargo/config.toml).
//!
//! - `setup`: install what is missing (Debian packages, nightly rust-src,
//!   bpf-linker, a CPython built --with-dtrace, Debian sid's CPython 3.13-3.15,
//!   pyenv's CPythons, a Debian root with systemd), reuse what is present;
//! - `build`: setup, then build pftraced;
//! - `test`:  setup, then run every test (as root);
//! - `demo`:  setup, build, then trace examples/app.py;
//! - `bench`: setup, build, then measure tracing overhead (`--quick`: the CI smoke).

mod apt;
mod bench;
mod build;
mod cpython;
mod demo;
mod greenlet;
mod hatchet;
mod pyenv;
mod setup;
mod sid_pythons;
mod systemd_root;
mod test;
mod util;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask", about = "pftrace's project tasks", version)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what building and testing needs (idempotent): apt packages,
    /// nightly rust-src, bpf-linker, a probe-enabled CPython 3.9, Debian sid's
    /// CPython 3.13-3.15 (unpacked in /var/cache/pftrace/debian-sid), pyenv's CPythons,
    /// a Debian bookworm root with systemd (/var/cache/pftrace/bookworm-systemd).
    Setup,
    /// Setup, then `cargo build --release -p pftrace-daemon`.
    Build,
    /// Setup, then run all tests (needs root and BPF).
    Test(test::Args),
    /// Setup, build, then trace examples/app.py into target/demo/demo-trace.json.
    Demo,
    /// Setup, build, then benchmark: overhead per Python call (untraced, floor,
    /// bpftrace, pftraced sparse/dense), scaling with names and processes,
    /// daemon CPU and RSS, attach latency. Needs root.
    Bench(bench::Args),
}

fn main() -> ExitCode {
    util::init_env();
    let cli = Cli::parse();
    let result = match &cli.task {
        Task::Setup => setup::run().map(|_| ExitCode::SUCCESS),
        Task::Build => build::run().map(|_| ExitCode::SUCCESS),
        Task::Test(args) => test::run(args),
        Task::Demo => demo::run(),
        Task::Bench(args) => bench::run(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("xtask: error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}
