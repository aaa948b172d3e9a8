//! pftracectl's side of the control socket: connect, send one request line,
//! read one reply line (and, for `dump`, the chunks of the trace that
//! follow, see [`super::stream`]). A `busy` answer is retried with growing
//! pauses for up to [`BUSY_RETRY_FOR`]. Blocking std sockets; every failure
//! says what to do about it.

use std::{
    io::{self, BufRead as _, BufReader, Read as _, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::{Duration, Instant},
};

use serde::de::DeserializeOwned;

use super::{
    MAX_REPLY_LINE_BYTES, request_line,
    stream::{self, ReceiveError},
};
use crate::protocol::{BUSY, CallFilter, Command, DumpHeader, DumpTrailer, PROTOCOL_VERSION, Reply, Request};

/// How long the client waits for pftraced to answer (or to send more of a dump).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a request refused as `busy` is tried again before giving up.
pub const BUSY_RETRY_FOR: Duration = Duration::from_secs(5);
/// The first pause before trying again; each next one doubles, up to 1 s.
const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Why a request did not get a useful answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no pftraced socket at {path}: is pftraced running? Start it (e.g. `systemctl start pftraced` \
         or `sudo pftraced ...`) or pass --socket"
    )]
    NoDaemon { path: String },
    #[error(
        "{path} exists but no pftraced is listening (a stale socket left by a daemon that died); \
         restart pftraced, which replaces it"
    )]
    Stale { path: String },
    #[error(
        "permission denied on {path}: run pftracectl as root (sudo), or as a member of the socket \
         group configured in pftraced.toml"
    )]
    PermissionDenied { path: String },
    #[error(
        "pftraced at {path} speaks protocol {theirs}, this pftracectl speaks {PROTOCOL_VERSION}; \
         use the pftracectl shipped with that pftraced"
    )]
    Version { path: String, theirs: String },
    /// The daemon's own error reply, verbatim.
    #[error("{0}")]
    Daemon(String),
    /// Still `busy` after retrying for [`BUSY_RETRY_FOR`].
    #[error("{message} (pftracectl tried {attempts} times over {:.1} s and gave up)", elapsed.as_secs_f64())]
    Busy { message: String, attempts: u32, elapsed: Duration },
    #[error("pftraced at {path} sent a malformed reply: {message}")]
    BadReply { path: String, message: String },
    #[error("pftraced at {path} did not answer within {} s; it may be stuck (check `journalctl -u pftraced`)", REPLY_TIMEOUT.as_secs())]
    Timeout { path: String },
    #[error("talking to pftraced at {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error(
        "the dump from {path} stopped after {got} bytes: pftraced closed the connection before its end \
         (the trace written so far is incomplete)"
    )]
    ShortDump { path: String, got: u64 },
    /// Writing the dump to its destination failed (e.g. disk full, closed pipe).
    #[error("writing the dump: {0}")]
    Output(io::Error),
}

/// Sends `command` and returns the daemon's ok reply; an error reply becomes
/// [`ClientError::Daemon`]. For `dump` use [`dump`], which reads the body.
pub fn request(socket: &Path, command: Command) -> Result<Reply, ClientError> {
    retrying_busy(|| {
        let mut conn = Connection::open(socket)?;
        conn.send(command.clone())?;
        conn.reply()
    })
}

/// [`request`], with the reply's result decoded as `T`.
pub fn request_result<T: DeserializeOwned>(socket: &Path, command: Command) -> Result<T, ClientError> {
    let reply = request(socket, command)?;
    serde_json::from_value(reply.result.unwrap_or_default()).map_err(|e| ClientError::BadReply {
        path: socket.display().to_string(),
        message: format!("unexpected result: {e}"),
    })
}

/// What a finished dump was.
#[derive(Debug, Clone, PartialEq)]
pub struct DumpDone {
    pub format: String,
    pub calls: u64,
    pub bytes: u64,
}

