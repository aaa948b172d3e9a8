//! `co_varnames` of one code object: its parameters, then each local name in
//! the order CPython's code generator first emits it (a name enters the
//! `varnames` dict at its first LOAD/STORE/DELETE_FAST, or at the
//! LOAD_FAST_AND_CLEAR that starts a 3.12+ inlined comprehension). The walk
//! follows `Python/compile.c` (`codegen.c` on 3.14+): evaluation order of
//! each statement and expression, `finally` bodies compiled again at each
//! `return`/`break`/`continue` that leaves them, 3.9's dead branches left
//! out, 3.11's `try: ... else:` before the handlers.

use std::collections::{HashMap, HashSet};

use ruff_python_ast::{self as ast, Expr, Parameters, Pattern, Stmt};
use ruff_text_size::{Ranged, TextRange};

use super::{
    symtable::{DEF_LOCAL, DEF_NONLOCAL, Kind, Node, Sc, Scope, mangle},
    walk::{self, PatternPart},
};
use crate::version::PyVersion;

/// Compiles `co_varnames` of `scopes[idx]` (a scope with its own code object).
pub fn varnames(
    scopes: &[Scope<'_>],
    by_range: &HashMap<(u32, u32), usize>,
    idx: usize,
    version: PyVersion,
    optimize: u8,
    future_annotations: bool,
) -> Result<Vec<String>, String> {
    let s = &scopes[idx];
    if let Some(why) = &s.unsupported {
        return Err(format!("not followed: {why}"));
    }
    let mut e = Emitter {
        scopes,
        by_range,
        idx,
        version,
        optimize,
        future_annotations,
        names: s.params.clone(),
        seen: s.params.iter().cloned().collect(),
        fblocks: Vec::new(),
        error: None,
    };
    match s.node {
        Node::Module(body) => e.stmts(body),
        Node::Class(c) => e.stmts(&c.body),
        Node::Function(f) => e.stmts(&f.body),
        Node::Lambda(l) => e.expr(&l.body),
        Node::Comprehension(c) => e.comprehension_body(c, false),
        // `__annotate__(format, /)` builds a dict from the annotations:
        // no other local, unless a comprehension is inlined into it.
        Node::Annotate => {
            if s.children.iter().any(|&c| scopes[c].inlined) {
                return Err("not followed: a comprehension in an annotation".into());
            }
        }
    }
    match e.error {
        Some(err) => Err(err),
        None => Ok(e.names),
    }
}

/// What a `return`, `break` or `continue` leaves on its way out.
enum FBlock<'a> {
    Loop,
    /// A `try` with this `finally:` body, compiled again where it is left.
    Finally(&'a [Stmt]),
    /// Inside a `finally:` body itself.
    FinallyEnd,
}

struct Emitter<'s, 'a> {
    scopes: &'s [Scope<'a>],
    by_range: &'s HashMap<(u32, u32), usize>,
    idx: usize,
    version: PyVersion,
    optimize: u8,
    future_annotations: bool,
    names: Vec<String>,
    seen: HashSet<String>,
    fblocks: Vec<FBlock<'a>>,
    error: Option<String>,
}

