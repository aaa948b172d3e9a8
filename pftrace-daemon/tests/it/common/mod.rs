//! Harness for pftraced's integration tests: finds the probe-enabled CPython,
//! gives each test its own directory, runs pftraced (in launch or --pid
//! mode) with a timeout, parses and checks the Chrome trace it writes, and
//! keeps every process it starts under a guard that kills it on drop, so a
//! failing test leaves nothing running.
//!
//! The tests need root with BPF (they load eBPF programs and attach uprobes)
//! and a CPython 3.6-3.10 built --with-dtrace, taken from `PFTRACE_PYTHON`
//! (set by `cargo xtask test`) or the default path `cargo xtask setup`
//! builds. Missing prerequisites make the tests fail, never skip.

mod call_kinds;
mod raw_trace;
mod serial;
mod service;

pub use call_kinds::*;
pub use serial::serial;
pub use service::*;

use std::{
    borrow::Cow,
    collections::BTreeMap,
    env,
    ffi::{OsStr, OsString},
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use raw_trace::RawTrace;
use serde_json::Value;

/// The pftraced binary under test.
pub const PFTRACED: &str = env!("CARGO_BIN_EXE_pftraced");

/// Where `cargo xtask setup` puts the probe-enabled CPython.
pub const DEFAULT_PYTHON: &str = "/var/cache/pftrace/cpython-3.9-dtrace/bin/python3.9";

/// How long any single pftraced run may take before the test fails.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(90);

/// How long to wait for a line from a process (e.g. "attached", "ready").
pub const LINE_TIMEOUT: Duration = Duration::from_secs(30);

/// A Python whose worker thread execs the interpreter again: "before" calls
/// `work` 10 times, its thread 10 more and then execs the script "after",
/// which calls `work` 10 times under the main thread's id and prints
/// "after PID TID"; "parent" runs "before" as a child process (so its threads
/// start after tracing does). lifecycle.rs and cpu_slot_share.rs.
pub const EXEC_FROM_A_THREAD: &str = r#"
import os, subprocess, sys, threading, time

def work():
    return 1

def before():
    for _ in range(10):
        work()
    def run():
        for _ in range(10):
            work()
        os.execv(sys.executable, [sys.executable, __file__, "after"])
    threading.Thread(target=run).start()
    time.sleep(60)  # the exec ends this thread

def after():
    for _ in range(10):
        work()
    print("after", os.getpid(), threading.get_native_id(), flush=True)

if sys.argv[1] == "parent":
    assert subprocess.run([sys.executable, __file__, "before"]).returncode == 0
elif sys.argv[1] == "before":
    before()
else:
    after()
"#;

// ---------------------------------------------------------------------------
// Prerequisites

/// The probe-enabled CPython: `$PFTRACE_PYTHON`, else [`DEFAULT_PYTHON`];
/// panics (the test fails) when neither exists.
pub fn python() -> PathBuf {
    if let Some(p) = env::var_os("PFTRACE_PYTHON").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "PFTRACE_PYTHON={} does not exist: run `cargo xtask setup` (as root) to build the \
             probe-enabled CPython, or point PFTRACE_PYTHON at a CPython 3.6-3.10 built --with-dtrace",
            p.display()
        );
        return p;
    }
    let p = PathBuf::from(DEFAULT_PYTHON);
    assert!(
        p.is_file(),
        "no probe-enabled CPython: PFTRACE_PYTHON is not set and {DEFAULT_PYTHON} does not exist; \
         run `cargo xtask setup` (as root) to build it, or use `cargo xtask test`"
    );
    p
}

/// A copy of [`python`] of the test's own, `DIR/python/bin/python3.X`:
/// another inode, so its probe sites are the test's alone. A dormant or
/// host-wide link on it (`--cgroup`, `--jobs-under`, `--binary`) meets no
/// other test's daemon or process, which the shared file made a reason to
/// run alone (common/serial.rs). `DIR/python/lib` links to the original's
/// `lib`, where CPython looks for its standard library from its own path
/// (PREFIX/lib/python3.X/os.py), so no PYTHONHOME is needed.
pub fn private_python(dir: &TestDir) -> PathBuf {
    let py = python();
    let prefix = py.parent().and_then(Path::parent).expect("PREFIX/bin/python3.X");
    let root = dir.join("python");
    fs::create_dir_all(root.join("bin")).unwrap();
    std::os::unix::fs::symlink(prefix.join("lib"), root.join("lib")).unwrap();
    let copy = root.join("bin").join(py.file_name().unwrap());
    fs::copy(&py, &copy).unwrap_or_else(|e| panic!("copying {} to {}: {e}", py.display(), copy.display()));
    copy
}

/// The tests load BPF programs: fail loudly when not root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "pftraced's integration tests need root with BPF (they load eBPF programs and attach \
         uprobes): run them as root, e.g. `sudo -E cargo xtask test`"
    );
}

/// A file the test cannot do without; panics naming it when it is missing.
pub fn require_file(path: &str, what: &str) -> PathBuf {
    let p = PathBuf::from(path);
    assert!(p.is_file(), "prerequisite missing: {path} ({what}) does not exist on this machine");
    p
}

