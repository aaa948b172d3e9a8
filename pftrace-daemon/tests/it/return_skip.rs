//! Returns dropped by the kernel without reading their name (issue 13,
//! pftrace-ebpf/src/depth.rs), on the real CPython 3.9 built --with-dtrace:
//! `returns_skipped` equals the exact number of returns of calls the kernel
//! saw enter unmatched, and calls begun before the attachment (inside a
//! traced call, inside deep recursion of traced and untraced calls) still
//! give exactly the returns without entries they should. The kernel knows
//! the verdicts of the innermost 44 open levels it saw enter (its window,
//! which follows the current depth), so the expectations below count
//! levels from the innermost: a return is skipped when its entry was seen,
//! did not match, and is still in the window. Each process ends
//! with `os._exit`, so no interpreter shutdown code adds calls, and reads
//! its go with `os.read` (a text stream's `readline` runs the codec's
//! Python `decode`: calls the test would have to guess).

use crate::common::*;

/// Unmatched calls of each kind the script makes once attached.
const MISSES: u64 = 3000;
const HITS: u64 = 500;
const GENERATORS: u64 = 200;
const RAISES: u64 = 300;
/// Frames `a`/`b` alternate down to (DEPTH + 1 of them, `a` at even n).
const DEPTH: u64 = 40;
/// A recursion deeper than the 44 levels whose verdicts the kernel keeps.
const DEEP: u64 = 100;
/// Open levels whose verdicts the kernel keeps (pftrace-ebpf/src/depth.rs).
const WINDOW: u64 = 44;

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
    // DEPTH / 2 + 1 of them `a`) and bottom. Their returns find nothing
    // known: read, and the `a` ones reach pftraced as returns without entries.
    let a_open = DEPTH / 2 + 1;
    // Seen whole: a(DEPTH) .. a(0) and a(DEEP) .. a(0).
    let a_seen = DEPTH / 2 + 1 + DEEP / 2 + 1;
    // The second and third recursions start with nothing known (the first's
    // returns found nothing known and were read, leaving the window empty),
    // a(n) at level 1, so `b` at even levels and `bottom` below
    // a(0). Second: a(40) .. a(0) and bottom are 42 levels, all in the
    // window; its unmatched returns are bottom's and the 20 `b` frames' (b
    // at levels 2, 4, .. 40). Main's build, which kept levels 1..15 from the
    // first sighting, skipped only b at 2 .. 14: 7.
    let skipped_second = 1 + (2..=DEPTH).filter(|level| level % 2 == 0).count() as u64;
    assert_eq!(skipped_second, 21);
    // Third: a(100) .. a(0) and bottom are 102 levels; when bottom enters the
    // window holds the innermost 44, levels 59 .. 102 (the outer 58 fell out:
    // their returns are read). Unmatched among them: bottom (102) and the
    // `b` frames at even levels 60 .. 100: 21. Main's build: 7.
    let lowest_known = DEEP + 2 - WINDOW + 1;
    let skipped_third = 1 + (lowest_known..=DEEP).filter(|level| level % 2 == 0).count() as u64;
    assert_eq!(skipped_third, 22);
    // Before those, in bottom (open at the attachment, so nothing known):
    // each miss, generator resume and boom enters at the window's level 1
    // and returns unmatched: skipped. Each generator run ends in a return
    // (3 yields and the end). The returns of bottom, a(0) .. a(DEPTH) find
    // nothing known (their entries came before the thread was seen): read.
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
    // Nothing known at the go (traced began before): each miss enters at
    // the window's level 1 and returns unmatched (1000 skipped); traced's
    // return finds nothing known and is read.
    assert_eq!(trace.counter("entry_seen"), 1000);
    assert_eq!(trace.counter("returns_skipped"), 1000);
    assert_eq!(trace.counter("return_seen"), 1001);
    assert_eq!(trace.counter("return_matched"), 1);
    assert_eq!(trace.unmatched_returns_total(), 1);
    assert_eq!(trace.unmatched_returns()[0]["name"], "traced", "{:?}", trace.unmatched_returns());
    assert!(trace.calls.is_empty());
}

/// Untraced calls made this many levels below the thread's first Python
/// call (a framework's or a test runner's depth), 56 levels past the window.
const WORK_DEPTH: u64 = 100;

