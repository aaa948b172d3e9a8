//! pftraced's configuration file (TOML, default `/etc/pftrace/pftraced.toml`):
//! names, targets, socket, output and limits, every field with a default.
//! Command-line flags override it. Errors name the file, line and column.
//!
//! pftraced runs as root, so the file is read with care: only a regular
//! file (a symlink to one is followed: `/etc` often links to managed
//! configuration), checked with stat before it is opened, so a FIFO or a
//! device (`/dev/zero`) is refused without being opened or read; of at most
//! [`MAX_CONFIG_BYTES`]; and only one no other user can change (owned by
//! root or the user running pftraced, not writable by group or others).

use std::{
    fs,
    io::{self, Read as _},
    os::unix::fs::{FileTypeExt as _, MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::protocol::DEFAULT_SOCKET;

/// Where the daemon looks for its configuration unless told otherwise.
pub const DEFAULT_CONFIG: &str = "/etc/pftrace/pftraced.toml";

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Names to trace (`foo`, `json/decoder.py:raw_decode`, `test_*`,
    /// `JSONDecoder.raw_decode`, `json.decoder:*`).
    pub names: Vec<String>,
    pub targets: TargetsConfig,
    pub socket: SocketConfig,
    pub output: OutputConfig,
    pub limits: LimitsConfig,
    pub sampling: SamplingConfig,
    pub jobs: JobsConfig,
    pub agent: AgentConfig,
}

/// The in-process agent (CPython 3.11+ without working USDT probes).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// How agents report traced calls to the kernel.
    pub report: AgentReport,
}

/// How an agent's reports reach the kernel.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AgentReport {
    /// A call of a 5-byte nop in the agent with a uprobe on it (423-437 ns a
    /// report here): only the traced processes pay.
    #[default]
    Uprobe,
    /// A syscall that does not exist, read by a raw tracepoint on sys_enter
    /// (303-332 ns a report here), where the process has no seccomp filter:
    /// about 1/3 less per traced call, but every syscall of every process on
    /// the host pays about +18 ns while an agent is connected (getppid
    /// 104-116 -> 123-127 ns), and a seccomp filter the process installs
    /// later that kills for unknown syscalls would kill it.
    Syscall,
}

/// Batch jobs as cgroups under one root (see `daemon/jobs.rs`): each child
/// cgroup of `root` whose name matches `pattern` is a job, traced into a
/// trace file of its own, finished when the cgroup is removed.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// The cgroup v2 directory jobs are made in (Slurm:
    /// `/sys/fs/cgroup/system.slice/slurmstepd.scope`); none means no jobs.
    pub root: Option<PathBuf>,
    /// A job cgroup's name, `{id}` standing for the job id, `*` for any text.
    pub pattern: String,
    /// Where each job's trace goes; default: `output.dir`.
    pub dir: Option<PathBuf>,
    /// The jobs' trace format: chrome, records, pfw or pfw:PERFFLOW_OPTIONS.
    pub format: String,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self { root: None, pattern: "job_{id}".into(), dir: None, format: "chrome".into() }
    }
}

/// Per-process CPU and memory sampling from procfs (counter tracks).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingConfig {
    /// Milliseconds between readings of each traced process; 0 turns sampling off.
    pub interval_ms: u64,
    /// Readings kept in memory (all processes together); the oldest go first.
    pub max_samples: usize,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self { interval_ms: 1000, max_samples: 100_000 }
    }
}

/// What to trace.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TargetsConfig {
    pub pids: Vec<u32>,
    /// cgroup v2 directories: every Python process in them and their descendants.
    pub cgroups: Vec<PathBuf>,
    /// Every probe-enabled Python on the host.
    pub all: bool,
    /// Interpreter files attached host-wide up front (`--binary`).
    pub binaries: Vec<PathBuf>,
    /// A cgroup (or the jobs root) that does not exist yet is waited for
    /// (logged, traced once made); false makes it an error at start.
    pub wait_for_cgroups: bool,
}

impl Default for TargetsConfig {
    fn default() -> Self {
        Self {
            pids: Vec::new(),
            cgroups: Vec::new(),
            all: false,
            binaries: Vec::new(),
            wait_for_cgroups: true,
        }
    }
}

/// The control socket.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SocketConfig {
    pub path: PathBuf,
    /// A group whose members may also use pftracectl (socket mode 0660).
    pub group: Option<String>,
}

impl Default for SocketConfig {
    fn default() -> Self {
        Self { path: DEFAULT_SOCKET.into(), group: None }
    }
}

/// Rolling trace files written while tracing.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OutputConfig {
    /// Directory for rolling trace files; none means no files are written while running.
    pub dir: Option<PathBuf>,
    /// Start a new file when the current one reaches this size.
    pub max_file_bytes: u64,
    /// Start a new file when the current one is this old.
    pub max_file_seconds: u64,
}

impl Default for OutputConfig {
    fn default() -> Self {
        Self { dir: None, max_file_bytes: 64 << 20, max_file_seconds: 3600 }
    }
}

