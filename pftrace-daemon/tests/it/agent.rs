//! The in-process agent as pftraced uses it, for the CPythons whose USDT
//! probes cannot serve (3.11-3.14, builds without probes, 3.15 with its
//! JIT): the calls in the trace file against CPython's own recorder in the
//! same process (sys.setprofile on 3.12+, sys.settrace on 3.11, where the
//! agent holds the profile slot), per thread and function, with threads,
//! recursion, exceptions, generators (throw, close), coroutines and every
//! name form; launch mode; `--pid` on 3.14/3.15 (PEP 768); names added and
//! removed while running; and the refusals with their exact messages.

use std::{collections::BTreeMap, path::Path, process::Command, time::Duration};

use crate::common::*;

/// Every name form: bare, glob, FILE:NAME (the other module's `qualified`
/// must not be traced).
const NAMES: &[&str] = CALL_KINDS_NAMES;

/// Environment variables for a launched command.
type Env = Vec<(&'static str, &'static str)>;

/// The interpreters the agent serves, and the environment that makes
/// pftraced choose it (3.15 has working probes: with PYTHON_JIT=1 they miss
/// JIT-compiled calls, so the agent is used).
fn agent_interpreters() -> Vec<(String, std::path::PathBuf, Env)> {
    let mut v: Vec<_> = ["3.11.7", "3.12.1", "3.13.0"]
        .into_iter()
        .map(|ver| (format!("pyenv {ver}"), pyenv_python(ver), vec![]))
        .collect();
    v.push(("debian 3.14".into(), sid_python("3.14"), vec![]));
    v.push(("debian 3.15 PYTHON_JIT=1".into(), sid_python("3.15"), vec![("PYTHON_JIT", "1")]));
    v
}

/// (tid, name) → complete calls in the trace (of the workload's file).
fn traced(trace: &Trace, script: &Path) -> BTreeMap<(u32, String), usize> {
    let mut out = BTreeMap::new();
    for c in &trace.calls {
        assert_eq!(c.file, script.to_str().unwrap(), "a call of another file: {c:?}");
        assert!(!c.incomplete, "incomplete call {c:?}");
        *out.entry((c.tid, c.name.clone())).or_default() += 1;
    }
    out
}

/// Launch mode on each interpreter: every call CPython's recorder saw, in
/// the same thread, and nothing else; the trace says "agent".
#[test]
fn launch_mode_exact_counts_on_every_agent_interpreter() {
    require_root();
    for (label, py, env) in agent_interpreters() {
        let dir = TestDir::new("agent-launch");
        let script = call_kinds_workload(&dir);
        let mut tracer = Pftraced::new(&dir, NAMES);
        for (k, v) in &env {
            tracer = tracer.env(k, v);
        }
        let run = tracer.launch(&[py.as_os_str(), script.as_os_str()]).run();
        run.assert_code(0);
        assert!(run.stdout.contains("DONE"), "{label}: {}", run.stdout);
        let pid = run.attached_pid();
        assert!(
            run.stderr.contains(&format!(", {}, in-process agent), tracing ", py.display())),
            "{label}: {}",
            run.stderr
        );
        assert!(
            !run.stderr.lines().any(|l| l.starts_with("pftrace: ")),
            "{label}: the agent complained: {}",
            run.stderr
        );
        let want = recorded(&run.stdout);
        check_recorder(&label, &want);
        let trace = run.trace();
        trace.assert_clean();
        assert_eq!(traced(&trace, &script), want, "{label}: calls per thread and function");
        let procs = trace.pftrace()["processes"].as_array().unwrap().clone();
        assert_eq!(procs.len(), 1, "{label}");
        assert_eq!(procs[0]["pid"], pid, "{label}");
        assert_eq!(procs[0]["mechanism"], "agent", "{label}: trace metadata");
        let calls = trace.calls.len() as u64;
        assert_eq!(trace.counter("agent_reports"), 2 * calls, "{label}: one entry and one return each");
        assert_eq!(trace.counter("agent_foreign") + trace.counter("agent_bad"), 0, "{label}");
        assert_eq!(trace.counter("long_files"), 0, "{label}: every name in the common record");
        let summary = format!("in-process agent (pid {pid}): {} reports; refused: 0 from", 2 * calls);
        assert!(run.stderr.contains(&summary), "{label}: {}", run.stderr);
        eprintln!("{label}: {calls} calls, identical to CPython's recorder in 5 threads");
    }
}

