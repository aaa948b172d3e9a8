//! The processes a benchmark run drives: the Python workload, pftraced and
//! bpftrace. Each is read line by line on a thread (so a full pipe never
//! stalls it), waited for with deadlines (a hung case fails, it does not hang
//! the bench), and killed if dropped before it was reaped.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::trace_scan;
use crate::util;

/// Lines of one output stream of a child, read on their own thread.
struct Lines {
    rx: Receiver<String>,
    /// Every line received so far (for error messages and parsing).
    seen: Vec<String>,
    closed: bool,
}

impl Lines {
    fn new(stream: impl Read + Send + 'static) -> Self {
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Lines { rx, seen: Vec::new(), closed: false }
    }

    /// The next line, or None at end of stream; fails at the deadline.
    fn next(&mut self, deadline: Instant) -> Result<Option<String>> {
        if self.closed {
            return Ok(None);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match self.rx.recv_timeout(left) {
            Ok(line) => {
                self.seen.push(line.clone());
                Ok(Some(line))
            }
            Err(RecvTimeoutError::Disconnected) => {
                self.closed = true;
                Ok(None)
            }
            Err(RecvTimeoutError::Timeout) => bail!("timed out"),
        }
    }

    /// Takes whatever has arrived without waiting.
    fn drain(&mut self) {
        while let Ok(line) = self.rx.try_recv() {
            self.seen.push(line);
        }
    }

    /// Reads to end of stream (or the deadline).
    fn read_to_end(&mut self, deadline: Instant) -> Result<()> {
        while self.next(deadline)?.is_some() {}
        Ok(())
    }

    fn tail(&self, n: usize) -> String {
        let start = self.seen.len().saturating_sub(n);
        self.seen[start..].iter().map(|l| format!("\n      | {}", truncate(l, 300))).collect()
    }
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// What a process's exit and resource use were (from wait4).
#[derive(Debug, Clone, Copy)]
pub struct Reaped {
    /// Exit code, or 128 + signal.
    pub code: i32,
    /// User + system CPU seconds over its lifetime.
    pub cpu_s: f64,
    /// Its own peak resident set size in bytes: the last VmHWM read from
    /// /proc while it ran (polled every 5 ms while waiting for it; None if it
    /// had exited before the first read). Not wait4's ru_maxrss: Linux
    /// carries the forking parent's peak over into the child across
    /// fork/exec, and the bench (2.4-8.4 GB after parsing dense traces) made
    /// a 53 MiB daemon show that.
    pub peak_rss: Option<u64>,
}

/// Waits for `pid` (a child of ours) until the deadline, polling, and returns
/// its status and rusage. Ok(None) at the deadline.
fn wait4_until(pid: u32, deadline: Instant) -> Result<Option<Reaped>> {
    let mut peak_rss = None;
    loop {
        // Before wait4: once reaped, its /proc entry is gone (or another's).
        peak_rss = peak_rss.max(proc_peak_rss(pid));
        let mut status = 0;
        // SAFETY: rusage is plain data; wait4 fills it for a reaped child.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointers to locals; WNOHANG never blocks.
        let r = unsafe { libc::wait4(pid as i32, &mut status, libc::WNOHANG, &mut usage) };
        if r == pid as i32 {
            let code = if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                128 + libc::WTERMSIG(status)
            };
            let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
            return Ok(Some(Reaped { code, cpu_s: tv(usage.ru_utime) + tv(usage.ru_stime), peak_rss }));
        }
        if r < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(err).with_context(|| format!("wait4({pid})"));
            }
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: signalling a child of ours that has not been reaped yet.
    unsafe { libc::kill(pid as i32, sig) };
}

/// Kills and reaps a child we are giving up on.
fn kill_and_reap(pid: u32) {
    signal(pid, libc::SIGKILL);
    let _ = wait4_until(pid, Instant::now() + Duration::from_secs(5));
}

fn process(pid: u32) -> Option<procfs::process::Process> {
    procfs::process::Process::new(i32::try_from(pid).ok()?).ok()
}

/// User + system CPU seconds of a running process, from /proc/PID/stat.
pub fn proc_cpu_s(pid: u32) -> Option<f64> {
    let stat = process(pid)?.stat().ok()?;
    Some((stat.utime + stat.stime) as f64 / procfs::ticks_per_second().max(1) as f64)
}

/// Peak resident set size of a running process in bytes (VmHWM: of its
/// own memory since its exec, unlike ru_maxrss).
pub fn proc_peak_rss(pid: u32) -> Option<u64> {
    Some(process(pid)?.status().ok()?.vmhwm? * 1024)
}

/// Resident set size of a running process in bytes (VmRSS).
pub fn proc_rss(pid: u32) -> Option<u64> {
    Some(process(pid)?.status().ok()?.vmrss? * 1024)
}

/// What a workload's timed loop reported.
#[derive(Debug, Clone, Copy)]
pub struct LoopResult {
    pub calls: u64,
    pub wall_s: f64,
    pub cpu_s: f64,
}

impl LoopResult {
    pub fn wall_ns_per_call(&self) -> f64 {
        self.wall_s * 1e9 / self.calls as f64
    }
    pub fn cpu_ns_per_call(&self) -> f64 {
        self.cpu_s * 1e9 / self.calls as f64
    }
}

/// Parses calls.py's result line:
/// `1001000 calls 0.083412 s 83.3 ns/call cpu 0.083390 s 83.3 ns/call`.
pub fn parse_loop_line(line: &str) -> Option<LoopResult> {
    let w: Vec<&str> = line.split_whitespace().collect();
    if w.len() < 8 || w[1] != "calls" || w[3] != "s" || w[6] != "cpu" {
        return None;
    }
    let r = LoopResult { calls: w[0].parse().ok()?, wall_s: w[2].parse().ok()?, cpu_s: w[7].parse().ok()? };
    (r.calls > 0 && r.wall_s > 0.0 && r.cpu_s >= 0.0 && r.wall_s.is_finite()).then_some(r)
}

/// A Python workload (bench/*.py) started by us.
pub struct Workload {
    child: Child,
    pub pid: u32,
    stdin: Option<ChildStdin>,
    stdout: Lines,
    stderr: Lines,
    reaped: bool,
}

impl Workload {
    /// Starts `python script args...` and waits for its "ready" line.
    pub fn start(python: &Path, script: &Path, args: &[String], timeout: Duration) -> Result<Self> {
        let mut cmd = Command::new(python);
        cmd.arg(script).args(args);
        Self::start_command(cmd, script, timeout)
    }