/// Sizes and bounds.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Kernel-to-daemon ring buffer, bytes (power of two).
    pub ring_buffer_bytes: u32,
    /// Completed calls kept in memory for `dump` and `stats`; older ones are
    /// only in the output files.
    pub max_calls_in_memory: usize,
    /// Processes traced at once (pid-scoped attachments).
    pub max_processes: usize,
    /// `pftracectl dump`s sent at once; more are answered `busy`. Each may
    /// keep alive, until it is sent, calls the store evicts meanwhile.
    pub max_concurrent_dumps: usize,
    /// CPU slots (per-call CPU to the microsecond) the threads of one
    /// traced process hold at once, of pftrace_common::MAX_CPU_SLOTS on the
    /// node; its further threads get the scheduler's figure (a tick),
    /// counted. See [`DEFAULT_CPU_SLOTS_PER_PROCESS`].
    pub cpu_slots_per_process: u32,
}

/// A sixteenth of the node's 16,384 slots: one process making thousands of
/// threads leaves the other 15/16 to the rest, and 16 such processes at
/// once are needed to use them all. A process of one thread per core of the
/// largest nodes (256 hardware threads) plus its helper threads fits four
/// times over.
pub const DEFAULT_CPU_SLOTS_PER_PROCESS: u32 = 1024;

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            ring_buffer_bytes: 16 << 20,
            max_calls_in_memory: 500_000,
            max_processes: 4096,
            max_concurrent_dumps: 4,
            cpu_slots_per_process: DEFAULT_CPU_SLOTS_PER_PROCESS,
        }
    }
}

/// The largest configuration file read (an example with every key is 6 KiB).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("config file {path} is {what}, not a regular file; give the path of a TOML file")]
    NotAFile { path: String, what: &'static str },
    #[error(
        "config file {path} is {size} bytes; a configuration may have at most {MAX_CONFIG_BYTES} bytes (1 MiB)"
    )]
    TooLarge { path: String, size: u64 },
    #[error(
        "config file {path} could be changed by another user (owner uid {uid}, mode {mode:o}); pftraced \
         runs as root and reads only a file owned by root (or by you) that group and others cannot write \
         (chown root {path}; chmod go-w {path})"
    )]
    Unsafe { path: String, uid: u32, mode: u32 },
    #[error("config file {path}, line {line}, column {column}: {message}")]
    Parse { path: String, line: usize, column: usize, message: String },
    #[error("config file {path}: {message}")]
    Invalid { path: String, message: String },
}

impl Config {
    /// Reads `path` (see the module's notes on which files are read). With
    /// `required == false` a missing file gives the defaults.
    pub fn load(path: &Path, required: bool) -> Result<Self, ConfigError> {
        let display = path.display().to_string();
        let text = match read_config_file(path) {
            Ok(text) => text,
            Err(ConfigError::Read { source, .. })
                if source.kind() == io::ErrorKind::NotFound && !required =>
            {
                return Ok(Self::default());
            }
            Err(e) => return Err(e),
        };
        Self::parse(&text, &display)
    }

    /// Parses TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map_or((1, 1), |span| line_column(text, span.start));
            ConfigError::Parse { path: origin.into(), line, column, message: e.message().trim().to_string() }
        })?;
        config.validate(origin)?;
        Ok(config)
    }

    fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |message: String| ConfigError::Invalid { path: origin.into(), message };
        let ring = self.limits.ring_buffer_bytes;
        if ring < 4096 || !ring.is_power_of_two() {
            return Err(invalid(format!(
                "limits.ring_buffer_bytes = {ring}: must be a power of two >= 4096"
            )));
        }
        for (key, value) in [
            ("limits.max_calls_in_memory", self.limits.max_calls_in_memory),
            ("limits.max_processes", self.limits.max_processes),
            ("limits.max_concurrent_dumps", self.limits.max_concurrent_dumps),
        ] {
            if value == 0 {
                return Err(invalid(format!("{key} = 0: must be at least 1")));
            }
        }
        check_cpu_slots_per_process(self.limits.cpu_slots_per_process)
            .map_err(|e| invalid(format!("limits.cpu_slots_per_process = {e}")))?;
        if self.output.max_file_bytes < 4096 {
            return Err(invalid("output.max_file_bytes must be at least 4096".into()));
        }
        crate::job_pattern::JobPattern::parse(&self.jobs.pattern)
            .map_err(|e| invalid(format!("jobs.pattern: {e}")))?;
        crate::output::choose(&self.jobs.format, None).map_err(|e| invalid(format!("jobs.format: {e}")))?;
        if self.jobs.root.is_some() && self.jobs.dir.is_none() && self.output.dir.is_none() {
            return Err(invalid(
                "jobs.root is set but not where the jobs' traces go: set jobs.dir (or output.dir)".into(),
            ));
        }
        if self.output.max_file_seconds == 0 {
            return Err(invalid("output.max_file_seconds must be at least 1".into()));
        }
        Ok(())
    }
}

