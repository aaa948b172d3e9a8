//! Issue 14 end to end: pftraced traces every call (`-t '*'`) of a workload
//! running under a `sys.setprofile` recorder in the same process (the
//! recorder of pftrace-code's tests), and what pftraced writes about each
//! function is compared with what CPython said: in `records` metadata every
//! field (module, qualname, path, args, locals, lineno; stacksize null with
//! its reason), in `pfw` the name (qualified) and category (module) of
//! every event, in the end summary one row per qualified function. The
//! workload covers json, a package in a venv's site-packages, nested
//! classes, closures, same-named methods of two classes in one file,
//! lambdas, comprehensions, decorators, generators and the `__main__` script.
//! LLNL Hatchet (`GraphFrame.from_perfflowaspect`) reads the pfw file.

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use crate::common::*;
use serde_json::Value;

const RECORDER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../pftrace-code/tests/python/recorder.py");

/// The workload pftrace-code's tests/workloads.rs runs (its
/// tests/python/workload/): app.py with helpers.py beside it, mod.py in a
/// venv's site-packages.
const WORKLOAD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../pftrace-code/tests/python/workload/");

fn workload(name: &str) -> String {
    fs::read_to_string(Path::new(WORKLOAD).join(name)).expect("pftrace-code's tests/python/workload")
}

/// The workload's files: `proj/app.py` (and helpers, the recorder) and a
/// venv whose site-packages holds `mypkg.sub.mod`. Returns (venv python, app.py).
fn layout(dir: &TestDir, python: &Path, version: &str) -> (PathBuf, PathBuf) {
    let proj = dir.join("proj");
    fs::create_dir_all(&proj).unwrap();
    fs::write(proj.join("app.py"), workload("app.py")).unwrap();
    fs::write(proj.join("helpers.py"), workload("helpers.py")).unwrap();
    fs::copy(RECORDER, proj.join("_recorder.py")).expect("pftrace-code's recorder.py");
    let venv = dir.join("venv");
    let out = Command::new(python).args(["-m", "venv", "--without-pip"]).arg(&venv).output().unwrap();
    assert!(out.status.success(), "python -m venv: {}", String::from_utf8_lossy(&out.stderr));
    let pkg = venv.join(format!("lib/python{version}/site-packages/mypkg/sub"));
    fs::create_dir_all(&pkg).unwrap();
    fs::write(pkg.parent().unwrap().join("__init__.py"), "").unwrap();
    fs::write(pkg.join("__init__.py"), "").unwrap();
    fs::write(pkg.join("mod.py"), workload("mod.py")).unwrap();
    // Files older than the process (the resolver refuses files modified after it started).
    std::thread::sleep(std::time::Duration::from_millis(20));
    (venv.join("bin/python"), proj.join("app.py"))
}

/// The recorder's records, by (co_filename, co_name, co_firstlineno).
fn recorded(path: &Path) -> HashMap<(String, String, i64), Value> {
    fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("the recorder's output {}: {e}", path.display()))
        .lines()
        .map(|l| {
            let r: Value = serde_json::from_str(l).unwrap();
            let key = (
                r["filename"].as_str().unwrap().to_string(),
                r["name"].as_str().unwrap().to_string(),
                r["firstlineno"].as_i64().unwrap(),
            );
            (key, r)
        })
        .collect()
}

/// `co_varnames` split as the prototype does: (args, locals).
fn split_varnames(r: &Value) -> (Vec<String>, Vec<String>) {
    let varnames: Vec<String> = serde_json::from_value(r["varnames"].clone()).unwrap();
    let flags = r["flags"].as_u64().unwrap();
    let n = (r["argcount"].as_u64().unwrap() + r["kwonlyargcount"].as_u64().unwrap()) as usize
        + usize::from(flags & 4 != 0)
        + usize::from(flags & 8 != 0);
    (varnames[..n].to_vec(), varnames[n..].to_vec())
}

/// Runs the workload under pftraced with `format`; returns the run and the recorder's records.
fn traced(
    dir: &TestDir,
    python: &Path,
    version: &str,
    extra: &[&str],
) -> (TracedRun, HashMap<(String, String, i64), Value>) {
    let (venv_python, app) = layout(dir, python, version);
    let record = dir.join("record.jsonl");
    let run = Pftraced::new(dir, &["*"])
        .args(extra)
        .arg("--sample-interval")
        .arg("0")
        .env("PFTRACE_RECORD", &record)
        // Alive 1 s after its calls (its stdin is empty), so pftraced's
        // resolver reads the process before it exits.
        .env("PFTRACE_RECORD_LINGER", "1")
        .launch(&[venv_python.as_os_str(), app.as_os_str()])
        .run();
    run.assert_code(0);
    let records = recorded(&record);
    (run, records)
}

