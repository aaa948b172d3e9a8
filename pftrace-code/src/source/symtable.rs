//! CPython's symbol table, followed on Ruff's AST: which code objects a
//! file makes (one per module, class body, function, lambda, and
//! comprehension that is not inlined), their names and qualified names, and
//! the scope of every name in each (local, cell, free, global), as
//! `Python/symtable.c` decides them. Pass 1 ([`Builder`]) collects the raw
//! facts in CPython's visiting order; pass 2 ([`analyze`]) resolves them,
//! inlining comprehensions on 3.12+ (PEP 709) as CPython does.

use std::collections::{HashMap, HashSet};

use ruff_python_ast::{self as ast, Expr, ExprContext, Parameters, Pattern, Stmt};
use ruff_text_size::{Ranged, TextRange};

use super::walk::{self, PatternPart};
use crate::version::PyVersion;

// Raw symbol flags (Include/internal/pycore_symtable.h).
pub const DEF_GLOBAL: u32 = 1;
pub const DEF_LOCAL: u32 = 2;
pub const DEF_PARAM: u32 = 4;
pub const DEF_NONLOCAL: u32 = 8;
pub const USE: u32 = 16;
pub const DEF_IMPORT: u32 = 64;
pub const DEF_BOUND: u32 = DEF_LOCAL | DEF_PARAM | DEF_IMPORT;

/// A name's scope after analysis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sc {
    Local,
    Cell,
    Free,
    GlobalExplicit,
    GlobalImplicit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompKind {
    List,
    Set,
    Dict,
    Gen,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Module,
    Class,
    Function,
    Lambda,
    Comprehension(CompKind),
}

impl Kind {
    /// CPython's `_PyST_IsFunctionLike`: names live in fast locals.
    pub fn is_function_like(self) -> bool {
        matches!(self, Kind::Function | Kind::Lambda | Kind::Comprehension(_))
    }
}

/// The AST node a scope's code is compiled from.
#[derive(Clone, Copy)]
pub enum Node<'a> {
    Module(&'a [Stmt]),
    Class(&'a ast::StmtClassDef),
    Function(&'a ast::StmtFunctionDef),
    Lambda(&'a ast::ExprLambda),
    Comprehension(&'a Expr),
    /// A 3.14+ `__annotate__` function (PEP 649), made by the compiler.
    Annotate,
}

/// One symbol table entry.
pub struct Scope<'a> {
    pub kind: Kind,
    /// `co_name`.
    pub name: String,
    pub parent: Option<usize>,
    pub children: Vec<usize>,
    /// Raw flags in insertion order (CPython's `ste_symbols` is a dict).
    pub syms: Vec<(String, u32)>,
    sym_index: HashMap<String, usize>,
    /// Parameter names (mangled), in `co_varnames` order.
    pub params: Vec<String>,
    pub posonly: u32,
    pub positional: u32,
    pub kwonly: u32,
    pub varargs: bool,
    pub varkw: bool,
    /// The class name that mangles `__private` names here.
    pub private: Option<String>,
    pub firstlineno: u32,
    pub lastline: u32,
    pub node: Node<'a>,
    /// A 3.12+ list/set/dict comprehension: no code object of its own.
    pub inlined: bool,
    /// Why this scope's names are not claimed (a construct not followed).
    pub unsupported: Option<String>,
    /// Made by the compiler, not written in the source: a 3.14+
    /// `__annotate__` (reported), a 3.12+ `type` alias value (not).
    pub synthetic: bool,
    /// A 3.14+ function's `__annotate__`: the function's scope.
    pub annotate_owner: Option<usize>,
    /// A function with PEP 695 type parameters.
    pub generic: bool,
    /// `co_firstlineno` when it is not `firstlineno` (the span's start):
    /// `Some(line)`, or `None` when unknown (3.9 modules, see
    /// [`PyVersion::module_starts_at_first_instruction`]).
    pub firstlineno_exact: Option<u32>,
    /// Filled by [`analyze`].
    pub scopes: HashMap<String, Sc>,
    pub qualname: String,
}

impl Scope<'_> {
    pub fn flags(&self, name: &str) -> u32 {
        self.sym_index.get(name).map_or(0, |&i| self.syms[i].1)
    }

    fn add(&mut self, name: &str, flag: u32) {
        if let Some(&i) = self.sym_index.get(name) {
            self.syms[i].1 |= flag;
        } else {
            self.sym_index.insert(name.to_string(), self.syms.len());
            self.syms.push((name.to_string(), flag));
        }
    }

    pub fn scope(&self, name: &str) -> Option<Sc> {
        self.scopes.get(name).copied()
    }
}

/// `_Py_Mangle`: `__x` inside class `K` is `_K__x`.
pub fn mangle(private: Option<&str>, name: &str) -> String {
    let Some(p) = private else { return name.to_string() };
    if !name.starts_with("__") || name.ends_with("__") || name.contains('.') {
        return name.to_string();
    }
    let stripped = p.trim_start_matches('_');
    if stripped.is_empty() {
        return name.to_string();
    }
    format!("_{stripped}{name}")
}

/// Byte offset to 1-based line, counting `\n`, `\r\n` and a lone `\r` as
/// CPython's tokenizer does.
pub struct Lines {
    starts: Vec<u32>,
}

impl Lines {
    pub fn new(src: &str) -> Self {
        let b = src.as_bytes();
        let mut starts = vec![0u32];
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'\n' => starts.push(i as u32 + 1),
                b'\r' if b.get(i + 1) == Some(&b'\n') => {
                    starts.push(i as u32 + 2);
                    i += 1;
                }
                b'\r' => starts.push(i as u32 + 1),
                _ => {}
            }
            i += 1;
        }
        Self { starts }
    }

    pub fn line(&self, offset: u32) -> u32 {
        self.starts.partition_point(|&s| s <= offset) as u32
    }

    pub fn count(&self) -> u32 {
        self.starts.len() as u32
    }
}