/// `limits.cpu_slots_per_process` (and its flag): 1 to the node's slots.
pub fn check_cpu_slots_per_process(n: u32) -> Result<(), String> {
    let max = pftrace_common::MAX_CPU_SLOTS;
    if !(1..=max).contains(&n) {
        return Err(format!("{n}: must be 1 to {max} (the CPU slots of the node)"));
    }
    Ok(())
}

/// The text of a configuration file that passes the checks of this module.
fn read_config_file(path: &Path) -> Result<String, ConfigError> {
    let shown = || path.display().to_string();
    let read_err = |source| ConfigError::Read { path: shown(), source };
    // Decided before opening: opening a FIFO blocks, and opening a device can act.
    let meta = fs::metadata(path).map_err(read_err)?;
    check_file(&meta, &shown())?;
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(read_err)?;
    // What was opened must be what was checked (the path may have been swapped).
    let opened = file.metadata().map_err(read_err)?;
    if (opened.dev(), opened.ino()) != (meta.dev(), meta.ino()) {
        return Err(read_err(io::Error::other("the file was replaced while it was being opened")));
    }
    check_file(&opened, &shown())?;
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1).read_to_end(&mut bytes).map_err(read_err)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(ConfigError::TooLarge { path: shown(), size: bytes.len() as u64 });
    }
    String::from_utf8(bytes).map_err(|e| read_err(io::Error::new(io::ErrorKind::InvalidData, e)))
}

/// A regular file of at most [`MAX_CONFIG_BYTES`] that only its owner (root
/// or the user running pftraced) can change.
fn check_file(meta: &fs::Metadata, path: &str) -> Result<(), ConfigError> {
    let kind = meta.file_type();
    if !kind.is_file() {
        let what = if kind.is_dir() {
            "a directory"
        } else if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_char_device() {
            "a character device"
        } else if kind.is_block_device() {
            "a block device"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "not a file"
        };
        return Err(ConfigError::NotAFile { path: path.into(), what });
    }
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(ConfigError::TooLarge { path: path.into(), size: meta.len() });
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if (meta.uid() != 0 && meta.uid() != me) || meta.mode() & 0o022 != 0 {
        return Err(ConfigError::Unsafe { path: path.into(), uid: meta.uid(), mode: meta.mode() & 0o7777 });
    }
    Ok(())
}

/// 1-based line and column of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let c = Config::parse("names = ['foo']\n[targets]\ncgroups = ['/sys/fs/cgroup/unified/job']\n", "t")
            .unwrap();
        assert_eq!(c.names, vec!["foo"]);
        assert_eq!(c.socket.path, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(c.limits.ring_buffer_bytes, 16 << 20);
        assert_eq!(c.targets.cgroups.len(), 1);
        assert_eq!(Config::parse("", "t").unwrap(), Config::default());
        assert!(c.targets.wait_for_cgroups);
        let jobs = Config::parse(
            "[jobs]\nroot = '/sys/fs/cgroup/system.slice/slurmstepd.scope'\ndir = '/var/lib/pftrace/jobs'\n",
            "t",
        )
        .unwrap()
        .jobs;
        assert_eq!((jobs.pattern.as_str(), jobs.format.as_str()), ("job_{id}", "chrome"));
        let err = Config::parse("[jobs]\nroot = '/x'\n", "t").unwrap_err().to_string();
        assert!(err.contains("set jobs.dir"), "{err}");
        let err = Config::parse("[jobs]\npattern = 'job_*'\n", "t").unwrap_err().to_string();
        assert!(err.contains("jobs.pattern") && err.contains("{id}"), "{err}");
    }

    #[test]
    fn errors_name_line_and_column() {
        let err =
            Config::parse("names = ['foo']\n[limits]\nring_bufer_bytes = 4\n", "/etc/x.toml").unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("config file /etc/x.toml, line 3, column 1:"), "{msg}");
        assert!(msg.contains("ring_bufer_bytes"), "{msg}");
        let err = Config::parse("names = [\n  'foo',\n  3\n]\n", "x").unwrap_err().to_string();
        assert!(err.contains("line 3, column 3"), "{err}");
        let err = Config::parse("[limits]\nring_buffer_bytes = 5000\n", "x").unwrap_err().to_string();
        assert!(err.contains("power of two"), "{err}");
        for bad in [0, pftrace_common::MAX_CPU_SLOTS + 1] {
            let err = Config::parse(&format!("[limits]\ncpu_slots_per_process = {bad}\n"), "x")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("limits.cpu_slots_per_process = {bad}: must be 1 to 16384")),
                "{err}"
            );
        }
        let c = Config::parse("[limits]\ncpu_slots_per_process = 8\n", "x").unwrap();
        assert_eq!(c.limits.cpu_slots_per_process, 8);
        assert_eq!(Config::default().limits.cpu_slots_per_process, 1024);
    }
}
