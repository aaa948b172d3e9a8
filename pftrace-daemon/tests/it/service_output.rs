//! pftraced's service-mode output and configuration: the rolling trace
//! files (small files, so they rotate many times) hold every completed call
//! exactly once after `pftracectl stop`; a broken configuration file is
//! refused with its path, line and column, an unknown key by name.

use crate::common;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::PathBuf,
    process::Command,
};

use crate::common::*;
use crate::common::{PFTRACED, TestDir, python};
use serde_json::Value;

#[test]
fn rolling_files_hold_every_call_exactly_once() {
    // Alone: a dormant link on the interpreter file (common/serial.rs).
    let _serial = serial();
    let dir = TestDir::new("svc-rolling");
    let py = python();
    let script = worker_script(&dir);
    let cg = Cgroup::new("rolling");
    let socket = socket_of(&dir);
    let out_dir = dir.join("rolling");
    let config = dir.join("pftraced.toml");
    fs::write(&config, "[output]\nmax_file_bytes = 4096\n").unwrap();

    let mut a = WorkerSpec::new(&py, &script).cgroup(cg.path()).start("in the cgroup, started first");
    let tracer = serving(&dir, &["foo", "bar"])
        .arg("--config")
        .arg(&config)
        .arg("--cgroup")
        .arg(cg.path())
        .arg("--output-dir")
        .arg(&out_dir)
        .spawn();
    wait_serving(&socket, &tracer);
    wait_traced(&socket, &tracer, a.pid());
    let mut b = WorkerSpec::new(&py, &script).cgroup(cg.path()).start("in the cgroup, started later");
    wait_traced(&socket, &tracer, b.pid());

    // Rounds with pauses between them, so the daemon writes, flushes and
    // rotates while calls keep arriving.
    for round in 0..5 {
        a.call("foo", 60);
        b.call("foo", 90);
        a.call("bar", 7);
        b.call("bar", 3);
        if round == 2 {
            std::thread::sleep(std::time::Duration::from_millis(1100)); // past a flush
        }
    }
    let made =
        expected(&[(a.pid(), "foo", 300), (b.pid(), "foo", 450), (a.pid(), "bar", 35), (b.pid(), "bar", 15)]);
    let status = common::status(&socket);
    let output = &status["output"];
    assert_eq!(output["dir"].as_str(), out_dir.to_str(), "{status:#}");
    assert_eq!((output["write_errors"].as_u64(), output["calls_not_written"].as_u64()), (Some(0), Some(0)));

    let daemon_pid = status["daemon_pid"].as_u64().unwrap();
    let run = stop(&socket, tracer);
    let trace = run.trace();
    assert_eq!(counts(&trace.calls), made, "the -o trace");
    trace.assert_clean();

    // Every file: a closed JSON array, within the size limit.
    let mut files: Vec<PathBuf> = fs::read_dir(&out_dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(files.len() >= 5, "expected several files at 4096 bytes each, got {}: {files:?}", files.len());
    let mut all = Vec::new();
    let mut seen = BTreeSet::new();
    let mut per_file = Vec::new();
    for f in &files {
        let name = f.file_name().unwrap().to_str().unwrap();
        assert!(
            name.starts_with(&format!("pftrace-{}-{daemon_pid}-", common_hostname()))
                && name.ends_with(".json"),
            "unexpected file name {name}"
        );
        let bytes = fs::read(f).unwrap();
        assert!(bytes.len() <= 4096, "{name} is {} bytes, over max_file_bytes", bytes.len());
        let text = String::from_utf8(bytes).unwrap();
        assert!(
            text.starts_with('[') && text.trim_end().ends_with(']'),
            "{name} is not a closed array:\n{text}"
        );
        let events: Vec<Value> =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name} is not a JSON array: {e}\n{text}"));
        let mut calls_here = 0;
        let mut named_pids = BTreeSet::new();
        for ev in events {
            match ev["ph"].as_str() {
                Some("X") => {
                    let pid = ev["pid"].as_u64().unwrap() as u32;
                    assert!(
                        named_pids.contains(&pid),
                        "{name}: a call of {pid} before its process_name event"
                    );
                    // ts as written (its exact decimal text) identifies a call with pid, tid and name.
                    let key =
                        (pid, ev["tid"].as_u64().unwrap(), ev["ts"].to_string(), ev["name"].to_string());
                    assert!(seen.insert(key.clone()), "{name}: call {key:?} is in the files twice");
                    assert!(ev["args"].get("incomplete").is_none(), "{name}: incomplete call {ev}");
                    all.push((pid, ev["name"].as_str().unwrap().to_string()));
                    calls_here += 1;
                }
                Some("M") if ev["name"] == "process_name" => {
                    named_pids.insert(ev["pid"].as_u64().unwrap() as u32);
                }
                _ => panic!("{name}: unexpected event {ev}"),
            }
        }
        per_file.push(calls_here);
    }
    let mut in_files: BTreeMap<(u32, String), u64> = BTreeMap::new();
    for key in all {
        *in_files.entry(key).or_default() += 1;
    }
    assert_eq!(in_files, made, "calls in the rolling files, per (pid, function)");
    eprintln!("{} rolling files, calls per file: {per_file:?}", files.len());
    a.finish();
    b.finish();
}

