//! The one place that knows CPython version differences: which versions fire
//! the `function__entry` / `function__return` probes, what they mean on
//! each, how to read a 3.15 interpreter frame at a probe, and how to tell
//! the version of an interpreter binary.
//!
//! What the probes do, measured here (bpftrace on the same sites, and a
//! `sys.setprofile` recorder in the same process as ground truth):
//!
//! | | 3.6-3.10 (3.9.2 built --with-dtrace) | 3.15.2 (Debian) |
//! |---|---|---|
//! | plain call | entry, return | entry, return |
//! | generator/coroutine created (`g()`) | nothing | entry (the frame starts and runs RETURN_GENERATOR), no return |
//! | each run of a generator (first `next`, resumes, `send`) | entry, return at yield/end | the same |
//! | `throw()` into a suspended generator | entry, return | return only (the frame resumes without passing start_frame) |
//! | `close()`/drop of a generator suspended at a plain yield | entry, return (GeneratorExit runs the frame) | nothing (the frame is not run), unless a profiler is active: then return only |
//! | exception leaving a frame | return | return |
//! | `C()` with a Python `__init__`, once specialised | entry, return of `__init__` | the same, plus a return of the shim frame `__init__` (file `__init__`, line -1, code flag CO_NO_MONITORING_EVENTS) with no entry |
//! | code with cells or free variables | entry line = first line | entry line -1 (MAKE_CELL/COPY_FREE_VARS have no location) |
//! | line of a module's entry | 1 | 0 |
//! | JIT (`PYTHON_JIT=1`; off by default) | - | JIT-compiled code fires neither probe: 4,002 of 100,000 calls of a function seen, and generator returns without entries (54,342 returns, 20,009 entries) |
//!
//! pftrace makes 3.15 give what 3.9 gives where the probes allow it: the
//! kernel program finds the frame at the probe ([`FrameLayout`], from the
//! interpreter's own `_Py_DebugOffsets`), drops generator creations and shim
//! returns (counted), and replaces line -1 by the code's first line. What
//! no probe shows stays counted, never guessed: a generator resumed by
//! `throw()` (or by `close()` with a handler) gives a return without entry.

use std::{fmt, path::Path};

use memchr::memmem;
use pftrace_common::{FRAME_REGS, FRAME_WINDOW, FrameSpec, NO_REG};

/// A CPython major.minor version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
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

    /// Whether this version's probes need the interpreter frame read (3.15,
    /// see the module's table; later versions are assumed alike, and
    /// [`frame_layout`] refuses those whose layout it does not know, with a
    /// warning naming what is then wrong).
    pub fn reads_frames(self) -> bool {
        self >= Self::new(3, 15)
    }
}

/// How pftrace traces one interpreter: through CPython's own USDT probes
/// (no code enters the process), or through the in-process agent
/// (`pftrace-agent`: sys.monitoring on 3.12+, a C profile hook on 3.11).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mechanism {
    #[default]
    Usdt,
    Agent,
}

impl Mechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Usdt => "usdt",
            Self::Agent => "agent",
        }
    }
}

impl fmt::Display for Mechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The mechanism for an interpreter of `version` (None: unknown) whose file
/// has both function probes or not (`has_probes`), where USDT is to be
/// avoided or not (`avoid_usdt`: its JIT is on, see [`jit_enabled`], or
/// `pftraced --agent`); Err: why it cannot be traced at all.
///
/// USDT where its probes see every call: 3.6-3.10 and 3.15+ built
/// --with-dtrace, without the 3.15 JIT (JIT-compiled code fires no probe:
/// 4,202 of 200,000 entries fired with PYTHON_JIT=1). The agent for every
/// 3.11+ otherwise: 3.11 (entry probe broken), 3.12-3.14 (probes removed),
/// builds without probes, and 3.15+ with the JIT. 3.6-3.10 without probes,
/// or of unknown version without probes, cannot be traced.
pub fn mechanism(
    version: Option<PyVersion>,
    has_probes: bool,
    avoid_usdt: bool,
) -> Result<Mechanism, &'static str> {
    let agent_from = PyVersion::new(3, 11);
    match version {
        Some(v)
            if v.probe_support() == ProbeSupport::Works && has_probes && (!avoid_usdt || v < agent_from) =>
        {
            Ok(Mechanism::Usdt)
        }
        Some(v) if v >= agent_from => Ok(Mechanism::Agent),
        Some(v) if v.probe_support() == ProbeSupport::TooOld => {
            Err(ProbeSupport::TooOld.refusal().expect("refused"))
        }
        _ => Err(NO_PROBES),
    }
}

