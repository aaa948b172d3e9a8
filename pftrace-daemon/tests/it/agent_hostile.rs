//! The agent path under hostile use (README, "Bounds"): records from an
//! agent are its process's own word, and a traced user controls the
//! agent's memory, its control-socket messages and the registers of its
//! reports (it can call the probe function itself, as ctypes does here).
//! One pftraced traces, through the agent (Debian's 3.14, `--pid` by
//! PEP 768), a hostile process and a well-behaved one calling `work`
//! beside it. The hostile one sends, in turn:
//! 1. forged reports: serials never announced (named unknown, counted),
//!    the largest serial, a serial reused with other strings (its latest
//!    word holds), a file name running into an unreadable page (empty), a
//!    name past 64 bytes (cut), files of 4,095 and 5,000 bytes (the second
//!    cut), one not UTF-8, the other process's file name (still its own
//!    calls: pid and tid are the kernel's), returns without entries;
//! 2. a million entries never returned, then 20,000 returns matching none
//!    of them, while the other process makes 300,000 calls;
//! 3. four children reporting 4,200 code objects each (distinct lines of a
//!    4,000-byte file, each in a new session);
//! 4. garbage on the agent's control socket: an oversized line, 64 silent
//!    connections, 3,000 more with a hello claiming pid 1 then nonsense, a
//!    5,000-byte line or nothing.
//!
//! Asserted: every counter exact (kept + not traced, named + unknown,
//! resolved + not kept = sent), no record lost, pftraced's peak RSS under
//! the USDT hostile test's bound, `pftracectl status` answering within
//! 3 s throughout, the other process's calls exact, one warning for all
//! the refused connections. Before the fixes this test went with: the
//! other process had 46,600 of its 300,000 calls traced, status took up to
//! 6.9 s, eight flooding children took pftraced to 613 MiB.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use crate::common::*;
use pftrace::{codes::PROCESS_CODES, pairing::PROCESS_OPEN_CALLS, string_bound::OTHER};
use serde_json::Value;

/// pftraced's peak resident memory allowed (the USDT hostile test's bound).
const PEAK_MIB: u64 = 160;
/// The well-behaved process's calls of `work`.
const GOOD: u64 = 300_000;
/// Entries never returned.
const OPEN: u64 = 1_000_000;
/// Returns of a code object open nowhere, sent on a deep stack (after the
/// returns of the entries not kept, which are theirs).
const STRAY: u64 = 20_000;
/// Children flooding code objects, and code objects (distinct lines of one
/// 4,000-byte file) each.
const CHILDREN: u64 = 4;
const LINES: u64 = 4_200;

/// Commands come in files `cmd.N` (a process blocked on stdin would not run
/// the PEP 768 loader); results go to stdout.
const PRELUDE: &str = r#"
import ctypes, mmap, os, socket, sys, time, warnings
warnings.simplefilter("ignore", DeprecationWarning)  # fork() with the agent's thread
HERE = os.path.dirname(os.path.abspath(__file__))
def work():
    return 1
def commands(tag):
    n = 0
    while True:
        n += 1
        path = os.path.join(HERE, "%s.%d" % (tag, n))
        while not os.path.exists(path):
            time.sleep(0.002)
        with open(path) as f:
            yield f.read().split()
"#;

const GOOD_SCRIPT: &str = r#"
print("ready", flush=True)
for cmd in commands("good"):
    if cmd[0] == "exit":
        break
    n = int(cmd[1])
    for i in range(n):
        work()
        if i % 100 == 99:
            time.sleep(0.001)
    print("done", n, flush=True)
"#;

const HOSTILE_SCRIPT: &str = r#"
u64 = ctypes.c_uint64
START, RETURN, NEW_SESSION = 1, 4, 1 << 8
keep = []
sent = 0

def probe_fn():
    p = ctypes.CDLL(sys.modules["pftrace_agent"].__file__).pftrace_agent_probe
    p.argtypes = [u64, ctypes.c_void_p, ctypes.c_void_p, u64, u64]
    p.restype = None
    return p

def ptr(b):
    buf = ctypes.create_string_buffer(b)
    keep.append(buf)
    return ctypes.addressof(buf)

def report(event, name, file, line, code):
    global sent
    probe(event, name, file, line, code)
    sent += 1

def call(code, line, name=None, file=None, flags=0):
    report(START | flags, name, file, line, code)
    report(RETURN, None, None, line, code)