/// A program from PATH the test cannot do without; panics naming it when missing.
pub fn require_tool(name: &str, package: &str) -> PathBuf {
    let path = env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
        .unwrap_or_else(|| {
            panic!("prerequisite missing: `{name}` is not on PATH (install the {package} package)")
        })
}

/// Where `cargo xtask setup` unpacks Debian sid's CPython 3.13-3.15.
pub const DEFAULT_SID_ROOT: &str = "/var/cache/pftrace/debian-sid";
/// Where pyenv's CPython builds live on these machines.
pub const DEFAULT_PYENV_ROOT: &str = "/root/.pyenv";

/// An interpreter at `root` + `rel`, `root` from `var` or `default`; panics when missing.
fn interpreter(var: &str, default: &str, rel: &str, what: &str) -> PathBuf {
    let root =
        env::var_os(var).filter(|r| !r.is_empty()).map_or_else(|| PathBuf::from(default), PathBuf::from);
    let p = root.join(rel);
    assert!(
        p.is_file(),
        "prerequisite missing: {what} at {} (root from {var}, default {default}): run `cargo xtask setup` \
         (as root), or use `cargo xtask test`",
        p.display()
    );
    p
}

/// Debian sid's CPython `version` ("3.13", "3.14" or "3.15", built
/// --with-dtrace; only 3.15 has the function probes), runnable as is:
/// `$PFTRACE_SID_ROOT/usr/bin/python3.X`, else under [`DEFAULT_SID_ROOT`].
pub fn sid_python(version: &str) -> PathBuf {
    let what = format!("Debian sid's CPython {version}");
    interpreter("PFTRACE_SID_ROOT", DEFAULT_SID_ROOT, &format!("usr/bin/python{version}"), &what)
}

/// pyenv's CPython `version` ("3.9.18", "3.11.7", "3.12.1" or "3.13.0",
/// built without --with-dtrace): `$PFTRACE_PYENV_ROOT/versions/V/bin/python3.X`,
/// else under [`DEFAULT_PYENV_ROOT`].
pub fn pyenv_python(version: &str) -> PathBuf {
    let major_minor = version.rsplit_once('.').map_or(version, |(mm, _)| mm);
    let rel = format!("versions/{version}/bin/python{major_minor}");
    interpreter("PFTRACE_PYENV_ROOT", DEFAULT_PYENV_ROOT, &rel, &format!("pyenv's CPython {version}"))
}

// ---------------------------------------------------------------------------
// Per-test directories and scripts

static DIR_SEQ: AtomicU32 = AtomicU32::new(0);

/// A directory of its own for one test, under the system temp dir. Removed
/// when the test passes; kept (and named in the panic output) when it fails.
pub struct TestDir {
    path: PathBuf,
    /// The test's turn, taken before anything else it does (its timers
    /// included): a serial test waits for the tests holding one to end, and
    /// none starts while it runs (serial.rs).
    _turn: serial::Turn,
}

