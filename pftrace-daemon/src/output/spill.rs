//! Every completed call of a run, appended to a file beside the final trace
//! as it completes, so a run's trace file holds all of its calls while the
//! daemon keeps only `limits.max_calls_in_memory` of them (for `dump` and
//! `stats`). When tracing ends the chosen format is rendered from this file
//! (see `calls.rs`); if that fails, the file stays and the error names it
//! (`pftracectl calls FILE` prints it as JSON lines: [`json_line`]).
//!
//! Format: [`MAGIC`], then entries, each a tag byte and its body: `S`, a
//! string (u32 little-endian length, UTF-8 bytes), the next id of the
//! run's string table, written once, before the first call naming it; `C`,
//! one call: a length byte and a record of `spill_record.rs` (varints, most
//! of them differences from the previous call; names and files as string
//! ids; times in the kernel's monotonic ns). About 18 bytes a call of a
//! dense loop, against 83 as fixed-size records and 230 as JSON lines, and
//! no formatting on the event loop.
//!
//! A write that fails (disk full) is cut back to the last whole entry and
//! retried at the next flush; meanwhile up to [`MAX_PENDING_BYTES`] of calls
//! wait in memory, and calls beyond that are counted as dropped, never
//! silently. The buffer is written whole or not at all, so a string entry
//! is on disk whenever a call naming it is.

use std::{
    ffi::OsString,
    fs::File,
    io::{self, BufReader, Read},
    os::unix::fs::FileExt as _,
    path::PathBuf,
    sync::Arc,
};

use serde::Serialize;

use super::{
    call_record::StringIds,
    safe_file::{Dir, FileError},
    spill_record::{Delta, MAX_RECORD_BYTES},
};
use crate::pairing::{Call, CallEnd};

/// Encoded calls are written once this many bytes wait.
const WRITE_CHUNK_BYTES: usize = 256 * 1024;
/// Encoded calls held in memory while writes fail, at most (then calls are dropped and counted).
pub const MAX_PENDING_BYTES: usize = 64 << 20;
/// The first bytes of a spill: its kind and format version.
pub const MAGIC: &[u8; 16] = b"pftrace-calls-2\n";
const TAG_STRING: u8 = b'S';
const TAG_CALL: u8 = b'C';
/// A string entry longer than this is refused when read (names and files are
/// at most a few KiB: PATH_MAX).
const MAX_STRING_BYTES: u32 = 1 << 20;

/// Appends `call` as one entry to `out`, with its strings not yet written
/// before it; `delta` is the previous call's (the reader's keeps in step).
fn encode(call: &Call, delta: &mut Delta, strings: &mut StringIds, out: &mut Vec<u8>) {
    let known = strings.len();
    // Its strings' ids made first, so their entries go before the record,
    // which takes the same ids (not looked up twice: Delta::encode_with).
    let ids = (strings.id(&call.name), strings.id(&call.file));
    for s in &strings.table()[known..] {
        out.push(TAG_STRING);
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    // The record is encoded in place, not in a buffer on the stack copied
    // after it: that copy read back as whole words the bytes just stored one
    // by one (a stall of the store buffer, each call).
    // Into the buffer's spare room, not zeroed first (see encode_with).
    let at = out.len();
    out.reserve(2 + MAX_RECORD_BYTES);
    let room = &mut out.spare_capacity_mut()[..2 + MAX_RECORD_BYTES];
    let (head, record) = room.split_at_mut(2);
    let n = delta.encode_with(call, ids, record.try_into().expect("sized above"));
    head[0].write(TAG_CALL);
    head[1].write(n as u8);
    // SAFETY: the room was reserved above, and its first 2 + n bytes were
    // written just now (encode_with writes every byte of the record's n).
    unsafe { out.set_len(at + 2 + n) };
}

/// One call as a JSON object, as `pftracectl calls` prints a kept spill.
#[derive(Serialize)]
struct Line<'a> {
    pid: u32,
    tid: u32,
    name: &'a str,
    file: &'a str,
    line: i32,
    start_ns: u64,
    end_ns: u64,
    depth: u32,
    id: u64,
    parent: u64,
    incomplete: bool,
    cpu_ns: Option<u64>,
    rss_entry_bytes: u64,
    rss_return_bytes: u64,
}

