//! The dotted module name a process gives a source file: its `sys.path`
//! rebuilt from outside (CPython's rules for the script's directory, `-m`,
//! `-c`, `-I`/`-P`/`-E`/`-s`/`-S`, `PYTHONPATH`, `PYTHONHOME`, virtual
//! environments through `pyvenv.cfg`, the standard library found by its
//! `os.py` landmark, site-packages and dist-packages, the user site, and
//! directories named in `.pth` files), then the file matched against it.

use std::collections::HashMap;

use crate::{
    info::Field,
    process::{PTH_MAX, Process},
    version::PyVersion,
};

/// How the interpreter was started (its command line).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Main {
    Script(String),
    Module(String),
    Command,
    Stdin,
    /// argv[0] is not a `python` program (embedded, or a renamed binary):
    /// no `__main__` and no `sys.path[0]` are known.
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    pub main: Main,
    /// `-E` or `-I`: the `PYTHON*` variables are ignored.
    pub ignore_env: bool,
    /// `-I` or `-P` (or `PYTHONSAFEPATH`, 3.11+): no `sys.path[0]`.
    pub safe_path: bool,
    /// `-s`, `-I`: no user site.
    pub no_user_site: bool,
    /// `-S`: no site-packages at all.
    pub no_site: bool,
    /// `-O` count.
    pub optimize: u8,
}

/// Reads a CPython command line (`Modules/main.c`'s options).
pub fn parse_cmdline(argv: &[String]) -> Launch {
    let mut l = Launch {
        main: Main::Unknown,
        ignore_env: false,
        safe_path: false,
        no_user_site: false,
        no_site: false,
        optimize: 0,
    };
    let is_python = argv.first().and_then(|a| a.rsplit('/').next()).is_some_and(|b| b.starts_with("python"));
    if !is_python {
        return l;
    }
    let mut i = 1;
    l.main = Main::Stdin;
    while i < argv.len() {
        let a = &argv[i];
        if a == "--" {
            i += 1;
            break;
        }
        if a == "-" || !a.starts_with('-') {
            break;
        }
        if a.starts_with("--") {
            if a == "--check-hash-based-pycs" {
                i += 1;
            }
            i += 1;
            continue;
        }
        let flags: Vec<char> = a[1..].chars().collect();
        let mut j = 0;
        while j < flags.len() {
            match flags[j] {
                'c' => {
                    l.main = Main::Command;
                    return l;
                }
                'm' => {
                    let rest: String = flags[j + 1..].iter().collect();
                    let m = if rest.is_empty() { argv.get(i + 1).cloned().unwrap_or_default() } else { rest };
                    l.main = Main::Module(m);
                    return l;
                }
                'W' | 'X' => {
                    if j + 1 == flags.len() {
                        i += 1;
                    }
                    break;
                }
                'E' => l.ignore_env = true,
                'I' => {
                    l.ignore_env = true;
                    l.safe_path = true;
                    l.no_user_site = true;
                }
                'P' => l.safe_path = true,
                's' => l.no_user_site = true,
                'S' => l.no_site = true,
                'O' => l.optimize += 1,
                _ => {}
            }
            j += 1;
        }
        i += 1;
    }
    match argv.get(i) {
        Some(s) if s != "-" => l.main = Main::Script(s.clone()),
        _ => l.main = Main::Stdin,
    }
    l
}

/// Lexical `os.path.normpath` of an absolute path.
pub fn normpath(p: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    format!("/{}", out.join("/"))
}

fn join(dir: &str, rel: &str) -> String {
    if rel.starts_with('/') { normpath(rel) } else { normpath(&format!("{dir}/{rel}")) }
}

fn dirname(p: &str) -> String {
    match p.rsplit_once('/') {
        Some(("", _)) => "/".into(),
        Some((d, _)) => d.into(),
        None => ".".into(),
    }
}

/// One `sys.path` entry, and whether it is known for sure (a working
/// directory that changed since the start is not).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Root {
    pub dir: String,
    pub what: &'static str,
    pub doubt: Option<String>,
}

/// A process's import roots, in `sys.path` order.
#[derive(Debug)]
pub struct Roots {
    pub version: PyVersion,
    pub launch: Launch,
    pub roots: Vec<Root>,
    /// `co_filename` of the `__main__` script (3.9+ make it absolute).
    main_file: Option<Result<String, String>>,
    /// Directory -> has `__init__.py`, as looked up.
    packages: std::sync::Mutex<HashMap<String, bool>>,
}

/// `pythonX.Y` in a file name.
fn version_in(name: &str) -> Option<PyVersion> {
    let i = name.rfind("python")?;
    let rest = &name[i + 6..];
    let end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
    PyVersion::parse(&rest[..end])
}

