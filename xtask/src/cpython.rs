//! The `python` step of setup: a CPython whose USDT probes fire, built once and cached.
//!
//! CPython 3.6–3.10 built `--with-dtrace` fire `python:function__entry` and
//! `python:function__return` for every call. Debian 12 ships 3.11, whose entry
//! probe does not fire for ordinary calls, so we build Debian bullseye's 3.9
//! source package ourselves into /var/cache/pftrace (outside the clone, so later
//! runs and CI reuse it). The build happens in a scratch directory and is moved
//! into place only after it is verified; a marker file then marks it good.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use object::{Object, ObjectSection};

use crate::apt::{self, apt_get};
use crate::util::{self, Step, which_on_path};

pub const CACHE_ROOT: &str = "/var/cache/pftrace";
pub const PREFIX: &str = "/var/cache/pftrace/cpython-3.9-dtrace";
const PYTHON_REL: &str = "bin/python3.9";
const MARKER: &str = ".pftrace-ok";
const SOURCE_PACKAGE: &str = "python3.9";
const SOURCES_FILE: &str = "/etc/apt/sources.list.d/pftrace-bullseye-src.sources";

/// The deb-src entry for bullseye, on this machine's own Debian mirror.
fn sources_content(mirror: &str) -> String {
    format!(
        "# Added by pftrace's `cargo xtask setup`: CPython 3.9 source, built --with-dtrace.\n\
         Types: deb-src\n\
         URIs: {mirror}\n\
         Suites: bullseye\n\
         Components: main\n\
         Signed-By: {}\n",
        apt::DEBIAN_KEYRING
    )
}

/// The probe-enabled interpreter's path once `ensure` has made it.
pub fn cached_python() -> PathBuf {
    Path::new(PREFIX).join(PYTHON_REL)
}

/// Returns a probe-enabled python: `$PFTRACE_PYTHON` if set, else the cached
/// build, which is made if missing or not verified.
pub fn ensure() -> Result<PathBuf> {
    let step = Step::new("setup", "python");
    if let Some(path) = std::env::var_os("PFTRACE_PYTHON").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        util::require_file(&path, "PFTRACE_PYTHON")
            .context("set PFTRACE_PYTHON to a python executable or unset it")?;
        let version = python_version(&path).context("the python named by PFTRACE_PYTHON does not run")?;
        let probes = probes_in(&path).unwrap_or_default();
        let note = if probes.entry > 0 && probes.ret > 0 {
            String::new()
        } else {
            " — warning: no python:function__entry/return notes in this file (a --enable-shared build keeps them in libpython)".into()
        };
        step.say(format!("ok (PFTRACE_PYTHON={}, Python {version}){note}", path.display()));
        return Ok(path);
    }

    let python = cached_python();
    let marker = Path::new(PREFIX).join(MARKER);
    if marker.is_file() {
        match verify(&python) {
            Ok(summary) => {
                step.say(format!("ok (present: {}, {summary})", python.display()));
                return Ok(python);
            }
            Err(err) => step.say(format!("cached build at {PREFIX} is broken ({err:#}); rebuilding")),
        }
    }
    if !util::is_root() {
        bail!(
            "no probe-enabled CPython at {}: building it needs root (apt-get source, writing {CACHE_ROOT}); \
             run `cargo xtask setup` as root, or set PFTRACE_PYTHON to a CPython 3.6-3.10 built --with-dtrace",
            python.display()
        );
    }
    step.say(format!("building CPython 3.9 --with-dtrace into {PREFIX} (a few minutes, once)"));
    build(&step)?;
    let summary = verify(&python).context("the freshly installed CPython failed verification")?;
    step.done(format!("built {} ({summary})", python.display()));
    Ok(python)
}

/// Checks that the interpreter runs and has both probes; returns a short summary.
fn verify(python: &Path) -> Result<String> {
    util::require_file(python, "python")?;
    let version = python_version(python)?;
    let probes = probes_in(python)?;
    if probes.entry == 0 || probes.ret == 0 {
        bail!(
            "{} has {} function__entry and {} function__return probe notes; it was not built --with-dtrace",
            python.display(),
            probes.entry,
            probes.ret
        );
    }
    Ok(format!("Python {version}, probes: {} function__entry, {} function__return", probes.entry, probes.ret))
}

/// Runs `python -c 'import sys;print(sys.version)'` and returns the first word.
fn python_version(python: &Path) -> Result<String> {
    let out = util::output(Command::new(python).args(["-c", "import sys;print(sys.version)"]))
        .with_context(|| format!("{} does not run", python.display()))?;
    Ok(out.split_whitespace().next().unwrap_or("?").to_string())
}

/// Counts of CPython's call probes found in a binary.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Probes {
    pub entry: usize,
    pub ret: usize,
}

