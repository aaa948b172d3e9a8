//! `cargo xtask setup`: installs what building and testing pftrace needs, reusing what is present.
//!
//! Steps: Debian packages, the nightly toolchain with rust-src, bpf-linker, a
//! CPython whose USDT probes fire (built once into /var/cache/pftrace), Debian
//! sid's CPython 3.13-3.15 packages (unpacked into /var/cache/pftrace),
//! pyenv's CPythons, LLNL Hatchet (a venv in /var/cache/pftrace), and a
//! Debian bookworm root with systemd (debootstrap, into /var/cache/pftrace)
//! that the systemd service tests boot. Every step is idempotent and prints one line saying
//! whether it found or installed things.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::apt::{apt_get, dpkg_installed};
use crate::util::{self, Step, which_on_path};
use crate::{cpython, greenlet, hatchet, pyenv, sid_pythons, systemd_root};

/// Debian packages needed: LLVM 22 for bpf-linker, the `dtrace` tool and a C
/// toolchain with headers for building CPython, and Debian's CPython 3.11
/// (the refusal tests check pftraced's message for its broken entry probe),
/// patchelf (points Debian sid's interpreters at sid's own loader),
/// systemd (its `systemd-analyze verify` checks the unit file), passwd
/// (`useradd`: the control socket's test of a real unprivileged peer), and
/// debootstrap and systemd-container (systemd-nspawn) for the root the
/// systemd service tests boot.
pub const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "systemtap-sdt-dev",
    "build-essential",
    "dpkg-dev",
    "libffi-dev",
    "libssl-dev",
    "pkg-config",
    "python3.11",
    "python3.11-venv",
    "patchelf",
    "systemd",
    "passwd",
    "debootstrap",
    "systemd-container",
];

/// bpf-linker release to install, and the LLVM it is built against.
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_LINKER_LLVM_FEATURE: &str = "llvm-22";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// What setup found or made, for the tasks that run after it.
#[derive(Debug, Clone)]
pub struct Env {
    /// A CPython whose `python:function__entry`/`function__return` probes fire.
    pub python: PathBuf,
    /// Where Debian sid's CPython 3.13-3.15 are unpacked (`usr/bin/python3.X` under it).
    pub sid_root: PathBuf,
    /// pyenv's root, holding `versions/3.X.Y` for every version in [`pyenv::VERSIONS`].
    pub pyenv_root: PathBuf,
    /// A Debian bookworm root with systemd, booted by the systemd service tests.
    pub systemd_root: PathBuf,
    /// A python with LLNL Hatchet (reads PerfFlowAspect's files).
    pub hatchet_python: PathBuf,
    /// A directory giving `python` greenlet on PYTHONPATH.
    pub greenlet_path: PathBuf,
}

/// The steps building pftraced and running it on the bundled example need
/// (`cargo xtask demo`, `cargo xtask build`): packages, toolchain,
/// bpf-linker and the probe-enabled CPython 3.9. Returns that interpreter.
/// The test interpreters and the systemd root are left to [`run`], so the
/// demo on a fresh machine does not wait for them.
pub fn base() -> Result<PathBuf> {
    apt_packages("apt packages", APT_PACKAGES).context("setup step `apt packages` failed")?;
    rust_nightly().context("setup step `rust nightly + rust-src` failed")?;
    bpf_linker().context("setup step `bpf-linker` failed")?;
    cpython::ensure().context("setup step `python` failed")
}

/// Runs every setup step (what the tests and the benchmark need).
pub fn run() -> Result<Env> {
    let started = std::time::Instant::now();
    let python = base()?;
    let sid_root = sid_pythons::ensure().context("setup step `debian sid pythons` failed")?;
    let pyenv_root = pyenv::ensure().context("setup step `pyenv pythons` failed")?;
    let systemd_root = systemd_root::ensure().context("setup step `systemd root` failed")?;
    let hatchet_python = hatchet::ensure().context("setup step `hatchet` failed")?;
    let pip = hatchet_python.with_file_name("pip");
    let greenlet_path = greenlet::ensure(&python, &pip).context("setup step `greenlet` failed")?;
    println!(
        "[setup] all set ({:.1} s); PFTRACE_PYTHON={} PFTRACE_SID_ROOT={} PFTRACE_PYENV_ROOT={} \
         PFTRACE_SYSTEMD_ROOT={}",
        started.elapsed().as_secs_f64(),
        python.display(),
        sid_root.display(),
        pyenv_root.display(),
        systemd_root.display()
    );
    Ok(Env { python, sid_root, pyenv_root, systemd_root, hatchet_python, greenlet_path })
}

