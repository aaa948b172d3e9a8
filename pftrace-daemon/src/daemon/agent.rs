//! The in-process agent in the daemon, for the Pythons whose USDT probes
//! cannot serve (`python::mechanism`): its files installed root-owned in a
//! directory of this run (removed at exit), its report path (one uprobe on
//! the installed file, loaded from the daemon's own eBPF object: same ring,
//! TRACKED set and counters), its control socket (accepted on a thread; on
//! the event loop each agent's SO_PEERCRED pid is checked against the scope
//! and put in TRACKED before it gets any name), and one thread per
//! connected agent that sends it the whole set of names and waits for its
//! `ok G`. Records of an agent are its process's own: the kernel takes pid,
//! tid, time, CPU and memory itself, and only TRACKED pids get through.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    os::unix::{
        fs::MetadataExt as _,
        net::{UnixListener, UnixStream},
    },
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc as std_mpsc,
    },
    time::{Duration, Instant},
};

use pftrace_agent::protocol::Report;
use tokio::sync::mpsc;

use super::{Daemon, DaemonError};
use crate::{
    agent::{
        self,
        install::{self, Installed},
        remote,
        server::{AgentConn, AgentServer},
    },
    events::printable,
    python::{self, Mechanism},
    target::{self, Target},
};

/// pftraced's runtime directory; the agent goes into `agent.<pftraced pid>`
/// under it, so two daemons never replace each other's agent file (a uprobe
/// is attached to a file by inode).
const AGENT_BASE: &str = "/run/pftrace";

/// Connections whose hello is being read at once, at most (a client that
/// connects and says nothing holds one for 5 s, or until 32 more came).
const MAX_HANDSHAKES: usize = 32;

/// How long after a PEP 768 request pftraced asks again when the agent has
/// not connected (the loader declines to run inside an import: start-up).
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// How long an agent has to confirm a new set of names (`ok G`).
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// How long `--pid` waits for a process to run the loader (PEP 768) and then
/// for its agent to connect.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The agent side of a running daemon.
pub(super) struct AgentSide {
    pub(super) installed: Installed,
    /// File offset of the probe function in the agent's shared object.
    probe_offset: u64,
    /// (st_dev, st_ino) of the agent files the uprobe is on: this run's copy,
    /// and copies of earlier pftraceds that traced processes still map.
    uprobed: Vec<(u64, u64)>,
    incoming: Option<mpsc::UnboundedReceiver<AgentConn>>,
    /// Connected agents by pid.
    links: HashMap<u32, std_mpsc::Sender<ToAgent>>,
    /// Pids whose agent has confirmed its first set of names (tracing).
    ready: Arc<Mutex<HashSet<u32>>>,
    /// Connections to the agent socket refused: no hello (within 5 s, or
    /// closed for a newer one), a malformed one, or no thread to read it.
    pub(super) refused: Arc<AtomicU64>,
}

enum ToAgent {
    /// The whole set of names; the agent's generation (or why not) is sent back.
    Names(Vec<String>, std_mpsc::Sender<Result<u32, String>>),
    /// Stop; with a sender, told once the agent has closed its connection
    /// (it removed its hooks, holding the GIL) or the bound passed.
    Stop(Option<std_mpsc::Sender<()>>),
}

impl Drop for AgentSide {
    fn drop(&mut self) {
        for link in self.links.values() {
            let _ = link.send(ToAgent::Stop(None));
        }
        // Processes keep the files they mapped; nothing of this run stays behind.
        let _ = std::fs::remove_dir_all(&self.installed.dir);
    }
}

impl AgentSide {
    /// The connections the accept thread hands over (once, for the event loop).
    pub(super) fn take_incoming(&mut self) -> Option<mpsc::UnboundedReceiver<AgentConn>> {
        self.incoming.take()
    }

    /// Asks every agent to stop (at the end of the run).
    pub(super) fn stop_all(&mut self) {
        for (_, link) in self.links.drain() {
            let _ = link.send(ToAgent::Stop(None));
        }
    }

    /// Asks every agent to stop; each receiver hears once its agent closed
    /// the connection (it tore down, holding the GIL: every other Python
    /// thread has let the GIL go since, and so switched out) or `bound`
    /// passed ([`super::batchstop::GRACE`]; a dropped sender says the same).
    pub(super) fn stop_all_waiting(&mut self) -> Vec<std_mpsc::Receiver<()>> {
        self.links
            .drain()
            .map(|(_, link)| {
                let (tx, rx) = std_mpsc::channel();
                let _ = link.send(ToAgent::Stop(Some(tx)));
                rx
            })
            .collect()
    }

