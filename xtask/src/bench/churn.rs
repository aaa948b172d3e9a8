//! The churn row: short-lived Pythons started one after another in a watched
//! cgroup, each calling `foo` on its first line, then every 5 ms for 50 ms
//! (bench/child.py). What fraction of their calls pftraced records, with
//! per-process attachment (the default) and with `--binary` (the
//! interpreter attached host-wide up front). And the first process after a
//! daemon starts: a new pftraced for each, the Python started the moment
//! the control socket is up (issue 13: 20 runs of 20).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::procs::Daemon;
use super::report::Target;
use super::trace_scan;

/// Calls each child makes.
const CALLS: u64 = 10;
/// Children alive at once.
const IN_FLIGHT: usize = 4;
/// Where cgroup v2 is mounted on this kind of machine.
/// Where this host mounts cgroup v2 (from /proc/self/mountinfo).
pub(super) fn cgroup_root() -> Result<PathBuf> {
    let mounts = procfs::process::Process::myself()
        .and_then(|me| me.mountinfo())
        .context("reading /proc/self/mountinfo")?;
    let mount = mounts.into_iter().find(|m| m.fs_type == "cgroup2");
    Ok(mount.context("no cgroup v2 mount in /proc/self/mountinfo: the churn case needs one")?.mount_point)
}

/// pftraced's arguments for tracing `name` in the cgroup `cg`, writing
/// `trace` and serving `socket`.
pub(super) fn cgroup_args(name: &str, trace: &Path, socket: &Path, cg: &Path) -> Vec<String> {
    ["-t", name, "-o"]
        .map(String::from)
        .into_iter()
        .chain(
            [trace, Path::new("--socket"), socket, Path::new("--cgroup"), cg]
                .map(|p| p.display().to_string()),
        )
        .collect()
}

/// One churn run.
#[derive(Debug, Clone)]
pub struct ChurnRun {
    pub mode: &'static str,
    pub children: usize,
    pub seconds: f64,
    /// Calls recorded of those the children made.
    pub traced: u64,
    /// Children with all their calls recorded.
    pub complete: usize,
}

impl ChurnRun {
    pub fn expected(&self) -> u64 {
        self.children as u64 * CALLS
    }
}