    /// Starts `cmd` (which runs `script`, e.g. under `taskset`, with its own
    /// environment) and waits for its "ready" line.
    pub fn start_command(mut cmd: Command, script: &Path, timeout: Duration) -> Result<Self> {
        cmd.current_dir(util::workspace_root());
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("could not start `{}`", util::describe(&cmd)))?;
        let pid = child.id();
        let stdin = child.stdin.take();
        let stdout = Lines::new(child.stdout.take().expect("piped"));
        let stderr = Lines::new(child.stderr.take().expect("piped"));
        let mut w = Workload { child, pid, stdin, stdout, stderr, reaped: false };
        let deadline = Instant::now() + timeout;
        match w.stdout.next(deadline) {
            Ok(Some(line)) if line.trim() == "ready" => Ok(w),
            other => {
                let what = match other {
                    Ok(Some(line)) => format!("printed {line:?} instead of \"ready\""),
                    Ok(None) => "exited before it was ready".into(),
                    Err(_) => "was not ready in time".into(),
                };
                w.stderr.drain();
                bail!("workload {} {what}{}", script.display(), w.stderr.tail(10))
            }
        }
    }

    /// Lets a `--wait` workload start its timed loop.
    pub fn release(&mut self) -> Result<()> {
        let mut stdin = self.stdin.take().context("workload already released")?;
        stdin.write_all(b"go\n").context("releasing the workload (writing to its stdin)")?;
        Ok(())
    }

