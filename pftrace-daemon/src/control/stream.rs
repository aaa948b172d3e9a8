//! A dump's body on the wire: chunks (a line with the length in hex, then
//! the bytes), a chunk of length 0, then a trailer reply line. The daemon
//! side ([`send`]) runs the renderer on a thread of its own, writing to the
//! socket in blocking mode as the client reads, so the event loop (and the
//! ring buffer it drains) never waits for a dump and at most one chunk per
//! dump is buffered; the client side ([`receive`]) checks the framing and
//! copies the bytes out.

use std::{
    io::{self, BufRead, Read, Write},
    os::unix::net::UnixStream,
    time::Duration,
};

use super::reply_line;
use crate::protocol::{DumpTrailer, Reply};

/// Bytes per chunk: what a dump buffers besides its renderer's own buffer.
pub const CHUNK_BYTES: usize = 64 * 1024;

/// Writes a dump's body, returning the number of calls written; its error
/// is sent to the client as the trailer.
pub type Render = Box<dyn FnOnce(&mut dyn Write) -> Result<u64, String> + Send>;

/// Frames what is written into chunks of at most [`CHUNK_BYTES`].
struct Chunked<'a> {
    out: &'a UnixStream,
    buf: Vec<u8>,
    bytes: u64,
    /// A write to the client failed: it is gone or stopped reading.
    failed: bool,
}

impl Chunked<'_> {
    fn send_chunk(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let head = format!("{:x}\n", self.buf.len());
        let result = self.out.write_all(head.as_bytes()).and_then(|()| self.out.write_all(&self.buf));
        self.failed |= result.is_err();
        self.bytes += self.buf.len() as u64;
        self.buf.clear();
        result
    }
}

impl Write for Chunked<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK_BYTES - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK_BYTES {
            self.send_chunk()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_chunk()
    }
}

/// Renders a dump into `stream` on a new thread (at a lower priority than
/// the daemon's event loop). A write that makes no progress for `stall`
/// ends it; so does the client closing the connection.
pub fn send(stream: UnixStream, render: Render, stall: Duration) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(stall))?;
    std::thread::Builder::new().name("pftrace-dump".into()).spawn(move || {
        // The ring reader comes first: the kernel favours it when a CPU is contended.
        // SAFETY: setpriority on this thread's own id has no memory effects.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10) };
        let mut out = Chunked { out: &stream, buf: Vec::with_capacity(CHUNK_BYTES), bytes: 0, failed: false };
        // What was rendered goes out also when rendering failed part way.
        let rendered = render(&mut out);
        let sent = out.send_chunk();
        let rendered = rendered.and_then(|calls| sent.map(|()| calls).map_err(|e| e.to_string()));
        if out.failed {
            log::debug!("dump ended early: the client stopped reading or left");
            return;
        }
        let trailer = match rendered {
            Ok(calls) => {
                Reply::ok(serde_json::to_value(DumpTrailer { calls, bytes: out.bytes }).unwrap_or_default())
            }
            Err(message) => {
                Reply::err(format!("rendering the trace failed after {} bytes: {message}", out.bytes))
            }
        };
        let mut end = b"0\n".to_vec();
        end.extend(reply_line(&trailer));
        if let Err(e) = (&stream).write_all(&end) {
            log::debug!("dump ended early: {e}");
        }
    })?;
    Ok(())
}

/// Why a dump's body could not be read.
#[derive(Debug)]
pub enum ReceiveError {
    /// Reading from the daemon failed (or the connection closed: `got` bytes came).
    Read(io::Error),
    Closed {
        got: u64,
    },
    /// A chunk header that is not a hex length.
    BadChunk(String),
    /// Writing to `out` failed.
    Output(io::Error),
}

