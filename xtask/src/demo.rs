//! `cargo xtask demo`: setup, build, then trace examples/app.py with pftraced.

use std::process::{Command, ExitCode};

use anyhow::{Context, Result};

use crate::util::{self, Step};

/// Functions of examples/app.py the demo traces.
const TRACED: &[&str] = &["compute", "load_records"];

pub fn run() -> Result<ExitCode> {
    let python = crate::setup::base()?;
    let pftraced = crate::build::build()?;

    let app = util::workspace_root().join("examples").join("app.py");
    util::require_file(&app, "the demo program")?;
    let out_dir = util::target_dir().join("demo");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("could not create {}", out_dir.display()))?;
    let trace = out_dir.join("demo-trace.json");
    if trace.exists() {
        std::fs::remove_file(&trace)
            .with_context(|| format!("could not remove the old {}", trace.display()))?;
    }

    let step = Step::new("demo", "trace examples/app.py");
    let mut cmd = Command::new(&pftraced);
    for name in TRACED {
        cmd.args(["-t", name]);
    }
    cmd.arg("-o").arg(&trace).arg("--").arg(&python).arg(&app);
    cmd.current_dir(util::workspace_root());

    // Ctrl-C reaches pftraced too (same process group); let it finish its
    // summary and report its status instead of dying first. A handler (unlike
    // SIG_IGN) is reset to the default in the child on exec.
    extern "C" fn ignore(_: libc::c_int) {}
    // SAFETY: installs an async-signal-safe no-op handler.
    unsafe { libc::signal(libc::SIGINT, ignore as *const () as libc::sighandler_t) };
    let status = util::run_status(&mut cmd)?;

    let code = match status.code() {
        Some(code) => code,
        None => 128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0),
    };
    if status.success() {
        step.done("pftraced exited 0");
        println!("[demo] trace: {}", trace.display());
    } else {
        step.done(format!("pftraced FAILED ({status})"));
        if trace.exists() {
            println!("[demo] trace (may be partial): {}", trace.display());
        }
    }
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}
