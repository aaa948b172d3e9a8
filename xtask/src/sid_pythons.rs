//! The `debian sid pythons` step of setup: Debian sid's CPython 3.13, 3.14 and
//! 3.15 packages, unpacked once into /var/cache/pftrace/debian-sid.
//!
//! Tests need Debian's own builds (built --with-dtrace; 3.15 restored the
//! function probes, 3.13/3.14 lack them). They need glibc 2.38 or newer and
//! Debian 12 has 2.36, so sid's libc6 is unpacked beside them and each
//! interpreter is patched (patchelf) to use sid's loader, with an RPATH to
//! sid's libraries (an RPATH, not a RUNPATH, so that extension modules'
//! libraries, e.g. libffi for ctypes, also come from sid). The system's
//! packages are not touched: a private apt configuration with a sid source
//! on this machine's own Debian mirror downloads the .debs.
//!
//! The tree is made in a directory beside ROOT, checked, its stdlib compiled,
//! then renamed into place: when ROOT/usr/bin/python3.15 exists it is usable.
//! About 21 MB is downloaded (measured 2026-11-26: python3.X-minimal,
//! libpython3.X-minimal and libpython3.X-stdlib for three versions, and six
//! libraries); the tree takes about 100 MB.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::apt::{self, apt_get};
use crate::util::{self, Step, which_on_path};

/// Where the interpreters live: ROOT/usr/bin/python3.X.
pub const ROOT: &str = "/var/cache/pftrace/debian-sid";
/// The versions unpacked (each as `python3.X` under ROOT/usr/bin).
pub const VERSIONS: [&str; 3] = ["3.13", "3.14", "3.15"];
/// Libraries the interpreters and the stdlib modules the tests use need
/// beyond Debian 12's: the C library (and loader), libgcc, zlib, expat,
/// zstd, and libffi (ctypes). Not libssl: `ssl` does not import (`hashlib`
/// falls back to its built-in hashes).
const LIBRARIES: [&str; 6] = ["libc6", "libgcc-s1", "zlib1g", "libexpat1", "libzstd1", "libffi8"];
/// sid's loader and library directory, relative to ROOT (amd64).
const LOADER: &str = "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2";
const LIB_DIR: &str = "usr/lib/x86_64-linux-gnu";
/// What each interpreter must import to count as usable.
const CHECK: &str = "import sys, json, decimal, threading, asyncio, subprocess, ctypes\n\
                     print('%d.%d' % sys.version_info[:2], sys.version.split()[0], sys.prefix)";

/// An interpreter's path under `root`.
pub fn python_in(root: &Path, version: &str) -> PathBuf {
    root.join("usr/bin").join(format!("python{version}"))
}

/// The sid packages to download.
fn packages() -> Vec<String> {
    let mut packages: Vec<String> = VERSIONS
        .iter()
        .flat_map(|v| {
            [format!("python{v}-minimal"), format!("libpython{v}-minimal"), format!("libpython{v}-stdlib")]
        })
        .collect();
    packages.extend(LIBRARIES.iter().map(|p| p.to_string()));
    packages
}

/// Returns the root holding sid's interpreters: `$PFTRACE_SID_ROOT` if set
/// (checked, never built), else ROOT, made if missing or broken.
pub fn ensure() -> Result<PathBuf> {
    let step = Step::new("setup", "debian sid pythons");
    if let Some(root) = std::env::var_os("PFTRACE_SID_ROOT").filter(|p| !p.is_empty()) {
        let root = PathBuf::from(root);
        let versions = verify_all(&root, &root.join("usr"), None).with_context(|| {
            format!(
                "PFTRACE_SID_ROOT={} does not hold working Debian sid interpreters: unset it to let setup make {ROOT}",
                root.display()
            )
        })?;
        step.say(format!("ok (PFTRACE_SID_ROOT={}: {versions})", root.display()));
        return Ok(root);
    }

    let root = Path::new(ROOT);
    if root.exists() {
        match verify_all(root, &root.join("usr"), None) {
            Ok(versions) => {
                step.say(format!("ok (present: {ROOT}: {versions})"));
                return Ok(root.to_path_buf());
            }
            Err(err) => step.say(format!("{ROOT} is broken ({err:#}); making it again")),
        }
    }
    if !util::is_root() {
        bail!(
            "Debian sid's CPython {} are missing or broken under {ROOT}: making them needs root (apt-get \
             download, writing /var/cache/pftrace); run `cargo xtask setup` as root",
            VERSIONS.join(", ")
        );
    }
    if which_on_path("patchelf").is_none() {
        bail!("`patchelf` not found: the `apt packages` step installs it (`apt-get install patchelf`)");
    }
    let arch = util::output(Command::new("dpkg").arg("--print-architecture"))?;
    if arch.trim() != "amd64" {
        bail!("Debian sid's interpreters are set up for amd64 only; this machine is {}", arch.trim());
    }

    // Another setup (another worktree) may be making it right now: one at a time.
    let parent = root.parent().expect("ROOT has a parent");
    fs::create_dir_all(parent).with_context(|| format!("could not create {}", parent.display()))?;
    let _lock = util::lock(&parent.join("debian-sid.lock"))?;
    if let Ok(versions) = verify_all(root, &root.join("usr"), None) {
        step.say(format!("ok (made meanwhile by another setup: {ROOT}: {versions})"));
        return Ok(root.to_path_buf());
    }
    step.say(format!(
        "downloading Debian sid's CPython {} into {ROOT} (about 21 MB, once)",
        VERSIONS.join(", ")
    ));
    let versions = make(&step, root)?;
    step.done(format!("made {ROOT}: {versions}"));
    Ok(root.to_path_buf())
}

