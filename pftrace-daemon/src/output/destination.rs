//! Where a run's final trace goes (`-o`, the default `pftrace-<pid>.json`,
//! or a directory of PerfFlowAspect files): checked and opened before
//! tracing starts, so a bad place is refused before a command runs or a
//! process is attached, with the spill of every call created beside it
//! (which also proves the place is writable). At the end the trace is
//! rendered from the spill into a temporary file and renamed into place;
//! if that fails, the error names the spill, which then stays.

use std::{
    ffi::OsString,
    io::Write as _,
    path::{Path, PathBuf},
};

use super::{
    Choice, pfw,
    safe_file::{self, Dir, FileError},
    spill::SpillWriter,
};
use crate::trace::Trace;

/// Mode of trace files (before the umask) and of directories made for PerfFlowAspect files.
const FILE_MODE: u32 = 0o644;
const DIR_MODE: u32 = 0o755;

/// A place the trace cannot go, or a trace that could not be written.
#[derive(Debug, thiserror::Error)]
pub enum DestinationError {
    #[error("cannot write the trace to {path}: {source}")]
    Refused { path: String, source: FileError },
    #[error(
        "{source}; every call ({calls}) is kept in {spill}; `pftracectl calls {spill}` prints them as JSON \
         lines (see the README, \"Files pftraced writes\")"
    )]
    Kept { source: FileError, calls: u64, spill: String },
    #[error("{0}")]
    Failed(FileError),
}

/// Where the final trace goes, opened.
#[derive(Debug)]
pub struct Destination {
    dir: Dir,
    /// The file's name; None for PerfFlowAspect files (one per process in `dir`).
    name: Option<OsString>,
    /// As given, for messages.
    path: PathBuf,
    format: Choice,
}

/// One file written: its path and how many calls it holds.
pub type Written = (PathBuf, u64);

impl Destination {
    /// Checks `path` (a file, or for PerfFlowAspect files a directory, made
    /// if missing) and creates the spill beside it. `known_pids`: processes
    /// whose PerfFlowAspect file names can be checked now. `sort_budget`:
    /// calls held in memory while rendering.
    pub fn prepare(
        path: &Path,
        format: &Choice,
        hostname: &str,
        known_pids: &[u32],
        sort_budget: usize,
    ) -> Result<(Self, SpillWriter), DestinationError> {
        let refused = |source| DestinationError::Refused { path: path.display().to_string(), source };
        let (dir, name) = match format {
            Choice::Pfw(opts) => {
                let dir = Dir::open(path, Some(DIR_MODE)).map_err(refused)?;
                for &pid in known_pids {
                    dir.existing(&OsString::from(opts.file_name(hostname, pid))).map_err(refused)?;
                }
                (dir, None)
            }
            _ => {
                let (parent, name) = safe_file::split(path).map_err(refused)?;
                let dir = Dir::open(&parent, None).map_err(refused)?;
                dir.existing(&name).map_err(refused)?;
                (dir, Some(name))
            }
        };
        let spill = SpillWriter::create(&dir, sort_budget).map_err(refused)?;
        Ok((Self { dir, name, path: path.to_path_buf(), format: format.clone() }, spill))
    }

    /// The path as given.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the trace, replacing any earlier file of the same name
    /// atomically, and removes the spill once it is written.
    pub fn write(&self, trace: &Trace) -> Result<Vec<Written>, DestinationError> {
        let written = match (&self.format, &self.name) {
            (Choice::Pfw(opts), _) => pfw::write_files(trace, &self.dir, opts)
                .map(|files| files.into_iter().map(|f| (f.path, f.calls)).collect()),
            (format, Some(name)) => self.write_file(trace, format, name),
            (_, None) => unreachable!("a single-file format always has a name"),
        };
        match (written, &trace.spilled) {
            (Ok(written), spill) => {
                if let Some(spill) = spill
                    && let Err(e) = spill.remove()
                {
                    log::warn!("removing {}: {e}", spill.path.display());
                }
                Ok(written)
            }
            (Err(source), Some(spill)) => Err(DestinationError::Kept {
                source,
                calls: spill.calls,
                spill: spill.path.display().to_string(),
            }),
            (Err(source), None) => Err(DestinationError::Failed(source)),
        }
    }

    fn write_file(&self, trace: &Trace, format: &Choice, name: &OsString) -> Result<Vec<Written>, FileError> {
        let mut file = self.dir.replacement(name, FILE_MODE)?;
        let failed =
            |source| FileError::Io { action: "writing", path: self.path.display().to_string(), source };
        format.clone().boxed().write(trace, file.file()).map_err(failed)?;
        file.file().flush().map_err(failed)?;
        file.commit()?;
        Ok(vec![(self.path.clone(), trace.call_source().len())])
    }
}
