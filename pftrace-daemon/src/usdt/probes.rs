//! The probe sites of an ELF file, ready to attach: each SDT note resolved to
//! the file offsets a uprobe needs (probe offset, semaphore `ref_ctr_offset`)
//! and its argument string parsed. Also the filter for CPython's
//! `python:function__entry` / `python:function__return` probes.

use std::path::{Path, PathBuf};

use object::elf::{EM_X86_64, FileHeader64};
use object::read::elf::FileHeader;
use object::{Endianness, FileKind, ReadCache, ReadRef};
use pftrace_common::{FrameSpec, UsdtArg, UsdtSpec, kind};

use super::argspec;
use super::error::{Result, UsdtError};
use super::notes::{UsdtNote, read_notes};
use super::segments::{AddrKind, Segments};

/// Provider of CPython's probes.
pub const PYTHON_PROVIDER: &str = "python";
/// CPython's probe at the start of a Python function (filename, funcname, lineno).
pub const FUNCTION_ENTRY: &str = "function__entry";
/// CPython's probe at the return of a Python function (filename, funcname, lineno).
pub const FUNCTION_RETURN: &str = "function__return";

/// One USDT probe site of a file, resolved for attaching.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeSite {
    /// The file the probe is in (the uprobe's path).
    pub path: PathBuf,
    /// e.g. "python".
    pub provider: String,
    /// e.g. "function__entry".
    pub name: String,
    /// Virtual address of the probe (prelink correction applied).
    pub pc: u64,
    /// File offset of the probe: the uprobe's offset.
    pub pc_offset: u64,
    /// Virtual address of the semaphore, 0 if the probe has none.
    pub semaphore: u64,
    /// File offset of the semaphore: the uprobe's `ref_ctr_offset`, 0 if none.
    pub semaphore_offset: u64,
    /// The note's argument string, e.g. "8@%rbp 8@%r12 -4@%eax".
    pub args: String,
    /// The parsed arguments, in order.
    pub arg_specs: Vec<UsdtArg>,
    /// How the eBPF program finds CPython's interpreter frame here (set by
    /// target.rs for the versions that need it; default: not read).
    pub frame: FrameSpec,
}

impl ProbeSite {
    /// True for `python:function__entry` and `python:function__return`.
    pub fn is_python_function(&self) -> bool {
        self.python_kind().is_some()
    }

    /// [`kind::ENTRY`] or [`kind::RETURN`] for CPython's function probes, else `None`.
    pub fn python_kind(&self) -> Option<u8> {
        python_kind(&self.provider, &self.name)
    }

    /// The spec of the first three arguments, for the eBPF program's spec map.
    /// Fails (naming the file and probe) if the probe has fewer than three.
    pub fn spec(&self) -> Result<UsdtSpec> {
        let spec = argspec::spec_from_args(&self.arg_specs, &self.args).map_err(|e| self.in_probe(e))?;
        Ok(UsdtSpec { frame: self.frame, ..spec })
    }

    fn in_probe(&self, source: UsdtError) -> UsdtError {
        UsdtError::InProbe {
            path: self.path.clone(),
            provider: self.provider.clone(),
            name: self.name.clone(),
            source: Box::new(source),
        }
    }
}

/// Every probe site of the ELF file at `path` (an x86-64 ELF64 executable or
/// shared library). A file without SDT notes gives an empty list. Fails if
/// any probe cannot be resolved or its arguments cannot be parsed; use
/// [`read_probes_matching`] to look only at the probes you need.
pub fn read_probes(path: &Path) -> Result<Vec<ProbeSite>> {
    read_probes_matching(path, |_| true)
}

/// CPython's `python:function__entry` and `python:function__return` probe
/// sites in the file at `path` (empty if it has none, e.g. CPython 3.12-3.14
/// or a build without --with-dtrace). Other probes are not resolved, so they
/// cannot make this fail.
pub fn read_python_function_probes(path: &Path) -> Result<Vec<ProbeSite>> {
    read_probes_matching(path, is_python_function_note)
}

/// The probe sites of the file at `path` whose note passes `keep`.
pub fn read_probes_matching(path: &Path, keep: impl Fn(&UsdtNote) -> bool) -> Result<Vec<ProbeSite>> {
    let file =
        std::fs::File::open(path).map_err(|source| UsdtError::Read { path: path.to_path_buf(), source })?;
    probes_in(&ReadCache::new(file), path, keep)
}