    /// Waits for the workload's result line (its loop has ended).
    pub fn wait_result(mut self, timeout: Duration) -> Result<(Self, LoopResult)> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.stdout.next(deadline) {
                Ok(Some(line)) => {
                    if let Some(r) = parse_loop_line(&line) {
                        return Ok((self, r));
                    }
                }
                Ok(None) => {
                    let _ = self.stderr.read_to_end(Instant::now() + Duration::from_secs(2));
                    bail!(
                        "the workload (pid {}) exited without a result line; its output:{}{}",
                        self.pid,
                        self.stdout.tail(5),
                        self.stderr.tail(10)
                    );
                }
                Err(_) => {
                    bail!("the workload (pid {}) did not finish within {} s", self.pid, timeout.as_secs())
                }
            }
        }
    }

    /// Waits for the workload to exit after its result line; it must exit 0.
    pub fn finish(self, result: LoopResult, timeout: Duration) -> Result<LoopResult> {
        self.finish_stderr(result, timeout).map(|(r, _)| r)
    }

    /// [`Self::finish`], and every line of its stderr (e.g. pftraced's
    /// summary, when the workload was launched under it).
    pub fn finish_stderr(
        mut self,
        result: LoopResult,
        timeout: Duration,
    ) -> Result<(LoopResult, Vec<String>)> {
        let deadline = Instant::now() + timeout;
        let _ = self.stdout.read_to_end(deadline);
        let reaped = wait4_until(self.pid, deadline)?;
        self.reaped = reaped.is_some();
        let reaped = reaped.with_context(|| format!("the workload (pid {}) did not exit", self.pid))?;
        let _ = self.stderr.read_to_end(Instant::now() + Duration::from_secs(1));
        if reaped.code != 0 {
            bail!("the workload exited with status {}:{}", reaped.code, self.stderr.tail(10));
        }
        Ok((result, std::mem::take(&mut self.stderr.seen)))
    }

    /// Kills the workload (the endless bench/busy.py) and reaps it.
    pub fn kill(mut self) {
        kill_and_reap(self.pid);
        self.reaped = true;
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Counters from a pftraced trace (otherData.pftrace) and its stderr.
#[derive(Debug, Clone, Default)]
pub struct TraceFacts {
    pub entry_seen: u64,
    pub entry_matched: u64,
    pub return_matched: u64,
    pub lost: u64,
    pub read_errors: u64,
    /// Completed calls the daemon received: `calls_total` when the trace has
    /// it, else the calls in the file plus those evicted from memory (from
    /// the daemon's warning).
    pub calls_delivered: u64,
    /// Earliest timestamp (wall µs) of a call or unmatched return of `first_of`.
    pub first_ts_us: Option<f64>,
}

/// pftraced started by us.
pub struct Daemon {
    child: Child,
    pub pid: u32,
    started: Instant,
    stderr: Lines,
    reaped: bool,
}

impl Daemon {
    /// Starts pftraced with `args` (which must include `-o trace`).
    pub fn start(pftraced: &Path, args: &[String], trace: &Path) -> Result<Self> {
        Self::start_env(pftraced, args, trace, &[])
    }

    /// [`Self::start`] with more environment variables.
    pub fn start_env(pftraced: &Path, args: &[String], trace: &Path, env: &[(&str, &str)]) -> Result<Self> {
        let _ = std::fs::remove_file(trace);
        let mut cmd = Command::new(pftraced);
        cmd.envs(env.iter().copied());
        cmd.args(args).current_dir(util::workspace_root());
        // Plain stderr lines, and warnings (the eviction count) always shown.
        cmd.env_remove("JOURNAL_STREAM").env("RUST_LOG", "warn");
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd.spawn().with_context(|| format!("could not start `{}`", util::describe(&cmd)))?;
        let pid = child.id();
        let stderr = Lines::new(child.stderr.take().expect("piped"));
        Ok(Daemon { child, pid, started, stderr, reaped: false })
    }

    /// Waits until pftraced has printed `n` "attached to pid" lines; returns
    /// the time from its start to the last of them.
    pub fn wait_attached(&mut self, n: usize, timeout: Duration) -> Result<Duration> {
        let deadline = Instant::now() + timeout;
        let mut seen = 0;
        loop {
            match self.stderr.next(deadline) {
                Ok(Some(line)) if line.starts_with("pftraced: attached to pid") => {
                    seen += 1;
                    if seen == n {
                        return Ok(self.started.elapsed());
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => bail!("pftraced exited before it attached:{}", self.stderr.tail(10)),
                Err(_) => {
                    bail!("pftraced did not attach within {} s:{}", timeout.as_secs(), self.stderr.tail(10))
                }
            }
        }
    }

    pub fn interrupt(&self) {
        signal(self.pid, libc::SIGINT);
    }

    /// Waits for pftraced to exit by itself (it does when its pids exit).
    pub fn finish(mut self, timeout: Duration) -> Result<(Reaped, Vec<String>)> {
        let deadline = Instant::now() + timeout;
        let _ = self.stderr.read_to_end(deadline);
        let reaped = wait4_until(self.pid, deadline)?;
        let Some(reaped) = reaped else {
            bail!(
                "pftraced (pid {}) did not exit within {} s:{}",
                self.pid,
                timeout.as_secs(),
                self.stderr.tail(10)
            );
        };
        self.reaped = true;
        if reaped.code != 0 {
            bail!("pftraced exited with status {}:{}", reaped.code, self.stderr.tail(15));
        }
        Ok((reaped, std::mem::take(&mut self.stderr.seen)))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Reads what the bench needs from a Chrome trace written by pftraced.
/// `first_of`: a function whose earliest record time is wanted.
pub fn read_trace(path: &Path, stderr: &[String], first_of: Option<&str>) -> Result<TraceFacts> {
    let mut first_ts_us: Option<f64> = None;
    let mut consider = |ts: Option<f64>| {
        if let Some(ts) = ts {
            first_ts_us = Some(first_ts_us.map_or(ts, |f: f64| f.min(ts)));
        }
    };
    let other = trace_scan::scan(path, |e| {
        if first_of == Some(e.name) {
            consider(e.ts_us);
        }
    })?;
    let p = &other["pftrace"];
    let c = &p["counters"];
    let num = |v: &Value, what: &str| {
        v.as_u64().with_context(|| format!("the trace {} has no number at {what}", path.display()))
    };
    let calls_in_file = num(&p["calls"], "otherData.pftrace.calls")?;
    let calls_delivered = match p.get("calls_total").and_then(Value::as_u64) {
        Some(total) => total,
        None => calls_in_file + evicted_from(stderr),
    };
    if let Some(name) = first_of {
        for u in p["unmatched_returns"].as_array().map(Vec::as_slice).unwrap_or_default() {
            if u["name"] == name {
                consider(u["ts"].as_f64());
            }
        }
    }
    Ok(TraceFacts {
        entry_seen: num(&c["entry_seen"], "counters.entry_seen")?,
        entry_matched: num(&c["entry_matched"], "counters.entry_matched")?,
        return_matched: num(&c["return_matched"], "counters.return_matched")?,
        lost: num(&c["lost"], "counters.lost")?,
        read_errors: num(&c["read_errors"], "counters.read_errors")?,
        calls_delivered,
        first_ts_us,
    })
}

/// The count in pftraced's "N older calls were dropped from memory" warning (0 without one).
pub fn evicted_from(stderr: &[String]) -> u64 {
    stderr
        .iter()
        .filter(|l| l.contains("older calls were dropped from memory"))
        .filter_map(|l| l.split_whitespace().find_map(|w| w.parse::<u64>().ok()))
        .sum()
}

/// bpftrace started by us on one process.
pub struct Bpftrace {
    child: Child,
    pid: u32,
    stdout: Lines,
    stderr: Lines,
    reaped: bool,
}

/// What bpftrace counted.
#[derive(Debug, Clone, Copy)]
pub struct BpftraceResult {
    pub entries: u64,
    pub returns: u64,
    pub reaped: Reaped,
}

impl Bpftrace {
    /// Starts `bpftrace -p PID -e PROGRAM` and waits for its "Attaching" line.
    pub fn start(bpftrace: &Path, pid: u32, program: &str, timeout: Duration) -> Result<Self> {
        let mut cmd = Command::new(bpftrace);
        cmd.arg("-p").arg(pid.to_string()).arg("-e").arg(program);
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("could not start `{}`", util::describe(&cmd)))?;
        let bpid = child.id();
        let stdout = Lines::new(child.stdout.take().expect("piped"));
        let stderr = Lines::new(child.stderr.take().expect("piped"));
        let mut b = Bpftrace { child, pid: bpid, stdout, stderr, reaped: false };
        let deadline = Instant::now() + timeout;
        loop {
            match b.stdout.next(deadline) {
                Ok(Some(line)) if line.starts_with("Attaching") => break,
                Ok(Some(_)) => {}
                _ => {
                    b.stderr.drain();
                    bail!("bpftrace did not attach:{}{}", b.stdout.tail(5), b.stderr.tail(10));
                }
            }
        }
        // bpftrace prints "Attaching N probes..." before it attaches; give it
        // time to finish (the counts show whether the loop was covered).
        std::thread::sleep(Duration::from_millis(1000));
        Ok(b)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits for bpftrace to exit (it does when the traced process exits;
    /// else it is interrupted) and reads its maps `@entry` and `@ret`.
    pub fn finish(mut self, timeout: Duration) -> Result<BpftraceResult> {
        let mut reaped = wait4_until(self.pid, Instant::now() + timeout)?;
        if reaped.is_none() {
            signal(self.pid, libc::SIGINT);
            reaped = wait4_until(self.pid, Instant::now() + timeout)?;
        }
        let Some(reaped) = reaped else {
            bail!("bpftrace did not exit");
        };
        self.reaped = true;
        let deadline = Instant::now() + Duration::from_secs(2);
        let _ = self.stdout.read_to_end(deadline);
        let _ = self.stderr.read_to_end(deadline);
        let map = |name: &str| {
            self.stdout
                .seen
                .iter()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        let result = BpftraceResult { entries: map("@entry:"), returns: map("@ret:"), reaped };
        if reaped.code != 0 && reaped.code != 128 + libc::SIGINT {
            bail!(
                "bpftrace exited with status {}:{}{}",
                reaped.code,
                self.stdout.tail(5),
                self.stderr.tail(10)
            );
        }
        Ok(result)
    }
}

impl Drop for Bpftrace {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loop_line() {
        let r = parse_loop_line("1001000 calls 0.083412 s 83.3 ns/call cpu 0.083390 s 83.3 ns/call").unwrap();
        assert_eq!(r.calls, 1_001_000);
        assert!((r.wall_s - 0.083412).abs() < 1e-9 && (r.cpu_s - 0.08339).abs() < 1e-9);
        assert!((r.wall_ns_per_call() - 83.33).abs() < 0.01);
        assert!(parse_loop_line("ready").is_none());
        assert!(parse_loop_line("0 calls 0.0 s 0 ns/call cpu 0.0 s 0 ns/call").is_none());
    }

    #[test]
    fn evicted_warning() {
        let lines = vec![
            "pftraced: attached to pid 12 (CPython 3.9, /x), tracing f".to_string(),
            "pftraced: warn: 1000000 older calls were dropped from memory (limits.max_calls_in_memory); ..."
                .to_string(),
        ];
        assert_eq!(evicted_from(&lines), 1_000_000);
        assert_eq!(evicted_from(&lines[..1]), 0);
    }

    #[test]
    fn proc_figures_of_self() {
        let me = std::process::id();
        assert!(proc_cpu_s(me).is_some());
        assert!(proc_rss(me).unwrap() > 0);
    }
}
