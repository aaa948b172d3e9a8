//! Issue 12's sparse target by paired laps: bench/calls.py launched under
//! `pftraced --agent -t rare` (0.1% of calls matched, the batched road,
//! `PFTRACE_AGENT_BATCH=1`) and an untraced control of the same interpreter,
//! timed in turn, each lap a new process pinned to CPU 0 (laps.rs), the
//! median over lap pairs of traced/control (CPU ns per Python call of the
//! loop). The agent rows' fastest-of-N sparse figure (agent.rs) times runs
//! minutes apart, and this VM's two speeds made it read anything from 0.56
//! to 1.55 per round; a lap and the control lap next to it share one
//! speed. Each traced lap must have written exactly the calls it made
//! (agent.rs's check of the batched sparse case).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, bail};
use serde_json::{Value, json};

use super::agent;
use super::laps::{self, Phase};

/// The sparse row of one interpreter.
pub struct SparseLaps {
    pub python: String,
    pub phase: Result<Phase>,
}

/// `laps` pairs on each interpreter, `n` loop iterations a lap; `say` hears
/// each interpreter's result.
pub fn measure(
    pftraced: &Path,
    calls_py: &Path,
    dir: &Path,
    pythons: &[(String, PathBuf)],
    n: u64,
    laps: usize,
    say: impl Fn(&str, &Result<Phase>),
) -> Vec<SparseLaps> {
    let timeout = Duration::from_secs(60) + Duration::from_micros(50 * n);
    let trace = dir.join("agent-laps.json");
    pythons
        .iter()
        .map(|(label, py)| {
            let traced = || -> Result<f64> {
                if !py.exists() {
                    bail!("{} is missing (run `cargo xtask setup`)", py.display());
                }
                // pftraced is pinned with its Python: the figure is the
                // Python process's CPU time, which pftraced's own does not enter.
                let mut cmd = laps::pinned(pftraced);
                cmd.env("PFTRACE_AGENT_BATCH", "1");
                cmd.args(["--agent", "-t", "rare", "-o"]).arg(&trace).arg("--").arg(py);
                cmd.arg(calls_py).arg(n.to_string()).arg("--wait");
                let (ns, stderr) = laps::lap(cmd, calls_py, timeout)?;
                let _ = std::fs::remove_file(&trace);
                agent::check_batched_sparse(&stderr.join("\n"), n)?;
                Ok(ns)
            };
            let control = || -> Result<f64> {
                let mut cmd = laps::pinned(py);
                cmd.arg(calls_py).arg(n.to_string()).arg("--wait");
                Ok(laps::lap(cmd, calls_py, timeout)?.0)
            };
            let phase = laps::phase(laps, traced, control);
            say(label, &phase);
            SparseLaps { python: label.clone(), phase }
        })
        .collect()
}

impl SparseLaps {
    /// Traced over control, the median of lap pairs.
    pub fn ratio(&self) -> Option<f64> {
        self.phase.as_ref().ok().map(Phase::relative).filter(|r| r.is_finite())
    }

    pub fn to_json(&self) -> Value {
        match &self.phase {
            Ok(p) => json!({"python": self.python, "laps": p.to_json("traced")}),
            Err(e) => json!({"python": self.python, "error": format!("{e:#}")}),
        }
    }
}

/// The rows' lines.
pub fn text(rows: &[SparseLaps], laps: usize, n: u64) -> String {
    let mut s = format!(
        "agent batched sparse by paired laps ({laps} laps each in turn, pinned to CPU 0, {} calls a lap; CPU \
         ns/call, traced/untraced control, median of lap pairs):\n",
        n + n.div_ceil(1000)
    );
    for r in rows {
        match &r.phase {
            Ok(p) => s += &format!("  {:<14} {}\n", r.python, p.text()),
            Err(e) => s += &format!("  {:<14} failed: {e:#}\n", r.python),
        }
    }
    s
}

/// A row that could not be measured, as a problem of the run.
pub fn problems(rows: &[SparseLaps]) -> Vec<String> {
    rows.iter()
        .filter_map(|r| r.phase.as_ref().err().map(|e| format!("agent sparse laps ({}): {e:#}", r.python)))
        .collect()
}
