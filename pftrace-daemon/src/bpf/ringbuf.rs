//! The ring buffer of matched calls, read through one mapping of its data
//! pages. aya's `RingBuf` maps the data twice in a row (so a record that
//! wraps past the end reads as one slice), and the kernel inserts every
//! page of a ring-buffer mapping when it is made, so the process's RSS
//! counted the default 16 MiB ring as 32 MiB: 32 of the 55.6 MiB peak of a
//! dense 1 M-call launch. Mapped once, a record that wraps (at most one per
//! lap, as records are written in order) is copied into a buffer here.
//! The protocol is the kernel's (kernel/bpf/ringbuf.c) and libbpf's reader:
//! a consumer position page we write, a producer position page and the
//! data pages we only read; each record has an 8-byte header whose length
//! word carries a busy bit (being written) and a discard bit.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU32, AtomicUsize, Ordering, fence},
};

use aya::{
    maps::{MapData, MapError},
    sys::SyscallError,
};

/// Bits of a record header's length word (uapi linux/bpf.h).
const BUSY_BIT: u32 = 1 << 31;
const DISCARD_BIT: u32 = 1 << 30;
/// Bytes of a record's header (BPF_RINGBUF_HDR_SZ).
const HEADER: usize = 8;
/// Records read are handed back to the kernel (the consumer position
/// stored) once this many bytes of them wait, and whenever the reader stops
/// (nothing ready), not after each record as libbpf does: the producer
/// reads that position at every reserve, so each store moved its cache line
/// between the traced process's CPU and ours, once per record. 64 KiB is
/// 0.4% of the default 16 MiB ring: the room held back is negligible.
const PUBLISH_BYTES: usize = 64 * 1024;
/// Bytes of the next record read ahead of use (a common call record and its
/// 8-byte header: 328 bytes): its first touch was the hottest
/// instruction of decoding (27% of `Decoder::intern`'s samples, the load of
/// the name's first word), as the kernel wrote it on the traced process's CPU.
const PREFETCH_BYTES: usize = 328;

