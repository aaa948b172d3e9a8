//! Trace output formats, one file per format behind the small [`TraceFormat`]
//! trait, and the registry that picks one by name ([`choose`], [`by_name`]).
//!
//! Names: `chrome` (the default), `pfw` (PerfFlowAspect's files) and
//! `records` (the settrace prototype's JSON). PerfFlowAspect options come as
//! a PERFFLOW_OPTIONS-style string, either separately (`--pfw-options`) or
//! after the name (`pfw:log-format=Object:log-event=Compact`), the form a
//! dump request carries them in.
//!
//! Formats read calls through [`calls::CallSource`]: from memory for a
//! dump, from the spill of every call (`spill.rs`) for a run's final trace,
//! sorted in bounded memory (`sort.rs`). Files are created through
//! `safe_file.rs`; `destination.rs` places a run's final trace;
//! `rolling.rs` writes completed calls to rolling files while tracing;
//! `summary.rs` is the end-of-run table.

mod call_record;
pub mod calls;
mod chrome;
pub mod destination;
pub mod events;
pub mod pfw;
mod records;
pub mod rolling;
pub mod safe_file;
pub mod sort;
pub mod spill;
mod spill_record;
pub mod summary;

use std::io::{self, Write};

pub use chrome::Chrome;
pub use pfw::{Pfw, PfwOptionError, PfwOptions};
pub use records::Records;

use crate::trace::Trace;

/// A way of writing a trace to a byte stream.
pub trait TraceFormat {
    /// Writes the whole trace.
    fn write(&self, trace: &Trace, out: &mut dyn Write) -> io::Result<()>;
}

/// The names [`choose`] knows, default first.
pub const FORMATS: [&str; 3] = ["chrome", "pfw", "records"];

/// A format name or options that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("unknown trace format {0:?}; known formats: chrome (default), pfw, records")]
    Unknown(String),
    #[error("PerfFlowAspect options only apply to the pfw format, not {0}")]
    OptionsWithoutPfw(String),
    #[error("{0}")]
    Pfw(#[from] PfwOptionError),
}

/// A format picked by name, with its options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    Chrome,
    Pfw(PfwOptions),
    Records,
}

impl Choice {
    /// The format as a single-stream writer.
    pub fn boxed(self) -> Box<dyn TraceFormat> {
        match self {
            Choice::Chrome => Box::new(Chrome),
            Choice::Pfw(opts) => Box::new(opts.pfw),
            Choice::Records => Box::new(Records),
        }
    }

    /// The bare format name (`pfw` for `pfw:...`).
    pub fn name(&self) -> &'static str {
        match self {
            Choice::Chrome => "chrome",
            Choice::Pfw(_) => "pfw",
            Choice::Records => "records",
        }
    }
}

/// Picks a format: `name` is `chrome`, `records`, `pfw` or
/// `pfw:PERFFLOW_OPTIONS`; `pfw_options` are PerfFlowAspect options given
/// separately (applied after any in the name).
pub fn choose(name: &str, pfw_options: Option<&str>) -> Result<Choice, FormatError> {
    let (base, inline) = match name.split_once(':') {
        Some((base, rest)) => (base.trim(), Some(rest)),
        None => (name.trim(), None),
    };
    match base {
        "pfw" => {
            let joined = [inline, pfw_options].into_iter().flatten().collect::<Vec<_>>().join(":");
            Ok(Choice::Pfw(PfwOptions::parse(&joined)?))
        }
        "chrome" | "records" if inline.is_some() || pfw_options.is_some_and(|o| !o.trim().is_empty()) => {
            Err(FormatError::OptionsWithoutPfw(base.into()))
        }
        "chrome" => Ok(Choice::Chrome),
        "records" => Ok(Choice::Records),
        _ => Err(FormatError::Unknown(name.into())),
    }
}

/// The single-stream writer for a format name (see [`choose`]).
pub fn by_name(name: &str, pfw_options: Option<&str>) -> Result<Box<dyn TraceFormat>, FormatError> {
    choose(name, pfw_options).map(Choice::boxed)
}

#[cfg(test)]
pub(crate) mod testing {
    //! A small trace for the formats' unit tests (pids are above the
    //! kernel's pid limit, so nothing in /proc answers for them), and a
    //! small file system to fill.

    use std::{fs, path::PathBuf, process::Command, sync::Arc};

    use crate::{
        bpf::Counters,
        clock::WallClock,
        pairing::{Call, CallEnd},
        trace::{JobId, ProcessSample, Trace, TracedProcess},
    };

    const MS: u64 = 1_000_000;

