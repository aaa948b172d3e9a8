//! Debian's package tools for setup: `apt-get`, `dpkg-query`, and this machine's
//! own apt sources, which say where its Debian mirror is (no mirror host is
//! written in pftrace's code: the machine's configuration decides).

use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{Result, bail};

/// Where apt reads its sources: the one-line file, and the directory of
/// `*.list` (one-line) and `*.sources` (deb822) files.
const SOURCES_LIST: &str = "/etc/apt/sources.list";
const SOURCES_DIR: &str = "/etc/apt/sources.list.d";

/// `apt-get` with the options every non-interactive call here wants.
pub fn apt_get() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive").args(["-q", "-o", "DPkg::Lock::Timeout=300"]);
    cmd
}

/// Is a Debian package installed (`dpkg-query` says "install ok installed")?
pub fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|out| {
            out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "install ok installed"
        })
        .unwrap_or(false)
}

/// One apt source entry (a deb822 stanza or a one-line `deb ...` entry).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Source {
    /// `deb`, `deb-src`.
    pub types: Vec<String>,
    pub uris: Vec<String>,
    pub suites: Vec<String>,
    pub components: Vec<String>,
    /// The `Signed-By` field or `signed-by=` option, if any.
    pub signed_by: Option<String>,
    /// False for a deb822 stanza with `Enabled: no`.
    pub enabled: bool,
}

/// Parses a deb822 `.sources` file: stanzas separated by blank lines, `Key:
/// value` fields (keys case-insensitive), continuation lines starting with
/// white space, `#` comment lines anywhere.
pub fn parse_deb822(text: &str) -> Vec<Source> {
    let mut stanzas: Vec<Vec<(String, String)>> = vec![Vec::new()];
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        if line.trim().is_empty() {
            if !stanzas.last().is_some_and(Vec::is_empty) {
                stanzas.push(Vec::new());
            }
            continue;
        }
        let fields = stanzas.last_mut().expect("never empty");
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = fields.last_mut() {
                value.push('\n');
                value.push_str(line.trim());
            }
            continue;
        }
        if let Some((key, value)) = line.split_once(':') {
            fields.push((key.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
    }
    stanzas
        .into_iter()
        .filter(|fields| !fields.is_empty())
        .map(|fields| {
            let get = |key: &str| fields.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
            let words = |key: &str| get(key).map(|v| v.split_whitespace().map(String::from).collect());
            Source {
                types: words("types").unwrap_or_default(),
                uris: words("uris").unwrap_or_default(),
                suites: words("suites").unwrap_or_default(),
                components: words("components").unwrap_or_default(),
                signed_by: get("signed-by").map(str::to_string),
                enabled: !get("enabled").is_some_and(|v| v.eq_ignore_ascii_case("no")),
            }
        })
        .collect()
}

/// Parses one-line entries (`/etc/apt/sources.list`, `*.list`):
/// `deb [opt=value ...] URI SUITE [COMPONENT...]`, `#` starting a comment.
pub fn parse_one_line(text: &str) -> Vec<Source> {
    let mut found = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default().trim();
        let Some((kind, rest)) = line.split_once(char::is_whitespace) else { continue };
        if kind != "deb" && kind != "deb-src" {
            continue;
        }
        let mut rest = rest.trim_start();
        let mut signed_by = None;
        if let Some(after) = rest.strip_prefix('[') {
            let Some((options, after)) = after.split_once(']') else { continue };
            for option in options.split_whitespace() {
                if let Some((key, value)) = option.split_once('=')
                    && key.eq_ignore_ascii_case("signed-by")
                {
                    signed_by = Some(value.to_string());
                }
            }
            rest = after;
        }
        let mut words = rest.split_whitespace().map(String::from);
        let (Some(uri), Some(suite)) = (words.next(), words.next()) else { continue };
        found.push(Source {
            types: vec![kind.to_string()],
            uris: vec![uri],
            suites: vec![suite],
            components: words.collect(),
            signed_by,
            enabled: true,
        });
    }
    found
}

/// This machine's Debian release codename (`VERSION_CODENAME` in /etc/os-release).
fn codename() -> Option<String> {
    let text = fs::read_to_string("/etc/os-release").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim().trim_matches('"').to_string())
        .filter(|v| !v.is_empty())
}

