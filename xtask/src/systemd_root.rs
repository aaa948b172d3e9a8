//! The `systemd root` step of setup: a Debian bookworm root with systemd, made
//! once with debootstrap into /var/cache/pftrace/bookworm-systemd.
//!
//! The tests that run pftraced as a systemd service boot it with
//! `systemd-nspawn -b` (systemd is not PID 1 on these machines; it is in the
//! container), always on a throwaway overlay, so the cached tree is never
//! changed (tests/it/systemd_support in pftrace-daemon). Bookworm's systemd 252
//! is what the issue that asked for these tests was tried on.
//!
//! The tree is made beside ROOT, checked, marked, then renamed into place, all
//! under a lock, so a second setup (another worktree) waits and then reuses
//! it. Measured here (2026-11-26, 2 shared cores): debootstrap 2 min 1 s, a
//! tree of about 200 MB; the check of a cached tree takes milliseconds.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::apt;
use crate::util::{self, Step, which_on_path};

/// Where the tree lives.
pub const ROOT: &str = "/var/cache/pftrace/bookworm-systemd";
/// The Debian release bootstrapped (its systemd is 252).
const SUITE: &str = "bookworm";
/// Packages beyond debootstrap's minbase: systemd as PID 1, and the D-Bus
/// system bus that `systemctl` and `systemd-run` talk through.
const INCLUDE: &str = "systemd,systemd-sysv,dbus";
/// Written last, after the checks: a tree without it is never used.
const MARKER: &str = ".pftrace-ok";
/// Executables the tests run inside the container.
const REQUIRED: [&str; 6] = [
    "usr/lib/systemd/systemd",
    "usr/bin/systemctl",
    "usr/bin/journalctl",
    "usr/bin/systemd-run",
    "usr/bin/dbus-daemon",
    "usr/bin/install",
];

/// Returns the root to boot: `$PFTRACE_SYSTEMD_ROOT` if set (checked, never
/// made), else ROOT, made if missing or broken.
pub fn ensure() -> Result<PathBuf> {
    let step = Step::new("setup", "systemd root");
    if let Some(root) = std::env::var_os("PFTRACE_SYSTEMD_ROOT").filter(|p| !p.is_empty()) {
        let root = PathBuf::from(root);
        let summary = verify(&root).with_context(|| {
            format!(
                "PFTRACE_SYSTEMD_ROOT={} is not a usable root (made by `cargo xtask setup`): unset it to let \
                 setup make {ROOT}",
                root.display()
            )
        })?;
        step.say(format!("ok (PFTRACE_SYSTEMD_ROOT={}: {summary})", root.display()));
        return Ok(root);
    }
    let root = Path::new(ROOT);
    if root.exists() {
        match verify(root) {
            Ok(summary) => {
                step.say(format!("ok (present: {ROOT}: {summary})"));
                return Ok(root.to_path_buf());
            }
            Err(err) => step.say(format!("{ROOT} is broken ({err:#}); making it again")),
        }
    }
    if !util::is_root() {
        bail!(
            "no usable Debian {SUITE} root with systemd at {ROOT}: making it needs root (debootstrap, \
             writing /var/cache/pftrace); run `cargo xtask setup` as root"
        );
    }
    if which_on_path("debootstrap").is_none() {
        bail!("`debootstrap` not found: the `apt packages` step installs it (`apt-get install debootstrap`)");
    }
    let parent = root.parent().expect("ROOT has a parent");
    fs::create_dir_all(parent).with_context(|| format!("could not create {}", parent.display()))?;
    // Another setup (another worktree) may be making it right now: one at a time.
    let _lock = util::lock(&parent.join("bookworm-systemd.lock"))?;
    if let Ok(summary) = verify(root) {
        step.say(format!("ok (made meanwhile by another setup: {ROOT}: {summary})"));
        return Ok(root.to_path_buf());
    }
    step.say(format!("making {ROOT} with debootstrap (Debian {SUITE}, {INCLUDE}; a minute or two, once)"));
    let summary = make(&step, root)?;
    step.done(format!("made {ROOT}: {summary}"));
    Ok(root.to_path_buf())
}

