//! The control socket end to end: a real `ControlServer` on a real socket in
//! a tokio runtime, answered by a fake daemon (only the daemon's state is
//! stubbed), driven by raw clients and by the `pftracectl` binary —
//! including malformed requests, floods and non-root peers. Runs as root.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::{fs::MetadataExt as _, fs::PermissionsExt as _, net::UnixStream},
    path::{Path, PathBuf},
    process::{Command as Process, Output},
    thread,
    time::Duration,
};

use pftrace::{
    config::SocketConfig,
    control::{ControlError, ControlRequest, ControlServer, Handled},
    protocol::{Command, DumpHeader, FunctionStats, NamesReply, Status},
};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

/// A fresh directory (mode 0755, so other users can reach a socket in it),
/// removed when dropped.
struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn temp_dir(name: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!("pftrace-ctl-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    TempDir(dir)
}

/// What the fake daemon answers.
fn answer(req: ControlRequest) {
    let peer = json!({"uid": req.peer.uid, "gid": req.peer.gid, "pid": req.peer.pid});
    let handled = match req.command {
        Command::Status {} => {
            let status = Status {
                daemon_pid: 4242,
                daemon_version: "9.9.9".into(),
                names: vec!["compute".into()],
                ..Default::default()
            };
            let mut value = serde_json::to_value(status).unwrap();
            value["peer"] = peer;
            Handled::Json(value)
        }
        Command::Dump { format: Some(f), .. } if f != "chrome" => {
            Handled::Error(format!("unknown dump format {f:?}; known formats: chrome"))
        }
        Command::Dump { filter, .. } => {
            let body = serde_json::to_vec(&json!([{"filter": filter}])).unwrap();
            Handled::Dump { header: DumpHeader { format: "chrome".into(), bytes: 0, calls: 2 }, bytes: body }
        }
        Command::Stats { filter, per_pid } => {
            let row = FunctionStats {
                function: filter.function.unwrap_or_else(|| "compute".into()),
                file: "/srv/app.py".into(),
                pid: per_pid.then_some(42),
                calls: 3,
                incomplete: 1,
                total_ns: 3_000_000,
                mean_ns: 1_000_000,
                p50_ns: 900_000,
                p95_ns: 1_100_000,
                p99_ns: 1_100_000,
                max_ns: 1_100_000,
            };
            Handled::Json(serde_json::to_value(vec![row]).unwrap())
        }
        Command::Add { names } if names.iter().any(|n| n == "drop-me") => return, // never answered
        Command::Add { names } => {
            let all = ["compute".to_string()].into_iter().chain(names).collect();
            Handled::Json(serde_json::to_value(NamesReply { names: all }).unwrap())
        }
        Command::Remove { names } => Handled::Error(format!("not traced: {}", names.join(", "))),
        Command::Clear {} => Handled::Json(json!({"cleared": 7})),
        Command::Stop {} => Handled::Json(json!({"stopping": true})),
    };
    let _ = req.reply.send(handled);
}

/// A ControlServer in its own runtime thread with the fake daemon behind it.
struct FakeDaemon {
    path: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl FakeDaemon {
    fn start(cfg: SocketConfig, tune: fn(ControlServer) -> ControlServer) -> Result<Self, ControlError> {
        let path = cfg.path.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
        let thread = thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let server = match ControlServer::bind(&cfg) {
                    Ok(server) => tune(server),
                    Err(e) => return ready_tx.send(Err(e)).unwrap(),
                };
                ready_tx.send(Ok(())).unwrap();
                let (tx, mut rx) = mpsc::channel(16);
                let accept = server.spawn(tx);
                loop {
                    tokio::select! {
                        Some(req) = rx.recv() => answer(req),
                        _ = &mut stop_rx => break,
                    }
                }
                accept.abort();
                let _ = accept.await; // the server is dropped: its socket file goes
            });
        });
        ready_rx.recv().unwrap()?;
        Ok(Self { path, stop: Some(stop_tx), thread: Some(thread) })
    }

    fn default_in(dir: &Path) -> Self {
        Self::start(SocketConfig { path: dir.join("pftraced.sock"), group: None }, |s| s).unwrap()
    }
}