/// Every entry in this machine's apt sources, as apt reads them (files with
/// other endings, e.g. `*.disabled`, are ignored, as apt ignores them).
fn machine_sources() -> Vec<Source> {
    let mut sources = fs::read_to_string(SOURCES_LIST).map(|t| parse_one_line(&t)).unwrap_or_default();
    let mut files: Vec<_> = fs::read_dir(SOURCES_DIR)
        .map(|dir| dir.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    for file in files {
        let Ok(text) = fs::read_to_string(&file) else { continue };
        match file.extension().and_then(|e| e.to_str()) {
            Some("sources") => sources.extend(parse_deb822(&text)),
            Some("list") => sources.extend(parse_one_line(&text)),
            _ => {}
        }
    }
    sources
}

/// The Debian mirror among `sources`: the URI of an enabled `deb` (or
/// `deb-src`) entry for the release `codename` (or its `-updates` suite; the
/// security archive is a different archive) with component `main`, signed
/// by Debian's archive keyring or by apt's default keyrings (an entry with
/// its own keyring is a third-party repository). `deb` entries win.
pub fn debian_mirror_in(sources: &[Source], codename: &str) -> Option<String> {
    let release_suite = |s: &String| s == codename || s.strip_prefix(codename) == Some("-updates");
    let candidates = sources.iter().filter(|s| {
        s.enabled
            && s.suites.iter().any(release_suite)
            && s.components.iter().any(|c| c == "main")
            && s.signed_by.as_deref().is_none_or(|k| k.contains("debian-archive"))
    });
    let uri_of = |s: &Source| {
        s.uris
            .iter()
            .find(|u| u.starts_with("http://") || u.starts_with("https://"))
            .map(|u| u.trim_end_matches('/').to_string())
    };
    let mut with_types = candidates.filter_map(|s| Some((s.types.iter().any(|t| t == "deb"), uri_of(s)?)));
    let first = with_types.next()?;
    if first.0 {
        return Some(first.1);
    }
    with_types.find(|(deb, _)| *deb).or(Some(first)).map(|(_, uri)| uri)
}

/// This machine's Debian mirror, from its own apt sources.
pub fn debian_mirror() -> Result<String> {
    let Some(codename) = codename() else {
        bail!("/etc/os-release has no VERSION_CODENAME: setup supports Debian and needs its release name");
    };
    match debian_mirror_in(&machine_sources(), &codename) {
        Some(uri) => Ok(uri),
        None => bail!(
            "no Debian mirror in this machine's apt sources ({SOURCES_LIST}, {SOURCES_DIR}/*.sources, *.list): \
             setup takes the mirror from an enabled `deb` entry for suite `{codename}` with component `main`; \
             add one (e.g. a deb822 stanza `Types: deb`, `URIs: <your Debian mirror>`, `Suites: {codename}`, \
             `Components: main`) and rerun"
        ),
    }
}

/// The Debian archive keyring that signs Debian's releases (package debian-archive-keyring).
pub const DEBIAN_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// Fails with what to install when Debian's archive keyring is missing.
pub fn require_debian_keyring() -> Result<&'static Path> {
    let keyring = Path::new(DEBIAN_KEYRING);
    if !keyring.is_file() {
        bail!("{DEBIAN_KEYRING} not found: install the debian-archive-keyring package");
    }
    Ok(keyring)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIRROR: &str = "http://mirror.example/debian";

    #[test]
    fn deb822_with_comments_signed_by_and_disabled_stanzas() {
        let text = format!(
            "Types: deb\n\
             # a comment inside the stanza\n\
             URIs: {MIRROR}/\n\
             Suites: bookworm bookworm-updates\n\
             Components: main contrib\n\
             Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\
             \n\
             \n\
             # a stanza switched off\n\
             Types: deb deb-src\n\
             uris: http://other.example/debian\n\
             suites: sid\n\
             components: main\n\
             Enabled: no\n"
        );
        let sources = parse_deb822(&text);
        assert_eq!(
            sources,
            vec![
                Source {
                    types: vec!["deb".into()],
                    uris: vec![format!("{MIRROR}/")],
                    suites: vec!["bookworm".into(), "bookworm-updates".into()],
                    components: vec!["main".into(), "contrib".into()],
                    signed_by: Some("/usr/share/keyrings/debian-archive-keyring.gpg".into()),
                    enabled: true,
                },
                Source {
                    types: vec!["deb".into(), "deb-src".into()],
                    uris: vec!["http://other.example/debian".into()],
                    suites: vec!["sid".into()],
                    components: vec!["main".into()],
                    signed_by: None,
                    enabled: false,
                },
            ]
        );
        assert_eq!(debian_mirror_in(&sources, "bookworm").as_deref(), Some(MIRROR));
        // The disabled stanza is never chosen.
        assert_eq!(debian_mirror_in(&sources, "sid"), None);
    }

    #[test]
    fn deb822_without_signed_by_and_with_continuation_lines() {
        let text = format!(
            "Types: deb\nURIs: {MIRROR}\nSuites:\n  bookworm\n  bookworm-updates\nComponents: main\n"
        );
        let sources = parse_deb822(&text);
        assert_eq!(sources.len(), 1);
        assert_eq!(sources[0].suites, ["bookworm", "bookworm-updates"]);
        assert_eq!(sources[0].signed_by, None);
        assert_eq!(debian_mirror_in(&sources, "bookworm").as_deref(), Some(MIRROR));
    }

    #[test]
    fn one_line_forms() {
        let text = format!(
            "# deb http://commented.example/debian bookworm main\n\
             deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {MIRROR} bookworm main # trailing\n\
             deb-src {MIRROR} bookworm main\n\
             deb [ trusted=yes ] http://plain.example/debian bookworm-updates main non-free\n\
             \n\
             deb broken-line-without-suite\n"
        );
        let sources = parse_one_line(&text);
        assert_eq!(
            sources,
            vec![
                Source {
                    types: vec!["deb".into()],
                    uris: vec![MIRROR.into()],
                    suites: vec!["bookworm".into()],
                    components: vec!["main".into()],
                    signed_by: Some("/usr/share/keyrings/debian-archive-keyring.gpg".into()),
                    enabled: true,
                },
                Source {
                    types: vec!["deb-src".into()],
                    uris: vec![MIRROR.into()],
                    suites: vec!["bookworm".into()],
                    components: vec!["main".into()],
                    signed_by: None,
                    enabled: true,
                },
                Source {
                    types: vec!["deb".into()],
                    uris: vec!["http://plain.example/debian".into()],
                    suites: vec!["bookworm-updates".into()],
                    components: vec!["main".into(), "non-free".into()],
                    signed_by: None,
                    enabled: true,
                },
            ]
        );
        assert_eq!(debian_mirror_in(&sources, "bookworm").as_deref(), Some(MIRROR));
    }

    #[test]
    fn security_third_party_and_deb_src_only_entries() {
        let security = parse_deb822(
            "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\n\
             Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
        );
        let third_party = parse_one_line(
            "deb [signed-by=/usr/share/keyrings/vendor.gpg] https://vendor.example/apt bookworm main\n",
        );
        let src_only = parse_one_line(&format!("deb-src {MIRROR} bookworm main\n"));
        let deb = parse_one_line("deb http://second.example/debian bookworm main\n");
        assert_eq!(debian_mirror_in(&security, "bookworm"), None);
        assert_eq!(debian_mirror_in(&third_party, "bookworm"), None);
        // A deb-src entry serves when nothing else does, but a deb entry wins.
        assert_eq!(debian_mirror_in(&src_only, "bookworm").as_deref(), Some(MIRROR));
        let all: Vec<Source> = [security, third_party, src_only, deb].concat();
        assert_eq!(debian_mirror_in(&all, "bookworm").as_deref(), Some("http://second.example/debian"));
    }

    #[test]
    fn this_machine_has_a_debian_mirror() {
        let mirror = debian_mirror().expect("this machine's apt sources name a Debian mirror");
        assert!(mirror.starts_with("http"), "{mirror}");
    }

    #[test]
    fn dpkg_query_of_unknown_package_is_not_installed() {
        assert!(!dpkg_installed("surely-no-such-package-here"));
    }
}
