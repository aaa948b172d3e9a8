//! Reading the ring buffer: calls (filtered in user space where the kernel
//! could not decide, then paired), and process changes (exec, fork, exit),
//! which are handled after the calls before them are stored, in ring order.

use pftrace_common::{KIND_OFFSET, kind};

use super::Daemon;
use crate::{
    bpf::ringbuf::EventRing,
    clock::WallClock,
    events::{EventKind, Record},
    pairing::Call,
};

/// Completed calls stored as they reach this many within one drain, not at
/// its end: a drain reads up to a quarter of the ring (4 MiB, thousands of
/// calls of 128 bytes), and a `completed` that large is written by the
/// pairer and read back by the spill and the store from outside the cache.
const STORE_CHUNK: usize = 256;

/// A process change read from the ring buffer.
enum ProcChange {
    /// A process exec'd in scope or was forked by a traced one.
    Appeared(u32),
    /// A tracked process exited at this time.
    Exited(u32, u64),
}

impl Daemon {
    /// Reads every record in the ring buffer.
    pub(super) fn drain(&mut self, ring: &mut EventRing) {
        let mut completed = std::mem::take(&mut self.completed);
        // Process changes, handled after the calls are stored, in ring order.
        let mut changes = Vec::new();
        while let Some(item) = ring.next_record() {
            if let Some(r) = crate::events::Decoder::known_return(&item) {
                // Half of a dense trace's records (see KnownReturn).
                self.take_known_return(&r, &mut completed);
            } else if item.get(KIND_OFFSET) == Some(&kind::ENTRY) {
                // The other half: an entry, decoded as decode_record decodes
                // it, but not copied into a Record: that copy read the Event
                // back just after decode stored it field by field (a
                // store-buffer stall: 52% of decode_record's samples, 2.8%
                // of the dense loop's).
                match self.decoder.decode(&item) {
                    Ok(ev) => self.take_call(ev, &mut completed),
                    Err(err) => self.bad_record(err),
                }
            } else {
                match self.decoder.decode_record(&item) {
                    Ok(Record::Call(ev)) => self.take_call(ev, &mut completed),
                    Ok(Record::Batch(events)) => {
                        for ev in events {
                            self.take_call(ev, &mut completed);
                        }
                    }
                    Ok(Record::Exec(e)) => {
                        self.settle_now(e.pid, &mut completed, &mut changes);
                        let late_us = WallClock::monotonic_now_ns().saturating_sub(e.ts_ns) / 1000;
                        log::debug!("pid {} exec'd at {} ns ({late_us} us ago)", e.pid, e.ts_ns);
                        // Calls of the old image end here, before any of the new one.
                        self.pairer.close_open(Some(e.pid), e.ts_ns, &mut completed);
                        self.dormant.exec(e.pid, e.ts_ns);
                        if e.thread != e.pid && self.processes.has_own_links(e.pid) {
                            // A thread other than the main one exec'd: its
                            // pid-scoped link is bound to the old main thread's
                            // task, whose memory is gone, so the new image is
                            // never probed (0 of 10 calls seen): attach anew.
                            log::info!(
                                "pid {}: thread {} exec'd (not the main thread): its probes are made again",
                                e.pid,
                                e.thread
                            );
                            changes.push(ProcChange::Exited(e.pid, e.ts_ns));
                        }
                        changes.push(ProcChange::Appeared(e.pid));
                    }
                    Ok(Record::Fork(f)) => {
                        self.settle_now(f.pid, &mut completed, &mut changes);
                        let late_us = WallClock::monotonic_now_ns().saturating_sub(f.ts_ns) / 1000;
                        log::debug!("pid {} forked {} ({late_us} us ago)", f.parent, f.pid);
                        self.dormant.fork(f.parent, f.pid);
                        changes.push(ProcChange::Appeared(f.pid));
                    }
                    Ok(Record::Exit(e))
                        if self.decoder.keep_past_exit
                            && self.agent.as_ref().is_some_and(|a| a.is_tracing(e.pid)) =>
                    {
                        // The batched road: its other threads' drains may follow (exits.rs).
                        log::debug!("pid {} exited (settled once its threads are gone)", e.pid);
                        self.exiting.push(super::exits::Exiting {
                            pid: e.pid,
                            ts_ns: e.ts_ns,
                            seen: std::time::Instant::now(),
                        });
                    }
                    Ok(Record::Exit(e)) => {
                        log::debug!("pid {} exited", e.pid);
                        if self.decoder.keep_past_exit {
                            // Not an agent's process: nothing of it drains later.
                            self.decoder.forget_process(e.pid);
                        }
                        // Its open calls end here, before anything of a process reusing the pid.
                        self.pairer.close_open(Some(e.pid), e.ts_ns, &mut completed);
                        changes.push(ProcChange::Exited(e.pid, e.ts_ns));
                    }
                    Err(err) => self.bad_record(err),
                }
            }
            // In ring order still: the process changes wait for the end.
            if completed.len() >= STORE_CHUNK {
                self.store_drained(&mut completed);
            }
        }
        let mut exited = Vec::new();
        let all = std::mem::take(&mut self.settle_all);
        self.settle_exits(all, None, &mut completed, &mut exited);
        changes.extend(exited.into_iter().map(|(pid, ts)| ProcChange::Exited(pid, ts)));
        self.store_drained(&mut completed);
        self.completed = completed;
        for change in changes {
            match change {
                ProcChange::Appeared(pid) => self.discover(pid),
                ProcChange::Exited(pid, ts_ns) => {
                    if self.processes.is_running(pid) {
                        self.end_process(pid, ts_ns);
                    }
                    self.scheduler.cancel(pid);
                }
            }
        }
    }

