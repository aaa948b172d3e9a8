//! The files pftraced writes, on a node where other users are hostile or
//! careless (the README's "Files pftraced writes"):
//!
//! a. Names planted by another user. An unprivileged user made by the test
//!    plants, in a world-writable sticky directory (with the kernel's
//!    `fs.protected_symlinks` off, as on systems that turn it off), symbolic
//!    links to a root-only file at the names pftraced will write (the
//!    default `pftrace-<pid>.json`, an `-o` file, a PerfFlowAspect file), a
//!    link in place of an `--output-dir`, a regular file of theirs at an `-o`
//!    name, and links at the names of the rolling files: pftraced refuses the
//!    first five before attaching, skips the rolling names, and the root
//!    file is never touched.
//! b. Output problems found before the job runs: `-o /dev/full`, a FIFO, a
//!    missing directory, a place the kernel will not let anyone create a
//!    file in, a PerfFlowAspect directory that is a file: refused before a
//!    launched command runs (its marker file never appears) or a `--pid`
//!    target is attached, exit status 1, and never blocking on the FIFO.
//! c. A disk that is full when the trace is written: the error names the
//!    file that holds every call, and that file has them all.
//!
//! A launch run's trace beyond `limits.max_calls_in_memory` is in
//! tests/it/launch.rs.

use std::{
    ffi::OsStr,
    fs,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::common::*;
use serde_json::Value;

/// How long a refusal may take: it comes before anything is attached.
const REFUSAL_WITHIN: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// An unprivileged user, and the kernel's symlink protection turned off

/// A user made for one test with `useradd`, removed (with its group) on drop.
struct TestUser {
    name: String,
    uid: u32,
}

impl TestUser {
    fn create(tag: &str) -> Self {
        require_tool("useradd", "passwd");
        require_tool("runuser", "util-linux");
        let name = format!("pft-{tag}-{}", std::process::id());
        let _ = Command::new("userdel").arg(&name).stderr(Stdio::null()).status();
        let made = Command::new("useradd")
            .args(["--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin"])
            .arg(&name)
            .output()
            .expect("running useradd");
        assert!(made.status.success(), "useradd {name}: {}", String::from_utf8_lossy(&made.stderr));
        let id = Command::new("id").args(["-u", &name]).output().expect("running id");
        let uid = String::from_utf8_lossy(&id.stdout).trim().parse().expect("a numeric uid");
        Self { name, uid }
    }

    /// `runuser -u USER -- ARGS...`, ready to run.
    fn command<S: AsRef<OsStr>>(&self, args: &[S]) -> Command {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", &self.name, "--"]).args(args).current_dir("/");
        cmd
    }

    /// Runs a shell command line as this user; panics if it fails.
    fn sh(&self, script: &str) {
        let out = self.command(&["/bin/sh", "-c", script]).output().expect("running runuser");
        assert!(out.status.success(), "as {}: {script}: {}", self.name, String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).status();
    }
}

/// A sysctl set for one test, restored on drop.
struct Sysctl {
    path: PathBuf,
    old: String,
}

impl Sysctl {
    fn set(path: &str, value: &str) -> Self {
        let old = fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
        fs::write(path, value).unwrap_or_else(|e| panic!("setting {path} to {value}: {e}"));
        Self { path: path.into(), old }
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let _ = fs::write(&self.path, self.old.trim());
    }
}

// ---------------------------------------------------------------------------
// Running pftraced with exactly the arguments given (the harness's runner
// always adds its own `-o`)

struct Run {
    status: ExitStatus,
    stderr: String,
    elapsed: Duration,
    shown: String,
}

impl Run {
    /// Asserts a refusal: exit status 1 within [`REFUSAL_WITHIN`], nothing
    /// attached, and a `pftraced: error:` line holding every one of `parts`.
    fn refused(&self, parts: &[&str]) -> String {
        let describe = || format!("{}\nexit status: {}\nstderr:\n{}", self.shown, self.status, self.stderr);
        assert_eq!(self.status.code(), Some(1), "pftraced should have refused:\n{}", describe());
        assert!(self.elapsed < REFUSAL_WITHIN, "the refusal took {:?}:\n{}", self.elapsed, describe());
        assert!(
            !self.stderr.contains("attached to pid"),
            "pftraced attached before refusing:\n{}",
            describe()
        );
        let msg = self
            .stderr
            .lines()
            .find_map(|l| l.strip_prefix("pftraced: error: "))
            .unwrap_or_else(|| panic!("no `pftraced: error:` line:\n{}", describe()))
            .to_string();
        for part in parts {
            assert!(msg.contains(part), "the error message lacks {part:?}:\n  {msg}\n{}", describe());
        }
        msg
    }
}

/// Starts pftraced in `cwd`; its stderr goes to `stderr`.
fn start<S: AsRef<OsStr>>(cwd: &Path, stderr: &Path, args: &[S]) -> (Guard, String) {
    let mut cmd = Command::new(PFTRACED);
    cmd.args(args)
        .current_dir(cwd)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(stderr).unwrap());
    let shown = format!("{cmd:?}");
    (Guard::spawn(&mut cmd, true), shown)
}