/// Appends `call` to `out` as one line of JSON: `{"pid":1,"tid":1,"name":"f",
/// "file":"/app.py","line":3,"start_ns":..,"end_ns":..,"depth":0,"id":1,"parent":0,
/// "incomplete":false,"cpu_ns":12|null,"rss_entry_bytes":..,"rss_return_bytes":..}`.
pub fn json_line(call: &Call, out: &mut Vec<u8>) {
    let line = Line {
        pid: call.pid,
        tid: call.tid,
        name: &call.name,
        file: &call.file,
        line: call.line,
        start_ns: call.start_ns,
        end_ns: call.end_ns,
        depth: call.depth,
        id: call.id,
        parent: call.parent,
        incomplete: call.end == CallEnd::Incomplete,
        cpu_ns: call.cpu_ns,
        rss_entry_bytes: call.rss_entry_bytes,
        rss_return_bytes: call.rss_return_bytes,
    };
    serde_json::to_writer(&mut *out, &line).expect("a call always encodes");
    out.push(b'\n');
}

/// A byte range of a file, read with `pread` (so several readers share one descriptor).
pub struct Segment {
    file: Arc<File>,
    pos: u64,
    end: u64,
}

impl Segment {
    pub fn new(file: Arc<File>, pos: u64, end: u64) -> Self {
        Self { file, pos, end }
    }
}

impl Read for Segment {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf.len().min(self.end.saturating_sub(self.pos) as usize);
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Reads calls back from a spill, sharing one string per table entry.
pub struct CallReader {
    input: BufReader<Segment>,
    /// The string table so far.
    strings: Vec<Arc<str>>,
    /// Whether the magic was read.
    started: bool,
    /// The previous call, which the next record is a difference from.
    delta: Delta,
}

fn invalid(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("not a whole pftrace calls file: {what}"))
}

impl CallReader {
    pub fn new(segment: Segment, buffer_bytes: usize) -> Self {
        Self {
            input: BufReader::with_capacity(buffer_bytes, segment),
            strings: Vec::new(),
            started: false,
            delta: Delta::default(),
        }
    }

    /// Reads a whole calls file (as `pftracectl calls` does).
    pub fn open(file: File) -> io::Result<Self> {
        let len = file.metadata()?.len();
        Ok(Self::new(Segment::new(Arc::new(file), 0, len), 256 * 1024))
    }

    fn read_exact(&mut self, buf: &mut [u8], what: &str) -> io::Result<()> {
        self.input.read_exact(buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => invalid(format!("{what} cut short")),
            _ => e,
        })
    }

    /// The next call; None at the end.
    pub fn next_call(&mut self) -> io::Result<Option<Call>> {
        if !self.started {
            let mut magic = [0u8; MAGIC.len()];
            self.read_exact(&mut magic, "the header")?;
            if &magic != MAGIC {
                return Err(invalid("its header is not pftrace-calls-2"));
            }
            self.started = true;
        }
        loop {
            let mut tag = [0u8; 1];
            if self.input.read(&mut tag)? == 0 {
                return Ok(None);
            }
            match tag[0] {
                TAG_CALL => {
                    let mut r = [0u8; MAX_RECORD_BYTES];
                    self.read_exact(&mut r[..1], "a call")?;
                    let n = usize::from(r[0]);
                    if n > MAX_RECORD_BYTES {
                        return Err(invalid(format!("a call record of {n} bytes")));
                    }
                    self.read_exact(&mut r[..n], "a call")?;
                    return self.delta.decode(&r[..n], &self.strings).map(Some);
                }
                TAG_STRING => {
                    let mut len = [0u8; 4];
                    self.read_exact(&mut len, "a string")?;
                    let len = u32::from_le_bytes(len);
                    if len > MAX_STRING_BYTES {
                        return Err(invalid(format!("a string of {len} bytes")));
                    }
                    let mut bytes = vec![0u8; len as usize];
                    self.read_exact(&mut bytes, "a string")?;
                    let s = String::from_utf8(bytes).map_err(|_| invalid("a string that is not UTF-8"))?;
                    self.strings.push(Arc::from(s));
                }
                other => return Err(invalid(format!("an entry of unknown kind {other}"))),
            }
        }
    }
}