/// Starts `cmd` (a script that prints `ready`, then waits for the file
/// `go`), traces it with `tracer` by `--pid` through the agent, lets it go
/// and returns its stdout and pftraced's run, both having succeeded.
fn traced_by_pid(label: &str, cmd: &mut Command, tracer: Pftraced, go: &Path) -> (String, TracedRun) {
    let mut process = PyProcess::start(cmd, label.to_string());
    process.expect_line("ready");
    let tracer = tracer.pid(process.pid()).spawn();
    let line = tracer.wait_attached(process.pid());
    assert!(line.contains("in-process agent"), "{label}: {line}");
    std::fs::write(go, "").unwrap();
    let (status, stdout) = process.wait(Duration::from_secs(60));
    assert!(status.success(), "{label}: {status}");
    let run = tracer.finish();
    run.assert_code(0);
    (stdout, run)
}

/// `--pid` on 3.14 and 3.15 (JIT on): the agent goes in through PEP 768
/// while the process runs Python, and traces exactly what the recorder sees
/// from then on.
#[test]
fn pid_mode_through_pep_768_exact_counts() {
    require_root();
    let cases =
        [("debian 3.14", sid_python("3.14"), None), ("debian 3.15 JIT", sid_python("3.15"), Some("1"))];
    for (label, py, jit) in cases {
        let dir = TestDir::new("agent-pid");
        let script = call_kinds_workload(&dir);
        let go = dir.join("go");
        let mut cmd = Command::new(&py);
        cmd.arg(&script).arg(&go);
        if let Some(v) = jit {
            cmd.env("PYTHON_JIT", v);
        }
        let (stdout, run) = traced_by_pid(label, &mut cmd, Pftraced::new(&dir, NAMES), &go);
        let want = recorded(&stdout);
        check_recorder(label, &want);
        let trace = run.trace();
        trace.assert_clean();
        assert_eq!(traced(&trace, &script), want, "{label}: calls per thread and function");
    }
}

