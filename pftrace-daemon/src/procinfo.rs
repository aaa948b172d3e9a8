//! What procfs says about a traced process: its name, its batch job (from
//! the environment), CPU and memory readings for the counter tracks, and its
//! state and start time (exited? the same process as before under this pid?).

//!
//! Every read goes through procfs's [`Process`], which holds a descriptor
//! of the `/proc/PID` directory: reads made through one `Process` all
//! describe the same process, never a later one that reused the pid.

use std::{collections::HashMap, ffi::OsString, io::Read as _};

use procfs::process::Process;

use crate::trace::{JobId, ProcessSample};

/// Environment variables naming a batch job, in the order they are looked for.
pub const JOB_VARIABLES: [&str; 3] = ["SLURM_JOB_ID", "FLUX_JOB_ID", "LSB_JOBID"];

/// The process `pid`, if it exists.
pub fn open(pid: u32) -> Option<Process> {
    Process::new(i32::try_from(pid).ok()?).ok()
}

/// The process's name (`comm`), made printable (it is the traced process's
/// own choice of text); empty if unreadable.
pub fn comm(pid: u32) -> String {
    open(pid).and_then(|p| p.stat().ok()).map(|s| printable(&s.comm)).unwrap_or_default()
}

/// The thread's name (`comm` of `/proc/PID/task/TID`); empty if unreadable.
pub fn thread_name(pid: u32, tid: u32) -> String {
    let task = open(pid).and_then(|p| p.task_from_tid(i32::try_from(tid).ok()?).ok());
    task.and_then(|t| t.stat().ok()).map(|s| printable(&s.comm)).unwrap_or_default()
}

fn printable(text: &str) -> String {
    crate::events::printable(text.trim()).into_owned()
}

/// The command line of `process`, arguments space-joined and made printable
/// (each argument decoded lossily: it is the process's own choice of bytes).
pub fn command_line(process: &Process) -> String {
    let mut bytes = Vec::new();
    if process.open_relative("cmdline").and_then(|f| Ok(f.take(1 << 20).read_to_end(&mut bytes)?)).is_err() {
        return String::new();
    }
    bytes
        .split(|&c| c == 0)
        .filter(|a| !a.is_empty())
        .map(|a| crate::events::printable(&String::from_utf8_lossy(a)).into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The batch job of a process, from its initial environment.
pub fn job_id(pid: u32) -> Option<JobId> {
    job_from_environ(&open(pid)?.environ().ok()?)
}

fn job_from_environ(environ: &HashMap<OsString, OsString>) -> Option<JobId> {
    JOB_VARIABLES.iter().find_map(|name| {
        environ.get(std::ffi::OsStr::new(name)).map(|v| JobId {
            variable: name.to_string(),
            id: v.to_string_lossy().chars().take(128).collect(),
        })
    })
}

/// Cumulative CPU times and memory of a process at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    pub user_s: f64,
    pub system_s: f64,
    pub rss_bytes: u64,
    pub peak_rss_bytes: u64,
}

/// Reads `/proc/PID/stat` (utime, stime) and `/proc/PID/status` (VmRSS,
/// VmHWM); `None` for a process that is gone or has exited (a zombie has
/// no memory lines).
pub fn read(pid: u32) -> Option<Reading> {
    let process = open(pid)?;
    let stat = process.stat().ok()?;
    let ticks = procfs::ticks_per_second().max(1) as f64;
    let status = process.status().ok()?;
    let rss_kb = status.vmrss?;
    Some(Reading {
        user_s: stat.utime as f64 / ticks,
        system_s: stat.stime as f64 / ticks,
        rss_bytes: rss_kb * 1024,
        peak_rss_bytes: status.vmhwm.unwrap_or(0) * 1024,
    })
}

/// The sample between two readings `elapsed_s` apart.
pub fn sample(pid: u32, ts_ns: u64, prev: &Reading, now: &Reading, elapsed_s: f64) -> ProcessSample {
    let cpu_s = (now.user_s + now.system_s) - (prev.user_s + prev.system_s);
    ProcessSample {
        pid,
        ts_ns,
        cpu_percent: if elapsed_s > 0.0 { (cpu_s / elapsed_s * 100.0).max(0.0) } else { 0.0 },
        user_cpu_s: (now.user_s - prev.user_s).max(0.0),
        rss_bytes: now.rss_bytes,
        peak_rss_bytes: now.peak_rss_bytes,
    }
}

/// What /proc/PID/stat says of a process's identity and life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// Field 3: R, S, Z...
    pub state: char,
    /// Field 22: when the process started, in clock ticks after boot. Exec
    /// keeps it: another value under the same pid is another process.
    pub start_ticks: u64,
    /// Field 4: the parent's pid.
    pub ppid: u32,
}

