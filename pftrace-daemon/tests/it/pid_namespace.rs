//! pftraced in a PID namespace of its own (`unshare --pid --fork
//! --mount-proc`, as in a container): the kernel's pids are the host's, so
//! the eBPF programs number processes and threads as pftraced's namespace
//! does. Checked against what each traced Python prints about itself:
//! - launch mode, both attach methods: the process, a thread and a forked
//!   child, each with its own numbers and exact counts;
//! - a Python in a namespace nested inside pftraced's: traced under the
//!   numbers pftraced's namespace gives it (what its /proc/self/status says);
//! - `--all` (probes on the whole binary): a Python on the host running the
//!   same binary is outside the namespace and never recorded, counted as
//!   out of scope in the kernel;
//! - with the host's /proc (no `--mount-proc`) pftraced refuses at start.

use crate::common;

use std::{collections::BTreeMap, fs, path::Path, thread, time::Instant};

use crate::common::*;

/// pftraced as PID 1 of a new PID namespace with its own /proc.
const UNSHARE: [&str; 4] = ["unshare", "--pid", "--fork", "--mount-proc"];

fn calls_per_pid_tid(trace: &Trace, name: &str) -> BTreeMap<(u32, u32), u64> {
    let mut m = BTreeMap::new();
    for c in trace.named(name) {
        *m.entry((c.pid, c.tid)).or_default() += 1;
    }
    m
}

/// The numbers after `word` on its line of `out` (e.g. "child 3" -> [3]).
fn printed(out: &str, word: &str) -> Vec<u32> {
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix(word).map(str::to_string))
        .unwrap_or_else(|| panic!("no `{word}` line in the script's output:\n{out}"));
    line.split_whitespace().map(|w| w.parse().unwrap_or_else(|e| panic!("{w:?} in {line:?}: {e}"))).collect()
}

/// A process of 103 calls (100 before a fork, 3 after), a thread of 11 and
/// a forked child of 7; each prints the numbers its namespace gives it.
const FAMILY: &str = r#"
    import os, threading, time

    def foo():
        pass

    for _ in range(100):
        foo()

    def worker():
        for _ in range(11):
            foo()
        print("thread", os.getpid(), threading.get_native_id(), flush=True)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    child = os.fork()
    if child == 0:
        time.sleep(0.3)  # pftraced attaches to a new process a few ms after its fork
        for _ in range(7):
            foo()
        print("child", os.getpid(), flush=True)
        os._exit(0)
    _, status = os.waitpid(child, 0)
    assert status == 0, status
    for _ in range(3):
        foo()
    print("parent", os.getpid(), flush=True)
"#;

fn family_in_a_namespace(method: Option<&str>) {
    let _serial = serial();
    require_tool("unshare", "util-linux");
    let dir = TestDir::new("pidns-family");
    let script = dir.script("family.py", FAMILY);
    let mut daemon = Pftraced::new(&dir, &["foo"]).wrapped(&UNSHARE);
    if let Some(method) = method {
        daemon = daemon.env("PFTRACE_UPROBE_ATTACH", method);
    }
    let run = daemon.launch(&[python().as_os_str(), script.as_os_str()]).run();
    run.assert_code(0);
    let parent = printed(&run.stdout, "parent ")[0];
    let child = printed(&run.stdout, "child ")[0];
    let thread = printed(&run.stdout, "thread ");
    // pftraced is PID 1 of the namespace; its threads (tokio's, the code
    // resolver's) take the next numbers, then the Python it starts: a small
    // number, where the host's would be in the thousands here.
    assert_eq!(run.attached_pid(), parent, "{}", run.stderr);
    assert!((2..=32).contains(&parent), "the Python is pid {parent} in the namespace\n{}", run.stderr);
    assert_eq!(thread[0], parent, "the thread's process");
    let trace = run.trace();
    trace.assert_clean();
    assert_eq!(
        calls_per_pid_tid(&trace, "foo"),
        BTreeMap::from([((parent, parent), 103), ((parent, thread[1]), 11), ((child, child), 7)]),
        "calls per (pid, tid) as the namespace numbers them; stderr:\n{}",
        run.stderr
    );
    let mut pids = trace.process_pids();
    pids.sort();
    assert_eq!(pids, [parent, child]);
}

#[test]
fn launch_in_a_pid_namespace_numbers_process_thread_and_child_as_the_namespace_does() {
    family_in_a_namespace(None);
}

#[test]
fn launch_in_a_pid_namespace_through_uprobe_perf_events() {
    family_in_a_namespace(Some("perf"));
}

