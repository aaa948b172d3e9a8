//! The JSON shape of the settrace prototype ("Tracing without Decorators"),
//! for users of that prototype: traced functions, their calls, and
//! per-function metadata, indented by four spaces as it printed it.
//!
//! ```text
//! {"functions": ["step", ...],
//!  "results":  {"step": [{"name", "cpu_start", "time_start", "time_end", "time_elapsed",
//!                         "cpu_end", "cpu_usage", "mem_usage", "pid", "process_name", "tid",
//!                         "id", "depth", "parent"}, ...]},
//!  "metadata": {"step": {"function", "lineno", "stacksize", "filename", "args", "locals",
//!                         "module", "path", "qualname", "params", "origin", "unresolved"?}}}
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
//!   `name()` gave both. `tid` is added: calls of several threads are told apart;
//!   so are `id` (unique in the trace), `depth` (traced calls open below it on
//!   its thread) and `parent` (the id of the call it was made in, 0: none).
//! - Calls still open when tracing ended carry `"incomplete": true`.
//! - Results and metadata are keyed per function (code object): by its
//!   name where no other traced function has that name, else by its
//!   qualified path (`mod.A.run`, `mod.B.run`) where known and unique, else
//!   `FILE:NAME` (the form `pftraced -t` takes; `FILE:LINE:NAME` if that
//!   repeats). `functions` lists the keys in order of first call.
//! - Metadata is the prototype's record (`function`, `lineno`, `stacksize`,
//!   `filename`, `args`, `locals`, `module` dotted as the process imports
//!   it, `path` = module + qualified name), then `qualname`, `params`
//!   (parameter kinds), `origin` and `unresolved` (why each null field is
//!   null). Resolved once per code object off the event loop (`codes.rs`,
//!   `pftrace-code`); `stacksize` is null on the USDT path (the source does
//!   not give it); every field is null with its reason when the process
//!   exited before its function was resolved.

use std::{
    cell::RefCell,
    collections::HashMap,
    io::{self, Write},
    iter::Peekable,
    sync::Arc,
};

use serde::{Serialize, Serializer, ser::Error as _, ser::SerializeMap as _, ser::SerializeSeq as _};

use pftrace_code::CodeInfo;

use super::{TraceFormat, sort::CallIter};
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
    /// The call's id (unique in the trace), its depth in its thread's
    /// traced stack, and the id of the call it was made in (0: none).
    id: u64,
    depth: u32,
    parent: u64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    incomplete: bool,
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

/// A code object as the probes name it: (name, file, entry line).
type Site = (Arc<str>, Arc<str>, i32);

fn site(c: &Call) -> Site {
    (Arc::clone(&c.name), Arc::clone(&c.file), c.line)
}

/// One function as the document keys it: its first call (by start, outer
/// first), its place among the functions, and what it is.
struct Function {
    /// The first site seen (its entry line is `co_firstlineno` when resolved).
    site: Site,
    /// Every site of this function: on 3.6-3.10 a generator resumed at a
    /// `yield` reports that line, which resolves to the same code object.
    sites: Vec<Site>,
    key: String,
    first: (u64, u32, u64),
    info: Arc<CodeInfo>,
}

/// The functions of all calls (one per code object), in order of their
/// first call, from one pass. Each is keyed by its name where no other
/// function has that name, else by its qualified path (`mod.A.run`) where
/// that is known and unique, else FILE:NAME (FILE:LINE:NAME if that repeats).
fn functions(calls: CallIter, trace: &Trace) -> io::Result<Vec<Function>> {
    let mut by_site: HashMap<Site, Function> = HashMap::new();
    for (seq, c) in calls.enumerate() {
        let c = c?;
        let first = (c.start_ns, c.depth, seq as u64);
        let f = by_site.entry(site(&c)).or_insert_with(|| Function {
            site: site(&c),
            sites: vec![site(&c)],
            key: String::new(),
            first,
            info: trace.codes.info(&c),
        });
        if first < f.first {
            f.first = first;
            f.info = trace.codes.info(&c);
        }
    }
    // One function per code object: sites resolved to the same first line join.
    let mut sites: Vec<Function> = by_site.into_values().collect();
    sites.sort_by_key(|f| f.first);
    let mut out: Vec<Function> = Vec::new();
    let mut by_code: HashMap<(Arc<str>, Arc<str>, i64), usize> = HashMap::new();
    for f in sites {
        let line = f.info.lineno.known().map_or(i64::from(f.site.2), |&l| i64::from(l));
        let code = (f.site.0.clone(), f.site.1.clone(), line);
        match by_code.get(&code) {
            Some(&i) => out[i].sites.push(f.site),
            None => {
                by_code.insert(code, out.len());
                out.push(f);
            }
        }
    }
    let count = |keys: &mut dyn Iterator<Item = String>| {
        let mut n: HashMap<String, usize> = HashMap::new();
        keys.for_each(|k| *n.entry(k).or_default() += 1);
        n
    };
    let names = count(&mut out.iter().map(|f| f.site.0.to_string()));
    let paths = count(&mut out.iter().filter_map(|f| f.info.path().known().cloned()));
    let file_names = count(&mut out.iter().map(|f| format!("{}:{}", f.site.1, f.site.0)));
    for f in &mut out {
        let (name, file, line) = &f.site;
        let file_name = format!("{file}:{name}");
        f.key = match f.info.path().known() {
            _ if names[&name.to_string()] == 1 => name.to_string(),
            Some(path) if paths[path] == 1 => path.clone(),
            _ if file_names[&file_name] == 1 => file_name,
            _ => format!("{file}:{line}:{name}"),
        };
    }
    Ok(out)
}

