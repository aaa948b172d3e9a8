//! The code objects a source file compiles to, as the process's CPython
//! makes them: for each, `co_name`, `co_firstlineno`, the last line it
//! spans, the qualified name, the parameters and the other locals. Parsed
//! once per file identity (see [`crate::Resolver`]); a probe's (name, line)
//! is then matched against this list.

mod symtable;
mod varnames;
mod walk;

use crate::{info::Params, version::PyVersion};

pub use symtable::Lines;

/// One code object of the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceCode {
    /// `co_name`.
    pub name: String,
    /// `co_qualname`, or why it is not claimed.
    pub qualname: Result<String, String>,
    /// Where its source starts: the first decorator's line for decorated
    /// functions and classes (3.8+), the `lambda` keyword's line, the
    /// comprehension's first line (a call's parenthesis for `f(x for x in
    /// y)`), 1 for the module.
    pub firstlineno: u32,
    /// `co_firstlineno`, or why it is not known from the source.
    pub lineno: Result<u32, String>,
    /// The last line of its source.
    pub lastline: u32,
    /// Nesting depth (module 0).
    pub depth: u32,
    pub params: Params,
    /// `co_varnames` after the parameters, or why it is not claimed.
    pub locals: Result<Vec<String>, String>,
}

/// All code objects of one file, in the compiler's order.
#[derive(Debug)]
pub struct FileCodes {
    pub version: PyVersion,
    pub codes: Vec<SourceCode>,
}

impl FileCodes {
    /// Parses `source` and lays out its code objects as CPython `version`
    /// compiles them (`optimize`: the `-O` level). Err: the file does not
    /// parse, or `version` is outside the analysed range.
    pub fn analyze(source: &str, version: PyVersion, optimize: u8) -> Result<Self, String> {
        if !version.is_analysed() {
            return Err(format!(
                "CPython {version}: the source analysis follows CPython {}-{} only",
                crate::version::OLDEST,
                crate::version::NEWEST
            ));
        }
        let parsed =
            ruff_python_parser::parse_module(source).map_err(|e| format!("the file does not parse: {e}"))?;
        let module = parsed.syntax();
        let lines = Lines::new(source);
        let mut b = symtable::Builder::build(&module.body, &lines, version);
        symtable::analyze(&mut b.scopes, version);
        let scopes = &b.scopes;
        let mut codes = Vec::new();
        for (i, s) in scopes.iter().enumerate() {
            if s.inlined || (s.synthetic && s.name != "__annotate__") {
                continue;
            }
            let mut depth = 0;
            let mut p = s.parent;
            while let Some(q) = p {
                depth += 1;
                p = scopes[q].parent;
            }
            let qualname = match s.annotate_owner {
                Some(o) if scopes[o].generic => {
                    Err("not followed: the __annotate__ of a function with PEP 695 type parameters"
                        .to_string())
                }
                _ => Ok(s.qualname.clone()),
            };
            let locals = varnames::varnames(scopes, &b.by_range, i, version, optimize, b.future_annotations)
                .map(|v| v[s.params.len()..].to_vec());
            codes.push(SourceCode {
                name: s.name.clone(),
                qualname,
                firstlineno: s.firstlineno,
                lineno: s.firstlineno_exact.ok_or_else(|| {
                    format!(
                        "CPython {version} sets a module's co_firstlineno to the line of its first instruction, \
                         not known from the source here (the entry probe reports it)"
                    )
                }),
                lastline: s.lastline,
                depth,
                params: Params {
                    names: s.params.clone(),
                    posonly: s.posonly,
                    positional: s.positional,
                    kwonly: s.kwonly,
                    varargs: s.varargs,
                    varkw: s.varkw,
                },
                locals,
            });
        }
        Ok(Self { version, codes })
    }

    /// The code object named `name` that a probe reporting `line` ran.
    ///
    /// `line` > 0: the innermost code object of that name whose source
    /// spans the line (an entry probe's `co_firstlineno` on 3.6-3.10, or a
    /// line inside the body: a return, a generator's resumption). `line` <=
    /// 0 (3.15's entry probe for closures and cell holders reports -1, for
    /// modules 0): the name alone, if it is unique in the file. Several
    /// candidates that differ in what they say are an error, never a guess.
    pub fn find(&self, name: &str, line: i64) -> Result<&SourceCode, String> {
        let named: Vec<&SourceCode> = self.codes.iter().filter(|c| c.name == name).collect();
        if named.is_empty() {
            return Err(format!("no code object named {name:?} in the file as read now"));
        }
        let candidates: Vec<&SourceCode> = if line > 0 {
            let line = line as u32;
            let spanning: Vec<&SourceCode> =
                named.into_iter().filter(|c| c.firstlineno <= line && line <= c.lastline).collect();
            let Some(deepest) = spanning.iter().map(|c| c.depth).max() else {
                return Err(format!(
                    "no code object named {name:?} spans line {line} in the file as read now"
                ));
            };
            spanning.into_iter().filter(|c| c.depth == deepest).collect()
        } else {
            named
        };
        let first = candidates[0];
        if candidates.iter().all(|c| **c == *first) {
            Ok(first)
        } else if line > 0 {
            Err(format!("{} code objects named {name:?} span line {line}", candidates.len()))
        } else {
            Err(format!(
                "the probe gave no line ({line}) and the file has {} code objects named {name:?}",
                candidates.len()
            ))
        }
    }
}