/// Why a CPython older than 3.11 (or of unknown version) without probes cannot be traced.
pub const NO_PROBES: &str = "it has no USDT probes (it was built without --with-dtrace), and pftrace's in-process agent needs CPython 3.11 or later";

/// Whether a process of this version runs its JIT, from its `PYTHON_JIT`
/// environment variable (3.15: off unless set to a value other than 0;
/// JIT-compiled code fires neither probe, see the module's table).
pub fn jit_enabled(version: PyVersion, python_jit: Option<&[u8]>) -> bool {
    version >= PyVersion::new(3, 15) && python_jit.is_some_and(|v| !v.is_empty() && v != b"0")
}

/// Where the fields pftrace reads lie in one interpreter build's frames,
/// code objects and strings, from its `_Py_DebugOffsets` (the table CPython
/// keeps for out-of-process debuggers, at the start of `.PyRuntime`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLayout {
    pub frame_executable: u16,
    pub frame_owner: u16,
    pub code_flags: u16,
    pub code_firstlineno: u16,
    pub code_name: u16,
    pub ascii_size: u16,
}

/// Why a 3.15 interpreter's frame layout could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("_Py_DebugOffsets: {0}")]
    Bad(String),
}

/// CPython 3.15's `_Py_DebugOffsets`, as u64 words from the start of the
/// struct (0: the cookie, 1: PY_VERSION_HEX), counted in 3.15.2's build:
/// free_threaded, runtime_state (3 words), interpreter_state (16),
/// thread_state (17), then interpreter_frame {size, previous, executable,
/// instr_ptr, localsplus, owner, stackpointer, tlbc_index} and code_object
/// {size, filename, name, qualname, linetable, firstlineno, argcount, ...}
/// (11), then pyobject {size, ob_type}.
mod debug_offsets_315 {
    pub const FRAME_SIZE: usize = 39;
    pub const FRAME_EXECUTABLE: usize = 41;
    pub const FRAME_OWNER: usize = 44;
    pub const CODE_SIZE: usize = 47;
    pub const CODE_NAME: usize = 49;
    pub const CODE_FIRSTLINENO: usize = 52;
    pub const CODE_ARGCOUNT: usize = 53;
    pub const PYOBJECT_SIZE: usize = 58;
    pub const WORDS: usize = 59;
}

/// 3.15's `_PyInterpreterFrame.owner` values and `co_flags` bits
/// (Include/internal/pycore_frame.h, Include/cpython/code.h; the owners
/// were measured at the probes: 0 for calls and creations, 1 in generators).
const FRAME_OWNED_BY_THREAD: u8 = 0;
const FRAME_OWNED_BY_GENERATOR: u8 = 1;
const CO_GENERATOR: u32 = 0x20;
const CO_COROUTINE: u32 = 0x80;
const CO_ASYNC_GENERATOR: u32 = 0x200;
/// Set on the interpreter's internal shim code (`_Py_InitCleanup`, whose
/// frame returns from `__init__` calls): measured co_flags 0x2000001.
const CO_NO_MONITORING_EVENTS: u32 = 0x0200_0000;

/// How many bytes of the start of `.PyRuntime` [`frame_layout`] reads.
pub const DEBUG_OFFSETS_BYTES: u64 = 8 * debug_offsets_315::WORDS as u64;