impl TestDir {
    pub fn new(tag: &str) -> Self {
        let turn = serial::turn();
        require_root();
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let path = env::temp_dir().join(format!(
            "pftrace-test-{tag}-{}-{}-{nanos}",
            std::process::id(),
            DIR_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("creating test dir {}: {e}", path.display()));
        Self { path, _turn: turn }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Writes a Python script (see [`dedent`]) and returns its path.
    pub fn script(&self, name: &str, source: &str) -> PathBuf {
        write_script(&self.path.join(name), source)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("(test files kept in {})", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Removes the common leading indentation of `source` and a leading newline,
/// so scripts can be written indented inside Rust string literals.
pub fn dedent(source: &str) -> String {
    let source = source.strip_prefix('\n').unwrap_or(source);
    let indent = source
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    let mut out = String::new();
    for line in source.lines() {
        out.push_str(line.get(indent..).unwrap_or(line.trim_start()));
        out.push('\n');
    }
    out
}

/// Writes a Python script (dedented) to `path`, dated 2 s in the past:
/// pftraced resolves a function from its source only when the file is
/// older than the process (else it may not be what was compiled), and the
/// process start time has 10 ms ticks.
pub fn write_script(path: &Path, source: &str) -> PathBuf {
    fs::write(path, dedent(source)).unwrap_or_else(|e| panic!("writing script {}: {e}", path.display()));
    let past = SystemTime::now() - Duration::from_secs(2);
    fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(past))
        .unwrap_or_else(|e| panic!("dating script {}: {e}", path.display()));
    path.to_path_buf()
}

/// The 1-based number of the first line of `script` containing `needle`.
pub fn line_of(script: &Path, needle: &str) -> i64 {
    let text = fs::read_to_string(script).expect("reading script");
    text.lines()
        .position(|l| l.contains(needle))
        .map(|i| i as i64 + 1)
        .unwrap_or_else(|| panic!("{needle:?} not in {}", script.display()))
}

// ---------------------------------------------------------------------------
// Child processes

/// Lines of a child's output stream, read on a thread so waits can time out.
struct Lines {
    rx: mpsc::Receiver<String>,
    all: Arc<Mutex<String>>,
    reader: Option<thread::JoinHandle<()>>,
}

impl Lines {
    fn new(stream: impl std::io::Read + Send + 'static) -> Self {
        let (tx, rx) = mpsc::channel();
        let all = Arc::new(Mutex::new(String::new()));
        let all2 = Arc::clone(&all);
        let reader = thread::spawn(move || {
            let mut r = BufReader::new(stream);
            let mut line = String::new();
            loop {
                line.clear();
                match r.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        all2.lock().unwrap().push_str(&line);
                        let _ = tx.send(line.trim_end_matches('\n').to_string());
                    }
                }
            }
        });
        Self { rx, all, reader: Some(reader) }
    }

    /// The next line, or None at end of stream; panics after `timeout`.
    fn next(&self, timeout: Duration, what: &str) -> Option<String> {
        match self.rx.recv_timeout(timeout) {
            Ok(l) => Some(l),
            Err(mpsc::RecvTimeoutError::Disconnected) => None,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("timed out after {timeout:?} waiting for {what}; output so far:\n{}", self.text())
            }
        }
    }

    /// Everything read so far.
    fn text(&self) -> String {
        self.all.lock().unwrap().clone()
    }

    /// Waits for the stream to end (the child closed it) and returns all of it.
    fn finish(&mut self) -> String {
        if let Some(h) = self.reader.take() {
            let _ = h.join();
        }
        self.text()
    }
}

/// True while a process with this pid exists (zombies included).
pub fn pid_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// A process the test started, killed (SIGKILL) and reaped on drop. With
/// `group`, it leads its own process group, and if it has to be killed the
/// whole group is, so anything it launched goes too.
pub struct Guard {
    pub child: Child,
    group: bool,
    reaped: bool,
    /// Dropped after the process is killed and reaped (fields drop after
    /// `Drop::drop`): no serial test runs while it may still run.
    _turn: serial::Turn,
}

impl Guard {
    pub fn spawn(cmd: &mut Command, group: bool) -> Self {
        let turn = serial::turn();
        if group {
            cmd.process_group(0);
        }
        // ETXTBSY: a test that just copied an interpreter (children.rs,
        // pairing.rs) may find its write descriptor still held by a child
        // another test thread forked meanwhile (until that child's exec
        // closes it): a few ms, so try again briefly.
        let mut tries = 0;
        let child = loop {
            match cmd.spawn() {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 50 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                result => {
                    break result.unwrap_or_else(|e| panic!("cannot start {:?}: {e}", cmd.get_program()));
                }
            }
        };
        Self { child, group, reaped: false, _turn: turn }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Reaps the process if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        let s = self.child.try_wait().expect("try_wait");
        self.reaped |= s.is_some();
        s
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for exit; panics (after killing it) if it takes longer than `timeout`.
    pub fn wait(&mut self, timeout: Duration, what: &str) -> ExitStatus {
        match self.wait_timeout(timeout) {
            Some(s) => s,
            None => {
                self.kill();
                panic!("{what} did not exit within {timeout:?} (killed)");
            }
        }
    }

    /// Kills the process (and its group, if it leads one) and reaps it.
    pub fn kill(&mut self) {
        if self.reaped {
            return;
        }
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: signalling our own unreaped child, or the process group it
        // leads (its pid cannot be reused before we reap it).
        unsafe {
            if self.group {
                libc::kill(-pid, libc::SIGKILL);
            }
            libc::kill(pid, libc::SIGKILL);
        }
        let _ = self.child.wait();
        self.reaped = true;
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Python script running under the probe-enabled CPython, with its stdin
/// and stdout piped to the test; killed on drop (like py-spy's test guard).
/// Workers ([`WorkerSpec`], [`WORKER`]) are these too.
pub struct PyProcess {
    guard: Guard,
    stdin: Option<ChildStdin>,
    stdout: Lines,
    label: String,
}

impl PyProcess {
    /// Starts `python script args...` in the script's directory.
    pub fn spawn(python: &Path, script: &Path, args: &[&str]) -> Self {
        let mut cmd = Command::new(python);
        cmd.arg(script).args(args).current_dir(script.parent().unwrap_or(Path::new("/")));
        Self::start(&mut cmd, format!("the python script {}", script.display()))
    }

    /// Starts `cmd` with stdin and stdout piped to the test; `label` names it in failures.
    pub fn start(cmd: &mut Command, label: String) -> Self {
        Self::start_as(cmd, false, label)
    }

    /// [`PyProcess::start`]; with `group`, it leads a process group, killed
    /// whole on drop (a container and everything in it).
    pub fn start_as(cmd: &mut Command, group: bool, label: String) -> Self {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut guard = Guard::spawn(cmd, group);
        let stdin = guard.child.stdin.take();
        let stdout = Lines::new(guard.child.stdout.take().expect("piped stdout"));
        Self { guard, stdin, stdout, label }
    }

    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// The next line it prints; panics on timeout or end of output.
    pub fn read_line(&self) -> String {
        let what = format!("a line from {}", self.label);
        self.stdout
            .next(LINE_TIMEOUT, &what)
            .unwrap_or_else(|| panic!("{} closed stdout; output:\n{}", self.label, self.stdout.text()))
    }

    /// The next line it prints (the same as [`Self::read_line`]).
    pub fn line(&self) -> String {
        self.read_line()
    }

    /// Reads a line that must equal `want`.
    pub fn expect_line(&self, want: &str) {
        let line = self.read_line();
        assert_eq!(line, want, "unexpected line from {}", self.label);
    }

    /// Reads a line that must start with `word`; returns the rest, trimmed.
    pub fn expect(&self, word: &str) -> String {
        let line = self.read_line();
        match line.strip_prefix(word) {
            Some(rest) => rest.trim().to_string(),
            None => panic!("{} printed {line:?}, expected {word:?}", self.label),
        }
    }

    /// Writes a line to its stdin.
    pub fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        writeln!(stdin, "{line}").and_then(|()| stdin.flush()).expect("writing to the script's stdin");
    }

    /// The same as [`Self::send_line`].
    pub fn send(&mut self, line: &str) {
        self.send_line(line)
    }

    /// A [`WORKER`]: calls `name` `n` times and waits until it has.
    pub fn call(&mut self, name: &str, n: u64) {
        self.send(&format!("call {name} {n}"));
        self.expect("done");
    }

    /// A [`WORKER`]: times `n` calls of `name`: (CPU seconds, wall seconds).
    pub fn time(&mut self, name: &str, n: u64) -> (f64, f64) {
        self.send(&format!("time {name} {n}"));
        let rest = self.expect("done");
        let mut it = rest.split_whitespace().map(|s| s.parse::<f64>().expect("a number"));
        (it.next().expect("cpu"), it.next().expect("wall"))
    }

    /// Waits for the script to exit and returns its status and remaining output.
    pub fn wait(&mut self, timeout: Duration) -> (ExitStatus, String) {
        drop(self.stdin.take());
        let status = self.guard.wait(timeout, &self.label);
        (status, self.stdout.finish())
    }

    /// Closes stdin and waits for a clean exit.
    pub fn finish(&mut self) -> ExitStatus {
        let (status, _) = self.wait(LINE_TIMEOUT);
        assert!(status.success(), "{} exited with {status}", self.label);
        status
    }
}

// ---------------------------------------------------------------------------
// Running pftraced

/// How to run pftraced: names, target, output file, extra environment, and an
/// optional wrapper command (e.g. `setpriv ...`).
pub struct Pftraced<'a> {
    dir: &'a TestDir,
    args: Vec<OsString>,
    wrapper: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    output: PathBuf,
}

static RUN_SEQ: AtomicU32 = AtomicU32::new(0);

impl<'a> Pftraced<'a> {
    /// pftraced tracing `names` (each passed as its own `-t NAME`), writing
    /// its trace to a fresh file in `dir`.
    pub fn new(dir: &'a TestDir, names: &[&str]) -> Self {
        let mut args = Vec::new();
        for n in names {
            args.push("-t".into());
            args.push((*n).into());
        }
        let output = dir.join(&format!("trace-{}.json", RUN_SEQ.fetch_add(1, Ordering::Relaxed)));
        args.push("-o".into());
        args.push(output.clone().into());
        Self { dir, args, wrapper: Vec::new(), envs: Vec::new(), output }
    }