/// Asks for a dump and copies its bytes to `out` as they arrive.
pub fn dump(
    socket: &Path,
    filter: CallFilter,
    format: Option<String>,
    out: &mut dyn Write,
) -> Result<DumpDone, ClientError> {
    let (mut conn, header) = retrying_busy(|| {
        let mut conn = Connection::open(socket)?;
        conn.send(Command::Dump { filter: filter.clone(), format: format.clone() })?;
        let reply = conn.reply()?;
        let header: DumpHeader = serde_json::from_value(reply.result.unwrap_or_default())
            .map_err(|e| conn.bad(format!("dump header: {e}")))?;
        Ok((conn, header))
    })?;
    let (trailer, got) = stream::receive(&mut conn.reader, out).map_err(|e| match e {
        ReceiveError::Closed { got } => ClientError::ShortDump { path: conn.path.clone(), got },
        ReceiveError::BadChunk(head) => conn.bad(format!("bad chunk header {head:?}")),
        ReceiveError::Read(e) => conn.io(e),
        ReceiveError::Output(e) => ClientError::Output(e),
    })?;
    out.flush().map_err(ClientError::Output)?;
    let reply = parse_reply(&trailer, &conn.path)?;
    let trailer: DumpTrailer = serde_json::from_value(reply.result.unwrap_or_default())
        .map_err(|e| conn.bad(format!("dump trailer: {e}")))?;
    if trailer.bytes != got {
        return Err(conn.bad(format!("the trailer says {} bytes, {got} came", trailer.bytes)));
    }
    Ok(DumpDone { format: header.format, calls: trailer.calls, bytes: got })
}

