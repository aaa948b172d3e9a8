//! Per-thread depth of the Python calls the USDT programs saw enter, so a
//! return that closes a seen entry is decided without reading its name from
//! the traced process (issue 13: that one read is ~230 ns of a ~360 ns
//! hit): dropped when the entry did not match (in sparse mode nearly every
//! return), sent with its name and file arguments' addresses only when the
//! entry matched and was sent (in dense mode nearly every return; user
//! space pairs it with that entry by the addresses and names it from there).
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
//!
//! A level's bit says "this entry matched and its record went out" and
//! nothing else: an entry the kernel could not decide alone (its name or
//! another argument could not be read, or only a glob prefix matched it,
//! whose rest user space checks on the record's name) makes its thread
//! start over at depth 0 ([`start_over`]), so that entry's return and every
//! return below it come at depth 0 and are read as before. Starting over
//! rather than keeping a third state per level: the word has 16 bits for
//! 16 levels, and these entries are rare (a read error) or already paid a
//! record (a glob's match), so the reads it costs after them are few.
//!
//! The state is one word per slot of a direct-mapped array (slot = tid mod
//! 65,536), not a hash by tid: the hash's lookup and update cost ~90 ns a
//! hit here (bpf_stats, stops before and after the step, sparse, 4 rounds),
//! which ate the saved read; an array's lookup the verifier inlines. A word
//! holds its thread's tid, so a thread finding another's word (two tids
//! sharing a slot) starts over at depth 0 or, at a return, reads the name:
//! a thread only ever writes words of its own tid, whole, so a word is
//! never a mix of two threads' states, and a lost word only costs reads.

use aya_ebpf::{helpers::bpf_get_current_pid_tgid, macros::map, maps::Array};
use pftrace_common::{COOKIE_ATTACHMENT_SHIFT, MAX_THREAD_DEPTHS, counter};

use crate::bump;

/// One word per slot: tid << 32 | attachment (8 bits) << 24 | depth
/// (8 bits) << 16 | open (16 bits: bit d set while the open entry at
/// level d < 16 matched and was sent). 0: empty.
#[map]
static THREAD_DEPTHS: Array<u64> = Array::with_max_entries(MAX_THREAD_DEPTHS, 0);

/// Levels whose verdict is kept (bits of the word's `open`); returns from
/// deeper levels are read.
const LEVELS: u64 = 16;
/// The most levels counted; an entry past it starts the thread over (its
/// returns from there up are read).
const MAX_DEPTH: u64 = 255;

#[inline(always)]
fn word(tid: u32, attachment: u64, depth: u64, open: u64) -> u64 {
    ((tid as u64) << 32) | (attachment << 24) | (depth << 16) | (open & 0xffff)
}

/// The attachment number in an attach cookie (its low 8 bits are kept).
#[inline(always)]
pub fn attachment(cookie: u64) -> u64 {
    (cookie >> COOKIE_ATTACHMENT_SHIFT) & 0xff
}

/// An entry's place in its thread's word, for [`entry_unmatched`] and
/// [`start_over`]. Not an Option: the verifier refused the spill of a
/// None's undefined payload.
#[derive(Clone, Copy)]
pub struct Opened {
    /// Null: nothing to mark (a site without pairing, or a level past LEVELS).
    slot: *mut u64,
    tid: u32,
    attachment: u64,
    level: u64,
}

impl Opened {
    pub const NONE: Self = Self { slot: core::ptr::null_mut(), tid: 0, attachment: 0, level: 0 };
}

/// An entry hit: one level deeper, its bit set (matched) until
/// [`entry_unmatched`] or [`start_over`] says otherwise; the program says
/// one of them before it ends unless the entry matched and was sent.
#[inline(always)]
pub fn enter(attachment: u64) -> Opened {
    let tid = bpf_get_current_pid_tgid() as u32;
    let Some(slot) = THREAD_DEPTHS.get_ptr_mut(tid & (MAX_THREAD_DEPTHS - 1)) else {
        return Opened::NONE;
    };
    // SAFETY: a valid, aligned map value; read and written whole.
    let w = unsafe { core::ptr::read_volatile(slot) };
    let (mut depth, mut open) = (0, 0);
    if (w >> 32) as u32 == tid && (w >> 24) & 0xff == attachment {
        depth = (w >> 16) & 0xff;
        open = w & 0xffff;
    } else if w != 0 && (w >> 32) as u32 != tid {
        bump(counter::THREAD_DEPTHS_FULL);
    }
    if depth >= MAX_DEPTH {
        // Start over: this entry is not counted, its return comes at depth 0.
        unsafe { core::ptr::write_volatile(slot, word(tid, attachment, 0, 0)) };
        return Opened::NONE;
    }
    depth += 1;
    if depth < LEVELS {
        open |= 1 << depth;
    }
    unsafe { core::ptr::write_volatile(slot, word(tid, attachment, depth, open)) };
    if depth < LEVELS { Opened { slot, tid, attachment, level: depth } } else { Opened::NONE }
}

