//! The tracing daemon: one kernel side (programs, maps, ring buffer) serving
//! any mix of targets (pids, a launched command, cgroups, the whole host),
//! reading and pairing calls, keeping them in memory and in rolling files,
//! discovering new processes from exec events, and answering `pftracectl`.
//!
//! Where things are: `setup` (starting), `attach` (the attach scheduler:
//! attaching processes and detaching them), `event_loop`, `ring` (records
//! read from the kernel), `finish` (a process or the run ending),
//! `control` (pftracectl's requests); the state they share is here.

mod agent;
mod attach;
mod batchstop;
mod control;
mod dormant;
mod event_loop;
mod exits;
mod filter;
mod finish;
mod jobs;
mod processes;
mod ring;
mod sampler;
mod setup;
mod store;
mod targets;

use std::{path::PathBuf, time::Instant};

use tokio::sync::mpsc;

pub use self::{
    attach::AttachFailure, dormant::SEMAPHORES_ENV, filter::FilterError, setup::hostname, store::CallStore,
    targets::TargetScopeError,
};
use self::{attach::AttachScheduler, filter::NameFilter, processes::Processes, targets::CgroupTarget};
use crate::{
    bpf::{BpfError, KernelProbes},
    caps::PrivilegeError,
    clock::WallClock,
    config::Config,
    events::Decoder,
    output::rolling::RollingOutput,
    output::spill::SpillWriter,
    pairing::Pairer,
    stats::Aggregator,
    target::{self, TargetError},
};

/// What to trace and how.
#[derive(Debug, Clone, Default)]
pub struct DaemonOptions {
    pub names: Vec<String>,
    pub pids: Vec<u32>,
    pub cgroups: Vec<PathBuf>,
    pub all: bool,
    /// Interpreter files attached host-wide at start (`--binary`).
    pub binaries: Vec<PathBuf>,
    /// Listen on the control socket (config.socket).
    pub serve: bool,
    pub config: Config,
    /// Benchmarks only: attach programs that return at once (the uprobe floor).
    pub floor: bool,
}

/// Errors that stop the daemon from starting.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Privilege(#[from] PrivilegeError),
    #[error(transparent)]
    Bpf(Box<BpfError>),
    #[error(transparent)]
    Names(#[from] FilterError),
    #[error("no function names to trace: give at least one with -t NAME (or `names` in the config file)")]
    NoNames,
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    Binary(#[from] target::BinaryError),
    #[error(transparent)]
    Scope(#[from] TargetScopeError),
    #[error(transparent)]
    Attach(#[from] AttachFailure),
    #[error("pid {0} exited while pftraced was attaching to it; nothing to trace")]
    ExitedDuringAttach(u32),
    /// A process refused by a path that recorded its own reason.
    #[error("{0}")]
    Refused(String),
    #[error("watching pid {pid}: {source}")]
    Watch { pid: u32, source: std::io::Error },
    #[error("{0}")]
    Jobs(String),
    #[error("rolling output: {0}")]
    Output(String),
    #[error("control socket: {0}")]
    Control(String),
    #[error("{0}")]
    Agent(String),
    #[error("reading the ring buffer: {0}")]
    Ring(std::io::Error),
}

/// `?` on the kernel side's errors (boxed: they are large).
impl From<BpfError> for DaemonError {
    fn from(err: BpfError) -> Self {
        Self::Bpf(Box::new(err))
    }
}

/// A traced process exited: (pid, attach serial).
type ExitNotice = (u32, u64);

/// The running daemon's state.
pub struct Daemon {
    probes: KernelProbes,
    filter: NameFilter,
    processes: Processes,
    /// The cgroup targets by slot (the jobs root last); None while one does not exist.
    cgroups: Vec<Option<CgroupTarget>>,
    cgroup_paths: Vec<PathBuf>,
    /// What the cgroup watchers see (see cgroupwatch.rs).
    cgroup_events: mpsc::UnboundedReceiver<crate::cgroupwatch::CgroupEvent>,
    jobs: Option<jobs::Jobs>,
    all: bool,
    /// Exit when every pid / launched target has exited (no cgroup or --all scope).
    until_targets_exit: bool,
    targets: Vec<String>,
    store: CallStore,
    /// What each traced function is, resolved on a thread of its own.
    codes: crate::codes::CodeResolver,
    /// The rolling files' look-ups in its table.
    code_reader: crate::codes::CodeReader,
    /// Per-function figures of every completed call (the summary's, and
    /// `stats` without a filter), whatever the store still holds.
    functions: Aggregator,
    /// Dumps being sent: each holds a permit until its thread ends.
    dumps: std::sync::Arc<tokio::sync::Semaphore>,
    max_dumps: usize,
    decoder: Decoder,
    pairer: Pairer,
    /// The calls a drain of the ring completes, kept between drains so
    /// they are not collected into a newly grown vector each time.
    completed: Vec<crate::pairing::Call>,
    rolling: Option<RollingOutput>,
    /// Every completed call, for the run's trace file (see output/spill.rs).
    spill: Option<SpillWriter>,
    bad_records: u64,
    /// The batched agent road at pftraced's stop (daemon/batchstop.rs).
    batch_stop: batchstop::BatchStop,
    /// Exits on the batched agent road not yet settled (daemon/exits.rs).
    exiting: Vec<exits::Exiting>,
    /// The next drain settles every exit (pftraced stops).
    settle_all: bool,
    clock: WallClock,
    start_ns: u64,
    started: Instant,
    /// Exit notifications: (pid, attach serial), so a late notice about a
    /// process never touches a newer one that reused its pid.
    exits: (mpsc::UnboundedSender<ExitNotice>, mpsc::UnboundedReceiver<ExitNotice>),
    /// Exit watches not yet fired.
    watched: usize,
    stopping: bool,
    serve: Option<crate::config::SocketConfig>,
    sampler: sampler::Sampler,
    /// Attachments in flight and probes to detach.
    scheduler: AttachScheduler,
    /// Dormant host-wide links and the semaphores raised (watched cgroups' default mode).
    dormant: dormant::Dormant,
    /// The in-process agent, once a target needs it.
    agent: Option<agent::AgentSide>,
    /// How agents report (`[agent] report`, `--agent-report`).
    agent_report: crate::config::AgentReport,
    /// Agents that connected before the event loop ran.
    early_agents: Vec<crate::agent::server::AgentConn>,
}

impl Daemon {
    /// Appends every completed call to `spill`, which the finished trace
    /// then carries ([`crate::trace::Trace::spilled`]): the run's trace file gets them all,
    /// whatever `limits.max_calls_in_memory` keeps for `dump` and `stats`.
    pub fn spill_calls_to(&mut self, spill: SpillWriter) {
        self.spill = Some(spill);
    }

    /// The control socket path, when serving.
    pub fn socket_path(&self) -> Option<PathBuf> {
        self.serve.as_ref().map(|s| s.path.clone())
    }
}
