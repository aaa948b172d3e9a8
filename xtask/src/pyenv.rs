//! The `pyenv pythons` step of setup: pyenv's CPython builds the tests run
//! (none built --with-dtrace: 3.9.18 for the "no probes" refusal, 3.11-3.13
//! for the version refusals and the in-process agent). This machine's image
//! comes with them; when one is missing, `pyenv install -s` builds it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::util::{self, Step, which_on_path};

/// Every pyenv version the tests use.
pub const VERSIONS: [&str; 4] = ["3.9.18", "3.11.7", "3.12.1", "3.13.0"];

/// pyenv's root: `$PFTRACE_PYENV_ROOT`, else `$PYENV_ROOT`, else `~/.pyenv`.
fn root() -> PathBuf {
    for var in ["PFTRACE_PYENV_ROOT", "PYENV_ROOT"] {
        if let Some(dir) = std::env::var_os(var).filter(|d| !d.is_empty()) {
            return PathBuf::from(dir);
        }
    }
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty()).unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".pyenv")
}

/// `ROOT/versions/3.12.1/bin/python3.12`.
pub fn python_in(root: &Path, version: &str) -> PathBuf {
    let major_minor = version.rsplit_once('.').map_or(version, |(mm, _)| mm);
    root.join("versions").join(version).join("bin").join(format!("python{major_minor}"))
}

/// Checks that `python` runs and is exactly `version`.
fn verify(python: &Path, version: &str) -> Result<()> {
    util::require_file(python, &format!("pyenv's CPython {version}"))?;
    let out = util::output(
        Command::new(python).args(["-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"]),
    )
    .with_context(|| format!("{} does not run", python.display()))?;
    if out.trim() != version {
        bail!("{} is CPython {}, not {version}", python.display(), out.trim());
    }
    Ok(())
}

/// The pyenv executable: on PATH, else ROOT/bin/pyenv.
fn pyenv_program(root: &Path) -> Option<PathBuf> {
    which_on_path("pyenv").or_else(|| Some(root.join("bin/pyenv")).filter(|p| p.is_file()))
}

/// Checks every version in [`VERSIONS`]; installs missing ones with pyenv if
/// it exists. Returns pyenv's root.
pub fn ensure() -> Result<PathBuf> {
    let step = Step::new("setup", "pyenv pythons");
    let root = root();
    let missing: Vec<(&str, anyhow::Error)> =
        VERSIONS.iter().filter_map(|v| verify(&python_in(&root, v), v).err().map(|e| (*v, e))).collect();
    if missing.is_empty() {
        step.say(format!("ok (present under {}: {})", root.join("versions").display(), VERSIONS.join(" ")));
        return Ok(root);
    }
    let names: Vec<&str> = missing.iter().map(|(v, _)| *v).collect();
    let why: Vec<String> = missing.iter().map(|(_, e)| format!("{e:#}")).collect();
    let Some(pyenv) = pyenv_program(&root) else {
        bail!(
            "pyenv's CPython {} missing ({}); pyenv is not installed (not on PATH, not in {}): install pyenv \
             (see its README), then run `pyenv install {}`, or set PFTRACE_PYENV_ROOT to a pyenv root that has them",
            names.join(", "),
            why.join("; "),
            root.join("bin").display(),
            names.join(" ")
        );
    };
    step.say(format!(
        "installing {} with {} (builds from source; minutes each)",
        names.join(" "),
        pyenv.display()
    ));
    for version in &names {
        util::run(Command::new(&pyenv).env("PYENV_ROOT", &root).args(["install", "-s", version]))
            .with_context(|| format!("`pyenv install -s {version}` failed: see its output above"))?;
        verify(&python_in(&root, version), version).with_context(|| {
            format!(
                "after `pyenv install -s {version}`, {} still does not work: remove {} and rerun",
                python_in(&root, version).display(),
                root.join("versions").join(version).display()
            )
        })?;
    }
    step.done(format!("installed {}", names.join(" ")));
    Ok(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpreter_path_uses_major_minor() {
        assert_eq!(
            python_in(Path::new("/root/.pyenv"), "3.12.1"),
            Path::new("/root/.pyenv/versions/3.12.1/bin/python3.12")
        );
        assert_eq!(python_in(Path::new("/p"), "3.9.18"), Path::new("/p/versions/3.9.18/bin/python3.9"));
    }
}