    /// Any extra argument(s).
    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Self {
        self.args.push(a.as_ref().to_owned());
        self
    }

    /// `--pid PID`.
    pub fn args<S: AsRef<OsStr>>(mut self, args: &[S]) -> Self {
        for a in args {
            self = self.arg(a);
        }
        self
    }

    pub fn pid(self, pid: u32) -> Self {
        self.arg("--pid").arg(pid.to_string())
    }

    /// `-- CMD ARGS...`.
    pub fn launch<S: AsRef<OsStr>>(mut self, cmd: &[S]) -> Self {
        self.args.push("--".into());
        self.args.extend(cmd.iter().map(|s| s.as_ref().to_owned()));
        self
    }

    /// Runs pftraced under `wrapper` (`wrapper... pftraced args...`).
    pub fn wrapped<S: AsRef<OsStr>>(mut self, wrapper: &[S]) -> Self {
        self.wrapper = wrapper.iter().map(|s| s.as_ref().to_owned()).collect();
        self
    }

    /// An environment variable for pftraced (and so for a launched command).
    pub fn env(mut self, k: impl AsRef<OsStr>, v: impl AsRef<OsStr>) -> Self {
        self.envs.push((k.as_ref().to_owned(), v.as_ref().to_owned()));
        self
    }

    fn command(&self) -> Command {
        let mut cmd = match self.wrapper.split_first() {
            Some((prog, rest)) => {
                let mut c = Command::new(prog);
                c.args(rest).arg(PFTRACED);
                c
            }
            None => Command::new(PFTRACED),
        };
        cmd.args(&self.args)
            .current_dir(self.dir.path())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        cmd
    }

