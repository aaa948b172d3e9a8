//! Launch mode: a command started with the agent's directory first on
//! PYTHONPATH loads the agent from `sitecustomize` before its first line,
//! in every Python it starts. Interpreter options that skip PYTHONPATH or
//! site (`-E`, `-I`, `-S`, also in a script's `#!` line) keep the agent out:
//! detected here so pftraced can say so instead of tracing nothing.

use std::{io::Read as _, path::Path};

use super::install::Installed;

/// Why a command line cannot load the agent at start-up, if it cannot.
pub fn refusal(argv: &[String]) -> Option<String> {
    let first = argv.first()?;
    let base = Path::new(first).file_name()?.to_string_lossy().into_owned();
    let (interp_args, what): (Vec<String>, String) = if base.starts_with("python") {
        (argv[1..].to_vec(), format!("`{}`", argv.join(" ")))
    } else {
        // A script run directly: its `#!` line's options.
        let shebang = read_shebang(Path::new(first))?;
        let mut words: Vec<String> = shebang.split_whitespace().map(str::to_string).collect();
        if words.first().is_some_and(|w| w.ends_with("/env")) {
            words.remove(0);
            if words.first().is_some_and(|w| w == "-S") {
                words.remove(0); // env -S splits the rest
            }
        }
        let is_python = words
            .first()
            .and_then(|w| Path::new(w).file_name())
            .is_some_and(|n| n.to_string_lossy().starts_with("python"));
        if !is_python {
            return None;
        }
        (words[1..].to_vec(), format!("the `#!{shebang}` line of {first}"))
    };
    let flags = python_flags(&interp_args);
    let bad: Vec<&str> = [('E', "-E"), ('I', "-I"), ('S', "-S")]
        .into_iter()
        .filter(|(c, _)| flags.contains(*c))
        .map(|(_, f)| f)
        .collect();
    if bad.is_empty() {
        return None;
    }
    Some(format!(
        "{what} runs Python with {}: it then ignores PYTHONPATH or skips site, so pftrace's agent cannot load before the first line; run it without {} (or trace a CPython whose USDT probes work: 3.6-3.10 or 3.15+ built --with-dtrace)",
        bad.join(" "),
        if bad.len() == 1 { "it" } else { "them" }
    ))
}

/// Single-letter interpreter options before the script, `-c` or `-m`.
fn python_flags(args: &[String]) -> String {
    let mut flags = String::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--" || !a.starts_with('-') || a == "-" {
            break;
        }
        if a.starts_with("--") {
            continue;
        }
        let letters = &a[1..];
        for (i, c) in letters.char_indices() {
            match c {
                // These end the options (the rest is their argument or the program).
                'c' | 'm' => return flags,
                // These take an argument (attached or next).
                'X' | 'W' | 'Q' => {
                    if i + 1 == letters.len() {
                        it.next();
                    }
                    break;
                }
                _ => flags.push(c),
            }
        }
    }
    flags
}

fn read_shebang(path: &Path) -> Option<String> {
    let mut f = std::fs::File::open(path).ok()?;
    let mut buf = [0u8; 256];
    let n = f.read(&mut buf).ok()?;
    let head = &buf[..n];
    let line = head.strip_prefix(b"#!")?;
    let end = line.iter().position(|&b| b == b'\n').unwrap_or(line.len());
    Some(String::from_utf8_lossy(&line[..end]).trim().to_string())
}

/// The shell line `pftracectl env` prints for jobs on 3.11-3.13 (no way in
/// once running): started with it, their Pythons load the agent at start-up
/// and connect to pftraced whenever it runs.
pub fn env_line(installed: &Installed) -> String {
    let dir = installed.dir.to_string_lossy();
    let sock = installed.socket.to_string_lossy();
    format!("export PYTHONPATH={dir}${{PYTHONPATH:+:$PYTHONPATH}} PFTRACE_AGENT_SOCKET={sock}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn finds_options_that_keep_the_agent_out() {
        assert!(refusal(&argv("python3 app.py")).is_none());
        assert!(
            refusal(&argv("python3 -u -X dev app.py -E")).is_none(),
            "-E after the script is the script's"
        );
        assert!(refusal(&argv("python3 -c import -I")).is_none());
        let m = refusal(&argv("/usr/bin/python3.12 -E app.py")).unwrap();
        assert!(m.contains("with -E") && m.contains("without it"), "{m}");
        let m = refusal(&argv("python3 -sIu app.py")).unwrap();
        assert!(m.contains("with -I"), "{m}");
        let m = refusal(&argv("python3 -S -E -m mod")).unwrap();
        assert!(m.contains("-E -S"), "{m}");
        assert!(refusal(&argv("python3 -X importtime -m mod")).is_none());
    }

    #[test]
    fn reads_shebang_lines() {
        let dir = std::env::temp_dir().join(format!("pftrace-launch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("app");
        std::fs::write(&script, "#!/usr/bin/env -S python3 -I\nprint(1)\n").unwrap();
        let m = refusal(&[script.to_string_lossy().into_owned()]).unwrap();
        assert!(m.contains("#!/usr/bin/env -S python3 -I") && m.contains("with -I"), "{m}");
        std::fs::write(&script, "#!/usr/bin/python3\nprint(1)\n").unwrap();
        assert!(refusal(&[script.to_string_lossy().into_owned()]).is_none());
        std::fs::write(&script, "#!/bin/sh -e\n").unwrap();
        assert!(refusal(&[script.to_string_lossy().into_owned()]).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
