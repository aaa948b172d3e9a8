//! The agent's reported calls against CPython's own recorder in the same
//! process (sys.setprofile on 3.12+, sys.settrace on 3.11), thread by thread
//! and event by event: threads (one running before the agent started),
//! recursion, exceptions, generators with throw() and close(), coroutines,
//! and all three name forms. On every test interpreter.

mod common;

use common::{Host, Sequences, agent_sequences, finish, interpreters, scripts_dir, serial};

const NAMES: &[&str] = &["work", "rec", "boom", "catcher", "coro", "gen_*", "call_kinds.py:qualified"];

fn recorder_sequences(stdout: &str) -> Sequences {
    let mut out = Sequences::new();
    for line in stdout.lines().filter(|l| l.starts_with('[')) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let tid = v[0].as_u64().unwrap() as u32;
        out.entry(tid).or_default().push((v[1] == "entry", v[2].as_str().unwrap().to_string()));
    }
    out
}

/// Returns that close the innermost open entry of their thread (the agent
/// sends those without strings), replaying the recorder's sequences.
fn innermost_returns(seqs: &Sequences) -> usize {
    let mut n = 0;
    for seq in seqs.values() {
        let mut open: Vec<&str> = Vec::new();
        for (entry, name) in seq {
            if *entry {
                open.push(name);
            } else if open.last() == Some(&name.as_str()) {
                open.pop();
                n += 1;
            } else if let Some(at) = open.iter().rposition(|o| o == name) {
                open.truncate(at);
            }
        }
    }
    n
}

fn count(seqs: &Sequences, entry: bool, name: &str) -> usize {
    seqs.values().flatten().filter(|(e, n)| *e == entry && n == name).count()
}

#[test]
fn agent_reports_exactly_what_cpython_records() {
    let _g = serial();
    let mut host = Host::new("exact");
    let script = scripts_dir().join("exact_workload.py");
    let sock = host.installed.socket.to_string_lossy().into_owned();
    for (label, python) in interpreters() {
        let child = host.spawn(&python, &script, &[&sock]);
        let pid = child.id();
        let _conn = host.accept(pid, NAMES);
        let stdout = finish(child, label);
        assert!(stdout.contains("DONE"), "{label}: {stdout}");
        let expected = recorder_sequences(&stdout);
        let records = host.records(pid);
        let got = agent_sequences(&records);
        // The recorder's own figures first, so a broken recorder cannot pass.
        assert_eq!(count(&expected, true, "work"), 200 + 4 * 300 + 100, "{label}: recorder");
        assert_eq!(count(&expected, true, "rec"), 51, "{label}: recorder");
        assert_eq!(count(&expected, true, "qualified"), 1, "{label}: only call_kinds.py's `qualified`");
        assert_eq!(expected.len(), 6, "{label}: main, early and 4 workers");
        for (tid, seq) in &expected {
            assert_eq!(got.get(tid), Some(seq), "{label}: thread {tid} differs");
        }
        assert_eq!(got.len(), expected.len(), "{label}: threads with agent records");
        // Returns whose entry the thread reported innermost come without
        // strings (named through their entry by code id): as many as the
        // recorder's sequences pair that way.
        let nameless = records.iter().filter(|r| r.named_by_entry).count();
        assert_eq!(nameless, innermost_returns(&expected), "{label}: returns sent without strings");
        assert!(records.iter().all(|r| r.entry || r.named_by_entry || !r.name.is_empty()), "{label}");
        let total: usize = got.values().map(Vec::len).sum();
        eprintln!("{label}: {total} records, identical to CPython's recorder in {} threads", got.len());
    }
}
