//! Workloads run in real interpreters under a `sys.setprofile` recorder
//! (tests/python/recorder.py); while each process is alive, every code
//! object it recorded is resolved from outside (pid, co_filename, co_name,
//! and the line a probe reports) and compared with what CPython said:
//! exact where claimed, null only with a reason, and never null for the
//! workload's own code or json's.

mod common;

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Command, Stdio},
};

use pftrace_code::{CodeInfo, Field, Probe, PyVersion, Resolver};
use serde_json::Value;

/// The workload's files (tests/python/workload/, shared with
/// pftrace-daemon's tests/qualnames.rs): `app.py` (script), `helpers.py`
/// beside it, `mod.py` and `cli.py` (package `mypkg.sub` in a venv).
fn workload(name: &str) -> String {
    fs::read_to_string(common::helpers().join("workload").join(name)).expect("tests/python/workload")
}

struct Layout {
    proj: std::path::PathBuf,
    venv_python: std::path::PathBuf,
}

fn layout(dir: &Path, python: &Path, v: PyVersion) -> Layout {
    let proj = dir.join("proj");
    fs::create_dir_all(&proj).unwrap();
    fs::write(proj.join("app.py"), workload("app.py")).unwrap();
    fs::write(proj.join("helpers.py"), workload("helpers.py")).unwrap();
    fs::copy(common::helpers().join("recorder.py"), proj.join("_recorder.py")).unwrap();
    let venv = dir.join("venv");
    let out = Command::new(python)
        .args(["-m", "venv", "--without-pip"])
        .arg(&venv)
        .output()
        .expect("python -m venv");
    assert!(out.status.success(), "python -m venv: {}", String::from_utf8_lossy(&out.stderr));
    let site = venv.join(format!("lib/python{v}/site-packages"));
    let pkg = site.join("mypkg/sub");
    fs::create_dir_all(&pkg).unwrap();
    fs::write(site.join("mypkg/__init__.py"), "").unwrap();
    fs::write(pkg.join("__init__.py"), "").unwrap();
    fs::write(pkg.join("mod.py"), workload("mod.py")).unwrap();
    fs::write(pkg.join("cli.py"), workload("cli.py")).unwrap();
    // File times must precede the process start (see Resolver): keep the
    // files a little in the past.
    std::thread::sleep(std::time::Duration::from_millis(20));
    Layout { proj, venv_python: venv.join("bin/python") }
}

/// Runs `args` with the venv's python in `proj`, resolves every recorded
/// code object while it waits, and returns (record, resolved) pairs.
fn run(l: &Layout, v: PyVersion, args: &[&str], record: &Path) -> Vec<(Value, CodeInfo, Vec<CodeInfo>)> {
    let mut child = Command::new(&l.venv_python)
        .args(args)
        .current_dir(&l.proj)
        .env("PWD", &l.proj)
        .env("PFTRACE_RECORD", record)
        .env_remove("PYTHONPATH")
        .env_remove("PYTHONHOME")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "READY", "the workload did not reach finish()");
    let mut resolver = Resolver::new();
    let mut out = Vec::new();
    for rec in fs::read_to_string(record).unwrap().lines() {
        let r: Value = serde_json::from_str(rec).unwrap();
        let probe = |line: i64| Probe {
            pid: child.id(),
            filename: r["filename"].as_str().unwrap().to_string(),
            function: r["name"].as_str().unwrap().to_string(),
            line,
        };
        // The entry probe's line on 3.6-3.10 (and the agent's).
        let entry = (*resolver.resolve(&probe(r["firstlineno"].as_i64().unwrap()), None)).clone();
        let mut others = Vec::new();
        if let Some(ret) = r["return_line"].as_i64() {
            others.push((*resolver.resolve(&probe(ret), None)).clone());
        }
        others.push((*resolver.resolve(&probe(-1), Some(v))).clone());
        out.push((r, entry, others));
    }
    child.stdin.as_mut().unwrap().write_all(b"\n").unwrap();
    assert!(child.wait().unwrap().success());
    out
}

fn check<T: PartialEq + std::fmt::Debug>(
    what: &str,
    got: &Field<T>,
    want: &T,
    here: &str,
    nulls: &mut Vec<String>,
) {
    match got {
        Field::Known(g) => assert_eq!(g, want, "{here}: {what}"),
        Field::Unknown(why) => {
            assert!(!why.is_empty(), "{here}: {what} null without a reason");
            nulls.push(format!("{here}: {what}: {why}"));
        }
    }
}

