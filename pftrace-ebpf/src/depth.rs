//! Per-thread window of the innermost Python calls the USDT programs saw
//! enter, so a return that closes a seen entry is decided without reading
//! its name from the traced process (issue 13: that one read is ~230 ns of
//! a ~360 ns hit): dropped when the entry did not match (in sparse mode
//! nearly every return), sent with its name and file arguments' addresses
//! only when the entry matched and was sent (in dense mode nearly every
//! return; user space pairs it with that entry by the addresses and names
//! it from there).
//!
//! The window follows the current depth: it knows the verdicts of the
//! innermost open levels the thread was seen to enter, up to [`WINDOW`]
//! (44) of them, wherever they are. Levels counted from where a thread was
//! first seen kept only levels 1-15, so 16 levels or more below a thread's
//! first Python call every return was read again, and real programs (a web
//! framework, a test runner, a driver calling a solver) do their work 20-60
//! levels down: with the bench's loop 61 frames deep (`--depth 60`), sparse
//! hits cost 314.4 ns/run here against 454.3 (bpf_stats, 6 rounds, lower in
//! 6 of 6), and the step itself the same as before (148.5 against 151.5
//! with the hit stopped after it, lower in 3 of 6).
//!
//! Exact only where entries and returns pair one to one: CPython 3.6-3.10
//! (sites without a frame spec). 3.15 sites keep the reading path: there a
//! generator's creation fires an entry with no return, and the `__init__`
//! shim a return with no entry, and telling those apart needs the frame,
//! read from user memory, which is what this saves.
//!
//! What keeps the window from running ahead of the truth (ahead, a return
//! of a matched call would be dropped; behind only costs reads): `valid`
//! counts only entries seen whose returns have not come, so a return that
//! finds it 0 (a call begun before the thread was seen, or one whose level
//! fell out of the window) is read; return sites go live before entry
//! sites at attach (bpf/loader.rs `usdt_job`); a new attachment (a number
//! in the attach cookie) starts the thread over; an exec, an exit and a
//! fork's child tid forget it (the exec/exit/fork programs).
//!
//! A level's bit says "this entry matched and its record went out" and
//! nothing else: an entry the kernel could not decide alone (its name or
//! another argument could not be read, its record not written, or only a
//! glob prefix matched it, whose rest user space checks on the record's
//! name) makes its thread start over with nothing known ([`start_over`]),
//! so that entry's return and every return below it are read as before.
//! Starting over rather than keeping a third state per level: the window
//! has one bit per level, and these entries are rare (a read error) or
//! already paid a record (a glob's match), so the reads they cost are few.
//!
//! Each known level also keeps its entry's name address (a ring of
//! [`WINDOW`] addresses per thread, [`THREAD_NAMES`]), and a return is
//! decided only when its own name address (a register: no read) is the one
//! its innermost known level holds. Without it, stack switching the probes
//! do not see broke the window: greenlet (gevent, eventlet) switches
//! between Python stacks on one thread with no return or entry fired, so a
//! thread's returns stop closing the levels its last entries opened. A
//! greenlet whose traced call switched mid-call to one running untraced
//! code had each traced return dropped as that code's, and each of that
//! code's returns sent as the traced call's (CPython 3.9 with greenlet
//! 3.2.5, 100 such calls: 100 incomplete calls and 100 returns without an
//! entry in the trace; tests/it/greenlets.rs). With the check, a return whose
//! address differs is read and its thread starts over (counter
//! `window_mismatches`). Equal addresses decide rightly even when the level
//! is another greenlet's: a verdict depends only on the name's bytes, and
//! an address held by an open level is a string that is still alive (its
//! frame, suspended or running, holds its code object), so it is the same
//! string.
//!
//! The state is one word per slot of a direct-mapped array (slot = tid mod
//! 65,536), not a hash by tid: the hash's lookup and update cost ~90 ns a
//! hit here (bpf_stats, stops before and after the step, sparse, 4 rounds),
//! which ate the saved read; an array's lookup the verifier inlines. The
//! word keeps the rest of its thread's tid (the tag: tid >> 16), so a
//! thread finding another's word (two tids sharing a slot) starts over or,
//! at a return, reads the name: a thread only ever writes words with its own
//! tag, whole, so a word is never a mix of two threads' states, and a lost
//! word only costs reads. Slot and tag together are the whole tid, so two
//! live threads never share both: a tid is below 2^22 (the kernel's
//! PID_MAX_LIMIT on 64-bit, include/linux/threads.h: pid_max cannot be set
//! above 4 Mi; 32,768 here), its low 16 bits pick the slot and its high 6
//! are the tag; a thread sharing slot and tag has the same tid, i.e. is the
//! same thread, or a later one after the exit program forgot the first.
//! A tid at or past 2^22 (none can be) would not fit the tag: its returns
//! are read.

