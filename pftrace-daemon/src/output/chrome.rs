//! Chrome Trace Event JSON (opens in Perfetto and chrome://tracing): one
//! complete ("X") event per call with wall-clock µs timestamps, "M" metadata
//! naming processes and threads and labelling processes with their batch job
//! and command line, "C" counter tracks of each process's CPU % and memory,
//! and pftrace's counters under otherData.
//!
//! Layout, in this order: `process_name` (and `process_labels`) per traced
//! process, `thread_name` per thread that made a call, the calls in the order
//! they started (outer before inner at the same ns), then the counter samples. Thread names are read from
//! `/proc/PID/task/TID/comm` when the trace is written; a thread that has
//! exited by then is named `thread TID` (its process's main thread takes the
//! process's comm).

use std::{
    collections::{BTreeSet, HashSet},
    io::{self, Write as _},
};

use serde_json::{Value, json};

use super::{
    TraceFormat,
    events::{call_event, counter_events, process_labels_event, process_name_event, thread_name_event},
};
use crate::{pairing::Call, procinfo, trace::Trace};

/// The Chrome Trace Event format.
pub struct Chrome;

/// The name shown for thread `tid` of process `pid`.
fn thread_display_name(trace: &Trace, pid: u32, tid: u32) -> String {
    let live = procinfo::thread_name(pid, tid);
    if !live.is_empty() {
        return live;
    }
    match trace.process(pid) {
        Some(p) if tid == pid && !p.comm.is_empty() => p.comm.clone(),
        _ => format!("thread {tid}"),
    }
}

/// An event of any of the types in `events.rs`, to one writer (a closure
/// cannot be generic).
trait Event {
    fn write_to(&self, w: &mut io::BufWriter<&mut dyn io::Write>) -> io::Result<()>;
}

impl<T: serde::Serialize> Event for T {
    fn write_to(&self, w: &mut io::BufWriter<&mut dyn io::Write>) -> io::Result<()> {
        serde_json::to_writer(w, self).map_err(io::Error::from)
    }
}

impl TraceFormat for Chrome {
    fn write(&self, trace: &Trace, out: &mut dyn io::Write) -> io::Result<()> {
        let source = trace.call_source();
        let tally = source.tally()?;
        let mut w = io::BufWriter::with_capacity(1 << 16, out);
        write!(w, "{{\"displayTimeUnit\":\"ns\",\"traceEvents\":[")?;
        let mut first = true;
        let mut put = |w: &mut io::BufWriter<&mut dyn io::Write>, v: &dyn Event| -> io::Result<()> {
            if !first {
                w.write_all(b",\n")?;
            }
            first = false;
            v.write_to(w)
        };
        let known: HashSet<u32> = trace.processes.iter().map(|p| p.pid).collect();
        for p in &trace.processes {
            put(&mut w, &process_name_event(p.pid, Some(p)))?;
            if let Some(labels) = process_labels_event(p) {
                put(&mut w, &labels)?;
            }
        }
        // Calls of processes the trace has no record of still get a named track.
        let unknown: BTreeSet<u32> =
            tally.per_pid.keys().copied().filter(|pid| !known.contains(pid)).collect();
        for &pid in &unknown {
            put(&mut w, &process_name_event(pid, None))?;
        }
        for &(pid, tid) in &tally.threads {
            put(&mut w, &thread_name_event(pid, tid, &thread_display_name(trace, pid, tid)))?;
        }
        let mut codes = crate::codes::CodeReader::new(&trace.codes);
        for c in source.sorted(|c: &Call| (c.start_ns, c.depth))? {
            let c = c?;
            put(&mut w, &call_event(&c, &codes.info(&c), &trace.clock))?;
        }
        for s in &trace.samples {
            let (cpu, memory) = counter_events(s, &trace.clock);
            put(&mut w, &cpu)?;
            put(&mut w, &memory)?;
        }
        let unmatched: Vec<Value> = trace
            .unmatched_returns
            .iter()
            .map(|u| {
                json!({"pid": u.pid, "tid": u.tid, "name": &*u.name, "file": &*u.file,
                       "ts": trace.clock.wall_us(u.ts_ns), "generator": u.generator})
            })
            .collect();
        let other = json!({
            "pftrace": {
                "version": env!("CARGO_PKG_VERSION"),
                "names": trace.names,
                "processes": trace.processes,
                "counters": trace.counters,
                "calls": tally.calls,
                "incomplete_calls": tally.incomplete,
                "unmatched_returns": unmatched,
                // `unmatched_returns` keeps the first of them only; all are counted.
                "unmatched_returns_total": trace.unmatched_returns_total,
                "unmatched_returns_sample_limit": crate::pairing::UNMATCHED_SAMPLE,
                "unmatched_generator_returns": trace.unmatched_generator_returns,
                "skipped_entries": trace.skipped_entries,
                "bad_records": trace.bad_records,
                "filtered_in_user_space": trace.filtered_in_user_space,
                "filtered_by_qualified_name": trace.filtered_by_qualified_name,
                "filtered_unresolved": trace.filtered_unresolved,
                "file_names_cut": trace.file_names_cut,
                "calls_total": trace.calls_total,
                "calls_evicted": trace.calls_evicted,
                "start_us": trace.clock.wall_us(trace.start_ns),
                "end_us": trace.clock.wall_us(trace.end_ns),
                "hostname": trace.hostname,
            }
        });
        write!(w, "],\"otherData\":")?;
        serde_json::to_writer(&mut w, &other).map_err(io::Error::from)?;
        writeln!(w, "}}")?;
        w.into_inner().map_err(|e| e.into_error())?.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::testing::sample_trace;

    #[test]
    fn metadata_calls_and_counters() {
        let trace = sample_trace();
        let mut out = Vec::new();
        Chrome.write(&trace, &mut out).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        let events = v["traceEvents"].as_array().unwrap();
        let count = |ph: &str, name: Option<&str>| {
            events.iter().filter(|e| e["ph"] == ph && name.is_none_or(|n| e["name"] == n)).count()
        };
        assert_eq!(count("X", None), trace.calls.len());
        assert_eq!(count("M", Some("process_name")), 2);
        assert_eq!(count("M", Some("process_labels")), 1);
        assert_eq!(count("M", Some("thread_name")), 3);
        assert_eq!(count("C", Some("cpu")), trace.samples.len());
        assert_eq!(count("C", Some("memory")), trace.samples.len());
        let labels = events.iter().find(|e| e["name"] == "process_labels").unwrap();
        assert!(labels["args"]["labels"].as_str().unwrap().starts_with("slurm job 42,"));
        // The main thread of a process whose threads are gone takes its comm.
        let main = events
            .iter()
            .find(|e| e["name"] == "thread_name" && e["tid"] == e["pid"] && e["pid"] == 4_200_001)
            .unwrap();
        assert_eq!(main["args"]["name"], "worker");
        assert!(events.iter().any(|e| e["name"] == "thread_name" && e["args"]["name"] == "thread 4200002"));
        assert_eq!(v["otherData"]["pftrace"]["calls"], trace.calls.len());
    }
}
