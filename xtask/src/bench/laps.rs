//! Paired laps: a measured loop and a control loop timed in turn, each lap a
//! new bench/calls.py process pinned to CPU 0, compared by the median over
//! lap pairs of measured/control. This VM runs one loop at two speeds for
//! seconds to minutes at a time (46-57 vs 83-99 ns/call minutes apart,
//! 2026-11-27): runs timed minutes apart (fastest-of-N or medians) compare
//! different speeds, a lap and the control lap next to it share one.
//! Used by the neighbour row (scope.rs) and the agent's sparse row
//! (agent_laps.rs).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use serde_json::{Value, json};

use super::{procs::Workload, report::median};

/// One phase: laps of the measured loop and of the control taken in turn,
/// CPU ns per Python call of each.
#[derive(Debug, Clone, Default)]
pub struct Phase {
    pub measured: Vec<f64>,
    pub control: Vec<f64>,
}

impl Phase {
    fn fastest(v: &[f64]) -> f64 {
        v.iter().copied().fold(f64::INFINITY, f64::min)
    }

    /// The measured loop's speed relative to the control's: the median over
    /// lap pairs (a measured lap and the control lap next to it, within
    /// a fraction of a second, so at one machine speed) of their ratio. The
    /// fastest lap of each (printed beside) can come from different speeds:
    /// 3 `--neighbour-only` runs at load 2.5-3.9 gave while/before 1.029,
    /// 1.011 and 0.798 by fastest laps (in the last, 121.5/156.3 while
    /// tracing: the control never ran a fast lap), 1.010, 1.012 and 0.982 by
    /// lap pairs.
    pub fn relative(&self) -> f64 {
        median(self.measured.iter().zip(&self.control).map(|(n, c)| n / c).collect()).unwrap_or(f64::NAN)
    }

    /// Fastest measured lap over fastest control lap.
    pub fn fastest_relative(&self) -> f64 {
        Self::fastest(&self.measured) / Self::fastest(&self.control)
    }

    /// `r (fastest laps m/c = r; medians m/c)`.
    pub fn text(&self) -> String {
        let med = |v: &[f64]| median(v.to_vec()).unwrap_or(f64::NAN);
        format!(
            "{:.3} (fastest laps {:.1}/{:.1} = {:.3}; medians {:.1}/{:.1})",
            self.relative(),
            Self::fastest(&self.measured),
            Self::fastest(&self.control),
            self.fastest_relative(),
            med(&self.measured),
            med(&self.control),
        )
    }

    /// The laps; `measured` names the measured loop's key (`{measured}_cpu_ns_per_call`).
    pub fn to_json(&self, measured: &str) -> Value {
        json!({
            "relative_median_of_lap_pairs": self.relative(),
            "relative_fastest_laps": self.fastest_relative(),
            format!("{measured}_cpu_ns_per_call"): self.measured,
            "control_cpu_ns_per_call": self.control,
        })
    }
}

/// `laps` pairs, the measured lap first in even pairs and the control first
/// in odd ones: whatever a lap leaves behind for the next (a traced lap's
/// pftraced tearing its programs down as the control starts) falls on both
/// sides alike. In a --quick run of the agent's row, measured-first only,
/// the control lap right after a traced one read 152-153 ns/call in 2 of 5
/// pairs against 87-90 for the traced laps.
pub fn phase(
    laps: usize,
    mut measured: impl FnMut() -> Result<f64>,
    mut control: impl FnMut() -> Result<f64>,
) -> Result<Phase> {
    let mut p = Phase::default();
    for i in 0..laps {
        if i % 2 == 0 {
            p.measured.push(measured()?);
            p.control.push(control()?);
        } else {
            p.control.push(control()?);
            p.measured.push(measured()?);
        }
    }
    Ok(p)
}

/// `taskset -c 0 PROGRAM`: every lap on the same CPU.
pub fn pinned(program: &Path) -> Command {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "0"]).arg(program);
    cmd
}

/// One lap: `cmd` runs `calls_py N --wait`; released at once, it must exit
/// 0. Its loop's CPU ns per call, and its stderr.
pub fn lap(cmd: Command, calls_py: &Path, timeout: Duration) -> Result<(f64, Vec<String>)> {
    let mut work = Workload::start_command(cmd, calls_py, timeout)?;
    work.release()?;
    let (work, result) = work.wait_result(timeout)?;
    let (result, stderr) = work.finish_stderr(result, Duration::from_secs(60))?;
    Ok((result.cpu_ns_per_call(), stderr))
}