impl Drop for FakeDaemon {
    fn drop(&mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        let _ = self.thread.take().map(thread::JoinHandle::join);
    }
}

/// Sends raw bytes, optionally half-closes, returns the first reply line.
fn raw(path: &Path, bytes: &[u8], half_close: bool) -> String {
    let mut stream = UnixStream::connect(path).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = stream.write_all(bytes); // may fail once the server has answered and closed
    if half_close {
        let _ = stream.shutdown(std::net::Shutdown::Write);
    }
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).unwrap();
    line
}

fn error_of(line: &str) -> String {
    let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    assert_eq!((v["version"].as_u64(), v["ok"].as_bool()), (Some(1), Some(false)), "{line}");
    v["error"].as_str().unwrap().to_string()
}

const STATUS: &[u8] = b"{\"version\":1,\"command\":{\"cmd\":\"status\"}}\n";

fn status_ok(path: &Path) {
    let v: Value = serde_json::from_str(&raw(path, STATUS, false)).unwrap();
    assert_eq!((v["ok"].as_bool(), v["result"]["daemon_pid"].as_u64()), (Some(true), Some(4242)), "{v}");
}

fn ctl(socket: &Path, args: &[&str]) -> Output {
    Process::new(env!("CARGO_BIN_EXE_pftracectl")).arg("--socket").arg(socket).args(args).output().unwrap()
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

#[test]
fn bad_requests_get_error_replies_and_the_server_carries_on() {
    let dir = temp_dir("bad");
    let daemon = FakeDaemon::default_in(&dir);
    let p = &daemon.path;

    let e = error_of(&raw(p, b"this is not json\n", false));
    assert!(
        e.starts_with("malformed request (not one line of JSON): expected ident at line 1 column 2"),
        "{e}"
    );
    let e = error_of(&raw(p, b"{\"version\":1,\"command\":{\"cmd\":\"sta", true));
    assert!(e.starts_with("malformed request (not one line of JSON): EOF while parsing a string"), "{e}");
    let e = error_of(&raw(p, &vec![b'{'; 100_000], false));
    assert_eq!(e, "request larger than 65536 bytes");
    let e = error_of(&raw(p, b"{\"version\":2,\"command\":{\"cmd\":\"status\"}}\n", false));
    assert_eq!(
        e,
        "protocol version 2 is not supported; this pftraced speaks 1; use the pftracectl shipped with it"
    );
    let e = error_of(&raw(p, b"{\"version\":1,\"command\":{\"cmd\":\"status\",\"verbose\":true}}\n", false));
    assert!(e.starts_with("malformed request: unknown field `verbose`"), "{e}");
    let e =
        error_of(&raw(p, b"{\"version\":1,\"command\":{\"cmd\":\"add\",\"names\":[\"drop-me\"]}}\n", false));
    assert_eq!(e, "pftraced dropped the command without answering (it may be shutting down)");
    status_ok(p);
}

#[test]
fn silent_client_times_out() {
    let dir = temp_dir("silent");
    let cfg = SocketConfig { path: dir.join("s.sock"), group: None };
    let daemon = FakeDaemon::start(cfg, |s| s.request_timeout(Duration::from_millis(300))).unwrap();
    let stream = UnixStream::connect(&daemon.path).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).unwrap();
    assert!(error_of(&line).starts_with("no complete request within 0.3 s"), "{line}");
    status_ok(&daemon.path);
}

