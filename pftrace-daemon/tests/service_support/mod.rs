//! Helpers for the `service_*` tests (pftraced as a service: cgroup scopes,
//! the control socket, rolling output), on top of `tests/common`: cgroups
//! made per test and removed on drop, Python workers driven line by line
//! over stdin (optionally placed in a cgroup or pinned to a CPU), and
//! `pftracectl` calls with timeouts and clear panic messages.
//!
//! Everything a test starts is killed on drop, so a failing test leaves no
//! process, cgroup or socket behind (its test directory is kept for a look).

#![allow(dead_code)] // each service_* test binary uses a different part

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{ChildStdin, Command, ExitStatus, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::common::{CallEvent, Guard, Pftraced, RunningTracer, TestDir, Trace, TracedRun};

/// The pftracectl binary under test.
pub const PFTRACECTL: &str = env!("CARGO_BIN_EXE_pftracectl");

/// Where this host mounts cgroup v2.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup/unified";

/// How long to wait for the daemon or a worker to reach a state.
pub const WAIT: Duration = Duration::from_secs(30);

/// The worker every service test runs: it prints `ready`, then obeys one
/// command per stdin line and answers `done ...` when it is carried out.
///
/// * `call NAME N`: calls NAME N times; `done`.
/// * `time NAME N`: calls NAME N times; `done CPU_SECONDS WALL_SECONDS`
///   (CPU time of the process: what the loop cost, whatever else the CPU ran).
/// * `loop NAME STOPFILE [PAUSE_MS]`: calls NAME in rounds of 1000 (with a
///   pause after each, if given) until STOPFILE exists; `done CALLS`.
///
/// At end of input it exits 0.
pub const WORKER: &str = r#"
    import os, sys, time

    def foo():
        pass

    def bar():
        pass

    print("ready", flush=True)
    while True:
        line = sys.stdin.readline()
        if not line:
            break
        cmd, *args = line.split()
        f = globals()[args[0]]
        if cmd == "call":
            for _ in range(int(args[1])):
                f()
            print("done", flush=True)
        elif cmd == "time":
            n = int(args[1])
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(n):
                f()
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            print("done %.9f %.9f" % (cpu, wall), flush=True)
        elif cmd == "loop":
            n, pause = 0, float(args[2]) / 1000 if len(args) > 2 else 0
            while not os.path.exists(args[1]):
                for _ in range(1000):
                    f()
                n += 1000
                if pause:
                    time.sleep(pause)
            print("done %d" % n, flush=True)
        else:
            print("unknown command %r" % line, flush=True)
            sys.exit(2)
"#;

// ---------------------------------------------------------------------------
// cgroups

static CG_SEQ: AtomicU32 = AtomicU32::new(0);

fn is_cgroup2(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills the zeroed struct; c is a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == 0x6367_7270 }
}

/// A cgroup v2 directory of one test (and the child cgroups made in it).
/// On drop every process in them is killed (`cgroup.kill`) and the
/// directories are removed, children first.
pub struct Cgroup {
    /// The test's cgroup first, then children in creation order.
    dirs: Vec<PathBuf>,
}