    /// Sends `names` to every connected agent and waits (up to
    /// [`ACK_TIMEOUT`]) for each to confirm: (pid, generation or error).
    pub(super) fn push_names(
        &self,
        names: &[String],
    ) -> impl FnOnce() -> Vec<(u32, Result<u32, String>)> + Send + use<> {
        let waits: Vec<(u32, std_mpsc::Receiver<Result<u32, String>>)> = self
            .links
            .iter()
            .map(|(&pid, link)| {
                let (tx, rx) = std_mpsc::channel();
                if link.send(ToAgent::Names(names.to_vec(), tx.clone())).is_err() {
                    let _ = tx.send(Err("its connection has closed".into()));
                }
                (pid, rx)
            })
            .collect();
        move || {
            let deadline = Instant::now() + ACK_TIMEOUT;
            waits
                .into_iter()
                .map(|(pid, rx)| {
                    let left = deadline.saturating_duration_since(Instant::now());
                    (
                        pid,
                        rx.recv_timeout(left)
                            .unwrap_or_else(|_| Err(format!("no answer within {ACK_TIMEOUT:?}"))),
                    )
                })
                .collect()
        }
    }

    pub(super) fn forget(&mut self, pid: u32) {
        self.links.remove(&pid);
        self.ready.lock().unwrap_or_else(|e| e.into_inner()).remove(&pid);
    }

    /// Whether any agent is connected.
    pub(super) fn has_agents(&self) -> bool {
        !self.links.is_empty()
    }

    /// Whether the agent of `pid` is tracing (it confirmed the names).
    pub(super) fn is_tracing(&self, pid: u32) -> bool {
        self.ready.lock().unwrap_or_else(|e| e.into_inner()).contains(&pid)
    }
}

