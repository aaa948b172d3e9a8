//! Issue 14, the rest: selecting by qualified name (`A.run`,
//! `MODULE:QUALNAME`, `json.decoder:*`), per-call depth and parent, and
//! names for a process that exits right after its calls. Ground truth: a
//! `sys.setprofile` recorder in the traced process itself (`_rec.py`
//! below), which counts each code object's calls by the module its frame
//! runs in (`__name__`) and its qualified name (`co_qualname` on 3.11+, the
//! function's `__qualname__` on 3.9), and keeps each thread's tree of calls
//! of the traced names.

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::common::*;
use serde_json::Value;

/// The recorder. `start()` installs it on this thread and on threads
/// started later; `phase(n)` tags later calls; `finish()` writes
/// `$PFTRACE_REC`: one JSON object with `counts` ([phase, module,
/// qualname, co_name, count] per code object and phase) and `trees` (per
/// native thread id, the nested calls of code objects named in
/// `$PFTRACE_TREE_NAMES` and defined in the main script).
const RECORDER: &str = r#"
import gc, os, sys, threading, types

_counts = {}
_phase = [0]
_tree_names = set(filter(None, os.environ.get("PFTRACE_TREE_NAMES", "").split(",")))
_script = os.path.abspath(sys.argv[0])
_stacks = {}
_trees = {}
_lock = threading.Lock()


def _qualname(code):
    q = getattr(code, "co_qualname", None)
    if q is not None:
        return q
    for r in gc.get_referrers(code):
        if isinstance(r, types.FunctionType) and r.__code__ is code:
            return r.__qualname__
    return code.co_name


def _profile(frame, event, arg):
    code = frame.f_code
    if code.co_filename == __file__:
        return
    if event == "call":
        key = (_phase[0], code)
        n = _counts.get(key)
        if n is None:
            _counts[key] = [frame.f_globals.get("__name__"), _qualname(code), 1]
        else:
            n[2] += 1
    if code.co_name in _tree_names and code.co_filename == _script:
        tid = threading.get_native_id()
        stack = _stacks.setdefault(tid, [])
        if event == "call":
            node = [code.co_name, len(stack), []]
            if stack:
                stack[-1][2].append(node)
            else:
                with _lock:
                    _trees.setdefault(tid, []).append(node)
            stack.append(node)
        elif event == "return" and stack:
            stack.pop()


def start():
    threading.setprofile(_profile)
    sys.setprofile(_profile)


def phase(n):
    _phase[0] = n


def finish():
    sys.setprofile(None)
    threading.setprofile(None)
    import json
    counts = [[p, m, q, c.co_name, n] for (p, c), (m, q, n) in _counts.items()]
    with open(os.environ["PFTRACE_REC"], "w") as f:
        json.dump({"counts": counts, "trees": {str(k): v for k, v in _trees.items()}}, f)
"#;

/// What the recorder wrote.
struct Recorded {
    /// (phase, module, qualname, co_name) → calls.
    counts: HashMap<(u64, String, String, String), u64>,
    /// Native thread id → root calls: (co_name, depth, children).
    trees: BTreeMap<u32, Value>,
}

impl Recorded {
    fn read(path: &Path) -> Self {
        let v: Value = serde_json::from_str(
            &fs::read_to_string(path)
                .unwrap_or_else(|e| panic!("the recorder's output {}: {e}", path.display())),
        )
        .unwrap();
        let counts = v["counts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let s = |i: usize| r[i].as_str().unwrap_or("?").to_string();
                ((r[0].as_u64().unwrap(), s(1), s(2), s(3)), r[4].as_u64().unwrap())
            })
            .fold(HashMap::new(), |mut m, (k, n)| {
                *m.entry(k).or_insert(0) += n;
                m
            });
        let trees =
            v["trees"].as_object().unwrap().iter().map(|(k, t)| (k.parse().unwrap(), t.clone())).collect();
        Self { counts, trees }
    }

    /// Calls of (module, qualname) in the given phases.
    fn calls(&self, module: &str, qualname: &str, phases: &[u64]) -> u64 {
        self.counts
            .iter()
            .filter(|((p, m, q, _), _)| phases.contains(p) && m == module && q == qualname)
            .map(|(_, n)| n)
            .sum()
    }
}

