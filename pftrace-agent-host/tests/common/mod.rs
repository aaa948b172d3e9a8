//! Shared harness of the agent tests: the real interpreters, the agent built
//! and installed root-owned, the control socket, and the kernel side loaded
//! and attached. Tests that load BPF run serially (one lock) and need root;
//! a missing prerequisite fails with what to do, never skips.
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Mutex, MutexGuard, OnceLock},
    time::{Duration, Instant},
};

use pftrace_agent::protocol::Report;
use pftrace_agent_host::{
    install::{self, Installed},
    kernel::{AgentKernel, AgentRecord, LoadOptions, Ring},
    server::{AgentConn, AgentServer},
};
use pftrace_common::agent;

/// Interpreters the agent is tested on: (label, path).
pub fn interpreters() -> Vec<(&'static str, PathBuf)> {
    let list = [
        ("pyenv-3.11.7", "/root/.pyenv/versions/3.11.7/bin/python3.11"),
        ("pyenv-3.12.1", "/root/.pyenv/versions/3.12.1/bin/python3.12"),
        ("pyenv-3.13.0", "/root/.pyenv/versions/3.13.0/bin/python3.13"),
        ("debian-3.13", "/var/cache/pftrace/debian-sid/usr/bin/python3.13"),
        ("debian-3.14", "/var/cache/pftrace/debian-sid/usr/bin/python3.14"),
        ("debian-3.15", "/var/cache/pftrace/debian-sid/usr/bin/python3.15"),
    ];
    list.iter()
        .map(|(label, p)| {
            let p = PathBuf::from(p);
            assert!(
                p.exists(),
                "{label}: {} is missing; run `cargo xtask setup` (it installs the test interpreters)",
                p.display()
            );
            (*label, p)
        })
        .collect()
}

/// Those of at least 3.14 (PEP 768).
pub fn interpreters_314() -> Vec<(&'static str, PathBuf)> {
    interpreters().into_iter().filter(|(l, _)| l.ends_with("3.14") || l.ends_with("3.15")).collect()
}

pub fn scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts")
}

/// The agent's shared object, built by cargo for this test profile.
pub fn agent_so() -> &'static Path {
    static SO: OnceLock<PathBuf> = OnceLock::new();
    SO.get_or_init(|| {
        let release = !cfg!(debug_assertions);
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-q", "-p", "pftrace-agent"]).current_dir(env!("CARGO_MANIFEST_DIR"));
        if release {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("running cargo build -p pftrace-agent");
        assert!(st.success(), "cargo build -p pftrace-agent failed");
        let dir = if release { "release" } else { "debug" };
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target").join(dir).join("libpftrace_agent.so");
        assert!(p.exists(), "{} missing after the build", p.display());
        p
    })
}

/// Serializes the tests that load BPF or measure time.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn require_root() {
    assert_eq!(unsafe { libc::geteuid() }, 0, "these tests load BPF programs: run them as root");
}

/// A fresh root-owned temporary directory (0755), removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("pftrace-agent-{tag}.{}.{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir(&p).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Everything pftraced would have for the agent path.
pub struct Host {
    pub tmp: TempDir,
    pub installed: Installed,
    pub server: AgentServer,
    pub kernel: AgentKernel,
    pub ring: Ring,
    /// Records drained but not yet asked for (other pids).
    pending: Vec<AgentRecord>,
}

impl Host {
    pub fn new(tag: &str) -> Self {
        require_root();
        let tmp = TempDir::new(tag);
        let installed =
            install::install(agent_so(), &tmp.0.join("agent"), &tmp.0.join("agent.sock")).unwrap();
        let server = AgentServer::bind(&installed.socket).unwrap();
        let mut kernel =
            AgentKernel::load(LoadOptions::default()).expect("loading the eBPF object (root, BPF)");
        kernel.attach_uprobe(&installed.agent_so(), agent::PROBE_SYMBOL).unwrap();
        let ring = kernel.take_ring().unwrap();
        Self { tmp, installed, server, kernel, ring, pending: Vec::new() }
    }

    /// Starts `python script args...` with the agent's directory in
    /// PFTRACE_AGENT_DIR (the script puts it on sys.path to import the
    /// agent) and stdout piped.
    pub fn spawn(&self, python: &Path, script: &Path, args: &[&str]) -> Child {
        Command::new(python)
            .arg(script)
            .args(args)
            .env("PFTRACE_AGENT_DIR", &self.installed.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Accepts the agent of `pid`, lets it report, and configures it.
    pub fn accept(&mut self, pid: u32, names: &[&str]) -> AgentConn {
        let mut conn = self.server.accept(Duration::from_secs(20)).expect("the agent did not connect");
        assert_eq!(conn.pid, pid, "SO_PEERCRED pid");
        self.kernel.track(pid).unwrap();
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        conn.configure(Report::Uprobe, &names).unwrap();
        conn
    }

    /// Every agent record of `pid` now on the ring (drains until quiet);
    /// other processes' records are kept for later calls.
    pub fn records(&mut self, pid: u32) -> Vec<AgentRecord> {
        let mut all = std::mem::take(&mut self.pending);
        let mut quiet_since = Instant::now();
        while quiet_since.elapsed() < Duration::from_millis(100) {
            let before = all.len();
            self.ring.drain(&mut all);
            if all.len() != before {
                quiet_since = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let (mine, others) = all.into_iter().partition(|r| r.pid == pid);
        self.pending = others;
        mine
    }
}

/// Waits for a child, with its stdout; panics with its stderr if it failed.
pub fn finish(child: Child, what: &str) -> String {
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what}: exit {}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Per-thread sequences of (entry?, name).
pub type Sequences = BTreeMap<u32, Vec<(bool, String)>>;

pub fn agent_sequences(records: &[AgentRecord]) -> Sequences {
    let mut sorted: Vec<&AgentRecord> = records.iter().collect();
    sorted.sort_by_key(|r| r.ts_ns);
    let mut out = Sequences::new();
    for r in sorted {
        out.entry(r.tid).or_default().push((r.entry, r.name.clone()));
    }
    out
}
