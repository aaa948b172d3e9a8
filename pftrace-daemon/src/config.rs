//! pftraced's configuration file (TOML, default `/etc/pftrace/pftraced.toml`):
//! names, targets, socket, output and limits, every field with a default.
//! Command-line flags override it. Errors name the file, line and column.

use std::{
    fs, io,
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
    /// Names to trace (`foo`, `json/decoder.py:raw_decode`, `test_*`).
    pub names: Vec<String>,
    pub targets: TargetsConfig,
    pub socket: SocketConfig,
    pub output: OutputConfig,
    pub limits: LimitsConfig,
    pub sampling: SamplingConfig,
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
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TargetsConfig {
    pub pids: Vec<u32>,
    /// cgroup v2 directories: every Python process in them and their descendants.
    pub cgroups: Vec<PathBuf>,
    /// Every probe-enabled Python on the host.
    pub all: bool,
    /// Interpreter files attached host-wide up front (`--binary`).
    pub binaries: Vec<PathBuf>,
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
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self { ring_buffer_bytes: 16 << 20, max_calls_in_memory: 500_000, max_processes: 4096 }
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("config file {path}, line {line}, column {column}: {message}")]
    Parse { path: String, line: usize, column: usize, message: String },
    #[error("config file {path}: {message}")]
    Invalid { path: String, message: String },
}

impl Config {
    /// Reads `path`. With `required == false` a missing file gives the defaults.
    pub fn load(path: &Path, required: bool) -> Result<Self, ConfigError> {
        let display = path.display().to_string();
        let text = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound && !required => {
                return Ok(Self::default());
            }
            Err(source) => {
                return Err(ConfigError::Read { path: display, source });
            }
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
        if self.limits.max_calls_in_memory == 0 {
            return Err(invalid("limits.max_calls_in_memory must be at least 1".into()));
        }
        if self.output.max_file_bytes < 4096 {
            return Err(invalid("output.max_file_bytes must be at least 4096".into()));
        }
        if self.output.max_file_seconds == 0 {
            return Err(invalid("output.max_file_seconds must be at least 1".into()));
        }
        Ok(())
    }
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
    }
}
