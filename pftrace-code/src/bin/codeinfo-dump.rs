//! Prints, per code object of each file, what the source analysis says, in
//! the JSON-lines shape of tests/python/dump_code.py: for comparing by hand
//! and for timing (`--time`). Usage: codeinfo-dump VERSION OPTIMIZE FILE...

use std::time::Instant;

use pftrace_code::{FileCodes, PyVersion};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let time = args.first().is_some_and(|a| a == "--time");
    let args = if time { &args[1..] } else { &args[..] };
    let (Some(v), Some(o)) =
        (args.first().and_then(|v| PyVersion::parse(v)), args.get(1).and_then(|o| o.parse().ok()))
    else {
        eprintln!("usage: codeinfo-dump [--time] VERSION OPTIMIZE FILE...");
        std::process::exit(2);
    };
    for path in &args[2..] {
        let src = match std::fs::read_to_string(path) {
            Ok(s) => s,
            Err(e) => {
                println!("{}", serde_json::json!({"file": path, "error": e.to_string()}));
                continue;
            }
        };
        let t = Instant::now();
        let codes = FileCodes::analyze(&src, v, o);
        let took = t.elapsed();
        if time {
            println!("{path}: {} bytes, {:.3} ms", src.len(), took.as_secs_f64() * 1e3);
            continue;
        }
        match codes {
            Err(e) => println!("{}", serde_json::json!({"file": path, "error": e})),
            Ok(f) => {
                for c in &f.codes {
                    println!(
                        "{}",
                        serde_json::json!({
                            "file": path, "name": c.name, "firstlineno": c.lineno.as_ref().ok(), "span_first": c.firstlineno, "lastline": c.lastline,
                            "qualname": c.qualname.as_ref().ok(), "qualname_error": c.qualname.as_ref().err(),
                            "params": c.params.names, "posonly": c.params.posonly, "positional": c.params.positional,
                            "kwonly": c.params.kwonly, "varargs": c.params.varargs, "varkw": c.params.varkw,
                            "locals": c.locals.as_ref().ok(), "locals_error": c.locals.as_ref().err(),
                        })
                    );
                }
            }
        }
    }
}
