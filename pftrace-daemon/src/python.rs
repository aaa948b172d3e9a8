//! The one place that knows CPython version differences: which versions fire
//! the `function__entry` / `function__return` probes, and how to tell the
//! version of an interpreter binary.

use std::{fmt, path::Path};

use memchr::memmem;

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

impl ProbeSupport {
    /// Why an interpreter with this support cannot be traced (`None`:
    /// it can); the one text every refusal quotes.
    pub fn refusal(&self) -> Option<&'static str> {
        match self {
            Self::Works => None,
            Self::EntryBroken => Some(
                "its python:function__entry probe fires only when a generator or coroutine resumes, not for \
                 ordinary calls (python/cpython#98894), so calls cannot be timed",
            ),
            Self::Removed => Some(
                "CPython 3.12-3.14 removed the function__entry/function__return probes (python/cpython#104280)",
            ),
            Self::TooOld => Some("older than 3.6, whose probes pftrace does not read"),
        }
    }
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
pub const WHAT_WORKS: &str = "CPython 3.6-3.10 or 3.15+ built with --with-dtrace";

/// Version from a file name such as `python3.9`, `python3.10d`, `libpython3.9.so.1.0`
/// or `libpython3.6m.so`.
pub fn version_from_file_name(path: &Path) -> Option<PyVersion> {
    let name = path.file_name()?.to_str()?;
    let rest = name.strip_prefix("lib").unwrap_or(name).strip_prefix("python")?;
    parse_major_minor(rest)
}

/// Version from the bytes of an interpreter or libpython: the `PY_VERSION`
/// string `sys.version` starts with (`3.9.2`, `3.15.0a1+`), as py-spy reads
/// it; CPython stores it NUL-terminated. Other strings look alike
/// (unicodedata's `3.2.0`, a bundled library's version): the one taken is
/// the first whose `PY_VERSION_HEX` (`sys.hexversion`, 0x030902f0 for
/// 3.9.2), which the interpreter's code carries, is in the file too. Seen
/// here: Debian's 3.11.2, 3.13.18, 3.14.10, 3.15.2 and the 3.9.2 built by
/// setup each hold their version string and its hex, and unicodedata's
/// 3.2.0 without its hex.
pub fn version_from_contents(bytes: &[u8]) -> Option<PyVersion> {
    memmem::find_iter(bytes, b"\x003.").find_map(|at| {
        let start = at + 1;
        let window = &bytes[start..bytes.len().min(start + 24)];
        let text = std::str::from_utf8(&window[..memchr::memchr(0, window)?]).ok()?;
        let (version, hex) = parse_py_version(text)?;
        memmem::find(bytes, &hex.to_le_bytes()).map(|_| version)
    })
}

/// `3.MINOR.MICRO`, optionally followed by a pre-release tag (`a1`, `b2`,
/// `rc3`) and `+`: the version and its `PY_VERSION_HEX`.
fn parse_py_version(text: &str) -> Option<(PyVersion, u32)> {
    let number = |s: &str| -> Option<u32> {
        (!s.is_empty() && s.len() <= 3 && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok())?
    };
    let text = text.strip_suffix('+').unwrap_or(text);
    let mut parts = text.splitn(3, '.');
    let (major, minor, rest) = (number(parts.next()?)?, number(parts.next()?)?, parts.next()?);
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let micro = number(&rest[..digits])?;
    let tag = &rest[digits..];
    let (level, serial) = if tag.is_empty() {
        (0xf, 0)
    } else {
        let (level, serial) = [("a", 0xa), ("b", 0xb), ("rc", 0xc)]
            .iter()
            .find_map(|&(t, level)| Some((level, number(tag.strip_prefix(t)?)?)))?;
        (level, serial)
    };
    (major < 256 && minor < 256 && micro < 256 && serial < 16).then_some(())?;
    let hex = major << 24 | minor << 16 | micro << 8 | level << 4 | serial;
    Some((PyVersion::new(major, minor), hex))
}

/// Whether an ELF file carries CPython's C API (the interpreter itself or libpython).
pub fn has_c_api(bytes: &[u8]) -> bool {
    memmem::find(bytes, b"Py_InitializeEx\0").is_some() && memmem::find(bytes, b"PyEval_EvalCode\0").is_some()
}

fn parse_major_minor(s: &str) -> Option<PyVersion> {
    let (major, rest) = s.split_once('.')?;
    let minor: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    Some(PyVersion::new(major.parse().ok()?, minor.parse().ok()?))
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
    fn version_from_the_version_string() {
        // unicodedata's "3.2.0" comes first, but its hex is not in the file.
        let mut blob = b"\0ucd\x003.2.0\0x\x003.9.2\0code:".to_vec();
        blob.extend(0x0309_02f0u32.to_le_bytes());
        assert_eq!(version_from_contents(&blob), Some(PyVersion::new(3, 9)));
        let mut dev = b"\x003.15.0a1+\0".to_vec();
        dev.extend(0x030f_00a1u32.to_le_bytes());
        assert_eq!(version_from_contents(&dev), Some(PyVersion::new(3, 15)));
        assert_eq!(parse_py_version("3.13.0rc2"), Some((PyVersion::new(3, 13), 0x030d_00c2)));
        // Without the hex, or not a version: nothing.
        assert_eq!(version_from_contents(b"\x003.9.2\0lib/python3.9\0"), None);
        assert_eq!(version_from_contents(b"\0lib/python3.9\0python3.9/site-packages\0"), None);
        assert_eq!(parse_py_version("3.9.x"), None);
        assert_eq!(parse_py_version("3.9.2rc"), None);
        assert_eq!(version_from_contents(b"no version here"), None);
    }

    #[test]
    fn version_of_real_interpreters() {
        // Debian 12's own python3.11 (installed by `cargo xtask setup`) and
        // the probe-enabled CPython the tests use, read by contents alone.
        let read =
            |p: &str| std::fs::read(p).unwrap_or_else(|e| panic!("{p}: {e} (run `cargo xtask setup`)"));
        assert_eq!(version_from_contents(&read("/usr/bin/python3.11")), Some(PyVersion::new(3, 11)));
        let python = std::env::var("PFTRACE_PYTHON")
            .unwrap_or_else(|_| "/var/cache/pftrace/cpython-3.9-dtrace/bin/python3.9".into());
        let named = version_from_file_name(Path::new(&python));
        assert!(named.is_some(), "{python}: no version in its name");
        assert_eq!(version_from_contents(&read(&python)), named);
    }
}
