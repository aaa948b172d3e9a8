//! pftraced's side of the control socket. [`ControlServer`] owns the
//! listener; each connection is its own task that checks the peer, reads one
//! request line (size-capped, timed), hands the command to the daemon as a
//! [`ControlRequest`] over a channel and writes the [`Handled`] answer back.
//!
//! Nothing a client does can block the daemon or make it panic, and silent
//! clients cannot lock others out:
//! - a connection that has not sent its request yet holds no slot; it has
//!   [`REQUEST_TIMEOUT`] to send it;
//! - at most [`MAX_HANDLING`] requests are carried out at once; a request
//!   arriving when all are taken waits up to [`HANDLING_WAIT`] for one, and
//!   only then gets `busy` (which pftracectl retries for a few seconds);
//! - at most [`MAX_WAITING`] connections wait (for their request line, or
//!   for a slot); a new one beyond that closes the one that has waited
//!   longest, with a `busy` error, so a flood of idle connections never
//!   keeps out a client that sends its request at once, and the server
//!   holds at most `MAX_WAITING + MAX_HANDLING` connections;
//! - a dump is written by a thread of its own (see [`super::stream`]),
//!   counted against the daemon's own limit of dumps at once, not here.

use std::{
    collections::BTreeMap,
    ffi::CString,
    fs, io,
    os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    net::{UnixListener, UnixStream},
    sync::{Semaphore, mpsc, oneshot},
    task::JoinHandle,
    time::timeout,
};

use super::{parse_request, reply_line, stream};
use crate::{
    config::SocketConfig,
    protocol::{BUSY, Command, DumpHeader, MAX_REQUEST_BYTES, Reply},
};

/// How long a client has to send its request line after connecting
/// (pftracectl sends it at once).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections waiting (for their request line, or for a slot) at once; a
/// new one beyond this closes the one that has waited longest.
pub const MAX_WAITING: usize = 256;
/// Requests carried out at once.
pub const MAX_HANDLING: usize = 64;
/// How long a request waits for one of the [`MAX_HANDLING`] slots before
/// the client is told `busy`.
pub const HANDLING_WAIT: Duration = Duration::from_secs(2);
/// A reply write that makes no progress for this long is abandoned.
const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The daemon's answer to one command.
pub enum Handled {
    /// Sent as the `result` of an ok reply.
    Json(serde_json::Value),
    /// Sent as an error reply with this message.
    Error(String),
    /// Work too long for the event loop: run on a blocking thread, and its answer sent.
    Blocking(Box<dyn FnOnce() -> Handled + Send>),
    /// An ok reply whose result is `header`, then the trace `render` writes,
    /// in chunks, from a thread of its own (see [`stream`]).
    Dump { header: DumpHeader, render: stream::Render },
}

impl std::fmt::Debug for Handled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Json(v) => f.debug_tuple("Json").field(v).finish(),
            Self::Error(e) => f.debug_tuple("Error").field(e).finish(),
            Self::Blocking(_) => f.write_str("Blocking(..)"),
            Self::Dump { header, .. } => {
                f.debug_struct("Dump").field("header", header).finish_non_exhaustive()
            }
        }
    }
}

/// Who is on the other end of a connection (SO_PEERCRED, taken at connect).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    pub uid: u32,
    pub gid: u32,
    /// None when the peer is in another pid namespace.
    pub pid: Option<u32>,
}

/// One command for the daemon, with where to send its answer. Dropping
/// `reply` without sending gives the client an error reply.
#[derive(Debug)]
pub struct ControlRequest {
    pub command: Command,
    pub peer: PeerCred,
    pub reply: oneshot::Sender<Handled>,
}

/// Why the control socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "another pftraced is already serving {path}; stop it first (`pftracectl --socket {path} stop`) \
         or give this one another socket.path"
    )]
    AlreadyServing { path: String },
    #[error("{path} exists and is not a socket; remove it, or set another socket.path in pftraced.toml")]
    NotASocket { path: String },
    #[error(
        "socket group {group:?} (socket.group in pftraced.toml) does not exist; create it \
         (`groupadd {group}`) or remove socket.group"
    )]
    UnknownGroup { group: String },
    #[error("cannot {action} {path}: {source}")]
    Io { action: &'static str, path: String, source: io::Error },
    #[error("ControlServer::bind must be called inside a tokio runtime (with IO enabled)")]
    NoRuntime,
}

