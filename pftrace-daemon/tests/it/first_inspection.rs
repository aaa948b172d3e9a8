//! First inspection of a file a process runs (elf_info.rs): CPython is told
//! by its dynamic symbol table defining the C API, not by strings anywhere
//! in the file; the version comes from the name or the contents; only the
//! parts needed are read; files are opened beneath the process's root
//! without following symbolic links. No BPF.

use std::{
    fs::File,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use crate::common::*;
use pftrace::{
    elf_info,
    python::PyVersion,
    target::{self, TargetError},
};

/// A name with no version in it: the version must come from the contents.
const NO_NAME: &str = "interpreter";

/// What inspecting `path` under a versionless name tells (uncached).
fn read(path: &Path) -> elf_info::ElfInfo {
    let file = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    elf_info::read_file(file, Path::new(NO_NAME), path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn v(major: u32, minor: u32) -> Option<PyVersion> {
    Some(PyVersion::new(major, minor))
}

/// pyenv's libpython of `version` (pyenv builds --enable-shared: the
/// executable is a stub that imports `Py_BytesMain`).
fn pyenv_lib(version: &str) -> (PathBuf, PathBuf) {
    let exe = pyenv_python(version);
    let name = exe.file_name().unwrap().to_str().unwrap().to_string();
    let lib = exe.parent().unwrap().parent().unwrap().join(format!("lib/lib{name}.so.1.0"));
    assert!(lib.is_file(), "{}: missing (pyenv's {version} is built --enable-shared)", lib.display());
    (exe, lib)
}

#[test]
fn interpreters_are_told_by_their_contents() {
    // The probe-enabled 3.9 (executable linked -export-dynamic).
    let info = read(&python());
    assert_eq!(info.version, v(3, 9));
    assert_eq!(info.sites.len(), 2, "function__entry and function__return");
    // pyenv: the libpython is CPython, the stub executable is not.
    for (version, want) in [("3.9.18", v(3, 9)), ("3.11.7", v(3, 11)), ("3.13.0", v(3, 13))] {
        let (exe, lib) = pyenv_lib(version);
        assert_eq!(read(&lib).version, want, "{}", lib.display());
        assert_eq!(read(&exe).version, None, "{}: a stub importing Py_BytesMain", exe.display());
    }
    // Debian's own builds: sid's (static libpython) and this machine's 3.11.
    for (minor, want) in [("3.13", v(3, 13)), ("3.14", v(3, 14)), ("3.15", v(3, 15))] {
        let py = sid_python(minor);
        let info = read(&py);
        assert_eq!(info.version, want, "{}", py.display());
        assert_eq!(info.sites.len(), if minor == "3.15" { 2 } else { 0 }, "{}", py.display());
    }
    assert_eq!(read(Path::new("/usr/bin/python3.11")).version, v(3, 11));
}

/// The agent .so the tests need built (`cargo build --release -p pftrace-agent`).
fn agent_so() -> PathBuf {
    let so = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/libpftrace_agent.so");
    assert!(
        so.is_file(),
        "{}: missing; build it with `cargo build --release -p pftrace-agent`",
        so.display()
    );
    so
}

#[test]
fn pftrace_and_programs_embedding_python_are_not_interpreters() {
    assert_eq!(read(Path::new(PFTRACED)).version, None);
    assert_eq!(read(&agent_so()).version, None);
    // A program embedding CPython 3.9: it imports Py_InitializeEx and
    // PyEval_EvalCode, and holds "3.9.18" and its PY_VERSION_HEX, all that
    // the old test by strings looked for. Its libpython is the interpreter.
    let dir = TestDir::new("embedder");
    let (_, lib) = pyenv_lib("3.9.18");
    let src = dir.join("embed.c");
    std::fs::write(
        &src,
        "void Py_InitializeEx(int); void *PyEval_EvalCode(void *, void *, void *);\n\
         const char version[] = \"3.9.18\"; volatile unsigned hex = 0x030912f0;\n\
         int main(int argc, char **argv) { if (argc > 5) { Py_InitializeEx(0); PyEval_EvalCode(0, 0, 0); }\n\
         return version[argc] + (int)hex; }\n",
    )
    .unwrap();
    let exe = dir.join("embed");
    let out = Command::new("cc")
        .args(["-O1", "-o"])
        .arg(&exe)
        .arg(&src)
        .arg(&lib)
        .output()
        .expect("cc (apt-get install gcc)");
    assert!(out.status.success(), "cc: {}", String::from_utf8_lossy(&out.stderr));
    let bytes = std::fs::read(&exe).unwrap();
    let has = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    assert!(has(b"Py_InitializeEx\0") && has(b"PyEval_EvalCode\0") && has(b"\x003.9.18\0"));
    assert!(has(&0x030912f0u32.to_le_bytes()));
    assert_eq!(read(&exe).version, None);
    // This test's own process (a Rust program holding these names) is refused as not Python.
    match target::inspect(std::process::id()) {
        Err(TargetError::NotPython { pid, .. }) => assert_eq!(pid, std::process::id()),
        other => panic!("this test process inspected as {other:?}"),
    }
}

#[test]
fn only_the_parts_needed_are_read_and_a_second_process_costs_a_lookup() {
    require_root();
    let py = python();
    let size = std::fs::metadata(&py).unwrap().len();
    let info = read(&py);
    // Headers, notes and dynamic symbols; the name gives the version.
    let named = elf_info::read_file(File::open(&py).unwrap(), &py, &py).unwrap();
    assert!(named.bytes_read < 256 << 10, "{} of {size} bytes read", named.bytes_read);
    // Without a version in the name, .rodata and .text too (2.8 MB).
    assert!(info.bytes_read < 4 << 20, "{} of {size} bytes read", info.bytes_read);
    eprintln!(
        "{}: {size} bytes; read {} (named), {} (by contents)",
        py.display(),
        named.bytes_read,
        info.bytes_read
    );

    // Two processes of one interpreter: the second is a cache hit.
    let dir = TestDir::new("second-process");
    let script = dir.script("wait.py", "import sys\nprint('ready', flush=True)\nsys.stdin.readline()\n");
    let a = PyProcess::spawn(&py, &script, &[]);
    let b = PyProcess::spawn(&py, &script, &[]);
    a.expect_line("ready");
    b.expect_line("ready");
    let first = target::inspect(a.pid()).unwrap();
    let second = target::inspect(b.pid()).unwrap();
    assert_eq!((first.version, second.version), (v(3, 9), v(3, 9)));
    assert!(std::sync::Arc::ptr_eq(&first.sites, &second.sites), "the second process re-read the file");

    // Figures (fastest of 7): first inspection of each file, and a cached one.
    let (_, lib) = pyenv_lib("3.9.18");
    for path in
        [py.clone(), sid_python("3.15"), lib, PathBuf::from("/usr/bin/python3.11"), PathBuf::from(PFTRACED)]
    {
        let best = |f: &dyn Fn()| {
            (0..7)
                .map(|_| {
                    let t = Instant::now();
                    f();
                    t.elapsed()
                })
                .min()
                .unwrap_or(Duration::MAX)
        };
        let open = || File::open(&path).unwrap();
        let first = best(&|| drop(elf_info::read_file(open(), &path, &path).unwrap()));
        let unnamed = best(&|| drop(elf_info::read_file(open(), Path::new(NO_NAME), &path).unwrap()));
        let cached = best(&|| drop(elf_info::inspect(open(), &path, &path).unwrap()));
        eprintln!(
            "FIRST-INSPECTION {}: first {first:?} (by contents {unnamed:?}), cached {cached:?}",
            path.display()
        );
    }
}

#[test]
fn files_are_opened_beneath_the_root_without_following_links() {
    let dir = TestDir::new("beneath");
    let root = dir.path();
    std::fs::create_dir_all(root.join("usr/bin")).unwrap();
    std::fs::write(root.join("usr/bin/real"), b"x").unwrap();
    assert!(elf_info::open_beneath(root, Path::new("/usr/bin/real")).is_ok());
    // A link to a file outside the root, a link to one inside, a linked directory.
    symlink("/etc/passwd", root.join("usr/bin/python3.9")).unwrap();
    symlink("real", root.join("usr/bin/python3")).unwrap();
    symlink("/usr", root.join("lib")).unwrap();
    for path in ["/usr/bin/python3.9", "/usr/bin/python3", "/lib/bin/bash", "/../../etc/passwd"] {
        let err = elf_info::open_beneath(root, Path::new(path)).expect_err(path);
        assert!(
            matches!(err.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOENT) | Some(libc::EXDEV)),
            "{path}: {err}"
        );
    }
    // A directory is refused as not a regular file.
    let err =
        elf_info::inspect(elf_info::open_beneath(root, Path::new("/usr")).unwrap(), Path::new("usr"), root)
            .unwrap_err();
    assert!(err.to_string().contains("not a regular file"), "{err}");
}