impl Iterator for CallReader {
    type Item = io::Result<Call>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_call().transpose()
    }
}

/// Appends completed calls to the spill file.
#[derive(Debug)]
pub struct SpillWriter {
    dir: Dir,
    name: OsString,
    file: File,
    /// Bytes on disk: whole entries only.
    disk_bytes: u64,
    buf: Vec<u8>,
    buf_calls: u64,
    written: u64,
    dropped: u64,
    /// The error of the write that failed last, while writes fail.
    failing: Option<String>,
    sort_budget: usize,
    /// Strings with ids so far (each written once, before its first call).
    strings: StringIds,
    /// The last call encoded, which the next record is a difference from.
    delta: Delta,
}

impl SpillWriter {
    /// Creates `pftraced-<pid>.calls.bin` in `dir` (another name if that is
    /// taken). `sort_budget`: calls held in memory when the trace is rendered.
    pub fn create(dir: &Dir, sort_budget: usize) -> Result<Self, FileError> {
        let (name, file) =
            dir.create_unique(&format!("pftraced-{}.calls", std::process::id()), ".bin", 0o644)?;
        let dir = dir.try_clone().map_err(|source| FileError::Io {
            action: "opening",
            path: dir.path().display().to_string(),
            source,
        })?;
        Ok(Self {
            dir,
            name,
            file,
            disk_bytes: 0,
            buf: MAGIC.to_vec(),
            buf_calls: 0,
            written: 0,
            dropped: 0,
            failing: None,
            sort_budget: sort_budget.max(1),
            strings: StringIds::default(),
            delta: Delta::default(),
        })
    }

    /// The file's path.
    pub fn path(&self) -> PathBuf {
        self.dir.join(&self.name)
    }

    /// Appends calls (written in chunks; see the module doc for failures).
    pub fn append(&mut self, calls: &[Call]) {
        for call in calls {
            if self.failing.is_none() && self.buf.len() >= WRITE_CHUNK_BYTES {
                self.write_buffer();
            }
            if self.buf.len() >= MAX_PENDING_BYTES {
                self.dropped += 1;
                continue;
            }
            encode(call, &mut self.delta, &mut self.strings, &mut self.buf);
            self.buf_calls += 1;
        }
    }

    /// Writes what waits (also retries after a failure). Call about once a second.
    pub fn flush(&mut self) {
        self.write_buffer();
    }

    fn write_buffer(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        match self.file.write_all_at(&self.buf, self.disk_bytes) {
            Ok(()) => {
                self.disk_bytes += self.buf.len() as u64;
                self.written += self.buf_calls;
                self.buf.clear();
                self.buf_calls = 0;
                if self.failing.take().is_some() {
                    log::warn!("writing calls to {} works again", self.path().display());
                }
            }
            Err(e) => {
                // Cut any partial entry; the whole buffer is tried again later.
                let _ = self.file.set_len(self.disk_bytes);
                if self.failing.is_none() {
                    log::warn!(
                        "writing calls to {}: {e}; holding up to {} MiB of calls in memory and trying again \
                         every second (calls beyond that are counted as dropped)",
                        self.path().display(),
                        MAX_PENDING_BYTES >> 20
                    );
                }
                self.failing = Some(e.to_string());
            }
        }
    }

    /// Writes what is left and hands the file over for rendering.
    pub fn finish(mut self) -> SpillFile {
        self.write_buffer();
        if self.failing.is_some() {
            self.dropped += self.buf_calls;
        }
        let path = self.path();
        SpillFile {
            dir: self.dir,
            name: self.name,
            path,
            file: Arc::new(self.file),
            bytes: self.disk_bytes,
            calls: self.written,
            dropped: self.dropped,
            error: self.failing,
            sort_budget: self.sort_budget,
        }
    }
}

