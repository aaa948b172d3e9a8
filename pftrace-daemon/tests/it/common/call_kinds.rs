//! The agent's call-kinds workload (pftrace-agent-host/tests/scripts/call_kinds.py:
//! threads, recursion, exceptions, generators, a coroutine, a name in two
//! files) with CPython's own recorder beside it, as pftraced's agent tests
//! run it, and what the recorder printed.

use std::collections::BTreeMap;

use super::TestDir;

/// The names that trace exactly the recorder's functions.
pub const CALL_KINDS_NAMES: &[&str] =
    &["work", "rec", "boom", "catcher", "coro", "gen_*", "call_kinds.py:qualified"];

/// The workload, the agent's exactness workload's calls (every kind the
/// agent must pair as CPython's profiler does) run as a script, with
/// CPython's recorder beside them; prints the recorder's entries as `REC
/// tid name` lines. With an argument (a file), it first waits for the file
/// to exist, running Python meanwhile (so PEP 768 can reach it).
pub fn call_kinds_workload(dir: &TestDir) -> std::path::PathBuf {
    dir.script(
        "other_module.py",
        include_str!("../../../../pftrace-agent-host/tests/scripts/other_module.py"),
    );
    dir.script("call_kinds.py", include_str!("../../../../pftrace-agent-host/tests/scripts/call_kinds.py"))
}

/// (tid, name) → calls, from the recorder's lines.
pub fn recorded(stdout: &str) -> BTreeMap<(u32, String), usize> {
    let mut out = BTreeMap::new();
    for line in stdout.lines().filter_map(|l| l.strip_prefix("REC ")) {
        let (tid, name) = line.split_once(' ').unwrap();
        *out.entry((tid.parse().unwrap(), name.to_string())).or_default() += 1;
    }
    out
}

/// The recorder's own figures, so a broken recorder cannot pass.
pub fn check_recorder(label: &str, want: &BTreeMap<(u32, String), usize>) {
    let total = |name: &str| want.iter().filter(|((_, n), _)| n == name).map(|(_, c)| c).sum::<usize>();
    assert_eq!(total("work"), 200 + 4 * 300, "{label}: recorder");
    assert_eq!(total("rec"), 51, "{label}: recorder");
    assert_eq!(total("catcher"), 30 + 4 * 300, "{label}: recorder");
    assert_eq!(total("qualified"), 1, "{label}: only call_kinds.py's `qualified`");
    assert_eq!(total("coro"), 6, "{label}: the coroutine's start and 5 resumes");
    let threads: std::collections::BTreeSet<u32> = want.keys().map(|(t, _)| *t).collect();
    assert_eq!(threads.len(), 5, "{label}: main and 4 workers");
}