/// The frame layout of a CPython 3.15 interpreter, from the start of its
/// `.PyRuntime` section (at least [`DEBUG_OFFSETS_BYTES`] of it).
pub fn frame_layout(runtime: &[u8]) -> Result<FrameLayout, LayoutError> {
    use debug_offsets_315 as at;
    let words: Vec<u64> = runtime
        .chunks_exact(8)
        .take(at::WORDS)
        .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
        .collect();
    if words.len() < at::WORDS || &runtime[..8] != b"xdebugpy" {
        return Err(LayoutError::Bad("no \"xdebugpy\" cookie at the start of .PyRuntime".into()));
    }
    let (major, minor) = (words[1] >> 24 & 0xff, words[1] >> 16 & 0xff);
    if (major, minor) != (3, 15) {
        return Err(LayoutError::Bad(format!("version {major}.{minor}, not 3.15")));
    }
    // Offsets must lie inside their structs (a wrong table would give
    // anything; the kernel also checks each frame it reads).
    let field = |index: usize, size_index: usize, width: u64| -> Result<u16, LayoutError> {
        let (off, size) = (words[index], words[size_index]);
        if size > 4096 || off + width > size {
            return Err(LayoutError::Bad(format!("offset {off} outside a struct of {size} bytes")));
        }
        Ok(off as u16)
    };
    let argcount = field(at::CODE_ARGCOUNT, at::CODE_SIZE, 4)?;
    let pyobject = words[at::PYOBJECT_SIZE];
    if !(16..=64).contains(&pyobject) || argcount < 4 {
        return Err(LayoutError::Bad(format!("PyObject of {pyobject} bytes, co_argcount at {argcount}")));
    }
    Ok(FrameLayout {
        frame_executable: field(at::FRAME_EXECUTABLE, at::FRAME_SIZE, 8)?,
        frame_owner: field(at::FRAME_OWNER, at::FRAME_SIZE, 1)?,
        // co_flags is the int just before co_argcount (_PyCode_DEF, 3.11-3.15).
        code_flags: argcount - 4,
        code_firstlineno: field(at::CODE_FIRSTLINENO, at::CODE_SIZE, 4)?,
        code_name: field(at::CODE_NAME, at::CODE_SIZE, 8)?,
        // PyASCIIObject: the object header, length, hash and a 4-byte state, padded.
        ascii_size: pyobject as u16 + 24,
    })
}

/// pt_regs offsets of the registers a function keeps values in across
/// calls: r13, r14, r15, r12, rbx, rbp.
const CALLEE_SAVED: [u16; 6] = [16, 8, 0, 24, 40, 32];

/// The frame spec of one 3.15 probe site. The probes sit in small helpers
/// (`dtrace_function_entry(frame)`, `dtrace_function_return(frame)`) that
/// fire right after their last call, so the frame is in a register the
/// helper saved across calls: measured r13 in Debian's 3.15.2, set by
/// `mov %rdi,%r13` at the helper's start. That move, found among the 128
/// bytes before the probe (`code_before`), puts its register first; the
/// other callee-saved registers follow, minus those holding arguments
/// (`arg_regs`). The kernel takes a register only when the frame's code
/// object names the probed function.
pub fn frame_spec(layout: &FrameLayout, code_before: &[u8], arg_regs: &[u16]) -> Option<FrameSpec> {
    let saved_rdi = code_before.windows(3).rev().find_map(|w| match w {
        // mov %rdi,%r64: REX.W(+B) 89 /r with reg = rdi.
        [0x48, 0x89, 0xfb] => Some(40), // rbx
        [0x48, 0x89, 0xfd] => Some(32), // rbp
        [0x49, 0x89, 0xfc] => Some(24), // r12
        [0x49, 0x89, 0xfd] => Some(16), // r13
        [0x49, 0x89, 0xfe] => Some(8),  // r14
        [0x49, 0x89, 0xff] => Some(0),  // r15
        _ => None,
    });
    let mut regs = [NO_REG; FRAME_REGS];
    let candidates = saved_rdi.into_iter().chain(CALLEE_SAVED).filter(|r| !arg_regs.contains(r));
    let mut n = 0;
    for reg in candidates {
        if n < FRAME_REGS && !regs[..n].contains(&reg) {
            regs[n] = reg;
            n += 1;
        }
    }
    // One read per object: the window from the first field to the end of the last.
    let frame = window(&[(layout.frame_executable, 8), (layout.frame_owner, 1)])?;
    let code = window(&[(layout.code_flags, 4), (layout.code_firstlineno, 4), (layout.code_name, 8)])?;
    Some(FrameSpec {
        regs,
        frame_start: frame.0,
        frame_len: frame.1,
        frame_executable: layout.frame_executable - frame.0,
        frame_owner: layout.frame_owner - frame.0,
        code_start: code.0,
        code_len: code.1,
        code_flags: layout.code_flags - code.0,
        code_firstlineno: layout.code_firstlineno - code.0,
        code_name: layout.code_name - code.0,
        ascii_size: layout.ascii_size,
        generator_flags: CO_GENERATOR | CO_COROUTINE | CO_ASYNC_GENERATOR,
        shim_flags: CO_NO_MONITORING_EVENTS,
        owner_thread: FRAME_OWNED_BY_THREAD,
        owner_generator: FRAME_OWNED_BY_GENERATOR,
        _pad: [0; 2],
    })
}