/// What every connection task needs.
#[derive(Debug)]
struct Shared {
    /// Configured group: (name, gid).
    group: Option<(String, u32)>,
    request_timeout: Duration,
    max_waiting: usize,
    /// Requests being carried out.
    handling: Semaphore,
    max_handling: usize,
    /// Connections waiting for their request line or a slot, oldest first,
    /// each with the means to close it early.
    waiting: Mutex<Waiting>,
}

#[derive(Debug, Default)]
struct Waiting {
    next: u64,
    queue: BTreeMap<u64, oneshot::Sender<()>>,
}

/// A connection's place among those waiting (for their request line or a
/// slot); it leaves the queue when dropped.
struct WaitingPlace<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for WaitingPlace<'_> {
    fn drop(&mut self) {
        self.shared.waiting.lock().unwrap_or_else(|e| e.into_inner()).queue.remove(&self.id);
    }
}

impl Shared {
    fn new(group: Option<(String, u32)>) -> Self {
        Self {
            group,
            request_timeout: REQUEST_TIMEOUT,
            max_waiting: MAX_WAITING,
            handling: Semaphore::new(MAX_HANDLING),
            max_handling: MAX_HANDLING,
            waiting: Mutex::new(Waiting::default()),
        }
    }

    /// Queues a new connection among those waiting, closing
    /// the one that waited longest if the queue is full. The receiver fires
    /// if this one is closed that way.
    fn wait_for_request(&self) -> (WaitingPlace<'_>, oneshot::Receiver<()>) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        while waiting.queue.len() >= self.max_waiting {
            if let Some((_, close)) = waiting.queue.pop_first() {
                let _ = close.send(());
            }
        }
        let id = waiting.next;
        waiting.next += 1;
        let (tx, rx) = oneshot::channel();
        waiting.queue.insert(id, tx);
        (WaitingPlace { shared: self, id }, rx)
    }
}

/// The listening control socket. Dropping it (or the task [`spawn`](Self::spawn)
/// returns ending) removes the socket file, if it is still the one bound here.
#[derive(Debug)]
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    /// (st_dev, st_ino) of the socket file this server created.
    identity: (u64, u64),
    /// Shared with the connection tasks (which outlive the listener when it is aborted).
    shared: Arc<Shared>,
}

