//! Reading the SystemTap SDT notes (section `.note.stapsdt`) of an ELF file:
//! one record per USDT probe site, with the prelink correction of
//! `.stapsdt.base` applied.
//!
//! Each record is an ELF note of type 3 owned by "stapsdt" whose descriptor
//! is: pc, base, semaphore (addresses, 8 bytes each in ELF64, 4 in ELF32),
//! then three NUL-terminated strings: provider, name, argument string.
//! object's note iterator frames the records (headers, padding); this file
//! reads the descriptors.

use std::path::Path;

use object::elf::SHT_NOTE;
use object::read::elf::{FileHeader, NoteIterator, SectionHeader};
use object::{Endian, ReadRef};

use super::error::{Result, UsdtError};

/// Name of the section holding the probe notes.
pub const NOTE_SECTION: &str = ".note.stapsdt";
/// Name of the section whose address the notes' `base` recorded at link time.
pub const BASE_SECTION: &str = ".stapsdt.base";
/// Note type of SDT v3 probe records.
const NT_STAPSDT: u32 = 3;
/// Note owner of SDT probe records.
const OWNER: &[u8] = b"stapsdt";

/// One probe site as recorded in `.note.stapsdt` (addresses are virtual
/// addresses of the file, not yet mapped to file offsets).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsdtNote {
    /// e.g. "python".
    pub provider: String,
    /// e.g. "function__entry".
    pub name: String,
    /// Address of the probe's `nop` instruction.
    pub pc: u64,
    /// Address `.stapsdt.base` had when the note was written.
    pub base: u64,
    /// Address of the probe's semaphore (a u16 counter), 0 if it has none.
    pub semaphore: u64,
    /// Argument string, e.g. "8@%rbp 8@%r12 -4@%eax".
    pub args: String,
}

/// At most this many bytes of notes are read: CPython's are 0x290 bytes
/// (3.9, 9 probes); a section claiming more is not a real probe table.
pub const MAX_NOTE_BYTES: u64 = 1 << 20;

/// Reads the SDT notes of a parsed ELF file, prelink correction applied.
/// A file without a `.note.stapsdt` section gives an empty list.
pub fn read_notes<'data, Elf: FileHeader, R: ReadRef<'data>>(
    header: &Elf,
    endian: Elf::Endian,
    data: R,
    path: &Path,
) -> Result<Vec<UsdtNote>> {
    let not_elf = |reason: String| UsdtError::NotElf { path: path.to_path_buf(), reason };
    let sections = header.sections(endian, data).map_err(|e| not_elf(format!("section headers: {e}")))?;
    let Some((_, shdr)) = sections.section_by_name(endian, NOTE_SECTION.as_bytes()) else {
        return Ok(Vec::new());
    };
    if shdr.sh_type(endian) != SHT_NOTE {
        return Err(not_elf(format!(
            "section {NOTE_SECTION} has type {} instead of SHT_NOTE",
            shdr.sh_type(endian)
        )));
    }
    let size: u64 = shdr.sh_size(endian).into();
    if size > MAX_NOTE_BYTES {
        return Err(not_elf(format!("section {NOTE_SECTION} is {size} bytes, more than {MAX_NOTE_BYTES}")));
    }
    let records = shdr
        .notes(endian, data)
        .map_err(|e| not_elf(format!("section {NOTE_SECTION}: {e}")))?
        .ok_or_else(|| not_elf(format!("section {NOTE_SECTION} is not a note section")))?;
    let mut notes = parse_notes(records, endian, path)?;
    if let Some((_, base)) = sections.section_by_name(endian, BASE_SECTION.as_bytes()) {
        apply_prelink(&mut notes, base.sh_addr(endian).into());
    }
    Ok(notes)
}

/// Corrects the notes for prelinking: if the file was relocated after the
/// notes were written, `.stapsdt.base` moved from `note.base` to
/// `base_section_addr`, and the pc and (non-zero) semaphore moved by the same
/// amount. A no-op for files that were not prelinked.
pub fn apply_prelink(notes: &mut [UsdtNote], base_section_addr: u64) {
    for note in notes {
        let delta = base_section_addr.wrapping_sub(note.base);
        note.pc = note.pc.wrapping_add(delta);
        if note.semaphore != 0 {
            note.semaphore = note.semaphore.wrapping_add(delta);
        }
    }
}

