//! The `hatchet` step of setup: LLNL Hatchet (`llnl-hatchet` from the
//! machine's configured pip index) in a venv of Debian's python3.11 under
//! /var/cache/pftrace/hatchet, for the test that reads pftrace's pfw files
//! with `GraphFrame.from_perfflowaspect` (as PerfFlowAspect's users do).
//! The version is pinned; a venv without the completion marker (an
//! interrupted install) is made again.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::util::{self, Step};

/// The release installed (the newest here on 2026-11-26, wheels for cp311).
pub const VERSION: &str = "2026.2.0";
const DIR: &str = "/var/cache/pftrace/hatchet";
/// Written last, holding [`VERSION`]: the venv is complete.
const MARKER: &str = ".pftrace-complete";

/// The venv's python, with `hatchet` importable.
pub fn ensure() -> Result<PathBuf> {
    let step = Step::new("setup", "hatchet");
    let dir = Path::new(DIR);
    let python = dir.join("bin/python");
    if std::fs::read_to_string(dir.join(MARKER)).is_ok_and(|v| v.trim() == VERSION) && imports(&python) {
        step.say(format!("ok (llnl-hatchet {VERSION} in {DIR})"));
        return Ok(python);
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing the incomplete {DIR}"))?;
    }
    step.say(format!("installing llnl-hatchet {VERSION} into {DIR} (pip, the machine's configured index)"));
    util::run(Command::new("python3.11").args(["-m", "venv"]).arg(dir))?;
    let log = dir.join("pip-install.log");
    util::run_logged(
        Command::new(dir.join("bin/pip")).args([
            "install",
            "--disable-pip-version-check",
            &format!("llnl-hatchet=={VERSION}"),
        ]),
        &log,
    )
    .with_context(|| format!("pip install llnl-hatchet=={VERSION} (log: {})", log.display()))?;
    if !imports(&python) {
        anyhow::bail!(
            "{} cannot import hatchet after installing it (see {})",
            python.display(),
            log.display()
        );
    }
    std::fs::write(dir.join(MARKER), VERSION)?;
    step.done(format!("installed llnl-hatchet {VERSION}"));
    Ok(python)
}

fn imports(python: &Path) -> bool {
    Command::new(python)
        .args(["-c", "import hatchet; hatchet.GraphFrame.from_perfflowaspect"])
        .output()
        .is_ok_and(|o| o.status.success())
}