/// The script `name` with the recorder beside it; returns its path and the recorder's output path.
fn script_with_recorder(dir: &TestDir, name: &str, body: &str) -> (PathBuf, PathBuf) {
    fs::write(dir.join("_rec.py"), RECORDER).unwrap();
    let script = dir.script(name, body);
    // Files older than the process (the resolver refuses files modified after it started).
    std::thread::sleep(Duration::from_millis(20));
    (script, dir.join("rec.json"))
}

/// Two classes with a method `run` each (one nested), a module-level
/// `run`, and json: each called a different number of times.
const SELECTION: &str = r#"
import _rec
_rec.start()
import json


class A:
    def run(self, n):
        return n + 1


class B:
    def run(self, n):
        return json.loads('{"a": %d}' % n)["a"]

    class Inner:
        def run(self):
            return 0


def run():
    return 1


for i in range(3):
    A().run(i)
for i in range(5):
    B().run(i)
for i in range(2):
    B.Inner().run()
run()
_rec.finish()
"#;

/// Calls in a chrome trace by (module, qualified name).
fn by_qualname(trace: &Trace) -> BTreeMap<(String, String), u64> {
    let mut m = BTreeMap::new();
    for c in &trace.calls {
        assert!(!c.incomplete, "{c:?}");
        *m.entry((c.cat.clone(), c.qualname.clone())).or_insert(0) += 1;
    }
    m
}

/// `-t A.run -t __main__:B.Inner.run -t 'json.decoder:*'`: every call of
/// those, as the recorder counted them, and nothing else.
fn qualified_forms_select_exactly(python: &Path, tag: &str) {
    let dir = TestDir::new(tag);
    let (script, rec) = script_with_recorder(&dir, "sel.py", SELECTION);
    let run = Pftraced::new(&dir, &["A.run", "__main__:B.Inner.run", "json.decoder:*"])
        .arg("--sample-interval")
        .arg("0")
        .env("PFTRACE_REC", &rec)
        .launch(&[python.as_os_str(), script.as_os_str()])
        .run();
    run.assert_code(0);
    let recorded = Recorded::read(&rec);
    let trace = run.trace();
    let got = by_qualname(&trace);
    let mut want = BTreeMap::new();
    want.insert(("__main__".to_string(), "A.run".to_string()), recorded.calls("__main__", "A.run", &[0]));
    want.insert(
        ("__main__".to_string(), "B.Inner.run".to_string()),
        recorded.calls("__main__", "B.Inner.run", &[0]),
    );
    for ((_, m, q, _), n) in &recorded.counts {
        if m == "json.decoder" {
            *want.entry((m.clone(), q.clone())).or_insert(0) += n;
        }
    }
    assert_eq!(want[&("__main__".to_string(), "A.run".to_string())], 3);
    assert_eq!(want[&("json.decoder".to_string(), "JSONDecoder.raw_decode".to_string())], 5);
    assert_eq!(got, want, "pftraced's calls by (module, qualname) vs the recorder's");
    let p = trace.pftrace();
    if p["processes"][0]["mechanism"] == "agent" {
        // The agent decided in the process (co_qualname, the frame's __name__).
        assert_eq!(p["counters"]["agent_reports"].as_u64(), Some(2 * trace.calls.len() as u64), "{p}");
        return;
    }
    // `json.decoder:*` sends every call to user space: all but those are dropped there.
    let total = trace.counter("entry_matched") + trace.counter("return_matched");
    assert_eq!(p["filtered_in_user_space"].as_u64(), Some(total - 2 * trace.calls.len() as u64), "{p}");
    assert_eq!(p["filtered_by_qualified_name"], p["filtered_in_user_space"], "{p}");
}

#[test]
fn qualified_forms_select_exactly_on_3_9() {
    qualified_forms_select_exactly(&python(), "qs-sel-39");
}

#[test]
fn qualified_forms_select_exactly_on_3_15() {
    qualified_forms_select_exactly(&sid_python("3.15"), "qs-sel-315");
}

/// 3.14 has no function probes: the agent decides in the process.
#[test]
fn qualified_forms_select_exactly_by_the_agent_on_3_14() {
    qualified_forms_select_exactly(&sid_python("3.14"), "qs-sel-314");
}

