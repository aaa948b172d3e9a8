//! Chrome Trace Event JSON (opens in Perfetto and chrome://tracing): one
//! complete ("X") event per call with wall-clock µs timestamps, "M" metadata
//! naming processes, and pftrace's counters under otherData.

use std::{
    io::{self, Write as _},
    path::Path,
};

use serde_json::{Value, json};

use super::TraceFormat;
use crate::{pairing::CallEnd, trace::Trace};

/// The Chrome Trace Event format.
pub struct Chrome;

/// The module-like category of a call: the file's stem (`decoder` for `json/decoder.py`).
fn category(file: &str) -> &str {
    Path::new(file)
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or(file)
}

impl TraceFormat for Chrome {
    fn write(&self, trace: &Trace, out: &mut dyn io::Write) -> io::Result<()> {
        let mut w = io::BufWriter::new(out);
        write!(w, "{{\"displayTimeUnit\":\"ns\",\"traceEvents\":[")?;
        let mut first = true;
        let mut put = |w: &mut io::BufWriter<&mut dyn io::Write>, v: &Value| -> io::Result<()> {
            if !first {
                w.write_all(b",\n")?;
            }
            first = false;
            serde_json::to_writer(&mut *w, v).map_err(io::Error::other)
        };
        for p in &trace.processes {
            let name = Path::new(&p.binary)
                .file_name()
                .and_then(|s| s.to_str())
                .unwrap_or("python");
            put(
                &mut w,
                &json!({"name": "process_name", "ph": "M", "pid": p.pid, "tid": p.pid,
                                "args": {"name": format!("{name} {}", p.pid)}}),
            )?;
        }
        for c in &trace.calls {
            let mut args = json!({"file": &*c.file, "line": c.line});
            if c.end == CallEnd::Incomplete {
                args["incomplete"] = json!(true);
            }
            put(
                &mut w,
                &json!({
                    "name": &*c.name,
                    "cat": category(&c.file),
                    "ph": "X",
                    "pid": c.pid,
                    "tid": c.tid,
                    "ts": trace.clock.wall_us(c.start_ns),
                    "dur": c.duration_ns() as f64 / 1000.0,
                    "args": args,
                }),
            )?;
        }
        drop(put);
        let unmatched: Vec<Value> = trace
            .unmatched_returns
            .iter()
            .map(|u| {
                json!({"pid": u.pid, "tid": u.tid, "name": &*u.name, "file": &*u.file,
                            "ts": trace.clock.wall_us(u.ts_ns)})
            })
            .collect();
        let other = json!({
            "pftrace": {
                "version": env!("CARGO_PKG_VERSION"),
                "names": trace.names,
                "processes": trace.processes,
                "counters": trace.counters,
                "calls": trace.calls.len(),
                "incomplete_calls": trace.incomplete_calls(),
                "unmatched_returns": unmatched,
                "skipped_entries": trace.skipped_entries,
                "bad_records": trace.bad_records,
                "start_us": trace.clock.wall_us(trace.start_ns),
                "end_us": trace.clock.wall_us(trace.end_ns),
            }
        });
        write!(w, "],\"otherData\":")?;
        serde_json::to_writer(&mut w, &other).map_err(io::Error::other)?;
        writeln!(w, "}}")?;
        w.into_inner().map_err(|e| e.into_error())?.flush()
    }
}