#[test]
fn flood_of_500_connections_gets_busy_replies_then_service_resumes() {
    let dir = temp_dir("flood");
    let daemon = FakeDaemon::default_in(&dir);
    // 500 connections held open at once, all silent at first: 64 take the
    // slots, the rest are told "busy" straight away.
    let streams: Vec<UnixStream> = (0..500).map(|_| UnixStream::connect(&daemon.path).unwrap()).collect();
    // connect() returns once queued; let the server accept them all.
    thread::sleep(Duration::from_millis(300));
    let (mut ok, mut busy) = (0, 0);
    for mut stream in streams {
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = stream.write_all(STATUS);
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        if v["ok"] == true {
            ok += 1;
        } else {
            assert!(
                v["error"].as_str().unwrap().starts_with("busy: pftraced is already serving 64"),
                "{line}"
            );
            busy += 1;
        }
    }
    // Typically exactly (64, 436); a slot freed before the server got to a
    // connection can let one more through on a loaded machine.
    assert!(ok >= 64 && busy >= 400 && ok + busy == 500, "ok {ok}, busy {busy}");
    status_ok(&daemon.path);

    // And 500 clients at once from as many threads, each a full request.
    let path = daemon.path.clone();
    let replies: Vec<String> = (0..500)
        .map(|_| {
            let path = path.clone();
            thread::spawn(move || raw(&path, STATUS, false))
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    assert!(replies.iter().all(|l| l.contains("\"ok\":true") || l.contains("busy: ")), "{replies:?}");
    status_ok(&daemon.path);
}

#[test]
fn pftracectl_subcommands_against_the_server() {
    let dir = temp_dir("cli");
    let daemon = FakeDaemon::default_in(&dir);
    let p = &daemon.path;

    let out = ctl(p, &["status"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("pftraced 9.9.9 (pid 4242), up 0s\nnames:     compute\n"), "{stdout}");
    assert!(stdout.contains("lost:      0 records"), "{stdout}");
    let out = ctl(p, &["status", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["peer"]["uid"], 0);
    assert!(v["peer"]["pid"].as_u64().unwrap() > 0);

    let out = ctl(p, &["stats", "--per-pid", "--function", "solve"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "function  file         pid  calls   total    mean       p50     p95     p99     max\n\
         solve     /srv/app.py   42  3(1!)  3.00ms  1.00ms  900.00us  1.10ms  1.10ms  1.10ms\n\
         (N!) = calls with no return seen (closed when the process exited or tracing stopped)\n"
    );

    let file = dir.join("trace.json");
    let out = ctl(p, &["dump", "--since", "1732540000.25", "--pid", "7", "-o", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).starts_with("pftracectl: wrote 2 calls ("), "{}", text(&out.stderr));
    let dumped: Value = serde_json::from_slice(&fs::read(&file).unwrap()).unwrap();
    assert_eq!(
        dumped[0]["filter"],
        json!({"since_wall_ns": 1_732_540_000_250_000_000i64, "pid": 7, "function": null})
    );
    let out = ctl(p, &["dump", "--since", "5m"]); // stdout is a pipe here
    let dumped: Value = serde_json::from_slice(&out.stdout).unwrap();
    let since = dumped[0]["filter"]["since_wall_ns"].as_i64().unwrap() as f64 / 1e9;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!((now - 300.0 - since).abs() < 30.0, "{since} vs {now}");
    let out = ctl(p, &["dump", "--format", "pprof"]);
    assert_eq!(
        text(&out.stderr),
        "pftracectl: error: unknown dump format \"pprof\"; known formats: chrome\n"
    );
    assert_eq!(out.status.code(), Some(1));

    let out = ctl(p, &["add", "-t", "a,b", "-t", "c.py:d"]);
    assert_eq!(text(&out.stdout), "now tracing: compute, a, b, c.py:d\n");
    let out = ctl(p, &["remove", "-t", "zzz"]);
    assert_eq!(
        (out.status.code(), text(&out.stderr)),
        (Some(1), "pftracectl: error: not traced: zzz\n".into())
    );
    let out = ctl(p, &["clear"]);
    assert_eq!(text(&out.stdout), "cleared 7 calls from memory (trace files already written are kept)\n");
    let out = ctl(p, &["stop"]);
    assert!(out.status.success());
}

/// Runs pftracectl as uid/gid 65534 (nobody) with the given supplementary groups.
fn ctl_as_nobody(socket: &Path, groups: Option<&str>) -> Output {
    let mut cmd = Process::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534"]);
    match groups {
        None => cmd.arg("--clear-groups"),
        Some(g) => cmd.arg(format!("--groups={g}")),
    };
    cmd.arg(env!("CARGO_BIN_EXE_pftracectl")).arg("--socket").arg(socket).arg("status").output().unwrap()
}

#[test]
fn non_root_peers_are_refused() {
    let dir = temp_dir("nonroot");
    let daemon = FakeDaemon::default_in(&dir);
    let p = daemon.path.display().to_string();
    assert_eq!(fs::metadata(&daemon.path).unwrap().mode() & 0o777, 0o600);

    // Mode 0600: the kernel refuses the connect.
    let out = ctl_as_nobody(&daemon.path, None);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!(
            "pftracectl: error: permission denied on {p}: run pftracectl as root (sudo), or as a member \
             of the socket group configured in pftraced.toml\n"
        )
    );
    // Even if the socket were opened up, the daemon checks the peer itself.
    fs::set_permissions(&daemon.path, fs::Permissions::from_mode(0o666)).unwrap();
    let out = ctl_as_nobody(&daemon.path, None);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "pftracectl: error: permission denied: uid 65534 is not root; run pftracectl with sudo\n"
    );
}

#[test]
fn socket_group_members_are_allowed() {
    let dir = temp_dir("group");
    // "daemon" (gid 1) exists on Debian-like systems.
    let cfg = SocketConfig { path: dir.join("s.sock"), group: Some("daemon".into()) };
    let daemon = FakeDaemon::start(cfg, |s| s).unwrap();
    let meta = fs::metadata(&daemon.path).unwrap();
    assert_eq!((meta.mode() & 0o777, meta.gid()), (0o660, 1));

    // A member through a supplementary group (read from /proc/PID/status).
    let out = ctl_as_nobody(&daemon.path, Some("1"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Not a member: the kernel refuses (0660); opened up, the daemon does.
    let out = ctl_as_nobody(&daemon.path, None);
    assert!(text(&out.stderr).contains("permission denied on"), "{}", text(&out.stderr));
    fs::set_permissions(&daemon.path, fs::Permissions::from_mode(0o666)).unwrap();
    let out = ctl_as_nobody(&daemon.path, None);
    assert!(
        text(&out.stderr)
            .starts_with("pftracectl: error: permission denied: uid 65534 is not root or in group daemon"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn bind_replaces_stale_sockets_and_refuses_live_ones() {
    let dir = temp_dir("bind");
    let path = dir.join("run/pftrace/pftraced.sock"); // parents are created
    let cfg = SocketConfig { path: path.clone(), group: None };
    let first = FakeDaemon::start(cfg.clone(), |s| s).unwrap();
    assert_eq!(fs::metadata(path.parent().unwrap()).unwrap().mode() & 0o777, 0o755);
    let err = FakeDaemon::start(cfg.clone(), |s| s).err().unwrap().to_string();
    assert!(err.starts_with(&format!("another pftraced is already serving {}", path.display())), "{err}");
    status_ok(&path); // the live daemon was left alone
    drop(first);
    assert!(!path.exists(), "dropping the server removes its socket");

    // A socket left by a daemon that died (no listener behind it) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let second = FakeDaemon::start(cfg.clone(), |s| s).unwrap();
    status_ok(&path);
    drop(second);

    fs::write(&path, "not a socket").unwrap();
    let err = FakeDaemon::start(cfg.clone(), |s| s).err().unwrap().to_string();
    assert_eq!(
        err,
        format!(
            "{} exists and is not a socket; remove it, or set another socket.path in pftraced.toml",
            path.display()
        )
    );
    fs::remove_file(&path).unwrap();

    let bad_group = SocketConfig { path: path.clone(), group: Some("no-such-group-pftrace".into()) };
    let err = FakeDaemon::start(bad_group, |s| s).err().unwrap().to_string();
    assert!(
        err.starts_with(
            "socket group \"no-such-group-pftrace\" (socket.group in pftraced.toml) does not exist"
        ),
        "{err}"
    );
    assert!(!path.exists());

    let err = ControlServer::bind(&cfg).unwrap_err().to_string();
    assert!(err.contains("must be called inside a tokio runtime"), "{err}");
}
