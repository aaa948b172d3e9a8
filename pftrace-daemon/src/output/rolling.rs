//! Rolling trace files written while the daemon runs:
//! `pftrace-<host>-<daemon pid>-<UTC start>-<seq>.json` in `output.dir`, each a
//! Chrome Trace Event JSON array with one event per line. Events are only
//! ever written whole, so a file is at every moment a valid array prefix
//! (which Perfetto and chrome://tracing accept unterminated): a daemon that
//! dies leaves readable files. Write failures never reach the caller: they
//! are counted in [`OutputStatus`], the file is cut back to its last good
//! event, and a new file is tried after a pause.
//!
//! The directory is opened once without following other users' symbolic
//! links and files are created in it `O_EXCL` (see `output/safe_file.rs`);
//! if it is removed meanwhile, its path is opened (and made) again the same way.

use std::{
    collections::HashSet,
    ffi::OsString,
    fs::File,
    io::{self, Write as _},
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crate::{
    clock::WallClock,
    config::OutputConfig,
    output::{
        events::{call_event, process_name_event},
        safe_file::{Dir, FileError},
    },
    pairing::Call,
    protocol::OutputStatus,
    trace::TracedProcess,
};

/// Buffered events are written once they reach this size (or on flush).
const WRITE_CHUNK_BYTES: usize = 64 * 1024;
/// Buffered events are written at least this often while calls arrive.
const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// After a failure, how long to wait before trying a new file.
const RETRY_INTERVAL: Duration = Duration::from_secs(5);
/// What closes the array.
const TAIL: &[u8] = b"\n]\n";
/// Mode of a directory made for the files.
const DIR_MODE: u32 = 0o750;

/// Why rolling output cannot start.
#[derive(Debug, thiserror::Error)]
pub enum RollingError {
    #[error("output.dir is not set; set it in pftraced.toml to write rolling trace files")]
    NoDir,
    #[error("output {0}; set output.dir in pftraced.toml (or --output-dir) to a directory pftraced can use")]
    Dir(#[from] FileError),
}

/// The file being written.
#[derive(Debug)]
struct OpenFile {
    path: PathBuf,
    file: File,
    /// Bytes on disk: always whole events.
    disk_bytes: u64,
    /// Whole events not yet written, and how many calls they hold.
    buf: Vec<u8>,
    buf_calls: u64,
    /// Call events, and all events, in the file (on disk or buffered).
    calls: u64,
    events: u64,
    /// Processes whose name event the file already has.
    pids: HashSet<u32>,
    opened: Instant,
}

impl OpenFile {
    /// Size once everything buffered is written and the array closed.
    fn size(&self) -> u64 {
        self.disk_bytes + self.buf.len() as u64 + TAIL.len() as u64
    }

    /// Appends one event to the buffer, after `[` or `,`.
    fn push_event(&mut self, event: &[u8]) {
        self.buf.extend_from_slice(if self.events == 0 { b"\n" } else { b",\n" });
        self.buf.extend_from_slice(event);
        self.events += 1;
    }
}

/// Rolling Chrome trace files in one directory.
#[derive(Debug)]
pub struct RollingOutput {
    path: PathBuf,
    /// The directory as opened; None after it failed to reopen.
    dir: Option<Dir>,
    /// `pftrace-<host>-<pid>-<start>`.
    prefix: String,
    seq: u32,
    max_file_bytes: u64,
    max_file_age: Duration,
    retry_interval: Duration,
    current: Option<OpenFile>,
    /// No new file is tried before this (set after a failure).
    retry_at: Option<Instant>,
    last_flush: Instant,
    status: OutputStatus,
}

impl RollingOutput {
    /// Prepares writing to `cfg.dir` (created with mode 0750 if missing).
    /// No file is created until the first call arrives.
    pub fn new(cfg: &OutputConfig, hostname: &str) -> Result<Self, RollingError> {
        let path = cfg.dir.clone().ok_or(RollingError::NoDir)?;
        let dir = Dir::open(&path, Some(DIR_MODE))?;
        let shown = path.display().to_string();
        let started = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        let host: String = hostname
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '_' { c } else { '_' })
            .collect();
        let host = if host.is_empty() { "unknown".into() } else { host };
        Ok(Self {
            prefix: format!("pftrace-{host}-{}-{}", std::process::id(), utc_stamp(started)),
            seq: 0,
            max_file_bytes: cfg.max_file_bytes,
            max_file_age: Duration::from_secs(cfg.max_file_seconds.max(1)),
            retry_interval: RETRY_INTERVAL,
            current: None,
            retry_at: None,
            last_flush: Instant::now(),
            status: OutputStatus { dir: shown, ..Default::default() },
            dir: Some(dir),
            path,
        })
    }

    /// Appends calls. Never fails: see the module doc.
    pub fn write_calls<'p>(
        &mut self,
        calls: &[Call],
        codes: &mut crate::codes::CodeReader,
        clock: &WallClock,
        process: impl Fn(u32) -> Option<&'p TracedProcess>,
    ) {
        // One buffer for every call's event (not a Vec each).
        let mut event = Vec::with_capacity(512);
        for call in calls {
            event.clear();
            if serde_json::to_writer(&mut event, &call_event(call, &codes.info(call), clock)).is_err() {
                event.clear();
            }
            let name_event = || serde_json::to_vec(&process_name_event(call.pid, process(call.pid)));
            // The name event goes before the process's first call in each file.
            let name = match &self.current {
                Some(file) if file.pids.contains(&call.pid) => None,
                _ => Some(name_event().unwrap_or_default()),
            };
            let needed = event.len() + name.as_ref().map_or(0, |n| n.len() + 2);
            if !self.ensure_file(needed as u64) {
                self.status.calls_not_written += 1;
                continue;
            }
            let file = self.current.as_mut().expect("ensured");
            if file.pids.insert(call.pid) {
                file.push_event(&name.unwrap_or_else(|| name_event().unwrap_or_default()));
            }
            file.push_event(&event);
            file.calls += 1;
            file.buf_calls += 1;
            if file.buf.len() >= WRITE_CHUNK_BYTES {
                self.write_buffer();
            }
        }
        if self.last_flush.elapsed() >= FLUSH_INTERVAL {
            self.flush();
        }
    }

    /// Writes buffered events; closes the file if it is due for rotation by
    /// age or was deleted. Call about once a second.
    pub fn flush(&mut self) {
        self.last_flush = Instant::now();
        self.write_buffer();
        let Some(file) = &self.current else { return };
        if file.opened.elapsed() >= self.max_file_age {
            self.finish();
        } else if file.file.metadata().is_ok_and(|m| m.nlink() == 0) {
            let message =
                format!("{} was deleted while being written; starting a new file", file.path.display());
            self.current = None;
            self.status.current_file = None;
            self.record_error(message);
            // Nothing failed to write: a new file may be tried at once.
            self.retry_at = None;
        }
    }

    /// Finishes the current file (closing its array). The next call starts a new one.
    pub fn close(&mut self) {
        self.finish();
    }

    /// Counters for `pftracectl status`.
    pub fn status(&self) -> OutputStatus {
        self.status.clone()
    }

    /// Makes sure a file with room for an event of `len` bytes is open.
    fn ensure_file(&mut self, len: u64) -> bool {
        if let Some(file) = &self.current {
            let full = file.calls > 0 && file.size() + len + 2 > self.max_file_bytes;
            if full || file.opened.elapsed() >= self.max_file_age {
                self.finish();
            }
        }
        if self.current.is_some() {
            return true;
        }
        if self.retry_at.is_some_and(|at| Instant::now() < at) {
            return false;
        }
        match self.open_next() {
            Ok(file) => {
                self.status.files_written += 1;
                self.status.current_file = Some(file.path.display().to_string());
                self.current = Some(file);
                self.retry_at = None;
                true
            }
            Err(message) => {
                self.record_error(message);
                false
            }
        }
    }

    fn open_next(&mut self) -> Result<OpenFile, String> {
        loop {
            // The directory may have been removed under us: open (and make) it again.
            let dir = match self.dir.take() {
                Some(dir) if dir.exists() => dir,
                _ => Dir::open(&self.path, Some(DIR_MODE)).map_err(|e| e.to_string())?,
            };
            self.seq += 1;
            let name = OsString::from(format!("{}-{:04}.json", self.prefix, self.seq));
            let path = dir.join(&name);
            // Append mode: after a failed write is cut off with set_len, the
            // next write lands at the new end, not past a hole. O_EXCL: a name
            // someone else made (a symbolic link, a file) is skipped.
            let opened = dir.create_new(&name, 0o640, true);
            self.dir = Some(dir);
            match opened {
                Ok(file) => {
                    return Ok(OpenFile {
                        path,
                        file,
                        disk_bytes: 0,
                        buf: b"[".to_vec(),
                        buf_calls: 0,
                        calls: 0,
                        events: 0,
                        pids: HashSet::new(),
                        opened: Instant::now(),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(format!("cannot create trace file {}: {e}", path.display())),
            }
        }
    }

    /// Writes the buffer out. On failure the file is cut back to its last
    /// whole event and abandoned, and the buffered calls are counted as lost.
    fn write_buffer(&mut self) {
        let Some(file) = &mut self.current else {
            return;
        };
        if file.buf.is_empty() {
            return;
        }
        match file.file.write_all(&file.buf) {
            Ok(()) => {
                file.disk_bytes += file.buf.len() as u64;
                self.status.bytes_written += file.buf.len() as u64;
                self.status.calls_written += file.buf_calls;
                file.buf.clear();
                file.buf_calls = 0;
            }
            Err(e) => {
                let message = format!("writing {}: {e}", file.path.display());
                self.status.calls_not_written += file.buf_calls;
                self.abandon();
                self.record_error(message);
            }
        }
    }

    /// Gives up on the current file after a failed write, leaving it readable.
    fn abandon(&mut self) {
        let Some(mut file) = self.current.take() else {
            return;
        };
        self.status.current_file = None;
        if file.disk_bytes == 0 {
            if let Some(dir) = &self.dir {
                let _ = dir.remove(file.path.file_name().unwrap_or_default());
            }
            return;
        }
        // Drop any partial event, then try to close the array (a full disk
        // may refuse; the unterminated prefix is still a valid trace).
        let _ = file.file.set_len(file.disk_bytes);
        if file.file.write_all(TAIL).is_err() {
            let _ = file.file.set_len(file.disk_bytes);
        }
    }

    /// Writes what is buffered and closes the array.
    fn finish(&mut self) {
        self.write_buffer();
        let Some(mut file) = self.current.take() else {
            return;
        };
        self.status.current_file = None;
        let closed = file.file.write_all(TAIL).and_then(|()| file.file.sync_data());
        match closed {
            Ok(()) => self.status.bytes_written += TAIL.len() as u64,
            Err(e) => {
                let _ = file.file.set_len(file.disk_bytes);
                self.record_error(format!("closing {}: {e}", file.path.display()));
            }
        }
    }

    fn record_error(&mut self, message: String) {
        let retry = self.retry_interval.as_secs_f64();
        log::warn!("trace output: {message}; will try a new file in {retry:.0} s");
        self.status.write_errors += 1;
        self.status.last_error = Some(message);
        self.retry_at = Some(Instant::now() + self.retry_interval);
    }
}

impl Drop for RollingOutput {
    fn drop(&mut self) {
        self.finish();
    }
}

/// `YYYYmmddTHHMMSS` in UTC for seconds since the epoch.
fn utc_stamp(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}{month:02}{day:02}T{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, fs, path::Path, sync::Arc};

    use serde_json::Value;

    use super::*;
    use crate::{output::testing::Tmpfs, pairing::CallEnd};

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pftrace-rolling-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let _ = fs::remove_file(&dir);
        dir
    }

    fn config(dir: &Path, max_file_bytes: u64, max_file_seconds: u64) -> OutputConfig {
        OutputConfig { dir: Some(dir.into()), max_file_bytes, max_file_seconds }
    }

    /// Calls numbered by their `line`, spread over three processes.
    fn calls(from: i32, n: i32) -> Vec<Call> {
        (from..from + n)
            .map(|i| {
                let pid = 100 + (i % 3) as u32;
                Call {
                    pid,
                    tid: pid,
                    name: Arc::from("compute"),
                    file: Arc::from("/srv/app/work.py"),
                    line: i,
                    start_ns: 1_000_000 + i as u64 * 1000,
                    end_ns: 1_000_500 + i as u64 * 1000,
                    depth: 0,
                    id: 0,
                    parent: 0,
                    end: if i % 7 == 0 { CallEnd::Incomplete } else { CallEnd::Returned },
                    cpu_ns: None,
                    rss_entry_bytes: 0,
                    rss_return_bytes: 0,
                }
            })
            .collect()
    }

    static PROCESSES: std::sync::LazyLock<HashMap<u32, TracedProcess>> = std::sync::LazyLock::new(processes);

    fn processes() -> HashMap<u32, TracedProcess> {
        let p = TracedProcess { pid: 100, binary: "/usr/bin/python3.9".into(), ..Default::default() };
        HashMap::from([(100, p)])
    }

    fn files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        files
    }

    /// Parses a file as a closed array, or as the unterminated prefix a crash leaves.
    fn events(path: &Path) -> Vec<Value> {
        let text = fs::read_to_string(path).unwrap();
        let parsed = serde_json::from_str(&text).or_else(|_| serde_json::from_str(&format!("{text}]")));
        let Ok(Value::Array(events)) = parsed else { panic!("{} does not parse: {text:?}", path.display()) };
        events
    }

    /// The `line` of every call event in `files`, checking each file names a
    /// process before its first call.
    fn call_lines(files: &[PathBuf]) -> Vec<i64> {
        let mut lines = Vec::new();
        for path in files {
            let mut named = HashSet::new();
            for ev in events(path) {
                match ev["ph"].as_str() {
                    Some("M") => assert!(named.insert(ev["pid"].as_u64().unwrap())),
                    Some("X") => {
                        assert!(
                            named.contains(&ev["pid"].as_u64().unwrap()),
                            "{}: unnamed pid",
                            path.display()
                        );
                        lines.push(ev["args"]["line"].as_i64().unwrap());
                    }
                    other => panic!("unexpected event kind {other:?}"),
                }
            }
        }
        lines.sort_unstable();
        lines
    }

    #[test]
    fn rotation_by_size_keeps_every_call_once() {
        let dir = temp("size");
        let clock = WallClock::measure();
        let mut out = RollingOutput::new(&config(&dir, 4096, 3600), "build host/1").unwrap();
        for chunk in calls(0, 500).chunks(37) {
            out.write_calls(chunk, &mut crate::codes::CodeReader::new(&Default::default()), &clock, |pid| {
                PROCESSES.get(&pid)
            });
        }
        out.flush();
        // What is on disk now is already a readable trace (as after a crash).
        let current = PathBuf::from(out.status().current_file.unwrap());
        assert!(!events(&current).is_empty());
        out.close();

        let files = files(&dir);
        assert!(files.len() >= 5, "{files:?}");
        let prefix = format!("pftrace-build_host_1-{}-", std::process::id());
        let mut total = 0;
        for (i, path) in files.iter().enumerate() {
            let name = path.file_name().unwrap().to_str().unwrap();
            assert!(name.starts_with(&prefix) && name.ends_with(&format!("-{:04}.json", i + 1)), "{name}");
            let len = fs::metadata(path).unwrap().len();
            assert!(len <= 4096, "{name} is {len} bytes");
            let text = fs::read_to_string(path).unwrap();
            assert!(text.starts_with("[\n{") && text.ends_with("}\n]\n"), "{text:?}");
            serde_json::from_str::<Value>(&text).unwrap();
            total += len;
        }
        assert_eq!(call_lines(&files), (0..500).collect::<Vec<_>>());
        let status = out.status();
        assert_eq!((status.calls_written, status.calls_not_written, status.write_errors), (500, 0, 0));
        assert_eq!((status.files_written, status.bytes_written), (files.len() as u64, total));
        assert_eq!(status.current_file, None);
        let first = events(&files[0]);
        assert_eq!(first[0]["args"]["name"], "python3.9 100");
        // Unresolved (no table entry): the file is the category, not a guessed module.
        assert_eq!(first[1]["cat"], "/srv/app/work.py");
        assert_eq!(first[1]["args"]["incomplete"], true);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rotation_by_age() {
        let dir = temp("age");
        let clock = WallClock::measure();
        let mut out = RollingOutput::new(&config(&dir, 1 << 20, 1), "h").unwrap();
        out.write_calls(
            &calls(0, 10),
            &mut crate::codes::CodeReader::new(&Default::default()),
            &clock,
            |pid| PROCESSES.get(&pid),
        );
        std::thread::sleep(Duration::from_millis(1100));
        out.write_calls(
            &calls(10, 10),
            &mut crate::codes::CodeReader::new(&Default::default()),
            &clock,
            |pid| PROCESSES.get(&pid),
        );
        std::thread::sleep(Duration::from_millis(1100));
        out.flush(); // an idle file past its age is closed without waiting for calls
        assert_eq!(out.status().current_file, None);
        let files = files(&dir);
        assert_eq!(files.len(), 2);
        assert_eq!(call_lines(&files), (0..20).collect::<Vec<_>>());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_dir_at_start_is_an_error() {
        let file = temp("notadir");
        fs::write(&file, "x").unwrap();
        let err = RollingOutput::new(&config(&file.join("out"), 4096, 1), "h").unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "output directory {0}/out: {0} is a regular file, not a directory; set output.dir in \
                 pftraced.toml (or --output-dir) to a directory pftraced can use",
                file.display()
            )
        );
        let err = RollingOutput::new(&OutputConfig::default(), "h").unwrap_err().to_string();
        assert!(err.contains("output.dir is not set"), "{err}");
        fs::remove_file(&file).unwrap();
    }

    #[test]
    fn removed_dir_is_reported_and_writing_resumes() {
        let dir = temp("removed");
        let clock = WallClock::measure();
        let mut out = RollingOutput::new(&config(&dir, 1 << 20, 3600), "h").unwrap();
        out.retry_interval = Duration::from_millis(50);
        out.write_calls(
            &calls(0, 10),
            &mut crate::codes::CodeReader::new(&Default::default()),
            &clock,
            |pid| PROCESSES.get(&pid),
        );
        out.flush();
        // The directory is removed and a file takes its place.
        fs::remove_dir_all(&dir).unwrap();
        fs::write(&dir, "in the way").unwrap();
        out.flush();
        let status = out.status();
        assert_eq!(status.write_errors, 1);
        assert!(
            status
                .last_error
                .as_deref()
                .unwrap()
                .ends_with("was deleted while being written; starting a new file")
        );
        out.write_calls(
            &calls(10, 10),
            &mut crate::codes::CodeReader::new(&Default::default()),
            &clock,
            |pid| PROCESSES.get(&pid),
        );
        let status = out.status();
        assert_eq!((status.write_errors, status.calls_not_written), (2, 10));
        let error = status.last_error.unwrap();
        assert_eq!(error, format!("directory {0}: {0} is a regular file, not a directory", dir.display()));
        // Within the retry pause nothing is attempted, only counted.
        out.write_calls(
            &calls(20, 5),
            &mut crate::codes::CodeReader::new(&Default::default()),
            &clock,
            |pid| PROCESSES.get(&pid),
        );
        assert_eq!((out.status().write_errors, out.status().calls_not_written), (2, 15));

        fs::remove_file(&dir).unwrap();
        std::thread::sleep(Duration::from_millis(60));
        out.write_calls(
            &calls(30, 10),
            &mut crate::codes::CodeReader::new(&Default::default()),
            &clock,
            |pid| PROCESSES.get(&pid),
        );
        out.close();
        assert_eq!(call_lines(&files(&dir)), (30..40).collect::<Vec<_>>());
        assert_eq!(out.status().calls_written, 20);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn full_disk_is_counted_exactly_and_writing_resumes() {
        let dir = temp("full");
        let _mount = Tmpfs::mount(&dir, "64k");
        let clock = WallClock::measure();
        let mut out = RollingOutput::new(&config(&dir, 1 << 20, 3600), "h").unwrap();
        out.retry_interval = Duration::from_millis(5);
        for chunk in calls(0, 2000).chunks(100) {
            out.write_calls(chunk, &mut crate::codes::CodeReader::new(&Default::default()), &clock, |pid| {
                PROCESSES.get(&pid)
            });
            out.flush();
            std::thread::sleep(Duration::from_millis(6));
        }
        let status = out.status();
        assert!(status.write_errors >= 1);
        assert!(status.last_error.as_deref().unwrap().contains("No space left on device"), "{status:?}");
        assert!(status.calls_written > 0);
        assert_eq!(status.calls_written + status.calls_not_written, 2000);
        // Exactly the calls counted as written are in the files, each once,
        // and every file is readable.
        let lines = call_lines(&files(&dir));
        assert_eq!(lines.len() as u64, status.calls_written);
        assert!(lines.windows(2).all(|w| w[0] < w[1]));

        for path in files(&dir) {
            fs::remove_file(path).unwrap();
        }
        std::thread::sleep(Duration::from_millis(6));
        out.write_calls(
            &calls(5000, 10),
            &mut crate::codes::CodeReader::new(&Default::default()),
            &clock,
            |pid| PROCESSES.get(&pid),
        );
        out.close();
        assert_eq!(call_lines(&files(&dir)), (5000..5010).collect::<Vec<_>>());
        assert_eq!(out.status().calls_written, status.calls_written + 10);
    }

    #[test]
    fn utc_stamps() {
        assert_eq!(utc_stamp(0), "19700101T000000");
        assert_eq!(utc_stamp(951_782_400), "20000229T000000");
        assert_eq!(utc_stamp(1_732_546_496), "20241125T145456");
    }
}
