//! The traced names as a whole: which keys the kernel's name map and prefix
//! trie hold (reference-counted, since `foo` and `a.py:foo` share the key
//! `foo`), and the user-space check that finishes globs and path qualifiers,
//! cached per distinct (function, file) string pair.

use std::{collections::HashMap, sync::Arc};

use pftrace_common::config;

use crate::{
    bpf::{BpfError, KernelProbes},
    names::{FunctionPattern, NameError, NameSpec},
};

/// Errors changing the traced names.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    Bpf(Box<BpfError>),
    #[error("{0:?} is not traced (traced: {1})")]
    NotTraced(String, String),
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
    /// (function ptr, file ptr) → keep? Valid until the specs change.
    cache: HashMap<(usize, usize), bool>,
    /// Records dropped here (the kernel passed them; path or glob did not match).
    pub dropped: u64,
    /// Bumped on every change so the kernel's verdict cache forgets old answers.
    generation: u32,
    /// Some traced name has a path qualifier or a glob: records need a check here.
    needs_user_check: bool,
}

impl NameFilter {
    pub fn texts(&self) -> Vec<String> {
        self.specs.iter().map(|s| s.text.clone()).collect()
    }

    /// Adds names (already traced ones are left as they are). All are parsed
    /// before any is added, so a bad name changes nothing.
    pub fn add(&mut self, probes: &mut KernelProbes, texts: &[String]) -> Result<(), FilterError> {
        let specs = texts.iter().map(|t| NameSpec::parse(t)).collect::<Result<Vec<_>, _>>()?;
        for spec in specs {
            if self.specs.contains(&spec) {
                continue;
            }
            match &spec.function {
                FunctionPattern::Exact(name) => {
                    let refs = self.exact_refs.entry(name.clone()).or_default();
                    if *refs == 0 {
                        probes.add_name(name)?;
                    }
                    *refs += 1;
                }
                FunctionPattern::Glob { prefix, .. } => {
                    let refs = self.prefix_refs.entry(prefix.clone()).or_default();
                    if *refs == 0 {
                        probes.add_prefix(prefix)?;
                    }
                    *refs += 1;
                }
            }
            self.specs.push(spec);
        }
        self.changed(probes)
    }

    /// Removes names; each must be traced (as written when added).
    pub fn remove(&mut self, probes: &mut KernelProbes, texts: &[String]) -> Result<(), FilterError> {
        let specs = texts.iter().map(|t| NameSpec::parse(t)).collect::<Result<Vec<_>, _>>()?;
        for spec in &specs {
            if !self.specs.contains(spec) {
                return Err(FilterError::NotTraced(spec.text.clone(), self.texts().join(", ")));
            }
        }
        for spec in specs {
            self.specs.retain(|s| s != &spec);
            let (refs, key) = match &spec.function {
                FunctionPattern::Exact(name) => (&mut self.exact_refs, name),
                FunctionPattern::Glob { prefix, .. } => (&mut self.prefix_refs, prefix),
            };
            let count = refs.get_mut(key).expect("added with the spec");
            *count -= 1;
            if *count == 0 {
                refs.remove(key);
                match &spec.function {
                    FunctionPattern::Exact(name) => probes.remove_name(name)?,
                    FunctionPattern::Glob { prefix, .. } => probes.remove_prefix(prefix)?,
                }
            }
        }
        self.changed(probes)
    }

    fn changed(&mut self, probes: &mut KernelProbes) -> Result<(), FilterError> {
        probes.set_config(config::HAS_PREFIXES, u32::from(!self.prefix_refs.is_empty()))?;
        self.generation = self.generation.wrapping_add(1);
        self.needs_user_check = !self.specs.iter().all(NameSpec::decided_in_kernel);
        probes.set_config(config::GENERATION, self.generation)?;
        self.cache.clear();
        Ok(())
    }

    /// Whether a record the kernel passed is one of the traced names.
    pub fn keep(&mut self, function: &Arc<str>, file: &Arc<str>) -> bool {
        if !self.needs_user_check {
            return true;
        }
        let key = (Arc::as_ptr(function) as *const u8 as usize, Arc::as_ptr(file) as *const u8 as usize);
        let specs = &self.specs;
        let keep = *self.cache.entry(key).or_insert_with(|| specs.iter().any(|s| s.matches(function, file)));
        if !keep {
            self.dropped += 1;
        }
        keep
    }
}
