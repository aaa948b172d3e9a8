//! The parts of an expression or a pattern, in the order CPython's symbol
//! table and code generator visit them: the one walk behind both passes
//! (`symtable.rs`, `varnames.rs`), each of which handles only the nodes it
//! treats in its own way and hands the rest here.

use ruff_python_ast::{
    self as ast, Expr, InterpolatedStringElement, InterpolatedStringElements, Pattern, Stmt,
};

/// Gives `visit` each direct sub-expression of `e` evaluated in the scope
/// `e` is in, in evaluation order. Dict items go key, value, key, value (the
/// code generator's order; the symbol table's differs, see `symtable.rs`).
/// Lambdas, comprehensions and IPython escapes are the caller's: nothing is
/// given for them.
pub fn expr_children<'a>(e: &'a Expr, visit: &mut impl FnMut(&'a Expr)) {
    match e {
        Expr::Named(n) => {
            visit(&n.value);
            visit(&n.target);
        }
        Expr::BoolOp(b) => b.values.iter().for_each(&mut *visit),
        Expr::BinOp(b) => {
            visit(&b.left);
            visit(&b.right);
        }
        Expr::UnaryOp(u) => visit(&u.operand),
        Expr::If(i) => {
            visit(&i.test);
            visit(&i.body);
            visit(&i.orelse);
        }
        Expr::Dict(d) => {
            for it in &d.items {
                if let Some(k) = &it.key {
                    visit(k);
                }
                visit(&it.value);
            }
        }
        Expr::Set(s) => s.elts.iter().for_each(&mut *visit),
        Expr::List(l) => l.elts.iter().for_each(&mut *visit),
        Expr::Tuple(t) => t.elts.iter().for_each(&mut *visit),
        Expr::Await(a) => visit(&a.value),
        Expr::Yield(y) => y.value.iter().for_each(|v| visit(v)),
        Expr::YieldFrom(y) => visit(&y.value),
        Expr::Compare(c) => {
            visit(&c.left);
            c.comparators.iter().for_each(&mut *visit);
        }
        Expr::Call(c) => {
            visit(&c.func);
            c.arguments.args.iter().for_each(&mut *visit);
            c.arguments.keywords.iter().for_each(|k| visit(&k.value));
        }
        Expr::FString(f) => {
            for part in f.value.as_slice() {
                if let ast::FStringPart::FString(fs) = part {
                    interpolations(&fs.elements, visit);
                }
            }
        }
        Expr::TString(t) => t.value.as_slice().iter().for_each(|ts| interpolations(&ts.elements, visit)),
        Expr::Attribute(a) => visit(&a.value),
        Expr::Subscript(s) => {
            visit(&s.value);
            visit(&s.slice);
        }
        Expr::Starred(s) => visit(&s.value),
        Expr::Slice(s) => [&s.lower, &s.upper, &s.step].into_iter().flatten().for_each(|x| visit(x)),
        Expr::Name(_)
        | Expr::StringLiteral(_)
        | Expr::BytesLiteral(_)
        | Expr::NumberLiteral(_)
        | Expr::BooleanLiteral(_)
        | Expr::NoneLiteral(_)
        | Expr::EllipsisLiteral(_)
        | Expr::Lambda(_)
        | Expr::ListComp(_)
        | Expr::SetComp(_)
        | Expr::DictComp(_)
        | Expr::Generator(_)
        | Expr::IpyEscapeCommand(_) => {}
    }
}

/// The expressions interpolated in an f-string or t-string, format specs'
/// included.
fn interpolations<'a>(els: &'a InterpolatedStringElements, visit: &mut impl FnMut(&'a Expr)) {
    for el in els.iter() {
        if let InterpolatedStringElement::Interpolation(i) = el {
            visit(&i.expression);
            if let Some(spec) = &i.format_spec {
                interpolations(&spec.elements, visit);
            }
        }
    }
}

/// One part of a `match` pattern.
pub enum PatternPart<'a> {
    /// A value or class expression, evaluated.
    Expr(&'a Expr),
    /// A sub-pattern.
    Pattern(&'a Pattern),
    /// A name the pattern binds.
    Capture(&'a str),
}

/// Gives `visit` the parts of `p` in visiting order. The alternatives of an
/// or-pattern come as sub-patterns, all of them.
pub fn pattern_parts<'a>(p: &'a Pattern, visit: &mut impl FnMut(PatternPart<'a>)) {
    use PatternPart::{Capture, Expr as Value, Pattern as Sub};
    match p {
        Pattern::MatchValue(v) => visit(Value(&v.value)),
        Pattern::MatchSingleton(_) => {}
        Pattern::MatchSequence(s) => s.patterns.iter().for_each(|p| visit(Sub(p))),
        Pattern::MatchMapping(m) => {
            m.keys.iter().for_each(|k| visit(Value(k)));
            m.patterns.iter().for_each(|p| visit(Sub(p)));
            if let Some(r) = &m.rest {
                visit(Capture(r.as_str()));
            }
        }
        Pattern::MatchClass(c) => {
            visit(Value(&c.cls));
            c.arguments.patterns.iter().for_each(|p| visit(Sub(p)));
            c.arguments.keywords.iter().for_each(|k| visit(Sub(&k.pattern)));
        }
        Pattern::MatchStar(s) => {
            if let Some(n) = &s.name {
                visit(Capture(n.as_str()));
            }
        }
        Pattern::MatchAs(a) => {
            if let Some(p) = &a.pattern {
                visit(Sub(p));
            }
            if let Some(n) = &a.name {
                visit(Capture(n.as_str()));
            }
        }
        Pattern::MatchOr(o) => o.patterns.iter().for_each(|p| visit(Sub(p))),
    }
}

/// The names an `import` or `from ... import` statement binds, in order:
/// `import a.b` binds `a`, `import a.b as c` binds `c`, `from m import *`
/// binds none that can be known here. Empty for other statements.
pub fn import_bindings(s: &Stmt) -> Vec<String> {
    match s {
        Stmt::Import(i) => i
            .names
            .iter()
            .map(|a| {
                a.asname.as_ref().map_or_else(
                    || a.name.as_str().split('.').next().unwrap_or_default().to_string(),
                    |n| n.to_string(),
                )
            })
            .collect(),
        Stmt::ImportFrom(i) => i
            .names
            .iter()
            .filter(|a| a.name.as_str() != "*")
            .map(|a| a.asname.as_ref().unwrap_or(&a.name).to_string())
            .collect(),
        _ => Vec::new(),
    }
}
