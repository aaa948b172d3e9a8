//! `pftracectl` without a working daemon: no socket, a stale socket, a
//! daemon speaking another protocol version, bad arguments. Each must fail
//! with a message that says what to do, and a non-zero exit status.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixListener,
    path::{Path, PathBuf},
    process::{Command, Output},
};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pftrace-ctlcli-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn ctl(socket: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pftracectl")).arg("--socket").arg(socket).args(args).output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn no_daemon() {
    let dir = temp_dir("none");
    let socket = dir.join("pftraced.sock");
    for args in [&["status"][..], &["dump", "--since", "5m"], &["stats"], &["add", "-t", "f"], &["stop"]] {
        let out = ctl(&socket, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert_eq!(
            stderr(&out),
            format!(
                "pftracectl: error: no pftraced socket at {}: is pftraced running? Start it (e.g. \
                 `systemctl start pftraced` or `sudo pftraced ...`) or pass --socket\n",
                socket.display()
            )
        );
        assert!(out.stdout.is_empty());
    }
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn stale_socket() {
    let dir = temp_dir("stale");
    let socket = dir.join("pftraced.sock");
    drop(UnixListener::bind(&socket).unwrap()); // the file outlives its listener
    let out = ctl(&socket, &["status"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        format!(
            "pftracectl: error: {} exists but no pftraced is listening (a stale socket left by a daemon \
             that died); restart pftraced, which replaces it\n",
            socket.display()
        )
    );
    fs::remove_dir_all(&dir).unwrap();
}

/// A daemon from another release: a real socket whose peer speaks protocol
/// version 3 (it reads pftracectl's request and answers in its own version,
/// as a newer pftraced would). No other pftraced exists here to run.
#[test]
fn daemon_of_another_protocol_version() {
    let dir = temp_dir("version");
    let socket = dir.join("pftraced.sock");
    for args in [&["status"][..], &["stats"], &["dump"], &["stop"]] {
        let listener = UnixListener::bind(&socket).unwrap();
        let peer = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut request = String::new();
            BufReader::new(&stream).read_line(&mut request).unwrap();
            (&stream).write_all(b"{\"version\":3,\"ok\":true,\"result\":{\"anything\":1}}\n").unwrap();
            request
        });
        let out = ctl(&socket, args);
        let request = peer.join().unwrap();
        assert!(request.starts_with("{\"version\":2,"), "pftracectl sent {request:?}");
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert_eq!(
            stderr(&out),
            format!(
                "pftracectl: error: pftraced at {} speaks protocol 3, this pftracectl speaks 2; use the \
                 pftracectl shipped with that pftraced\n",
                socket.display()
            ),
            "{args:?}"
        );
        assert!(out.stdout.is_empty(), "{args:?} printed {:?}", String::from_utf8_lossy(&out.stdout));
        fs::remove_file(&socket).unwrap();
    }
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_arguments_fail_before_connecting() {
    let socket = Path::new("/nonexistent/pftraced.sock");
    let out = ctl(socket, &["dump", "--since", "30"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        "pftracectl: error: --since 30: that is a Unix time before 2000; for a duration add a unit (e.g. 30s or 30m)\n"
    );
    let out = ctl(socket, &["stats", "--since", "yesterday"]);
    assert!(stderr(&out).contains("expected a duration like 30s, 5m, 2h or 1d"), "{}", stderr(&out));
    let out = ctl(socket, &["add"]);
    assert_eq!(out.status.code(), Some(2), "clap usage errors exit 2");
    assert!(stderr(&out).contains("--trace <NAME>"), "{}", stderr(&out));
}

#[test]
fn help_teaches_with_examples() {
    let out = Command::new(env!("CARGO_BIN_EXE_pftracectl")).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "Examples:",
        "pftracectl dump > trace.json",
        "--socket <PATH>",
        "[default: /run/pftrace/pftraced.sock]",
    ] {
        assert!(help.contains(needle), "{needle:?} missing from:\n{help}");
    }
    for sub in ["status", "dump", "stats", "add", "remove", "clear", "stop"] {
        assert!(help.contains(&format!("\n  {sub} ")), "{sub} missing from:\n{help}");
    }
}
