//! The traced names as a whole: which keys the kernel's name map and prefix
//! trie hold (reference-counted, since `foo` and `a.py:foo` share the key
//! `foo`), and the user-space check that finishes globs and path qualifiers,
//! cached per distinct (function, file) string pair, and qualified names and
//! modules, decided per code object (pid, file, name, line) once it is
//! resolved: on the event loop, the first time, since a record cannot wait
//! (the file is parsed once: 0.97 ms for json/decoder.py, 41 ms for
//! argparse.py on a loaded machine; see codes.rs).

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use pftrace_common::{MAX_NAMES, MAX_PREFIXES, config};

use pftrace_code::CodeInfo;

use crate::{
    bpf::{BpfError, KernelProbes},
    events::Event,
    names::{FunctionPattern, NameError, NameSpec},
};

/// What the name and file of a record decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ByName {
    Keep,
    Drop,
    /// Only qualified forms match the name: their code object decides.
    ByCode,
}

/// Whether checking a spec in user space needs a record's file name (a path
/// qualifier, or a qualified name or module, resolved by file and line):
/// then the kernel reads returns' file names too (`config::RETURN_FILE`);
/// otherwise a return carries only the file argument's address, which
/// pairs it (pairing.rs), and the check looks at its name alone.
fn needs_file(spec: &NameSpec) -> bool {
    spec.file_suffix.is_some() || spec.needs_code()
}

/// Code-object decisions cached at most (then the cache is emptied).
const MAX_CODE_VERDICTS: usize = 65_536;

/// Errors changing the traced names. After any of them the names are as
/// they were before the change, in user space and in the kernel.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    Bpf(Box<BpfError>),
    #[error("{0:?} is not traced (traced: {1})")]
    NotTraced(String, String),
    #[error(
        "too many {what}: {traced} are traced and {adding} more were asked for, but the kernel's map holds at \
         most {max}; nothing was changed"
    )]
    TooMany { what: &'static str, traced: usize, adding: usize, max: u32 },
}

/// `?` on the kernel side's errors (boxed: they are large).
impl From<BpfError> for FilterError {
    fn from(err: BpfError) -> Self {
        Self::Bpf(Box::new(err))
    }
}

/// The traced names and their kernel keys.
#[derive(Debug, Default)]
pub struct NameFilter {
    specs: Vec<NameSpec>,
    exact_refs: HashMap<String, usize>,
    prefix_refs: HashMap<String, usize>,
    /// (function ptr, file ptr) → verdict. Valid until the specs change.
    cache: crate::fast_hash::FastMap<(usize, usize), ByName>,
    /// (function ptr, file ptr, line, pid) → (keep?, resolved?), for names
    /// only qualified forms match. Valid until the specs change.
    code_cache: crate::fast_hash::FastMap<(usize, usize, i32, u32), (bool, bool)>,
    /// Records dropped here (the kernel passed them; path, glob, qualified
    /// name or module did not match).
    pub dropped: u64,
    /// Of `dropped`: records whose qualified name or module did not match.
    pub dropped_by_qualname: u64,
    /// Of those: records whose code object could not be resolved (its
    /// qualified name or module unknown), so no qualified form could match.
    pub dropped_unresolved: u64,
    /// Bumped on every change so the kernel's verdict cache forgets old answers.
    generation: u32,
    /// Some traced name has a path qualifier or a glob: records need a check here.
    needs_user_check: bool,
    /// The decoder's string sweeps the caches were emptied for (they key by
    /// strings' addresses without holding the strings: see string_bound.rs).
    sweeps: u64,
}

impl NameFilter {
    /// Empties the caches keyed by string addresses if the decoder swept
    /// strings out since the last call (`sweeps`: its count of sweeps).
    pub fn after_sweeps(&mut self, sweeps: u64) {
        if sweeps != self.sweeps {
            self.sweeps = sweeps;
            self.cache.clear();
            self.code_cache.clear();
        }
    }

    pub fn texts(&self) -> Vec<String> {
        self.specs.iter().map(|s| s.text.clone()).collect()
    }

