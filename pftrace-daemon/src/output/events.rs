//! Single Chrome Trace Event records, shared by the whole-trace writer and
//! the rolling files: the "X" event of one call and the "M" event naming a
//! process, built exactly as `chrome.rs` writes them.

use std::path::Path;

use serde_json::{Value, json};

use crate::{
    clock::WallClock,
    pairing::{Call, CallEnd},
    trace::TracedProcess,
};

/// The module-like category of a call: the file's stem (`decoder` for `json/decoder.py`).
pub fn category(file: &str) -> &str {
    Path::new(file)
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or(file)
}

/// One complete ("X") event: wall-clock µs start, µs duration, file and line
/// in args, `incomplete: true` when no return was seen.
pub fn call_event(call: &Call, clock: &WallClock) -> Value {
    let mut args = json!({"file": &*call.file, "line": call.line,
                          "rss_entry_bytes": call.rss_entry_bytes, "rss_return_bytes": call.rss_return_bytes});
    if let (Some(cpu), Some(off)) = (call.cpu_ns, call.offcpu_ns()) {
        args["cpu_ns"] = json!(cpu);
        args["offcpu_ns"] = json!(off);
    }
    if call.end == CallEnd::Incomplete {
        args["incomplete"] = json!(true);
    }
    json!({
        "name": &*call.name,
        "cat": category(&call.file),
        "ph": "X",
        "pid": call.pid,
        "tid": call.tid,
        "ts": clock.wall_us(call.start_ns),
        "dur": call.duration_ns() as f64 / 1000.0,
        "args": args,
    })
}

/// The metadata event naming process `pid` (`python3.9 1234`), with a
/// generic name when the process is not known.
pub fn process_name_event(pid: u32, process: Option<&TracedProcess>) -> Value {
    let name = process
        .and_then(|p| Path::new(&p.binary).file_name())
        .and_then(|s| s.to_str())
        .unwrap_or("python");
    json!({"name": "process_name", "ph": "M", "pid": pid, "tid": pid,
           "args": {"name": format!("{name} {pid}")}})
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
            end: CallEnd::Incomplete,
            cpu_ns: None,
            rss_entry_bytes: 0,
            rss_return_bytes: 0,
        };
        let ev = call_event(&call, &clock);
        assert_eq!(ev["cat"], "decoder");
        assert_eq!(ev["dur"], 2.5);
        assert_eq!(ev["args"]["incomplete"], true);
        assert_eq!(ev["args"]["line"], 332);
        assert_eq!(process_name_event(7, None)["args"]["name"], "python 7");
    }
}
