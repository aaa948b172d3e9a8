//! The batched agent road's per-thread tails (`BATCH_OF`: kernel tid ->
//! the thread's buffer address in its process and the records of it already
//! on the ring), read by pftraced when it stops tracing: which threads still
//! hold events the kernel has not drained, and taking a thread's entry away
//! from the kernel before pftraced reads its buffer itself (so no drain of
//! the kernel's sends the same events again).

use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, Map, MapData},
};
use pftrace_common::BatchTail;

const MAP: &str = "BATCH_OF";

/// Every registered thread: (kernel tid, its tail).
pub(super) fn threads(ebpf: &Ebpf) -> Vec<(u32, BatchTail)> {
    let Some(map) = ebpf.map(MAP) else { return Vec::new() };
    let Ok(tails) = BpfHashMap::<&MapData, u32, BatchTail>::try_from(map) else { return Vec::new() };
    tails.iter().filter_map(Result::ok).collect()
}

/// Takes thread `tid`'s entry away in one step (BPF_MAP_LOOKUP_AND_DELETE_ELEM):
/// the tail it had, after which the kernel drains nothing of it any more.
pub(super) fn take(ebpf: &Ebpf, tid: u32) -> Option<BatchTail> {
    let fd = match ebpf.map(MAP)? {
        Map::LruHashMap(data) | Map::HashMap(data) => data.fd().as_fd().as_raw_fd(),
        _ => return None,
    };
    #[repr(C)]
    struct Attr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
    let mut value = BatchTail::default();
    let attr = Attr {
        map_fd: fd as u32,
        _pad: 0,
        key: &raw const tid as u64,
        value: &raw mut value as u64,
        flags: 0,
    };
    // SAFETY: attr is the prefix of bpf_attr this command reads; key and
    // value point at live memory of the map's sizes.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_AND_DELETE_ELEM,
            &attr as *const Attr,
            size_of::<Attr>() as u32,
        )
    };
    (rc == 0).then_some(value)
}