impl ControlServer {
    /// Creates the socket at `cfg.path` (its parent directory too, mode 0755),
    /// replacing a stale socket left by a daemon that died, refusing to take
    /// over one a live daemon answers on. Mode 0600, or 0660 with group
    /// `cfg.group`. Must be called inside a tokio runtime.
    pub fn bind(cfg: &SocketConfig) -> Result<Self, ControlError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(ControlError::NoRuntime);
        }
        let path = cfg.path.clone();
        let shown = path.display().to_string();
        let io_err = |action: &'static str, p: &Path| {
            let path = p.display().to_string();
            move |source| ControlError::Io { action, path, source }
        };
        // Resolve the group first: a typo should fail before touching anything.
        let group = match &cfg.group {
            None => None,
            Some(name) => match group_id(name) {
                Ok(Some(gid)) => Some((name.clone(), gid)),
                Ok(None) => {
                    return Err(ControlError::UnknownGroup { group: name.clone() });
                }
                Err(source) => {
                    return Err(ControlError::Io {
                        action: "look up socket group",
                        path: name.clone(),
                        source,
                    });
                }
            },
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)
                .map_err(io_err("create the socket directory", dir))?;
        }
        remove_if_stale(&path)?;
        let listener = UnixListener::bind(&path).map_err(io_err("bind the control socket at", &path))?;
        // Until the chmod below the mode follows the umask; the peer check in
        // each connection is what actually keeps other users out.
        let mode = if let Some((_, gid)) = &group {
            std::os::unix::fs::chown(&path, None, Some(*gid))
                .map_err(io_err("chown the control socket", &path))?;
            0o660
        } else {
            0o600
        };
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))
            .map_err(io_err("chmod the control socket", &path))?;
        let meta = fs::symlink_metadata(&path).map_err(io_err("stat the control socket", &path))?;
        log::info!("control socket {shown} (mode {mode:o})");
        Ok(Self { listener, path, identity: (meta.dev(), meta.ino()), shared: Arc::new(Shared::new(group)) })
    }

    /// Sets how long a client has to send its request (default [`REQUEST_TIMEOUT`]).
    pub fn request_timeout(mut self, limit: Duration) -> Self {
        self.settings().request_timeout = limit;
        self
    }

    /// The settings, before the server is spawned (nothing shares them yet).
    fn settings(&mut self) -> &mut Shared {
        Arc::get_mut(&mut self.shared).expect("settings are changed before spawn")
    }

    /// Sets how many connections may wait for their request line at once (default [`MAX_WAITING`]).
    pub fn max_waiting(mut self, n: usize) -> Self {
        self.settings().max_waiting = n.max(1);
        self
    }

    /// Sets how many requests are carried out at once (default [`MAX_HANDLING`]).
    pub fn max_handling(mut self, n: usize) -> Self {
        let n = n.max(1);
        let shared = self.settings();
        shared.handling = Semaphore::new(n);
        shared.max_handling = n;
        self
    }

    /// Where the socket is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs the accept loop as a task. It ends (removing the socket file) when
    /// every receiver of `tx` is gone, or when the task is aborted.
    pub fn spawn(self, tx: mpsc::Sender<ControlRequest>) -> JoinHandle<()> {
        tokio::spawn(self.accept_loop(tx))
    }

    async fn accept_loop(self, tx: mpsc::Sender<ControlRequest>) {
        let path = &self.path;
        loop {
            let stream = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        log::warn!("control socket {}: accept failed: {e}", path.display());
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = tx.closed() => break,
            };
            let (shared, tx) = (self.shared.clone(), tx.clone());
            tokio::spawn(async move { serve_connection(stream, &shared, &tx).await });
        }
        log::debug!("control socket {}: daemon gone, no longer accepting", path.display());
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let ours = fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.identity);
        if ours && let Err(e) = fs::remove_file(&self.path) {
            log::warn!("cannot remove control socket {}: {e}", self.path.display());
        }
    }
}

/// Removes a socket file no daemon answers on; fails if one does.
fn remove_if_stale(path: &Path) -> Result<(), ControlError> {
    let shown = || path.display().to_string();
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ControlError::Io { action: "stat", path: shown(), source });
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ControlError::NotASocket { path: shown() });
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(ControlError::AlreadyServing { path: shown() }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            log::info!("removing stale control socket {} (its daemon is gone)", shown());
            fs::remove_file(path).map_err(|source| ControlError::Io {
                action: "remove stale socket",
                path: shown(),
                source,
            })
        }
        Err(source) => Err(ControlError::Io { action: "check existing socket", path: shown(), source }),
    }
}

/// The gid of group `name`, None if there is no such group.
fn group_id(name: &str) -> io::Result<Option<u32>> {
    let cname =
        CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in group name"))?;
    let mut buf: Vec<libc::c_char> = vec![0; 4096];
    loop {
        // SAFETY: all-zero is a valid `group` (pointers null, ints 0).
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call; buf.len() is its size.
        let rc =
            unsafe { libc::getgrnam_r(cname.as_ptr(), &mut grp, buf.as_mut_ptr(), buf.len(), &mut found) };
        match rc {
            0 if found.is_null() => return Ok(None),
            0 => return Ok(Some(grp.gr_gid)),
            libc::ERANGE if buf.len() < 1 << 20 => buf.resize(buf.len() * 2, 0),
            // Some NSS backends report "not found" as one of these.
            libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => return Ok(None),
            errno => return Err(io::Error::from_raw_os_error(errno)),
        }
    }
}

