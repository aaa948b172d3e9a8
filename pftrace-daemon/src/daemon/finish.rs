//! Ending things: a traced process (its open calls closed as incomplete,
//! its probes retired), and the whole run (outputs closed, everything
//! detached, the trace of the calls in memory built).

use super::{Daemon, hostname};
use crate::{
    bpf::Counters,
    clock::WallClock,
    output::spill::SpillWriter,
    pairing::Call,
    trace::{CallList, Trace},
};

impl Daemon {
    /// A traced process exited (or exec'd another program): close its open
    /// calls at `end_ns` as incomplete and detach its probes.
    pub(super) fn end_process(&mut self, pid: u32, end_ns: u64) {
        let mut closed = Vec::new();
        self.pairer.close_open(Some(pid), end_ns, &mut closed);
        self.store_calls(closed);
        let links = self.processes.end_and_take_links(pid);
        self.scheduler.retire(links);
        self.sampler.forget(pid);
        self.codes.forget(pid);
        self.filter.forget(pid);
        self.dormant.forget(pid);
        if let Some(agent) = &mut self.agent {
            agent.forget(pid);
            // The syscall road costs every syscall of the host: held only
            // while an agent may report through it.
            if !agent.has_agents() {
                self.probes.detach_agent_syscall();
            }
        }
        // Still tracked (its forks and execs reported) if it only exec'd
        // something else; the kernel forgets it when it exits.
        log::debug!("pid {pid} ended");
    }

    pub(super) fn counters(&self) -> Counters {
        let mut c = self.probes.counters().unwrap_or_else(|err| {
            log::warn!("reading counters: {err}");
            Counters::default()
        });
        c.agent_unnamed = self.decoder.agent.unnamed;
        // A batched event is a report the kernel did not count as one (it
        // counted the drain); those pftraced read itself at its stop too.
        c.batch.by_daemon = self.batch_stop.by_daemon;
        c.batch.stop_unread = self.batch_stop.unread;
        c.agent_reports += c.batch.events + c.batch.by_daemon;
        c.bounds = self.bounds();
        c
    }

    pub(super) fn bounds(&self) -> crate::protocol::BoundCounts {
        crate::protocol::BoundCounts {
            strings_folded: self.decoder.bound.records_folded,
            string_bytes: self.decoder.bound.bytes,
            stats_folded: self.functions.folded(),
            open_calls_dropped: self.pairer.dropped_open,
            agent_connections_refused: self
                .agent
                .as_ref()
                .map_or(0, |a| a.refused.load(std::sync::atomic::Ordering::Relaxed)),
            codes_over_bytes: self.codes.table().bytes().1,
        }
    }

    pub(super) fn finish(mut self) -> Trace {
        let end_ns = WallClock::monotonic_now_ns();
        let counters = self.counters();
        let mut closed = Vec::new();
        self.pairer.close_open(None, end_ns, &mut closed);
        self.store_calls(closed);
        // Written before returning (not on a blocking thread the exit would cut short).
        self.stopping = true;
        self.finish_jobs();
        if let Some(r) = &mut self.rolling {
            r.close();
        }
        // Every function asked for is answered before the trace is written.
        self.codes.finish();
        // pftraced's own +1 goes before the probes (a SIGKILLed daemon cannot do this).
        self.dormant.lower_all();
        self.processes.detach_all();
        if let Some(agent) = &mut self.agent {
            agent.stop_all();
        }
        self.probes.detach_agent_syscall();
        self.scheduler.detach_rest_in_background();
        if self.store.evicted > 0 && self.spill.is_none() {
            log::warn!(
                "{} older calls were dropped from memory (limits.max_calls_in_memory); they are only in the rolling \
                 output files, if configured",
                self.store.evicted
            );
        }
        let mut calls: Vec<Call> = self.store.all().cloned().collect();
        calls.sort_by_key(|c| (c.start_ns, c.depth));
        let mut trace = self.trace_of(calls.into(), None, end_ns, counters);
        trace.spilled = self.spill.take().map(SpillWriter::finish);
        trace.functions = self.functions.rows(Default::default(), &trace.codes);
        trace
    }

    /// A trace of `calls` (and of the samples of `pid`, or all) with the
    /// daemon's metadata and counters.
    pub(super) fn trace_of(
        &self,
        calls: CallList,
        pid: Option<u32>,
        end_ns: u64,
        counters: Counters,
    ) -> Trace {
        let mut processes: Vec<_> = self.processes.traced().cloned().collect();
        processes.sort_by_key(|p| p.pid);
        Trace {
            names: self.filter.texts(),
            processes,
            calls,
            samples: self.sampler.samples(pid),
            unmatched_returns: self.pairer.unmatched_returns().to_vec(),
            unmatched_returns_total: self.pairer.unmatched_total,
            unmatched_generator_returns: self.pairer.unmatched_generator,
            skipped_entries: self.pairer.skipped_entries,
            counters,
            bad_records: self.bad_records + self.decoder.agent.bad_events,
            file_names_cut: self.decoder.files_cut,
            filtered_in_user_space: self.filter.dropped,
            filtered_by_qualified_name: self.filter.dropped_by_qualname,
            filtered_unresolved: self.filter.dropped_unresolved,
            calls_total: self.store.total,
            calls_evicted: self.store.evicted,
            spilled: None,
            functions: Vec::new(),
            clock: self.clock,
            start_ns: self.start_ns,
            end_ns,
            hostname: hostname(),
            codes: self.codes.table(),
        }
    }
}