/// `-t A.run`: the kernel passes every `run`; user space keeps A's and
/// drops the others' entries and returns, and counts exactly those.
#[test]
fn calls_dropped_by_qualified_name_are_counted() {
    let dir = TestDir::new("qs-drop");
    let (script, rec) = script_with_recorder(&dir, "sel.py", SELECTION);
    let run = Pftraced::new(&dir, &["A.run"])
        .arg("--sample-interval")
        .arg("0")
        .env("PFTRACE_REC", &rec)
        .launch(&[python().as_os_str(), script.as_os_str()])
        .run();
    run.assert_code(0);
    let recorded = Recorded::read(&rec);
    let trace = run.trace();
    let got = by_qualname(&trace);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        got[&("__main__".to_string(), "A.run".to_string())],
        recorded.calls("__main__", "A.run", &[0])
    );
    // Other code objects named `run`: 5 + 2 + 1 calls, an entry and a return each (3.9).
    let others: u64 = recorded
        .counts
        .iter()
        .filter(|((_, _, q, name), _)| name == "run" && q != "A.run")
        .map(|(_, n)| n)
        .sum();
    assert_eq!(others, 8);
    let p = trace.pftrace();
    assert_eq!(p["filtered_by_qualified_name"].as_u64(), Some(2 * others), "{p}");
    assert_eq!(p["filtered_in_user_space"].as_u64(), Some(2 * others), "{p}");
    assert_eq!(p["filtered_unresolved"].as_u64(), Some(0), "{p}");
}

/// Malformed qualified forms: pftraced refuses them with the reason;
/// `pftracectl add` gets the error and the daemon goes on serving.
#[test]
fn malformed_qualified_forms_are_refused_clearly() {
    let dir = TestDir::new("qs-bad");
    let script = dir.script("x.py", "pass\n");
    for (name, part) in [
        ("JSONDecoder.", "empty part between dots"),
        ("json..decoder:f", "empty part between dots"),
        ("my mod:f", "not allowed in a module name"),
        ("json.decoder:", "the function part is empty"),
    ] {
        let run = Pftraced::new(&dir, &[name]).launch(&[python().as_os_str(), script.as_os_str()]).run();
        run.assert_refused(&[part]);
    }
}