    /// A tmpfs mounted for one test (needs root); unmounted and removed on drop.
    pub struct Tmpfs(PathBuf);

    impl Tmpfs {
        pub fn mount(dir: &std::path::Path, size: &str) -> Self {
            fs::create_dir_all(dir).unwrap();
            let size = format!("size={size}");
            let mounted = Command::new("mount").args(["-t", "tmpfs", "-o", &size, "tmpfs"]).arg(dir).status();
            assert!(
                mounted.is_ok_and(|s| s.success()),
                "cannot mount a tmpfs on {} (needs root)",
                dir.display()
            );
            Self(dir.to_path_buf())
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn call(pid: u32, tid: u32, name: &str, file: &str, start_ms: u64, end_ms: u64, depth: u32) -> Call {
        Call {
            pid,
            tid,
            name: Arc::from(name),
            file: Arc::from(file),
            line: 7,
            start_ns: 1000 * MS + start_ms * MS,
            end_ns: 1000 * MS + end_ms * MS,
            depth,
            id: 0,
            parent: 0,
            end: CallEnd::Returned,
            cpu_ns: Some((end_ms - start_ms) * MS * 3 / 4),
            rss_entry_bytes: 100_000_000,
            rss_return_bytes: 300_000_000,
        }
    }

    /// What the resolver would say of a function of module `app` (`/srv/app.py`).
    pub fn app_code(call: &Call, qualname: &str, args: &[&str]) -> pftrace_code::CodeInfo {
        use pftrace_code::{Field, Params};
        let names: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        pftrace_code::CodeInfo {
            lineno: Field::Known(call.line as u32),
            module: Field::Known("app".into()),
            qualname: Field::Known(qualname.into()),
            params: Field::Known(Params { positional: names.len() as u32, names, ..Default::default() }),
            locals: Field::Known(vec!["i".into()]),
            stacksize: Field::unknown(pftrace_code::resolver::STACKSIZE_WHY),
            ..crate::codes::unresolved(call, "")
        }
    }

    /// Process 4200001 (comm `worker`, slurm job 42): `outer` calling
    /// `inner` (method `Job.inner`) on its main thread and `inner` on thread
    /// 4200002, both resolved. Process 4200002 (no comm): an incomplete
    /// `outer` from another file on thread 4200003, never resolved.
    pub fn sample_trace() -> Trace {
        let mut open = call(4_200_002, 4_200_003, "outer", "/srv/other.py", 500, 600, 0);
        open.end = CallEnd::Incomplete;
        open.cpu_ns = None;
        let sample = |ms: u64, cpu: f64| ProcessSample {
            pid: 4_200_001,
            ts_ns: 1000 * MS + ms * MS,
            cpu_percent: cpu,
            user_cpu_s: cpu / 100.0,
            rss_bytes: 200_000_000,
            peak_rss_bytes: 300_000_000,
        };
        let codes = crate::codes::CodeTable::default();
        for (name, qualname, args) in [("outer", "outer", &[][..]), ("inner", "Job.inner", &["self"][..])] {
            let c = call(4_200_001, 4_200_001, name, "/srv/app.py", 0, 1, 0);
            codes.insert(crate::codes::CodeKey::of_call(&c), Arc::new(app_code(&c, qualname, args)));
        }
        Trace {
            names: vec!["outer".into(), "inner".into()],
            processes: vec![
                TracedProcess {
                    pid: 4_200_001,
                    binary: "/opt/py/bin/python3.9".into(),
                    command: "python3.9 app.py".into(),
                    comm: "worker".into(),
                    job: Some(JobId { variable: "SLURM_JOB_ID".into(), id: "42".into() }),
                    ..Default::default()
                },
                TracedProcess {
                    pid: 4_200_002,
                    binary: "/opt/py/bin/python3.9".into(),
                    ..Default::default()
                },
            ],
            calls: vec![
                call(4_200_001, 4_200_001, "inner", "/srv/app.py", 10, 50, 1),
                call(4_200_001, 4_200_001, "outer", "/srv/app.py", 0, 100, 0),
                call(4_200_001, 4_200_002, "inner", "/srv/app.py", 200, 300, 0),
                open,
            ]
            .into(),
            samples: vec![sample(0, 50.0), sample(200, 90.0)],
            unmatched_returns: vec![],
            unmatched_returns_total: 0,
            unmatched_generator_returns: 0,
            skipped_entries: 0,
            counters: Counters::default(),
            bad_records: 0,
            file_names_cut: 0,
            filtered_in_user_space: 0,
            filtered_by_qualified_name: 0,
            filtered_unresolved: 0,
            calls_total: 0,
            calls_evicted: 0,
            spilled: None,
            functions: vec![],
            clock: WallClock::measure(),
            start_ns: 1000 * MS,
            end_ns: 1600 * MS,
            hostname: "testhost".into(),
            codes,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{fs, sync::Arc};

    use super::*;
    use crate::{
        output::{safe_file::Dir, spill::SpillWriter},
        pairing::{Call, CallEnd},
    };

    /// 3,000 calls over two processes and three threads: recursion three
    /// deep, equal start times, incomplete calls, two files for one name.
    fn many_calls() -> Vec<Call> {
        let mut calls = Vec::new();
        for i in 0..1000u64 {
            let (pid, tid) =
                [(4_200_001, 4_200_001), (4_200_001, 4_200_002), (4_200_002, 4_200_003)][i as usize % 3];
            let t = 1_000_000_000 + (i / 3) * 10_000;
            for depth in (0..3u32).rev() {
                calls.push(Call {
                    pid,
                    tid,
                    name: Arc::from(["outer", "inner", "leaf"][depth as usize]),
                    file: Arc::from(if i % 5 == 0 { "/srv/other.py" } else { "/srv/app.py" }),
                    line: depth as i32 + 1,
                    start_ns: t + u64::from(depth) * (i % 2),
                    end_ns: t + 9_000 - u64::from(depth) * 1000,
                    depth,
                    id: 0,
                    parent: 0,
                    end: if i % 97 == 0 && depth == 0 { CallEnd::Incomplete } else { CallEnd::Returned },
                    cpu_ns: Some(500),
                    rss_entry_bytes: 1000,
                    rss_return_bytes: 2000 + i,
                });
            }
        }
        calls
    }

    #[test]
    fn every_format_writes_the_same_from_the_spill_as_from_memory() {
        let base = crate::output::spill::tests::temp("formats");
        let dir = Dir::open(&base, None).unwrap();
        let mut trace = testing::sample_trace();
        let calls = many_calls();
        let mut spill = SpillWriter::create(&dir, 100).unwrap();
        spill.append(&calls);
        trace.calls = calls.into();
        let mut spilled = Some(spill.finish());
        let pfw_compact = "pfw:log-format=Object:log-event=Compact";
        for name in ["chrome", "records", "pfw", pfw_compact] {
            let writer = by_name(name, None).unwrap();
            let mut from_memory = Vec::new();
            writer.write(&trace, &mut from_memory).unwrap();
            trace.spilled = spilled.take();
            let mut from_spill = Vec::new();
            writer.write(&trace, &mut from_spill).unwrap();
            spilled = trace.spilled.take();
            assert!(from_memory == from_spill, "{name} differs when written from the spill");
            assert!(from_memory.len() > 300_000, "{name}: {} bytes", from_memory.len());
        }
        // PerfFlowAspect's files, one per process.
        let opts = PfwOptions::default();
        let (a, b) = (base.join("a"), base.join("b"));
        let files_a = pfw::write_files(&trace, &Dir::open(&a, Some(0o755)).unwrap(), &opts).unwrap();
        trace.spilled = spilled.take();
        let files_b = pfw::write_files(&trace, &Dir::open(&b, Some(0o755)).unwrap(), &opts).unwrap();
        assert_eq!(files_a.len(), 2);
        assert_eq!(files_a.iter().map(|f| f.calls).sum::<u64>(), 3000);
        for (fa, fb) in files_a.iter().zip(&files_b) {
            assert_eq!(fa.path.file_name(), fb.path.file_name());
            assert!(fs::read(&fa.path).unwrap() == fs::read(&fb.path).unwrap(), "{}", fa.path.display());
        }
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn registry() {
        assert_eq!(choose("chrome", None), Ok(Choice::Chrome));
        assert_eq!(choose("records", Some("")), Ok(Choice::Records));
        let Choice::Pfw(o) = choose("pfw:log-format=Object", Some("log-event=Compact")).unwrap() else {
            panic!("not pfw")
        };
        assert_eq!(
            (o.pfw.form, o.pfw.event, o.pfw.cpu_mem),
            (pfw::PfwForm::Object, pfw::PfwEvents::Compact, true)
        );
        let err = by_name("perfetto", None).err().unwrap().to_string();
        assert_eq!(err, "unknown trace format \"perfetto\"; known formats: chrome (default), pfw, records");
        assert_eq!(
            choose("chrome", Some("log-format=Object")),
            Err(FormatError::OptionsWithoutPfw("chrome".into()))
        );
        assert!(matches!(choose("pfw", Some("log-event=Loud")), Err(FormatError::Pfw(_))));
    }
}
