//! Launching a command so that probes are in place before its first line of
//! Python runs: the child asks to be traced (PTRACE_TRACEME) and so stops
//! right after execve, with the interpreter mapped but nothing executed; the
//! caller attaches, then [`Launched::resume`] detaches and lets it run.
//! Spawn and resume must happen on the same thread (ptrace's tracer is a thread).

use std::{
    ffi::OsString,
    io,
    os::unix::process::{CommandExt as _, ExitStatusExt as _},
    process::{Child, Command, ExitStatus},
};

/// Errors launching the command.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("no command given after `--`")]
    Empty,
    #[error("cannot start {program:?}: {source}")]
    Spawn { program: OsString, source: io::Error },
    #[error("{program:?} did not stop after exec (status {status:#x}); cannot attach before it runs")]
    NoExecStop { program: OsString, status: i32 },
    #[error("waiting for {program:?}: {source}")]
    Wait { program: OsString, source: io::Error },
    #[error("resuming pid {pid}: {source}")]
    Resume { pid: u32, source: io::Error },
}

/// A child stopped just after exec, or running after [`Launched::resume`].
pub struct Launched {
    child: Child,
    stopped: bool,
}

impl Launched {
    /// Starts `argv` and waits until it has exec'd and stopped.
    /// `env`: variables set for it (the agent's, when enabled).
    pub fn spawn_stopped(argv: &[OsString], env: &[(String, String)]) -> Result<Self, LaunchError> {
        let (program, args) = argv.split_first().ok_or(LaunchError::Empty)?;
        let mut cmd = Command::new(program);
        cmd.args(args);
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        // SAFETY: setrlimit and ptrace(PTRACE_TRACEME) are async-signal-safe
        // and touch no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                crate::fdtable::restore_for_child()?;
                if libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| LaunchError::Spawn { program: program.clone(), source })?;
        let pid = child.id() as libc::pid_t;
        let mut status = 0;
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
        if r < 0 {
            return Err(LaunchError::Wait { program: program.clone(), source: io::Error::last_os_error() });
        }
        if !(libc::WIFSTOPPED(status) && libc::WSTOPSIG(status) == libc::SIGTRAP) {
            return Err(LaunchError::NoExecStop { program: program.clone(), status });
        }
        Ok(Self { child, stopped: true })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Detaches from the stopped child; it starts running its program.
    pub fn resume(&mut self) -> Result<(), LaunchError> {
        if self.stopped {
            // SAFETY: the child is our tracee, stopped.
            if unsafe { libc::ptrace(libc::PTRACE_DETACH, self.child.id() as libc::pid_t, 0, 0) } < 0 {
                return Err(LaunchError::Resume { pid: self.pid(), source: io::Error::last_os_error() });
            }
            self.stopped = false;
        }
        Ok(())
    }

    /// Kills the child (used when it cannot be traced) and reaps it.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        if self.stopped {
            // A stopped tracee must be let go for the kill to complete.
            // SAFETY: as in resume.
            unsafe { libc::ptrace(libc::PTRACE_DETACH, self.child.id() as libc::pid_t, 0, 0) };
        }
        let _ = self.child.wait();
    }

    /// Sends a signal to the child.
    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: sending a signal to our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
    }

    /// Reaps the child if it has exited.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// Waits for the child to exit.
    pub fn wait(&mut self) -> io::Result<ExitStatus> {
        self.child.wait()
    }
}

/// The shell-style exit code for a child's status: its code, or 128 + signal.
pub fn exit_code(status: ExitStatus) -> i32 {
    status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}
