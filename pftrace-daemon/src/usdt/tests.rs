//! Tests of the `usdt` module on real ELF files: Debian 12's /usr/bin/python3.11
//! and small C programs built with <sys/sdt.h> (needs `cc` and the
//! systemtap-sdt-dev package). Offsets are checked against independent
//! evidence: a `nop` at every probe offset, and semaphore offsets computed
//! from section headers and symbols instead of program headers.

use std::path::{Path, PathBuf};
use std::process::Command;

use object::read::elf::ElfFile64;
use object::{Endianness, Object, ObjectSection, ObjectSymbol};
use pftrace_common::{UsdtArg, arg_kind, kind};

use super::*;

const PYTHON: &str = "/usr/bin/python3.11";

/// File offset of a virtual address computed from the section headers.
fn offset_by_sections(data: &[u8], vaddr: u64) -> u64 {
    let elf = ElfFile64::<Endianness>::parse(data).unwrap();
    let sec = elf
        .sections()
        .find(|s| s.address() <= vaddr && vaddr < s.address() + s.size() && s.file_range().is_some())
        .unwrap_or_else(|| panic!("no section holds {vaddr:#x}"));
    vaddr - sec.address() + sec.file_range().unwrap().0
}

/// Every probe offset must hold the `nop` sdt.h puts there, and every
/// semaphore offset must agree with the section headers.
fn check_offsets(path: &Path, sites: &[ProbeSite]) {
    let data = std::fs::read(path).unwrap();
    for s in sites {
        assert_eq!(data[s.pc_offset as usize], 0x90, "{}:{} pc offset is not a nop", s.provider, s.name);
        assert_eq!(s.pc_offset, offset_by_sections(&data, s.pc));
        if s.semaphore != 0 {
            assert_eq!(s.semaphore_offset, offset_by_sections(&data, s.semaphore));
        }
    }
}

fn reg(size: u8, signed: bool, reg_off: u16) -> UsdtArg {
    UsdtArg {
        kind: arg_kind::REG,
        reg_off,
        size,
        signed: u8::from(signed),
        bitshift: 64 - 8 * size,
        ..UsdtArg::default()
    }
}

#[test]
fn python311_probes_match_readelf() {
    let sites = read_probes(Path::new(PYTHON)).unwrap();
    // (name, pc, pc offset, semaphore, semaphore offset, args), from
    // `readelf -n` and `readelf -lW /usr/bin/python3.11` on Debian 12.
    let expected = [
        ("audit", 0x42512a, 0x2512a, 0xa84276, 0x683276, "8@%rbx 8@%r15"),
        ("gc__done", 0x42873b, 0x2873b, 0xa84270, 0x683270, "-8@%r12"),
        ("gc__start", 0x4287f3, 0x287f3, 0xa8426e, 0x68326e, "-4@112(%rsp)"),
        ("line", 0x43423c, 0x3423c, 0xa8426c, 0x68326c, "8@%r14 8@%rax -4@%ebp"),
        ("import__find__load__start", 0x45273a, 0x5273a, 0xa84272, 0x683272, "8@%rax"),
        ("import__find__load__done", 0x45275a, 0x5275a, 0xa84274, 0x683274, "8@%rax -4@%edx"),
        ("function__entry", 0x4f20a1, 0xf20a1, 0xa84260, 0x683260, "8@%rbp 8@%r12 -4@%eax"),
        ("function__return", 0x4f20d4, 0xf20d4, 0xa84262, 0x683262, "8@%rbp 8@%r12 -4@%eax"),
    ];
    let got: Vec<_> = sites
        .iter()
        .map(|s| {
            assert_eq!(s.provider, "python");
            assert_eq!(s.path, Path::new(PYTHON));
            (s.name.as_str(), s.pc, s.pc_offset, s.semaphore, s.semaphore_offset, s.args.as_str())
        })
        .collect();
    assert_eq!(got, expected);
    check_offsets(Path::new(PYTHON), &sites);
    assert_eq!(
        sites[0].spec().unwrap_err().to_string(),
        "/usr/bin/python3.11: probe python:audit: USDT argument string '8@%rbx 8@%r15' has 2 argument(s), 3 needed"
    );
}

