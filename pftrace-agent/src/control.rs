//! The agent's link to pftraced: a Unix socket pftraced serves. A native
//! thread reads it and takes the GIL only to apply a change (new names, or
//! the teardown when pftraced is gone). Taking the GIL with
//! PyGILState_Ensure rather than Py_AddPendingCall: pending calls run only
//! in the main thread, which may sit in a join or a sleep for long, and the
//! agent must stop within a second of pftraced going away.

use std::{
    io::{BufReader, Write as _},
    os::{fd::AsRawFd as _, unix::net::UnixStream},
    path::Path,
    sync::atomic::{AtomicBool, AtomicI32, Ordering},
    time::Duration,
};

use crate::{
    api, apply_names,
    capi::Api,
    protocol::{self, Command, Hello, ProtocolError, Report},
    report, teardown,
};

/// Set at interpreter exit (atexit): the control thread must not take the GIL.
pub static FINALIZING: AtomicBool = AtomicBool::new(false);
/// The socket's fd (for the atexit and fork handlers), -1 when none.
pub static SOCKET_FD: AtomicI32 = AtomicI32::new(-1);

/// Connects and says hello; checks that the peer is root (pftraced) or
/// this process's own user. With the batched road offered (`batch=1`),
/// pftraced's first line says whether it takes it, with the CPU slot map's
/// fd attached when it does (returned).
pub fn connect(
    path: &Path,
    timeout: Duration,
    python: (u32, u32),
) -> Result<(UnixStream, Option<std::os::fd::OwnedFd>), String> {
    let stream = UnixStream::connect(path)
        .map_err(|e| format!("cannot connect to pftraced at {}: {e}", path.display()))?;
    let peer = peer_uid(&stream).map_err(|e| format!("SO_PEERCRED on {}: {e}", path.display()))?;
    let me = unsafe { libc::geteuid() };
    if peer != 0 && peer != me {
        return Err(format!("{} is served by uid {peer}, not by root: not pftraced", path.display()));
    }
    stream.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    let batch = crate::batch::offered();
    let hello = Hello { pid: std::process::id(), python, syscall: report::syscall_possible(), batch };
    protocol::send(&mut &stream, &hello.to_line()).map_err(|e| format!("sending hello: {e}"))?;
    let slots = if batch { read_slots(&stream)? } else { None };
    Ok((stream, slots))
}

/// Reads pftraced's answer to `batch=1` (one short line, read a byte at a
/// time with recvmsg so that nothing after it is consumed and the fd that
/// rides with it is received, not dropped).
fn read_slots(stream: &UnixStream) -> Result<Option<std::os::fd::OwnedFd>, String> {
    use std::os::fd::FromRawFd as _;
    let mut line = Vec::new();
    let mut fd = None;
    while line.len() < 64 {
        let mut byte = 0u8;
        let mut iov = libc::iovec { iov_base: (&raw mut byte).cast(), iov_len: 1 };
        let mut cmsg = [0u64; 8];
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.as_mut_ptr().cast();
        msg.msg_controllen = size_of_val(&cmsg);
        // SAFETY: msg points at live buffers of the sizes given.
        let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n <= 0 {
            return Err(format!("pftraced's answer to batch=1: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: walking the control buffer the kernel filled.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let raw: i32 = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                    fd = Some(std::os::fd::OwnedFd::from_raw_fd(raw));
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        line.push(byte);
        if byte == b'\n' {
            break;
        }
    }
    match std::str::from_utf8(&line) {
        Ok(protocol::SLOTS_LINE) => Ok(fd),
        Ok(protocol::NO_SLOTS_LINE) => Ok(None),
        _ => Err(format!("pftraced's answer to batch=1: {:?}", String::from_utf8_lossy(&line))),
    }
}

fn peer_uid(s: &UnixStream) -> std::io::Result<u32> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PEERCRED, (&raw mut cred).cast(), &mut len)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// The setup answer when pftraced says `stop` before any names: it traces
/// this process without the agent (the loader stays quiet about it).
pub const NOT_NEEDED: &str = "not needed (pftraced said stop)";

/// Reads commands until pftraced has said how to report and which names to
/// trace (the first `names`). Runs without the GIL.
pub fn read_setup(r: &mut BufReader<UnixStream>) -> Result<(Report, Vec<String>), String> {
    let mut report = None;
    loop {
        match Command::read(r) {
            Ok(Command::Report(m)) => report = Some(m),
            Ok(Command::Names(names)) => {
                return Ok((report.ok_or("pftraced sent names before saying how to report")?, names));
            }
            // pftraced traces this process another way (its USDT probes).
            Ok(Command::Stop) => return Err(NOT_NEEDED.into()),
            Err(ProtocolError::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err("pftraced did not answer in time".into());
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Starts the thread that follows pftraced's changes and notices its end.
pub fn spawn(reader: BufReader<UnixStream>) -> std::io::Result<()> {
    SOCKET_FD.store(reader.get_ref().as_raw_fd(), Ordering::Release);
    std::thread::Builder::new().name("pftrace-agent".into()).spawn(move || follow(reader)).map(drop)
}

fn follow(mut reader: BufReader<UnixStream>) {
    let _ = reader.get_ref().set_read_timeout(None);
    let why = loop {
        match Command::read(&mut reader) {
            Ok(Command::Report(m)) => report::set_road(m),
            Ok(Command::Names(names)) => {
                let generation = with_gil(|api| apply_names(api, &names));
                match generation {
                    Some(Some(g)) => {
                        if protocol::send(&mut reader.get_ref(), &protocol::ok_line(g)).is_err() {
                            break "the control socket failed".to_string();
                        }
                    }
                    _ => break "the interpreter is exiting".to_string(),
                }
            }
            Ok(Command::Stop) => break "pftraced said stop".to_string(),
            Err(ProtocolError::Closed) => break "pftraced closed the connection".to_string(),
            Err(e) => break e.to_string(),
        }
    };
    // Stop reporting at once, then undo the hooks with the GIL.
    report::set_mode(report::OFF);
    SOCKET_FD.store(-1, Ordering::Release);
    with_gil(|api| teardown(api, &why));
    let _ = reader.get_mut().flush();
}

/// Runs `f` holding the GIL, unless the interpreter is exiting (a thread
/// taking the GIL then would be ended or hung by CPython).
fn with_gil<T>(f: impl FnOnce(&Api) -> T) -> Option<T> {
    let api = api()?;
    if FINALIZING.load(Ordering::Acquire) || unsafe { (api.is_finalizing)() } != 0 {
        return None;
    }
    let g = unsafe { (api.gil_ensure)() };
    let out = if FINALIZING.load(Ordering::Acquire) { None } else { Some(f(api)) };
    unsafe { (api.gil_release)(g) };
    out
}

/// Stops tracing from a thread of the agent's own (GIL taken here).
pub fn stop_from_thread(why: &str) {
    report::set_mode(report::OFF);
    with_gil(|api| teardown(api, why));
}

/// Unblocks the control thread's read (it then sees EOF and ends).
pub fn shut_socket() {
    let fd = SOCKET_FD.swap(-1, Ordering::AcqRel);
    if fd >= 0 {
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    }
}