/// A finished spill: every call written, readable any number of times.
#[derive(Debug)]
pub struct SpillFile {
    dir: Dir,
    name: OsString,
    pub path: PathBuf,
    file: Arc<File>,
    bytes: u64,
    /// Calls in the file.
    pub calls: u64,
    /// Calls that could not be written (the disk refused), and why.
    pub dropped: u64,
    pub error: Option<String>,
    /// Calls held in memory at once when sorting it.
    pub sort_budget: usize,
}

impl SpillFile {
    /// Every call, in the order they completed.
    pub fn reader(&self) -> CallReader {
        CallReader::new(Segment::new(Arc::clone(&self.file), 0, self.bytes), 256 * 1024)
    }

    /// The directory it is in (where sorting puts its scratch file).
    pub fn dir(&self) -> &Dir {
        &self.dir
    }

    /// Deletes the file (once the trace is written).
    pub fn remove(&self) -> io::Result<()> {
        self.dir.remove(&self.name)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::{fs, path::Path};

    use super::*;
    use crate::output::testing::Tmpfs;

    pub fn call(i: u64) -> Call {
        Call {
            pid: 100 + (i % 3) as u32,
            tid: 100 + (i % 3) as u32,
            name: Arc::from(if i.is_multiple_of(2) { "even" } else { "odd \"quoted\"" }),
            file: Arc::from("/srv/app.py"),
            line: i as i32,
            start_ns: 1_000_000 + i * 1000,
            end_ns: 1_000_500 + i * 1000,
            depth: (i % 4) as u32,
            id: i + 1,
            parent: i / 2,
            end: if i.is_multiple_of(7) { CallEnd::Incomplete } else { CallEnd::Returned },
            cpu_ns: (!i.is_multiple_of(5)).then_some(i),
            rss_entry_bytes: i * 10,
            rss_return_bytes: i * 20,
        }
    }

    pub fn temp(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pftrace-spill-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    pub fn same(a: &Call, b: &Call) -> bool {
        (
            a.pid, a.tid, &*a.name, &*a.file, a.line, a.start_ns, a.end_ns, a.depth, a.id, a.parent, a.end,
            a.cpu_ns,
        ) == (
            b.pid, b.tid, &*b.name, &*b.file, b.line, b.start_ns, b.end_ns, b.depth, b.id, b.parent, b.end,
            b.cpu_ns,
        ) && (a.rss_entry_bytes, a.rss_return_bytes) == (b.rss_entry_bytes, b.rss_return_bytes)
    }

    #[test]
    fn every_call_reads_back_exactly() {
        let base = temp("roundtrip");
        let dir = Dir::open(&base, None).unwrap();
        let mut w = SpillWriter::create(&dir, 10).unwrap();
        let calls: Vec<Call> = (0..20_000).map(call).collect();
        for chunk in calls.chunks(333) {
            w.append(chunk);
        }
        let path = w.path();
        assert_eq!(path, base.join(format!("pftraced-{}.calls.bin", std::process::id())));
        let spill = w.finish();
        assert_eq!((spill.calls, spill.dropped), (20_000, 0));
        let back: Vec<Call> = spill.reader().collect::<io::Result<_>>().unwrap();
        assert_eq!(back.len(), calls.len());
        assert!(calls.iter().zip(&back).all(|(a, b)| same(a, b)));
        // Names are shared, not one string per call.
        assert!(Arc::ptr_eq(&back[0].name, &back[2].name));
        // Each string once, then one short entry per call (tag, length, record).
        let strings: usize = ["even", "odd \"quoted\"", "/srv/app.py"].iter().map(|s| 5 + s.len()).sum();
        let (mut delta, mut ids, mut record) =
            (Delta::default(), StringIds::default(), [0; MAX_RECORD_BYTES]);
        let records: usize = calls.iter().map(|c| 2 + delta.encode(c, &mut ids, &mut record)).sum();
        let size = MAGIC.len() + strings + records;
        assert_eq!(fs::metadata(&path).unwrap().len(), size as u64);
        assert!(records < 20_000 * 24, "{records} bytes for 20,000 calls");
        // A file cut short is an error naming what is missing, never a short list.
        let cut =
            CallReader::new(Segment::new(Arc::new(File::open(&path).unwrap()), 0, size as u64 - 10), 4096);
        let err = cut.collect::<io::Result<Vec<Call>>>().unwrap_err().to_string();
        assert_eq!(err, "not a whole pftrace calls file: a call cut short");
        let mut line = Vec::new();
        json_line(&back[7], &mut line);
        assert_eq!(
            String::from_utf8(line).unwrap(),
            "{\"pid\":101,\"tid\":101,\"name\":\"odd \\\"quoted\\\"\",\"file\":\"/srv/app.py\",\"line\":7,\
             \"start_ns\":1007000,\"end_ns\":1007500,\"depth\":3,\"id\":8,\"parent\":3,\"incomplete\":true,\"cpu_ns\":7,\
             \"rss_entry_bytes\":70,\"rss_return_bytes\":140}\n"
        );
        spill.remove().unwrap();
        assert!(!path.exists());
        fs::remove_dir_all(&base).unwrap();
    }

    /// Fills the file system holding `path` with one file.
    fn fill(path: &Path) {
        use std::io::Write as _;
        let mut f = File::create(path).unwrap();
        while f.write_all(&[0u8; 4096]).is_ok() {}
    }

    #[test]
    fn a_full_disk_holds_calls_in_memory_until_space_returns() {
        let base = temp("full");
        let _mount = Tmpfs::mount(&base, "2m");
        let dir = Dir::open(&base, None).unwrap();
        let mut w = SpillWriter::create(&dir, 10).unwrap();
        let filler = base.join("filler");
        fill(&filler);
        let calls: Vec<Call> = (0..5_000).map(call).collect();
        w.append(&calls);
        w.flush();
        assert!(
            w.failing.as_deref().is_some_and(|e| e.contains("No space left on device")),
            "{:?}",
            w.failing
        );
        assert_eq!(w.written, 0);
        // Space comes back: everything waiting is written, once.
        fs::remove_file(&filler).unwrap();
        w.append(&(5_000..5_010).map(call).collect::<Vec<_>>());
        w.flush();
        let spill = w.finish();
        assert_eq!((spill.calls, spill.dropped, spill.error.as_deref()), (5_010, 0, None));
        let lines: Vec<i32> = spill.reader().map(|c| c.unwrap().line).collect();
        assert_eq!(lines, (0..5_010).collect::<Vec<_>>());
    }

    #[test]
    fn a_disk_that_stays_full_counts_what_is_dropped() {
        let base = temp("stays-full");
        let _mount = Tmpfs::mount(&base, "64k");
        let dir = Dir::open(&base, None).unwrap();
        let mut w = SpillWriter::create(&dir, 10).unwrap();
        fill(&base.join("filler"));
        let per_call = {
            let (mut v, mut delta, mut strings) = (Vec::new(), Delta::default(), StringIds::default());
            encode(&call(1), &mut delta, &mut strings, &mut v);
            v.clear();
            encode(&call(1), &mut delta, &mut strings, &mut v);
            v.len()
        };
        // More than fits in memory while the disk refuses.
        let n = (MAX_PENDING_BYTES / per_call + 1000) as u64;
        for chunk in (0..n).collect::<Vec<_>>().chunks(10_000) {
            w.append(&chunk.iter().map(|&i| call(i % 10)).collect::<Vec<_>>());
            w.flush();
        }
        let spill = w.finish();
        assert_eq!(spill.calls, 0);
        assert_eq!(spill.dropped, n, "every call is counted as dropped");
        assert!(spill.error.unwrap().contains("No space left on device"));
    }
}
