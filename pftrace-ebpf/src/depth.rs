//! Per-thread depth of the Python calls the USDT programs saw enter, so a
//! return that closes a seen entry whose name did not match is dropped
//! without reading its name from the traced process (issue 13: that one
//! read is ~230 ns of a ~360 ns unmatched hit, and in sparse mode nearly
//! every return closes an unmatched call).
//!
//! Exact only where entries and returns pair one to one: CPython 3.6-3.10
//! (sites without a frame spec). 3.15 sites keep the reading path: there a
//! generator's creation fires an entry with no return, and the `__init__`
//! shim a return with no entry, and telling those apart needs the frame,
//! read from user memory, which is what this saves.
//!
//! What keeps the depth from running ahead of the truth (ahead, a return
//! of a matched call begun before the thread was seen would be dropped;
//! behind only costs reads): return sites go live before entry sites at
//! attach (bpf/loader.rs `usdt_job`); a thread is counted from its first
//! seen entry on, so returns of calls begun earlier find depth 0 and are
//! read; the depth never goes below 0; a new attachment (a number in the
//! attach cookie) starts the thread over; an exec, an exit and a fork's
//! child tid forget it (the exec/exit/fork programs).

use aya_ebpf::{helpers::bpf_get_current_pid_tgid, macros::map, maps::HashMap};
use pftrace_common::{COOKIE_ATTACHMENT_SHIFT, MAX_THREAD_DEPTHS, ThreadDepth, counter};

use crate::bump;

/// By kernel tid (the host's numbering: unique whatever pftraced's PID
/// namespace). Entries are made at a thread's first seen entry hit and
/// removed at its exit, at its exec, and at a fork making its tid.
#[map]
static THREAD_DEPTHS: HashMap<u32, ThreadDepth> = HashMap::with_max_entries(MAX_THREAD_DEPTHS, 0);

/// The most levels whose verdict is kept (bits of `ThreadDepth::open`);
/// returns from deeper levels are read.
const LEVELS: u32 = 64;

const BPF_NOEXIST: u64 = 1;

/// The attachment number in an attach cookie.
#[inline(always)]
pub fn attachment(cookie: u64) -> u32 {
    (cookie >> COOKIE_ATTACHMENT_SHIFT) as u32
}

/// An entry's level in its thread's state, for [`entry_unmatched`]. Not
/// an Option: the verifier refused the spill of a None's undefined payload.
#[derive(Clone, Copy)]
pub struct Opened {
    /// Null: no state (a site without pairing, or the map was full).
    state: *mut ThreadDepth,
    level: u32,
}

impl Opened {
    pub const NONE: Self = Self { state: core::ptr::null_mut(), level: 0 };
}

/// An entry hit: one level deeper, counted as matched until
/// [`entry_unmatched`] says otherwise (so an entry whose name could not be
/// read has its return read). [`Opened::NONE`] when the map is full (counted).
#[inline(always)]
pub fn enter(attachment: u32) -> Opened {
    let tid = bpf_get_current_pid_tgid() as u32;
    let state = match THREAD_DEPTHS.get_ptr_mut(&tid) {
        Some(p) => p,
        None => {
            let fresh = ThreadDepth { open: 0, depth: 0, attachment };
            if THREAD_DEPTHS.insert(&tid, &fresh, BPF_NOEXIST).is_err() {
                bump(counter::THREAD_DEPTHS_FULL);
                return Opened::NONE;
            }
            match THREAD_DEPTHS.get_ptr_mut(&tid) {
                Some(p) => p,
                None => return Opened::NONE,
            }
        }
    };
    // SAFETY: a map value of this thread, valid for this run; only this
    // thread's own programs write it (a thread runs one probe at a time).
    unsafe {
        if (*state).attachment != attachment {
            *state = ThreadDepth { open: 0, depth: 0, attachment };
        }
        let level = (*state).depth.saturating_add(1);
        (*state).depth = level;
        if level < LEVELS {
            (*state).open |= 1 << level;
        }
        Opened { state, level }
    }
}

/// The entry `opened` did not match: its return may be dropped unread.
#[inline(always)]
pub fn entry_unmatched(opened: Opened) {
    if !opened.state.is_null() && opened.level < LEVELS {
        // SAFETY: as in [`enter`].
        unsafe { (*opened.state).open &= !(1 << opened.level) };
    }
}

/// A return hit: true when it closes an entry seen on this thread whose
/// name did not match (drop it unread, counted); false when its name must
/// be read: a matched (or unread) entry's, one from deeper than 63
/// levels, or one whose entry came before the thread was seen.
#[inline(always)]
pub fn leave_unmatched(attachment: u32) -> bool {
    let tid = bpf_get_current_pid_tgid() as u32;
    let Some(state) = THREAD_DEPTHS.get_ptr_mut(&tid) else {
        return false;
    };
    // SAFETY: as in [`enter`].
    unsafe {
        if (*state).attachment != attachment {
            *state = ThreadDepth { open: 0, depth: 0, attachment };
            return false;
        }
        let level = (*state).depth;
        if level == 0 {
            return false;
        }
        (*state).depth = level - 1;
        if level >= LEVELS {
            return false;
        }
        let bit = 1u64 << level;
        let open = (*state).open;
        if open & bit != 0 {
            (*state).open = open & !bit;
            return false;
        }
    }
    bump(counter::RETURNS_SKIPPED);
    true
}

/// Forgets thread `tid` (kernel numbering): it exited, exec'd, or is a
/// new thread whose tid an earlier thread may have left behind.
#[inline(always)]
pub fn forget(tid: u32) {
    let _ = THREAD_DEPTHS.remove(&tid);
}
