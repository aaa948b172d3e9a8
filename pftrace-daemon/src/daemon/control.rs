//! Answers `pftracectl` requests from the daemon's state: status, dump,
//! stats, live name changes, clear and stop.

use serde_json::json;

use super::{Daemon, store};
use crate::{
    control::server::Handled,
    output,
    protocol::{CallFilter, Command, DumpHeader, NamesReply, Status},
};

impl Daemon {
    /// Handles one request.
    pub(super) fn handle(&mut self, command: Command) -> Handled {
        match command {
            Command::Status {} => json_reply(&self.status()),
            Command::Dump { filter, format } => self.dump(&filter, format.as_deref()),
            Command::Stats { filter, per_pid } => {
                let calls = self.store.select(&filter, &self.clock);
                json_reply(&store::stats(&calls, per_pid))
            }
            Command::Add { names } => match self.filter.add(&mut self.probes, &names) {
                Ok(()) => json_reply(&NamesReply { names: self.filter.texts() }),
                Err(err) => Handled::Error(err.to_string()),
            },
            Command::Remove { names } => match self.filter.remove(&mut self.probes, &names) {
                Ok(()) => json_reply(&NamesReply { names: self.filter.texts() }),
                Err(err) => Handled::Error(err.to_string()),
            },
            Command::Clear {} => Handled::Json(json!({ "cleared": self.store.clear() })),
            Command::Stop {} => {
                self.stopping = true;
                Handled::Json(json!({ "stopping": true }))
            }
        }
    }

    fn status(&self) -> Status {
        Status {
            daemon_pid: std::process::id(),
            daemon_version: env!("CARGO_PKG_VERSION").into(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            names: self.filter.texts(),
            targets: self.targets.clone(),
            binaries: self.processes.binary_status(),
            processes: self.processes.process_status(),
            refused: self.processes.refusals(),
            counters: self.counters(),
            filtered_in_user_space: self.filter.dropped,
            calls_total: self.store.total,
            calls_in_memory: self.store.len() as u64,
            calls_evicted: self.store.evicted,
            unmatched_returns: self.pairer.unmatched_total,
            incomplete_calls: self
                .store
                .all()
                .filter(|c| c.end == crate::pairing::CallEnd::Incomplete)
                .count() as u64,
            output: self.rolling.as_ref().map(|r| r.status()),
        }
    }

    fn dump(&self, filter: &CallFilter, format: Option<&str>) -> Handled {
        // `chrome`, `records`, `pfw` or `pfw:PERFFLOW_OPTIONS` (one stream for all processes).
        let format = format.unwrap_or("chrome");
        let writer = match output::by_name(format, None) {
            Ok(w) => w,
            Err(err) => return Handled::Error(err.to_string()),
        };
        let calls = self.store.select(filter, &self.clock);
        let n = calls.len() as u64;
        let trace =
            self.trace_of(calls, filter.pid, crate::clock::WallClock::monotonic_now_ns(), self.counters());
        let mut bytes = Vec::new();
        if let Err(err) = writer.write(&trace, &mut bytes) {
            return Handled::Error(format!("rendering the trace: {err}"));
        }
        Handled::Dump {
            header: DumpHeader { format: format.into(), bytes: bytes.len() as u64, calls: n },
            bytes,
        }
    }
}

fn json_reply<T: serde::Serialize>(value: &T) -> Handled {
    match serde_json::to_value(value) {
        Ok(v) => Handled::Json(v),
        Err(err) => Handled::Error(format!("encoding the reply: {err}")),
    }
}
