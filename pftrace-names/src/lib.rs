//! What users name: `foo` (exact function name), `json/decoder.py:raw_decode`
//! (function name qualified by a path suffix), shell-style globs
//! (`test_*`, `get_?`, `[ab]*`), optionally qualified too, and qualified
//! names: `JSONDecoder.raw_decode` (a `__qualname__`, any module) and
//! `json.decoder:JSONDecoder.raw_decode` or `json.decoder:*` (a dotted
//! module, then a qualified name or a glob over it).
//!
//! Which is which: a part before `:` that contains `/` or ends in `.py` or
//! `.pyw` is a file (`./script:main` for a script without a suffix);
//! otherwise it is a module. Without `:`, a name with a `.` is a qualified
//! name. In a qualified name or module, `*` and `?` also match dots.
//!
//! Cost: the kernel decides exact names by a hash lookup; a glob is decided in
//! the kernel by its literal prefix (an LPM trie) and finished here, so a glob
//! with a short or empty prefix (`*_handler`) sends every call it might match
//! to user space; a path qualifier is checked here for every call of the
//! function name, in any file. A qualified name gives the kernel its last
//! part (`raw_decode`: the code object's `co_name`) when that part has no
//! wildcard, and nothing otherwise (`json.decoder:*`, `A.get_*`: every call
//! of the process goes to user space); user space then decides the qualified
//! name and module once per code object, after resolving it.

use std::fmt;

use pftrace_common::NAME_LEN;

/// One traced-name form.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NameSpec {
    /// As the user wrote it.
    pub text: String,
    /// Required suffix of the file path (`json/decoder.py`), if qualified.
    pub file_suffix: Option<String>,
    /// Required dotted module (`json.decoder`, or a glob over it).
    pub module: Option<String>,
    /// Required qualified name (`JSONDecoder.raw_decode`, or a glob over it).
    pub qualname: Option<String>,
    /// The `co_name` part: what the kernel filters by.
    pub function: FunctionPattern,
}

/// The function-name part.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum FunctionPattern {
    Exact(String),
    /// A glob and its literal prefix (the part before the first wildcard).
    Glob {
        pattern: String,
        prefix: String,
    },
}

/// A name that cannot be traced.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("empty function name; give a name such as `foo`, `app.py:foo` or `test_*`")]
    Empty,
    #[error("{text:?}: the function part is empty; write FILE:FUNCTION, e.g. `json/decoder.py:raw_decode`")]
    EmptyFunction { text: String },
    #[error("{text:?}: the file part is empty; write FILE:FUNCTION or just FUNCTION")]
    EmptyFile { text: String },
    #[error("{text:?}: function names are matched on at most {max} bytes; this one has {len}")]
    TooLong { text: String, len: usize, max: usize },
    #[error("{text:?}: {what} is not allowed in a function name")]
    BadChar { text: String, what: String },
    #[error("{text:?}: unclosed `[` in glob")]
    UnclosedBracket { text: String },
    #[error(
        "{text:?}: `{class}` is an empty character class, which matches nothing; list characters in it, e.g. `[ab]*`"
    )]
    EmptyClass { text: String, class: String },
    #[error(
        "{text:?}: `{part}` has an empty part between dots; write a dotted name such as \
         `JSONDecoder.raw_decode` or `json.decoder:JSONDecoder.raw_decode`"
    )]
    EmptySegment { text: String, part: String },
    #[error(
        "{text:?}: {what} is not allowed in a module name; write MODULE:QUALNAME with a dotted module, e.g. \
         `json.decoder:raw_decode` (a file part must contain `/` or end in `.py`)"
    )]
    BadModule { text: String, what: String },
    #[error("{text:?}: qualified names are matched on at most {max} bytes; this one has {len}")]
    QualnameTooLong { text: String, len: usize, max: usize },
    #[error(
        "{text:?}: `\\` is not allowed: function names never contain it, and globs have no escapes \
         (`*`, `?` and `[` always mean wildcards)"
    )]
    Backslash { text: String },
}

/// Longest function name (or glob prefix) the kernel compares: its buffer
/// holds NAME_LEN bytes with the NUL, and a name that fills it (NAME_LEN - 1
/// bytes) may be a longer one cut short, so it never matches.
pub const MAX_NAME: usize = NAME_LEN - 2;