impl Cgroup {
    /// `/sys/fs/cgroup/unified/pftrace-test-TAG-PID-SEQ`.
    pub fn new(tag: &str) -> Self {
        let root = Path::new(CGROUP_ROOT);
        assert!(
            is_cgroup2(root) && root.join("cgroup.procs").is_file(),
            "prerequisite missing: cgroup v2 is not mounted at {CGROUP_ROOT}"
        );
        let path = root.join(format!(
            "pftrace-test-{tag}-{}-{}",
            std::process::id(),
            CG_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("creating cgroup {}: {e}", path.display()));
        Self { dirs: vec![path] }
    }

    pub fn path(&self) -> &Path {
        &self.dirs[0]
    }

    /// Creates a child cgroup `name` (a path relative to this cgroup; its
    /// parents must have been made by earlier calls).
    pub fn child(&mut self, name: &str) -> PathBuf {
        let path = self.dirs[0].join(name);
        fs::create_dir(&path).unwrap_or_else(|e| panic!("creating cgroup {}: {e}", path.display()));
        self.dirs.push(path.clone());
        path
    }

    /// Pids directly in the cgroup at `path`.
    pub fn procs(path: &Path) -> Vec<u32> {
        fs::read_to_string(path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for dir in self.dirs.iter().rev() {
            if !dir.exists() {
                continue;
            }
            // cgroup.kill (Linux 5.14+), else each process.
            if !Self::procs(dir).is_empty() && fs::write(dir.join("cgroup.kill"), "1").is_err() {
                for pid in Self::procs(dir) {
                    // SAFETY: only processes this test put in its own cgroup.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
            }
            // Dying tasks keep the cgroup busy for a moment.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if Instant::now() >= deadline => {
                        eprintln!(
                            "cannot remove cgroup {}: {e} (procs: {:?})",
                            dir.display(),
                            Self::procs(dir)
                        );
                        break;
                    }
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Python workers

/// How to start a worker.
pub struct WorkerSpec<'a> {
    pub python: PathBuf,
    pub script: PathBuf,
    /// Exec the interpreter inside this cgroup (the shell moves itself there first).
    pub cgroup: Option<&'a Path>,
    /// Pin to this CPU (`taskset -c CPU`).
    pub cpu: Option<u32>,
    pub env: Vec<(String, String)>,
}

impl<'a> WorkerSpec<'a> {
    pub fn new(python: &Path, script: &Path) -> Self {
        Self { python: python.into(), script: script.into(), cgroup: None, cpu: None, env: Vec::new() }
    }

    pub fn cgroup(mut self, cg: &'a Path) -> Self {
        self.cgroup = Some(cg);
        self
    }

    pub fn cpu(mut self, cpu: u32) -> Self {
        self.cpu = Some(cpu);
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    /// Starts the worker and waits for its `ready` line.
    pub fn start(self, label: &str) -> Worker {
        let mut argv: Vec<String> = Vec::new();
        if let Some(cpu) = self.cpu {
            argv.extend(["taskset".into(), "-c".into(), cpu.to_string()]);
        }
        if let Some(cg) = self.cgroup {
            // $0 is the cgroup; the exec'd interpreter keeps the shell's pid.
            argv.extend([
                "/bin/sh".into(),
                "-c".into(),
                r#"echo $$ > "$0/cgroup.procs" && exec "$@""#.into(),
                cg.display().to_string(),
            ]);
        }
        argv.push(self.python.display().to_string());
        argv.push(self.script.display().to_string());
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]).current_dir(self.script.parent().unwrap_or(Path::new("/")));
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let worker = Worker::spawn(&mut cmd, false, format!("{label} ({})", argv.join(" ")));
        worker.expect("ready");
        if let Some(cg) = self.cgroup {
            let cgroup = fs::read_to_string(format!("/proc/{}/cgroup", worker.pid())).unwrap_or_default();
            let rel = cg.strip_prefix(CGROUP_ROOT).expect("cgroup under the cgroup2 mount");
            assert!(
                cgroup
                    .lines()
                    .any(|l| l.starts_with("0::") && Path::new(&l[3..]) == Path::new("/").join(rel)),
                "{} is not in {}: /proc/PID/cgroup says\n{cgroup}",
                worker.label,
                cg.display()
            );
        }
        worker
    }
}

/// A running worker (see [`WORKER`]); killed on drop.
pub struct Worker {
    guard: Guard,
    stdin: Option<ChildStdin>,
    rx: mpsc::Receiver<String>,
    all: Arc<Mutex<String>>,
    label: String,
}

impl Worker {
    /// Starts `cmd` with its stdin and stdout piped to the test (stderr
    /// inherited); `group`: it leads a process group, killed whole on drop.
    pub fn spawn(cmd: &mut Command, group: bool, label: String) -> Worker {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut guard = Guard::spawn(cmd, group);
        let stdin = guard.child.stdin.take();
        let stdout = guard.child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        let all = Arc::new(Mutex::new(String::new()));
        let all2 = Arc::clone(&all);
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                all2.lock().unwrap().push_str(&line);
                all2.lock().unwrap().push('\n');
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Worker { guard, stdin, rx, all, label }
    }

    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// The next line it prints; panics after [`WAIT`] or at end of output.
    pub fn line(&self) -> String {
        match self.rx.recv_timeout(WAIT) {
            Ok(l) => l,
            Err(e) => panic!(
                "no line from worker {} within {WAIT:?} ({e}); output so far:\n{}",
                self.label,
                self.all.lock().unwrap()
            ),
        }
    }

    /// Reads a line that must start with `word`; returns the rest, trimmed.
    pub fn expect(&self, word: &str) -> String {
        let line = self.line();
        match line.strip_prefix(word) {
            Some(rest) => rest.trim().to_string(),
            None => panic!("worker {} printed {line:?}, expected {word:?}", self.label),
        }
    }

    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        writeln!(stdin, "{line}").and_then(|()| stdin.flush()).expect("writing to the worker's stdin");
    }

    /// Calls `name` `n` times and waits until it has.
    pub fn call(&mut self, name: &str, n: u64) {
        self.send(&format!("call {name} {n}"));
        self.expect("done");
    }

    /// Times `n` calls of `name`: (CPU seconds, wall seconds).
    pub fn time(&mut self, name: &str, n: u64) -> (f64, f64) {
        self.send(&format!("time {name} {n}"));
        let rest = self.expect("done");
        let mut it = rest.split_whitespace().map(|s| s.parse::<f64>().expect("a number"));
        (it.next().expect("cpu"), it.next().expect("wall"))
    }

    /// Closes stdin and waits for a clean exit.
    pub fn finish(&mut self) -> ExitStatus {
        drop(self.stdin.take());
        let status = self.guard.wait(WAIT, &format!("worker {}", self.label));
        assert!(status.success(), "worker {} exited with {status}", self.label);
        status
    }
}

/// Writes the worker script into `dir`.
pub fn worker_script(dir: &TestDir) -> PathBuf {
    dir.script("worker.py", WORKER)
}

// ---------------------------------------------------------------------------
// The daemon and pftracectl

/// pftraced tracing `names` and serving its control socket in `dir`
/// (`--socket DIR/pftraced.sock`, plus the harness's `-o` trace file).
pub fn serving<'a>(dir: &'a TestDir, names: &[&str]) -> Pftraced<'a> {
    // Let other users reach the socket's directory: the socket's own mode is
    // what keeps them out (tested in service_control).
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    Pftraced::new(dir, names).arg("--socket").arg(socket_of(dir))
}

