//! pftraced as the packaged systemd service, under a real systemd (252, PID
//! 1 of a Debian bookworm container booted with `systemd-nspawn -b`; see
//! tests/it/systemd_support), installed exactly as the header of
//! packaging/systemd/pftraced.service says:
//! - the unit: `systemctl enable --now pftraced` returns once the daemon is
//!   ready (Type=notify: its socket answers at once), the journal holds its
//!   lines with their priorities (info 6, warning 4), `systemctl stop` ends
//!   it cleanly (exit 0, Result=success, no restart), and the cached root is
//!   unchanged afterwards;
//! - a job started with `systemd-run --scope --slice=jobs`, running the
//!   probe-enabled CPython, is traced: `pftracectl dump` holds exactly its
//!   calls under the pid the container gives it (pftraced runs in the
//!   container's PID namespace, issue 15);
//! - jobs by pattern: `[jobs] root` a slice that does not exist when the
//!   unit starts (it waits, no restart), jobs started with `systemd-run
//!   --scope --slice=pyjob --unit=job<ID>` each get their trace file when
//!   their scope ends, with exactly their calls.

use std::{collections::BTreeMap, fs, path::Path, thread, time::Duration, time::Instant};

use crate::common::{TestDir, Trace, python, serial};
use crate::systemd_support::*;
use serde_json::Value;