/// `key = value` of a `pyvenv.cfg`.
fn cfg_value<'a>(cfg: &'a str, key: &str) -> Option<&'a str> {
    cfg.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == key).then(|| v.trim())
    })
}

impl Roots {
    /// Rebuilds the import roots of `p`, running CPython `version` if
    /// given (else read from the executable's name or `pyvenv.cfg`).
    pub fn of(p: &Process, version: Option<PyVersion>) -> Result<Self, String> {
        let launch = parse_cmdline(&p.argv);
        let exe = p.exe.clone().ok_or("its executable is unreadable")?;
        let exe_dir = dirname(&exe);
        let argv0_dir = p.argv.first().filter(|a| a.starts_with('/')).map(|a| dirname(a));
        let ignore_env = launch.ignore_env;
        let env =
            move |k: &str| if ignore_env { None } else { p.env.get(k).filter(|v| !v.is_empty()).cloned() };
        p.as_process(|| {
            // pyvenv.cfg beside the executable or one level up (the
            // executable as started: a venv's python is a link).
            let mut venv = None;
            for d in argv0_dir.iter().chain(std::iter::once(&exe_dir)) {
                for cand in [d.clone(), dirname(d)] {
                    let cfg = format!("{cand}/pyvenv.cfg");
                    if let Some(text) = p.read_text_here(&cfg, 16 * 1024) {
                        venv = Some((cand, text));
                        break;
                    }
                }
                if venv.is_some() {
                    break;
                }
            }
            let version = version
                .or_else(|| p.argv.first().and_then(|a| version_in(a.rsplit('/').next()?)))
                .or_else(|| version_in(exe.rsplit('/').next()?))
                .or_else(|| {
                    venv.as_ref().and_then(|(_, c)| {
                        cfg_value(c, "version_info").or(cfg_value(c, "version")).and_then(PyVersion::parse)
                    })
                })
                .ok_or("its CPython version is unknown (name the interpreter's version)")?;
            let libname = format!("python{}.{}", version.major, version.minor);
            // The standard library: PYTHONHOME, else the os.py landmark
            // above the (base) executable.
            let mut homes: Vec<String> = Vec::new();
            if let Some(h) = env("PYTHONHOME") {
                homes.push(h.split(':').next().unwrap_or_default().to_string());
            }
            let mut starts = vec![exe_dir.clone()];
            if let Some((_, cfg)) = &venv
                && let Some(h) = cfg_value(cfg, "home")
            {
                starts.insert(0, h.to_string());
            }
            for s in &starts {
                let mut d = s.clone();
                for _ in 0..4 {
                    homes.push(dirname(&d));
                    d = dirname(&d);
                }
            }
            let stdlib_prefix = homes.into_iter().find(|h| {
                ["lib", "lib64"]
                    .iter()
                    .any(|l| p.kind_here(&format!("{h}/{l}/{libname}/os.py")) == Some(true))
            });
            let stdlib_prefix =
                stdlib_prefix.ok_or_else(|| format!("no {libname}/os.py above its executable {exe}"))?;
            let mut roots: Vec<Root> = Vec::new();
            let cwd = p.cwd.clone();
            // A working directory is sure when it is still where the
            // process started (its initial PWD names the same directory).
            let cwd_doubt = match (&cwd, p.env.get("PWD")) {
                (Some(c), Some(pwd)) if p.kind_here(pwd) == Some(false) && same_dir(p, c, pwd) => None,
                (Some(_), _) => {
                    Some("the working directory may have changed since the process started".to_string())
                }
                (None, _) => Some("its working directory is unreadable".to_string()),
            };
            // sys.path[0]
            let mut main_file = None;
            if !(launch.safe_path || (version >= PyVersion::new(3, 11) && env("PYTHONSAFEPATH").is_some())) {
                match &launch.main {
                    Main::Script(s) => {
                        let abs = if s.starts_with('/') {
                            Ok(normpath(s))
                        } else {
                            match (&cwd, &cwd_doubt) {
                                (Some(c), None) => Ok(join(c, s)),
                                _ => Err(format!(
                                    "the script {s:?} was named relative to a working directory not known now"
                                )),
                            }
                        };
                        if let Ok(a) = &abs {
                            roots.push(Root { dir: dirname(a), what: "the script's directory", doubt: None });
                            if let Some(real) = realpath(p, a) {
                                roots.push(Root {
                                    dir: dirname(&real),
                                    what: "the script's directory",
                                    doubt: None,
                                });
                            }
                        }
                        main_file = Some(abs);
                    }
                    Main::Module(_) | Main::Command | Main::Stdin => {
                        if let Some(c) = &cwd {
                            roots.push(Root {
                                dir: c.clone(),
                                what: "the working directory",
                                doubt: cwd_doubt.clone(),
                            });
                        }
                    }
                    Main::Unknown => {}
                }
            }
            if let Some(pp) = env("PYTHONPATH") {
                for e in pp.split(':') {
                    if e.starts_with('/') {
                        roots.push(Root { dir: normpath(e), what: "PYTHONPATH", doubt: None });
                    } else if let Some(c) = &cwd {
                        roots.push(Root {
                            dir: join(c, e),
                            what: "PYTHONPATH (relative)",
                            doubt: cwd_doubt.clone(),
                        });
                    }
                }
            }
            for l in ["lib", "lib64"] {
                roots.push(Root {
                    dir: format!("{stdlib_prefix}/{l}/{libname}"),
                    what: "the standard library",
                    doubt: None,
                });
            }
            if !launch.no_site {
                let mut sites: Vec<String> = Vec::new();
                let system_site = match &venv {
                    Some((vdir, cfg)) => {
                        for l in ["lib", "lib64"] {
                            sites.push(format!("{vdir}/{l}/{libname}/site-packages"));
                        }
                        cfg_value(cfg, "include-system-site-packages") == Some("true")
                    }
                    None => true,
                };
                if system_site && !launch.no_user_site && env("PYTHONNOUSERSITE").is_none() {
                    let base =
                        env("PYTHONUSERBASE").or_else(|| p.env.get("HOME").map(|h| format!("{h}/.local")));
                    if let Some(b) = base {
                        sites.push(format!("{b}/lib/{libname}/site-packages"));
                    }
                }
                if system_site {
                    for l in ["lib", "lib64"] {
                        sites.push(format!("{stdlib_prefix}/{l}/{libname}/site-packages"));
                    }
                    // Debian's layout.
                    sites.push(format!("{stdlib_prefix}/local/lib/{libname}/dist-packages"));
                    sites.push(format!("{stdlib_prefix}/lib/python3/dist-packages"));
                    sites.push(format!("{stdlib_prefix}/lib/{libname}/dist-packages"));
                }
                for s in sites {
                    if p.kind_here(&s) != Some(false) {
                        continue;
                    }
                    roots.push(Root { dir: s.clone(), what: "site-packages", doubt: None });
                    let mut pths: Vec<String> =
                        p.list_here(&s, 4096).into_iter().filter(|n| n.ends_with(".pth")).collect();
                    pths.sort();
                    for pth in pths.into_iter().take(64) {
                        let Some(text) = p.read_text_here(&format!("{s}/{pth}"), PTH_MAX) else { continue };
                        for line in text.lines().take(256) {
                            let line = line.trim_end();
                            if line.is_empty()
                                || line.starts_with('#')
                                || line.starts_with("import ")
                                || line.starts_with("import\t")
                            {
                                continue;
                            }
                            let d = join(&s, line);
                            if p.kind_here(&d) == Some(false) {
                                roots.push(Root { dir: d, what: "a .pth file", doubt: None });
                            }
                        }
                    }
                }
            }
            Ok(Self { version, launch, roots, main_file, packages: Default::default() })
        })
    }

