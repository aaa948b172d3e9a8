//! The typed reading of a Chrome trace file behind [`Trace::parse`](super::Trace::parse):
//! only the fields the harness checks, strings borrowed from the text where
//! they have no escapes. A `serde_json::Value` of every event allocated a
//! map per event and per `args`: in daemon_limits.rs's dense test a
//! 100,000-call `dump` (pftracectl, then its checks) took 3.7-5.7 s with
//! values, 0.8-1.0 s read this way. The checks made on what is read are the
//! same (`Trace::parse`), and a field of another type than pftraced writes
//! is an error, as it was.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::Value;

/// The top level: `traceEvents` typed, the small rest (`otherData`,
/// `displayTimeUnit`) as values.
#[derive(Deserialize)]
pub struct RawTrace<'a> {
    #[serde(rename = "displayTimeUnit", default)]
    pub display_time_unit: Value,
    #[serde(rename = "traceEvents", borrow)]
    pub trace_events: Vec<RawEvent<'a>>,
    #[serde(rename = "otherData", default)]
    pub other_data: Value,
}

/// One event: each field pftraced writes on some kind of event, absent
/// (None) on the others.
#[derive(Debug, Deserialize)]
pub struct RawEvent<'a> {
    #[serde(borrow)]
    pub ph: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub name: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub cat: Option<Cow<'a, str>>,
    pub pid: Option<u64>,
    pub tid: Option<u64>,
    pub ts: Option<f64>,
    pub dur: Option<f64>,
    #[serde(borrow, default)]
    pub args: RawArgs<'a>,
}

/// `args`: an X event's call fields, or an M event's `name`. `incomplete`
/// is kept as written (only `true` or absent is valid).
#[derive(Debug, Default, Deserialize)]
pub struct RawArgs<'a> {
    #[serde(borrow)]
    pub name: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub function: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub module: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub path: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub file: Option<Cow<'a, str>>,
    pub line: Option<i64>,
    pub incomplete: Option<Value>,
    pub id: Option<u64>,
    pub depth: Option<u64>,
    pub parent: Option<u64>,
}