/// Supplementary groups of `pid` (its `Groups:` line), empty if unreadable.
fn proc_groups(pid: u32) -> Vec<u32> {
    let status = crate::procinfo::open(pid).and_then(|p| p.status().ok());
    status.map(|s| s.groups.into_iter().filter_map(|g| u32::try_from(g).ok()).collect()).unwrap_or_default()
}

impl Shared {
    /// Root may always connect; members of the configured group too.
    fn authorize(&self, peer: &PeerCred) -> Result<(), String> {
        if peer.uid == 0 {
            return Ok(());
        }
        let Some((name, gid)) = &self.group else {
            return Err(format!("permission denied: uid {} is not root; run pftracectl with sudo", peer.uid));
        };
        if peer.gid == *gid || peer.pid.is_some_and(|pid| proc_groups(pid).contains(gid)) {
            return Ok(());
        }
        Err(format!(
            "permission denied: uid {} is not root or in group {name}; run pftracectl with sudo, \
             or add the user to group {name}",
            peer.uid
        ))
    }
}

/// Why no request line could be read.
#[derive(Debug)]
enum ReadError {
    /// The peer closed without sending anything (e.g. another daemon's liveness probe).
    Empty,
    TooLarge,
    Io(io::Error),
}

/// Reads up to the first `\n` (or EOF), at most [`MAX_REQUEST_BYTES`] including it.
async fn read_request_line(stream: &UnixStream) -> Result<Vec<u8>, ReadError> {
    let mut line = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        stream.readable().await.map_err(ReadError::Io)?;
        let n = match stream.try_read(&mut chunk) {
            Ok(0) if line.is_empty() => return Err(ReadError::Empty),
            // EOF without a newline: let the parser say what is missing.
            Ok(0) => return Ok(line),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(ReadError::Io(e)),
        };
        let newline = chunk[..n].iter().position(|&b| b == b'\n');
        line.extend_from_slice(&chunk[..newline.unwrap_or(n)]);
        if line.len() >= MAX_REQUEST_BYTES {
            return Err(ReadError::TooLarge);
        }
        if newline.is_some() {
            return Ok(line);
        }
    }
}

/// Writes all of `bytes`, giving up if the peer stops reading.
async fn send_all(stream: &UnixStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        timeout(WRITE_STALL_TIMEOUT, stream.writable())
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "client stopped reading"))??;
        match stream.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One connection, start to end. Failures are logged and end only this connection.
