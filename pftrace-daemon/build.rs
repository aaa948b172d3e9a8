//! Compiles the pftrace-ebpf crate for the BPF target (nightly, rust-src,
//! bpf-linker: `cargo xtask setup` installs them) and leaves the object in
//! OUT_DIR, where src/bpf/loader.rs embeds it; and builds the in-process
//! agent (`pftrace-agent`, a CPython extension) as a shared object into
//! OUT_DIR, where src/agent/mod.rs embeds it.
use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, anyhow, bail};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } =
        cargo_metadata::MetadataCommand::new().no_deps().exec().context("MetadataCommand::exec")?;
    let agent = packages
        .iter()
        .find(|p| p.name.as_str() == "pftrace-agent")
        .ok_or_else(|| anyhow!("pftrace-agent package not found"))?;
    build_agent(agent.manifest_path.as_std_path())?;
    let ebpf_package = packages
        .into_iter()
        .find(|p| p.name.as_str() == "pftrace-ebpf")
        .ok_or_else(|| anyhow!("pftrace-ebpf package not found"))?;
    let root_dir = ebpf_package
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf_package.manifest_path))?;
    let package = aya_build::Package {
        name: ebpf_package.name.as_str(),
        root_dir: root_dir.as_str(),
        ..Default::default()
    };
    aya_build::build_ebpf([package], Toolchain::default())
        .context("building the eBPF programs failed; run `cargo xtask setup` to install nightly rust-src and bpf-linker")
}

/// `cargo build --release` of the agent in a target directory of its own
/// under OUT_DIR (the outer build holds the workspace's), always optimised:
/// its callbacks run inside traced programs. Copied to OUT_DIR/pftrace_agent.so.
fn build_agent(manifest: &std::path::Path) -> anyhow::Result<()> {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR")?);
    let target_dir = out.join("agent-target");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--release", "--lib", "-p", "pftrace-agent", "--manifest-path"])
        .arg(manifest)
        .arg("--target-dir")
        .arg(&target_dir);
    // The outer build's settings for this crate's build script, not for the agent.
    for var in ["RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "CARGO_TARGET_DIR", "CARGO_BUILD_TARGET", "TARGET"] {
        cmd.env_remove(var);
    }
    let status = cmd.status().context("running cargo to build pftrace-agent")?;
    if !status.success() {
        bail!("building pftrace-agent (the in-process agent) failed: {status}");
    }
    let so = target_dir.join("release/libpftrace_agent.so");
    std::fs::copy(&so, out.join("pftrace_agent.so")).with_context(|| format!("copying {}", so.display()))?;
    let root = manifest.parent().context("agent manifest")?;
    for dir in ["src", "python", "Cargo.toml", "../pftrace-names", "../pftrace-common/src"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    Ok(())
}