def forge():
    for _ in range(10):
        work()
    # Serials never announced: no name.
    for i in range(1000):
        call(10**9 + i, 5)
    # The largest serial.
    call(2**64 - 1, 7, ptr(b"work"), ptr(b"/h/huge.py"))
    # A serial reused with other strings: its latest word holds.
    call(77, 8, ptr(b"work"), ptr(b"/h/a.py"))
    call(77, 8, ptr(b"work"), ptr(b"/h/b.py"))
    call(77, 8)
    # A file name without NUL, running into a page that cannot be read.
    page = mmap.PAGESIZE
    m = mmap.mmap(-1, 2 * page)
    m[page - 100:page] = b"f" * 100
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert libc.mprotect(base + page, page, 0) == 0, ctypes.get_errno()
    keep.append(m)
    call(78, 9, ptr(b"work"), base + page - 100)
    # A name past its 64 bytes; files of 4,095 (the most) and 5,000 bytes.
    call(79, 10, ptr(b"long_" + b"x" * 200), ptr(b"/h/l.py"))
    call(80, 11, ptr(b"work"), ptr(b"/" + b"y" * 4094))
    call(81, 12, ptr(b"work"), ptr(b"/" + b"z" * 4999))
    # Not UTF-8.
    call(82, 13, ptr(b"work"), ptr(b"/h/\xff\xfe.py"))
    # The other process's file: still this process's calls (pid and tid
    # are the kernel's).
    for _ in range(5):
        call(86, 3, ptr(b"work"), ptr(os.path.join(HERE, "good.py").encode()))
    # Returns without entries.
    for _ in range(500):
        report(RETURN, None, None, 14, 83)

def open_entries(n, stray):
    report(START, ptr(b"work"), ptr(b"/h/open.py"), 15, 84)
    for i in range(n - 1):
        report(START, None, None, 15, 84)
        if i % 20000 == 19999:
            time.sleep(0.002)
    # Returns of a code object that is open nowhere, on the deep stack.
    for i in range(stray):
        report(RETURN, None, None, 16, 85)

def flood(children, lines):
    # Each child in turn: one 4,000-byte file, `lines` code objects
    # (distinct lines), every first report in a new session (its names
    # forgotten, so the agent's bound on names does not apply). Paced: the
    # test is of memory, not of how fast pftraced reads 4.2 KB records.
    for c in range(children):
        pid = os.fork()
        if pid == 0:
            global probe
            probe = probe_fn()
            name, file = ptr(b"work"), ptr(("/flood/%03d/" % c).encode() + b"w" * 3988)
            for i in range(lines):
                call(i, i + 1, name, file, NEW_SESSION)
                if i % 50 == 49:
                    time.sleep(0.002)
            os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0

def garbage(path, n):
    # Oversized lines, partial lines then silence, a hello claiming another
    # pid then nonsense, and `n` connections opened and closed.
    held = []
    big = socket.socket(socket.AF_UNIX)
    big.connect(path)
    big.sendall(b"x" * 100000)
    held.append(big)
    for i in range(64):
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        s.sendall(b"hel")
        held.append(s)
    for i in range(n):
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
            if i % 3 == 0:
                s.sendall(b"hello 1 pid=1 python=3.14 report=uprobe\nnonsense\n")
            elif i % 3 == 1:
                s.sendall(b"\xff" * 5000 + b"\n")
        except OSError:
            pass
        s.close()
    return held

probe = probe_fn() if "pftrace_agent" in sys.modules else None
print("ready", flush=True)
held = []
for cmd in commands("hostile"):
    if cmd[0] == "exit":
        break
    probe = probe_fn()
    sent = 0
    if cmd[0] == "forge":
        forge()
    elif cmd[0] == "open":
        open_entries(int(cmd[1]), int(cmd[2]))
    elif cmd[0] == "flood":
        flood(int(cmd[1]), int(cmd[2]))
    elif cmd[0] == "garbage":
        held += garbage(cmd[1], int(cmd[2]))
    print("sent", sent, flush=True)
"#;