    /// Adds names (already traced ones are left as they are): all of them,
    /// or none when one is invalid, the kernel's maps would overflow, or a
    /// map update fails (the keys added until then are taken out again).
    pub fn add(&mut self, probes: &mut KernelProbes, texts: &[String]) -> Result<(), FilterError> {
        let specs = texts.iter().map(|t| NameSpec::parse(t)).collect::<Result<Vec<_>, _>>()?;
        let traced: HashSet<&NameSpec> = self.specs.iter().collect();
        let mut seen = HashSet::new();
        let new: Vec<NameSpec> =
            specs.into_iter().filter(|s| !traced.contains(s) && seen.insert(s.clone())).collect();
        // The kernel keys the new names need that are not there yet.
        let mut exact: Vec<&str> = Vec::new();
        let mut prefixes: Vec<&str> = Vec::new();
        for spec in &new {
            match &spec.function {
                FunctionPattern::Exact(name) if !self.exact_refs.contains_key(name) => exact.push(name),
                FunctionPattern::Glob { prefix, .. } if !self.prefix_refs.contains_key(prefix) => {
                    prefixes.push(prefix);
                }
                _ => {}
            }
        }
        exact.sort_unstable();
        exact.dedup();
        prefixes.sort_unstable();
        prefixes.dedup();
        for (what, traced, adding, max) in [
            ("function names", self.exact_refs.len(), exact.len(), MAX_NAMES),
            ("glob prefixes", self.prefix_refs.len(), prefixes.len(), MAX_PREFIXES),
        ] {
            if traced + adding > max as usize {
                return Err(FilterError::TooMany { what, traced, adding, max });
            }
        }
        // A return's file name is read from the first record the new keys
        // let through, before any record reaches the check that needs it.
        if new.iter().any(needs_file) {
            probes.set_config(config::RETURN_FILE, 1)?;
        }
        let mut done = Vec::new();
        let inserted = exact
            .iter()
            .map(|&k| Key::Exact(k))
            .chain(prefixes.iter().map(|&k| Key::Prefix(k)))
            .try_for_each(|key| key.insert(probes).map(|()| done.push(key)));
        if let Err(err) = inserted {
            for key in done {
                key.remove_logged(probes);
            }
            // Verdicts cached while a taken-out key was in the map must go.
            self.bump_generation(probes)?;
            return Err(err.into());
        }
        for spec in new {
            let (refs, key) = self.refs_of(&spec);
            *refs.entry(key).or_default() += 1;
            self.specs.push(spec);
        }
        self.changed(probes)
    }

