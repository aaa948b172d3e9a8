//! `cargo xtask build`: setup, then builds pftraced (release) with its eBPF programs.

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::util::{self, Step};

/// Runs the set-up the build needs, then the build.
pub fn run() -> Result<PathBuf> {
    crate::setup::base()?;
    build()
}

/// Builds `pftrace-daemon` in release mode and returns the path of `pftraced`.
/// The daemon's build.rs compiles pftrace-ebpf with aya-build, which needs the
/// nightly toolchain with rust-src and bpf-linker on PATH (setup provides them).
pub fn build() -> Result<PathBuf> {
    let step = Step::new("build", "pftrace-daemon (release)");
    step.say("cargo build --release -p pftrace-daemon");
    util::run(util::cargo().args(["build", "--release", "-p", "pftrace-daemon"])).context(
        "building pftrace-daemon failed; see cargo's messages above (eBPF build errors come from its build.rs)",
    )?;
    let pftraced = util::target_dir().join("release").join("pftraced");
    util::require_file(&pftraced, "pftraced")
        .context("cargo build succeeded but produced no pftraced binary")?;
    step.done(format!("built {}", pftraced.display()));
    Ok(pftraced)
}
