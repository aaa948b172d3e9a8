//! The in-kernel name filter: only named functions produce records, every
//! one of them does, and names are matched exactly (all 62 bytes of the
//! longest allowed name).

use crate::common;

use crate::common::*;

/// foo ×100 and bar ×300, only foo traced: 100 records, the kernel saw the rest.
#[test]
fn unnamed_functions_produce_no_records() {
    let dir = TestDir::new("filter");
    let script = dir.script(
        "filter.py",
        r#"
        def foo():
            return 1

        def bar():
            return 2

        def food():            # foo's name is a prefix of this one
            return 3

        for i in range(100):
            foo()
            bar(); bar(); bar()
            food()
        import time; time.sleep(0.3)  # alive while pftraced resolves foo (its summary row)
        "#,
    );
    let run = Pftraced::new(&dir, &["foo"]).launch(&[python().as_os_str(), script.as_os_str()]).run();
    run.assert_code(0);
    let trace = run.trace();
    trace.assert_clean();
    assert_eq!(trace.named("foo").len(), 100);
    assert!(trace.named("bar").is_empty());
    assert!(trace.named("food").is_empty());
    assert_eq!(trace.calls.len(), 100, "{:?}", trace.counts());
    assert_eq!(trace.counter("entry_matched"), 100);
    assert_eq!(trace.counter("return_matched"), 100);
    // The kernel saw foo, bar, food and the interpreter's own calls.
    let (entries, returns) = (trace.counter("entry_seen"), trace.counter("return_seen"));
    assert!(entries >= 500, "entry_seen = {entries}");
    assert!(returns >= 500, "return_seen = {returns}");
    assert!(
        run.stderr.contains(&format!(
            "probes: {entries} entries and {returns} returns seen, 100 + 100 matched; lost records: 0; read errors: 0"
        )),
        "{}",
        run.stderr
    );
    let foo_row = run
        .stderr
        .lines()
        .find(|l| l.starts_with("__main__.foo "))
        .unwrap_or_else(|| panic!("no summary row for foo:\n{}", run.stderr));
    assert_eq!(foo_row.split_whitespace().nth(1), Some("100"), "{foo_row}");
}

/// `-t foo,bar` (comma-separated) traces both; a `foo` in another module is
/// matched too and told apart by its file.
#[test]
fn comma_separated_names_and_same_name_in_two_files() {
    let dir = TestDir::new("filter-comma");
    dir.script(
        "helper.py",
        r#"
        def foo():
            return "helper"
        "#,
    );
    let script = dir.script(
        "main.py",
        r#"
        import helper

        def foo():
            return "main"

        def bar():
            return 2

        for i in range(100):
            foo()
            bar(); bar(); bar()
        for i in range(20):
            helper.foo()
        import time; time.sleep(0.3)  # alive while pftraced resolves the modules
        "#,
    );
    let run = Pftraced::new(&dir, &["foo,bar"]).launch(&[python().as_os_str(), script.as_os_str()]).run();
    run.assert_code(0);
    let trace = run.trace();
    trace.assert_clean();
    assert_eq!(trace.names(), ["foo", "bar"]);
    assert_eq!(trace.named_in("foo", "/main.py").len(), 100);
    assert_eq!(trace.named_in("foo", "/helper.py").len(), 20);
    assert_eq!(trace.named("foo").len(), 120);
    assert_eq!(trace.named("bar").len(), 300);
    assert!(trace.named_in("foo", "/helper.py").iter().all(|c| c.cat == "helper"));
    assert_eq!(trace.counter("entry_matched"), 420);
}

/// A 62-byte function name (the longest that can be traced) is matched
/// in full: a name differing only in its last byte is not traced.
#[test]
fn longest_allowed_name_is_matched_exactly() {
    let long = format!("f{}", "x".repeat(60)) + "1";
    let twin = format!("f{}", "x".repeat(60)) + "2";
    assert_eq!(long.len(), 62);
    let dir = TestDir::new("filter-long");
    let script = dir.script(
        "long.py",
        &format!(
            r#"
            def {long}():
                pass

            def {twin}():
                pass

            for i in range(7):
                {long}()
                {twin}()
            "#
        ),
    );
    let run = Pftraced::new(&dir, &[&long]).launch(&[python().as_os_str(), script.as_os_str()]).run();
    run.assert_code(0);
    let trace = run.trace();
    trace.assert_clean();
    assert_eq!(trace.named(&long).len(), 7);
    assert_eq!(trace.calls.len(), 7, "{:?}", trace.counts());
}

/// Longer Python names never match a traced name that is their prefix: the
/// kernel reads names into a 64-byte buffer, so a read that fills it (63
/// bytes or more) is never a match, and names of at most 62 bytes are traced.
#[test]
fn longer_name_does_not_match_its_prefix() {
    let long = format!("f{}", "x".repeat(60)) + "1";
    let longer = format!("{long}Z");
    let longest = format!("{long}{}", "Z".repeat(20));
    assert_eq!((long.len(), longer.len()), (62, 63));
    let dir = TestDir::new("filter-longer");
    let script = dir.script(
        "longer.py",
        &format!(
            r#"
            def {long}():
                pass

            def {longer}():
                pass

            def {longest}():
                pass

            for i in range(7):
                {long}()
            for i in range(5):
                {longer}()
                {longest}()
            "#
        ),
    );
    let run = Pftraced::new(&dir, &[&long]).launch(&[python().as_os_str(), script.as_os_str()]).run();
    run.assert_code(0);
    let trace = run.trace();
    trace.assert_clean();
    assert_eq!(trace.named(&long).len(), 7, "calls of longer names were counted as {long}");
    assert_eq!(trace.calls.len(), 7);
}