    /// Starts pftraced and returns while it runs (for --pid mode).
    pub fn spawn(self) -> RunningTracer {
        let mut cmd = self.command();
        let shown = format!("{cmd:?}");
        let mut guard = Guard::spawn(&mut cmd, true);
        let stderr = Lines::new(guard.child.stderr.take().expect("piped stderr"));
        let mut stdout_pipe = guard.child.stdout.take().expect("piped stdout");
        let stdout = thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout_pipe.read_to_string(&mut s);
            s
        });
        RunningTracer {
            guard,
            stderr,
            stdout: Some(stdout),
            output: self.output,
            shown,
            started: Instant::now(),
        }
    }

    /// Runs pftraced to completion.
    pub fn run(self) -> TracedRun {
        self.spawn().finish()
    }
}

/// Runs `script` under `pftraced -t NAMES --pid`: the script prints
/// `ready` and waits for a line `go`, sent once the probes are live; it
/// must exit 0 within 60 s, and pftraced then with 0. Returns the run and
/// pftraced's `attached` line.
pub fn traced_from_go(dir: &TestDir, script: &Path, names: &[&str]) -> (TracedRun, String) {
    let mut py = PyProcess::spawn(&python(), script, &[]);
    py.expect_line("ready");
    let tracer = Pftraced::new(dir, names).pid(py.pid()).spawn();
    let attached = tracer.wait_attached(py.pid());
    py.send_line("go");
    let (status, _) = py.wait(Duration::from_secs(60));
    assert!(status.success(), "the script failed: {status}");
    let run = tracer.finish();
    run.assert_code(0);
    (run, attached)
}

/// A pftraced that is running.
pub struct RunningTracer {
    guard: Guard,
    stderr: Lines,
    stdout: Option<thread::JoinHandle<String>>,
    output: PathBuf,
    shown: String,
    started: Instant,
}

impl RunningTracer {
    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// Waits for `pftraced: attached to pid PID` on stderr (probes are live)
    /// and returns the line; panics if pftraced ends or times out first.
    pub fn wait_attached(&self, pid: u32) -> String {
        let want = format!("pftraced: attached to pid {pid} (");
        loop {
            match self.stderr.next(LINE_TIMEOUT, "pftraced's `attached` line") {
                Some(line) if line.starts_with(&want) => return line,
                Some(_) => {}
                None => {
                    panic!("pftraced ended before attaching to pid {pid}; stderr:\n{}", self.stderr.text())
                }
            }
        }
    }

    /// Waits for a stderr line containing `needle` and returns it; panics
    /// if pftraced ends or is silent for too long first.
    pub fn wait_stderr(&self, needle: &str) -> String {
        loop {
            match self.stderr.next(LINE_TIMEOUT, needle) {
                Some(line) if line.contains(needle) => return line,
                Some(_) => {}
                None => panic!("pftraced ended before printing {needle:?}; stderr:\n{}", self.stderr.text()),
            }
        }
    }

    /// Waits for the first `pftraced: attached to pid PID` line (a launched
    /// command's) and returns PID.
    pub fn wait_attached_any(&self) -> u32 {
        let prefix = "pftraced: attached to pid ";
        loop {
            match self.stderr.next(LINE_TIMEOUT, "pftraced's `attached` line") {
                Some(line) if line.starts_with(prefix) => {
                    let rest = &line[prefix.len()..];
                    return rest.split(' ').next().and_then(|n| n.parse().ok()).expect("a pid");
                }
                Some(_) => {}
                None => panic!("pftraced ended before attaching; stderr:\n{}", self.stderr.text()),
            }
        }
    }

    /// Waits for pftraced to exit and collects what it printed.
    pub fn finish(mut self) -> TracedRun {
        let remaining = RUN_TIMEOUT.saturating_sub(self.started.elapsed());
        let status = match self.guard.wait_timeout(remaining) {
            Some(s) => s,
            None => {
                self.guard.kill();
                panic!(
                    "pftraced did not exit within {RUN_TIMEOUT:?} (killed): {}\nstderr:\n{}",
                    self.shown,
                    self.stderr.text()
                );
            }
        };
        let elapsed = self.started.elapsed();
        let stderr = self.stderr.finish();
        let stdout = self.stdout.take().map(|h| h.join().unwrap()).unwrap_or_default();
        TracedRun { status, stdout, stderr, output: self.output.clone(), shown: self.shown.clone(), elapsed }
    }
}

/// A finished pftraced run.
#[derive(Debug)]
pub struct TracedRun {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// The `-o` file it was told to write.
    pub output: PathBuf,
    /// The command line, for messages.
    pub shown: String,
    pub elapsed: Duration,
}

