//! Chrome Trace Event JSON (opens in Perfetto and chrome://tracing): one
//! complete ("X") event per call with wall-clock µs timestamps, "M" metadata
//! naming processes, and pftrace's counters under otherData.

use std::io::{self, Write as _};

use serde_json::{Value, json};

use super::{
    TraceFormat,
    events::{call_event, process_name_event},
};
use crate::trace::Trace;

/// The Chrome Trace Event format.
pub struct Chrome;

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
            put(&mut w, &process_name_event(p.pid, Some(p)))?;
        }
        for c in &trace.calls {
            put(&mut w, &call_event(c, &trace.clock))?;
        }
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