/// Reads the `.note.stapsdt` section of an ELF file and counts the
/// `python:function__entry` and `python:function__return` probes.
pub fn probes_in(path: &Path) -> Result<Probes> {
    let data = fs::read(path).with_context(|| format!("could not read {}", path.display()))?;
    let file =
        object::File::parse(&*data).with_context(|| format!("{} is not an ELF file", path.display()))?;
    let Some(section) = file.section_by_name(".note.stapsdt") else {
        return Ok(Probes::default());
    };
    let notes = section.data().context("could not read .note.stapsdt")?;
    let mut probes = Probes::default();
    for (provider, name) in stapsdt_notes(notes, file.is_little_endian(), file.is_64()) {
        match (provider.as_str(), name.as_str()) {
            ("python", "function__entry") => probes.entry += 1,
            ("python", "function__return") => probes.ret += 1,
            _ => {}
        }
    }
    Ok(probes)
}

/// Parses the notes of a `.note.stapsdt` section into (provider, name) pairs.
/// Each note: namesz, descsz, type (3), "stapsdt\0" padded to 4, then a desc of
/// three addresses (pc, base, semaphore) and provider\0name\0args\0.
pub fn stapsdt_notes(mut data: &[u8], little_endian: bool, is_64: bool) -> Vec<(String, String)> {
    let u32_at = |b: &[u8]| {
        let a = [b[0], b[1], b[2], b[3]];
        if little_endian { u32::from_le_bytes(a) } else { u32::from_be_bytes(a) }
    };
    let align4 = |n: usize| (n + 3) & !3;
    let addr_size = if is_64 { 8 } else { 4 };
    let mut found = Vec::new();
    while data.len() >= 12 {
        let namesz = u32_at(&data[0..4]) as usize;
        let descsz = u32_at(&data[4..8]) as usize;
        let kind = u32_at(&data[8..12]);
        let name_end = 12 + align4(namesz);
        let desc_end = name_end + align4(descsz);
        if desc_end > data.len() {
            break;
        }
        let owner = &data[12..12 + namesz];
        let desc = &data[name_end..name_end + descsz];
        if kind == 3 && owner == b"stapsdt\0" && desc.len() > 3 * addr_size {
            let mut strings = desc[3 * addr_size..].split(|&b| b == 0);
            if let (Some(provider), Some(name)) = (strings.next(), strings.next()) {
                found.push((
                    String::from_utf8_lossy(provider).into_owned(),
                    String::from_utf8_lossy(name).into_owned(),
                ));
            }
        }
        data = &data[desc_end..];
    }
    found
}

/// Downloads, builds, verifies and installs CPython into PREFIX.
fn build(step: &Step) -> Result<()> {
    for tool in ["dtrace", "make", "gcc", "dpkg-source"] {
        if which_on_path(tool).is_none() {
            bail!(
                "`{tool}` not found: the `apt packages` step installs it (systemtap-sdt-dev, build-essential, dpkg-dev)"
            );
        }
    }
    ensure_source_list(step)?;

    let build_root = Path::new(CACHE_ROOT).join("build");
    if build_root.exists() {
        // Leftovers of an interrupted or failed build: never reused.
        fs::remove_dir_all(&build_root)
            .with_context(|| format!("could not remove {}", build_root.display()))?;
    }
    let work = build_root.join(format!("work-{}", std::process::id()));
    fs::create_dir_all(&work).with_context(|| format!("could not create {}", work.display()))?;
    let log = work.join("build.log");

    step.say(format!("downloading the {SOURCE_PACKAGE} source package from bullseye"));
    util::run(apt_get().current_dir(&work).args(["-o", "APT::Sandbox::User=root", "source", SOURCE_PACKAGE]))
        .context("`apt-get source python3.9` failed: is bullseye's deb-src reachable?")?;
    let src = fs::read_dir(&work)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.is_dir() && p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("python3.9-")))
        .with_context(|| format!("apt-get source left no python3.9-* directory in {}", work.display()))?;

    let jobs = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).to_string();
    let make = |args: &[&str]| {
        let mut cmd = Command::new("make");
        cmd.current_dir(&src)
            .args(args)
            // Don't inherit a jobserver or flags meant for cargo's build scripts.
            .env_remove("MAKEFLAGS")
            .env_remove("MFLAGS")
            .env_remove("MAKELEVEL")
            .env_remove("CARGO_MAKEFLAGS");
        cmd
    };

    let phase = Step::new("setup", "python: configure");
    phase.say(format!("in {}", src.display()));
    util::run_logged(
        Command::new("./configure").current_dir(&src).env_remove("MAKEFLAGS").args([
            &format!("--prefix={PREFIX}"),
            "--with-dtrace",
            "--with-ensurepip=no",
        ]),
        &log,
    )
    .context("configure failed")?;
    phase.done("ok");

    let phase = Step::new("setup", "python: make");
    phase.say(format!("make -j{jobs}"));
    util::run_logged(&mut make(&[&format!("-j{jobs}")]), &log).context("make failed")?;
    phase.done("ok");

    let stage = work.join("stage");
    let phase = Step::new("setup", "python: make altinstall");
    util::run_logged(&mut make(&["altinstall", &format!("DESTDIR={}", stage.display())]), &log)
        .context("make altinstall failed")?;
    phase.done("ok");

    let staged_prefix = stage.join(PREFIX.trim_start_matches('/'));
    let summary =
        verify(&staged_prefix.join(PYTHON_REL)).context("the staged CPython failed verification")?;
    step.say(format!("staged build verified ({summary})"));

    let prefix = Path::new(PREFIX);
    if prefix.exists() {
        fs::remove_dir_all(prefix).with_context(|| format!("could not remove the old {PREFIX}"))?;
    }
    fs::rename(&staged_prefix, prefix)
        .with_context(|| format!("could not move {} to {PREFIX}", staged_prefix.display()))?;
    verify(&cached_python()).context("the installed CPython failed verification")?;
    fs::write(
        prefix.join(MARKER),
        format!("built by pftrace's `cargo xtask setup` from Debian bullseye's {SOURCE_PACKAGE} source\n{summary}\n"),
    )
    .context("could not write the marker file")?;
    if let Err(err) = fs::remove_dir_all(&build_root) {
        step.say(format!("note: could not remove {}: {err}", build_root.display()));
    }
    Ok(())
}