impl TracedRun {
    /// Exit code (None: killed by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    fn describe(&self) -> String {
        format!(
            "{}\nexit status: {}\nstderr:\n{}stdout:\n{}",
            self.shown, self.status, self.stderr, self.stdout
        )
    }

    /// Asserts the run exited with `code`.
    pub fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(self.code(), Some(code), "pftraced exited with the wrong status:\n{}", self.describe());
        self
    }

    /// Asserts a refusal: exit status 1, a `pftraced: error:` line holding
    /// every one of `parts`, nothing attached and no trace file. Returns the
    /// error message.
    pub fn assert_refused(&self, parts: &[&str]) -> String {
        assert_eq!(
            self.code(),
            Some(1),
            "pftraced should have refused with exit status 1:\n{}",
            self.describe()
        );
        self.assert_not_attached();
        let msg = self
            .stderr
            .lines()
            .find_map(|l| l.strip_prefix("pftraced: error: "))
            .unwrap_or_else(|| panic!("no `pftraced: error:` line:\n{}", self.describe()))
            .to_string();
        for part in parts {
            assert!(msg.contains(part), "the error message lacks {part:?}:\n  {msg}\n{}", self.describe());
        }
        msg
    }

    /// Asserts no probe was attached and no trace was written.
    pub fn assert_not_attached(&self) {
        assert!(
            !self.stderr.contains("attached to pid"),
            "pftraced attached although it should have refused:\n{}",
            self.describe()
        );
        assert!(!self.output.exists(), "pftraced wrote {} although it refused", self.output.display());
    }

    /// The trace file, parsed and checked for shape; also checks the
    /// `wrote N calls to PATH` line agrees with it.
    pub fn trace(&self) -> Trace {
        let text = fs::read_to_string(&self.output)
            .unwrap_or_else(|e| panic!("reading trace {}: {e}\n{}", self.output.display(), self.describe()));
        let trace =
            Trace::parse(&text).unwrap_or_else(|e| panic!("bad trace file {}: {e}", self.output.display()));
        let wrote = format!("pftraced: wrote {} calls to {}", trace.calls.len(), self.output.display());
        assert!(self.stderr.lines().any(|l| l == wrote), "stderr lacks {wrote:?}:\n{}", self.describe());
        trace
    }

    /// The pid from the `attached to pid N` line.
    pub fn attached_pid(&self) -> u32 {
        self.stderr
            .lines()
            .find_map(|l| l.strip_prefix("pftraced: attached to pid "))
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no `attached to pid` line:\n{}", self.describe()))
    }
}

// ---------------------------------------------------------------------------
// The trace file

/// One `"ph":"X"` event.
#[derive(Debug, Clone)]
pub struct CallEvent {
    /// The code object's name (`args.function`: `step`), what `-t` names.
    pub name: String,
    /// The event's name: the qualified name where resolved (`Solver.step`).
    pub qualname: String,
    /// The dotted module where resolved, else the file.
    pub cat: String,
    /// `args.module` and `args.path` (None: null, unresolved).
    pub module: Option<String>,
    pub path: Option<String>,
    pub pid: u32,
    pub tid: u32,
    /// As written: wall-clock µs.
    pub ts: f64,
    pub dur: f64,
    /// The same in integer ns (exact conversions of the written values).
    pub ts_ns: i128,
    pub dur_ns: i128,
    pub file: String,
    pub line: i64,
    pub incomplete: bool,
    /// The call's id (unique in the trace), depth in its thread's traced
    /// stack and parent call's id (0: none).
    pub id: u64,
    pub depth: u64,
    pub parent: u64,
}

impl CallEvent {
    pub fn end_ns(&self) -> i128 {
        self.ts_ns + self.dur_ns
    }

    /// The most the written `ts` can be off from the true start, in ns:
    /// pftraced computes `wall_ns as f64 / 1000.0`, rounding twice (to an
    /// f64 of ns, then to an f64 of µs), so the error is at most half an ulp
    /// of each. At today's epoch that is 128 + 125 ns.
    pub fn ts_rounding_ns(&self) -> i128 {
        let us = ulp(self.ts) / 2.0 * 1000.0;
        let ns = ulp(self.ts * 1000.0) / 2.0;
        (us + ns).ceil() as i128
    }
}

/// Distance from |x| to the next larger f64.
pub fn ulp(x: f64) -> f64 {
    let a = x.abs();
    f64::from_bits(a.to_bits() + 1) - a
}

/// Exact ns for a written µs value (the f64's own value, no further rounding
/// beyond sub-ns): whole µs and the fraction are converted separately.
pub fn us_to_ns(us: f64) -> i128 {
    let whole = us.trunc();
    let frac = us - whole; // exact for f64
    whole as i128 * 1000 + (frac * 1000.0).round() as i128
}

/// A parsed and shape-checked Chrome trace from pftraced.
#[derive(Debug)]
pub struct Trace {
    /// The file's text, for [`Trace::json`].
    text: String,
    /// The whole file as a value, made on first use by [`Trace::json`].
    json: OnceLock<Value>,
    /// `otherData`.
    other_data: Value,
    /// X events, in file order.
    pub calls: Vec<CallEvent>,
    /// pid -> process_name of the M events.
    pub process_names: BTreeMap<u32, String>,
}

