//! Command-line mistakes are refused with a clear message before anything
//! is attached or launched.

use std::{path::Path, time::Duration};

use crate::common::*;

fn marker_code(marker: &Path) -> String {
    format!("open({:?}, 'w').close()", marker.to_str().unwrap())
}

/// Runs `pftraced -t NAME -- python -c <create marker>` and asserts it is
/// refused with `parts`, and the command never ran.
fn refused_name_at_launch(tag: &str, name: &str, parts: &[&str]) {
    let dir = TestDir::new(tag);
    let marker = dir.join("ran");
    let code = marker_code(&marker);
    let py = python();
    let run = Pftraced::new(&dir, &[name]).launch(&[py.as_os_str(), "-c".as_ref(), code.as_ref()]).run();
    run.assert_refused(parts);
    assert!(!marker.exists(), "the command ran although the name was refused");
}

#[test]
fn empty_name_is_refused() {
    // The message says the name is empty (wording: src/names.rs / bpf).
    refused_name_at_launch("cli-empty", "", &["empty", "name"]);
    // Blank and a stray comma are empty names too.
    refused_name_at_launch("cli-blank", "  ", &["empty", "name"]);
    refused_name_at_launch("cli-comma", "foo,", &["empty", "name"]);
}

#[test]
fn name_of_70_bytes_is_refused() {
    let name = "n".repeat(70);
    // The message quotes the name and gives its length and the limit.
    refused_name_at_launch("cli-long", &name, &[&format!("\"{name}\""), "70", "62 bytes"]);
    // 64 bytes is already one too many.
    let name = "m".repeat(64);
    refused_name_at_launch("cli-64", &name, &[&format!("\"{name}\""), "64", "62 bytes"]);
}

/// With --pid the bad name is reported and the running process is untouched.
#[test]
fn bad_name_with_pid_attaches_nothing() {
    let dir = TestDir::new("cli-name-pid");
    let script = dir.script(
        "waiting.py",
        r#"
        import sys
        print("ready", flush=True)
        sys.stdin.readline()
        "#,
    );
    let mut py = PyProcess::spawn(&python(), &script, &[]);
    py.expect_line("ready");
    let run = Pftraced::new(&dir, &[""]).pid(py.pid()).run();
    run.assert_refused(&["empty", "name"]);
    let run = Pftraced::new(&dir, &["ok", &"z".repeat(70)]).pid(py.pid()).run();
    run.assert_refused(&["70", "62 bytes"]);
    py.send_line("done");
    let (status, _) = py.wait(Duration::from_secs(30));
    assert!(status.success());
}

/// Targets mix: a running process (--pid) and a launched command are traced
/// in one run, which ends when both have exited, with the command's status.
#[test]
fn pid_and_command_are_traced_together() {
    let dir = TestDir::new("cli-both");
    let script = dir.script(
        "waiting.py",
        r#"
        import sys
        def foo():
            pass
        print("ready", flush=True)
        sys.stdin.readline()
        for _ in range(7):
            foo()
        "#,
    );
    let mut py = PyProcess::spawn(&python(), &script, &[]);
    py.expect_line("ready");
    let command = "def foo():\n    pass\nfor _ in range(5):\n    foo()\nimport sys; sys.exit(3)";
    let tracer = Pftraced::new(&dir, &["foo"])
        .pid(py.pid())
        .launch(&[python().as_os_str(), "-c".as_ref(), command.as_ref()])
        .spawn();
    tracer.wait_attached(py.pid());
    py.send_line("go");
    let run = tracer.finish();
    run.assert_code(3);
    let trace = run.trace();
    trace.assert_clean();
    let from_pid = trace.named("foo").iter().filter(|c| c.pid == py.pid()).count();
    let from_command = trace.named("foo").iter().filter(|c| c.pid != py.pid()).count();
    assert_eq!((from_pid, from_command), (7, 5), "{}", run.stderr);
}

#[test]
fn neither_pid_nor_command_is_refused() {
    let dir = TestDir::new("cli-neither");
    let run = Pftraced::new(&dir, &["foo"]).run();
    let msg = run.assert_refused(&["nothing to trace: give --pid PID"]);
    assert!(msg.contains("a command after `--`"), "{msg}");
}

#[test]
fn no_name_is_refused() {
    let dir = TestDir::new("cli-noname");
    let marker = dir.join("ran");
    let code = marker_code(&marker);
    let py = python();
    let run = Pftraced::new(&dir, &[]).launch(&[py.as_os_str(), "-c".as_ref(), code.as_ref()]).run();
    assert!(run.code().is_some_and(|c| c != 0), "{run:?}");
    assert!(
        run.stderr.contains("-t NAME") || run.stderr.contains("--trace <NAME>"),
        "the error should say how to name a function: {}",
        run.stderr
    );
    run.assert_not_attached();
    assert!(!marker.exists(), "the command ran");
}
