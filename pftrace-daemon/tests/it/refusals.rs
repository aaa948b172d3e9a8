//! Processes pftraced cannot trace, and missing privileges: each is refused
//! with its own message (from src/target.rs and src/caps.rs), exit status 1,
//! nothing attached, no trace written, and a launched command never run.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::common::*;

/// What every version refusal recommends (python::WHAT_WORKS).
const WHAT_WORKS: &str = "CPython 3.11 or later (any build), or 3.6-3.10 built with --with-dtrace";
/// What `--binary` refusals recommend (python::USDT_WORKS).
const USDT_WORKS: &str = "CPython 3.6-3.10 or 3.15+ built with --with-dtrace (CPython 3.11+ is traced per \
                          process, through the in-process agent: --pid, --cgroup or a command)";

/// Python code that proves whether the command ran: it creates `marker`.
fn marker_code(marker: &Path) -> String {
    format!("open({:?}, 'w').close()", marker.to_str().unwrap())
}

/// Launches `python -c <create marker>` under pftraced and asserts it is
/// refused with `parts` in the message and that the command never ran.
fn refused_at_launch(dir: &TestDir, python: &Path, parts: &[&str]) -> String {
    let marker = dir.join("launch-ran");
    let code = marker_code(&marker);
    let run = Pftraced::new(dir, &["foo"]).launch(&[python.as_os_str(), "-c".as_ref(), code.as_ref()]).run();
    let msg = run.assert_refused(parts);
    assert!(msg.contains(&format!("cannot trace {:?}; it was not run", python)), "{msg}");
    assert!(!marker.exists(), "the refused command ran: {msg}");
    msg
}

/// Starts `python` on a script that waits for stdin, then asserts `--pid`
/// refuses it with `parts` in the message and leaves it running.
fn refused_by_pid(dir: &TestDir, python: &Path, parts: &[&str]) -> String {
    let script = dir.script(
        "waiting.py",
        r#"
        import sys
        print("ready", flush=True)
        sys.stdin.readline()
        "#,
    );
    let mut py = PyProcess::spawn(python, &script, &[]);
    py.expect_line("ready");
    let run = Pftraced::new(dir, &["foo"]).pid(py.pid()).run();
    let msg = run.assert_refused(parts);
    assert!(msg.contains(&format!("pid {} runs", py.pid())), "{msg}");
    // pftraced leaves a process it will not trace alone.
    py.send_line("done");
    let (status, _) = py.wait(Duration::from_secs(30));
    assert!(status.success(), "the refused process was disturbed: {status}");
    msg
}

#[test]
fn pid_not_found() {
    let dir = TestDir::new("ref-nopid");
    assert!(!pid_exists(4_000_000), "pid 4000000 exists on this machine");
    let run = Pftraced::new(&dir, &["foo"]).pid(4_000_000).run();
    run.assert_refused(&["no process with pid 4000000", "(check the pid with `ps -p 4000000`)"]);
}

#[test]
fn not_python_launched() {
    let dir = TestDir::new("ref-sleep-launch");
    let started = Instant::now();
    let run = Pftraced::new(&dir, &["foo"]).launch(&["/bin/sleep", "5"]).run();
    let msg = run.assert_refused(&[
        "cannot trace \"/bin/sleep\"; it was not run",
        "which is not a CPython interpreter (no python executable or libpython found); \
         pftraced traces CPython processes",
    ]);
    assert!(msg.contains("runs /usr/bin/sleep,") || msg.contains("runs /bin/sleep,"), "{msg}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "pftraced waited for sleep instead of refusing at once ({:?})",
        started.elapsed()
    );
    // The stopped child was killed and reaped, not left behind.
    let pid: u32 = msg
        .split("pid ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {msg}"));
    let left = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    assert_ne!(left, b"/bin/sleep\x005\x00", "the refused sleep (pid {pid}) is still there");
}

#[test]
fn not_python_by_pid() {
    let dir = TestDir::new("ref-sleep-pid");
    let mut sleep =
        Guard::spawn(Command::new("/bin/sleep").arg("30").stdin(Stdio::null()).stdout(Stdio::null()), false);
    // Until exec has happened /proc/PID/exe may still be the test binary.
    let deadline = Instant::now() + Duration::from_secs(10);
    while fs::read_link(format!("/proc/{}/exe", sleep.pid()))
        .map_or(true, |e| !e.to_string_lossy().ends_with("/sleep"))
    {
        assert!(Instant::now() < deadline, "sleep did not start");
        std::thread::sleep(Duration::from_millis(5));
    }
    let run = Pftraced::new(&dir, &["foo"]).pid(sleep.pid()).run();
    run.assert_refused(&[&format!("pid {} runs", sleep.pid()), "sleep, which is not a CPython interpreter"]);
    assert!(sleep.try_wait().is_none(), "pftraced disturbed the sleep");
}

