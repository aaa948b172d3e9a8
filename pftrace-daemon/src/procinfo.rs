//! What procfs says about a traced process: its name, its batch job (from
//! the environment), CPU and memory readings for the counter tracks, and its
//! state and start time (exited? the same process as before under this pid?).

use std::fs;

use crate::trace::{JobId, ProcessSample};

/// Environment variables naming a batch job, in the order they are looked for.
pub const JOB_VARIABLES: [&str; 3] = ["SLURM_JOB_ID", "FLUX_JOB_ID", "LSB_JOBID"];

/// `/proc/PID/comm`, trimmed; empty if unreadable.
pub fn comm(pid: u32) -> String {
    read_text(&format!("/proc/{pid}/comm"))
}

/// A short procfs text file, trimmed and made printable (it is the traced
/// process's own choice of text).
fn read_text(path: &str) -> String {
    fs::read(path)
        .map(|b| crate::events::printable(String::from_utf8_lossy(&b).trim()).into_owned())
        .unwrap_or_default()
}

/// The thread's name (`/proc/PID/task/TID/comm`); empty if unreadable.
pub fn thread_name(pid: u32, tid: u32) -> String {
    read_text(&format!("/proc/{pid}/task/{tid}/comm"))
}

/// The batch job of a process, from its initial environment.
pub fn job_id(pid: u32) -> Option<JobId> {
    let environ = fs::read(format!("/proc/{pid}/environ")).ok()?;
    job_from_environ(&environ)
}

/// The value of variable `name` in a process's initial environment.
pub fn env_var(pid: u32, name: &str) -> Option<Vec<u8>> {
    let environ = fs::read(format!("/proc/{pid}/environ")).ok()?;
    environ_vars(&environ).into_iter().find(|(k, _)| *k == name.as_bytes()).map(|(_, v)| v.to_vec())
}

/// (name, value) pairs of an environ block.
fn environ_vars(environ: &[u8]) -> Vec<(&[u8], &[u8])> {
    environ
        .split(|&b| b == 0)
        .filter_map(|kv| {
            let eq = kv.iter().position(|&b| b == b'=')?;
            Some((&kv[..eq], &kv[eq + 1..]))
        })
        .collect()
}

fn job_from_environ(environ: &[u8]) -> Option<JobId> {
    let vars = environ_vars(environ);
    JOB_VARIABLES.iter().find_map(|name| {
        vars.iter().find(|(k, _)| *k == name.as_bytes()).map(|(_, v)| JobId {
            variable: name.to_string(),
            id: String::from_utf8_lossy(v).chars().take(128).collect(),
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

/// Reads `/proc/PID/stat` (utime, stime) and `/proc/PID/status` (VmRSS, VmHWM).
pub fn read(pid: u32) -> Option<Reading> {
    let fields = stat_fields(pid)?;
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the comm.
    let ticks = clock_ticks();
    let user_s = fields.get(11)?.parse::<f64>().ok()? / ticks;
    let system_s = fields.get(12)?.parse::<f64>().ok()? / ticks;
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    // A process that has exited (a zombie) has no memory lines: no reading.
    if !status.lines().any(|l| l.starts_with("VmRSS:")) {
        return None;
    }
    Some(Reading { user_s, system_s, rss_bytes: kb("VmRSS:"), peak_rss_bytes: kb("VmHWM:") })
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as f64
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

/// The fields of /proc/PID/stat from field 3 on (index 0 is field 3). The
/// command (field 2) is in parentheses and may hold anything: fields are
/// counted after its last ')'.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(stat.rsplit_once(')')?.1.split_whitespace().map(String::from).collect())
}

/// What /proc/PID/stat says of a process's identity and life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// Field 3: R, S, Z...
    pub state: char,
    /// Field 22: when the process started, in clock ticks after boot. Exec
    /// keeps it: another value under the same pid is another process.
    pub start_ticks: u64,
}

impl Stat {
    /// A zombie (or dead) process: it has exited.
    pub fn exited(&self) -> bool {
        self.state == 'Z' || self.state == 'X'
    }
}

/// Reads /proc/PID/stat; `None` when the process is gone.
pub fn stat(pid: u32) -> Option<Stat> {
    let fields = stat_fields(pid)?;
    Some(Stat { state: fields.first()?.chars().next()?, start_ticks: fields.get(19)?.parse().ok()? })
}

/// Whether `pid` is gone, or a zombie, now.
pub fn has_exited(pid: u32) -> bool {
    stat(pid).is_none_or(|s| s.exited())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_from_environment() {
        let env = b"PATH=/bin\0FLUX_JOB_ID=f3x\0SLURM_JOB_ID=42\0";
        assert_eq!(job_from_environ(env), Some(JobId { variable: "SLURM_JOB_ID".into(), id: "42".into() }));
        assert_eq!(
            job_from_environ(b"LSB_JOBID=7\0"),
            Some(JobId { variable: "LSB_JOBID".into(), id: "7".into() })
        );
        assert_eq!(job_from_environ(b"HOME=/root\0"), None);
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        let r = read(me).expect("own /proc entry");
        assert!(r.rss_bytes > 0 && r.peak_rss_bytes >= r.rss_bytes);
        assert!(!comm(me).is_empty());
        let s = sample(me, 0, &Reading { user_s: 0.0, system_s: 0.0, ..r }, &r, 1.0);
        assert!(s.cpu_percent >= 0.0);
    }
}