pub fn socket_of(dir: &TestDir) -> PathBuf {
    dir.join("pftraced.sock")
}

/// Runs `pftracectl --socket SOCKET ARGS...`.
pub fn ctl(socket: &Path, args: &[&str]) -> Output {
    Command::new(PFTRACECTL)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {PFTRACECTL}: {e}"))
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs pftracectl and returns its output; panics with its stderr if it fails.
pub fn ctl_checked(socket: &Path, args: &[&str]) -> Output {
    let out = ctl(socket, args);
    assert!(
        out.status.success(),
        "pftracectl {args:?} failed ({}):\nstderr: {}\nstdout: {}",
        out.status,
        text(&out.stderr),
        text(&out.stdout)
    );
    out
}

/// Runs pftracectl and returns its stdout; panics with its stderr if it fails.
pub fn ctl_ok(socket: &Path, args: &[&str]) -> String {
    text(&ctl_checked(socket, args).stdout)
}

/// `pftracectl status --json`, parsed.
pub fn status(socket: &Path) -> Value {
    let out = ctl_ok(socket, &["status", "--json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json is not JSON ({e}):\n{out}"))
}

/// Whether `pid` has exited (gone, or a zombie waiting to be reaped).
pub fn exited(pid: u32) -> bool {
    pftrace::procinfo::has_exited(pid)
}

/// Polls `check` on `status --json` every 20 ms until it returns true;
/// panics after [`WAIT`] (or when the daemon exits) describing `what`.
pub fn wait_status(socket: &Path, daemon_pid: u32, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    wait_status_within(socket, daemon_pid, what, WAIT, check)
}

/// [`wait_status`] with another time limit.
pub fn wait_status_within(
    socket: &Path,
    daemon_pid: u32,
    what: &str,
    limit: Duration,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        assert!(!exited(daemon_pid), "pftraced (pid {daemon_pid}) exited while waiting for {what}");
        let out = ctl(socket, &["status", "--json"]);
        let last = if out.status.success() {
            let v: Value = serde_json::from_slice(&out.stdout)
                .unwrap_or_else(|e| panic!("status --json is not JSON ({e}):\n{}", text(&out.stdout)));
            if check(&v) {
                return v;
            }
            serde_json::to_string_pretty(&v).unwrap()
        } else {
            text(&out.stderr)
        };
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}; last status:\n{last}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the daemon answers on its socket.
pub fn wait_serving(socket: &Path, tracer: &RunningTracer) -> Value {
    wait_status(socket, tracer.pid(), "pftraced to serve its control socket", |_| true)
}

/// The status entry of process `pid`, if listed.
pub fn process_entry(status: &Value, pid: u32) -> Option<&Value> {
    status["processes"].as_array()?.iter().find(|p| p["pid"].as_u64() == Some(pid as u64))
}

/// Waits until `pid` is listed as a running traced process (its probes are attached).
pub fn wait_traced(socket: &Path, tracer: &RunningTracer, pid: u32) -> Value {
    wait_status(socket, tracer.pid(), &format!("pid {pid} to be traced"), |s| {
        process_entry(s, pid).is_some_and(|p| p["running"] == true)
    })
}

/// Pids listed in a status.
pub fn status_pids(status: &Value) -> Vec<u32> {
    status["processes"].as_array().unwrap().iter().map(|p| p["pid"].as_u64().unwrap() as u32).collect()
}

/// `pftracectl dump` (to stdout, a pipe here), checked as JSON and parsed.
pub fn dump(socket: &Path) -> Trace {
    let out = ctl(socket, &["dump"]);
    assert!(out.status.success(), "pftracectl dump failed: {}", text(&out.stderr));
    let _: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("pftracectl dump is not valid JSON: {e}\n{}", text(&out.stderr)));
    let trace = Trace::parse(&text(&out.stdout)).unwrap_or_else(|e| panic!("bad dump: {e}"));
    let said = format!("pftracectl: wrote {} calls (", trace.calls.len());
    assert!(
        text(&out.stderr).starts_with(&said),
        "dump's stderr does not say {said:?}: {}",
        text(&out.stderr)
    );
    trace
}

