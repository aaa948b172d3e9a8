//! The decision per code object: is this function traced? Decided once per
//! code object and generation of the traced names, and kept in the code
//! object's own extra slot (`PyUnstable_Code_SetExtra`), so the answer dies
//! with the code object and an address reused by a new one is never misread.
//!
//! Slot value: NULL = not decided yet; odd = not traced, decided at
//! generation `value >> 1`; even = a `Box<CodeInfo>` (traced at some
//! generation; its strings are what the kernel copies into records).

use std::{
    cell::Cell,
    ffi::{CString, c_void},
    sync::atomic::{AtomicU64, Ordering},
};

use crate::{
    capi::{Api, Obj},
    names::NameSpec,
};

/// The traced names.
#[derive(Debug, Default, Clone)]
pub struct Matcher {
    specs: Vec<NameSpec>,
}

impl Matcher {
    pub const fn new() -> Self {
        Self { specs: Vec::new() }
    }

    /// Parses each name; an invalid one is skipped and returned in the error
    /// list (pftraced validates names before sending them).
    pub fn parse(names: &[String]) -> (Self, Vec<String>) {
        let mut specs = Vec::new();
        let mut errors = Vec::new();
        for n in names {
            match NameSpec::parse(n) {
                Ok(s) => specs.push(s),
                Err(e) => errors.push(e.to_string()),
            }
        }
        (Self { specs }, errors)
    }

    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    /// Whether some name is a qualified form (`A.run`, `json.decoder:*`),
    /// which needs the code object's qualified name and module.
    pub fn needs_code(&self) -> bool {
        self.specs.iter().any(NameSpec::needs_code)
    }

    /// Whether a function named `function`, defined in `file`, with
    /// `co_qualname` `qualname` in module `module` (None: not known), is traced.
    pub fn matches(&self, function: &str, file: &str, qualname: Option<&str>, module: Option<&str>) -> bool {
        self.specs.iter().any(|s| s.matches_all(function, file, qualname, module))
    }
}

/// A code object's `co_qualname` (3.11+) and the module it runs in (the
/// current frame's globals' `__name__`: the callers run at the start of
/// that code object's frame), read only when a qualified form is traced.
fn code_names(api: &Api, code: Obj, matcher: &Matcher) -> (Option<String>, Option<String>) {
    if !matcher.needs_code() {
        return (None, None);
    }
    let qualname = api
        .attr(code, c"co_qualname")
        .and_then(|q| api.text(&q).and_then(|b| std::str::from_utf8(b).ok()).map(str::to_string));
    // Borrowed references: the globals dict and its __name__.
    let globals = unsafe { (api.eval_get_globals)() };
    let module = if globals.is_null() {
        api.clear_error();
        None
    } else {
        let name = unsafe { (api.dict_get_item_string)(globals, c"__name__".as_ptr()) };
        if name.is_null() {
            None
        } else {
            unsafe { (api.inc_ref)(name) };
            api.owned(name)
                .and_then(|n| api.text(&n).and_then(|b| std::str::from_utf8(b).ok()).map(str::to_string))
        }
    };
    (qualname, module)
}

/// Serials of code objects, process-wide (0 is never given).
static SERIAL: AtomicU64 = AtomicU64::new(0);

/// What the agent keeps of a traced code object.
pub struct CodeInfo {
    generation: Cell<u32>,
    matched: Cell<bool>,
    /// The code id its reports carry: unique in the process for its
    /// lifetime (a freed code object's address may be reused; this is not).
    pub serial: u64,
    /// The report session in which its strings were sent (0: never; see report.rs).
    pub sent: Cell<u32>,
    /// `co_name` and `co_filename`, NUL-terminated: the kernel reads them.
    pub name: CString,
    pub file: CString,
    pub line: i32,
}

/// Frees a slot value (the code object is being freed; the GIL is held).
pub unsafe extern "C" fn free_slot(value: *mut c_void) {
    let v = value as usize;
    if v != 0 && v & 1 == 0 {
        drop(unsafe { Box::from_raw(value as *mut CodeInfo) });
    }
}