fn compare(label: &str, results: &[(Value, CodeInfo, Vec<CodeInfo>)], dir: &Path) -> usize {
    let no_truth = &mut 0;
    let mut nulls = Vec::new();
    let mut full = 0;
    for (r, info, others) in results {
        let file = r["filename"].as_str().unwrap();
        let here = format!("{label}: {file}: {}", r["name"]);
        let varnames: Vec<String> = serde_json::from_value(r["varnames"].clone()).unwrap();
        let flags = r["flags"].as_u64().unwrap();
        let n = (r["argcount"].as_u64().unwrap() + r["kwonlyargcount"].as_u64().unwrap()) as usize
            + usize::from(flags & 4 != 0)
            + usize::from(flags & 8 != 0);
        let mut local_nulls = Vec::new();
        check("module", &info.module, &r["module"].as_str().unwrap().to_string(), &here, &mut local_nulls);
        // 3.9: no ground truth for a function whose __qualname__
        // functools.wraps replaced (the recorder says null).
        match r["qualname"].as_str() {
            Some(qual) => {
                check("qualname", &info.qualname, &qual.to_string(), &here, &mut local_nulls);
                check(
                    "path",
                    &info.path(),
                    &format!("{}.{qual}", r["module"].as_str().unwrap()),
                    &here,
                    &mut local_nulls,
                );
            }
            None => {
                assert!(
                    r.get("argcount").is_some() && r["name"] == "wrapper",
                    "{here}: the recorder found no qualname"
                );
                *no_truth += 1;
            }
        }
        check("args", &info.args(), &varnames[..n].to_vec(), &here, &mut local_nulls);
        check("locals", &info.locals, &varnames[n..].to_vec(), &here, &mut local_nulls);
        check("lineno", &info.lineno, &(r["firstlineno"].as_u64().unwrap() as u32), &here, &mut local_nulls);
        if let Some(p) = info.params.known() {
            assert_eq!(
                (p.positional as u64, p.posonly as u64, p.kwonly as u64, p.varargs, p.varkw),
                (
                    r["argcount"].as_u64().unwrap(),
                    r["posonlyargcount"].as_u64().unwrap(),
                    r["kwonlyargcount"].as_u64().unwrap(),
                    flags & 4 != 0,
                    flags & 8 != 0
                ),
                "{here}: parameter kinds"
            );
        }
        assert_eq!(info.stacksize.reason(), Some(pftrace_code::resolver::STACKSIZE_WHY), "{here}: stacksize");
        // A return probe's line and 3.15's -1 resolve to the same object
        // (or, for -1 with several of that name, to null with the reason).
        for o in others {
            for (a, b) in [(&o.qualname, &info.qualname)] {
                if let (Field::Known(x), Field::Known(y)) = (a, b) {
                    assert_eq!(x, y, "{here}: another probe line resolved elsewhere");
                }
            }
            if info.qualname.known().is_none() {
                assert_eq!(o.qualname, info.qualname, "{here}: another probe line");
            } else if o.qualname.known().is_some() {
                assert_eq!(o.locals, info.locals, "{here}: another probe line");
                assert_eq!(o.params, info.params, "{here}: another probe line");
            } else {
                assert!(
                    o.qualname.reason().is_some_and(|r| r.contains("no line") || r.contains("span")),
                    "{here}: {o:?}"
                );
            }
        }
        let ours = file.starts_with(&*dir.to_string_lossy()) || file.contains("/json/");
        if ours && r["name"] != "<module>" {
            assert!(
                local_nulls.is_empty(),
                "{here}: the workload's own code and json must resolve fully: {local_nulls:?}"
            );
            full += 1;
        }
        nulls.extend(local_nulls);
    }
    eprintln!(
        "{label}: {} code objects, {full} of the workload's and json's fully resolved; nulls: {nulls:#?}",
        results.len()
    );
    full
}

#[test]
fn workloads_resolve_as_cpython_says() {
    for it in common::interpreters() {
        let v = it.version;
        let tmp = common::TempDir::new(&format!("wl{v}"));
        let l = layout(&tmp.0, &it.path, v);

        // A script, run as `venv/bin/python app.py`.
        let res = run(&l, v, &["app.py"], &tmp.0.join("app.jsonl"));
        let full = compare(it.label, &res, &tmp.0);
        assert!(full >= 20, "{}: only {full} code objects compared in full", it.label);
        let find = |q: &str| {
            res.iter()
                .find(|(r, i, _)| {
                    r["qualname"] == q
                        || (r["qualname"].is_null() && i.qualname.known().is_some_and(|k| k == q))
                })
                .map(|(_, i, _)| i.clone())
        };
        let raw = find("JSONDecoder.raw_decode").expect("raw_decode was called");
        assert_eq!(raw.module, Field::Known("json.decoder".into()));
        assert_eq!(raw.path(), Field::Known("json.decoder.JSONDecoder.raw_decode".into()));
        assert_eq!(raw.args(), Field::Known(vec!["self".into(), "s".into(), "idx".into()]));
        for (q, m) in [
            ("Outer.Inner.run", "__main__"),
            ("Outer.run", "__main__"),
            ("A.run", "__main__"),
            ("B.run", "__main__"),
            ("make_adder.<locals>.add", "__main__"),
            ("deco.<locals>.wrapper", "__main__"),
            ("decorated", "__main__"),
            ("<lambda>", "__main__"),
            ("gen", "__main__"),
            ("helper.<locals>.Local.m", "helpers"),
            ("Worker.work.<locals>.inner", "mypkg.sub.mod"),
            ("top_level", "mypkg.sub.mod"),
        ] {
            let i = find(q).unwrap_or_else(|| panic!("{}: {q} not recorded", it.label));
            assert_eq!(i.module, Field::Known(m.into()), "{}: {q}", it.label);
        }
        let b = find("B.run").unwrap();
        assert_eq!(b.args(), Field::Known(vec!["self".into(), "a".into(), "b".into(), "c".into()]));
        // Comprehensions: own code objects before 3.12, inlined after.
        assert_eq!(find("B.run.<locals>.<listcomp>").is_some(), v < PyVersion::new(3, 12), "{}", it.label);
        assert!(find("B.run.<locals>.<genexpr>").is_some());

        // A module, run as `venv/bin/python -m mypkg.sub.cli`.
        let res = run(&l, v, &["-m", "mypkg.sub.cli"], &tmp.0.join("cli.jsonl"));
        compare(&format!("{} -m", it.label), &res, &tmp.0);
        let main = res.iter().find(|(r, _, _)| r["name"] == "main").expect("main recorded");
        assert_eq!(main.1.module, Field::Known("__main__".into()));
        assert_eq!(main.1.path(), Field::Known("__main__.main".into()));
    }
}