/// Pass 1: CPython's `symtable_visit_*`, in its order.
pub struct Builder<'a> {
    pub scopes: Vec<Scope<'a>>,
    stack: Vec<usize>,
    lines: &'a Lines,
    version: PyVersion,
    pub future_annotations: bool,
    /// Inside a comprehension's iteration target (for walrus checks).
    comp_iter_target: bool,
    /// Scope index of each scope-making node, by its range.
    pub by_range: HashMap<(u32, u32), usize>,
    /// 3.14+: the `__annotate__` scope of a module or class body.
    annotate_of: HashMap<usize, usize>,
    /// First lines that are not the node's own (a call's lone generator).
    first_line_of: HashMap<(u32, u32), u32>,
}

fn key(r: TextRange) -> (u32, u32) {
    (r.start().to_u32(), r.end().to_u32())
}

impl<'a> Builder<'a> {
    pub fn build(body: &'a [Stmt], lines: &'a Lines, version: PyVersion) -> Self {
        let mut b = Self {
            scopes: Vec::new(),
            stack: Vec::new(),
            lines,
            version,
            future_annotations: has_future_annotations(body),
            comp_iter_target: false,
            by_range: HashMap::new(),
            annotate_of: HashMap::new(),
            first_line_of: HashMap::new(),
        };
        b.enter(Kind::Module, "<module>".into(), Node::Module(body), 1, lines.count(), None, None);
        if version.module_starts_at_first_instruction() {
            // Known when the first statement's first instruction is on its
            // first line: a docstring, an import, a one-line statement.
            let exact = match body.first() {
                None => Some(1),
                Some(s @ (Stmt::Import(_) | Stmt::ImportFrom(_))) => {
                    Some(lines.line(s.range().start().to_u32()))
                }
                Some(Stmt::Expr(e)) if matches!(&*e.value, Expr::StringLiteral(_)) => {
                    Some(lines.line(e.range.start().to_u32()))
                }
                Some(s) => {
                    let (a, z) = (
                        lines.line(s.range().start().to_u32()),
                        lines.line(s.range().end().to_u32().saturating_sub(1)),
                    );
                    (a == z).then_some(a)
                }
            };
            b.scopes[0].firstlineno_exact = exact;
        }
        for s in body {
            b.stmt(s);
        }
        b.stack.pop();
        b
    }