impl Trace {
    /// Parses `text` and checks the layout documented in src/output/chrome.rs.
    /// The events are read typed (common/raw_trace.rs), not as values.
    pub fn parse(text: &str) -> Result<Self, String> {
        let raw: RawTrace = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        if raw.display_time_unit != "ns" {
            return Err(format!("displayTimeUnit is {}", raw.display_time_unit));
        }
        let mut calls = Vec::new();
        let mut process_names = BTreeMap::new();
        for ev in &raw.trace_events {
            let missing = |what: &str| format!("event without {what}: {ev:?}");
            let s = |v: &Option<Cow<str>>, k: &str| -> Result<String, String> {
                v.as_deref().map(str::to_string).ok_or_else(|| missing(&format!("string {k:?}")))
            };
            let u = |v: Option<u64>, k: &str| v.ok_or_else(|| missing(&format!("unsigned {k:?}")));
            let f = |v: Option<f64>, k: &str| v.ok_or_else(|| missing(&format!("number {k:?}")));
            let name = ev.name.as_deref();
            match ev.ph.as_deref() {
                Some("X") => {
                    let args = &ev.args;
                    let incomplete = match &args.incomplete {
                        None => false,
                        Some(Value::Bool(true)) => true,
                        Some(other) => return Err(format!("args.incomplete is {other}: {ev:?}")),
                    };
                    let (ts, dur) = (f(ev.ts, "ts")?, f(ev.dur, "dur")?);
                    if dur < 0.0 {
                        return Err(format!("negative dur: {ev:?}"));
                    }
                    calls.push(CallEvent {
                        name: args
                            .function
                            .as_deref()
                            .ok_or_else(|| format!("args.function missing: {ev:?}"))?
                            .to_string(),
                        qualname: s(&ev.name, "name")?,
                        cat: s(&ev.cat, "cat")?,
                        module: args.module.as_deref().map(str::to_string),
                        path: args.path.as_deref().map(str::to_string),
                        pid: u(ev.pid, "pid")? as u32,
                        tid: u(ev.tid, "tid")? as u32,
                        ts,
                        dur,
                        ts_ns: us_to_ns(ts),
                        dur_ns: (dur * 1000.0).round() as i128,
                        file: args
                            .file
                            .as_deref()
                            .ok_or_else(|| format!("args.file missing: {ev:?}"))?
                            .to_string(),
                        line: args.line.ok_or_else(|| format!("args.line missing: {ev:?}"))?,
                        incomplete,
                        id: u(args.id, "id")?,
                        depth: u(args.depth, "depth")?,
                        parent: u(args.parent, "parent")?,
                    });
                }
                // Thread names, process labels and the CPU/memory counter
                // tracks are checked by tests/it/formats.rs.
                Some("M") if name == Some("thread_name") || name == Some("process_labels") => {}
                Some("C") if name == Some("cpu") || name == Some("memory") => {}
                Some("M") => {
                    if name != Some("process_name") {
                        return Err(format!("unexpected metadata event: {ev:?}"));
                    }
                    let name = ev
                        .args
                        .name
                        .as_deref()
                        .ok_or_else(|| format!("process_name without args.name: {ev:?}"))?;
                    process_names.insert(u(ev.pid, "pid")? as u32, name.to_string());
                }
                _ => return Err(format!("unexpected event: {ev:?}")),
            }
        }
        let other_data = raw.other_data;
        let pf = &other_data["pftrace"];
        for k in ["entry_seen", "return_seen", "entry_matched", "return_matched", "lost", "read_errors"] {
            if pf["counters"][k].as_u64().is_none() {
                return Err(format!("otherData.pftrace.counters.{k} missing: {pf}"));
            }
        }
        for k in ["calls", "incomplete_calls"] {
            if pf[k].as_u64().is_none() {
                return Err(format!("otherData.pftrace.{k} missing: {pf}"));
            }
        }
        for k in ["unmatched_returns", "names", "processes"] {
            if !pf[k].is_array() {
                return Err(format!("otherData.pftrace.{k} is not an array: {pf}"));
            }
        }
        let trace = Self { text: text.to_string(), json: OnceLock::new(), other_data, calls, process_names };
        if trace.pftrace()["calls"].as_u64() != Some(trace.calls.len() as u64) {
            return Err(format!(
                "otherData.pftrace.calls = {} but there are {} X events",
                trace.pftrace()["calls"],
                trace.calls.len()
            ));
        }
        let incomplete = trace.calls.iter().filter(|c| c.incomplete).count() as u64;
        if trace.pftrace()["incomplete_calls"].as_u64() != Some(incomplete) {
            return Err(format!(
                "otherData.pftrace.incomplete_calls = {} but {incomplete} X events say incomplete",
                trace.pftrace()["incomplete_calls"]
            ));
        }
        Ok(trace)
    }

    /// The whole file as a value (parsed on first use: the checks above
    /// need none).
    pub fn json(&self) -> &Value {
        self.json.get_or_init(|| serde_json::from_str(&self.text).expect("parsed once already"))
    }

    /// `otherData.pftrace`.
    pub fn pftrace(&self) -> &Value {
        &self.other_data["pftrace"]
    }

    /// One of the kernel counters.
    pub fn counter(&self, name: &str) -> u64 {
        self.pftrace()["counters"][name].as_u64().unwrap_or_else(|| panic!("no counter {name}"))
    }

    pub fn incomplete_calls(&self) -> u64 {
        self.pftrace()["incomplete_calls"].as_u64().unwrap()
    }