/// Checks a tree: marker, the executables the tests run, the release, no
/// mount left inside, and (as root) systemd running in it via chroot.
/// Returns e.g. "systemd 252 (252.39-1~deb12u2)".
fn verify(root: &Path) -> Result<String> {
    util::require_file(&root.join(MARKER), "the marker setup writes once the tree is checked")?;
    verify_tree(root)
}

/// [`verify`] without the marker (the tree being made has none yet).
fn verify_tree(root: &Path) -> Result<String> {
    use std::os::unix::fs::PermissionsExt as _;
    for rel in REQUIRED {
        let path = root.join(rel);
        let executable = path.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
        if !executable {
            bail!("{} is missing or not executable", path.display());
        }
    }
    let os_release = root.join("etc/os-release");
    let text = fs::read_to_string(&os_release)
        .or_else(|_| fs::read_to_string(root.join("usr/lib/os-release")))
        .with_context(|| format!("could not read {}", os_release.display()))?;
    if !text.lines().any(|l| l.trim() == format!("VERSION_CODENAME={SUITE}")) {
        bail!("{} does not say VERSION_CODENAME={SUITE}", os_release.display());
    }
    let mounts = mounts_under(root)?;
    if !mounts.is_empty() {
        bail!("file systems are mounted inside it: {}", display_paths(&mounts));
    }
    if !util::is_root() {
        return Ok(format!("Debian {SUITE}"));
    }
    let out = util::output(Command::new("chroot").arg(root).args(["/usr/lib/systemd/systemd", "--version"]))
        .context("systemd does not run in it (chroot ROOT /usr/lib/systemd/systemd --version)")?;
    let first = out.lines().next().unwrap_or_default().trim();
    if !first.starts_with("systemd ") {
        bail!("`systemd --version` in it printed {first:?}");
    }
    Ok(first.to_string())
}

/// Bootstraps, tidies and checks the tree beside `root`, then renames it into place.
fn make(step: &Step, root: &Path) -> Result<String> {
    let keyring = apt::require_debian_keyring()?;
    let mirror = apt::debian_mirror()?;
    let parent = root.parent().expect("ROOT has a parent");
    // Leftovers of an interrupted run (we hold the lock): never reused. An
    // interrupted debootstrap can leave /proc or /sys mounted inside its
    // tree: those are unmounted first, and nothing is deleted while any remain.
    for leftover in fs::read_dir(parent)?.filter_map(|e| e.ok()).map(|e| e.path()) {
        let name = leftover.file_name().unwrap_or_default().to_string_lossy().into_owned();
        if name.starts_with("bookworm-systemd.build-") || name.starts_with("bookworm-systemd.old-") {
            remove_tree(&leftover)?;
        }
    }
    let work = parent.join(format!("bookworm-systemd.build-{}", std::process::id()));
    let tree = work.join("tree");
    fs::create_dir_all(&work).with_context(|| format!("could not create {}", work.display()))?;
    let log = work.join("debootstrap.log");
    let mut debootstrap = Command::new("debootstrap");
    debootstrap
        .arg("--variant=minbase")
        .arg(format!("--include={INCLUDE}"))
        .arg(format!("--keyring={}", keyring.display()))
        .arg(SUITE)
        .arg(&tree)
        .arg(&mirror);
    util::run_logged(&mut debootstrap, &log)
        .context("debootstrap failed (the mirror comes from this machine's apt sources)")?;
    let summary = verify_tree(&tree).context("the bootstrapped tree failed its check")?;
    // The downloaded .debs are not needed to boot (about 39 MB).
    let archives = tree.join("var/cache/apt/archives");
    for deb in fs::read_dir(&archives).into_iter().flatten().filter_map(|e| e.ok()).map(|e| e.path()) {
        if deb.extension().is_some_and(|e| e == "deb") {
            fs::remove_file(&deb).with_context(|| format!("could not remove {}", deb.display()))?;
        }
    }
    fs::write(
        tree.join(MARKER),
        format!("made by pftrace's `cargo xtask setup`: debootstrap --variant=minbase --include={INCLUDE} {SUITE}\n{summary}\n"),
    )
    .context("could not write the marker file")?;

    // Into place: a broken old tree goes aside first (rename is atomic).
    let old = parent.join(format!("bookworm-systemd.old-{}", std::process::id()));
    if root.exists() {
        fs::rename(root, &old)
            .with_context(|| format!("could not move the broken {} aside", root.display()))?;
    }
    fs::rename(&tree, root)
        .with_context(|| format!("could not move {} to {}", tree.display(), root.display()))?;
    let summary = verify(root).context("the tree failed its check once in place");
    for dir in [&work, &old] {
        if dir.exists()
            && let Err(err) = remove_tree(dir)
        {
            step.say(format!("note: could not remove {}: {err:#}", dir.display()));
        }
    }
    summary
}

