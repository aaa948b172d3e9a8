//! What is known of one code object, filled by either path: from the code
//! object itself (the agent, [`CodeObjectFacts`]) or from the source file
//! (the USDT path, [`crate::Resolver`]). A field that cannot be had is
//! [`Field::Unknown`] with the reason, and serializes as `null`: a trace
//! never carries a guess.

use serde::{Serialize, Serializer};

/// A field known exactly, or unknown with the reason why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Field<T> {
    Known(T),
    Unknown(String),
}

impl<T> Field<T> {
    pub fn unknown(reason: impl Into<String>) -> Self {
        Self::Unknown(reason.into())
    }

    pub fn known(&self) -> Option<&T> {
        match self {
            Self::Known(v) => Some(v),
            Self::Unknown(_) => None,
        }
    }

    pub fn reason(&self) -> Option<&str> {
        match self {
            Self::Known(_) => None,
            Self::Unknown(r) => Some(r),
        }
    }

    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Field<U> {
        match self {
            Self::Known(v) => Field::Known(f(v)),
            Self::Unknown(r) => Field::Unknown(r),
        }
    }
}

impl<T: Serialize> Serialize for Field<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Known(v) => v.serialize(s),
            Self::Unknown(_) => s.serialize_none(),
        }
    }
}

/// `co_flags` bits that describe the parameters.
pub const CO_VARARGS: u32 = 0x04;
pub const CO_VARKEYWORDS: u32 = 0x08;

/// The parameters of a code object, as `co_varnames[:n]` orders them:
/// positional-only, positional-or-keyword, keyword-only, `*args`, `**kwargs`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Params {
    /// All parameter names in `co_varnames` order (the prototype's `args`).
    pub names: Vec<String>,
    /// `co_posonlyargcount`.
    pub posonly: u32,
    /// `co_argcount` (positional-only included, as CPython counts).
    pub positional: u32,
    /// `co_kwonlyargcount`.
    pub kwonly: u32,
    /// `CO_VARARGS`: the name after the keyword-only ones is `*args`.
    pub varargs: bool,
    /// `CO_VARKEYWORDS`: the last name is `**kwargs`.
    pub varkw: bool,
}

impl Params {
    /// How many of `co_varnames` are parameters.
    pub fn count(&self) -> usize {
        self.names.len()
    }
}

/// What the agent (or any code holding the code object) reads from it:
/// `co_name`, `co_filename`, `co_firstlineno`, `co_qualname` (3.11+),
/// `co_varnames`, `co_argcount`, `co_posonlyargcount`, `co_kwonlyargcount`,
/// `co_flags`, `co_stacksize`, and `__name__` of the frame's globals.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CodeObjectFacts {
    pub name: String,
    pub filename: String,
    pub firstlineno: u32,
    /// `co_qualname`; `None` before 3.11, where the code object has none.
    pub qualname: Option<String>,
    pub varnames: Vec<String>,
    pub argcount: u32,
    pub posonlyargcount: u32,
    pub kwonlyargcount: u32,
    pub flags: u32,
    pub stacksize: u32,
    /// `__name__` in the globals of a frame running the code.
    pub module: Option<String>,
}

/// Where a [`CodeInfo`] came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// Read from the code object in the process (the agent).
    CodeObject,
    /// Resolved from outside: the probe's file, name and line, the source
    /// file and the process's import roots.
    Source,
}

/// One traced function, resolved once per code object: the prototype's
/// metadata record (`function`, `lineno`, `filename`, `module`, `path`,
/// `args`, `locals`, `stacksize`) plus `qualname` and the parameter kinds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CodeInfo {
    /// `co_name`.
    pub function: String,
    /// `co_filename`.
    pub filename: String,
    /// `co_firstlineno`.
    pub lineno: Field<u32>,
    /// The dotted module name as the process imported it (`__name__`).
    pub module: Field<String>,
    /// `co_qualname` / the function's `__qualname__`.
    pub qualname: Field<String>,
    /// The parameters.
    pub params: Field<Params>,
    /// `co_varnames` after the parameters.
    pub locals: Field<Vec<String>>,
    /// `co_stacksize`.
    pub stacksize: Field<u32>,
    pub origin: Origin,
}

/// Bytes a field holds on the heap: `known`'s for a value, the reason's
/// length for an unknown one.
fn field_bytes<T>(f: &Field<T>, known: impl Fn(&T) -> usize) -> usize {
    match f {
        Field::Known(v) => known(v),
        Field::Unknown(why) => why.len(),
    }
}

/// Bytes of a list of names: each string and its 24-byte handle.
fn names_bytes(names: &[String]) -> usize {
    names.iter().map(|n| n.len() + 24).sum()
}