fn common_hostname() -> String {
    let host = fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string();
    host.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '_' { c } else { '_' }).collect()
}

/// Runs pftraced with a config file and arguments that would otherwise be fine.
fn with_config(dir: &TestDir, text: &str) -> (PathBuf, std::process::Output) {
    let path = dir.join("pftraced.toml");
    fs::write(&path, text).unwrap();
    let out = Command::new(PFTRACED)
        .arg("--config")
        .arg(&path)
        .args(["-t", "foo", "--cgroup", cgroup_root().to_str().unwrap(), "--socket"])
        .arg(dir.join("never.sock"))
        .output()
        .unwrap();
    (path, out)
}

#[test]
fn config_errors_name_the_file_line_and_column() {
    let dir = TestDir::new("svc-config");
    let cases: [(&str, usize, usize, &str); 4] = [
        // Malformed TOML.
        ("[output]\nmax_file_bytes = 4096\nmax_file_seconds = = 5\n", 3, 20, "extra `=`, expected nothing"),
        // Unknown keys, in a section and at the top.
        (
            "names = ['foo']\n\n[output]\n  max_file_byte = 4096\n",
            4,
            3,
            "unknown field `max_file_byte`, expected one of `dir`, `max_file_bytes`, `max_file_seconds`",
        ),
        ("names = ['foo']\nsocket_path = '/tmp/x.sock'\n", 2, 1, "unknown field `socket_path`"),
        // A value of the wrong type.
        ("[limits]\nmax_processes = 'many'\n", 2, 17, "invalid type: string \"many\""),
    ];
    for (toml, line, column, message) in cases {
        let (path, out) = with_config(&dir, toml);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{toml:?}: {stderr}");
        let prefix =
            format!("pftraced: error: config file {}, line {line}, column {column}: ", path.display());
        assert!(stderr.starts_with(&prefix), "{toml:?}:\n{stderr}\nwanted it to start with {prefix:?}");
        assert!(stderr.contains(message), "{toml:?}: {message:?} missing from\n{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(!dir.join("never.sock").exists());
    }
    // An invalid value: the file and the key.
    let (path, out) = with_config(&dir, "[output]\nmax_file_bytes = 100\n");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!(
            "pftraced: error: config file {}: output.max_file_bytes must be at least 4096\n",
            path.display()
        )
    );
    // A missing explicit config file.
    let missing = dir.join("missing.toml");
    let out =
        Command::new(PFTRACED).arg("--config").arg(&missing).args(["-t", "foo", "--all"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr)
            .starts_with(&format!("pftraced: error: cannot read config file {}: ", missing.display())),
        "{}",
        text(&out.stderr)
    );
}