use aya_ebpf::{macros::map, maps::Array};
use pftrace_common::{COOKIE_ATTACHMENT_SHIFT, MAX_THREAD_DEPTHS, MAX_THREAD_NAME_RINGS, counter};

use crate::bump;

/// One word per slot: tag (6 bits: tid >> 16) << 58 | attachment (8 bits)
/// << 50 | valid (6 bits) << 44 | open (44 bits: bit 0 the innermost open
/// level, 1 while its entry matched and was sent; `valid` of them known). 0: empty (the same as a thread of tag 0 with nothing known).
#[map]
static THREAD_DEPTHS: Array<u64> = Array::with_max_entries(MAX_THREAD_DEPTHS, 0);

/// One thread's ring of the name addresses of its known levels: `owner_top`
/// is the owning tid << 32 | the innermost level's index in `names`. A row
/// serves the threads whose tids are equal mod MAX_THREAD_NAME_RINGS (5.6
/// MiB of kernel memory at 16,384 rows of 360 bytes; 65,536 rows, as many
/// as the words, would take 22.5 MiB): a thread finding another's tid there
/// takes the row and starts over, and a return finding it taken is read, so
/// a shared row only costs reads.
#[repr(C)]
pub struct NameRing {
    owner_top: u64,
    names: [u64; WINDOW as usize],
}

#[map]
static THREAD_NAMES: Array<NameRing> = Array::with_max_entries(MAX_THREAD_NAME_RINGS, 0);

/// Bits of a tid that pick its slot; the rest are the word's tag.
const SLOT_BITS: u32 = 16;
const _: () = assert!(MAX_THREAD_DEPTHS == 1 << SLOT_BITS);
/// Tids are below this (PID_MAX_LIMIT, 4 Mi, on 64-bit kernels).
const TID_LIMIT: u32 = 1 << 22;
const VALID_SHIFT: u32 = 44;
const HEAD_SHIFT: u32 = 50;
/// The open levels whose verdicts a word holds: all the bits left beside
/// tag, attachment and the 6-bit count (which could count to 63).
const WINDOW: u64 = VALID_SHIFT as u64;
const OPEN_MASK: u64 = (1 << VALID_SHIFT) - 1;
const _: () = assert!(HEAD_SHIFT + 8 + (22 - SLOT_BITS) == 64 && WINDOW < 64);

/// The word's head: tag and attachment, the same in every word this thread
/// writes while the attachment lasts (compared as `word >> HEAD_SHIFT`).
#[inline(always)]
fn head(tid: u32, attachment: u64) -> u64 {
    (((tid >> SLOT_BITS) as u64) << 8) | attachment
}

/// The slot and head of thread `tid` (the hit's, kernel numbering), with
/// its tid, or None: no slot, or a tid past the tag.
#[inline(always)]
fn own_slot(attachment: u64, tid: u32) -> Option<(*mut u64, u64, u32)> {
    if tid >= TID_LIMIT {
        return None;
    }
    let slot = THREAD_DEPTHS.get_ptr_mut(tid & (MAX_THREAD_DEPTHS - 1))?;
    Some((slot, head(tid, attachment), tid))
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
    /// Null: nothing to mark (a site without pairing, or no slot).
    slot: *mut u64,
    /// The word [`enter`] wrote: the entry is its bit 0.
    word: u64,
}

impl Opened {
    pub const NONE: Self = Self { slot: core::ptr::null_mut(), word: 0 };
}

/// An entry hit: a new innermost level, its bit set (matched) until
/// [`entry_unmatched`] or [`start_over`] says otherwise; the program says
/// one of them before it ends unless the entry matched and was sent. With
/// the window full, the outermost known level falls out: its return will
/// be read.
/// `name_ptr` is the entry's name address (its argument as the probe gave
/// it), kept in the thread's ring for the return that closes it.
#[inline(always)]
pub fn enter(attachment: u64, name_ptr: u64, tid: u32) -> Opened {
    let Some((slot, head, tid)) = own_slot(attachment, tid) else {
        return Opened::NONE;
    };
    let Some(ring) = THREAD_NAMES.get_ptr_mut(tid & (MAX_THREAD_NAME_RINGS - 1)) else {
        return Opened::NONE;
    };
    // SAFETY: valid, aligned map values; the word read and written whole.
    let w = unsafe { core::ptr::read_volatile(slot) };
    let owner_top = unsafe { core::ptr::read_volatile(&raw const (*ring).owner_top) };
    let (mut valid, mut open) = (0, 0);
    if w >> HEAD_SHIFT == head && (owner_top >> 32) as u32 == tid {
        valid = (w >> VALID_SHIFT) & 0x3f;
        open = w & OPEN_MASK;
    } else if w != 0 && w >> (HEAD_SHIFT + 8) != head >> 8 {
        bump(counter::THREAD_DEPTHS_FULL);
    }
    if valid < WINDOW {
        valid += 1;
    }
    // The ring's next index: with the window full, the outermost level's.
    let top = owner_top & 0xff;
    let top = if top + 1 >= WINDOW { 0 } else { top + 1 };
    unsafe {
        if let Some(at) = (*ring).names.get_mut(top as usize) {
            core::ptr::write_volatile(at, name_ptr);
        }
        core::ptr::write_volatile(&raw mut (*ring).owner_top, ((tid as u64) << 32) | top);
    }
    let word = (head << HEAD_SHIFT) | (valid << VALID_SHIFT) | (((open << 1) | 1) & OPEN_MASK);
    unsafe { core::ptr::write_volatile(slot, word) };
    Opened { slot, word }
}

