//! Security ("Reliability and security"):
//!
//! a. The control socket is a root-owned socket of mode 0600 (also when
//!    pftraced runs under umask 000), in a directory of mode 0755 it
//!    creates, and other users cannot use it.
//! b. Text chosen by a traced process never reaches a terminal raw: a file
//!    name with escape sequences, a long path, a code object's made-up file
//!    name the kernel cuts (at 4095 bytes) inside a UTF-8 character, and an
//!    interpreter installed under a path with an escape
//!    sequence show escaped (`\x1b`, U+FFFD) in the trace, the summary,
//!    pftraced's messages and pftracectl's output, and every trace is JSON.
//! c. No BPF object outlives pftraced: nothing is pinned in /sys/fs/bpf,
//!    and every program, map and link it held is freed when it stops.
//! d. `pftracectl dump` cannot make the daemon write a file: the dump
//!    streams over the socket, the request has no field naming a path, and
//!    `-o` is written by pftracectl itself.
//!
//! Why not a file name with an invalid UTF-8 byte (`evil\x1b[31m\xff.py`):
//! CPython 3.9 decodes it to a str with a lone surrogate, and its probe code
//! (`dtrace_function_entry`) calls `PyUnicode_AsUTF8(co_filename)` without
//! checking for failure, so once a probe's semaphore is raised the traced
//! program itself dies with `SystemError: <class 'UnicodeEncodeError'>
//! returned a result with an error set` (python/cpython#156118). pftrace
//! cannot prevent that; invalid UTF-8 reaches pftrace only when the kernel
//! cuts a long path inside a character, which is what (b) uses.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::{
        ffi::OsStrExt as _,
        fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
        net::UnixStream,
        process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::common::*;
use serde_json::Value;

/// How long to wait for the daemon to reach a state.
const WAIT: Duration = Duration::from_secs(20);
/// The most bytes the kernel copies of a file name (PATH_MAX - 1): longer
/// names, which only code objects compiled with a made-up name have, are cut.
const FILE_BYTES: usize = pftrace_common::LONG_FILE_LEN - 1;

/// Polls `status --json` until `check` holds; panics after [`WAIT`].
fn wait_status(socket: &Path, daemon: u32, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    wait_status_within(socket, daemon, what, WAIT, check)
}

fn stop(socket: &Path, tracer: RunningTracer) -> TracedRun {
    ctl_checked(socket, &["stop"]);
    let run = tracer.finish();
    run.assert_code(0);
    run
}

/// Fails if `bytes` hold a control character other than newline or tab
/// (an escape sequence or BEL reaching a terminal).
fn assert_no_controls(what: &str, bytes: &[u8]) {
    let bad: Vec<(usize, u8)> = bytes
        .iter()
        .copied()
        .enumerate()
        .filter(|&(_, b)| (b < 0x20 && b != b'\n' && b != b'\t') || b == 0x7f)
        .collect();
    assert!(bad.is_empty(), "{what} holds raw control bytes {bad:?}:\n{}", text(bytes).escape_debug());
}

// ---------------------------------------------------------------------------
// a. The control socket

