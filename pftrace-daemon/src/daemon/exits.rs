//! A traced process's exit on the batched agent road. The kernel writes a
//! process's exit record at the exit of the thread that finds its group's
//! `signal->live` at 0; another thread may have counted itself out of
//! `live` and not yet run its own exit drain, and the drain of that last
//! thread is a program of its own on the same tracepoint, so drains may
//! come after the record on the ring (os._exit or a SIGKILL: each thread
//! runs do_exit in its own time; seen, when the record still came at the
//! main thread's exit, in the test
//! `open_calls_at_exit_kill_and_stop_as_the_two_report_road_has_them`: five
//! calls drained after the exit record were named unknown, their parent
//! already closed). So the exit is settled (open calls closed as
//! incomplete at its time, strings forgotten, probes retired) only once no
//! thread of the process can still drain: every thread in /proc a zombie
//! or gone, at most [`SETTLE_BOUND`] after the record, or at once when the
//! pid appears anew (its exec or fork record: everything of the old
//! process is before it on the ring, since a pid is reused only once all
//! of its threads have exited) or pftraced stops.

use std::time::{Duration, Instant};

use super::Daemon;
use crate::pairing::Call;

/// How long an exit waits for the process's last threads, at most (a
/// thread in uninterruptible sleep may take long to die; its events then
/// come after the exit and are paired as late ones).
pub const SETTLE_BOUND: Duration = Duration::from_secs(1);

/// An exit seen on the ring, not yet settled.
#[derive(Debug)]
pub struct Exiting {
    pub pid: u32,
    pub ts_ns: u64,
    pub seen: Instant,
}

impl Daemon {
    /// Settles the exits whose threads have all passed their exit (or
    /// every one with `all`, or those of `pid`): their open calls go to
    /// `completed`, the processes to `exited` (then ended as on the two-report road).
    pub(super) fn settle_exits(
        &mut self,
        all: bool,
        pid: Option<u32>,
        completed: &mut Vec<Call>,
        exited: &mut Vec<(u32, u64)>,
    ) {
        if self.exiting.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut self.exiting);
        for e in pending {
            let now = all || pid == Some(e.pid) || e.seen.elapsed() >= SETTLE_BOUND || !threads_alive(e.pid);
            if !now {
                self.exiting.push(e);
                continue;
            }
            self.pairer.close_open(Some(e.pid), e.ts_ns, completed);
            self.decoder.forget_process(e.pid);
            exited.push((e.pid, e.ts_ns));
        }
    }
}

/// Whether process `pid` has a thread not yet a zombie (one that may still
/// run its exit, and drain its buffer there).
fn threads_alive(pid: u32) -> bool {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return false };
    dir.filter_map(Result::ok).any(|t| {
        std::fs::read_to_string(t.path().join("stat")).is_ok_and(|stat| {
            // The state follows the command's closing parenthesis.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next())
                .is_some_and(|c| c != 'Z' && c != 'X')
        })
    })
}