impl CodeInfo {
    /// What this takes in memory: the struct and every string it holds.
    /// Caches of answers are bounded with it: a traced process chooses its
    /// file names (4,000 bytes each, also in the reasons of unknown fields:
    /// about 20 KB an answer then).
    pub fn heap_bytes(&self) -> u64 {
        let strings = self.function.len()
            + self.filename.len()
            + field_bytes(&self.lineno, |_| 0)
            + field_bytes(&self.module, String::len)
            + field_bytes(&self.qualname, String::len)
            + field_bytes(&self.params, |p| names_bytes(&p.names))
            + field_bytes(&self.locals, |l| names_bytes(l))
            + field_bytes(&self.stacksize, |_| 0);
        (size_of::<Self>() + strings) as u64
    }

    /// The info of a code object read in the process: every field exact,
    /// except `qualname` before 3.11 (no `co_qualname`) and `module` when
    /// the frame's globals had no string `__name__`.
    pub fn from_code_object(f: &CodeObjectFacts) -> Self {
        let nparams = f.argcount as usize
            + f.kwonlyargcount as usize
            + usize::from(f.flags & CO_VARARGS != 0)
            + usize::from(f.flags & CO_VARKEYWORDS != 0);
        let (params, locals) = if nparams <= f.varnames.len() {
            let params = Params {
                names: f.varnames[..nparams].to_vec(),
                posonly: f.posonlyargcount,
                positional: f.argcount,
                kwonly: f.kwonlyargcount,
                varargs: f.flags & CO_VARARGS != 0,
                varkw: f.flags & CO_VARKEYWORDS != 0,
            };
            (Field::Known(params), Field::Known(f.varnames[nparams..].to_vec()))
        } else {
            let why = format!(
                "co_varnames has {} names but the counts give {nparams} parameters",
                f.varnames.len()
            );
            (Field::unknown(why.clone()), Field::unknown(why))
        };
        Self {
            function: f.name.clone(),
            filename: f.filename.clone(),
            lineno: Field::Known(f.firstlineno),
            module: f
                .module
                .clone()
                .map_or_else(|| Field::unknown("the frame's globals have no string __name__"), Field::Known),
            qualname: f.qualname.clone().map_or_else(
                || Field::unknown("code objects have no co_qualname before CPython 3.11"),
                Field::Known,
            ),
            params,
            locals,
            stacksize: Field::Known(f.stacksize),
            origin: Origin::CodeObject,
        }
    }

    /// `module.qualname`, the prototype's `path` (`json.decoder.JSONDecoder.raw_decode`).
    pub fn path(&self) -> Field<String> {
        match (&self.module, &self.qualname) {
            (Field::Known(m), Field::Known(q)) => Field::Known(format!("{m}.{q}")),
            (Field::Unknown(r), _) => Field::Unknown(format!("module: {r}")),
            (_, Field::Unknown(r)) => Field::Unknown(format!("qualname: {r}")),
        }
    }

    /// The prototype's `args`: parameter names in `co_varnames` order.
    pub fn args(&self) -> Field<Vec<String>> {
        self.params.clone().map(|p| p.names)
    }

    /// Each unknown field with its reason, for a trace's metadata.
    pub fn reasons(&self) -> Vec<(&'static str, String)> {
        let path = self.path();
        let all: [(&'static str, Option<&str>); 7] = [
            ("lineno", self.lineno.reason()),
            ("module", self.module.reason()),
            ("qualname", self.qualname.reason()),
            ("path", path.reason()),
            ("args", self.params.reason()),
            ("locals", self.locals.reason()),
            ("stacksize", self.stacksize.reason()),
        ];
        all.into_iter().filter_map(|(k, r)| r.map(|r| (k, r.to_string()))).collect()
    }
}

/// The prototype's metadata record, in its field order, with `qualname`,
/// the parameter kinds, and the reasons for what is null.
impl Serialize for CodeInfo {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("function", &self.function)?;
        m.serialize_entry("lineno", &self.lineno)?;
        m.serialize_entry("stacksize", &self.stacksize)?;
        m.serialize_entry("filename", &self.filename)?;
        m.serialize_entry("args", &self.args())?;
        m.serialize_entry("locals", &self.locals)?;
        m.serialize_entry("module", &self.module)?;
        m.serialize_entry("path", &self.path())?;
        m.serialize_entry("qualname", &self.qualname)?;
        m.serialize_entry("params", &self.params)?;
        m.serialize_entry("origin", &self.origin)?;
        let reasons = self.reasons();
        if !reasons.is_empty() {
            m.serialize_entry(
                "unresolved",
                &reasons.into_iter().collect::<std::collections::BTreeMap<_, _>>(),
            )?;
        }
        m.end()
    }
}
