//! The event loop: draining the ring buffer (on its wakeups and on a short
//! tick), exits of traced processes, attachments and detaches finishing,
//! control requests; until stopped or, with only pids and commands, until
//! they have all exited.

use std::{
    future::Future,
    pin::pin,
    time::{Duration, Instant},
};

use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::mpsc,
};

use super::{Daemon, DaemonError};
use crate::{
    clock::WallClock,
    control::server::{ControlRequest, ControlServer},
    trace::Trace,
};

/// How often the ring buffer is drained without a wakeup (the kernel wakes
/// the daemon only when the ring is a quarter full), and samples taken.
const TICK: Duration = Duration::from_millis(10);

impl Daemon {
    /// Runs until `stop` completes, a `stop` request arrives, or (when only
    /// pids and commands are traced) every target has exited. Then drains,
    /// closes open calls as incomplete, finishes outputs, detaches, and
    /// returns the trace of the calls in memory.
    pub async fn run(mut self, stop: impl Future<Output = ()>) -> Result<Trace, DaemonError> {
        let ring = self.probes.take_ring()?;
        // SAFETY: the ring buffer owns its fd and keeps it open while registered.
        let mut ring = unsafe { AsyncFd::register(ring) }.map_err(|e| DaemonError::Ring(e.into()))?;
        // What the kernel side says in words (rare events), into our log.
        let logger = self.probes.take_logger()?;
        // SAFETY: the logger owns its ring's fd and keeps it open while registered.
        let mut kernel_log = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
            .map_err(|e| DaemonError::Ring(e.into()))?;
        let (ctl_tx, mut ctl_rx) = mpsc::channel::<ControlRequest>(64);
        let server = match &self.serve {
            Some(cfg) => {
                let server = ControlServer::bind(cfg).map_err(|e| DaemonError::Control(e.to_string()))?;
                Some(server.spawn(ctl_tx))
            }
            None => {
                drop(ctl_tx);
                None
            }
        };
        let mut agents = self.agent.as_mut().and_then(|a| a.take_incoming());
        for conn in std::mem::take(&mut self.early_agents) {
            let _ = self.agent_connected(conn);
        }
        crate::logging::notify_ready();
        let mut stop = pin!(stop);
        let mut tick = tokio::time::interval(TICK);
        let mut last_flush = Instant::now();
        while !self.stopping {
            // The ring's exit record comes early in the kernel's exit path;
            // the pidfd (watched) fires once the process can be reaped, which
            // a launched command's status needs.
            if self.until_targets_exit
                && self.processes.running_count() == 0
                && self.scheduler.is_idle()
                && self.watched == 0
            {
                break;
            }
            tokio::select! {
                biased;
                _ = &mut stop => break,
                Some((pid, serial)) = self.exits.1.recv() => {
                    self.watched = self.watched.saturating_sub(1);
                    self.drain(ring.get_mut());
                    if self.processes.serial(pid) == Some(serial) {
                        self.end_process(pid, WallClock::monotonic_now_ns());
                    }
                }
                Some(done) = self.scheduler.finished.1.recv() => self.finished(done),
                Some(event) = self.cgroup_events.recv() => {
                    // Calls of a job's processes are in before the job ends.
                    self.drain(ring.get_mut());
                    self.cgroup_event(event);
                }
                Some(()) = self.scheduler.detached.1.recv() => self.scheduler.detach_done(),
                guard = kernel_log.readable_mut() => {
                    let mut guard = guard.map_err(DaemonError::Ring)?;
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
                guard = ring.readable_mut() => {
                    let mut guard = guard.map_err(DaemonError::Ring)?;
                    self.drain(guard.get_inner_mut());
                    guard.clear_ready();
                }
                Some(conn) = async {
                    match agents.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    let _ = self.agent_connected(conn);
                }
                Some(req) = ctl_rx.recv() => {
                    self.drain(ring.get_mut());
                    let reply = self.handle(req.command);
                    let _ = req.reply.send(reply);
                }
                _ = tick.tick() => {
                    self.drain(ring.get_mut());
                    self.sampler.maybe_sample(self.processes.running_pids());
                    if last_flush.elapsed() >= Duration::from_secs(1) {
                        if let Some(r) = &mut self.rolling {
                            r.flush();
                        }
                        if let Some(s) = &mut self.spill {
                            s.flush();
                        }
                        last_flush = Instant::now();
                    }
                }
            }
        }
        if let Some(server) = server {
            server.abort();
            if self.stopping {
                // The `stop` reply is written by its connection task: let it
                // run before the runtime (and every task in it) is dropped,
                // or pftracectl sees the connection close without a reply.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        self.drain(ring.get_mut());
        // The batched agent road: agents stopped and their threads' buffers
        // on the ring (or read by pftraced) before open calls are closed.
        self.batch_stop(ring.get_mut()).await;
        kernel_log.get_mut().flush();
        Ok(self.finish())
    }
}