/// Longest qualified name (or module) pattern accepted.
pub const MAX_QUALNAME: usize = 1024;

/// Whether the part before `:` names a file (else a module).
fn is_file_part(part: &str) -> bool {
    part.contains('/') || part.ends_with(".py") || part.ends_with(".pyw")
}

fn has_wildcard(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// A dotted pattern has no empty part (`a..b`, `.a`, `a.`).
fn check_segments(dotted: &str, text: &str) -> Result<(), NameError> {
    if dotted.split('.').any(str::is_empty) {
        return Err(NameError::EmptySegment { text: text.into(), part: dotted.into() });
    }
    Ok(())
}

impl NameSpec {
    /// Parses `[FILE:]FUNCTION`, FUNCTION possibly a glob.
    pub fn parse(text: &str) -> Result<Self, NameError> {
        let owned = || text.to_string();
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err(NameError::Empty);
        }
        let (before, after) = match trimmed.rsplit_once(':') {
            Some((file, func)) => {
                if func.is_empty() {
                    return Err(NameError::EmptyFunction { text: owned() });
                }
                if file.is_empty() {
                    return Err(NameError::EmptyFile { text: owned() });
                }
                (Some(file), func)
            }
            None => (None, trimmed),
        };
        let (file_suffix, module) = match before {
            Some(f) if is_file_part(f) => (Some(f.to_string()), None),
            Some(m) => {
                if let Some(c) = m.chars().find(|c| {
                    !(c.is_alphanumeric() || matches!(c, '_' | '.' | '*' | '?' | '[' | ']' | '!' | '-'))
                }) {
                    return Err(NameError::BadModule { text: owned(), what: format!("{c:?}") });
                }
                check_segments(m, text)?;
                if m.len() > MAX_QUALNAME {
                    return Err(NameError::QualnameTooLong {
                        text: owned(),
                        len: m.len(),
                        max: MAX_QUALNAME,
                    });
                }
                if has_wildcard(m) {
                    check_classes(m, text)?;
                }
                (None, Some(m.to_string()))
            }
            None => (None, None),
        };
        let function = after;
        if function.contains('\\') {
            return Err(NameError::Backslash { text: owned() });
        }
        if let Some(c) = function.chars().find(|c| c.is_whitespace() || c.is_control() || *c == '/') {
            return Err(NameError::BadChar { text: owned(), what: format!("{c:?}") });
        }
        // A qualified name: module given, or a dotted name.
        let qualified = module.is_some() || function.contains('.');
        let qualname = qualified.then(|| function.to_string());
        let co_name = if qualified {
            check_segments(function, text)?;
            if function.len() > MAX_QUALNAME {
                return Err(NameError::QualnameTooLong {
                    text: owned(),
                    len: function.len(),
                    max: MAX_QUALNAME,
                });
            }
            if has_wildcard(function) {
                check_classes(function, text)?;
            }
            let last = function.rsplit('.').next().unwrap_or(function);
            // A wildcard in the last part may match dots, so the co_name
            // (after the last dot of the real name) is not bounded by it.
            if has_wildcard(last) { "*" } else { last }
        } else {
            function
        };
        if co_name.len() > MAX_NAME {
            return Err(NameError::TooLong { text: owned(), len: co_name.len(), max: MAX_NAME });
        }
        let function = if has_wildcard(co_name) {
            check_classes(co_name, text)?;
            let prefix: String = co_name.chars().take_while(|c| !matches!(c, '*' | '?' | '[')).collect();
            FunctionPattern::Glob { pattern: co_name.to_string(), prefix }
        } else {
            FunctionPattern::Exact(co_name.to_string())
        };
        Ok(Self { text: trimmed.to_string(), file_suffix, module, qualname, function })
    }

    /// Whether a call of `function` in `file` is one this spec names.
    pub fn matches(&self, function: &str, file: &str) -> bool {
        let name_ok = match &self.function {
            FunctionPattern::Exact(name) => name == function,
            FunctionPattern::Glob { pattern, .. } => glob_match(pattern.as_bytes(), function.as_bytes()),
        };
        name_ok && self.file_suffix.as_deref().is_none_or(|suffix| path_has_suffix(file, suffix))
    }

    /// True when the kernel alone decides this spec (no user-space check).
    pub fn decided_in_kernel(&self) -> bool {
        self.file_suffix.is_none() && !self.needs_code() && matches!(self.function, FunctionPattern::Exact(_))
    }

    /// True when deciding needs the code object's qualified name or module
    /// (after [`Self::matches`] passed).
    pub fn needs_code(&self) -> bool {
        self.module.is_some() || self.qualname.is_some()
    }

    /// The qualified-name and module parts, against a code object's
    /// `co_qualname` and module (`None`: not known, so not matched, except
    /// by a lone `*`: `json.decoder:*` is every code object of that module).
    pub fn matches_code(&self, qualname: Option<&str>, module: Option<&str>) -> bool {
        let part = |want: &Option<String>, have: Option<&str>| match (want, have) {
            (None, _) => true,
            (Some(w), None) if w == "*" => true,
            (Some(_), None) => false,
            (Some(w), Some(h)) => glob_match(w.as_bytes(), h.as_bytes()),
        };
        part(&self.qualname, qualname) && part(&self.module, module)
    }

    /// The whole decision for a code object.
    pub fn matches_all(
        &self,
        function: &str,
        file: &str,
        qualname: Option<&str>,
        module: Option<&str>,
    ) -> bool {
        self.matches(function, file) && (!self.needs_code() || self.matches_code(qualname, module))
    }

    /// Where this form is decided, for `--help`, logs and status.
    pub fn cost(&self) -> &'static str {
        match (&self.function, self.needs_code(), self.file_suffix.is_some()) {
            (FunctionPattern::Exact(_), false, false) => "kernel",
            (FunctionPattern::Exact(_), true, _) => "kernel by co_name, then user space by qualified name",
            (FunctionPattern::Glob { prefix, .. }, true, _) if prefix.is_empty() => {
                "user space only: every call goes to user space"
            }
            (FunctionPattern::Glob { .. }, true, _) => "kernel by co_name prefix, then user space",
            (_, false, true) => "kernel by co_name, then user space by file",
            (FunctionPattern::Glob { .. }, false, false) => "kernel by prefix, then user space",
        }
    }
}