/// Every metadata record of a `records` trace against the recorder: exact
/// where known; never null for the workload's own code or json's. Returns
/// the metadata by qualified path.
fn check_records(
    dir: &TestDir,
    run: &TracedRun,
    records: &HashMap<(String, String, i64), Value>,
) -> BTreeMap<String, Value> {
    let json: Value = serde_json::from_str(&fs::read_to_string(&run.output).unwrap()).unwrap();
    let ours = |file: &str| file.starts_with(dir.path().to_str().unwrap()) && !file.ends_with("_recorder.py");
    let mut by_path = BTreeMap::new();
    let (mut compared, mut nulls) = (0, Vec::new());
    for (key, m) in json["metadata"].as_object().unwrap() {
        let (file, function) = (m["filename"].as_str().unwrap(), m["function"].as_str().unwrap());
        if file.ends_with("_recorder.py") || function == "<module>" {
            continue;
        }
        let must = ours(file) || file.contains("/json/");
        let Some(lineno) = m["lineno"].as_i64() else {
            assert!(!must, "{key}: lineno null for the workload's own code: {m}");
            assert!(m["unresolved"]["lineno"].is_string(), "{key}: null without a reason: {m}");
            nulls.push(key.clone());
            continue;
        };
        // The recorder saw what was called after start(): what ran before
        // (site, encodings, json's module and class bodies: the recorder
        // imports json) is not compared.
        let Some(r) = records.get(&(file.to_string(), function.to_string(), lineno)) else {
            assert!(!ours(file), "{key}: pftraced names a function CPython did not call: {m}");
            continue;
        };
        let (args, locals) = split_varnames(r);
        assert_eq!(m["module"], r["module"], "{key}: module");
        if r["qualname"].is_string() {
            assert_eq!(m["qualname"], r["qualname"], "{key}: qualname");
            let path = format!("{}.{}", r["module"].as_str().unwrap(), r["qualname"].as_str().unwrap());
            assert_eq!(m["path"].as_str(), Some(path.as_str()), "{key}: path");
            by_path.insert(path, m.clone());
        }
        assert_eq!(m["args"], serde_json::json!(args), "{key}: args");
        assert_eq!(m["locals"], serde_json::json!(locals), "{key}: locals");
        assert!(m["stacksize"].is_null() && m["unresolved"]["stacksize"].is_string(), "{key}: stacksize {m}");
        compared += 1;
    }
    eprintln!("{compared} functions compared with CPython's own answers; unresolved: {nulls:?}");
    assert!(compared >= 20, "only {compared} functions compared");
    by_path
}

fn qualified_functions_of_the_workload(by_path: &BTreeMap<String, Value>, comprehensions: bool) {
    let raw = &by_path["json.decoder.JSONDecoder.raw_decode"];
    assert_eq!(raw["module"], "json.decoder");
    assert_eq!(raw["args"], serde_json::json!(["self", "s", "idx"]));
    let mut want = vec![
        "__main__.Outer.Inner.run",
        "__main__.Outer.run",
        "__main__.A.run",
        "__main__.B.run",
        "__main__.make_adder.<locals>.add",
        "__main__.decorated",
        "__main__.<lambda>",
        "__main__.gen",
        "__main__.B.run.<locals>.<genexpr>",
        "helpers.helper.<locals>.Local.m",
        "mypkg.sub.mod.Worker.work.<locals>.inner",
        "mypkg.sub.mod.top_level",
        "json.decoder.JSONDecoder.decode",
        "json.loads",
    ];
    if comprehensions {
        want.extend(["__main__.B.run.<locals>.<listcomp>", "__main__.B.run.<locals>.<dictcomp>"]);
    }
    for path in want {
        assert!(by_path.contains_key(path), "{path} missing; have {:?}", by_path.keys().collect::<Vec<_>>());
    }
    let b = &by_path["__main__.B.run"];
    assert_eq!(b["args"], serde_json::json!(["self", "a", "b", "c"]));
    assert_eq!(b["params"]["posonly"], 2);
    assert_eq!(by_path["mypkg.sub.mod.top_level"]["args"], serde_json::json!(["key", "extra"]));
}