/// (start, length) of the bytes covering `fields` (offset, width), or None
/// when they span more than one kernel read may copy.
fn window(fields: &[(u16, u16)]) -> Option<(u16, u16)> {
    let start = fields.iter().map(|f| f.0).min()?;
    let end = fields.iter().map(|f| f.0 + f.1).max()?;
    (usize::from(end - start) <= FRAME_WINDOW).then_some((start, end - start))
}

/// What to tell a user whose interpreter cannot be traced.
pub const WHAT_WORKS: &str = "CPython 3.11 or later (any build), or 3.6-3.10 built with --with-dtrace";

/// What `--binary` takes: interpreter files whose USDT probes see every call
/// (host-wide probes; the agent is per process).
pub const USDT_WORKS: &str = "CPython 3.6-3.10 or 3.15+ built with --with-dtrace (CPython 3.11+ is traced per process, through the in-process agent: --pid, --cgroup or a command)";

/// Whether pftraced can load the agent into an already running process of
/// this version: PEP 768 (sys.remote_exec's protocol) exists from 3.14.
pub fn can_load_agent_remotely(version: PyVersion) -> bool {
    version >= PyVersion::new(3, 14)
}

/// Version from a file name such as `python3.9`, `python3.10d`, `libpython3.9.so.1.0`
/// or `libpython3.6m.so`.
pub fn version_from_file_name(path: &Path) -> Option<PyVersion> {
    let name = path.file_name()?.to_str()?;
    let rest = name.strip_prefix("lib").unwrap_or(name).strip_prefix("python")?;
    parse_major_minor(rest)
}