/// A thread whose first Python call since the attachment is at level 1
/// recurses WORK_DEPTH levels and there makes 10,000 untraced and 10 traced
/// calls: every untraced return is dropped unread. Main's build, whose 16
/// levels counted from the first sighting, read all of them (15 skipped in
/// all, the recursion's first levels).
#[test]
fn untraced_calls_far_below_the_first_call_are_dropped_unread() {
    const MISSES: u64 = 10_000;
    const HITS: u64 = 10;
    let dir = TestDir::new("retskip-far");
    let script = dir.script(
        "far.py",
        &r#"
        import os, sys

        MISSES, HITS, WORK_DEPTH = {consts}

        def hit(i):
            return i

        def miss(i):
            return i

        def down(n):
            if n > 1:
                return down(n - 1)
            for i in range(MISSES):
                miss(i)
            for i in range(HITS):
                hit(i)
            return 0

        print("ready", flush=True)
        if os.read(0, 64).strip() != b"go":
            os._exit(3)
        down(WORK_DEPTH)
        os._exit(0)
        "#
        .replace("{consts}", &format!("{MISSES}, {HITS}, {WORK_DEPTH}")),
    );
    let (run, _) = traced_from_go(&dir, &script, &["hit"]);
    let trace = run.trace();
    let c = |name| trace.counter(name);
    // down(100) .. down(1) at levels 1 .. 100, the calls at 101. When the
    // first miss enters, the window (44) drops level 57 and holds 58 .. 101;
    // its return leaves 58 .. 100, and every later call enters and leaves
    // at 101 the same way: the 10,000 misses are skipped, the 10 hits read.
    // Then down's returns at 100 .. 58 (43, unmatched, known) are skipped
    // and those at 57 .. 1 find nothing known: read.
    let down_known = WINDOW - 1;
    let down_read = WORK_DEPTH - down_known;
    eprintln!(
        "counters: entry_seen {} return_seen {} returns_skipped {}",
        c("entry_seen"),
        c("return_seen"),
        c("returns_skipped")
    );
    assert_eq!(c("entry_seen"), WORK_DEPTH + MISSES + HITS);
    // The module, open at the attachment, never returns (os._exit).
    assert_eq!(c("return_seen"), WORK_DEPTH + MISSES + HITS);
    assert_eq!(c("returns_skipped"), MISSES + down_known, "returns dropped unread");
    // What was read: the hits' returns and down's outer 57.
    assert_eq!(c("return_seen") - c("returns_skipped"), HITS + down_read);
    assert_eq!(c("entry_matched"), HITS);
    assert_eq!(c("return_matched"), HITS);
    assert_eq!(trace.named("hit").len() as u64, HITS);
    assert_eq!(trace.incomplete_calls(), 0);
    assert_eq!(trace.unmatched_returns_total(), 0);
    assert_eq!(c("thread_depths_full"), 0);
    assert_eq!(c("lost"), 0);
    assert_eq!(c("read_errors"), 0);
}

/// Untraced levels nested inside a traced call, this many: deeper than the
/// window, so the traced call's level falls out of it.
const NESTED: u64 = 60;

/// A traced call at level 1 runs NESTED untraced levels (and 3 traced calls
/// at the bottom), which unwind: the traced call's return, whose level fell
/// out of the window, is read and pairs with its entry; then calls at
/// level 1 again find the window empty and in step. Main's build skipped 14
/// of the nested returns (levels 2 .. 15) and the 100 later misses.
#[test]
fn a_traced_call_whose_level_fell_out_of_the_window_still_returns() {
    const HITS: u64 = 3;
    const LATER: u64 = 100;
    let dir = TestDir::new("retskip-window");
    let script = dir.script(
        "window.py",
        &r#"
        import os, sys

        HITS, LATER, NESTED = {consts}

        def hit(i):
            return i

        def miss(i):
            return i

        def nest(n):
            if n > 1:
                return nest(n - 1)
            for i in range(HITS):
                hit(i)
            return 0

        def traced():
            return nest(NESTED)

        print("ready", flush=True)
        if os.read(0, 64).strip() != b"go":
            os._exit(3)
        traced()
        for i in range(LATER):
            miss(i)
        os._exit(0)
        "#
        .replace("{consts}", &format!("{HITS}, {LATER}, {NESTED}")),
    );
    let (run, _) = traced_from_go(&dir, &script, &["traced", "hit"]);
    let trace = run.trace();
    let c = |name| trace.counter(name);
    // traced at level 1, nest(60) .. nest(1) at 2 .. 61: the window holds
    // 18 .. 61. The first hit (62) drops level 18 and is read; so are the
    // others (each enters and leaves at 62). nest's returns at 61 .. 19
    // (43) are skipped, those at 18 .. 2 (17) read, and traced's at 1 finds
    // nothing known: read, and paired. The later misses enter and leave at
    // level 1 of an empty window: skipped.
    let nest_known = WINDOW - 1;
    eprintln!(
        "counters: entry_seen {} return_seen {} returns_skipped {}",
        c("entry_seen"),
        c("return_seen"),
        c("returns_skipped")
    );
    assert_eq!(c("entry_seen"), 1 + NESTED + HITS + LATER);
    assert_eq!(c("return_seen"), 1 + NESTED + HITS + LATER);
    assert_eq!(c("returns_skipped"), nest_known + LATER, "returns dropped unread");
    assert_eq!(c("return_seen") - c("returns_skipped"), 1 + (NESTED - nest_known) + HITS);
    assert_eq!(c("entry_matched"), 1 + HITS);
    assert_eq!(c("return_matched"), 1 + HITS);
    assert_eq!(trace.named("traced").len(), 1, "the traced call, paired");
    assert_eq!(trace.named("hit").len() as u64, HITS);
    assert_eq!(trace.incomplete_calls(), 0);
    assert_eq!(trace.unmatched_returns_total(), 0);
    assert_eq!(c("lost"), 0);
    assert_eq!(c("read_errors"), 0);
}