    /// Settles an unsettled exit of `pid` now (the pid appears anew).
    fn settle_now(&mut self, pid: u32, completed: &mut Vec<Call>, changes: &mut Vec<ProcChange>) {
        let mut exited = Vec::new();
        self.settle_exits(false, Some(pid), completed, &mut exited);
        changes.extend(exited.into_iter().map(|(pid, ts)| ProcChange::Exited(pid, ts)));
    }

    /// One call event: filtered where the kernel could not decide, then
    /// paired. A return sent without its name is not filtered: the kernel
    /// sends it only for an entry it matched by exact name with no file
    /// check asked for (depth.rs, `config::RETURN_FILE`), which the filter
    /// keeps; it closes that entry even if the names changed since.
    pub(super) fn take_call(&mut self, ev: crate::events::Event, completed: &mut Vec<Call>) {
        self.filter.after_sweeps(self.decoder.bound.sweeps);
        let (codes, processes) = (&mut self.codes, &self.processes);
        let version = || processes.info(ev.pid).and_then(|p| p.version);
        if ev.name_not_read
            || crate::agent::skips_name_filter(&ev)
            || self.filter.keep(&ev, || codes.resolve_now(&ev, version))
        {
            if ev.kind == EventKind::Entry {
                let processes = &self.processes;
                self.codes.request(&ev, || processes.info(ev.pid).and_then(|p| p.version));
            }
            if let Some((name, file)) = self.pairer.push(ev, completed) {
                self.decoder.recycle(name);
                self.decoder.recycle(file);
            }
        }
    }

    /// A record the decoder refused: counted (`bad_records`) and said.
    fn bad_record(&mut self, err: crate::events::DecodeError) {
        self.bad_records += 1;
        log::warn!("{err}");
    }

    /// A return the kernel sent bare, as [`Self::take_call`] takes its
    /// [`Event`](crate::events::Event): not filtered (its entry was), paired.
    fn take_known_return(&mut self, r: &crate::events::KnownReturn, completed: &mut Vec<Call>) {
        self.filter.after_sweeps(self.decoder.bound.sweeps);
        let decoder = &mut self.decoder;
        if let Some((name, file)) = self.pairer.push_known_return(r, completed, || decoder.not_read_strings())
        {
            self.decoder.recycle(name);
            self.decoder.recycle(file);
        }
    }

    pub(super) fn store_calls(&mut self, mut calls: Vec<Call>) {
        self.store_drained(&mut calls);
    }

    /// The strings of an evicted block's calls handed back to the decoder,
    /// to be handed out again to entries without an atomic clone each
    /// ([`crate::events::Decoder::recycle`]); a block a snapshot still
    /// shares is only dropped.
    fn recycle_block(&mut self, block: crate::trace::CallBlock) {
        if let Ok(calls) = std::sync::Arc::try_unwrap(block) {
            for call in calls {
                self.decoder.recycle(call.name);
                self.decoder.recycle(call.file);
            }
        }
    }

    /// Stores the calls in `calls`, leaving it empty (its capacity stays).
    fn store_drained(&mut self, calls: &mut Vec<Call>) {
        if calls.is_empty() {
            return;
        }
        if let Some(r) = &mut self.rolling {
            r.write_calls(calls, &mut self.code_reader, &self.clock, |pid| self.processes.info(pid));
        }
        if let Some(s) = &mut self.spill {
            s.append(calls);
        }
        self.route_job_calls(calls);
        // Counted per run of one process's calls: one look-up a run, not a call.
        let mut run: Option<(u32, u64)> = None;
        for call in calls.drain(..) {
            match &mut run {
                Some((pid, n)) if *pid == call.pid => *n += 1,
                _ => {
                    if let Some((pid, n)) = run {
                        self.processes.count_calls(pid, n);
                    }
                    run = Some((call.pid, 1));
                }
            }
            self.functions.push(&call);
            if let Some(block) = self.store.push(call) {
                self.recycle_block(block);
            }
        }
        if let Some((pid, n)) = run {
            self.processes.count_calls(pid, n);
        }
    }
}
