//! Installing the agent's files where traced processes can read them and
//! nothing of pftrace is writable by the traced user: a directory owned by
//! root (0755) holding `pftrace_agent.so`, `pftrace_loader.py`,
//! `sitecustomize.py` (launch mode) and `pftrace_attach.py` (PEP 768), each
//! root-owned and 0444. Each file is
//! written to a fresh temporary name (O_EXCL, O_NOFOLLOW) and renamed into
//! place, so a file someone else planted is replaced, never written through.

use std::{
    fs::{self, OpenOptions},
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

pub const AGENT_SO: &str = "pftrace_agent.so";
pub const SITECUSTOMIZE: &str = "sitecustomize.py";
pub const ATTACH_SCRIPT: &str = "pftrace_attach.py";
pub const LOADER: &str = "pftrace_loader.py";

const SITECUSTOMIZE_TEXT: &str = include_str!("../../../pftrace-agent/python/sitecustomize.py");
const ATTACH_TEXT: &str = include_str!("../../../pftrace-agent/python/pftrace_attach.py");
const LOADER_TEXT: &str = include_str!("../../../pftrace-agent/python/pftrace_loader.py");

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is owned by uid {uid} or writable by others: the agent directory must be root's alone")]
    Unsafe { path: PathBuf, uid: u32 },
    #[error("{path}: not a valid path for the agent ({why})")]
    BadPath { path: PathBuf, why: &'static str },
}

/// Where an installed agent is.
#[derive(Debug, Clone)]
pub struct Installed {
    pub dir: PathBuf,
    pub socket: PathBuf,
}

impl Installed {
    pub fn agent_so(&self) -> PathBuf {
        self.dir.join(AGENT_SO)
    }
    pub fn attach_script(&self) -> PathBuf {
        self.dir.join(ATTACH_SCRIPT)
    }
}

/// Installs the agent built at `agent_so` into `dir` (created if missing),
/// for the control socket at `socket`.
pub fn install(agent_so: &Path, dir: &Path, socket: &Path) -> Result<Installed, InstallError> {
    let so = fs::read(agent_so).map_err(|source| InstallError::Io { path: agent_so.into(), source })?;
    install_bytes(&so, dir, socket)
}

/// Installs the agent whose shared object is `so` (pftraced: the one it
/// embeds, [`super::AGENT_SO`]) into `dir`, for the control socket at `socket`.
pub fn install_bytes(so: &[u8], dir: &Path, socket: &Path) -> Result<Installed, InstallError> {
    for p in [dir, socket] {
        let s = p.to_str().ok_or(InstallError::BadPath { path: p.into(), why: "not UTF-8" })?;
        if !p.is_absolute() || s.contains(['\n', '\0', '"', '\'', '\\']) {
            return Err(InstallError::BadPath {
                path: p.into(),
                why: "must be absolute, without quotes or newlines",
            });
        }
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| InstallError::Io { path, source }
    };
    match fs::symlink_metadata(dir) {
        Ok(_) => {}
        Err(_) => {
            fs::DirBuilder::new().mode(0o755).create(dir).map_err(io(dir))?;
        }
    }
    let meta = fs::symlink_metadata(dir).map_err(io(dir))?;
    let me = unsafe { libc::geteuid() };
    if !meta.is_dir() || meta.uid() != me || meta.mode() & 0o022 != 0 {
        return Err(InstallError::Unsafe { path: dir.into(), uid: meta.uid() });
    }
    write_file(dir, AGENT_SO, so)?;
    write_file(dir, LOADER, LOADER_TEXT.as_bytes())?;
    write_file(dir, SITECUSTOMIZE, SITECUSTOMIZE_TEXT.as_bytes())?;
    let attach = ATTACH_TEXT
        .replace("@AGENT_DIR@", &format!("{:?}", dir.to_str().unwrap_or_default()))
        .replace("@SOCKET@", &format!("{:?}", socket.to_str().unwrap_or_default()));
    write_file(dir, ATTACH_SCRIPT, attach.as_bytes())?;
    Ok(Installed { dir: dir.into(), socket: socket.into() })
}

fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), InstallError> {
    let dest = dir.join(name);
    let tmp = dir.join(format!(".{name}.{}", std::process::id()));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| InstallError::Io { path, source }
    };
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.set_permissions(fs::Permissions::from_mode(0o444)).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, &dest).map_err(io(&dest))
}

/// The environment a launched command gets so its Pythons load the agent:
/// the directory first on PYTHONPATH (before what the user had) and the socket.
pub fn launch_env(installed: &Installed, current_pythonpath: Option<&str>) -> Vec<(String, String)> {
    let dir = installed.dir.to_string_lossy().into_owned();
    let path = match current_pythonpath {
        Some(p) if !p.is_empty() => format!("{dir}:{p}"),
        _ => dir,
    };
    vec![
        ("PYTHONPATH".into(), path),
        ("PFTRACE_AGENT_SOCKET".into(), installed.socket.to_string_lossy().into_owned()),
    ]
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};

    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("pftrace-install-{tag}.{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir(&p).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[test]
    fn files_are_read_only_and_planted_links_are_replaced() {
        let base = tmp("ro");
        let so = base.join("lib.so");
        fs::write(&so, b"\x7fELF not really").unwrap();
        let dir = base.join("agent");
        // A symlink planted where a file goes is replaced, never written through.
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let victim = base.join("victim");
        fs::write(&victim, b"keep").unwrap();
        std::os::unix::fs::symlink(&victim, dir.join(SITECUSTOMIZE)).unwrap();
        let inst = install(&so, &dir, &base.join("s.sock")).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"keep");
        let me = unsafe { libc::geteuid() };
        for name in [AGENT_SO, LOADER, SITECUSTOMIZE, ATTACH_SCRIPT] {
            let m = fs::symlink_metadata(inst.dir.join(name)).unwrap();
            assert!(m.file_type().is_file(), "{name}");
            assert_eq!((m.uid(), m.mode() & 0o777), (me, 0o444), "{name}");
        }
        let attach = fs::read_to_string(inst.attach_script()).unwrap();
        assert!(
            attach.contains(&format!("{:?}", dir.to_str().unwrap())) && !attach.contains('@'),
            "{attach}"
        );
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn refuses_directories_others_can_write() {
        let base = tmp("unsafe");
        let so = base.join("lib.so");
        fs::write(&so, b"x").unwrap();
        let dir = base.join("agent");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        let err = install(&so, &dir, &base.join("s.sock")).unwrap_err();
        assert!(matches!(err, InstallError::Unsafe { .. }), "{err}");
        assert!(matches!(install(&so, Path::new("rel"), &base.join("s")), Err(InstallError::BadPath { .. })));
        assert!(matches!(install(&so, &dir, Path::new("/tmp/a\"b")), Err(InstallError::BadPath { .. })));
        fs::remove_dir_all(&base).unwrap();
    }
}
