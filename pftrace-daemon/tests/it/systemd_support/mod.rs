//! A real systemd for tests: the Debian bookworm root `cargo xtask setup`
//! makes (/var/cache/pftrace/bookworm-systemd, or `$PFTRACE_SYSTEMD_ROOT`),
//! booted with `systemd-nspawn -b` (systemd is PID 1 of the container; it is
//! not on these machines), with the pftraced and pftracectl under test, the
//! packaging directory and the probe-enabled CPython bound read-only inside,
//! and the test's directory at /test.
//!
//! - The root is never changed: nspawn's `--volatile=overlay` puts a tmpfs
//!   over it for the container's life (a per-test copy of the 200 MB tree
//!   took 0.7 s to make and 2.6 s to delete here; the overlay costs nothing).
//! - The container runs in cgroups of its own (v2, and the name=systemd v1
//!   hierarchy where the host has one), so its systemd's cgroups are found
//!   and removed after it, and several containers can run at once.
//! - Commands run inside with `nsenter -t PID -a`, PID being the
//!   container's systemd as the host sees it, each under `timeout`.
//! - Teardown always runs, also when a test panics: an orderly halt (SIGTERM
//!   to nspawn, 1.4-5 s here), else SIGKILL to every process in the
//!   container's cgroups and to nspawn's process group; then its cgroups and
//!   anything left mounted or in /run/systemd/nspawn under its name go.
//!
//! Prerequisites missing (root, systemd-nspawn, nsenter, the root) fail the
//! test with what to do; nothing is skipped.

use std::{
    collections::BTreeMap,
    env, fs,
    io::Read as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    common::Worker,
    common::{Guard, TestDir, python, require_root, require_tool},
};

/// Where `cargo xtask setup` makes the root.
pub const DEFAULT_ROOT: &str = "/var/cache/pftrace/bookworm-systemd";
/// The file setup writes into the root once it is checked.
const ROOT_MARKER: &str = ".pftrace-ok";
/// The host's cgroup v2 mount, and the name=systemd v1 hierarchy beside it
/// (a hybrid host, like these machines; absent on a pure v2 host).
const CGROUP2: &str = "/sys/fs/cgroup/unified";
const CGROUP_SYSTEMD: &str = "/sys/fs/cgroup/systemd";
/// nspawn's per-machine state on the host.
const NSPAWN_RUN: &str = "/run/systemd/nspawn/propagate";
/// Where the container sees the binaries under test and the packaging files
/// (the unit's header installs from `target/release/` and `packaging/`).
pub const SRC: &str = "/src";
/// Where the container sees the test's directory (read-write).
pub const TEST_DIR: &str = "/test";
/// How long booting, one command, or an orderly halt may take.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
const HALT_TIMEOUT: Duration = Duration::from_secs(15);
/// nspawn's seccomp filter refuses BPF map creation inside units without
/// these (FIELD-NOTES, "A real systemd for tests").
const SYSCALLS: &str = "--system-call-filter=bpf perf_event_open @debug @privileged";
/// PATH inside the container.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

static SEQ: AtomicU32 = AtomicU32::new(0);

/// The root to boot: `$PFTRACE_SYSTEMD_ROOT`, else [`DEFAULT_ROOT`]; panics
/// (the test fails) when it is missing or not finished by setup.
pub fn root() -> PathBuf {
    let root = env::var_os("PFTRACE_SYSTEMD_ROOT")
        .filter(|r| !r.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_ROOT), PathBuf::from);
    assert!(
        root.join(ROOT_MARKER).is_file() && root.join("usr/lib/systemd/systemd").is_file(),
        "prerequisite missing: no Debian root with systemd at {} (root from PFTRACE_SYSTEMD_ROOT, default \
         {DEFAULT_ROOT}): run `cargo xtask setup` (as root), or use `cargo xtask test`",
        root.display()
    );
    root
}

/// The workspace's `packaging` directory (unit file, example config).
pub fn packaging_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging").canonicalize().expect("packaging/ exists")
}

/// A booted container; torn down on drop.
pub struct Container {
    machine: String,
    root: PathBuf,
    nspawn: Option<Guard>,
    /// What nspawn and the container's console printed.
    console: Arc<Mutex<String>>,
    /// The container's systemd, as the host numbers it.
    init: u32,
    /// cgroups made for nspawn (v2 first, then name=systemd if present).
    cgroups: Vec<PathBuf>,
    /// How long boot took, up to `is-system-running` saying running.
    pub boot_time: Duration,
}