/// Runs pftraced in `cwd` to its end (at most [`RUN_TIMEOUT`]).
fn run<S: AsRef<OsStr>>(dir: &TestDir, cwd: &Path, args: &[S]) -> Run {
    let stderr = dir.join("pftraced.stderr");
    let started = Instant::now();
    let (mut guard, shown) = start(cwd, &stderr, args);
    let status = guard.wait(RUN_TIMEOUT, &shown);
    Run { status, stderr: fs::read_to_string(&stderr).unwrap(), elapsed: started.elapsed(), shown }
}

/// Makes directory `path` with exactly `mode` (the umask aside).
fn make_dir(path: PathBuf, mode: u32) -> PathBuf {
    fs::create_dir(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
    path
}

fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname").trim().to_string()
}

/// A Python job of the test user: prints its pid, then calls `foo` each
/// time `go` appears in its directory (removing it), until `stop` appears.
const JOB: &str = r#"
    import os, sys, time

    def foo():
        pass

    print(os.getpid(), flush=True)
    deadline = time.time() + 120
    while not os.path.exists("stop") and time.time() < deadline:
        if os.path.exists("go"):
            os.remove("go")
            for _ in range(200):
                foo()
            print("called", flush=True)
        time.sleep(0.01)
"#;

/// The job, started as `user` in `dir`; returns it and its pid.
fn start_job(user: &TestUser, dir: &Path) -> (Guard, u32) {
    let script = write_script(&dir.join("job.py"), JOB);
    let mut cmd = user.command(&[python().as_os_str(), script.as_os_str()]);
    cmd.current_dir(dir).stdout(Stdio::piped());
    let mut guard = Guard::spawn(&mut cmd, true);
    let mut out = std::io::BufReader::new(guard.child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    let pid = line.trim().parse().unwrap_or_else(|_| panic!("the job printed {line:?}, not its pid"));
    (guard, pid)
}

// ---------------------------------------------------------------------------
// a. Names planted by another user

#[test]
fn names_planted_by_another_user_are_refused_and_the_root_file_is_untouched() {
    let _serial = serial();
    let dir = TestDir::new("files-planted");
    let _sysctl = Sysctl::set("/proc/sys/fs/protected_symlinks", "0");
    let user = TestUser::create("plant");
    // A root-only file and directory: what the links lead to.
    let private = make_dir(dir.join("root-only"), 0o700);
    let victim = private.join("precious");
    fs::write(&victim, "root's own content\n").unwrap();
    let victim_inode = fs::metadata(&victim).unwrap().ino();
    // A /tmp-like directory: world-writable, sticky.
    let shared = make_dir(dir.join("shared"), 0o1777);

    let (mut job, pid) = start_job(&user, &shared);
    let host = hostname();
    let v = victim.display();
    user.sh(&format!(
        "cd {} && ln -s {v} pftrace-{pid}.json && ln -s {v} planted.json && ln -s {v} perfflow.array.{host}.{pid}.pfw \
         && ln -s {} out && echo theirs > theirs.json",
        shared.display(),
        private.display()
    ));
    let pid_arg = pid.to_string();
    let link =
        "exists and is a symbolic link; pftraced writes only regular files: remove it or choose another name";

    // The issue's case: the default name, in the current directory.
    let r = run(&dir, &shared, &["-t", "foo", "--pid", &pid_arg]);
    r.refused(&[&format!("cannot write the trace to pftrace-{pid}.json: pftrace-{pid}.json {link}")]);
    // -o naming a planted link.
    let planted = shared.join("planted.json");
    let r = run(&dir, &shared, &["-t", "foo", "--pid", &pid_arg, "-o", planted.to_str().unwrap()]);
    r.refused(&[&format!("cannot write the trace to {0}: {0} {link}", planted.display())]);
    // The PerfFlowAspect file of the traced process (default directory: here).
    let r = run(&dir, &shared, &["-t", "foo", "--pid", &pid_arg, "--format", "pfw"]);
    r.refused(&[&format!("perfflow.array.{host}.{pid}.pfw {link}")]);
    // --output-dir replaced by a link to a root-only directory.
    let out = shared.join("out");
    let r = run(&dir, &shared, &["-t", "foo", "--pid", &pid_arg, "--output-dir", out.to_str().unwrap()]);
    r.refused(&[&format!(
        "output directory {0}: {0} is a symbolic link owned by uid {1} in a directory other users can write; \
         pftraced does not follow such links",
        out.display(),
        user.uid
    )]);
    // A regular file of the user's at the -o name.
    let theirs = shared.join("theirs.json");
    let r = run(&dir, &shared, &["-t", "foo", "--pid", &pid_arg, "-o", theirs.to_str().unwrap()]);
    r.refused(&[&format!(
        "{} exists and belongs to uid {}, not to you (uid 0); pftraced replaces only files you own",
        theirs.display(),
        user.uid
    )]);

    assert_eq!(fs::read_to_string(&victim).unwrap(), "root's own content\n", "the root file was written");
    assert_eq!(fs::metadata(&victim).unwrap().ino(), victim_inode, "the root file was replaced");
    assert_eq!(fs::read_dir(&private).unwrap().count(), 1, "files appeared in the root-only directory");
    assert_eq!(fs::read_to_string(&theirs).unwrap(), "theirs\n");
    for name in [format!("pftrace-{pid}.json"), "planted.json".into(), "out".into()] {
        assert!(
            fs::symlink_metadata(shared.join(&name)).unwrap().file_type().is_symlink(),
            "{name} was removed"
        );
    }
    fs::write(shared.join("stop"), "").unwrap();
    job.wait(Duration::from_secs(30), "the job");
}

#[test]
fn rolling_files_skip_names_planted_by_another_user() {
    let _serial = serial();
    let dir = TestDir::new("files-rolling");
    let _sysctl = Sysctl::set("/proc/sys/fs/protected_symlinks", "0");
    let user = TestUser::create("roll");
    let victim = dir.join("precious");
    fs::write(&victim, "root's own content\n").unwrap();
    let shared = make_dir(dir.join("shared"), 0o1777);
    let rolling = make_dir(shared.join("rolling"), 0o1777);

    let (mut job, pid) = start_job(&user, &shared);
    let trace = dir.join("trace.json");
    let stderr = dir.join("pftraced.stderr");
    let pid_arg = pid.to_string();
    let before = std::time::SystemTime::now();
    let (mut tracer, shown) = start(
        dir.path(),
        &stderr,
        &[
            "-t",
            "foo",
            "--pid",
            &pid_arg,
            "-o",
            trace.to_str().unwrap(),
            "--output-dir",
            rolling.to_str().unwrap(),
        ],
    );
    let deadline = Instant::now() + LINE_TIMEOUT;
    while !fs::read_to_string(&stderr).unwrap().contains("attached to pid") {
        assert!(
            Instant::now() < deadline && tracer.try_wait().is_none(),
            "{shown}: {}",
            fs::read_to_string(&stderr).unwrap()
        );
        thread::sleep(Duration::from_millis(20));
    }
    // Every name the first three files could have, for each second since
    // just before pftraced started: pftrace-<host>-<pid>-<UTC start>-<seq>.json.
    let host: String = hostname()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '_' { c } else { '_' })
        .collect();
    let epoch = |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let mut plant = String::from("set -e");
    for secs in epoch(before) - 1..=epoch(std::time::SystemTime::now()) {
        let stamp =
            Command::new("date").args(["-u", "-d", &format!("@{secs}"), "+%Y%m%dT%H%M%S"]).output().unwrap();
        let stamp = String::from_utf8(stamp.stdout).unwrap();
        for seq in 1..=3 {
            let name = format!("pftrace-{host}-{}-{}-{seq:04}.json", tracer.pid(), stamp.trim());
            plant.push_str(&format!("; ln -s {} {}", victim.display(), rolling.join(name).display()));
        }
    }
    user.sh(&plant);
    // The job removes `go` once it has called: the user makes it (in a sticky
    // directory only its owner may remove it).
    user.sh(&format!("touch {}", shared.join("go").display()));
    let deadline = Instant::now() + LINE_TIMEOUT;
    while shared.join("go").exists() {
        assert!(Instant::now() < deadline, "the job did not call foo");
        thread::sleep(Duration::from_millis(20));
    }
    fs::write(shared.join("stop"), "").unwrap();
    job.wait(Duration::from_secs(30), "the job");
    let status = tracer.wait(RUN_TIMEOUT, &shown);
    let stderr = fs::read_to_string(&stderr).unwrap();
    assert!(status.success(), "{shown}: {status}\n{stderr}");

    assert_eq!(fs::read_to_string(&victim).unwrap(), "root's own content\n", "the root file was written");
    let mut files = Vec::new();
    let mut links = 0;
    for entry in fs::read_dir(&rolling).unwrap() {
        let path = entry.unwrap().path();
        let meta = fs::symlink_metadata(&path).unwrap();
        if meta.file_type().is_symlink() {
            links += 1;
        } else {
            assert!(meta.is_file() && meta.uid() == 0, "{}: {meta:?}", path.display());
            assert!(
                path.to_str().unwrap().ends_with("-0004.json"),
                "{} reuses a planted number",
                path.display()
            );
            files.push(path);
        }
    }
    assert!(links >= 3, "{links} links planted");
    assert_eq!(files.len(), 1, "{files:?}");
    let events: Value = serde_json::from_str(&fs::read_to_string(&files[0]).unwrap()).unwrap();
    let calls = events.as_array().unwrap().iter().filter(|e| e["ph"] == "X").count();
    assert_eq!(calls, 200, "calls in the rolling file\n{stderr}");
}