/// Names added and removed while a launched 3.12 runs: each change is in
/// force in the agent when pftracectl returns.
#[test]
fn add_and_remove_while_running() {
    require_root();
    let py = pyenv_python("3.12.1");
    let dir = TestDir::new("agent-names");
    let script = dir.script(
        "steps.py",
        r#"
        import os, sys, time
        def work(): return 1
        def extra(): return 2
        def step(n):
            print("step", n, flush=True)
            while not os.path.exists(os.path.join(os.path.dirname(__file__), "go%d" % n)):
                time.sleep(0.002)
        step(1)
        for _ in range(100): work()
        step(2)
        for _ in range(100): work()
        for _ in range(50): extra()
        step(3)
        for _ in range(100): work()
        for _ in range(50): extra()
        print("DONE", flush=True)
        "#,
    );
    let socket = dir.join("ctl.sock");
    let tracer = Pftraced::new(&dir, &["work"])
        .arg("--socket")
        .arg(&socket)
        .launch(&[py.as_os_str(), script.as_os_str()])
        .spawn();
    let ctl = |args: &[&str]| {
        let out = Command::new(PFTRACECTL).arg("--socket").arg(&socket).args(args).output().unwrap();
        assert!(out.status.success(), "pftracectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let pid = tracer.wait_attached_any();
    std::fs::write(dir.join("go1"), "").unwrap();
    // Step 2 with `extra` added; step 3 with `work` removed.
    std::thread::sleep(Duration::from_millis(200));
    ctl(&["add", "-t", "extra"]);
    std::fs::write(dir.join("go2"), "").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let status = ctl(&["status"]);
    assert!(status.contains(&format!("{pid}  running")) && status.contains("agent"), "{status}");
    ctl(&["remove", "-t", "work"]);
    std::fs::write(dir.join("go3"), "").unwrap();
    let run = tracer.finish();
    run.assert_code(0);
    let trace = run.trace();
    trace.assert_clean();
    // work: steps 1 and 2; extra: steps 2 and 3.
    assert_eq!(trace.counts(), BTreeMap::from([("extra", 100), ("work", 200)]), "{}", run.stderr);
}

/// The refusals: `-E`/`-I`/`-S` at launch (the command never runs), and
/// `--pid` of a running 3.11-3.13 (left running undisturbed), each with
/// its exact message and exit status 1.
#[test]
fn refusals_with_their_messages() {
    require_root();
    let dir = TestDir::new("agent-refusals");
    let py = pyenv_python("3.12.1");
    let marker = dir.join("ran");
    let code = format!("open({:?}, 'w').close()", marker.to_str().unwrap());
    for flag in ["-E", "-I", "-S"] {
        let argv = [py.to_str().unwrap(), flag, "-c", code.as_str()];
        let run = Pftraced::new(&dir, &["foo"]).launch(&argv).run();
        let msg = run.assert_refused(&[]);
        assert_eq!(
            msg,
            format!(
                "cannot trace {py:?}; it was not run: `{}` runs Python with {flag}: it then ignores PYTHONPATH or \
                 skips site, so pftrace's agent cannot load before the first line; run it without it (or trace \
                 a CPython whose USDT probes work: 3.6-3.10 or 3.15+ built --with-dtrace)",
                argv.join(" ")
            )
        );
        assert!(!marker.exists(), "the refused command ran: {msg}");
    }
    for version in ["3.11.7", "3.12.1", "3.13.0"] {
        let py = pyenv_python(version);
        let minor = &version[..4];
        let waiting =
            dir.script("waiting.py", "import sys\nprint('ready', flush=True)\nsys.stdin.readline()\n");
        let mut process = PyProcess::spawn(&py, &waiting, &[]);
        process.expect_line("ready");
        let pid = process.pid();
        let run = Pftraced::new(&dir, &["foo"]).pid(pid).run();
        let msg = run.assert_refused(&[]);
        assert_eq!(
            msg,
            format!(
                "pid {pid} runs CPython {minor} ({}), which pftrace traces through its in-process agent, and a \
                 running CPython {minor} has no way to load it (PEP 768 remote execution is 3.14+): start the \
                 program under pftraced (`pftraced -t NAME -- CMD`) or with the agent on its path (`eval \
                 \"$(pftracectl env)\"` before starting it)",
                py.display()
            )
        );
        process.send_line("done");
        let (status, _) = process.wait(Duration::from_secs(30));
        assert!(status.success(), "the refused process was disturbed: {status}");
    }
}

/// Cgroup mode with processes started after pftraced: a 3.14 gets the agent
/// through PEP 768, a 3.12 started with the `pftracectl env` line connects
/// by itself (both traced exactly from then on), and a 3.12 started without
/// it is refused with a warning while the daemon keeps serving the others.
#[test]
fn cgroup_mode_new_processes() {
    // Alone: a dormant link on the interpreter file (common/serial.rs).
    let _serial = serial();
    require_root();
    let dir = TestDir::new("agent-cgroup");
    let script = call_kinds_workload(&dir);
    let cg = Cgroup::new("agent");
    let socket = socket_of(&dir);
    let tracer = serving(&dir, NAMES).arg("--cgroup").arg(cg.path()).spawn();
    wait_serving(&socket, &tracer);
    let line = ctl_ok(&socket, &["env"]);
    let line = line.trim();
    assert!(
        line.starts_with("export PYTHONPATH=/run/pftrace/agent.")
            && line.contains("${PYTHONPATH:+:$PYTHONPATH} PFTRACE_AGENT_SOCKET=/run/pftrace/agent."),
        "{line}"
    );
    let start = |py: &Path, go: &Path, env_line: &str, label: &str| {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", r#"echo $$ > "$0/cgroup.procs" && eval "$PFLINE" && exec "$@""#])
            .arg(cg.path())
            .arg(py)
            .arg(&script)
            .arg(go)
            .env("PFLINE", env_line);
        let p = PyProcess::start(&mut cmd, label.into());
        p.expect_line("ready");
        p
    };
    let (go_a, go_b, go_c) = (dir.join("go-a"), dir.join("go-b"), dir.join("go-c"));
    let mut a = start(&sid_python("3.14"), &go_a, "", "3.14, PEP 768");
    let mut b = start(&pyenv_python("3.12.1"), &go_b, line, "3.12 with the env line");
    let mut c = start(&pyenv_python("3.12.1"), &go_c, "", "3.12 without the agent");
    let (pa, pb, pc) = (a.pid(), b.pid(), c.pid());
    for pid in [pa, pb] {
        wait_status(&socket, tracer.pid(), &format!("the agent of {pid} tracing"), |s| {
            process_entry(s, pid).is_some_and(|p| p["agent_tracing"] == true && p["mechanism"] == "agent")
        });
    }
    let status = wait_status(&socket, tracer.pid(), &format!("{pc} refused"), |s| {
        s["refused"].as_array().unwrap().iter().any(|r| r["pid"] == pc)
    });
    let reason =
        status["refused"].as_array().unwrap().iter().find(|r| r["pid"] == pc).unwrap()["reason"].clone();
    assert_eq!(
        reason,
        format!(
            "pid {pc} runs CPython 3.12 ({}), which pftrace traces through its in-process agent; it was started \
             without it and a running CPython 3.12 cannot load it: start the program under pftraced (`pftraced -t \
             NAME -- CMD`) or with the agent on its path (`eval \"$(pftracectl env)\"` before starting it)",
            pyenv_python("3.12.1").display()
        )
    );
    let mut outputs = Vec::new();
    for (p, go) in [(&mut a, &go_a), (&mut b, &go_b), (&mut c, &go_c)] {
        std::fs::write(go, "").unwrap();
        let (st, out) = p.wait(Duration::from_secs(60));
        assert!(st.success(), "{st}");
        outputs.push(out);
    }
    let trace = dump(&socket);
    trace.assert_clean();
    for (pid, out, label) in [(pa, &outputs[0], "3.14"), (pb, &outputs[1], "3.12 env line")] {
        let want = recorded(out);
        check_recorder(label, &want);
        let mut got = BTreeMap::new();
        for call in trace.calls.iter().filter(|c| c.pid == pid) {
            *got.entry((call.tid, call.name.clone())).or_insert(0usize) += 1;
        }
        assert_eq!(got, want, "{label}: calls per thread and function");
    }
    assert!(trace.calls.iter().all(|c| c.pid != pc), "the refused process has calls");
    let run = stop(&socket, tracer);
    run.assert_code(0);
}

/// Agent records are untrusted input: a process pftraced did not accept
/// that calls the installed agent's probe function itself (ctypes) gets
/// nothing into the trace; the kernel drops its 200 reports and counts them.
#[test]
fn reports_of_processes_not_accepted_are_dropped_and_counted() {
    require_root();
    let py = pyenv_python("3.12.1");
    let dir = TestDir::new("agent-foreign");
    let script = dir.script(
        "victim.py",
        r#"
        import os, time
        def work(): return 1
        while not os.path.exists(os.path.join(os.path.dirname(__file__), "go")):
            time.sleep(0.002)
        for _ in range(10): work()
        "#,
    );
    let tracer = Pftraced::new(&dir, &["work"]).launch(&[py.as_os_str(), script.as_os_str()]).spawn();
    let pid = tracer.wait_attached_any();
    let so = format!("/run/pftrace/agent.{}/pftrace_agent.so", tracer.pid());
    let forger = format!(
        "import ctypes\nlib = ctypes.CDLL({so:?})\nfor event in (1, 2) * 100:\n    \
         lib.pftrace_agent_probe(event, b'work', {:?}.encode(), 2)\nprint('forged', flush=True)\n",
        script.to_str().unwrap()
    );
    let out = Command::new(&py).arg("-c").arg(&forger).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "forged\n", "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(dir.join("go"), "").unwrap();
    let run = tracer.finish();
    run.assert_code(0);
    let trace = run.trace();
    trace.assert_clean();
    assert_eq!(trace.counts(), BTreeMap::from([("work", 10)]));
    assert!(trace.calls.iter().all(|c| c.pid == pid), "calls of another process");
    assert_eq!(trace.counter("agent_foreign"), 200, "the forged reports, dropped in the kernel");
    assert_eq!(trace.counter("agent_reports"), 20);
}

/// The report roads: `work` called 500 times, then 500 more, against
/// CPython's recorder; prints the agent's status (its road) before and
/// after. Mode `block`: between the halves the process installs a seccomp
/// filter refusing the agent's syscall with EPERM (the agent must go over
/// to the uprobe without losing a report). With a third argument, waits for
/// that file first (for `--pid`).
const ROADS: &str = r#"
import ctypes, os, sys, threading, time
entries = []

def profiler(frame, event, arg):
    if event == "call" and frame.f_code.co_name == "work":
        entries.append(threading.get_native_id())

def work(x):
    return x * 2

def block_report_syscall():
    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]
    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]
    # nr == SYSCALL_NR: ERRNO(EPERM); else ALLOW.
    code = (Filter * 4)((0x20, 0, 0, 0), (0x15, 0, 1, 0x706674), (0x06, 0, 0, 0x50001), (0x06, 0, 0, 0x7FFF0000))
    prog = Prog(4, code)
    libc = ctypes.CDLL(None, use_errno=True)
    ul = ctypes.c_ulong
    assert libc.prctl(38, ul(1), ul(0), ul(0), ul(0)) == 0, ctypes.get_errno()
    assert libc.prctl(22, ul(2), ctypes.byref(prog), ul(0), ul(0)) == 0, ctypes.get_errno()