impl Container {
    /// Boots the root with `dir` bound at [`TEST_DIR`]; returns once
    /// `systemctl is-system-running` says `running`. Panics (after tearing
    /// down) when it does not get there, listing failed units.
    pub fn boot(dir: &TestDir) -> Self {
        require_root();
        let nspawn = require_tool("systemd-nspawn", "systemd-container");
        require_tool("nsenter", "util-linux");
        let root = root();
        let python = python();
        // PREFIX/bin/python3.9 -> PREFIX, bound at the same path.
        let prefix = python.parent().and_then(Path::parent).expect("PREFIX/bin/python").to_path_buf();
        let machine = format!("pftrace-test-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));

        let mut cgroups = vec![Path::new(CGROUP2).join(&machine)];
        if is_named_systemd_hierarchy(Path::new(CGROUP_SYSTEMD)) {
            cgroups.push(Path::new(CGROUP_SYSTEMD).join(&machine));
        }
        for cg in &cgroups {
            fs::create_dir(cg).unwrap_or_else(|e| panic!("creating cgroup {}: {e}", cg.display()));
        }
        let bin =
            |name: &str| format!("--bind-ro={}:{SRC}/target/release/{name}", bin_under_test(name).display());
        let mut cmd = Command::new("/bin/sh");
        // The shell joins the cgroups, then becomes nspawn.
        cmd.arg("-c")
            .arg(r#"for cg in $CGROUPS; do echo $$ > "$cg/cgroup.procs" || exit 125; done; exec "$@""#)
            .arg("sh")
            .arg(&nspawn)
            .args(["-q", "-b", "--volatile=overlay", "--capability=all", "--console=pipe"])
            .args(["--register=no", "--keep-unit", SYSCALLS])
            .arg(format!("--machine={machine}"))
            .arg("-D")
            .arg(&root)
            .arg(bin("pftraced"))
            .arg(bin("pftracectl"))
            .arg(format!("--bind-ro={}:{SRC}/packaging", packaging_dir().display()))
            .arg(format!("--bind-ro={}", prefix.display()))
            .arg(format!("--bind={}:{TEST_DIR}", dir.path().display()))
            .env("CGROUPS", cgroups.iter().map(|c| c.display().to_string()).collect::<Vec<_>>().join(" "))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut guard = Guard::spawn(&mut cmd, true);
        let console = Arc::new(Mutex::new(String::new()));
        for stream in [
            Box::new(guard.child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(guard.child.stderr.take().unwrap()),
        ] {
            let console = Arc::clone(&console);
            thread::spawn(move || {
                let mut stream = stream;
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    console.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        let mut container = Container {
            machine,
            root,
            nspawn: Some(guard),
            console,
            init: 0,
            cgroups,
            boot_time: Duration::ZERO,
        };
        container.init = container.find_init(started);
        container.wait_running(started);
        container.boot_time = started.elapsed();
        eprintln!(
            "[systemd] {} booted in {:.2} s (systemd is pid {} on the host)",
            container.machine,
            container.boot_time.as_secs_f64(),
            container.init
        );
        container
    }

    /// The container's systemd as the host numbers it: nspawn's child that
    /// is PID 1 of its own namespace.
    fn find_init(&mut self, started: Instant) -> u32 {
        let nspawn = self.nspawn.as_ref().unwrap().pid();
        loop {
            for entry in fs::read_dir("/proc").unwrap().flatten() {
                let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else { continue };
                let field = |name: &str| {
                    status
                        .lines()
                        .find_map(|l| l.strip_prefix(name))
                        .map(|v| v.split_whitespace().collect::<Vec<_>>())
                };
                let parent = field("PPid:").and_then(|v| v.first()?.parse::<u32>().ok());
                let nspid = field("NSpid:").unwrap_or_default();
                // Once it has exec'd systemd (before, it is nspawn's child process).
                let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                if parent == Some(nspawn)
                    && nspid.len() >= 2
                    && nspid.last() == Some(&"1")
                    && comm.trim() == "systemd"
                {
                    return pid;
                }
            }
            if let Some(status) = self.nspawn.as_mut().unwrap().try_wait() {
                self.fail(&format!(
                    "systemd-nspawn exited ({status}) before the container's systemd started"
                ));
            }
            if started.elapsed() > BOOT_TIMEOUT {
                self.fail(&format!("the container's systemd did not appear within {BOOT_TIMEOUT:?}"));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for `systemctl is-system-running` to say `running`.
    fn wait_running(&mut self, started: Instant) {
        let mut last;
        loop {
            let out = self.exec(&["systemctl", "is-system-running"]);
            let state = text(&out.stdout).trim().to_string();
            match state.as_str() {
                "running" => return,
                // Still booting, or D-Bus not up yet (no state printed, or
                // "offline": systemctl found no systemd to talk to yet).
                "initializing" | "starting" | "offline" | "" => {}
                _ => {
                    let failed =
                        self.exec(&["systemctl", "--failed", "--no-legend", "--plain", "--no-pager"]);
                    self.fail(&format!(
                        "systemctl is-system-running says {state:?}, not \"running\"; failed units:\n{}",
                        text(&failed.stdout)
                    ));
                }
            }
            last = format!("{state:?} {}", text(&out.stderr).trim());
            if let Some(status) = self.nspawn.as_mut().unwrap().try_wait() {
                self.fail(&format!("systemd-nspawn exited ({status}) while the container booted"));
            }
            if started.elapsed() > BOOT_TIMEOUT {
                let failed = self.exec(&["systemctl", "--failed", "--no-legend", "--plain", "--no-pager"]);
                let jobs = self.exec(&["systemctl", "list-jobs", "--no-legend", "--no-pager"]);
                self.fail(&format!(
                    "not running after {BOOT_TIMEOUT:?} (last is-system-running: {last}); failed units:\n{}\
                     jobs:\n{}",
                    text(&failed.stdout),
                    text(&jobs.stdout)
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Tears down and panics with `what`, the console output and the journal's tail.
    fn fail(&mut self, what: &str) -> ! {
        let journal = if self.init != 0 {
            text(&self.exec(&["journalctl", "-b", "-n", "40", "--no-pager"]).stdout)
        } else {
            String::new()
        };
        let console = self.console.lock().unwrap().clone();
        self.teardown();
        panic!(
            "container {} from {}: {what}\n--- nspawn and console output ---\n{console}\n--- journal (last 40) ---\n{journal}",
            self.machine,
            self.root.display()
        );
    }

    /// The host pid of the container's systemd (for `nsenter -t`).
    #[allow(dead_code)] // no test uses it today
    pub fn init_pid(&self) -> u32 {
        self.init
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `nsenter -t INIT -a timeout ... ARGV` with a clean environment: the
    /// command runs in every namespace of the container.
    fn command(&self, argv: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t")
            .arg(self.init.to_string())
            .arg("-a")
            .args(["timeout", "--kill-after=5", &COMMAND_TIMEOUT.as_secs().to_string()])
            .args(argv)
            .env_clear()
            .env("PATH", PATH)
            .env("LANG", "C.UTF-8")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs a command inside and returns its output, whatever its status.
    pub fn exec(&self, argv: &[&str]) -> Output {
        self.command(argv).output().unwrap_or_else(|e| panic!("cannot run nsenter for {argv:?}: {e}"))
    }

    /// Runs a command inside; panics with its output unless it exits 0; returns stdout.
    pub fn ok(&self, argv: &[&str]) -> String {
        let out = self.exec(argv);
        assert!(
            out.status.success(),
            "in the container, {argv:?} failed ({}{}):\nstderr: {}\nstdout: {}",
            out.status,
            if out.status.code() == Some(124) { ", timed out" } else { "" },
            text(&out.stderr),
            text(&out.stdout)
        );
        text(&out.stdout)
    }

    /// `sh -c SCRIPT` inside, in `cwd`; panics unless it exits 0; returns stdout.
    pub fn sh(&self, cwd: &str, script: &str) -> String {
        self.ok(&["sh", "-c", &format!("cd {cwd} && {script}")])
    }

    /// Starts a command inside with its stdin and stdout piped to the test
    /// (e.g. `systemd-run --scope ... python`); killed on drop.
    pub fn spawn(&self, argv: &[&str]) -> Worker {
        Worker::start_as(&mut self.command(argv), true, format!("{argv:?} in the container"))
    }

    /// `systemctl show UNIT -p P...` as a map.
    pub fn show(&self, unit: &str, properties: &[&str]) -> BTreeMap<String, String> {
        let mut argv = vec!["systemctl", "show", unit, "--no-pager"];
        for p in properties {
            argv.extend(["-p", p]);
        }
        self.ok(&argv)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The journal's entries for `unit` since boot (`journalctl -u UNIT -o json`):
    /// the unit's own lines and systemd's about it.
    pub fn journal(&self, unit: &str) -> Vec<JournalEntry> {
        let out = self.ok(&["journalctl", "-b", "-u", unit, "-o", "json", "--no-pager"]);
        out.lines()
            .map(|l| {
                let v: Value =
                    serde_json::from_str(l).unwrap_or_else(|e| panic!("journalctl -o json line ({e}): {l}"));
                JournalEntry::from_json(&v)
            })
            .collect()
    }

    /// Stops the container and cleans up after it (idempotent).
    fn teardown(&mut self) {
        let Some(mut nspawn) = self.nspawn.take() else { return };
        let started = Instant::now();
        let mut how = "halted";
        if nspawn.try_wait().is_none() {
            // SAFETY: signalling our own unreaped child.
            unsafe { libc::kill(nspawn.pid() as i32, libc::SIGTERM) };
            if nspawn.wait_timeout(HALT_TIMEOUT).is_none() {
                how = "killed";
                for cg in &self.cgroups {
                    kill_cgroup(cg);
                }
                nspawn.kill(); // the process group, then reaps
            }
        }
        drop(nspawn);
        for cg in &self.cgroups {
            remove_cgroup_tree(cg);
        }
        let run_dir = Path::new(NSPAWN_RUN).join(&self.machine);
        for mount in mounts_under(&run_dir) {
            unmount(&mount);
        }
        if run_dir.exists() {
            let _ = fs::remove_dir_all(&run_dir);
        }
        eprintln!(
            "[systemd] {} {how} and cleaned up in {:.2} s",
            self.machine,
            started.elapsed().as_secs_f64()
        );
    }

    /// Tears down now, for tests that check what remains afterwards.
    pub fn shut_down(mut self) {
        self.teardown();
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if thread::panicking() && self.nspawn.is_some() && self.init != 0 {
            let journal = self.exec(&["journalctl", "-b", "-n", "60", "--no-pager"]);
            eprintln!("--- the container's journal (last 60 lines) ---\n{}", text(&journal.stdout));
        }
        self.teardown();
    }
}

/// One journal entry: the fields the tests read.
#[derive(Debug, Clone)]
pub struct JournalEntry {
    pub message: String,
    /// Syslog priority (3 err, 4 warning, 6 info, 7 debug).
    pub priority: Option<u8>,
    pub pid: Option<u32>,
    pub identifier: String,
}

impl JournalEntry {
    fn from_json(v: &Value) -> Self {
        // MESSAGE is a string, or an array of bytes when not valid UTF-8.
        let message = match &v["MESSAGE"] {
            Value::String(s) => s.clone(),
            Value::Array(bytes) => String::from_utf8_lossy(
                &bytes.iter().filter_map(|b| b.as_u64().map(|b| b as u8)).collect::<Vec<_>>(),
            )
            .into_owned(),
            _ => String::new(),
        };
        let field = |key: &str| v[key].as_str().unwrap_or_default();
        Self {
            message,
            priority: field("PRIORITY").parse().ok(),
            pid: field("_PID").parse().ok(),
            identifier: v["SYSLOG_IDENTIFIER"].as_str().unwrap_or_default().to_string(),
        }
    }
}

/// The pftraced or pftracectl built for this test run.
fn bin_under_test(name: &str) -> PathBuf {
    let path = match name {
        "pftraced" => PathBuf::from(env!("CARGO_BIN_EXE_pftraced")),
        "pftracectl" => PathBuf::from(env!("CARGO_BIN_EXE_pftracectl")),
        _ => unreachable!("{name}"),
    };
    assert!(path.is_file(), "{} was not built", path.display());
    path
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Whether `path` is a cgroup v1 mount of the name=systemd hierarchy.
fn is_named_systemd_hierarchy(path: &Path) -> bool {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mountinfo.lines().any(|l| {
        let fields: Vec<&str> = l.split(' ').collect();
        let after = fields.iter().position(|f| *f == "-").map(|i| &fields[i + 1..]).unwrap_or_default();
        fields.get(4).is_some_and(|m| Path::new(m) == path)
            && after.first() == Some(&"cgroup")
            && after.get(2).is_some_and(|o| o.split(',').any(|o| o == "name=systemd"))
    })
}

/// Kills every process in the cgroup tree at `cg` (cgroup.kill on v2; each
/// pid of each `cgroup.procs` on v1).
fn kill_cgroup(cg: &Path) {
    if fs::write(cg.join("cgroup.kill"), "1").is_ok() {
        return;
    }
    for dir in cgroup_dirs(cg) {
        for pid in fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default().lines() {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                // SAFETY: processes of the container this test booted.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// `cg` and every cgroup below it, deepest first.
fn cgroup_dirs(cg: &Path) -> Vec<PathBuf> {
    let mut dirs = vec![cg.to_path_buf()];
    let mut i = 0;
    while i < dirs.len() {
        if let Ok(entries) = fs::read_dir(&dirs[i]) {
            dirs.extend(
                entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()),
            );
        }
        i += 1;
    }
    dirs.reverse();
    dirs
}

/// Removes a cgroup tree, waiting up to 10 s for dying processes to leave.
fn remove_cgroup_tree(cg: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    for dir in cgroup_dirs(cg) {
        loop {
            match fs::remove_dir(&dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if Instant::now() >= deadline => {
                    eprintln!("[systemd] cannot remove cgroup {}: {e}", dir.display());
                    break;
                }
                Err(_) => {
                    kill_cgroup(&dir);
                    thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
}

/// Mount points at or under `dir` on the host, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| m.starts_with(dir))
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    found
}

fn unmount(path: &Path) {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else { return };
    // SAFETY: a valid C string; MNT_DETACH, as nothing of ours uses it.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        eprintln!("[systemd] cannot unmount {}: {}", path.display(), std::io::Error::last_os_error());
    }
}
