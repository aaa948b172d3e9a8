//! Reporting a matched event to the kernel, where a BPF program stamps it
//! with the kernel's clock, the thread's CPU time and the process's RSS and
//! puts it on pftraced's ring buffer. Two roads, chosen by pftraced from
//! those the agent offers in its hello (the uprobe unless pftraced runs with
//! `--agent-report syscall`: the syscall road costs every syscall of the host):
//!
//! - the syscall `pftrace_common::agent::SYSCALL_NR` (no such syscall: the
//!   kernel answers -ENOSYS) with the report in its argument registers,
//!   read by pftraced's raw tracepoint on sys_enter: 103 ns a report with an
//!   empty program, against 270 ns for the uprobe (agent-bench --raw, same
//!   sitting, one CPU). Offered only when the process has no seccomp filter
//!   (a filter may refuse an unknown syscall before the tracepoint, or kill
//!   the process for it); a report that does not come back -ENOSYS (a
//!   filter installed later) moves this process to the uprobe for good;
//! - `pftrace_agent_probe`, an exported function that is a 5-byte nop and
//!   `ret`, with a uprobe on it (on this kernel a uprobe on a nop5 is turned
//!   into a call to a trampoline: 264-294 ns a hit, against 540-574 ns on a
//!   1-byte nop and 3.9 us on other instructions; FIELD-NOTES). pftraced
//!   attaches it whenever the agent is in use: the fallback road.
//!
//! With no uprobe attached the probe function costs a call and a nop.
//!
//! Strings once per code object: each traced code object has a serial
//! (`CodeInfo::serial`, never reused, unlike its address) that every report
//! carries; only its first report in an agent session carries its name and
//! file (the kernel then writes the long record), later ones none (a 48-byte
//! record, no string reads). A session begins at each connection to a
//! pftraced and in a forked child (a new pid to pftraced), so a restarted
//! pftraced gets every name again. pftraced keeps per process at most
//! `agent::MAX_CODES` serials' strings; past that many code objects in a
//! session the agent sends the strings with every report, so no call goes
//! unnamed. Reports hold the GIL, so a code object's first report is on the
//! ring before any other thread's later ones.

use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};

use pftrace_common::agent;

use crate::verdict::CodeInfo;

/// 0: off; 1: uprobe; 2: syscall.
static MODE: AtomicU8 = AtomicU8::new(0);
pub const OFF: u8 = 0;
pub const UPROBE: u8 = 1;
pub const SYSCALL: u8 = 2;

pub fn set_mode(mode: u8) {
    MODE.store(mode, Ordering::Release);
}

/// This daemon's token, put in r9 of the report syscall.
static TOKEN: AtomicU64 = AtomicU64::new(0);

/// Reports from now on as pftraced said.
pub fn set_road(road: crate::protocol::Report) {
    use crate::protocol::Report;
    match road {
        Report::Uprobe => set_mode(UPROBE),
        Report::Syscall(token) => {
            TOKEN.store(token, Ordering::Relaxed);
            set_mode(SYSCALL)
        }
        Report::None => set_mode(OFF),
    }
}

/// The road reports take now (the syscall's may have gone over to the uprobe).
pub fn road() -> &'static str {
    match MODE.load(Ordering::Relaxed) {
        UPROBE => "uprobe",
        SYSCALL => "syscall",
        _ => "none",
    }
}

/// The probe site: `nopl 0x0(%rax,%rax,1)` (0f 1f 44 00 00), the nop5 the
/// kernel optimises, then `ret`. Arguments: event, name, file, line, code id
/// (rdi, rsi, rdx, rcx, r8; name null: no strings, see
/// pftrace_common::agent::PROBE_SYMBOL). Naked, so nothing moves the
/// arguments or the nop.
#[unsafe(naked)]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pftrace_agent_probe(
    _event: u64,
    _name: *const u8,
    _file: *const u8,
    _line: u64,
    _code: u64,
) {
    core::arch::naked_asm!(".byte 0x0f, 0x1f, 0x44, 0x00, 0x00", "ret")
}

/// The same with a 1-byte nop (what CPython's USDT sites are): kept only to
/// measure the difference on the running kernel (`agent-bench --nop1`).
#[unsafe(naked)]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pftrace_agent_probe_nop1(
    _event: u64,
    _name: *const u8,
    _file: *const u8,
    _line: u64,
    _code: u64,
) {
    core::arch::naked_asm!("nop", "ret")
}

/// Which probe function UPROBE mode calls (the nop1 one for that measurement).
static USE_NOP1: AtomicU8 = AtomicU8::new(0);

pub fn use_nop1(on: bool) {
    USE_NOP1.store(on as u8, Ordering::Relaxed);
}

