//! Which tests of the one test binary run at the same time. cargo's test
//! threads run tests of different files side by side; a test that attaches
//! an interpreter file host-wide, measures time or memory, or changes the
//! host takes [`serial`] and runs alone: no other test that made a
//! [`TestDir`](super::TestDir) or started a process through
//! [`Guard`](super::Guard) (each holds a [`Turn`]) runs while it does.
//!
//! Why alone, by what the others would do to it or it to them:
//! - the kernel keeps one semaphore offset per uprobe site: a dormant link
//!   (every mode but `--binary` and `--all`: no semaphore) and a
//!   kernel-managed one (`--binary`, `--all`, `PFTRACE_SEMAPHORES=kernel`)
//!   on the same interpreter file refuse each other (README, "Only traced
//!   processes pay");
//! - `--binary` and `--all` attach a file host-wide: every process running
//!   it pays the probe trap and counts in `out_of_scope`, and a semaphore
//!   raised host-wide is what faults.rs and service_overhead.rs check stays 0;
//!   (both are about the shared file: a test whose links are on an
//!   interpreter copy of its own, `private_python`, needs neither);
//! - CPU time, speed and memory figures (thread_cpu.rs, figures.rs,
//!   service_overhead.rs, daemon_limits.rs, racefree.rs): a neighbour on the
//!   2 vCPUs shifts them;
//! - ns_last_pid (lifecycle.rs), fs.protected_symlinks (output_files.rs) and
//!   a booted systemd container (systemd_service.rs) are the host's.
//!
//! A test alone still makes its directory and starts its processes (its
//! thread is the owner); a helper thread of such a test must not start one
//! through `Guard` (it would wait for the test to end). Turns go first: a
//! waiting [`serial`] test does not stop others from starting, it runs once
//! no turn is held (at the latest when the other threads' tests end). That
//! keeps the other test threads busy while serial tests wait, and a test
//! holding a turn can always get another (no two tests wait for each
//! other). The turn is taken where the test begins (its `TestDir`), not at
//! each process: a test waiting there has not started its timers (with a
//! turn per process, refusals.rs's "refused at once" timed a 20 s wait).

use std::{
    sync::{Condvar, Mutex, MutexGuard},
    thread::{self, ThreadId},
};

/// Who runs: the serial test's thread, or the holders of turns (one entry
/// per turn: the thread that took it).
struct State {
    alone: Option<ThreadId>,
    turns: Vec<ThreadId>,
}

static STATE: Mutex<State> = Mutex::new(State { alone: None, turns: Vec::new() });
static CHANGED: Condvar = Condvar::new();

fn state() -> MutexGuard<'static, State> {
    // A test that panicked holding the lock left the state consistent (each
    // change is one statement), so a poisoned lock is used as it is.
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

fn wait(s: MutexGuard<'static, State>) -> MutexGuard<'static, State> {
    CHANGED.wait(s).unwrap_or_else(|e| e.into_inner())
}

/// A test running alone, until dropped.
#[must_use = "the test runs alone only while this is held"]
pub struct Serial(());

/// Waits until no other test holds a turn, then runs the calling test alone
/// until the returned value is dropped: for tests that attach an
/// interpreter host-wide, measure timing, CPU or memory, or change the host
/// (see the module's comment). Call it first, before the test's `TestDir`.
pub fn serial() -> Serial {
    let me = thread::current().id();
    let mut s = state();
    assert_ne!(s.alone, Some(me), "serial() twice in one test");
    // Its own turns would never end while it waits for them.
    assert!(
        !s.turns.contains(&me),
        "serial() after the test made its TestDir or started a process: call it first"
    );
    while s.alone.is_some() || !s.turns.is_empty() {
        s = wait(s);
    }
    s.alone = Some(me);
    Serial(())
}

impl Drop for Serial {
    fn drop(&mut self) {
        state().alone = None;
        CHANGED.notify_all();
    }
}

/// A test's share of the host: held by each [`TestDir`](super::TestDir)
/// and [`Guard`](super::Guard) for its life.
pub struct Turn {
    holder: Option<ThreadId>,
}

/// Waits while a serial test runs, unless it is the caller.
pub fn turn() -> Turn {
    let me = thread::current().id();
    let mut s = state();
    if s.alone == Some(me) {
        return Turn { holder: None };
    }
    while s.alone.is_some() {
        s = wait(s);
    }
    s.turns.push(me);
    Turn { holder: Some(me) }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let Some(holder) = self.holder else { return };
        let mut s = state();
        if let Some(i) = s.turns.iter().position(|t| *t == holder) {
            s.turns.swap_remove(i);
        }
        drop(s);
        CHANGED.notify_all();
    }
}