    fn cur(&mut self) -> &mut Scope<'a> {
        let i = *self.stack.last().expect("scope stack");
        &mut self.scopes[i]
    }

    fn private(&self) -> Option<String> {
        self.stack.last().and_then(|&i| self.scopes[i].private.clone())
    }

    fn add_def(&mut self, name: &str, flag: u32) {
        let m = mangle(self.private().as_deref(), name);
        self.cur().add(&m, flag);
    }

    #[allow(clippy::too_many_arguments)]
    fn enter(
        &mut self,
        kind: Kind,
        name: String,
        node: Node<'a>,
        firstlineno: u32,
        lastline: u32,
        private: Option<String>,
        range: Option<TextRange>,
    ) -> usize {
        let parent = self.stack.last().copied();
        let idx = self.scopes.len();
        let inlined = matches!(kind, Kind::Comprehension(k) if k != CompKind::Gen)
            && self.version.inlines_comprehensions();
        self.scopes.push(Scope {
            kind,
            name,
            parent,
            children: Vec::new(),
            syms: Vec::new(),
            sym_index: HashMap::new(),
            params: Vec::new(),
            posonly: 0,
            positional: 0,
            kwonly: 0,
            varargs: false,
            varkw: false,
            private,
            firstlineno,
            lastline,
            node,
            inlined,
            unsupported: None,
            synthetic: false,
            annotate_owner: None,
            generic: false,
            firstlineno_exact: Some(firstlineno),
            scopes: HashMap::new(),
            qualname: String::new(),
        });
        if let Some(p) = parent {
            self.scopes[p].children.push(idx);
        }
        if let Some(r) = range {
            self.by_range.insert(key(r), idx);
        }
        self.stack.push(idx);
        idx
    }

    fn line(&self, r: TextRange) -> u32 {
        self.lines.line(r.start().to_u32())
    }

    fn end_line(&self, r: TextRange) -> u32 {
        // The range ends after the last character: the line of that character.
        self.lines.line(r.end().to_u32().saturating_sub(1))
    }

    fn mark_unsupported(&mut self, why: &str) {
        let s = self.cur();
        if s.unsupported.is_none() {
            s.unsupported = Some(why.to_string());
        }
    }

    fn params(&mut self, p: &'a Parameters) {
        let private = self.private();
        let s = self.cur();
        let add = |s: &mut Scope<'_>, n: &str| {
            let m = mangle(private.as_deref(), n);
            s.add(&m, DEF_PARAM);
            s.params.push(m);
        };
        for a in &p.posonlyargs {
            add(s, a.parameter.name.as_str());
        }
        for a in &p.args {
            add(s, a.parameter.name.as_str());
        }
        for a in &p.kwonlyargs {
            add(s, a.parameter.name.as_str());
        }
        if let Some(v) = &p.vararg {
            add(s, v.name.as_str());
        }
        if let Some(k) = &p.kwarg {
            add(s, k.name.as_str());
        }
        s.posonly = p.posonlyargs.len() as u32;
        s.positional = (p.posonlyargs.len() + p.args.len()) as u32;
        s.kwonly = p.kwonlyargs.len() as u32;
        s.varargs = p.vararg.is_some();
        s.varkw = p.kwarg.is_some();
    }

    fn defaults(&mut self, p: &'a Parameters) {
        for a in p.posonlyargs.iter().chain(&p.args) {
            if let Some(d) = &a.default {
                self.expr(d);
            }
        }
        for a in &p.kwonlyargs {
            if let Some(d) = &a.default {
                self.expr(d);
            }
        }
    }

    fn annotations(
        &mut self,
        p: &'a Parameters,
        returns: Option<&'a Expr>,
        range: TextRange,
    ) -> Option<usize> {
        let mut anns: Vec<&'a Expr> = p.iter().filter_map(|a| a.annotation()).collect();
        anns.extend(returns);
        if anns.is_empty() {
            return None;
        }
        if self.version.defers_annotations() {
            // PEP 649: the annotations go into an `__annotate__` function
            // nested where the def is, which closes over the names they use
            // (strings under `from __future__ import annotations`).
            let line = self.line(range);
            let private = self.private();
            let i =
                self.enter(Kind::Function, "__annotate__".into(), Node::Annotate, line, line, private, None);
            self.annotate_params();
            if !self.future_annotations {
                for a in anns {
                    self.expr(a);
                }
            }
            self.stack.pop();
            return Some(i);
        }
        for a in anns {
            self.expr(a);
        }
        None
    }

    /// An `__annotate__(format, /)`.
    fn annotate_params(&mut self) {
        let s = self.cur();
        s.synthetic = true;
        s.add("format", DEF_PARAM);
        s.params.push("format".into());
        s.posonly = 1;
        s.positional = 1;
    }

    /// PEP 695 type parameters make a hidden scope (and lazily evaluated
    /// bounds) that can close over an enclosing function's names: not
    /// followed, so that function's locals are not claimed.
    fn type_params_here(&mut self) {
        if self.cur().kind.is_function_like() {
            self.mark_unsupported("PEP 695 type parameters inside a function");
        }
    }

    /// 3.14+: a module's or class body's annotations go into its own
    /// `__annotate__` function, made at the first annotated assignment.
    fn deferred_annotation(&mut self, ann: &'a Expr, range: TextRange) {
        if self.future_annotations {
            // Under `from __future__ import annotations` a module or class
            // body stores strings in `__annotations__` itself (3.14.10,
            // 3.15.2); functions still get an `__annotate__`.
            return;
        }
        let owner = *self.stack.last().expect("scope stack");
        let idx = match self.annotate_of.get(&owner) {
            Some(&i) => i,
            None => {
                let (line, last) = (self.cur().firstlineno, self.cur().firstlineno);
                let _ = range;
                let private = self.private();
                let i = self.enter(
                    Kind::Function,
                    "__annotate__".into(),
                    Node::Annotate,
                    line,
                    last,
                    private,
                    None,
                );
                self.annotate_params();
                self.stack.pop();
                self.annotate_of.insert(owner, i);
                i
            }
        };
        if !self.future_annotations {
            self.stack.push(idx);
            self.expr(ann);
            self.stack.pop();
        }
    }

    fn stmts(&mut self, body: &'a [Stmt]) {
        for s in body {
            self.stmt(s);
        }
    }

    fn stmt(&mut self, s: &'a Stmt) {
        match s {
            Stmt::FunctionDef(f) => {
                self.add_def(f.name.as_str(), DEF_LOCAL);
                self.defaults(&f.parameters);
                let annotate = self.annotations(&f.parameters, f.returns.as_deref(), f.range);
                for d in &f.decorator_list {
                    self.expr(&d.expression);
                }
                if f.type_params.is_some() {
                    self.type_params_here();
                }
                let first = f
                    .decorator_list
                    .first()
                    .map_or_else(|| self.line(f.range), |d| self.line(d.expression.range()));
                let last = self.end_line(f.range);
                let private = self.private();
                let me = self.enter(
                    Kind::Function,
                    f.name.to_string(),
                    Node::Function(f),
                    first,
                    last,
                    private,
                    Some(f.range),
                );
                self.cur().generic = f.type_params.is_some();
                if let Some(a) = annotate {
                    // The `def` keyword's line, not the first decorator's
                    // (3.14.10, 3.15.2); the name is on that line.
                    let def_line = self.line(f.name.range);
                    self.scopes[a].annotate_owner = Some(me);
                    self.scopes[a].firstlineno = def_line;
                    self.scopes[a].firstlineno_exact = Some(def_line);
                    self.scopes[a].lastline = def_line;
                }
                self.params(&f.parameters);
                self.stmts(&f.body);
                self.stack.pop();
            }
            Stmt::ClassDef(c) => {
                self.add_def(c.name.as_str(), DEF_LOCAL);
                if let Some(args) = &c.arguments {
                    for a in &args.args {
                        self.expr(a);
                    }
                    for k in &args.keywords {
                        self.expr(&k.value);
                    }
                }
                for d in &c.decorator_list {
                    self.expr(&d.expression);
                }
                if c.type_params.is_some() {
                    self.type_params_here();
                }
                let first = c
                    .decorator_list
                    .first()
                    .map_or_else(|| self.line(c.range), |d| self.line(d.expression.range()));
                let last = self.end_line(c.range);
                self.enter(
                    Kind::Class,
                    c.name.to_string(),
                    Node::Class(c),
                    first,
                    last,
                    Some(c.name.to_string()),
                    Some(c.range),
                );
                self.stmts(&c.body);
                self.stack.pop();
            }
            Stmt::Return(r) => {
                if let Some(v) = &r.value {
                    self.expr(v);
                }
            }
            Stmt::Delete(d) => d.targets.iter().for_each(|t| self.expr(t)),
            Stmt::Assign(a) => {
                a.targets.iter().for_each(|t| self.expr(t));
                self.expr(&a.value);
            }
            Stmt::AugAssign(a) => {
                self.expr(&a.target);
                self.expr(&a.value);
            }
            Stmt::AnnAssign(a) => {
                if let Expr::Name(n) = &*a.target {
                    if a.simple || a.value.is_some() {
                        self.add_def(n.id.as_str(), DEF_LOCAL);
                    }
                } else {
                    self.expr(&a.target);
                }
                if !self.version.defers_annotations() {
                    self.expr(&a.annotation);
                } else if !self.cur().kind.is_function_like() && a.simple {
                    self.deferred_annotation(&a.annotation, a.range);
                }
                if let Some(v) = &a.value {
                    self.expr(v);
                }
            }
            Stmt::TypeAlias(t) => {
                self.expr(&t.name);
                if t.type_params.is_some() {
                    self.type_params_here();
                }
                // The value is evaluated lazily in a scope of its own, which
                // closes over the names it uses.
                let line = self.line(t.range);
                let private = self.private();
                self.enter(
                    Kind::Function,
                    "<type alias value>".into(),
                    Node::Annotate,
                    line,
                    line,
                    private,
                    None,
                );
                self.cur().synthetic = true;
                self.expr(&t.value);
                self.stack.pop();
            }
            Stmt::For(f) => {
                self.expr(&f.target);
                self.expr(&f.iter);
                self.stmts(&f.body);
                self.stmts(&f.orelse);
            }
            Stmt::While(w) => {
                self.expr(&w.test);
                self.stmts(&w.body);
                self.stmts(&w.orelse);
            }
            Stmt::If(i) => {
                self.expr(&i.test);
                self.stmts(&i.body);
                for c in &i.elif_else_clauses {
                    if let Some(t) = &c.test {
                        self.expr(t);
                    }
                    self.stmts(&c.body);
                }
            }
            Stmt::With(w) => {
                for it in &w.items {
                    self.expr(&it.context_expr);
                    if let Some(v) = &it.optional_vars {
                        self.expr(v);
                    }
                }
                self.stmts(&w.body);
            }
            Stmt::Match(m) => {
                self.expr(&m.subject);
                for c in &m.cases {
                    self.pattern(&c.pattern);
                    if let Some(g) = &c.guard {
                        self.expr(g);
                    }
                    self.stmts(&c.body);
                }
            }
            Stmt::Raise(r) => {
                if let Some(e) = &r.exc {
                    self.expr(e);
                }
                if let Some(c) = &r.cause {
                    self.expr(c);
                }
            }
            Stmt::Try(t) => {
                self.stmts(&t.body);
                self.stmts(&t.orelse);
                for ast::ExceptHandler::ExceptHandler(h) in &t.handlers {
                    if let Some(ty) = &h.type_ {
                        self.expr(ty);
                    }
                    if let Some(n) = &h.name {
                        self.add_def(n.as_str(), DEF_LOCAL);
                    }
                    self.stmts(&h.body);
                }
                self.stmts(&t.finalbody);
            }
            Stmt::Assert(a) => {
                self.expr(&a.test);
                if let Some(m) = &a.msg {
                    self.expr(m);
                }
            }
            Stmt::Import(_) | Stmt::ImportFrom(_) => {
                walk::import_bindings(s).iter().for_each(|name| self.add_def(name, DEF_IMPORT))
            }
            Stmt::Global(g) => g.names.iter().for_each(|n| self.add_def(n.as_str(), DEF_GLOBAL)),
            Stmt::Nonlocal(n) => n.names.iter().for_each(|n| self.add_def(n.as_str(), DEF_NONLOCAL)),
            Stmt::Expr(e) => self.expr(&e.value),
            Stmt::Pass(_) | Stmt::Break(_) | Stmt::Continue(_) => {}
            Stmt::IpyEscapeCommand(_) => self.mark_unsupported("IPython escape commands"),
        }
    }

    fn pattern(&mut self, p: &'a Pattern) {
        walk::pattern_parts(p, &mut |part| match part {
            PatternPart::Expr(e) => self.expr(e),
            PatternPart::Pattern(p) => self.pattern(p),
            PatternPart::Capture(name) => self.add_def(name, DEF_LOCAL),
        });
    }

    fn expr(&mut self, e: &'a Expr) {
        match e {
            Expr::Name(n) => {
                let flag = if n.ctx == ExprContext::Load { USE } else { DEF_LOCAL };
                self.add_def(n.id.as_str(), flag);
                if n.ctx == ExprContext::Load && n.id.as_str() == "super" && self.cur().kind == Kind::Function
                {
                    self.cur().add("__class__", USE);
                }
            }
            Expr::Named(n) => {
                if matches!(self.cur().kind, Kind::Comprehension(_))
                    && let Expr::Name(t) = &*n.target
                {
                    self.extend_namedexpr_scope(t.id.as_str());
                }
                walk::expr_children(e, &mut |x| self.expr(x));
            }
            Expr::Lambda(l) => {
                if let Some(p) = &l.parameters {
                    self.defaults(p);
                }
                let first = self.line(l.range);
                let last = self.end_line(l.range);
                let private = self.private();
                self.enter(
                    Kind::Lambda,
                    "<lambda>".into(),
                    Node::Lambda(l),
                    first,
                    last,
                    private,
                    Some(l.range),
                );
                if let Some(p) = &l.parameters {
                    self.params(p);
                }
                self.expr(&l.body);
                self.stack.pop();
            }
            Expr::Dict(d) => {
                // symtable.c visits all keys, then all values.
                for it in &d.items {
                    if let Some(k) = &it.key {
                        self.expr(k);
                    }
                }
                for it in &d.items {
                    self.expr(&it.value);
                }
            }
            Expr::ListComp(c) => self.comprehension(e, CompKind::List, &c.generators, &c.elt, None),
            Expr::SetComp(c) => self.comprehension(e, CompKind::Set, &c.generators, &c.elt, None),
            Expr::DictComp(c) => match &c.key {
                Some(k) => self.comprehension(e, CompKind::Dict, &c.generators, k, Some(&c.value)),
                None => self.mark_unsupported("a dict comprehension with `**` (PEP 798)"),
            },
            Expr::Generator(g) => self.comprehension(e, CompKind::Gen, &g.generators, &g.elt, None),
            Expr::Call(c) => {
                // `f(x for x in y)`: CPython's generator expression starts
                // at the call's parenthesis (3.9-3.15 measured).
                if let ([Expr::Generator(g)], true) = (&*c.arguments.args, c.arguments.keywords.is_empty())
                    && !g.parenthesized
                {
                    let line = self.line(c.arguments.range);
                    self.first_line_of.insert(key(g.range), line);
                }
                walk::expr_children(e, &mut |x| self.expr(x));
            }
            Expr::IpyEscapeCommand(_) => self.mark_unsupported("IPython escape commands"),
            _ => walk::expr_children(e, &mut |x| self.expr(x)),
        }
    }

    /// `symtable_extend_namedexpr_scope`: `(x := v)` in a comprehension
    /// binds `x` in the nearest enclosing function (or the module).
    fn extend_namedexpr_scope(&mut self, name: &str) {
        for &i in self.stack.iter().rev() {
            match self.scopes[i].kind {
                Kind::Comprehension(_) => continue,
                Kind::Function | Kind::Lambda => {
                    let m = mangle(self.private().as_deref(), name);
                    if self.scopes[i].flags(&m) & DEF_GLOBAL != 0 {
                        self.cur().add(&m, DEF_GLOBAL);
                    } else {
                        self.cur().add(&m, DEF_NONLOCAL);
                    }
                    self.scopes[i].add(&m, DEF_LOCAL);
                    return;
                }
                Kind::Module => {
                    let m = mangle(self.private().as_deref(), name);
                    self.cur().add(&m, DEF_GLOBAL);
                    self.scopes[i].add(&m, DEF_GLOBAL);
                    return;
                }
                Kind::Class => {
                    self.mark_unsupported("an assignment expression in a comprehension in a class body");
                    return;
                }
            }
        }
    }

    /// `symtable_handle_comprehension`: the outermost iterable in the
    /// current scope, the rest in a new one whose argument is `.0`.
    fn comprehension(
        &mut self,
        e: &'a Expr,
        kind: CompKind,
        generators: &'a [ast::Comprehension],
        elt: &'a Expr,
        value: Option<&'a Expr>,
    ) {
        let Some(outermost) = generators.first() else { return };
        self.expr(&outermost.iter);
        let name = match kind {
            CompKind::List => "<listcomp>",
            CompKind::Set => "<setcomp>",
            CompKind::Dict => "<dictcomp>",
            CompKind::Gen => "<genexpr>",
        };
        let first = self.first_line_of.get(&key(e.range())).copied().unwrap_or_else(|| self.line(e.range()));
        let last = self.end_line(e.range());
        let private = self.private();
        self.enter(
            Kind::Comprehension(kind),
            name.into(),
            Node::Comprehension(e),
            first,
            last,
            private,
            Some(e.range()),
        );
        let s = self.cur();
        s.add(".0", DEF_PARAM);
        s.params.push(".0".into());
        s.positional = 1;
        self.comp_iter_target = true;
        self.expr(&outermost.target);
        self.comp_iter_target = false;
        outermost.ifs.iter().for_each(|x| self.expr(x));
        for g in &generators[1..] {
            self.comp_iter_target = true;
            self.expr(&g.target);
            self.comp_iter_target = false;
            self.expr(&g.iter);
            g.ifs.iter().for_each(|x| self.expr(x));
        }
        if let Some(v) = value {
            self.expr(v);
        }
        self.expr(elt);
        self.stack.pop();
    }
}

