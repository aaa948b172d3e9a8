//! What one ELF file offers pftrace: its Python probe sites, whether it is
//! CPython (it defines CPython's C API in its dynamic symbol table) and
//! which version. Read once per file version (a cache keyed by device,
//! inode, size, mtime and ctime), and only in the parts needed through
//! object's `ReadCache`: headers, section names, the probe notes, the
//! dynamic symbols and, when the file's name gives no version, `.rodata`
//! and `.text`; never the whole file (a CPython 3.9 built with debug
//! information is 15.5 MB, of which these parts are under 3 MB).
//!
//! Files named by a process are opened beneath its root (`/proc/PID/root`)
//! without following any symbolic link: the paths the kernel gives in
//! /proc/PID/exe and /proc/PID/maps have none, so a link met on the way is
//! the process's doing and is refused.

use std::{
    collections::HashMap,
    fs::File,
    io,
    os::unix::fs::MetadataExt as _,
    path::Path,
    sync::{Arc, LazyLock, Mutex},
};

use object::{
    Endianness, ReadCache, ReadRef, StringTable,
    elf::{FileHeader64, SHN_UNDEF, SHT_DYNSYM, SHT_NOBITS, STT_FUNC, Sym64},
    read::elf::{FileHeader as _, SectionHeader as _, SectionTable, Sym as _},
};
use pftrace_common::FrameSpec;

use crate::{
    python::{self, PyVersion},
    usdt::{self, ProbeSite, UsdtError},
};

/// What one ELF file offers.
#[derive(Debug)]
pub struct ElfInfo {
    /// Its `python:function__entry` / `function__return` sites (empty if none).
    pub sites: Arc<[ProbeSite]>,
    /// Its CPython version: from its name, else from its contents when it
    /// defines CPython's C API; `None` when neither tells.
    pub version: Option<PyVersion>,
    /// (device, inode) of the file read.
    pub file: (u64, u64),
    /// How many bytes of the file were read to learn this.
    pub bytes_read: u64,
}

/// What tells one version of a file from another: device, inode, size,
/// mtime and ctime in ns (ctime too: a file rewritten in place with its
/// mtime set back still gets a new ctime).
type FileVersion = (u64, u64, u64, i64, i64);

/// A file version and the version its name gives.
type CacheKey = (FileVersion, Option<PyVersion>);

/// Results by [`FileVersion`] and the version the file's name gives (the
/// same file may be reached under another name): every exec in a watched scope is inspected,
/// and the second process of an interpreter must cost a `fstat` (measured:
/// 2-13 µs for a cached file against 0.6-2.8 ms for a first inspection).
static CACHE: LazyLock<Mutex<HashMap<CacheKey, Arc<ElfInfo>>>> = LazyLock::new(Default::default);

/// Files kept in [`CACHE`] before it starts afresh (bounded memory on a
/// host that execs many different files).
const CACHE_FILES: usize = 1024;

/// At most this many bytes of one section are read (dynamic symbols and
/// their names, `.rodata`, `.text`): CPython 3.9's `.text` is 2.1 MB and its
/// `.rodata` 0.65 MB; a larger section is treated as absent.
const MAX_SECTION_BYTES: u64 = 64 << 20;

/// Opens `path` as a process with root `root` (`/proc/PID/root`) names it:
/// resolved beneath that root, following no symbolic or magic link.
pub fn open_beneath(root: &Path, path: &Path) -> io::Result<File> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let dir = rustix::fs::open(root, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
    let relative = path.strip_prefix("/").unwrap_or(path);
    let fd = rustix::fs::openat2(
        &dir,
        relative,
        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )?;
    Ok(File::from(fd))
}

/// What the open `file` offers. `path` names it in sites and errors;
/// `name` is the name a process knows it by (the version may be in it).
pub fn inspect(file: File, name: &Path, path: &Path) -> Result<Arc<ElfInfo>, UsdtError> {
    let read_err = |source| UsdtError::Read { path: path.to_path_buf(), source };
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(read_err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file")));
    }
    let ns = |s: i64, n: i64| s.saturating_mul(1_000_000_000).saturating_add(n);
    let file_version: FileVersion = (
        meta.dev(),
        meta.ino(),
        meta.size(),
        ns(meta.mtime(), meta.mtime_nsec()),
        ns(meta.ctime(), meta.ctime_nsec()),
    );
    let named = python::version_from_file_name(name);
    let key = (file_version, named);
    if let Some(info) = CACHE.lock().expect("cache lock").get(&key) {
        return Ok(info.clone());
    }
    let info = Arc::new(read_file(file, name, path)?);
    let mut cache = CACHE.lock().expect("cache lock");
    if cache.len() >= CACHE_FILES {
        cache.clear();
    }
    cache.insert(key, info.clone());
    Ok(info)
}

/// What the open `file` offers, read now (what [`inspect`] caches).
pub fn read_file(file: File, name: &Path, path: &Path) -> Result<ElfInfo, UsdtError> {
    let meta = file.metadata().map_err(|source| UsdtError::Read { path: path.to_path_buf(), source })?;
    let data = ReadCache::new(Counted { file, bytes: 0 });
    let mut info = read(&data, python::version_from_file_name(name), path, (meta.dev(), meta.ino()))?;
    info.bytes_read = data.into_inner().bytes;
    Ok(info)
}

/// A file that counts the bytes read from it.
struct Counted {
    file: File,
    bytes: u64,
}

impl io::Read for Counted {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
}

impl io::Seek for Counted {
    fn seek(&mut self, pos: io::SeekFrom) -> io::Result<u64> {
        self.file.seek(pos)
    }
}