/// Adding and removing qualified names while a process runs: each phase's
/// calls are traced exactly when their name was.
#[test]
fn qualified_names_added_and_removed_while_running() {
    let dir = TestDir::new("qs-addrm");
    let marks: Vec<PathBuf> = ["ready1", "go1", "ready2", "go2"].iter().map(|m| dir.join(m)).collect();
    let (script, rec) = script_with_recorder(
        &dir,
        "phases.py",
        &format!(
            r#"
            import os, time
            import _rec
            _rec.start()

            class A:
                def run(self):
                    pass

            class B:
                def run(self):
                    pass

            def wait(path):
                deadline = time.time() + 30
                while not os.path.exists(path) and time.time() < deadline:
                    time.sleep(0.01)

            def phase(n, a, b, ready, go):
                _rec.phase(n)
                for _ in range(a):
                    A().run()
                for _ in range(b):
                    B().run()
                _rec.phase(0)
                if ready:
                    open(ready, "w").close()
                    wait(go)

            phase(1, 3, 4, {r1:?}, {g1:?})
            phase(2, 5, 6, {r2:?}, {g2:?})
            phase(3, 7, 8, None, None)
            _rec.finish()
            "#,
            r1 = marks[0].to_str().unwrap(),
            g1 = marks[1].to_str().unwrap(),
            r2 = marks[2].to_str().unwrap(),
            g2 = marks[3].to_str().unwrap(),
        ),
    );
    let socket = dir.join("pftraced.sock");
    let tracer = Pftraced::new(&dir, &["A.run"])
        .arg("--socket")
        .arg(&socket)
        .arg("--sample-interval")
        .arg("0")
        .env("PFTRACE_REC", &rec)
        .launch(&[python().as_os_str(), script.as_os_str()])
        .spawn();
    let wait = |p: &Path| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !p.exists() {
            assert!(Instant::now() < deadline, "the script did not reach {}", p.display());
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait(&marks[0]);
    ctl_checked(&socket, &["add", "-t", "__main__:B.run"]);
    // A malformed name: a clear error, nothing changed, the daemon serves on.
    let bad = ctl(&socket, &["add", "-t", "A..run"]);
    assert!(!bad.status.success(), "add -t A..run succeeded");
    assert!(text(&bad.stderr).contains("empty part between dots"), "{}", text(&bad.stderr));
    let status = text(&ctl_checked(&socket, &["status"]).stdout);
    assert!(status.contains("A.run") && status.contains("__main__:B.run"), "{status}");
    fs::write(&marks[1], "").unwrap();
    wait(&marks[2]);
    ctl_checked(&socket, &["remove", "-t", "A.run"]);
    fs::write(&marks[3], "").unwrap();
    let run = tracer.finish();
    run.assert_code(0);
    let recorded = Recorded::read(&rec);
    let got = by_qualname(&run.trace());
    let (a, b) = (recorded.calls("__main__", "A.run", &[1, 2]), recorded.calls("__main__", "B.run", &[2, 3]));
    assert_eq!((a, b), (3 + 5, 6 + 8));
    let mut want = BTreeMap::new();
    want.insert(("__main__".to_string(), "A.run".to_string()), a);
    want.insert(("__main__".to_string(), "B.run".to_string()), b);
    assert_eq!(got, want);
}

/// Threads, recursion, exceptions and generators: the traced names' calls.
const TREE: &str = r#"
import threading
import _rec
_rec.start()


def leaf(i):
    return i


def rec(n):
    if n == 0:
        return leaf(0)
    return rec(n - 1) + leaf(n)


def boom(n):
    if n:
        leaf(n)
        raise ValueError(n)
    return boom(n + 1)


def catch():
    try:
        boom(0)
    except ValueError:
        leaf(-1)
    return rec(2)


def gen(n):
    for i in range(n):
        yield leaf(i)


def work(k):
    total = sum(gen(3))
    for _ in range(k):
        catch()
    return total + rec(k)


threads = [threading.Thread(target=work, args=(k,)) for k in (1, 2)]
for t in threads:
    t.start()
for t in threads:
    t.join()
work(3)
_rec.finish()
"#;

const TREE_NAMES: &str = "leaf,rec,boom,catch,gen,work";

/// One call as a trace gives it.
struct Node {
    tid: u32,
    id: u64,
    parent: u64,
    depth: u64,
    name: String,
}

/// Per thread, the nested calls rebuilt from ids and parents only (children
/// in id order: ids are given in entry order), each as [name, depth,
/// children], the recorder's shape; checks depth = parent's depth + 1.
fn rebuild(nodes: &[Node]) -> BTreeMap<u32, Value> {
    let by_id: HashMap<u64, &Node> = nodes.iter().map(|n| (n.id, n)).collect();
    assert_eq!(by_id.len(), nodes.len(), "call ids are not unique");
    let mut children: HashMap<u64, Vec<&Node>> = HashMap::new();
    for n in nodes {
        if n.parent == 0 {
            assert_eq!(n.depth, 0, "a root call at depth {}", n.depth);
        } else {
            let p = by_id
                .get(&n.parent)
                .unwrap_or_else(|| panic!("call {} names no known parent {}", n.id, n.parent));
            assert_eq!((p.tid, p.depth + 1), (n.tid, n.depth), "call {} under {}", n.id, p.id);
        }
        children.entry(n.parent).or_default().push(n);
    }
    fn tree(n: &Node, children: &HashMap<u64, Vec<&Node>>) -> Value {
        let mut kids = children.get(&n.id).cloned().unwrap_or_default();
        kids.sort_by_key(|k| k.id);
        serde_json::json!([n.name, n.depth, kids.iter().map(|k| tree(k, children)).collect::<Vec<_>>()])
    }
    let mut roots = children.get(&0).cloned().unwrap_or_default();
    roots.sort_by_key(|r| r.id);
    let mut out: BTreeMap<u32, Vec<Value>> = BTreeMap::new();
    for r in roots {
        out.entry(r.tid).or_default().push(tree(r, &children));
    }
    out.into_iter().map(|(k, v)| (k, Value::Array(v))).collect()
}

/// Runs the tree workload with `format`; returns the recorder's trees and the output path.
fn traced_tree(dir: &TestDir, extra: &[&str]) -> (BTreeMap<u32, Value>, PathBuf) {
    let (script, rec) = script_with_recorder(dir, "tree.py", TREE);
    let names: Vec<&str> = TREE_NAMES.split(',').collect();
    let run = Pftraced::new(dir, &names)
        .args(extra)
        .arg("--sample-interval")
        .arg("0")
        .env("PFTRACE_REC", &rec)
        .env("PFTRACE_TREE_NAMES", TREE_NAMES)
        .launch(&[python().as_os_str(), script.as_os_str()])
        .run();
    run.assert_code(0);
    let recorded = Recorded::read(&rec);
    assert_eq!(recorded.trees.len(), 3, "three threads: {:?}", recorded.trees.keys());
    (recorded.trees, run.output.clone())
}

#[test]
fn call_tree_from_depth_and_parent_is_cpythons_chrome() {
    let dir = TestDir::new("qs-tree-chrome");
    let (want, output) = traced_tree(&dir, &[]);
    let trace = Trace::parse(&fs::read_to_string(&output).unwrap()).unwrap();
    let nodes: Vec<Node> = trace
        .calls
        .iter()
        .map(|c| Node { tid: c.tid, id: c.id, parent: c.parent, depth: c.depth, name: c.name.clone() })
        .collect();
    let calls: usize = nodes.len();
    assert!(calls > 60, "{calls} calls");
    assert_eq!(rebuild(&nodes), want);
}

#[test]
fn call_tree_from_depth_and_parent_is_cpythons_records() {
    let dir = TestDir::new("qs-tree-records");
    let (want, output) = traced_tree(&dir, &["--format", "records"]);
    let json: Value = serde_json::from_str(&fs::read_to_string(&output).unwrap()).unwrap();
    let mut nodes = Vec::new();
    for (key, calls) in json["results"].as_object().unwrap() {
        let name = json["metadata"][key]["function"].as_str().unwrap().to_string();
        for c in calls.as_array().unwrap() {
            let u = |k: &str| c[k].as_u64().unwrap_or_else(|| panic!("{k} missing: {c}"));
            nodes.push(Node {
                tid: u("tid") as u32,
                id: u("id"),
                parent: u("parent"),
                depth: u("depth"),
                name: name.clone(),
            });
        }
    }
    assert_eq!(rebuild(&nodes), want);
}

#[test]
fn call_tree_from_depth_and_parent_is_cpythons_pfw() {
    let dir = TestDir::new("qs-tree-pfw");
    let (want, output) =
        traced_tree(&dir, &["--format", "pfw", "--pfw-options", "log-event=Compact:cpu-mem-usage=False"]);
    let files: Vec<PathBuf> = fs::read_dir(&output).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let text = fs::read_to_string(&files[0]).unwrap();
    let nodes: Vec<Node> = text
        .lines()
        .skip(1)
        .map(|l| serde_json::from_str::<Value>(l.trim_end_matches(',')).unwrap())
        .map(|e| {
            let a = &e["args"];
            let u = |k: &str| a[k].as_u64().unwrap_or_else(|| panic!("args.{k} missing: {e}"));
            // pfw names calls by qualified name; these are module-level functions.
            Node {
                tid: e["tid"].as_u64().unwrap() as u32,
                id: u("id"),
                parent: u("parent"),
                depth: u("depth"),
                name: e["name"].as_str().unwrap().to_string(),
            }
        })
        .collect();
    assert_eq!(rebuild(&nodes), want);
}

/// A process that exits within 50 ms of its calls still gets qualified
/// names and dotted modules: it was opened when attached, so its root,
/// command line, environment and working directory outlive it.
#[test]
fn a_process_gone_within_50_ms_gets_qualified_names() {
    let dir = TestDir::new("qs-short");
    let pkg = dir.join("pkg");
    fs::create_dir_all(&pkg).unwrap();
    fs::write(pkg.join("__init__.py"), "").unwrap();
    fs::write(pkg.join("mod.py"), "class Worker:\n    def work(self):\n        return 1\n").unwrap();
    let lived = dir.join("lived");
    let script = dir.script(
        "short.py",
        &format!(
            r#"
            import os, time
            from pkg.mod import Worker


            class K:
                def m(self):
                    return Worker().work()


            t0 = time.monotonic()
            K().m()
            with open({lived:?}, "w") as f:
                f.write(str(time.monotonic() - t0))
            # No interpreter teardown: gone at once.
            os._exit(0)
            "#,
            lived = lived.to_str().unwrap()
        ),
    );
    std::thread::sleep(Duration::from_millis(20));
    let run = Pftraced::new(&dir, &["work", "m"])
        .arg("--sample-interval")
        .arg("0")
        .launch(&[python().as_os_str(), script.as_os_str()])
        .run();
    run.assert_code(0);
    let after_call: f64 = fs::read_to_string(&lived).unwrap().parse().unwrap();
    assert!(after_call < 0.05, "the script lived {after_call} s after its first call");
    let trace = run.trace();
    let mut got: Vec<(String, String, Option<String>)> =
        trace.calls.iter().map(|c| (c.cat.clone(), c.qualname.clone(), c.path.clone())).collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("__main__".to_string(), "K.m".to_string(), Some("__main__.K.m".to_string())),
            ("pkg.mod".to_string(), "Worker.work".to_string(), Some("pkg.mod.Worker.work".to_string())),
        ],
        "{}",
        run.stderr
    );
}
