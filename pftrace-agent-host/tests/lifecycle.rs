//! The agent's life in a process: loaded at launch from sitecustomize (and
//! the interpreter's own sitecustomize still runs), refused by -E/-I/-S,
//! following live name changes, leaving when pftraced goes (tool id freed,
//! untraced speed within a second), and surviving fork. On every test
//! interpreter.

mod common;

use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::{Command, Stdio},
    time::Duration,
};

use common::{Host, finish, interpreters, scripts_dir, serial};
use pftrace_agent_host::{install, launch};

fn target() -> std::path::PathBuf {
    scripts_dir().join("lifecycle_target.py")
}

fn count(records: &[pftrace_agent_host::kernel::AgentRecord], entry: bool, name: &str) -> usize {
    records.iter().filter(|r| r.entry == entry && r.name == name).count()
}

#[test]
fn launch_mode_traces_from_the_first_line_and_chains_sitecustomize() {
    let _g = serial();
    let mut host = Host::new("launch");
    // The user's own sitecustomize, later on PYTHONPATH: it must still run.
    let user = host.tmp.0.join("user");
    std::fs::create_dir(&user).unwrap();
    std::fs::write(user.join("sitecustomize.py"), "import sys\nsys._user_site_ran = True\n").unwrap();
    let env = install::launch_env(&host.installed, Some(&user.to_string_lossy()));
    for (label, python) in interpreters() {
        let child = Command::new(&python)
            .arg(target())
            .arg("launch")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let _conn = host.accept(pid, &["work"]);
        let out = finish(child, label);
        assert!(out.contains("USER_SITE True"), "{label}: {out}");
        assert!(out.contains("STATUS tracing"), "{label}: {out}");
        assert!(out.contains("PATH_CLEAN True"), "{label}: {out}");
        let records = host.records(pid);
        assert_eq!((count(&records, true, "work"), count(&records, false, "work")), (500, 500), "{label}");
    }
    // The line `pftracectl env` gives users of 3.11-3.13 jobs, through a shell.
    let (label, python) = &interpreters()[0];
    let line = launch::env_line(&host.installed);
    let child = Command::new("sh")
        .arg("-c")
        .arg(format!("{line}; exec \"$0\" \"$1\" launch"))
        .arg(python)
        .arg(target())
        .env("PYTHONPATH", &user)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let _conn = host.accept(pid, &["work"]);
    let out = finish(child, label);
    assert!(out.contains("USER_SITE True") && out.contains("STATUS tracing"), "{label} via `{line}`: {out}");
    let records = host.records(pid);
    assert_eq!(count(&records, true, "work"), 500, "{label} via the env line");
    // -E, -I, -S: no agent; refusal() says why before pftraced waits for nothing.
    let (label, python) = &interpreters()[1];
    for flag in ["-E", "-I", "-S"] {
        let argv =
            vec![python.to_string_lossy().into_owned(), flag.into(), target().to_string_lossy().into_owned()];
        let msg = launch::refusal(&argv).expect("refused");
        assert!(msg.contains(&format!("with {flag}")), "{msg}");
        let out = Command::new(python)
            .args([flag, &target().to_string_lossy(), "launch"])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("STATUS no agent"), "{label} {flag}: {text}");
    }
}

