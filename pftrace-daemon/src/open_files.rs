//! The daemon's limit on open files: in the default mode of a watched
//! cgroup it holds a `/proc/PID/mem` (`semaphores.rs`), a pidfd and, while
//! its code is resolved, a directory per traced process (80 processes alive:
//! 277 open, 80 + 80 + 74 of them those), so a service started under a low
//! soft limit missed the processes beyond it: under `ulimit -Sn 64`, 9 of 80
//! were traced, the others failed with EMFILE. At start the soft limit goes
//! up to the hard limit, which only root could raise further. A command
//! pftraced launches gets the limit pftraced was started with back
//! ([`for_children`]).

use std::sync::OnceLock;

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// The limit before [`raise`] changed it: (soft, hard), None for unlimited.
static ORIGINAL: OnceLock<(Option<u64>, Option<u64>)> = OnceLock::new();

/// Descriptors the daemon holds besides those of its traced processes:
/// eBPF maps, programs and links, sockets, epoll, output files (44 seen with
/// one interpreter file; twice that as margin).
pub const BASE: u64 = 88;

/// Descriptors per traced process at the most (see the module doc).
pub const PER_PROCESS: u64 = 3;

/// What [`raise`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Raised {
    pub before: Option<u64>,
    pub now: Option<u64>,
    pub hard: Option<u64>,
}

/// Raises the soft limit on open files to the hard limit (None: unlimited),
/// and says so; warns when the hard limit is below what `max_processes`
/// traced processes need.
pub fn raise(max_processes: usize) -> Raised {
    let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
    let _ = ORIGINAL.set((current, maximum));
    let now = match setrlimit(Resource::Nofile, Rlimit { current: maximum, maximum }) {
        Ok(()) => maximum,
        Err(err) => {
            log::warn!("cannot raise the open-file limit from {current:?} to {maximum:?}: {err}");
            current
        }
    };
    if now != current {
        log::debug!("open-file limit raised from {current:?} to {now:?}");
    }
    let needed = BASE + PER_PROCESS * max_processes as u64;
    if let Some(limit) = now
        && limit < needed
    {
        log::warn!(
            "the open-file limit is {limit} (hard limit {maximum:?}), below the {needed} that \
             limits.max_processes = {max_processes} traced processes need in a watched cgroup's default \
             mode ({PER_PROCESS} each, plus {BASE}); raise the hard limit (LimitNOFILE= in the \
             service unit, or ulimit -Hn) or lower limits.max_processes"
        );
    }
    Raised { before: current, now, hard: maximum }
}

/// The limit to give back to a command pftraced starts, if [`raise`] changed it.
pub fn for_children() -> Option<libc::rlimit> {
    let &(soft, hard) = ORIGINAL.get()?;
    let now = getrlimit(Resource::Nofile);
    (now.current != soft).then(|| libc::rlimit {
        rlim_cur: soft.unwrap_or(libc::RLIM_INFINITY),
        rlim_max: hard.unwrap_or(libc::RLIM_INFINITY),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Raised to the hard limit, and the original soft limit kept for children.
    #[test]
    fn soft_limit_goes_to_the_hard_limit() {
        let hard = getrlimit(Resource::Nofile).maximum;
        setrlimit(Resource::Nofile, Rlimit { current: Some(64), maximum: hard }).unwrap();
        let raised = raise(100_000);
        assert_eq!(raised, Raised { before: Some(64), now: hard, hard });
        assert_eq!(getrlimit(Resource::Nofile).current, hard);
        let child = for_children().expect("a limit for children");
        assert_eq!(child.rlim_cur, 64);
    }
}