/// Runs `attempt` until it gets an answer other than `busy`, pausing
/// 50 ms, 100 ms, ... up to 1 s (each with up to half again at random, so
/// many clients turned away together do not come back together), for at
/// most [`BUSY_RETRY_FOR`].
fn retrying_busy<T>(mut attempt: impl FnMut() -> Result<T, ClientError>) -> Result<T, ClientError> {
    let started = Instant::now();
    let mut pause = FIRST_RETRY_PAUSE;
    let mut attempts = 0;
    loop {
        attempts += 1;
        match attempt() {
            Err(ClientError::Daemon(message)) if message.starts_with(BUSY) => {
                let elapsed = started.elapsed();
                if elapsed >= BUSY_RETRY_FOR {
                    return Err(ClientError::Busy { message, attempts, elapsed });
                }
                let jitter = pause.mul_f64(f64::from(jitter_seed() % 500) / 1000.0);
                std::thread::sleep((pause + jitter).min(BUSY_RETRY_FOR - elapsed));
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            other => return other,
        }
    }
}

/// A number that differs between processes and moments (no need for more).
fn jitter_seed() -> u32 {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
    nanos ^ std::process::id().wrapping_mul(2_654_435_761)
}

/// One connection to the daemon.
struct Connection {
    path: String,
    reader: BufReader<UnixStream>,
}

impl Connection {
    fn open(socket: &Path) -> Result<Self, ClientError> {
        let path = socket.display().to_string();
        let stream = UnixStream::connect(socket).map_err(|e| connect_error(path.clone(), e))?;
        let conn = Self { path, reader: BufReader::new(stream) };
        let stream = conn.reader.get_ref();
        stream.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(|e| conn.io(e))?;
        stream.set_write_timeout(Some(REPLY_TIMEOUT)).map_err(|e| conn.io(e))?;
        Ok(conn)
    }

    fn send(&mut self, command: Command) -> Result<(), ClientError> {
        let line = request_line(&Request { version: PROTOCOL_VERSION, command });
        match self.reader.get_mut().write_all(&line) {
            Ok(()) => Ok(()),
            // The daemon may have answered and closed already (busy, permission
            // denied): its reply is still there to read.
            Err(e) if matches!(e.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset) => {
                Ok(())
            }
            Err(e) => Err(self.io(e)),
        }
    }

    /// Reads the reply line; checks its version; error replies become errors.
    fn reply(&mut self) -> Result<Reply, ClientError> {
        let mut line = Vec::new();
        let limit = MAX_REPLY_LINE_BYTES as u64 + 1;
        (&mut self.reader).take(limit).read_until(b'\n', &mut line).map_err(|e| self.io(e))?;
        if line.is_empty() {
            return Err(self.bad("the connection closed without a reply".into()));
        }
        if line.pop() != Some(b'\n') {
            let why =
                if line.len() as u64 >= limit - 1 { "reply line too long" } else { "reply line cut short" };
            return Err(self.bad(why.into()));
        }
        parse_reply(&line, &self.path)
    }

    fn io(&self, source: io::Error) -> ClientError {
        if matches!(source.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) {
            return ClientError::Timeout { path: self.path.clone() };
        }
        ClientError::Io { path: self.path.clone(), source }
    }

    fn bad(&self, message: String) -> ClientError {
        ClientError::BadReply { path: self.path.clone(), message }
    }
}

/// Decodes a reply line (without `\n`).
pub(crate) fn parse_reply(line: &[u8], path: &str) -> Result<Reply, ClientError> {
    let bad = |message: String| ClientError::BadReply { path: path.into(), message };
    let value: serde_json::Value = serde_json::from_slice(line).map_err(|e| bad(e.to_string()))?;
    match value.get("version") {
        Some(v) if v.as_u64() == Some(u64::from(PROTOCOL_VERSION)) => {}
        Some(v) => {
            return Err(ClientError::Version { path: path.into(), theirs: v.to_string() });
        }
        None => return Err(bad("no \"version\" field".into())),
    }
    let reply: Reply = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
    if !reply.ok {
        return Err(ClientError::Daemon(
            reply.error.unwrap_or_else(|| "pftraced reported an unnamed error".into()),
        ));
    }
    Ok(reply)
}

fn connect_error(path: String, e: io::Error) -> ClientError {
    match e.raw_os_error() {
        Some(libc::ENOENT) => ClientError::NoDaemon { path },
        Some(libc::ECONNREFUSED) => ClientError::Stale { path },
        Some(libc::EACCES | libc::EPERM) => ClientError::PermissionDenied { path },
        _ => ClientError::Io { path, source: e },
    }
}

#[cfg(test)]
mod tests {
    use std::{io::Read as _, os::unix::net::UnixListener, thread};

    use super::*;

    /// Removes the test's directory when dropped.
    struct Cleanup(std::path::PathBuf);

    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn temp_socket(name: &str) -> (Cleanup, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("pftrace-client-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        (Cleanup(dir), path)
    }

    /// A one-shot fake daemon: reads the request line, writes `answer`.
    fn serve_once(path: &Path, answer: Vec<u8>) -> thread::JoinHandle<String> {
        let listener = UnixListener::bind(path).unwrap();
        thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line).unwrap();
            (&stream).write_all(&answer).unwrap();
            line
        })
    }

    #[test]
    fn connect_errors_say_what_to_do() {
        let (_dir, path) = temp_socket("connect");
        let e = request(&path, Command::Status {}).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("no pftraced socket at {}: is pftraced running?", path.display())),
            "{e}"
        );
        drop(UnixListener::bind(&path).unwrap()); // the file stays: a stale socket
        let e = request(&path, Command::Status {}).unwrap_err().to_string();
        assert!(e.contains("exists but no pftraced is listening"), "{e}");
    }

    #[test]
    fn reply_framing() {
        let (_dir, path) = temp_socket("reply");
        let daemon =
            serve_once(&path, b"{\"version\":2,\"ok\":true,\"result\":{\"names\":[\"a\"]}}\n".to_vec());
        let names: crate::protocol::NamesReply = request_result(&path, Command::Clear {}).unwrap();
        assert_eq!(names.names, ["a"]);
        assert_eq!(daemon.join().unwrap(), "{\"version\":2,\"command\":{\"cmd\":\"clear\"}}\n");

        std::fs::remove_file(&path).unwrap();
        let daemon = serve_once(&path, b"{\"version\":2,\"ok\":false,\"error\":\"nope: do X\"}\n".to_vec());
        let e = request(&path, Command::Stop {}).unwrap_err();
        assert_eq!(e.to_string(), "nope: do X");
        daemon.join().unwrap();

        std::fs::remove_file(&path).unwrap();
        let daemon = serve_once(&path, b"{\"version\":7,\"ok\":false,\"error\":\"?\"}\n".to_vec());
        let e = request(&path, Command::Status {}).unwrap_err().to_string();
        assert!(e.contains("speaks protocol 7, this pftracectl speaks 2"), "{e}");
        daemon.join().unwrap();

        std::fs::remove_file(&path).unwrap();
        let daemon = serve_once(&path, b"{\"version\":2,\"ok\":tr".to_vec());
        let e = request(&path, Command::Status {}).unwrap_err().to_string();
        assert!(e.contains("malformed reply: reply line cut short"), "{e}");
        daemon.join().unwrap();
    }

    #[test]
    fn dump_streams_the_chunks_and_checks_the_trailer() {
        let (_dir, path) = temp_socket("dump");
        let mut answer = b"{\"version\":2,\"ok\":true,\"result\":{\"format\":\"chrome\"}}\n".to_vec();
        answer.extend_from_slice(b"10000\n");
        answer.extend_from_slice(&[b'x'; 0x10000]);
        answer.extend_from_slice(
            b"3\nyyy0\n{\"version\":2,\"ok\":true,\"result\":{\"calls\":5,\"bytes\":65539}}\nTRAILING",
        );
        let daemon = serve_once(&path, answer);
        let mut out = Vec::new();
        let done = dump(&path, CallFilter::default(), None, &mut out).unwrap();
        assert_eq!(done, DumpDone { format: "chrome".into(), calls: 5, bytes: 65_539 });
        assert_eq!((out.len(), &out[65_536..]), (65_539, &b"yyy"[..]));
        daemon.join().unwrap();

        // Cut short: the bytes so far are written, and the error says so.
        std::fs::remove_file(&path).unwrap();
        let daemon = serve_once(
            &path,
            b"{\"version\":2,\"ok\":true,\"result\":{\"format\":\"chrome\"}}\na\nabc".to_vec(),
        );
        let mut out = Vec::new();
        let e = dump(&path, CallFilter::default(), None, &mut out).unwrap_err().to_string();
        assert!(e.contains("stopped after 0 bytes: pftraced closed the connection before its end"), "{e}");
        daemon.join().unwrap();

        // Rendering failed part way: the trailer's error is the error.
        std::fs::remove_file(&path).unwrap();
        let daemon = serve_once(
            &path,
            b"{\"version\":2,\"ok\":true,\"result\":{\"format\":\"chrome\"}}\n2\n[1\
              0\n{\"version\":2,\"ok\":false,\"error\":\"rendering the trace failed after 2 bytes: x\"}\n"
                .to_vec(),
        );
        let mut out = Vec::new();
        let e = dump(&path, CallFilter::default(), None, &mut out).unwrap_err().to_string();
        assert_eq!((e.as_str(), out.as_slice()), ("rendering the trace failed after 2 bytes: x", &b"[1"[..]));
        daemon.join().unwrap();
    }

    /// A fake daemon answering `busy: ...` to the first `busy` connections, then `ok`.
    fn busy_then_ok(path: &Path, busy: usize) -> thread::JoinHandle<usize> {
        let listener = UnixListener::bind(path).unwrap();
        thread::spawn(move || {
            for i in 0.. {
                let (stream, _) = listener.accept().unwrap();
                let mut line = String::new();
                BufReader::new(&stream).read_line(&mut line).unwrap();
                if i < busy {
                    (&stream).write_all(b"{\"version\":2,\"ok\":false,\"error\":\"busy: full\"}\n").unwrap();
                } else {
                    (&stream).write_all(b"{\"version\":2,\"ok\":true,\"result\":{}}\n").unwrap();
                    return i + 1;
                }
            }
            unreachable!()
        })
    }

    #[test]
    fn busy_is_retried_then_given_up_on() {
        let (_dir, path) = temp_socket("retry");
        let daemon = busy_then_ok(&path, 3);
        let started = Instant::now();
        request(&path, Command::Status {}).unwrap();
        assert_eq!(daemon.join().unwrap(), 4, "three busy answers, then the fourth attempt");
        // Pauses of 50, 100 and 200 ms, each with up to half again.
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(350) && took < Duration::from_millis(2000), "{took:?}");

        std::fs::remove_file(&path).unwrap();
        let _daemon = busy_then_ok(&path, usize::MAX);
        let started = Instant::now();
        let e = request(&path, Command::Status {}).unwrap_err();
        let took = started.elapsed();
        let ClientError::Busy { attempts, .. } = &e else { panic!("{e}") };
        let attempts = *attempts;
        assert!(took >= BUSY_RETRY_FOR && took < BUSY_RETRY_FOR + Duration::from_secs(2), "{took:?}");
        assert!((5..=12).contains(&attempts), "{attempts} attempts");
        let e = e.to_string();
        assert!(
            e.starts_with(&format!("busy: full (pftracectl tried {attempts} times over 5."))
                && e.ends_with(" s and gave up)"),
            "{e}"
        );
    }

    #[test]
    fn early_close_reply_is_still_read() {
        // The daemon answers (busy) and closes without reading the request.
        let (_dir, path) = temp_socket("busy");
        let listener = UnixListener::bind(&path).unwrap();
        let daemon = thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            stream.write_all(b"{\"version\":2,\"ok\":false,\"error\":\"busy\"}\n").unwrap();
            let mut sink = [0u8; 1];
            let _ = stream.read(&mut sink);
        });
        let e = request(&path, Command::Status {}).unwrap_err().to_string();
        assert_eq!(e, "busy"); // not `busy: `, so not retried
        daemon.join().unwrap();
    }
}