def road():
    agent = sys.modules.get("pftrace_agent")
    return agent.status().split("reporting by ")[-1].split(";")[0] if agent else "no agent"

if len(sys.argv) > 2:
    print("ready", flush=True)
    while not os.path.exists(sys.argv[2]):
        time.sleep(0.002)
print("ROAD", road(), flush=True)
sys.setprofile(profiler)
for i in range(500):
    work(i)
sys.setprofile(None)
if sys.argv[1] == "block":
    block_report_syscall()
sys.setprofile(profiler)
for i in range(500):
    work(i)
sys.setprofile(None)
for tid in entries:
    print("REC", tid, "work")
print("ROAD", road())
print("DONE", flush=True)
"#;

/// The roads a run took, in order (the script's ROAD lines).
fn roads(stdout: &str) -> Vec<&str> {
    stdout.lines().filter_map(|l| l.strip_prefix("ROAD ")).collect()
}

/// Exact counts and the reports' total for one run of ROADS.
fn check_roads_run(label: &str, run_stdout: &str, trace: &Trace, script: &Path) {
    let want = recorded(run_stdout);
    assert_eq!(want.values().sum::<usize>(), 1000, "{label}: recorder");
    trace.assert_clean();
    assert_eq!(traced(trace, script), want, "{label}: calls per thread");
    assert_eq!(trace.counter("agent_reports"), 2000, "{label}: one entry and one return each");
    assert_eq!(trace.counter("agent_foreign") + trace.counter("agent_bad"), 0, "{label}");
}