// ---------------------------------------------------------------------------
// b. Output problems found before the job runs

/// Python code that proves whether the command ran: it creates `marker`.
fn marker_code(marker: &Path) -> String {
    format!("open({:?}, 'w').close()", marker.to_str().unwrap())
}

/// `pftraced -t foo [ARGS] -o OUTPUT -- python -c <create marker>`, asserted
/// refused with `parts` before the command ran.
fn refused_at_launch(dir: &TestDir, output: &Path, extra: &[&str], parts: &[&str]) -> String {
    let marker = dir.join("ran");
    let code = marker_code(&marker);
    let py = python();
    let mut args: Vec<&OsStr> = vec!["-t".as_ref(), "foo".as_ref(), "-o".as_ref(), output.as_os_str()];
    args.extend(extra.iter().map(OsStr::new));
    args.extend([OsStr::new("--"), py.as_os_str(), "-c".as_ref(), code.as_ref()]);
    let msg = run(dir, dir.path(), &args).refused(parts);
    assert!(
        msg.starts_with(&format!("cannot trace {py:?}; it was not run: cannot write the trace to ")),
        "{msg}"
    );
    assert!(!marker.exists(), "the command ran although its output was refused: {msg}");
    msg
}

#[test]
fn output_problems_are_refused_before_the_command_runs() {
    let dir = TestDir::new("files-early");
    let only_regular = "pftraced writes only regular files: remove it or choose another name";
    refused_at_launch(
        &dir,
        Path::new("/dev/full"),
        &[],
        &[&format!("/dev/full: /dev/full exists and is a character device; {only_regular}")],
    );
    let missing = dir.join("missing/trace.json");
    refused_at_launch(
        &dir,
        &missing,
        &[],
        &[&format!(
            "{}: directory {1}: {1} does not exist (create it, or give another path)",
            missing.display(),
            dir.join("missing").display()
        )],
    );
    // A FIFO is never opened: nothing blocks (refused within REFUSAL_WITHIN).
    let fifo = dir.join("fifo");
    let status = Command::new("mkfifo").arg(&fifo).status().expect("running mkfifo");
    assert!(status.success());
    refused_at_launch(
        &dir,
        &fifo,
        &[],
        &[&format!("{0}: {0} exists and is a FIFO; {only_regular}", fifo.display())],
    );
    // No one can create a file in /proc.
    refused_at_launch(
        &dir,
        Path::new("/proc/trace.json"),
        &[],
        &["/proc/trace.json: creating /proc/pftraced-"],
    );
    // PerfFlowAspect files go into a directory: a file there is refused.
    let file = dir.join("a-file");
    fs::write(&file, "").unwrap();
    refused_at_launch(
        &dir,
        &file,
        &["--format", "pfw"],
        &[&format!("directory {0}: {0} is a regular file, not a directory", file.display())],
    );
    assert_eq!(fs::read(&file).unwrap(), b"");
}

