//! pftraced as a service (cgroup scopes, the control socket): cgroups made
//! per test and removed on drop, the one worker script, driven line by line
//! over stdin (optionally placed in a cgroup or pinned to a CPU), pftraced
//! serving its socket on a worker, and `pftracectl` calls with timeouts and
//! clear panic messages.
//!
//! Everything a test starts is killed on drop, so a failing test leaves no
//! process, cgroup or socket behind (its test directory is kept for a look).

use std::{
    collections::BTreeMap,
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{
        LazyLock,
        atomic::{AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use super::{CallEvent, Pftraced, PyProcess, RunningTracer, TestDir, Trace, TracedRun, python};

/// The pftracectl binary under test.
pub const PFTRACECTL: &str = env!("CARGO_BIN_EXE_pftracectl");

/// Where this host mounts cgroup v2, from /proc/self/mountinfo (the test
/// fails, naming it, where there is none).
pub fn cgroup_root() -> &'static Path {
    static ROOT: LazyLock<PathBuf> = LazyLock::new(|| {
        let mounts =
            procfs::process::Process::myself().and_then(|me| me.mountinfo()).expect("/proc/self/mountinfo");
        let mount = mounts.into_iter().find(|m| m.fs_type == "cgroup2");
        mount.expect("prerequisite missing: no cgroup v2 mount in /proc/self/mountinfo").mount_point
    });
    &ROOT
}

/// How long to wait for the daemon or a worker to reach a state.
pub const WAIT: Duration = Duration::from_secs(30);

/// The worker the tests drive: it defines `foo`, `bar`, `f`, `quick` and
/// `slow`, and a function for each name given as an argument
/// ([`WorkerSpec::functions`]); prints `ready`, then obeys one command per
/// stdin line and answers `done ...` when it is carried out.
///
/// * `call NAME N`: calls NAME N times; `done`.
/// * `time NAME N`: calls NAME N times; `done CPU_SECONDS WALL_SECONDS`
///   (CPU time of the process: what the loop cost, whatever else the CPU ran).
/// * `loop NAME STOPFILE [PAUSE_MS]`: calls NAME in rounds of 1000 (with a
///   pause after each, if given) until STOPFILE exists; `done CALLS`.
/// * `slow SECONDS`: calls quick() 5 times, then slow(SECONDS), which prints
///   `inside` and sleeps; `done`.
///
/// At end of input it exits 0.
pub const WORKER: &str = r#"
    import os, sys, time

    def foo():
        pass

    def bar():
        pass

    def f():
        pass

    def quick():
        pass

    def slow(seconds):
        print("inside", flush=True)
        time.sleep(seconds)

    for name in sys.argv[1:]:
        exec("def %s():\n    pass" % name)

    print("ready", flush=True)
    while True:
        line = sys.stdin.readline()
        if not line:
            break
        cmd, *args = line.split()
        if cmd == "slow":
            for _ in range(5):
                quick()
            slow(float(args[0]))
            print("done", flush=True)
            continue
        fn = globals()[args[0]]
        if cmd == "call":
            for _ in range(int(args[1])):
                fn()
            print("done", flush=True)
        elif cmd == "time":
            n = int(args[1])
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(n):
                fn()
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            print("done %.9f %.9f" % (cpu, wall), flush=True)
        elif cmd == "loop":
            n, pause = 0, float(args[2]) / 1000 if len(args) > 2 else 0
            while not os.path.exists(args[1]):
                for _ in range(1000):
                    fn()
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
    rustix::fs::statfs(path).is_ok_and(|st| st.f_type == 0x6367_7270)
}

/// A cgroup v2 directory of one test (and the child cgroups made in it).
/// On drop every process in them is killed (`cgroup.kill`) and the
/// directories are removed, children first.
pub struct Cgroup {
    /// The test's cgroup first, then children in creation order.
    dirs: Vec<PathBuf>,
}

impl Cgroup {
    /// `CGROUP2_MOUNT/pftrace-test-TAG-PID-SEQ`.
    pub fn new(tag: &str) -> Self {
        let root = cgroup_root();
        assert!(
            is_cgroup2(root) && root.join("cgroup.procs").is_file(),
            "prerequisite missing: {} is not a cgroup v2 mount",
            root.display()
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

/// The shell script that starts a program inside a cgroup: `$0` is the
/// cgroup; the shell moves itself there, then execs, so the program keeps
/// the shell's pid and runs no instruction outside the cgroup.
pub const ENTER_CGROUP: &str = r#"echo $$ > "$0/cgroup.procs" && exec "$@""#;

/// A command running `program args...` inside the cgroup `cg` from its
/// first instruction (see [`ENTER_CGROUP`]); the caller adds what else it
/// needs (more arguments, stdio, environment) and spawns it.
pub fn in_cgroup<S: AsRef<std::ffi::OsStr>>(
    cg: &Path,
    program: impl AsRef<std::ffi::OsStr>,
    args: impl IntoIterator<Item = S>,
) -> Command {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c").arg(ENTER_CGROUP).arg(cg).arg(program).args(args);
    cmd
}

// ---------------------------------------------------------------------------
// Python workers

/// How to start a worker (any script that prints `ready` first, usually [`WORKER`]).
pub struct WorkerSpec<'a> {
    pub python: PathBuf,
    pub script: PathBuf,
    /// Arguments of the script (for [`WORKER`]: more function names).
    pub args: Vec<String>,
    /// Exec the interpreter inside this cgroup (the shell moves itself there first).
    pub cgroup: Option<&'a Path>,
    /// Pin to this CPU (`taskset -c CPU`).
    pub cpu: Option<u32>,
    pub env: Vec<(String, String)>,
}

impl<'a> WorkerSpec<'a> {
    pub fn new(python: &Path, script: &Path) -> Self {
        Self {
            python: python.into(),
            script: script.into(),
            args: Vec::new(),
            cgroup: None,
            cpu: None,
            env: Vec::new(),
        }
    }

    /// More functions for [`WORKER`] to define, by name.
    #[allow(dead_code)] // no test uses it today; WORKER's interface
    pub fn functions(mut self, names: &[&str]) -> Self {
        self.args.extend(names.iter().map(|n| n.to_string()));
        self
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
            argv.extend(["/bin/sh".into(), "-c".into(), ENTER_CGROUP.into(), cg.display().to_string()]);
        }
        argv.push(self.python.display().to_string());
        argv.push(self.script.display().to_string());
        argv.extend(self.args.iter().cloned());
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]).current_dir(self.script.parent().unwrap_or(Path::new("/")));
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let worker = PyProcess::start(&mut cmd, format!("{label} ({})", argv.join(" ")));
        worker.expect("ready");
        if let Some(cg) = self.cgroup {
            let cgroup = fs::read_to_string(format!("/proc/{}/cgroup", worker.pid())).unwrap_or_default();
            let rel = cg.strip_prefix(cgroup_root()).expect("cgroup under the cgroup2 mount");
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
pub type Worker = PyProcess;

/// Writes the worker script into `dir`.
pub fn worker_script(dir: &TestDir) -> PathBuf {
    dir.script("worker.py", WORKER)
}

// ---------------------------------------------------------------------------
// The daemon and pftracectl

/// pftraced tracing `names` in process `pid` (plus `args`), serving its
/// control socket in `dir` ([`serving`]), once it has attached and answers.
pub fn serve_on(dir: &TestDir, names: &[&str], pid: u32, args: &[&str]) -> (PathBuf, RunningTracer) {
    let socket = socket_of(dir);
    let tracer = serving(dir, names).pid(pid).args(args).spawn();
    tracer.wait_attached(pid);
    wait_serving(&socket, &tracer);
    (socket, tracer)
}

/// A [`WORKER`] started in `dir`, and pftraced [`serve_on`] it.
pub fn traced_worker(dir: &TestDir, names: &[&str], args: &[&str]) -> (Worker, PathBuf, RunningTracer) {
    let w = WorkerSpec::new(&python(), &worker_script(dir)).start("worker");
    let (socket, tracer) = serve_on(dir, names, w.pid(), args);
    (w, socket, tracer)
}

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

/// Waits until pftraced has closed every control connection on `socket`:
/// its accepted connections are listed in /proc/net/unix under the
/// socket's path, connected. A connection closes on the daemon's side a
/// little after the client has its reply, so until then a count of the
/// daemon's descriptors holds one more socket than it keeps.
pub fn wait_connections_closed(socket: &Path) {
    let deadline = Instant::now() + WAIT;
    loop {
        let entries = procfs::net::unix().expect("/proc/net/unix");
        let open = entries
            .iter()
            .filter(|e| e.path.as_deref() == Some(socket) && e.state == procfs::net::UnixState::CONNECTED)
            .count();
        if open == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pftraced still holds {open} control connections on {} after {WAIT:?}",
            socket.display()
        );
        thread::sleep(Duration::from_millis(10));
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
    // Valid JSON throughout (IgnoredAny reads every byte, building nothing).
    let _: serde::de::IgnoredAny = serde_json::from_slice(&out.stdout)
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

/// A process's peak resident memory (VmHWM), MiB.
pub fn peak_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmHWM in /proc/PID/status");
    kib / 1024
}