/// The entry `opened` did not match: its return may be dropped unread.
/// Between [`enter`] and this only another thread sharing the slot can
/// have written the word (this thread is in this program): then it is left
/// alone, and the entry's return is read.
#[inline(always)]
pub fn entry_unmatched(opened: Opened) {
    if opened.slot.is_null() {
        return;
    }
    // SAFETY: as in [`enter`].
    unsafe {
        if core::ptr::read_volatile(opened.slot) == opened.word {
            core::ptr::write_volatile(opened.slot, opened.word & !1);
        }
    }
}

/// The entry `opened` could not be decided by the kernel alone (an
/// argument could not be read, its record not written, or a glob prefix
/// matched it): its thread starts over with nothing known, so this entry's
/// return and those of the levels below it are read (see the module's
/// comment). As in [`entry_unmatched`], a word another thread took
/// meanwhile is left alone (this thread's returns are then read anyway).
#[inline(always)]
pub fn start_over(opened: Opened) {
    if opened.slot.is_null() {
        return;
    }
    // SAFETY: as in [`enter`].
    unsafe {
        if core::ptr::read_volatile(opened.slot) == opened.word {
            core::ptr::write_volatile(opened.slot, (opened.word >> HEAD_SHIFT) << HEAD_SHIFT);
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
    /// Nothing known: read the name. A return whose entry came before the
    /// thread was seen (or before it started over), one whose level fell
    /// out of the window, or a thread whose word another took.
    Unknown,
}

/// A return hit whose name address is `name_ptr`: closes the innermost
/// known level of this thread's word and says what was known of its entry.
/// A level holding another address (a stack switch, or the ring taken by
/// another thread) decides nothing: the return is read, and the thread
/// starts over.
#[inline(always)]
pub fn leave(attachment: u64, name_ptr: u64, tid: u32) -> Closing {
    let Some((slot, head, tid)) = own_slot(attachment, tid) else {
        return Closing::Unknown;
    };
    // SAFETY: as in [`enter`].
    let w = unsafe { core::ptr::read_volatile(slot) };
    if w >> HEAD_SHIFT != head {
        return Closing::Unknown;
    }
    let valid = (w >> VALID_SHIFT) & 0x3f;
    if valid == 0 {
        return Closing::Unknown;
    }
    let Some(ring) = THREAD_NAMES.get_ptr_mut(tid & (MAX_THREAD_NAME_RINGS - 1)) else {
        return Closing::Unknown;
    };
    let owner_top = unsafe { core::ptr::read_volatile(&raw const (*ring).owner_top) };
    let top = owner_top & 0xff;
    let held = unsafe { (*ring).names.get(top as usize).map(|at| core::ptr::read_volatile(at)) };
    if (owner_top >> 32) as u32 != tid || held != Some(name_ptr) {
        bump(counter::WINDOW_MISMATCHES);
        unsafe { core::ptr::write_volatile(slot, head << HEAD_SHIFT) };
        return Closing::Unknown;
    }
    let below = if top == 0 { WINDOW - 1 } else { top - 1 };
    unsafe { core::ptr::write_volatile(&raw mut (*ring).owner_top, ((tid as u64) << 32) | below) };
    let word = (head << HEAD_SHIFT) | ((valid - 1) << VALID_SHIFT) | ((w & OPEN_MASK) >> 1);
    unsafe { core::ptr::write_volatile(slot, word) };
    if w & 1 != 0 {
        return Closing::Matched;
    }
    bump(counter::RETURNS_SKIPPED);
    Closing::Unmatched
}

/// Forgets thread `tid` (kernel numbering): it exited, exec'd, or is a
/// new thread whose tid an earlier thread may have left behind.
#[inline(always)]
pub fn forget(tid: u32) {
    if let Some(slot) = THREAD_DEPTHS.get_ptr_mut(tid & (MAX_THREAD_DEPTHS - 1)) {
        // SAFETY: as in [`enter`].
        unsafe {
            if core::ptr::read_volatile(slot) >> (HEAD_SHIFT + 8) == (tid >> SLOT_BITS) as u64 {
                core::ptr::write_volatile(slot, 0);
            }
        }
    }
}
