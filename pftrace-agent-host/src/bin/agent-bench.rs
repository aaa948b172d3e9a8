//! agent-bench: what the in-process agent costs, per Python call, on real
//! interpreters with the real kernel path. For each interpreter it runs one
//! loop (1 call in 1000 goes to `traced`, the rest to `hot`, or every call to
//! `traced` for the dense rows) in fresh processes and prints the median ns
//! per call of each case, and checks that every traced call's two records
//! arrived (exact count, none lost).
//!
//! Run as root, under `flock /tmp/pftrace-bpf.lock`.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::Parser;
use pftrace_agent::protocol::Report;
use pftrace_agent_host::{
    install,
    kernel::{AgentKernel, LoadOptions},
    server::AgentServer,
};
use pftrace_common::{agent, counter};

#[derive(Parser)]
struct Args {
    /// Interpreters to measure (repeatable).
    #[arg(long = "python", required = true)]
    pythons: Vec<PathBuf>,
    /// Calls per timed loop.
    #[arg(long, default_value_t = 1_000_000)]
    calls: u64,
    /// Runs per case (the median is printed).
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// The built agent (libpftrace_agent.so).
    #[arg(long, default_value = "target/release/libpftrace_agent.so")]
    agent: PathBuf,
    /// Only these cases (comma-separated names as printed).
    #[arg(long)]
    only: Option<String>,
    /// Instead of Python: call the probe function from this process in
    /// batches of 10,000 and print the fastest batch's ns per report, with
    /// and without the kernel side attached (the mechanism alone).
    #[arg(long)]
    raw: bool,
    /// Prototype (issue 12): the CPU slots alone: user-side entry cost,
    /// the sched_switch program's cost (pipe ping-pong), CPU agreement with
    /// CLOCK_THREAD_CPUTIME_ID, the map's read-only mapping.
    #[arg(long)]
    cpuslot: bool,
    /// Prototype (issue 12, batched): the drain report per drain and per
    /// record, and the switch-out drain program per context switch.
    #[arg(long)]
    batch_raw: bool,
}

const SCRIPT: &str = r#"
import os, sys, time
mode, sock, n, shape = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
if mode != "none":
    sys.path.insert(0, os.environ["PFTRACE_AGENT_DIR"])
    import pftrace_agent
    st = pftrace_agent.start(sock)
    if not st.startswith("tracing"):
        print("ERR", st, flush=True)
        sys.exit(3)

def traced(x):
    return x + 1

def hot(x):
    return x + 1

def sparse(n):
    for i in range(n):
        if i % 1000 == 0:
            traced(i)
        else:
            hot(i)

def dense(n):
    for i in range(n):
        if i % 1000 == 0:
            traced(i)
        else:
            traced(i)

