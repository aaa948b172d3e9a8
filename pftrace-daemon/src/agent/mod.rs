//! The in-process agent's host side, for CPythons whose USDT probes do not
//! fire (see `python::mechanism`): installing the agent's files
//! (`install`, with the shared object embedded in pftraced at build time),
//! the command line checks of launch mode (`launch`), loading it into a
//! running CPython 3.14+ through PEP 768 (`remote`), the agent's control
//! socket (`server`), its records (`records`) and copies of it loaded from
//! an earlier pftraced (`mapped`).

use std::path::{Path, PathBuf};

pub mod install;
pub mod launch;
pub mod mapped;
pub mod records;
pub mod remote;
pub mod server;

/// The agent's shared object, built from `pftrace-agent` by build.rs and
/// embedded, so a `pftraced` copied anywhere carries the agent that matches
/// its kernel side and protocol (as it carries its eBPF object).
pub static AGENT_SO: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/pftrace_agent.so"));

/// Why the agent's probe function was not found.
#[derive(Debug, thiserror::Error)]
pub enum SymbolError {
    #[error("{path}: no exported symbol {symbol}; is it pftrace's agent?")]
    NoProbe { path: PathBuf, symbol: String },
    #[error("{path}: {source}")]
    Elf { path: PathBuf, source: std::io::Error },
}

/// File offset of an exported function in an ELF shared object.
pub fn symbol_offset(path: &Path, symbol: &str) -> Result<u64, SymbolError> {
    use object::{Object as _, ObjectSection as _, ObjectSymbol as _};
    let elf = |source| SymbolError::Elf { path: path.to_path_buf(), source };
    let data = std::fs::read(path).map_err(elf)?;
    let file = object::File::parse(&*data)
        .map_err(|e| elf(std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())))?;
    let sym = file
        .dynamic_symbols()
        .find(|s| s.name() == Ok(symbol))
        .ok_or_else(|| SymbolError::NoProbe { path: path.to_path_buf(), symbol: symbol.to_string() })?;
    let section = sym
        .section_index()
        .and_then(|i| file.section_by_index(i).ok())
        .ok_or_else(|| SymbolError::NoProbe { path: path.to_path_buf(), symbol: symbol.to_string() })?;
    let (file_off, _) = section
        .file_range()
        .ok_or_else(|| SymbolError::NoProbe { path: path.to_path_buf(), symbol: symbol.to_string() })?;
    Ok(sym.address() - section.address() + file_off)
}

/// An agent's return: kept without the name filter (its entry passed it),
/// and paired with its entry by the code id in `frame` (marked with
/// [`records::CODE_ID_BIT`]), whose name and file the call takes. USDT
/// records carry frame addresses without that bit.
pub fn pairs_by_code(ev: &crate::events::Event) -> bool {
    ev.kind == crate::events::EventKind::Return && ev.frame.is_some_and(|f| f & records::CODE_ID_BIT != 0)
}

/// Whether a record goes past pftraced's name filter unchecked: an agent's
/// return (its entry was checked), and an agent's entry named
/// [`records::UNKNOWN_NAME`] (its code object is one the agent traces, but
/// its name never reached pftraced, so there is nothing to check). Such an
/// entry was dropped when a glob or qualified name was traced, and its
/// return then counted as unmatched: a hostile process's 1,000 calls of
/// serials never announced gave 1,000 calls filtered and 1,000 returns
/// unmatched, against 1,000 calls named unknown with names traced bare.
pub fn skips_name_filter(ev: &crate::events::Event) -> bool {
    pairs_by_code(ev)
        || ev.kind == crate::events::EventKind::Entry
            && ev.frame.is_some_and(|f| f & records::CODE_ID_BIT != 0)
            && *ev.name == *records::UNKNOWN_NAME
}