/// Adds bullseye's deb-src entry and fetches its index if `apt-cache` doesn't
/// know the source package yet. Only that one source is updated.
fn ensure_source_list(step: &Step) -> Result<()> {
    apt::require_debian_keyring()?;
    let content = sources_content(&apt::debian_mirror()?);
    if fs::read_to_string(SOURCES_FILE).ok().as_deref() != Some(content.as_str()) {
        step.say(format!("adding {SOURCES_FILE}"));
        fs::write(SOURCES_FILE, content).with_context(|| format!("could not write {SOURCES_FILE}"))?;
    }
    if source_known() {
        return Ok(());
    }
    step.say("fetching bullseye's source index");
    util::run(apt_get().args([
        "-o",
        &format!("Dir::Etc::SourceList={SOURCES_FILE}"),
        "-o",
        "Dir::Etc::SourceParts=-",
        "-o",
        "APT::Get::List-Cleanup=0",
        "update",
    ]))
    .context("apt-get update of bullseye's deb-src failed")?;
    if !source_known() {
        bail!(
            "apt-cache still does not know the {SOURCE_PACKAGE} source package after updating {SOURCES_FILE}"
        );
    }
    Ok(())
}

fn source_known() -> bool {
    util::output(Command::new("apt-cache").args(["showsrc", SOURCE_PACKAGE]))
        .map(|out| out.lines().any(|l| l.starts_with("Version: 3.9")))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(provider: &str, name: &str, args: &str) -> Vec<u8> {
        let mut desc = vec![0u8; 24];
        for s in [provider, name, args] {
            desc.extend_from_slice(s.as_bytes());
            desc.push(0);
        }
        let mut out = Vec::new();
        out.extend_from_slice(&8u32.to_le_bytes());
        out.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(b"stapsdt\0");
        let len = desc.len();
        out.extend_from_slice(&desc);
        out.resize(out.len() + ((4 - len % 4) % 4), 0);
        out
    }

    #[test]
    fn parses_stapsdt_notes() {
        let mut data = note("python", "function__entry", "8@%r12 8@%r14 -4@%eax");
        data.extend(note("python", "function__return", "8@%r12 8@%r13 -4@%eax"));
        data.extend(note("python", "gc__start", "-4@%edi"));
        let notes = stapsdt_notes(&data, true, true);
        assert_eq!(
            notes,
            vec![
                ("python".into(), "function__entry".into()),
                ("python".into(), "function__return".into()),
                ("python".into(), "gc__start".into()),
            ]
        );
    }

    #[test]
    fn truncated_notes_are_ignored() {
        let data = note("python", "function__entry", "");
        assert!(stapsdt_notes(&data[..data.len() - 8], true, true).is_empty());
        assert!(stapsdt_notes(&[], true, true).is_empty());
    }

    #[test]
    fn a_binary_without_notes_has_no_probes() {
        let me = std::env::current_exe().unwrap();
        let probes = probes_in(&me).unwrap();
        assert_eq!(probes, Probes::default());
    }

    #[test]
    fn source_list_is_deb822_for_bullseye_on_the_given_mirror() {
        let content = sources_content("http://mirror.example/debian");
        let sources = apt::parse_deb822(&content);
        assert_eq!(sources.len(), 1, "{content}");
        assert_eq!(sources[0].types, ["deb-src"]);
        assert_eq!(sources[0].uris, ["http://mirror.example/debian"]);
        assert_eq!(sources[0].suites, ["bullseye"]);
        assert_eq!(sources[0].components, ["main"]);
        assert!(cached_python().starts_with(CACHE_ROOT));
    }
}