/// pyenv's CPython 3.9, built without --with-dtrace (and --enable-shared).
#[test]
fn python_without_usdt_notes() {
    let py = require_file(
        "/root/.pyenv/versions/3.9.18/bin/python3.9",
        "pyenv's CPython 3.9.18, built without --with-dtrace",
    );
    let dir = TestDir::new("ref-nonotes");
    let parts = [
        "runs CPython 3.9 (/root/.pyenv/versions/3.9.18/bin/python3.9), which has no USDT probes: \
         it was built without --with-dtrace",
        WHAT_WORKS,
    ];
    refused_at_launch(&dir, &py, &parts);
    refused_by_pid(&dir, &py, &parts);
}

fn copy_executable(from: &Path, to: &Path) {
    fs::create_dir_all(to.parent().unwrap()).unwrap();
    fs::copy(from, to).unwrap_or_else(|e| panic!("copying {} to {}: {e}", from.display(), to.display()));
    fs::set_permissions(to, fs::Permissions::from_mode(0o755)).unwrap();
}

fn has_section(path: &Path, name: &str) -> bool {
    use object::Object as _;
    let data = fs::read(path).unwrap();
    let file = object::File::parse(&*data)
        .unwrap_or_else(|e| panic!("{} is not an object file: {e}", path.display()));
    file.section_by_name(name).is_some()
}