impl Daemon {
    /// Installs the agent, attaches its uprobe and starts accepting agents
    /// on its control socket (once; later calls do nothing).
    pub fn enable_agent(&mut self) -> Result<(), DaemonError> {
        if self.agent.is_some() {
            return Ok(());
        }
        let err = |what: &str, e: &dyn std::fmt::Display| DaemonError::Agent(format!("{what}: {e}"));
        let base = Path::new(AGENT_BASE);
        root_dir(base).map_err(|e| err(AGENT_BASE, &e))?;
        let dir = base.join(format!("agent.{}", std::process::id()));
        let installed = install::install_bytes(agent::AGENT_SO, &dir, &dir.join("agent.sock"))
            .map_err(|e| err("installing the agent", &e))?;
        let so = installed.agent_so();
        let offset = agent::symbol_offset(&so, pftrace_common::agent::PROBE_SYMBOL)
            .map_err(|e| err("the agent's probe function", &e))?;
        self.probes.attach_agent(&so, offset)?;
        let own = std::fs::metadata(&so).map_err(|e| err("the installed agent", &e))?;
        let listener = AgentServer::bind(&installed.socket)
            .map_err(|e| err("the agent's control socket", &e))?
            .into_listener();
        listener.set_nonblocking(false).map_err(|e| err("the agent's control socket", &e))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let refused = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&refused);
        std::thread::Builder::new()
            .name("pftrace-agents".into())
            .spawn(move || accept_loop(listener, tx, counted))
            .map_err(|e| err("starting the agent socket's thread", &e))?;
        self.agent = Some(AgentSide {
            installed,
            probe_offset: offset,
            uprobed: vec![(own.dev(), own.ino())],
            incoming: Some(rx),
            links: HashMap::new(),
            ready: Arc::default(),
            refused,
        });
        Ok(())
    }

    /// The environment a launched command gets so its Pythons (3.11+) load
    /// the agent from their start; empty without the agent.
    pub fn agent_env(&self) -> Vec<(String, String)> {
        let current = std::env::var("PYTHONPATH").ok();
        self.agent.as_ref().map_or_else(Vec::new, |a| install::launch_env(&a.installed, current.as_deref()))
    }

    /// The shell line `pftracectl env` prints (None without the agent).
    pub fn agent_env_line(&self) -> Option<String> {
        self.agent.as_ref().map(|a| agent::launch::env_line(&a.installed))
    }

    /// A process traced through the agent: registered like any traced
    /// process (exit watch, TRACKED), its probes being its agent's.
    pub(super) fn attach_agent_target(&mut self, target: Target) -> Result<(), DaemonError> {
        self.enable_agent()?;
        self.attach_target(target, false)
    }

    /// `--pid` of a process the agent must trace: loaded through PEP 768 on
    /// 3.14+, then its connection awaited; 3.11-3.13 refused (no way in).
    pub(super) fn attach_agent_pid(&mut self, target: Target) -> Result<(), DaemonError> {
        let pid = target.pid;
        let version = target.version.expect("agent targets have a version");
        let binary = crate::events::printable_path(&target.binary);
        if !python::can_load_agent_remotely(version) {
            return Err(DaemonError::Agent(format!(
                "pid {pid} runs CPython {version} ({binary}), which pftrace traces through its in-process agent, \
                 and a running CPython {version} has no way to load it (PEP 768 remote execution is 3.14+): {}",
                remote::START_WITH_AGENT
            )));
        }
        self.attach_agent_target(target)?;
        let script = self.agent.as_ref().expect("enabled").installed.attach_script();
        // The loader declines to run inside an import (start-up): ask again
        // until the agent connects. The event loop is not running yet, so
        // wait here, keeping other agents' connections.
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Err(e) = remote::run_script(pid, &script, left.max(Duration::from_millis(100))) {
                self.end_process(pid, crate::clock::WallClock::monotonic_now_ns());
                return Err(DaemonError::Agent(e.to_string()));
            }
            let asked = Instant::now();
            while asked.elapsed() < RETRY_AFTER && Instant::now() < deadline {
                let next = self.agent.as_mut().and_then(|a| a.incoming.as_mut()).map(|rx| rx.try_recv());
                match next {
                    Some(Ok(conn)) if conn.pid == pid => return self.serve_now(conn),
                    Some(Ok(other)) => self.early_agents.push(other),
                    _ => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        self.end_process(pid, crate::clock::WallClock::monotonic_now_ns());
        Err(DaemonError::Agent(format!(
            "pid {pid} did not load pftrace's agent within {CONNECT_TIMEOUT:?} (its stderr says why: lines \
             starting with \"pftrace:\")"
        )))
    }

    /// Serves the agent of a `--pid` target now and waits for its first `ok G`.
    fn serve_now(&mut self, conn: AgentConn) -> Result<(), DaemonError> {
        let pid = conn.pid;
        let configured = self.agent_connected(conn).ok_or_else(|| {
            DaemonError::Agent(format!("pid {pid}: its agent connected but was not accepted"))
        })?;
        match configured.recv_timeout(ACK_TIMEOUT) {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(DaemonError::Agent(format!("pid {pid}: its agent: {e}"))),
            Err(_) => Err(DaemonError::Agent(format!(
                "pid {pid}: its agent did not confirm the names within {ACK_TIMEOUT:?}"
            ))),
        }
    }

    /// A process found in scope (exec, fork, scan) that the agent must
    /// trace: one started with the agent on its path (launch mode, or the
    /// `pftracectl env` line) connects by itself; a running 3.14+ gets the
    /// loader through PEP 768 (on a blocking thread); a 3.11-3.13 without the
    /// agent cannot be traced (refused with a warning; the daemon goes on).
    pub(super) fn discover_agent(&mut self, target: Target) {
        let pid = target.pid;
        let has_agent_env =
            crate::procinfo::open(pid).and_then(|p| target::env_var(&p, "PFTRACE_AGENT_SOCKET")).is_some();
        let version = target.version.expect("agent targets have a version");
        if !has_agent_env && !python::can_load_agent_remotely(version) {
            let why = format!(
                "pid {pid} runs CPython {version} ({}), which pftrace traces through its in-process agent; it \
                 was started without it and a running CPython {version} cannot load it: {}",
                crate::events::printable_path(&target.binary),
                remote::START_WITH_AGENT
            );
            log::warn!("{}", printable(&why));
            self.processes.refuse(pid, &why);
            return;
        }
        let binary = crate::events::printable_path(&target.binary);
        if let Err(err) = self.attach_agent_target(target) {
            log::warn!("{}", printable(&err.to_string()));
            self.processes.refuse(pid, &err);
            return;
        }
        let agent = self.agent.as_ref().expect("enabled");
        let ready = Arc::clone(&agent.ready);
        let is_ready = move || ready.lock().unwrap_or_else(|e| e.into_inner()).contains(&pid);
        if has_agent_env {
            // It loads the agent by itself, unless it runs Python with -E, -I
            // or -S (a wrapper script's line that launch mode cannot see), or
            // something cleared PYTHONPATH: say so rather than trace nothing.
            tokio::spawn(async move {
                tokio::time::sleep(CONNECT_TIMEOUT).await;
                if !is_ready() && !crate::procinfo::has_exited(pid) {
                    log::warn!("{}", printable(&never_loaded(pid, &binary)));
                }
            });
        } else {
            let script = agent.installed.attach_script();
            tokio::task::spawn_blocking(move || {
                // Found at its exec, it is starting up: the loader declines
                // to run inside an import, so ask until its agent is tracing.
                let deadline = Instant::now() + CONNECT_TIMEOUT;
                while Instant::now() < deadline && !is_ready() {
                    if let Err(e) = remote::run_script(pid, &script, CONNECT_TIMEOUT) {
                        log::warn!("{}", printable(&e.to_string()));
                        return;
                    }
                    let asked = Instant::now();
                    while asked.elapsed() < RETRY_AFTER && !is_ready() {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
                if !is_ready() && !crate::procinfo::has_exited(pid) {
                    log::warn!("pid {pid} did not load pftrace's agent within {CONNECT_TIMEOUT:?}");
                }
            });
        }
    }

    /// An agent connected (its pid from SO_PEERCRED): served if its process
    /// is traced through the agent or in scope and needs it; told to stop
    /// if pftraced traces it through USDT; refused otherwise. When served,
    /// the agent's first `ok G` (or why not) arrives on the receiver returned.
    pub(super) fn agent_connected(
        &mut self,
        mut conn: AgentConn,
    ) -> Option<std_mpsc::Receiver<Result<u32, String>>> {
        let pid = conn.pid;
        // An agent offering the batched road hears first whether it is
        // taken (with the CPU slots' fd when it is), whatever follows.
        if conn.hello.batch {
            let slots = if self.probes.batch { self.probes.cpu_slots_fd() } else { None };
            if let Err(err) = conn.answer_batch(slots) {
                log::warn!("{}", printable(&err.to_string()));
                return None;
            }
        }
        match self.agent_target(pid) {
            Ok(true) => {}
            Ok(false) => {
                let _ = conn.stop();
                return None;
            }
            Err(why) => {
                if let Some(agent) = &self.agent {
                    note_refusal(&agent.refused, &format_args!("agent of pid {pid} refused: {why}"));
                }
                let _ = conn.stop();
                return None;
            }
        }
        // The kernel accepts its reports from now on (also set when it was attached).
        if let Err(err) = self.probes.track(pid) {
            log::warn!("agent of pid {pid} refused: {err}");
            return None;
        }
        // The syscall road where pftraced was told to take it and the agent
        // offers it (no seccomp filter in its process): 103 ns a report
        // against 270 ns by the uprobe, but a cost to every syscall of the
        // host (config::AgentReport::Syscall).
        let road = if conn.hello.syscall && self.agent_report == crate::config::AgentReport::Syscall {
            match self.probes.attach_agent_syscall() {
                Ok(()) => Report::Syscall(self.probes.agent_token()),
                Err(err) => {
                    log::warn!(
                        "agent of pid {pid}: the syscall road is not available ({err}); it reports by uprobe"
                    );
                    Report::Uprobe
                }
            }
        } else {
            Report::Uprobe
        };
        if road == Report::Uprobe {
            self.uprobe_other_copies(pid);
        }
        let names = self.filter.texts();
        let (tx, rx) = std_mpsc::channel();
        let (configured_tx, configured) = std_mpsc::channel();
        let ready = self.agent.as_ref().map(|a| Arc::clone(&a.ready)).unwrap_or_default();
        let refused = self.agent.as_ref().map(|a| Arc::clone(&a.refused)).unwrap_or_default();
        let spawned = std::thread::Builder::new()
            .name(format!("pftrace-agent-{pid}"))
            .spawn(move || serve_agent(conn, road, names, configured_tx, ready, rx, &refused));
        match spawned {
            Ok(_) => {
                log::debug!("pid {pid}: agent connected");
                if let Some(agent) = &mut self.agent {
                    agent.links.insert(pid, tx);
                }
                Some(configured)
            }
            Err(err) => {
                log::warn!("agent of pid {pid}: cannot start its thread: {err}");
                None
            }
        }
    }

    /// Puts the agent's uprobe also on copies of the agent `pid` maps that
    /// are not this run's (agent::mapped): a process that loaded the agent
    /// from an earlier pftraced (traced again by `--pid` after a restart)
    /// keeps calling that copy's probe function, and its reports would reach
    /// no program (0 calls and nothing counted, before this).
    fn uprobe_other_copies(&mut self, pid: u32) {
        let Some(agent) = self.agent.as_mut() else { return };
        let (copies, foreign) = match agent::mapped::other_copies(pid, &agent.uprobed, agent::AGENT_SO) {
            Ok(found) => found,
            Err(err) => {
                log::debug!("pid {pid}: its mapped files could not be read: {err}");
                return;
            }
        };
        for path in foreign {
            log::warn!(
                "{}",
                printable(&format!(
                    "agent of pid {pid}: it loaded {path}, the agent of another pftrace build, whose reports \
                     by uprobe this pftraced cannot see: restart the process, or run pftraced with \
                     --agent-report syscall"
                ))
            );
        }
        for copy in copies {
            match self.probes.attach_agent_copy(&copy.link, agent.probe_offset) {
                Ok(()) => {
                    log::debug!("pid {pid}: uprobe on the agent copy it maps ({})", copy.link.display());
                    agent.uprobed.push(copy.id);
                }
                Err(err) => log::warn!(
                    "agent of pid {pid}: its copy of the agent ({}) could not be probed ({err}): its calls \
                     are not seen",
                    copy.link.display()
                ),
            }
        }
    }

    /// Whether the agent of `pid` is to be served: Ok(false) when pftraced
    /// traces it through its USDT probes; Err: why not at all.
    fn agent_target(&mut self, pid: u32) -> Result<bool, String> {
        match self.processes.mechanism_of(pid) {
            Some(Mechanism::Agent) => return Ok(true),
            Some(Mechanism::Usdt) => return Ok(false),
            None => {}
        }
        if !self.in_scope(pid) {
            return Err(
                "it is not in pftraced's scope (a traced process or a child of one, or in a traced cgroup)"
                    .into(),
            );
        }
        let target = target::inspect(pid).map_err(|e| e.to_string())?;
        if target.mechanism == Mechanism::Usdt {
            self.discover(pid);
            return Ok(false);
        }
        self.attach_target(target, false).map_err(|e| e.to_string())?;
        Ok(true)
    }

    /// Whether `pid` is in scope: `--all`, in a traced cgroup, or a
    /// descendant of a traced process.
    fn in_scope(&self, pid: u32) -> bool {
        if self.all || self.cgroups.iter().flatten().any(|c| c.pids().contains(&pid)) {
            return true;
        }
        let mut p = pid;
        for _ in 0..64 {
            let Some(ppid) = crate::procinfo::stat(p).map(|s| s.ppid) else { return false };
            if ppid <= 1 {
                return false;
            }
            if self.processes.is_running(ppid) {
                return true;
            }
            p = ppid;
        }
        false
    }
}

/// Accepts agents; each hello is read on a short thread of its own, and
/// the connection handed to the event loop. The socket is every user's, so
/// at most [`MAX_HANDSHAKES`] connections wait for their hello at once: one
/// more closes the one that has waited longest (an agent writes its hello
/// as it connects, so only a silent client waits long). Refused and closed
/// connections are counted (`refused`, shown as
/// `bounds.agent_connections_refused`) and the first one warned, not each:
/// before, a process holding 64 silent connections and opening 3,000 more
/// got one warning line per connection (3,032) and kept out every agent
/// connecting meanwhile.
fn accept_loop(listener: UnixListener, tx: mpsc::UnboundedSender<AgentConn>, refused: Arc<AtomicU64>) {
    let waiting: Arc<Mutex<VecDeque<(u64, UnixStream)>>> = Arc::default();
    let refuse = Arc::new(move |why: &dyn std::fmt::Display| {
        note_refusal(&refused, &format_args!("agent connection refused: {why}"))
    });
    for (seq, stream) in (0u64..).zip(listener.incoming()) {
        if tx.is_closed() {
            return;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(err) => {
                log::debug!("agent socket: {err}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        {
            let mut waiting = waiting.lock().unwrap_or_else(|e| e.into_inner());
            if waiting.len() >= MAX_HANDSHAKES
                && let Some((_, oldest)) = waiting.pop_front()
            {
                // Its thread's read ends at once; it counts the refusal.
                let _ = oldest.shutdown(std::net::Shutdown::Both);
            }
            match stream.try_clone() {
                Ok(clone) => waiting.push_back((seq, clone)),
                Err(err) => {
                    refuse(&err);
                    continue;
                }
            }
        }
        let (tx, waiting, refused) = (tx.clone(), Arc::clone(&waiting), Arc::clone(&refuse));
        let spawned = std::thread::Builder::new().name("pftrace-agent-hello".into()).spawn(move || {
            let result = AgentConn::handshake(stream);
            waiting.lock().unwrap_or_else(|e| e.into_inner()).retain(|(s, _)| *s != seq);
            match result {
                Ok(conn) => {
                    let _ = tx.send(conn);
                }
                Err(err) => refused(&err),
            }
        });
        if let Err(err) = spawned {
            refuse(&err);
        }
    }
}

/// Counts a connection to the agent socket refused, and says why in a
/// warning the first time (the socket is every user's: a warning for each
/// would let any of them flood pftraced's log).
fn note_refusal(refused: &AtomicU64, why: &dyn std::fmt::Display) {
    if refused.fetch_add(1, Ordering::Relaxed) == 0 {
        log::warn!(
            "{}",
            printable(&format!(
                "{why}; further refused connections to the agent socket are counted \
                 (bounds.agent_connections_refused in status)"
            ))
        );
    } else {
        log::debug!("{}", printable(&why.to_string()));
    }
}

/// One agent's link: how to report and the names, then every change, until
/// told to stop or the daemon forgets it (the connection then closes, and
/// the agent removes its hooks).
fn serve_agent(
    mut conn: AgentConn,
    road: Report,
    names: Vec<String>,
    configured: std_mpsc::Sender<Result<u32, String>>,
    ready: Arc<Mutex<HashSet<u32>>>,
    rx: std_mpsc::Receiver<ToAgent>,
    refused: &AtomicU64,
) {
    let pid = conn.pid;
    match conn.configure(road, &names) {
        Ok(generation) => {
            log::debug!(
                "agent of pid {pid}: names in force (generation {generation}), reports by {}",
                road.as_str()
            );
            ready.lock().unwrap_or_else(|e| e.into_inner()).insert(pid);
            let _ = configured.send(Ok(generation));
        }
        Err(err) => {
            note_refusal(refused, &err);
            let _ = configured.send(Err(err.to_string()));
            return;
        }
    }
    for msg in rx {
        match msg {
            ToAgent::Names(names, reply) => {
                let _ = reply.send(conn.set_names(&names).map_err(|e| e.to_string()));
            }
            ToAgent::Stop(done) => {
                if conn.stop().is_ok()
                    && let Some(done) = done
                {
                    conn.wait_closed(super::batchstop::GRACE);
                    let _ = done.send(());
                }
                return;
            }
        }
    }
}

/// Creates `dir` (root's, 0755) if missing; refuses one that is not a
/// directory owned by this user and writable by no one else.
fn root_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    if std::fs::symlink_metadata(dir).is_err() {
        std::fs::DirBuilder::new().mode(0o755).create(dir)?;
    }
    let meta = std::fs::symlink_metadata(dir)?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if !meta.is_dir() || meta.uid() != me || meta.mode() & 0o022 != 0 {
        return Err(std::io::Error::other("not a directory of pftraced's user alone (owner, mode 0755)"));
    }
    Ok(())
}

/// The warning for a process started with the agent on its path that has
/// not loaded it within [`CONNECT_TIMEOUT`].
fn never_loaded(pid: u32, binary: &str) -> String {
    format!(
        "pid {pid} ({binary}) was started with pftrace's agent on its path but has not loaded it within \
         {CONNECT_TIMEOUT:?}, so none of its calls are traced: it may run Python with -E, -I or -S (they skip \
         PYTHONPATH or site; a wrapper script's command line can hide them), or PYTHONPATH was cleared on the way; \
         the agent says why it declined on the process's stderr, in lines starting with \"pftrace:\""
    )
}
