//! `pftracectl status`: a readable summary of the daemon's state, with
//! anything that means data was lost or a process was not traced called out.

use std::{fmt::Write as _, path::Path};

use pftrace::protocol::{Command, Status};

use super::human;

/// Processes listed in the summary; `--json` has them all.
const MAX_PROCESS_LINES: usize = 40;

pub fn run(socket: &Path, json: bool) -> anyhow::Result<()> {
    let result = super::request(socket, Command::Status {})?;
    if json {
        println!("{}", serde_json::to_string_pretty(&result)?);
        return Ok(());
    }
    let status: Status = serde_json::from_value(result).map_err(|e| {
        anyhow::anyhow!("pftraced sent a status this pftracectl cannot read ({e}); try --json")
    })?;
    print!("{}", render(&status));
    Ok(())
}

fn or_none(items: &[String]) -> String {
    if items.is_empty() { "(none)".into() } else { items.join(", ") }
}

fn python(version: Option<&str>) -> String {
    version.map_or_else(|| "CPython (version unknown)".into(), |v| format!("CPython {v}"))
}

pub fn render(s: &Status) -> String {
    let mut o = String::new();
    let _ =
        writeln!(o, "pftraced {} (pid {}), up {}", s.daemon_version, s.daemon_pid, human::uptime(s.uptime_s));
    let _ = writeln!(o, "names:     {}", or_none(&s.names));
    let _ = writeln!(o, "targets:   {}", or_none(&s.targets));

    let _ = writeln!(o, "{}", if s.binaries.is_empty() { "binaries:  (none attached)" } else { "binaries:" });
    for b in &s.binaries {
        let scope = if b.host_wide { "host-wide".to_string() } else { format!("{} processes", b.processes) };
        let _ = writeln!(o, "  {}  {}  {scope}", b.path, python(b.version.as_deref()));
    }

    let running = s.processes.iter().filter(|p| p.running).count();
    let _ = writeln!(o, "processes: {} traced, {running} running", s.processes.len());
    if !s.processes.is_empty() {
        let _ = writeln!(
            o,
            "  {:>8}  {:<7}  {:>10}  {:<7}  {:<5}  command",
            "pid", "state", "calls", "python", "via"
        );
        for p in s.processes.iter().take(MAX_PROCESS_LINES) {
            let state = if p.running { "running" } else { "exited" };
            let version = p.version.as_deref().unwrap_or("?");
            let via = match (p.mechanism, p.agent_tracing) {
                (pftrace::python::Mechanism::Agent, false) => "agent (not yet connected)",
                (m, _) => m.as_str(),
            };
            let _ = writeln!(
                o,
                "  {:>8}  {state:<7}  {:>10}  {version:<7}  {via:<5}  {}",
                p.pid, p.calls, p.command
            );
        }
        if s.processes.len() > MAX_PROCESS_LINES {
            let more = s.processes.len() - MAX_PROCESS_LINES;
            let _ = writeln!(o, "  ... and {more} more (pftracectl status --json lists them all)");
        }
    }

    let _ = writeln!(
        o,
        "calls:     {} total, {} in memory, {} evicted from memory, {} incomplete, {} returns without an entry",
        s.calls_total, s.calls_in_memory, s.calls_evicted, s.incomplete_calls, s.unmatched_returns
    );
    let c = &s.counters;
    let _ = writeln!(
        o,
        "probes:    {} entries / {} returns seen, {} / {} matched, {} read errors, {} filtered in user space",
        c.entry_seen,
        c.return_seen,
        c.entry_matched,
        c.return_matched,
        c.read_errors,
        s.filtered_in_user_space
    );
    if s.filtered_by_qualified_name > 0 {
        let _ = writeln!(
            o,
            "           of those, {} by qualified name or module ({} of code objects that could not be resolved)",
            s.filtered_by_qualified_name, s.filtered_unresolved
        );
    }
    if s.processes.iter().any(|p| p.mechanism == pftrace::python::Mechanism::Agent) {
        let _ = writeln!(
            o,
            "agent:     {} reports; {} probe hits of processes not accepted and {} malformed reports dropped \
             in the kernel; {} calls whose name never arrived",
            c.agent_reports, c.agent_foreign, c.agent_bad, c.agent_unnamed
        );
        if c.batch.drains > 0 {
            let _ = writeln!(o, "batched:   {} events in {} batches", c.batch.events, c.batch.drains);
        }
    }
    if let Some(note) = c.batch.loss_note() {
        let _ = writeln!(o, "{note}");
    }
    if let Some(note) = super::stats::bounds_note(&c.bounds) {
        let _ = writeln!(o, "{note}");
    }
    if let Some(note) = c.cpu_coarse_note() {
        let _ = writeln!(o, "{note}");
    }
    if c.cpu_slots_taken > 0 {
        let (held, processes) = c.cpu_slots_held();
        let _ = writeln!(
            o,
            "cpu slots: {held} of {} held now, by {processes} process{}",
            pftrace_common::MAX_CPU_SLOTS,
            if processes == 1 { "" } else { "es" }
        );
    }
    if c.out_of_scope > 0 {
        let _ = writeln!(
            o,
            "scope:     {} probe hits of processes outside the scope dropped in the kernel (--binary probes \
             fire in every process running the binary)",
            c.out_of_scope
        );
    }
    let process_reports_lost = c.process_reports_lost();
    if c.lost > 0 || process_reports_lost > 0 {
        let _ = writeln!(
            o,
            "LOST:      {} call records and {} process start/exit reports (the ring buffer was full); \
             raise limits.ring_buffer_bytes in pftraced.toml",
            c.lost, process_reports_lost
        );
    } else {
        let _ = writeln!(o, "lost:      0 records");
    }

    match &s.output {
        None => {
            let _ = writeln!(o, "output:    none (set output.dir in pftraced.toml for rolling trace files)");
        }
        Some(out) => {
            let _ = writeln!(
                o,
                "output:    {}: {} files, {} calls, {} written",
                out.dir,
                out.files_written,
                out.calls_written,
                human::bytes(out.bytes_written)
            );
            if let Some(file) = &out.current_file {
                let _ = writeln!(o, "           writing {file}");
            }
            if out.write_errors > 0 || out.calls_not_written > 0 {
                let _ = writeln!(
                    o,
                    "WRITE ERRORS: {} ({} calls not written); last: {}",
                    out.write_errors,
                    out.calls_not_written,
                    out.last_error.as_deref().unwrap_or("?")
                );
            }
        }
    }

    if !s.jobs.is_empty() {
        let running = s.jobs.iter().filter(|j| j.running).count();
        let _ = writeln!(o, "jobs:      {running} running, {} finished", s.jobs.len() - running);
        for j in &s.jobs {
            let state = if j.running { "running" } else { "finished" };
            let trace = match (&j.trace, &j.error, j.running) {
                (_, Some(err), _) => format!("NO TRACE: {err}"),
                (Some(t), None, true) => format!("trace {t} when it ends"),
                (Some(t), None, false) => format!("trace {t}"),
                (None, None, _) => "no trace".into(),
            };
            let _ = writeln!(
                o,
                "  job {}: {state}, {} processes, {} calls; {trace}",
                j.id,
                j.pids.len(),
                j.calls
            );
        }
    }

    if !s.functions.is_empty() {
        let c = &s.codes;
        let _ = writeln!(
            o,
            "functions: {} called, {} resolved (module, qualified name){}",
            s.functions_total,
            c.resolved,
            if c.queue_full + c.table_full > 0 {
                format!(
                    "; {} requests dropped (queue full), {} left unresolved (table full)",
                    c.queue_full, c.table_full
                )
            } else {
                String::new()
            }
        );
        for f in &s.functions {
            let name = f.path.as_deref().unwrap_or(&f.function);
            let _ = writeln!(o, "  {:>10}  {name}  ({}:{})", f.calls, f.file, f.line);
        }
        if s.functions_total > s.functions.len() as u64 {
            let more = s.functions_total - s.functions.len() as u64;
            let _ = writeln!(o, "  ... and {more} more (pftracectl stats lists them all)");
        }
    }

    if !s.refused.is_empty() {
        let _ = writeln!(o, "refused:   {} processes could not be traced:", s.refused.len());
        for r in &s.refused {
            let _ = writeln!(o, "  pid {}: {}", r.pid, r.reason);
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use pftrace::protocol::{BinaryStatus, OutputStatus, ProcessStatus, Refusal};

    use super::*;

    #[test]
    fn summary_calls_out_losses() {
        let mut s = Status {
            daemon_pid: 10,
            daemon_version: "0.1.0".into(),
            uptime_s: 75.0,
            names: vec!["compute".into()],
            targets: vec!["cgroup /sys/fs/cgroup/job42.scope".into()],
            binaries: vec![BinaryStatus {
                path: "/usr/bin/python3.9".into(),
                version: Some("3.9".into()),
                host_wide: false,
                processes: 1,
            }],
            processes: vec![ProcessStatus {
                pid: 1234,
                binary: "/usr/bin/python3.9".into(),
                version: Some("3.9".into()),
                command: "python3 app.py".into(),
                running: true,
                calls: 99,
                mechanism: pftrace::python::Mechanism::Usdt,
                agent_tracing: false,
            }],
            refused: vec![Refusal { pid: 77, reason: "CPython 3.12 has no function probes".into() }],
            output: Some(OutputStatus {
                dir: "/var/lib/pftrace".into(),
                write_errors: 1,
                calls_not_written: 5,
                ..Default::default()
            }),
            functions: vec![
                pftrace::protocol::FunctionSeen {
                    function: "run".into(),
                    path: Some("app.A.run".into()),
                    file: "/srv/app.py".into(),
                    line: 20,
                    calls: 7,
                },
                pftrace::protocol::FunctionSeen {
                    function: "run".into(),
                    path: None,
                    file: "/srv/app.py".into(),
                    line: 30,
                    calls: 2,
                },
            ],
            functions_total: 3,
            codes: pftrace::protocol::CodeCounts {
                resolved: 1,
                queue_full: 0,
                table_full: 0,
                process_full: 0,
            },
            ..Default::default()
        };
        s.counters.lost = 3;
        let text = render(&s);
        assert!(text.starts_with("pftraced 0.1.0 (pid 10), up 1m 15s\nnames:     compute\n"), "{text}");
        assert!(text.contains("  /usr/bin/python3.9  CPython 3.9  1 processes\n"), "{text}");
        assert!(text.contains("      1234  running          99  3.9      usdt   python3 app.py\n"), "{text}");
        assert!(text.contains("LOST:      3 call records"), "{text}");
        assert!(text.contains("WRITE ERRORS: 1 (5 calls not written)"), "{text}");
        assert!(text.contains("  pid 77: CPython 3.12 has no function probes\n"), "{text}");
        assert!(text.contains("functions: 3 called, 1 resolved (module, qualified name)\n"), "{text}");
        assert!(text.contains("           7  app.A.run  (/srv/app.py:20)\n"), "{text}");
        assert!(text.contains("           2  run  (/srv/app.py:30)\n  ... and 1 more"), "{text}");
    }
}