/// `from __future__ import annotations` among the file's first statements.
fn has_future_annotations(body: &[Stmt]) -> bool {
    for (i, s) in body.iter().enumerate() {
        match s {
            Stmt::Expr(e) if i == 0 && matches!(&*e.value, Expr::StringLiteral(_)) => continue,
            Stmt::ImportFrom(f) if f.module.as_ref().is_some_and(|m| m.as_str() == "__future__") => {
                if f.names.iter().any(|a| a.name.as_str() == "annotations") {
                    return true;
                }
            }
            _ => return false,
        }
    }
    false
}

// ---------------------------------------------------------------------------
// Pass 2: analyze_block.

/// Resolves every scope's names (CPython's `analyze_block`), inlines 3.12+
/// comprehensions into their parents, and sets qualified names.
pub fn analyze(scopes: &mut [Scope<'_>], version: PyVersion) {
    let mut free = HashSet::new();
    analyze_block(scopes, 0, None, &mut free, &HashSet::new());
    for i in 0..scopes.len() {
        let q = qualname(scopes, i, version);
        scopes[i].qualname = q;
    }
}

fn analyze_block(
    scopes: &mut [Scope<'_>],
    idx: usize,
    bound: Option<&HashSet<String>>,
    free: &mut HashSet<String>,
    global: &HashSet<String>,
) {
    let mut local = HashSet::new();
    let mut sc: HashMap<String, Sc> = HashMap::new();
    let mut newglobal = HashSet::new();
    let mut newfree = HashSet::new();
    let mut newbound = HashSet::new();
    let kind = scopes[idx].kind;
    let mut bound_c = bound.cloned();
    let mut global_c = global.clone();
    if kind == Kind::Class {
        newglobal.extend(global.iter().cloned());
        if let Some(b) = bound {
            newbound.extend(b.iter().cloned());
        }
    }
    let syms = scopes[idx].syms.clone();
    for (name, flags) in &syms {
        let s = if flags & DEF_GLOBAL != 0 {
            global_c.insert(name.clone());
            if let Some(b) = bound_c.as_mut() {
                b.remove(name);
            }
            Sc::GlobalExplicit
        } else if flags & DEF_NONLOCAL != 0 {
            free.insert(name.clone());
            Sc::Free
        } else if flags & DEF_BOUND != 0 {
            local.insert(name.clone());
            global_c.remove(name);
            Sc::Local
        } else if bound_c.as_ref().is_some_and(|b| b.contains(name)) {
            free.insert(name.clone());
            Sc::Free
        } else if global_c.contains(name) {
            Sc::GlobalExplicit
        } else {
            Sc::GlobalImplicit
        };
        sc.insert(name.clone(), s);
    }
    if kind != Kind::Class {
        if kind.is_function_like() {
            newbound.extend(local.iter().cloned());
        }
        if let Some(b) = &bound_c {
            newbound.extend(b.iter().cloned());
        }
        newglobal.extend(global_c.iter().cloned());
    } else {
        newbound.insert("__class__".to_string());
    }
    let mut inlined_cells: HashSet<String> = HashSet::new();
    let children = scopes[idx].children.clone();
    for c in children {
        let mut child_free = HashSet::new();
        analyze_block(scopes, c, Some(&newbound), &mut child_free, &newglobal);
        if scopes[c].inlined {
            inline_comprehension(scopes, idx, c, &mut sc, &mut child_free, &mut inlined_cells);
        }
        newfree.extend(child_free);
    }
    if kind.is_function_like() {
        // analyze_cells
        let names: Vec<String> =
            sc.iter().filter(|(_, s)| **s == Sc::Local).map(|(n, _)| n.clone()).collect();
        for n in names {
            if newfree.contains(&n) || inlined_cells.contains(&n) {
                sc.insert(n.clone(), Sc::Cell);
                newfree.remove(&n);
            }
        }
    } else if kind == Kind::Class {
        newfree.remove("__class__");
        newfree.remove("__classdict__");
    }
    // Names free in children that pass through this scope.
    for n in &newfree {
        sc.entry(n.clone()).or_insert(Sc::Free);
    }
    scopes[idx].scopes = sc;
    free.extend(newfree);
}

/// `inline_comprehension`: the comprehension's names join its parent's.
fn inline_comprehension(
    scopes: &mut [Scope<'_>],
    parent: usize,
    comp: usize,
    sc: &mut HashMap<String, Sc>,
    comp_free: &mut HashSet<String>,
    inlined_cells: &mut HashSet<String>,
) {
    let syms = scopes[comp].syms.clone();
    let parent_kind = scopes[parent].kind;
    for (name, flags) in syms {
        if flags & DEF_PARAM != 0 {
            continue;
        }
        let s = scopes[comp].scope(&name).unwrap_or(Sc::GlobalImplicit);
        if s == Sc::Cell {
            inlined_cells.insert(name.clone());
        }
        let existing = scopes[parent].sym_index.contains_key(&name);
        if !existing {
            scopes[parent].add(&name, flags);
            sc.insert(name.clone(), s);
        } else {
            let pflags = scopes[parent].flags(&name);
            let free_in_child =
                effective_children(scopes, comp).iter().any(|&ch| scopes[ch].scope(&name) == Some(Sc::Free));
            if pflags & DEF_BOUND != 0 && !free_in_child && parent_kind != Kind::Class {
                comp_free.remove(&name);
            }
        }
    }
}

/// A scope's children with each inlined comprehension replaced by its own
/// children, as CPython splices them after inlining.
fn effective_children(scopes: &[Scope<'_>], idx: usize) -> Vec<usize> {
    let mut out = Vec::new();
    for &c in &scopes[idx].children {
        if scopes[c].inlined {
            out.extend(effective_children(scopes, c));
        } else {
            out.push(c);
        }
    }
    out
}

/// `compiler_set_qualname`.
fn qualname(scopes: &[Scope<'_>], i: usize, version: PyVersion) -> String {
    let s = &scopes[i];
    if let (Some(owner), true) = (s.annotate_owner, version.annotate_named_after_function()) {
        return format!("{}.__annotate__", qualname(scopes, owner, version));
    }
    let Some(mut p) = s.parent else { return s.name.clone() };
    // A 3.12+ inlined comprehension is no compiler unit: its children's
    // parent unit is the nearest enclosing real one.
    while scopes[p].inlined {
        p = scopes[p].parent.expect("inlined comprehension has a parent");
    }
    let parent = &scopes[p];
    if parent.kind == Kind::Module {
        return s.name.clone();
    }
    if matches!(s.kind, Kind::Function | Kind::Class) {
        let m = mangle(parent.private.as_deref(), &s.name);
        if parent.scope(&m) == Some(Sc::GlobalExplicit) {
            return s.name.clone();
        }
    }
    let base = if matches!(parent.kind, Kind::Function | Kind::Lambda) {
        format!("{}.<locals>", parent.qualname_for_child(scopes, p, version))
    } else {
        parent.qualname_for_child(scopes, p, version)
    };
    format!("{base}.{}", s.name)
}

impl Scope<'_> {
    fn qualname_for_child(&self, scopes: &[Scope<'_>], me: usize, version: PyVersion) -> String {
        if self.qualname.is_empty() { qualname(scopes, me, version) } else { self.qualname.clone() }
    }
}
