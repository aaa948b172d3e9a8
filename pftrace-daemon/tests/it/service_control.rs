//! pftracectl against a real, tracing pftraced: `add` / `remove` take effect
//! between one call and the next; `dump` works mid-trace without stopping it
//! and `stats` agrees with the dumped calls to the nanosecond; other users
//! are refused and garbage requests get error replies, while the daemon
//! goes on serving and tracing.

use crate::common;

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    path::Path,
    process::Command,
    time::Duration,
};

use crate::common::*;
use serde_json::Value;

#[test]
fn add_and_remove_take_effect_live() {
    let dir = TestDir::new("svc-addrm");
    let (mut w, socket, tracer) = traced_worker(&dir, &["bar"], &[]);

    w.call("foo", 100); // not traced yet
    w.call("bar", 10);
    assert_eq!(ctl_ok(&socket, &["add", "-t", "foo"]), "now tracing: bar, foo\n");
    w.call("foo", 200);
    w.call("bar", 20);
    assert_eq!(ctl_ok(&socket, &["remove", "-t", "foo"]), "now tracing: bar\n");
    w.call("foo", 300); // no longer traced
    w.call("bar", 30);

    let pid = w.pid();
    let want = expected(&[(pid, "foo", 200), (pid, "bar", 60)]);
    let live = dump(&socket);
    assert_eq!(counts(&live.calls), want, "dump: only the calls of foo made while it was traced");
    live.assert_clean();
    assert_eq!(live.names(), ["bar"]);
    // The foo calls all lie between the bar calls of the first and last rounds.
    let bars: Vec<&CallEvent> = live.named("bar");
    let (first_round_end, last_round_start) = (bars[9].ts_ns, bars[30].ts_ns);
    assert!(
        live.named("foo").iter().all(|c| c.ts_ns > first_round_end && c.ts_ns < last_round_start),
        "a foo call lies outside the window it was traced in"
    );
    let status = common::status(&socket);
    assert_eq!(status["names"], serde_json::json!(["bar"]), "{status:#}");

    // Errors leave the names as they were.
    let out = ctl(&socket, &["remove", "-t", "foo"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stderr), "pftracectl: error: \"foo\" is not traced (traced: bar)\n");
    w.call("foo", 5);

    let run = stop(&socket, tracer);
    let trace = run.trace();
    assert_eq!(counts(&trace.calls), want, "the -o trace");
    trace.assert_clean();
    w.finish();
}

/// Nearest-rank percentile: the smallest value with at least p% of the values at or below it.
fn nearest_rank(sorted: &[u64], p: f64) -> u64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Checks `stats --json` rows against the dumped calls: counts, totals,
/// means and maxima exactly (the dump writes `dur` as ns / 1000 in an f64,
/// which gives back the integer ns exactly at these magnitudes), and
/// percentiles within the error the reply states (1/256). Without a filter
/// the figures cover every call; per pid, the calls in memory (here the same).
fn check_stats(socket: &Path, calls: &[CallEvent], per_pid: bool) {
    let mut args = vec!["stats", "--json"];
    if per_pid {
        args.push("--per-pid");
    }
    let out = ctl_ok(socket, &args);
    let reply: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("stats --json: {e}\n{out}"));
    assert_eq!(reply["source"], if per_pid { "calls_in_memory" } else { "all_calls" }, "{out}");
    assert_eq!(reply["percentile_error"].as_f64(), Some(1.0 / 256.0), "{out}");
    let rows = reply["functions"].as_array().unwrap_or_else(|| panic!("no functions: {out}"));
    let mut groups: std::collections::BTreeMap<(String, String, Option<u32>), Vec<u64>> = Default::default();
    for c in calls {
        assert!(!c.incomplete);
        let key = (c.name.clone(), c.file.clone(), per_pid.then_some(c.pid));
        groups.entry(key).or_default().push(u64::try_from(c.dur_ns).unwrap());
    }
    assert_eq!(
        rows.len(),
        groups.len(),
        "one row per function{}:\n{out}",
        if per_pid { " and pid" } else { "" }
    );
    for row in rows {
        let key = (
            row["function"].as_str().unwrap().to_string(),
            row["file"].as_str().unwrap().to_string(),
            row["pid"].as_u64().map(|p| p as u32),
        );
        let durs = groups.get_mut(&key).unwrap_or_else(|| panic!("stats row for no dumped call: {row}"));
        durs.sort_unstable();
        let n = durs.len() as u64;
        let total: u64 = durs.iter().sum();
        let want = serde_json::json!({
            "calls": n, "incomplete": 0, "total_ns": total, "mean_ns": total / n, "max_ns": durs.last().unwrap(),
        });
        for (k, v) in want.as_object().unwrap() {
            assert_eq!(&row[k], v, "stats {k} of {key:?} disagrees with the dump: {row}");
        }
        for p in [50.0, 95.0, 99.0] {
            let (got, exact) = (row[format!("p{p}_ns")].as_u64().unwrap(), nearest_rank(durs, p));
            assert!(
                got.abs_diff(exact) as f64 <= exact as f64 / 256.0,
                "stats p{p} of {key:?} is {got}, the exact value {exact}: {row}"
            );
        }
    }
}

