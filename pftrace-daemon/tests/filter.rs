//! The in-kernel name filter: only named functions produce records, every
//! one of them does, and names are matched exactly (all 62 bytes of the
//! longest allowed name).

mod common;

use common::*;

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
        .find(|l| l.starts_with("foo "))
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