impl<'a> Emitter<'_, 'a> {
    fn scope(&self) -> &Scope<'a> {
        &self.scopes[self.idx]
    }

    fn add(&mut self, mangled: &str) {
        if self.seen.insert(mangled.to_string()) {
            self.names.push(mangled.to_string());
        }
    }

    /// `compiler_nameop`: a name becomes a fast local of a function-like
    /// scope when it is local (not a cell) there.
    fn name(&mut self, id: &str) {
        let s = self.scope();
        let m = mangle(s.private.as_deref(), id);
        if s.kind.is_function_like() && s.scope(&m) == Some(Sc::Local) {
            self.add(&m);
        }
    }

    fn fail(&mut self, why: &str) {
        if self.error.is_none() {
            self.error = Some(format!("not followed: {why}"));
        }
    }

    fn child(&self, r: TextRange) -> Option<usize> {
        self.by_range.get(&(r.start().to_u32(), r.end().to_u32())).copied()
    }

    fn stmts(&mut self, body: &'a [Stmt]) {
        for s in body {
            self.stmt(s);
        }
    }

    /// Emits the `finally:` bodies a jump leaves, innermost first, up to
    /// the nearest loop (`break`/`continue`) or the function (`return`).
    fn unwind(&mut self, to_loop: bool) {
        let mut i = self.fblocks.len();
        while i > 0 {
            i -= 1;
            match self.fblocks[i] {
                FBlock::Loop if to_loop => return,
                FBlock::Loop | FBlock::FinallyEnd => {}
                FBlock::Finally(body) => {
                    // The finally body is compiled outside its own block.
                    let saved: Vec<FBlock<'a>> = self.fblocks.drain(i..).collect();
                    self.fblocks.push(FBlock::FinallyEnd);
                    self.stmts(body);
                    self.fblocks.pop();
                    self.fblocks.extend(saved);
                }
            }
        }
    }

    fn decorators(&mut self, d: &'a [ast::Decorator]) {
        for d in d {
            self.expr(&d.expression);
        }
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

    /// `compiler_visit_annotations` (evaluated at definition before 3.14,
    /// unless `from __future__ import annotations`): `args` before
    /// `posonlyargs`, as CPython orders them.
    fn annotations(&mut self, p: &'a Parameters, returns: Option<&'a Expr>) {
        if self.future_annotations || self.version.defers_annotations() {
            return;
        }
        let ann = |a: &'a ast::ParameterWithDefault| a.parameter.annotation.as_deref();
        let mut list: Vec<&'a Expr> = Vec::new();
        list.extend(p.args.iter().filter_map(ann));
        list.extend(p.posonlyargs.iter().filter_map(ann));
        if let Some(v) = &p.vararg {
            list.extend(v.annotation.as_deref());
        }
        list.extend(p.kwonlyargs.iter().filter_map(ann));
        if let Some(k) = &p.kwarg {
            list.extend(k.annotation.as_deref());
        }
        list.extend(returns);
        for e in list {
            self.expr(e);
        }
    }

    /// 3.9's `expr_constant` after the AST optimizer: `Some(truth)` for a
    /// test the compiler knows.
    fn constant(&self, e: &Expr) -> Option<bool> {
        match e {
            Expr::BooleanLiteral(b) => Some(b.value),
            Expr::NoneLiteral(_) => Some(false),
            Expr::EllipsisLiteral(_) => Some(true),
            Expr::NumberLiteral(n) => Some(match &n.value {
                ast::Number::Int(i) => *i != ast::Int::ZERO,
                ast::Number::Float(f) => *f != 0.0,
                ast::Number::Complex { real, imag } => *real != 0.0 || *imag != 0.0,
            }),
            Expr::StringLiteral(s) => Some(!s.value.is_empty()),
            Expr::BytesLiteral(b) => Some(b.value.iter().any(|p| !p.value.is_empty())),
            Expr::Name(n) if n.id.as_str() == "__debug__" => Some(self.optimize == 0),
            Expr::UnaryOp(u) if u.op == ast::UnaryOp::Not => match &*u.operand {
                Expr::Name(_) => None,
                other => self.constant(other).map(|v| !v),
            },
            _ => None,
        }
    }

    /// 3.9 compiles a branch it knows is dead without emitting it.
    fn dead(&self, test: &Expr) -> Option<bool> {
        if self.version.skips_dead_branches() { self.constant(test) } else { None }
    }

    fn if_chain(&mut self, test: &'a Expr, body: &'a [Stmt], rest: &'a [ast::ElifElseClause]) {
        match self.dead(test) {
            Some(false) => {}
            Some(true) => {
                self.stmts(body);
                return;
            }
            None => {
                self.expr(test);
                self.stmts(body);
            }
        }
        if let Some((first, more)) = rest.split_first() {
            match &first.test {
                Some(t) => self.if_chain(t, &first.body, more),
                None => self.stmts(&first.body),
            }
        }
    }

    fn handler(&mut self, h: &'a ast::ExceptHandlerExceptHandler) {
        if let Some(t) = &h.type_ {
            self.expr(t);
        }
        if let Some(n) = &h.name {
            self.name(n.as_str());
        }
        self.stmts(&h.body);
    }

    fn stmt(&mut self, s: &'a Stmt) {
        match s {
            Stmt::FunctionDef(f) => {
                self.decorators(&f.decorator_list);
                self.defaults(&f.parameters);
                self.annotations(&f.parameters, f.returns.as_deref());
                self.name(f.name.as_str());
            }
            Stmt::ClassDef(c) => {
                self.decorators(&c.decorator_list);
                if let Some(a) = &c.arguments {
                    a.args.iter().for_each(|x| self.expr(x));
                    a.keywords.iter().for_each(|k| self.expr(&k.value));
                }
                self.name(c.name.as_str());
            }
            Stmt::Return(r) => {
                if let Some(v) = &r.value {
                    self.expr(v);
                }
                self.unwind(false);
            }
            Stmt::Break(_) | Stmt::Continue(_) => self.unwind(true),
            Stmt::Delete(d) => d.targets.iter().for_each(|t| self.expr(t)),
            Stmt::Assign(a) => {
                self.expr(&a.value);
                a.targets.iter().for_each(|t| self.expr(t));
            }
            Stmt::AugAssign(a) => match &*a.target {
                Expr::Name(n) => {
                    self.name(n.id.as_str());
                    self.expr(&a.value);
                }
                Expr::Attribute(at) => {
                    self.expr(&at.value);
                    self.expr(&a.value);
                }
                Expr::Subscript(sub) => {
                    self.expr(&sub.value);
                    self.expr(&sub.slice);
                    self.expr(&a.value);
                }
                other => {
                    self.expr(other);
                    self.expr(&a.value);
                }
            },
            Stmt::AnnAssign(a) => {
                if let Some(v) = &a.value {
                    self.expr(v);
                    self.expr(&a.target);
                } else {
                    match &*a.target {
                        Expr::Name(_) => {}
                        Expr::Attribute(at) => self.expr(&at.value),
                        Expr::Subscript(sub) => {
                            self.expr(&sub.value);
                            self.expr(&sub.slice);
                        }
                        other => self.expr(other),
                    }
                }
                if !self.scope().kind.is_function_like()
                    && !self.future_annotations
                    && !self.version.defers_annotations()
                {
                    self.expr(&a.annotation);
                }
            }
            Stmt::TypeAlias(t) => self.expr(&t.name),
            Stmt::For(f) => {
                self.expr(&f.iter);
                self.expr(&f.target);
                self.fblocks.push(FBlock::Loop);
                self.stmts(&f.body);
                self.fblocks.pop();
                self.stmts(&f.orelse);
            }
            Stmt::While(w) => {
                if self.dead(&w.test) == Some(false) {
                    self.stmts(&w.orelse);
                    return;
                }
                self.expr(&w.test);
                self.fblocks.push(FBlock::Loop);
                self.stmts(&w.body);
                self.fblocks.pop();
                self.stmts(&w.orelse);
            }
            Stmt::If(i) => self.if_chain(&i.test, &i.body, &i.elif_else_clauses),
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
                    let mut stores = Vec::new();
                    self.pattern(&c.pattern, &mut stores);
                    for n in stores {
                        self.name(&n);
                    }
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
                let has_finally = !t.finalbody.is_empty();
                if has_finally {
                    self.fblocks.push(FBlock::Finally(&t.finalbody));
                }
                self.stmts(&t.body);
                if self.version.else_before_handlers() {
                    self.stmts(&t.orelse);
                    for ast::ExceptHandler::ExceptHandler(h) in &t.handlers {
                        self.handler(h);
                    }
                } else {
                    for ast::ExceptHandler::ExceptHandler(h) in &t.handlers {
                        self.handler(h);
                    }
                    self.stmts(&t.orelse);
                }
                if has_finally {
                    self.fblocks.pop();
                    self.fblocks.push(FBlock::FinallyEnd);
                    self.stmts(&t.finalbody);
                    self.fblocks.pop();
                }
            }
            Stmt::Assert(a) => {
                if self.optimize == 0 {
                    self.expr(&a.test);
                    if let Some(m) = &a.msg {
                        self.expr(m);
                    }
                }
            }
            Stmt::Import(_) | Stmt::ImportFrom(_) => {
                walk::import_bindings(s).iter().for_each(|name| self.name(name))
            }
            Stmt::Global(_) | Stmt::Nonlocal(_) | Stmt::Pass(_) => {}
            Stmt::Expr(e) => self.expr(&e.value),
            Stmt::IpyEscapeCommand(_) => self.fail("IPython escape commands"),
        }
    }

    /// Loads in the pattern are emitted as met; captured names are stored
    /// after the whole pattern matched, in the first alternative's order.
    fn pattern(&mut self, p: &'a Pattern, stores: &mut Vec<String>) {
        if let Pattern::MatchOr(o) = p {
            // Every alternative binds the same names: the first one's stores count.
            for (i, alt) in o.patterns.iter().enumerate() {
                if i == 0 {
                    self.pattern(alt, stores);
                } else {
                    self.pattern(alt, &mut Vec::new());
                }
            }
            return;
        }
        walk::pattern_parts(p, &mut |part| match part {
            PatternPart::Expr(e) => self.expr(e),
            PatternPart::Pattern(p) => self.pattern(p, stores),
            PatternPart::Capture(name) => stores.push(name.to_string()),
        });
    }

    fn expr(&mut self, e: &'a Expr) {
        match e {
            Expr::Name(n) => self.name(n.id.as_str()),
            Expr::Lambda(l) => {
                if let Some(p) = &l.parameters {
                    self.defaults(p);
                }
            }
            Expr::ListComp(_) | Expr::SetComp(_) | Expr::DictComp(_) | Expr::Generator(_) => {
                self.comprehension(e)
            }
            Expr::IpyEscapeCommand(_) => self.fail("IPython escape commands"),
            _ => walk::expr_children(e, &mut |x| self.expr(x)),
        }
    }

    /// A comprehension met in this code object: its outermost iterable is
    /// evaluated here; a 3.12+ inlined one is compiled here entirely.
    fn comprehension(&mut self, e: &'a Expr) {
        let Some(c) = self.child(e.range()) else {
            self.fail("a comprehension the scope pass did not see");
            return;
        };
        let gens = generators(e);
        let Some(first) = gens.first() else { return };
        self.expr(&first.iter);
        if !self.scopes[c].inlined {
            return;
        }
        // push_inlined_comprehension_state: LOAD_FAST_AND_CLEAR of the
        // comprehension's own names, in its symbol order.
        let kind = self.scope().kind;
        let class_all = kind == Kind::Class && self.version.class_comprehension_hides_all_names();
        let push: Vec<String> = self.scopes[c]
            .syms
            .iter()
            .filter(|(_, f)| class_all || (f & DEF_LOCAL != 0 && f & DEF_NONLOCAL == 0))
            .map(|(n, _)| n.clone())
            .collect();
        for n in push {
            self.add(&n);
        }
        self.comprehension_body(e, true);
    }

    /// The comprehension's own part: each generator's target and
    /// conditions (and the iterables after the first), then the element.
    fn comprehension_body(&mut self, e: &'a Expr, _inlined: bool) {
        let gens = generators(e);
        for (i, g) in gens.iter().enumerate() {
            if i > 0 {
                self.expr(&g.iter);
            }
            self.expr(&g.target);
            g.ifs.iter().for_each(|x| self.expr(x));
        }
        match e {
            Expr::ListComp(c) => self.expr(&c.elt),
            Expr::SetComp(c) => self.expr(&c.elt),
            Expr::Generator(c) => self.expr(&c.elt),
            Expr::DictComp(c) => {
                if let Some(k) = &c.key {
                    self.expr(k);
                }
                self.expr(&c.value);
            }
            _ => {}
        }
    }
}

fn generators(e: &Expr) -> &[ast::Comprehension] {
    match e {
        Expr::ListComp(c) => &c.generators,
        Expr::SetComp(c) => &c.generators,
        Expr::DictComp(c) => &c.generators,
        Expr::Generator(c) => &c.generators,
        _ => &[],
    }
}