    fn is_package(&self, p: &Process, dir: &str) -> bool {
        if let Some(&b) = self.packages.lock().expect("package cache").get(dir) {
            return b;
        }
        let b = p.kind_here(&format!("{dir}/__init__.py")) == Some(true);
        self.packages.lock().expect("package cache").insert(dir.to_string(), b);
        b
    }

    /// The module `filename` (a `co_filename`) is, in process `p`.
    pub fn module_of(&self, p: &Process, filename: &str) -> Field<String> {
        if let Some(inner) = filename.strip_prefix("<frozen ").and_then(|r| r.strip_suffix('>')) {
            // The import system's two bootstrap modules run as
            // `_frozen_importlib(_external)` until `importlib` is imported,
            // which renames them (seen: a `-m` run on 3.9); other frozen
            // modules (3.11+: os, posixpath, codecs, ...) keep their names.
            if inner.starts_with("importlib._bootstrap") {
                let frozen = inner.replace("importlib._bootstrap", "_frozen_importlib");
                return Field::unknown(format!(
                    "{inner} runs as {frozen} until importlib is imported, as {inner} after"
                ));
            }
            return Field::Known(inner.to_string());
        }
        if !filename.starts_with('/') {
            return Field::unknown(format!("{filename:?} is not an absolute file name"));
        }
        let f = normpath(filename);
        match &self.main_file {
            Some(Ok(m)) if *m == f => return Field::Known("__main__".into()),
            Some(Err(why)) if self.launch_script_name().is_some_and(|n| f.ends_with(&format!("/{n}"))) => {
                return Field::unknown(why.clone());
            }
            _ => {}
        }
        let Some(stem_path) = f.strip_suffix(".py") else {
            return Field::unknown(format!("{filename:?} is not a .py file"));
        };
        // (namespace package count, root index, name, doubt)
        let mut best: Option<(usize, usize, String, Option<String>)> = None;
        p.as_process(|| {
            for (ri, r) in self.roots.iter().enumerate() {
                let prefix = if r.dir == "/" { "/".to_string() } else { format!("{}/", r.dir) };
                let Some(rel) = stem_path.strip_prefix(&prefix) else { continue };
                let mut parts: Vec<&str> = rel.split('/').collect();
                if parts.iter().any(|c| !is_identifier(c)) {
                    continue;
                }
                let mut ns = 0;
                let mut dir = r.dir.clone();
                for c in &parts[..parts.len() - 1] {
                    dir = format!("{}/{c}", dir.trim_end_matches('/'));
                    if !self.is_package(p, &dir) {
                        ns += 1;
                    }
                }
                if parts.last() == Some(&"__init__") {
                    parts.pop();
                    if parts.is_empty() {
                        continue;
                    }
                }
                let name = parts.join(".");
                if best.as_ref().is_none_or(|b| (ns, ri) < (b.0, b.1)) {
                    best = Some((ns, ri, name, r.doubt.clone()));
                }
            }
        });
        let Some((_, _, name, doubt)) = best else {
            return Field::unknown(format!("{filename} is under none of the process's import roots"));
        };
        if let Some(why) = doubt {
            return Field::unknown(why);
        }
        if let Main::Module(m) = &self.launch.main
            && (name == *m || name == format!("{m}.__main__"))
        {
            return Field::Known("__main__".into());
        }
        Field::Known(name)
    }