/// The code object's info when it is traced under `generation`, deciding
/// (and remembering) first if needed. The GIL must be held; `matcher` is the
/// set of names of that generation.
#[inline]
pub fn traced<'a>(
    api: &Api,
    index: isize,
    code: Obj,
    generation: u32,
    matcher: &Matcher,
) -> Option<&'a CodeInfo> {
    let mut slot: *mut c_void = std::ptr::null_mut();
    if unsafe { (api.code_get_extra)(code, index, &mut slot) } != 0 {
        api.clear_error();
        return None;
    }
    let v = slot as usize;
    if v & 1 == 1 {
        if (v >> 1) as u32 == generation {
            return None;
        }
    } else if v != 0 {
        // SAFETY: even non-null values are CodeInfo boxes this module set;
        // they live as long as the code object, which the caller holds.
        let info: &'a CodeInfo = unsafe { &*(slot as *const CodeInfo) };
        if info.generation.get() != generation {
            let (q, m) = code_names(api, code, matcher);
            let m = matcher.matches(
                &info.name.to_string_lossy(),
                &info.file.to_string_lossy(),
                q.as_deref(),
                m.as_deref(),
            );
            info.matched.set(m);
            info.generation.set(generation);
        }
        return info.matched.get().then_some(info);
    }
    decide(api, index, code, generation, matcher)
}

/// First decision for a code object (or after the names changed, for one
/// that was not traced): reads its name and file once.
#[cold]
fn decide<'a>(
    api: &Api,
    index: isize,
    code: Obj,
    generation: u32,
    matcher: &Matcher,
) -> Option<&'a CodeInfo> {
    let name = api.attr(code, c"co_name")?;
    let file = api.attr(code, c"co_filename")?;
    let (name_b, file_b) = (api.text(&name)?, api.text(&file)?);
    let (Ok(name_s), Ok(file_s)) = (std::str::from_utf8(name_b), std::str::from_utf8(file_b)) else {
        return None;
    };
    let (q, m) = code_names(api, code, matcher);
    if !matcher.matches(name_s, file_s, q.as_deref(), m.as_deref()) {
        let tag = ((generation as usize) << 1) | 1;
        if unsafe { (api.code_set_extra)(code, index, tag as *mut c_void) } != 0 {
            api.clear_error();
        }
        return None;
    }
    let line = api.attr(code, c"co_firstlineno").map(|l| api.as_int(l.ptr)).unwrap_or(0);
    // Interior NULs cannot occur in identifiers; a file name with one is cut there.
    let cstr = |b: &[u8]| CString::new(b.split(|&c| c == 0).next().unwrap_or(b"")).unwrap_or_default();
    let info = Box::new(CodeInfo {
        generation: Cell::new(generation),
        matched: Cell::new(true),
        serial: SERIAL.fetch_add(1, Ordering::Relaxed) + 1,
        sent: Cell::new(0),
        name: cstr(name_b),
        file: cstr(file_b),
        line: line as i32,
    });
    let p = Box::into_raw(info);
    if unsafe { (api.code_set_extra)(code, index, p as *mut c_void) } != 0 {
        api.clear_error();
        drop(unsafe { Box::from_raw(p) });
        return None;
    }
    // Whatever was there before (an odd tag) owned nothing.
    Some(unsafe { &*p })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matcher_uses_all_three_forms() {
        let (m, errors) =
            Matcher::parse(&["foo".into(), "pkg/mod.py:bar".into(), "test_*".into(), "a b".into()]);
        assert_eq!(errors.len(), 1, "the name with a space is refused");
        assert!(m.matches("foo", "/x/y.py", None, None));
        assert!(m.matches("bar", "/src/pkg/mod.py", None, None));
        assert!(!m.matches("bar", "/src/otherpkg/mod.py", None, None));
        assert!(m.matches("test_one", "t.py", None, None));
        assert!(!m.matches("tes", "t.py", None, None));
        assert!(Matcher::default().is_empty() && !m.needs_code());
        let (q, errors) = Matcher::parse(&["A.run".into(), "json.decoder:*".into()]);
        assert!(errors.is_empty() && q.needs_code());
        assert!(q.matches("run", "/a.py", Some("A.run"), Some("app")));
        assert!(!q.matches("run", "/a.py", Some("B.run"), Some("app")));
        assert!(q.matches("decode", "/d.py", Some("JSONDecoder.decode"), Some("json.decoder")));
        assert!(!q.matches("decode", "/d.py", Some("JSONDecoder.decode"), None));
    }
}
