//! Mapping virtual addresses of an ELF file to file offsets through its
//! PT_LOAD segments: uprobes are placed at file offsets, and the kernel's
//! `ref_ctr_offset` (the USDT semaphore) is a file offset too.

use std::path::{Path, PathBuf};

use object::ReadRef;
use object::elf::{PF_X, PT_LOAD};
use object::read::elf::{FileHeader, ProgramHeader};

use super::error::{Result, UsdtError};

/// What an address is expected to point at, which decides the segment kind
/// it must lie in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddrKind {
    /// An instruction (a probe's pc): must be in an executable segment.
    Code,
    /// Data (a semaphore): must be in a non-executable segment.
    Data,
}

/// One PT_LOAD program header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadSegment {
    /// `p_vaddr`: where the segment starts in memory (before load bias).
    pub vaddr: u64,
    /// `p_memsz`: its size in memory.
    pub memsz: u64,
    /// `p_offset`: where its bytes start in the file.
    pub offset: u64,
    /// `p_flags & PF_X`.
    pub executable: bool,
}

/// The PT_LOAD segments of one file, sorted by address, with the file's path
/// for error messages.
#[derive(Clone, Debug)]
pub struct Segments {
    path: PathBuf,
    segs: Vec<LoadSegment>,
}

impl Segments {
    /// Collects the PT_LOAD segments of a parsed ELF file. Fails if there are none.
    pub fn from_elf<'data, Elf: FileHeader, R: ReadRef<'data>>(
        header: &Elf,
        endian: Elf::Endian,
        data: R,
        path: &Path,
    ) -> Result<Self> {
        let phdrs = header.program_headers(endian, data).map_err(|e| UsdtError::NotElf {
            path: path.to_path_buf(),
            reason: format!("program headers: {e}"),
        })?;
        let segs = phdrs
            .iter()
            .filter(|p| p.p_type(endian) == PT_LOAD)
            .map(|p| LoadSegment {
                vaddr: p.p_vaddr(endian).into(),
                memsz: p.p_memsz(endian).into(),
                offset: p.p_offset(endian).into(),
                executable: p.p_flags(endian) & PF_X != 0,
            })
            .collect();
        Self::new(segs, path)
    }

    /// Builds from already collected segments. Fails if there are none.
    pub fn new(mut segs: Vec<LoadSegment>, path: &Path) -> Result<Self> {
        if segs.is_empty() {
            return Err(UsdtError::NoLoadSegments { path: path.to_path_buf() });
        }
        segs.sort_by_key(|s| s.vaddr);
        Ok(Self { path: path.to_path_buf(), segs })
    }

    /// The segments, sorted by address.
    pub fn segments(&self) -> &[LoadSegment] {
        &self.segs
    }

    /// The file offset of virtual address `vaddr`:
    /// `vaddr - p_vaddr + p_offset` of the PT_LOAD segment holding it
    /// (`[p_vaddr, p_vaddr + p_memsz)`, as libbpf does). The segment must be
    /// executable for [`AddrKind::Code`] and not for [`AddrKind::Data`].
    /// `what` names the address in errors, e.g. "pc of probe python:line".
    pub fn file_offset(&self, vaddr: u64, kind: AddrKind, what: &str) -> Result<u64> {
        let seg =
            self.segs.iter().find(|s| s.vaddr <= vaddr && vaddr - s.vaddr < s.memsz).ok_or_else(|| {
                UsdtError::AddressNotMapped { path: self.path.clone(), what: what.to_string(), addr: vaddr }
            })?;
        if seg.executable != (kind == AddrKind::Code) {
            return Err(UsdtError::WrongSegment {
                path: self.path.clone(),
                what: what.to_string(),
                addr: vaddr,
                seg_start: seg.vaddr,
                seg_end: seg.vaddr.wrapping_add(seg.memsz),
                seg_executable: seg.executable,
            });
        }
        Ok(vaddr - seg.vaddr + seg.offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The PT_LOAD headers of Debian 12's /usr/bin/python3.11 (`readelf -lW`).
    fn python311() -> Segments {
        let seg = |offset, vaddr, memsz, executable| LoadSegment { vaddr, memsz, offset, executable };
        Segments::new(
            vec![
                seg(0x544dc8, 0x945dc8, 0x1832f0, false),
                seg(0x000000, 0x400000, 0x01e3e8, false),
                seg(0x01f000, 0x41f000, 0x2b2289, true),
                seg(0x2d2000, 0x6d2000, 0x272968, false),
            ],
            Path::new("/usr/bin/python3.11"),
        )
        .unwrap()
    }

    #[test]
    fn maps_code_and_data_through_their_segments() {
        let s = python311();
        assert_eq!(s.segments()[0].vaddr, 0x400000, "sorted by address");
        // python:function__entry pc and semaphore.
        assert_eq!(s.file_offset(0x4f20a1, AddrKind::Code, "pc").unwrap(), 0xf20a1);
        assert_eq!(s.file_offset(0xa84260, AddrKind::Data, "sem").unwrap(), 0x683260);
        // First and last byte of a segment.
        assert_eq!(s.file_offset(0x41f000, AddrKind::Code, "pc").unwrap(), 0x1f000);
        assert_eq!(s.file_offset(0x6d1288, AddrKind::Code, "pc").unwrap(), 0x2d1288);
    }

    #[test]
    fn rejects_unmapped_and_wrong_kind() {
        let s = python311();
        assert_eq!(
            s.file_offset(0x6d1289, AddrKind::Code, "pc of probe p:n").unwrap_err().to_string(),
            "/usr/bin/python3.11: pc of probe p:n at address 0x6d1289 lies in no PT_LOAD segment"
        );
        assert_eq!(
            s.file_offset(0x10, AddrKind::Data, "semaphore").unwrap_err().to_string(),
            "/usr/bin/python3.11: semaphore at address 0x10 lies in no PT_LOAD segment"
        );
        assert_eq!(
            s.file_offset(0xa84260, AddrKind::Code, "pc of probe p:n").unwrap_err().to_string(),
            "/usr/bin/python3.11: pc of probe p:n at address 0xa84260 lies in the non-executable \
             segment [0x945dc8, 0xac90b8); it must be in an executable segment"
        );
        assert_eq!(
            s.file_offset(0x4f20a1, AddrKind::Data, "semaphore of probe p:n").unwrap_err().to_string(),
            "/usr/bin/python3.11: semaphore of probe p:n at address 0x4f20a1 lies in the executable \
             segment [0x41f000, 0x6d1289); it must be in a non-executable (data) segment"
        );
    }

    #[test]
    fn no_load_segments_is_an_error() {
        assert_eq!(
            Segments::new(vec![], Path::new("/x.so")).unwrap_err().to_string(),
            "/x.so has no PT_LOAD segment: cannot map addresses to file offsets"
        );
    }
}