/// Runs every interpreter under `root` and checks its version and prefix;
/// returns "3.13.18, 3.14.10, 3.15.2". With `staged_loader`, each runs
/// through that loader with `prefix` as PYTHONHOME (a tree not yet in place,
/// whose patched paths point at ROOT).
fn verify_all(root: &Path, prefix: &Path, staged_loader: Option<&Path>) -> Result<String> {
    let mut found = Vec::new();
    for version in VERSIONS {
        let python = python_in(root, version);
        util::require_file(&python, &format!("Debian sid's CPython {version}"))?;
        let mut cmd = match staged_loader {
            Some(loader) => {
                let mut cmd = Command::new(loader);
                cmd.arg("--library-path").arg(root.join(LIB_DIR)).arg(&python).env("PYTHONHOME", prefix);
                cmd
            }
            None => Command::new(&python),
        };
        cmd.args(["-c", CHECK]);
        let out = util::output(&mut cmd)
            .with_context(|| format!("{} does not run or lacks a module the tests use", python.display()))?;
        let words: Vec<&str> = out.split_whitespace().collect();
        let [major_minor, full, sys_prefix] = words[..] else {
            bail!("{} printed {out:?}, not its version and prefix", python.display());
        };
        if major_minor != version {
            bail!("{} is CPython {full}, not {version}", python.display());
        }
        if Path::new(sys_prefix) != prefix {
            bail!("{} takes its stdlib from {sys_prefix}, not {}", python.display(), prefix.display());
        }
        found.push(full.to_string());
    }
    Ok(found.join(", "))
}

