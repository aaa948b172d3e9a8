//! `cargo xtask test`: setup, then every test (xtask's own, pftrace-common's, pftrace-daemon's).
//!
//! The daemon's tests load BPF programs and trace a real CPython, so they need
//! root and get the probe-enabled interpreter through `PFTRACE_PYTHON`.

use std::process::ExitCode;

use anyhow::{Result, bail};

use crate::util::{self, Step};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Extra arguments for `cargo test` of the pftrace crates, after `--`
    /// (e.g. `cargo xtask test -- trace_ -- --nocapture`). With extra
    /// arguments xtask's own tests are skipped.
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

    if args.cargo_args.is_empty() {
        let step = Step::new("test", "xtask");
        step.say("cargo test -p xtask");
        match util::run_status(util::cargo().args(["test", "-p", "xtask"])) {
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

    let step = Step::new("test", "pftrace-common, pftrace-daemon");
    step.say(format!("PFTRACE_PYTHON={}", env.python.display()));
    let mut cmd = util::cargo();
    cmd.env("PFTRACE_PYTHON", &env.python)
        .args([
            "test",
            "--release",
            "-p",
            "pftrace-common",
            "-p",
            "pftrace-daemon",
        ])
        .args(&args.cargo_args);
    let status = util::run_status(&mut cmd)?;
    if status.success() {
        step.done("passed");
    } else {
        step.done(format!("FAILED ({status})"));
        failed.push("pftrace-common/pftrace-daemon");
    }

    if failed.is_empty() {
        println!("[test] all tests passed");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "[test] tests failed in: {} (see cargo's output above)",
            failed.join(", ")
        );
        Ok(ExitCode::FAILURE)
    }
}