#[test]
fn dump_mid_trace_is_valid_json_and_stats_match_it() {
    let dir = TestDir::new("svc-dump");
    let (mut w, socket, tracer) = traced_worker(&dir, &["foo", "bar"], &[]);
    let pid = w.pid();

    w.call("foo", 500);
    w.call("bar", 250);
    let first = dump(&socket);
    assert_eq!(counts(&first.calls), expected(&[(pid, "foo", 500), (pid, "bar", 250)]));
    first.assert_clean();
    check_stats(&socket, &first.calls, false);
    check_stats(&socket, &first.calls, true);

    // Dumps while the worker keeps calling foo: each is valid JSON and
    // tracing goes on. The loop is paced (1000 calls, then 10 ms) to stay
    // well within the calls kept in memory (500,000) however slow dumps are.
    let stopfile = dir.join("stop-loop");
    w.send(&format!("loop foo {} 10", stopfile.display()));
    let mut seen = first.named("foo").len();
    for i in 0..3 {
        // Wait for progress first, so "more calls" cannot fail on a slow start.
        wait_status(&socket, tracer.pid(), "the loop's calls", |s| {
            s["calls_total"].as_u64() > Some(750 + seen as u64)
        });
        let mid = dump(&socket);
        let n = mid.named("foo").len();
        assert!(n > seen, "dump {i} during the loop has {n} foo calls, the one before had {seen}");
        seen = n;
    }
    std::fs::write(&stopfile, "").unwrap();
    let looped: u64 = w.expect("done").parse().unwrap();
    assert!(looped > 0);

    let status = common::status(&socket);
    assert_eq!(
        status["calls_evicted"], 0,
        "calls were evicted from memory: the test made too many\n{status:#}"
    );
    let last = dump(&socket);
    assert_eq!(counts(&last.calls), expected(&[(pid, "foo", 500 + looped), (pid, "bar", 250)]));
    last.assert_clean();
    check_stats(&socket, &last.calls, false);
    check_stats(&socket, &last.calls, true);
    // Filters select the same calls as in the dump.
    let out = ctl_ok(&socket, &["stats", "--json", "--function", "bar"]);
    let reply: Value = serde_json::from_str(&out).unwrap();
    let rows = reply["functions"].as_array().unwrap();
    assert_eq!(
        (&reply["source"], rows.len(), rows[0]["calls"].as_u64()),
        (&"all_calls".into(), 1, Some(250)),
        "{out}"
    );
    let out = ctl_ok(&socket, &["stats", "--json", "--pid", &pid.to_string()]);
    let reply: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(reply["source"], "calls_in_memory", "{out}");
    assert_eq!(reply["functions"].as_array().unwrap().len(), 2, "{out}");

    let run = stop(&socket, tracer);
    let trace = run.trace();
    assert_eq!(counts(&trace.calls), counts(&last.calls), "the -o trace holds what the last dump held");
    w.finish();
}

/// Sends raw bytes on a fresh connection and returns the reply line.
fn raw(socket: &Path, bytes: &[u8]) -> Value {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(bytes).unwrap();
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply to {bytes:?} is not JSON ({e}): {line:?}"))
}

#[test]
fn other_users_and_garbage_are_refused_while_the_daemon_carries_on() {
    require_tool("setpriv", "util-linux");
    let dir = TestDir::new("svc-refuse");
    let (mut w, socket, tracer) = traced_worker(&dir, &["foo"], &[]);
    assert_eq!(std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777, 0o600);
    w.call("foo", 10);

    // pftracectl as nobody: the socket's mode keeps it out, with a message that says why.
    for sub in [&["status"][..], &["stop"], &["dump", "-o", "/dev/null"], &["add", "-t", "bar"]] {
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", PFTRACECTL, "--socket"])
            .arg(&socket)
            .args(sub)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "pftracectl {sub:?} as nobody: {}", text(&out.stderr));
        assert_eq!(
            text(&out.stderr),
            format!(
                "pftracectl: error: permission denied on {}: run pftracectl as root (sudo), or as a member of \
                 the socket group configured in pftraced.toml\n",
                socket.display()
            ),
            "pftracectl {sub:?} as nobody"
        );
        assert!(out.stdout.is_empty());
    }

    // Garbage gets error replies.
    let reply = raw(&socket, b"hello\n");
    assert_eq!((reply["version"].as_u64(), reply["ok"].as_bool()), (Some(2), Some(false)), "{reply}");
    let e = reply["error"].as_str().unwrap();
    assert!(e.starts_with("malformed request (not one line of JSON)"), "{e}");
    let reply = raw(&socket, b"{\"version\":2,\"command\":{\"cmd\":\"nope\"}}\n");
    assert_eq!((reply["version"].as_u64(), reply["ok"].as_bool()), (Some(2), Some(false)), "{reply}");
    let e = reply["error"].as_str().unwrap();
    assert!(e.starts_with("malformed request: unknown variant `nope`"), "{e}");
    let reply = raw(&socket, b"\xff\xfe\x00\n");
    assert_eq!(reply["ok"].as_bool(), Some(false), "{reply}");

    // The daemon still serves and traces.
    let status = common::status(&socket);
    assert_eq!(status["daemon_pid"].as_u64(), Some(tracer.pid() as u64), "{status:#}");
    assert_eq!(status["names"], serde_json::json!(["foo"]), "a refused `add` changed the names");
    w.call("foo", 77);
    let live = dump(&socket);
    assert_eq!(counts(&live.calls), expected(&[(w.pid(), "foo", 87)]));
    let run = stop(&socket, tracer);
    assert_eq!(counts(&run.trace().calls), expected(&[(w.pid(), "foo", 87)]));
    w.finish();
}
