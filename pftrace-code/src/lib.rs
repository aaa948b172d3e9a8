//! What a traced Python function is, resolved once per code object: the
//! settrace prototype's metadata (`module`, `path`, `args`, `locals`,
//! `stacksize`) plus `qualname`, for pftrace's records, pfw/chrome names,
//! summaries and name matching.
//!
//! Two paths fill one type, [`CodeInfo`]:
//!
//! - **Agent** (3.11+, the code object at hand): [`CodeInfo::from_code_object`]
//!   takes `co_qualname`, `co_varnames`, `co_argcount`,
//!   `co_posonlyargcount`, `co_kwonlyargcount`, `co_flags`, `co_stacksize`
//!   and the frame's `__name__`. Every field is exact. Nothing is null
//!   except what the interpreter lacks (`co_qualname` before 3.11).
//! - **USDT** (3.6-3.10, 3.15+ built `--with-dtrace`; the probe gives file,
//!   name and line only): [`Resolver::resolve`] reads the process from
//!   outside ([`process`]), rebuilds its `sys.path` ([`module`]), parses the
//!   source file with Ruff's parser and lays out its code objects as that
//!   CPython's compiler does ([`source`]), then picks the code object the
//!   probe ran ([`FileCodes::find`]).
//!
//! What the USDT path can and cannot give, and why:
//!
//! | field | USDT path | why |
//! |---|---|---|
//! | `module` | the dotted name, `__main__` for the script and `-m` module | from `co_filename` against the rebuilt `sys.path`; null when the file is under no root, under a root that depends on a working directory that changed since the start, named relatively, or not a `.py` file; `<frozen X>` gives `X` |
//! | `qualname`, `path` | exact on 3.9-3.15 | CPython's `compiler_set_qualname` followed on the parsed file (`<locals>`, `global` declarations, 3.12+ inlined comprehensions, 3.14/3.15 `__annotate__`); null for the `__annotate__` of PEP 695 generic functions |
//! | `args` | exact | parameters are in the source |
//! | `locals` | exact on 3.9-3.15 | `co_varnames` order is the compiler's first emission order: followed (3.9 dead branches, 3.11 `try`/`else` order, 3.12+ comprehension inlining, `finally` bodies compiled again at jumps); null where a construct is not followed (PEP 695 type parameters inside a function, a comprehension inside an annotation, IPython syntax) |
//! | `lineno` | exact, except 3.9 modules whose first statement spans lines | 3.9 sets a module's `co_firstlineno` to its first instruction's line (the entry probe reports it) |
//! | `stacksize` | always null | `co_stacksize` comes from the bytecode, not the source |
//!
//! Anything that makes the source unsafe to trust nulls every
//! source-derived field with the reason: the file is unreadable for the
//! process, not a regular file, larger than [`process::SOURCE_MAX`], not
//! UTF-8, does not parse, was modified after the process started (it may
//! not be what was compiled), or several code objects of that name span the
//! probe's line and differ. A probe line of -1/0 (3.15's entry probe for
//! closures, cell holders and modules) is resolved by the name alone when
//! the file has one code object of that name; a return probe's line always
//! resolves.
//!
//! Checked against CPython itself: `tests/stdlib.rs` compiles every stdlib
//! module with each interpreter (3.9, 3.11, 3.12, 3.13 twice, 3.14, 3.15)
//! and compares every code object; `tests/workloads.rs` runs workloads
//! under a `sys.setprofile` recorder and resolves what it saw from outside.

pub mod info;
pub mod module;
pub mod process;
pub mod resolver;
pub mod source;
pub mod version;

pub use info::{CodeInfo, CodeObjectFacts, Field, Origin, Params};
pub use resolver::{Held, Probe, Resolver};
pub use source::{FileCodes, SourceCode};
pub use version::PyVersion;