/// Writes command `n` for `tag` (whole, by rename).
fn command(dir: &TestDir, tag: &str, n: u32, text: &str) {
    let tmp = dir.join(&format!(".{tag}.{n}"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(&format!("{tag}.{n}"))).unwrap();
}

/// `pftracectl status` asked every 100 ms on a thread: the slowest answer
/// and the failures.
struct StatusWatch {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(Duration, Vec<String>, u64)>,
}

impl StatusWatch {
    fn start(socket: &Path) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (socket, flag) = (socket.to_path_buf(), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            let (mut slowest, mut failures, mut asked) = (Duration::ZERO, Vec::new(), 0);
            while !flag.load(Ordering::Relaxed) {
                let t = Instant::now();
                let out = ctl(&socket, &["status"]);
                slowest = slowest.max(t.elapsed());
                asked += 1;
                if !out.status.success() {
                    failures.push(text(&out.stderr));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            (slowest, failures, asked)
        });
        Self { stop, thread }
    }

    fn finish(self) -> (Duration, Vec<String>, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// A file name as rows show it: long ones by their start and length.
fn short(file: &str) -> String {
    if file.len() > 100 { format!("{}... ({} bytes)", &file[..20], file.len()) } else { file.to_string() }
}

fn stats_by_name(socket: &Path) -> BTreeMap<(String, String), (u64, u64)> {
    let out = ctl_ok(socket, &["stats", "--json", "--by", "name"]);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("stats --json ({e}):\n{out}"));
    v["functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                (r["function"].as_str().unwrap().to_string(), short(r["file"].as_str().unwrap())),
                (r["calls"].as_u64().unwrap(), r["incomplete"].as_u64().unwrap_or(0)),
            )
        })
        .collect()
}

