//! Single Chrome Trace Event records, shared by the whole-trace writer and
//! the rolling files: the "X" event of one call, the "M" events naming
//! processes and threads and labelling processes, and the "C" counter events
//! of one CPU/memory sample, built exactly as `chrome.rs` writes them.

use std::path::Path;

use pftrace_code::{CodeInfo, Field};
use serde::{Serialize, Serializer};

use crate::{
    clock::WallClock,
    codes::{category, display_name},
    pairing::{Call, CallEnd},
    trace::{JobId, ProcessSample, TracedProcess},
};

// The events are typed structs borrowing from the call and its code
// information, their fields in alphabetical order: the order the
// `serde_json::Value` (a BTreeMap per object) they replace wrote them in, so
// the bytes are the same (`tests::same_bytes_as_the_value_rendering`).
// Building that Value (two maps, fourteen owned keys, a String per path)
// was most of what a dense 1 M-call run's daemon spent (perf: malloc, free
// and BTreeMap inserts, 45% of its samples); without it the daemon's CPU
// time fell from 5.0-5.4 s to 1.7-2.4 s, and it exits 1.9-2.8 s after the
// workload instead of 6.9-7.0 s (load average 5, 2 cores).

/// One complete ("X") event (see [`call_event`]).
#[derive(Serialize)]
pub struct CallEvent<'a> {
    args: CallArgs<'a>,
    cat: &'a str,
    dur: f64,
    name: &'a str,
    ph: &'static str,
    pid: u32,
    tid: u32,
    ts: f64,
}

#[derive(Serialize)]
struct CallArgs<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu_ns: Option<u64>,
    depth: u32,
    file: &'a str,
    function: &'a str,
    id: u64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    incomplete: bool,
    line: i32,
    module: &'a Field<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    offcpu_ns: Option<u64>,
    parent: u64,
    path: DottedPath<'a>,
    qualname: &'a Field<String>,
    rss_entry_bytes: u64,
    rss_return_bytes: u64,
}

/// [`CodeInfo::path`] (`module.qualname`, null unless both are known),
/// written without building the string.
struct DottedPath<'a>(&'a CodeInfo);

impl Serialize for DottedPath<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match (&self.0.module, &self.0.qualname) {
            (Field::Known(m), Field::Known(q)) => s.collect_str(&format_args!("{m}.{q}")),
            _ => s.serialize_none(),
        }
    }
}

/// One complete ("X") event: named by the function's qualified name and
/// categorised by its dotted module where known (else `co_name` and the
/// file: see [`crate::codes`]); wall-clock µs start, µs duration; in args
/// the code object's name, module, qualified name and path (null when
/// unknown), file and line, the call's id, depth in its thread's traced
/// stack and parent call's id (0: none), `incomplete: true` when no return
/// was seen.
pub fn call_event<'a>(call: &'a Call, info: &'a CodeInfo, clock: &WallClock) -> CallEvent<'a> {
    let cpu = call.cpu_ns.zip(call.offcpu_ns());
    CallEvent {
        args: CallArgs {
            cpu_ns: cpu.map(|(cpu, _)| cpu),
            depth: call.depth,
            file: &call.file,
            function: &call.name,
            id: call.id,
            incomplete: call.end == CallEnd::Incomplete,
            line: call.line,
            module: &info.module,
            offcpu_ns: cpu.map(|(_, off)| off),
            parent: call.parent,
            path: DottedPath(info),
            qualname: &info.qualname,
            rss_entry_bytes: call.rss_entry_bytes,
            rss_return_bytes: call.rss_return_bytes,
        },
        cat: category(info),
        dur: call.duration_ns() as f64 / 1000.0,
        name: display_name(info),
        ph: "X",
        pid: call.pid,
        tid: call.tid,
        ts: clock.wall_us(call.start_ns),
    }
}

/// A metadata ("M") event; `args` holds its one value.
#[derive(Serialize)]
pub struct MetadataEvent<A> {
    args: A,
    name: &'static str,
    ph: &'static str,
    pid: u32,
    tid: u32,
}

