//! Compiles the pftrace-ebpf crate for the BPF target (nightly, rust-src,
//! bpf-linker: `cargo xtask setup` installs them) and leaves the object in
//! OUT_DIR, where src/bpf/loader.rs embeds it.
use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } =
        cargo_metadata::MetadataCommand::new().no_deps().exec().context("MetadataCommand::exec")?;
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