/// By default the agent reports by uprobe (the syscall road costs every
/// syscall of the host). With `--agent-report syscall` it reports through
/// its syscall where its process has no seccomp filter; a filter installed
/// while it runs (refusing the syscall with EPERM) moves it to the uprobe
/// without losing a report; a process started
/// under a filter reports by uprobe from the first call. Exact counts
/// against CPython's recorder in each case.
#[test]
fn report_roads_uprobe_by_default_syscall_when_asked_and_seccomp_fallback() {
    require_root();
    let py = pyenv_python("3.12.1");
    for (road, mode, want_roads) in [
        (None, "plain", ["uprobe", "uprobe"]),
        (Some("syscall"), "plain", ["syscall", "syscall"]),
        (Some("syscall"), "block", ["syscall", "uprobe"]),
        (Some("uprobe"), "plain", ["uprobe", "uprobe"]),
    ] {
        let label = format!("3.12.1 launch, --agent-report {road:?}, {mode}");
        let dir = TestDir::new("agent-roads");
        let script = dir.script("roads.py", ROADS);
        let mut tracer = Pftraced::new(&dir, &["work"]);
        if let Some(road) = road {
            tracer = tracer.args(&["--agent-report", road]);
        }
        let run = tracer.launch(&[py.as_os_str(), script.as_os_str(), mode.as_ref()]).run();
        run.assert_code(0);
        assert!(run.stdout.contains("DONE"), "{label}: {}\n{}", run.stdout, run.stderr);
        assert_eq!(roads(&run.stdout), want_roads, "{label}: {}", run.stdout);
        check_roads_run(&label, &run.stdout, &run.trace(), &script);
    }
    // Started under a filter (as in a container): `--pid` on 3.14.
    let label = "3.14 --pid under a seccomp filter";
    let dir = TestDir::new("agent-roads-pid");
    let script = dir.script("roads.py", ROADS);
    let go = dir.join("go");
    let mut cmd = Command::new(sid_python("3.14"));
    cmd.arg(&script).arg("plain").arg(&go);
    unsafe {
        use std::os::unix::process::CommandExt as _;
        cmd.pre_exec(|| {
            // nr == SYSCALL_NR: ERRNO(EPERM); else ALLOW (as block_report_syscall).
            let nr = pftrace_common::agent::SYSCALL_NR as u32;
            let mut code = [
                libc::sock_filter { code: 0x20, jt: 0, jf: 0, k: 0 },
                libc::sock_filter { code: 0x15, jt: 0, jf: 1, k: nr },
                libc::sock_filter { code: 0x06, jt: 0, jf: 0, k: 0x0005_0001 },
                libc::sock_filter { code: 0x06, jt: 0, jf: 0, k: 0x7fff_0000 },
            ];
            let prog = libc::sock_fprog { len: code.len() as u16, filter: code.as_mut_ptr() };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(libc::PR_SET_SECCOMP, 2, &prog as *const libc::sock_fprog, 0, 0) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let tracer = Pftraced::new(&dir, &["work"]).args(&["--agent-report", "syscall"]);
    let (stdout, run) = traced_by_pid(label, &mut cmd, tracer, &go);
    assert_eq!(roads(&stdout), ["uprobe", "uprobe"], "{label}: {stdout}");
    check_roads_run(label, &stdout, &run.trace(), &script);
}

/// A launched Python that starts another with `-E` (launch mode checks
/// only the command it is given): the child ignores PYTHONPATH, never loads
/// the agent, and pftraced names it in a warning once it has run 10 s
/// without it. The same child started without `-E` has its 7 calls traced
/// and no such warning.
/// The two runs go side by side: each waits out the 10 s (11 s of child).
#[test]
fn a_launched_python_that_never_loads_the_agent_is_named_in_a_warning() {
    require_root();
    let py = pyenv_python("3.12.1");
    const PARENT: &str = "import subprocess, sys\n\
        flags = sys.argv[2:]\n\
        subprocess.run([sys.executable, *flags, sys.argv[1]], check=True)\n";
    const CHILD: &str = "import os, time\n\
        def work(x):\n    return x\n\
        print('PID', os.getpid(), flush=True)\n\
        for i in range(7):\n    work(i)\n\
        time.sleep(11)\n\
        print('DONE', flush=True)\n";
    let case = |flags: &[&str], warned: bool, calls: usize| {
        let label = format!("a child started with {flags:?}");
        let dir = TestDir::new("agent-never-loaded");
        let parent = dir.script("parent.py", PARENT);
        let child = dir.script("child.py", CHILD);
        let mut cmd = vec![py.as_os_str(), parent.as_os_str(), child.as_os_str()];
        cmd.extend(flags.iter().map(std::ffi::OsStr::new));
        let run = Pftraced::new(&dir, &["work"]).launch(&cmd).run();
        run.assert_code(0);
        assert!(run.stdout.contains("DONE"), "{label}: {}", run.stdout);
        let pid: u32 =
            run.stdout.lines().find_map(|l| l.strip_prefix("PID ")).expect("its pid").parse().unwrap();
        let warning = format!(
            "pid {pid} ({}) was started with pftrace's agent on its path but has not loaded it within 10s, so none \
             of its calls are traced: it may run Python with -E, -I or -S",
            py.display()
        );
        assert_eq!(run.stderr.contains(&warning), warned, "{label}: {}", run.stderr);
        assert_eq!(run.trace().calls.len(), calls, "{label}: calls of work traced");
    };
    std::thread::scope(|s| {
        s.spawn(|| case(&["-E"], true, 0));
        s.spawn(|| case(&[], false, 7));
    });
}

/// A process traced by one pftraced, then by another: the same code objects
/// run under both, and the agent (still loaded) sends their names again to
/// the second daemon. Phase 1 runs under the first pftraced; phase 2 runs
/// the same functions, from the main thread and 2 new threads, under the
/// second, with CPython's recorder on (printed as `REC tid name`).
const RESTARTED: &str = r#"
import os, sys, threading, time
TRACED = {"work", "rec", "gen_count"}
entries = []
lock = threading.Lock()

def profiler(frame, event, arg):
    if event == "call" and frame.f_code.co_name in TRACED:
        with lock:
            entries.append((threading.get_native_id(), frame.f_code.co_name))

def work(x):
    return x * 2

def rec(n):
    return 0 if n == 0 else 1 + rec(n - 1)

def gen_count(n):
    for i in range(n):
        yield i

def wait_for(path):
    while not os.path.exists(path):
        time.sleep(0.002)

def worker(record):
    if record:
        sys.setprofile(profiler)
    for i in range(200):
        work(i)
    sum(gen_count(5))
    sys.setprofile(None)

def phase(record):
    if record:
        sys.setprofile(profiler)
    for i in range(300):
        work(i)
    rec(20)
    sum(gen_count(5))
    sys.setprofile(None)
    threads = [threading.Thread(target=worker, args=(record,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

print("ready", flush=True)
wait_for(sys.argv[1])
phase(False)
print("phase1", flush=True)
wait_for(sys.argv[2])
phase(True)
for tid, name in entries:
    print("REC", tid, name)
print("DONE", flush=True)
"#;

/// `--pid` on 3.14, pftraced stopped and a new one started on the same
/// process while the agent stays loaded: the agent's strings go once per
/// code object and session, so the second pftraced must get every name
/// again. Both traces exact (the first: 700 `work`, 21 `rec` and 18
/// `gen_count` runs, 1 start + 5 resumes in each of 3 threads; the second:
/// the same, against CPython's recorder per thread), none named unknown.
#[test]
fn a_restarted_pftraced_gets_the_names_again() {
    require_root();
    // By uprobe (the default), the second pftraced must also put its uprobe
    // on the first one's copy of the agent's file, which this process keeps
    // calling (0 calls in its trace before it did); by syscall, only the
    // new session matters.
    for road in ["uprobe", "syscall"] {
        restarted_pftraced_gets_the_names_again(road);
    }
}

fn restarted_pftraced_gets_the_names_again(road: &str) {
    let py = sid_python("3.14");
    let dir = TestDir::new(&format!("agent-restart-{road}"));
    let script = dir.script("restarted.py", RESTARTED);
    let (go1, go2) = (dir.join("go1"), dir.join("go2"));
    let mut cmd = Command::new(&py);
    cmd.arg(&script).arg(&go1).arg(&go2);
    let label = format!("debian 3.14, pftraced restarted, {road} road");
    let label = label.as_str();
    let mut process = PyProcess::start(&mut cmd, label.to_string());
    process.expect_line("ready");
    let names = ["work", "rec", "gen_count"];
    let road = ["--agent-report", road];
    let first = Pftraced::new(&dir, &names).args(&road).pid(process.pid()).spawn();
    assert!(first.wait_attached(process.pid()).contains("in-process agent"), "{label}");
    std::fs::write(&go1, "").unwrap();
    process.expect_line("phase1");
    kill(first.pid(), libc::SIGINT);
    let run1 = first.finish();
    run1.assert_code(0);
    let trace1 = run1.trace();
    trace1.assert_clean();
    assert_eq!(
        trace1.counts(),
        BTreeMap::from([("gen_count", 18), ("rec", 21), ("work", 700)]),
        "{label}: the first pftraced's trace"
    );
    let second = Pftraced::new(&dir, &names).args(&road).pid(process.pid()).spawn();
    assert!(second.wait_attached(process.pid()).contains("in-process agent"), "{label}");
    std::fs::write(&go2, "").unwrap();
    let (status, stdout) = process.wait(Duration::from_secs(60));
    assert!(status.success(), "{label}: {status}");
    let run2 = second.finish();
    run2.assert_code(0);
    let want = recorded(&stdout);
    let total = |name: &str| want.iter().filter(|((_, n), _)| n == name).map(|(_, c)| c).sum::<usize>();
    assert_eq!((total("work"), total("rec"), total("gen_count")), (700, 21, 18), "{label}: recorder");
    let trace2 = run2.trace();
    trace2.assert_clean();
    assert_eq!(trace2.counter("agent_unnamed"), 0, "{label}");
    assert_eq!(
        traced(&trace2, &script),
        want,
        "{label}: the second pftraced's calls per thread and function"
    );
}

/// A hostile traced process: past its own calls of `work`, it reports
/// (through the agent's probe function, which any code in it can call)
/// 1,100 code objects with 4,000-byte file names, each called twice, the
/// strings sent once. pftraced keeps 4 MiB of names a process (each charged
/// name + file + 72 bytes): the code objects that fit are named, every call
/// of the others is `<unknown: name not received>` and counted, and the
/// process is named in one warning.
#[test]
fn a_process_sending_long_names_is_bounded_in_bytes() {
    require_root();
    let py = pyenv_python("3.12.1");
    let dir = TestDir::new("agent-bytes");
    let script = dir.script(
        "flood.py",
        r#"
        import ctypes, sys, time
        def work(): return 1
        for _ in range(10): work()
        probe = ctypes.CDLL(sys.modules["pftrace_agent"].__file__).pftrace_agent_probe
        u64 = ctypes.c_uint64
        probe.argtypes = [u64, ctypes.c_char_p, ctypes.c_char_p, u64, u64]
        long_file = ("/" + "x" * 3999).encode()
        for i in range(1100):
            code = (1 << 40) + i
            probe(1, b"work", long_file, 7, code)  # START with strings
            probe(4, None, None, 7, code)  # RETURN
            probe(1, None, None, 7, code)
            probe(4, None, None, 7, code)
            if i % 50 == 49:
                time.sleep(0.005)  # let pftraced drain the 4.2 KB records
        print("DONE", flush=True)
        "#,
    );
    let run = Pftraced::new(&dir, &["work"])
        .env("PFTRACE_AGENT_REPORT", "uprobe")
        .launch(&[py.as_os_str(), script.as_os_str()])
        .run();
    run.assert_code(0);
    assert!(run.stdout.contains("DONE"), "{}", run.stdout);
    let pid = run.attached_pid();
    let trace = run.trace();
    trace.assert_clean();
    // What pftraced charges: the real `work` first, then 4 + 4000 + 72 a
    // forged code object, within 4 MiB.
    let real = (4 + script.to_str().unwrap().len() + 72) as u64;
    let kept = ((4u64 << 20) - real) / (4 + 4000 + 72);
    let unknown = 2 * (1100 - kept);
    let counts = trace.counts();
    assert_eq!(
        counts,
        BTreeMap::from([
            ("work", 10 + 2 * kept as usize),
            ("<unknown: name not received>", unknown as usize)
        ]),
    );
    assert_eq!(
        trace.calls.iter().filter(|c| c.name == "work" && c.file.len() == 4000).count() as u64,
        2 * kept
    );
    assert_eq!(trace.counter("agent_unnamed"), unknown);
    assert_eq!(trace.counter("agent_reports"), 2 * 10 + 4 * 1100);
    // Each forged first report needed the long record; `work`'s did not.
    assert_eq!(trace.counter("long_files"), 1100);
    let warning = format!(
        "pid {pid}: the in-process agent's names reached pftraced's bound of 4 MiB of names a process"
    );
    assert_eq!(run.stderr.matches(&warning).count(), 1, "{}", run.stderr);
    eprintln!("{kept} of 1100 long-named code objects kept, {unknown} calls unknown");
}