/// The probe-enabled python with its `.note.stapsdt` removed (objcopy) is
/// refused for lack of notes; an unmodified copy at a similar path is traced,
/// so the refusal comes from the notes, not from the path.
#[test]
fn python_with_notes_removed_by_objcopy() {
    let objcopy = require_tool("objcopy", "binutils");
    let dir = TestDir::new("ref-objcopy");
    let original = python().canonicalize().expect("resolving the probe-enabled python");
    assert!(has_section(&original, ".note.stapsdt"), "{} has no .note.stapsdt", original.display());
    let stripped: PathBuf = dir.join("stripped/bin/python3.9");
    fs::create_dir_all(stripped.parent().unwrap()).unwrap();
    let out = Command::new(&objcopy)
        .arg("--remove-section")
        .arg(".note.stapsdt")
        .arg(&original)
        .arg(&stripped)
        .output()
        .expect("running objcopy");
    assert!(out.status.success(), "objcopy failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!has_section(&stripped, ".note.stapsdt"));

    let msg = refused_at_launch(
        &dir,
        &stripped,
        &[
            &format!(
                "runs CPython 3.9 ({}), which has no USDT probes: it was built without --with-dtrace",
                stripped.display()
            ),
            WHAT_WORKS,
        ],
    );
    assert!(!msg.contains("runs CPython 3.11") && !msg.contains("removed"), "{msg}");

    // Control: an unmodified copy beside it is traced (PYTHONHOME lets the
    // copy find the standard library of the original).
    let intact = dir.join("intact/bin/python3.9");
    copy_executable(&original, &intact);
    let home = original.parent().unwrap().parent().unwrap();
    let script = dir.script(
        "control.py",
        r#"
        def foo():
            pass
        for _ in range(9):
            foo()
        "#,
    );
    let run = Pftraced::new(&dir, &["foo"])
        .env("PYTHONHOME", home)
        .launch(&[intact.as_os_str(), script.as_os_str()])
        .run();
    run.assert_code(0);
    let trace = run.trace();
    trace.assert_clean();
    assert_eq!(trace.named("foo").len(), 9);
    assert!(
        run.stderr.contains(&format!("(CPython 3.9, {}), tracing foo", intact.display())),
        "{}",
        run.stderr
    );
}

// CPython 3.11-3.14 (pyenv's, without probes, and Debian's 3.11 with its
// broken entry probe) are traced through the in-process agent: tests/it/agent.rs
// has their launch-mode traces and the refusal of a running 3.11-3.13.

/// The effective capability set a `setpriv` wrapper leaves a program.
fn cap_eff_under(wrapper: &[&str]) -> u64 {
    let out = Command::new(wrapper[0])
        .args(&wrapper[1..])
        .args(["/bin/grep", "^CapEff:", "/proc/self/status"])
        .output()
        .expect("running setpriv");
    assert!(out.status.success(), "{wrapper:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    u64::from_str_radix(text.trim().trim_start_matches("CapEff:").trim(), 16)
        .unwrap_or_else(|e| panic!("bad CapEff line {text:?}: {e}"))
}

const CAP_SYS_ADMIN: u64 = 1 << 21;
const CAP_PERFMON: u64 = 1 << 38;
const CAP_BPF: u64 = 1 << 39;

#[test]
fn not_root() {
    let setpriv = require_tool("setpriv", "util-linux");
    let setpriv = setpriv.to_str().unwrap();
    let wrapper = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"];
    assert_eq!(cap_eff_under(&wrapper), 0, "setpriv did not drop root");
    let dir = TestDir::new("ref-notroot");
    let py = python();
    let run = Pftraced::new(&dir, &["foo"])
        .wrapped(&wrapper)
        .launch(&[py.as_os_str(), "-c".as_ref(), "pass".as_ref()])
        .run();
    run.assert_refused(&[
        "pftraced needs root (CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN) to load eBPF programs and \
         attach uprobes; run it with sudo",
    ]);
}

/// Root without some of CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN: the message names each one missing.
#[test]
fn root_without_cap_bpf() {
    let setpriv = require_tool("setpriv", "util-linux");
    let setpriv = setpriv.to_str().unwrap();
    let dir = TestDir::new("ref-nocapbpf");
    let py = python();
    let marker = dir.join("ran");
    let code = marker_code(&marker);
    for (drop, missing) in [
        ("-bpf,-sys_admin", "pftraced is missing CAP_BPF and CAP_SYS_ADMIN;"),
        ("-bpf,-sys_admin,-perfmon", "pftraced is missing CAP_BPF and CAP_PERFMON and CAP_SYS_ADMIN;"),
        ("-sys_admin", "pftraced is missing CAP_SYS_ADMIN;"),
    ] {
        let bounding = format!("--bounding-set={drop}");
        let wrapper = [setpriv, "--inh-caps=-all", &bounding];
        let caps = cap_eff_under(&wrapper);
        assert_eq!(caps & CAP_SYS_ADMIN, 0, "setpriv {drop} left {caps:#x}");
        if drop.contains("-bpf") {
            assert_eq!(caps & CAP_BPF, 0, "setpriv {drop} left {caps:#x}");
        }
        let run = Pftraced::new(&dir, &["foo"])
            .wrapped(&wrapper)
            .launch(&[py.as_os_str(), "-c".as_ref(), code.as_ref()])
            .run();
        let msg = run.assert_refused(&[missing, "run it as root with the full capability set"]);
        if caps & CAP_PERFMON != 0 {
            assert!(!msg.contains("CAP_PERFMON"), "{msg}");
        }
        assert!(!marker.exists(), "the command ran: {msg}");
    }
}

/// `--binary` with a file that cannot be attached host-wide: refused before
/// anything is traced, naming the file and what would work.
#[test]
fn binary_flag_refusals() {
    // Alone: --binary attaches the interpreter file host-wide (common/serial.rs).
    let _serial = serial();
    let dir = TestDir::new("ref-binary");
    let py311 = require_file("/usr/bin/python3.11", "Debian's CPython 3.11 (package python3.11)");
    let missing = dir.join("no-such-python");
    let cases: [(&Path, Vec<String>); 4] = [
        (
            &missing,
            vec![format!(
                "--binary {}: No such file or directory (os error 2) (give the interpreter or libpython file",
                missing.display()
            )],
        ),
        (dir.path(), vec![format!("--binary {}: not a regular file", dir.path().display())]),
        (
            Path::new("/bin/sh"),
            vec![
                "--binary /bin/sh has no python:function__entry and function__return probes (not a CPython \
                 built --with-dtrace)"
                    .into(),
                USDT_WORKS.into(),
            ],
        ),
        (
            &py311,
            vec![
                "--binary /usr/bin/python3.11 is CPython 3.11: its python:function__entry probe fires only \
                 when a generator or coroutine resumes, not for ordinary calls (python/cpython#98894), so \
                 calls cannot be timed"
                    .into(),
                USDT_WORKS.into(),
            ],
        ),
    ];
    let mut w =
        PyProcess::spawn(&python(), &dir.script("idle.py", "import sys\nsys.stdin.readline()\n"), &[]);
    for (binary, parts) in &cases {
        let run = Pftraced::new(&dir, &["foo"]).arg("--binary").arg(binary).pid(w.pid()).run();
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        run.assert_refused(&parts);
    }
    w.send_line("");
    let (status, _) = w.wait(Duration::from_secs(30));
    assert!(status.success(), "the process was disturbed: {status}");
}