#[test]
fn control_socket_is_root_only_mode_0600_even_under_umask_000() {
    let dir = TestDir::new("sec-socket");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let w = WorkerSpec::new(&python(), &worker_script(&dir)).start("worker");
    let run_dir = dir.join("run");
    let socket = run_dir.join("pftrace").join("pftraced.sock");
    let tracer = Pftraced::new(&dir, &["foo"])
        .pid(w.pid())
        .arg("--socket")
        .arg(&socket)
        .wrapped(&["/bin/sh", "-c", r#"umask 000 && exec "$0" "$@""#])
        .spawn();
    let daemon = tracer.pid();
    tracer.wait_attached(w.pid());
    wait_status(&socket, daemon, "the control socket", |_| true);
    assert_eq!(
        fs::read_to_string(format!("/proc/{daemon}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("Umask:"))
            .map(str::trim),
        Some("0000"),
        "pftraced is not running under umask 000"
    );

    let meta = fs::symlink_metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket(), "{} is not a socket", socket.display());
    assert_eq!(meta.mode() & 0o7777, 0o600, "socket mode {:o}", meta.mode() & 0o7777);
    assert_eq!((meta.uid(), meta.gid()), (0, 0), "socket owner");
    let parent = fs::metadata(socket.parent().unwrap()).unwrap();
    assert_eq!(parent.mode() & 0o7777, 0o755, "socket directory mode {:o}", parent.mode() & 0o7777);
    assert_eq!(fs::metadata(&run_dir).unwrap().mode() & 0o7777, 0o755);

    // Another user: the file mode refuses the connection.
    let out = Command::new(PFTRACECTL)
        .arg("--socket")
        .arg(&socket)
        .arg("status")
        .uid(65534)
        .gid(65534)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!(
            "pftracectl: error: permission denied on {}: run pftracectl as root (sudo), or as a member of \
             the socket group configured in pftraced.toml\n",
            socket.display()
        )
    );
    assert!(out.stdout.is_empty());

    stop(&socket, tracer);
    assert!(!socket.exists(), "the socket outlived the daemon");
    drop(w);
}

// ---------------------------------------------------------------------------
// b. Text from traced processes

/// A Python expression for the path `p` (which may hold control characters).
fn py_str(p: &Path) -> String {
    let hex: String = p.as_os_str().as_bytes().iter().map(|b| format!("{b:02x}")).collect();
    format!("bytes.fromhex('{hex}').decode()")
}

/// `s` with control characters as pftrace shows them (`\x1b`).
fn escaped(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { format!("\\x{:02x}", c as u32) } else { c.to_string() }).collect()
}

#[test]
fn escape_sequences_and_cut_utf8_in_file_names_are_escaped_everywhere() {
    let dir = TestDir::new("sec-names");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let base = dir.path().to_str().unwrap().to_string();

    // The main script: an OSC title sequence with BEL, and a colour sequence.
    let main_name = "evil\x1b]0;pwned\x07\x1b[31m.py";
    let main = dir.path().join(main_name);
    // A module in a directory with an escape sequence and 200 bytes of
    // two-byte characters (a path longer than the common record: it comes
    // whole in the long one).
    let mut prefix = format!("{base}/evil\x1b[2J-");
    if (FILE_BYTES - prefix.len()).is_multiple_of(2) {
        prefix.push('x');
    }
    let mod_dir = PathBuf::from(format!("{prefix}{}", "é".repeat(100)));
    fs::create_dir(&mod_dir).unwrap();
    let module = mod_dir.join("evilmod.py");
    assert!(module.as_os_str().len() > pftrace_common::FILE_LEN + 8);
    let want_module_file = escaped(module.to_str().unwrap());
    // A function compiled with a file name longer than any path, which the
    // kernel cuts (at FILE_BYTES) inside a two-byte character: its name
    // arrives with a lone lead byte.
    let long_name = PathBuf::from(format!("{prefix}{}", "é".repeat(FILE_BYTES)));
    let cut = &long_name.as_os_str().as_bytes()[..FILE_BYTES];
    assert!(std::str::from_utf8(cut).is_err(), "the cut must fall inside a character");
    let whole_chars = (FILE_BYTES - prefix.len()) / 2;
    let want_cut_file = format!("{}{}\u{fffd}", escaped(&prefix), "é".repeat(whole_chars));
    let want_main_file = format!("{base}/evil\\x1b]0;pwned\\x07\\x1b[31m.py");

    write_script(
        &module,
        r#"
        def bar():
            pass
        "#,
    );
    let ready = dir.join("ready");
    let go = dir.join("go");
    write_script(
        &main,
        &format!(
            r#"
            import os, sys, time
            sys.path.insert(0, {mod_dir})
            import evilmod

            def foo():
                pass

            for _ in range(3):
                foo()
            for _ in range(2):
                evilmod.bar()
            ns = {{}}
            exec(compile("def baz():\n    pass\n", {long_name}, "exec"), ns)
            ns["baz"]()
            open({ready}, "w").close()
            deadline = time.time() + 30
            while not os.path.exists({go}) and time.time() < deadline:
                time.sleep(0.02)
            "#,
            mod_dir = py_str(&mod_dir),
            long_name = py_str(&long_name),
            ready = py_str(&ready),
            go = py_str(&go),
        ),
    );

    let socket = dir.join("pftraced.sock");
    let tracer = Pftraced::new(&dir, &["foo", "bar", "baz"])
        .arg("--socket")
        .arg(&socket)
        .launch(&[python().as_os_str(), main.as_os_str()])
        .spawn();
    let daemon = tracer.pid();
    let deadline = Instant::now() + WAIT;
    while !ready.exists() {
        assert!(Instant::now() < deadline && !exited(daemon), "the script did not get ready");
        thread::sleep(Duration::from_millis(20));
    }

    // pftracectl, while tracing: status, stats and dump.
    let status = ctl_checked(&socket, &["status"]);
    assert_no_controls("pftracectl status", &status.stdout);
    let status_text = text(&status.stdout);
    assert!(
        status_text.contains(&want_main_file),
        "status does not show the command escaped:\n{status_text}"
    );
    let stats = ctl_checked(&socket, &["stats"]);
    assert_no_controls("pftracectl stats", &stats.stdout);
    let stats_text = text(&stats.stdout);
    assert!(stats_text.contains(&want_main_file), "{stats_text}");
    assert!(stats_text.contains(&want_module_file), "{stats_text}");
    for format in ["chrome", "records", "pfw"] {
        let dump = ctl_checked(&socket, &["dump", "--format", format]);
        assert_no_controls(&format!("pftracectl dump --format {format}"), &dump.stdout);
        assert_no_controls("pftracectl dump's message", &dump.stderr);
        if format != "pfw" {
            let _: Value = serde_json::from_slice(&dump.stdout)
                .unwrap_or_else(|e| panic!("dump --format {format} is not JSON: {e}"));
        }
    }
    let st = ctl_checked(&socket, &["status", "--json"]);
    let st: Value = serde_json::from_slice(&st.stdout).unwrap();
    assert!(st["processes"][0]["command"].as_str().unwrap().ends_with(&want_main_file), "{st}");

    fs::write(&go, "").unwrap();
    let run = tracer.finish();
    run.assert_code(0);

    // The trace: JSON, names escaped, nothing raw.
    let raw = fs::read(&run.output).unwrap();
    assert_no_controls("the trace file", &raw);
    let _: Value = serde_json::from_slice(&raw).expect("the trace is JSON");
    let trace = run.trace();
    trace.assert_clean();
    let foo = trace.named("foo");
    assert_eq!(foo.len(), 3);
    assert!(foo.iter().all(|c| c.file == want_main_file), "{:?}", foo[0].file);
    // The file name arrives escaped, so it names no file the resolver may
    // read: unresolved, the category is the (escaped) file, never a guess.
    assert_eq!((foo[0].cat.as_str(), foo[0].module.as_deref()), (want_main_file.as_str(), None));
    let bar = trace.named("bar");
    assert_eq!(bar.len(), 2);
    assert!(bar.iter().all(|c| c.file == want_module_file), "{:?}\nwant {want_module_file:?}", bar[0].file);
    let baz = trace.named("baz");
    assert_eq!(baz.len(), 1);
    assert_eq!(baz[0].file, want_cut_file);
    // One record: the entry's. A return carries no file name, only the
    // address that pairs it (README, "Where a probe hit's time goes").
    assert_eq!(trace.pftrace()["file_names_cut"].as_u64(), Some(1), "{}", trace.pftrace());
    let raw_text = text(&raw);
    assert!(
        raw_text.contains(r#"evil\\x1b]0;pwned\\x07\\x1b[31m.py"#),
        "the JSON holds a literal backslash-x"
    );
    assert!(
        !raw_text.contains("\\u001b") && !raw_text.contains("\\u0007"),
        "JSON-escaped ESC/BEL in the trace"
    );

    // pftraced's own output: the summary names both files, escaped.
    assert_no_controls("pftraced's stderr", run.stderr.as_bytes());
    assert!(
        run.stderr.lines().any(|l| l.starts_with("foo ") && l.ends_with(&want_main_file)),
        "summary:\n{}",
        run.stderr
    );
    assert!(
        run.stderr.lines().any(|l| l.starts_with("bar ") && l.ends_with(&want_module_file)),
        "summary:\n{}",
        run.stderr
    );
    assert!(
        run.stderr.lines().any(|l| l.starts_with("baz ") && l.ends_with(&want_cut_file)),
        "summary:\n{}",
        run.stderr
    );
}

#[test]
fn an_interpreter_under_a_path_with_an_escape_sequence_is_shown_escaped() {
    let dir = TestDir::new("sec-binary");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let py = python();
    let bin_dir = dir.join("bin\x1b[2J\x1b]0;pwned\x07");
    fs::create_dir(&bin_dir).unwrap();
    let evil_py = bin_dir.join(py.file_name().unwrap());
    // A hard link: the same interpreter (inode), reached by another name.
    fs::hard_link(&py, &evil_py)
        .unwrap_or_else(|e| panic!("linking {} to {}: {e}", py.display(), evil_py.display()));
    let home = py.parent().unwrap().parent().unwrap();
    let script = worker_script(&dir);
    let mut cmd = Command::new(&evil_py);
    cmd.arg(&script)
        .env("PYTHONHOME", home)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut guard = Guard::spawn(&mut cmd, false);
    let pid = guard.pid();
    let mut stdin = guard.child.stdin.take().unwrap();
    let mut stdout = BufReader::new(guard.child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    assert_eq!(fs::read_link(format!("/proc/{pid}/exe")).unwrap(), evil_py);

    let want = escaped(evil_py.to_str().unwrap());
    assert!(want.contains("\\x1b[2J\\x1b]0;pwned\\x07"), "{want}");
    let socket = dir.join("pftraced.sock");
    let tracer = Pftraced::new(&dir, &["foo"]).pid(pid).arg("--socket").arg(&socket).spawn();
    let daemon = tracer.pid();
    let attached = tracer.wait_attached(pid);
    assert_no_controls("the `attached` line", attached.as_bytes());
    assert_eq!(attached, format!("pftraced: attached to pid {pid} (CPython 3.9, {want}), tracing foo"));
    wait_status(&socket, daemon, "the control socket", |_| true);
    writeln!(stdin, "call foo 5").unwrap();
    line.clear();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "done\n");
    let st = wait_status(&socket, daemon, "5 calls", |s| s["calls_total"] == 5);
    assert_eq!(st["binaries"][0]["path"], want.as_str(), "{st}");
    assert_eq!(st["processes"][0]["binary"], want.as_str(), "{st}");
    assert!(st["processes"][0]["command"].as_str().unwrap().starts_with(&want), "{st}");
    let status = ctl_checked(&socket, &["status"]);
    assert_no_controls("pftracectl status", &status.stdout);
    assert!(
        text(&status.stdout).contains(&format!("  {want}  CPython 3.9  1 processes")),
        "{}",
        text(&status.stdout)
    );

    drop(stdin);
    guard.wait(WAIT, "the worker");
    let run = tracer.finish();
    run.assert_code(0);
    assert_no_controls("pftraced's stderr", run.stderr.as_bytes());
    let raw = fs::read(&run.output).unwrap();
    assert_no_controls("the trace file", &raw);
    let trace = run.trace();
    trace.assert_clean();
    assert_eq!(trace.named("foo").len(), 5);
    let procs = trace.pftrace()["processes"].as_array().unwrap();
    assert_eq!(procs[0]["binary"], want.as_str(), "{}", trace.pftrace());
}

// ---------------------------------------------------------------------------
// c. Nothing pinned, nothing left

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else { return false };
    // SAFETY: statfs fills the zeroed struct; c is a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

/// Every bpffs mount on the host and the entries in them (recursively).
fn bpffs_entries() -> (Vec<String>, Vec<PathBuf>) {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mounts: Vec<String> = info
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            (post.split_whitespace().next() == Some("bpf"))
                .then(|| pre.split_whitespace().nth(4).map(String::from))?
        })
        .collect();
    let mut entries = Vec::new();
    let mut stack: Vec<PathBuf> = mounts.iter().map(PathBuf::from).collect();
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            }
            entries.push(e.path());
        }
    }
    entries.sort();
    (mounts, entries)
}