#[test]
fn python311_function_probes() {
    let sites = read_python_function_probes(Path::new(PYTHON)).unwrap();
    let kinds: Vec<_> = sites.iter().map(|s| (s.name.as_str(), s.python_kind())).collect();
    assert_eq!(kinds, [("function__entry", Some(kind::ENTRY)), ("function__return", Some(kind::RETURN))]);
    for s in &sites {
        assert!(s.is_python_function());
        // filename in %rbp, funcname in %r12, lineno in %eax (signed int).
        assert_eq!(s.spec().unwrap().args, [reg(8, false, 32), reg(8, false, 24), reg(4, true, 80)]);
    }
}

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("pftrace-usdt-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const SEM_C: &str = r#"
#define _SDT_HAS_SEMAPHORES 1
#include <sys/sdt.h>
unsigned short pftest_hit_semaphore __attribute__((section(".probes"))) = 0;
int run(int n, const char *s) {
    if (pftest_hit_semaphore)
        STAP_PROBE3(pftest, hit, s, n, 42);
    return n + 1;
}
"#;
const NOSEM_C: &str = r#"
#include <sys/sdt.h>
void plain(long *p, int i) { STAP_PROBE3(pftest, plain, p[1], p[i], (short)-7); }
"#;
const MAIN_C: &str = r#"
int run(int, const char *); void plain(long *, int);
int main(int argc, char **argv) { long a[4] = {1, 2, 3, 4}; plain(a, argc); return run(argc, argv[0]) == 0; }
"#;

/// Builds the test program with `cc` in `dir` with extra flags.
fn build(dir: &Path, out: &str, flags: &[&str], sources: &[&str]) -> PathBuf {
    for (name, text) in [("sem.c", SEM_C), ("nosem.c", NOSEM_C), ("main.c", MAIN_C)] {
        std::fs::write(dir.join(name), text).unwrap();
    }
    let path = dir.join(out);
    let status = Command::new("cc")
        .current_dir(dir)
        .args(["-O2", "-o"])
        .arg(&path)
        .args(flags)
        .args(sources)
        .status()
        .expect("running cc (these tests need a C compiler)");
    assert!(status.success(), "cc failed: is systemtap-sdt-dev (sys/sdt.h) installed?");
    path
}

#[test]
fn c_programs_with_and_without_semaphores() {
    let dir = TempDir::new("c");
    let all = ["main.c", "sem.c", "nosem.c"];
    for (out, flags, sources) in [
        ("pie", &[][..], &all[..]),
        ("nopie", &["-no-pie"][..], &all[..]),
        ("lib.so", &["-shared", "-fPIC"][..], &["sem.c", "nosem.c"][..]),
    ] {
        let path = build(&dir.0, out, flags, sources);
        let sites = read_probes(&path).unwrap();
        assert_eq!(sites.len(), 2, "{out}");
        check_offsets(&path, &sites);

        let hit = sites.iter().find(|s| s.name == "hit").unwrap();
        let data = std::fs::read(&path).unwrap();
        let elf = ElfFile64::<Endianness>::parse(&*data).unwrap();
        let sym = elf.symbols().find(|s| s.name() == Ok("pftest_hit_semaphore")).unwrap();
        assert_eq!(hit.semaphore, sym.address(), "{out}");
        let sec = elf.section_by_index(sym.section_index().unwrap()).unwrap();
        assert_eq!(hit.semaphore_offset, sym.address() - sec.address() + sec.file_range().unwrap().0);
        assert_ne!(hit.semaphore_offset, 0);
        // gcc -O2 passes the constant as an immediate.
        let c = hit.spec().unwrap().args[2];
        assert_eq!((c.kind, c.val_off, c.size, c.signed), (arg_kind::CONST, 42, 4, 1), "{}", hit.args);

        let plain = sites.iter().find(|s| s.name == "plain").unwrap();
        assert_eq!((plain.semaphore, plain.semaphore_offset), (0, 0));
        assert_eq!(plain.arg_specs.len(), 3, "{}", plain.args);
        assert_eq!(plain.arg_specs[2].val_off, -7i64 as u64, "{}", plain.args);
        assert!(!hit.is_python_function() && plain.python_kind().is_none());
        assert!(read_python_function_probes(&path).unwrap().is_empty());
    }
}

#[test]
fn prelink_correction_on_a_real_file() {
    let dir = TempDir::new("prelink");
    let path = build(&dir.0, "pie", &[], &["main.c", "sem.c", "nosem.c"]);
    let before = read_probes(&path).unwrap();
    // Pretend the file was prelinked down by 2 bytes after the notes were
    // written: lower every note's recorded base by 2; the reader must move
    // pc and semaphore up by 2.
    let mut data = std::fs::read(&path).unwrap();
    let elf = ElfFile64::<Endianness>::parse(&*data).unwrap();
    let (start, size) = elf.section_by_name(".note.stapsdt").unwrap().file_range().unwrap();
    let (mut off, end) = (start as usize, (start + size) as usize);
    while off < end {
        let word = |o: usize| u32::from_le_bytes(data[o..o + 4].try_into().unwrap()) as usize;
        let (namesz, descsz) = (word(off), word(off + 4));
        let desc = off + 12 + namesz.next_multiple_of(4);
        let base = u64::from_le_bytes(data[desc + 8..desc + 16].try_into().unwrap());
        data[desc + 8..desc + 16].copy_from_slice(&(base - 2).to_le_bytes());
        off = desc + descsz.next_multiple_of(4);
    }
    let moved = dir.0.join("moved");
    std::fs::write(&moved, &data).unwrap();
    let after = read_probes(&moved).unwrap();
    for (b, a) in before.iter().zip(&after) {
        assert_eq!((a.pc, a.pc_offset), (b.pc + 2, b.pc_offset + 2));
        if b.semaphore != 0 {
            assert_eq!((a.semaphore, a.semaphore_offset), (b.semaphore + 2, b.semaphore_offset + 2));
        } else {
            assert_eq!(a.semaphore, 0);
        }
    }
}

#[test]
fn file_errors_name_the_file() {
    let dir = TempDir::new("errors");
    let text = dir.0.join("notes.txt");
    std::fs::write(&text, "not an ELF file").unwrap();
    assert_eq!(
        read_probes(&text).unwrap_err().to_string(),
        format!("{} is not a readable ELF file: it does not start with the ELF magic bytes", text.display())
    );
    let missing = dir.0.join("missing");
    assert!(matches!(read_probes(&missing), Err(UsdtError::Read { .. })));
    assert!(
        read_probes(&missing)
            .unwrap_err()
            .to_string()
            .starts_with(&format!("cannot read {}: ", missing.display()))
    );

    // An ELF without SDT notes has no probes.
    let plain = dir.0.join("plain");
    std::fs::write(&plain, "int main(void) { return 0; }").unwrap();
    let src = dir.0.join("plain.c");
    std::fs::rename(&plain, &src).unwrap();
    assert!(Command::new("cc").arg("-o").arg(&plain).arg(&src).status().unwrap().success());
    assert!(read_probes(&plain).unwrap().is_empty());

    // Same file, claiming to be aarch64 (e_machine 183), then ELF32.
    let mut data = std::fs::read(&plain).unwrap();
    data[18..20].copy_from_slice(&183u16.to_le_bytes());
    let arm = dir.0.join("arm");
    std::fs::write(&arm, &data).unwrap();
    assert_eq!(
        read_probes(&arm).unwrap_err().to_string(),
        format!(
            "{} is not supported: its machine is 183, not x86-64 (62); only x86-64 USDT arguments are understood",
            arm.display()
        )
    );
    data[4] = 1; // EI_CLASS = ELFCLASS32
    let elf32 = dir.0.join("elf32");
    std::fs::write(&elf32, &data).unwrap();
    assert_eq!(
        read_probes(&elf32).unwrap_err().to_string(),
        format!("{} is not supported: it is a 32-bit ELF file; only x86-64 ELF64 is", elf32.display())
    );
}