/// The entry `opened` did not match: its return may be dropped unread.
#[inline(always)]
pub fn entry_unmatched(opened: Opened) {
    if opened.slot.is_null() {
        return;
    }
    // SAFETY: as in [`enter`]. Only if the word is still this thread's.
    unsafe {
        let w = core::ptr::read_volatile(opened.slot);
        if (w >> 32) as u32 == opened.tid {
            core::ptr::write_volatile(opened.slot, w & !(1u64 << opened.level));
        }
    }
}

/// The entry `opened` could not be decided by the kernel alone (an
/// argument could not be read, its record not written, or a glob prefix
/// matched it): its thread starts over at depth 0, so this entry's return
/// and those of the levels below it are read (see the module's comment).
#[inline(always)]
pub fn start_over(opened: Opened) {
    if opened.slot.is_null() {
        return;
    }
    // SAFETY: as in [`enter`]. Only if the word is still this thread's.
    unsafe {
        let w = core::ptr::read_volatile(opened.slot);
        if (w >> 32) as u32 == opened.tid {
            core::ptr::write_volatile(opened.slot, word(opened.tid, opened.attachment, 0, 0));
        }
    }
}

/// What the kernel knows of the entry a return closes ([`leave`]).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Closing {
    /// An entry seen on this thread whose name did not match: drop the
    /// return unread (counted in RETURNS_SKIPPED).
    Unmatched,
    /// An entry seen on this thread that matched and was sent: send the
    /// return without reading its name (its addresses pair it).
    Matched,
    /// Nothing known: read the name. A return from level 16 or deeper, one
    /// whose entry came before the thread was seen (or before it started
    /// over), or a thread whose word another took.
    Unknown,
}

/// A return hit: closes the innermost level of this thread's word (one
/// level up) and says what was known of its entry.
#[inline(always)]
pub fn leave(attachment: u64) -> Closing {
    let tid = bpf_get_current_pid_tgid() as u32;
    let Some(slot) = THREAD_DEPTHS.get_ptr_mut(tid & (MAX_THREAD_DEPTHS - 1)) else {
        return Closing::Unknown;
    };
    // SAFETY: as in [`enter`].
    let w = unsafe { core::ptr::read_volatile(slot) };
    if (w >> 32) as u32 != tid || (w >> 24) & 0xff != attachment {
        return Closing::Unknown;
    }
    let depth = (w >> 16) & 0xff;
    if depth == 0 {
        return Closing::Unknown;
    }
    let mut open = w & 0xffff;
    let closing = if depth >= LEVELS {
        Closing::Unknown
    } else if open & (1 << depth) != 0 {
        Closing::Matched
    } else {
        Closing::Unmatched
    };
    if depth < LEVELS {
        open &= !(1 << depth);
    }
    unsafe { core::ptr::write_volatile(slot, word(tid, attachment, depth - 1, open)) };
    if closing == Closing::Unmatched {
        bump(counter::RETURNS_SKIPPED);
    }
    closing
}

/// Forgets thread `tid` (kernel numbering): it exited, exec'd, or is a
/// new thread whose tid an earlier thread may have left behind.
#[inline(always)]
pub fn forget(tid: u32) {
    if let Some(slot) = THREAD_DEPTHS.get_ptr_mut(tid & (MAX_THREAD_DEPTHS - 1)) {
        // SAFETY: as in [`enter`].
        unsafe {
            if (core::ptr::read_volatile(slot) >> 32) as u32 == tid {
                core::ptr::write_volatile(slot, 0);
            }
        }
    }
}