/// Version from the contents of an interpreter or libpython: the
/// `PY_VERSION` string `sys.version` starts with (`3.9.2`, `3.15.0a1+`),
/// as py-spy reads it, which CPython stores NUL-terminated in `strings`
/// (its `.rodata`), alone or as the tail of a longer string (the linker
/// merges it: pyenv's 3.9.18 libpython has it only as the end of
/// "/root/.pyenv/versions/3.9.18"). Other strings look alike (unicodedata's
/// `3.2.0`, a bundled library's version): the one taken is the first whose
/// `PY_VERSION_HEX` (`sys.hexversion`, 0x030902f0 for 3.9.2), which the
/// interpreter's code carries, is in `strings` or `code` (its `.text`).
/// Seen here: Debian's 3.11.2, 3.13.18, 3.14.10, 3.15.2, pyenv's and the
/// 3.9.2 built by setup each hold their version string in `.rodata` and
/// its hex in `.text`, and unicodedata's 3.2.0 without its hex.
pub fn version_from_contents(strings: &[u8], code: &[&[u8]]) -> Option<PyVersion> {
    let mut tried = Vec::new();
    memmem::find_iter(strings, b"3.").find_map(|start| {
        // Not inside a number ("13.0.0", "1.3.2").
        if start > 0 && (strings[start - 1].is_ascii_digit() || strings[start - 1] == b'.') {
            return None;
        }
        let window = &strings[start..strings.len().min(start + 24)];
        let text = std::str::from_utf8(&window[..memchr::memchr(0, window)?]).ok()?;
        let (version, hex) = parse_py_version(text)?;
        if tried.contains(&hex) {
            return None;
        }
        tried.push(hex);
        let hex = memmem::Finder::new(&hex.to_le_bytes()).into_owned();
        std::iter::once(strings).chain(code.iter().copied()).any(|b| hex.find(b).is_some()).then_some(version)
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

/// Functions only CPython itself defines (its executable, linked with
/// -export-dynamic, or libpython): a file whose dynamic symbol table
/// defines them all is CPython. Their names alone prove nothing: pftraced
/// holds them as strings, and extension modules import them.
pub const C_API: [&str; 2] = ["Py_InitializeEx", "PyEval_EvalCode"];

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
        assert_eq!(version_from_contents(&blob, &[]), Some(PyVersion::new(3, 9)));
        let mut dev = b"\x003.15.0a1+\0".to_vec();
        dev.extend(0x030f_00a1u32.to_le_bytes());
        assert_eq!(version_from_contents(b"\x003.15.0a1+\0", &[&dev]), Some(PyVersion::new(3, 15)));
        // The tail of a merged string; a version inside a number is none.
        let code = 0x0309_12f0u32.to_le_bytes();
        assert_eq!(version_from_contents(b"/x/versions/3.9.18\0", &[&code]), Some(PyVersion::new(3, 9)));
        assert_eq!(version_from_contents(b"\x0013.9.18\0", &[&code]), None);
        assert_eq!(parse_py_version("3.13.0rc2"), Some((PyVersion::new(3, 13), 0x030d_00c2)));
        // Without the hex, or not a version: nothing.
        assert_eq!(version_from_contents(b"\x003.9.2\0lib/python3.9\0", &[b"code"]), None);
        assert_eq!(version_from_contents(b"\0lib/python3.9\0python3.9/site-packages\0", &[]), None);
        assert_eq!(parse_py_version("3.9.x"), None);
        assert_eq!(parse_py_version("3.9.2rc"), None);
        assert_eq!(version_from_contents(b"no version here", &[]), None);
    }

    #[test]
    fn frame_spec_tries_the_register_the_helper_saved_the_frame_in_first() {
        let layout = FrameLayout {
            frame_executable: 0,
            frame_owner: 74,
            code_flags: 48,
            code_firstlineno: 68,
            code_name: 120,
            ascii_size: 40,
        };
        // Debian 3.15.2's helper: push ...; mov %rdi,%r13; ...; the probe.
        let code = [0x55, 0x48, 0x89, 0xe5, 0x41, 0x56, 0x49, 0x89, 0xfd, 0x41, 0x54, 0x53];
        // Arguments in rbx (40) and r12 (24): never frame candidates.
        let spec = frame_spec(&layout, &code, &[40, 24]).unwrap();
        assert_eq!(spec.regs, [16, 8, 0, 32]); // r13, r14, r15, rbp
        assert_eq!(
            (spec.frame_start, spec.frame_len, spec.frame_executable, spec.frame_owner),
            (0, 75, 0, 74)
        );
        assert_eq!((spec.code_start, spec.code_len), (48, 80));
        assert_eq!((spec.code_flags, spec.code_firstlineno, spec.code_name), (0, 20, 72));
        // Without the move, the callee-saved registers in their usual order.
        assert_eq!(frame_spec(&layout, &[0x90; 16], &[40, 24]).unwrap().regs, [16, 8, 0, 32]);
        assert_eq!(frame_spec(&layout, &[0x49, 0x89, 0xfe], &[]).unwrap().regs, [8, 16, 0, 24]);
        // Fields too far apart for one kernel read.
        let far = FrameLayout { code_name: 400, ..layout };
        assert!(frame_spec(&far, &code, &[]).is_none());
    }

    #[test]
    fn mechanism_by_version_probes_and_jit() {
        let v = |minor| Some(PyVersion::new(3, minor));
        for minor in 6..=10 {
            assert_eq!(mechanism(v(minor), true, false), Ok(Mechanism::Usdt), "3.{minor}");
            assert_eq!(mechanism(v(minor), false, false), Err(NO_PROBES), "3.{minor}");
            // No agent before 3.11: `--agent` leaves them on USDT.
            assert_eq!(mechanism(v(minor), true, true), Ok(Mechanism::Usdt), "3.{minor}");
        }
        for minor in 11..=14 {
            assert_eq!(mechanism(v(minor), true, false), Ok(Mechanism::Agent), "3.{minor}");
            assert_eq!(mechanism(v(minor), false, false), Ok(Mechanism::Agent), "3.{minor}");
        }
        assert_eq!(mechanism(v(15), true, false), Ok(Mechanism::Usdt));
        assert_eq!(mechanism(v(15), true, true), Ok(Mechanism::Agent), "3.15 JIT: probes miss calls");
        assert_eq!(mechanism(v(15), false, false), Ok(Mechanism::Agent));
        assert_eq!(mechanism(v(5), true, false), Err(ProbeSupport::TooOld.refusal().unwrap()));
        assert_eq!(mechanism(None, false, false), Err(NO_PROBES));
        assert!(!can_load_agent_remotely(PyVersion::new(3, 13)));
        assert!(can_load_agent_remotely(PyVersion::new(3, 14)));
    }

    #[test]
    fn jit_is_on_only_when_python_jit_says_so_on_3_15() {
        let v315 = PyVersion::new(3, 15);
        assert!(jit_enabled(v315, Some(b"1")));
        assert!(!jit_enabled(v315, Some(b"0")));
        assert!(!jit_enabled(v315, None));
        assert!(!jit_enabled(PyVersion::new(3, 9), Some(b"1")));
    }
}
