//! A tracing session: loads the kernel side, puts the traced names in its
//! filter, attaches to target processes, then reads the ring buffer and
//! pairs calls until told to stop, and hands back the [`Trace`].

use std::{future::Future, pin::pin, time::Duration};

use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;

use crate::{
    bpf::{BpfError, KernelProbes, ProbeKind, UprobeLink},
    caps::{self, PrivilegeError},
    clock::WallClock,
    events::Decoder,
    pairing::{Call, Pairer},
    target::Target,
    trace::{Trace, TracedProcess},
};

/// Errors of a tracing session.
#[derive(Debug, thiserror::Error)]
pub enum TracerError {
    #[error(transparent)]
    Privilege(#[from] PrivilegeError),
    #[error(transparent)]
    Bpf(#[from] BpfError),
    #[error("no function names to trace: give at least one with -t NAME")]
    NoNames,
    #[error("attaching to pid {pid} ({binary}): {source}")]
    Attach {
        pid: u32,
        binary: String,
        source: BpfError,
    },
    #[error("reading the ring buffer: {0}")]
    Ring(std::io::Error),
}

/// Session settings.
#[derive(Debug, Clone)]
pub struct TracerOptions {
    pub names: Vec<String>,
    /// Ring buffer size in bytes (power of two, at least one page).
    pub ring_bytes: u32,
}

/// How often the ring buffer is drained even without a wakeup.
const DRAIN_INTERVAL: Duration = Duration::from_millis(100);

/// A loaded, attached tracing session.
pub struct Tracer {
    probes: KernelProbes,
    links: Vec<UprobeLink>,
    processes: Vec<TracedProcess>,
    names: Vec<String>,
    clock: WallClock,
    start_ns: u64,
}

impl Tracer {
    /// Checks privileges, loads the programs and fills the name filter.
    pub fn new(opts: &TracerOptions) -> Result<Self, TracerError> {
        if opts.names.is_empty() {
            return Err(TracerError::NoNames);
        }
        // Validate names before needing privileges, so typos are reported first.
        for name in &opts.names {
            crate::bpf::name_key(name)?;
        }
        caps::check()?;
        let mut probes = KernelProbes::load(opts.ring_bytes)?;
        for name in &opts.names {
            probes.add_name(name)?;
        }
        Ok(Self {
            probes,
            links: Vec::new(),
            processes: Vec::new(),
            names: opts.names.clone(),
            clock: WallClock::measure(),
            start_ns: WallClock::monotonic_now_ns(),
        })
    }

    /// Attaches the entry and return programs to every probe site of `target`,
    /// scoped to its pid: only that process's semaphore is raised.
    pub fn attach(&mut self, target: &Target) -> Result<(), TracerError> {
        let err = |source| TracerError::Attach {
            pid: target.pid,
            binary: target.binary.display().to_string(),
            source,
        };
        let mut links = Vec::new();
        for (kind, sites) in [
            (ProbeKind::Entry, &target.entry),
            (ProbeKind::Return, &target.ret),
        ] {
            for site in sites {
                let link = self
                    .probes
                    .attach(
                        kind,
                        &target.open_path,
                        site.offset,
                        site.semaphore_offset,
                        site.spec,
                        Some(target.pid),
                    )
                    .map_err(err)?;
                links.push(link);
            }
        }
        self.links.extend(links);
        self.processes.push(TracedProcess {
            pid: target.pid,
            binary: target.binary.display().to_string(),
            version: target.version,
            command: target.command.clone(),
        });
        Ok(())
    }

    /// Reads and pairs events until `stop` completes, then drains what is
    /// left, closes open calls as incomplete, detaches, and returns the trace.
    pub async fn run(mut self, stop: impl Future<Output = ()>) -> Result<Trace, TracerError> {
        let ring = self.probes.take_ring()?;
        // SAFETY: the ring buffer owns its fd and keeps it open while registered.
        let mut ring =
            unsafe { AsyncFd::register(ring) }.map_err(|e| TracerError::Ring(e.into()))?;
        let mut reader = Reader::default();
        let mut stop = pin!(stop);
        let mut tick = tokio::time::interval(DRAIN_INTERVAL);
        loop {
            tokio::select! {
                biased;
                _ = &mut stop => break,
                guard = ring.readable_mut() => {
                    let mut guard = guard.map_err(TracerError::Ring)?;
                    reader.drain(guard.get_inner_mut());
                    guard.clear_ready();
                }
                _ = tick.tick() => reader.drain(ring.get_mut()),
            }
        }
        // Everything a finished process submitted is already in the buffer.
        reader.drain(ring.get_mut());
        let end_ns = WallClock::monotonic_now_ns();
        let counters = self.probes.counters()?;
        drop(std::mem::take(&mut self.links));
        reader.pairer.close_open(None, end_ns, &mut reader.calls);
        reader.calls.sort_by_key(|c| (c.start_ns, c.depth));
        Ok(Trace {
            names: self.names,
            processes: self.processes,
            calls: reader.calls,
            unmatched_returns: reader.pairer.unmatched_returns().to_vec(),
            skipped_entries: reader.pairer.skipped_entries,
            counters,
            bad_records: reader.bad_records,
            clock: self.clock,
            start_ns: self.start_ns,
            end_ns,
        })
    }
}

/// Ring-buffer consumer state.
#[derive(Default)]
struct Reader {
    decoder: Decoder,
    pairer: Pairer,
    calls: Vec<Call>,
    bad_records: u64,
}

impl Reader {
    fn drain(&mut self, ring: &mut RingBuf<MapData>) {
        while let Some(item) = ring.next() {
            match self.decoder.decode(&item) {
                Ok(ev) => self.pairer.push(ev, &mut self.calls),
                Err(err) => {
                    self.bad_records += 1;
                    log::warn!("{err}");
                }
            }
        }
    }
}