fn read<'d, R: ReadRef<'d>>(
    data: R,
    named: Option<PyVersion>,
    path: &Path,
    file: (u64, u64),
) -> Result<ElfInfo, UsdtError> {
    let header = usdt::elf64_x86_64_header(data, path)?;
    let endian = header.endian().map_err(|e| not_elf(path, e))?;
    let sections = header.sections(endian, data).map_err(|e| not_elf(path, e))?;
    let version = named.or_else(|| {
        defines_c_api(&sections, endian, data).then(|| version_in(&sections, endian, data)).flatten()
    });
    let mut sites = usdt::probes_in(data, path, usdt::is_python_function_note)?;
    if let Some(v) = version.filter(|v| v.reads_frames() && !sites.is_empty()) {
        let frames = frame_specs(&sections, endian, data, &sites).unwrap_or_else(|err| {
            log::warn!(
                "CPython {v} at {}: cannot read its frame layout ({err}): generator creations will show as \
                 incomplete calls, __init__ shim frames as returns without entries, and functions with cells \
                 at line -1",
                crate::events::printable_path(path)
            );
            Vec::new()
        });
        // How the kernel finds the interpreter frame at each site goes with the site.
        for (site, frame) in sites.iter_mut().zip(frames) {
            site.frame = frame;
        }
    }
    Ok(ElfInfo { sites: sites.into(), version, file, bytes_read: 0 })
}

fn not_elf(path: &Path, e: impl std::fmt::Display) -> UsdtError {
    UsdtError::NotElf { path: path.to_path_buf(), reason: e.to_string() }
}

type Sections<'d, R> = SectionTable<'d, FileHeader64<Endianness>, R>;
type Header = object::elf::SectionHeader64<Endianness>;

/// The bytes of a section, if it has some in the file and at most
/// [`MAX_SECTION_BYTES`] of them.
fn section_bytes<'d, R: ReadRef<'d>>(shdr: &Header, endian: Endianness, data: R) -> Option<&'d [u8]> {
    (shdr.sh_type(endian) != SHT_NOBITS && shdr.sh_size(endian) <= MAX_SECTION_BYTES)
        .then(|| shdr.data(endian, data).ok())
        .flatten()
}

fn named_section<'d, R: ReadRef<'d>>(
    sections: &Sections<'d, R>,
    endian: Endianness,
    data: R,
    name: &str,
) -> Option<&'d [u8]> {
    let (_, shdr) = sections.section_by_name(endian, name.as_bytes())?;
    section_bytes(shdr, endian, data)
}

/// Whether the file's dynamic symbol table defines (not merely imports)
/// every function of [`python::C_API`]: CPython's executable (linked with
/// -export-dynamic) and libpython do; an extension module or pftrace's
/// agent imports them, and pftraced only holds their names as strings.
fn defines_c_api<'d, R: ReadRef<'d>>(sections: &Sections<'d, R>, endian: Endianness, data: R) -> bool {
    let Some(dynsym) = sections.iter().find(|s| s.sh_type(endian) == SHT_DYNSYM) else {
        return false;
    };
    let strings = sections.section(object::SectionIndex(dynsym.sh_link(endian) as usize)).ok();
    let (Some(symbols), Some(strings)) =
        (section_bytes(dynsym, endian, data), strings.and_then(|s| section_bytes(s, endian, data)))
    else {
        return false;
    };
    let Ok(symbols) = object::pod::slice_from_all_bytes::<Sym64<Endianness>>(symbols) else {
        return false;
    };
    let strings = StringTable::new(strings, 0, strings.len() as u64);
    python::C_API.iter().all(|wanted| {
        symbols.iter().any(|s| {
            s.st_shndx(endian) != SHN_UNDEF
                && s.st_type() == STT_FUNC
                && s.name(endian, strings).is_ok_and(|n| n == wanted.as_bytes())
        })
    })
}

/// The version of a CPython file from its `PY_VERSION` string in `.rodata`,
/// confirmed by its `PY_VERSION_HEX` in `.rodata` or `.text`.
fn version_in<'d, R: ReadRef<'d>>(
    sections: &Sections<'d, R>,
    endian: Endianness,
    data: R,
) -> Option<PyVersion> {
    let rodata = named_section(sections, endian, data, ".rodata")?;
    let text = named_section(sections, endian, data, ".text");
    python::version_from_contents(rodata, text.as_slice())
}

/// The frame spec of each site of a CPython 3.15 file: its layout from
/// `_Py_DebugOffsets` (the start of `.PyRuntime`), and the code before each
/// probe for the register.
fn frame_specs<'d, R: ReadRef<'d>>(
    sections: &Sections<'d, R>,
    endian: Endianness,
    data: R,
    sites: &[ProbeSite],
) -> Result<Vec<FrameSpec>, String> {
    let (_, runtime) = sections.section_by_name(endian, b".PyRuntime").ok_or("no .PyRuntime section")?;
    let (offset, size) = runtime.file_range(endian).ok_or(".PyRuntime has no bytes in the file")?;
    let head = data
        .read_bytes_at(offset, size.min(python::DEBUG_OFFSETS_BYTES))
        .map_err(|()| ".PyRuntime lies beyond the end of the file")?;
    let layout = python::frame_layout(head).map_err(|e| e.to_string())?;
    sites
        .iter()
        .map(|s| {
            let start = s.pc_offset.saturating_sub(128);
            let code_before = data.read_bytes_at(start, s.pc_offset - start).unwrap_or_default();
            let arg_regs: Vec<u16> = s
                .arg_specs
                .iter()
                .filter(|a| a.kind == pftrace_common::arg_kind::REG)
                .map(|a| a.reg_off)
                .collect();
            python::frame_spec(&layout, code_before, &arg_regs).ok_or_else(|| {
                format!("its frame and code fields span more than {} bytes", pftrace_common::FRAME_WINDOW)
            })
        })
        .collect()
}