#[test]
fn forged_agent_reports_and_floods_are_bounded_and_counted_and_others_stay_exact() {
    let _serial = serial();
    require_root();
    let py = sid_python("3.14");
    let dir = TestDir::new("agent-hostile");
    let good_script = dir.script("good.py", &format!("{PRELUDE}{GOOD_SCRIPT}"));
    let hostile_script = dir.script("hostile.py", &format!("{PRELUDE}{HOSTILE_SCRIPT}"));
    let good = PyProcess::spawn(&py, &good_script, &[]);
    let hostile = PyProcess::spawn(&py, &hostile_script, &[]);
    good.expect_line("ready");
    hostile.expect_line("ready");
    let (g, h) = (good.pid(), hostile.pid());
    let socket = socket_of(&dir);
    let tracer = serving(&dir, &["work", "long_*"]).pid(h).pid(g).spawn();
    for pid in [h, g] {
        assert!(tracer.wait_attached(pid).contains("in-process agent"));
    }
    wait_serving(&socket, &tracer);
    let watch = StatusWatch::start(&socket);
    let counters = |s: &Value| s["counters"].clone();

    // 1. Forged reports. Each is the process's word about its own calls.
    command(&dir, "hostile", 1, "forge");
    let forged: u64 = hostile.expect("sent").parse().unwrap();
    let real_reports = 2 * 10;
    assert_eq!(forged, 2 * 1000 + 2 + 6 + 2 + 2 + 2 + 2 + 2 + 10 + 500);
    let good_path = good_script.to_str().unwrap().to_string();
    let s = wait_status(&socket, tracer.pid(), "the forged reports", |s| {
        s["counters"]["agent_reports"].as_u64() >= Some(real_reports + forged)
    });
    let c = counters(&s);
    assert_eq!(c["agent_reports"], real_reports + forged, "{c:#}");
    assert_eq!((c["agent_foreign"].as_u64(), c["agent_bad"].as_u64()), (Some(0), Some(0)), "{c:#}");
    assert_eq!(c["agent_unnamed"], 1000, "serials never announced: {c:#}");
    assert_eq!(c["long_files"], 2, "{c:#}");
    let rows = stats_by_name(&socket);
    let hostile_path = hostile_script.to_str().unwrap().to_string();
    let want: BTreeMap<(String, String), (u64, u64)> = [
        (("work", hostile_path.as_str()), 10),
        (("<unknown: name not received>", ""), 1000),
        (("work", "/h/huge.py"), 1),
        (("work", "/h/a.py"), 1),
        (("work", "/h/b.py"), 2),
        (("work", ""), 1),
        (("long_name", "/h/l.py"), 1),
        (("work", &short(&format!("/{}", "y".repeat(4094)))), 1),
        (("work", &short(&format!("/{}", "z".repeat(4094)))), 1),
        (("work", "/h/\u{fffd}\u{fffd}.py"), 1),
        (("work", good_path.as_str()), 5),
    ]
    .into_iter()
    .map(|((n, f), calls)| {
        let n = if n == "long_name" { format!("long_{}", "x".repeat(58)) } else { n.to_string() };
        ((n, f.to_string()), (calls, 0))
    })
    .collect();
    assert_eq!(rows, want, "{c:#}");
    assert_eq!(s["unmatched_returns"], 500, "returns without entries");

    // 2. A million entries never returned: the process's first 65,536 kept
    //    open (PROCESS_OPEN_CALLS), the others not traced and their returns
    //    swallowed; then returns of a code object open nowhere on that deep
    //    stack. Meanwhile the other process calls `work`.
    let kept_open = PROCESS_OPEN_CALLS as u64;
    let strays = OPEN - kept_open + STRAY;
    let t = Instant::now();
    command(&dir, "good", 1, &format!("call {GOOD}"));
    command(&dir, "hostile", 2, &format!("open {OPEN} {strays}"));
    assert_eq!(hostile.expect("sent"), (OPEN + strays).to_string());
    assert_eq!(good.expect("done"), GOOD.to_string());
    let sent_in = t.elapsed();
    let reports = real_reports + forged + OPEN + strays + 2 * GOOD;
    let s = wait_status_within(&socket, tracer.pid(), "the open entries", Duration::from_secs(120), |s| {
        s["counters"]["agent_reports"].as_u64() >= Some(reports) || s["counters"]["lost"] != 0
    });
    eprintln!(
        "open phase: sent in {sent_in:?}, read by pftraced {:?} after the start; peak RSS {} MiB",
        t.elapsed(),
        peak_mib(tracer.pid())
    );
    let c = counters(&s);
    assert_eq!((c["lost"].as_u64(), c["agent_reports"].as_u64()), (Some(0), Some(reports)), "{c:#}");
    assert_eq!(c["bounds"]["open_calls_dropped"], OPEN - kept_open, "{c:#}");
    assert_eq!(s["unmatched_returns"], 500 + STRAY);
    let rows = stats_by_name(&socket);
    assert_eq!(
        rows.get(&("work".into(), good_path.clone())),
        Some(&(GOOD + 5, 0)),
        "the other process's calls"
    );

    // 3. Children flooding code objects with 4,000-byte file names: each
    //    has 4,096 resolved at most (codes::PROCESS_CODES) and 4,096 stats
    //    groups; the answers kept are bounded in bytes.
    let codes_before = wait_status(&socket, tracer.pid(), "status", |_| true)["codes"].clone();
    let t = Instant::now();
    eprintln!("before the flood: peak RSS {} MiB", peak_mib(tracer.pid()));
    command(&dir, "hostile", 3, &format!("flood {CHILDREN} {LINES}"));
    assert_eq!(hostile.expect("sent"), "0");
    let reports = reports + CHILDREN * LINES * 2;
    let s = wait_status_within(&socket, tracer.pid(), "the flood", Duration::from_secs(120), |s| {
        s["counters"]["agent_reports"].as_u64() >= Some(reports) || s["counters"]["lost"] != 0
    });
    let peak = peak_mib(tracer.pid());
    let c = counters(&s);
    eprintln!("flood: {:?}, peak RSS {peak} MiB; codes {}; counters {c}", t.elapsed(), s["codes"]);
    assert_eq!((c["lost"].as_u64(), c["agent_reports"].as_u64()), (Some(0), Some(reports)), "{c:#}");
    let past = LINES - PROCESS_CODES as u64;
    assert_eq!(c["bounds"]["stats_folded"], CHILDREN * past, "{c:#}");
    // Each child's code objects, each called once, are each asked for once:
    // queued (then resolved or over the bytes bound), refused by a full
    // queue, or past its process's bound. A queue-full one does not count
    // toward the bound (it was never queued), so under load a child queues
    // 4,096 and has fewer past the bound (one run under load: 208 refused by
    // the full queue, so 208 past the bound, not 416).
    let n = |v: &Value, k: &str| v[k].as_u64().unwrap();
    let since = |s: &Value, k: &str| n(&s["codes"], k) - n(&codes_before, k);
    let queued = |s: &Value| since(s, "resolved") + n(&s["counters"]["bounds"], "codes_over_bytes");
    let asked = |s: &Value| queued(s) + since(s, "queue_full") + since(s, "process_full");
    let s = wait_status(&socket, tracer.pid(), "every answer", |s| asked(s) >= CHILDREN * LINES);
    assert_eq!(asked(&s), CHILDREN * LINES, "{s:#}");
    assert!(queued(&s) <= CHILDREN * PROCESS_CODES as u64, "{s:#}");
    assert!(since(&s, "process_full") <= CHILDREN * past, "{s:#}");
    assert!(since(&s, "process_full") + since(&s, "queue_full") >= CHILDREN * past, "{s:#}");
    assert!(s["counters"]["bounds"]["codes_over_bytes"].as_u64() > Some(0));
    let rows = stats_by_name(&socket);
    for child in 0..CHILDREN {
        let file = short(&format!("/flood/{child:03}/{}", "w".repeat(3988)));
        assert_eq!(rows.get(&("work".into(), file)), Some(&(PROCESS_CODES as u64, 0)), "child {child}");
    }
    assert_eq!(rows.get(&("work".into(), OTHER.into())), Some(&(CHILDREN * past, 0)));

    // 4. Garbage on the agent's control socket: one oversized line, 64
    //    connections silent after "hel", then 3,000 more (a hello claiming
    //    pid 1 then nonsense, a 5,000-byte line, nothing); all refused and
    //    counted. Then the other process again.
    let agent_socket = format!("/run/pftrace/agent.{}/agent.sock", tracer.pid());
    let t = Instant::now();
    command(&dir, "hostile", 4, &format!("garbage {agent_socket} 3000"));
    assert_eq!(hostile.expect("sent"), "0");
    // (A forked child's agent may have connected and gone already.)
    let refused = c["bounds"]["agent_connections_refused"].as_u64().unwrap() + 1 + 64 + 3000;
    let s = wait_status(&socket, tracer.pid(), "the refused connections", |s| {
        s["counters"]["bounds"]["agent_connections_refused"].as_u64() >= Some(refused)
    });
    eprintln!("garbage: {:?}", t.elapsed());
    assert_eq!(s["counters"]["bounds"]["agent_connections_refused"], refused);
    command(&dir, "good", 2, "call 1000");
    assert_eq!(good.expect("done"), "1000");
    let rows = stats_by_name(&socket);
    assert_eq!(rows.get(&("work".into(), good_path.clone())), Some(&(GOOD + 1000 + 5, 0)));
    // Per process: the other process has its own calls, exactly; the five
    // naming its file are the hostile process's.
    let out = ctl_ok(&socket, &["stats", "--json", "--by", "name", "--per-pid"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    let of = |pid: u32| -> Vec<(String, String, u64)> {
        v["functions"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["pid"].as_u64() == Some(u64::from(pid)))
            .map(|r| {
                let text = |k: &str| r[k].as_str().unwrap().to_string();
                (text("function"), short(&text("file")), r["calls"].as_u64().unwrap())
            })
            .collect()
    };
    assert_eq!(of(g), [("work".to_string(), good_path.clone(), GOOD + 1000)]);
    assert!(of(h).contains(&("work".to_string(), good_path.clone(), 5)), "{:?}", of(h));

    // What was refused, in words too: `status` and the summary.
    let b = status(&socket)["counters"]["bounds"].clone();
    let over = b["codes_over_bytes"].as_u64().unwrap();
    let text = ctl_ok(&socket, &["status"]);
    for part in [
        format!("{} calls not traced (too many open at once)", OPEN - kept_open),
        format!("{refused} connections to the agent socket refused"),
        format!("{over} functions not resolved (answers over their bytes)"),
    ] {
        assert!(text.contains(&part), "pftracectl status says {part:?}:\n{text}");
    }
    let (slowest, failures, asked) = watch.finish();
    eprintln!("status asked {asked} times, slowest {slowest:?}, failures {failures:?}");
    ctl_ok(&socket, &["stop"]);
    let run = tracer.finish();
    for part in [
        format!("BOUNDS: {refused} connections to the in-process agent's socket were refused"),
        format!("BOUNDS: {over} functions were not resolved"),
        format!("{} calls were not traced (entered while 262144 calls were open, or 65536", OPEN - kept_open),
    ] {
        assert!(run.stderr.contains(&part), "the summary says {part:?}:\n{}", run.stderr);
    }
    command(&dir, "hostile", 5, "exit");
    command(&dir, "good", 3, "exit");
    assert!(failures.is_empty(), "{failures:?}");
    assert!(slowest < Duration::from_secs(3), "pftracectl status took {slowest:?}");
    assert!(peak < PEAK_MIB, "pftraced's peak RSS {peak} MiB, bound {PEAK_MIB} MiB");
    // One warning for the refused connections, not one each.
    assert_eq!(
        run.stderr.matches("further refused connections to the agent socket are counted").count(),
        1,
        "{}",
        run.stderr
    );
    let warnings: Vec<&str> = run.stderr.lines().filter(|l| l.starts_with("pftraced: warn:")).collect();
    assert!(warnings.len() <= 10, "{warnings:#?}");
}