/// The records (prototype) format on CPython 3.9 built --with-dtrace.
#[test]
fn records_metadata_is_what_cpython_says() {
    let dir = TestDir::new("qn-records");
    let (run, records) = traced(&dir, &python(), "3.9", &["--format", "records"]);
    let by_path = check_records(&dir, &run, &records);
    qualified_functions_of_the_workload(&by_path, true);
    // Keys: `run` names four functions of app.py, so each is keyed by its path.
    let json: Value = serde_json::from_str(&fs::read_to_string(&run.output).unwrap()).unwrap();
    for path in ["__main__.A.run", "__main__.B.run", "__main__.Outer.run", "__main__.Outer.Inner.run"] {
        assert_eq!(json["results"][path].as_array().map(Vec::len), Some(1), "{path}");
        assert_eq!(json["metadata"][path]["path"], path);
    }
    // The end summary: one row per qualified function (A.run and B.run apart).
    for path in ["__main__.A.run", "__main__.B.run", "__main__.gen", "json.decoder.JSONDecoder.raw_decode"] {
        let rows = run.stderr.lines().filter(|l| l.split_whitespace().next() == Some(path)).count();
        assert_eq!(rows, 1, "summary rows for {path}:\n{}", run.stderr);
    }
    // gen: one call and two resumes (3.9's entry probe fires at each), one row.
    let gen_row = run.stderr.lines().find(|l| l.starts_with("__main__.gen ")).unwrap();
    assert_eq!(gen_row.split_whitespace().nth(1), Some("3"), "{gen_row}");
}

/// Debian's CPython 3.15 (function probes restored): the same metadata.
#[test]
fn records_metadata_on_cpython_3_15() {
    let dir = TestDir::new("qn-records-315");
    let (run, records) = traced(&dir, &sid_python("3.15"), "3.15", &["--format", "records"]);
    let by_path = check_records(&dir, &run, &records);
    // 3.12+ inline list and dict comprehensions: no code objects of their own.
    qualified_functions_of_the_workload(&by_path, false);
}

