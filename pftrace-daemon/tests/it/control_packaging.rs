//! The packaging files: the example configuration is valid and shows every
//! key at its default; the systemd unit passes `systemd-analyze verify`.

use std::{collections::BTreeSet, fs, path::Path, process::Command};

use pftrace::config::Config;

fn packaging(file: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging").join(file);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn example_config_is_valid_and_shows_the_defaults() {
    let text = packaging("pftraced.toml.example");
    let config = Config::parse(&text, "pftraced.toml.example").unwrap();
    assert_eq!(config, Config::default(), "the example's active values must be the defaults");

    // Every key appears, the optional ones commented out.
    let uncommented: String = text
        .lines()
        .map(|l| {
            l.strip_prefix("# ")
                .filter(|r| ["dir =", "group =", "root ="].iter().any(|k| r.starts_with(k)))
                .unwrap_or(l)
        })
        .collect::<Vec<_>>()
        .join("\n");
    let table: toml::Table = toml::from_str(&uncommented).unwrap();
    let mut keys = BTreeSet::new();
    for (k, v) in &table {
        match v.as_table() {
            Some(section) => keys.extend(section.keys().map(|s| format!("{k}.{s}"))),
            None => drop(keys.insert(k.clone())),
        }
    }
    let expected = [
        "names",
        "targets.pids",
        "targets.cgroups",
        "targets.all",
        "targets.binaries",
        "targets.wait_for_cgroups",
        "jobs.root",
        "jobs.pattern",
        "jobs.dir",
        "jobs.format",
        "socket.path",
        "socket.group",
        "output.dir",
        "output.max_file_bytes",
        "output.max_file_seconds",
        "limits.ring_buffer_bytes",
        "limits.max_calls_in_memory",
        "limits.max_processes",
        "limits.max_concurrent_dumps",
        "limits.cpu_slots_per_process",
        "sampling.interval_ms",
        "sampling.max_samples",
        "agent.report",
    ];
    assert_eq!(keys, expected.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>());
    let optional = Config::parse(&uncommented, "uncommented").unwrap();
    assert_eq!(optional.output.dir.as_deref(), Some(Path::new("/var/lib/pftrace")));
    assert_eq!(optional.socket.group.as_deref(), Some("pftrace"));
    let root = Path::new("/sys/fs/cgroup/system.slice/slurmstepd.scope");
    assert_eq!(optional.jobs.root.as_deref(), Some(root));
    assert_eq!(optional.jobs.dir.as_deref(), Some(Path::new("/var/lib/pftrace/jobs")));
}

#[test]
fn systemd_unit_verifies() {
    let unit = packaging("systemd/pftraced.service");
    let exec = "ExecStart=/usr/local/bin/pftraced --config /etc/pftrace/pftraced.toml --serve";
    assert!(unit.lines().any(|l| l == exec), "unit lost its ExecStart line");
    if let Err(e) = Command::new("systemd-analyze").arg("--version").output() {
        panic!(
            "systemd-analyze cannot run ({e}): install Debian's systemd package (`cargo xtask setup` does)"
        );
    }
    // verify checks that ExecStart's binary exists: point it at the one just built.
    let dir = std::env::temp_dir().join(format!("pftrace-unit-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("pftraced.service");
    fs::write(&copy, unit.replace("/usr/local/bin/pftraced", env!("CARGO_BIN_EXE_pftraced"))).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&copy).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // verify exits 0 even for unknown keys and bad values: any output is a finding.
    assert!(out.status.success() && stdout.is_empty() && stderr.is_empty(), "{stdout}{stderr}");
    fs::remove_dir_all(&dir).unwrap();
}