#[test]
fn follows_names_added_and_removed_while_running() {
    let _g = serial();
    let mut host = Host::new("names");
    let sock = host.installed.socket.to_string_lossy().into_owned();
    for (label, python) in interpreters() {
        let mut child = host.spawn(&python, &target(), &["names", &sock]);
        let pid = child.id();
        let mut conn = host.accept(pid, &["work"]);
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut stdin = child.stdin.take().unwrap();
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert!(line.starts_with("tracing"), "{label}: {line}");
        // Round 1: work. 2: work + other (glob). 3: other only (qualified). 4: none.
        let sets: [&[&str]; 3] = [&["work", "oth*"], &["lifecycle_target.py:other"], &[]];
        let mut per_round = Vec::new();
        for round in 1..=4 {
            line.clear();
            stdout.read_line(&mut line).unwrap();
            assert_eq!(line.trim(), format!("ROUND {round}"), "{label}");
            let records = host.records(pid);
            per_round.push((
                count(&records, true, "work"),
                count(&records, false, "work"),
                count(&records, true, "other"),
                count(&records, false, "other"),
            ));
            if let Some(names) = sets.get(round - 1) {
                let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
                assert_eq!(conn.set_names(&names).unwrap(), round as u32 + 1, "{label}: generation");
            }
            stdin.write_all(b"\n").unwrap();
        }
        assert_eq!(
            per_round,
            vec![(100, 100, 0, 0), (100, 100, 100, 100), (0, 0, 100, 100), (0, 0, 0, 0)],
            "{label}"
        );
        drop(stdin);
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
        assert!(child.wait().unwrap().success(), "{label}: {rest}");
    }
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[test]
fn leaves_within_a_second_when_pftraced_goes() {
    let _g = serial();
    let mut host = Host::new("teardown");
    let sock = host.installed.socket.to_string_lossy().into_owned();
    for (label, python) in interpreters() {
        let mut child = host.spawn(&python, &target(), &["teardown", &sock]);
        let pid = child.id();
        let conn = host.accept(pid, &["work"]);
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while !line.starts_with("TRACING") {
            line.clear();
            assert!(stdout.read_line(&mut line).unwrap() > 0, "{label}: ended early");
        }
        // pftraced goes: its end of the socket closes (as when it is killed).
        let gone_at = monotonic_ns();
        drop(conn);
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
        assert!(child.wait().unwrap().success(), "{label}: {rest}");
        let json =
            rest.lines().find_map(|l| l.strip_prefix("RESULT ")).unwrap_or_else(|| panic!("{label}: {rest}"));
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        let min =
            |k: &str| v[k].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).fold(f64::MAX, f64::min);
        let (before, during, after) = (min("before"), min("during"), min("after"));
        let stopped_after = v["gone_ns"].as_u64().expect("the agent never stopped") as i64 - gone_at as i64;
        eprintln!(
            "{label}: {before:.1} ns/call untraced, {during:.1} tracing, {after:.1} after; stopped {:.1} ms after pftraced went",
            stopped_after as f64 / 1e6
        );
        assert!(stopped_after < 1_000_000_000, "{label}: stopped {stopped_after} ns after");
        assert!(
            v["status"].as_str().unwrap().contains("pftraced closed the connection"),
            "{label}: {}",
            v["status"]
        );
        assert!(
            during > before + 200.0,
            "{label}: tracing must cost something here, or this test shows nothing"
        );
        // Fastest chunks compared (noise only adds time). This VM also
        // switches between two speeds for seconds at a time: the same loop,
        // with no agent at all, ran 36 and 51-60 ns/call in one pyenv 3.12.1
        // process (pinned to one CPU or not), so `after` may be ~1.5x
        // `before` with nothing left behind. What must hold: the process is
        // back at the untraced speed or within a tenth of what tracing cost
        // it (an agent still reporting costs the full +600-1,500 ns).
        assert!(
            after < before * 1.25 || after - before < 0.1 * (during - before),
            "{label}: {after:.1} ns/call after, {before:.1} untraced, {during:.1} tracing: {json}"
        );
        if let Some(tools) = v["tools"].as_array().filter(|t| !t.is_empty()) {
            assert!(tools.iter().all(|t| t.is_null()), "{label}: tool ids still held: {tools:?}");
        }
        host.records(pid);
    }
}

#[test]
fn forked_children_keep_tracing_and_connect_on_their_own() {
    let _g = serial();
    let mut host = Host::new("fork");
    host.kernel.follow_forks().unwrap();
    let sock = host.installed.socket.to_string_lossy().into_owned();
    for (label, python) in interpreters() {
        let mut child = host.spawn(&python, &target(), &["fork", &sock]);
        let pid = child.id();
        let _conn = host.accept(pid, &["work"]);
        // The forked child's own connection.
        let mut conn = host.server.accept(Duration::from_secs(10)).expect("the child did not connect");
        let child_pid = conn.pid;
        assert_ne!(child_pid, pid);
        let configured = conn.configure(pftrace_agent::protocol::Report::Uprobe, &["work".to_string()]);
        if let Err(e) = configured {
            let o = child.wait_with_output().unwrap();
            panic!(
                "{label}: child {child_pid}: {e}; parent said {} / {}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        let mut out = String::new();
        std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut out).unwrap();
        assert!(child.wait().unwrap().success(), "{label}: {out}");
        assert!(out.contains(&format!("CHILD {child_pid} 0")), "{label}: {out}");
        let parent = host.records(pid);
        assert_eq!(
            (count(&parent, true, "work"), count(&parent, false, "work")),
            (10, 10),
            "{label}: parent"
        );
        let kid = host.records(child_pid);
        assert_eq!((count(&kid, true, "work"), count(&kid, false, "work")), (100, 100), "{label}: child");
    }
}
