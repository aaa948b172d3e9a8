//! The kernel's own figures for a tracer's BPF programs (bpf_stats:
//! `run_cnt` and `run_time_ns` in /proc/PID/fdinfo of each program fd),
//! read while the tracer runs, named through BPF_OBJ_GET_INFO_BY_FD. Time
//! inside the programs only: unlike the wall-clock rows it does not move
//! with this VM's two speeds as much, since nothing outside the program
//! counts (the floor's empty program, ~70 ns a run here, is what the
//! measuring itself costs: the clock read twice per run).

use std::collections::BTreeMap;
use std::os::fd::{FromRawFd as _, OwnedFd};

use serde_json::{Value, json};

use super::report::{Row, median, round};

/// bpf(2) commands and the stats type (uapi/linux/bpf.h).
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_ENABLE_STATS: libc::c_long = 32;
const BPF_STATS_RUN_TIME: u32 = 0;

/// Run-time statistics on while this lives (BPF_ENABLE_STATS: the kernel
/// turns them off when the last such fd closes, also if the bench dies).
pub struct StatsOn(#[allow(dead_code)] OwnedFd);

/// Turns bpf_stats on; None when the kernel refuses (the figures are then
/// left out, and said so).
pub fn enable() -> Option<StatsOn> {
    let mut attr = [0u8; 16];
    attr[..4].copy_from_slice(&BPF_STATS_RUN_TIME.to_ne_bytes());
    let fd = bpf(BPF_ENABLE_STATS, &mut attr);
    // SAFETY: a new fd the kernel just gave us, owned from here on.
    (fd >= 0).then(|| StatsOn(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
}

fn bpf(cmd: libc::c_long, attr: &mut [u8]) -> libc::c_long {
    // SAFETY: `attr` is a zeroed buffer at least as large as the command's
    // attribute union prefix the kernel reads (size passed).
    unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len() as libc::c_uint) }
}

/// Per program id: (name, run_cnt, run_time_ns).
pub type Snapshot = BTreeMap<u32, (String, u64, u64)>;

/// The BPF programs `pid` holds open, with their counts so far.
pub fn snapshot(pid: u32) -> Snapshot {
    let mut out = Snapshot::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else { return out };
    for e in dir.flatten() {
        let Ok(text) = std::fs::read_to_string(e.path()) else { continue };
        let field =
            |k: &str| text.lines().find_map(|l| l.strip_prefix(k)).and_then(|v| v.trim().parse::<u64>().ok());
        let (Some(id), Some(cnt), Some(ns)) = (field("prog_id:"), field("run_cnt:"), field("run_time_ns:"))
        else {
            continue;
        };
        let id = id as u32;
        out.insert(id, (prog_name(id).unwrap_or_else(|| format!("prog{id}")), cnt, ns));
    }
    out
}

/// A program's name (the kernel keeps 15 bytes of it).
fn prog_name(id: u32) -> Option<String> {
    let mut attr = [0u8; 16];
    attr[..4].copy_from_slice(&id.to_ne_bytes());
    let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr);
    if fd < 0 {
        return None;
    }
    // SAFETY: a new fd, closed when this goes out of scope.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // struct bpf_prog_info up to its name (bytes 64..80).
    let mut info = [0u8; 80];
    let mut attr = [0u8; 16];
    attr[..4].copy_from_slice(&(std::os::fd::AsRawFd::as_raw_fd(&fd) as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&(info.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes());
    if bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) < 0 {
        return None;
    }
    let name = &info[64..80];
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    Some(String::from_utf8_lossy(&name[..end]).into_owned())
}

/// ns per run of each program that ran at least `min_runs` times between
/// two snapshots, by name (a second program of one name gets a `'`).
pub fn per_run(before: &Snapshot, after: &Snapshot, min_runs: u64) -> Vec<(String, u64, f64)> {
    let mut out: Vec<(String, u64, f64)> = Vec::new();
    for (id, (name, cnt, ns)) in after {
        let (c0, n0) = before.get(id).map_or((0, 0), |(_, c, n)| (*c, *n));
        let runs = cnt.saturating_sub(c0);
        if runs < min_runs {
            continue;
        }
        let mut name = name.clone();
        while out.iter().any(|(n, _, _)| *n == name) {
            name.push('\'');
        }
        out.push((name, runs, ns.saturating_sub(n0) as f64 / runs as f64));
    }
    out
}

/// One program of one row: medians and ranges over the rounds.
struct ProgFigure {
    row: String,
    program: String,
    runs_per_loop: f64,
    ns: Vec<f64>,
    /// Less the floor's empty program in the same round.
    net: Vec<f64>,
}

/// The floor's program: what a run costs with nothing in it.
const FLOOR_PROGRAM: &str = "pftrace_noop";

fn figures(rows: &[Row]) -> Vec<ProgFigure> {
    let floor_of = |round: usize| {
        rows.iter()
            .filter(|r| r.id == "floor")
            .flat_map(|r| &r.samples)
            .find(|s| s.round == round)
            .and_then(|s| s.progs.iter().find(|p| p.0 == FLOOR_PROGRAM))
            .map(|p| p.2)
    };
    let mut out: Vec<ProgFigure> = Vec::new();
    for r in rows {
        for s in &r.samples {
            for (name, runs, ns) in &s.progs {
                let i = match out.iter().position(|f| f.row == r.id && f.program == *name) {
                    Some(i) => i,
                    None => {
                        out.push(ProgFigure {
                            row: r.id.clone(),
                            program: name.clone(),
                            runs_per_loop: 0.0,
                            ns: Vec::new(),
                            net: Vec::new(),
                        });
                        out.len() - 1
                    }
                };
                let f = &mut out[i];
                f.runs_per_loop = f.runs_per_loop.max(*runs as f64);
                f.ns.push(*ns);
                if let Some(fl) = floor_of(s.round).filter(|_| r.id != "floor") {
                    f.net.push(ns - fl);
                }
            }
        }
    }
    out
}

fn spread(v: &[f64]) -> Option<(f64, f64, f64)> {
    let m = median(v.to_vec())?;
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some((m, lo, hi))
}

/// The programs' lines of the report.
pub fn text(rows: &[Row], note: Option<&str>) -> String {
    let mut t = String::new();
    if let Some(n) = note {
        return format!("kernel programs (bpf_stats): {n}\n");
    }
    let figs = figures(rows);
    if figs.is_empty() {
        return t;
    }
    let rounds = rows.iter().map(|r| r.samples.len()).max().unwrap_or(0);
    t += &format!(
        "kernel programs (bpf_stats: time inside each program per run, medians [ranges] of {rounds} rounds of \
         their own, stats on only then; net = less the floor's empty program in the same round, which is what \
         the measuring itself costs):\n"
    );
    for f in &figs {
        let Some((m, lo, hi)) = spread(&f.ns) else { continue };
        t += &format!("  {:<14} {:<16} {:>7.1} ns/run [{lo:.1}-{hi:.1}]", f.row, f.program, m);
        if let Some((n, nlo, nhi)) = spread(&f.net) {
            t += &format!("  net {n:>6.1} [{nlo:.1}-{nhi:.1}]");
        }
        t += &format!("  {:.2} M runs per loop\n", f.runs_per_loop / 1e6);
    }
    for r in rows.iter().filter(|r| !r.errors.is_empty() || r.note.is_some()) {
        t += &format!("  {}: {}\n", r.id, r.note.clone().unwrap_or_else(|| r.errors.join("; ")));
    }
    t
}

/// The programs' part of the JSON document.
pub fn json(rows: &[Row], note: Option<&str>) -> Value {
    let figs: Vec<Value> = figures(rows)
        .iter()
        .map(|f| {
            let s = |v: &[f64]| {
                spread(v).map(
                    |(m, lo, hi)| json!({"median": round(m, 1), "min": round(lo, 1), "max": round(hi, 1)}),
                )
            };
            json!({
                "row": f.row,
                "program": f.program,
                "runs_per_loop": f.runs_per_loop,
                "ns_per_run": s(&f.ns),
                "net_ns_per_run": s(&f.net),
                // Round by round, so two rows of one sitting compare round by round.
                "rounds_ns_per_run": f.ns.iter().map(|v| round(*v, 1)).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({"note": note, "programs": figs})
}