#[test]
fn python_in_a_namespace_nested_in_pftraceds_gets_the_numbers_of_pftraceds() {
    let _serial = serial();
    require_tool("unshare", "util-linux");
    let dir = TestDir::new("pidns-nested");
    // /proc stays pftraced's: NSpid lists the number there first, then the inner one.
    dir.script(
        "inner.py",
        r#"
        import os, time

        def foo():
            pass

        time.sleep(0.3)  # found at its exec, attached a few ms later
        for _ in range(40):
            foo()
        nspid = [l.split()[1:] for l in open("/proc/self/status") if l.startswith("NSpid:")][0]
        print("inner", os.getpid(), *nspid, flush=True)
        "#,
    );
    let outer = dir.script(
        "outer.py",
        r#"
        import os, subprocess, sys

        def foo():
            pass

        here = os.path.dirname(os.path.abspath(__file__))
        subprocess.run(["unshare", "--pid", "--fork", sys.executable, os.path.join(here, "inner.py")], check=True)
        for _ in range(5):
            foo()
        print("outer", os.getpid(), flush=True)
        "#,
    );
    let run = Pftraced::new(&dir, &["foo"])
        .wrapped(&UNSHARE)
        .launch(&[python().as_os_str(), outer.as_os_str()])
        .run();
    run.assert_code(0);
    let outer_pid = printed(&run.stdout, "outer ")[0];
    let inner = printed(&run.stdout, "inner ");
    // [getpid in its own namespace, number in pftraced's, number in its own]
    assert_eq!((inner[0], inner.len()), (1, 3), "the inner Python is PID 1 of a namespace below pftraced's");
    let inner_pid = inner[1];
    let trace = run.trace();
    trace.assert_clean();
    assert_eq!(
        calls_per_pid_tid(&trace, "foo"),
        BTreeMap::from([((outer_pid, outer_pid), 5), ((inner_pid, inner_pid), 40)]),
        "stderr:\n{}",
        run.stderr
    );
}

#[test]
fn host_processes_are_outside_a_namespaced_daemons_view_even_with_probes_on_the_whole_binary() {
    let _serial = serial();
    require_tool("unshare", "util-linux");
    let dir = TestDir::new("pidns-all");
    let py = python();
    let socket = socket_of(&dir);
    let (go, done, end) = (dir.join("go"), dir.join("inner.out"), dir.join("end"));
    let inner = dir.script(
        "inner.py",
        r#"
        import os, sys, time

        def foo():
            pass

        go, end = sys.argv[1], sys.argv[2]
        print("ready", os.getpid(), flush=True)
        while not os.path.exists(go):
            time.sleep(0.01)
        for _ in range(1234):
            foo()
        print("done", flush=True)
        while not os.path.exists(end):
            time.sleep(0.01)
        "#,
    );
    // In the namespace: the Python first (pid 2), then pftraced replaces the shell (pid 1).
    let start_inner = r#""$PY" "$INNER" "$GO" "$END" > "$OUT" 2>&1 & exec "$0" "$@""#;
    let mut host = WorkerSpec::new(&py, &worker_script(&dir)).start("a Python on the host");
    let tracer = serving(&dir, &["foo"])
        .arg("--all")
        .wrapped(&[&UNSHARE[..], &["/bin/sh", "-c", start_inner]].concat())
        .env("PY", &py)
        .env("INNER", &inner)
        .env("GO", &go)
        .env("END", &end)
        .env("OUT", &done)
        .spawn();
    let status = wait_status(&socket, tracer.pid(), "the namespace's Python to be traced", |s| {
        process_entry(s, 2).is_some_and(|p| p["running"] == true)
    });
    assert_eq!(status_pids(&status), [2], "only the namespace's Python is listed:\n{status:#}");
    assert_eq!(fs::read_to_string(&done).unwrap(), "ready 2\n");

    // The host Python calls foo the whole time the namespace's one does.
    let stop_host = dir.join("stop-host");
    host.send(&format!("loop foo {}", stop_host.display()));
    fs::write(&go, "").unwrap();
    let deadline = Instant::now() + WAIT;
    while !fs::read_to_string(&done).unwrap().contains("done") {
        assert!(
            Instant::now() < deadline,
            "the namespace's Python did not finish: {:?}",
            fs::read_to_string(&done)
        );
        thread::sleep(std::time::Duration::from_millis(10));
    }
    fs::write(&stop_host, "").unwrap();
    let host_calls: u64 = host.expect("done").parse().unwrap();
    assert!(host_calls >= 1000, "the host Python made {host_calls} calls");

    let live = dump(&socket);
    assert_eq!(counts(&live.calls), expected(&[(2, "foo", 1234)]), "dump: only the namespace's calls");
    let counters = &common::status(&socket)["counters"];
    let out_of_scope = counters["out_of_scope"].as_u64().unwrap();
    assert!(
        out_of_scope >= 2 * host_calls,
        "the host Python's {host_calls} calls (entry and return) are dropped in the kernel: {counters:#}"
    );
    fs::write(&end, "").unwrap();
    let run = stop(&socket, tracer);
    let trace = run.trace();
    trace.assert_clean();
    assert_eq!(counts(&trace.calls), expected(&[(2, "foo", 1234)]), "the -o trace");
    host.finish();
}

#[test]
fn with_the_hosts_proc_in_its_own_namespace_pftraced_refuses_at_start() {
    let _serial = serial();
    require_tool("unshare", "util-linux");
    let dir = TestDir::new("pidns-refuse");
    let ran = dir.join("ran");
    let script = dir.script("mark.py", &format!("open({:?}, 'w').close()\n", ran.display().to_string()));
    let run = Pftraced::new(&dir, &["foo"])
        .wrapped(&["unshare", "--pid", "--fork"])
        .launch(&[python().as_os_str(), script.as_os_str()])
        .run();
    run.assert_refused(&[
        "/proc belongs to another PID namespace than pftraced's",
        "pftraced is pid 1",
        "--mount-proc",
    ]);
    assert!(!Path::new(&ran).exists(), "the command ran although pftraced refused");
}
