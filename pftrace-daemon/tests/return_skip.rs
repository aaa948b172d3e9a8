//! Returns dropped by the kernel without reading their name (issue 13,
//! pftrace-ebpf/src/depth.rs), on the real CPython 3.9 built --with-dtrace:
//! `returns_skipped` equals the exact number of returns of calls the kernel
//! saw enter unmatched, and calls begun before the attachment (inside a
//! traced call, inside deep recursion of traced and untraced calls) still
//! give exactly the returns without entries they should. Each process ends
//! with `os._exit`, so no interpreter shutdown code adds calls, and reads
//! its go with `os.read` (a text stream's `readline` runs the codec's
//! Python `decode`: calls the test would have to guess).

mod common;

use common::*;

/// Unmatched calls of each kind the script makes once attached.
const MISSES: u64 = 3000;
const HITS: u64 = 500;
const GENERATORS: u64 = 200;
const RAISES: u64 = 300;
/// Frames `a`/`b` alternate down to (DEPTH + 1 of them, `a` at even n).
const DEPTH: u64 = 40;
/// A recursion deeper than the 15 levels whose verdicts the kernel keeps.
const DEEP: u64 = 100;

/// `a` traced, `b`, `miss`, `gen`, `boom` and `bottom` not. The script is
/// blocked in `bottom`, under DEPTH + 1 frames of `a` and `b`, when
/// pftraced attaches; then it makes its unmatched calls (plain, generator
/// runs, exceptions leaving a frame) and HITS traced ones, unwinds, and
/// recurses again, seen whole: DEPTH and then DEEP levels.
const SCRIPT: &str = r#"
    import os, sys

    MISSES, HITS, GENERATORS, RAISES, DEPTH, DEEP = {consts}

    def hit(i):
        return i

    def miss(i):
        return i

    def gen():
        yield 1
        yield 2
        yield 3

    def boom():
        raise ValueError

    def a(n, block):
        return b(n - 1, block) if n else bottom(block)

    def b(n, block):
        return a(n - 1, block) if n else bottom(block)

    def bottom(block):
        if block:
            print("ready", flush=True)
            if os.read(0, 64).strip() != b"go":
                os._exit(3)
            for i in range(MISSES):
                miss(i)
            for i in range(GENERATORS):
                for _ in gen():
                    pass
            for i in range(RAISES):
                try:
                    boom()
                except ValueError:
                    pass
            for i in range(HITS):
                hit(i)
        return 0

    a(DEPTH, True)
    a(DEPTH, False)
    a(DEEP, False)
    sys.stdout.flush()
    os._exit(0)
    "#;

#[test]
fn unmatched_returns_are_dropped_unread_and_calls_begun_before_the_attachment_still_return() {
    let dir = TestDir::new("retskip");
    let consts = format!("{MISSES}, {HITS}, {GENERATORS}, {RAISES}, {DEPTH}, {DEEP}");
    let script = dir.script("retskip.py", &SCRIPT.replace("{consts}", &consts));
    let (run, attached) = traced_from_go(&dir, &script, &["a", "hit"]);
    assert!(attached.contains("CPython 3.9"), "{attached}");
    let trace = run.trace();

    // Open at the attachment: <module>, a(DEPTH) .. a(0) (DEPTH + 1 frames,
    // DEPTH / 2 + 1 of them `a`) and bottom. Their returns come at depth 0:
    // read, and the `a` ones reach pftraced as returns without entries.
    let a_open = DEPTH / 2 + 1;
    // Seen whole: a(DEPTH) .. a(0) and a(DEEP) .. a(0).
    let a_seen = DEPTH / 2 + 1 + DEEP / 2 + 1;
    // Of the second and third recursions (a(n) at level 1, so `b` at even
    // levels), only the `b` frames at levels 2, 4, .. 14: the kernel keeps
    // the verdicts of levels below 16, deeper returns are read.
    let skipped_second = 7;
    let skipped_third = 7;
    // Each generator run ends in a return (3 yields and the end).
    let skipped = MISSES + GENERATORS * 4 + RAISES + skipped_second + skipped_third;
    let c = |name| trace.counter(name);
    eprintln!(
        "counters: entry_seen {} return_seen {} returns_skipped {} return_matched {} unmatched returns {}",
        c("entry_seen"),
        c("return_seen"),
        c("returns_skipped"),
        c("return_matched"),
        trace.unmatched_returns_total()
    );
    // Entries seen: every call made after the go.
    let entries = MISSES + GENERATORS * 4 + RAISES + HITS + (DEPTH + 2) + (DEEP + 2);
    assert_eq!(c("entry_seen"), entries);
    assert_eq!(c("returns_skipped"), skipped, "returns dropped unread");
    assert_eq!(c("thread_depths_full"), 0);
    assert_eq!(c("entry_matched"), HITS + a_seen);
    assert_eq!(c("return_matched"), HITS + a_seen + a_open);
    // Every return after the attachment was seen: those of seen entries,
    // and the DEPTH + 2 frames open at it (the module never returns).
    assert_eq!(c("return_seen"), c("entry_seen") + DEPTH + 2);
    assert_eq!(trace.unmatched_returns_total(), a_open, "returns without entries");
    assert_eq!(trace.named("hit").len() as u64, HITS);
    assert_eq!(trace.named("a").len() as u64, a_seen);
    assert_eq!(trace.incomplete_calls(), 0);
    assert_eq!(c("lost"), 0);
    assert_eq!(c("read_errors"), 0);
}

/// Attached inside a traced call: its return reaches pftraced (a return
/// without entry), while the unmatched calls it makes are dropped unread.
#[test]
fn the_return_of_a_traced_call_begun_before_the_attachment_is_not_skipped() {
    let dir = TestDir::new("retskip-inside");
    let script = dir.script(
        "inside.py",
        r#"
        import os, sys

        def miss(i):
            return i

        def traced():
            print("ready", flush=True)
            if os.read(0, 64).strip() != b"go":
                os._exit(3)
            for i in range(1000):
                miss(i)
            return 0

        traced()
        os._exit(0)
        "#,
    );
    let (run, _) = traced_from_go(&dir, &script, &["traced"]);
    let trace = run.trace();
    assert_eq!(trace.counter("entry_seen"), 1000);
    assert_eq!(trace.counter("returns_skipped"), 1000);
    assert_eq!(trace.counter("return_seen"), 1001);
    assert_eq!(trace.counter("return_matched"), 1);
    assert_eq!(trace.unmatched_returns_total(), 1);
    assert_eq!(trace.unmatched_returns()[0]["name"], "traced", "{:?}", trace.unmatched_returns());
    assert!(trace.calls.is_empty());
}