/// One `mmap` of the map, unmapped when dropped.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(fd: BorrowedFd<'_>, len: usize, prot: libc::c_int, offset: usize) -> io::Result<Self> {
        let offset =
            libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: a fresh shared mapping of the map's fd; nothing else aliases it as Rust memory.
        let ptr =
            unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd.as_raw_fd(), offset) };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { ptr: NonNull::new(ptr.cast()).expect("mmap succeeded"), len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped; no borrow of it outlives self.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// The consumer side of a BPF ring buffer map.
pub struct EventRing {
    /// Holds the map's fd open (the mappings and epoll use it).
    map: MapData,
    /// The consumer position page (read-write).
    consumer: Mapping,
    /// The producer position page, then the data pages once (read-only).
    producer: Mapping,
    /// Data bytes (a power of two).
    size: usize,
    /// Our consumer position (bytes ever consumed).
    pos: usize,
    /// The consumer position last stored for the kernel (at most `pos`).
    published: usize,
    /// The producer position last read.
    producer_pos: usize,
    /// The consumer position was stored since the last full barrier (as
    /// aya's and libbpf's readers: the kernel decides wake-ups from it).
    needs_fence: bool,
    /// A record that wraps past the end of the data, copied whole.
    wrapped: Vec<u8>,
}

// SAFETY: the mappings belong to this value alone; moving it to another
// thread moves them with it.
unsafe impl Send for EventRing {}

impl EventRing {
    /// Maps the ring buffer `map` (a BPF_MAP_TYPE_RINGBUF).
    pub fn new(map: MapData) -> Result<Self, MapError> {
        let size = map.info()?.max_entries() as usize;
        let mmap_error = |io_error| MapError::SyscallError(SyscallError { call: "mmap", io_error });
        if !size.is_power_of_two() || size < HEADER {
            return Err(mmap_error(io::Error::other(format!(
                "ring buffer of {size} bytes: not a power of two"
            ))));
        }
        let page = crate::events::page_size() as usize;
        let fd = map.fd().as_fd();
        let consumer = Mapping::new(fd, page, libc::PROT_READ | libc::PROT_WRITE, 0).map_err(mmap_error)?;
        let producer = Mapping::new(fd, page + size, libc::PROT_READ, page).map_err(mmap_error)?;
        let mut ring = Self {
            map,
            consumer,
            producer,
            size,
            pos: 0,
            published: 0,
            producer_pos: 0,
            needs_fence: false,
            wrapped: Vec::new(),
        };
        ring.pos = ring.consumer_pos().load(Ordering::Acquire);
        ring.published = ring.pos;
        ring.producer_pos = ring.load_producer();
        Ok(ring)
    }

    fn consumer_pos(&self) -> &AtomicUsize {
        // SAFETY: the page is mapped while self lives, page-aligned, and the
        // kernel reads it as an unsigned long updated with atomic stores.
        unsafe { self.consumer.ptr.cast::<AtomicUsize>().as_ref() }
    }

    fn load_producer(&self) -> usize {
        // SAFETY: as consumer_pos, for the producer page (written by the kernel).
        unsafe { self.producer.ptr.cast::<AtomicUsize>().as_ref() }.load(Ordering::Acquire)
    }

    /// The data pages.
    fn data(&self) -> *const u8 {
        // SAFETY: the data starts one page into the producer mapping.
        unsafe { self.producer.ptr.as_ptr().add(self.producer.len - self.size) }
    }

    /// The next record, if one is ready; it is consumed when the item is dropped.
    /// Inlined into its one caller (the drain loop): returned through memory,
    /// the item was stored field by field and loaded back as wider words, a
    /// stall of the store buffer each record (31% of `drain`'s samples, on
    /// the load right after the call).
    #[inline(always)]
    pub fn next_record(&mut self) -> Option<Item<'_>> {
        loop {
            if self.pos == self.producer_pos {
                self.publish();
                if self.needs_fence {
                    fence(Ordering::SeqCst);
                    self.needs_fence = false;
                }
                self.producer_pos = self.load_producer();
                if self.pos == self.producer_pos {
                    return None;
                }
            }
            let offset = self.pos & (self.size - 1);
            // SAFETY: offset is a multiple of 8 below size (a power of two
            // >= 8), so the 4-byte length word is inside the data pages.
            let header = unsafe { &*self.data().add(offset).cast::<AtomicU32>() }.load(Ordering::Acquire);
            if header & BUSY_BIT != 0 {
                // Not written yet: try again after a fence, as aya does.
                self.publish();
                if !self.needs_fence {
                    return None;
                }
                fence(Ordering::SeqCst);
                self.needs_fence = false;
                continue;
            }
            let len = (header & !(BUSY_BIT | DISCARD_BIT)) as usize;
            if len > self.size - HEADER {
                // Cannot be from the kernel; stop reading rather than read past the data.
                log::warn!("ring buffer record header says {len} bytes in a ring of {}", self.size);
                self.publish();
                return None;
            }
            if header & DISCARD_BIT != 0 {
                self.consume(len);
                continue;
            }
            let start = (offset + HEADER) & (self.size - 1);
            let bytes = if start + len <= self.size {
                // SAFETY: start..start + len is inside the data pages.
                unsafe { std::slice::from_raw_parts(self.data().add(start), len) }
            } else {
                let first = self.size - start;
                // SAFETY: start..size and 0..len - first are inside the data pages.
                let (a, b) = unsafe {
                    (
                        std::slice::from_raw_parts(self.data().add(start), first),
                        std::slice::from_raw_parts(self.data(), len - first),
                    )
                };
                self.wrapped.clear();
                self.wrapped.extend_from_slice(a);
                self.wrapped.extend_from_slice(b);
                &self.wrapped[..]
            };
            self.prefetch(self.pos + (HEADER + len).next_multiple_of(8));
            // Kept as a pointer: the item also holds &mut self (to consume on drop).
            let bytes: *const [u8] = bytes;
            return Some(Item { bytes, len, ring: self });
        }
    }

    fn consume(&mut self, len: usize) {
        self.pos += (HEADER + len).next_multiple_of(8);
        if self.pos - self.published >= PUBLISH_BYTES {
            self.publish();
        }
    }

    /// Hands the records read back to the kernel (see [`PUBLISH_BYTES`]).
    fn publish(&mut self) {
        if self.published != self.pos {
            self.consumer_pos().store(self.pos, Ordering::Release);
            self.published = self.pos;
            self.needs_fence = true;
        }
    }

    /// Asks the CPU to fetch the record at consumer position `at` (whether
    /// or not it is written yet: a prefetch never faults nor waits).
    fn prefetch(&self, at: usize) {
        #[cfg(target_arch = "x86_64")]
        for line in (0..PREFETCH_BYTES).step_by(64) {
            let offset = (at + line) & (self.size - 1);
            // SAFETY: the address is inside the data pages; prefetching
            // reads nothing the program sees.
            unsafe {
                use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
                _mm_prefetch::<_MM_HINT_T0>(self.data().add(offset).cast());
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = at;
    }
}

impl AsFd for EventRing {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.map.fd().as_fd()
    }
}

impl AsRawFd for EventRing {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

/// One record of the ring; consumed when dropped.
pub struct Item<'a> {
    /// The record: in the data pages, or in `ring.wrapped`.
    bytes: *const [u8],
    len: usize,
    ring: &'a mut EventRing,
}

impl std::ops::Deref for Item<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: the bytes stay valid and unwritten until the item is
        // dropped: the kernel writes only past our consumer position, which
        // moves on drop, and `wrapped` is changed only by the next `next`,
        // which the item's borrow of the ring rules out.
        unsafe { &*self.bytes }
    }
}

impl Drop for Item<'_> {
    fn drop(&mut self) {
        self.ring.consume(self.len);
    }
}
