//! `cargo xtask test`: setup, then every test (xtask's own, pftrace-common's,
//! pftrace-code's, pftrace-daemon's, and the in-process agent's: pftrace-agent
//! and pftrace-agent-host, whose tests build the agent and run it in the test
//! interpreters).
//!
//! The daemon's tests load BPF programs and trace real CPythons, so they need
//! root and get the interpreters setup made through the environment:
//! `PFTRACE_PYTHON` (the probe-enabled CPython 3.9), `PFTRACE_SID_ROOT`
//! (Debian sid's CPython 3.13-3.15 under `usr/bin/python3.X`) and
//! `PFTRACE_PYENV_ROOT` (pyenv's builds under `versions/3.X.Y`) and
//! `PFTRACE_SYSTEMD_ROOT` (the Debian root the systemd service tests boot) and
//! `PFTRACE_HATCHET_PYTHON` (a python with LLNL Hatchet).

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, ExitCode, ExitStatus, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::util::{self, Step};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Extra arguments for `cargo test` of the pftrace crates, after `--`
    /// (e.g. `cargo xtask test -- trace_ -- --nocapture`; pftraced's
    /// integration tests are the binary `it`, a module per file: `cargo
    /// xtask test -- --test it agent::`). With extra arguments xtask's own
    /// tests are skipped.
    #[arg(last = true)]
    pub cargo_args: Vec<String>,
}

pub fn run(args: &Args) -> Result<ExitCode> {
    if !util::is_root() {
        bail!(
            "the tests need root and BPF (they load eBPF programs and attach uprobes): \
             run `sudo -E cargo xtask test` (or as root)"
        );
    }
    let env = crate::setup::run()?;
    let mut failed = Vec::new();
    let mut totals = Totals::default();

    if args.cargo_args.is_empty() {
        let step = Step::new("test", "xtask");
        step.say("cargo test -p xtask");
        match run_counting(util::cargo().args(["test", "-p", "xtask"]), &mut totals) {
            Ok(status) if status.success() => step.done("passed"),
            Ok(status) => {
                step.done(format!("FAILED ({status})"));
                failed.push("xtask");
            }
            Err(err) => return Err(err),
        }
    } else {
        Step::new("test", "xtask").say("skipped (extra cargo test arguments given)");
    }

    let step =
        Step::new("test", "pftrace-common, pftrace-code, pftrace-daemon, pftrace-agent, pftrace-agent-host");
    step.say(format!(
        "PFTRACE_PYTHON={} PFTRACE_SID_ROOT={} PFTRACE_PYENV_ROOT={} PFTRACE_SYSTEMD_ROOT={}",
        env.python.display(),
        env.sid_root.display(),
        env.pyenv_root.display(),
        env.systemd_root.display()
    ));
    let mut cmd = util::cargo();
    cmd.env("PFTRACE_PYTHON", &env.python)
        .env("PFTRACE_SID_ROOT", &env.sid_root)
        .env("PFTRACE_PYENV_ROOT", &env.pyenv_root)
        .env("PFTRACE_SYSTEMD_ROOT", &env.systemd_root)
        .env("PFTRACE_HATCHET_PYTHON", &env.hatchet_python)
        .env("PFTRACE_GREENLET_PATH", &env.greenlet_path)
        // --no-fail-fast: one failing test file must not hide the results of
        // the files after it (a red CI run should list every failure at once).
        .args([
            "test",
            "--release",
            "--no-fail-fast",
            "-p",
            "pftrace-common",
            "-p",
            "pftrace-code",
            "-p",
            "pftrace-daemon",
        ])
        .args(["-p", "pftrace-agent", "-p", "pftrace-agent-host"])
        .args(&args.cargo_args);
    let status = run_counting(&mut cmd, &mut totals)?;
    if status.success() {
        step.done("passed");
    } else {
        step.done(format!("FAILED ({status})"));
        failed.push("pftrace-common/pftrace-code/pftrace-daemon/pftrace-agent/pftrace-agent-host");
    }

    let ran_none = totals.passed == 0 && failed.is_empty();
    if ran_none {
        eprintln!("[test] no test ran: that is a failure, not a pass");
    } else if failed.is_empty() {
        println!("[test] all tests passed");
    } else {
        eprintln!("[test] tests failed in: {} (see cargo's output above)", failed.join(", "));
    }
    // The last line: one total over every test binary, in the plain form CI reads.
    println!("tests: {} passed, {} failed, {} skipped", totals.passed, totals.failed, totals.ignored);
    Ok(if failed.is_empty() && !ran_none { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Test counts summed over cargo's `test result:` lines.
#[derive(Debug, Default, PartialEq)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Totals {
    /// Adds the counts of a line like `test result: ok. 9 passed; 0 failed; 1 ignored; ...`.
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else { return };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (words.next(), words.next()) else { continue };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

/// Runs `cmd` with its stdout passed through line by line, counting test results.
fn run_counting(cmd: &mut Command, totals: &mut Totals) -> Result<ExitStatus> {
    println!("    $ {}", util::describe(cmd));
    let mut child =
        cmd.stdout(Stdio::piped()).spawn().with_context(|| format!("running {}", util::describe(cmd)))?;
    let stdout = child.stdout.take().expect("piped");
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test output")?;
        println!("{line}");
        totals.add_line(&line);
    }
    child.wait().context("waiting for cargo test")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_cargo_result_lines() {
        let mut t = Totals::default();
        t.add_line(
            "test result: ok. 9 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s",
        );
        t.add_line("test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out");
        t.add_line("running 5 tests");
        assert_eq!(t, Totals { passed: 12, failed: 2, ignored: 1 });
    }
}