/// `pftracectl stop`, then waits for the daemon to exit 0 and returns its run.
pub fn stop(socket: &Path, tracer: RunningTracer) -> TracedRun {
    let out = ctl_ok(socket, &["stop"]);
    assert_eq!(out, "pftraced is stopping: finishing its output files and detaching\n");
    let run = tracer.finish();
    run.assert_code(0);
    assert!(!socket.exists(), "the control socket {} outlived the daemon", socket.display());
    run
}

/// Calls of `name` per pid.
pub fn counts_by_pid<'a>(calls: impl IntoIterator<Item = &'a CallEvent>, name: &str) -> BTreeMap<u32, u64> {
    let mut m = BTreeMap::new();
    for c in calls.into_iter().filter(|c| c.name == name) {
        *m.entry(c.pid).or_default() += 1;
    }
    m
}

/// Calls per (pid, name).
pub fn counts<'a>(calls: impl IntoIterator<Item = &'a CallEvent>) -> BTreeMap<(u32, String), u64> {
    let mut m = BTreeMap::new();
    for c in calls {
        *m.entry((c.pid, c.name.clone())).or_default() += 1;
    }
    m
}

/// Builds the expected per-(pid, name) map from a list.
pub fn expected(items: &[(u32, &str, u64)]) -> BTreeMap<(u32, String), u64> {
    items.iter().map(|&(pid, name, n)| ((pid, name.to_string()), n)).collect()
}

/// Other pftraced processes on the host (another test run with `--all`
/// would raise every Python's semaphores): named in failure messages.
pub fn other_daemons(except: &[u32]) -> String {
    let mut found = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if except.contains(&pid) {
            continue;
        }
        if fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "pftraced") {
            let cmd = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            found.push(format!("{pid}: {}", text(&cmd).replace('\0', " ")));
        }
    }
    if found.is_empty() { "none".into() } else { found.join("; ") }
}