/// The probe sites whose note passes `keep` of an ELF file already open
/// (`data`: object's reader of it; through a [`ReadCache`] only the
/// headers, the section names, the notes and the program headers are
/// read, about 10 KB of a 15 MB interpreter). `path` names it in sites and errors.
pub fn probes_in<'data, R: ReadRef<'data>>(
    data: R,
    path: &Path,
    keep: impl Fn(&UsdtNote) -> bool,
) -> Result<Vec<ProbeSite>> {
    let header = elf64_x86_64_header(data, path)?;
    let endian =
        header.endian().map_err(|e| UsdtError::NotElf { path: path.to_path_buf(), reason: e.to_string() })?;
    let notes = read_notes(header, endian, data, path)?;
    let mut notes = notes.into_iter().filter(|n| keep(n)).peekable();
    if notes.peek().is_none() {
        return Ok(Vec::new());
    }
    let segments = Segments::from_elf(header, endian, data, path)?;
    notes.map(|note| resolve(note, &segments, path)).collect()
}

/// Whether `note` is CPython's `function__entry` or `function__return`:
/// the filter of [`read_python_function_probes`], for [`probes_in`].
pub fn is_python_function_note(note: &UsdtNote) -> bool {
    python_kind(&note.provider, &note.name).is_some()
}

/// Resolves one note: maps its pc and semaphore to file offsets and parses
/// its argument string.
pub fn resolve(note: UsdtNote, segments: &Segments, path: &Path) -> Result<ProbeSite> {
    let probe = format!("{}:{}", note.provider, note.name);
    let pc_offset = segments.file_offset(note.pc, AddrKind::Code, &format!("pc of probe {probe}"))?;
    let semaphore_offset = match note.semaphore {
        0 => 0,
        sem => segments.file_offset(sem, AddrKind::Data, &format!("semaphore of probe {probe}"))?,
    };
    let arg_specs = argspec::parse_args(&note.args).map_err(|e| UsdtError::InProbe {
        path: path.to_path_buf(),
        provider: note.provider.clone(),
        name: note.name.clone(),
        source: Box::new(e),
    })?;
    Ok(ProbeSite {
        path: path.to_path_buf(),
        provider: note.provider,
        name: note.name,
        pc: note.pc,
        pc_offset,
        semaphore: note.semaphore,
        semaphore_offset,
        args: note.args,
        arg_specs,
        frame: FrameSpec::default(),
    })
}

/// [`kind::ENTRY`] / [`kind::RETURN`] for CPython's function probes.
fn python_kind(provider: &str, name: &str) -> Option<u8> {
    match (provider, name) {
        (PYTHON_PROVIDER, FUNCTION_ENTRY) => Some(kind::ENTRY),
        (PYTHON_PROVIDER, FUNCTION_RETURN) => Some(kind::RETURN),
        _ => None,
    }
}

/// The ELF header, if the file is a 64-bit x86-64 ELF (argument strings are
/// parsed for x86-64 registers, so other machines are refused).
pub fn elf64_x86_64_header<'data, R: ReadRef<'data>>(
    data: R,
    path: &Path,
) -> Result<&'data FileHeader64<Endianness>> {
    let unsupported = |reason: String| UsdtError::Unsupported { path: path.to_path_buf(), reason };
    if data.read_bytes_at(0, 4).ok() != Some(b"\x7fELF".as_slice()) {
        return Err(UsdtError::NotElf {
            path: path.to_path_buf(),
            reason: "it does not start with the ELF magic bytes".into(),
        });
    }
    match FileKind::parse(data) {
        Ok(FileKind::Elf64) => {}
        Ok(FileKind::Elf32) => {
            return Err(unsupported("it is a 32-bit ELF file; only x86-64 ELF64 is".into()));
        }
        Ok(other) => {
            return Err(UsdtError::NotElf {
                path: path.to_path_buf(),
                reason: format!("it is a {other:?} file"),
            });
        }
        Err(e) => {
            return Err(UsdtError::NotElf { path: path.to_path_buf(), reason: e.to_string() });
        }
    }
    let header = FileHeader64::<Endianness>::parse(data)
        .map_err(|e| UsdtError::NotElf { path: path.to_path_buf(), reason: e.to_string() })?;
    let endian =
        header.endian().map_err(|e| UsdtError::NotElf { path: path.to_path_buf(), reason: e.to_string() })?;
    let machine = header.e_machine(endian);
    if machine != EM_X86_64 {
        return Err(unsupported(format!(
            "its machine is {machine}, not x86-64 ({EM_X86_64}); only x86-64 USDT arguments are understood"
        )));
    }
    Ok(header)
}
