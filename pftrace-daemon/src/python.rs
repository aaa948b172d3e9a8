//! The one place that knows CPython version differences: which versions fire
//! the `function__entry` / `function__return` probes, and how to tell the
//! version of an interpreter binary.

use std::{fmt, path::Path};

/// A CPython major.minor version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct PyVersion {
    pub major: u32,
    pub minor: u32,
}

impl fmt::Display for PyVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Whether pftrace can trace an interpreter of a given version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeSupport {
    /// Both probes fire for every call (3.6–3.10, 3.15+).
    Works,
    /// 3.11: `function__return` fires for every call, `function__entry` only
    /// when a generator or coroutine resumes (python/cpython#98894).
    EntryBroken,
    /// 3.12–3.14: the call sites of both probes were removed (python/cpython#104280).
    Removed,
    /// Older than 3.6: no `function__entry` probe with these arguments.
    TooOld,
}

impl PyVersion {
    pub const fn new(major: u32, minor: u32) -> Self {
        Self { major, minor }
    }

    /// What this version's probes do.
    pub fn probe_support(self) -> ProbeSupport {
        match (self.major, self.minor) {
            (3, 11) => ProbeSupport::EntryBroken,
            (3, 12..=14) => ProbeSupport::Removed,
            (3, 6..=10) => ProbeSupport::Works,
            (3, 15..) | (4.., _) => ProbeSupport::Works,
            _ => ProbeSupport::TooOld,
        }
    }
}

/// What to tell a user whose interpreter cannot be traced.
pub const WHAT_WORKS: &str = "CPython 3.6-3.10 or 3.15+ built with --with-dtrace \
     (`cargo xtask setup` builds one: /var/cache/pftrace/cpython-3.9-dtrace/bin/python3.9)";

/// Version from a file name such as `python3.9`, `python3.10d`, `libpython3.9.so.1.0`
/// or `libpython3.6m.so`.
pub fn version_from_file_name(path: &Path) -> Option<PyVersion> {
    let name = path.file_name()?.to_str()?;
    let rest = name.strip_prefix("lib").unwrap_or(name).strip_prefix("python")?;
    parse_major_minor(rest)
}

/// Version from the bytes of an interpreter or libpython: CPython embeds its
/// library directory name (`python3.9`) in getpath and sysconfig strings;
/// the most frequent `python3.N` wins.
pub fn version_from_contents(bytes: &[u8]) -> Option<PyVersion> {
    let needle = b"python3.";
    let mut counts: std::collections::HashMap<u32, usize> = Default::default();
    let mut at = 0;
    while let Some(pos) = find(&bytes[at..], needle) {
        let start = at + pos + needle.len();
        let digits: Vec<u8> =
            bytes[start..].iter().take(2).take_while(|b| b.is_ascii_digit()).copied().collect();
        if let Some(minor) = std::str::from_utf8(&digits).ok().and_then(|d| d.parse().ok()) {
            *counts.entry(minor).or_default() += 1;
        }
        at = start;
    }
    counts.into_iter().max_by_key(|&(minor, n)| (n, minor)).map(|(minor, _)| PyVersion::new(3, minor))
}

/// Whether an ELF file carries CPython's C API (the interpreter itself or libpython).
pub fn has_c_api(bytes: &[u8]) -> bool {
    find(bytes, b"Py_InitializeEx\0").is_some() && find(bytes, b"PyEval_EvalCode\0").is_some()
}

fn parse_major_minor(s: &str) -> Option<PyVersion> {
    let (major, rest) = s.split_once('.')?;
    let minor: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    Some(PyVersion::new(major.parse().ok()?, minor.parse().ok()?))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_from_names() {
        let v = |s: &str| version_from_file_name(Path::new(s));
        assert_eq!(v("/usr/bin/python3.11"), Some(PyVersion::new(3, 11)));
        assert_eq!(v("python3.9"), Some(PyVersion::new(3, 9)));
        assert_eq!(v("/x/lib/libpython3.10.so.1.0"), Some(PyVersion::new(3, 10)));
        assert_eq!(v("libpython3.6m.so.1.0"), Some(PyVersion::new(3, 6)));
        assert_eq!(v("python3"), None);
        assert_eq!(v("bash"), None);
    }

    #[test]
    fn support_by_version() {
        let s = |minor| PyVersion::new(3, minor).probe_support();
        assert_eq!(s(5), ProbeSupport::TooOld);
        for minor in 6..=10 {
            assert_eq!(s(minor), ProbeSupport::Works);
        }
        assert_eq!(s(11), ProbeSupport::EntryBroken);
        for minor in 12..=14 {
            assert_eq!(s(minor), ProbeSupport::Removed);
        }
        assert_eq!(s(15), ProbeSupport::Works);
    }

    #[test]
    fn version_from_bytes_prefers_most_frequent() {
        let blob = b"\0lib/python3.9\0python3.9/site-packages\0python3.1\0";
        assert_eq!(version_from_contents(blob), Some(PyVersion::new(3, 9)));
        assert_eq!(version_from_contents(b"no version here"), None);
    }
}