/// Copies a dump's chunks to `out`; returns the trailer line (without `\n`,
/// for the caller to parse) and the bytes copied.
pub fn receive(input: &mut impl BufRead, out: &mut dyn Write) -> Result<(Vec<u8>, u64), ReceiveError> {
    let mut got = 0u64;
    let mut chunk = vec![0u8; CHUNK_BYTES];
    loop {
        let mut head = Vec::new();
        input.by_ref().take(20).read_until(b'\n', &mut head).map_err(ReceiveError::Read)?;
        if head.pop() != Some(b'\n') {
            if head.is_empty() {
                return Err(ReceiveError::Closed { got });
            }
            return Err(ReceiveError::BadChunk(String::from_utf8_lossy(&head).into_owned()));
        }
        let text = std::str::from_utf8(&head).unwrap_or_default();
        let len = usize::from_str_radix(text, 16)
            .ok()
            .filter(|&n| n <= CHUNK_BYTES && !text.is_empty() && !text.starts_with('+'))
            .ok_or_else(|| ReceiveError::BadChunk(String::from_utf8_lossy(&head).into_owned()))?;
        if len == 0 {
            let mut trailer = Vec::new();
            input
                .by_ref()
                .take(super::MAX_REPLY_LINE_BYTES as u64)
                .read_until(b'\n', &mut trailer)
                .map_err(ReceiveError::Read)?;
            if trailer.pop() != Some(b'\n') {
                return Err(ReceiveError::Closed { got });
            }
            return Ok((trailer, got));
        }
        let buf = &mut chunk[..len];
        input.read_exact(buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => ReceiveError::Closed { got },
            _ => ReceiveError::Read(e),
        })?;
        out.write_all(buf).map_err(ReceiveError::Output)?;
        got += len as u64;
    }
}

#[cfg(test)]
mod tests {
    use std::io::BufReader;

    use super::*;

    #[test]
    fn round_trip_in_chunks_with_a_trailer() {
        let (a, b) = UnixStream::pair().unwrap();
        let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let sent = body.clone();
        send(
            a,
            Box::new(move |w: &mut dyn Write| {
                // Odd-sized writes, as a serializer makes them.
                for piece in sent.chunks(7777) {
                    w.write_all(piece).map_err(|e| e.to_string())?;
                }
                Ok(42)
            }),
            Duration::from_secs(5),
        )
        .unwrap();
        let mut input = BufReader::new(b);
        let mut out = Vec::new();
        let (trailer, got) = receive(&mut input, &mut out).unwrap();
        assert_eq!((got, out == body), (200_000, true));
        assert_eq!(
            String::from_utf8(trailer).unwrap(),
            "{\"version\":2,\"ok\":true,\"result\":{\"bytes\":200000,\"calls\":42}}"
        );
    }

    #[test]
    fn a_render_error_becomes_the_trailer_and_bad_framing_is_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        send(
            a,
            Box::new(|w: &mut dyn Write| {
                w.write_all(b"[1,").map_err(|e| e.to_string())?;
                Err("disk on fire".into())
            }),
            Duration::from_secs(5),
        )
        .unwrap();
        let mut out = Vec::new();
        let (trailer, got) = receive(&mut BufReader::new(b), &mut out).unwrap();
        assert_eq!((got, out.as_slice()), (3, &b"[1,"[..]));
        assert!(
            String::from_utf8(trailer)
                .unwrap()
                .contains("rendering the trace failed after 3 bytes: disk on fire")
        );

        let mut out = Vec::new();
        let e = receive(&mut &b"3\nabc2\nx"[..], &mut out).unwrap_err();
        assert!(matches!(e, ReceiveError::Closed { got: 3 }), "{e:?}");
        let e = receive(&mut &b"zz\nabc"[..], &mut Vec::new()).unwrap_err();
        assert!(matches!(e, ReceiveError::BadChunk(ref h) if h == "zz"), "{e:?}");
        let e = receive(&mut &b"ffffffff\n"[..], &mut Vec::new()).unwrap_err();
        assert!(matches!(e, ReceiveError::BadChunk(_)), "{e:?}");
        let e = receive(&mut &b""[..], &mut Vec::new()).unwrap_err();
        assert!(matches!(e, ReceiveError::Closed { got: 0 }), "{e:?}");
    }
}