/// BPF object ids (programs, maps, links) `pid` holds fds of.
fn bpf_ids(pid: u32) -> Vec<(&'static str, u32)> {
    let mut ids = Vec::new();
    for e in fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap().flatten() {
        let Ok(info) = fs::read_to_string(e.path()) else { continue };
        for l in info.lines() {
            let Some((k, v)) = l.split_once(':') else { continue };
            let kind = match k {
                "prog_id" => "prog",
                "map_id" => "map",
                "link_id" => "link",
                _ => continue,
            };
            if let Ok(id) = v.trim().parse() {
                ids.push((kind, id));
            }
        }
    }
    ids.sort();
    ids.dedup();
    ids
}

/// Whether the BPF object `kind` ("prog", "map" or "link") with this id still exists.
fn bpf_kind_exists(kind: &str, id: u32) -> bool {
    let cmd = match kind {
        "prog" => BPF_PROG_GET_FD_BY_ID,
        "map" => BPF_MAP_GET_FD_BY_ID,
        _ => BPF_LINK_GET_FD_BY_ID,
    };
    bpf_object_exists(cmd, id)
}

/// A bpffs mounted at /sys/fs/bpf for one test (where aya and libbpf pin
/// by default), when none is there; unmounted on drop.
struct BpffsMount(Option<std::ffi::CString>);

