//! The JSON shape of the settrace prototype ("Tracing without Decorators"),
//! for users of that prototype: traced functions, their calls, and
//! per-function metadata, indented by four spaces as it printed it.
//!
//! ```text
//! {"functions": ["step", ...],
//!  "results":  {"step": [{"name", "cpu_start", "time_start", "time_end", "time_elapsed",
//!                         "cpu_end", "cpu_usage", "mem_usage", "pid", "process_name", "tid"}, ...]},
//!  "metadata": {"step": {"function", "lineno", "filename", "module", "path"}}}
//! ```
//!
//! What each figure means here (the prototype read psutil around each call):
//! - `time_start`, `time_end`: wall-clock seconds since the Unix epoch
//!   (floats); `time_elapsed`: the call's duration in seconds.
//! - `cpu_start`, `cpu_end`: the process's CPU utilisation (% of one core,
//!   user + system) in the sampling interval that ended last at or before
//!   the call's start / end — the analogue of the prototype's psutil
//!   `cpu_percent()` readings; 0.0 when no sample was taken by then
//!   (`--sample-interval 0`, or a call in the first interval).
//! - `cpu_usage`: CPU seconds the calling thread used during the call (user
//!   + system, from the kernel at entry and return); 0.0 when unknown.
//! - `mem_usage`: resident memory at return in kB (bytes / 1000, as the
//!   prototype's psutil `rss / 1000`).
//! - `name` and `process_name`: the process's name (its comm), as psutil's
//!   `name()` gave both. `tid` is added: calls of several threads are told apart.
//! - Calls still open when tracing ended carry `"incomplete": true`.
//! - Results and metadata are keyed by function name; when one name was
//!   traced in several files, each is keyed `FILE:NAME` instead (the form
//!   `pftraced -t` takes). `functions` lists the keys in order of first call.
//! - Metadata has what the probes give: no `stacksize`, `args` or `locals`.
//!   `module` is the file's stem and `path` is `module.function` (CPython
//!   3.9's probes give the code object's name, not its qualname).

use std::{
    collections::{HashMap, HashSet},
    io::{self, Write},
};

use serde::{Serialize, Serializer, ser::SerializeMap as _};

use super::{TraceFormat, events::category};
use crate::{
    pairing::{Call, CallEnd},
    trace::{ProcessSample, Trace},
};

/// The prototype's records format.
pub struct Records;

#[derive(Serialize)]
struct Record<'a> {
    name: &'a str,
    cpu_start: f64,
    time_start: f64,
    time_end: f64,
    time_elapsed: f64,
    cpu_end: f64,
    cpu_usage: f64,
    mem_usage: f64,
    pid: u32,
    process_name: &'a str,
    tid: u32,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    incomplete: bool,
}

#[derive(Serialize)]
struct Metadata<'a> {
    function: &'a str,
    lineno: i32,
    filename: &'a str,
    module: &'a str,
    path: String,
}

/// A map serialized in insertion order.
struct Ordered<T>(Vec<(String, T)>);

impl<T: Serialize> Serialize for Ordered<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

#[derive(Serialize)]
struct Document<'a> {
    functions: Vec<String>,
    results: Ordered<Vec<Record<'a>>>,
    metadata: Ordered<Metadata<'a>>,
}

/// Each process's samples, oldest first, for "the reading at or before t".
struct Readings<'a>(HashMap<u32, Vec<&'a ProcessSample>>);

impl<'a> Readings<'a> {
    fn new(samples: &'a [ProcessSample]) -> Self {
        let mut by_pid: HashMap<u32, Vec<&ProcessSample>> = HashMap::new();
        for s in samples {
            by_pid.entry(s.pid).or_default().push(s);
        }
        for v in by_pid.values_mut() {
            v.sort_by_key(|s| s.ts_ns);
        }
        Self(by_pid)
    }

    /// CPU % of the last sample of `pid` taken at or before `ts_ns`; 0.0 if none.
    fn cpu_at(&self, pid: u32, ts_ns: u64) -> f64 {
        let Some(v) = self.0.get(&pid) else { return 0.0 };
        match v.partition_point(|s| s.ts_ns <= ts_ns) {
            0 => 0.0,
            n => v[n - 1].cpu_percent,
        }
    }
}

fn seconds(ns: i128) -> f64 {
    ns as f64 / 1e9
}

