//! The `greenlet` step of setup: greenlet (what gevent and eventlet switch
//! Python stacks with) for the probe-enabled CPython 3.9, for the tests of
//! stack switching the probes do not see (tests/it/greenlets.rs). pftrace's
//! own 3.9 has no pip, so the hatchet venv's pip downloads the cp39 wheel
//! from the machine's configured index and it is unpacked under
//! /var/cache/pftrace/greenlet-cp39, which the tests put on PYTHONPATH.
//! The version is pinned; a directory without the completion marker (an
//! interrupted install) is made again.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::util::{self, Step};

/// 3.2.5: the newest release with cp39 wheels (3.3 dropped 3.9), checked
/// on 2026-11-28.
pub const VERSION: &str = "3.2.5";
const DIR: &str = "/var/cache/pftrace/greenlet-cp39";
/// Written last, holding [`VERSION`]: the directory is complete.
const MARKER: &str = ".pftrace-complete";

/// A directory that, on PYTHONPATH, makes `import greenlet` work in
/// `python` (CPython 3.9); `pip` downloads the wheel.
pub fn ensure(python: &Path, pip: &Path) -> Result<PathBuf> {
    let step = Step::new("setup", "greenlet");
    let dir = Path::new(DIR);
    if std::fs::read_to_string(dir.join(MARKER)).is_ok_and(|v| v.trim() == VERSION) && imports(python, dir) {
        step.say(format!("ok (greenlet {VERSION} for CPython 3.9 in {DIR})"));
        return Ok(dir.to_path_buf());
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing the incomplete {DIR}"))?;
    }
    step.say(format!(
        "installing greenlet {VERSION} (cp39 wheel; pip, the machine's configured index) into {DIR}"
    ));
    let wheels = dir.join("wheel");
    let log = Path::new("/var/cache/pftrace/greenlet-cp39-pip.log");
    util::run_logged(
        Command::new(pip)
            .args(["download", "--disable-pip-version-check", "--no-deps", "--only-binary=:all:"])
            .args(["--python-version", "3.9", "--implementation", "cp", "--abi", "cp39"])
            .args(["--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64"])
            .arg(format!("greenlet=={VERSION}"))
            .arg("-d")
            .arg(&wheels),
        log,
    )
    .with_context(|| format!("pip download greenlet=={VERSION} for cp39 (log: {})", log.display()))?;
    let wheel = std::fs::read_dir(&wheels)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .with_context(|| format!("pip left no wheel in {}", wheels.display()))?;
    // A wheel is a zip: Python's own zipfile unpacks it (no unzip needed).
    util::run(Command::new(python).args(["-m", "zipfile", "-e"]).arg(&wheel).arg(dir))?;
    std::fs::remove_dir_all(&wheels)?;
    if !imports(python, dir) {
        anyhow::bail!(
            "{} cannot import greenlet from {DIR} after unpacking {}",
            python.display(),
            wheel.display()
        );
    }
    std::fs::write(dir.join(MARKER), VERSION)?;
    step.done(format!("installed greenlet {VERSION}"));
    Ok(dir.to_path_buf())
}

fn imports(python: &Path, dir: &Path) -> bool {
    Command::new(python)
        .env("PYTHONPATH", dir)
        .args(["-c", "import greenlet; greenlet.greenlet(lambda: None).switch()"])
        .output()
        .is_ok_and(|o| o.status.success())
}