async fn serve_connection(stream: UnixStream, shared: &Shared, tx: &mpsc::Sender<ControlRequest>) {
    let result = async {
        let (place, mut closed_early) = shared.wait_for_request();
        let peer = match stream.peer_cred() {
            Ok(c) => {
                PeerCred { uid: c.uid(), gid: c.gid(), pid: c.pid().and_then(|p| u32::try_from(p).ok()) }
            }
            Err(e) => {
                return send_error(&stream, format!("cannot read the peer's credentials: {e}")).await;
            }
        };
        if let Err(message) = shared.authorize(&peer) {
            log::info!("control socket: refused uid {} (pid {:?})", peer.uid, peer.pid);
            return send_error(&stream, message).await;
        }
        let limit = shared.request_timeout;
        let read = tokio::select! {
            read = timeout(limit, read_request_line(&stream)) => read,
            Ok(()) = &mut closed_early => {
                let message = format!(
                    "{BUSY}this connection sent no request while {} newer ones waited, so pftraced \
                     closed it to make room; send the request line as soon as you connect",
                    shared.max_waiting
                );
                return send_error(&stream, message).await;
            }
        };
        let line = match read {
            Ok(Ok(line)) => line,
            Ok(Err(ReadError::Empty)) => return Ok(()),
            Ok(Err(ReadError::TooLarge)) => {
                return send_error(&stream, format!("request larger than {MAX_REQUEST_BYTES} bytes")).await;
            }
            Ok(Err(ReadError::Io(e))) => return Err(e),
            Err(_) => {
                let message = format!(
                    "no complete request within {:.1} s of connecting; send one line of JSON ending in a newline",
                    limit.as_secs_f64()
                );
                return send_error(&stream, message).await;
            }
        };
        let command = match parse_request(&line) {
            Ok(request) => request.command,
            Err(message) => return send_error(&stream, message).await,
        };
        // Waiting for a slot still counts among the connections waiting.
        let _slot = tokio::select! {
            slot = timeout(HANDLING_WAIT, shared.handling.acquire()) => match slot {
                Ok(Ok(slot)) => slot,
                _ => {
                    let message = format!(
                        "{BUSY}pftraced is carrying out {} requests and none finished within {:.1} s; try again \
                         in a moment",
                        shared.max_handling,
                        HANDLING_WAIT.as_secs_f64()
                    );
                    return send_error(&stream, message).await;
                }
            },
            Ok(()) = &mut closed_early => {
                let message = format!(
                    "{BUSY}pftraced is carrying out {} requests and {} more connections wait; try again in a moment",
                    shared.max_handling, shared.max_waiting
                );
                return send_error(&stream, message).await;
            }
        };
        // Served now: it no longer counts among those waiting.
        drop(place);
        let (reply, answer) = oneshot::channel();
        if tx.send(ControlRequest { command, peer, reply }).await.is_err() {
            return send_error(&stream, "pftraced is shutting down; the command was not carried out".into())
                .await;
        }
        let mut handled = answer.await.map_err(|_| ());
        if let Ok(Handled::Blocking(work)) = handled {
            handled = tokio::task::spawn_blocking(work).await.map_err(|e| {
                log::warn!("control request failed: {e}");
            });
        }
        match handled {
            Ok(Handled::Json(result)) => send_all(&stream, &reply_line(&Reply::ok(result))).await,
            Ok(Handled::Error(message)) => send_error(&stream, message).await,
            Ok(Handled::Dump { header, render }) => {
                let head = serde_json::to_value(&header).unwrap_or_default();
                send_all(&stream, &reply_line(&Reply::ok(head))).await?;
                stream::send(stream.into_std()?, render, WRITE_STALL_TIMEOUT)
            }
            Ok(Handled::Blocking(_)) => send_error(&stream, "internal error: work handed on twice".into()).await,
            Err(_) => {
                let message = "pftraced dropped the command without answering (it may be shutting down)";
                send_error(&stream, message.into()).await
            }
        }
    }
    .await;
    if let Err(e) = result {
        log::debug!("control connection ended early: {e}");
    }
}