impl<A> MetadataEvent<A> {
    fn new(name: &'static str, pid: u32, tid: u32, args: A) -> Self {
        Self { args, name, ph: "M", pid, tid }
    }
}

#[derive(Serialize)]
pub struct NameArg<'a> {
    name: std::borrow::Cow<'a, str>,
}

#[derive(Serialize)]
pub struct LabelsArg {
    labels: String,
}

/// A counter ("C") event of one sample.
#[derive(Serialize)]
pub struct CounterEvent<A> {
    args: A,
    name: &'static str,
    ph: &'static str,
    pid: u32,
    tid: u32,
    ts: f64,
}

#[derive(Serialize)]
pub struct CpuArgs {
    cpu_percent: f64,
}

#[derive(Serialize)]
pub struct MemoryArgs {
    peak_rss_mb: f64,
    rss_mb: f64,
}

/// The name a process is shown under: its `comm`, else the file name of its
/// interpreter binary, else `python`.
pub fn process_display_name(process: Option<&TracedProcess>) -> &str {
    process
        .and_then(|p| {
            if p.comm.is_empty() {
                Path::new(&p.binary).file_name().and_then(|s| s.to_str())
            } else {
                Some(p.comm.as_str())
            }
        })
        .unwrap_or("python")
}

/// The metadata event naming process `pid` (`python3.9 1234`: its comm and
/// pid), with a generic name when the process is not known.
pub fn process_name_event(pid: u32, process: Option<&TracedProcess>) -> MetadataEvent<NameArg<'static>> {
    let name = process_display_name(process);
    MetadataEvent::new("process_name", pid, pid, NameArg { name: format!("{name} {pid}").into() })
}

/// How a batch job reads in a label: `slurm job 42`, `flux job f3x`, `lsf job 7`.
pub fn job_label(job: &JobId) -> String {
    let system = match job.variable.as_str() {
        "SLURM_JOB_ID" => "slurm",
        "FLUX_JOB_ID" => "flux",
        "LSB_JOBID" => "lsf",
        other => other,
    };
    format!("{system} job {}", job.id)
}

/// The "process_labels" metadata event: the batch job (if any) and the
/// command line, comma-separated as the format wants; None when there is
/// neither.
pub fn process_labels_event(process: &TracedProcess) -> Option<MetadataEvent<LabelsArg>> {
    let mut labels: Vec<String> = process.job.iter().map(job_label).collect();
    if !process.command.is_empty() {
        labels.push(process.command.clone());
    }
    if labels.is_empty() {
        return None;
    }
    Some(MetadataEvent::new(
        "process_labels",
        process.pid,
        process.pid,
        LabelsArg { labels: labels.join(",") },
    ))
}

/// The metadata event naming thread `tid` of process `pid`.
pub fn thread_name_event(pid: u32, tid: u32, name: &str) -> MetadataEvent<NameArg<'_>> {
    MetadataEvent::new("thread_name", pid, tid, NameArg { name: name.into() })
}

