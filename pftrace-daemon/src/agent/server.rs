//! pftraced's end of the agent's control socket: accept an agent, learn its
//! pid from the kernel (SO_PEERCRED, never from what it says), tell it how to
//! report and what to trace, and keep the connection: closing it (or
//! pftraced dying) makes the agent remove its hooks.

use std::{
    io::BufReader,
    os::{
        fd::AsRawFd as _,
        unix::{
            fs::PermissionsExt as _,
            net::{UnixListener, UnixStream},
        },
    },
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use pftrace_agent::protocol::{self, Command, Hello, Report};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("control socket {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("no agent connected within {0:?}")]
    Timeout(Duration),
    #[error("agent of pid {pid}: {what}")]
    Agent { pid: u32, what: String },
}

/// The listening socket.
pub struct AgentServer {
    listener: UnixListener,
    path: PathBuf,
}

impl AgentServer {
    /// Binds `path` (a stale socket there is replaced; the directory must be
    /// root's). The socket is connectable by every user: who may report is
    /// decided per peer pid, and the kernel accepts records only from
    /// processes pftraced tracks.
    pub fn bind(path: &Path) -> Result<Self, ServerError> {
        let io = |source| ServerError::Io { path: path.to_path_buf(), source };
        match std::fs::symlink_metadata(path) {
            Ok(m)
                if m.file_type().is_symlink()
                    || !std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) =>
            {
                return Err(io(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "exists and is not a socket: remove it or choose another path",
                )));
            }
            Ok(_) => std::fs::remove_file(path).map_err(io)?,
            Err(_) => {}
        }
        let listener = UnixListener::bind(path).map_err(io)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(io)?;
        listener.set_nonblocking(true).map_err(io)?;
        Ok(Self { listener, path: path.to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The listening socket itself (pftraced accepts on a thread of its own).
    pub fn into_listener(self) -> UnixListener {
        self.listener
    }

    /// Waits up to `timeout` for the next agent and reads its hello.
    pub fn accept(&self, timeout: Duration) -> Result<AgentConn, ServerError> {
        let deadline = Instant::now() + timeout;
        let io = |source| ServerError::Io { path: self.path.clone(), source };
        let stream = loop {
            match self.listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(ServerError::Timeout(timeout));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => return Err(io(e)),
            }
        };
        AgentConn::handshake(stream).map_err(|e| match e {
            ServerError::Io { source, .. } => io(source),
            other => other,
        })
    }
}

/// The kernel's word on who is at the other end.
fn peer_pid(s: &UnixStream) -> std::io::Result<u32> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PEERCRED, (&raw mut cred).cast(), &mut len)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.pid as u32)
}

/// One connected agent.
pub struct AgentConn {
    /// From SO_PEERCRED.
    pub pid: u32,
    /// What the agent said (its pid claim is not used).
    pub hello: Hello,
    reader: BufReader<UnixStream>,
    /// Whether the agent's `batch=1` was answered (it must be, first).
    batch_answered: bool,
}

impl AgentConn {
    /// A connection just accepted: the peer's pid from the kernel, then its
    /// hello (read within 5 s; a longer line or another first line is refused).
    pub fn handshake(stream: UnixStream) -> Result<Self, ServerError> {
        let io = |source| ServerError::Io { path: PathBuf::from("(agent connection)"), source };
        stream.set_nonblocking(false).map_err(io)?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).map_err(io)?;
        let pid = peer_pid(&stream).map_err(io)?;
        let mut reader = BufReader::new(stream);
        let line =
            protocol::read_line(&mut reader).map_err(|e| ServerError::Agent { pid, what: e.to_string() })?;
        let hello = Hello::parse(&line).map_err(|e| ServerError::Agent { pid, what: e.to_string() })?;
        Ok(AgentConn { pid, hello, reader, batch_answered: false })
    }

    /// Sends how to report and the names; waits for the agent to say they
    /// are in force. Returns the generation.
    pub fn configure(&mut self, report: Report, names: &[String]) -> Result<u32, ServerError> {
        self.answer_batch_unless_answered()?;
        self.send(&Command::Report(report))?;
        self.set_names(names)
    }

    /// Sends a new set of names and waits for the agent's acknowledgement.
    pub fn set_names(&mut self, names: &[String]) -> Result<u32, ServerError> {
        self.send(&Command::Names(names.to_vec()))?;
        let line = protocol::read_line(&mut self.reader).map_err(|e| self.err(e.to_string()))?;
        protocol::parse_ok(&line).ok_or_else(|| self.err(format!("unexpected answer {line:?}")))
    }

    /// Answers an agent's `batch=1`: [`protocol::SLOTS_LINE`] with the CPU
    /// slot map's fd (SCM_RIGHTS; the map is frozen, so the agent can only
    /// map it read-only) when pftraced takes the batched road, else
    /// [`protocol::NO_SLOTS_LINE`].
    pub fn answer_batch(&mut self, slots: Option<std::os::fd::OwnedFd>) -> Result<(), ServerError> {
        self.batch_answered = true;
        let Some(fd) = slots else {
            return protocol::send(&mut self.reader.get_ref(), protocol::NO_SLOTS_LINE)
                .map_err(|e| self.err(e.to_string()));
        };
        let line = protocol::SLOTS_LINE.as_bytes();
        let mut iov = libc::iovec { iov_base: line.as_ptr() as *mut _, iov_len: line.len() };
        let mut cmsg = [0u64; 4];
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE/LEN of one int; the buffer holds it.
        unsafe {
            msg.msg_controllen = libc::CMSG_SPACE(size_of::<i32>() as u32) as usize;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(size_of::<i32>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<i32>(), fd.as_raw_fd());
        }
        // SAFETY: msg points at live buffers.
        let n = unsafe { libc::sendmsg(self.reader.get_ref().as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n != line.len() as isize {
            return Err(self.err(format!("sending the CPU slots: {}", std::io::Error::last_os_error())));
        }
        Ok(())
    }

    /// An agent offering the batched road hears `slots none` before
    /// anything else when no answer was given.
    fn answer_batch_unless_answered(&mut self) -> Result<(), ServerError> {
        if self.hello.batch && !self.batch_answered {
            self.answer_batch(None)?;
        }
        Ok(())
    }

    pub fn stop(&mut self) -> Result<(), ServerError> {
        self.answer_batch_unless_answered()?;
        self.send(&Command::Stop)
    }

    /// Waits up to `bound` for the agent to close its end (it does after
    /// tearing down, on `stop`); anything it says meanwhile is ignored.
    pub fn wait_closed(&mut self, bound: Duration) {
        use std::io::Read as _;
        let deadline = Instant::now() + bound;
        let mut buf = [0u8; 512];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.reader.get_ref().set_read_timeout(Some(left)).is_err() {
                return;
            }
            match self.reader.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    fn send(&mut self, c: &Command) -> Result<(), ServerError> {
        protocol::send(&mut self.reader.get_ref(), &c.to_lines()).map_err(|e| self.err(e.to_string()))
    }

    fn err(&self, what: String) -> ServerError {
        ServerError::Agent { pid: self.pid, what }
    }
}