    fn launch_script_name(&self) -> Option<&str> {
        match &self.launch.main {
            Main::Script(s) => s.rsplit('/').next(),
            _ => None,
        }
    }
}

/// Whether two directory names of the process are one directory.
fn same_dir(p: &Process, a: &str, b: &str) -> bool {
    let (Ok(x), Ok(y)) = (p.open_in_root(a, true), p.open_in_root(b, true)) else { return false };
    match (x.metadata(), y.metadata()) {
        (Ok(m), Ok(n)) => {
            use std::os::unix::fs::MetadataExt;
            m.dev() == n.dev() && m.ino() == n.ino()
        }
        _ => false,
    }
}

/// `realpath` of a file in the process's view, when its root is ours.
fn realpath(p: &Process, path: &str) -> Option<String> {
    // As read when the process was opened: it may have exited since.
    if p.root_link.as_deref() != Some("/") {
        return None;
    }
    let f = p.open_in_root(path, true).ok()?;
    let real = std::fs::read_link(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&f))).ok()?;
    let real = real.to_str()?.to_string();
    (real != path).then_some(real)
}

/// `str.isidentifier` for the names a module path can hold (ASCII letters,
/// digits, `_`, and non-ASCII letters).
fn is_identifier(s: &str) -> bool {
    let mut it = s.chars();
    let Some(first) = it.next() else { return false };
    (first == '_' || first.is_alphabetic()) && it.all(|c| c == '_' || c.is_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split(' ').map(String::from).collect()
    }

    #[test]
    fn command_lines() {
        assert_eq!(parse_cmdline(&argv("/usr/bin/python3.9 app.py -x")).main, Main::Script("app.py".into()));
        assert_eq!(
            parse_cmdline(&argv("python3 -u -W ignore -X dev app.py")).main,
            Main::Script("app.py".into())
        );
        assert_eq!(parse_cmdline(&argv("python3 -m pkg.mod arg")).main, Main::Module("pkg.mod".into()));
        assert_eq!(parse_cmdline(&argv("python3 -mpkg.mod")).main, Main::Module("pkg.mod".into()));
        assert_eq!(parse_cmdline(&argv("python3 -c pass")).main, Main::Command);
        assert_eq!(parse_cmdline(&argv("python3 -")).main, Main::Stdin);
        assert_eq!(parse_cmdline(&argv("uwsgi --ini x")).main, Main::Unknown);
        let l = parse_cmdline(&argv("python3 -OO -Es app.py"));
        assert_eq!((l.optimize, l.ignore_env, l.no_user_site, l.safe_path), (2, true, true, false));
        let l = parse_cmdline(&argv("python3 -I -m x"));
        assert!(l.safe_path && l.ignore_env && l.no_user_site);
    }

    #[test]
    fn paths() {
        assert_eq!(normpath("/a//b/./c/../d"), "/a/b/d");
        assert_eq!(version_in("python3.15"), Some(PyVersion::new(3, 15)));
        assert_eq!(version_in("python3"), None);
        assert!(
            is_identifier("decoder")
                && is_identifier("_x1")
                && !is_identifier("site-packages")
                && !is_identifier("python3.9")
        );
    }
}