impl TraceFormat for Records {
    fn write(&self, trace: &Trace, out: &mut dyn Write) -> io::Result<()> {
        // Names seen in more than one file are keyed FILE:NAME.
        let mut files_of: HashMap<&str, HashSet<&str>> = HashMap::new();
        for c in &trace.calls {
            files_of.entry(&c.name).or_default().insert(&c.file);
        }
        let key = |c: &Call| {
            if files_of[&*c.name].len() > 1 { format!("{}:{}", c.file, c.name) } else { c.name.to_string() }
        };
        let mut calls: Vec<&Call> = trace.calls.iter().collect();
        calls.sort_by_key(|c| (c.start_ns, c.depth));
        let readings = Readings::new(&trace.samples);
        let mut results: Vec<(String, Vec<Record>)> = Vec::new();
        let mut metadata: Vec<(String, Metadata)> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for c in calls {
            let k = key(c);
            let at = *index.entry(k.clone()).or_insert_with(|| {
                let module = category(&c.file);
                metadata.push((
                    k.clone(),
                    Metadata {
                        function: &c.name,
                        lineno: c.line,
                        filename: &c.file,
                        module,
                        path: format!("{module}.{}", c.name),
                    },
                ));
                results.push((k.clone(), Vec::new()));
                results.len() - 1
            });
            let process_name = trace
                .process(c.pid)
                .map(|p| super::events::process_display_name(Some(p)))
                .unwrap_or("python");
            results[at].1.push(Record {
                name: process_name,
                cpu_start: readings.cpu_at(c.pid, c.start_ns),
                time_start: seconds(trace.clock.wall_ns(c.start_ns)),
                time_end: seconds(trace.clock.wall_ns(c.end_ns)),
                time_elapsed: c.duration_ns() as f64 / 1e9,
                cpu_end: readings.cpu_at(c.pid, c.end_ns),
                cpu_usage: c.cpu_ns.map_or(0.0, |ns| ns as f64 / 1e9),
                mem_usage: c.rss_return_bytes as f64 / 1000.0,
                pid: c.pid,
                process_name,
                tid: c.tid,
                incomplete: c.end == CallEnd::Incomplete,
            });
        }
        let doc = Document {
            functions: results.iter().map(|(k, _)| k.clone()).collect(),
            results: Ordered(results),
            metadata: Ordered(metadata),
        };
        let mut w = io::BufWriter::new(out);
        let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
        let mut ser = serde_json::Serializer::with_formatter(&mut w, fmt);
        doc.serialize(&mut ser).map_err(io::Error::other)?;
        w.write_all(b"\n")?;
        w.into_inner().map_err(|e| e.into_error())?.flush()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::output::testing::sample_trace;

    #[test]
    fn prototype_shape() {
        let trace = sample_trace();
        let mut out = Vec::new();
        Records.write(&trace, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("{\n    \"functions\": [\n        \""), "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        // `inner` is traced in one file, `outer` in two.
        let functions: Vec<&str> =
            v["functions"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
        assert_eq!(functions, ["/srv/app.py:outer", "inner", "/srv/other.py:outer"]);
        let inner = v["results"]["inner"].as_array().unwrap();
        assert_eq!(inner.len(), 2);
        let first = &inner[0];
        assert_eq!(first["name"], "worker");
        assert_eq!(first["process_name"], "worker");
        assert!((first["time_elapsed"].as_f64().unwrap() - 0.04).abs() < 1e-9);
        assert!((first["cpu_usage"].as_f64().unwrap() - 0.03).abs() < 1e-9);
        assert_eq!(first["mem_usage"].as_f64(), Some(300_000.0));
        // Samples at 1.0 s (50 %) and 1.2 s (90 %): inner runs 1.01-1.05 s.
        assert_eq!((first["cpu_start"].as_f64(), first["cpu_end"].as_f64()), (Some(50.0), Some(50.0)));
        assert_eq!(inner[1]["cpu_end"].as_f64(), Some(90.0));
        assert!(first.get("incomplete").is_none());
        assert_eq!(v["results"]["/srv/other.py:outer"][0]["incomplete"], true);
        let meta = &v["metadata"]["inner"];
        assert_eq!(
            (
                meta["function"].as_str(),
                meta["module"].as_str(),
                meta["path"].as_str(),
                meta["lineno"].as_i64()
            ),
            (Some("inner"), Some("app"), Some("app.inner"), Some(7))
        );
    }
}
