//! The error type of the `usdt` module: what went wrong, in which file, at which probe.

use std::path::PathBuf;

/// Everything that can go wrong while reading USDT probes out of an ELF file
/// or parsing their argument strings. Errors about a file name the file;
/// errors about an argument quote the argument text.
#[derive(Debug, thiserror::Error)]
pub enum UsdtError {
    /// The file could not be read at all.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The file is not an ELF file, or its headers are damaged.
    #[error("{} is not a readable ELF file: {reason}", path.display())]
    NotElf { path: PathBuf, reason: String },

    /// A valid ELF file of a kind we do not handle (32-bit, not x86-64).
    #[error("{} is not supported: {reason}", path.display())]
    Unsupported { path: PathBuf, reason: String },

    /// A record of the `.note.stapsdt` section is truncated or malformed.
    #[error("{}: bad .note.stapsdt record (note {index} of the section, from 0): {reason}", path.display())]
    BadNote { path: PathBuf, index: usize, reason: String },

    /// The file has no PT_LOAD program header, so no address can be mapped.
    #[error("{} has no PT_LOAD segment: cannot map addresses to file offsets", path.display())]
    NoLoadSegments { path: PathBuf },

    /// An address (probe pc or semaphore) lies in no PT_LOAD segment.
    #[error("{}: {what} at address {addr:#x} lies in no PT_LOAD segment", path.display())]
    AddressNotMapped { path: PathBuf, what: String, addr: u64 },

    /// An address lies in a segment of the wrong kind: a probe pc outside
    /// code, or a semaphore inside code.
    #[error(
        "{}: {what} at address {addr:#x} lies in the {} segment [{seg_start:#x}, {seg_end:#x}); it must be in {}",
        path.display(),
        if *seg_executable { "executable" } else { "non-executable" },
        if *seg_executable { "a non-executable (data) segment" } else { "an executable segment" }
    )]
    WrongSegment {
        path: PathBuf,
        what: String,
        addr: u64,
        seg_start: u64,
        seg_end: u64,
        seg_executable: bool,
    },

    /// One argument of a USDT argument string could not be parsed.
    #[error("USDT argument '{arg}': {reason}")]
    BadArg { arg: String, reason: String },

    /// An argument string has fewer arguments than a spec needs.
    #[error("USDT argument string '{args}' has {found} argument(s), {needed} needed")]
    TooFewArgs { args: String, found: usize, needed: usize },

    /// An argument error, placed in the file and probe it came from.
    #[error("{}: probe {provider}:{name}: {source}", path.display())]
    InProbe {
        path: PathBuf,
        provider: String,
        name: String,
        #[source]
        source: Box<UsdtError>,
    },
}

/// Shorthand for results of this module.
pub type Result<T, E = UsdtError> = std::result::Result<T, E>;