impl fmt::Display for NameSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Every `[` of a glob opens a class that is closed and not empty (`[]`,
/// `[!]` and `[^]` match nothing: surely a mistake).
fn check_classes(glob: &str, text: &str) -> Result<(), NameError> {
    let mut rest = glob;
    while let Some(open) = rest.find('[') {
        let body = &rest[open + 1..];
        let negated = usize::from(body.starts_with(['!', '^']));
        let Some(close) = body.find(']') else {
            return Err(NameError::UnclosedBracket { text: text.into() });
        };
        if close <= negated {
            return Err(NameError::EmptyClass {
                text: text.into(),
                class: rest[open..open + close + 2].into(),
            });
        }
        rest = &body[close + 1..];
    }
    Ok(())
}

/// `file` ends with `suffix` at a path-component boundary
/// (`/usr/lib/python3.9/json/decoder.py` has suffix `json/decoder.py`, not `son/decoder.py`).
fn path_has_suffix(file: &str, suffix: &str) -> bool {
    let suffix = suffix.trim_start_matches("./");
    file == suffix
        || (file.ends_with(suffix)
            && (suffix.starts_with('/') || file[..file.len() - suffix.len()].ends_with('/')))
}

/// Shell-style glob: `*` any run, `?` one char, `[abc]`, `[a-z]`, `[!x]`.
pub fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() {
            match pattern[p] {
                b'*' => {
                    star = Some((p, t));
                    p += 1;
                    continue;
                }
                b'?' => {
                    p += 1;
                    t += 1;
                    continue;
                }
                b'[' => {
                    if let Some((true, next)) = class_match(&pattern[p..], text[t]) {
                        p += next;
                        t += 1;
                        continue;
                    }
                }
                c if c == text[t] => {
                    p += 1;
                    t += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, st)) => {
                p = sp + 1;
                t = st + 1;
                star = Some((sp, st + 1));
            }
            None => return false,
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Matches one byte against a `[...]` class at the start of `pattern`:
/// (matched, length of the class).
fn class_match(pattern: &[u8], c: u8) -> Option<(bool, usize)> {
    let end = pattern.iter().skip(2).position(|&b| b == b']')? + 2;
    let body = &pattern[1..end];
    let (negate, body) = match body.first() {
        Some(b'!' | b'^') => (true, &body[1..]),
        _ => (false, body),
    };
    let mut i = 0;
    let mut hit = false;
    while i < body.len() {
        if i + 2 < body.len() && body[i + 1] == b'-' {
            hit |= (body[i]..=body[i + 2]).contains(&c);
            i += 3;
        } else {
            hit |= body[i] == c;
            i += 1;
        }
    }
    Some((hit != negate, end + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_forms() {
        let s = NameSpec::parse("foo").unwrap();
        assert_eq!(s.function, FunctionPattern::Exact("foo".into()));
        assert!(s.decided_in_kernel());
        let s = NameSpec::parse("json/decoder.py:raw_decode").unwrap();
        assert_eq!(s.file_suffix.as_deref(), Some("json/decoder.py"));
        assert!(!s.decided_in_kernel());
        let s = NameSpec::parse("test_*").unwrap();
        assert_eq!(s.function, FunctionPattern::Glob { pattern: "test_*".into(), prefix: "test_".into() });
        let s = NameSpec::parse("*_handler").unwrap();
        assert!(matches!(s.function, FunctionPattern::Glob { ref prefix, .. } if prefix.is_empty()));
    }

    #[test]
    fn refuses_bad_names() {
        assert_eq!(NameSpec::parse(" "), Err(NameError::Empty));
        assert!(matches!(NameSpec::parse("a.py:"), Err(NameError::EmptyFunction { .. })));
        assert!(matches!(NameSpec::parse(":f"), Err(NameError::EmptyFile { .. })));
        assert!(matches!(NameSpec::parse(&"x".repeat(63)), Err(NameError::TooLong { len: 63, .. })));
        assert!(NameSpec::parse(&"x".repeat(62)).is_ok());
        assert!(matches!(NameSpec::parse("a b"), Err(NameError::BadChar { .. })));
        assert!(matches!(NameSpec::parse("f[ab"), Err(NameError::UnclosedBracket { .. })));
        assert!(matches!(NameSpec::parse("f[ab]x[c"), Err(NameError::UnclosedBracket { .. })));
        assert!(matches!(NameSpec::parse("f]["), Err(NameError::UnclosedBracket { .. })));
        assert_eq!(
            NameSpec::parse("f[]").unwrap_err().to_string(),
            "\"f[]\": `[]` is an empty character class, which matches nothing; list characters in it, e.g. `[ab]*`"
        );
        assert!(
            matches!(NameSpec::parse("a.py:[!]x"), Err(NameError::EmptyClass { ref class, .. }) if class == "[!]")
        );
        assert_eq!(
            NameSpec::parse(r"f\*").unwrap_err().to_string(),
            r#""f\\*": `\` is not allowed: function names never contain it, and globs have no escapes (`*`, `?` and `[` always mean wildcards)"#
        );
        assert!(NameSpec::parse("[ab]*[!c]").is_ok());
    }

    #[test]
    fn matching() {
        let q = NameSpec::parse("json/decoder.py:raw_decode").unwrap();
        assert!(q.matches("raw_decode", "/usr/lib/python3.9/json/decoder.py"));
        assert!(!q.matches("raw_decode", "/usr/lib/python3.9/myjson/decoder.py"));
        assert!(!q.matches("raw_decode", "/app/other.py"));
        assert!(!q.matches("decode", "/usr/lib/python3.9/json/decoder.py"));
        let g = NameSpec::parse("test_*").unwrap();
        assert!(g.matches("test_trace", "t.py") && g.matches("test_", "t.py"));
        assert!(!g.matches("tes", "t.py") && !g.matches("atest_x", "t.py"));
    }

    #[test]
    fn globs() {
        let m = |p: &str, t: &str| glob_match(p.as_bytes(), t.as_bytes());
        assert!(m("*", "") && m("*", "abc") && m("a*c", "abbbc") && m("a?c", "abc"));
        assert!(!m("a?c", "ac") && !m("a*d", "abc"));
        assert!(m("[ab]x", "bx") && !m("[ab]x", "cx") && m("[a-c]*", "cat") && m("[!a]*", "bat"));
        assert!(!m("[!a]*", "at") && m("*_handler", "on_click_handler") && !m("*_handler", "handler"));
    }
}

#[cfg(test)]
mod qualified_tests {
    use super::*;

    #[test]
    fn qualified_forms() {
        let s = NameSpec::parse("JSONDecoder.raw_decode").unwrap();
        assert_eq!(s.function, FunctionPattern::Exact("raw_decode".into()));
        assert_eq!((s.module.as_deref(), s.qualname.as_deref()), (None, Some("JSONDecoder.raw_decode")));
        assert!(s.needs_code() && !s.decided_in_kernel());
        assert!(s.matches_all("raw_decode", "/x.py", Some("JSONDecoder.raw_decode"), Some("json.decoder")));
        assert!(!s.matches_all("raw_decode", "/x.py", Some("Other.raw_decode"), Some("json.decoder")));
        assert!(!s.matches_all("raw_decode", "/x.py", None, Some("json.decoder")));

        let m = NameSpec::parse("json.decoder:*").unwrap();
        assert_eq!(m.function, FunctionPattern::Glob { pattern: "*".into(), prefix: String::new() });
        assert_eq!(m.module.as_deref(), Some("json.decoder"));
        assert!(m.matches_all("raw_decode", "/d.py", Some("JSONDecoder.raw_decode"), Some("json.decoder")));
        assert!(!m.matches_all("raw_decode", "/d.py", Some("JSONDecoder.raw_decode"), Some("json")));
        assert!(!m.matches_all("raw_decode", "/d.py", Some("JSONDecoder.raw_decode"), None));
        assert!(m.matches_all("f", "/d.py", None, Some("json.decoder")));

        let g = NameSpec::parse("A.get_*").unwrap();
        assert_eq!(g.function, FunctionPattern::Glob { pattern: "*".into(), prefix: String::new() });
        assert!(g.matches_all("y", "f.py", Some("A.get_x.<locals>.y"), Some("m")));
        let l = NameSpec::parse("mod:outer.<locals>.inner").unwrap();
        assert_eq!(l.function, FunctionPattern::Exact("inner".into()));
        let k = NameSpec::parse("pkg.*:K.run").unwrap();
        assert!(k.matches_all("run", "f.py", Some("K.run"), Some("pkg.sub")));
        assert!(!k.matches_all("run", "f.py", Some("K.run"), Some("pkgx")));
        // Files stay files.
        let f = NameSpec::parse("app.py:foo").unwrap();
        assert_eq!((f.file_suffix.as_deref(), f.module.as_deref()), (Some("app.py"), None));
        assert!(!f.needs_code());
        let f = NameSpec::parse("./script:foo").unwrap();
        assert_eq!(f.file_suffix.as_deref(), Some("./script"));
    }

    #[test]
    fn malformed_qualified_forms() {
        let e = NameSpec::parse("JSONDecoder.").unwrap_err();
        assert!(matches!(e, NameError::EmptySegment { .. }), "{e}");
        assert!(e.to_string().contains("empty part between dots"), "{e}");
        assert!(matches!(NameSpec::parse("json..decoder:f"), Err(NameError::EmptySegment { .. })));
        assert!(matches!(NameSpec::parse(".f"), Err(NameError::EmptySegment { .. })));
        assert!(matches!(NameSpec::parse("json.decoder:"), Err(NameError::EmptyFunction { .. })));
        assert!(matches!(NameSpec::parse("my mod:f"), Err(NameError::BadModule { .. })));
        assert!(matches!(NameSpec::parse("m:A.[b"), Err(NameError::UnclosedBracket { .. })));
        let long = format!("m:{}", "a.".repeat(600) + "b");
        assert!(matches!(NameSpec::parse(&long), Err(NameError::QualnameTooLong { .. })));
    }
}
