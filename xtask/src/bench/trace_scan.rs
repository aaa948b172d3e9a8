//! Reads a pftraced Chrome trace in one pass over its bytes: each call event
//! is handed to a closure and dropped, and only `otherData` is kept whole.
//!
//! Why not `serde_json::Value`: the 4-process dense row's trace holds 4 M
//! calls (1.4 GB), and building it as a `Value` in the (unoptimised) xtask
//! held 15.5 GB of RSS and most of a core between runs (2026-11-28: the
//! full bench's `xtask` at 62.9% of memory and 16 CPU-minutes by its 23rd
//! minute), which stretched the bench to 33 minutes and left builds beside
//! it close to the OOM killer. On a 1 M-call dense trace (342 MB): 12.1 s
//! and the file's size in memory, against 41.3 s for the `Value`; reading
//! through a `BufReader` instead of the whole file took 28.4 s.

use std::borrow::Cow;
use std::fmt;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Deserialize;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// What the bench reads of one complete-call ("X") event.
pub struct CallEvent<'a> {
    pub name: &'a str,
    pub pid: u64,
    pub ts_us: Option<f64>,
}

#[derive(Deserialize)]
struct EventHead<'a> {
    #[serde(borrow, default)]
    ph: Cow<'a, str>,
    #[serde(borrow, default)]
    name: Cow<'a, str>,
    #[serde(default)]
    pid: u64,
    #[serde(default)]
    ts: Option<f64>,
}

/// Streams the trace at `path`, calling `on_call` for each "X" event, and
/// returns its `otherData` (`Value::Null` when it has none).
pub fn scan(path: &Path, mut on_call: impl FnMut(CallEvent<'_>)) -> Result<Value> {
    let bytes = std::fs::read(path).with_context(|| format!("reading the trace {}", path.display()))?;
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    let other = de
        .deserialize_map(Doc { on_call: &mut on_call })
        .with_context(|| format!("the trace {} is not a JSON trace", path.display()))?;
    de.end().with_context(|| format!("the trace {} has bytes after its JSON", path.display()))?;
    Ok(other)
}

struct Doc<'f, F> {
    on_call: &'f mut F,
}

impl<'de, F: FnMut(CallEvent<'_>)> Visitor<'de> for Doc<'_, F> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object with traceEvents and otherData")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut other = Value::Null;
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match key.as_ref() {
                "traceEvents" => map.next_value_seed(Events { on_call: &mut *self.on_call })?,
                "otherData" => other = map.next_value()?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(other)
    }
}

struct Events<'f, F> {
    on_call: &'f mut F,
}

impl<'de, F: FnMut(CallEvent<'_>)> DeserializeSeed<'de> for Events<'_, F> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, F: FnMut(CallEvent<'_>)> Visitor<'de> for Events<'_, F> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of trace events")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(e) = seq.next_element::<EventHead>()? {
            if e.ph == "X" {
                (self.on_call)(CallEvent { name: &e.name, pid: e.pid, ts_us: e.ts });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_streamed_and_other_data_kept() {
        let dir = std::env::temp_dir().join(format!("pftrace-trace-scan-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.json");
        std::fs::write(
            &path,
            r#"{"traceEvents": [
                {"name": "process_name", "ph": "M", "pid": 7, "tid": 7, "args": {"name": "p"}},
                {"name": "f\u00e9", "ph": "X", "pid": 7, "tid": 8, "ts": 2.5, "dur": 1, "args": {"file": "a.py"}},
                {"name": "g", "ph": "X", "pid": 9, "tid": 9, "ts": 1.0, "dur": 1},
                {"name": "cpu", "ph": "C", "pid": 7, "tid": 7, "ts": 0.5, "args": {"v": 1}}
            ], "displayTimeUnit": "ns", "otherData": {"pftrace": {"calls": 2, "counters": {"lost": 0}}}}"#,
        )
        .unwrap();
        let mut seen = Vec::new();
        let other = scan(&path, |e| seen.push((e.name.to_string(), e.pid, e.ts_us))).unwrap();
        assert_eq!(seen, vec![("fé".to_string(), 7, Some(2.5)), ("g".to_string(), 9, Some(1.0))]);
        assert_eq!(other["pftrace"]["calls"], 2);

        std::fs::write(&path, r#"{"traceEvents": [{"ph": "X"}"#).unwrap();
        let err = scan(&path, |_| {}).unwrap_err();
        assert!(format!("{err:#}").contains("is not a JSON trace"), "{err:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