/// A path-qualified name traces the function in that file only; the same
/// name in another file crosses to user space and is dropped there, counted.
#[test]
fn qualified_name_keeps_only_its_file() {
    let dir = TestDir::new("filter-qualified");
    std::fs::create_dir_all(dir.join("pkg")).unwrap();
    dir.script(
        "pkg/decoder.py",
        r#"
        def load(i):
            return i
        "#,
    );
    dir.script(
        "other.py",
        r#"
        def load(i):
            return i
        "#,
    );
    let main = dir.script(
        "main.py",
        r#"
        import sys
        sys.path[:0] = [sys.argv[1], sys.argv[1] + "/pkg"]
        import decoder, other
        for i in range(40):
            decoder.load(i)
        for i in range(25):
            other.load(i)
        "#,
    );
    let run = Pftraced::new(&dir, &["pkg/decoder.py:load"])
        .launch(&[python().as_os_str(), main.as_os_str(), dir.path().as_os_str()])
        .run();
    run.assert_code(0);
    let trace = run.trace();
    assert_user_filtered_clean(&trace);
    assert_eq!(trace.named_in("load", "/pkg/decoder.py").len(), 40);
    assert_eq!(trace.calls.len(), 40, "{:?}", trace.counts());
    // The kernel matched every `load` (entry and return); user space dropped other.py's 25 pairs.
    assert_eq!(trace.counter("entry_matched"), 65);
    assert_eq!(trace.pftrace()["filtered_in_user_space"].as_u64(), Some(50));
}

/// Globs: the literal prefix is decided in the kernel, the rest here.
#[test]
fn globs_match_by_pattern() {
    let dir = TestDir::new("filter-glob");
    let script = dir.script(
        "globs.py",
        r#"
        def test_one(): pass
        def test_two(): pass
        def testing(): pass
        def check_x(): pass
        def helper(): pass
        for i in range(10):
            test_one(); test_two(); testing(); check_x(); helper()
        "#,
    );
    let run =
        Pftraced::new(&dir, &["test_*", "*_x"]).launch(&[python().as_os_str(), script.as_os_str()]).run();
    run.assert_code(0);
    let trace = run.trace();
    assert_user_filtered_clean(&trace);
    let counts = trace.counts();
    assert_eq!(counts.get("test_one"), Some(&10), "{counts:?}");
    assert_eq!(counts.get("test_two"), Some(&10), "{counts:?}");
    assert_eq!(counts.get("check_x"), Some(&10), "{counts:?}");
    assert_eq!(trace.calls.len(), 30, "{counts:?}");
}

/// Nothing lost or dangling, and every record the kernel matched is either a
/// call's entry or return or was dropped in user space (path or glob).
fn assert_user_filtered_clean(trace: &common::Trace) {
    assert_eq!(trace.counter("lost"), 0);
    assert_eq!(trace.incomplete_calls(), 0);
    assert!(trace.unmatched_returns().is_empty());
    let matched = trace.counter("entry_matched") + trace.counter("return_matched");
    let dropped = trace.pftrace()["filtered_in_user_space"].as_u64().unwrap();
    assert_eq!(matched, 2 * trace.calls.len() as u64 + dropped);
}

/// Two names whose pointers share a slot of the kernel's verdict cache
/// (direct-mapped, per CPU) evict each other and never borrow each other's
/// verdict: `hit` (traced) and an untraced name made to collide with it,
/// called alternately 20,000 times: exactly 20,000 `hit` calls and nothing
/// else, and at least the 40,000 entries of the loop missed the cache (so the
/// two did collide: without a collision every hit after the first would be
/// a cache hit).
#[test]
fn colliding_name_pointers_never_share_a_verdict() {
    const N: u64 = 20_000;
    let dir = TestDir::new("filter-collide");
    let script = dir.script(
        "collide.py",
        &format!(
            r#"
            import ctypes
            # The name argument of CPython 3.9's probes: PyUnicode_AsUTF8(co_name).
            utf8 = ctypes.pythonapi.PyUnicode_AsUTF8
            utf8.restype = ctypes.c_void_p
            utf8.argtypes = [ctypes.py_object]

            def hit():
                return 1

            # pftrace-ebpf's verdict_slot: the top VERDICT_BITS (13) bits of
            # (pointer >> 4) times 0x9e3779b97f4a7c15. No Python call in the search.
            target = (((utf8(hit.__code__.co_name) >> 4) * 0x9e3779b97f4a7c15) & (2**64 - 1)) >> 51
            base = (lambda: 1).__code__
            other = None
            kept = []  # each name stays alive, so the next one gets a new address
            for i in range(200_000):
                code = base.replace(co_name="m%d" % i)
                kept.append(code)
                if (((utf8(code.co_name) >> 4) * 0x9e3779b97f4a7c15) & (2**64 - 1)) >> 51 == target:
                    other = type(hit)(code, {{}})
                    break
            assert other is not None, "no colliding name found"
            print("colliding name", other.__code__.co_name, flush=True)
            for i in range({N}):
                hit()
                other()
            "#
        ),
    );
    let run = Pftraced::new(&dir, &["hit"]).launch(&[python().as_os_str(), script.as_os_str()]).run();
    run.assert_code(0);
    let trace = run.trace();
    trace.assert_clean();
    assert_eq!(trace.named("hit").len() as u64, N, "{:?}", trace.counts());
    assert_eq!(trace.calls.len() as u64, N, "{:?}", trace.counts());
    assert_eq!(trace.counter("entry_matched"), N);
    assert_eq!(trace.counter("return_matched"), N);
    let seen = trace.counter("entry_seen") + trace.counter("return_seen");
    let hits = trace.counter("verdict_hits");
    assert!(seen - hits >= 2 * N, "{seen} hits seen, {hits} decided by the cache: the names did not collide");
}