/// A cgroup for one run, removed (its processes killed) on drop.
pub(super) struct Cgroup(pub(super) PathBuf);

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0.join("cgroup.kill"), "1");
        for _ in 0..500 {
            if std::fs::remove_dir(&self.0).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// `daemons` pftraceds one after another (the default mode), each with one
/// Python started in its cgroup as soon as it serves.
pub fn first_processes(
    pftraced: &Path,
    python: &Path,
    child_py: &Path,
    dir: &Path,
    daemons: usize,
) -> Result<ChurnRun> {
    let mut all = ChurnRun { mode: FIRST, children: 0, seconds: 0.0, traced: 0, complete: 0 };
    for _ in 0..daemons {
        let r = run(pftraced, python, child_py, dir, 1, false)?;
        all.children += 1;
        all.seconds += r.seconds;
        all.traced += r.traced;
        all.complete += r.complete;
    }
    Ok(all)
}

/// The mode of [`first_processes`]' runs.
const FIRST: &str = "first";

/// Runs `children` Pythons under pftraced, with `--binary` or without.
pub fn run(
    pftraced: &Path,
    python: &Path,
    child_py: &Path,
    dir: &Path,
    children: usize,
    binary: bool,
) -> Result<ChurnRun> {
    let mode = if binary { "--binary" } else { "default" };
    let cg = Cgroup(cgroup_root()?.join(format!("pftrace-bench-churn-{}", std::process::id())));
    std::fs::create_dir(&cg.0).with_context(|| format!("creating the cgroup {}", cg.0.display()))?;
    let trace = dir.join(format!("trace-churn-{}.json", if binary { "binary" } else { "pid" }));
    let socket = dir.join("churn.sock");
    let mut args = cgroup_args("foo", &trace, &socket, &cg.0);
    if binary {
        args.extend(["--binary".into(), python.display().to_string()]);
    }
    let daemon = Daemon::start(pftraced, &args, &trace)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        if Instant::now() > deadline {
            bail!("pftraced did not open its control socket in 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    let spawn = || -> Result<Child> {
        Command::new("/bin/sh")
            .arg("-c")
            .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
            .arg(&cg.0)
            .arg(python)
            .arg(child_py)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("starting a child")
    };
    let started = Instant::now();
    let mut running: Vec<Child> = Vec::new();
    let mut pids = Vec::with_capacity(children);
    while pids.len() < children || !running.is_empty() {
        running.retain_mut(|c| c.try_wait().ok().flatten().is_none());
        if pids.len() < children && running.len() < IN_FLIGHT {
            let c = spawn()?;
            pids.push(c.id());
            running.push(c);
        } else {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(500));
    daemon.interrupt();
    daemon.finish(Duration::from_secs(60))?;

    let mut per_pid = std::collections::HashMap::<u64, u64>::new();
    trace_scan::scan(&trace, |e| {
        if e.name == "foo" {
            *per_pid.entry(e.pid).or_default() += 1;
        }
    })?;
    let traced = pids.iter().map(|p| per_pid.get(&u64::from(*p)).copied().unwrap_or(0)).sum();
    let complete = pids.iter().filter(|p| per_pid.get(&u64::from(**p)) == Some(&CALLS)).count();
    Ok(ChurnRun { mode, children, seconds, traced, complete })
}

pub fn text(runs: &[Result<ChurnRun>]) -> String {
    let mut s = format!(
        "churn (Pythons of 50 ms started in a watched cgroup, {IN_FLIGHT} at a time, {CALLS} calls each, the first on \
         their first line):\n"
    );
    for r in runs {
        match r {
            Ok(r) if r.mode == FIRST => s.push_str(&format!(
                "  {:<12} {} daemons started one after another, one Python each as soon as it served: {} of {} \
                 calls traced, {} of {} first processes complete\n",
                FIRST,
                r.children,
                r.traced,
                r.expected(),
                r.complete,
                r.children
            )),
            Ok(r) => s.push_str(&format!(
                "  {:<12} {} children in {:.1} s: {} of {} calls traced ({:.3}%), {} children complete\n",
                r.mode,
                r.children,
                r.seconds,
                r.traced,
                r.expected(),
                r.traced as f64 * 100.0 / r.expected().max(1) as f64,
                r.complete
            )),
            Err(e) => s.push_str(&format!("  could not run: {e:#}\n")),
        }
    }
    s
}

pub fn json(runs: &[Result<ChurnRun>]) -> Value {
    runs.iter()
        .map(|r| match r {
            Ok(r) => json!({
                "mode": r.mode, "children": r.children, "seconds": r.seconds,
                "calls_expected": r.expected(), "calls_traced": r.traced, "children_complete": r.complete,
            }),
            Err(e) => json!({ "error": format!("{e:#}") }),
        })
        .collect()
}

/// Issue 13's targets for these rows: every call of every child in the
/// default mode, and every first process complete.
pub fn targets(runs: &[Result<ChurnRun>]) -> Vec<Target> {
    let find = |mode: &str| runs.iter().filter_map(|r| r.as_ref().ok()).find(|r| r.mode == mode);
    let mut t = Vec::new();
    let all = find("default");
    t.push(Target {
        what: "short Pythons in a watched cgroup, default mode, every call traced".into(),
        limit: "traced = made".into(),
        value: all.map_or("not measured".into(), |r| {
            format!("{} of {} ({} children)", r.traced, r.expected(), r.children)
        }),
        met: all.map(|r| r.traced == r.expected()),
    });
    let first = find(FIRST);
    t.push(Target {
        what: "first process after the daemon starts, every call traced".into(),
        limit: "every run complete".into(),
        value: first
            .map_or("not measured".into(), |r| format!("{} of {} runs complete", r.complete, r.children)),
        met: first.map(|r| r.complete == r.children),
    });
    t
}
