//! The interpreters the tests compare against (paths as in
//! pftrace-daemon/tests/common: `PFTRACE_PYTHON`, `PFTRACE_SID_ROOT`,
//! `PFTRACE_PYENV_ROOT`, else the defaults `cargo xtask setup` installs).
//! A missing interpreter fails the test with what to do.

#![allow(dead_code)]

use std::{env, path::PathBuf};

pub struct Interp {
    pub label: &'static str,
    pub path: PathBuf,
    pub version: pftrace_code::PyVersion,
}

fn root(var: &str, default: &str) -> PathBuf {
    env::var_os(var).filter(|v| !v.is_empty()).map_or_else(|| PathBuf::from(default), PathBuf::from)
}

fn require(label: &'static str, path: PathBuf, v: (u8, u8)) -> Interp {
    assert!(
        path.is_file(),
        "prerequisite missing: {label} at {}: run `cargo xtask setup` (as root), or use `cargo xtask test`",
        path.display()
    );
    Interp { label, path, version: pftrace_code::PyVersion::new(v.0, v.1) }
}

/// Every interpreter the source analysis is checked against.
pub fn interpreters() -> Vec<Interp> {
    let py39 = env::var_os("PFTRACE_PYTHON")
        .filter(|p| !p.is_empty())
        .map_or_else(|| PathBuf::from("/var/cache/pftrace/cpython-3.9-dtrace/bin/python3.9"), PathBuf::from);
    let sid = root("PFTRACE_SID_ROOT", "/var/cache/pftrace/debian-sid");
    let pyenv = root("PFTRACE_PYENV_ROOT", "/root/.pyenv");
    vec![
        require("CPython 3.9 (--with-dtrace)", py39, (3, 9)),
        require("pyenv 3.11.7", pyenv.join("versions/3.11.7/bin/python3.11"), (3, 11)),
        require("pyenv 3.12.1", pyenv.join("versions/3.12.1/bin/python3.12"), (3, 12)),
        require("pyenv 3.13.0", pyenv.join("versions/3.13.0/bin/python3.13"), (3, 13)),
        require("Debian 3.13", sid.join("usr/bin/python3.13"), (3, 13)),
        require("Debian 3.14", sid.join("usr/bin/python3.14"), (3, 14)),
        require("Debian 3.15", sid.join("usr/bin/python3.15"), (3, 15)),
    ]
}

/// The directory of this crate's Python helpers.
pub fn helpers() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python")
}

/// A fresh directory under the temp dir, removed when the test passes.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let p = env::temp_dir().join(format!("pftrace-code-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).expect("temp dir");
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("(test files kept in {})", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