loop = sparse if shape == "sparse" else dense
loop(n // 10)
t0 = time.perf_counter_ns()
loop(n)
t1 = time.perf_counter_ns()
warm = n // 10
traced_calls = (warm + n) if shape == "dense" else ((warm + 999) // 1000 + (n + 999) // 1000)
print("NS", (t1 - t0) / n, "TRACED", traced_calls, flush=True)
"#;

/// One measured case.
#[derive(Clone, Copy)]
struct Case {
    name: &'static str,
    /// None: the agent is not loaded.
    report: Option<Report>,
    names: &'static str,
    shape: &'static str,
    /// Records are expected on the ring (the kernel side is attached).
    kernel: bool,
    nop1: bool,
    /// Returns carry strings too (as before code-id pairing).
    return_strings: bool,
    /// Prototype (issue 12): one kernel entry per call (the start from the
    /// thread's CPU slot in user space).
    one_call: bool,
    /// The batched road (issue 12): events buffered per thread in the
    /// agent, drained by the kernel (implies one_call's slots).
    batch: bool,
}

/// The uprobe with a program that returns at once (the floor of the mechanism).
const FLOOR_CASE: Case = case("agent-dense-uprobe-floor", Some(Report::Uprobe), "traced", "dense", false);

const fn case(
    name: &'static str,
    report: Option<Report>,
    names: &'static str,
    shape: &'static str,
    kernel: bool,
) -> Case {
    Case {
        name,
        report,
        names,
        shape,
        kernel,
        nop1: false,
        return_strings: false,
        one_call: false,
        batch: false,
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let only: Option<Vec<String>> = args.only.as_ref().map(|s| s.split(',').map(str::to_string).collect());
    let wanted = |c: &Case| only.as_ref().is_none_or(|o| o.iter().any(|n| n == c.name));
    let tmp = tempdir()?;
    let installed =
        install::install(&args.agent, &tmp.join("agent"), &tmp.join("agent.sock")).with_context(|| {
            format!("installing {} (build it: cargo build --release -p pftrace-agent)", args.agent.display())
        })?;
    let script = tmp.join("bench.py");
    std::fs::write(&script, SCRIPT)?;
    if args.raw {
        return raw(&installed);
    }
    if args.cpuslot {
        return pftrace_agent_host::cpuslot::run();
    }
    if args.batch_raw {
        return pftrace_agent_host::batchbench::run();
    }
    let server = AgentServer::bind(&installed.socket)?;

    let (uprobe, callbacks_only) = (Some(Report::Uprobe), Some(Report::None));
    // The token is the loaded object's: filled in when the case runs.
    let syscall = Some(Report::Syscall(0));
    // Cases run round-robin within a group (every case once per round), so a
    // busy stretch of the shared machine weighs on all of them alike; each
    // group has its own untraced baselines and its kernel side loaded.
    let untraced_sparse = case("untraced-sparse", None, "", "sparse", false);
    let untraced_dense = case("untraced-dense", None, "", "dense", false);
    let main_group = vec![
        untraced_sparse,
        untraced_dense,
        case("agent-nomatch", uprobe, "no_such_function", "sparse", false),
        case("agent-sparse-callbacks", callbacks_only, "traced", "sparse", false),
        case("agent-dense-callbacks", callbacks_only, "traced", "dense", false),
        case("agent-sparse-uprobe", uprobe, "traced", "sparse", true),
        case("agent-dense-uprobe", uprobe, "traced", "dense", true),
        case("agent-sparse-syscall", syscall, "traced", "sparse", true),
        case("agent-dense-syscall", syscall, "traced", "dense", true),
        Case {
            return_strings: true,
            ..case("agent-dense-uprobe-return-strings", uprobe, "traced", "dense", true)
        },
        Case { nop1: true, ..case("agent-dense-uprobe-nop1", uprobe, "traced", "dense", true) },
        Case { nop1: true, ..case("agent-sparse-uprobe-nop1", uprobe, "traced", "sparse", true) },
    ];
    let floor_sparse = case("agent-sparse-uprobe-floor", uprobe, "traced", "sparse", false);
    let floor_group = vec![untraced_sparse, untraced_dense, floor_sparse, FLOOR_CASE];
    let nostrings_group =
        vec![untraced_dense, case("agent-dense-uprobe-nostrings", uprobe, "traced", "dense", true)];

    // Prototype (issue 12): today's two reports and one report a call, in
    // turn, from one loaded object (one-call records taken; the syscall road
    // as pftraced takes it, tp_btf; the sched_switch program attached).
    let one_group = vec![
        untraced_dense,
        case("agent-dense-callbacks", callbacks_only, "traced", "dense", false),
        case("agent-dense-syscall", syscall, "traced", "dense", true),
        Case { one_call: true, ..case("agent-dense-syscall-one", syscall, "traced", "dense", true) },
        case("agent-dense-uprobe", uprobe, "traced", "dense", true),
        Case { one_call: true, ..case("agent-dense-uprobe-one", uprobe, "traced", "dense", true) },
        Case {
            one_call: true,
            batch: true,
            ..case("agent-dense-syscall-batch", syscall, "traced", "dense", true)
        },
        Case {
            one_call: true,
            batch: true,
            ..case("agent-dense-uprobe-batch", uprobe, "traced", "dense", true)
        },
        Case {
            one_call: true,
            batch: true,
            ..case("agent-sparse-syscall-batch", syscall, "traced", "sparse", true)
        },
        untraced_sparse,
    ];

    for python in &args.pythons {
        let version =
            Command::new(python).args(["-c", "import sys; print(sys.version.split()[0])"]).output()?;
        let version = String::from_utf8_lossy(&version.stdout).trim().to_string();
        println!(
            "== {} (Python {version}), {} calls a loop, {} rounds",
            python.display(),
            args.calls,
            args.repeats
        );
        for (group, cases) in [
            ("main", &main_group),
            ("floor", &floor_group),
            ("nostrings", &nostrings_group),
            ("one", &one_group),
        ] {
            if group == "one" && only.is_none() {
                continue; // --only agent-dense-syscall-one,... (prototype)
            }
            if group != "one" && cases.iter().any(|c| c.one_call) {
                continue;
            }
            let cases: Vec<Case> = cases.iter().copied().filter(|c| wanted(c)).collect();
            if cases.iter().all(|c| c.report.is_none()) {
                continue;
            }
            let mut k = match group {
                "floor" => {
                    let mut k = AgentKernel::load(LoadOptions::default())?;
                    k.attach_floor(&installed.agent_so(), agent::PROBE_SYMBOL)?;
                    Kernel::from(k, false)?
                }
                "one" => {
                    let mut k =
                        AgentKernel::load(LoadOptions { one_call: true, batch: true, ..Default::default() })?;
                    k.attach_uprobe(&installed.agent_so(), agent::PROBE_SYMBOL)?;
                    k.attach_syscall_btf()?;
                    k.attach_cpu_slots()?;
                    if std::env::var_os("AGENT_BENCH_NO_SWITCH_DRAIN").is_none() {
                        k.attach_batch_switch()?;
                    }
                    k.attach_batch_exit()?;
                    Kernel::from(k, true)?
                }
                _ => Kernel::start(&installed, group != "nostrings")?,
            };
            let mut samples: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
            for _ in 0..args.repeats {
                for (i, c) in cases.iter().enumerate() {
                    samples[i].push(run_case(
                        python,
                        &script,
                        &installed,
                        &server,
                        c,
                        args.calls,
                        Some(&mut k),
                    )?);
                }
            }
            let mut results: Vec<(&str, f64)> = Vec::new();
            for (c, s) in cases.iter().zip(&mut samples) {
                s.sort_by(f64::total_cmp);
                // The fastest run: on a shared machine noise only adds time.
                let (fastest, median) = (s[0], s[s.len() / 2]);
                println!(
                    "  {:<30} {:>8.1} ns/call fastest, {:>8.1} median  (runs: {})",
                    c.name,
                    fastest,
                    median,
                    s.iter().map(|v| format!("{v:.1}")).collect::<Vec<_>>().join(" ")
                );
                results.push((c.name, fastest));
            }
            k.finish()?;
            summarize(&results);
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}

/// Derived figures (from the fastest runs): added ns per matched call, ratios.
fn summarize(results: &[(&str, f64)]) {
    let get = |n: &str| results.iter().find(|(k, _)| *k == n).map(|(_, v)| *v);
    let Some(base_d) = get("untraced-dense") else { return };
    let base_s = get("untraced-sparse").unwrap_or(base_d);
    if let Some(v) = get("agent-nomatch") {
        println!("  -> no match: {:+.1} ns per call ({:.3}x untraced)", v - base_s, v / base_s);
    }
    for (name, base) in [
        ("agent-sparse-callbacks", base_s),
        ("agent-sparse-uprobe", base_s),
        ("agent-sparse-uprobe-nop1", base_s),
        ("agent-sparse-uprobe-floor", base_s),
        ("agent-sparse-syscall", base_s),
        ("agent-sparse-syscall-batch", base_s),
    ] {
        if let Some(v) = get(name) {
            println!("  -> {name}: {:.3}x untraced", v / base);
        }
    }
    for name in [
        "agent-dense-callbacks",
        "agent-dense-uprobe-floor",
        "agent-dense-uprobe",
        "agent-dense-uprobe-return-strings",
        "agent-dense-uprobe-nop1",
        "agent-dense-uprobe-nostrings",
        "agent-dense-syscall",
        "agent-dense-syscall-one",
        "agent-dense-uprobe-one",
        "agent-dense-syscall-batch",
        "agent-dense-uprobe-batch",
    ] {
        if let Some(v) = get(name) {
            println!("  -> {name}: {:+.1} ns per matched call", v - base_d);
        }
    }
}

/// The kernel side and a thread draining the ring (counting this run's records).
struct Kernel {
    k: AgentKernel,
    stop: Arc<AtomicBool>,
    records: Arc<AtomicU64>,
    pid: Arc<AtomicU64>,
    drainer: Option<thread::JoinHandle<()>>,
}

impl Kernel {
    fn start(installed: &install::Installed, strings: bool) -> anyhow::Result<Self> {
        let mut k = AgentKernel::load(LoadOptions { strings, ..Default::default() })?;
        k.attach_uprobe(&installed.agent_so(), agent::PROBE_SYMBOL)?;
        k.attach_uprobe_extra(&installed.agent_so(), "pftrace_agent_probe_nop1")?;
        k.attach_syscall(false)?;
        Self::from(k, true)
    }

    fn from(mut k: AgentKernel, _records: bool) -> anyhow::Result<Self> {
        let mut ring = k.take_ring()?;
        let (stop, records, pid) =
            (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (s, r, p) = (stop.clone(), records.clone(), pid.clone());
        let drainer = thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let n = ring.count_for(p.load(Ordering::Relaxed) as u32);
                r.fetch_add(n, Ordering::Relaxed);
                if n == 0 {
                    thread::sleep(Duration::from_micros(500));
                }
            }
        });
        Ok(Self { k, stop, records, pid, drainer: Some(drainer) })
    }

    fn finish(mut self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(d) = self.drainer.take() {
            let _ = d.join();
        }
        let lost = self.k.counter(counter::LOST)?;
        let foreign = self.k.counter(counter::AGENT_FOREIGN)?;
        println!(
            "  kernel: {} reports, {lost} lost, {foreign} from untracked processes",
            self.k.counter(counter::AGENT_REPORTS)?
        );
        if let Ok(c) = self.k.batch_counters()
            && c[pftrace_common::batch::counter::DRAINS as usize] > 0
        {
            println!("  batches: {}", pftrace_agent_host::batch::counters_text(&c));
        }
        Ok(())
    }
}

fn run_case(
    python: &Path,
    script: &Path,
    installed: &install::Installed,
    server: &AgentServer,
    c: &Case,
    calls: u64,
    kernel: Option<&mut Kernel>,
) -> anyhow::Result<f64> {
    let mut cmd = Command::new(python);
    cmd.arg(script)
        .arg(if c.report.is_some() { "agent" } else { "none" })
        .arg(&installed.socket)
        .arg(calls.to_string())
        .arg(c.shape)
        .env("PFTRACE_AGENT_DIR", &installed.dir)
        .stdout(Stdio::piped());
    if c.nop1 {
        cmd.env("PFTRACE_AGENT_BENCH_NOP1", "1");
    }
    if c.return_strings {
        cmd.env("PFTRACE_AGENT_BENCH_RETURN_STRINGS", "1");
    }
    if c.one_call
        && let Some(k) = kernel.as_deref()
    {
        use std::os::{fd::AsRawFd as _, unix::process::CommandExt as _};
        // The slot map's fd (read-only) at a fixed number in the child.
        const CHILD_FD: i32 = 100;
        let fd = k.k.slots_fd()?.as_raw_fd();
        cmd.env("PFTRACE_AGENT_ONE_CALL", "1").env("PFTRACE_AGENT_SLOT_FD", CHILD_FD.to_string());
        if c.batch {
            cmd.env("PFTRACE_AGENT_BATCH", "1");
        }
        // SAFETY: dup2 is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(fd, CHILD_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
    }
    let child = cmd.spawn()?;
    let child_pid = child.id();
    let mut kernel = kernel;
    let _conn = match c.report {
        Some(report) => {
            let mut conn = server.accept(Duration::from_secs(10))?;
            if conn.pid != child.id() {
                bail!("agent pid {} is not the child {}", conn.pid, child.id());
            }
            if let Some(k) = kernel.as_deref_mut() {
                k.records.store(0, Ordering::Relaxed);
                k.pid.store(child.id() as u64, Ordering::Relaxed);
                k.k.track(child.id())?;
                if c.one_call {
                    // Before the names: the child's next switch-in (it waits
                    // for them) writes its slot.
                    pftrace_agent_host::batch::give_slots(&mut k.k, &[child.id()], 0)?;
                }
            }
            let report = match (report, kernel.as_deref()) {
                (Report::Syscall(_), Some(k)) => Report::Syscall(k.k.token),
                (r, _) => r,
            };
            conn.configure(report, &[c.names.to_string()])?;
            Some(conn)
        }
        None => None,
    };
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    let (Some("NS"), Some(ns), Some("TRACED"), Some(traced)) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        bail!("{}: case {}: unexpected output {text:?} ({})", python.display(), c.name, out.status);
    };
    let ns: f64 = ns.parse()?;
    let traced: u64 = traced.parse()?;
    if let Some(k) = kernel {
        k.k.untrack(child_pid)?;
        if c.one_call {
            pftrace_agent_host::batch::take_slots(&mut k.k, &[child_pid])?;
        }
        if c.kernel && c.names == "traced" {
            // Every traced call reports twice; wait for the drain to catch up.
            // One-call: once, but for the first (its strings: two reports);
            // batched: twice, the events counted in their batches.
            let want = if c.one_call && !c.batch { traced + 1 } else { 2 * traced };
            for _ in 0..400 {
                if k.records.load(Ordering::Relaxed) >= want {
                    break;
                }
                thread::sleep(Duration::from_millis(5));
            }
            let got = k.records.load(Ordering::Relaxed);
            if got != want {
                bail!("{}: case {}: {got} records, expected {want}", python.display(), c.name);
            }
        }
    }
    Ok(ns)
}

/// The report mechanism alone: the probe function called from Rust.
fn raw(installed: &install::Installed) -> anyhow::Result<()> {
    type Probe = unsafe extern "C" fn(u64, *const u8, *const u8, u64, u64);
    let path = std::ffi::CString::new(installed.agent_so().to_string_lossy().as_bytes())?;
    let fastest = |f: Probe| -> f64 {
        let (name, file) = (c"traced".as_ptr() as *const u8, c"/tmp/bench.py".as_ptr() as *const u8);
        let mut best = f64::MAX;
        for _ in 0..300 {
            let t0 = std::time::Instant::now();
            for i in 0..10_000u64 {
                unsafe { f(if i & 1 == 0 { 1 } else { 4 }, name, file, 7, 1) };
            }
            best = best.min(t0.elapsed().as_nanos() as f64 / 10_000.0);
        }
        best
    };
    let lib = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if lib.is_null() {
        bail!("dlopen {}", installed.agent_so().display());
    }
    let get = |sym: &std::ffi::CStr| -> anyhow::Result<Probe> {
        let p = unsafe { libc::dlsym(lib, sym.as_ptr()) };
        if p.is_null() {
            bail!("no {sym:?}");
        }
        Ok(unsafe { std::mem::transmute::<*mut libc::c_void, Probe>(p) })
    };
    let (nop5, nop1) = (get(c"pftrace_agent_probe")?, get(c"pftrace_agent_probe_nop1")?);
    // The loaded object's token, for the syscall reports of this process.
    static TOKEN: AtomicU64 = AtomicU64::new(0);
    unsafe extern "C" fn by_syscall(event: u64, name: *const u8, file: *const u8, line: u64, code: u64) {
        pftrace_agent::report_syscall(event, name, file, line, code, TOKEN.load(Ordering::Relaxed));
    }
    let syscall: Probe = by_syscall;
    // What every other syscall of the host pays while the syscall road is
    // attached: getppid timed with and without it.
    unsafe extern "C" fn getppid(_: u64, _: *const u8, _: *const u8, _: u64, _: u64) {
        unsafe { libc::syscall(libc::SYS_getppid) };
    }
    let other: Probe = getppid;
    // The two roads, in turn on the calling CPU (pin with taskset: this
    // VM's two vCPUs run one loop at different speeds), fastest of 300
    // batches each: the empty programs, then the full one.
    for round in 0..2 {
        let mut fl = AgentKernel::load(LoadOptions::default())?;
        fl.attach_floor(&installed.agent_so(), agent::PROBE_SYMBOL)?;
        println!("raw round {round} nop5 uprobe, empty program: {:.1} ns per report", fastest(nop5));
        drop(fl);
        println!("raw round {round} syscall, nothing attached: {:.1} ns per report", fastest(syscall));
        println!("raw round {round} getppid, nothing attached: {:.1} ns", fastest(other));
        let mut fl = AgentKernel::load(LoadOptions::default())?;
        TOKEN.store(fl.token, Ordering::Relaxed);
        fl.attach_syscall(true)?;
        println!("raw round {round} syscall, empty program: {:.1} ns per report", fastest(syscall));
        drop(fl);
        // The full program as a code object's every report but its first
        // runs it: the short record, no strings.
        for road in ["nop5 uprobe", "syscall", "syscall tp_btf"] {
            let mut k = AgentKernel::load(LoadOptions { strings: false, ..Default::default() })?;
            TOKEN.store(k.token, Ordering::Relaxed);
            let f = if road == "syscall tp_btf" {
                if let Err(e) = k.attach_syscall_btf() {
                    println!("raw round {round} syscall tp_btf: not attached: {e}");
                    continue;
                }
                syscall
            } else if road == "syscall" {
                k.attach_syscall(false)?;
                syscall
            } else {
                k.attach_uprobe(&installed.agent_so(), agent::PROBE_SYMBOL)?;
                nop5
            };
            k.track(std::process::id())?;
            let (stop, drainer) = drain_own(k.take_ring()?);
            let before = k.program_stats();
            let ns = fastest(f);
            let after = k.program_stats();
            if let (Some((c0, t0)), Some((c1, t1))) = (before, after)
                && c1 > c0
            {
                println!(
                    "raw round {round} {road}: {:.1} ns in the program (bpf_stats)",
                    (t1 - t0) as f64 / (c1 - c0) as f64
                );
            }
            if road == "syscall" {
                println!("raw round {round} getppid, syscall road attached: {:.1} ns", fastest(other));
            }
            stop.store(true, Ordering::Relaxed);
            let _ = drainer.join();
            println!(
                "raw round {round} {road}, full program: {ns:.1} ns per report ({} reports, {} lost)",
                k.counter(counter::AGENT_REPORTS)?,
                k.counter(counter::LOST)?
            );
        }
    }
    if std::env::var_os("AGENT_BENCH_ROADS_ONLY").is_some() {
        return Ok(());
    }
    // What each part of the program costs: the same reports with parts left
    // out, timed here and by the kernel (bpf_stats, when enabled).
    use pftrace_common::task_layout::bench_skip as skip;
    // "with strings": a code object's first report of a session (the long
    // record, two string reads); "no strings": every later one (48 bytes).
    let variants: [(&str, bool, u32); 8] = [
        ("with strings", true, 0),
        ("no strings", false, 0),
        ("no strings, rss", false, skip::RSS),
        ("no strings, rss, cpu", false, skip::RSS | skip::CPU),
        ("no strings, rss, cpu, clock", false, skip::RSS | skip::CPU | skip::CLOCK),
        ("no strings, rss, cpu, clock, wakeup", false, skip::RSS | skip::CPU | skip::CLOCK | skip::WAKEUP),
        ("no record (lookup + counter)", false, skip::RING),
        ("no record, no lookup", false, skip::RING | skip::TRACKED),
    ];
    for (road, (label, strings, skip)) in
        ["nop5", "syscall"].into_iter().flat_map(|r| variants.iter().map(move |v| (r, *v)))
    {
        let mut k = AgentKernel::load(LoadOptions { strings, skip, ..Default::default() })?;
        TOKEN.store(k.token, Ordering::Relaxed);
        if road == "syscall" {
            k.attach_syscall(false)?;
        } else {
            k.attach_uprobe(&installed.agent_so(), agent::PROBE_SYMBOL)?;
        }
        k.track(std::process::id())?;
        let (stop, drainer) = drain_own(k.take_ring()?);
        let before = k.program_stats();
        let ns = fastest(if road == "syscall" { syscall } else { nop5 });
        let after = k.program_stats();
        stop.store(true, Ordering::Relaxed);
        let _ = drainer.join();
        let prog = match (before, after) {
            (Some((c0, t0)), Some((c1, t1))) if c1 > c0 && t1 > t0 => {
                format!("{:.1} ns in the program (bpf_stats)", (t1 - t0) as f64 / (c1 - c0) as f64)
            }
            _ => "bpf_stats off".into(),
        };
        println!("raw {road:<7} {label:<38} {ns:.1} ns per report; {prog}");
    }
    let mut fl = AgentKernel::load(LoadOptions::default())?;
    fl.attach_floor(&installed.agent_so(), agent::PROBE_SYMBOL)?;
    println!("raw nop5 {:<38} {:.1} ns per report", "empty program (floor)", fastest(nop5));
    drop(fl);
    let mut k = AgentKernel::load(LoadOptions::default())?;
    k.attach_uprobe(&installed.agent_so(), agent::PROBE_SYMBOL)?;
    k.attach_uprobe_extra(&installed.agent_so(), "pftrace_agent_probe_nop1")?;
    k.track(std::process::id())?;
    let (stop, drainer) = drain_own(k.take_ring()?);
    println!("raw nop5 uprobe: {:.1} ns per report", fastest(nop5));
    println!("raw nop1 uprobe: {:.1} ns per report", fastest(nop1));
    // Sparse: one report per 1,000 units of other work; does the work slow down?
    let sparse = |f: Option<Probe>| -> (f64, f64) {
        let mut runs = Vec::new();
        for _ in 0..15 {
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            let t0 = std::time::Instant::now();
            for i in 0..2_000_000u64 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if i % 1000 == 0
                    && let Some(f) = f
                {
                    unsafe { f(1, c"t".as_ptr() as *const u8, c"f".as_ptr() as *const u8, 1, 1) };
                }
            }
            std::hint::black_box(x);
            runs.push(t0.elapsed().as_nanos() as f64 / 2_000_000.0);
        }
        runs.sort_by(f64::total_cmp);
        (runs[0], runs[runs.len() / 2])
    };
    for (label, f) in
        [("none", None), ("nop5", Some(nop5)), ("nop1", Some(nop1)), ("none", None), ("nop5", Some(nop5))]
    {
        let (fast, med) = sparse(f);
        println!("raw sparse 1/1000 {label}: {fast:.2} ns per unit fastest, {med:.2} median");
    }
    stop.store(true, Ordering::Relaxed);
    let _ = drainer.join();
    println!("kernel: {} reports, {} lost", k.counter(counter::AGENT_REPORTS)?, k.counter(counter::LOST)?);
    drop(k);
    println!("raw nop5, nothing attached: {:.1} ns per call", fastest(nop5));
    Ok(())
}

/// A thread draining this process's records off `ring` until told to stop.
fn drain_own(mut ring: pftrace_agent_host::kernel::Ring) -> (Arc<AtomicBool>, thread::JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let drainer = thread::spawn(move || {
        while !s.load(Ordering::Relaxed) {
            if ring.count_for(std::process::id()) == 0 {
                thread::sleep(Duration::from_micros(500));
            }
        }
    });
    (stop, drainer)
}

fn tempdir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("pftrace-agent-bench.{}", std::process::id()));
    std::fs::create_dir(&dir)?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    Ok(dir)
}