/// The prototype's metadata record of one function: its fields in its
/// order, then `qualname`, the parameter kinds, where the answer came from
/// and why any field is null (see [`CodeInfo`]).
struct Metadata(Arc<CodeInfo>);

impl Serialize for Metadata {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

/// The calls of each function, pulled from one stream sorted by (function,
/// start) while the document is serialized: memory holds one record at a time.
struct Results<'t, 'c> {
    trace: &'t Trace,
    keys: Vec<String>,
    rank: HashMap<Site, usize>,
    readings: Readings<'t>,
    calls: RefCell<Peekable<CallIter<'c>>>,
}

/// The calls of function number `.1`.
struct Group<'r, 't, 'c>(&'r Results<'t, 'c>, usize);

impl Results<'_, '_> {
    fn rank_of(&self, c: &Call) -> usize {
        self.rank[&site(c)]
    }

    fn record<'s>(&'s self, c: &Call) -> Record<'s> {
        let trace = self.trace;
        let process_name =
            trace.process(c.pid).map(|p| super::events::process_display_name(Some(p))).unwrap_or("python");
        Record {
            name: process_name,
            cpu_start: self.readings.cpu_at(c.pid, c.start_ns),
            time_start: seconds(trace.clock.wall_ns(c.start_ns)),
            time_end: seconds(trace.clock.wall_ns(c.end_ns)),
            time_elapsed: c.duration_ns() as f64 / 1e9,
            cpu_end: self.readings.cpu_at(c.pid, c.end_ns),
            cpu_usage: c.cpu_ns.map_or(0.0, |ns| ns as f64 / 1e9),
            mem_usage: c.rss_return_bytes as f64 / 1000.0,
            pid: c.pid,
            process_name,
            tid: c.tid,
            id: c.id,
            depth: c.depth,
            parent: c.parent,
            incomplete: c.end == CallEnd::Incomplete,
        }
    }
}

impl Serialize for Results<'_, '_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.keys.len()))?;
        for (rank, key) in self.keys.iter().enumerate() {
            map.serialize_entry(key, &Group(self, rank))?;
        }
        map.end()
    }
}

impl Serialize for Group<'_, '_, '_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let Group(results, rank) = *self;
        let mut seq = s.serialize_seq(None)?;
        loop {
            let mut calls = results.calls.borrow_mut();
            let next = match calls.peek() {
                None => break,
                Some(Err(_)) => {
                    return Err(S::Error::custom(calls.next().and_then(Result::err).expect("peeked")));
                }
                Some(Ok(c)) if results.rank_of(c) != rank => break,
                Some(Ok(_)) => calls.next().and_then(Result::ok).expect("peeked"),
            };
            drop(calls);
            seq.serialize_element(&results.record(&next))?;
        }
        seq.end()
    }
}

#[derive(Serialize)]
struct Document<'t, 'c> {
    functions: Vec<String>,
    results: Results<'t, 'c>,
    metadata: Ordered<Metadata>,
}

impl TraceFormat for Records {
    fn write(&self, trace: &Trace, out: &mut dyn Write) -> io::Result<()> {
        let source = trace.call_source();
        let functions = functions(source.iter(), trace)?;
        let rank: HashMap<Site, usize> = functions
            .iter()
            .enumerate()
            .flat_map(|(i, f)| f.sites.iter().map(move |s| (s.clone(), i)))
            .collect();
        let order = Arc::new(rank.clone());
        let calls = source.sorted(move |c: &Call| (order[&site(c)], c.start_ns, c.depth))?;
        let keys: Vec<String> = functions.iter().map(|f| f.key.clone()).collect();
        let metadata = Ordered(functions.into_iter().map(|f| (f.key, Metadata(f.info))).collect());
        let doc = Document {
            functions: keys.clone(),
            results: Results {
                trace,
                keys,
                rank,
                readings: Readings::new(&trace.samples),
                calls: RefCell::new(calls.peekable()),
            },
            metadata,
        };
        let mut w = io::BufWriter::new(out);
        let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
        let mut ser = serde_json::Serializer::with_formatter(&mut w, fmt);
        doc.serialize(&mut ser).map_err(io::Error::from)?;
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
        // `outer` of app.py is resolved: keyed by its path.
        assert_eq!(functions, ["app.outer", "inner", "/srv/other.py:outer"]);
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
        // The prototype's metadata, from the resolver's answer.
        let meta = &v["metadata"]["inner"];
        // Keys in the prototype's order (serde_json's Value sorts them: read the text).
        let at = text.find("\"function\": \"inner\"").unwrap();
        let order: Vec<usize> =
            ["function", "lineno", "stacksize", "filename", "args", "locals", "module", "path"]
                .iter()
                .map(|k| at + text[at..].find(&format!("\"{k}\": ")).unwrap())
                .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
        assert_eq!(
            (
                meta["function"].as_str(),
                meta["module"].as_str(),
                meta["path"].as_str(),
                meta["lineno"].as_i64()
            ),
            (Some("inner"), Some("app"), Some("app.Job.inner"), Some(7))
        );
        assert_eq!(
            (meta["args"].clone(), meta["locals"].clone()),
            (serde_json::json!(["self"]), serde_json::json!(["i"]))
        );
        assert!(meta["stacksize"].is_null() && meta["unresolved"]["stacksize"].is_string());
        // Never resolved: every derived field null, with the reason.
        let other = &v["metadata"]["/srv/other.py:outer"];
        assert!(other["module"].is_null() && other["path"].is_null() && other["args"].is_null());
        assert_eq!(other["unresolved"]["module"], crate::codes::NOT_RESOLVED);
    }
}