    /// The sample of returns without an entry the trace keeps.
    pub fn unmatched_returns(&self) -> &Vec<Value> {
        self.pftrace()["unmatched_returns"].as_array().unwrap()
    }

    /// Every return without an entry (the sample above is bounded).
    pub fn unmatched_returns_total(&self) -> u64 {
        self.pftrace()["unmatched_returns_total"].as_u64().expect("unmatched_returns_total")
    }

    /// `otherData.pftrace.names`.
    pub fn names(&self) -> Vec<String> {
        self.pftrace()["names"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().expect("name").to_string())
            .collect()
    }

    /// The pids in `otherData.pftrace.processes`.
    pub fn process_pids(&self) -> Vec<u32> {
        self.pftrace()["processes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["pid"].as_u64().expect("process pid") as u32)
            .collect()
    }

    /// Calls named `name`.
    pub fn named(&self, name: &str) -> Vec<&CallEvent> {
        self.calls.iter().filter(|c| c.name == name).collect()
    }

    /// Calls named `name` in a file whose path ends with `file_suffix`.
    pub fn named_in(&self, name: &str, file_suffix: &str) -> Vec<&CallEvent> {
        self.calls.iter().filter(|c| c.name == name && c.file.ends_with(file_suffix)).collect()
    }

    /// Number of calls per name.
    pub fn counts(&self) -> BTreeMap<&str, usize> {
        let mut m = BTreeMap::new();
        for c in &self.calls {
            *m.entry(c.name.as_str()).or_default() += 1;
        }
        m
    }

    /// Asserts the trace is clean: nothing lost or unreadable, no incomplete
    /// calls, no unmatched returns, and every matched entry has its return.
    pub fn assert_clean(&self) {
        let pf = self.pftrace();
        assert_eq!(self.counter("lost"), 0, "records lost: {pf}");
        assert_eq!(self.counter("read_errors"), 0, "read errors: {pf}");
        assert_eq!(self.incomplete_calls(), 0, "incomplete calls: {pf}");
        assert!(self.unmatched_returns().is_empty(), "unmatched returns: {pf}");
        assert_eq!(self.unmatched_returns_total(), 0, "unmatched returns: {pf}");
        assert_eq!(pf["bad_records"].as_u64(), Some(0), "bad records: {pf}");
        assert_eq!(pf["skipped_entries"].as_u64(), Some(0), "skipped entries: {pf}");
        assert_eq!(
            self.counter("entry_matched"),
            self.counter("return_matched"),
            "matched entries and returns differ: {pf}"
        );
        // The in-process agent reports an entry and a return per call.
        let agent_reports = pf["counters"]["agent_reports"].as_u64().unwrap_or(0);
        assert_eq!(agent_reports % 2, 0, "agent reports of entries and returns differ: {pf}");
        assert_eq!(
            self.counter("entry_matched") + agent_reports / 2,
            self.calls.len() as u64,
            "matched entries differ from the number of calls: {pf}"
        );
    }
}

// ---------------------------------------------------------------------------
// Small helpers shared by the fault and lifecycle tests

/// Sends `sig` to `pid`, which must still exist.
pub fn kill(pid: u32, sig: i32) {
    // SAFETY: signalling a process this test started (not yet reaped).
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0, "kill({pid}, {sig})");
}

/// Wall-clock time now, µs since the epoch (as trace timestamps are).
pub fn wall_us_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as f64 / 1000.0
}

/// A tmpfs mounted for one test; unmounted on drop.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(at: &Path, size: &str) -> Self {
        fs::create_dir_all(at).unwrap();
        let c = |s: &str| std::ffi::CString::new(s).unwrap();
        let target = c(at.to_str().unwrap());
        let opts = c(&format!("size={size},mode=0755"));
        // SAFETY: valid C strings for the duration of the call.
        let rc = unsafe {
            libc::mount(c("tmpfs").as_ptr(), target.as_ptr(), c("tmpfs").as_ptr(), 0, opts.as_ptr().cast())
        };
        assert_eq!(rc, 0, "mounting a tmpfs at {}: {}", at.display(), std::io::Error::last_os_error());
        Self(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let target = std::ffi::CString::new(self.0.to_str().unwrap()).unwrap();
        // SAFETY: a valid C string; MNT_DETACH even if a file is still open.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

/// `bpf(2)` commands that open a BPF object by id.
pub const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
pub const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
pub const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;

/// Whether a BPF object with this id still exists (`cmd`: one of the
/// `BPF_*_GET_FD_BY_ID` above).
pub fn bpf_object_exists(cmd: libc::c_long, id: u32) -> bool {
    let attr: [u32; 4] = [id, 0, 0, 0];
    // SAFETY: attr is a zero-tailed prefix of union bpf_attr for *_GET_FD_BY_ID.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_ptr(), size_of_val(&attr) as u32) };
    if fd >= 0 {
        // SAFETY: we own the fd the kernel just returned.
        unsafe { libc::close(fd as i32) };
        return true;
    }
    let err = std::io::Error::last_os_error();
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "bpf cmd {cmd} id {id}: {err}");
    false
}
