//! Answers `pftracectl` requests from the daemon's state: status, dump,
//! stats, live name changes, clear and stop. Whatever takes longer than a
//! few microseconds per call in memory (rendering a dump, figures over a
//! filtered selection) runs off the event loop, on a snapshot of the store.

use serde_json::json;

use super::{Daemon, store};
use crate::{
    control::server::Handled,
    output,
    protocol::{
        BUSY, CallFilter, Command, DumpHeader, NamesReply, STATUS_FUNCTIONS, StatsGrouping, StatsReply,
        StatsSource, Status,
    },
    stats::{Aggregator, PERCENTILE_ERROR},
};

impl Daemon {
    /// Handles one request.
    pub(super) fn handle(&mut self, command: Command) -> Handled {
        match command {
            Command::Status {} => json_reply(&self.status()),
            Command::Dump { filter, format } => self.dump(&filter, format.as_deref()),
            Command::Stats { filter, per_pid, by } => self.stats(&filter, per_pid, by),
            Command::Add { names } => match self.filter.add(&mut self.probes, &names) {
                Ok(()) => self.names_changed(),
                Err(err) => Handled::Error(err.to_string()),
            },
            Command::Remove { names } => match self.filter.remove(&mut self.probes, &names) {
                Ok(()) => self.names_changed(),
                Err(err) => Handled::Error(err.to_string()),
            },
            Command::Env {} => match self.agent_env_line() {
                Some(line) => Handled::Json(json!({ "line": line })),
                None => Handled::Error("this pftraced does not serve the in-process agent (it does when tracing a command, --cgroup or --all)".into()),
            },
            Command::Clear {} => Handled::Json(json!({ "cleared": self.store.clear() })),
            Command::Stop {} => {
                self.stopping = true;
                Handled::Json(json!({ "stopping": true }))
            }
        }
    }

    /// The names changed: the reply once every connected agent has the
    /// whole new set in force (each confirms with `ok G`).
    fn names_changed(&self) -> Handled {
        let names = self.filter.texts();
        let Some(agent) = self.agent.as_ref() else { return json_reply(&NamesReply { names }) };
        let wait = agent.push_names(&names);
        Handled::Blocking(Box::new(move || {
            for (pid, result) in wait() {
                if let Err(err) = result {
                    log::warn!("agent of pid {pid} did not take the new names: {err}");
                }
            }
            json_reply(&NamesReply { names })
        }))
    }

    fn status(&self) -> Status {
        let (functions, functions_total) = self.functions.seen(&self.codes.table(), STATUS_FUNCTIONS);
        Status {
            daemon_pid: std::process::id(),
            daemon_version: env!("CARGO_PKG_VERSION").into(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            names: self.filter.texts(),
            targets: self.targets.clone(),
            binaries: self.processes.binary_status(),
            processes: self
                .processes
                .process_status()
                .into_iter()
                .map(|mut p| {
                    p.agent_tracing = self.agent.as_ref().is_some_and(|a| a.is_tracing(p.pid));
                    p
                })
                .collect(),
            refused: self.processes.refusals(),
            counters: self.counters(),
            filtered_in_user_space: self.filter.dropped,
            filtered_by_qualified_name: self.filter.dropped_by_qualname,
            filtered_unresolved: self.filter.dropped_unresolved,
            calls_total: self.store.total,
            calls_in_memory: self.store.len() as u64,
            calls_evicted: self.store.evicted,
            unmatched_returns: self.pairer.unmatched_total,
            incomplete_calls: self.functions.incomplete(),
            dumps_in_progress: (self.max_dumps - self.dumps.available_permits()) as u64,
            max_concurrent_dumps: self.max_dumps as u64,
            output: self.rolling.as_ref().map(|r| r.status()),
            jobs: self.jobs.as_ref().map_or_else(Vec::new, |j| j.status(&self.codes.table())),
            functions,
            functions_total,
            codes: self.codes.counts(),
        }
    }

    /// A dump: a snapshot of the calls in memory (shared blocks, see
    /// [`store`]) and of the metadata, rendered and sent by a thread of its
    /// own while tracing goes on. At most `limits.max_concurrent_dumps` at
    /// once: each may keep alive calls the store has since evicted.
    fn dump(&self, filter: &CallFilter, format: Option<&str>) -> Handled {
        // `chrome`, `records`, `pfw` or `pfw:PERFFLOW_OPTIONS` (one stream for all processes).
        let format = format.unwrap_or("chrome");
        let choice = match output::choose(format, None) {
            Ok(choice) => choice,
            Err(err) => return Handled::Error(err.to_string()),
        };
        let Ok(permit) = self.dumps.clone().try_acquire_owned() else {
            return Handled::Error(format!(
                "{BUSY}{} dumps are being sent already (limits.max_concurrent_dumps); try again when one \
                 has finished",
                self.max_dumps
            ));
        };
        let calls = self.store.snapshot(store::selector(filter, self.clock));
        let trace =
            self.trace_of(calls, filter.pid, crate::clock::WallClock::monotonic_now_ns(), self.counters());
        let header = DumpHeader { format: format.into() };
        Handled::Dump {
            header,
            render: Box::new(move |out| {
                let _permit = permit;
                choice.boxed().write(&trace, out).map_err(|e| e.to_string())?;
                Ok(trace.calls.len() as u64)
            }),
        }
    }

    /// Figures of every call since tracing started (no filter, or only a
    /// function name), or of the calls in memory a filter selects (computed
    /// off the event loop).
    fn stats(&self, filter: &CallFilter, per_pid: bool, by: StatsGrouping) -> Handled {
        let (calls_total, calls_in_memory) = (self.store.total, self.store.len() as u64);
        let bounds = self.bounds();
        let reply = move |source, functions, stats_folded| StatsReply {
            source,
            calls_total,
            calls_in_memory,
            percentile_error: PERCENTILE_ERROR,
            functions,
            bounds: crate::protocol::BoundCounts { stats_folded, ..bounds },
        };
        if !per_pid && filter.since_wall_ns.is_none() && filter.pid.is_none() {
            let mut rows = self.functions.rows(by, &self.codes.table());
            if let Some(function) = &filter.function {
                rows.retain(|r| &r.function == function);
            }
            return json_reply(&reply(StatsSource::AllCalls, rows, bounds.stats_folded));
        }
        let calls = self.store.snapshot(store::selector(filter, self.clock));
        let codes = self.codes.table();
        Handled::Blocking(Box::new(move || {
            let mut selected = Aggregator::new(per_pid);
            for call in calls.iter() {
                selected.push(call);
            }
            json_reply(&reply(StatsSource::CallsInMemory, selected.rows(by, &codes), selected.folded()))
        }))
    }
}

fn json_reply<T: serde::Serialize>(value: &T) -> Handled {
    match serde_json::to_value(value) {
        Ok(v) => Handled::Json(v),
        Err(err) => Handled::Error(format!("encoding the reply: {err}")),
    }
}
