//! PEP 768 spoken by pftrace: the agent loaded into running CPython 3.14 and
//! 3.15 processes whose main thread is blocked, exact counts after it is in,
//! the refusals (PYTHON_DISABLE_REMOTE_DEBUG, -X disable-remote-debug, 3.11-3.13)
//! and a withdrawn request when no thread runs Python.

mod common;

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{Host, finish, interpreters, interpreters_314, scripts_dir, serial};
use pftrace_agent_host::remote::{self, RemoteError};

/// A target process, killed and reaped when dropped, so a failed assertion
/// leaves nothing running (one left by a timed-out run of this test held
/// the test lock's inherited descriptor, and kept the next tests waiting).
struct Target(Option<Child>);

impl Target {
    fn into_child(mut self) -> Child {
        self.0.take().expect("a target's child")
    }
}

impl std::ops::Deref for Target {
    type Target = Child;
    fn deref(&self) -> &Child {
        self.0.as_ref().expect("a target's child")
    }
}

impl std::ops::DerefMut for Target {
    fn deref_mut(&mut self) -> &mut Child {
        self.0.as_mut().expect("a target's child")
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            kill(child);
        }
    }
}

fn spawn(python: &std::path::Path, args: &[&str], env: &[(&str, &str)], xopt: Option<&str>) -> Target {
    let mut cmd = Command::new(python);
    cmd.stdin(Stdio::piped());
    if let Some(x) = xopt {
        cmd.args(["-X", x]);
    }
    cmd.arg(scripts_dir().join("remote_target.py")).args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = Target(Some(cmd.spawn().unwrap()));
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "READY");
    child
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Exactly `n` entries and `n` returns of `work` reached the host from `pid`.
fn assert_work_traced(host: &mut Host, pid: u32, n: usize, label: &str) {
    let records = host.records(pid);
    let entries = records.iter().filter(|r| r.entry && r.name == "work").count();
    let returns = records.iter().filter(|r| !r.entry && r.name == "work").count();
    assert_eq!((entries, returns), (n, n), "{label}");
}

#[test]
fn loads_into_a_running_process_whose_main_thread_is_blocked() {
    let _g = serial();
    let mut host = Host::new("remote");
    let script = host.installed.attach_script();
    for (label, python) in interpreters_314() {
        let child = spawn(&python, &["spin", "1000"], &[], None);
        let pid = child.id();
        let t0 = Instant::now();
        let delivered = remote::run_script(pid, &script, Duration::from_secs(5)).unwrap();
        assert!(delivered.gil_holder, "{label}: aimed at the thread running Python");
        let _conn = host.accept(pid, &["work"]);
        let loaded = t0.elapsed();
        let out = finish(child.into_child(), label);
        assert!(out.contains("CALLED 1000"), "{label}: {out}");
        assert_work_traced(&mut host, pid, 1000, label);
        eprintln!(
            "{label}: script taken after {:?}, agent tracing {loaded:?} after the request",
            delivered.after
        );
    }
}

/// The thread that last held the GIL blocks for good (the main thread in
/// `join()`), and another thread runs Python only later: the request,
/// aimed first at the blocked one, is aimed again until the running one
/// takes it. Aimed only at the holder, it waited there until the timeout
/// (in 1 of 3 runs of the test above before its READY moved to the worker).
#[test]
fn a_request_aimed_at_a_thread_that_blocked_for_good_is_aimed_again() {
    let _g = serial();
    let mut host = Host::new("remote-handoff");
    let script = host.installed.attach_script();
    for (label, python) in interpreters_314() {
        let mut child = spawn(&python, &["handoff", "300"], &[], None);
        let pid = child.id();
        // The main thread is in join() 0.1 s after its READY; the worker
        // starts running Python 0.4 s after it, while the request waits.
        std::thread::sleep(Duration::from_millis(100));
        let mut stdin = child.stdin.take().expect("the target's stdin");
        let wake = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            use std::io::Write as _;
            stdin.write_all(b"go\n").unwrap();
            stdin
        });
        let delivered = remote::run_script(pid, &script, Duration::from_secs(5)).unwrap();
        let _stdin = wake.join().unwrap();
        assert!(
            delivered.aims > 1 && delivered.after >= Duration::from_millis(250),
            "{label}: taken by the first thread aimed at, the blocked main thread? {delivered:?}"
        );
        let _conn = host.accept(pid, &["work"]);
        let out = finish(child.into_child(), label);
        assert!(out.contains("CALLED 300"), "{label}: {out}");
        assert_work_traced(&mut host, pid, 300, label);
        eprintln!("{label}: taken after {:?}, {} aims", delivered.after, delivered.aims);
    }
}

#[test]
fn refusals_are_clear_and_do_not_hang() {
    let _g = serial();
    common::require_root();
    let tmp = common::TempDir::new("refuse");
    let script = tmp.0.join("never.py");
    std::fs::write(&script, "raise SystemExit('must not run')\n").unwrap();
    for (label, python) in interpreters_314() {
        for (env, xopt) in
            [(&[("PYTHON_DISABLE_REMOTE_DEBUG", "1")][..], None), (&[][..], Some("disable-remote-debug"))]
        {
            let mut child = spawn(&python, &["spin", "1"], env, xopt);
            let t0 = Instant::now();
            let err = remote::run_script(child.id(), &script, Duration::from_secs(5)).unwrap_err();
            assert!(t0.elapsed() < Duration::from_secs(1), "{label}: refusal took {:?}", t0.elapsed());
            assert!(matches!(err, RemoteError::Disabled { .. }), "{label}: {err}");
            let msg = err.to_string();
            assert!(
                msg.contains("refuses remote debugging") && msg.contains("pftracectl env"),
                "{label}: {msg}"
            );
            kill(&mut child);
        }
        // Nothing runs Python: the request times out and is withdrawn.
        let child = spawn(&python, &["sleep", "3"], &[], None);
        // Let it get from its print into the sleep.
        std::thread::sleep(Duration::from_millis(300));
        let err = remote::run_script(child.id(), &script, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, RemoteError::Timeout { .. }), "{label}: {err}");
        let out = finish(child.into_child(), label);
        assert!(out.contains("WOKE False"), "{label}: the withdrawn script ran later: {out}");
    }
    // 3.11-3.13: no entry point; the message says what works.
    for (label, python) in
        interpreters().into_iter().filter(|(l, _)| !l.ends_with("3.14") && !l.ends_with("3.15"))
    {
        let mut child = spawn(&python, &["spin", "1"], &[], None);
        let err = remote::run_script(child.id(), &script, Duration::from_secs(2)).unwrap_err();
        assert!(matches!(err, RemoteError::TooOld { .. } | RemoteError::NoRuntime { .. }), "{label}: {err}");
        assert!(err.to_string().contains("pftracectl env"), "{label}: {err}");
        eprintln!("{label}: {err}");
        kill(&mut child);
    }
}