/// Reports one event of a traced code object.
#[inline]
pub fn report(event: u8, info: &CodeInfo) {
    let mode = MODE.load(Ordering::Relaxed);
    if mode == OFF {
        return;
    }
    let code = info.serial;
    let sent =
        info.sent.get() == SESSION.load(Ordering::Relaxed) && ALWAYS_STRINGS.load(Ordering::Relaxed) == 0;
    if crate::batch::on() {
        // The batched road: every event of a code object whose strings
        // pftraced has goes in the thread's buffer (a code object's first
        // report carries them, so it goes by the kernel).
        if sent {
            // At most a drain before the entry and the append after it; a
            // third round (a new session begun by another thread between
            // them) goes the two-report way below, never lost.
            for _ in 0..3 {
                match crate::batch::append(event, code, info.line) {
                    crate::batch::Appended::Kept => return,
                    crate::batch::Appended::Drain(event, buf) => {
                        send(mode, event, buf, std::ptr::null(), 0, 0);
                        crate::batch::drained();
                        return;
                    }
                    crate::batch::Appended::DrainFirst(drain, buf) => {
                        // The entry is stamped after this drain (see DrainFirst).
                        send(mode, drain, buf, std::ptr::null(), 0, 0);
                        crate::batch::drained();
                    }
                    crate::batch::Appended::NoSlot => break,
                }
            }
        }
        // Events this thread buffered before this report reach pftraced
        // before it: one thread's events stay in its order on the ring.
        if let Some((event, buf)) = crate::batch::pending() {
            send(mode, event, buf, std::ptr::null(), 0, 0);
            crate::batch::drained();
        }
    } else if crate::onecall::on() {
        // Prototype (agent-bench): one report a call.
        match crate::onecall::decide(event, code, sent) {
            crate::onecall::Action::Kept => return,
            crate::onecall::Action::Call(c) => {
                send(mode, c.event, c.ts as *const u8, c.cpu as *const u8, info.line as u64, code);
                return;
            }
            crate::onecall::Action::Old => {}
        }
    }
    let (name, file, event) = if info.sent.get() == SESSION.load(Ordering::Relaxed)
        && ALWAYS_STRINGS.load(Ordering::Relaxed) == 0
    {
        (std::ptr::null(), std::ptr::null(), event as u64)
    } else {
        with_strings(event, info)
    };
    send(mode, event, name, file, info.line as u64, code);
}

/// One report by the road in use.
#[inline]
fn send(mode: u8, event: u64, name: *const u8, file: *const u8, line: u64, code: u64) {
    if mode == SYSCALL {
        let token = TOKEN.load(Ordering::Relaxed);
        if report_syscall(event, name, file, line, code, token) == -(libc::ENOSYS as i64) {
            return;
        }
        // Not the kernel's answer to an unknown syscall: a seccomp filter
        // took it before the tracepoint. This report goes by the uprobe,
        // and so does every later one of this process.
        let _ = MODE.compare_exchange(SYSCALL, UPROBE, Ordering::Relaxed, Ordering::Relaxed);
    }
    // SAFETY: the probe functions do nothing but return.
    unsafe {
        if USE_NOP1.load(Ordering::Relaxed) == 0 {
            pftrace_agent_probe(event, name, file, line, code)
        } else {
            pftrace_agent_probe_nop1(event, name, file, line, code)
        }
    }
}

/// The session: bumped at every connection to a pftraced and in a forked
/// child; a CodeInfo whose `sent` is not this has not sent its strings in it.
static SESSION: AtomicU32 = AtomicU32::new(1);
/// Code objects that sent their strings in this session (pftraced keeps at
/// most agent::MAX_CODES of them per process).
static SENT: AtomicU32 = AtomicU32::new(0);

/// A new session: every code object sends its strings again with its next
/// report. The GIL is held (no report runs meanwhile).
pub fn new_session() {
    let next = SESSION.load(Ordering::Relaxed).wrapping_add(1).max(1);
    SESSION.store(next, Ordering::Relaxed);
    SENT.store(0, Ordering::Relaxed);
}

/// The report's strings and event argument for a code object's first
/// report in this session (the session's very first one is marked, so
/// pftraced forgets any strings of this pid's earlier sessions).
#[cold]
fn with_strings(event: u8, info: &CodeInfo) -> (*const u8, *const u8, u64) {
    let sent = SENT.load(Ordering::Relaxed);
    let mut event = event as u64;
    if sent == 0 {
        event |= agent::NEW_SESSION;
    }
    // Past the cap pftraced keeps no more strings: this code object sends
    // them every time.
    if sent < agent::MAX_CODES {
        SENT.store(sent + 1, Ordering::Relaxed);
        info.sent.set(SESSION.load(Ordering::Relaxed));
    }
    (info.name.as_ptr() as *const u8, info.file.as_ptr() as *const u8, event)
}