/// Debian packages only the benchmark needs: bpftrace, its comparison row
/// (issue 13: pftraced's sparse filter against bpftrace's in the same run).
/// Not in [`APT_PACKAGES`], so `cargo xtask test` does not wait for it.
pub const BENCH_APT_PACKAGES: &[&str] = &["bpftrace"];

/// Installs what `packages` lacks (apt-get, as root), reporting as `what`.
pub fn apt_packages(what: &str, packages: &[&str]) -> Result<()> {
    let step = Step::new("setup", what);
    if which_on_path("dpkg-query").is_none() || which_on_path("apt-get").is_none() {
        bail!("dpkg-query/apt-get not found: setup supports Debian and its derivatives only");
    }
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !dpkg_installed(p)).collect();
    if missing.is_empty() {
        step.say(format!("ok (present: {})", packages.join(" ")));
        return Ok(());
    }
    if !util::is_root() {
        bail!(
            "missing Debian packages: {}; installing them needs root: run `sudo apt-get install {}` or run xtask as root",
            missing.join(" "),
            missing.join(" ")
        );
    }
    step.say(format!("installing {}", missing.join(" ")));
    util::run(apt_get().arg("update"))
        .context("apt-get update failed: check the network and /etc/apt/sources.list.d")?;
    util::run(apt_get().args(["install", "-y", "--no-install-recommends"]).args(&missing))
        .with_context(|| format!("could not install {}", missing.join(" ")))?;
    let still: Vec<&str> = missing.iter().copied().filter(|p| !dpkg_installed(p)).collect();
    if !still.is_empty() {
        bail!("apt-get finished but these packages are still not installed: {}", still.join(" "));
    }
    step.done("installed");
    Ok(())
}

fn rust_nightly() -> Result<()> {
    let step = Step::new("setup", "rust nightly + rust-src");
    if which_on_path("rustup").is_none() {
        bail!("rustup not found on PATH: install rustup (https://rustup.rs), then rerun `cargo xtask setup`");
    }
    let toolchains = util::output(Command::new("rustup").args(["toolchain", "list"]))?;
    let has_nightly = toolchains.lines().any(|l| l.starts_with("nightly"));
    if !has_nightly {
        step.say("installing the nightly toolchain with rust-src");
        util::run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
        step.done("installed");
        return Ok(());
    }
    let components = util::output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))?;
    if components.lines().any(|l| l.trim().starts_with("rust-src")) {
        step.say("ok (present)");
        return Ok(());
    }
    step.say("installing rust-src for nightly");
    util::run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    step.done("installed");
    Ok(())
}

fn bpf_linker_version() -> Option<String> {
    let out = Command::new("bpf-linker").arg("--version").output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn bpf_linker() -> Result<()> {
    let step = Step::new("setup", "bpf-linker");
    if let Some(version) = bpf_linker_version() {
        let path = which_on_path("bpf-linker").map(|p| p.display().to_string()).unwrap_or_default();
        step.say(format!("ok (present: {version}, {path})"));
        return Ok(());
    }
    step.say(format!("installing bpf-linker {BPF_LINKER_VERSION} (LLVM from {LLVM_PREFIX}; about a minute)"));
    if !std::path::Path::new(LLVM_PREFIX).join("bin/llvm-config").is_file() {
        bail!(
            "{LLVM_PREFIX}/bin/llvm-config is missing: install llvm-22-dev (the `apt packages` step should have)"
        );
    }
    let mut cmd = util::cargo();
    cmd.env("LLVM_PREFIX", LLVM_PREFIX)
        // The toolchain that runs xtask is fine for bpf-linker; don't let a
        // cargo run's per-package variables leak into the install.
        .env_remove("CARGO_TARGET_DIR")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            BPF_LINKER_LLVM_FEATURE,
        ]);
    util::run(&mut cmd).context(
        "building bpf-linker failed: it needs llvm-22-dev, libpolly-22-dev, libzstd-dev and zlib1g-dev",
    )?;
    let version = bpf_linker_version().context(
        "bpf-linker was installed but `bpf-linker --version` does not run: is ~/.cargo/bin on PATH?",
    )?;
    step.done(format!("installed {version}"));
    Ok(())
}
