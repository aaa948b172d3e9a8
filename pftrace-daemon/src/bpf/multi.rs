//! uprobe_multi links (kernel 6.6+): one BPF link per process covering every
//! probe site, semaphores raised by the kernel (`ref_ctr_offsets`) and
//! lowered when the link goes away, also if the daemon is killed.
//!
//! Why not the perf-event path of [`super::perf`]: measured here (kernel
//! 6.18, 2 vCPUs), attaching a process's two sites took 86 ms through perf
//! events and 7-8 ms through one uprobe_multi link, and closing took 166 ms
//! against 40 ms; closing a uprobe perf event also holds the kernel's
//! `event_mutex` through an RCU-tasks grace period, so it stalls every other
//! attachment on the host, where uprobe_multi closes overlap. A link is also
//! bound to the task, not the pid: it follows the process through exec and
//! can never fire for a later process that reuses the pid.
//!
//! aya 0.14 cannot load a program for this attach type (the kernel wants
//! `expected_attach_type = BPF_TRACE_UPROBE_MULTI` at load time), so the
//! program is relocated against aya's maps with aya-obj and loaded here.

use std::{
    collections::HashSet,
    ffi::CString,
    io,
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
};

use aya::{Ebpf, maps::Map};

/// Errors loading a program for uprobe_multi links.
#[derive(Debug, thiserror::Error)]
pub enum MultiLoadError {
    #[error("parsing the eBPF object: {0}")]
    Parse(#[from] aya_obj::ParseError),
    #[error("relocating the eBPF object: {0}")]
    Relocate(#[from] aya_obj::relocation::EbpfRelocationError),
    #[error("the eBPF object has no program {0}")]
    Missing(String),
    #[error("duplicating the eBPF maps' fds for the programs' load: {0}")]
    MapFds(io::Error),
    #[error("starting the thread that loads the uprobe programs: {0}")]
    Spawn(io::Error),
    #[error("the thread loading the uprobe programs panicked")]
    Thread,
    #[error("the kernel refused program {name} for uprobe_multi: {source}{log}")]
    Load { name: String, source: io::Error, log: String },
}

use super::{
    points::{ResolvedPoints, Scope},
    sys::{BPF_LINK_CREATE, BPF_PROG_LOAD, bpf_fd},
};

// From include/uapi/linux/bpf.h.
const BPF_PROG_TYPE_KPROBE: u32 = 2;
pub(crate) const BPF_TRACE_UPROBE_MULTI: u32 = 48;
const BPF_OBJ_NAME_LEN: usize = 16;

/// `union bpf_attr` for BPF_PROG_LOAD, up to `expected_attach_type`.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; BPF_OBJ_NAME_LEN],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// The maps `ebpf` created, by name, as duplicated fds: what
/// [`load_programs`] relocates against, owned so that the load can run on
/// a thread of its own (start.rs: the verifier's time beside the rest of a
/// start).
pub fn map_fds(ebpf: &Ebpf) -> io::Result<Vec<(String, OwnedFd)>> {
    ebpf.maps()
        .map(|(name, map)| Ok((name.to_string(), map_data(map).fd().as_fd().try_clone_to_owned()?)))
        .collect()
}

/// Loads the named programs of `object` for uprobe_multi links, relocated
/// against `maps` ([`map_fds`] of the `Ebpf` made from the same object, so
/// both share the maps).
pub fn load_programs(
    maps: &[(String, OwnedFd)],
    object: &[u8],
    names: &[&str],
) -> Result<Vec<OwnedFd>, MultiLoadError> {
    let mut obj = aya_obj::Object::parse(object)?;
    let text_sections: HashSet<usize> = obj.functions.keys().map(|(section, _)| *section).collect();
    let definitions = obj.maps.clone();
    let maps = maps.iter().filter_map(|(name, fd)| {
        let definition = definitions.get(name)?;
        Some((name.as_str(), fd.as_raw_fd(), definition))
    });
    obj.relocate_maps(maps, &text_sections)?;
    obj.relocate_calls(&text_sections)?;
    names
        .iter()
        .map(|&name| {
            let program = obj.programs.get(name).ok_or_else(|| MultiLoadError::Missing(name.into()))?;
            let function = obj
                .functions
                .get(&program.function_key())
                .ok_or_else(|| MultiLoadError::Missing(name.into()))?;
            load_one(name, &function.instructions, &program.license)
        })
        .collect()
}

fn map_data(map: &Map) -> &aya::maps::MapData {
    match map {
        Map::Array(d)
        | Map::ArrayOfMaps(d)
        | Map::BloomFilter(d)
        | Map::CgroupArray(d)
        | Map::CgroupStorage(d)
        | Map::CgrpStorage(d)
        | Map::CpuMap(d)
        | Map::DevMap(d)
        | Map::DevMapHash(d)
        | Map::HashMap(d)
        | Map::HashOfMaps(d)
        | Map::InodeStorage(d)
        | Map::LpmTrie(d)
        | Map::LruHashMap(d)
        | Map::PerCpuArray(d)
        | Map::PerCpuCgroupStorage(d)
        | Map::PerCpuHashMap(d)
        | Map::PerCpuLruHashMap(d)
        | Map::PerfEventArray(d)
        | Map::ProgramArray(d)
        | Map::Queue(d)
        | Map::ReusePortSockArray(d)
        | Map::RingBuf(d)
        | Map::SockHash(d)
        | Map::SockMap(d)
        | Map::SkStorage(d)
        | Map::Stack(d)
        | Map::StackTraceMap(d)
        | Map::Unsupported(d)
        | Map::XskMap(d) => d,
    }
}

fn load_one(
    name: &str,
    insns: &[aya_obj::generated::bpf_insn],
    license: &CString,
) -> Result<OwnedFd, MultiLoadError> {
    let mut prog_name = [0u8; BPF_OBJ_NAME_LEN];
    let short = &name.as_bytes()[..name.len().min(BPF_OBJ_NAME_LEN - 1)];
    prog_name[..short.len()].copy_from_slice(short);
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_KPROBE,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name,
        expected_attach_type: BPF_TRACE_UPROBE_MULTI,
        ..Default::default()
    };
    match prog_load(&attr) {
        Ok(fd) => Ok(fd),
        Err(source) => {
            // Again with the verifier's log, for the error message.
            let mut log = vec![0u8; 1 << 20];
            attr.log_level = 1;
            attr.log_size = log.len() as u32;
            attr.log_buf = log.as_mut_ptr() as u64;
            let _ = prog_load(&attr);
            let text = String::from_utf8_lossy(&log[..log.iter().position(|&b| b == 0).unwrap_or(0)]);
            let tail: Vec<&str> = text.lines().rev().take(20).collect();
            let log = if tail.is_empty() {
                String::new()
            } else {
                format!(
                    "\nverifier log (last lines):\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            };
            Err(MultiLoadError::Load { name: name.into(), source, log })
        }
    }
}

fn prog_load(attr: &ProgLoadAttr) -> io::Result<OwnedFd> {
    // SAFETY: attr is a zero-tailed prefix of union bpf_attr for BPF_PROG_LOAD;
    // the pointers in it outlive the call.
    unsafe { bpf_fd(BPF_PROG_LOAD, attr) }
}

/// `union bpf_attr` for BPF_LINK_CREATE of a uprobe_multi link.
#[repr(C)]
struct MultiLinkAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    path: u64,
    offsets: u64,
    ref_ctr_offsets: u64,
    cookies: u64,
    cnt: u32,
    multi_flags: u32,
    pid: u32,
    _pad: u32,
}

/// Creates one uprobe_multi link running `prog` at every point of `path`
/// (the file of `points`, as a C string), in the processes of `scope`.
pub fn link(
    prog: std::os::fd::BorrowedFd<'_>,
    path: &CString,
    points: &ResolvedPoints,
    scope: Scope,
) -> io::Result<OwnedFd> {
    let (offsets, ref_ctrs, cookies) = (points.offsets(), points.ref_ctr_offsets(), points.cookies());
    let attr = MultiLinkAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: 0,
        attach_type: BPF_TRACE_UPROBE_MULTI,
        flags: 0,
        path: path.as_ptr() as u64,
        offsets: offsets.as_ptr() as u64,
        ref_ctr_offsets: ref_ctrs.as_ptr() as u64,
        cookies: cookies.as_ptr() as u64,
        cnt: points.points.len() as u32,
        multi_flags: 0,
        pid: scope.pid().unwrap_or(0),
        _pad: 0,
    };
    // SAFETY: attr is a zero-tailed prefix of union bpf_attr for BPF_LINK_CREATE;
    // the arrays and the path outlive the call.
    unsafe { bpf_fd(BPF_LINK_CREATE, &attr) }
}
