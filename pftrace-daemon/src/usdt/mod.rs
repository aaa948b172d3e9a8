//! USDT (SystemTap SDT) probes: finding them in ELF files and describing
//! their arguments for the eBPF program.
//!
//! Public API:
//! - [`read_python_function_probes`]`(path) -> Result<Vec<ProbeSite>>`: CPython's
//!   `python:function__entry` / `function__return` sites of one file (empty if none).
//! - [`read_probes`]`(path) -> Result<Vec<ProbeSite>>`: every probe site of a file;
//!   [`read_probes_matching`]`(path, keep)` for a chosen subset; [`probes_in`]`(data, path, keep)`
//!   for a file already open (any of object's `ReadRef` readers: a `ReadCache` reads only the
//!   headers, notes and program headers, never the whole file).
//! - [`ProbeSite`]: provider, name, `pc_offset` (the uprobe's file offset),
//!   `semaphore_offset` (its `ref_ctr_offset`, 0 if none), the argument
//!   string and its parsed [`UsdtArg`](pftrace_common::UsdtArg)s;
//!   `spec()` gives the [`UsdtSpec`](pftrace_common::UsdtSpec) of the first
//!   three arguments, `python_kind()` gives `kind::ENTRY` / `kind::RETURN`.
//! - [`argspec`]: `parse_arg`, `parse_args`, `parse_spec`, `spec_from_args`,
//!   `reg_offset` for x86-64 argument strings such as `8@%rbp 8@%r12 -4@%eax`.
//! - [`notes`]: `read_notes`, `parse_notes` (records framed by object's note
//!   iterator), `apply_prelink` and [`UsdtNote`] for the raw `.note.stapsdt` records.
//! - [`segments`]: [`Segments::file_offset`] maps a virtual address to a file
//!   offset through the PT_LOAD segments ([`AddrKind`] says code or data).
//! - [`UsdtError`]: every failure, naming the file, probe or argument text.
//!
//! Only x86-64 ELF64 files are accepted by the `read_*` functions.

pub mod argspec;
mod error;
pub mod notes;
mod probes;
pub mod segments;

#[cfg(test)]
mod tests;

pub use error::{Result, UsdtError};
pub use notes::UsdtNote;
pub use probes::{
    FUNCTION_ENTRY, FUNCTION_RETURN, PYTHON_PROVIDER, ProbeSite, elf64_x86_64_header,
    is_python_function_note, probes_in, read_probes, read_probes_matching, read_python_function_probes,
    resolve,
};
pub use segments::{AddrKind, LoadSegment, Segments};
