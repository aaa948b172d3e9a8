//! The one place for CPython version differences in how source becomes code
//! objects. Each rule names the versions it was measured on (the static
//! test compiles whole standard libraries with each interpreter and compares
//! every code object).

use std::fmt;

/// A CPython `major.minor`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PyVersion {
    pub major: u8,
    pub minor: u8,
}

impl fmt::Display for PyVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// The versions whose compilers the source analysis follows; others get
/// `args`/`locals`/`qualname` null (their rules were not measured).
pub const OLDEST: PyVersion = PyVersion::new(3, 9);
pub const NEWEST: PyVersion = PyVersion::new(3, 15);

impl PyVersion {
    pub const fn new(major: u8, minor: u8) -> Self {
        Self { major, minor }
    }

    /// `3.9`, `3.15` (also `3.9.2`: the micro part is ignored).
    pub fn parse(s: &str) -> Option<Self> {
        let mut it = s.split('.');
        let major = it.next()?.parse().ok()?;
        let minor = it.next()?.parse().ok()?;
        Some(Self::new(major, minor))
    }

    const fn at_least(self, major: u8, minor: u8) -> bool {
        self.major > major || (self.major == major && self.minor >= minor)
    }

    pub fn is_analysed(self) -> bool {
        self >= OLDEST && self <= NEWEST
    }

    /// 3.9 compiles the body of `if 0:` / `while 0:` (and the `else` of
    /// `if 1:`, `if __debug__:`) in a no-emit mode that adds no names to
    /// `co_varnames`; 3.10+ compile the dead code and drop it later, after
    /// its names were added (3.9.2: `['x', 'live']`, 3.11-3.15:
    /// `['x', 'dead', 'dead2', 'live', 'dead3']`).
    pub fn skips_dead_branches(self) -> bool {
        !self.at_least(3, 10)
    }

    /// 3.11+ compile a `try`'s `else:` block before its handlers (3.9:
    /// body, handlers, else; 3.11-3.15: body, else, handlers).
    pub fn else_before_handlers(self) -> bool {
        self.at_least(3, 11)
    }

    /// PEP 709 (3.12+): list, set and dict comprehensions are inlined into
    /// the enclosing code object; generator expressions keep their own.
    pub fn inlines_comprehensions(self) -> bool {
        self.at_least(3, 12)
    }

    /// 3.12-3.13 make every name of a comprehension inlined in a class body
    /// a hidden fast local of the class body, `.0` and names only read
    /// included (3.12.1, 3.13.0, 3.13.18: `['.0', 'j', 'g', 'a']`); 3.14+
    /// only the names the comprehension binds (`['j']`).
    pub fn class_comprehension_hides_all_names(self) -> bool {
        self.at_least(3, 12) && !self.at_least(3, 14)
    }

    /// PEP 649 (3.14+): annotations are not evaluated where the function or
    /// class is defined; they go into an `__annotate__` code object.
    pub fn defers_annotations(self) -> bool {
        self.at_least(3, 14)
    }

    /// A module's `co_firstlineno` is the line of its first instruction on
    /// 3.9 (`_compat_pickle.py`: 9, its first statement `X = {` being on
    /// line 8 and the first constant on 9), 1 on 3.10+.
    pub fn module_starts_at_first_instruction(self) -> bool {
        !self.at_least(3, 10)
    }

    /// A function's `__annotate__` is named after the function on 3.15
    /// (`f.<locals>.g.__annotate__`), after the scope holding the `def` on
    /// 3.14 (`f.<locals>.__annotate__`).
    pub fn annotate_named_after_function(self) -> bool {
        self.at_least(3, 15)
    }

    /// 3.11+ code objects carry `co_qualname`.
    pub fn has_co_qualname(self) -> bool {
        self.at_least(3, 11)
    }
}
