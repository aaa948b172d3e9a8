//! pftracectl's side of the control socket: connect, send one request line,
//! read one reply line (and, for `dump`, stream the trace bytes that follow).
//! Blocking std sockets; every failure says what to do about it.

use std::{
    io::{self, BufRead as _, BufReader, Read as _, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use serde::de::DeserializeOwned;

use super::{MAX_REPLY_LINE_BYTES, request_line};
use crate::protocol::{CallFilter, Command, DumpHeader, PROTOCOL_VERSION, Reply, Request};

/// How long the client waits for pftraced to answer (or to send more of a dump).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

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
    #[error("pftraced at {path} sent a malformed reply: {message}")]
    BadReply { path: String, message: String },
    #[error("pftraced at {path} did not answer within {} s; it may be stuck (check `journalctl -u pftraced`)", REPLY_TIMEOUT.as_secs())]
    Timeout { path: String },
    #[error("talking to pftraced at {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("the dump from {path} stopped after {got} of {expected} bytes: pftraced closed the connection")]
    ShortDump { path: String, got: u64, expected: u64 },
    /// Writing the dump to its destination failed (e.g. disk full, closed pipe).
    #[error("writing the dump: {0}")]
    Output(io::Error),
}

/// Sends `command` and returns the daemon's ok reply; an error reply becomes
/// [`ClientError::Daemon`]. For `dump` use [`dump`], which reads the body.
pub fn request(socket: &Path, command: Command) -> Result<Reply, ClientError> {
    let mut conn = Connection::open(socket)?;
    conn.send(command)?;
    conn.reply()
}

/// [`request`], with the reply's result decoded as `T`.
pub fn request_result<T: DeserializeOwned>(socket: &Path, command: Command) -> Result<T, ClientError> {
    let reply = request(socket, command)?;
    serde_json::from_value(reply.result.unwrap_or_default()).map_err(|e| ClientError::BadReply {
        path: socket.display().to_string(),
        message: format!("unexpected result: {e}"),
    })
}

/// Asks for a dump and copies its bytes to `out` as they arrive.
pub fn dump(
    socket: &Path,
    filter: CallFilter,
    format: Option<String>,
    out: &mut dyn Write,
) -> Result<DumpHeader, ClientError> {
    let mut conn = Connection::open(socket)?;
    conn.send(Command::Dump { filter, format })?;
    let reply = conn.reply()?;
    let header: DumpHeader = serde_json::from_value(reply.result.unwrap_or_default())
        .map_err(|e| conn.bad(format!("dump header: {e}")))?;
    let mut left = header.bytes;
    let mut chunk = vec![0u8; 64 * 1024];
    while left > 0 {
        let want = chunk.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = match conn.reader.read(&mut chunk[..want]) {
            Ok(0) => {
                return Err(ClientError::ShortDump {
                    path: conn.path,
                    got: header.bytes - left,
                    expected: header.bytes,
                });
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(conn.io(e)),
        };
        out.write_all(&chunk[..n]).map_err(ClientError::Output)?;
        left -= n as u64;
    }
    out.flush().map_err(ClientError::Output)?;
    Ok(header)
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
            serve_once(&path, b"{\"version\":1,\"ok\":true,\"result\":{\"names\":[\"a\"]}}\n".to_vec());
        let names: crate::protocol::NamesReply = request_result(&path, Command::Clear {}).unwrap();
        assert_eq!(names.names, ["a"]);
        assert_eq!(daemon.join().unwrap(), "{\"version\":1,\"command\":{\"cmd\":\"clear\"}}\n");

        std::fs::remove_file(&path).unwrap();
        let daemon = serve_once(&path, b"{\"version\":1,\"ok\":false,\"error\":\"nope: do X\"}\n".to_vec());
        let e = request(&path, Command::Stop {}).unwrap_err();
        assert_eq!(e.to_string(), "nope: do X");
        daemon.join().unwrap();

        std::fs::remove_file(&path).unwrap();
        let daemon = serve_once(&path, b"{\"version\":7,\"ok\":false,\"error\":\"?\"}\n".to_vec());
        let e = request(&path, Command::Status {}).unwrap_err().to_string();
        assert!(e.contains("speaks protocol 7, this pftracectl speaks 1"), "{e}");
        daemon.join().unwrap();

        std::fs::remove_file(&path).unwrap();
        let daemon = serve_once(&path, b"{\"version\":1,\"ok\":tr".to_vec());
        let e = request(&path, Command::Status {}).unwrap_err().to_string();
        assert!(e.contains("malformed reply: reply line cut short"), "{e}");
        daemon.join().unwrap();
    }

    #[test]
    fn dump_streams_exactly_the_announced_bytes() {
        let (_dir, path) = temp_socket("dump");
        let body = vec![b'x'; 300_000];
        let mut answer =
            b"{\"version\":1,\"ok\":true,\"result\":{\"format\":\"chrome\",\"bytes\":300000,\"calls\":5}}\n"
                .to_vec();
        answer.extend_from_slice(&body);
        answer.extend_from_slice(b"TRAILING");
        let daemon = serve_once(&path, answer);
        let mut out = Vec::new();
        let header = dump(&path, CallFilter::default(), None, &mut out).unwrap();
        assert_eq!((header.bytes, header.calls, out.len()), (300_000, 5, 300_000));
        assert!(out.iter().all(|&b| b == b'x'));
        daemon.join().unwrap();

        std::fs::remove_file(&path).unwrap();
        let daemon = serve_once(
            &path,
            b"{\"version\":1,\"ok\":true,\"result\":{\"format\":\"chrome\",\"bytes\":10,\"calls\":1}}\nabc"
                .to_vec(),
        );
        let e = dump(&path, CallFilter::default(), None, &mut Vec::new()).unwrap_err().to_string();
        assert!(e.contains("stopped after 3 of 10 bytes"), "{e}");
        daemon.join().unwrap();
    }

    #[test]
    fn early_close_reply_is_still_read() {
        // The daemon answers (busy) and closes without reading the request.
        let (_dir, path) = temp_socket("busy");
        let listener = UnixListener::bind(&path).unwrap();
        let daemon = thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            stream.write_all(b"{\"version\":1,\"ok\":false,\"error\":\"busy\"}\n").unwrap();
            let mut sink = [0u8; 1];
            let _ = stream.read(&mut sink);
        });
        let e = request(&path, Command::Status {}).unwrap_err().to_string();
        assert_eq!(e, "busy");
        daemon.join().unwrap();
    }
}
