//! Shared helpers: step reporting, running child processes, workspace paths.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

/// The workspace root (the directory holding the top-level Cargo.toml).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// Cargo's target directory for this workspace.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() { dir } else { workspace_root().join(dir) }
        }
        _ => workspace_root().join("target"),
    }
}

/// The directory where `cargo install` puts binaries: `$CARGO_HOME/bin` or `~/.cargo/bin`.
pub fn cargo_bin_dir() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("CARGO_HOME").filter(|h| !h.is_empty()) {
        return Some(PathBuf::from(home).join("bin"));
    }
    std::env::var_os("HOME").filter(|h| !h.is_empty()).map(|h| PathBuf::from(h).join(".cargo").join("bin"))
}

/// Returns `path` with `dir` in front, unless `dir` is already one of its entries.
pub fn path_with(dir: &Path, path: Option<&OsStr>) -> OsString {
    let mut entries: Vec<PathBuf> = path.map(|p| std::env::split_paths(p).collect()).unwrap_or_default();
    if !entries.iter().any(|e| e == dir) {
        entries.insert(0, dir.to_path_buf());
    }
    std::env::join_paths(entries).unwrap_or_else(|_| path.map(OsString::from).unwrap_or_default())
}

/// Puts cargo's bin directory on PATH for every child process of xtask
/// (bpf-linker lives there and aya-build looks it up on PATH).
pub fn init_env() {
    if let Some(bin) = cargo_bin_dir() {
        let new_path = path_with(&bin, std::env::var_os("PATH").as_deref());
        // SAFETY: called first thing in main, before any other thread exists.
        unsafe { std::env::set_var("PATH", new_path) };
    }
}

/// The cargo to run children with: the one that started us, else `cargo` on PATH.
pub fn cargo() -> Command {
    let program = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(program);
    cmd.current_dir(workspace_root());
    cmd
}

/// Is this process running as root?
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Prints one line for a step of a task; `done` prints how long it took.
pub struct Step {
    task: &'static str,
    name: String,
    started: Instant,
}

impl Step {
    pub fn new(task: &'static str, name: impl Into<String>) -> Self {
        Step { task, name: name.into(), started: Instant::now() }
    }

    /// `[task] name: message`
    pub fn say(&self, message: impl std::fmt::Display) {
        println!("[{}] {}: {}", self.task, self.name, message);
    }

    /// `[task] name: message (12.3 s)`
    pub fn done(&self, message: impl std::fmt::Display) {
        println!(
            "[{}] {}: {} ({:.1} s)",
            self.task,
            self.name,
            message,
            self.started.elapsed().as_secs_f64()
        );
    }
}

/// A command line as a person would type it (for messages).
pub fn describe(cmd: &Command) -> String {
    let mut words = Vec::new();
    for (key, value) in cmd.get_envs() {
        if let Some(value) = value {
            words.push(format!("{}={}", key.to_string_lossy(), value.to_string_lossy()));
        }
    }
    words.push(cmd.get_program().to_string_lossy().into_owned());
    words.extend(cmd.get_args().map(|a| {
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains(|c: char| c.is_whitespace() || "'\"$".contains(c)) {
            format!("'{}'", a.replace('\'', r"'\''"))
        } else {
            a.into_owned()
        }
    }));
    words.join(" ")
}

fn status_error(cmd: &Command, status: ExitStatus) -> anyhow::Error {
    let how = match (status.code(), std::os::unix::process::ExitStatusExt::signal(&status)) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => status.to_string(),
    };
    anyhow::anyhow!("`{}` failed ({how})", describe(cmd))
}

/// Runs a command with its output shown, stdin closed; fails unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    println!("    $ {}", describe(cmd));
    cmd.stdin(Stdio::null());
    let status = cmd.status().with_context(|| format!("could not start `{}`", describe(cmd)))?;
    if !status.success() {
        return Err(status_error(cmd, status));
    }
    Ok(())
}

/// Runs a command with its output shown and returns its exit status, whatever it is.
pub fn run_status(cmd: &mut Command) -> Result<ExitStatus> {
    println!("    $ {}", describe(cmd));
    cmd.status().with_context(|| format!("could not start `{}`", describe(cmd)))
}

/// Runs a command quietly and returns its stdout; fails unless it exits 0
/// (the error carries its stderr).
pub fn output(cmd: &mut Command) -> Result<String> {
    cmd.stdin(Stdio::null());
    let out = cmd.output().with_context(|| format!("could not start `{}`", describe(cmd)))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(status_error(cmd, out.status)).with_context(|| stderr.trim().to_string());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command with stdout and stderr going to `log` (appended); fails
/// unless it exits 0, and then shows the log's last lines.
pub fn run_logged(cmd: &mut Command, log: &Path) -> Result<()> {
    println!("    $ {}  >> {}", describe(cmd), log.display());
    let file = File::options()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("could not open log file {}", log.display()))?;
    let file2 = file.try_clone().context("could not duplicate the log file handle")?;
    cmd.stdin(Stdio::null()).stdout(file).stderr(file2);
    let status = cmd.status().with_context(|| format!("could not start `{}`", describe(cmd)))?;
    if !status.success() {
        print_tail(log, 40);
        return Err(status_error(cmd, status))
            .with_context(|| format!("its full output is in {}", log.display()));
    }
    Ok(())
}

/// Prints the last `n` lines of a file, indented.
pub fn print_tail(path: &Path, n: usize) {
    let Ok(file) = File::open(path) else { return };
    let lines: Vec<String> = BufReader::new(file).lines().map_while(Result::ok).collect();
    eprintln!("    --- last {} lines of {} ---", n.min(lines.len()), path.display());
    for line in &lines[lines.len().saturating_sub(n)..] {
        eprintln!("    | {line}");
    }
}

/// Fails with a message naming `what` when a path that must exist does not.
pub fn require_file(path: &Path, what: &str) -> Result<()> {
    if !path.is_file() {
        bail!("{what} not found at {}", path.display());
    }
    Ok(())
}

/// Finds an executable on PATH.
pub fn which_on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false))
}

/// An exclusive lock on `path` (created if missing), held until dropped.
pub fn lock(path: &Path) -> Result<std::fs::File> {
    let file = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("could not open {}", path.display()))?;
    // SAFETY: flock on a descriptor we own; no memory is passed.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("could not lock {}", path.display()));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_with_prepends_once() {
        let dir = Path::new("/root/.cargo/bin");
        let p = path_with(dir, Some(OsStr::new("/usr/bin:/bin")));
        assert_eq!(p, OsString::from("/root/.cargo/bin:/usr/bin:/bin"));
        let again = path_with(dir, Some(&p));
        assert_eq!(again, p);
        assert_eq!(path_with(dir, None), OsString::from("/root/.cargo/bin"));
    }

    #[test]
    fn finds_sh_on_path() {
        assert!(which_on_path("sh").is_some());
        assert!(which_on_path("surely-no-such-program-here").is_none());
    }

    #[test]
    fn describe_quotes_odd_words() {
        let mut cmd = Command::new("python3");
        cmd.args(["-c", "import sys; print(1)"]).env("A", "b");
        assert_eq!(describe(&cmd), "A=b python3 -c 'import sys; print(1)'");
    }

    #[test]
    fn workspace_root_has_the_workspace_manifest() {
        assert!(workspace_root().join("Cargo.toml").is_file());
        assert!(workspace_root().join("xtask").is_dir());
    }
}
