//! Long file paths, against the real CPython 3.9: calls are reported under
//! their own full file names up to PATH_MAX, so `FILE:NAME` qualifiers
//! match there too (the common record holds 191 bytes of a file name; a
//! package under a 226-byte path had its 19 files' `__init__` calls
//! reported under one cut path, and `core.py:is_block_level` matched none of
//! its 445 calls). A code object's file name longer than any path is cut at
//! 4095 bytes, and that is counted and reported.

use std::{collections::BTreeMap, fs, path::Path};

use crate::common::*;

/// Modules with a class each; module `mNN` makes NN instances, so every
/// file has its own exact count.
const MODULES: usize = 19;
const BLOCK_CALLS: usize = 445;
const SORT_CALLS: usize = 1701;

/// Writes package `name` under `base`: m01..m19.py (class C with
/// `__init__`), core.py (`is_block_level`) and util.py (`_sort`).
fn write_package(base: &Path, name: &str) {
    let pkg = base.join(name);
    fs::create_dir_all(&pkg)
        .unwrap_or_else(|e| panic!("creating {} bytes of path: {e}", pkg.as_os_str().len()));
    let imports: Vec<String> = (1..=MODULES).map(|i| format!("from . import m{i:02}")).collect();
    fs::write(pkg.join("__init__.py"), format!("{}\nfrom . import core, util\n", imports.join("\n")))
        .unwrap();
    for i in 1..=MODULES {
        let source = "class C:\n    def __init__(self):\n        self.v = 1\n";
        fs::write(pkg.join(format!("m{i:02}.py")), source).unwrap();
    }
    fs::write(pkg.join("core.py"), "def is_block_level(tag):\n    return tag in ('p', 'div')\n").unwrap();
    fs::write(pkg.join("util.py"), "def _sort(items):\n    return sorted(items)\n").unwrap();
}

#[test]
fn calls_in_files_under_long_paths_keep_their_full_file_names() {
    let dir = TestDir::new("long-paths");
    // Over 226 bytes, as in the issue; and as long as a path to a file can
    // be (4095 bytes with `/pkgb/__init__.py`), in directories of 250 bytes.
    let base_a = dir.path().join("a".repeat(230));
    let mut base_b = dir.path().to_path_buf();
    while base_b.as_os_str().len() + 251 + "/pkgb/__init__.py".len() <= 4095 {
        base_b.push("b".repeat(250));
    }
    let pad = 4095 - "/pkgb/__init__.py".len() - base_b.as_os_str().len() - 1;
    base_b.push("c".repeat(pad));
    write_package(&base_a, "pkga");
    write_package(&base_b, "pkgb");
    let longest = base_b.join("pkgb/__init__.py");
    assert_eq!(longest.as_os_str().len(), 4095);
    // A decoy with the same function names in a short path (not matched by
    // the qualifiers), and a code object whose file name is longer than a
    // path can be (cut, counted, reported).
    dir.script("other.py", "def is_block_level(tag):\n    return False\n");
    let script = dir.script(
        "main.py",
        &format!(
            r#"
            import sys
            sys.path[:0] = [{a:?}, {b:?}, {d:?}]
            import pkga, pkgb, other
            for pkg in (pkga, pkgb):
                for i in range(1, {modules} + 1):
                    for _ in range(i):
                        getattr(pkg, "m%02d" % i).C()
                for i in range({block}):
                    pkg.core.is_block_level("p" if i % 2 else "span")
                    other.is_block_level("p")
                for i in range({sort}):
                    pkg.util._sort([3, 1, 2])
            ns = {{}}
            exec(compile("def cut_fn():\n    return 1\n", "/" + "x" * 5000 + ".py", "exec"), ns)
            for _ in range(3):
                ns["cut_fn"]()
            "#,
            a = base_a.to_str().unwrap(),
            b = base_b.to_str().unwrap(),
            d = dir.path().to_str().unwrap(),
            modules = MODULES,
            block = BLOCK_CALLS,
            sort = SORT_CALLS,
        ),
    );
    let run = Pftraced::new(&dir, &["__init__", "core.py:is_block_level", "util.py:_sort", "cut_fn"])
        .launch(&[python().as_os_str(), "-B".as_ref(), script.as_os_str()])
        .run();
    run.assert_code(0);
    let trace = run.trace();
    let pf = trace.pftrace();
    assert_eq!(trace.counter("lost"), 0, "{pf}");
    assert_eq!(trace.incomplete_calls(), 0, "{pf}");
    assert_eq!(trace.unmatched_returns_total(), 0, "{pf}");

    let mut got: BTreeMap<(String, String), usize> = BTreeMap::new();
    for c in &trace.calls {
        *got.entry((c.name.clone(), c.file.clone())).or_default() += 1;
    }
    for (base, pkg) in [(&base_a, "pkga"), (&base_b, "pkgb")] {
        for i in 1..=MODULES {
            let file = base.join(format!("{pkg}/m{i:02}.py")).to_str().unwrap().to_string();
            assert_eq!(
                got.get(&("__init__".into(), file.clone())),
                Some(&i),
                "__init__ in {} bytes: {file}",
                file.len()
            );
        }
        let core = base.join(format!("{pkg}/core.py")).to_str().unwrap().to_string();
        assert_eq!(got.get(&("is_block_level".into(), core)), Some(&BLOCK_CALLS), "{pkg}");
        let util = base.join(format!("{pkg}/util.py")).to_str().unwrap().to_string();
        assert_eq!(got.get(&("_sort".into(), util)), Some(&SORT_CALLS), "{pkg}");
    }
    assert!(
        trace.named("is_block_level").iter().all(|c| !c.file.ends_with("/other.py")),
        "the qualifier core.py:is_block_level matched other.py"
    );
    assert_eq!(trace.counter("entry_matched"), trace.counter("return_matched"), "{pf}");

    // The over-long name: cut at 4095 bytes, each of its 6 records counted.
    let cut = trace.named("cut_fn");
    assert_eq!(cut.len(), 3);
    let want = format!("/{}", "x".repeat(4094));
    assert!(cut.iter().all(|c| c.file == want), "cut_fn's file: {} bytes", cut[0].file.len());
    assert_eq!(pf["file_names_cut"].as_u64(), Some(6), "{pf}");
    assert!(run.stderr.contains("CUT: 6 records had file names over 4095 bytes"), "{}", run.stderr);
    // Every long record was sent as one: none lost, the counter says how many.
    assert!(
        trace.counter("long_files")
            >= 2 * (2 * (MODULES * (MODULES + 1) / 2 + BLOCK_CALLS + SORT_CALLS)) as u64
    );
}