/// Reads the stapsdt records of a `.note.stapsdt` section (ELF64 or
/// ELF32, as `Elf` says: the addresses are that wide). Notes of other
/// owners or types are skipped.
pub fn parse_notes<Elf: FileHeader>(
    mut records: NoteIterator<'_, Elf>,
    endian: Elf::Endian,
    path: &Path,
) -> Result<Vec<UsdtNote>> {
    let addr_size = if Elf::is_type_64_sized() { 8 } else { 4 };
    let mut notes = Vec::new();
    for index in 0.. {
        let bad = |reason: String| UsdtError::BadNote { path: path.to_path_buf(), index, reason };
        let Some(note) = records.next().map_err(|e| bad(e.to_string()))? else { break };
        if note.n_type(endian) == NT_STAPSDT && note.name() == OWNER {
            notes.push(parse_descriptor(note.desc(), addr_size, &endian).map_err(bad)?);
        }
    }
    Ok(notes)
}

/// pc, base, semaphore, then provider, name and arguments, NUL-terminated.
fn parse_descriptor(desc: &[u8], addr_size: usize, endian: &impl Endian) -> Result<UsdtNote, String> {
    let fixed = 3 * addr_size;
    if desc.len() < fixed {
        return Err(format!(
            "descriptor is {} bytes, shorter than its {fixed} bytes of addresses",
            desc.len()
        ));
    }
    let addr = |i: usize| {
        let b = &desc[i * addr_size..(i + 1) * addr_size];
        match addr_size {
            8 => endian.read_u64_bytes(b.try_into().unwrap()),
            _ => u64::from(endian.read_u32_bytes(b.try_into().unwrap())),
        }
    };
    let mut rest = &desc[fixed..];
    let mut string = |what: &str| -> Result<String, String> {
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| format!("{what} is missing or not NUL-terminated"))?;
        let s = String::from_utf8_lossy(&rest[..end]).into_owned();
        rest = &rest[end + 1..];
        Ok(s)
    };
    Ok(UsdtNote {
        provider: string("provider")?,
        name: string("probe name")?,
        args: string("argument string")?,
        pc: addr(0),
        base: addr(1),
        semaphore: addr(2),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use object::{
        BigEndian, LittleEndian,
        elf::{FileHeader32, FileHeader64},
    };

    const PATH: &str = "/test/libfoo.so";

    /// One ELF note record, padded to `align`.
    fn record(owner: &[u8], ntype: u32, desc: &[u8], align: usize, big: bool) -> Vec<u8> {
        let word = |v: u32| {
            if big { v.to_be_bytes() } else { v.to_le_bytes() }
        };
        let mut out = Vec::new();
        out.extend(word(owner.len() as u32));
        out.extend(word(desc.len() as u32));
        out.extend(word(ntype));
        out.extend(owner);
        out.resize(out.len().next_multiple_of(align), 0);
        out.extend(desc);
        out.resize(out.len().next_multiple_of(align), 0);
        out
    }

    /// A stapsdt descriptor with 8-byte little-endian addresses.
    fn desc(pc: u64, base: u64, sem: u64, strings: &[&str]) -> Vec<u8> {
        let mut out = [pc, base, sem].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>();
        for s in strings {
            out.extend(s.as_bytes());
            out.push(0);
        }
        out
    }

    fn sdt(pc: u64, base: u64, sem: u64, p: &str, n: &str, a: &str) -> Vec<u8> {
        record(b"stapsdt\0", 3, &desc(pc, base, sem, &[p, n, a]), 4, false)
    }

    fn parse(section: &[u8]) -> Result<Vec<UsdtNote>> {
        parse_as::<FileHeader64<LittleEndian>>(section, 4u64, LittleEndian)
    }

    fn parse_as<Elf: FileHeader>(
        section: &[u8],
        align: Elf::Word,
        endian: Elf::Endian,
    ) -> Result<Vec<UsdtNote>> {
        let records = NoteIterator::<Elf>::new(endian, align, section).unwrap();
        parse_notes(records, endian, Path::new(PATH))
    }

    fn note(pc: u64, base: u64, sem: u64, p: &str, n: &str, a: &str) -> UsdtNote {
        UsdtNote { provider: p.into(), name: n.into(), pc, base, semaphore: sem, args: a.into() }
    }

    #[test]
    fn parses_records_in_order() {
        let mut s = sdt(0x4f20a1, 0x8cc5a0, 0xa84260, "python", "function__entry", "8@%rbp 8@%r12 -4@%eax");
        // Descriptor length not a multiple of 4: the next record starts padded.
        s.extend(sdt(0x1000, 0x2000, 0, "p", "no_args", ""));
        let notes = parse(&s).unwrap();
        assert_eq!(
            notes,
            vec![
                note(0x4f20a1, 0x8cc5a0, 0xa84260, "python", "function__entry", "8@%rbp 8@%r12 -4@%eax"),
                note(0x1000, 0x2000, 0, "p", "no_args", ""),
            ]
        );
        assert_eq!(parse(&[]).unwrap(), vec![]);
    }

    #[test]
    fn skips_other_owners_and_types() {
        let d = desc(1, 2, 3, &["a", "b", "c"]);
        let mut s = record(b"GNU\0", 3, &d, 4, false);
        s.extend(record(b"stapsdt\0", 1, &d, 4, false));
        s.extend(record(b"stapsdtx\0", 3, &d, 4, false));
        s.extend(sdt(7, 8, 9, "x", "y", "z"));
        assert_eq!(parse(&s).unwrap(), vec![note(7, 8, 9, "x", "y", "z")]);
    }

    #[test]
    fn eight_byte_alignment_big_endian_and_elf32() {
        let mut s = record(b"stapsdt\0", 3, &desc(1, 2, 3, &["p", "n", "1@%al"]), 8, false);
        s.extend(record(b"stapsdt\0", 3, &desc(4, 5, 6, &["p", "m", ""]), 8, false));
        let n = parse_as::<FileHeader64<LittleEndian>>(&s, 8u64, LittleEndian).unwrap();
        assert_eq!(n.iter().map(|n| n.pc).collect::<Vec<_>>(), [1, 4]);

        let mut d = [0x11u64, 0x22, 0x33].iter().flat_map(|v| v.to_be_bytes()).collect::<Vec<_>>();
        d.extend(b"p\0n\0\0");
        let n = parse_as::<FileHeader64<BigEndian>>(&record(b"stapsdt\0", 3, &d, 4, true), 4u64, BigEndian)
            .unwrap();
        assert_eq!(n, vec![note(0x11, 0x22, 0x33, "p", "n", "")]);

        let mut d = [0x11u32, 0x22, 0x33].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>();
        d.extend(b"p\0n\0-4@%eax\0");
        let n = parse_as::<FileHeader32<LittleEndian>>(
            &record(b"stapsdt\0", 3, &d, 4, false),
            4u32,
            LittleEndian,
        )
        .unwrap();
        assert_eq!(n, vec![note(0x11, 0x22, 0x33, "p", "n", "-4@%eax")]);
    }

    #[test]
    fn malformed_records_are_explained() {
        let bad = |index: usize, reason: &str| {
            format!("{PATH}: bad .note.stapsdt record (note {index} of the section, from 0): {reason}")
        };
        let good = sdt(1, 2, 3, "p", "n", "a");
        let mut s = good.clone();
        s.extend([1, 0, 0, 0, 0]);
        assert_eq!(parse(&s).unwrap_err().to_string(), bad(1, "ELF note is too short"));
        let mut s = good.clone();
        s.truncate(good.len() - 8);
        assert_eq!(parse(&s).unwrap_err().to_string(), bad(0, "Invalid ELF note descsz"));
        let short = record(b"stapsdt\0", 3, &[0; 20], 4, false);
        assert_eq!(
            parse(&short).unwrap_err().to_string(),
            bad(0, "descriptor is 20 bytes, shorter than its 24 bytes of addresses")
        );
        let mut d = desc(1, 2, 3, &["p", "n"]);
        d.extend(b"no-nul");
        assert_eq!(
            parse(&record(b"stapsdt\0", 3, &d, 4, false)).unwrap_err().to_string(),
            bad(0, "argument string is missing or not NUL-terminated")
        );
        let d = desc(1, 2, 3, &["p"]);
        assert!(
            parse(&record(b"stapsdt\0", 3, &d, 4, false))
                .unwrap_err()
                .to_string()
                .ends_with("probe name is missing or not NUL-terminated")
        );
    }

    #[test]
    fn prelink_correction_moves_pc_and_semaphore() {
        let mut notes =
            vec![note(0x1000, 0x5000, 0x9000, "p", "a", ""), note(0x1100, 0x5000, 0, "p", "b", "")];
        // .stapsdt.base moved up by 0x20000.
        apply_prelink(&mut notes, 0x25000);
        assert_eq!((notes[0].pc, notes[0].semaphore), (0x21000, 0x29000));
        assert_eq!((notes[1].pc, notes[1].semaphore), (0x21100, 0), "no semaphore stays 0");
        // Moved down.
        let mut notes = vec![note(0x21000, 0x25000, 0x29000, "p", "a", "")];
        apply_prelink(&mut notes, 0x5000);
        assert_eq!((notes[0].pc, notes[0].semaphore), (0x1000, 0x9000));
        // Not prelinked: unchanged.
        let mut notes = vec![note(0x1000, 0x5000, 0x9000, "p", "a", "")];
        apply_prelink(&mut notes, 0x5000);
        assert_eq!((notes[0].pc, notes[0].semaphore), (0x1000, 0x9000));
    }
}