/// Removes a directory tree after unmounting whatever is mounted inside it
/// (deepest first); refuses when a mount stays.
fn remove_tree(dir: &Path) -> Result<()> {
    let mut mounts = mounts_under(dir)?;
    mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    for mount in &mounts {
        util::output(Command::new("umount").arg("--lazy").arg(mount)).with_context(|| {
            format!("could not unmount {} (left by an interrupted debootstrap)", mount.display())
        })?;
    }
    let left = mounts_under(dir)?;
    if !left.is_empty() {
        bail!("not removing {}: still mounted inside it: {}", dir.display(), display_paths(&left));
    }
    fs::remove_dir_all(dir).with_context(|| format!("could not remove {}", dir.display()))
}

/// Mount points at or under `dir` (from /proc/self/mountinfo).
fn mounts_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let text = fs::read_to_string("/proc/self/mountinfo").context("could not read /proc/self/mountinfo")?;
    Ok(mount_points(&text).into_iter().filter(|m| m.starts_with(dir)).collect())
}

/// The mount point (5th field, octal escapes decoded) of each mountinfo line.
fn mount_points(mountinfo: &str) -> Vec<PathBuf> {
    use std::os::unix::ffi::OsStringExt as _;
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| {
            let bytes = field.as_bytes();
            let mut out = Vec::with_capacity(bytes.len());
            let mut i = 0;
            while i < bytes.len() {
                let octal = bytes
                    .get(i + 1..i + 4)
                    .and_then(|d| std::str::from_utf8(d).ok().and_then(|d| u8::from_str_radix(d, 8).ok()));
                match (bytes[i], octal) {
                    (b'\\', Some(byte)) => {
                        out.push(byte);
                        i += 4;
                    }
                    (byte, _) => {
                        out.push(byte);
                        i += 1;
                    }
                }
            }
            PathBuf::from(std::ffi::OsString::from_vec(out))
        })
        .collect()
}

fn display_paths(paths: &[PathBuf]) -> String {
    paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_points_are_decoded() {
        let text = "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
                    85 22 0:5 / /var/cache/pftrace/bookworm-systemd.build-7/tree/proc rw - proc proc rw\n\
                    86 22 0:6 / /tmp/with\\040space rw - tmpfs tmpfs rw\n";
        assert_eq!(
            mount_points(text),
            [
                PathBuf::from("/"),
                PathBuf::from("/var/cache/pftrace/bookworm-systemd.build-7/tree/proc"),
                PathBuf::from("/tmp/with space"),
            ]
        );
    }

    #[test]
    fn nothing_is_mounted_under_a_fresh_directory_and_a_plain_tree_is_not_a_root() {
        let dir = std::env::temp_dir().join(format!("xtask-systemd-root-{}", std::process::id()));
        fs::create_dir_all(dir.join("etc")).unwrap();
        assert_eq!(mounts_under(&dir).unwrap(), Vec::<PathBuf>::new());
        let err = verify(&dir).unwrap_err();
        assert!(format!("{err:#}").contains(MARKER), "{err:#}");
        fs::write(dir.join(MARKER), "").unwrap();
        let err = verify(&dir).unwrap_err();
        assert!(format!("{err:#}").contains("usr/lib/systemd/systemd"), "{err:#}");
        remove_tree(&dir).unwrap();
        assert!(!dir.exists());
        // The root mount is under "/": refused, never deleted.
        assert!(mounts_under(Path::new("/")).unwrap().contains(&PathBuf::from("/")));
    }
}
