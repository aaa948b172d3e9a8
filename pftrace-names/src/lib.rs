//! What users name: `foo` (exact function name), `json/decoder.py:raw_decode`
//! (function name qualified by a path suffix), and shell-style globs
//! (`test_*`, `get_?`, `[ab]*`), optionally qualified too.
//!
//! Cost: the kernel decides exact names by a hash lookup; a glob is decided in
//! the kernel by its literal prefix (an LPM trie) and finished here, so a glob
//! with a short or empty prefix (`*_handler`) sends every call it might match
//! to user space; a path qualifier is checked here for every call of the
//! function name, in any file.

use std::fmt;

use pftrace_common::NAME_LEN;

/// One traced-name form.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NameSpec {
    /// As the user wrote it.
    pub text: String,
    /// Required suffix of the file path (`json/decoder.py`), if qualified.
    pub file_suffix: Option<String>,
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
        "{text:?}: `\\` is not allowed: function names never contain it, and globs have no escapes \
         (`*`, `?` and `[` always mean wildcards)"
    )]
    Backslash { text: String },
}

/// Longest function name (or glob prefix) the kernel compares: its buffer
/// holds NAME_LEN bytes with the NUL, and a name that fills it (NAME_LEN - 1
/// bytes) may be a longer one cut short, so it never matches.
pub const MAX_NAME: usize = NAME_LEN - 2;

impl NameSpec {
    /// Parses `[FILE:]FUNCTION`, FUNCTION possibly a glob.
    pub fn parse(text: &str) -> Result<Self, NameError> {
        let owned = || text.to_string();
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err(NameError::Empty);
        }
        let (file_suffix, function) = match trimmed.rsplit_once(':') {
            Some((file, func)) => {
                if func.is_empty() {
                    return Err(NameError::EmptyFunction { text: owned() });
                }
                if file.is_empty() {
                    return Err(NameError::EmptyFile { text: owned() });
                }
                (Some(file.to_string()), func)
            }
            None => (None, trimmed),
        };
        if function.contains('\\') {
            return Err(NameError::Backslash { text: owned() });
        }
        if let Some(c) = function.chars().find(|c| c.is_whitespace() || c.is_control() || *c == '/') {
            return Err(NameError::BadChar { text: owned(), what: format!("{c:?}") });
        }
        if function.len() > MAX_NAME {
            return Err(NameError::TooLong { text: owned(), len: function.len(), max: MAX_NAME });
        }
        let function = if function.contains(['*', '?', '[']) {
            check_classes(function, text)?;
            let prefix: String = function.chars().take_while(|c| !matches!(c, '*' | '?' | '[')).collect();
            FunctionPattern::Glob { pattern: function.to_string(), prefix }
        } else {
            FunctionPattern::Exact(function.to_string())
        };
        Ok(Self { text: trimmed.to_string(), file_suffix, function })
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
        self.file_suffix.is_none() && matches!(self.function, FunctionPattern::Exact(_))
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