impl Stat {
    /// A zombie (or dead) process: it has exited.
    pub fn exited(&self) -> bool {
        self.state == 'Z' || self.state == 'X'
    }
}

/// Reads /proc/PID/stat; `None` when the process is gone.
pub fn stat(pid: u32) -> Option<Stat> {
    stat_of(&open(pid)?)
}

/// Reads the stat of `process`; `None` when it is gone.
pub fn stat_of(process: &Process) -> Option<Stat> {
    let stat = process.stat().ok()?;
    Some(Stat { state: stat.state, start_ticks: stat.starttime, ppid: stat.ppid.max(0) as u32 })
}

/// Whether `pid` is gone, or a zombie, now.
pub fn has_exited(pid: u32) -> bool {
    stat(pid).is_none_or(|s| s.exited())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn environ(vars: &[(&str, &str)]) -> HashMap<OsString, OsString> {
        vars.iter().map(|(k, v)| (k.into(), v.into())).collect()
    }

    #[test]
    fn job_ids_from_environment() {
        let env = environ(&[("PATH", "/bin"), ("FLUX_JOB_ID", "f3x"), ("SLURM_JOB_ID", "42")]);
        assert_eq!(job_from_environ(&env), Some(JobId { variable: "SLURM_JOB_ID".into(), id: "42".into() }));
        assert_eq!(
            job_from_environ(&environ(&[("LSB_JOBID", "7")])),
            Some(JobId { variable: "LSB_JOBID".into(), id: "7".into() })
        );
        assert_eq!(job_from_environ(&environ(&[("HOME", "/root")])), None);
    }

    #[test]
    fn job_id_of_a_real_process() {
        let child = std::process::Command::new("sleep")
            .arg("5")
            .env("FLUX_JOB_ID", "fjob-17")
            .spawn()
            .expect("run sleep");
        let child = Reap(child);
        // Until it has exec'd, the child still has the test's environment;
        // and the kernel names the new program (comm) before it has set up
        // the new environment, so wait for both (1 run in 5 read an empty
        // environment right after comm changed).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let job = loop {
            let job = job_id(child.0.id());
            if comm(child.0.id()) == "sleep" && job.is_some() {
                break job;
            }
            assert!(std::time::Instant::now() < deadline, "sleep did not start with its environment");
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert_eq!(job, Some(JobId { variable: "FLUX_JOB_ID".into(), id: "fjob-17".into() }));
    }

    /// Kills and reaps the child when the test ends, whatever happens.
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// CPU time this thread has used.
    fn thread_cpu() -> std::time::Duration {
        let ts = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
        std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        let before = read(me).expect("own /proc entry");
        assert!(before.rss_bytes > 0 && before.peak_rss_bytes >= before.rss_bytes);
        assert!(!comm(me).is_empty());
        // Burn 300 ms of this thread's CPU (measured by the thread's own
        // clock, so a loaded machine only makes it take longer), then the
        // process's CPU time must have grown by at least that, less one
        // tick of stat's resolution at each end.
        let start = thread_cpu();
        let mut x = 0u64;
        while thread_cpu() - start < std::time::Duration::from_millis(300) {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        let after = read(me).expect("own /proc entry");
        let tick = 1.0 / procfs::ticks_per_second() as f64;
        let s = sample(me, 0, &before, &after, 1.0);
        let cpu_s = s.cpu_percent / 100.0;
        assert!(cpu_s >= 0.3 - 2.0 * tick, "CPU {cpu_s} s over 1 s of wall time, 0.3 s burnt");
        assert!(s.user_cpu_s >= 0.3 - 2.0 * tick - (after.system_s - before.system_s), "{s:?}");
        // Readings in the wrong order give 0 %, not a negative figure.
        assert_eq!(sample(me, 0, &after, &before, 1.0).cpu_percent, 0.0);
    }
}
