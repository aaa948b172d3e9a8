//! Single Chrome Trace Event records, shared by the whole-trace writer and
//! the rolling files: the "X" event of one call, the "M" events naming
//! processes and threads and labelling processes, and the "C" counter events
//! of one CPU/memory sample, built exactly as `chrome.rs` writes them.

use std::path::Path;

use pftrace_code::CodeInfo;
use serde_json::{Value, json};

use crate::{
    clock::WallClock,
    codes::{category, display_name},
    pairing::{Call, CallEnd},
    trace::{JobId, ProcessSample, TracedProcess},
};

/// One complete ("X") event: named by the function's qualified name and
/// categorised by its dotted module where known (else `co_name` and the
/// file: see [`crate::codes`]); wall-clock µs start, µs duration; in args
/// the code object's name, module, qualified name and path (null when
/// unknown), file and line, the call's id, depth in its thread's traced
/// stack and parent call's id (0: none), `incomplete: true` when no return
/// was seen.
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
pub fn process_name_event(pid: u32, process: Option<&TracedProcess>) -> Value {
    let name = process_display_name(process);
    json!({"name": "process_name", "ph": "M", "pid": pid, "tid": pid,
           "args": {"name": format!("{name} {pid}")}})
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

/// The metadata event naming thread `tid` of process `pid`.
pub fn thread_name_event(pid: u32, tid: u32, name: &str) -> Value {
    json!({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": name}})
}

/// The two counter ("C") events of one sample: `cpu` with `cpu_percent`
/// (% of one core, user + system, since the previous sample) and `memory`
/// with `rss_mb` and `peak_rss_mb` (decimal megabytes, 10^6 bytes).
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

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
        let ev = call_event(&call, &info, &clock);
        assert_eq!((ev["name"].as_str(), ev["cat"].as_str()), (Some("raw_decode"), Some(&*call.file)));
        assert!(ev["args"]["module"].is_null() && ev["args"]["path"].is_null());
        let mut info = info;
        info.module = pftrace_code::Field::Known("json.decoder".into());
        info.qualname = pftrace_code::Field::Known("JSONDecoder.raw_decode".into());
        let ev = call_event(&call, &info, &clock);
        assert_eq!(
            (ev["name"].as_str(), ev["cat"].as_str()),
            (Some("JSONDecoder.raw_decode"), Some("json.decoder"))
        );
        assert_eq!(ev["args"]["path"], "json.decoder.JSONDecoder.raw_decode");
        assert_eq!(ev["args"]["function"], "raw_decode");
        assert_eq!(ev["dur"], 2.5);
        assert_eq!(ev["args"]["incomplete"], true);
        assert_eq!(ev["args"]["line"], 332);
        assert_eq!(process_name_event(7, None)["args"]["name"], "python 7");
    }

    #[test]
    fn process_and_thread_metadata() {
        let mut p = TracedProcess { pid: 42, binary: "/opt/py/bin/python3.9".into(), ..Default::default() };
        assert_eq!(process_name_event(42, Some(&p))["args"]["name"], "python3.9 42");
        assert!(process_labels_event(&p).is_none());
        p.comm = "worker".into();
        p.command = "python3.9 app.py --n 3".into();
        p.job = Some(JobId { variable: "SLURM_JOB_ID".into(), id: "42".into() });
        assert_eq!(process_name_event(42, Some(&p))["args"]["name"], "worker 42");
        let labels = process_labels_event(&p).unwrap();
        assert_eq!(labels["args"]["labels"], "slurm job 42,python3.9 app.py --n 3");
        assert_eq!(labels["ph"], "M");
        let t = thread_name_event(42, 43, "MainThread");
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
        let [cpu, mem] = counter_events(&s, &clock);
        assert_eq!((cpu["ph"].as_str(), cpu["name"].as_str()), (Some("C"), Some("cpu")));
        assert_eq!(cpu["args"]["cpu_percent"], 87.5);
        assert_eq!(mem["args"]["rss_mb"], 250.0);
        assert_eq!(mem["args"]["peak_rss_mb"], 300.0);
        assert_eq!(cpu["ts"], mem["ts"]);
    }
}