/// PerfFlowAspect's files: name = qualified name, cat = module, for every
/// event of the workload's functions; Hatchet reads them and shows those names.
#[test]
fn pfw_names_are_qualified_and_hatchet_reads_them() {
    let dir = TestDir::new("qn-pfw");
    let (run, records) = traced(
        &dir,
        &python(),
        "3.9",
        &["--format", "pfw", "--pfw-options", "log-event=Compact:cpu-mem-usage=False"],
    );
    let files: Vec<PathBuf> = fs::read_dir(&run.output).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let text = fs::read_to_string(&files[0]).unwrap();
    let events: Vec<Value> = text
        .lines()
        .skip(1)
        .map(|l| serde_json::from_str(l.trim_end_matches(',')).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    // What CPython says each function of the workload is: (qualname, module).
    let truth: Vec<(String, String)> = records
        .iter()
        .filter(|((file, name, _), r)| {
            file.starts_with(dir.path().to_str().unwrap()) && name != "<module>" && r["qualname"].is_string()
        })
        .map(|(_, r)| {
            (r["qualname"].as_str().unwrap().to_string(), r["module"].as_str().unwrap().to_string())
        })
        .collect();
    let mut seen = BTreeMap::new();
    for e in &events {
        let (name, cat) = (e["name"].as_str().unwrap(), e["cat"].as_str().unwrap());
        *seen.entry((name.to_string(), cat.to_string())).or_insert(0) += 1;
    }
    for (q, m) in &truth {
        assert!(seen.contains_key(&(q.clone(), m.clone())), "no event named {q} in {m}: {seen:?}");
    }
    let runs: Vec<_> = seen.iter().filter(|((n, c), _)| n.ends_with(".run") && c == "__main__").collect();
    assert_eq!(runs.len(), 4, "four run methods, four names: {runs:?}");
    assert_eq!(seen[&("JSONDecoder.raw_decode".to_string(), "json.decoder".to_string())], 1);

    // LLNL Hatchet reads the file and shows the qualified names.
    let hatchet = hatchet_python();
    let out = Command::new(&hatchet)
        .arg("-c")
        .arg(
            "import sys, hatchet\n\
             gf = hatchet.GraphFrame.from_perfflowaspect(sys.argv[1])\n\
             print('\\n'.join(sorted(set(gf.dataframe['name']))))\n",
        )
        .arg(&files[0])
        .output()
        .expect("running Hatchet's python");
    assert!(out.status.success(), "Hatchet failed: {}", String::from_utf8_lossy(&out.stderr));
    let names: Vec<String> = String::from_utf8(out.stdout).unwrap().lines().map(str::to_string).collect();
    for q in [
        "Outer.Inner.run",
        "Outer.run",
        "A.run",
        "B.run",
        "JSONDecoder.raw_decode",
        "make_adder.<locals>.add",
    ] {
        assert!(names.iter().any(|n| n == q), "Hatchet does not show {q}: {names:?}");
    }
}

/// The Python with LLNL Hatchet that `cargo xtask setup` installs:
/// `$PFTRACE_HATCHET_PYTHON`, else its default path; fails when missing.
fn hatchet_python() -> PathBuf {
    let p = std::env::var_os("PFTRACE_HATCHET_PYTHON")
        .filter(|p| !p.is_empty())
        .map_or_else(|| PathBuf::from("/var/cache/pftrace/hatchet/bin/python"), PathBuf::from);
    assert!(
        p.is_file(),
        "prerequisite missing: a Python with llnl-hatchet at {}: run `cargo xtask setup` (as root), or set \
         PFTRACE_HATCHET_PYTHON",
        p.display()
    );
    p
}

/// While tracing: `pftracectl stats` has one row per qualified function
/// (A.run and B.run of one file apart), `--by name` one row per name and
/// file with the same totals, `status` lists the functions by qualified name.
#[test]
fn stats_and_status_name_functions_by_qualified_name() {
    let dir = TestDir::new("qn-stats");
    let (ready, go) = (dir.join("ready"), dir.join("go"));
    let main = dir.script(
        "two.py",
        &format!(
            r#"
            import os, time

            class A:
                def run(self):
                    pass

            class B:
                def run(self):
                    pass

            for _ in range(3):
                A().run()
            for _ in range(5):
                B().run()
            open({ready:?}, "w").close()
            deadline = time.time() + 30
            while not os.path.exists({go:?}) and time.time() < deadline:
                time.sleep(0.02)
            "#,
            ready = ready.to_str().unwrap(),
            go = go.to_str().unwrap(),
        ),
    );
    let socket = dir.join("pftraced.sock");
    let tracer = Pftraced::new(&dir, &["run"])
        .arg("--socket")
        .arg(&socket)
        .launch(&[python().as_os_str(), main.as_os_str()])
        .spawn();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !ready.exists() {
        assert!(std::time::Instant::now() < deadline, "the script did not get ready");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // The resolver answers within ms of the first entries; the script waits.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let stats: Value = serde_json::from_slice(&ctl_checked(&socket, &["stats", "--json"]).stdout).unwrap();
    let rows: Vec<(String, u64)> = stats["functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["path"].as_str().unwrap_or("?").to_string(), r["calls"].as_u64().unwrap()))
        .collect();
    assert_eq!(rows.len(), 2, "{stats}");
    let mut rows = rows;
    rows.sort();
    assert_eq!(rows, [("__main__.A.run".to_string(), 3), ("__main__.B.run".to_string(), 5)]);
    let table = text(&ctl_checked(&socket, &["stats"]).stdout);
    assert!(table.lines().any(|l| l.starts_with("__main__.A.run ")), "{table}");
    assert!(table.lines().any(|l| l.starts_with("__main__.B.run ")), "{table}");
    let by_name: Value =
        serde_json::from_slice(&ctl_checked(&socket, &["stats", "--by", "name", "--json"]).stdout).unwrap();
    let rows = by_name["functions"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{by_name}");
    assert_eq!((rows[0]["function"].as_str(), rows[0]["calls"].as_u64()), (Some("run"), Some(8)));
    assert!(rows[0].get("path").is_none() && rows[0].get("line").is_none(), "{by_name}");
    let status = text(&ctl_checked(&socket, &["status"]).stdout);
    assert!(status.contains("functions: 2 called, 2 resolved"), "{status}");
    assert!(status.contains("           5  __main__.B.run  ("), "{status}");
    assert!(status.contains("           3  __main__.A.run  ("), "{status}");
    fs::write(&go, "").unwrap();
    let run = tracer.finish();
    run.assert_code(0);
    // The trace file (chrome) names both, by qualified name.
    let trace = run.trace();
    let mut names: Vec<(String, String)> =
        trace.calls.iter().map(|c| (c.qualname.clone(), c.cat.clone())).collect();
    names.sort();
    names.dedup();
    assert_eq!(names, [("A.run".into(), "__main__".into()), ("B.run".into(), "__main__".into())]);
}