async fn send_error(stream: &UnixStream, message: String) -> io::Result<()> {
    send_all(stream, &reply_line(&Reply::err(message))).await
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use super::*;
    use crate::protocol::{PROTOCOL_VERSION, Request};

    fn shared(group: Option<(&str, u32)>) -> Shared {
        Shared {
            request_timeout: Duration::from_millis(300),
            ..Shared::new(group.map(|(n, g)| (n.into(), g)))
        }
    }

    /// Serves one connection of a socketpair with a handler that answers
    /// status with `{"ok":1}` and dump with `body`; returns what the client read.
    fn exchange(sent: &[u8], body: &'static [u8]) -> Vec<u8> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (client, server) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut client = client;
        client.write_all(sent).unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        rt.block_on(async move {
            server.set_nonblocking(true).unwrap();
            let server = UnixStream::from_std(server).unwrap();
            let (tx, mut rx) = mpsc::channel::<ControlRequest>(1);
            let daemon = tokio::spawn(async move {
                while let Some(req) = rx.recv().await {
                    let answer = match req.command {
                        Command::Dump { .. } => Handled::Dump {
                            header: DumpHeader { format: "chrome".into() },
                            render: Box::new(move |w| {
                                w.write_all(body).map_err(|e| e.to_string())?;
                                Ok(2)
                            }),
                        },
                        Command::Clear {} => Handled::Blocking(Box::new(|| {
                            Handled::Json(serde_json::json!({"thread": std::thread::current().name()}))
                        })),
                        Command::Stop {} => Handled::Error("no".into()),
                        _ => Handled::Json(serde_json::json!({"ok": 1})),
                    };
                    let _ = req.reply.send(answer);
                }
            });
            serve_connection(server, &shared(None), &tx).await;
            drop(tx);
            daemon.await.unwrap();
        });
        // A server that answers without reading all input makes the kernel
        // reset the connection after the queued reply: read up to that.
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        while let Ok(n @ 1..) = client.read(&mut chunk) {
            got.extend_from_slice(&chunk[..n]);
        }
        got
    }

    fn req(command: Command) -> Vec<u8> {
        super::super::request_line(&Request { version: PROTOCOL_VERSION, command })
    }

    #[test]
    fn json_error_blocking_and_dump_framing() {
        let got = exchange(&req(Command::Status {}), b"");
        assert_eq!(got, b"{\"version\":2,\"ok\":true,\"result\":{\"ok\":1}}\n");
        let got = exchange(&req(Command::Stop {}), b"");
        assert_eq!(got, b"{\"version\":2,\"ok\":false,\"error\":\"no\"}\n");
        // Blocking work runs off the event loop (tokio's blocking pool).
        let got = String::from_utf8(exchange(&req(Command::Clear {}), b"")).unwrap();
        assert_eq!(got, "{\"version\":2,\"ok\":true,\"result\":{\"thread\":\"tokio-rt-worker\"}}\n");
        let dump = Command::Dump { filter: Default::default(), format: None };
        let got = exchange(&req(dump), b"[\n{}\n]\nRAW\n");
        let text = String::from_utf8(got).unwrap();
        // The header, the body in one chunk of 0xb bytes, the end, the trailer.
        assert_eq!(
            text,
            "{\"version\":2,\"ok\":true,\"result\":{\"format\":\"chrome\"}}\nb\n[\n{}\n]\nRAW\n0\n\
             {\"version\":2,\"ok\":true,\"result\":{\"bytes\":11,\"calls\":2}}\n"
        );
    }

    #[test]
    fn a_full_waiting_queue_closes_the_connection_that_waited_longest() {
        let s = Shared { max_waiting: 2, ..shared(None) };
        let (first, mut first_closed) = s.wait_for_request();
        let (second, mut second_closed) = s.wait_for_request();
        assert!(first_closed.try_recv().is_err() && second_closed.try_recv().is_err());
        let (_third, mut third_closed) = s.wait_for_request();
        assert_eq!(first_closed.try_recv(), Ok(()), "the oldest is told to close");
        assert!(second_closed.try_recv().is_err() && third_closed.try_recv().is_err());
        drop(second); // it got its request: it leaves the queue
        let (_fourth, _) = s.wait_for_request();
        assert!(third_closed.try_recv().is_err(), "room was made by the one that left");
        drop(first);
        assert_eq!(s.waiting.lock().unwrap().queue.len(), 2);
    }

    #[test]
    fn bad_requests_get_error_lines() {
        let got = String::from_utf8(exchange(b"garbage\n", b"")).unwrap();
        assert!(got.starts_with("{\"version\":2,\"ok\":false,\"error\":\"malformed request"), "{got}");
        let got = String::from_utf8(exchange(br#"{"version":2,"comm"#, b"")).unwrap();
        assert!(got.contains("EOF while parsing"), "{got}");
        let got = String::from_utf8(exchange(&vec![b'x'; 70_000], b"")).unwrap();
        assert!(got.contains("request larger than 65536 bytes"), "{got}");
        // A line of exactly the limit (newline included) is accepted.
        let mut line = br#"{"version":2,"command":{"cmd":"status"}}"#.to_vec();
        line.resize(MAX_REQUEST_BYTES - 1, b' ');
        line.push(b'\n');
        let got = String::from_utf8(exchange(&line, b"")).unwrap();
        assert!(got.contains("\"ok\":true"), "{got}");
        assert!(exchange(b"", b"").is_empty(), "an empty connection gets no reply");
    }

    #[test]
    fn silent_client_times_out() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (mut client, server) = std::os::unix::net::UnixStream::pair().unwrap();
        rt.block_on(async move {
            server.set_nonblocking(true).unwrap();
            let (tx, _rx) = mpsc::channel(1);
            serve_connection(UnixStream::from_std(server).unwrap(), &shared(None), &tx).await;
        });
        let mut got = String::new();
        client.read_to_string(&mut got).unwrap();
        assert!(got.contains("no complete request within 0.3 s of connecting"), "{got}");
    }

    #[test]
    fn authorization() {
        let peer = |uid, gid| PeerCred { uid, gid, pid: None };
        assert!(shared(None).authorize(&peer(0, 0)).is_ok());
        assert_eq!(
            shared(None).authorize(&peer(1000, 1000)).unwrap_err(),
            "permission denied: uid 1000 is not root; run pftracectl with sudo"
        );
        let g = shared(Some(("tracers", 1234)));
        assert!(g.authorize(&peer(1000, 1234)).is_ok());
        let e = g.authorize(&peer(1000, 1000)).unwrap_err();
        assert!(e.starts_with("permission denied: uid 1000 is not root or in group tracers"), "{e}");
    }

    /// A real unprivileged user (made with useradd if missing) in a
    /// supplementary group, running a process: its peer credentials name
    /// another primary group, so only the supplementary-group check, read
    /// from /proc/PID/status, can let it in.
    #[test]
    fn supplementary_group_of_an_unprivileged_peer() {
        const USER: &str = "pftrace-test-peer";
        const GROUP: &str = "pftrace-test-sup";
        let run = |cmd: &str, args: &[&str]| {
            let out =
                std::process::Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
            assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        if group_id(GROUP).unwrap().is_none() {
            run("groupadd", &["--system", GROUP]);
        }
        let id = |flag: &str| -> Option<u32> {
            let out = std::process::Command::new("id").args([flag, USER]).output().ok()?;
            String::from_utf8_lossy(&out.stdout).trim().parse().ok()
        };
        if id("-u").is_none() {
            run(
                "useradd",
                &["--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "-G", GROUP, USER],
            );
        }
        let (uid, gid) = (id("-u").expect("test user"), id("-g").expect("test user's group"));
        let sup = group_id(GROUP).unwrap().expect("test group");
        assert_ne!(gid, sup, "{USER}'s primary group must not be {GROUP}");
        // setpriv execs sleep as the user with its groups from /etc/group.
        let child = std::process::Command::new("setpriv")
            .args(["--reuid", &uid.to_string(), "--regid", &gid.to_string(), "--init-groups", "sleep", "30"])
            .spawn()
            .expect("run setpriv");
        struct Kill(std::process::Child);
        impl Drop for Kill {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let child = Kill(child);
        let pid = child.0.id();
        // Until setpriv has exec'd, the process still has root's groups.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while crate::procinfo::comm(pid) != "sleep" {
            assert!(std::time::Instant::now() < deadline, "setpriv did not exec sleep");
            std::thread::sleep(Duration::from_millis(5));
        }
        // initgroups lists the primary group among the supplementary ones too.
        let mut groups = proc_groups(pid);
        groups.sort_unstable();
        let mut want = vec![gid, sup];
        want.sort_unstable();
        assert_eq!(groups, want, "supplementary groups of pid {pid}");
        let peer = PeerCred { uid, gid, pid: Some(pid) };
        assert!(shared(Some((GROUP, sup))).authorize(&peer).is_ok());
        let e = shared(Some(("other", 4_000_000_123))).authorize(&peer).unwrap_err();
        assert!(e.starts_with(&format!("permission denied: uid {uid} is not root or in group other")), "{e}");
        // Without its pid (no /proc to read), only the primary group counts.
        assert!(shared(Some((GROUP, sup))).authorize(&PeerCred { pid: None, ..peer }).is_err());
        assert!(shared(Some(("primary", gid))).authorize(&PeerCred { pid: None, ..peer }).is_ok());
    }

    #[test]
    fn group_lookup() {
        assert_eq!(group_id("root").unwrap(), Some(0));
        assert_eq!(group_id("no-such-group-pftrace").unwrap(), None);
    }
}