impl BpffsMount {
    fn ensure() -> Self {
        let at = Path::new("/sys/fs/bpf");
        if is_bpffs(at) {
            return Self(None);
        }
        let c = |s: &str| std::ffi::CString::new(s).unwrap();
        let target = c("/sys/fs/bpf");
        // SAFETY: valid C strings for the duration of the call.
        let rc = unsafe {
            libc::mount(
                c("bpf").as_ptr(),
                target.as_ptr(),
                c("bpf").as_ptr(),
                0,
                c("mode=0700").as_ptr().cast(),
            )
        };
        assert_eq!(rc, 0, "mounting a bpffs at /sys/fs/bpf: {}", std::io::Error::last_os_error());
        assert!(is_bpffs(at));
        Self(Some(target))
    }
}

impl Drop for BpffsMount {
    fn drop(&mut self) {
        if let Some(target) = &self.0 {
            // SAFETY: a valid C string.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

#[test]
fn no_bpf_object_is_pinned_or_outlives_the_daemon() {
    let dir = TestDir::new("sec-pin");
    let mounted = BpffsMount::ensure();
    let (mounts, before) = bpffs_entries();
    assert!(mounts.iter().any(|m| m == "/sys/fs/bpf"), "bpffs mounts: {mounts:?}");
    eprintln!(
        "bpffs mounts: {mounts:?} ({}); entries before: {}",
        if mounted.0.is_some() { "/sys/fs/bpf mounted for this test" } else { "already there" },
        before.len()
    );
    let (mut w, socket, tracer) = traced_worker(&dir, &["foo"], &[]);
    let daemon = tracer.pid();
    w.call("foo", 10);
    wait_status(&socket, daemon, "10 calls", |s| s["calls_total"] == 10);

    let ids = bpf_ids(daemon);
    for kind in ["prog", "map", "link"] {
        assert!(ids.iter().any(|(k, _)| *k == kind), "pftraced holds no BPF {kind}: {ids:?}");
    }
    // Nothing under a bpffs is open in the daemon, and no new entry appeared in one.
    for e in fs::read_dir(format!("/proc/{daemon}/fd")).unwrap().flatten() {
        let target = fs::read_link(e.path()).unwrap_or_default();
        assert!(
            !mounts.iter().any(|m| target.starts_with(m)),
            "pftraced has {} open under a bpffs",
            target.display()
        );
    }
    assert_eq!(bpffs_entries().1, before, "entries appeared in a bpffs while pftraced ran");

    let run = stop(&socket, tracer);
    run.trace().assert_clean();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let alive: Vec<_> = ids.iter().filter(|(k, id)| bpf_kind_exists(k, *id)).collect();
        if alive.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "BPF objects of pftraced outlived it (pinned or leaked): {alive:?}"
        );
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(bpffs_entries().1, before, "entries left in a bpffs");
    drop(mounted);
    let (status, _) = w.wait(WAIT);
    assert!(status.success());
    eprintln!("{} BPF objects of pftraced freed: {ids:?}", ids.len());
}

// ---------------------------------------------------------------------------
// d. dump streams; the daemon writes no file for it

/// Sends one raw request line and returns the reply line.
fn raw_request(socket: &Path, line: &str) -> Value {
    let mut s = UnixStream::connect(socket).unwrap();
    s.write_all(line.as_bytes()).unwrap();
    s.write_all(b"\n").unwrap();
    let mut reply = String::new();
    BufReader::new(&s).read_line(&mut reply).unwrap();
    serde_json::from_str(&reply).unwrap_or_else(|e| panic!("reply {reply:?} is not JSON: {e}"))
}

#[test]
fn dump_streams_over_the_socket_and_cannot_make_the_daemon_write_a_file() {
    let dir = TestDir::new("sec-dump");
    // The daemon runs in `dir`; pftracectl in `client`.
    let client = dir.join("client");
    fs::create_dir(&client).unwrap();
    let elsewhere = dir.join("elsewhere");

    // The help: every option of dump, and -o is pftracectl's own file.
    let help = Command::new(PFTRACECTL).args(["dump", "--help"]).output().unwrap();
    assert!(help.status.success());
    let help = text(&help.stdout);
    let lines: Vec<&str> = help.lines().map(str::trim).collect();
    let mut options: Vec<&str> = lines
        .iter()
        .filter(|l| l.starts_with('-'))
        .filter_map(|l| l.split([' ', ',', '=']).find(|w| w.starts_with("--")))
        .collect();
    options.sort();
    assert_eq!(
        options,
        ["--format", "--function", "--help", "--output", "--pfw-options", "--pid", "--since", "--socket"],
        "{help}"
    );
    let o = lines.iter().position(|l| *l == "-o, --output <FILE>").unwrap_or_else(|| panic!("{help}"));
    assert_eq!(lines[o + 1], "Write to FILE instead of stdout", "{help}");
    assert!(
        help.starts_with("Write the trace so far (Chrome Trace Event JSON by default) to stdout"),
        "{help}"
    );

    let (mut w, socket, tracer) = traced_worker(&dir, &["foo"], &[]);
    let daemon = tracer.pid();
    w.call("foo", 7);
    wait_status(&socket, daemon, "7 calls", |s| s["calls_total"] == 7);
    let listing = |d: &Path| -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(d)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let daemon_dir_before = listing(dir.path());

    // To stdout: the trace, and the message on stderr.
    let out = Command::new(PFTRACECTL)
        .arg("--socket")
        .arg(&socket)
        .arg("dump")
        .current_dir(&client)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let trace = Trace::parse(&text(&out.stdout)).unwrap();
    assert_eq!(trace.named("foo").len(), 7);
    let msg = text(&out.stderr);
    assert!(
        msg.starts_with("pftracectl: wrote 7 calls (") && msg.ends_with(", chrome) to stdout\n"),
        "{msg}"
    );

    // -o with a relative path: written by pftracectl, in its own directory.
    let out = Command::new(PFTRACECTL)
        .arg("--socket")
        .arg(&socket)
        .args(["dump", "-o", "mine.json"])
        .current_dir(&client)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(out.stdout.is_empty());
    assert_eq!(Trace::parse(&fs::read_to_string(client.join("mine.json")).unwrap()).unwrap().calls.len(), 7);
    assert_eq!(listing(&client), ["mine.json"]);
    // pftracectl runs as root here too, so show the file is not the daemon's:
    // the daemon's working directory did not get it.
    assert_eq!(listing(dir.path()), daemon_dir_before);

    // The protocol has no field naming a path: such requests are refused.
    let target = elsewhere.join("x.json");
    for field in ["output", "path", "file", "out_dir"] {
        let line =
            format!(r#"{{"version":2,"command":{{"cmd":"dump","{field}":{:?}}}}}"#, target.to_str().unwrap());
        let reply = raw_request(&socket, &line);
        assert_eq!(reply["ok"], false, "{line} -> {reply}");
        let err = reply["error"].as_str().unwrap();
        assert!(err.contains(&format!("unknown field `{field}`")), "{line} -> {err}");
    }
    // PerfFlowAspect's log-dir option is ignored by dump: the bytes stream back.
    let out = ctl_checked(
        &socket,
        &["dump", "--format", "pfw", "--pfw-options", &format!("log-dir={}", elsewhere.display())],
    );
    let pfw = text(&out.stdout);
    assert_eq!(
        pfw.matches(r#""name": "foo", "cat": "__main__""#).count(),
        28,
        "B, E and two C of 7 calls: {pfw}"
    );
    assert_eq!(pfw.matches(r#""ph": "B""#).count(), 7, "{pfw}");
    let reply = raw_request(
        &socket,
        &format!(
            r#"{{"version":2,"command":{{"cmd":"dump","format":"pfw:log-dir={}"}}}}"#,
            elsewhere.display()
        ),
    );
    assert_eq!(reply["ok"], true, "{reply}");
    assert!(!elsewhere.exists(), "the daemon created {}", elsewhere.display());
    assert_eq!(listing(dir.path()), daemon_dir_before);

    let run = stop(&socket, tracer);
    assert_eq!(run.trace().named("foo").len(), 7);
    let (status, _) = w.wait(WAIT);
    assert!(status.success());
    assert!(!elsewhere.exists());
}