/// Downloads, unpacks, patches and checks the tree beside `root`, then renames it into place.
fn make(step: &Step, root: &Path) -> Result<String> {
    let keyring = apt::require_debian_keyring()?;
    let mirror = apt::debian_mirror()?;
    let parent = root.parent().expect("ROOT has a parent");
    let work = parent.join(format!("debian-sid.build-{}", std::process::id()));
    for leftover in fs::read_dir(parent)?.filter_map(|e| e.ok()).map(|e| e.path()) {
        // Leftovers of an interrupted run (we hold the lock): never reused.
        let name = leftover.file_name().unwrap_or_default().to_string_lossy().into_owned();
        if name.starts_with("debian-sid.build-") || name.starts_with("debian-sid.old-") {
            fs::remove_dir_all(&leftover)
                .with_context(|| format!("could not remove {}", leftover.display()))?;
        }
    }
    let (apt_dir, debs, tree) = (work.join("apt"), work.join("debs"), work.join("tree"));
    for dir in
        [apt_dir.join("lists/partial"), apt_dir.join("cache/archives/partial"), debs.clone(), tree.clone()]
    {
        fs::create_dir_all(&dir).with_context(|| format!("could not create {}", dir.display()))?;
    }
    let sources = apt_dir.join("sources.list");
    fs::write(&sources, format!("deb [signed-by={}] {mirror} sid main\n", keyring.display()))
        .with_context(|| format!("could not write {}", sources.display()))?;

    // A private apt: its own source list, index and cache, so the system's
    // package state never sees sid. Only the Packages index is fetched.
    let private_apt = |args: &[&str]| {
        let mut cmd = apt_get();
        for option in [
            format!("Dir::Etc::SourceList={}", sources.display()),
            "Dir::Etc::SourceParts=-".into(),
            format!("Dir::State::Lists={}", apt_dir.join("lists").display()),
            format!("Dir::Cache={}", apt_dir.join("cache").display()),
            "APT::Sandbox::User=root".into(),
            "Acquire::Languages=none".into(),
            "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".into(),
        ] {
            cmd.arg("-o").arg(option);
        }
        cmd.args(args).current_dir(&debs);
        cmd
    };
    util::run(&mut private_apt(&["update"]))
        .context("fetching sid's package index failed (the mirror comes from this machine's apt sources)")?;
    let packages = packages();
    let mut download = private_apt(&["download"]);
    download.args(&packages);
    util::run(&mut download)
        .with_context(|| format!("downloading {} from sid failed", packages.join(" ")))?;

    let mut unpacked = 0;
    for deb in fs::read_dir(&debs)?.filter_map(|e| e.ok()).map(|e| e.path()) {
        if deb.extension().is_some_and(|e| e == "deb") {
            util::output(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree))
                .with_context(|| format!("unpacking {} failed", deb.display()))?;
            unpacked += 1;
        }
    }
    if unpacked != packages.len() {
        bail!("apt-get download left {unpacked} .deb files in {}, not {}", debs.display(), packages.len());
    }
    for version in VERSIONS {
        util::output(
            Command::new("patchelf")
                .arg("--set-interpreter")
                .arg(root.join(LOADER))
                .arg("--force-rpath")
                .arg("--set-rpath")
                .arg(root.join(LIB_DIR))
                .arg(python_in(&tree, version)),
        )
        .with_context(|| format!("patchelf on python{version} failed"))?;
    }
    verify_all(&tree, &tree.join("usr"), Some(&tree.join(LOADER)))
        .context("the unpacked interpreters failed their check before being moved into place")?;
    compile_stdlib(&tree, root)?;

    // Into place: a broken old tree goes aside first (rename is atomic; the
    // directory is either the old one or the new one).
    let old = parent.join(format!("debian-sid.old-{}", std::process::id()));
    if root.exists() {
        fs::rename(root, &old)
            .with_context(|| format!("could not move the broken {} aside", root.display()))?;
    }
    fs::rename(&tree, root)
        .with_context(|| format!("could not move {} to {}", tree.display(), root.display()))?;
    let versions = verify_all(root, &root.join("usr"), None);
    for dir in [&work, &old] {
        if dir.exists()
            && let Err(err) = fs::remove_dir_all(dir)
        {
            step.say(format!("note: could not remove {}: {err}", dir.display()));
        }
    }
    versions.context("the interpreters failed their check once in place")
}

/// Compiles each stdlib to .pyc files, as Debian's postinst (py3compile)
/// would: the packages ship none, and without them every start compiles what
/// it imports (`import asyncio, ctypes, decimal, json`: 0.43 s, 0.10 s with
/// them; about 3 s per version, run side by side). Paths in the .pyc files
/// name `root`, where the tree is moved next. One process per version (-j 1):
/// compileall's workers would start the patched interpreter, whose loader is
/// not in place yet.
fn compile_stdlib(tree: &Path, root: &Path) -> Result<()> {
    std::thread::scope(|scope| {
        let runs: Vec<_> = VERSIONS
            .iter()
            .map(|version| {
                scope.spawn(move || {
                    let mut cmd = Command::new(tree.join(LOADER));
                    cmd.arg("--library-path")
                        .arg(tree.join(LIB_DIR))
                        .arg(python_in(tree, version))
                        .env("PYTHONHOME", tree.join("usr"))
                        .env_remove("PYTHONDONTWRITEBYTECODE")
                        .args(["-m", "compileall", "-q", "-j", "1", "-s"])
                        .arg(tree)
                        .arg("-p")
                        .arg(root)
                        .arg(tree.join("usr/lib").join(format!("python{version}")));
                    util::output(&mut cmd)
                        .with_context(|| format!("compiling python{version}'s stdlib failed"))
                })
            })
            .collect();
        runs.into_iter().try_for_each(|run| run.join().expect("compileall thread panicked").map(drop))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packages_cover_every_version_and_the_libraries() {
        let packages = packages();
        assert_eq!(packages.len(), 3 * VERSIONS.len() + LIBRARIES.len());
        for v in VERSIONS {
            assert!(packages.contains(&format!("libpython{v}-stdlib")), "{packages:?}");
        }
        assert!(packages.contains(&"libc6".to_string()));
        assert_eq!(
            python_in(Path::new(ROOT), "3.15"),
            Path::new("/var/cache/pftrace/debian-sid/usr/bin/python3.15")
        );
    }
}