#[test]
fn output_problems_are_refused_before_a_pid_is_attached() {
    let dir = TestDir::new("files-early-pid");
    let mut py = PyProcess::spawn(&python(), &dir.script("job.py", JOB), &[]);
    let pid = py.read_line();
    let r = run(&dir, dir.path(), &["-t", "foo", "--pid", &pid, "-o", "/dev/full"]);
    let msg = r.refused(&["cannot write the trace to /dev/full: /dev/full exists and is a character device"]);
    assert!(!msg.contains("it was not run"), "{msg}");
    // The process was left alone: it ends normally when told to.
    fs::write(dir.join("stop"), "").unwrap();
    let (status, _) = py.wait(Duration::from_secs(30));
    assert!(status.success(), "the process was disturbed: {status}");
}

// ---------------------------------------------------------------------------
// c. A full disk when the trace is written

#[test]
fn a_full_disk_at_the_end_names_the_file_holding_every_call() {
    let _serial = serial();
    let dir = TestDir::new("files-full");
    let small = dir.join("small");
    let _mount = Tmpfs::mount(&small, "4m");
    // 3,000 calls, a pause so pftraced has written them to its spill (it
    // flushes every second), then the disk is filled.
    let script = dir.script(
        "work.py",
        r#"
        import sys, time

        def foo(i):
            return i

        for i in range(3000):
            foo(i)
        time.sleep(2.5)
        with open(sys.argv[1], "wb") as f:
            try:
                while True:
                    f.write(b"x" * 4096)
                    f.flush()
            except OSError:
                pass
        "#,
    );
    let output = small.join("trace.json");
    let py = python();
    let filler = small.join("filler");
    let args: Vec<&OsStr> = vec![
        "-t".as_ref(),
        "foo".as_ref(),
        "-o".as_ref(),
        output.as_os_str(),
        "--".as_ref(),
        py.as_os_str(),
        script.as_os_str(),
        filler.as_os_str(),
    ];
    let r = run(&dir, dir.path(), &args);
    assert_eq!(r.status.code(), Some(1), "{}\n{}", r.shown, r.stderr);
    let msg = r
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("pftraced: error: "))
        .unwrap_or_else(|| panic!("{}", r.stderr));
    let head = format!(
        "writing {}: No space left on device (os error 28); every call (3000) is kept in ",
        output.display()
    );
    assert!(msg.starts_with(&head), "{msg}");
    let spill = PathBuf::from(msg[head.len()..].split("; `pftracectl calls").next().unwrap());
    assert_eq!(spill.parent(), Some(small.as_path()), "{msg}");
    let tail = format!(
        "; `pftracectl calls {}` prints them as JSON lines (see the README, \"Files pftraced writes\")",
        spill.display()
    );
    assert!(msg.ends_with(&tail), "{msg}");
    // The spill has every call, which pftracectl prints; no trace file and
    // no temporary file are left.
    let printed = std::process::Command::new(env!("CARGO_BIN_EXE_pftracectl"))
        .arg("calls")
        .arg(&spill)
        .output()
        .unwrap();
    assert!(printed.status.success(), "{}", String::from_utf8_lossy(&printed.stderr));
    let text = String::from_utf8(printed.stdout).unwrap();
    let calls: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(calls.len(), 3000);
    assert!(calls.iter().all(|c| c["name"] == "foo"
        && c["incomplete"] == false
        && c["end_ns"].as_u64() >= c["start_ns"].as_u64()));
    let mut names: Vec<String> =
        fs::read_dir(&small).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["filler".to_string(), spill.file_name().unwrap().to_str().unwrap().to_string()]);
}