/// The unit file, as packaged.
fn unit_file() -> String {
    let path = packaging_dir().join("systemd/pftraced.service");
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The commands of the unit header's `Install:` block, as written (the
/// parenthesised line is an instruction to a person, not a command).
fn header_install_commands(unit: &str) -> Vec<String> {
    let block = unit.split_once("# Install:\n").expect("the unit's header has an `Install:` block").1;
    block
        .lines()
        .map_while(|l| l.strip_prefix('#').map(str::trim).filter(|l| !l.is_empty()))
        .filter(|l| !l.starts_with('('))
        .map(str::to_string)
        .collect()
}

/// The header's commands that this test runs. If the header changes, the
/// test says so rather than following something else.
const HEADER_COMMANDS: [&str; 5] = [
    "install -m 0755 target/release/pftraced target/release/pftracectl /usr/local/bin/",
    "install -D -m 0644 packaging/pftraced.toml.example /etc/pftrace/pftraced.toml",
    "install -m 0644 packaging/systemd/pftraced.service /etc/systemd/system/",
    "systemctl daemon-reload && systemctl enable --now pftraced",
    "sudo pftracectl status",
];

/// Installs pftraced in the container as the unit's header says, with
/// names = ["foo"] and the cgroup `watch` as its target ("edit it"), up to
/// and including `systemctl enable --now pftraced`; returns how long that
/// last command took.
fn install_as_the_header_says(c: &Container, watch: &str) -> Duration {
    install_with_edits(c, &[format!(r#"s|^cgroups = \[\]$|cgroups = ["{watch}"]|"#)])
}

/// [`install_as_the_header_says`] with names = ["foo"] and the config edited
/// by these `sed` expressions.
fn install_with_edits(c: &Container, edits: &[String]) -> Duration {
    assert_eq!(header_install_commands(&unit_file()), HEADER_COMMANDS, "the unit's Install: block changed");
    c.sh(SRC, HEADER_COMMANDS[0]);
    c.sh(SRC, HEADER_COMMANDS[1]);
    // "(edit it: names, and at least one target)"
    let config = "/etc/pftrace/pftraced.toml";
    let example = c.ok(&["cat", config]);
    for line in ["names = []", "cgroups = []"] {
        assert!(
            example.lines().any(|l| l == line),
            "the example config has no `{line}` line to edit:\n{example}"
        );
    }
    let mut sed =
        vec!["sed".to_string(), "-i".into(), "-e".into(), r#"s|^names = \[\]$|names = ["foo"]|"#.into()];
    for e in edits {
        sed.extend(["-e".to_string(), e.clone()]);
    }
    sed.push(config.into());
    c.ok(&sed.iter().map(String::as_str).collect::<Vec<_>>());
    c.sh(SRC, HEADER_COMMANDS[2]);
    let started = Instant::now();
    c.sh(SRC, HEADER_COMMANDS[3]);
    let took = started.elapsed();
    eprintln!("[systemd] `{}` took {:.2} s", HEADER_COMMANDS[3], took.as_secs_f64());
    took
}

/// The header's last command; `sudo` only lends root, which the container's shell is.
fn header_status(c: &Container) -> String {
    c.ok(&["sh", "-c", HEADER_COMMANDS[4].strip_prefix("sudo ").unwrap()])
}

/// Where the container mounts cgroup v2 (the host's layout decides: hybrid here).
fn cgroup2_mount(c: &Container) -> String {
    let out = c.ok(&["findmnt", "-n", "-t", "cgroup2", "-o", "TARGET"]);
    out.lines().next().unwrap_or_else(|| panic!("no cgroup2 mount in the container")).trim().to_string()
}

/// Starts the `jobs` slice, so its cgroup exists before pftraced starts.
fn start_jobs_slice(c: &Container) -> String {
    c.ok(&["systemctl", "start", "jobs.slice"]);
    let dir = format!("{}/jobs.slice", cgroup2_mount(c));
    c.ok(&["test", "-d", &dir]);
    dir
}

fn status_json(c: &Container) -> Value {
    let out = c.ok(&["pftracectl", "status", "--json"]);
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("pftracectl status --json is not JSON ({e}):\n{out}"))
}

/// `systemctl stop pftraced`, checked: it returns within the unit's stop
/// timeout, the daemon exited 0 and systemd saw success; returns the time taken.
fn stop_cleanly(c: &Container) -> Duration {
    let started = Instant::now();
    c.ok(&["systemctl", "stop", "pftraced"]);
    let took = started.elapsed();
    eprintln!("[systemd] `systemctl stop pftraced` took {:.2} s", took.as_secs_f64());
    let after = c.show(
        "pftraced",
        &["ActiveState", "SubState", "Result", "ExecMainCode", "ExecMainStatus", "NRestarts"],
    );
    let want: BTreeMap<String, String> = [
        ("ActiveState", "inactive"),
        ("SubState", "dead"),
        ("Result", "success"),
        ("ExecMainCode", "1"), // CLD_EXITED
        ("ExecMainStatus", "0"),
        ("NRestarts", "0"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(after, want, "after `systemctl stop pftraced`");
    assert!(took < Duration::from_secs(30), "stop took {took:?}, the unit's TimeoutStopSec");
    c.ok(&["test", "!", "-e", "/run/pftrace/pftraced.sock"]);
    took
}

/// The daemon's own journal lines (its pid; not systemd's about it).
fn daemon_lines(c: &Container, pid: u32) -> Vec<JournalEntry> {
    c.journal("pftraced").into_iter().filter(|e| e.pid == Some(pid)).collect()
}

#[test]
fn the_packaged_unit_starts_through_notify_logs_with_priorities_and_stops_cleanly() {
    // Alone: boots a systemd container (common/serial.rs).
    let _serial = serial();
    let dir = TestDir::new("systemd-unit");
    let c = Container::boot(&dir);
    let watch = start_jobs_slice(&c);
    install_as_the_header_says(&c, &watch);

    // enable --now returned: with Type=notify that means ready, so the socket answers now.
    let status = header_status(&c);
    assert!(status.contains(&format!("targets:   cgroup {watch}")), "pftracectl status:\n{status}");
    let shown = c.show(
        "pftraced",
        &[
            "Type",
            "NotifyAccess",
            "ActiveState",
            "SubState",
            "UnitFileState",
            "MainPID",
            "NRestarts",
            "StatusErrno",
        ],
    );
    assert_eq!(
        [
            &shown["Type"],
            &shown["NotifyAccess"],
            &shown["ActiveState"],
            &shown["SubState"],
            &shown["UnitFileState"]
        ],
        ["notify", "main", "active", "running", "enabled"],
        "{shown:?}"
    );
    assert_eq!(shown["NRestarts"], "0");
    let pid: u32 = shown["MainPID"].parse().unwrap();
    assert_ne!(pid, 0, "{shown:?}");
    assert_eq!(c.ok(&["cat", &format!("/proc/{pid}/comm")]).trim(), "pftraced");

    // Its lines are in the journal with their priorities (no `<6>` left in the text).
    let lines = daemon_lines(&c, pid);
    let socket_line = "control socket /run/pftrace/pftraced.sock (mode 600)";
    assert!(
        lines.iter().any(|e| e.message == socket_line && e.priority == Some(6) && e.identifier == "pftraced"),
        "no info line {socket_line:?} with priority 6 from pid {pid} in the journal: {lines:#?}"
    );
    assert!(lines.iter().all(|e| e.priority.is_some() && !e.message.starts_with('<')), "{lines:#?}");
    let first = stop_cleanly(&c);

    // A warning gets priority 4: the perf-event attach method warns at start.
    // Set through a drop-in, as `systemctl edit pftraced` would.
    c.ok(&["mkdir", "-p", "/etc/systemd/system/pftraced.service.d"]);
    c.ok(&[
        "sh",
        "-c",
        "printf '[Service]\\nEnvironment=PFTRACE_UPROBE_ATTACH=perf\\n' > /etc/systemd/system/pftraced.service.d/attach.conf",
    ]);
    c.ok(&["systemctl", "daemon-reload"]);
    c.ok(&["systemctl", "start", "pftraced"]);
    let pid: u32 = c.show("pftraced", &["MainPID"])["MainPID"].parse().unwrap();
    let lines = daemon_lines(&c, pid);
    assert!(
        lines.iter().any(|e| e
            .message
            .starts_with("attaching through uprobe perf events (PFTRACE_UPROBE_ATTACH=perf)")
            && e.priority == Some(4)),
        "no warning with priority 4 from pid {pid}: {lines:#?}"
    );
    stop_cleanly(&c);
    let stopped = c
        .journal("pftraced")
        .iter()
        .filter(|e| e.message == "pftraced.service: Deactivated successfully.")
        .count();
    assert_eq!(stopped, 2, "systemd's `Deactivated successfully` once per stop");
    eprintln!("[systemd] first stop {:.2} s", first.as_secs_f64());

    // The cached root never saw any of it.
    let root = c.root().to_path_buf();
    c.shut_down();
    for path in ["usr/local/bin/pftraced", "etc/systemd/system/pftraced.service", "etc/pftrace"] {
        assert!(
            !root.join(path).exists(),
            "the test wrote {} into the cached root",
            root.join(path).display()
        );
    }
}

/// The job: prints its pid as the container numbers it, then obeys `call
/// NAME N` lines (answering `done`) until end of input.
const JOB: &str = r#"
    import os, sys

    def foo():
        pass

    def bar():
        pass

    print("ready", os.getpid(), flush=True)
    for line in sys.stdin:
        cmd, name, n = line.split()
        for _ in range(int(n)):
            globals()[name]()
        print("done", flush=True)
"#;

#[test]
fn a_job_started_with_systemd_run_in_a_slice_is_traced_exactly() {
    // Alone: boots a systemd container (common/serial.rs).
    let _serial = serial();
    let dir = TestDir::new("systemd-job");
    dir.script("job.py", JOB);
    let py = python();
    let c = Container::boot(&dir);
    let watch = start_jobs_slice(&c);

    let mut job = c.spawn(&[
        "systemd-run",
        "--scope",
        "--slice=jobs",
        "--unit=job42",
        py.to_str().unwrap(),
        &format!("{TEST_DIR}/job.py"),
    ]);
    let pid: u32 = job.expect("ready").parse().unwrap();
    let cgroup = c.ok(&["cat", &format!("/proc/{pid}/cgroup")]);
    assert!(cgroup.lines().any(|l| l == "0::/jobs.slice/job42.scope"), "the job's cgroups:\n{cgroup}");

    install_as_the_header_says(&c, &watch);
    wait_traced_in(&c, pid);

    const N: u64 = 1500;
    job.send(&format!("call foo {N}"));
    job.expect("done");
    job.send("call bar 20");
    job.expect("done");

    let out = c.exec(&["pftracectl", "dump"]);
    assert!(out.status.success(), "pftracectl dump failed: {}", text(&out.stderr));
    let trace = Trace::parse(&text(&out.stdout)).unwrap_or_else(|e| panic!("bad dump: {e}"));
    let mut calls: BTreeMap<(u32, u32, String), u64> = BTreeMap::new();
    for call in &trace.calls {
        *calls.entry((call.pid, call.tid, call.name.clone())).or_default() += 1;
    }
    assert_eq!(
        calls,
        BTreeMap::from([((pid, pid, "foo".to_string()), N)]),
        "calls per (pid, tid, name) in `pftracectl dump`, the job being pid {pid} in the container"
    );
    trace.assert_clean();
    let status = status_json(&c);
    let entry = status["processes"].as_array().unwrap().iter().find(|p| p["pid"] == pid).unwrap();
    assert_eq!(entry["calls"], N, "{status:#}");
    assert_eq!(status["calls_total"], N, "{status:#}");

    job.finish();
    let main_pid: u32 = c.show("pftraced", &["MainPID"])["MainPID"].parse().unwrap();
    let lines = daemon_lines(&c, main_pid);
    let tracing = format!("tracing pid {pid} ({})", py.display());
    assert!(
        lines.iter().any(|e| e.message == tracing && e.priority == Some(6)),
        "no {tracing:?} line: {lines:#?}"
    );
    stop_cleanly(&c);
    assert!(Path::new(&dir.join("job.py")).exists());
}

/// Waits until `pid` is listed as running (traced) in the container's pftraced.
fn wait_traced_in(c: &Container, pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = status_json(c);
        let entry = s["processes"].as_array().unwrap().iter().find(|p| p["pid"] == pid).cloned();
        if entry.as_ref().is_some_and(|p| p["running"] == true) {
            return;
        }
        assert!(Instant::now() < deadline, "pid {pid} is not traced after 30 s; status:\n{s:#}");
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn jobs_started_with_systemd_run_get_one_trace_each_under_the_unit() {
    // Alone: boots a systemd container (common/serial.rs).
    let _serial = serial();
    let dir = TestDir::new("systemd-jobs");
    dir.script("job.py", JOB);
    let py = python();
    let c = Container::boot(&dir);
    let root = format!("{}/pyjob.slice", cgroup2_mount(&c));
    c.ok(&["test", "!", "-e", &root]);
    let jobs_dir = "/var/lib/pftrace/jobs";
    let example = c.ok(&["cat", &format!("{SRC}/packaging/pftraced.toml.example")]);
    for line in [
        "# root = \"/sys/fs/cgroup/system.slice/slurmstepd.scope\"",
        "pattern = \"job_{id}\"",
        "# dir = \"/var/lib/pftrace/jobs\"",
    ] {
        assert!(example.lines().any(|l| l == line), "the example config has no `{line}` line to edit");
    }
    install_with_edits(
        &c,
        &[
            format!(r#"s|^# root = "/sys/fs/cgroup/system.slice/slurmstepd.scope"$|root = "{root}"|"#),
            r#"s|^pattern = "job_{id}"$|pattern = "job{id}.scope"|"#.into(),
            format!(r#"s|^# dir = "/var/lib/pftrace/jobs"$|dir = "{jobs_dir}"|"#),
        ],
    );
    // The root does not exist yet: the unit is up, says it waits, and is not restarted.
    let shown = c.show("pftraced", &["ActiveState", "NRestarts", "MainPID"]);
    assert_eq!((shown["ActiveState"].as_str(), shown["NRestarts"].as_str()), ("active", "0"), "{shown:?}");
    let main_pid: u32 = shown["MainPID"].parse().unwrap();
    let waiting = format!("cgroup {root} does not exist yet: waiting for it to be made");
    let lines = daemon_lines(&c, main_pid);
    assert!(
        lines.iter().any(|e| e.message.starts_with(&waiting) && e.priority == Some(4)),
        "no warning {waiting:?}: {lines:#?}"
    );

    // Two jobs, overlapping.
    let start = |id: u32| {
        c.spawn(&[
            "systemd-run",
            "--scope",
            "--slice=pyjob",
            &format!("--unit=job{id}"),
            py.to_str().unwrap(),
            &format!("{TEST_DIR}/job.py"),
        ])
    };
    let mut j42 = start(42);
    let p42: u32 = j42.expect("ready").parse().unwrap();
    let mut j43 = start(43);
    let p43: u32 = j43.expect("ready").parse().unwrap();
    let cgroup = c.ok(&["cat", &format!("/proc/{p42}/cgroup")]);
    assert!(cgroup.lines().any(|l| l == "0::/pyjob.slice/job42.scope"), "job 42's cgroups:\n{cgroup}");
    wait_traced_in(&c, p42);
    wait_traced_in(&c, p43);
    j42.send("call foo 420");
    j42.expect("done");
    j43.send("call foo 43");
    j43.expect("done");
    j43.send("call bar 5");
    j43.expect("done");
    j42.finish();
    j43.finish();

    for (id, pid, n) in [(42, p42, 420u64), (43, p43, 43)] {
        let file = format!("{jobs_dir}/pftrace-job-{id}.json");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !c.exec(&["test", "-e", &file]).status.success() {
            assert!(
                Instant::now() < deadline,
                "no {file} 30 s after job {id} ended; status:\n{:#}",
                status_json(&c)
            );
            thread::sleep(Duration::from_millis(50));
        }
        let trace = Trace::parse(&c.ok(&["cat", &file])).unwrap_or_else(|e| panic!("bad {file}: {e}"));
        let mut calls: BTreeMap<(u32, String), u64> = BTreeMap::new();
        for call in &trace.calls {
            *calls.entry((call.pid, call.name.clone())).or_default() += 1;
        }
        assert_eq!(calls, BTreeMap::from([((pid, "foo".to_string()), n)]), "{file}");
        let processes = trace.pftrace()["processes"].as_array().unwrap().clone();
        assert_eq!(processes.len(), 1, "{file}: {processes:?}");
        assert_eq!(processes[0]["job"], serde_json::json!({"variable": "cgroup", "id": id.to_string()}));
        let lines = daemon_lines(&c, main_pid);
        let ended = format!("job {id} ended: wrote {n} calls to {file}");
        assert!(lines.iter().any(|e| e.message == ended), "no {ended:?} in the journal: {lines:#?}");
    }
    let stats = c.ok(&["pftracectl", "stats", "--job", "42"]);
    assert!(stats.starts_with("job 42 (finished, "), "pftracectl stats --job 42:\n{stats}");
    assert_eq!(c.show("pftraced", &["NRestarts"])["NRestarts"], "0");
    stop_cleanly(&c);
}