/// The two counter ("C") events of one sample: `cpu` with `cpu_percent`
/// (% of one core, user + system, since the previous sample) and `memory`
/// with `rss_mb` and `peak_rss_mb` (decimal megabytes, 10^6 bytes).
pub fn counter_events(
    sample: &ProcessSample,
    clock: &WallClock,
) -> (CounterEvent<CpuArgs>, CounterEvent<MemoryArgs>) {
    fn event<A>(name: &'static str, sample: &ProcessSample, ts: f64, args: A) -> CounterEvent<A> {
        CounterEvent { args, name, ph: "C", pid: sample.pid, tid: sample.pid, ts }
    }
    let ts = clock.wall_us(sample.ts_ns);
    let mb = |bytes: u64| bytes as f64 / 1e6;
    (
        event("cpu", sample, ts, CpuArgs { cpu_percent: sample.cpu_percent }),
        event(
            "memory",
            sample,
            ts,
            MemoryArgs { peak_rss_mb: mb(sample.peak_rss_bytes), rss_mb: mb(sample.rss_bytes) },
        ),
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::Value;

    use super::*;

    fn value(v: impl Serialize) -> Value {
        serde_json::to_value(v).unwrap()
    }

    fn bytes(v: impl Serialize) -> Vec<u8> {
        serde_json::to_vec(&v).unwrap()
    }

    /// The events as they were built before the typed structs, verbatim:
    /// a `serde_json::Value` per event.
    mod before {
        use serde_json::{Value, json};

        use super::super::{job_label, process_display_name};
        use crate::{
            clock::WallClock,
            codes::{category, display_name},
            pairing::{Call, CallEnd},
            trace::{ProcessSample, TracedProcess},
        };
        use pftrace_code::CodeInfo;

        pub fn call_event(call: &Call, info: &CodeInfo, clock: &WallClock) -> Value {
            let mut args = json!({"function": &*call.name, "module": &info.module, "qualname": &info.qualname,
                                  "path": info.path(), "file": &*call.file, "line": call.line,
                                  "id": call.id, "depth": call.depth, "parent": call.parent,
                                  "rss_entry_bytes": call.rss_entry_bytes, "rss_return_bytes": call.rss_return_bytes});
            if let (Some(cpu), Some(off)) = (call.cpu_ns, call.offcpu_ns()) {
                args["cpu_ns"] = json!(cpu);
                args["offcpu_ns"] = json!(off);
            }
            if call.end == CallEnd::Incomplete {
                args["incomplete"] = json!(true);
            }
            json!({
                "name": display_name(info),
                "cat": category(info),
                "ph": "X",
                "pid": call.pid,
                "tid": call.tid,
                "ts": clock.wall_us(call.start_ns),
                "dur": call.duration_ns() as f64 / 1000.0,
                "args": args,
            })
        }

        pub fn process_name_event(pid: u32, process: Option<&TracedProcess>) -> Value {
            let name = process_display_name(process);
            json!({"name": "process_name", "ph": "M", "pid": pid, "tid": pid,
                   "args": {"name": format!("{name} {pid}")}})
        }

        pub fn process_labels_event(process: &TracedProcess) -> Option<Value> {
            let mut labels: Vec<String> = process.job.iter().map(job_label).collect();
            if !process.command.is_empty() {
                labels.push(process.command.clone());
            }
            if labels.is_empty() {
                return None;
            }
            Some(json!({"name": "process_labels", "ph": "M", "pid": process.pid, "tid": process.pid,
                        "args": {"labels": labels.join(",")}}))
        }

        pub fn thread_name_event(pid: u32, tid: u32, name: &str) -> Value {
            json!({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": name}})
        }

        pub fn counter_events(sample: &ProcessSample, clock: &WallClock) -> [Value; 2] {
            let ts = clock.wall_us(sample.ts_ns);
            let mb = |bytes: u64| bytes as f64 / 1e6;
            [
                json!({"name": "cpu", "ph": "C", "pid": sample.pid, "tid": sample.pid, "ts": ts,
                       "args": {"cpu_percent": sample.cpu_percent}}),
                json!({"name": "memory", "ph": "C", "pid": sample.pid, "tid": sample.pid, "ts": ts,
                       "args": {"rss_mb": mb(sample.rss_bytes), "peak_rss_mb": mb(sample.peak_rss_bytes)}}),
            ]
        }
    }

    /// Names and files that need escaping, or none, or are not ASCII.
    const STRINGS: [&str; 6] = [
        "raw_decode",
        "/usr/lib/python3.9/json/decoder.py",
        "quote\" back\\slash\nnew\tline\u{1}\u{1f}",
        "",
        "größe_λ_函数",
        "<lambda>\u{2028}/\u{7f}",
    ];

    /// What the resolver says of a call: nothing (gone, or not yet), a
    /// module without a qualified name and the reverse, both (USDT path),
    /// or the agent's answer from the code object.
    fn infos(call: &Call) -> Vec<CodeInfo> {
        let gone = crate::codes::unresolved(call, "gone");
        let mut out = vec![gone.clone()];
        for (module, qualname) in
            [(Some("json.decoder"), None), (None, Some("A.<locals>.f")), (Some("m\"od"), Some("Q\\.r\n"))]
        {
            let mut i = gone.clone();
            if let Some(m) = module {
                i.module = Field::Known(m.into());
            }
            if let Some(q) = qualname {
                i.qualname = Field::Known(q.into());
            }
            out.push(i.clone());
            i.origin = pftrace_code::Origin::CodeObject;
            i.stacksize = Field::Known(4);
            out.push(i);
        }
        out
    }

    /// Today's rendering is byte for byte the Value rendering it replaced,
    /// for calls returned and incomplete, with CPU time or none (and more
    /// CPU than wall time), strings that need escaping, unknown fields,
    /// USDT and agent answers, extreme numbers.
    #[test]
    fn same_bytes_as_the_value_rendering() {
        let clock = WallClock::measure();
        let mut compared = 0;
        for (n, (name, file)) in STRINGS.iter().flat_map(|n| STRINGS.iter().map(move |f| (n, f))).enumerate()
        {
            for variant in 0..6u64 {
                let call = Call {
                    pid: [7, u32::MAX][variant as usize % 2],
                    tid: 8 + n as u32,
                    name: Arc::from(*name),
                    file: Arc::from(*file),
                    line: [332, -1, 0, i32::MAX, i32::MIN, 1][variant as usize],
                    start_ns: [1_000, 0, 123_456_789_012, u64::MAX / 2, 5, 1_700_000_000_123_456_789]
                        [variant as usize],
                    end_ns: [3_500, 0, 123_456_790_013, u64::MAX / 2 + 7, 4, 1_700_000_001_000_000_001]
                        [variant as usize],
                    depth: variant as u32 * 3,
                    id: [0, 1, u64::MAX, 42, 7, 1 << 53][variant as usize],
                    parent: [0, 9, u64::MAX - 1, 41, 0, 3][variant as usize],
                    end: if variant % 3 == 1 { CallEnd::Incomplete } else { CallEnd::Returned },
                    cpu_ns: [None, Some(0), Some(1_000), Some(u64::MAX), Some(2_000), None][variant as usize],
                    rss_entry_bytes: variant * 4096,
                    rss_return_bytes: [0, u64::MAX, 8192, 1, 0, 300_000_000][variant as usize],
                };
                for info in infos(&call) {
                    let new = bytes(call_event(&call, &info, &clock));
                    let old = serde_json::to_vec(&before::call_event(&call, &info, &clock)).unwrap();
                    assert!(
                        new == old,
                        "{}\n{}",
                        String::from_utf8_lossy(&new),
                        String::from_utf8_lossy(&old)
                    );
                    compared += 1;
                }
            }
        }
        assert_eq!(compared, 36 * 6 * 7);

        let mut p = TracedProcess { pid: 42, binary: "/opt/py/bin/python3.9".into(), ..Default::default() };
        for (comm, command, job) in [
            ("", "", None),
            ("wörker\"", "python3.9 app.py --n \"3\"\n", Some(("SLURM_JOB_ID", "42"))),
            ("w", "", Some(("OTHER_ID", "x\\y"))),
        ] {
            p.comm = comm.into();
            p.command = command.into();
            p.job = job.map(|(v, id)| JobId { variable: v.into(), id: id.into() });
            assert_eq!(
                bytes(process_name_event(42, Some(&p))),
                bytes(before::process_name_event(42, Some(&p)))
            );
            assert_eq!(process_labels_event(&p).map(bytes), before::process_labels_event(&p).map(bytes));
        }
        assert_eq!(bytes(process_name_event(1, None)), bytes(before::process_name_event(1, None)));
        for name in STRINGS {
            assert_eq!(bytes(thread_name_event(4, 5, name)), bytes(before::thread_name_event(4, 5, name)));
        }
        for (cpu, rss, peak) in
            [(87.5, 250_000_000, 300_000_000), (0.0, 0, 0), (f64::NAN, 1, u64::MAX), (1e-9, 3, 7)]
        {
            let s = ProcessSample {
                pid: 9,
                ts_ns: 5_000,
                cpu_percent: cpu,
                user_cpu_s: 0.8,
                rss_bytes: rss,
                peak_rss_bytes: peak,
            };
            let (c, m) = counter_events(&s, &clock);
            let [old_c, old_m] = before::counter_events(&s, &clock);
            assert_eq!((bytes(c), bytes(m)), (bytes(old_c), bytes(old_m)));
        }
    }

    #[test]
    fn call_event_shape() {
        let clock = WallClock::measure();
        let call = Call {
            pid: 7,
            tid: 8,
            name: Arc::from("raw_decode"),
            file: Arc::from("/usr/lib/python3.9/json/decoder.py"),
            line: 332,
            start_ns: 1_000,
            end_ns: 3_500,
            depth: 0,
            id: 0,
            parent: 0,
            end: CallEnd::Incomplete,
            cpu_ns: None,
            rss_entry_bytes: 0,
            rss_return_bytes: 0,
        };
        let info = crate::codes::unresolved(&call, "gone");
        let ev = value(call_event(&call, &info, &clock));
        assert_eq!((ev["name"].as_str(), ev["cat"].as_str()), (Some("raw_decode"), Some(&*call.file)));
        assert!(ev["args"]["module"].is_null() && ev["args"]["path"].is_null());
        let mut info = info;
        info.module = pftrace_code::Field::Known("json.decoder".into());
        info.qualname = pftrace_code::Field::Known("JSONDecoder.raw_decode".into());
        let ev = value(call_event(&call, &info, &clock));
        assert_eq!(
            (ev["name"].as_str(), ev["cat"].as_str()),
            (Some("JSONDecoder.raw_decode"), Some("json.decoder"))
        );
        assert_eq!(ev["args"]["path"], "json.decoder.JSONDecoder.raw_decode");
        assert_eq!(ev["args"]["function"], "raw_decode");
        assert_eq!(ev["dur"], 2.5);
        assert_eq!(ev["args"]["incomplete"], true);
        assert_eq!(ev["args"]["line"], 332);
        assert_eq!(value(process_name_event(7, None))["args"]["name"], "python 7");
    }

    #[test]
    fn process_and_thread_metadata() {
        let mut p = TracedProcess { pid: 42, binary: "/opt/py/bin/python3.9".into(), ..Default::default() };
        assert_eq!(value(process_name_event(42, Some(&p)))["args"]["name"], "python3.9 42");
        assert!(process_labels_event(&p).is_none());
        p.comm = "worker".into();
        p.command = "python3.9 app.py --n 3".into();
        p.job = Some(JobId { variable: "SLURM_JOB_ID".into(), id: "42".into() });
        assert_eq!(value(process_name_event(42, Some(&p)))["args"]["name"], "worker 42");
        let labels = value(process_labels_event(&p).unwrap());
        assert_eq!(labels["args"]["labels"], "slurm job 42,python3.9 app.py --n 3");
        assert_eq!(labels["ph"], "M");
        let t = value(thread_name_event(42, 43, "MainThread"));
        assert_eq!((t["tid"].as_u64(), t["args"]["name"].as_str()), (Some(43), Some("MainThread")));
    }

    #[test]
    fn counters_of_a_sample() {
        let clock = WallClock::measure();
        let s = ProcessSample {
            pid: 9,
            ts_ns: 5_000,
            cpu_percent: 87.5,
            user_cpu_s: 0.8,
            rss_bytes: 250_000_000,
            peak_rss_bytes: 300_000_000,
        };
        let (cpu, mem) = counter_events(&s, &clock);
        let (cpu, mem) = (value(cpu), value(mem));
        assert_eq!((cpu["ph"].as_str(), cpu["name"].as_str()), (Some("C"), Some("cpu")));
        assert_eq!(cpu["args"]["cpu_percent"], 87.5);
        assert_eq!(mem["args"]["rss_mb"], 250.0);
        assert_eq!(mem["args"]["peak_rss_mb"], 300.0);
        assert_eq!(cpu["ts"], mem["ts"]);
    }
}
