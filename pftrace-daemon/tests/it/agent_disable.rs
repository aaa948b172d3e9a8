//! What makes the agent's untraced calls free (issue 12): its sys.monitoring
//! callback returns DISABLE at a code location of an untraced function, so
//! CPython never calls it there again. Counted, not timed (this VM's speed
//! swings hide a 5% difference): `pftrace_agent.callbacks()` gives the
//! agent's callback invocations per event, read before and after a section
//! the script runs; CPython's own recorder (a second sys.monitoring tool in
//! the same process, which never disables) gives every event of the section
//! and its distinct locations. The agent must have been called exactly once
//! per location of an untraced function, however often it ran (100,000
//! calls), and exactly once per event of a traced one. 3.12.1 and Debian
//! 3.15, launched under `pftraced --agent`. With the callback returning None
//! instead of DISABLE (tried once), it fails: 100,703 start callbacks in the
//! section on 3.12.1 against the 704 expected.

use serde_json::Value;

use crate::common::*;

/// Calls of the untraced function, of the traced one, and items of each generator.
const N: u64 = 100_000;
const M: u64 = 700;
const K: u64 = 50;

/// The section, the agent's counters around it and CPython's recorder.
/// Prints one JSON line: `{"before": "...", "after": "...", "recorder": {...}}`.
const SCRIPT: &str = r#"
import json, sys
import pftrace_agent

N, M, K = (int(a) for a in sys.argv[1:4])

def untraced(i):
    return i

def traced(i):
    return i

def untraced_gen(n):
    for i in range(n):
        yield i

def traced_gen(n):
    for i in range(n):
        yield i

def section(n, m, k):
    for i in range(n):
        untraced(i)
    for i in range(m):
        traced(i)
    for _ in untraced_gen(k):
        pass
    for _ in traced_gen(k):
        pass

mon = sys.monitoring
KINDS = ["PY_START", "PY_RESUME", "PY_THROW", "PY_RETURN", "PY_YIELD", "PY_UNWIND"]
TRACED = {"traced", "traced_gen"}
rec = {k: {"traced": 0, "untraced": 0, "locations": set()} for k in KINDS}

def recorder(kind):
    r = rec[kind]
    def cb(code, offset, *rest):
        if code.co_name in TRACED:
            r["traced"] += 1
        else:
            r["untraced"] += 1
            r["locations"].add((code.co_name, offset))
    return cb

tool = [i for i in range(6) if mon.get_tool(i) is None][0]
mon.use_tool_id(tool, "recorder")
bits = 0
for k in KINDS:
    mon.register_callback(tool, getattr(mon.events, k), recorder(k))
    bits |= getattr(mon.events, k)
mon.set_events(tool, bits)
before = pftrace_agent.callbacks()
section(N, M, K)
after = pftrace_agent.callbacks()
mon.set_events(tool, 0)
mon.free_tool_id(tool)
out = {k: {"traced": r["traced"], "untraced": r["untraced"], "locations": sorted(r["locations"])}
       for k, r in rec.items()}
print(json.dumps({"tool": tool, "before": before, "after": after, "recorder": out}))
"#;

/// `PY_START=n ...` → n per event name.
fn counts(text: &str) -> std::collections::BTreeMap<String, u64> {
    text.split_whitespace()
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or_else(|| panic!("bad callbacks() text {text:?}"));
            (k.to_string(), v.parse().unwrap_or_else(|_| panic!("bad count in {text:?}")))
        })
        .collect()
}

#[test]
fn an_untraced_location_calls_the_agent_once_a_traced_one_every_time() {
    require_root();
    for (label, py) in [("pyenv 3.12.1", pyenv_python("3.12.1")), ("debian 3.15", sid_python("3.15"))] {
        let dir = TestDir::new("agent-disable");
        let script = dir.script("disable.py", SCRIPT);
        let run = Pftraced::new(&dir, &["traced", "traced_gen"])
            .arg("--agent")
            .launch(&[
                py.as_os_str(),
                script.as_os_str(),
                N.to_string().as_ref(),
                M.to_string().as_ref(),
                K.to_string().as_ref(),
            ])
            .run();
        run.assert_code(0);
        assert!(run.stderr.contains("in-process agent), tracing "), "{label}: {}", run.stderr);
        let line = run
            .stdout
            .lines()
            .find(|l| l.starts_with('{'))
            .unwrap_or_else(|| panic!("{label}: {}", run.stdout));
        let out: Value = serde_json::from_str(line).unwrap();
        let (before, after) =
            (counts(out["before"].as_str().unwrap()), counts(out["after"].as_str().unwrap()));
        let rec = &out["recorder"];
        let field = |kind: &str, f: &str| rec[kind][f].as_u64().unwrap();
        let locations = |kind: &str| rec[kind]["locations"].as_array().unwrap().len() as u64;

        // CPython's recorder first: it saw every call, so a broken recorder cannot pass.
        // Untraced starts: section, untraced N times, untraced_gen once.
        assert_eq!(field("PY_START", "untraced"), N + 2, "{label}: recorder {rec}");
        assert_eq!(field("PY_START", "traced"), M + 1, "{label}: recorder {rec}");
        assert_eq!(field("PY_YIELD", "untraced"), K, "{label}: recorder {rec}");
        assert_eq!(field("PY_YIELD", "traced"), K, "{label}: recorder {rec}");
        // One start location each of section, untraced, untraced_gen.
        assert_eq!(locations("PY_START"), 3, "{label}: recorder {rec}");

        // The agent: once per location of an untraced function (CPython's
        // count of distinct locations), once per event of a traced one.
        for kind in ["PY_START", "PY_RESUME", "PY_THROW", "PY_RETURN", "PY_YIELD", "PY_UNWIND"] {
            let agent = after[kind] - before[kind];
            let want = locations(kind) + field(kind, "traced");
            assert_eq!(agent, want, "{label}: {kind} callbacks of the agent; recorder {rec}");
        }
        // The same from the script: section, untraced and untraced_gen once each.
        let delta = |kind: &str| after[kind] - before[kind];
        assert_eq!(delta("PY_START"), 3 + M + 1, "{label}");
        assert_eq!(delta("PY_RETURN"), 3 + M + 1, "{label}");
        assert_eq!(delta("PY_YIELD"), 1 + K, "{label}");
        assert_eq!(delta("PY_RESUME"), 1 + K, "{label}");
        assert_eq!(delta("PY_THROW") + delta("PY_UNWIND"), 0, "{label}");

        // And the trace has the traced calls, each resume of the generator a call.
        let trace = run.trace();
        trace.assert_clean();
        let calls = trace.counts();
        assert_eq!(calls.get("traced").copied(), Some(M as usize), "{label}: {calls:?}");
        assert_eq!(calls.get("traced_gen").copied(), Some(K as usize + 1), "{label}: {calls:?}");
        assert_eq!(calls.len(), 2, "{label}: {calls:?}");
        eprintln!(
            "{label}: untraced functions started {} times at {} locations, the agent's start callbacks for \
             them {}; agent callbacks in the section: {}",
            field("PY_START", "untraced"),
            locations("PY_START"),
            delta("PY_START") - M - 1,
            ["PY_START", "PY_RESUME", "PY_RETURN", "PY_YIELD"].map(|k| format!("{k}={}", delta(k))).join(" ")
        );
    }
}