/// The syscall report (pftrace_common::agent::SYSCALL_NR): rdi = event,
/// rsi = name, rdx = file, r10 = line, r8 = code id, r9 = pftraced's token.
/// Returns the kernel's
/// answer, -ENOSYS unless a seccomp filter answered instead.
#[inline(always)]
pub fn report_syscall(event: u64, name: *const u8, file: *const u8, line: u64, code: u64, token: u64) -> i64 {
    let rc: i64;
    // SAFETY: an unknown syscall number: the kernel changes nothing but rax
    // (and rcx, r11, which the syscall instruction clobbers).
    unsafe {
        core::arch::asm!(
            "syscall",
            inlateout("rax") pftrace_common::agent::SYSCALL_NR as i64 => rc,
            in("rdi") event,
            in("rsi") name,
            in("rdx") file,
            in("r10") line,
            in("r8") code,
            in("r9") token,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack, preserves_flags)
        );
    }
    rc
}

/// Whether this process may report through the syscall: no seccomp filter
/// on it (`Seccomp:` 0 in /proc/self/status and in the calling thread's).
/// A filter could refuse the unknown syscall before pftraced sees it, or
/// kill the process for it (systemd's SystemCallFilter= does by default).
/// `PFTRACE_AGENT_REPORT=uprobe` keeps the agent on the uprobe (tests).
pub fn syscall_possible() -> bool {
    if std::env::var_os("PFTRACE_AGENT_REPORT").is_some_and(|v| v == "uprobe") {
        return false;
    }
    let unfiltered = |path: &str| -> bool {
        use std::io::Read as _;
        let mut text = String::new();
        let Ok(f) = std::fs::File::open(path) else { return false };
        if f.take(16 * 1024).read_to_string(&mut text).is_err() {
            return false;
        }
        text.lines().any(|l| l.strip_prefix("Seccomp:").is_some_and(|v| v.trim() == "0"))
    };
    unfiltered("/proc/self/status") && unfiltered("/proc/thread-self/status")
}

/// Every report carries the strings (agent-bench only: the cost of strings
/// on every report, measured in the same run).
static ALWAYS_STRINGS: AtomicU8 = AtomicU8::new(0);

pub fn always_strings(on: bool) {
    ALWAYS_STRINGS.store(on as u8, Ordering::Relaxed);
}

/// In a forked child: map the probe functions' code pages afresh from the
/// file. The kernel optimises a hit nop5 uprobe by rewriting the nop into a
/// call to a trampoline page of the process; fork copies the rewritten code
/// page but not the trampoline, and the child's next report jumped into
/// unmapped memory (SIGSEGV at the trampoline's address, seen on 6.18 with
/// the fork test). A fresh private mapping of the same file page has the
/// original bytes, and the kernel puts its breakpoint back in (the uprobe is
/// attached to the file), so the child reports like its parent.
pub fn remap_probe_pages() -> Result<(), String> {
    let mut pages: Vec<usize> =
        [pftrace_agent_probe as *const () as usize, pftrace_agent_probe_nop1 as *const () as usize]
            .iter()
            .map(|a| a & !(page_size() - 1))
            .collect();
    pages.dedup();
    let maps = std::fs::read_to_string("/proc/self/maps").map_err(|e| format!("/proc/self/maps: {e}"))?;
    for page in pages {
        let (start, offset, path) = maps
            .lines()
            .find_map(|l| {
                let mut f = l.split_whitespace();
                let (a, b) = f.next()?.split_once('-')?;
                let (a, b) = (usize::from_str_radix(a, 16).ok()?, usize::from_str_radix(b, 16).ok()?);
                let perms = f.next()?;
                let off = usize::from_str_radix(f.next()?, 16).ok()?;
                let path = f.nth(2)?;
                (page >= a && page < b && perms.contains('x')).then(|| (a, off, path.to_string()))
            })
            .ok_or("the probe's page is not in /proc/self/maps")?;
        let c = std::ffi::CString::new(path.clone()).map_err(|_| "path")?;
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(format!("{path}: {}", std::io::Error::last_os_error()));
        }
        let p = unsafe {
            libc::mmap(
                page as *mut libc::c_void,
                page_size(),
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_FIXED,
                fd,
                (offset + (page - start)) as libc::off_t,
            )
        };
        let err = std::io::Error::last_os_error();
        unsafe { libc::close(fd) };
        if p == libc::MAP_FAILED {
            return Err(format!("remapping the probe page of {path}: {err}"));
        }
    }
    Ok(())
}

fn page_size() -> usize {
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}