    /// Removes names; each must be traced (as written when added). All of
    /// them, or none (a kernel map update that fails puts back what it took out).
    pub fn remove(&mut self, probes: &mut KernelProbes, texts: &[String]) -> Result<(), FilterError> {
        let mut specs = Vec::new();
        for text in texts {
            let spec = NameSpec::parse(text)?;
            if !self.specs.contains(&spec) {
                return Err(FilterError::NotTraced(spec.text.clone(), self.texts().join(", ")));
            }
            if !specs.contains(&spec) {
                specs.push(spec);
            }
        }
        // Keys whose last spec goes.
        let mut going: HashMap<(bool, String), usize> = HashMap::new();
        for spec in &specs {
            let (exact, key) = match &spec.function {
                FunctionPattern::Exact(name) => (true, name.clone()),
                FunctionPattern::Glob { prefix, .. } => (false, prefix.clone()),
            };
            *going.entry((exact, key)).or_default() += 1;
        }
        let emptied: Vec<Key<'_>> = going
            .iter()
            .filter(|((exact, key), n)| {
                let refs = if *exact { &self.exact_refs } else { &self.prefix_refs };
                refs.get(key) == Some(n)
            })
            .map(|((exact, key), _)| if *exact { Key::Exact(key) } else { Key::Prefix(key) })
            .collect();
        let mut done = Vec::new();
        let removed = emptied.iter().try_for_each(|key| key.remove(probes).map(|()| done.push(*key)));
        if let Err(err) = removed {
            for key in done {
                if let Err(e) = key.insert(probes) {
                    log::warn!("putting back traced name {key:?} after a failed remove: {e}");
                }
            }
            self.bump_generation(probes)?;
            return Err(err.into());
        }
        for spec in &specs {
            self.specs.retain(|s| s != spec);
            let (refs, key) = self.refs_of(spec);
            if let Some(n) = refs.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    refs.remove(&key);
                }
            }
        }
        self.changed(probes)
    }

    /// The reference counts and key a spec uses.
    fn refs_of(&mut self, spec: &NameSpec) -> (&mut HashMap<String, usize>, String) {
        match &spec.function {
            FunctionPattern::Exact(name) => (&mut self.exact_refs, name.clone()),
            FunctionPattern::Glob { prefix, .. } => (&mut self.prefix_refs, prefix.clone()),
        }
    }

    fn changed(&mut self, probes: &mut KernelProbes) -> Result<(), FilterError> {
        probes.set_config(config::HAS_PREFIXES, u32::from(!self.prefix_refs.is_empty()))?;
        probes.set_config(config::RETURN_FILE, u32::from(self.specs.iter().any(needs_file)))?;
        self.needs_user_check = !self.specs.iter().all(NameSpec::decided_in_kernel);
        self.cache.clear();
        self.code_cache.clear();
        self.bump_generation(probes)
    }

    /// A process ended: its code-object decisions go (a pid may be reused).
    pub fn forget(&mut self, pid: u32) {
        if !self.code_cache.is_empty() {
            self.code_cache.retain(|k, _| k.3 != pid);
        }
    }

    /// Makes the kernel forget its cached verdicts (they carry the generation they were made in).
    fn bump_generation(&mut self, probes: &mut KernelProbes) -> Result<(), FilterError> {
        self.generation = self.generation.wrapping_add(1);
        probes.set_config(config::GENERATION, self.generation)?;
        Ok(())
    }

    /// Whether a record the kernel passed is one of the traced names.
    /// `code` resolves the record's code object (asked only when a
    /// qualified form is all that matches its name).
    pub fn keep(&mut self, ev: &Event, code: impl FnOnce() -> Arc<CodeInfo>) -> bool {
        if !self.needs_user_check {
            return true;
        }
        let (function, file) = (&ev.name, &ev.file);
        let ptr = |s: &Arc<str>| Arc::as_ptr(s) as *const u8 as usize;
        let key = (ptr(function), ptr(file));
        let specs = &self.specs;
        let by_name = *self.cache.entry(key).or_insert_with(|| {
            let named: Vec<&NameSpec> = specs.iter().filter(|s| s.matches(function, file)).collect();
            if named.iter().any(|s| !s.needs_code()) {
                ByName::Keep
            } else if named.is_empty() {
                ByName::Drop
            } else {
                ByName::ByCode
            }
        });
        let keep = match by_name {
            ByName::Keep => true,
            ByName::Drop => false,
            ByName::ByCode => {
                let ckey = (key.0, key.1, ev.line, ev.pid);
                let (keep, resolved) = match self.code_cache.get(&ckey) {
                    Some(v) => *v,
                    None => {
                        let info = code();
                        let (q, m) = (
                            info.qualname.known().map(String::as_str),
                            info.module.known().map(String::as_str),
                        );
                        let keep =
                            specs.iter().any(|s| s.needs_code() && s.matches_all(function, file, q, m));
                        let v = (keep, q.is_some() && m.is_some());
                        if !v.1 {
                            log::debug!(
                                "{function} in {file} (pid {}, line {}): not selected by qualified name: {}",
                                ev.pid,
                                ev.line,
                                info.qualname.reason().or(info.module.reason()).unwrap_or("?")
                            );
                        }
                        if self.code_cache.len() >= MAX_CODE_VERDICTS {
                            self.code_cache.clear();
                        }
                        self.code_cache.insert(ckey, v);
                        v
                    }
                };
                if !keep {
                    self.dropped_by_qualname += 1;
                    self.dropped_unresolved += u64::from(!resolved);
                }
                keep
            }
        };
        if !keep {
            self.dropped += 1;
        }
        keep
    }
}

/// A key of the kernel's name map or prefix trie.
#[derive(Debug, Clone, Copy)]
enum Key<'a> {
    Exact(&'a str),
    Prefix(&'a str),
}

impl Key<'_> {
    fn insert(self, probes: &mut KernelProbes) -> Result<(), BpfError> {
        match self {
            Key::Exact(name) => probes.add_name(name),
            Key::Prefix(prefix) => probes.add_prefix(prefix),
        }
    }

    fn remove(self, probes: &mut KernelProbes) -> Result<(), BpfError> {
        match self {
            Key::Exact(name) => probes.remove_name(name),
            Key::Prefix(prefix) => probes.remove_prefix(prefix),
        }
    }

    fn remove_logged(self, probes: &mut KernelProbes) {
        if let Err(e) = self.remove(probes) {
            log::warn!("taking traced name {self:?} back out after a failed add: {e}");
        }
    }
}
